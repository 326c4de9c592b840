//! The filesystem backend: keys are paths under the store folder. Every write is a temp file
//! in `tmp/` made durable and renamed into place (`temp::write_atomic`), so a crash leaves the
//! old record or the new one; blobs are served from read-only mappings.

use std::io;
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::time::UNIX_EPOCH;

use bytes::Bytes;

use super::{BlobInfo, Blobs, Io, Meta};
use crate::cache::temp::{self, TempFile};
use crate::cache::{layout, mapped};
use crate::oci::Digest;

/// A store folder.
#[derive(Debug, Clone)]
pub struct Fs {
    root: PathBuf,
    tmp: PathBuf,
}

impl Fs {
    /// The backend over `root`. Creates the folders it writes to.
    pub fn at(root: &Path) -> io::Result<Fs> {
        let tmp = layout::tmp_dir(root);
        for dir in [
            root.join(layout::BLOBS),
            root.join(layout::MANIFESTS),
            root.join(layout::TAGS),
            tmp.clone(),
        ] {
            std::fs::create_dir_all(dir)?;
        }
        Ok(Fs {
            root: root.to_path_buf(),
            tmp,
        })
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    fn path(&self, key: &str) -> PathBuf {
        layout::path(&self.root, key)
    }
}

fn not_found_is_none<T>(r: io::Result<T>) -> io::Result<Option<T>> {
    match r {
        Ok(v) => Ok(Some(v)),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e),
    }
}

fn not_found_is_ok(r: io::Result<()>) -> io::Result<()> {
    not_found_is_none(r).map(|_| ())
}

/// Runs blocking file work on the blocking pool.
async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> io::Result<T> + Send + 'static,
) -> io::Result<T> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(io::Error::other)?
}

impl Blobs for Fs {
    fn stat<'a>(&'a self, digest: &'a Digest) -> Io<'a, Option<u64>> {
        let p = self.path(&layout::blob(digest));
        Box::pin(async move {
            not_found_is_none(tokio::fs::metadata(&p).await).map(|m| m.map(|m| m.len()))
        })
    }

    fn open<'a>(&'a self, digest: &'a Digest) -> Io<'a, Option<Bytes>> {
        let p = self.path(&layout::blob(digest));
        Box::pin(blocking(move || not_found_is_none(mapped::map_file(&p))))
    }

    fn read<'a>(&'a self, digest: &'a Digest) -> Io<'a, Option<Bytes>> {
        let p = self.path(&layout::blob(digest));
        Box::pin(
            async move { not_found_is_none(tokio::fs::read(&p).await).map(|b| b.map(Bytes::from)) },
        )
    }

    fn read_range<'a>(&'a self, digest: &'a Digest, range: Range<u64>) -> Io<'a, Option<Bytes>> {
        let p = self.path(&layout::blob(digest));
        Box::pin(blocking(move || {
            use std::os::unix::fs::FileExt as _;
            let Some(file) = not_found_is_none(std::fs::File::open(&p))? else {
                return Ok(None);
            };
            let mut buf = vec![0u8; (range.end - range.start) as usize];
            file.read_exact_at(&mut buf, range.start)?;
            Ok(Some(Bytes::from(buf)))
        }))
    }

    fn commit<'a>(&'a self, digest: &'a Digest, spool: TempFile) -> Io<'a, ()> {
        let dest = self.path(&layout::blob(digest));
        Box::pin(async move {
            if let Some(parent) = dest.parent() {
                tokio::fs::create_dir_all(parent).await?;
            }
            spool.commit(dest).await
        })
    }

    fn put<'a>(&'a self, digest: &'a Digest, data: Bytes) -> Io<'a, ()> {
        let dest = self.path(&layout::blob(digest));
        Box::pin(async move {
            // Content-addressed: what is there already is these bytes.
            if tokio::fs::try_exists(&dest).await? {
                return Ok(());
            }
            temp::write_atomic(&self.tmp, digest.hex(), dest, data).await
        })
    }

    fn delete<'a>(&'a self, digest: &'a Digest) -> Io<'a, ()> {
        let p = self.path(&layout::blob(digest));
        Box::pin(async move { not_found_is_ok(tokio::fs::remove_file(&p).await) })
    }

