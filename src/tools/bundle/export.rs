//! `entrepot export`: resolve the selected images in the store, check them complete, and write
//! their closures (or what the journal recorded since a marker) as a bundle, through a temp file
//! that only a finished export renames into place.
//!
//! The referrers lists the store holds for the selected images travel with them, each as an
//! image named by the referrers tag schema (`upstream/repo:sha256-<hex>`): the distribution
//! spec's tag for an index holding what the referrers API answers. Importing one records that
//! tag, and an entrepot with no referrers record of its own answers `referrers/<digest>` from
//! it when offline (see `http::passthrough`). Signature tags (`sha256-<hex>.sig`) and
//! referrers that prefetch pinned travel as the pinned images they are.

use std::collections::{BTreeSet, HashSet};
use std::ffi::OsString;
use std::fs::File;
use std::io::{self, BufReader, BufWriter, Read, Write};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;

use super::closure::{
    annotations, walk, Closure, Descriptor, Index, Source as _, StoreSource, WalkError,
};
use super::{
    io_ctx, manifest_cap, unix_now, upstream_name, BundleInfo, ExportArgs, ExportError,
    BUNDLE_FILE, COPY_BUF, FORMAT, FORMAT_VERSION, INDEX_FILE, LAYOUT_FILE,
};
use crate::cache::journal::Entry;
use crate::cache::referrers::{self, ReferrersAnswer};
use crate::cache::{layout, pins, tags};
use crate::config::{parse_image_ref, PinConfig};
use crate::oci::{media, Digest, Hasher, Reference, RepoName};
use crate::tools::blocking::BlockingStore;
use crate::tools::maintenance::{human_size, Target};

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
    let bs = BlockingStore::open_beside(root, &t.backend()).map_err(|e| match e.kind() {
        io::ErrorKind::NotFound => ExportError::Usage(e.to_string()),
        _ => io_ctx(format!("cannot open the store {}", root.display()))(e),
    })?;
    // Read before anything else: whatever commits after this is sent again by the next delta.
    let marker = bs.store().journal.last_seq();
    if let Some(since) = args.since.filter(|s| *s > marker) {
        return Err(ExportError::Usage(format!(
            "--since {since} is past this store's journal (its last entry is {marker}): was that marker printed by an export of this store?"
        )));
    }
    let cap = manifest_cap(t);
    let src = StoreSource { store: &bs };
    let mut problems = Vec::new();
    let mut images = Vec::new();
    for name in selection(t, &bs, &args.images)? {
        let full = pins::format(&name);
        let (digest, media_type) = match resolve(&bs, &name) {
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
    let notes = add_referrers(&bs, &src, cap, &mut images)?;

    let mut blobs = Closure::default();
    if let Some(since) = args.since {
        let (fresh, moved) = journal_since(&bs, since)?;
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
    write_bundle(&src, &args.out, &info, &index, &blobs)?;

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
        for n in &notes {
            writeln!(out, "note: {n}")?;
        }
        writeln!(out, "marker: {marker}")
    };
    write(out).map_err(io_ctx("cannot write to stdout"))
}

/// Adds to `images` the referrers lists the store holds for their manifests (and, in turn, for
/// those lists' referrers), each named by the referrers tag schema; an empty list is left out,
/// and so, with a note, is one whose referrers are not all in the store.
fn add_referrers(
    bs: &BlockingStore,
    src: &StoreSource<'_>,
    cap: u64,
    images: &mut Vec<Image>,
) -> Result<Vec<String>, ExportError> {
    let mut notes = Vec::new();
    let mut asked: HashSet<(String, RepoName, Digest)> = HashSet::new();
    let mut next = 0;
    while next < images.len() {
        let (upstream, repo) = (
            images[next].name.upstream.clone(),
            images[next].name.repo.clone(),
        );
        let subjects: Vec<Digest> = images[next].closure.manifests.keys().cloned().collect();
        next += 1;
        let up: Arc<str> = upstream.as_str().into();
        for subject in subjects {
            if !asked.insert((upstream.clone(), repo.clone(), subject.clone())) {
                continue;
            }
            let Some(entry) = bs.wait(bs.store().referrers.get(&up, &repo, &subject)) else {
                continue;
            };
            let ReferrersAnswer::Index(index) = entry.answer else {
                continue;
            };
            let name = PinConfig {
                upstream: upstream.clone(),
                repo: repo.clone(),
                reference: Reference::Tag(referrers::tag_schema(&subject)),
            };
            // The upstream's own tag-schema tag, selected already, says the same.
            if images.iter().any(|i| i.name == name) {
                continue;
            }
            let left_out = |why: String| {
                format!(
                    "{} (the referrers of {subject}) left out: {why}",
                    pins::format(&name)
                )
            };
            match walk(src, &index, media::OCI_INDEX, None, cap) {
                Ok(closure) if closure.manifests.len() > 1 => images.push(Image {
                    size: closure.blobs[&index],
                    name,
                    digest: index,
                    media_type: media::OCI_INDEX.to_string(),
                    closure,
                }),
                Ok(_) => {}
                Err(WalkError::Io(e)) => {
                    return Err(io_ctx(format!("cannot read the referrers of {subject}"))(e))
                }
                Err(WalkError::Missing { digest, .. }) => {
                    notes.push(left_out(format!("{digest} is not in the store")))
                }
                Err(WalkError::Size { digest, .. }) => {
                    notes.push(left_out(format!("{digest} has another size than listed")))
                }
                Err(WalkError::BadManifest { digest, why }) => {
                    notes.push(left_out(format!("manifest {digest}: {why}")))
                }
            }
        }
    }
    Ok(notes)
}

/// The images to export, named as the store names them: the arguments, else every pin.
fn selection(
    t: &Target,
    bs: &BlockingStore,
    images: &[String],
) -> Result<Vec<PinConfig>, ExportError> {
    let names: Vec<PinConfig> = if images.is_empty() {
        let mut p = t
            .config
            .as_ref()
            .map(|c| c.pins.clone())
            .unwrap_or_default();
        p.extend(
            bs.wait(bs.store().recorded_pins())
                .map_err(io_ctx("cannot read the store's pins"))?,
        );
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
fn resolve(bs: &BlockingStore, name: &PinConfig) -> Result<(Digest, String), String> {
    let meta = bs.store().meta();
    let (digest, media_type) = match &name.reference {
        Reference::Tag(tag) => {
            let key = layout::tag(&name.upstream, &name.repo, tag);
            let text = bs
                .wait(meta.get(&key))
                .map_err(|e| format!("cannot read {key}: {e}"))?
                .ok_or_else(|| {
                    "not in the store (no tag record; pull it or `entrepot prefetch` it)"
                        .to_string()
                })?;
            let rec: tags::TagRecord = serde_json::from_slice(&text)
                .map_err(|e| format!("unreadable tag record {key}: {e}"))?;
            let digest: Digest = rec
                .digest
                .parse()
                .map_err(|e| format!("tag record {key}: {e}"))?;
            (digest, Some(rec.media_type).filter(|m| !m.is_empty()))
        }
        Reference::Digest(d) => (d.clone(), None),
    };
    let stored_type = bs
        .wait(meta.get(&layout::manifest_type(&digest)))
        .ok()
        .flatten()
        .ok_or_else(|| format!("manifest {digest} is not in the store"))?;
    Ok((
        digest,
        media_type.unwrap_or_else(|| String::from_utf8_lossy(&stored_type).trim().to_string()),
    ))
}

/// What the journal recorded after `since`: the digests committed (blobs and manifests) and
/// the tags that moved, as (upstream, repository, tag).
type Moved = HashSet<(String, String, String)>;

fn journal_since(bs: &BlockingStore, since: u64) -> Result<(HashSet<Digest>, Moved), ExportError> {
    let mut fresh = HashSet::new();
    let mut moved = HashSet::new();
    let lines = bs
        .wait(bs.store().journal.read_since(since))
        .map_err(io_ctx("cannot read the journal"))?;
    for line in lines {
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
    src: &StoreSource<'_>,
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
        let gone = || format!("cannot read {digest} from the store (evicted while exporting?)");
        let len = src
            .size(digest)
            .map_err(io_ctx(gone()))?
            .ok_or_else(|| io_ctx(gone())(io::ErrorKind::NotFound.into()))?;
        let file = src.open(digest).map_err(io_ctx(gone()))?;
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
                actual: Box::new(actual),
            });
        }
    }
    let buffered = tar.into_inner().map_err(io_ctx(out_ctx()))?;
    buffered
        .into_inner()
        .map_err(|e| io_ctx(out_ctx())(e.into_error()))?;
    partial.commit().map_err(io_ctx(out_ctx()))
}
