//! The store's layout: every key (an object key under S3, a path under the store root on
//! disk) is spelled here and nowhere else.
//!
//! ```text
//! blobs/<alg>/<hex>                         verified content (layers, configs, manifests)
//! meta/manifests/<alg>/<hex>                a stored manifest's media type
//! meta/tags/<upstream>/<repo>/_tags/<tag>   tag → digest, media type, size, fetched-at
//! meta/pins                                 pins recorded by prefetch and import
//! meta/access                               last use of each blob (use stamps)
//! meta/access/<replica>                     the same, one record per replica (shared storage)
//! meta/journal                              commits, one JSON line each (a folder store)
//! meta/journal/<ms>-<writer>-<n>            commits, one object each (shared storage)
//! meta/generation                           bumped by tools that remove content
//! meta/uploads/<id>                         multipart uploads in progress (shared storage)
//! ```
//!
//! Local to one process (never in an object store): `tmp/` (fills in progress, emptied at
//! start-up), `lock`, and `quarantine/` (blobs `cache verify` found corrupt).
//!
//! Keys are built only from validated names (digests, repository names, tags, upstream names),
//! which cannot contain `..`, empty components or a leading `/`, so no key escapes the store.
//! `_tags` cannot be a repository component (components start with a letter or digit).

use std::path::{Path, PathBuf};

use crate::oci::{Digest, RepoName, Tag};

pub const BLOBS: &str = "blobs/";
pub const MANIFESTS: &str = "meta/manifests/";
pub const TAGS: &str = "meta/tags/";
pub const PINS: &str = "meta/pins";
pub const ACCESS: &str = "meta/access";
/// Shared storage: one use-stamp record per replica, merged when read.
pub const ACCESS_BY_REPLICA: &str = "meta/access/";
pub const JOURNAL: &str = "meta/journal";
/// Shared storage's journal: one object per entry.
pub const JOURNAL_ENTRIES: &str = "meta/journal/";
pub const GENERATION: &str = "meta/generation";
pub const UPLOADS: &str = "meta/uploads/";

const TAGS_FOLDER: &str = "/_tags/";

/// `blobs/<alg>/<hex>`
pub fn blob(d: &Digest) -> String {
    format!("{BLOBS}{}/{}", d.algorithm().as_str(), d.hex())
}

/// `meta/manifests/<alg>/<hex>`: present once a manifest is stored (bytes first).
pub fn manifest_type(d: &Digest) -> String {
    format!("{MANIFESTS}{}/{}", d.algorithm().as_str(), d.hex())
}

/// `meta/tags/<upstream>/<repo>/_tags/<tag>`
pub fn tag(upstream: &str, repo: &RepoName, tag: &Tag) -> String {
    format!("{TAGS}{upstream}/{repo}{TAGS_FOLDER}{tag}")
}

/// `meta/uploads/<id>`: the record of a multipart upload in progress (`id` hex-encoded).
pub fn upload(id_hex: &str) -> String {
    format!("{UPLOADS}{id_hex}")
}

/// `meta/journal/<unix ms>-<writer>-<n>`: one entry of a shared journal; keys sort by time.
pub fn journal_entry(unix_ms: u64, writer: &str, n: u64) -> String {
    format!("{JOURNAL_ENTRIES}{unix_ms:013}-{writer}-{n}")
}

/// The time (Unix ms) in a shared journal entry's key.
pub fn journal_entry_time(key: &str) -> Option<u64> {
    key.strip_prefix(JOURNAL_ENTRIES)?
        .split('-')
        .next()?
        .parse()
        .ok()
}

/// The digest a `blobs/...` or `meta/manifests/...` key names.
pub fn parse_digest_key(key: &str) -> Option<Digest> {
    let rest = key
        .strip_prefix(BLOBS)
        .or_else(|| key.strip_prefix(MANIFESTS))?;
    let (alg, hex) = rest.split_once('/')?;
    format!("{alg}:{hex}").parse().ok()
}

/// `(upstream, repository, tag)` of a tag key.
pub fn parse_tag_key(key: &str) -> Option<(String, RepoName, Tag)> {
    let rest = key.strip_prefix(TAGS)?;
    let (upstream, rest) = rest.split_once('/')?;
    let (repo, tag) = rest.rsplit_once(TAGS_FOLDER)?;
    Some((upstream.to_owned(), repo.parse().ok()?, tag.parse().ok()?))
}

/// Where a key lives under a store folder.
pub fn path(root: &Path, key: &str) -> PathBuf {
    root.join(key)
}

/// Fills in progress and other files being written (same file system as `blobs/`, so a commit
/// is a rename).
pub fn tmp_dir(root: &Path) -> PathBuf {
    root.join("tmp")
}

/// `meta/access/<replica>`
pub fn access_of(replica: &str) -> String {
    format!("{ACCESS_BY_REPLICA}{replica}")
}

/// This replica's name for itself in shared storage, kept in its local root.
pub fn replica_id_file(root: &Path) -> PathBuf {
    root.join("replica-id")
}

/// The lock one process holds on a store folder.
pub fn lock_file(root: &Path) -> PathBuf {
    root.join("lock")
}

/// Where `cache verify` moves blobs that do not match their digest.
pub fn quarantine_dir(root: &Path) -> PathBuf {
    root.join("quarantine")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_round_trip() {
        let d = Digest::sha256_of(b"x");
        assert_eq!(blob(&d), format!("blobs/sha256/{}", d.hex()));
        assert_eq!(parse_digest_key(&blob(&d)), Some(d.clone()));
        assert_eq!(parse_digest_key(&manifest_type(&d)), Some(d.clone()));
        assert_eq!(parse_digest_key("blobs/md5/abc"), None);
        assert_eq!(parse_digest_key("meta/pins"), None);

        let repo: RepoName = "library/alpine".parse().unwrap();
        let t: Tag = "3.20".parse().unwrap();
        let key = tag("docker.io", &repo, &t);
        assert_eq!(key, "meta/tags/docker.io/library/alpine/_tags/3.20");
        assert_eq!(parse_tag_key(&key), Some(("docker.io".into(), repo, t)));
        assert_eq!(parse_tag_key("meta/tags/u/_tags/x"), None);
    }
}
