//! The referrers index: for (upstream, repository, subject digest), the upstream's last answer
//! to `GET /v2/<repo>/referrers/<subject>` and when it was fetched. The answer is an image
//! index, stored like any manifest (content-addressed, so it is served byte for byte and its
//! referrers are its children for eviction and export), or "this upstream has no referrers
//! API" (it answered 404). Kept in memory and persisted as one small JSON record per subject
//! (`layout::referrers`), so it survives restarts and answers with the upstream gone.

use std::io;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use tokio::time::Instant;

use super::backend::Meta;
use super::layout;
use crate::clock::Clock;
use crate::oci::{Digest, RepoName, Tag};

/// What the upstream said the referrers of a subject are.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ReferrersAnswer {
    /// This image index (a stored manifest), exactly as the upstream sent it (or, when it
    /// paged its answer, the pages joined into one index).
    Index(Digest),
    /// 404: no referrers API there. Clients then read the `sha256-<hex>` tag schema themselves.
    Unsupported,
}

#[derive(Debug, Clone)]
pub struct ReferrersEntry {
    pub answer: ReferrersAnswer,
    /// When the upstream last gave this answer (on the store's clock).
    pub fetched: Instant,
}

/// A subject's record (`layout::referrers`).
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
struct Record {
    #[serde(flatten)]
    answer: RecordAnswer,
    /// Unix seconds.
    fetched_at: u64,
}

#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
#[serde(tag = "answer", rename_all = "snake_case")]
enum RecordAnswer {
    Index { digest: String },
    Unsupported,
}

type Key = (Arc<str>, RepoName, Digest);

/// Refreshes of different subjects that hash alike wait for each other; a refresh is one small
/// upstream GET, so a few stripes are plenty.
const STRIPES: usize = 16;

pub struct Referrers {
    meta: Arc<dyn Meta>,
    clock: Clock,
    mem: moka::sync::Cache<Key, ReferrersEntry>,
    /// One refresh of a subject at a time, so concurrent cold clients cost one upstream GET.
    refreshing: [tokio::sync::Mutex<()>; STRIPES],
}

fn unix_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_secs()
}

/// The referrers tag schema's tag for `subject` (distribution spec, "Referrers Tag Schema"):
/// the algorithm cut to 32 characters, `-`, the hex cut to 64. What it names is an image index
/// like the referrers API's answer, kept by clients of registries without that API.
pub fn tag_schema(subject: &Digest) -> Tag {
    let alg = subject.algorithm().as_str();
    let hex = subject.hex();
    format!(
        "{}-{}",
        &alg[..alg.len().min(32)],
        &hex[..hex.len().min(64)]
    )
    .parse()
    .expect("an algorithm name and hex make a valid tag")
}

impl Referrers {
    pub fn new(meta: Arc<dyn Meta>, clock: Clock) -> Referrers {
        Referrers {
            meta,
            clock,
            mem: moka::sync::Cache::new(100_000),
            refreshing: std::array::from_fn(|_| tokio::sync::Mutex::new(())),
        }
    }

    /// Is this answer still within `ttl` of when it was fetched?
    pub fn is_fresh(&self, entry: &ReferrersEntry, ttl: Duration) -> bool {
        self.clock.now().saturating_duration_since(entry.fetched) < ttl
    }

    /// The last answer recorded for `subject`, if any (an unreadable record counts as none).
    pub async fn get(
        &self,
        upstream: &Arc<str>,
        repo: &RepoName,
        subject: &Digest,
    ) -> Option<ReferrersEntry> {
        let key = (upstream.clone(), repo.clone(), subject.clone());
        if let Some(e) = self.mem.get(&key) {
            return Some(e);
        }
        let text = match self
            .meta
            .get(&layout::referrers(upstream, repo, subject))
            .await
        {
            Ok(t) => t?,
            Err(e) => {
                tracing::warn!(upstream = %upstream, repository = %repo, subject = %subject, error = %e, "could not read a referrers record");
                return None;
            }
        };
        let rec: Record = match serde_json::from_slice(&text) {
            Ok(r) => r,
            Err(e) => {
                tracing::warn!(upstream = %upstream, repository = %repo, subject = %subject, error = %e, "ignoring unreadable referrers record");
                return None;
            }
        };
        let answer = match rec.answer {
            RecordAnswer::Index { digest } => ReferrersAnswer::Index(digest.parse().ok()?),
            RecordAnswer::Unsupported => ReferrersAnswer::Unsupported,
        };
        let age = Duration::from_secs(unix_secs().saturating_sub(rec.fetched_at));
        let now = self.clock.now();
        let entry = ReferrersEntry {
            answer,
            fetched: now.checked_sub(age).unwrap_or(now),
        };
        self.mem.insert(key, entry.clone());
        Some(entry)
    }

