//! `cargo bench --bench auth_burst`: anonymous pull latency with and without a burst of wrong
//! passwords (issue 12).
//!
//! # Layout
//!
//! ```text
//! in-process upstream (one image) ◄── entrepot release binary ◄── puller (anonymous, sequential)
//!                                     [auth] + [[access]]      ◄── burst (Basic, wrong passwords,
//!                                                                   open loop, AUTH_BURST_RATE/s)
//! ```
//!
//! The image is pulled once to warm the cache; every measured pull (tag manifest, config, one
//! layer) is then a cache hit on a public repository (`anonymous = true`). Rounds alternate the
//! phases — quiet, a burst of distinct wrong passwords (each a new bcrypt check: the worst
//! case), a burst repeating one wrong password (remembered after the first check) — so drift
//! (other work on the machine) falls on all of them alike. The report gives p50/p99 per phase and
//! the ratios to the quiet phase, and the burst's own outcome (401, 429, achieved rate).
//!
//! entrepot's CPU time per phase (from `/proc`) is reported too: it shows what the burst costs
//! the server whatever else the machine is doing.
//!
//! Settings: `AUTH_BURST_SECS` (each phase of each round, default 4), `AUTH_BURST_ROUNDS`
//! (default 8), `AUTH_BURST_RATE` (requests per second, default 1000), `AUTH_BURST_COST` (bcrypt
//! cost of the users file, default 10), `AUTH_BURST_LAYER` (layer bytes, default 1 MiB).

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitCode, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use base64::Engine as _;
use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use sha2::{Digest as _, Sha256};

const MANIFEST_TYPE: &str = "application/vnd.oci.image.manifest.v1+json";

struct Settings {
    secs: u64,
    rounds: usize,
    rate: u64,
    cost: u32,
    layer: usize,
}

impl Settings {
    fn from_env() -> Result<Settings> {
        fn var<T: std::str::FromStr>(name: &str, default: T) -> Result<T> {
            match std::env::var(name) {
                Ok(v) => v
                    .parse()
                    .map_err(|_| anyhow::anyhow!("{name}={v:?} is not a number")),
                Err(_) => Ok(default),
            }
        }
        Ok(Settings {
            secs: var("AUTH_BURST_SECS", 4)?,
            rounds: var("AUTH_BURST_ROUNDS", 8)?,
            rate: var("AUTH_BURST_RATE", 1000)?,
            cost: var("AUTH_BURST_COST", 10)?,
            layer: var("AUTH_BURST_LAYER", 1 << 20)?,
        })
    }
}

/// The phases of a round.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Phase {
    /// Anonymous pulls only.
    Quiet,
    /// With a burst of wrong passwords, each one new.
    Distinct,
    /// With a burst repeating one wrong password.
    Repeated,
}

impl Phase {
    const ALL: [Phase; 3] = [Phase::Quiet, Phase::Distinct, Phase::Repeated];

    fn label(self) -> &'static str {
        match self {
            Phase::Quiet => "no burst",
            Phase::Distinct => "burst, distinct wrong passwords",
            Phase::Repeated => "burst, one wrong password repeated",
        }
    }
}

// ---------------------------------------------------------------------------------------------
// The upstream: one image, served from memory.

struct Image {
    manifest: Bytes,
    blobs: BTreeMap<String, Bytes>,
}

fn digest(data: &[u8]) -> String {
    format!("sha256:{}", hex::encode(Sha256::digest(data)))
}

fn image(layer_len: usize) -> Image {
    let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
    let layer: Vec<u8> = (0..layer_len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect();
    let config = Bytes::from_static(
        br#"{"architecture":"amd64","os":"linux","rootfs":{"type":"layers","diff_ids":[]}}"#,
    );
    let layer = Bytes::from(layer);
    let manifest = serde_json::json!({
        "schemaVersion": 2,
        "mediaType": MANIFEST_TYPE,
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": digest(&config), "size": config.len()},
        "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip", "digest": digest(&layer), "size": layer.len()}],
    });
    let mut blobs = BTreeMap::new();
    blobs.insert(digest(&config), config);
    blobs.insert(digest(&layer), layer);
    Image {
        manifest: Bytes::from(serde_json::to_vec(&manifest).expect("json")),
        blobs,
    }
}

