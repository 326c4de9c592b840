//! `[server] offline = true`: no upstream is ever contacted; tags are answered from the store
//! whatever their age; what is not stored is a 404 saying the proxy is offline.

mod common;

use std::time::Duration;

use bytes::Bytes;
use common::fake_registry::FakeRegistry;
use common::proxy::Proxy;
use common::{random_bytes, upstream};

#[tokio::test]
async fn offline_serves_the_store_and_never_calls_upstream() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("store");
    let up = FakeRegistry::start().await;
    let img = up.push_image("team/app", "v1", &[Bytes::from(random_bytes(100_000, 1))]);
    let online = Proxy::start_at(
        &upstream("fake", &up.url(), true, "tag_ttl = \"1m\""),
        &root,
    )
    .await;
    assert_eq!(online.get("/v2/team/app/manifests/v1").await.status(), 200);
    let r = online
        .get(&format!("/v2/team/app/blobs/{}", img.layers[0]))
        .await;
    r.bytes().await.unwrap();
    online.wait_idle().await;
    online.stop().await;

    // The upstream is still up: offline must not use it anyway.
    up.reset_counts();
    let offline = Proxy::start_with_server(
        "offline = true",
        &upstream("fake", &up.url(), true, "tag_ttl = \"1m\""),
        &root,
    )
    .await;
    offline.clock.advance(Duration::from_secs(3600)); // far past the TTL
    let r = offline.get("/v2/team/app/manifests/v1").await;
    assert_eq!(r.status(), 200);
    assert_eq!(r.bytes().await.unwrap(), img.manifest_body);
    let r = offline.head("/v2/team/app/manifests/v1").await;
    assert_eq!(r.status(), 200);
    let r = offline
        .get(&format!("/v2/team/app/blobs/{}", img.layers[0]))
        .await;
    assert_eq!(r.status(), 200);
    assert_eq!(
        common::sha256_digest(&r.bytes().await.unwrap()),
        img.layers[0]
    );

    // Not in the store: 404 saying why, for manifests, blobs (GET and HEAD) and tag lists.
    let missing = format!("sha256:{}", "0".repeat(64));
    for (path, code) in [
        ("/v2/team/app/manifests/v2".to_string(), "MANIFEST_UNKNOWN"),
        (format!("/v2/team/app/blobs/{missing}"), "BLOB_UNKNOWN"),
        ("/v2/team/app/tags/list".to_string(), "NAME_UNKNOWN"),
    ] {
        let r = offline.get(&path).await;
        assert_eq!(r.status(), 404, "{path}");
        let body = r.text().await.unwrap();
        assert!(
            body.contains(code) && body.contains("offline"),
            "{path}: {body}"
        );
        assert_eq!(offline.head(&path).await.status(), 404, "{path}");
    }
    assert!(
        up.requests().is_empty(),
        "offline contacted the upstream: {:?}",
        up.requests().iter().map(|r| &r.path).collect::<Vec<_>>()
    );
}
