//! The programs the comparison runs: the upstream `docker-registry`, entrepot's release binary,
//! distribution in proxy mode and nginx (Garage, the S3 server, is in [`super::garage`]), each a
//! child process in its own process group that is killed (the whole group) when its guard
//! drops — on success, on error and on panic.

use std::{
    fs,
    os::unix::process::CommandExt as _,
    path::{Path, PathBuf},
    process::{Child, Command, ExitStatus, Stdio},
    time::{Duration, Instant},
};

use anyhow::{bail, Context, Result};

use super::load;

/// How long a started server may take to answer `GET /v2/`.
const READY_TIMEOUT: Duration = Duration::from_secs(30);

/// Full path of `program` on PATH or in /usr/sbin (nginx lives there, outside a non-root PATH).
pub fn find_program(program: &str) -> Result<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain([PathBuf::from("/usr/sbin"), PathBuf::from("/usr/bin")])
        .map(|dir| dir.join(program))
        .find(|candidate| candidate.is_file())
        .with_context(|| {
            format!("`{program}` not found: run `bash .ci/install-bench-deps.sh` to install it")
        })
}

/// A port that was free a moment ago (for programs that take a port number in their config).
pub fn free_port() -> Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

/// A port free a moment ago that is none of `taken`: two [`free_port`] calls in a row can
/// return the same number.
pub fn free_port_besides(taken: &[u16]) -> Result<u16> {
    loop {
        let port = free_port()?;
        if !taken.contains(&port) {
            return Ok(port);
        }
    }
}

/// A child process in its own process group, output in a log file. Dropping it kills the
/// whole group (nginx's workers too) and reaps the child.
pub struct ChildGuard {
    name: String,
    child: Option<Child>,
    log: PathBuf,
}

