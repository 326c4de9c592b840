//! End to end with authenticated real upstreams: the `entrepot` binary in front of a
//! `docker-registry` behind htpasswd basic auth, and in front of one behind a bearer-token
//! service (in-process, issuing RS256 JWTs the registry verifies). Pulls with the configured
//! credentials work and are cached; anonymous tokens work where the service grants them; tokens
//! that expire in the middle of a pull are replaced; wrong credentials give the client a prompt
//! 403 `DENIED` naming the upstream, never a hang, a 404, or the password.
//!
//! Needs `docker-registry`, `skopeo`, `htpasswd` and `openssl` on PATH; without them the tests
//! fail and say to run `bash .ci/install-deps.sh`.

mod common;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{ensure, Context, Result};
use common::auth_e2e::{htpasswd_auth, TokenOutcome, TokenPolicy, TokenRequest, TokenService};
use common::real::{
    require_programs, run_scenario, within, DockerRegistry, Entrepot, SeedImage, SkopeoCopy,
    TAG_TTL,
};
use common::{base64_encode, oci_errors, sha256_digest, upstream, OCI_MANIFEST};

const USER: &str = "e2e-user";
const PASS: &str = "right-Pa55word";
const WRONG_PASS: &str = "wrong-Pa55word";

/// How long a denied pull may take, skopeo included. Anything near a timeout is a hang.
const DENY_LIMIT: Duration = Duration::from_secs(20);
/// Ceiling for each request the tests send to entrepot directly.
const REQUEST_LIMIT: Duration = Duration::from_secs(20);
/// Ceiling for one whole scenario.
const SCENARIO_LIMIT: Duration = Duration::from_secs(150);

const UPSTREAM: &str = "secure.test";

const PROGRAMS: &[&str] = &["docker-registry", "skopeo", "htpasswd", "openssl"];

/// One `[[upstream]]` table for the registry, the default for bare names.
fn upstream_toml(url: &str, auth: &str) -> String {
    upstream(
        UPSTREAM,
        url,
        true,
        &format!("{TAG_TTL}\nrequest_timeout = \"10s\"\n{auth}"),
    )
}

/// Starts an entrepot in its own folder under `work`.
async fn start_entrepot(work: &Path, label: &str, upstreams: &str) -> Result<Entrepot> {
    let dir = work.join(format!("entrepot-{label}"));
    std::fs::create_dir_all(&dir)?;
    Entrepot::start(&dir, upstreams)
        .await
        .with_context(|| format!("starting entrepot {label}"))
}

/// Pushes `image` as `reference` (`repo:tag`) to the registry at `host`, with credentials.
async fn seed(work: &Path, image: &SeedImage, host: &str, reference: &str) -> Result<()> {
    let creds = format!("{USER}:{PASS}");
    image.push(work, host, reference, Some(&creds)).await
}

/// `GET` on entrepot, bounded by [`REQUEST_LIMIT`]: status, body, and how long it took.
async fn get(entrepot: &Entrepot, path: &str) -> Result<(u16, Vec<u8>, Duration)> {
    let url = format!("http://{}{path}", entrepot.host());
    let started = Instant::now();
    let resp = common::client()
        .get(&url)
        .header("Accept", OCI_MANIFEST)
        .timeout(REQUEST_LIMIT)
        .send()
        .await
        .with_context(|| format!("GET {url}"))?;
    let status = resp.status().as_u16();
    let body = resp
        .bytes()
        .await
        .with_context(|| format!("GET {url}: body"))?;
    Ok((status, body.to_vec(), started.elapsed()))
}

/// `GET` of a manifest or blob that must answer 200 with exactly the content of `digest`.
async fn get_verified(entrepot: &Entrepot, label: &str, path: &str, digest: &str) -> Result<()> {
    let (status, body, took) = get(entrepot, path).await?;
    ensure!(
        status == 200,
        "{label}: GET {path} answered {status} after {took:?}: {}\nentrepot log:\n{}",
        String::from_utf8_lossy(&body),
        entrepot.output()
    );
    let actual = sha256_digest(&body);
    ensure!(
        actual == digest,
        "{label}: GET {path} sent {} bytes hashing to {actual}, expected {digest}",
        body.len()
    );
    Ok(())
}

