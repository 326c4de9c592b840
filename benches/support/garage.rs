//! Garage, the S3 server of the S3 scenarios: one node on 127.0.0.1 (free ports, data in a
//! folder of the bench's), an imported access key and a bucket per proxy, and where each proxy
//! keeps its data (bucket, prefix, endpoint) written out as its own configuration.
//!
//! The same steps as the tests' `tests/common/garage.rs` (config file, `layout assign`/`apply`,
//! `key import`, `bucket create`/`allow`), in the bench's process helpers: that module leans on
//! the tests' own harness and does not compile on its own here. garage 2.5.0 comes from
//! `.ci/install-garage.sh` (`cargo install`, often outside PATH).

use std::{
    fs,
    io::Read as _,
    path::{Path, PathBuf},
    process::Command,
    time::{Duration, Instant},
};

use anyhow::{bail, Context, Result};
use object_store::{aws::AmazonS3Builder, ClientOptions, ObjectStore as _, RetryConfig};

use super::procs::{free_port_besides, ChildGuard, Server};

/// The region Garage is configured with; SigV4 signatures must name it.
pub const REGION: &str = "garage";

/// Ceiling for one `garage` CLI command, so a wedged node fails the bench instead of stalling it.
const CLI_TIMEOUT: Duration = Duration::from_secs(30);

/// How long a fresh node may take to answer signed requests on a new bucket.
const READY_TIMEOUT: Duration = Duration::from_secs(60);

/// A single-node Garage. Dropping it kills the server; its folder belongs to the caller.
pub struct Garage {
    /// The S3 API (its port, the server process).
    pub server: Server,
    bin: PathBuf,
    config: PathBuf,
    dir: PathBuf,
    key_id: String,
    secret: String,
}

impl Garage {
    /// Starts a node under `dir` and creates `buckets`, each readable and writable with one
    /// access key; returns once a signed request on every bucket succeeds.
    pub async fn start(dir: &Path, buckets: &[&str]) -> Result<Self> {
        let bin = garage_bin()?;
        fs::create_dir_all(dir)?;
        let config = dir.join("garage.toml");
        let rpc_secret = hex::encode(urandom(32)?);
        // An anonymous request is answered 403 AccessDenied: the S3 API is up. Garage binds the
        // RPC port too (never the S3 port's number); a clash there also says "address already
        // in use", and the retry picks a new pair.
        let server = Server::start_answering("/", &[403], |s3_port| {
            fs::write(
                &config,
                config_toml(dir, s3_port, free_port_besides(&[s3_port])?, &rpc_secret),
            )?;
            let mut cmd = garage_command(&bin, &config);
            cmd.arg("server");
            ChildGuard::spawn("garage", cmd, dir.join("garage.log"))
        })
        .await
        .context("starting garage")?;
        let mut garage = Self {
            server,
            bin,
            config,
            dir: dir.to_owned(),
            // Chosen here rather than by `garage key create`, so nothing has to be parsed out
            // of its human-readable output.
            key_id: format!("GK{}", hex::encode(urandom(12)?)),
            secret: hex::encode(urandom(32)?),
        };
        garage.setup(buckets).await.context("setting up garage")?;
        Ok(garage)
    }

