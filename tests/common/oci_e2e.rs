//! Helpers for the end-to-end OCI tests (`tests/conformance.rs`, `tests/e2e_multiarch.rs`):
//! plain HTTP requests against a registry with their full answer kept for checks, the OCI error
//! body rules, a `docker-registry` whose access log can be read (to count upstream requests),
//! `skopeo copy` with extra flags under a deadline, and multi-platform OCI image layouts.

use std::{
    fs,
    path::{Path, PathBuf},
    process::Command,
    sync::atomic::{AtomicU64, Ordering},
    time::{Duration, Instant},
};

use anyhow::{bail, ensure, Context, Result};
use bytes::Bytes;
use reqwest::{header::HeaderMap, Method, StatusCode};

use super::real::{
    require_program, sha256_digest, start_on_free_port, Blob, ChildGuard, SeedImage, OCI_CONFIG,
    OCI_MANIFEST, SKOPEO_TIMEOUT,
};

pub const OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";

/// Ceiling for one HTTP request in a check, so a hanging proxy fails the check instead of the run.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(15);

/// Every error code the distribution spec has listed (v1.0 and v1.1 tables together).
pub const OCI_ERROR_CODES: &[&str] = &[
    "BLOB_UNKNOWN",
    "BLOB_UPLOAD_INVALID",
    "BLOB_UPLOAD_UNKNOWN",
    "DIGEST_INVALID",
    "MANIFEST_BLOB_UNKNOWN",
    "MANIFEST_INVALID",
    "MANIFEST_UNKNOWN",
    "MANIFEST_UNVERIFIED",
    "NAME_INVALID",
    "NAME_UNKNOWN",
    "SIZE_INVALID",
    "TAG_INVALID",
    "UNAUTHORIZED",
    "DENIED",
    "UNSUPPORTED",
    "TOOMANYREQUESTS",
];

/// One HTTP exchange, kept whole so a failed check can say exactly what was asked and answered.
pub struct Reply {
    pub method: Method,
    pub url: String,
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub body: Bytes,
}

impl Reply {
    /// A header's value as text; `None` when absent or not text.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }

    pub fn json(&self) -> Result<serde_json::Value> {
        serde_json::from_slice(&self.body)
            .with_context(|| format!("body is not JSON: {}", self.describe()))
    }

    /// `HEAD http://... -> 404 (content-type: ..., ...) body: ...`, for failure messages.
    pub fn describe(&self) -> String {
        let mut headers: Vec<String> = self
            .headers
            .iter()
            .filter(|(name, _)| name.as_str() != "date")
            .map(|(name, value)| format!("{name}: {}", value.to_str().unwrap_or("<binary>")))
            .collect();
        headers.sort();
        let body = if self.body.len() > 512 {
            format!("<{} bytes>", self.body.len())
        } else {
            String::from_utf8_lossy(&self.body).into_owned()
        };
        format!(
            "{} {} -> {} [{}] body: {body:?}",
            self.method,
            self.url,
            self.status.as_u16(),
            headers.join("; ")
        )
    }

    /// Checks the status, with the whole exchange in the error.
    pub fn expect_status(&self, want: u16) -> Result<()> {
        ensure!(
            self.status.as_u16() == want,
            "expected status {want}, got {}",
            self.describe()
        );
        Ok(())
    }

    /// Checks that a header is present with exactly `want`.
    pub fn expect_header(&self, name: &str, want: &str) -> Result<()> {
        match self.header(name) {
            Some(v) if v == want => Ok(()),
            Some(v) => bail!("{name} is {v:?}, expected {want:?}: {}", self.describe()),
            None => bail!("no {name} header, expected {want:?}: {}", self.describe()),
        }
    }

    /// The OCI error body of the spec: `{"errors": [{"code": "...", "message": "...",
    /// "detail": ...}, ...]}` with at least one entry, every code from the spec's table and
    /// every message a string. Returns the codes in order.
    pub fn oci_error_codes(&self) -> Result<Vec<String>> {
        let content_type = self.header("content-type").unwrap_or("");
        ensure!(
            content_type.starts_with("application/json"),
            "error body is not application/json: {}",
            self.describe()
        );
        let body = self.json()?;
        let errors = body["errors"]
            .as_array()
            .with_context(|| format!("no `errors` array: {}", self.describe()))?;
        ensure!(!errors.is_empty(), "empty `errors`: {}", self.describe());
        let mut codes = Vec::new();
        for e in errors {
            let code = e["code"]
                .as_str()
                .with_context(|| format!("error without a string `code`: {}", self.describe()))?;
            ensure!(
                OCI_ERROR_CODES.contains(&code),
                "code {code:?} is not in the spec's table: {}",
                self.describe()
            );
            ensure!(
                e.get("message").is_none_or(serde_json::Value::is_string),
                "`message` is not a string: {}",
                self.describe()
            );
            codes.push(code.to_owned());
        }
        Ok(codes)
    }

