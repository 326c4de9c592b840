//! Manifests and tags through the real server: TTL, revalidation by HEAD, stale-if-error,
//! Accept negotiation, digest verification, and a restart with every upstream down.

mod common;

use std::time::Duration;

use common::fake_registry::{BlobBehavior, Failure, FakeRegistry};
use common::proxy::Proxy;
use common::{random_bytes, upstream, OCI_INDEX, OCI_MANIFEST};

const DOCKER_MANIFEST: &str = "application/vnd.docker.distribution.manifest.v2+json";

async fn get(url: &str, accept: Option<&str>) -> reqwest::Response {
    let mut r = common::client().get(url);
    if let Some(a) = accept {
        r = r.header("Accept", a);
    }
    r.send().await.unwrap()
}

fn upstream_cfg(up: &FakeRegistry, extra: &str) -> String {
    upstream(
        "fake",
        &up.url(),
        true,
        &format!("tag_ttl = \"5m\"\n{extra}"),
    )
}

#[tokio::test]
async fn tag_within_ttl_is_answered_locally_then_revalidated_by_head() {
    let up = FakeRegistry::start().await;
    let img = up.push_image("team/app", "v1", &[random_bytes(1000, 1).into()]);
    let proxy = Proxy::start(&upstream_cfg(&up, "")).await;
    let url = proxy.url("/v2/team/app/manifests/v1");

    let r = get(&url, Some(OCI_MANIFEST)).await;
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["docker-content-digest"], img.manifest.as_str());
    assert_eq!(r.headers()["content-type"], OCI_MANIFEST);
    assert_eq!(r.bytes().await.unwrap(), img.manifest_body);
    assert_eq!(up.count("GET", "/manifests/"), 1);

    // Within the TTL: GET and HEAD are answered with no upstream request.
    up.reset_counts();
    proxy.clock.advance(Duration::from_secs(299));
    for _ in 0..5 {
        assert_eq!(get(&url, Some(OCI_MANIFEST)).await.status(), 200);
        let h = common::client()
            .head(&url)
            .header("Accept", OCI_MANIFEST)
            .send()
            .await
            .unwrap();
        assert_eq!(h.status(), 200);
    }
    assert!(
        up.requests().is_empty(),
        "{:?}",
        up.requests().iter().map(|r| &r.path).collect::<Vec<_>>()
    );

    // Past the TTL: one HEAD confirms the digest; nothing is re-downloaded.
    proxy.clock.advance(Duration::from_secs(2));
    let r = get(&url, Some(OCI_MANIFEST)).await;
    assert_eq!(r.status(), 200);
    assert_eq!(r.bytes().await.unwrap(), img.manifest_body);
    assert_eq!(up.count("HEAD", "/manifests/v1"), 1);
    assert_eq!(up.count("GET", "/manifests/"), 0);
    // ...and that restarts the TTL.
    assert_eq!(get(&url, Some(OCI_MANIFEST)).await.status(), 200);
    assert_eq!(up.count("HEAD", "/manifests/"), 1);

    // The tag moves upstream: after the TTL the new manifest is fetched and served.
    let img2 = up.push_image("team/app", "v1", &[random_bytes(1000, 2).into()]);
    proxy.clock.advance(Duration::from_secs(301));
    let r = get(&url, Some(OCI_MANIFEST)).await;
    assert_eq!(r.headers()["docker-content-digest"], img2.manifest.as_str());
    assert_eq!(r.bytes().await.unwrap(), img2.manifest_body);
    assert_eq!(up.count("HEAD", "/manifests/v1"), 2);
}

