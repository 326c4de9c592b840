//! `entrepot prefetch`: fill the store ahead of need, through the same fill path as a pull.
//!
//! Prefetch is a registry client. In direct mode it starts an entrepot server on `127.0.0.1:0`
//! over the configured store and pulls through it; with `--server` it pulls through a running
//! one. Either way every blob goes through the server's fills (verified, committed atomically,
//! one upstream fetch per digest), and prefetch checks again what it receives. Within a run each
//! digest is asked for once, whatever the number of images that share it; across runs the server
//! answers stored content with `X-Entrepot-Cache: hit`, so a second run transfers nothing it
//! already has.

use std::cell::RefCell;
use std::collections::{HashMap, HashSet};
use std::fmt;
use std::io::IsTerminal as _;
use std::path::PathBuf;
use std::process::ExitCode;
use std::str::FromStr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Context as _;
use bytes::Bytes;
use futures_util::future::{join_all, BoxFuture};
use indicatif::{HumanBytes, MultiProgress, ProgressBar, ProgressDrawTarget, ProgressStyle};
use serde::Deserialize;
use tokio::sync::{OnceCell, Semaphore};
use tokio::task::JoinSet;

use crate::cache::pins;
use crate::config::{parse_image_ref, Config, PinConfig};
use crate::oci::{media, Digest, Hasher, Reference};

/// Layers at least this big get their own progress bar on a terminal.
const BIG_BLOB: u64 = 16 << 20;
/// Manifests and error bodies are read whole; nothing sane is bigger.
const MAX_MANIFEST: u64 = 16 << 20;
const MAX_ERROR_BODY: usize = 64 << 10;
/// Indexes of indexes (and referrers of referrers) deeper than this are not followed.
const MAX_DEPTH: usize = 4;
/// Longest silence while a response streams (the server itself waits up to its upstream's
/// `read_timeout` before giving up on a stalled fill).
const READ_TIMEOUT: Duration = Duration::from_secs(300);
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
const CACHE_HEADER: &str = "x-entrepot-cache";

/// The manifests a prefetch accepts: indexes, image manifests (OCI and Docker), OCI artifacts.
const ACCEPT: &str = "application/vnd.oci.image.index.v1+json, \
    application/vnd.oci.image.manifest.v1+json, \
    application/vnd.docker.distribution.manifest.list.v2+json, \
    application/vnd.docker.distribution.manifest.v2+json, \
    application/vnd.oci.artifact.manifest.v1+json";

/// Arguments of `entrepot prefetch`.
#[derive(Debug, clap::Args)]
#[command(after_help = "\
Examples:
  entrepot prefetch --config /etc/entrepot.toml docker.io/library/alpine:3.20 ghcr.io/org/app:1.0
  entrepot prefetch --root /var/lib/entrepot --file images.txt --platform linux/amd64,linux/arm64
  entrepot prefetch --server http://entrepot.local:5000 --file images.txt

Without --server the store is filled directly (an embedded server on 127.0.0.1 does the
fetching); do not point it at the store of a running server, use --server for that.
The embedded server logs warnings only; set ENTREPOT_LOG (e.g. ENTREPOT_LOG=info) for more.")]
pub struct PrefetchArgs {
    /// Image references: the first component names the upstream (its configured name or an
    /// alias), then the repository and a tag or digest, e.g. docker.io/library/alpine:3.20.
    #[arg(value_name = "IMAGE")]
    pub images: Vec<String>,
    /// Read references from FILE, one a line; blank lines and `#` comments are ignored.
    #[arg(long, short, value_name = "FILE")]
    pub file: Option<PathBuf>,
    /// TOML configuration file: its upstreams and storage.root are used (default: the built-in
    /// configuration).
    #[arg(long, short, value_name = "FILE", conflicts_with = "server")]
    pub config: Option<PathBuf>,
    /// Store directory; overrides the configuration's storage.root.
    #[arg(long, value_name = "DIR", conflicts_with = "server")]
    pub root: Option<PathBuf>,
    /// Pull through the running entrepot at URL instead of filling a store directly.
    #[arg(long, value_name = "URL")]
    pub server: Option<url::Url>,
    /// With --server: where its operator endpoints listen (server.admin_listen), for POST /pins.
    #[arg(long, value_name = "URL", requires = "server")]
    pub admin: Option<url::Url>,
    /// Of an image index, fetch only these platforms (default: all).
    #[arg(long, value_name = "OS/ARCH[/VARIANT],...", value_delimiter = ',')]
    pub platform: Vec<Platform>,
    /// Also fetch the referrers (signatures, SBOMs, attestations) of every manifest.
    #[arg(long)]
    pub with_referrers: bool,
    /// How many requests run at once.
    #[arg(long, short, value_name = "N", default_value_t = 4,
          value_parser = clap::value_parser!(u16).range(1..=256))]
    pub jobs: u16,
    /// Do not pin the prefetched images (pinned images are never evicted).
    #[arg(long)]
    pub no_pin: bool,
}

/// A `--platform` entry: `os/architecture[/variant]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Platform {
    pub os: String,
    pub architecture: String,
    pub variant: Option<String>,
}

impl FromStr for Platform {
    type Err = String;

    fn from_str(s: &str) -> Result<Platform, String> {
        let parts: Vec<&str> = s.trim().split('/').collect();
        let ok = |p: &&str| !p.is_empty();
        match parts.as_slice() {
            [os, arch] if ok(os) && ok(arch) => Ok(Platform {
                os: os.to_string(),
                architecture: arch.to_string(),
                variant: None,
            }),
            [os, arch, variant] if ok(os) && ok(arch) && ok(variant) => Ok(Platform {
                os: os.to_string(),
                architecture: arch.to_string(),
                variant: Some(variant.to_string()),
            }),
            _ => Err(format!(
                "{s:?} is not a platform like linux/amd64 or linux/arm/v7"
            )),
        }
    }
}

