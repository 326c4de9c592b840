//! Blob bodies from a plain-HTTP upstream go into the store with `splice` (never copied through
//! the process), and everything a fill promises still holds on that path: one upstream fetch
//! for many clients, exact bytes, nothing stored unverified; and whatever that path does not
//! take (a challenge, a redirect) is fetched the usual way. One test: the metrics recorder is
//! global to the process, so the counts below would mix with another test's.

mod common;

use common::fake_registry::{BlobBehavior, FakeRegistry};
use common::proxy::Proxy;
use common::{random_bytes, upstream};

const MIB: usize = 1 << 20;

async fn spliced_bytes(proxy: &Proxy) -> f64 {
    let text = proxy.get("/metrics").await.text().await.unwrap();
    common::cluster::metric_sum(&text, "entrepot_upstream_spliced_bytes_total")
}

/// The body of `GET url`, or the error that ended it.
async fn pull(c: &reqwest::Client, url: &str) -> Result<Vec<u8>, String> {
    let resp = c.get(url).send().await.map_err(|e| e.to_string())?;
    if resp.status() != 200 {
        return Err(format!("status {}", resp.status()));
    }
    let body = resp.bytes().await.map_err(|e| e.to_string())?;
    Ok(body.to_vec())
}

#[tokio::test]
async fn plain_http_upstream_bodies_are_spliced_into_the_store_and_the_rest_fetched_as_before() {
    let up = FakeRegistry::start().await;
    let proxy = Proxy::start(&upstream("fake", &up.url(), true, "")).await;
    let c = common::client();

    // Sixteen clients of one cold blob: one upstream GET, its body spliced, every client the
    // exact bytes, and then a hit from the store.
    let data = random_bytes(9 * MIB + 77, 1);
    let digest = up.add_blob(data.clone());
    let url = proxy.url(&format!("/v2/team/app/blobs/{digest}"));
    let before = spliced_bytes(&proxy).await;
    let pulls: Vec<_> = (0..16)
        .map(|_| {
            let (c, url) = (c.clone(), url.clone());
            tokio::spawn(async move { pull(&c, &url).await })
        })
        .collect();
    for p in pulls {
        assert!(
            p.await.unwrap().unwrap() == data,
            "a client got other bytes"
        );
    }
    assert_eq!(proxy.wait_cached(&digest).await, data);
    assert_eq!(up.count("GET", "/blobs/"), 1);
    assert_eq!(spliced_bytes(&proxy).await - before, data.len() as f64);
    assert!(pull(&c, &url).await.unwrap() == data);

    // A corrupt or short body on this path fails every client and stores nothing.
    for (seed, behavior) in [
        (2, BlobBehavior::Corrupt),
        (3, BlobBehavior::Truncate { after: 2 * MIB + 1 }),
    ] {
        let data = random_bytes(4 * MIB, seed);
        let digest = up.add_blob(data.clone());
        up.set_blob_behavior(&digest, behavior.clone());
        let url = proxy.url(&format!("/v2/team/app/blobs/{digest}"));
        let before = spliced_bytes(&proxy).await;
        assert!(pull(&c, &url).await.is_err(), "{behavior:?} ended cleanly");
        proxy.wait_idle().await;
        assert!(
            spliced_bytes(&proxy).await > before,
            "{behavior:?} not spliced"
        );
        assert!(!proxy.blob_path(&digest).exists(), "{behavior:?} stored");
        assert!(proxy.tmp_entries().is_empty(), "{:?}", proxy.tmp_entries());
    }

    // An upstream that asks for a token: the first answer is its challenge, which the usual
    // path follows; with the token known, the next blob is spliced.
    let authed = FakeRegistry::start().await;
    authed.require_bearer(None, 300);
    let proxy2 = Proxy::start(&upstream("fake", &authed.url(), true, "")).await;
    let first = random_bytes(3 * MIB, 4);
    let second = random_bytes(3 * MIB, 5);
    let (d1, d2) = (
        authed.add_blob(first.clone()),
        authed.add_blob(second.clone()),
    );
    let url1 = proxy2.url(&format!("/v2/team/app/blobs/{d1}"));
    assert!(pull(&c, &url1).await.unwrap() == first);
    proxy2.wait_cached(&d1).await;
    let before = spliced_bytes(&proxy2).await;
    let url2 = proxy2.url(&format!("/v2/team/app/blobs/{d2}"));
    assert!(pull(&c, &url2).await.unwrap() == second);
    assert_eq!(proxy2.wait_cached(&d2).await, second);
    assert_eq!(spliced_bytes(&proxy2).await - before, second.len() as f64);

    // Blobs redirected to another host are fetched there the usual way (without our
    // Authorization), not spliced.
    let origin = FakeRegistry::start().await;
    let cdn = FakeRegistry::start().await;
    let layer = random_bytes(2 * MIB, 6);
    let img = origin.push_image("team/app", "v1", &[layer.clone().into()]);
    origin.require_bearer(None, 300);
    origin.redirect_blobs_to(&cdn);
    let proxy3 = Proxy::start(&upstream("fake", &origin.url(), true, "")).await;
    let before = spliced_bytes(&proxy3).await;
    let url = proxy3.url(&format!("/v2/team/app/blobs/{}", img.layers[0]));
    assert!(pull(&c, &url).await.unwrap() == layer);
    assert_eq!(proxy3.wait_cached(&img.layers[0]).await, layer);
    assert_eq!(spliced_bytes(&proxy3).await, before);
    let at_cdn = cdn.requests();
    assert_eq!(at_cdn.len(), 1);
    assert!(!at_cdn[0].headers.contains_key("authorization"));
}
