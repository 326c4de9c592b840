//! Configuration in two stages: the raw TOML as serde reads it, then a validated `Config` with
//! parsed durations, sizes and URLs. Every error names the key it is about.
//!
//! # Layout
//!
//! This file owns `Config` and its entry points (`parse`, `load`, `builtin`), `ConfigError`,
//! and the value parsers every section shares (sizes, durations, URLs). Each section is
//! validated in a file of its own:
//!
//! - `server`: `[server]`
//! - `storage`: `[storage]`, the backend choice and the `low_water` rule
//! - `s3`: `[storage.s3]`, its credentials and its redacted `Debug`
//! - `upstream`: `[[upstream]]`: credentials, `token_realms`, `allow`/`deny`, mirrors, the
//!   built-in registries
//! - `pins`: `[[pin]]` and `parse_image_ref`
//! - `auth`: `[auth]` and `[[access]]`: the htpasswd file, the realm, the read rules

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;
use url::Url;

mod auth;
mod cluster;
mod pins;
mod s3;
mod server;
mod storage;
mod upstream;

#[cfg(test)]
mod fuzz_tests;

pub use auth::DEFAULT_REALM;
pub use cluster::{member_url, ClusterConfig, Members};
pub use pins::{parse_image_ref, PinConfig};
pub use s3::S3Config;
pub use server::{ServerConfig, DEFAULT_LISTEN};
pub use storage::{StorageBackend, StorageConfig, DEFAULT_ROOT};
pub use upstream::{RepoGlobs, UpstreamConfig};

use auth::{RawAccess, RawAuth};
use cluster::RawCluster;
use pins::RawPin;
use server::RawServer;
use storage::RawStorage;
use upstream::RawUpstream;

/// The validated configuration the server runs with.
#[derive(Debug, Clone)]
pub struct Config {
    pub server: ServerConfig,
    pub storage: StorageConfig,
    pub upstreams: Vec<UpstreamConfig>,
    /// Images never evicted (`[[pin]] image = "docker.io/library/alpine:3.20"`).
    pub pins: Vec<PinConfig>,
    /// Several replicas forming one cache (`[cluster]`); `None` for a single process.
    pub cluster: Option<ClusterConfig>,
    /// Client authentication and the read policy (`[auth]`, `[[access]]`); `None`: every read
    /// is anonymous. Live: its users file is reloaded when it changes, shared by every clone.
    pub auth: Option<crate::auth::Auth>,
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
    cluster: Option<RawCluster>,
    auth: Option<RawAuth>,
    #[serde(default)]
    access: Vec<RawAccess>,
}

/// Looks up an environment variable; tests pass their own instead of mutating the process's.
type Env<'a> = &'a dyn Fn(&str) -> Option<String>;

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
        let server = server::validate_server(raw.server)?;
        let storage = storage::validate_storage(raw.storage, env)?;
        let upstreams = upstream::validate_upstreams(raw.upstream, env)?;
        let pins = pins::validate_pins(raw.pin, &upstreams)?;
        let cluster = raw.cluster.map(cluster::validate_cluster).transpose()?;
        let auth = auth::validate_auth(raw.auth, raw.access, &upstreams)?;
        Ok(Config {
            server,
            storage,
            upstreams,
            pins,
            cluster,
            auth,
        })
    }
}

/// Stands in for a secret in `Debug` output.
struct Redacted;

impl std::fmt::Debug for Redacted {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("<redacted>")
    }
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
        matches!(key, "password" | "secret_access_key" | "secret")
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

/// Longer than any timeout, interval or grace period means anything by: and short enough that
/// adding it to the current time never overflows.
const MAX_DURATION: Duration = Duration::from_secs(10 * 365 * 24 * 3600);

fn opt_duration(key: &str, v: &Option<String>) -> Result<Option<Duration>, ConfigError> {
    v.as_deref()
        .map(|s| {
            let d = humantime::parse_duration(s).map_err(|e| {
                invalid(
                    key,
                    format!("{s:?} is not a duration like \"30s\" or \"5m\": {e}"),
                )
            })?;
            if d > MAX_DURATION {
                return Err(invalid(key, format!("{s:?} is longer than 10 years")));
            }
            Ok(d)
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

/// A duration that must not be zero (a zero timeout fails every call).
fn positive_duration(key: &str, v: &Option<String>) -> Result<Option<Duration>, ConfigError> {
    let d = opt_duration(key, v)?;
    if d.is_some_and(|d| d.is_zero()) {
        return Err(invalid(key, "must be longer than 0s"));
    }
    Ok(d)
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

    pub(super) fn err(text: &str) -> String {
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

    /// The environment a test sees, instead of the process's.
    fn env_of(vars: &[(&str, &str)]) -> impl Fn(&str) -> Option<String> {
        let vars: Vec<(String, String)> = vars
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        move |name| vars.iter().find(|(k, _)| k == name).map(|(_, v)| v.clone())
    }

    pub(super) fn parse_env(text: &str, vars: &[(&str, &str)]) -> Result<Config, ConfigError> {
        Config::parse_with_env(text, &env_of(vars))
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
        let c = Config::parse(include_str!("../../config.example.toml")).unwrap();
        assert_eq!(c.upstreams.len(), 5);
        assert!(c.upstreams[0].default);
        assert_eq!(c.server.listen.to_string(), "127.0.0.1:5000");
        assert_eq!(c.storage.backend, StorageBackend::Fs);
    }

    /// Its commented `token_realms`, `allow` and `deny` lines, uncommented, are valid too.
    #[test]
    fn config_example_upstream_policy_lines_parse() {
        let example = include_str!("../../config.example.toml");
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
        let example = include_str!("../../config.example.toml");
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
        assert_eq!(s3.eviction_grace, Duration::from_secs(600));
    }

    /// Its commented `[cluster]` block, uncommented with either kind of member list, is valid.
    #[test]
    fn config_example_cluster_block_parses() {
        let dir = tempfile::tempdir().unwrap();
        let secret = dir.path().join("cluster-secret");
        std::fs::write(&secret, "0123456789abcdef0123\n").unwrap();
        let example = include_str!("../../config.example.toml");
        for (keep, drop) in [("peers = ", "peers_dns"), ("peers_dns = ", "peers = ")] {
            let mut text = String::new();
            let mut in_cluster = false;
            for line in example.lines() {
                in_cluster = in_cluster || line == "# [cluster]";
                let setting = line
                    .strip_prefix("# ")
                    .filter(|l| l.starts_with('[') || l.contains(" = "))
                    .filter(|l| {
                        let dropped = l.starts_with(drop)
                            || (keep == "peers = " && l.starts_with("dns_refresh"));
                        !dropped
                    });
                let line = match setting {
                    Some(l) if in_cluster && l.starts_with("secret_file = ") => {
                        format!("secret_file = {:?}", secret.display().to_string())
                    }
                    Some(l) if in_cluster => l.to_string(),
                    _ => line.to_string(),
                };
                text.push_str(&line);
                text.push('\n');
            }
            let c = Config::parse_with_env(&text, &|_| None).unwrap();
            let cluster = c.cluster.expect("a [cluster] section");
            assert_eq!(cluster.secret, b"0123456789abcdef0123", "{keep}");
            match cluster.members {
                Members::Static(list) => assert_eq!(list.len(), 3),
                Members::Dns { port, .. } => assert_eq!(port, 5000),
            }
        }
    }
}