impl fmt::Display for Platform {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.os, self.architecture)?;
        if let Some(v) = &self.variant {
            write!(f, "/{v}")?;
        }
        Ok(())
    }
}

impl Platform {
    /// Does an index entry's platform match? A filter without a variant takes every variant.
    fn matches(&self, p: &PlatformJson) -> bool {
        self.os == p.os
            && self.architecture == p.architecture
            && self
                .variant
                .as_ref()
                .is_none_or(|v| p.variant.as_deref() == Some(v.as_str()))
    }
}

pub fn run(args: PrefetchArgs) -> anyhow::Result<ExitCode> {
    let requested = read_requests(&args)?;
    anyhow::ensure!(
        !requested.is_empty(),
        "nothing to prefetch: give image references or --file FILE"
    );
    let _ = rustls::crypto::ring::default_provider().install_default();
    // The embedded server logs a line per request; on a prefetch that is noise (and it would
    // scribble over the progress bars), so its threads log warnings only unless ENTREPOT_LOG
    // asks for more.
    let quiet = std::env::var_os("ENTREPOT_LOG")
        .is_none()
        .then(|| tracing::dispatcher::get_default(|d| tracing::Dispatch::new(Quiet(d.clone()))));
    let on_start = quiet.clone();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .on_thread_start(move || {
            if let Some(d) = &on_start {
                QUIET_GUARD.with(|g| *g.borrow_mut() = Some(tracing::dispatcher::set_default(d)));
            }
        })
        .on_thread_stop(|| QUIET_GUARD.with(|g| drop(g.borrow_mut().take())))
        .build()
        .context("cannot start the async runtime")?;
    let _quiet = quiet.as_ref().map(tracing::dispatcher::set_default);
    let summary = runtime.block_on(prefetch(args, requested))?;
    print!("{summary}");
    Ok(
        if summary.failed.is_empty() && summary.pin_error.is_none() {
            ExitCode::SUCCESS
        } else {
            ExitCode::FAILURE
        },
    )
}

thread_local! {
    static QUIET_GUARD: RefCell<Option<tracing::dispatcher::DefaultGuard>> =
        const { RefCell::new(None) };
}

/// Forwards to the process's subscriber only warnings, errors and prefetch's own events.
struct Quiet(tracing::Dispatch);

impl Quiet {
    fn lets_through(meta: &tracing::Metadata<'_>) -> bool {
        *meta.level() <= tracing::Level::WARN || meta.target().starts_with(module_path!())
    }
}

impl tracing::Subscriber for Quiet {
    fn register_callsite(
        &self,
        meta: &'static tracing::Metadata<'static>,
    ) -> tracing::subscriber::Interest {
        if Quiet::lets_through(meta) {
            self.0.register_callsite(meta)
        } else {
            tracing::subscriber::Interest::never()
        }
    }
    fn enabled(&self, meta: &tracing::Metadata<'_>) -> bool {
        Quiet::lets_through(meta) && self.0.enabled(meta)
    }
    fn new_span(&self, span: &tracing::span::Attributes<'_>) -> tracing::span::Id {
        self.0.new_span(span)
    }
    fn record(&self, span: &tracing::span::Id, values: &tracing::span::Record<'_>) {
        self.0.record(span, values)
    }
    fn record_follows_from(&self, span: &tracing::span::Id, follows: &tracing::span::Id) {
        self.0.record_follows_from(span, follows)
    }
    fn event(&self, event: &tracing::Event<'_>) {
        self.0.event(event)
    }
    fn enter(&self, span: &tracing::span::Id) {
        self.0.enter(span)
    }
    fn exit(&self, span: &tracing::span::Id) {
        self.0.exit(span)
    }
    fn clone_span(&self, id: &tracing::span::Id) -> tracing::span::Id {
        self.0.clone_span(id)
    }
    fn try_close(&self, id: tracing::span::Id) -> bool {
        self.0.try_close(id)
    }
}

/// One line of the request: the text as given, and what it parsed to.
struct Requested {
    text: String,
    parsed: Result<PinConfig, String>,
}

/// The references from the command line, then from `--file`, duplicates dropped.
fn read_requests(args: &PrefetchArgs) -> anyhow::Result<Vec<Requested>> {
    let mut lines: Vec<String> = args.images.clone();
    if let Some(file) = &args.file {
        let text = std::fs::read_to_string(file)
            .with_context(|| format!("cannot read {}", file.display()))?;
        lines.extend(parse_list(&text));
    }
    // `docker.io/alpine` and `docker.io/library/alpine` are one image: compare parsed.
    let mut seen = HashSet::new();
    Ok(lines
        .into_iter()
        .map(|text| Requested {
            parsed: parse_image_ref(&text),
            text,
        })
        .filter(|r| seen.insert(r.parsed.as_ref().map_or(r.text.clone(), pins::format)))
        .collect())
}

/// The references of an image list: one a line, `#` starts a comment, blank lines ignored.
pub fn parse_list(text: &str) -> Vec<String> {
    text.lines()
        .map(|l| l.split_once('#').map_or(l, |(before, _)| before).trim())
        .filter(|l| !l.is_empty())
        .map(str::to_string)
        .collect()
}

