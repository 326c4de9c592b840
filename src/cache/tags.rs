//! The tag index: (upstream, repository, tag) → digest, media type, size and when it was last
//! confirmed by the upstream. Kept in memory and persisted as one small JSON record per tag,
//! so it survives restarts and the cache can answer tags with every upstream down.

use std::collections::HashMap;
use std::io;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use tokio::time::Instant;

use super::backend::Meta;
use super::journal::{Entry, Journal};
use super::layout;
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

/// A tag's record (`layout::tag`).
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct TagRecord {
    pub digest: String,
    pub media_type: String,
    pub size: u64,
    /// Unix seconds.
    pub fetched_at: u64,
}

fn unix_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_secs()
}

type Key = (Arc<str>, RepoName, Tag);

pub struct TagIndex {
    meta: Arc<dyn Meta>,
    clock: Clock,
    journal: Arc<Journal>,
    mem: Mutex<HashMap<Key, TagEntry>>,
}

impl TagIndex {
    pub fn new(meta: Arc<dyn Meta>, clock: Clock, journal: Arc<Journal>) -> TagIndex {
        TagIndex {
            meta,
            clock,
            journal,
            mem: Mutex::new(HashMap::new()),
        }
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

    /// Drops every mapping from memory (storage changed behind the server's back).
    pub fn forget_all(&self) {
        self.mem.lock().unwrap().clear();
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
        let text = match self.meta.get(&layout::tag(upstream, repo, tag)).await {
            Ok(t) => t?,
            Err(e) => {
                tracing::warn!(upstream = %upstream, repository = %repo, tag = %tag, error = %e, "could not read a tag record");
                return None;
            }
        };
        let rec: TagRecord = match serde_json::from_slice(&text) {
            Ok(r) => r,
            Err(e) => {
                tracing::warn!(upstream = %upstream, repository = %repo, tag = %tag, error = %e, "ignoring unreadable tag record");
                return None;
            }
        };
        let age = Duration::from_secs(unix_secs().saturating_sub(rec.fetched_at));
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
            fetched_at: unix_secs(),
        };
        let key = (upstream.clone(), repo.clone(), tag.clone());
        let known = self.mem.lock().unwrap().get(&key).map(|e| e.digest.clone());
        let previous = match known {
            Some(d) => Some(d),
            None => self.get(upstream, repo, tag).await.map(|e| e.digest),
        };
        let moved = previous.as_ref() != Some(&entry.digest);
        self.mem.lock().unwrap().insert(key, entry.clone());
        let json = serde_json::to_vec(&rec).map_err(io::Error::other)?;
        self.meta
            .put(&layout::tag(upstream, repo, tag), Bytes::from(json))
            .await?;
        if moved {
            self.journal
                .append(Entry::Tag {
                    upstream: upstream.to_string(),
                    repo: repo.to_string(),
                    tag: tag.to_string(),
                    digest: entry.digest.to_string(),
                    media_type: entry.media_type.clone(),
                    size,
                })
                .await?;
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
        let journal = Arc::new(Journal::open(dir.path()).unwrap());
        let meta: Arc<dyn Meta> = Arc::new(crate::cache::backend::memory::Memory::default());
        let idx = TagIndex::new(meta.clone(), Clock::default(), journal.clone());
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

        // A new index over the same records (a restart) finds the mapping.
        let again = TagIndex::new(meta, Clock::default(), journal.clone());
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
