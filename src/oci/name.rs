//! Repository names, tags and references, validated against the distribution-spec grammar.
//! A validated name can never contain `..`, `%`, a leading `/` or an empty component, so it is
//! safe to use as a relative path under the store.

use std::fmt;
use std::str::FromStr;

use super::digest::{Digest, DigestError};

/// The longest repository name accepted (the spec's recommended limit, what distribution uses).
pub const MAX_NAME_LEN: usize = 255;

#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct RepoName(String);

#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Tag(String);

/// What a manifest request names: a mutable tag or an immutable digest.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Reference {
    Tag(Tag),
    Digest(Digest),
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NameError {
    #[error("invalid repository name")]
    Name,
    #[error("repository name longer than {MAX_NAME_LEN} characters")]
    TooLong,
    #[error("invalid tag")]
    Tag,
    #[error(transparent)]
    Digest(#[from] DigestError),
}

/// One path component: `[a-z0-9]+((\.|_|__|-+)[a-z0-9]+)*`.
fn valid_component(c: &str) -> bool {
    let b = c.as_bytes();
    let alnum = |x: u8| x.is_ascii_lowercase() || x.is_ascii_digit();
    if b.is_empty() || !alnum(b[0]) || !alnum(b[b.len() - 1]) {
        return false;
    }
    let mut i = 0;
    while i < b.len() {
        if alnum(b[i]) {
            i += 1;
            continue;
        }
        // A separator run: ".", "_", "__" or one or more "-", always followed by alnum.
        let start = i;
        match b[i] {
            b'.' => i += 1,
            b'_' => {
                i += 1;
                if i < b.len() && b[i] == b'_' {
                    i += 1;
                }
            }
            b'-' => {
                while i < b.len() && b[i] == b'-' {
                    i += 1;
                }
            }
            _ => return false,
        }
        if i == start || i >= b.len() || !alnum(b[i]) {
            return false;
        }
    }
    true
}

impl RepoName {
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The components of the name, in order.
    pub fn components(&self) -> impl Iterator<Item = &str> {
        self.0.split('/')
    }

    /// The name without its first component, if it has more than one.
    pub fn strip_first(&self) -> Option<(&str, RepoName)> {
        let (first, rest) = self.0.split_once('/')?;
        Some((first, RepoName(rest.to_string())))
    }

    /// `library/<name>` for Docker Hub's official images, which clients address by bare name.
    pub fn with_library_prefix(&self) -> RepoName {
        if self.0.contains('/') {
            self.clone()
        } else {
            RepoName(format!("library/{}", self.0))
        }
    }
}

impl FromStr for RepoName {
    type Err = NameError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if s.len() > MAX_NAME_LEN {
            return Err(NameError::TooLong);
        }
        if s.split('/').all(valid_component) {
            Ok(RepoName(s.to_string()))
        } else {
            Err(NameError::Name)
        }
    }
}

impl fmt::Display for RepoName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl Tag {
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl FromStr for Tag {
    type Err = NameError;

    /// `[a-zA-Z0-9_][a-zA-Z0-9._-]{0,127}`
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let b = s.as_bytes();
        let ok = !b.is_empty()
            && b.len() <= 128
            && (b[0].is_ascii_alphanumeric() || b[0] == b'_')
            && b[1..]
                .iter()
                .all(|&c| c.is_ascii_alphanumeric() || b"._-".contains(&c));
        if ok {
            Ok(Tag(s.to_string()))
        } else {
            Err(NameError::Tag)
        }
    }
}

impl fmt::Display for Tag {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl FromStr for Reference {
    type Err = NameError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if s.contains(':') {
            Ok(Reference::Digest(s.parse()?))
        } else {
            Ok(Reference::Tag(s.parse()?))
        }
    }
}

impl fmt::Display for Reference {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Reference::Tag(t) => t.fmt(f),
            Reference::Digest(d) => d.fmt(f),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_spec_names() {
        for n in [
            "alpine",
            "library/alpine",
            "a/b/c/d",
            "my-org/my--image",
            "foo_bar/x__y",
            "docker.io/library/alpine",
            "a0.b1-c2",
        ] {
            assert!(n.parse::<RepoName>().is_ok(), "{n}");
        }
    }

    #[test]
    fn refuses_bad_names() {
        for n in [
            "", "/alpine", "alpine/", "a//b", "Alpine", "..", "../etc", "a/../b", "a/./b", "a___b",
            "a.-b", "-a", "a-", "a%2e%2e", "a b", "a\\b",
        ] {
            assert!(n.parse::<RepoName>().is_err(), "{n:?}");
        }
        assert_eq!("a".repeat(256).parse::<RepoName>(), Err(NameError::TooLong));
    }