async fn prefetch(args: PrefetchArgs, requested: Vec<Requested>) -> anyhow::Result<Summary> {
    let ui = Ui::new(requested.len() as u64);
    let mut summary = Summary::default();
    let mut todo: Vec<(usize, PinConfig)> = Vec::new();
    let mut failed: Vec<(usize, String)> = Vec::new();
    for (i, r) in requested.iter().enumerate() {
        match &r.parsed {
            Ok(p) => todo.push((i, p.clone())),
            Err(e) => failed.push((i, e.clone())),
        }
    }
    let opts = Options {
        platforms: args.platform.clone(),
        referrers: args.with_referrers,
    };
    let jobs = usize::from(args.jobs);

    let (outcomes, pin_to) = match &args.server {
        None => {
            let mut config = match &args.config {
                Some(path) => Config::load(path)?,
                None => Config::builtin(),
            };
            if let Some(root) = &args.root {
                config.storage.root = root.clone();
            }
            // Pins and tags are kept under the upstream's configured name, not an alias.
            todo.retain_mut(|(i, p)| {
                match config.upstreams.iter().find(|u| u.matches(&p.upstream)) {
                    Some(u) => {
                        p.upstream = u.name.clone();
                        true
                    }
                    None => {
                        let names: Vec<&str> =
                            config.upstreams.iter().map(|u| u.name.as_str()).collect();
                        failed.push((
                            *i,
                            format!(
                                "{:?} names no configured upstream (configured: {})",
                                p.upstream,
                                names.join(", ")
                            ),
                        ));
                        false
                    }
                }
            });
            let root = config.storage.root.clone();
            ui.early_failures(&requested, &failed);
            (
                direct(config, todo, opts, jobs, &ui).await?,
                PinTo::Store(root),
            )
        }
        Some(server) => {
            let base = server.as_str().trim_end_matches('/').to_string();
            let http = client(false)?;
            check_server(&http, &base).await?;
            ui.early_failures(&requested, &failed);
            let fetcher = Fetcher::new(http.clone(), base.clone(), jobs, opts, ui.clone());
            let admin = args
                .admin
                .as_ref()
                .map_or(base, |a| a.as_str().trim_end_matches('/').to_string());
            (fetcher.run(todo).await, PinTo::Server(http, admin))
        }
    };
    ui.finish();
    let pins: Vec<PinConfig> = outcomes
        .iter()
        .filter(|o| o.result.is_ok())
        .map(|o| o.pin.clone())
        .collect();
    if !args.no_pin && !pins.is_empty() {
        match pin_to.pin(&pins).await {
            Ok(()) => summary.pinned = pins.len(),
            Err(e) => summary.pin_error = Some(format!("{e:#}")),
        }
    }

    ui.finish();

    let stats = outcomes.first().map(|o| o.stats.clone());
    let mut rows: Vec<(usize, ImageOutcome)> = outcomes.into_iter().map(|o| (o.index, o)).collect();
    rows.sort_by_key(|(i, _)| *i);
    summary.requested = requested.len();
    for (_, o) in &rows {
        match &o.result {
            Ok(()) if o.all_cached => summary.images_cached += 1,
            Ok(()) => summary.images_fetched += 1,
            Err(e) => failed.push((o.index, e.clone())),
        }
    }
    if let Some(stats) = stats {
        summary.counts = stats.lock().expect("stats lock").clone();
    }
    failed.sort_by_key(|(i, _)| *i);
    summary.failed = failed
        .into_iter()
        .map(|(i, e)| (requested[i].text.clone(), e))
        .collect();
    Ok(summary)
}

/// Direct mode: an embedded server over the configured store, pulled through on loopback, then
/// shut down (so every fill is committed) and the store checked for what was fetched.
async fn direct(
    config: Config,
    todo: Vec<(usize, PinConfig)>,
    opts: Options,
    jobs: usize,
    ui: &Ui,
) -> anyhow::Result<Vec<ImageOutcome>> {
    let server = crate::Server::new(config)?;
    let store = server.store();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .context("cannot bind 127.0.0.1:0 for the embedded server")?;
    let base = format!("http://{}", listener.local_addr()?);
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let served = tokio::spawn(server.run(listener, async {
        let _ = stopped.await;
    }));
    let fetcher = Fetcher::new(client(true)?, base, jobs, opts, ui.clone());
    let mut outcomes = fetcher.run(todo).await;
    let _ = stop.send(());
    served
        .await
        .context("the embedded server panicked")?
        .context("the embedded server failed")?;
    // The server said it stored them; make sure before pinning.
    for o in outcomes.iter_mut().filter(|o| o.result.is_ok()) {
        if let Some(d) = o.digests.iter().find(|d| !store.blob_path(d).is_file()) {
            o.result = Err(format!(
                "{d} was fetched but is not in the store (see the log for storage errors)"
            ));
        }
    }
    Ok(outcomes)
}

/// Where the pins of the prefetched images are recorded.
enum PinTo {
    /// `<root>/meta/pins`, directly.
    Store(PathBuf),
    /// `POST <url>/pins` (the server's operator endpoints).
    Server(reqwest::Client, String),
}

impl PinTo {
    async fn pin(self, pins: &[PinConfig]) -> anyhow::Result<()> {
        match self {
            PinTo::Store(root) => {
                let pins = pins.to_vec();
                tokio::task::spawn_blocking(move || pins::add(&root, &pins))
                    .await?
                    .context("could not record the pins")
            }
            PinTo::Server(http, base) => post_pins(&http, &base, pins).await,
        }
    }
}

fn client(loopback: bool) -> anyhow::Result<reqwest::Client> {
    let mut b = reqwest::Client::builder()
        .user_agent(concat!("entrepot-prefetch/", env!("CARGO_PKG_VERSION")))
        .connect_timeout(CONNECT_TIMEOUT)
        .read_timeout(READ_TIMEOUT);
    if loopback {
        b = b.no_proxy();
    }
    b.build().context("cannot build the HTTP client")
}

/// Fails early, and once, when `--server` does not answer like a registry.
async fn check_server(http: &reqwest::Client, base: &str) -> anyhow::Result<()> {
    let url = format!("{base}/v2/");
    let resp = http
        .get(&url)
        .timeout(Duration::from_secs(30))
        .send()
        .await
        .map_err(|e| anyhow::anyhow!("{url}: {}", error_chain(&e)))?;
    anyhow::ensure!(
        resp.status().is_success(),
        "{url} answered {}: is it an entrepot?",
        resp.status()
    );
    Ok(())
}

