//! What the store holds, listed through its backends: blobs with their sizes and commit times,
//! stored manifests with the digests they reference, and tag records. Used by eviction, the
//! periodic sweep and the `entrepot cache` commands; never on a request's path.

use std::collections::{HashMap, HashSet};
use std::io;

use super::{layout, Store};
use crate::oci::Digest;

/// One tag record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TagRef {
    pub upstream: String,
    pub repo: String,
    pub tag: String,
    pub digest: Digest,
    /// Its key (`layout::tag`).
    pub key: String,
}

#[derive(Debug, Default)]
pub struct Inventory {
    /// Every blob (layers, configs, manifests): size and commit time in Unix milliseconds.
    pub blobs: HashMap<Digest, (u64, u64)>,
    /// Stored manifests (media type recorded and bytes present) → the digests they reference.
    pub manifests: HashMap<Digest, Vec<Digest>>,
    pub tags: Vec<TagRef>,
    /// Media-type records (keys) whose manifest bytes are gone.
    pub dangling_manifest_meta: Vec<String>,
}

impl Inventory {
    pub fn total_bytes(&self) -> u64 {
        self.blobs.values().map(|(s, _)| s).sum()
    }

    /// `root` and everything it references, transitively, that is in the store.
    pub fn closure(&self, root: &Digest) -> HashSet<Digest> {
        let mut seen = HashSet::new();
        let mut stack = vec![root.clone()];
        while let Some(d) = stack.pop() {
            if !self.blobs.contains_key(&d) || !seen.insert(d.clone()) {
                continue;
            }
            if let Some(children) = self.manifests.get(&d) {
                stack.extend(children.iter().cloned());
            }
        }
        seen
    }

    /// Manifests no other stored manifest references: the images (an index with its platform
    /// manifests, or a single manifest).
    pub fn roots(&self) -> Vec<Digest> {
        let referenced: HashSet<&Digest> = self.manifests.values().flatten().collect();
        let mut roots: Vec<Digest> = self
            .manifests
            .keys()
            .filter(|d| !referenced.contains(d) && self.blobs.contains_key(*d))
            .cloned()
            .collect();
        roots.sort();
        roots
    }
}

/// One image as `entrepot cache ls` and the status page list it: a tag, or a stored image no
/// tag points at.
#[derive(Debug, Clone)]
pub struct ImageRow {
    /// `None`: untagged.
    pub tag: Option<TagRef>,
    pub digest: Digest,
    /// The bytes of its closure that are in the store.
    pub size: u64,
    /// The latest use of any of its parts (a use stamp); `None` when nothing of it is stored.
    pub last_used: Option<u64>,
    /// Its manifest is stored (a tag can outlive it).
    pub complete: bool,
}

impl Inventory {
    /// Every tag with its image, then every image no tag points at (in digest order).
    ///
    /// Over numbered blobs ([`Numbered`](super::numbered::Numbered)) and the last uses asked
    /// once for all: a set of cloned digests and a lookup of each blob's size and use per tag
    /// was most of `entrepot cache ls` at a million blobs beside the listing (issue 13).
    pub fn images(&self, usage: &super::usage::Usage) -> Vec<ImageRow> {
        let numbered = super::numbered::Numbered::new(self);
        let used = usage.last_uses_in(self, numbered.blobs.iter().map(|b| b.1));
        let tag_numbers = numbered.numbers_of(self.tags.iter().map(|t| &t.digest));
        let mut seen = vec![0u32; numbered.blobs.len()];
        let mut tagged = vec![false; numbered.blobs.len()];
        let mut stack = Vec::new();
        let mut walks = 0;
        let mut row = |tag: Option<TagRef>, d: &Digest, n: Option<u32>| {
            let (mut size, mut last_used) = (0, None);
            if let Some(n) = n {
                walks += 1;
                numbered.walk(n, &mut seen, walks, &mut stack, |i| {
                    size += numbered.blobs[i as usize].2;
                    last_used = last_used.max(Some(used[i as usize]));
                });
            }
            ImageRow {
                size,
                last_used,
                complete: self.manifests.contains_key(d),
                tag,
                digest: d.clone(),
            }
        };
        let mut out = Vec::with_capacity(self.tags.len());
        for (t, n) in self.tags.iter().zip(tag_numbers) {
            if let Some(n) = n {
                tagged[n as usize] = true;
            }
            out.push(row(Some(t.clone()), &t.digest, n));
        }
        for &root in &numbered.roots {
            if !tagged[root as usize] {
                let d = numbered.blobs[root as usize].1;
                out.push(row(None, d, Some(root)));
            }
        }
        out
    }
}

