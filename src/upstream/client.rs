//! One upstream registry: its HTTP client, mirrors tried in order, the auth dance (credentials
//! only to a trusted token realm), redirects followed by hand (so `Authorization` never crosses
//! to another origin), and the mapping of upstream answers to `UpstreamError`.

use std::sync::Arc;

use http::{header, HeaderMap, HeaderValue, Method, StatusCode};
use url::Url;

use super::auth::{self, AuthState, Challenge, TokenResponse};
use super::raw::{self, RawBody};
use super::{UpstreamError, UpstreamErrorKind};
use crate::clock::Clock;
use crate::config::UpstreamConfig;
use crate::metrics;
use crate::oci::RepoName;

const MAX_REDIRECTS: usize = 10;

/// One request to an upstream, relative to `/v2/<repo>/`.
pub struct UpstreamRequest<'a> {
    pub method: Method,
    pub repo: &'a RepoName,
    /// `manifests/<ref>`, `blobs/<digest>`, `tags/list`, `referrers/<digest>`
    pub path: String,
    pub query: Option<String>,
    /// Only what the proxy chooses to forward (`Accept`, `Range`); never the client's
    /// `Authorization`.
    pub headers: HeaderMap,
    /// A blob body that may stream for long: no whole-request timeout, only the read timeout.
    pub streaming: bool,
}

/// A blob's body as [`Upstream::send_blob`] got it.
pub enum Blob {
    /// A plain-HTTP `200`: the socket, for `splice`.
    Raw(RawBody),
    /// Any other `2xx`, through the HTTP client.
    Response(reqwest::Response),
}

pub struct Upstream {
    name: Arc<str>,
    config: UpstreamConfig,
    http: reqwest::Client,
    clock: Clock,
    auth: AuthState,
    offline: bool,
    /// What the status page shows of this upstream (fed beside the metrics).
    stats: crate::ui::stats::UpstreamStats,
}

impl Upstream {
    pub fn new(
        config: UpstreamConfig,
        clock: Clock,
        offline: bool,
    ) -> Result<Upstream, reqwest::Error> {
        crate::tls::install_provider();
        let http = reqwest::Client::builder()
            .redirect(reqwest::redirect::Policy::none())
            .connect_timeout(config.connect_timeout)
            .read_timeout(config.read_timeout)
            .pool_idle_timeout(std::time::Duration::from_secs(90))
            .user_agent(concat!("entrepot/", env!("CARGO_PKG_VERSION")))
            .build()?;
        Ok(Upstream {
            name: config.name.clone().into(),
            config,
            http,
            clock,
            auth: AuthState::default(),
            offline,
            stats: Default::default(),
        })
    }

    pub fn name(&self) -> &Arc<str> {
        &self.name
    }

    /// Offline: never contacted; tags are answered from the store whatever their age.
    pub fn offline(&self) -> bool {
        self.offline
    }

    pub fn config(&self) -> &UpstreamConfig {
        &self.config
    }

    /// Its recent exchanges, errors and rate limit, for the status page.
    pub fn stats(&self) -> &crate::ui::stats::UpstreamStats {
        &self.stats
    }

    pub fn error(&self, kind: UpstreamErrorKind) -> UpstreamError {
        UpstreamError {
            upstream: self.name.clone(),
            kind,
        }
    }

    /// Sends a request to the upstream's URL, then its mirrors in order while they are
    /// unavailable. A 2xx (or 416 for a forwarded range) is returned; anything else is an error.
    pub async fn send(
        &self,
        req: &UpstreamRequest<'_>,
    ) -> Result<reqwest::Response, UpstreamError> {
        self.send_from(0, req).await
    }

