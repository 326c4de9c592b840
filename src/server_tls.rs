//! TLS on the registry listener (`[server.tls]`): the rustls configuration built from the PEM
//! files, swapped for a new one when the files change or on request (SIGHUP), the handshake
//! (bounded, so half-open connections give their slot back), and the verified client
//! certificate's common name attached to every request of its connection.
//!
//! A reload builds a whole new `rustls::ServerConfig` beside the one in use and swaps it in only
//! if every file read and parsed; connections keep the configuration they started with. A bad
//! file therefore changes nothing but a log line and `entrepot_tls_reload_failures_total`.

use std::io;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, SystemTime};

use http::Request;
use hyper::body::Incoming;
use hyper::service::Service;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::Watcher;
use rustls::server::WebPkiClientVerifier;
use rustls::RootCertStore;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use crate::auth::ClientCert;

/// The files of `[server.tls]`, as configured (checked at start-up, read again on every reload).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsFiles {
    /// PEM certificate chain, leaf first.
    pub cert: PathBuf,
    /// PEM private key (PKCS#8, PKCS#1 or SEC1) of the leaf.
    pub key: PathBuf,
    /// PEM CA certificates; with it, clients must present a certificate one of them signed.
    pub client_ca: Option<PathBuf>,
}

const CERT_KEY: &str = "server.tls.cert";
const KEY_KEY: &str = "server.tls.key";
const CLIENT_CA_KEY: &str = "server.tls.client_ca";

/// How often the files' metadata is compared with what the configuration in use was read from.
pub const WATCH_INTERVAL: Duration = Duration::from_secs(2);

/// ALPN, in the server's order of preference: hyper serves both on every connection.
const ALPN: [&[u8]; 2] = [b"h2", b"http/1.1"];

/// A `[server.tls]` file that cannot be used. `key()` is the configuration key it is about.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error("cannot read {}: {source}", path.display())]
    Read {
        key: &'static str,
        path: PathBuf,
        source: io::Error,
    },
    #[error("{} is not valid PEM: {source}", path.display())]
    Pem {
        key: &'static str,
        path: PathBuf,
        source: rustls_pki_types::pem::Error,
    },
    #[error("{} holds no {what}", path.display())]
    Missing {
        key: &'static str,
        path: PathBuf,
        what: &'static str,
    },
    #[error("{}: {problem}", path.display())]
    Unusable {
        key: &'static str,
        path: PathBuf,
        problem: String,
    },
}

impl LoadError {
    /// The configuration key whose file is at fault (`server.tls.cert`, ...).
    pub fn key(&self) -> &'static str {
        match self {
            LoadError::Read { key, .. }
            | LoadError::Pem { key, .. }
            | LoadError::Missing { key, .. }
            | LoadError::Unusable { key, .. } => key,
        }
    }
}

/// Why a connection got no TLS session.
#[derive(Debug, thiserror::Error)]
pub enum HandshakeError {
    /// The client did not finish the handshake within `server.header_read_timeout`.
    #[error("no TLS handshake within {0:?}")]
    TimedOut(Duration),
    /// The client spoke something else, offered only old versions or ciphers, or presented no
    /// certificate (or one `client_ca` did not sign).
    #[error("TLS handshake failed: {0}")]
    Failed(#[source] io::Error),
    /// The verified client certificate names nobody the policy could know.
    #[error("the client certificate has no usable subject common name")]
    NoCommonName,
}

/// What started a reload.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReloadCause {
    /// An operator asked (SIGHUP).
    Requested,
    /// A file's size, modification or change time, or inode differs from the ones in use.
    FilesChanged,
}

impl ReloadCause {
    pub fn as_str(self) -> &'static str {
        match self {
            ReloadCause::Requested => "requested",
            ReloadCause::FilesChanged => "files_changed",
        }
    }
}

