//! End to end, the air-gapped site (issue 6, "Done when"), with real programs and the commands
//! of the README's "Air-gapped site" walk-through:
//!
//! 1. two real `docker-registry` upstreams, `a` (a two-platform OCI index and a plain image)
//!    and `b` (a plain image, and one more for later);
//! 2. online: `entrepot prefetch --config online/entrepot.toml --file images.txt` fills a
//!    store, and `entrepot export --config online/entrepot.toml --out bundle.tar` writes every
//!    pinned image and prints a marker;
//! 3. later, online: one more image is pulled through an `entrepot serve` on that store, and
//!    `entrepot export --since <marker> --out delta.tar <image>` writes only what is new;
//! 4. the registries are killed; the site (an empty store, `serve --offline`) refuses a
//!    truncated bundle with its store unchanged, `entrepot import`s the full one, and serves
//!    `skopeo copy` of every image with every digest identical to the upstreams' (checked
//!    against their `Docker-Content-Digest` before they died);
//! 5. a tampered copy of the delta is refused with the site's store unchanged; the real delta
//!    is imported and the site serves that image too.
//!
//! Needs `docker-registry` and `skopeo` on PATH (`bash .ci/install-deps.sh`).

mod common;

use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use anyhow::{bail, ensure, Context, Result};
use common::oci_e2e::{read_index_layout, MultiArchImage};
use common::real::{
    read_layout, require_programs, run_bounded, run_scenario, start_on_free_port, ChildGuard,
    DockerRegistry, Entrepot, SeedImage, SkopeoCopy, TAG_TTL,
};
use common::{sha256_digest, upstream};

const BIN: &str = env!("CARGO_BIN_EXE_entrepot");
/// Ceiling for one entrepot command (prefetch, export, import).
const COMMAND_LIMIT: Duration = Duration::from_secs(120);
const PLATFORMS: &[(&str, &str)] = &[("linux", "amd64"), ("linux", "arm64")];
/// One layer big enough to stream in several chunks, one small.
const LAYER_SIZES: &[usize] = &[600 * 1024, 4000];
const ALL: SkopeoCopy = SkopeoCopy {
    flags: &["--all"],
    ..SkopeoCopy::DEFAULT
};

/// Field order is drop order: the processes go first, while the working directory with their
/// logs still exists to be printed if the test failed.
struct Env {
    registry_a: DockerRegistry,
    registry_b: DockerRegistry,
    multi: MultiArchImage,
    tool: SeedImage,
    svc: SeedImage,
    late: SeedImage,
    work: tempfile::TempDir,
}

impl Env {
    async fn start() -> Result<Self> {
        let work = tempfile::tempdir()?;
        let registry_a = DockerRegistry::start("registry-a").await?;
        let registry_b = DockerRegistry::start("registry-b").await?;
        let multi = MultiArchImage::generate(PLATFORMS, LAYER_SIZES);
        let layout = work.path().join("seed-multi");
        multi.write_layout(&layout, "1.0")?;
        ALL.copy(
            &format!("oci:{}:1.0", layout.display()),
            &format!("docker://{}/multi/app:1.0", registry_a.host()),
        )
        .await
        .context("seeding the index")?;
        let tool = SeedImage::generate(LAYER_SIZES);
        tool.push(work.path(), &registry_a.host(), "team/tool:2.0", None)
            .await?;
        let svc = SeedImage::generate(LAYER_SIZES);
        svc.push(work.path(), &registry_b.host(), "other/svc:1.0", None)
            .await?;
        let late = SeedImage::generate(&[300 * 1024]);
        late.push(work.path(), &registry_b.host(), "other/late:1.0", None)
            .await?;
        Ok(Self {
            registry_a,
            registry_b,
            multi,
            tool,
            svc,
            late,
            work,
        })
    }

    fn path(&self, name: &str) -> PathBuf {
        self.work.path().join(name)
    }

    /// The `[[upstream]]` tables of both sites: the same names, the same (soon dead) URLs.
    fn upstreams(&self) -> String {
        upstream("a", &self.registry_a.url(), true, TAG_TTL)
            + &upstream("b", &self.registry_b.url(), false, TAG_TTL)
    }

