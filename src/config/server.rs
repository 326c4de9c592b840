//! `[server]`: the listening addresses, the shutdown grace, offline mode, and `[server.tls]`.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use serde::Deserialize;

use super::{invalid, opt_duration, positive_duration, ConfigError};
use crate::server_tls::TlsFiles;

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
    /// TLS on `listen` (`[server.tls]`); the files were read and checked when the configuration
    /// was. `admin_listen` stays plain HTTP.
    pub tls: Option<TlsFiles>,
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
    tls: Option<RawTls>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawTls {
    cert: Option<PathBuf>,
    key: Option<PathBuf>,
    client_ca: Option<PathBuf>,
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
    let tls = raw.tls.map(validate_tls).transpose()?;
    Ok(ServerConfig {
        listen,
        shutdown_grace,
        admin_listen,
        offline: raw.offline,
        header_read_timeout,
        max_connections,
        tls,
    })
}

/// `[server.tls]`: both files given, and they (and `client_ca`) read, parse and match now, so
/// a bad file stops start-up (or `check-config`) with the key it is about.
fn validate_tls(raw: RawTls) -> Result<TlsFiles, ConfigError> {
    let required = |v: Option<PathBuf>, key: &str| v.ok_or_else(|| invalid(key, "is required"));
    let files = TlsFiles {
        cert: required(raw.cert, "server.tls.cert")?,
        key: required(raw.key, "server.tls.key")?,
        client_ca: raw.client_ca,
    };
    crate::server_tls::check(&files).map_err(|e| invalid(e.key(), e.to_string()))?;
    Ok(files)
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use crate::config::Config;

    /// A CA-signed server certificate, its key and the CA, as PEM files in `dir`.
    fn write_pem_files(dir: &Path) {
        let ca_key = rcgen::KeyPair::generate().unwrap();
        let mut ca = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        ca.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        let ca_cert = ca.self_signed(&ca_key).unwrap();
        let issuer = rcgen::Issuer::new(ca, ca_key);
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = rcgen::CertificateParams::new(vec!["localhost".to_string()])
            .unwrap()
            .signed_by(&key, &issuer)
            .unwrap();
        std::fs::write(dir.join("tls.crt"), cert.pem()).unwrap();
        std::fs::write(dir.join("tls.key"), key.serialize_pem()).unwrap();
        std::fs::write(dir.join("ca.crt"), ca_cert.pem()).unwrap();
        std::fs::write(dir.join("garbage.pem"), "-----BEGIN CERTIFICATE-----\n%%\n").unwrap();
    }

    fn tls_table(dir: &Path, lines: &str) -> String {
        let lines = lines.replace("DIR", &dir.display().to_string());
        format!("[server.tls]\n{lines}\n")
    }

    fn err(text: &str) -> String {
        Config::parse(text).unwrap_err().to_string()
    }

    #[test]
    fn tls_errors_name_the_key() {
        let dir = tempfile::tempdir().unwrap();
        write_pem_files(dir.path());
        let d = dir.path();
        let e = err(&tls_table(d, "key = \"DIR/tls.key\""));
        assert_eq!(e, "server.tls.cert: is required");
        let e = err(&tls_table(d, "cert = \"DIR/tls.crt\""));
        assert_eq!(e, "server.tls.key: is required");
        let e = err(&tls_table(
            d,
            "cert = \"DIR/nope.crt\"\nkey = \"DIR/tls.key\"",
        ));
        assert!(e.starts_with("server.tls.cert: cannot read "), "{e}");
        let e = err(&tls_table(
            d,
            "cert = \"DIR/garbage.pem\"\nkey = \"DIR/tls.key\"",
        ));
        assert!(
            e.starts_with("server.tls.cert: ") && e.contains("not valid PEM"),
            "{e}"
        );
        let e = err(&tls_table(
            d,
            "cert = \"DIR/tls.crt\"\nkey = \"DIR/tls.crt\"",
        ));
        assert!(
            e.starts_with("server.tls.key: ") && e.contains("no PEM private key"),
            "{e}"
        );
        let e = err(&tls_table(
            d,
            "cert = \"DIR/ca.crt\"\nkey = \"DIR/tls.key\"",
        ));
        assert!(
            e.starts_with("server.tls.key: ") && e.contains("cannot be used with"),
            "{e}"
        );
        let e = err(&tls_table(
            d,
            "cert = \"DIR/tls.crt\"\nkey = \"DIR/tls.key\"\nclient_ca = \"DIR/tls.key\"",
        ));
        assert!(e.starts_with("server.tls.client_ca: "), "{e}");
        let e = err(&tls_table(
            d,
            "cert = \"DIR/tls.crt\"\nkey = \"DIR/tls.key\"\nca = \"x\"",
        ));
        assert!(e.contains("unknown field `ca`"), "{e}");
    }

    #[test]
    fn tls_is_off_without_the_table() {
        assert_eq!(Config::parse("[server]").unwrap().server.tls, None);
    }

    /// The commented `[server.tls]` block of config.example.toml, uncommented (with its paths
    /// pointing at real files), is valid.
    #[test]
    fn config_example_tls_block_parses() {
        let dir = tempfile::tempdir().unwrap();
        write_pem_files(dir.path());
        let example = include_str!("../../config.example.toml");
        let mut text = String::new();
        let mut in_tls = false;
        for line in example.lines() {
            in_tls = (in_tls && !line.is_empty()) || line == "# [server.tls]";
            let setting = line
                .strip_prefix("# ")
                .filter(|l| l.starts_with('[') || l.contains(" = "));
            let line = match setting {
                Some(l) if in_tls => l
                    .replace("/etc/entrepot/tls.crt", "DIR/tls.crt")
                    .replace("/etc/entrepot/tls.key", "DIR/tls.key")
                    .replace("/etc/entrepot/clients-ca.crt", "DIR/ca.crt")
                    .replace("DIR", &dir.path().display().to_string()),
                _ => line.to_string(),
            };
            text.push_str(&line);
            text.push('\n');
        }
        let c = Config::parse(&text).unwrap();
        let tls = c.server.tls.expect("a [server.tls] table");
        assert_eq!(tls.cert, dir.path().join("tls.crt"));
        assert_eq!(tls.key, dir.path().join("tls.key"));
        assert_eq!(tls.client_ca, Some(dir.path().join("ca.crt")));
    }
}
