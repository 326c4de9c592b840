//! Request hygiene, proven through the real server with bytes written by hand: request
//! framing (`Content-Length` with `Transfer-Encoding`), methods other than GET and HEAD, and
//! hostile request heads and paths. Every case ends in a 4xx or a closed connection, never a
//! 5xx, a panic or a file outside the store's layout, and the server keeps serving pulls.

mod common;

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Once;
use std::time::{Duration, Instant};

use common::fake_registry::FakeRegistry;
use common::proxy::Proxy;
use common::upstream;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::TcpStream;

/// How long any answer may take; every case here is answered (or closed) at once.
const PROMPT: Duration = Duration::from_secs(5);

/// Panics on the server's threads (the runtime's workers and blocking threads), counted by a
/// panic hook: a panic in a connection task only closes that connection, which a client cannot
/// tell from a refusal. Every test here runs on a multi-thread runtime so the server's tasks
/// run on those threads, not on the test's.
static SERVER_PANICS: AtomicUsize = AtomicUsize::new(0);

fn count_server_panics() {
    static HOOK: Once = Once::new();
    HOOK.call_once(|| {
        let previous = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            // The runtime's threads (`tokio-rt-worker`, or `tokio-runtime-worker` in older
            // releases); a test's own thread is named after the test.
            if std::thread::current()
                .name()
                .is_some_and(|n| n.starts_with("tokio-"))
            {
                SERVER_PANICS.fetch_add(1, Ordering::SeqCst);
            }
            previous(info);
        }));
    });
}

/// A proxy in front of a fake upstream holding `team/app:v1`, in a folder of its own so the
/// test can check nothing was written beside the store.
struct Setup {
    up: FakeRegistry,
    proxy: Proxy,
    addr: String,
    dir: tempfile::TempDir,
}

impl Setup {
    async fn start() -> Setup {
        count_server_panics();
        let up = FakeRegistry::start().await;
        up.push_image(
            "team/app",
            "v1",
            &[bytes::Bytes::from(common::random_bytes(50_000, 7))],
        );
        let dir = tempfile::tempdir().unwrap();
        let proxy = Proxy::start_at(
            &upstream("fake", &up.url(), true, ""),
            &dir.path().join("store"),
        )
        .await;
        let addr = proxy.url.trim_start_matches("http://").to_owned();
        Setup {
            up,
            proxy,
            addr,
            dir,
        }
    }

    /// The server still serves a whole pull, nothing on its threads panicked, the store holds
    /// only its own layout, nothing was written beside it, and the upstream was only ever asked
    /// for well-formed paths.
    async fn check_unharmed(self) {
        self.proxy.pull_image("team/app", "v1").await.unwrap();
        self.proxy.wait_idle().await;
        assert_eq!(
            SERVER_PANICS.load(Ordering::SeqCst),
            0,
            "a server task panicked"
        );
        let beside: Vec<_> = std::fs::read_dir(self.dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(beside, ["store"], "files written beside the store");
        let (files, dirs) = entries_under(&self.proxy.root);
        assert!(!files.is_empty());
        for file in files {
            let rel = file.strip_prefix(&self.proxy.root).unwrap();
            let rel = rel.to_str().expect("store paths are UTF-8");
            assert!(in_layout(rel), "{rel:?} is not in the store's layout");
        }
        // Folders too, empty ones included: each is the folder of some layout path.
        for dir in dirs {
            let rel = dir.strip_prefix(&self.proxy.root).unwrap();
            let rel = rel.to_str().expect("store paths are UTF-8");
            let top = rel.split('/').next().unwrap();
            assert!(
                ["blobs", "meta", "tmp", "quarantine"].contains(&top)
                    && rel.split('/').all(plain_component),
                "folder {rel:?} is not in the store's layout"
            );
        }
        for r in self.up.requests() {
            let p = &r.path;
            assert!(
                !p.contains("..") && !p.contains('%') && !p.contains("//") && !p.contains("etc"),
                "the upstream was asked for {p:?}"
            );
        }
        self.proxy.stop().await;
    }
}

/// The files and the folders under `root`, recursively.
fn entries_under(root: &Path) -> (Vec<PathBuf>, Vec<PathBuf>) {
    let (mut files, mut dirs) = (Vec::new(), Vec::new());
    let mut todo = vec![root.to_path_buf()];
    while let Some(d) = todo.pop() {
        for e in std::fs::read_dir(&d).unwrap() {
            let e = e.unwrap();
            if e.file_type().unwrap().is_dir() {
                todo.push(e.path());
                dirs.push(e.path());
            } else {
                files.push(e.path());
            }
        }
    }
    (files, dirs)
}

/// A path component the layout can spell: no `.`, `..`, separator, escape or control byte.
fn plain_component(s: &str) -> bool {
    !s.is_empty()
        && s != "."
        && s != ".."
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"._-:".contains(&b))
}

