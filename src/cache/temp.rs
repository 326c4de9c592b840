//! A file being written: work in progress as a value. Dropping it removes the file;
//! `commit(self)` makes it durable (fsync) and moves it into place atomically (rename).
//! `write_atomic` and `write_new` are the one way every writer of the filesystem store puts a
//! small file in place.

use std::fs::File;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

static SEQ: AtomicU64 = AtomicU64::new(0);

pub struct TempFile {
    path: PathBuf,
    file: Arc<File>,
    committed: bool,
}

impl TempFile {
    /// Creates a new, empty file in `dir` whose name starts with `stem`. Names are unique within
    /// the process; the temp folder is emptied at start-up, so no other process's file is there.
    pub async fn create(dir: &Path, stem: &str) -> io::Result<TempFile> {
        let name = format!(
            "{stem}.{}.{}",
            std::process::id(),
            SEQ.fetch_add(1, Ordering::Relaxed)
        );
        let path = dir.join(name);
        let p = path.clone();
        let file = tokio::task::spawn_blocking(move || {
            std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .create_new(true)
                .open(&p)
        })
        .await
        .map_err(io::Error::other)??;
        Ok(TempFile {
            path,
            file: Arc::new(file),
            committed: false,
        })
    }

    /// Takes over a complete file that another writer left in the temp folder (an import's
    /// staged blob): committed like any other, removed if dropped.
    pub fn adopt(path: PathBuf) -> io::Result<TempFile> {
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(&path)?;
        Ok(TempFile {
            path,
            file: Arc::new(file),
            committed: false,
        })
    }

    /// The file's name in the temp folder.
    pub fn name(&self) -> String {
        self.path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default()
    }

    /// The open file: writers append through it, readers `pread` from it, and both keep working
    /// after the rename in `commit` (the inode stays the same).
    pub fn file(&self) -> &Arc<File> {
        &self.file
    }

    /// fsync the data, rename into `dest`, fsync the folder so the rename survives a crash.
    pub async fn commit(mut self, dest: PathBuf) -> io::Result<()> {
        let file = self.file.clone();
        let src = self.path.clone();
        tokio::task::spawn_blocking(move || -> io::Result<()> {
            file.sync_all()?;
            std::fs::rename(&src, &dest)?;
            if let Some(parent) = dest.parent() {
                File::open(parent)?.sync_all()?;
            }
            Ok(())
        })
        .await
        .map_err(io::Error::other)??;
        self.committed = true;
        Ok(())
    }
}

impl Drop for TempFile {
    fn drop(&mut self) {
        if !self.committed {
            if let Err(e) = std::fs::remove_file(&self.path) {
                if e.kind() != io::ErrorKind::NotFound {
                    tracing::warn!(path = %self.path.display(), error = %e, "could not remove temp file");
                }
            }
        }
    }
}

/// Writes `data` to `dest` durably and atomically through a temp file in `tmp`: readers see
/// the old file or the new one, and a crash leaves one of them.
pub async fn write_atomic(
    tmp: &Path,
    stem: &str,
    dest: PathBuf,
    data: bytes::Bytes,
) -> io::Result<()> {
    let temp = filled(tmp, stem, &dest, data).await?;
    temp.commit(dest).await
}

/// Like [`write_atomic`], but only if nothing is at `dest`; says whether it wrote.
pub async fn write_new(
    tmp: &Path,
    stem: &str,
    dest: PathBuf,
    data: bytes::Bytes,
) -> io::Result<bool> {
    let temp = filled(tmp, stem, &dest, data).await?;
    let src = temp.path.clone();
    let file = temp.file.clone();
    // `temp` is dropped at the end either way, removing its name; the link stays.
    tokio::task::spawn_blocking(move || -> io::Result<bool> {
        file.sync_all()?;
        match std::fs::hard_link(&src, &dest) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => return Ok(false),
            Err(e) => return Err(e),
        }
        if let Some(parent) = dest.parent() {
            File::open(parent)?.sync_all()?;
        }
        Ok(true)
    })
    .await
    .map_err(io::Error::other)?
}

/// A temp file holding `data`, with `dest`'s folder created.
async fn filled(tmp: &Path, stem: &str, dest: &Path, data: bytes::Bytes) -> io::Result<TempFile> {
    let temp = TempFile::create(tmp, stem).await?;
    let file = temp.file().clone();
    tokio::task::spawn_blocking(move || io::Write::write_all(&mut &*file, &data))
        .await
        .map_err(io::Error::other)??;
    if let Some(parent) = dest.parent() {
        tokio::fs::create_dir_all(parent).await?;
    }
    Ok(temp)
}
