//! Helpers for the end-to-end OCI tests (`tests/conformance.rs`, `tests/e2e_multiarch.rs`):
//! plain HTTP requests against a registry with their full answer kept for checks, the OCI error
//! body rules, and multi-platform OCI image layouts.

use std::{path::Path, time::Duration};

use anyhow::{bail, ensure, Context, Result};
use bytes::Bytes;
use reqwest::{header::HeaderMap, Method, StatusCode};

use super::real::{
    image_manifest, manifest_blobs, tagged_entry, verified_blob, write_layout, Blob, SeedImage,
};
use super::{oci_error_entries, OCI_CONFIG, OCI_INDEX};

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
            .filter(|(name, _)| name.as_str() != "date" && name.as_str() != "x-request-id")
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
        let errors = oci_error_entries(&self.body).with_context(|| self.describe())?;
        ensure!(!errors.is_empty(), "empty `errors`: {}", self.describe());
        let mut codes = Vec::new();
        for e in &errors {
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

    /// Panics listing every failed check, and when no check ran at all: an empty report
    /// proves nothing.
    pub fn finish(self) {
        assert!(
            self.passed + self.failed.len() > 0,
            "no conformance check ran: an empty report proves nothing"
        );
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
                let config = Blob::json(OCI_CONFIG, &config);
                PlatformImage {
                    os,
                    architecture,
                    manifest: image_manifest(&config, &seed.layers),
                    config,
                    layers: seed.layers,
                }
            })
            .collect();
        let index = serde_json::json!({
            "schemaVersion": 2,
            "mediaType": OCI_INDEX,
            "manifests": images.iter().map(|i| {
                let mut d = i.manifest.descriptor();
                d["platform"] = serde_json::json!({ "architecture": i.architecture, "os": i.os });
                d
            }).collect::<Vec<_>>(),
        });
        Self {
            index: Blob::json(OCI_INDEX, &index),
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
        let all = std::iter::once(&self.index).chain(
            self.images
                .iter()
                .flat_map(|i| [&i.manifest, &i.config].into_iter().chain(i.layers.iter())),
        );
        write_layout(dir, all, &self.index, tag)
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
    let entry = tagged_entry(dir, tag)?;
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
        children.push(PulledChild {
            os: child["platform"]["os"].as_str().unwrap_or("").to_owned(),
            architecture: child["platform"]["architecture"]
                .as_str()
                .unwrap_or("")
                .to_owned(),
            blob_digests: manifest_blobs(dir, &manifest_digest)?,
            manifest_digest,
        });
    }
    Ok(PulledIndex {
        index_digest,
        children,
    })
}
