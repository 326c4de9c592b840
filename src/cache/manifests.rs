//! Stored manifests: the bytes live with the other blobs (content-addressed), their media type
//! beside them in `meta/manifests/`. A small in-memory cache keeps hot manifests off the disk.

use std::io;
use std::path::PathBuf;
use std::sync::Arc;

use bytes::Bytes;

use super::{temp, Store};
use crate::oci::Digest;

/// Where a manifest's media type is recorded (its presence marks the manifest stored).
pub fn meta_path(root: &std::path::Path, digest: &Digest) -> PathBuf {
    root.join("meta/manifests")
        .join(digest.algorithm().as_str())
        .join(digest.hex())
}

#[derive(Debug)]
pub struct StoredManifest {
    pub digest: Digest,
    pub media_type: String,
    pub body: Bytes,
}

impl Store {
    fn manifest_meta_path(&self, digest: &Digest) -> PathBuf {
        meta_path(self.root(), digest)
    }

    /// The manifest with this digest, if stored. Its bytes were verified when stored.
    pub async fn manifest(&self, digest: &Digest) -> io::Result<Option<Arc<StoredManifest>>> {
        if let Some(m) = self.manifest_cache.get(digest) {
            return Ok(Some(m));
        }
        let media_type = match tokio::fs::read_to_string(self.manifest_meta_path(digest)).await {
            Ok(t) => t,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(e),
        };
        let body = match tokio::fs::read(self.blob_path(digest)).await {
            Ok(b) => Bytes::from(b),
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(e),
        };
        let m = Arc::new(StoredManifest {
            digest: digest.clone(),
            media_type: media_type.trim().to_string(),
            body,
        });
        self.manifest_cache.insert(digest.clone(), m.clone());
        Ok(Some(m))
    }

    /// Stores a verified manifest: bytes first, then the media type, whose presence marks the
    /// manifest complete. Both writes are atomic.
    pub async fn put_manifest(&self, m: Arc<StoredManifest>) -> io::Result<()> {
        let blob = self.blob_path(&m.digest);
        if !tokio::fs::try_exists(&blob).await.unwrap_or(false) {
            temp::write_atomic(self.tmp_dir(), m.digest.hex(), blob, m.body.clone()).await?;
            self.committed(&m.digest, m.body.len() as u64);
        }
        let meta = self.manifest_meta_path(&m.digest);
        if !tokio::fs::try_exists(&meta).await.unwrap_or(false) {
            temp::write_atomic(
                self.tmp_dir(),
                "manifest-type",
                meta,
                Bytes::from(m.media_type.clone()),
            )
            .await?;
            self.journal_append(super::journal::Entry::Manifest {
                digest: m.digest.to_string(),
                media_type: m.media_type.clone(),
            });
        }
        self.manifest_cache.insert(m.digest.clone(), m);
        Ok(())
    }
}
