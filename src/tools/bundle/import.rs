//! `entrepot import`: stage and verify a bundle, then commit it. Every blob is hashed while it is
//! extracted into `<root>/tmp/import-*` ([`Staging`]), every named image is walked complete, and
//! only then do blobs, manifest types, tags and pins enter the store, in that order.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{self, BufReader, BufWriter, Read, Write};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::atomic::{AtomicU64, Ordering};

use serde::Deserialize;

use super::closure::{descriptor_name, walk, Closure, Index, Source, StoreSource, WalkError};
use super::{
    check_end, entry_name, imp_io, manifest_cap, BundleInfo, ImportArgs, ImportError, Problem,
    BUNDLE_FILE, COPY_BUF, FORMAT, FORMAT_VERSION, INDEX_FILE, LAYOUT_FILE,
};
use crate::cache::temp::TempFile;
use crate::cache::{layout, pins};
use crate::config::{PinConfig, StorageBackend};
use crate::oci::{Digest, Hasher, Reference};
use crate::tools::blocking::BlockingStore;
use crate::tools::maintenance::{human_size, Target};

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
    /// The store, when it existed before this import (blobs it has need not be staged).
    store: Option<BlockingStore>,
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
    fn create(root: &Path, backend: &StorageBackend) -> Result<Staging, ImportError> {
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
        let shared = matches!(backend, StorageBackend::S3(_));
        let store = if shared || root.join(layout::BLOBS).is_dir() {
            Some(
                BlockingStore::open_beside(root, backend)
                    .map_err(imp_io(format!("cannot open the store {}", root.display())))?,
            )
        } else {
            None
        };
        let staging = Staging {
            root: root.to_path_buf(),
            store,
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
        let in_store = match &self.store {
            Some(s) => s
                .wait(s.store().has_blob(&digest))
                .map_err(imp_io(format!("cannot read {}", self.root.display())))?,
            None => false,
        };
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
        match (self.staging.blobs.get(d), &self.staging.store) {
            (Some(s), _) => Ok(Some(s.size)),
            (None, Some(store)) => StoreSource { store }.size(d),
            (None, None) => Ok(None),
        }
    }

    fn open(&self, d: &Digest) -> io::Result<Box<dyn Read>> {
        match (
            self.staging.blobs.get(d).and_then(|s| s.file.as_ref()),
            &self.staging.store,
        ) {
            (Some(path), _) => Ok(Box::new(File::open(path)?)),
            (None, Some(store)) => StoreSource { store }.open(d),
            (None, None) => Err(io::Error::new(
                io::ErrorKind::NotFound,
                format!("{d} is neither in the bundle nor in the store"),
            )),
        }
    }
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
    let mut staging = Staging::create(&t.root, &t.backend())?;
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
        let bs = match self.store.take() {
            Some(bs) => bs,
            None => {
                // A new store: its folders are made here (the filesystem backend creates them).
                crate::cache::backend::fs::Fs::at(&self.root).map_err(imp_io(format!(
                    "cannot create the store {}",
                    self.root.display()
                )))?;
                BlockingStore::open_beside(&self.root, &StorageBackend::Fs).map_err(imp_io(
                    format!("cannot open the store {}", self.root.display()),
                ))?
            }
        };
        // From here on the store changes: the folders stay whatever happens.
        self.created.clear();
        let store = bs.store();
        let mut done = Committed::default();

        for (digest, size) in &closure.blobs {
            let staged = self.blobs.get_mut(digest).and_then(|s| s.file.take());
            let present = bs
                .wait(store.has_blob(digest))
                .map_err(imp_io(format!("cannot read {}", self.root.display())))?;
            match staged {
                Some(path) if !present => {
                    let spool = TempFile::adopt(path)
                        .map_err(imp_io(format!("cannot open the staged {digest}")))?;
                    bs.wait(store.blobs().commit(digest, spool))
                        .map_err(imp_io(format!("cannot move {digest} into the store")))?;
                    bs.wait(store.committed(digest, *size));
                    done.new_blobs += 1;
                    done.new_bytes += size;
                }
                _ => done.present_blobs += 1,
            }
        }

        for (digest, media_type) in &closure.manifests {
            let recorded = bs
                .wait(store.record_manifest_type(digest, media_type))
                .map_err(imp_io(format!("cannot record the media type of {digest}")))?;
            if recorded {
                done.manifests += 1;
            }
        }

        for i in images {
            let Reference::Tag(tag) = &i.name.reference else {
                continue;
            };
            let upstream: std::sync::Arc<str> = i.name.upstream.as_str().into();
            bs.wait(store.tags.put(
                &upstream,
                &i.name.repo,
                tag,
                i.digest.clone(),
                i.media_type.clone(),
                i.size,
            ))
            .map_err(imp_io(format!(
                "cannot record the tag {}",
                pins::format(&i.name)
            )))?;
            done.tags += 1;
        }
        // Reads are scoped to (upstream, repository): each image is readable under its own.
        let linked = images.iter().map(|i| {
            (
                std::sync::Arc::from(i.name.upstream.as_str()),
                i.name.repo.clone(),
                i.digest.clone(),
            )
        });
        bs.wait(store.link_images(linked.collect::<Vec<_>>()))
            .map_err(imp_io("cannot link the images to their repositories"))?;
        let names: Vec<PinConfig> = images.iter().map(|i| i.name.clone()).collect();
        bs.wait(store.add_pins(&names))
            .map_err(imp_io("cannot record the pins"))?;
        Ok(done)
    }
}
