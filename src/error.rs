//! The one place where errors become HTTP responses: status, OCI error code, JSON body.
//! Client errors pass through unlogged; internal ones are logged once here, and the client sees
//! a generic message. Upstream failures name the upstream by its configured name only: never a
//! URL, a token or a credential.

use std::sync::Arc;

use bytes::Bytes;
use http::{header, HeaderValue, Response, StatusCode};

use crate::auth::Refusal;
use crate::http::body::{self, Body};
use crate::oci::{Kind, NameError, RouteError};
use crate::upstream::{UpstreamError, UpstreamErrorKind};

/// Everything a request can fail with, from any layer.
#[derive(Debug, Clone, thiserror::Error)]
pub enum ApiError {
    #[error(transparent)]
    Route(#[from] RouteError),
    /// The request selects no configured upstream (unknown `ns=`, no default for bare names).
    #[error("{0}")]
    NoUpstream(String),
    /// Push, delete, catalog: not what a pull-through cache does.
    #[error("{0}")]
    Unsupported(&'static str),
    #[error("method not allowed")]
    MethodNotAllowed,
    #[error("blob unknown to registry")]
    BlobUnknown,
    #[error("manifest unknown")]
    ManifestUnknown,
    #[error("repository name not known to registry")]
    NameUnknown,
    /// Refused: whoever asks (a forged peer marker), or this authenticated client (the read
    /// policy).
    #[error("{0}")]
    Denied(&'static str),
    /// A read that needs credentials, or whose credentials are wrong: 401 with a `Basic`
    /// challenge for `realm`.
    #[error("{message}")]
    Unauthorized {
        realm: Arc<str>,
        message: &'static str,
    },
    /// Too many password checks at once (a flood of wrong passwords): 429, retry shortly.
    #[error("{0}")]
    Busy(&'static str),
    /// `n` in `tags/list` is not a number.
    #[error("invalid pagination parameter n")]
    PaginationInvalid,
    #[error("requested range not satisfiable")]
    RangeNotSatisfiable { size: u64 },
    #[error(transparent)]
    Upstream(#[from] UpstreamError),
    /// Our own failure (storage, a bug). The message is logged, never sent.
    #[error("internal error: {0}")]
    Internal(String),
}

/// The read policy's refusals: 401 with a challenge, 403, or 429 for a flood of password checks.
impl From<Refusal> for ApiError {
    fn from(r: Refusal) -> ApiError {
        match r {
            Refusal::NoCredentials { realm } => ApiError::Unauthorized {
                realm,
                message: "authentication required",
            },
            Refusal::BadCredentials { realm } => ApiError::Unauthorized {
                realm,
                message: "wrong user name or password",
            },
            Refusal::NotAllowed => ApiError::Denied("not allowed to read this repository"),
            Refusal::Busy => ApiError::Busy("too many password checks at once, retry shortly"),
        }
    }
}

impl ApiError {
    pub fn internal(e: impl std::fmt::Display) -> ApiError {
        ApiError::Internal(e.to_string())
    }

    pub fn status(&self) -> StatusCode {
        match self {
            ApiError::Route(RouteError::NotFound) => StatusCode::NOT_FOUND,
            // A reference that cannot be a tag names no manifest: 404, as the conformance
            // suite and distribution answer. (Bad names and digests stay 400.)
            ApiError::Route(RouteError::Name(NameError::Tag)) => StatusCode::NOT_FOUND,
            ApiError::Route(RouteError::Name(_)) | ApiError::PaginationInvalid => {
                StatusCode::BAD_REQUEST
            }
            ApiError::NoUpstream(_) => StatusCode::NOT_FOUND,
            ApiError::Unsupported(_) | ApiError::MethodNotAllowed => StatusCode::METHOD_NOT_ALLOWED,
            ApiError::BlobUnknown | ApiError::ManifestUnknown | ApiError::NameUnknown => {
                StatusCode::NOT_FOUND
            }
            ApiError::RangeNotSatisfiable { .. } => StatusCode::RANGE_NOT_SATISFIABLE,
            ApiError::Denied(_) => StatusCode::FORBIDDEN,
            ApiError::Unauthorized { .. } => StatusCode::UNAUTHORIZED,
            ApiError::Busy(_) => StatusCode::TOO_MANY_REQUESTS,
            ApiError::Upstream(e) => match &e.kind {
                UpstreamErrorKind::NotFound | UpstreamErrorKind::Offline => StatusCode::NOT_FOUND,
                UpstreamErrorKind::Denied => StatusCode::FORBIDDEN,
                UpstreamErrorKind::RateLimited { .. } => StatusCode::TOO_MANY_REQUESTS,
                UpstreamErrorKind::Timeout => StatusCode::GATEWAY_TIMEOUT,
                _ => StatusCode::BAD_GATEWAY,
            },
            ApiError::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    /// The OCI error code, which for "not found" depends on what was asked for.
    pub fn code(&self, kind: Kind) -> &'static str {
        let unknown = match kind {
            Kind::Blob => "BLOB_UNKNOWN",
            Kind::Manifest => "MANIFEST_UNKNOWN",
            _ => "NAME_UNKNOWN",
        };
        match self {
            ApiError::Route(RouteError::NotFound) => "NAME_UNKNOWN",
            ApiError::Route(RouteError::Name(n)) => match n {
                NameError::Name | NameError::TooLong => "NAME_INVALID",
                NameError::Tag => "MANIFEST_UNKNOWN",
                NameError::Digest(_) => "DIGEST_INVALID",
            },
            ApiError::NoUpstream(_) => "NAME_UNKNOWN",
            ApiError::Unsupported(_) | ApiError::MethodNotAllowed => "UNSUPPORTED",
            ApiError::BlobUnknown => "BLOB_UNKNOWN",
            ApiError::ManifestUnknown => "MANIFEST_UNKNOWN",
            ApiError::NameUnknown => "NAME_UNKNOWN",
            ApiError::PaginationInvalid => "PAGINATION_NUMBER_INVALID",
            ApiError::RangeNotSatisfiable { .. } => "BLOB_UNKNOWN",
            ApiError::Denied(_) => "DENIED",
            ApiError::Unauthorized { .. } => "UNAUTHORIZED",
            ApiError::Busy(_) => "TOOMANYREQUESTS",
            ApiError::Upstream(e) => match &e.kind {
                UpstreamErrorKind::NotFound | UpstreamErrorKind::Offline => unknown,
                UpstreamErrorKind::Denied => "DENIED",
                UpstreamErrorKind::RateLimited { .. } => "TOOMANYREQUESTS",
                _ => "UNKNOWN",
            },
            ApiError::Internal(_) => "UNKNOWN",
        }
    }

    /// What the client is told. Internal details stay in the log.
    pub fn client_message(&self) -> String {
        match self {
            ApiError::Internal(_) => "internal error".to_string(),
            ApiError::Route(RouteError::Name(n)) => n.to_string(),
            other => other.to_string(),
        }
    }

    /// Builds the response: OCI error JSON, and for HEAD the same status and headers with no
    /// body.
    pub fn into_response(self, kind: Kind, head: bool) -> Response<Body> {
        let status = self.status();
        if let ApiError::Internal(detail) = &self {
            tracing::error!(error = %detail, "internal error");
        }
        let json = serde_json::json!({
            "errors": [{
                "code": self.code(kind),
                "message": self.client_message(),
                "detail": serde_json::Value::Null,
            }]
        });
        let bytes = Bytes::from(json.to_string());
        let mut resp = Response::builder()
            .status(status)
            .header(header::CONTENT_TYPE, "application/json")
            .header(header::CONTENT_LENGTH, bytes.len())
            .body(if head {
                body::empty()
            } else {
                body::full(bytes)
            })
            .expect("valid error response");
        let h = resp.headers_mut();
        h.insert(
            "Docker-Distribution-API-Version",
            HeaderValue::from_static("registry/2.0"),
        );
        match &self {
            ApiError::RangeNotSatisfiable { size } => {
                if let Ok(v) = HeaderValue::from_str(&format!("bytes */{size}")) {
                    h.insert(header::CONTENT_RANGE, v);
                }
            }
            ApiError::Upstream(UpstreamError {
                kind:
                    UpstreamErrorKind::RateLimited {
                        retry_after: Some(ra),
                    },
                ..
            }) => {
                if let Ok(v) = HeaderValue::from_str(ra) {
                    h.insert(header::RETRY_AFTER, v);
                }
            }
            ApiError::Unsupported(_) | ApiError::MethodNotAllowed => {
                h.insert(header::ALLOW, HeaderValue::from_static("GET, HEAD"));
            }
            ApiError::Unauthorized { realm, .. } => {
                if let Some(v) = crate::auth::basic_challenge(realm) {
                    h.insert(header::WWW_AUTHENTICATE, v);
                }
            }
            ApiError::Busy(_) => {
                h.insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
            }
            _ => {}
        }
        resp
    }
}