async fn post_pins(http: &reqwest::Client, base: &str, pins: &[PinConfig]) -> anyhow::Result<()> {
    let body: String = pins
        .iter()
        .map(|p| format!("{}\n", pins::format(p)))
        .collect();
    let url = format!("{base}/pins");
    let resp = http
        .post(&url)
        .header(reqwest::header::CONTENT_TYPE, "text/plain")
        .body(body)
        .timeout(Duration::from_secs(60))
        .send()
        .await
        .map_err(|e| anyhow::anyhow!("POST {url}: {}", error_chain(&e)))?;
    if !resp.status().is_success() {
        anyhow::bail!("POST {url}: {}", response_error(resp).await);
    }
    Ok(())
}

#[derive(Clone)]
struct Options {
    platforms: Vec<Platform>,
    referrers: bool,
}

/// Counts over the whole run; each digest is counted once.
#[derive(Debug, Clone, Default)]
struct Counts {
    manifests: u64,
    manifests_cached: u64,
    blobs: u64,
    blobs_cached: u64,
    blobs_failed: u64,
    bytes: u64,
    bytes_cached: u64,
    /// Non-distributable (foreign) layers, which registries do not serve.
    skipped: u64,
}

/// What became of one image.
struct ImageOutcome {
    index: usize,
    pin: PinConfig,
    result: Result<(), String>,
    /// Every manifest and blob digest of the image, as fetched.
    digests: Vec<Digest>,
    /// Nothing of it had to be fetched.
    all_cached: bool,
    stats: Arc<Mutex<Counts>>,
}

/// A manifest as received, verified against its digest.
struct Fetched {
    digest: Digest,
    media_type: String,
    body: Bytes,
    cached: bool,
}

/// A blob as received.
#[derive(Clone, Copy)]
struct BlobDone {
    cached: bool,
}

type Shared<T> = Arc<OnceCell<Result<T, String>>>;

/// The pulling side: one per run, shared by the image tasks.
struct Fetcher {
    http: reqwest::Client,
    base: String,
    jobs: Semaphore,
    opts: Options,
    ui: Ui,
    /// One fetch per digest across every image.
    blobs: Mutex<HashMap<Digest, Shared<BlobDone>>>,
    manifests: Mutex<HashMap<Digest, Shared<Arc<Fetched>>>>,
    counted_manifests: Mutex<HashSet<Digest>>,
    skipped: Mutex<HashSet<Digest>>,
    stats: Arc<Mutex<Counts>>,
}

/// Collects what one image is made of while it is walked.
#[derive(Default)]
struct Walk {
    digests: Vec<Digest>,
    errors: Vec<String>,
    all_cached: bool,
}

impl Fetcher {
    fn new(http: reqwest::Client, base: String, jobs: usize, opts: Options, ui: Ui) -> Arc<Self> {
        Arc::new(Fetcher {
            http,
            base,
            jobs: Semaphore::new(jobs),
            opts,
            ui,
            blobs: Mutex::default(),
            manifests: Mutex::default(),
            counted_manifests: Mutex::default(),
            skipped: Mutex::default(),
            stats: Arc::default(),
        })
    }

    /// Runs every image (each a task; the shared `--jobs` bound keeps requests in check) and
    /// returns their outcomes.
    async fn run(self: &Arc<Self>, todo: Vec<(usize, PinConfig)>) -> Vec<ImageOutcome> {
        let mut tasks = JoinSet::new();
        for (index, pin) in todo {
            let me = self.clone();
            tasks.spawn(async move { me.image(index, pin).await });
        }
        let mut out = Vec::new();
        while let Some(done) = tasks.join_next().await {
            match done {
                Ok(o) => out.push(o),
                Err(e) => std::panic::resume_unwind(e.into_panic()),
            }
        }
        out.sort_by_key(|o| o.index);
        out
    }

    async fn image(self: Arc<Self>, index: usize, pin: PinConfig) -> ImageOutcome {
        let label = pins::format(&pin);
        let name = format!("{}/{}", pin.upstream, pin.repo);
        let mut walk = Walk {
            all_cached: true,
            ..Walk::default()
        };
        let top = match &pin.reference {
            Reference::Digest(d) => (d.to_string(), self.manifest(&name, d).await),
            Reference::Tag(t) => {
                let fetched = self.get_manifest(&name, t.as_str(), None).await.map(|m| {
                    let m = Arc::new(m);
                    self.count_manifest(&m);
                    // Whoever meets this digest later (as a child, by digest) takes this one.
                    let _ = self.manifest_cell(&m.digest).set(Ok(m.clone()));
                    m
                });
                (t.as_str().to_string(), fetched)
            }
        };
        match top {
            (_, Ok(top)) => self.visit(&name, top, 0, &mut walk).await,
            (reference, Err(e)) => walk.errors.push(format!("manifest {reference}: {e}")),
        }
        let result = match walk.errors.len() {
            0 => Ok(()),
            1 => Err(walk.errors.remove(0)),
            n => Err(format!("{} (and {} more)", walk.errors[0], n - 1)),
        };
        self.ui.image_done(&label, &result, walk.all_cached);
        ImageOutcome {
            index,
            pin,
            result,
            digests: walk.digests,
            all_cached: walk.all_cached,
            stats: self.stats.clone(),
        }
    }

