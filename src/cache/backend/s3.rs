//! The S3 backend (Garage, Ceph RGW, AWS S3, ...): keys are object keys under an optional
//! prefix, reached with path-style requests through `object_store`.
//!
//! The rules of DESIGN.md ("Rules for object stores") as they apply here:
//! - a write is confirmed only by a well-formed 2xx to PutObject / CompleteMultipartUpload;
//!   a multipart upload is aborted on every error path, so an incomplete blob is never visible;
//! - "not there" (404) is `None`, never an error: read-after-write lag is a miss;
//! - every call is bounded: a request timeout and a bounded number of retries (`object_store`
//!   retries idempotent requests, with backoff, within `retry_timeout`);
//! - writes are content-addressed and idempotent, so two replicas writing a digest write the
//!   same bytes; conditional writes are a hint (`put_if_absent` checks, then writes).
//!
//! Large blobs are uploaded in parts of at least 8 MiB (at most 10,000 parts), read from the
//! local file one part at a time, one part in flight per upload and a process-wide bound on
//! part bytes in flight.

use std::io;
use std::ops::Range;
use std::sync::Arc;

use bytes::Bytes;
use futures_util::TryStreamExt as _;
use object_store::aws::{AmazonS3, AmazonS3Builder};
use object_store::multipart::MultipartStore as _;
use object_store::path::Path as ObjectPath;
use object_store::{ClientOptions, ObjectStore, ObjectStoreExt as _, PutPayload, RetryConfig};
use tokio::sync::Semaphore;

use super::{BlobInfo, Blobs, Io, Meta};
use crate::cache::layout;
use crate::cache::temp::TempFile;
use crate::config::S3Config;
use crate::oci::Digest;

/// Smallest part of a multipart upload (S3's minimum is 5 MiB; larger parts mean fewer
/// requests).
const MIN_PART: u64 = 8 << 20;
/// S3's limit on parts per upload.
const MAX_PARTS: u64 = 10_000;
/// Part bytes in flight across every upload of the process.
const PARTS_IN_FLIGHT: u32 = 64; // MiB

pub struct S3 {
    store: AmazonS3,
    prefix: String,
    /// Permits are MiB of part bytes in flight.
    parts: Arc<Semaphore>,
    abandoned_after: std::time::Duration,
    /// Answer hits with redirects to presigned GETs.
    redirect: bool,
}

/// How long a presigned GET stays valid: long enough to start a large download on a slow
/// link (S3 checks the signature when the request starts).
const PRESIGNED_FOR: std::time::Duration = std::time::Duration::from_secs(15 * 60);

impl S3 {
    pub fn new(cfg: &S3Config) -> io::Result<S3> {
        crate::tls::install_provider();
        let options = ClientOptions::new()
            .with_allow_http(true)
            .with_connect_timeout(cfg.connect_timeout)
            .with_timeout(cfg.request_timeout);
        let retry = RetryConfig {
            max_retries: cfg.retries as usize,
            retry_timeout: cfg.request_timeout * (cfg.retries + 1),
            ..RetryConfig::default()
        };
        let mut b = AmazonS3Builder::new()
            .with_region(&cfg.region)
            .with_bucket_name(&cfg.bucket)
            .with_virtual_hosted_style_request(false)
            .with_client_options(options)
            .with_http_connector(super::s3_metrics::CountingConnector)
            .with_retry(retry);
        if let Some(endpoint) = &cfg.endpoint {
            b = b.with_endpoint(endpoint.as_str().trim_end_matches('/'));
        }
        if let (Some(id), Some(secret)) = (&cfg.access_key_id, &cfg.secret_access_key) {
            b = b.with_access_key_id(id).with_secret_access_key(secret);
        }
        let store = b.build().map_err(|e| io::Error::other(describe(e)))?;
        Ok(S3 {
            store,
            prefix: cfg.prefix.clone(),
            parts: Arc::new(Semaphore::new(PARTS_IN_FLIGHT as usize)),
            abandoned_after: cfg.abandoned_uploads_after,
            redirect: cfg.redirect,
        })
    }