/// The digests a manifest or index references: config, layers, platform manifests (and
/// schema 1's fsLayers). `subject` is not followed: a signature does not own its image.
pub fn references(body: &[u8]) -> Vec<Digest> {
    // Read into borrowed fields when the manifest is shaped as manifests are (every store
    // listing reads each of its manifests: a tree of JSON values, each string and table on the
    // heap, was most of that); anything else the slow way, which defines the answer.
    let object = body.iter().find(|b| !b.is_ascii_whitespace()) == Some(&b'{');
    if !object {
        return Vec::new();
    }
    match serde_json::from_slice::<Listed>(body) {
        Ok(l) => {
            let items = [l.layers, l.manifests, l.blobs];
            std::iter::once(l.config.and_then(|c| c.0))
                .chain(items.into_iter().flatten().flatten().map(|i| i.0))
                .chain(l.fs_layers.into_iter().flatten().map(|i| i.0))
                .flatten()
                .filter_map(|d| d.parse().ok())
                .collect()
        }
        Err(_) => references_of_any(body),
    }
}

/// [`references`] of any JSON: what a value names where a manifest names its references.
fn references_of_any(body: &[u8]) -> Vec<Digest> {
    let Ok(v) = serde_json::from_slice::<serde_json::Value>(body) else {
        return Vec::new();
    };
    let mut out = Vec::new();
    let mut push = |d: Option<&serde_json::Value>| {
        if let Some(d) = d.and_then(|d| d.as_str()).and_then(|d| d.parse().ok()) {
            out.push(d);
        }
    };
    push(v.get("config").and_then(|c| c.get("digest")));
    for key in ["layers", "manifests", "blobs"] {
        for item in v.get(key).and_then(|l| l.as_array()).into_iter().flatten() {
            push(item.get("digest"));
        }
    }
    for item in v
        .get("fsLayers")
        .and_then(|l| l.as_array())
        .into_iter()
        .flatten()
    {
        push(item.get("blobSum"));
    }
    out
}

/// A manifest's referencing fields, borrowed from its text. Any other shape (a field of
/// another type, a string with escapes, a repeated field) fails and is read the slow way.
#[derive(serde::Deserialize)]
struct Listed<'a> {
    #[serde(borrow, default)]
    config: Option<Named<'a, false>>,
    #[serde(borrow, default)]
    layers: Option<Vec<Named<'a, false>>>,
    #[serde(borrow, default)]
    manifests: Option<Vec<Named<'a, false>>>,
    #[serde(borrow, default)]
    blobs: Option<Vec<Named<'a, false>>>,
    #[serde(borrow, default, rename = "fsLayers")]
    fs_layers: Option<Vec<Named<'a, true>>>,
}

/// A descriptor's `digest` (schema 1's `blobSum` when `BLOB_SUM`), if it is a string. Only
/// from a JSON object: serde's derived structs also take arrays, which name nothing here.
struct Named<'a, const BLOB_SUM: bool>(Option<&'a str>);

impl<'de: 'a, 'a, const BLOB_SUM: bool> serde::Deserialize<'de> for Named<'a, BLOB_SUM> {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Fields<'a, const B: bool>(std::marker::PhantomData<&'a ()>);
        impl<'de: 'a, 'a, const B: bool> serde::de::Visitor<'de> for Fields<'a, B> {
            type Value = Named<'a, B>;

            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a descriptor")
            }

            fn visit_map<M: serde::de::MapAccess<'de>>(
                self,
                mut m: M,
            ) -> Result<Self::Value, M::Error> {
                let field = if B { "blobSum" } else { "digest" };
                let mut found = None;
                while let Some(key) = m.next_key::<std::borrow::Cow<'de, str>>()? {
                    if key == field {
                        // The last one, as a map of the object would keep.
                        found = m.next_value::<Option<&'de str>>()?;
                    } else {
                        m.next_value::<serde::de::IgnoredAny>()?;
                    }
                }
                Ok(Named(found))
            }
        }
        d.deserialize_map(Fields::<BLOB_SUM>(std::marker::PhantomData))
    }
}