    #[test]
    fn tags() {
        assert!("latest".parse::<Tag>().is_ok());
        assert!("_x.Y-1".parse::<Tag>().is_ok());
        assert!("v".repeat(128).parse::<Tag>().is_ok());
        assert!("v".repeat(129).parse::<Tag>().is_err());
        assert!(".hidden".parse::<Tag>().is_err());
        assert!("-x".parse::<Tag>().is_err());
        assert!("a/b".parse::<Tag>().is_err());
        assert!("".parse::<Tag>().is_err());
    }

    #[test]
    fn references() {
        assert!(matches!("3.20".parse::<Reference>(), Ok(Reference::Tag(_))));
        let d = format!("sha256:{}", "a".repeat(64));
        assert!(matches!(d.parse::<Reference>(), Ok(Reference::Digest(_))));
        assert!(matches!(
            "sha256:xyz".parse::<Reference>(),
            Err(NameError::Digest(_))
        ));
    }

    #[test]
    fn library_prefix() {
        let n: RepoName = "alpine".parse().unwrap();
        assert_eq!(n.with_library_prefix().as_str(), "library/alpine");
        let n: RepoName = "bitnami/redis".parse().unwrap();
        assert_eq!(n.with_library_prefix().as_str(), "bitnami/redis");
    }
}

/// Strategies for the grammar of names and tags, and for the hostile strings a client may put
/// where one goes; shared by the property tests of the modules that take names.
#[cfg(test)]
pub(crate) mod arbitrary {
    use proptest::prelude::*;

    /// One component of the grammar, `[a-z0-9]+((\.|_|__|-+)[a-z0-9]+)*`, bounded.
    pub fn component() -> impl Strategy<Value = String> {
        prop_oneof![
            4 => "[a-z0-9]{1,8}((\\.|_|__|-{1,3})[a-z0-9]{1,8}){0,3}",
            1 => "[a-z0-9]{1,80}",
        ]
    }

    /// A name of the grammar: 1 to 6 components. Some are longer than `MAX_NAME_LEN`.
    pub fn grammar_name() -> impl Strategy<Value = String> {
        proptest::collection::vec(component(), 1..7).prop_map(|c| c.join("/"))
    }

    /// A tag of the grammar, `[a-zA-Z0-9_][a-zA-Z0-9._-]{0,127}`.
    pub fn grammar_tag() -> impl Strategy<Value = String> {
        "[a-zA-Z0-9_][a-zA-Z0-9._-]{0,127}"
    }

    /// Strings built to sit near the grammar's edges: path pieces that escape (`..`, `.`,
    /// empty components, percent-encodings, backslashes, NUL), upper case, separators in the
    /// wrong places, and any string at all.
    pub fn hostile() -> impl Strategy<Value = String> {
        let piece = prop_oneof![
            4 => component(),
            1 => Just(String::new()),
            1 => Just(".".to_string()),
            1 => Just("..".to_string()),
            1 => Just("%2e%2e".to_string()),
            1 => Just("..%2f".to_string()),
            1 => Just("a%2fb".to_string()),
            1 => Just("_tags".to_string()),
            1 => Just("a\\..\\b".to_string()),
            1 => Just("a\0b".to_string()),
            1 => Just("A".to_string()),
            1 => Just("a.-b".to_string()),
            1 => Just("a___b".to_string()),
            1 => Just("-a".to_string()),
            1 => Just("a-".to_string()),
            1 => Just("é".to_string()),
            1 => "[a-zA-Z0-9._%:@ -]{0,6}",
        ];
        prop_oneof![
            3 => proptest::collection::vec(piece, 0..8).prop_map(|p| p.join("/")),
            1 => "[a-z0-9./_\\-%:\\\\]{0,40}",
            1 => any::<String>(),
        ]
    }
}

/// Properties of the parsers: no string panics them, and what they accept can be used as a
/// relative path under the store and prints back as it was written.
#[cfg(test)]
mod properties {
    use std::path::{Component, Path};

    use proptest::prelude::*;

    use super::arbitrary::{grammar_name, grammar_tag, hostile};
    use super::*;

