//! Configuration in two stages: the raw TOML as serde reads it, then a validated `Config` with
//! parsed durations, sizes and URLs. Every error names the key it is about.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;
use url::Url;

/// The validated configuration the server runs with.
#[derive(Debug, Clone)]
pub struct Config {
    pub server: ServerConfig,
    pub storage: StorageConfig,
    pub upstreams: Vec<UpstreamConfig>,
    /// Images never evicted (`[[pin]] image = "docker.io/library/alpine:3.20"`).
    pub pins: Vec<PinConfig>,
}

/// A pinned image: an upstream, a repository and a tag or digest.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PinConfig {
    pub upstream: String,
    pub repo: crate::oci::RepoName,
    pub reference: crate::oci::Reference,
}

#[derive(Debug, Clone)]
pub struct ServerConfig {
    pub listen: SocketAddr,
    /// How long fills in progress may run on after SIGTERM/SIGINT before they are cancelled.
    pub shutdown_grace: Duration,
    /// A separate listener for `/metrics`, `/healthz` and `/readyz`; without it they are served
    /// on `listen` too.
    pub admin_listen: Option<SocketAddr>,
    /// Never contact an upstream: answer from the store only (air-gapped sites).
    pub offline: bool,
}

#[derive(Debug, Clone)]
pub struct StorageConfig {
    /// Where blobs, manifests, tags and pins live. With S3 the fields below describe this
    /// replica's local tier: `root` holds fills in progress and recently served blobs, bounded by
    /// `max_size`.
    pub backend: StorageBackend,
    pub root: PathBuf,
    /// Manifests larger than this are refused (they are read whole into memory).
    pub max_manifest_size: u64,
    /// When the store grows past this, least recently used images are evicted down to
    /// `low_water`. `None`: unbounded.
    pub max_size: Option<u64>,
    pub low_water: Option<u64>,
    /// How often the background sweeper checks size, orphan temp files and dangling metadata.
    pub sweep_interval: Duration,
}

/// `storage.backend`.
// Built once at start-up and matched by reference: the size difference costs nothing, and an
// unboxed `S3(S3Config)` is the simpler shape to match on.
#[expect(clippy::large_enum_variant)]
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StorageBackend {
    /// Everything under `storage.root` (the default).
    Fs,
    /// An S3 bucket shared by every replica, with `storage.root` as this replica's local tier.
    S3(S3Config),
}

/// `[storage.s3]`, validated. Path-style requests are always used, so any S3-compatible
/// server works (Garage, MinIO, Ceph); `Debug` never shows the secret.
#[derive(Clone, PartialEq, Eq)]
pub struct S3Config {
    /// None: AWS (the region's endpoint).
    pub endpoint: Option<Url>,
    pub region: String,
    pub bucket: String,
    /// "" or a key prefix ending in '/' (never starting with one), so several caches can share
    /// a bucket: keys are `{prefix}{key}`.
    pub prefix: String,
    /// From the file, else from `AWS_ACCESS_KEY_ID` at load time; always given together with
    /// `secret_access_key`.
    pub access_key_id: Option<String>,
    /// From `secret_access_key` or `secret_access_key_file`, else `AWS_SECRET_ACCESS_KEY`.
    pub secret_access_key: Option<String>,
    /// The bucket's bound: past it, least recently used images are evicted down to `low_water`.
    /// `None`: unbounded.
    pub max_size: Option<u64>,
    pub low_water: Option<u64>,
    /// Answer hits with a 307 to a presigned GET instead of streaming the object.
    pub redirect: bool,
    pub connect_timeout: Duration,
    /// Bounds every S3 call that is not a streamed body.
    pub request_timeout: Duration,
    /// Retries of idempotent S3 calls (`max_retries`).
    pub retries: u32,
    /// A multipart upload begun this long ago and still recorded is taken as abandoned (its
    /// writer died) and aborted by the sweep (`abandoned_uploads_after`).
    pub abandoned_uploads_after: Duration,
}

impl std::fmt::Debug for S3Config {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("S3Config")
            .field("endpoint", &self.endpoint.as_ref().map(Url::as_str))
            .field("region", &self.region)
            .field("bucket", &self.bucket)
            .field("prefix", &self.prefix)
            .field("access_key_id", &self.access_key_id)
            .field(
                "secret_access_key",
                &self.secret_access_key.as_ref().map(|_| Redacted),
            )
            .field("max_size", &self.max_size)
            .field("low_water", &self.low_water)
            .field("redirect", &self.redirect)
            .field("connect_timeout", &self.connect_timeout)
            .field("request_timeout", &self.request_timeout)
            .field("retries", &self.retries)
            .field("abandoned_uploads_after", &self.abandoned_uploads_after)
            .finish()
    }
}

/// Stands in for a secret in `Debug` output.
struct Redacted;

impl std::fmt::Debug for Redacted {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("<redacted>")
    }
}

/// `Debug` never shows the password.
#[derive(Clone)]
pub struct UpstreamConfig {
    /// What `?ns=` and the first path component match.
    pub name: String,
    /// Other names that select this upstream (`index.docker.io` for `docker.io`).
    pub aliases: Vec<String>,
    pub url: Url,
    /// Tried in order when the main URL is unreachable, times out, or answers 5xx / 429.
    pub mirrors: Vec<Url>,
    /// Serves bare names (`/v2/library/alpine/...`).
    pub default: bool,
    pub tag_ttl: Duration,
    pub username: Option<String>,
    pub password: Option<String>,
    /// Single-component names gain `library/` (Docker Hub's official images).
    pub library_prefix: bool,
    pub connect_timeout: Duration,
    /// Whole-request limit for small requests (manifests, tags, token, HEAD).
    pub request_timeout: Duration,
    /// Longest silence allowed while a blob streams.
    pub read_timeout: Duration,
    /// Token realms trusted besides the upstream's own host and registrable domain: matched by
    /// scheme, host and port (`token_realms`). A plain `http://` one is only accepted at load
    /// when the upstream itself is plain http on that host.
    pub token_realms: Vec<Url>,
    /// Repositories proxied (`allow`; `None`: all) and refused (`deny`, which wins), as the
    /// upstream names them (after `library/` is added).
    pub allow: Option<RepoGlobs>,
    pub deny: Option<RepoGlobs>,
}

impl std::fmt::Debug for UpstreamConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("UpstreamConfig")
            .field("name", &self.name)
            .field("aliases", &self.aliases)
            .field("url", &self.url.as_str())
            .field(
                "mirrors",
                &self.mirrors.iter().map(Url::as_str).collect::<Vec<_>>(),
            )
            .field("default", &self.default)
            .field("tag_ttl", &self.tag_ttl)
            .field("username", &self.username)
            .field("password", &self.password.as_ref().map(|_| Redacted))
            .field("library_prefix", &self.library_prefix)
            .field("connect_timeout", &self.connect_timeout)
            .field("request_timeout", &self.request_timeout)
            .field("read_timeout", &self.read_timeout)
            .field(
                "token_realms",
                &self
                    .token_realms
                    .iter()
                    .map(Url::as_str)
                    .collect::<Vec<_>>(),
            )
            .field("allow", &self.allow)
            .field("deny", &self.deny)
            .finish()
    }
}

/// A list of repository globs (`library/**`, `team/*`), compiled once at load. `*` and `?`
/// stay within one path component, `**` crosses them.
#[derive(Clone)]
pub struct RepoGlobs {
    patterns: Vec<String>,
    set: globset::GlobSet,
}