/// The listener's TLS side: the configuration new connections get, and how it is renewed.
pub struct ServerTls {
    files: TlsFiles,
    current: RwLock<Arc<rustls::ServerConfig>>,
    /// The files' metadata when the configuration was last (attempted to be) read: a change
    /// is retried once, not every poll, when the new files are bad.
    read_at: Mutex<Vec<FileStamp>>,
    handshake_timeout: Duration,
    wake: Notify,
}

impl ServerTls {
    /// Reads the files now; a handshake gets `handshake_timeout` to finish.
    pub fn new(files: TlsFiles, handshake_timeout: Duration) -> Result<ServerTls, LoadError> {
        let stamps = stamps(&files);
        let loaded = load(&files)?;
        tracing::info!(
            subject = %loaded.leaf.common_name.as_deref().unwrap_or("-"),
            serial = %loaded.leaf.serial,
            client_certificates = files.client_ca.is_some(),
            "TLS on the registry listener"
        );
        crate::metrics::tls_enabled();
        Ok(ServerTls {
            files,
            current: RwLock::new(loaded.config),
            read_at: Mutex::new(stamps),
            handshake_timeout,
            wake: Notify::new(),
        })
    }

    /// Asks the watch task (`watch`) to read the files again now, changed or not. A request
    /// made while a reload runs is kept, not lost.
    pub fn request_reload(&self) {
        self.wake.notify_one();
    }

    /// The configuration new connections get.
    fn current(&self) -> Arc<rustls::ServerConfig> {
        self.current
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Reads the files and, if all of them are good, puts the new configuration in service.
    /// Returns whether it did.
    pub fn reload(&self, cause: ReloadCause) -> bool {
        // Stamped before reading: a file replaced while it is read is seen as changed again.
        let stamps = stamps(&self.files);
        *self.read_at.lock().unwrap_or_else(|e| e.into_inner()) = stamps;
        match load(&self.files) {
            Ok(loaded) => {
                *self.current.write().unwrap_or_else(|e| e.into_inner()) = loaded.config;
                crate::metrics::tls_reloaded();
                tracing::info!(
                    cause = %cause.as_str(),
                    subject = %loaded.leaf.common_name.as_deref().unwrap_or("-"),
                    serial = %loaded.leaf.serial,
                    "TLS certificate reloaded"
                );
                true
            }
            Err(e) => {
                crate::metrics::tls_reload_failed();
                tracing::warn!(
                    cause = %cause.as_str(),
                    key = %e.key(),
                    error = %e,
                    "TLS reload failed; keeping the certificate in use"
                );
                false
            }
        }
    }

    /// Whether any file differs from when the configuration was last read.
    fn files_changed(&self) -> bool {
        let now = stamps(&self.files);
        *self.read_at.lock().unwrap_or_else(|e| e.into_inner()) != now
    }

    /// Reloads on `request_reload` and when the files change (polled every `every`), until
    /// `stopping` fires.
    pub async fn watch(self: Arc<Self>, every: Duration, stopping: CancellationToken) {
        let mut tick = tokio::time::interval(every);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            // The files are a few KiB: reading them here costs less than a blocking-pool hop.
            tokio::select! {
                _ = self.wake.notified() => {
                    self.reload(ReloadCause::Requested);
                }
                _ = tick.tick() => {
                    if self.files_changed() {
                        self.reload(ReloadCause::FilesChanged);
                    }
                }
                _ = stopping.cancelled() => return,
            }
        }
    }

    /// The server side of a handshake on `io`, bounded by the handshake timeout. With
    /// `client_ca`, the client's verified certificate comes back as its `ClientCert`.
    pub async fn accept<IO>(
        &self,
        io: IO,
    ) -> Result<(tokio_rustls::server::TlsStream<IO>, Option<ClientCert>), HandshakeError>
    where
        IO: AsyncRead + AsyncWrite + Unpin,
    {
        let acceptor = tokio_rustls::TlsAcceptor::from(self.current());
        let stream = tokio::time::timeout(self.handshake_timeout, acceptor.accept(io))
            .await
            .map_err(|_| HandshakeError::TimedOut(self.handshake_timeout))?
            .map_err(HandshakeError::Failed)?;
        let client = match stream.get_ref().1.peer_certificates() {
            // Without client_ca none is asked for, so none is presented.
            None | Some([]) => None,
            Some([leaf, ..]) => Some(ClientCert {
                common_name: common_name(leaf).ok_or(HandshakeError::NoCommonName)?,
            }),
        };
        Ok((stream, client))
    }

