//! TLS for end-to-end tests: a test CA issuing server and client certificates (rcgen), the PEM
//! files of `[server.tls]` replaced the way operators rotate them, the `entrepot` binary serving
//! TLS (readiness and metrics through its plain-HTTP `admin_listen`), HTTPS clients that trust
//! only the test CA and report which certificate they were served, and `openssl s_client`.

use std::{
    fs,
    path::{Path, PathBuf},
    process::Command,
    time::Duration,
};

use anyhow::{bail, ensure, Context, Result};
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    SerialNumber,
};

use super::real::{run_bounded, verified_blob, wait_until, ChildGuard, Finished, SeedImage};
use super::{free_port, free_ports};

/// A test certificate authority.
pub struct Ca {
    pub pem: String,
    issuer: Issuer<'static, KeyPair>,
}

/// A certificate signed by a [`Ca`], and its key, both PEM.
#[derive(Clone)]
pub struct Issued {
    pub cert: String,
    pub key: String,
}

impl Issued {
    /// Certificate and key in one PEM, as `reqwest::Identity::from_pem` wants them.
    pub fn identity(&self) -> reqwest::Identity {
        reqwest::Identity::from_pem(format!("{}{}", self.cert, self.key).as_bytes())
            .expect("an identity from rcgen PEM")
    }
}

impl Ca {
    pub fn new(name: &str) -> Ca {
        let mut params = CertificateParams::new(Vec::<String>::new()).expect("no names");
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.distinguished_name.push(DnType::CommonName, name);
        let key = KeyPair::generate().expect("a key");
        let cert = params.self_signed(&key).expect("a CA certificate");
        Ca {
            pem: cert.pem(),
            issuer: Issuer::new(params, key),
        }
    }

    fn issue(&self, cn: &str, serial: u64, usage: ExtendedKeyUsagePurpose) -> Issued {
        let names = vec!["127.0.0.1".to_string(), "localhost".to_string()];
        let mut params = CertificateParams::new(names).expect("valid names");
        params.distinguished_name = rcgen::DistinguishedName::new();
        params.distinguished_name.push(DnType::CommonName, cn);
        params.extended_key_usages = vec![usage];
        params.serial_number = Some(SerialNumber::from_slice(&serial.to_be_bytes()));
        let key = KeyPair::generate().expect("a key");
        let cert = params.signed_by(&key, &self.issuer).expect("a certificate");
        Issued {
            cert: cert.pem(),
            key: key.serialize_pem(),
        }
    }

    /// A server certificate for 127.0.0.1 and localhost with this serial number.
    pub fn server(&self, serial: u64) -> Issued {
        self.issue(
            &format!("entrepot-{serial}"),
            serial,
            ExtendedKeyUsagePurpose::ServerAuth,
        )
    }

    /// A client certificate whose subject common name is `cn`.
    pub fn client(&self, cn: &str) -> Issued {
        self.issue(cn, 1000, ExtendedKeyUsagePurpose::ClientAuth)
    }

    pub fn certificate(&self) -> reqwest::Certificate {
        reqwest::Certificate::from_pem(self.pem.as_bytes()).expect("the CA's PEM")
    }
}

/// The `[server.tls]` files, `tls/tls.crt` and `tls/tls.key`, and the CA clients trust (and
/// `client_ca` names) alone in `trust/ca.crt`: `skopeo --src-cert-dir` takes every `*.key`
/// beside it for a client key.
pub struct TlsFiles {
    pub dir: PathBuf,
    /// The folder holding only `ca.crt`.
    pub trust_dir: PathBuf,
}

impl TlsFiles {
    /// `dir/tls` holding `server`'s files, `dir/trust` holding `ca`.
    pub fn write(dir: &Path, ca: &Ca, server: &Issued) -> Result<TlsFiles> {
        let files = TlsFiles {
            dir: dir.join("tls"),
            trust_dir: dir.join("trust"),
        };
        fs::create_dir_all(&files.dir)?;
        fs::create_dir_all(&files.trust_dir)?;
        fs::write(files.ca(), &ca.pem)?;
        files.replace(server)?;
        Ok(files)
    }

