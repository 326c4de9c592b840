//! `entrepot export` / `entrepot import`: carry images across an air gap as an OCI image layout
//! tar (which `skopeo copy oci-archive:...` reads too), whole or as a delta since a journal
//! marker. An import is work in progress as a value ([`Staging`]): every blob is hashed while
//! it is extracted into `<root>/tmp/import-*`, the images are checked for completeness, and only
//! then does anything enter the store; a refused bundle leaves the store as it was.
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

use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::ffi::OsString;
use std::fs::File;
use std::io::{self, BufReader, BufWriter, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

use crate::cache::journal::{self, Entry, Journal};
use crate::cache::{manifests, pins, tags};
use crate::config::{parse_image_ref, PinConfig};
use crate::maintenance::{self, human_size, Target};
use crate::oci::{media, Algorithm, Digest, Hasher, Reference, RepoName, Tag};

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
    Corrupt { digest: Digest, actual: Digest },
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

fn blob_path(root: &Path, d: &Digest) -> PathBuf {
    root.join("blobs")
        .join(d.algorithm().as_str())
        .join(d.hex())
}

fn exists(path: &Path) -> io::Result<bool> {
    match std::fs::metadata(path) {
        Ok(_) => Ok(true),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(false),
        Err(e) => Err(e),
    }
}

/// The configured name of the upstream `name` selects (an alias maps to its upstream).
fn upstream_name(t: &Target, name: &str) -> String {
    t.config
        .as_ref()
        .and_then(|c| c.upstreams.iter().find(|u| u.matches(name)))
        .map_or_else(|| name.to_string(), |u| u.name.clone())
}

fn manifest_cap(t: &Target) -> u64 {
    t.config
        .as_ref()
        .map_or(DEFAULT_MANIFEST_CAP, |c| c.storage.max_manifest_size)
}

// ---------------------------------------------------------------------------------------------
// Closures: what an image needs, walked the same way for export (from the store) and import
// (from the bundle, then the store).

/// Where blobs are read from while walking an image.
trait Source {
    /// The blob's size, if it is here.
    fn size(&self, d: &Digest) -> io::Result<Option<u64>>;
    fn open(&self, d: &Digest) -> io::Result<File>;
}

struct StoreSource<'a> {
    root: &'a Path,
}

impl Source for StoreSource<'_> {
    fn size(&self, d: &Digest) -> io::Result<Option<u64>> {
        match std::fs::metadata(blob_path(self.root, d)) {
            Ok(m) => Ok(Some(m.len())),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e),
        }
    }

    fn open(&self, d: &Digest) -> io::Result<File> {
        File::open(blob_path(self.root, d))
    }
}

/// One descriptor in a manifest: what it points at, as the manifest describes it.
#[derive(Debug, PartialEq)]
struct Child {
    digest: Digest,
    /// A platform manifest of an index (the rest are blobs: configs, layers).
    manifest: bool,
    media_type: Option<String>,
    size: Option<u64>,
}

/// The descriptors of a manifest or index: config, layers, platform manifests, artifact blobs
/// and schema 1's fsLayers. `subject` is not followed (a signature does not own its image).
fn children(body: &[u8]) -> Result<Vec<Child>, String> {
    let v: serde_json::Value =
        serde_json::from_slice(body).map_err(|e| format!("not valid JSON ({e})"))?;
    if !v.is_object() {
        return Err("not a JSON object".to_string());
    }
    let mut out = Vec::new();
    let mut push = |item: &serde_json::Value, key: &str, manifest: bool| -> Result<(), String> {
        let raw = item
            .get(key)
            .and_then(|d| d.as_str())
            .ok_or_else(|| format!("a descriptor without a {key}"))?;
        let digest = raw.parse().map_err(|e| format!("digest {raw:?}: {e}"))?;
        out.push(Child {
            digest,
            manifest,
            media_type: item
                .get("mediaType")
                .and_then(|m| m.as_str())
                .map(str::to_string),
            size: item.get("size").and_then(|s| s.as_u64()),
        });
        Ok(())
    };
    if let Some(config) = v.get("config") {
        push(config, "digest", false)?;
    }
    for (key, manifest) in [("layers", false), ("blobs", false), ("manifests", true)] {
        for item in v.get(key).and_then(|l| l.as_array()).into_iter().flatten() {
            push(item, "digest", manifest)?;
        }
    }
    for item in v
        .get("fsLayers")
        .and_then(|l| l.as_array())
        .into_iter()
        .flatten()
    {
        push(item, "blobSum", false)?;
    }
    Ok(out)
}

/// Everything some images need.
#[derive(Debug, Default)]
struct Closure {
    /// Every digest, with its size.
    blobs: BTreeMap<Digest, u64>,
    /// The manifests among them, with the media type they were referenced with: the root's
    /// from its descriptor, a platform manifest's from its index, else the body's own.
    manifests: BTreeMap<Digest, String>,
}

impl Closure {
    fn extend(&mut self, other: &Closure) {
        self.blobs
            .extend(other.blobs.iter().map(|(d, s)| (d.clone(), *s)));
        self.manifests
            .extend(other.manifests.iter().map(|(d, m)| (d.clone(), m.clone())));
    }
}

/// Why a walk stopped.
#[derive(Debug)]
enum WalkError {
    Missing {
        digest: Digest,
        /// The manifest that references it (`None`: the image's own manifest).
        parent: Option<Digest>,
    },
    Size {
        digest: Digest,
        actual: u64,
        expected: u64,
        parent: Option<Digest>,
    },
    BadManifest {
        digest: Digest,
        why: String,
    },
    Io(io::Error),
}