impl ChildGuard {
    pub fn spawn(name: &str, mut cmd: Command, log: PathBuf) -> Result<Self> {
        let out = fs::File::create(&log).with_context(|| format!("creating {}", log.display()))?;
        let err = out.try_clone()?;
        let child = cmd
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            // Its own group: the terminal's Ctrl-C reaches only the bench, which then kills
            // each group; and a group kill also takes the children the program forked.
            .process_group(0)
            .spawn()
            .with_context(|| format!("spawning {name}: {cmd:?}"))?;
        Ok(Self {
            name: name.to_owned(),
            child: Some(child),
            log,
        })
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// The exit status if the process has already ended.
    pub fn exited(&mut self) -> Option<ExitStatus> {
        self.child.as_mut()?.try_wait().ok().flatten()
    }

    /// Everything the process has printed so far.
    pub fn output(&self) -> String {
        fs::read_to_string(&self.log).unwrap_or_else(|e| format!("<no log: {e}>"))
    }

    /// The last lines of the output, for error messages.
    pub fn output_tail(&self) -> String {
        let output = self.output();
        let lines: Vec<&str> = output.lines().collect();
        lines[lines.len().saturating_sub(40)..].join("\n")
    }

    /// Kills the process group and waits for the child to be gone.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            // The group id is the child's pid (process_group(0)). `kill` the command, because
            // the std API signals one process only and this crate keeps unsafe code out.
            let _ = Command::new("kill")
                .args(["-KILL", "--", &format!("-{}", child.id())])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status();
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Waits (polling, so the runtime keeps running) until the process exits or `limit` passes.
    pub async fn wait_exit(&mut self, limit: Duration) -> Result<ExitStatus> {
        let deadline = Instant::now() + limit;
        loop {
            if let Some(status) = self.exited() {
                return Ok(status);
            }
            if Instant::now() > deadline {
                bail!("{} still running after {limit:?}", self.name);
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

impl Drop for ChildGuard {
    fn drop(&mut self) {
        self.kill();
        if std::thread::panicking() {
            eprintln!(
                "----- {} (end of its output) -----\n{}",
                self.name,
                self.output_tail()
            );
        }
    }
}

/// Memory figures of a running process, from `/proc/<pid>/status`, in bytes.
#[derive(Clone, Copy, Debug, Default)]
pub struct Memory {
    /// VmHWM: the peak resident set size over the process's life.
    pub peak_rss: u64,
    /// RssAnon: resident anonymous memory now (heap, stacks), without mapped files.
    pub rss_anon: u64,
    /// RssFile: resident pages of mapped files now (the binary, and blobs or spool files
    /// entrepot maps); page cache that the kernel can drop, but counted in the RSS.
    pub rss_file: u64,
}

pub fn memory(pid: u32) -> Result<Memory> {
    let status = fs::read_to_string(format!("/proc/{pid}/status"))?;
    let field = |name: &str| -> Result<u64> {
        let line = status
            .lines()
            .find(|l| l.starts_with(name))
            .with_context(|| format!("no {name} in /proc/{pid}/status"))?;
        let kib: u64 = line[name.len()..]
            .trim()
            .trim_end_matches("kB")
            .trim()
            .parse()
            .with_context(|| format!("parsing {line:?}"))?;
        Ok(kib * 1024)
    };
    Ok(Memory {
        peak_rss: field("VmHWM:")?,
        rss_anon: field("RssAnon:")?,
        rss_file: field("RssFile:")?,
    })
}

/// CPU time (user + system, every thread) `pid` has used since it started, in seconds.
pub fn cpu_seconds(pid: u32) -> Result<f64> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat"))?;
    // The command name (field 2) may hold spaces: count fields after its closing parenthesis.
    let rest = stat
        .rsplit_once(')')
        .map(|(_, r)| r)
        .with_context(|| format!("parsing /proc/{pid}/stat: {stat:?}"))?;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // utime and stime are fields 14 and 15 of the whole line, 12 and 13 after the name.
    let ticks = |i: usize| -> Result<f64> {
        fields
            .get(i)
            .and_then(|v| v.parse::<f64>().ok())
            .with_context(|| format!("no field {} in /proc/{pid}/stat", i + 3))
    };
    Ok((ticks(11)? + ticks(12)?) / clock_ticks())
}

/// A process's CPU clock at one moment: each live thread's nanoseconds on a CPU
/// (`/proc/<pid>/task/*/schedstat`) beside the process total in clock ticks (`/proc/<pid>/stat`,
/// 10 ms steps, which count exited threads too). A 16 MiB cold pull costs a few ticks, so the
/// ticks alone would make its CPU per GiB jump by 0.6 CPU-s/GiB steps.
#[derive(Clone, Debug)]
pub struct CpuMark {
    ticks: f64,
    /// Nanoseconds by thread id; empty when schedstat cannot be read.
    threads: std::collections::HashMap<u32, u64>,
}

pub fn cpu_mark(pid: u32) -> Result<CpuMark> {
    let ticks = cpu_seconds(pid)?;
    let mut threads = std::collections::HashMap::new();
    if let Ok(tasks) = fs::read_dir(format!("/proc/{pid}/task")) {
        for task in tasks.flatten() {
            let Some(tid) = task.file_name().to_str().and_then(|t| t.parse().ok()) else {
                continue;
            };
            // "<ns on cpu> <ns waiting> <timeslices>"; a thread may exit between the two reads.
            let ns = fs::read_to_string(task.path().join("schedstat"))
                .ok()
                .and_then(|s| s.split_whitespace().next()?.parse().ok());
            if let Some(ns) = ns {
                threads.insert(tid, ns);
            }
        }
    }
    Ok(CpuMark { ticks, threads })
}

impl CpuMark {
    /// CPU seconds used since `earlier`: the threads' nanoseconds (threads born since count
    /// from zero), unless the ticks say more than two ticks' worth went to threads that exited
    /// in between, or schedstat could not be read: then the ticks.
    pub fn since(&self, earlier: &CpuMark) -> f64 {
        let ticks = self.ticks - earlier.ticks;
        if self.threads.is_empty() {
            return ticks;
        }
        let ns: u64 = self
            .threads
            .iter()
            .map(|(tid, &ns)| ns.saturating_sub(earlier.threads.get(tid).copied().unwrap_or(0)))
            .sum();
        let precise = ns as f64 / 1e9;
        if ticks - precise > 2.0 / clock_ticks() {
            ticks
        } else {
            precise
        }
    }
}

/// `getconf CLK_TCK` (the unit of /proc's CPU times), read once; 100 when it cannot be read.
fn clock_ticks() -> f64 {
    static TICKS: std::sync::OnceLock<f64> = std::sync::OnceLock::new();
    *TICKS.get_or_init(|| {
        Command::new("getconf")
            .arg("CLK_TCK")
            .output()
            .ok()
            .and_then(|o| String::from_utf8_lossy(&o.stdout).trim().parse().ok())
            .filter(|&t: &f64| t > 0.0)
            .unwrap_or(100.0)
    })
}

/// A server on 127.0.0.1 that answers `GET /v2/`.
pub struct Server {
    pub port: u16,
    pub process: ChildGuard,
}

impl Server {
    pub fn url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{path}", self.port)
    }

    pub fn pid(&self) -> Result<u32> {
        self.process.pid().context("process already stopped")
    }

    pub fn memory(&self) -> Result<Memory> {
        memory(self.pid()?)
    }

    pub fn cpu_seconds(&self) -> Result<f64> {
        cpu_seconds(self.pid()?)
    }

    /// Starts `spawn(port)` on a free port and waits until `GET /v2/` answers 200. A lost race
    /// for the port ("address already in use") is retried on another one.
    pub async fn start<F>(spawn: F) -> Result<Self>
    where
        F: FnMut(u16) -> Result<ChildGuard>,
    {
        Self::start_answering("/v2/", &[200], spawn).await
    }

    /// [`Server::start`] for a server that is up when `GET {path}` answers one of `ready`
    /// (Garage's S3 port answers an anonymous request with 403).
    pub async fn start_answering<F>(path: &str, ready: &[u16], mut spawn: F) -> Result<Self>
    where
        F: FnMut(u16) -> Result<ChildGuard>,
    {
        let mut attempt = 1;
        loop {
            let port = free_port()?;
            let mut process = spawn(port)?;
            match wait_answering(port, &mut process, path, ready).await {
                Ok(()) => return Ok(Self { port, process }),
                // Whether or not it exited: garage logs the clash of its S3 port and hangs.
                Err(e)
                    if attempt < 3
                        && process
                            .output()
                            .to_lowercase()
                            .contains("address already in use") =>
                {
                    drop(process);
                    eprintln!("port {port} was taken, retrying: {e:#}");
                    attempt += 1;
                }
                Err(e) => return Err(e),
            }
        }
    }
}

/// Polls `GET {path}` until it answers one of `ready`; fails early if the process exits first.
pub async fn wait_answering(
    port: u16,
    process: &mut ChildGuard,
    path: &str,
    ready: &[u16],
) -> Result<()> {
    let deadline = Instant::now() + READY_TIMEOUT;
    loop {
        if let Some(status) = process.exited() {
            bail!(
                "{} exited with {status} before answering GET {path} on port {port}:\n{}",
                process.name(),
                process.output_tail()
            );
        }
        let last = match load::get_status(port, path).await {
            Ok(status) if ready.contains(&status) => return Ok(()),
            Ok(status) => format!("status {status}"),
            Err(e) => format!("{e:#}"),
        };
        if Instant::now() > deadline {
            bail!(
                "{} did not answer {ready:?} on GET {path} (port {port}) within \
                 {READY_TIMEOUT:?}, last: {last}:\n{}",
                process.name(),
                process.output_tail()
            );
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// Where a `docker-registry` keeps its data: the `storage:` driver section of its config.
pub enum RegistryStorage {
    /// The filesystem driver, under this folder.
    Filesystem(PathBuf),
    /// Another driver's lines, indented under `storage:` (the s3 driver on Garage, see
    /// [`super::garage::Place::distribution_storage`]).
    Driver(String),
}

/// A `docker-registry serve` config: `storage`, optionally a pull-through proxy of `remote`.
/// `quiet` turns the access log off and logs errors only (the upstream, whose logging is no
/// part of any measurement); otherwise distribution's defaults apply.
pub fn registry_config(
    storage: &RegistryStorage,
    port: u16,
    remote: Option<&str>,
    quiet: bool,
) -> String {
    let log = if quiet {
        "log:\n  level: error\n  accesslog:\n    disabled: true\n"
    } else {
        "log:\n  level: info\n"
    };
    let proxy = remote
        .map(|url| format!("proxy:\n  remoteurl: {url}\n"))
        .unwrap_or_default();
    let driver = match storage {
        RegistryStorage::Filesystem(data) => {
            format!("  filesystem:\n    rootdirectory: {}\n", data.display())
        }
        RegistryStorage::Driver(lines) => lines.clone(),
    };
    format!(
        "version: 0.1\n{log}storage:\n{driver}  \
         cache:\n    blobdescriptor: inmemory\nhttp:\n  addr: 127.0.0.1:{port}\n{proxy}"
    )
}

/// Starts `docker-registry serve` with its config and log under `dir`, its data under
/// `dir/data` unless `storage` says otherwise.
pub async fn start_registry(
    name: &str,
    dir: &Path,
    remote: Option<&str>,
    storage: Option<RegistryStorage>,
) -> Result<Server> {
    let bin = find_program("docker-registry")?;
    fs::create_dir_all(dir)?;
    let quiet = remote.is_none();
    let storage = storage.unwrap_or_else(|| RegistryStorage::Filesystem(dir.join("data")));
    Server::start(|port| {
        let config = dir.join("config.yml");
        fs::write(&config, registry_config(&storage, port, remote, quiet))?;
        let mut cmd = Command::new(&bin);
        cmd.arg("serve").arg(&config).current_dir(dir);
        without_aws_env(&mut cmd);
        ChildGuard::spawn(name, cmd, dir.join("registry.log"))
    })
    .await
}

/// Removes the `AWS_*` variables of the bench's environment from `cmd`'s: the proxies get
/// their bucket and key from their configs alone. (distribution's AWS SDK panics at start-up
/// when `AWS_CA_BUNDLE` is set, as on machines that point every tool at a CA file: "unable to
/// load custom CA bundle, HTTPClient's transport unsupported type".)
fn without_aws_env(cmd: &mut Command) {
    for (name, _) in std::env::vars_os() {
        if name.to_string_lossy().starts_with("AWS_") {
            cmd.env_remove(name);
        }
    }
}

/// Starts entrepot's release binary with its config, store (`store`) and log under `dir`, the
/// one (default) upstream at `upstream_url`. `storage` is added to the `[storage]` table (the
/// s3 backend's keys and its `[storage.s3]` table; empty for the filesystem default).
/// `log_filter` sets `ENTREPOT_LOG` (None: the binary's default, access log included).
pub async fn start_entrepot(
    dir: &Path,
    store: &Path,
    storage: &str,
    upstream_url: &str,
    log_filter: Option<&str>,
) -> Result<Server> {
    fs::create_dir_all(dir)?;
    Server::start(|port| {
        let cmd = entrepot_command(dir, store, storage, upstream_url, port, log_filter, "")?;
        ChildGuard::spawn("entrepot", cmd, dir.join("entrepot.log"))
    })
    .await
}

/// The name of the one upstream entrepot is configured with in the bench.
pub const ENTREPOT_UPSTREAM: &str = "upstream";

/// The command that runs entrepot on `port` (config written to `dir/entrepot.toml`); `storage`
/// as for [`start_entrepot`]; `extra` is appended to the config (a `[cluster]` table, or "").
pub fn entrepot_command(
    dir: &Path,
    store: &Path,
    storage: &str,
    upstream_url: &str,
    port: u16,
    log_filter: Option<&str>,
    extra: &str,
) -> Result<Command> {
    let config = dir.join("entrepot.toml");
    fs::write(
        &config,
        format!(
            "[server]\nlisten = \"127.0.0.1:{port}\"\nshutdown_grace = \"1s\"\n\n\
             [storage]\nroot = {store:?}\n{storage}\n\
             [[upstream]]\nname = \"{ENTREPOT_UPSTREAM}\"\nurl = \"{upstream_url}\"\ndefault = true\n\
             tag_ttl = \"1h\"\n{extra}",
            store = store.display().to_string(),
        ),
    )?;
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_entrepot"));
    cmd.arg("serve")
        .arg("--config")
        .arg(&config)
        .current_dir(dir);
    without_aws_env(&mut cmd);
    match log_filter {
        Some(filter) => cmd.env("ENTREPOT_LOG", filter),
        None => cmd.env_remove("ENTREPOT_LOG"),
    };
    Ok(cmd)
}

/// nginx serving the upstream registry's blob files at the registry's URL shape,
/// `/v2/<repo>/blobs/sha256:<hex>`, with sendfile (or, `sendfile` false, read/write through
/// 1 MiB buffers), one worker per core and an open-file cache
/// (the reference should be the best a file server does here: entrepot keeps its blobs open
/// too); no access log. Everything it writes stays under `dir`.
pub async fn start_nginx(
    dir: &Path,
    registry_dir: &Path,
    sendfile: bool,
    access_log: bool,
) -> Result<Server> {
    let bin = find_program("nginx")?;
    fs::create_dir_all(dir.join("tmp"))?;
    let blobs = registry_dir.join("data/docker/registry/v2/blobs/sha256");
    // Running as root, the workers would switch to `nobody`, who cannot read a private temp
    // folder; keep them root. (Not root: nginx ignores the user directive and says so.)
    let user = if is_root() { "user root;\n" } else { "" };
    let copy = if sendfile {
        "sendfile on;\n  tcp_nopush on;"
    } else {
        "sendfile off;\n  output_buffers 2 1m;"
    };
    // nginx's default is a line per request, unbuffered; the bench's is none.
    let log = if access_log {
        format!("access_log {}/access.log;", dir.display())
    } else {
        "access_log off;".to_owned()
    };
    Server::start(|port| {
        let d = dir.display();
        let conf = format!(
            "{user}daemon off;\nmaster_process on;\nworker_processes auto;\n\
             pid {d}/nginx.pid;\nerror_log {d}/error.log warn;\n\
             events {{ worker_connections 4096; }}\n\
             http {{\n  {log}\n  {copy}\n  tcp_nodelay on;\n  \
             keepalive_requests 1000000;\n  keepalive_timeout 120s;\n  \
             open_file_cache max=10000 inactive=120s;\n  open_file_cache_valid 120s;\n  \
             default_type application/octet-stream;\n  \
             client_body_temp_path {d}/tmp/body;\n  proxy_temp_path {d}/tmp/proxy;\n  \
             fastcgi_temp_path {d}/tmp/fastcgi;\n  uwsgi_temp_path {d}/tmp/uwsgi;\n  \
             scgi_temp_path {d}/tmp/scgi;\n  \
             server {{\n    listen 127.0.0.1:{port} reuseport;\n    \
             location = /v2/ {{ return 200 '{{}}'; }}\n    \
             location ~ \"^/v2/.+/blobs/sha256:([0-9a-f]{{2}})([0-9a-f]{{62}})$\" {{\n      \
             alias {blobs}/$1/$1$2/data;\n    }}\n  }}\n}}\n",
            blobs = blobs.display(),
        );
        let path = dir.join("nginx.conf");
        fs::write(&path, conf)?;
        let mut cmd = Command::new(&bin);
        cmd.arg("-e")
            .arg(dir.join("error.log"))
            .arg("-p")
            .arg(dir)
            .arg("-c")
            .arg(&path);
        ChildGuard::spawn("nginx", cmd, dir.join("nginx.out"))
    })
    .await
}

fn is_root() -> bool {
    fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("Uid:"))
                .and_then(|l| l.split_whitespace().nth(2).map(|euid| euid == "0"))
        })
        .unwrap_or(false)
}