    /// Writes `<dir>/entrepot.toml` with its store in `<dir>/store`; returns the file.
    fn write_config(&self, dir: &Path) -> Result<PathBuf> {
        fs::create_dir_all(dir)?;
        let config = dir.join("entrepot.toml");
        fs::write(
            &config,
            format!(
                "[storage]\nroot = {:?}\n\n{}",
                dir.join("store").display().to_string(),
                self.upstreams()
            ),
        )?;
        Ok(config)
    }
}

/// `entrepot <args...>`, bounded; its output (stdout and stderr) whatever the exit status.
async fn entrepot(args: &[&str]) -> Result<(bool, String)> {
    let mut cmd = Command::new(BIN);
    cmd.args(args)
        .env_remove("ENTREPOT_LOG")
        .env_remove("RUST_BACKTRACE");
    let described = format!("entrepot {}", args.join(" "));
    let done = run_bounded(&described, cmd, COMMAND_LIMIT).await?;
    Ok((done.success(), done.output))
}

/// [`entrepot`], failing with its output unless it succeeded.
async fn entrepot_ok(args: &[&str]) -> Result<String> {
    match entrepot(args).await? {
        (true, out) => Ok(out),
        (false, out) => bail!("entrepot {} failed:\n{out}", args.join(" ")),
    }
}

/// `entrepot serve --config <config> --listen 127.0.0.1:<free port> --offline`, ready.
async fn serve_offline(config: &Path, log: &Path) -> Result<(u16, ChildGuard)> {
    start_on_free_port(&[200], |port| {
        let mut cmd = Command::new(BIN);
        cmd.arg("serve").arg("--config").arg(config).args([
            "--listen",
            &format!("127.0.0.1:{port}"),
            "--offline",
        ]);
        ChildGuard::spawn("site entrepot", cmd, log.to_path_buf())
    })
    .await
}

/// Every file under `root` with the digest of its content: equal snapshots, unchanged store.
/// The store's `lock` file (empty; taken by import) is coordination, not content.
fn snapshot(root: &Path) -> Result<BTreeMap<PathBuf, String>> {
    let mut out = BTreeMap::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(dir) = stack.pop() {
        let entries = match fs::read_dir(&dir) {
            Ok(e) => e,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
            Err(e) => return Err(e.into()),
        };
        for entry in entries {
            let path = entry?.path();
            if path.is_dir() {
                stack.push(path);
            } else {
                let rel = path.strip_prefix(root)?.to_path_buf();
                if rel == Path::new("lock") {
                    continue;
                }
                out.insert(rel, sha256_digest(&fs::read(&path)?));
            }
        }
    }
    Ok(out)
}

fn blob_count(root: &Path) -> usize {
    fs::read_dir(root.join("blobs/sha256")).map_or(0, |d| d.count())
}

/// The digest the upstream gives for `repo:tag` (its `Docker-Content-Digest`).
async fn upstream_digest(registry: &DockerRegistry, repo: &str, tag: &str) -> Result<String> {
    let url = format!("{}/v2/{repo}/manifests/{tag}", registry.url());
    let resp = common::client()
        .head(&url)
        .header(
            "accept",
            "application/vnd.oci.image.index.v1+json, application/vnd.oci.image.manifest.v1+json",
        )
        .timeout(Duration::from_secs(15))
        .send()
        .await
        .with_context(|| format!("HEAD {url}"))?;
    ensure!(resp.status().is_success(), "HEAD {url}: {}", resp.status());
    Ok(resp
        .headers()
        .get("docker-content-digest")
        .and_then(|v| v.to_str().ok())
        .with_context(|| format!("HEAD {url}: no Docker-Content-Digest"))?
        .to_owned())
}

