//! Pins recorded in the store (by `entrepot prefetch`, `entrepot import` and `POST /pins`),
//! beside the `[[pin]]` entries of the configuration: one image reference a line, in the
//! `meta/pins` record (read and written by `Store`).

use crate::config::{parse_image_ref, PinConfig};
use crate::oci::Reference;

/// `upstream/repo:tag` or `upstream/repo@digest`.
pub fn format(p: &PinConfig) -> String {
    match &p.reference {
        Reference::Tag(t) => format!("{}/{}:{t}", p.upstream, p.repo),
        Reference::Digest(d) => format!("{}/{}@{d}", p.upstream, p.repo),
    }
}

/// The pins of a record (unreadable lines are skipped with a warning).
pub fn parse(text: &str) -> Vec<PinConfig> {
    text.lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .filter_map(|l| match parse_image_ref(l) {
            Ok(p) => Some(p),
            Err(e) => {
                tracing::warn!(line = l, error = %e, "ignoring unreadable pin");
                None
            }
        })
        .collect()
}

/// The record of `pins`.
pub fn render(pins: &[PinConfig]) -> String {
    pins.iter().map(|p| format!("{}\n", format(p))).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn render_and_parse_round_trip() {
        let a = parse_image_ref("docker.io/alpine:3.20").unwrap();
        let b = parse_image_ref(&format!("ghcr.io/org/app@sha256:{}", "a".repeat(64))).unwrap();
        assert_eq!(format(&a), "docker.io/library/alpine:3.20");
        let text = render(&[a.clone(), b.clone()]);
        assert_eq!(
            parse(&format!("# comment\n{text}\nnot a reference\n")),
            vec![a, b]
        );
    }
}
