//! `[cluster]`: several replicas forming one cache. Who the members are (a static list or a DNS
//! name), how this replica is reached, and the secret peer requests are signed with.

use std::path::PathBuf;
use std::time::Duration;

use serde::Deserialize;
use url::Url;

use super::{invalid, parse_url, positive_duration, ConfigError, Redacted};

#[derive(Clone)]
pub struct ClusterConfig {
    /// How the other replicas reach this one (an entry of `peers`, or one of the DNS answers).
    /// Optional: a replica also recognises itself when a probe of a member answers with its
    /// own id.
    pub advertise: Option<String>,
    pub members: Members,
    /// Signs peer requests (HMAC): peers know it, clients do not.
    pub secret: Vec<u8>,
    /// A forward to the owner that cannot connect within this falls back to a local fill.
    pub connect_timeout: Duration,
    /// How long a forward waits for the owner's response headers before filling locally.
    pub response_timeout: Duration,
    /// How often every member is probed.
    pub health_interval: Duration,
}

impl std::fmt::Debug for ClusterConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClusterConfig")
            .field("advertise", &self.advertise)
            .field("members", &self.members)
            .field("secret", &Redacted)
            .field("connect_timeout", &self.connect_timeout)
            .field("response_timeout", &self.response_timeout)
            .field("health_interval", &self.health_interval)
            .finish()
    }
}

/// Where the member list comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Members {
    /// `peers = [...]`: base URLs (`http://host:port`), this replica's own perhaps among them.
    Static(Vec<String>),
    /// `peers_dns = "name:port"`: every A/AAAA record of `name` is a member at `port`,
    /// re-resolved every `refresh`.
    Dns {
        host: String,
        port: u16,
        refresh: Duration,
    },
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawCluster {
    advertise: Option<String>,
    #[serde(default)]
    peers: Vec<String>,
    peers_dns: Option<String>,
    dns_refresh: Option<String>,
    secret: Option<RawClusterSecret>,
    secret_file: Option<PathBuf>,
    connect_timeout: Option<String>,
    response_timeout: Option<String>,
    health_interval: Option<String>,
}

#[derive(Deserialize)]
#[serde(transparent)]
struct RawClusterSecret(String);

impl std::fmt::Debug for RawClusterSecret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        Redacted.fmt(f)
    }
}

const DEFAULT_DNS_REFRESH: Duration = Duration::from_secs(10);
const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(1);
const DEFAULT_RESPONSE_TIMEOUT: Duration = Duration::from_secs(15);
const DEFAULT_HEALTH_INTERVAL: Duration = Duration::from_secs(2);
/// Short secrets are guessable; 16 characters is what `openssl rand -hex 8` gives.
const MIN_SECRET_LEN: usize = 16;

/// A member's base URL: `http(s)://host[:port]` with no path, as a string every replica spells
/// the same way (it is what ownership hashes).
pub fn member_url(s: &str) -> Result<String, String> {
    let url: Url = parse_url(s.trim())?;
    if url.path() != "/" && !url.path().is_empty() {
        return Err(format!(
            "{s:?} must be a base URL like \"http://10.0.0.5:5000\", without a path"
        ));
    }
    Ok(url.origin().ascii_serialization())
}

pub(super) fn validate_cluster(raw: RawCluster) -> Result<ClusterConfig, ConfigError> {
    let key = |k: &str| format!("cluster.{k}");
    let advertise = raw
        .advertise
        .as_deref()
        .map(|a| member_url(a).map_err(|p| invalid(key("advertise"), p)))
        .transpose()?;
    let members = match (raw.peers.is_empty(), raw.peers_dns) {
        (false, Some(_)) => {
            return Err(invalid(
                key("peers_dns"),
                "give either peers or peers_dns, not both",
            ))
        }
        (true, None) => {
            return Err(invalid(
                key("peers"),
                "required in [cluster] (or peers_dns = \"name:port\")",
            ))
        }
        (false, None) => {
            let mut list = Vec::new();
            for p in &raw.peers {
                let u = member_url(p).map_err(|e| invalid(key("peers"), e))?;
                if !list.contains(&u) {
                    list.push(u);
                }
            }
            Members::Static(list)
        }
        (true, Some(dns)) => {
            let (host, port) = dns
                .rsplit_once(':')
                .and_then(|(h, p)| Some((h, p.parse::<u16>().ok()?)))
                .filter(|(h, p)| !h.is_empty() && *p != 0)
                .ok_or_else(|| {
                    invalid(
                        key("peers_dns"),
                        format!(
                            "{dns:?} must be \"name:port\", like \"entrepot-peers.cache.svc:5000\""
                        ),
                    )
                })?;
            let refresh = positive_duration(&key("dns_refresh"), &raw.dns_refresh)?
                .unwrap_or(DEFAULT_DNS_REFRESH);
            Members::Dns {
                host: host.trim_matches(['[', ']']).to_string(),
                port,
                refresh,
            }
        }
    };
    if raw.dns_refresh.is_some() && matches!(members, Members::Static(_)) {
        return Err(invalid(key("dns_refresh"), "only applies with peers_dns"));
    }
    let secret = match (raw.secret, &raw.secret_file) {
        (Some(_), Some(_)) => {
            return Err(invalid(
                key("secret"),
                "give only one of secret, secret_file",
            ))
        }
        (Some(RawClusterSecret(s)), None) => s,
        (None, Some(file)) => std::fs::read_to_string(file)
            .map_err(|e| invalid(key("secret_file"), format!("{}: {e}", file.display())))?
            .trim()
            .to_string(),
        (None, None) => {
            return Err(invalid(
                key("secret"),
                "required in [cluster] (or secret_file): peer requests are signed with it",
            ))
        }
    };
    if secret.len() < MIN_SECRET_LEN {
        let k = if raw.secret_file.is_some() {
            "secret_file"
        } else {
            "secret"
        };
        return Err(invalid(
            key(k),
            format!("must be at least {MIN_SECRET_LEN} characters"),
        ));
    }
    Ok(ClusterConfig {
        advertise,
        members,
        secret: secret.into_bytes(),
        connect_timeout: positive_duration(&key("connect_timeout"), &raw.connect_timeout)?
            .unwrap_or(DEFAULT_CONNECT_TIMEOUT),
        response_timeout: positive_duration(&key("response_timeout"), &raw.response_timeout)?
            .unwrap_or(DEFAULT_RESPONSE_TIMEOUT),
        health_interval: positive_duration(&key("health_interval"), &raw.health_interval)?
            .unwrap_or(DEFAULT_HEALTH_INTERVAL),
    })
}

