//! The S3 backend through the real server, against a real Garage, with a fault-injecting relay
//! in front of it where the test needs the bucket to misbehave. For every fault the client gets
//! the right bytes (from the next source) and nothing unverified becomes visible in the bucket.
//!
//! Needs `garage` 2.5.0 (`bash .ci/install-garage.sh`).

mod common;

use std::time::Duration;

use bytes::Bytes;
use common::fake_registry::{BlobBehavior, FakeRegistry, PushedImage};
use common::garage::Garage;
use common::proxy::Proxy;
use common::real::Entrepot;
use common::s3_relay::{Fault, Limit, Op, S3Relay};
use common::{random_bytes, sha256_digest, upstream};
use futures_util::TryStreamExt as _;
use object_store::path::Path as ObjectPath;
use object_store::ObjectStore as _;

const MIB: usize = 1 << 20;

/// Field order is drop order: proxies are the test's, then the relay, then Garage.
struct Env {
    up: FakeRegistry,
    relay: S3Relay,
    garage: Garage,
}

impl Env {
    async fn start() -> Env {
        let garage = Garage::start().await.expect("garage starts");
        let relay = S3Relay::start(&garage.endpoint()).await.unwrap();
        Env {
            up: FakeRegistry::start().await,
            relay,
            garage,
        }
    }

    /// `[storage]` keys for the s3 backend at `endpoint` (Garage itself or the relay).
    fn storage(&self, endpoint: &str) -> String {
        self.storage_with(endpoint, "", "")
    }

    /// [`Env::storage`] with more `[storage]` and `[storage.s3]` keys.
    fn storage_with(&self, endpoint: &str, storage: &str, s3: &str) -> String {
        format!(
            "backend = \"s3\"\n{storage}\n\n[storage.s3]\nendpoint = \"{endpoint}\"\nregion = \"{}\"\nbucket = \"{}\"\naccess_key_id = \"{}\"\nsecret_access_key = \"{}\"\nrequest_timeout = \"2s\"\nmax_retries = 1\n{s3}\n",
            self.garage.region(),
            self.garage.bucket(),
            self.garage.access_key_id(),
            self.garage.secret_access_key(),
        )
    }

    /// A replica on a fresh local root, reaching the bucket directly.
    async fn replica(&self) -> Proxy {
        Proxy::start_with(
            &self.storage(&self.garage.endpoint()),
            &upstream("fake", &self.up.url(), true, ""),
        )
        .await
    }

    /// A replica on a fresh local root, reaching the bucket through the relay.
    async fn replica_via_relay(&self) -> Proxy {
        Proxy::start_with(
            &self.storage(&self.relay.endpoint()),
            &upstream("fake", &self.up.url(), true, ""),
        )
        .await
    }

    /// The keys in the bucket under `prefix`.
    async fn keys(&self, prefix: &str) -> Vec<String> {
        let s3 = self.garage.s3_builder().build().unwrap();
        let found: Vec<_> = s3
            .list(Some(&ObjectPath::from(prefix)))
            .try_collect()
            .await
            .unwrap();
        found.iter().map(|m| m.location.to_string()).collect()
    }

    /// Bytes of blobs in the bucket.
    async fn bucket_bytes(&self) -> u64 {
        let s3 = self.garage.s3_builder().build().unwrap();
        let found: Vec<_> = s3
            .list(Some(&ObjectPath::from("blobs")))
            .try_collect()
            .await
            .unwrap();
        found.iter().map(|m| m.size).sum()
    }

    /// The object at a blob's key, if any.
    async fn object(&self, digest: &str) -> Option<Bytes> {
        let s3 = self.garage.s3_builder().build().unwrap();
        let key = ObjectPath::from(format!("blobs/{}", digest.replace(':', "/")));
        match object_store::ObjectStoreExt::get(&s3, &key).await {
            Ok(r) => Some(r.bytes().await.unwrap()),
            Err(object_store::Error::NotFound { .. }) => None,
            Err(e) => panic!("reading {key}: {e}"),
        }
    }

    /// An image of one `size`-byte layer whose layer a first replica has put in the bucket.
    async fn layer_in_bucket(&self, seed: u64, size: usize) -> PushedImage {
        let img = self.image("team/app", seed, size);
        let first = self.replica().await;
        blob(&first, "team/app", &img.layers[0]).await;
        first.wait_idle().await;
        img
    }

