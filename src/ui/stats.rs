//! The status page's counters, kept in memory per server: what requests were answered from
//! (savings) and each upstream's exchanges, errors, latency and rate limit, since start and
//! per minute over the last hour. Fed beside the Prometheus metrics (`access_log`, the upstream
//! client, the fill), so the page never parses `/metrics` and two servers in one process (the
//! tests) never mix their numbers.

use std::sync::Mutex;
use std::time::Duration;

use crate::cache::usage::unix_now_ms;
use crate::http::access_log::Outcome;
use crate::upstream::UpstreamErrorKind;

/// Minutes kept: one hour.
pub const MINUTES: usize = 60;

/// Per-minute buckets over the last hour: bucket `m % 60` holds minute `m` (Unix minutes) until
/// that slot is reused an hour later.
struct Ring<T> {
    slots: [(u64, T); MINUTES],
}

impl<T: Default + Copy> Default for Ring<T> {
    fn default() -> Self {
        Ring {
            slots: [(u64::MAX, T::default()); MINUTES],
        }
    }
}

impl<T: Default + Copy> Ring<T> {
    /// The bucket of minute `minute`, emptied first if it still holds an older one.
    fn at(&mut self, minute: u64) -> &mut T {
        let slot = &mut self.slots[(minute % MINUTES as u64) as usize];
        if slot.0 != minute {
            *slot = (minute, T::default());
        }
        &mut slot.1
    }

    /// The last hour, oldest minute first, ending with `minute`; minutes without a bucket are
    /// empty.
    fn hour(&self, minute: u64) -> Vec<(u64, T)> {
        (0..MINUTES as u64)
            .rev()
            .map(|back| {
                let m = minute.saturating_sub(back);
                let slot = &self.slots[(m % MINUTES as u64) as usize];
                (m, if slot.0 == m { slot.1 } else { T::default() })
            })
            .collect()
    }
}

fn minute_of(ms: u64) -> u64 {
    ms / 60_000
}

/// Requests and bytes by where they were answered from.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct Served {
    /// Answered from the store (`hit`, `revalidated`, `stale`).
    pub from_cache: u64,
    /// Needed the upstream (`miss`, `joined`, `bypass`).
    pub from_upstream: u64,
    /// Answered with an error.
    pub errors: u64,
    /// Body bytes sent to clients from the store.
    pub bytes_from_cache: u64,
    /// Body bytes sent to clients while fetched (fills and bypass).
    pub bytes_from_upstream: u64,
}

impl Served {
    fn add(&mut self, outcome: Outcome, bytes: u64) {
        match outcome {
            Outcome::Hit | Outcome::Revalidated | Outcome::Stale => {
                self.from_cache += 1;
                self.bytes_from_cache += bytes;
            }
            Outcome::Miss | Outcome::Joined | Outcome::Bypass => {
                self.from_upstream += 1;
                self.bytes_from_upstream += bytes;
            }
            Outcome::Error => self.errors += 1,
        }
    }

    /// Requests answered from the store among those answered: `None` before any.
    pub fn hit_ratio(&self) -> Option<f64> {
        let answered = self.from_cache + self.from_upstream;
        (answered > 0).then(|| self.from_cache as f64 / answered as f64)
    }

    fn merge(&mut self, o: &Served) {
        self.from_cache += o.from_cache;
        self.from_upstream += o.from_upstream;
        self.errors += o.errors;
        self.bytes_from_cache += o.bytes_from_cache;
        self.bytes_from_upstream += o.bytes_from_upstream;
    }
}

/// What the server's registry requests were answered from.
pub struct Savings {
    started_ms: u64,
    inner: Mutex<(Served, Ring<Served>)>,
}

impl Default for Savings {
    fn default() -> Self {
        Savings {
            started_ms: unix_now_ms(),
            inner: Mutex::default(),
        }
    }
}

impl Savings {
    /// One registry request ended (its access log line).
    pub fn record(&self, outcome: Outcome, bytes: u64) {
        let minute = minute_of(unix_now_ms());
        let mut g = self.inner.lock().unwrap();
        g.0.add(outcome, bytes);
        g.1.at(minute).add(outcome, bytes);
    }

    /// When the server started (Unix milliseconds).
    pub fn started_ms(&self) -> u64 {
        self.started_ms
    }

