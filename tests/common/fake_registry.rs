//! In-process fake upstream registry speaking the OCI distribution pull API, for integration tests.
//!
//! It serves blobs, manifests, tag lists and referrers over plain HTTP/1.1 on `127.0.0.1:0`, can
//! demand bearer or basic auth, redirect blob GETs to another fake, fail every request, and misbehave
//! per blob (corrupt, truncate, stall, gate, trickle). Every request is recorded *before* any of that
//! happens, so counts include requests that failed, hung or stalled.
//!
//! Bodies are streamed frame by frame from a stream owned by the response body, so a stall or a
//! truncation really happens on the wire, and dropping the connection drops the stalled body with it.
//! Connection tasks live in a `JoinSet` owned by the accept task, which `Drop` aborts: nothing a test
//! leaves hanging outlives the `FakeRegistry`.

use std::collections::{BTreeMap, HashMap};
use std::convert::Infallible;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::task::{Context, Poll};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use http::{header, HeaderMap, Method, Request, Response, StatusCode};
use http_body_util::combinators::UnsyncBoxBody;
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use sha2::{Digest, Sha256};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{watch, Notify};
use tokio::task::JoinHandle;
// tokio's Instant so a test running on a paused clock can expire tokens with `time::advance`.
use tokio::time::Instant;

use super::{
    base64_encode, serve_connections, sha256_digest, OCI_CONFIG, OCI_INDEX, OCI_LAYER, OCI_MANIFEST,
};

type Body = UnsyncBoxBody<Bytes, io::Error>;
/// Bumped each time hyper has emptied its write buffer into the socket (see [`FlushCounted`]).
type Flushes = Arc<watch::Sender<u64>>;

/// Frame size for streamed bodies: small enough that stalls and truncations land mid-body.
const CHUNK: usize = 64 * 1024;
const SERVICE: &str = "fake-registry";

/// A running fake registry; dropping it stops the server and every connection it holds.
pub struct FakeRegistry {
    addr: SocketAddr,
    state: Arc<State>,
    server: JoinHandle<()>,
}

/// One request as the fake saw it on arrival.
#[derive(Clone, Debug)]
pub struct Recorded {
    pub method: String,
    pub path: String,
    pub query: Option<String>,
    pub headers: HeaderMap,
}

/// How GET responses for one digest (blob or manifest) misbehave. HEAD is never affected.
#[derive(Clone, Debug)]
pub enum BlobBehavior {
    /// Serve the bytes as stored.
    Normal,
    /// Same length, one byte flipped, so the digest won't match.
    Corrupt,
    /// Announce the full Content-Length, send `after` bytes, then abort the connection.
    /// `after` should be less than the body length, or the client may see a complete body.
    Truncate { after: usize },
    /// Send headers and `after` bytes, then wait for `release` before sending the rest.
    ///
    /// Each stalled response waits on `release.notified()`, so `notify_one()` frees exactly one
    /// of them, and one issued before any response reached the stall is stored and not lost
    /// (at most one is stored). To free several at once, call `notify_waiters()` after they are
    /// all waiting, or `notify_one()` once per waiting response.
    Stall { after: usize, release: Arc<Notify> },
    /// Wait for `release` before sending even the response headers; released like `Stall`.
    Gate { release: Arc<Notify> },
    /// Send `chunk`-byte frames with `delay` between them.
    Slow { chunk: usize, delay: Duration },
}

/// A failure applied to every request except the token endpoint.
#[derive(Clone, Debug)]
pub enum Failure {
    /// Answer with this status and an OCI error body.
    Status(u16),
    /// As `Status`, plus a `Retry-After` header with this value.
    StatusRetryAfter(u16, String),
    /// Accept the request and never answer.
    Hang,
}

/// Digests of an image stored by [`FakeRegistry::push_image`].
#[derive(Clone, Debug)]
pub struct PushedImage {
    pub manifest: String,
    pub manifest_body: Bytes,
    pub config: String,
    pub layers: Vec<String>,
}

struct State {
    addr: SocketAddr,
    inner: Mutex<Inner>,
}

impl State {
    fn lock(&self) -> MutexGuard<'_, Inner> {
        // A panicking test thread must not turn every later request into a second panic.
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }
}