    /// Layout, key and buckets, on a node whose S3 port already answers.
    async fn setup(&mut self, buckets: &[&str]) -> Result<()> {
        let deadline = Instant::now() + READY_TIMEOUT;
        while let Err(e) = self.cli(&["status"]).await {
            if Instant::now() > deadline {
                return Err(e.context("garage status"));
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        // "<64 hex digits>@127.0.0.1:<port>"
        let id_line = self.cli(&["node", "id", "-q"]).await?;
        let node_id = id_line
            .lines()
            .filter_map(|line| line.trim().split_once('@'))
            .map(|(id, _)| id)
            .find(|id| id.len() == 64 && id.bytes().all(|b| b.is_ascii_hexdigit()))
            .with_context(|| format!("no node id in `garage node id -q` output: {id_line:?}"))?
            .to_owned();
        // The capacity only weighs nodes against each other; it is no quota.
        self.cli(&["layout", "assign", "-z", "dc1", "-c", "10G", &node_id])
            .await?;
        self.cli(&["layout", "apply", "--version", "1"]).await?;
        let (key_id, secret) = (self.key_id.clone(), self.secret.clone());
        self.cli(&["key", "import", "--yes", "-n", "bench", &key_id, &secret])
            .await?;
        for bucket in buckets {
            self.cli(&["bucket", "create", bucket]).await?;
            self.cli(&[
                "bucket", "allow", "--read", "--write", "--owner", bucket, "--key", &key_id,
            ])
            .await?;
        }
        for bucket in buckets {
            self.wait_signed(bucket).await?;
        }
        Ok(())
    }

    /// Runs `garage -c <config> args...`; its output (stdout and stderr) unless it failed or
    /// outlasted [`CLI_TIMEOUT`].
    async fn cli(&self, args: &[&str]) -> Result<String> {
        let described = format!("garage {}", args.join(" "));
        let mut cmd = garage_command(&self.bin, &self.config);
        cmd.args(args);
        let mut child = ChildGuard::spawn(&described, cmd, self.dir.join("cli.out"))?;
        let status = child.wait_exit(CLI_TIMEOUT).await?;
        let output = child.output();
        if !status.success() {
            bail!("{described} failed with {status}:\n{output}");
        }
        Ok(output)
    }

    /// Waits until a signed `ListObjectsV2` on `bucket` succeeds: the port answering is not
    /// enough, the layout and the bucket's metadata must be readable too.
    async fn wait_signed(&mut self, bucket: &str) -> Result<()> {
        let _ = rustls::crypto::ring::default_provider().install_default();
        let store = AmazonS3Builder::new()
            .with_endpoint(self.endpoint())
            .with_virtual_hosted_style_request(false)
            .with_region(REGION)
            .with_bucket_name(bucket)
            .with_access_key_id(&self.key_id)
            .with_secret_access_key(&self.secret)
            .with_client_options(
                ClientOptions::new()
                    .with_allow_http(true)
                    .with_timeout(Duration::from_secs(2)),
            )
            .with_retry(RetryConfig {
                max_retries: 0,
                ..RetryConfig::default()
            })
            .build()?;
        let deadline = Instant::now() + READY_TIMEOUT;
        loop {
            if let Some(status) = self.server.process.exited() {
                bail!(
                    "garage exited with {status}:\n{}",
                    self.server.process.output_tail()
                );
            }
            match store.list_with_delimiter(None).await {
                Ok(_) => return Ok(()),
                Err(e) if Instant::now() > deadline => {
                    bail!("bucket {bucket} not usable within {READY_TIMEOUT:?}: {e}")
                }
                Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
            }
        }
    }

    pub fn endpoint(&self) -> String {
        self.server.url("")
    }

    /// Where a proxy keeps its data: `bucket` under `prefix`, reached at `endpoint` (this node,
    /// or a relay in front of it).
    pub fn place(&self, endpoint: &str, bucket: &str, prefix: &str) -> Place {
        Place {
            endpoint: endpoint.to_owned(),
            bucket: bucket.to_owned(),
            prefix: prefix.to_owned(),
            key_id: self.key_id.clone(),
            secret: self.secret.clone(),
        }
    }
}

/// A bucket, a prefix in it, the endpoint and the key: one proxy's share of the Garage.
pub struct Place {
    endpoint: String,
    bucket: String,
    /// Without slashes at either end: "s3cold1-0".
    prefix: String,
    key_id: String,
    secret: String,
}

impl Place {
    /// entrepot's `[storage]` lines for the s3 backend: `backend` and the `[storage.s3]` table
    /// (config.example.toml). Path-style requests over plain HTTP are its defaults.
    pub fn entrepot_storage(&self) -> String {
        format!(
            "backend = \"s3\"\n\n[storage.s3]\nendpoint = \"{}\"\nregion = \"{REGION}\"\n\
             bucket = \"{}\"\nprefix = \"{}/\"\naccess_key_id = \"{}\"\n\
             secret_access_key = \"{}\"\n",
            self.endpoint, self.bucket, self.prefix, self.key_id, self.secret
        )
    }

    /// distribution 2.8's `s3` driver on this place, as lines under `storage:`.
    ///
    /// - `regionendpoint` set: the 2.8 driver then forces path-style requests itself
    ///   (`WithS3ForcePathStyle(true)`) and skips its check of `region` against AWS's list.
    ///   2.8 has no `forcepathstyle` key (that is distribution 3); the Debian build embeds the
    ///   same driver.
    /// - `secure: false` (plain HTTP), `v4auth: true` (SigV4; Garage has no V2 signatures).
    /// - `rootdirectory` is the prefix of every key.
    /// - `redirect: disable: !redirect`. Without redirects distribution streams blobs itself,
    ///   as entrepot does by default (`redirect = false`): the peer of the comparison. With
    ///   them (distribution's default on S3) its clients fetch presigned URLs from Garage
    ///   directly, and what is measured is mostly Garage.
    pub fn distribution_storage(&self, redirect: bool) -> String {
        format!(
            "  s3:\n    regionendpoint: {}\n    region: {REGION}\n    bucket: {}\n    \
             accesskey: {}\n    secretkey: {}\n    secure: false\n    v4auth: true\n    \
             rootdirectory: /{}\n  redirect:\n    disable: {}\n",
            self.endpoint, self.bucket, self.key_id, self.secret, self.prefix, !redirect
        )
    }
}

/// The `garage` program: on PATH, or in cargo's bin directory (where `cargo install` puts it).
pub fn garage_bin() -> Result<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    let cargo_home = std::env::var_os("CARGO_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|home| Path::new(&home).join(".cargo")));
    std::env::split_paths(&path)
        .chain(cargo_home.map(|home| home.join("bin")))
        .map(|dir| dir.join("garage"))
        .find(|candidate| candidate.is_file())
        .context("`garage` not found: run `bash .ci/install-garage.sh` to install garage 2.5.0")
}

/// "garage cargo:2.5.0 [features: ...]" → "garage cargo:2.5.0".
pub fn version() -> String {
    let Ok(bin) = garage_bin() else {
        return "garage ?".to_owned();
    };
    Command::new(bin)
        .arg("--version")
        .output()
        .map(|o| {
            String::from_utf8_lossy(&o.stdout)
                .split(" [")
                .next()
                .unwrap_or_default()
                .trim()
                .to_owned()
        })
        .unwrap_or_else(|e| format!("garage ? ({e})"))
}

fn config_toml(dir: &Path, s3_port: u16, rpc_port: u16, rpc_secret: &str) -> String {
    // Compression off: the layers are random bytes, zstd would only burn CPU on them.
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

/// `garage -c <config>`, shielded from the caller's environment: GARAGE_* variables override
/// the config, and a RUST_LOG meant for something else would flood the server's log.
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

/// `len` bytes from the kernel's random source (the RPC secret and the S3 key).
fn urandom(len: usize) -> Result<Vec<u8>> {
    let mut bytes = vec![0; len];
    fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut bytes))
        .context("reading /dev/urandom")?;
    Ok(bytes)
}