/// Walks the image whose manifest (or index) is `root`: every digest it needs must be in
/// `src`, with the size its descriptor gives.
fn walk(
    src: &impl Source,
    root: &Digest,
    media_type: &str,
    size: Option<u64>,
    cap: u64,
) -> Result<Closure, WalkError> {
    struct Item {
        child: Child,
        parent: Option<Digest>,
    }
    let mut c = Closure::default();
    let mut stack = vec![Item {
        child: Child {
            digest: root.clone(),
            manifest: true,
            media_type: Some(media_type.to_string()),
            size,
        },
        parent: None,
    }];
    while let Some(Item { child, parent }) = stack.pop() {
        let seen = if child.manifest {
            c.manifests.contains_key(&child.digest)
        } else {
            c.blobs.contains_key(&child.digest)
        };
        if seen {
            continue;
        }
        let actual = src
            .size(&child.digest)
            .map_err(WalkError::Io)?
            .ok_or_else(|| WalkError::Missing {
                digest: child.digest.clone(),
                parent: parent.clone(),
            })?;
        if let Some(expected) = child.size.filter(|e| *e != actual) {
            return Err(WalkError::Size {
                digest: child.digest,
                actual,
                expected,
                parent,
            });
        }
        if child.manifest {
            if actual > cap {
                return Err(WalkError::BadManifest {
                    digest: child.digest,
                    why: format!("{actual} bytes, more than the {cap}-byte limit for manifests"),
                });
            }
            let mut body = Vec::with_capacity(actual as usize);
            src.open(&child.digest)
                .and_then(|f| f.take(cap).read_to_end(&mut body))
                .map_err(WalkError::Io)?;
            let kids = children(&body).map_err(|why| WalkError::BadManifest {
                digest: child.digest.clone(),
                why,
            })?;
            let media_type = child
                .media_type
                .filter(|m| !m.is_empty())
                .or_else(|| media::sniff(&body))
                .unwrap_or_else(|| media::OCI_MANIFEST.to_string());
            c.manifests.insert(child.digest.clone(), media_type);
            stack.extend(kids.into_iter().map(|k| Item {
                child: k,
                parent: Some(child.digest.clone()),
            }));
        }
        c.blobs.insert(child.digest, actual);
    }
    Ok(c)
}

// ---------------------------------------------------------------------------------------------
// index.json and entrepot-bundle.json

#[derive(Debug, Serialize, Deserialize)]
struct Descriptor {
    #[serde(rename = "mediaType", default)]
    media_type: String,
    digest: String,
    size: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    annotations: Option<BTreeMap<String, String>>,
}

#[derive(Debug, Serialize, Deserialize)]
struct Index {
    #[serde(rename = "schemaVersion")]
    schema_version: u32,
    #[serde(rename = "mediaType", default, skip_serializing_if = "Option::is_none")]
    media_type: Option<String>,
    manifests: Vec<Descriptor>,
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

fn annotations(name: &PinConfig) -> BTreeMap<String, String> {
    let full = pins::format(name);
    let mut a = BTreeMap::from([
        (ANN_REF_NAME.to_string(), full.clone()),
        (ANN_CONTAINERD_NAME.to_string(), full),
        (ANN_UPSTREAM.to_string(), name.upstream.clone()),
        (ANN_REPOSITORY.to_string(), name.repo.to_string()),
    ]);
    if let Reference::Tag(t) = &name.reference {
        a.insert(ANN_TAG.to_string(), t.to_string());
    }
    a
}

/// An upstream name that is safe as a folder name (the configuration's rule).
fn valid_upstream(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 253
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b".-:".contains(&b))
        && name.as_bytes()[0].is_ascii_alphanumeric()
}

/// The name a descriptor files its image under: entrepot's annotations, else a full
/// `registry/repository:tag` in `org.opencontainers.image.ref.name` whose registry looks like
/// a host or is an upstream this site configures.
fn descriptor_name(t: &Target, desc: &Descriptor, digest: &Digest) -> Result<PinConfig, String> {
    let ann = desc.annotations.clone().unwrap_or_default();
    let mut name = if let (Some(up), Some(repo)) = (ann.get(ANN_UPSTREAM), ann.get(ANN_REPOSITORY))
    {
        let repo: RepoName = repo
            .parse()
            .map_err(|e| format!("{ANN_REPOSITORY} {repo:?}: {e}"))?;
        let reference = match ann.get(ANN_TAG) {
            Some(tag) => Reference::Tag(
                tag.parse::<Tag>()
                    .map_err(|e| format!("{ANN_TAG} {tag:?}: {e}"))?,
            ),
            None => Reference::Digest(digest.clone()),
        };
        PinConfig {
            upstream: up.clone(),
            repo,
            reference,
        }
    } else {
        let full = ann.get(ANN_REF_NAME).ok_or_else(|| {
            format!("no name: entrepot needs {ANN_UPSTREAM}/{ANN_REPOSITORY} or a full registry/repository:tag in {ANN_REF_NAME}")
        })?;
        let p = parse_image_ref(full)?;
        let host_like = p.upstream.contains(['.', ':']) || p.upstream == "localhost";
        let configured = t
            .config
            .as_ref()
            .is_some_and(|c| c.upstreams.iter().any(|u| u.matches(&p.upstream)));
        if !host_like && !configured {
            return Err(format!(
                "{ANN_REF_NAME} {full:?} does not start with a registry (a host name, or an upstream of this site's configuration)"
            ));
        }
        p
    };
    if !valid_upstream(&name.upstream) {
        return Err(format!(
            "upstream {:?} is not a registry name (lower-case letters, digits, '.', '-', ':')",
            name.upstream
        ));
    }
    if let Reference::Digest(d) = &name.reference {
        if d != digest {
            return Err(format!(
                "named by digest {d} but the descriptor is {digest}"
            ));
        }
    }
    name.upstream = upstream_name(t, &name.upstream);
    Ok(name)
}

// ---------------------------------------------------------------------------------------------
// Export

