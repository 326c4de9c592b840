//! Keeping the store under `storage.max_size`: an image-aware least-recently-used plan, applied
//! by a background sweeper that also removes orphan temp files and dangling metadata. Serving
//! never waits for it.
//!
//! The unit of eviction is an image: a manifest no other manifest references, with everything
//! it references (an index, its platform manifests, configs and layers). Its last use is the
//! latest use of any of its parts. Evicting an image removes its tags first, then its manifests,
//! then every blob no remaining image still references, so a tag never resolves to a manifest
//! whose layers are gone. Blobs outside any image (fetched by digest alone) are units of their
//! own. Images that are pinned, or that a client is reading, are never evicted; an image that
//! only shares a layer with a pinned one may be (the shared layer stays).

use std::collections::HashSet;
use std::io;
use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use super::backend::Blobs as _;
use super::inventory::{Inventory, TagRef};
use super::Store;
use crate::config::{PinConfig, StorageBackend, StorageConfig};
use crate::oci::{Digest, Reference};

mod plan;
pub use plan::{plan, LastUses, Recorded};

/// What one eviction run removes.
#[derive(Debug, Default)]
pub struct Plan {
    pub tags: Vec<TagRef>,
    pub manifests: Vec<Digest>,
    pub blobs: Vec<Digest>,
    pub freed: u64,
    /// Images kept although old enough, because they are pinned or in use.
    pub protected_units: usize,
}

/// Everything pinned: the closures of the pinned tags and digests that are in the store.
pub fn pinned(
    inv: &Inventory,
    pins: &[PinConfig],
    upstream_of: impl Fn(&str) -> String,
) -> HashSet<Digest> {
    let mut out = HashSet::new();
    for pin in pins {
        let upstream = upstream_of(&pin.upstream);
        let roots: Vec<Digest> = match &pin.reference {
            Reference::Digest(d) => vec![d.clone()],
            Reference::Tag(t) => inv
                .tags
                .iter()
                .filter(|r| {
                    r.upstream == upstream && r.repo == pin.repo.as_str() && r.tag == t.as_str()
                })
                .map(|r| r.digest.clone())
                .collect(),
        };
        for r in roots {
            out.extend(inv.closure(&r));
        }
    }
    out
}

/// Does this replica run the bucket-wide work now (several replicas share one bucket: exactly
/// one of them sweeps it)?
pub type Leads = Arc<dyn Fn() -> bool + Send + Sync>;

/// With shared storage, how often a replica shares its use stamps (bucket eviction reads every
/// replica's before deleting anything).
const SHARE_USAGE_EVERY: Duration = Duration::from_secs(30);

/// Blobs bucket eviction chose, and when (a use stamp): deleted after the grace period unless
/// a replica used them since.
struct Doomed {
    at: u64,
    blobs: HashSet<Digest>,
}

/// The store's background upkeep: exact totals at start-up, eviction whenever the store is
/// over `max_size` (checked every `sweep_interval`, and at once when a commit crosses it),
/// orphan temp files and dangling metadata, and saving access times. With shared storage the
/// bucket-wide part (abandoned uploads, the bucket's bound) runs only while `leads` says so.
pub async fn sweeper(
    store: Arc<Store>,
    cfg: StorageConfig,
    pins: Vec<PinConfig>,
    upstream_names: Arc<dyn Fn(&str) -> String + Send + Sync>,
    leads: Leads,
    stopping: CancellationToken,
) {
    if let Err(e) = store.load_usage().await {
        tracing::warn!(error = %e, "could not load saved use stamps");
    }
    let mut doomed: Option<Doomed> = None;
    let sweeps = async {
        loop {
            let lead = leads();
            let started = std::time::Instant::now();
            let swept = sweep_once(&store, &cfg, &pins, &upstream_names, lead, &mut doomed).await;
            // A sweep's inventory (hundreds of bytes a blob) is freed by now: give the memory
            // back rather than keep it for streaming (`sys`).
            let _ = tokio::task::spawn_blocking(crate::sys::release_memory).await;
            match swept {
                // Its cost grows with the store: say what it was (`cargo bench --bench scale`).
                Ok(()) => tracing::info!(
                    took_ms = started.elapsed().as_millis() as u64,
                    "store sweep done"
                ),
                Err(e) => tracing::error!(error = %e, "store sweep failed"),
            }
            if let Err(e) = store.save_usage().await {
                tracing::warn!(error = %e, "could not save use stamps");
            }
            tokio::select! {
                _ = tokio::time::sleep(cfg.sweep_interval) => {}
                _ = store.over_limit.notified() => {}
                _ = stopping.cancelled() => break,
            }
        }
    };
    // With shared storage, use stamps reach the bucket often: the replica that evicts from it
    // reads them before deleting anything.
    let share = async {
        if !store.is_tiered() {
            return;
        }
        let every = SHARE_USAGE_EVERY.min(cfg.sweep_interval);
        loop {
            tokio::select! {
                _ = tokio::time::sleep(every) => {}
                _ = stopping.cancelled() => break,
            }
            if let Err(e) = store.save_usage().await {
                tracing::warn!(error = %e, "could not save use stamps");
            }
        }
    };
    tokio::join!(sweeps, share);
    if let Err(e) = store.save_usage().await {
        tracing::warn!(error = %e, "could not save use stamps");
    }
}

