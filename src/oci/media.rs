//! Media types and `Accept` negotiation for manifests.

/// The manifest media types entrepot knows, for sniffing a body that came without a usable
/// `Content-Type`.
pub const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
pub const OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";
pub const DOCKER_MANIFEST: &str = "application/vnd.docker.distribution.manifest.v2+json";
pub const DOCKER_LIST: &str = "application/vnd.docker.distribution.manifest.list.v2+json";
pub const DOCKER_V1_SIGNED: &str = "application/vnd.docker.distribution.manifest.v1+prettyjws";

/// Does a request with these `Accept` header values accept `media_type`? No `Accept` at all
/// accepts anything; `q=0` refuses; `*/*` and `type/*` match as usual.
pub fn accepts<'a>(accept: impl IntoIterator<Item = &'a str>, media_type: &str) -> bool {
    let mut any_header = false;
    let media_type = essence(media_type);
    for value in accept {
        for item in value.split(',') {
            let mut parts = item.split(';');
            let range = parts.next().unwrap_or("").trim();
            if range.is_empty() {
                continue;
            }
            any_header = true;
            let refused = parts.any(|p| {
                let p = p.trim();
                p.strip_prefix("q=")
                    .and_then(|q| q.trim().parse::<f32>().ok())
                    .is_some_and(|q| q <= 0.0)
            });
            if refused {
                continue;
            }
            if range == "*/*" || range.eq_ignore_ascii_case(media_type) {
                return true;
            }
            if let Some(prefix) = range.strip_suffix("/*") {
                if media_type
                    .split_once('/')
                    .is_some_and(|(t, _)| t.eq_ignore_ascii_case(prefix))
                {
                    return true;
                }
            }
        }
    }
    !any_header
}

/// The media type without parameters (`; charset=...`).
pub fn essence(media_type: &str) -> &str {
    media_type.split(';').next().unwrap_or("").trim()
}

/// The media type a manifest body declares in its `mediaType` field, if any; schema 1
/// manifests (which have none) are recognised by their `schemaVersion`.
pub fn sniff(body: &[u8]) -> Option<String> {
    #[derive(serde::Deserialize)]
    struct Probe {
        #[serde(rename = "mediaType")]
        media_type: Option<String>,
        #[serde(rename = "schemaVersion")]
        schema_version: Option<u32>,
        manifests: Option<serde_json::Value>,
        signatures: Option<serde_json::Value>,
    }
    let p: Probe = serde_json::from_slice(body).ok()?;
    match (p.media_type, p.schema_version) {
        (Some(mt), _) => Some(mt),
        (None, Some(1)) if p.signatures.is_some() => Some(DOCKER_V1_SIGNED.to_string()),
        (None, Some(2)) if p.manifests.is_some() => Some(OCI_INDEX.to_string()),
        (None, Some(2)) => Some(OCI_MANIFEST.to_string()),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accept_matching() {
        assert!(accepts([], OCI_MANIFEST));
        assert!(accepts([OCI_MANIFEST], OCI_MANIFEST));
        assert!(accepts(
            [&format!("{DOCKER_MANIFEST}, {OCI_MANIFEST}") as &str],
            OCI_MANIFEST
        ));
        assert!(accepts([DOCKER_MANIFEST, OCI_INDEX], OCI_INDEX));
        assert!(!accepts([DOCKER_MANIFEST], OCI_INDEX));
        assert!(accepts(["*/*"], OCI_INDEX));
        assert!(accepts(["application/*"], OCI_INDEX));
        assert!(!accepts(["text/*"], OCI_INDEX));
        assert!(!accepts([&format!("{OCI_INDEX};q=0") as &str], OCI_INDEX));
        assert!(accepts([&format!("{OCI_INDEX}; q=0.5") as &str], OCI_INDEX));
        assert!(accepts([OCI_INDEX], &format!("{OCI_INDEX}; charset=utf-8")));
    }

    #[test]
    fn sniffing() {
        assert_eq!(
            sniff(br#"{"schemaVersion":2,"mediaType":"x/y"}"#).as_deref(),
            Some("x/y")
        );
        assert_eq!(
            sniff(br#"{"schemaVersion":2,"manifests":[]}"#).as_deref(),
            Some(OCI_INDEX)
        );
        assert_eq!(
            sniff(br#"{"schemaVersion":2,"layers":[]}"#).as_deref(),
            Some(OCI_MANIFEST)
        );
        assert_eq!(sniff(b"not json"), None);
    }
}
