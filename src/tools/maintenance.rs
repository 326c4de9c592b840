//! `entrepot cache ...`: list, remove, verify and garbage-collect the store, through `Store`
//! like every other writer, with or without a server running. Removals are ordered tags →
//! manifests → blobs, and announced (the store's generation): a running server drops what it
//! holds in memory within a second and fetches removed content again on its next miss.

use std::collections::{HashMap, HashSet};
use std::future::Future;
use std::io::{self, Write as _};
use std::path::{Path, PathBuf};

use futures_util::{StreamExt as _, TryStreamExt as _};

use crate::cache::evict::{self, Plan};
use crate::cache::inventory::Inventory;
use crate::cache::Store;
use crate::config::{self, Config};
use crate::oci::{Digest, Hasher, Reference};

#[derive(Debug, thiserror::Error)]
pub enum MaintenanceError {
    #[error("{0}")]
    Io(#[from] io::Error),
    #[error("{0}")]
    Usage(String),
}

/// The store and what the configuration says about it.
pub struct Target {
    pub root: PathBuf,
    pub config: Option<Config>,
}

impl Target {
    /// The configured name of the upstream `name` selects (an alias maps to its upstream).
    pub fn upstream_name(&self, name: &str) -> String {
        self.config
            .as_ref()
            .and_then(|c| c.upstreams.iter().find(|u| u.matches(name)))
            .map_or_else(|| name.to_string(), |u| u.name.clone())
    }

    /// The configured storage backend (a bare `--root` is a folder).
    pub fn backend(&self) -> config::StorageBackend {
        self.config
            .as_ref()
            .map_or(config::StorageBackend::Fs, |c| c.storage.backend.clone())
    }

    /// The store (beside any running server), what it holds, and its saved use stamps.
    async fn open(&self) -> Result<(Store, Inventory), MaintenanceError> {
        let store =
            Store::open_beside_with(&self.root, &self.backend()).map_err(|e| match e.kind() {
                io::ErrorKind::NotFound => MaintenanceError::Usage(e.to_string()),
                _ => MaintenanceError::Io(e),
            })?;
        store.load_usage().await?;
        let inv = Inventory::load(&store).await?;
        Ok((store, inv))
    }
}

/// Runs a command's work on a small runtime of its own (the commands are called from `main`).
fn run<T>(work: impl Future<Output = Result<T, MaintenanceError>>) -> Result<T, MaintenanceError> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?
        .block_on(work)
}

/// Removes what `plan` names and tells running servers about it.
async fn apply(store: &Store, plan: &Plan) -> Result<(), MaintenanceError> {
    store.remove(plan).await?;
    store.bump_generation().await?;
    Ok(())
}

pub fn human_size(n: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = n as f64;
    let mut u = 0;
    while v >= 1024.0 && u < UNITS.len() - 1 {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{n} B")
    } else {
        format!("{v:.1} {}", UNITS[u])
    }
}

fn when(stamp_ms: u64) -> String {
    let ago = crate::cache::usage::unix_now_ms().saturating_sub(stamp_ms) / 1000;
    match ago {
        0..=59 => format!("{ago}s ago"),
        60..=3599 => format!("{}m ago", ago / 60),
        3600..=86_399 => format!("{}h ago", ago / 3600),
        _ => format!("{}d ago", ago / 86_400),
    }
}

/// `cache ls`: every tag (and untagged image) with its size and last use.
pub fn ls(t: &Target, out: &mut impl io::Write) -> Result<(), MaintenanceError> {
    let (store, inv) = run(t.open())?;
    // A line a tag: a year-old store lists a hundred thousand.
    let mut out = io::BufWriter::new(out);
    writeln!(
        out,
        "{:<40} {:<20} {:<19} {:>10}  LAST USED",
        "REPOSITORY", "TAG", "DIGEST", "SIZE"
    )?;
    for img in inv.images(&store.usage) {
        let name = img.tag.as_ref().map_or_else(
            || "<untagged>".to_string(),
            |t| format!("{}/{}", t.upstream, t.repo),
        );
        let tag = img.tag.as_ref().map_or("-", |t| t.tag.as_str());
        let complete = if img.complete {
            ""
        } else {
            " (manifest not stored)"
        };
        let d = &img.digest;
        writeln!(
            out,
            "{:<40} {:<20} {:<19} {:>10}  {}{complete}",
            name,
            tag,
            format!("{}:{}", d.algorithm().as_str(), &d.hex()[..12]),
            human_size(img.size),
            img.last_used.map_or_else(|| "-".to_string(), when),
        )?;
    }
    writeln!(
        out,
        "{} blobs, {} manifests, {} tags, {} in all",
        inv.blobs.len(),
        inv.manifests.len(),
        inv.tags.len(),
        human_size(inv.total_bytes())
    )?;
    out.flush()?;
    Ok(())
}

