//! Replicas sharing one bucket behave as one cache: skopeo pulls through each replica alone
//! from the bucket with no upstream request, a tag is revalidated once per TTL for the whole
//! cluster, and exactly one replica sweeps the bucket, sparing what any replica used during
//! the eviction grace.
//!
//! Real `entrepot serve` binaries on a real Garage; a real `docker-registry` upstream for
//! skopeo, the in-process fake where requests are counted per path.

mod common;

use std::time::Duration;

use bytes::Bytes;
use common::cluster::{self, owner_of, start_all, static_cluster, wait_peers_healthy, Replica};
use common::fake_registry::FakeRegistry;
use common::garage::Garage;
use common::real::{read_layout, skopeo_copy, DockerRegistry, SeedImage, TAG_TTL};
use common::{client, get_blob, random_bytes, upstream, OCI_MANIFEST};
use futures_util::TryStreamExt as _;
use object_store::path::Path as ObjectPath;
use object_store::{ObjectStore as _, ObjectStoreExt as _};

const MIB: usize = 1 << 20;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn skopeo_pulls_through_each_replica_alone_from_the_bucket_with_no_upstream_request() {
    common::real::require_programs(&["docker-registry", "skopeo"]);
    let work = tempfile::tempdir().unwrap();
    let image = SeedImage::generate(&[3 * MIB, 64 * 1024, 1000]);
    let registry = DockerRegistry::seeded("docker-registry", work.path(), &image, "team/app:1.0")
        .await
        .unwrap();
    let garage = Garage::start().await.unwrap();
    let addrs = cluster::addresses(3);
    let mut replicas = static_cluster(
        work.path(),
        &addrs,
        &cluster::s3_storage(&garage, "", ""),
        &upstream("reg", &registry.url(), true, TAG_TTL),
        "",
    )
    .unwrap();
    start_all(&mut replicas).await.unwrap();
    wait_peers_healthy(&replicas, 2).await.unwrap();

    let copy = |replica: &Replica, label: &str| {
        let source = format!("docker://{}/reg/team/app:1.0", replica.host());
        let out = work.path().join(format!("pull-{label}"));
        let (image, label) = (&image, label.to_string());
        async move {
            skopeo_copy(&source, &format!("oci:{}:x", out.display()))
                .await
                .unwrap_or_else(|e| panic!("{label}: {e:#}"));
            read_layout(&out, "x")
                .unwrap()
                .expect(&label, &image.manifest.digest, &image.blob_digests())
                .unwrap();
        }
    };
    copy(&replicas[0], "first").await;
    // The owners' uploads finish a moment after their clients are served: the replicas that
    // stay up alone rely on the bucket.
    common::eventually(
        Duration::from_secs(30),
        "every blob in the bucket",
        || async {
            let mut all = true;
            for d in image.all_digests() {
                all &= in_bucket(&garage, &d).await;
            }
            all
        },
    )
    .await;
    let asked = registry.requests_from_entrepot().len();
    for i in 0..replicas.len() {
        for (j, r) in replicas.iter_mut().enumerate() {
            if j != i {
                r.kill();
            } else if !r.running() {
                r.start().await.unwrap();
            }
        }
        copy(&replicas[i], &format!("alone-{i}")).await;
    }
    let after: Vec<_> = registry
        .requests_from_entrepot()
        .into_iter()
        .skip(asked)
        .collect();
    assert!(after.is_empty(), "the upstream was asked: {after:#?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_tag_is_revalidated_once_per_ttl_for_the_whole_cluster() {
    let up = FakeRegistry::start().await;
    up.push_image("team/app", "v1", &[Bytes::from(random_bytes(1000, 41))]);
    let garage = Garage::start().await.unwrap();
    let work = tempfile::tempdir().unwrap();
    let addrs = cluster::addresses(3);
    let mut replicas = static_cluster(
        work.path(),
        &addrs,
        &cluster::s3_storage(&garage, "", ""),
        &upstream("fake", &up.url(), true, "tag_ttl = \"1s\""),
        "",
    )
    .unwrap();
    start_all(&mut replicas).await.unwrap();
    wait_peers_healthy(&replicas, 2).await.unwrap();

    // Every replica is asked for the tag every 50 ms for a while.
    let ttl = Duration::from_secs(1);
    let run = Duration::from_millis(4500);
    let started = tokio::time::Instant::now();
    let c = client();
    let mut asked = 0;
    while started.elapsed() < run {
        for r in &replicas {
            let resp = c
                .get(format!("{}/v2/team/app/manifests/v1", r.url()))
                .header("Accept", OCI_MANIFEST)
                .send()
                .await
                .unwrap();
            assert_eq!(resp.status(), 200);
            asked += 1;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let upstream_asked = up.count("HEAD", "/manifests/v1") + up.count("GET", "/manifests/v1");
    // The first fetch, then at most one revalidation per TTL (and one for a TTL that expires
    // while the last one is answered).
    let most = (run.as_millis() / ttl.as_millis()) as usize + 2;
    assert!(
        (2..=most).contains(&upstream_asked),
        "{asked} requests through 3 replicas over {run:?} asked the upstream {upstream_asked} times (at most {most})"
    );
}

/// The object at a blob's key, if any.
async fn in_bucket(garage: &Garage, digest: &str) -> bool {
    let s3 = garage.s3_builder().build().unwrap();
    let key = ObjectPath::from(format!("blobs/{}", digest.replace(':', "/")));
    s3.head(&key).await.is_ok()
}

async fn bucket_bytes(garage: &Garage) -> u64 {
    let s3 = garage.s3_builder().build().unwrap();
    let found: Vec<_> = s3
        .list(Some(&ObjectPath::from("blobs")))
        .try_collect()
        .await
        .unwrap();
    found.iter().map(|m| m.size).sum()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn one_replica_sweeps_the_bucket_and_spares_what_a_replica_used_within_the_grace() {
    let up = FakeRegistry::start().await;
    let garage = Garage::start().await.unwrap();
    let work = tempfile::tempdir().unwrap();
    let addrs = cluster::addresses(3);
    let mut replicas = static_cluster(
        work.path(),
        &addrs,
        &cluster::s3_storage(
            &garage,
            "sweep_interval = \"1s\"",
            "max_size = \"30MiB\"\neviction_grace = \"4s\"",
        ),
        &upstream("fake", &up.url(), true, ""),
        "",
    )
    .unwrap();
    start_all(&mut replicas).await.unwrap();
    wait_peers_healthy(&replicas, 2).await.unwrap();

    let images: Vec<_> = (0..6u64)
        .map(|i| {
            up.push_image(
                &format!("team/app{i}"),
                "v1",
                &[Bytes::from(random_bytes(8 * MIB, 50 + i))],
            )
        })
        .collect();
    let c = client();
    for (i, img) in images.iter().enumerate() {
        let base = replicas[i % 3].url();
        let resp = c
            .get(format!("{base}/v2/team/app{i}/manifests/v1"))
            .header("Accept", OCI_MANIFEST)
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 200);
        for d in std::iter::once(&img.config).chain(&img.layers) {
            get_blob(&c, &format!("{base}/v2/team/app{i}/blobs/{d}"), d)
                .await
                .unwrap();
        }
    }
    // The leader chooses what to evict; the oldest image is among it.
    let chose = "chose least recently used images";
    common::eventually(
        Duration::from_secs(30),
        "a replica to plan the bucket's eviction",
        || async { replicas.iter().any(|r| r.output().contains(chose)) },
    )
    .await;
    let leader = replicas
        .iter()
        .position(|r| r.output().contains(chose))
        .unwrap();
    assert_eq!(
        leader,
        owner_of(&replicas, "bucket-sweeps"),
        "the sweeping replica is not the task's owner"
    );
    // Within the grace period, another replica serves the oldest image again.
    let user = (leader + 1) % 3;
    let base = replicas[user].url();
    for d in std::iter::once(&images[0].config).chain(&images[0].layers) {
        get_blob(&c, &format!("{base}/v2/team/app0/blobs/{d}"), d)
            .await
            .unwrap();
    }
    common::eventually(
        Duration::from_secs(60),
        "the bucket to shrink under 30 MiB",
        || async { bucket_bytes(&garage).await <= 30 * MIB as u64 },
    )
    .await;
    assert!(
        in_bucket(&garage, &images[0].layers[0]).await,
        "the image used during the grace was deleted"
    );
    assert!(
        !in_bucket(&garage, &images[1].layers[0]).await,
        "the least recently used image stayed"
    );
    for (i, r) in replicas.iter().enumerate() {
        if i != leader {
            assert!(
                !r.output().contains(chose),
                "{} swept the bucket too",
                r.name
            );
        }
    }
}