    pub fn cert(&self) -> PathBuf {
        self.dir.join("tls.crt")
    }

    pub fn key(&self) -> PathBuf {
        self.dir.join("tls.key")
    }

    pub fn ca(&self) -> PathBuf {
        self.trust_dir.join("ca.crt")
    }

    /// Replaces key and certificate as a careful operator does: each written beside and renamed
    /// into place, so no reader sees half a file (between the two renames the pair does not
    /// match; entrepot must then keep the old one).
    pub fn replace(&self, server: &Issued) -> Result<()> {
        replace_file(&self.key(), server.key.as_bytes())?;
        replace_file(&self.cert(), server.cert.as_bytes())
    }

    /// The `[server.tls]` table for these files; `client_ca` is the CA file when given.
    pub fn table(&self, client_ca: Option<&Path>) -> String {
        let mut t = format!(
            "[server.tls]\ncert = {:?}\nkey = {:?}\n",
            self.cert().display().to_string(),
            self.key().display().to_string()
        );
        if let Some(ca) = client_ca {
            t.push_str(&format!("client_ca = {:?}\n", ca.display().to_string()));
        }
        t
    }
}

/// Writes `bytes` beside `path` and renames it over `path`.
pub fn replace_file(path: &Path, bytes: &[u8]) -> Result<()> {
    let tmp = path.with_extension("new");
    fs::write(&tmp, bytes)?;
    fs::rename(&tmp, path).with_context(|| format!("renaming into {}", path.display()))
}

/// The `entrepot serve` binary with `[server.tls]` on its registry listener and a plain-HTTP
/// `admin_listen` (readiness and metrics).
pub struct TlsEntrepot {
    pub port: u16,
    pub admin_port: u16,
    pub store: PathBuf,
    process: ChildGuard,
}

impl TlsEntrepot {
    /// Starts the binary with `[server]` keys `server` (besides the listeners), the `[server.tls]`
    /// table `tls` and `upstreams`, in `dir`; ready once `/healthz` answers on the admin
    /// listener. A port taken in the meantime ("address already in use") is retried.
    pub async fn start(dir: &Path, server: &str, tls: &str, upstreams: &str) -> Result<Self> {
        let bin = Path::new(env!("CARGO_BIN_EXE_entrepot"));
        let store = dir.join("store");
        let config = dir.join("entrepot.toml");
        for attempt in 1.. {
            let [port, admin_port] = free_ports();
            let toml = format!(
                "[server]\nlisten = \"127.0.0.1:{port}\"\nadmin_listen = \"127.0.0.1:{admin_port}\"\n\
                 {server}\n{tls}\n[storage]\nroot = {store:?}\n\n{upstreams}",
                store = store.display().to_string(),
            );
            fs::write(&config, toml)?;
            let mut cmd = Command::new(bin);
            cmd.arg("serve")
                .arg("--config")
                .arg(&config)
                .current_dir(dir)
                .env("ENTREPOT_LOG", "info,entrepot=debug")
                .env("RUST_BACKTRACE", "1");
            let mut process = ChildGuard::spawn("entrepot", cmd, dir.join("entrepot.log"))?;
            let what = format!("answer /healthz on admin port {admin_port}");
            let ready = wait_until(&mut process, &what, || async move {
                admin_get(admin_port, "/healthz")
                    .await
                    .map(drop)
                    .map_err(|e| format!("{e:#}"))
            })
            .await;
            match ready {
                Ok(()) => {
                    return Ok(Self {
                        port,
                        admin_port,
                        store,
                        process,
                    })
                }
                Err(e)
                    if attempt < 3
                        && process.exited().is_some()
                        && process.output().contains("address already in use") =>
                {
                    eprintln!("a port was taken, retrying: {e:#}");
                }
                Err(e) => return Err(e),
            }
        }
        unreachable!("the loop returns")
    }

