//! Self-test of the fake upstream registry, so proxy tests can trust what it does on the wire.

mod common;

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use common::fake_registry::{BlobBehavior, Failure, FakeRegistry};
use common::{base64_encode, error_code, json, sha256_digest, OCI_INDEX, OCI_MANIFEST};
use futures_util::StreamExt;
use tokio::sync::Notify;
use tokio::time::timeout;

fn pattern(len: usize) -> Bytes {
    Bytes::from((0..len).map(|i| (i % 251) as u8).collect::<Vec<u8>>())
}

fn header<'r>(resp: &'r reqwest::Response, name: &str) -> &'r str {
    resp.headers()
        .get(name)
        .unwrap_or_else(|| panic!("missing header {name}"))
        .to_str()
        .unwrap()
}

/// `key="value"` out of a `WWW-Authenticate` challenge.
fn param(challenge: &str, key: &str) -> Option<String> {
    let start = challenge.find(&format!("{key}=\""))? + key.len() + 2;
    let len = challenge[start..].find('"')?;
    Some(challenge[start..start + len].to_string())
}

#[test]
fn base64_matches_rfc4648_vectors() {
    assert_eq!(base64_encode(b""), "");
    assert_eq!(base64_encode(b"f"), "Zg==");
    assert_eq!(base64_encode(b"fo"), "Zm8=");
    assert_eq!(base64_encode(b"foo"), "Zm9v");
    assert_eq!(base64_encode(b"foobar"), "Zm9vYmFy");
    assert_eq!(base64_encode(b"user:pass"), "dXNlcjpwYXNz");
}

#[tokio::test]
async fn serves_pull_api() {
    let reg = FakeRegistry::start().await;
    let c = common::client();
    let base = reg.url();

    let resp = c.get(format!("{base}/v2/")).send().await.unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(
        header(&resp, "docker-distribution-api-version"),
        "registry/2.0"
    );
    assert_eq!(resp.text().await.unwrap(), "{}");

    let data = pattern(200_000);
    let digest = reg.add_blob(data.clone());
    assert_eq!(digest, sha256_digest(&data));

    // Blobs are global: any repository name serves them, slashes included.
    let url = format!("{base}/v2/library/deep/name/blobs/{digest}");
    let resp = c.get(&url).send().await.unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(header(&resp, "content-type"), "application/octet-stream");
    assert_eq!(header(&resp, "content-length"), "200000");
    assert_eq!(header(&resp, "docker-content-digest"), digest);
    assert_eq!(resp.bytes().await.unwrap(), data);

    let resp = c.head(&url).send().await.unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(header(&resp, "content-length"), "200000");
    assert_eq!(header(&resp, "docker-content-digest"), digest);
    assert!(resp.bytes().await.unwrap().is_empty());

    let resp = c
        .get(&url)
        .header("range", "bytes=10-19")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 206);
    assert_eq!(header(&resp, "content-range"), "bytes 10-19/200000");
    assert_eq!(resp.bytes().await.unwrap(), data.slice(10..20));
    let resp = c
        .get(&url)
        .header("range", "bytes=199990-")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 206);
    assert_eq!(header(&resp, "content-range"), "bytes 199990-199999/200000");
    assert_eq!(resp.bytes().await.unwrap(), data.slice(199_990..));

    let missing = sha256_digest(b"nope");
    let resp = c
        .get(format!("{base}/v2/a/blobs/{missing}"))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 404);
    assert_eq!(error_code(resp).await, "BLOB_UNKNOWN");

    // Manifests, by tag and by digest, per repository.
    let image = reg.push_image("team/app", "v1", &[pattern(1000), pattern(2000)]);
    assert_eq!(image.layers.len(), 2);
    for reference in ["v1", image.manifest.as_str()] {
        let resp = c
            .get(format!("{base}/v2/team/app/manifests/{reference}"))
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 200);
        assert_eq!(header(&resp, "content-type"), OCI_MANIFEST);
        assert_eq!(header(&resp, "docker-content-digest"), image.manifest);
        assert_eq!(
            header(&resp, "content-length"),
            image.manifest_body.len().to_string()
        );
        assert_eq!(resp.bytes().await.unwrap(), image.manifest_body);
    }
    let resp = c
        .head(format!("{base}/v2/team/app/manifests/v1"))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(header(&resp, "docker-content-digest"), image.manifest);
    let resp = c
        .get(format!("{base}/v2/other/manifests/v1"))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 404);
    assert_eq!(error_code(resp).await, "MANIFEST_UNKNOWN");

    let index = r#"{"schemaVersion":2,"manifests":[]}"#;
    let d = reg.put_manifest("team/app", None, OCI_INDEX, index);
    reg.set_tag("team/app", "multi", &d);
    let resp = c
        .get(format!("{base}/v2/team/app/manifests/multi"))
        .send()
        .await
        .unwrap();
    assert_eq!(header(&resp, "content-type"), OCI_INDEX);
    reg.remove_tag("team/app", "multi");
    let resp = c
        .get(format!("{base}/v2/team/app/manifests/multi"))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 404);

    let resp = c
        .get(format!("{base}/v2/team/app/referrers/{}", image.manifest))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(header(&resp, "content-type"), OCI_INDEX);
    let v = json(resp).await;
    assert_eq!(v["manifests"], serde_json::json!([]));

    // Every request above was recorded, in order.
    let reqs = reg.requests();
    assert_eq!(reqs[0].path, "/v2/");
    assert_eq!(reqs[3].query.as_deref(), None);
    assert_eq!(
        reqs[3].headers.get("range").unwrap().to_str().unwrap(),
        "bytes=10-19"
    );
    assert_eq!(reg.count("HEAD", "/blobs/"), 1);
    assert_eq!(reg.count("get", "/blobs/"), 4);
    reg.reset_counts();
    assert!(reg.requests().is_empty());
}