    /// A GET error: `status`, and an OCI error body whose first code is one of `codes`.
    pub fn expect_oci_error(&self, status: u16, codes: &[&str]) -> Result<()> {
        self.expect_status(status)?;
        let got = self.oci_error_codes()?;
        ensure!(
            codes.contains(&got[0].as_str()),
            "error code {:?}, expected one of {codes:?}: {}",
            got[0],
            self.describe()
        );
        Ok(())
    }

    /// A HEAD error: `status` and no body.
    pub fn expect_head_error(&self, status: u16) -> Result<()> {
        self.expect_status(status)?;
        ensure!(
            self.body.is_empty(),
            "HEAD with a body: {}",
            self.describe()
        );
        Ok(())
    }
}

/// Sends `method url` (with `Accept: accept` when given) and reads the whole answer, within
/// [`REQUEST_TIMEOUT`].
pub async fn send(
    client: &reqwest::Client,
    method: Method,
    url: &str,
    accept: Option<&str>,
) -> Result<Reply> {
    let mut req = client.request(method.clone(), url).timeout(REQUEST_TIMEOUT);
    if let Some(accept) = accept {
        req = req.header("accept", accept);
    }
    let resp = req
        .send()
        .await
        .with_context(|| format!("{method} {url}"))?;
    let status = resp.status();
    let headers = resp.headers().clone();
    let body = resp
        .bytes()
        .await
        .with_context(|| format!("reading the body of {method} {url}"))?;
    Ok(Reply {
        method,
        url: url.to_owned(),
        status,
        headers,
        body,
    })
}

/// The checks of one test, all run even when some fail, reported together at the end (as the
/// conformance suite reports each spec item).
#[derive(Default)]
pub struct Report {
    passed: usize,
    failed: Vec<String>,
}

impl Report {
    pub fn record(&mut self, name: &str, result: Result<()>) {
        match result {
            Ok(()) => self.passed += 1,
            Err(e) => self.failed.push(format!("{name}:\n    {e:#}")),
        }
    }

    /// Panics listing every failed check.
    pub fn finish(self) {
        eprintln!(
            "{} checks passed, {} failed",
            self.passed,
            self.failed.len()
        );
        if !self.failed.is_empty() {
            panic!(
                "{} of {} checks failed:\n  {}",
                self.failed.len(),
                self.failed.len() + self.passed,
                self.failed.join("\n  ")
            );
        }
    }
}

/// A `docker-registry serve` (CNCF distribution 2.8) whose output can be read: its access log
/// shows every request it handled, which is how a test proves that a pull was served from the
/// cache. (`real::DockerRegistry` keeps its output private.)
pub struct LoggedRegistry {
    pub port: u16,
    process: ChildGuard,
    _dir: tempfile::TempDir,
}

