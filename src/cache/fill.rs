//! The blob fill: one detached task per digest that owns the upstream stream, writes a temp
//! file, hashes as it goes, publishes bytes written on a `watch`, verifies at the end and
//! commits atomically. Clients never own it: they follow it (see `read::follow`).

use std::fs::File;
use std::io;
use std::sync::Arc;

use bytes::Bytes;
use futures_util::StreamExt;
use http::{header, HeaderMap, HeaderValue, Method};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use super::temp::TempFile;
use super::Store;
use crate::oci::{Digest, Hasher, RepoName};
use crate::upstream::{Upstream, UpstreamError, UpstreamErrorKind, UpstreamRequest};

/// At most this much upstream data is gathered into one batch (one write + hash on the
/// blocking pool) while the previous batch is being written.
const BATCH: usize = 1024 * 1024;

/// Where a fill gets its bytes.
#[derive(Clone)]
pub struct FillSource {
    pub upstream: Arc<Upstream>,
    pub repo: RepoName,
}

/// What followers see of a fill.
#[derive(Clone)]
pub enum Progress {
    /// Waiting for the upstream's response headers.
    Connecting,
    /// Bytes `0..written` are in `file`; `total` is the upstream's Content-Length.
    Streaming {
        file: Arc<File>,
        total: Option<u64>,
        written: u64,
    },
    /// All `size` bytes are in `file` and verified against the digest.
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
    progress: watch::Receiver<Progress>,
    temp_name: std::sync::OnceLock<String>,
}

impl Fill {
    pub fn subscribe(&self) -> watch::Receiver<Progress> {
        self.progress.clone()
    }

