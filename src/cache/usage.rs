//! What the store holds and how it is used: total size, last use per blob (kept in memory,
//! persisted by the sweeper, so reads never write to disk), and which blobs clients are reading
//! right now (those are never evicted).
//!
//! A last use is a *use stamp*: Unix milliseconds, made strictly increasing within the process,
//! so two uses in the same millisecond still have an order and least-recently-used means that
//! at any pull rate.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{SystemTime, UNIX_EPOCH};

use crate::oci::Digest;

/// Saved stamps below this are Unix seconds (files written before stamps were milliseconds).
const SECONDS_BEFORE: u64 = 100_000_000_000;

pub fn unix_now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_millis() as u64
}

#[derive(Default)]
pub struct Usage {
    bytes: AtomicU64,
    entries: AtomicU64,
    access: Mutex<HashMap<Digest, u64>>,
    /// The newest use stamp handed out.
    last_stamp: AtomicU64,
    dirty: AtomicBool,
    readers: Mutex<HashMap<Digest, usize>>,
    /// The last eviction (or removal) that freed something, for the status page.
    last_eviction: Mutex<Option<Eviction>>,
}

/// One eviction run that removed blobs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Eviction {
    /// Unix milliseconds.
    pub at_ms: u64,
    pub blobs: u64,
    pub bytes: u64,
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
    /// Records a use of `digest` now (in memory only).
    pub fn touch(&self, digest: &Digest) {
        let stamp = self.next_stamp();
        let mut a = self.access.lock().unwrap();
        match a.get_mut(digest) {
            Some(t) => *t = (*t).max(stamp),
            None => {
                a.insert(digest.clone(), stamp);
            }
        }
        self.dirty.store(true, Ordering::Relaxed);
    }

    /// Now in Unix milliseconds, but later than every stamp handed out before.
    fn next_stamp(&self) -> u64 {
        let now = unix_now_ms();
        let prev = self
            .last_stamp
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |last| {
                Some(now.max(last + 1))
            })
            .expect("the update always succeeds");
        now.max(prev + 1)
    }

    /// The use stamp of `digest`'s last recorded use.
    pub fn last_use(&self, digest: &Digest) -> Option<u64> {
        self.access.lock().unwrap().get(digest).copied()
    }

    /// The last use of a stored blob: its recorded use, else its commit time.
    pub fn last_use_in(&self, inv: &super::inventory::Inventory, digest: &Digest) -> u64 {
        self.last_use(digest)
            .unwrap_or_else(|| inv.blobs.get(digest).map_or(0, |(_, committed)| *committed))
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

    /// `blobs` blobs of `bytes` in all were evicted (from the store, or the local tier).
    pub fn evicted(&self, blobs: u64, bytes: u64) {
        crate::metrics::evicted(blobs, bytes);
        if blobs > 0 {
            *self.last_eviction.lock().unwrap() = Some(Eviction {
                at_ms: unix_now_ms(),
                blobs,
                bytes,
            });
        }
    }

    /// The last eviction that removed something since the process started.
    pub fn last_eviction(&self) -> Option<Eviction> {
        *self.last_eviction.lock().unwrap()
    }

    /// Exact totals from a scan of the store.
    pub fn set_totals(&self, bytes: u64, entries: u64) {
        self.bytes.store(bytes, Ordering::Relaxed);
        self.entries.store(entries, Ordering::Relaxed);
        crate::metrics::cache_size(bytes, entries);
    }

    /// The saved form of the use stamps (`<digest> <unix ms>` per line), if they changed since
    /// the last call.
    pub fn changes(&self) -> Option<bytes::Bytes> {
        if !self.dirty.swap(false, Ordering::Relaxed) {
            return None;
        }
        let a = self.access.lock().unwrap();
        Some(
            a.iter()
                .map(|(d, t)| format!("{d} {t}\n"))
                .collect::<String>()
                .into(),
        )
    }

    /// Loads saved use stamps (older records hold seconds), keeping the later of a loaded and
    /// a known stamp (several replicas' records merge); stamps handed out from now on are
    /// later than every one loaded.
    pub fn load(&self, saved: &[u8]) {
        let text = String::from_utf8_lossy(saved);
        let mut a = self.access.lock().unwrap();
        for line in text.lines() {
            let mut it = line.split_whitespace();
            if let (Some(Ok(d)), Some(Ok(t))) = (
                it.next().map(str::parse::<Digest>),
                it.next().map(str::parse::<u64>),
            ) {
                let ms = if t < SECONDS_BEFORE { t * 1000 } else { t };
                self.last_stamp.fetch_max(ms, Ordering::Relaxed);
                let known = a.entry(d).or_insert(ms);
                *known = (*known).max(ms);
            }
        }
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
        assert!(
            t.abs_diff(unix_now_ms()) < 60_000,
            "a stamp is Unix milliseconds"
        );
        let saved = u.changes().expect("a use was recorded");
        assert!(u.changes().is_none(), "nothing changed since");
        let v = Usage::default();
        v.load(&saved);
        assert_eq!(v.last_use(&d), Some(t));
    }
}

#[cfg(test)]
mod stamp_tests {
    use super::*;

    /// Uses in quick succession (the same millisecond, let alone the same second) keep their
    /// order, and a use again moves a blob to the front.
    #[test]
    fn uses_in_the_same_millisecond_keep_their_order() {
        let u = Usage::default();
        let ds: Vec<Digest> = (0..100).map(|i| Digest::sha256_of(&[i])).collect();
        for d in &ds {
            u.touch(d);
        }
        let stamps: Vec<u64> = ds.iter().map(|d| u.last_use(d).unwrap()).collect();
        assert!(stamps.windows(2).all(|w| w[0] < w[1]), "{stamps:?}");
        u.touch(&ds[0]);
        assert!(u.last_use(&ds[0]).unwrap() > stamps[99]);
    }

    #[test]
    fn saved_seconds_are_read_as_milliseconds_and_new_stamps_come_after_loaded_ones() {
        let old = Digest::sha256_of(b"old");
        let future = Digest::sha256_of(b"future");
        let far = unix_now_ms() + 3_600_000;
        let u = Usage::default();
        u.load(format!("{old} 1700000000\n{future} {far}\n").as_bytes());
        assert_eq!(u.last_use(&old), Some(1_700_000_000_000));
        let now = Digest::sha256_of(b"now");
        u.touch(&now);
        assert!(u.last_use(&now).unwrap() > far);
    }
}
