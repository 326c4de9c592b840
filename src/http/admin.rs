//! Operator endpoints: `/metrics` (Prometheus text), `/healthz` (the process answers) and
//! `/readyz` (the store is writable). Served on the main listener, or on `admin_listen` alone.

use http::{header, Response, StatusCode};

use super::body::{self, Body};
use super::AppState;

/// Answers an operator path, or `None` if `path` is not one.
pub async fn serve(state: &AppState, path: &str, head: bool) -> Option<Response<Body>> {
    let (status, content_type, text) = match path {
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
