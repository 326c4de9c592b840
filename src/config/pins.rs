//! `[[pin]]`: images never evicted, named as `registry/repository:tag` or `@digest`.

use serde::Deserialize;

use super::upstream::UpstreamConfig;
use super::{invalid, ConfigError};

/// A pinned image: an upstream, a repository and a tag or digest.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PinConfig {
    pub upstream: String,
    pub repo: crate::oci::RepoName,
    pub reference: crate::oci::Reference,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawPin {
    image: Option<String>,
}

/// The `[[pin]]` tables, validated: each names an image of a configured upstream.
pub(super) fn validate_pins(
    raw: Vec<RawPin>,
    upstreams: &[UpstreamConfig],
) -> Result<Vec<PinConfig>, ConfigError> {
    raw.into_iter()
        .enumerate()
        .map(|(i, p)| {
            let key = format!("pin[{i}].image");
            let image = p.image.ok_or_else(|| invalid(&key, "is required"))?;
            let pin = parse_image_ref(&image).map_err(|e| invalid(&key, e))?;
            if !upstreams.iter().any(|u| u.matches(&pin.upstream)) {
                return Err(invalid(
                    &key,
                    format!("{image:?} names no configured upstream"),
                ));
            }
            Ok(pin)
        })
        .collect()
}

/// `docker.io/library/alpine:3.20`, `ghcr.io/org/app@sha256:...`: the first component names
/// the upstream; a bare `alpine:3.20` is refused (say which registry).
pub fn parse_image_ref(s: &str) -> Result<PinConfig, String> {
    use crate::oci::{Reference, RepoName};
    let (upstream, rest) = s.split_once('/').ok_or_else(|| {
        format!("{s:?} must start with the registry, as in docker.io/library/alpine:3.20")
    })?;
    let (name, reference) = if let Some((n, d)) = rest.split_once('@') {
        (n, d.to_string())
    } else {
        match rest.rsplit_once(':') {
            Some((n, t)) if !t.contains('/') => (n, t.to_string()),
            _ => (rest, "latest".to_string()),
        }
    };
    let mut repo: RepoName = name
        .parse()
        .map_err(|e| format!("{s:?}: repository {name:?}: {e}"))?;
    if upstream == "docker.io" {
        repo = repo.with_library_prefix();
    }
    let reference: Reference = reference
        .parse()
        .map_err(|e| format!("{s:?}: reference {reference:?}: {e}"))?;
    Ok(PinConfig {
        upstream: upstream.to_string(),
        repo,
        reference,
    })
}
