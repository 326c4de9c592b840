//! `cargo bench --bench compare`: entrepot side by side with CNCF distribution's proxy mode and
//! with nginx serving the same files, on loopback, against one real upstream (issue 4).
//!
//! # Layout
//!
//! ```text
//! upstream docker-registry ◄─ relay ◄─ entrepot             ◄─ clients (reqwest, wrk)
//!        (seeded)          ◄─ relay ◄─ distribution proxy   ◄─ clients
//!                          ◄─ relay ◄───────────────────────── clients (cold pull "direct")
//! upstream's blob files ─────────────► nginx (sendfile)     ◄─ clients (warm reference)
//! ```
//!
//! Each relay counts what crosses it, so upstream bytes and requests are measured on the wire.
//! Every scenario runs the peers one at a time, alternating their order round by round, and the
//! report gives medians and ratios (entrepot ÷ peer) against the targets of issue 4. The table
//! also goes into BENCHMARKS.md. Sizes and rounds come from `COMPARE_*` variables (see
//! [`Settings::from_env`]); `COMPARE_QUICK=1` is a small, one-round run for iterating.

mod support;

use std::{
    fs,
    path::{Path, PathBuf},
    process::{Command, ExitCode},
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc,
    },
    time::{Duration, Instant},
};

use anyhow::{bail, ensure, Context, Result};
use support::{
    load,
    procs::{self, ChildGuard, Server},
    relay::{Counts, Relay},
    report::{self, Goal, Row, Subject, Unit},
    seed::{self, Seeded, OCI_MANIFEST},
};

const MIB: f64 = 1024.0 * 1024.0;

/// The scenarios, by the names `COMPARE_ONLY` and the bench's arguments select them with.
const SCENARIOS: [&str; 7] = [
    "cold1", "cold16", "warm8", "small", "tag", "digest", "startup",
];

/// Sizes, counts and switches, from the environment.
struct Settings {
    quick: bool,
    /// Size of the big layer (cold and warm pulls).
    blob: u64,
    /// Size of the small blob (request rate).
    small: u64,
    rounds: usize,
    /// Duration of each wrk run.
    wrk_secs: u64,
    wrk_threads: usize,
    connections: usize,
    cold_clients: usize,
    warm_clients: usize,
    startup_blobs: usize,
    only: Vec<String>,
    write: bool,
    install: bool,
    /// nginx copies with sendfile (the issue's reference) or with read/write.
    nginx_sendfile: bool,
    /// `ENTREPOT_LOG` for entrepot; None keeps its default (info, with the access log).
    entrepot_log: Option<String>,
    /// The `COMPARE_*` variables that were set, to print with the command.
    overrides: Vec<String>,
}