    fn image(&self, repo: &str, seed: u64, size: usize) -> PushedImage {
        self.up
            .push_image(repo, "v1", &[Bytes::from(random_bytes(size, seed))])
    }
}

/// GET of a blob through `proxy`: its bytes, checked against the digest.
async fn blob(proxy: &Proxy, repo: &str, digest: &str) -> Bytes {
    common::get_blob(
        &common::client(),
        &proxy.url(&format!("/v2/{repo}/blobs/{digest}")),
        digest,
    )
    .await
    .unwrap()
}

#[tokio::test]
async fn a_replica_with_an_empty_root_serves_what_the_bucket_holds_with_no_upstream_request() {
    let env = Env::start().await;
    let img = env.image("team/app", 1, 20 * MIB);
    let first = env.replica().await;
    first.pull_image("team/app", "v1").await.unwrap();
    first.wait_idle().await;
    // The bucket holds the verified blobs, the manifest, its media type and the tag.
    for d in img.layers.iter().chain([&img.config, &img.manifest]) {
        let stored = env
            .object(d)
            .await
            .unwrap_or_else(|| panic!("{d} not in the bucket"));
        assert_eq!(sha256_digest(&stored), *d);
    }
    assert_eq!(env.keys("meta/tags").await.len(), 1);
    assert_eq!(env.keys("meta/manifests").await.len(), 1);
    first.stop().await;

    let asked = env.up.requests().len();
    let second = env.replica().await;
    second.pull_image("team/app", "v1").await.unwrap();
    second.wait_idle().await;
    assert_eq!(
        env.up.requests().len(),
        asked,
        "the second replica asked the upstream"
    );
    // Its local tier now has the layer, so the next read is a local hit.
    assert!(second.blob_path(&img.layers[0]).is_file());
    let r = second
        .get(&format!("/v2/team/app/blobs/{}", img.layers[0]))
        .await;
    assert_eq!(r.headers()["X-Entrepot-Cache"], "hit");

    // The bucket's requests are counted by operation and status.
    let metrics = second.get("/metrics").await.text().await.unwrap();
    for line in [
        "entrepot_s3_requests_total{operation=\"CompleteMultipartUpload\",status=\"200\"}",
        "entrepot_s3_requests_total{operation=\"GetObject\",status=\"206\"}",
        "entrepot_bucket_fills_total",
    ] {
        assert!(metrics.contains(line), "{line} not in:\n{metrics}");
    }
}

#[tokio::test]
async fn a_blob_that_fails_verification_never_reaches_the_bucket() {
    let env = Env::start().await;
    let data = random_bytes(12 * MIB, 2);
    let digest = env.up.add_blob(data);
    env.up.set_blob_behavior(&digest, BlobBehavior::Corrupt);
    let proxy = env.replica().await;
    let r = common::get_blob(
        &common::client(),
        &proxy.url(&format!("/v2/team/app/blobs/{digest}")),
        &digest,
    )
    .await;
    assert!(r.is_err(), "a corrupt blob was served as complete");
    proxy.wait_idle().await;
    assert!(env.object(&digest).await.is_none());
    assert!(env.keys("blobs").await.is_empty());
}

#[tokio::test]
async fn regression_failing_upload_parts_abort_the_upload_and_the_client_is_served() {
    let env = Env::start().await;
    let img = env.image("team/app", 3, 20 * MIB);
    env.relay
        .fault(Op::UploadPart, Fault::Status(503), Limit::Always);
    let proxy = env.replica_via_relay().await;
    proxy.pull_image("team/app", "v1").await.unwrap();
    proxy.wait_idle().await;
    assert!(
        env.relay.count(Op::AbortMultipartUpload) >= 1,
        "no upload was aborted: {:?}",
        env.relay.ops()
    );
    assert!(
        env.object(&img.layers[0]).await.is_none(),
        "a partial upload became visible"
    );
    // The replica kept its verified local copy and serves it.
    assert_eq!(
        sha256_digest(&blob(&proxy, "team/app", &img.layers[0]).await),
        img.layers[0]
    );
}