    /// Serves one accepted TCP connection: the handshake, then HTTP/1.1 or HTTP/2 through
    /// `builder` with every request carrying the client's certificate, until the client or
    /// `watcher`'s graceful shutdown ends it. Failures are the client's and are logged at debug.
    pub async fn serve<IO, S, B>(
        self: Arc<Self>,
        io: IO,
        remote: SocketAddr,
        builder: auto::Builder<TokioExecutor>,
        watcher: Watcher,
        svc: S,
    ) where
        IO: AsyncRead + AsyncWrite + Unpin + Send + 'static,
        S: Service<Request<Incoming>, Response = http::Response<B>> + Send + 'static,
        S::Future: Send + 'static,
        S::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
        B: http_body::Body + Send + 'static,
        B::Data: Send,
        B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
        TokioExecutor: auto::HttpServerConnExec<S::Future, B>,
    {
        let (stream, client) = match self.accept(io).await {
            Ok(accepted) => accepted,
            Err(e) => {
                tracing::debug!(remote = %remote, error = %e, "TLS handshake refused");
                return;
            }
        };
        let svc = WithClientCert { client, inner: svc };
        let conn = builder.serve_connection(TokioIo::new(stream), svc);
        if let Err(e) = watcher.watch(conn).await {
            tracing::debug!(remote = %remote, error = %e, "connection ended with an error");
        }
    }
}

/// A service that attaches the connection's client certificate to every request.
struct WithClientCert<S> {
    client: Option<ClientCert>,
    inner: S,
}

impl<S, B> Service<Request<B>> for WithClientCert<S>
where
    S: Service<Request<B>>,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = S::Future;

    fn call(&self, mut req: Request<B>) -> S::Future {
        if let Some(client) = &self.client {
            req.extensions_mut().insert(client.clone());
        }
        self.inner.call(req)
    }
}

/// A configuration read from the files, and what the log says about its certificate.
struct Loaded {
    config: Arc<rustls::ServerConfig>,
    leaf: Leaf,
}

struct Leaf {
    common_name: Option<String>,
    /// Hex, as `openssl x509 -serial` prints it.
    serial: String,
}

/// Reads and checks every file and builds the rustls configuration from them.
fn load(files: &TlsFiles) -> Result<Loaded, LoadError> {
    let chain = read_certs(CERT_KEY, &files.cert, "PEM certificate")?;
    let leaf = webpki::EndEntityCert::try_from(&chain[0]).map_err(|e| LoadError::Unusable {
        key: CERT_KEY,
        path: files.cert.clone(),
        problem: format!("the first certificate cannot be parsed: {e}"),
    })?;
    let leaf = Leaf {
        common_name: subject_common_name(leaf.subject()),
        serial: hex::encode(leaf.serial()),
    };
    let key = PrivateKeyDer::from_pem_file(&files.key).map_err(|e| match e {
        rustls_pki_types::pem::Error::NoItemsFound => LoadError::Missing {
            key: KEY_KEY,
            path: files.key.clone(),
            what: "PEM private key",
        },
        e => pem_error(KEY_KEY, &files.key, e),
    })?;
    // The provider is named here rather than taken from the process default: validating a
    // configuration (check-config) must not depend on what else ran first.
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    // TLS 1.2 is the oldest rustls speaks; naming both keeps it so if that ever changes.
    let builder = rustls::ServerConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
        .map_err(|e| LoadError::Unusable {
            key: CERT_KEY,
            path: files.cert.clone(),
            problem: e.to_string(),
        })?;
    let builder = match &files.client_ca {
        None => builder.with_no_client_auth(),
        Some(path) => {
            let unusable = |problem: String| LoadError::Unusable {
                key: CLIENT_CA_KEY,
                path: path.clone(),
                problem,
            };
            let mut roots = RootCertStore::empty();
            for ca in read_certs(CLIENT_CA_KEY, path, "PEM CA certificate")? {
                roots
                    .add(ca)
                    .map_err(|e| unusable(format!("not a usable CA certificate: {e}")))?;
            }
            let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider)
                .build()
                .map_err(|e| unusable(e.to_string()))?;
            builder.with_client_cert_verifier(verifier)
        }
    };
    let mut config = builder
        .with_single_cert(chain, key)
        .map_err(|e| LoadError::Unusable {
            key: KEY_KEY,
            path: files.key.clone(),
            problem: format!("cannot be used with {}: {e}", files.cert.display()),
        })?;
    config.alpn_protocols = ALPN.iter().map(|p| p.to_vec()).collect();
    Ok(Loaded {
        config: Arc::new(config),
        leaf,
    })
}

