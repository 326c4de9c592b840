//! entrepot itself, started in-process on 127.0.0.1:0 for behaviour tests.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use entrepot::cache::Store;
use entrepot::clock::Clock;
use entrepot::{Config, Server};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

pub struct Proxy {
    pub url: String,
    pub clock: Clock,
    pub store: Arc<Store>,
    pub root: PathBuf,
    shutdown: Option<oneshot::Sender<()>>,
    handle: Option<JoinHandle<std::io::Result<()>>>,
    _dir: Option<tempfile::TempDir>,
}

impl Proxy {
    /// Starts entrepot with these `[[upstream]]` tables and a fresh store.
    pub async fn start(upstreams: &str) -> Proxy {
        Proxy::start_with("", upstreams).await
    }

    /// Starts entrepot with extra `[storage]` keys and a fresh store.
    pub async fn start_with(storage_extra: &str, upstreams: &str) -> Proxy {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("store");
        let mut p = Proxy::start_config(storage_extra, upstreams, &root).await;
        p._dir = Some(dir);
        p
    }

    /// Starts entrepot on an existing store folder (a restart).
    pub async fn start_at(upstreams: &str, root: &Path) -> Proxy {
        Proxy::start_config("", upstreams, root).await
    }

    /// Starts entrepot on `root` with extra `[server]` keys (e.g. `offline = true`).
    pub async fn start_with_server(server_extra: &str, upstreams: &str, root: &Path) -> Proxy {
        Proxy::start_full(server_extra, "", upstreams, root).await
    }

    async fn start_config(storage_extra: &str, upstreams: &str, root: &Path) -> Proxy {
        Proxy::start_full("", storage_extra, upstreams, root).await
    }

    async fn start_full(
        server_extra: &str,
        storage_extra: &str,
        upstreams: &str,
        root: &Path,
    ) -> Proxy {
        super::install_crypto();
        let text = format!(
            "[server]\nlisten = \"127.0.0.1:0\"\nshutdown_grace = \"2s\"\n{server_extra}\n[storage]\nroot = \"{}\"\n{storage_extra}\n{upstreams}",
            root.display()
        );
        let config = Config::parse(&text).expect("test config is valid");
        let server = Server::new(config).expect("server starts");
        let clock = server.clock();
        let store = server.store();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let (tx, rx) = oneshot::channel::<()>();
        let handle = tokio::spawn(server.run(listener, async {
            let _ = rx.await;
        }));
        Proxy {
            url,
            clock,
            store,
            root: root.to_path_buf(),
            shutdown: Some(tx),
            handle: Some(handle),
            _dir: None,
        }
    }

    /// Pulls an image through the proxy: its manifest by tag, then its config and every layer,
    /// checking every byte against its digest.
    pub async fn pull_image(&self, repo: &str, tag: &str) -> Result<(), String> {
        let c = super::client();
        let r = c
            .get(self.url(&format!("/v2/{repo}/manifests/{tag}")))
            .header("Accept", super::OCI_MANIFEST)
            .send()
            .await
            .map_err(|e| e.to_string())?;
        if r.status() != 200 {
            return Err(format!("{repo}:{tag} manifest: {}", r.status()));
        }
        let m: serde_json::Value = serde_json::from_slice(&r.bytes().await.unwrap()).unwrap();
        let mut digests = vec![m["config"]["digest"].as_str().unwrap().to_string()];
        for l in m["layers"].as_array().unwrap() {
            digests.push(l["digest"].as_str().unwrap().to_string());
        }
        for d in digests {
            super::get_blob(&c, &self.url(&format!("/v2/{repo}/blobs/{d}")), &d)
                .await
                .map_err(|e| format!("{repo}:{tag}: {e:#}"))?;
        }
        Ok(())
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.url)
    }

    /// `GET <path>` with a fresh test client; panics if there is no answer.
    pub async fn get(&self, path: &str) -> reqwest::Response {
        super::client().get(self.url(path)).send().await.unwrap()
    }

    /// `HEAD <path>` with a fresh test client; panics if there is no answer.
    pub async fn head(&self, path: &str) -> reqwest::Response {
        super::client().head(self.url(path)).send().await.unwrap()
    }

    pub fn blob_path(&self, digest: &str) -> PathBuf {
        let (alg, hex) = digest.split_once(':').unwrap();
        self.root.join("blobs").join(alg).join(hex)
    }

    /// Waits (bounded) until the blob is committed to the store, and returns its bytes.
    pub async fn wait_cached(&self, digest: &str) -> Vec<u8> {
        let path = self.blob_path(digest);
        let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
        loop {
            if let Ok(bytes) = std::fs::read(&path) {
                if self.store.fills_in_progress() == 0 {
                    return bytes;
                }
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "blob {digest} was not cached in time"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Waits (bounded) until no fill is running.
    pub async fn wait_idle(&self) {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
        while self.store.fills_in_progress() > 0 {
            assert!(
                tokio::time::Instant::now() < deadline,
                "fills still running"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    pub fn tmp_entries(&self) -> Vec<String> {
        std::fs::read_dir(self.root.join("tmp"))
            .map(|d| {
                d.filter_map(|e| e.ok())
                    .map(|e| e.file_name().to_string_lossy().into_owned())
                    .collect()
            })
            .unwrap_or_default()
    }

    /// Signals shutdown and waits for the server to drain.
    pub async fn stop(mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        if let Some(h) = self.handle.take() {
            h.await.unwrap().unwrap();
        }
    }

    /// Sends the shutdown signal without waiting; returns the server's join handle.
    pub fn begin_shutdown(&mut self) -> JoinHandle<std::io::Result<()>> {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        self.handle.take().unwrap()
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        if let Some(h) = self.handle.take() {
            h.abort();
        }
    }
}
