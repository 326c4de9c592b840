//! The store's journal: every commit (a blob, a manifest, a tag that moved) appended as one
//! JSON line with a monotonic sequence number, so another site can be brought up to date with
//! only what arrived after a marker (`entrepot export --since SEQ`), the way a bucket-index log
//! lets a second site sync incrementally. Entries are appended after the content is in place,
//! so the journal never names something the store does not have.

use std::fs::{File, OpenOptions};
use std::io::{self, BufRead, BufReader, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use bytes::Bytes;

use serde::{Deserialize, Serialize};

use super::backend::Meta;

/// What a journal line records.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "lowercase")]
pub enum Entry {
    /// A verified blob (layer, config or manifest bytes) entered the store.
    Blob { digest: String },
    /// A manifest's media type was recorded (its bytes are a `Blob` entry).
    Manifest { digest: String, media_type: String },
    /// A tag now points at `digest` (first seen, or moved).
    Tag {
        upstream: String,
        repo: String,
        tag: String,
        digest: String,
        media_type: String,
        size: u64,
    },
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Line {
    pub seq: u64,
    #[serde(flatten)]
    pub entry: Entry,
}

/// Where the journal is kept.
pub enum Journal {
    /// A file of JSON lines in the store folder, numbered 1, 2, 3, ... by the one process
    /// that holds the store.
    File {
        /// The open journal and the last sequence number written.
        state: Mutex<(File, u64)>,
        path: PathBuf,
    },
    /// One object per entry under `meta/journal/` in shared storage, written by any replica.
    /// An entry's number is its Unix time in milliseconds: replicas need no coordination, and
    /// a delta reads a margin before its marker for clocks that disagree (entries read twice
    /// are imported once).
    Shared {
        meta: Arc<dyn Meta>,
        /// Tells this process's entries from other replicas' written in the same millisecond.
        writer: String,
        counter: AtomicU64,
    },
}

/// How far before a marker a delta of a shared journal reads.
const CLOCK_MARGIN_MS: u64 = 5 * 60 * 1000;

pub fn path(root: &Path) -> PathBuf {
    super::layout::path(root, super::layout::JOURNAL)
}

impl Journal {
    /// Opens (creating) the journal file of the store at `root`, continuing its numbering.
    pub fn open(root: &Path) -> io::Result<Journal> {
        let path = path(root);
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent)?;
        }
        let last = last_seq(&path)?;
        let file = OpenOptions::new().create(true).append(true).open(&path)?;
        Ok(Journal::File {
            state: Mutex::new((file, last)),
            path,
        })
    }

    /// The journal of shared storage, written as `writer` (this replica's id).
    pub fn shared(meta: Arc<dyn Meta>, writer: String) -> Journal {
        Journal::Shared {
            meta,
            writer,
            counter: AtomicU64::new(0),
        }
    }

    /// Appends an entry; returns its number.
    pub async fn append(&self, entry: Entry) -> io::Result<u64> {
        match self {
            Journal::File { state, .. } => {
                let mut st = state.lock().unwrap();
                let seq = st.1 + 1;
                let mut line =
                    serde_json::to_vec(&Line { seq, entry }).map_err(io::Error::other)?;
                line.push(b'\n');
                st.0.write_all(&line)?;
                st.1 = seq;
                Ok(seq)
            }
            Journal::Shared {
                meta,
                writer,
                counter,
            } => {
                let seq = super::usage::unix_now_ms();
                let n = counter.fetch_add(1, Ordering::Relaxed);
                let key = super::layout::journal_entry(seq, writer, n);
                let body = serde_json::to_vec(&Line { seq, entry }).map_err(io::Error::other)?;
                meta.put(&key, Bytes::from(body)).await?;
                Ok(seq)
            }
        }
    }

    /// The marker a delta export starts from next time: the last entry's number (a file), or
    /// now (shared storage, whose entries are numbered by time).
    pub fn last_seq(&self) -> u64 {
        match self {
            Journal::File { state, .. } => state.lock().unwrap().1,
            Journal::Shared { .. } => super::usage::unix_now_ms(),
        }
    }

    /// Every entry after `since`, in order (a shared journal also gives those a little before
    /// it, see [`CLOCK_MARGIN_MS`]).
    pub async fn read_since(&self, since: u64) -> io::Result<Vec<Line>> {
        match self {
            Journal::File { path, .. } => {
                let path = path.clone();
                tokio::task::spawn_blocking(move || read_file_since(&path, since))
                    .await
                    .map_err(io::Error::other)?
            }
            Journal::Shared { meta, .. } => {
                let from = since.saturating_sub(CLOCK_MARGIN_MS);
                let mut out = Vec::new();
                for key in meta.list(super::layout::JOURNAL_ENTRIES).await? {
                    if super::layout::journal_entry_time(&key).is_none_or(|t| t <= from) {
                        continue;
                    }
                    let Some(body) = meta.get(&key).await? else {
                        continue;
                    };
                    if let Ok(l) = serde_json::from_slice::<Line>(&body) {
                        out.push(l);
                    }
                }
                out.sort_by_key(|l| l.seq);
                Ok(out)
            }
        }
    }
}

