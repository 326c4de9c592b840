//! The pulling side of a prefetch: [`Fetcher`] walks each image over the registry API of an
//! entrepot server, asking for every manifest and blob digest once per run and checking what it
//! receives; and the helpers that read its responses and errors.
//!
//! With `--with-referrers` it also takes what makes an image verifiable offline, for every
//! manifest of the image: its referrers list (which the server stores), every referrer listed
//! there with its blobs, and the tags signing tools use instead where the upstream has them:
//! the referrers tag schema `sha256-<hex>` and cosign's `sha256-<hex>.sig`, `.att` and `.sbom`
//! (a 404 there is no error). Those referrers and tags are pinned with the image.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use futures_util::future::{join_all, BoxFuture};
use indicatif::HumanBytes;
use serde::Deserialize;
use tokio::sync::{OnceCell, Semaphore};
use tokio::task::JoinSet;

use super::summary::Counts;
use super::ui::Ui;
use super::{Descriptor, ImageOutcome, ManifestJson, Options, Platform};
use crate::cache::{pins, referrers};
use crate::config::PinConfig;
use crate::oci::{media, Digest, Hasher, Reference, Tag};

/// Manifests and error bodies are read whole; nothing sane is bigger.
const MAX_MANIFEST: u64 = 16 << 20;
const MAX_ERROR_BODY: usize = 64 << 10;
/// Indexes of indexes (and referrers of referrers) deeper than this are not followed.
const MAX_DEPTH: usize = 4;
const CACHE_HEADER: &str = "x-entrepot-cache";

/// The manifests a prefetch accepts: indexes, image manifests (OCI and Docker), OCI artifacts.
const ACCEPT: &str = "application/vnd.oci.image.index.v1+json, \
    application/vnd.oci.image.manifest.v1+json, \
    application/vnd.docker.distribution.manifest.list.v2+json, \
    application/vnd.docker.distribution.manifest.v2+json, \
    application/vnd.oci.artifact.manifest.v1+json";

/// The tags cosign keeps next to the referrers tag schema (`sha256-<hex>` + these).
const COSIGN_SUFFIXES: [&str; 3] = [".sig", ".att", ".sbom"];

/// A manifest as received, verified against its digest.
struct Fetched {
    digest: Digest,
    media_type: String,
    body: Bytes,
    cached: bool,
}

/// A blob as received.
#[derive(Clone, Copy)]
struct BlobDone {
    cached: bool,
}

type Shared<T> = Arc<OnceCell<Result<T, String>>>;

/// The pulling side: one per run, shared by the image tasks.
pub(super) struct Fetcher {
    http: reqwest::Client,
    base: String,
    jobs: Semaphore,
    opts: Options,
    ui: Ui,
    /// One fetch per digest across every image.
    blobs: Mutex<HashMap<Digest, Shared<BlobDone>>>,
    manifests: Mutex<HashMap<Digest, Shared<Arc<Fetched>>>>,
    counted_manifests: Mutex<HashSet<Digest>>,
    skipped: Mutex<HashSet<Digest>>,
    stats: Arc<Mutex<Counts>>,
}

/// Collects what one image is made of while it is walked.
#[derive(Default)]
struct Walk {
    digests: Vec<Digest>,
    errors: Vec<String>,
    all_cached: bool,
    /// Referrers (by digest) and signature tags found, pinned with the image.
    artifacts: Vec<Reference>,
}

/// How a manifest was reached in a walk.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Via {
    /// The image itself, or a manifest of its index.
    Image,
    /// A referrer, or a signature tag: artifacts of the image; their own signature tags are
    /// not looked for.
    Artifact,
}

impl Fetcher {
    pub(super) fn new(
        http: reqwest::Client,
        base: String,
        jobs: usize,
        opts: Options,
        ui: Ui,
    ) -> Arc<Self> {
        Arc::new(Fetcher {
            http,
            base,
            jobs: Semaphore::new(jobs),
            opts,
            ui,
            blobs: Mutex::default(),
            manifests: Mutex::default(),
            counted_manifests: Mutex::default(),
            skipped: Mutex::default(),
            stats: Arc::default(),
        })
    }

