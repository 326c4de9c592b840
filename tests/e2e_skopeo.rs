//! End to end with real programs: two `docker-registry` upstreams seeded by `skopeo`, then
//! `skopeo` pulling through the `entrepot` binary by path prefix, by bare name through the
//! default upstream, and once more from the cache after both upstreams have been killed.
//!
//! Needs `docker-registry` and `skopeo` on PATH; without them the test fails and says to run
//! `bash .ci/install-deps.sh`.

mod common;

use std::path::Path;

use anyhow::{ensure, Context, Result};
use common::real::{
    file_digest, read_layout, require_program, skopeo_copy, DockerRegistry, Entrepot, SeedImage,
};

/// Larger than any sane buffer, so entrepot has to stream it rather than hold it.
const BIG_LAYER: usize = 3 * 1024 * 1024;

/// Everything the scenario runs. Field order is drop order: the processes go first, while the
/// working directory with their logs still exists to be printed if the test failed.
struct Env {
    entrepot: Entrepot,
    reg_a: DockerRegistry,
    reg_b: DockerRegistry,
    /// `team/app-a:1.0` on reg-a.
    app: SeedImage,
    /// `library/tool:2.0` on reg-b.
    tool: SeedImage,
    work: tempfile::TempDir,
}

impl Env {
    async fn start() -> Result<Self> {
        let work = tempfile::tempdir()?;
        let reg_a = DockerRegistry::start("docker-registry-a").await?;
        let reg_b = DockerRegistry::start("docker-registry-b").await?;

        let app = SeedImage::generate(&[BIG_LAYER, 64 * 1024, 1000]);
        let tool = SeedImage::generate(&[2 * 1024 * 1024 + 17, 4096]);
        seed(work.path(), &app, &reg_a, "team/app-a:1.0").await?;
        seed(work.path(), &tool, &reg_b, "library/tool:2.0").await?;

        let upstreams = format!(
            r#"[[upstream]]
name = "reg-a"
url = "{a}"
default = true
tag_ttl = "5m"

[[upstream]]
name = "reg-b"
url = "{b}"
tag_ttl = "5m"
"#,
            a = reg_a.url(),
            b = reg_b.url(),
        );
        let bin = Path::new(env!("CARGO_BIN_EXE_entrepot"));
        let entrepot = Entrepot::start(bin, work.path(), &upstreams).await?;
        Ok(Self {
            entrepot,
            reg_a,
            reg_b,
            app,
            tool,
            work,
        })
    }
}

/// Pushes `image` to `registry` as `reference` (`repo:tag`) from an OCI layout on disk.
async fn seed(
    work: &Path,
    image: &SeedImage,
    registry: &DockerRegistry,
    reference: &str,
) -> Result<()> {
    let (repo, tag) = reference
        .rsplit_once(':')
        .context("reference needs a tag")?;
    let layout = work.join(format!("seed-{}", repo.replace('/', "-")));
    image.write_layout(&layout, tag)?;
    skopeo_copy(
        &format!("oci:{}:{tag}", layout.display()),
        &format!("docker://{}/{reference}", registry.host()),
    )
    .await
}

/// Pulls `reference` through entrepot into a fresh OCI layout and checks that the image is the
/// seeded one, blob for blob, and that entrepot's store holds a verified copy of each blob and
/// of the manifest, named by digest.
async fn pull_and_check(
    env: &Env,
    label: &str,
    reference: &str,
    expected: &SeedImage,
) -> Result<()> {
    let out = env.work.path().join(format!("pull-{label}"));
    let source = format!("docker://{}/{reference}", env.entrepot.host());
    skopeo_copy(&source, &format!("oci:{}:x", out.display()))
        .await
        .with_context(|| format!("{label}: pulling {source}"))?;

    let pulled = read_layout(&out, "x").with_context(|| format!("{label}: pulled layout"))?;
    ensure!(
        pulled.manifest_digest == expected.manifest.digest,
        "{label}: pulled manifest {} but seeded {}",
        pulled.manifest_digest,
        expected.manifest.digest
    );
    ensure!(
        pulled.blob_digests == expected.blob_digests(),
        "{label}: pulled blobs {:?} but seeded {:?}",
        pulled.blob_digests,
        expected.blob_digests()
    );

    let stored = std::iter::once(&expected.manifest.digest).chain(&pulled.blob_digests);
    for digest in stored {
        let path = env.entrepot.stored_blob(digest);
        ensure!(
            path.is_file(),
            "{label}: {digest} is not in entrepot's store ({} missing)",
            path.display()
        );
        let actual = file_digest(&path)?;
        ensure!(
            &actual == digest,
            "{label}: store file {} hashes to {actual}",
            path.display()
        );
    }
    Ok(())
}

async fn scenario(env: &mut Env) -> Result<()> {
    // Cold: every pull goes to an upstream. The bare name resolves through the default
    // upstream (reg-a) to the same image as the reg-a prefix.
    pull_and_check(env, "cold-reg-a", "reg-a/team/app-a:1.0", &env.app).await?;
    pull_and_check(env, "cold-reg-b", "reg-b/library/tool:2.0", &env.tool).await?;
    pull_and_check(env, "cold-default", "team/app-a:1.0", &env.app).await?;

    // Warm: with both upstreams gone, the cache alone must answer (tag TTL 5m not expired).
    env.reg_a.stop();
    env.reg_b.stop();
    pull_and_check(env, "warm-reg-a", "reg-a/team/app-a:1.0", &env.app).await?;
    pull_and_check(env, "warm-reg-b", "reg-b/library/tool:2.0", &env.tool).await?;
    pull_and_check(env, "warm-default", "team/app-a:1.0", &env.app).await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn skopeo_pulls_through_entrepot_and_from_cache_once_upstreams_are_gone() {
    require_program("docker-registry");
    require_program("skopeo");
    let mut env = Env::start()
        .await
        .unwrap_or_else(|e| panic!("starting the environment: {e:#}"));
    // Panic while `env` is alive, so the processes' output is printed as their guards drop.
    if let Err(e) = scenario(&mut env).await {
        panic!("{e:#}");
    }
}
