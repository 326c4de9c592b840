//! A real Garage S3 server for the S3 storage tests: one node on 127.0.0.1 with free ports, its
//! data and metadata in a temporary directory it owns, an access key and a bucket ready to use,
//! killed with `kill -9` and restarted on the same data on demand.
//!
//! `garage` 2.5.0 is built by `.ci/install-garage.sh` (`cargo install`). A test that needs it
//! and cannot find it fails (never skips), saying to run that script.

use std::{
    fs,
    io::Read as _,
    path::{Path, PathBuf},
    process::Command,
    time::Duration,
};

use anyhow::{Context as _, Result};
use object_store::{aws::AmazonS3Builder, ClientOptions, ObjectStore as _, RetryConfig};

use super::free_port_besides;
use super::real::{run_bounded, start_on_free_port, wait_until, ChildGuard};

/// What to do when garage is missing.
pub const INSTALL_HINT: &str = "run `bash .ci/install-garage.sh` to install garage 2.5.0";

/// The S3 region every Garage here is configured with; SigV4 signatures must name it.
pub const REGION: &str = "garage";

/// The bucket [`Garage::start`] creates.
pub const DEFAULT_BUCKET: &str = "entrepot";

/// Ceiling for one `garage` CLI command, so a wedged node fails the test instead of stalling it.
const CLI_TIMEOUT: Duration = Duration::from_secs(15);

/// A single-node Garage. Dropping it kills the server and deletes its data.
pub struct Garage {
    // Declared first so that it is dropped (killed) before `dir` is deleted under it.
    process: ChildGuard,
    bin: PathBuf,
    config: PathBuf,
    s3_port: u16,
    bucket: String,
    key_id: String,
    secret: String,
    /// How many times the server has been started: each run logs to its own file, so a restart
    /// does not truncate what the killed run said.
    runs: usize,
    /// Set by [`Garage::kill`]: `ChildGuard::exited` cannot tell a killed process from a
    /// running one.
    killed: bool,
    dir: tempfile::TempDir,
}

impl Garage {
    /// A fresh node with bucket [`DEFAULT_BUCKET`], readable and writable with
    /// [`Garage::access_key_id`].
    pub async fn start() -> Result<Self> {
        Self::start_with_bucket(DEFAULT_BUCKET).await
    }

    /// A fresh node with bucket `bucket`: started, given a layout (zone `dc1`), an imported
    /// access key and the bucket, and answering signed S3 requests.
    pub async fn start_with_bucket(bucket: &str) -> Result<Self> {
        let bin = garage_bin();
        let dir = tempfile::Builder::new().prefix("garage-").tempdir()?;
        let config = dir.path().join("garage.toml");
        let rpc_secret = hex::encode(urandom(32)?);
        // Garage answers an anonymous `GET /v2/` with 403 AccessDenied: its S3 API is up.
        let (s3_port, process) = start_on_free_port(&[403], |s3_port| {
            // Garage binds the RPC port too, before the S3 one: never the same number (it then
            // logs "address already in use" and hangs), and a clash with another process also
            // says so, and start_on_free_port's retry picks a new pair.
            let rpc_port = free_port_besides(&[s3_port]);
            fs::write(
                &config,
                config_toml(dir.path(), s3_port, rpc_port, &rpc_secret),
            )?;
            spawn_server(&bin, &config, &log_path(dir.path(), 1))
        })
        .await
        .context("starting garage")?;
        let mut garage = Self {
            process,
            bin,
            config,
            s3_port,
            bucket: bucket.to_owned(),
            // Chosen here rather than by `garage key create`, so nothing has to be parsed out
            // of its human-readable output: "GK" and 12 bytes in hex, and 32 bytes in hex.
            key_id: format!("GK{}", hex::encode(urandom(12)?)),
            secret: hex::encode(urandom(32)?),
            runs: 1,
            killed: false,
            dir,
        };
        garage.setup().await.context("setting up garage")?;
        Ok(garage)
    }

