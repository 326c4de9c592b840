//! The content-addressed cache: blob lookup (hit, fill in progress, miss), the fills, stored
//! manifests, the tag index, pins and use stamps. `Store` keeps what is local to the process
//! (fills, spool folder, in-memory caches) and reaches storage only through the `backend`
//! traits, with keys from `layout`.

pub mod backend;
pub mod evict;
pub mod fill;
mod generation;
pub mod inventory;
pub mod journal;
pub mod layout;
pub mod links;
pub mod lock;
pub mod manifests;
mod mapped;
mod numbered;
mod spliced;
pub use mapped::{file_of, InFile};
pub mod pins;
pub mod read;
pub mod referrers;
pub mod tags;
mod tail;
pub mod temp;
mod tier;
pub mod usage;

use std::collections::HashMap;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use futures_util::{stream, TryStreamExt};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::clock::Clock;
use crate::config::PinConfig;
use crate::oci::Digest;
use backend::Blobs as _;
pub use fill::{Fill, FillError, FillSource, Progress};
pub use manifests::StoredManifest;
pub use tags::{TagEntry, TagIndex};

/// How long `/readyz` waits for shared storage.
const SHARED_PROBE: std::time::Duration = std::time::Duration::from_secs(5);

/// How many blob mappings to keep. Mappings cost address space, not memory: their pages are
/// the page cache's.
const MAPPED_BLOBS: u64 = 4096;
/// Removals of an eviction in flight at once.
const REMOVALS_AT_ONCE: usize = 32;

/// The items of an eviction plan's list, as a stream for `try_for_each_concurrent`.
fn each<T>(items: &[T]) -> impl futures_util::Stream<Item = io::Result<&T>> {
    stream::iter(items.iter().map(Ok))
}

/// What the store has for a blob digest.
pub enum BlobState {
    /// Complete and verified on disk; `data` is the whole blob, mapped.
    Hit { data: Bytes },
    /// Being filled; `joined` says whether this request found it running (`false`: it started
    /// it).
    Fill { fill: Arc<Fill>, joined: bool },
    /// Not here and no fill was asked for.
    Miss,
}

/// A running fill's entry in the store's in-progress map; dropping it removes the entry.
pub(crate) struct InProgress {
    pub store: Arc<Store>,
    pub fill: Arc<Fill>,
}

impl Drop for InProgress {
    fn drop(&mut self) {
        let mut fills = self.store.fills.lock().unwrap();
        // Only this fill's own entry: a later fill of the same digest may have replaced it.
        if fills
            .get(&self.fill.digest)
            .is_some_and(|f| Arc::ptr_eq(f, &self.fill))
        {
            fills.remove(&self.fill.digest);
        }
        self.store.fills_ended.fetch_add(1, Ordering::Release);
        crate::metrics::fills(fills.len());
    }
}

/// This replica's id, kept in `root` so that it stays the same across restarts.
fn replica_id(root: &Path) -> io::Result<String> {
    let path = layout::replica_id_file(root);
    match std::fs::read_to_string(&path) {
        Ok(id) if !id.trim().is_empty() => return Ok(id.trim().to_owned()),
        Ok(_) => {}
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(e),
    }
    // Random (std's hasher keys are): replicas in containers all have pid 1.
    let id = format!(
        "{:016x}",
        std::hash::BuildHasher::hash_one(&std::collections::hash_map::RandomState::new(), 0)
    );
    std::fs::write(&path, &id)?;
    Ok(id)
}

/// What a store is made of.
enum Storage {
    /// A folder, which is both the store and the local copies.
    Fs(Arc<backend::fs::Fs>),
    /// Shared storage, with local copies in a folder.
    Shared {
        blobs: Arc<dyn backend::Blobs>,
        meta: Arc<dyn backend::Meta>,
        local: Arc<backend::fs::Fs>,
    },
}

/// Takes the folder `root` for this process: its lock first (the spool may belong to another
/// live process), then an empty spool; the folder as a filesystem backend.
fn claim(root: &Path) -> io::Result<(lock::StoreLock, Arc<backend::fs::Fs>)> {
    std::fs::create_dir_all(root)?;
    let store_lock = lock::acquire(root)?;
    empty_spool(root)?;
    Ok((store_lock, Arc::new(backend::fs::Fs::at(root)?)))
}