    /// Since start, and per minute over the last hour (oldest first, with each minute's start
    /// in Unix milliseconds).
    pub fn snapshot(&self) -> (Served, Vec<(u64, Served)>) {
        let minute = minute_of(unix_now_ms());
        let g = self.inner.lock().unwrap();
        (
            g.0,
            g.1.hour(minute)
                .into_iter()
                .map(|(m, s)| (m * 60_000, s))
                .collect(),
        )
    }

    /// The sum of the last hour's minutes.
    pub fn last_hour(minutes: &[(u64, Served)]) -> Served {
        let mut all = Served::default();
        for (_, s) in minutes {
            all.merge(s);
        }
        all
    }
}

/// One minute of an upstream's exchanges.
#[derive(Debug, Default, Clone, Copy)]
pub struct UpstreamMinute {
    pub requests: u64,
    pub errors: u64,
    pub latency_ms_sum: u64,
    /// Blob bytes fills fetched from it.
    pub fetched: u64,
}

/// An upstream's last failure.
#[derive(Debug, Clone, serde::Serialize)]
pub struct LastError {
    /// The metrics label (`unreachable`, `timeout`, `rate_limited`, `denied`, `status`, ...).
    pub kind: &'static str,
    /// Our own description (never text the upstream sent).
    pub message: String,
    pub at_ms: u64,
}

/// The last exchange with an upstream.
#[derive(Debug, Clone, Copy, serde::Serialize)]
pub struct LastExchange {
    pub at_ms: u64,
    /// The HTTP status; `None` when no answer came.
    pub status: Option<u16>,
    pub latency_ms: u64,
    /// It answered (whatever it said): not refused, timed out or unresolvable.
    pub reachable: bool,
}

#[derive(Default)]
struct UpstreamInner {
    minutes: Ring<UpstreamMinute>,
    requests: u64,
    errors: u64,
    fetched: u64,
    last: Option<LastExchange>,
    last_error: Option<LastError>,
    ratelimit: Option<(f64, u64)>,
}

/// What the status page shows of one upstream.
#[derive(Default)]
pub struct UpstreamStats {
    inner: Mutex<UpstreamInner>,
}

/// A copy of an upstream's counters.
#[derive(Debug, Clone)]
pub struct UpstreamView {
    pub requests: u64,
    pub errors: u64,
    pub fetched: u64,
    pub last: Option<LastExchange>,
    pub last_error: Option<LastError>,
    /// `RateLimit-Remaining` and when it was seen (Unix milliseconds).
    pub ratelimit: Option<(f64, u64)>,
    /// The last hour, oldest minute first, with each minute's start (Unix milliseconds).
    pub minutes: Vec<(u64, UpstreamMinute)>,
}

/// The metrics label of an upstream failure (`None`: not a failure of the upstream).
fn error_label(kind: &UpstreamErrorKind) -> Option<&'static str> {
    Some(match kind {
        UpstreamErrorKind::NotFound => return None,
        UpstreamErrorKind::Unreachable(_) => "unreachable",
        UpstreamErrorKind::Timeout => "timeout",
        UpstreamErrorKind::RateLimited { .. } => "rate_limited",
        UpstreamErrorKind::Denied => "denied",
        UpstreamErrorKind::Status(_) => "status",
        UpstreamErrorKind::UntrustedRealm => "untrusted_realm",
        _ => "protocol",
    })
}

impl UpstreamStats {
    /// One exchange with one of its endpoints: `status` as the metrics record it, `error` if it
    /// failed.
    pub fn exchange(&self, status: Option<u16>, took: Duration, error: Option<&UpstreamErrorKind>) {
        let now = unix_now_ms();
        let latency_ms = took.as_millis() as u64;
        let failed = error.and_then(|k| error_label(k).map(|l| (l, k)));
        let mut g = self.inner.lock().unwrap();
        g.requests += 1;
        let m = g.minutes.at(minute_of(now));
        m.requests += 1;
        m.latency_ms_sum += latency_ms;
        if failed.is_some() {
            m.errors += 1;
            g.errors += 1;
        }
        let unreachable = matches!(
            error,
            Some(UpstreamErrorKind::Unreachable(_) | UpstreamErrorKind::Timeout)
        );
        g.last = Some(LastExchange {
            at_ms: now,
            status,
            latency_ms,
            reachable: !unreachable,
        });
        if let Some((kind, e)) = failed {
            g.last_error = Some(LastError {
                kind,
                message: e.to_string(),
                at_ms: now,
            });
        }
    }

