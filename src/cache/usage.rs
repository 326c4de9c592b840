//! What the store holds and how it is used: total size, last use per blob (kept in memory,
//! updated at most once a minute per blob, persisted by the sweeper, so reads never write to
//! disk), and which blobs clients are reading right now (those are never evicted).

use std::collections::{HashMap, HashSet};
use std::io;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{SystemTime, UNIX_EPOCH};

use crate::oci::Digest;

/// A blob's last use is recorded again only when the previous record is older than this.
const TOUCH_RESOLUTION_SECS: u64 = 60;

pub fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_secs()
}

#[derive(Default)]
pub struct Usage {
    bytes: AtomicU64,
    entries: AtomicU64,
    access: Mutex<HashMap<Digest, u64>>,
    dirty: AtomicBool,
    readers: Mutex<HashMap<Digest, usize>>,
}

/// Held while a client reads a blob; the blob is not evicted meanwhile.
pub struct InUse {
    usage: Arc<Usage>,
    digest: Digest,
}

impl Drop for InUse {
    fn drop(&mut self) {
        let mut r = self.usage.readers.lock().unwrap();
        if let Some(n) = r.get_mut(&self.digest) {
            *n -= 1;
            if *n == 0 {
                r.remove(&self.digest);
            }
        }
    }
}

impl Usage {
    /// Records a use of `digest` now (cheaply: no disk write).
    pub fn touch(&self, digest: &Digest) {
        let now = unix_now();
        let mut a = self.access.lock().unwrap();
        match a.get_mut(digest) {
            Some(t) if now.saturating_sub(*t) < TOUCH_RESOLUTION_SECS => return,
            Some(t) => *t = now,
            None => {
                a.insert(digest.clone(), now);
            }
        }
        self.dirty.store(true, Ordering::Relaxed);
    }

    pub fn last_use(&self, digest: &Digest) -> Option<u64> {
        self.access.lock().unwrap().get(digest).copied()
    }

    pub fn reading(self: &Arc<Self>, digest: &Digest) -> InUse {
        *self
            .readers
            .lock()
            .unwrap()
            .entry(digest.clone())
            .or_insert(0) += 1;
        InUse {
            usage: self.clone(),
            digest: digest.clone(),
        }
    }

    pub fn in_use(&self) -> HashSet<Digest> {
        self.readers.lock().unwrap().keys().cloned().collect()
    }

    pub fn bytes(&self) -> u64 {
        self.bytes.load(Ordering::Relaxed)
    }

    pub fn entries(&self) -> u64 {
        self.entries.load(Ordering::Relaxed)
    }

    /// A blob of `size` bytes entered the store.
    pub fn added(&self, size: u64) {
        self.bytes.fetch_add(size, Ordering::Relaxed);
        self.entries.fetch_add(1, Ordering::Relaxed);
        crate::metrics::cache_size(self.bytes(), self.entries());
    }

    /// Blobs left the store.
    pub fn removed(&self, digests: &[Digest]) {
        let mut a = self.access.lock().unwrap();
        for d in digests {
            a.remove(d);
        }
    }

    /// Exact totals from a scan of the store.
    pub fn set_totals(&self, bytes: u64, entries: u64) {
        self.bytes.store(bytes, Ordering::Relaxed);
        self.entries.store(entries, Ordering::Relaxed);
        crate::metrics::cache_size(bytes, entries);
    }

    /// Writes the access times (`<digest> <unix secs>` per line) if they changed.
    pub fn save(&self, path: &Path) -> io::Result<()> {
        if !self.dirty.swap(false, Ordering::Relaxed) {
            return Ok(());
        }
        let text: String = {
            let a = self.access.lock().unwrap();
            a.iter().map(|(d, t)| format!("{d} {t}\n")).collect()
        };
        let tmp = path.with_extension("new");
        std::fs::write(&tmp, text)?;
        std::fs::rename(&tmp, path)
    }

    /// Loads saved access times; entries already recorded in memory are newer and kept.
    pub fn load(&self, path: &Path) -> io::Result<()> {
        let text = match std::fs::read_to_string(path) {
            Ok(t) => t,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
            Err(e) => return Err(e),
        };
        let mut a = self.access.lock().unwrap();
        for line in text.lines() {
            let mut it = line.split_whitespace();
            if let (Some(Ok(d)), Some(Ok(t))) = (
                it.next().map(str::parse::<Digest>),
                it.next().map(str::parse::<u64>),
            ) {
                a.entry(d).or_insert(t);
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn readers_and_access_times() {
        let u = Arc::new(Usage::default());
        let d = Digest::sha256_of(b"x");
        let g1 = u.reading(&d);
        let g2 = u.reading(&d);
        assert!(u.in_use().contains(&d));
        drop(g1);
        assert!(u.in_use().contains(&d));
        drop(g2);
        assert!(u.in_use().is_empty());

        u.touch(&d);
        let t = u.last_use(&d).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("access");
        u.save(&p).unwrap();
        let v = Usage::default();
        v.load(&p).unwrap();
        assert_eq!(v.last_use(&d), Some(t));
    }
}