/// Empties the spool folder: what is there was left by a process that stopped mid-fill.
fn empty_spool(root: &Path) -> io::Result<()> {
    let tmp = layout::tmp_dir(root);
    match std::fs::remove_dir_all(&tmp) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(e),
    }
    std::fs::create_dir_all(&tmp)
}

impl BlobState {
    /// A request that found `fill` running, counted as one of its followers.
    fn joined(fill: Arc<Fill>) -> BlobState {
        fill.add_request();
        BlobState::Fill { fill, joined: true }
    }
}

pub struct Store {
    /// This process's folder: the spool (`tmp/`), the lock, quarantine; with the filesystem
    /// backend also the content.
    root: PathBuf,
    tmp: PathBuf,
    /// Where content is kept for good: the folder (fs), or shared storage (s3).
    blobs: Arc<dyn backend::Blobs>,
    meta: Arc<dyn backend::Meta>,
    /// This process's copies of blobs, served from mappings. With the fs backend it is the
    /// store itself; with shared storage it is a bounded local tier in front of it.
    local: Arc<backend::fs::Fs>,
    /// `blobs` is shared storage behind the local tier.
    tiered: bool,
    /// With shared storage, this replica's stable id (its records are named after it).
    replica: String,
    fills: Mutex<HashMap<Digest, Arc<Fill>>>,
    /// Bumped (under the `fills` lock) whenever a fill leaves the map, after its commit: a
    /// lookup that missed while a fill was committing sees it change and looks again.
    fills_ended: AtomicU64,
    tracker: TaskTracker,
    cancel: CancellationToken,
    manifest_cache: moka::sync::Cache<Digest, Arc<StoredManifest>>,
    /// Mappings of recently served blobs, so a hit costs no system call.
    mapped: moka::sync::Cache<Digest, Bytes>,
    /// Blobs recently seen in shared storage (for redirects), so a redirect costs no HEAD.
    shared_seen: moka::sync::Cache<Digest, ()>,
    pub tags: TagIndex,
    /// What each upstream last said the referrers of a subject are.
    pub referrers: referrers::Referrers,
    /// Which (upstream, repository) may read which stored digest.
    pub links: links::Links,
    pub usage: Arc<usage::Usage>,
    pub journal: Arc<journal::Journal>,
    /// Serialises read-modify-write of the pin list.
    pins: tokio::sync::Mutex<()>,
    /// The process lock; `None` for tools that work beside a running server.
    _lock: Option<lock::StoreLock>,
    max_size: Option<u64>,
    /// Woken when a commit takes the store past `max_size`, so eviction starts at once.
    pub over_limit: tokio::sync::Notify,
}

impl Store {
    /// Opens (creating if needed) the filesystem store at `root` and empties its temp folder:
    /// whatever is there was left by a process that stopped mid-fill and is unverified.
    pub fn open(
        root: &Path,
        max_size: Option<u64>,
        clock: Clock,
        tracker: TaskTracker,
        cancel: CancellationToken,
    ) -> io::Result<Store> {
        let (store_lock, fs) = claim(root)?;
        Store::assemble(
            root,
            Storage::Fs(fs),
            Some(store_lock),
            max_size,
            clock,
            tracker,
            cancel,
        )
    }

    /// Opens the filesystem store at `root` for a tool that works beside a running server
    /// (`entrepot cache`): no lock, and the spool is left alone. Removals it makes are announced
    /// with [`Store::bump_generation`].
    pub fn open_beside(root: &Path) -> io::Result<Store> {
        Store::open_beside_with(root, &crate::config::StorageBackend::Fs)
    }

    /// [`Store::open_beside`] for the configured backend (with S3, `root` is only the spool
    /// and local tier of this process).
    pub fn open_beside_with(
        root: &Path,
        backend: &crate::config::StorageBackend,
    ) -> io::Result<Store> {
        if let crate::config::StorageBackend::S3(cfg) = backend {
            std::fs::create_dir_all(root)?;
            let s3 = Arc::new(backend::s3::S3::new(cfg)?);
            let local = Arc::new(backend::fs::Fs::at(root)?);
            return Store::assemble(
                root,
                Storage::Shared {
                    blobs: s3.clone(),
                    meta: s3,
                    local,
                },
                None,
                None,
                Clock::default(),
                TaskTracker::new(),
                CancellationToken::new(),
            );
        }
        if !root.join(layout::BLOBS).is_dir() {
            return Err(io::Error::new(
                io::ErrorKind::NotFound,
                format!(
                    "{} is not an entrepot store (no blobs/ folder)",
                    root.display()
                ),
            ));
        }
        let fs = Arc::new(backend::fs::Fs::at(root)?);
        Store::assemble(
            root,
            Storage::Fs(fs),
            None,
            None,
            Clock::default(),
            TaskTracker::new(),
            CancellationToken::new(),
        )
    }

