//! Authenticated real upstreams for end-to-end tests: the `auth:` sections that put a
//! [`DockerRegistry`](super::real::DockerRegistry) behind htpasswd basic auth or behind a
//! bearer-token service, and that token service itself (in-process, issuing RS256 JWTs signed
//! with the `openssl` CLI).
//!
//! # The token service
//!
//! docker-registry 2.8 (`registry/auth/token`) accepts a JWT whose header carries the signing
//! certificate as an `x5c` chain that verifies against its `rootcertbundle`. The service makes a
//! self-signed RSA certificate with `openssl req -x509`, gives the registry that certificate as
//! its bundle, and puts the same certificate in every token's `x5c`: a chain of one, which is
//! its own root. Signing is `openssl dgst -sha256 -sign key.pem` over the JWT signing input
//! (PKCS#1 v1.5 + SHA-256 = RS256), one process per token.
//!
//! Grants follow Docker Hub's shape: anonymous requests get `pull` on repositories outside
//! `private/`, the one configured user gets `pull` and `push` everywhere, and a request with
//! wrong credentials is refused with 401. A scope that grants nothing still yields a token, with
//! no `access` for that repository, so the registry is the one that says no.

use std::convert::Infallible;
use std::io::Write as _;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{ensure, Context, Result};
use base64::Engine as _;
use bytes::Bytes;
use http::{header, HeaderMap, Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;
use tokio::task::JoinHandle;

use super::real::{require_program, ENTREPOT_AGENT};
use super::serve_connections;

/// distribution accepts a token until this long after its `exp` (and before its `nbf`): its
/// allowance for clock skew (`token.Leeway`, 60 s in 2.8).
pub const REGISTRY_LEEWAY_SECS: u64 = 60;

/// Repositories under this prefix are pulled only with credentials.
pub const PRIVATE_PREFIX: &str = "private/";

/// The `auth:` section for a registry accepting `user` with `pass` by htpasswd basic auth; the
/// password file is written into `dir`, which must outlive the registry.
pub fn htpasswd_auth(dir: &Path, user: &str, pass: &str) -> Result<String> {
    let file = dir.join("htpasswd");
    std::fs::write(&file, htpasswd_entry(user, pass)?)?;
    Ok(format!(
        "auth:\n  htpasswd:\n    realm: entrepot-e2e\n    path: {}\n",
        file.display()
    ))
}

/// `user:<bcrypt hash>` from `htpasswd -Bbn` (the only hash distribution accepts).
fn htpasswd_entry(user: &str, pass: &str) -> Result<String> {
    let bin = require_program("htpasswd");
    let out = Command::new(bin)
        .args(["-Bbn", user, pass])
        .stdin(Stdio::null())
        .output()
        .context("running htpasswd")?;
    ensure!(
        out.status.success(),
        "htpasswd -Bbn failed with {}: {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(String::from_utf8(out.stdout)?.trim().to_owned() + "\n")
}

/// How long tokens live and what the token endpoint says about it.
#[derive(Clone, Copy, Debug)]
pub struct TokenPolicy {
    /// How long the registry accepts a token after it is issued (rounded up to a whole second).
    pub lifetime: Duration,
    /// The `expires_in` the endpoint answers; `None` tells the truth (`lifetime`, in seconds).
    /// A larger value than `lifetime` makes a client keep a token the registry already refuses.
    pub expires_in: Option<u64>,
}

impl Default for TokenPolicy {
    fn default() -> Self {
        Self {
            lifetime: Duration::from_secs(300),
            expires_in: None,
        }
    }
}

/// How the token endpoint answered one request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TokenOutcome {
    /// A signed token (possibly granting nothing for some scopes).
    Issued,
    /// `Authorization: Basic` with a wrong user or password: 401.
    BadCredentials,
    /// Not `GET /token`, an unreadable `Authorization`, or signing failed.
    Refused,
}

/// One token request as the service saw it.
#[derive(Clone, Debug)]
pub struct TokenRequest {
    pub user_agent: String,
    pub service: Option<String>,
    pub scopes: Vec<String>,
    /// The user named by `Authorization: Basic`, whether or not the password was right.
    pub basic_user: Option<String>,
    pub outcome: TokenOutcome,
    /// `(repository, actions)` granted, for an issued token.
    pub granted: Vec<(String, Vec<String>)>,
}

impl TokenRequest {
    /// Sent by entrepot (its `User-Agent` is `entrepot/<version>`), not by skopeo seeding.
    pub fn sent_by_entrepot(&self) -> bool {
        self.user_agent.starts_with(ENTREPOT_AGENT)
    }
}

/// The bearer-token service a registry with [`TokenService::registry_auth`] sends its clients to. Dropping it
/// stops the server and every connection.
pub struct TokenService {
    addr: SocketAddr,
    state: Arc<TokenState>,
    server: JoinHandle<()>,
    _dir: tempfile::TempDir,
}

struct TokenState {
    issuer: String,
    service: String,
    user: String,
    pass: String,
    key: PathBuf,
    cert: PathBuf,
    /// The certificate, DER in standard base64, as `x5c` wants it.
    x5c: String,
    policy: Mutex<TokenPolicy>,
    requests: Mutex<Vec<TokenRequest>>,
    serial: AtomicU64,
}

/// A poisoned lock only means another test thread panicked; the data is still usable.
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl TokenService {
    /// Makes a key and certificate, binds `127.0.0.1:0` and serves `GET /token`.
    pub async fn start(issuer: &str, service: &str, user: &str, pass: &str) -> Result<Self> {
        let openssl = require_program("openssl");
        let dir = tempfile::Builder::new()
            .prefix("token-service-")
            .tempdir()?;
        let key = dir.path().join("key.pem");
        let cert = dir.path().join("cert.pem");
        let out = Command::new(&openssl)
            .args([
                "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
            ])
            .args(["-subj", "/CN=entrepot-e2e-token-issuer"])
            .arg("-keyout")
            .arg(&key)
            .arg("-out")
            .arg(&cert)
            .stdin(Stdio::null())
            .output()
            .context("running openssl req")?;
        ensure!(
            out.status.success(),
            "openssl req -x509 failed with {}: {}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
        let der = Command::new(&openssl)
            .args(["x509", "-outform", "DER", "-in"])
            .arg(&cert)
            .stdin(Stdio::null())
            .output()
            .context("running openssl x509")?;
        ensure!(
            der.status.success() && !der.stdout.is_empty(),
            "openssl x509 -outform DER failed with {}: {}",
            der.status,
            String::from_utf8_lossy(&der.stderr)
        );
        let x5c = base64::engine::general_purpose::STANDARD.encode(&der.stdout);

        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .context("token service: bind 127.0.0.1:0")?;
        let addr = listener.local_addr()?;
        let state = Arc::new(TokenState {
            issuer: issuer.to_owned(),
            service: service.to_owned(),
            user: user.to_owned(),
            pass: pass.to_owned(),
            key,
            cert,
            x5c,
            policy: Mutex::new(TokenPolicy::default()),
            requests: Mutex::default(),
            serial: AtomicU64::new(0),
        });
        let server = tokio::spawn(serve(listener, state.clone()));
        Ok(Self {
            addr,
            state,
            server,
            _dir: dir,
        })
    }

    /// `http://127.0.0.1:<port>/token`, the realm the registry sends clients to.
    pub fn realm(&self) -> String {
        format!("http://{}/token", self.addr)
    }

    pub fn service(&self) -> &str {
        &self.state.service
    }

    pub fn issuer(&self) -> &str {
        &self.state.issuer
    }

    /// The `auth:` section for a registry trusting this service's certificate (its whole
    /// `rootcertbundle`) and sending clients to its realm.
    pub fn registry_auth(&self) -> String {
        format!(
            "auth:\n  token:\n    realm: {realm}\n    service: {svc}\n    issuer: {iss}\n    \
             rootcertbundle: {cert}\n",
            realm = self.realm(),
            svc = self.service(),
            iss = self.issuer(),
            cert = self.state.cert.display(),
        )
    }

    /// Applies to tokens issued from now on.
    pub fn set_policy(&self, policy: TokenPolicy) {
        *lock(&self.state.policy) = policy;
    }

    /// Every request so far, in arrival order.
    pub fn requests(&self) -> Vec<TokenRequest> {
        lock(&self.state.requests).clone()
    }

    /// How many tokens entrepot has been issued so far.
    pub fn issued_to_entrepot(&self) -> usize {
        self.requests()
            .iter()
            .filter(|r| r.sent_by_entrepot() && r.outcome == TokenOutcome::Issued)
            .count()
    }
}

impl Drop for TokenService {
    fn drop(&mut self) {
        self.server.abort();
    }
}

async fn serve(listener: TcpListener, state: Arc<TokenState>) {
    serve_connections(listener, move |stream| {
        let state = state.clone();
        async move {
            let svc = service_fn(move |req| handle(state.clone(), req));
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), svc)
                .await;
        }
    })
    .await
}