#[tokio::test]
async fn regression_failing_complete_and_a_lost_complete_answer_still_serve_the_client() {
    let env = Env::start().await;
    let a = env.image("team/a", 4, 20 * MIB);
    let b = env.image("team/b", 5, 20 * MIB);
    let proxy = env.replica_via_relay().await;

    env.relay.fault(
        Op::CompleteMultipartUpload,
        Fault::Status(500),
        Limit::Always,
    );
    proxy.pull_image("team/a", "v1").await.unwrap();
    proxy.wait_idle().await;
    assert!(env.object(&a.layers[0]).await.is_none());
    env.relay.clear_faults();

    // The answer to Complete is lost: the object is there (verified bytes), and the client
    // never noticed.
    env.relay.fault(
        Op::CompleteMultipartUpload,
        Fault::LoseAnswer,
        Limit::Times(1),
    );
    proxy.pull_image("team/b", "v1").await.unwrap();
    proxy.wait_idle().await;
    if let Some(stored) = env.object(&b.layers[0]).await {
        assert_eq!(sha256_digest(&stored), b.layers[0]);
    }
}

#[tokio::test]
async fn regression_a_malformed_head_answer_is_a_miss_not_an_error() {
    let env = Env::start().await;
    let img = env.image("team/app", 6, 3 * MIB);
    env.relay
        .fault(Op::HeadObject, Fault::MalformedStatus, Limit::Always);
    let proxy = env.replica_via_relay().await;
    assert_eq!(
        sha256_digest(&blob(&proxy, "team/app", &img.layers[0]).await),
        img.layers[0]
    );
    assert_eq!(env.up.count("GET", "/blobs/"), 1);
}

#[tokio::test]
async fn regression_a_malformed_get_answer_is_served_from_the_upstream() {
    let env = Env::start().await;
    let img = env.layer_in_bucket(60, 12 * MIB).await;
    env.relay
        .fault(Op::GetObject, Fault::MalformedStatus, Limit::Always);
    let second = env.replica_via_relay().await;
    assert_eq!(
        sha256_digest(&blob(&second, "team/app", &img.layers[0]).await),
        img.layers[0]
    );
    assert_eq!(env.up.count("GET", "/blobs/"), 2);
    assert!(
        !second.blob_path(&img.layers[0]).exists(),
        "nothing unverified was kept"
    );
}

#[tokio::test]
async fn regression_an_object_not_visible_yet_is_a_miss() {
    let env = Env::start().await;
    let img = env.image("team/app", 7, 12 * MIB);
    env.relay.fault(
        Op::CompleteMultipartUpload,
        Fault::NotFoundAfterWrite(Duration::from_secs(30)),
        Limit::Always,
    );
    env.relay.fault(
        Op::PutObject,
        Fault::NotFoundAfterWrite(Duration::from_secs(30)),
        Limit::Always,
    );
    let first = env.replica_via_relay().await;
    blob(&first, "team/app", &img.layers[0]).await;
    first.wait_idle().await;
    // A second replica does not see the object yet: it fetches from the upstream.
    let second = env.replica_via_relay().await;
    assert_eq!(
        sha256_digest(&blob(&second, "team/app", &img.layers[0]).await),
        img.layers[0]
    );
    assert_eq!(env.up.count("GET", "/blobs/"), 2);
}

#[tokio::test]
async fn regression_a_hanging_bucket_cannot_hold_a_fill() {
    let env = Env::start().await;
    let img = env.layer_in_bucket(8, 12 * MIB).await;
    // The second replica finds the blob in the bucket, but reading it hangs: its request
    // timeout ends the read and the client is served from the upstream instead.
    env.relay.fault(Op::GetObject, Fault::Hang, Limit::Always);
    let second = env.replica_via_relay().await;
    let got = tokio::time::timeout(
        Duration::from_secs(30),
        blob(&second, "team/app", &img.layers[0]),
    )
    .await
    .expect("the fill waited on the bucket for ever");
    assert_eq!(sha256_digest(&got), img.layers[0]);
}

