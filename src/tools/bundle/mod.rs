//! `entrepot export` / `entrepot import`: carry images across an air gap as an OCI image layout
//! tar (which `skopeo copy oci-archive:...` reads too), whole or as a delta since a journal
//! marker. An import is work in progress as a value (`import::Staging`): every blob is hashed
//! while it is extracted into `<root>/tmp/import-*`, the images are checked for completeness, and
//! only then does anything enter the store; a refused bundle leaves the store as it was.
//!
//! # Bundle
//!
//! ```text
//! oci-layout             {"imageLayoutVersion": "1.0.0"}
//! entrepot-bundle.json   {"format": "entrepot-bundle", "version": 1, "since": S, "marker": M,
//!                         "upstreams": [...], "images": N, "blobs": B, "bytes": ...}
//! index.json             an OCI index: one descriptor per exported tag (or digest pin)
//! blobs/<alg>/<hex>      manifests, indexes, configs and layers
//! ```
//!
//! Each index.json descriptor names its image in `org.opencontainers.image.ref.name` with the
//! full name (`docker.io/library/alpine:3.20`; containers/image accepts it, so
//! `skopeo copy oci-archive:bundle.tar:docker.io/library/alpine:3.20 ...` works), and, so the
//! name survives whatever another tool makes of that one, in `io.entrepot.upstream`,
//! `io.entrepot.repository` and `io.entrepot.tag` (no tag: an image pinned by digest).
//!
//! A delta (`--since SEQ`) holds what the journal recorded after SEQ for the selected images:
//! the tags that moved, and the blobs and manifests committed since. It lists an image when its
//! tag moved or some of its content is new; the rest of its closure is expected on the receiving
//! site (from the earlier bundle), and `import` checks that it is there before committing.
//!
//! This file holds the arguments, the errors, the format's names and the tar checks `import`
//! makes before reading; `closure` walks images and names them, `export` and `import` do the rest.