/// Is `rel` a path the store's layout (`src/cache/layout.rs`) spells?
fn in_layout(rel: &str) -> bool {
    let parts: Vec<&str> = rel.split('/').collect();
    let hex = |s: &str, n: usize| s.len() == n && s.bytes().all(|b| b.is_ascii_hexdigit());
    match parts.as_slice() {
        ["lock"] | ["replica-id"] => true,
        ["tmp", f] | ["quarantine", f] => plain_component(f),
        ["blobs", alg, h] | ["meta", "manifests", alg, h] => {
            (*alg == "sha256" && hex(h, 64)) || (*alg == "sha512" && hex(h, 128))
        }
        // `meta/tags/<upstream>/<repo...>/_tags/<tag>`: only the configured upstream's.
        ["meta", "tags", "fake", repo @ .., "_tags", tag] => {
            !repo.is_empty() && repo.iter().all(|c| plain_component(c)) && plain_component(tag)
        }
        // `meta/links/<upstream>/<repo...>/_links/<alg>/<hex>`
        ["meta", "links", "fake", repo @ .., "_links", "sha256", h] => {
            !repo.is_empty() && repo.iter().all(|c| plain_component(c)) && hex(h, 64)
        }
        // `meta/referrers/<upstream>/<repo...>/_referrers/<alg>/<hex>`
        ["meta", "referrers", "fake", repo @ .., "_referrers", "sha256", h] => {
            !repo.is_empty() && repo.iter().all(|c| plain_component(c)) && hex(h, 64)
        }
        ["meta", "pins" | "access" | "journal" | "generation" | "links-ready"] => true,
        _ => false,
    }
}

/// One response as read off the wire.
#[derive(Debug)]
struct Answer {
    status: u16,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
}

impl Answer {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

/// What a connection sent back: the responses, and whether the server closed it.
#[derive(Debug)]
struct Exchange {
    answers: Vec<Answer>,
    closed: bool,
    /// Bytes after the last whole response (a cut-off one).
    rest: Vec<u8>,
}

impl Exchange {
    fn statuses(&self) -> Vec<u16> {
        self.answers.iter().map(|a| a.status).collect()
    }
}

/// Splits `bytes` into whole responses (framed by `Content-Length` or chunked, or bodiless for
/// HEAD requests); what is left over is returned as is.
fn parse_answers(mut bytes: &[u8], head: bool) -> (Vec<Answer>, Vec<u8>) {
    let mut out = Vec::new();
    while let Some(end) = find(bytes, b"\r\n\r\n") {
        let text = String::from_utf8_lossy(&bytes[..end]).into_owned();
        let mut lines = text.split("\r\n");
        let status_line = lines.next().unwrap_or_default();
        let Some(status) = status_line
            .strip_prefix("HTTP/1.1 ")
            .and_then(|s| s.get(..3))
            .and_then(|s| s.parse().ok())
        else {
            break;
        };
        let headers: Vec<(String, String)> = lines
            .filter_map(|l| l.split_once(':'))
            .map(|(n, v)| (n.trim().to_owned(), v.trim().to_owned()))
            .collect();
        let mut answer = Answer {
            status,
            headers,
            body: Vec::new(),
        };
        let mut rest = &bytes[end + 4..];
        if head {
            // A HEAD response announces the length of a body it does not carry.
        } else if let Some(len) = answer.header("content-length") {
            let len: usize = len.parse().unwrap();
            if rest.len() < len {
                break;
            }
            answer.body = rest[..len].to_vec();
            rest = &rest[len..];
        } else if answer
            .header("transfer-encoding")
            .is_some_and(|t| t.eq_ignore_ascii_case("chunked"))
        {
            loop {
                let Some(eol) = find(rest, b"\r\n") else {
                    return (out, bytes.to_vec());
                };
                let size =
                    usize::from_str_radix(std::str::from_utf8(&rest[..eol]).unwrap(), 16).unwrap();
                if rest.len() < eol + 2 + size + 2 {
                    return (out, bytes.to_vec());
                }
                answer
                    .body
                    .extend_from_slice(&rest[eol + 2..eol + 2 + size]);
                rest = &rest[eol + 2 + size + 2..];
                if size == 0 {
                    break;
                }
            }
        }
        out.push(answer);
        bytes = rest;
    }
    (out, bytes.to_vec())
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

/// Reads until the server closes the connection or `PROMPT` passes.
async fn read_until_closed(s: &mut TcpStream, got: &mut Vec<u8>) -> bool {
    let deadline = tokio::time::Instant::now() + PROMPT;
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        match tokio::time::timeout_at(deadline, s.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) => return true,
            Ok(Ok(n)) => got.extend_from_slice(&buf[..n]),
            Err(_) => return false,
        }
    }
}

