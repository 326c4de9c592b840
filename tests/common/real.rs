//! Real programs for end-to-end tests: `docker-registry` upstreams whose access logs show what
//! reached them, the `entrepot` binary, `skopeo` copies and other commands run under a deadline,
//! OCI image layouts written and read on disk, and child processes killed on drop.
//!
//! The programs come from Debian packages that `.ci/install-deps.sh` installs. A test that
//! needs one and cannot find it fails (never skips), saying to run that script.

use std::{
    collections::HashMap,
    fs,
    future::Future,
    path::{Path, PathBuf},
    process::{Child, Command, ExitStatus, Stdio},
    sync::atomic::{AtomicU64, Ordering},
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use anyhow::{anyhow, bail, ensure, Context, Result};

use super::{free_port, random_bytes, sha256_digest, OCI_CONFIG, OCI_LAYER, OCI_MANIFEST};

/// What to do when a program is missing.
pub const INSTALL_HINT: &str =
    "run `bash .ci/install-deps.sh` to install docker-registry and skopeo";

/// How long a started program may take to be ready.
pub const READY_TIMEOUT: Duration = Duration::from_secs(20);

/// How much of a process's output to print when a test fails.
const LOG_TAIL_LINES: usize = 200;

/// Ceiling for one `skopeo copy`, so a proxy that hangs fails the test instead of stalling it.
pub const SKOPEO_TIMEOUT: Duration = Duration::from_secs(120);

/// How long entrepot may take to commit a blob after its client saw the last byte: fills are
/// detached from the response.
const STORE_GRACE: Duration = Duration::from_secs(5);

/// An `[[upstream]]` key keeping tags fresh for longer than any test: a warm pull is answered
/// from the cache alone, even with the upstream gone.
pub const TAG_TTL: &str = "tag_ttl = \"5m\"";

/// The `User-Agent` prefix entrepot sends upstream; anything else reaching an upstream came from
/// a client that went around the proxy.
pub const ENTREPOT_AGENT: &str = "entrepot/";

/// Full path of `program` on PATH; panics with [`INSTALL_HINT`] when it is not there.
pub fn require_program(program: &str) -> PathBuf {
    let found = std::env::var_os("PATH").and_then(|path| {
        std::env::split_paths(&path)
            .map(|dir| dir.join(program))
            .find(|candidate| candidate.is_file())
    });
    found.unwrap_or_else(|| panic!("`{program}` was not found on PATH: {INSTALL_HINT}"))
}

/// [`require_program`] for each of `programs`.
pub fn require_programs(programs: &[&str]) {
    for program in programs {
        require_program(program);
    }
}

/// Starts an environment, then runs `scenario` in it; either failing panics with the whole error
/// chain. The panic comes while the environment is alive, so its processes' output is printed
/// as their guards drop.
pub async fn run_scenario<E>(
    start: impl Future<Output = Result<E>>,
    scenario: impl AsyncFnOnce(&mut E) -> Result<()>,
) {
    let mut env = start
        .await
        .unwrap_or_else(|e| panic!("starting the environment: {e:#}"));
    if let Err(e) = scenario(&mut env).await {
        panic!("{e:#}");
    }
}

/// `fut`'s result, or an error once `limit` has passed.
pub async fn within<T>(limit: Duration, fut: impl Future<Output = Result<T>>) -> Result<T> {
    tokio::time::timeout(limit, fut)
        .await
        .map_err(|_| anyhow!("took over {limit:?}"))?
}

/// A child process that is killed and reaped when dropped, so a failing assert leaks nothing.
/// Its stdout and stderr go to a log file (a pipe nobody reads would block a chatty child);
/// the log is printed when the guard drops during a panic.
pub struct ChildGuard {
    name: String,
    child: Option<Child>,
    log: PathBuf,
}

impl ChildGuard {
    /// Spawns `cmd` with its output in `log`.
    pub fn spawn(name: &str, mut cmd: Command, log: PathBuf) -> Result<Self> {
        let out = fs::File::create(&log).with_context(|| format!("creating {}", log.display()))?;
        let err = out.try_clone()?;
        let child = cmd
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .spawn()
            .with_context(|| format!("spawning {name}: {cmd:?}"))?;
        Ok(Self {
            name: name.to_owned(),
            child: Some(child),
            log,
        })
    }

    /// The process id (0 once killed).
    pub fn id(&self) -> u32 {
        self.child.as_ref().map_or(0, |c| c.id())
    }

    /// The exit status if the process has already ended.
    pub fn exited(&mut self) -> Option<ExitStatus> {
        self.child.as_mut()?.try_wait().ok().flatten()
    }

    /// Everything the process has printed so far.
    pub fn output(&self) -> String {
        fs::read_to_string(&self.log).unwrap_or_else(|e| format!("<no log: {e}>"))
    }

    /// Kills the process (if still running) and waits for it to be gone.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for ChildGuard {
    fn drop(&mut self) {
        self.kill();
        if std::thread::panicking() {
            let output = self.output();
            let lines: Vec<&str> = output.lines().collect();
            let tail = &lines[lines.len().saturating_sub(LOG_TAIL_LINES)..];
            eprintln!(
                "----- {} (last {} lines of its output) -----\n{}",
                self.name,
                tail.len(),
                tail.join("\n")
            );
        }
    }
}

/// Polls `probe` until it answers `Ok`; its `Err` says what it saw instead. Fails early, with the
/// process output, if `process` exits first, and after [`READY_TIMEOUT`] otherwise. `what` is
/// what readiness means, as in "did not {what}".
pub async fn wait_until<F, Fut>(process: &mut ChildGuard, what: &str, mut probe: F) -> Result<()>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<(), String>>,
{
    let deadline = Instant::now() + READY_TIMEOUT;
    loop {
        if let Some(status) = process.exited() {
            bail!(
                "{} exited with {status} before it would {what}; output:\n{}",
                process.name,
                process.output()
            );
        }
        let last = match probe().await {
            Ok(()) => return Ok(()),
            Err(last) => last,
        };
        if Instant::now() > deadline {
            bail!(
                "{} did not {what} within {READY_TIMEOUT:?}, last: {last}; output:\n{}",
                process.name,
                process.output()
            );
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Waits until `GET /v2/` on `127.0.0.1:{port}` answers one of `ready` (see [`wait_until`]).
async fn wait_ready(port: u16, process: &mut ChildGuard, ready: &[u16]) -> Result<()> {
    let what = format!("answer GET /v2/ on port {port} with one of {ready:?}");
    wait_until(process, &what, || async move {
        match tokio::time::timeout(Duration::from_secs(2), get_status(port, "/v2/")).await {
            Ok(Ok(status)) if ready.contains(&status) => Ok(()),
            Ok(Ok(status)) => Err(format!("status {status}")),
            Ok(Err(e)) => Err(format!("error: {e}")),
            Err(_) => Err("no answer within 2s".to_owned()),
        }
    })
    .await
}

/// The status code of `GET {path}` on `127.0.0.1:{port}`, over a bare HTTP/1.1 connection:
/// a readiness probe needs nothing more than the status line.
async fn get_status(port: u16, path: &str) -> Result<u16> {
    use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
    let mut stream = tokio::net::TcpStream::connect(("127.0.0.1", port)).await?;
    let request =
        format!("GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nConnection: close\r\n\r\n");
    stream.write_all(request.as_bytes()).await?;
    let mut line = String::new();
    BufReader::new(stream).read_line(&mut line).await?;
    // "HTTP/1.1 200 OK"
    line.split_whitespace()
        .nth(1)
        .and_then(|code| code.parse().ok())
        .with_context(|| format!("not an HTTP status line: {line:?}"))
}

/// Starts a server on a free port and waits until `GET /v2/` answers one of `ready`. `spawn`
/// gets the port and returns the running process. The port is only known free until the
/// process binds it, so a bind race with another process ("address already in use") is retried
/// with a new port.
pub async fn start_on_free_port<F>(ready: &[u16], mut spawn: F) -> Result<(u16, ChildGuard)>
where
    F: FnMut(u16) -> Result<ChildGuard>,
{
    const ATTEMPTS: usize = 3;
    let mut attempt = 1;
    loop {
        let port = free_port();
        let mut process = spawn(port)?;
        match wait_ready(port, &mut process, ready).await {
            Ok(()) => return Ok((port, process)),
            // Whether or not it exited: garage logs the clash of its S3 port and hangs.
            Err(e)
                if attempt < ATTEMPTS
                    && process
                        .output()
                        .to_lowercase()
                        .contains("address already in use") =>
            {
                process.kill();
                eprintln!("port {port} was taken, retrying: {e:#}");
                attempt += 1;
            }
            Err(e) => return Err(e),
        }
    }
}

/// How a command run by [`run_bounded`] ended.
pub struct Finished {
    pub described: String,
    pub status: ExitStatus,
    /// stdout and stderr, as written.
    pub output: String,
    pub elapsed: Duration,
}

impl Finished {
    pub fn success(&self) -> bool {
        self.status.success()
    }

    /// The output, or an error carrying it unless the command succeeded.
    pub fn ok(self) -> Result<String> {
        ensure!(
            self.success(),
            "{} failed with {}; output:\n{}",
            self.described,
            self.status,
            self.output
        );
        Ok(self.output)
    }
}

/// Runs `cmd` to completion, its output kept in a temporary file, killing it after `limit`.
/// `Err` when it could not start or outlived `limit` (with its output); an unsuccessful exit
/// is for the caller to judge.
pub async fn run_bounded(described: &str, cmd: Command, limit: Duration) -> Result<Finished> {
    let log = tempfile::NamedTempFile::new()?;
    let started = Instant::now();
    // Dropped before `log`: killed if this future is dropped half way.
    let mut child = ChildGuard::spawn(described, cmd, log.path().to_owned())?;
    let status = loop {
        if let Some(status) = child.exited() {
            break status;
        }
        if started.elapsed() > limit {
            child.kill();
            bail!(
                "{described} still running after {limit:?}; killed. Output:\n{}",
                child.output()
            );
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    Ok(Finished {
        described: described.to_owned(),
        status,
        output: child.output(),
        elapsed: started.elapsed(),
    })
}

/// A `docker-registry serve` (CNCF distribution 2.8) with filesystem storage, whose output can
/// be read: its access log shows every request it handled and from which User-Agent, which is
/// how a test proves that a pull was served from the cache, or that a client went around it.
pub struct DockerRegistry {
    pub port: u16,
    process: ChildGuard,
    _dir: tempfile::TempDir,
}

impl DockerRegistry {
    /// No auth: `GET /v2/` answers 200.
    pub async fn start(name: &str) -> Result<Self> {
        Self::start_with(name, "").await
    }

    /// `extra` is appended to the registry's `config.yml`: top-level sections such as `auth:`
    /// or `proxy:`. Ready once `GET /v2/` answers 200, or 401 for a registry demanding auth.
    pub async fn start_with(name: &str, extra: &str) -> Result<Self> {
        let bin = require_program("docker-registry");
        let dir = tempfile::Builder::new()
            .prefix(&format!("{name}-"))
            .tempdir()?;
        let root = dir.path().to_owned();
        let (port, process) = start_on_free_port(&[200, 401], |port| {
            let config = root.join("config.yml");
            fs::write(&config, registry_config(&root.join("data"), port, extra))?;
            let mut cmd = Command::new(&bin);
            cmd.arg("serve").arg(&config);
            ChildGuard::spawn(name, cmd, root.join("registry.log"))
        })
        .await?;
        Ok(Self {
            port,
            process,
            _dir: dir,
        })
    }

    /// [`DockerRegistry::start`], then `image` pushed to it as `reference` (`repo:tag`) from a
    /// layout written under `work`.
    pub async fn seeded(
        name: &str,
        work: &Path,
        image: &SeedImage,
        reference: &str,
    ) -> Result<Self> {
        let registry = Self::start(name).await?;
        image.push(work, &registry.host(), reference, None).await?;
        Ok(registry)
    }

    /// `127.0.0.1:<port>`, as used in `docker://` references.
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

    /// Everything the registry has logged so far, its access log included.
    pub fn output(&self) -> String {
        self.process.output()
    }

    /// Every request answered so far, oldest first. docker-registry writes each line as the
    /// response completes; the tests read the log after the client that caused the requests has
    /// exited, by which time entrepot has long read those responses to the end.
    pub fn requests(&self) -> Vec<AccessLine> {
        parse_access_log(&self.output())
    }

    /// The requests after the first `since` (a previous `requests().len()`).
    pub fn requests_since(&self, since: usize) -> Vec<AccessLine> {
        self.requests().into_iter().skip(since).collect()
    }

    /// The requests whose User-Agent is entrepot's: what the proxy asked for.
    pub fn requests_from_entrepot(&self) -> Vec<AccessLine> {
        self.requests()
            .into_iter()
            .filter(AccessLine::sent_by_entrepot)
            .collect()
    }

    /// How often the registry answered each status to entrepot for targets containing
    /// `path_contains`.
    pub fn entrepot_statuses(&self, path_contains: &str) -> HashMap<u16, usize> {
        let mut out = HashMap::new();
        for r in self.requests_from_entrepot() {
            if r.target.contains(path_contains) {
                *out.entry(r.status).or_insert(0) += 1;
            }
        }
        out
    }
}

fn registry_config(data: &Path, port: u16, extra: &str) -> String {
    format!(
        "version: 0.1
log:
  level: info
  accesslog:
    disabled: false
storage:
  filesystem:
    rootdirectory: {data}
  delete:
    enabled: true
http:
  addr: 127.0.0.1:{port}
{extra}",
        data = data.display()
    )
}

/// One line of docker-registry's combined-format access log:
/// `127.0.0.1 - - [21/Nov/2026:12:50:03 +0000] "GET /v2/r/x/tags/list HTTP/1.1" 200 49 "" "curl/7.88.1"`
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AccessLine {
    pub method: String,
    /// Path and query, as sent.
    pub target: String,
    pub status: u16,
    pub user_agent: String,
}

impl AccessLine {
    pub fn sent_by_entrepot(&self) -> bool {
        self.user_agent.starts_with(ENTREPOT_AGENT)
    }
}

impl std::fmt::Display for AccessLine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} {} -> {} ({})",
            self.method, self.target, self.status, self.user_agent
        )
    }
}

/// The access lines of a docker-registry log; its other (logrus `time=... msg=...`) lines are
/// skipped.
pub fn parse_access_log(log: &str) -> Vec<AccessLine> {
    log.lines().filter_map(parse_access_line).collect()
}

fn parse_access_line(line: &str) -> Option<AccessLine> {
    let rest = &line[line.find("] \"")? + 3..];
    let (request, rest) = rest.split_once('"')?;
    let mut request = request.split(' ');
    let method = request.next()?.to_owned();
    let target = request.next()?.to_owned();
    let status = rest.split_whitespace().next()?.parse().ok()?;
    // The user agent is the last quoted field.
    let rest = rest.trim_end().strip_suffix('"')?;
    let user_agent = rest[rest.rfind('"')? + 1..].to_owned();
    Some(AccessLine {
        method,
        target,
        status,
        user_agent,
    })
}

/// The `entrepot serve --config <file>` binary under test, with its store in `dir/store`.
pub struct Entrepot {
    pub port: u16,
    pub store: PathBuf,
    process: ChildGuard,
}

impl Entrepot {
    /// Writes `[server]` and `[storage]` around `upstreams` (the `[[upstream]]` tables) into
    /// `dir/entrepot.toml`, starts the binary and waits until `GET /v2/` answers 200.
    pub async fn start(dir: &Path, upstreams: &str) -> Result<Self> {
        Self::start_with_storage(dir, "", upstreams).await
    }

    /// [`Entrepot::start`] with more `[storage]` keys (and tables such as `[storage.s3]`).
    pub async fn start_with_storage(dir: &Path, storage: &str, upstreams: &str) -> Result<Self> {
        let bin = Path::new(env!("CARGO_BIN_EXE_entrepot"));
        let store = dir.join("store");
        let config = dir.join("entrepot.toml");
        let (port, process) = start_on_free_port(&[200], |port| {
            let toml = format!(
                "[server]\nlisten = \"127.0.0.1:{port}\"\n\n[storage]\nroot = {store:?}\n{storage}\n\n{upstreams}",
                store = store.display().to_string(),
            );
            fs::write(&config, toml)?;
            let mut cmd = Command::new(bin);
            cmd.arg("serve")
                .arg("--config")
                .arg(&config)
                .current_dir(dir)
                .env("RUST_LOG", "info,entrepot=debug")
                .env("RUST_BACKTRACE", "1");
            ChildGuard::spawn("entrepot", cmd, dir.join("entrepot.log"))
        })
        .await?;
        Ok(Self {
            port,
            store,
            process,
        })
    }

    /// `127.0.0.1:<port>`, as used in `docker://` references.
    pub fn host(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    pub fn output(&self) -> String {
        self.process.output()
    }

    /// Kills the process with SIGKILL, as a crash would.
    pub fn kill(&mut self) {
        self.process.kill();
    }

    /// Path of the cached copy of `digest` (`sha256:<hex>`) in the store.
    pub fn stored_blob(&self, digest: &str) -> PathBuf {
        blob_path(&self.store, digest)
    }

    /// Checks that the store holds a copy of each of `digests` that hashes to its name. A fill
    /// may commit just after its client saw the last byte, so each gets [`STORE_GRACE`] to
    /// appear.
    pub async fn check_stored<D: AsRef<str>>(
        &self,
        digests: impl IntoIterator<Item = D>,
    ) -> Result<()> {
        for digest in digests {
            let digest = digest.as_ref();
            let path = self.stored_blob(digest);
            let deadline = Instant::now() + STORE_GRACE;
            while !path.is_file() && Instant::now() < deadline {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            verified_blob(&self.store, digest)
                .with_context(|| format!("{digest} in entrepot's store"))?;
        }
        Ok(())
    }

    /// `skopeo copy docker://<entrepot>/<reference>` into the fresh layout `work/pull-<label>`,
    /// checking that it is `expected`, manifest and blobs.
    pub async fn pull_checked(
        &self,
        work: &Path,
        label: &str,
        reference: &str,
        expected: &SeedImage,
    ) -> Result<()> {
        let out = work.join(format!("pull-{label}"));
        let source = format!("docker://{}/{reference}", self.host());
        skopeo_copy(&source, &format!("oci:{}:x", out.display()))
            .await
            .with_context(|| format!("{label}: pulling {source}"))?;
        let pulled = read_layout(&out, "x").with_context(|| format!("{label}: pulled layout"))?;
        pulled.expect(label, &expected.manifest.digest, &expected.blob_digests())
    }

    /// [`Entrepot::pull_checked`], then [`Entrepot::check_stored`] for the manifest and every
    /// blob.
    pub async fn pull_and_check(
        &self,
        work: &Path,
        label: &str,
        reference: &str,
        expected: &SeedImage,
    ) -> Result<()> {
        self.pull_checked(work, label, reference, expected).await?;
        self.check_stored(expected.all_digests())
            .await
            .with_context(|| format!("{label}: after the pull"))
    }
}

/// One `skopeo copy` over plain HTTP: no signature policy, no retries, no credentials unless
/// given. Bounded by skopeo's `--command-timeout` and, for a skopeo that ignores it, killed a
/// little later.
pub struct SkopeoCopy<'a> {
    /// Global options, before `copy` (`--override-arch arm64`).
    pub global: &'a [&'a str],
    /// Options of `copy` (`--all`).
    pub flags: &'a [&'a str],
    /// `user:pass` for the source registry.
    pub src_creds: Option<&'a str>,
    /// `user:pass` for the destination registry.
    pub dest_creds: Option<&'a str>,
    /// How long it may take; at most [`SKOPEO_TIMEOUT`].
    pub limit: Duration,
}

impl Default for SkopeoCopy<'_> {
    fn default() -> Self {
        Self::DEFAULT
    }
}