#[tokio::test]
async fn regression_an_unreachable_bucket_degrades_to_the_upstream_and_readyz_says_so() {
    let env = Env::start().await;
    let img = env.image("team/app", 9, 3 * MIB);
    env.relay.set_down(true);
    let proxy = env.replica_via_relay().await;
    assert_eq!(proxy.get("/readyz").await.status(), 503);
    assert_eq!(
        sha256_digest(&blob(&proxy, "team/app", &img.layers[0]).await),
        img.layers[0]
    );
    env.relay.set_down(false);
    assert_eq!(proxy.get("/readyz").await.status(), 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn regression_kill_9_mid_upload_leaves_no_object_and_a_sweep_aborts_the_upload() {
    let env = Env::start().await;
    let digest = env.up.add_blob(random_bytes(20 * MIB, 10));
    // Parts hang: the upload is in progress when the process dies.
    env.relay.fault(Op::UploadPart, Fault::Hang, Limit::Always);
    let dir = tempfile::tempdir().unwrap();
    let mut binary = Entrepot::start_with_storage(
        dir.path(),
        &env.storage(&env.relay.endpoint()),
        &upstream("fake", &env.up.url(), true, ""),
    )
    .await
    .unwrap();
    // The client is served from the local copy while the upload hangs.
    let url = format!("http://{}/v2/team/app/blobs/{digest}", binary.host());
    common::get_blob(&common::client(), &url, &digest)
        .await
        .unwrap();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    while env.relay.count(Op::UploadPart) == 0 {
        assert!(tokio::time::Instant::now() < deadline, "no part was sent");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    binary.kill();

    assert!(
        env.object(&digest).await.is_none(),
        "an incomplete upload is visible"
    );
    let records = env.keys("meta/uploads").await;
    assert_eq!(records.len(), 1, "the upload in progress is recorded");
    let s3 = env.garage.s3_builder().build().unwrap();
    let record: serde_json::Value = serde_json::from_slice(
        &object_store::ObjectStoreExt::get(&s3, &ObjectPath::from(records[0].as_str()))
            .await
            .unwrap()
            .bytes()
            .await
            .unwrap(),
    )
    .unwrap();
    let (key, id) = (
        record["key"].as_str().unwrap().to_owned(),
        record["id"].as_str().unwrap().to_owned(),
    );

    // Another replica's sweep takes uploads begun over a second ago as abandoned.
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let sweeper = Proxy::start_with(
        &env.storage_with(
            &env.garage.endpoint(),
            "sweep_interval = \"1h\"",
            "abandoned_uploads_after = \"1s\"",
        ),
        &upstream("fake", &env.up.url(), true, ""),
    )
    .await;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    while !env.keys("meta/uploads").await.is_empty() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the sweep left the upload"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // The upload is gone from the bucket: a part for it is refused.
    let part = object_store::multipart::MultipartStore::put_part(
        &s3,
        &ObjectPath::from(key.as_str()),
        &id,
        0,
        Bytes::from_static(b"late").into(),
    )
    .await;
    assert!(part.is_err(), "the abandoned upload still takes parts");
    assert!(env.object(&digest).await.is_none());
    sweeper.stop().await;
}

/// Bytes of blobs in a replica's local tier.
fn local_bytes(proxy: &Proxy) -> u64 {
    let mut total = 0;
    for alg in ["sha256", "sha512"] {
        if let Ok(rd) = std::fs::read_dir(proxy.root.join("blobs").join(alg)) {
            total += rd
                .filter_map(|e| e.ok()?.metadata().ok())
                .map(|m| m.len())
                .sum::<u64>();
        }
    }
    total
}

#[tokio::test]
async fn the_local_tier_keeps_its_bound_while_the_bucket_keeps_everything() {
    let env = Env::start().await;
    let images: Vec<PushedImage> = (0..6)
        .map(|i| env.image(&format!("team/app{i}"), 20 + i, 8 * MIB))
        .collect();
    let proxy = Proxy::start_with(
        &env.storage_with(&env.garage.endpoint(), "max_size = \"30MiB\"", ""),
        &upstream("fake", &env.up.url(), true, ""),
    )
    .await;
    for i in 0..images.len() {
        proxy
            .pull_image(&format!("team/app{i}"), "v1")
            .await
            .unwrap();
    }
    proxy.wait_idle().await;
    common::eventually(
        Duration::from_secs(30),
        "the local tier to shrink under 30 MiB",
        || async { local_bytes(&proxy) <= 30 * MIB as u64 },
    )
    .await;
    assert!(
        env.bucket_bytes().await >= 6 * 8 * MIB as u64,
        "the bucket lost content"
    );
    // The oldest image left the tier, not the cache: it comes back from the bucket.
    assert!(!proxy.blob_path(&images[0].layers[0]).exists());
    let asked = env.up.requests().len();
    proxy.pull_image("team/app0", "v1").await.unwrap();
    assert_eq!(env.up.requests().len(), asked, "the upstream was asked");
}

#[tokio::test]
async fn the_bucket_keeps_its_own_bound_evicting_least_recently_used_images() {
    let env = Env::start().await;
    let images: Vec<PushedImage> = (0..6)
        .map(|i| env.image(&format!("team/app{i}"), 30 + i, 8 * MIB))
        .collect();
    let proxy = Proxy::start_with(
        &env.storage_with(
            &env.garage.endpoint(),
            "sweep_interval = \"1s\"",
            "max_size = \"30MiB\"\neviction_grace = \"0s\"",
        ),
        &upstream("fake", &env.up.url(), true, ""),
    )
    .await;
    for i in 0..images.len() {
        proxy
            .pull_image(&format!("team/app{i}"), "v1")
            .await
            .unwrap();
    }
    proxy.wait_idle().await;
    common::eventually(
        Duration::from_secs(30),
        "the bucket to shrink under 30 MiB",
        || async { env.bucket_bytes().await <= 30 * MIB as u64 },
    )
    .await;
    let mut kept = Vec::new();
    for (i, img) in images.iter().enumerate() {
        if env.object(&img.manifest).await.is_some() {
            kept.push(i);
        }
    }
    assert_eq!(kept, [3, 4, 5], "the images pulled last stay, whole");
    for img in &images[3..] {
        assert!(env.object(&img.layers[0]).await.is_some());
    }
    assert_eq!(
        env.keys("meta/tags").await.len(),
        3,
        "evicted images' tags go with them"
    );
}

#[tokio::test]
async fn with_redirect_committed_blobs_are_answered_with_a_presigned_get() {
    let env = Env::start().await;
    let img = env.image("team/app", 40, 12 * MIB);
    let proxy = Proxy::start_with(
        &env.storage_with(&env.garage.endpoint(), "", "redirect = true"),
        &upstream("fake", &env.up.url(), true, ""),
    )
    .await;
    let url = proxy.url(&format!("/v2/team/app/blobs/{}", img.layers[0]));
    let direct = common::client_no_redirect();
    // Cold: the fill streams the blob (no redirect before the bucket has it).
    common::get_blob(&direct, &url, &img.layers[0])
        .await
        .unwrap();
    proxy.wait_idle().await;

    // Committed: a 307 to a presigned GET on the bucket, which serves the right bytes.
    let r = direct.get(&url).send().await.unwrap();
    assert_eq!(r.status(), 307);
    let location = r.headers()["location"].to_str().unwrap().to_owned();
    assert!(location.starts_with(&env.garage.endpoint()), "{location}");
    assert!(location.contains("X-Amz-Signature"), "{location}");
    common::get_blob(&common::client(), &url, &img.layers[0])
        .await
        .unwrap();
    // HEAD and the other blobs' metadata are still answered by the proxy itself.
    assert_eq!(
        proxy
            .head(&format!("/v2/team/app/blobs/{}", img.layers[0]))
            .await
            .status(),
        200
    );
    assert_eq!(env.up.count("GET", "/blobs/"), 1);
}

#[tokio::test]
async fn regression_a_bucket_lost_mid_fill_leaves_the_client_served_from_the_upstream() {
    let env = Env::start().await;
    let img = env.layer_in_bucket(50, 24 * MIB).await;
    // The second replica fills from the bucket; after the first 8 MiB every read fails.
    env.relay
        .fault(Op::GetObject, Fault::Close, Limit::After(1));
    let second = env.replica_via_relay().await;
    let asked = env.up.count("GET", "/blobs/");
    assert_eq!(
        sha256_digest(&blob(&second, "team/app", &img.layers[0]).await),
        img.layers[0]
    );
    assert!(env.relay.count(Op::GetObject) >= 2, "{:?}", env.relay.ops());
    // The rest came from the upstream, as a range.
    assert_eq!(env.up.count("GET", "/blobs/"), asked + 1);
}

#[tokio::test]
async fn regression_refused_credentials_degrade_to_the_upstream_and_store_nothing() {
    let env = Env::start().await;
    let img = env.image("team/app", 51, 12 * MIB);
    let storage = env
        .storage(&env.garage.endpoint())
        .replace(env.garage.secret_access_key(), &"0".repeat(64));
    let proxy = Proxy::start_with(&storage, &upstream("fake", &env.up.url(), true, "")).await;
    proxy.pull_image("team/app", "v1").await.unwrap();
    proxy.wait_idle().await;
    assert!(env.keys("blobs").await.is_empty());
    assert!(
        proxy.blob_path(&img.layers[0]).exists(),
        "the replica keeps its verified local copy"
    );
    assert_eq!(proxy.get("/readyz").await.status(), 503);
}
