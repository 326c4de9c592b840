//! Cache lifecycle through the real server: bounded storage with image-aware LRU eviction,
//! pins and in-use blobs; `/healthz` and `/readyz`; operator endpoints on their own listener.

mod common;

use std::time::Duration;

use bytes::Bytes;
use common::fake_registry::{FakeRegistry, PushedImage};
use common::proxy::Proxy;
use common::{random_bytes, upstream};
use entrepot::cache::inventory::Inventory;

const MIB: usize = 1 << 20;

/// A `GET` over a socket with a small receive buffer that reads the headers and a little of
/// the body, then stops reading until `finish`.
struct StalledReader {
    stream: tokio::net::TcpStream,
    /// Body bytes read so far.
    body: Vec<u8>,
    len: usize,
}

impl StalledReader {
    async fn start(proxy: &Proxy, path: &str) -> StalledReader {
        use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
        let addr: std::net::SocketAddr = proxy.url.trim_start_matches("http://").parse().unwrap();
        let socket = tokio::net::TcpSocket::new_v4().unwrap();
        socket.set_recv_buffer_size(16 * 1024).unwrap();
        let mut stream = socket.connect(addr).await.unwrap();
        stream
            .write_all(format!("GET {path} HTTP/1.1\r\nHost: entrepot\r\n\r\n").as_bytes())
            .await
            .unwrap();
        let mut buf = Vec::new();
        let head_end = loop {
            let mut chunk = [0u8; 4096];
            let n = stream.read(&mut chunk).await.unwrap();
            assert!(n > 0, "connection closed before the headers");
            buf.extend_from_slice(&chunk[..n]);
            if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                break i + 4;
            }
        };
        let head = String::from_utf8_lossy(&buf[..head_end]).to_lowercase();
        assert!(head.starts_with("http/1.1 200"), "{head}");
        let len = head
            .lines()
            .find_map(|l| l.strip_prefix("content-length:"))
            .map(|v| v.trim().parse().unwrap())
            .expect("a Content-Length");
        StalledReader {
            stream,
            body: buf[head_end..].to_vec(),
            len,
        }
    }

    /// Reads the rest of the body.
    async fn finish(mut self) -> Vec<u8> {
        use tokio::io::AsyncReadExt as _;
        let mut rest = vec![0u8; self.len - self.body.len()];
        self.stream.read_exact(&mut rest).await.unwrap();
        self.body.extend_from_slice(&rest);
        self.body
    }
}

async fn store_size(proxy: &Proxy) -> u64 {
    Inventory::load(&proxy.store).await.unwrap().total_bytes()
}

#[tokio::test]
async fn the_store_stays_bounded_keeping_pinned_and_in_use_images_and_whole_tags() {
    let up = FakeRegistry::start().await;
    let image = |repo: &str, seed: u64, size: usize| -> PushedImage {
        up.push_image(repo, "v1", &[Bytes::from(random_bytes(size, seed))])
    };
    // Pulled first, so the oldest: without protection they would go first.
    let pinned = image("team/pinned", 1, MIB);
    let big = image("team/in-use", 2, 12 * MIB);
    let small: Vec<PushedImage> = (0..12)
        .map(|i| image(&format!("team/app{i}"), 10 + i, MIB))
        .collect();
    let proxy = Proxy::start_with(
        "max_size = \"20MiB\"\nlow_water = \"16MiB\"\nsweep_interval = \"1h\"",
        &(upstream("fake", &up.url(), true, "") + "[[pin]]\nimage = \"fake/team/pinned:v1\"\n"),
    )
    .await;
    proxy.pull_image("team/pinned", "v1").await.unwrap();
    proxy.pull_image("team/in-use", "v1").await.unwrap();

    // A client starts reading the big layer and stalls: that blob is in use. Its socket has a
    // small receive buffer, so the server cannot hand the whole blob to the kernel and be done.
    let reader =
        StalledReader::start(&proxy, &format!("/v2/team/in-use/blobs/{}", big.layers[0])).await;

    // Fill past max_size with concurrent pulls.
    let pulls: Vec<_> = (0..small.len())
        .map(|i| {
            let p = &proxy;
            async move { p.pull_image(&format!("team/app{i}"), "v1").await }
        })
        .collect();
    for r in futures_util::future::join_all(pulls).await {
        r.unwrap();
    }

    // Eviction runs in the background, started by the commit that crossed max_size.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    while store_size(&proxy).await > 20 * MIB as u64 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "store still over max_size: {}",
            store_size(&proxy).await
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    proxy.wait_idle().await;
    let inv = Inventory::load(&proxy.store).await.unwrap();
    assert!(inv.total_bytes() <= 20 * MIB as u64);
    // Pinned and in-use content survived.
    for d in pinned
        .layers
        .iter()
        .chain([&pinned.manifest, &pinned.config])
    {
        assert!(proxy.blob_path(d).exists(), "pinned {d} was evicted");
    }
    assert!(
        proxy.blob_path(&big.layers[0]).exists(),
        "an in-use blob was evicted"
    );
    // Some of the small images went, whole.
    let evicted: Vec<&PushedImage> = small
        .iter()
        .filter(|i| !proxy.blob_path(&i.manifest).exists())
        .collect();
    assert!(!evicted.is_empty());
    // No tag is left pointing at an evicted manifest. (A layer that was still being fetched
    // when its manifest went may arrive afterwards: it is then a blob of no image, evicted
    // on its own turn.)
    for t in &inv.tags {
        assert!(
            inv.manifests.contains_key(&t.digest),
            "tag {}:{} points at a missing manifest",
            t.repo,
            t.tag
        );
    }
    for i in &evicted {
        assert!(!inv.tags.iter().any(|t| t.digest.to_string() == i.manifest));
    }
    // The stalled reader finishes with the right bytes.
    let held = reader.finish().await;
    assert_eq!(held.len(), 12 * MIB);
    assert_eq!(common::sha256_digest(&held), big.layers[0]);

    // With the upstream gone, every tag still in the store pulls completely.
    // (How many small images survive depends on how the concurrent pulls and eviction passes
    // interleave; the pinned and the in-use image always do.)
    let tags = inv.tags.clone();
    for repo in ["team/pinned", "team/in-use"] {
        assert!(
            tags.iter().any(|t| t.repo == repo),
            "{repo} lost its tag: {tags:?}"
        );
    }
    drop(up);
    for t in &tags {
        proxy
            .pull_image(&t.repo, &t.tag)
            .await
            .unwrap_or_else(|e| panic!("{}/{}:{} no longer pulls: {e}", t.upstream, t.repo, t.tag));
    }
}

