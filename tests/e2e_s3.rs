//! End to end on the S3 backend with real programs: a `docker-registry` upstream seeded by
//! `skopeo`, a single-node Garage as the bucket, and two `entrepot` binaries with their own
//! local roots sharing it. The first fills the bucket; the second, started cold after the
//! upstream is gone, serves the image from the bucket alone.
//!
//! Needs `docker-registry`, `skopeo` and `garage` (`bash .ci/install-deps.sh`,
//! `bash .ci/install-garage.sh`).

mod common;

use anyhow::{ensure, Context as _, Result};
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

    /// An entrepot binary with its own local root under `name`, on the shared bucket.
    async fn replica(&self, name: &str) -> Result<Entrepot> {
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
            &upstream("reg", &self.registry.url(), true, TAG_TTL),
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
