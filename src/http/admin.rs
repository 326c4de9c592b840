//! Operator endpoints: `/metrics` (Prometheus text), `/healthz` (the process answers),
//! `/readyz` (the store is writable) and `POST /pins` (record pinned images, one reference a
//! line, as `entrepot prefetch --server` does). Served on the main listener, or on
//! `admin_listen` alone.

use bytes::Bytes;
use http::{header, Method, Response, StatusCode};

use super::body::{self, Body};
use super::AppState;

/// Answers an operator path, or `None` if `path` is not one.
pub async fn serve(
    state: &AppState,
    method: &Method,
    path: &str,
    body: impl FnOnce() -> futures_util::future::BoxFuture<'static, Option<Bytes>>,
) -> Option<Response<Body>> {
    let head = method == Method::HEAD;
    let read_only = matches!(path, "/metrics" | "/healthz" | "/readyz");
    if read_only && !matches!(*method, Method::GET | Method::HEAD) {
        return Some(
            crate::error::ApiError::MethodNotAllowed.into_response(crate::oci::Kind::Other, head),
        );
    }
    let (status, content_type, text) = match path {
        "/pins" if method == Method::POST => match body().await {
            Some(text) => pins(state, &String::from_utf8_lossy(&text)).await,
            None => (
                StatusCode::PAYLOAD_TOO_LARGE,
                "text/plain",
                "the pin list must be sent whole, at most 1 MiB\n".to_string(),
            ),
        },
        "/metrics" => (
            StatusCode::OK,
            "text/plain; version=0.0.4",
            state.metrics.render(),
        ),
        "/healthz" => (StatusCode::OK, "text/plain", "ok\n".to_string()),
        "/readyz" => match state.store.check_writable().await {
            Ok(()) => (StatusCode::OK, "text/plain", "ready\n".to_string()),
            Err(e) => {
                tracing::warn!(error = %e, "not ready: the store is not writable");
                (
                    StatusCode::SERVICE_UNAVAILABLE,
                    "text/plain",
                    "not ready: the store is not writable\n".to_string(),
                )
            }
        },
        _ => return None,
    };
    Some(
        Response::builder()
            .status(status)
            .header(header::CONTENT_TYPE, content_type)
            .header(header::CONTENT_LENGTH, text.len())
            .header(header::CACHE_CONTROL, "no-store")
            .body(if head {
                body::empty()
            } else {
                body::full(text)
            })
            .expect("valid response"),
    )
}

/// Records pins in the store; every line must name a configured upstream.
async fn pins(state: &AppState, text: &str) -> (StatusCode, &'static str, String) {
    let mut parsed = Vec::new();
    for line in text.lines().map(str::trim).filter(|l| !l.is_empty()) {
        match crate::config::parse_image_ref(line) {
            Ok(mut p) => match state
                .config
                .upstreams
                .iter()
                .find(|u| u.matches(&p.upstream))
            {
                Some(u) => {
                    p.upstream = u.name.clone();
                    parsed.push(p);
                }
                None => {
                    return (
                        StatusCode::BAD_REQUEST,
                        "text/plain",
                        format!("{line}: names no configured upstream\n"),
                    )
                }
            },
            Err(e) => return (StatusCode::BAD_REQUEST, "text/plain", format!("{e}\n")),
        }
    }
    let n = parsed.len();
    match state.store.add_pins(&parsed).await {
        Ok(()) => (StatusCode::OK, "text/plain", format!("pinned {n}\n")),
        Err(_) => (
            StatusCode::INTERNAL_SERVER_ERROR,
            "text/plain",
            "could not record pins\n".to_string(),
        ),
    }
}
