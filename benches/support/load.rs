//! The load: a reqwest downloader for blob pulls (N concurrent clients, each timed to its last
//! byte), `wrk` as a separate process for request rates, and a bare readiness probe.

use std::{
    path::Path,
    process::Command,
    sync::Arc,
    time::{Duration, Instant},
};

use anyhow::{bail, ensure, Context, Result};
use tokio::sync::Barrier;

use super::procs::{find_program, ChildGuard};

/// The longest one blob pull may take before the scenario fails instead of hanging.
const PULL_TIMEOUT: Duration = Duration::from_secs(300);

/// The status code of `GET {path}` on `127.0.0.1:{port}` over a fresh HTTP/1.1 connection.
pub async fn get_status(port: u16, path: &str) -> Result<u16> {
    use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
    let probe = async {
        let mut stream = tokio::net::TcpStream::connect(("127.0.0.1", port)).await?;
        let request =
            format!("GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nConnection: close\r\n\r\n");
        stream.write_all(request.as_bytes()).await?;
        let mut line = String::new();
        BufReader::new(stream).read_line(&mut line).await?;
        line.split_whitespace()
            .nth(1)
            .and_then(|code| code.parse().ok())
            .with_context(|| format!("not an HTTP status line: {line:?}"))
    };
    tokio::time::timeout(Duration::from_secs(2), probe)
        .await
        .context("no answer within 2s")?
}

/// A client as a puller would have: no environment proxies, one connection per request in
/// flight. reqwest is built with `rustls-no-provider`, so a crypto provider must be installed
/// before any client is built (even for plain HTTP).
pub fn client() -> Result<reqwest::Client> {
    let _ = rustls::crypto::ring::default_provider().install_default();
    Ok(reqwest::Client::builder().no_proxy().build()?)
}

/// GETs `url`, streaming the body to a sink; fails unless it is a 200 of exactly `len` bytes.
/// Returns the time to the last byte.
pub async fn pull(client: &reqwest::Client, url: &str, len: u64) -> Result<Duration> {
    let start = Instant::now();
    let work = async {
        let mut resp = client.get(url).send().await?;
        ensure!(resp.status() == 200, "GET {url}: status {}", resp.status());
        let mut got = 0u64;
        while let Some(chunk) = resp.chunk().await? {
            got += chunk.len() as u64;
        }
        ensure!(got == len, "GET {url}: {got} bytes, expected {len}");
        Ok(start.elapsed())
    };
    tokio::time::timeout(PULL_TIMEOUT, work)
        .await
        .with_context(|| format!("GET {url} took longer than {PULL_TIMEOUT:?}"))?
}

/// How long one pull took to its first body byte and to its last.
#[derive(Clone, Copy, Debug)]
pub struct Timed {
    pub first_byte: Duration,
    pub last_byte: Duration,
}

/// [`pull`], timed to the first body byte too (from just before the request is sent, so a
/// connection's setup is inside both figures).
pub async fn pull_ttfb(client: &reqwest::Client, url: &str, len: u64) -> Result<Timed> {
    let start = Instant::now();
    let work = async {
        let mut resp = client.get(url).send().await?;
        ensure!(resp.status() == 200, "GET {url}: status {}", resp.status());
        let mut got = 0u64;
        let mut first_byte = None;
        while let Some(chunk) = resp.chunk().await? {
            if !chunk.is_empty() {
                first_byte.get_or_insert_with(|| start.elapsed());
            }
            got += chunk.len() as u64;
        }
        ensure!(got == len, "GET {url}: {got} bytes, expected {len}");
        let last_byte = start.elapsed();
        Ok(Timed {
            first_byte: first_byte.unwrap_or(last_byte),
            last_byte,
        })
    };
    tokio::time::timeout(PULL_TIMEOUT, work)
        .await
        .with_context(|| format!("GET {url} took longer than {PULL_TIMEOUT:?}"))?
}