impl RepoGlobs {
    /// Compiles `patterns`; the error names `key` and the pattern at fault.
    fn parse(key: &str, patterns: Vec<String>) -> Result<RepoGlobs, ConfigError> {
        if patterns.is_empty() {
            return Err(invalid(
                key,
                "is empty: leave it out, or list repository patterns like \"library/**\"",
            ));
        }
        let mut set = globset::GlobSetBuilder::new();
        for p in &patterns {
            let bad = |why: String| invalid(key, format!("{p:?} {why}"));
            if p.is_empty() || p.starts_with('/') || p.ends_with('/') || p.contains("//") {
                return Err(bad(
                    "must be a repository pattern like \"library/*\" or \"team/**\" \
                     (no leading, trailing or double '/')"
                        .into(),
                ));
            }
            // Repository names are lower-case: an upper-case pattern would silently match
            // nothing.
            if p.chars().any(|c| c.is_ascii_uppercase()) {
                return Err(bad(
                    "can never match: repository names are lower-case".into()
                ));
            }
            let glob = globset::GlobBuilder::new(p)
                .literal_separator(true)
                .build()
                .map_err(|e| bad(format!("is not a valid pattern: {}", e.kind())))?;
            set.add(glob);
        }
        let set = set
            .build()
            .map_err(|e| invalid(key, format!("cannot be compiled: {e}")))?;
        Ok(RepoGlobs { patterns, set })
    }

    pub fn is_match(&self, repo: &str) -> bool {
        self.set.is_match(repo)
    }

    pub fn patterns(&self) -> &[String] {
        &self.patterns
    }
}

impl std::fmt::Debug for RepoGlobs {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.patterns.fmt(f)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("{key}: {problem}")]
    Invalid { key: String, problem: String },
}

fn invalid(key: impl Into<String>, problem: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        key: key.into(),
        problem: problem.into(),
    }
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    #[serde(default)]
    server: RawServer,
    #[serde(default)]
    storage: RawStorage,
    #[serde(default)]
    upstream: Vec<RawUpstream>,
    #[serde(default)]
    pin: Vec<RawPin>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawPin {
    image: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawServer {
    listen: Option<String>,
    shutdown_grace: Option<String>,
    admin_listen: Option<String>,
    #[serde(default)]
    offline: bool,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawStorage {
    backend: Option<String>,
    root: Option<PathBuf>,
    max_manifest_size: Option<String>,
    max_size: Option<String>,
    low_water: Option<String>,
    sweep_interval: Option<String>,
    s3: Option<RawS3>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawS3 {
    endpoint: Option<String>,
    region: Option<String>,
    bucket: Option<String>,
    prefix: Option<String>,
    access_key_id: Option<String>,
    secret_access_key: Option<RawSecret>,
    secret_access_key_file: Option<PathBuf>,
    max_size: Option<String>,
    low_water: Option<String>,
    #[serde(default)]
    redirect: bool,
    connect_timeout: Option<String>,
    request_timeout: Option<String>,
    max_retries: Option<u32>,
    abandoned_uploads_after: Option<String>,
}

/// A secret as read from the file: its `Debug` is redacted like `S3Config`'s.
#[derive(Deserialize)]
#[serde(transparent)]
struct RawSecret(String);

impl std::fmt::Debug for RawSecret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        Redacted.fmt(f)
    }
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawUpstream {
    name: Option<String>,
    url: Option<String>,
    #[serde(default)]
    aliases: Vec<String>,
    #[serde(default)]
    mirrors: Vec<String>,
    #[serde(default)]
    default: bool,
    tag_ttl: Option<String>,
    username: Option<String>,
    password: Option<String>,
    password_env: Option<String>,
    password_file: Option<PathBuf>,
    library_prefix: Option<bool>,
    connect_timeout: Option<String>,
    request_timeout: Option<String>,
    read_timeout: Option<String>,
    #[serde(default)]
    token_realms: Vec<String>,
    allow: Option<Vec<String>>,
    deny: Option<Vec<String>>,
}

pub const DEFAULT_LISTEN: &str = "0.0.0.0:5000";
pub const DEFAULT_ROOT: &str = "./entrepot-data";
const DEFAULT_TAG_TTL: Duration = Duration::from_secs(5 * 60);
const DEFAULT_GRACE: Duration = Duration::from_secs(30);
const DEFAULT_MAX_MANIFEST: u64 = 4 << 20;
const DEFAULT_SWEEP: Duration = Duration::from_secs(10 * 60);
const DEFAULT_S3_REGION: &str = "us-east-1";
const DEFAULT_S3_CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
const DEFAULT_S3_REQUEST_TIMEOUT: Duration = Duration::from_secs(30);
const DEFAULT_S3_RETRIES: u32 = 3;
/// Longer than any upload of a live writer (parts are bounded by the request timeout).
const DEFAULT_ABANDONED_UPLOADS_AFTER: Duration = Duration::from_secs(3600);

/// Looks up an environment variable; tests pass their own instead of mutating the process's.
type Env<'a> = &'a dyn Fn(&str) -> Option<String>;

/// The registries proxied when the configuration names none.
fn builtin_upstreams() -> Vec<RawUpstream> {
    let up = |name: &str, url: &str| RawUpstream {
        name: Some(name.to_string()),
        url: Some(url.to_string()),
        ..RawUpstream::default()
    };
    vec![
        RawUpstream {
            default: true,
            aliases: vec!["index.docker.io".into(), "registry-1.docker.io".into()],
            ..up("docker.io", "https://registry-1.docker.io")
        },
        up("ghcr.io", "https://ghcr.io"),
        up("quay.io", "https://quay.io"),
        up("registry.k8s.io", "https://registry.k8s.io"),
        up("gcr.io", "https://gcr.io"),
    ]
}

impl Config {
    /// The built-in configuration: `0.0.0.0:5000`, `./entrepot-data`, the well-known registries.
    pub fn builtin() -> Config {
        // Nothing in it reads the environment.
        Config::from_raw(RawConfig::default(), &|_| None)
            .expect("the built-in configuration is valid")
    }

    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        Config::parse(&text).map_err(|e| match e {
            ConfigError::Parse { message, .. } => ConfigError::Parse {
                path: path.to_path_buf(),
                message,
            },
            other => other,
        })
    }

    /// Parses and validates `text`. `password_env` and the S3 credentials (`AWS_ACCESS_KEY_ID`,
    /// `AWS_SECRET_ACCESS_KEY`) are read from the process environment now, not later.
    pub fn parse(text: &str) -> Result<Config, ConfigError> {
        Config::parse_with_env(text, &|var| std::env::var(var).ok())
    }

    fn parse_with_env(text: &str, env: Env) -> Result<Config, ConfigError> {
        let raw: RawConfig = toml::from_str(text).map_err(|e| ConfigError::Parse {
            path: PathBuf::from("<config>"),
            message: parse_error_message(text, &e),
        })?;
        Config::from_raw(raw, env)
    }

    fn from_raw(raw: RawConfig, env: Env) -> Result<Config, ConfigError> {
        let listen = raw.server.listen.as_deref().unwrap_or(DEFAULT_LISTEN);
        let listen: SocketAddr = listen.parse().map_err(|_| {
            invalid(
                "server.listen",
                format!("{listen:?} is not an address like \"0.0.0.0:5000\""),
            )
        })?;
        let shutdown_grace = opt_duration("server.shutdown_grace", &raw.server.shutdown_grace)?
            .unwrap_or(DEFAULT_GRACE);
        let root = raw
            .storage
            .root
            .unwrap_or_else(|| PathBuf::from(DEFAULT_ROOT));
        if root.as_os_str().is_empty() {
            return Err(invalid("storage.root", "must not be empty"));
        }
        let max_manifest_size =
            opt_size("storage.max_manifest_size", &raw.storage.max_manifest_size)?
                .unwrap_or(DEFAULT_MAX_MANIFEST);
        let admin_listen = raw
            .server
            .admin_listen
            .as_deref()
            .map(|a| {
                a.parse::<SocketAddr>().map_err(|_| {
                    invalid(
                        "server.admin_listen",
                        format!("{a:?} is not an address like \"127.0.0.1:9090\""),
                    )
                })
            })
            .transpose()?;
        let max_size = opt_size("storage.max_size", &raw.storage.max_size)?;
        let low_water = low_water("storage", &raw.storage.low_water, max_size)?;
        let sweep_interval = opt_duration("storage.sweep_interval", &raw.storage.sweep_interval)?
            .unwrap_or(DEFAULT_SWEEP);
        if sweep_interval.is_zero() {
            return Err(invalid("storage.sweep_interval", "must be longer than 0s"));
        }
        let backend = match (raw.storage.backend.as_deref().unwrap_or("fs"), raw.storage.s3) {
            ("fs", None) => StorageBackend::Fs,
            ("fs", Some(_)) => {
                return Err(invalid(
                    "storage.s3",
                    "is set but storage.backend is \"fs\" (set backend = \"s3\" or remove [storage.s3])",
                ))
            }
            ("s3", Some(s3)) => StorageBackend::S3(validate_s3(s3, env)?),
            ("s3", None) => {
                return Err(invalid(
                    "storage.s3",
                    "required when storage.backend = \"s3\"",
                ))
            }
            (other, _) => {
                return Err(invalid(
                    "storage.backend",
                    format!("{other:?} is not \"fs\" or \"s3\""),
                ))
            }
        };

        let raw_upstreams = if raw.upstream.is_empty() {
            builtin_upstreams()
        } else {
            raw.upstream
        };
        let mut upstreams: Vec<UpstreamConfig> = Vec::new();
        for (i, u) in raw_upstreams.into_iter().enumerate() {
            let up = validate_upstream(i, u, env)?;
            let key = format!("upstream[{i}].name");
            for n in std::iter::once(&up.name).chain(&up.aliases) {
                if upstreams.iter().any(|o| o.matches(n)) {
                    return Err(invalid(key, format!("{n:?} names two upstreams")));
                }
            }
            upstreams.push(up);
        }
        if upstreams.iter().filter(|u| u.default).count() > 1 {
            return Err(invalid(
                "upstream.default",
                "only one upstream may be the default",
            ));
        }
        let pins = raw
            .pin
            .into_iter()
            .enumerate()
            .map(|(i, p)| {
                let key = format!("pin[{i}].image");
                let image = p.image.ok_or_else(|| invalid(&key, "is required"))?;
                let pin = parse_image_ref(&image).map_err(|e| invalid(&key, e))?;
                if !upstreams.iter().any(|u| u.matches(&pin.upstream)) {
                    return Err(invalid(
                        &key,
                        format!("{image:?} names no configured upstream"),
                    ));
                }
                Ok(pin)
            })
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Config {
            server: ServerConfig {
                listen,
                shutdown_grace,
                admin_listen,
                offline: raw.server.offline,
            },
            storage: StorageConfig {
                backend,
                root,
                max_manifest_size,
                max_size,
                low_water,
                sweep_interval,
            },
            upstreams,
            pins,
        })
    }
}

