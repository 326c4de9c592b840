//! End to end with a multi-platform image: an OCI image index (linux/amd64 and linux/arm64, each
//! with its own config and two layers) pushed to a real `docker-registry` with `skopeo copy
//! --all`, then pulled through the `entrepot` binary:
//!
//! 1. cold, `--all`: every child manifest and blob arrives with its digest, and entrepot's store
//!    holds a verified copy of each;
//! 2. warm, `--all`: served with zero upstream requests, counted in docker-registry's access log
//!    (entrepot's requests are the ones with its `entrepot/<version>` User-Agent);
//! 3. one platform (`--override-arch arm64`), by the bare name through the default upstream:
//!    the arm64 image only, again with zero upstream requests;
//! 4. with docker-registry killed, `--all` once more: the cache alone answers, and the log of the
//!    dead registry confirms that only the cold pull ever reached it.
//!
//! Needs `docker-registry` and `skopeo` on PATH (`bash .ci/install-deps.sh`).

mod common;

use anyhow::{ensure, Context, Result};
use common::oci_e2e::{read_index_layout, MultiArchImage, PulledIndex};
use common::real::{
    parse_access_log, read_layout, require_programs, run_scenario, verified_blob, AccessLine,
    DockerRegistry, Entrepot, SkopeoCopy, TAG_TTL,
};
use common::upstream;

const UPSTREAM: &str = "up";
const REPOSITORY: &str = "multi/app";
const TAG: &str = "1.0";
const PLATFORMS: &[(&str, &str)] = &[("linux", "amd64"), ("linux", "arm64")];
/// Two layers per platform: one big enough to stream in several chunks, one small.
const LAYER_SIZES: &[usize] = &[768 * 1024, 3000];
/// `skopeo copy --all`: the index and every platform's image.
const ALL: SkopeoCopy = SkopeoCopy {
    flags: &["--all"],
    ..SkopeoCopy::DEFAULT
};

/// Field order is drop order: the processes go first, while the working directory with their
/// logs still exists to be printed if the test failed.
struct Env {
    entrepot: Entrepot,
    registry: DockerRegistry,
    image: MultiArchImage,
    work: tempfile::TempDir,
}

impl Env {
    async fn start() -> Result<Self> {
        let work = tempfile::tempdir()?;
        let registry = DockerRegistry::start("docker-registry").await?;
        let image = MultiArchImage::generate(PLATFORMS, LAYER_SIZES);
        let layout = work.path().join("seed");
        image.write_layout(&layout, TAG)?;
        ALL.copy(
            &format!("oci:{}:{TAG}", layout.display()),
            &format!("docker://{}/{REPOSITORY}:{TAG}", registry.host()),
        )
        .await
        .context("seeding docker-registry")?;

        let upstreams = upstream(UPSTREAM, &registry.url(), true, TAG_TTL);
        let entrepot = Entrepot::start(work.path(), &upstreams).await?;
        Ok(Self {
            entrepot,
            registry,
            image,
            work,
        })
    }

    /// `docker://<entrepot>/up/multi/app:1.0`
    fn by_prefix(&self) -> String {
        format!(
            "docker://{}/{UPSTREAM}/{REPOSITORY}:{TAG}",
            self.entrepot.host()
        )
    }

    /// `docker://<entrepot>/multi/app:1.0`, through the default upstream.
    fn by_bare_name(&self) -> String {
        format!("docker://{}/{REPOSITORY}:{TAG}", self.entrepot.host())
    }

    /// `skopeo copy --all <source> oci:<work>/<label>:1.0`, then checks that the layout holds
    /// the seeded index, every child manifest and every blob, all by their digests.
    async fn pull_all(&self, label: &str, source: &str) -> Result<()> {
        let out = self.work.path().join(label);
        ALL.copy(source, &format!("oci:{}:{TAG}", out.display()))
            .await
            .with_context(|| format!("{label}: pulling {source}"))?;
        let pulled = read_index_layout(&out, TAG).with_context(|| format!("{label}: layout"))?;
        self.expect_same_index(label, &pulled)
    }

    fn expect_same_index(&self, label: &str, pulled: &PulledIndex) -> Result<()> {
        ensure!(
            pulled.index_digest == self.image.index.digest,
            "{label}: pulled index {} but seeded {}",
            pulled.index_digest,
            self.image.index.digest
        );
        ensure!(
            pulled.children.len() == self.image.images.len(),
            "{label}: {} child manifests pulled, {} seeded",
            pulled.children.len(),
            self.image.images.len()
        );
        for (got, want) in pulled.children.iter().zip(&self.image.images) {
            ensure!(
                (got.os.as_str(), got.architecture.as_str()) == (want.os, want.architecture),
                "{label}: child {got:?} where {}/{} was seeded",
                want.os,
                want.architecture
            );
            ensure!(
                got.manifest_digest == want.manifest.digest,
                "{label}: {}/{} manifest {} but seeded {}",
                want.os,
                want.architecture,
                got.manifest_digest,
                want.manifest.digest
            );
            ensure!(
                got.blob_digests == want.blob_digests(),
                "{label}: {}/{} blobs {:?} but seeded {:?}",
                want.os,
                want.architecture,
                got.blob_digests,
                want.blob_digests()
            );
        }
        Ok(())
    }

