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