impl UpstreamConfig {
    /// Does `name` (an `ns=` value or a first path component) select this upstream?
    pub fn matches(&self, name: &str) -> bool {
        self.name == name || self.aliases.iter().any(|a| a == name)
    }

    /// May `repo` (as the upstream names it) be read through this upstream? Deny wins over
    /// allow; without `allow` every repository that is not denied may.
    pub fn admits(&self, repo: &str) -> bool {
        self.allow.as_ref().is_none_or(|a| a.is_match(repo))
            && !self.deny.as_ref().is_some_and(|d| d.is_match(repo))
    }
}

fn validate_upstream(i: usize, u: RawUpstream, env: Env) -> Result<UpstreamConfig, ConfigError> {
    let key = |k: &str| format!("upstream[{i}].{k}");
    let name = u.name.ok_or_else(|| invalid(key("name"), "is required"))?;
    check_upstream_name(&name).map_err(|p| invalid(key("name"), p))?;
    for a in &u.aliases {
        check_upstream_name(a).map_err(|p| invalid(key("aliases"), p))?;
    }
    let url = u.url.ok_or_else(|| invalid(key("url"), "is required"))?;
    let url = parse_url(&url).map_err(|p| invalid(key("url"), p))?;
    let mirrors = u
        .mirrors
        .iter()
        .map(|m| parse_url(m).map_err(|p| invalid(key("mirrors"), p)))
        .collect::<Result<Vec<_>, _>>()?;
    let mut password = u.password;
    let sources = [
        password.is_some(),
        u.password_env.is_some(),
        u.password_file.is_some(),
    ];
    if sources.iter().filter(|s| **s).count() > 1 {
        return Err(invalid(
            key("password"),
            "give only one of password, password_env, password_file",
        ));
    }
    if let Some(var) = &u.password_env {
        password = Some(env(var).ok_or_else(|| {
            invalid(
                key("password_env"),
                format!("environment variable {var} is not set"),
            )
        })?);
    }
    if let Some(file) = &u.password_file {
        let text = std::fs::read_to_string(file)
            .map_err(|e| invalid(key("password_file"), format!("{}: {e}", file.display())))?;
        password = Some(text.trim_end_matches(['\r', '\n']).to_string());
    }
    if password.is_some() != u.username.is_some() {
        return Err(invalid(
            key("username"),
            "username and password go together",
        ));
    }
    let library_prefix = u
        .library_prefix
        .unwrap_or(name == "docker.io" || u.aliases.iter().any(|a| a == "docker.io"));
    let token_realms = u
        .token_realms
        .iter()
        .map(|r| token_realm(r, &url, &mirrors).map_err(|p| invalid(key("token_realms"), p)))
        .collect::<Result<Vec<_>, _>>()?;
    let allow = u
        .allow
        .map(|p| RepoGlobs::parse(&key("allow"), p))
        .transpose()?;
    let deny = u
        .deny
        .map(|p| RepoGlobs::parse(&key("deny"), p))
        .transpose()?;
    Ok(UpstreamConfig {
        tag_ttl: opt_duration(&key("tag_ttl"), &u.tag_ttl)?.unwrap_or(DEFAULT_TAG_TTL),
        connect_timeout: opt_duration(&key("connect_timeout"), &u.connect_timeout)?
            .unwrap_or(Duration::from_secs(10)),
        request_timeout: opt_duration(&key("request_timeout"), &u.request_timeout)?
            .unwrap_or(Duration::from_secs(30)),
        read_timeout: opt_duration(&key("read_timeout"), &u.read_timeout)?
            .unwrap_or(Duration::from_secs(60)),
        name,
        aliases: u.aliases,
        url,
        mirrors,
        default: u.default,
        username: u.username,
        password,
        library_prefix,
        token_realms,
        allow,
        deny,
    })
}

/// A `token_realms` entry: an http(s) URL whose scheme, host and port are trusted. Plain
/// `http://` would carry the credentials in clear, so it is accepted only on the host of an
/// endpoint (`url` or a mirror) that is itself plain http.
fn token_realm(s: &str, url: &Url, mirrors: &[Url]) -> Result<Url, String> {
    let realm = parse_url(s)?;
    let cleartext_ok = std::iter::once(url)
        .chain(mirrors)
        .any(|e| e.scheme() == "http" && e.host_str() == realm.host_str());
    if realm.scheme() == "http" && !cleartext_ok {
        return Err(format!(
            "{s:?} is plain http: credentials would cross the network in clear (allowed only \
             on the host of an upstream URL that is itself http://)"
        ));
    }
    Ok(realm)
}

/// Upstream names appear in `ns=`, in paths and as a folder of the tag index: host-like only.
fn check_upstream_name(name: &str) -> Result<(), String> {
    let ok = !name.is_empty()
        && name.len() <= 253
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b".-:".contains(&b))
        && name.as_bytes()[0].is_ascii_alphanumeric();
    if ok {
        Ok(())
    } else {
        Err(format!(
            "{name:?} must be a registry host name (lower-case letters, digits, '.', '-', ':')"
        ))
    }
}

/// `{table}.low_water`: a size or a percentage of `{table}.max_size`, 90% of it by default.
fn low_water(
    table: &str,
    v: &Option<String>,
    max: Option<u64>,
) -> Result<Option<u64>, ConfigError> {
    let key = format!("{table}.low_water");
    match (v, max) {
        (Some(_), None) => Err(invalid(key, format!("needs {table}.max_size"))),
        (Some(v), Some(max)) => {
            let lw = parse_size_or_percent(v, max).ok_or_else(|| {
                invalid(
                    &key,
                    format!("{v:?} is not a size like \"180GiB\" or a percentage like \"90%\""),
                )
            })?;
            if lw > max {
                return Err(invalid(key, format!("must not be above {table}.max_size")));
            }
            Ok(Some(lw))
        }
        (None, Some(max)) => Ok(Some(max / 10 * 9)),
        (None, None) => Ok(None),
    }
}