#[derive(Default)]
struct Inner {
    blobs: HashMap<String, Bytes>,
    repos: HashMap<String, Repo>,
    behaviors: HashMap<String, BlobBehavior>,
    failure: Option<Failure>,
    auth: Auth,
    tokens: HashMap<String, Instant>,
    token_serial: u64,
    /// Base URL that blob GETs are redirected to.
    redirect_to: Option<String>,
    /// Registries that redirect here; `/direct/<digest>` falls back to their blobs.
    origins: Vec<Weak<State>>,
    requests: Vec<Recorded>,
    /// Headers added to every response (e.g. `RateLimit-Remaining`).
    extra_headers: Vec<(String, String)>,
    /// The `realm` of bearer challenges, when not our own `/token`.
    token_realm: Option<String>,
    /// Referrers requests answer 404, as a registry without the referrers API does.
    no_referrers_api: bool,
    /// Referrers lists are paged this many descriptors at a time (`Link` to the next page).
    referrers_page: Option<usize>,
}

impl Inner {
    /// A stored blob's bytes and its behaviour, if any.
    fn blob(&self, digest: &str) -> (Option<Bytes>, Option<BlobBehavior>) {
        (
            self.blobs.get(digest).cloned(),
            self.behaviors.get(digest).cloned(),
        )
    }
}

#[derive(Default)]
struct Repo {
    manifests: HashMap<String, StoredManifest>,
    tags: BTreeMap<String, String>,
}

struct StoredManifest {
    media_type: String,
    body: Bytes,
}

#[derive(Default)]
enum Auth {
    #[default]
    Anonymous,
    Bearer {
        creds: Option<(String, String)>,
        expires_in: u64,
    },
    Basic {
        user: String,
        pass: String,
    },
}

impl FakeRegistry {
    /// Binds `127.0.0.1:0` and serves HTTP/1.1 from a spawned task.
    pub async fn start() -> FakeRegistry {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("fake registry: bind 127.0.0.1:0");
        let addr = listener.local_addr().expect("fake registry: local_addr");
        let state = Arc::new(State {
            addr,
            inner: Mutex::default(),
        });
        let server = tokio::spawn(serve(listener, state.clone()));
        FakeRegistry {
            addr,
            state,
            server,
        }
    }

    /// `http://127.0.0.1:PORT`, no trailing slash.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Stores a blob (served under any repository name) and returns its digest.
    pub fn add_blob(&self, data: impl Into<Bytes>) -> String {
        let data = data.into();
        let digest = sha256_digest(&data);
        self.state.lock().blobs.insert(digest.clone(), data);
        digest
    }

    /// Stores a manifest in `repo` by digest, optionally pointing `tag` at it; returns the digest.
    pub fn put_manifest(
        &self,
        repo: &str,
        tag: Option<&str>,
        media_type: &str,
        body: impl Into<Bytes>,
    ) -> String {
        let body = body.into();
        let digest = sha256_digest(&body);
        let mut inner = self.state.lock();
        let r = inner.repos.entry(repo.to_string()).or_default();
        r.manifests.insert(
            digest.clone(),
            StoredManifest {
                media_type: media_type.to_string(),
                body,
            },
        );
        if let Some(tag) = tag {
            r.tags.insert(tag.to_string(), digest.clone());
        }
        digest
    }

    /// Points `tag` at `digest` (which need not be stored: resolving it then gives 404).
    pub fn set_tag(&self, repo: &str, tag: &str, digest: &str) {
        let mut inner = self.state.lock();
        let r = inner.repos.entry(repo.to_string()).or_default();
        r.tags.insert(tag.to_string(), digest.to_string());
    }

    pub fn remove_tag(&self, repo: &str, tag: &str) {
        if let Some(r) = self.state.lock().repos.get_mut(repo) {
            r.tags.remove(tag);
        }
    }

    /// Stores config + layer blobs and an OCI image manifest referencing them, tagged `tag`.
    pub fn push_image(&self, repo: &str, tag: &str, layers: &[Bytes]) -> PushedImage {
        let config_body = Bytes::from(format!(
            r#"{{"architecture":"amd64","os":"linux","config":{{}},"rootfs":{{"type":"layers","diff_ids":[]}},"repo":"{repo}","tag":"{tag}"}}"#
        ));
        let config_len = config_body.len();
        let config = self.add_blob(config_body);
        let mut layer_digests = Vec::new();
        let mut layer_json = Vec::new();
        for layer in layers {
            let d = self.add_blob(layer.clone());
            layer_json.push(serde_json::json!({
                "mediaType": OCI_LAYER, "digest": d, "size": layer.len()
            }));
            layer_digests.push(d);
        }
        let manifest_body = Bytes::from(
            serde_json::to_vec(&serde_json::json!({
                "schemaVersion": 2,
                "mediaType": OCI_MANIFEST,
                "config": {"mediaType": OCI_CONFIG, "digest": config, "size": config_len},
                "layers": layer_json,
            }))
            .expect("serialize manifest"),
        );
        let manifest = self.put_manifest(repo, Some(tag), OCI_MANIFEST, manifest_body.clone());
        PushedImage {
            manifest,
            manifest_body,
            config,
            layers: layer_digests,
        }
    }