#[tokio::test]
async fn tags_list_paginates() {
    let reg = FakeRegistry::start().await;
    let c = common::client();
    let d = reg.put_manifest("a/b", Some("c"), OCI_MANIFEST, "{}");
    for t in ["a", "e", "b", "d"] {
        reg.set_tag("a/b", t, &d);
    }
    let resp = c
        .get(format!("{}/v2/a/b/tags/list", reg.url()))
        .send()
        .await
        .unwrap();
    assert!(resp.headers().get("link").is_none());
    let v = json(resp).await;
    assert_eq!(v["name"], "a/b");
    assert_eq!(v["tags"], serde_json::json!(["a", "b", "c", "d", "e"]));

    let mut next = Some("/v2/a/b/tags/list?n=2".to_string());
    let mut pages = Vec::new();
    while let Some(path) = next.take() {
        let resp = c.get(format!("{}{path}", reg.url())).send().await.unwrap();
        next = resp.headers().get("link").map(|l| {
            let l = l.to_str().unwrap();
            assert!(l.ends_with(r#">; rel="next""#), "{l}");
            l[1..l.find('>').unwrap()].to_string()
        });
        let v = json(resp).await;
        pages.push(v["tags"].clone());
    }
    assert_eq!(
        pages,
        [
            serde_json::json!(["a", "b"]),
            serde_json::json!(["c", "d"]),
            serde_json::json!(["e"])
        ]
    );
    assert_eq!(
        reg.requests()[2].query.as_deref(),
        Some("last=b&n=2"),
        "Link header format"
    );

    let resp = c
        .get(format!("{}/v2/nope/tags/list", reg.url()))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 404);
    assert_eq!(error_code(resp).await, "NAME_UNKNOWN");
}

#[tokio::test]
async fn bearer_auth_flow() {
    let reg = FakeRegistry::start().await;
    let c = common::client();
    let digest = reg.add_blob("hello");
    let url = format!("{}/v2/lib/x/blobs/{digest}", reg.url());
    reg.require_bearer(None, 300);

    let resp = c.get(format!("{}/v2/", reg.url())).send().await.unwrap();
    assert_eq!(resp.status(), 401);
    let challenge = header(&resp, "www-authenticate").to_string();
    assert!(challenge.starts_with("Bearer "), "{challenge}");
    assert_eq!(param(&challenge, "scope"), None);

    let resp = c.get(&url).send().await.unwrap();
    assert_eq!(resp.status(), 401);
    let challenge = header(&resp, "www-authenticate").to_string();
    let realm = param(&challenge, "realm").unwrap();
    assert_eq!(realm, format!("{}/token", reg.url()));
    assert_eq!(param(&challenge, "service").unwrap(), "fake-registry");
    assert_eq!(param(&challenge, "scope").unwrap(), "repository:lib/x:pull");

    let tok = json(
        c.get(format!(
            "{realm}?service=fake-registry&scope=repository%3Alib%2Fx%3Apull"
        ))
        .send()
        .await
        .unwrap(),
    )
    .await;
    let token = tok["token"].as_str().unwrap();
    assert_eq!(tok["access_token"], tok["token"]);
    assert_eq!(tok["expires_in"], 300);
    let issued = tok["issued_at"].as_str().unwrap();
    assert!(
        issued.len() == 20 && issued.ends_with('Z') && issued > "2024",
        "{issued}"
    );

    let resp = c.get(&url).bearer_auth(token).send().await.unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.text().await.unwrap(), "hello");
    let resp = c.get(&url).bearer_auth("forged").send().await.unwrap();
    assert_eq!(resp.status(), 401);
    assert_eq!(reg.count("GET", "/token"), 1);
    assert_eq!(
        reg.requests()[2].query.as_deref(),
        Some("service=fake-registry&scope=repository%3Alib%2Fx%3Apull")
    );

    // An expired token is refused again.
    reg.require_bearer(None, 0);
    let tok = json(c.get(&realm).send().await.unwrap()).await;
    let resp = c
        .get(&url)
        .bearer_auth(tok["token"].as_str().unwrap())
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 401);

    // With credentials configured, the token endpoint wants them.
    reg.require_bearer(Some(("alice".into(), "s3cret".into())), 60);
    assert_eq!(c.get(&realm).send().await.unwrap().status(), 401);
    let resp = c
        .get(&realm)
        .basic_auth("alice", Some("wrong"))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 401);
    let tok = json(
        c.get(&realm)
            .basic_auth("alice", Some("s3cret"))
            .send()
            .await
            .unwrap(),
    )
    .await;
    let resp = c
        .get(&url)
        .bearer_auth(tok["token"].as_str().unwrap())
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);

    reg.revoke_tokens();
    let resp = c
        .get(&url)
        .bearer_auth(tok["token"].as_str().unwrap())
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 401);
    reg.allow_anonymous();
    assert_eq!(c.get(&url).send().await.unwrap().status(), 200);
}

