//! `[[upstream]]`: names and aliases, URLs and mirrors, credentials, `token_realms`,
//! `allow`/`deny`, timeouts, and the registries proxied when the file names none.

use std::path::PathBuf;
use std::time::Duration;

use serde::Deserialize;
use url::Url;

use super::{invalid, opt_duration, parse_url, ConfigError, Env, Redacted};

/// `Debug` never shows the password.
#[derive(Clone)]
pub struct UpstreamConfig {
    /// What `?ns=` and the first path component match.
    pub name: String,
    /// Other names that select this upstream (`index.docker.io` for `docker.io`).
    pub aliases: Vec<String>,
    pub url: Url,
    /// Tried in order when the main URL is unreachable, times out, or answers 5xx / 429.
    pub mirrors: Vec<Url>,
    /// Serves bare names (`/v2/library/alpine/...`).
    pub default: bool,
    pub tag_ttl: Duration,
    pub username: Option<String>,
    pub password: Option<String>,
    /// Single-component names gain `library/` (Docker Hub's official images).
    pub library_prefix: bool,
    pub connect_timeout: Duration,
    /// Whole-request limit for small requests (manifests, tags, token, HEAD).
    pub request_timeout: Duration,
    /// Longest silence allowed while a blob streams.
    pub read_timeout: Duration,
    /// Token realms trusted besides the upstream's own host and registrable domain: matched by
    /// scheme, host and port (`token_realms`). A plain `http://` one is only accepted at load
    /// when the upstream itself is plain http on that host.
    pub token_realms: Vec<Url>,
    /// Repositories proxied (`allow`; `None`: all) and refused (`deny`, which wins), as the
    /// upstream names them (after `library/` is added).
    pub allow: Option<RepoGlobs>,
    pub deny: Option<RepoGlobs>,
}

impl std::fmt::Debug for UpstreamConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("UpstreamConfig")
            .field("name", &self.name)
            .field("aliases", &self.aliases)
            .field("url", &self.url.as_str())
            .field(
                "mirrors",
                &self.mirrors.iter().map(Url::as_str).collect::<Vec<_>>(),
            )
            .field("default", &self.default)
            .field("tag_ttl", &self.tag_ttl)
            .field("username", &self.username)
            .field("password", &self.password.as_ref().map(|_| Redacted))
            .field("library_prefix", &self.library_prefix)
            .field("connect_timeout", &self.connect_timeout)
            .field("request_timeout", &self.request_timeout)
            .field("read_timeout", &self.read_timeout)
            .field(
                "token_realms",
                &self
                    .token_realms
                    .iter()
                    .map(Url::as_str)
                    .collect::<Vec<_>>(),
            )
            .field("allow", &self.allow)
            .field("deny", &self.deny)
            .finish()
    }
}

impl UpstreamConfig {
    /// Does `name` (an `ns=` value or a first path component) select this upstream?
    pub fn matches(&self, name: &str) -> bool {
        self.name == name || self.aliases.iter().any(|a| a == name)
    }

    /// May `repo` (as the upstream names it) be read through this upstream? Deny wins over
    /// allow; without `allow` every repository that is not denied may.
    pub fn admits(&self, repo: &str) -> bool {
        self.allow.as_ref().is_none_or(|a| a.is_match(repo))
            && !self.deny.as_ref().is_some_and(|d| d.is_match(repo))
    }
}

/// A list of repository globs (`library/**`, `team/*`), compiled once at load. `*` and `?`
/// stay within one path component, `**` crosses them.
#[derive(Clone)]
pub struct RepoGlobs {
    patterns: Vec<String>,
    set: globset::GlobSet,
}

impl RepoGlobs {
    /// Compiles `patterns`; the error names `key` and the pattern at fault.
    fn parse(key: &str, patterns: Vec<String>) -> Result<RepoGlobs, ConfigError> {
        if patterns.is_empty() {
            return Err(invalid(
                key,
                "is empty: leave it out, or list repository patterns like \"library/**\"",
            ));
        }
        let mut set = globset::GlobSetBuilder::new();
        for p in &patterns {
            let bad = |why: String| invalid(key, format!("{p:?} {why}"));
            if p.is_empty() || p.starts_with('/') || p.ends_with('/') || p.contains("//") {
                return Err(bad(
                    "must be a repository pattern like \"library/*\" or \"team/**\" \
                     (no leading, trailing or double '/')"
                        .into(),
                ));
            }
            // Repository names are lower-case: an upper-case pattern would silently match
            // nothing.
            if p.chars().any(|c| c.is_ascii_uppercase()) {
                return Err(bad(
                    "can never match: repository names are lower-case".into()
                ));
            }
            let glob = globset::GlobBuilder::new(p)
                .literal_separator(true)
                .build()
                .map_err(|e| bad(format!("is not a valid pattern: {}", e.kind())))?;
            set.add(glob);
        }
        let set = set
            .build()
            .map_err(|e| invalid(key, format!("cannot be compiled: {e}")))?;
        Ok(RepoGlobs { patterns, set })
    }