fn respond(image: &Image, path: &str, head: bool) -> hyper::Response<Full<Bytes>> {
    let (status, ctype, body) = if path == "/v2/" {
        (200, "application/json", Bytes::from_static(b"{}"))
    } else if path.ends_with("/manifests/1") || path.ends_with(&digest(&image.manifest)) {
        (200, MANIFEST_TYPE, image.manifest.clone())
    } else if let Some(b) = path
        .rsplit_once("/blobs/")
        .and_then(|(_, d)| image.blobs.get(d))
    {
        (200, "application/octet-stream", b.clone())
    } else {
        (
            404,
            "application/json",
            Bytes::from_static(b"{\"errors\":[]}"),
        )
    };
    hyper::Response::builder()
        .status(status)
        .header("content-type", ctype)
        .header("content-length", body.len())
        .header("docker-content-digest", digest(&body))
        .body(Full::new(if head { Bytes::new() } else { body }))
        .expect("response")
}

async fn serve_upstream(listener: tokio::net::TcpListener, image: Arc<Image>) {
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            continue;
        };
        let image = image.clone();
        tokio::spawn(async move {
            let svc = service_fn(move |req: hyper::Request<Incoming>| {
                let image = image.clone();
                async move {
                    let head = req.method() == hyper::Method::HEAD;
                    Ok::<_, Infallible>(respond(&image, req.uri().path(), head))
                }
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), svc)
                .await;
        });
    }
}

// ---------------------------------------------------------------------------------------------
// entrepot

/// The release binary, killed on drop.
struct Entrepot {
    child: Child,
    base: String,
    log: PathBuf,
}