/// `cache rm REF`: removes a tag (`upstream/repo:tag`) or an image (`upstream/repo@digest`),
/// with every blob no other image in the store references.
pub fn rm(t: &Target, reference: &str, out: &mut impl io::Write) -> Result<(), MaintenanceError> {
    let pin = config::parse_image_ref(reference).map_err(MaintenanceError::Usage)?;
    let upstream = t.upstream_name(&pin.upstream);
    run(async {
        let (store, inv) = t.open().await?;
        let (digest, named_tags): (Digest, Vec<_>) = match &pin.reference {
            Reference::Digest(d) => (d.clone(), Vec::new()),
            Reference::Tag(tag) => {
                let found = inv.tags.iter().find(|r| {
                    r.upstream == upstream && r.repo == pin.repo.as_str() && r.tag == tag.as_str()
                });
                let Some(found) = found else {
                    return Err(MaintenanceError::Usage(format!(
                        "{reference} is not in the store"
                    )));
                };
                (found.digest.clone(), vec![found.clone()])
            }
        };
        // Other tags still pointing at the image keep it: only this tag goes.
        let others = inv
            .tags
            .iter()
            .any(|r| r.digest == digest && !named_tags.contains(r));
        let plan = if others || !inv.blobs.contains_key(&digest) {
            Plan {
                tags: named_tags,
                ..Plan::default()
            }
        } else {
            remove_image(&inv, &digest)
        };
        if plan.tags.is_empty() && plan.blobs.is_empty() {
            return Err(MaintenanceError::Usage(format!(
                "{reference} is not in the store"
            )));
        }
        apply(&store, &plan).await?;
        writeln!(
            out,
            "removed {} tag(s), {} manifest(s), {} blob(s), {}",
            plan.tags.len(),
            plan.manifests.len(),
            plan.blobs.len(),
            human_size(plan.freed)
        )?;
        Ok(())
    })
}

/// The plan that removes one image: its closure, less what other images reference.
fn remove_image(inv: &Inventory, root: &Digest) -> Plan {
    let mut refs: HashMap<Digest, usize> = HashMap::new();
    for r in inv.roots() {
        for d in inv.closure(&r) {
            *refs.entry(d).or_insert(0) += 1;
        }
    }
    let mut p = Plan::default();
    for d in inv.closure(root) {
        let n = refs.entry(d.clone()).or_insert(1);
        *n -= 1;
        if *n == 0 {
            p.freed += inv.blobs.get(&d).map_or(0, |(s, _)| *s);
            if inv.manifests.contains_key(&d) {
                p.manifests.push(d.clone());
            }
            p.blobs.push(d);
        }
    }
    let gone: HashSet<&Digest> = p.manifests.iter().collect();
    p.tags = inv
        .tags
        .iter()
        .filter(|t| gone.contains(&t.digest))
        .cloned()
        .collect();
    p
}