    /// [`Upstream::send`] from endpoint `first` on (0: the URL, 1: the first mirror...).
    async fn send_from(
        &self,
        first: usize,
        req: &UpstreamRequest<'_>,
    ) -> Result<reqwest::Response, UpstreamError> {
        if self.offline {
            return Err(self.error(UpstreamErrorKind::Offline));
        }
        // The router refuses these already; this keeps every other caller (fills, tools) within
        // `allow` / `deny` too.
        if !self.config.admits(req.repo.as_str()) {
            return Err(self.error(UpstreamErrorKind::NotFound));
        }
        let endpoints = std::iter::once(&self.config.url).chain(&self.config.mirrors);
        let count = 1 + self.config.mirrors.len();
        let mut last = None;
        for (i, base) in endpoints.enumerate().skip(first) {
            let started = tokio::time::Instant::now();
            let result = self.send_to(base, req).await;
            self.record(&result, started.elapsed());
            match result {
                Ok(resp) => return Ok(resp),
                Err(kind) if kind.is_unavailable() && i + 1 < count => {
                    tracing::warn!(upstream = %self.name, endpoint = i, error = %kind, "upstream endpoint unavailable, trying the next mirror");
                    last = Some(kind);
                }
                Err(kind) => return Err(self.error(kind)),
            }
        }
        Err(self.error(last.unwrap_or(UpstreamErrorKind::Unreachable("no endpoint"))))
    }

    /// `GET` of a blob's body (`req`): from a plain-HTTP URL (no proxy set in the
    /// environment, which reqwest would use) on a connection of its own, whose socket is
    /// handed over for `splice` when the answer is a plain `200` (see `raw`); anything else
    /// (https, a challenge, a redirect, an error, a chunked body) is sent the usual way, which
    /// follows or classifies it. An URL that is unavailable (no answer, or a 5xx) is not asked
    /// twice: the mirrors come next, as with [`Upstream::send`], or that is the error.
    pub async fn send_blob(&self, req: &UpstreamRequest<'_>) -> Result<Blob, UpstreamError> {
        match self.raw_blob(req).await {
            Ok(Some(body)) => Ok(Blob::Raw(body)),
            Ok(None) => self.send(req).await.map(Blob::Response),
            Err(kind) if self.config.mirrors.is_empty() => Err(self.error(kind)),
            Err(kind) => {
                tracing::warn!(upstream = %self.name, endpoint = 0, error = %kind, "upstream endpoint unavailable, trying the next mirror");
                self.send_from(1, req).await.map(Blob::Response)
            }
        }
    }

    /// The raw exchange of [`Upstream::send_blob`] with the upstream's URL: `Ok(None)` when it
    /// does not apply or the answer is not a plain `200`, `Err` when the URL is unavailable.
    async fn raw_blob(
        &self,
        req: &UpstreamRequest<'_>,
    ) -> Result<Option<RawBody>, UpstreamErrorKind> {
        const PROXY_VARS: [&str; 4] = ["http_proxy", "HTTP_PROXY", "all_proxy", "ALL_PROXY"];
        let base = &self.config.url;
        if self.offline
            || req.method != Method::GET
            || base.scheme() != "http"
            || !self.config.admits(req.repo.as_str())
            || PROXY_VARS.iter().any(|v| std::env::var_os(v).is_some())
        {
            return Ok(None);
        }
        let Ok(url) = request_url(base, req) else {
            return Ok(None);
        };
        let origin = url.origin().ascii_serialization();
        let scope = format!("repository:{}:pull", req.repo);
        let mut headers = req.headers.clone();
        match self.authorization(base, &origin, &scope).await {
            Ok(Some(a)) => {
                headers.insert(header::AUTHORIZATION, a);
            }
            Ok(None) => {}
            // The usual path meets the same trouble and says so.
            Err(_) => return Ok(None),
        }
        let started = tokio::time::Instant::now();
        let answer = raw::get(
            &url,
            &headers,
            self.config.connect_timeout,
            self.config.read_timeout,
        )
        .await;
        let took = started.elapsed();
        let answer = match answer {
            Ok(a) => a,
            Err(kind) if kind.is_unavailable() => {
                self.record(&Err(kind.clone()), took);
                return Err(kind);
            }
            // A garbled head: the usual path gets its own answer and judges it.
            Err(_) => return Ok(None),
        };
        if let Some(remaining) = ratelimit_remaining(&answer.headers) {
            metrics::ratelimit_remaining(&self.name, remaining);
            self.stats.ratelimit(remaining);
        }
        let status = answer.status.as_u16();
        // A server error says the URL is unavailable as a refused connection does.
        let unavailable = UpstreamErrorKind::Status(status);
        if answer.body.is_none() && unavailable.is_unavailable() {
            self.record(&Err(unavailable.clone()), took);
            return Err(unavailable);
        }
        metrics::upstream_request(&self.name, Some(status), took);
        self.stats.exchange(Some(status), took, None);
        Ok(answer.body)
    }