/// An image chosen for export, resolved in the store.
struct Image {
    name: PinConfig,
    digest: Digest,
    media_type: String,
    size: u64,
    closure: Closure,
}

pub fn export(args: ExportArgs) -> anyhow::Result<ExitCode> {
    let target = args.store.target()?;
    let mut stdout = io::stdout().lock();
    run_export(&target, &args, &mut stdout)?;
    Ok(ExitCode::SUCCESS)
}

/// Writes the bundle `args` asks for and prints a summary whose last line is `marker: SEQ`.
pub fn run_export(t: &Target, args: &ExportArgs, out: &mut impl Write) -> Result<(), ExportError> {
    let root = &t.root;
    if !root.join("blobs").is_dir() {
        return Err(ExportError::Usage(format!(
            "{} is not an entrepot store (no blobs/ folder)",
            root.display()
        )));
    }
    // Read before anything else: whatever commits after this is sent again by the next delta.
    let marker =
        journal::last_seq(&journal::path(root)).map_err(io_ctx("cannot read the journal"))?;
    if let Some(since) = args.since.filter(|s| *s > marker) {
        return Err(ExportError::Usage(format!(
            "--since {since} is past this store's journal (its last entry is {marker}): was that marker printed by an export of this store?"
        )));
    }
    let cap = manifest_cap(t);
    let src = StoreSource { root };
    let mut problems = Vec::new();
    let mut images = Vec::new();
    for name in selection(t, &args.images)? {
        let full = pins::format(&name);
        let (digest, media_type) = match resolve(root, &name) {
            Ok(r) => r,
            Err(p) => {
                problems.push(format!("{full}: {p}"));
                continue;
            }
        };
        match walk(&src, &digest, &media_type, None, cap) {
            Ok(closure) => images.push(Image {
                size: closure.blobs[&digest],
                name,
                digest,
                media_type,
                closure,
            }),
            Err(WalkError::Io(e)) => {
                return Err(io_ctx(format!("cannot read {full} from the store"))(e))
            }
            Err(WalkError::Missing { digest, parent }) => problems.push(format!(
                "{full}: incomplete in the store: {digest}{} is missing (pull it, or `entrepot prefetch {full}`)",
                parent.map(|p| format!(" (needed by {p})")).unwrap_or_default()
            )),
            Err(WalkError::Size { digest, actual, expected, .. }) => problems.push(format!(
                "{full}: stored {digest} is {actual} bytes, its manifest says {expected}"
            )),
            Err(WalkError::BadManifest { digest, why }) => {
                problems.push(format!("{full}: stored manifest {digest}: {why}"))
            }
        }
    }
    if !problems.is_empty() {
        return Err(ExportError::NotInStore(problems));
    }

    let mut blobs = Closure::default();
    if let Some(since) = args.since {
        let (fresh, moved) = journal_since(root, since)?;
        images.retain(|i| {
            let tag_moved = match &i.name.reference {
                Reference::Tag(tag) => moved.contains(&(
                    i.name.upstream.clone(),
                    i.name.repo.to_string(),
                    tag.to_string(),
                )),
                Reference::Digest(_) => false,
            };
            tag_moved || i.closure.blobs.keys().any(|d| fresh.contains(d))
        });
        for i in &images {
            for (d, s) in &i.closure.blobs {
                if fresh.contains(d) {
                    blobs.blobs.insert(d.clone(), *s);
                }
            }
        }
    } else {
        for i in &images {
            blobs.extend(&i.closure);
        }
    }

    let bytes: u64 = blobs.blobs.values().sum();
    let info = BundleInfo {
        format: FORMAT.to_string(),
        version: FORMAT_VERSION,
        since: args.since.unwrap_or(0),
        marker,
        created: unix_now(),
        upstreams: images
            .iter()
            .map(|i| i.name.upstream.clone())
            .collect::<BTreeSet<_>>()
            .into_iter()
            .collect(),
        images: images.len(),
        blobs: blobs.blobs.len(),
        bytes,
    };
    let index = Index {
        schema_version: 2,
        media_type: Some(media::OCI_INDEX.to_string()),
        manifests: images
            .iter()
            .map(|i| Descriptor {
                media_type: i.media_type.clone(),
                digest: i.digest.to_string(),
                size: i.size,
                annotations: Some(annotations(&i.name)),
            })
            .collect(),
    };
    write_bundle(root, &args.out, &info, &index, &blobs)?;

    let what = match args.since {
        Some(s) => format!("changes since {s}"),
        None => "full bundle".to_string(),
    };
    let write = |out: &mut dyn Write| -> io::Result<()> {
        writeln!(
            out,
            "exported {} image(s) to {} ({what}): {} blob(s), {}",
            images.len(),
            args.out.display(),
            blobs.blobs.len(),
            human_size(bytes)
        )?;
        for i in &images {
            writeln!(out, "  {}  {}", pins::format(&i.name), i.digest)?;
        }
        writeln!(out, "marker: {marker}")
    };
    write(out).map_err(io_ctx("cannot write to stdout"))
}

/// The images to export, named as the store names them: the arguments, else every pin.
fn selection(t: &Target, images: &[String]) -> Result<Vec<PinConfig>, ExportError> {
    let names: Vec<PinConfig> = if images.is_empty() {
        let mut p = t
            .config
            .as_ref()
            .map(|c| c.pins.clone())
            .unwrap_or_default();
        p.extend(pins::load(&t.root).map_err(io_ctx("cannot read the store's pins"))?);
        if p.is_empty() {
            return Err(ExportError::Usage(
                "nothing to export: no IMAGE given and no image is pinned (pin with [[pin]] in the configuration or `entrepot prefetch`)".to_string(),
            ));
        }
        p
    } else {
        images
            .iter()
            .map(|s| parse_image_ref(s))
            .collect::<Result<_, _>>()
            .map_err(ExportError::Usage)?
    };
    let mut out: Vec<PinConfig> = Vec::new();
    for mut n in names {
        n.upstream = upstream_name(t, &n.upstream);
        if !out.contains(&n) {
            out.push(n);
        }
    }
    Ok(out)
}