#[cfg(test)]
mod tests {
    use crate::config::{Config, ConfigError};

    use super::*;

    fn parse(cluster: &str) -> Result<Config, ConfigError> {
        Config::parse(&format!("[cluster]\n{cluster}"))
    }

    fn problem(cluster: &str) -> String {
        parse(cluster).unwrap_err().to_string()
    }

    const SECRET: &str = "secret = \"0123456789abcdef\"\n";

    #[test]
    fn without_a_cluster_section_there_is_no_cluster() {
        assert!(Config::parse("").unwrap().cluster.is_none());
    }

    #[test]
    fn static_peers_are_normalised_base_urls() {
        let c = parse(&format!(
            "advertise = \"http://10.0.0.5:5000/\"\npeers = [\"http://10.0.0.5:5000\", \"HTTP://10.0.0.6:5000/\", \"http://10.0.0.6:5000\"]\n{SECRET}"
        ))
        .unwrap()
        .cluster
        .unwrap();
        assert_eq!(c.advertise.as_deref(), Some("http://10.0.0.5:5000"));
        assert_eq!(
            c.members,
            Members::Static(vec![
                "http://10.0.0.5:5000".into(),
                "http://10.0.0.6:5000".into()
            ])
        );
        assert_eq!(c.connect_timeout, Duration::from_secs(1));
        assert!(!format!("{c:?}").contains("0123456789abcdef"));
    }

    #[test]
    fn peers_dns_is_a_name_and_a_port() {
        let c = parse(&format!(
            "peers_dns = \"entrepot-peers.cache.svc.cluster.local:5000\"\n{SECRET}"
        ))
        .unwrap()
        .cluster
        .unwrap();
        assert_eq!(
            c.members,
            Members::Dns {
                host: "entrepot-peers.cache.svc.cluster.local".into(),
                port: 5000,
                refresh: Duration::from_secs(10)
            }
        );
        assert!(problem(&format!("peers_dns = \"no-port\"\n{SECRET}")).contains("name:port"));
    }

    #[test]
    fn bad_cluster_sections_name_the_key() {
        assert!(problem(SECRET).contains("cluster.peers"));
        assert!(problem(&format!(
            "peers = [\"http://a:1\"]\npeers_dns = \"a:1\"\n{SECRET}"
        ))
        .contains("not both"));
        assert!(problem("peers = [\"http://a:1\"]\n").contains("cluster.secret"));
        assert!(problem("peers = [\"http://a:1\"]\nsecret = \"short\"\n").contains("at least 16"));
        assert!(
            problem(&format!("peers = [\"http://a:1/path\"]\n{SECRET}")).contains("without a path")
        );
        assert!(problem(&format!("peers = [\"ftp://a:1\"]\n{SECRET}")).contains("cluster.peers"));
        assert!(problem(&format!(
            "peers = [\"http://a:1\"]\nconnect_timeout = \"0s\"\n{SECRET}"
        ))
        .contains("cluster.connect_timeout"));
    }

    #[test]
    fn the_secret_can_come_from_a_file() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("s");
        std::fs::write(&f, "fedcba9876543210fedcba\n").unwrap();
        let c = parse(&format!(
            "peers = [\"http://a:1\"]\nsecret_file = {:?}\n",
            f.display().to_string()
        ))
        .unwrap()
        .cluster
        .unwrap();
        assert_eq!(c.secret, b"fedcba9876543210fedcba");
    }
}
