//! A year-old mirror, written straight into entrepot's store layout (`src/cache/layout.rs`) for
//! the `scale` bench: tiny blobs, most of them in tagged images (1 manifest + 1 config + 8 own
//! layers + 2 base layers shared with other images), the rest fetched by digest alone; every
//! record a server of this version keeps beside them — manifest media types, tag records, one
//! link per (repository, digest), use stamps for every blob, the journal, pins and the
//! links-ready marker. Commit times (file mtimes) spread over a year, use stamps after them.

use std::fs;
use std::io::{BufWriter, Write as _};
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result};
use sha2::{Digest as _, Sha256};

use crate::support::seed::OCI_MANIFEST;

const UPSTREAM: &str = "upstream";
const OCI_CONFIG: &str = "application/vnd.oci.image.config.v1+json";
const OCI_LAYER: &str = "application/vnd.oci.image.layer.v1.tar";
/// Own layers per image, besides its two shared base layers.
const OWN_LAYERS: usize = 8;
/// Images per shared base layer in the pool.
const IMAGES_PER_BASE: usize = 20;
/// Images per repository (each tagged `v<n>`; the repository's last one also `latest`).
const IMAGES_PER_REPO: usize = 4;
/// Share of the blobs that belong to images (the rest are fetched by digest alone).
const IN_IMAGES: f64 = 0.9;
const YEAR_MS: u64 = 365 * 24 * 3600 * 1000;
/// At most this many (repository, digest) and (repository, tag) pairs are kept to ask for.
const SAMPLE: usize = 10_000;

/// What was written.
pub struct Generated {
    pub root: PathBuf,
    pub blobs: usize,
    pub bytes: u64,
    pub images: usize,
    pub tags: usize,
    pub links: usize,
    /// Linked (repository, digest) pairs, a sample of the blobs to GET.
    pub blob_reads: Vec<(String, String)>,
    /// (repository, tag) pairs, a sample of the tags to GET.
    pub tag_reads: Vec<(String, String)>,
}

/// xorshift64*, seeded: the same store every run.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }
}

struct Writer {
    root: PathBuf,
    now_ms: u64,
    rng: Rng,
    access: BufWriter<fs::File>,
    journal: BufWriter<fs::File>,
    seq: u64,
    blobs: usize,
    bytes: u64,
    links: usize,
    stride: usize,
    blob_reads: Vec<(String, String)>,
}

impl Writer {
    /// Stores `data` as a blob committed some time in the last year, used since; returns its
    /// `sha256:<hex>` digest and size.
    fn blob(&mut self, data: &[u8]) -> Result<(String, u64)> {
        let hex = hex::encode(Sha256::digest(data));
        let path = self.root.join("blobs/sha256").join(&hex);
        let f = fs::File::create(&path).with_context(|| format!("creating {}", path.display()))?;
        (&f).write_all(data)?;
        let committed = self.now_ms - self.rng.below(YEAR_MS);
        f.set_modified(UNIX_EPOCH + Duration::from_millis(committed))?;
        let used = committed + self.rng.below(self.now_ms - committed);
        writeln!(self.access, "sha256:{hex} {used}")?;
        self.seq += 1;
        writeln!(
            self.journal,
            r#"{{"seq":{},"kind":"blob","digest":"sha256:{hex}"}}"#,
            self.seq
        )?;
        self.blobs += 1;
        self.bytes += data.len() as u64;
        Ok((format!("sha256:{hex}"), data.len() as u64))
    }

    /// A small blob of `kind` number `i`, 100 to 1100 bytes.
    fn filler(&mut self, kind: &str, i: usize) -> Result<(String, u64)> {
        let pad = 100 + self.rng.below(1000) as usize;
        let mut data = format!("{kind} {i}\n").into_bytes();
        data.resize(data.len() + pad, b'.');
        self.blob(&data)
    }

    /// Links `digest` to `repo` (one empty record, as `Links::add` writes).
    fn link(&mut self, repo: &str, digest: &str) -> Result<()> {
        let dir = self
            .root
            .join(format!("meta/links/{UPSTREAM}/{repo}/_links/sha256"));
        fs::write(dir.join(digest.trim_start_matches("sha256:")), b"")?;
        self.links += 1;
        if self.links.is_multiple_of(self.stride) && self.blob_reads.len() < SAMPLE {
            self.blob_reads.push((repo.to_owned(), digest.to_owned()));
        }
        Ok(())
    }