impl SkopeoCopy<'_> {
    /// No extra options or credentials, [`SKOPEO_TIMEOUT`]; usable in a `const`.
    pub const DEFAULT: Self = Self {
        global: &[],
        flags: &[],
        src_creds: None,
        dest_creds: None,
        limit: SKOPEO_TIMEOUT,
    };

    /// `skopeo [global...] copy [flags...] src dst`. `Err` only when skopeo could not run or
    /// hung; a failed copy is in the result.
    pub async fn run(&self, src: &str, dst: &str) -> Result<Finished> {
        let limit = self.limit.min(SKOPEO_TIMEOUT);
        let mut cmd = Command::new(require_program("skopeo"));
        cmd.arg("--insecure-policy")
            .args(self.global)
            .arg("--command-timeout")
            .arg(format!("{}s", limit.as_secs().max(1)))
            .args(["copy", "--src-tls-verify=false", "--dest-tls-verify=false"])
            .args(["--retry-times", "0"]);
        match self.src_creds {
            Some(c) => cmd.arg("--src-creds").arg(c),
            None => cmd.arg("--src-no-creds"),
        };
        match self.dest_creds {
            Some(c) => cmd.arg("--dest-creds").arg(c),
            None => cmd.arg("--dest-no-creds"),
        };
        cmd.args(self.flags).arg(src).arg(dst);
        let described = std::iter::once("skopeo")
            .chain(self.global.iter().copied())
            .chain(["copy"])
            .chain(self.flags.iter().copied())
            .chain([src, dst])
            .collect::<Vec<_>>()
            .join(" ");
        // A little beyond skopeo's own timeout, so skopeo normally reports it itself.
        run_bounded(&described, cmd, limit + Duration::from_secs(10)).await
    }

    /// [`SkopeoCopy::run`], failing with skopeo's output unless the copy succeeded.
    pub async fn copy(&self, src: &str, dst: &str) -> Result<()> {
        self.run(src, dst).await?.ok().map(drop)
    }
}

