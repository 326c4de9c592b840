//! Several replicas, one cache (DESIGN.md, "Replicas"). Each key (a digest; an
//! upstream/repository:tag) has an owner by rendezvous hashing over the members seen up. A
//! replica that misses forwards to the owner and follows the owner's fill, so one upstream
//! fetch serves the whole cluster. A forward is signed with the cluster secret, is marked, and
//! is always served where it lands (one hop at most). An owner that cannot be reached costs a
//! local fill, never an error.

pub mod fanout;
mod members;
pub mod rendezvous;
mod signing;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use http::{header, HeaderMap, HeaderValue, Method, StatusCode};

use crate::config::ClusterConfig;
use crate::upstream::{Upstream, UpstreamError, UpstreamRequest};

pub use members::Health;

/// Marks a forwarded request: `<replica> <unix seconds> <hmac>` (see `signing`).
pub const PEER_HEADER: &str = "entrepot-peer";
/// On a forwarded request: the configured name of the upstream it is for.
pub const UPSTREAM_HEADER: &str = "entrepot-upstream";
/// On the answer to a peer: the answering replica's id (how a replica finds itself).
pub const REPLICA_HEADER: &str = "entrepot-replica";

/// How long a peer's body may go quiet before the forward counts as failed.
const PEER_READ_TIMEOUT: Duration = Duration::from_secs(30);

pub struct Cluster {
    /// This process's id (random per start): how it recognises itself among the members.
    id: String,
    config: ClusterConfig,
    table: Mutex<members::Table>,
    client: reqwest::Client,
}

/// Where a request that missed goes first: the key's owner, another replica.
#[derive(Clone)]
pub struct Via {
    pub cluster: Arc<Cluster>,
    pub owner: Arc<str>,
}

/// What the peer marker on a request says.
#[derive(Debug, PartialEq, Eq)]
pub enum PeerCheck {
    /// No marker: a client's request.
    Client,
    /// Signed by a replica of this cluster (its id).
    Peer(String),
    /// A marker that is not a good signature (or no cluster here): refused with 403.
    Refused,
}

/// Why a forward did not give an answer to use (the request is then served locally).
#[derive(Debug, thiserror::Error)]
pub enum ForwardError {
    #[error("cannot reach {0}: {1}")]
    Unreachable(Arc<str>, String),
    #[error("{0} did not answer within {1:?}")]
    Timeout(Arc<str>, Duration),
    #[error("{0} answered {1}")]
    Status(Arc<str>, StatusCode),
}

impl Cluster {
    pub fn new(config: ClusterConfig) -> Result<Arc<Cluster>, reqwest::Error> {
        crate::tls::install_provider();
        let client = reqwest::Client::builder()
            .redirect(reqwest::redirect::Policy::none())
            .connect_timeout(config.connect_timeout)
            .read_timeout(PEER_READ_TIMEOUT)
            .pool_idle_timeout(Duration::from_secs(90))
            .user_agent(concat!("entrepot/", env!("CARGO_PKG_VERSION"), " (peer)"))
            .build()?;
        let id = format!(
            "{:016x}",
            std::hash::BuildHasher::hash_one(&std::collections::hash_map::RandomState::new(), 0)
        );
        let mut table = members::Table::default();
        if let crate::config::Members::Static(list) = &config.members {
            table.set_members(list.iter().cloned());
        }
        table.me = config.advertise.as_deref().map(Arc::from);
        if let Some(me) = &table.me {
            table.members.entry(me.clone()).or_insert(Health::Up);
        }
        Ok(Arc::new(Cluster {
            id,
            config,
            table: Mutex::new(table),
            client,
        }))
    }

    /// This process's replica id.
    pub fn id(&self) -> &str {
        &self.id
    }

    /// The replica that owns `key`, when it is another one; `None` when this replica does.
    pub fn owner(&self, key: &str) -> Option<Arc<str>> {
        let t = self.table.lock().unwrap();
        let candidates = t.candidates();
        let owner = rendezvous::owner(candidates.iter().map(|s| &**s), key)?;
        (t.me.as_deref() != Some(owner)).then(|| Arc::from(owner))
    }

    /// Where a miss of `key` goes first (its owner), if not here.
    pub fn via(self: &Arc<Self>, key: &str) -> Option<Via> {
        self.owner(key).map(|owner| Via {
            cluster: self.clone(),
            owner,
        })
    }