/// Records read in one call to the backend while listing (one blocking task on disk), and
/// calls in flight at once: read one at a time, each a hop to the blocking pool or a request
/// to the bucket, the 200k manifest and tag records of a 1M-blob store were most of a sweep
/// (issue 13).
const READ_BATCH: usize = 64;
const BATCHES_AT_ONCE: usize = 4;

impl Inventory {
    /// Lists the store. Blobs first, then manifest records (a manifest's bytes are stored
    /// before its record, so a record seen later is never mistaken for a dangling one), then
    /// tags.
    pub async fn load(store: &Store) -> io::Result<Inventory> {
        use futures_util::{StreamExt as _, TryStreamExt as _};

        let mut inv = Inventory::default();
        let began = std::time::Instant::now();
        let listed = store.blobs().list().await?;
        let listed_ms = began.elapsed().as_millis() as u64;
        // Sized once: growing a table of a million blobs by doubling holds the old table and
        // the new one at once, several times over (issue 13).
        inv.blobs.reserve(listed.len());
        for b in listed {
            inv.blobs.insert(b.digest, (b.size, b.committed_ms));
        }
        let records: Vec<(Digest, String)> = store
            .meta()
            .list(layout::MANIFESTS)
            .await?
            .into_iter()
            .filter_map(|key| Some((layout::parse_digest_key(&key)?, key)))
            .collect();
        // Batches by index: with a stream of borrowed slices the compiler cannot show the
        // future is `Send` (its closures would take a reference of any lifetime).
        let records = &records;
        let mut manifests = futures_util::stream::iter(0..records.len().div_ceil(READ_BATCH))
            .map(|i| async move {
                let batch = &records[i * READ_BATCH..((i + 1) * READ_BATCH).min(records.len())];
                let digests: Vec<Digest> = batch.iter().map(|(d, _)| d.clone()).collect();
                let bodies = store.blobs().read_many(&digests).await?;
                io::Result::Ok((batch, bodies))
            })
            .buffer_unordered(BATCHES_AT_ONCE);
        while let Some((batch, bodies)) = manifests.try_next().await? {
            for ((digest, key), body) in batch.iter().zip(bodies) {
                match body {
                    Some(body) => {
                        inv.manifests.insert(digest.clone(), references(&body));
                    }
                    None => inv.dangling_manifest_meta.push(key.clone()),
                }
            }
        }
        drop(manifests);
        let manifests_ms = began.elapsed().as_millis() as u64 - listed_ms;
        inv.dangling_manifest_meta.sort();
        let keys = &store.meta().list(layout::TAGS).await?;
        let mut records = futures_util::stream::iter(0..keys.len().div_ceil(READ_BATCH))
            .map(|i| async move {
                let batch = &keys[i * READ_BATCH..((i + 1) * READ_BATCH).min(keys.len())];
                io::Result::Ok((batch, store.meta().get_many(batch).await?))
            })
            .buffer_unordered(BATCHES_AT_ONCE);
        while let Some((batch, texts)) = records.try_next().await? {
            for (key, text) in batch.iter().zip(texts) {
                if let Some(t) = text.and_then(|text| tag_ref(key, &text)) {
                    inv.tags.push(t);
                }
            }
        }
        drop(records);
        tracing::debug!(
            blobs = inv.blobs.len(),
            listed_ms,
            manifests = inv.manifests.len(),
            manifests_ms,
            tags = inv.tags.len(),
            tags_ms = began.elapsed().as_millis() as u64 - listed_ms - manifests_ms,
            "listed the store"
        );
        inv.tags
            .sort_by(|a, b| (&a.upstream, &a.repo, &a.tag).cmp(&(&b.upstream, &b.repo, &b.tag)));
        Ok(inv)
    }
}

