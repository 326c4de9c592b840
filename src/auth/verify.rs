//! Password checks: bcrypt off the async threads, bounded, coalesced and remembered.
//!
//! bcrypt is slow on purpose (tens of milliseconds a check), so a flood of wrong passwords must
//! not become a flood of bcrypt runs, nor fill the blocking pool that file I/O needs:
//!
//! - a verdict is remembered by sha256(user, password, stored hash): a right one for
//!   [`RIGHT_TTL`], a wrong one for [`WRONG_TTL`]. The stored hash is in the key, so a reload
//!   that adds a user or changes a password never meets a stale verdict;
//! - concurrent checks of the same key wait for one bcrypt run;
//! - bcrypt as a whole uses at most [`CPU_SHARE`] of the machine: as many slots as that share
//!   rounds up to, each resting after a run in proportion to it when the share is a fraction of
//!   a core (on 2 cores: one slot, busy at most a quarter of the time);
//! - at most [`MAX_ADMITTED`] checks running or waiting; past that a check is refused as `Busy`
//!   at once instead of queueing without bound.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use sha2::{Digest as _, Sha256};
use tokio::sync::{OnceCell, Semaphore};

use super::basic::Credentials;
use super::htpasswd::Htpasswd;

/// How long a right password is remembered.
pub const RIGHT_TTL: Duration = Duration::from_secs(5 * 60);
/// How long a wrong one is: long enough that a burst repeating it costs one bcrypt run.
pub const WRONG_TTL: Duration = Duration::from_secs(30);
/// An entry whose check never finished (its client left; a `Busy` refusal) is dropped after
/// this.
const PENDING_TTL: Duration = Duration::from_secs(60);
/// Verdicts remembered at most.
const CAPACITY: u64 = 10_000;
/// Checks running or waiting for a bcrypt slot at most.
pub const MAX_ADMITTED: usize = 32;
/// The part of the machine's CPU bcrypt may use under a flood of new passwords: with it, a
/// flood of 1,000 new wrong passwords a second leaves the median anonymous pull unchanged on 2
/// cores (BENCHMARKS.md, "Password checks under a burst").
pub const CPU_SHARE: f64 = 0.125;

/// The outcome of one password check.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verdict {
    Right,
    /// A wrong password, or a user the file does not list.
    Wrong,
}

/// Too many password checks are running or waiting: refused without one.
#[derive(Debug, Clone, Copy, thiserror::Error)]
#[error("too many password checks at once")]
pub struct Busy;

type Key = [u8; 32];
type Slot = Arc<OnceCell<Verdict>>;

pub struct Verifier {
    verdicts: moka::sync::Cache<Key, Slot>,
    running: Arc<Semaphore>,
    admitted: Arc<Semaphore>,
    /// How long a slot rests after a run, as a multiple of the run's time.
    rest: f64,
    /// bcrypt runs so far (tests and the benchmark read it).
    runs: Arc<AtomicU64>,
}

/// A verdict is remembered as long as its kind deserves.
struct VerdictTtl;

impl VerdictTtl {
    fn of(slot: &Slot) -> Duration {
        match slot.get() {
            Some(Verdict::Right) => RIGHT_TTL,
            Some(Verdict::Wrong) => WRONG_TTL,
            None => PENDING_TTL,
        }
    }
}

impl moka::Expiry<Key, Slot> for VerdictTtl {
    fn expire_after_create(&self, _: &Key, slot: &Slot, _: Instant) -> Option<Duration> {
        Some(VerdictTtl::of(slot))
    }

    fn expire_after_update(
        &self,
        _: &Key,
        slot: &Slot,
        _: Instant,
        _: Option<Duration>,
    ) -> Option<Duration> {
        Some(VerdictTtl::of(slot))
    }
}

impl Default for Verifier {
    /// [`CPU_SHARE`] of this machine's cores.
    fn default() -> Self {
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
        Verifier::with_share(cores as f64 * CPU_SHARE, MAX_ADMITTED)
    }
}

impl Verifier {
    /// bcrypt on at most `cores` cores' worth of CPU (a fraction: one slot that rests);
    /// `admitted` checks running or waiting.
    pub fn with_share(cores: f64, admitted: usize) -> Verifier {
        let slots = cores.ceil().max(1.0);
        let mut v = Verifier::new(slots as usize, admitted);
        v.rest = slots / cores.max(0.01) - 1.0;
        v
    }

