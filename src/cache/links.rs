//! Who may read what (DESIGN.md): content is addressed by digest, but a read is scoped to
//! (upstream, repository). A digest is linked to a pair once that upstream served it, or
//! confirmed it has it, for that repository; a stored digest is served under another pair only
//! after its upstream confirms it there (one HEAD, then linked). So a layer fetched with
//! private credentials never leaks through a public name.
//!
//! One record per pair (`layout::links`): the digests, one per line. Records live in meta, so
//! they survive restarts and, on shared storage, every replica sees them. Two replicas adding
//! to one record at the same moment may lose one addition; the cost is one more HEAD later.

use std::collections::HashSet;
use std::io;
use std::sync::Arc;

use bytes::Bytes;

use super::backend::Meta;
use super::layout;
use crate::oci::{Digest, RepoName};

type Pair = (Arc<str>, RepoName);

pub struct Links {
    meta: Arc<dyn Meta>,
    mem: moka::sync::Cache<Pair, Arc<HashSet<Digest>>>,
    /// Serialises this process's read-modify-writes of records.
    write: tokio::sync::Mutex<()>,
}

/// Digests held in memory across all pairs (a few tens of MiB at most).
const MEM_DIGESTS: u64 = 1 << 20;

impl Links {
    pub fn new(meta: Arc<dyn Meta>) -> Links {
        Links {
            meta,
            mem: moka::sync::Cache::builder()
                .weigher(|_, s: &Arc<HashSet<Digest>>| (s.len() + 1).try_into().unwrap_or(u32::MAX))
                .max_capacity(MEM_DIGESTS)
                .build(),
            write: tokio::sync::Mutex::new(()),
        }
    }

    /// Is `digest` linked to (`upstream`, `repo`)? Memory first; a miss there reads the record
    /// (another replica, or a tool, may have linked it since).
    pub async fn has(
        &self,
        upstream: &Arc<str>,
        repo: &RepoName,
        digest: &Digest,
    ) -> io::Result<bool> {
        let pair = (upstream.clone(), repo.clone());
        if self.mem.get(&pair).is_some_and(|s| s.contains(digest)) {
            return Ok(true);
        }
        let set = self.load(upstream, repo).await?;
        let found = set.contains(digest);
        self.mem.insert(pair, set);
        Ok(found)
    }

    /// Links `digests` to (`upstream`, `repo`).
    pub async fn add(
        &self,
        upstream: &Arc<str>,
        repo: &RepoName,
        digests: impl IntoIterator<Item = Digest>,
    ) -> io::Result<()> {
        let pair = (upstream.clone(), repo.clone());
        let new: Vec<Digest> = digests.into_iter().collect();
        if let Some(s) = self.mem.get(&pair) {
            if new.iter().all(|d| s.contains(d)) {
                return Ok(());
            }
        }
        let _w = self.write.lock().await;
        let mut set = (*self.load(upstream, repo).await?).clone();
        let before = set.len();
        set.extend(new);
        if set.len() != before {
            let mut text = String::with_capacity(set.len() * 72);
            let mut sorted: Vec<&Digest> = set.iter().collect();
            sorted.sort();
            for d in sorted {
                text.push_str(&d.to_string());
                text.push('\n');
            }
            self.meta
                .put(&layout::links(upstream, repo), Bytes::from(text))
                .await?;
        }
        self.mem.insert(pair, Arc::new(set));
        Ok(())
    }

    /// Drops what memory holds (storage changed behind the server's back).
    pub fn forget_all(&self) {
        self.mem.invalidate_all();
    }

    async fn load(&self, upstream: &str, repo: &RepoName) -> io::Result<Arc<HashSet<Digest>>> {
        let text = self
            .meta
            .get(&layout::links(upstream, repo))
            .await?
            .unwrap_or_default();
        Ok(Arc::new(
            String::from_utf8_lossy(&text)
                .lines()
                .filter_map(|l| l.trim().parse().ok())
                .collect(),
        ))
    }
}

impl super::Store {
    /// Links every image in `images` (upstream, repository, root manifest) to its whole
    /// closure in the store: imported bundles and stores from before links existed.
    pub async fn link_images(
        &self,
        images: impl IntoIterator<Item = (Arc<str>, RepoName, Digest)>,
    ) -> io::Result<usize> {
        let inv = super::inventory::Inventory::load(self).await?;
        let mut n = 0;
        for (up, repo, root) in images {
            self.links.add(&up, &repo, inv.closure(&root)).await?;
            n += 1;
        }
        Ok(n)
    }

    /// A store written before reads were scoped has tags but no links: link every tagged
    /// image to its repository once, so what it served before it still serves (offline too).
    pub async fn link_existing_tags(&self) -> io::Result<()> {
        if self.meta().get(layout::LINKS_READY).await?.is_some() {
            return Ok(());
        }
        let inv = super::inventory::Inventory::load(self).await?;
        let images: Vec<(Arc<str>, RepoName, Digest)> = inv
            .tags
            .iter()
            .filter_map(|t| {
                Some((
                    Arc::from(t.upstream.as_str()),
                    t.repo.parse().ok()?,
                    t.digest.clone(),
                ))
            })
            .collect();
        for (up, repo, root) in &images {
            self.links.add(up, repo, inv.closure(root)).await?;
        }
        if !images.is_empty() {
            tracing::info!(
                images = images.len(),
                "linked the store's tagged images to their repositories"
            );
        }
        self.meta()
            .put(layout::LINKS_READY, Bytes::from_static(b"1\n"))
            .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cache::backend::memory::Memory;

    #[tokio::test]
    async fn links_are_per_pair_and_survive_a_new_index_over_the_same_records() {
        let meta: Arc<dyn Meta> = Arc::new(Memory::default());
        let links = Links::new(meta.clone());
        let (a, b): (Arc<str>, Arc<str>) = ("a".into(), "b".into());
        let x: RepoName = "team/x".parse().unwrap();
        let y: RepoName = "team/y".parse().unwrap();
        let d = Digest::sha256_of(b"layer");
        assert!(!links.has(&a, &x, &d).await.unwrap());
        links.add(&a, &x, [d.clone()]).await.unwrap();
        assert!(links.has(&a, &x, &d).await.unwrap());
        assert!(!links.has(&a, &y, &d).await.unwrap(), "another repository");
        assert!(!links.has(&b, &x, &d).await.unwrap(), "another upstream");

        // Another replica (a second index on the same meta) sees the link and adds its own.
        let other = Links::new(meta.clone());
        assert!(other.has(&a, &x, &d).await.unwrap());
        let e = Digest::sha256_of(b"config");
        other.add(&a, &x, [e.clone()]).await.unwrap();
        // The first finds it by reading the record again on a miss.
        assert!(links.has(&a, &x, &e).await.unwrap());
        assert!(links.has(&a, &x, &d).await.unwrap());
    }
}
