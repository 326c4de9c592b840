//! The upstream registries: which one a request selects, and a client per upstream that handles
//! authentication, redirects, mirrors and error classification.

mod auth;
mod client;
mod raw;

use std::sync::Arc;

use crate::clock::Clock;
use crate::config::UpstreamConfig;
use crate::error::ApiError;
use crate::oci::RepoName;

pub use client::{Blob, Upstream, UpstreamRequest};
pub use raw::RawBody;

/// Why an upstream request failed. `Display` names the upstream by its configured name and
/// never includes a URL or a credential.
#[derive(Debug, Clone, thiserror::Error)]
#[error("upstream {upstream}: {kind}")]
pub struct UpstreamError {
    pub upstream: Arc<str>,
    pub kind: UpstreamErrorKind,
}

#[derive(Debug, Clone, thiserror::Error)]
pub enum UpstreamErrorKind {
    #[error("unreachable ({0})")]
    Unreachable(&'static str),
    #[error("timed out")]
    Timeout,
    #[error("not found")]
    NotFound,
    #[error("access denied (check the upstream's credentials)")]
    Denied,
    #[error("rate limited")]
    RateLimited { retry_after: Option<String> },
    #[error("answered {0}")]
    Status(u16),
    #[error("sent content that does not match its digest")]
    DigestMismatch,
    #[error("closed the transfer early")]
    Truncated,
    #[error("sent a manifest larger than {0} bytes")]
    TooLarge(u64),
    #[error("sent an invalid response: {0}")]
    Protocol(&'static str),
    /// Its challenge named a token realm that is not its own host or domain, nor listed in
    /// `token_realms` (or plain http): nothing was sent there. The realm itself is only logged.
    #[error("asked for a token from a realm that is not trusted (not its own host or domain, nor in token_realms)")]
    UntrustedRealm,
    /// The proxy runs offline (`server.offline`): no upstream is contacted.
    #[error("not contacted: entrepot is offline and this is not in its store")]
    Offline,
}

impl UpstreamErrorKind {
    /// Failures after which the last known tag mapping is served (stale-if-error), and the next
    /// mirror is tried.
    pub fn is_unavailable(&self) -> bool {
        matches!(
            self,
            UpstreamErrorKind::Unreachable(_)
                | UpstreamErrorKind::Timeout
                | UpstreamErrorKind::RateLimited { .. }
                | UpstreamErrorKind::Status(500..=599)
        )
    }
}

/// All configured upstreams and the selection rules of DESIGN.md ("Routing: which upstream").
pub struct Upstreams {
    list: Vec<Arc<Upstream>>,
}

impl Upstreams {
    pub fn new(
        configs: &[UpstreamConfig],
        clock: Clock,
        offline: bool,
    ) -> Result<Upstreams, reqwest::Error> {
        let list = configs
            .iter()
            .map(|c| Upstream::new(c.clone(), clock.clone(), offline).map(Arc::new))
            .collect::<Result<_, _>>()?;
        Ok(Upstreams { list })
    }

    /// Every configured upstream, in configuration order.
    pub fn all(&self) -> &[Arc<Upstream>] {
        &self.list
    }

    fn by_name(&self, name: &str) -> Option<&Arc<Upstream>> {
        self.list.iter().find(|u| u.config().matches(name))
    }

    /// The upstream configured as `name` and `repo` as it is asked for there (a request
    /// forwarded by another replica, which already selected both).
    pub fn named(
        &self,
        name: &str,
        repo: &RepoName,
    ) -> Result<(Arc<Upstream>, RepoName), ApiError> {
        let up = self
            .list
            .iter()
            .find(|u| &**u.name() == name)
            .ok_or_else(|| {
                ApiError::NoUpstream(format!("upstream {name:?} is not configured here"))
            })?;
        if !up.config().admits(repo.as_str()) {
            return Err(ApiError::NameUnknown);
        }
        Ok((up.clone(), repo.clone()))
    }

    /// Picks the upstream for a request and the repository name to ask it for:
    /// `ns=` first, then a first path component naming an upstream, then the default.
    pub fn select(
        &self,
        ns: Option<&str>,
        name: &RepoName,
    ) -> Result<(Arc<Upstream>, RepoName), ApiError> {
        let (up, repo) = if let Some(ns) = ns {
            let up = self.by_name(ns).ok_or_else(|| {
                ApiError::NoUpstream(format!("registry {ns:?} is not proxied here"))
            })?;
            (up, name.clone())
        } else if let Some((up, rest)) = name
            .strip_first()
            .and_then(|(first, rest)| self.by_name(first).map(|u| (u, rest)))
        {
            (up, rest)
        } else {
            let up = self
                .list
                .iter()
                .find(|u| u.config().default)
                .ok_or_else(|| {
                    ApiError::NoUpstream(format!(
                        "{name} names no proxied registry and there is no default upstream"
                    ))
                })?;
            (up, name.clone())
        };
        let repo = if up.config().library_prefix {
            repo.with_library_prefix()
        } else {
            repo
        };
        // Outside `allow` or inside `deny`: as if it did not exist, for every endpoint and
        // before the store is consulted (a cached copy is still a read).
        if !up.config().admits(repo.as_str()) {
            return Err(ApiError::NameUnknown);
        }
        Ok((up.clone(), repo))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;

    fn ups() -> Upstreams {
        let c = Config::parse(
            r#"
            [[upstream]]
            name = "docker.io"
            url = "https://registry-1.docker.io"
            default = true
            aliases = ["index.docker.io"]
            [[upstream]]
            name = "ghcr.io"
            url = "https://ghcr.io"
            "#,
        )
        .unwrap();
        Upstreams::new(&c.upstreams, Clock::default(), false).unwrap()
    }

    fn sel(u: &Upstreams, ns: Option<&str>, name: &str) -> Result<(String, String), ApiError> {
        u.select(ns, &name.parse().unwrap())
            .map(|(up, repo)| (up.name().to_string(), repo.to_string()))
    }

    #[test]
    fn selection_order() {
        let u = ups();
        let s = |a: &str, b: &str| Ok::<_, ()>((a.to_string(), b.to_string()));
        assert_eq!(
            sel(&u, Some("ghcr.io"), "org/app").ok(),
            s("ghcr.io", "org/app").ok()
        );
        assert_eq!(
            sel(&u, Some("docker.io"), "alpine").ok(),
            s("docker.io", "library/alpine").ok()
        );
        assert_eq!(
            sel(&u, None, "ghcr.io/org/app").ok(),
            s("ghcr.io", "org/app").ok()
        );
        assert_eq!(
            sel(&u, None, "index.docker.io/alpine").ok(),
            s("docker.io", "library/alpine").ok()
        );
        assert_eq!(
            sel(&u, None, "library/alpine").ok(),
            s("docker.io", "library/alpine").ok()
        );
        assert_eq!(
            sel(&u, None, "alpine").ok(),
            s("docker.io", "library/alpine").ok()
        );
        // A single component that names an upstream is a repository, not a prefix.
        assert_eq!(
            sel(&u, None, "ghcr.io").ok(),
            s("docker.io", "library/ghcr.io").ok()
        );
        assert!(matches!(
            sel(&u, Some("evil.example"), "x"),
            Err(ApiError::NoUpstream(_))
        ));
    }

    #[test]
    fn allow_and_deny_apply_to_the_name_the_upstream_sees() {
        let c = Config::parse(
            r#"
            [[upstream]]
            name = "docker.io"
            url = "https://registry-1.docker.io"
            default = true
            allow = ["library/*", "team/**"]
            deny = ["team/secret/**"]
            "#,
        )
        .unwrap();
        let u = Upstreams::new(&c.upstreams, Clock::default(), false).unwrap();
        // `alpine` is `library/alpine` upstream, by every route.
        for (ns, name) in [
            (None, "alpine"),
            (None, "docker.io/alpine"),
            (Some("docker.io"), "alpine"),
            (None, "team/a/b"),
        ] {
            assert!(sel(&u, ns, name).is_ok(), "{ns:?} {name}");
        }
        for (ns, name) in [
            (None, "someone/app"),
            (None, "library/a/b"),
            (None, "team/secret/app"),
            (Some("docker.io"), "team/secret/app"),
            (None, "docker.io/team/secret/x/y"),
        ] {
            assert!(
                matches!(sel(&u, ns, name), Err(ApiError::NameUnknown)),
                "{ns:?} {name}"
            );
        }
    }

    #[test]
    fn no_default_refuses_bare_names() {
        let c =
            Config::parse("[[upstream]]\nname = \"a.io\"\nurl = \"http://127.0.0.1:1\"").unwrap();
        let u = Upstreams::new(&c.upstreams, Clock::default(), false).unwrap();
        assert!(matches!(
            sel(&u, None, "library/alpine"),
            Err(ApiError::NoUpstream(_))
        ));
        assert!(sel(&u, None, "a.io/x").is_ok());
    }
}
