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

#[derive(Debug, Clone)]
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
    root: Option<PathBuf>,
    max_manifest_size: Option<String>,
    max_size: Option<String>,
    low_water: Option<String>,
    sweep_interval: Option<String>,
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
}

pub const DEFAULT_LISTEN: &str = "0.0.0.0:5000";
pub const DEFAULT_ROOT: &str = "./entrepot-data";
const DEFAULT_TAG_TTL: Duration = Duration::from_secs(5 * 60);
const DEFAULT_GRACE: Duration = Duration::from_secs(30);
const DEFAULT_MAX_MANIFEST: u64 = 4 << 20;
const DEFAULT_SWEEP: Duration = Duration::from_secs(10 * 60);

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
        Config::from_raw(RawConfig::default()).expect("the built-in configuration is valid")
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

    pub fn parse(text: &str) -> Result<Config, ConfigError> {
        let raw: RawConfig = toml::from_str(text).map_err(|e| ConfigError::Parse {
            path: PathBuf::from("<config>"),
            message: e.to_string(),
        })?;
        Config::from_raw(raw)
    }

    fn from_raw(raw: RawConfig) -> Result<Config, ConfigError> {
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
        let low_water = match (&raw.storage.low_water, max_size) {
            (Some(_), None) => return Err(invalid("storage.low_water", "needs storage.max_size")),
            (Some(v), Some(max)) => {
                let lw = parse_size_or_percent(v, max).ok_or_else(|| {
                    invalid(
                        "storage.low_water",
                        format!("{v:?} is not a size like \"180GiB\" or a percentage like \"90%\""),
                    )
                })?;
                if lw > max {
                    return Err(invalid(
                        "storage.low_water",
                        "must not be above storage.max_size",
                    ));
                }
                Some(lw)
            }
            (None, Some(max)) => Some(max / 10 * 9),
            (None, None) => None,
        };
        let sweep_interval = opt_duration("storage.sweep_interval", &raw.storage.sweep_interval)?
            .unwrap_or(DEFAULT_SWEEP);
        if sweep_interval.is_zero() {
            return Err(invalid("storage.sweep_interval", "must be longer than 0s"));
        }

        let raw_upstreams = if raw.upstream.is_empty() {
            builtin_upstreams()
        } else {
            raw.upstream
        };
        let mut upstreams: Vec<UpstreamConfig> = Vec::new();
        for (i, u) in raw_upstreams.into_iter().enumerate() {
            let up = validate_upstream(i, u)?;
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
}

fn validate_upstream(i: usize, u: RawUpstream) -> Result<UpstreamConfig, ConfigError> {
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
        password = Some(std::env::var(var).map_err(|_| {
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
    })
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
    }
}