    fn journal_line(&mut self, line: String) -> Result<()> {
        self.seq += 1;
        writeln!(self.journal, r#"{{"seq":{},{line}}}"#, self.seq)?;
        Ok(())
    }
}

fn repo_name(r: usize) -> String {
    format!("scale/r{r:06}")
}

/// Writes a store of about `count` blobs under `root` (which must not exist yet).
pub fn generate(root: &Path, count: usize) -> Result<Generated> {
    let images = ((count as f64 * IN_IMAGES) / (OWN_LAYERS as f64 + 2.0 + 1.0 / 20.0)) as usize;
    let images = images.max(1);
    let bases = images.div_ceil(IMAGES_PER_BASE);
    let orphans = count.saturating_sub(images * (OWN_LAYERS + 2) + bases);
    let repos = images.div_ceil(IMAGES_PER_REPO);
    for dir in ["blobs/sha256", "meta/manifests/sha256", "tmp"] {
        fs::create_dir_all(root.join(dir))?;
    }
    for r in 0..repos {
        let repo = repo_name(r);
        fs::create_dir_all(root.join(format!("meta/tags/{UPSTREAM}/{repo}/_tags")))?;
        fs::create_dir_all(root.join(format!("meta/links/{UPSTREAM}/{repo}/_links/sha256")))?;
    }
    let now_ms = SystemTime::now().duration_since(UNIX_EPOCH)?.as_millis() as u64;
    let mut w = Writer {
        root: root.to_path_buf(),
        now_ms,
        rng: Rng(0x5CA1_E5CA_1E00_0013),
        access: BufWriter::new(fs::File::create(root.join("meta/access"))?),
        journal: BufWriter::new(fs::File::create(root.join("meta/journal"))?),
        seq: 0,
        blobs: 0,
        bytes: 0,
        links: 0,
        // About one link in `stride` is kept to ask for (images have 12 links, orphans 1).
        stride: (images * 12 + orphans).div_ceil(SAMPLE).max(1),
        blob_reads: Vec::new(),
    };
    let base_layers: Vec<(String, u64)> = (0..bases)
        .map(|i| w.filler("base layer", i))
        .collect::<Result<_>>()?;
    let mut tags = 0;
    let mut tag_reads = Vec::new();
    let tag_stride = (images + repos).div_ceil(SAMPLE).max(1);
    let descriptor = |media: &str, (digest, size): &(String, u64)| serde_json::json!({ "mediaType": media, "digest": digest, "size": size });
    for img in 0..images {
        let repo = repo_name(img / IMAGES_PER_REPO);
        let config = w.blob(
            serde_json::to_vec(&serde_json::json!({
                "architecture": "amd64", "os": "linux", "config": {}, "created": img,
            }))?
            .as_slice(),
        )?;
        let mut layers = vec![
            base_layers[img % bases].clone(),
            base_layers[(img * 7 + 3) % bases].clone(),
        ];
        for l in 0..OWN_LAYERS {
            layers.push(w.filler("layer", img * OWN_LAYERS + l)?);
        }
        let body = serde_json::to_vec(&serde_json::json!({
            "schemaVersion": 2,
            "mediaType": OCI_MANIFEST,
            "config": descriptor(OCI_CONFIG, &config),
            "layers": layers.iter().map(|l| descriptor(OCI_LAYER, l)).collect::<Vec<_>>(),
        }))?;
        let manifest = w.blob(&body)?;
        let hex = manifest.0.trim_start_matches("sha256:");
        fs::write(
            root.join("meta/manifests/sha256").join(hex),
            OCI_MANIFEST.as_bytes(),
        )?;
        w.journal_line(format!(
            r#""kind":"manifest","digest":"{}","media_type":"{OCI_MANIFEST}""#,
            manifest.0
        ))?;
        for (digest, _) in [&manifest, &config].into_iter().chain(&layers) {
            w.link(&repo, digest)?;
        }
        let last_of_repo = img % IMAGES_PER_REPO == IMAGES_PER_REPO - 1 || img + 1 == images;
        let names = [
            Some(format!("v{img}")),
            last_of_repo.then(|| "latest".into()),
        ];
        for tag in names.into_iter().flatten() {
            let record = serde_json::json!({
                "digest": manifest.0, "media_type": OCI_MANIFEST, "size": manifest.1,
                "fetched_at": now_ms / 1000,
            });
            fs::write(
                root.join(format!("meta/tags/{UPSTREAM}/{repo}/_tags/{tag}")),
                serde_json::to_vec(&record)?,
            )?;
            w.journal_line(format!(
                r#""kind":"tag","upstream":"{UPSTREAM}","repo":"{repo}","tag":"{tag}","digest":"{}","media_type":"{OCI_MANIFEST}","size":{}"#,
                manifest.0, manifest.1
            ))?;
            tags += 1;
            if tags % tag_stride == 0 && tag_reads.len() < SAMPLE {
                tag_reads.push((repo.clone(), tag));
            }
        }
    }
    for i in 0..orphans {
        let blob = w.filler("blob by digest", i)?;
        let repo = repo_name(w.rng.below(repos as u64) as usize);
        w.link(&repo, &blob.0)?;
    }
    fs::write(
        root.join("meta/pins"),
        format!(
            "{UPSTREAM}/{}:latest\n{UPSTREAM}/{}:v1\n",
            repo_name(0),
            repo_name(0)
        ),
    )?;
    fs::write(root.join("meta/links-ready"), b"1\n")?;
    w.access.flush()?;
    w.journal.flush()?;
    Ok(Generated {
        root: root.to_path_buf(),
        blobs: w.blobs,
        bytes: w.bytes,
        images,
        tags,
        links: w.links,
        blob_reads: w.blob_reads,
        tag_reads,
    })
}
