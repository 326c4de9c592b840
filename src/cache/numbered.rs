//! The store's blobs numbered in digest order, and the images among them as arrays of
//! numbers: what eviction's plan and the image listing (`entrepot cache ls`, the status page)
//! walk. A year-old store holds a million blobs (issue 13): looking each reference up in the
//! inventory's tables was several cache misses a step, so references are numbered by sorting
//! them and walking them beside the sorted blobs, and images are then followed over arrays.

use super::inventory::Inventory;
use crate::oci::{Algorithm, Digest};

/// The inventory's blobs and images by number (a blob's place in digest order).
pub struct Numbered<'a> {
    /// Every blob, sorted: its sort key, digest and size.
    pub blobs: Vec<(SortKey, &'a Digest, u64)>,
    /// Root manifests (stored, and referenced by no stored manifest), in digest order.
    pub roots: Vec<u32>,
    /// Each manifest's stored references: `children[start[m]..start[m + 1]]`.
    start: Vec<u32>,
    children: Vec<u32>,
    /// Which manifest (its place in `start`) a blob is; `NOT_A_MANIFEST` for the others.
    manifest_of: Vec<u32>,
}

const NOT_A_MANIFEST: u32 = u32::MAX;

impl<'a> Numbered<'a> {
    pub fn new(inv: &'a Inventory) -> Numbered<'a> {
        let mut blobs: Vec<(SortKey, &Digest, u64)> = inv
            .blobs
            .iter()
            .map(|(d, (size, _))| (sort_key(d), d, *size))
            .collect();
        blobs.sort_unstable_by(|a, b| (a.0, a.1).cmp(&(b.0, b.1)));
        let n_blobs = blobs.len();
        // The stored manifests in digest order, and every reference they make, sorted by
        // what it names (the manifest's place in `manifests` beside it).
        let mut manifests: Vec<(SortKey, &Digest, &[Digest])> = inv
            .manifests
            .iter()
            .map(|(d, children)| (sort_key(d), d, children.as_slice()))
            .collect();
        manifests.sort_unstable_by(|a, b| (a.0, a.1).cmp(&(b.0, b.1)));
        let mut edges: Vec<(SortKey, &Digest, u32)> =
            Vec::with_capacity(manifests.iter().map(|m| m.2.len()).sum());
        for (m, (_, _, children)) in manifests.iter().enumerate() {
            edges.extend(children.iter().map(|c| (sort_key(c), c, m as u32)));
        }
        edges.sort_unstable_by(|a, b| (a.0, a.1).cmp(&(b.0, b.1)));
        let edge_numbers = numbers_in(&blobs, edges.iter().map(|e| (e.0, e.1)));
        let mut start = vec![0u32; manifests.len() + 1];
        let mut referenced = vec![false; n_blobs];
        for (e, n) in edges.iter().zip(&edge_numbers) {
            if let Some(n) = n {
                start[e.2 as usize + 1] += 1;
                referenced[*n as usize] = true;
            }
        }
        for m in 0..manifests.len() {
            start[m + 1] += start[m];
        }
        let mut children = vec![0u32; start[manifests.len()] as usize];
        let mut filled = start.clone();
        for (e, n) in edges.iter().zip(edge_numbers) {
            if let Some(n) = n {
                let at = &mut filled[e.2 as usize];
                children[*at as usize] = n;
                *at += 1;
            }
        }
        drop((edges, filled));
        let mut manifest_of = vec![NOT_A_MANIFEST; n_blobs];
        let mut roots = Vec::new();
        let numbers = numbers_in(&blobs, manifests.iter().map(|m| (m.0, m.1)));
        for (m, n) in numbers.into_iter().enumerate() {
            if let Some(n) = n {
                manifest_of[n as usize] = m as u32;
                if !referenced[n as usize] {
                    roots.push(n);
                }
            }
        }
        Numbered {
            blobs,
            roots,
            start,
            children,
            manifest_of,
        }
    }

    /// The numbers of `digests` (in any order, repeats allowed), in their order; `None` for
    /// one that is not a stored blob. Sorted first and walked beside the blobs.
    pub fn numbers_of<'d>(&self, digests: impl Iterator<Item = &'d Digest>) -> Vec<Option<u32>> {
        let mut sorted: Vec<(SortKey, &Digest, usize)> = digests
            .enumerate()
            .map(|(at, d)| (sort_key(d), d, at))
            .collect();
        sorted.sort_unstable_by(|a, b| (a.0, a.1).cmp(&(b.0, b.1)));
        let mut out = vec![None; sorted.len()];
        let numbers = numbers_in(&self.blobs, sorted.iter().map(|x| (x.0, x.1)));
        for (x, n) in sorted.iter().zip(numbers) {
            out[x.2] = n;
        }
        out
    }

