//! A counting TCP relay between a proxy and the upstream registry (or the S3 server): every
//! byte the upstream sends and every HTTP/1 request line the proxy sends are counted, so
//! "upstream bytes ÷ blob size" and "upstream requests" are measured on the wire, whatever the
//! proxy's own logs say.

use std::sync::{
    atomic::{AtomicU64, Ordering},
    Arc,
};

use anyhow::Result;
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpListener, TcpStream},
    task::{JoinHandle, JoinSet},
};

/// Large reads keep the relay's own cost (it shares the 2 cores) small next to the proxies'.
const BUF: usize = 256 * 1024;

/// What ends a request head line; found once per HTTP/1 request the proxy sends.
const REQUEST_LINE_END: &[u8] = b" HTTP/1.1\r\n";

/// The HTTP/2 connection preface: requests inside it cannot be counted by request line.
const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0";

#[derive(Default)]
struct Counters {
    /// Bytes the upstream sent towards the proxy (response heads and bodies).
    bytes_down: AtomicU64,
    /// Bytes the proxy sent towards the upstream.
    bytes_up: AtomicU64,
    /// HTTP/1 requests the proxy sent.
    requests: AtomicU64,
    /// Connections the proxy opened.
    connections: AtomicU64,
    /// Connections that spoke HTTP/2 (their requests are not in `requests`).
    h2_connections: AtomicU64,
}

/// The counters at one moment; subtract two to get what happened in between.
#[derive(Clone, Copy, Debug, Default)]
pub struct Counts {
    pub bytes_down: u64,
    pub bytes_up: u64,
    pub requests: u64,
    pub connections: u64,
    pub h2_connections: u64,
}

impl std::ops::Sub for Counts {
    type Output = Counts;
    fn sub(self, rhs: Counts) -> Counts {
        Counts {
            bytes_down: self.bytes_down - rhs.bytes_down,
            bytes_up: self.bytes_up - rhs.bytes_up,
            requests: self.requests - rhs.requests,
            connections: self.connections - rhs.connections,
            h2_connections: self.h2_connections - rhs.h2_connections,
        }
    }
}

/// A relay listening on 127.0.0.1 that forwards every connection to `target`. Dropping it
/// stops accepting and closes every relayed connection.
pub struct Relay {
    pub port: u16,
    counters: Arc<Counters>,
    task: JoinHandle<()>,
}

impl Relay {
    pub async fn start(target: u16) -> Result<Self> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let port = listener.local_addr()?.port();
        let counters = Arc::new(Counters::default());
        let c = counters.clone();
        let task = tokio::spawn(async move {
            // Owned here, so aborting the accept loop drops (aborts) every connection too.
            let mut connections = JoinSet::new();
            loop {
                tokio::select! {
                    accepted = listener.accept() => {
                        let Ok((client, _)) = accepted else { continue };
                        c.connections.fetch_add(1, Ordering::Relaxed);
                        connections.spawn(relay(client, target, c.clone()));
                    }
                    Some(_) = connections.join_next(), if !connections.is_empty() => {}
                }
            }
        });
        Ok(Self {
            port,
            counters,
            task,
        })
    }

    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    pub fn counts(&self) -> Counts {
        let c = &self.counters;
        Counts {
            bytes_down: c.bytes_down.load(Ordering::Relaxed),
            bytes_up: c.bytes_up.load(Ordering::Relaxed),
            requests: c.requests.load(Ordering::Relaxed),
            connections: c.connections.load(Ordering::Relaxed),
            h2_connections: c.h2_connections.load(Ordering::Relaxed),
        }
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn relay(client: TcpStream, target: u16, counters: Arc<Counters>) {
    let Ok(upstream) = TcpStream::connect(("127.0.0.1", target)).await else {
        return; // the client sees its connection closed, as if the upstream were down
    };
    let _ = client.set_nodelay(true);
    let _ = upstream.set_nodelay(true);
    let (mut client_read, mut client_write) = client.into_split();
    let (mut upstream_read, mut upstream_write) = upstream.into_split();
    let up = async {
        let mut buf = vec![0u8; BUF];
        // The end of the previous read, so a request line split across reads is still found.
        let mut tail: Vec<u8> = Vec::new();
        let mut first = true;
        loop {
            let n = match client_read.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => n,
            };
            let data = &buf[..n];
            if first && data.starts_with(H2_PREFACE) {
                counters.h2_connections.fetch_add(1, Ordering::Relaxed);
            }
            first = false;
            tail.extend_from_slice(data);
            let found = count(&tail, REQUEST_LINE_END);
            counters.requests.fetch_add(found, Ordering::Relaxed);
            let keep = REQUEST_LINE_END.len() - 1;
            tail.drain(..tail.len().saturating_sub(keep));
            counters.bytes_up.fetch_add(n as u64, Ordering::Relaxed);
            if upstream_write.write_all(data).await.is_err() {
                break;
            }
        }
        let _ = upstream_write.shutdown().await;
    };
    let down = async {
        let mut buf = vec![0u8; BUF];
        loop {
            let n = match upstream_read.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => n,
            };
            counters.bytes_down.fetch_add(n as u64, Ordering::Relaxed);
            if client_write.write_all(&buf[..n]).await.is_err() {
                break;
            }
        }
        let _ = client_write.shutdown().await;
    };
    tokio::join!(up, down);
}

/// Occurrences of `needle`, whose only `\n` is its last byte, in `haystack`. Only the rare
/// `\n` bytes are compared further: the relay scans every byte a proxy uploads to the bucket
/// (hundreds of MiB per cold pull), on the cores the proxies use.
fn count(haystack: &[u8], needle: &[u8]) -> u64 {
    debug_assert!(needle.ends_with(b"\n") && !needle[..needle.len() - 1].contains(&b'\n'));
    let last = needle.len() - 1;
    haystack
        .iter()
        .enumerate()
        .skip(last)
        .filter(|&(end, &b)| b == b'\n' && &haystack[end - last..=end] == needle)
        .count() as u64
}
