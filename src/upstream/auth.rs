//! Upstream authentication: `WWW-Authenticate` challenges, which token realms are trusted, the
//! bearer-token flow (anonymous or with credentials sent to the token endpoint), basic auth, and
//! a token cache keyed by origin and scope that keeps tokens until just before they expire.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;

use base64::Engine as _;
use http::HeaderValue;
use tokio::time::Instant;
use url::Url;

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
        // RFC 9110 allows whitespace around `=`.
        while chars.next_if(|c| c.is_whitespace()).is_some() {}
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

/// Why a token realm is trusted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RealmTrust {
    /// On the host of the endpoint that asked for it (any port).
    SameHost,
    /// On the same registrable domain (`auth.docker.io` for `registry-1.docker.io`).
    SameDomain,
    /// Listed in the upstream's `token_realms`.
    Listed,
}

/// Why a token realm is refused: nothing, not even an anonymous request, is sent to it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RealmRefusal {
    /// Not an http(s) URL.
    Scheme,
    /// Plain http, but the endpoint is not plain http on that same host: the credentials (or
    /// the token) would cross the network in clear.
    Cleartext,
    /// Another host, not on the endpoint's domain and not listed in `token_realms`.
    Foreign,
}

impl RealmRefusal {
    pub fn as_str(self) -> &'static str {
        match self {
            RealmRefusal::Scheme => "not an http(s) URL",
            RealmRefusal::Cleartext => "plain http to a host that is not the upstream's own",
            RealmRefusal::Foreign => {
                "not the upstream's own host or domain, and not listed in token_realms"
            }
        }
    }
}

/// May `endpoint` (the upstream URL or mirror whose challenge named `realm`) send us to `realm`
/// for a token? `listed` are the upstream's `token_realms`, matched by scheme, host and port.
pub fn check_realm(
    realm: &Url,
    endpoint: &Url,
    listed: &[Url],
) -> Result<RealmTrust, RealmRefusal> {
    let same_host = host_of(realm).is_some() && host_of(realm) == host_of(endpoint);
    match realm.scheme() {
        "https" => {}
        // The one exception: an upstream that is plain http anyway, on that same host.
        "http" if endpoint.scheme() == "http" && same_host => return Ok(RealmTrust::SameHost),
        "http" => return Err(RealmRefusal::Cleartext),
        _ => return Err(RealmRefusal::Scheme),
    }
    if listed.iter().any(|l| l.origin() == realm.origin()) {
        Ok(RealmTrust::Listed)
    } else if same_host {
        Ok(RealmTrust::SameHost)
    } else if registrable(realm).is_some() && registrable(realm) == registrable(endpoint) {
        Ok(RealmTrust::SameDomain)
    } else {
        Err(RealmRefusal::Foreign)
    }
}

/// The host, lower-case (the URL parser already folds case), without a trailing dot.
fn host_of(url: &Url) -> Option<&str> {
    url.host_str().map(|h| h.trim_end_matches('.'))
}