/// `skopeo copy src dst` with the defaults of [`SkopeoCopy`].
pub async fn skopeo_copy(src: &str, dst: &str) -> Result<()> {
    SkopeoCopy::default().copy(src, dst).await
}

/// One blob of an image: its bytes, digest and media type.
pub struct Blob {
    pub media_type: &'static str,
    pub digest: String,
    pub data: Vec<u8>,
}

impl Blob {
    pub fn new(media_type: &'static str, data: Vec<u8>) -> Self {
        Self {
            media_type,
            digest: sha256_digest(&data),
            data,
        }
    }

    /// A JSON blob.
    pub fn json(media_type: &'static str, value: &serde_json::Value) -> Self {
        Self::new(media_type, serde_json::to_vec(value).expect("json"))
    }

    /// `{"mediaType", "digest", "size"}`.
    pub fn descriptor(&self) -> serde_json::Value {
        serde_json::json!({
            "mediaType": self.media_type,
            "digest": self.digest,
            "size": self.data.len(),
        })
    }
}

/// A generated single-platform OCI image: gzip layers, each a tar holding one file of random
/// bytes (so every image, and every test run, has blobs no cache has seen).
pub struct SeedImage {
    pub manifest: Blob,
    pub config: Blob,
    pub layers: Vec<Blob>,
}

