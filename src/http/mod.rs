//! The HTTP side: the router that turns a request into a route and an upstream, and the
//! handlers for blobs, manifests and the forwarded endpoints.

pub mod access_log;
pub mod admin;
mod blobs;
pub mod body;
pub mod conn;
mod manifests;
mod passthrough;
mod scope;

use std::net::SocketAddr;
use std::sync::Arc;

use http::{header, HeaderMap, HeaderValue, Method, Request, Response, StatusCode};
use tokio::time::Instant;

use self::access_log::{LoggedBody, Outcome, RequestInfo};
use self::body::Body;
use crate::cache::Store;
use crate::cluster::{Cluster, PeerCheck, Via};
use crate::config::Config;
use crate::error::ApiError;
use crate::oci::{Kind, RepoName, Route};
use crate::upstream::{Upstream, Upstreams};

/// Everything handlers share.
pub struct AppState {
    pub config: Config,
    pub store: Arc<Store>,
    pub upstreams: Upstreams,
    pub manifest_flights: manifests::ManifestFlights,
    pub metrics: metrics_exporter_prometheus::PrometheusHandle,
    /// Serve `/metrics`, `/healthz`, `/readyz` on the registry listener too (no `admin_listen`).
    pub admin_on_main: bool,
    /// The other replicas (`[cluster]`).
    pub cluster: Option<Arc<Cluster>>,
    /// Owner streams shared by this replica's clients (`[cluster]` on shared storage).
    pub fanouts: crate::cluster::fanout::Fanouts,
    /// The status page's counters and its cached view of the store.
    pub ui: crate::ui::Ui,
}

/// One proxied request after routing.
pub struct Ctx {
    pub upstream: Arc<Upstream>,
    /// The repository name to ask the upstream for (admitted by its `allow` / `deny`).
    pub repo: RepoName,
    /// The name as the client wrote it (with any upstream prefix), for rewritten links.
    pub client_name: RepoName,
    pub ns: Option<String>,
    pub head: bool,
    /// The client's request headers without `Authorization` and `Proxy-Authorization`.
    pub headers: HeaderMap,
    pub query: Option<String>,
    /// The replica that forwarded this request (signed): it is served here, never forwarded.
    pub peer: Option<String>,
}

impl Ctx {
    /// The client's `Accept` header values, forwarded upstream unchanged.
    pub fn accept(&self) -> impl Iterator<Item = &str> {
        self.headers
            .get_all(header::ACCEPT)
            .iter()
            .filter_map(|v| v.to_str().ok())
    }

    /// Where a miss of `key` goes before the upstream: its owner replica, unless that is this
    /// one, the request was forwarded already (one hop at most), or nothing may be fetched.
    pub fn via(&self, state: &AppState, key: &str) -> Option<Via> {
        if self.peer.is_some() || self.upstream.offline() {
            return None;
        }
        state.cluster.as_ref()?.via(key)
    }
}