    /// `running` bcrypt runs at once, never resting; `admitted` checks running or waiting.
    pub fn new(running: usize, admitted: usize) -> Verifier {
        Verifier {
            verdicts: moka::sync::Cache::builder()
                .max_capacity(CAPACITY)
                .expire_after(VerdictTtl)
                .build(),
            running: Arc::new(Semaphore::new(running)),
            admitted: Arc::new(Semaphore::new(admitted.max(running))),
            rest: 0.0,
            runs: Arc::new(AtomicU64::new(0)),
        }
    }

    /// bcrypt runs so far.
    pub fn runs(&self) -> u64 {
        self.runs.load(Ordering::Relaxed)
    }

    /// Checks `creds` against `users`.
    pub async fn check(&self, users: &Arc<Htpasswd>, creds: &Credentials) -> Result<Verdict, Busy> {
        let stored = users.hash(&creds.user);
        let key = key(creds, stored);
        let slot = self.verdicts.get_with(key, Slot::default);
        if let Some(v) = slot.get() {
            return Ok(*v);
        }
        let mut ran = false;
        let verdict = *slot
            .get_or_try_init(|| {
                ran = true;
                self.run(users.clone(), creds)
            })
            .await?;
        if ran {
            // The entry was created pending; give it the verdict's lifetime.
            self.verdicts.insert(key, slot.clone());
        }
        Ok(verdict)
    }

    /// One bcrypt run on the blocking pool, within the bounds.
    async fn run(&self, users: Arc<Htpasswd>, creds: &Credentials) -> Result<Verdict, Busy> {
        let admitted = self
            .admitted
            .clone()
            .try_acquire_owned()
            .map_err(|_| Busy)?;
        let slot = self
            .running
            .clone()
            .acquire_owned()
            .await
            .expect("the semaphore is never closed");
        let user = creds.user.clone();
        let password = creds.password().to_vec();
        let runs = self.runs.clone();
        let rest = self.rest;
        let (tx, rx) = tokio::sync::oneshot::channel();
        // The permits go with the work: a client that leaves does not free a slot that bcrypt
        // still occupies.
        tokio::task::spawn_blocking(move || {
            runs.fetch_add(1, Ordering::Relaxed);
            let started = Instant::now();
            let right = match users.hash(&user) {
                Some(hash) => bcrypt::verify(&password, hash).unwrap_or(false),
                None => {
                    // As slow as a wrong password, so timing does not tell which users exist.
                    let _ = bcrypt::verify(&password, users.stand_in_hash());
                    false
                }
            };
            let _ = tx.send(if right {
                Verdict::Right
            } else {
                Verdict::Wrong
            });
            drop(admitted);
            // The CPU share: the slot rests before the next run (this thread only sleeps; the
            // blocking pool has hundreds).
            if rest > 0.0 {
                std::thread::sleep(started.elapsed().mul_f64(rest));
            }
            drop(slot);
        });
        // A panic in bcrypt is a wrong password, not a crashed request.
        Ok(rx.await.unwrap_or(Verdict::Wrong))
    }
}