#[tokio::test]
async fn stale_tag_is_served_when_the_upstream_fails() {
    let up = FakeRegistry::start().await;
    let img = up.push_image("team/app", "v1", &[random_bytes(1000, 3).into()]);
    let proxy = Proxy::start(&upstream_cfg(&up, "request_timeout = \"500ms\"")).await;
    let url = proxy.url("/v2/team/app/manifests/v1");
    assert_eq!(get(&url, None).await.status(), 200);

    for failure in [
        Failure::Status(503),
        Failure::Status(500),
        Failure::StatusRetryAfter(429, "30".into()),
        Failure::Hang,
    ] {
        up.set_failure(Some(failure.clone()));
        proxy.clock.advance(Duration::from_secs(301));
        let r = get(&url, None).await;
        assert_eq!(r.status(), 200, "{failure:?}");
        assert_eq!(r.headers()["docker-content-digest"], img.manifest.as_str());
        assert_eq!(r.bytes().await.unwrap(), img.manifest_body);
        let h = common::client().head(&url).send().await.unwrap();
        assert_eq!(h.status(), 200, "{failure:?}");
    }

    // Without a cached mapping, the failure reaches the client as an upstream error.
    up.set_failure(Some(Failure::StatusRetryAfter(429, "30".into())));
    let r = get(&proxy.url("/v2/team/app/manifests/other"), None).await;
    assert_eq!(r.status(), 429);
    assert_eq!(r.headers()["retry-after"], "30");
    up.set_failure(Some(Failure::Status(503)));
    let r = get(&proxy.url("/v2/team/app/manifests/other"), None).await;
    assert_eq!(r.status(), 502);
    let body = common::json(r).await;
    let msg = body["errors"][0]["message"].as_str().unwrap();
    assert!(msg.contains("upstream fake"), "{msg}");
    assert!(!msg.contains("127.0.0.1"), "internal URL leaked: {msg}");
    up.set_failure(Some(Failure::Hang));
    let r = get(&proxy.url("/v2/team/app/manifests/other"), None).await;
    assert_eq!(r.status(), 504);
}

#[tokio::test]
async fn a_cached_tag_is_served_only_to_a_request_that_accepts_its_type() {
    let up = FakeRegistry::start().await;
    up.push_image("team/app", "v1", &[random_bytes(10, 4).into()]);
    let proxy = Proxy::start(&upstream_cfg(&up, "")).await;
    let url = proxy.url("/v2/team/app/manifests/v1");
    let accept_both = format!("{OCI_MANIFEST}, {OCI_INDEX}");
    assert_eq!(get(&url, Some(&accept_both)).await.status(), 200);
    assert_eq!(up.count("GET", "/manifests/"), 1);
    // Accepts it: served locally.
    assert_eq!(get(&url, Some(OCI_MANIFEST)).await.status(), 200);
    assert_eq!(up.count("GET", "/manifests/"), 1);
    // Does not accept it: goes upstream with the client's Accept, unchanged.
    get(&url, Some(DOCKER_MANIFEST)).await;
    assert_eq!(up.count("GET", "/manifests/"), 2);
    let last = up
        .requests()
        .into_iter()
        .rfind(|r| r.method == "GET")
        .unwrap();
    assert_eq!(last.headers["accept"], DOCKER_MANIFEST);
}

#[tokio::test]
async fn manifests_by_digest_are_verified_and_cached_forever() {
    let up = FakeRegistry::start().await;
    let img = up.push_image("team/app", "v1", &[random_bytes(10, 5).into()]);
    let proxy = Proxy::start(&upstream_cfg(&up, "")).await;
    let url = proxy.url(&format!("/v2/team/app/manifests/{}", img.manifest));

    up.set_blob_behavior(&img.manifest, BlobBehavior::Corrupt);
    let r = get(&url, None).await;
    assert_eq!(r.status(), 502);
    assert!(!proxy.blob_path(&img.manifest).exists());

    up.set_blob_behavior(&img.manifest, BlobBehavior::Normal);
    let r = get(&url, None).await;
    assert_eq!(r.status(), 200);
    assert_eq!(r.bytes().await.unwrap(), img.manifest_body);
    up.reset_counts();
    proxy.clock.advance(Duration::from_secs(365 * 24 * 3600));
    let r = get(&url, None).await;
    assert_eq!(r.status(), 200);
    assert!(up.requests().is_empty());
}

