//! The store's journal: every commit (a blob, a manifest, a tag that moved) appended as one
//! JSON line with a monotonic sequence number, so another site can be brought up to date with
//! only what arrived after a marker (`entrepot export --since SEQ`), the way a bucket-index log
//! lets a second site sync incrementally. Entries are appended after the content is in place,
//! so the journal never names something the store does not have.

use std::fs::{File, OpenOptions};
use std::io::{self, BufRead, BufReader, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use serde::{Deserialize, Serialize};

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

pub struct Journal {
    /// The open journal and the last sequence number written.
    state: Mutex<(File, u64)>,
}

pub fn path(root: &Path) -> PathBuf {
    super::layout::path(root, super::layout::JOURNAL)
}

impl Journal {
    /// Opens (creating) the journal of the store at `root`, continuing its numbering.
    pub fn open(root: &Path) -> io::Result<Journal> {
        let path = path(root);
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent)?;
        }
        let last = last_seq(&path)?;
        let file = OpenOptions::new().create(true).append(true).open(&path)?;
        Ok(Journal {
            state: Mutex::new((file, last)),
        })
    }

    /// Appends an entry; returns its sequence number.
    pub fn append(&self, entry: Entry) -> io::Result<u64> {
        let mut st = self.state.lock().unwrap();
        let seq = st.1 + 1;
        let mut line = serde_json::to_vec(&Line { seq, entry }).map_err(io::Error::other)?;
        line.push(b'\n');
        st.0.write_all(&line)?;
        st.1 = seq;
        Ok(seq)
    }

    pub fn last_seq(&self) -> u64 {
        self.state.lock().unwrap().1
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

/// Every entry after `since`, in order.
pub fn read_since(root: &Path, since: u64) -> io::Result<Vec<Line>> {
    let f = match File::open(path(root)) {
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

    #[test]
    fn numbering_continues_across_reopen() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(dir.path().join("meta")).unwrap();
        let j = Journal::open(dir.path()).unwrap();
        assert_eq!(j.append(Entry::Blob { digest: "a".into() }).unwrap(), 1);
        assert_eq!(
            j.append(Entry::Manifest {
                digest: "a".into(),
                media_type: "x".into()
            })
            .unwrap(),
            2
        );
        drop(j);
        let j = Journal::open(dir.path()).unwrap();
        assert_eq!(j.last_seq(), 2);
        assert_eq!(j.append(Entry::Blob { digest: "b".into() }).unwrap(), 3);
        let since = read_since(dir.path(), 1).unwrap();
        assert_eq!(since.iter().map(|l| l.seq).collect::<Vec<_>>(), vec![2, 3]);
        assert_eq!(since[1].entry, Entry::Blob { digest: "b".into() });
    }
}
