//! `[server.tls]` end to end, through the `entrepot` binary with certificates made by a test CA:
//! real clients (skopeo, containerd) pull over TLS trusting only that CA; TLS 1.1 is refused;
//! ALPN offers h2; the certificate is rotated under load (SIGHUP, and the file watch alone)
//! without a failed request; a bad file keeps the old certificate; with `client_ca`, only
//! clients holding a certificate the CA signed get past the handshake; a silent connection gives
//! its slot back after `header_read_timeout`.
//!
//! Needs docker-registry, skopeo, containerd and openssl: `bash .ci/install-deps.sh`.

mod common;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{ensure, Context, Result};
use common::clients::Containerd;
use common::real::{
    read_layout, require_programs, run_scenario, DockerRegistry, SeedImage, SkopeoCopy, TAG_TTL,
};
use common::tls::{
    get_ok, https_client, s_client, tls11_only_s_server, write_hosts_toml_tls, Ca, Connections,
    Issued, TlsEntrepot, TlsFiles,
};
use common::{eventually, upstream};
use rustls::pki_types::pem::PemObject as _;

/// An upstream nobody listens on: the requests here never leave entrepot (`GET /v2/`).
fn unused_upstream() -> String {
    upstream(
        "nowhere",
        &format!("http://127.0.0.1:{}", common::free_port()),
        true,
        "",
    )
}

/// A TLS entrepot with a server certificate of serial 1, no upstream traffic.
struct Env {
    entrepot: TlsEntrepot,
    ca: Ca,
    files: TlsFiles,
    work: tempfile::TempDir,
}

impl Env {
    async fn start(server: &str, client_ca: bool) -> Result<Env> {
        let work = tempfile::tempdir()?;
        let ca = Ca::new("entrepot test CA");
        let files = TlsFiles::write(work.path(), &ca, &ca.server(1))?;
        let ca_file = files.ca();
        let table = files.table(client_ca.then_some(ca_file.as_path()));
        let entrepot = TlsEntrepot::start(work.path(), server, &table, &unused_upstream()).await?;
        Ok(Env {
            entrepot,
            ca,
            files,
            work,
        })
    }

    fn base(&self) -> String {
        self.entrepot.url("/v2/")
    }

    /// The serial of the certificate a new connection is served now.
    async fn serial_now(&self) -> Result<u64> {
        let c = https_client(&self.ca, None, Connections::FreshEachRequest);
        get_ok(&c, &self.base()).await
    }