    /// Records a manifest and fetches what it references: the chosen children of an index, the
    /// config and layers of an image, and the referrers of both when asked.
    fn visit<'a>(
        self: &'a Arc<Self>,
        name: &'a str,
        m: Arc<Fetched>,
        depth: usize,
        walk: &'a mut Walk,
    ) -> BoxFuture<'a, ()> {
        Box::pin(async move {
            walk.digests.push(m.digest.clone());
            walk.all_cached &= m.cached;
            let parsed: ManifestJson = match serde_json::from_slice(&m.body) {
                Ok(p) => p,
                Err(e) => {
                    walk.errors
                        .push(format!("manifest {}: not valid JSON: {e}", m.digest));
                    return;
                }
            };
            let mut children: Vec<Descriptor> = Vec::new();
            if is_index(&m.media_type, &parsed) {
                children = parsed
                    .manifests
                    .iter()
                    .filter(|d| {
                        self.opts.platforms.is_empty()
                            || d.platform
                                .as_ref()
                                .is_some_and(|p| self.opts.platforms.iter().any(|f| f.matches(p)))
                    })
                    .cloned()
                    .collect();
                if children.is_empty() && depth == 0 && !self.opts.platforms.is_empty() {
                    let wanted: Vec<String> = self
                        .opts
                        .platforms
                        .iter()
                        .map(Platform::to_string)
                        .collect();
                    walk.errors.push(format!(
                        "the index {} has no manifest for {}",
                        m.digest,
                        wanted.join(", ")
                    ));
                }
            } else {
                let blobs: Vec<Descriptor> = parsed
                    .config
                    .iter()
                    .chain(&parsed.layers)
                    .chain(&parsed.blobs)
                    .cloned()
                    .collect();
                let fetches = blobs.iter().map(|d| self.blob(name, d));
                for (d, r) in blobs.iter().zip(join_all(fetches).await) {
                    match r {
                        Ok(Some((digest, done))) => {
                            walk.digests.push(digest);
                            walk.all_cached &= done.cached;
                        }
                        Ok(None) => {}
                        Err(e) => walk.errors.push(format!("blob {}: {e}", d.digest)),
                    }
                }
            }
            if self.opts.referrers {
                match self.referrers(name, &m.digest).await {
                    Ok(r) => children.extend(r),
                    Err(e) => walk.errors.push(format!("referrers of {}: {e}", m.digest)),
                }
            }
            if depth >= MAX_DEPTH {
                if !children.is_empty() {
                    walk.errors.push(format!(
                        "manifest {}: nested more than {MAX_DEPTH} levels deep",
                        m.digest
                    ));
                }
                return;
            }
            // Children side by side (each platform's layers in parallel, within --jobs), each
            // walked on its own and then merged.
            let seen = &walk.digests;
            let walks = join_all(children.iter().map(|d| async move {
                let mut sub = Walk {
                    all_cached: true,
                    ..Walk::default()
                };
                let child = match d.digest.parse::<Digest>() {
                    Ok(digest) => self.manifest(name, &digest).await,
                    Err(e) => Err(e.to_string()),
                };
                match child {
                    Ok(child) if seen.contains(&child.digest) => {}
                    Ok(child) => self.visit(name, child, depth + 1, &mut sub).await,
                    Err(e) => sub.errors.push(format!("manifest {}: {e}", d.digest)),
                }
                sub
            }))
            .await;
            for sub in walks {
                walk.digests.extend(sub.digests);
                walk.errors.extend(sub.errors);
                walk.all_cached &= sub.all_cached;
            }
        })
    }

    /// A manifest by digest, fetched once per run whatever asks for it.
    async fn manifest(&self, name: &str, digest: &Digest) -> Result<Arc<Fetched>, String> {
        self.manifest_cell(digest)
            .get_or_init(|| async {
                let m = self
                    .get_manifest(name, &digest.to_string(), Some(digest))
                    .await?;
                let m = Arc::new(m);
                self.count_manifest(&m);
                Ok(m)
            })
            .await
            .clone()
    }

    fn manifest_cell(&self, digest: &Digest) -> Shared<Arc<Fetched>> {
        self.manifests
            .lock()
            .expect("manifests lock")
            .entry(digest.clone())
            .or_default()
            .clone()
    }

    fn count_manifest(&self, m: &Fetched) {
        if self
            .counted_manifests
            .lock()
            .expect("counted lock")
            .insert(m.digest.clone())
        {
            let mut s = self.stats.lock().expect("stats lock");
            s.manifests += 1;
            s.manifests_cached += u64::from(m.cached);
        }
    }

    /// `GET /v2/<name>/manifests/<reference>`, read whole and checked against its digest.
    async fn get_manifest(
        &self,
        name: &str,
        reference: &str,
        expect: Option<&Digest>,
    ) -> Result<Fetched, String> {
        let _permit = self.jobs.acquire().await.map_err(|e| e.to_string())?;
        let url = format!("{}/v2/{name}/manifests/{reference}", self.base);
        let resp = self
            .http
            .get(&url)
            .header(reqwest::header::ACCEPT, ACCEPT)
            .send()
            .await
            .map_err(|e| error_chain(&e))?;
        if !resp.status().is_success() {
            return Err(response_error(resp).await);
        }
        let cached = is_cached(&resp);
        if resp.content_length().is_some_and(|n| n > MAX_MANIFEST) {
            return Err(format!("larger than {}", HumanBytes(MAX_MANIFEST)));
        }
        let header = |n: &str| {
            resp.headers()
                .get(n)
                .and_then(|v| v.to_str().ok())
                .map(str::to_string)
        };
        let content_type = header("content-type");
        let announced = header("docker-content-digest").and_then(|d| d.parse::<Digest>().ok());
        let body = read_capped(resp, MAX_MANIFEST).await?;
        let algorithm = expect
            .or(announced.as_ref())
            .map_or(crate::oci::digest::Algorithm::Sha256, Digest::algorithm);
        let digest = Digest::of(algorithm, &body);
        if let Some(want) = expect.or(announced.as_ref()) {
            if *want != digest {
                return Err(format!("received content hashes to {digest}, not {want}"));
            }
        }
        let media_type = content_type
            .as_deref()
            .map(media::essence)
            .filter(|t| {
                [
                    media::OCI_MANIFEST,
                    media::OCI_INDEX,
                    media::DOCKER_MANIFEST,
                    media::DOCKER_LIST,
                ]
                .contains(t)
            })
            .map(str::to_string)
            .or_else(|| media::sniff(&body))
            .unwrap_or_default();
        if media_type == media::DOCKER_V1_SIGNED {
            return Err("Docker schema 1 manifests are not supported".into());
        }
        Ok(Fetched {
            digest,
            media_type,
            body,
            cached,
        })
    }

    /// A blob by descriptor, fetched once per run whatever asks for it. `None`: skipped (a
    /// non-distributable layer).
    async fn blob(&self, name: &str, d: &Descriptor) -> Result<Option<(Digest, BlobDone)>, String> {
        let digest: Digest = d.digest.parse().map_err(|e| format!("{e}"))?;
        if d.is_foreign() {
            if self
                .skipped
                .lock()
                .expect("skipped lock")
                .insert(digest.clone())
            {
                self.stats.lock().expect("stats lock").skipped += 1;
                self.ui
                    .line(format!("skipped {digest}: a non-distributable layer"));
            }
            return Ok(None);
        }
        let cell = self
            .blobs
            .lock()
            .expect("blobs lock")
            .entry(digest.clone())
            .or_default()
            .clone();
        let done = cell
            .get_or_init(|| async {
                let r = self.get_blob(name, &digest, d.size).await;
                let mut s = self.stats.lock().expect("stats lock");
                s.blobs += 1;
                match &r {
                    Ok((size, done)) => {
                        s.bytes += size;
                        if done.cached {
                            s.blobs_cached += 1;
                            s.bytes_cached += size;
                        }
                    }
                    Err(_) => s.blobs_failed += 1,
                }
                r.map(|(_, done)| done)
            })
            .await
            .clone()?;
        Ok(Some((digest, done)))
    }

    /// `GET /v2/<name>/blobs/<digest>`: a stored blob is taken as it is (the server verified it
    /// when it stored it); anything else is streamed to a sink and checked here too.
    async fn get_blob(
        &self,
        name: &str,
        digest: &Digest,
        size: Option<u64>,
    ) -> Result<(u64, BlobDone), String> {
        let _permit = self.jobs.acquire().await.map_err(|e| e.to_string())?;
        let url = format!("{}/v2/{name}/blobs/{digest}", self.base);
        let resp = self
            .http
            .get(&url)
            .send()
            .await
            .map_err(|e| error_chain(&e))?;
        if !resp.status().is_success() {
            return Err(response_error(resp).await);
        }
        let length = resp.content_length().or(size).unwrap_or(0);
        self.ui.add_total(length);
        if let (Some(want), Some(got)) = (size, resp.content_length()) {
            if want != got {
                return Err(format!("the manifest says {want} bytes, the server {got}"));
            }
        }
        if is_cached(&resp) {
            // Dropping the body closes the connection: nothing more is transferred.
            drop(resp);
            self.ui.bytes(length);
            self.ui
                .line(format!("already cached {digest} ({})", HumanBytes(length)));
            return Ok((length, BlobDone { cached: true }));
        }
        if cache_outcome(&resp) == Some("bypass") {
            return Err("the server could not store it (it served it without caching)".into());
        }
        let bar = self.ui.blob_bar(digest, length);
        let mut resp = resp;
        let mut hasher = Hasher::new(digest.algorithm());
        let mut received: u64 = 0;
        loop {
            match resp.chunk().await {
                Ok(Some(chunk)) => {
                    hasher.update(&chunk);
                    received += chunk.len() as u64;
                    self.ui.bytes(chunk.len() as u64);
                    if let Some(b) = &bar {
                        b.inc(chunk.len() as u64);
                    }
                }
                Ok(None) => break,
                Err(e) => {
                    self.ui.done_bar(bar);
                    // The server breaks a transfer when the upstream fails or sends content
                    // that does not match the digest; its log says which.
                    return Err(format!(
                        "the transfer broke after {received} of {length} bytes \
                         (upstream failure or digest mismatch; see the server's log): {}",
                        error_chain(&e)
                    ));
                }
            }
        }
        self.ui.done_bar(bar);
        let got = hasher.finish();
        if got != *digest {
            return Err(format!("received content hashes to {got}"));
        }
        if size.is_some_and(|s| s != received) {
            return Err(format!("received {received} bytes, expected {length}"));
        }
        self.ui
            .line(format!("fetched {digest} ({})", HumanBytes(received)));
        Ok((received, BlobDone { cached: false }))
    }

    /// The referrers of `digest`: 404 means none (or a registry without the referrers API).
    async fn referrers(&self, name: &str, digest: &Digest) -> Result<Vec<Descriptor>, String> {
        let _permit = self.jobs.acquire().await.map_err(|e| e.to_string())?;
        let url = format!("{}/v2/{name}/referrers/{digest}", self.base);
        let resp = self
            .http
            .get(&url)
            .header(reqwest::header::ACCEPT, media::OCI_INDEX)
            .send()
            .await
            .map_err(|e| error_chain(&e))?;
        if resp.status() == reqwest::StatusCode::NOT_FOUND {
            return Ok(Vec::new());
        }
        if !resp.status().is_success() {
            return Err(response_error(resp).await);
        }
        let body = read_capped(resp, MAX_MANIFEST).await?;
        let index: ManifestJson =
            serde_json::from_slice(&body).map_err(|e| format!("not an image index: {e}"))?;
        Ok(index.manifests)
    }
}

