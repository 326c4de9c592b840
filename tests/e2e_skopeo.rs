//! End to end with real programs: two `docker-registry` upstreams seeded by `skopeo`, then
//! `skopeo` pulling through the `entrepot` binary by path prefix, by bare name through the
//! default upstream, and once more from the cache after both upstreams have been killed.
//!
//! Needs `docker-registry` and `skopeo` on PATH; without them the test fails and says to run
//! `bash .ci/install-deps.sh`.

mod common;

use anyhow::Result;
use common::real::{require_programs, run_scenario, DockerRegistry, Entrepot, SeedImage, TAG_TTL};
use common::upstream;

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
        let app = SeedImage::generate(&[BIG_LAYER, 64 * 1024, 1000]);
        let tool = SeedImage::generate(&[2 * 1024 * 1024 + 17, 4096]);
        let reg_a =
            DockerRegistry::seeded("docker-registry-a", work.path(), &app, "team/app-a:1.0")
                .await?;
        let reg_b =
            DockerRegistry::seeded("docker-registry-b", work.path(), &tool, "library/tool:2.0")
                .await?;

        let upstreams = upstream("reg-a", &reg_a.url(), true, TAG_TTL)
            + &upstream("reg-b", &reg_b.url(), false, TAG_TTL);
        let entrepot = Entrepot::start(work.path(), &upstreams).await?;
        Ok(Self {
            entrepot,
            reg_a,
            reg_b,
            app,
            tool,
            work,
        })
    }

    /// Pulls `reference` through entrepot into a fresh OCI layout and checks that the image is
    /// the seeded one, blob for blob, and that entrepot's store holds a verified copy of each
    /// blob and of the manifest, named by digest.
    async fn pull_and_check(
        &self,
        label: &str,
        reference: &str,
        expected: &SeedImage,
    ) -> Result<()> {
        self.entrepot
            .pull_and_check(self.work.path(), label, reference, expected)
            .await
    }
}

async fn scenario(env: &mut Env) -> Result<()> {
    // Cold: every pull goes to an upstream. The bare name resolves through the default
    // upstream (reg-a) to the same image as the reg-a prefix.
    env.pull_and_check("cold-reg-a", "reg-a/team/app-a:1.0", &env.app)
        .await?;
    env.pull_and_check("cold-reg-b", "reg-b/library/tool:2.0", &env.tool)
        .await?;
    env.pull_and_check("cold-default", "team/app-a:1.0", &env.app)
        .await?;

    // Warm: with both upstreams gone, the cache alone must answer (tag TTL 5m not expired).
    env.reg_a.stop();
    env.reg_b.stop();
    env.pull_and_check("warm-reg-a", "reg-a/team/app-a:1.0", &env.app)
        .await?;
    env.pull_and_check("warm-reg-b", "reg-b/library/tool:2.0", &env.tool)
        .await?;
    env.pull_and_check("warm-default", "team/app-a:1.0", &env.app)
        .await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn skopeo_pulls_through_entrepot_and_from_cache_once_upstreams_are_gone() {
    require_programs(&["docker-registry", "skopeo"]);
    run_scenario(Env::start(), scenario).await;
}
