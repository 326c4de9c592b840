//! Real container clients for end-to-end tests: a private `containerd` driven by `ctr`, `podman`
//! with throw-away storage, and a `docker-registry` upstream whose access log a test can read to
//! see exactly which requests reached it, and from whom.
//!
//! Like [`super::real`], a missing program fails the test (saying to run
//! `.ci/install-deps.sh`), never skips it.

use std::{
    fs,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    sync::atomic::{AtomicUsize, Ordering},
    time::{Duration, Instant},
};

use anyhow::{bail, ensure, Context, Result};

use super::real::{
    file_digest, require_program, skopeo_copy, start_on_free_port, ChildGuard, Entrepot, SeedImage,
    READY_TIMEOUT,
};

/// Ceiling for one client command (`ctr ...`, `podman pull`), so a proxy that hangs fails the
/// test instead of stalling it.
pub const CLIENT_TIMEOUT: Duration = Duration::from_secs(120);

/// The `User-Agent` prefix entrepot sends upstream; anything else reaching an upstream came from
/// a client that went around the proxy.
pub const ENTREPOT_AGENT: &str = "entrepot/";

/// Runs `cmd` to completion with its output in `log`, killing it after `timeout`. Returns the
/// output; the error carries it too.
pub async fn run_bounded(
    label: &str,
    mut cmd: Command,
    log: &Path,
    timeout: Duration,
) -> Result<String> {
    let out = fs::File::create(log).with_context(|| format!("creating {}", log.display()))?;
    let err = out.try_clone()?;
    cmd.stdin(Stdio::null()).stdout(out).stderr(err);
    let described = format!("{label} ({cmd:?})");
    let log = log.to_owned();
    tokio::task::spawn_blocking(move || {
        let mut child = cmd
            .spawn()
            .with_context(|| format!("spawning {described}"))?;
        let deadline = Instant::now() + timeout;
        let status = loop {
            if let Some(status) = child.try_wait()? {
                break status;
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                bail!(
                    "{described} did not finish within {timeout:?}; output:\n{}",
                    read_log(&log)
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        let output = read_log(&log);
        ensure!(
            status.success(),
            "{described} failed with {status}; output:\n{output}"
        );
        Ok(output)
    })
    .await?
}

fn read_log(path: &Path) -> String {
    fs::read_to_string(path).unwrap_or_else(|e| format!("<no log at {}: {e}>", path.display()))
}

/// A unique file name in `dir` for the output of one command.
fn next_log(dir: &Path, label: &str) -> PathBuf {
    static COUNTER: AtomicUsize = AtomicUsize::new(0);
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    dir.join(format!("{n:03}-{label}.log"))
}

/// Pushes `image` to the registry at `host` (`127.0.0.1:<port>`) as `reference` (`repo:tag`),
/// from an OCI layout written under `work`.
pub async fn seed(work: &Path, image: &SeedImage, host: &str, reference: &str) -> Result<()> {
    let (repo, tag) = reference
        .rsplit_once(':')
        .context("reference needs a tag")?;
    let layout = work.join(format!(
        "seed-{}-{}",
        host.replace(':', "_"),
        repo.replace('/', "-")
    ));
    image.write_layout(&layout, tag)?;
    skopeo_copy(
        &format!("oci:{}:{tag}", layout.display()),
        &format!("docker://{host}/{reference}"),
    )
    .await
}

/// Checks that entrepot's store holds a verified copy of `image`: manifest, config and layers.
pub fn check_cached(entrepot: &Entrepot, image: &SeedImage) -> Result<()> {
    let digests = std::iter::once(image.manifest.digest.clone()).chain(image.blob_digests());
    for digest in digests {
        let path = entrepot.stored_blob(&digest);
        ensure!(
            path.is_file(),
            "{digest} is not in entrepot's store ({} missing)",
            path.display()
        );
        let actual = file_digest(&path)?;
        ensure!(
            actual == digest,
            "store file {} hashes to {actual}",
            path.display()
        );
    }
    Ok(())
}

/// One line of docker-registry's access log (combined log format).
#[derive(Debug, Clone)]
pub struct AccessLine {
    pub method: String,
    /// Path and query, as sent.
    pub target: String,
    pub status: u16,
    pub user_agent: String,
}

impl AccessLine {
    /// `127.0.0.1 - - [date] "GET /v2/ HTTP/1.1" 200 2 "" "skopeo/1.9.3"`; `None` for the
    /// registry's other (logfmt) lines.
    fn parse(line: &str) -> Option<Self> {
        let quoted: Vec<&str> = line.split('"').collect();
        // [prefix, request, status+size, referer, " ", agent, ""]
        if quoted.len() < 7 || !quoted[0].ends_with("] ") {
            return None;
        }
        let mut request = quoted[1].split_whitespace();
        let method = request.next()?.to_owned();
        let target = request.next()?.to_owned();
        let status = quoted[2].split_whitespace().next()?.parse().ok()?;
        Some(Self {
            method,
            target,
            status,
            user_agent: quoted[5].to_owned(),
        })
    }
}

/// A `docker-registry serve` upstream (filesystem storage, no auth) like
/// [`super::real::DockerRegistry`], with its access log readable by the test.
pub struct LoggedRegistry {
    pub port: u16,
    process: ChildGuard,
    log: PathBuf,
    _dir: tempfile::TempDir,
}

impl LoggedRegistry {
    pub async fn start(name: &str) -> Result<Self> {
        let bin = require_program("docker-registry");
        let dir = tempfile::Builder::new()
            .prefix(&format!("{name}-"))
            .tempdir()?;
        let root = dir.path().to_owned();
        let log = root.join("registry.log");
        let (port, process) = start_on_free_port(|port| {
            let config = root.join("config.yml");
            fs::write(&config, logged_registry_config(&root.join("data"), port))?;
            let mut cmd = Command::new(&bin);
            cmd.arg("serve").arg(&config);
            ChildGuard::spawn(name, cmd, log.clone())
        })
        .await?;
        Ok(Self {
            port,
            process,
            log,
            _dir: dir,
        })
    }

    /// `127.0.0.1:<port>`, the registry host in image references.
    pub fn host(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.host())
    }

    /// Kills the registry; its port refuses connections afterwards.
    pub fn stop(&mut self) {
        self.process.kill();
    }

    /// Every request answered so far, oldest first. docker-registry writes each line as the
    /// response completes; the tests read the log after the client that caused the requests has
    /// exited, by which time entrepot has long read those responses to the end.
    pub fn requests(&self) -> Vec<AccessLine> {
        read_log(&self.log)
            .lines()
            .filter_map(AccessLine::parse)
            .collect()
    }

    /// The requests after the first `since` (a previous `requests().len()`).
    pub fn requests_since(&self, since: usize) -> Vec<AccessLine> {
        self.requests().into_iter().skip(since).collect()
    }
}

fn logged_registry_config(data: &Path, port: u16) -> String {
    format!(
        "version: 0.1
log:
  level: info
  accesslog:
    disabled: false
storage:
  filesystem:
    rootdirectory: {data}
http:
  addr: 127.0.0.1:{port}
",
        data = data.display()
    )
}

/// A `containerd` of the test's own: root, state, sockets and config in one folder, CRI off.
/// `ctr` talks to it by socket; `--hosts-dir` resolution happens in `ctr` with the same
/// `hosts.toml` code the CRI plugin uses for `config_path`.
pub struct Containerd {
    socket: PathBuf,
    dir: PathBuf,
    process: ChildGuard,
}

/// containerd namespace for everything the tests do.
const NAMESPACE: &str = "entrepot-e2e";

impl Containerd {
    /// Starts containerd with everything under `dir` (created) and waits for its socket.
    pub async fn start(dir: &Path) -> Result<Self> {
        let bin = require_program("containerd");
        require_program("ctr");
        fs::create_dir_all(dir)?;
        let socket = dir.join("containerd.sock");
        // sun_path holds 108 bytes including the NUL; ".ttrpc" is appended for the second socket.
        ensure!(
            socket.as_os_str().len() + ".ttrpc".len() < 108,
            "socket path {} is too long for a unix socket; use a shorter TMPDIR",
            socket.display()
        );
        let path = |name: &str| format!("{:?}", dir.join(name).display().to_string());
        let config = format!(
            r#"version = 2
root = {root}
state = {state}
# CRI would want a CNI setup and a runtime; the tests only fetch and unpack.
disabled_plugins = ["io.containerd.grpc.v1.cri"]

[grpc]
  address = {socket}

[ttrpc]
  address = {ttrpc}

[debug]
  address = {debug}

[plugins."io.containerd.internal.v1.opt"]
  path = {opt}
"#,
            root = path("root"),
            state = path("state"),
            socket = path("containerd.sock"),
            ttrpc = path("containerd.sock.ttrpc"),
            debug = path("debug.sock"),
            opt = path("opt"),
        );
        let config_path = dir.join("config.toml");
        fs::write(&config_path, config)?;
        let mut cmd = Command::new(bin);
        cmd.arg("--config").arg(&config_path);
        let mut process = ChildGuard::spawn("containerd", cmd, dir.join("containerd.log"))?;

        let deadline = Instant::now() + READY_TIMEOUT;
        while std::os::unix::net::UnixStream::connect(&socket).is_err() {
            if let Some(status) = process.exited() {
                bail!(
                    "containerd exited with {status} before serving {}; output:\n{}",
                    socket.display(),
                    process.output()
                );
            }
            if Instant::now() > deadline {
                bail!(
                    "containerd did not serve {} within {READY_TIMEOUT:?}; output:\n{}",
                    socket.display(),
                    process.output()
                );
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        Ok(Self {
            socket,
            dir: dir.to_owned(),
            process,
        })
    }

    /// `ctr --address <socket> --namespace entrepot-e2e <args>`; returns its output.
    pub async fn ctr(&self, args: &[&str]) -> Result<String> {
        let mut cmd = Command::new(require_program("ctr"));
        cmd.arg("--address")
            .arg(&self.socket)
            .args(["--namespace", NAMESPACE])
            .args(args);
        let label = args.iter().take(2).copied().collect::<Vec<_>>().join("-");
        run_bounded(
            &format!("ctr {}", args.join(" ")),
            cmd,
            &next_log(&self.dir, &label),
            CLIENT_TIMEOUT,
        )
        .await
        .with_context(|| format!("containerd output:\n{}", self.process.output()))
    }

    /// The digests in containerd's content store.
    pub async fn content_digests(&self) -> Result<Vec<String>> {
        let out = self.ctr(&["content", "ls", "--quiet"]).await?;
        Ok(out.lines().map(|l| l.trim().to_owned()).collect())
    }
}

/// Writes `<hosts_dir>/<registry>/hosts.toml` sending pulls and tag resolution for `registry`
/// (`host:port`, plain HTTP) to the mirror `mirror` (`host:port`) first.
pub fn write_hosts_toml(hosts_dir: &Path, registry: &str, mirror: &str) -> Result<PathBuf> {
    let dir = hosts_dir.join(registry);
    fs::create_dir_all(&dir)?;
    let path = dir.join("hosts.toml");
    fs::write(&path, hosts_toml(registry, mirror))?;
    Ok(path)
}

/// The `hosts.toml` for [`write_hosts_toml`].
pub fn hosts_toml(registry: &str, mirror: &str) -> String {
    format!(
        r#"server = "http://{registry}"

[host."http://{mirror}"]
  capabilities = ["pull", "resolve"]
"#
    )
}

/// `podman` with storage, run root, temp files and configuration of its own, all under one
/// folder, and a registries.conf given by the test.
pub struct Podman {
    dir: PathBuf,
    registries_conf: PathBuf,
}

impl Podman {
    /// Prepares (creates) `dir`; nothing runs until [`Podman::pull`].
    pub fn new(dir: &Path, registries_conf: &Path) -> Result<Self> {
        require_program("podman");
        for sub in ["root", "runroot", "tmp", "image-tmp"] {
            fs::create_dir_all(dir.join(sub))?;
        }
        // Accept unsigned images without relying on /etc/containers/policy.json.
        fs::write(
            dir.join("policy.json"),
            r#"{"default":[{"type":"insecureAcceptAnything"}]}"#,
        )?;
        // Empty: no /etc/containers/containers.conf or user settings leak in.
        fs::write(dir.join("containers.conf"), "")?;
        Ok(Self {
            dir: dir.to_owned(),
            registries_conf: registries_conf.to_owned(),
        })
    }

    fn command(&self) -> Command {
        let mut cmd = Command::new(require_program("podman"));
        cmd.env("CONTAINERS_REGISTRIES_CONF", &self.registries_conf)
            .env("CONTAINERS_CONF", self.dir.join("containers.conf"))
            // Where image layers are staged while pulling.
            .env("TMPDIR", self.dir.join("image-tmp"))
            .arg("--root")
            .arg(self.dir.join("root"))
            .arg("--runroot")
            .arg(self.dir.join("runroot"))
            .arg("--tmpdir")
            .arg(self.dir.join("tmp"))
            .args(["--storage-driver", "vfs"])
            .args(["--cgroup-manager", "cgroupfs"])
            .args(["--events-backend", "file"]);
        cmd
    }

    /// `podman pull <reference>`.
    pub async fn pull(&self, reference: &str) -> Result<String> {
        let mut cmd = self.command();
        cmd.arg("pull")
            .arg("--signature-policy")
            .arg(self.dir.join("policy.json"))
            .arg(reference);
        run_bounded(
            &format!("podman pull {reference}"),
            cmd,
            &next_log(&self.dir, "podman-pull"),
            CLIENT_TIMEOUT,
        )
        .await
    }

    /// The manifest digest of a pulled image.
    pub async fn image_digest(&self, reference: &str) -> Result<String> {
        let mut cmd = self.command();
        cmd.args(["image", "inspect", "--format", "{{.Digest}}", reference]);
        let out = run_bounded(
            &format!("podman image inspect {reference}"),
            cmd,
            &next_log(&self.dir, "podman-inspect"),
            CLIENT_TIMEOUT,
        )
        .await?;
        Ok(out.trim().to_owned())
    }
}

/// The registries.conf (v2) that sends pulls of `registry` (`host:port`, plain HTTP) to the
/// mirror `mirror_location` (`host:port/<upstream-name>`) first.
pub fn registries_conf(registry: &str, mirror_location: &str) -> String {
    format!(
        r#"unqualified-search-registries = []

[[registry]]
prefix = "{registry}"
location = "{registry}"
insecure = true

[[registry.mirror]]
location = "{mirror_location}"
insecure = true
"#
    )
}