/// Handles one request: route, answer, and wrap the body so the access log line is written
/// when the transfer ends.
pub async fn handle<B>(
    state: Arc<AppState>,
    req: Request<B>,
    remote: SocketAddr,
) -> Response<LoggedBody>
where
    B: http_body::Body<Data = bytes::Bytes> + Send + 'static,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let request_id = req
        .headers()
        .get("x-request-id")
        .and_then(|v| v.to_str().ok())
        .filter(|v| !v.is_empty() && v.len() <= 128)
        .map(str::to_string)
        .unwrap_or_else(access_log::new_request_id);
    let mut info = RequestInfo {
        request_id,
        method: req.method().clone(),
        path: req.uri().path().to_string(),
        remote,
        kind: Kind::Other,
        upstream: None,
        repository: None,
        reference: None,
        started: Instant::now(),
        savings: state.ui.savings.clone(),
    };
    let head = req.method() == Method::HEAD;
    let (parts, body) = req.into_parts();
    let req = Request::from_parts(parts, ());
    let admin = if state.admin_on_main && !info.path.starts_with("/v2") {
        match crate::ui::serve(&state, &req).await {
            Some(r) => Some(r),
            None => {
                admin::serve(&state, req.method(), &info.path, move || {
                    read_small_body(body)
                })
                .await
            }
        }
    } else {
        None
    };
    let routed = match admin {
        Some(r) => Ok(with_outcome(r, Outcome::Hit)),
        None => route(&state, &req, &mut info).await,
    };
    let mut resp = match routed {
        Ok(r) => r,
        Err(e) => {
            let mut r = e.into_response(info.kind, head);
            r.extensions_mut().insert(Outcome::Error);
            r
        }
    };
    resp.headers_mut().insert(
        "Docker-Distribution-API-Version",
        HeaderValue::from_static("registry/2.0"),
    );
    if let Ok(v) = HeaderValue::from_str(&info.request_id) {
        resp.headers_mut().insert("X-Request-Id", v);
    }
    let outcome = resp
        .extensions()
        .get::<Outcome>()
        .copied()
        .unwrap_or(Outcome::Hit);
    if info.upstream.is_some() {
        resp.headers_mut().insert(
            "X-Entrepot-Cache",
            HeaderValue::from_static(outcome.as_str()),
        );
    }
    let status = resp.status().as_u16();
    let expected = resp
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse().ok());
    resp.map(|b| LoggedBody::new(b, info, status, outcome, expected))
}

async fn route<B>(
    state: &AppState,
    req: &Request<B>,
    info: &mut RequestInfo,
) -> Result<Response<Body>, ApiError> {
    let parsed = Route::parse(req.uri().path());
    if let Ok(r) = &parsed {
        info.kind = r.kind();
    }
    // The method first: a push to a malformed path is still a push (405, body never read).
    if !matches!(*req.method(), Method::GET | Method::HEAD) {
        return Err(ApiError::Unsupported(
            "entrepot is a pull-through cache: push and delete are not supported",
        ));
    }
    let route = parsed?;
    let head = req.method() == Method::HEAD;
    let target = req.uri().path_and_query().map_or("/", |p| p.as_str());
    let peer = match crate::cluster::check(
        state.cluster.as_deref(),
        req.headers(),
        req.method(),
        target,
    ) {
        PeerCheck::Client => None,
        PeerCheck::Peer(id) => Some(id),
        PeerCheck::Refused => {
            tracing::warn!(remote = %info.remote, "refused a request with a bad cluster peer signature");
            return Err(ApiError::Denied(
                "the cluster peer marker is reserved for this cluster's replicas",
            ));
        }
    };
    let name = match &route {
        Route::Base => {
            // A replica's probe is answered whatever the policy; a client's may be asked for
            // credentials, or told on the 200 that some may help (auth::Auth::check_base).
            let challenge = match (&peer, &state.config.auth) {
                (None, Some(auth)) => auth.check_base(req.headers(), req.extensions()).await?,
                _ => None,
            };
            let mut r = json_response(StatusCode::OK, "{}", head);
            if let Some(c) = challenge {
                r.headers_mut().insert(header::WWW_AUTHENTICATE, c);
            }
            r.extensions_mut().insert(Outcome::Hit);
            // A replica's probe learns who answers.
            if let (Some(_), Some(c)) = (&peer, &state.cluster) {
                if let Ok(v) = HeaderValue::from_str(c.id()) {
                    r.headers_mut().insert(crate::cluster::REPLICA_HEADER, v);
                }
            }
            return Ok(r);
        }
        Route::Catalog => {
            return Err(ApiError::Unsupported(
                "the catalog is not available through a pull-through cache",
            ))
        }
        Route::Upload => {
            return Err(ApiError::Unsupported(
                "entrepot is a pull-through cache: push is not supported",
            ))
        }
        r => r.name().expect("content routes have a name").clone(),
    };
    let query = req.uri().query().map(str::to_string);
    let ns = query.as_deref().and_then(|q| {
        url::form_urlencoded::parse(q.as_bytes())
            .find(|(k, _)| k == "ns")
            .map(|(_, v)| v.into_owned())
    });
    let forwarded_for = req
        .headers()
        .get(crate::cluster::UPSTREAM_HEADER)
        .and_then(|v| v.to_str().ok());
    let (upstream, repo) = match (&peer, forwarded_for) {
        // Another replica routed it already: the upstream by its configured name.
        (Some(_), Some(up)) => state.upstreams.named(up, &name)?,
        _ => state.upstreams.select(ns.as_deref(), &name)?,
    };
    if peer.is_some() {
        crate::metrics::cluster_served_for_peer();
    }
    info.upstream = Some(upstream.name().clone());
    info.repository = Some(repo.to_string());
    info.reference = match &route {
        Route::Manifest { reference, .. } => Some(reference.to_string()),
        Route::Blob { digest, .. } | Route::Referrers { digest, .. } => Some(digest.to_string()),
        _ => None,
    };
    // Who may read what: before any handler or cache (a hit is still a read), after `info` is
    // filled (the access log names what was refused). A peer's request was checked by the
    // replica the client reached.
    if let (None, Some(auth)) = (&peer, &state.config.auth) {
        auth.check_read(
            req.headers(),
            req.extensions(),
            upstream.name(),
            repo.as_str(),
        )
        .await?;
    }
    // The client's own credentials are for this proxy (docker sends its Docker Hub login to
    // mirrors): they stop here, so no handler can forward, log or echo them.
    let mut headers = req.headers().clone();
    headers.remove(header::AUTHORIZATION);
    headers.remove(header::PROXY_AUTHORIZATION);
    let ctx = Ctx {
        upstream,
        repo,
        client_name: name,
        ns: ns.clone(),
        head,
        headers,
        query,
        peer,
    };
    let mut resp = match route {
        Route::Blob { digest, .. } => blobs::serve(state, &ctx, digest).await?,
        Route::Manifest { reference, .. } => manifests::serve(state, &ctx, reference).await?,
        Route::TagsList { .. } => passthrough::tags_list(&ctx).await?,
        Route::Referrers { digest, .. } => passthrough::referrers(state, &ctx, &digest).await?,
        _ => unreachable!("handled above"),
    };
    if let Some(ns) = ns.and_then(|n| HeaderValue::from_str(&n).ok()) {
        resp.headers_mut().insert("OCI-Namespace", ns);
    }
    Ok(resp)
}

