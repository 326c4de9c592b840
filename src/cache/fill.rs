//! The blob fill: one detached task per digest that owns the upstream stream. Upstream bytes
//! go into a bounded in-memory tail that followers at the live edge read without a copy, while
//! a blocking-pool task writes them to a temp file behind and hashes them. A plain-HTTP
//! upstream's body skips user memory instead: `spliced` moves it from the socket into the
//! file and puts slices of the file's mapping in the tail. At the end the digest is verified
//! (followers get the last byte only then) and the file committed atomically.
//! Clients never own a fill: they follow it (see `read::follow`).

use std::fs::File;
use std::io;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use futures_util::StreamExt;
use http::{header, HeaderMap, HeaderValue, Method};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use super::tail::{Located, Tail};
use super::temp::TempFile;
use super::{InProgress, Store};
use crate::oci::{Digest, Hasher, RepoName};
use crate::upstream::{Blob, RawBody, Upstream, UpstreamError, UpstreamErrorKind, UpstreamRequest};

/// The upstream a fill is for (its bytes come from there, or from shared storage when that
/// has them; a follower whose fill lost its storage continues from there).
#[derive(Clone)]
pub struct FillSource {
    pub upstream: Arc<Upstream>,
    pub repo: RepoName,
    /// The replica that owns the digest, asked before the upstream (`[cluster]`).
    pub via: Option<crate::cluster::Via>,
}

/// Where a fill reads its bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Origin {
    /// The upstream registry.
    Upstream,
    /// Shared storage (the bucket) has the blob, of this size: it is copied into the local
    /// tier, verified like any other fill.
    Shared { size: u64 },
    /// The replica that owns the digest (`FillSource::via`): this fill follows the owner's,
    /// so the cluster fetches the blob from the upstream once. An owner that cannot be
    /// reached or fails before its body starts makes this an upstream fill.
    Peer,
}

impl Origin {
    pub fn as_str(self) -> &'static str {
        match self {
            Origin::Upstream => "upstream",
            Origin::Shared { .. } => "shared storage",
            Origin::Peer => "owner replica",
        }
    }
}

/// How much of a blob one read from shared storage asks for.
const SHARED_READ: u64 = 8 << 20;

/// What followers see of a fill.
#[derive(Clone)]
pub enum Progress {
    /// Waiting for the upstream's response headers.
    Connecting,
    /// Bytes `0..written` are readable: the oldest from `file`, the newest (perhaps not yet
    /// on disk) from the fill's tail. `total` is the upstream's Content-Length.
    Streaming {
        file: Arc<File>,
        total: Option<u64>,
        written: u64,
    },
    /// All `size` bytes are verified against the digest and readable as above.
    Done { file: Arc<File>, size: u64 },
    /// The fill failed; nothing was stored.
    Failed(FillError),
}

