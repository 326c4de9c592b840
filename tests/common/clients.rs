//! Real container clients for end-to-end tests: a private `containerd` driven by `ctr`, and
//! `podman` with throw-away storage, each configured to pull through a mirror.
//!
//! Like [`super::real`], a missing program fails the test (saying to run
//! `.ci/install-deps.sh`), never skips it.

use std::{
    fs,
    path::{Path, PathBuf},
    process::Command,
    time::Duration,
};

use anyhow::{ensure, Context, Result};

use super::real::{require_program, run_bounded, wait_until, ChildGuard, Finished};

/// Ceiling for one client command (`ctr ...`, `podman pull`), so a proxy that hangs fails the
/// test instead of stalling it.
pub const CLIENT_TIMEOUT: Duration = Duration::from_secs(120);

/// A `containerd` of the test's own: root, state, sockets and config in one folder, CRI off.
/// `ctr` talks to it by socket; `--hosts-dir` resolution happens in `ctr` with the same
/// `hosts.toml` code the CRI plugin uses for `config_path`.
pub struct Containerd {
    socket: PathBuf,
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

        let what = format!("serve {}", socket.display());
        wait_until(&mut process, &what, || {
            let connected = std::os::unix::net::UnixStream::connect(&socket);
            async move { connected.map(drop).map_err(|e| e.to_string()) }
        })
        .await?;
        Ok(Self { socket, process })
    }

    /// `ctr --address <socket> --namespace entrepot-e2e <args>`; returns its output.
    pub async fn ctr(&self, args: &[&str]) -> Result<String> {
        let mut cmd = Command::new(require_program("ctr"));
        cmd.arg("--address")
            .arg(&self.socket)
            .args(["--namespace", NAMESPACE])
            .args(args);
        run_bounded(&format!("ctr {}", args.join(" ")), cmd, CLIENT_TIMEOUT)
            .await
            .and_then(Finished::ok)
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
        run_bounded(&format!("podman pull {reference}"), cmd, CLIENT_TIMEOUT)
            .await?
            .ok()
    }

    /// The manifest digest of a pulled image.
    pub async fn image_digest(&self, reference: &str) -> Result<String> {
        let mut cmd = self.command();
        cmd.args(["image", "inspect", "--format", "{{.Digest}}", reference]);
        let out = run_bounded(
            &format!("podman image inspect {reference}"),
            cmd,
            CLIENT_TIMEOUT,
        )
        .await?
        .ok()?;
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