    /// The stored blobs `i` references, if it is a manifest.
    pub fn children(&self, i: u32) -> &[u32] {
        match self.manifest_of[i as usize] {
            NOT_A_MANIFEST => &[],
            m => {
                &self.children[self.start[m as usize] as usize..self.start[m as usize + 1] as usize]
            }
        }
    }

    /// Calls `visit` on `root` and every stored blob it references, transitively, once each.
    /// `seen` (one entry a blob) marks the blobs visited with `mark`: a new mark for each walk
    /// means no clearing between walks.
    pub fn walk(
        &self,
        root: u32,
        seen: &mut [u32],
        mark: u32,
        stack: &mut Vec<u32>,
        mut visit: impl FnMut(u32),
    ) {
        stack.push(root);
        while let Some(i) = stack.pop() {
            if seen[i as usize] == mark {
                continue;
            }
            seen[i as usize] = mark;
            visit(i);
            stack.extend(self.children(i));
        }
    }

    /// Gives up the graph, keeping the sorted blobs.
    pub fn into_blobs(self) -> Vec<(SortKey, &'a Digest, u64)> {
        self.blobs
    }
}

/// The place in `blobs` of each of `sorted` (in digest order, repeats allowed), or `None`:
/// one walk along both. The digests themselves are compared only where the keys held in the
/// arrays are equal.
fn numbers_in<'d>(
    blobs: &[(SortKey, &Digest, u64)],
    sorted: impl Iterator<Item = (SortKey, &'d Digest)>,
) -> Vec<Option<u32>> {
    let mut at = 0;
    sorted
        .map(|(k, d)| {
            while at < blobs.len() && (blobs[at].0, blobs[at].1) < (k, d) {
                at += 1;
            }
            (at < blobs.len() && blobs[at].0 == k && blobs[at].1 == d).then_some(at as u32)
        })
        .collect()
}

/// A digest's place in digest order, as far as its algorithm and its first 16 hex digits tell
/// (64 bits: equal keys are rare, and settled by the digests themselves). Held in the arrays,
/// so sorting and walking them follow no pointer until two keys are equal.
type SortKey = (Algorithm, u64);

fn sort_key(d: &Digest) -> SortKey {
    // Lower-case hex digits in order are their values in order.
    let first = d
        .hex()
        .get(..16)
        .and_then(|h| u64::from_str_radix(h, 16).ok());
    (d.algorithm(), first.unwrap_or(0))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Digests sharing their first 16 hex digits (so their keys), and a sha512 one sharing
    /// them too: numbered in digest order all the same, and references to digests that are
    /// not stored (made to share a stored one's key) are not numbered.
    #[test]
    fn equal_keys_are_settled_by_the_digests() {
        let hex = |tail: &str| format!("{:0<16}{tail:0>48}", "ab");
        let d = |s: &str| -> Digest { s.parse().unwrap() };
        let a = d(&format!("sha256:{}", hex("10")));
        let b = d(&format!("sha256:{}", hex("20")));
        let c = d(&format!("sha512:{}{}", hex("30"), "0".repeat(64)));
        // Between a and b, with their key.
        let fake = d(&format!("sha256:{}", hex("15")));
        let mut inv = Inventory::default();
        for x in [&c, &b, &a] {
            inv.blobs.insert(x.clone(), (1, 0));
        }
        inv.manifests
            .insert(c.clone(), vec![b.clone(), fake.clone(), a.clone()]);
        let n = Numbered::new(&inv);
        let order: Vec<&Digest> = n.blobs.iter().map(|x| x.1).collect();
        assert_eq!(order, [&a, &b, &c]);
        assert_eq!(n.roots, [2]);
        let mut children = n.children(2).to_vec();
        children.sort();
        assert_eq!(children, [0, 1], "the fake reference is not a stored blob");
        assert_eq!(
            n.numbers_of([&c, &b, &a, &fake, &b].into_iter()),
            [Some(2), Some(1), Some(0), None, Some(1)]
        );
    }
}
