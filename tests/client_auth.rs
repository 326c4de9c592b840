//! Client authentication and the read policy (issue 12) through the real server: 401 with a
//! `Basic` challenge for anonymous reads of protected repositories, 403 for users the rule does
//! not list, 200 for those it does and for anonymous reads where a rule allows them; the `/v2/`
//! probe both ways; a cache hit checked like any read; the htpasswd file reloaded while running;
//! and a client's password never in the server's log.
//!
//! Then real clients with credentials, through the `entrepot` binary in front of a
//! `docker-registry`: `skopeo copy --src-creds`, `podman pull --authfile`, and containerd with an
//! `Authorization` header in `hosts.toml`. Those need docker-registry, skopeo, podman and
//! containerd (`bash .ci/install-deps.sh`).

mod common;

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{ensure, Context as _, Result};
use common::fake_registry::{FakeRegistry, PushedImage};
use common::proxy::Proxy;
use common::real::{
    require_program, require_programs, run_bounded, run_scenario, start_on_free_port, ChildGuard,
    DockerRegistry, Entrepot, SeedImage, SkopeoCopy, TAG_TTL,
};
use common::{base64_encode, random_bytes, upstream, OCI_MANIFEST};

const REALM: &str = "entrepot-test";
/// The upstream's name in entrepot, and so the first component of every `match`.
const UP: &str = "fake";

const ALICE: (&str, &str) = ("alice", "alice-Pa55");
const BOB: (&str, &str) = ("bob", "bob-Pa55");

/// `user:<bcrypt>` lines, at bcrypt's lowest cost (the tests check who gets in, not bcrypt).
fn htpasswd(users: &[(&str, &str)]) -> String {
    users
        .iter()
        .map(|(u, p)| format!("{u}:{}\n", bcrypt::hash(p, 4).unwrap()))
        .collect()
}

fn basic(user: &str, password: &str) -> String {
    format!(
        "Basic {}",
        base64_encode(format!("{user}:{password}").as_bytes())
    )
}

/// The fake upstream with `public/app:1`, `acme/app:1` and `other/app:1`, and entrepot in front
/// of it with an htpasswd file of alice and bob and the rules in `access`.
struct Setup {
    proxy: Proxy,
    up: FakeRegistry,
    htpasswd: PathBuf,
    acme: PushedImage,
    public: PushedImage,
    _dir: tempfile::TempDir,
}

/// Anyone reads `public/**`; alice and ci read `acme/**`; nothing else has a rule.
const RULES: &str = "[[access]]\nmatch = \"fake/public/**\"\nanonymous = true\n\
                     [[access]]\nmatch = \"fake/acme/**\"\nusers = [\"ci\", \"alice\"]\n";

/// Only alice reads `acme/**`; nobody else reads anything.
const PRIVATE_RULES: &str = "[[access]]\nmatch = \"fake/acme/**\"\nusers = [\"alice\"]\n";

impl Setup {
    async fn start(rules: &str) -> Setup {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("htpasswd");
        std::fs::write(&path, htpasswd(&[ALICE, BOB])).unwrap();
        let up = FakeRegistry::start().await;
        let public = up.push_image("public/app", "1", &[random_bytes(3000, 1).into()]);
        let acme = up.push_image("acme/app", "1", &[random_bytes(5000, 2).into()]);
        up.push_image("other/app", "1", &[random_bytes(700, 3).into()]);
        let config = format!(
            "{}[auth]\nhtpasswd = {:?}\nrealm = \"{REALM}\"\n{rules}",
            upstream(UP, &up.url(), true, ""),
            path.display().to_string()
        );
        let proxy = Proxy::start(&config).await;
        Setup {
            proxy,
            up,
            htpasswd: path,
            acme,
            public,
            _dir: dir,
        }
    }