fn validate_s3(s3: RawS3, env: Env) -> Result<S3Config, ConfigError> {
    let key = |k: &str| format!("storage.s3.{k}");
    let endpoint = s3
        .endpoint
        .as_deref()
        .map(|e| parse_endpoint(e).map_err(|p| invalid(key("endpoint"), p)))
        .transpose()?;
    let region = s3.region.unwrap_or_else(|| DEFAULT_S3_REGION.to_string());
    if region.is_empty() || region.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return Err(invalid(
            key("region"),
            format!("{region:?} must be a region name like \"us-east-1\" or \"garage\""),
        ));
    }
    let bucket = s3
        .bucket
        .ok_or_else(|| invalid(key("bucket"), "required when storage.backend = \"s3\""))?;
    check_bucket_name(&bucket).map_err(|p| invalid(key("bucket"), p))?;
    let prefix = normalise_prefix(s3.prefix.as_deref().unwrap_or(""))
        .map_err(|p| invalid(key("prefix"), p))?;

    let secret = match (s3.secret_access_key, &s3.secret_access_key_file) {
        (Some(_), Some(_)) => {
            return Err(invalid(
                key("secret_access_key"),
                "give only one of secret_access_key, secret_access_key_file",
            ))
        }
        (Some(RawSecret(s)), None) => Some(s),
        (None, Some(file)) => {
            let text = std::fs::read_to_string(file).map_err(|e| {
                invalid(
                    key("secret_access_key_file"),
                    format!("{}: {e}", file.display()),
                )
            })?;
            Some(text.trim().to_string())
        }
        (None, None) => None,
    };
    if secret.as_deref() == Some("") {
        let k = match s3.secret_access_key_file {
            Some(_) => "secret_access_key_file",
            None => "secret_access_key",
        };
        return Err(invalid(key(k), "is empty"));
    }
    if s3.access_key_id.as_deref() == Some("") {
        return Err(invalid(key("access_key_id"), "is empty"));
    }
    let (access_key_id, secret_access_key) = match (s3.access_key_id, secret) {
        (Some(id), Some(secret)) => (Some(id), Some(secret)),
        (Some(_), None) => {
            return Err(invalid(
                key("secret_access_key"),
                "required with access_key_id (or secret_access_key_file)",
            ))
        }
        (None, Some(_)) => {
            return Err(invalid(
                key("access_key_id"),
                "required with secret_access_key",
            ))
        }
        // Neither in the file: the environment, read now. An empty variable counts as unset.
        (None, None) => {
            let var = |name: &str| env(name).filter(|v| !v.is_empty());
            match (var("AWS_ACCESS_KEY_ID"), var("AWS_SECRET_ACCESS_KEY")) {
                (Some(id), Some(secret)) => (Some(id), Some(secret)),
                (None, None) => (None, None),
                (Some(_), None) => {
                    return Err(invalid(
                        key("secret_access_key"),
                        "not set, and the environment has AWS_ACCESS_KEY_ID but not AWS_SECRET_ACCESS_KEY",
                    ))
                }
                (None, Some(_)) => {
                    return Err(invalid(
                        key("access_key_id"),
                        "not set, and the environment has AWS_SECRET_ACCESS_KEY but not AWS_ACCESS_KEY_ID",
                    ))
                }
            }
        }
    };

    let max_size = opt_size(&key("max_size"), &s3.max_size)?;
    let low_water = low_water("storage.s3", &s3.low_water, max_size)?;
    let connect_timeout = positive_duration(&key("connect_timeout"), &s3.connect_timeout)?
        .unwrap_or(DEFAULT_S3_CONNECT_TIMEOUT);
    let request_timeout = positive_duration(&key("request_timeout"), &s3.request_timeout)?
        .unwrap_or(DEFAULT_S3_REQUEST_TIMEOUT);
    let abandoned_uploads_after =
        positive_duration(&key("abandoned_uploads_after"), &s3.abandoned_uploads_after)?
            .unwrap_or(DEFAULT_ABANDONED_UPLOADS_AFTER);
    Ok(S3Config {
        endpoint,
        region,
        bucket,
        prefix,
        access_key_id,
        secret_access_key,
        max_size,
        low_water,
        redirect: s3.redirect,
        connect_timeout,
        request_timeout,
        retries: s3.max_retries.unwrap_or(DEFAULT_S3_RETRIES),
        abandoned_uploads_after,
    })
}

/// An S3 endpoint: scheme, host and port only, since requests are path-style
/// (`{endpoint}/{bucket}/{key}`).
fn parse_endpoint(s: &str) -> Result<Url, String> {
    let url = parse_url(s)?;
    if url.path() != "/" {
        return Err(format!(
            "{s:?} must have no path (requests are path-style: {{endpoint}}/{{bucket}}/{{key}})"
        ));
    }
    Ok(url)
}

/// S3's bucket naming rules: 3-63 characters, lower-case letters, digits, '.' and '-', starting
/// and ending with a letter or digit.
fn check_bucket_name(name: &str) -> Result<(), String> {
    let b = name.as_bytes();
    let ok = (3..=63).contains(&b.len())
        && b.iter()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || b".-".contains(c))
        && b[0].is_ascii_alphanumeric()
        && b[b.len() - 1].is_ascii_alphanumeric();
    if ok {
        Ok(())
    } else {
        Err(format!(
            "{name:?} must be an S3 bucket name: 3-63 lower-case letters, digits, '.' and '-', \
             starting and ending with a letter or digit"
        ))
    }
}

/// `""`, or `a/b/` from `a/b` or `a/b/`. Components are letters, digits, '.', '-', '_', never
/// `.` or `..`: what every S3 implementation and object_store's `Path` take unescaped.
fn normalise_prefix(p: &str) -> Result<String, String> {
    if p.is_empty() {
        return Ok(String::new());
    }
    let body = p.strip_suffix('/').unwrap_or(p);
    for part in body.split('/') {
        let ok = !part.is_empty()
            && part != "."
            && part != ".."
            && part
                .bytes()
                .all(|c| c.is_ascii_alphanumeric() || b".-_".contains(&c));
        if !ok {
            return Err(format!(
                "{p:?} must be a key prefix like \"mirror-a/\": letters, digits, '.', '-', '_' \
                 between single '/', no leading '/', no \".\" or \"..\""
            ));
        }
    }
    Ok(format!("{body}/"))
}

/// A duration that must not be zero (a zero timeout fails every call).
fn positive_duration(key: &str, v: &Option<String>) -> Result<Option<Duration>, ConfigError> {
    let d = opt_duration(key, v)?;
    if d.is_some_and(|d| d.is_zero()) {
        return Err(invalid(key, "must be longer than 0s"));
    }
    Ok(d)
}

/// toml's message quotes the offending line; when that line holds a secret (`password`,
/// `secret_access_key`), say where it is without showing it.
fn parse_error_message(text: &str, e: &toml::de::Error) -> String {
    let Some(span) = e.span() else {
        return e.to_string();
    };
    let start = text
        .get(..span.start)
        .and_then(|t| t.rfind('\n'))
        .map_or(0, |i| i + 1);
    let end = text
        .get(span.end..)
        .and_then(|t| t.find('\n'))
        .map_or(text.len(), |i| span.end + i);
    let holds_secret = text.get(start..end).unwrap_or(text).lines().any(|line| {
        let key = line
            .split('=')
            .next()
            .unwrap_or("")
            .trim()
            .trim_matches(['"', '\'']);
        let key = key
            .rsplit('.')
            .next()
            .unwrap_or(key)
            .trim()
            .trim_matches(['"', '\'']);
        matches!(key, "password" | "secret_access_key")
    });
    if !holds_secret {
        return e.to_string();
    }
    let line = text.get(..start).map_or(0, |t| t.matches('\n').count()) + 1;
    format!(
        "TOML parse error at line {line} (not shown: it holds a secret)\n{}",
        e.message().trim_end()
    )
}