/// Sends `bytes` on a new connection (the write side stays open, as a client waiting for its
/// answer keeps it) and collects everything the server sends back until it closes the
/// connection or `PROMPT` passes.
async fn exchange(addr: &str, bytes: &[u8]) -> Exchange {
    let mut s = TcpStream::connect(addr).await.unwrap();
    // The server may refuse before it has read everything: a failed write is an answer too.
    let _ = s.write_all(bytes).await;
    let mut got = Vec::new();
    let closed = read_until_closed(&mut s, &mut got).await;
    let head = bytes.starts_with(b"HEAD ");
    let (answers, rest) = parse_answers(&got, head);
    Exchange {
        answers,
        closed,
        rest,
    }
}

/// The connection ended in a refusal: at most one answer, a 4xx, and then it was closed.
/// `what` names the case in failures.
fn assert_refused(x: &Exchange, what: &str) {
    assert!(x.closed, "{what}: the connection was left open: {x:?}");
    assert!(x.answers.len() <= 1, "{what}: more than one answer: {x:?}");
    for a in &x.answers {
        assert!(
            (400..500).contains(&a.status),
            "{what}: answered {}: {x:?}",
            a.status
        );
    }
    assert!(
        x.rest.is_empty() || x.rest.starts_with(b"HTTP/1.1 4"),
        "{what}: trailing bytes {:?}",
        String::from_utf8_lossy(&x.rest)
    );
}

/// The one answer is a 4xx (the handler's, or hyper's for a head it cannot parse).
fn assert_client_error(x: &Exchange, what: &str) {
    assert!(
        !x.answers.is_empty() || x.closed,
        "{what}: no answer: {x:?}"
    );
    for a in &x.answers {
        assert!(
            (400..500).contains(&a.status),
            "{what}: answered {}: {x:?}",
            a.status
        );
    }
}

fn digest() -> String {
    format!("sha256:{}", "ab".repeat(32))
}

// --- Content-Length and Transfer-Encoding --------------------------------------------------

/// hyper frames a request carrying both headers by `Transfer-Encoding: chunked` alone and closes
/// the connection after answering it (RFC 9112 §6.3, which allows this instead of a 400): bytes
/// that a front end trusting `Content-Length` would take for the body's end are never parsed as
/// a second request, whichever header comes first.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn content_length_with_chunked_is_framed_by_the_chunks_and_the_connection_closed() {
    let s = Setup::start().await;
    let smuggled = "GET /v2/team/smuggled/manifests/v1 HTTP/1.1\r\nHost: e\r\n\r\n";
    for headers in [
        "Content-Length: 60\r\nTransfer-Encoding: chunked\r\n",
        "Transfer-Encoding: chunked\r\nContent-Length: 60\r\n",
        "Content-Length: 0\r\nTransfer-Encoding: chunked\r\n",
    ] {
        let req = format!("GET /v2/ HTTP/1.1\r\nHost: e\r\n{headers}\r\n0\r\n\r\n{smuggled}");
        let x = exchange(&s.addr, req.as_bytes()).await;
        assert_eq!(x.statuses(), [200], "{headers:?}: {x:?}");
        assert_eq!(x.answers[0].header("connection"), Some("close"), "{x:?}");
        assert!(x.closed, "{headers:?}: left open");
        assert!(x.rest.is_empty(), "{headers:?}: {x:?}");
    }
    // A manifest request with the same framing: answered once, the follower never seen.
    let req = format!(
        "GET /v2/team/app/manifests/v1 HTTP/1.1\r\nHost: e\r\nAccept: {}\r\n\
         Content-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n{smuggled}",
        common::OCI_MANIFEST
    );
    let x = exchange(&s.addr, req.as_bytes()).await;
    assert_eq!(x.statuses(), [200], "{x:?}");
    assert!(x.closed);
    assert_eq!(s.up.count("GET", "smuggled"), 0);
    s.check_unharmed().await;
}

