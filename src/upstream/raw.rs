//! A blob's body from a plain-HTTP upstream as a bare socket, so a fill can move it into its
//! temp file with `splice` and never copy it through user memory (`cache::spliced`).
//!
//! One `GET` on a connection of its own (`Connection: close`): the response head is read and
//! parsed here; a `200` with a `Content-Length` and no transfer or content coding hands over
//! the socket with the body's first bytes (read along with the head). Any other answer
//! (a challenge, a redirect, an error, a chunked body) is declined: the caller sends the same
//! request the usual way, which knows what to do with it.

use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, HeaderName, HeaderValue, StatusCode};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use url::Url;

use super::UpstreamErrorKind;

/// The largest response head accepted.
const MAX_HEAD: usize = 64 << 10;
/// Headers in a response head at most.
const MAX_HEADERS: usize = 100;

/// A `200` blob body that has not been read yet.
pub struct RawBody {
    /// Blocking mode, connected to the upstream; only the body's remaining bytes follow.
    pub socket: std::net::TcpStream,
    /// The body's first bytes, read along with the head.
    pub early: Bytes,
    /// The body's length (its `Content-Length`).
    pub len: u64,
}

/// What the upstream answered.
pub struct Answer {
    pub status: StatusCode,
    pub headers: HeaderMap,
    /// The body of a plain `200`; `None` (and the connection closed) for anything else.
    pub body: Option<RawBody>,
}

/// Sends `GET url` with `headers` over plain HTTP/1.1 and reads the response head.
pub async fn get(
    url: &Url,
    headers: &HeaderMap,
    connect_timeout: Duration,
    read_timeout: Duration,
) -> Result<Answer, UpstreamErrorKind> {
    let request = request_head(url, headers)?;
    let mut socket = connect(url, connect_timeout).await?;
    let exchange = async {
        socket.write_all(request.as_bytes()).await?;
        read_head(&mut socket).await
    };
    let (status, headers, early) = tokio::time::timeout(read_timeout, exchange)
        .await
        .map_err(|_| UpstreamErrorKind::Timeout)?
        .map_err(|e| match e.kind() {
            std::io::ErrorKind::InvalidData => UpstreamErrorKind::Protocol("bad response head"),
            _ => UpstreamErrorKind::Unreachable("connection failed"),
        })?;
    let Some(len) = plain_length(status, &headers) else {
        return Ok(Answer {
            status,
            headers,
            body: None,
        });
    };
    let socket = socket
        .into_std()
        .and_then(|s| s.set_nonblocking(false).map(|()| s))
        .map_err(|_| UpstreamErrorKind::Unreachable("connection failed"))?;
    // Bytes past the announced length are not the body's: ignored, as HTTP frames it.
    let early = early.slice(..early.len().min(usize::try_from(len).unwrap_or(usize::MAX)));
    Ok(Answer {
        status,
        headers,
        body: Some(RawBody { socket, early, len }),
    })
}

/// The body's length when `status` and `headers` describe a plain body this module takes.
fn plain_length(status: StatusCode, headers: &HeaderMap) -> Option<u64> {
    if status != StatusCode::OK || headers.contains_key(http::header::TRANSFER_ENCODING) {
        return None;
    }
    let identity = headers
        .get_all(http::header::CONTENT_ENCODING)
        .iter()
        .all(|v| v.as_bytes().eq_ignore_ascii_case(b"identity"));
    let mut lengths = headers.get_all(http::header::CONTENT_LENGTH).iter();
    let len = lengths.next()?.to_str().ok()?.trim().parse().ok()?;
    (identity && lengths.next().is_none()).then_some(len)
}

