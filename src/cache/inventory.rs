//! What is on disk, read straight from the store folder: blobs with their sizes and times,
//! stored manifests with the digests they reference, and tag records. Used by eviction, the
//! periodic sweep and the `entrepot cache` commands (which work on the folder directly).

use std::collections::{HashMap, HashSet};
use std::io;
use std::path::{Path, PathBuf};
use std::time::UNIX_EPOCH;

use crate::oci::Digest;

/// One tag record on disk.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TagRef {
    pub upstream: String,
    pub repo: String,
    pub tag: String,
    pub digest: Digest,
    pub path: PathBuf,
}

#[derive(Debug, Default)]
pub struct Inventory {
    /// Every blob (layers, configs, manifests): size and modification (commit) time in Unix
    /// milliseconds.
    pub blobs: HashMap<Digest, (u64, u64)>,
    /// Stored manifests (media type recorded and bytes present) → the digests they reference.
    pub manifests: HashMap<Digest, Vec<Digest>>,
    pub tags: Vec<TagRef>,
    /// Media-type records whose manifest bytes are gone.
    pub dangling_manifest_meta: Vec<PathBuf>,
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

fn read_dir_names(dir: &Path) -> io::Result<Vec<(String, std::fs::DirEntry)>> {
    match std::fs::read_dir(dir) {
        Ok(rd) => Ok(rd
            .filter_map(|e| e.ok())
            .map(|e| (e.file_name().to_string_lossy().into_owned(), e))
            .collect()),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(Vec::new()),
        Err(e) => Err(e),
    }
}

/// Reads the store at `root`. Blocking: run it on the blocking pool.
pub fn scan(root: &Path) -> io::Result<Inventory> {
    let mut inv = Inventory::default();
    for alg in ["sha256", "sha512"] {
        for (name, entry) in read_dir_names(&root.join("blobs").join(alg))? {
            let Ok(digest) = format!("{alg}:{name}").parse::<Digest>() else {
                continue;
            };
            let Ok(meta) = entry.metadata() else { continue };
            let mtime = meta
                .modified()
                .ok()
                .and_then(|t| t.duration_since(UNIX_EPOCH).ok())
                .map_or(0, |d| d.as_millis() as u64);
            inv.blobs.insert(digest, (meta.len(), mtime));
        }
        for (name, entry) in read_dir_names(&root.join("meta/manifests").join(alg))? {
            let Ok(digest) = format!("{alg}:{name}").parse::<Digest>() else {
                continue;
            };
            let blob = root.join("blobs").join(alg).join(&name);
            match std::fs::read(&blob) {
                Ok(body) => {
                    inv.manifests.insert(digest, references(&body));
                }
                Err(e) if e.kind() == io::ErrorKind::NotFound => {
                    inv.dangling_manifest_meta.push(entry.path());
                }
                Err(e) => return Err(e),
            }
        }
    }
    let tags_root = root.join("meta/tags");
    for (upstream, entry) in read_dir_names(&tags_root)? {
        if entry.file_type().is_ok_and(|t| t.is_dir()) {
            scan_tags(&entry.path(), &upstream, &mut Vec::new(), &mut inv.tags)?;
        }
    }
    inv.tags
        .sort_by(|a, b| (&a.upstream, &a.repo, &a.tag).cmp(&(&b.upstream, &b.repo, &b.tag)));
    Ok(inv)
}

/// Walks `<upstream>/<repo components...>/_tags/<tag>`.
fn scan_tags(
    dir: &Path,
    upstream: &str,
    repo: &mut Vec<String>,
    out: &mut Vec<TagRef>,
) -> io::Result<()> {
    for (name, entry) in read_dir_names(dir)? {
        if !entry.file_type().is_ok_and(|t| t.is_dir()) {
            continue;
        }
        if name == "_tags" {
            for (tag, file) in read_dir_names(&entry.path())? {
                #[derive(serde::Deserialize)]
                struct Rec {
                    digest: String,
                }
                let Ok(text) = std::fs::read(file.path()) else {
                    continue;
                };
                let Some(digest) = serde_json::from_slice::<Rec>(&text)
                    .ok()
                    .and_then(|r| r.digest.parse().ok())
                else {
                    continue;
                };
                out.push(TagRef {
                    upstream: upstream.to_string(),
                    repo: repo.join("/"),
                    tag,
                    digest,
                    path: file.path(),
                });
            }
        } else {
            repo.push(name);
            scan_tags(&entry.path(), upstream, repo, out)?;
            repo.pop();
        }
    }
    Ok(())
}