    /// Runs every image (each a task; the shared `--jobs` bound keeps requests in check) and
    /// returns their outcomes.
    pub(super) async fn run(self: &Arc<Self>, todo: Vec<(usize, PinConfig)>) -> Vec<ImageOutcome> {
        let mut tasks = JoinSet::new();
        for (index, pin) in todo {
            let me = self.clone();
            tasks.spawn(async move { me.image(index, pin).await });
        }
        let mut out = Vec::new();
        while let Some(done) = tasks.join_next().await {
            match done {
                Ok(o) => out.push(o),
                Err(e) => std::panic::resume_unwind(e.into_panic()),
            }
        }
        out.sort_by_key(|o| o.index);
        out
    }

    async fn image(self: Arc<Self>, index: usize, pin: PinConfig) -> ImageOutcome {
        let label = pins::format(&pin);
        let name = format!("{}/{}", pin.upstream, pin.repo);
        let mut walk = Walk {
            all_cached: true,
            ..Walk::default()
        };
        let top = match &pin.reference {
            Reference::Digest(d) => (d.to_string(), self.manifest(&name, d).await),
            Reference::Tag(t) => {
                let fetched = self.get_manifest(&name, t.as_str(), None).await.map(|m| {
                    let m = Arc::new(m);
                    self.count_manifest(&m);
                    // Whoever meets this digest later (as a child, by digest) takes this one.
                    let _ = self.manifest_cell(&m.digest).set(Ok(m.clone()));
                    m
                });
                (t.as_str().to_string(), fetched)
            }
        };
        match top {
            (_, Ok(top)) => self.visit(&name, top, 0, Via::Image, &mut walk).await,
            (reference, Err(e)) => walk.errors.push(format!("manifest {reference}: {e}")),
        }
        let result = match walk.errors.len() {
            0 => Ok(()),
            1 => Err(walk.errors.remove(0)),
            n => Err(format!("{} (and {} more)", walk.errors[0], n - 1)),
        };
        self.ui.image_done(&label, &result, walk.all_cached);
        let mut artifacts: Vec<PinConfig> = Vec::new();
        for reference in walk.artifacts {
            let p = PinConfig {
                upstream: pin.upstream.clone(),
                repo: pin.repo.clone(),
                reference,
            };
            if !artifacts.contains(&p) {
                artifacts.push(p);
            }
        }
        ImageOutcome {
            index,
            pin,
            result,
            digests: walk.digests,
            artifacts,
            all_cached: walk.all_cached,
            stats: self.stats.clone(),
        }
    }