    fn list(&self) -> Io<'_, Vec<BlobInfo>> {
        let root = self.root.clone();
        Box::pin(blocking(move || {
            // Straight from the two levels of folders (`blobs/<alg>/<hex>`): a year-old store
            // lists a million blobs, and a sorted list of their keys first cost as much memory
            // again as the listing itself (issue 13).
            let mut out = Vec::new();
            let top = layout::path(&root, layout::BLOBS);
            let algorithms = match std::fs::read_dir(&top) {
                Ok(rd) => rd,
                Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(out),
                Err(e) => return Err(e),
            };
            for alg in algorithms {
                let alg = alg?;
                let Ok(alg_name) = alg.file_name().into_string() else {
                    continue;
                };
                if !alg.file_type()?.is_dir() {
                    continue;
                }
                for entry in std::fs::read_dir(alg.path())? {
                    let entry = entry?;
                    let Ok(name) = entry.file_name().into_string() else {
                        continue;
                    };
                    let key = format!("{}{alg_name}/{name}", layout::BLOBS);
                    let Some(digest) = layout::parse_digest_key(&key) else {
                        continue;
                    };
                    let Ok(meta) = entry.metadata() else {
                        continue; // removed meanwhile
                    };
                    if !meta.is_file() {
                        continue;
                    }
                    let committed_ms = meta
                        .modified()
                        .ok()
                        .and_then(|t| t.duration_since(UNIX_EPOCH).ok())
                        .map_or(0, |d| d.as_millis() as u64);
                    out.push(BlobInfo {
                        digest,
                        size: meta.len(),
                        committed_ms,
                    });
                }
            }
            Ok(out)
        }))
    }
}

impl Meta for Fs {
    fn get<'a>(&'a self, key: &'a str) -> Io<'a, Option<Bytes>> {
        let p = self.path(key);
        Box::pin(
            async move { not_found_is_none(tokio::fs::read(&p).await).map(|b| b.map(Bytes::from)) },
        )
    }

    fn put<'a>(&'a self, key: &'a str, data: Bytes) -> Io<'a, ()> {
        let dest = self.path(key);
        Box::pin(temp::write_atomic(&self.tmp, "meta", dest, data))
    }

    fn put_if_absent<'a>(&'a self, key: &'a str, data: Bytes) -> Io<'a, bool> {
        let dest = self.path(key);
        Box::pin(async move {
            if tokio::fs::try_exists(&dest).await? {
                return Ok(false);
            }
            temp::write_new(&self.tmp, "meta", dest, data).await
        })
    }

    fn delete<'a>(&'a self, key: &'a str) -> Io<'a, ()> {
        let p = self.path(key);
        Box::pin(async move { not_found_is_ok(tokio::fs::remove_file(&p).await) })
    }

    fn list<'a>(&'a self, prefix: &'a str) -> Io<'a, Vec<String>> {
        let root = self.root.clone();
        let prefix = prefix.to_owned();
        Box::pin(blocking(move || walk(&root, &prefix)))
    }
}

/// The keys of the files under `root` whose key starts with `prefix`, sorted. Blocking.
fn walk(root: &Path, prefix: &str) -> io::Result<Vec<String>> {
    // Start from the deepest folder the prefix names, then filter by the rest of it.
    let dir_key = prefix.rsplit_once('/').map_or("", |(dir, _)| dir);
    let mut out = Vec::new();
    let mut stack = vec![dir_key.to_owned()];
    while let Some(dir) = stack.pop() {
        let entries = match std::fs::read_dir(layout::path(root, &dir)) {
            Ok(rd) => rd,
            Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
            Err(e) => return Err(e),
        };
        for entry in entries {
            let entry = entry?;
            let Ok(name) = entry.file_name().into_string() else {
                continue;
            };
            let key = if dir.is_empty() {
                name
            } else {
                format!("{dir}/{name}")
            };
            if entry.file_type()?.is_dir() {
                stack.push(key);
            } else if key.starts_with(prefix) {
                out.push(key);
            }
        }
    }
    out.sort();
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cache::backend::conformance;

    #[tokio::test]
    async fn behaves_as_a_backend() {
        let dir = tempfile::tempdir().unwrap();
        let fs = Fs::at(dir.path()).unwrap();
        let data = b"layer bytes".to_vec();
        let spool = TempFile::create(&layout::tmp_dir(dir.path()), "spool")
            .await
            .unwrap();
        std::io::Write::write_all(&mut &**spool.file(), &data).unwrap();
        conformance::blobs(&fs, spool, &data).await;
        conformance::meta(&fs).await;
        // Nothing is left behind in the temp folder.
        assert_eq!(
            std::fs::read_dir(layout::tmp_dir(dir.path()))
                .unwrap()
                .count(),
            0
        );
    }
}