async fn sweep_once(
    store: &Arc<Store>,
    cfg: &StorageConfig,
    pins: &[PinConfig],
    upstream_names: &Arc<dyn Fn(&str) -> String + Send + Sync>,
    lead: bool,
    doomed: &mut Option<Doomed>,
) -> io::Result<()> {
    sweep_temp(store, cfg.sweep_interval).await;
    if store.is_tiered() {
        sweep_tier(store, cfg).await?;
        if !lead {
            // Another replica sweeps the bucket; what this one chose is for it to choose again.
            *doomed = None;
            return Ok(());
        }
        match store.blobs().sweep_abandoned().await {
            Ok(0) => {}
            Ok(n) => tracing::info!(uploads = n, "aborted abandoned uploads"),
            Err(e) => tracing::warn!(error = %e, "could not sweep abandoned uploads"),
        }
        // The bucket's own bound, if it has one: whole images, as on disk.
        if let StorageBackend::S3(s3) = &cfg.backend {
            if let (Some(max), Some(low)) = (s3.max_size, s3.low_water) {
                // Other replicas' uses count: read their records first.
                if let Err(e) = store.load_usage().await {
                    tracing::warn!(error = %e, "could not read other replicas' use stamps");
                }
                let inv = Inventory::load(store).await?;
                for key in &inv.dangling_manifest_meta {
                    store.meta().delete(key).await?;
                }
                evict_bucket(
                    store,
                    &inv,
                    max,
                    low,
                    pins,
                    upstream_names,
                    s3.eviction_grace,
                    doomed,
                )
                .await?;
            }
        }
        return Ok(());
    }
    let loading = std::time::Instant::now();
    let inv = Inventory::load(store).await?;
    tracing::debug!(
        blobs = inv.blobs.len(),
        took_ms = loading.elapsed().as_millis() as u64,
        "store inventory"
    );
    store
        .usage
        .set_totals(inv.total_bytes(), inv.blobs.len() as u64);
    for key in &inv.dangling_manifest_meta {
        store.meta().delete(key).await?;
    }
    if let (Some(max), Some(low)) = (cfg.max_size, cfg.low_water) {
        evict_images(store, &inv, max, low, pins, upstream_names, &HashSet::new()).await?;
    }
    Ok(())
}

/// The bucket's bound, in two steps when replicas may be reading from it: choose the least
/// recently used images now, delete them a grace period later, keeping every one a replica
/// used meanwhile (its use stamps reach the bucket well within the grace period).
#[allow(clippy::too_many_arguments)]
async fn evict_bucket(
    store: &Arc<Store>,
    inv: &Inventory,
    max: u64,
    low: u64,
    pins: &[PinConfig],
    upstream_names: &Arc<dyn Fn(&str) -> String + Send + Sync>,
    grace: Duration,
    doomed: &mut Option<Doomed>,
) -> io::Result<()> {
    if grace.is_zero() {
        return evict_images(store, inv, max, low, pins, upstream_names, &HashSet::new()).await;
    }
    let now = super::usage::unix_now_ms();
    match doomed.take() {
        None => {
            if inv.total_bytes() <= max {
                return Ok(());
            }
            let p = plan(
                inv,
                inv.total_bytes() - low,
                Recorded {
                    usage: &store.usage,
                    inv,
                },
                &store.usage.in_use(),
            );
            if !p.blobs.is_empty() {
                tracing::info!(
                    blobs = p.blobs.len(),
                    bytes = p.freed,
                    grace_s = grace.as_secs(),
                    "bucket over its bound: chose least recently used images, deleting them after the grace period"
                );
                *doomed = Some(Doomed {
                    at: now,
                    blobs: p.blobs.into_iter().collect(),
                });
            }
            Ok(())
        }
        Some(d) if now < d.at + grace.as_millis() as u64 => {
            *doomed = Some(d);
            Ok(())
        }
        Some(d) => {
            // Only what was chosen then and no replica used since.
            let keep: HashSet<Digest> = inv
                .blobs
                .keys()
                .filter(|b| !d.blobs.contains(*b) || store.usage.last_use_in(inv, b) > d.at)
                .cloned()
                .collect();
            evict_images(store, inv, max, low, pins, upstream_names, &keep).await
        }
    }
}

