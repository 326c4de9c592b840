//! An HTTP/1.1 relay between an S3 client and an S3 server (Garage) that records each request's
//! S3 operation, and injects on demand the failures real object stores show: error statuses,
//! garbage, connections closed with or without the work done, hangs, reads lagging writes.
//!
//! It speaks HTTP/1.1 itself instead of through hyper: the crate enables hyper's server but not
//! its client, a hyper service cannot write a garbage status line, and hyper would re-case and
//! re-order headers. Only the framing is parsed (request line, status line, the headers that
//! delimit a body, chunk sizes); every byte is forwarded as it came, so a SigV4 signature (which
//! covers Host) reaches the server intact. Bodies stream through in both directions.
//!
//! Each request gets its own connection to the server, closed after the answer: nothing stale
//! is ever reused, and a server killed between two requests is seen at connect.

use std::{
    collections::HashMap,
    fmt,
    io::{self, ErrorKind},
    net::SocketAddr,
    pin::pin,
    sync::{
        atomic::{AtomicBool, AtomicUsize, Ordering},
        Arc, Mutex,
    },
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result};
use tokio::{
    io::BufReader,
    io::{AsyncBufRead, AsyncBufReadExt as _, AsyncReadExt as _, AsyncWrite, AsyncWriteExt as _},
    net::{
        tcp::{OwnedReadHalf, OwnedWriteHalf},
        TcpListener, TcpStream,
    },
    task::JoinHandle,
};

use super::serve_connections;

/// Read buffer per direction: large enough that an 8 MiB part moves in few syscalls.
const BUF_SIZE: usize = 64 * 1024;

/// Longest request or response head accepted; S3 heads are a few KiB.
const MAX_HEAD: usize = 64 * 1024;

/// How long a closing connection waits for the client to close its side (see [`linger_close`]).
const LINGER: Duration = Duration::from_secs(2);

/// The S3 operation of a request, from its method, path and query (path-style addressing).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Op {
    /// `HEAD /bucket/key`
    HeadObject,
    /// `GET /bucket/key`
    GetObject,
    /// `PUT /bucket/key`
    PutObject,
    /// `PUT /bucket/key` with `x-amz-copy-source`
    CopyObject,
    /// `POST /bucket/key?uploads`
    CreateMultipartUpload,
    /// `PUT /bucket/key?partNumber=N&uploadId=U`
    UploadPart,
    /// `POST /bucket/key?uploadId=U`
    CompleteMultipartUpload,
    /// `DELETE /bucket/key?uploadId=U`
    AbortMultipartUpload,
    /// `DELETE /bucket/key`
    DeleteObject,
    /// `POST /bucket?delete`: object_store's `delete` and `delete_stream` (the keys are in
    /// the body, so the recorded key is empty)
    DeleteObjects,
    /// `GET /bucket?list-type=2`
    ListObjectsV2,
    /// Anything else: bucket operations, ListParts, tagging, ACLs...
    Other,
}

impl Op {
    pub fn as_str(self) -> &'static str {
        match self {
            Op::HeadObject => "HeadObject",
            Op::GetObject => "GetObject",
            Op::PutObject => "PutObject",
            Op::CopyObject => "CopyObject",
            Op::CreateMultipartUpload => "CreateMultipartUpload",
            Op::UploadPart => "UploadPart",
            Op::CompleteMultipartUpload => "CompleteMultipartUpload",
            Op::AbortMultipartUpload => "AbortMultipartUpload",
            Op::DeleteObject => "DeleteObject",
            Op::DeleteObjects => "DeleteObjects",
            Op::ListObjectsV2 => "ListObjectsV2",
            Op::Other => "Other",
        }
    }

    /// Whether a success of this operation makes an object exist under its key.
    fn writes_object(self) -> bool {
        matches!(
            self,
            Op::PutObject | Op::CopyObject | Op::CompleteMultipartUpload
        )
    }
}