    /// A store whose content lives in shared storage (`blobs`, `meta`: the S3 backend, or the
    /// memory one in tests), with this process's spool, lock and local tier in `root`; the
    /// tier is kept under `tier_max` bytes.
    pub fn with_backends(
        root: &Path,
        blobs: Arc<dyn backend::Blobs>,
        meta: Arc<dyn backend::Meta>,
        tier_max: Option<u64>,
        clock: Clock,
        tracker: TaskTracker,
        cancel: CancellationToken,
    ) -> io::Result<Store> {
        let (store_lock, local) = claim(root)?;
        Store::assemble(
            root,
            Storage::Shared { blobs, meta, local },
            Some(store_lock),
            tier_max,
            clock,
            tracker,
            cancel,
        )
    }

    fn assemble(
        root: &Path,
        storage: Storage,
        store_lock: Option<lock::StoreLock>,
        max_size: Option<u64>,
        clock: Clock,
        tracker: TaskTracker,
        cancel: CancellationToken,
    ) -> io::Result<Store> {
        let (blobs, meta, local, tiered): (Arc<dyn backend::Blobs>, Arc<dyn backend::Meta>, _, _) =
            match storage {
                Storage::Fs(fs) => (fs.clone(), fs.clone(), fs, false),
                Storage::Shared { blobs, meta, local } => (blobs, meta, local, true),
            };
        let replica = if tiered {
            replica_id(root)?
        } else {
            String::new()
        };
        let journal = Arc::new(if tiered {
            // Per process: a tool beside the server shares its replica id.
            journal::Journal::shared(meta.clone(), format!("{replica}-{}", std::process::id()))
        } else {
            journal::Journal::open(root)?
        });
        Ok(Store {
            root: root.to_path_buf(),
            tmp: layout::tmp_dir(root),
            referrers: referrers::Referrers::new(meta.clone(), clock.clone()),
            tags: TagIndex::new(meta.clone(), clock, journal.clone()),
            links: links::Links::new(meta.clone()),
            blobs,
            meta,
            local,
            tiered,
            replica,
            journal,
            fills: Mutex::new(HashMap::new()),
            fills_ended: AtomicU64::new(0),
            tracker,
            cancel,
            manifest_cache: moka::sync::Cache::builder()
                .weigher(|_, m: &Arc<StoredManifest>| m.body.len().try_into().unwrap_or(u32::MAX))
                .max_capacity(64 << 20)
                .build(),
            mapped: moka::sync::Cache::new(MAPPED_BLOBS),
            shared_seen: moka::sync::Cache::builder()
                .max_capacity(100_000)
                .time_to_live(std::time::Duration::from_secs(600))
                .build(),
            usage: Arc::new(usage::Usage::default()),
            pins: tokio::sync::Mutex::new(()),
            _lock: store_lock,
            max_size,
            over_limit: tokio::sync::Notify::new(),
        })
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    pub fn tmp_dir(&self) -> &Path {
        &self.tmp
    }

    pub fn blobs(&self) -> &dyn backend::Blobs {
        &*self.blobs
    }

    pub fn meta(&self) -> &dyn backend::Meta {
        &*self.meta
    }

    /// Is the blob stored (complete and verified), here or in shared storage?
    pub async fn has_blob(&self, digest: &Digest) -> io::Result<bool> {
        Ok(self.mapped.contains_key(digest)
            || self.local.stat(digest).await?.is_some()
            || (self.tiered && self.blobs.stat(digest).await?.is_some()))
    }

    /// The fill of `digest` running now, if any.
    pub fn fill_in_progress(&self, digest: &Digest) -> Option<Arc<Fill>> {
        self.fills.lock().unwrap().get(digest).cloned()
    }

    /// Puts `fill` in the in-progress map and runs `task` for it on the tracker. The task holds
    /// the map entry: the fill leaves the map when the entry is dropped, however the task ends
    /// (a panic included), so a digest is never stuck "in progress".
    fn spawn_fill<F, Fut>(
        self: &Arc<Self>,
        fills: &mut HashMap<Digest, Arc<Fill>>,
        fill: Arc<Fill>,
        task: F,
    ) where
        F: FnOnce(InProgress) -> Fut,
        Fut: std::future::Future<Output = ()> + Send + 'static,
    {
        fills.insert(fill.digest.clone(), fill.clone());
        crate::metrics::fills(fills.len());
        let entry = InProgress {
            store: self.clone(),
            fill,
        };
        self.tracker.spawn(task(entry));
    }

    /// Looks a blob up. With a `source`, a miss starts a fill (or joins one that another request
    /// started a moment before); without one, a miss is reported as such.
    pub async fn blob(
        self: &Arc<Self>,
        digest: &Digest,
        source: Option<FillSource>,
    ) -> io::Result<BlobState> {
        // A stored blob never changes, so a mapping in the cache is always good.
        if let Some(data) = self.mapped.get(digest) {
            return Ok(BlobState::Hit { data });
        }
        loop {
            if let Some(fill) = self.fill_in_progress(digest) {
                return Ok(BlobState::joined(fill));
            }
            let ended = self.fills_ended.load(Ordering::Acquire);
            if let Some(data) = self.local.open(digest).await? {
                self.mapped.insert(digest.clone(), data.clone());
                return Ok(BlobState::Hit { data });
            }
            let Some(source) = source.clone() else {
                return Ok(match self.fill_in_progress(digest) {
                    Some(fill) => BlobState::joined(fill),
                    None => BlobState::Miss,
                });
            };
            let origin = match self.shared_size(digest).await {
                Some(size) => fill::Origin::Shared { size },
                None if source.via.is_some() => fill::Origin::Peer,
                None => fill::Origin::Upstream,
            };
            let mut fills = self.fills.lock().unwrap();
            if let Some(fill) = fills.get(digest) {
                return Ok(BlobState::joined(fill.clone()));
            }
            // A fill leaves the map only after its commit. If one left since we looked, it
            // may have stored this very blob: look again rather than fetch it twice.
            if self.fills_ended.load(Ordering::Acquire) != ended {
                continue;
            }
            let (fill, tx) = fill::new_fill(digest.clone(), source, origin);
            fill.add_request();
            let cancel = self.cancel.child_token();
            self.spawn_fill(&mut fills, fill.clone(), |entry| {
                fill::run(entry, tx, cancel)
            });
            return Ok(BlobState::Fill {
                fill,
                joined: false,
            });
        }
    }

    /// A blob of `size` bytes was committed to the store (journaled; counted against the
    /// store's bound unless the store is shared storage, whose local tier is counted apart).
    pub(crate) async fn committed(&self, digest: &Digest, size: u64) {
        self.journal_append(journal::Entry::Blob {
            digest: digest.to_string(),
        })
        .await;
        self.usage.touch(digest);
        if !self.tiered {
            self.usage.added(size);
            if self.max_size.is_some_and(|m| self.usage.bytes() > m) {
                self.over_limit.notify_one();
            }
        }
    }

    pub(crate) async fn journal_append(&self, entry: journal::Entry) {
        if let Err(e) = self.journal.append(entry).await {
            crate::metrics::storage_error();
            tracing::error!(error = %e, "could not append to the journal");
        }
    }

    /// Temp file names of the fills running now (the sweeper leaves them alone).
    pub(crate) fn active_temp_names(&self) -> std::collections::HashSet<String> {
        self.fills
            .lock()
            .unwrap()
            .values()
            .filter_map(|f| f.temp_name())
            .collect()
    }

    /// Removes what an eviction plan names, from storage and from every in-memory cache:
    /// tags first, then manifest records, then blobs, so a tag never resolves to a manifest
    /// whose content is gone. Records already gone are fine.
    pub async fn remove(&self, plan: &evict::Plan) -> io::Result<()> {
        if plan.blobs.is_empty() && plan.tags.is_empty() && plan.manifests.is_empty() {
            return Ok(());
        }
        // Each phase's removals run side by side: one removal mostly waits on the disk (ext4
        // discards a freed extent before unlink returns) or on a bucket's answer, and one at a
        // time made the eviction of 114k blobs from a 1M store take 33 s (BENCHMARKS.md).
        each(&plan.tags)
            .try_for_each_concurrent(REMOVALS_AT_ONCE, |t| async move {
                self.tags.forget(&t.upstream, &t.repo, &t.tag);
                self.meta.delete(&t.key).await
            })
            .await?;
        each(&plan.manifests)
            .try_for_each_concurrent(REMOVALS_AT_ONCE, |d| async move {
                self.manifest_cache.invalidate(d);
                self.meta.delete(&layout::manifest_type(d)).await
            })
            .await?;
        each(&plan.blobs)
            .try_for_each_concurrent(REMOVALS_AT_ONCE, |d| async move {
                self.mapped.invalidate(d);
                self.shared_seen.invalidate(d);
                self.manifest_cache.invalidate(d);
                self.blobs.delete(d).await?;
                if self.tiered {
                    self.local.delete(d).await?;
                }
                Ok(())
            })
            .await?;
        self.usage.removed(&plan.blobs);
        // With shared storage the totals are the local tier's, recounted by its sweep.
        if !self.tiered {
            self.usage.set_totals(
                self.usage.bytes().saturating_sub(plan.freed),
                self.usage.entries().saturating_sub(plan.blobs.len() as u64),
            );
        }
        self.usage.evicted(plan.blobs.len() as u64, plan.freed);
        Ok(())
    }

    /// The pins recorded in the store (by prefetch, import and `POST /pins`).
    pub async fn recorded_pins(&self) -> io::Result<Vec<PinConfig>> {
        let text = self.meta.get(layout::PINS).await?.unwrap_or_default();
        Ok(pins::parse(&String::from_utf8_lossy(&text)))
    }

    /// Records pins (those already recorded are not repeated).
    pub async fn add_pins(&self, new: &[PinConfig]) -> io::Result<()> {
        let _one_at_a_time = self.pins.lock().await;
        let mut all = self.recorded_pins().await?;
        let before = all.len();
        for p in new {
            if !all.contains(p) {
                all.push(p.clone());
            }
        }
        if all.len() == before {
            return Ok(());
        }
        self.meta
            .put(layout::PINS, Bytes::from(pins::render(&all)))
            .await
    }

    /// Loads the saved use stamps: the store's record, and with shared storage every
    /// replica's, merged (the latest use of a blob anywhere wins).
    pub async fn load_usage(&self) -> io::Result<()> {
        let mut keys = vec![layout::ACCESS.to_owned()];
        if self.tiered {
            keys.extend(self.meta.list(layout::ACCESS_BY_REPLICA).await?);
        }
        for key in keys {
            if let Some(text) = self.meta.get(&key).await? {
                self.usage.load(&text);
            }
        }
        Ok(())
    }

    /// Saves the use stamps if they changed since the last save (with shared storage, as
    /// this replica's record).
    pub async fn save_usage(&self) -> io::Result<()> {
        let Some(text) = self.usage.changes() else {
            return Ok(());
        };
        if self.tiered {
            self.meta.put(&layout::access_of(&self.replica), text).await
        } else {
            self.meta.put(layout::ACCESS, text).await
        }
    }

    /// Can the store take writes? Creates and removes a file in the temp folder.
    /// With shared storage, it must answer too (a read of the generation record, bounded).
    pub async fn check_writable(&self) -> io::Result<()> {
        let probe = self.tmp.join(format!("ready-probe.{}", std::process::id()));
        tokio::fs::write(&probe, b"ok").await?;
        tokio::fs::remove_file(&probe).await?;
        if self.tiered {
            tokio::time::timeout(SHARED_PROBE, self.meta.get(layout::GENERATION))
                .await
                .map_err(|_| {
                    io::Error::new(io::ErrorKind::TimedOut, "shared storage does not answer")
                })?
                .map_err(|e| io::Error::new(e.kind(), format!("shared storage: {e}")))?;
        }
        Ok(())
    }

    /// The fills running now (for the status page), oldest first.
    pub fn fills_now(&self) -> Vec<Arc<Fill>> {
        let mut all: Vec<Arc<Fill>> = self.fills.lock().unwrap().values().cloned().collect();
        all.sort_by_key(|f| f.began());
        all
    }

    /// The configured bound of the store (with shared storage: of the local tier).
    pub fn max_size(&self) -> Option<u64> {
        self.max_size
    }

    /// Number of fills running now.
    pub fn fills_in_progress(&self) -> usize {
        self.fills.lock().unwrap().len()
    }
}

#[cfg(test)]
mod tests {
    use futures_util::StreamExt;

