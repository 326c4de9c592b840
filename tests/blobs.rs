//! Blob behaviour through the real server: detached fills, one upstream GET for many clients,
//! verification, ranges, HEAD, and the store-unavailable bypass.

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::fake_registry::{BlobBehavior, FakeRegistry};
use common::proxy::Proxy;
use common::{random_bytes, sha256_digest, upstream};
use futures_util::StreamExt;
use tokio::sync::{Barrier, Notify};

const MIB: usize = 1 << 20;

async fn setup() -> (FakeRegistry, Proxy) {
    let up = FakeRegistry::start().await;
    let proxy = Proxy::start(&upstream("fake", &up.url(), true, "")).await;
    (up, proxy)
}

/// `GET url` with `Range: range`.
async fn get_range(c: &reqwest::Client, url: &str, range: &str) -> reqwest::Response {
    c.get(url).header("Range", range).send().await.unwrap()
}

/// Reads a whole body, or reports that the transfer broke.
async fn read_body(resp: reqwest::Response) -> Result<Vec<u8>, String> {
    let mut out = Vec::new();
    let mut s = resp.bytes_stream();
    while let Some(chunk) = s.next().await {
        out.extend_from_slice(&chunk.map_err(|e| e.to_string())?);
    }
    Ok(out)
}

#[tokio::test]
async fn client_disconnect_after_1mib_leaves_the_blob_cached_and_verified() {
    let (up, proxy) = setup().await;
    let data = random_bytes(8 * MIB, 1);
    let digest = up.add_blob(data.clone());
    // A slow upstream, so the fill is still running when the client hangs up.
    up.set_blob_behavior(
        &digest,
        BlobBehavior::Slow {
            chunk: 256 * 1024,
            delay: Duration::from_millis(15),
        },
    );
    let resp = proxy.get(&format!("/v2/team/app/blobs/{digest}")).await;
    assert_eq!(resp.status(), 200);
    let mut got = 0;
    let mut s = resp.bytes_stream();
    while got < MIB {
        got += s.next().await.unwrap().unwrap().len();
    }
    drop(s); // the client disconnects mid-transfer
    let stored = proxy.wait_cached(&digest).await;
    assert_eq!(stored.len(), data.len());
    assert_eq!(sha256_digest(&stored), digest);
    assert_eq!(up.count("GET", "/blobs/"), 1);
    assert!(proxy.tmp_entries().is_empty(), "{:?}", proxy.tmp_entries());

    // And the next client is served from the store without asking the upstream.
    let body = proxy
        .get(&format!("/v2/team/app/blobs/{digest}"))
        .await
        .bytes()
        .await
        .unwrap();
    assert_eq!(body.len(), data.len());
    assert_eq!(up.count("GET", "/blobs/"), 1);
}