    /// What every accepted name must be: short enough, and made only of components that are
    /// plain file names (no `.`, `..`, empty, separator or escape of any kind).
    fn assert_safe_name(n: &RepoName) -> Result<(), TestCaseError> {
        let s = n.as_str();
        prop_assert!(s.len() <= MAX_NAME_LEN, "{s:?} is too long");
        let mut count = 0;
        for c in n.components() {
            count += 1;
            prop_assert!(c != "." && c != ".." && !c.is_empty(), "{s:?}");
            prop_assert!(
                c.bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"._-".contains(&b)),
                "{s:?} has a byte outside [a-z0-9._-]"
            );
            let (first, last) = (c.as_bytes()[0], c.as_bytes()[c.len() - 1]);
            prop_assert!(first.is_ascii_alphanumeric() && last.is_ascii_alphanumeric());
        }
        let path = Path::new(s);
        prop_assert!(path.is_relative());
        prop_assert!(path.components().all(|c| matches!(c, Component::Normal(_))));
        prop_assert_eq!(path.components().count(), count);
        Ok(())
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

        #[test]
        fn no_string_panics_the_name_tag_and_reference_parsers(s in hostile()) {
            let _ = s.parse::<RepoName>();
            let _ = s.parse::<Tag>();
            let _ = s.parse::<Reference>();
        }

        /// Whatever is accepted, from any string, is a safe relative path and prints back as
        /// it was written.
        #[test]
        fn an_accepted_name_is_a_safe_relative_path_that_round_trips(s in hostile()) {
            if let Ok(n) = s.parse::<RepoName>() {
                assert_safe_name(&n)?;
                prop_assert_eq!(n.as_str(), s.as_str());
                prop_assert_eq!(n.to_string().parse::<RepoName>(), Ok(n));
            }
        }

        /// The grammar is accepted whole (up to the length limit), and nothing is rewritten.
        #[test]
        fn every_name_of_the_grammar_is_accepted_up_to_the_length_limit(s in grammar_name()) {
            match s.parse::<RepoName>() {
                Ok(n) => {
                    prop_assert!(s.len() <= MAX_NAME_LEN);
                    prop_assert_eq!(n.to_string(), s);
                    assert_safe_name(&n)?;
                }
                Err(e) => {
                    prop_assert!(s.len() > MAX_NAME_LEN, "{s:?} refused: {e}");
                    prop_assert_eq!(e, NameError::TooLong);
                }
            }
        }

        /// Names derived from an accepted one (the upstream's name without the first
        /// component, Docker Hub's `library/`) are made of the same safe components.
        #[test]
        fn names_derived_from_an_accepted_name_stay_safe(s in grammar_name()) {
            let Ok(n) = s.parse::<RepoName>() else { return Ok(()) };
            if let Some((first, rest)) = n.strip_first() {
                prop_assert_eq!(format!("{first}/{rest}"), s.clone());
                prop_assert_eq!(rest.as_str().parse::<RepoName>(), Ok(rest.clone()));
                assert_safe_name(&rest)?;
            }
            let prefixed = n.with_library_prefix();
            prop_assert!(prefixed.components().all(valid_component));
            prop_assert!(prefixed.as_str().ends_with(n.as_str()));
        }

        /// An accepted tag is one plain file name that prints back as written.
        #[test]
        fn an_accepted_tag_is_one_plain_file_name(s in prop_oneof![hostile(), grammar_tag()]) {
            if let Ok(t) = s.parse::<Tag>() {
                prop_assert_eq!(t.as_str(), s.as_str());
                prop_assert!(!t.as_str().starts_with('.') && !t.as_str().contains('/'));
                prop_assert!(t.as_str().len() <= 128);
                let path = Path::new(t.as_str());
                prop_assert_eq!(path.components().count(), 1);
                prop_assert!(matches!(path.components().next(), Some(Component::Normal(_))));
            }
        }

        #[test]
        fn every_tag_of_the_grammar_is_accepted(s in grammar_tag()) {
            prop_assert_eq!(s.parse::<Tag>().map(|t| t.to_string()), Ok(s.clone()));
            prop_assert!(matches!(s.parse::<Reference>(), Ok(Reference::Tag(_))));
        }

        /// A reference is a digest exactly when it has a `:`; either kind prints back as
        /// written.
        #[test]
        fn a_reference_round_trips_and_is_a_digest_iff_it_has_a_colon(s in hostile()) {
            if let Ok(r) = s.parse::<Reference>() {
                prop_assert_eq!(matches!(r, Reference::Digest(_)), s.contains(':'));
                prop_assert_eq!(r.to_string(), s.clone());
                prop_assert_eq!(r.to_string().parse::<Reference>(), Ok(r));
            }
        }
    }
}
