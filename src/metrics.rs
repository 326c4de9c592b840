//! Prometheus metrics: one process-wide recorder, the names and help texts of every metric
//! entrepot exports, and small functions the stages call to record them.

use std::sync::OnceLock;
use std::time::Duration;

use metrics::{counter, describe_counter, describe_gauge, describe_histogram, gauge, histogram};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};

pub const REQUESTS: &str = "entrepot_requests_total";
pub const SERVED_BYTES: &str = "entrepot_served_bytes_total";
pub const SENDFILE_BYTES: &str = "entrepot_sendfile_bytes_total";
pub const UPSTREAM_REQUESTS: &str = "entrepot_upstream_requests_total";
pub const UPSTREAM_DURATION: &str = "entrepot_upstream_request_duration_seconds";
pub const UPSTREAM_ERRORS: &str = "entrepot_upstream_errors_total";
pub const UPSTREAM_BYTES: &str = "entrepot_upstream_bytes_total";
pub const SPLICED_BYTES: &str = "entrepot_upstream_spliced_bytes_total";
pub const UPSTREAM_RATELIMIT: &str = "entrepot_upstream_ratelimit_remaining";
pub const FILLS: &str = "entrepot_fills_in_progress";
pub const CACHE_BYTES: &str = "entrepot_cache_bytes";
pub const CACHE_MAX_BYTES: &str = "entrepot_cache_max_bytes";
pub const CACHE_ENTRIES: &str = "entrepot_cache_entries";
pub const EVICTIONS: &str = "entrepot_evictions_total";
pub const EVICTED_BYTES: &str = "entrepot_evicted_bytes_total";
pub const STORAGE_ERRORS: &str = "entrepot_storage_errors_total";
const S3_ABORTED_UPLOADS: &str = "entrepot_s3_aborted_uploads_total";
const S3_REQUESTS: &str = "entrepot_s3_requests_total";
const S3_DURATION: &str = "entrepot_s3_request_duration_seconds";
const S3_VISIBILITY_MISSES: &str = "entrepot_s3_visibility_misses_total";
const BUCKET_FILLS: &str = "entrepot_bucket_fills_total";
pub const CLUSTER_FORWARDED: &str = "entrepot_cluster_forwarded_total";
pub const CLUSTER_SERVED_FOR_PEER: &str = "entrepot_cluster_served_for_peer_total";
pub const CLUSTER_LOCAL_FALLBACK: &str = "entrepot_cluster_local_fallback_total";
pub const CLUSTER_RELAY_STREAMS: &str = "entrepot_cluster_relay_streams_total";
pub const CLUSTER_PEERS_HEALTHY: &str = "entrepot_cluster_peers_healthy";
pub const TLS_RELOADS: &str = "entrepot_tls_reloads_total";
pub const TLS_RELOAD_FAILURES: &str = "entrepot_tls_reload_failures_total";

static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();

/// Installs the recorder (once per process) and returns the handle that renders `/metrics`.
pub fn install() -> PrometheusHandle {
    HANDLE
        .get_or_init(|| {
            let recorder = PrometheusBuilder::new()
                .set_buckets_for_metric(
                    Matcher::Full(S3_DURATION.to_string()),
                    &[
                        0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
                    ],
                )
                .expect("bucket list is not empty")
                .set_buckets_for_metric(
                    Matcher::Full(UPSTREAM_DURATION.to_string()),
                    &[
                        0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
                    ],
                )
                .expect("bucket list is not empty")
                .build_recorder();
            let handle = recorder.handle();
            if metrics::set_global_recorder(recorder).is_err() {
                tracing::warn!("a metrics recorder was already installed; /metrics will be empty");
            }
            describe();
            handle
        })
        .clone()
}