#[tokio::test]
async fn health_and_readiness() {
    let up = FakeRegistry::start().await;
    let proxy = Proxy::start(&upstream("fake", &up.url(), true, "")).await;
    let r = proxy.get("/healthz").await;
    assert_eq!(r.status(), 200);
    assert_eq!(proxy.get("/readyz").await.status(), 200);
    // The store cannot take writes: not ready (but alive).
    let tmp = proxy.root.join("tmp");
    std::fs::remove_dir_all(&tmp).unwrap();
    std::fs::write(&tmp, b"not a folder").unwrap();
    assert_eq!(proxy.get("/readyz").await.status(), 503);
    assert_eq!(proxy.get("/healthz").await.status(), 200);
    assert!(up.requests().is_empty());
}

#[tokio::test]
async fn operator_endpoints_on_their_own_listener() {
    common::install_crypto();
    let up = FakeRegistry::start().await;
    let dir = tempfile::tempdir().unwrap();
    let cfg = entrepot::Config::parse(&format!(
        "[server]\nadmin_listen = \"127.0.0.1:0\"\n[storage]\nroot = \"{}\"\n{}",
        dir.path().join("store").display(),
        upstream("fake", &up.url(), true, "")
    ))
    .unwrap();
    let server = entrepot::Server::new(cfg).unwrap();
    let main = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let admin = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let (main_addr, admin_addr) = (main.local_addr().unwrap(), admin.local_addr().unwrap());
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    let run = tokio::spawn(server.run_with_admin(main, Some(admin), async {
        let _ = rx.await;
    }));
    let c = common::client();
    let status = |url: String| {
        let c = c.clone();
        async move { c.get(url).send().await.unwrap().status() }
    };
    let r = c
        .get(format!("http://{admin_addr}/metrics"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert!(r.text().await.unwrap().contains("entrepot_"));
    assert_eq!(status(format!("http://{admin_addr}/readyz")).await, 200);
    assert_eq!(status(format!("http://{admin_addr}/v2/")).await, 404);
    // Not on the registry listener when an admin listener is configured.
    assert_eq!(status(format!("http://{main_addr}/metrics")).await, 404);
    assert_eq!(status(format!("http://{main_addr}/v2/")).await, 200);
    tx.send(()).unwrap();
    run.await.unwrap().unwrap();
}

/// Six 8 MiB images pulled one after another into a 30 MiB store: the three pulled last stay,
/// whole, and pull with the upstream gone. Last uses were whole seconds, so images pulled in
/// the same second tied and the tie went by digest order: about one run in four evicted the
/// image pulled last. Several rounds, since each used to fail only sometimes.
#[tokio::test]
async fn regression_eviction_keeps_the_images_pulled_last() {
    for round in 0..3u64 {
        let up = FakeRegistry::start().await;
        let images: Vec<PushedImage> = (0..6)
            .map(|i| {
                let layer = Bytes::from(random_bytes(8 * MIB, 100 * round + i));
                up.push_image(&format!("team/app{i}"), "v1", &[layer])
            })
            .collect();
        let proxy = Proxy::start_with(
            "max_size = \"30MiB\"\nsweep_interval = \"1h\"",
            &upstream("fake", &up.url(), true, ""),
        )
        .await;
        for i in 0..images.len() {
            proxy
                .pull_image(&format!("team/app{i}"), "v1")
                .await
                .unwrap();
        }
        // Eviction runs in the background, one file at a time: wait until it is done.
        let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
        let kept = loop {
            let kept: Vec<usize> = (0..images.len())
                .filter(|&i| proxy.blob_path(&images[i].manifest).exists())
                .collect();
            if kept.len() <= 3 && store_size(&proxy).await <= 30 * MIB as u64 {
                break kept;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "store over max_size"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        };
        proxy.wait_idle().await;
        assert_eq!(
            kept,
            [3, 4, 5],
            "round {round}: the images pulled last must stay"
        );
        drop(up);
        for i in 3..6 {
            proxy
                .pull_image(&format!("team/app{i}"), "v1")
                .await
                .unwrap_or_else(|e| panic!("round {round}, upstream gone: {e}"));
        }
        proxy.stop().await;
    }
}