/// Framing hyper cannot trust is refused with 400 and the connection closed: a
/// `Transfer-Encoding` whose last coding is not `chunked`, one on HTTP/1.0, and conflicting or
/// malformed `Content-Length` values.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn framing_that_cannot_be_trusted_is_refused_with_400() {
    let s = Setup::start().await;
    let cases = [
        (
            "HTTP/1.1",
            "Content-Length: 5\r\nTransfer-Encoding: gzip\r\n",
        ),
        (
            "HTTP/1.1",
            "Transfer-Encoding: chunked, gzip\r\nContent-Length: 5\r\n",
        ),
        ("HTTP/1.1", "Transfer-Encoding: xchunked\r\n"),
        ("HTTP/1.1", "Transfer-Encoding: gzip\r\n"),
        ("HTTP/1.0", "Transfer-Encoding: chunked\r\n"),
        (
            "HTTP/1.0",
            "Content-Length: 5\r\nTransfer-Encoding: chunked\r\n",
        ),
        ("HTTP/1.1", "Content-Length: 5\r\nContent-Length: 6\r\n"),
        ("HTTP/1.1", "Content-Length: 5, 6\r\n"),
        ("HTTP/1.1", "Content-Length: +5\r\n"),
        ("HTTP/1.1", "Content-Length: -1\r\n"),
        ("HTTP/1.1", "Content-Length: 0x10\r\n"),
        ("HTTP/1.1", "Content-Length: 99999999999999999999999\r\n"),
        ("HTTP/1.1", "Transfer-Encoding : chunked\r\n"),
        (
            "HTTP/1.1",
            "Transfer-Encoding: chunked\r\n\tContent-Length: 5\r\n",
        ),
    ];
    for (version, headers) in cases {
        let req = format!("GET /v2/ {version}\r\nHost: e\r\n{headers}\r\n0\r\n\r\n");
        let x = exchange(&s.addr, req.as_bytes()).await;
        assert_refused(&x, &format!("{version} {headers:?}"));
        assert_eq!(x.statuses(), [400], "{version} {headers:?}: {x:?}");
    }
    s.check_unharmed().await;
}

// --- Methods -------------------------------------------------------------------------------

const METHODS: &[&str] = &[
    "PUT", "POST", "DELETE", "PATCH", "OPTIONS", "TRACE", "PROPFIND", "BREW", "get", "X-PURGE",
];

/// Every registry API path there is, valid or not for pulls.
fn api_paths() -> Vec<String> {
    let d = digest();
    vec![
        "/v2/".into(),
        "/v2/_catalog".into(),
        "/v2/team/app/manifests/v1".into(),
        format!("/v2/team/app/manifests/{d}"),
        format!("/v2/team/app/blobs/{d}"),
        "/v2/team/app/blobs/uploads/".into(),
        "/v2/team/app/blobs/uploads/1234-abcd".into(),
        "/v2/team/app/tags/list".into(),
        format!("/v2/team/app/referrers/{d}"),
    ]
}