impl SeedImage {
    /// An image with one layer per entry of `file_sizes`, that many random bytes in its file.
    pub fn generate(file_sizes: &[usize]) -> Self {
        let mut diff_ids = Vec::new();
        let layers: Vec<Blob> = file_sizes
            .iter()
            .enumerate()
            .map(|(i, &size)| {
                let tar = tar_one_file(&format!("file-{i}.bin"), &random_bytes(size, fresh_seed()));
                diff_ids.push(sha256_digest(&tar));
                Blob::new(OCI_LAYER, gzip_stored(&tar))
            })
            .collect();
        let config = Blob::json(
            OCI_CONFIG,
            &serde_json::json!({
                "architecture": "amd64",
                "os": "linux",
                "config": {},
                "rootfs": { "type": "layers", "diff_ids": diff_ids },
            }),
        );
        Self {
            manifest: image_manifest(&config, &layers),
            config,
            layers,
        }
    }

    /// Config digest followed by the layer digests, in manifest order.
    pub fn blob_digests(&self) -> Vec<String> {
        std::iter::once(&self.config)
            .chain(&self.layers)
            .map(|b| b.digest.clone())
            .collect()
    }

    /// The manifest digest, then [`SeedImage::blob_digests`].
    pub fn all_digests(&self) -> Vec<String> {
        let mut all = vec![self.manifest.digest.clone()];
        all.extend(self.blob_digests());
        all
    }