impl Settings {
    /// `COMPARE_QUICK=1` small sizes and one round; `COMPARE_BLOB_MIB` (256), `COMPARE_SMALL_KIB`
    /// (100), `COMPARE_ROUNDS` (3), `COMPARE_WRK_SECS` (8), `COMPARE_CONNECTIONS` (64),
    /// `COMPARE_COLD_CLIENTS` (16), `COMPARE_WARM_CLIENTS` (8), `COMPARE_STARTUP_BLOBS` (100000),
    /// `COMPARE_ONLY=cold1,tag,...` (or scenario names as arguments), `COMPARE_WRITE=0|1`
    /// (BENCHMARKS.md; default: only for a full run of every scenario), `COMPARE_INSTALL=0`
    /// (skip .ci/install-bench-deps.sh), `COMPARE_ENTREPOT_LOG` (entrepot's log filter),
    /// `COMPARE_NGINX_SENDFILE=off` (nginx copies through buffers instead).
    fn from_env(args: &[String]) -> Result<Self> {
        let mut overrides = Vec::new();
        let mut var = |name: &str| -> Option<String> {
            let v = std::env::var(name).ok().filter(|v| !v.is_empty())?;
            overrides.push(format!("{name}={v}"));
            Some(v)
        };
        let quick = var("COMPARE_QUICK").is_some_and(|v| v != "0");
        fn num<T: std::str::FromStr>(v: Option<String>, default: T, name: &str) -> Result<T> {
            v.map_or(Ok(default), |v| {
                v.parse()
                    .ok()
                    .with_context(|| format!("{name}={v:?} is not a number"))
            })
        }
        let blob_mib: u64 = num(
            var("COMPARE_BLOB_MIB"),
            if quick { 16 } else { 256 },
            "COMPARE_BLOB_MIB",
        )?;
        let small_kib: u64 = num(var("COMPARE_SMALL_KIB"), 100, "COMPARE_SMALL_KIB")?;
        let rounds = num(
            var("COMPARE_ROUNDS"),
            if quick { 1 } else { 3 },
            "COMPARE_ROUNDS",
        )?;
        let wrk_secs = num(
            var("COMPARE_WRK_SECS"),
            if quick { 2 } else { 8 },
            "COMPARE_WRK_SECS",
        )?;
        let connections = num(var("COMPARE_CONNECTIONS"), 64, "COMPARE_CONNECTIONS")?;
        let cold_clients = num(var("COMPARE_COLD_CLIENTS"), 16, "COMPARE_COLD_CLIENTS")?;
        let warm_clients = num(var("COMPARE_WARM_CLIENTS"), 8, "COMPARE_WARM_CLIENTS")?;
        let startup_blobs = num(
            var("COMPARE_STARTUP_BLOBS"),
            if quick { 10_000 } else { 100_000 },
            "COMPARE_STARTUP_BLOBS",
        )?;
        let mut only: Vec<String> = var("COMPARE_ONLY")
            .map(|v| {
                v.split(',')
                    .map(|s| s.trim().to_owned())
                    .filter(|s| !s.is_empty())
                    .collect()
            })
            .unwrap_or_default();
        only.extend(args.iter().filter(|a| !a.starts_with('-')).cloned());
        for name in &only {
            ensure!(
                SCENARIOS.contains(&name.as_str()),
                "unknown scenario {name:?}; the scenarios are {SCENARIOS:?}"
            );
        }
        let write = match var("COMPARE_WRITE") {
            Some(v) => v != "0",
            None => !quick && only.is_empty(),
        };
        let install = var("COMPARE_INSTALL").is_none_or(|v| v != "0");
        let entrepot_log = var("COMPARE_ENTREPOT_LOG");
        let nginx_sendfile = var("COMPARE_NGINX_SENDFILE").is_none_or(|v| v != "0" && v != "off");
        ensure!(
            rounds > 0 && blob_mib > 0 && small_kib > 0,
            "sizes must be positive"
        );
        Ok(Self {
            quick,
            blob: blob_mib << 20,
            small: small_kib << 10,
            rounds,
            wrk_secs,
            wrk_threads: 2,
            connections,
            cold_clients,
            warm_clients,
            startup_blobs,
            only,
            write,
            install,
            entrepot_log,
            nginx_sendfile,
            overrides,
        })
    }

    fn runs(&self, scenario: &str) -> bool {
        self.only.is_empty() || self.only.iter().any(|s| s == scenario)
    }

    fn command(&self) -> String {
        let mut parts = self.overrides.clone();
        parts.push("cargo bench --bench compare".to_owned());
        if !self.only.is_empty() && !self.overrides.iter().any(|o| o.starts_with("COMPARE_ONLY")) {
            parts.push(format!("-- {}", self.only.join(" ")));
        }
        parts.join(" ")
    }
}

fn size_label(bytes: u64) -> String {
    if bytes >= 1 << 20 && bytes.is_multiple_of(1 << 20) {
        format!("{} MiB", bytes >> 20)
    } else {
        format!("{} KiB", bytes >> 10)
    }
}

/// The two caching proxies.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Proxy {
    Entrepot,
    Distribution,
}

/// One peer of a scenario: a proxy, or the reference (nginx, or the upstream pulled directly).
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Peer {
    Proxy(Proxy),
    Reference,
}

const ENTREPOT: Peer = Peer::Proxy(Proxy::Entrepot);
const DISTRIBUTION: Peer = Peer::Proxy(Proxy::Distribution);

/// The peers in the order of this round: rotated each round, so none always goes first.
fn order(round: usize, peers: &[Peer]) -> Vec<Peer> {
    let mut v = peers.to_vec();
    v.rotate_left(round % peers.len());
    v
}

/// A running proxy with its own folder (config, store, log), removed when it drops.
struct Instance {
    server: Server,
    dir: PathBuf,
}

impl Drop for Instance {
    fn drop(&mut self) {
        self.server.process.kill();
        let _ = fs::remove_dir_all(&self.dir);
    }
}

/// Proxies kept warm for the warm scenarios, and nginx.
struct Warm {
    entrepot: Instance,
    distribution: Instance,
    nginx: Server,
}

struct Bench {
    s: Settings,
    tmp: tempfile::TempDir,
    upstream: Server,
    upstream_dir: PathBuf,
    seeded: Seeded,
    relay_entrepot: Relay,
    relay_distribution: Relay,
    relay_direct: Relay,
    warm: Option<Warm>,
    rows: Vec<Row>,
}

