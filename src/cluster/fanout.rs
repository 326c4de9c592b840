//! One stream from the owner replica per blob, shared by this replica's clients. On shared
//! storage a replica that holds nothing of a blob relays the owner's verified stream rather
//! than filling a copy (`http::blobs`); without sharing, 8 clients of one replica cost the owner
//! 8 streams and this replica 8 receives. Here the first client's request opens the stream and
//! every client that arrives while its first bytes are still in memory reads behind it.
//!
//! Memory is bounded: at most `KEEP` bytes are held. When the window is full the stream waits
//! for its slowest client, but only `LAG_GRACE`: a client still further behind then continues
//! on a stream of its own from where it is (a Range request to the owner), as does a client
//! that arrives once the start is gone, so a stalled client holds the others up briefly, never
//! for long. The owner holds a blob's last byte back until it
//! verified it, so a shared stream that ends short, or fails, ends every client's body with an
//! error, never a clean end. The stream stops when its last client leaves.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex, Weak};

use bytes::Bytes;
use futures_util::stream::BoxStream;
use futures_util::StreamExt;
use http::{header, HeaderMap, HeaderValue, Method, StatusCode};
use tokio::sync::watch;
use tokio_util::task::TaskTracker;

use super::{ForwardError, Via};
use crate::oci::{Digest, RepoName};
use crate::upstream::UpstreamRequest;

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// The most bytes of a shared stream kept for clients behind its head.
const KEEP: usize = 32 << 20;
/// How long a full window waits for its slowest client before dropping bytes it still needs.
const LAG_GRACE: std::time::Duration = std::time::Duration::from_millis(500);

/// The shared streams of this replica, by blob.
pub struct Fanouts {
    live: Mutex<HashMap<Digest, Weak<Shared>>>,
    tracker: TaskTracker,
}

/// What a client needs to ask the owner for the blob (again, from a position).
#[derive(Clone)]
pub struct Source {
    pub via: Via,
    pub upstream: String,
    pub repo: RepoName,
    pub digest: Digest,
}

/// A stream from the owner and the clients reading it.
struct Shared {
    source: Source,
    window: Mutex<Window>,
    stage: watch::Sender<Stage>,
    /// A client moved on (the stream may be waiting for room).
    advanced: tokio::sync::Notify,
}

#[derive(Default)]
struct Window {
    /// The newest chunks, oldest first, with their offsets.
    chunks: VecDeque<(u64, Bytes)>,
    bytes: usize,
    /// Where each client reading from the window is, by id.
    readers: HashMap<u64, u64>,
    next_id: u64,
}

/// A client reading the window: its position counts until dropped.
struct Reader {
    shared: Arc<Shared>,
    id: u64,
}

impl Drop for Reader {
    fn drop(&mut self) {
        self.shared.window.lock().unwrap().readers.remove(&self.id);
        self.shared.advanced.notify_one();
    }
}

#[derive(Clone, Debug)]
enum Stage {
    /// Waiting for the owner's answer.
    Connecting,
    /// Receiving (each chunk is announced by sending this again); `total` from the owner's
    /// Content-Length.
    Open { total: Option<u64> },
    /// The owner's body ended cleanly after `size` bytes (its Content-Length, if it sent one).
    Done { size: u64 },
    /// The owner could not be asked (the first client falls back, the others too), or its body
    /// broke off.
    Failed(Arc<str>),
}

/// Where a client finds the bytes at its position.
enum At {
    Chunk(Bytes),
    /// Not received yet.
    Pending,
    /// No longer kept: read the rest on a stream of its own.
    Gone,
}

impl Fanouts {
    pub fn new(tracker: TaskTracker) -> Fanouts {
        Fanouts {
            live: Mutex::new(HashMap::new()),
            tracker,
        }
    }

    /// The whole blob as the owner serves it: its Content-Length (if sent) and a body that
    /// shares one owner stream with every other client of this replica reading it now. An
    /// error means the owner could not be asked: serve the request some other way.
    pub async fn whole(
        &self,
        source: Source,
    ) -> Result<(Option<u64>, BoxStream<'static, Result<Bytes, BoxError>>), ForwardError> {
        let (shared, reader) = self.join_or_open(source);
        let mut rx = shared.stage.subscribe();
        let stage = rx
            .wait_for(|s| !matches!(s, Stage::Connecting))
            .await
            .map(|s| s.clone())
            .unwrap_or_else(|_| Stage::Failed("the shared stream ended".into()));
        let total = match stage {
            Stage::Open { total, .. } => total,
            Stage::Done { size } => Some(size),
            Stage::Failed(why) => {
                let owner = shared.source.via.owner.clone();
                return Err(ForwardError::Unreachable(owner, why.to_string()));
            }
            Stage::Connecting => unreachable!("waited past Connecting"),
        };
        Ok((total, follow(shared, reader, rx).boxed()))
    }