impl fmt::Display for Op {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A failure injected in place of (or on top of) forwarding a request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fault {
    /// Answer `HTTP/1.1 abc` (no valid status) and close: a broken proxy or load balancer.
    MalformedStatus,
    /// Close the connection without any answer: a server that crashed mid-request. The server
    /// never sees the request.
    Close,
    /// Answer this status with an S3 XML error body (`SlowDown` for 503, `InternalError` for
    /// 500, ...), without forwarding.
    Status(u16),
    /// Forward the request and let the server finish it, then close the client's connection
    /// without answering: the work is done but the client cannot know ("the answer to
    /// CompleteMultipartUpload was lost").
    LoseAnswer,
    /// On a write (`PutObject`, `CopyObject`, `CompleteMultipartUpload`) that succeeds: answer
    /// `HeadObject` and `GetObject` of that key with 404 `NoSuchKey` for this long after,
    /// as a store whose reads lag its writes (replication lag) would.
    NotFoundAfterWrite(Duration),
    /// Read the request head and never answer, until the relay is dropped.
    Hang,
}

/// How long a fault rule stays armed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Limit {
    /// For the first this many matching requests.
    Times(usize),
    /// For every matching request during this long from when the rule was set.
    For(Duration),
    /// Until [`S3Relay::clear_faults`].
    Always,
    /// Every matching request after the first this many (which pass untouched).
    After(usize),
}

/// One request the relay saw, once its outcome was known.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Recorded {
    pub op: Op,
    pub method: String,
    pub bucket: String,
    /// The object key, percent-decoded; empty for bucket-level requests.
    pub key: String,
    /// The status the client got; `None` when it got no status line.
    pub status: Option<u16>,
    /// The status the server answered; `None` when the request was not forwarded or the server
    /// gave no answer.
    pub upstream: Option<u16>,
    pub fault: Option<Fault>,
}

/// A rule set by [`S3Relay::fault`]: how often it has fired so far.
#[derive(Clone, Debug)]
pub struct FaultHandle {
    fired: Arc<AtomicUsize>,
}

impl FaultHandle {
    pub fn fired(&self) -> usize {
        self.fired.load(Ordering::SeqCst)
    }
}

/// The relay, listening on `127.0.0.1:<port>` until dropped; dropping it ends every connection
/// it holds, hung ones included.
pub struct S3Relay {
    addr: SocketAddr,
    shared: Arc<Shared>,
    task: JoinHandle<()>,
}

impl S3Relay {
    /// A relay in front of `upstream_endpoint` (`http://127.0.0.1:<port>`), forwarding everything
    /// until told otherwise.
    pub async fn start(upstream_endpoint: &str) -> Result<Self> {
        let url = url::Url::parse(upstream_endpoint)
            .with_context(|| format!("upstream endpoint {upstream_endpoint:?}"))?;
        anyhow::ensure!(
            url.scheme() == "http",
            "the relay only speaks plain HTTP: {url}"
        );
        let host = url.host_str().context("upstream endpoint without host")?;
        let port = url.port_or_known_default().context("upstream port")?;
        let upstream = tokio::net::lookup_host((host, port))
            .await?
            .next()
            .with_context(|| format!("{host} resolves to nothing"))?;
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let shared = Arc::new(Shared {
            upstream,
            down: AtomicBool::new(false),
            rules: Mutex::new(Vec::new()),
            hidden: Mutex::new(HashMap::new()),
            log: Mutex::new(Vec::new()),
        });
        let conn_shared = shared.clone();
        let task = tokio::spawn(serve_connections(listener, move |stream| {
            serve(conn_shared.clone(), stream)
        }));
        Ok(Self { addr, shared, task })
    }