    /// Records a manifest and fetches what it references: the chosen children of an index, the
    /// config and layers of an image, and the referrers and signature tags of both when asked.
    fn visit<'a>(
        self: &'a Arc<Self>,
        name: &'a str,
        m: Arc<Fetched>,
        depth: usize,
        via: Via,
        walk: &'a mut Walk,
    ) -> BoxFuture<'a, ()> {
        Box::pin(async move {
            walk.digests.push(m.digest.clone());
            walk.all_cached &= m.cached;
            let parsed: ManifestJson = match serde_json::from_slice(&m.body) {
                Ok(p) => p,
                Err(e) => {
                    walk.errors
                        .push(format!("manifest {}: not valid JSON: {e}", m.digest));
                    return;
                }
            };
            let mut children: Vec<(Descriptor, Via)> = Vec::new();
            if is_index(&m.media_type, &parsed) {
                children = parsed
                    .manifests
                    .iter()
                    .filter(|d| {
                        self.opts.platforms.is_empty()
                            || d.platform
                                .as_ref()
                                .is_some_and(|p| self.opts.platforms.iter().any(|f| f.matches(p)))
                    })
                    .map(|d| (d.clone(), via))
                    .collect();
                if children.is_empty() && depth == 0 && !self.opts.platforms.is_empty() {
                    let wanted: Vec<String> = self
                        .opts
                        .platforms
                        .iter()
                        .map(Platform::to_string)
                        .collect();
                    walk.errors.push(format!(
                        "the index {} has no manifest for {}",
                        m.digest,
                        wanted.join(", ")
                    ));
                }
            } else {
                let blobs: Vec<Descriptor> = parsed
                    .config
                    .iter()
                    .chain(&parsed.layers)
                    .chain(&parsed.blobs)
                    .cloned()
                    .collect();
                let fetches = blobs.iter().map(|d| self.blob(name, d));
                for (d, r) in blobs.iter().zip(join_all(fetches).await) {
                    match r {
                        Ok(Some((digest, done))) => {
                            walk.digests.push(digest);
                            walk.all_cached &= done.cached;
                        }
                        Ok(None) => {}
                        Err(e) => walk.errors.push(format!("blob {}: {e}", d.digest)),
                    }
                }
            }
            if self.opts.referrers {
                match self.referrers(name, &m.digest).await {
                    Ok(r) => {
                        for d in r {
                            if let Ok(digest) = d.digest.parse::<Digest>() {
                                walk.artifacts.push(Reference::Digest(digest));
                            }
                            children.push((d, Via::Artifact));
                        }
                    }
                    Err(e) => walk.errors.push(format!("referrers of {}: {e}", m.digest)),
                }
                if via == Via::Image {
                    for (tag, found) in self.signature_tags(name, &m.digest).await {
                        match found {
                            Ok(Some(t)) => {
                                walk.artifacts.push(Reference::Tag(tag));
                                children.push((t, Via::Artifact));
                            }
                            Ok(None) => {}
                            Err(e) => walk.errors.push(format!("manifest {tag}: {e}")),
                        }
                    }
                }
            }
            if depth >= MAX_DEPTH {
                if !children.is_empty() {
                    walk.errors.push(format!(
                        "manifest {}: nested more than {MAX_DEPTH} levels deep",
                        m.digest
                    ));
                }
                return;
            }
            // A signature both listed as a referrer and tagged is walked once.
            let mut listed = HashSet::new();
            children.retain(|(d, _)| listed.insert(d.digest.clone()));
            // Children side by side (each platform's layers in parallel, within --jobs), each
            // walked on its own and then merged.
            let seen = &walk.digests;
            let walks = join_all(children.iter().map(|(d, via)| async move {
                let mut sub = Walk {
                    all_cached: true,
                    ..Walk::default()
                };
                let child = match d.digest.parse::<Digest>() {
                    Ok(digest) => self.manifest(name, &digest).await,
                    Err(e) => Err(e.to_string()),
                };
                match child {
                    Ok(child) if seen.contains(&child.digest) => {}
                    Ok(child) => self.visit(name, child, depth + 1, *via, &mut sub).await,
                    Err(e) => sub.errors.push(format!("manifest {}: {e}", d.digest)),
                }
                sub
            }))
            .await;
            for sub in walks {
                walk.digests.extend(sub.digests);
                walk.errors.extend(sub.errors);
                walk.artifacts.extend(sub.artifacts);
                walk.all_cached &= sub.all_cached;
            }
        })
    }

    /// A manifest by digest, fetched once per run whatever asks for it.
    async fn manifest(&self, name: &str, digest: &Digest) -> Result<Arc<Fetched>, String> {
        self.manifest_cell(digest)
            .get_or_init(|| async {
                let m = self
                    .get_manifest(name, &digest.to_string(), Some(digest))
                    .await?;
                let m = Arc::new(m);
                self.count_manifest(&m);
                Ok(m)
            })
            .await
            .clone()
    }

    fn manifest_cell(&self, digest: &Digest) -> Shared<Arc<Fetched>> {
        self.manifests
            .lock()
            .expect("manifests lock")
            .entry(digest.clone())
            .or_default()
            .clone()
    }

    fn count_manifest(&self, m: &Fetched) {
        if self
            .counted_manifests
            .lock()
            .expect("counted lock")
            .insert(m.digest.clone())
        {
            let mut s = self.stats.lock().expect("stats lock");
            s.manifests += 1;
            s.manifests_cached += u64::from(m.cached);
        }
    }

    /// `GET /v2/<name>/manifests/<reference>`, read whole and checked against its digest.
    async fn get_manifest(
        &self,
        name: &str,
        reference: &str,
        expect: Option<&Digest>,
    ) -> Result<Fetched, String> {
        self.get_manifest_if_any(name, reference, expect, false)
            .await?
            .ok_or_else(|| "not found".to_string())
    }

    /// [`Fetcher::get_manifest`]; with `missing_ok`, a 404 is `None` rather than an error.
    async fn get_manifest_if_any(
        &self,
        name: &str,
        reference: &str,
        expect: Option<&Digest>,
        missing_ok: bool,
    ) -> Result<Option<Fetched>, String> {
        let _permit = self.jobs.acquire().await.map_err(|e| e.to_string())?;
        let url = format!("{}/v2/{name}/manifests/{reference}", self.base);
        let resp = self
            .http
            .get(&url)
            .header(reqwest::header::ACCEPT, ACCEPT)
            .send()
            .await
            .map_err(|e| error_chain(&e))?;
        if missing_ok && resp.status() == reqwest::StatusCode::NOT_FOUND {
            return Ok(None);
        }
        if !resp.status().is_success() {
            return Err(response_error(resp).await);
        }
        let cached = is_cached(&resp);
        if resp.content_length().is_some_and(|n| n > MAX_MANIFEST) {
            return Err(format!("larger than {}", HumanBytes(MAX_MANIFEST)));
        }
        let header = |n: &str| {
            resp.headers()
                .get(n)
                .and_then(|v| v.to_str().ok())
                .map(str::to_string)
        };
        let content_type = header("content-type");
        let announced = header("docker-content-digest").and_then(|d| d.parse::<Digest>().ok());
        let body = read_capped(resp, MAX_MANIFEST).await?;
        let algorithm = expect
            .or(announced.as_ref())
            .map_or(crate::oci::digest::Algorithm::Sha256, Digest::algorithm);
        let digest = Digest::of(algorithm, &body);
        if let Some(want) = expect.or(announced.as_ref()) {
            if *want != digest {
                return Err(format!("received content hashes to {digest}, not {want}"));
            }
        }
        let media_type = content_type
            .as_deref()
            .map(media::essence)
            .filter(|t| {
                [
                    media::OCI_MANIFEST,
                    media::OCI_INDEX,
                    media::DOCKER_MANIFEST,
                    media::DOCKER_LIST,
                ]
                .contains(t)
            })
            .map(str::to_string)
            .or_else(|| media::sniff(&body))
            .unwrap_or_default();
        if media_type == media::DOCKER_V1_SIGNED {
            return Err("Docker schema 1 manifests are not supported".into());
        }
        Ok(Some(Fetched {
            digest,
            media_type,
            body,
            cached,
        }))
    }

    /// The referrers tag schema and cosign's tags of `subject`, each with the descriptor of
    /// what it names (taken by digest from here on), `None` where the upstream has no such tag.
    async fn signature_tags(
        &self,
        name: &str,
        subject: &Digest,
    ) -> Vec<(Tag, Result<Option<Descriptor>, String>)> {
        let schema = referrers::tag_schema(subject);
        let mut tags = vec![schema.clone()];
        // cosign names them after the whole digest, which the schema tag is for sha256.
        if subject.algorithm() == crate::oci::digest::Algorithm::Sha256 {
            tags.extend(
                COSIGN_SUFFIXES
                    .iter()
                    .filter_map(|s| format!("{schema}{s}").parse::<Tag>().ok()),
            );
        }
        let found = join_all(tags.iter().map(|t| async move {
            let m = self
                .get_manifest_if_any(name, t.as_str(), None, true)
                .await?;
            Ok(m.map(|m| {
                let m = Arc::new(m);
                self.count_manifest(&m);
                // The walk takes it by digest, from here.
                let _ = self.manifest_cell(&m.digest).set(Ok(m.clone()));
                Descriptor {
                    media_type: m.media_type.clone(),
                    digest: m.digest.to_string(),
                    size: Some(m.body.len() as u64),
                    urls: Vec::new(),
                    platform: None,
                }
            }))
        }))
        .await;
        tags.into_iter().zip(found).collect()
    }

    /// A blob by descriptor, fetched once per run whatever asks for it. `None`: skipped (a
    /// non-distributable layer).
    async fn blob(&self, name: &str, d: &Descriptor) -> Result<Option<(Digest, BlobDone)>, String> {
        let digest: Digest = d.digest.parse().map_err(|e| format!("{e}"))?;
        if d.is_foreign() {
            if self
                .skipped
                .lock()
                .expect("skipped lock")
                .insert(digest.clone())
            {
                self.stats.lock().expect("stats lock").skipped += 1;
                self.ui
                    .line(format!("skipped {digest}: a non-distributable layer"));
            }
            return Ok(None);
        }
        let cell = self
            .blobs
            .lock()
            .expect("blobs lock")
            .entry(digest.clone())
            .or_default()
            .clone();
        let done = cell
            .get_or_init(|| async {
                let r = self.get_blob(name, &digest, d.size).await;
                let mut s = self.stats.lock().expect("stats lock");
                s.blobs += 1;
                match &r {
                    Ok((size, done)) => {
                        s.bytes += size;
                        if done.cached {
                            s.blobs_cached += 1;
                            s.bytes_cached += size;
                        }
                    }
                    Err(_) => s.blobs_failed += 1,
                }
                r.map(|(_, done)| done)
            })
            .await
            .clone()?;
        Ok(Some((digest, done)))
    }

    /// `GET /v2/<name>/blobs/<digest>`: a stored blob is taken as it is (the server verified it
    /// when it stored it); anything else is streamed to a sink and checked here too.
    async fn get_blob(
        &self,
        name: &str,
        digest: &Digest,
        size: Option<u64>,
    ) -> Result<(u64, BlobDone), String> {
        let _permit = self.jobs.acquire().await.map_err(|e| e.to_string())?;
        let url = format!("{}/v2/{name}/blobs/{digest}", self.base);
        let resp = self
            .http
            .get(&url)
            .send()
            .await
            .map_err(|e| error_chain(&e))?;
        if !resp.status().is_success() {
            return Err(response_error(resp).await);
        }
        let length = resp.content_length().or(size).unwrap_or(0);
        self.ui.add_total(length);
        if let (Some(want), Some(got)) = (size, resp.content_length()) {
            if want != got {
                return Err(format!("the manifest says {want} bytes, the server {got}"));
            }
        }
        if is_cached(&resp) {
            // Dropping the body closes the connection: nothing more is transferred.
            drop(resp);
            self.ui.bytes(length);
            self.ui
                .line(format!("already cached {digest} ({})", HumanBytes(length)));
            return Ok((length, BlobDone { cached: true }));
        }
        if cache_outcome(&resp) == Some("bypass") {
            return Err("the server could not store it (it served it without caching)".into());
        }
        let bar = self.ui.blob_bar(digest, length);
        let mut resp = resp;
        let mut hasher = Hasher::new(digest.algorithm());
        let mut received: u64 = 0;
        loop {
            match resp.chunk().await {
                Ok(Some(chunk)) => {
                    hasher.update(&chunk);
                    received += chunk.len() as u64;
                    self.ui.bytes(chunk.len() as u64);
                    if let Some(b) = &bar {
                        b.inc(chunk.len() as u64);
                    }
                }
                Ok(None) => break,
                Err(e) => {
                    self.ui.done_bar(bar);
                    // The server breaks a transfer when the upstream fails or sends content
                    // that does not match the digest; its log says which.
                    return Err(format!(
                        "the transfer broke after {received} of {length} bytes \
                         (upstream failure or digest mismatch; see the server's log): {}",
                        error_chain(&e)
                    ));
                }
            }
        }
        self.ui.done_bar(bar);
        let got = hasher.finish();
        if got != *digest {
            return Err(format!("received content hashes to {got}"));
        }
        if size.is_some_and(|s| s != received) {
            return Err(format!("received {received} bytes, expected {length}"));
        }
        self.ui
            .line(format!("fetched {digest} ({})", HumanBytes(received)));
        Ok((received, BlobDone { cached: false }))
    }

    /// The referrers of `digest`: 404 means none (or a registry without the referrers API).
    async fn referrers(&self, name: &str, digest: &Digest) -> Result<Vec<Descriptor>, String> {
        let _permit = self.jobs.acquire().await.map_err(|e| e.to_string())?;
        let url = format!("{}/v2/{name}/referrers/{digest}", self.base);
        let resp = self
            .http
            .get(&url)
            .header(reqwest::header::ACCEPT, media::OCI_INDEX)
            .send()
            .await
            .map_err(|e| error_chain(&e))?;
        if resp.status() == reqwest::StatusCode::NOT_FOUND {
            return Ok(Vec::new());
        }
        if !resp.status().is_success() {
            return Err(response_error(resp).await);
        }
        let body = read_capped(resp, MAX_MANIFEST).await?;
        let index: ManifestJson =
            serde_json::from_slice(&body).map_err(|e| format!("not an image index: {e}"))?;
        Ok(index.manifests)
    }
}