    /// Does this replica run the cluster-wide task `task` (bucket sweeps): is it the task's
    /// owner among the members seen up? A replica that does not know its own address never
    /// does.
    pub fn leads(&self, task: &str) -> bool {
        let t = self.table.lock().unwrap();
        let Some(me) = t.me.clone() else {
            return false;
        };
        let candidates = t.candidates();
        rendezvous::owner(candidates.iter().map(|s| &**s), task) == Some(&*me)
    }

    /// Members seen up, this replica not counted.
    pub fn healthy_peers(&self) -> usize {
        let t = self.table.lock().unwrap();
        t.members
            .iter()
            .filter(|(u, h)| **h == Health::Up && Some(*u) != t.me.as_ref())
            .count()
    }

    /// Every member's base URL and health, and whether it is this replica (the status page).
    pub fn members(&self) -> Vec<(Arc<str>, Health, bool)> {
        let t = self.table.lock().unwrap();
        let mut out: Vec<_> = t
            .members
            .iter()
            .map(|(u, h)| (u.clone(), *h, Some(u) == t.me.as_ref()))
            .collect();
        out.sort_by(|a, b| a.0.cmp(&b.0));
        out
    }

    /// A forward could not connect: keys go elsewhere until a probe finds it up again.
    fn mark_down(&self, url: &str) {
        let mut t = self.table.lock().unwrap();
        if t.me.as_deref() == Some(url) {
            return;
        }
        if let Some(h) = t.members.get_mut(url) {
            if *h != Health::Down {
                tracing::warn!(peer = %url, "cluster peer unreachable; its keys go to the others");
                *h = Health::Down;
            }
        }
    }

    /// A signed request to a member.
    fn request(
        &self,
        base: &str,
        method: Method,
        target: &str,
        upstream: &str,
    ) -> reqwest::RequestBuilder {
        let sig = signing::sign(
            &self.config.secret,
            &self.id,
            method.as_str(),
            target,
            upstream,
        );
        let mut b = self
            .client
            .request(method, format!("{base}{target}"))
            .header(PEER_HEADER, sig);
        if !upstream.is_empty() {
            b = b.header(UPSTREAM_HEADER, upstream);
        }
        b
    }

    /// Sends `req` (for `upstream`) to the owner `owner` instead of the upstream. Only a 200
    /// (206 for a range) is an answer; anything else is an error and the caller goes to the
    /// upstream itself.
    pub async fn forward(
        &self,
        owner: &Arc<str>,
        upstream: &str,
        req: &UpstreamRequest<'_>,
    ) -> Result<reqwest::Response, ForwardError> {
        let mut target = format!("/v2/{}/{}", req.repo, req.path);
        if let Some(q) = &req.query {
            target.push('?');
            target.push_str(q);
        }
        let mut headers = HeaderMap::new();
        for (k, v) in &req.headers {
            headers.append(k, v.clone());
        }
        headers.insert(
            header::ACCEPT_ENCODING,
            HeaderValue::from_static("identity"),
        );
        let send = self
            .request(owner, req.method.clone(), &target, upstream)
            .headers(headers)
            .send();
        let wait = self.config.connect_timeout + self.config.response_timeout;
        let resp = match tokio::time::timeout(wait, send).await {
            Ok(Ok(r)) => r,
            Ok(Err(e)) => {
                if e.is_connect() {
                    self.mark_down(owner);
                }
                crate::metrics::cluster_fallback();
                return Err(ForwardError::Unreachable(owner.clone(), e.to_string()));
            }
            Err(_) => {
                crate::metrics::cluster_fallback();
                return Err(ForwardError::Timeout(owner.clone(), wait));
            }
        };
        if !matches!(resp.status(), StatusCode::OK | StatusCode::PARTIAL_CONTENT) {
            crate::metrics::cluster_fallback();
            return Err(ForwardError::Status(owner.clone(), resp.status()));
        }
        crate::metrics::cluster_forwarded();
        Ok(resp)
    }

    /// Checks the peer marker of a request to `target` (path and query).
    pub fn check(&self, headers: &HeaderMap, method: &Method, target: &str) -> PeerCheck {
        check(Some(self), headers, method, target)
    }
}