    /// `method path` with `Authorization: <authorization>` if given.
    async fn send(
        &self,
        method: reqwest::Method,
        path: &str,
        authorization: Option<&str>,
    ) -> reqwest::Response {
        let mut req = common::client()
            .request(method, self.proxy.url(path))
            .header("Accept", OCI_MANIFEST);
        if let Some(a) = authorization {
            req = req.header("Authorization", a);
        }
        req.send().await.unwrap()
    }

    async fn get(&self, path: &str, authorization: Option<&str>) -> reqwest::Response {
        self.send(reqwest::Method::GET, path, authorization).await
    }

    /// Requests that reached the upstream for paths containing `part`.
    fn upstream_requests(&self, part: &str) -> usize {
        self.up
            .requests()
            .iter()
            .filter(|r| r.path.contains(part))
            .count()
    }
}

/// Asserts a 401 with the `Basic` challenge and an OCI `UNAUTHORIZED` error.
async fn assert_challenged(resp: reqwest::Response, what: &str) {
    assert_eq!(resp.status(), 401, "{what}");
    let challenge = resp
        .headers()
        .get("www-authenticate")
        .unwrap_or_else(|| panic!("{what}: no WWW-Authenticate"))
        .to_str()
        .unwrap()
        .to_string();
    assert_eq!(challenge, format!("Basic realm=\"{REALM}\""), "{what}");
    assert_eq!(common::error_code(resp).await, "UNAUTHORIZED", "{what}");
}

async fn assert_denied(resp: reqwest::Response, what: &str) {
    assert_eq!(resp.status(), 403, "{what}");
    assert!(resp.headers().get("www-authenticate").is_none(), "{what}");
    assert_eq!(common::error_code(resp).await, "DENIED", "{what}");
}

#[tokio::test]
async fn anonymous_read_of_a_protected_repository_is_challenged_before_the_upstream_is_asked() {
    let s = Setup::start(RULES).await;
    let manifest = "/v2/acme/app/manifests/1";
    let blob = format!("/v2/acme/app/blobs/{}", s.acme.layers[0]);
    assert_challenged(s.get(manifest, None).await, "manifest").await;
    assert_challenged(s.get(&blob, None).await, "blob").await;
    let head = s.send(reqwest::Method::HEAD, manifest, None).await;
    assert_eq!(head.status(), 401);
    assert!(head.headers().contains_key("www-authenticate"));
    // A wrong password, an unknown user, a malformed header: the same challenge.
    for auth in [
        basic(ALICE.0, "wrong"),
        basic("mallory", ALICE.1),
        "Basic %%%".to_string(),
    ] {
        assert_challenged(s.get(manifest, Some(&auth)).await, &auth).await;
    }
    // A tags list and a repository with no rule at all.
    assert_challenged(s.get("/v2/acme/app/tags/list", None).await, "tags").await;
    assert_challenged(s.get("/v2/other/app/manifests/1", None).await, "no rule").await;
    assert_eq!(
        s.upstream_requests("/v2/acme/") + s.upstream_requests("/v2/other/"),
        0,
        "a refused read reached the upstream"
    );
}

#[tokio::test]
async fn an_authenticated_user_the_rule_does_not_list_gets_403_denied() {
    let s = Setup::start(RULES).await;
    let bob = basic(BOB.0, BOB.1);
    assert_denied(
        s.get("/v2/acme/app/manifests/1", Some(&bob)).await,
        "bob, acme",
    )
    .await;
    let blob = format!("/v2/acme/app/blobs/{}", s.acme.layers[0]);
    assert_denied(s.get(&blob, Some(&bob)).await, "bob, acme blob").await;
    // No rule: even alice is refused.
    let alice = basic(ALICE.0, ALICE.1);
    assert_denied(
        s.get("/v2/other/app/manifests/1", Some(&alice)).await,
        "alice, no rule",
    )
    .await;
    assert_eq!(
        s.upstream_requests("/v2/acme/") + s.upstream_requests("/v2/other/"),
        0
    );
}