    /// `http://127.0.0.1:<port>`, the endpoint to give the S3 client.
    pub fn endpoint(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Arms `fault` for requests of `op`, as long as `limit` says. Rules are tried in the order
    /// they were set; the first armed one that matches a request fires.
    pub fn fault(&self, op: Op, fault: Fault, limit: Limit) -> FaultHandle {
        self.add_rule(op, None, fault, limit)
    }

    /// [`S3Relay::fault`] for requests of `op` whose key contains `key_contains`.
    pub fn fault_on_key(
        &self,
        op: Op,
        key_contains: &str,
        fault: Fault,
        limit: Limit,
    ) -> FaultHandle {
        self.add_rule(op, Some(key_contains.to_owned()), fault, limit)
    }

    fn add_rule(
        &self,
        op: Op,
        key_contains: Option<String>,
        fault: Fault,
        limit: Limit,
    ) -> FaultHandle {
        assert!(
            !matches!(fault, Fault::NotFoundAfterWrite(_)) || op.writes_object(),
            "NotFoundAfterWrite is armed on the write that creates the object, not on {op}"
        );
        let fired = Arc::new(AtomicUsize::new(0));
        lock(&self.shared.rules).push(Rule {
            op,
            key_contains,
            fault,
            limit,
            set_at: Instant::now(),
            fired: fired.clone(),
            seen: AtomicUsize::new(0),
        });
        FaultHandle { fired }
    }

    /// Disarms every rule; keys already hidden by [`Fault::NotFoundAfterWrite`] are visible
    /// again.
    pub fn clear_faults(&self) {
        lock(&self.shared.rules).clear();
        lock(&self.shared.hidden).clear();
    }

    /// While down, every new connection is closed as soon as it is accepted, and a request
    /// arriving on an open one is dropped with its connection, unanswered and unrecorded: the
    /// bucket is unreachable.
    pub fn set_down(&self, down: bool) {
        self.shared.down.store(down, Ordering::SeqCst);
    }

    /// Every request recorded so far, oldest first. A request is recorded before its client
    /// can see the outcome (before the answer's first byte, or the close), so whatever a client
    /// has observed is in here.
    pub fn requests(&self) -> Vec<Recorded> {
        lock(&self.shared.log).clone()
    }

    /// The operations of [`S3Relay::requests`], in order.
    pub fn ops(&self) -> Vec<Op> {
        lock(&self.shared.log).iter().map(|r| r.op).collect()
    }

    /// How many requests of `op` were recorded.
    pub fn count(&self, op: Op) -> usize {
        lock(&self.shared.log).iter().filter(|r| r.op == op).count()
    }

    /// How many requests of `op` on a key containing `key_contains` were recorded.
    pub fn count_key(&self, op: Op, key_contains: &str) -> usize {
        lock(&self.shared.log)
            .iter()
            .filter(|r| r.op == op && r.key.contains(key_contains))
            .count()
    }

    /// The statuses the client got for requests of `op`, in order (`None`: no status line).
    pub fn statuses(&self, op: Op) -> Vec<Option<u16>> {
        lock(&self.shared.log)
            .iter()
            .filter(|r| r.op == op)
            .map(|r| r.status)
            .collect()
    }
}

impl Drop for S3Relay {
    fn drop(&mut self) {
        self.task.abort();
        if std::thread::panicking() {
            let log = lock(&self.shared.log);
            eprintln!("----- s3 relay ({} requests) -----", log.len());
            for r in log.iter() {
                eprintln!(
                    "{} {} {}/{} -> status {:?} (upstream {:?}) fault {:?}",
                    r.op, r.method, r.bucket, r.key, r.status, r.upstream, r.fault
                );
            }
        }
    }
}

struct Shared {
    upstream: SocketAddr,
    down: AtomicBool,
    rules: Mutex<Vec<Rule>>,
    /// `(bucket, key)` → until when reads of it answer 404, and the lag that was armed.
    hidden: Mutex<HashMap<(String, String), (Instant, Duration)>>,
    log: Mutex<Vec<Recorded>>,
}

impl Shared {
    fn is_down(&self) -> bool {
        self.down.load(Ordering::SeqCst)
    }

    /// The fault of the first armed rule matching `req`, counting it as fired.
    fn take_fault(&self, req: &Request) -> Option<Fault> {
        let rules = lock(&self.rules);
        let rule = rules.iter().find(|rule| {
            let matching = rule.op == req.op
                && rule
                    .key_contains
                    .as_deref()
                    .is_none_or(|part| req.key.contains(part));
            matching && rule.armed(rule.seen.fetch_add(1, Ordering::SeqCst))
        })?;
        rule.fired.fetch_add(1, Ordering::SeqCst);
        Some(rule.fault)
    }

    /// The lag hiding `req`'s key, if a read of it is to be answered 404 now.
    fn hidden(&self, req: &Request) -> Option<Duration> {
        let mut hidden = lock(&self.hidden);
        let id = (req.bucket.clone(), req.key.clone());
        match hidden.get(&id) {
            Some(&(until, lag)) if Instant::now() < until => Some(lag),
            Some(_) => {
                hidden.remove(&id);
                None
            }
            None => None,
        }
    }

    fn hide(&self, req: &Request, lag: Duration) {
        lock(&self.hidden).insert(
            (req.bucket.clone(), req.key.clone()),
            (Instant::now() + lag, lag),
        );
    }