/// `cache verify`: re-hashes every blob; corrupt ones move to `<root>/quarantine/` (with the
/// tags of corrupt manifests). Returns how many were corrupt.
pub fn verify(t: &Target, out: &mut impl io::Write) -> Result<usize, MaintenanceError> {
    run(async {
        let (store, inv) = t.open().await?;
        let quarantine = crate::cache::layout::quarantine_dir(&t.root);
        let mut digests: Vec<&Digest> = inv.blobs.keys().collect();
        digests.sort();
        let mut bad = Vec::new();
        let mut bytes = 0;
        // Several blobs read and hashed at once (in digest order all the same): one at a time
        // kept one core busy and left the disk waiting between files (issue 13).
        let budget = tokio::sync::Semaphore::new(VERIFY_BYTES_AT_ONCE / BUDGET_UNIT);
        let mut checked = futures_util::stream::iter(digests)
            .map(|d| {
                let size = inv.blobs[d].0;
                let store = &store;
                let budget = &budget;
                async move { io::Result::Ok((d, size, hash_stored(store, budget, d, size).await?)) }
            })
            .buffered(VERIFY_AT_ONCE);
        while let Some((d, size, actual)) = checked.try_next().await? {
            let Some(actual) = actual else {
                continue; // removed meanwhile
            };
            bytes += size;
            if actual != *d {
                // The corrupt bytes are kept aside for a look, then the blob goes.
                let dest = quarantine.join(format!("{}-{}", d.algorithm().as_str(), d.hex()));
                tokio::fs::create_dir_all(&quarantine).await?;
                if let Some(data) = store.blobs().read(d).await? {
                    tokio::fs::write(&dest, &data).await?;
                }
                store.blobs().delete(d).await?;
                writeln!(out, "corrupt: {d} → {}", dest.display())?;
                bad.push(d.clone());
            }
        }
        if !bad.is_empty() {
            let plan = Plan {
                tags: inv
                    .tags
                    .iter()
                    .filter(|t| bad.contains(&t.digest))
                    .cloned()
                    .collect(),
                manifests: bad
                    .iter()
                    .filter(|d| inv.manifests.contains_key(*d))
                    .cloned()
                    .collect(),
                ..Plan::default()
            };
            apply(&store, &plan).await?;
        }
        writeln!(
            out,
            "checked {} blobs ({}): {} corrupt{}",
            inv.blobs.len(),
            human_size(bytes),
            bad.len(),
            if bad.is_empty() { "" } else { ", quarantined" }
        )?;
        Ok(bad.len())
    })
}

/// Blobs `cache verify` reads and hashes at once.
const VERIFY_AT_ONCE: usize = 16;
/// Bytes `cache verify` holds in memory at once, across the blobs it checks side by side
/// (counted in units: a small blob takes one, a piece of 8 MiB 128), so large layers are not
/// held 16 pieces at a time.
const VERIFY_BYTES_AT_ONCE: usize = 64 << 20;
const BUDGET_UNIT: usize = 64 << 10;
/// How much of a blob `cache verify` reads at a time.
const PIECE: u64 = 8 << 20;
// A piece must fit in the budget, or its wait would never end.
const _: () = assert!(PIECE as usize <= VERIFY_BYTES_AT_ONCE);

/// The digest of a stored blob's bytes, read piece by piece (a bucket's blobs are never held
/// whole in memory) within `budget`; `None` when it is gone. Large pieces are hashed on the
/// blocking pool, so several blobs are hashed on several cores.
async fn hash_stored(
    store: &Store,
    budget: &tokio::sync::Semaphore,
    d: &Digest,
    size: u64,
) -> io::Result<Option<Digest>> {
    const HASHED_APART: usize = 64 << 10;
    let mut h = Hasher::new(d.algorithm());
    let mut off = 0;
    while off < size {
        let end = (off + PIECE).min(size);
        let units = ((end - off) as usize).div_ceil(BUDGET_UNIT) as u32;
        let _held = budget.acquire_many(units).await.map_err(io::Error::other)?;
        match store.blobs().read_range(d, off..end).await {
            Ok(Some(piece)) if piece.len() >= HASHED_APART => {
                h = tokio::task::spawn_blocking(move || {
                    h.update(&piece);
                    h
                })
                .await
                .map_err(io::Error::other)?;
            }
            Ok(Some(piece)) => h.update(&piece),
            Ok(None) => return Ok(None),
            // Shorter than listed: corrupt (a truncated file).
            Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => break,
            Err(e) => return Err(e),
        }
        off = end;
    }
    Ok(Some(h.finish()))
}