#[tokio::test]
async fn head_of_an_unknown_tag_asks_upstream_with_head_only() {
    let up = FakeRegistry::start().await;
    let img = up.push_image("team/app", "v1", &[random_bytes(10, 6).into()]);
    let proxy = Proxy::start(&upstream_cfg(&up, "")).await;
    let h = proxy.head("/v2/team/app/manifests/v1").await;
    assert_eq!(h.status(), 200);
    assert_eq!(h.headers()["docker-content-digest"], img.manifest.as_str());
    assert_eq!(
        h.headers()["content-length"],
        img.manifest_body.len().to_string()
    );
    assert_eq!(up.count("HEAD", "/manifests/v1"), 1);
    assert_eq!(up.count("GET", "/manifests/"), 0);
    // containerd's next step, GET by digest, fetches it once.
    let r = get(
        &proxy.url(&format!("/v2/team/app/manifests/{}", img.manifest)),
        None,
    )
    .await;
    assert_eq!(r.bytes().await.unwrap(), img.manifest_body);
    // And the tag is now answered locally, body included.
    let r = get(&proxy.url("/v2/team/app/manifests/v1"), None).await;
    assert_eq!(r.bytes().await.unwrap(), img.manifest_body);
    assert_eq!(up.count("GET", "/manifests/"), 1);
    assert_eq!(up.count("HEAD", "/manifests/"), 1);
    // Unknown upstream tag → 404 MANIFEST_UNKNOWN.
    let r = get(&proxy.url("/v2/team/app/manifests/nope"), None).await;
    assert_eq!(r.status(), 404);
    let body = common::json(r).await;
    assert_eq!(body["errors"][0]["code"], "MANIFEST_UNKNOWN");
}

#[tokio::test]
async fn restart_with_every_upstream_down_serves_cached_tags_and_blobs() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("store");
    let up = FakeRegistry::start().await;
    let layer = random_bytes(300_000, 7);
    let img = up.push_image("team/app", "v1", &[layer.clone().into()]);
    let cfg = upstream_cfg(&up, "connect_timeout = \"1s\"");
    let proxy = Proxy::start_at(&cfg, &root).await;
    let c = common::client();
    assert_eq!(
        get(&proxy.url("/v2/team/app/manifests/v1"), None)
            .await
            .status(),
        200
    );
    for d in img.layers.iter().chain([&img.config]) {
        let r = c
            .get(proxy.url(&format!("/v2/team/app/blobs/{d}")))
            .send()
            .await
            .unwrap();
        r.bytes().await.unwrap();
        proxy.wait_cached(d).await;
    }
    proxy.stop().await;
    drop(up); // the upstream is gone: connections are refused from now on

    let proxy = Proxy::start_at(&cfg, &root).await;
    // Even past the TTL (so the upstream is tried and fails), the cache answers.
    proxy.clock.advance(Duration::from_secs(3600));
    let r = get(&proxy.url("/v2/team/app/manifests/v1"), None).await;
    assert_eq!(r.status(), 200);
    assert_eq!(r.bytes().await.unwrap(), img.manifest_body);
    let r = c
        .get(proxy.url(&format!("/v2/team/app/blobs/{}", img.layers[0])))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert!(r.bytes().await.unwrap() == layer);
    // What was never cached is an upstream error, not a 404.
    let r = get(&proxy.url("/v2/team/app/manifests/v2"), None).await;
    assert_eq!(r.status(), 502);
}

#[tokio::test]
async fn manifests_over_the_size_cap_are_refused() {
    let up = FakeRegistry::start().await;
    let big = format!(
        "{{\"schemaVersion\":2,\"mediaType\":\"{OCI_MANIFEST}\",\"annotations\":{{\"pad\":\"{}\"}}}}",
        "x".repeat(20_000)
    );
    up.put_manifest("team/app", Some("big"), OCI_MANIFEST, big);
    let small = up.push_image("team/app", "small", &[random_bytes(10, 8).into()]);
    let proxy = Proxy::start_with("max_manifest_size = \"16KiB\"", &upstream_cfg(&up, "")).await;
    let r = get(&proxy.url("/v2/team/app/manifests/big"), None).await;
    assert_eq!(r.status(), 502);
    let body = r.text().await.unwrap();
    assert!(body.contains("larger than 16384 bytes"), "{body}");
    let r = get(&proxy.url("/v2/team/app/manifests/small"), None).await;
    assert_eq!(r.status(), 200);
    assert_eq!(r.bytes().await.unwrap(), small.manifest_body);
}