use std::fs::File;
use std::io::{self, Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

use crate::oci::Digest;
use crate::tools::maintenance::{self, Target};

mod closure;
mod export;
mod import;

pub use export::{export, run_export};
pub use import::{import, run_import};

/// The image's full name, `upstream/repository:tag` (or `@digest`).
pub const ANN_REF_NAME: &str = "org.opencontainers.image.ref.name";
/// The upstream (entrepot's configured name) the image came from.
pub const ANN_UPSTREAM: &str = "io.entrepot.upstream";
pub const ANN_REPOSITORY: &str = "io.entrepot.repository";
/// Absent for an image pinned by digest.
pub const ANN_TAG: &str = "io.entrepot.tag";
/// containerd's `ctr images import` names images by this one.
const ANN_CONTAINERD_NAME: &str = "io.containerd.image.name";

const LAYOUT_FILE: &str = "oci-layout";
const INDEX_FILE: &str = "index.json";
pub const BUNDLE_FILE: &str = "entrepot-bundle.json";
const FORMAT: &str = "entrepot-bundle";
const FORMAT_VERSION: u32 = 1;
/// Manifests are read whole; without a configuration, the server's default limit.
const DEFAULT_MANIFEST_CAP: u64 = 4 << 20;
const COPY_BUF: usize = 256 << 10;

/// Arguments of `entrepot export`.
#[derive(Debug, clap::Args)]
pub struct ExportArgs {
    /// Where to write the bundle (an OCI image layout tar). Written as <FILE>.tmp, then renamed.
    #[arg(long, short, value_name = "FILE")]
    pub out: PathBuf,
    /// Images to export, e.g. docker.io/library/alpine:3.20 or ghcr.io/org/app@sha256:...
    /// (default: every pinned image: the store's pins and the configuration's [[pin]]).
    #[arg(value_name = "IMAGE")]
    pub images: Vec<String>,
    /// Incremental: only what the store's journal recorded after this marker (the `marker:`
    /// line an earlier export printed). The receiving site must have imported that export.
    #[arg(long, value_name = "SEQ")]
    pub since: Option<u64>,
    #[command(flatten)]
    pub store: maintenance::StoreArgs,
}

/// Arguments of `entrepot import`.
#[derive(Debug, clap::Args)]
pub struct ImportArgs {
    /// The bundle written by `entrepot export` (or any OCI image layout tar whose images are
    /// named registry/repository:tag).
    /// The store (`--root`) is created if missing.
    #[arg(value_name = "BUNDLE")]
    pub bundle: PathBuf,
    #[command(flatten)]
    pub store: maintenance::StoreArgs,
}

/// Why an export was not written.
#[derive(Debug, thiserror::Error)]
pub enum ExportError {
    #[error("{0}")]
    Usage(String),
    /// Selected images that are missing from the store or incomplete in it, one line each.
    #[error("cannot export, the store does not hold every selected image:\n  {}", .0.join("\n  "))]
    NotInStore(Vec<String>),
    #[error("stored blob {digest} is corrupt (its content hashes to {actual}); run `entrepot cache verify`")]
    Corrupt {
        digest: Digest,
        /// Boxed: two digests inline made every `Result` of an export 144 bytes.
        actual: Box<Digest>,
    },
    #[error("{context}")]
    Io {
        context: String,
        #[source]
        source: io::Error,
    },
}

/// Why an import did not happen.
#[derive(Debug, thiserror::Error)]
pub enum ImportError {
    #[error("{0}")]
    Usage(String),
    /// The bundle is damaged, altered, incomplete or not a bundle. Nothing was imported.
    #[error(transparent)]
    Refused(#[from] Problem),
    #[error("{context}")]
    Io {
        context: String,
        #[source]
        source: io::Error,
    },
}

/// What is wrong with a bundle.
#[derive(Debug, thiserror::Error)]
pub enum Problem {
    /// Not a tar archive, or one that breaks off.
    #[error("not a complete tar archive ({0})")]
    Damaged(String),
    #[error("the bundle is truncated: {0}")]
    Truncated(String),
    /// A blob's content does not hash to the digest it is filed under.
    #[error("{path} does not match its digest (its content hashes to {actual}): the bundle was altered or damaged")]
    Altered { path: String, actual: Digest },
    /// A manifest needs a blob that neither the bundle nor the store holds.
    #[error("{needed_by} needs {digest}, which is neither in the bundle nor in the store{hint}")]
    Missing {
        needed_by: String,
        digest: Digest,
        hint: String,
    },
    #[error("{digest} is {actual} bytes, but {described_by} says {expected}")]
    Size {
        digest: Digest,
        actual: u64,
        expected: u64,
        described_by: String,
    },
    /// Anything else that makes the bundle unusable (bad index.json, names, manifests).
    #[error("{0}")]
    Invalid(String),
}

fn io_ctx(context: impl Into<String>) -> impl FnOnce(io::Error) -> ExportError {
    let context = context.into();
    move |source| ExportError::Io { context, source }
}

fn imp_io(context: impl Into<String>) -> impl FnOnce(io::Error) -> ImportError {
    let context = context.into();
    move |source| ImportError::Io { context, source }
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_secs()
}

/// The configured name of the upstream `name` selects (an alias maps to its upstream).
fn upstream_name(t: &Target, name: &str) -> String {
    t.upstream_name(name)
}

fn manifest_cap(t: &Target) -> u64 {
    t.config
        .as_ref()
        .map_or(DEFAULT_MANIFEST_CAP, |c| c.storage.max_manifest_size)
}

/// `entrepot-bundle.json`: what kind of bundle this is.
#[derive(Debug, Serialize, Deserialize)]
struct BundleInfo {
    format: String,
    version: u32,
    /// 0 for a full bundle; the `--since` marker for a delta.
    since: u64,
    /// The source store's journal position when the bundle was written: the next delta's
    /// `--since`.
    marker: u64,
    /// Unix seconds.
    created: u64,
    /// The upstream names of the images in the bundle, as the source store calls them.
    upstreams: Vec<String>,
    images: usize,
    /// How many blobs the archive holds (a bundle cut short at an entry boundary shows here).
    blobs: usize,
    bytes: u64,
}

// ---------------------------------------------------------------------------------------------
// The archive, as `import` reads it

/// An entry's path as a relative name (`./` and trailing `/` dropped); anything that could
/// point outside the layout is refused.
fn entry_name(raw: &Path) -> Result<String, Problem> {
    let mut parts = Vec::new();
    for c in raw.components() {
        match c {
            std::path::Component::Normal(p) => parts.push(p.to_string_lossy().into_owned()),
            std::path::Component::CurDir => {}
            _ => {
                return Err(Problem::Invalid(format!(
                    "entry {:?} points outside the layout",
                    raw.display().to_string()
                )))
            }
        }
    }
    Ok(parts.join("/"))
}

/// A tar archive starts with a header and ends with two zero blocks; one cut short at an entry
/// boundary does not.
fn check_end(file: &mut File) -> Result<(), ImportError> {
    let len = file
        .metadata()
        .map_err(imp_io("cannot read the bundle"))?
        .len();
    if len < 1024 {
        return Err(Problem::Damaged(format!("{len} bytes is too short for a tar archive")).into());
    }
    if len % 512 != 0 {
        return Err(Problem::Truncated(format!(
            "{len} bytes is not a whole number of 512-byte tar blocks"
        ))
        .into());
    }
    // The first header's checksum tells a tar archive from anything else.
    let mut head = [0u8; 512];
    file.read_exact(&mut head)
        .map_err(imp_io("cannot read the bundle"))?;
    let sum = head[..148]
        .iter()
        .chain(&head[156..])
        .map(|b| u32::from(*b))
        .sum::<u32>()
        + 8 * u32::from(b' ');
    if tar::Header::from_byte_slice(&head).cksum().ok() != Some(sum) {
        return Err(Problem::Damaged("it does not start with a tar header".to_string()).into());
    }
    let mut tail = [0u8; 1024];
    file.seek(SeekFrom::End(-1024))
        .and_then(|_| file.read_exact(&mut tail))
        .and_then(|_| file.seek(SeekFrom::Start(0)))
        .map_err(imp_io("cannot read the bundle"))?;
    if tail.iter().any(|b| *b != 0) {
        return Err(Problem::Truncated(
            "it does not end with the tar end-of-archive marker".to_string(),
        )
        .into());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entry_names_stay_inside_the_layout() {
        assert_eq!(
            entry_name(Path::new("./blobs/sha256/ab")).unwrap(),
            "blobs/sha256/ab"
        );
        assert_eq!(entry_name(Path::new("index.json")).unwrap(), "index.json");
        assert!(entry_name(Path::new("../etc/passwd")).is_err());
        assert!(entry_name(Path::new("/etc/passwd")).is_err());
    }
}