fn is_index(media_type: &str, m: &ManifestJson) -> bool {
    media_type == media::OCI_INDEX
        || media_type == media::DOCKER_LIST
        || (m.config.is_none() && m.layers.is_empty() && !m.manifests.is_empty())
}

fn cache_outcome(resp: &reqwest::Response) -> Option<&str> {
    resp.headers()
        .get(CACHE_HEADER)
        .and_then(|v| v.to_str().ok())
}

/// The server answered from its store (a tag confirmed or served from its last mapping counts).
fn is_cached(resp: &reqwest::Response) -> bool {
    matches!(cache_outcome(resp), Some("hit" | "revalidated" | "stale"))
}

async fn read_capped(mut resp: reqwest::Response, cap: u64) -> Result<Bytes, String> {
    let mut buf = Vec::new();
    while let Some(chunk) = resp.chunk().await.map_err(|e| error_chain(&e))? {
        buf.extend_from_slice(&chunk);
        if buf.len() as u64 > cap {
            return Err(format!("larger than {}", HumanBytes(cap)));
        }
    }
    Ok(Bytes::from(buf))
}

/// `404 Not Found: MANIFEST_UNKNOWN: <message>`, from an OCI error body when there is one.
async fn response_error(resp: reqwest::Response) -> String {
    let status = resp.status();
    let body = read_capped(resp, MAX_ERROR_BODY as u64)
        .await
        .unwrap_or_default();
    #[derive(Deserialize)]
    struct Errors {
        errors: Vec<OciError>,
    }
    #[derive(Deserialize)]
    struct OciError {
        #[serde(default)]
        code: String,
        #[serde(default)]
        message: String,
    }
    let detail = match serde_json::from_slice::<Errors>(&body) {
        Ok(e) if !e.errors.is_empty() => e
            .errors
            .iter()
            .map(|e| format!("{}: {}", e.code, e.message))
            .collect::<Vec<_>>()
            .join("; "),
        _ => String::from_utf8_lossy(&body)
            .lines()
            .next()
            .unwrap_or("")
            .chars()
            .take(200)
            .collect(),
    };
    if detail.is_empty() {
        status.to_string()
    } else {
        format!("{status}: {detail}")
    }
}

