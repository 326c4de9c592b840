//! What the store holds, listed through its backends: blobs with their sizes and commit times,
//! stored manifests with the digests they reference, and tag records. Used by eviction, the
//! periodic sweep and the `entrepot cache` commands; never on a request's path.

use std::collections::{HashMap, HashSet};
use std::io;

use super::{layout, Store};
use crate::oci::Digest;

/// One tag record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TagRef {
    pub upstream: String,
    pub repo: String,
    pub tag: String,
    pub digest: Digest,
    /// Its key (`layout::tag`).
    pub key: String,
}

#[derive(Debug, Default)]
pub struct Inventory {
    /// Every blob (layers, configs, manifests): size and commit time in Unix milliseconds.
    pub blobs: HashMap<Digest, (u64, u64)>,
    /// Stored manifests (media type recorded and bytes present) → the digests they reference.
    pub manifests: HashMap<Digest, Vec<Digest>>,
    pub tags: Vec<TagRef>,
    /// Media-type records (keys) whose manifest bytes are gone.
    pub dangling_manifest_meta: Vec<String>,
}

impl Inventory {
    pub fn total_bytes(&self) -> u64 {
        self.blobs.values().map(|(s, _)| s).sum()
    }

    /// `root` and everything it references, transitively, that is in the store.
    pub fn closure(&self, root: &Digest) -> HashSet<Digest> {
        let mut seen = HashSet::new();
        let mut stack = vec![root.clone()];
        while let Some(d) = stack.pop() {
            if !self.blobs.contains_key(&d) || !seen.insert(d.clone()) {
                continue;
            }
            if let Some(children) = self.manifests.get(&d) {
                stack.extend(children.iter().cloned());
            }
        }
        seen
    }

    /// Manifests no other stored manifest references: the images (an index with its platform
    /// manifests, or a single manifest).
    pub fn roots(&self) -> Vec<Digest> {
        let referenced: HashSet<&Digest> = self.manifests.values().flatten().collect();
        let mut roots: Vec<Digest> = self
            .manifests
            .keys()
            .filter(|d| !referenced.contains(d) && self.blobs.contains_key(*d))
            .cloned()
            .collect();
        roots.sort();
        roots
    }
}

/// One image as `entrepot cache ls` and the status page list it: a tag, or a stored image no
/// tag points at.
#[derive(Debug, Clone)]
pub struct ImageRow {
    /// `None`: untagged.
    pub tag: Option<TagRef>,
    pub digest: Digest,
    /// The bytes of its closure that are in the store.
    pub size: u64,
    /// The latest use of any of its parts (a use stamp); `None` when nothing of it is stored.
    pub last_used: Option<u64>,
    /// Its manifest is stored (a tag can outlive it).
    pub complete: bool,
}

impl Inventory {
    /// Every tag with its image, then every image no tag points at.
    pub fn images(&self, usage: &super::usage::Usage) -> Vec<ImageRow> {
        let row = |tag: Option<TagRef>, d: &Digest| {
            let closure = self.closure(d);
            ImageRow {
                size: closure
                    .iter()
                    .filter_map(|x| self.blobs.get(x))
                    .map(|(s, _)| s)
                    .sum(),
                last_used: closure.iter().map(|x| usage.last_use_in(self, x)).max(),
                complete: self.manifests.contains_key(d),
                tag,
                digest: d.clone(),
            }
        };
        let mut out: Vec<ImageRow> = self
            .tags
            .iter()
            .map(|t| row(Some(t.clone()), &t.digest))
            .collect();
        let tagged: HashSet<&Digest> = self.tags.iter().map(|t| &t.digest).collect();
        for root in self.roots() {
            if !tagged.contains(&root) {
                out.push(row(None, &root));
            }
        }
        out
    }
}

/// The digests a manifest or index references: config, layers, platform manifests (and
/// schema 1's fsLayers). `subject` is not followed: a signature does not own its image.
pub fn references(body: &[u8]) -> Vec<Digest> {
    let Ok(v) = serde_json::from_slice::<serde_json::Value>(body) else {
        return Vec::new();
    };
    let mut out = Vec::new();
    let mut push = |d: Option<&serde_json::Value>| {
        if let Some(d) = d.and_then(|d| d.as_str()).and_then(|d| d.parse().ok()) {
            out.push(d);
        }
    };
    push(v.get("config").and_then(|c| c.get("digest")));
    for key in ["layers", "manifests", "blobs"] {
        for item in v.get(key).and_then(|l| l.as_array()).into_iter().flatten() {
            push(item.get("digest"));
        }
    }
    for item in v
        .get("fsLayers")
        .and_then(|l| l.as_array())
        .into_iter()
        .flatten()
    {
        push(item.get("blobSum"));
    }
    out
}

impl Inventory {
    /// Lists the store. Blobs first, then manifest records (a manifest's bytes are stored
    /// before its record, so a record seen later is never mistaken for a dangling one), then
    /// tags.
    pub async fn load(store: &Store) -> io::Result<Inventory> {
        let mut inv = Inventory::default();
        let listed = store.blobs().list().await?;
        // Sized once: growing a table of a million blobs by doubling holds the old table and
        // the new one at once, several times over (issue 13).
        inv.blobs.reserve(listed.len());
        for b in listed {
            inv.blobs.insert(b.digest, (b.size, b.committed_ms));
        }
        for key in store.meta().list(layout::MANIFESTS).await? {
            let Some(digest) = layout::parse_digest_key(&key) else {
                continue;
            };
            match store.blobs().read(&digest).await? {
                Some(body) => {
                    inv.manifests.insert(digest, references(&body));
                }
                None => inv.dangling_manifest_meta.push(key),
            }
        }
        for key in store.meta().list(layout::TAGS).await? {
            let Some((upstream, repo, tag)) = layout::parse_tag_key(&key) else {
                continue;
            };
            #[derive(serde::Deserialize)]
            struct Rec {
                digest: String,
            }
            let Some(text) = store.meta().get(&key).await? else {
                continue; // removed meanwhile
            };
            let Some(digest) = serde_json::from_slice::<Rec>(&text)
                .ok()
                .and_then(|r| r.digest.parse().ok())
            else {
                continue;
            };
            inv.tags.push(TagRef {
                upstream,
                repo: repo.to_string(),
                tag: tag.to_string(),
                digest,
                key,
            });
        }
        inv.tags
            .sort_by(|a, b| (&a.upstream, &a.repo, &a.tag).cmp(&(&b.upstream, &b.repo, &b.tag)));
        Ok(inv)
    }
}
