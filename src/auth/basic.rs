//! HTTP Basic credentials from a client's `Authorization` header. The password never leaves
//! this type except into the password check: `Debug` hides it and nothing displays it.

use base64::Engine as _;
use http::{header, HeaderMap};

/// A user name and password a client presented.
pub struct Credentials {
    pub user: String,
    password: Vec<u8>,
}

impl Credentials {
    pub fn password(&self) -> &[u8] {
        &self.password
    }
}

impl std::fmt::Debug for Credentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Credentials")
            .field("user", &self.user)
            .field("password", &"<redacted>")
            .finish()
    }
}

/// What a request's `Authorization` header says about Basic credentials.
#[derive(Debug)]
pub enum Presented {
    /// No `Authorization`, or another scheme (a Bearer token meant for some registry): the
    /// request is anonymous here.
    Nothing,
    Basic(Credentials),
    /// `Basic` whose value is not base64 of `user:password` with a UTF-8 user name.
    Malformed,
}

impl Presented {
    /// Reads the first `Authorization` header of `headers`.
    pub fn from_headers(headers: &HeaderMap) -> Presented {
        let Some(value) = headers.get(header::AUTHORIZATION) else {
            return Presented::Nothing;
        };
        let value = value.as_bytes();
        let scheme_end = value.iter().position(|b| *b == b' ').unwrap_or(value.len());
        if !value[..scheme_end].eq_ignore_ascii_case(b"basic") {
            return Presented::Nothing;
        }
        let token = value[scheme_end..].trim_ascii();
        let Ok(decoded) = base64::engine::general_purpose::STANDARD.decode(token) else {
            return Presented::Malformed;
        };
        let Some(colon) = decoded.iter().position(|b| *b == b':') else {
            return Presented::Malformed;
        };
        let Ok(user) = std::str::from_utf8(&decoded[..colon]) else {
            return Presented::Malformed;
        };
        // `Basic Og==` (":"): what containers/image sends when it has no credentials for a
        // challenge it was given. Nothing, not a wrong password.
        if user.is_empty() {
            return if colon + 1 == decoded.len() {
                Presented::Nothing
            } else {
                Presented::Malformed
            };
        }
        Presented::Basic(Credentials {
            user: user.to_string(),
            password: decoded[colon + 1..].to_vec(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderValue;

    fn presented(value: &str) -> Presented {
        let mut h = HeaderMap::new();
        h.insert(header::AUTHORIZATION, HeaderValue::from_str(value).unwrap());
        Presented::from_headers(&h)
    }

    fn basic(userpass: &str) -> String {
        format!(
            "Basic {}",
            base64::engine::general_purpose::STANDARD.encode(userpass)
        )
    }

    #[test]
    fn basic_credentials_are_read() {
        let Presented::Basic(c) = presented(&basic("alice:pa:ss word")) else {
            panic!("not read");
        };
        assert_eq!(c.user, "alice");
        assert_eq!(c.password(), b"pa:ss word");
        // The scheme is case-insensitive; extra spaces are allowed.
        assert!(matches!(
            presented(&basic("a:b").replace("Basic ", "bAsIc   ")),
            Presented::Basic(_)
        ));
        // An empty password is a password.
        let Presented::Basic(c) = presented(&basic("ci:")) else {
            panic!("not read");
        };
        assert!(c.password().is_empty());
    }

    #[test]
    fn other_schemes_and_no_header_are_anonymous() {
        assert!(matches!(
            Presented::from_headers(&HeaderMap::new()),
            Presented::Nothing
        ));
        assert!(matches!(presented("Bearer abc.def"), Presented::Nothing));
        assert!(matches!(presented("Basicabc"), Presented::Nothing));
    }

    #[test]
    fn broken_basic_values_are_malformed() {
        assert!(matches!(presented("Basic !!!"), Presented::Malformed));
        assert!(matches!(
            presented(&basic("no-colon")),
            Presented::Malformed
        ));
        assert!(matches!(presented(&basic(":pw")), Presented::Malformed));
        // containers/image without credentials: nothing presented.
        assert!(matches!(presented(&basic(":")), Presented::Nothing));
        assert!(matches!(presented("Basic"), Presented::Malformed));
    }

    #[test]
    fn debug_hides_the_password() {
        let Presented::Basic(c) = presented(&basic("alice:canary-7731")) else {
            panic!("not read");
        };
        let one = format!("{c:?}");
        let shown = format!("{one} {:?}", Presented::Basic(c));
        assert!(!shown.contains("canary-7731"), "{shown}");
        assert!(shown.contains("alice"));
    }
}