/// Every certificate in a PEM file; at least one.
fn read_certs(
    key: &'static str,
    path: &Path,
    what: &'static str,
) -> Result<Vec<CertificateDer<'static>>, LoadError> {
    let certs = CertificateDer::pem_file_iter(path)
        .and_then(|certs| certs.collect::<Result<Vec<_>, _>>())
        .map_err(|e| pem_error(key, path, e))?;
    if certs.is_empty() {
        return Err(LoadError::Missing {
            key,
            path: path.to_path_buf(),
            what,
        });
    }
    Ok(certs)
}

fn pem_error(key: &'static str, path: &Path, e: rustls_pki_types::pem::Error) -> LoadError {
    match e {
        rustls_pki_types::pem::Error::Io(source) => LoadError::Read {
            key,
            path: path.to_path_buf(),
            source,
        },
        source => LoadError::Pem {
            key,
            path: path.to_path_buf(),
            source,
        },
    }
}

/// Checks that the files of `[server.tls]` can be read and used together (start-up, and
/// `entrepot check-config`).
pub fn check(files: &TlsFiles) -> Result<(), LoadError> {
    load(files).map(drop)
}

/// What a file's metadata says about its content: equal stamps, same bytes (as far as a poll
/// can tell). A file that cannot be stat'ed stamps `None`, so its return counts as a change.
#[derive(Debug, Clone, PartialEq, Eq)]
struct FileStamp(Option<StampFields>);

#[derive(Debug, Clone, PartialEq, Eq)]
struct StampFields {
    len: u64,
    modified: Option<SystemTime>,
    /// inode, device, change time: a file renamed into place (Kubernetes secret volumes swap a
    /// symlink) can keep its size and modification time.
    #[cfg(unix)]
    unix: (u64, u64, i64, i64),
}

fn stamps(files: &TlsFiles) -> Vec<FileStamp> {
    [
        Some(&files.cert),
        Some(&files.key),
        files.client_ca.as_ref(),
    ]
    .into_iter()
    .flatten()
    .map(|path| FileStamp(std::fs::metadata(path).ok().map(|m| stamp_fields(&m))))
    .collect()
}

fn stamp_fields(m: &std::fs::Metadata) -> StampFields {
    #[cfg(unix)]
    use std::os::unix::fs::MetadataExt as _;
    StampFields {
        len: m.len(),
        modified: m.modified().ok(),
        #[cfg(unix)]
        unix: (m.ino(), m.dev(), m.ctime(), m.ctime_nsec()),
    }
}

/// The subject common name of a DER certificate; see `subject_common_name`.
pub fn common_name(cert: &CertificateDer<'_>) -> Option<String> {
    let cert = webpki::EndEntityCert::try_from(cert).ok()?;
    subject_common_name(cert.subject())
}