    /// Sets how GETs of `digest` (blob, manifest, or redirect target) misbehave.
    pub fn set_blob_behavior(&self, digest: &str, b: BlobBehavior) {
        self.state.lock().behaviors.insert(digest.to_string(), b);
    }

    /// When `Some`, every request except `/token` fails this way (after being recorded).
    pub fn set_failure(&self, f: Option<Failure>) {
        self.state.lock().failure = f;
    }

    /// Requires bearer tokens on `/v2/...`; `/token` hands them out, demanding these basic
    /// credentials when `Some`. Tokens expire `expires_in` seconds after issue.
    pub fn require_bearer(&self, creds: Option<(String, String)>, expires_in: u64) {
        self.state.lock().auth = Auth::Bearer { creds, expires_in };
    }

    /// Requires `Authorization: Basic base64(user:pass)` on `/v2/...`.
    pub fn require_basic(&self, user: &str, pass: &str) {
        self.state.lock().auth = Auth::Basic {
            user: user.to_string(),
            pass: pass.to_string(),
        };
    }

    /// Bearer challenges name this realm instead of our own `/token` (which still serves
    /// tokens): an upstream that sends its clients' credentials elsewhere.
    pub fn set_token_realm(&self, realm: &str) {
        self.state.lock().token_realm = Some(realm.to_string());
    }

    /// Referrers requests answer `404 page not found` (text/plain), as distribution 2.8 does.
    pub fn disable_referrers_api(&self) {
        self.state.lock().no_referrers_api = true;
    }

    /// Referrers lists come `n` descriptors a page, each with a `Link` to the next.
    pub fn page_referrers(&self, n: usize) {
        self.state.lock().referrers_page = Some(n.max(1));
    }

    /// Turns auth off again (the default).
    pub fn allow_anonymous(&self) {
        self.state.lock().auth = Auth::Anonymous;
    }

    /// Forgets every issued token, as if the upstream rotated its signing key.
    pub fn revoke_tokens(&self) {
        self.state.lock().tokens.clear();
    }

    /// Blob GETs here answer `307 Location: <other.url()>/direct/<digest>`; `other` serves that
    /// path without auth, from its own blobs or else from ours.
    pub fn redirect_blobs_to(&self, other: &FakeRegistry) {
        self.state.lock().redirect_to = Some(other.url());
        other.state.lock().origins.push(Arc::downgrade(&self.state));
    }

    /// Every request received, in arrival order.
    pub fn requests(&self) -> Vec<Recorded> {
        self.state.lock().requests.clone()
    }

    /// Recorded requests with this method (case-insensitive) whose path contains `path_contains`.
    pub fn count(&self, method: &str, path_contains: &str) -> usize {
        self.state
            .lock()
            .requests
            .iter()
            .filter(|r| r.method.eq_ignore_ascii_case(method) && r.path.contains(path_contains))
            .count()
    }

    /// Forgets recorded requests.
    pub fn reset_counts(&self) {
        self.state.lock().requests.clear();
    }

    /// Adds a header to every response from now on.
    pub fn add_response_header(&self, name: &str, value: &str) {
        self.state
            .lock()
            .extra_headers
            .push((name.to_string(), value.to_string()));
    }
}

impl Drop for FakeRegistry {
    fn drop(&mut self) {
        self.server.abort();
    }
}

async fn serve(listener: TcpListener, state: Arc<State>) {
    serve_connections(listener, move |stream| {
        let state = state.clone();
        let flushes: Flushes = Arc::new(watch::Sender::new(0));
        let io = FlushCounted {
            stream,
            flushes: flushes.clone(),
        };
        async move {
            let svc = service_fn(move |req| handle(state.clone(), flushes.clone(), req));
            // Errors here are the misbehaviours we asked for (truncation) or client hang-ups.
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(io), svc)
                .await;
        }
    })
    .await
}

/// A connection's socket that counts completed flushes. hyper discards whatever is still in its
/// write buffer when a body errors, so a truncating body waits for a flush first; hyper only
/// flushes the socket once its own buffer is empty, so one flush means every earlier byte is out.
struct FlushCounted {
    stream: TcpStream,
    flushes: Flushes,
}

impl AsyncRead for FlushCounted {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_read(cx, buf)
    }
}

impl AsyncWrite for FlushCounted {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let res = Pin::new(&mut self.stream).poll_flush(cx);
        if let Poll::Ready(Ok(())) = res {
            self.flushes.send_modify(|n| *n += 1);
        }
        res
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_shutdown(cx)
    }
}