    /// Writes an OCI image layout at `dir` holding this image under `tag`, for `oci:<dir>:<tag>`.
    pub fn write_layout(&self, dir: &Path, tag: &str) -> Result<()> {
        let blobs = [&self.manifest, &self.config]
            .into_iter()
            .chain(&self.layers);
        write_layout(dir, blobs, &self.manifest, tag)
    }

    /// Pushes the image to the registry at `host` (`127.0.0.1:<port>`) as `reference`
    /// (`repo:tag`), with `creds` (`user:pass`) if given, from an OCI layout written under `work`.
    pub async fn push(
        &self,
        work: &Path,
        host: &str,
        reference: &str,
        creds: Option<&str>,
    ) -> Result<()> {
        let (repo, tag) = reference
            .rsplit_once(':')
            .context("reference needs a tag")?;
        let layout = work.join(format!(
            "seed-{}-{}",
            host.replace(':', "_"),
            repo.replace('/', "-")
        ));
        self.write_layout(&layout, tag)?;
        let push = SkopeoCopy {
            dest_creds: creds,
            ..SkopeoCopy::default()
        };
        push.copy(
            &format!("oci:{}:{tag}", layout.display()),
            &format!("docker://{host}/{reference}"),
        )
        .await
        .with_context(|| format!("seeding {reference} to {host}"))
    }
}

