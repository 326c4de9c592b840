//! Upstream authentication through the real server: anonymous and credentialed bearer tokens,
//! token caching and expiry, basic auth, wrong credentials, and redirects that must not carry
//! `Authorization` to another host. The client's own `Authorization` never goes upstream.

mod common;

use std::time::Duration;

use common::fake_registry::FakeRegistry;
use common::proxy::Proxy;
use common::{random_bytes, upstream};

async fn pull(proxy: &Proxy, repo: &str, tag: &str) -> reqwest::StatusCode {
    let c = common::client();
    let r = c
        .get(proxy.url(&format!("/v2/{repo}/manifests/{tag}")))
        .send()
        .await
        .unwrap();
    let status = r.status();
    if status != 200 {
        return status;
    }
    let m = common::json(r).await;
    for l in m["layers"].as_array().unwrap() {
        let d = l["digest"].as_str().unwrap();
        common::get_blob(&c, &proxy.url(&format!("/v2/{repo}/blobs/{d}")), d)
            .await
            .unwrap();
    }
    status
}

#[tokio::test]
async fn anonymous_bearer_tokens_are_fetched_once_and_cached() {
    let up = FakeRegistry::start().await;
    up.push_image(
        "team/app",
        "v1",
        &[random_bytes(100, 1).into(), random_bytes(100, 2).into()],
    );
    up.require_bearer(None, 300);
    let proxy = Proxy::start(&upstream("fake", &up.url(), true, "")).await;
    assert_eq!(pull(&proxy, "team/app", "v1").await, 200);
    assert_eq!(up.count("GET", "/token"), 1);
    let tok = up
        .requests()
        .into_iter()
        .find(|r| r.path == "/token")
        .unwrap();
    let q = tok.query.unwrap();
    assert!(
        q.contains("scope=repository%3Ateam%2Fapp%3Apull")
            || q.contains("scope=repository:team/app:pull"),
        "{q}"
    );
    assert!(q.contains("service=fake-registry"), "{q}");
    assert!(!tok.headers.contains_key("authorization"));

    // Expiry: past expires_in the token is fetched again.
    proxy.clock.advance(Duration::from_secs(400));
    assert_eq!(pull(&proxy, "team/app", "v1").await, 200);
    assert_eq!(up.count("GET", "/token"), 2);

    // A token the upstream stops honouring: one 401, one new token, success.
    up.revoke_tokens();
    proxy.clock.advance(Duration::from_secs(301)); // tag TTL over: the HEAD must authenticate
    assert_eq!(pull(&proxy, "team/app", "v1").await, 200);
    assert_eq!(up.count("GET", "/token"), 3);
}

#[tokio::test]
async fn credentials_go_to_the_token_endpoint() {
    let up = FakeRegistry::start().await;
    up.push_image("private/app", "v1", &[random_bytes(100, 3).into()]);
    up.require_bearer(Some(("robot".into(), "s3cret".into())), 300);
    let good = Proxy::start(&upstream(
        "fake",
        &up.url(),
        true,
        "username = \"robot\"\npassword = \"s3cret\"",
    ))
    .await;
    assert_eq!(pull(&good, "private/app", "v1").await, 200);
    let tok = up
        .requests()
        .into_iter()
        .find(|r| r.path == "/token")
        .unwrap();
    assert!(tok.headers["authorization"]
        .to_str()
        .unwrap()
        .starts_with("Basic "));

    // Wrong credentials: a clear, prompt error naming the upstream — not a hang, not a 404.
    let bad = Proxy::start(&upstream(
        "fake",
        &up.url(),
        true,
        "username = \"robot\"\npassword = \"wrong\"",
    ))
    .await;
    let r = bad.get("/v2/private/app/manifests/v1").await;
    assert_eq!(r.status(), 403);
    let body = r.text().await.unwrap();
    assert!(
        body.contains("DENIED") && body.contains("upstream fake"),
        "{body}"
    );
    assert!(
        !body.contains("wrong") && !body.contains("127.0.0.1"),
        "{body}"
    );
}

#[tokio::test]
async fn basic_auth_upstream() {
    let up = FakeRegistry::start().await;
    up.push_image("team/app", "v1", &[random_bytes(100, 4).into()]);
    up.require_basic("alice", "pw");
    let proxy = Proxy::start(&upstream(
        "fake",
        &up.url(),
        true,
        "username = \"alice\"\npassword = \"pw\"",
    ))
    .await;
    assert_eq!(pull(&proxy, "team/app", "v1").await, 200);
    let anon = Proxy::start(&upstream("fake", &up.url(), true, "")).await;
    assert_eq!(pull(&anon, "team/app", "v1").await, 403);
}

#[tokio::test]
async fn authorization_never_follows_a_redirect_to_another_host() {
    let origin = FakeRegistry::start().await;
    let cdn = FakeRegistry::start().await;
    let layer = random_bytes(200_000, 5);
    let img = origin.push_image("team/app", "v1", &[layer.clone().into()]);
    origin.require_bearer(None, 300);
    origin.redirect_blobs_to(&cdn);
    let proxy = Proxy::start(&upstream("fake", &origin.url(), true, "")).await;
    let r = common::client()
        .get(proxy.url(&format!("/v2/team/app/blobs/{}", img.layers[0])))
        .header("Authorization", "Bearer client-secret")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert!(r.bytes().await.unwrap() == layer);
    let at_cdn = cdn.requests();
    assert_eq!(at_cdn.len(), 1);
    assert!(!at_cdn[0].headers.contains_key("authorization"));
    // The origin got our token, never the client's.
    let blob_get = origin
        .requests()
        .into_iter()
        .filter(|r| r.path.contains("/blobs/"))
        .last()
        .unwrap();
    assert!(blob_get.headers["authorization"]
        .to_str()
        .unwrap()
        .starts_with("Bearer "));
    for r in origin.requests() {
        if let Some(a) = r.headers.get("authorization") {
            assert!(!a.to_str().unwrap().contains("client-secret"));
        }
    }
}