/// `skopeo copy` of a single-platform image from the site into a fresh layout, checked to be
/// `want` (manifest, config and layers, every digest).
async fn pull_image(site: &str, work: &Path, name: &str, want: &SeedImage) -> Result<()> {
    let out = work.join(format!("pulled-{}", name.replace(['/', ':'], "-")));
    SkopeoCopy::default()
        .copy(
            &format!("docker://{site}/{name}"),
            &format!("oci:{}:x", out.display()),
        )
        .await
        .with_context(|| format!("pulling {name} from the site"))?;
    read_layout(&out, "x")?.expect(name, &want.manifest.digest, &want.blob_digests())
}

/// `skopeo copy --all` of the index from the site, checked platform by platform.
async fn pull_index(site: &str, work: &Path, want: &MultiArchImage) -> Result<()> {
    let out = work.join("pulled-multi");
    ALL.copy(
        &format!("docker://{site}/a/multi/app:1.0"),
        &format!("oci:{}:1.0", out.display()),
    )
    .await
    .context("pulling the index from the site")?;
    let pulled = read_index_layout(&out, "1.0")?;
    ensure!(
        pulled.index_digest == want.index.digest,
        "index {} served, {} upstream",
        pulled.index_digest,
        want.index.digest
    );
    ensure!(pulled.children.len() == want.images.len(), "{pulled:?}");
    for (got, image) in pulled.children.iter().zip(&want.images) {
        ensure!(
            got.manifest_digest == image.manifest.digest
                && got.blob_digests == image.blob_digests(),
            "{}/{}: served {got:?}, upstream manifest {} blobs {:?}",
            image.os,
            image.architecture,
            image.manifest.digest,
            image.blob_digests()
        );
    }
    Ok(())
}

/// The `marker: N` line of an export.
fn marker(export_output: &str) -> Result<String> {
    export_output
        .lines()
        .rev()
        .find_map(|l| l.trim().strip_prefix("marker: "))
        .map(str::to_owned)
        .with_context(|| format!("no `marker:` line in:\n{export_output}"))
}

/// Flips one byte inside the data of `blob` in the tar at `path`.
fn tamper(path: &Path, blob: &[u8]) -> Result<()> {
    let mut bytes = fs::read(path)?;
    let needle = &blob[blob.len() / 2..blob.len() / 2 + 64];
    let at = bytes
        .windows(needle.len())
        .position(|w| w == needle)
        .with_context(|| format!("the blob is not in {}", path.display()))?;
    bytes[at + 10] ^= 0xff;
    fs::write(path, bytes)?;
    Ok(())
}