    /// The live shared stream of the blob if a client starting at byte 0 can still join it,
    /// else a new one (its task on the tracker); and this client's place in it.
    fn join_or_open(&self, source: Source) -> (Arc<Shared>, Reader) {
        let mut live = self.live.lock().unwrap();
        live.retain(|_, w| w.strong_count() > 0);
        if let Some(s) = live.get(&source.digest).and_then(Weak::upgrade) {
            if let Some(reader) = s.join() {
                return (s, reader);
            }
        }
        let (stage, _) = watch::channel(Stage::Connecting);
        let shared = Arc::new(Shared {
            source,
            window: Mutex::default(),
            stage,
            advanced: tokio::sync::Notify::new(),
        });
        let reader = shared.join().expect("a new stream is joinable");
        live.insert(shared.source.digest.clone(), Arc::downgrade(&shared));
        self.tracker.spawn(drive(Arc::downgrade(&shared)));
        (shared, reader)
    }
}

impl Shared {
    /// A reader from byte 0, if nothing is dropped yet and nothing failed (checked and
    /// registered at once, so the stream cannot drop the start in between).
    fn join(self: &Arc<Self>) -> Option<Reader> {
        if matches!(*self.stage.borrow(), Stage::Failed(_)) {
            return None;
        }
        let mut w = self.window.lock().unwrap();
        if !matches!(w.chunks.front(), None | Some((0, _))) {
            return None;
        }
        let id = w.next_id;
        w.next_id += 1;
        w.readers.insert(id, 0);
        Some(Reader {
            shared: self.clone(),
            id,
        })
    }

    /// The bytes at `pos` for reader `id` (which is at `pos` from now on).
    fn at(&self, id: u64, pos: u64) -> At {
        let mut w = self.window.lock().unwrap();
        let Some(&(first, _)) = w.chunks.front() else {
            return At::Pending;
        };
        if pos < first {
            w.readers.remove(&id);
            return At::Gone;
        }
        if let Some(p) = w.readers.get_mut(&id) {
            *p = pos;
        }
        // Chunks are contiguous: find the one holding `pos`.
        let i = w
            .chunks
            .partition_point(|(off, c)| off + c.len() as u64 <= pos);
        match w.chunks.get(i) {
            Some((off, c)) => At::Chunk(c.slice((pos - off) as usize..)),
            None => At::Pending,
        }
    }

    /// Drops the oldest chunks every reader is past while more than `KEEP` is held, or (`force`)
    /// whether or not readers still need them. Says whether the window has room.
    fn trim(&self, force: bool) -> bool {
        let mut w = self.window.lock().unwrap();
        let slowest = w.readers.values().copied().min().unwrap_or(u64::MAX);
        while w.bytes > KEEP && w.chunks.len() > 1 {
            let (off, len) = {
                let (off, c) = w.chunks.front().expect("more than one chunk");
                (*off, c.len())
            };
            if !force && off + len as u64 > slowest {
                break;
            }
            w.chunks.pop_front();
            w.bytes -= len;
        }
        w.bytes <= KEEP
    }

    fn push(&self, offset: u64, chunk: Bytes) {
        let mut w = self.window.lock().unwrap();
        w.bytes += chunk.len();
        w.chunks.push_back((offset, chunk));
    }
}

/// Waits until the window has room: until the slowest reader moves past the oldest bytes, or
/// `LAG_GRACE` has passed (then they are dropped anyway and that reader resumes on its own).
async fn make_room(shared: &Shared) {
    let deadline = tokio::time::Instant::now() + LAG_GRACE;
    loop {
        let advanced = shared.advanced.notified();
        if shared.trim(false) {
            return;
        }
        if tokio::time::timeout_at(deadline, advanced).await.is_err() {
            shared.trim(true);
            return;
        }
    }
}

/// Asks the owner for the blob from byte `from` (a Range request unless 0).
async fn open(
    source: &Source,
    from: u64,
) -> Result<
    (
        StatusCode,
        HeaderMap,
        BoxStream<'static, reqwest::Result<Bytes>>,
    ),
    ForwardError,
> {
    crate::metrics::cluster_relay_stream(if from == 0 { "shared" } else { "resume" });
    let mut headers = HeaderMap::new();
    if from > 0 {
        let range = HeaderValue::from_str(&format!("bytes={from}-")).expect("ASCII");
        headers.insert(header::RANGE, range);
    }
    let req = UpstreamRequest {
        method: Method::GET,
        repo: &source.repo,
        path: format!("blobs/{}", source.digest),
        query: None,
        headers,
        streaming: true,
    };
    let resp = source
        .via
        .cluster
        .forward(&source.via.owner, &source.upstream, &req)
        .await?;
    Ok((
        resp.status(),
        resp.headers().clone(),
        resp.bytes_stream().boxed(),
    ))
}

