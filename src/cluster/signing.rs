//! Peer requests carry `Entrepot-Peer: <replica> <unix seconds> <hmac>`: an HMAC-SHA256 with
//! the cluster secret over who sends, when, and what is asked. The secret itself never travels,
//! a signature is good for one request line within a few minutes, and a client that copies
//! the header onto another request gets 403.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use hmac::{Hmac, Mac};
use sha2::Sha256;

/// How far a signature's time may be from ours (clock skew between nodes included).
const MAX_SKEW: Duration = Duration::from_secs(300);

fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_secs()
}

fn mac(
    secret: &[u8],
    replica: &str,
    t: u64,
    method: &str,
    target: &str,
    upstream: &str,
) -> Hmac<Sha256> {
    let mut m = Hmac::<Sha256>::new_from_slice(secret).expect("HMAC takes any key length");
    for part in [replica, &t.to_string(), method, target, upstream] {
        m.update(part.as_bytes());
        m.update(b"\n");
    }
    m
}

/// The header value for a request of `method` to `target` (path and query) for `upstream`
/// (empty for requests that name none).
pub fn sign(secret: &[u8], replica: &str, method: &str, target: &str, upstream: &str) -> String {
    sign_at(secret, replica, now_secs(), method, target, upstream)
}

fn sign_at(
    secret: &[u8],
    replica: &str,
    t: u64,
    method: &str,
    target: &str,
    upstream: &str,
) -> String {
    let tag = mac(secret, replica, t, method, target, upstream)
        .finalize()
        .into_bytes();
    format!("{replica} {t} {}", hex::encode(tag))
}

/// The sending replica's id if `value` is a good signature of this request, else `None`.
pub fn verify(
    secret: &[u8],
    value: &str,
    method: &str,
    target: &str,
    upstream: &str,
) -> Option<String> {
    verify_at(secret, value, now_secs(), method, target, upstream)
}

fn verify_at(
    secret: &[u8],
    value: &str,
    now: u64,
    method: &str,
    target: &str,
    upstream: &str,
) -> Option<String> {
    let mut parts = value.split(' ');
    let (replica, t, sig) = (parts.next()?, parts.next()?, parts.next()?);
    if parts.next().is_some() || replica.is_empty() || replica.len() > 64 {
        return None;
    }
    let t: u64 = t.parse().ok()?;
    if now.abs_diff(t) > MAX_SKEW.as_secs() {
        return None;
    }
    let sig = hex::decode(sig).ok()?;
    // Constant-time comparison.
    mac(secret, replica, t, method, target, upstream)
        .verify_slice(&sig)
        .ok()?;
    Some(replica.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    const S: &[u8] = b"0123456789abcdef";

    #[test]
    fn a_signature_is_good_for_its_own_request_only() {
        let v = sign_at(S, "r1", 1000, "GET", "/v2/a/blobs/sha256:x", "up");
        assert_eq!(
            verify_at(S, &v, 1000, "GET", "/v2/a/blobs/sha256:x", "up").as_deref(),
            Some("r1")
        );
        assert_eq!(
            verify_at(S, &v, 1200, "GET", "/v2/a/blobs/sha256:x", "up").as_deref(),
            Some("r1")
        );
        for (secret, now, method, target, up) in [
            (
                &b"another secret!!"[..],
                1000,
                "GET",
                "/v2/a/blobs/sha256:x",
                "up",
            ),
            (S, 1000 + 301, "GET", "/v2/a/blobs/sha256:x", "up"),
            (S, 1000, "HEAD", "/v2/a/blobs/sha256:x", "up"),
            (S, 1000, "GET", "/v2/b/blobs/sha256:x", "up"),
            (S, 1000, "GET", "/v2/a/blobs/sha256:x", "other"),
        ] {
            assert_eq!(verify_at(secret, &v, now, method, target, up), None);
        }
    }

    #[test]
    fn malformed_values_are_refused() {
        for v in [
            "",
            "r1",
            "r1 1000",
            "r1 x 00",
            "r1 1000 zz",
            " 1000 00",
            "r1 1000 00 extra",
        ] {
            assert_eq!(verify_at(S, v, 1000, "GET", "/", ""), None, "{v:?}");
        }
    }
}