/// `GET` for `url` with `headers`, `Host` from the URL, on a connection closed after it.
fn request_head(url: &Url, headers: &HeaderMap) -> Result<String, UpstreamErrorKind> {
    let bad = UpstreamErrorKind::Protocol("bad URL");
    let host = url.host_str().ok_or(bad.clone())?;
    let mut head = format!("GET {}", url.path());
    if let Some(q) = url.query() {
        head.push('?');
        head.push_str(q);
    }
    head.push_str(" HTTP/1.1\r\nHost: ");
    head.push_str(host);
    if let Some(port) = url.port() {
        head.push_str(&format!(":{port}"));
    }
    head.push_str(concat!(
        "\r\nUser-Agent: entrepot/",
        env!("CARGO_PKG_VERSION"),
        "\r\nConnection: close\r\n"
    ));
    for (name, value) in headers {
        // Header values cannot hold CR or LF (`HeaderValue` refuses them); only text is sent.
        let value = value.to_str().map_err(|_| bad.clone())?;
        head.push_str(name.as_str());
        head.push_str(": ");
        head.push_str(value);
        head.push_str("\r\n");
    }
    head.push_str("\r\n");
    Ok(head)
}

/// Connects to the URL's host (each address it resolves to in turn) within `timeout`.
async fn connect(url: &Url, timeout: Duration) -> Result<tokio::net::TcpStream, UpstreamErrorKind> {
    let port = url
        .port_or_known_default()
        .ok_or(UpstreamErrorKind::Protocol("bad URL"))?;
    let connecting = async {
        let addrs: Vec<SocketAddr> = match url.host() {
            Some(url::Host::Ipv4(ip)) => vec![SocketAddr::new(IpAddr::V4(ip), port)],
            Some(url::Host::Ipv6(ip)) => vec![SocketAddr::new(IpAddr::V6(ip), port)],
            Some(url::Host::Domain(d)) => tokio::net::lookup_host((d, port))
                .await
                .map_err(|_| UpstreamErrorKind::Unreachable("name not resolved"))?
                .collect(),
            None => return Err(UpstreamErrorKind::Protocol("bad URL")),
        };
        for addr in addrs {
            if let Ok(s) = tokio::net::TcpStream::connect(addr).await {
                return Ok(s);
            }
        }
        Err(UpstreamErrorKind::Unreachable("connection refused"))
    };
    tokio::time::timeout(timeout, connecting)
        .await
        .map_err(|_| UpstreamErrorKind::Unreachable("connect timed out"))?
}