impl Bench {
    async fn setup(s: Settings) -> Result<Self> {
        let tmp = tempfile::Builder::new()
            .prefix("entrepot-compare-")
            .tempdir()?;
        let upstream_dir = tmp.path().join("upstream");
        let upstream = procs::start_registry("upstream", &upstream_dir, None).await?;
        let started = Instant::now();
        let seeded = seed::seed(&load::client()?, &upstream.url(""), s.blob, s.small).await?;
        println!(
            "seeded the upstream with a {} layer, a {} layer, a config and a manifest in {:.1?}",
            size_label(s.blob),
            size_label(s.small),
            started.elapsed()
        );
        Ok(Self {
            relay_entrepot: Relay::start(upstream.port).await?,
            relay_distribution: Relay::start(upstream.port).await?,
            relay_direct: Relay::start(upstream.port).await?,
            s,
            tmp,
            upstream,
            upstream_dir,
            seeded,
            warm: None,
            rows: Vec::new(),
        })
    }

    fn relay(&self, proxy: Proxy) -> &Relay {
        match proxy {
            Proxy::Entrepot => &self.relay_entrepot,
            Proxy::Distribution => &self.relay_distribution,
        }
    }

    fn blob_path(&self, blob: &seed::Pushed) -> String {
        format!("/v2/{}/blobs/{}", self.seeded.repo, blob.digest)
    }

    /// Starts `proxy` with an empty store in a folder of its own, upstream through its relay.
    async fn start(&self, proxy: Proxy, name: &str) -> Result<Instance> {
        let dir = self.tmp.path().join(name);
        let upstream = self.relay(proxy).url();
        let server = match proxy {
            Proxy::Entrepot => {
                procs::start_entrepot(
                    &dir,
                    &dir.join("store"),
                    &upstream,
                    self.s.entrepot_log.as_deref(),
                )
                .await?
            }
            Proxy::Distribution => {
                procs::start_registry("distribution-proxy", &dir, Some(&upstream)).await?
            }
        };
        Ok(Instance { server, dir })
    }

    async fn run(&mut self) -> Result<()> {
        for name in SCENARIOS {
            if !self.s.runs(name) {
                continue;
            }
            let started = Instant::now();
            println!("\n== {name}");
            let result = match name {
                "cold1" => self.cold_single().await,
                "cold16" => self.cold_concurrent().await,
                "warm8" => self.warm_pulls().await,
                "small" => self.small_blob().await,
                "tag" => self.manifest_by_tag().await,
                "digest" => self.manifest_by_digest().await,
                "startup" => self.startup().await,
                other => unreachable!("scenario {other} has no step"),
            };
            result.with_context(|| format!("scenario {name}"))?;
            println!("== {name} took {:.1?}", started.elapsed());
        }
        // The warm proxies and nginx are done with; their stores go now.
        self.warm = None;
        Ok(())
    }

    /// One cold pull round: a fresh `proxy` (empty store), `clients` concurrent pulls of the
    /// big layer, what crossed the relay until it fell quiet, and the proxy's memory.
    async fn cold_round(&self, proxy: Proxy, name: &str, clients: usize) -> Result<ColdRound> {
        let instance = self.start(proxy, name).await?;
        let relay = self.relay(proxy);
        let pid = instance.server.pid()?;
        let before = relay.counts();
        let sampling = Arc::new(AtomicBool::new(true));
        let sampler = tokio::spawn(peak_anon(pid, sampling.clone()));
        let url = instance.server.url(&self.blob_path(&self.seeded.big));
        let times = load::pull_concurrent(&url, clients, self.seeded.big.size).await;
        let upstream = settle(relay).await - before;
        sampling.store(false, Ordering::Relaxed);
        let peak_anon = sampler.await??;
        let memory = instance.server.memory()?;
        let times = times
            .with_context(|| format!("{proxy:?}:\n{}", instance.server.process.output_tail()))?;
        Ok(ColdRound {
            slowest: times.iter().max().copied().unwrap_or_default(),
            upstream,
            peak_rss: memory.peak_rss,
            peak_anon,
        })
    }

    async fn cold_single(&mut self) -> Result<()> {
        let size = self.seeded.big.size;
        let scenario = format!("cold pull, 1 client, {} layer", size_label(size));
        let mut time = Row::new(&scenario, "time to last byte", Unit::Seconds)
            .with_distribution()
            .with_reference("direct")
            .target("≤ 1.15", Subject::RatioToReference, Goal::AtMost(1.15));
        let mut bytes = Row::new(&scenario, "upstream bytes ÷ blob size", Unit::Times)
            .with_distribution()
            .target("1.00", Subject::Value, Goal::AtMost(1.005));
        let path = self.blob_path(&self.seeded.big);
        for round in 0..self.s.rounds {
            for peer in order(round, &[Peer::Reference, ENTREPOT, DISTRIBUTION]) {
                match peer {
                    Peer::Reference => {
                        let url = format!("{}{path}", self.relay_direct.url());
                        let t = load::pull(&load::client()?, &url, size).await?;
                        println!("round {round}: direct        {:.3} s", t.as_secs_f64());
                        time.reference_mut().push(t.as_secs_f64());
                    }
                    Peer::Proxy(proxy) => {
                        let r = self.cold_round(proxy, &format!("cold1-{round}"), 1).await?;
                        let ratio = r.upstream.bytes_down as f64 / size as f64;
                        println!(
                            "round {round}: {:<13} {:.3} s, upstream bytes ÷ size {ratio:.3} \
                             ({} requests)",
                            name(proxy),
                            r.slowest.as_secs_f64(),
                            r.upstream.requests
                        );
                        samples(&mut time, peer).push(r.slowest.as_secs_f64());
                        samples(&mut bytes, peer).push(ratio);
                    }
                }
            }
        }
        self.rows.extend([time, bytes]);
        Ok(())
    }

