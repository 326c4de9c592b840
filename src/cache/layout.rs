//! The store's layout: every key (an object key under S3, a path under the store root on
//! disk) is spelled here and nowhere else.
//!
//! ```text
//! blobs/<alg>/<hex>                         verified content (layers, configs, manifests)
//! meta/manifests/<alg>/<hex>                a stored manifest's media type
//! meta/tags/<upstream>/<repo>/_tags/<tag>   tag → digest, media type, size, fetched-at
//! meta/referrers/<upstream>/<repo>/_referrers/<alg>/<hex>
//!                                           a subject's referrers: stored index or none, fetched-at
//! meta/links/<upstream>/<repo>/_links/<alg>/<hex>  this upstream serves it for this repository
//! meta/links-ready                          the store's links were initialised
//! meta/pins                                 pins recorded by prefetch and import
//! meta/access                               last use of each blob (use stamps)
//! meta/access/<replica>                     the same, one record per replica (shared storage)
//! meta/journal                              commits, one JSON line each (a folder store)
//! meta/journal/<ms>-<writer>-<n>            commits, one object each (shared storage)
//! meta/generation                           bumped by tools that remove content
//! meta/uploads/<id>                         multipart uploads in progress (shared storage)
//! ```
//!
//! Local to one process (never in an object store): `tmp/` (fills in progress, emptied at
//! start-up), `lock`, and `quarantine/` (blobs `cache verify` found corrupt).
//!
//! Keys are built only from validated names (digests, repository names, tags, upstream names),
//! which cannot contain `..`, empty components or a leading `/`, so no key escapes the store.
//! `_tags` cannot be a repository component (components start with a letter or digit).

use std::path::{Path, PathBuf};

use crate::oci::{Digest, RepoName, Tag};

pub const BLOBS: &str = "blobs/";
pub const MANIFESTS: &str = "meta/manifests/";
pub const TAGS: &str = "meta/tags/";
pub const PINS: &str = "meta/pins";
pub const ACCESS: &str = "meta/access";
/// Shared storage: one use-stamp record per replica, merged when read.
pub const ACCESS_BY_REPLICA: &str = "meta/access/";
pub const JOURNAL: &str = "meta/journal";
/// Shared storage's journal: one object per entry.
pub const JOURNAL_ENTRIES: &str = "meta/journal/";
pub const GENERATION: &str = "meta/generation";
pub const UPLOADS: &str = "meta/uploads/";
pub const REFERRERS: &str = "meta/referrers/";
pub const LINKS: &str = "meta/links/";
/// Present once a store's tagged images were linked (stores from before links existed).
pub const LINKS_READY: &str = "meta/links-ready";

const TAGS_FOLDER: &str = "/_tags/";
const REFERRERS_FOLDER: &str = "/_referrers/";

/// `blobs/<alg>/<hex>`
pub fn blob(d: &Digest) -> String {
    format!("{BLOBS}{}/{}", d.algorithm().as_str(), d.hex())
}

/// `meta/manifests/<alg>/<hex>`: present once a manifest is stored (bytes first).
pub fn manifest_type(d: &Digest) -> String {
    format!("{MANIFESTS}{}/{}", d.algorithm().as_str(), d.hex())
}

/// `meta/tags/<upstream>/<repo>/_tags/<tag>`
pub fn tag(upstream: &str, repo: &RepoName, tag: &Tag) -> String {
    format!("{TAGS}{upstream}/{repo}{TAGS_FOLDER}{tag}")
}

/// `meta/links/<upstream>/<repo>/_links/<alg>/<hex>`: a read under this pair may see this digest.
pub fn link(upstream: &str, repo: &RepoName, d: &Digest) -> String {
    format!(
        "{LINKS}{upstream}/{repo}/_links/{}/{}",
        d.algorithm().as_str(),
        d.hex()
    )
}

/// `meta/referrers/<upstream>/<repo>/_referrers/<alg>/<hex>`: what the upstream last said the
/// referrers of `subject` are (the `_referrers` folder keeps a 64-hex repository component from
/// ever meeting a record's name).
pub fn referrers(upstream: &str, repo: &RepoName, subject: &Digest) -> String {
    format!(
        "{REFERRERS}{upstream}/{repo}{REFERRERS_FOLDER}{}/{}",
        subject.algorithm().as_str(),
        subject.hex()
    )
}

/// `meta/uploads/<id>`: the record of a multipart upload in progress (`id` hex-encoded).
pub fn upload(id_hex: &str) -> String {
    format!("{UPLOADS}{id_hex}")
}