/// With wrong (or no) credentials for `repo:tag` of `image`: skopeo fails promptly and says
/// "denied", and entrepot answers the manifest and a blob with 403 and an OCI `DENIED` error that
/// names the upstream, quickly, with none of `secrets` in the body or in entrepot's log.
async fn expect_denied(
    entrepot: &Entrepot,
    work: &Path,
    label: &str,
    repo: &str,
    tag: &str,
    image: &SeedImage,
    secrets: &[&str],
) -> Result<()> {
    let out = work.join(format!("pull-{label}"));
    let source = format!("docker://{}/{repo}:{tag}", entrepot.host());
    let pull = SkopeoCopy {
        limit: DENY_LIMIT,
        ..SkopeoCopy::default()
    };
    let run = pull
        .run(&source, &format!("oci:{}:x", out.display()))
        .await?;
    ensure!(
        !run.success(),
        "{label}: skopeo pulled {source} although entrepot's credentials are wrong:\n{}",
        run.output
    );
    ensure!(
        run.elapsed < DENY_LIMIT,
        "{label}: skopeo took {:?} to fail (limit {DENY_LIMIT:?}):\n{}",
        run.elapsed,
        run.output
    );
    eprintln!(
        "{label}: skopeo failed after {:?}: {}",
        run.elapsed,
        run.output.lines().last().unwrap_or_default()
    );
    ensure!(
        run.output.to_lowercase().contains("denied"),
        "{label}: skopeo failed without saying access was denied:\n{}",
        run.output
    );

    let paths = [
        format!("/v2/{repo}/manifests/{tag}"),
        format!("/v2/{repo}/blobs/{}", image.layers[0].digest),
    ];
    for path in &paths {
        let (status, body, took) = get(entrepot, path).await?;
        let text = String::from_utf8_lossy(&body);
        ensure!(
            status == 403,
            "{label}: GET {path} answered {status} after {took:?}, expected 403: {text}\n\
             entrepot log:\n{}",
            entrepot.output()
        );
        ensure!(
            took < DENY_LIMIT,
            "{label}: GET {path} took {took:?} to be denied"
        );
        let errors = oci_errors(&body).with_context(|| format!("{label}: GET {path}"))?;
        let named = format!("upstream {UPSTREAM}");
        ensure!(
            errors
                .iter()
                .any(|(code, message)| code == "DENIED" && message.contains(&named)),
            "{label}: GET {path}: expected a DENIED error naming {named:?}, got {errors:?}"
        );
        for secret in secrets {
            ensure!(
                !text.contains(secret),
                "{label}: GET {path}: the response contains a credential: {text}"
            );
        }
    }
    let log = entrepot.output();
    for secret in secrets {
        ensure!(
            !log.contains(secret),
            "{label}: entrepot's log contains a credential"
        );
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// htpasswd basic auth

/// Field order is drop order: processes first, while the folder with their logs still exists.
struct BasicEnv {
    good: Entrepot,
    bad: Entrepot,
    registry: DockerRegistry,
    image: SeedImage,
    work: tempfile::TempDir,
}

impl BasicEnv {
    async fn start() -> Result<Self> {
        let work = tempfile::tempdir()?;
        let auth = htpasswd_auth(work.path(), USER, PASS)?;
        let registry = DockerRegistry::start_with("docker-registry-htpasswd", &auth).await?;
        let image = SeedImage::generate(&[1024 * 1024 + 3, 40_000]);
        seed(work.path(), &image, &registry.host(), "team/app:1.0").await?;

        let url = registry.url();
        let good = start_entrepot(
            work.path(),
            "good",
            &upstream_toml(
                &url,
                &format!("username = \"{USER}\"\npassword = \"{PASS}\"\n"),
            ),
        )
        .await?;
        let bad = start_entrepot(
            work.path(),
            "bad",
            &upstream_toml(
                &url,
                &format!("username = \"{USER}\"\npassword = \"{WRONG_PASS}\"\n"),
            ),
        )
        .await?;
        Ok(Self {
            good,
            bad,
            registry,
            image,
            work,
        })
    }
}

async fn basic_scenario(env: &BasicEnv) -> Result<()> {
    let work = env.work.path();
    env.good
        .pull_and_check(work, "basic-good", "team/app:1.0", &env.image)
        .await?;

    let basic_secret = base64_basic(USER, WRONG_PASS);
    expect_denied(
        &env.bad,
        work,
        "basic-wrong-password",
        "team/app",
        "1.0",
        &env.image,
        &[WRONG_PASS, &basic_secret],
    )
    .await?;
    // The registry did see entrepot try: an unauthenticated request, then the wrong password.
    let statuses = env.registry.entrepot_statuses("/v2/team/app/manifests/1.0");
    ensure!(
        statuses.get(&401).copied().unwrap_or(0) >= 2,
        "expected the registry to refuse entrepot's manifest requests, saw {statuses:?}"
    );
    Ok(())
}

fn base64_basic(user: &str, pass: &str) -> String {
    base64_encode(format!("{user}:{pass}").as_bytes())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn htpasswd_upstream_pulls_with_its_password_and_denies_a_wrong_one_promptly() {
    require_programs(PROGRAMS);
    run_scenario(within(SCENARIO_LIMIT, BasicEnv::start()), async |env| {
        within(SCENARIO_LIMIT, basic_scenario(env)).await
    })
    .await;
}

// ---------------------------------------------------------------------------------------------
// bearer tokens

const SERVICE: &str = "entrepot-e2e-registry";
const ISSUER: &str = "entrepot-e2e-issuer";

/// Field order is drop order: processes first, while the folders with their logs still exist.
struct TokenEnv {
    entrepots: Vec<Entrepot>,
    registry: DockerRegistry,
    tokens: TokenService,
    /// `public/app:1.0`: anonymous tokens may pull it.
    public: SeedImage,
    /// `private/app:1.0`: only the user's tokens may pull it. Several layers, for the expiry
    /// cases that fetch them one by one.
    private: SeedImage,
    work: tempfile::TempDir,
}

impl TokenEnv {
    async fn start() -> Result<Self> {
        let work = tempfile::tempdir()?;
        let tokens = TokenService::start(ISSUER, SERVICE, USER, PASS).await?;
        let registry =
            DockerRegistry::start_with("docker-registry-token", &tokens.registry_auth()).await?;
        let public = SeedImage::generate(&[512 * 1024, 3000]);
        let private = SeedImage::generate(&[300_000, 200_000, 100_000]);
        let host = registry.host();
        seed(work.path(), &public, &host, "public/app:1.0").await?;
        seed(work.path(), &private, &host, "private/app:1.0").await?;
        Ok(Self {
            entrepots: Vec::new(),
            registry,
            tokens,
            public,
            private,
            work,
        })
    }

    /// Starts an entrepot in front of the registry with `auth` keys; returns its index in
    /// `entrepots` (kept there so its log is printed if the test fails).
    async fn entrepot(&mut self, label: &str, auth: &str) -> Result<usize> {
        let upstreams = upstream_toml(&self.registry.url(), auth);
        let e = start_entrepot(self.work.path(), label, &upstreams).await?;
        self.entrepots.push(e);
        Ok(self.entrepots.len() - 1)
    }

    /// `password_file` holding `pass`, so both ways of giving a password are exercised.
    fn password_file(&self, name: &str, pass: &str) -> Result<PathBuf> {
        let path = self.work.path().join(name);
        std::fs::write(&path, format!("{pass}\n"))?;
        Ok(path)
    }

    /// Token requests entrepot has sent since `since` requests had been recorded.
    fn entrepot_requests_since(&self, since: usize) -> Vec<TokenRequest> {
        self.tokens
            .requests()
            .into_iter()
            .skip(since)
            .filter(|r| r.sent_by_entrepot())
            .collect()
    }
}

async fn token_scenario(env: &mut TokenEnv) -> Result<()> {
    let work = env.work.path().to_owned();
    let seeded = env.tokens.requests();
    ensure!(
        seeded
            .iter()
            .any(|r| r.basic_user.as_deref() == Some(USER) && r.outcome == TokenOutcome::Issued),
        "seeding did not go through the token service: {seeded:?}"
    );

    // (a) Anonymous: public pulls work with anonymous tokens; private ones are denied.
    let mark = env.tokens.requests().len();
    let i = env.entrepot("anonymous", "").await?;
    let anon = &env.entrepots[i];
    anon.pull_and_check(&work, "bearer-anonymous", "public/app:1.0", &env.public)
        .await?;
    expect_denied(
        anon,
        &work,
        "bearer-anonymous-private",
        "private/app",
        "1.0",
        &env.private,
        &[],
    )
    .await?;
    let seen = env.entrepot_requests_since(mark);
    ensure!(
        !seen.is_empty() && seen.iter().all(|r| r.basic_user.is_none()),
        "the anonymous entrepot sent no token request, or sent credentials: {seen:?}"
    );
    ensure!(
        seen.iter().all(|r| r.service.as_deref() == Some(SERVICE)),
        "token requests without service={SERVICE}: {seen:?}"
    );
    ensure!(
        seen.iter()
            .any(|r| r.scopes == ["repository:public/app:pull"] && !r.granted.is_empty()),
        "no anonymous token for repository:public/app:pull was issued: {seen:?}"
    );

    // (b) Credentialed (password from a file): the private image pulls, and every token
    // request carried the user's Basic credentials.
    let mark = env.tokens.requests().len();
    let file = env.password_file("password-right", PASS)?;
    let auth = format!(
        "username = \"{USER}\"\npassword_file = {:?}\n",
        file.display()
    );
    let i = env.entrepot("credentialed", &auth).await?;
    let user = &env.entrepots[i];
    user.pull_and_check(
        &work,
        "bearer-credentialed",
        "private/app:1.0",
        &env.private,
    )
    .await?;
    let seen = env.entrepot_requests_since(mark);
    let with_user = |r: &TokenRequest| {
        r.basic_user.as_deref() == Some(USER) && r.outcome == TokenOutcome::Issued
    };
    ensure!(
        !seen.is_empty() && seen.iter().all(with_user),
        "the credentialed entrepot's token requests did not all carry {USER}'s credentials: \
         {seen:?}"
    );

    // (c) Tokens that expire mid-pull. With an honest `expires_in`, entrepot drops its token
    // just before it expires and asks for a new one: the registry never refuses it. With an
    // `expires_in` that claims 300 s, only the registry's 401 tells entrepot, which must then
    // fetch a new token and retry.
    let lifetime = Duration::from_secs(2);
    expiry_case(
        env,
        &auth,
        "expiry-honest",
        TokenPolicy {
            lifetime,
            expires_in: None,
        },
        Refusals::None,
    )
    .await?;
    expiry_case(
        env,
        &auth,
        "expiry-overstated",
        TokenPolicy {
            lifetime,
            expires_in: Some(300),
        },
        Refusals::AtLeastOne,
    )
    .await?;
    env.tokens.set_policy(TokenPolicy::default());

    // (d) Wrong credentials: the token service refuses them, entrepot says DENIED promptly,
    // for private and public repositories alike (a wrong password is not anonymous access).
    let mark = env.tokens.requests().len();
    let wrong = env.password_file("password-wrong", WRONG_PASS)?;
    let auth = format!(
        "username = \"{USER}\"\npassword_file = {:?}\n",
        wrong.display()
    );
    let secret = base64_basic(USER, WRONG_PASS);
    let i = env.entrepot("wrong-password", &auth).await?;
    let bad = &env.entrepots[i];
    for (repo, image) in [("private/app", &env.private), ("public/app", &env.public)] {
        let label = format!("bearer-wrong-password-{}", repo.replace('/', "-"));
        expect_denied(
            bad,
            &work,
            &label,
            repo,
            "1.0",
            image,
            &[WRONG_PASS, &secret],
        )
        .await?;
    }
    let seen = env.entrepot_requests_since(mark);
    ensure!(
        !seen.is_empty()
            && seen
                .iter()
                .all(|r| r.outcome == TokenOutcome::BadCredentials),
        "expected only refused token requests from the entrepot with a wrong password: {seen:?}"
    );
    Ok(())
}

/// How often the registry may refuse entrepot's blob requests in an expiry case.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Refusals {
    /// Never: entrepot replaced the token before it expired.
    None,
    /// The expired token was refused (then replaced and the request retried).
    AtLeastOne,
}

/// A fresh entrepot (so no cached token, no cached blob) fetches `private/app` blob by blob with
/// tokens living `policy.lifetime`, waiting past that lifetime between two layers: every fetch
/// must succeed with the right bytes, entrepot must have needed more than one token, and the
/// registry's refusals of entrepot's blob requests must be as `refusals` says.
async fn expiry_case(
    env: &mut TokenEnv,
    auth: &str,
    label: &str,
    policy: TokenPolicy,
    refusals: Refusals,
) -> Result<()> {
    env.tokens.set_policy(policy);
    let issued_before = env.tokens.issued_to_entrepot();
    let blob_path = "/v2/private/app/blobs/";
    let refused_before = refused(&env.registry, blob_path);
    let i = env.entrepot(label, auth).await?;
    let entrepot = &env.entrepots[i];
    let image = &env.private;
    let blob = |d: &str| format!("{blob_path}{d}");

    let manifest = "/v2/private/app/manifests/1.0";
    get_verified(entrepot, label, manifest, &image.manifest.digest).await?;
    let first = &image.layers[0].digest;
    get_verified(entrepot, label, &blob(first), first).await?;
    // Past the lifetime, plus the second `exp` may have been rounded up by: the registry now
    // refuses every token issued so far.
    tokio::time::sleep(policy.lifetime + Duration::from_millis(1200)).await;
    for b in std::iter::once(&image.config).chain(&image.layers[1..]) {
        get_verified(entrepot, label, &blob(&b.digest), &b.digest).await?;
    }
    entrepot
        .check_stored(image.all_digests())
        .await
        .with_context(|| format!("{label}: after the pull"))?;

    let issued = env.tokens.issued_to_entrepot() - issued_before;
    let refused = refused(&env.registry, blob_path) - refused_before;
    eprintln!(
        "{label}: entrepot was issued {issued} tokens; the registry refused {refused} of its \
         blob requests"
    );
    ensure!(
        issued >= 2,
        "{label}: the pull crossed a token expiry but entrepot was issued only {issued} \
         token(s); entrepot log:\n{}",
        entrepot.output()
    );
    let expected = match refusals {
        Refusals::None => refused == 0,
        Refusals::AtLeastOne => refused >= 1,
    };
    ensure!(
        expected,
        "{label}: expected {refusals:?} registry refusals (401) of entrepot's blob requests, \
         saw {refused}; entrepot log:\n{}",
        entrepot.output()
    );
    Ok(())
}

/// How many of entrepot's requests for paths containing `path` the registry answered with 401.
fn refused(registry: &DockerRegistry, path: &str) -> usize {
    registry
        .entrepot_statuses(path)
        .get(&401)
        .copied()
        .unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn token_service_upstream_anonymous_credentialed_expiring_and_wrong_credentials() {
    require_programs(PROGRAMS);
    run_scenario(within(SCENARIO_LIMIT, TokenEnv::start()), async |env| {
        within(SCENARIO_LIMIT, token_scenario(env)).await
    })
    .await;
}