fn parse_url(s: &str) -> Result<Url, String> {
    let url = Url::parse(s).map_err(|e| format!("{s:?} is not a URL: {e}"))?;
    if !matches!(url.scheme(), "http" | "https") || url.host().is_none() {
        return Err(format!("{s:?} must be an http:// or https:// URL"));
    }
    if !url.username().is_empty() || url.password().is_some() {
        return Err("credentials go in username/password, not in the URL".into());
    }
    if url.query().is_some() || url.fragment().is_some() {
        return Err(format!("{s:?} must not have a query or fragment"));
    }
    Ok(url)
}

fn opt_duration(key: &str, v: &Option<String>) -> Result<Option<Duration>, ConfigError> {
    v.as_deref()
        .map(|s| {
            humantime::parse_duration(s).map_err(|e| {
                invalid(
                    key,
                    format!("{s:?} is not a duration like \"30s\" or \"5m\": {e}"),
                )
            })
        })
        .transpose()
}

fn opt_size(key: &str, v: &Option<String>) -> Result<Option<u64>, ConfigError> {
    v.as_deref()
        .map(|s| {
            parse_size(s).ok_or_else(|| {
                invalid(
                    key,
                    format!("{s:?} is not a size like \"4MiB\" or \"200GiB\""),
                )
            })
        })
        .transpose()
}

/// A size, or a percentage of `of` (`"90%"`).
fn parse_size_or_percent(s: &str, of: u64) -> Option<u64> {
    match s.trim().strip_suffix('%') {
        Some(p) => {
            let p: u64 = p.trim().parse().ok().filter(|p| *p <= 100)?;
            Some(of / 100 * p)
        }
        None => parse_size(s),
    }
}

/// `docker.io/library/alpine:3.20`, `ghcr.io/org/app@sha256:...`: the first component names
/// the upstream; a bare `alpine:3.20` is refused (say which registry).
pub fn parse_image_ref(s: &str) -> Result<PinConfig, String> {
    use crate::oci::{Reference, RepoName};
    let (upstream, rest) = s.split_once('/').ok_or_else(|| {
        format!("{s:?} must start with the registry, as in docker.io/library/alpine:3.20")
    })?;
    let (name, reference) = if let Some((n, d)) = rest.split_once('@') {
        (n, d.to_string())
    } else {
        match rest.rsplit_once(':') {
            Some((n, t)) if !t.contains('/') => (n, t.to_string()),
            _ => (rest, "latest".to_string()),
        }
    };
    let mut repo: RepoName = name
        .parse()
        .map_err(|e| format!("{s:?}: repository {name:?}: {e}"))?;
    if upstream == "docker.io" {
        repo = repo.with_library_prefix();
    }
    let reference: Reference = reference
        .parse()
        .map_err(|e| format!("{s:?}: reference {reference:?}: {e}"))?;
    Ok(PinConfig {
        upstream: upstream.to_string(),
        repo,
        reference,
    })
}