    /// Records that the upstream answered `answer` for `subject` now. An index must be stored
    /// (as a manifest) first.
    pub async fn put(
        &self,
        upstream: &Arc<str>,
        repo: &RepoName,
        subject: &Digest,
        answer: ReferrersAnswer,
    ) -> io::Result<ReferrersEntry> {
        let rec = Record {
            answer: match &answer {
                ReferrersAnswer::Index(d) => RecordAnswer::Index {
                    digest: d.to_string(),
                },
                ReferrersAnswer::Unsupported => RecordAnswer::Unsupported,
            },
            fetched_at: unix_secs(),
        };
        let entry = ReferrersEntry {
            answer,
            fetched: self.clock.now(),
        };
        self.mem.insert(
            (upstream.clone(), repo.clone(), subject.clone()),
            entry.clone(),
        );
        let json = serde_json::to_vec(&rec).map_err(io::Error::other)?;
        self.meta
            .put(
                &layout::referrers(upstream, repo, subject),
                Bytes::from(json),
            )
            .await?;
        Ok(entry)
    }

    /// Waits for any other refresh of `subject` (or of one sharing its stripe) to end; the
    /// caller refreshes while it holds the guard, after looking again at what is stored.
    pub async fn refresh_turn(
        &self,
        upstream: &str,
        repo: &RepoName,
        subject: &Digest,
    ) -> tokio::sync::MutexGuard<'_, ()> {
        let h = std::hash::BuildHasher::hash_one(
            &std::hash::BuildHasherDefault::<std::collections::hash_map::DefaultHasher>::default(),
            (upstream, repo.as_str(), subject.hex()),
        );
        self.refreshing[(h % STRIPES as u64) as usize].lock().await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn answers_expire_on_the_store_clock_and_survive_a_restart() {
        let meta: Arc<dyn Meta> = Arc::new(crate::cache::backend::memory::Memory::default());
        let idx = Referrers::new(meta.clone(), Clock::default());
        let up: Arc<str> = "ghcr.io".into();
        let repo: RepoName = "org/app".parse().unwrap();
        let subject = Digest::sha256_of(b"image");
        let index = Digest::sha256_of(b"index");
        assert!(idx.get(&up, &repo, &subject).await.is_none());
        let e = idx
            .put(&up, &repo, &subject, ReferrersAnswer::Index(index.clone()))
            .await
            .unwrap();
        let ttl = Duration::from_secs(300);
        assert!(idx.is_fresh(&e, ttl));
        tokio::time::advance(Duration::from_secs(301)).await;
        assert!(!idx.is_fresh(&e, ttl));

        let other = Digest::sha256_of(b"other image");
        idx.put(&up, &repo, &other, ReferrersAnswer::Unsupported)
            .await
            .unwrap();
        let again = Referrers::new(meta, Clock::default());
        assert_eq!(
            again.get(&up, &repo, &subject).await.unwrap().answer,
            ReferrersAnswer::Index(index)
        );
        assert_eq!(
            again.get(&up, &repo, &other).await.unwrap().answer,
            ReferrersAnswer::Unsupported
        );
        let elsewhere: RepoName = "org/other".parse().unwrap();
        assert!(again.get(&up, &elsewhere, &subject).await.is_none());
    }

    #[test]
    fn the_tag_schema_names_a_subject_by_algorithm_and_hex() {
        let d = Digest::sha256_of(b"x");
        assert_eq!(tag_schema(&d).as_str(), format!("sha256-{}", d.hex()));
        let long = Digest::of(crate::oci::digest::Algorithm::Sha512, b"x");
        assert_eq!(
            tag_schema(&long).as_str(),
            format!("sha512-{}", &long.hex()[..64])
        );
    }
}