#[tokio::test]
async fn a_listed_user_pulls_the_protected_image() {
    let s = Setup::start(RULES).await;
    let alice = basic(ALICE.0, ALICE.1);
    let r = s.get("/v2/acme/app/manifests/1", Some(&alice)).await;
    assert_eq!(r.status(), 200);
    assert_eq!(r.bytes().await.unwrap(), s.acme.manifest_body);
    for d in [&s.acme.config, &s.acme.layers[0]] {
        let r = s
            .get(&format!("/v2/acme/app/blobs/{d}"), Some(&alice))
            .await;
        assert_eq!(r.status(), 200);
        assert_eq!(common::sha256_digest(&r.bytes().await.unwrap()), *d);
    }
}

#[tokio::test]
async fn anonymous_reads_where_a_rule_allows_them_ignore_credentials() {
    let s = Setup::start(RULES).await;
    s.proxy.pull_image("public/app", "1").await.unwrap();
    // Wrong credentials on a public repository: still served (they are not looked at).
    let r = s
        .get("/v2/public/app/manifests/1", Some(&basic("x", "y")))
        .await;
    assert_eq!(r.status(), 200);
    assert_eq!(r.bytes().await.unwrap(), s.public.manifest_body);
}

#[tokio::test]
async fn v2_probe_is_open_when_some_rule_allows_anonymous_reads() {
    let s = Setup::start(RULES).await;
    let r = s.get("/v2/", None).await;
    assert_eq!(r.status(), 200);
    // Some rule wants credentials: the 200 carries the challenge, which containers/image
    // clients (skopeo, podman) need before they send any.
    assert_eq!(
        r.headers().get("www-authenticate").unwrap(),
        &format!("Basic realm=\"{REALM}\"")
    );
    // Credentials, when sent, must be right: `docker login` with a wrong password fails.
    assert_eq!(
        s.get("/v2/", Some(&basic(ALICE.0, ALICE.1))).await.status(),
        200
    );
    assert_challenged(s.get("/v2/", Some(&basic(ALICE.0, "nope"))).await, "wrong").await;
}

#[tokio::test]
async fn v2_probe_asks_anonymous_clients_for_credentials_when_nothing_is_public() {
    let s = Setup::start(PRIVATE_RULES).await;
    assert_challenged(s.get("/v2/", None).await, "anonymous /v2/").await;
    let head = s.send(reqwest::Method::HEAD, "/v2/", None).await;
    assert_eq!(head.status(), 401);
    assert_eq!(
        s.get("/v2/", Some(&basic(BOB.0, BOB.1))).await.status(),
        200
    );
}

#[tokio::test]
async fn without_auth_or_access_everything_stays_anonymous() {
    let up = FakeRegistry::start().await;
    up.push_image("acme/app", "1", &[random_bytes(100, 9).into()]);
    let proxy = Proxy::start(&upstream(UP, &up.url(), true, "")).await;
    assert_eq!(proxy.get("/v2/").await.status(), 200);
    proxy.pull_image("acme/app", "1").await.unwrap();
}

#[tokio::test]
async fn a_cache_hit_is_still_checked() {
    let s = Setup::start(RULES).await;
    let alice = basic(ALICE.0, ALICE.1);
    let layer = s.acme.layers[0].clone();
    let path = format!("/v2/acme/app/blobs/{layer}");
    let r = s.get(&path, Some(&alice)).await;
    assert_eq!(r.status(), 200);
    r.bytes().await.unwrap();
    s.proxy.wait_cached(&layer).await;
    let fetched = s.upstream_requests(&layer);

    assert_challenged(s.get(&path, None).await, "cached blob, anonymous").await;
    let manifest = format!("/v2/acme/app/manifests/{}", s.acme.manifest);
    let r = s.get(&manifest, Some(&alice)).await;
    assert_eq!(r.status(), 200);
    assert_challenged(s.get(&manifest, None).await, "cached manifest, anonymous").await;
    assert_denied(
        s.get(&path, Some(&basic(BOB.0, BOB.1))).await,
        "cached blob, bob",
    )
    .await;
    // Still served to alice, from the cache.
    let r = s.get(&path, Some(&alice)).await;
    assert_eq!(r.status(), 200);
    assert_eq!(common::sha256_digest(&r.bytes().await.unwrap()), layer);
    assert_eq!(
        s.upstream_requests(&layer),
        fetched,
        "served from the cache"
    );
}