    async fn cold_concurrent(&mut self) -> Result<()> {
        let size = self.seeded.big.size;
        let n = self.s.cold_clients;
        let scenario = format!(
            "cold pull, {n} concurrent clients, same {} layer",
            size_label(size)
        );
        let mut bytes = Row::new(&scenario, "upstream bytes ÷ blob size", Unit::Times)
            .with_distribution()
            .target("1.00", Subject::Value, Goal::AtMost(1.005));
        let mut rss = Row::new(&scenario, "peak RSS of the proxy (VmHWM)", Unit::Mib)
            .with_distribution()
            .target("≤ 48 MiB", Subject::Value, Goal::AtMost(48.0));
        let mut anon = Row::new(
            &scenario,
            "peak anonymous RSS (RssAnon, sampled every 20 ms)",
            Unit::Mib,
        )
        .with_distribution();
        let mut time = Row::new(
            &scenario,
            "time to last byte, slowest client",
            Unit::Seconds,
        )
        .with_distribution();
        for round in 0..self.s.rounds {
            for peer in order(round, &[ENTREPOT, DISTRIBUTION]) {
                let Peer::Proxy(proxy) = peer else { continue };
                let r = self
                    .cold_round(proxy, &format!("cold16-{round}"), n)
                    .await?;
                let ratio = r.upstream.bytes_down as f64 / size as f64;
                println!(
                    "round {round}: {:<13} slowest {:.3} s, upstream bytes ÷ size {ratio:.3} \
                     ({} requests), VmHWM {:.1} MiB, RssAnon peak {:.1} MiB",
                    name(proxy),
                    r.slowest.as_secs_f64(),
                    r.upstream.requests,
                    r.peak_rss as f64 / MIB,
                    r.peak_anon as f64 / MIB,
                );
                samples(&mut bytes, peer).push(ratio);
                samples(&mut rss, peer).push(r.peak_rss as f64 / MIB);
                samples(&mut anon, peer).push(r.peak_anon as f64 / MIB);
                samples(&mut time, peer).push(r.slowest.as_secs_f64());
            }
        }
        self.rows.extend([bytes, time, rss, anon]);
        Ok(())
    }

    /// Starts (once) entrepot and distribution with the seed content pulled through them, and
    /// nginx. A proxy counts as warm when pulling everything again reaches no upstream byte.
    async fn warm(&mut self) -> Result<&Warm> {
        if self.warm.is_none() {
            let entrepot = self.start(Proxy::Entrepot, "warm-entrepot").await?;
            let distribution = self.start(Proxy::Distribution, "warm-distribution").await?;
            let nginx = procs::start_nginx(
                &self.tmp.path().join("nginx"),
                &self.upstream_dir,
                self.s.nginx_sendfile,
            )
            .await?;
            for (proxy, instance) in [
                (Proxy::Entrepot, &entrepot),
                (Proxy::Distribution, &distribution),
            ] {
                self.prime(proxy, &instance.server).await?;
            }
            // nginx serves the very files the upstream wrote.
            let client = load::client()?;
            for blob in [&self.seeded.big, &self.seeded.small] {
                load::pull(&client, &nginx.url(&self.blob_path(blob)), blob.size)
                    .await
                    .context("nginx does not serve the upstream's blob files")?;
            }
            self.warm = Some(Warm {
                entrepot,
                distribution,
                nginx,
            });
        }
        Ok(self.warm.as_ref().expect("just set"))
    }