    pub fn is_match(&self, repo: &str) -> bool {
        self.set.is_match(repo)
    }

    pub fn patterns(&self) -> &[String] {
        &self.patterns
    }
}

impl std::fmt::Debug for RepoGlobs {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.patterns.fmt(f)
    }
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawUpstream {
    name: Option<String>,
    url: Option<String>,
    #[serde(default)]
    aliases: Vec<String>,
    #[serde(default)]
    mirrors: Vec<String>,
    #[serde(default)]
    default: bool,
    tag_ttl: Option<String>,
    username: Option<String>,
    password: Option<String>,
    password_env: Option<String>,
    password_file: Option<PathBuf>,
    library_prefix: Option<bool>,
    connect_timeout: Option<String>,
    request_timeout: Option<String>,
    read_timeout: Option<String>,
    #[serde(default)]
    token_realms: Vec<String>,
    allow: Option<Vec<String>>,
    deny: Option<Vec<String>>,
}

const DEFAULT_TAG_TTL: Duration = Duration::from_secs(5 * 60);

/// The registries proxied when the configuration names none.
fn builtin_upstreams() -> Vec<RawUpstream> {
    let up = |name: &str, url: &str| RawUpstream {
        name: Some(name.to_string()),
        url: Some(url.to_string()),
        ..RawUpstream::default()
    };
    vec![
        RawUpstream {
            default: true,
            aliases: vec!["index.docker.io".into(), "registry-1.docker.io".into()],
            ..up("docker.io", "https://registry-1.docker.io")
        },
        up("ghcr.io", "https://ghcr.io"),
        up("quay.io", "https://quay.io"),
        up("registry.k8s.io", "https://registry.k8s.io"),
        up("gcr.io", "https://gcr.io"),
    ]
}

/// The `[[upstream]]` tables, validated, or the built-in registries when there are none. No
/// name or alias selects two upstreams, and at most one is the default.
pub(super) fn validate_upstreams(
    raw: Vec<RawUpstream>,
    env: Env,
) -> Result<Vec<UpstreamConfig>, ConfigError> {
    let raw_upstreams = if raw.is_empty() {
        builtin_upstreams()
    } else {
        raw
    };
    let mut upstreams: Vec<UpstreamConfig> = Vec::new();
    for (i, u) in raw_upstreams.into_iter().enumerate() {
        let up = validate_upstream(i, u, env)?;
        let key = format!("upstream[{i}].name");
        for n in std::iter::once(&up.name).chain(&up.aliases) {
            if upstreams.iter().any(|o| o.matches(n)) {
                return Err(invalid(key, format!("{n:?} names two upstreams")));
            }
        }
        upstreams.push(up);
    }
    if upstreams.iter().filter(|u| u.default).count() > 1 {
        return Err(invalid(
            "upstream.default",
            "only one upstream may be the default",
        ));
    }
    Ok(upstreams)
}

