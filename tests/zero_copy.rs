//! Stored blobs go to plain HTTP/1.1 clients from their files with `sendfile` (no copy through
//! the process), and what arrives is exactly the blob: whole, in ranges, at every size around
//! the thresholds, over HTTP/1.1 and h2c, to many clients at once. Alone in its test binary:
//! the metrics recorder is global to the process.

mod common;

use common::fake_registry::FakeRegistry;
use common::proxy::Proxy;
use common::{random_bytes, upstream};

const KIB: usize = 1024;
const MIB: usize = 1 << 20;

async fn sendfile_bytes(proxy: &Proxy) -> f64 {
    let text = proxy.get("/metrics").await.text().await.unwrap();
    common::cluster::metric_sum(&text, "entrepot_sendfile_bytes_total")
}

async fn body(c: &reqwest::Client, url: &str, range: Option<String>) -> (u16, Vec<u8>) {
    let mut req = c.get(url);
    if let Some(r) = range {
        req = req.header("Range", r);
    }
    let resp = req.send().await.unwrap();
    let status = resp.status().as_u16();
    (status, resp.bytes().await.unwrap().to_vec())
}

#[tokio::test]
async fn stored_blobs_are_sent_from_their_files_byte_for_byte() {
    let up = FakeRegistry::start().await;
    let proxy = Proxy::start(&upstream("fake", &up.url(), true, "")).await;
    let h1 = common::client();
    let h2 = reqwest::Client::builder()
        .http2_prior_knowledge()
        .build()
        .unwrap();
    // Around the copy threshold (32 KiB), the 1 MiB body slices, and odd sizes.
    let sizes = [
        1,
        32 * KIB - 1,
        32 * KIB,
        100 * KIB,
        MIB - 1,
        MIB + 3,
        3 * MIB + 5,
    ];
    let mut blobs = Vec::new();
    for (i, &size) in sizes.iter().enumerate() {
        let data = random_bytes(size, 40 + i as u64);
        let digest = up.add_blob(data.clone());
        let url = proxy.url(&format!("/v2/library/zc/blobs/{digest}"));
        // The cold pull fills the store; what follows are hits.
        assert_eq!(body(&h1, &url, None).await, (200, data.clone()));
        proxy.wait_cached(&digest).await;
        blobs.push((url, data));
    }

    let before = sendfile_bytes(&proxy).await;
    let mut hit_bytes = 0usize;
    for (url, data) in &blobs {
        let len = data.len();
        let (status, got) = body(&h1, url, None).await;
        assert_eq!(status, 200);
        assert!(got == *data, "a {len}-byte hit differs from the blob");
        hit_bytes += len;
        if len < 64 {
            continue;
        }
        // Ranges start inside pages and end anywhere: the file offset must follow.
        for (from, to) in [(7, len - 3), (len / 2 + 1, len - 1), (4095, len / 3 + 4097)] {
            let (status, got) = body(&h1, url, Some(format!("bytes={from}-{to}"))).await;
            assert_eq!(status, 206, "bytes={from}-{to} of {len}");
            assert!(got == data[from..=to], "bytes={from}-{to} of {len} differ");
            hit_bytes += to + 1 - from;
        }
        let (status, got) = body(&h1, url, Some("bytes=-1000".into())).await;
        assert_eq!(status, 206);
        assert!(
            got == data[len - 1000..],
            "the last 1000 bytes of {len} differ"
        );
        hit_bytes += 1000;
    }
    let sent = sendfile_bytes(&proxy).await - before;
    // Only slices under 32 KiB are copied (the 1-byte blob, short ranges, slice ends).
    assert!(
        sent >= 0.9 * hit_bytes as f64 && sent <= hit_bytes as f64,
        "{sent} of {hit_bytes} hit bytes went by sendfile"
    );

    // h2c frames the same mappings into DATA frames: copied, and intact.
    for (url, data) in &blobs {
        assert!(body(&h2, url, None).await.1 == *data, "an h2c hit differs");
    }

    // Many clients of one blob at once, each on its own connection.
    let (url, data) = blobs.last().unwrap();
    let pulls = (0..24).map(|_| {
        let url = url.clone();
        async move {
            let c = reqwest::Client::new();
            body(&c, &url, None).await
        }
    });
    for (status, got) in futures_util::future::join_all(pulls).await {
        assert_eq!(status, 200);
        assert!(got == *data, "a concurrent hit differs");
    }
}