    pub fn source(&self) -> &FillSource {
        &self.source
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

/// Creates the fill and its (not yet spawned) task.
pub(super) fn new_fill(digest: Digest, source: FillSource) -> (Arc<Fill>, watch::Sender<Progress>) {
    let (tx, rx) = watch::channel(Progress::Connecting);
    let fill = Arc::new(Fill {
        digest,
        source,
        progress: rx,
        temp_name: std::sync::OnceLock::new(),
    });
    (fill, tx)
}

/// The fill task. Runs to completion unless `cancel` fires (shutdown); whatever happens, the
/// fill leaves the in-progress map and its followers get a final state.
pub(super) async fn run(
    store: Arc<Store>,
    fill: Arc<Fill>,
    tx: watch::Sender<Progress>,
    cancel: CancellationToken,
) {
    let started = tokio::time::Instant::now();
    let result = tokio::select! {
        biased;
        _ = cancel.cancelled() => Err(FillError::Cancelled),
        r = fill_blob(&store, &fill, &tx) => r,
    };
    // The temp file (owned by `fill_blob`) is gone by now on every error path.
    store.forget_fill(&fill.digest);
    match result {
        Ok(size) => {
            tracing::info!(digest = %fill.digest, upstream = %fill.source.upstream.name(), repository = %fill.source.repo, bytes = size, duration_ms = started.elapsed().as_millis() as u64, "blob cached");
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

/// Fetch, write, hash, verify, commit. Returns the blob's size.
async fn fill_blob(
    store: &Store,
    fill: &Fill,
    tx: &watch::Sender<Progress>,
) -> Result<u64, FillError> {
    let digest = &fill.digest;
    let up = &fill.source.upstream;
    // The temp file comes first: if the store cannot take the blob, no upstream request is
    // made here and clients fetch it themselves.
    let temp = TempFile::create(store.tmp_dir(), digest.hex())
        .await
        .map_err(storage_error)?;
    let _ = fill.temp_name.set(temp.name());
    let mut headers = HeaderMap::new();
    headers.insert(
        header::ACCEPT_ENCODING,
        HeaderValue::from_static("identity"),
    );
    let resp = up
        .send(&UpstreamRequest {
            method: Method::GET,
            repo: &fill.source.repo,
            path: format!("blobs/{digest}"),
            query: None,
            headers,
            streaming: true,
        })
        .await?;
    if resp.status() != http::StatusCode::OK {
        return Err(up
            .error(UpstreamErrorKind::Status(resp.status().as_u16()))
            .into());
    }
    let total = resp.content_length();
    let file = temp.file().clone();
    tx.send_replace(Progress::Streaming {
        file: file.clone(),
        total,
        written: 0,
    });

    let mut stream = resp.bytes_stream();
    let mut writer = BatchWriter::new(file.clone(), digest.algorithm());
    let mut batch: Vec<Bytes> = Vec::new();
    let mut batched = 0usize;
    let mut submitted: u64 = 0;
    let mut eof = false;
    // Reading goes on while the previous batch is hashed and written; whatever arrived by then
    // is the next batch. A fast upstream makes large batches (few blocking-pool round trips),
    // a slow one small batches (followers see bytes as soon as they are written).
    loop {
        if !writer.busy() && !batch.is_empty() {
            submitted += batched as u64;
            if total.is_some_and(|t| submitted > t) {
                return Err(up
                    .error(UpstreamErrorKind::Protocol(
                        "blob longer than its Content-Length",
                    ))
                    .into());
            }
            crate::metrics::upstream_bytes(up.name(), batched as u64);
            writer.submit(std::mem::take(&mut batch), tx).await?;
            batched = 0;
        }
        if eof && !writer.busy() && batch.is_empty() {
            break;
        }
        tokio::select! {
            done = writer.wait(), if writer.busy() => done?,
            chunk = stream.next(), if !eof && batched < BATCH => match chunk {
                None => eof = true,
                Some(Ok(c)) => {
                    batched += c.len();
                    batch.push(c);
                }
                Some(Err(e)) => {
                    tracing::debug!(error = %e, "upstream body error");
                    return Err(up.error(UpstreamErrorKind::Truncated).into());
                }
            },
        }
        if writer.finished() {
            writer.settle(tx)?;
        }
    }
    let (written, actual) = writer.finish();
    if total.is_some_and(|t| t != written) {
        return Err(up.error(UpstreamErrorKind::Truncated).into());
    }
    if &actual != digest {
        return Err(up.error(UpstreamErrorKind::DigestMismatch).into());
    }
    // Verified: followers may finish now, while the data is made durable.
    tx.send_replace(Progress::Done {
        file,
        size: written,
    });
    match temp.commit(store.blob_path(digest)).await {
        Ok(()) => store.committed(digest, written),
        Err(e) => {
            // Every follower already has its verified bytes; only the cached copy is lost.
            crate::metrics::storage_error();
            tracing::error!(digest = %digest, error = %e, "could not commit verified blob to the store");
        }
    }
    Ok(written)
}

type InflightBatch = tokio::task::JoinHandle<(Hasher, io::Result<()>)>;
type BatchResult = Result<(Hasher, io::Result<()>), tokio::task::JoinError>;

/// Hashes and writes batches on the blocking pool, one batch in flight at a time, so the next
/// batch downloads meanwhile. Memory stays bounded at two batches.
struct BatchWriter {
    file: Arc<File>,
    hasher: Option<Hasher>,
    /// The batch being hashed and written: its length and the task (which hands the hasher
    /// back), and its result once the task is done.
    inflight: Option<(u64, InflightBatch)>,
    done: Option<(u64, BatchResult)>,
    written: u64,
}

impl BatchWriter {
    fn new(file: Arc<File>, algorithm: crate::oci::Algorithm) -> BatchWriter {
        BatchWriter {
            file,
            hasher: Some(Hasher::new(algorithm)),
            inflight: None,
            done: None,
            written: 0,
        }
    }

    /// A batch is in flight or its result not yet taken.
    fn busy(&self) -> bool {
        self.inflight.is_some() || self.done.is_some()
    }

    fn finished(&self) -> bool {
        self.done.is_some()
    }

    /// Waits for the batch in flight (cancel-safe: the result is kept until `settle`).
    async fn wait(&mut self) -> Result<(), FillError> {
        if let Some((n, task)) = self.inflight.as_mut() {
            let r = task.await;
            let n = *n;
            self.inflight = None;
            self.done = Some((n, r));
        }
        Ok(())
    }

    /// Takes the finished batch's result and tells followers its bytes are readable.
    fn settle(&mut self, tx: &watch::Sender<Progress>) -> Result<(), FillError> {
        let Some((n, r)) = self.done.take() else {
            return Ok(());
        };
        let (hasher, res) = r.map_err(|e| storage_error(io::Error::other(e)))?;
        res.map_err(storage_error)?;
        self.hasher = Some(hasher);
        self.written += n;
        let written = self.written;
        tx.send_modify(|p| {
            if let Progress::Streaming { written: w, .. } = p {
                *w = written;
            }
        });
        Ok(())
    }

    async fn submit(
        &mut self,
        batch: Vec<Bytes>,
        tx: &watch::Sender<Progress>,
    ) -> Result<(), FillError> {
        self.wait().await?;
        self.settle(tx)?;
        let mut hasher = self.hasher.take().expect("hasher is back after settle");
        let file = self.file.clone();
        let n: u64 = batch.iter().map(|b| b.len() as u64).sum();
        self.inflight = Some((
            n,
            tokio::task::spawn_blocking(move || {
                let mut res = Ok(());
                for b in &batch {
                    hasher.update(b);
                    if res.is_ok() {
                        res = io::Write::write_all(&mut &*file, b);
                    }
                }
                (hasher, res)
            }),
        ));
        Ok(())
    }

    /// All bytes written (the caller waited for the last batch): their count and digest.
    fn finish(mut self) -> (u64, Digest) {
        let hasher = self.hasher.take().expect("no batch in flight at the end");
        (self.written, hasher.finish())
    }
}