/// DER tags met in a subject.
const SEQUENCE: u8 = 0x30;
const SET: u8 = 0x31;
const OID: u8 = 0x06;
const UTF8_STRING: u8 = 0x0c;
const PRINTABLE_STRING: u8 = 0x13;
const IA5_STRING: u8 = 0x16;
const BMP_STRING: u8 = 0x1e;
/// id-at-commonName, 2.5.4.3.
const COMMON_NAME: [u8; 3] = [0x55, 0x04, 0x03];

/// The common name in a subject `Name` as webpki hands it over (the RDN sequence without its
/// outer SEQUENCE header). With several, the last (most specific) wins, as in Go's and
/// OpenSSL's usual reading. `None` when there is none, when the subject is malformed, or when
/// the name is empty, holds control characters (it goes into logs and policy decisions) or is
/// in a string type other than UTF8String, PrintableString, IA5String or BMPString.
///
/// webpki parses a certificate's outer structure but not the subject's inside, and exposes the
/// subject as bytes: these few lines walk it rather than bringing in a second X.509 parser.
fn subject_common_name(mut rdns: &[u8]) -> Option<String> {
    let mut found = None;
    while !rdns.is_empty() {
        let (set, rest) = der_expect(SET, rdns)?;
        rdns = rest;
        let mut attributes = set;
        while !attributes.is_empty() {
            let (attribute, rest) = der_expect(SEQUENCE, attributes)?;
            attributes = rest;
            let (oid, value) = der_expect(OID, attribute)?;
            if oid == COMMON_NAME {
                let (tag, text, _) = der_next(value)?;
                found = Some(der_string(tag, text)?);
            }
        }
    }
    found.filter(|cn: &String| !cn.is_empty() && !cn.chars().any(char::is_control))
}

/// The next DER element of `input`: tag, contents, what follows. Definite lengths up to
/// 4 bytes, as DER allows.
fn der_next(input: &[u8]) -> Option<(u8, &[u8], &[u8])> {
    let (&tag, rest) = input.split_first()?;
    let (&first, rest) = rest.split_first()?;
    let (len, rest) = match first {
        0..=0x7f => (usize::from(first), rest),
        0x81..=0x84 => {
            let n = usize::from(first & 0x7f);
            let (bytes, rest) = rest.split_at_checked(n)?;
            let len = bytes.iter().try_fold(0usize, |acc, &b| {
                acc.checked_mul(256)?.checked_add(usize::from(b))
            })?;
            (len, rest)
        }
        _ => return None,
    };
    let (contents, rest) = rest.split_at_checked(len)?;
    Some((tag, contents, rest))
}

/// `der_next`, failing unless the element is a `tag`: contents and what follows.
fn der_expect(tag: u8, input: &[u8]) -> Option<(&[u8], &[u8])> {
    let (found, contents, rest) = der_next(input)?;
    (found == tag).then_some((contents, rest))
}

