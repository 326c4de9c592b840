//! The tag index: (upstream, repository, tag) → digest, media type, size and when it was last
//! confirmed by the upstream. Kept in memory and persisted as one small JSON file per tag, so
//! it survives restarts and the cache can answer tags with every upstream down.

use std::collections::HashMap;
use std::io;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use tokio::time::Instant;

use super::journal::{Entry, Journal};
use super::temp;
use crate::clock::Clock;
use crate::oci::{Digest, RepoName, Tag};

#[derive(Debug, Clone)]
pub struct TagEntry {
    pub digest: Digest,
    pub media_type: String,
    pub size: u64,
    /// When the upstream last confirmed this mapping (on the store's clock).
    pub fetched: Instant,
}

/// A tag's file: `meta/tags/<upstream>/<repo>/_tags/<tag>`.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct TagRecord {
    pub digest: String,
    pub media_type: String,
    pub size: u64,
    /// Unix seconds.
    pub fetched_at: u64,
}

/// Where a tag's record lives. Validated names and tags cannot escape the folder, and `_tags`
/// cannot be a repository component (components start with a letter or digit).
pub fn record_path(root: &std::path::Path, upstream: &str, repo: &RepoName, tag: &Tag) -> PathBuf {
    root.join("meta/tags")
        .join(upstream)
        .join(repo.as_str())
        .join("_tags")
        .join(tag.as_str())
}

/// Writes a tag record atomically, for tools that work on the store folder (`import`).
/// Blocking.
pub fn write_record(
    root: &std::path::Path,
    upstream: &str,
    repo: &RepoName,
    tag: &Tag,
    rec: &TagRecord,
) -> io::Result<()> {
    let dest = record_path(root, upstream, repo, tag);
    if let Some(parent) = dest.parent() {
        std::fs::create_dir_all(parent)?;
    }
    let tmp = root.join("tmp").join(format!(
        "tag-record.{}.{}",
        std::process::id(),
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default()
            .as_nanos()
    ));
    std::fs::write(&tmp, serde_json::to_vec(rec).map_err(io::Error::other)?)?;
    std::fs::rename(&tmp, &dest)
}

type Key = (Arc<str>, RepoName, Tag);

pub struct TagIndex {
    dir: PathBuf,
    tmp: PathBuf,
    clock: Clock,
    journal: Arc<Journal>,
    mem: Mutex<HashMap<Key, TagEntry>>,
}

impl TagIndex {
    pub fn new(dir: PathBuf, tmp: PathBuf, clock: Clock, journal: Arc<Journal>) -> TagIndex {
        TagIndex {
            dir,
            tmp,
            clock,
            journal,
            mem: Mutex::new(HashMap::new()),
        }
    }

    fn path(&self, upstream: &str, repo: &RepoName, tag: &Tag) -> PathBuf {
        // Validated names and tags cannot escape this folder, and `_tags` cannot be a
        // repository component (components start with a letter or digit).
        self.dir
            .join(upstream)
            .join(repo.as_str())
            .join("_tags")
            .join(tag.as_str())
    }

    /// Drops a mapping from memory (its file is removed by the caller).
    pub fn forget(&self, upstream: &str, repo: &str, tag: &str) {
        let (Ok(repo), Ok(tag)) = (repo.parse::<RepoName>(), tag.parse::<Tag>()) else {
            return;
        };
        self.mem
            .lock()
            .unwrap()
            .remove(&(Arc::from(upstream), repo, tag));
    }

    /// Is this entry still within `ttl` of its last confirmation?
    pub fn is_fresh(&self, entry: &TagEntry, ttl: Duration) -> bool {
        self.clock.now().saturating_duration_since(entry.fetched) < ttl
    }