/// `123`, `4KiB`, `4MiB`, `200GiB`, `1TiB` (and the decimal `KB`, `MB`, `GB`, `TB`).
pub fn parse_size(s: &str) -> Option<u64> {
    let s = s.trim();
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let n: u64 = num.parse().ok()?;
    let mult: u64 = match unit.trim() {
        "" | "B" => 1,
        "KiB" => 1 << 10,
        "MiB" => 1 << 20,
        "GiB" => 1 << 30,
        "TiB" => 1 << 40,
        "KB" | "kB" => 1_000,
        "MB" => 1_000_000,
        "GB" => 1_000_000_000,
        "TB" => 1_000_000_000_000,
        _ => return None,
    };
    n.checked_mul(mult)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn builtin_has_the_well_known_registries() {
        let c = Config::builtin();
        assert_eq!(c.server.listen.to_string(), "0.0.0.0:5000");
        assert_eq!(c.storage.root, PathBuf::from("./entrepot-data"));
        let names: Vec<_> = c.upstreams.iter().map(|u| u.name.as_str()).collect();
        assert_eq!(
            names,
            [
                "docker.io",
                "ghcr.io",
                "quay.io",
                "registry.k8s.io",
                "gcr.io"
            ]
        );
        let hub = &c.upstreams[0];
        assert!(hub.default && hub.library_prefix && hub.matches("index.docker.io"));
        assert_eq!(hub.url.as_str(), "https://registry-1.docker.io/");
        assert!(!c.upstreams[1].library_prefix);
    }

    #[test]
    fn parses_the_contract() {
        let c = Config::parse(
            r#"
            [server]
            listen = "127.0.0.1:5000"
            [storage]
            root = "/var/lib/entrepot"
            [[upstream]]
            name = "docker.io"
            url = "https://registry-1.docker.io"
            default = true
            tag_ttl = "5m"
            username = "u"
            password = "p"
            mirrors = ["https://mirror.example"]
            "#,
        )
        .unwrap();
        let u = &c.upstreams[0];
        assert_eq!(u.tag_ttl, Duration::from_secs(300));
        assert_eq!(u.username.as_deref(), Some("u"));
        assert_eq!(u.mirrors.len(), 1);
        assert_eq!(c.upstreams.len(), 1);
    }

    fn err(text: &str) -> String {
        Config::parse(text).unwrap_err().to_string()
    }

    #[test]
    fn errors_name_the_key() {
        let e = err("[[upstream]]\nname = \"a\"\nurl = \"http://x\"\ntag_ttl = \"5 parsecs\"");
        assert!(e.starts_with("upstream[0].tag_ttl:"), "{e}");
        let e = err("[server]\nlisten = \"nowhere\"");
        assert!(e.starts_with("server.listen:"), "{e}");
        let e = err("[[upstream]]\nname = \"a\"\nurl = \"ftp://x\"");
        assert!(e.starts_with("upstream[0].url:"), "{e}");
        let e = err("[[upstream]]\nname = \"a\"");
        assert!(e.contains("upstream[0].url: is required"), "{e}");
        let e = err("[[upstream]]\nname = \"A/b\"\nurl = \"http://x\"");
        assert!(e.starts_with("upstream[0].name:"), "{e}");
        let e = err(
            "[[upstream]]\nname = \"a\"\nurl = \"http://x\"\ndefault = true\n\
             [[upstream]]\nname = \"b\"\nurl = \"http://y\"\ndefault = true",
        );
        assert!(e.contains("only one upstream may be the default"), "{e}");
        let e = err("[[upstream]]\nname = \"a\"\nurl = \"http://x\"\n[[upstream]]\nname = \"a\"\nurl = \"http://y\"");
        assert!(e.contains("names two upstreams"), "{e}");
        let e = err("[server]\nlisen = \"x\"");
        assert!(e.contains("lisen"), "{e}");
        let e = err("[[upstream]]\nname = \"a\"\nurl = \"http://x\"\nusername = \"u\"");
        assert!(e.contains("username and password go together"), "{e}");
        let e = err("[storage]\nmax_manifest_size = \"lots\"");
        assert!(e.starts_with("storage.max_manifest_size:"), "{e}");
    }

    #[test]
    fn storage_bounds_and_pins() {
        let c = Config::parse(
            "[storage]\nmax_size = \"10GiB\"\n\
             [[upstream]]\nname = \"docker.io\"\nurl = \"http://x\"\n\
             [[pin]]\nimage = \"docker.io/alpine:3.20\"\n\
             [[pin]]\nimage = \"docker.io/org/app@sha256:{}\"\n"
                .replace("{}", &"a".repeat(64))
                .as_str(),
        )
        .unwrap();
        assert_eq!(c.storage.max_size, Some(10 << 30));
        assert_eq!(c.storage.low_water, Some((10u64 << 30) / 10 * 9));
        assert_eq!(c.pins[0].repo.as_str(), "library/alpine");
        assert_eq!(c.pins[0].reference.to_string(), "3.20");
        assert!(matches!(
            c.pins[1].reference,
            crate::oci::Reference::Digest(_)
        ));
        let c = Config::parse("[storage]\nmax_size = \"1000\"\nlow_water = \"50%\"").unwrap();
        assert_eq!(c.storage.low_water, Some(500));
        let e = err("[storage]\nlow_water = \"5GiB\"");
        assert!(
            e.contains("storage.low_water: needs storage.max_size"),
            "{e}"
        );
        let e = err("[storage]\nmax_size = \"1GiB\"\nlow_water = \"2GiB\"");
        assert!(e.contains("must not be above"), "{e}");
        let e =
            err("[[upstream]]\nname = \"a.io\"\nurl = \"http://x\"\n[[pin]]\nimage = \"b.io/x:1\"");
        assert!(
            e.contains("pin[0].image") && e.contains("no configured upstream"),
            "{e}"
        );
        let e = err("[[pin]]\nimage = \"alpine\"");
        assert!(
            e.contains("pin[0].image") && e.contains("must start with the registry"),
            "{e}"
        );
        let e = err("[server]\nadmin_listen = \"x\"");
        assert!(e.starts_with("server.admin_listen"), "{e}");
    }

    /// The environment a test sees, instead of the process's.
    fn env_of(vars: &[(&str, &str)]) -> impl Fn(&str) -> Option<String> {
        let vars: Vec<(String, String)> = vars
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        move |name| vars.iter().find(|(k, _)| k == name).map(|(_, v)| v.clone())
    }

    fn parse_env(text: &str, vars: &[(&str, &str)]) -> Result<Config, ConfigError> {
        Config::parse_with_env(text, &env_of(vars))
    }

    fn s3_of(c: &Config) -> &S3Config {
        match &c.storage.backend {
            StorageBackend::S3(s3) => s3,
            StorageBackend::Fs => panic!("backend is fs"),
        }
    }

    const SECRET: &str = "wJalrXUtnFEMI-K7MDENG-bPxRfiCYEXAMPLEKEY";

    /// Errors from an s3 table with `[storage]\nbackend = "s3"\n[storage.s3]\n` before `s3`.
    fn s3_err(s3: &str, vars: &[(&str, &str)]) -> String {
        parse_env(
            &format!("[storage]\nbackend = \"s3\"\n[storage.s3]\n{s3}"),
            vars,
        )
        .unwrap_err()
        .to_string()
    }

    #[test]
    fn builtin_and_plain_storage_use_the_filesystem() {
        assert_eq!(Config::builtin().storage.backend, StorageBackend::Fs);
        let c = parse_env("[storage]\nroot = \"/x\"", &[]).unwrap();
        assert_eq!(c.storage.backend, StorageBackend::Fs);
        let c = parse_env("[storage]\nbackend = \"fs\"", &[]).unwrap();
        assert_eq!(c.storage.backend, StorageBackend::Fs);
    }

    #[test]
    fn parses_a_full_s3_config() {
        let dir = tempfile::tempdir().unwrap();
        let secret_file = dir.path().join("s3-secret");
        std::fs::write(&secret_file, format!("  {SECRET}\n")).unwrap();
        let c = parse_env(
            &format!(
                r#"
                [storage]
                backend = "s3"
                root = "/var/lib/entrepot"
                max_size = "50GiB"

                [storage.s3]
                endpoint = "http://garage.local:3900"
                region = "garage"
                bucket = "entrepot"
                prefix = "mirror-a/"
                access_key_id = "GK31c2f218a2e44f485b94239e"
                secret_access_key_file = "{}"
                max_size = "2TiB"
                low_water = "1TiB"
                redirect = true
                connect_timeout = "2s"
                request_timeout = "1m"
                max_retries = 5
                abandoned_uploads_after = "2h"
                "#,
                secret_file.display()
            ),
            // The file's credentials win: the environment is not read.
            &[
                ("AWS_ACCESS_KEY_ID", "other"),
                ("AWS_SECRET_ACCESS_KEY", "other"),
            ],
        )
        .unwrap();
        assert_eq!(c.storage.root, PathBuf::from("/var/lib/entrepot"));
        assert_eq!(c.storage.max_size, Some(50 << 30));
        assert_eq!(
            *s3_of(&c),
            S3Config {
                endpoint: Some(Url::parse("http://garage.local:3900").unwrap()),
                region: "garage".into(),
                bucket: "entrepot".into(),
                prefix: "mirror-a/".into(),
                access_key_id: Some("GK31c2f218a2e44f485b94239e".into()),
                secret_access_key: Some(SECRET.into()),
                max_size: Some(2 << 40),
                low_water: Some(1 << 40),
                redirect: true,
                connect_timeout: Duration::from_secs(2),
                request_timeout: Duration::from_secs(60),
                retries: 5,
                abandoned_uploads_after: Duration::from_secs(7200),
            }
        );
    }

    #[test]
    fn s3_defaults() {
        let c = parse_env(
            "[storage]\nbackend = \"s3\"\n[storage.s3]\nbucket = \"b.example-1\"\nmax_size = \"1000\"",
            &[],
        )
        .unwrap();
        assert_eq!(
            *s3_of(&c),
            S3Config {
                endpoint: None,
                region: "us-east-1".into(),
                bucket: "b.example-1".into(),
                prefix: String::new(),
                access_key_id: None,
                secret_access_key: None,
                max_size: Some(1000),
                low_water: Some(900),
                redirect: false,
                connect_timeout: Duration::from_secs(5),
                request_timeout: Duration::from_secs(30),
                retries: 3,
                abandoned_uploads_after: Duration::from_secs(3600),
            }
        );
        let c = parse_env(
            "[storage]\nbackend = \"s3\"\n[storage.s3]\nbucket = \"abc\"\nmax_size = \"1000\"\nlow_water = \"50%\"",
            &[],
        )
        .unwrap();
        assert_eq!(s3_of(&c).low_water, Some(500));
    }

    #[test]
    fn s3_prefix_is_normalised() {
        let prefix = |p: &str| {
            let c = parse_env(
                &format!(
                    "[storage]\nbackend = \"s3\"\n[storage.s3]\nbucket = \"abc\"\nprefix = \"{p}\""
                ),
                &[],
            )
            .unwrap();
            s3_of(&c).prefix.clone()
        };
        assert_eq!(prefix(""), "");
        assert_eq!(prefix("a"), "a/");
        assert_eq!(prefix("mirror-a/"), "mirror-a/");
        assert_eq!(prefix("site_1/mirror.a"), "site_1/mirror.a/");
        for bad in [
            "/a", "/", "a//b", "a//", "..", "a/../b", "./a", "a b", "a\\b", "a%2F",
        ] {
            let e = s3_err(&format!("bucket = \"abc\"\nprefix = {bad:?}"), &[]);
            assert!(e.starts_with("storage.s3.prefix:"), "{bad}: {e}");
        }
    }

    #[test]
    fn s3_errors_name_the_key() {
        let cases: &[(&str, &str)] = &[
            ("region = \"x\"", "storage.s3.bucket: required when storage.backend = \"s3\""),
            ("bucket = \"ab\"", "storage.s3.bucket:"),
            ("bucket = \"Entrepot\"", "storage.s3.bucket:"),
            ("bucket = \"entrepot-\"", "storage.s3.bucket:"),
            ("bucket = \"under_score\"", "storage.s3.bucket:"),
            (&format!("bucket = \"{}\"", "a".repeat(64)), "storage.s3.bucket:"),
            ("bucket = \"abc\"\nendpoint = \"garage.local:3900\"", "storage.s3.endpoint:"),
            ("bucket = \"abc\"\nendpoint = \"ftp://garage.local\"", "storage.s3.endpoint:"),
            ("bucket = \"abc\"\nendpoint = \"http://garage.local/s3\"", "storage.s3.endpoint:"),
            ("bucket = \"abc\"\nendpoint = \"http://garage.local?x=1\"", "storage.s3.endpoint:"),
            ("bucket = \"abc\"\nendpoint = \"http://k:s@garage.local\"", "storage.s3.endpoint:"),
            ("bucket = \"abc\"\nregion = \"\"", "storage.s3.region:"),
            ("bucket = \"abc\"\nlow_water = \"1GiB\"", "storage.s3.low_water: needs storage.s3.max_size"),
            ("bucket = \"abc\"\nmax_size = \"1GiB\"\nlow_water = \"2GiB\"", "storage.s3.low_water: must not be above storage.s3.max_size"),
            ("bucket = \"abc\"\nmax_size = \"lots\"", "storage.s3.max_size:"),
            ("bucket = \"abc\"\nconnect_timeout = \"0s\"", "storage.s3.connect_timeout: must be longer than 0s"),
            ("bucket = \"abc\"\nrequest_timeout = \"soon\"", "storage.s3.request_timeout:"),
            ("bucket = \"abc\"\nmax_retries = -1", "max_retries"),
            ("bucket = \"abc\"\nbukcet = \"abc\"", "bukcet"),
            ("bucket = \"abc\"\naccess_key_id = \"GK1\"", "storage.s3.secret_access_key: required with access_key_id"),
            ("bucket = \"abc\"\nsecret_access_key = \"s\"", "storage.s3.access_key_id: required with secret_access_key"),
            ("bucket = \"abc\"\naccess_key_id = \"\"\nsecret_access_key = \"s\"", "storage.s3.access_key_id: is empty"),
            ("bucket = \"abc\"\naccess_key_id = \"GK1\"\nsecret_access_key = \"\"", "storage.s3.secret_access_key: is empty"),
            (
                "bucket = \"abc\"\naccess_key_id = \"GK1\"\nsecret_access_key = \"s\"\nsecret_access_key_file = \"/f\"",
                "storage.s3.secret_access_key: give only one of secret_access_key, secret_access_key_file",
            ),
            (
                "bucket = \"abc\"\naccess_key_id = \"GK1\"\nsecret_access_key_file = \"/nonexistent/secret\"",
                "storage.s3.secret_access_key_file: /nonexistent/secret:",
            ),
        ];
        for (s3, want) in cases {
            let e = s3_err(s3, &[]);
            assert!(e.contains(want), "{s3}: {e}");
        }
    }

    #[test]
    fn backend_and_s3_table_go_together() {
        let e = err("[storage]\nbackend = \"s3\"");
        assert_eq!(e, "storage.s3: required when storage.backend = \"s3\"");
        let e = err("[storage.s3]\nbucket = \"abc\"");
        assert!(
            e.starts_with("storage.s3: is set but storage.backend is \"fs\""),
            "{e}"
        );
        let e = err("[storage]\nbackend = \"fs\"\n[storage.s3]\nbucket = \"abc\"");
        assert!(
            e.starts_with("storage.s3: is set but storage.backend is \"fs\""),
            "{e}"
        );
        let e = err("[storage]\nbackend = \"gcs\"");
        assert!(e.starts_with("storage.backend: \"gcs\" is not"), "{e}");
    }

    #[test]
    fn s3_credentials_from_the_environment() {
        let text = "[storage]\nbackend = \"s3\"\n[storage.s3]\nbucket = \"abc\"";
        let both = [
            ("AWS_ACCESS_KEY_ID", "AKIDENV"),
            ("AWS_SECRET_ACCESS_KEY", SECRET),
        ];
        let c = parse_env(text, &both).unwrap();
        let s3 = s3_of(&c);
        assert_eq!(s3.access_key_id.as_deref(), Some("AKIDENV"));
        assert_eq!(s3.secret_access_key.as_deref(), Some(SECRET));
        assert!(!format!("{c:?}").contains(SECRET));

        // Set but empty counts as unset.
        let c = parse_env(
            text,
            &[("AWS_ACCESS_KEY_ID", ""), ("AWS_SECRET_ACCESS_KEY", "")],
        )
        .unwrap();
        assert_eq!(s3_of(&c).access_key_id, None);
        assert_eq!(s3_of(&c).secret_access_key, None);

        let e = parse_env(text, &[("AWS_ACCESS_KEY_ID", "AKIDENV")])
            .unwrap_err()
            .to_string();
        assert!(
            e.starts_with("storage.s3.secret_access_key:") && e.contains("AWS_SECRET_ACCESS_KEY"),
            "{e}"
        );
        let e = parse_env(text, &[("AWS_SECRET_ACCESS_KEY", SECRET)])
            .unwrap_err()
            .to_string();
        assert!(
            e.starts_with("storage.s3.access_key_id:") && e.contains("AWS_ACCESS_KEY_ID"),
            "{e}"
        );
        assert!(!e.contains(SECRET), "{e}");

        // One half in the file does not borrow the other half from the environment.
        let e = s3_err("bucket = \"abc\"\naccess_key_id = \"GK1\"", &both);
        assert!(e.starts_with("storage.s3.secret_access_key:"), "{e}");
    }

    #[test]
    fn password_env_reads_the_given_environment() {
        let text = "[[upstream]]\nname = \"a\"\nurl = \"http://x\"\nusername = \"u\"\npassword_env = \"A_TOKEN\"";
        let c = parse_env(text, &[("A_TOKEN", "t0ken")]).unwrap();
        assert_eq!(c.upstreams[0].password.as_deref(), Some("t0ken"));
        let e = parse_env(text, &[]).unwrap_err().to_string();
        assert!(
            e.contains("upstream[0].password_env: environment variable A_TOKEN is not set"),
            "{e}"
        );
    }

    #[test]
    fn the_s3_secret_is_never_shown() {
        let text = format!(
            "[storage]\nbackend = \"s3\"\n[storage.s3]\nbucket = \"abc\"\n\
             access_key_id = \"GK1\"\nsecret_access_key = \"{SECRET}\"\n"
        );
        let c = parse_env(&text, &[]).unwrap();
        assert_eq!(s3_of(&c).secret_access_key.as_deref(), Some(SECRET));
        let debug = format!("{c:?}");
        assert!(!debug.contains(SECRET), "{debug}");
        assert!(
            debug.contains("secret_access_key: Some(<redacted>)"),
            "{debug}"
        );
        assert!(
            debug.contains("GK1") && debug.contains("bucket: \"abc\""),
            "{debug}"
        );
        let pretty = format!("{c:#?}");
        assert!(!pretty.contains(SECRET), "{pretty}");

        // Nor in errors: a validation error elsewhere, a type error, a syntax error on its line.
        let broken = [
            format!("{text}region = \"\""),
            format!("{text}max_retries = \"many\""),
            text.replace(&format!("\"{SECRET}\""), &format!("\"{SECRET}")),
            text.replace(&format!("\"{SECRET}\""), SECRET),
            format!("{text}secret_access_key = \"{SECRET}\""),
        ];
        for t in &broken {
            let e = parse_env(t, &[]).unwrap_err().to_string();
            assert!(!e.contains(SECRET), "{e}");
        }
        // Parse errors away from the secret still quote their line.
        let e = parse_env(&format!("{text}max_retries = \"many\""), &[])
            .unwrap_err()
            .to_string();
        assert!(e.contains("max_retries = \"many\""), "{e}");
        // ... and on its line they still say where.
        let e = parse_env(&broken[2], &[]).unwrap_err().to_string();
        assert!(e.contains("line 6") && e.contains("secret"), "{e}");
    }

    #[test]
    fn the_upstream_password_is_never_shown() {
        let pw = "hunter2-correct-horse";
        let c = parse_env(
            &format!(
                "[[upstream]]\nname = \"a\"\nurl = \"http://x\"\nusername = \"robot\"\n\
                 password = \"{pw}\"\nallow = [\"team/**\"]"
            ),
            &[],
        )
        .unwrap();
        assert_eq!(c.upstreams[0].password.as_deref(), Some(pw));
        for debug in [format!("{c:?}"), format!("{:#?}", c.upstreams[0])] {
            assert!(!debug.contains(pw), "{debug}");
            assert!(debug.contains("<redacted>"), "{debug}");
            assert!(
                debug.contains("\"robot\"") && debug.contains("\"team/**\""),
                "{debug}"
            );
        }
        // From the environment or a file: the same.
        let c = parse_env(
            "[[upstream]]\nname = \"a\"\nurl = \"http://x\"\nusername = \"u\"\npassword_env = \"PW\"",
            &[("PW", pw)],
        )
        .unwrap();
        assert!(!format!("{c:?}").contains(pw));
        // Without a password there is nothing to redact.
        let c = parse_env("[[upstream]]\nname = \"a\"\nurl = \"http://x\"", &[]).unwrap();
        assert!(format!("{c:?}").contains("password: None"));
    }

    fn upstream_with(extra: &str) -> Result<UpstreamConfig, ConfigError> {
        let c = parse_env(
            &format!("[[upstream]]\nname = \"a\"\nurl = \"https://registry.example\"\n{extra}"),
            &[],
        )?;
        Ok(c.upstreams.into_iter().next().unwrap())
    }

    #[test]
    fn token_realms_are_urls_and_never_cleartext_to_another_host() {
        let u = upstream_with(
            "token_realms = [\"https://auth.example.com/token\", \"https://sso.example:8443\"]",
        )
        .unwrap();
        let realms: Vec<_> = u.token_realms.iter().map(Url::as_str).collect();
        assert_eq!(
            realms,
            [
                "https://auth.example.com/token",
                "https://sso.example:8443/"
            ]
        );
        // Plain http only on the host of a plain-http endpoint (the URL or a mirror).
        let c = parse_env(
            "[[upstream]]\nname = \"a\"\nurl = \"http://reg.lan:5000\"\n\
             mirrors = [\"http://mirror.lan\"]\n\
             token_realms = [\"http://reg.lan:5001/auth\", \"http://mirror.lan/token\"]",
            &[],
        )
        .unwrap();
        assert_eq!(c.upstreams[0].token_realms.len(), 2);
        for (extra, want) in [
            (
                "token_realms = [\"http://auth.example.com/token\"]",
                "is plain http",
            ),
            (
                "token_realms = [\"http://registry.example/token\"]",
                "is plain http",
            ),
            ("token_realms = [\"auth.example.com\"]", "is not a URL"),
            (
                "token_realms = [\"ftp://auth.example.com\"]",
                "must be an http:// or https://",
            ),
            (
                "token_realms = [\"https://u:p@auth.example.com\"]",
                "credentials",
            ),
            (
                "token_realms = [\"https://auth.example.com/t?x=1\"]",
                "query",
            ),
            (
                "token_realms = \"https://auth.example.com\"",
                "token_realms",
            ),
        ] {
            let e = upstream_with(extra).unwrap_err().to_string();
            assert!(
                e.contains("token_realms") && e.contains(want),
                "{extra}: {e}"
            );
        }
    }

    #[test]
    fn allow_and_deny_are_component_aware_globs() {
        let u = upstream_with(
            "allow = [\"library/*\", \"team/**\", \"tools/app-?\"]\ndeny = [\"team/secret/**\", \"**/*-private\"]",
        )
        .unwrap();
        for yes in ["library/alpine", "team/app", "team/a/b/c", "tools/app-1"] {
            assert!(u.admits(yes), "{yes}");
        }
        for no in [
            "library/a/b",      // `*` stays within one component
            "library",          // `team/**` needs something after `team/`
            "other/app",        // not allowed
            "team/secret/app",  // denied: deny wins over allow
            "team/x/y-private", // denied across components
            "tools/app-12",
            "tools/app-/",
            "team",
        ] {
            assert!(!u.admits(no), "{no}");
        }
        // Without allow everything is admitted but what deny names.
        let u = upstream_with("deny = [\"secret/*\"]").unwrap();
        assert!(u.admits("anything/at/all") && !u.admits("secret/x") && u.admits("secret/x/y"));
        assert!(upstream_with("").unwrap().admits("a/b"));

        for (extra, key) in [
            (
                "allow = [\"team/[ab\"]",
                "upstream[0].allow: \"team/[ab\" is not a valid pattern",
            ),
            (
                "deny = [\"a/{b\"]",
                "upstream[0].deny: \"a/{b\" is not a valid pattern",
            ),
            ("allow = []", "upstream[0].allow: is empty"),
            (
                "allow = [\"/team/*\"]",
                "upstream[0].allow: \"/team/*\" must be",
            ),
            (
                "deny = [\"team//x\"]",
                "upstream[0].deny: \"team//x\" must be",
            ),
            ("allow = [\"\"]", "upstream[0].allow: \"\" must be"),
            (
                "allow = [\"Library/*\"]",
                "upstream[0].allow: \"Library/*\" can never match",
            ),
            ("allow = \"library/*\"", "allow"),
        ] {
            let e = upstream_with(extra).unwrap_err().to_string();
            assert!(e.contains(key), "{extra}: {e}");
        }
    }

    #[test]
    fn sizes() {
        assert_eq!(parse_size("4MiB"), Some(4 << 20));
        assert_eq!(parse_size("200GiB"), Some(200 << 30));
        assert_eq!(parse_size("10"), Some(10));
        assert_eq!(parse_size("1 KB"), Some(1000));
        assert_eq!(parse_size("x"), None);
        assert_eq!(parse_size("5 bananas"), None);
    }
}