/// Why a fill failed.
#[derive(Debug, Clone, thiserror::Error)]
pub enum FillError {
    /// The upstream failed, or sent bytes that are short or do not match the digest.
    #[error(transparent)]
    Upstream(#[from] UpstreamError),
    /// Our store could not take the blob (disk full, read-only). Clients are served straight
    /// from the upstream instead.
    #[error("store unavailable: {0}")]
    Storage(Arc<str>),
    /// The server shut down before the fill completed.
    #[error("fill cancelled by shutdown")]
    Cancelled,
}

pub struct Fill {
    pub digest: Digest,
    source: FillSource,
    origin: Origin,
    progress: watch::Receiver<Progress>,
    temp_name: std::sync::OnceLock<String>,
    tail: Mutex<Tail>,
    /// A mapping of the whole temp file when the body arrives by `splice` (`spliced`): bytes
    /// on disk are sliced from it rather than read (and copied) from the file.
    mapping: std::sync::OnceLock<Bytes>,
    /// Requests served by this fill: the one that started it and every one that joined.
    requests: AtomicU64,
    /// Clients reading it now (see [`Following`]), and when it began: for the status page.
    followers: AtomicU64,
    began: std::time::Instant,
}

/// Held by each client reading a fill; counts it among the fill's live followers until dropped.
pub struct Following(Arc<Fill>);

impl Drop for Following {
    fn drop(&mut self) {
        self.0.followers.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Written bytes kept in memory for followers at the live edge.
const TAIL_KEEP: usize = 8 << 20;
/// Received bytes not yet on disk before the fill stops reading the upstream (a slow disk or
/// hash then paces the fill instead of filling memory).
const MAX_UNWRITTEN: u64 = 8 << 20;

impl Fill {
    pub fn subscribe(&self) -> watch::Receiver<Progress> {
        self.progress.clone()
    }

    pub fn source(&self) -> &FillSource {
        &self.source
    }

    pub fn origin(&self) -> Origin {
        self.origin
    }

    /// How many requests this fill has served so far (the first and every joiner).
    pub fn requests(&self) -> u64 {
        self.requests.load(Ordering::Relaxed)
    }

    /// Clients reading this fill right now.
    pub fn followers(&self) -> u64 {
        self.followers.load(Ordering::Relaxed)
    }

    /// When the fill began.
    pub fn began(&self) -> std::time::Instant {
        self.began
    }

    /// Counts one live follower until the returned guard is dropped.
    pub(super) fn following(self: &Arc<Self>) -> Following {
        self.followers.fetch_add(1, Ordering::Relaxed);
        Following(self.clone())
    }

    /// Counts one more request following this fill.
    pub(super) fn add_request(&self) {
        self.requests.fetch_add(1, Ordering::Relaxed);
    }

    /// Where up to `max` bytes at `pos` can be read: from memory without a copy, or from the
    /// temp file (never further than it has been written).
    pub(super) fn locate(&self, pos: u64, max: u64) -> Located {
        let located = self.tail.lock().unwrap().locate(pos, max);
        match (located, self.mapping.get()) {
            (Located::File(n), Some(map)) => {
                Located::Memory(map.slice(pos as usize..(pos + n) as usize))
            }
            (located, _) => located,
        }
    }

    /// The temp file's mapping, for [`Fill::locate`] (set once, by `spliced`).
    pub(super) fn mapped(&self, map: Bytes) {
        let _ = self.mapping.set(map);
    }

    /// Bytes received from the source, readable at once. Publish them after this call.
    pub(super) fn receive(&self, chunk: Bytes) {
        self.tail.lock().unwrap().receive(chunk);
    }

    /// `n` more bytes reached the temp file.
    pub(super) fn wrote(&self, n: u64) {
        self.tail.lock().unwrap().wrote(n);
    }

    /// The name of this fill's temp file, once created.
    pub fn temp_name(&self) -> Option<String> {
        self.temp_name.get().cloned()
    }

    /// Waits until the upstream has answered (or the fill failed) and returns that state.
    pub async fn started(&self) -> Progress {
        let mut rx = self.subscribe();
        let state = rx
            .wait_for(|p| !matches!(p, Progress::Connecting))
            .await
            .map(|p| p.clone());
        state.unwrap_or(Progress::Failed(FillError::Cancelled))
    }

    /// Waits for the end of the fill: `Done` or `Failed`.
    pub async fn finished(&self) -> Progress {
        let mut rx = self.subscribe();
        let state = rx
            .wait_for(|p| matches!(p, Progress::Done { .. } | Progress::Failed(_)))
            .await
            .map(|p| p.clone());
        state.unwrap_or(Progress::Failed(FillError::Cancelled))
    }
}

/// Creates the fill and the sender of its progress (for the task that will run it).
pub(super) fn new_fill(
    digest: Digest,
    source: FillSource,
    origin: Origin,
) -> (Arc<Fill>, watch::Sender<Progress>) {
    new_fill_with(digest, source, origin, TAIL_KEEP)
}

/// A fill from the upstream with `keep` written bytes held in memory (small in tests).
#[cfg(test)]
pub(super) fn new_fill_keeping(
    digest: Digest,
    source: FillSource,
    keep: usize,
) -> (Arc<Fill>, watch::Sender<Progress>) {
    new_fill_with(digest, source, Origin::Upstream, keep)
}

fn new_fill_with(
    digest: Digest,
    source: FillSource,
    origin: Origin,
    keep: usize,
) -> (Arc<Fill>, watch::Sender<Progress>) {
    let (tx, rx) = watch::channel(Progress::Connecting);
    let fill = Arc::new(Fill {
        digest,
        source,
        origin,
        progress: rx,
        temp_name: std::sync::OnceLock::new(),
        tail: Mutex::new(Tail::new(keep)),
        mapping: std::sync::OnceLock::new(),
        requests: AtomicU64::new(0),
        followers: AtomicU64::new(0),
        began: std::time::Instant::now(),
    });
    (fill, tx)
}

/// The fill task. Runs to completion unless `cancel` fires (shutdown); whatever happens, the
/// fill leaves the in-progress map (`entry` is dropped) before its followers get a final state.
pub(super) async fn run(entry: InProgress, tx: watch::Sender<Progress>, cancel: CancellationToken) {
    let started = tokio::time::Instant::now();
    let fill = entry.fill.clone();
    let result = tokio::select! {
        biased;
        _ = cancel.cancelled() => Err(FillError::Cancelled),
        r = fill_blob(&entry.store, &fill, &tx) => r,
    };
    let result = result.map(|(size, _)| size);
    // The temp file (owned by `fill_blob`) is gone by now on every error path. Leaving the map
    // first means a request that sees the failure can start a fresh fill.
    drop(entry);
    match result {
        Ok(size) => {
            tracing::info!(digest = %fill.digest, upstream = %fill.source.upstream.name(), repository = %fill.source.repo, bytes = size, requests = fill.requests(), duration_ms = started.elapsed().as_millis() as u64, "blob cached");
        }
        Err(e) => {
            if matches!(e, FillError::Storage(_)) {
                crate::metrics::storage_error();
            }
            tracing::warn!(digest = %fill.digest, upstream = %fill.source.upstream.name(), repository = %fill.source.repo, error = %e, "blob fill failed; nothing stored");
            tx.send_replace(Progress::Failed(e));
        }
    }
}

fn storage_error(e: io::Error) -> FillError {
    FillError::Storage(e.to_string().into())
}

/// Fetch, write, hash, verify, commit. Returns the blob's size and where it came from.
async fn fill_blob(
    store: &Arc<Store>,
    fill: &Arc<Fill>,
    tx: &watch::Sender<Progress>,
) -> Result<(u64, Origin), FillError> {
    let digest = &fill.digest;
    let up = &fill.source.upstream;
    // The temp file comes first: if the store cannot take the blob, no upstream request is
    // made here and clients fetch it themselves.
    let temp = TempFile::create(store.tmp_dir(), digest.hex())
        .await
        .map_err(storage_error)?;
    let _ = fill.temp_name.set(temp.name());
    let mut origin = fill.origin;
    let (total, body) = match origin {
        Origin::Upstream => upstream_body(fill).await?,
        Origin::Shared { size } => (
            Some(size),
            Body::Stream(from_shared(store.clone(), digest.clone(), size)),
        ),
        Origin::Peer => match from_peer(fill).await {
            Some((total, stream)) => (total, Body::Stream(stream)),
            None => {
                origin = Origin::Upstream;
                upstream_body(fill).await?
            }
        },
    };
    // What the source did wrong: the upstream's (or the owner's), or (shared storage) ours.
    let bad_source = |kind: UpstreamErrorKind| -> FillError {
        match origin {
            Origin::Upstream | Origin::Peer => up.error(kind).into(),
            Origin::Shared { .. } => FillError::Storage(format!("shared copy: {kind}").into()),
        }
    };
    let file = temp.file().clone();
    if let Some(t) = total {
        // A blob that cannot fit fails here, before its bytes are fetched (its clients are
        // then served from the upstream directly), and ext4 allocates its extents at once.
        let f = file.clone();
        tokio::task::spawn_blocking(move || crate::sys::reserve(&f, t))
            .await
            .map_err(|e| storage_error(io::Error::other(e)))?
            .map_err(storage_error)?;
    }
    tx.send_replace(Progress::Streaming {
        file: file.clone(),
        total,
        written: 0,
    });

    let (written, actual) = match body {
        Body::Spliced(raw) => super::spliced::receive(fill, tx, file.clone(), raw).await?,
        Body::Stream(stream) => {
            write_stream(fill, tx, &file, total, stream, origin, &bad_source).await?
        }
    };
    if total.is_some_and(|t| t != written) {
        return Err(bad_source(UpstreamErrorKind::Truncated));
    }
    if &actual != digest {
        if let Origin::Shared { .. } = origin {
            // A content-addressed object that does not match its address helps nobody.
            tracing::error!(digest = %digest, actual = %actual, "the shared copy is corrupt; removing it");
            let _ = store.blobs().delete(digest).await;
        }
        return Err(bad_source(UpstreamErrorKind::DigestMismatch));
    }
    // Verified: followers may finish now, while the data is made durable.
    tx.send_replace(Progress::Done {
        file,
        size: written,
    });
    // The upstream served it for this repository (itself, or through the owner): a read under
    // this pair needs no confirmation. Linked before the commit, so whoever finds the blob in
    // storage finds its link too.
    if !matches!(origin, Origin::Shared { .. }) {
        let s = &fill.source;
        let linked = store
            .links
            .add(s.upstream.name(), &s.repo, [digest.clone()])
            .await;
        if let Err(e) = linked {
            crate::metrics::storage_error();
            tracing::warn!(digest = %digest, error = %e, "could not link the blob to its repository");
        }
    }
    if let Err(e) = store.commit_fill(digest, temp, written, origin).await {
        // Every follower already has its verified bytes; only the cached copy is lost.
        crate::metrics::storage_error();
        tracing::error!(digest = %digest, error = %e, "could not commit verified blob to the store");
    }
    Ok((written, origin))
}

/// Writes and hashes a body that arrives as a stream of chunks; returns the bytes received
/// and their digest.
async fn write_stream(
    fill: &Fill,
    tx: &watch::Sender<Progress>,
    file: &Arc<File>,
    total: Option<u64>,
    mut stream: ByteStream,
    origin: Origin,
    bad_source: &impl Fn(UpstreamErrorKind) -> FillError,
) -> Result<(u64, Digest), FillError> {
    let up = &fill.source.upstream;
    let mut hasher = Some(Hasher::new(fill.digest.algorithm()));
    let mut batch: Vec<Bytes> = Vec::new();
    let mut persisting: Option<Blocking<(Hasher, io::Result<u64>)>> = None;
    let mut received: u64 = 0;
    let mut on_disk: u64 = 0;
    let mut eof = false;
    // Received bytes are readable at once (from the tail); writing and hashing trail behind on
    // the blocking pool, one batch at a time, a batch being whatever arrived meanwhile. Each
    // chunk is written, then hashed while the write has it in the CPU cache; one task per
    // batch for both (two tasks cost a thread hand-off each way per batch: measured ~6% of
    // a cold pull's CPU in BENCHMARKS.md).
    loop {
        if persisting.is_none() && !batch.is_empty() {
            let mut h = hasher
                .take()
                .expect("hasher is back when no batch is in progress");
            let chunks = std::mem::take(&mut batch);
            let f = file.clone();
            persisting = Some(tokio::task::spawn_blocking(move || {
                let mut n = 0;
                for c in &chunks {
                    if let Err(e) = io::Write::write_all(&mut &*f, c) {
                        return (h, Err(e));
                    }
                    h.update(c);
                    n += c.len() as u64;
                }
                (h, Ok(n))
            }));
        }
        if eof && persisting.is_none() && batch.is_empty() {
            break;
        }
        let can_read = !eof && received - on_disk < MAX_UNWRITTEN;
        tokio::select! {
            r = async { persisting.as_mut().expect("guarded").await }, if persisting.is_some() => {
                persisting = None;
                let (h, n) = r.map_err(|e| storage_error(io::Error::other(e)))?;
                hasher = Some(h);
                let n = n.map_err(storage_error)?;
                on_disk += n;
                fill.wrote(n);
            }
            chunk = stream.next(), if can_read => match chunk {
                None => eof = true,
                Some(Ok(c)) if c.is_empty() => {}
                Some(Ok(c)) => {
                    if total.is_some_and(|t| received + c.len() as u64 > t) {
                        return Err(bad_source(UpstreamErrorKind::Protocol(
                            "blob longer than its Content-Length",
                        )));
                    }
                    if origin == Origin::Upstream {
                        crate::metrics::upstream_bytes(up.name(), c.len() as u64);
                        up.stats().fetched(c.len() as u64);
                    }
                    received += c.len() as u64;
                    fill.receive(c.clone());
                    batch.push(c);
                    tx.send_modify(|p| {
                        if let Progress::Streaming { written, .. } = p {
                            *written = received;
                        }
                    });
                }
                Some(Err(e)) => return Err(e),
            },
        }
    }
    let actual = hasher.take().expect("no batch hashing at the end").finish();
    Ok((received, actual))
}

/// A fill's source of bytes.
enum Body {
    Stream(ByteStream),
    /// A plain-HTTP upstream's socket, for `spliced`.
    Spliced(RawBody),
}

/// Asks the upstream for the blob: its announced size and its body, the socket itself when
/// the upstream serves it over plain HTTP (received with `splice`, see `spliced`).
async fn upstream_body(fill: &Fill) -> Result<(Option<u64>, Body), FillError> {
    let up = &fill.source.upstream;
    let mut headers = HeaderMap::new();
    headers.insert(
        header::ACCEPT_ENCODING,
        HeaderValue::from_static("identity"),
    );
    let blob = up
        .send_blob(&UpstreamRequest {
            method: Method::GET,
            repo: &fill.source.repo,
            path: format!("blobs/{}", fill.digest),
            query: None,
            headers,
            streaming: true,
        })
        .await?;
    let resp = match blob {
        Blob::Raw(raw) => return Ok((Some(raw.len), Body::Spliced(raw))),
        Blob::Response(resp) => resp,
    };
    if resp.status() != http::StatusCode::OK {
        return Err(up
            .error(UpstreamErrorKind::Status(resp.status().as_u16()))
            .into());
    }
    let total = resp.content_length();
    let up = up.clone();
    let body = resp.bytes_stream().map(move |r| {
        r.map_err(|e| {
            tracing::debug!(error = %e, "upstream body error");
            FillError::from(up.error(UpstreamErrorKind::Truncated))
        })
    });
    Ok((total, Body::Stream(body.boxed())))
}

/// Asks the digest's owner replica for the blob: it serves it from its store or from its own
/// fill. `None` (the owner is unreachable, slow to answer, or failing): fetch it here instead.
async fn from_peer(fill: &Fill) -> Option<(Option<u64>, ByteStream)> {
    let via = fill.source.via.as_ref()?;
    let up = &fill.source.upstream;
    let req = UpstreamRequest {
        method: Method::GET,
        repo: &fill.source.repo,
        path: format!("blobs/{}", fill.digest),
        query: None,
        headers: HeaderMap::new(),
        streaming: true,
    };
    let resp = match via.cluster.forward(&via.owner, up.name(), &req).await {
        Ok(r) if r.status() == http::StatusCode::OK => r,
        Ok(r) => {
            tracing::warn!(digest = %fill.digest, owner = %via.owner, status = %r.status(), "owner answered a whole-blob request oddly; fetching it here");
            crate::metrics::cluster_fallback();
            return None;
        }
        Err(e) => {
            tracing::warn!(digest = %fill.digest, error = %e, "owner replica unavailable; fetching the blob here");
            return None;
        }
    };
    let total = resp.content_length();
    let (up, owner) = (up.clone(), via.owner.clone());
    let body = resp.bytes_stream().map(move |r| {
        r.map_err(|e| {
            tracing::warn!(owner = %owner, error = %e, "the owner replica's body broke off");
            FillError::from(up.error(UpstreamErrorKind::Truncated))
        })
    });
    Some((total, body.boxed()))
}

/// Reads the blob from shared storage, `SHARED_READ` bytes at a time (each read bounded by
/// the backend's timeouts). A failed or short read is a storage failure: followers continue
/// from the upstream.
fn from_shared(store: Arc<Store>, digest: Digest, size: u64) -> ByteStream {
    futures_util::stream::try_unfold(0u64, move |off| {
        let (store, digest) = (store.clone(), digest.clone());
        async move {
            if off >= size {
                return Ok(None);
            }
            let end = (off + SHARED_READ).min(size);
            match store.blobs().read_range(&digest, off..end).await {
                Ok(Some(b)) if b.len() as u64 == end - off => Ok(Some((b, end))),
                Ok(None) => {
                    crate::metrics::s3_visibility_miss();
                    Err(FillError::Storage(
                        "the shared copy is no longer there".into(),
                    ))
                }
                Ok(_) => Err(FillError::Storage(
                    "the shared copy is shorter than listed".into(),
                )),
                Err(e) => Err(storage_error(e)),
            }
        }
    })
    .boxed()
}

type ByteStream = futures_util::stream::BoxStream<'static, Result<Bytes, FillError>>;

/// A blocking-pool task of the fill.
type Blocking<T> = tokio::task::JoinHandle<T>;

/// A fill source for unit tests: an upstream on a port nothing listens on, never contacted.
#[cfg(test)]
pub(super) fn test_source() -> FillSource {
    let config =
        crate::Config::parse("[[upstream]]\nname = \"test\"\nurl = \"http://127.0.0.1:9\"\n")
            .expect("test config");
    let upstream = Upstream::new(config.upstreams[0].clone(), Default::default(), false)
        .expect("test upstream");
    FillSource {
        upstream: Arc::new(upstream),
        repo: "test/repo".parse().expect("test repository"),
        via: None,
    }
}
