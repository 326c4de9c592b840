//! The status page in a real browser (issue 14): Debian's headless `chromium`, driven over the
//! DevTools protocol. The overview loads without a console error, shows the hit ratio after a
//! warm pull, and a fill's progress bar moving while a slow upstream releases bytes; the image
//! page lists an index's platforms. With `ENTREPOT_UPDATE_SCREENSHOTS=1` the test saves both
//! pages as `docs/ui-overview.png` and `docs/ui-image.png` (the README shows them).
//!
//! Needs `chromium` (`bash .ci/install-deps.sh`): without it the test fails, it never skips.

mod common;

use std::collections::HashMap;
use std::path::Path;
use std::process::Command;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{bail, Context as _, Result};
use bytes::Bytes;
use common::fake_registry::{BlobBehavior, FakeRegistry};
use common::proxy::Proxy;
use common::real::ChildGuard;
use common::{random_bytes, upstream, OCI_INDEX, OCI_MANIFEST};
use futures_util::{SinkExt, StreamExt};
use serde_json::{json, Value};
use tokio::sync::{mpsc, oneshot};
use tokio_tungstenite::tungstenite::Message;

/// A DevTools protocol connection to one page: commands by id, events collected.
struct Page {
    out: mpsc::UnboundedSender<Message>,
    pending: Arc<Mutex<HashMap<u64, oneshot::Sender<Value>>>>,
    events: Arc<Mutex<Vec<Value>>>,
    next: AtomicU64,
}

impl Page {
    async fn connect(ws_url: &str) -> Result<Page> {
        let (ws, _) = tokio_tungstenite::connect_async(ws_url)
            .await
            .with_context(|| format!("connecting to {ws_url}"))?;
        let (mut sink, mut stream) = ws.split();
        let (out, mut rx) = mpsc::unbounded_channel::<Message>();
        tokio::spawn(async move {
            while let Some(m) = rx.recv().await {
                if sink.send(m).await.is_err() {
                    break;
                }
            }
        });
        let pending: Arc<Mutex<HashMap<u64, oneshot::Sender<Value>>>> = Arc::default();
        let events: Arc<Mutex<Vec<Value>>> = Arc::default();
        let (p, e) = (pending.clone(), events.clone());
        tokio::spawn(async move {
            while let Some(Ok(m)) = stream.next().await {
                let Ok(text) = m.to_text() else { continue };
                let Ok(v) = serde_json::from_str::<Value>(text) else {
                    continue;
                };
                match v["id"].as_u64() {
                    Some(id) => {
                        if let Some(tx) = p.lock().unwrap().remove(&id) {
                            let _ = tx.send(v);
                        }
                    }
                    None => e.lock().unwrap().push(v),
                }
            }
        });
        Ok(Page {
            out,
            pending,
            events,
            next: AtomicU64::new(1),
        })
    }

    async fn call(&self, method: &str, params: Value) -> Result<Value> {
        let id = self.next.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = oneshot::channel();
        self.pending.lock().unwrap().insert(id, tx);
        let msg = json!({"id": id, "method": method, "params": params});
        self.out.send(Message::text(msg.to_string()))?;
        let v = tokio::time::timeout(Duration::from_secs(20), rx)
            .await
            .with_context(|| format!("{method}: no answer in 20 s"))??;
        if v.get("error").is_some() {
            bail!("{method}: {}", v["error"]);
        }
        Ok(v["result"].clone())
    }

    /// The value of a JavaScript expression in the page.
    async fn eval(&self, expression: &str) -> Result<Value> {
        let r = self
            .call(
                "Runtime.evaluate",
                json!({"expression": expression, "returnByValue": true}),
            )
            .await?;
        if let Some(e) = r.get("exceptionDetails") {
            bail!("{expression}: {e}");
        }
        Ok(r["result"]["value"].clone())
    }

    /// Loads `url` and waits for its load event.
    async fn open(&self, url: &str) -> Result<()> {
        let loads = self.count("Page.loadEventFired");
        self.call("Page.navigate", json!({ "url": url })).await?;
        self.until(&format!("{url} loaded"), async || {
            Ok(self.count("Page.loadEventFired") > loads)
        })
        .await
    }

    fn count(&self, method: &str) -> usize {
        let events = self.events.lock().unwrap();
        events.iter().filter(|e| e["method"] == method).count()
    }

    /// Console errors, uncaught exceptions and error log entries (a failed request, a refused
    /// script) seen so far.
    fn errors(&self) -> Vec<Value> {
        let events = self.events.lock().unwrap();
        events
            .iter()
            .filter(|e| match e["method"].as_str() {
                Some("Runtime.consoleAPICalled") => e["params"]["type"] == "error",
                Some("Runtime.exceptionThrown") => true,
                Some("Log.entryAdded") => e["params"]["entry"]["level"] == "error",
                _ => false,
            })
            .cloned()
            .collect()
    }