    /// The upstream's `RateLimit-Remaining`.
    pub fn ratelimit(&self, remaining: f64) {
        self.inner.lock().unwrap().ratelimit = Some((remaining, unix_now_ms()));
    }

    /// A fill received `n` blob bytes from it.
    pub fn fetched(&self, n: u64) {
        let now = unix_now_ms();
        let mut g = self.inner.lock().unwrap();
        g.fetched += n;
        g.minutes.at(minute_of(now)).fetched += n;
    }

    pub fn view(&self) -> UpstreamView {
        let minute = minute_of(unix_now_ms());
        let g = self.inner.lock().unwrap();
        UpstreamView {
            requests: g.requests,
            errors: g.errors,
            fetched: g.fetched,
            last: g.last,
            last_error: g.last_error.clone(),
            ratelimit: g.ratelimit,
            minutes: g
                .minutes
                .hour(minute)
                .into_iter()
                .map(|(m, u)| (m * 60_000, u))
                .collect(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_ring_keeps_the_last_hour_and_forgets_older_minutes() {
        let mut r: Ring<u64> = Ring::default();
        *r.at(1000) += 1;
        *r.at(1000) += 1;
        *r.at(1030) += 5;
        let hour = r.hour(1030);
        assert_eq!(hour.len(), MINUTES);
        assert_eq!(hour.last(), Some(&(1030, 5)));
        assert_eq!(hour.iter().find(|(m, _)| *m == 1000), Some(&(1000, 2)));
        // An hour on, minute 1000's slot is minute 1060's: it starts empty.
        *r.at(1060) += 1;
        let hour = r.hour(1060);
        assert_eq!(hour.first(), Some(&(1001, 0)));
        assert_eq!(hour.last(), Some(&(1060, 1)));
        assert_eq!(hour.iter().map(|(_, v)| v).sum::<u64>(), 6);
        // Read two hours later: nothing left.
        assert_eq!(r.hour(1200).iter().map(|(_, v)| v).sum::<u64>(), 0);
    }

    #[test]
    fn the_hit_ratio_counts_answered_requests_only() {
        let s = Savings::default();
        assert_eq!(s.snapshot().0.hit_ratio(), None);
        s.record(Outcome::Miss, 100);
        s.record(Outcome::Hit, 100);
        s.record(Outcome::Hit, 50);
        s.record(Outcome::Joined, 100);
        s.record(Outcome::Error, 0);
        let (total, minutes) = s.snapshot();
        assert_eq!(total.hit_ratio(), Some(0.5));
        assert_eq!(total.bytes_from_cache, 150);
        assert_eq!(total.bytes_from_upstream, 200);
        assert_eq!(total.errors, 1);
        assert_eq!(Savings::last_hour(&minutes), total);
    }

    #[test]
    fn an_upstream_remembers_its_last_error_and_whether_it_answered() {
        let u = UpstreamStats::default();
        u.exchange(Some(200), Duration::from_millis(30), None);
        u.exchange(
            Some(404),
            Duration::from_millis(10),
            Some(&UpstreamErrorKind::NotFound),
        );
        let v = u.view();
        assert!(v.last_error.is_none(), "404 is an answer, not a failure");
        assert_eq!(v.requests, 2);
        u.exchange(
            None,
            Duration::from_secs(1),
            Some(&UpstreamErrorKind::Timeout),
        );
        let v = u.view();
        assert_eq!(v.last_error.as_ref().unwrap().kind, "timeout");
        assert!(!v.last.unwrap().reachable);
        assert_eq!(
            v.minutes.iter().map(|(_, m)| m.latency_ms_sum).sum::<u64>(),
            1040
        );
        u.exchange(
            Some(500),
            Duration::ZERO,
            Some(&UpstreamErrorKind::Status(500)),
        );
        let v = u.view();
        assert!(v.last.unwrap().reachable);
        assert_eq!(v.last_error.unwrap().message, "answered 500");
    }
}
