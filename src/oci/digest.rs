//! Content digests (`sha256:<hex>`, `sha512:<hex>`) and the incremental hasher that verifies them.

use std::fmt;
use std::str::FromStr;

use sha2::Digest as _;

/// The digest algorithms entrepot can verify. Anything else is refused: a proxy that cannot
/// check content must not store it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Algorithm {
    Sha256,
    Sha512,
}

impl Algorithm {
    pub fn as_str(self) -> &'static str {
        match self {
            Algorithm::Sha256 => "sha256",
            Algorithm::Sha512 => "sha512",
        }
    }

    fn hex_len(self) -> usize {
        match self {
            Algorithm::Sha256 => 64,
            Algorithm::Sha512 => 128,
        }
    }
}

/// A validated digest. The hex part is always lower case, so it is safe to use as a file name.
///
/// Held inline (72 bytes, no allocation) for sha256, the digest of nearly every blob: a store's
/// listing holds one for each of a million blobs and several for each manifest's references,
/// and a heap string each was half the listing's memory and a cache miss on every lookup in
/// its tables (issue 13). Ordered by algorithm, then hex, as the text is.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Digest(Hex);

/// Lower-case ASCII hex, always: [`Digest::hex`] hands it out as text.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
enum Hex {
    Sha256([u8; 64]),
    Sha512(Box<[u8; 128]>),
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DigestError {
    #[error("digest must have the form <algorithm>:<hex>")]
    Malformed,
    #[error("unsupported digest algorithm {0:?} (sha256 and sha512 are supported)")]
    UnsupportedAlgorithm(String),
    #[error("{algorithm} digest must be {expected} lower-case hex characters")]
    BadHex {
        algorithm: &'static str,
        expected: usize,
    },
}

impl Digest {
    pub fn algorithm(&self) -> Algorithm {
        match self.0 {
            Hex::Sha256(_) => Algorithm::Sha256,
            Hex::Sha512(_) => Algorithm::Sha512,
        }
    }

    pub fn hex(&self) -> &str {
        let bytes: &[u8] = match &self.0 {
            Hex::Sha256(h) => h,
            Hex::Sha512(h) => &h[..],
        };
        // Only lower-case hex is ever stored (`from_hex`), which is ASCII.
        std::str::from_utf8(bytes).expect("a digest's hex is ASCII")
    }

    /// `hex` must be `algorithm`'s length of lower-case hex (checked by the callers).
    fn from_hex(algorithm: Algorithm, hex: &[u8]) -> Digest {
        debug_assert!(hex.len() == algorithm.hex_len() && hex.iter().all(u8::is_ascii_hexdigit));
        match algorithm {
            Algorithm::Sha256 => Digest(Hex::Sha256(hex.try_into().expect("64 hex digits"))),
            Algorithm::Sha512 => Digest(Hex::Sha512(Box::new(
                hex.try_into().expect("128 hex digits"),
            ))),
        }
    }

    /// The digest of `data` with the given algorithm.
    pub fn of(algorithm: Algorithm, data: &[u8]) -> Digest {
        let mut h = Hasher::new(algorithm);
        h.update(data);
        h.finish()
    }

    pub fn sha256_of(data: &[u8]) -> Digest {
        Digest::of(Algorithm::Sha256, data)
    }
}

impl FromStr for Digest {
    type Err = DigestError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        // Grammar: algorithm ":" encoded, algorithm = [a-z0-9]+([+._-][a-z0-9]+)*
        let (alg, hex) = s.split_once(':').ok_or(DigestError::Malformed)?;
        if alg.is_empty()
            || hex.is_empty()
            || !alg
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"+._-".contains(&b))
        {
            return Err(DigestError::Malformed);
        }
        let algorithm = match alg {
            "sha256" => Algorithm::Sha256,
            "sha512" => Algorithm::Sha512,
            other => return Err(DigestError::UnsupportedAlgorithm(other.to_string())),
        };
        if hex.len() != algorithm.hex_len()
            || !hex
                .bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
        {
            return Err(DigestError::BadHex {
                algorithm: algorithm.as_str(),
                expected: algorithm.hex_len(),
            });
        }
        Ok(Digest::from_hex(algorithm, hex.as_bytes()))
    }
}