async fn handle(
    state: Arc<TokenState>,
    req: Request<Incoming>,
) -> Result<Response<Full<Bytes>>, Infallible> {
    let user_agent = req
        .headers()
        .get(header::USER_AGENT)
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_owned();
    let mut service = None;
    let mut scopes = Vec::new();
    for (k, v) in url::form_urlencoded::parse(req.uri().query().unwrap_or_default().as_bytes()) {
        match &*k {
            "service" => service = Some(v.into_owned()),
            // Several `scope` parameters may come, each possibly holding several scopes.
            "scope" => scopes.extend(v.split(' ').filter(|s| !s.is_empty()).map(str::to_owned)),
            _ => {}
        }
    }
    let mut record = TokenRequest {
        user_agent,
        service,
        scopes,
        basic_user: None,
        outcome: TokenOutcome::Refused,
        granted: Vec::new(),
    };
    let response = answer(
        &state,
        req.method(),
        req.uri().path(),
        req.headers(),
        &mut record,
    )
    .await;
    lock(&state.requests).push(record);
    Ok(response)
}

async fn answer(
    state: &Arc<TokenState>,
    method: &http::Method,
    path: &str,
    headers: &HeaderMap,
    record: &mut TokenRequest,
) -> Response<Full<Bytes>> {
    if method != http::Method::GET || path != "/token" {
        return json(
            StatusCode::NOT_FOUND,
            serde_json::json!({"error": "not found"}),
        );
    }
    let authenticated = match basic_credentials(headers) {
        Err(()) => {
            return json(
                StatusCode::BAD_REQUEST,
                serde_json::json!({"error": "unreadable Authorization"}),
            )
        }
        Ok(None) => false,
        Ok(Some((user, pass))) => {
            let ok = user == state.user && pass == state.pass;
            record.basic_user = Some(user);
            if !ok {
                record.outcome = TokenOutcome::BadCredentials;
                let mut resp = json(
                    StatusCode::UNAUTHORIZED,
                    serde_json::json!({"details": "incorrect username or password"}),
                );
                resp.headers_mut().insert(
                    header::WWW_AUTHENTICATE,
                    header::HeaderValue::from_static(r#"Basic realm="entrepot-e2e-token""#),
                );
                return resp;
            }
            true
        }
    };
    record.granted = grants(&record.scopes, authenticated);
    let policy = *lock(&state.policy);
    let serial = state.serial.fetch_add(1, Ordering::Relaxed) + 1;
    let subject = record.basic_user.clone().unwrap_or_default();
    let token = {
        let state = state.clone();
        let granted = record.granted.clone();
        tokio::task::spawn_blocking(move || {
            state.sign_token(&subject, &granted, policy.lifetime, serial)
        })
        .await
    };
    let token = match token {
        Ok(Ok(token)) => token,
        Ok(Err(e)) => {
            eprintln!("token service: signing failed: {e:#}");
            return json(
                StatusCode::INTERNAL_SERVER_ERROR,
                serde_json::json!({"error": format!("{e:#}")}),
            );
        }
        Err(e) => {
            eprintln!("token service: signing task failed: {e}");
            return json(
                StatusCode::INTERNAL_SERVER_ERROR,
                serde_json::json!({"error": "signing task failed"}),
            );
        }
    };
    record.outcome = TokenOutcome::Issued;
    let expires_in = policy
        .expires_in
        .unwrap_or_else(|| policy.lifetime.as_secs().max(1));
    json(
        StatusCode::OK,
        serde_json::json!({
            "token": token,
            "access_token": token,
            "expires_in": expires_in,
        }),
    )
}

/// `Ok(None)` without `Authorization`, `Err` for one that is not readable Basic credentials.
fn basic_credentials(headers: &HeaderMap) -> Result<Option<(String, String)>, ()> {
    let Some(value) = headers.get(header::AUTHORIZATION) else {
        return Ok(None);
    };
    let value = value.to_str().map_err(|_| ())?;
    let (scheme, encoded) = value.split_once(' ').ok_or(())?;
    if !scheme.eq_ignore_ascii_case("basic") {
        return Err(());
    }
    let decoded = base64::engine::general_purpose::STANDARD
        .decode(encoded.trim())
        .map_err(|_| ())?;
    let decoded = String::from_utf8(decoded).map_err(|_| ())?;
    let (user, pass) = decoded.split_once(':').ok_or(())?;
    Ok(Some((user.to_owned(), pass.to_owned())))
}

/// The actions granted for each requested `repository:<name>:<actions>` scope.
fn grants(scopes: &[String], authenticated: bool) -> Vec<(String, Vec<String>)> {
    let mut out: Vec<(String, Vec<String>)> = Vec::new();
    for scope in scopes {
        let mut parts = scope.splitn(2, ':');
        let (Some("repository"), Some(rest)) = (parts.next(), parts.next()) else {
            continue;
        };
        let Some((name, actions)) = rest.rsplit_once(':') else {
            continue;
        };
        let allowed: &[&str] = if authenticated {
            &["pull", "push"]
        } else if name.starts_with(PRIVATE_PREFIX) {
            &[]
        } else {
            &["pull"]
        };
        let actions: Vec<String> = actions
            .split(',')
            .filter(|a| allowed.contains(a))
            .map(str::to_owned)
            .collect();
        if actions.is_empty() {
            continue;
        }
        match out.iter_mut().find(|(n, _)| n == name) {
            Some((_, have)) => {
                for a in actions {
                    if !have.contains(&a) {
                        have.push(a);
                    }
                }
            }
            None => out.push((name.to_owned(), actions)),
        }
    }
    out
}

impl TokenState {
    /// A compact RS256 JWT as distribution reads it.
    fn sign_token(
        &self,
        subject: &str,
        granted: &[(String, Vec<String>)],
        lifetime: Duration,
        serial: u64,
    ) -> Result<String> {
        let now = SystemTime::now().duration_since(UNIX_EPOCH)?.as_secs();
        // The registry honours `exp` plus its leeway; backdate `exp` by the leeway so that the
        // token really stops working `lifetime` after now (up to a second later: `exp` counts
        // whole seconds, so round up rather than cut a token short).
        let valid_until = now + 1 + lifetime.as_secs();
        let exp = valid_until as i64 - REGISTRY_LEEWAY_SECS as i64;
        let header = serde_json::json!({
            "typ": "JWT",
            "alg": "RS256",
            "x5c": [self.x5c],
        });
        let access: Vec<serde_json::Value> = granted
            .iter()
            .map(|(name, actions)| {
                serde_json::json!({"type": "repository", "name": name, "actions": actions})
            })
            .collect();
        let claims = serde_json::json!({
            "iss": self.issuer,
            "sub": subject,
            "aud": self.service,
            "exp": exp,
            "nbf": now,
            "iat": now,
            "jti": format!("entrepot-e2e-{serial}-{now}"),
            "access": access,
        });
        let b64 = |v: &serde_json::Value| {
            base64::engine::general_purpose::URL_SAFE_NO_PAD
                .encode(serde_json::to_vec(v).expect("json"))
        };
        let signing_input = format!("{}.{}", b64(&header), b64(&claims));
        let signature = openssl_sign(&self.key, signing_input.as_bytes())?;
        Ok(format!(
            "{signing_input}.{}",
            base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(signature)
        ))
    }
}

/// RSASSA-PKCS1-v1_5 with SHA-256 over `input`, by `openssl dgst -sha256 -sign`.
fn openssl_sign(key: &Path, input: &[u8]) -> Result<Vec<u8>> {
    let mut child = Command::new(require_program("openssl"))
        .args(["dgst", "-sha256", "-sign"])
        .arg(key)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .context("spawning openssl dgst")?;
    // A few hundred bytes in, 256 out: neither pipe can fill up, so write then wait is safe.
    child
        .stdin
        .take()
        .context("openssl stdin")?
        .write_all(input)?;
    let out = child.wait_with_output()?;
    ensure!(
        out.status.success() && out.stdout.len() == 256,
        "openssl dgst -sign failed with {} ({} bytes out): {}",
        out.status,
        out.stdout.len(),
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(out.stdout)
}

fn json(status: StatusCode, body: serde_json::Value) -> Response<Full<Bytes>> {
    Response::builder()
        .status(status)
        .header(header::CONTENT_TYPE, "application/json")
        .body(Full::new(Bytes::from(body.to_string())))
        .expect("valid response")
}
