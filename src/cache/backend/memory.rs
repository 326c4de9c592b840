//! An in-memory backend, for unit tests and to keep the seam honest: a `Store` on it must work
//! without any file but its spool.

use std::collections::BTreeMap;
use std::io;
use std::ops::Range;
use std::sync::Mutex;

use bytes::Bytes;

use super::{BlobInfo, Blobs, Io, Meta};
use crate::cache::temp::TempFile;
use crate::cache::usage::unix_now_ms;
use crate::oci::Digest;

#[derive(Default)]
pub struct Memory {
    blobs: Mutex<BTreeMap<Digest, (Bytes, u64)>>,
    meta: Mutex<BTreeMap<String, Bytes>>,
}

impl Blobs for Memory {
    fn stat<'a>(&'a self, digest: &'a Digest) -> Io<'a, Option<u64>> {
        let size = self
            .blobs
            .lock()
            .unwrap()
            .get(digest)
            .map(|(b, _)| b.len() as u64);
        Box::pin(async move { Ok(size) })
    }

    fn open<'a>(&'a self, digest: &'a Digest) -> Io<'a, Option<Bytes>> {
        let data = self
            .blobs
            .lock()
            .unwrap()
            .get(digest)
            .map(|(b, _)| b.clone());
        Box::pin(async move { Ok(data) })
    }

    fn read<'a>(&'a self, digest: &'a Digest) -> Io<'a, Option<Bytes>> {
        self.open(digest)
    }

    fn read_range<'a>(&'a self, digest: &'a Digest, range: Range<u64>) -> Io<'a, Option<Bytes>> {
        let data = self
            .blobs
            .lock()
            .unwrap()
            .get(digest)
            .map(|(b, _)| b.clone());
        Box::pin(async move {
            match data {
                None => Ok(None),
                Some(b) if range.end as usize <= b.len() => {
                    Ok(Some(b.slice(range.start as usize..range.end as usize)))
                }
                Some(_) => Err(io::ErrorKind::UnexpectedEof.into()),
            }
        })
    }

    fn commit<'a>(&'a self, digest: &'a Digest, spool: TempFile) -> Io<'a, ()> {
        Box::pin(async move {
            let file = spool.file().clone();
            let data = tokio::task::spawn_blocking(move || {
                use std::io::{Read as _, Seek as _};
                let mut f = &*file;
                f.rewind()?;
                let mut v = Vec::new();
                f.read_to_end(&mut v)?;
                Ok::<_, io::Error>(v)
            })
            .await
            .map_err(io::Error::other)??;
            Blobs::put(self, digest, Bytes::from(data)).await
            // The spool is dropped here, removing its file.
        })
    }

    fn put<'a>(&'a self, digest: &'a Digest, data: Bytes) -> Io<'a, ()> {
        self.blobs
            .lock()
            .unwrap()
            .entry(digest.clone())
            .or_insert((data, unix_now_ms()));
        Box::pin(async { Ok(()) })
    }

    fn delete<'a>(&'a self, digest: &'a Digest) -> Io<'a, ()> {
        self.blobs.lock().unwrap().remove(digest);
        Box::pin(async { Ok(()) })
    }

    fn list(&self) -> Io<'_, Vec<BlobInfo>> {
        let out = self
            .blobs
            .lock()
            .unwrap()
            .iter()
            .map(|(d, (b, t))| BlobInfo {
                digest: d.clone(),
                size: b.len() as u64,
                committed_ms: *t,
            })
            .collect();
        Box::pin(async { Ok(out) })
    }
}

impl Meta for Memory {
    fn get<'a>(&'a self, key: &'a str) -> Io<'a, Option<Bytes>> {
        let v = self.meta.lock().unwrap().get(key).cloned();
        Box::pin(async { Ok(v) })
    }

    fn put<'a>(&'a self, key: &'a str, data: Bytes) -> Io<'a, ()> {
        self.meta.lock().unwrap().insert(key.to_owned(), data);
        Box::pin(async { Ok(()) })
    }

    fn put_if_absent<'a>(&'a self, key: &'a str, data: Bytes) -> Io<'a, bool> {
        let mut m = self.meta.lock().unwrap();
        let wrote = !m.contains_key(key);
        if wrote {
            m.insert(key.to_owned(), data);
        }
        Box::pin(async move { Ok(wrote) })
    }

    fn delete<'a>(&'a self, key: &'a str) -> Io<'a, ()> {
        self.meta.lock().unwrap().remove(key);
        Box::pin(async { Ok(()) })
    }

    fn list<'a>(&'a self, prefix: &'a str) -> Io<'a, Vec<String>> {
        let keys = self
            .meta
            .lock()
            .unwrap()
            .range(prefix.to_owned()..)
            .take_while(|(k, _)| k.starts_with(prefix))
            .map(|(k, _)| k.clone())
            .collect();
        Box::pin(async { Ok(keys) })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cache::backend::conformance;

    #[tokio::test]
    async fn behaves_as_a_backend() {
        let dir = tempfile::tempdir().unwrap();
        let mem = Memory::default();
        let data = b"layer bytes".to_vec();
        let spool = TempFile::create(dir.path(), "spool").await.unwrap();
        std::io::Write::write_all(&mut &**spool.file(), &data).unwrap();
        conformance::blobs(&mem, spool, &data).await;
        conformance::meta(&mem).await;
    }
}
