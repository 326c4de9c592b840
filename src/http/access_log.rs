//! One log line per request, written when the response body is finished or dropped, so it
//! carries the bytes really sent and whether the transfer completed.

use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::Bytes;
use http_body::{Body as HttpBody, Frame, SizeHint};
use tokio::time::Instant;

use super::body::{Body, BoxError};
use crate::oci::Kind;

/// How a request was answered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// Served from the store.
    Hit,
    /// Fetched from upstream (this request started the fill or fetch).
    Miss,
    /// Followed a fill that another request started.
    Joined,
    /// A stale tag confirmed unchanged by an upstream HEAD.
    Revalidated,
    /// The upstream failed; the last known tag mapping was served.
    Stale,
    /// Forwarded without caching (tag lists, referrers, or the store was unavailable).
    Bypass,
    /// Answered with an error.
    Error,
}

impl Outcome {
    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Hit => "hit",
            Outcome::Miss => "miss",
            Outcome::Joined => "joined",
            Outcome::Revalidated => "revalidated",
            Outcome::Stale => "stale",
            Outcome::Bypass => "bypass",
            Outcome::Error => "error",
        }
    }
}

/// What the router learned about a request, for its log line.
pub struct RequestInfo {
    /// The client's `X-Request-Id`, or one made here; echoed in the response.
    pub request_id: String,
    pub method: http::Method,
    pub path: String,
    pub remote: SocketAddr,
    pub kind: Kind,
    pub upstream: Option<Arc<str>>,
    pub repository: Option<String>,
    /// The tag or digest asked for.
    pub reference: Option<String>,
    pub started: Instant,
    /// The status page's savings counters, fed when the request ends.
    pub savings: Arc<crate::ui::stats::Savings>,
}

/// A request id unique within this process and unlikely to repeat across restarts.
pub fn new_request_id() -> String {
    use std::sync::atomic::{AtomicU64, Ordering};
    use std::sync::OnceLock;
    static PREFIX: OnceLock<u32> = OnceLock::new();
    static SEQ: AtomicU64 = AtomicU64::new(0);
    let prefix = PREFIX.get_or_init(|| {
        let t = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default();
        t.subsec_nanos() ^ std::process::id().rotate_left(16)
    });
    format!("{prefix:08x}-{:x}", SEQ.fetch_add(1, Ordering::Relaxed))
}

pub struct LoggedBody {
    inner: Body,
    info: RequestInfo,
    status: u16,
    outcome: Outcome,
    bytes: u64,
    /// The declared Content-Length: hyper stops polling once that much is sent, so the end of
    /// the stream is never observed for such bodies.
    expected: Option<u64>,
    complete: bool,
    failed: bool,
}

impl LoggedBody {
    pub fn new(
        inner: Body,
        info: RequestInfo,
        status: u16,
        outcome: Outcome,
        expected: Option<u64>,
    ) -> LoggedBody {
        LoggedBody {
            inner,
            info,
            status,
            outcome,
            bytes: 0,
            expected,
            complete: false,
            failed: false,
        }
    }
}

impl HttpBody for LoggedBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = &mut *self;
        let r = Pin::new(&mut this.inner).poll_frame(cx);
        match &r {
            Poll::Ready(Some(Ok(f))) => {
                if let Some(d) = f.data_ref() {
                    this.bytes += d.len() as u64;
                }
            }
            Poll::Ready(Some(Err(e))) => {
                this.failed = true;
                tracing::warn!(path = %this.info.path, error = %e, "response body aborted");
            }
            Poll::Ready(None) => this.complete = true,
            Poll::Pending => {}
        }
        r
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

impl Drop for LoggedBody {
    fn drop(&mut self) {
        let complete = !self.failed
            && (self.complete || self.inner.is_end_stream() || self.expected == Some(self.bytes));
        let i = &self.info;
        crate::metrics::request(
            i.upstream.as_deref().unwrap_or("-"),
            i.kind.as_str(),
            self.outcome.as_str(),
            self.status,
            self.bytes,
        );
        if i.upstream.is_some() {
            i.savings.record(self.outcome, self.bytes);
        }
        tracing::info!(
            target: "entrepot::access",
            request_id = %i.request_id,
            remote = %i.remote,
            method = %i.method,
            path = %i.path,
            kind = %i.kind.as_str(),
            upstream = %i.upstream.as_deref().unwrap_or("-"),
            repository = %i.repository.as_deref().unwrap_or("-"),
            reference = %i.reference.as_deref().unwrap_or("-"),
            outcome = %self.outcome.as_str(),
            status = self.status,
            bytes = self.bytes,
            complete,
            duration_ms = i.started.elapsed().as_millis() as u64,
        );
    }
}
