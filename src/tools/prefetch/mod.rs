//! `entrepot prefetch`: fill the store ahead of need, through the same fill path as a pull.
//!
//! Prefetch is a registry client. In direct mode it starts an entrepot server on `127.0.0.1:0`
//! over the configured store and pulls through it; with `--server` it pulls through a running
//! one. Either way every blob goes through the server's fills (verified, committed atomically,
//! one upstream fetch per digest), and prefetch checks again what it receives. Within a run each
//! digest is asked for once, whatever the number of images that share it; across runs the server
//! answers stored content with `X-Entrepot-Cache: hit`, so a second run transfers nothing it
//! already has.

use std::collections::HashSet;
use std::fmt;
use std::path::PathBuf;
use std::process::ExitCode;
use std::str::FromStr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Context as _;
use serde::Deserialize;

use crate::cache::{pins, Store};
use crate::config::{parse_image_ref, Config, PinConfig};
use crate::oci::Digest;
use fetcher::{error_chain, response_error, Fetcher};
use summary::{Counts, Summary};
use ui::{Quiet, Ui, QUIET_GUARD};

mod fetcher;
mod summary;
mod ui;

/// The start of the tracing targets of prefetch's own events, which [`Quiet`] lets through.
const LOG_TARGET: &str = module_path!();
/// Longest silence while a response streams (the server itself waits up to its upstream's
/// `read_timeout` before giving up on a stalled fill).
const READ_TIMEOUT: Duration = Duration::from_secs(300);
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

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
    /// Also fetch the referrers (signatures, SBOMs, attestations) of every manifest, and its
    /// sha256-<hex> tag-schema and cosign (.sig, .att, .sbom) tags where the upstream has them;
    /// they are pinned with the image.
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
            ui.early_failures(&requested, &failed);
            let (outcomes, store) = direct(config, todo, opts, jobs, &ui).await?;
            (outcomes, PinTo::Store(store))
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
    let done = || outcomes.iter().filter(|o| o.result.is_ok());
    // An image's referrers and signature tags are pinned with it (and counted as part of it).
    let pins: Vec<PinConfig> = done()
        .flat_map(|o| std::iter::once(&o.pin).chain(&o.artifacts))
        .cloned()
        .collect();
    if !args.no_pin && !pins.is_empty() {
        match pin_to.pin(&pins).await {
            Ok(()) => summary.pinned = done().count(),
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
) -> anyhow::Result<(Vec<ImageOutcome>, Arc<Store>)> {
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
        for d in &o.digests {
            if !store.has_blob(d).await? {
                o.result = Err(format!(
                    "{d} was fetched but is not in the store (see the log for storage errors)"
                ));
                break;
            }
        }
    }
    Ok((outcomes, store))
}

/// Where the pins of the prefetched images are recorded.
enum PinTo {
    /// The store's pins, directly (the store is still held, and locked).
    Store(Arc<Store>),
    /// `POST <url>/pins` (the server's operator endpoints).
    Server(reqwest::Client, String),
}

impl PinTo {
    async fn pin(self, pins: &[PinConfig]) -> anyhow::Result<()> {
        match self {
            PinTo::Store(store) => store
                .add_pins(pins)
                .await
                .context("could not record the pins"),
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

/// What became of one image.
struct ImageOutcome {
    index: usize,
    pin: PinConfig,
    result: Result<(), String>,
    /// Every manifest and blob digest of the image, as fetched.
    digests: Vec<Digest>,
    /// Its referrers (by digest) and signature tags, as found with `--with-referrers`.
    artifacts: Vec<PinConfig>,
    /// Nothing of it had to be fetched.
    all_cached: bool,
    stats: Arc<Mutex<Counts>>,
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
}
