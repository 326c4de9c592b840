//! Authenticated real upstreams for end-to-end tests: a `docker-registry` behind htpasswd basic
//! auth or behind a bearer-token service, that token service itself (in-process, issuing RS256
//! JWTs signed with the `openssl` CLI), and `skopeo copy` with credentials.
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

use std::collections::HashMap;
use std::convert::Infallible;
use std::fs;
use std::io::Write as _;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{bail, ensure, Context, Result};
use base64::Engine as _;
use bytes::Bytes;
use http::{header, HeaderMap, Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;
use tokio::task::{JoinHandle, JoinSet};

use super::free_port;
use super::real::{get_status, require_program, ChildGuard, READY_TIMEOUT, SKOPEO_TIMEOUT};

/// distribution accepts a token until this long after its `exp` (and before its `nbf`): its
/// allowance for clock skew (`token.Leeway`, 60 s in 2.8).
pub const REGISTRY_LEEWAY_SECS: u64 = 60;

/// Repositories under this prefix are pulled only with credentials.
pub const PRIVATE_PREFIX: &str = "private/";

/// How the registry authenticates its clients.
pub enum RegistryAuth<'a> {
    /// `auth: htpasswd` with one bcrypt entry made by `htpasswd -Bbn`.
    Htpasswd { user: &'a str, pass: &'a str },
    /// `auth: token` trusting `service`'s certificate and sending clients to its realm.
    Token(&'a TokenService),
}

/// A `docker-registry serve` (CNCF distribution) with filesystem storage that demands auth.
pub struct AuthRegistry {
    pub port: u16,
    process: ChildGuard,
    _dir: tempfile::TempDir,
}

impl AuthRegistry {
    pub async fn start(name: &str, auth: RegistryAuth<'_>) -> Result<Self> {
        let bin = require_program("docker-registry");
        let dir = tempfile::Builder::new()
            .prefix(&format!("{name}-"))
            .tempdir()?;
        let root = dir.path().to_owned();
        let auth_yaml = match auth {
            RegistryAuth::Htpasswd { user, pass } => {
                let file = root.join("htpasswd");
                fs::write(&file, htpasswd_entry(user, pass)?)?;
                format!(
                    "  htpasswd:\n    realm: entrepot-e2e\n    path: {}\n",
                    file.display()
                )
            }
            RegistryAuth::Token(service) => format!(
                "  token:\n    realm: {realm}\n    service: {svc}\n    issuer: {iss}\n    \
                 rootcertbundle: {cert}\n",
                realm = service.realm(),
                svc = service.service(),
                iss = service.issuer(),
                cert = service.cert_path().display(),
            ),
        };
        const ATTEMPTS: usize = 3;
        let mut attempt = 1;
        loop {
            let port = free_port();
            let config = root.join("config.yml");
            fs::write(
                &config,
                registry_config(&root.join("data"), port, &auth_yaml),
            )?;
            let mut cmd = Command::new(&bin);
            cmd.arg("serve").arg(&config);
            let mut process = ChildGuard::spawn(name, cmd, root.join("registry.log"))?;
            match wait_challenging(port, &mut process, name).await {
                Ok(()) => {
                    return Ok(Self {
                        port,
                        process,
                        _dir: dir,
                    })
                }
                Err(e)
                    if attempt < ATTEMPTS
                        && process.exited().is_some()
                        && process
                            .output()
                            .to_lowercase()
                            .contains("address already in use") =>
                {
                    eprintln!("port {port} was taken, retrying: {e:#}");
                    attempt += 1;
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// `127.0.0.1:<port>`, as used in `docker://` references.
    pub fn host(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.host())
    }

    /// Everything the registry has logged so far (its access log included).
    pub fn output(&self) -> String {
        self.process.output()
    }
}

fn registry_config(data: &Path, port: u16, auth: &str) -> String {
    format!(
        "version: 0.1
log:
  level: info
  accesslog:
    disabled: false
storage:
  filesystem:
    rootdirectory: {data}
http:
  addr: 127.0.0.1:{port}
auth:
{auth}",
        data = data.display()
    )
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

/// Polls `GET /v2/` until the registry answers 401 (it demands auth before anything else).
/// Fails early, with the output, if the process exits, and after [`READY_TIMEOUT`] otherwise.
async fn wait_challenging(port: u16, process: &mut ChildGuard, name: &str) -> Result<()> {
    let deadline = Instant::now() + READY_TIMEOUT;
    loop {
        if let Some(status) = process.exited() {
            bail!(
                "{name} exited with {status} before answering GET /v2/ on port {port}; \
                 output:\n{}",
                process.output()
            );
        }
        let last =
            match tokio::time::timeout(Duration::from_secs(2), get_status(port, "/v2/")).await {
                Ok(Ok(401)) => return Ok(()),
                Ok(Ok(status)) => format!("status {status}"),
                Ok(Err(e)) => format!("error: {e}"),
                Err(_) => "no answer within 2s".to_owned(),
            };
        if Instant::now() > deadline {
            bail!(
                "{name} did not answer 401 on GET /v2/ (port {port}) within {READY_TIMEOUT:?}, \
                 last: {last}; output:\n{}",
                process.output()
            );
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
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
        self.user_agent.starts_with("entrepot/")
    }
}

/// The bearer-token service a `RegistryAuth::Token` registry sends its clients to. Dropping it
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

    /// The signing certificate, which is also the registry's whole `rootcertbundle`.
    pub fn cert_path(&self) -> &Path {
        &self.state.cert
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
    // Connections are owned by this task, so aborting it ends them too.
    let mut conns = JoinSet::new();
    loop {
        tokio::select! {
            accepted = listener.accept() => {
                let Ok((stream, _)) = accepted else { continue };
                let state = state.clone();
                conns.spawn(async move {
                    let svc = service_fn(move |req| handle(state.clone(), req));
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), svc)
                        .await;
                });
            }
            Some(_) = conns.join_next(), if !conns.is_empty() => {}
        }
    }
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

/// How a `skopeo copy` went.
pub struct SkopeoRun {
    pub success: bool,
    /// stdout then stderr.
    pub output: String,
    pub elapsed: Duration,
}

/// `skopeo copy src dst` over plain HTTP, with `user:pass` credentials for either side (or
/// none), no retries and no signature policy. Bounded by `--command-timeout` and by `limit`.
pub async fn skopeo_copy_creds(
    src: &str,
    dst: &str,
    src_creds: Option<&str>,
    dest_creds: Option<&str>,
    limit: Duration,
) -> Result<SkopeoRun> {
    let limit = limit.min(SKOPEO_TIMEOUT);
    let mut cmd = Command::new(require_program("skopeo"));
    cmd.arg("--insecure-policy")
        .arg("--command-timeout")
        .arg(format!("{}s", limit.as_secs().max(1)))
        .args(["copy", "--src-tls-verify=false", "--dest-tls-verify=false"])
        .args(["--retry-times", "0"]);
    match src_creds {
        Some(c) => cmd.arg("--src-creds").arg(c),
        None => cmd.arg("--src-no-creds"),
    };
    match dest_creds {
        Some(c) => cmd.arg("--dest-creds").arg(c),
        None => cmd.arg("--dest-no-creds"),
    };
    cmd.arg(src).arg(dst).stdin(Stdio::null());
    let started = Instant::now();
    let run = tokio::task::spawn_blocking(move || cmd.output());
    // skopeo enforces its own timeout; this one is for a skopeo that ignores it.
    let out = tokio::time::timeout(limit + Duration::from_secs(10), run)
        .await
        .with_context(|| format!("skopeo copy {src} {dst} still running after {limit:?}"))??
        .with_context(|| format!("running skopeo copy {src} {dst}"))?;
    Ok(SkopeoRun {
        success: out.status.success(),
        output: format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
        elapsed: started.elapsed(),
    })
}

/// The `(code, message)` pairs of an OCI error body, or `Err` if it is not one.
pub fn oci_errors(body: &[u8]) -> Result<Vec<(String, String)>> {
    let v: serde_json::Value = serde_json::from_slice(body)
        .with_context(|| format!("not a JSON error body: {:?}", String::from_utf8_lossy(body)))?;
    let errors = v["errors"]
        .as_array()
        .with_context(|| format!("no `errors` array in {v}"))?;
    Ok(errors
        .iter()
        .map(|e| {
            (
                e["code"].as_str().unwrap_or_default().to_owned(),
                e["message"].as_str().unwrap_or_default().to_owned(),
            )
        })
        .collect())
}

/// How often docker-registry answered each status to entrepot (by its `User-Agent`) for request
/// lines containing `path_contains`, from the registry's access log.
pub fn entrepot_statuses(log: &str, path_contains: &str) -> HashMap<u16, usize> {
    let mut out = HashMap::new();
    // `127.0.0.1 - - [date] "GET /v2/... HTTP/1.1" 401 87 "" "entrepot/0.1.0"`
    let from_entrepot = |l: &str| {
        l.rsplit('"')
            .nth(1)
            .is_some_and(|ua| ua.starts_with("entrepot/"))
    };
    let lines = log
        .lines()
        .filter(|l| l.contains(path_contains) && from_entrepot(l));
    for line in lines {
        let Some((_, after)) = line.split_once("HTTP/1.1\" ") else {
            continue;
        };
        if let Some(code) = after.split_whitespace().next().and_then(|c| c.parse().ok()) {
            *out.entry(code).or_insert(0) += 1;
        }
    }
    out
}
