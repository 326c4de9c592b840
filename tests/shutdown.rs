//! Graceful shutdown: fills in progress finish within the grace period; past it they are
//! cancelled, their temp files removed, and nothing half-written is stored.

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::fake_registry::{BlobBehavior, FakeRegistry};
use common::proxy::Proxy;
use common::{random_bytes, upstream};
use futures_util::StreamExt;
use tokio::sync::Notify;

#[tokio::test]
async fn a_fill_in_progress_completes_within_the_grace_period() {
    let up = FakeRegistry::start().await;
    let data = random_bytes(2 << 20, 1);
    let digest = up.add_blob(data.clone());
    up.set_blob_behavior(
        &digest,
        BlobBehavior::Slow {
            chunk: 128 * 1024,
            delay: Duration::from_millis(20),
        },
    );
    let mut proxy = Proxy::start(&upstream("fake", &up.url(), true, "")).await;
    let resp = proxy.get(&format!("/v2/team/app/blobs/{digest}")).await;
    // The client goes away too; the fill must still finish.
    drop(resp);
    let server = proxy.begin_shutdown();
    server.await.unwrap().unwrap();
    let stored = std::fs::read(proxy.blob_path(&digest)).expect("blob committed before exit");
    assert!(stored == data);
    assert!(proxy.tmp_entries().is_empty());
}

#[tokio::test]
async fn past_the_grace_period_fills_are_cancelled_and_cleaned_up() {
    let up = FakeRegistry::start().await;
    let data = random_bytes(2 << 20, 2);
    let digest = up.add_blob(data);
    let never = Arc::new(Notify::new());
    up.set_blob_behavior(
        &digest,
        BlobBehavior::Stall {
            after: 1 << 20,
            release: never,
        },
    );
    let mut proxy = Proxy::start(&upstream("fake", &up.url(), true, "")).await;
    let resp = proxy.get(&format!("/v2/team/app/blobs/{digest}")).await;
    assert_eq!(resp.status(), 200);
    let reader = tokio::spawn(async move {
        let mut s = resp.bytes_stream();
        while let Some(chunk) = s.next().await {
            if chunk.is_err() {
                return Err(());
            }
        }
        Ok(())
    });
    while proxy.tmp_entries().is_empty() {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let started = tokio::time::Instant::now();
    proxy.begin_shutdown().await.unwrap().unwrap();
    // Grace is 2 s in the test config; cancellation then takes a moment.
    assert!(started.elapsed() < Duration::from_secs(10));
    assert!(proxy.tmp_entries().is_empty(), "{:?}", proxy.tmp_entries());
    assert!(!proxy.blob_path(&digest).exists());
    assert_eq!(reader.await.unwrap(), Err(()), "the client saw a clean end");
}