/// Reads a request body of at most 1 MiB (operator requests only).
pub fn read_small_body<B>(body: B) -> futures_util::future::BoxFuture<'static, Option<bytes::Bytes>>
where
    B: http_body::Body<Data = bytes::Bytes> + Send + 'static,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    use http_body_util::BodyExt;
    const LIMIT: usize = 1 << 20;
    Box::pin(async move {
        // Announced too large: refused without waiting for a byte of it.
        if body.size_hint().lower() > LIMIT as u64 {
            return None;
        }
        // A client that announces a body and never sends it does not hold its connection.
        let limited = http_body_util::Limited::new(body, LIMIT);
        tokio::time::timeout(std::time::Duration::from_secs(10), limited.collect())
            .await
            .ok()?
            .ok()
            .map(|c| c.to_bytes())
    })
}

/// A small JSON response; for HEAD the same headers without the body.
pub fn json_response(status: StatusCode, json: &'static str, head: bool) -> Response<Body> {
    Response::builder()
        .status(status)
        .header(header::CONTENT_TYPE, "application/json")
        .header(header::CONTENT_LENGTH, json.len())
        .body(if head {
            body::empty()
        } else {
            body::full(json)
        })
        .expect("valid response")
}

/// Tags a response with how it was answered, for the access log.
pub fn with_outcome(mut r: Response<Body>, outcome: Outcome) -> Response<Body> {
    r.extensions_mut().insert(outcome);
    r
}