/// `cache gc`: evicts least recently used images (never pinned ones) down to `to` bytes, or
/// to the configured low-water mark.
pub fn gc(t: &Target, to: Option<u64>, out: &mut impl io::Write) -> Result<(), MaintenanceError> {
    let target = to
        .or_else(|| t.config.as_ref().and_then(|c| c.storage.low_water))
        .ok_or_else(|| {
            MaintenanceError::Usage(
                "give --to SIZE, or a configuration with storage.max_size".to_string(),
            )
        })?;
    run(async {
        let (store, inv) = t.open().await?;
        let total = inv.total_bytes();
        if total <= target {
            writeln!(out, "store is {}: nothing to do", human_size(total))?;
            return Ok(());
        }
        let mut pins = t
            .config
            .as_ref()
            .map(|c| c.pins.clone())
            .unwrap_or_default();
        pins.extend(store.recorded_pins().await?);
        let protected = evict::pinned(&inv, &pins, |u| t.upstream_name(u));
        let plan = evict::plan(
            &inv,
            total - target,
            evict::Recorded {
                usage: &store.usage,
                inv: &inv,
            },
            &protected,
        );
        apply(&store, &plan).await?;
        writeln!(
            out,
            "evicted {} blob(s), {} manifest(s), {} tag(s): {} → {}",
            plan.blobs.len(),
            plan.manifests.len(),
            plan.tags.len(),
            human_size(total),
            human_size(total - plan.freed)
        )?;
        Ok(())
    })
}

/// How a command finds the store: `--config` and/or `--root` (shared by `cache`, `export`
/// and `import`).
#[derive(Debug, Clone, clap::Args)]
pub struct StoreArgs {
    /// TOML configuration file: its storage.root, pins, low-water mark and upstream names.
    #[arg(long, short, value_name = "FILE", global = true)]
    pub config: Option<PathBuf>,
    /// Store directory; overrides the configuration's (default ./entrepot-data).
    #[arg(long, value_name = "DIR", global = true)]
    pub root: Option<PathBuf>,
}

impl StoreArgs {
    pub fn target(&self) -> Result<Target, config::ConfigError> {
        target(self.config.as_deref(), self.root.clone())
    }
}

/// The store folder: `--root`, else the configuration's, else the default.
pub fn target(config: Option<&Path>, root: Option<PathBuf>) -> Result<Target, config::ConfigError> {
    let config = config.map(Config::load).transpose()?;
    let root = root
        .or_else(|| config.as_ref().map(|c| c.storage.root.clone()))
        .unwrap_or_else(|| PathBuf::from(config::DEFAULT_ROOT));
    Ok(Target { root, config })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cache::layout;

    /// `cache verify` checks blobs side by side, large ones piece by piece within its byte
    /// budget: every corrupt blob is found (a large one corrupt only in its last piece too),
    /// quarantined and removed, and every sound one stays.
    #[test]
    fn verify_finds_every_corrupt_blob_among_many_checked_at_once() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        crate::cache::backend::fs::Fs::at(root).unwrap();
        let write = |content: &[u8], stored: &[u8]| {
            let d = Digest::sha256_of(content);
            let p = layout::path(root, &layout::blob(&d));
            std::fs::create_dir_all(p.parent().unwrap()).unwrap();
            std::fs::write(p, stored).unwrap();
            d
        };
        let (mut sound, mut corrupt) = (Vec::new(), Vec::new());
        for i in 0..200u32 {
            let content = format!("blob {i}").into_bytes();
            if i % 50 == 7 {
                corrupt.push(write(&content, b"something else"));
            } else {
                sound.push(write(&content, &content));
            }
        }
        // 20 MiB: three pieces; the flipped byte is in the last.
        let large: Vec<u8> = (0..20u32 << 20).map(|i| (i % 251) as u8).collect();
        sound.push(write(&large, &large));
        let mut bad = large.clone();
        bad.reverse();
        let mut flipped = bad.clone();
        *flipped.last_mut().unwrap() ^= 1;
        corrupt.push(write(&bad, &flipped));

        let target = Target {
            root: root.to_path_buf(),
            config: None,
        };
        let mut out = Vec::new();
        let found = verify(&target, &mut out).unwrap();
        let out = String::from_utf8(out).unwrap();
        assert_eq!(found, corrupt.len(), "{out}");
        for d in &corrupt {
            assert!(out.contains(&d.to_string()), "{d} not reported:\n{out}");
            assert!(!layout::path(root, &layout::blob(d)).exists());
        }
        for d in &sound {
            assert!(!out.contains(&d.to_string()), "{d} reported:\n{out}");
            assert!(layout::path(root, &layout::blob(d)).exists());
        }
    }
}