/// Sends `req` to the owner replica `via` names, else (no owner, or it failed) to the upstream.
pub async fn ask(
    up: &Upstream,
    via: Option<&Via>,
    req: &UpstreamRequest<'_>,
) -> Result<reqwest::Response, UpstreamError> {
    if let Some(v) = via {
        match v.cluster.forward(&v.owner, up.name(), req).await {
            Ok(r) => return Ok(r),
            Err(e) => {
                tracing::info!(upstream = %up.name(), repository = %req.repo, path = %req.path, error = %e, "forward to the owner failed; asking the upstream")
            }
        }
    }
    up.send(req).await
}

/// Checks the peer marker of a request, with or without a cluster configured.
pub fn check(
    cluster: Option<&Cluster>,
    headers: &HeaderMap,
    method: &Method,
    target: &str,
) -> PeerCheck {
    let Some(value) = headers.get(PEER_HEADER) else {
        return PeerCheck::Client;
    };
    let (Some(cluster), Ok(value)) = (cluster, value.to_str()) else {
        return PeerCheck::Refused;
    };
    let upstream = headers
        .get(UPSTREAM_HEADER)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    match signing::verify(
        &cluster.config.secret,
        value,
        method.as_str(),
        target,
        upstream,
    ) {
        Some(id) => PeerCheck::Peer(id),
        None => PeerCheck::Refused,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;

    fn cluster(extra: &str) -> Arc<Cluster> {
        let c = Config::parse(&format!(
            "[cluster]\nsecret = \"0123456789abcdef\"\npeers = [\"http://127.0.0.1:1\", \"http://127.0.0.1:2\", \"http://127.0.0.1:3\"]\n{extra}"
        ))
        .unwrap();
        Cluster::new(c.cluster.unwrap()).unwrap()
    }

    #[test]
    fn every_replica_agrees_on_owners_and_a_dead_owner_passes_its_keys_on() {
        let a = cluster("advertise = \"http://127.0.0.1:1\"");
        let b = cluster("advertise = \"http://127.0.0.1:2\"");
        // A key the third member owns.
        let key = (0..)
            .map(|i| format!("sha256:{i:064x}"))
            .find(|k| a.owner(k).as_deref() == Some("http://127.0.0.1:3"))
            .unwrap();
        let owner = |c: &Cluster| {
            c.owner(&key)
                .unwrap_or_else(|| c.config.advertise.clone().unwrap().into())
        };
        assert_eq!(owner(&a), owner(&b));
        let dead = owner(&a);
        a.mark_down(&dead);
        b.mark_down(&dead);
        assert_ne!(owner(&a), dead);
        assert_eq!(owner(&a), owner(&b));
        // Exactly one replica leads a task.
        let c = cluster("advertise = \"http://127.0.0.1:3\"");
        let leaders = [&a, &b, &c]
            .iter()
            .filter(|x| {
                x.table
                    .lock()
                    .unwrap()
                    .members
                    .values_mut()
                    .for_each(|h| *h = Health::Up);
                x.leads("bucket-sweeps")
            })
            .count();
        assert_eq!(leaders, 1);
    }

    #[test]
    fn the_marker_needs_a_good_signature() {
        let a = cluster("");
        let mut h = HeaderMap::new();
        assert_eq!(
            a.check(&h, &Method::GET, "/v2/x/blobs/d"),
            PeerCheck::Client
        );
        let sig = signing::sign(b"0123456789abcdef", "r", "GET", "/v2/x/blobs/d", "up");
        h.insert(PEER_HEADER, sig.parse().unwrap());
        h.insert(UPSTREAM_HEADER, "up".parse().unwrap());
        assert_eq!(
            a.check(&h, &Method::GET, "/v2/x/blobs/d"),
            PeerCheck::Peer("r".into())
        );
        assert_eq!(
            a.check(&h, &Method::GET, "/v2/y/blobs/d"),
            PeerCheck::Refused
        );
        assert_eq!(
            check(None, &h, &Method::GET, "/v2/x/blobs/d"),
            PeerCheck::Refused
        );
        h.insert(PEER_HEADER, "r 1 00".parse().unwrap());
        assert_eq!(
            a.check(&h, &Method::GET, "/v2/x/blobs/d"),
            PeerCheck::Refused
        );
    }
}