#[tokio::test]
async fn a_user_added_to_the_htpasswd_file_gets_in_without_a_restart() {
    let s = Setup::start(RULES).await;
    let ci = basic("ci", "ci-Pa55");
    let manifest = "/v2/acme/app/manifests/1";
    assert_challenged(s.get(manifest, Some(&ci)).await, "ci before").await;

    // Broken first: the users loaded before keep working, ci stays out.
    std::fs::write(&s.htpasswd, "ci:plain-text\n").unwrap();
    tokio::time::sleep(Duration::from_secs(3)).await;
    let alice = basic(ALICE.0, ALICE.1);
    assert_eq!(s.get(manifest, Some(&alice)).await.status(), 200);
    assert_challenged(s.get(manifest, Some(&ci)).await, "ci, broken file").await;

    std::fs::write(&s.htpasswd, htpasswd(&[ALICE, BOB, ("ci", "ci-Pa55")])).unwrap();
    common::eventually(Duration::from_secs(10), "ci to get in", || async {
        s.get(manifest, Some(&ci)).await.status() == 200
    })
    .await;
}

#[tokio::test]
async fn a_flood_of_wrong_passwords_does_not_stop_anonymous_or_remembered_users() {
    let s = Setup::start(RULES).await;
    let alice = basic(ALICE.0, ALICE.1);
    let manifest = "/v2/acme/app/manifests/1";
    assert_eq!(s.get(manifest, Some(&alice)).await.status(), 200);
    let client = common::client();
    let mut flood = tokio::task::JoinSet::new();
    for i in 0..300 {
        let req = client
            .get(s.proxy.url(manifest))
            .header("Authorization", basic(ALICE.0, &format!("guess-{i}")));
        flood.spawn(async move { req.send().await.map(|r| r.status().as_u16()) });
    }
    // Meanwhile: anonymous pulls of the public image and alice (remembered) are served.
    for _ in 0..5 {
        s.proxy.pull_image("public/app", "1").await.unwrap();
        assert_eq!(s.get(manifest, Some(&alice)).await.status(), 200);
    }
    let mut statuses = std::collections::BTreeMap::new();
    while let Some(r) = flood.join_next().await {
        *statuses.entry(r.unwrap().unwrap()).or_insert(0) += 1;
    }
    // Each guess is refused: 401, or 429 when too many checks were waiting. Never a 200.
    assert!(
        statuses.keys().all(|s| *s == 401 || *s == 429),
        "{statuses:?}"
    );
}

// ---------------------------------------------------------------------------------------------
// The log, through the binary