    fn path(&self, key: &str) -> ObjectPath {
        ObjectPath::from(format!("{}{key}", self.prefix))
    }

    /// The store key of an object path under the prefix.
    fn key_of<'a>(&self, location: &'a ObjectPath) -> Option<&'a str> {
        location.as_ref().strip_prefix(self.prefix.as_str())
    }

    async fn get(&self, key: &str) -> io::Result<Option<Bytes>> {
        match self.store.get(&self.path(key)).await {
            Ok(r) => Ok(Some(r.bytes().await.map_err(error)?)),
            Err(object_store::Error::NotFound { .. }) => Ok(None),
            Err(e) => Err(error(e)),
        }
    }

    async fn head(&self, key: &str) -> io::Result<Option<u64>> {
        match self.store.head(&self.path(key)).await {
            Ok(m) => Ok(Some(m.size)),
            Err(object_store::Error::NotFound { .. }) => Ok(None),
            Err(e) => Err(error(e)),
        }
    }

    async fn delete_key(&self, key: &str) -> io::Result<()> {
        match self.store.delete(&self.path(key)).await {
            Ok(()) | Err(object_store::Error::NotFound { .. }) => Ok(()),
            Err(e) => Err(error(e)),
        }
    }

    /// Writes `data` at `key`: one PUT when small, else a multipart upload that is completed
    /// only when every part is in, and aborted otherwise.
    async fn write(&self, key: &str, data: Source) -> io::Result<()> {
        let path = self.path(key);
        let len = data.len();
        if len <= MIN_PART {
            let all = data.read(0..len).await?;
            self.store
                .put(&path, PutPayload::from(all))
                .await
                .map_err(error)?;
            return Ok(());
        }
        let part = MIN_PART.max(len.div_ceil(MAX_PARTS));
        let id = self.store.create_multipart(&path).await.map_err(error)?;
        // Recorded first, so that if this process dies mid-upload a later sweep (of any
        // replica) finds the upload by its record and aborts it: nothing lists uploads.
        let record = Upload {
            key: key.to_owned(),
            id: id.clone(),
            started_ms: crate::cache::usage::unix_now_ms(),
        };
        let record_key = layout::upload(&hex::encode(&id));
        let result = match serde_json::to_vec(&record) {
            Ok(json) => match self
                .store
                .put(&self.path(&record_key), PutPayload::from(json))
                .await
            {
                Ok(_) => self.upload_parts(&path, &id, &data, part).await,
                Err(e) => Err(error(e)),
            },
            Err(e) => Err(io::Error::other(e)),
        };
        if result.is_err() {
            // Incomplete uploads are invisible, but they cost storage until aborted.
            if let Err(abort) = self.store.abort_multipart(&path, &id).await {
                tracing::warn!(key, error = %describe(abort), "could not abort a multipart upload; the sweep will");
                return result;
            }
            crate::metrics::s3_upload_aborted();
        }
        if let Err(e) = self.delete_key(&record_key).await {
            tracing::warn!(key, error = %e, "could not remove the record of a finished upload");
        }
        result
    }

    /// Sends `data` in parts of `part` bytes, one at a time, then completes the upload. Only
    /// a 2xx to CompleteMultipartUpload confirms it.
    async fn upload_parts(
        &self,
        path: &ObjectPath,
        id: &object_store::MultipartId,
        data: &Source,
        part: u64,
    ) -> io::Result<()> {
        let len = data.len();
        let mut parts = Vec::new();
        let mut off = 0;
        while off < len {
            let end = (off + part).min(len);
            let mib = (end - off).div_ceil(1 << 20).min(PARTS_IN_FLIGHT as u64) as u32;
            let _budget = self
                .parts
                .acquire_many(mib)
                .await
                .map_err(io::Error::other)?;
            // Read only now, under the budget: one part of this upload in memory at a time.
            let payload = PutPayload::from(data.read(off..end).await?);
            parts.push(
                self.store
                    .put_part(path, id, parts.len(), payload)
                    .await
                    .map_err(error)?,
            );
            off = end;
        }
        self.store
            .complete_multipart(path, id, parts)
            .await
            .map_err(error)?;
        Ok(())
    }

    /// Aborts the recorded uploads that began more than `abandoned_after` ago (their writer
    /// died) and removes their records. Returns how many.
    async fn abort_abandoned(&self) -> io::Result<usize> {
        let now = crate::cache::usage::unix_now_ms();
        let cutoff = self.abandoned_after.as_millis() as u64;
        let mut aborted = 0;
        for record_key in Meta::list(self, layout::UPLOADS).await? {
            let Some(text) = self.get(&record_key).await? else {
                continue;
            };
            let Ok(up) = serde_json::from_slice::<Upload>(&text) else {
                tracing::warn!(record = record_key, "removing an unreadable upload record");
                self.delete_key(&record_key).await?;
                continue;
            };
            if now.saturating_sub(up.started_ms) < cutoff {
                continue;
            }
            match self
                .store
                .abort_multipart(&self.path(&up.key), &up.id)
                .await
            {
                // Already gone: completed or aborted after all.
                Ok(()) | Err(object_store::Error::NotFound { .. }) => {}
                Err(e) => return Err(error(e)),
            }
            self.delete_key(&record_key).await?;
            crate::metrics::s3_upload_aborted();
            tracing::info!(key = up.key, "aborted an abandoned multipart upload");
            aborted += 1;
        }
        Ok(aborted)
    }
}

