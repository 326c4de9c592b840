//! Shared helpers for integration tests: an in-process fake upstream (`fake_registry`), entrepot
//! in-process (`proxy`), real programs for end-to-end runs (`real`, with the clients in
//! `clients`, authenticated upstreams in `auth_e2e`, OCI checks in `oci_e2e` and the test CA and
//! HTTPS clients in `tls`), and the small utilities all of them use: HTTP clients, digests,
//! random bytes, config tables, OCI error bodies, an accept loop.
#![allow(dead_code)] // each test binary uses a different subset of these helpers

pub mod auth_e2e;
pub mod clients;
pub mod cluster;
pub mod fake_registry;
pub mod garage;
pub mod oci_e2e;
pub mod proxy;
pub mod real;
pub mod s3_relay;
pub mod tls;

use std::future::Future;
use std::net::{SocketAddr, TcpListener};

use anyhow::Context as _;
use base64::Engine as _;
use sha2::{Digest as _, Sha256};
use tokio::task::JoinSet;

pub const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
pub const OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";
pub const OCI_CONFIG: &str = "application/vnd.oci.image.config.v1+json";
pub const OCI_LAYER: &str = "application/vnd.oci.image.layer.v1.tar+gzip";

/// A port that was free a moment ago. Prefer binding `127.0.0.1:0` and passing the listener on;
/// this is for the rare config that wants a number before anything is bound.
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a: SocketAddr| a.port())
        .expect("bind 127.0.0.1:0")
}

/// `N` ports, free a moment ago and all different. The listeners are held together while the
/// kernel picks, so no port comes twice: two [`free_port`] calls in a row can return the same
/// number, the first listener being closed before the second bind.
pub fn free_ports<const N: usize>() -> [u16; N] {
    let listeners: Vec<TcpListener> = (0..N)
        .map(|_| TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0"))
        .collect();
    std::array::from_fn(|i| listeners[i].local_addr().expect("local address").port())
}

/// A port free a moment ago that is none of `taken` (which a process may not have bound yet).
pub fn free_port_besides(taken: &[u16]) -> u16 {
    loop {
        let port = free_port();
        if !taken.contains(&port) {
            return port;
        }
    }
}

/// Installs the ring crypto provider; reqwest (`rustls-no-provider`) panics building any client,
/// even a plain-HTTP one, without a process-wide default.
pub fn install_crypto() {
    // Err only means another test in this binary got there first.
    let _ = rustls::crypto::ring::default_provider().install_default();
}

/// A reqwest client for tests: crypto installed, environment proxies ignored (so
/// `127.0.0.1` is reached directly), redirects followed as reqwest does by default.
pub fn client() -> reqwest::Client {
    install_crypto();
    reqwest::Client::builder()
        .no_proxy()
        .build()
        .expect("build reqwest client")
}

/// Like [`client`] but returns 3xx responses instead of following them.
pub fn client_no_redirect() -> reqwest::Client {
    install_crypto();
    reqwest::Client::builder()
        .no_proxy()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .expect("build reqwest client")
}

/// `sha256:<hex>` of `data`, the form every digest takes in these tests.
pub fn sha256_digest(data: &[u8]) -> String {
    format!("sha256:{}", hex::encode(Sha256::digest(data)))
}

/// `GET url` of the blob `digest`: a 200 whose body is as long as its `Content-Length` and
/// hashes to `digest`. Some HTTP clients hand back a short body without an error when the
/// server closes early, so a status alone proves nothing about a transfer.
pub async fn get_blob(
    client: &reqwest::Client,
    url: &str,
    digest: &str,
) -> anyhow::Result<bytes::Bytes> {
    let resp = client
        .get(url)
        .send()
        .await
        .with_context(|| format!("GET {url}"))?;
    anyhow::ensure!(resp.status() == 200, "GET {url}: status {}", resp.status());
    let announced = resp.content_length();
    let body = resp
        .bytes()
        .await
        .with_context(|| format!("GET {url}: the body"))?;
    anyhow::ensure!(
        announced.is_none_or(|n| n == body.len() as u64),
        "GET {url}: {} bytes of an announced {announced:?}",
        body.len()
    );
    anyhow::ensure!(
        sha256_digest(&body) == digest,
        "GET {url}: the {} bytes received are not {digest}",
        body.len()
    );
    Ok(body)
}

/// Polls `ok` every 50 ms until it holds; fails the test, naming `what`, after `limit`.
pub async fn eventually<F, Fut>(limit: std::time::Duration, what: &str, mut ok: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + limit;
    while !ok().await {
        assert!(
            tokio::time::Instant::now() < deadline,
            "waited {limit:?} for {what}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
}

/// Standard padded base64, as in `Authorization: Basic`.
pub fn base64_encode(input: &[u8]) -> String {
    base64::engine::general_purpose::STANDARD.encode(input)
}

/// Pseudo-random bytes (xorshift), the same for the same `seed`: incompressible, and distinct
/// for distinct seeds. Not for anything secret.
pub fn random_bytes(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        out.extend_from_slice(&x.to_le_bytes());
    }
    out.truncate(len);
    out
}

/// One `[[upstream]]` table of entrepot's config; `extra` holds more keys, one a line.
pub fn upstream(name: &str, url: &str, default: bool, extra: &str) -> String {
    format!("[[upstream]]\nname = \"{name}\"\nurl = \"{url}\"\ndefault = {default}\n{extra}\n")
}

/// The body as JSON (reqwest's `json` feature is off in this crate).
pub async fn json(resp: reqwest::Response) -> serde_json::Value {
    serde_json::from_slice(&resp.bytes().await.unwrap()).unwrap()
}

/// The entries of an OCI error body, `{"errors": [{"code": ..., "message": ...}, ...]}`, or `Err`
/// if it is not one.
pub fn oci_error_entries(body: &[u8]) -> anyhow::Result<Vec<serde_json::Value>> {
    let v: serde_json::Value = serde_json::from_slice(body)
        .with_context(|| format!("not a JSON error body: {:?}", String::from_utf8_lossy(body)))?;
    v["errors"]
        .as_array()
        .cloned()
        .with_context(|| format!("no `errors` array in {v}"))
}

/// The `(code, message)` pairs of an OCI error body, or `Err` if it is not one.
pub fn oci_errors(body: &[u8]) -> anyhow::Result<Vec<(String, String)>> {
    let text = |e: &serde_json::Value, key: &str| e[key].as_str().unwrap_or_default().to_owned();
    Ok(oci_error_entries(body)?
        .iter()
        .map(|e| (text(e, "code"), text(e, "message")))
        .collect())
}

/// The code of the first error in an OCI error body; panics if the body is not one.
pub async fn error_code(resp: reqwest::Response) -> String {
    let errors = oci_error_entries(&resp.bytes().await.unwrap()).unwrap();
    errors[0]["code"].as_str().unwrap().to_string()
}

/// Accepts connections on `listener` and runs `conn` for each, forever. The connections are
/// owned by this future, so aborting the task running it ends every one of them too: nothing a
/// test leaves hanging outlives the server.
pub async fn serve_connections<F, Fut>(listener: tokio::net::TcpListener, mut conn: F)
where
    F: FnMut(tokio::net::TcpStream) -> Fut,
    Fut: Future<Output = ()> + Send + 'static,
{
    let mut conns = JoinSet::new();
    loop {
        tokio::select! {
            accepted = listener.accept() => {
                let Ok((stream, _)) = accepted else { continue };
                conns.spawn(conn(stream));
            }
            Some(_) = conns.join_next(), if !conns.is_empty() => {}
        }
    }
}
