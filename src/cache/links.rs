//! Who may read what (DESIGN.md): content is addressed by digest, but a read is scoped to
//! (upstream, repository). A digest is linked to a pair once that upstream served it, or
//! confirmed it has it, for that repository; a stored digest is served under another pair only
//! after its upstream confirms it there (one HEAD, then linked). So a layer fetched with
//! private credentials never leaks through a public name.
//!
//! One empty record per link (`layout::link`). Records live in meta, so they survive restarts
//! and, on shared storage, every replica sees them; writing one never rewrites another.

use std::io;
use std::sync::Arc;

use bytes::Bytes;

use super::backend::Meta;
use super::layout;
use crate::oci::{Digest, RepoName};

type Link = (Arc<str>, RepoName, Digest);

pub struct Links {
    meta: Arc<dyn Meta>,
    /// Links known to exist (absence is always read again: another replica may add it).
    mem: moka::sync::Cache<Link, ()>,
}

/// Links held in memory.
const MEM_LINKS: u64 = 1 << 20;

impl Links {
    pub fn new(meta: Arc<dyn Meta>) -> Links {
        Links {
            meta,
            mem: moka::sync::Cache::new(MEM_LINKS),
        }
    }

    /// Is `digest` linked to (`upstream`, `repo`)? Memory first, then its record.
    pub async fn has(
        &self,
        upstream: &Arc<str>,
        repo: &RepoName,
        digest: &Digest,
    ) -> io::Result<bool> {
        let link = (upstream.clone(), repo.clone(), digest.clone());
        if self.mem.contains_key(&link) {
            return Ok(true);
        }
        let found = self
            .meta
            .get(&layout::link(upstream, repo, digest))
            .await?
            .is_some();
        if found {
            self.mem.insert(link, ());
        }
        Ok(found)
    }

    /// Links `digests` to (`upstream`, `repo`): one record each, so replicas adding links at
    /// the same moment never undo each other's.
    pub async fn add(
        &self,
        upstream: &Arc<str>,
        repo: &RepoName,
        digests: impl IntoIterator<Item = Digest>,
    ) -> io::Result<()> {
        for d in digests {
            let link = (upstream.clone(), repo.clone(), d);
            if self.mem.contains_key(&link) {
                continue;
            }
            self.meta
                .put(&layout::link(upstream, repo, &link.2), Bytes::new())
                .await?;
            self.mem.insert(link, ());
        }
        Ok(())
    }

    /// Drops what memory holds (storage changed behind the server's back).
    pub fn forget_all(&self) {
        self.mem.invalidate_all();
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
