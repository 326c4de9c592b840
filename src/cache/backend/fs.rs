//! The filesystem backend: keys are paths under the store folder. Every write is a temp file
//! in `tmp/` made durable and renamed into place (`temp::write_atomic`), so a crash leaves the
//! old record or the new one; blobs are served from read-only mappings.

use std::io;
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
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

    fn read_many<'a>(&'a self, digests: &'a [Digest]) -> Io<'a, Vec<Option<Bytes>>> {
        let paths = digests
            .iter()
            .map(|d| self.path(&layout::blob(d)))
            .collect();
        Box::pin(blocking(move || read_files(paths)))
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
            let out = Mutex::new(Vec::new());
            let top = layout::path(&root, layout::BLOBS);
            let algorithms = match std::fs::read_dir(&top) {
                Ok(rd) => rd,
                Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
                Err(e) => return Err(e),
            };
            for alg in algorithms {
                let alg = alg?;
                let Ok(alg_name) = alg.file_name().into_string() else {
                    continue;
                };
                if alg.file_type()?.is_dir() {
                    list_folder(&alg.path(), &alg_name, &out)?;
                }
            }
            Ok(out.into_inner().unwrap_or_else(|e| e.into_inner()))
        }))
    }
}

/// Entries of a blob folder handed to a thread that looks them up, at a time.
const LIST_BATCH: usize = 1024;

/// Adds the blobs in `dir` (`blobs/<alg>/`) to `out`. Blocking. The folder is read on this
/// thread while one thread a core (at most four) looks up each file's size and time: the
/// `statx` calls are most of listing a million blobs (2.3 s on one thread, 1.5-2.1 s on two,
/// on the 2-core bench machine).
fn list_folder(dir: &Path, alg: &str, out: &Mutex<Vec<BlobInfo>>) -> io::Result<()> {
    let workers = std::thread::available_parallelism().map_or(1, |n| n.get().min(4));
    let (tx, rx) = std::sync::mpsc::sync_channel::<Vec<std::fs::DirEntry>>(workers * 2);
    let rx = Mutex::new(rx);
    std::thread::scope(|s| {
        // Moved in: dropped on every way out (an error reading the folder too), so the
        // workers' `recv` ends and the scope can finish.
        let tx = tx;
        for _ in 0..workers {
            s.spawn(|| loop {
                let Ok(batch) = rx.lock().unwrap_or_else(|e| e.into_inner()).recv() else {
                    break;
                };
                let found: Vec<BlobInfo> = batch.iter().filter_map(|e| blob_info(alg, e)).collect();
                out.lock().unwrap_or_else(|e| e.into_inner()).extend(found);
            });
        }
        let mut batch = Vec::with_capacity(LIST_BATCH);
        for entry in std::fs::read_dir(dir)? {
            batch.push(entry?);
            if batch.len() == LIST_BATCH {
                let full = std::mem::replace(&mut batch, Vec::with_capacity(LIST_BATCH));
                if tx.send(full).is_err() {
                    break; // the workers are gone (a panic, reported by the scope)
                }
            }
        }
        let _ = tx.send(batch);
        Ok(())
    })
}

/// A blob folder's entry as a listed blob; `None` for anything that is not a blob file (or
/// was removed meanwhile).
fn blob_info(alg: &str, entry: &std::fs::DirEntry) -> Option<BlobInfo> {
    let name = entry.file_name().into_string().ok()?;
    let digest = layout::parse_digest_key(&format!("{}{alg}/{name}", layout::BLOBS))?;
    let meta = entry.metadata().ok()?;
    if !meta.is_file() {
        return None;
    }
    let committed_ms = meta
        .modified()
        .ok()
        .and_then(|t| t.duration_since(UNIX_EPOCH).ok())
        .map_or(0, |d| d.as_millis() as u64);
    Some(BlobInfo {
        digest,
        size: meta.len(),
        committed_ms,
    })
}

impl Meta for Fs {
    fn get<'a>(&'a self, key: &'a str) -> Io<'a, Option<Bytes>> {
        let p = self.path(key);
        Box::pin(
            async move { not_found_is_none(tokio::fs::read(&p).await).map(|b| b.map(Bytes::from)) },
        )
    }

    fn get_many<'a>(&'a self, keys: &'a [String]) -> Io<'a, Vec<Option<Bytes>>> {
        let paths = keys.iter().map(|k| self.path(k)).collect();
        Box::pin(blocking(move || read_files(paths)))
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

/// The contents of `paths`, in order (`None` for a file that is not there). Blocking.
fn read_files(paths: Vec<PathBuf>) -> io::Result<Vec<Option<Bytes>>> {
    paths
        .iter()
        .map(|p| not_found_is_none(std::fs::read(p)).map(|b| b.map(Bytes::from)))
        .collect()
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

    /// The listing is split between threads in batches: every blob comes back once, with its
    /// size, across several batches; what is not a blob file does not.
    #[tokio::test]
    async fn lists_every_blob_of_a_large_folder_once() {
        let dir = tempfile::tempdir().unwrap();
        let fs = Fs::at(dir.path()).unwrap();
        let n = 3 * LIST_BATCH + 17;
        let mut want = Vec::new();
        for i in 0..n {
            let data = vec![7u8; i % 50];
            let d = Digest::sha256_of(&(i as u32).to_be_bytes());
            let p = layout::path(dir.path(), &layout::blob(&d));
            std::fs::create_dir_all(p.parent().unwrap()).unwrap();
            std::fs::write(p, &data).unwrap();
            want.push((d, data.len() as u64));
        }
        let folder = dir.path().join(layout::BLOBS).join("sha256");
        std::fs::write(folder.join("not-a-digest"), b"x").unwrap();
        std::fs::create_dir(folder.join(Digest::sha256_of(b"dir").hex())).unwrap();
        let mut got: Vec<(Digest, u64)> = Blobs::list(&fs)
            .await
            .unwrap()
            .into_iter()
            .map(|b| (b.digest, b.size))
            .collect();
        got.sort();
        want.sort();
        assert_eq!(got, want);
    }

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