impl fmt::Display for Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.algorithm().as_str(), self.hex())
    }
}

impl fmt::Debug for Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Digest")
            .field("algorithm", &self.algorithm())
            .field("hex", &self.hex())
            .finish()
    }
}

/// Incremental hashing for verify-while-streaming. sha2 picks the CPU's SHA extensions at run
/// time when the CPU has them.
#[derive(Clone)]
pub enum Hasher {
    Sha256(sha2::Sha256),
    Sha512(sha2::Sha512),
}

impl Hasher {
    pub fn new(algorithm: Algorithm) -> Hasher {
        match algorithm {
            Algorithm::Sha256 => Hasher::Sha256(sha2::Sha256::new()),
            Algorithm::Sha512 => Hasher::Sha512(sha2::Sha512::new()),
        }
    }

    pub fn update(&mut self, data: &[u8]) {
        match self {
            Hasher::Sha256(h) => h.update(data),
            Hasher::Sha512(h) => h.update(data),
        }
    }

    pub fn finish(self) -> Digest {
        match self {
            Hasher::Sha256(h) => {
                let mut hex = [0u8; 64];
                hex::encode_to_slice(h.finalize(), &mut hex).expect("64 digits for 32 bytes");
                Digest::from_hex(Algorithm::Sha256, &hex)
            }
            Hasher::Sha512(h) => {
                let mut hex = [0u8; 128];
                hex::encode_to_slice(h.finalize(), &mut hex).expect("128 digits for 64 bytes");
                Digest::from_hex(Algorithm::Sha512, &hex)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const EMPTY: &str = "sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855";

    #[test]
    fn parses_and_displays() {
        let d: Digest = EMPTY.parse().unwrap();
        assert_eq!(d.to_string(), EMPTY);
        assert_eq!(Digest::sha256_of(b""), d);
    }

    #[test]
    fn refuses_bad_digests() {
        assert_eq!("sha256".parse::<Digest>(), Err(DigestError::Malformed));
        assert_eq!(":abc".parse::<Digest>(), Err(DigestError::Malformed));
        assert!(matches!(
            "md5:d41d8cd98f00b204e9800998ecf8427e".parse::<Digest>(),
            Err(DigestError::UnsupportedAlgorithm(_))
        ));
        assert!(matches!(
            "sha256:E3B0C44298FC1C149AFBF4C8996FB92427AE41E4649B934CA495991B7852B855"
                .parse::<Digest>(),
            Err(DigestError::BadHex { .. })
        ));
        assert!(matches!(
            "sha256:../../etc/passwd".parse::<Digest>(),
            Err(DigestError::BadHex { .. })
        ));
        assert!("SHA256:abc".parse::<Digest>().is_err());
    }

    /// A sha256 digest is held inline: no allocation, and small enough that a table of a
    /// million of them stays ~72 MB.
    #[test]
    fn a_digest_is_held_in_72_bytes() {
        assert_eq!(std::mem::size_of::<Digest>(), 72);
        assert_eq!(std::mem::size_of::<Option<Digest>>(), 72);
    }

    #[test]
    fn sha512_roundtrip() {
        let d = Digest::of(Algorithm::Sha512, b"abc");
        let parsed: Digest = d.to_string().parse().unwrap();
        assert_eq!(parsed, d);
        assert_eq!(d.hex().len(), 128);
    }
}

/// Digests of either algorithm, as strings: the grammar's, for the property tests of the
/// modules that take digests.
#[cfg(test)]
pub(crate) mod arbitrary {
    use proptest::prelude::*;

    pub fn digest_string() -> impl Strategy<Value = String> {
        prop_oneof!["sha256:[0-9a-f]{64}", "sha512:[0-9a-f]{128}"]
    }
}

/// Properties of the digest parser: no string panics it, what it accepts prints back as
/// written, and its hex is lower case and as long as the algorithm's.
#[cfg(test)]
mod properties {
    use proptest::prelude::*;

    use super::arbitrary::digest_string;
    use super::*;

    /// Strings near the grammar: right and wrong algorithms, hex of every case and length,
    /// path pieces, and any string.
    fn near_digests() -> impl Strategy<Value = String> {
        let alg = prop_oneof![
            Just("sha256"),
            Just("sha512"),
            Just("SHA256"),
            Just("sha384"),
            Just("md5"),
            Just(""),
            Just("sha256+b64u"),
        ];
        let hex = prop_oneof![
            "[0-9a-f]{64}",
            "[0-9a-f]{128}",
            "[0-9a-fA-F]{64}",
            "[0-9a-f]{0,130}",
            "[0-9a-z./:%]{0,70}",
        ];
        prop_oneof![
            3 => (alg, hex).prop_map(|(a, h)| format!("{a}:{h}")),
            1 => any::<String>(),
        ]
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

        #[test]
        fn an_accepted_digest_is_lower_case_hex_of_its_length_and_round_trips(
            s in near_digests(),
        ) {
            if let Ok(d) = s.parse::<Digest>() {
                prop_assert_eq!(d.to_string(), s.clone());
                prop_assert_eq!(d.to_string().parse::<Digest>(), Ok(d.clone()));
                prop_assert_eq!(d.hex().len(), d.algorithm().hex_len());
                prop_assert!(d.hex().bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b)));
                prop_assert!(matches!(d.algorithm().as_str(), "sha256" | "sha512"));
            }
        }

        #[test]
        fn every_digest_of_the_grammar_is_accepted(s in digest_string()) {
            let d: Digest = s.parse().unwrap();
            prop_assert_eq!(d.to_string(), s);
        }

        /// One upper-case hex digit, or one digit too few or too many, and it is refused.
        #[test]
        fn upper_case_or_a_wrong_length_is_refused(s in digest_string(), at in any::<usize>()) {
            let colon = s.find(':').unwrap();
            let i = colon + 1 + at % (s.len() - colon - 1);
            let mut upper = s.clone().into_bytes();
            upper[i] = b'A';
            let upper = String::from_utf8(upper).unwrap();
            prop_assert!(
                matches!(upper.parse::<Digest>(), Err(DigestError::BadHex { .. })),
                "{upper}"
            );
            let short = &s[..s.len() - 1];
            prop_assert!(
                matches!(short.parse::<Digest>(), Err(DigestError::BadHex { .. })),
                "{short}"
            );
            let long = format!("{s}0");
            prop_assert!(
                matches!(long.parse::<Digest>(), Err(DigestError::BadHex { .. })),
                "{long}"
            );
        }

        /// Digests sort as their text does (listings, the eviction order and the tests'
        /// expectations are sorted by it), whatever the algorithms.
        #[test]
        fn digests_sort_as_their_text(a in digest_string(), b in digest_string(), same_start in 0usize..72) {
            // Often sharing a long prefix, so the comparison reaches far into the hex.
            let b = if a.len() == b.len() { format!("{}{}", &a[..same_start], &b[same_start..]) } else { b };
            let (da, db): (Digest, Digest) = (a.parse().unwrap(), b.parse().unwrap());
            prop_assert_eq!(da.cmp(&db), a.cmp(&b));
            prop_assert_eq!(da == db, a == b);
        }

        /// What the hasher computes is a digest the parser accepts as itself.
        #[test]
        fn computed_digests_round_trip(
            data in proptest::collection::vec(any::<u8>(), 0..256),
            sha512 in any::<bool>(),
        ) {
            let alg = if sha512 { Algorithm::Sha512 } else { Algorithm::Sha256 };
            let d = Digest::of(alg, &data);
            prop_assert_eq!(d.to_string().parse::<Digest>(), Ok(d.clone()));
            prop_assert_eq!(d.hex().len(), alg.hex_len());
        }
    }
}
