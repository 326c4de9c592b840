//! `/metrics` parsed while clients pull. Alone in its test binary: the metrics recorder is
//! process-wide, so another server in the same process would move the same gauges.

mod common;

use std::collections::HashMap;

use bytes::Bytes;
use common::fake_registry::FakeRegistry;
use common::proxy::Proxy;
use common::{random_bytes, upstream};

/// Parses Prometheus text into `name{labels}` → value.
async fn metrics(proxy: &Proxy) -> HashMap<String, f64> {
    let r = proxy.get("/metrics").await;
    assert_eq!(r.status(), 200);
    assert!(r.headers()["content-type"]
        .to_str()
        .unwrap()
        .starts_with("text/plain"));
    r.text()
        .await
        .unwrap()
        .lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
        .filter_map(|l| {
            let (k, v) = l.rsplit_once(' ')?;
            Some((k.to_string(), v.parse().ok()?))
        })
        .collect()
}

/// The value of the series whose name is `name` and whose labels include all of `labels`.
fn value(m: &HashMap<String, f64>, name: &str, labels: &[(&str, &str)]) -> f64 {
    m.iter()
        .filter(|(k, _)| {
            k.split('{').next() == Some(name)
                && labels
                    .iter()
                    .all(|(l, v)| k.contains(&format!("{l}=\"{v}\"")))
        })
        .map(|(_, v)| *v)
        .sum()
}

#[tokio::test]
async fn metrics_change_as_clients_pull() {
    let up = FakeRegistry::start().await;
    up.add_response_header("RateLimit-Remaining", "97;w=21600");
    let img = up.push_image("team/app", "v1", &[Bytes::from(random_bytes(300_000, 5))]);
    // A name no other test uses: the recorder is process-wide.
    let name = "metrics-test.example";
    let proxy = Proxy::start(&upstream(name, &up.url(), true, "")).await;
    let before = metrics(&proxy).await;
    let served_before = value(
        &before,
        "entrepot_served_bytes_total",
        &[("source", "cache")],
    );

    proxy.pull_image("team/app", "v1").await.unwrap();
    proxy.wait_idle().await;
    let m = metrics(&proxy).await;
    let miss = [
        ("upstream", name),
        ("kind", "blob"),
        ("outcome", "miss"),
        ("status", "200"),
    ];
    assert_eq!(
        value(&m, "entrepot_requests_total", &miss),
        2.0,
        "config and layer"
    );
    assert!(
        value(
            &m,
            "entrepot_upstream_requests_total",
            &[("upstream", name), ("status", "200")]
        ) >= 3.0
    );
    assert!(
        value(
            &m,
            "entrepot_upstream_request_duration_seconds_count",
            &[("upstream", name)]
        ) >= 3.0
    );
    assert!(value(&m, "entrepot_upstream_bytes_total", &[("upstream", name)]) >= 300_000.0);
    assert_eq!(
        value(
            &m,
            "entrepot_upstream_ratelimit_remaining",
            &[("upstream", name)]
        ),
        97.0
    );
    assert!(m
        .keys()
        .any(|k| k.starts_with("entrepot_fills_in_progress")));
    assert!(value(&m, "entrepot_cache_bytes", &[]) > 0.0);

    // Again: now hits, served from the cache.
    proxy.pull_image("team/app", "v1").await.unwrap();
    let m = metrics(&proxy).await;
    let hit = [("upstream", name), ("kind", "blob"), ("outcome", "hit")];
    assert_eq!(value(&m, "entrepot_requests_total", &hit), 2.0);
    assert!(
        value(&m, "entrepot_served_bytes_total", &[("source", "cache")])
            >= served_before + 300_000.0
    );

    // Upstream errors are counted by kind.
    up.set_failure(Some(common::fake_registry::Failure::StatusRetryAfter(
        429,
        "5".into(),
    )));
    let r = proxy.get("/v2/team/app/manifests/other").await;
    assert_eq!(r.status(), 429);
    let m = metrics(&proxy).await;
    assert_eq!(
        value(
            &m,
            "entrepot_upstream_errors_total",
            &[("upstream", name), ("kind", "rate_limited")]
        ),
        1.0
    );
    assert!(
        value(
            &m,
            "entrepot_requests_total",
            &[("upstream", name), ("outcome", "error"), ("status", "429")]
        ) >= 1.0
    );
    let _ = img;
}