impl Drop for Entrepot {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// CPU time (user + system, all threads) `pid` has used, in seconds (Linux; 0 elsewhere).
fn cpu_seconds(pid: u32) -> f64 {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return 0.0;
    };
    // Fields after the command name's closing parenthesis; utime and stime are the 12th and
    // 13th of them, in clock ticks (100 a second on Linux).
    let fields: Vec<&str> = stat
        .rsplit_once(')')
        .map_or("", |(_, r)| r)
        .split_whitespace()
        .collect();
    let ticks = |i: usize| {
        fields
            .get(i)
            .and_then(|v| v.parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    (ticks(11) + ticks(12)) / 100.0
}

/// The 1-minute load average (other work on the machine).
fn load_average() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .ok()
        .and_then(|l| l.split_whitespace().next().map(str::to_string))
        .unwrap_or_else(|| "?".into())
}

fn free_port() -> Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

async fn start_entrepot(dir: &Path, upstream: SocketAddr, cost: u32) -> Result<Entrepot> {
    let htpasswd = dir.join("htpasswd");
    std::fs::write(
        &htpasswd,
        format!("alice:{}\n", bcrypt::hash("alice-right", cost)?),
    )?;
    let port = free_port()?;
    let config = dir.join("entrepot.toml");
    std::fs::write(
        &config,
        format!(
            "[server]\nlisten = \"127.0.0.1:{port}\"\nshutdown_grace = \"1s\"\n\
             [storage]\nroot = {:?}\n\
             [[upstream]]\nname = \"up\"\nurl = \"http://{upstream}\"\ndefault = true\ntag_ttl = \"1h\"\n\
             [auth]\nhtpasswd = {:?}\n\
             [[access]]\nmatch = \"up/public/**\"\nanonymous = true\n\
             [[access]]\nmatch = \"up/private/**\"\nusers = [\"alice\"]\n",
            dir.join("store").display().to_string(),
            htpasswd.display().to_string(),
        ),
    )?;
    let log = dir.join("entrepot.log");
    let out = std::fs::File::create(&log)?;
    let child = Command::new(env!("CARGO_BIN_EXE_entrepot"))
        .arg("serve")
        .arg("--config")
        .arg(&config)
        .env_remove("ENTREPOT_LOG")
        .stdin(Stdio::null())
        .stdout(out.try_clone()?)
        .stderr(out)
        .spawn()
        .context("starting entrepot")?;
    let e = Entrepot {
        child,
        base: format!("http://127.0.0.1:{port}"),
        log,
    };
    let client = reqwest::Client::builder().no_proxy().build()?;
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if let Ok(r) = client.get(format!("{}/v2/", e.base)).send().await {
            if r.status() == 200 {
                return Ok(e);
            }
        }
        if Instant::now() > deadline {
            bail!(
                "entrepot did not answer: {}",
                std::fs::read_to_string(&e.log).unwrap_or_default()
            );
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

// ---------------------------------------------------------------------------------------------
// Load

/// One anonymous pull of the public image, all from the cache; its latency.
async fn pull(client: &reqwest::Client, base: &str, blobs: &[String]) -> Result<Duration> {
    let started = Instant::now();
    let r = client
        .get(format!("{base}/v2/public/app/manifests/1"))
        .header("accept", MANIFEST_TYPE)
        .send()
        .await?;
    ensure!(r.status() == 200, "manifest: {}", r.status());
    r.bytes().await?;
    for d in blobs {
        let r = client
            .get(format!("{base}/v2/public/app/blobs/{d}"))
            .send()
            .await?;
        ensure!(r.status() == 200, "blob: {}", r.status());
        r.bytes().await?;
    }
    Ok(started.elapsed())
}

/// What the burst got back.
#[derive(Default)]
struct BurstOutcome {
    sent: AtomicU64,
    unauthorized: AtomicU64,
    busy: AtomicU64,
    other: AtomicU64,
    failed: AtomicU64,
}

/// Sends `rate` requests a second (open loop: one every 1/rate s whether or not the previous
/// ones were answered) with wrong passwords until `stop`: each new (`distinct`: prefixed with
/// `round`, so no two rounds share one either) or one repeated.
async fn burst(
    client: reqwest::Client,
    base: String,
    rate: u64,
    distinct: Option<usize>,
    stop: Arc<AtomicBool>,
    outcome: Arc<BurstOutcome>,
) {
    let every = Duration::from_nanos(1_000_000_000 / rate.max(1));
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
    let mut n: u64 = 0;
    let mut inflight = tokio::task::JoinSet::new();
    while !stop.load(Ordering::Relaxed) {
        tick.tick().await;
        n += 1;
        let password = match distinct {
            Some(round) => format!("wrong-{round}-{n}"),
            None => "wrong".to_string(),
        };
        let auth = format!(
            "Basic {}",
            base64::engine::general_purpose::STANDARD.encode(format!("alice:{password}"))
        );
        let req = client
            .get(format!("{base}/v2/private/app/manifests/1"))
            .header("authorization", auth);
        let outcome = outcome.clone();
        outcome.sent.fetch_add(1, Ordering::Relaxed);
        inflight.spawn(async move {
            let counter = match req.send().await {
                Ok(r) => match r.status().as_u16() {
                    401 => &outcome.unauthorized,
                    429 => &outcome.busy,
                    _ => &outcome.other,
                },
                Err(_) => &outcome.failed,
            };
            counter.fetch_add(1, Ordering::Relaxed);
        });
        while inflight.try_join_next().is_some() {}
    }
    while inflight.join_next().await.is_some() {}
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

async fn run(settings: Settings) -> Result<()> {
    let dir = tempfile::tempdir()?;
    let image = Arc::new(image(settings.layer));
    let blobs: Vec<String> = image.blobs.keys().cloned().collect();
    let up_listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let up_addr = up_listener.local_addr()?;
    // The upstream on its own thread: it only answers the warm-up.
    let upstream_image = image.clone();
    std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        let listener =
            rt.block_on(async { tokio::net::TcpListener::from_std(up_listener.into_std()?) });
        if let Ok(l) = listener {
            rt.block_on(serve_upstream(l, upstream_image));
        }
    });
    let entrepot = start_entrepot(dir.path(), up_addr, settings.cost).await?;
    let base = entrepot.base.clone();
    let client = reqwest::Client::builder().no_proxy().build()?;
    pull(&client, &base, &blobs).await.context("warm-up pull")?;
    // A few more, so connections and page cache are warm.
    for _ in 0..20 {
        pull(&client, &base, &blobs).await?;
    }

    let pid = entrepot.child.id();
    // Per phase: entrepot's CPU seconds and the wall time they were measured over.
    let mut cpu: BTreeMap<Phase, (f64, Duration)> = BTreeMap::new();
    let mut loads = Vec::new();
    let mut samples: BTreeMap<Phase, Vec<Duration>> = BTreeMap::new();
    let mut bursts: BTreeMap<Phase, (Arc<BurstOutcome>, Duration)> = BTreeMap::new();
    let phase_len = Duration::from_secs(settings.secs);
    for round in 0..settings.rounds {
        for phase in Phase::ALL {
            let stop = Arc::new(AtomicBool::new(false));
            let outcome = bursts
                .entry(phase)
                .or_insert_with(|| (Arc::new(BurstOutcome::default()), Duration::ZERO))
                .0
                .clone();
            // The burst on a runtime of its own, so its work does not delay the puller's polls.
            let burster = (phase != Phase::Quiet).then(|| {
                let (stop, outcome, base) = (stop.clone(), outcome.clone(), base.clone());
                let rate = settings.rate;
                let distinct = (phase == Phase::Distinct).then_some(round);
                std::thread::spawn(move || {
                    let rt = tokio::runtime::Builder::new_current_thread()
                        .enable_all()
                        .build()
                        .expect("runtime");
                    rt.block_on(async move {
                        let client = reqwest::Client::builder()
                            .no_proxy()
                            .pool_max_idle_per_host(256)
                            .build()
                            .expect("client");
                        burst(client, base, rate, distinct, stop, outcome).await;
                    });
                })
            });
            // Let the burst reach its rate before measuring.
            if burster.is_some() {
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
            let started = Instant::now();
            let cpu_before = cpu_seconds(pid);
            let list = samples.entry(phase).or_default();
            let before = list.len();
            while started.elapsed() < phase_len {
                list.push(pull(&client, &base, &blobs).await?);
            }
            let pulled = list.len() - before;
            let used = cpu.entry(phase).or_default();
            used.0 += cpu_seconds(pid) - cpu_before;
            used.1 += started.elapsed();
            let measured = started.elapsed();
            stop.store(true, Ordering::Relaxed);
            if let Some(b) = burster {
                b.join()
                    .map_err(|_| anyhow::anyhow!("the burst thread panicked"))?;
                bursts.get_mut(&phase).expect("inserted").1 +=
                    measured + Duration::from_millis(500);
            }
            let load = load_average();
            eprintln!(
                "auth_burst: round {} {:<36} {pulled} pulls, load {load}",
                round + 1,
                phase.label(),
            );
            loads.push(load);
        }
    }

    let quiet = {
        let s = samples.get_mut(&Phase::Quiet).expect("measured");
        s.sort();
        (percentile(s, 0.5), percentile(s, 0.99))
    };
    println!();
    println!(
        "Password checks under a burst: anonymous pulls (manifest by tag + config + {} KiB layer, \
         all cache hits) while Basic requests with wrong passwords arrive at {}/s; bcrypt cost {}; \
         {} rounds of {} s per phase; {} cores.",
        settings.layer / 1024,
        settings.rate,
        settings.cost,
        settings.rounds,
        settings.secs,
        std::thread::available_parallelism().map_or(1, |n| n.get()),
    );
    println!();
    println!("| phase | pulls | p50 ms | p99 ms | p50 ÷ quiet | p99 ÷ quiet | entrepot CPU (cores) | burst sent/s | 401 | 429 | other / failed |");
    println!("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|");
    for phase in Phase::ALL {
        let s = samples.get_mut(&phase).expect("measured");
        s.sort();
        let (p50, p99) = (percentile(s, 0.5), percentile(s, 0.99));
        let burst_cells = match bursts.get(&phase) {
            Some((o, took)) if phase != Phase::Quiet => format!(
                "{:.0} | {} | {} | {} / {}",
                o.sent.load(Ordering::Relaxed) as f64 / took.as_secs_f64().max(0.001),
                o.unauthorized.load(Ordering::Relaxed),
                o.busy.load(Ordering::Relaxed),
                o.other.load(Ordering::Relaxed),
                o.failed.load(Ordering::Relaxed),
            ),
            _ => "– | – | – | –".to_string(),
        };
        let (cpu_secs, wall) = cpu.get(&phase).copied().unwrap_or_default();
        println!(
            "| {} | {} | {:.2} | {:.2} | {:.2} | {:.2} | {:.2} | {burst_cells} |",
            phase.label(),
            s.len(),
            ms(p50),
            ms(p99),
            ms(p50) / ms(quiet.0).max(1e-9),
            ms(p99) / ms(quiet.1).max(1e-9),
            cpu_secs / wall.as_secs_f64().max(0.001),
        );
    }
    println!();
    println!(
        "1-minute load average after each phase: {}",
        loads.join(" ")
    );
    let log = std::fs::read_to_string(&entrepot.log).unwrap_or_default();
    let leaked = log.contains("wrong-0-1") || log.contains("alice-right");
    println!();
    println!(
        "entrepot log: {} lines, credentials in it: {}",
        log.lines().count(),
        if leaked { "YES" } else { "none" }
    );
    ensure!(!leaked, "a password reached entrepot's log");
    Ok(())
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    // `cargo test --all-targets` runs bench targets too, without `--bench`: stay out of it.
    if !args.iter().any(|a| a == "--bench") {
        println!("auth_burst: not run (run it with `cargo bench --bench auth_burst`)");
        return ExitCode::SUCCESS;
    }
    let _ = rustls::crypto::ring::default_provider().install_default();
    let settings = match Settings::from_env() {
        Ok(s) => s,
        Err(e) => {
            eprintln!("auth_burst: {e:#}");
            return ExitCode::FAILURE;
        }
    };
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    match rt.block_on(run(settings)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("auth_burst: {e:#}");
            ExitCode::FAILURE
        }
    }
}