/// The sequence number of the last complete line (0 for an empty or missing journal). Reads
/// only the end of the file, so start-up does not depend on the journal's length.
pub fn last_seq(path: &Path) -> io::Result<u64> {
    let mut f = match File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(0),
        Err(e) => return Err(e),
    };
    let len = f.metadata()?.len();
    let start = len.saturating_sub(64 * 1024);
    f.seek(SeekFrom::Start(start))?;
    let mut tail = String::new();
    f.read_to_string(&mut tail)?;
    Ok(tail
        .lines()
        .rev()
        .find_map(|l| serde_json::from_str::<Line>(l).ok())
        .map_or(0, |l| l.seq))
}

/// Every entry of the journal file at `path` after `since`, in order.
fn read_file_since(path: &Path, since: u64) -> io::Result<Vec<Line>> {
    let f = match File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(e),
    };
    let mut out = Vec::new();
    for line in BufReader::new(f).lines() {
        let line = line?;
        // A torn last line (a crash mid-append) is skipped, not fatal.
        if let Ok(l) = serde_json::from_str::<Line>(&line) {
            if l.seq > since {
                out.push(l);
            }
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn numbering_continues_across_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let j = Journal::open(dir.path()).unwrap();
        assert_eq!(
            j.append(Entry::Blob { digest: "a".into() }).await.unwrap(),
            1
        );
        assert_eq!(
            j.append(Entry::Manifest {
                digest: "a".into(),
                media_type: "x".into()
            })
            .await
            .unwrap(),
            2
        );
        drop(j);
        let j = Journal::open(dir.path()).unwrap();
        assert_eq!(j.last_seq(), 2);
        assert_eq!(
            j.append(Entry::Blob { digest: "b".into() }).await.unwrap(),
            3
        );
        let since = j.read_since(1).await.unwrap();
        assert_eq!(since.iter().map(|l| l.seq).collect::<Vec<_>>(), vec![2, 3]);
        assert_eq!(since[1].entry, Entry::Blob { digest: "b".into() });
    }

    /// Two writers of one shared journal (two replicas) need no coordination: a delta from a
    /// marker sees every entry written after it, in time order.
    #[tokio::test]
    async fn a_shared_journal_takes_entries_from_several_writers() {
        let meta: Arc<dyn Meta> = Arc::new(crate::cache::backend::memory::Memory::default());
        let (a, b) = (
            Journal::shared(meta.clone(), "a".into()),
            Journal::shared(meta.clone(), "b".into()),
        );
        let marker = a.last_seq();
        tokio::time::sleep(std::time::Duration::from_millis(2)).await;
        a.append(Entry::Blob { digest: "x".into() }).await.unwrap();
        b.append(Entry::Blob { digest: "y".into() }).await.unwrap();
        a.append(Entry::Blob { digest: "z".into() }).await.unwrap();
        let got: Vec<Entry> = b
            .read_since(marker)
            .await
            .unwrap()
            .into_iter()
            .map(|l| l.entry)
            .collect();
        assert_eq!(got.len(), 3);
        for d in ["x", "y", "z"] {
            assert!(
                got.contains(&Entry::Blob { digest: d.into() }),
                "{d} missing"
            );
        }
    }
}
