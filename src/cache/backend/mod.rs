//! The storage seam: what `Store` needs from the place bytes are kept, as two small traits.
//! `Blobs` holds verified content by digest; `Meta` holds small records by key (manifest media
//! types, tags, pins, use stamps). Keys come from `layout` only.
//!
//! Implementations: `fs` (a folder; the embedded default), `s3` (an S3-compatible bucket) and
//! `memory` (for unit tests, and to keep the seam honest: nothing may depend on files
//! existing).

pub mod fs;
pub mod memory;
pub mod s3;
mod s3_metrics;

use std::io;
use std::ops::Range;

use bytes::Bytes;
use futures_util::future::BoxFuture;
use futures_util::{StreamExt as _, TryStreamExt as _};

use super::temp::TempFile;
use crate::oci::Digest;

/// What a backend call returns.
pub type Io<'a, T> = BoxFuture<'a, io::Result<T>>;

/// Reads in flight at once in the default `read_many` and `get_many`.
const MANY_AT_ONCE: usize = 16;

/// A stored blob as listed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BlobInfo {
    pub digest: Digest,
    pub size: u64,
    /// When it was committed, in Unix milliseconds (0 if unknown).
    pub committed_ms: u64,
}

/// Verified content by digest. A blob, once there, never changes: it is only ever removed.
pub trait Blobs: Send + Sync {
    /// The size of a stored blob; `None` when it is not there.
    fn stat<'a>(&'a self, digest: &'a Digest) -> Io<'a, Option<u64>>;

    /// The whole blob, to serve by slicing (on disk: a read-only mapping, no copy).
    fn open<'a>(&'a self, digest: &'a Digest) -> Io<'a, Option<Bytes>>;

    /// The whole blob read into memory: for small ones (manifests) that are kept in a cache.
    fn read<'a>(&'a self, digest: &'a Digest) -> Io<'a, Option<Bytes>>;

    /// Several whole small blobs (the manifests a listing reads), in the order asked; `None`
    /// for one that is not there. For sweeps and tools: the default reads them side by side,
    /// a folder in one blocking task (a hop to the blocking pool per file was a third of a
    /// sweep's CPU at 1M blobs).
    fn read_many<'a>(&'a self, digests: &'a [Digest]) -> Io<'a, Vec<Option<Bytes>>> {
        Box::pin(
            futures_util::stream::iter(digests)
                .map(|d| self.read(d))
                .buffered(MANY_AT_ONCE)
                .try_collect(),
        )
    }

    /// Bytes `range` of a blob (a fill from shared storage reads it piece by piece); `None`
    /// when the blob is not there.
    fn read_range<'a>(&'a self, digest: &'a Digest, range: Range<u64>) -> Io<'a, Option<Bytes>>;

    /// Makes a verified spool file the blob `digest`, atomically and durably: a crash leaves
    /// nothing or the whole blob. The spool is consumed (moved or removed).
    fn commit<'a>(&'a self, digest: &'a Digest, spool: TempFile) -> Io<'a, ()>;

    /// Stores the blob `digest` from a complete, verified file of `size` bytes, which stays
    /// where it is (the local copy of a tier in front of shared storage).
    fn copy_file<'a>(
        &'a self,
        digest: &'a Digest,
        file: std::sync::Arc<std::fs::File>,
        size: u64,
    ) -> Io<'a, ()> {
        Box::pin(async move {
            let data = tokio::task::spawn_blocking(move || {
                use std::os::unix::fs::FileExt as _;
                let mut buf = vec![0u8; size as usize];
                file.read_exact_at(&mut buf, 0)?;
                Ok::<_, io::Error>(Bytes::from(buf))
            })
            .await
            .map_err(io::Error::other)??;
            self.put(digest, data).await
        })
    }

    /// Stores small verified bytes (a manifest) as the blob `digest`, atomically and durably.
    fn put<'a>(&'a self, digest: &'a Digest, data: Bytes) -> Io<'a, ()>;

    /// Removes a blob; one that is not there is fine.
    fn delete<'a>(&'a self, digest: &'a Digest) -> Io<'a, ()>;

    /// Every stored blob. For sweeps and tools, never on a request's path.
    fn list(&self) -> Io<'_, Vec<BlobInfo>>;

    /// A time-limited URL a client may GET the stored blob from directly, when the backend
    /// offers that and is configured to (S3 `redirect = true`); `None` otherwise. Says nothing
    /// about whether the blob is there.
    fn presigned_get<'a>(&'a self, _digest: &'a Digest) -> Io<'a, Option<String>> {
        Box::pin(async { Ok(None) })
    }

    /// Cleans up writes whose writer died (abandoned multipart uploads); returns how many.
    /// Nothing to do where a write is a local temp file (the spool is swept apart).
    fn sweep_abandoned(&self) -> Io<'_, usize> {
        Box::pin(async { Ok(0) })
    }
}

/// Small records by key.
pub trait Meta: Send + Sync {
    /// The record at `key`, if any.
    fn get<'a>(&'a self, key: &'a str) -> Io<'a, Option<Bytes>>;

