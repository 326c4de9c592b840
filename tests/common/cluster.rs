//! Several `entrepot serve` binaries forming one cluster (`[cluster]`) on loopback: each on its
//! own address, all knowing each other, started, killed (`kill -9`), stopped (SIGTERM, as a
//! rolling restart does) and started again on the same address and store.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use anyhow::{bail, Context as _, Result};

use super::real::ChildGuard;

/// The secret every test cluster signs peer requests with.
pub const SECRET: &str = "cluster-test-secret-0123456789";

/// One replica: its address stays the same across restarts, so the others find it again.
pub struct Replica {
    pub name: String,
    pub addr: SocketAddr,
    pub dir: PathBuf,
    config: PathBuf,
    process: Option<ChildGuard>,
    /// Logs of earlier runs (a restart starts a new log file).
    runs: usize,
}

impl Replica {
    /// A replica at `addr` whose whole configuration is `toml` (see [`config`]), not started.
    pub fn new(work: &Path, name: &str, addr: SocketAddr, toml: &str) -> Result<Self> {
        let dir = work.join(name);
        std::fs::create_dir_all(&dir)?;
        let config = dir.join("entrepot.toml");
        std::fs::write(&config, toml)?;
        Ok(Self {
            name: name.to_string(),
            addr,
            dir,
            config,
            process: None,
            runs: 0,
        })
    }

    /// `http://ip:port`, as the other replicas and clients reach it.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// `ip:port`, as used in `docker://` references.
    pub fn host(&self) -> String {
        self.addr.to_string()
    }

    pub fn store(&self) -> PathBuf {
        self.dir.join("store")
    }

    pub fn running(&self) -> bool {
        self.process.is_some()
    }

