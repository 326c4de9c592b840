//! Single byte ranges (`Range: bytes=...`) as blobs need them. Multiple ranges and malformed
//! headers are ignored, as RFC 9110 allows, and the whole blob is served.

/// A parsed `bytes=` range, before the blob's size is known.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RangeSpec {
    /// `bytes=a-` or `bytes=a-b` (inclusive end).
    From { start: u64, end: Option<u64> },
    /// `bytes=-n`: the last n bytes.
    Suffix(u64),
}

/// A range resolved against a size.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Resolved {
    /// Serve `start..end` (end exclusive) with 206.
    Partial { start: u64, end: u64 },
    /// Answer 416 with `Content-Range: bytes */<size>`.
    Unsatisfiable,
}

impl RangeSpec {
    /// Parses a `Range` header value; `None` means "ignore it and serve everything".
    pub fn parse(value: &str) -> Option<RangeSpec> {
        let spec = value.trim().strip_prefix("bytes=")?.trim();
        if spec.contains(',') {
            return None;
        }
        let (a, b) = spec.split_once('-')?;
        let (a, b) = (a.trim(), b.trim());
        let num = |s: &str| -> Option<u64> {
            if s.is_empty() || !s.bytes().all(|c| c.is_ascii_digit()) {
                None
            } else {
                s.parse().ok()
            }
        };
        if a.is_empty() {
            return Some(RangeSpec::Suffix(num(b)?));
        }
        let start = num(a)?;
        let end = if b.is_empty() { None } else { Some(num(b)?) };
        if end.is_some_and(|e| e < start) {
            return None;
        }
        Some(RangeSpec::From { start, end })
    }