    use super::*;

    pub(super) fn memory_store(dir: &Path) -> Arc<Store> {
        let mem = Arc::new(backend::memory::Memory::default());
        Arc::new(
            Store::with_backends(
                dir,
                mem.clone(),
                mem,
                None,
                Clock::default(),
                TaskTracker::new(),
                CancellationToken::new(),
            )
            .unwrap(),
        )
    }

    /// Stores a layer `layer` (its bytes are not its digest's: nothing here checks) and a
    /// manifest of that one layer.
    async fn store_image(store: &Store, layer: &Digest) -> Arc<StoredManifest> {
        store
            .blobs()
            .put(layer, Bytes::from_static(b"layer"))
            .await
            .unwrap();
        let body = format!(r#"{{"layers":[{{"digest":"{layer}"}}]}}"#);
        let m = Arc::new(StoredManifest {
            digest: Digest::sha256_of(body.as_bytes()),
            media_type: "application/vnd.oci.image.manifest.v1+json".into(),
            body: Bytes::from(body),
        });
        store.put_manifest(m.clone()).await.unwrap();
        m
    }

    /// The memory backend, whose removals and reads (of blobs and of records) take a while
    /// and are counted in flight.
    #[derive(Default)]
    struct Slow {
        inner: backend::memory::Memory,
        in_flight: std::sync::atomic::AtomicUsize,
        most: std::sync::atomic::AtomicUsize,
    }

    impl Slow {
        async fn wait(&self) {
            let now = self.in_flight.fetch_add(1, Ordering::SeqCst) + 1;
            self.most.fetch_max(now, Ordering::SeqCst);
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
            self.in_flight.fetch_sub(1, Ordering::SeqCst);
        }
    }

    impl backend::Meta for Slow {
        fn get<'a>(&'a self, key: &'a str) -> backend::Io<'a, Option<Bytes>> {
            Box::pin(async move {
                self.wait().await;
                backend::Meta::get(&self.inner, key).await
            })
        }
        fn put<'a>(&'a self, key: &'a str, data: Bytes) -> backend::Io<'a, ()> {
            backend::Meta::put(&self.inner, key, data)
        }
        fn put_if_absent<'a>(&'a self, key: &'a str, data: Bytes) -> backend::Io<'a, bool> {
            backend::Meta::put_if_absent(&self.inner, key, data)
        }
        fn delete<'a>(&'a self, key: &'a str) -> backend::Io<'a, ()> {
            backend::Meta::delete(&self.inner, key)
        }
        fn list<'a>(&'a self, prefix: &'a str) -> backend::Io<'a, Vec<String>> {
            backend::Meta::list(&self.inner, prefix)
        }
    }

    impl backend::Blobs for Slow {
        fn stat<'a>(&'a self, d: &'a Digest) -> backend::Io<'a, Option<u64>> {
            self.inner.stat(d)
        }
        fn open<'a>(&'a self, d: &'a Digest) -> backend::Io<'a, Option<Bytes>> {
            self.inner.open(d)
        }
        fn read<'a>(&'a self, d: &'a Digest) -> backend::Io<'a, Option<Bytes>> {
            Box::pin(async move {
                self.wait().await;
                self.inner.read(d).await
            })
        }
        fn read_range<'a>(
            &'a self,
            d: &'a Digest,
            r: std::ops::Range<u64>,
        ) -> backend::Io<'a, Option<Bytes>> {
            self.inner.read_range(d, r)
        }
        fn commit<'a>(&'a self, d: &'a Digest, spool: temp::TempFile) -> backend::Io<'a, ()> {
            self.inner.commit(d, spool)
        }
        fn put<'a>(&'a self, d: &'a Digest, data: Bytes) -> backend::Io<'a, ()> {
            self.inner.put(d, data)
        }
        fn delete<'a>(&'a self, d: &'a Digest) -> backend::Io<'a, ()> {
            Box::pin(async move {
                self.wait().await;
                backend::Blobs::delete(&self.inner, d).await
            })
        }
        fn list(&self) -> backend::Io<'_, Vec<backend::BlobInfo>> {
            self.inner.list()
        }
    }

    /// Regression: an eviction removed one blob at a time, each removal waiting on the disk
    /// (ext4 discards the freed extent before unlink returns), so evicting 114k blobs from a
    /// 1M store took 33 s and the sweep grew worse than linearly. Removals now overlap.
    #[tokio::test(start_paused = true)]
    async fn an_evictions_removals_run_side_by_side() {
        let dir = tempfile::tempdir().unwrap();
        let blobs = Arc::new(Slow::default());
        let meta = Arc::new(backend::memory::Memory::default());
        let store = Store::with_backends(
            dir.path(),
            blobs.clone(),
            meta,
            None,
            Clock::default(),
            TaskTracker::new(),
            CancellationToken::new(),
        )
        .unwrap();
        let mut plan = evict::Plan::default();
        for i in 0..100u32 {
            let d = Digest::sha256_of(&i.to_be_bytes());
            blobs.put(&d, Bytes::from(vec![1u8; 10])).await.unwrap();
            plan.blobs.push(d);
            plan.freed += 10;
        }
        store.remove(&plan).await.unwrap();
        assert!(blobs.list().await.unwrap().is_empty(), "every blob removed");
        let most = blobs.most.load(Ordering::SeqCst);
        assert_eq!(most, REMOVALS_AT_ONCE, "removals in flight at once");
    }

    /// Regression: listing the store read its manifests and tag records one at a time, each a
    /// file read on the blocking pool or a request to the bucket; at 1M blobs that was most of
    /// a sweep's 18-31 s (issue 13). Reads now overlap, and what is listed is unchanged.
    #[tokio::test(start_paused = true)]
    async fn an_inventory_reads_manifests_and_tags_side_by_side() {
        let dir = tempfile::tempdir().unwrap();
        let blobs = Arc::new(Slow::default());
        let meta = Arc::new(Slow::default());
        let store = Store::with_backends(
            dir.path(),
            blobs.clone(),
            meta.clone(),
            None,
            Clock::default(),
            TaskTracker::new(),
            CancellationToken::new(),
        )
        .unwrap();
        let up: Arc<str> = "up".into();
        let repo: crate::oci::RepoName = "team/app".parse().unwrap();
        let mut manifests = Vec::new();
        for i in 0..60u32 {
            let layer = Digest::sha256_of(&i.to_be_bytes());
            let m = store_image(&store, &layer).await;
            let tag: crate::oci::Tag = format!("v{i}").parse().unwrap();
            store
                .tags
                .put(&up, &repo, &tag, m.digest.clone(), m.media_type.clone(), 10)
                .await
                .unwrap();
            manifests.push((m.digest.clone(), layer));
        }
        // A record whose manifest is gone is reported, among the others.
        let gone = Digest::sha256_of(b"gone");
        backend::Meta::put(&*meta, &layout::manifest_type(&gone), Bytes::new())
            .await
            .unwrap();

        let inv = inventory::Inventory::load(&store).await.unwrap();
        assert_eq!(inv.blobs.len(), 120);
        assert_eq!(inv.manifests.len(), 60);
        for (m, layer) in &manifests {
            assert_eq!(inv.manifests[m], vec![layer.clone()]);
        }
        assert_eq!(
            inv.dangling_manifest_meta,
            vec![layout::manifest_type(&gone)]
        );
        assert_eq!(inv.tags.len(), 60);
        assert!(inv
            .tags
            .windows(2)
            .all(|w| (&w[0].repo, &w[0].tag) < (&w[1].repo, &w[1].tag)));
        let (blob_reads, record_reads) = (
            blobs.most.load(Ordering::SeqCst),
            meta.most.load(Ordering::SeqCst),
        );
        assert!(blob_reads >= 16, "manifests read at once: {blob_reads}");
        assert!(
            record_reads >= 16,
            "tag records read at once: {record_reads}"
        );
    }

    /// The store works on any backend: manifests, tags, pins, use stamps, listing and removal
    /// all go through the seam (here the memory backend, no file but the spool and lock).
    #[tokio::test]
    async fn a_store_on_the_memory_backend_keeps_and_removes_an_image() {
        let dir = tempfile::tempdir().unwrap();
        let store = memory_store(dir.path());
        let layer = Digest::sha256_of(b"layer");
        let m = store_image(&store, &layer).await;
        let up: Arc<str> = "up".into();
        let repo: crate::oci::RepoName = "team/app".parse().unwrap();
        let tag: crate::oci::Tag = "v1".parse().unwrap();
        store
            .tags
            .put(&up, &repo, &tag, m.digest.clone(), m.media_type.clone(), 10)
            .await
            .unwrap();
        let pin = crate::config::parse_image_ref("up/team/app:v1").unwrap();
        store.add_pins(&[pin.clone(), pin.clone()]).await.unwrap();
        assert_eq!(store.recorded_pins().await.unwrap(), vec![pin]);
        store.usage.touch(&layer);
        store.save_usage().await.unwrap();
        assert!(store
            .meta()
            .get(&layout::access_of(&store.replica))
            .await
            .unwrap()
            .is_some());

        let inv = inventory::Inventory::load(&store).await.unwrap();
        assert_eq!(inv.blobs.len(), 2);
        assert_eq!(inv.manifests[&m.digest], vec![layer.clone()]);
        assert_eq!(inv.tags.len(), 1);
        assert_eq!(inv.tags[0].key, layout::tag("up", &repo, &tag));
        assert!(store.has_blob(&layer).await.unwrap());
        assert_eq!(
            store.manifest(&m.digest).await.unwrap().unwrap().body,
            m.body
        );

        let p = evict::plan(
            &inv,
            u64::MAX,
            |_: &Digest| 0,
            &std::collections::HashSet::new(),
        );
        store.remove(&p).await.unwrap();
        let inv = inventory::Inventory::load(&store).await.unwrap();
        assert!(inv.blobs.is_empty() && inv.manifests.is_empty() && inv.tags.is_empty());
        assert!(store.manifest(&m.digest).await.unwrap().is_none());
        assert!(store.tags.get(&up, &repo, &tag).await.is_none());
        assert!(!store.has_blob(&layer).await.unwrap());
    }

    /// Replicas sharing storage each save their own use stamps; a replica reading them sees
    /// the latest use of each blob anywhere (a shared record would keep only the last saver's).
    #[tokio::test]
    async fn replicas_use_stamps_merge() {
        let mem = Arc::new(backend::memory::Memory::default());
        let dirs: Vec<_> = (0..3).map(|_| tempfile::tempdir().unwrap()).collect();
        let open = |dir: &Path| {
            Store::with_backends(
                dir,
                mem.clone(),
                mem.clone(),
                None,
                Clock::default(),
                TaskTracker::new(),
                CancellationToken::new(),
            )
            .unwrap()
        };
        let (a, b) = (open(dirs[0].path()), open(dirs[1].path()));
        let (x, y) = (Digest::sha256_of(b"x"), Digest::sha256_of(b"y"));
        a.usage.touch(&x);
        b.usage.touch(&y);
        a.save_usage().await.unwrap();
        b.save_usage().await.unwrap();
        let c = open(dirs[2].path());
        c.load_usage().await.unwrap();
        assert_eq!(c.usage.last_use(&x), a.usage.last_use(&x));
        assert_eq!(c.usage.last_use(&y), b.usage.last_use(&y));
        // A replica keeps its id across restarts (its records stay its own).
        drop(a);
        assert_eq!(
            open(dirs[0].path()).replica,
            replica_id(dirs[0].path()).unwrap()
        );
    }

    /// A fill task that panicked used to leave its digest in the in-progress map for ever:
    /// every later request joined the dead fill and failed until a restart.
    #[tokio::test]
    async fn regression_a_fill_task_that_panics_leaves_the_in_progress_map() {
        let dir = tempfile::tempdir().unwrap();
        let tracker = TaskTracker::new();
        let store = Arc::new(
            Store::open(
                dir.path(),
                None,
                Clock::default(),
                tracker.clone(),
                CancellationToken::new(),
            )
            .unwrap(),
        );
        let digest = Digest::sha256_of(b"never arrives");
        let (fill, tx) =
            fill::new_fill(digest.clone(), fill::test_source(), fill::Origin::Upstream);
        let (go, wait) = tokio::sync::oneshot::channel::<()>();
        store.spawn_fill(
            &mut store.fills.lock().unwrap(),
            fill.clone(),
            |entry| async move {
                let _entry = entry;
                let _tx = tx;
                let _ = wait.await;
                panic!("a bug in the fill");
            },
        );
        assert_eq!(store.fills_in_progress(), 1);
        let follower = read::follow(fill, 0, None);
        go.send(()).unwrap();
        tracker.close();
        tracker.wait().await;

        assert_eq!(
            store.fills_in_progress(),
            0,
            "the panicked fill is still in progress"
        );
        assert!(store.fill_in_progress(&digest).is_none());
        // Its follower got an error, not a clean (empty) end.
        let items: Vec<_> = follower.collect().await;
        assert!(
            matches!(items.last(), Some(Err(_))),
            "the follower of a panicked fill ended cleanly"
        );
    }
}