    /// Starts the binary and waits until `GET /v2/` answers 200.
    pub async fn start(&mut self) -> Result<()> {
        if self.process.is_some() {
            bail!("{} is running already", self.name);
        }
        self.runs += 1;
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_entrepot"));
        cmd.arg("serve")
            .arg("--config")
            .arg(&self.config)
            .current_dir(&self.dir)
            .env("RUST_LOG", "info,entrepot=debug")
            .env("RUST_BACKTRACE", "1");
        let log = self.dir.join(format!("entrepot-{}.log", self.runs));
        let mut process = ChildGuard::spawn(&self.name, cmd, log)?;
        let client = super::client();
        let url = format!("{}/v2/", self.url());
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(status) = process.exited() {
                bail!(
                    "{} exited with {status} at start; output:\n{}",
                    self.name,
                    process.output()
                );
            }
            let ok = client
                .get(&url)
                .timeout(Duration::from_secs(2))
                .send()
                .await
                .is_ok_and(|r| r.status() == 200);
            if ok {
                break;
            }
            if tokio::time::Instant::now() > deadline {
                bail!(
                    "{} did not become ready; output:\n{}",
                    self.name,
                    process.output()
                );
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        self.process = Some(process);
        Ok(())
    }

    /// `kill -9`, as a crash.
    pub fn kill(&mut self) {
        if let Some(mut p) = self.process.take() {
            p.kill();
        }
    }

    /// SIGTERM, then waits for the process to drain and exit (at most `limit`).
    pub async fn stop(&mut self, limit: Duration) -> Result<()> {
        let Some(mut p) = self.process.take() else {
            return Ok(());
        };
        let status = Command::new("kill")
            .arg("-TERM")
            .arg(p.id().to_string())
            .status()?;
        anyhow::ensure!(status.success(), "kill -TERM failed");
        let deadline = tokio::time::Instant::now() + limit;
        while p.exited().is_none() {
            if tokio::time::Instant::now() > deadline {
                bail!("{} did not exit within {limit:?} of SIGTERM", self.name);
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        Ok(())
    }

    /// Everything every run of this replica has logged.
    pub fn output(&self) -> String {
        (1..=self.runs)
            .map(|i| {
                std::fs::read_to_string(self.dir.join(format!("entrepot-{i}.log")))
                    .unwrap_or_default()
            })
            .collect::<Vec<_>>()
            .join("\n")
    }

    /// The sum of every series of the Prometheus metric `name` this run exports.
    pub async fn metric(&self, name: &str) -> Result<f64> {
        Ok(metric_sum(&self.metrics_text().await?, name))
    }

    /// This run's `/metrics` page.
    async fn metrics_text(&self) -> Result<String> {
        let resp = super::client()
            .get(format!("{}/metrics", self.url()))
            .send()
            .await?;
        Ok(resp.text().await?)
    }
}

impl Replica {
    /// The sum of the series of `name` whose labels include `label` (e.g. `kind="shared"`).
    pub async fn metric_labelled(&self, name: &str, label: &str) -> Result<f64> {
        let series: String = self
            .metrics_text()
            .await?
            .lines()
            .filter(|l| l.starts_with(&format!("{name}{{")) && l.contains(label))
            .map(|l| format!("{l}\n"))
            .collect();
        Ok(metric_sum(&series, name))
    }
}

/// The sum of the values of every series of `name` in a Prometheus text exposition.
pub fn metric_sum(text: &str, name: &str) -> f64 {
    text.lines()
        .filter(|l| {
            l.strip_prefix(name)
                .is_some_and(|rest| rest.starts_with(' ') || rest.starts_with('{'))
        })
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// A replica's whole configuration: listening on `addr`, its store under `dir/store` plus the
/// `storage` keys, the `upstreams` tables, and `[cluster]` with `cluster` (members) and `extra`.
pub fn config(
    addr: SocketAddr,
    dir: &Path,
    storage: &str,
    upstreams: &str,
    cluster: &str,
) -> String {
    format!(
        "[server]\nlisten = \"{addr}\"\nshutdown_grace = \"20s\"\n\n[storage]\nroot = {root:?}\n{storage}\n\n{upstreams}\n\n[cluster]\nsecret = \"{SECRET}\"\nhealth_interval = \"300ms\"\n{cluster}\n",
        root = dir.join("store").display().to_string(),
    )
}

/// `n` loopback addresses for replicas: `127.0.0.1` with `n` ports that were free a moment ago.
pub fn addresses(n: usize) -> Vec<SocketAddr> {
    // Bound together so that no two are the same port.
    let listeners: Vec<std::net::TcpListener> = (0..n)
        .map(|_| std::net::TcpListener::bind("127.0.0.1:0").expect("bind"))
        .collect();
    listeners.iter().map(|l| l.local_addr().unwrap()).collect()
}

/// `n` replicas on `addrs`, each listing all of them as `peers` (and itself as `advertise`),
/// none started.
pub fn static_cluster(
    work: &Path,
    addrs: &[SocketAddr],
    storage: &str,
    upstreams: &str,
    extra: &str,
) -> Result<Vec<Replica>> {
    let peers: Vec<String> = addrs.iter().map(|a| format!("\"http://{a}\"")).collect();
    addrs
        .iter()
        .enumerate()
        .map(|(i, addr)| {
            let name = format!("replica{i}");
            let cluster = format!(
                "advertise = \"http://{addr}\"\npeers = [{}]\n{extra}",
                peers.join(", ")
            );
            let toml = config(*addr, &work.join(&name), storage, upstreams, &cluster);
            Replica::new(work, &name, *addr, &toml)
        })
        .collect()
}

/// Starts every replica (one after the other).
pub async fn start_all(replicas: &mut [Replica]) -> Result<()> {
    for r in replicas.iter_mut() {
        r.start()
            .await
            .with_context(|| format!("starting {}", r.name))?;
    }
    Ok(())
}

/// Waits until every running replica sees `n` other replicas up.
pub async fn wait_peers_healthy(replicas: &[Replica], n: usize) -> Result<()> {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        let mut all = true;
        for r in replicas.iter().filter(|r| r.running()) {
            if r.metric("entrepot_cluster_peers_healthy")
                .await
                .unwrap_or(-1.0)
                != n as f64
            {
                all = false;
            }
        }
        if all {
            return Ok(());
        }
        if tokio::time::Instant::now() > deadline {
            bail!("the replicas did not all see {n} healthy peers");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The member that owns `key`, by the same rendezvous hashing the replicas use.
pub fn owner_of(replicas: &[Replica], key: &str) -> usize {
    let urls: Vec<String> = replicas.iter().map(Replica::url).collect();
    let owner = entrepot::cluster::rendezvous::owner(urls.iter().map(String::as_str), key)
        .expect("members");
    urls.iter().position(|u| u == owner).expect("an owner")
}

/// `[storage]` keys for the shared bucket of `garage`: `storage` more `[storage]` keys, `s3` more
/// `[storage.s3]` keys.
pub fn s3_storage(garage: &super::garage::Garage, storage: &str, s3: &str) -> String {
    format!(
        "backend = \"s3\"\n{storage}\n\n[storage.s3]\nendpoint = \"{}\"\nregion = \"{}\"\nbucket = \"{}\"\naccess_key_id = \"{}\"\nsecret_access_key = \"{}\"\n{s3}\n",
        garage.endpoint(),
        garage.region(),
        garage.bucket(),
        garage.access_key_id(),
        garage.secret_access_key(),
    )
}
