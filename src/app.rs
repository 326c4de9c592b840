//! The server: binds nothing itself (it takes a bound listener, so tests use port 0), serves
//! HTTP/1.1 and h2c (or both over TLS with `[server.tls]`), tracks every task it spawns, and
//! shuts down by draining: stop accepting, let requests and fills finish for the grace period,
//! then cancel what is left.

use std::convert::Infallible;
use std::future::Future;
use std::io;
use std::sync::Arc;
use std::time::Duration;

use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulShutdown;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::cache::Store;
use crate::clock::Clock;
use crate::config::{Config, StorageBackend};
use crate::http::{self, AppState};
use crate::server_tls::ServerTls;
use crate::upstream::Upstreams;

/// How often histogram buckets of the metrics recorder are rolled over.
const METRICS_UPKEEP: Duration = Duration::from_secs(5);
/// How often an idle process returns the memory its allocator keeps for streaming (`sys`).
const MEMORY_RELEASE: Duration = Duration::from_secs(30);

/// After the grace period, how long cancelled fills get to clean up their temp files. A stop
/// takes at most `shutdown_grace` + this: deploy/systemd/entrepot.service's TimeoutStopSec
/// outlasts both (tests/deploy_systemd.rs).
pub const CANCEL_WAIT: Duration = Duration::from_secs(5);

#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("cannot open the store at {root}: {source}")]
    Store { root: String, source: io::Error },
    #[error("cannot build the upstream client: {0}")]
    Client(#[from] reqwest::Error),
    /// A `[server.tls]` file changed between the configuration check and start-up.
    #[error("{key}: {source}", key = .source.key())]
    Tls {
        #[from]
        source: crate::server_tls::LoadError,
    },
}

pub struct Server {
    state: Arc<AppState>,
    clock: Clock,
    tracker: TaskTracker,
    /// Fired after the grace period: cancels fills still running.
    cancel: CancellationToken,
    /// Fired when shutdown begins: stops background work (sweeper, metrics upkeep).
    stopping: CancellationToken,
    /// `[server.tls]`: the registry listener's certificate; `None` serves plain HTTP.
    tls: Option<Arc<ServerTls>>,
}

/// How connections are served: HTTP/1.1 and h2c, with the limits that keep a slow or hostile
/// client from holding connections or memory.
fn connection_builder(cfg: &crate::config::ServerConfig) -> auto::Builder<TokioExecutor> {
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(hyper_util::rt::TokioTimer::new())
        .header_read_timeout(cfg.header_read_timeout)
        // Request line and headers (and nothing else: bodies are refused) fit in this.
        .max_buf_size(MAX_REQUEST_HEAD);
    builder
        .http2()
        .timer(hyper_util::rt::TokioTimer::new())
        .max_concurrent_streams(MAX_STREAMS_PER_CONNECTION)
        .max_header_list_size(MAX_REQUEST_HEAD as u32)
        .keep_alive_interval(Some(Duration::from_secs(30)));
    builder
}

/// Largest request head (request line and headers) accepted.
const MAX_REQUEST_HEAD: usize = 64 * 1024;
/// Streams one HTTP/2 connection may have open at once.
const MAX_STREAMS_PER_CONNECTION: u32 = 256;

/// The store of the configured backend.
fn open_store(
    config: &Config,
    clock: &Clock,
    tracker: &TaskTracker,
    cancel: &CancellationToken,
) -> io::Result<Store> {
    let storage = &config.storage;
    match &storage.backend {
        StorageBackend::Fs => Store::open(
            &storage.root,
            storage.max_size,
            clock.clone(),
            tracker.clone(),
            cancel.clone(),
        ),
        StorageBackend::S3(s3) => {
            let bucket = Arc::new(crate::cache::backend::s3::S3::new(s3)?);
            Store::with_backends(
                &storage.root,
                bucket.clone(),
                bucket,
                storage.max_size,
                clock.clone(),
                tracker.clone(),
                cancel.clone(),
            )
        }
    }
}