    /// Metrics for one exchange with an endpoint.
    fn record(
        &self,
        result: &Result<reqwest::Response, UpstreamErrorKind>,
        took: std::time::Duration,
    ) {
        let status = match result {
            Ok(r) => Some(r.status().as_u16()),
            Err(UpstreamErrorKind::NotFound) => Some(404),
            Err(UpstreamErrorKind::Denied) => Some(403),
            Err(UpstreamErrorKind::RateLimited { .. }) => Some(429),
            Err(UpstreamErrorKind::Status(s)) => Some(*s),
            // It answered 401 with a challenge that was not followed.
            Err(UpstreamErrorKind::UntrustedRealm) => Some(401),
            Err(_) => None,
        };
        metrics::upstream_request(&self.name, status, took);
        self.stats.exchange(status, took, result.as_ref().err());
        if let Err(kind) = result {
            let label = match kind {
                UpstreamErrorKind::NotFound => return,
                UpstreamErrorKind::Unreachable(_) => "unreachable",
                UpstreamErrorKind::Timeout => "timeout",
                UpstreamErrorKind::RateLimited { .. } => "rate_limited",
                UpstreamErrorKind::Denied => "denied",
                UpstreamErrorKind::Status(_) => "status",
                UpstreamErrorKind::UntrustedRealm => "untrusted_realm",
                _ => "protocol",
            };
            metrics::upstream_error(&self.name, label);
        }
    }

    async fn send_to(
        &self,
        base: &Url,
        req: &UpstreamRequest<'_>,
    ) -> Result<reqwest::Response, UpstreamErrorKind> {
        let url = request_url(base, req)?;
        let origin = url.origin().ascii_serialization();
        let scope = format!("repository:{}:pull", req.repo);
        let mut retried = false;
        loop {
            let authz = self.authorization(base, &origin, &scope).await?;
            let resp = self
                .execute(
                    req.method.clone(),
                    url.clone(),
                    &req.headers,
                    authz,
                    req.streaming,
                )
                .await?;
            if resp.status() == StatusCode::UNAUTHORIZED && !retried {
                let challenge = resp
                    .headers()
                    .get_all(header::WWW_AUTHENTICATE)
                    .iter()
                    .filter_map(|v| v.to_str().ok())
                    .filter_map(auth::parse_challenge)
                    .next();
                match challenge {
                    Some(c) => {
                        if let Challenge::Bearer { realm, .. } = &c {
                            self.trusted_realm(realm, base)?;
                        }
                        self.auth.remember_challenge(&origin, c);
                        self.auth.forget_token(&origin, &scope);
                        retried = true;
                        continue;
                    }
                    None => return Err(UpstreamErrorKind::Denied),
                }
            }
            if let Some(remaining) = ratelimit_remaining(resp.headers()) {
                metrics::ratelimit_remaining(&self.name, remaining);
                self.stats.ratelimit(remaining);
            }
            return classify(resp);
        }
    }

    /// The `Authorization` to send to `origin` for `scope`, from what its last challenge asked.
    async fn authorization(
        &self,
        base: &Url,
        origin: &str,
        scope: &str,
    ) -> Result<Option<HeaderValue>, UpstreamErrorKind> {
        match self.auth.challenge(origin) {
            None => Ok(None),
            Some(Challenge::Basic) => Ok(self.credentials().map(|(u, p)| auth::basic_header(u, p))),
            Some(Challenge::Bearer { realm, service, .. }) => {
                let now = self.clock.now();
                if let Some(t) = self.auth.cached_token(origin, scope, now) {
                    return Ok(Some(t));
                }
                let realm = self.trusted_realm(&realm, base)?;
                let (token, lifetime) = self.fetch_token(realm, service.as_deref(), scope).await?;
                self.auth
                    .store_token(origin, scope, token.clone(), auth::expiry(now, lifetime));
                Ok(Some(token))
            }
        }
    }

