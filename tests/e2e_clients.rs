//! End to end with the real clients entrepot is for, each in the mode a user would configure:
//!
//! - containerd (`ctr`) with a `hosts.toml` mirror per registry: entrepot picks the upstream
//!   from the `?ns=<registry>` containerd adds to every mirror request;
//! - podman with a `registries.conf` mirror `<proxy>/<upstream-name>`: the first path component
//!   picks the upstream;
//! - docker's `registry-mirrors`: bare names through the default upstream, `docker.io`
//!   single-component names gaining `library/`.
//!
//! Each upstream is a real `docker-registry` whose access log shows every request that reached it
//! and its User-Agent: a client that went around the proxy (a mirror failure makes containerd and
//! podman fall back to the registry itself) shows up there and fails the test. Warm pulls from
//! fresh client storage must cause no upstream request at all, and must still work once the
//! upstreams are killed.
//!
//! Needs docker-registry, skopeo, containerd and podman: `bash .ci/install-deps.sh`.

mod common;

use std::path::PathBuf;

use anyhow::{ensure, Context, Result};
use common::clients::{registries_conf, write_hosts_toml, Containerd, Podman};
use common::real::{
    require_programs, run_scenario, AccessLine, DockerRegistry, Entrepot, SeedImage, TAG_TTL,
};
use common::upstream;

/// Large enough that entrepot streams it in many chunks.
const BIG_LAYER: usize = 2 * 1024 * 1024;

/// Fails if any of `requests` (to an upstream) came from something other than entrepot.
fn only_from_entrepot(label: &str, requests: &[AccessLine]) -> Result<()> {
    let bypass: Vec<_> = requests.iter().filter(|r| !r.sent_by_entrepot()).collect();
    ensure!(
        bypass.is_empty(),
        "{label}: the client went around entrepot to the upstream: {bypass:#?}"
    );
    Ok(())
}

/// Fails unless `requests` include `method target` answered 200 (HEAD or GET when `method` is
/// `None`).
fn saw(label: &str, requests: &[AccessLine], method: Option<&str>, target: &str) -> Result<()> {
    let found = requests
        .iter()
        .any(|r| r.target == target && r.status == 200 && method.is_none_or(|m| r.method == m));
    ensure!(
        found,
        "{label}: upstream never answered {} {target}; it saw {requests:#?}",
        method.unwrap_or("HEAD/GET")
    );
    Ok(())
}

/// Fails unless entrepot fetched `image` from the upstream as `repo` with `tag`: the tag's
/// manifest and every blob.
fn fetched_through_entrepot(
    label: &str,
    requests: &[AccessLine],
    repo: &str,
    tag: &str,
    image: &SeedImage,
) -> Result<()> {
    only_from_entrepot(label, requests)?;
    saw(
        label,
        requests,
        None,
        &format!("/v2/{repo}/manifests/{tag}"),
    )?;
    for digest in image.blob_digests() {
        saw(
            label,
            requests,
            Some("GET"),
            &format!("/v2/{repo}/blobs/{digest}"),
        )?;
    }
    Ok(())
}

