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

/// Digests [`Usage::last_uses_in`] answers for under one lock of the table.
const LAST_USES_AT_ONCE: usize = 4096;

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
    access: Mutex<Stamps>,
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

/// The last use of every blob, held for the life of the server: a year-old store has a
/// million of them (issue 13). A map of `Digest`s cost about 170 bytes a blob (the digest's
/// hex on the heap, a table sized to a power of two); here the stamps of sha256 blobs sit in
/// one sorted array of 40-byte entries, and a small map takes the uses since it was last
/// brought up to date (folded in when the stamps are saved) and blobs of other algorithms.
#[derive(Default)]
struct Stamps {
    /// sha256 digests' bytes and stamps, sorted by digest, one entry a digest.
    sorted: Vec<([u8; 32], u64)>,
    /// Uses since the last fold, and every stamp of a digest that is not sha256.
    recent: HashMap<Digest, u64>,
}

/// A sha256 digest's bytes (the key of [`Stamps::sorted`]).
fn key(d: &Digest) -> Option<[u8; 32]> {
    let mut k = [0u8; 32];
    (d.algorithm() == crate::oci::Algorithm::Sha256
        && hex::decode_to_slice(d.hex(), &mut k).is_ok())
    .then_some(k)
}

impl Stamps {
    fn get(&self, d: &Digest) -> Option<u64> {
        let recent = self.recent.get(d).copied();
        let sorted = key(d).and_then(|k| {
            let i = self.sorted.binary_search_by(|(x, _)| x.cmp(&k)).ok()?;
            Some(self.sorted[i].1)
        });
        recent.max(sorted)
    }

    /// Keeps the later of `stamp` and the one known.
    fn record(&mut self, d: &Digest, stamp: u64) {
        match self.recent.get_mut(d) {
            Some(t) => *t = (*t).max(stamp),
            None => {
                self.recent.insert(d.clone(), stamp);
            }
        }
    }

    /// Merges `more` (sha256 stamps, in any order, repeats allowed) into `sorted`, keeping the
    /// latest stamp of each digest: a sort of the two (their concatenation is two sorted runs
    /// at most) and one pass, in place.
    fn merge(&mut self, mut more: Vec<([u8; 32], u64)>) {
        if more.is_empty() {
            return;
        }
        more.sort_unstable();
        // Exactly what is needed: a store's table is large, doubling it would waste half.
        self.sorted.reserve_exact(more.len());
        self.sorted.append(&mut more);
        self.sorted.sort(); // two sorted runs: merged in linear time
        self.sorted.dedup_by(|later, kept| {
            let same = later.0 == kept.0;
            if same {
                kept.1 = kept.1.max(later.1);
            }
            same
        });
    }

    /// Moves the sha256 uses of `recent` into `sorted`.
    fn fold(&mut self) {
        let mut more = Vec::new();
        self.recent.retain(|d, t| match key(d) {
            Some(k) => {
                more.push((k, *t));
                false
            }
            None => true,
        });
        self.merge(more);
    }

    fn remove(&mut self, digests: &[Digest]) {
        let mut keys = Vec::new();
        for d in digests {
            self.recent.remove(d);
            keys.extend(key(d));
        }
        if keys.is_empty() {
            return;
        }
        keys.sort_unstable();
        self.sorted.retain(|(k, _)| keys.binary_search(k).is_err());
    }