/// `meta/journal/<unix ms>-<writer>-<n>`: one entry of a shared journal; keys sort by time.
pub fn journal_entry(unix_ms: u64, writer: &str, n: u64) -> String {
    format!("{JOURNAL_ENTRIES}{unix_ms:013}-{writer}-{n}")
}

/// The time (Unix ms) in a shared journal entry's key.
pub fn journal_entry_time(key: &str) -> Option<u64> {
    key.strip_prefix(JOURNAL_ENTRIES)?
        .split('-')
        .next()?
        .parse()
        .ok()
}

/// The digest a `blobs/...` or `meta/manifests/...` key names.
pub fn parse_digest_key(key: &str) -> Option<Digest> {
    let rest = key
        .strip_prefix(BLOBS)
        .or_else(|| key.strip_prefix(MANIFESTS))?;
    let (alg, hex) = rest.split_once('/')?;
    format!("{alg}:{hex}").parse().ok()
}

/// `(upstream, repository, tag)` of a tag key.
pub fn parse_tag_key(key: &str) -> Option<(String, RepoName, Tag)> {
    let rest = key.strip_prefix(TAGS)?;
    let (upstream, rest) = rest.split_once('/')?;
    let (repo, tag) = rest.rsplit_once(TAGS_FOLDER)?;
    Some((upstream.to_owned(), repo.parse().ok()?, tag.parse().ok()?))
}

/// Where a key lives under a store folder.
pub fn path(root: &Path, key: &str) -> PathBuf {
    root.join(key)
}

/// Fills in progress and other files being written (same file system as `blobs/`, so a commit
/// is a rename).
pub fn tmp_dir(root: &Path) -> PathBuf {
    root.join("tmp")
}

/// `meta/access/<replica>`
pub fn access_of(replica: &str) -> String {
    format!("{ACCESS_BY_REPLICA}{replica}")
}

/// This replica's name for itself in shared storage, kept in its local root.
pub fn replica_id_file(root: &Path) -> PathBuf {
    root.join("replica-id")
}

/// The lock one process holds on a store folder.
pub fn lock_file(root: &Path) -> PathBuf {
    root.join("lock")
}

/// Where `cache verify` moves blobs that do not match their digest.
pub fn quarantine_dir(root: &Path) -> PathBuf {
    root.join("quarantine")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_round_trip() {
        let d = Digest::sha256_of(b"x");
        assert_eq!(blob(&d), format!("blobs/sha256/{}", d.hex()));
        assert_eq!(parse_digest_key(&blob(&d)), Some(d.clone()));
        assert_eq!(parse_digest_key(&manifest_type(&d)), Some(d.clone()));
        assert_eq!(parse_digest_key("blobs/md5/abc"), None);
        assert_eq!(parse_digest_key("meta/pins"), None);

        let repo: RepoName = "library/alpine".parse().unwrap();
        let t: Tag = "3.20".parse().unwrap();
        let key = tag("docker.io", &repo, &t);
        assert_eq!(key, "meta/tags/docker.io/library/alpine/_tags/3.20");
        assert_eq!(parse_tag_key(&key), Some(("docker.io".into(), repo, t)));
        assert_eq!(parse_tag_key("meta/tags/u/_tags/x"), None);
        let app: RepoName = "org/app".parse().unwrap();
        assert_eq!(
            referrers("docker.io", &app, &d),
            format!(
                "meta/referrers/docker.io/org/app/_referrers/sha256/{}",
                d.hex()
            )
        );
    }
}

/// Properties of the keys built from what clients send: whatever names, tags and digests the
/// parsers accept, every key stays under its prefix, has no `.`, `..` or empty segment, stays
/// under the store folder as a path, and parses back to what it was built from.
#[cfg(test)]
mod properties {
    use std::path::Component;

    use proptest::prelude::*;

    use super::*;
    use crate::oci::digest::arbitrary::digest_string;
    use crate::oci::name::arbitrary::{grammar_name, grammar_tag, hostile};

    /// Upstream names as the config admits them (`check_upstream_name`).
    fn upstream_name() -> impl Strategy<Value = String> {
        "[a-z0-9][a-z0-9.:-]{0,30}"
    }

    fn repo() -> impl Strategy<Value = RepoName> {
        prop_oneof![grammar_name(), hostile()].prop_filter_map("not a name", |s| s.parse().ok())
    }

    fn tag_name() -> impl Strategy<Value = Tag> {
        prop_oneof![grammar_tag(), hostile()].prop_filter_map("not a tag", |s| s.parse().ok())
    }