    async fn prime(&self, proxy: Proxy, server: &Server) -> Result<()> {
        let client = load::client()?;
        let relay = self.relay(proxy);
        let manifest_by_tag = server.url(&format!(
            "/v2/{}/manifests/{}",
            self.seeded.repo, self.seeded.tag
        ));
        let manifest_by_digest = server.url(&format!(
            "/v2/{}/manifests/{}",
            self.seeded.repo, self.seeded.manifest.digest
        ));
        for attempt in 0..40 {
            let before = relay.counts();
            for blob in [&self.seeded.big, &self.seeded.small] {
                load::pull(&client, &server.url(&self.blob_path(blob)), blob.size).await?;
            }
            for url in [&manifest_by_digest, &manifest_by_tag] {
                let resp = client
                    .get(url)
                    .header("accept", OCI_MANIFEST)
                    .send()
                    .await?;
                ensure!(resp.status() == 200, "GET {url}: {}", resp.status());
                resp.bytes().await?;
            }
            // Distribution asks the upstream about a tag on every request; blobs decide.
            let went = settle(relay).await - before;
            if attempt > 0 && went.bytes_down < 64 * 1024 {
                return Ok(());
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
        bail!(
            "{} still fetches the seed blobs from upstream after 40 pulls",
            name(proxy)
        )
    }

    async fn warm_pulls(&mut self) -> Result<()> {
        let size = self.seeded.big.size;
        let n = self.s.warm_clients;
        let path = self.blob_path(&self.seeded.big);
        let rounds = self.s.rounds;
        let scenario = format!(
            "warm pull, {n} concurrent clients, {} layer",
            size_label(size)
        );
        let mut row = Row::new(&scenario, "aggregate throughput", Unit::MibPerSec)
            .with_distribution()
            .with_reference("nginx")
            .target("≥ 0.95", Subject::RatioToReference, Goal::AtLeast(0.95));
        self.warm().await?;
        for round in 0..rounds {
            for peer in order(round, &[ENTREPOT, DISTRIBUTION, Peer::Reference]) {
                let (url, relay) = self.target(peer, &path);
                let before = relay.map(Relay::counts);
                let times = load::pull_concurrent(&url, n, size).await?;
                let slowest = times.iter().max().copied().unwrap_or_default();
                let throughput = (n as u64 * size) as f64 / MIB / slowest.as_secs_f64();
                println!(
                    "round {round}: {:<13} {throughput:.0} MiB/s",
                    peer_name(peer)
                );
                if let (Some(relay), Some(before)) = (relay, before) {
                    let went = relay.counts() - before;
                    if went.bytes_down > size / 100 {
                        row.warnings.push(format!(
                            "{}: a warm pull took {} bytes from upstream",
                            peer_name(peer),
                            went.bytes_down
                        ));
                    }
                }
                samples(&mut row, peer).push(throughput);
            }
        }
        self.rows.push(row);
        Ok(())
    }

    /// The URL of `path` at `peer` (warm instances), and the relay in front of its upstream.
    fn target(&self, peer: Peer, path: &str) -> (String, Option<&Relay>) {
        let warm = self.warm.as_ref().expect("warm() first");
        match peer {
            Peer::Proxy(Proxy::Entrepot) => {
                (warm.entrepot.server.url(path), Some(&self.relay_entrepot))
            }
            Peer::Proxy(Proxy::Distribution) => (
                warm.distribution.server.url(path),
                Some(&self.relay_distribution),
            ),
            Peer::Reference => (warm.nginx.url(path), None),
        }
    }

    /// wrk against `path` on each of `peers`, rounds alternating; returns the rate row and the
    /// upstream requests counted during the runs.
    async fn rate(
        &mut self,
        mut row: Row,
        peers: &[Peer],
        path: &str,
        header: Option<&str>,
    ) -> Result<(Row, Row)> {
        self.warm().await?;
        let mut upstream = Row::new(
            &row.scenario,
            "upstream requests during the run",
            Unit::Count,
        )
        .with_distribution()
        .target("0", Subject::Value, Goal::AtMost(0.0));
        for round in 0..self.s.rounds {
            for &peer in &order(round, peers) {
                let (url, relay) = self.target(peer, path);
                let before = relay.map(Relay::counts);
                let r = load::wrk(
                    self.tmp.path(),
                    &url,
                    self.s.wrk_threads,
                    self.s.connections,
                    self.s.wrk_secs,
                    header,
                )
                .await?;
                let went = relay.zip(before).map(|(relay, b)| relay.counts() - b);
                println!(
                    "round {round}: {:<13} {:.0} requests/s ({} requests, {} not 2xx/3xx, {} \
                     socket errors){}",
                    peer_name(peer),
                    r.requests_per_sec,
                    r.requests,
                    r.non_success,
                    r.socket_errors,
                    went.map_or_else(String::new, |w| format!(
                        ", upstream: {} requests, {} bytes",
                        w.requests, w.bytes_down
                    )),
                );
                if !r.valid() {
                    row.warnings.push(format!(
                        "{} round {round}: {} of {} responses not 2xx/3xx, {} socket errors",
                        peer_name(peer),
                        r.non_success,
                        r.requests,
                        r.socket_errors
                    ));
                }
                if let Some(w) = went {
                    if w.h2_connections > 0 || (w.requests == 0 && w.bytes_up > 0) {
                        upstream.warnings.push(format!(
                            "{}: upstream traffic the relay could not count as HTTP/1 requests \
                             ({} bytes sent, {} HTTP/2 connections)",
                            peer_name(peer),
                            w.bytes_up,
                            w.h2_connections
                        ));
                    }
                    samples(&mut upstream, peer).push(w.requests as f64);
                }
                samples(&mut row, peer).push(r.requests_per_sec);
            }
        }
        Ok((row, upstream))
    }

    async fn small_blob(&mut self) -> Result<()> {
        let scenario = format!(
            "warm small blob ({}), {} connections",
            size_label(self.seeded.small.size),
            self.s.connections
        );
        let row = Row::new(&scenario, "requests/s", Unit::PerSec)
            .with_distribution()
            .with_reference("nginx")
            .target("≥ 0.7", Subject::RatioToReference, Goal::AtLeast(0.7));
        let path = self.blob_path(&self.seeded.small);
        let (row, _) = self
            .rate(row, &[ENTREPOT, DISTRIBUTION, Peer::Reference], &path, None)
            .await?;
        self.rows.push(row);
        Ok(())
    }

    async fn manifest_by_tag(&mut self) -> Result<()> {
        let scenario = format!(
            "manifest by tag within TTL, {} connections",
            self.s.connections
        );
        let row = Row::new(&scenario, "requests/s", Unit::PerSec)
            .with_distribution()
            .target("≥ 20×", Subject::RatioToDistribution, Goal::AtLeast(20.0));
        let path = format!("/v2/{}/manifests/{}", self.seeded.repo, self.seeded.tag);
        let accept = format!("Accept: {OCI_MANIFEST}");
        let (row, upstream) = self
            .rate(row, &[ENTREPOT, DISTRIBUTION], &path, Some(&accept))
            .await?;
        self.rows.extend([row, upstream]);
        Ok(())
    }

    async fn manifest_by_digest(&mut self) -> Result<()> {
        let scenario = format!("manifest by digest, {} connections", self.s.connections);
        let row = Row::new(&scenario, "requests/s", Unit::PerSec)
            .with_distribution()
            .target("≥ 10×", Subject::RatioToDistribution, Goal::AtLeast(10.0));
        let path = format!(
            "/v2/{}/manifests/{}",
            self.seeded.repo, self.seeded.manifest.digest
        );
        let accept = format!("Accept: {OCI_MANIFEST}");
        let (row, _) = self
            .rate(row, &[ENTREPOT, DISTRIBUTION], &path, Some(&accept))
            .await?;
        self.rows.push(row);
        Ok(())
    }

    /// entrepot started on a store of many small blobs: time from spawn to `GET /v2/` answered
    /// and to one of those blobs served.
    async fn startup(&mut self) -> Result<()> {
        let count = self.s.startup_blobs;
        let dir = self.tmp.path().join("startup");
        let store = dir.join("store");
        let started = Instant::now();
        let root = store.clone();
        let (digest, data) =
            tokio::task::spawn_blocking(move || seed::fill_store(&root, count)).await??;
        println!(
            "wrote {count} blobs into the store in {:.1?}",
            started.elapsed()
        );
        let scenario = format!("start-up with {count} cached blobs");
        let mut served = Row::new(&scenario, "time to first served blob", Unit::Millis).target(
            "≤ 1 s",
            Subject::Value,
            Goal::AtMost(1000.0),
        );
        let mut ready = Row::new(&scenario, "time to `GET /v2/` 200", Unit::Millis);
        let client = load::client()?;
        let url_path = format!("/v2/{}/blobs/{digest}", self.seeded.repo);
        for round in 0..self.s.rounds {
            let port = procs::free_port()?;
            let cmd = procs::entrepot_command(
                &dir,
                &store,
                &self.upstream.url(""),
                port,
                self.s.entrepot_log.as_deref(),
            )?;
            let t0 = Instant::now();
            let mut child = ChildGuard::spawn("entrepot", cmd, dir.join("entrepot.log"))?;
            let deadline = t0 + Duration::from_secs(60);
            loop {
                if let Some(status) = child.exited() {
                    bail!("entrepot exited with {status}:\n{}", child.output_tail());
                }
                if let Ok(200) = load::get_status(port, "/v2/").await {
                    break;
                }
                ensure!(
                    Instant::now() < deadline,
                    "entrepot did not start within 60 s"
                );
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
            let t_ready = t0.elapsed();
            let url = format!("http://127.0.0.1:{port}{url_path}");
            let resp = client.get(&url).send().await?;
            ensure!(resp.status() == 200, "GET {url}: {}", resp.status());
            let body = resp.bytes().await?;
            ensure!(body == data, "GET {url}: wrong contents");
            let t_served = t0.elapsed();
            child.kill();
            println!(
                "round {round}: GET /v2/ after {:.0} ms, first blob after {:.0} ms",
                t_ready.as_secs_f64() * 1e3,
                t_served.as_secs_f64() * 1e3
            );
            ready.entrepot.push(t_ready.as_secs_f64() * 1e3);
            served.entrepot.push(t_served.as_secs_f64() * 1e3);
        }
        let _ = fs::remove_dir_all(&dir);
        self.rows.extend([served, ready]);
        Ok(())
    }
}

struct ColdRound {
    slowest: Duration,
    upstream: Counts,
    peak_rss: u64,
    peak_anon: u64,
}

fn name(proxy: Proxy) -> &'static str {
    match proxy {
        Proxy::Entrepot => "entrepot",
        Proxy::Distribution => "distribution",
    }
}

fn peer_name(peer: Peer) -> &'static str {
    match peer {
        Peer::Proxy(p) => name(p),
        Peer::Reference => "nginx",
    }
}

fn samples(row: &mut Row, peer: Peer) -> &mut report::Samples {
    match peer {
        Peer::Proxy(Proxy::Entrepot) => &mut row.entrepot,
        Peer::Proxy(Proxy::Distribution) => row.distribution_mut(),
        Peer::Reference => row.reference_mut(),
    }
}

/// Waits until nothing crosses the relay for 750 ms (a proxy may go on fetching after its
/// client is served), at most 60 s, and returns the counters then.
async fn settle(relay: &Relay) -> Counts {
    let mut last = relay.counts();
    let mut quiet = 0;
    for _ in 0..240 {
        tokio::time::sleep(Duration::from_millis(250)).await;
        let now = relay.counts();
        if now.bytes_down == last.bytes_down && now.bytes_up == last.bytes_up {
            quiet += 1;
            if quiet == 3 {
                return now;
            }
        } else {
            quiet = 0;
        }
        last = now;
    }
    last
}

/// The highest RssAnon of `pid` seen while `running` holds, sampled every 20 ms.
async fn peak_anon(pid: u32, running: Arc<AtomicBool>) -> Result<u64> {
    let mut peak = 0;
    while running.load(Ordering::Relaxed) {
        peak = peak.max(procs::memory(pid)?.rss_anon);
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    Ok(peak.max(procs::memory(pid)?.rss_anon))
}

/// What the report says about the machine and the programs.
struct Machine {
    cores: String,
    cpu: String,
    sha_ext: bool,
    memory: String,
    kernel: String,
    versions: Vec<String>,
    revision: String,
    date: String,
}

fn output_of(program: &str, args: &[&str]) -> String {
    let found = procs::find_program(program).unwrap_or_else(|_| PathBuf::from(program));
    Command::new(found)
        .args(args)
        .output()
        .map(|o| {
            let text = if o.stdout.is_empty() {
                o.stderr
            } else {
                o.stdout
            };
            String::from_utf8_lossy(&text)
                .lines()
                .next()
                .unwrap_or("")
                .trim()
                .to_owned()
        })
        .unwrap_or_else(|e| format!("? ({e})"))
}

impl Machine {
    fn probe() -> Self {
        let cpuinfo = fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
        let cpu = cpuinfo
            .lines()
            .find(|l| l.starts_with("model name"))
            .and_then(|l| l.split_once(':'))
            .map_or("unknown".to_owned(), |(_, v)| v.trim().to_owned());
        let sha_ext = cpuinfo
            .lines()
            .find(|l| l.starts_with("flags"))
            .is_some_and(|l| l.split_whitespace().any(|f| f == "sha_ni"));
        let memory = fs::read_to_string("/proc/meminfo")
            .ok()
            .and_then(|m| {
                let kib: f64 = m
                    .lines()
                    .find(|l| l.starts_with("MemTotal:"))?
                    .split_whitespace()
                    .nth(1)?
                    .parse()
                    .ok()?;
                Some(format!("{:.0} GiB", kib / 1024.0 / 1024.0))
            })
            .unwrap_or_else(|| "?".to_owned());
        let repo = env!("CARGO_MANIFEST_DIR");
        let revision = output_of("git", &["-C", repo, "describe", "--always", "--dirty"]);
        Self {
            cores: output_of("nproc", &[]),
            cpu,
            sha_ext,
            memory,
            kernel: output_of("uname", &["-sr"]),
            versions: vec![
                // "/usr/bin/docker-registry github.com/docker/distribution 2.8.2+ds1"
                output_of("docker-registry", &["--version"])
                    .rsplit(' ')
                    .next()
                    .map_or_else(String::new, |v| format!("docker-registry {v}")),
                output_of("nginx", &["-v"]).replace("nginx version: ", ""),
                // "wrk debian/4.1.0-3+b2 [epoll] Copyright (C) 2012 Will Glozer"
                output_of("wrk", &["-v"])
                    .split(" Copyright")
                    .next()
                    .unwrap_or_default()
                    .to_owned(),
            ],
            revision,
            date: output_of("date", &["-u", "+%Y-%m-%d %H:%M UTC"]),
        }
    }
}

/// The report: settings, machine, table, verdicts and every round's values.
fn render(s: &Settings, m: &Machine, rows: &[Row], took: Duration) -> String {
    let mut out = String::new();
    out.push_str(&format!(
        "Command: `{}` — {}, entrepot {}, took {:.0} s.\n\n\
         Machine: {} cores (`nproc`), {}{}, {} RAM, {}.\n\
         Peers: {}; {} (sendfile {}); {}.\n\n\
         Sizes: big layer {}, small blob {}, {} round(s) per scenario (peers alternating), \
         wrk -t{} -c{} -d{}s, {} cold / {} warm concurrent clients, {} blobs for start-up. \
         entrepot log filter: {}.\n\n",
        s.command(),
        m.date,
        m.revision,
        took.as_secs_f64(),
        m.cores,
        m.cpu,
        if m.sha_ext { " (SHA extensions)" } else { "" },
        m.memory,
        m.kernel,
        m.versions[0],
        m.versions[1],
        if s.nginx_sendfile { "on" } else { "off" },
        m.versions[2],
        size_label(s.blob),
        size_label(s.small),
        s.rounds,
        s.wrk_threads,
        s.connections,
        s.wrk_secs,
        s.cold_clients,
        s.warm_clients,
        s.startup_blobs,
        s.entrepot_log
            .as_deref()
            .unwrap_or("default (info, access log on)"),
    ));
    if s.quick {
        out.push_str("**Quick run (`COMPARE_QUICK`): small sizes, not the issue's.**\n\n");
    }
    out.push_str("Medians over the rounds; ratios are entrepot's median ÷ the peer's.\n\n");
    out.push_str(&report::table(rows));
    out.push_str("\nTargets (issue 4):\n\n");
    out.push_str(&report::verdicts(rows));
    out.push_str("\nEvery round:\n\n");
    out.push_str(&report::rounds(rows));
    out
}

const BEGIN: &str = "<!-- compare:begin (written by `cargo bench --bench compare`) -->";
const END: &str = "<!-- compare:end -->";

/// Puts `section` between the markers of BENCHMARKS.md, keeping everything around them.
fn write_benchmarks_md(section: &str) -> Result<PathBuf> {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("BENCHMARKS.md");
    let old = fs::read_to_string(&path).unwrap_or_else(|_| "# Benchmarks\n\n".to_owned());
    let block = format!("{BEGIN}\n{section}{END}");
    let new = match (old.find(BEGIN), old.find(END)) {
        (Some(b), Some(e)) if b < e => format!("{}{block}{}", &old[..b], &old[e + END.len()..]),
        _ => format!("{}\n## Last run\n\n{block}\n", old.trim_end()),
    };
    fs::write(&path, new)?;
    Ok(path)
}

/// Waits for Ctrl-C or SIGTERM, so the bench can stop its children on the way out.
async fn interrupted() -> Result<()> {
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
    bail!("interrupted")
}

async fn bench(s: Settings) -> Result<()> {
    let started = Instant::now();
    let machine = Machine::probe();
    let mut b = Bench::setup(s).await?;
    let result = b.run().await;
    let took = started.elapsed();
    let text = render(&b.s, &machine, &b.rows, took);
    println!("\n{text}");
    result?;
    if b.s.write {
        let path = write_benchmarks_md(&text)?;
        println!("wrote {}", path.display());
    } else {
        println!("(BENCHMARKS.md not written: set COMPARE_WRITE=1 to write this run's table)");
    }
    Ok(())
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    // `cargo test --all-targets` runs bench targets too, without `--bench`: stay out of it.
    if !args.iter().any(|a| a == "--bench") {
        println!("compare: not run (run it with `cargo bench --bench compare`)");
        return ExitCode::SUCCESS;
    }
    let settings = match Settings::from_env(&args) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("compare: {e:#}");
            return ExitCode::FAILURE;
        }
    };
    if settings.install {
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join(".ci/install-bench-deps.sh");
        match Command::new("bash").arg(&script).status() {
            Ok(status) if status.success() => {}
            other => {
                eprintln!("compare: {} failed: {other:?}", script.display());
                return ExitCode::FAILURE;
            }
        }
    }
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("compare: starting the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    // On error, panic or signal the bench future is dropped, and with it every child guard.
    let result = runtime.block_on(async {
        tokio::select! {
            r = bench(settings) => r,
            r = interrupted() => r,
        }
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("compare: {e:#}");
            ExitCode::FAILURE
        }
    }
}