/// What an upload sends: bytes in memory, or a complete file read a part at a time (a
/// mapping would keep every page it touched counted in the process's memory until the end).
enum Source {
    Bytes(Bytes),
    File(Arc<std::fs::File>, u64),
}

impl Source {
    fn len(&self) -> u64 {
        match self {
            Source::Bytes(b) => b.len() as u64,
            Source::File(_, len) => *len,
        }
    }

    async fn read(&self, range: Range<u64>) -> io::Result<Bytes> {
        match self {
            Source::Bytes(b) => Ok(b.slice(range.start as usize..range.end as usize)),
            Source::File(file, _) => {
                // A mapping of this part alone: no copy, and its pages leave the process's
                // memory when the part has been sent and dropped (heap buffers of 8 MiB
                // would stay with the allocator).
                let file = file.clone();
                tokio::task::spawn_blocking(move || crate::cache::mapped::map_range(&file, range))
                    .await
                    .map_err(io::Error::other)?
            }
        }
    }
}

/// The record of a multipart upload in progress.
#[derive(serde::Serialize, serde::Deserialize)]
struct Upload {
    key: String,
    id: String,
    started_ms: u64,
}

/// An `object_store` error as an I/O error for `Store` (404 is `NotFound`).
fn error(e: object_store::Error) -> io::Error {
    let kind = match &e {
        object_store::Error::NotFound { .. } => io::ErrorKind::NotFound,
        _ => io::ErrorKind::Other,
    };
    io::Error::new(kind, describe(e))
}

/// The error's own text, without credentials (object_store never prints them).
fn describe(e: object_store::Error) -> String {
    e.to_string()
}

impl Blobs for S3 {
    fn stat<'a>(&'a self, digest: &'a Digest) -> Io<'a, Option<u64>> {
        Box::pin(async move { self.head(&layout::blob(digest)).await })
    }

    fn open<'a>(&'a self, digest: &'a Digest) -> Io<'a, Option<Bytes>> {
        Box::pin(async move { self.get(&layout::blob(digest)).await })
    }

    fn read<'a>(&'a self, digest: &'a Digest) -> Io<'a, Option<Bytes>> {
        Box::pin(async move { self.get(&layout::blob(digest)).await })
    }

    fn read_range<'a>(&'a self, digest: &'a Digest, range: Range<u64>) -> Io<'a, Option<Bytes>> {
        Box::pin(async move {
            match self
                .store
                .get_range(&self.path(&layout::blob(digest)), range)
                .await
            {
                Ok(b) => Ok(Some(b)),
                Err(object_store::Error::NotFound { .. }) => Ok(None),
                Err(e) => Err(error(e)),
            }
        })
    }