fn validate_upstream(i: usize, u: RawUpstream, env: Env) -> Result<UpstreamConfig, ConfigError> {
    let key = |k: &str| format!("upstream[{i}].{k}");
    let name = u.name.ok_or_else(|| invalid(key("name"), "is required"))?;
    check_upstream_name(&name).map_err(|p| invalid(key("name"), p))?;
    for a in &u.aliases {
        check_upstream_name(a).map_err(|p| invalid(key("aliases"), p))?;
    }
    let url = u.url.ok_or_else(|| invalid(key("url"), "is required"))?;
    let url = parse_url(&url).map_err(|p| invalid(key("url"), p))?;
    let mirrors = u
        .mirrors
        .iter()
        .map(|m| parse_url(m).map_err(|p| invalid(key("mirrors"), p)))
        .collect::<Result<Vec<_>, _>>()?;
    let mut password = u.password;
    let sources = [
        password.is_some(),
        u.password_env.is_some(),
        u.password_file.is_some(),
    ];
    if sources.iter().filter(|s| **s).count() > 1 {
        return Err(invalid(
            key("password"),
            "give only one of password, password_env, password_file",
        ));
    }
    if let Some(var) = &u.password_env {
        password = Some(env(var).ok_or_else(|| {
            invalid(
                key("password_env"),
                format!("environment variable {var} is not set"),
            )
        })?);
    }
    if let Some(file) = &u.password_file {
        let text = std::fs::read_to_string(file)
            .map_err(|e| invalid(key("password_file"), format!("{}: {e}", file.display())))?;
        password = Some(text.trim_end_matches(['\r', '\n']).to_string());
    }
    if password.is_some() != u.username.is_some() {
        return Err(invalid(
            key("username"),
            "username and password go together",
        ));
    }
    let library_prefix = u
        .library_prefix
        .unwrap_or(name == "docker.io" || u.aliases.iter().any(|a| a == "docker.io"));
    let token_realms = u
        .token_realms
        .iter()
        .map(|r| token_realm(r, &url, &mirrors).map_err(|p| invalid(key("token_realms"), p)))
        .collect::<Result<Vec<_>, _>>()?;
    let allow = u
        .allow
        .map(|p| RepoGlobs::parse(&key("allow"), p))
        .transpose()?;
    let deny = u
        .deny
        .map(|p| RepoGlobs::parse(&key("deny"), p))
        .transpose()?;
    Ok(UpstreamConfig {
        tag_ttl: opt_duration(&key("tag_ttl"), &u.tag_ttl)?.unwrap_or(DEFAULT_TAG_TTL),
        connect_timeout: opt_duration(&key("connect_timeout"), &u.connect_timeout)?
            .unwrap_or(Duration::from_secs(10)),
        request_timeout: opt_duration(&key("request_timeout"), &u.request_timeout)?
            .unwrap_or(Duration::from_secs(30)),
        read_timeout: opt_duration(&key("read_timeout"), &u.read_timeout)?
            .unwrap_or(Duration::from_secs(60)),
        name,
        aliases: u.aliases,
        url,
        mirrors,
        default: u.default,
        username: u.username,
        password,
        library_prefix,
        token_realms,
        allow,
        deny,
    })
}

/// A `token_realms` entry: an http(s) URL whose scheme, host and port are trusted. Plain
/// `http://` would carry the credentials in clear, so it is accepted only on the host of an
/// endpoint (`url` or a mirror) that is itself plain http.
fn token_realm(s: &str, url: &Url, mirrors: &[Url]) -> Result<Url, String> {
    let realm = parse_url(s)?;
    let cleartext_ok = std::iter::once(url)
        .chain(mirrors)
        .any(|e| e.scheme() == "http" && e.host_str() == realm.host_str());
    if realm.scheme() == "http" && !cleartext_ok {
        return Err(format!(
            "{s:?} is plain http: credentials would cross the network in clear (allowed only \
             on the host of an upstream URL that is itself http://)"
        ));
    }
    Ok(realm)
}