    pub async fn get(&self, upstream: &Arc<str>, repo: &RepoName, tag: &Tag) -> Option<TagEntry> {
        let key = (upstream.clone(), repo.clone(), tag.clone());
        if let Some(e) = self.mem.lock().unwrap().get(&key) {
            return Some(e.clone());
        }
        let text = tokio::fs::read(self.path(upstream, repo, tag)).await.ok()?;
        let rec: TagRecord = match serde_json::from_slice(&text) {
            Ok(r) => r,
            Err(e) => {
                tracing::warn!(upstream = %upstream, repository = %repo, tag = %tag, error = %e, "ignoring unreadable tag record");
                return None;
            }
        };
        let now_unix = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default()
            .as_secs();
        let age = Duration::from_secs(now_unix.saturating_sub(rec.fetched_at));
        let now = self.clock.now();
        let entry = TagEntry {
            digest: rec.digest.parse().ok()?,
            media_type: rec.media_type,
            size: rec.size,
            fetched: now.checked_sub(age).unwrap_or(now),
        };
        self.mem.lock().unwrap().insert(key, entry.clone());
        Some(entry)
    }

    /// Records that the upstream says `tag` is `digest` now.
    pub async fn put(
        &self,
        upstream: &Arc<str>,
        repo: &RepoName,
        tag: &Tag,
        digest: Digest,
        media_type: String,
        size: u64,
    ) -> io::Result<TagEntry> {
        let entry = TagEntry {
            digest,
            media_type,
            size,
            fetched: self.clock.now(),
        };
        let rec = TagRecord {
            digest: entry.digest.to_string(),
            media_type: entry.media_type.clone(),
            size,
            fetched_at: SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .unwrap_or_default()
                .as_secs(),
        };
        let key = (upstream.clone(), repo.clone(), tag.clone());
        let moved = self
            .mem
            .lock()
            .unwrap()
            .insert(key, entry.clone())
            .is_none_or(|old| old.digest != entry.digest);
        let json = serde_json::to_vec(&rec).map_err(io::Error::other)?;
        temp::write_atomic(
            &self.tmp,
            "tag",
            self.path(upstream, repo, tag),
            Bytes::from(json),
        )
        .await?;
        if moved {
            self.journal.append(Entry::Tag {
                upstream: upstream.to_string(),
                repo: repo.to_string(),
                tag: tag.to_string(),
                digest: entry.digest.to_string(),
                media_type: entry.media_type.clone(),
                size,
            })?;
        }
        Ok(entry)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn freshness_follows_the_paused_clock_and_survives_reload() {
        let dir = tempfile::tempdir().unwrap();
        let tmp = dir.path().join("tmp");
        std::fs::create_dir_all(&tmp).unwrap();
        std::fs::create_dir_all(dir.path().join("meta")).unwrap();
        let journal = Arc::new(Journal::open(dir.path()).unwrap());
        let idx = TagIndex::new(
            dir.path().join("tags"),
            tmp.clone(),
            Clock::default(),
            journal.clone(),
        );
        let up: Arc<str> = "docker.io".into();
        let repo: RepoName = "library/alpine".parse().unwrap();
        let tag: Tag = "3.20".parse().unwrap();
        let d = Digest::sha256_of(b"m");
        let e = idx
            .put(&up, &repo, &tag, d.clone(), "x/y".into(), 1)
            .await
            .unwrap();
        let ttl = Duration::from_secs(300);
        assert!(idx.is_fresh(&e, ttl));
        tokio::time::advance(Duration::from_secs(299)).await;
        assert!(idx.is_fresh(&e, ttl));
        tokio::time::advance(Duration::from_secs(2)).await;
        assert!(!idx.is_fresh(&e, ttl));

        // A new index over the same folder (a restart) finds the mapping.
        let again = TagIndex::new(
            dir.path().join("tags"),
            tmp,
            Clock::default(),
            journal.clone(),
        );
        assert_eq!(journal.last_seq(), 1, "one tag recorded");
        let e2 = again.get(&up, &repo, &tag).await.unwrap();
        assert_eq!(e2.digest, d);
        assert_eq!(e2.media_type, "x/y");
        assert!(again
            .get(&up, &repo, &"other".parse().unwrap())
            .await
            .is_none());
    }
}
