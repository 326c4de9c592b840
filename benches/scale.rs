//! `cargo bench --bench scale`: what entrepot costs as its store grows (issue 13), on stores of
//! 10 000, 100 000 and 1 000 000 tiny blobs written straight into the store layout.
//!
//! # Layout
//!
//! ```text
//! store (benches/support/store_gen.rs) ◄── entrepot release binary, offline ◄── GETs (reqwest)
//!                                      ◄── entrepot cache ls | verify (/usr/bin/time)
//! ```
//!
//! For each size: the store is generated (about 90% of its blobs in tagged images, every
//! record a server keeps beside them), then
//! 1. entrepot is started `SCALE_ROUNDS` times: spawn → `GET /v2/` 200, and → a stored blob
//!    served; the last start is kept: its first sweep (an inventory of the store, nothing to
//!    evict; the time from its log line), then its RSS once that is done (idle), then the
//!    latency of `SCALE_GETS` sequential GETs of random stored blobs and of manifests by tag;
//! 2. `entrepot cache ls` and `entrepot cache verify`: wall time and peak RSS;
//! 3. entrepot again with `max_size` 1% below the store's size: its first sweep evicts (time
//!    from the log line; peak RSS is the process's VmHWM, almost all of it the sweep's), then
//!    its RSS after the sweep.
//!
//! The store is deleted after each size. Settings: `SCALE_SIZES` (comma-separated blob counts,
//! default `10000,100000,1000000`), `SCALE_QUICK=1` (10 000 only, one start), `SCALE_ROUNDS`
//! (starts per size, default 3), `SCALE_GETS` (default 2000), `SCALE_DIR` (where stores are
//! written, default the temp folder), `SCALE_KEEP=1` (leave the stores there, to profile). A run of the default sizes writes its table into
//! BENCHMARKS.md; other runs print only.

#[path = "support/store_gen.rs"]
mod store_gen;
#[allow(dead_code)]
mod support;

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use store_gen::Generated;
use support::load;
use support::procs::{self, ChildGuard};
use support::report::Samples;
use support::seed::OCI_MANIFEST;

const MIB: f64 = 1024.0 * 1024.0;
const DEFAULT_SIZES: [usize; 3] = [10_000, 100_000, 1_000_000];
/// How long a first sweep may take before the bench gives up.
const SWEEP_TIMEOUT: Duration = Duration::from_secs(900);

struct Settings {
    sizes: Vec<usize>,
    rounds: usize,
    gets: usize,
    dir: PathBuf,
    /// Leave each store (and its entrepot.toml) in place, to profile by hand.
    keep: bool,
}

impl Settings {
    fn from_env() -> Result<Settings> {
        let var = |name: &str| std::env::var(name).ok().filter(|v| !v.is_empty());
        let quick = var("SCALE_QUICK").is_some_and(|v| v != "0");
        let sizes = match var("SCALE_SIZES") {
            Some(v) => v
                .split(',')
                .map(|n| n.trim().replace('_', "").parse::<usize>())
                .collect::<Result<Vec<_>, _>>()
                .with_context(|| format!("SCALE_SIZES={v:?}"))?,
            None if quick => vec![DEFAULT_SIZES[0]],
            None => DEFAULT_SIZES.to_vec(),
        };
        let num = |name: &str, default: usize| -> Result<usize> {
            var(name).map_or(Ok(default), |v| {
                v.parse().with_context(|| format!("{name}={v:?}"))
            })
        };
        Ok(Settings {
            sizes,
            rounds: num("SCALE_ROUNDS", if quick { 1 } else { 3 })?.max(1),
            gets: num("SCALE_GETS", 2000)?.max(1),
            dir: var("SCALE_DIR").map_or_else(std::env::temp_dir, PathBuf::from),
            keep: var("SCALE_KEEP").is_some_and(|v| v != "0"),
        })
    }
}

/// What one size measured.
#[derive(Default)]
struct Figures {
    blobs: usize,
    bytes: u64,
    images: usize,
    tags: usize,
    links: usize,
    ready_ms: Samples,
    served_ms: Samples,
    inventory_sweep_s: f64,
    idle_rss: f64,
    first_peak_rss: f64,
    blob_ms: (f64, f64),
    tag_ms: (f64, f64),
    ls: (f64, f64),
    verify: (f64, f64),
    evict_sweep_s: f64,
    evict_peak_rss: f64,
    evict_ready_rss: f64,
    after_evict_rss: f64,
    evicted_blobs: u64,
}

