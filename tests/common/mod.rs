//! Shared helpers for integration tests: an in-process fake upstream (`fake_registry`), real
//! programs for end-to-end runs (`real`), and small utilities.
#![allow(dead_code)] // each test binary uses a different subset of these helpers

pub mod auth_e2e;
pub mod clients;
pub mod fake_registry;
pub mod oci_e2e;
pub mod proxy;
pub mod real;

use std::net::{SocketAddr, TcpListener};

/// A port that was free a moment ago. Prefer binding `127.0.0.1:0` and passing the listener on;
/// this is for the rare config that wants a number before anything is bound.
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a: SocketAddr| a.port())
        .expect("bind 127.0.0.1:0")
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