/// Upstream names appear in `ns=`, in paths and as a folder of the tag index: host-like only.
fn check_upstream_name(name: &str) -> Result<(), String> {
    let ok = !name.is_empty()
        && name.len() <= 253
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b".-:".contains(&b))
        && name.as_bytes()[0].is_ascii_alphanumeric();
    if ok {
        Ok(())
    } else {
        Err(format!(
            "{name:?} must be a registry host name (lower-case letters, digits, '.', '-', ':')"
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::tests::parse_env;

    #[test]
    fn password_env_reads_the_given_environment() {
        let text = "[[upstream]]\nname = \"a\"\nurl = \"http://x\"\nusername = \"u\"\npassword_env = \"A_TOKEN\"";
        let c = parse_env(text, &[("A_TOKEN", "t0ken")]).unwrap();
        assert_eq!(c.upstreams[0].password.as_deref(), Some("t0ken"));
        let e = parse_env(text, &[]).unwrap_err().to_string();
        assert!(
            e.contains("upstream[0].password_env: environment variable A_TOKEN is not set"),
            "{e}"
        );
    }

    #[test]
    fn the_upstream_password_is_never_shown() {
        let pw = "hunter2-correct-horse";
        let c = parse_env(
            &format!(
                "[[upstream]]\nname = \"a\"\nurl = \"http://x\"\nusername = \"robot\"\n\
                 password = \"{pw}\"\nallow = [\"team/**\"]"
            ),
            &[],
        )
        .unwrap();
        assert_eq!(c.upstreams[0].password.as_deref(), Some(pw));
        for debug in [format!("{c:?}"), format!("{:#?}", c.upstreams[0])] {
            assert!(!debug.contains(pw), "{debug}");
            assert!(debug.contains("<redacted>"), "{debug}");
            assert!(
                debug.contains("\"robot\"") && debug.contains("\"team/**\""),
                "{debug}"
            );
        }
        // From the environment or a file: the same.
        let c = parse_env(
            "[[upstream]]\nname = \"a\"\nurl = \"http://x\"\nusername = \"u\"\npassword_env = \"PW\"",
            &[("PW", pw)],
        )
        .unwrap();
        assert!(!format!("{c:?}").contains(pw));
        // Without a password there is nothing to redact.
        let c = parse_env("[[upstream]]\nname = \"a\"\nurl = \"http://x\"", &[]).unwrap();
        assert!(format!("{c:?}").contains("password: None"));
    }

    fn upstream_with(extra: &str) -> Result<UpstreamConfig, ConfigError> {
        let c = parse_env(
            &format!("[[upstream]]\nname = \"a\"\nurl = \"https://registry.example\"\n{extra}"),
            &[],
        )?;
        Ok(c.upstreams.into_iter().next().unwrap())
    }

    #[test]
    fn token_realms_are_urls_and_never_cleartext_to_another_host() {
        let u = upstream_with(
            "token_realms = [\"https://auth.example.com/token\", \"https://sso.example:8443\"]",
        )
        .unwrap();
        let realms: Vec<_> = u.token_realms.iter().map(Url::as_str).collect();
        assert_eq!(
            realms,
            [
                "https://auth.example.com/token",
                "https://sso.example:8443/"
            ]
        );
        // Plain http only on the host of a plain-http endpoint (the URL or a mirror).
        let c = parse_env(
            "[[upstream]]\nname = \"a\"\nurl = \"http://reg.lan:5000\"\n\
             mirrors = [\"http://mirror.lan\"]\n\
             token_realms = [\"http://reg.lan:5001/auth\", \"http://mirror.lan/token\"]",
            &[],
        )
        .unwrap();
        assert_eq!(c.upstreams[0].token_realms.len(), 2);
        for (extra, want) in [
            (
                "token_realms = [\"http://auth.example.com/token\"]",
                "is plain http",
            ),
            (
                "token_realms = [\"http://registry.example/token\"]",
                "is plain http",
            ),
            ("token_realms = [\"auth.example.com\"]", "is not a URL"),
            (
                "token_realms = [\"ftp://auth.example.com\"]",
                "must be an http:// or https://",
            ),
            (
                "token_realms = [\"https://u:p@auth.example.com\"]",
                "credentials",
            ),
            (
                "token_realms = [\"https://auth.example.com/t?x=1\"]",
                "query",
            ),
            (
                "token_realms = \"https://auth.example.com\"",
                "token_realms",
            ),
        ] {
            let e = upstream_with(extra).unwrap_err().to_string();
            assert!(
                e.contains("token_realms") && e.contains(want),
                "{extra}: {e}"
            );
        }
    }

    #[test]
    fn allow_and_deny_are_component_aware_globs() {
        let u = upstream_with(
            "allow = [\"library/*\", \"team/**\", \"tools/app-?\"]\ndeny = [\"team/secret/**\", \"**/*-private\"]",
        )
        .unwrap();
        for yes in ["library/alpine", "team/app", "team/a/b/c", "tools/app-1"] {
            assert!(u.admits(yes), "{yes}");
        }
        for no in [
            "library/a/b",      // `*` stays within one component
            "library",          // `team/**` needs something after `team/`
            "other/app",        // not allowed
            "team/secret/app",  // denied: deny wins over allow
            "team/x/y-private", // denied across components
            "tools/app-12",
            "tools/app-/",
            "team",
        ] {
            assert!(!u.admits(no), "{no}");
        }
        // Without allow everything is admitted but what deny names.
        let u = upstream_with("deny = [\"secret/*\"]").unwrap();
        assert!(u.admits("anything/at/all") && !u.admits("secret/x") && u.admits("secret/x/y"));
        assert!(upstream_with("").unwrap().admits("a/b"));

        for (extra, key) in [
            (
                "allow = [\"team/[ab\"]",
                "upstream[0].allow: \"team/[ab\" is not a valid pattern",
            ),
            (
                "deny = [\"a/{b\"]",
                "upstream[0].deny: \"a/{b\" is not a valid pattern",
            ),
            ("allow = []", "upstream[0].allow: is empty"),
            (
                "allow = [\"/team/*\"]",
                "upstream[0].allow: \"/team/*\" must be",
            ),
            (
                "deny = [\"team//x\"]",
                "upstream[0].deny: \"team//x\" must be",
            ),
            ("allow = [\"\"]", "upstream[0].allow: \"\" must be"),
            (
                "allow = [\"Library/*\"]",
                "upstream[0].allow: \"Library/*\" can never match",
            ),
            ("allow = \"library/*\"", "allow"),
        ] {
            let e = upstream_with(extra).unwrap_err().to_string();
            assert!(e.contains(key), "{extra}: {e}");
        }
    }
}