/// The tag a tag record names; `None` for a key or record that is not one.
fn tag_ref(key: &str, text: &[u8]) -> Option<TagRef> {
    #[derive(serde::Deserialize)]
    struct Rec {
        digest: String,
    }
    let (upstream, repo, tag) = layout::parse_tag_key(key)?;
    let digest = serde_json::from_slice::<Rec>(text)
        .ok()?
        .digest
        .parse()
        .ok()?;
    Some(TagRef {
        upstream,
        repo: repo.to_string(),
        tag: tag.to_string(),
        digest,
        key: key.to_owned(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn d(s: &str) -> Digest {
        Digest::sha256_of(s.as_bytes())
    }

    #[test]
    fn references_of_manifests_and_indexes() {
        let a = d("a");
        let b = d("b");
        let m = format!(
            r#"{{"config":{{"digest":"{a}"}},"layers":[{{"digest":"{b}"}}],"subject":{{"digest":"{a}"}}}}"#
        );
        assert_eq!(references(m.as_bytes()), vec![a.clone(), b.clone()]);
        let i = format!(r#"{{"manifests":[{{"digest":"{a}"}},{{"digest":"{b}"}}]}}"#);
        assert_eq!(references(i.as_bytes()), vec![a, b]);
        assert!(references(b"junk").is_empty());
    }

    /// Shapes the quick reading must not read differently from the slow one: descriptors as
    /// arrays, fields of other types, escaped and repeated fields, other top-level values.
    #[test]
    fn odd_manifests_name_what_any_json_would() {
        let a = d("a");
        let escaped = a.to_string().replacen(':', "\\u003a", 1);
        let cases = [
            format!(r#"{{"config":["{a}"],"layers":[["{a}"]]}}"#),
            format!(r#"{{"config":{{"digest":"{a}","digest":"junk"}}}}"#),
            format!(r#"{{"config":{{"digest":"junk","digest":"{a}"}}}}"#),
            format!(r#"{{"layers":[{{"digest":"{escaped}"}}]}}"#),
            format!(r#"{{"layers":[{{"digest":7}},{{"digest":"{a}"}}]}}"#),
            format!(r#"{{"layers":{{"digest":"{a}"}},"manifests":null,"blobs":"{a}"}}"#),
            format!(r#"{{"fsLayers":[{{"blobSum":"{a}","digest":"junk"}}],"config":null}}"#),
            format!(r#"{{"layers":[],"layers":[{{"digest":"{a}"}}]}}"#),
            format!(r#"[{{"digest":"{a}"}}]"#),
            format!(r#""{a}""#),
            "{".to_string(),
        ];
        for body in cases {
            assert_eq!(
                references(body.as_bytes()),
                references_of_any(body.as_bytes()),
                "{body}"
            );
        }
        assert_eq!(
            references(format!(r#"{{"layers":[{{"digest":"{escaped}"}}]}}"#).as_bytes()),
            vec![a]
        );
    }
}

/// The quick reading of manifests answers as reading them as any JSON does.
#[cfg(test)]
mod properties {
    use proptest::prelude::*;
    use serde_json::{json, Value};

    use super::*;
    use crate::oci::digest::arbitrary::digest_string;

    /// A value where a manifest names a digest: mostly a digest, sometimes anything else.
    fn named() -> impl Strategy<Value = Value> {
        prop_oneof![
            4 => digest_string().prop_map(Value::from),
            1 => Just(Value::Null),
            1 => any::<i32>().prop_map(Value::from),
            1 => "[a-z:0-9]{0,8}".prop_map(Value::from),
            1 => digest_string().prop_map(|d| json!([d])),
        ]
    }

    fn descriptor() -> impl Strategy<Value = Value> {
        prop_oneof![
            6 => (named(), any::<bool>(), any::<u32>()).prop_map(|(d, sum, size)| {
                let key = if sum { "blobSum" } else { "digest" };
                json!({ key: d, "size": size, "mediaType": "x" })
            }),
            1 => named(),
            1 => Just(json!({})),
        ]
    }

    fn list() -> impl Strategy<Value = Value> {
        prop_oneof![
            6 => proptest::collection::vec(descriptor(), 0..5).prop_map(Value::from),
            1 => descriptor(),
            1 => Just(Value::Null),
        ]
    }

    fn manifest() -> impl Strategy<Value = Value> {
        let field = prop_oneof![
            Just("config"),
            Just("layers"),
            Just("manifests"),
            Just("blobs"),
            Just("fsLayers"),
            Just("subject"),
            Just("annotations"),
        ];
        let value = prop_oneof![descriptor(), list()];
        prop_oneof![
            8 => proptest::collection::vec((field, value), 0..7)
                .prop_map(|f| Value::Object(f.into_iter().map(|(k, v)| (k.to_owned(), v)).collect())),
            1 => list(),
        ]
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

        #[test]
        fn manifests_name_what_any_json_would(m in manifest(), pretty in any::<bool>()) {
            let body = if pretty { serde_json::to_vec_pretty(&m) } else { serde_json::to_vec(&m) }.unwrap();
            prop_assert_eq!(references(&body), references_of_any(&body));
        }
    }
}