    fn record(
        &self,
        req: &Request,
        status: Option<u16>,
        upstream: Option<u16>,
        fault: Option<Fault>,
    ) {
        lock(&self.log).push(Recorded {
            op: req.op,
            method: req.method.clone(),
            bucket: req.bucket.clone(),
            key: req.key.clone(),
            status,
            upstream,
            fault,
        });
    }
}

struct Rule {
    op: Op,
    key_contains: Option<String>,
    fault: Fault,
    limit: Limit,
    set_at: Instant,
    fired: Arc<AtomicUsize>,
    /// Matching requests so far, faulted or not.
    seen: AtomicUsize,
}

impl Rule {
    /// Whether the rule applies to a matching request, `seen` others having come before it.
    fn armed(&self, seen: usize) -> bool {
        match self.limit {
            Limit::Times(n) => self.fired.load(Ordering::SeqCst) < n,
            Limit::For(d) => self.set_at.elapsed() < d,
            Limit::Always => true,
            Limit::After(n) => seen >= n,
        }
    }
}

/// A poisoned lock only means another test thread panicked; the data is still what it was.
fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// What the client connection does after an exchange.
enum Next {
    KeepAlive,
    Close,
    Hang,
}

/// The client's side of a connection.
struct Client {
    rd: BufReader<OwnedReadHalf>,
    wr: OwnedWriteHalf,
}

/// One client connection: requests one after the other, as HTTP/1.1 keep-alive allows.
async fn serve(shared: Arc<Shared>, stream: TcpStream) {
    if shared.is_down() {
        return;
    }
    let _ = stream.set_nodelay(true);
    let (rd, wr) = stream.into_split();
    let mut client = Client {
        rd: BufReader::with_capacity(BUF_SIZE, rd),
        wr,
    };
    loop {
        let head = match read_head(&mut client.rd).await {
            Ok(Some(head)) => head,
            Ok(None) | Err(_) => return,
        };
        if shared.is_down() {
            return;
        }
        let Some(req) = Request::parse(head) else {
            let _ = client
                .wr
                .write_all(
                    b"HTTP/1.1 400 Bad Request\r\ncontent-length: 0\r\nconnection: close\r\n\r\n",
                )
                .await;
            return linger_close(client).await;
        };
        match exchange(&shared, &req, &mut client).await {
            Next::KeepAlive => {}
            Next::Close => return linger_close(client).await,
            Next::Hang => std::future::pending().await,
        }
    }
}

/// Serves one request: a fault, a read hidden by [`Fault::NotFoundAfterWrite`], or forwarding.
async fn exchange(shared: &Shared, req: &Request, client: &mut Client) -> Next {
    if matches!(req.op, Op::HeadObject | Op::GetObject) {
        if let Some(lag) = shared.hidden(req) {
            return answer_error(
                shared,
                req,
                client,
                404,
                Some(Fault::NotFoundAfterWrite(lag)),
            )
            .await;
        }
    }
    let fault = shared.take_fault(req);
    match fault {
        None => forward(shared, req, client, Forwarding::Answer, None).await,
        Some(Fault::NotFoundAfterWrite(lag)) => {
            forward(shared, req, client, Forwarding::Answer, Some(lag)).await
        }
        Some(Fault::LoseAnswer) => forward(shared, req, client, Forwarding::LoseAnswer, None).await,
        Some(Fault::Status(code)) => answer_error(shared, req, client, code, fault).await,
        Some(Fault::MalformedStatus) => {
            drain_unless_waiting(req, client).await;
            shared.record(req, None, None, fault);
            let _ = client.wr.write_all(b"HTTP/1.1 abc\r\n\r\n").await;
            Next::Close
        }
        Some(Fault::Close) => {
            drain_unless_waiting(req, client).await;
            shared.record(req, None, None, fault);
            Next::Close
        }
        Some(Fault::Hang) => {
            shared.record(req, None, None, fault);
            Next::Hang
        }
    }
}

/// Reads and discards the request body, so that the answer (or the close) is what the client
/// sees rather than a reset for unread data. A client waiting for `100 Continue` has not sent
/// its body and will not: there is nothing to drain, and the connection closes after the answer.
async fn drain_unless_waiting(req: &Request, client: &mut Client) -> bool {
    if req.expect_continue && req.body != Framing::None {
        return false;
    }
    copy_body(&mut client.rd, &mut tokio::io::sink(), req.body)
        .await
        .is_ok()
}

/// Answers `status` with an S3 XML error body, without forwarding.
async fn answer_error(
    shared: &Shared,
    req: &Request,
    client: &mut Client,
    status: u16,
    fault: Option<Fault>,
) -> Next {
    let drained = drain_unless_waiting(req, client).await;
    let (code, message) = s3_error(status);
    let body = format!(
        "<?xml version=\"1.0\" encoding=\"UTF-8\"?><Error><Code>{code}</Code>\
         <Message>{message}</Message><Resource>{}</Resource></Error>",
        req.path
    );
    let keep_alive = drained && !req.close;
    let reason = http::StatusCode::from_u16(status)
        .ok()
        .and_then(|s| s.canonical_reason())
        .unwrap_or("Injected");
    let mut answer = format!(
        "HTTP/1.1 {status} {reason}\r\ncontent-type: application/xml\r\ncontent-length: {}\r\n{}\r\n",
        body.len(),
        if keep_alive { "" } else { "connection: close\r\n" }
    )
    .into_bytes();
    // A HEAD answer announces the length a GET would have, without the body.
    if req.method != "HEAD" {
        answer.extend_from_slice(body.as_bytes());
    }
    shared.record(req, Some(status), None, fault);
    match client.wr.write_all(&answer).await {
        Ok(()) if keep_alive => Next::KeepAlive,
        _ => Next::Close,
    }
}

/// The S3 error code and message a real store gives with `status`.
fn s3_error(status: u16) -> (&'static str, &'static str) {
    match status {
        400 => ("InvalidRequest", "Bad request"),
        403 => ("AccessDenied", "Access denied"),
        404 => ("NoSuchKey", "The specified key does not exist."),
        409 => (
            "OperationAborted",
            "A conflicting operation is in progress.",
        ),
        412 => (
            "PreconditionFailed",
            "At least one of the preconditions does not hold.",
        ),
        500 => (
            "InternalError",
            "We encountered an internal error. Please try again.",
        ),
        501 => ("NotImplemented", "Not implemented"),
        503 => ("SlowDown", "Please reduce your request rate."),
        _ => ("InjectedFault", "Fault injected by the test relay"),
    }
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Forwarding {
    /// Relay the server's answer to the client.
    Answer,
    /// Read the server's answer to the end and drop it.
    LoseAnswer,
}

/// Forwards `req` to the server and, unless `forwarding` loses it, its answer back. `hide_for`:
/// on a 2xx, hide the key from reads for that long (armed before the client sees the answer,
/// so its very next read is hidden).
async fn forward(
    shared: &Shared,
    req: &Request,
    client: &mut Client,
    forwarding: Forwarding,
    hide_for: Option<Duration>,
) -> Next {
    let fault = match (forwarding, hide_for) {
        (Forwarding::LoseAnswer, _) => Some(Fault::LoseAnswer),
        (_, Some(lag)) => Some(Fault::NotFoundAfterWrite(lag)),
        _ => None,
    };
    // Refused: the client sees its connection closed, as with the bucket unreachable.
    let Ok(upstream) = TcpStream::connect(shared.upstream).await else {
        shared.record(req, None, None, fault);
        return Next::Close;
    };
    let _ = upstream.set_nodelay(true);
    let (urd, mut uwr) = upstream.into_split();
    let mut urd = BufReader::with_capacity(BUF_SIZE, urd);
    if uwr.write_all(&req.raw).await.is_err() {
        shared.record(req, None, None, fault);
        return Next::Close;
    }

    let Client { rd: crd, wr: cwr } = client;
    let mut recorded = false;
    let (answered, pumped) = {
        // The body goes up while the answer is awaited: a server may answer early, and a client
        // sending `Expect: 100-continue` needs the server's 100 relayed before it sends its body.
        let mut pump = pin!(copy_body(crd, &mut uwr, req.body));
        let mut answer = pin!(async {
            loop {
                let head = read_head(&mut urd)
                    .await?
                    .ok_or_else(|| io::Error::from(ErrorKind::UnexpectedEof))?;
                let resp = Response::parse(&head, &req.method)
                    .ok_or_else(|| io::Error::new(ErrorKind::InvalidData, "bad status line"))?;
                if resp.interim {
                    // Not the answer: even a lost answer lets the client send its body.
                    cwr.write_all(&head).await?;
                    continue;
                }
                if let (Some(lag), true) = (hide_for, (200..300).contains(&resp.status)) {
                    shared.hide(req, lag);
                }
                match forwarding {
                    Forwarding::Answer => {
                        shared.record(req, Some(resp.status), Some(resp.status), fault);
                        recorded = true;
                        cwr.write_all(&head).await?;
                        copy_body(&mut urd, &mut *cwr, resp.body)
                            .await
                            .map_err(CopyError::into_io)?;
                    }
                    Forwarding::LoseAnswer => {
                        copy_body(&mut urd, &mut tokio::io::sink(), resp.body)
                            .await
                            .map_err(CopyError::into_io)?;
                        shared.record(req, None, Some(resp.status), fault);
                        recorded = true;
                    }
                }
                return Ok::<_, io::Error>(resp);
            }
        });
        let mut pumped = None;
        let answered = loop {
            tokio::select! {
                done = &mut pump, if pumped.is_none() => match done {
                    // The client stopped sending mid-body: the request is incomplete, give up.
                    Err(CopyError::Read(_)) => break None,
                    // The server stopped reading: it may well be answering early; wait for that.
                    other => pumped = Some(other.is_ok()),
                },
                done = &mut answer => break Some(done),
            }
        };
        (answered, pumped)
    };
    if !recorded {
        shared.record(req, None, None, fault);
    }
    match answered {
        Some(Ok(resp))
            if forwarding == Forwarding::Answer
                && pumped == Some(true)
                && !req.close
                && !resp.close
                && resp.body != Framing::UntilClose =>
        {
            Next::KeepAlive
        }
        _ => Next::Close,
    }
}

/// Closes a client connection the polite way: end our side, then wait (a little) for the client
/// to end its, discarding what it still sends. Closing with unread data would make the kernel
/// send a reset, which can destroy the answer before the client reads it.
async fn linger_close(mut client: Client) {
    let _ = client.wr.shutdown().await;
    let mut sink = [0u8; 8192];
    let _ = tokio::time::timeout(LINGER, async {
        while let Ok(n) = client.rd.read(&mut sink).await {
            if n == 0 {
                break;
            }
        }
    })
    .await;
}

/// How a message body is delimited (RFC 9112 §6).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Framing {
    None,
    Length(u64),
    Chunked,
    /// A response without length: the body ends when the server closes.
    UntilClose,
}

/// A parsed request head; `raw` is what is forwarded.
struct Request {
    raw: Vec<u8>,
    method: String,
    /// The target's path, still percent-encoded.
    path: String,
    op: Op,
    bucket: String,
    key: String,
    body: Framing,
    expect_continue: bool,
    close: bool,
}

impl Request {
    fn parse(raw: Vec<u8>) -> Option<Self> {
        let (first, headers) = split_head(&raw)?;
        let mut parts = first.split_whitespace();
        let (method, target, version) = (parts.next()?, parts.next()?, parts.next()?);
        if !version.starts_with("HTTP/1.") {
            return None;
        }
        // Origin form (`/bucket/key?query`); an absolute form loses its scheme and authority.
        let target = match target.split_once("://") {
            Some((_, rest)) => rest.find('/').map_or("/", |i| &rest[i..]),
            None => target,
        };
        let (path, query) = target.split_once('?').unwrap_or((target, ""));
        let body = if is_chunked(&headers) {
            Framing::Chunked
        } else {
            match content_length(&headers) {
                Some(0) | None => Framing::None,
                Some(n) => Framing::Length(n),
            }
        };
        let (op, bucket, key) = classify(method, path, query, &headers);
        Some(Self {
            method: method.to_owned(),
            path: path.to_owned(),
            op,
            bucket,
            key,
            body,
            expect_continue: header_has_token(&headers, "expect", "100-continue"),
            close: header_has_token(&headers, "connection", "close")
                || (version == "HTTP/1.0"
                    && !header_has_token(&headers, "connection", "keep-alive")),
            raw,
        })
    }
}

/// A parsed response head.
struct Response {
    status: u16,
    /// A 1xx other than 101: more heads follow.
    interim: bool,
    body: Framing,
    close: bool,
}

impl Response {
    fn parse(raw: &[u8], request_method: &str) -> Option<Self> {
        let (first, headers) = split_head(raw)?;
        let mut parts = first.split_whitespace();
        let version = parts.next()?;
        let status: u16 = parts.next()?.parse().ok()?;
        if !version.starts_with("HTTP/1.") || !(100..600).contains(&status) {
            return None;
        }
        let body = if request_method == "HEAD"
            || (100..200).contains(&status)
            || status == 204
            || status == 304
        {
            Framing::None
        } else if is_chunked(&headers) {
            Framing::Chunked
        } else {
            match content_length(&headers) {
                Some(0) => Framing::None,
                Some(n) => Framing::Length(n),
                None => Framing::UntilClose,
            }
        };
        Some(Self {
            status,
            interim: (100..200).contains(&status) && status != 101,
            body,
            close: header_has_token(&headers, "connection", "close") || version == "HTTP/1.0",
        })
    }
}

/// The start line and the `(lowercase name, value)` headers of a head. Header values are only
/// inspected, never rewritten, so a lossy decoding of odd bytes is harmless.
fn split_head(raw: &[u8]) -> Option<(String, Vec<(String, String)>)> {
    let text = String::from_utf8_lossy(raw);
    let mut lines = text.lines().map(|l| l.trim_end_matches('\r'));
    let first = lines.next()?.to_owned();
    let mut headers = Vec::new();
    for line in lines.take_while(|l| !l.is_empty()) {
        let (name, value) = line.split_once(':')?;
        headers.push((name.trim().to_ascii_lowercase(), value.trim().to_owned()));
    }
    Some((first, headers))
}

fn header_values<'a>(
    headers: &'a [(String, String)],
    name: &'a str,
) -> impl Iterator<Item = &'a str> {
    headers
        .iter()
        .filter(move |(n, _)| n == name)
        .map(|(_, v)| v.as_str())
}