    /// `127.0.0.1:<port>` of the TLS listener.
    pub fn host(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    pub fn url(&self, path: &str) -> String {
        format!("https://{}{path}", self.host())
    }

    pub fn output(&self) -> String {
        self.process.output()
    }

    /// Checks that the store holds a verified copy of the manifest and every blob of `image`;
    /// a fill may commit just after its client saw the last byte, so each gets a few seconds.
    pub async fn check_stored(&self, image: &SeedImage) -> Result<()> {
        for digest in image.all_digests() {
            let deadline = std::time::Instant::now() + Duration::from_secs(5);
            loop {
                match verified_blob(&self.store, &digest) {
                    Ok(_) => break,
                    Err(e) if std::time::Instant::now() > deadline => {
                        return Err(e.context(format!("{digest} in entrepot's store")))
                    }
                    Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
                }
            }
        }
        Ok(())
    }

    /// Sends SIGHUP to the process.
    pub fn sighup(&self) -> Result<()> {
        let status = Command::new("sh")
            .arg("-c")
            .arg(format!("kill -HUP {}", self.process.id()))
            .status()?;
        ensure!(status.success(), "kill -HUP: {status}");
        Ok(())
    }

    /// The value of the unlabelled counter or gauge `name` on the admin listener's `/metrics`.
    pub async fn metric(&self, name: &str) -> Result<f64> {
        let text = admin_get(self.admin_port, "/metrics").await?;
        text.lines()
            .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.trim().parse().ok())
            .with_context(|| format!("no {name} in /metrics:\n{text}"))
    }
}

/// `GET http://127.0.0.1:{port}{path}` (the admin listener is plain HTTP): the body of a 200.
async fn admin_get(port: u16, path: &str) -> Result<String> {
    let resp = super::client()
        .get(format!("http://127.0.0.1:{port}{path}"))
        .timeout(Duration::from_secs(5))
        .send()
        .await?;
    ensure!(resp.status() == 200, "GET {path}: {}", resp.status());
    Ok(resp.text().await?)
}

/// How an [`https_client`] uses connections.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Connections {
    /// One TLS handshake per request: every request sees the certificate in service now.
    FreshEachRequest,
    /// HTTP/1.1 keep-alive: requests reuse connections made before a rotation.
    KeepAlive,
    /// HTTP/2 prior knowledge (ALPN `h2`): every request on one multiplexed connection.
    Http2,
}

/// An HTTPS client trusting only `ca`, presenting `identity` if given, reporting the server's
/// certificate (see [`served_serial`]).
pub fn https_client(
    ca: &Ca,
    identity: Option<&Issued>,
    connections: Connections,
) -> reqwest::Client {
    super::install_crypto();
    let mut b = reqwest::Client::builder()
        .no_proxy()
        .tls_certs_only([ca.certificate()])
        .tls_info(true)
        .timeout(Duration::from_secs(10));
    if let Some(id) = identity {
        b = b.identity(id.identity());
    }
    b = match connections {
        Connections::FreshEachRequest => b.http1_only().pool_max_idle_per_host(0),
        Connections::KeepAlive => b.http1_only(),
        Connections::Http2 => b.http2_prior_knowledge(),
    };
    b.build().expect("an HTTPS client")
}

/// The serial number of the certificate the server presented for `resp`'s connection.
pub fn served_serial(resp: &reqwest::Response) -> Result<u64> {
    let der = resp
        .extensions()
        .get::<reqwest::tls::TlsInfo>()
        .and_then(|i| i.peer_certificate())
        .context("no peer certificate (tls_info off, or not TLS)")?;
    let der = rustls::pki_types::CertificateDer::from(der.to_vec());
    let cert = webpki::EndEntityCert::try_from(&der).context("parsing the served certificate")?;
    let serial = cert.serial();
    ensure!(serial.len() <= 8, "serial {serial:?} is not one of ours");
    Ok(serial.iter().fold(0u64, |acc, &b| acc << 8 | u64::from(b)))
}