async fn scenario(env: &mut Env) -> Result<()> {
    let work = env.work.path().to_path_buf();
    // The upstreams' own digests: what the site must serve.
    for (registry, repo, tag, want) in [
        (&env.registry_a, "multi/app", "1.0", &env.multi.index.digest),
        (
            &env.registry_a,
            "team/tool",
            "2.0",
            &env.tool.manifest.digest,
        ),
        (
            &env.registry_b,
            "other/svc",
            "1.0",
            &env.svc.manifest.digest,
        ),
        (
            &env.registry_b,
            "other/late",
            "1.0",
            &env.late.manifest.digest,
        ),
    ] {
        let got = upstream_digest(registry, repo, tag).await?;
        ensure!(
            &got == want,
            "{repo}:{tag} is {got} upstream, {want} seeded"
        );
    }

    // --- Online: prefetch from a list, export everything pinned. ---
    let online = env.write_config(&env.path("online"))?;
    let online_store = env.path("online/store");
    let list = env.path("images.txt");
    fs::write(
        &list,
        "# what the site runs\na/multi/app:1.0   # both platforms\na/team/tool:2.0\n\nb/other/svc:1.0\n",
    )?;
    let (online_s, list_s) = (online.to_str().unwrap(), list.to_str().unwrap());
    let out = entrepot_ok(&["prefetch", "--config", online_s, "--file", list_s]).await?;
    ensure!(out.contains("pinned 3 images"), "prefetch:\n{out}");
    let bundle = env.path("bundle.tar");
    let bundle_s = bundle.to_str().unwrap();
    let out = entrepot_ok(&["export", "--config", online_s, "--out", bundle_s]).await?;
    let since = marker(&out)?;

    // --- Later, online: one more image pulled through entrepot, and a delta of it. ---
    let serving = Entrepot::start(&env.path("online"), &env.upstreams()).await?;
    ensure!(serving.store == online_store);
    pull_image(&serving.host(), &work, "b/other/late:1.0", &env.late).await?;
    serving.check_stored(env.late.all_digests()).await?;
    drop(serving);
    let delta = env.path("delta.tar");
    let delta_s = delta.to_str().unwrap();
    let out = entrepot_ok(&[
        "export",
        "--config",
        online_s,
        "--since",
        &since,
        "--out",
        delta_s,
        "b/other/late:1.0",
    ])
    .await?;
    marker(&out)?;
    let (full_len, delta_len) = (fs::metadata(&bundle)?.len(), fs::metadata(&delta)?.len());
    ensure!(
        delta_len < full_len / 2,
        "the delta ({delta_len} bytes) is not much smaller than the full bundle ({full_len})"
    );

    // --- The site: no upstream reachable, an empty store, --offline. ---
    env.registry_a.stop();
    env.registry_b.stop();
    let site_config = env.write_config(&env.path("site"))?;
    let site_store = env.path("site/store");
    let site_s = site_config.to_str().unwrap();

    // A truncated bundle (cut at a tar block boundary, as a copy that stopped short would be)
    // is refused and leaves the store as it was.
    let truncated = env.path("truncated.tar");
    let full = fs::read(&bundle)?;
    fs::write(&truncated, &full[..full.len() * 2 / 3 / 512 * 512])?;
    let before = snapshot(&site_store)?;
    let (ok, out) = entrepot(&["import", "--config", site_s, truncated.to_str().unwrap()]).await?;
    ensure!(!ok, "a truncated bundle was imported:\n{out}");
    ensure!(out.contains("refused"), "no clear refusal:\n{out}");
    ensure!(
        snapshot(&site_store)? == before,
        "the refused import changed the store"
    );
    ensure!(blob_count(&site_store) == 0);

    entrepot_ok(&["import", "--config", site_s, bundle_s]).await?;
    let (port, mut site) = serve_offline(&site_config, &env.path("site.log")).await?;
    let host = format!("127.0.0.1:{port}");
    pull_index(&host, &work, &env.multi).await?;
    pull_image(&host, &work, "a/team/tool:2.0", &env.tool).await?;
    pull_image(&host, &work, "b/other/svc:1.0", &env.svc).await?;
    // Not carried yet: offline, the site cannot have it.
    let missing = SkopeoCopy::default()
        .run(
            &format!("docker://{host}/b/other/late:1.0"),
            &format!("oci:{}:x", work.join("not-yet").display()),
        )
        .await?;
    ensure!(!missing.success(), "an image never carried was served");
    site.kill();

    // A tampered delta is refused, the site's store unchanged.
    let tampered = env.path("tampered.tar");
    fs::copy(&delta, &tampered)?;
    tamper(&tampered, &env.late.layers[0].data)?;
    let before = snapshot(&site_store)?;
    let (ok, out) = entrepot(&["import", "--config", site_s, tampered.to_str().unwrap()]).await?;
    ensure!(!ok, "a tampered bundle was imported:\n{out}");
    ensure!(out.contains("refused"), "no clear refusal:\n{out}");
    ensure!(
        snapshot(&site_store)? == before,
        "the refused import changed the store"
    );

    // The real delta: the site serves the new image, and the earlier ones still.
    entrepot_ok(&["import", "--config", site_s, delta_s]).await?;
    let (port, _site) = serve_offline(&site_config, &env.path("site-2.log")).await?;
    let host = format!("127.0.0.1:{port}");
    pull_image(&host, &work, "b/other/late:1.0", &env.late).await?;
    let again = work.join("again");
    fs::create_dir_all(&again)?;
    pull_index(&host, &again, &env.multi).await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prefetch_export_import_and_serve_offline_with_a_delta() {
    require_programs(&["docker-registry", "skopeo"]);
    run_scenario(Env::start(), scenario).await;
}