fn describe() {
    describe_counter!(
        REQUESTS,
        "Requests answered, by upstream, kind, outcome and status."
    );
    describe_counter!(
        SERVED_BYTES,
        "Body bytes sent to clients, by source: cache (stored content) or upstream (fills and bypass)."
    );
    describe_counter!(
        SENDFILE_BYTES,
        "Body bytes sent from stored blobs' files with sendfile, not copied through the process."
    );
    describe_counter!(
        SPLICED_BYTES,
        "Blob bytes received from plain-HTTP upstreams straight into the store's files with splice, not copied through the process."
    );
    describe_counter!(
        UPSTREAM_REQUESTS,
        "Requests sent to upstreams, by upstream and status."
    );
    describe_histogram!(
        UPSTREAM_DURATION,
        metrics::Unit::Seconds,
        "Time until an upstream answered with headers."
    );
    describe_counter!(
        UPSTREAM_ERRORS,
        "Failed upstream requests, by upstream and kind."
    );
    describe_counter!(
        UPSTREAM_BYTES,
        "Blob bytes fetched from upstreams by fills."
    );
    describe_gauge!(
        UPSTREAM_RATELIMIT,
        "The upstream's last RateLimit-Remaining value (Docker Hub pulls left in its window)."
    );
    describe_gauge!(FILLS, "Blob fills in progress.");
    describe_gauge!(CACHE_BYTES, "Bytes of content in the store.");
    describe_gauge!(
        CACHE_MAX_BYTES,
        "The configured storage.max_size (0: unbounded)."
    );
    describe_gauge!(
        CACHE_ENTRIES,
        "Blobs (layers, configs, manifests) in the store."
    );
    describe_counter!(
        EVICTIONS,
        "Blobs evicted to keep the store under storage.max_size."
    );
    describe_counter!(EVICTED_BYTES, "Bytes evicted.");
    describe_counter!(
        STORAGE_ERRORS,
        "Store write failures (clients were served from upstream)."
    );
    describe_counter!(
        S3_ABORTED_UPLOADS,
        "Multipart uploads to the bucket aborted after an error (nothing became visible)."
    );
    describe_counter!(
        S3_REQUESTS,
        "Requests sent to the bucket, by S3 operation and status (none: no answer); retries count."
    );
    describe_histogram!(
        S3_DURATION,
        metrics::Unit::Seconds,
        "Time until the bucket answered, by S3 operation."
    );
    describe_counter!(
        S3_VISIBILITY_MISSES,
        "Objects the bucket listed or reported but then did not serve (read-after-write or replication lag)."
    );
    describe_counter!(
        BUCKET_FILLS,
        "Blobs copied from the bucket into this replica's local tier (no upstream request)."
    );
    describe_counter!(
        CLUSTER_FORWARDED,
        "Misses sent to the key's owner replica that it answered (blob fills, manifests, tags)."
    );
    describe_counter!(
        CLUSTER_SERVED_FOR_PEER,
        "Requests answered for another replica (signed forwards)."
    );
    describe_counter!(
        CLUSTER_RELAY_STREAMS,
        "Streams opened to an owner replica to relay a blob held nowhere here (kind: shared by this replica's clients, range, resume of a client that fell behind)."
    );
    describe_counter!(
        CLUSTER_LOCAL_FALLBACK,
        "Forwards that failed (owner unreachable, slow or failing): served from here instead."
    );
    describe_gauge!(
        CLUSTER_PEERS_HEALTHY,
        "Other replicas that answered their last probe."
    );
    describe_counter!(
        TLS_RELOADS,
        "[server.tls] files read again and put in service (SIGHUP or a file change)."
    );
    describe_counter!(
        TLS_RELOAD_FAILURES,
        "[server.tls] reloads refused (a file unreadable, not PEM, or not matching): the previous certificate stays in service."
    );
}

pub fn request(upstream: &str, kind: &'static str, outcome: &'static str, status: u16, bytes: u64) {
    counter!(REQUESTS, "upstream" => upstream.to_string(), "kind" => kind, "outcome" => outcome, "status" => status.to_string())
        .increment(1);
    let source = match outcome {
        "hit" | "revalidated" | "stale" => "cache",
        _ => "upstream",
    };
    counter!(SERVED_BYTES, "source" => source).increment(bytes);
}

/// `bytes` of a stored blob went to a client with `sendfile`. Called for every such write:
/// the handle is looked up once (after the recorder is installed, as the first write is).
pub fn sendfile_bytes(bytes: u64) {
    static HANDLE: std::sync::OnceLock<metrics::Counter> = std::sync::OnceLock::new();
    HANDLE
        .get_or_init(|| counter!(SENDFILE_BYTES))
        .increment(bytes);
}