fn header_has_token(headers: &[(String, String)], name: &str, token: &str) -> bool {
    header_values(headers, name)
        .flat_map(|v| v.split(','))
        .any(|t| t.trim().eq_ignore_ascii_case(token))
}

/// Chunked when `chunked` is the last transfer coding.
fn is_chunked(headers: &[(String, String)]) -> bool {
    header_values(headers, "transfer-encoding")
        .flat_map(|v| v.split(','))
        .last()
        .is_some_and(|t| t.trim().eq_ignore_ascii_case("chunked"))
}

fn content_length(headers: &[(String, String)]) -> Option<u64> {
    header_values(headers, "content-length").find_map(|v| v.parse().ok())
}

/// The operation, bucket and key of a path-style S3 request.
fn classify(
    method: &str,
    path: &str,
    query: &str,
    headers: &[(String, String)],
) -> (Op, String, String) {
    let trimmed = path.trim_start_matches('/');
    let (bucket, key) = trimmed.split_once('/').unwrap_or((trimmed, ""));
    let (bucket, key) = (percent_decode(bucket), percent_decode(key));
    let param = |name: &str| {
        query
            .split('&')
            .map(|pair| pair.split_once('=').unwrap_or((pair, "")))
            .find(|(n, _)| *n == name)
            .map(|(_, v)| v)
    };
    let has = |name: &str| param(name).is_some();
    // Sub-resources that turn an object request into something else (ACLs, tags, ListParts...).
    let sub_resource = [
        "acl",
        "tagging",
        "retention",
        "legal-hold",
        "attributes",
        "restore",
        "torrent",
    ]
    .iter()
    .any(|name| has(name));
    let op = if key.is_empty() {
        match method {
            "GET" if param("list-type") == Some("2") => Op::ListObjectsV2,
            "POST" if has("delete") => Op::DeleteObjects,
            _ => Op::Other,
        }
    } else if sub_resource {
        Op::Other
    } else {
        match method {
            "POST" if has("uploads") => Op::CreateMultipartUpload,
            "POST" if has("uploadId") => Op::CompleteMultipartUpload,
            "PUT" if has("uploadId") && has("partNumber") => Op::UploadPart,
            "DELETE" if has("uploadId") => Op::AbortMultipartUpload,
            "GET" if has("uploadId") => Op::Other,
            "PUT" if header_values(headers, "x-amz-copy-source").next().is_some() => Op::CopyObject,
            "PUT" => Op::PutObject,
            "GET" => Op::GetObject,
            "HEAD" => Op::HeadObject,
            "DELETE" => Op::DeleteObject,
            _ => Op::Other,
        }
    };
    (op, bucket, key)
}