enum Route<'a> {
    Base,
    Blob { name: &'a str, digest: &'a str },
    Manifest { name: &'a str, reference: &'a str },
    TagsList { name: &'a str },
    Referrers { name: &'a str },
}

impl<'a> Route<'a> {
    /// Parses the part after `/v2/` from the right, since repository names contain slashes.
    fn parse(rest: &'a str) -> Option<Route<'a>> {
        if rest.is_empty() {
            return Some(Route::Base);
        }
        let mut parts = rest.rsplitn(3, '/');
        let last = parts.next()?;
        let kind = parts.next()?;
        let name = parts.next()?;
        if name.is_empty() || last.is_empty() {
            return None;
        }
        match (kind, last) {
            ("tags", "list") => Some(Route::TagsList { name }),
            ("manifests", reference) => Some(Route::Manifest { name, reference }),
            ("blobs", digest) => Some(Route::Blob { name, digest }),
            ("referrers", _) => Some(Route::Referrers { name }),
            _ => None,
        }
    }

    fn name(&self) -> Option<&'a str> {
        match self {
            Route::Base => None,
            Route::Blob { name, .. }
            | Route::Manifest { name, .. }
            | Route::TagsList { name }
            | Route::Referrers { name } => Some(name),
        }
    }
}

async fn handle(
    state: Arc<State>,
    flushes: Flushes,
    req: Request<Incoming>,
) -> Result<Response<Body>, Infallible> {
    let extra = state.lock().extra_headers.clone();
    let mut resp = handle_request(state, flushes, req).await?;
    for (name, value) in extra {
        if let (Ok(n), Ok(v)) = (
            http::HeaderName::from_bytes(name.as_bytes()),
            http::HeaderValue::from_str(&value),
        ) {
            resp.headers_mut().insert(n, v);
        }
    }
    Ok(resp)
}

async fn handle_request(
    state: Arc<State>,
    flushes: Flushes,
    req: Request<Incoming>,
) -> Result<Response<Body>, Infallible> {
    let path = req.uri().path().to_string();
    let query = req.uri().query().map(str::to_string);
    let failure = {
        let mut inner = state.lock();
        inner.requests.push(Recorded {
            method: req.method().to_string(),
            path: path.clone(),
            query: query.clone(),
            headers: req.headers().clone(),
        });
        inner.failure.clone()
    };
    if path == "/token" {
        return Ok(token(&state, req.headers()));
    }
    match failure {
        None => {}
        Some(Failure::Status(code)) => return Ok(failure_response(code, None)),
        Some(Failure::StatusRetryAfter(code, after)) => {
            return Ok(failure_response(code, Some(&after)))
        }
        Some(Failure::Hang) => std::future::pending::<()>().await,
    }
    let head = match *req.method() {
        Method::GET => false,
        Method::HEAD => true,
        _ => {
            return Ok(oci_error(
                StatusCode::METHOD_NOT_ALLOWED,
                "UNSUPPORTED",
                "pull only",
            ))
        }
    };
    if let Some(digest) = path.strip_prefix("/direct/") {
        return Ok(direct(&state, &flushes, &req, digest, head).await);
    }
    let rest = match path.strip_prefix("/v2") {
        Some("") => "",
        Some(r) if r.starts_with('/') => &r[1..],
        _ => {
            return Ok(oci_error(
                StatusCode::NOT_FOUND,
                "NOT_FOUND",
                "no such route",
            ))
        }
    };
    let Some(route) = Route::parse(rest) else {
        return Ok(oci_error(
            StatusCode::NOT_FOUND,
            "NOT_FOUND",
            "no such route",
        ));
    };
    if let Some(denied) = check_auth(&state, req.headers(), route.name()) {
        return Ok(denied);
    }
    Ok(match route {
        Route::Base => {
            let mut resp = json_response(StatusCode::OK, Bytes::from_static(b"{}"));
            resp.headers_mut().insert(
                "Docker-Distribution-API-Version",
                header::HeaderValue::from_static("registry/2.0"),
            );
            resp
        }
        Route::Blob { digest, .. } => blob(&state, &flushes, &req, digest, head).await,
        Route::Manifest { name, reference } => {
            manifest(&state, &flushes, &req, name, reference, head).await
        }
        Route::TagsList { name } => tags_list(&state, name, query.as_deref()),
        Route::Referrers { name } => referrers(&state, name, &path, query.as_deref()).await,
    })
}

async fn blob(
    state: &State,
    flushes: &Flushes,
    req: &Request<Incoming>,
    digest: &str,
    head: bool,
) -> Response<Body> {
    let ((data, behavior), redirect) = {
        let inner = state.lock();
        (inner.blob(digest), inner.redirect_to.clone())
    };
    if let (Some(_), false, Some(target)) = (&data, head, redirect) {
        return Response::builder()
            .status(StatusCode::TEMPORARY_REDIRECT)
            .header(header::LOCATION, format!("{target}/direct/{digest}"))
            .header(header::CONTENT_LENGTH, 0)
            .body(empty())
            .expect("valid response");
    }
    send_blob(req, flushes, digest, data, behavior, head).await
}

/// The redirect target: no auth, own blob and behaviour first, else an origin's.
async fn direct(
    state: &State,
    flushes: &Flushes,
    req: &Request<Incoming>,
    digest: &str,
    head: bool,
) -> Response<Body> {
    let ((mut data, mut behavior), origins) = {
        let inner = state.lock();
        (inner.blob(digest), inner.origins.clone())
    };
    for origin in origins.iter().filter_map(Weak::upgrade) {
        if data.is_some() {
            break;
        }
        let inner = origin.lock();
        if let Some(d) = inner.blobs.get(digest) {
            data = Some(d.clone());
            behavior = behavior.or_else(|| inner.behaviors.get(digest).cloned());
        }
    }
    send_blob(req, flushes, digest, data, behavior, head).await
}

/// A blob's bytes, or 404 `BLOB_UNKNOWN` when there are none.
async fn send_blob(
    req: &Request<Incoming>,
    flushes: &Flushes,
    digest: &str,
    data: Option<Bytes>,
    behavior: Option<BlobBehavior>,
    head: bool,
) -> Response<Body> {
    match data {
        Some(data) => {
            let content_type = "application/octet-stream";
            send_bytes(req, flushes, digest, data, content_type, behavior, head).await
        }
        None => oci_error(
            StatusCode::NOT_FOUND,
            "BLOB_UNKNOWN",
            "blob unknown to registry",
        ),
    }
}

async fn manifest(
    state: &State,
    flushes: &Flushes,
    req: &Request<Incoming>,
    name: &str,
    reference: &str,
    head: bool,
) -> Response<Body> {
    let found = {
        let inner = state.lock();
        inner.repos.get(name).and_then(|repo| {
            let digest = if reference.contains(':') {
                reference.to_string()
            } else {
                repo.tags.get(reference)?.clone()
            };
            let m = repo.manifests.get(&digest)?;
            let behavior = inner.behaviors.get(&digest).cloned();
            Some((digest, m.media_type.clone(), m.body.clone(), behavior))
        })
    };
    match found {
        Some((digest, media_type, body, behavior)) => {
            send_bytes(req, flushes, &digest, body, &media_type, behavior, head).await
        }
        None => oci_error(
            StatusCode::NOT_FOUND,
            "MANIFEST_UNKNOWN",
            "manifest unknown",
        ),
    }
}

fn tags_list(state: &State, name: &str, query: Option<&str>) -> Response<Body> {
    let mut n: Option<usize> = None;
    let mut last: Option<String> = None;
    for (k, v) in url::form_urlencoded::parse(query.unwrap_or("").as_bytes()) {
        match &*k {
            "n" => n = v.parse().ok(),
            "last" => last = Some(v.into_owned()),
            _ => {}
        }
    }
    let all: Vec<String> = {
        let inner = state.lock();
        let Some(repo) = inner.repos.get(name) else {
            return oci_error(
                StatusCode::NOT_FOUND,
                "NAME_UNKNOWN",
                "repository name not known",
            );
        };
        repo.tags
            .keys()
            .filter(|t| last.as_deref().is_none_or(|l| t.as_str() > l))
            .cloned()
            .collect()
    };
    let page: Vec<String> = all.iter().take(n.unwrap_or(usize::MAX)).cloned().collect();
    let more = page.len() < all.len();
    let body = serde_json::to_vec(&serde_json::json!({ "name": name, "tags": page }))
        .expect("serialize tags");
    let mut resp = json_response(StatusCode::OK, Bytes::from(body));
    if let (true, Some(n), Some(last)) = (more, n, page.last()) {
        let link = format!(r#"</v2/{name}/tags/list?last={last}&n={n}>; rel="next""#);
        resp.headers_mut()
            .insert(header::LINK, link.parse().expect("valid link header"));
    }
    resp
}

/// `referrers/<digest>`: the manifests of `name` whose `subject` is that digest, as the
/// distribution spec describes them (by digest, so the answer is the same every time), filtered
/// by `artifactType` when asked and paged when [`FakeRegistry::page_referrers`] says so. A
/// [`BlobBehavior::Gate`] set on the digest holds the answer until released.
async fn referrers(state: &State, name: &str, path: &str, query: Option<&str>) -> Response<Body> {
    let subject = path.rsplit('/').next().unwrap_or_default();
    let mut wanted = Vec::new();
    let mut page = 0usize;
    for (k, v) in url::form_urlencoded::parse(query.unwrap_or("").as_bytes()) {
        match &*k {
            "artifactType" => wanted.push(v.into_owned()),
            "page" => page = v.parse().unwrap_or(0),
            _ => {}
        }
    }
    let gate = match state.lock().behaviors.get(subject) {
        Some(BlobBehavior::Gate { release }) => Some(release.clone()),
        _ => None,
    };
    if let Some(release) = gate {
        release.notified().await;
    }
    let inner = state.lock();
    if inner.no_referrers_api {
        return Response::builder()
            .status(StatusCode::NOT_FOUND)
            .header(header::CONTENT_TYPE, "text/plain; charset=utf-8")
            .body(
                Full::new(Bytes::from_static(b"404 page not found\n"))
                    .map_err(|never| match never {})
                    .boxed_unsync(),
            )
            .expect("valid response");
    }
    let mut found: Vec<(String, serde_json::Value)> = Vec::new();
    for (digest, m) in inner
        .repos
        .get(name)
        .map(|r| &r.manifests)
        .into_iter()
        .flatten()
    {
        let Ok(v) = serde_json::from_slice::<serde_json::Value>(&m.body) else {
            continue;
        };
        if v["subject"]["digest"].as_str() != Some(subject) {
            continue;
        }
        let mut d = serde_json::json!({
            "mediaType": m.media_type, "digest": digest, "size": m.body.len(),
        });
        let artifact_type = v["artifactType"]
            .as_str()
            .or_else(|| v["config"]["mediaType"].as_str());
        if let Some(t) = artifact_type {
            d["artifactType"] = t.into();
        }
        if let Some(a) = v.get("annotations") {
            d["annotations"] = a.clone();
        }
        found.push((digest.clone(), d));
    }
    found.sort_by(|a, b| a.0.cmp(&b.0));
    let mut list: Vec<serde_json::Value> = found
        .into_iter()
        .map(|(_, d)| d)
        .filter(|d| {
            wanted.is_empty()
                || d["artifactType"]
                    .as_str()
                    .is_some_and(|t| wanted.iter().any(|w| w == t))
        })
        .collect();
    let mut next = None;
    if let Some(n) = inner.referrers_page {
        let rest = list.split_off((page * n).min(list.len()));
        if rest.len() > n {
            next = Some(page + 1);
        }
        list = rest.into_iter().take(n).collect();
    }
    let body = serde_json::to_vec(&serde_json::json!({
        "schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": list,
    }))
    .expect("serialize referrers");
    let mut resp = json_response(StatusCode::OK, Bytes::from(body));
    let h = resp.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static(OCI_INDEX),
    );
    if !wanted.is_empty() {
        h.insert(
            "OCI-Filters-Applied",
            header::HeaderValue::from_static("artifactType"),
        );
    }
    if let Some(p) = next {
        let link = format!(r#"</v2/{name}/referrers/{subject}?page={p}>; rel="next""#);
        h.insert(header::LINK, link.parse().expect("valid link header"));
    }
    resp
}

/// Issues a token, demanding the configured basic credentials if any.
fn token(state: &State, headers: &HeaderMap) -> Response<Body> {
    let mut inner = state.lock();
    let (creds, expires_in) = match &inner.auth {
        Auth::Bearer { creds, expires_in } => (creds.clone(), *expires_in),
        _ => (None, 300),
    };
    if let Some((user, pass)) = creds {
        if !basic_matches(headers, &user, &pass) {
            return unauthorized(r#"Basic realm="fake""#);
        }
    }
    inner.token_serial += 1;
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_nanos();
    let seed = format!("{}-{}-{nanos}", state.addr, inner.token_serial);
    let tok = hex::encode(&Sha256::digest(seed.as_bytes())[..16]);
    inner.tokens.insert(
        tok.clone(),
        Instant::now() + Duration::from_secs(expires_in),
    );
    let body = serde_json::json!({
        "token": tok,
        "access_token": tok,
        "expires_in": expires_in,
        "issued_at": rfc3339_now(),
    });
    json_response(
        StatusCode::OK,
        Bytes::from(serde_json::to_vec(&body).expect("serialize token")),
    )
}

fn check_auth(state: &State, headers: &HeaderMap, name: Option<&str>) -> Option<Response<Body>> {
    let inner = state.lock();
    match &inner.auth {
        Auth::Anonymous => None,
        Auth::Basic { user, pass } => {
            (!basic_matches(headers, user, pass)).then(|| unauthorized(r#"Basic realm="fake""#))
        }
        Auth::Bearer { .. } => {
            let valid = authorization(headers, "bearer")
                .and_then(|tok| inner.tokens.get(tok))
                .is_some_and(|expiry| *expiry > Instant::now());
            if valid {
                return None;
            }
            let realm = inner
                .token_realm
                .clone()
                .unwrap_or_else(|| format!("http://{}/token", state.addr));
            let mut challenge = format!(r#"Bearer realm="{realm}",service="{SERVICE}""#);
            if let Some(name) = name {
                challenge.push_str(&format!(r#",scope="repository:{name}:pull""#));
            }
            Some(unauthorized(&challenge))
        }
    }
}

/// The credentials of an `Authorization` header with this (case-insensitive) scheme.
fn authorization<'h>(headers: &'h HeaderMap, scheme: &str) -> Option<&'h str> {
    let value = headers.get(header::AUTHORIZATION)?.to_str().ok()?;
    let (s, creds) = value.split_once(' ')?;
    s.eq_ignore_ascii_case(scheme).then(|| creds.trim())
}

fn basic_matches(headers: &HeaderMap, user: &str, pass: &str) -> bool {
    // Padded standard base64 is canonical, so comparing encodings is comparing credentials.
    authorization(headers, "basic") == Some(&base64_encode(format!("{user}:{pass}").as_bytes()))
}

/// Current UTC time as RFC 3339, for `issued_at` (a client may add `expires_in` to it).
fn rfc3339_now() -> String {
    let secs = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_secs();
    let (y, m, d) = civil_from_days((secs / 86_400) as i64);
    let rem = secs % 86_400;
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

/// Days since 1970-01-01 to (year, month, day); Howard Hinnant's `civil_from_days`.
fn civil_from_days(days: i64) -> (i64, u32, u32) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    (y, m as u32, d as u32)
}

enum RangeRequest {
    Whole,
    Part(usize, usize),
    Unsatisfiable,
}

/// A single `bytes=a-b`, `bytes=a-` or `bytes=-n`; anything else is ignored, as RFC 9110 allows.
fn parse_range(headers: &HeaderMap, len: usize) -> RangeRequest {
    let Some(spec) = headers
        .get(header::RANGE)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().strip_prefix("bytes="))
    else {
        return RangeRequest::Whole;
    };
    let Some((a, b)) = spec.split_once('-') else {
        return RangeRequest::Whole;
    };
    let (a, b) = (a.trim(), b.trim());
    let (start, end) = match (a.parse::<usize>(), b.parse::<usize>()) {
        (Ok(s), Ok(e)) if s <= e => (s, e.min(len.saturating_sub(1))),
        (Ok(s), Err(_)) if b.is_empty() => (s, len.saturating_sub(1)),
        (Err(_), Ok(n)) if a.is_empty() && n > 0 => (len.saturating_sub(n), len.saturating_sub(1)),
        _ => return RangeRequest::Whole,
    };
    if start >= len {
        return RangeRequest::Unsatisfiable;
    }
    RangeRequest::Part(start, end)
}

/// Serves `data` (blob or manifest) honouring Range and, for GET, the digest's behaviour.
async fn send_bytes(
    req: &Request<Incoming>,
    flushes: &Flushes,
    digest: &str,
    data: Bytes,
    content_type: &str,
    behavior: Option<BlobBehavior>,
    head: bool,
) -> Response<Body> {
    let total = data.len();
    let (status, data, content_range) = match parse_range(req.headers(), total) {
        RangeRequest::Whole => (StatusCode::OK, data, None),
        RangeRequest::Part(start, end) => (
            StatusCode::PARTIAL_CONTENT,
            data.slice(start..=end),
            Some(format!("bytes {start}-{end}/{total}")),
        ),
        RangeRequest::Unsatisfiable => {
            return Response::builder()
                .status(StatusCode::RANGE_NOT_SATISFIABLE)
                .header(header::CONTENT_RANGE, format!("bytes */{total}"))
                .header(header::CONTENT_LENGTH, 0)
                .body(empty())
                .expect("valid response");
        }
    };
    let mut builder = Response::builder()
        .status(status)
        .header(header::CONTENT_TYPE, content_type)
        .header(header::CONTENT_LENGTH, data.len())
        .header("Docker-Content-Digest", digest)
        .header(header::ACCEPT_RANGES, "bytes");
    if let Some(range) = content_range {
        builder = builder.header(header::CONTENT_RANGE, range);
    }
    if head {
        return builder.body(empty()).expect("valid response");
    }
    let mut plan = Plan::new(data, flushes.clone());
    match behavior.unwrap_or(BlobBehavior::Normal) {
        BlobBehavior::Normal => {}
        BlobBehavior::Corrupt => {
            if !plan.data.is_empty() {
                let mut bytes = plan.data.to_vec();
                let mid = bytes.len() / 2;
                bytes[mid] ^= 0xff;
                plan.data = Bytes::from(bytes);
            }
        }
        BlobBehavior::Truncate { after } => plan.truncate_at = Some(after),
        BlobBehavior::Stall { after, release } => plan.stall = Some((after, release)),
        BlobBehavior::Gate { release } => release.notified().await,
        BlobBehavior::Slow { chunk, delay } => {
            plan.chunk = chunk.max(1);
            plan.delay = Some(delay);
        }
    }
    builder.body(plan.into_body()).expect("valid response")
}

/// How a body is put on the wire, frame by frame.
struct Plan {
    data: Bytes,
    pos: usize,
    chunk: usize,
    delay: Option<Duration>,
    stall: Option<(usize, Arc<Notify>)>,
    truncate_at: Option<usize>,
    flushes: Flushes,
    done: bool,
}

impl Plan {
    fn new(data: Bytes, flushes: Flushes) -> Plan {
        Plan {
            data,
            pos: 0,
            chunk: CHUNK,
            delay: None,
            stall: None,
            truncate_at: None,
            flushes,
            done: false,
        }
    }

    fn into_body(self) -> Body {
        // The stream lives inside the response body, so a client hang-up drops a stalled plan.
        let frames = futures_util::stream::unfold(self, |mut plan| async move {
            let frame = plan.next_frame().await?;
            Some((frame, plan))
        });
        StreamBody::new(frames).boxed_unsync()
    }

    async fn next_frame(&mut self) -> Option<Result<Frame<Bytes>, io::Error>> {
        if self.done {
            return None;
        }
        if let Some((at, release)) = self.stall.clone() {
            if self.pos >= at {
                // `Notify::notified` consumes a permit stored by an earlier `notify_one`,
                // so a release issued before we got here is not lost.
                release.notified().await;
                self.stall = None;
            }
        }
        if self.truncate_at.is_some_and(|at| self.pos >= at) {
            self.done = true;
            // Everything before the cut is in hyper's buffer now; it flushes once we are pending,
            // and only then may the error abort the connection (see `FlushCounted`).
            let mut flushed = self.flushes.subscribe();
            let _ = flushed.changed().await;
            // hyper aborts the connection on a body error, short of the announced Content-Length.
            return Some(Err(io::Error::new(
                io::ErrorKind::ConnectionAborted,
                "fake registry: truncated body",
            )));
        }
        if self.pos >= self.data.len() {
            return None;
        }
        if let (Some(delay), true) = (self.delay, self.pos > 0) {
            tokio::time::sleep(delay).await;
        }
        let mut end = (self.pos + self.chunk).min(self.data.len());
        if let Some((at, _)) = &self.stall {
            end = end.min(*at);
        }
        if let Some(at) = self.truncate_at {
            end = end.min(at);
        }
        let frame = self.data.slice(self.pos..end);
        self.pos = end;
        Some(Ok(Frame::data(frame)))
    }
}

fn empty() -> Body {
    Full::new(Bytes::new())
        .map_err(|never| match never {})
        .boxed_unsync()
}

fn json_response(status: StatusCode, body: Bytes) -> Response<Body> {
    Response::builder()
        .status(status)
        .header(header::CONTENT_TYPE, "application/json")
        .header(header::CONTENT_LENGTH, body.len())
        .body(
            Full::new(body)
                .map_err(|never| match never {})
                .boxed_unsync(),
        )
        .expect("valid response")
}

fn oci_error(status: StatusCode, code: &str, message: &str) -> Response<Body> {
    let body = serde_json::json!({"errors": [{"code": code, "message": message, "detail": null}]});
    json_response(
        status,
        Bytes::from(serde_json::to_vec(&body).expect("serialize error")),
    )
}

fn unauthorized(challenge: &str) -> Response<Body> {
    let mut resp = oci_error(
        StatusCode::UNAUTHORIZED,
        "UNAUTHORIZED",
        "authentication required",
    );
    resp.headers_mut().insert(
        header::WWW_AUTHENTICATE,
        challenge.parse().expect("valid challenge"),
    );
    resp
}

fn failure_response(code: u16, retry_after: Option<&str>) -> Response<Body> {
    let status = StatusCode::from_u16(code).expect("fake registry: invalid failure status");
    let oci_code = match code {
        429 => "TOOMANYREQUESTS",
        401 => "UNAUTHORIZED",
        403 => "DENIED",
        404 => "NAME_UNKNOWN",
        _ => "UNAVAILABLE",
    };
    let mut resp = oci_error(status, oci_code, "injected failure");
    if let Some(after) = retry_after {
        resp.headers_mut().insert(
            header::RETRY_AFTER,
            after.parse().expect("valid Retry-After"),
        );
    }
    resp
}
