//! Several replicas, one cache: a cold blob pulled through every replica at once costs the
//! cluster one upstream GET (on a shared Garage bucket, and with each replica on its own disk),
//! a dead owner costs a second fetch and never an error, and a forged peer marker gets 403.
//!
//! Real `entrepot serve` binaries on loopback; the upstream is a real `docker-registry` where
//! the count is what matters, the in-process fake where a stall must be held open.

mod common;

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use common::cluster::{self, owner_of, start_all, static_cluster, wait_peers_healthy, Replica};
use common::fake_registry::{BlobBehavior, FakeRegistry};
use common::garage::Garage;
use common::real::{DockerRegistry, SeedImage};
use common::{client, get_blob, random_bytes, sha256_digest, upstream};
use object_store::path::Path as ObjectPath;
use object_store::ObjectStoreExt as _;
use tokio::sync::Notify;

const MIB: usize = 1 << 20;

/// `clients` GETs of `digest` spread over `replicas` at once (every eighth a Range from the
/// middle); each must get exactly its bytes of `data`.
async fn pull_everywhere(
    replicas: &[Replica],
    path: &str,
    digest: &str,
    data: &Bytes,
    clients: usize,
) {
    let barrier = Arc::new(tokio::sync::Barrier::new(clients));
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..clients {
        let url = format!(
            "{}/v2/{path}/blobs/{digest}",
            replicas[i % replicas.len()].url()
        );
        let (digest, data, barrier) = (digest.to_string(), data.clone(), barrier.clone());
        tasks.spawn(async move {
            let c = client();
            barrier.wait().await;
            if i % 8 == 7 {
                let from = data.len() / 2 + i;
                let resp = c
                    .get(&url)
                    .header("Range", format!("bytes={from}-"))
                    .send()
                    .await
                    .map_err(|e| format!("client {i}: {e}"))?;
                if resp.status() != 206 {
                    return Err(format!("client {i}: Range answered {}", resp.status()));
                }
                let got = resp.bytes().await.map_err(|e| format!("client {i}: {e}"))?;
                if got != data.slice(from..) {
                    return Err(format!(
                        "client {i}: wrong range bytes ({} bytes)",
                        got.len()
                    ));
                }
                Ok(())
            } else {
                get_blob(&c, &url, &digest)
                    .await
                    .map(|_| ())
                    .map_err(|e| format!("client {i}: {e:#}"))
            }
        });
    }
    let mut failures = Vec::new();
    while let Some(r) = tasks.join_next().await {
        if let Err(e) = r.unwrap() {
            failures.push(e);
        }
    }
    assert!(failures.is_empty(), "failed transfers: {failures:#?}");
}

