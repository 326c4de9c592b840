//! The `entrepot` command line.

use std::net::SocketAddr;
use std::path::PathBuf;

use anyhow::Context as _;
use clap::{Parser, Subcommand, ValueEnum};
use entrepot::{Config, Server};
use tracing_subscriber::EnvFilter;

/// A pull-through caching proxy for OCI / Docker container registries.
#[derive(Parser)]
#[command(name = "entrepot", version, about, long_about = None)]
struct Cli {
    /// Log format: human-readable text or one JSON object per line.
    #[arg(long, value_enum, default_value_t = LogFormat::Text, global = true)]
    log_format: LogFormat,
    #[command(subcommand)]
    command: Command,
}

#[derive(Clone, Copy, ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

#[derive(Subcommand)]
enum Command {
    /// Serve the registry API. Without --config: listens on 0.0.0.0:5000, stores under
    /// ./entrepot-data and proxies docker.io (the default for bare names), ghcr.io, quay.io,
    /// registry.k8s.io and gcr.io.
    Serve {
        /// TOML configuration file (see config.example.toml).
        #[arg(long, short, value_name = "FILE")]
        config: Option<PathBuf>,
        /// Listen address; overrides [server] listen.
        #[arg(long, value_name = "ADDR")]
        listen: Option<SocketAddr>,
        /// Store directory; overrides [storage] root.
        #[arg(long, value_name = "DIR")]
        root: Option<PathBuf>,
        /// Never contact an upstream: serve the store only (air-gapped sites); same as
        /// [server] offline = true.
        #[arg(long)]
        offline: bool,
    },
    /// Inspect and maintain the store folder (works with or without a running server).
    Cache {
        #[command(flatten)]
        store: entrepot::tools::maintenance::StoreArgs,
        #[command(subcommand)]
        action: CacheAction,
    },
    /// Fill the store ahead of need: images (all platforms by default) are fetched through the
    /// same verified fill path as a pull, and pinned.
    Prefetch(entrepot::tools::prefetch::PrefetchArgs),
    /// Write images from the store as an OCI image layout tar (for an air-gapped site).
    Export(entrepot::tools::bundle::ExportArgs),
    /// Verify and load a bundle written by `entrepot export` into the store.
    Import(entrepot::tools::bundle::ImportArgs),
    /// Check a configuration file and print the upstreams it defines.
    CheckConfig {
        /// TOML configuration file.
        #[arg(value_name = "FILE")]
        config: PathBuf,
    },
}

#[derive(Subcommand)]
enum CacheAction {
    /// List tags and images with their size and last use.
    Ls,
    /// Remove a tag (registry/repo:tag) or an image (registry/repo@digest) and the blobs no
    /// other image uses.
    Rm {
        /// For example docker.io/library/alpine:3.20
        #[arg(value_name = "REF")]
        reference: String,
    },
    /// Re-hash every blob; move corrupt ones to <root>/quarantine. Exits 1 if any was corrupt.
    Verify,
    /// Evict least recently used images (never pinned ones) down to a size now.
    Gc {
        /// Target size, e.g. 50GiB (default: the configuration's storage.low_water).
        #[arg(long, value_name = "SIZE", value_parser = parse_size_arg)]
        to: Option<u64>,
    },
}

fn parse_size_arg(s: &str) -> Result<u64, String> {
    entrepot::config::parse_size(s).ok_or_else(|| format!("{s:?} is not a size like 50GiB"))
}

fn cache_command(
    store: entrepot::tools::maintenance::StoreArgs,
    action: CacheAction,
) -> anyhow::Result<std::process::ExitCode> {
    use entrepot::tools::maintenance;
    let target = store.target()?;
    let mut out = std::io::stdout().lock();
    match action {
        CacheAction::Ls => maintenance::ls(&target, &mut out)?,
        CacheAction::Rm { reference } => maintenance::rm(&target, &reference, &mut out)?,
        CacheAction::Verify => {
            if maintenance::verify(&target, &mut out)? > 0 {
                return Ok(std::process::ExitCode::from(1));
            }
        }
        CacheAction::Gc { to } => maintenance::gc(&target, to, &mut out)?,
    }
    Ok(std::process::ExitCode::SUCCESS)
}