/// The stored manifest an image name points at, and its media type.
fn resolve(root: &Path, name: &PinConfig) -> Result<(Digest, String), String> {
    let (digest, media_type) = match &name.reference {
        Reference::Tag(tag) => {
            let path = tags::record_path(root, &name.upstream, &name.repo, tag);
            let text = std::fs::read(&path).map_err(|e| match e.kind() {
                io::ErrorKind::NotFound => {
                    "not in the store (no tag record; pull it or `entrepot prefetch` it)"
                        .to_string()
                }
                _ => format!("cannot read {}: {e}", path.display()),
            })?;
            let rec: tags::TagRecord = serde_json::from_slice(&text)
                .map_err(|e| format!("unreadable tag record {}: {e}", path.display()))?;
            let digest: Digest = rec
                .digest
                .parse()
                .map_err(|e| format!("tag record {}: {e}", path.display()))?;
            (digest, Some(rec.media_type).filter(|m| !m.is_empty()))
        }
        Reference::Digest(d) => (d.clone(), None),
    };
    let stored_type = std::fs::read_to_string(manifests::meta_path(root, &digest))
        .map_err(|_| format!("manifest {digest} is not in the store"))?;
    Ok((
        digest,
        media_type.unwrap_or_else(|| stored_type.trim().to_string()),
    ))
}

/// What the journal recorded after `since`: the digests committed (blobs and manifests) and
/// the tags that moved, as (upstream, repository, tag).
type Moved = HashSet<(String, String, String)>;

fn journal_since(root: &Path, since: u64) -> Result<(HashSet<Digest>, Moved), ExportError> {
    let mut fresh = HashSet::new();
    let mut moved = HashSet::new();
    for line in journal::read_since(root, since).map_err(io_ctx("cannot read the journal"))? {
        match line.entry {
            Entry::Blob { digest } | Entry::Manifest { digest, .. } => {
                if let Ok(d) = digest.parse() {
                    fresh.insert(d);
                }
            }
            Entry::Tag {
                upstream,
                repo,
                tag,
                ..
            } => {
                moved.insert((upstream, repo, tag));
            }
        }
    }
    Ok((fresh, moved))
}

/// The bundle being written: `<out>.tmp` until `commit` renames it to `<out>`. Dropped
/// uncommitted (a failed export), it is removed, so no half bundle is ever left behind.
struct PartialFile {
    tmp: PathBuf,
    dest: PathBuf,
    file: File,
    committed: bool,
}

impl PartialFile {
    fn create(dest: &Path) -> io::Result<PartialFile> {
        let mut tmp = OsString::from(dest.as_os_str());
        tmp.push(".tmp");
        let tmp = PathBuf::from(tmp);
        let file = File::create(&tmp)?;
        Ok(PartialFile {
            tmp,
            dest: dest.to_path_buf(),
            file,
            committed: false,
        })
    }

    fn commit(mut self) -> io::Result<()> {
        self.file.sync_all()?;
        std::fs::rename(&self.tmp, &self.dest)?;
        self.committed = true;
        Ok(())
    }
}

impl Drop for PartialFile {
    fn drop(&mut self) {
        if !self.committed {
            let _ = std::fs::remove_file(&self.tmp);
        }
    }
}

/// Hashes and counts what is read through it.
struct HashingReader<R> {
    inner: R,
    hasher: Hasher,
    read: u64,
}

impl<R: Read> Read for HashingReader<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.hasher.update(&buf[..n]);
        self.read += n as u64;
        Ok(n)
    }
}

fn file_header(size: u64, mtime: u64) -> tar::Header {
    let mut h = tar::Header::new_gnu();
    h.set_entry_type(tar::EntryType::Regular);
    h.set_size(size);
    h.set_mode(0o644);
    h.set_mtime(mtime);
    h
}