fn is_index(media_type: &str, m: &ManifestJson) -> bool {
    media_type == media::OCI_INDEX
        || media_type == media::DOCKER_LIST
        || (m.config.is_none() && m.layers.is_empty() && !m.manifests.is_empty())
}

fn cache_outcome(resp: &reqwest::Response) -> Option<&str> {
    resp.headers()
        .get(CACHE_HEADER)
        .and_then(|v| v.to_str().ok())
}

/// The server answered from its store (a tag confirmed or served from its last mapping counts).
fn is_cached(resp: &reqwest::Response) -> bool {
    matches!(cache_outcome(resp), Some("hit" | "revalidated" | "stale"))
}

async fn read_capped(mut resp: reqwest::Response, cap: u64) -> Result<Bytes, String> {
    let mut buf = Vec::new();
    while let Some(chunk) = resp.chunk().await.map_err(|e| error_chain(&e))? {
        buf.extend_from_slice(&chunk);
        if buf.len() as u64 > cap {
            return Err(format!("larger than {}", HumanBytes(cap)));
        }
    }
    Ok(Bytes::from(buf))
}

/// `404 Not Found: MANIFEST_UNKNOWN: <message>`, from an OCI error body when there is one.
pub(super) async fn response_error(resp: reqwest::Response) -> String {
    let status = resp.status();
    let body = read_capped(resp, MAX_ERROR_BODY as u64)
        .await
        .unwrap_or_default();
    #[derive(Deserialize)]
    struct Errors {
        errors: Vec<OciError>,
    }
    #[derive(Deserialize)]
    struct OciError {
        #[serde(default)]
        code: String,
        #[serde(default)]
        message: String,
    }
    let detail = match serde_json::from_slice::<Errors>(&body) {
        Ok(e) if !e.errors.is_empty() => e
            .errors
            .iter()
            .map(|e| format!("{}: {}", e.code, e.message))
            .collect::<Vec<_>>()
            .join("; "),
        _ => String::from_utf8_lossy(&body)
            .lines()
            .next()
            .unwrap_or("")
            .chars()
            .take(200)
            .collect(),
    };
    if detail.is_empty() {
        status.to_string()
    } else {
        format!("{status}: {detail}")
    }
}

/// An error with its causes, `outer: inner: innermost`.
pub(super) fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut source = e.source();
    while let Some(cause) = source {
        let c = cause.to_string();
        if !s.contains(&c) {
            s.push_str(": ");
            s.push_str(&c);
        }
        source = cause.source();
    }
    s
}
