//! What an image needs and what the bundle calls it: the closure of a manifest or index (its
//! config, layers, platform manifests and artifact blobs), walked the same way for export (from
//! the store) and import (from the bundle, then the store); and the index.json descriptors that
//! name the images.

use std::collections::BTreeMap;
use std::io::{self, Read};

use serde::{Deserialize, Serialize};

use super::{
    upstream_name, ANN_CONTAINERD_NAME, ANN_REF_NAME, ANN_REPOSITORY, ANN_TAG, ANN_UPSTREAM,
};
use crate::cache::pins;
use crate::config::{parse_image_ref, PinConfig};
use crate::oci::{media, Digest, Reference, RepoName, Tag};
use crate::tools::blocking::BlockingStore;
use crate::tools::maintenance::Target;

/// Where blobs are read from while walking an image.
pub(super) trait Source {
    /// The blob's size, if it is here.
    fn size(&self, d: &Digest) -> io::Result<Option<u64>>;
    fn open(&self, d: &Digest) -> io::Result<Box<dyn Read>>;
}

pub(super) struct StoreSource<'a> {
    pub(super) store: &'a BlockingStore,
}

impl Source for StoreSource<'_> {
    fn size(&self, d: &Digest) -> io::Result<Option<u64>> {
        self.store.wait(self.store.store().blobs().stat(d))
    }

    fn open(&self, d: &Digest) -> io::Result<Box<dyn Read>> {
        match self.store.wait(self.store.store().blobs().open(d))? {
            Some(data) => Ok(Box::new(io::Cursor::new(data))),
            None => Err(io::Error::new(
                io::ErrorKind::NotFound,
                format!("{d} is not in the store"),
            )),
        }
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
pub(super) struct Closure {
    /// Every digest, with its size.
    pub(super) blobs: BTreeMap<Digest, u64>,
    /// The manifests among them, with the media type they were referenced with: the root's
    /// from its descriptor, a platform manifest's from its index, else the body's own.
    pub(super) manifests: BTreeMap<Digest, String>,
}

impl Closure {
    pub(super) fn extend(&mut self, other: &Closure) {
        self.blobs
            .extend(other.blobs.iter().map(|(d, s)| (d.clone(), *s)));
        self.manifests
            .extend(other.manifests.iter().map(|(d, m)| (d.clone(), m.clone())));
    }
}

/// Why a walk stopped.
#[derive(Debug)]
pub(super) enum WalkError {
    Missing {
        digest: Digest,
        /// The manifest that references it (`None`: the image's own manifest). Boxed, as is
        /// `Size`'s: two digests inline made every `Result` of a walk 160 bytes.
        parent: Option<Box<Digest>>,
    },
    Size {
        digest: Digest,
        actual: u64,
        expected: u64,
        parent: Option<Box<Digest>>,
    },
    BadManifest {
        digest: Digest,
        why: String,
    },
    Io(io::Error),
}

/// Walks the image whose manifest (or index) is `root`: every digest it needs must be in
/// `src`, with the size its descriptor gives.
pub(super) fn walk(
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
                parent: parent.clone().map(Box::new),
            })?;
        if let Some(expected) = child.size.filter(|e| *e != actual) {
            return Err(WalkError::Size {
                digest: child.digest,
                actual,
                expected,
                parent: parent.map(Box::new),
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
// index.json: the descriptors that name the images

#[derive(Debug, Serialize, Deserialize)]
pub(super) struct Descriptor {
    #[serde(rename = "mediaType", default)]
    pub(super) media_type: String,
    pub(super) digest: String,
    pub(super) size: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(super) annotations: Option<BTreeMap<String, String>>,
}

#[derive(Debug, Serialize, Deserialize)]
pub(super) struct Index {
    #[serde(rename = "schemaVersion")]
    pub(super) schema_version: u32,
    #[serde(rename = "mediaType", default, skip_serializing_if = "Option::is_none")]
    pub(super) media_type: Option<String>,
    pub(super) manifests: Vec<Descriptor>,
}

pub(super) fn annotations(name: &PinConfig) -> BTreeMap<String, String> {
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
pub(super) fn descriptor_name(
    t: &Target,
    desc: &Descriptor,
    digest: &Digest,
) -> Result<PinConfig, String> {
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

#[cfg(test)]
mod tests {
    use std::path::PathBuf;

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
