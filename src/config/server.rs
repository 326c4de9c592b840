//! `[server]`: the listening addresses, the shutdown grace and offline mode.

use std::net::SocketAddr;
use std::time::Duration;

use serde::Deserialize;

use super::{invalid, opt_duration, positive_duration, ConfigError};

#[derive(Debug, Clone)]
pub struct ServerConfig {
    pub listen: SocketAddr,
    /// How long fills in progress may run on after SIGTERM/SIGINT before they are cancelled.
    pub shutdown_grace: Duration,
    /// A separate listener for `/metrics`, `/healthz` and `/readyz`; without it they are served
    /// on `listen` too.
    pub admin_listen: Option<SocketAddr>,
    /// Never contact an upstream: answer from the store only (air-gapped sites).
    pub offline: bool,
    /// A connection that has not sent a whole request header this long after it opened (or
    /// after its previous response) is closed: half-sent requests cannot hold connections.
    pub header_read_timeout: Duration,
    /// Connections served at once; more wait in the kernel's backlog.
    pub max_connections: usize,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawServer {
    listen: Option<String>,
    shutdown_grace: Option<String>,
    admin_listen: Option<String>,
    #[serde(default)]
    offline: bool,
    header_read_timeout: Option<String>,
    max_connections: Option<usize>,
}

pub const DEFAULT_LISTEN: &str = "0.0.0.0:5000";
const DEFAULT_GRACE: Duration = Duration::from_secs(30);
const DEFAULT_HEADER_READ_TIMEOUT: Duration = Duration::from_secs(10);
const DEFAULT_MAX_CONNECTIONS: usize = 4096;

/// `[server]`, validated.
pub(super) fn validate_server(raw: RawServer) -> Result<ServerConfig, ConfigError> {
    let listen = raw.listen.as_deref().unwrap_or(DEFAULT_LISTEN);
    let listen: SocketAddr = listen.parse().map_err(|_| {
        invalid(
            "server.listen",
            format!("{listen:?} is not an address like \"0.0.0.0:5000\""),
        )
    })?;
    let shutdown_grace =
        opt_duration("server.shutdown_grace", &raw.shutdown_grace)?.unwrap_or(DEFAULT_GRACE);
    let admin_listen = raw
        .admin_listen
        .as_deref()
        .map(|a| {
            a.parse::<SocketAddr>().map_err(|_| {
                invalid(
                    "server.admin_listen",
                    format!("{a:?} is not an address like \"127.0.0.1:9090\""),
                )
            })
        })
        .transpose()?;
    let header_read_timeout =
        positive_duration("server.header_read_timeout", &raw.header_read_timeout)?
            .unwrap_or(DEFAULT_HEADER_READ_TIMEOUT);
    let max_connections = match raw.max_connections {
        Some(0) => {
            return Err(invalid(
                "server.max_connections",
                "must be at least 1".to_string(),
            ))
        }
        Some(n) => n,
        None => DEFAULT_MAX_CONNECTIONS,
    };
    Ok(ServerConfig {
        listen,
        shutdown_grace,
        admin_listen,
        offline: raw.offline,
        header_read_timeout,
        max_connections,
    })
}
