//! The local, content-addressed cache: blob lookup (hit, fill in progress, miss), the fills,
//! stored manifests and the tag index.
//!
//! ```text
//! <root>/blobs/<alg>/<hex>                    verified content (layers, configs, manifests)
//! <root>/meta/manifests/<alg>/<hex>           a stored manifest's media type
//! <root>/meta/tags/<upstream>/<repo>/_tags/<tag>   tag → digest, media type, size, fetched-at
//! <root>/tmp/                                 fills in progress; emptied at start-up
//! ```

pub mod evict;
pub mod fill;
pub mod inventory;
pub mod journal;
pub mod lock;
pub mod manifests;
mod mapped;
pub mod pins;
pub mod read;
pub mod tags;
mod tail;
mod temp;
pub mod usage;

use std::collections::HashMap;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::clock::Clock;
use crate::oci::Digest;
pub use fill::{Fill, FillError, FillSource, Progress};
pub use manifests::StoredManifest;
pub use tags::{TagEntry, TagIndex};

/// How many blob mappings to keep. Mappings cost address space, not memory: their pages are
/// the page cache's.
const MAPPED_BLOBS: u64 = 4096;

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
        crate::metrics::fills(fills.len());
    }
}

impl BlobState {
    /// A request that found `fill` running, counted as one of its followers.
    fn joined(fill: Arc<Fill>) -> BlobState {
        fill.add_request();
        BlobState::Fill { fill, joined: true }
    }
}

pub struct Store {
    root: PathBuf,
    tmp: PathBuf,
    fills: Mutex<HashMap<Digest, Arc<Fill>>>,
    tracker: TaskTracker,
    cancel: CancellationToken,
    manifest_cache: moka::sync::Cache<Digest, Arc<StoredManifest>>,
    /// Mappings of recently served blobs, so a hit costs no system call.
    mapped: moka::sync::Cache<Digest, Bytes>,
    pub tags: TagIndex,
    pub usage: Arc<usage::Usage>,
    pub journal: Arc<journal::Journal>,
    _lock: lock::StoreLock,
    max_size: Option<u64>,
    /// Woken when a commit takes the store past `max_size`, so eviction starts at once.
    pub over_limit: tokio::sync::Notify,
}

impl Store {
    /// Opens (creating if needed) the store at `root` and empties its temp folder: whatever is
    /// there was left by a process that stopped mid-fill and is unverified.
    pub fn open(
        root: &Path,
        max_size: Option<u64>,
        clock: Clock,
        tracker: TaskTracker,
        cancel: CancellationToken,
    ) -> io::Result<Store> {
        let tmp = root.join("tmp");
        std::fs::create_dir_all(root)?;
        // Before anything else: the temp folder below may belong to another live process.
        let store_lock = lock::acquire(root)?;
        for dir in [
            "blobs/sha256",
            "blobs/sha512",
            "meta/manifests",
            "meta/tags",
        ] {
            std::fs::create_dir_all(root.join(dir))?;
        }
        match std::fs::remove_dir_all(&tmp) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(e),
        }
        std::fs::create_dir_all(&tmp)?;
        let journal = Arc::new(journal::Journal::open(root)?);
        Ok(Store {
            root: root.to_path_buf(),
            tags: TagIndex::new(root.join("meta/tags"), tmp.clone(), clock, journal.clone()),
            journal,
            tmp,
            fills: Mutex::new(HashMap::new()),
            tracker,
            cancel,
            manifest_cache: moka::sync::Cache::builder()
                .weigher(|_, m: &Arc<StoredManifest>| m.body.len().try_into().unwrap_or(u32::MAX))
                .max_capacity(64 << 20)
                .build(),
            mapped: moka::sync::Cache::new(MAPPED_BLOBS),
            usage: Arc::new(usage::Usage::default()),
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

    pub fn blob_path(&self, digest: &Digest) -> PathBuf {
        self.root
            .join("blobs")
            .join(digest.algorithm().as_str())
            .join(digest.hex())
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
        let path = self.blob_path(digest);
        loop {
            if let Some(fill) = self.fill_in_progress(digest) {
                return Ok(BlobState::joined(fill));
            }
            let p = path.clone();
            match tokio::task::spawn_blocking(move || mapped::map_file(&p))
                .await
                .map_err(io::Error::other)?
            {
                Ok(data) => {
                    self.mapped.insert(digest.clone(), data.clone());
                    return Ok(BlobState::Hit { data });
                }
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => return Err(e),
            }
            let Some(source) = source.clone() else {
                return Ok(match self.fill_in_progress(digest) {
                    Some(fill) => BlobState::joined(fill),
                    None => BlobState::Miss,
                });
            };
            let mut fills = self.fills.lock().unwrap();
            if let Some(fill) = fills.get(digest) {
                return Ok(BlobState::joined(fill.clone()));
            }
            // A fill stays in the map until after its rename, so a blob that is neither in the
            // map nor on disk here is truly missing. Checked under the lock (a cheap stat, only
            // on misses) so two requests cannot both start a fill.
            if path.exists() {
                continue;
            }
            let (fill, tx) = fill::new_fill(digest.clone(), source);
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

    /// A blob of `size` bytes was committed.
    pub(crate) fn committed(&self, digest: &Digest, size: u64) {
        self.journal_append(journal::Entry::Blob {
            digest: digest.to_string(),
        });
        self.usage.added(size);
        self.usage.touch(digest);
        if self.max_size.is_some_and(|m| self.usage.bytes() > m) {
            self.over_limit.notify_one();
        }
    }

    pub(crate) fn journal_append(&self, entry: journal::Entry) {
        if let Err(e) = self.journal.append(entry) {
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

    /// Removes what an eviction plan names, from disk and from every in-memory cache.
    pub async fn remove(&self, plan: &evict::Plan) -> io::Result<()> {
        if plan.blobs.is_empty() && plan.tags.is_empty() {
            return Ok(());
        }
        // Tags first, in memory too, so no request resolves a tag to what is being removed.
        for t in &plan.tags {
            self.tags.forget(&t.upstream, &t.repo, &t.tag);
        }
        let root = self.root.clone();
        let p = evict::Plan {
            tags: plan.tags.clone(),
            manifests: plan.manifests.clone(),
            blobs: plan.blobs.clone(),
            freed: plan.freed,
            protected_units: plan.protected_units,
        };
        tokio::task::spawn_blocking(move || evict::apply(&root, &p))
            .await
            .map_err(io::Error::other)??;
        for d in &plan.blobs {
            self.mapped.invalidate(d);
            self.manifest_cache.invalidate(d);
        }
        self.usage.removed(&plan.blobs);
        self.usage.set_totals(
            self.usage.bytes().saturating_sub(plan.freed),
            self.usage.entries().saturating_sub(plan.blobs.len() as u64),
        );
        crate::metrics::evicted(plan.blobs.len() as u64, plan.freed);
        Ok(())
    }

    /// Can the store take writes? Creates and removes a file in the temp folder.
    pub async fn check_writable(&self) -> io::Result<()> {
        let probe = self.tmp.join(format!("ready-probe.{}", std::process::id()));
        tokio::fs::write(&probe, b"ok").await?;
        tokio::fs::remove_file(&probe).await
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
        let (fill, tx) = fill::new_fill(digest.clone(), fill::test_source());
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