impl Server {
    /// Opens the store (emptying its temp folder) and builds the upstream clients. Contacts no
    /// upstream: entrepot starts and serves its cache when every upstream is unreachable.
    pub fn new(config: Config) -> Result<Server, StartError> {
        let clock = Clock::default();
        let tracker = TaskTracker::new();
        let cancel = CancellationToken::new();
        let store =
            open_store(&config, &clock, &tracker, &cancel).map_err(|source| StartError::Store {
                root: config.storage.root.display().to_string(),
                source,
            })?;
        let upstreams = Upstreams::new(&config.upstreams, clock.clone(), config.server.offline)?;
        let cluster = config
            .cluster
            .clone()
            .map(crate::cluster::Cluster::new)
            .transpose()?;
        let metrics = crate::metrics::install();
        crate::metrics::cache_max(config.storage.max_size);
        // The handshake counts against the header read timeout: a client that opens a
        // connection and stalls in the handshake holds its slot no longer than one that stalls
        // in its request head.
        let tls = config
            .server
            .tls
            .clone()
            .map(|files| ServerTls::new(files, config.server.header_read_timeout).map(Arc::new))
            .transpose()?;
        Ok(Server {
            state: Arc::new(AppState {
                admin_on_main: config.server.admin_listen.is_none(),
                config,
                store: Arc::new(store),
                upstreams,
                manifest_flights: Default::default(),
                metrics,
                cluster,
                fanouts: crate::cluster::fanout::Fanouts::new(tracker.clone()),
                ui: Default::default(),
            }),
            clock,
            tracker,
            cancel,
            stopping: CancellationToken::new(),
            tls,
        })
    }

    /// The listener's TLS side, when `[server.tls]` is set: `request_reload` re-reads its
    /// files (the binary calls it on SIGHUP).
    pub fn tls(&self) -> Option<Arc<ServerTls>> {
        self.tls.clone()
    }

    /// The clock tag freshness and token expiry use; tests advance it.
    pub fn clock(&self) -> Clock {
        self.clock.clone()
    }

    pub fn store(&self) -> Arc<Store> {
        self.state.store.clone()
    }

    /// Serves `listener` until `shutdown` resolves, then drains. Operator endpoints are served
    /// on it too (configurations without `admin_listen`).
    pub async fn run(
        self,
        listener: TcpListener,
        shutdown: impl Future<Output = ()>,
    ) -> io::Result<()> {
        self.run_with_admin(listener, None, shutdown).await
    }