fn write_bundle(
    root: &Path,
    out: &Path,
    info: &BundleInfo,
    index: &Index,
    blobs: &Closure,
) -> Result<(), ExportError> {
    let out_ctx = || format!("cannot write {}", out.display());
    let partial =
        PartialFile::create(out).map_err(io_ctx(format!("cannot create {}.tmp", out.display())))?;
    let mut tar = tar::Builder::new(BufWriter::with_capacity(1 << 20, &partial.file));
    let now = info.created;
    let small: [(&str, Vec<u8>); 3] = [
        (LAYOUT_FILE, br#"{"imageLayoutVersion":"1.0.0"}"#.to_vec()),
        (
            BUNDLE_FILE,
            serde_json::to_vec_pretty(info).expect("bundle info serializes"),
        ),
        (
            INDEX_FILE,
            serde_json::to_vec(index).expect("index serializes"),
        ),
    ];
    for (name, data) in small {
        let mut h = file_header(data.len() as u64, now);
        tar.append_data(&mut h, name, data.as_slice())
            .map_err(io_ctx(out_ctx()))?;
    }
    for digest in blobs.blobs.keys() {
        let path = blob_path(root, digest);
        let file = File::open(&path).map_err(io_ctx(format!(
            "cannot read {digest} from the store (evicted while exporting?)"
        )))?;
        let len = file
            .metadata()
            .map_err(io_ctx(format!("cannot read {}", path.display())))?
            .len();
        // tar copies through `&mut dyn Read` in 8 KiB reads: buffer the file below the hasher
        // so the disk sees large reads.
        let mut reader = HashingReader {
            inner: BufReader::with_capacity(COPY_BUF, file.take(len)),
            hasher: Hasher::new(digest.algorithm()),
            read: 0,
        };
        let mut h = file_header(len, now);
        let name = format!("blobs/{}/{}", digest.algorithm().as_str(), digest.hex());
        tar.append_data(&mut h, &name, &mut reader)
            .map_err(io_ctx(out_ctx()))?;
        if reader.read != len {
            return Err(ExportError::Io {
                context: format!("{digest} shrank while it was exported"),
                source: io::ErrorKind::UnexpectedEof.into(),
            });
        }
        let actual = reader.hasher.finish();
        if actual != *digest {
            return Err(ExportError::Corrupt {
                digest: digest.clone(),
                actual,
            });
        }
    }
    let buffered = tar.into_inner().map_err(io_ctx(out_ctx()))?;
    buffered
        .into_inner()
        .map_err(|e| io_ctx(out_ctx())(e.into_error()))?;
    partial.commit().map_err(io_ctx(out_ctx()))
}

// ---------------------------------------------------------------------------------------------
// Import

pub fn import(args: ImportArgs) -> anyhow::Result<ExitCode> {
    let target = args.store.target()?;
    // A store that exists may have a server on it: importing beside it would race its journal
    // numbering and its in-memory tags. (A store that does not exist yet has no server.)
    let _lock = if target.root.is_dir() {
        Some(crate::cache::lock::acquire(&target.root)?)
    } else {
        None
    };
    let mut stdout = io::stdout().lock();
    run_import(&target, &args.bundle, &mut stdout).map_err(|e| {
        let bundle = args.bundle.display();
        let context = match &e {
            ImportError::Refused(_) => {
                format!("refused {bundle}: nothing was imported, the store is unchanged")
            }
            _ => format!("import of {bundle} failed"),
        };
        anyhow::Error::new(e).context(context)
    })?;
    Ok(ExitCode::SUCCESS)
}

/// A verified blob waiting in the staging folder.
struct Staged {
    size: u64,
    /// `None`: verified, but the store already has it, so it was not kept.
    file: Option<PathBuf>,
}

/// An import in progress: verified blobs in `<root>/tmp/import-*`. Dropping it removes them
/// (and the store folders it had to create); `commit` moves them into the store.
struct Staging {
    root: PathBuf,
    dir: PathBuf,
    /// Folders created for this import, removed again (if empty) when it is refused.
    created: Vec<PathBuf>,
    blobs: BTreeMap<Digest, Staged>,
}

static STAGING_SEQ: AtomicU64 = AtomicU64::new(0);

/// Small files of the layout, read whole.
#[derive(Default)]
struct LayoutFiles {
    layout: Option<Vec<u8>>,
    index: Option<Vec<u8>>,
    info: Option<Vec<u8>>,
}

impl Staging {
    fn create(root: &Path) -> Result<Staging, ImportError> {
        let mut created = Vec::new();
        match std::fs::read_dir(root) {
            Ok(mut entries) => {
                // The store lock file is ours (taken just before), not foreign content.
                let foreign = entries.any(|e| e.is_ok_and(|e| e.file_name() != "lock"));
                if foreign && !root.join("blobs").is_dir() {
                    return Err(ImportError::Usage(format!(
                        "{} is not an entrepot store (no blobs/ folder) and not empty",
                        root.display()
                    )));
                }
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                std::fs::create_dir_all(root)
                    .map_err(imp_io(format!("cannot create {}", root.display())))?;
                created.push(root.to_path_buf());
            }
            Err(e) => return Err(imp_io(format!("cannot read {}", root.display()))(e)),
        }
        let tmp = root.join("tmp");
        if !tmp.is_dir() {
            std::fs::create_dir(&tmp)
                .map_err(imp_io(format!("cannot create {}", tmp.display())))?;
            created.push(tmp.clone());
        }
        let dir = tmp.join(format!(
            "import-{}-{}",
            std::process::id(),
            STAGING_SEQ.fetch_add(1, Ordering::Relaxed)
        ));
        let staging = Staging {
            root: root.to_path_buf(),
            dir: dir.clone(),
            created,
            blobs: BTreeMap::new(),
        };
        std::fs::create_dir(&dir).map_err(imp_io(format!("cannot create {}", dir.display())))?;
        Ok(staging)
    }

    /// Reads the whole archive: small files into memory, blobs hashed into the staging folder.
    fn extract(&mut self, file: File) -> Result<LayoutFiles, ImportError> {
        let damaged = |e: io::Error| Problem::Damaged(e.to_string());
        let mut files = LayoutFiles::default();
        let mut archive = tar::Archive::new(BufReader::with_capacity(1 << 20, file));
        for entry in archive.entries().map_err(damaged)? {
            let mut entry = entry.map_err(damaged)?;
            let raw = entry.path().map_err(damaged)?.into_owned();
            let name = entry_name(&raw)?;
            match entry.header().entry_type() {
                tar::EntryType::Directory | tar::EntryType::XGlobalHeader => continue,
                tar::EntryType::Regular | tar::EntryType::Continuous => {}
                other => {
                    return Err(Problem::Invalid(format!(
                        "{name}: unexpected {other:?} entry (an OCI layout holds only files)"
                    ))
                    .into())
                }
            }
            let (slot, cap) = match name.as_str() {
                LAYOUT_FILE => (&mut files.layout, 64 << 10),
                INDEX_FILE => (&mut files.index, 16 << 20),
                BUNDLE_FILE => (&mut files.info, 1 << 20),
                _ => {
                    if let Some(rest) = name.strip_prefix("blobs/") {
                        let digest = rest
                            .split_once('/')
                            .and_then(|(alg, hex)| format!("{alg}:{hex}").parse().ok())
                            .ok_or_else(|| {
                                Problem::Invalid(format!("{name}: not a blob name blobs/<algorithm>/<hex> entrepot can verify"))
                            })?;
                        let size = entry.size();
                        self.stage(&mut entry, &name, size, digest)?;
                    } else {
                        tracing::debug!(entry = %name, "ignoring a file that is not part of an OCI layout");
                    }
                    continue;
                }
            };
            if slot.is_some() {
                return Err(Problem::Invalid(format!("{name} appears twice")).into());
            }
            let size = entry.size();
            if size > cap {
                return Err(Problem::Invalid(format!("{name} is {size} bytes, too large")).into());
            }
            let mut data = Vec::with_capacity(size as usize);
            entry.read_to_end(&mut data).map_err(damaged)?;
            if data.len() as u64 != size {
                return Err(Problem::Truncated(format!(
                    "{name} holds {} of its {size} bytes",
                    data.len()
                ))
                .into());
            }
            *slot = Some(data);
        }
        Ok(files)
    }

    /// Hashes one blob entry while copying it into the staging folder (or, when the store
    /// already has it, only hashes it); refuses it unless it matches its digest. A blob listed
    /// twice is verified twice.
    fn stage(
        &mut self,
        entry: &mut impl Read,
        name: &str,
        size: u64,
        digest: Digest,
    ) -> Result<(), ImportError> {
        let in_store = exists(&blob_path(&self.root, &digest))
            .map_err(imp_io(format!("cannot read {}", self.root.display())))?;
        let dest = self
            .dir
            .join(format!("{}-{}", digest.algorithm().as_str(), digest.hex()));
        let write_ctx = || format!("cannot write {}", dest.display());
        let mut writer = if in_store {
            None
        } else {
            let file = File::create(&dest).map_err(imp_io(write_ctx()))?;
            Some(BufWriter::with_capacity(COPY_BUF, file))
        };
        let mut hasher = Hasher::new(digest.algorithm());
        let mut buf = vec![0u8; COPY_BUF];
        let mut read = 0u64;
        loop {
            let k = entry
                .read(&mut buf)
                .map_err(|e| Problem::Damaged(format!("{name}: {e}")))?;
            if k == 0 {
                break;
            }
            hasher.update(&buf[..k]);
            read += k as u64;
            if let Some(w) = writer.as_mut() {
                w.write_all(&buf[..k]).map_err(imp_io(write_ctx()))?;
            }
        }
        if let Some(w) = writer {
            let file = w
                .into_inner()
                .map_err(|e| imp_io(write_ctx())(e.into_error()))?;
            file.sync_all().map_err(imp_io(write_ctx()))?;
        }
        if read != size {
            return Err(
                Problem::Truncated(format!("{name} holds {read} of its {size} bytes")).into(),
            );
        }
        let actual = hasher.finish();
        if actual != digest {
            return Err(Problem::Altered {
                path: name.to_string(),
                actual,
            }
            .into());
        }
        self.blobs.insert(
            digest,
            Staged {
                size: read,
                file: (!in_store).then_some(dest),
            },
        );
        Ok(())
    }
}

impl Drop for Staging {
    fn drop(&mut self) {
        if let Err(e) = std::fs::remove_dir_all(&self.dir) {
            if e.kind() != io::ErrorKind::NotFound {
                tracing::warn!(path = %self.dir.display(), error = %e, "could not remove the import's temp folder");
            }
        }
        for d in self.created.iter().rev() {
            let _ = std::fs::remove_dir(d);
        }
    }
}

/// Reads blobs from the staging folder, then from the store.
struct ImportSource<'a> {
    staging: &'a Staging,
}