fn init_tracing(format: LogFormat) {
    let filter = EnvFilter::try_from_env("ENTREPOT_LOG").unwrap_or_else(|_| EnvFilter::new("info"));
    // Colours only on a terminal: log files and collectors get plain `key=value` text.
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr())
        && std::env::var_os("NO_COLOR").is_none();
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(ansi)
        .with_writer(entrepot::logging::Output::stderr());
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}

fn main() -> anyhow::Result<std::process::ExitCode> {
    entrepot::sys::tune_allocator();
    entrepot::sys::raise_fd_limit();
    let cli = Cli::parse();
    init_tracing(cli.log_format);
    // Access lines held for a moment under load are written before main returns or a panic.
    let _logs = entrepot::logging::FlushOnDrop;
    entrepot::logging::flush_on_panic();
    match cli.command {
        Command::Serve {
            config,
            listen,
            root,
            offline,
        } => {
            let mut cfg = match &config {
                Some(path) => Config::load(path)?,
                None => Config::builtin(),
            };
            if let Some(l) = listen {
                cfg.server.listen = l;
            }
            if let Some(r) = root {
                cfg.storage.root = r;
            }
            cfg.server.offline |= offline;
            tokio::runtime::Builder::new_multi_thread()
                .enable_all()
                .build()?
                .block_on(serve(cfg))?;
            Ok(std::process::ExitCode::SUCCESS)
        }
        Command::Prefetch(args) => entrepot::tools::prefetch::run(args),
        Command::Export(args) => entrepot::tools::bundle::export(args),
        Command::Import(args) => entrepot::tools::bundle::import(args),
        Command::Cache { store, action } => cache_command(store, action),
        Command::CheckConfig { config } => {
            let cfg = Config::load(&config)?;
            for u in &cfg.upstreams {
                println!(
                    "{}\t{}{}",
                    u.name,
                    u.url,
                    if u.default { "\t(default)" } else { "" }
                );
            }
            Ok(std::process::ExitCode::SUCCESS)
        }
    }
}

async fn serve(cfg: Config) -> anyhow::Result<()> {
    let listen = cfg.server.listen;
    let admin_listen = cfg.server.admin_listen;
    let server = Server::new(cfg)?;
    let server_tls = server.tls();
    let listener = tokio::net::TcpListener::bind(listen)
        .await
        .with_context(|| format!("cannot listen on {listen}"))?;
    tracing::info!(addr = %listener.local_addr()?, "listening");
    let admin = match admin_listen {
        Some(a) => {
            let l = tokio::net::TcpListener::bind(a)
                .await
                .with_context(|| format!("cannot listen on {a} (server.admin_listen)"))?;
            tracing::info!(admin_addr = %l.local_addr()?, "operator endpoints listening");
            Some(l)
        }
        None => None,
    };
    let run = server.run_with_admin(listener, admin, shutdown_signal());
    match tls_reload_requests(&server_tls)? {
        // Runs beside the server, in this task: nothing to stop when the server returns.
        Some(reloads) => tokio::select! {
            ran = run => ran?,
            never = reloads => match never {},
        },
        None => run.await?,
    }
    Ok(())
}

/// With `[server.tls]`, a future that asks for a reload of its files on every SIGHUP and never
/// ends. The handler is installed before the server answers anything; without TLS, SIGHUP keeps
/// its default action.
fn tls_reload_requests(
    tls: &Option<std::sync::Arc<entrepot::server_tls::ServerTls>>,
) -> anyhow::Result<Option<impl std::future::Future<Output = std::convert::Infallible>>> {
    let Some(tls) = tls.clone() else {
        return Ok(None);
    };
    #[cfg(unix)]
    let mut hangups = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())
        .context("cannot handle SIGHUP ([server.tls] reloads)")?;
    Ok(Some(async move {
        loop {
            #[cfg(unix)]
            if hangups.recv().await.is_some() {
                tracing::info!("SIGHUP received: reloading the TLS files");
                tls.request_reload();
                continue;
            }
            // No more signals can come (or, off unix, none ever will): only the file watch reloads.
            std::future::pending::<()>().await;
        }
    }))
}

/// Resolves on SIGINT or SIGTERM.
async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => tracing::info!("SIGINT received"),
        _ = term => tracing::info!("SIGTERM received"),
    }
}