/// `GET url` with `client`: the serial of the served certificate when it answered 200.
pub async fn get_ok(client: &reqwest::Client, url: &str) -> Result<u64> {
    let resp = client
        .get(url)
        .send()
        .await
        .with_context(|| format!("GET {url}"))?;
    ensure!(resp.status() == 200, "GET {url}: {}", resp.status());
    let serial = served_serial(&resp);
    resp.bytes()
        .await
        .with_context(|| format!("GET {url}: body"))?;
    serial
}

/// `openssl s_client` against `127.0.0.1:{port}` with `args` (such as `-tls1_1`), stdin closed
/// so it ends after the handshake. Old protocols are allowed on the client side
/// (`@SECLEVEL=0`), so a refusal can only come from the server.
pub async fn s_client(port: u16, args: &[&str]) -> Result<Finished> {
    let mut cmd = Command::new(super::real::require_program("openssl"));
    cmd.arg("s_client")
        .arg("-connect")
        .arg(format!("127.0.0.1:{port}"))
        .args(["-cipher", "DEFAULT:@SECLEVEL=0"])
        .args(args);
    run_bounded(
        &format!("openssl s_client {}", args.join(" ")),
        cmd,
        Duration::from_secs(20),
    )
    .await
}

/// `openssl s_server` speaking only TLS 1.1, with `server`'s files: the control showing that
/// the local `s_client` can speak TLS 1.1 at all.
pub async fn tls11_only_s_server(dir: &Path, server: &Issued) -> Result<(u16, ChildGuard)> {
    let openssl = super::real::require_program("openssl");
    fs::write(dir.join("s_server.crt"), &server.cert)?;
    fs::write(dir.join("s_server.key"), &server.key)?;
    for _ in 0..3 {
        let port = free_port();
        let mut cmd = Command::new(&openssl);
        cmd.arg("s_server")
            .arg("-accept")
            .arg(format!("127.0.0.1:{port}"))
            .arg("-cert")
            .arg(dir.join("s_server.crt"))
            .arg("-key")
            .arg(dir.join("s_server.key"))
            // -www: answers each connection by itself, never waiting on (closed) stdin.
            .args(["-tls1_1", "-cipher", "DEFAULT:@SECLEVEL=0", "-www"]);
        let mut process = ChildGuard::spawn("openssl s_server", cmd, dir.join("s_server.log"))?;
        let listening = wait_until(&mut process, "accept connections", || async move {
            tokio::net::TcpStream::connect(("127.0.0.1", port))
                .await
                .map(drop)
                .map_err(|e| e.to_string())
        })
        .await;
        match listening {
            Ok(()) => return Ok((port, process)),
            Err(e) if process.output().contains("in use") => eprintln!("retrying: {e:#}"),
            Err(e) => return Err(e),
        }
    }
    bail!("no free port for openssl s_server")
}

/// Writes `<hosts_dir>/<registry>/hosts.toml` sending pulls of `registry` (`host:port`, plain
/// HTTP) to `https://<mirror>` first, trusting `ca` for it.
pub fn write_hosts_toml_tls(
    hosts_dir: &Path,
    registry: &str,
    mirror: &str,
    ca: &Path,
) -> Result<PathBuf> {
    let dir = hosts_dir.join(registry);
    fs::create_dir_all(&dir)?;
    let path = dir.join("hosts.toml");
    fs::write(
        &path,
        format!(
            "server = \"http://{registry}\"\n\n[host.\"https://{mirror}\"]\n  \
             capabilities = [\"pull\", \"resolve\"]\n  ca = {ca:?}\n",
            ca = ca.display().to_string()
        ),
    )?;
    Ok(path)
}