impl Source for ImportSource<'_> {
    fn size(&self, d: &Digest) -> io::Result<Option<u64>> {
        match self.staging.blobs.get(d) {
            Some(s) => Ok(Some(s.size)),
            None => StoreSource {
                root: &self.staging.root,
            }
            .size(d),
        }
    }

    fn open(&self, d: &Digest) -> io::Result<File> {
        match self.staging.blobs.get(d).and_then(|s| s.file.as_ref()) {
            Some(path) => File::open(path),
            None => File::open(blob_path(&self.staging.root, d)),
        }
    }
}

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

/// An image the bundle names, checked complete.
struct Incoming {
    name: PinConfig,
    digest: Digest,
    media_type: String,
    size: u64,
}

/// Counts for the summary.
#[derive(Default)]
struct Committed {
    new_blobs: usize,
    new_bytes: u64,
    present_blobs: usize,
    manifests: usize,
    tags: usize,
}

/// Verifies the whole bundle, then commits it; prints a summary.
pub fn run_import(t: &Target, bundle: &Path, out: &mut impl Write) -> Result<(), ImportError> {
    let mut file =
        File::open(bundle).map_err(imp_io(format!("cannot open {}", bundle.display())))?;
    check_end(&mut file)?;
    let mut staging = Staging::create(&t.root)?;
    let files = staging.extract(file)?;

    let layout = files.layout.ok_or_else(|| {
        Problem::Invalid(format!("no {LAYOUT_FILE} file: not an OCI image layout"))
    })?;
    #[derive(Deserialize)]
    struct Layout {
        #[serde(rename = "imageLayoutVersion")]
        version: String,
    }
    let layout: Layout = serde_json::from_slice(&layout)
        .map_err(|e| Problem::Invalid(format!("{LAYOUT_FILE}: {e}")))?;
    if !layout.version.starts_with("1.") {
        return Err(Problem::Invalid(format!(
            "{LAYOUT_FILE}: image layout version {} is not supported (1.x is)",
            layout.version
        ))
        .into());
    }
    let info: Option<BundleInfo> = match &files.info {
        Some(raw) => Some(
            serde_json::from_slice(raw)
                .map_err(|e| Problem::Invalid(format!("{BUNDLE_FILE}: {e}")))?,
        ),
        None => None,
    };
    if let Some(i) = &info {
        if i.format != FORMAT || i.version > FORMAT_VERSION {
            return Err(Problem::Invalid(format!(
                "{BUNDLE_FILE}: format {:?} version {} (this entrepot reads {FORMAT:?} version {FORMAT_VERSION} and earlier)",
                i.format, i.version
            ))
            .into());
        }
    }
    let index = files.index.ok_or_else(|| {
        Problem::Invalid(format!(
            "no {INDEX_FILE}: not an OCI image layout, or cut short"
        ))
    })?;
    let index: Index = serde_json::from_slice(&index)
        .map_err(|e| Problem::Invalid(format!("{INDEX_FILE} is not a valid OCI index: {e}")))?;
    if index.schema_version != 2 {
        return Err(Problem::Invalid(format!(
            "{INDEX_FILE}: schemaVersion {} (2 expected)",
            index.schema_version
        ))
        .into());
    }

    let count_note = match &info {
        Some(i) if i.blobs != staging.blobs.len() => format!(
            " (the archive holds {} of the {} blobs {BUNDLE_FILE} lists: cut short or altered)",
            staging.blobs.len(),
            i.blobs
        ),
        _ => String::new(),
    };
    let delta_note = match &info {
        Some(i) if i.since > 0 => format!(
            " (this is a delta since marker {}: import the bundle it follows first)",
            i.since
        ),
        _ => String::new(),
    };
    let cap = manifest_cap(t);
    let mut images: Vec<Incoming> = Vec::new();
    let mut closure = Closure::default();
    for (i, desc) in index.manifests.iter().enumerate() {
        let at = format!("{INDEX_FILE} manifests[{i}]");
        let digest: Digest = desc
            .digest
            .parse()
            .map_err(|e| Problem::Invalid(format!("{at}: digest {:?}: {e}", desc.digest)))?;
        let name = descriptor_name(t, desc, &digest)
            .map_err(|why| Problem::Invalid(format!("{at} ({digest}): {why}")))?;
        let full = pins::format(&name);
        if images.iter().any(|x| x.name == name) {
            return Err(Problem::Invalid(format!("{INDEX_FILE} names {full} twice")).into());
        }
        let src = ImportSource { staging: &staging };
        let c =
            walk(&src, &digest, &desc.media_type, Some(desc.size), cap).map_err(|e| match e {
                WalkError::Missing { digest, parent } => ImportError::from(Problem::Missing {
                    needed_by: parent.map_or_else(
                        || format!("{INDEX_FILE} ({full})"),
                        |p| format!("{full} (manifest {p})"),
                    ),
                    digest,
                    hint: format!("{count_note}{delta_note}"),
                }),
                WalkError::Size {
                    digest,
                    actual,
                    expected,
                    parent,
                } => Problem::Size {
                    digest,
                    actual,
                    expected,
                    described_by: parent.map_or_else(
                        || format!("{INDEX_FILE} ({full})"),
                        |p| format!("manifest {p}"),
                    ),
                }
                .into(),
                WalkError::BadManifest { digest, why } => {
                    Problem::Invalid(format!("manifest {digest} ({full}): {why}")).into()
                }
                WalkError::Io(e) => imp_io("cannot read the staged bundle")(e),
            })?;
        closure.extend(&c);
        images.push(Incoming {
            media_type: c.manifests[&digest].clone(),
            name,
            digest,
            size: desc.size,
        });
    }
    if !count_note.is_empty() {
        return Err(Problem::Invalid(format!(
            "the archive holds {} blobs, but {BUNDLE_FILE} lists {}: cut short or altered",
            staging.blobs.len(),
            info.as_ref().map_or(0, |i| i.blobs)
        ))
        .into());
    }

    // Everything verified: commit, blobs → manifest types → tags → pins, so that a server
    // running on this store never resolves a tag to something that is not there yet.
    let done = staging.commit(&closure, &images)?;
    let kind = match &info {
        Some(i) if i.since > 0 => format!("delta since {}, marker {}", i.since, i.marker),
        Some(i) => format!("full bundle, marker {}", i.marker),
        None => "OCI layout".to_string(),
    };
    let write = |out: &mut dyn Write| -> io::Result<()> {
        writeln!(
            out,
            "imported {} image(s) from {} ({kind}): {} new blob(s) ({}), {} already in the store; {} manifest(s) and {} tag(s) recorded; images pinned",
            images.len(),
            bundle.display(),
            done.new_blobs,
            human_size(done.new_bytes),
            done.present_blobs,
            done.manifests,
            done.tags,
        )?;
        for i in &images {
            writeln!(out, "  {}  {}", pins::format(&i.name), i.digest)?;
        }
        Ok(())
    };
    write(out).map_err(imp_io("cannot write to stdout"))
}