fn der_string(tag: u8, bytes: &[u8]) -> Option<String> {
    match tag {
        UTF8_STRING => String::from_utf8(bytes.to_vec()).ok(),
        PRINTABLE_STRING | IA5_STRING if bytes.is_ascii() => String::from_utf8(bytes.to_vec()).ok(),
        BMP_STRING if bytes.len().is_multiple_of(2) => {
            let units = bytes
                .chunks_exact(2)
                .map(|b| u16::from_be_bytes([b[0], b[1]]));
            char::decode_utf16(units)
                .collect::<Result<String, _>>()
                .ok()
        }
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use std::convert::Infallible;

    use rcgen::{
        BasicConstraints, CertificateParams, DnType, DnValue, ExtendedKeyUsagePurpose, IsCa,
        Issuer, KeyPair, SerialNumber,
    };

    /// A CA that signs certificates for these tests.
    struct Ca {
        cert: rcgen::Certificate,
        issuer: Issuer<'static, KeyPair>,
    }

    impl Ca {
        fn new(name: &str) -> Ca {
            let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
            params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
            params.distinguished_name.push(DnType::CommonName, name);
            let key = KeyPair::generate().unwrap();
            let cert = params.self_signed(&key).unwrap();
            Ca {
                cert,
                issuer: Issuer::new(params, key),
            }
        }

        /// A certificate (PEM) and its key (PEM) whose subject is `dn`.
        fn sign(
            &self,
            dn: &[(DnType, DnValue)],
            eku: ExtendedKeyUsagePurpose,
            serial: u64,
        ) -> (String, String) {
            let mut params =
                CertificateParams::new(vec!["127.0.0.1".to_string(), "localhost".to_string()])
                    .unwrap();
            params.distinguished_name = rcgen::DistinguishedName::new();
            for (ty, value) in dn {
                params.distinguished_name.push(ty.clone(), value.clone());
            }
            params.extended_key_usages = vec![eku];
            params.serial_number = Some(SerialNumber::from_slice(&serial.to_be_bytes()));
            let key = KeyPair::generate().unwrap();
            let cert = params.signed_by(&key, &self.issuer).unwrap();
            (cert.pem(), key.serialize_pem())
        }

        fn client(&self, cn: &str) -> (String, String) {
            self.sign(
                &[(DnType::CommonName, cn.into())],
                ExtendedKeyUsagePurpose::ClientAuth,
                7,
            )
        }
    }

    fn der(pem: &str) -> CertificateDer<'static> {
        CertificateDer::from_pem_slice(pem.as_bytes()).unwrap()
    }

    fn cn_of(dn: &[(DnType, DnValue)]) -> Option<String> {
        let ca = Ca::new("test CA");
        let (cert, _) = ca.sign(dn, ExtendedKeyUsagePurpose::ClientAuth, 1);
        common_name(&der(&cert))
    }

    #[test]
    fn common_name_is_read_in_each_string_type() {
        let cases = [
            DnValue::Utf8String("build-bot ü".into()),
            DnValue::PrintableString("build-bot".try_into().unwrap()),
            DnValue::Ia5String("build-bot".try_into().unwrap()),
            DnValue::BmpString("build-bot ü".try_into().unwrap()),
        ];
        for value in cases {
            let want = match &value {
                DnValue::Utf8String(_) | DnValue::BmpString(_) => "build-bot ü",
                _ => "build-bot",
            };
            let dn = [
                (DnType::CountryName, "FR".into()),
                (DnType::OrganizationName, "Acme".into()),
                (DnType::CommonName, value.clone()),
            ];
            assert_eq!(cn_of(&dn).as_deref(), Some(want), "{value:?}");
        }
    }

    #[test]
    fn subject_without_usable_common_name_has_none() {
        assert_eq!(cn_of(&[(DnType::OrganizationName, "Acme".into())]), None);
        assert_eq!(
            cn_of(&[(DnType::CommonName, "a\nforged line".into())]),
            None
        );
        assert_eq!(cn_of(&[(DnType::CommonName, "".into())]), None);
    }

    /// One RDN `SET { SEQUENCE { oid, UTF8String value } }`.
    fn rdn(oid: &[u8], value: &str) -> Vec<u8> {
        let mut attribute = vec![OID, oid.len() as u8];
        attribute.extend_from_slice(oid);
        attribute.extend([UTF8_STRING, value.len() as u8]);
        attribute.extend_from_slice(value.as_bytes());
        let mut seq = vec![SEQUENCE, attribute.len() as u8];
        seq.extend(attribute);
        let mut set = vec![SET, seq.len() as u8];
        set.extend(seq);
        set
    }

    #[test]
    fn last_of_several_common_names_wins() {
        let org = [0x55, 0x04, 0x0a];
        let subject = [
            rdn(&COMMON_NAME, "outer"),
            rdn(&org, "Acme"),
            rdn(&COMMON_NAME, "inner"),
        ]
        .concat();
        assert_eq!(subject_common_name(&subject).as_deref(), Some("inner"));
    }

    #[test]
    fn truncated_or_mistagged_subjects_have_no_common_name() {
        let subject = rdn(&COMMON_NAME, "alice");
        assert_eq!(subject_common_name(&subject).as_deref(), Some("alice"));
        for cut in 1..subject.len() {
            assert_eq!(subject_common_name(&subject[..cut]), None, "cut at {cut}");
        }
        let mut wrong = subject.clone();
        wrong[0] = SEQUENCE;
        assert_eq!(subject_common_name(&wrong), None);
        // A long-form length claiming more than there is.
        assert_eq!(
            subject_common_name(&[SET, 0x84, 0xff, 0xff, 0xff, 0xff]),
            None
        );
    }

    proptest::proptest! {
        #[test]
        fn any_bytes_as_a_subject_do_not_panic(bytes in proptest::collection::vec(0u8..=255, 0..64)) {
            let _ = subject_common_name(&bytes);
        }
    }

    /// Server certificate and key, and a client CA, written as PEM files.
    struct Files {
        dir: tempfile::TempDir,
        ca: Ca,
        files: TlsFiles,
    }

    fn write_files(client_ca: bool) -> Files {
        let dir = tempfile::tempdir().unwrap();
        let ca = Ca::new("test CA");
        let (cert, key) = ca.sign(
            &[(DnType::CommonName, "entrepot.test".into())],
            ExtendedKeyUsagePurpose::ServerAuth,
            1,
        );
        let path = |name: &str| dir.path().join(name);
        std::fs::write(path("tls.crt"), cert).unwrap();
        std::fs::write(path("tls.key"), key).unwrap();
        std::fs::write(path("ca.crt"), ca.cert.pem()).unwrap();
        let files = TlsFiles {
            cert: path("tls.crt"),
            key: path("tls.key"),
            client_ca: client_ca.then(|| path("ca.crt")),
        };
        Files { dir, ca, files }
    }

    #[test]
    fn load_errors_name_the_file_at_fault() {
        let f = write_files(true);
        let garbage = f.dir.path().join("garbage.pem");
        std::fs::write(
            &garbage,
            "-----BEGIN CERTIFICATE-----\n%%%%\n-----END CERTIFICATE-----\n",
        )
        .unwrap();
        let nothing = f.dir.path().join("empty.pem");
        std::fs::write(&nothing, "just text\n").unwrap();
        let other_key = f.dir.path().join("other.key");
        std::fs::write(&other_key, KeyPair::generate().unwrap().serialize_pem()).unwrap();
        let missing = f.dir.path().join("missing.pem");
        let with = |change: &dyn Fn(&mut TlsFiles)| {
            let mut files = f.files.clone();
            change(&mut files);
            check(&files).unwrap_err()
        };
        let e = with(&|t| t.cert = missing.clone());
        assert!(matches!(e, LoadError::Read { key: CERT_KEY, .. }), "{e}");
        let e = with(&|t| t.cert = garbage.clone());
        assert!(matches!(e, LoadError::Pem { key: CERT_KEY, .. }), "{e}");
        let e = with(&|t| t.cert = nothing.clone());
        assert!(matches!(e, LoadError::Missing { key: CERT_KEY, .. }), "{e}");
        let e = with(&|t| t.key = nothing.clone());
        assert!(matches!(e, LoadError::Missing { key: KEY_KEY, .. }), "{e}");
        let e = with(&|t| t.key = other_key.clone());
        assert!(matches!(e, LoadError::Unusable { key: KEY_KEY, .. }), "{e}");
        let e = with(&|t| t.client_ca = Some(garbage.clone()));
        assert!(
            matches!(
                e,
                LoadError::Pem {
                    key: CLIENT_CA_KEY,
                    ..
                }
            ),
            "{e}"
        );
        check(&f.files).unwrap();
    }

    /// `ServerTls::serve` on one accepted connection, answering each request with the common
    /// name it carries (or "-").
    async fn serve_one(tls: ServerTls) -> (String, tokio::task::JoinHandle<()>) {
        let tls = Arc::new(tls);
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!(
            "https://127.0.0.1:{}/",
            listener.local_addr().unwrap().port()
        );
        let graceful = hyper_util::server::graceful::GracefulShutdown::new();
        let server = tokio::spawn(async move {
            let (stream, remote) = listener.accept().await.unwrap();
            let svc = hyper::service::service_fn(|req: Request<Incoming>| async move {
                let cn = req
                    .extensions()
                    .get::<ClientCert>()
                    .map_or("-".to_string(), |c| c.common_name.clone());
                Ok::<_, Infallible>(http::Response::new(http_body_util::Full::new(
                    bytes::Bytes::from(cn),
                )))
            });
            let builder = auto::Builder::new(TokioExecutor::new());
            tls.serve(stream, remote, builder, graceful.watcher(), svc)
                .await;
        });
        (url, server)
    }

    fn client(ca: &Ca, identity: Option<(String, String)>, h2: bool) -> reqwest::Client {
        crate::tls::install_provider();
        let mut b = reqwest::Client::builder()
            .no_proxy()
            .tls_certs_only([reqwest::Certificate::from_pem(ca.cert.pem().as_bytes()).unwrap()]);
        if let Some((cert, key)) = identity {
            b = b.identity(reqwest::Identity::from_pem(format!("{cert}{key}").as_bytes()).unwrap());
        }
        if h2 {
            b = b.http2_prior_knowledge();
        }
        b.build().unwrap()
    }

    #[tokio::test]
    async fn every_request_of_a_verified_connection_carries_its_common_name() {
        let f = write_files(true);
        for h2 in [false, true] {
            let tls = ServerTls::new(f.files.clone(), Duration::from_secs(5)).unwrap();
            let (url, server) = serve_one(tls).await;
            let c = client(&f.ca, Some(f.ca.client("build-bot")), h2);
            for _ in 0..3 {
                let resp = c.get(&url).send().await.unwrap();
                assert_eq!(resp.status(), 200);
                assert_eq!(resp.text().await.unwrap(), "build-bot", "h2: {h2}");
            }
            drop(c);
            server.await.unwrap();
        }
    }

    #[tokio::test]
    async fn without_client_ca_requests_carry_no_client_cert() {
        let f = write_files(false);
        let tls = ServerTls::new(f.files.clone(), Duration::from_secs(5)).unwrap();
        let (url, server) = serve_one(tls).await;
        let c = client(&f.ca, Some(f.ca.client("build-bot")), false);
        let resp = c.get(&url).send().await.unwrap();
        assert_eq!(resp.text().await.unwrap(), "-");
        drop(c);
        server.await.unwrap();
    }

    #[tokio::test]
    async fn client_certificate_without_common_name_is_refused() {
        let f = write_files(true);
        let tls = Arc::new(ServerTls::new(f.files.clone(), Duration::from_secs(5)).unwrap());
        let (cert, key) = f.ca.sign(
            &[(DnType::OrganizationName, "Acme".into())],
            ExtendedKeyUsagePurpose::ClientAuth,
            9,
        );
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!(
            "https://127.0.0.1:{}/",
            listener.local_addr().unwrap().port()
        );
        let server = tokio::spawn(async move {
            let (stream, _) = listener.accept().await.unwrap();
            tls.accept(stream).await.map(drop)
        });
        let sent = client(&f.ca, Some((cert, key)), false)
            .get(&url)
            .send()
            .await;
        assert!(sent.is_err(), "{sent:?}");
        let accepted = server.await.unwrap();
        assert!(
            matches!(accepted, Err(HandshakeError::NoCommonName)),
            "{accepted:?}"
        );
    }

    #[tokio::test]
    async fn a_silent_client_is_dropped_after_the_handshake_timeout() {
        let f = write_files(false);
        let tls = ServerTls::new(f.files.clone(), Duration::from_millis(200)).unwrap();
        let (server_side, _client_side) = tokio::io::duplex(1024);
        let started = std::time::Instant::now();
        let r = tls.accept(server_side).await.map(drop);
        assert!(matches!(r, Err(HandshakeError::TimedOut(_))), "{r:?}");
        assert!(started.elapsed() < Duration::from_secs(2));
    }
}
