//! The read-only status page: `/ui/` (overview) and `/ui/image?...` (one image), rendered here
//! from the same JSON the API under `/ui/api/` serves, with a little JavaScript that polls the
//! API for the live parts. Served on `admin_listen` when there is one, else on the registry
//! listener; with `[auth]`, only to a client [`crate::auth::Auth::check_status_page`] admits.
//! Nothing here changes anything: GET and HEAD only, every answer `Cache-Control: no-store`.
//!
//! # Layout
//!
//! - `stats`: the counters the page shows (savings, upstream exchanges), fed beside metrics
//! - `api`: the JSON of each endpoint, and the cached view of the store it lists
//! - `page`: HTML: the one escaping function and the two pages
//! - `assets/`: the templates, script and stylesheet, compiled into the binary

pub mod api;
pub mod page;
pub mod stats;

use std::sync::Arc;

use bytes::Bytes;
use http::{header, HeaderValue, Method, Request, Response, StatusCode};

use crate::auth::Refusal;
use crate::error::ApiError;
use crate::http::body::{self, Body};
use crate::http::AppState;
use crate::oci::{Kind, RouteError};

const APP_JS: &str = include_str!("assets/app.js");
const STYLE_CSS: &str = include_str!("assets/style.css");
const FAVICON_SVG: &str = include_str!("assets/favicon.svg");

/// What the status page keeps per server.
#[derive(Default)]
pub struct Ui {
    /// What registry requests were answered from (fed by the access log).
    pub savings: Arc<stats::Savings>,
    /// The store's listing, reused for a few seconds (see `api::StoreSnapshot`).
    pub(crate) snapshot: api::SnapshotCache,
}

/// The pages' own policy: scripts, styles and requests to this origin only, no inline script
/// or style, no framing. Names are escaped anyway; this is the second lock.
const CSP: &str = "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; \
                   connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'";

/// Answers a status page path, or `None` if `path` is not one.
pub async fn serve<B>(state: &AppState, req: &Request<B>) -> Option<Response<Body>> {
    let path = req.uri().path();
    if path != "/ui" && !path.starts_with("/ui/") {
        return None;
    }
    let head = req.method() == Method::HEAD;
    let mut resp = match answer(state, req).await {
        Ok(r) => r,
        Err(e) => e.into_response(Kind::Other, head),
    };
    let h = resp.headers_mut();
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    h.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    if head {
        *resp.body_mut() = body::empty();
    }
    Some(resp)
}

async fn answer<B>(state: &AppState, req: &Request<B>) -> Result<Response<Body>, ApiError> {
    if !matches!(*req.method(), Method::GET | Method::HEAD) {
        return Err(ApiError::MethodNotAllowed);
    }
    if let Some(auth) = &state.config.auth {
        auth.check_status_page(req.headers(), req.extensions())
            .await
            .map_err(|r| match r {
                Refusal::NotAllowed => ApiError::Denied("not allowed to see the status page"),
                other => other.into(),
            })?;
    }
    let query = req.uri().query().unwrap_or("");
    let json = |v: serde_json::Value| reply("application/json", Bytes::from(v.to_string()));
    let html = |text: String| {
        let mut r = reply("text/html; charset=utf-8", Bytes::from(text));
        r.headers_mut().insert(
            header::CONTENT_SECURITY_POLICY,
            HeaderValue::from_static(CSP),
        );
        r
    };
    Ok(match req.uri().path() {
        "/ui" => Response::builder()
            .status(StatusCode::PERMANENT_REDIRECT)
            .header(header::LOCATION, "/ui/")
            .header(header::CONTENT_LENGTH, 0)
            .body(body::empty())
            .expect("valid response"),
        "/ui/" => html(page::overview(&api::store(state).await?)),
        "/ui/image" => html(page::image(&api::image(state, query).await?)),
        "/ui/app.js" => reply(
            "text/javascript; charset=utf-8",
            Bytes::from_static(APP_JS.as_bytes()),
        ),
        "/ui/style.css" => reply(
            "text/css; charset=utf-8",
            Bytes::from_static(STYLE_CSS.as_bytes()),
        ),
        "/ui/favicon.svg" => reply("image/svg+xml", Bytes::from_static(FAVICON_SVG.as_bytes())),
        "/ui/api/summary" => json(api::summary(state)),
        "/ui/api/upstreams" => json(api::upstreams(state)),
        "/ui/api/fills" => json(api::fills(state)),
        "/ui/api/store" => json(api::store(state).await?),
        "/ui/api/image" => json(api::image(state, query).await?),
        _ => return Err(ApiError::Route(RouteError::NotFound)),
    })
}

fn reply(content_type: &'static str, bytes: Bytes) -> Response<Body> {
    Response::builder()
        .status(StatusCode::OK)
        .header(header::CONTENT_TYPE, content_type)
        .header(header::CONTENT_LENGTH, bytes.len())
        .body(body::full(bytes))
        .expect("valid response")
}