/// An OCI image manifest for `config` and `layers`.
pub fn image_manifest(config: &Blob, layers: &[Blob]) -> Blob {
    Blob::json(
        OCI_MANIFEST,
        &serde_json::json!({
            "schemaVersion": 2,
            "mediaType": OCI_MANIFEST,
            "config": config.descriptor(),
            "layers": layers.iter().map(Blob::descriptor).collect::<Vec<_>>(),
        }),
    )
}

/// Writes an OCI image layout at `dir`: each of `blobs` under `blobs/sha256/`, and an
/// `index.json` naming `top` (a manifest or an index among them) as `tag`.
pub fn write_layout<'b>(
    dir: &Path,
    blobs: impl IntoIterator<Item = &'b Blob>,
    top: &Blob,
    tag: &str,
) -> Result<()> {
    fs::create_dir_all(dir.join("blobs").join("sha256"))?;
    fs::write(dir.join("oci-layout"), r#"{"imageLayoutVersion":"1.0.0"}"#)?;
    for blob in blobs {
        fs::write(blob_path(dir, &blob.digest), &blob.data)?;
    }
    let mut entry = top.descriptor();
    entry["annotations"] = serde_json::json!({ "org.opencontainers.image.ref.name": tag });
    let index = serde_json::json!({ "schemaVersion": 2, "manifests": [entry] });
    fs::write(dir.join("index.json"), serde_json::to_vec(&index)?)?;
    Ok(())
}

/// What `skopeo copy ... oci:<dir>:<tag>` left in an OCI layout.
pub struct PulledImage {
    pub manifest_digest: String,
    /// Config digest followed by the layer digests, in manifest order.
    pub blob_digests: Vec<String>,
}

impl PulledImage {
    /// Checks that this is the image with manifest `manifest` and config and layers
    /// `blob_digests`.
    pub fn expect(&self, label: &str, manifest: &str, blob_digests: &[String]) -> Result<()> {
        ensure!(
            self.manifest_digest == manifest,
            "{label}: pulled manifest {} but expected {manifest}",
            self.manifest_digest
        );
        ensure!(
            self.blob_digests == blob_digests,
            "{label}: pulled blobs {:?} but expected {blob_digests:?}",
            self.blob_digests
        );
        Ok(())
    }
}

/// Reads the image tagged `tag` from the OCI layout at `dir`, checking that every blob it
/// references is present and hashes to its name.
pub fn read_layout(dir: &Path, tag: &str) -> Result<PulledImage> {
    let entry = tagged_entry(dir, tag)?;
    let manifest_digest = entry["digest"]
        .as_str()
        .with_context(|| format!("entry without digest: {entry}"))?
        .to_owned();
    let blob_digests = manifest_blobs(dir, &manifest_digest)?;
    Ok(PulledImage {
        manifest_digest,
        blob_digests,
    })
}

/// The entry of the layout's `index.json` tagged `tag`.
pub fn tagged_entry(dir: &Path, tag: &str) -> Result<serde_json::Value> {
    let index: serde_json::Value = serde_json::from_slice(&fs::read(dir.join("index.json"))?)?;
    index["manifests"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|m| m["annotations"]["org.opencontainers.image.ref.name"] == tag)
        .cloned()
        .with_context(|| format!("no entry tagged {tag} in {}/index.json", dir.display()))
}

/// Reads the image manifest `digest` from the layout (or store) at `root` and checks that it
/// and every blob it references are present and hash to their names. Returns the config digest
/// followed by the layer digests, in manifest order.
pub fn manifest_blobs(root: &Path, digest: &str) -> Result<Vec<String>> {
    let manifest: serde_json::Value = serde_json::from_slice(&verified_blob(root, digest)?)?;
    let descriptors = std::iter::once(&manifest["config"])
        .chain(manifest["layers"].as_array().into_iter().flatten());
    let mut blob_digests = Vec::new();
    for descriptor in descriptors {
        let digest = descriptor["digest"]
            .as_str()
            .with_context(|| format!("descriptor without digest in {manifest}"))?;
        verified_blob(root, digest)?;
        blob_digests.push(digest.to_owned());
    }
    Ok(blob_digests)
}

/// Path of `digest` in the OCI layout (or entrepot store) rooted at `root`.
pub fn blob_path(root: &Path, digest: &str) -> PathBuf {
    root.join("blobs")
        .join("sha256")
        .join(digest.trim_start_matches("sha256:"))
}

/// The bytes of `digest` under `root`, checked to hash to it.
pub fn verified_blob(root: &Path, digest: &str) -> Result<Vec<u8>> {
    let path = blob_path(root, digest);
    let data = fs::read(&path).with_context(|| format!("reading {}", path.display()))?;
    let actual = sha256_digest(&data);
    ensure!(actual == digest, "{} hashes to {actual}", path.display());
    Ok(data)
}

/// A seed no other call in this run, nor (by the clock) in an earlier one, has had: so generated
/// images have blobs no cache has seen.
fn fresh_seed() -> u64 {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64);
    nanos
        ^ (u64::from(std::process::id()) << 32)
        ^ COUNTER
            .fetch_add(1, Ordering::Relaxed)
            .wrapping_mul(0x9E37_79B9_7F4A_7C15)
}