#[tokio::test]
async fn basic_auth() {
    let reg = FakeRegistry::start().await;
    let c = common::client();
    reg.require_basic("bob", "pw");
    let url = format!("{}/v2/", reg.url());
    let resp = c.get(&url).send().await.unwrap();
    assert_eq!(resp.status(), 401);
    assert_eq!(header(&resp, "www-authenticate"), r#"Basic realm="fake""#);
    let resp = c
        .get(&url)
        .basic_auth("bob", Some("no"))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 401);
    let resp = c
        .get(&url)
        .basic_auth("bob", Some("pw"))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
}

#[tokio::test]
async fn stall_holds_the_rest_until_released() {
    let reg = FakeRegistry::start().await;
    let c = common::client();
    let data = pattern(300_000);
    let digest = reg.add_blob(data.clone());
    let release = Arc::new(Notify::new());
    reg.set_blob_behavior(
        &digest,
        BlobBehavior::Stall {
            after: 100_000,
            release: release.clone(),
        },
    );
    let resp = c
        .get(format!("{}/v2/r/blobs/{digest}", reg.url()))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let mut body = resp.bytes_stream();
    let mut got = Vec::new();
    while got.len() < 100_000 {
        got.extend_from_slice(&body.next().await.unwrap().unwrap());
    }
    assert_eq!(got.len(), 100_000, "exactly `after` bytes before the stall");
    assert!(timeout(Duration::from_millis(200), body.next())
        .await
        .is_err());
    release.notify_one();
    while let Some(chunk) = body.next().await {
        got.extend_from_slice(&chunk.unwrap());
    }
    assert_eq!(got, data);

    // A release issued before the request arrives is stored, not lost.
    let release = Arc::new(Notify::new());
    reg.set_blob_behavior(
        &digest,
        BlobBehavior::Stall {
            after: 0,
            release: release.clone(),
        },
    );
    release.notify_one();
    let resp = c
        .get(format!("{}/v2/r/blobs/{digest}", reg.url()))
        .send()
        .await
        .unwrap();
    let body = timeout(Duration::from_secs(5), resp.bytes()).await.unwrap();
    assert_eq!(body.unwrap(), data);
}