/// Blob bytes an upstream's socket handed to a fill's temp file with `splice`.
pub fn spliced_bytes(bytes: u64) {
    static HANDLE: std::sync::OnceLock<metrics::Counter> = std::sync::OnceLock::new();
    HANDLE
        .get_or_init(|| counter!(SPLICED_BYTES))
        .increment(bytes);
}

/// One upstream exchange: `status` is the HTTP status, or `None` when no answer came.
pub fn upstream_request(upstream: &str, status: Option<u16>, took: Duration) {
    let status = status.map_or_else(|| "none".to_string(), |s| s.to_string());
    counter!(UPSTREAM_REQUESTS, "upstream" => upstream.to_string(), "status" => status)
        .increment(1);
    histogram!(UPSTREAM_DURATION, "upstream" => upstream.to_string()).record(took.as_secs_f64());
}

pub fn upstream_error(upstream: &str, kind: &'static str) {
    counter!(UPSTREAM_ERRORS, "upstream" => upstream.to_string(), "kind" => kind).increment(1);
}

pub fn upstream_bytes(upstream: &str, n: u64) {
    counter!(UPSTREAM_BYTES, "upstream" => upstream.to_string()).increment(n);
}

pub fn ratelimit_remaining(upstream: &str, remaining: f64) {
    gauge!(UPSTREAM_RATELIMIT, "upstream" => upstream.to_string()).set(remaining);
}

pub fn fills(n: usize) {
    gauge!(FILLS).set(n as f64);
}

pub fn cache_size(bytes: u64, entries: u64) {
    gauge!(CACHE_BYTES).set(bytes as f64);
    gauge!(CACHE_ENTRIES).set(entries as f64);
}

pub fn cache_max(bytes: Option<u64>) {
    gauge!(CACHE_MAX_BYTES).set(bytes.unwrap_or(0) as f64);
}

pub fn evicted(blobs: u64, bytes: u64) {
    counter!(EVICTIONS).increment(blobs);
    counter!(EVICTED_BYTES).increment(bytes);
}

pub fn storage_error() {
    counter!(STORAGE_ERRORS).increment(1);
}

pub fn s3_upload_aborted() {
    counter!(S3_ABORTED_UPLOADS).increment(1);
}

pub fn bucket_fill() {
    counter!(BUCKET_FILLS).increment(1);
}

pub fn s3_request(operation: &'static str, status: Option<u16>, took: Duration) {
    let status = status.map_or_else(|| "none".to_string(), |s| s.to_string());
    counter!(S3_REQUESTS, "operation" => operation, "status" => status).increment(1);
    histogram!(S3_DURATION, "operation" => operation).record(took.as_secs_f64());
}

pub fn s3_visibility_miss() {
    counter!(S3_VISIBILITY_MISSES).increment(1);
}

pub fn cluster_forwarded() {
    counter!(CLUSTER_FORWARDED).increment(1);
}

pub fn cluster_served_for_peer() {
    counter!(CLUSTER_SERVED_FOR_PEER).increment(1);
}

pub fn cluster_relay_stream(kind: &'static str) {
    counter!(CLUSTER_RELAY_STREAMS, "kind" => kind).increment(1);
}

pub fn cluster_fallback() {
    counter!(CLUSTER_LOCAL_FALLBACK).increment(1);
}

pub fn cluster_peers_healthy(n: usize) {
    gauge!(CLUSTER_PEERS_HEALTHY).set(n as f64);
}

/// `[server.tls]` is on: both reload counters exist from the start, so alerts on their increase
/// see a zero rather than no series.
pub fn tls_enabled() {
    counter!(TLS_RELOADS).increment(0);
    counter!(TLS_RELOAD_FAILURES).increment(0);
}

pub fn tls_reloaded() {
    counter!(TLS_RELOADS).increment(1);
}

pub fn tls_reload_failed() {
    counter!(TLS_RELOAD_FAILURES).increment(1);
}
