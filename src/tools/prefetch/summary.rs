//! The end of a prefetch: the counts gathered over the run and the table they print as.

use std::fmt;

use indicatif::HumanBytes;

/// Counts over the whole run; each digest is counted once.
#[derive(Debug, Clone, Default)]
pub(super) struct Counts {
    pub(super) manifests: u64,
    pub(super) manifests_cached: u64,
    pub(super) blobs: u64,
    pub(super) blobs_cached: u64,
    pub(super) blobs_failed: u64,
    pub(super) bytes: u64,
    pub(super) bytes_cached: u64,
    /// Non-distributable (foreign) layers, which registries do not serve.
    pub(super) skipped: u64,
}

/// The end of a run: a table, then the failures with their reasons.
#[derive(Default)]
pub(super) struct Summary {
    pub(super) requested: usize,
    pub(super) images_fetched: usize,
    pub(super) images_cached: usize,
    pub(super) pinned: usize,
    /// Everything was fetched, but the pins could not be recorded.
    pub(super) pin_error: Option<String>,
    pub(super) counts: Counts,
    pub(super) failed: Vec<(String, String)>,
}

impl fmt::Display for Summary {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let c = &self.counts;
        let bytes = |n: u64| HumanBytes(n).to_string();
        let rows: [[String; 5]; 5] = [
            [
                String::new(),
                "total".into(),
                "fetched".into(),
                "already cached".into(),
                "failed".into(),
            ],
            [
                "images".into(),
                self.requested.to_string(),
                self.images_fetched.to_string(),
                self.images_cached.to_string(),
                self.failed.len().to_string(),
            ],
            [
                "manifests".into(),
                c.manifests.to_string(),
                (c.manifests - c.manifests_cached).to_string(),
                c.manifests_cached.to_string(),
                "-".into(),
            ],
            [
                "blobs".into(),
                c.blobs.to_string(),
                (c.blobs - c.blobs_cached - c.blobs_failed).to_string(),
                c.blobs_cached.to_string(),
                c.blobs_failed.to_string(),
            ],
            [
                "bytes".into(),
                bytes(c.bytes),
                bytes(c.bytes - c.bytes_cached),
                bytes(c.bytes_cached),
                "-".into(),
            ],
        ];
        let widths: Vec<usize> = (0..5)
            .map(|col| rows.iter().map(|r| r[col].len()).max().unwrap_or(0))
            .collect();
        writeln!(f)?;
        for row in &rows {
            let mut line = format!("{:<w$}", row[0], w = widths[0]);
            for (cell, w) in row.iter().zip(&widths).skip(1) {
                line.push_str(&format!("  {cell:>w$}"));
            }
            writeln!(f, "{}", line.trim_end())?;
        }
        if c.skipped > 0 {
            writeln!(f, "skipped {} non-distributable layers", c.skipped)?;
        }
        if self.pinned > 0 {
            let s = if self.pinned == 1 { "" } else { "s" };
            writeln!(f, "pinned {} image{s}", self.pinned)?;
        }
        if let Some(e) = &self.pin_error {
            writeln!(f, "pinning failed: {e}")?;
        }
        if !self.failed.is_empty() {
            writeln!(f, "failed:")?;
            for (image, why) in &self.failed {
                writeln!(f, "  {image}: {why}")?;
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn summary_table() {
        let s = Summary {
            requested: 3,
            images_fetched: 1,
            images_cached: 1,
            pinned: 2,
            pin_error: None,
            counts: Counts {
                manifests: 2,
                manifests_cached: 1,
                blobs: 5,
                blobs_cached: 2,
                blobs_failed: 0,
                bytes: 3 << 20,
                bytes_cached: 1 << 20,
                skipped: 0,
            },
            failed: vec![(
                "up/x:1".into(),
                "404 Not Found: MANIFEST_UNKNOWN: nope".into(),
            )],
        };
        let text = s.to_string();
        let row = |label: &str| -> Vec<&str> {
            let line = text.lines().find(|l| l.starts_with(label)).unwrap();
            line.split_whitespace().collect()
        };
        assert_eq!(row("blobs"), ["blobs", "5", "3", "2", "0"], "{text}");
        assert_eq!(row("bytes")[1..3], ["3.00", "MiB"], "{text}");
        assert!(text.lines().next().unwrap().is_empty(), "{text}");
        assert!(text.contains("up/x:1: 404 Not Found"), "{text}");
    }
}