#[tokio::test]
async fn the_clients_password_and_authorization_never_appear_in_the_log() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("htpasswd");
    let canary = "canary-Pw-51873";
    let wrong = "canary-Wrong-66204";
    std::fs::write(&path, htpasswd(&[("alice", canary)])).unwrap();
    let up = FakeRegistry::start().await;
    let image = up.push_image("acme/app", "1", &[random_bytes(2000, 4).into()]);
    let config = format!(
        "{}[auth]\nhtpasswd = {:?}\n{RULES}",
        upstream(UP, &up.url(), true, ""),
        path.display().to_string()
    );
    // The binary, as `Entrepot::start` runs it, but logging everything at debug and its own
    // lines at trace.
    let config_path = dir.path().join("entrepot.toml");
    let (port, entrepot) = start_on_free_port(&[200], |port| {
        let store = dir.path().join("store");
        std::fs::write(
            &config_path,
            format!(
                "[server]\nlisten = \"127.0.0.1:{port}\"\n[storage]\nroot = {:?}\n{config}",
                store.display().to_string()
            ),
        )?;
        let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_entrepot"));
        cmd.arg("serve")
            .arg("--config")
            .arg(&config_path)
            .env("ENTREPOT_LOG", "debug,entrepot=trace");
        ChildGuard::spawn("entrepot", cmd, dir.path().join("entrepot.log"))
    })
    .await
    .unwrap();
    let url = |p: &str| format!("http://127.0.0.1:{port}{p}");
    let right = basic("alice", canary);
    let headers = [
        right.clone(),
        basic("alice", wrong),
        basic(wrong, canary),
        format!("Basic {wrong}"),
        format!("Bearer {wrong}"),
    ];
    let paths = [
        "/v2/".to_string(),
        "/v2/acme/app/manifests/1".to_string(),
        format!("/v2/acme/app/blobs/{}", image.layers[0]),
        "/v2/other/app/manifests/1".to_string(),
        "/v2/acme/app/tags/list".to_string(),
    ];
    let client = common::client();
    let mut served = 0;
    for h in &headers {
        for p in &paths {
            let resp = client
                .get(url(p))
                .header("Authorization", h)
                .header("Accept", OCI_MANIFEST)
                .send()
                .await
                .unwrap();
            served += usize::from(resp.status() == 200);
            let shown = format!("{:?}", resp.headers());
            let body = resp.bytes().await.unwrap();
            let body = String::from_utf8_lossy(&body);
            for secret in [canary, wrong, &right[6..]] {
                assert!(!shown.contains(secret), "{p}: a response header echoes it");
                assert!(!body.contains(secret), "{p}: the body echoes it");
            }
        }
    }
    assert!(served >= 3, "alice was served");
    // Let the access log lines of the last transfers be written.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let log = entrepot.output();
    assert!(
        log.contains("/v2/acme/app/manifests/1"),
        "an access log:\n{log}"
    );
    assert!(
        log.contains("read refused to an authenticated user"),
        "debug lines are logged:\n{log}"
    );
    for secret in [canary, wrong, &right[6..]] {
        assert!(!log.contains(secret), "the log holds a credential:\n{log}");
    }
    for r in up.requests() {
        assert!(
            !r.headers.contains_key("authorization"),
            "the client's Authorization reached the upstream: {r:?}"
        );
    }
}

// ---------------------------------------------------------------------------------------------
// Real clients with credentials

const CI: (&str, &str) = ("ci", "ci-e2e-Pa55");
/// The upstream name skopeo and podman use (first path component).
const REG: &str = "reg.test";

/// Field order is drop order: processes first, while the folder with their logs exists.
struct ClientsEnv {
    entrepot: Entrepot,
    registry: DockerRegistry,
    /// Requests the registry had answered when seeding was over.
    seeded: usize,
    app: SeedImage,
    work: tempfile::TempDir,
}

impl ClientsEnv {
    /// A docker-registry with `acme/app:1.0`, and entrepot in front of it under two names: `REG`
    /// (skopeo, podman: path prefix) and the registry's own `host:port` (containerd: `ns=`).
    /// Only ci reads `acme/**` through either; anyone reads `public/**` (so `/v2/` answers 200
    /// and the binary's readiness probe passes).
    async fn start() -> Result<Self> {
        let work = tempfile::tempdir()?;
        let app = SeedImage::generate(&[256 * 1024, 1000]);
        let registry =
            DockerRegistry::seeded("docker-registry", work.path(), &app, "acme/app:1.0").await?;
        let htpasswd_path = work.path().join("htpasswd");
        std::fs::write(&htpasswd_path, htpasswd(&[CI, BOB]))?;
        let host = registry.host();
        let config = format!(
            "{}{}[auth]\nhtpasswd = {:?}\n\
             [[access]]\nmatch = \"{REG}/acme/**\"\nusers = [\"ci\"]\n\
             [[access]]\nmatch = \"{host}/acme/**\"\nusers = [\"ci\"]\n\
             [[access]]\nmatch = \"*/public/**\"\nanonymous = true\n",
            upstream(REG, &registry.url(), false, TAG_TTL),
            upstream(&host, &registry.url(), false, TAG_TTL),
            htpasswd_path.display().to_string()
        );
        let entrepot = Entrepot::start(work.path(), &config).await?;
        Ok(Self {
            entrepot,
            seeded: registry.requests().len(),
            registry,
            app,
            work,
        })
    }