/// The last two labels of a domain (`docker.io` for `auth.docker.io`); an IP address or
/// `localhost` whole, since their last labels say nothing about who owns them. Without a
/// public-suffix list this takes `a.co.uk` and `b.co.uk` for one domain.
fn registrable(url: &Url) -> Option<&str> {
    let host = host_of(url)?;
    match url.host()? {
        url::Host::Ipv4(_) | url::Host::Ipv6(_) => Some(host),
        url::Host::Domain(_) if host == "localhost" => Some(host),
        url::Host::Domain(_) => {
            let mut dots = host.rmatch_indices('.');
            dots.next();
            Some(match dots.next() {
                Some((i, _)) => &host[i + 1..],
                None => host,
            })
        }
    }
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
    fn realms_on_the_upstreams_own_host_or_domain_or_listed() {
        let u = |s: &str| Url::parse(s).unwrap();
        let check = |realm: &str, endpoint: &str, listed: &[&str]| {
            let listed: Vec<Url> = listed.iter().map(|l| u(l)).collect();
            check_realm(&u(realm), &u(endpoint), &listed)
        };
        use RealmRefusal::*;
        use RealmTrust::*;
        let hub = "https://registry-1.docker.io";
        /// (realm, the endpoint that named it, `token_realms`, verdict)
        type Case<'a> = (
            &'a str,
            &'a str,
            &'a [&'a str],
            Result<RealmTrust, RealmRefusal>,
        );
        let cases: &[Case] = &[
            ("https://auth.docker.io/token", hub, &[], Ok(SameDomain)),
            ("https://registry-1.docker.io/token", hub, &[], Ok(SameHost)),
            ("https://REGISTRY-1.docker.io./t", hub, &[], Ok(SameHost)),
            (
                "https://registry-1.docker.io:8443/t",
                hub,
                &[],
                Ok(SameHost),
            ),
            ("https://a.b.docker.io/t", hub, &[], Ok(SameDomain)),
            ("https://docker.io/t", hub, &[], Ok(SameDomain)),
            ("https://evil.example/steal", hub, &[], Err(Foreign)),
            ("https://docker.io.evil.example/t", hub, &[], Err(Foreign)),
            ("https://evildocker.io/t", hub, &[], Err(Foreign)),
            // Plain http never, even on the same host, when the upstream is https.
            ("http://auth.docker.io/token", hub, &[], Err(Cleartext)),
            (
                "http://registry-1.docker.io/token",
                hub,
                &[],
                Err(Cleartext),
            ),
            (
                "http://auth.docker.io/token",
                hub,
                &["http://auth.docker.io"],
                Err(Cleartext),
            ),
            ("ftp://auth.docker.io/token", hub, &[], Err(Scheme)),
            // Listed: scheme, host and port must all match; the path does not matter.
            (
                "https://sso.example.com/oauth/token",
                "https://ghcr.io",
                &["https://sso.example.com/token"],
                Ok(Listed),
            ),
            (
                "https://sso.example.com:8443/token",
                "https://ghcr.io",
                &["https://sso.example.com/token"],
                Err(Foreign),
            ),
            (
                "https://sso.example.com.evil/token",
                "https://ghcr.io",
                &["https://sso.example.com"],
                Err(Foreign),
            ),
            // A plain-http upstream: http only on its very host.
            (
                "http://reg.lan:5001/auth",
                "http://reg.lan:5000",
                &[],
                Ok(SameHost),
            ),
            (
                "https://auth.reg.lan/t",
                "http://reg.lan:5000",
                &[],
                Ok(SameDomain),
            ),
            (
                "http://auth.reg.lan/t",
                "http://reg.lan:5000",
                &[],
                Err(Cleartext),
            ),
            // IP addresses and localhost are compared whole, never by their last labels.
            (
                "http://127.0.0.1:9/token",
                "http://127.0.0.1:5000",
                &[],
                Ok(SameHost),
            ),
            (
                "http://127.0.0.2:9/token",
                "http://127.0.0.1:5000",
                &[],
                Err(Cleartext),
            ),
            (
                "https://10.0.0.1/token",
                "https://192.168.0.1",
                &[],
                Err(Foreign),
            ),
            (
                "https://1.0.0.1/token",
                "https://2.0.0.1",
                &[],
                Err(Foreign),
            ),
            (
                "https://[::1]:9/token",
                "https://[::1]:5000",
                &[],
                Ok(SameHost),
            ),
            (
                "http://localhost:9/token",
                "http://127.0.0.1:5000",
                &[],
                Err(Cleartext),
            ),
            (
                "https://localhost/token",
                "https://127.0.0.1",
                &[],
                Err(Foreign),
            ),
            (
                "https://localhost/token",
                "https://localhost:5000",
                &[],
                Ok(SameHost),
            ),
            (
                "https://a.localhost/token",
                "https://localhost",
                &[],
                Err(Foreign),
            ),
            // Single-label hosts (a Kubernetes service name) only match themselves.
            ("https://auth/token", "https://registry", &[], Err(Foreign)),
        ];
        for (realm, endpoint, listed, want) in cases {
            assert_eq!(
                check(realm, endpoint, listed),
                *want,
                "{realm} for {endpoint} {listed:?}"
            );
        }
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

/// Properties of the `WWW-Authenticate` parser, which reads what any upstream (or anything
/// answering in its place) sends: no value panics it, and a well-formed challenge gives back
/// exactly its realm, service and scope, whatever their order, case, quoting and escapes.
#[cfg(test)]
mod properties {
    use proptest::prelude::*;

    use super::*;

    /// A parameter value: anything, including quotes, backslashes, commas and `=`.
    fn value() -> impl Strategy<Value = String> {
        prop_oneof![
            2 => "[a-zA-Z0-9:/._-]{0,30}",
            2 => "[a-z:/.,=\"\\\\ ]{0,20}",
            1 => any::<String>(),
        ]
    }