/// When the store holds more than `max`, removes least recently used images (never pinned
/// ones, nor blobs being read, nor images with a blob in `keep`) until it holds `low` or less.
async fn evict_images(
    store: &Arc<Store>,
    inv: &Inventory,
    max: u64,
    low: u64,
    pins: &[PinConfig],
    upstream_names: &Arc<dyn Fn(&str) -> String + Send + Sync>,
    keep: &HashSet<Digest>,
) -> io::Result<()> {
    let total = inv.total_bytes();
    if total <= max {
        return Ok(());
    }
    let mut all_pins = pins.to_vec();
    all_pins.extend(store.recorded_pins().await.unwrap_or_default());
    let mut protected = pinned(inv, &all_pins, |u| upstream_names(u));
    protected.extend(store.usage.in_use());
    protected.extend(keep.iter().cloned());
    let usage = store.usage.clone();
    let planning = std::time::Instant::now();
    let p = plan(
        inv,
        total - low,
        Recorded { usage: &usage, inv },
        &protected,
    );
    let plan_ms = planning.elapsed().as_millis() as u64;
    let removing = std::time::Instant::now();
    store.remove(&p).await?;
    let left = total - p.freed;
    tracing::info!(
        before = total,
        plan_ms,
        remove_ms = removing.elapsed().as_millis() as u64,
        after = left,
        freed = p.freed,
        blobs = p.blobs.len(),
        manifests = p.manifests.len(),
        tags = p.tags.len(),
        kept_pinned_or_in_use = p.protected_units,
        "evicted least recently used images"
    );
    if left > low {
        tracing::warn!(
            size = left,
            low_water = low,
            "store still above its low-water mark: the rest is pinned or in use"
        );
    }
    Ok(())
}

/// Keeps the local tier in front of shared storage under `storage.max_size`: least recently
/// used local copies go first (shared storage still has them, so there is no image to keep
/// whole); copies being read or filled stay.
async fn sweep_tier(store: &Arc<Store>, cfg: &StorageConfig) -> io::Result<()> {
    let local = store.local().list().await?;
    let total: u64 = local.iter().map(|b| b.size).sum();
    store.usage.set_totals(total, local.len() as u64);
    let (Some(max), Some(low)) = (cfg.max_size, cfg.low_water) else {
        return Ok(());
    };
    if total <= max {
        return Ok(());
    }
    let in_use = store.usage.in_use();
    let mut order: Vec<(u64, &super::backend::BlobInfo)> = local
        .iter()
        .filter(|b| !in_use.contains(&b.digest))
        .map(|b| (store.usage.last_use(&b.digest).unwrap_or(b.committed_ms), b))
        .collect();
    order.sort_by_key(|(used, b)| (*used, b.digest.clone()));
    let (mut freed, mut gone) = (0, Vec::new());
    for (_, b) in order {
        if total - freed <= low {
            break;
        }
        freed += b.size;
        gone.push(b.digest.clone());
    }
    store.drop_local(&gone, freed).await?;
    tracing::info!(
        before = total,
        after = total - freed,
        blobs = gone.len(),
        "evicted least recently used local copies"
    );
    Ok(())
}

/// Temp files older than `age` that no fill owns are leftovers of failed writes.
async fn sweep_temp(store: &Store, age: Duration) {
    let active = store.active_temp_names();
    let tmp = store.tmp_dir().to_path_buf();
    let _ = tokio::task::spawn_blocking(move || {
        let Ok(rd) = std::fs::read_dir(&tmp) else {
            return;
        };
        for e in rd.filter_map(|e| e.ok()) {
            let name = e.file_name().to_string_lossy().into_owned();
            let old = e
                .metadata()
                .and_then(|m| m.modified())
                .ok()
                .and_then(|m| m.elapsed().ok())
                .is_some_and(|el| el >= age);
            if old && !active.contains(&name) {
                tracing::info!(file = %name, "removing orphan temp file");
                let _ = std::fs::remove_file(e.path());
            }
        }
    })
    .await;
}