/// `%XX` escapes decoded; anything malformed is kept as it is.
fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let hex = bytes
            .get(i + 1..i + 3)
            .and_then(|h| std::str::from_utf8(h).ok())
            .and_then(|h| u8::from_str_radix(h, 16).ok());
        match (bytes[i], hex) {
            (b'%', Some(b)) => {
                out.push(b);
                i += 3;
            }
            (b, _) => {
                out.push(b);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Reads a head up to and including its empty line; `None` on a clean end of stream before
/// any byte. Empty lines before a request line are skipped, as RFC 9112 §2.2 allows.
async fn read_head<R: AsyncBufRead + Unpin>(r: &mut R) -> io::Result<Option<Vec<u8>>> {
    let mut head = Vec::new();
    loop {
        let start = head.len();
        let n = read_line(r, &mut head).await?;
        if n == 0 {
            return if head.is_empty() {
                Ok(None)
            } else {
                Err(ErrorKind::UnexpectedEof.into())
            };
        }
        if head.len() > MAX_HEAD {
            return Err(io::Error::new(ErrorKind::InvalidData, "head too long"));
        }
        if matches!(&head[start..], b"\r\n" | b"\n") {
            if start == 0 {
                head.clear();
                continue;
            }
            return Ok(Some(head));
        }
    }
}

/// Appends one line (with its `\n`) to `buf`; 0 at end of stream. A line longer than
/// [`MAX_HEAD`] is an error, so a peer sending no newline cannot grow `buf` without end.
async fn read_line<R: AsyncBufRead + Unpin>(r: &mut R, buf: &mut Vec<u8>) -> io::Result<usize> {
    let n = (&mut *r)
        .take(MAX_HEAD as u64)
        .read_until(b'\n', buf)
        .await?;
    if n == MAX_HEAD && !buf.ends_with(b"\n") {
        return Err(io::Error::new(ErrorKind::InvalidData, "line too long"));
    }
    Ok(n)
}

/// Which side failed while copying a body.
#[derive(Debug)]
enum CopyError {
    Read(io::Error),
    Write(io::Error),
}

impl CopyError {
    fn into_io(self) -> io::Error {
        match self {
            CopyError::Read(e) | CopyError::Write(e) => e,
        }
    }
}

/// Copies one body framed as `framing` from `r` to `w`, bytes as they are (chunk sizes and
/// trailers included), reading no further than its end.
async fn copy_body<R, W>(r: &mut R, w: &mut W, framing: Framing) -> Result<(), CopyError>
where
    R: AsyncBufRead + Unpin,
    W: AsyncWrite + Unpin,
{
    match framing {
        Framing::None => Ok(()),
        Framing::Length(n) => copy_exact(r, w, n).await,
        Framing::Chunked => copy_chunked(r, w).await,
        Framing::UntilClose => loop {
            let buf = r.fill_buf().await.map_err(CopyError::Read)?;
            if buf.is_empty() {
                return Ok(());
            }
            let n = buf.len();
            w.write_all(buf).await.map_err(CopyError::Write)?;
            r.consume(n);
        },
    }
}

async fn copy_exact<R, W>(r: &mut R, w: &mut W, mut left: u64) -> Result<(), CopyError>
where
    R: AsyncBufRead + Unpin,
    W: AsyncWrite + Unpin,
{
    while left > 0 {
        let buf = r.fill_buf().await.map_err(CopyError::Read)?;
        if buf.is_empty() {
            return Err(CopyError::Read(ErrorKind::UnexpectedEof.into()));
        }
        let n = buf.len().min(usize::try_from(left).unwrap_or(usize::MAX));
        w.write_all(&buf[..n]).await.map_err(CopyError::Write)?;
        r.consume(n);
        left -= n as u64;
    }
    Ok(())
}

async fn copy_chunked<R, W>(r: &mut R, w: &mut W) -> Result<(), CopyError>
where
    R: AsyncBufRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let mut line = Vec::new();
    // One line, copied; a clean end of stream here is a truncated body.
    async fn copy_line<R, W>(r: &mut R, w: &mut W, line: &mut Vec<u8>) -> Result<(), CopyError>
    where
        R: AsyncBufRead + Unpin,
        W: AsyncWrite + Unpin,
    {
        line.clear();
        if read_line(r, line).await.map_err(CopyError::Read)? == 0 {
            return Err(CopyError::Read(ErrorKind::UnexpectedEof.into()));
        }
        w.write_all(line).await.map_err(CopyError::Write)
    }
    loop {
        copy_line(r, w, &mut line).await?;
        let text = String::from_utf8_lossy(&line);
        let size = text.split(';').next().unwrap_or_default().trim();
        let size = u64::from_str_radix(size, 16).map_err(|_| {
            CopyError::Read(io::Error::new(
                ErrorKind::InvalidData,
                format!("bad chunk size {text:?}"),
            ))
        })?;
        if size == 0 {
            // Trailers, then the empty line that ends the body.
            loop {
                copy_line(r, w, &mut line).await?;
                if matches!(line.as_slice(), b"\r\n" | b"\n") {
                    return Ok(());
                }
            }
        }
        copy_exact(r, w, size).await?;
        copy_line(r, w, &mut line).await?; // the CRLF after the data
    }
}