    /// How a value is written: a quoted string with `"` and `\` escaped, or, when it is a
    /// plain token, possibly bare.
    fn written(v: &str, bare: bool) -> String {
        let token = !v.is_empty()
            && v.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"!#$%&'*+.^_`|~-:/".contains(&b));
        if bare && token {
            v.to_string()
        } else {
            format!("\"{}\"", v.replace('\\', "\\\\").replace('"', "\\\""))
        }
    }

    /// Upper, lower or mixed case, as the scheme and the parameter names may be written.
    fn cased(s: &str, how: u8) -> String {
        match how % 3 {
            0 => s.to_string(),
            1 => s.to_ascii_uppercase(),
            _ => s
                .chars()
                .enumerate()
                .map(|(i, c)| {
                    if i % 2 == 0 {
                        c.to_ascii_uppercase()
                    } else {
                        c
                    }
                })
                .collect(),
        }
    }

    /// A well-formed Bearer challenge: its parameters in any order among others, and the
    /// values it must give back.
    #[derive(Debug, Clone)]
    struct Written {
        header: String,
        realm: String,
        service: Option<String>,
        scope: Option<String>,
    }

    fn bearer_challenges(space_around_equals: bool) -> impl Strategy<Value = Written> {
        (
            value(),
            proptest::option::of(value()),
            proptest::option::of(value()),
            proptest::collection::vec(any::<u8>(), 8),
            any::<u64>(),
        )
            .prop_map(move |(realm, service, scope, how, order)| {
                let eq = if space_around_equals { " = " } else { "=" };
                let mut params = vec![format!(
                    "{}{eq}{}",
                    cased("realm", how[0]),
                    written(&realm, how[1] % 2 == 0)
                )];
                if let Some(s) = &service {
                    params.push(format!(
                        "{}{eq}{}",
                        cased("service", how[2]),
                        written(s, how[3] % 2 == 0)
                    ));
                }
                if let Some(s) = &scope {
                    params.push(format!(
                        "{}{eq}{}",
                        cased("scope", how[4]),
                        written(s, how[5] % 2 == 0)
                    ));
                }
                if how[6] % 2 == 0 {
                    params.push(format!("error{eq}\"insufficient_scope\""));
                }
                // Any order: rotate and maybe reverse.
                let len = params.len();
                params.rotate_left(order as usize % len);
                if order & (1 << 40) != 0 {
                    params.reverse();
                }
                let sep = [",", ", ", " ,  "][how[7] as usize % 3];
                let header = format!(
                    "{}{} {}{}",
                    [" ", "", "\t"][how[7] as usize % 3],
                    cased("Bearer", how[6] / 2),
                    params.join(sep),
                    [" ", "", ""][how[5] as usize % 3],
                );
                Written {
                    header,
                    realm,
                    service,
                    scope,
                }
            })
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

        #[test]
        fn no_header_value_panics_the_challenge_parser(
            v in prop_oneof![
                any::<String>(),
                "(Bearer|Basic|bearer|) [a-z=\",\\\\ ]{0,40}",
            ],
        ) {
            let _ = parse_challenge(&v);
        }

        #[test]
        fn a_bearer_challenge_gives_back_its_realm_service_and_scope(
            c in bearer_challenges(false),
        ) {
            prop_assert_eq!(
                parse_challenge(&c.header),
                Some(Challenge::Bearer { realm: c.realm, service: c.service, scope: c.scope }),
                "{}", c.header
            );
        }

        /// Bearer without a realm names no token endpoint: no challenge to answer.
        #[test]
        fn a_bearer_challenge_without_a_realm_is_none(c in bearer_challenges(false)) {
            let without = c.header.replace("realm", "nealm").replace("REALM", "NEALM")
                .replace("ReAlM", "NeAlM");
            prop_assume!(!without.to_ascii_lowercase().contains("realm"));
            prop_assert_eq!(parse_challenge(&without), None);
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

        /// RFC 9110 §11.2 allows whitespace around `=` in a parameter (`realm = "..."`).
        #[test]
        fn whitespace_around_equals_is_allowed(c in bearer_challenges(true)) {
            prop_assert_eq!(
                parse_challenge(&c.header),
                Some(Challenge::Bearer { realm: c.realm, service: c.service, scope: c.scope }),
                "{}", c.header
            );
        }
    }
}
