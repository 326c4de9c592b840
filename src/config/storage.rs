//! `[storage]`: the root, the size bounds and their `low_water` rule, the sweep, and the choice
//! of backend (the S3 table itself is validated in `s3`).

use std::path::PathBuf;
use std::time::Duration;

use serde::Deserialize;

use super::s3::{validate_s3, RawS3, S3Config};
use super::{invalid, opt_duration, opt_size, parse_size, ConfigError, Env};

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

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawStorage {
    backend: Option<String>,
    root: Option<PathBuf>,
    max_manifest_size: Option<String>,
    max_size: Option<String>,
    low_water: Option<String>,
    sweep_interval: Option<String>,
    s3: Option<RawS3>,
}

pub const DEFAULT_ROOT: &str = "./entrepot-data";
const DEFAULT_MAX_MANIFEST: u64 = 4 << 20;
const DEFAULT_SWEEP: Duration = Duration::from_secs(10 * 60);

/// `[storage]`, validated; with `backend = "s3"`, `[storage.s3]` too.
pub(super) fn validate_storage(raw: RawStorage, env: Env) -> Result<StorageConfig, ConfigError> {
    let root = raw.root.unwrap_or_else(|| PathBuf::from(DEFAULT_ROOT));
    if root.as_os_str().is_empty() {
        return Err(invalid("storage.root", "must not be empty"));
    }
    let max_manifest_size = opt_size("storage.max_manifest_size", &raw.max_manifest_size)?
        .unwrap_or(DEFAULT_MAX_MANIFEST);
    let max_size = opt_size("storage.max_size", &raw.max_size)?;
    let low_water = low_water("storage", &raw.low_water, max_size)?;
    let sweep_interval =
        opt_duration("storage.sweep_interval", &raw.sweep_interval)?.unwrap_or(DEFAULT_SWEEP);
    if sweep_interval.is_zero() {
        return Err(invalid("storage.sweep_interval", "must be longer than 0s"));
    }
    let backend = match (raw.backend.as_deref().unwrap_or("fs"), raw.s3) {
        ("fs", None) => StorageBackend::Fs,
        ("fs", Some(_)) => return Err(invalid(
            "storage.s3",
            "is set but storage.backend is \"fs\" (set backend = \"s3\" or remove [storage.s3])",
        )),
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
    Ok(StorageConfig {
        backend,
        root,
        max_manifest_size,
        max_size,
        low_water,
        sweep_interval,
    })
}

/// `{table}.low_water`: a size or a percentage of `{table}.max_size`, 90% of it by default.
pub(super) fn low_water(
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::tests::{err, parse_env};
    use crate::config::Config;

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
    fn builtin_and_plain_storage_use_the_filesystem() {
        assert_eq!(Config::builtin().storage.backend, StorageBackend::Fs);
        let c = parse_env("[storage]\nroot = \"/x\"", &[]).unwrap();
        assert_eq!(c.storage.backend, StorageBackend::Fs);
        let c = parse_env("[storage]\nbackend = \"fs\"", &[]).unwrap();
        assert_eq!(c.storage.backend, StorageBackend::Fs);
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
}