async fn sum_metric(replicas: &[Replica], name: &str) -> f64 {
    let mut total = 0.0;
    for r in replicas.iter().filter(|r| r.running()) {
        total += r.metric(name).await.unwrap();
    }
    total
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_cold_layer_pulled_through_three_replicas_on_one_bucket_costs_one_upstream_get() {
    let work = tempfile::tempdir().unwrap();
    let image = SeedImage::generate(&[64 * MIB]);
    let registry = DockerRegistry::seeded("docker-registry", work.path(), &image, "team/app:1.0")
        .await
        .unwrap();
    let garage = Garage::start().await.unwrap();
    let addrs = cluster::addresses(3);
    let mut replicas = static_cluster(
        work.path(),
        &addrs,
        &cluster::s3_storage(&garage, "", ""),
        &upstream("reg", &registry.url(), true, ""),
        "",
    )
    .unwrap();
    start_all(&mut replicas).await.unwrap();
    wait_peers_healthy(&replicas, 2).await.unwrap();

    let layer = &image.layers[0];
    let data = Bytes::from(layer.data.clone());
    pull_everywhere(&replicas, "reg/team/app", &layer.digest, &data, 24).await;

    let gets: Vec<_> = registry
        .requests_from_entrepot()
        .into_iter()
        .filter(|r| r.method == "GET" && r.target.contains(&layer.digest))
        .collect();
    assert_eq!(gets.len(), 1, "upstream GETs of the layer: {gets:#?}");
    // The other two replicas followed the owner's fill; none had to fall back. Each relayed
    // it to its clients on one shared stream (plus its Range client's own, and a stream of
    // their own for any client that fell behind), not one stream per client (16).
    let owner = owner_of(&replicas, &layer.digest);
    let served = replicas[owner]
        .metric("entrepot_cluster_served_for_peer_total")
        .await
        .unwrap();
    let mut streams = [0.0; 3];
    for r in replicas
        .iter()
        .enumerate()
        .filter(|(i, _)| *i != owner)
        .map(|(_, r)| r)
    {
        for (k, kind) in ["shared", "range", "resume"].iter().enumerate() {
            let label = format!("kind=\"{kind}\"");
            streams[k] += r
                .metric_labelled("entrepot_cluster_relay_streams_total", &label)
                .await
                .unwrap();
        }
    }
    let [shared, ranges, resumes] = streams;
    assert_eq!(shared, 2.0, "one shared stream per other replica");
    assert_eq!(ranges, 2.0, "the Range clients of the other two replicas");
    assert_eq!(
        served,
        shared + ranges + resumes,
        "the owner served exactly the relay streams"
    );
    assert!(served < 16.0, "{served} owner streams for 16 clients");
    assert!(sum_metric(&replicas, "entrepot_cluster_forwarded_total").await >= 1.0);
    assert_eq!(
        sum_metric(&replicas, "entrepot_cluster_local_fallback_total").await,
        0.0
    );

    // The bucket has the verified layer once, whoever committed it.
    let s3 = garage.s3_builder().build().unwrap();
    let key = ObjectPath::from(format!("blobs/{}", layer.digest.replace(':', "/")));
    common::eventually(
        Duration::from_secs(20),
        "the layer in the bucket",
        || async {
            match s3.get(&key).await {
                Ok(got) => sha256_digest(&got.bytes().await.unwrap()) == layer.digest,
                Err(_) => false,
            }
        },
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn with_their_own_disks_every_replica_keeps_a_copy_of_one_upstream_fetch() {
    let up = FakeRegistry::start().await;
    let data = Bytes::from(random_bytes(24 * MIB, 11));
    let digest = up.add_blob(data.clone());
    let work = tempfile::tempdir().unwrap();
    let addrs = cluster::addresses(3);
    let mut replicas = static_cluster(
        work.path(),
        &addrs,
        "",
        &upstream("fake", &up.url(), true, ""),
        "",
    )
    .unwrap();
    start_all(&mut replicas).await.unwrap();
    wait_peers_healthy(&replicas, 2).await.unwrap();

    pull_everywhere(&replicas, "team/app", &digest, &data, 12).await;
    assert_eq!(up.count("GET", &digest), 1, "upstream GETs of the blob");
    for r in &replicas {
        let path = common::real::blob_path(&r.store(), &digest);
        common::eventually(
            Duration::from_secs(10),
            "each replica's own copy",
            || async { std::fs::read(&path).is_ok_and(|b| sha256_digest(&b) == digest) },
        )
        .await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_owner_killed_mid_fill_aborts_its_followers_and_a_retry_through_any_replica_succeeds() {
    let up = FakeRegistry::start().await;
    let data = Bytes::from(random_bytes(32 * MIB, 12));
    let digest = up.add_blob(data.clone());
    let release = Arc::new(Notify::new());
    up.set_blob_behavior(
        &digest,
        BlobBehavior::Stall {
            after: 8 * MIB,
            release: release.clone(),
        },
    );
    let garage = Garage::start().await.unwrap();
    let work = tempfile::tempdir().unwrap();
    let addrs = cluster::addresses(3);
    let mut replicas = static_cluster(
        work.path(),
        &addrs,
        &cluster::s3_storage(&garage, "", ""),
        &upstream("fake", &up.url(), true, ""),
        "",
    )
    .unwrap();
    start_all(&mut replicas).await.unwrap();
    wait_peers_healthy(&replicas, 2).await.unwrap();

    let owner = owner_of(&replicas, &digest);
    let others: Vec<usize> = (0..3).filter(|i| *i != owner).collect();
    // A follower on each other replica, reading as fast as it can.
    let mut followers = tokio::task::JoinSet::new();
    for &i in &others {
        let url = format!("{}/v2/team/app/blobs/{digest}", replicas[i].url());
        let digest = digest.clone();
        followers.spawn(async move { get_blob(&client(), &url, &digest).await });
    }
    common::eventually(
        Duration::from_secs(20),
        "the owner's fill to start",
        || async { up.count("GET", &digest) == 1 },
    )
    .await;
    // Bytes are flowing to the followers through the owner; then the owner dies.
    tokio::time::sleep(Duration::from_millis(500)).await;
    replicas[owner].kill();
    while let Some(r) = followers.join_next().await {
        let r = r.unwrap();
        assert!(
            r.is_err(),
            "a follower of the dead owner got a complete blob"
        );
    }

    // Nothing partial is in the bucket.
    let s3 = garage.s3_builder().build().unwrap();
    let key = ObjectPath::from(format!("blobs/{}", digest.replace(':', "/")));
    assert!(
        s3.get(&key).await.is_err(),
        "an object for the unfinished blob"
    );

    // A retry through either remaining replica succeeds (the upstream is healthy again).
    up.set_blob_behavior(&digest, BlobBehavior::Normal);
    release.notify_waiters();
    for &i in &others {
        let url = format!("{}/v2/team/app/blobs/{digest}", replicas[i].url());
        let got = get_blob(&client(), &url, &digest).await.unwrap();
        assert_eq!(got, data);
    }

    // The owner comes back and takes its keys again: a new blob it owns is fetched by it.
    replicas[owner].start().await.unwrap();
    wait_peers_healthy(&replicas, 2).await.unwrap();
    let (fresh, fresh_digest) = (0u64..)
        .map(|seed| {
            let d = Bytes::from(random_bytes(MIB, 1000 + seed));
            let digest = sha256_digest(&d);
            (d, digest)
        })
        .find(|(_, d)| owner_of(&replicas, d) == owner)
        .unwrap();
    up.add_blob(fresh.clone());
    let served_before = replicas[owner]
        .metric("entrepot_cluster_served_for_peer_total")
        .await
        .unwrap();
    let url = format!(
        "{}/v2/team/app/blobs/{fresh_digest}",
        replicas[others[0]].url()
    );
    get_blob(&client(), &url, &fresh_digest).await.unwrap();
    assert!(
        replicas[owner]
            .metric("entrepot_cluster_served_for_peer_total")
            .await
            .unwrap()
            > served_before,
        "the owner, back, was not asked for its key"
    );
    assert_eq!(up.count("GET", &fresh_digest), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_forged_peer_marker_is_refused_and_a_down_peer_leaves_readyz_ready() {
    let up = FakeRegistry::start().await;
    let digest = up.add_blob(Bytes::from_static(b"private layer"));
    let work = tempfile::tempdir().unwrap();
    let addrs = cluster::addresses(2);
    // Two members configured, one of them never started.
    let mut replicas = static_cluster(
        work.path(),
        &addrs,
        "",
        &upstream("fake", &up.url(), true, ""),
        "",
    )
    .unwrap();
    replicas[0].start().await.unwrap();
    let r = &replicas[0];
    let c = client();
    let url = format!("{}/v2/team/app/blobs/{digest}", r.url());
    for forged in [
        "replica 1 00",
        &format!("replica {} {}", chrono_now(), "ab".repeat(32)),
        "",
    ] {
        let resp = c
            .get(&url)
            .header("Entrepot-Peer", forged)
            .header("Entrepot-Upstream", "fake")
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 403, "forged marker {forged:?}");
        let body = resp.bytes().await.unwrap();
        let errors = common::oci_error_entries(&body).unwrap();
        assert_eq!(errors[0]["code"], "DENIED");
    }
    assert_eq!(
        up.count("GET", &digest),
        0,
        "a forged request reached the upstream"
    );
    // Without the marker the same request is served.
    get_blob(&c, &url, &digest).await.unwrap();
    let ready = c.get(format!("{}/readyz", r.url())).send().await.unwrap();
    assert_eq!(ready.status(), 200, "a down peer made the replica unready");
}

/// Unix seconds now (a plausible signature time).
fn chrono_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
}