impl Staging {
    /// Moves the verified blobs of `closure` into the store and records manifests, tags and
    /// pins, appending a journal entry for each addition.
    fn commit(mut self, closure: &Closure, images: &[Incoming]) -> Result<Committed, ImportError> {
        let root = self.root.clone();
        let mk = |p: &Path| {
            std::fs::create_dir_all(p).map_err(imp_io(format!("cannot create {}", p.display())))
        };
        for alg in [Algorithm::Sha256, Algorithm::Sha512] {
            mk(&root.join("blobs").join(alg.as_str()))?;
            mk(&root.join("meta/manifests").join(alg.as_str()))?;
        }
        mk(&root.join("meta/tags"))?;
        // From here on the store changes: the folders stay whatever happens.
        self.created.clear();
        let journal = Journal::open(&root).map_err(imp_io("cannot open the store's journal"))?;
        let append = |e: Entry| {
            journal
                .append(e)
                .map(|_| ())
                .map_err(imp_io("cannot append to the store's journal"))
        };
        let mut done = Committed::default();

        let mut touched = BTreeSet::new();
        for (digest, size) in &closure.blobs {
            let dest = blob_path(&root, digest);
            match self.blobs.get(digest).and_then(|s| s.file.as_ref()) {
                Some(staged) if !exists(&dest).unwrap_or(false) => {
                    std::fs::rename(staged, &dest)
                        .map_err(imp_io(format!("cannot move {digest} into the store")))?;
                    touched.insert(digest.algorithm());
                    append(Entry::Blob {
                        digest: digest.to_string(),
                    })?;
                    done.new_blobs += 1;
                    done.new_bytes += size;
                }
                _ => done.present_blobs += 1,
            }
        }
        for alg in touched {
            let dir = root.join("blobs").join(alg.as_str());
            File::open(&dir)
                .and_then(|d| d.sync_all())
                .map_err(imp_io(format!("cannot sync {}", dir.display())))?;
        }

        for (digest, media_type) in &closure.manifests {
            let meta = manifests::meta_path(&root, digest);
            if exists(&meta).unwrap_or(false) {
                continue;
            }
            write_atomic(&self.dir, &meta, media_type.as_bytes())
                .map_err(imp_io(format!("cannot record the media type of {digest}")))?;
            append(Entry::Manifest {
                digest: digest.to_string(),
                media_type: media_type.clone(),
            })?;
            done.manifests += 1;
        }

        let fetched_at = unix_now();
        for i in images {
            let Reference::Tag(tag) = &i.name.reference else {
                continue;
            };
            let path = tags::record_path(&root, &i.name.upstream, &i.name.repo, tag);
            let before = std::fs::read(&path)
                .ok()
                .and_then(|t| serde_json::from_slice::<tags::TagRecord>(&t).ok())
                .map(|r| r.digest);
            let rec = tags::TagRecord {
                digest: i.digest.to_string(),
                media_type: i.media_type.clone(),
                size: i.size,
                fetched_at,
            };
            tags::write_record(&root, &i.name.upstream, &i.name.repo, tag, &rec).map_err(
                imp_io(format!("cannot record the tag {}", pins::format(&i.name))),
            )?;
            done.tags += 1;
            if before.as_deref() != Some(rec.digest.as_str()) {
                append(Entry::Tag {
                    upstream: i.name.upstream.clone(),
                    repo: i.name.repo.to_string(),
                    tag: tag.to_string(),
                    digest: rec.digest,
                    media_type: rec.media_type,
                    size: rec.size,
                })?;
            }
        }
        let names: Vec<PinConfig> = images.iter().map(|i| i.name.clone()).collect();
        pins::add(&root, &names).map_err(imp_io("cannot record the pins"))?;
        Ok(done)
    }
}