#[tokio::test]
async fn sixteen_concurrent_cold_clients_cost_one_upstream_get() {
    let (up, proxy) = setup().await;
    let data = random_bytes(4 * MIB + 17, 2);
    let digest = up.add_blob(data.clone());
    let gate = Arc::new(Notify::new());
    up.set_blob_behavior(
        &digest,
        BlobBehavior::Gate {
            release: gate.clone(),
        },
    );
    let barrier = Arc::new(Barrier::new(16));
    let url = proxy.url(&format!("/v2/team/app/blobs/{digest}"));
    let mut tasks = Vec::new();
    for _ in 0..16 {
        let (barrier, url) = (barrier.clone(), url.clone());
        tasks.push(tokio::spawn(async move {
            barrier.wait().await;
            let resp = common::client().get(url).send().await.unwrap();
            assert_eq!(resp.status(), 200);
            let outcome = resp.headers()["X-Entrepot-Cache"]
                .to_str()
                .unwrap()
                .to_owned();
            (outcome, read_body(resp).await.unwrap())
        }));
    }
    // Hold the upstream's answer until all 16 requests follow the one fill.
    let d: entrepot::oci::Digest = digest.parse().unwrap();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    while proxy
        .store
        .fill_in_progress(&d)
        .is_none_or(|f| f.requests() < 16)
    {
        assert!(
            tokio::time::Instant::now() < deadline,
            "16 requests never joined one fill"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    gate.notify_one();
    let mut outcomes = Vec::new();
    for t in tasks {
        let (outcome, body) = t.await.unwrap();
        assert_eq!(body.len(), data.len());
        assert!(body == data, "a client got wrong bytes");
        outcomes.push(outcome);
    }
    outcomes.sort();
    let mut expected = vec!["joined".to_owned(); 15];
    expected.push("miss".to_owned());
    assert_eq!(
        outcomes, expected,
        "one request starts the fill, the others join it"
    );
    assert_eq!(up.count("GET", "/blobs/"), 1);
    assert_eq!(sha256_digest(&proxy.wait_cached(&digest).await), digest);
}

async fn assert_bad_upstream_not_cached(behavior: BlobBehavior) {
    let (up, proxy) = setup().await;
    let data = random_bytes(3 * MIB, 3);
    let digest = up.add_blob(data.clone());
    up.set_blob_behavior(&digest, behavior);
    let resp = proxy.get(&format!("/v2/team/app/blobs/{digest}")).await;
    // Headers may already be out (200); the body must then end with an error, never cleanly.
    if resp.status() == 200 {
        let r = read_body(resp).await;
        assert!(r.is_err(), "a bad blob ended like a good one");
    } else {
        assert_eq!(resp.status(), 502);
    }
    proxy.wait_idle().await;
    assert!(!proxy.blob_path(&digest).exists(), "a bad blob was stored");
    assert!(proxy.tmp_entries().is_empty(), "{:?}", proxy.tmp_entries());
    // Nothing cached: the next request goes upstream again (and succeeds once it is healthy).
    up.set_blob_behavior(&digest, BlobBehavior::Normal);
    let body = proxy
        .get(&format!("/v2/team/app/blobs/{digest}"))
        .await
        .bytes()
        .await
        .unwrap();
    assert!(body == data);
    assert_eq!(up.count("GET", "/blobs/"), 2);
}

#[tokio::test]
async fn corrupt_upstream_blob_is_an_error_and_not_cached() {
    assert_bad_upstream_not_cached(BlobBehavior::Corrupt).await;
}

#[tokio::test]
async fn truncated_upstream_blob_is_an_error_and_not_cached() {
    assert_bad_upstream_not_cached(BlobBehavior::Truncate { after: MIB + 5 }).await;
}

#[tokio::test]
async fn ranges_on_a_hit() {
    let (up, proxy) = setup().await;
    let data = random_bytes(100_000, 4);
    let digest = up.add_blob(data.clone());
    let url = proxy.url(&format!("/v2/team/app/blobs/{digest}"));
    let c = common::client();
    c.get(&url).send().await.unwrap().bytes().await.unwrap();
    proxy.wait_cached(&digest).await;

    let r = get_range(&c, &url, "bytes=10-19").await;
    assert_eq!(r.status(), 206);
    assert_eq!(r.headers()["content-range"], "bytes 10-19/100000");
    assert_eq!(r.headers()["content-length"], "10");
    assert_eq!(r.bytes().await.unwrap(), &data[10..20]);

    let r = get_range(&c, &url, "bytes=-5").await;
    assert_eq!(r.status(), 206);
    assert_eq!(r.headers()["content-range"], "bytes 99995-99999/100000");
    assert_eq!(r.bytes().await.unwrap(), &data[99_995..]);

    let r = get_range(&c, &url, "bytes=99990-").await;
    assert_eq!(r.status(), 206);
    assert_eq!(r.bytes().await.unwrap(), &data[99_990..]);

    let r = get_range(&c, &url, "bytes=100000-").await;
    assert_eq!(r.status(), 416);
    assert_eq!(r.headers()["content-range"], "bytes */100000");
    let body = common::json(r).await;
    assert!(body["errors"][0]["code"].is_string());

    // A multi-range request is answered with the whole blob.
    let r = get_range(&c, &url, "bytes=0-1,5-6").await;
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["accept-ranges"], "bytes");
    assert_eq!(up.count("GET", "/blobs/"), 1);
}

#[tokio::test]
async fn ranges_while_the_fill_is_in_progress() {
    let (up, proxy) = setup().await;
    let size = 2 * MIB;
    let data = random_bytes(size, 5);
    let digest = up.add_blob(data.clone());
    let release = Arc::new(Notify::new());
    up.set_blob_behavior(
        &digest,
        BlobBehavior::Stall {
            after: MIB,
            release: release.clone(),
        },
    );
    let url = proxy.url(&format!("/v2/team/app/blobs/{digest}"));
    let c = common::client();
    // The first client starts the fill, which stalls half-way.
    let first = c.get(&url).send().await.unwrap();
    assert_eq!(first.status(), 200);
    let first = tokio::spawn(read_body(first));

    // Bytes already written are served at once.
    let r = get_range(&c, &url, "bytes=100-199").await;
    assert_eq!(r.status(), 206);
    assert_eq!(
        r.headers()["content-range"],
        format!("bytes 100-199/{size}")
    );
    assert_eq!(r.bytes().await.unwrap(), &data[100..200]);

    // Beyond the end: 416 now, without waiting for the fill.
    let r = get_range(&c, &url, &format!("bytes={size}-")).await;
    assert_eq!(r.status(), 416);
    assert_eq!(r.headers()["content-range"], format!("bytes */{size}"));

    // A range past what is written waits for the writer.
    let tail = get_range(&c, &url, &format!("bytes={}-", size - 10)).await;
    assert_eq!(tail.status(), 206);
    let tail = tokio::spawn(read_body(tail));
    release.notify_one();
    assert_eq!(tail.await.unwrap().unwrap(), &data[size - 10..]);
    assert!(first.await.unwrap().unwrap() == data);
    assert_eq!(up.count("GET", "/blobs/"), 1);
}

fn parity_headers(r: &reqwest::Response) -> Vec<(String, String)> {
    let mut h: Vec<(String, String)> = r
        .headers()
        .iter()
        // Per-request diagnostics legitimately differ between two requests.
        .filter(|(k, _)| !matches!(k.as_str(), "date" | "x-request-id" | "x-entrepot-cache"))
        .map(|(k, v)| (k.to_string(), v.to_str().unwrap().to_string()))
        .collect();
    h.sort();
    h
}

#[tokio::test]
async fn head_has_exactly_the_status_and_headers_of_get() {
    let (up, proxy) = setup().await;
    let img = up.push_image("team/app", "v1", &[random_bytes(5000, 6).into()]);
    let c = common::client();
    let blob = proxy.url(&format!("/v2/team/app/blobs/{}", img.layers[0]));
    c.get(&blob).send().await.unwrap().bytes().await.unwrap();
    proxy.wait_cached(&img.layers[0]).await;
    let unknown = format!("sha256:{}", "0".repeat(64));
    let cases: Vec<(String, Option<&str>)> = vec![
        (blob.clone(), None),
        (blob.clone(), Some("bytes=1-10")),
        (blob.clone(), Some("bytes=99999-")),
        (proxy.url("/v2/team/app/manifests/v1"), None),
        (
            proxy.url(&format!("/v2/team/app/manifests/{}", img.manifest)),
            None,
        ),
        (proxy.url(&format!("/v2/team/app/blobs/{unknown}")), None),
        (proxy.url("/v2/team/app/manifests/nope"), None),
        (proxy.url("/v2/"), None),
        (proxy.url("/v2/Bad/blobs/sha256:x"), None),
    ];
    for (url, range) in cases {
        let mut g = c.get(&url);
        let mut h = c.head(&url);
        if let Some(r) = range {
            g = g.header("Range", r);
            h = h.header("Range", r);
        }
        let (g, h) = (g.send().await.unwrap(), h.send().await.unwrap());
        assert_eq!(g.status(), h.status(), "{url} {range:?}");
        assert_eq!(parity_headers(&g), parity_headers(&h), "{url} {range:?}");
        assert!(h.bytes().await.unwrap().is_empty());
    }
}

#[tokio::test]
async fn head_of_an_uncached_blob_asks_upstream_with_head_and_fetches_nothing() {
    let (up, proxy) = setup().await;
    let data = random_bytes(70_000, 7);
    let digest = up.add_blob(data);
    let r = proxy.head(&format!("/v2/team/app/blobs/{digest}")).await;
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["content-length"], "70000");
    assert_eq!(r.headers()["docker-content-digest"], digest.as_str());
    assert_eq!(up.count("HEAD", "/blobs/"), 1);
    assert_eq!(up.count("GET", "/blobs/"), 0);
    assert!(!proxy.blob_path(&digest).exists());

    let unknown = format!("sha256:{}", "1".repeat(64));
    let r = proxy.head(&format!("/v2/team/app/blobs/{unknown}")).await;
    assert_eq!(r.status(), 404);
}