#[tokio::test]
async fn mirrors_are_tried_in_order_when_the_main_url_fails() {
    let main = FakeRegistry::start().await;
    let mirror = FakeRegistry::start().await;
    let img = mirror.push_image("team/app", "v1", &[random_bytes(5000, 9).into()]);
    main.set_failure(Some(Failure::Status(503)));
    let proxy = Proxy::start(&upstream(
        "fake",
        &main.url(),
        true,
        &format!("mirrors = [\"{}\"]", mirror.url()),
    ))
    .await;
    let r = get(&proxy.url("/v2/team/app/manifests/v1"), None).await;
    assert_eq!(r.status(), 200);
    assert_eq!(r.bytes().await.unwrap(), img.manifest_body);
    let r = proxy
        .get(&format!("/v2/team/app/blobs/{}", img.layers[0]))
        .await;
    assert_eq!(r.status(), 200);
    assert_eq!(main.count("GET", "/manifests/v1"), 1);
    assert_eq!(mirror.count("GET", "/manifests/v1"), 1);
    // The blob's fill too asked the failing URL once (its own plain-HTTP GET), then the mirror.
    assert_eq!(main.count("GET", "/blobs/"), 1);
    assert_eq!(mirror.count("GET", "/blobs/"), 1);
    // Blob GETs ask for the bytes as they are: no compression on the way.
    let blob_get = mirror
        .requests()
        .into_iter()
        .find(|r| r.method == "GET" && r.path.contains("/blobs/"))
        .unwrap();
    assert_eq!(blob_get.headers["accept-encoding"], "identity");
    // A 404 from the main URL is an answer, not a failure: the mirror is not asked.
    main.set_failure(None);
    mirror.reset_counts();
    let r = get(&proxy.url("/v2/team/app/manifests/absent"), None).await;
    assert_eq!(r.status(), 404);
    assert!(mirror.requests().is_empty());
}

/// A blob fill whose main URL takes connections and drops them at once (no answer at all)
/// tries it once, then the mirror: its own plain-HTTP request is not followed by a second try
/// of the same URL through the usual client.
#[tokio::test]
async fn a_blob_fill_asks_a_main_url_that_does_not_answer_once_then_the_mirror() {
    let dropping = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let main = format!("http://{}", dropping.local_addr().unwrap());
    let accepted = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let counter = accepted.clone();
    // Ends with the test's runtime.
    tokio::spawn(async move {
        while let Ok((conn, _)) = dropping.accept().await {
            counter.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            drop(conn);
        }
    });
    let mirror = FakeRegistry::start().await;
    let data = random_bytes(300_000, 11);
    let digest = mirror.add_blob(data.clone());
    let proxy = Proxy::start(&upstream(
        "fake",
        &main,
        true,
        &format!("mirrors = [\"{}\"]", mirror.url()),
    ))
    .await;
    let r = proxy.get(&format!("/v2/team/app/blobs/{digest}")).await;
    assert_eq!(r.status(), 200);
    assert!(r.bytes().await.unwrap() == data);
    assert_eq!(accepted.load(std::sync::atomic::Ordering::SeqCst), 1);
    assert_eq!(mirror.count("GET", "/blobs/"), 1);
}

#[tokio::test]
async fn concurrent_cold_requests_for_one_tag_cost_one_upstream_get() {
    let up = FakeRegistry::start().await;
    let img = up.push_image("team/app", "v1", &[random_bytes(10, 10).into()]);
    let gate = std::sync::Arc::new(tokio::sync::Notify::new());
    up.set_blob_behavior(
        &img.manifest,
        BlobBehavior::Gate {
            release: gate.clone(),
        },
    );
    let proxy = Proxy::start(&upstream_cfg(&up, "")).await;
    let url = proxy.url("/v2/team/app/manifests/v1");
    let mut tasks = Vec::new();
    for _ in 0..16 {
        let url = url.clone();
        tasks.push(tokio::spawn(async move {
            let r = get(&url, Some(OCI_MANIFEST)).await;
            assert_eq!(r.status(), 200);
            r.bytes().await.unwrap()
        }));
    }
    while up.count("GET", "/manifests/") == 0 {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    gate.notify_one();
    for t in tasks {
        assert_eq!(t.await.unwrap(), img.manifest_body);
    }
    assert_eq!(up.count("GET", "/manifests/"), 1);
}
