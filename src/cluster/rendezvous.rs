//! Rendezvous (highest random weight) hashing: a key belongs to the member with the highest
//! score for it. Every replica computes the same owner from the same member list, and adding or
//! removing one member moves only the keys that member wins or held (about 1/N of them).

use sha2::{Digest as _, Sha256};

/// A member's weight for `key`: stable across processes, builds and machines (it decides where
/// a whole cluster sends a key, so every replica must compute the same number).
pub fn score(member: &str, key: &str) -> u64 {
    let mut h = Sha256::new();
    h.update(member.as_bytes());
    h.update([0]);
    h.update(key.as_bytes());
    let out = h.finalize();
    u64::from_be_bytes(out[..8].try_into().expect("8 bytes"))
}

/// The member that owns `key`, or `None` without members. Ties (astronomically unlikely) go
/// to the greater name, so the answer never depends on the order of the list.
pub fn owner<'a>(members: impl IntoIterator<Item = &'a str>, key: &str) -> Option<&'a str> {
    members
        .into_iter()
        .max_by(|a, b| (score(a, key), *a).cmp(&(score(b, key), *b)))
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    fn keys(n: usize) -> Vec<String> {
        (0..n).map(|i| format!("sha256:{i:064x}")).collect()
    }

    #[test]
    fn the_owner_does_not_depend_on_the_order_of_the_list() {
        let a = ["http://a:1", "http://b:1", "http://c:1"];
        let mut b = a;
        b.reverse();
        for k in keys(200) {
            assert_eq!(owner(a, &k), owner(b, &k));
        }
        assert_eq!(owner([], "k"), None);
    }

    #[test]
    fn keys_spread_over_the_members() {
        let m = [
            "http://10.0.0.5:5000",
            "http://10.0.0.6:5000",
            "http://10.0.0.7:5000",
        ];
        let mut counts = [0usize; 3];
        for k in keys(3000) {
            let o = owner(m, &k).unwrap();
            counts[m.iter().position(|x| *x == o).unwrap()] += 1;
        }
        for c in counts {
            assert!((800..1200).contains(&c), "uneven spread: {counts:?}");
        }
    }

    proptest! {
        /// Adding a member moves a key only to the new member; removing one moves only the keys
        /// it owned. Nothing else changes hands.
        #[test]
        fn membership_changes_move_only_the_keys_they_must(
            n in 1usize..8,
            added in 0usize..1000,
            ks in proptest::collection::vec("[a-z0-9:]{1,40}", 1..50),
        ) {
            let before: Vec<String> = (0..n).map(|i| format!("http://10.0.0.{i}:5000")).collect();
            let newcomer = format!("http://10.1.0.{added}:5000");
            let mut after = before.clone();
            after.push(newcomer.clone());
            for k in &ks {
                let was = owner(before.iter().map(String::as_str), k).unwrap();
                let now = owner(after.iter().map(String::as_str), k).unwrap();
                prop_assert!(now == was || now == newcomer, "{k}: {was} -> {now}");
                // And back: removing the newcomer returns every key to its old owner.
                prop_assert_eq!(owner(before.iter().map(String::as_str), k).unwrap(), was);
            }
        }
    }
}
