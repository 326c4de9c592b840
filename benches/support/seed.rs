//! Seed content: random, incompressible blobs pushed to the upstream `docker-registry` with the
//! registry's own upload API (POST, then one monolithic PUT), an image manifest under a tag, and
//! the many tiny blobs of the start-up scenario written straight into entrepot's store layout.

use std::{fs, path::Path};

use anyhow::{ensure, Context, Result};
use sha2::{Digest as _, Sha256};

pub const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
const OCI_CONFIG: &str = "application/vnd.oci.image.config.v1+json";
const OCI_LAYER: &str = "application/vnd.oci.image.layer.v1.tar";

/// `sha256:<hex>` of `data`.
pub fn sha256(data: &[u8]) -> String {
    format!("sha256:{}", hex::encode(Sha256::digest(data)))
}

/// `len` pseudo-random bytes (xorshift64*, seeded), fast enough for hundreds of MiB.
pub fn random_bytes(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        out.extend_from_slice(&x.wrapping_mul(0x2545_F491_4F6C_DD1D).to_le_bytes());
    }
    out.truncate(len);
    out
}

/// A blob as the upstream holds it.
#[derive(Clone, Debug)]
pub struct Pushed {
    pub digest: String,
    pub size: u64,
}

/// Pushes `data` to `repo` on the registry at `base`: POST opens an upload, one PUT with the
/// digest sends the whole blob and commits it.
pub async fn push_blob(
    client: &reqwest::Client,
    base: &str,
    repo: &str,
    data: Vec<u8>,
) -> Result<Pushed> {
    let digest = sha256(&data);
    let size = data.len() as u64;
    let resp = client
        .post(format!("{base}/v2/{repo}/blobs/uploads/"))
        .send()
        .await?;
    ensure!(
        resp.status() == 202,
        "starting an upload: {}",
        resp.status()
    );
    let location = resp
        .headers()
        .get("location")
        .and_then(|v| v.to_str().ok())
        .context("upload without Location")?;
    let location = if location.starts_with('/') {
        format!("{base}{location}")
    } else {
        location.to_owned()
    };
    let sep = if location.contains('?') { '&' } else { '?' };
    let resp = client
        .put(format!("{location}{sep}digest={digest}"))
        .header("content-type", "application/octet-stream")
        .body(data)
        .send()
        .await?;
    ensure!(
        resp.status() == 201,
        "completing the upload of {digest}: {} {}",
        resp.status(),
        resp.text().await.unwrap_or_default()
    );
    Ok(Pushed { digest, size })
}

/// What the upstream holds for the scenarios, all in one repository.
pub struct Seeded {
    pub repo: String,
    pub big: Pushed,
    /// A mid-sized layer (issue 13's short cold pull); in the repository, not in the manifest.
    pub medium: Pushed,
    pub small: Pushed,
    pub tag: String,
    pub manifest: Pushed,
}

/// Pushes a `big`-byte layer, a `small`-byte layer, a config and a manifest tagged `latest`,
/// and a `medium`-byte layer outside the manifest (so the manifest is the same as before it).
pub async fn seed(
    client: &reqwest::Client,
    base: &str,
    big: u64,
    medium: u64,
    small: u64,
) -> Result<Seeded> {
    let repo = "bench/app".to_owned();
    let seed = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(1, |d| d.as_nanos() as u64);
    let big_data = tokio::task::spawn_blocking(move || random_bytes(big as usize, seed)).await?;
    let big = push_blob(client, base, &repo, big_data).await?;
    let small = push_blob(client, base, &repo, random_bytes(small as usize, seed ^ 1)).await?;
    let medium = push_blob(client, base, &repo, random_bytes(medium as usize, seed ^ 2)).await?;
    let config = serde_json::to_vec(&serde_json::json!({
        "architecture": "amd64",
        "os": "linux",
        "config": {},
        "rootfs": { "type": "layers", "diff_ids": [big.digest, small.digest] },
    }))?;
    let config = push_blob(client, base, &repo, config).await?;
    let descriptor = |media: &str, p: &Pushed| serde_json::json!({ "mediaType": media, "digest": p.digest, "size": p.size });
    let manifest = serde_json::to_vec(&serde_json::json!({
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "config": descriptor(OCI_CONFIG, &config),
        "layers": [descriptor(OCI_LAYER, &big), descriptor(OCI_LAYER, &small)],
    }))?;
    let tag = "latest".to_owned();
    let pushed = Pushed {
        digest: sha256(&manifest),
        size: manifest.len() as u64,
    };
    let resp = client
        .put(format!("{base}/v2/{repo}/manifests/{tag}"))
        .header("content-type", OCI_MANIFEST)
        .body(manifest)
        .send()
        .await?;
    ensure!(
        resp.status() == 201,
        "pushing the manifest: {} {}",
        resp.status(),
        resp.text().await.unwrap_or_default()
    );
    Ok(Seeded {
        repo,
        big,
        medium,
        small,
        tag,
        manifest: pushed,
    })
}

/// Writes `count` tiny blobs into `<root>/blobs/sha256/<hex>` (real digests of their contents),
/// each linked to `repo` of the upstream named `upstream` (the record a fill writes: stored
/// bytes are served under a pair only once it is linked), and returns the digest and contents
/// of the last one, to ask for after start-up.
pub fn fill_store(
    root: &Path,
    upstream: &str,
    repo: &str,
    count: usize,
) -> Result<(String, Vec<u8>)> {
    let dir = root.join("blobs/sha256");
    let links = root.join(format!("meta/links/{upstream}/{repo}/_links/sha256"));
    fs::create_dir_all(&dir)?;
    fs::create_dir_all(&links)?;
    let mut last = None;
    for i in 0..count {
        let data = format!("entrepot start-up blob {i}\n").into_bytes();
        let digest = sha256(&data);
        let hex = digest.trim_start_matches("sha256:");
        fs::write(dir.join(hex), &data).with_context(|| format!("writing blob {i} of {count}"))?;
        fs::write(links.join(hex), b"")?;
        last = Some((digest, data));
    }
    // No tags to link at start-up: say so, as a store that had links from the start would.
    fs::write(root.join("meta/links-ready"), b"1\n")?;
    last.context("no blobs asked for")
}