    fn credentials(&self) -> Option<(&str, &str)> {
        match (&self.config.username, &self.config.password) {
            (Some(u), Some(p)) => Some((u, p)),
            _ => None,
        }
    }

    /// The realm `base`'s challenge named, if we may ask it for a token (see
    /// `auth::check_realm`); else a warning naming the realm's host and an error naming only
    /// the upstream.
    fn trusted_realm(&self, realm: &str, base: &Url) -> Result<Url, UpstreamErrorKind> {
        let url = Url::parse(realm).map_err(|_| UpstreamErrorKind::Protocol("bad token realm"))?;
        match auth::check_realm(&url, base, &self.config.token_realms) {
            Ok(_) => Ok(url),
            Err(why) => {
                let host = url.host_str().unwrap_or("");
                let realm_host = match url.port() {
                    Some(p) => format!("{}://{host}:{p}", url.scheme()),
                    None => format!("{}://{host}", url.scheme()),
                };
                tracing::warn!(
                    upstream = %self.name,
                    realm_host = %realm_host,
                    reason = why.as_str(),
                    "refused the upstream's token realm: no request sent to it (list it in token_realms if it is trusted)"
                );
                Err(UpstreamErrorKind::UntrustedRealm)
            }
        }
    }

    /// Asks a trusted `realm` for a token, with the upstream's credentials if it has any.
    async fn fetch_token(
        &self,
        mut url: Url,
        service: Option<&str>,
        scope: &str,
    ) -> Result<(HeaderValue, std::time::Duration), UpstreamErrorKind> {
        {
            let mut q = url.query_pairs_mut();
            if let Some(s) = service {
                q.append_pair("service", s);
            }
            q.append_pair("scope", scope);
        }
        let mut rb = self.http.get(url).timeout(self.config.request_timeout);
        if let Some((u, p)) = self.credentials() {
            rb = rb.basic_auth(u, Some(p));
        }
        let resp = rb.send().await.map_err(|e| self.transport_error(&e))?;
        let resp = classify(resp)?;
        let bytes = resp.bytes().await.map_err(|e| self.transport_error(&e))?;
        let body: TokenResponse = serde_json::from_slice(&bytes)
            .map_err(|_| UpstreamErrorKind::Protocol("token endpoint answered without a token"))?;
        let token = body
            .token
            .or(body.access_token)
            .filter(|t| !t.is_empty())
            .ok_or(UpstreamErrorKind::Protocol(
                "token endpoint answered without a token",
            ))?;
        let lifetime = body
            .expires_in
            .map(std::time::Duration::from_secs)
            .unwrap_or(auth::DEFAULT_TOKEN_LIFETIME);
        let header = auth::bearer_header(&token).ok_or(UpstreamErrorKind::Protocol(
            "token is not a valid header value",
        ))?;
        Ok((header, lifetime))
    }

    /// Sends one request and follows redirects. `Authorization` is dropped as soon as a hop
    /// leaves the origin it was meant for (a CDN, an object store): it never comes back.
    async fn execute(
        &self,
        mut method: Method,
        mut url: Url,
        headers: &HeaderMap,
        mut authz: Option<HeaderValue>,
        streaming: bool,
    ) -> Result<reqwest::Response, UpstreamErrorKind> {
        for _ in 0..=MAX_REDIRECTS {
            let mut rb = self
                .http
                .request(method.clone(), url.clone())
                .headers(headers.clone());
            if let Some(a) = &authz {
                rb = rb.header(header::AUTHORIZATION, a.clone());
            }
            if !streaming {
                rb = rb.timeout(self.config.request_timeout);
            }
            let resp = rb.send().await.map_err(|e| self.transport_error(&e))?;
            if !resp.status().is_redirection() {
                return Ok(resp);
            }
            let Some(next) = resp
                .headers()
                .get(header::LOCATION)
                .and_then(|l| l.to_str().ok())
                .and_then(|l| url.join(l).ok())
            else {
                return Err(UpstreamErrorKind::Protocol(
                    "redirect without a usable Location",
                ));
            };
            if !matches!(next.scheme(), "http" | "https") {
                return Err(UpstreamErrorKind::Protocol("redirect to a non-HTTP URL"));
            }
            if next.origin() != url.origin() {
                authz = None;
            }
            if resp.status() == StatusCode::SEE_OTHER && method != Method::HEAD {
                method = Method::GET;
            }
            url = next;
        }
        Err(UpstreamErrorKind::Protocol("too many redirects"))
    }

