//! Pins recorded in the store (by `entrepot prefetch` and `entrepot import`), beside the
//! `[[pin]]` entries of the configuration: `meta/pins`, one image reference a line.

use std::io;
use std::path::{Path, PathBuf};

use crate::config::{parse_image_ref, PinConfig};
use crate::oci::Reference;

pub fn path(root: &Path) -> PathBuf {
    root.join("meta/pins")
}

/// `upstream/repo:tag` or `upstream/repo@digest`.
pub fn format(p: &PinConfig) -> String {
    match &p.reference {
        Reference::Tag(t) => format!("{}/{}:{t}", p.upstream, p.repo),
        Reference::Digest(d) => format!("{}/{}@{d}", p.upstream, p.repo),
    }
}

/// The pins recorded in the store (unreadable lines are skipped with a warning).
pub fn load(root: &Path) -> io::Result<Vec<PinConfig>> {
    let text = match std::fs::read_to_string(path(root)) {
        Ok(t) => t,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(e),
    };
    Ok(text
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .filter_map(|l| match parse_image_ref(l) {
            Ok(p) => Some(p),
            Err(e) => {
                tracing::warn!(line = l, error = %e, "ignoring unreadable pin");
                None
            }
        })
        .collect())
}

/// Adds pins (those already recorded are not repeated). The file is replaced atomically.
pub fn add(root: &Path, new: &[PinConfig]) -> io::Result<()> {
    let mut pins = load(root)?;
    let before = pins.len();
    for p in new {
        if !pins.contains(p) {
            pins.push(p.clone());
        }
    }
    if pins.len() == before {
        return Ok(());
    }
    let text: String = pins.iter().map(|p| format!("{}\n", format(p))).collect();
    let dest = path(root);
    let tmp = dest.with_extension("new");
    std::fs::write(&tmp, text)?;
    std::fs::rename(&tmp, &dest)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn add_and_load() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(dir.path().join("meta")).unwrap();
        let a = parse_image_ref("docker.io/alpine:3.20").unwrap();
        let b = parse_image_ref(&format!("ghcr.io/org/app@sha256:{}", "a".repeat(64))).unwrap();
        add(dir.path(), std::slice::from_ref(&a)).unwrap();
        add(dir.path(), &[a.clone(), b.clone()]).unwrap();
        assert_eq!(load(dir.path()).unwrap(), vec![a.clone(), b]);
        assert_eq!(format(&a), "docker.io/library/alpine:3.20");
    }
}