    /// Layout, key and bucket, on a node whose S3 port already answers.
    async fn setup(&mut self) -> Result<()> {
        let (bin, config) = (self.bin.clone(), self.config.clone());
        wait_until(&mut self.process, "answer `garage status`", || {
            let (bin, config) = (bin.clone(), config.clone());
            async move {
                run_cli(&bin, &config, &["status"])
                    .await
                    .map(drop)
                    .map_err(|e| format!("{e:#}"))
            }
        })
        .await?;
        // "<64 hex digits>@127.0.0.1:<port>"; -q keeps the how-to-connect text off stderr,
        // which shares the output with stdout here.
        let id_line = self.cli(&["node", "id", "-q"]).await?;
        let node_id = id_line
            .lines()
            .filter_map(|line| line.trim().split_once('@'))
            .map(|(id, _)| id)
            .find(|id| id.len() == 64 && id.bytes().all(|b| b.is_ascii_hexdigit()))
            .with_context(|| format!("no node id in `garage node id -q` output: {id_line:?}"))?
            .to_owned();
        // The capacity only weighs nodes against each other; it is no quota.
        self.cli(&["layout", "assign", "-z", "dc1", "-c", "1G", &node_id])
            .await?;
        self.cli(&["layout", "apply", "--version", "1"]).await?;
        let (key_id, secret) = (self.key_id.clone(), self.secret.clone());
        self.cli(&[
            "key",
            "import",
            "--yes",
            "-n",
            "entrepot-tests",
            &key_id,
            &secret,
        ])
        .await?;
        let bucket = self.bucket.clone();
        self.create_bucket(&bucket).await?;
        self.wait_s3_ready().await
    }

    /// Creates bucket `name`, readable, writable and owned by [`Garage::access_key_id`].
    pub async fn create_bucket(&self, name: &str) -> Result<()> {
        self.cli(&["bucket", "create", name]).await?;
        self.cli(&[
            "bucket",
            "allow",
            "--read",
            "--write",
            "--owner",
            name,
            "--key",
            &self.key_id,
        ])
        .await?;
        Ok(())
    }

    /// Runs `garage -c <this node's config> args...` and returns its output (stdout and stderr);
    /// `Err` with the output unless it succeeded within [`CLI_TIMEOUT`].
    pub async fn cli(&self, args: &[&str]) -> Result<String> {
        run_cli(&self.bin, &self.config, args).await
    }

    /// `http://127.0.0.1:<port>` of the S3 API. Garage only does path-style requests
    /// (`/<bucket>/<key>`).
    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.s3_port)
    }

    pub fn region(&self) -> &'static str {
        REGION
    }

    pub fn bucket(&self) -> &str {
        &self.bucket
    }

    pub fn access_key_id(&self) -> &str {
        &self.key_id
    }

    pub fn secret_access_key(&self) -> &str {
        &self.secret
    }

    /// An object_store client for [`Garage::bucket`], straight to this node: path-style, plain
    /// HTTP, the test key. Override the endpoint to go through a relay, the bucket for another
    /// one, and the client and retry options to observe faults directly; `with_client_options`
    /// replaces every client option, plain HTTP included, so start those from
    /// [`client_options`].
    pub fn s3_builder(&self) -> AmazonS3Builder {
        super::install_crypto();
        AmazonS3Builder::new()
            .with_endpoint(self.endpoint())
            .with_allow_http(true)
            .with_virtual_hosted_style_request(false)
            .with_region(REGION)
            .with_bucket_name(&self.bucket)
            .with_access_key_id(&self.key_id)
            .with_secret_access_key(&self.secret)
    }

    /// Kills the server with SIGKILL, as a crash would: no shutdown, the data left as it was.
    /// Its port refuses connections until [`Garage::restart`].
    pub fn kill(&mut self) {
        self.process.kill();
        self.killed = true;
    }

    /// Whether the server process is running.
    pub fn is_running(&mut self) -> bool {
        !self.killed && self.process.exited().is_none()
    }

    /// Kills the server if it runs, then starts it again with the same configuration, ports and
    /// data, and waits until it answers signed S3 requests. The ports were this node's a moment
    /// ago, so nothing else is expected to have taken them.
    pub async fn restart(&mut self) -> Result<()> {
        self.kill();
        self.runs += 1;
        self.process = spawn_server(
            &self.bin,
            &self.config,
            &log_path(self.dir.path(), self.runs),
        )?;
        self.killed = false;
        self.wait_s3_ready()
            .await
            .with_context(|| format!("restarting garage (run {})", self.runs))
    }

    /// Everything the server has logged, over all of its runs.
    pub fn output(&self) -> String {
        (1..=self.runs)
            .map(|run| {
                let log = log_path(self.dir.path(), run);
                let text = fs::read_to_string(&log).unwrap_or_else(|e| format!("<no log: {e}>"));
                format!("----- garage run {run} -----\n{text}")
            })
            .collect()
    }

    /// Waits until a signed `ListObjectsV2` on the bucket succeeds: the port answering is not
    /// enough, the layout and the bucket's metadata must be readable too.
    async fn wait_s3_ready(&mut self) -> Result<()> {
        let options = client_options()
            .with_timeout(Duration::from_secs(2))
            .with_connect_timeout(Duration::from_secs(1));
        let retry = RetryConfig {
            max_retries: 0,
            ..RetryConfig::default()
        };
        let store = self
            .s3_builder()
            .with_client_options(options)
            .with_retry(retry)
            .build()?;
        let what = format!("answer a signed ListObjectsV2 on bucket {}", self.bucket);
        wait_until(&mut self.process, &what, || {
            let store = &store;
            async move {
                store
                    .list_with_delimiter(None)
                    .await
                    .map(drop)
                    .map_err(|e| format!("{:#}", anyhow::Error::new(e)))
            }
        })
        .await
    }
}