/// Writes `data` to `dest` through a temp file in `tmp` and a rename.
fn write_atomic(tmp: &Path, dest: &Path, data: &[u8]) -> io::Result<()> {
    if let Some(parent) = dest.parent() {
        std::fs::create_dir_all(parent)?;
    }
    let t = tmp.join(format!(
        "meta-{}",
        STAGING_SEQ.fetch_add(1, Ordering::Relaxed)
    ));
    std::fs::write(&t, data)?;
    std::fs::rename(&t, dest)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn d(s: &str) -> Digest {
        Digest::sha256_of(s.as_bytes())
    }

    #[test]
    fn children_of_manifests_and_indexes() {
        let m = serde_json::json!({
            "schemaVersion": 2,
            "config": {"mediaType": "c", "digest": d("c").to_string(), "size": 1},
            "layers": [{"mediaType": "l", "digest": d("l").to_string(), "size": 2}],
            "subject": {"mediaType": "m", "digest": d("s").to_string(), "size": 3},
        });
        let kids = children(m.to_string().as_bytes()).unwrap();
        assert_eq!(kids.len(), 2, "subject is not followed");
        assert_eq!(kids[0].digest, d("c"));
        assert_eq!(kids[1].size, Some(2));
        assert!(!kids[1].manifest);
        let i = serde_json::json!({
            "schemaVersion": 2,
            "manifests": [{"mediaType": media::OCI_MANIFEST, "digest": d("m").to_string(), "size": 9}],
        });
        let kids = children(i.to_string().as_bytes()).unwrap();
        assert!(kids[0].manifest);
        assert_eq!(kids[0].media_type.as_deref(), Some(media::OCI_MANIFEST));
        assert!(children(br#"{"layers":[{"digest":"sha256:nothex"}]}"#).is_err());
        assert!(children(b"[1]").is_err());
        assert!(children(b"garbage").is_err());
    }

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

    #[test]
    fn names_come_from_annotations_or_a_full_ref_name() {
        let t = Target {
            root: PathBuf::from("/nonexistent"),
            config: None,
        };
        let digest = d("m");
        let name: PinConfig = parse_image_ref("docker.io/library/alpine:3.20").unwrap();
        let desc = |a: BTreeMap<String, String>| Descriptor {
            media_type: media::OCI_MANIFEST.to_string(),
            digest: digest.to_string(),
            size: 1,
            annotations: Some(a),
        };
        assert_eq!(
            descriptor_name(&t, &desc(annotations(&name)), &digest).unwrap(),
            name
        );
        let only_ref = BTreeMap::from([(
            ANN_REF_NAME.to_string(),
            "docker.io/library/alpine:3.20".to_string(),
        )]);
        assert_eq!(descriptor_name(&t, &desc(only_ref), &digest).unwrap(), name);
        for bad in ["3.20", "alpine:3.20", "library/alpine:3.20"] {
            let a = BTreeMap::from([(ANN_REF_NAME.to_string(), bad.to_string())]);
            assert!(descriptor_name(&t, &desc(a), &digest).is_err(), "{bad}");
        }
        let mut evil = annotations(&name);
        evil.insert(ANN_UPSTREAM.to_string(), "../../etc".to_string());
        assert!(descriptor_name(&t, &desc(evil), &digest).is_err());
    }
}