impl LoggedRegistry {
    pub async fn start(name: &str) -> Result<Self> {
        let bin = require_program("docker-registry");
        let dir = tempfile::Builder::new()
            .prefix(&format!("{name}-"))
            .tempdir()?;
        let root = dir.path().to_owned();
        let (port, process) = start_on_free_port(|port| {
            let config = root.join("config.yml");
            fs::write(
                &config,
                format!(
                    "version: 0.1\nlog:\n  level: info\n  accesslog:\n    disabled: false\n\
                     storage:\n  filesystem:\n    rootdirectory: {}\n\
                     http:\n  addr: 127.0.0.1:{port}\n",
                    root.join("data").display()
                ),
            )?;
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

    /// Every request in the access log so far, oldest first.
    pub fn requests(&self) -> Vec<AccessLine> {
        parse_access_log(&self.process.output())
    }

    /// The requests whose User-Agent starts with `entrepot/`: what the proxy asked for.
    pub fn requests_from_entrepot(&self) -> Vec<AccessLine> {
        self.requests()
            .into_iter()
            .filter(|r| r.user_agent.starts_with("entrepot/"))
            .collect()
    }
}

/// One line of docker-registry's combined-format access log:
/// `127.0.0.1 - - [21/Nov/2026:12:50:03 +0000] "GET /v2/r/x/tags/list HTTP/1.1" 200 49 "" "curl/7.88.1"`
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AccessLine {
    pub method: String,
    /// Path and query.
    pub target: String,
    pub status: u16,
    pub user_agent: String,
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

/// `skopeo [global...] copy [flags...] src dst` over plain HTTP with no credentials and no
/// signature policy, killed if it outlives [`SKOPEO_TIMEOUT`]. Its output goes to a file in
/// `log_dir` and into the error.
pub async fn skopeo_copy_with(
    log_dir: &Path,
    global: &[&str],
    flags: &[&str],
    src: &str,
    dst: &str,
) -> Result<()> {
    static RUN: AtomicU64 = AtomicU64::new(0);
    let mut cmd = Command::new(require_program("skopeo"));
    cmd.arg("--insecure-policy")
        .args(global)
        .arg("--command-timeout")
        .arg(format!("{}s", SKOPEO_TIMEOUT.as_secs()))
        .args(["copy", "--src-tls-verify=false", "--dest-tls-verify=false"])
        .args(["--src-no-creds", "--dest-no-creds", "--retry-times", "0"])
        .args(flags)
        .arg(src)
        .arg(dst);
    let described = format!(
        "skopeo {} copy {} {src} {dst}",
        global.join(" "),
        flags.join(" ")
    );
    let log = log_dir.join(format!(
        "skopeo-{}.log",
        RUN.fetch_add(1, Ordering::Relaxed)
    ));
    let mut child = ChildGuard::spawn("skopeo", cmd, log)?;
    // A little beyond skopeo's own timeout, so skopeo normally reports it itself.
    let deadline = Instant::now() + SKOPEO_TIMEOUT + Duration::from_secs(10);
    loop {
        if let Some(status) = child.exited() {
            if status.success() {
                return Ok(());
            }
            bail!("{described} failed with {status}:\n{}", child.output());
        }
        if Instant::now() > deadline {
            child.kill();
            bail!(
                "{described} still running after {:?}; killed. Output:\n{}",
                SKOPEO_TIMEOUT,
                child.output()
            );
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A blob from its media type and bytes.
pub fn blob(media_type: &'static str, data: Vec<u8>) -> Blob {
    Blob {
        media_type,
        digest: sha256_digest(&data),
        data,
    }
}

/// `{"mediaType", "digest", "size"}` of a blob.
pub fn descriptor(b: &Blob) -> serde_json::Value {
    serde_json::json!({
        "mediaType": b.media_type,
        "digest": b.digest,
        "size": b.data.len(),
    })
}

/// The image of one platform in an index.
pub struct PlatformImage {
    pub os: &'static str,
    pub architecture: &'static str,
    pub manifest: Blob,
    pub config: Blob,
    pub layers: Vec<Blob>,
}

impl PlatformImage {
    /// Config digest followed by the layer digests, in manifest order.
    pub fn blob_digests(&self) -> Vec<String> {
        std::iter::once(&self.config)
            .chain(&self.layers)
            .map(|b| b.digest.clone())
            .collect()
    }
}

/// A generated OCI image index: one image per platform, each with its own config and its own
/// random gzip layers.
pub struct MultiArchImage {
    pub index: Blob,
    pub images: Vec<PlatformImage>,
}

impl MultiArchImage {
    /// One image per `(os, architecture)`, each with one layer per entry of `layer_sizes`.
    pub fn generate(platforms: &[(&'static str, &'static str)], layer_sizes: &[usize]) -> Self {
        let images: Vec<PlatformImage> = platforms
            .iter()
            .map(|&(os, architecture)| {
                // SeedImage makes the random layers and their diff_ids; only the platform in
                // its config changes.
                let seed = SeedImage::generate(layer_sizes);
                let mut config: serde_json::Value =
                    serde_json::from_slice(&seed.config.data).expect("seed config is JSON");
                config["os"] = os.into();
                config["architecture"] = architecture.into();
                let config = blob(OCI_CONFIG, serde_json::to_vec(&config).expect("json"));
                let manifest = serde_json::json!({
                    "schemaVersion": 2,
                    "mediaType": OCI_MANIFEST,
                    "config": descriptor(&config),
                    "layers": seed.layers.iter().map(descriptor).collect::<Vec<_>>(),
                });
                PlatformImage {
                    os,
                    architecture,
                    manifest: blob(OCI_MANIFEST, serde_json::to_vec(&manifest).expect("json")),
                    config,
                    layers: seed.layers,
                }
            })
            .collect();
        let index = serde_json::json!({
            "schemaVersion": 2,
            "mediaType": OCI_INDEX,
            "manifests": images.iter().map(|i| {
                let mut d = descriptor(&i.manifest);
                d["platform"] = serde_json::json!({ "architecture": i.architecture, "os": i.os });
                d
            }).collect::<Vec<_>>(),
        });
        Self {
            index: blob(OCI_INDEX, serde_json::to_vec(&index).expect("json")),
            images,
        }
    }

    /// The image for `architecture`.
    pub fn platform(&self, architecture: &str) -> &PlatformImage {
        self.images
            .iter()
            .find(|i| i.architecture == architecture)
            .unwrap_or_else(|| panic!("no {architecture} image in the index"))
    }

    /// Every digest of the image: the index, then per platform its manifest, config and layers.
    pub fn all_digests(&self) -> Vec<String> {
        let mut all = vec![self.index.digest.clone()];
        for image in &self.images {
            all.push(image.manifest.digest.clone());
            all.extend(image.blob_digests());
        }
        all
    }

    /// Writes an OCI image layout at `dir` whose `index.json` names the index as `tag`, for
    /// `skopeo copy --all oci:<dir>:<tag> ...`.
    pub fn write_layout(&self, dir: &Path, tag: &str) -> Result<()> {
        let blobs = dir.join("blobs").join("sha256");
        fs::create_dir_all(&blobs)?;
        fs::write(dir.join("oci-layout"), r#"{"imageLayoutVersion":"1.0.0"}"#)?;
        let all = std::iter::once(&self.index).chain(
            self.images
                .iter()
                .flat_map(|i| [&i.manifest, &i.config].into_iter().chain(i.layers.iter())),
        );
        for b in all {
            fs::write(blobs.join(b.digest.trim_start_matches("sha256:")), &b.data)?;
        }
        let mut entry = descriptor(&self.index);
        entry["annotations"] = serde_json::json!({ "org.opencontainers.image.ref.name": tag });
        let index = serde_json::json!({ "schemaVersion": 2, "manifests": [entry] });
        fs::write(dir.join("index.json"), serde_json::to_vec(&index)?)?;
        Ok(())
    }
}

/// What `skopeo copy --all ... oci:<dir>:<tag>` left in an OCI layout.
#[derive(Debug)]
pub struct PulledIndex {
    pub index_digest: String,
    pub children: Vec<PulledChild>,
}

#[derive(Debug, PartialEq, Eq)]
pub struct PulledChild {
    pub os: String,
    pub architecture: String,
    pub manifest_digest: String,
    /// Config digest followed by the layer digests, in manifest order.
    pub blob_digests: Vec<String>,
}

/// Reads the index tagged `tag` from the OCI layout at `dir`, checking that the index, every
/// child manifest and every blob they reference are present and hash to their names.
pub fn read_index_layout(dir: &Path, tag: &str) -> Result<PulledIndex> {
    let top: serde_json::Value = serde_json::from_slice(&fs::read(dir.join("index.json"))?)?;
    let entry = top["manifests"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|m| m["annotations"]["org.opencontainers.image.ref.name"] == tag)
        .with_context(|| format!("no entry tagged {tag} in {}/index.json", dir.display()))?;
    ensure!(
        entry["mediaType"] == OCI_INDEX,
        "{tag} in {}/index.json is not an image index: {entry}",
        dir.display()
    );
    let index_digest = entry["digest"]
        .as_str()
        .context("index entry without digest")?
        .to_owned();
    let index: serde_json::Value = serde_json::from_slice(&verified_blob(dir, &index_digest)?)?;
    let mut children = Vec::new();
    for child in index["manifests"].as_array().into_iter().flatten() {
        let manifest_digest = child["digest"]
            .as_str()
            .with_context(|| format!("index entry without digest: {child}"))?
            .to_owned();
        let manifest: serde_json::Value =
            serde_json::from_slice(&verified_blob(dir, &manifest_digest)?)?;
        let mut blob_digests = Vec::new();
        let descriptors = std::iter::once(&manifest["config"])
            .chain(manifest["layers"].as_array().into_iter().flatten());
        for d in descriptors {
            let digest = d["digest"]
                .as_str()
                .with_context(|| format!("descriptor without digest in {manifest}"))?;
            verified_blob(dir, digest)?;
            blob_digests.push(digest.to_owned());
        }
        children.push(PulledChild {
            os: child["platform"]["os"].as_str().unwrap_or("").to_owned(),
            architecture: child["platform"]["architecture"]
                .as_str()
                .unwrap_or("")
                .to_owned(),
            manifest_digest,
            blob_digests,
        });
    }
    Ok(PulledIndex {
        index_digest,
        children,
    })
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