/// A ustar archive holding one regular file, built by hand: a 512-byte header, the data padded
/// to 512 bytes, and two zero blocks.
pub fn tar_one_file(name: &str, data: &[u8]) -> Vec<u8> {
    fn octal(field: &mut [u8], value: u64) {
        let text = format!("{value:0width$o}\0", width = field.len() - 1);
        field.copy_from_slice(text.as_bytes());
    }
    assert!(name.len() < 100, "tar name too long: {name}");
    let mut header = [0u8; 512];
    header[..name.len()].copy_from_slice(name.as_bytes());
    octal(&mut header[100..108], 0o644); // mode
    octal(&mut header[108..116], 0); // uid
    octal(&mut header[116..124], 0); // gid
    octal(&mut header[124..136], data.len() as u64); // size
    octal(&mut header[136..148], 0); // mtime
    header[148..156].fill(b' '); // checksum counts as spaces while summing
    header[156] = b'0'; // regular file
    header[257..263].copy_from_slice(b"ustar\0");
    header[263..265].copy_from_slice(b"00");
    let sum: u32 = header.iter().map(|&b| u32::from(b)).sum();
    header[148..156].copy_from_slice(format!("{sum:06o}\0 ").as_bytes());

    let padded = data.len().div_ceil(512) * 512;
    let mut tar = Vec::with_capacity(512 + padded + 1024);
    tar.extend_from_slice(&header);
    tar.extend_from_slice(data);
    tar.resize(512 + padded + 1024, 0);
    tar
}