/// Reads until the end of the response head; returns it parsed, and the bytes after it.
async fn read_head(
    socket: &mut tokio::net::TcpStream,
) -> std::io::Result<(StatusCode, HeaderMap, Bytes)> {
    let invalid =
        |what: &str| std::io::Error::new(std::io::ErrorKind::InvalidData, what.to_owned());
    let mut buf = Vec::with_capacity(8 << 10);
    loop {
        let mut parsed = [httparse::EMPTY_HEADER; MAX_HEADERS];
        let mut response = httparse::Response::new(&mut parsed);
        match response.parse(&buf) {
            Ok(httparse::Status::Complete(end)) => {
                let status = response
                    .code
                    .and_then(|c| StatusCode::from_u16(c).ok())
                    .ok_or_else(|| invalid("no status"))?;
                let mut headers = HeaderMap::new();
                for h in response.headers.iter() {
                    let name = HeaderName::from_bytes(h.name.as_bytes());
                    let value = HeaderValue::from_bytes(h.value);
                    if let (Ok(n), Ok(v)) = (name, value) {
                        headers.append(n, v);
                    }
                }
                let early = Bytes::copy_from_slice(&buf[end..]);
                return Ok((status, headers, early));
            }
            Ok(httparse::Status::Partial) if buf.len() < MAX_HEAD => {}
            Ok(httparse::Status::Partial) => return Err(invalid("response head too large")),
            Err(_) => return Err(invalid("bad response head")),
        }
        let mut chunk = [0u8; 8 << 10];
        match socket.read(&mut chunk).await? {
            0 => return Err(std::io::ErrorKind::UnexpectedEof.into()),
            n => buf.extend_from_slice(&chunk[..n]),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::net::TcpListener;

    /// An upstream that answers one connection with `response` and returns what it was sent.
    async fn answering(response: &'static [u8]) -> (Url, tokio::task::JoinHandle<String>) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = Url::parse(&format!(
            "http://{}/v2/a/b/blobs/sha256:00?x=1",
            listener.local_addr().unwrap()
        ))
        .unwrap();
        let task = tokio::spawn(async move {
            let (mut s, _) = listener.accept().await.unwrap();
            let mut got = Vec::new();
            let mut buf = [0u8; 4096];
            while !got.ends_with(b"\r\n\r\n") {
                let n = s.read(&mut buf).await.unwrap();
                assert!(n > 0, "request head cut short");
                got.extend_from_slice(&buf[..n]);
            }
            s.write_all(response).await.unwrap();
            String::from_utf8(got).unwrap()
        });
        (url, task)
    }

    const T: Duration = Duration::from_secs(5);

    #[tokio::test]
    async fn a_plain_200_hands_over_the_socket_with_the_bytes_read_beside_the_head() {
        let (url, sent) =
            answering(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\nX-A: b\r\n\r\nhelloworld!!").await;
        let mut headers = HeaderMap::new();
        headers.insert("accept-encoding", HeaderValue::from_static("identity"));
        headers.insert("authorization", HeaderValue::from_static("Bearer t"));
        let answer = get(&url, &headers, T, T).await.unwrap();
        assert_eq!(answer.headers["x-a"], "b");
        let body = answer.body.expect("a plain 200 is taken");
        assert_eq!(body.len, 10);
        // Two bytes past the length are not the body's.
        assert_eq!(&body.early[..], b"helloworld");
        let sent = sent.await.unwrap();
        let port = url.port().unwrap();
        assert!(
            sent.starts_with(&format!(
                "GET /v2/a/b/blobs/sha256:00?x=1 HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
            )),
            "{sent}"
        );
        for line in [
            "Connection: close\r\n",
            "accept-encoding: identity\r\n",
            "authorization: Bearer t\r\n",
        ] {
            assert!(sent.contains(line), "{line:?} missing from {sent}");
        }
    }

    #[tokio::test]
    async fn anything_but_a_plain_200_is_declined_with_its_status() {
        for response in [
            &b"HTTP/1.1 401 Unauthorized\r\nWWW-Authenticate: Basic\r\nContent-Length: 0\r\n\r\n"[..],
            b"HTTP/1.1 307 Temporary Redirect\r\nLocation: http://x/\r\nContent-Length: 0\r\n\r\n",
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
            b"HTTP/1.1 200 OK\r\nContent-Encoding: gzip\r\nContent-Length: 3\r\n\r\nabc",
            b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\nContent-Length: 4\r\n\r\nabcd",
            b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\nabcd",
        ] {
            let response: &'static [u8] = response;
            let (url, _) = answering(response).await;
            let answer = get(&url, &HeaderMap::new(), T, T).await.unwrap();
            let what = String::from_utf8_lossy(response);
            assert!(answer.body.is_none(), "took {what}");
            let status = answer.status;
            assert_eq!(&response[9..12], status.as_str().as_bytes(), "{what}");
        }
    }

    #[tokio::test]
    async fn a_garbled_head_or_a_closed_connection_is_an_error() {
        let (url, _) = answering(b"SPDY/9 what\r\n\r\n").await;
        assert!(matches!(
            get(&url, &HeaderMap::new(), T, T).await,
            Err(UpstreamErrorKind::Protocol(_))
        ));
        let (url, _) = answering(b"HTTP/1.1 200 OK\r\nContent-Le").await;
        assert!(matches!(
            get(&url, &HeaderMap::new(), T, T).await,
            Err(UpstreamErrorKind::Unreachable(_))
        ));
    }
}