/// `clients` concurrent pulls of `url`, each its own client (so its own connection), released
/// together. Returns each client's time to last byte, from the common start.
pub async fn pull_concurrent(url: &str, clients: usize, len: u64) -> Result<Vec<Duration>> {
    pull_spread(&[url.to_owned()], clients, len).await
}

/// [`pull_concurrent`] with the clients spread round-robin over `urls` (client `i` pulls
/// `urls[i % urls.len()]`): several replicas of one cache. The times are in client order.
pub async fn pull_spread(urls: &[String], clients: usize, len: u64) -> Result<Vec<Duration>> {
    ensure!(!urls.is_empty(), "no URL to pull");
    let barrier = Arc::new(Barrier::new(clients + 1));
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..clients {
        let client = client()?;
        let url = urls[i % urls.len()].clone();
        let barrier = barrier.clone();
        tasks.spawn(async move {
            barrier.wait().await;
            pull(&client, &url, len).await.map(|t| (i, t))
        });
    }
    barrier.wait().await;
    let mut times = vec![Duration::ZERO; clients];
    while let Some(joined) = tasks.join_next().await {
        let (i, t) = joined??;
        times[i] = t;
    }
    Ok(times)
}

/// What one `wrk` run reported.
#[derive(Clone, Copy, Debug, Default)]
pub struct WrkResult {
    pub requests_per_sec: f64,
    pub requests: u64,
    /// Responses that were neither 2xx nor 3xx.
    pub non_success: u64,
    /// Socket errors of all kinds (connect, read, write, timeout).
    pub socket_errors: u64,
}

impl WrkResult {
    /// Whether the rate counts: nearly every response a success and no pile of socket errors.
    pub fn valid(&self) -> bool {
        let bad = self.non_success + self.socket_errors;
        self.requests > 0 && (bad as f64) <= (self.requests as f64) * 0.001
    }
}

/// Runs `wrk -t<threads> -c<connections> -d<secs>s [-H header] url` and parses its summary.
pub async fn wrk(
    dir: &Path,
    url: &str,
    threads: usize,
    connections: usize,
    secs: u64,
    header: Option<&str>,
) -> Result<WrkResult> {
    let bin = find_program("wrk")?;
    let mut cmd = Command::new(bin);
    cmd.arg(format!("-t{threads}"))
        .arg(format!("-c{connections}"))
        .arg(format!("-d{secs}s"))
        .arg("--timeout")
        .arg("10s");
    if let Some(h) = header {
        cmd.arg("-H").arg(h);
    }
    cmd.arg(url);
    let mut child = ChildGuard::spawn("wrk", cmd, dir.join("wrk.out"))?;
    let status = child.wait_exit(Duration::from_secs(secs + 60)).await?;
    let output = child.output();
    if !status.success() {
        bail!("wrk {url} failed with {status}:\n{output}");
    }
    parse_wrk(&output).with_context(|| format!("parsing wrk's output:\n{output}"))
}

fn parse_wrk(output: &str) -> Result<WrkResult> {
    let mut r = WrkResult::default();
    for line in output.lines().map(str::trim) {
        if let Some(v) = line.strip_prefix("Requests/sec:") {
            r.requests_per_sec = v.trim().parse()?;
        } else if let Some(v) = line.strip_prefix("Non-2xx or 3xx responses:") {
            r.non_success = v.trim().parse()?;
        } else if let Some(v) = line.strip_prefix("Socket errors:") {
            // "connect 0, read 0, write 0, timeout 0"
            r.socket_errors = v
                .split(',')
                .filter_map(|part| part.split_whitespace().nth(1)?.parse::<u64>().ok())
                .sum();
        } else if line.contains(" requests in ") {
            // "123456 requests in 10.00s, 1.21GB read"
            r.requests = line.split_whitespace().next().unwrap_or("0").parse()?;
        }
    }
    ensure!(r.requests_per_sec > 0.0, "no Requests/sec line");
    Ok(r)
}
