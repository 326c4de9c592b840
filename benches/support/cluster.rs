//! Several entrepot replicas forming one cache (`[cluster]`, issue 11) on loopback: ports chosen
//! before any replica starts (each must list all of them as `peers`), the `[cluster]` table, the
//! Prometheus figures the scenario reads, and the wait until every replica sees the others up.
//!
//! The same layout as the tests' `tests/common/cluster.rs` (static `peers`, `advertise`, one
//! secret), in the bench's own process helpers: that module leans on the tests' harness.

use std::time::{Duration, Instant};

use anyhow::{bail, Result};

/// The secret the bench's clusters sign peer requests with.
pub const SECRET: &str = "bench-cluster-secret-0123456789";

/// How long a started cluster may take until every replica sees every other one up.
const HEALTHY_TIMEOUT: Duration = Duration::from_secs(30);

/// The cluster's counters and gauge, as exported on `/metrics`.
pub const FORWARDED: &str = "entrepot_cluster_forwarded_total";
pub const SERVED_FOR_PEER: &str = "entrepot_cluster_served_for_peer_total";
pub const LOCAL_FALLBACK: &str = "entrepot_cluster_local_fallback_total";
pub const PEERS_HEALTHY: &str = "entrepot_cluster_peers_healthy";

/// `n` ports on 127.0.0.1 that were free a moment ago, all different (bound together).
pub fn free_ports(n: usize) -> Result<Vec<u16>> {
    let listeners = (0..n)
        .map(|_| std::net::TcpListener::bind("127.0.0.1:0"))
        .collect::<std::io::Result<Vec<_>>>()?;
    listeners
        .iter()
        .map(|l| Ok(l.local_addr()?.port()))
        .collect()
}

/// A member's base URL, spelt as entrepot normalises it (what ownership hashes).
pub fn member(port: u16) -> String {
    format!("http://127.0.0.1:{port}")
}

/// The `[cluster]` table of the replica on `me`, every one of `ports` a member. The timeouts and
/// the probe interval are entrepot's defaults.
pub fn cluster_toml(me: u16, ports: &[u16]) -> String {
    let peers: Vec<String> = ports
        .iter()
        .map(|&p| format!("\"{}\"", member(p)))
        .collect();
    format!(
        "\n[cluster]\nadvertise = \"{}\"\npeers = [{}]\nsecret = \"{SECRET}\"\n",
        member(me),
        peers.join(", ")
    )
}

/// The index in `ports` of the replica that owns `key`, by the rendezvous hashing the replicas
/// use (entrepot's own function, so the bench cannot disagree with them).
pub fn owner_of(ports: &[u16], key: &str) -> Option<usize> {
    let members: Vec<String> = ports.iter().map(|&p| member(p)).collect();
    let owner = entrepot::cluster::rendezvous::owner(members.iter().map(String::as_str), key)?;
    members.iter().position(|m| m == owner)
}

/// The `/metrics` text of the replica on `port`.
pub async fn metrics(client: &reqwest::Client, port: u16) -> Result<String> {
    let resp = client
        .get(format!("http://127.0.0.1:{port}/metrics"))
        .timeout(Duration::from_secs(5))
        .send()
        .await?;
    anyhow::ensure!(
        resp.status() == 200,
        "GET /metrics on port {port}: {}",
        resp.status()
    );
    Ok(resp.text().await?)
}

/// The sum of every series of `name` in a Prometheus text exposition (0 when absent: a counter
/// that never moved is not exported).
pub fn metric_sum(text: &str, name: &str) -> f64 {
    text.lines()
        .filter(|l| {
            l.strip_prefix(name)
                .is_some_and(|rest| rest.starts_with(' ') || rest.starts_with('{'))
        })
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// The cluster figures of one replica.
#[derive(Clone, Copy, Debug, Default)]
pub struct Figures {
    pub forwarded: f64,
    pub served_for_peer: f64,
    pub local_fallback: f64,
}

impl std::ops::Sub for Figures {
    type Output = Figures;
    fn sub(self, rhs: Figures) -> Figures {
        Figures {
            forwarded: self.forwarded - rhs.forwarded,
            served_for_peer: self.served_for_peer - rhs.served_for_peer,
            local_fallback: self.local_fallback - rhs.local_fallback,
        }
    }
}

pub async fn figures(client: &reqwest::Client, port: u16) -> Result<Figures> {
    let text = metrics(client, port).await?;
    Ok(Figures {
        forwarded: metric_sum(&text, FORWARDED),
        served_for_peer: metric_sum(&text, SERVED_FOR_PEER),
        local_fallback: metric_sum(&text, LOCAL_FALLBACK),
    })
}

/// Waits until the replica on each of `ports` reports `ports.len() - 1` healthy peers.
pub async fn wait_peers_healthy(client: &reqwest::Client, ports: &[u16]) -> Result<Duration> {
    let started = Instant::now();
    let want = (ports.len() - 1) as f64;
    loop {
        let mut seen = Vec::with_capacity(ports.len());
        for &port in ports {
            let n = match metrics(client, port).await {
                Ok(text) => metric_sum(&text, PEERS_HEALTHY),
                Err(_) => -1.0,
            };
            seen.push(n);
        }
        if seen.iter().all(|&n| n == want) {
            return Ok(started.elapsed());
        }
        if started.elapsed() > HEALTHY_TIMEOUT {
            bail!(
                "the replicas did not all see {want} healthy peers within {HEALTHY_TIMEOUT:?} \
                 (they report {seen:?})"
            );
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}