/// Sends `method path` announcing a 1 GiB body and sends none of it; returns the answer, which
/// must come at once (the body is not waited for), and the connection.
async fn refuse_without_body(addr: &str, method: &str, path: &str) -> (Answer, TcpStream) {
    let what = format!("{method} {path}");
    let mut c = TcpStream::connect(addr).await.unwrap();
    let head = format!(
        "{method} {path} HTTP/1.1\r\nHost: e\r\nContent-Type: application/octet-stream\r\n\
         Content-Length: 1073741824\r\n\r\n"
    );
    c.write_all(head.as_bytes()).await.unwrap();
    let asked = Instant::now();
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    let answer = loop {
        let n = tokio::time::timeout(PROMPT, c.read(&mut buf))
            .await
            .unwrap_or_else(|_| panic!("{what}: no answer while the body was unsent"))
            .unwrap_or(0);
        assert!(n > 0, "{what}: closed without an answer");
        got.extend_from_slice(&buf[..n]);
        let (mut answers, _) = parse_answers(&got, false);
        if let Some(a) = answers.pop() {
            break a;
        }
    };
    assert!(asked.elapsed() < PROMPT, "{what}: slow");
    (answer, c)
}

/// After a refusal, what would have been the body is a request; it must not be answered as one:
/// the server closes the connection.
async fn assert_body_never_parsed(mut c: TcpStream, what: &str) {
    let _ = c.write_all(b"GET /v2/ HTTP/1.1\r\nHost: e\r\n\r\n").await;
    let mut after = Vec::new();
    let closed = read_until_closed(&mut c, &mut after).await;
    assert!(closed, "{what}: the connection stayed open after a refusal");
    assert!(
        after.is_empty(),
        "{what}: the unread body was answered: {:?}",
        String::from_utf8_lossy(&after)
    );
}

/// The 405 of a refused method: `Allow: GET, HEAD` and an OCI error body.
fn assert_405(answer: &Answer, what: &str) {
    assert_eq!(answer.status, 405, "{what}: {answer:?}");
    assert_eq!(answer.header("allow"), Some("GET, HEAD"), "{what}");
    assert_eq!(
        answer.header("content-type"),
        Some("application/json"),
        "{what}"
    );
    let errors = common::oci_errors(&answer.body).unwrap();
    assert_eq!(errors[0].0, "UNSUPPORTED", "{what}");
}

/// A method other than GET and HEAD on any pull API path gets 405 with `Allow: GET, HEAD` and
/// an OCI error body at once, although the request announces a 1 GiB body and sends none: the
/// body is never waited for. The connection is then closed, so bytes sent after the head (the
/// "body") are never parsed as a request.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn other_methods_get_405_at_once_without_the_body_being_read() {
    let s = Setup::start().await;
    for method in METHODS {
        for path in api_paths() {
            let what = format!("{method} {path}");
            let (answer, c) = refuse_without_body(&s.addr, method, &path).await;
            assert_405(&answer, &what);
            assert_body_never_parsed(c, &what).await;
        }
    }
    s.check_unharmed().await;
}

/// The method is refused before the path is read: a push client learns that nothing here is
/// writable whatever else is wrong with its path.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn other_methods_get_405_on_malformed_registry_paths_too() {
    let s = Setup::start().await;
    for method in ["PUT", "POST", "DELETE", "PATCH", "BREW"] {
        for path in [
            "/v2/Bad/manifests/v1",
            "/v2/team/app/manifests/-bad",
            "/v2/nonsense",
            "/v2/../x/blobs/sha256:00",
        ] {
            let what = format!("{method} {path}");
            let (answer, c) = refuse_without_body(&s.addr, method, path).await;
            assert_405(&answer, &what);
            assert_body_never_parsed(c, &what).await;
        }
    }
    s.check_unharmed().await;
}

/// The operator endpoints are read-only as well (only `POST /pins` takes a body).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn operator_endpoints_refuse_other_methods() {
    let s = Setup::start().await;
    for method in ["PUT", "POST", "DELETE", "PATCH", "BREW"] {
        for path in ["/healthz", "/metrics", "/readyz"] {
            let what = format!("{method} {path}");
            let (answer, c) = refuse_without_body(&s.addr, method, path).await;
            assert_eq!(answer.status, 405, "{what}: {answer:?}");
            assert_eq!(answer.header("allow"), Some("GET, HEAD"), "{what}");
            assert_body_never_parsed(c, &what).await;
        }
    }
    s.check_unharmed().await;
}