/// An error with its causes, `outer: inner: innermost`.
fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut source = e.source();
    while let Some(cause) = source {
        let c = cause.to_string();
        if !s.contains(&c) {
            s.push_str(": ");
            s.push_str(&c);
        }
        source = cause.source();
    }
    s
}

#[derive(Debug, Deserialize, Clone)]
struct Descriptor {
    #[serde(rename = "mediaType", default)]
    media_type: String,
    digest: String,
    #[serde(default)]
    size: Option<u64>,
    #[serde(default)]
    urls: Vec<String>,
    #[serde(default)]
    platform: Option<PlatformJson>,
}

impl Descriptor {
    /// Foreign (Windows base) and non-distributable layers live elsewhere, at their `urls`;
    /// registries do not serve them, and clients fetch them from there.
    fn is_foreign(&self) -> bool {
        !self.urls.is_empty()
            && (self.media_type.contains("foreign") || self.media_type.contains("nondistributable"))
    }
}

#[derive(Debug, Deserialize, Clone)]
struct PlatformJson {
    #[serde(default)]
    os: String,
    #[serde(default)]
    architecture: String,
    #[serde(default)]
    variant: Option<String>,
}

/// The fields of an image manifest, an index or an (older) artifact manifest that name content.
#[derive(Debug, Deserialize)]
struct ManifestJson {
    #[serde(default)]
    manifests: Vec<Descriptor>,
    #[serde(default)]
    config: Option<Descriptor>,
    #[serde(default)]
    layers: Vec<Descriptor>,
    #[serde(default)]
    blobs: Vec<Descriptor>,
}

/// Progress: bars on a terminal, plain lines otherwise.
#[derive(Clone)]
struct Ui(Arc<UiKind>);

enum UiKind {
    Bars {
        multi: MultiProgress,
        images: ProgressBar,
        bytes: ProgressBar,
    },
    Lines,
}

impl Ui {
    fn new(images: u64) -> Ui {
        if !std::io::stdout().is_terminal() {
            return Ui(Arc::new(UiKind::Lines));
        }
        let multi = MultiProgress::with_draw_target(ProgressDrawTarget::stdout());
        let images = multi.add(
            ProgressBar::new(images)
                .with_style(style("{prefix:>8} [{bar:30}] {pos}/{len} {wide_msg}"))
                .with_prefix("images"),
        );
        let bytes = multi.add(
            ProgressBar::new(0)
                .with_style(style(
                    "{prefix:>8} [{bar:30}] {bytes}/{total_bytes} {binary_bytes_per_sec} {elapsed}",
                ))
                .with_prefix("bytes"),
        );
        bytes.enable_steady_tick(Duration::from_millis(250));
        Ui(Arc::new(UiKind::Bars {
            multi,
            images,
            bytes,
        }))
    }

    /// A message: above the bars on a terminal, a plain line otherwise.
    fn line(&self, msg: String) {
        match &*self.0 {
            // Blob by blob is too much detail above the bars; they show it.
            UiKind::Bars { .. } => {}
            UiKind::Lines => println!("{msg}"),
        }
    }

    fn image_done(&self, label: &str, result: &Result<(), String>, cached: bool) {
        let msg = match result {
            Ok(()) if cached => format!("{label}: already cached"),
            Ok(()) => format!("{label}: done"),
            Err(e) => format!("{label}: FAILED: {e}"),
        };
        match &*self.0 {
            UiKind::Bars { multi, images, .. } => {
                images.inc(1);
                if result.is_err() {
                    let _ = multi.println(msg);
                } else {
                    images.set_message(label.to_string());
                }
            }
            UiKind::Lines => println!("{msg}"),
        }
    }

    /// References refused before anything was fetched.
    fn early_failures(&self, requested: &[Requested], failed: &[(usize, String)]) {
        for (i, e) in failed {
            self.image_done(&requested[*i].text, &Err(e.clone()), false);
        }
    }

    fn add_total(&self, n: u64) {
        if let UiKind::Bars { bytes, .. } = &*self.0 {
            bytes.inc_length(n);
        }
    }

    fn bytes(&self, n: u64) {
        if let UiKind::Bars { bytes, .. } = &*self.0 {
            bytes.inc(n);
        }
    }