#[tokio::test]
async fn gate_holds_headers_until_released() {
    let reg = FakeRegistry::start().await;
    let c = common::client();
    let digest = reg.add_blob("gated");
    let release = Arc::new(Notify::new());
    reg.set_blob_behavior(
        &digest,
        BlobBehavior::Gate {
            release: release.clone(),
        },
    );
    let req = c.get(format!("{}/v2/r/blobs/{digest}", reg.url())).send();
    let pending = tokio::spawn(req);
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(!pending.is_finished());
    assert_eq!(reg.count("GET", &digest), 1, "recorded before the gate");
    release.notify_one();
    let resp = pending.await.unwrap().unwrap();
    assert_eq!(resp.text().await.unwrap(), "gated");
    // HEAD ignores behaviours.
    let resp = c
        .head(format!("{}/v2/r/blobs/{digest}", reg.url()))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
}

#[tokio::test]
async fn truncate_is_a_body_error_and_corrupt_keeps_length() {
    let reg = FakeRegistry::start().await;
    let c = common::client();
    let data = pattern(200_000);
    let digest = reg.add_blob(data.clone());
    let url = format!("{}/v2/r/blobs/{digest}", reg.url());

    reg.set_blob_behavior(&digest, BlobBehavior::Truncate { after: 150_000 });
    let resp = c.get(&url).send().await.unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(header(&resp, "content-length"), "200000");
    let mut body = resp.bytes_stream();
    let mut got = 0;
    let mut failed = false;
    while let Some(chunk) = body.next().await {
        match chunk {
            Ok(c) => got += c.len(),
            Err(_) => {
                failed = true;
                break;
            }
        }
    }
    assert!(failed, "truncation must surface as an error");
    assert_eq!(got, 150_000);
    assert!(c.get(&url).send().await.unwrap().bytes().await.is_err());

    // The headers and exactly `after` bytes always get out first, whatever the sizes.
    for (len, after) in [(10usize, 0usize), (3 << 20, (5 << 20) / 2)] {
        let data = pattern(len);
        let digest = reg.add_blob(data.clone());
        reg.set_blob_behavior(&digest, BlobBehavior::Truncate { after });
        let resp = c
            .get(format!("{}/v2/r/blobs/{digest}", reg.url()))
            .send()
            .await
            .unwrap();
        assert_eq!(header(&resp, "content-length"), len.to_string());
        let mut body = resp.bytes_stream();
        let mut got = Vec::new();
        let err = loop {
            match body.next().await {
                Some(Ok(c)) => got.extend_from_slice(&c),
                Some(Err(e)) => break e,
                None => panic!("truncated body ended cleanly"),
            }
        };
        assert_eq!(got, data.slice(..after), "{err}");
    }

    reg.set_blob_behavior(&digest, BlobBehavior::Corrupt);
    let body = c.get(&url).send().await.unwrap().bytes().await.unwrap();
    assert_eq!(body.len(), data.len());
    assert_ne!(sha256_digest(&body), digest);

    reg.set_blob_behavior(&digest, BlobBehavior::Normal);
    let body = c.get(&url).send().await.unwrap().bytes().await.unwrap();
    assert_eq!(sha256_digest(&body), digest);
}

#[tokio::test]
async fn slow_trickles() {
    let reg = FakeRegistry::start().await;
    let c = common::client();
    let data = pattern(5_000);
    let digest = reg.add_blob(data.clone());
    reg.set_blob_behavior(
        &digest,
        BlobBehavior::Slow {
            chunk: 1_000,
            delay: Duration::from_millis(30),
        },
    );
    let started = std::time::Instant::now();
    let body = c
        .get(format!("{}/v2/r/blobs/{digest}", reg.url()))
        .send()
        .await
        .unwrap()
        .bytes()
        .await
        .unwrap();
    assert!(started.elapsed() >= Duration::from_millis(120));
    assert_eq!(body, data);
}