/// A running entrepot and where its log goes.
struct Entrepot {
    child: ChildGuard,
    port: u16,
    log: PathBuf,
    /// When it was spawned.
    spawned: Instant,
}

impl Entrepot {
    /// Starts the release binary on `store`, offline (only what the store holds is served),
    /// with `storage` added to `[storage]`; returns it with the time to `GET /v2/` 200.
    async fn start(dir: &Path, store: &Path, storage: &str) -> Result<(Entrepot, Duration)> {
        let port = procs::free_port()?;
        let config = dir.join("entrepot.toml");
        std::fs::write(
            &config,
            format!(
                "[server]\nlisten = \"127.0.0.1:{port}\"\nshutdown_grace = \"1s\"\n\
                 offline = true\n\n[storage]\nroot = {store:?}\n{storage}\n\
                 [[upstream]]\nname = \"upstream\"\nurl = \"http://127.0.0.1:9\"\n\
                 default = true\ntag_ttl = \"1h\"\n",
                store = store.display().to_string(),
            ),
        )?;
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_entrepot"));
        cmd.arg("serve")
            .arg("--config")
            .arg(&config)
            .current_dir(dir);
        cmd.env_remove("ENTREPOT_LOG");
        let log = dir.join("entrepot.log");
        let t0 = Instant::now();
        let mut child = ChildGuard::spawn("entrepot", cmd, log.clone())?;
        loop {
            if let Some(status) = child.exited() {
                bail!("entrepot exited with {status}:\n{}", child.output_tail());
            }
            if let Ok(200) = load::get_status(port, "/v2/").await {
                break;
            }
            ensure!(
                t0.elapsed() < Duration::from_secs(60),
                "no GET /v2/ in 60 s"
            );
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        let ready = t0.elapsed();
        let e = Entrepot {
            child,
            port,
            log,
            spawned: t0,
        };
        Ok((e, ready))
    }

    fn memory(&self) -> Result<procs::Memory> {
        procs::memory(self.child.pid().context("entrepot stopped")?)
    }

    /// VmRSS now, in MiB.
    fn rss(&self) -> Result<f64> {
        let m = self.memory()?;
        Ok((m.rss_anon + m.rss_file) as f64 / MIB)
    }

    /// Waits for the `n`th "store sweep done" line of the log; returns its `took_ms` in s.
    async fn sweep_done(&mut self, n: usize) -> Result<f64> {
        let deadline = Instant::now() + SWEEP_TIMEOUT;
        loop {
            let log = std::fs::read_to_string(&self.log).unwrap_or_default();
            if let Some(line) = log
                .lines()
                .filter(|l| l.contains("store sweep done"))
                .nth(n - 1)
            {
                let ms: f64 = field(line, "took_ms").context("a sweep line without took_ms")?;
                return Ok(ms / 1e3);
            }
            if let Some(status) = self.child.exited() {
                bail!(
                    "entrepot exited with {status}:\n{}",
                    self.child.output_tail()
                );
            }
            ensure!(
                Instant::now() < deadline,
                "no sweep within {SWEEP_TIMEOUT:?}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

/// The value of `name=` in a log line.
fn field<T: std::str::FromStr>(line: &str, name: &str) -> Option<T> {
    let rest = &line[line.find(&format!("{name}="))? + name.len() + 1..];
    rest.split_whitespace().next()?.parse().ok()
}

/// p50 and p99 of `times`, in ms.
fn percentiles(mut times: Vec<f64>) -> (f64, f64) {
    times.sort_by(f64::total_cmp);
    let at = |q: f64| times[((times.len() - 1) as f64 * q).round() as usize];
    (at(0.50), at(0.99))
}

/// `gets` sequential GETs (one connection) of random entries of `paths`, each checked for a
/// 200; p50 and p99 in ms.
async fn latency(
    port: u16,
    paths: &[String],
    gets: usize,
    accept: Option<&str>,
) -> Result<(f64, f64)> {
    ensure!(!paths.is_empty(), "nothing to GET");
    let client = load::client()?;
    let mut rng = 0x9E37_79B9_7F4A_7C15u64;
    let mut times = Vec::with_capacity(gets);
    for _ in 0..gets {
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        let url = format!(
            "http://127.0.0.1:{port}{}",
            paths[rng as usize % paths.len()]
        );
        let mut req = client.get(&url);
        if let Some(a) = accept {
            req = req.header("accept", a);
        }
        let t0 = Instant::now();
        let resp = req.send().await?;
        ensure!(resp.status() == 200, "GET {url}: {}", resp.status());
        resp.bytes().await?;
        times.push(t0.elapsed().as_secs_f64() * 1e3);
    }
    Ok(percentiles(times))
}

/// Runs `entrepot cache <action>` on `store` under `/usr/bin/time`: wall seconds and peak RSS
/// in MiB (its stdout goes to `out`).
fn cache_command(store: &Path, action: &str, out: &Path) -> Result<(f64, f64)> {
    let time = procs::find_program("time")?;
    let stats = out.with_extension("time");
    let status = Command::new(time)
        .args(["-f", "%e %M", "-o"])
        .arg(&stats)
        .arg(env!("CARGO_BIN_EXE_entrepot"))
        .args(["cache", action, "--root"])
        .arg(store)
        .env_remove("ENTREPOT_LOG")
        .stdout(std::fs::File::create(out)?)
        .stderr(Stdio::inherit())
        .status()?;
    ensure!(status.success(), "entrepot cache {action} failed: {status}");
    let text = std::fs::read_to_string(&stats)?;
    let mut it = text.split_whitespace();
    let wall: f64 = it.next().context("no wall time")?.parse()?;
    let kib: f64 = it.next().context("no max RSS")?.parse()?;
    Ok((wall, kib * 1024.0 / MIB))
}

async fn measure(s: &Settings, dir: &Path, g: &Generated) -> Result<Figures> {
    let mut f = Figures {
        blobs: g.blobs,
        bytes: g.bytes,
        images: g.images,
        tags: g.tags,
        links: g.links,
        ..Figures::default()
    };
    let store = &g.root;
    let blob_paths: Vec<String> = g
        .blob_reads
        .iter()
        .map(|(r, d)| format!("/v2/{r}/blobs/{d}"))
        .collect();
    let tag_paths: Vec<String> = g
        .tag_reads
        .iter()
        .map(|(r, t)| format!("/v2/{r}/manifests/{t}"))
        .collect();

    // 1. Start-up, idle memory, hits.
    let mut kept = None;
    for round in 0..s.rounds {
        let (mut e, ready) = Entrepot::start(dir, store, "").await?;
        // A different blob each round: none is in a page of the previous process's mappings.
        let first = &blob_paths[(round * 7919) % blob_paths.len()..][..1];
        latency(e.port, first, 1, None).await?;
        let served = e.spawned.elapsed();
        f.ready_ms.push(ready.as_secs_f64() * 1e3);
        f.served_ms.push(served.as_secs_f64() * 1e3);
        println!(
            "  start {round}: GET /v2/ after {:.0} ms, a blob served after {:.0} ms",
            ready.as_secs_f64() * 1e3,
            served.as_secs_f64() * 1e3
        );
        if round + 1 == s.rounds {
            kept = Some(e);
        } else {
            e.child.kill();
        }
    }
    let mut e = kept.expect("at least one round");
    f.inventory_sweep_s = e.sweep_done(1).await?;
    tokio::time::sleep(Duration::from_secs(2)).await;
    f.idle_rss = e.rss()?;
    f.blob_ms = latency(e.port, &blob_paths, s.gets, None).await?;
    f.tag_ms = latency(e.port, &tag_paths, s.gets, Some(OCI_MANIFEST)).await?;
    f.first_peak_rss = e.memory()?.peak_rss as f64 / MIB;
    e.child.kill();
    println!(
        "  first sweep {:.2} s, idle RSS {:.1} MiB, blob hit p50 {:.2} ms, tag p50 {:.2} ms",
        f.inventory_sweep_s, f.idle_rss, f.blob_ms.0, f.tag_ms.0
    );

    // 2. The maintenance commands.
    f.ls = cache_command(store, "ls", &dir.join("ls.out"))?;
    f.verify = cache_command(store, "verify", &dir.join("verify.out"))?;
    println!(
        "  cache ls {:.2} s / {:.1} MiB, verify {:.2} s / {:.1} MiB",
        f.ls.0, f.ls.1, f.verify.0, f.verify.1
    );

    // 3. One eviction sweep.
    let max = g.bytes - g.bytes / 100;
    let (mut e, _) = Entrepot::start(dir, store, &format!("max_size = \"{max}\"\n")).await?;
    f.evict_ready_rss = e.rss()?;
    f.evict_sweep_s = e.sweep_done(1).await?;
    let log = std::fs::read_to_string(&e.log)?;
    let line = log
        .lines()
        .find(|l| l.contains("evicted least recently used images"))
        .context("the sweep evicted nothing")?;
    f.evicted_blobs = field(line, "blobs").context("no blobs= in the eviction line")?;
    f.evict_peak_rss = e.memory()?.peak_rss as f64 / MIB;
    tokio::time::sleep(Duration::from_secs(2)).await;
    f.after_evict_rss = e.rss()?;
    e.child.kill();
    println!(
        "  eviction sweep {:.2} s ({} blobs), peak RSS {:.1} MiB, RSS after {:.1} MiB",
        f.evict_sweep_s, f.evicted_blobs, f.evict_peak_rss, f.after_evict_rss
    );
    Ok(f)
}

/// "10k", "1M".
fn size_label(n: usize) -> String {
    match n {
        n if n >= 1_000_000 && n % 1_000_000 == 0 => format!("{}M", n / 1_000_000),
        n if n >= 1_000 && n % 1_000 == 0 => format!("{}k", n / 1_000),
        n => n.to_string(),
    }
}

/// A line of the table: its name, how a value is printed, the value, and the target.
type Measure = (
    &'static str,
    fn(f64) -> String,
    fn(&Figures) -> f64,
    &'static str,
);

fn ms(v: f64) -> String {
    if v < 10.0 {
        format!("{v:.2} ms")
    } else {
        format!("{v:.0} ms")
    }
}
fn secs(v: f64) -> String {
    format!("{v:.2} s")
}
fn mib(v: f64) -> String {
    format!("{v:.1} MiB")
}
fn count(v: f64) -> String {
    let digits = (v.round() as u64).to_string();
    let mut out = String::new();
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i).is_multiple_of(3) {
            out.push(' ');
        }
        out.push(c);
    }
    out
}
fn bytes(v: f64) -> String {
    format!("{v:.0} B")
}

const MEASURES: [Measure; 21] = [
    ("blobs in the store", count, |f| f.blobs as f64, ""),
    (
        "… images (1 manifest, 1 config, 10 layers)",
        count,
        |f| f.images as f64,
        "",
    ),
    ("… bytes (tiny blobs)", mib, |f| f.bytes as f64 / MIB, ""),
    ("… tags", count, |f| f.tags as f64, ""),
    ("… links", count, |f| f.links as f64, ""),
    (
        "start-up: spawn → `GET /v2/` 200",
        ms,
        |f| f.ready_ms.median().unwrap_or(f64::NAN),
        "",
    ),
    (
        "start-up: spawn → a stored blob served",
        ms,
        |f| f.served_ms.median().unwrap_or(f64::NAN),
        "≤ 1 s",
    ),
    (
        "first sweep (inventory; nothing to evict)",
        secs,
        |f| f.inventory_sweep_s,
        "",
    ),
    (
        "RSS idle, after the first sweep (VmRSS)",
        mib,
        |f| f.idle_rss,
        "≤ 150 MiB",
    ),
    (
        "peak RSS of that start (VmHWM)",
        mib,
        |f| f.first_peak_rss,
        "",
    ),
    ("blob hit, p50", ms, |f| f.blob_ms.0, "flat"),
    ("blob hit, p99", ms, |f| f.blob_ms.1, "flat"),
    ("manifest by tag, p50", ms, |f| f.tag_ms.0, "flat"),
    ("manifest by tag, p99", ms, |f| f.tag_ms.1, "flat"),
    ("`cache ls`: wall", secs, |f| f.ls.0, ""),
    ("`cache ls`: peak RSS", mib, |f| f.ls.1, ""),
    ("`cache verify`: wall", secs, |f| f.verify.0, ""),
    ("`cache verify`: peak RSS", mib, |f| f.verify.1, ""),
    (
        "eviction sweep: time (`max_size` 1% below the store)",
        secs,
        |f| f.evict_sweep_s,
        "",
    ),
    (
        "eviction sweep: peak RSS (VmHWM)",
        mib,
        |f| f.evict_peak_rss,
        "",
    ),
    (
        "eviction sweep: memory per blob, (VmHWM − RSS at start) ÷ blobs",
        bytes,
        |f| (f.evict_peak_rss - f.evict_ready_rss) * MIB / f.blobs as f64,
        "linear: flat per blob",
    ),
];

/// The table: a column per size, the growth from each size to the next, the target.
fn render(figures: &[Figures]) -> String {
    let mut out = String::from("| measure |");
    for f in figures {
        let _ = write!(out, " {} |", size_label(f.blobs.div_ceil(1000) * 1000));
    }
    for w in figures.windows(2) {
        let _ = write!(
            out,
            " {} ÷ {} |",
            size_label(w[1].blobs.div_ceil(1000) * 1000),
            size_label(w[0].blobs.div_ceil(1000) * 1000)
        );
    }
    out.push_str(" target |\n|---|");
    for _ in 0..figures.len() * 2 - 1 {
        out.push_str("---:|");
    }
    out.push_str("---|\n");
    for (name, fmt, value, target) in MEASURES {
        let _ = write!(out, "| {name} |");
        for f in figures {
            let _ = write!(out, " {} |", fmt(value(f)));
        }
        for w in figures.windows(2) {
            let _ = write!(out, " {:.2}× |", value(&w[1]) / value(&w[0]));
        }
        let _ = writeln!(out, " {target} |");
    }
    let after: Vec<String> = figures
        .iter()
        .map(|f| format!("{} blobs", count(f.evicted_blobs as f64)))
        .collect();
    let rss: Vec<String> = figures.iter().map(|f| mib(f.after_evict_rss)).collect();
    let _ = writeln!(
        out,
        "\nThe eviction sweeps removed {}; RSS after them: {}.",
        after.join(", "),
        rss.join(", ")
    );
    out
}

const BEGIN: &str = "<!-- scale:begin (written by `cargo bench --bench scale`) -->";
const END: &str = "<!-- scale:end -->";

/// Puts `section` between the markers in BENCHMARKS.md (at the end when they are missing).
fn write_benchmarks_md(section: &str) -> Result<PathBuf> {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("BENCHMARKS.md");
    let old = std::fs::read_to_string(&path)?;
    let text = format!("{BEGIN}\n{section}{END}");
    let new = match (old.find(BEGIN), old.find(END)) {
        (Some(b), Some(e)) if b < e => format!("{}{text}{}", &old[..b], &old[e + END.len()..]),
        _ => format!(
            "{}\n\n## Costs as the store grows (issue 13)\n\n{text}\n",
            old.trim_end()
        ),
    };
    std::fs::write(&path, new)?;
    Ok(path)
}

fn git_head() -> String {
    Command::new("git")
        .args(["describe", "--always", "--dirty"])
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .ok()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
        .unwrap_or_default()
}

async fn bench(s: Settings) -> Result<()> {
    let started = Instant::now();
    let mut figures = Vec::new();
    for &n in &s.sizes {
        let dir = tempfile::Builder::new()
            .prefix("entrepot-scale-")
            .tempdir_in(&s.dir)?;
        let store = dir.path().join("store");
        let t0 = Instant::now();
        let root = store.clone();
        let g = tokio::task::spawn_blocking(move || store_gen::generate(&root, n)).await??;
        println!(
            "{}: wrote {} blobs ({} images, {} tags, {} links, {:.1} MiB) in {:.1?}",
            size_label(n),
            g.blobs,
            g.images,
            g.tags,
            g.links,
            g.bytes as f64 / MIB,
            t0.elapsed()
        );
        figures.push(measure(&s, dir.path(), &g).await?);
        if s.keep {
            println!("  store kept in {} (SCALE_KEEP)", dir.keep().display());
        }
        // Otherwise the store goes with `dir` (removed on drop, on errors too).
    }
    let took = started.elapsed();
    let mut section = format!(
        "Command: `cargo bench --bench scale` — entrepot {}, {} start(s) per size, {} GETs per \
         latency, took {:.0} s.\n\n",
        git_head(),
        s.rounds,
        s.gets,
        took.as_secs_f64()
    );
    section.push_str(&render(&figures));
    println!("\n{section}");
    if s.sizes == DEFAULT_SIZES {
        println!("written to {}", write_benchmarks_md(&section)?.display());
    }
    Ok(())
}

fn main() -> ExitCode {
    // `cargo test --all-targets` runs bench targets too, without `--bench`: stay out of it.
    if !std::env::args().any(|a| a == "--bench") {
        println!("scale: not run (run it with `cargo bench --bench scale`)");
        return ExitCode::SUCCESS;
    }
    let run = || -> Result<()> {
        let s = Settings::from_env()?;
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()?
            .block_on(bench(s))
    };
    match run() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("scale bench failed: {e:#}");
            ExitCode::FAILURE
        }
    }
}