#[cfg(test)]
mod example_tests {
    use super::*;

    /// The shipped example must stay a valid, complete configuration.
    #[test]
    fn config_example_parses() {
        let c = Config::parse(include_str!("../config.example.toml")).unwrap();
        assert_eq!(c.upstreams.len(), 5);
        assert!(c.upstreams[0].default);
        assert_eq!(c.server.listen.to_string(), "127.0.0.1:5000");
        assert_eq!(c.storage.backend, StorageBackend::Fs);
    }

    /// Its commented `token_realms`, `allow` and `deny` lines, uncommented, are valid too.
    #[test]
    fn config_example_upstream_policy_lines_parse() {
        let example = include_str!("../config.example.toml");
        // Those of the first (docker.io) table.
        let (mut seen, mut tables) = (0, 0);
        let text: String = example
            .lines()
            .map(|line| {
                let keys = ["token_realms = ", "allow = ", "deny = "];
                tables += usize::from(line == "[[upstream]]");
                match line.strip_prefix("# ") {
                    Some(l) if tables == 1 && keys.iter().any(|k| l.starts_with(k)) => {
                        seen += 1;
                        format!("{l}\n")
                    }
                    _ => format!("{line}\n"),
                }
            })
            .collect();
        assert_eq!(seen, 3, "{text}");
        let c = Config::parse_with_env(&text, &|_| None).unwrap();
        let hub = &c.upstreams[0];
        assert_eq!(hub.token_realms.len(), 1);
        assert!(hub.admits("library/alpine") && !hub.admits("library/app-private"));
        assert!(!hub.admits("someone/app"));
    }