    /// `key` is `prefix` followed by plain segments, and joined to a store folder it names a
    /// file inside that folder.
    fn assert_contained(key: &str, prefix: &str) -> Result<(), TestCaseError> {
        prop_assert!(key.starts_with(prefix), "{key:?} is not under {prefix:?}");
        for seg in key.split('/') {
            prop_assert!(!seg.is_empty() && seg != "." && seg != "..", "{key:?}");
            prop_assert!(!seg.contains(['\\', '\0', '%']), "{key:?}");
        }
        let root = Path::new("/srv/entrepot");
        let p = path(root, key);
        prop_assert!(p.starts_with(root));
        let rel = p.strip_prefix(root).unwrap();
        prop_assert!(
            rel.components().all(|c| matches!(c, Component::Normal(_))),
            "{key:?}"
        );
        prop_assert_eq!(rel.components().count(), key.split('/').count());
        Ok(())
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

        #[test]
        fn tag_and_link_keys_stay_under_their_prefix_and_parse_back(
            up in upstream_name(),
            repo in repo(),
            t in tag_name(),
            d in digest_string(),
        ) {
            let key = tag(&up, &repo, &t);
            assert_contained(&key, TAGS)?;
            prop_assert_eq!(parse_tag_key(&key), Some((up.clone(), repo.clone(), t)));
            let d: Digest = d.parse().unwrap();
            assert_contained(&link(&up, &repo, &d), LINKS)?;
        }

        #[test]
        fn referrer_keys_stay_under_their_prefix(
            up in upstream_name(),
            repo in repo(),
            d in digest_string(),
        ) {
            let d: Digest = d.parse().unwrap();
            assert_contained(&referrers(&up, &repo, &d), REFERRERS)?;
        }

        /// No key is the folder of another: a file never stands where a folder must be made
        /// (or the other way round), whatever names, tags and digests are asked for.
        #[test]
        fn no_key_is_the_folder_of_another(
            items in proptest::collection::vec(
                prop_oneof![
                    (upstream_name(), repo(), tag_name(), digest_string()),
                    // Few letters, so names and tags often share their leading parts.
                    (
                        prop_oneof![Just("u".to_string()), Just("v".to_string())],
                        proptest::collection::vec("[ab]{1,2}", 1..4)
                            .prop_map(|c| c.join("/").parse::<RepoName>().unwrap()),
                        "[ab_][ab_.-]{0,2}".prop_map(|t| t.parse::<Tag>().unwrap()),
                        digest_string(),
                    ),
                ],
                2..6,
            ),
        ) {
            let mut keys = Vec::new();
            for (up, repo, t, d) in &items {
                let d: Digest = d.parse().unwrap();
                keys.extend([
                    blob(&d),
                    manifest_type(&d),
                    tag(up, repo, t),
                    link(up, repo, &d),
                    referrers(up, repo, &d),
                ]);
            }
            for a in &keys {
                for b in &keys {
                    prop_assert!(!b.starts_with(&format!("{a}/")), "{a:?} is a folder of {b:?}");
                }
            }
        }

        #[test]
        fn digest_keys_stay_under_their_prefix_and_parse_back(d in digest_string()) {
            let d: Digest = d.parse().unwrap();
            assert_contained(&blob(&d), BLOBS)?;
            assert_contained(&manifest_type(&d), MANIFESTS)?;
            prop_assert_eq!(parse_digest_key(&blob(&d)), Some(d.clone()));
            prop_assert_eq!(parse_digest_key(&manifest_type(&d)), Some(d));
        }

        /// Reading keys back never panics, and a key that parses is the one its parts build.
        #[test]
        fn a_key_that_parses_is_the_key_its_parts_build(
            rest in prop_oneof![
                hostile(),
                (grammar_name(), grammar_tag()).prop_map(|(n, t)| format!("{n}/_tags/{t}")),
            ],
            up in prop_oneof![upstream_name(), hostile()],
            digest_like in prop_oneof![hostile(), digest_string().prop_map(|d| d.replace(':', "/"))],
        ) {
            let key = format!("{TAGS}{up}/{rest}");
            if let Some((u, r, t)) = parse_tag_key(&key) {
                prop_assert_eq!(tag(&u, &r, &t), key);
            }
            for prefix in [BLOBS, MANIFESTS] {
                let key = format!("{prefix}{digest_like}");
                if let Some(d) = parse_digest_key(&key) {
                    prop_assert!(key == blob(&d) || key == manifest_type(&d), "{key:?}");
                }
            }
        }
    }
}
