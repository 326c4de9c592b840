//! The member table: who the replicas are (a static list, or a DNS name re-resolved), which of
//! them answer, and which one is this process. Probes run in the background; a forward that
//! cannot connect marks its member down at once, and the next good probe brings it back (it
//! then takes its keys again).

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use http::{Method, StatusCode};
use tokio_util::sync::CancellationToken;

use super::{Cluster, REPLICA_HEADER};
use crate::config::Members;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Health {
    /// Not probed yet: counted as up, so a starting cluster agrees on owners at once.
    Unknown,
    Up,
    Down,
}

#[derive(Default)]
pub struct Table {
    /// Base URL → health. This replica's own entry (when it is listed) is among them.
    pub members: HashMap<Arc<str>, Health>,
    /// This replica's URL: `advertise`, or the member whose probe answered with our id.
    pub me: Option<Arc<str>>,
}

impl Table {
    /// Replaces the member list, keeping what is known of members that stay.
    pub fn set_members(&mut self, urls: impl IntoIterator<Item = String>) -> bool {
        let mut next = HashMap::new();
        for u in urls {
            let u: Arc<str> = u.into();
            let h = self.members.get(&u).copied().unwrap_or(Health::Unknown);
            next.insert(u, h);
        }
        let changed =
            next.len() != self.members.len() || next.keys().any(|k| !self.members.contains_key(k));
        self.members = next;
        changed
    }

    /// The members keys may go to: every one not known to be down, and this replica.
    pub fn candidates(&self) -> Vec<Arc<str>> {
        let mut out: Vec<Arc<str>> = self
            .members
            .iter()
            .filter(|(u, h)| **h != Health::Down && Some(*u) != self.me.as_ref())
            .map(|(u, _)| u.clone())
            .collect();
        out.extend(self.me.clone());
        out
    }
}

impl Cluster {
    /// Keeps the table current until `stopping`: resolves `peers_dns` every `refresh` and
    /// probes every member every `health_interval`.
    pub async fn run(self: Arc<Self>, stopping: CancellationToken) {
        let mut next_resolve = tokio::time::Instant::now();
        let mut warned_alone = false;
        loop {
            if let Members::Dns {
                host,
                port,
                refresh,
            } = &self.config.members
            {
                if tokio::time::Instant::now() >= next_resolve {
                    self.resolve(host, *port).await;
                    next_resolve = tokio::time::Instant::now() + *refresh;
                }
            }
            self.probe_all().await;
            let alone = self.table.lock().unwrap().me.is_none();
            if alone && !warned_alone {
                warned_alone = true;
                tracing::warn!(
                    "this replica is not among the cluster's members (set cluster.advertise to the \
                     address the others reach it at): it owns no keys and forwards every miss"
                );
            }
            tokio::select! {
                _ = tokio::time::sleep(self.config.health_interval) => {}
                _ = stopping.cancelled() => return,
            }
        }
    }

    /// Every A/AAAA record of `host` is a member at `port`. A failed lookup keeps the list.
    async fn resolve(&self, host: &str, port: u16) {
        match tokio::net::lookup_host((host, port)).await {
            Ok(addrs) => {
                let mut urls: Vec<String> = addrs.map(|a| format!("http://{a}")).collect();
                urls.sort();
                urls.dedup();
                let changed = self.table.lock().unwrap().set_members(urls.clone());
                if changed {
                    tracing::info!(members = ?urls, "cluster members changed");
                }
            }
            Err(e) => {
                tracing::warn!(name = %host, error = %e, "could not resolve the cluster's members; keeping the last list")
            }
        }
    }

    async fn probe_all(self: &Arc<Self>) {
        let urls: Vec<Arc<str>> = self.table.lock().unwrap().members.keys().cloned().collect();
        let probes = urls.into_iter().map(|u| {
            let me = self.clone();
            async move {
                let answer = me.probe(&u).await;
                (u, answer)
            }
        });
        let results = futures_util::future::join_all(probes).await;
        let mut t = self.table.lock().unwrap();
        for (url, answer) in results {
            let health = match &answer {
                Ok(id) if id == &self.id => {
                    if t.me.as_ref() != Some(&url) {
                        tracing::info!(url = %url, "this replica is the cluster member at this address");
                        t.me = Some(url.clone());
                    }
                    Health::Up
                }
                Ok(_) => Health::Up,
                Err(_) => Health::Down,
            };
            if let Some(h) = t.members.get_mut(&url) {
                if *h != health {
                    match (&answer, health) {
                        (Err(e), Health::Down) => {
                            tracing::warn!(peer = %url, error = %e, "cluster peer down")
                        }
                        _ => tracing::info!(peer = %url, "cluster peer up"),
                    }
                }
                *h = health;
            }
        }
        let healthy = t
            .members
            .iter()
            .filter(|(u, h)| **h == Health::Up && Some(*u) != t.me.as_ref())
            .count();
        crate::metrics::cluster_peers_healthy(healthy);
    }

    /// `GET /v2/` signed: a member answers 200 with its replica id.
    async fn probe(&self, url: &str) -> Result<String, String> {
        let target = "/v2/";
        let resp = self
            .request(url, Method::GET, target, "")
            .timeout(self.config.connect_timeout + Duration::from_secs(1))
            .send()
            .await
            .map_err(|e| e.to_string())?;
        if resp.status() != StatusCode::OK {
            return Err(format!("answered {}", resp.status()));
        }
        resp.headers()
            .get(REPLICA_HEADER)
            .and_then(|v| v.to_str().ok())
            .map(str::to_string)
            .ok_or_else(|| "not an entrepot replica of this cluster".to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_new_list_keeps_what_is_known_of_members_that_stay() {
        let mut t = Table::default();
        assert!(t.set_members(["http://a:1".to_string(), "http://b:1".to_string()]));
        *t.members.get_mut("http://a:1").unwrap() = Health::Down;
        assert!(!t.set_members(["http://b:1".to_string(), "http://a:1".to_string()]));
        assert_eq!(t.members["http://a:1"], Health::Down);
        assert!(t.set_members(["http://b:1".to_string(), "http://c:1".to_string()]));
        assert_eq!(t.members["http://c:1"], Health::Unknown);
        assert!(!t.members.contains_key("http://a:1"));
    }

    #[test]
    fn members_down_take_no_keys_and_this_replica_always_may() {
        let mut t = Table::default();
        t.set_members(["http://a:1".to_string(), "http://b:1".to_string()]);
        *t.members.get_mut("http://b:1").unwrap() = Health::Down;
        t.me = Some("http://me:1".into());
        let mut c: Vec<String> = t.candidates().iter().map(|s| s.to_string()).collect();
        c.sort();
        assert_eq!(c, ["http://a:1", "http://me:1"]);
        // Even marked down (a probe of itself failed), this replica still owns its keys.
        t.members.insert("http://me:1".into(), Health::Down);
        assert_eq!(t.candidates().len(), 2);
    }
}
