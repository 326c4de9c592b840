//! Upstream authentication: `WWW-Authenticate` challenges, the bearer-token flow (anonymous or
//! with credentials sent to the token endpoint), basic auth, and a token cache keyed by origin
//! and scope that keeps tokens until just before they expire.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;

use base64::Engine as _;
use http::HeaderValue;
use tokio::time::Instant;

/// A parsed `WWW-Authenticate` challenge.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Challenge {
    Basic,
    Bearer {
        realm: String,
        service: Option<String>,
        scope: Option<String>,
    },
}

/// Parses `Bearer realm="...",service="...",scope="..."` or `Basic realm="..."`.
pub fn parse_challenge(value: &str) -> Option<Challenge> {
    let value = value.trim();
    let (scheme, rest) = value.split_once(' ').unwrap_or((value, ""));
    let params = parse_params(rest);
    let get = |k: &str| {
        params
            .iter()
            .find(|(key, _)| key.eq_ignore_ascii_case(k))
            .map(|(_, v)| v.clone())
    };
    if scheme.eq_ignore_ascii_case("basic") {
        Some(Challenge::Basic)
    } else if scheme.eq_ignore_ascii_case("bearer") {
        Some(Challenge::Bearer {
            realm: get("realm")?,
            service: get("service"),
            scope: get("scope"),
        })
    } else {
        None
    }
}

/// `key="quoted, value",key2=token` → pairs. Quoted values may contain commas.
fn parse_params(s: &str) -> Vec<(String, String)> {
    let mut out = Vec::new();
    let mut chars = s.chars().peekable();
    loop {
        while chars.peek().is_some_and(|c| *c == ',' || c.is_whitespace()) {
            chars.next();
        }
        let key: String = std::iter::from_fn(|| chars.next_if(|c| *c != '=' && *c != ','))
            .collect::<String>()
            .trim()
            .to_string();
        if key.is_empty() {
            break;
        }
        if chars.next() != Some('=') {
            continue;
        }
        let mut val = String::new();
        if chars.peek() == Some(&'"') {
            chars.next();
            while let Some(c) = chars.next() {
                match c {
                    '\\' => {
                        if let Some(n) = chars.next() {
                            val.push(n)
                        }
                    }
                    '"' => break,
                    c => val.push(c),
                }
            }
        } else {
            val = std::iter::from_fn(|| chars.next_if(|c| *c != ','))
                .collect::<String>()
                .trim()
                .to_string();
        }
        out.push((key, val));
    }
    out
}

pub fn basic_header(user: &str, pass: &str) -> HeaderValue {
    let enc = base64::engine::general_purpose::STANDARD.encode(format!("{user}:{pass}"));
    let mut v = HeaderValue::from_str(&format!("Basic {enc}")).expect("base64 is a valid header");
    v.set_sensitive(true);
    v
}

pub fn bearer_header(token: &str) -> Option<HeaderValue> {
    let mut v = HeaderValue::from_str(&format!("Bearer {token}")).ok()?;
    v.set_sensitive(true);
    Some(v)
}

/// The token endpoint's answer (Docker's `token` or OAuth2's `access_token`).
#[derive(Debug, serde::Deserialize)]
pub struct TokenResponse {
    pub token: Option<String>,
    pub access_token: Option<String>,
    pub expires_in: Option<u64>,
}

/// Tokens are assumed valid for this long when the endpoint does not say (the spec's default).
pub const DEFAULT_TOKEN_LIFETIME: Duration = Duration::from_secs(60);

/// What an upstream origin asked for last time, and the tokens it gave us.
#[derive(Default)]
pub struct AuthState {
    challenges: Mutex<HashMap<String, Challenge>>,
    tokens: Mutex<HashMap<(String, String), (HeaderValue, Instant)>>,
}

impl AuthState {
    pub fn challenge(&self, origin: &str) -> Option<Challenge> {
        self.challenges.lock().unwrap().get(origin).cloned()
    }

    pub fn remember_challenge(&self, origin: &str, c: Challenge) {
        self.challenges
            .lock()
            .unwrap()
            .insert(origin.to_string(), c);
    }

    pub fn cached_token(&self, origin: &str, scope: &str, now: Instant) -> Option<HeaderValue> {
        let mut tokens = self.tokens.lock().unwrap();
        let key = (origin.to_string(), scope.to_string());
        match tokens.get(&key) {
            Some((v, expires)) if *expires > now => Some(v.clone()),
            Some(_) => {
                tokens.remove(&key);
                None
            }
            None => None,
        }
    }

    pub fn store_token(&self, origin: &str, scope: &str, v: HeaderValue, expires: Instant) {
        self.tokens
            .lock()
            .unwrap()
            .insert((origin.to_string(), scope.to_string()), (v, expires));
    }

    pub fn forget_token(&self, origin: &str, scope: &str) {
        self.tokens
            .lock()
            .unwrap()
            .remove(&(origin.to_string(), scope.to_string()));
    }
}

/// When a token that lives `lifetime` should be dropped: a little early, so it is never sent
/// just as it expires.
pub fn expiry(now: Instant, lifetime: Duration) -> Instant {
    let margin = (lifetime / 10).min(Duration::from_secs(30));
    now + lifetime.saturating_sub(margin)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_bearer() {
        let c = parse_challenge(
            r#"Bearer realm="https://auth.docker.io/token",service="registry.docker.io",scope="repository:library/alpine:pull,push""#,
        )
        .unwrap();
        assert_eq!(
            c,
            Challenge::Bearer {
                realm: "https://auth.docker.io/token".into(),
                service: Some("registry.docker.io".into()),
                scope: Some("repository:library/alpine:pull,push".into()),
            }
        );
        assert_eq!(
            parse_challenge(r#"bearer realm=http://x/t"#),
            Some(Challenge::Bearer {
                realm: "http://x/t".into(),
                service: None,
                scope: None
            })
        );
        assert_eq!(parse_challenge("Basic realm=\"x\""), Some(Challenge::Basic));
        assert_eq!(parse_challenge("Bearer service=\"x\""), None);
        assert_eq!(parse_challenge("Negotiate"), None);
    }

    #[test]
    fn basic_encoding() {
        assert_eq!(
            basic_header("aladdin", "opensesame"),
            "Basic YWxhZGRpbjpvcGVuc2VzYW1l"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn tokens_expire() {
        let s = AuthState::default();
        let now = Instant::now();
        let v = bearer_header("t").unwrap();
        s.store_token("o", "s", v, expiry(now, Duration::from_secs(60)));
        assert!(s.cached_token("o", "s", now).is_some());
        assert!(s.cached_token("o", "other", now).is_none());
        tokio::time::advance(Duration::from_secs(55)).await;
        assert!(s.cached_token("o", "s", Instant::now()).is_none());
    }
}