#[tokio::test]
async fn redirect_goes_to_the_other_registry_without_auth() {
    let origin = FakeRegistry::start().await;
    let cdn = FakeRegistry::start().await;
    origin.redirect_blobs_to(&cdn);
    origin.require_bearer(None, 300);
    let data = pattern(100_000);
    let digest = origin.add_blob(data.clone());
    let url = format!("{}/v2/lib/x/blobs/{digest}", origin.url());
    let c = common::client();
    let tok = json(
        c.get(format!("{}/token", origin.url()))
            .send()
            .await
            .unwrap(),
    )
    .await;
    let token = tok["token"].as_str().unwrap();

    let resp = common::client_no_redirect()
        .get(&url)
        .bearer_auth(token)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 307);
    assert_eq!(
        header(&resp, "location"),
        format!("{}/direct/{digest}", cdn.url())
    );

    // reqwest drops Authorization when the redirect changes origin.
    let resp = c.get(&url).bearer_auth(token).send().await.unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(header(&resp, "docker-content-digest"), digest);
    assert_eq!(resp.bytes().await.unwrap(), data);
    let direct = cdn.requests();
    assert_eq!(direct.len(), 1);
    assert_eq!(direct[0].path, format!("/direct/{digest}"));
    assert!(direct[0].headers.get("authorization").is_none());

    // Behaviours set on the origin apply at the target, and HEAD is not redirected.
    origin.set_blob_behavior(&digest, BlobBehavior::Corrupt);
    let body = c
        .get(&url)
        .bearer_auth(token)
        .send()
        .await
        .unwrap()
        .bytes()
        .await
        .unwrap();
    assert_ne!(sha256_digest(&body), digest);
    let resp = c.head(&url).bearer_auth(token).send().await.unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(cdn.count("GET", "/direct/"), 2);
    assert_eq!(cdn.count("HEAD", "/direct/"), 0);
}

#[tokio::test]
async fn failures_apply_to_everything_but_the_token_endpoint() {
    let reg = FakeRegistry::start().await;
    let c = common::client();
    let url = format!("{}/v2/", reg.url());

    reg.set_failure(Some(Failure::Status(503)));
    let resp = c.get(&url).send().await.unwrap();
    assert_eq!(resp.status(), 503);
    assert_eq!(error_code(resp).await, "UNAVAILABLE");
    let resp = c.get(format!("{}/token", reg.url())).send().await.unwrap();
    assert_eq!(resp.status(), 200);

    reg.set_failure(Some(Failure::StatusRetryAfter(429, "7".into())));
    let resp = c.get(&url).send().await.unwrap();
    assert_eq!(resp.status(), 429);
    assert_eq!(header(&resp, "retry-after"), "7");

    reg.set_failure(Some(Failure::Hang));
    let hung = tokio::spawn(c.get(&url).send());
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(!hung.is_finished());
    // A hung handler blocks neither other connections nor recording.
    reg.set_failure(None);
    let resp = timeout(Duration::from_secs(5), c.get(&url).send())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(reg.count("GET", "/v2/"), 4);

    // Dropping the registry ends the hung handler: the client sees the connection close.
    drop(reg);
    let res = timeout(Duration::from_secs(5), hung)
        .await
        .unwrap()
        .unwrap();
    assert!(res.is_err());
}

#[tokio::test]
async fn dropping_ends_stalled_bodies() {
    let reg = FakeRegistry::start().await;
    let digest = reg.add_blob(pattern(10_000));
    reg.set_blob_behavior(
        &digest,
        BlobBehavior::Stall {
            after: 10,
            release: Arc::new(Notify::new()),
        },
    );
    let resp = common::client()
        .get(format!("{}/v2/r/blobs/{digest}", reg.url()))
        .send()
        .await
        .unwrap();
    drop(reg);
    let res = timeout(Duration::from_secs(5), resp.bytes()).await.unwrap();
    assert!(res.is_err());
}