    /// Like `run`, with a separate listener for `/metrics`, `/healthz` and `/readyz` (bound by
    /// the caller from `server.admin_listen`).
    pub async fn run_with_admin(
        self,
        listener: TcpListener,
        admin: Option<TcpListener>,
        shutdown: impl Future<Output = ()>,
    ) -> io::Result<()> {
        let builder = connection_builder(&self.state.config.server);
        let graceful = GracefulShutdown::new();
        // A permit per connection served: past the cap, connections wait in the backlog.
        let slots = Arc::new(tokio::sync::Semaphore::new(
            self.state.config.server.max_connections,
        ));
        // Before the first request: a store from before scoped reads keeps serving its images.
        if let Err(e) = self.state.store.link_existing_tags().await {
            tracing::warn!(error = %e, "could not link the store's tagged images");
        }
        self.spawn_background();
        if let Some(admin) = admin {
            self.tracker.spawn(serve_admin(
                admin,
                self.state.clone(),
                self.tracker.clone(),
                self.stopping.clone(),
            ));
        }
        tokio::pin!(shutdown);
        loop {
            let slot = tokio::select! {
                slot = slots.clone().acquire_owned() => slot.expect("the semaphore is never closed"),
                _ = &mut shutdown => break,
            };
            tokio::select! {
                accepted = listener.accept() => match accepted {
                    Ok((stream, remote)) => {
                        let _ = stream.set_nodelay(true);
                        let state = self.state.clone();
                        let svc = service_fn(move |req| {
                            let state = state.clone();
                            async move { Ok::<_, Infallible>(http::handle(state, req, remote).await) }
                        });
                        match &self.tls {
                            None => {
                                let conn = builder
                                    .serve_connection(TokioIo::new(crate::http::conn::Conn::new(stream)), svc)
                                    .into_owned();
                                let conn = graceful.watch(conn);
                                self.tracker.spawn(async move {
                                    let _slot = slot;
                                    if let Err(e) = conn.await {
                                        tracing::debug!(remote = %remote, error = %e, "connection ended with an error");
                                    }
                                });
                            }
                            // The handshake runs in the connection's task, holding its slot:
                            // the accept loop never waits on a client. The watcher is taken
                            // now, so a shutdown that begins mid-handshake still reaches it.
                            Some(tls) => {
                                let serve = tls.clone().serve(
                                    stream,
                                    remote,
                                    builder.clone(),
                                    graceful.watcher(),
                                    svc,
                                );
                                self.tracker.spawn(async move {
                                    let _slot = slot;
                                    serve.await;
                                });
                            }
                        }
                    }
                    Err(e) => {
                        // Out of file descriptors and the like: back off instead of spinning.
                        tracing::warn!(error = %e, "accept failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                    }
                },
                _ = &mut shutdown => break,
            }
        }
        self.stopping.cancel();
        drop(listener);
        let grace = self.state.config.server.shutdown_grace;
        let store = self.state.store.clone();
        tracing::info!(
            grace_ms = grace.as_millis() as u64,
            fills = store.fills_in_progress(),
            "shutting down: no new connections; draining requests and fills"
        );
        self.tracker.close();
        let drained = tokio::time::timeout(grace, async {
            graceful.shutdown().await;
            self.tracker.wait().await;
        })
        .await;
        if drained.is_err() {
            tracing::warn!(
                fills = store.fills_in_progress(),
                tasks = self.tracker.len(),
                "grace period over: cancelling fills still running (their temp files are removed)"
            );
            self.cancel.cancel();
            if tokio::time::timeout(CANCEL_WAIT, self.tracker.wait())
                .await
                .is_err()
            {
                tracing::warn!(tasks = self.tracker.len(), "tasks still running at exit");
            }
        }
        tracing::info!("stopped");
        Ok(())
    }
}

impl Server {
    /// Background work, tracked and stopped when shutdown begins.
    fn spawn_background(&self) {
        let cfg = &self.state.config;
        let upstreams = cfg.upstreams.clone();
        let names: Arc<dyn Fn(&str) -> String + Send + Sync> = Arc::new(move |n: &str| {
            upstreams
                .iter()
                .find(|u| u.matches(n))
                .map_or_else(|| n.to_string(), |u| u.name.clone())
        });
        // Several replicas on one bucket: the one that owns the task sweeps it.
        let leads: crate::cache::evict::Leads = match &self.state.cluster {
            Some(c) => {
                let c = c.clone();
                Arc::new(move || c.leads("bucket-sweeps"))
            }
            None => Arc::new(|| true),
        };
        self.tracker.spawn(crate::cache::evict::sweeper(
            self.state.store.clone(),
            cfg.storage.clone(),
            cfg.pins.clone(),
            names,
            leads,
            self.stopping.clone(),
        ));
        if let Some(cluster) = &self.state.cluster {
            self.tracker
                .spawn(cluster.clone().run(self.stopping.clone()));
        }
        if let Some(auth) = &cfg.auth {
            self.tracker
                .spawn(auth.clone().watch(self.stopping.clone()));
        }
        if let Some(tls) = &self.tls {
            self.tracker.spawn(
                tls.clone()
                    .watch(crate::server_tls::WATCH_INTERVAL, self.stopping.clone()),
            );
        }
        let store = self.state.store.clone();
        let every = store.generation_check_interval();
        self.tracker
            .spawn(store.watch_generation(every, self.stopping.clone()));
        // The allocator keeps freed stream buffers for the next fill (`sys`); a process with
        // nothing streaming gives them back.
        let store = self.state.store.clone();
        let stopping = self.stopping.clone();
        self.tracker.spawn(async move {
            let mut tick = tokio::time::interval(MEMORY_RELEASE);
            loop {
                tokio::select! {
                    _ = tick.tick() => if store.fills_in_progress() == 0 {
                        let _ = tokio::task::spawn_blocking(crate::sys::release_memory).await;
                    },
                    _ = stopping.cancelled() => break,
                }
            }
        });
        let handle = self.state.metrics.clone();
        let stopping = self.stopping.clone();
        self.tracker.spawn(async move {
            let mut tick = tokio::time::interval(METRICS_UPKEEP);
            loop {
                tokio::select! {
                    _ = tick.tick() => handle.run_upkeep(),
                    _ = stopping.cancelled() => break,
                }
            }
        });
    }
}

/// The operator listener: `/metrics`, `/healthz`, `/readyz`, `/pins` and the status page
/// (`/ui/`), nothing else.
async fn serve_admin(
    listener: TcpListener,
    state: Arc<AppState>,
    tracker: TaskTracker,
    stopping: CancellationToken,
) {
    let builder = connection_builder(&state.config.server);
    loop {
        let (stream, _) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    tracing::warn!(error = %e, "admin accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ = stopping.cancelled() => return,
        };
        let state = state.clone();
        let svc = service_fn(move |req: hyper::Request<hyper::body::Incoming>| {
            let state = state.clone();
            async move {
                let head = req.method() == hyper::Method::HEAD;
                let (parts, body) = req.into_parts();
                let req = hyper::Request::from_parts(parts, ());
                let served = match crate::ui::serve(&state, &req).await {
                    Some(r) => Some(r),
                    None => {
                        http::admin::serve(&state, req.method(), req.uri().path(), move || {
                            http::read_small_body(body)
                        })
                        .await
                    }
                };
                let resp = match served {
                    Some(r) => r,
                    None => crate::error::ApiError::Route(crate::oci::RouteError::NotFound)
                        .into_response(crate::oci::Kind::Other, head),
                };
                Ok::<_, Infallible>(resp)
            }
        });
        let conn = builder
            .serve_connection(TokioIo::new(stream), svc)
            .into_owned();
        let stopping = stopping.clone();
        tracker.spawn(async move {
            tokio::select! {
                _ = conn => {}
                _ = stopping.cancelled() => {}
            }
        });
    }
}