    fn skopeo_source(&self) -> String {
        format!("docker://{}/{REG}/acme/app:1.0", self.entrepot.host())
    }

    /// Since seeding, every request the registry saw came from entrepot.
    fn only_entrepot_reached_the_registry(&self) -> Result<()> {
        let bypass: Vec<_> = self
            .registry
            .requests_since(self.seeded)
            .into_iter()
            .filter(|r| !r.sent_by_entrepot())
            .collect();
        ensure!(
            bypass.is_empty(),
            "a client went around entrepot: {bypass:#?}"
        );
        Ok(())
    }
}

/// Whether a client's output says it was refused for want of (right) credentials.
fn unauthorized(output: &str) -> bool {
    let said = output.to_lowercase();
    said.contains("unauthorized")
        || said.contains("authentication required")
        || said.contains("401")
}

async fn skopeo_scenario(env: &mut ClientsEnv) -> Result<()> {
    let work = env.work.path();
    // Without credentials: refused, and skopeo says why.
    let out = work.join("pull-anonymous");
    let run = SkopeoCopy::default()
        .run(&env.skopeo_source(), &format!("oci:{}:x", out.display()))
        .await?;
    ensure!(!run.success(), "skopeo pulled without credentials");
    ensure!(
        unauthorized(&run.output),
        "skopeo failed without saying it was unauthorized:\n{}",
        run.output
    );
    // bob authenticates but is not listed: denied.
    let bob = format!("{}:{}", BOB.0, BOB.1);
    let run = SkopeoCopy {
        src_creds: Some(&bob),
        ..SkopeoCopy::default()
    }
    .run(
        &env.skopeo_source(),
        &format!("oci:{}:x", work.join("pull-bob").display()),
    )
    .await?;
    ensure!(!run.success(), "skopeo pulled as bob");
    ensure!(
        run.output.to_lowercase().contains("denied"),
        "skopeo failed for bob without saying denied:\n{}",
        run.output
    );
    // ci: the image, blob for blob.
    let ci = format!("{}:{}", CI.0, CI.1);
    let out = work.join("pull-ci");
    SkopeoCopy {
        src_creds: Some(&ci),
        ..SkopeoCopy::default()
    }
    .copy(&env.skopeo_source(), &format!("oci:{}:x", out.display()))
    .await
    .context("skopeo copy --src-creds ci")?;
    let pulled = common::real::read_layout(&out, "x")?;
    pulled.expect(
        "skopeo ci",
        &env.app.manifest.digest,
        &env.app.blob_digests(),
    )?;
    env.entrepot.check_stored(env.app.all_digests()).await?;
    env.only_entrepot_reached_the_registry()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn skopeo_pulls_a_protected_image_with_src_creds() {
    require_programs(&["docker-registry", "skopeo"]);
    run_scenario(ClientsEnv::start(), skopeo_scenario).await;
}

/// `podman pull` with storage and configuration of its own under `dir`, and `--authfile`.
async fn podman_pull(
    dir: &Path,
    authfile: &Path,
    reference: &str,
) -> Result<common::real::Finished> {
    for sub in ["root", "runroot", "tmp", "image-tmp"] {
        std::fs::create_dir_all(dir.join(sub))?;
    }
    std::fs::write(
        dir.join("policy.json"),
        r#"{"default":[{"type":"insecureAcceptAnything"}]}"#,
    )?;
    std::fs::write(dir.join("containers.conf"), "")?;
    std::fs::write(
        dir.join("registries.conf"),
        "unqualified-search-registries = []\n",
    )?;
    let mut cmd = std::process::Command::new(require_program("podman"));
    cmd.env("CONTAINERS_REGISTRIES_CONF", dir.join("registries.conf"))
        .env("CONTAINERS_CONF", dir.join("containers.conf"))
        .env("TMPDIR", dir.join("image-tmp"))
        .arg("--root")
        .arg(dir.join("root"))
        .arg("--runroot")
        .arg(dir.join("runroot"))
        .arg("--tmpdir")
        .arg(dir.join("tmp"))
        .args(["--storage-driver", "vfs"])
        .args(["--cgroup-manager", "cgroupfs"])
        .args(["--events-backend", "file"])
        .arg("pull")
        .arg("--tls-verify=false")
        .arg("--authfile")
        .arg(authfile)
        .arg("--signature-policy")
        .arg(dir.join("policy.json"))
        .arg(reference);
    run_bounded(
        &format!("podman pull {reference}"),
        cmd,
        Duration::from_secs(120),
    )
    .await
}

async fn podman_scenario(env: &mut ClientsEnv) -> Result<()> {
    let work = env.work.path();
    let reference = format!("{}/{REG}/acme/app:1.0", env.entrepot.host());
    let empty = work.join("auth-empty.json");
    std::fs::write(&empty, r#"{"auths":{}}"#)?;
    let run = podman_pull(&work.join("podman-anonymous"), &empty, &reference).await?;
    ensure!(!run.success(), "podman pulled without credentials");
    ensure!(
        unauthorized(&run.output),
        "podman failed without saying it was unauthorized:\n{}",
        run.output
    );

    let authfile = work.join("auth.json");
    let entry = base64_encode(format!("{}:{}", CI.0, CI.1).as_bytes());
    std::fs::write(
        &authfile,
        format!(
            r#"{{"auths":{{"{}":{{"auth":"{entry}"}}}}}}"#,
            env.entrepot.host()
        ),
    )?;
    let run = podman_pull(&work.join("podman-ci"), &authfile, &reference).await?;
    ensure!(
        run.success(),
        "podman pull --authfile failed:\n{}\nentrepot:\n{}",
        run.output,
        env.entrepot.output()
    );
    ensure!(
        run.output.contains(&env.app.manifest.digest) || run.output.contains("Writing manifest"),
        "podman did not report the image:\n{}",
        run.output
    );
    env.entrepot.check_stored(env.app.all_digests()).await?;
    env.only_entrepot_reached_the_registry()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn podman_pulls_a_protected_image_with_an_authfile() {
    require_programs(&["docker-registry", "skopeo", "podman"]);
    run_scenario(ClientsEnv::start(), podman_scenario).await;
}

/// `hosts.toml` sending `registry`'s pulls to entrepot with `header`, and nowhere else: the
/// fallback `server` is a closed port, so only entrepot can answer.
fn hosts_toml(hosts_dir: &Path, registry: &str, mirror: &str, header: Option<&str>) -> Result<()> {
    let dir = hosts_dir.join(registry);
    std::fs::create_dir_all(&dir)?;
    let header = header
        .map(|h| format!("  header = {{ Authorization = \"{h}\" }}\n"))
        .unwrap_or_default();
    std::fs::write(
        dir.join("hosts.toml"),
        format!(
            "server = \"http://127.0.0.1:{}\"\n\n[host.\"http://{mirror}\"]\n  \
             capabilities = [\"pull\", \"resolve\"]\n{header}",
            common::free_port()
        ),
    )?;
    Ok(())
}

async fn containerd_scenario(env: &mut ClientsEnv) -> Result<()> {
    let work = env.work.path();
    let reference = format!("{}/acme/app:1.0", env.registry.host());
    let containerd = common::clients::Containerd::start(&work.join("ctrd")).await?;

    let anonymous = work.join("hosts-anonymous");
    hosts_toml(&anonymous, &env.registry.host(), &env.entrepot.host(), None)?;
    let refused = containerd
        .ctr(&[
            "content",
            "fetch",
            "--hosts-dir",
            anonymous.to_str().unwrap(),
            &reference,
        ])
        .await;
    let refused = match refused {
        Ok(out) => anyhow::bail!("containerd fetched without credentials:\n{out}"),
        Err(e) => format!("{e:#}"),
    };
    ensure!(
        unauthorized(&refused),
        "containerd failed without saying it was unauthorized:\n{refused}"
    );

    let with_header = work.join("hosts-ci");
    let ci = basic(CI.0, CI.1);
    hosts_toml(
        &with_header,
        &env.registry.host(),
        &env.entrepot.host(),
        Some(&ci),
    )?;
    containerd
        .ctr(&[
            "content",
            "fetch",
            "--hosts-dir",
            with_header.to_str().unwrap(),
            &reference,
        ])
        .await
        .context("ctr content fetch with the Authorization header")?;
    let have = containerd.content_digests().await?;
    for d in env.app.all_digests() {
        ensure!(have.contains(&d), "containerd lacks {d}; it has {have:?}");
    }
    env.entrepot.check_stored(env.app.all_digests()).await?;
    env.only_entrepot_reached_the_registry()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn containerd_pulls_a_protected_image_with_a_hosts_toml_header() {
    require_programs(&["docker-registry", "skopeo", "containerd", "ctr"]);
    run_scenario(ClientsEnv::start(), containerd_scenario).await;
}

// ---------------------------------------------------------------------------------------------
// Client certificates: the common name is a user

#[tokio::test]
async fn a_client_certificate_common_name_listed_in_users_reads_without_a_password() {
    use common::tls::{https_client, Ca, Connections, TlsEntrepot, TlsFiles};

    let work = tempfile::tempdir().unwrap();
    let up = FakeRegistry::start().await;
    let image = up.push_image("acme/app", "1", &[random_bytes(4000, 5).into()]);
    let htpasswd_path = work.path().join("htpasswd");
    std::fs::write(&htpasswd_path, htpasswd(&[ALICE])).unwrap();
    let ca = Ca::new("client-auth test CA");
    let files = TlsFiles::write(work.path(), &ca, &ca.server(1)).unwrap();
    let config = format!(
        "{}[auth]\nhtpasswd = {:?}\nrealm = \"{REALM}\"\n\
         [[access]]\nmatch = \"{UP}/acme/**\"\nusers = [\"node-7\"]\n",
        upstream(UP, &up.url(), true, ""),
        htpasswd_path.display().to_string()
    );
    let entrepot = TlsEntrepot::start(work.path(), "", &files.table(Some(&files.ca())), &config)
        .await
        .unwrap();
    let node7 = https_client(&ca, Some(&ca.client("node-7")), Connections::KeepAlive);
    let node8 = https_client(&ca, Some(&ca.client("node-8")), Connections::KeepAlive);

    // Nothing is public, but a certificate is an identity: the probe answers 200.
    let r = node8.get(entrepot.url("/v2/")).send().await.unwrap();
    assert_eq!(r.status(), 200);

    // node-7 is listed: manifest and blobs, no Authorization at all.
    let r = node7
        .get(entrepot.url("/v2/acme/app/manifests/1"))
        .header("Accept", OCI_MANIFEST)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200, "{}", entrepot.output());
    assert_eq!(r.bytes().await.unwrap(), image.manifest_body);
    for d in [&image.config, &image.layers[0]] {
        common::get_blob(&node7, &entrepot.url(&format!("/v2/acme/app/blobs/{d}")), d)
            .await
            .unwrap();
    }

    // node-8 is authenticated by its certificate, not listed: 403, also on the cached blob.
    let blob = entrepot.url(&format!("/v2/acme/app/blobs/{}", image.layers[0]));
    let r = node8.get(&blob).send().await.unwrap();
    assert_eq!(r.status(), 403);
    assert_eq!(common::error_code(r).await, "DENIED");
    // A right password of a user the rule does not list changes nothing.
    let r = node8
        .get(&blob)
        .header("Authorization", basic(ALICE.0, ALICE.1))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 403);
}