    /// Polls `ok` every 100 ms until it holds (10 s at most).
    async fn until(&self, what: &str, mut ok: impl AsyncFnMut() -> Result<bool>) -> Result<()> {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        while !ok().await? {
            if tokio::time::Instant::now() > deadline {
                bail!(
                    "waited 10 s for {what}; console errors: {:?}",
                    self.errors()
                );
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        Ok(())
    }

    /// Saves a PNG of the page (the whole page, not only the window).
    async fn screenshot(&self, path: &Path) -> Result<()> {
        let r = self
            .call(
                "Page.captureScreenshot",
                json!({"format": "png", "captureBeyondViewport": true}),
            )
            .await?;
        let png = base64::Engine::decode(
            &base64::engine::general_purpose::STANDARD,
            r["data"].as_str().context("no screenshot data")?,
        )?;
        std::fs::write(path, png).with_context(|| format!("writing {}", path.display()))
    }
}

/// Headless chromium with a fresh profile; its DevTools port is read from the profile.
struct Chromium {
    _guard: ChildGuard,
    port: u16,
    _profile: tempfile::TempDir,
}

impl Chromium {
    async fn start() -> Result<Chromium> {
        // Fails, never skips, where chromium is missing: CI installs it.
        let found = std::env::var_os("PATH").and_then(|path| {
            std::env::split_paths(&path)
                .map(|dir| dir.join("chromium"))
                .find(|p| p.is_file())
        });
        let program = found.unwrap_or_else(|| {
            panic!(
                "`chromium` is not on PATH: this test drives Debian's headless chromium; \
                 install it with `bash .ci/install-deps.sh` (or `apt-get install chromium`)"
            )
        });
        let profile = tempfile::tempdir()?;
        let mut cmd = Command::new(program);
        cmd.args([
            "--headless=new",
            "--remote-debugging-port=0",
            "--remote-debugging-address=127.0.0.1",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-dev-shm-usage",
            "--no-first-run",
            "--no-default-browser-check",
            "--disable-extensions",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--hide-scrollbars",
            "--window-size=1280,900",
        ])
        .arg(format!("--user-data-dir={}", profile.path().display()))
        .arg("about:blank");
        let guard = ChildGuard::spawn("chromium", cmd, profile.path().join("chromium.log"))?;
        // Chromium writes the port it bound, then the browser's path, once it listens.
        let file = profile.path().join("DevToolsActivePort");
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        let port = loop {
            if let Some(p) = std::fs::read_to_string(&file)
                .ok()
                .and_then(|t| t.lines().next().and_then(|l| l.trim().parse().ok()))
            {
                break p;
            }
            if tokio::time::Instant::now() > deadline {
                bail!("chromium did not open its DevTools port within 30 s");
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        };
        Ok(Chromium {
            _guard: guard,
            port,
            _profile: profile,
        })
    }

    /// The first page's DevTools connection, with page, runtime and log events on.
    async fn page(&self) -> Result<Page> {
        let list = common::client()
            .get(format!("http://127.0.0.1:{}/json/list", self.port))
            .send()
            .await?;
        let list: Value = serde_json::from_slice(&list.bytes().await?)?;
        let ws = list
            .as_array()
            .and_then(|l| l.iter().find(|t| t["type"] == "page"))
            .and_then(|t| t["webSocketDebuggerUrl"].as_str())
            .context("no page target")?
            .to_string();
        let page = Page::connect(&ws).await?;
        for domain in ["Page.enable", "Runtime.enable", "Log.enable"] {
            page.call(domain, json!({})).await?;
        }
        page.call(
            "Emulation.setDeviceMetricsOverride",
            json!({"width": 1280, "height": 900, "deviceScaleFactor": 1, "mobile": false}),
        )
        .await?;
        Ok(page)
    }
}

/// An index of two platforms, each a one-layer image, in `team/app:v1`.
fn push_index(up: &FakeRegistry) {
    let mut entries = Vec::new();
    for (i, arch) in ["amd64", "arm64"].into_iter().enumerate() {
        let layers = [
            Bytes::from(random_bytes(180_000 + i * 40_000, 10 + i as u64)),
            Bytes::from(random_bytes(30_000, 20 + i as u64)),
        ];
        let img = up.push_image("team/app", arch, &layers);
        entries.push(json!({
            "mediaType": OCI_MANIFEST, "digest": img.manifest, "size": img.manifest_body.len(),
            "platform": {"os": "linux", "architecture": arch},
        }));
    }
    let index = json!({"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": entries});
    up.put_manifest(
        "team/app",
        Some("v1"),
        OCI_INDEX,
        serde_json::to_vec(&index).unwrap(),
    );
}

/// Pulls the index and both platforms' images.
async fn pull_all(proxy: &Proxy) -> Result<()> {
    let r = common::client()
        .get(proxy.url("/v2/team/app/manifests/v1"))
        .header("Accept", OCI_INDEX)
        .send()
        .await?;
    anyhow::ensure!(r.status() == 200, "index: {}", r.status());
    for arch in ["amd64", "arm64"] {
        proxy
            .pull_image("team/app", arch)
            .await
            .map_err(anyhow::Error::msg)?;
    }
    Ok(())
}

#[tokio::test]
async fn the_status_page_in_a_browser() {
    let chromium = Chromium::start()
        .await
        .unwrap_or_else(|e| panic!("starting chromium: {e:#}"));
    let up = FakeRegistry::start().await;
    up.add_response_header("RateLimit-Remaining", "180;w=21600");
    push_index(&up);
    let slow = up.push_image("team/big", "v1", &[Bytes::from(random_bytes(4 << 20, 30))]);
    let slow_layer = slow.layers[0].clone();
    // 32 KiB every 40 ms: about five seconds for the 4 MiB layer (room for a slow machine).
    up.set_blob_behavior(
        &slow_layer,
        BlobBehavior::Slow {
            chunk: 32 << 10,
            delay: Duration::from_millis(40),
        },
    );
    let config = format!(
        "{}[[pin]]\nimage = \"fake/team/app:v1\"\n",
        upstream("fake", &up.url(), true, "")
    );
    let proxy = Proxy::start(&config).await;
    if let Err(e) = scenario(&chromium, &proxy, &slow_layer).await {
        panic!("{e:#}");
    }
}

async fn scenario(chromium: &Chromium, proxy: &Proxy, slow_layer: &str) -> Result<()> {
    let page = chromium.page().await?;
    page.open(&proxy.url("/ui/")).await?;
    page.until("the first poll", async || {
        Ok(page
            .eval("document.getElementById('about').textContent")
            .await?
            != "status")
    })
    .await?;
    assert_eq!(
        page.eval("document.getElementById('hit-ratio-hour').textContent")
            .await?,
        "-"
    );

    // A cold pull, then a warm one: the page shows the API's hit ratio, without a reload.
    pull_all(proxy).await?;
    proxy.wait_idle().await;
    pull_all(proxy).await?;
    let summary = common::json(proxy.get("/ui/api/summary").await).await;
    let ratio = summary["last_hour"]["hit_ratio"]
        .as_f64()
        .context("no ratio")?;
    assert!(ratio > 0.4 && ratio < 0.6, "{summary}");
    let shown = format!("{:.1}%", ratio * 100.0);
    page.until(&format!("the hit ratio {shown}"), async || {
        Ok(page
            .eval("document.getElementById('hit-ratio-hour').textContent")
            .await?
            == shown.as_str())
    })
    .await?;

    // The store's listing is reused for a few seconds: wait until it has the images, so that
    // the reload below shows them.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while common::json(proxy.get("/ui/api/store").await).await["images"] != 3 {
        anyhow::ensure!(
            tokio::time::Instant::now() < deadline,
            "the store lists no image"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    // A slow fill: its bar appears and moves.
    let url = proxy.url(&format!("/v2/team/big/blobs/{slow_layer}"));
    let digest = slow_layer.to_string();
    let client =
        tokio::spawn(async move { common::get_blob(&common::client(), &url, &digest).await });
    // The reload shows the store as it is now (that part is rendered by the server).
    tokio::time::sleep(Duration::from_millis(300)).await;
    page.open(&proxy.url("/ui/")).await?;
    let bar = "(() => { const p = document.querySelector('#fill-list progress'); \
               return p && p.hasAttribute('value') ? [p.value, p.max] : null })()";
    let mut first = Value::Null;
    page.until("a progress bar", async || {
        first = page.eval(bar).await?;
        Ok(first[0].as_f64().is_some_and(|v| v > 0.0))
    })
    .await?;
    assert_eq!(first[1].as_f64(), Some((4 << 20) as f64), "{first}");
    let text = page
        .eval("document.querySelector('#fill-list .fill').textContent")
        .await?;
    let text = text.as_str().unwrap_or_default();
    assert!(
        text.contains("fake/team/big") && text.contains("1 client following"),
        "{text}"
    );
    page.until("the bar to move", async || {
        let now = page.eval(bar).await?;
        Ok(now[0].as_f64() > first[0].as_f64())
    })
    .await?;
    let update = std::env::var_os("ENTREPOT_UPDATE_SCREENSHOTS").is_some_and(|v| v == "1");
    let docs = Path::new(env!("CARGO_MANIFEST_DIR")).join("docs");
    page.until("the upstream row", async || {
        Ok(page
            .eval("document.querySelectorAll('#upstream-rows tr').length")
            .await?
            == 1)
    })
    .await?;
    if update {
        page.screenshot(&docs.join("ui-overview.png")).await?;
    }
    client.await??;

    // The image page: the index's platforms with their layers.
    page.open(&proxy.url("/ui/image?upstream=fake&repository=team/app&reference=v1"))
        .await?;
    let headings = page
        .eval("Array.from(document.querySelectorAll('.manifest h3')).map(h => h.textContent)")
        .await?;
    assert_eq!(headings, json!(["linux/amd64", "linux/arm64"]));
    let layers = page
        .eval("document.querySelectorAll('.manifest tbody tr').length")
        .await?;
    assert_eq!(layers, 6, "a config and two layers per platform");
    if update {
        page.screenshot(&docs.join("ui-image.png")).await?;
    }
    let errors = page.errors();
    assert!(errors.is_empty(), "console errors: {errors:#?}");
    Ok(())
}