    fn commit<'a>(&'a self, digest: &'a Digest, spool: TempFile) -> Io<'a, ()> {
        Box::pin(async move {
            let size = spool.file().metadata()?.len();
            let source = Source::File(spool.file().clone(), size);
            self.write(&layout::blob(digest), source).await
            // The spool is dropped here, removing its file.
        })
    }

    fn copy_file<'a>(
        &'a self,
        digest: &'a Digest,
        file: Arc<std::fs::File>,
        size: u64,
    ) -> Io<'a, ()> {
        Box::pin(async move {
            self.write(&layout::blob(digest), Source::File(file, size))
                .await
        })
    }

    fn put<'a>(&'a self, digest: &'a Digest, data: Bytes) -> Io<'a, ()> {
        Box::pin(async move { self.write(&layout::blob(digest), Source::Bytes(data)).await })
    }

    fn delete<'a>(&'a self, digest: &'a Digest) -> Io<'a, ()> {
        Box::pin(async move { self.delete_key(&layout::blob(digest)).await })
    }

    fn presigned_get<'a>(&'a self, digest: &'a Digest) -> Io<'a, Option<String>> {
        Box::pin(async move {
            if !self.redirect {
                return Ok(None);
            }
            let url = object_store::signer::Signer::signed_url(
                &self.store,
                http::Method::GET,
                &self.path(&layout::blob(digest)),
                PRESIGNED_FOR,
            )
            .await
            .map_err(error)?;
            Ok(Some(url.to_string()))
        })
    }

    fn sweep_abandoned(&self) -> Io<'_, usize> {
        Box::pin(self.abort_abandoned())
    }

    fn list(&self) -> Io<'_, Vec<BlobInfo>> {
        Box::pin(async move {
            let metas: Vec<_> = self
                .store
                .list(Some(&self.path(layout::BLOBS)))
                .try_collect()
                .await
                .map_err(error)?;
            Ok(metas
                .iter()
                .filter_map(|m| {
                    let digest = layout::parse_digest_key(self.key_of(&m.location)?)?;
                    Some(BlobInfo {
                        digest,
                        size: m.size,
                        committed_ms: m.last_modified.timestamp_millis().max(0) as u64,
                    })
                })
                .collect())
        })
    }
}

impl Meta for S3 {
    fn get<'a>(&'a self, key: &'a str) -> Io<'a, Option<Bytes>> {
        Box::pin(self.get(key))
    }

    fn put<'a>(&'a self, key: &'a str, data: Bytes) -> Io<'a, ()> {
        Box::pin(self.write(key, Source::Bytes(data)))
    }

    fn put_if_absent<'a>(&'a self, key: &'a str, data: Bytes) -> Io<'a, bool> {
        // A check, then a write: conditional PUTs are ignored by some stores (Garage), and the
        // records written this way are the same whoever writes them.
        Box::pin(async move {
            if self.head(key).await?.is_some() {
                return Ok(false);
            }
            self.write(key, Source::Bytes(data)).await?;
            Ok(true)
        })
    }

    fn delete<'a>(&'a self, key: &'a str) -> Io<'a, ()> {
        Box::pin(self.delete_key(key))
    }

    fn list<'a>(&'a self, prefix: &'a str) -> Io<'a, Vec<String>> {
        Box::pin(async move {
            // Listing works on whole path segments: list the folder, then filter.
            let dir = prefix.rsplit_once('/').map_or("", |(dir, _)| dir);
            let metas: Vec<_> = self
                .store
                .list(Some(&self.path(dir)))
                .try_collect()
                .await
                .map_err(error)?;
            let mut keys: Vec<String> = metas
                .iter()
                .filter_map(|m| self.key_of(&m.location))
                .filter(|k| k.starts_with(prefix))
                .map(str::to_owned)
                .collect();
            keys.sort();
            Ok(keys)
        })
    }
}
