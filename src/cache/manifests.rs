//! Stored manifests: the bytes live with the other blobs (content-addressed), their media type
//! in a meta record. A small in-memory cache keeps hot manifests off storage.

use std::io;
use std::sync::Arc;

use bytes::Bytes;

use super::{layout, Store};
use crate::oci::Digest;

#[derive(Debug)]
pub struct StoredManifest {
    pub digest: Digest,
    pub media_type: String,
    pub body: Bytes,
}

impl Store {
    /// The manifest with this digest, if stored. Its bytes were verified when stored.
    pub async fn manifest(&self, digest: &Digest) -> io::Result<Option<Arc<StoredManifest>>> {
        if let Some(m) = self.manifest_cache.get(digest) {
            return Ok(Some(m));
        }
        let Some(media_type) = self.meta().get(&layout::manifest_type(digest)).await? else {
            return Ok(None);
        };
        let Some(body) = self.blobs().read(digest).await? else {
            return Ok(None);
        };
        let m = Arc::new(StoredManifest {
            digest: digest.clone(),
            media_type: String::from_utf8_lossy(&media_type).trim().to_string(),
            body,
        });
        self.manifest_cache.insert(digest.clone(), m.clone());
        Ok(Some(m))
    }

    /// Stores a verified manifest: bytes first, then the media type, whose presence marks the
    /// manifest complete. Both writes are atomic.
    pub async fn put_manifest(&self, m: Arc<StoredManifest>) -> io::Result<()> {
        if self.blobs().stat(&m.digest).await?.is_none() {
            self.blobs().put(&m.digest, m.body.clone()).await?;
            self.committed(&m.digest, m.body.len() as u64).await;
        }
        self.record_manifest_type(&m.digest, &m.media_type).await?;
        self.manifest_cache.insert(m.digest.clone(), m);
        Ok(())
    }

    /// Records the media type of a stored manifest (its bytes must be stored already), which
    /// marks it complete; says whether it was new (and journaled).
    pub async fn record_manifest_type(
        &self,
        digest: &Digest,
        media_type: &str,
    ) -> io::Result<bool> {
        let recorded = self
            .meta()
            .put_if_absent(
                &layout::manifest_type(digest),
                Bytes::from(media_type.to_owned()),
            )
            .await?;
        if recorded {
            self.journal_append(super::journal::Entry::Manifest {
                digest: digest.to_string(),
                media_type: media_type.to_owned(),
            })
            .await;
        }
        Ok(recorded)
    }
}