/// A valid gzip member made of stored (uncompressed) deflate blocks: random data does not
/// compress anyway, and it keeps the test free of a compression crate.
pub fn gzip_stored(data: &[u8]) -> Vec<u8> {
    const MAX_BLOCK: usize = 65_535;
    let mut out = vec![0x1f, 0x8b, 8, 0, 0, 0, 0, 0, 0, 255];
    let mut blocks = data.chunks(MAX_BLOCK).peekable();
    if data.is_empty() {
        out.extend_from_slice(&[1, 0, 0, 0xff, 0xff]);
    }
    while let Some(block) = blocks.next() {
        let last = blocks.peek().is_none();
        let len = u16::try_from(block.len()).expect("block fits u16");
        out.push(u8::from(last)); // BFINAL, BTYPE = 00 (stored)
        out.extend_from_slice(&len.to_le_bytes());
        out.extend_from_slice(&(!len).to_le_bytes());
        out.extend_from_slice(block);
    }
    out.extend_from_slice(&crc32(data).to_le_bytes());
    out.extend_from_slice(&(data.len() as u32).to_le_bytes());
    out
}

fn crc32(data: &[u8]) -> u32 {
    let table: Vec<u32> = (0..256u32)
        .map(|n| {
            (0..8).fold(n, |c, _| {
                if c & 1 != 0 {
                    0xEDB8_8320 ^ (c >> 1)
                } else {
                    c >> 1
                }
            })
        })
        .collect();
    !data.iter().fold(!0u32, |crc, &b| {
        table[((crc ^ u32::from(b)) & 0xff) as usize] ^ (crc >> 8)
    })
}
