//! Real programs for end-to-end tests: `docker-registry` upstreams, the `entrepot` binary,
//! `skopeo` copies, OCI image layouts written on disk, and child processes killed on drop.
//!
//! The programs come from Debian packages that `.ci/install-deps.sh` installs. A test that
//! needs one and cannot find it fails (never skips), saying to run that script.

use std::{
    fs,
    path::{Path, PathBuf},
    process::{Child, Command, ExitStatus, Stdio},
    sync::atomic::{AtomicU64, Ordering},
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use anyhow::{bail, Context, Result};
use sha2::{Digest, Sha256};

use super::free_port;

/// What to do when a program is missing.
pub const INSTALL_HINT: &str =
    "run `bash .ci/install-deps.sh` to install docker-registry and skopeo";

/// How long a started program may take to answer `GET /v2/`.
pub const READY_TIMEOUT: Duration = Duration::from_secs(20);

/// How much of a process's output to print when a test fails.
const LOG_TAIL_LINES: usize = 200;

/// Ceiling for one `skopeo copy`, so a proxy that hangs fails the test instead of stalling it.
pub const SKOPEO_TIMEOUT: Duration = Duration::from_secs(120);

pub const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
pub const OCI_CONFIG: &str = "application/vnd.oci.image.config.v1+json";
pub const OCI_LAYER_GZIP: &str = "application/vnd.oci.image.layer.v1.tar+gzip";

/// Full path of `program` on PATH; panics with [`INSTALL_HINT`] when it is not there.
pub fn require_program(program: &str) -> PathBuf {
    let found = std::env::var_os("PATH").and_then(|path| {
        std::env::split_paths(&path)
            .map(|dir| dir.join(program))
            .find(|candidate| candidate.is_file())
    });
    found.unwrap_or_else(|| panic!("`{program}` was not found on PATH: {INSTALL_HINT}"))
}

/// `sha256:<hex>` of `data`.
pub fn sha256_digest(data: &[u8]) -> String {
    format!("sha256:{}", hex::encode(Sha256::digest(data)))
}

/// `sha256:<hex>` of a file's contents.
pub fn file_digest(path: &Path) -> Result<String> {
    let data = fs::read(path).with_context(|| format!("reading {}", path.display()))?;
    Ok(sha256_digest(&data))
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

/// Polls `GET /v2/` on `127.0.0.1:{port}` until it answers 200. Fails early, with the process
/// output, if the process exits first, and after [`READY_TIMEOUT`] otherwise.
pub async fn wait_ready(port: u16, process: &mut ChildGuard) -> Result<()> {
    let deadline = Instant::now() + READY_TIMEOUT;
    loop {
        if let Some(status) = process.exited() {
            bail!(
                "{} exited with {status} before answering GET /v2/ on port {port}; output:\n{}",
                process.name,
                process.output()
            );
        }
        let last =
            match tokio::time::timeout(Duration::from_secs(2), get_status(port, "/v2/")).await {
                Ok(Ok(200)) => return Ok(()),
                Ok(Ok(status)) => format!("status {status}"),
                Ok(Err(e)) => format!("error: {e}"),
                Err(_) => "no answer within 2s".to_owned(),
            };
        if Instant::now() > deadline {
            bail!(
                "{} did not answer 200 on GET /v2/ (port {port}) within {READY_TIMEOUT:?}, \
                 last: {last}; output:\n{}",
                process.name,
                process.output()
            );
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The status code of `GET {path}` on `127.0.0.1:{port}`, over a bare HTTP/1.1 connection.
/// (reqwest is built here without a TLS provider and refuses to build a client without one;
/// a readiness probe needs nothing more than the status line.)
pub async fn get_status(port: u16, path: &str) -> Result<u16> {
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

/// Starts a server on a free port and waits until it is ready. `spawn` gets the port and
/// returns the running process. The port is only known free until the process binds it, so a
/// bind race with another process ("address already in use") is retried with a new port.
pub async fn start_on_free_port<F>(mut spawn: F) -> Result<(u16, ChildGuard)>
where
    F: FnMut(u16) -> Result<ChildGuard>,
{
    const ATTEMPTS: usize = 3;
    let mut attempt = 1;
    loop {
        let port = free_port();
        let mut process = spawn(port)?;
        match wait_ready(port, &mut process).await {
            Ok(()) => return Ok((port, process)),
            Err(e)
                if attempt < ATTEMPTS
                    && process.exited().is_some()
                    && process
                        .output()
                        .to_lowercase()
                        .contains("address already in use") =>
            {
                eprintln!("port {port} was taken, retrying: {e:#}");
                attempt += 1;
            }
            Err(e) => return Err(e),
        }
    }
}

/// A `docker-registry serve` (CNCF distribution) with filesystem storage and no auth.
pub struct DockerRegistry {
    pub port: u16,
    process: ChildGuard,
    _dir: tempfile::TempDir,
}

impl DockerRegistry {
    pub async fn start(name: &str) -> Result<Self> {
        let bin = require_program("docker-registry");
        let dir = tempfile::Builder::new()
            .prefix(&format!("{name}-"))
            .tempdir()?;
        let root = dir.path().to_owned();
        let (port, process) = start_on_free_port(|port| {
            let config = root.join("config.yml");
            fs::write(&config, registry_config(&root.join("data"), port))?;
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
}

fn registry_config(data: &Path, port: u16) -> String {
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
",
        data = data.display()
    )
}

/// The `entrepot serve --config <file>` binary under test, with its store in `dir/store`.
pub struct Entrepot {
    pub port: u16,
    pub store: PathBuf,
    process: ChildGuard,
}

impl Entrepot {
    /// Writes `[server]` and `[storage]` around `upstreams` (the `[[upstream]]` tables) into
    /// `dir/entrepot.toml`, starts `bin` and waits until `GET /v2/` answers 200.
    pub async fn start(bin: &Path, dir: &Path, upstreams: &str) -> Result<Self> {
        let store = dir.join("store");
        let config = dir.join("entrepot.toml");
        let (port, process) = start_on_free_port(|port| {
            let toml = format!(
                "[server]\nlisten = \"127.0.0.1:{port}\"\n\n[storage]\nroot = {store:?}\n\n{upstreams}",
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

    /// Path of the cached copy of `digest` (`sha256:<hex>`) in the store.
    pub fn stored_blob(&self, digest: &str) -> PathBuf {
        let hex = digest.strip_prefix("sha256:").unwrap_or(digest);
        self.store.join("blobs").join("sha256").join(hex)
    }
}

/// `skopeo copy src dst` over plain HTTP with no credentials and no signature policy.
/// Runs on a blocking thread; the error carries skopeo's output.
pub async fn skopeo_copy(src: &str, dst: &str) -> Result<()> {
    let bin = require_program("skopeo");
    let mut cmd = Command::new(bin);
    cmd.arg("--insecure-policy")
        .arg("--command-timeout")
        .arg(format!("{}s", SKOPEO_TIMEOUT.as_secs()))
        .args(["copy", "--src-tls-verify=false", "--dest-tls-verify=false"])
        .args(["--src-no-creds", "--dest-no-creds", "--retry-times", "0"])
        .arg(src)
        .arg(dst)
        .stdin(Stdio::null());
    let described = format!("skopeo copy {src} {dst}");
    let out = tokio::task::spawn_blocking(move || cmd.output())
        .await?
        .with_context(|| format!("running {described}"))?;
    if !out.status.success() {
        bail!(
            "{described} failed with {}:\n{}{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(())
}

/// One blob of an image: its bytes, digest and media type.
pub struct Blob {
    pub media_type: &'static str,
    pub digest: String,
    pub data: Vec<u8>,
}

impl Blob {
    fn new(media_type: &'static str, data: Vec<u8>) -> Self {
        Self {
            media_type,
            digest: sha256_digest(&data),
            data,
        }
    }

    fn descriptor(&self) -> serde_json::Value {
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
        let mut rng = Rng::new();
        let mut diff_ids = Vec::new();
        let layers: Vec<Blob> = file_sizes
            .iter()
            .enumerate()
            .map(|(i, &size)| {
                let tar = tar_one_file(&format!("file-{i}.bin"), &rng.bytes(size));
                diff_ids.push(sha256_digest(&tar));
                Blob::new(OCI_LAYER_GZIP, gzip_stored(&tar))
            })
            .collect();
        let config = serde_json::json!({
            "architecture": "amd64",
            "os": "linux",
            "config": {},
            "rootfs": { "type": "layers", "diff_ids": diff_ids },
        });
        let config = Blob::new(OCI_CONFIG, serde_json::to_vec(&config).expect("json"));
        let manifest = serde_json::json!({
            "schemaVersion": 2,
            "mediaType": OCI_MANIFEST,
            "config": config.descriptor(),
            "layers": layers.iter().map(Blob::descriptor).collect::<Vec<_>>(),
        });
        let manifest = Blob::new(OCI_MANIFEST, serde_json::to_vec(&manifest).expect("json"));
        Self {
            manifest,
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

    /// Writes an OCI image layout at `dir` holding this image under `tag`, for `oci:<dir>:<tag>`.
    pub fn write_layout(&self, dir: &Path, tag: &str) -> Result<()> {
        let blobs = dir.join("blobs").join("sha256");
        fs::create_dir_all(&blobs)?;
        fs::write(dir.join("oci-layout"), r#"{"imageLayoutVersion":"1.0.0"}"#)?;
        for blob in [&self.manifest, &self.config]
            .into_iter()
            .chain(&self.layers)
        {
            let hex = blob.digest.trim_start_matches("sha256:");
            fs::write(blobs.join(hex), &blob.data)?;
        }
        let mut entry = self.manifest.descriptor();
        entry["annotations"] = serde_json::json!({ "org.opencontainers.image.ref.name": tag });
        let index = serde_json::json!({ "schemaVersion": 2, "manifests": [entry] });
        fs::write(dir.join("index.json"), serde_json::to_vec(&index)?)?;
        Ok(())
    }
}

/// What `skopeo copy ... oci:<dir>:<tag>` left in an OCI layout.
pub struct PulledImage {
    pub manifest_digest: String,
    /// Config digest followed by the layer digests, in manifest order.
    pub blob_digests: Vec<String>,
}

/// Reads the image tagged `tag` from the OCI layout at `dir`, checking that every blob it
/// references is present and hashes to its name.
pub fn read_layout(dir: &Path, tag: &str) -> Result<PulledImage> {
    let index: serde_json::Value = serde_json::from_slice(&fs::read(dir.join("index.json"))?)?;
    let manifest_digest = index["manifests"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|m| m["annotations"]["org.opencontainers.image.ref.name"] == tag)
        .and_then(|m| m["digest"].as_str())
        .with_context(|| format!("no manifest tagged {tag} in {}/index.json", dir.display()))?
        .to_owned();
    let blob_path = |digest: &str| {
        dir.join("blobs")
            .join("sha256")
            .join(digest.trim_start_matches("sha256:"))
    };
    let verified = |digest: &str| -> Result<Vec<u8>> {
        let path = blob_path(digest);
        let data = fs::read(&path).with_context(|| format!("reading {}", path.display()))?;
        let actual = sha256_digest(&data);
        if actual != digest {
            bail!("{} hashes to {actual}", path.display());
        }
        Ok(data)
    };
    let manifest: serde_json::Value = serde_json::from_slice(&verified(&manifest_digest)?)?;
    let mut blob_digests = Vec::new();
    let descriptors = std::iter::once(&manifest["config"])
        .chain(manifest["layers"].as_array().into_iter().flatten());
    for descriptor in descriptors {
        let digest = descriptor["digest"]
            .as_str()
            .with_context(|| format!("descriptor without digest in {manifest}"))?;
        verified(digest)?;
        blob_digests.push(digest.to_owned());
    }
    Ok(PulledImage {
        manifest_digest,
        blob_digests,
    })
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

/// xorshift64*: fast, seeded per call from the clock and a counter. Not for anything secret.
struct Rng(u64);

impl Rng {
    fn new() -> Self {
        static COUNTER: AtomicU64 = AtomicU64::new(0);
        let nanos = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos() as u64);
        let seed = nanos
            ^ (u64::from(std::process::id()) << 32)
            ^ COUNTER
                .fetch_add(1, Ordering::Relaxed)
                .wrapping_mul(0x9E37_79B9_7F4A_7C15);
        Self(seed | 1)
    }

    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    fn bytes(&mut self, len: usize) -> Vec<u8> {
        let mut out = Vec::with_capacity(len + 8);
        while out.len() < len {
            out.extend_from_slice(&self.next().to_le_bytes());
        }
        out.truncate(len);
        out
    }
}
