//! The status page's store section with the S3 backend and replicas (issue 14): the local tier
//! and the bucket are shown apart, every member with its health (a killed replica turns
//! "down" on the others' pages), and neither the cluster secret nor the bucket's keys appear.

mod common;

use std::time::Duration;

use bytes::Bytes;
use common::cluster::{self, start_all, static_cluster, wait_peers_healthy, SECRET};
use common::fake_registry::FakeRegistry;
use common::garage::Garage;
use common::{client, get_blob, random_bytes, upstream};
use serde_json::Value;

async fn store_page(url: &str) -> (Value, String) {
    let r = client()
        .get(format!("{url}/ui/api/store"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let text = r.text().await.unwrap();
    (serde_json::from_str(&text).unwrap(), text)
}

#[tokio::test]
async fn with_replicas_on_a_bucket_the_store_shows_tier_bucket_and_peer_health() {
    let up = FakeRegistry::start().await;
    let garage = Garage::start().await.unwrap();
    let work = tempfile::tempdir().unwrap();
    let storage = cluster::s3_storage(&garage, "", "");
    let addrs = cluster::addresses(2);
    let upstreams = upstream("fake", &up.url(), true, "");
    let mut replicas = static_cluster(work.path(), &addrs, &storage, &upstreams, "").unwrap();
    let layers: Vec<Bytes> = (0..3)
        .map(|i| Bytes::from(random_bytes(50_000, 90 + i)))
        .collect();
    let img = up.push_image("team/app", "v1", &layers);
    start_all(&mut replicas).await.unwrap();
    wait_peers_healthy(&replicas, 1).await.unwrap();
    let c = client();
    for d in img.layers.iter().chain([&img.config]) {
        let url = format!("{}/v2/team/app/blobs/{d}", replicas[0].url());
        get_blob(&c, &url, d).await.unwrap();
    }
    let total: u64 = layers.iter().map(|l| l.len() as u64).sum();

    // The listing is cached for a few seconds and uploads finish behind the pulls: poll.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    let last = loop {
        let (v, text) = store_page(&replicas[0].url()).await;
        for secret in [SECRET, garage.secret_access_key()] {
            assert!(!text.contains(secret), "a secret on the page: {text}");
        }
        if v["bucket"]["used_bytes"].as_u64().unwrap_or(0) >= total {
            break v;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the bucket never showed the layers: {v}"
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    };
    assert_eq!(last["backend"], "s3", "{last}");
    assert_eq!(last["bucket"]["bucket"], common::garage::DEFAULT_BUCKET);
    assert!(
        last["local_tier"].is_object(),
        "the local tier apart from the bucket: {last}"
    );
    assert!(
        last["local_tier"]["used_bytes"].as_u64().is_some(),
        "{last}"
    );
    let members = last["cluster"]["members"].as_array().unwrap();
    assert_eq!(members.len(), 2, "{last}");
    assert!(members.iter().all(|m| m["health"] == "up"), "{last}");
    assert_eq!(
        members.iter().filter(|m| m["this_replica"] == true).count(),
        1,
        "{last}"
    );
    assert_eq!(last["cluster"]["healthy_peers"], 1, "{last}");

    // A replica that dies shows as down on the other's page.
    replicas[1].kill();
    common::eventually(Duration::from_secs(15), "the peer shown down", || async {
        let (v, _) = store_page(&replicas[0].url()).await;
        v["cluster"]["healthy_peers"] == 0
            && v["cluster"]["members"]
                .as_array()
                .is_some_and(|m| m.iter().any(|m| m["health"] == "down"))
    })
    .await;
}