/// `POST /pins` reads at most 1 MiB: a body announced larger is refused at once with 413, not
/// waited for (it would hold the connection, and a connection slot, for as long as the client
/// likes).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pins_body_announced_over_the_limit_is_refused_at_once() {
    let s = Setup::start().await;
    let (answer, c) = refuse_without_body(&s.addr, "POST", "/pins").await;
    assert_eq!(answer.status, 413, "{answer:?}");
    assert_body_never_parsed(c, "POST /pins").await;
    s.check_unharmed().await;
}

/// A refused method's short body that arrived with its head is skipped exactly: the request
/// pipelined after it is answered (or the connection is closed), and the body is never parsed
/// as a request of its own.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_short_body_of_a_refused_method_is_skipped_not_parsed() {
    let s = Setup::start().await;
    for method in ["PUT", "POST", "PATCH"] {
        let body = "DELETE /v2/team/app/manifests/v1 HTTP/1.1\r\nHost: e\r\n\r\n";
        let req = format!(
            "{method} /v2/team/app/manifests/v1 HTTP/1.1\r\nHost: e\r\nContent-Length: {}\r\n\r\n\
             {body}GET /v2/ HTTP/1.1\r\nHost: e\r\nConnection: close\r\n\r\n",
            body.len()
        );
        let x = exchange(&s.addr, req.as_bytes()).await;
        let statuses = x.statuses();
        assert!(
            statuses == [405, 200] || statuses == [405],
            "{method}: {statuses:?} {x:?}"
        );
        assert!(x.closed, "{method}: left open");
    }
    s.check_unharmed().await;
}

/// Methods are case-sensitive (RFC 9110 §9.1): `head` and `get` are extension methods, refused
/// like any other, while `HEAD` is served.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn methods_are_case_sensitive_so_lower_case_head_and_get_are_refused() {
    let s = Setup::start().await;
    for method in ["head", "get", "Get"] {
        let req = format!(
            "{method} /v2/team/app/manifests/v1 HTTP/1.1\r\nHost: e\r\nConnection: close\r\n\r\n"
        );
        let x = exchange(&s.addr, req.as_bytes()).await;
        assert_eq!(x.statuses(), [405], "{method}: {x:?}");
        assert_405(&x.answers[0], method);
    }
    let x = exchange(
        &s.addr,
        b"HEAD /v2/ HTTP/1.1\r\nHost: e\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert_eq!(x.statuses(), [200], "{x:?}");
    s.check_unharmed().await;
}

// --- Hostile heads -------------------------------------------------------------------------

/// Request lines and headers past the 64 KiB head cap, or past hyper's header count, are
/// refused (431 or 414, or the connection closed), never answered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_request_lines_and_headers_are_refused() {
    let s = Setup::start().await;
    let long = "a".repeat(70 * 1024);
    let many: String = (0..200).map(|i| format!("X-H{i}: v\r\n")).collect();
    let cases = [
        format!("GET /v2/{long}/manifests/v1 HTTP/1.1\r\nHost: e\r\n\r\n"),
        format!("GET /v2/?{long} HTTP/1.1\r\nHost: e\r\n\r\n"),
        format!("GET /v2/ HTTP/1.1\r\nHost: e\r\nX-Big: {long}\r\n\r\n"),
        format!("GET /v2/ HTTP/1.1\r\nHost: e\r\n{long}: x\r\n\r\n"),
        format!("GET /v2/ HTTP/1.1\r\nHost: e\r\n{many}\r\n"),
        format!("{long} /v2/ HTTP/1.1\r\nHost: e\r\n\r\n"),
    ];
    for req in &cases {
        let what = format!("{}…", &req[..40.min(req.len())]);
        let x = exchange(&s.addr, req.as_bytes()).await;
        assert_refused(&x, &what);
        for a in &x.answers {
            assert!(
                [400, 413, 414, 431].contains(&a.status),
                "{what}: {}",
                a.status
            );
        }
    }
    s.check_unharmed().await;
}

