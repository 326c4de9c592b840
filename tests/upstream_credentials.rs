//! What an upstream's credentials and a client's own credentials may reach, through the real
//! server: a token realm that is not the upstream's own gets no request at all (with or without
//! configured credentials) and the client a 502 naming the upstream; a client's `Authorization`
//! never reaches an upstream, a response or the log; and `allow` / `deny` keep repositories
//! out, upstream and store alike.

mod common;

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::fake_registry::{FakeRegistry, Recorded};
use common::proxy::Proxy;
use common::{random_bytes, upstream, OCI_MANIFEST};

/// The `entrepot` binary with its stderr (the log, at `ENTREPOT_LOG`) in a file, killed when
/// dropped. In-process servers share the test's tracing; this is the log an operator reads.
struct Binary {
    url: String,
    log: PathBuf,
    child: Option<Child>,
    _dir: tempfile::TempDir,
}

impl Binary {
    async fn start(upstreams: &str, log_level: &str) -> Binary {
        let dir = tempfile::tempdir().unwrap();
        let config = dir.path().join("entrepot.toml");
        let log = dir.path().join("entrepot.log");
        std::fs::write(
            &config,
            format!(
                "[server]\nlisten = \"127.0.0.1:0\"\nshutdown_grace = \"2s\"\n\
                 [storage]\nroot = {:?}\n{upstreams}",
                dir.path().join("store").display().to_string()
            ),
        )
        .unwrap();
        let child = Command::new(env!("CARGO_BIN_EXE_entrepot"))
            .args(["serve", "--config"])
            .arg(&config)
            .env("ENTREPOT_LOG", log_level)
            .env("NO_COLOR", "1")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .unwrap();
        let mut b = Binary {
            url: String::new(),
            log,
            child: Some(child),
            _dir: dir,
        };
        let deadline = Instant::now() + Duration::from_secs(20);
        b.url = loop {
            let text = b.log();
            if let Some(addr) = text
                .lines()
                .filter(|l| l.contains("listening"))
                .find_map(|l| l.split("addr=").nth(1))
            {
                break format!("http://{}", addr.split_whitespace().next().unwrap());
            }
            let exited = b.child.as_mut().unwrap().try_wait().unwrap();
            assert!(
                exited.is_none() && Instant::now() < deadline,
                "entrepot did not start ({exited:?}):\n{text}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        };
        b
    }

    fn url(&self, path: &str) -> String {
        format!("{}{path}", self.url)
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Waits (bounded) until the log has a line for which `f` holds, and returns it.
    async fn wait_log_line(&self, f: impl Fn(&str) -> bool) -> String {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Some(l) = self.log().lines().find(|l| f(l)) {
                return l.to_string();
            }
            assert!(
                Instant::now() < deadline,
                "no such log line in:\n{}",
                self.log()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// SIGTERM and wait, so every log line (access lines are written when a body ends) is out.
    async fn stop(mut self) -> String {
        let mut child = self.child.take().unwrap();
        let status = Command::new("kill")
            .args(["-TERM", &child.id().to_string()])
            .status()
            .unwrap();
        assert!(status.success());
        let exit = tokio::task::spawn_blocking(move || child.wait())
            .await
            .unwrap()
            .unwrap();
        assert!(exit.success(), "exit status {exit:?}:\n{}", self.log());
        self.log()
    }
}

impl Drop for Binary {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// Everything a response shows a client: status line aside, its headers and body.
async fn shown(resp: reqwest::Response) -> (u16, String) {
    let status = resp.status().as_u16();
    let mut text = String::new();
    for (name, value) in resp.headers() {
        text.push_str(&format!(
            "{name}: {}\n",
            String::from_utf8_lossy(value.as_bytes())
        ));
    }
    text.push('\n');
    text.push_str(&String::from_utf8_lossy(&resp.bytes().await.unwrap()));
    (status, text)
}

/// A request as the upstream saw it, every header value included.
fn seen(r: &Recorded) -> String {
    let mut text = format!(
        "{} {}?{}\n",
        r.method,
        r.path,
        r.query.as_deref().unwrap_or("")
    );
    for (name, value) in &r.headers {
        text.push_str(&format!(
            "{name}: {}\n",
            String::from_utf8_lossy(value.as_bytes())
        ));
    }
    text
}

// ---- 1. Token realms ----------------------------------------------------------------------

const REALM_UPSTREAM: &str = "private.example";
const PASSWORD: &str = "Upstream-Pa55word-do-not-leak";

/// An upstream on 127.0.0.1 whose bearer challenge names a realm on `localhost`: another host,
/// and plain http. The realm is a fake registry too, so it records whatever reaches it.
async fn upstream_with_foreign_realm() -> (FakeRegistry, FakeRegistry, String, String) {
    let up = FakeRegistry::start().await;
    let img = up.push_image("team/app", "v1", &[random_bytes(1000, 7).into()]);
    let realm = FakeRegistry::start().await;
    let realm_host = format!("http://localhost:{}", realm.addr().port());
    up.set_token_realm(&format!("{realm_host}/token"));
    (up, realm, realm_host, img.layers[0].clone())
}

#[tokio::test]
async fn a_token_realm_on_another_host_gets_no_request_with_or_without_credentials() {
    for creds in [
        None,
        Some(format!("username = \"robot\"\npassword = \"{PASSWORD}\"")),
    ] {
        let (up, realm, realm_host, layer) = upstream_with_foreign_realm().await;
        up.require_bearer(
            creds.as_ref().map(|_| ("robot".into(), PASSWORD.into())),
            300,
        );
        let cfg = upstream(
            REALM_UPSTREAM,
            &up.url(),
            true,
            creds.as_deref().unwrap_or(""),
        );
        let proxy = Binary::start(&cfg, "info").await;
        let c = common::client();
        for path in [
            "/v2/team/app/manifests/v1".to_string(),
            format!("/v2/team/app/blobs/{layer}"),
            "/v2/team/app/tags/list".to_string(),
        ] {
            let (status, text) = shown(c.get(proxy.url(&path)).send().await.unwrap()).await;
            // Not one request to the realm, not even an anonymous one.
            let reached = realm.requests();
            assert!(
                reached.is_empty(),
                "{path}: the realm got {:#?}",
                reached.iter().map(seen).collect::<Vec<_>>()
            );
            assert_eq!(status, 502, "{path}: {text}");
            assert!(
                text.contains(&format!("upstream {REALM_UPSTREAM}")),
                "{path}: {text}"
            );
            for secret in [&realm_host, "localhost", "/token", PASSWORD, "robot"] {
                assert!(!text.contains(secret), "{path} shows {secret:?}: {text}");
            }
        }
        // The upstream was asked (and answered 401), with no credentials of any kind.
        assert!(!up.requests().is_empty());
        for r in up.requests() {
            assert!(!r.headers.contains_key("authorization"), "{}", seen(&r));
        }
        let warning = proxy
            .wait_log_line(|l| l.contains("WARN") && l.contains("token realm"))
            .await;
        assert!(
            warning.contains(&format!("upstream={REALM_UPSTREAM}"))
                && warning.contains(&format!("realm_host={realm_host}")),
            "{warning}"
        );
        let log = proxy.stop().await;
        assert!(!log.contains(PASSWORD), "{log}");
    }
}

/// The control: a realm on the upstream's own host (another port) is used, credentials and all,
/// so the refusal above is the realm check and not the set-up.
#[tokio::test]
async fn a_token_realm_on_the_upstreams_own_host_is_used() {
    let up = FakeRegistry::start().await;
    up.push_image("team/app", "v1", &[random_bytes(1000, 8).into()]);
    let realm = FakeRegistry::start().await;
    up.set_token_realm(&format!("{}/token", realm.url()));
    up.require_bearer(Some(("robot".into(), PASSWORD.into())), 300);
    let proxy = Proxy::start(&upstream(
        REALM_UPSTREAM,
        &up.url(),
        true,
        &format!("username = \"robot\"\npassword = \"{PASSWORD}\""),
    ))
    .await;
    // The realm's tokens mean nothing to this upstream, so the pull is refused: all that matters
    // here is that the realm was asked, with the credentials.
    let r = proxy.get("/v2/team/app/manifests/v1").await;
    assert_eq!(r.status(), 403);
    let asked = realm.requests();
    assert_eq!(asked.len(), 1, "{asked:?}");
    assert_eq!(asked[0].path, "/token");
    let expected = format!(
        "Basic {}",
        common::base64_encode(format!("robot:{PASSWORD}").as_bytes())
    );
    assert_eq!(asked[0].headers["authorization"], expected.as_str());
}

// ---- 2. The client's own Authorization ----------------------------------------------------

#[tokio::test]
async fn a_clients_authorization_reaches_no_upstream_response_or_log() {
    // Distinct per run, so nothing matches it by chance.
    let canary = format!(
        "c4n4ry{}",
        hex::encode(random_bytes(12, std::process::id() as u64))
    );
    let up = FakeRegistry::start().await;
    let img = up.push_image(
        "team/app",
        "v1",
        &[random_bytes(70_000, 9).into(), random_bytes(500, 10).into()],
    );
    // Credentials of our own, so the proxy does send an Authorization upstream: ours.
    up.require_bearer(Some(("robot".into(), PASSWORD.into())), 300);
    let cfg = upstream(
        "fake.example",
        &up.url(),
        true,
        &format!("username = \"robot\"\npassword = \"{PASSWORD}\""),
    );
    // The most verbose level there is: nothing, ours or a library's, may print it.
    let proxy = Binary::start(&cfg, "trace").await;
    let missing = format!("sha256:{}", "0".repeat(64));
    let paths = [
        "/v2/".to_string(),
        "/v2/team/app/manifests/v1".to_string(),
        format!("/v2/team/app/manifests/{}", img.manifest),
        format!("/v2/team/app/blobs/{}", img.config),
        format!("/v2/team/app/blobs/{}", img.layers[0]),
        format!("/v2/fake.example/team/app/blobs/{}", img.layers[1]),
        "/v2/team/app/tags/list?n=5".to_string(),
        format!("/v2/team/app/referrers/{}", img.manifest),
        "/v2/team/app/manifests/v1?ns=fake.example".to_string(),
        // Error paths: unknown to the upstream, unknown upstream, bad name, bad digest.
        "/v2/team/app/manifests/no-such-tag".to_string(),
        format!("/v2/team/app/blobs/{missing}"),
        format!("/v2/team/gone/referrers/{missing}"),
        "/v2/x/manifests/v1?ns=unknown.example".to_string(),
        "/v2/Bad_Name/manifests/v1".to_string(),
        "/v2/team/app/blobs/sha256:short".to_string(),
    ];
    let c = common::client();
    let mut answered = Vec::new();
    for scheme in ["Basic", "Bearer"] {
        let authz = format!("{scheme} {canary}");
        for path in &paths {
            for method in [reqwest::Method::GET, reqwest::Method::HEAD] {
                let resp = c
                    .request(method.clone(), proxy.url(path))
                    .header("Authorization", &authz)
                    .header("Accept", OCI_MANIFEST)
                    .send()
                    .await
                    .unwrap();
                let (status, text) = shown(resp).await;
                assert!(
                    !text.contains(&canary),
                    "{method} {path} echoes it:\n{text}"
                );
                answered.push(format!("{method} {path} {status}"));
            }
        }
        // A method the proxy refuses, with a body.
        let resp = c
            .put(proxy.url("/v2/team/app/manifests/v1"))
            .header("Authorization", &authz)
            .body(format!("{{\"x\":\"{canary}\"}}"))
            .send()
            .await
            .unwrap();
        let (status, text) = shown(resp).await;
        assert_eq!(status, 405);
        assert!(!text.contains(&canary), "PUT echoes it:\n{text}");
    }
    // The set-up really pulled through the upstream, with our token.
    assert!(
        answered
            .iter()
            .any(|a| a.starts_with("GET /v2/team/app/manifests/v1 200")),
        "{answered:#?}"
    );
    assert!(up.count("GET", "/tags/list") > 0 && up.count("GET", "/referrers/") > 0);
    assert!(up.count("GET", "/token") > 0);
    for r in up.requests() {
        let text = seen(&r);
        assert!(!text.contains(&canary), "sent upstream:\n{text}");
        if let Some(a) = r.headers.get("authorization") {
            let a = a.to_str().unwrap();
            assert!(a.starts_with("Bearer ") || r.path == "/token", "{text}");
        }
    }
    let log = proxy.stop().await;
    assert!(
        log.lines().count() > 50,
        "the log is suspiciously short:\n{log}"
    );
    assert!(log.contains("entrepot::access"), "{log}");
    let leaked: Vec<&str> = log.lines().filter(|l| l.contains(&canary)).collect();
    assert!(leaked.is_empty(), "logged:\n{}", leaked.join("\n"));
    assert!(!log.contains(PASSWORD));
}

// ---- 3. allow / deny -----------------------------------------------------------------------

/// Every endpoint of `repo` for a cached manifest and blobs: 404 `NAME_UNKNOWN`.
async fn assert_refused(proxy: &Proxy, prefix: &str, repo: &str, digests: &[&str], query: &str) {
    let c = common::client();
    let mut paths = vec![
        format!("/v2/{prefix}{repo}/manifests/v1{query}"),
        format!("/v2/{prefix}{repo}/tags/list{query}"),
    ];
    for d in digests {
        for kind in ["manifests", "blobs", "referrers"] {
            paths.push(format!("/v2/{prefix}{repo}/{kind}/{d}{query}"));
        }
    }
    for path in paths {
        let r = c.head(proxy.url(&path)).send().await.unwrap();
        assert_eq!(r.status(), 404, "HEAD {path}");
        let r = c.get(proxy.url(&path)).send().await.unwrap();
        assert_eq!(r.status(), 404, "GET {path}");
        assert_eq!(common::error_code(r).await, "NAME_UNKNOWN", "GET {path}");
    }
}

#[tokio::test]
async fn repositories_outside_allow_or_inside_deny_are_unknown_even_when_cached() {
    let up = FakeRegistry::start().await;
    let shared = random_bytes(5000, 11);
    let app = up.push_image("team/app", "v1", &[shared.clone().into()]);
    let secret = up.push_image(
        "team/secret/app",
        "v1",
        &[shared.clone().into(), random_bytes(100, 12).into()],
    );
    let other = up.push_image("other/app", "v1", &[shared.into()]);
    let proxy = Proxy::start(&upstream(
        "up.example",
        &up.url(),
        true,
        "allow = [\"team/**\"]\ndeny = [\"team/secret/**\"]",
    ))
    .await;
    // Allowed: pulled and cached.
    proxy.pull_image("team/app", "v1").await.unwrap();
    let r = proxy.get("/v2/team/app/tags/list").await;
    assert_eq!(r.status(), 200);
    proxy.wait_cached(&app.layers[0]).await;

    up.reset_counts();
    // The same blob (cached, and in each repository upstream) and the cached manifest, asked
    // for under a denied and under a not-allowed repository, by every route.
    let cached = [
        app.manifest.as_str(),
        app.config.as_str(),
        app.layers[0].as_str(),
    ];
    for repo in ["team/secret/app", "other/app"] {
        assert_refused(&proxy, "", repo, &cached, "").await;
        assert_refused(&proxy, "up.example/", repo, &cached, "").await;
        assert_refused(&proxy, "", repo, &cached, "?ns=up.example").await;
    }
    assert_refused(
        &proxy,
        "",
        "team/secret/app",
        &[secret.manifest.as_str()],
        "",
    )
    .await;
    assert_refused(&proxy, "", "other/app", &[other.manifest.as_str()], "").await;
    assert!(up.requests().is_empty(), "{:#?}", up.requests());

    // The allowed repository still works from the store, and deeper names under it upstream.
    proxy.pull_image("team/app", "v1").await.unwrap();
    let deep = up.push_image("team/a/b", "v1", &[random_bytes(10, 13).into()]);
    proxy.pull_image("team/a/b", "v1").await.unwrap();
    assert!(up.count("GET", &deep.manifest) + up.count("GET", "/team/a/b/manifests/v1") > 0);
}

#[tokio::test]
async fn allow_sees_the_name_after_library_is_added() {
    let up = FakeRegistry::start().await;
    up.push_image("library/alpine", "v1", &[random_bytes(10, 14).into()]);
    up.push_image("someone/app", "v1", &[random_bytes(10, 15).into()]);
    up.push_image("library/a/b", "v1", &[random_bytes(10, 16).into()]);
    let proxy = Proxy::start(&upstream(
        "docker.example",
        &up.url(),
        true,
        "library_prefix = true\nallow = [\"library/*\"]",
    ))
    .await;
    proxy.pull_image("alpine", "v1").await.unwrap();
    proxy.pull_image("library/alpine", "v1").await.unwrap();
    proxy
        .pull_image("docker.example/alpine", "v1")
        .await
        .unwrap();
    up.reset_counts();
    for name in ["someone/app", "library/a/b", "docker.example/someone/app"] {
        let r = proxy.get(&format!("/v2/{name}/manifests/v1")).await;
        assert_eq!(r.status(), 404, "{name}");
        assert_eq!(common::error_code(r).await, "NAME_UNKNOWN", "{name}");
    }
    assert!(up.requests().is_empty(), "{:#?}", up.requests());
}