    /// Its commented `[storage.s3]` block, uncommented, is valid too.
    #[test]
    fn config_example_s3_block_parses() {
        let dir = tempfile::tempdir().unwrap();
        let secret = dir.path().join("s3-secret");
        std::fs::write(&secret, "s3cr3t\n").unwrap();
        let example = include_str!("../config.example.toml");
        let mut text = String::new();
        let mut in_s3 = false;
        for line in example.lines() {
            in_s3 = (in_s3 && !line.is_empty()) || line == "# [storage.s3]";
            let setting = line
                .strip_prefix("# ")
                .filter(|l| l.starts_with('[') || l.contains(" = "));
            let line = match setting {
                Some(l) if in_s3 => l,
                _ => line,
            };
            let line = if line.starts_with("secret_access_key_file = ") {
                format!(
                    "secret_access_key_file = {:?}",
                    secret.display().to_string()
                )
            } else {
                line.replace("backend = \"fs\"", "backend = \"s3\"")
            };
            text.push_str(&line);
            text.push('\n');
        }
        let c = Config::parse_with_env(&text, &|_| None).unwrap();
        let StorageBackend::S3(s3) = &c.storage.backend else {
            panic!("backend is fs: {text}");
        };
        assert_eq!(s3.bucket, "entrepot");
        assert_eq!(s3.prefix, "mirror-a/");
        assert_eq!(s3.secret_access_key.as_deref(), Some("s3cr3t"));
        assert_eq!(s3.low_water, Some((2u64 << 40) / 100 * 90));
        assert_eq!(s3.retries, 3);
    }
}
