//! End to end on the S3 backend with real programs: a `docker-registry` upstream seeded by
//! `skopeo`, a single-node Garage as the bucket, and two `entrepot` binaries with their own
//! local roots sharing it. The first fills the bucket; the second, started cold after the
//! upstream is gone, serves the image from the bucket alone — to skopeo, to containerd
//! (`hosts.toml`, `?ns=`) and to podman (`registries.conf`, path prefix).
//!
//! Needs `docker-registry`, `skopeo`, `containerd`, `podman` and `garage`
//! (`bash .ci/install-deps.sh`, `bash .ci/install-garage.sh`).

mod common;

use anyhow::{ensure, Context as _, Result};
use common::clients::{registries_conf, write_hosts_toml, Containerd, Podman};
use common::garage::Garage;
use common::real::{require_programs, run_scenario, DockerRegistry, Entrepot, SeedImage, TAG_TTL};
use common::{sha256_digest, upstream};
use object_store::path::Path as ObjectPath;
use object_store::ObjectStoreExt as _;

struct Env {
    garage: Garage,
    registry: DockerRegistry,
    app: SeedImage,
    work: tempfile::TempDir,
}

impl Env {
    async fn start() -> Result<Self> {
        let work = tempfile::tempdir()?;
        let app = SeedImage::generate(&[3 * 1024 * 1024, 64 * 1024, 1000]);
        let registry =
            DockerRegistry::seeded("docker-registry", work.path(), &app, "team/app:1.0").await?;
        let garage = Garage::start().await?;
        Ok(Self {
            garage,
            registry,
            app,
            work,
        })
    }

    /// An entrepot binary with its own local root under `name`, on the shared bucket, whose
    /// upstream is named `reg`.
    async fn replica(&self, name: &str) -> Result<Entrepot> {
        self.replica_named(name, "reg").await
    }

    /// [`Env::replica`] with the upstream named `upstream_name`.
    async fn replica_named(&self, name: &str, upstream_name: &str) -> Result<Entrepot> {
        let dir = self.work.path().join(name);
        std::fs::create_dir_all(&dir)?;
        let storage = format!(
            "backend = \"s3\"\n\n[storage.s3]\nendpoint = \"{}\"\nregion = \"{}\"\nbucket = \"{}\"\naccess_key_id = \"{}\"\nsecret_access_key = \"{}\"\n",
            self.garage.endpoint(),
            self.garage.region(),
            self.garage.bucket(),
            self.garage.access_key_id(),
            self.garage.secret_access_key(),
        );
        Entrepot::start_with_storage(
            &dir,
            &storage,
            &upstream(upstream_name, &self.registry.url(), true, TAG_TTL),
        )
        .await
    }

    /// Every blob and the manifest of the seeded image are in the bucket, verified.
    async fn check_bucket(&self) -> Result<()> {
        let s3 = self.garage.s3_builder().build()?;
        for d in self.app.all_digests() {
            let key = ObjectPath::from(format!("blobs/{}", d.replace(':', "/")));
            let bytes = s3
                .get(&key)
                .await
                .with_context(|| format!("{d} is not in the bucket"))?
                .bytes()
                .await?;
            ensure!(
                sha256_digest(&bytes) == d,
                "{d} in the bucket does not hash to its name"
            );
        }
        Ok(())
    }
}

async fn scenario(env: &mut Env) -> Result<()> {
    let first = env.replica("first").await?;
    first
        .pull_checked(env.work.path(), "cold", "reg/team/app:1.0", &env.app)
        .await?;
    first.check_stored(env.app.blob_digests()).await?;
    env.check_bucket().await?;

    env.registry.stop();
    let second = env.replica("second").await?;
    second
        .pull_checked(env.work.path(), "from-bucket", "reg/team/app:1.0", &env.app)
        .await
        .with_context(|| format!("second replica's log:\n{}", second.output()))?;
    // It keeps local copies of what it served.
    second.check_stored(env.app.blob_digests()).await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn skopeo_pulls_through_replicas_sharing_a_garage_bucket() {
    require_programs(&["docker-registry", "skopeo"]);
    run_scenario(Env::start(), scenario).await;
}

/// containerd pulls through a cold replica whose only source is the bucket.
async fn containerd_scenario(env: &mut Env) -> Result<()> {
    // containerd names the upstream by the registry host (`?ns=`).
    let host = env.registry.host();
    let first = env.replica_named("first", &host).await?;
    let hosts_dir = env.work.path().join("certs.d");
    let reference = format!("{host}/team/app:1.0");
    write_hosts_toml(&hosts_dir, &host, &first.host())?;
    let hosts = hosts_dir.to_str().expect("utf-8 temp path");
    let cold = Containerd::start(&env.work.path().join("containerd-cold")).await?;
    cold.ctr(&["content", "fetch", "--hosts-dir", hosts, &reference])
        .await?;
    drop(cold);
    env.check_bucket().await?;

    env.registry.stop();
    let second = env.replica_named("second", &host).await?;
    write_hosts_toml(&hosts_dir, &host, &second.host())?;
    let warm = Containerd::start(&env.work.path().join("containerd-warm")).await?;
    warm.ctr(&[
        "images",
        "pull",
        "--snapshotter",
        "native",
        "--hosts-dir",
        hosts,
        &reference,
    ])
    .await
    .with_context(|| format!("second replica's log:\n{}", second.output()))?;
    let have = warm.content_digests().await?;
    for d in env.app.all_digests() {
        ensure!(have.contains(&d), "containerd lacks {d}");
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn containerd_pulls_through_a_replica_that_has_only_the_bucket() {
    require_programs(&["docker-registry", "skopeo", "containerd", "ctr"]);
    run_scenario(Env::start(), containerd_scenario).await;
}

/// podman pulls through a cold replica whose only source is the bucket.
async fn podman_scenario(env: &mut Env) -> Result<()> {
    const UPSTREAM: &str = "reg-a.test";
    let registry = env.registry.host();
    let reference = format!("{registry}/team/app:1.0");
    let work = env.work.path().to_owned();
    // A podman with empty storage whose mirror for the registry is `proxy`.
    let podman = |label: &str, proxy: &Entrepot| -> Result<Podman> {
        let conf = work.join(format!("{label}-registries.conf"));
        std::fs::write(
            &conf,
            registries_conf(&registry, &format!("{}/{UPSTREAM}", proxy.host())),
        )?;
        Podman::new(&work.join(label), &conf)
    };
    let first = env.replica_named("first", UPSTREAM).await?;
    podman("podman-cold", &first)?.pull(&reference).await?;
    env.check_bucket().await?;

    env.registry.stop();
    let second = env.replica_named("second", UPSTREAM).await?;
    let warm = podman("podman-warm", &second)?;
    warm.pull(&reference)
        .await
        .with_context(|| format!("second replica's log:\n{}", second.output()))?;
    let digest = warm.image_digest(&reference).await?;
    ensure!(digest == env.app.manifest.digest, "podman has {digest}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn podman_pulls_through_a_replica_that_has_only_the_bucket() {
    require_programs(&["docker-registry", "skopeo", "podman"]);
    run_scenario(Env::start(), podman_scenario).await;
}