    /// Classifies a transport failure; the detail (which may name hosts) goes to the log only.
    pub fn transport_error(&self, e: &reqwest::Error) -> UpstreamErrorKind {
        tracing::warn!(upstream = %self.name, error = %e, "upstream request failed");
        if e.is_timeout() {
            UpstreamErrorKind::Timeout
        } else if e.is_connect() {
            UpstreamErrorKind::Unreachable("connection failed")
        } else {
            UpstreamErrorKind::Unreachable("request failed")
        }
    }
}

/// `RateLimit-Remaining: 76;w=21600` (Docker Hub) → 76.
/// `req`'s URL on endpoint `base`: `<base>/v2/<repo>/<path>[?<query>]`.
fn request_url(base: &Url, req: &UpstreamRequest<'_>) -> Result<Url, UpstreamErrorKind> {
    let mut url = format!(
        "{}/v2/{}/{}",
        base.as_str().trim_end_matches('/'),
        req.repo,
        req.path
    );
    if let Some(q) = &req.query {
        url.push('?');
        url.push_str(q);
    }
    Url::parse(&url).map_err(|_| UpstreamErrorKind::Protocol("bad URL"))
}

fn ratelimit_remaining(headers: &HeaderMap) -> Option<f64> {
    let v = headers.get("ratelimit-remaining")?.to_str().ok()?;
    v.split(';').next()?.trim().parse().ok()
}

/// Upstream status → success or error kind.
fn classify(resp: reqwest::Response) -> Result<reqwest::Response, UpstreamErrorKind> {
    let status = resp.status();
    if status.is_success() || status == StatusCode::RANGE_NOT_SATISFIABLE {
        return Ok(resp);
    }
    Err(match status {
        StatusCode::NOT_FOUND => UpstreamErrorKind::NotFound,
        StatusCode::UNAUTHORIZED | StatusCode::FORBIDDEN => UpstreamErrorKind::Denied,
        StatusCode::TOO_MANY_REQUESTS => UpstreamErrorKind::RateLimited {
            retry_after: resp
                .headers()
                .get(header::RETRY_AFTER)
                .and_then(|v| v.to_str().ok())
                .map(str::to_string),
        },
        s => UpstreamErrorKind::Status(s.as_u16()),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;

    /// Fills and tools call `send` without the router: `allow` / `deny` hold there too, before
    /// any connection (the URL has nothing listening: a request would be `Unreachable`).
    #[tokio::test]
    async fn send_refuses_what_allow_and_deny_keep_out() {
        let c = Config::parse(
            "[[upstream]]\nname = \"a.io\"\nurl = \"http://127.0.0.1:1\"\n\
             allow = [\"team/**\"]\ndeny = [\"team/secret/*\"]",
        )
        .unwrap();
        let up = Upstream::new(c.upstreams[0].clone(), Clock::default(), false).unwrap();
        let send = |repo: &str| {
            let repo: RepoName = repo.parse().unwrap();
            let up = &up;
            async move {
                up.send(&UpstreamRequest {
                    method: Method::GET,
                    repo: &repo,
                    path: "manifests/v1".into(),
                    query: None,
                    headers: HeaderMap::new(),
                    streaming: false,
                })
                .await
                .map(|_| ())
                .unwrap_err()
                .kind
            }
        };
        for refused in ["other/app", "team/secret/app"] {
            assert!(
                matches!(send(refused).await, UpstreamErrorKind::NotFound),
                "{refused}"
            );
        }
        assert!(matches!(
            send("team/app").await,
            UpstreamErrorKind::Unreachable(_)
        ));
    }
}