    /// Waits (bounded) until new connections are served the certificate `serial`.
    async fn wait_for_serial(&self, serial: u64, limit: Duration) -> Result<()> {
        let deadline = Instant::now() + limit;
        loop {
            let now = self.serial_now().await?;
            if now == serial {
                return Ok(());
            }
            ensure!(
                Instant::now() < deadline,
                "new connections still get serial {now}, not {serial}, after {limit:?}; \
                 entrepot output:\n{}",
                self.entrepot.output()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Real clients

/// Field order is drop order: processes first, then the folder holding their logs.
struct PullEnv {
    entrepot: TlsEntrepot,
    registry: DockerRegistry,
    app: SeedImage,
    files: TlsFiles,
    work: tempfile::TempDir,
}

impl PullEnv {
    async fn start() -> Result<PullEnv> {
        let work = tempfile::tempdir()?;
        let app = SeedImage::generate(&[1024 * 1024, 4096]);
        let registry =
            DockerRegistry::seeded("docker-registry", work.path(), &app, "team/app:1.0").await?;
        let ca = Ca::new("entrepot test CA");
        let files = TlsFiles::write(work.path(), &ca, &ca.server(1))?;
        // The registry host is the upstream name, so containerd's `ns=` selects it.
        let upstreams = upstream(&registry.host(), &registry.url(), true, TAG_TTL);
        let entrepot = TlsEntrepot::start(work.path(), "", &files.table(None), &upstreams).await?;
        Ok(PullEnv {
            entrepot,
            registry,
            app,
            files,
            work,
        })
    }

    /// Fails if anything but entrepot reached the upstream since request `since`: a client
    /// whose TLS to entrepot failed and fell back to the registry itself.
    fn only_entrepot_since(&self, label: &str, since: usize) -> Result<usize> {
        let requests = self.registry.requests_since(since);
        let around: Vec<_> = requests.iter().filter(|r| !r.sent_by_entrepot()).collect();
        ensure!(
            around.is_empty(),
            "{label}: the client went around entrepot: {around:#?}"
        );
        Ok(requests.len())
    }
}

async fn skopeo_scenario(env: &mut PullEnv) -> Result<()> {
    let seeded = env.registry.requests().len();
    let source = format!("docker://{}/team/app:1.0", env.entrepot.host());
    let cert_dir = env.files.trust_dir.display().to_string();

    // Without the CA, verification must fail: the listener really is TLS with our certificate.
    let out = env.work.path().join("pull-untrusted");
    let untrusted = SkopeoCopy {
        flags: &["--src-tls-verify=true"],
        ..SkopeoCopy::DEFAULT
    }
    .run(&source, &format!("oci:{}:x", out.display()))
    .await?;
    ensure!(
        !untrusted.success() && untrusted.output.contains("certificate"),
        "skopeo without the CA: {}",
        untrusted.output
    );

    let out = env.work.path().join("pull-tls");
    SkopeoCopy {
        flags: &["--src-tls-verify=true", "--src-cert-dir", &cert_dir],
        ..SkopeoCopy::DEFAULT
    }
    .copy(&source, &format!("oci:{}:x", out.display()))
    .await
    .context("skopeo over TLS with the test CA")?;
    read_layout(&out, "x")?.expect(
        "skopeo over TLS",
        &env.app.manifest.digest,
        &env.app.blob_digests(),
    )?;
    let fetched = env.only_entrepot_since("skopeo", seeded)?;
    ensure!(fetched > 0, "entrepot never asked the upstream");
    env.entrepot.check_stored(&env.app).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn skopeo_pulls_through_entrepot_over_tls_trusting_the_test_ca() {
    require_programs(&["docker-registry", "skopeo"]);
    run_scenario(PullEnv::start(), skopeo_scenario).await;
}

async fn containerd_scenario(env: &mut PullEnv) -> Result<()> {
    let seeded = env.registry.requests().len();
    let hosts_dir = env.work.path().join("certs.d");
    write_hosts_toml_tls(
        &hosts_dir,
        &env.registry.host(),
        &env.entrepot.host(),
        &env.files.ca(),
    )?;
    let containerd = Containerd::start(&env.work.path().join("containerd")).await?;
    let reference = format!("{}/team/app:1.0", env.registry.host());
    let hosts = hosts_dir.to_str().context("utf-8 temp path")?;
    containerd
        .ctr(&["content", "fetch", "--hosts-dir", hosts, &reference])
        .await?;
    let have = containerd.content_digests().await?;
    for digest in env.app.all_digests() {
        ensure!(
            have.contains(&digest),
            "containerd lacks {digest}; it has {have:?}"
        );
    }
    // A failed TLS connection to the mirror makes containerd fall back to the registry: only
    // entrepot may have reached it.
    let fetched = env.only_entrepot_since("containerd", seeded)?;
    ensure!(fetched > 0, "entrepot never asked the upstream");
    env.entrepot.check_stored(&env.app).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn containerd_pulls_through_entrepot_over_tls_with_the_ca_in_hosts_toml() {
    require_programs(&["docker-registry", "skopeo", "containerd", "ctr"]);
    run_scenario(PullEnv::start(), containerd_scenario).await;
}

// ---------------------------------------------------------------------------------------------
// Protocol versions and ALPN

/// The version `s_client` completed a handshake with (its "New, TLSv1.2, Cipher is ..." line),
/// `None` when it did not ("New, (NONE), Cipher is (NONE)"; the "Protocol" line further down
/// names what was attempted either way).
fn handshake_version(s_client_output: &str) -> Option<&str> {
    let line = s_client_output.lines().find(|l| l.starts_with("New, "))?;
    let version = line.strip_prefix("New, ")?.split(',').next()?;
    (version != "(NONE)").then_some(version)
}

async fn old_protocol_scenario(env: &mut Env) -> Result<()> {
    // The control: this openssl speaks TLS 1.1 to a server that accepts it, with the same
    // options as below (OpenSSL reports a TLS 1.1 session on its "New," line as TLSv1.0).
    let (control_port, control_server) =
        tls11_only_s_server(env.work.path(), &env.ca.server(99)).await?;
    let control = s_client(control_port, &["-tls1_1"]).await?;
    ensure!(
        handshake_version(&control.output).is_some()
            && control.output.contains("Protocol  : TLSv1.1"),
        "the local openssl cannot speak TLS 1.1, so refusing it proves nothing: {}\n\
         s_server:\n{}",
        control.output,
        control_server.output()
    );

    // entrepot answers the TLS 1.1 hello with a fatal alert, before sending its certificate.
    for flag in ["-tls1_1", "-tls1"] {
        let refused = s_client(env.entrepot.port, &[flag]).await?;
        ensure!(
            handshake_version(&refused.output).is_none()
                && refused.output.contains("SSL alert number")
                && refused.output.contains("no peer certificate available"),
            "entrepot did not refuse {flag}: {}",
            refused.output
        );
    }
    // The same client options with a version entrepot speaks: only the version differed.
    for (flag, version) in [("-tls1_2", "TLSv1.2"), ("-tls1_3", "TLSv1.3")] {
        let ok = s_client(env.entrepot.port, &[flag]).await?;
        ensure!(
            handshake_version(&ok.output) == Some(version),
            "{version} refused: {}",
            ok.output
        );
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_1_1_and_1_0_are_refused_and_tls_1_2_and_1_3_are_served() {
    require_programs(&["openssl"]);
    run_scenario(Env::start("", false), old_protocol_scenario).await;
}

/// The protocol ALPN settles on when a rustls client offers `offered`.
async fn negotiated_alpn(env: &Env, offered: &[&[u8]]) -> Result<Option<Vec<u8>>> {
    let mut roots = rustls::RootCertStore::empty();
    let ca = rustls::pki_types::CertificateDer::from_pem_slice(env.ca.pem.as_bytes())?;
    roots.add(ca)?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_root_certificates(roots)
        .with_no_client_auth();
    config.alpn_protocols = offered.iter().map(|p| p.to_vec()).collect();
    let tcp = tokio::net::TcpStream::connect(env.entrepot.host()).await?;
    let name = rustls::pki_types::ServerName::try_from("127.0.0.1")?;
    let tls = tokio_rustls::TlsConnector::from(Arc::new(config))
        .connect(name, tcp)
        .await?;
    Ok(tls.get_ref().1.alpn_protocol().map(<[u8]>::to_vec))
}

async fn alpn_scenario(env: &mut Env) -> Result<()> {
    let h2: &[u8] = b"h2";
    let h1: &[u8] = b"http/1.1";
    ensure!(
        negotiated_alpn(env, &[h2]).await? == Some(h2.to_vec()),
        "h2 alone"
    );
    ensure!(
        negotiated_alpn(env, &[h1]).await? == Some(h1.to_vec()),
        "http/1.1 alone"
    );
    ensure!(
        negotiated_alpn(env, &[h2, h1]).await? == Some(h2.to_vec()),
        "h2 is preferred"
    );

    // And HTTP/2 is then what is spoken.
    let c = https_client(&env.ca, None, Connections::Http2);
    let resp = c.get(env.base()).send().await?;
    ensure!(resp.status() == 200, "h2 GET /v2/: {}", resp.status());
    ensure!(
        resp.version() == reqwest::Version::HTTP_2,
        "{:?}",
        resp.version()
    );
    let c = https_client(&env.ca, None, Connections::KeepAlive);
    let resp = c.get(env.base()).send().await?;
    ensure!(
        resp.status() == 200 && resp.version() == reqwest::Version::HTTP_11,
        "http/1.1 GET /v2/: {} {:?}",
        resp.status(),
        resp.version()
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn alpn_negotiates_h2_and_http_1_1() {
    run_scenario(Env::start("", false), alpn_scenario).await;
}

// ---------------------------------------------------------------------------------------------
// Rotation

/// How a rotation reaches entrepot.
#[derive(Clone, Copy, Debug)]
enum Trigger {
    Sighup,
    FileWatch,
}

const LOAD_REQUESTS: usize = 1000;
/// Rotated once this many requests have started...
const ROTATE_AT: usize = 200;
/// ... and requests from this one on wait until new connections get the new certificate, so
/// that at least `LOAD_REQUESTS - AFTER_SWITCH` run once it is in service.
const AFTER_SWITCH: usize = 800;

/// One request of the load: its number, which connection mode, and the certificate served.
struct Sample {
    mode: Connections,
    serial: u64,
    /// Started after new connections were seen to get the new certificate.
    after_switch: bool,
}

/// 1,000 requests from four clients (two making a connection per request, one on HTTP/1.1
/// keep-alive and one on HTTP/2, both with connections opened before the rotation), the
/// certificate replaced part way: not one request may fail.
async fn rotation_scenario(env: &mut Env, trigger: Trigger) -> Result<()> {
    let reloads_before = env.entrepot.metric("entrepot_tls_reloads_total").await?;
    let next = Arc::new(AtomicUsize::new(0));
    let (switched_tx, switched) = tokio::sync::watch::channel(false);
    let samples = Arc::new(Mutex::new(Vec::new()));
    let failures = Arc::new(Mutex::new(Vec::new()));
    let mut workers = tokio::task::JoinSet::new();
    for mode in [
        Connections::FreshEachRequest,
        Connections::FreshEachRequest,
        Connections::KeepAlive,
        Connections::Http2,
    ] {
        let client = https_client(&env.ca, None, mode);
        let url = env.base();
        let (next, samples, failures) = (next.clone(), samples.clone(), failures.clone());
        let mut switched = switched.clone();
        workers.spawn(async move {
            loop {
                let n = next.fetch_add(1, Ordering::SeqCst);
                if n >= LOAD_REQUESTS {
                    return;
                }
                if n >= AFTER_SWITCH && switched.wait_for(|s| *s).await.is_err() {
                    return;
                }
                let after_switch = *switched.borrow();
                match get_ok(&client, &url).await {
                    Ok(serial) => samples.lock().unwrap().push(Sample {
                        mode,
                        serial,
                        after_switch,
                    }),
                    Err(e) => failures
                        .lock()
                        .unwrap()
                        .push(format!("#{n} {mode:?}: {e:#}")),
                }
            }
        });
    }

    eventually(
        Duration::from_secs(60),
        "the first requests of the load",
        || {
            let started = next.load(Ordering::SeqCst);
            async move { started >= ROTATE_AT }
        },
    )
    .await;
    env.files.replace(&env.ca.server(2))?;
    if let Trigger::Sighup = trigger {
        env.entrepot.sighup()?;
    }
    // The watch polls every 2 s; SIGHUP is at once. Either way well within this.
    env.wait_for_serial(2, Duration::from_secs(15)).await?;
    let _ = switched_tx.send(true);
    while let Some(joined) = workers.join_next().await {
        joined?;
    }
    drop(switched);

    // Every worker has ended: the lists are complete.
    let failures = std::mem::take(&mut *failures.lock().unwrap());
    let samples = std::mem::take(&mut *samples.lock().unwrap());
    ensure!(
        failures.is_empty(),
        "{trigger:?}: {} of {LOAD_REQUESTS} requests failed: {failures:#?}",
        failures.len()
    );
    ensure!(samples.len() == LOAD_REQUESTS, "{} samples", samples.len());
    let fresh = |after: bool| {
        samples
            .iter()
            .filter(move |s| s.mode == Connections::FreshEachRequest && s.after_switch == after)
    };
    ensure!(
        fresh(false).any(|s| s.serial == 1),
        "no new connection got the old certificate before the rotation"
    );
    let stale: Vec<u64> = fresh(true).map(|s| s.serial).filter(|&s| s != 2).collect();
    ensure!(
        fresh(true).count() > 0 && stale.is_empty(),
        "{trigger:?}: once the new certificate was in service, new connections still got {stale:?}"
    );
    let reloads = env.entrepot.metric("entrepot_tls_reloads_total").await?;
    ensure!(
        reloads > reloads_before,
        "entrepot_tls_reloads_total stayed {reloads}"
    );
    // The file watch would pick up the new files after a lost SIGHUP too: the log says which
    // one put the new certificate in service.
    let cause = match trigger {
        Trigger::Sighup => "cause=requested",
        Trigger::FileWatch => "cause=files_changed",
    };
    let log = env.entrepot.output();
    ensure!(
        log.lines().any(|l| l.contains("TLS certificate reloaded")
            && l.contains(cause)
            && l.contains("serial=02")),
        "{trigger:?}: no reload with {cause} logged:\n{log}"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn certificate_rotated_with_sighup_during_1000_requests_fails_none() {
    run_scenario(Env::start("", false), async |env: &mut Env| {
        rotation_scenario(env, Trigger::Sighup).await
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn certificate_files_replaced_without_signal_are_picked_up_during_1000_requests() {
    run_scenario(Env::start("", false), async |env: &mut Env| {
        rotation_scenario(env, Trigger::FileWatch).await
    })
    .await;
}

async fn bad_file_scenario(env: &mut Env) -> Result<()> {
    const FAILURES: &str = "entrepot_tls_reload_failures_total";
    ensure!(
        env.entrepot.metric(FAILURES).await? == 0.0,
        "failures at start"
    );
    let garbage =
        b"-----BEGIN CERTIFICATE-----\nnot base64 at all %%%\n-----END CERTIFICATE-----\n";

    // Noticed by the file watch: one failure, logged with the key, the old certificate kept.
    common::tls::replace_file(&env.files.cert(), garbage)?;
    let deadline = Instant::now() + Duration::from_secs(15);
    while env.entrepot.metric(FAILURES).await? < 1.0 {
        ensure!(
            Instant::now() < deadline,
            "no reload failure counted; output:\n{}",
            env.entrepot.output()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let log = env.entrepot.output();
    ensure!(
        log.lines()
            .any(|l| l.contains("TLS reload failed") && l.contains("server.tls.cert")),
        "no warning naming server.tls.cert:\n{log}"
    );
    ensure!(
        env.serial_now().await? == 1,
        "the old certificate was dropped"
    );
    // The same bad file is not retried (and counted) at every poll.
    tokio::time::sleep(Duration::from_millis(4500)).await;
    ensure!(
        env.entrepot.metric(FAILURES).await? == 1.0,
        "an unchanged bad file was counted again"
    );

    // SIGHUP with the bad file still there: a second failure, still the old certificate.
    env.entrepot.sighup()?;
    let deadline = Instant::now() + Duration::from_secs(10);
    while env.entrepot.metric(FAILURES).await? < 2.0 {
        ensure!(
            Instant::now() < deadline,
            "SIGHUP did not retry the bad file"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    ensure!(
        env.serial_now().await? == 1,
        "the old certificate was dropped"
    );

    // A good file again: in service without a signal.
    env.files.replace(&env.ca.server(3))?;
    env.wait_for_serial(3, Duration::from_secs(15)).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn garbage_certificate_file_keeps_the_old_certificate_and_counts_a_failure() {
    run_scenario(Env::start("", false), bad_file_scenario).await;
}

// ---------------------------------------------------------------------------------------------
// Client certificates

async fn client_ca_scenario(env: &mut Env) -> Result<()> {
    let url = env.base();
    let alice = env.ca.client("alice");

    let c = https_client(&env.ca, Some(&alice), Connections::FreshEachRequest);
    get_ok(&c, &url)
        .await
        .context("a certificate the CA signed")?;
    let c = https_client(&env.ca, Some(&alice), Connections::Http2);
    get_ok(&c, &url).await.context("the same over HTTP/2")?;

    // No certificate: refused by the server's handshake (TLS 1.3 clients hear it as an alert
    // right after their side of the handshake; TLS 1.2 clients before it completes).
    let none = https_client(&env.ca, None, Connections::FreshEachRequest)
        .get(&url)
        .send()
        .await;
    let e = format!(
        "{:?}",
        none.expect_err("served without a client certificate")
    );
    ensure!(e.contains("CertificateRequired"), "{e}");
    ensure!(
        tls12_handshake(env, None).await.is_err(),
        "a TLS 1.2 handshake without a client certificate completed"
    );
    tls12_handshake(env, Some(&alice))
        .await
        .context("a TLS 1.2 handshake with alice's certificate")?;

    // A certificate from another CA: refused too.
    let other = Ca::new("someone else's CA").client("mallory");
    let refused = https_client(&env.ca, Some(&other), Connections::FreshEachRequest)
        .get(&url)
        .send()
        .await;
    let e = format!(
        "{:?}",
        refused.expect_err("served a certificate of another CA")
    );
    ensure!(
        e.contains("UnknownCA") || e.contains("BadCertificate"),
        "{e}"
    );
    Ok(())
}

/// A TLS 1.2 handshake with entrepot, presenting `identity` if given.
async fn tls12_handshake(env: &Env, identity: Option<&Issued>) -> Result<()> {
    let mut roots = rustls::RootCertStore::empty();
    roots.add(rustls::pki_types::CertificateDer::from_pem_slice(
        env.ca.pem.as_bytes(),
    )?)?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS12])?
        .with_root_certificates(roots);
    let config = match identity {
        None => builder.with_no_client_auth(),
        Some(id) => builder.with_client_auth_cert(
            vec![rustls::pki_types::CertificateDer::from_pem_slice(
                id.cert.as_bytes(),
            )?],
            rustls::pki_types::PrivateKeyDer::from_pem_slice(id.key.as_bytes())?,
        )?,
    };
    let tcp = tokio::net::TcpStream::connect(env.entrepot.host()).await?;
    let name = rustls::pki_types::ServerName::try_from("127.0.0.1")?;
    tokio_rustls::TlsConnector::from(Arc::new(config))
        .connect(name, tcp)
        .await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_ca_serves_only_clients_with_a_certificate_it_signed() {
    run_scenario(Env::start("", true), client_ca_scenario).await;
}

// ---------------------------------------------------------------------------------------------
// Half-open connections

async fn half_open_scenario(env: &mut Env) -> Result<()> {
    use tokio::io::AsyncReadExt as _;
    // The only slot, taken by a connection that never says a word.
    let mut silent = tokio::net::TcpStream::connect(env.entrepot.host()).await?;
    let opened = Instant::now();
    // A real client queued behind it is served once the handshake timeout frees the slot.
    let client = https_client(&env.ca, None, Connections::FreshEachRequest);
    let queued = tokio::spawn({
        let url = env.base();
        async move { get_ok(&client, &url).await }
    });
    let mut buf = [0u8; 64];
    let read = tokio::time::timeout(Duration::from_secs(10), silent.read(&mut buf))
        .await
        .context("the silent connection was still open after 10s")?;
    let closed_after = opened.elapsed();
    ensure!(
        matches!(read, Ok(0) | Err(_)),
        "the silent connection got {read:?}"
    );
    ensure!(
        closed_after >= Duration::from_millis(900),
        "closed after only {closed_after:?}, before the 1s timeout"
    );
    tokio::time::timeout(Duration::from_secs(10), queued)
        .await
        .context("the queued client was not served")??
        .context("the queued client")?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn silent_tls_connection_gives_its_slot_back_after_header_read_timeout() {
    run_scenario(
        Env::start("header_read_timeout = \"1s\"\nmax_connections = 1", false),
        half_open_scenario,
    )
    .await;
}
