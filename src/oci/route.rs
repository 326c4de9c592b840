//! Request paths of the pull API. Names contain `/`, so a path is parsed from the right:
//! `/v2/<name>/<kind>/<reference>`.

use super::digest::Digest;
use super::name::{NameError, Reference, RepoName};

/// What a `/v2/...` path asks for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Route {
    /// `/v2/`: the API version check.
    Base,
    /// `/v2/_catalog`: a registry-wide listing, which a proxy of several upstreams cannot answer.
    Catalog,
    /// `/v2/<name>/manifests/<tag|digest>`
    Manifest {
        name: RepoName,
        reference: Reference,
    },
    /// `/v2/<name>/blobs/<digest>`
    Blob { name: RepoName, digest: Digest },
    /// `/v2/<name>/tags/list`
    TagsList { name: RepoName },
    /// `/v2/<name>/referrers/<digest>`
    Referrers { name: RepoName, digest: Digest },
    /// `/v2/<name>/blobs/uploads/...`: the push side, which a pull-through cache refuses.
    Upload,
}

/// The kind of content a request is about, for log fields and metric labels.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Base,
    Manifest,
    Blob,
    TagsList,
    Referrers,
    Other,
}

impl Kind {
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::Base => "base",
            Kind::Manifest => "manifest",
            Kind::Blob => "blob",
            Kind::TagsList => "tags",
            Kind::Referrers => "referrers",
            Kind::Other => "other",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RouteError {
    #[error("not a registry API path")]
    NotFound,
    #[error(transparent)]
    Name(#[from] NameError),
}

impl Route {
    pub fn kind(&self) -> Kind {
        match self {
            Route::Base => Kind::Base,
            Route::Manifest { .. } => Kind::Manifest,
            Route::Blob { .. } => Kind::Blob,
            Route::TagsList { .. } => Kind::TagsList,
            Route::Referrers { .. } => Kind::Referrers,
            Route::Catalog | Route::Upload => Kind::Other,
        }
    }

    pub fn name(&self) -> Option<&RepoName> {
        match self {
            Route::Manifest { name, .. }
            | Route::Blob { name, .. }
            | Route::TagsList { name }
            | Route::Referrers { name, .. } => Some(name),
            _ => None,
        }
    }

    /// Parses a request path (without query string).
    pub fn parse(path: &str) -> Result<Route, RouteError> {
        let rest = path.strip_prefix("/v2").ok_or(RouteError::NotFound)?;
        if rest.is_empty() || rest == "/" {
            return Ok(Route::Base);
        }
        let p = rest.strip_prefix('/').ok_or(RouteError::NotFound)?;
        if p == "_catalog" {
            return Ok(Route::Catalog);
        }
        if let Some(name) = p.strip_suffix("/tags/list") {
            return Ok(Route::TagsList {
                name: name.parse()?,
            });
        }
        if is_upload(p) {
            return Ok(Route::Upload);
        }
        let mut parts = p.rsplitn(3, '/');
        let (reference, kind, name) = match (parts.next(), parts.next(), parts.next()) {
            (Some(r), Some(k), Some(n)) => (r, k, n),
            _ => return Err(RouteError::NotFound),
        };
        match kind {
            "manifests" => Ok(Route::Manifest {
                name: name.parse()?,
                reference: reference.parse()?,
            }),
            "blobs" => Ok(Route::Blob {
                name: name.parse()?,
                digest: reference.parse().map_err(NameError::from)?,
            }),
            "referrers" => Ok(Route::Referrers {
                name: name.parse()?,
                digest: reference.parse().map_err(NameError::from)?,
            }),
            _ => Err(RouteError::NotFound),
        }
    }
}

/// `<name>/blobs/uploads/` and `<name>/blobs/uploads/<session>`.
fn is_upload(p: &str) -> bool {
    let mut parts = p.rsplit('/');
    let last = parts.next();
    let second = parts.next();
    let third = parts.next();
    matches!((second, third), (Some("uploads"), Some("blobs")))
        || (last == Some("uploads") && second == Some("blobs"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn d() -> String {
        format!("sha256:{}", "ab".repeat(32))
    }

    #[test]
    fn parses_routes() {
        assert_eq!(Route::parse("/v2/").unwrap(), Route::Base);
        assert_eq!(Route::parse("/v2").unwrap(), Route::Base);
        assert_eq!(Route::parse("/v2/_catalog").unwrap(), Route::Catalog);
        match Route::parse("/v2/docker.io/library/alpine/manifests/3.20").unwrap() {
            Route::Manifest { name, reference } => {
                assert_eq!(name.as_str(), "docker.io/library/alpine");
                assert_eq!(reference.to_string(), "3.20");
            }
            r => panic!("{r:?}"),
        }
        match Route::parse(&format!("/v2/a/blobs/b/blobs/{}", d())).unwrap() {
            Route::Blob { name, digest } => {
                assert_eq!(name.as_str(), "a/blobs/b");
                assert_eq!(digest.to_string(), d());
            }
            r => panic!("{r:?}"),
        }
        assert!(matches!(
            Route::parse("/v2/a/b/tags/list").unwrap(),
            Route::TagsList { .. }
        ));
        assert!(matches!(
            Route::parse(&format!("/v2/a/referrers/{}", d())).unwrap(),
            Route::Referrers { .. }
        ));
        assert_eq!(Route::parse("/v2/a/blobs/uploads/").unwrap(), Route::Upload);
        assert_eq!(
            Route::parse("/v2/a/b/blobs/uploads/1234-abcd").unwrap(),
            Route::Upload
        );
    }

    #[test]
    fn refuses_bad_paths() {
        assert_eq!(Route::parse("/v1/x"), Err(RouteError::NotFound));
        assert_eq!(Route::parse("/v2x"), Err(RouteError::NotFound));
        assert_eq!(Route::parse("/v2/alpine"), Err(RouteError::NotFound));
        assert_eq!(
            Route::parse("/v2/a/whatever/latest"),
            Err(RouteError::NotFound)
        );
        assert!(matches!(
            Route::parse("/v2/../../etc/manifests/latest"),
            Err(RouteError::Name(NameError::Name))
        ));
        assert!(matches!(
            Route::parse("/v2/%2e%2e/blobs/sha256:00"),
            Err(RouteError::Name(NameError::Name))
        ));
        assert!(matches!(
            Route::parse("/v2/a/blobs/sha256:zz"),
            Err(RouteError::Name(NameError::Digest(_)))
        ));
        assert!(matches!(
            Route::parse("/v2/a/manifests/-bad"),
            Err(RouteError::Name(NameError::Tag))
        ));
    }
}

/// Properties of the path parser: no path panics it, a route it returns prints back to a path
/// that parses to the same route, and every name it accepts is safe under the store.
#[cfg(test)]
mod properties {
    use proptest::prelude::*;

    use super::*;
    use crate::oci::digest::arbitrary::digest_string;
    use crate::oci::name::arbitrary::{grammar_name, grammar_tag, hostile};

    /// The path a route is asked for by (`Upload` has many; it has none here).
    fn path_of(r: &Route) -> Option<String> {
        Some(match r {
            Route::Base => "/v2/".to_string(),
            Route::Catalog => "/v2/_catalog".to_string(),
            Route::Manifest { name, reference } => format!("/v2/{name}/manifests/{reference}"),
            Route::Blob { name, digest } => format!("/v2/{name}/blobs/{digest}"),
            Route::TagsList { name } => format!("/v2/{name}/tags/list"),
            Route::Referrers { name, digest } => format!("/v2/{name}/referrers/{digest}"),
            Route::Upload => return None,
        })
    }

    /// Paths built from the pieces the parser looks for, in any order, among hostile ones.
    fn api_paths() -> impl Strategy<Value = String> {
        let piece = prop_oneof![
            3 => hostile(),
            2 => grammar_name(),
            1 => grammar_tag(),
            1 => digest_string(),
            1 => Just("manifests".to_string()),
            1 => Just("blobs".to_string()),
            1 => Just("uploads".to_string()),
            1 => Just("tags".to_string()),
            1 => Just("list".to_string()),
            1 => Just("referrers".to_string()),
            1 => Just("_catalog".to_string()),
        ];
        let prefix = prop_oneof![
            6 => Just("/v2/"),
            1 => Just("/v2"),
            1 => Just("/v1/"),
            1 => Just("/"),
            1 => Just(""),
        ];
        prop_oneof![
            4 => (prefix, proptest::collection::vec(piece, 0..6))
                .prop_map(|(p, pieces)| format!("{p}{}", pieces.join("/"))),
            1 => any::<String>(),
        ]
    }

    /// Well-formed paths of every route with a name.
    fn well_formed() -> impl Strategy<Value = (String, String, String)> {
        let kind = prop_oneof![
            Just("manifests"),
            Just("blobs"),
            Just("referrers"),
            Just("tags"),
        ];
        (kind, grammar_name(), grammar_tag(), digest_string()).prop_map(|(k, n, t, d)| {
            let reference = match k {
                "manifests" if t.len() % 2 == 0 => t,
                "tags" => "list".to_string(),
                _ => d,
            };
            (k.to_string(), n, reference)
        })
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

        /// No path panics the parser; whatever it accepts prints back to a path that parses to
        /// the same route, and its name is one `RepoName` accepts on its own.
        #[test]
        fn an_accepted_route_round_trips_through_its_path(path in api_paths()) {
            let Ok(route) = Route::parse(&path) else { return Ok(()) };
            if let Some(name) = route.name() {
                prop_assert_eq!(name.to_string().parse::<RepoName>(), Ok(name.clone()));
                prop_assert!(name.components().all(|c| c != ".." && c != "." && !c.is_empty()));
                prop_assert!(!name.as_str().contains(['%', '\\', '\0']));
            }
            if let Some(again) = path_of(&route) {
                prop_assert_eq!(Route::parse(&again), Ok(route), "{} printed as {}", path, again);
            }
        }

        /// Every well-formed path of a named route parses to that route, with the name and
        /// reference exactly as written (names over the length limit are refused as such).
        #[test]
        fn well_formed_paths_parse_to_their_route((kind, name, reference) in well_formed()) {
            let path = format!("/v2/{name}/{kind}/{reference}");
            let parsed = Route::parse(&path);
            if name.len() > crate::oci::name::MAX_NAME_LEN {
                prop_assert_eq!(parsed, Err(RouteError::Name(NameError::TooLong)));
                return Ok(());
            }
            let route = parsed.unwrap();
            prop_assert_eq!(route.name().map(RepoName::as_str), Some(name.as_str()));
            let want = match kind.as_str() {
                "manifests" => Kind::Manifest,
                "blobs" => Kind::Blob,
                "referrers" => Kind::Referrers,
                _ => Kind::TagsList,
            };
            prop_assert_eq!(route.kind(), want);
            prop_assert_eq!(path_of(&route), Some(path));
        }
    }
}