    pub fn resolve(self, size: u64) -> Resolved {
        match self {
            RangeSpec::From { start, end } => {
                if start >= size {
                    return Resolved::Unsatisfiable;
                }
                let end = end.map_or(size, |e| e.saturating_add(1).min(size));
                Resolved::Partial { start, end }
            }
            RangeSpec::Suffix(n) => {
                if n == 0 || size == 0 {
                    return Resolved::Unsatisfiable;
                }
                Resolved::Partial {
                    start: size.saturating_sub(n),
                    end: size,
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse() {
        assert_eq!(
            RangeSpec::parse("bytes=0-99"),
            Some(RangeSpec::From {
                start: 0,
                end: Some(99)
            })
        );
        assert_eq!(
            RangeSpec::parse("bytes=100-"),
            Some(RangeSpec::From {
                start: 100,
                end: None
            })
        );
        assert_eq!(RangeSpec::parse("bytes=-5"), Some(RangeSpec::Suffix(5)));
        assert_eq!(RangeSpec::parse("bytes=5-3"), None);
        assert_eq!(RangeSpec::parse("bytes=0-1,3-4"), None);
        assert_eq!(RangeSpec::parse("items=0-1"), None);
        assert_eq!(RangeSpec::parse("bytes=x-1"), None);
        assert_eq!(RangeSpec::parse("bytes=-"), None);
    }

    #[test]
    fn resolve() {
        let r = |s: &str, size| RangeSpec::parse(s).unwrap().resolve(size);
        assert_eq!(r("bytes=0-99", 50), Resolved::Partial { start: 0, end: 50 });
        assert_eq!(
            r("bytes=10-19", 50),
            Resolved::Partial { start: 10, end: 20 }
        );
        assert_eq!(r("bytes=49-", 50), Resolved::Partial { start: 49, end: 50 });
        assert_eq!(r("bytes=50-", 50), Resolved::Unsatisfiable);
        assert_eq!(r("bytes=-10", 50), Resolved::Partial { start: 40, end: 50 });
        assert_eq!(r("bytes=-100", 50), Resolved::Partial { start: 0, end: 50 });
        assert_eq!(r("bytes=-0", 50), Resolved::Unsatisfiable);
        assert_eq!(r("bytes=0-", 0), Resolved::Unsatisfiable);
    }
}

/// Properties of `Range` handling: no header value panics the parser, and a resolved range is
/// always inside the blob or unsatisfiable, never past its end or empty.
#[cfg(test)]
mod properties {
    use proptest::prelude::*;

    use super::*;

    /// Numbers at the edges: zero, small, near the blob sizes used, and near `u64::MAX`.
    fn number() -> impl Strategy<Value = u64> {
        prop_oneof![
            Just(0u64),
            0u64..100,
            any::<u64>(),
            (u64::MAX - 2)..=u64::MAX,
        ]
    }

    /// Header values near the grammar: `bytes=` with numbers (some beyond u64), whitespace,
    /// signs, lists, other units, and any string.
    fn near_ranges() -> impl Strategy<Value = String> {
        let num = prop_oneof![
            number().prop_map(|n| n.to_string()),
            Just(String::new()),
            Just("18446744073709551616".to_string()),
            Just("+1".to_string()),
            Just("-1".to_string()),
            Just(" 7 ".to_string()),
            "[0-9a-f ]{0,4}",
        ];
        let unit = prop_oneof![
            Just("bytes="),
            Just("Bytes="),
            Just("items="),
            Just(" bytes= ")
        ];
        prop_oneof![
            3 => (unit, num.clone(), num.clone()).prop_map(|(u, a, b)| format!("{u}{a}-{b}")),
            1 => (num.clone(), num).prop_map(|(a, b)| format!("bytes={a}-{b},0-1")),
            1 => "[bytes=0-9, -]{0,20}",
            1 => any::<String>(),
        ]
    }

    fn check_resolved(spec: RangeSpec, size: u64) -> Result<(), TestCaseError> {
        match spec.resolve(size) {
            Resolved::Partial { start, end } => {
                prop_assert!(
                    start < end && end <= size,
                    "{spec:?} of {size}: {start}..{end}"
                );
                // Exactly the bytes asked for, cut at the end of the blob.
                match spec {
                    RangeSpec::From { start: s, end: e } => {
                        prop_assert_eq!(start, s);
                        prop_assert_eq!(end, e.map_or(size, |e| e.saturating_add(1).min(size)));
                    }
                    RangeSpec::Suffix(n) => {
                        prop_assert_eq!(end, size);
                        prop_assert_eq!(end - start, n.min(size));
                    }
                }
            }
            // Unsatisfiable only when no byte of the blob is asked for.
            Resolved::Unsatisfiable => match spec {
                RangeSpec::From { start, .. } => prop_assert!(start >= size),
                RangeSpec::Suffix(n) => prop_assert!(n == 0 || size == 0),
            },
        }
        Ok(())
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

        #[test]
        fn any_header_resolves_inside_the_blob_or_is_unsatisfiable(
            value in near_ranges(),
            size in number(),
        ) {
            if let Some(spec) = RangeSpec::parse(&value) {
                check_resolved(spec, size)?;
            }
        }

        /// Every spec `parse` can return (`From` never ends before it starts).
        #[test]
        fn any_spec_resolves_inside_the_blob_or_is_unsatisfiable(
            a in number(),
            b in proptest::option::of(number()),
            suffix in any::<bool>(),
            size in number(),
        ) {
            let spec = if suffix {
                RangeSpec::Suffix(a)
            } else {
                RangeSpec::From { start: a, end: b.map(|b| b.max(a)) }
            };
            check_resolved(spec, size)?;
        }

        /// `bytes=a-b`, `bytes=a-` and `bytes=-n` parse to what they say and print back as
        /// written; `a > b` is ignored.
        #[test]
        fn well_formed_ranges_round_trip(a in number(), b in number()) {
            let v = format!("bytes={a}-{b}");
            if a <= b {
                let spec = RangeSpec::parse(&v);
                prop_assert_eq!(spec, Some(RangeSpec::From { start: a, end: Some(b) }));
                prop_assert_eq!(print(spec.unwrap()), v);
            } else {
                prop_assert_eq!(RangeSpec::parse(&v), None);
            }
            let open = format!("bytes={a}-");
            prop_assert_eq!(RangeSpec::parse(&open), Some(RangeSpec::From { start: a, end: None }));
            prop_assert_eq!(print(RangeSpec::parse(&open).unwrap()), open);
            let suffix = format!("bytes=-{b}");
            prop_assert_eq!(RangeSpec::parse(&suffix), Some(RangeSpec::Suffix(b)));
            prop_assert_eq!(print(RangeSpec::Suffix(b)), suffix);
        }
    }

    fn print(spec: RangeSpec) -> String {
        match spec {
            RangeSpec::From {
                start,
                end: Some(e),
            } => format!("bytes={start}-{e}"),
            RangeSpec::From { start, end: None } => format!("bytes={start}-"),
            RangeSpec::Suffix(n) => format!("bytes=-{n}"),
        }
    }
}