#[tokio::test]
async fn unwritable_store_serves_straight_from_upstream() {
    let (up, proxy) = setup().await;
    let data = random_bytes(600_000, 8);
    let digest = up.add_blob(data.clone());
    // Make the temp folder unusable (a file where the folder was): works even as root.
    let tmp = proxy.root.join("tmp");
    std::fs::remove_dir_all(&tmp).unwrap();
    std::fs::write(&tmp, b"not a folder").unwrap();
    let url = proxy.url(&format!("/v2/team/app/blobs/{digest}"));
    for _ in 0..2 {
        let r = common::client().get(&url).send().await.unwrap();
        assert_eq!(r.status(), 200);
        assert_eq!(r.headers()["content-length"], "600000");
        assert!(r.bytes().await.unwrap() == data);
    }
    let r = get_range(&common::client(), &url, "bytes=5-9").await;
    assert_eq!(r.status(), 206);
    assert_eq!(r.bytes().await.unwrap(), &data[5..10]);
    assert!(!proxy.blob_path(&digest).exists());
    assert_eq!(up.count("GET", "/blobs/"), 3);
}

#[tokio::test]
async fn leftover_temp_files_are_swept_at_start_up() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("store");
    std::fs::create_dir_all(root.join("tmp")).unwrap();
    std::fs::write(root.join("tmp/abc.123.0"), b"half a layer").unwrap();
    let up = FakeRegistry::start().await;
    let proxy = Proxy::start_at(&upstream("fake", &up.url(), true, ""), &root).await;
    assert!(proxy.tmp_entries().is_empty());
    proxy.stop().await;
}