    /// A bar of its own for a large blob, on a terminal.
    fn blob_bar(&self, digest: &Digest, size: u64) -> Option<ProgressBar> {
        let UiKind::Bars { multi, .. } = &*self.0 else {
            return None;
        };
        if size < BIG_BLOB {
            return None;
        }
        let short = &digest.hex()[..12];
        Some(
            multi.add(
                ProgressBar::new(size)
                    .with_style(style(
                        "{prefix:>8} [{bar:30}] {bytes}/{total_bytes} {binary_bytes_per_sec}",
                    ))
                    .with_prefix(short.to_string()),
            ),
        )
    }

    fn done_bar(&self, bar: Option<ProgressBar>) {
        if let (UiKind::Bars { multi, .. }, Some(bar)) = (&*self.0, bar) {
            bar.finish_and_clear();
            multi.remove(&bar);
        }
    }

    fn finish(&self) {
        if let UiKind::Bars {
            multi,
            images,
            bytes,
        } = &*self.0
        {
            images.finish_and_clear();
            bytes.finish_and_clear();
            let _ = multi.clear();
        }
    }
}

fn style(template: &str) -> ProgressStyle {
    ProgressStyle::with_template(template)
        .expect("valid progress template")
        .progress_chars("=> ")
}

/// The end of a run: a table, then the failures with their reasons.
#[derive(Default)]
struct Summary {
    requested: usize,
    images_fetched: usize,
    images_cached: usize,
    pinned: usize,
    /// Everything was fetched, but the pins could not be recorded.
    pin_error: Option<String>,
    counts: Counts,
    failed: Vec<(String, String)>,
}

impl fmt::Display for Summary {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let c = &self.counts;
        let bytes = |n: u64| HumanBytes(n).to_string();
        let rows: [[String; 5]; 5] = [
            [
                String::new(),
                "total".into(),
                "fetched".into(),
                "already cached".into(),
                "failed".into(),
            ],
            [
                "images".into(),
                self.requested.to_string(),
                self.images_fetched.to_string(),
                self.images_cached.to_string(),
                self.failed.len().to_string(),
            ],
            [
                "manifests".into(),
                c.manifests.to_string(),
                (c.manifests - c.manifests_cached).to_string(),
                c.manifests_cached.to_string(),
                "-".into(),
            ],
            [
                "blobs".into(),
                c.blobs.to_string(),
                (c.blobs - c.blobs_cached - c.blobs_failed).to_string(),
                c.blobs_cached.to_string(),
                c.blobs_failed.to_string(),
            ],
            [
                "bytes".into(),
                bytes(c.bytes),
                bytes(c.bytes - c.bytes_cached),
                bytes(c.bytes_cached),
                "-".into(),
            ],
        ];
        let widths: Vec<usize> = (0..5)
            .map(|col| rows.iter().map(|r| r[col].len()).max().unwrap_or(0))
            .collect();
        writeln!(f)?;
        for row in &rows {
            let mut line = format!("{:<w$}", row[0], w = widths[0]);
            for (cell, w) in row.iter().zip(&widths).skip(1) {
                line.push_str(&format!("  {cell:>w$}"));
            }
            writeln!(f, "{}", line.trim_end())?;
        }
        if c.skipped > 0 {
            writeln!(f, "skipped {} non-distributable layers", c.skipped)?;
        }
        if self.pinned > 0 {
            let s = if self.pinned == 1 { "" } else { "s" };
            writeln!(f, "pinned {} image{s}", self.pinned)?;
        }
        if let Some(e) = &self.pin_error {
            writeln!(f, "pinning failed: {e}")?;
        }
        if !self.failed.is_empty() {
            writeln!(f, "failed:")?;
            for (image, why) in &self.failed {
                writeln!(f, "  {image}: {why}")?;
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn list_files() {
        let text = "# images\n\ndocker.io/library/alpine:3.20  # the base\n  ghcr.io/org/app@sha256:abc\n#x\n";
        assert_eq!(
            parse_list(text),
            [
                "docker.io/library/alpine:3.20",
                "ghcr.io/org/app@sha256:abc"
            ]
        );
    }

    #[test]
    fn platforms() {
        let p: Platform = "linux/arm64".parse().unwrap();
        let entry = |os: &str, arch: &str, v: Option<&str>| PlatformJson {
            os: os.into(),
            architecture: arch.into(),
            variant: v.map(str::to_string),
        };
        assert!(p.matches(&entry("linux", "arm64", Some("v8"))));
        assert!(!p.matches(&entry("linux", "amd64", None)));
        let v7: Platform = "linux/arm/v7".parse().unwrap();
        assert!(v7.matches(&entry("linux", "arm", Some("v7"))));
        assert!(!v7.matches(&entry("linux", "arm", Some("v6"))));
        assert!(!v7.matches(&entry("linux", "arm", None)));
        assert!("linux".parse::<Platform>().is_err());
        assert!("linux//x".parse::<Platform>().is_err());
        assert_eq!(v7.to_string(), "linux/arm/v7");
    }

    #[test]
    fn summary_table() {
        let s = Summary {
            requested: 3,
            images_fetched: 1,
            images_cached: 1,
            pinned: 2,
            pin_error: None,
            counts: Counts {
                manifests: 2,
                manifests_cached: 1,
                blobs: 5,
                blobs_cached: 2,
                blobs_failed: 0,
                bytes: 3 << 20,
                bytes_cached: 1 << 20,
                skipped: 0,
            },
            failed: vec![(
                "up/x:1".into(),
                "404 Not Found: MANIFEST_UNKNOWN: nope".into(),
            )],
        };
        let text = s.to_string();
        let row = |label: &str| -> Vec<&str> {
            let line = text.lines().find(|l| l.starts_with(label)).unwrap();
            line.split_whitespace().collect()
        };
        assert_eq!(row("blobs"), ["blobs", "5", "3", "2", "0"], "{text}");
        assert_eq!(row("bytes")[1..3], ["3.00", "MiB"], "{text}");
        assert!(text.lines().next().unwrap().is_empty(), "{text}");
        assert!(text.contains("up/x:1: 404 Not Found"), "{text}");
    }
}
