//! Shared storage behind a local tier (the S3 backend): what the store does differently when
//! its content lives in a bucket and this process keeps copies of recently served blobs —
//! committing fills to both, copying from the bucket, redirecting to it, evicting the tier.

use std::io;

use super::backend::{self, Blobs as _};
use super::{fill, journal, temp, Store};
use crate::oci::Digest;

impl Store {
    /// Where a client may fetch a committed blob straight from shared storage (S3 with
    /// `redirect = true`): only for a blob that is there and not being filled.
    pub async fn redirect(&self, digest: &Digest) -> Option<String> {
        if !self.tiered || self.fill_in_progress(digest).is_some() {
            return None;
        }
        let url = match self.blobs.presigned_get(digest).await {
            Ok(Some(url)) => url,
            Ok(None) => return None,
            Err(e) => {
                tracing::warn!(digest = %digest, error = %e, "could not presign a GET; serving the blob");
                return None;
            }
        };
        // Only a blob shared storage is known to have (one HEAD, remembered a while).
        if !self.shared_seen.contains_key(digest) {
            match self.blobs.stat(digest).await {
                Ok(Some(_)) => self.shared_seen.insert(digest.clone(), ()),
                _ => return None,
            }
        }
        Some(url)
    }

    /// Is content kept in shared storage behind a local tier?
    pub fn is_tiered(&self) -> bool {
        self.tiered
    }

    /// Makes a verified fill's spool file a stored blob. From the upstream: into the store
    /// (with shared storage: the local tier, then uploaded from there), journaled. From shared
    /// storage or from the owner replica (which uploads it): into the local tier only.
    pub(crate) async fn commit_fill(
        &self,
        digest: &Digest,
        spool: temp::TempFile,
        size: u64,
        origin: fill::Origin,
    ) -> io::Result<()> {
        if !self.tiered {
            self.blobs.commit(digest, spool).await?;
            self.committed(digest, size).await;
            return Ok(());
        }
        // The open file survives the rename: the upload reads the local copy through it.
        let file = spool.file().clone();
        self.local.commit(digest, spool).await?;
        self.usage.added(size);
        self.usage.touch(digest);
        if self.max_size.is_some_and(|m| self.usage.bytes() > m) {
            self.over_limit.notify_one();
        }
        match origin {
            fill::Origin::Shared { .. } => {
                crate::metrics::bucket_fill();
                Ok(())
            }
            // The owner replica puts it in shared storage.
            fill::Origin::Peer => Ok(()),
            fill::Origin::Upstream => {
                // Read a part at a time from the local copy (bounded memory).
                self.blobs.copy_file(digest, file, size).await?;
                self.journal_append(journal::Entry::Blob {
                    digest: digest.to_string(),
                })
                .await;
                Ok(())
            }
        }
    }

    /// The size of a blob shared storage has (and this process does not). Shared storage that
    /// fails is counted and treated as not having it: the upstream is asked instead.
    pub(super) async fn shared_size(&self, digest: &Digest) -> Option<u64> {
        if !self.tiered {
            return None;
        }
        match self.blobs.stat(digest).await {
            Ok(size) => size,
            Err(e) => {
                crate::metrics::storage_error();
                tracing::warn!(digest = %digest, error = %e, "shared storage unavailable; asking the upstream");
                None
            }
        }
    }

    /// Removes local copies of blobs (the local tier's eviction; shared storage keeps them).
    pub(crate) async fn drop_local(&self, digests: &[Digest], freed: u64) -> io::Result<()> {
        for d in digests {
            self.mapped.invalidate(d);
            self.local.delete(d).await?;
        }
        self.usage.removed(digests);
        self.usage.set_totals(
            self.usage.bytes().saturating_sub(freed),
            self.usage.entries().saturating_sub(digests.len() as u64),
        );
        self.usage.evicted(digests.len() as u64, freed);
        Ok(())
    }

    /// This process's copies of blobs.
    pub(crate) fn local(&self) -> &backend::fs::Fs {
        &self.local
    }
}

#[cfg(test)]
mod tests {
    use bytes::Bytes;
    use futures_util::TryStreamExt;

    use super::super::{read, BlobState, Progress};
    use super::*;

    /// With shared storage behind a local tier, a blob the shared store has is copied into the
    /// tier by a fill (followers stream it, the upstream is never asked), then served as a hit.
    #[tokio::test]
    async fn a_local_miss_is_filled_from_shared_storage() {
        let dir = tempfile::tempdir().unwrap();
        let store = super::super::tests::memory_store(dir.path());
        let data = Bytes::from(vec![7u8; 20 << 20]);
        let digest = Digest::sha256_of(&data);
        store.blobs().put(&digest, data.clone()).await.unwrap();
        assert!(store.local().stat(&digest).await.unwrap().is_none());

        let BlobState::Fill {
            fill,
            joined: false,
        } = store
            .blob(&digest, Some(fill::test_source()))
            .await
            .unwrap()
        else {
            panic!("a local miss starts a fill");
        };
        assert_eq!(
            fill.origin(),
            fill::Origin::Shared {
                size: data.len() as u64
            }
        );
        let got: Vec<Bytes> = read::follow(fill.clone(), 0, Some(data.len() as u64))
            .try_collect()
            .await
            .unwrap();
        assert_eq!(got.concat(), data);
        assert!(matches!(fill.finished().await, Progress::Done { .. }));
        store.tracker.close();
        store.tracker.wait().await;
        assert_eq!(
            store.local().stat(&digest).await.unwrap(),
            Some(data.len() as u64)
        );
        assert!(matches!(
            store.blob(&digest, None).await.unwrap(),
            BlobState::Hit { .. }
        ));
    }
}