/// Client options allowing plain HTTP, as every Garage here speaks; the base for any options
/// given to [`Garage::s3_builder`].
pub fn client_options() -> ClientOptions {
    ClientOptions::new().with_allow_http(true)
}

/// The `garage` program: on PATH, or where `cargo install` puts it (often not on PATH).
/// Panics with [`INSTALL_HINT`] when it is in neither.
pub fn garage_bin() -> PathBuf {
    let on_path = std::env::var_os("PATH").and_then(|path| {
        std::env::split_paths(&path)
            .map(|dir| dir.join("garage"))
            .find(|candidate| candidate.is_file())
    });
    let cargo_home = std::env::var_os("CARGO_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|home| Path::new(&home).join(".cargo")));
    on_path
        .or_else(|| {
            cargo_home
                .map(|home| home.join("bin").join("garage"))
                .filter(|candidate| candidate.is_file())
        })
        .unwrap_or_else(|| {
            panic!("`garage` was found neither on PATH nor in cargo's bin: {INSTALL_HINT}")
        })
}

fn config_toml(dir: &Path, s3_port: u16, rpc_port: u16, rpc_secret: &str) -> String {
    // compression off: test payloads are random bytes, zstd would only burn CPU on them.
    format!(
        r#"metadata_dir = "{dir}/meta"
data_dir = "{dir}/data"
db_engine = "lmdb"
replication_factor = 1
compression_level = "none"
rpc_bind_addr = "127.0.0.1:{rpc_port}"
rpc_public_addr = "127.0.0.1:{rpc_port}"
rpc_secret = "{rpc_secret}"

[s3_api]
s3_region = "{REGION}"
api_bind_addr = "127.0.0.1:{s3_port}"
"#,
        dir = dir.display()
    )
}

fn log_path(dir: &Path, run: usize) -> PathBuf {
    dir.join(format!("garage-{run}.log"))
}

fn spawn_server(bin: &Path, config: &Path, log: &Path) -> Result<ChildGuard> {
    let mut cmd = garage_command(bin, config);
    cmd.arg("server");
    ChildGuard::spawn("garage", cmd, log.to_owned())
}

async fn run_cli(bin: &Path, config: &Path, args: &[&str]) -> Result<String> {
    let mut cmd = garage_command(bin, config);
    cmd.args(args);
    let described = format!("garage {}", args.join(" "));
    run_bounded(&described, cmd, CLI_TIMEOUT).await?.ok()
}

/// `garage -c <config>`, shielded from the caller's environment: GARAGE_* variables override
/// the config (`GARAGE_RPC_HOST` would point the CLI at another node), and a RUST_LOG meant for
/// the tests would flood the server's log.
fn garage_command(bin: &Path, config: &Path) -> Command {
    let mut cmd = Command::new(bin);
    for (name, _) in std::env::vars_os() {
        if name.to_string_lossy().starts_with("GARAGE_") {
            cmd.env_remove(name);
        }
    }
    cmd.env_remove("RUST_LOG").env("NO_COLOR", "1");
    cmd.arg("-c").arg(config);
    cmd
}

/// `len` bytes from the kernel's random source: the RPC secret and the S3 key are secrets to
/// Garage, and distinct nodes of one test run must not share them.
fn urandom(len: usize) -> Result<Vec<u8>> {
    let mut bytes = vec![0; len];
    fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut bytes))
        .context("reading /dev/urandom")?;
    Ok(bytes)
}