fn no_requests(label: &str, requests: &[AccessLine]) -> Result<()> {
    ensure!(
        requests.is_empty(),
        "{label}: a warm pull still reached the upstream: {requests:#?}"
    );
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// containerd, hosts.toml mirror mode

/// Field order is drop order: processes first, then the folder holding their logs.
struct ContainerdEnv {
    entrepot: Entrepot,
    reg_a: DockerRegistry,
    reg_b: DockerRegistry,
    app: SeedImage,
    tool: SeedImage,
    hosts_dir: PathBuf,
    work: tempfile::TempDir,
}

impl ContainerdEnv {
    async fn start() -> Result<Self> {
        let work = tempfile::tempdir()?;
        let app = SeedImage::generate(&[BIG_LAYER, 64 * 1024, 1000]);
        let tool = SeedImage::generate(&[300 * 1024, 4096]);
        let reg_a =
            DockerRegistry::seeded("docker-registry-a", work.path(), &app, "team/app:1.0").await?;
        let reg_b =
            DockerRegistry::seeded("docker-registry-b", work.path(), &tool, "tools/tool:2.0")
                .await?;

        // Upstream names are the registry hosts containerd sends as `ns=`. There is no default
        // upstream, so a request without `ns=` would select nothing.
        let upstreams = upstream(&reg_a.host(), &reg_a.url(), false, TAG_TTL)
            + &upstream(&reg_b.host(), &reg_b.url(), false, TAG_TTL);
        let entrepot = Entrepot::start(work.path(), &upstreams).await?;

        let hosts_dir = work.path().join("certs.d");
        write_hosts_toml(&hosts_dir, &reg_a.host(), &entrepot.host())?;
        write_hosts_toml(&hosts_dir, &reg_b.host(), &entrepot.host())?;
        Ok(Self {
            entrepot,
            reg_a,
            reg_b,
            app,
            tool,
            hosts_dir,
            work,
        })
    }

    fn app_ref(&self) -> String {
        format!("{}/team/app:1.0", self.reg_a.host())
    }

    fn tool_ref(&self) -> String {
        format!("{}/tools/tool:2.0", self.reg_b.host())
    }

    /// A containerd with an empty content store (content is shared between namespaces, so a
    /// fresh pull needs a fresh daemon).
    async fn containerd(&self, label: &str) -> Result<Containerd> {
        Containerd::start(&self.work.path().join(label)).await
    }

    /// A fresh containerd (see [`ContainerdEnv::containerd`]) that has run
    /// `ctr <command> --hosts-dir <hosts> <reference>` for both images.
    async fn both(&self, label: &str, command: &[&str]) -> Result<Containerd> {
        let containerd = self.containerd(&format!("containerd-{label}")).await?;
        let hosts_dir = self.hosts_dir.to_str().expect("utf-8 temp path");
        for reference in [self.app_ref(), self.tool_ref()] {
            let args = [command, &["--hosts-dir", hosts_dir, &reference]].concat();
            containerd
                .ctr(&args)
                .await
                .with_context(|| format!("{label}: ctr {} {reference}", command.join(" ")))?;
        }
        Ok(containerd)
    }

    /// Checks that `containerd` holds every blob of both images.
    async fn check_content(&self, label: &str, containerd: &Containerd) -> Result<()> {
        let have = containerd.content_digests().await?;
        for image in [&self.app, &self.tool] {
            let wanted = std::iter::once(image.manifest.digest.clone()).chain(image.blob_digests());
            for digest in wanted {
                ensure!(
                    have.contains(&digest),
                    "{label}: containerd's content store lacks {digest}; it has {have:?}"
                );
            }
        }
        Ok(())
    }
}

async fn containerd_scenario(env: &mut ContainerdEnv) -> Result<()> {
    let seeded_a = env.reg_a.requests().len();
    let seeded_b = env.reg_b.requests().len();

    // Cold: `ctr content fetch` resolves the tag (HEAD) and fetches manifest and blobs, all
    // through entrepot, which fetches each once from the upstream named by `ns=`.
    let cold = env.both("cold", &["content", "fetch"]).await?;
    let cold_a = env.reg_a.requests_since(seeded_a);
    let cold_b = env.reg_b.requests_since(seeded_b);
    fetched_through_entrepot("cold reg-a", &cold_a, "team/app", "1.0", &env.app)?;
    fetched_through_entrepot("cold reg-b", &cold_b, "tools/tool", "2.0", &env.tool)?;
    env.check_content("cold", &cold).await?;
    let cached = |image: &SeedImage| env.entrepot.check_stored(image.all_digests());
    cached(&env.app).await.context("cold: app")?;
    cached(&env.tool).await.context("cold: tool")?;
    drop(cold);

    // Warm, fresh containerd, the full `ctr images pull` (fetch + unpack into the native
    // snapshotter): entrepot answers the tag within its TTL and every blob from its store.
    let warm = env
        .both("warm", &["images", "pull", "--snapshotter", "native"])
        .await?;
    env.check_content("warm", &warm).await?;
    no_requests(
        "warm reg-a",
        &env.reg_a.requests_since(seeded_a + cold_a.len()),
    )?;
    no_requests(
        "warm reg-b",
        &env.reg_b.requests_since(seeded_b + cold_b.len()),
    )?;
    drop(warm);

    // Upstreams gone: containerd's fallback to the registry itself would be refused, so only
    // entrepot can answer.
    env.reg_a.stop();
    env.reg_b.stop();
    let offline = env.both("offline", &["content", "fetch"]).await?;
    env.check_content("offline", &offline).await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn containerd_pulls_two_registries_through_hosts_toml_mirror() {
    require_programs(&["docker-registry", "skopeo", "containerd", "ctr"]);
    run_scenario(ContainerdEnv::start(), containerd_scenario).await;
}

// ---------------------------------------------------------------------------------------------
// podman, registries.conf mirror mode

struct PodmanEnv {
    entrepot: Entrepot,
    registry: DockerRegistry,
    app: SeedImage,
    registries_conf: PathBuf,
    work: tempfile::TempDir,
}

/// The upstream's name in entrepot and the mirror location's first path component. It must
/// be a valid repository path component (lower case, digits, '.', '-'): podman puts it in the
/// path, `127.0.0.1:<proxy>/reg-a.test/team/app`.
const PODMAN_UPSTREAM: &str = "reg-a.test";

impl PodmanEnv {
    async fn start() -> Result<Self> {
        let work = tempfile::tempdir()?;
        let app = SeedImage::generate(&[BIG_LAYER, 64 * 1024, 1000]);
        let registry =
            DockerRegistry::seeded("docker-registry-a", work.path(), &app, "team/app:1.0").await?;
        let upstreams = upstream(PODMAN_UPSTREAM, &registry.url(), false, TAG_TTL);
        let entrepot = Entrepot::start(work.path(), &upstreams).await?;
        let conf = work.path().join("registries.conf");
        std::fs::write(
            &conf,
            registries_conf(
                &registry.host(),
                &format!("{}/{PODMAN_UPSTREAM}", entrepot.host()),
            ),
        )?;
        Ok(Self {
            entrepot,
            registry,
            app,
            registries_conf: conf,
            work,
        })
    }

    fn app_ref(&self) -> String {
        format!("{}/team/app:1.0", self.registry.host())
    }

    /// Pulls the app with empty podman storage and checks podman has the seeded manifest.
    async fn pull(&self, label: &str) -> Result<()> {
        let podman = Podman::new(&self.work.path().join(label), &self.registries_conf)?;
        let reference = self.app_ref();
        podman
            .pull(&reference)
            .await
            .with_context(|| format!("{label}: podman pull {reference}"))?;
        let digest = podman.image_digest(&reference).await?;
        ensure!(
            digest == self.app.manifest.digest,
            "{label}: podman has manifest {digest}, seeded {}",
            self.app.manifest.digest
        );
        Ok(())
    }
}

async fn podman_scenario(env: &mut PodmanEnv) -> Result<()> {
    let seeded = env.registry.requests().len();

    env.pull("podman-cold").await?;
    let cold = env.registry.requests_since(seeded);
    fetched_through_entrepot("cold", &cold, "team/app", "1.0", &env.app)?;
    env.entrepot
        .check_stored(env.app.all_digests())
        .await
        .context("cold")?;

    env.pull("podman-warm").await?;
    no_requests("warm", &env.registry.requests_since(seeded + cold.len()))?;

    // With the registry gone podman's fallback to it fails: only the mirror can answer.
    env.registry.stop();
    env.pull("podman-offline").await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn podman_pulls_through_registries_conf_mirror() {
    require_programs(&["docker-registry", "skopeo", "podman"]);
    run_scenario(PodmanEnv::start(), podman_scenario).await;
}

// ---------------------------------------------------------------------------------------------
// docker `registry-mirrors`: bare names through the default upstream

struct DockerMirrorEnv {
    entrepot: Entrepot,
    registry: DockerRegistry,
    tool: SeedImage,
    work: tempfile::TempDir,
}

impl DockerMirrorEnv {
    async fn start() -> Result<Self> {
        let work = tempfile::tempdir()?;
        // Stands in for Docker Hub: official images live under `library/`.
        let tool = SeedImage::generate(&[BIG_LAYER, 4096]);
        let registry = DockerRegistry::seeded(
            "docker-registry-hub",
            work.path(),
            &tool,
            "library/tool:2.0",
        )
        .await?;
        let upstreams = upstream("docker.io", &registry.url(), true, TAG_TTL);
        let entrepot = Entrepot::start(work.path(), &upstreams).await?;
        Ok(Self {
            entrepot,
            registry,
            tool,
            work,
        })
    }

    /// `skopeo copy docker://<entrepot>/<name>` into a fresh layout; checks it is the seeded
    /// image.
    async fn pull(&self, label: &str, name: &str) -> Result<()> {
        self.entrepot
            .pull_checked(self.work.path(), label, name, &self.tool)
            .await
    }
}

async fn docker_mirror_scenario(env: &mut DockerMirrorEnv) -> Result<()> {
    let seeded = env.registry.requests().len();

    // There is no docker daemon here. skopeo sends the requests dockerd sends to a
    // `registry-mirrors` entry: `GET /v2/`, then `/v2/<name>/manifests/<tag>` and
    // `/v2/<name>/blobs/<digest>` on the mirror, no registry host in the path. dockerd itself
    // sends `library/tool` for `docker pull tool`; other clients pointed at the mirror (crane,
    // skopeo, `docker pull <mirror>/tool`) send the single component `tool`. Both must reach
    // Docker Hub as `library/tool`, and share one cache entry.
    env.pull("bare-cold", "tool:2.0").await?;
    let cold = env.registry.requests_since(seeded);
    fetched_through_entrepot("bare-cold", &cold, "library/tool", "2.0", &env.tool)?;
    env.entrepot
        .check_stored(env.tool.all_digests())
        .await
        .context("bare-cold")?;
    let unprefixed: Vec<_> = cold
        .iter()
        .filter(|r| r.target.starts_with("/v2/tool/"))
        .collect();
    ensure!(
        unprefixed.is_empty(),
        "entrepot asked the docker.io upstream for `tool` without `library/`: {unprefixed:#?}"
    );

    env.pull("library-warm", "library/tool:2.0").await?;
    env.pull("bare-warm", "tool:2.0").await?;
    no_requests("warm", &env.registry.requests_since(seeded + cold.len()))?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn docker_registry_mirror_bare_names_gain_library_prefix() {
    require_programs(&["docker-registry", "skopeo"]);
    run_scenario(DockerMirrorEnv::start(), docker_mirror_scenario).await;
}
