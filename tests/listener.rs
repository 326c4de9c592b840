//! The listener's limits: connections that never finish sending a request header are closed
//! after `header_read_timeout` (they cannot pile up until file descriptors run out), while
//! ordinary pulls keep working; oversized request heads are refused.

mod common;

use std::time::{Duration, Instant};

use common::fake_registry::FakeRegistry;
use common::proxy::Proxy;
use common::upstream;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::TcpStream;

/// How many half-sent requests to open: 3,000, or fewer when this process may not open that
/// many files (each costs two descriptors here: the client's and the in-process server's).
fn half_sent_count() -> usize {
    let soft = std::fs::read_to_string("/proc/self/limits")
        .ok()
        .and_then(|l| {
            l.lines()
                .find(|l| l.starts_with("Max open files"))
                .and_then(|l| l.split_whitespace().nth(3)?.parse::<usize>().ok())
        })
        .unwrap_or(1024);
    3000.min(soft.saturating_sub(300) / 2)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn half_sent_requests_are_closed_while_pulls_keep_working() {
    let up = FakeRegistry::start().await;
    up.push_image(
        "team/app",
        "v1",
        &[bytes::Bytes::from(common::random_bytes(300_000, 1))],
    );
    let dir = tempfile::tempdir().unwrap();
    let proxy = Proxy::start_with_server(
        "header_read_timeout = \"1s\"",
        &upstream("fake", &up.url(), true, ""),
        &dir.path().join("store"),
    )
    .await;
    let addr = proxy.url.trim_start_matches("http://").to_owned();
    let n = half_sent_count();
    let mut stalled = Vec::with_capacity(n);
    for _ in 0..n {
        let mut s = TcpStream::connect(&addr).await.unwrap();
        s.write_all(b"GET /v2/ HTTP/1.1\r\nHost: entrepot\r\nX-Slow: ")
            .await
            .unwrap();
        stalled.push(s);
    }
    let opened = Instant::now();
    // A normal pull goes through meanwhile.
    proxy.pull_image("team/app", "v1").await.unwrap();

    // Every half-sent request is closed by the server within the timeout (plus slack).
    for mut s in stalled {
        let mut buf = [0u8; 512];
        let left = Duration::from_secs(10).saturating_sub(opened.elapsed());
        match tokio::time::timeout(left, s.read(&mut buf)).await {
            Ok(Ok(_)) | Ok(Err(_)) => {} // closed (possibly after a 408)
            Err(_) => panic!("a half-sent request was still open after 10 s"),
        }
    }
    assert!(opened.elapsed() < Duration::from_secs(10));
}

#[tokio::test]
async fn an_oversized_request_head_is_refused() {
    let up = FakeRegistry::start().await;
    let proxy = Proxy::start(&upstream("fake", &up.url(), true, "")).await;
    let addr = proxy.url.trim_start_matches("http://").to_owned();
    let mut s = TcpStream::connect(&addr).await.unwrap();
    let big = "a".repeat(100 * 1024);
    s.write_all(format!("GET /v2/ HTTP/1.1\r\nHost: e\r\nX-Big: {big}\r\n\r\n").as_bytes())
        .await
        .ok();
    let mut answer = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut answer)).await;
    let text = String::from_utf8_lossy(&answer);
    assert!(
        text.is_empty() || text.starts_with("HTTP/1.1 431"),
        "an oversized head was answered: {text}"
    );
    assert!(!text.contains("200 OK"));
}