    /// Entrepot's store holds the index, both manifests, both configs and all four layers,
    /// each hashing to its name.
    fn expect_all_stored(&self) -> Result<()> {
        for digest in self.image.all_digests() {
            verified_blob(&self.entrepot.store, &digest)
                .with_context(|| format!("{digest} in entrepot's store"))?;
        }
        Ok(())
    }

    /// What entrepot asked the upstream for after the first `mark` of its requests.
    fn upstream_requests_since(&self, mark: usize) -> Vec<AccessLine> {
        self.registry
            .requests_from_entrepot()
            .into_iter()
            .skip(mark)
            .collect()
    }
}

fn list(requests: &[AccessLine]) -> String {
    requests
        .iter()
        .map(|r| format!("\n  {r}"))
        .collect::<String>()
}

async fn scenario(env: &mut Env) -> Result<()> {
    // 1. Cold: everything comes from the upstream, once.
    env.pull_all("cold-all", &env.by_prefix()).await?;
    env.expect_all_stored()?;
    let cold = env.registry.requests_from_entrepot();
    // The log must show the cold pull, or an empty count below would prove nothing.
    for image in &env.image.images {
        for digest in std::iter::once(&image.manifest.digest).chain(&image.blob_digests()) {
            ensure!(
                cold.iter().any(|r| r.target.ends_with(digest.as_str())),
                "docker-registry's log shows no request of entrepot for {digest}:{}",
                list(&cold)
            );
        }
    }

    // 2. Warm: the same pull again, upstream still up, must not reach it at all.
    env.pull_all("warm-all", &env.by_prefix()).await?;
    let warm = env.upstream_requests_since(cold.len());
    ensure!(
        warm.is_empty(),
        "the warm --all pull reached the upstream {} times:{}",
        warm.len(),
        list(&warm)
    );

    // 3. One platform, by the bare name (default upstream, same cache entries).
    let out = env.work.path().join("warm-arm64");
    let arm64_only = SkopeoCopy {
        global: &["--override-arch", "arm64", "--override-os", "linux"],
        ..SkopeoCopy::default()
    };
    arm64_only
        .copy(&env.by_bare_name(), &format!("oci:{}:{TAG}", out.display()))
        .await
        .context("single-platform pull")?;
    let pulled = read_layout(&out, TAG).context("single-platform layout")?;
    let arm64 = env.image.platform("arm64");
    pulled.expect(
        "--override-arch arm64",
        &arm64.manifest.digest,
        &arm64.blob_digests(),
    )?;
    let single = env.upstream_requests_since(cold.len());
    ensure!(
        single.is_empty(),
        "the cached single-platform pull reached the upstream:{}",
        list(&single)
    );

    // 4. Upstream gone: the cache alone answers. The dead registry's log is complete now.
    env.registry.stop();
    env.pull_all("offline-all", &env.by_prefix()).await?;
    let after = env.upstream_requests_since(cold.len());
    ensure!(
        after.is_empty(),
        "after the cold pull entrepot sent the upstream:{}",
        list(&after)
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn multi_platform_index_pulls_through_entrepot_then_from_cache_alone() {
    require_programs(&["docker-registry", "skopeo"]);
    run_scenario(Env::start(), scenario).await;
}

/// The upstream request count rests on this parser: pin it to docker-registry 2.8's format.
#[test]
fn parses_docker_registry_access_lines() {
    let log = r#"time="2026-11-21T12:50:03Z" level=info msg="response completed" http.request.method=GET http.request.uri="/v2/r/x/tags/list?n=0"
127.0.0.1 - - [21/Nov/2026:12:50:03 +0000] "GET /v2/r/x/tags/list?n=0 HTTP/1.1" 200 49 "" "entrepot/0.1.0"
127.0.0.1 - - [21/Nov/2026:12:50:03 +0000] "HEAD /v2/r/x/manifests/nope HTTP/1.1" 404 94 "" "curl/7.88.1"
"#;
    let line = |method: &str, target: &str, status, user_agent: &str| AccessLine {
        method: method.into(),
        target: target.into(),
        status,
        user_agent: user_agent.into(),
    };
    assert_eq!(
        parse_access_log(log),
        vec![
            line("GET", "/v2/r/x/tags/list?n=0", 200, "entrepot/0.1.0"),
            line("HEAD", "/v2/r/x/manifests/nope", 404, "curl/7.88.1"),
        ]
    );
}