/// Malformed request lines and header bytes hyper's parser refuses: 400 (or closed), never an
/// answer from a handler.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_request_lines_and_header_bytes_are_refused() {
    let s = Setup::start().await;
    let cases: Vec<Vec<u8>> = vec![
        b"GET\r\n\r\n".to_vec(),
        b"GET /v2/\r\n\r\n".to_vec(),
        b"GET /v2/ HTTP/9.9\r\nHost: e\r\n\r\n".to_vec(),
        b"GET /v2/ FTP/1.1\r\nHost: e\r\n\r\n".to_vec(),
        b"GET  /v2/ HTTP/1.1\r\nHost: e\r\n\r\n".to_vec(),
        b" GET /v2/ HTTP/1.1\r\nHost: e\r\n\r\n".to_vec(),
        b"G(T /v2/ HTTP/1.1\r\nHost: e\r\n\r\n".to_vec(),
        b"GET /v2/ HTTP/1.1 extra\r\nHost: e\r\n\r\n".to_vec(),
        b"GET /v2/\x00 HTTP/1.1\r\nHost: e\r\n\r\n".to_vec(),
        b"GET /v2/\x7f HTTP/1.1\r\nHost: e\r\n\r\n".to_vec(),
        b"GET /v2/ a HTTP/1.1\r\nHost: e\r\n\r\n".to_vec(),
        b"GET /v2/ HTTP/1.1\r\nHost: e\r\nX-Bad: a\x00b\r\n\r\n".to_vec(),
        b"GET /v2/ HTTP/1.1\r\nHost: e\r\nX-Bad: a\x01b\r\n\r\n".to_vec(),
        b"GET /v2/ HTTP/1.1\r\nHost: e\r\nX-Bad: a\rb\r\n\r\n".to_vec(),
        b"GET /v2/ HTTP/1.1\r\nHost: e\r\nBad Name: x\r\n\r\n".to_vec(),
        b"GET /v2/ HTTP/1.1\r\nHost: e\r\nBad\x00Name: x\r\n\r\n".to_vec(),
        b"GET /v2/ HTTP/1.1\r\nHost: e\r\n: empty-name\r\n\r\n".to_vec(),
        b"GET /v2/ HTTP/1.1\r\nHost: e\r\nNo-Colon\r\n\r\n".to_vec(),
        b"GET /v2/ HTTP/1.1\r\nHost: e\r\nX-Folded: a\r\n b\r\n\r\n".to_vec(),
        b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03\r\n\r\n".to_vec(),
    ];
    for req in &cases {
        let what = format!("{:?}", String::from_utf8_lossy(req));
        let x = exchange(&s.addr, req).await;
        assert_refused(&x, &what);
    }
    // Parsed by hyper, then refused by the handler: a target with raw UTF-8 (which hyper takes
    // as is), and HTTP/2's preface spoken as HTTP/1.1 (`*` is no path).
    for req in [
        &b"GET /v2/\xc3\xa9/manifests/v1 HTTP/1.1\r\nHost: e\r\nConnection: close\r\n\r\n"[..],
        b"PRI * HTTP/1.1\r\nHost: e\r\nConnection: close\r\n\r\n",
    ] {
        let what = format!("{:?}", String::from_utf8_lossy(req));
        let x = exchange(&s.addr, req).await;
        assert_eq!(x.answers.len(), 1, "{what}: {x:?}");
        assert_client_error(&x, &what);
    }
    s.check_unharmed().await;
}

