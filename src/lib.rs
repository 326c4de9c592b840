//! entrepot: a pull-through caching proxy for OCI / Docker registries.
//!
//! # Layout
//!
//! ```text
//! main.rs      CLI: parse args, init tracing, load config, run the server
//! app.rs       Server: listener, connections, TaskTracker + shutdown token, graceful drain
//! config/      TOML → validated Config; built-in defaults for well-known registries
//! error.rs     ApiError: the one place errors become HTTP status + OCI error JSON
//! clock.rs     the clock tag TTLs and token expiry are measured with
//! tls.rs       the process's rustls crypto provider (ring), installed before any client
//! server_tls.rs  [server.tls]: the listener's certificate, its reloads, client certificates
//! oci/         protocol only, no I/O: names, references, digests, routes, media types, ranges
//! http/        router, blob and manifest handlers, forwarded endpoints, access log, /metrics
//! metrics.rs   Prometheus metric names and recording
//! cache/       the store: blob lookup, fills and followers, temp files, manifests, tag index,
//!              usage (use stamps, readers), inventory and eviction; layout.rs spells every
//!              key; backend/ is the storage seam (fs, s3, memory)
//! upstream/    upstream selection, registry client, bearer/basic auth, token cache
//! auth/        client authentication (htpasswd, client certificates) and the read policy
//! cluster/     replicas: membership, rendezvous ownership, signed one-hop forwards
//! tools/       beside the server: prefetch, export/import bundles, `cache ls|rm|verify|gc`
//! ui/          the read-only status page (`/ui/`) and its JSON API, with the counters it shows
//! ```
//!
//! A blob request goes router → access policy → `http::blobs` → `Store::blob`: a hit is served
//! from its file once its (upstream, repository) is linked (`http::scope`); a miss starts one
//! detached fill per digest (`cache::fill`) that owns the source stream (the bucket, the
//! owner replica, or the upstream), and every client reads behind it (`cache::read::follow`).

// `unsafe` is denied everywhere but in two measured hot paths: mapping stored blobs for serving
// (`cache::mapped`) and the C library calls of `sys` (allocator tuning, disk reservation); each
// says why it is sound.
#![deny(unsafe_code)]

pub mod app;
pub mod auth;
pub mod cache;
pub mod clock;
pub mod cluster;
pub mod config;
pub mod error;
pub mod http;
pub mod logging;
pub mod metrics;
pub mod oci;
pub mod server_tls;
pub mod sys;
pub mod tls;
pub mod tools;
pub mod ui;
pub mod upstream;

pub use app::Server;
pub use config::Config;
