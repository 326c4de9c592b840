//! `[server]`: the listening addresses, the shutdown grace and offline mode.

use std::net::SocketAddr;
use std::time::Duration;

use serde::Deserialize;

use super::{invalid, opt_duration, ConfigError};

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
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawServer {
    listen: Option<String>,
    shutdown_grace: Option<String>,
    admin_listen: Option<String>,
    #[serde(default)]
    offline: bool,
}

pub const DEFAULT_LISTEN: &str = "0.0.0.0:5000";
const DEFAULT_GRACE: Duration = Duration::from_secs(30);

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
    Ok(ServerConfig {
        listen,
        shutdown_grace,
        admin_listen,
        offline: raw.offline,
    })
}