    /// The records at `keys`, in the order asked (`None` where there is none). For sweeps and
    /// tools; as `Blobs::read_many`.
    fn get_many<'a>(&'a self, keys: &'a [String]) -> Io<'a, Vec<Option<Bytes>>> {
        Box::pin(
            futures_util::stream::iter(keys)
                .map(|k| self.get(k))
                .buffered(MANY_AT_ONCE)
                .try_collect(),
        )
    }

    /// Replaces the record atomically and durably: readers see the old or the new value.
    fn put<'a>(&'a self, key: &'a str, data: Bytes) -> Io<'a, ()>;

    /// Writes only if nothing is at `key`; says whether it wrote. A hint only (some object
    /// stores ignore conditions): callers write the same value either way.
    fn put_if_absent<'a>(&'a self, key: &'a str, data: Bytes) -> Io<'a, bool>;

    /// Removes the record; one that is not there is fine.
    fn delete<'a>(&'a self, key: &'a str) -> Io<'a, ()>;

    /// The keys under `prefix`, sorted. For sweeps and tools, never on a request's path.
    fn list<'a>(&'a self, prefix: &'a str) -> Io<'a, Vec<String>>;
}

/// The behaviour every backend must have, run against each implementation by its tests.
#[cfg(test)]
pub(crate) mod conformance {
    use super::*;
    use crate::cache::layout;

    pub async fn blobs(b: &dyn Blobs, spool: TempFile, spool_bytes: &[u8]) {
        let d = Digest::sha256_of(spool_bytes);
        assert_eq!(b.stat(&d).await.unwrap(), None);
        assert_eq!(b.open(&d).await.unwrap(), None);
        b.commit(&d, spool).await.unwrap();
        assert_eq!(b.stat(&d).await.unwrap(), Some(spool_bytes.len() as u64));
        assert_eq!(&b.open(&d).await.unwrap().unwrap()[..], spool_bytes);
        assert_eq!(&b.read(&d).await.unwrap().unwrap()[..], spool_bytes);
        assert_eq!(
            &b.read_range(&d, 2..5).await.unwrap().unwrap()[..],
            &spool_bytes[2..5]
        );

        let m = Digest::sha256_of(b"{}");
        b.put(&m, Bytes::from_static(b"{}")).await.unwrap();
        let absent = Digest::sha256_of(b"absent");
        let many = b.read_many(&[m.clone(), absent, d.clone()]).await.unwrap();
        assert_eq!(
            many,
            vec![
                Some(Bytes::from_static(b"{}")),
                None,
                Some(Bytes::copy_from_slice(spool_bytes))
            ]
        );
        // Putting the same content again is fine (commits are idempotent).
        b.put(&m, Bytes::from_static(b"{}")).await.unwrap();
        let mut listed: Vec<Digest> = b
            .list()
            .await
            .unwrap()
            .into_iter()
            .map(|i| i.digest)
            .collect();
        listed.sort();
        let mut want = vec![d.clone(), m.clone()];
        want.sort();
        assert_eq!(listed, want);

        b.delete(&d).await.unwrap();
        b.delete(&d).await.unwrap();
        assert_eq!(b.stat(&d).await.unwrap(), None);
        assert_eq!(b.list().await.unwrap().len(), 1);
    }

    pub async fn meta(m: &dyn Meta) {
        let k = layout::PINS;
        assert_eq!(m.get(k).await.unwrap(), None);
        m.put(k, Bytes::from_static(b"one")).await.unwrap();
        m.put(k, Bytes::from_static(b"two")).await.unwrap();
        assert_eq!(m.get(k).await.unwrap().as_deref(), Some(&b"two"[..]));
        assert!(!m
            .put_if_absent(k, Bytes::from_static(b"three"))
            .await
            .unwrap());
        assert_eq!(m.get(k).await.unwrap().as_deref(), Some(&b"two"[..]));

        let t1 = "meta/tags/up/a/b/_tags/1";
        let t2 = "meta/tags/up/a/_tags/2";
        assert!(m.put_if_absent(t1, Bytes::from_static(b"x")).await.unwrap());
        m.put(t2, Bytes::from_static(b"y")).await.unwrap();
        assert_eq!(
            m.get_many(&[
                t2.to_owned(),
                "meta/tags/up/none/_tags/1".to_owned(),
                t1.to_owned()
            ])
            .await
            .unwrap(),
            vec![
                Some(Bytes::from_static(b"y")),
                None,
                Some(Bytes::from_static(b"x"))
            ]
        );
        assert_eq!(
            m.list(layout::TAGS).await.unwrap(),
            vec![t2.to_owned(), t1.to_owned()]
        );
        assert_eq!(
            m.list("meta/tags/up/a/b/").await.unwrap(),
            vec![t1.to_owned()]
        );
        assert!(m.list("meta/nothing/").await.unwrap().is_empty());

        m.delete(t1).await.unwrap();
        m.delete(t1).await.unwrap();
        assert_eq!(m.list(layout::TAGS).await.unwrap(), vec![t2.to_owned()]);
    }
}