/// Paths that try to leave the store or the registry API: dot segments, percent-encoded
/// slashes, dots and NULs, backslashes, over-long names, tags and digests, hostile `ns=`. Each
/// is a 4xx from the handler, the upstream is never asked for them, and nothing is written
/// outside the store's layout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn absurd_paths_get_a_4xx_and_never_leave_the_store() {
    let s = Setup::start().await;
    let d = digest();
    let long_name = "a/".repeat(200);
    let long_component = "a".repeat(60 * 1024);
    let paths: Vec<String> = vec![
        "/v2/../../etc/passwd".into(),
        "/v2/../../etc/manifests/latest".into(),
        "/v2/team/../../../etc/manifests/latest".into(),
        "/v2/./team/app/manifests/v1".into(),
        "/v2/team//app/manifests/v1".into(),
        "/v2//team/app/manifests/v1".into(),
        "/v2/team/app/manifests/../../../../etc/passwd".into(),
        "/v2/team/app/manifests/..".into(),
        "/v2/team/app/manifests/.".into(),
        "/v2/%2e%2e/%2e%2e/etc/manifests/latest".into(),
        "/v2/%2E%2E%2F%2E%2E%2Fetc/manifests/latest".into(),
        "/v2/team%2fapp/manifests/v1".into(),
        "/v2/team/app/manifests/..%2f..%2fpasswd".into(),
        "/v2/team/app/manifests/%2e%2e".into(),
        format!("/v2/team/app/blobs/sha256:..%2f..%2f{}", "a".repeat(58)),
        "/v2/team/app/blobs/sha256:../../../../etc/passwd".into(),
        format!("/v2/team/app/blobs/sha256:{}", "A".repeat(64)),
        format!("/v2/team/app/blobs/sha256:{}/..", "a".repeat(64)),
        format!("/v2/team/app/blobs/md5:{}", "a".repeat(32)),
        format!("/v2/team/app/blobs/{d}%00"),
        "/v2/%00/manifests/v1".into(),
        "/v2/team/app%00/manifests/v1".into(),
        "/v2/team/app/manifests/v1%00".into(),
        "/v2/team\\..\\..\\etc/manifests/v1".into(),
        "/v2/team/app/manifests/v1\\..\\..".into(),
        format!("/v2/{long_name}manifests/v1"),
        format!("/v2/{long_component}/manifests/v1"),
        format!("/v2/team/app/manifests/{}", "v".repeat(129)),
        format!("/v2/team/app/manifests/sha256:{}", "a".repeat(1000)),
        "/v2/TEAM/app/manifests/v1".into(),
        "/v2/team/app/manifests/v1?ns=../../etc".into(),
        "/v2/team/app/manifests/v1?ns=%2e%2e%2f%2e%2e".into(),
        "/v2/team/app/manifests/v1?ns=fake%00".into(),
        "/v2/team/app/manifests/v1?ns=".into(),
        "/v2/team/app/tags/list?n=-1".into(),
        "/v2/team/app/tags/list?n=99999999999999999999999".into(),
        "/v2/fake/../etc/manifests/v1".into(),
        "/v2/fake/manifests/v1".into(),
        "/v2/team/app/_tags/v1".into(),
        "/v2/meta/tags/fake/team/app/_tags/manifests/v1".into(),
        "/v2/team/app/manifests/_tags".into(),
        "/etc/passwd".into(),
        "/../../etc/passwd".into(),
        "/v2".repeat(100),
    ];
    for path in &paths {
        let what = &path[..path.len().min(80)];
        for method in ["GET", "HEAD"] {
            let req = format!("{method} {path} HTTP/1.1\r\nHost: e\r\nConnection: close\r\n\r\n");
            let x = exchange(&s.addr, req.as_bytes()).await;
            assert_eq!(x.answers.len(), 1, "{method} {what}: {x:?}");
            let a = &x.answers[0];
            assert!(
                (400..500).contains(&a.status),
                "{method} {what}: answered {}",
                a.status
            );
            if method == "GET" && path.starts_with("/v2/") && a.status != 414 {
                let errors =
                    common::oci_errors(&a.body).unwrap_or_else(|e| panic!("{what}: {e:#}"));
                assert!(!errors.is_empty(), "{what}");
            }
        }
    }
    // Raw bytes that are not allowed in a request target at all.
    for target in [
        &b"/v2/team/app/manifests/v1\x00"[..],
        b"/v2/team/app/manifests/\x00/../../etc",
        b"/v2/\x1b[31m/manifests/v1",
    ] {
        let mut req = b"GET ".to_vec();
        req.extend_from_slice(target);
        req.extend_from_slice(b" HTTP/1.1\r\nHost: e\r\n\r\n");
        let x = exchange(&s.addr, &req).await;
        assert_refused(&x, &format!("{:?}", String::from_utf8_lossy(target)));
    }
    // The absolute form names the target server, not a host to forward to.
    let x = exchange(
        &s.addr,
        b"GET http://evil.example/v2/team/../../etc/manifests/v1 HTTP/1.1\r\nHost: evil.example\r\n\
          Connection: close\r\n\r\n",
    )
    .await;
    assert_client_error(&x, "absolute form");
    s.check_unharmed().await;
}