    fn len(&self) -> usize {
        self.sorted.len() + self.recent.len()
    }
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
        self.access.lock().unwrap().record(digest, stamp);
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
        self.access.lock().unwrap().get(digest)
    }

    /// The last use of a stored blob: its recorded use, else its commit time.
    pub fn last_use_in(&self, inv: &super::inventory::Inventory, digest: &Digest) -> u64 {
        self.last_use(digest)
            .unwrap_or_else(|| inv.blobs.get(digest).map_or(0, |(_, committed)| *committed))
    }

    /// [`last_use_in`](Self::last_use_in) of each of `digests`. Given in digest order (a
    /// sweep asks for every stored blob so), the recorded stamps are walked once beside them
    /// instead of searched for each: a million searches of a million stamps were a quarter of
    /// a sweep's plan (issue 13). Any other order is answered too, by searching where the
    /// order breaks. The table is locked for [`LAST_USES_AT_ONCE`] digests at a time, so
    /// requests recording uses meanwhile wait for at most that.
    pub fn last_uses_in<'a>(
        &self,
        inv: &super::inventory::Inventory,
        digests: impl ExactSizeIterator<Item = &'a Digest>,
    ) -> Vec<u64> {
        let mut out = Vec::with_capacity(digests.len());
        let mut digests = digests.peekable();
        while digests.peek().is_some() {
            let access = self.access.lock().unwrap();
            let sorted = &access.sorted;
            // Where the walk stands; found again by a search after each unlock (the table may
            // have changed meanwhile) and wherever the digests go back.
            let mut at: Option<(usize, [u8; 32])> = None;
            for d in digests.by_ref().take(LAST_USES_AT_ONCE) {
                let recorded = key(d).and_then(|k| {
                    let i = match at {
                        Some((i, last)) if last <= k => {
                            i + sorted[i..].iter().take_while(|(x, _)| *x < k).count()
                        }
                        _ => sorted.partition_point(|(x, _)| *x < k),
                    };
                    at = Some((i, k));
                    sorted.get(i).filter(|(x, _)| *x == k).map(|(_, t)| *t)
                });
                let recent = match access.recent.is_empty() {
                    true => None,
                    false => access.recent.get(d).copied(),
                };
                let last = recent.max(recorded);
                out.push(last.unwrap_or_else(|| inv.blobs.get(d).map_or(0, |(_, c)| *c)));
            }
        }
        out
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
        self.access.lock().unwrap().remove(digests);
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
        let mut a = self.access.lock().unwrap();
        a.fold();
        // `sha256:<64 hex> <13 digits>\n` a line.
        let mut out = Vec::with_capacity(a.len() * 86);
        let mut hex = [0u8; 64];
        for (k, t) in &a.sorted {
            hex::encode_to_slice(k, &mut hex).expect("64 bytes hold 32 in hex");
            out.extend_from_slice(b"sha256:");
            out.extend_from_slice(&hex);
            out.extend_from_slice(format!(" {t}\n").as_bytes());
        }
        for (d, t) in &a.recent {
            out.extend_from_slice(format!("{d} {t}\n").as_bytes());
        }
        Some(out.into())
    }

    /// Loads saved use stamps (older records hold seconds), keeping the later of a loaded and
    /// a known stamp (several replicas' records merge); stamps handed out from now on are
    /// later than every one loaded.
    pub fn load(&self, saved: &[u8]) {
        let text = String::from_utf8_lossy(saved);
        // Parsed outside the lock (a store's record has a line per blob), merged under it.
        let (mut sorted, mut others) = (Vec::new(), Vec::new());
        let mut latest = 0;
        for line in text.lines() {
            let mut it = line.split_whitespace();
            if let (Some(Ok(d)), Some(Ok(t))) = (
                it.next().map(str::parse::<Digest>),
                it.next().map(str::parse::<u64>),
            ) {
                let ms = if t < SECONDS_BEFORE { t * 1000 } else { t };
                latest = latest.max(ms);
                match key(&d) {
                    Some(k) => sorted.push((k, ms)),
                    None => others.push((d, ms)),
                }
            }
        }
        self.last_stamp.fetch_max(latest, Ordering::Relaxed);
        let mut a = self.access.lock().unwrap();
        a.merge(sorted);
        for (d, ms) in others {
            a.record(&d, ms);
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
mod last_uses_tests {
    use super::*;

    /// More digests than one lock's worth, some recorded (in the sorted table or since), some
    /// not: the walk answers as a search for each would, across its unlocks.
    #[test]
    fn last_uses_of_many_digests_match_one_by_one() {
        let u = Usage::default();
        let mut digests: Vec<Digest> = (0..3 * LAST_USES_AT_ONCE as u32 + 5)
            .map(|i| Digest::sha256_of(&i.to_le_bytes()))
            .collect();
        digests.sort();
        let saved: String = digests
            .iter()
            .step_by(3)
            .enumerate()
            .map(|(n, d)| format!("{d} {}\n", 1_000_000_000_000u64 + n as u64))
            .collect();
        u.load(saved.as_bytes());
        for d in digests.iter().skip(1).step_by(7) {
            u.touch(d);
        }
        let mut inv = crate::cache::inventory::Inventory::default();
        for (i, d) in digests.iter().enumerate() {
            inv.blobs.insert(d.clone(), (1, i as u64));
        }
        let one_by_one: Vec<u64> = digests.iter().map(|d| u.last_use_in(&inv, d)).collect();
        assert_eq!(u.last_uses_in(&inv, digests.iter()), one_by_one);
        assert!(
            one_by_one.iter().any(|&t| t < 1_000_000_000_000),
            "some have no use recorded"
        );
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

/// The compact stamp table (issue 13) answers like a map of digest → latest stamp, whatever
/// the mix of loads, uses, removals and saves, for sha256 and sha512 digests alike.
#[cfg(test)]
mod properties {
    use proptest::prelude::*;

    use super::*;
    use crate::oci::Algorithm;

    #[derive(Debug, Clone)]
    enum Op {
        Load(Vec<(usize, u64)>),
        Touch(usize),
        Remove(Vec<usize>),
        /// Save, and check a fresh table loading the saved record answers the same.
        Save,
    }

    fn op() -> impl Strategy<Value = Op> {
        let stamp = 1_000_000_000_000u64..1_000_000_000_100;
        prop_oneof![
            proptest::collection::vec((0..12usize, stamp), 0..8).prop_map(Op::Load),
            (0..12usize).prop_map(Op::Touch),
            proptest::collection::vec(0..12usize, 0..4).prop_map(Op::Remove),
            Just(Op::Save),
        ]
    }

    proptest! {
        #[test]
        fn stamps_answer_like_a_map_of_latest_uses(ops in proptest::collection::vec(op(), 1..30)) {
            // Digest 0, 3, 6, 9 are sha512: the table keeps those apart.
            let digests: Vec<Digest> = (0..12u8)
                .map(|i| {
                    let alg = if i % 3 == 0 { Algorithm::Sha512 } else { Algorithm::Sha256 };
                    Digest::of(alg, &[i])
                })
                .collect();
            let u = Usage::default();
            let mut model: HashMap<usize, u64> = HashMap::new();
            for op in ops {
                match op {
                    Op::Load(lines) => {
                        let text: String =
                            lines.iter().map(|(i, t)| format!("{} {t}\n", digests[*i])).collect();
                        u.load(text.as_bytes());
                        for (i, t) in lines {
                            let m = model.entry(i).or_insert(t);
                            *m = (*m).max(t);
                        }
                    }
                    Op::Touch(i) => {
                        u.touch(&digests[i]);
                        let t = u.last_use(&digests[i]).unwrap();
                        prop_assert!(model.values().all(|&m| m < t), "a use is the latest");
                        model.insert(i, t);
                    }
                    Op::Remove(is) => {
                        let gone: Vec<Digest> = is.iter().map(|&i| digests[i].clone()).collect();
                        u.removed(&gone);
                        for i in is {
                            model.remove(&i);
                        }
                    }
                    Op::Save => {
                        u.dirty.store(true, Ordering::Relaxed);
                        let saved = u.changes().unwrap();
                        let fresh = Usage::default();
                        fresh.load(&saved);
                        for (i, d) in digests.iter().enumerate() {
                            prop_assert_eq!(fresh.last_use(d), model.get(&i).copied());
                        }
                    }
                }
                for (i, d) in digests.iter().enumerate() {
                    prop_assert_eq!(u.last_use(d), model.get(&i).copied(), "digest {}", i);
                }
                // Asked all at once, in digest order or any other, the answers are the same;
                // a blob without a recorded use has its commit time.
                let mut inv = crate::cache::inventory::Inventory::default();
                for (i, d) in digests.iter().enumerate().filter(|(i, _)| i % 4 == 0) {
                    inv.blobs.insert(d.clone(), (1, 7 + i as u64));
                }
                let mut sorted = digests.clone();
                sorted.sort();
                for order in [sorted.clone(), sorted.iter().rev().cloned().collect(), digests.clone()] {
                    let one_by_one: Vec<u64> = order.iter().map(|d| u.last_use_in(&inv, d)).collect();
                    prop_assert_eq!(u.last_uses_in(&inv, order.iter()), one_by_one);
                }
            }
        }
    }
}
