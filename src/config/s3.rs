//! `[storage.s3]`: endpoint, bucket, prefix, credentials (from the file, a secret file or the
//! environment), the bucket's bounds and timeouts; `Debug` never shows the secret.

use std::path::PathBuf;
use std::time::Duration;

use serde::Deserialize;
use url::Url;

use super::storage::low_water;
use super::{invalid, opt_size, parse_url, positive_duration, ConfigError, Env, Redacted};

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
    /// Bucket eviction deletes what it chose this long after choosing it, and only what no
    /// replica used meanwhile (`eviction_grace`; `0s`: at once).
    pub eviction_grace: Duration,
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
            .field("eviction_grace", &self.eviction_grace)
            .finish()
    }
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawS3 {
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
    eviction_grace: Option<String>,
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

const DEFAULT_S3_REGION: &str = "us-east-1";
const DEFAULT_S3_CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
const DEFAULT_S3_REQUEST_TIMEOUT: Duration = Duration::from_secs(30);
const DEFAULT_S3_RETRIES: u32 = 3;
/// Longer than any upload of a live writer (parts are bounded by the request timeout).
const DEFAULT_ABANDONED_UPLOADS_AFTER: Duration = Duration::from_secs(3600);
/// Longer than replicas take to share their use stamps (`SHARE_USAGE_EVERY`) plus a long copy
/// from the bucket into a local tier.
const DEFAULT_EVICTION_GRACE: Duration = Duration::from_secs(600);

pub(super) fn validate_s3(s3: RawS3, env: Env) -> Result<S3Config, ConfigError> {
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
        eviction_grace: super::opt_duration(&key("eviction_grace"), &s3.eviction_grace)?
            .unwrap_or(DEFAULT_EVICTION_GRACE),
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::tests::parse_env;
    use crate::config::{Config, StorageBackend};

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
                eviction_grace = "30s"
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
                eviction_grace: Duration::from_secs(30),
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
                eviction_grace: Duration::from_secs(600),
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
}