/// The shared stream's task: reads the owner's body into the window while any client holds
/// the stream.
async fn drive(weak: Weak<Shared>) {
    let Some(source) = weak.upgrade().map(|s| s.source.clone()) else {
        return;
    };
    let opened = open(&source, 0).await;
    let Some(shared) = weak.upgrade() else { return };
    let (status, headers, mut body) = match opened {
        Ok(o) => o,
        Err(e) => {
            shared
                .stage
                .send_replace(Stage::Failed(e.to_string().into()));
            return;
        }
    };
    if status != StatusCode::OK {
        let why = format!("the owner answered {status} to a whole-blob request");
        shared.stage.send_replace(Stage::Failed(why.into()));
        return;
    }
    let total = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    shared.stage.send_replace(Stage::Open { total });
    drop(shared);
    let mut received = 0u64;
    loop {
        match weak.upgrade() {
            Some(shared) => make_room(&shared).await,
            None => return,
        }
        let next = body.next().await;
        // Every client gone: stop reading (the owner's own fill is not affected).
        let Some(shared) = weak.upgrade() else { return };
        let end = match next {
            Some(Ok(c)) if c.is_empty() => continue,
            Some(Ok(c)) => {
                let len = c.len() as u64;
                if total.is_some_and(|t| received + len > t) {
                    Stage::Failed("the owner sent more than its Content-Length".into())
                } else {
                    shared.push(received, c);
                    received += len;
                    shared.stage.send_replace(Stage::Open { total });
                    continue;
                }
            }
            Some(Err(e)) => {
                tracing::warn!(owner = %source.via.owner, digest = %source.digest, error = %e, "the owner's shared stream broke off");
                Stage::Failed("the owner's stream broke off".into())
            }
            None if total.is_some_and(|t| t != received) => {
                Stage::Failed("the owner's stream ended short".into())
            }
            None => Stage::Done { size: received },
        };
        shared.stage.send_replace(end);
        return;
    }
}

/// One client's body: chunks of the shared stream from byte 0, then (if it fell behind) its
/// own stream from where it is.
fn follow(
    shared: Arc<Shared>,
    reader: Reader,
    rx: watch::Receiver<Stage>,
) -> impl futures_util::Stream<Item = Result<Bytes, BoxError>> + Send {
    struct St {
        shared: Arc<Shared>,
        reader: Option<Reader>,
        rx: watch::Receiver<Stage>,
        pos: u64,
        own: Option<BoxStream<'static, reqwest::Result<Bytes>>>,
        end: Option<u64>,
    }
    let st = St {
        reader: Some(reader),
        shared,
        rx,
        pos: 0,
        own: None,
        end: None,
    };
    futures_util::stream::try_unfold(st, |mut st| async move {
        loop {
            if let Some(own) = st.own.as_mut() {
                return match own.next().await {
                    Some(Ok(b)) => {
                        st.pos += b.len() as u64;
                        Ok(Some((b, st)))
                    }
                    Some(Err(e)) => Err(BoxError::from(e)),
                    None if st.end.is_some_and(|e| st.pos < e) => {
                        Err("the owner's stream ended short".into())
                    }
                    None => Ok(None),
                };
            }
            let stage = st.rx.borrow_and_update().clone();
            let id = st.reader.as_ref().map_or(u64::MAX, |r| r.id);
            match st.shared.at(id, st.pos) {
                At::Chunk(b) => {
                    st.pos += b.len() as u64;
                    st.shared.advanced.notify_one();
                    return Ok(Some((b, st)));
                }
                At::Gone => {
                    st.reader = None;
                    let total = match stage {
                        Stage::Open { total, .. } => total,
                        Stage::Done { size } => Some(size),
                        _ => None,
                    };
                    st.own = Some(resume(&st.shared.source, st.pos).await?);
                    st.end = total;
                    continue;
                }
                At::Pending => {}
            }
            match stage {
                Stage::Done { size } if st.pos >= size => return Ok(None),
                Stage::Failed(why) => return Err(why.to_string().into()),
                _ => {}
            }
            if st.rx.changed().await.is_err() {
                return Err("the shared stream ended without a result".into());
            }
        }
    })
}

/// A client's own stream from `from`, after it fell behind the shared one.
async fn resume(
    source: &Source,
    from: u64,
) -> Result<BoxStream<'static, reqwest::Result<Bytes>>, BoxError> {
    let (status, headers, body) = open(source, from).await?;
    let starts_at = headers
        .get(header::CONTENT_RANGE)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("bytes "))
        .and_then(|v| v.split('-').next())
        .and_then(|v| v.parse::<u64>().ok());
    if status != StatusCode::PARTIAL_CONTENT || starts_at != Some(from) {
        return Err(format!("the owner answered {status} to a resume at byte {from}").into());
    }
    Ok(body)
}