/// sha256 of user, password and the stored hash ("" for an unlisted user), length-prefixed so
/// no two different triples collide by concatenation.
fn key(creds: &Credentials, stored: Option<&str>) -> Key {
    let mut h = Sha256::new();
    for part in [
        creds.user.as_bytes(),
        creds.password(),
        stored.unwrap_or("").as_bytes(),
    ] {
        h.update((part.len() as u64).to_be_bytes());
        h.update(part);
    }
    h.finalize().into()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::auth::basic::Presented;
    use base64::Engine as _;

    fn creds(user: &str, password: &str) -> Credentials {
        let mut h = http::HeaderMap::new();
        let value = format!(
            "Basic {}",
            base64::engine::general_purpose::STANDARD.encode(format!("{user}:{password}"))
        );
        h.insert(http::header::AUTHORIZATION, value.parse().unwrap());
        match Presented::from_headers(&h) {
            Presented::Basic(c) => c,
            other => panic!("{other:?}"),
        }
    }

    fn users(entries: &[(&str, &str)]) -> Arc<Htpasswd> {
        let text: String = entries
            .iter()
            .map(|(u, p)| format!("{u}:{}\n", bcrypt::hash(p, 4).unwrap()))
            .collect();
        Arc::new(Htpasswd::parse(&text).unwrap())
    }

    #[tokio::test]
    async fn right_and_wrong_passwords_and_unknown_users() {
        let v = Verifier::new(1, 4);
        let file = users(&[("alice", "right")]);
        assert_eq!(
            v.check(&file, &creds("alice", "right")).await.unwrap(),
            Verdict::Right
        );
        assert_eq!(
            v.check(&file, &creds("alice", "wrong")).await.unwrap(),
            Verdict::Wrong
        );
        assert_eq!(
            v.check(&file, &creds("bob", "right")).await.unwrap(),
            Verdict::Wrong
        );
        assert_eq!(v.runs(), 3);
    }

    #[tokio::test]
    async fn verdicts_are_remembered_right_and_wrong() {
        let v = Verifier::new(1, 4);
        let file = users(&[("alice", "right")]);
        for _ in 0..5 {
            v.check(&file, &creds("alice", "right")).await.unwrap();
            v.check(&file, &creds("alice", "wrong")).await.unwrap();
        }
        assert_eq!(v.runs(), 2, "one bcrypt run per distinct password");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_burst_of_one_wrong_password_costs_one_bcrypt_run() {
        let v = Arc::new(Verifier::new(1, 4));
        let file = users(&[("alice", "right")]);
        let mut tasks = Vec::new();
        for _ in 0..50 {
            let (v, file) = (v.clone(), file.clone());
            tasks.push(tokio::spawn(async move {
                v.check(&file, &creds("alice", "guess")).await
            }));
        }
        for t in tasks {
            assert_eq!(t.await.unwrap().unwrap(), Verdict::Wrong);
        }
        assert_eq!(v.runs(), 1);
    }

    #[tokio::test]
    async fn a_changed_hash_is_checked_afresh() {
        let v = Verifier::new(1, 4);
        let before = users(&[("alice", "old")]);
        assert_eq!(
            v.check(&before, &creds("alice", "new")).await.unwrap(),
            Verdict::Wrong
        );
        // The file now has alice's new password: the remembered "wrong" does not apply.
        let after = users(&[("alice", "new")]);
        assert_eq!(
            v.check(&after, &creds("alice", "new")).await.unwrap(),
            Verdict::Right
        );
        // A user added to the file, after being refused as unknown.
        assert_eq!(
            v.check(&before, &creds("bob", "pw")).await.unwrap(),
            Verdict::Wrong
        );
        let added = users(&[("alice", "new"), ("bob", "pw")]);
        assert_eq!(
            v.check(&added, &creds("bob", "pw")).await.unwrap(),
            Verdict::Right
        );
    }

    #[tokio::test]
    async fn past_the_admitted_checks_a_new_one_is_refused_at_once() {
        let v = Arc::new(Verifier::new(1, 2));
        let file = users(&[("alice", "right")]);
        // Every bcrypt slot taken: admitted checks wait.
        let hold = v.running.clone().acquire_owned().await.unwrap();
        let waiting: Vec<_> = (0..2)
            .map(|i| {
                let (v, file) = (v.clone(), file.clone());
                tokio::spawn(async move { v.check(&file, &creds("alice", &format!("w{i}"))).await })
            })
            .collect();
        while v.admitted.available_permits() > 0 {
            tokio::task::yield_now().await;
        }
        let refused = v.check(&file, &creds("alice", "right")).await;
        assert!(refused.is_err(), "a third check is refused while two wait");
        drop(hold);
        for w in waiting {
            assert_eq!(w.await.unwrap().unwrap(), Verdict::Wrong);
        }
        // Not remembered as wrong: once there is room, the right password gets in.
        assert_eq!(
            v.check(&file, &creds("alice", "right")).await.unwrap(),
            Verdict::Right
        );
    }

    #[tokio::test]
    async fn a_fraction_of_a_core_is_one_slot_that_rests() {
        let v = Verifier::with_share(0.5, 4);
        assert_eq!(v.running.available_permits(), 1);
        assert!((v.rest - 1.0).abs() < 1e-9, "{}", v.rest);
        let v = Verifier::with_share(2.0, 4);
        assert_eq!(v.running.available_permits(), 2);
        assert_eq!(v.rest, 0.0);

        // The slot is taken for the run and as long again; the verdict does not wait for that.
        let v = Verifier::with_share(0.5, 4);
        let file = users(&[("alice", "right")]);
        assert_eq!(
            v.check(&file, &creds("alice", "x")).await.unwrap(),
            Verdict::Wrong
        );
        // (Whether the slot is still resting now depends on how long this thread was away:
        // only that the rest ends is certain.)
        let rested = tokio::time::timeout(Duration::from_secs(10), v.running.acquire()).await;
        assert!(rested.is_ok(), "the rest ends");
    }

    #[test]
    fn keys_separate_user_password_and_hash() {
        let k = |u, p, h| key(&creds(u, p), h);
        assert_ne!(k("ab", "c", None), k("a", "bc", None));
        assert_ne!(k("a", "b", None), k("a", "b", Some("$2y$...")));
        assert_eq!(k("a", "b", Some("h")), k("a", "b", Some("h")));
    }
}
