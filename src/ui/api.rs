//! The JSON of `/ui/api/...` (README.md, "Status page", lists every field). Upstream URLs are
//! shown without userinfo, query or fragment, and no credential, token or secret is ever read
//! here. Listing the store is the one costly part: it is done at most once per
//! [`SNAPSHOT_TTL`] whatever the number of viewers, and every viewer waits for the same one.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use serde_json::{json, Value};
use tokio::time::Instant;

use super::stats::{Savings, Served};
use crate::cache::inventory::{ImageRow, Inventory};
use crate::cache::usage::unix_now_ms;
use crate::cache::{evict, Progress};
use crate::config::{PinConfig, StorageBackend};
use crate::error::ApiError;
use crate::http::AppState;
use crate::oci::{Digest, Reference, RepoName};

/// How long a listing of the store is reused.
pub const SNAPSHOT_TTL: Duration = Duration::from_secs(3);
/// Images shown in each of the overview's lists.
const LIST: usize = 10;

/// The store's listing, as the page shows it.
pub struct StoreSnapshot {
    taken: Instant,
    taken_ms: u64,
    inv: Inventory,
    images: Vec<ImageRow>,
    /// The closures of every pin.
    pinned: HashSet<Digest>,
    /// Each pin, whether it comes from the configuration (else recorded in the store).
    pins: Vec<(PinConfig, bool)>,
}

/// The last listing, or none yet; the lock is held while listing, so viewers share one.
#[derive(Default)]
pub struct SnapshotCache(tokio::sync::Mutex<Option<Arc<StoreSnapshot>>>);

/// `scheme://host[:port]/path` of a configured URL: never its userinfo, query or fragment.
pub fn public_url(url: &url::Url) -> String {
    let mut u = url.clone();
    let _ = u.set_username("");
    let _ = u.set_password(None);
    u.set_query(None);
    u.set_fragment(None);
    u.to_string()
}

/// A peer's base URL as configured, without userinfo (it is not parsed otherwise).
fn public_peer(text: &str) -> String {
    url::Url::parse(text).map_or_else(|_| "(not a URL)".to_string(), |u| public_url(&u))
}

async fn snapshot(state: &AppState) -> Result<Arc<StoreSnapshot>, ApiError> {
    let mut cached = state.ui.snapshot.0.lock().await;
    if let Some(s) = cached.as_ref().filter(|s| s.taken.elapsed() < SNAPSHOT_TTL) {
        return Ok(s.clone());
    }
    let store = &state.store;
    let inv = Inventory::load(store).await.map_err(ApiError::internal)?;
    let mut pins: Vec<(PinConfig, bool)> = state
        .config
        .pins
        .iter()
        .map(|p| (p.clone(), true))
        .collect();
    for p in store.recorded_pins().await.map_err(ApiError::internal)? {
        if !pins.iter().any(|(q, _)| *q == p) {
            pins.push((p, false));
        }
    }
    let all: Vec<PinConfig> = pins.iter().map(|(p, _)| p.clone()).collect();
    let pinned = evict::pinned(&inv, &all, |u| upstream_name(state, u));
    let s = Arc::new(StoreSnapshot {
        taken: Instant::now(),
        taken_ms: unix_now_ms(),
        images: inv.images(&store.usage),
        inv,
        pinned,
        pins,
    });
    *cached = Some(s.clone());
    Ok(s)
}

/// The configured name of the upstream `name` selects (an alias maps to its upstream).
fn upstream_name(state: &AppState, name: &str) -> String {
    state
        .config
        .upstreams
        .iter()
        .find(|u| u.matches(name))
        .map_or_else(|| name.to_string(), |u| u.name.clone())
}

fn served(s: &Served) -> Value {
    json!({
        "from_cache": s.from_cache,
        "from_upstream": s.from_upstream,
        "errors": s.errors,
        "hit_ratio": s.hit_ratio(),
        "bytes_from_cache": s.bytes_from_cache,
        "bytes_from_upstream": s.bytes_from_upstream,
    })
}

/// `/ui/api/summary`: savings since start and over the last hour, per minute.
pub fn summary(state: &AppState) -> Value {
    let (total, minutes) = state.ui.savings.snapshot();
    let hour = Savings::last_hour(&minutes);
    let views: Vec<_> = state
        .upstreams
        .all()
        .iter()
        .map(|u| u.stats().view())
        .collect();
    let fetched_total: u64 = views.iter().map(|v| v.fetched).sum();
    let fetched_minute = |i: usize| -> u64 { views.iter().map(|v| v.minutes[i].1.fetched).sum() };
    let fetched_hour: u64 = (0..minutes.len()).map(fetched_minute).sum();
    let started = state.ui.savings.started_ms();
    let mut since_start = served(&total);
    since_start["bytes_fetched_upstream"] = fetched_total.into();
    let mut last_hour = served(&hour);
    last_hour["bytes_fetched_upstream"] = fetched_hour.into();
    json!({
        "version": env!("CARGO_PKG_VERSION"),
        "started_ms": started,
        "now_ms": unix_now_ms(),
        "since_start": since_start,
        "last_hour": last_hour,
        "minutes": minutes.iter().enumerate().map(|(i, (start, s))| {
            let mut m = served(s);
            m["start_ms"] = (*start).into();
            m["bytes_fetched_upstream"] = fetched_minute(i).into();
            m
        }).collect::<Vec<_>>(),
        "fills_in_progress": state.store.fills_in_progress(),
    })
}

/// `/ui/api/upstreams`: one row per configured upstream.
pub fn upstreams(state: &AppState) -> Value {
    let rows: Vec<Value> = state
        .upstreams
        .all()
        .iter()
        .map(|u| {
            let c = u.config();
            let v = u.stats().view();
            let (requests, errors, latency): (u64, u64, u64) =
                v.minutes.iter().fold((0, 0, 0), |(r, e, l), (_, m)| {
                    (r + m.requests, e + m.errors, l + m.latency_ms_sum)
                });
            json!({
                "name": c.name,
                "url": public_url(&c.url),
                "mirrors": c.mirrors.iter().map(public_url).collect::<Vec<_>>(),
                "default": c.default,
                "offline": u.offline(),
                "reachable": v.last.map(|l| l.reachable),
                "last_contact_ms": v.last.map(|l| l.at_ms),
                "last_status": v.last.and_then(|l| l.status),
                "last_error": v.last_error,
                "latency_ms": {
                    "last": v.last.map(|l| l.latency_ms),
                    "avg_last_hour": (requests > 0).then(|| latency as f64 / requests as f64),
                },
                "ratelimit_remaining": v.ratelimit.map(|(value, at)| json!({"value": value, "at_ms": at})),
                "requests_last_hour": requests,
                "errors_last_hour": errors,
                "requests_total": v.requests,
                "errors_total": v.errors,
                "bytes_fetched_total": v.fetched,
            })
        })
        .collect();
    json!({ "upstreams": rows })
}

/// `/ui/api/fills`: every blob being filled now, oldest first.
pub fn fills(state: &AppState) -> Value {
    let now_ms = unix_now_ms();
    let rows: Vec<Value> = state
        .store
        .fills_now()
        .iter()
        .map(|f| {
            let (phase, bytes, total) = match &*f.subscribe().borrow() {
                Progress::Connecting => ("connecting", 0, None),
                Progress::Streaming { written, total, .. } => ("streaming", *written, *total),
                Progress::Done { size, .. } => ("verified", *size, Some(*size)),
                Progress::Failed(_) => ("failed", 0, None),
            };
            let elapsed = f.began().elapsed();
            let secs = elapsed.as_secs_f64();
            let src = f.source();
            json!({
                "digest": f.digest.to_string(),
                "upstream": &**src.upstream.name(),
                "repository": src.repo.as_str(),
                "origin": f.origin().as_str(),
                "state": phase,
                "bytes": bytes,
                "total": total,
                "started_ms": now_ms.saturating_sub(elapsed.as_millis() as u64),
                "elapsed_s": secs,
                "bytes_per_second": if secs > 0.0 { bytes as f64 / secs } else { 0.0 },
                "followers": f.followers(),
                "requests": f.requests(),
            })
        })
        .collect();
    json!({ "fills": rows })
}

fn image_row(s: &StoreSnapshot, img: &ImageRow) -> Value {
    json!({
        "upstream": img.tag.as_ref().map(|t| &t.upstream),
        "repository": img.tag.as_ref().map(|t| &t.repo),
        "tag": img.tag.as_ref().map(|t| &t.tag),
        "digest": img.digest.to_string(),
        "size": img.size,
        "last_used_ms": img.last_used,
        "pinned": s.pinned.contains(&img.digest),
        "complete": img.complete,
    })
}

/// `/ui/api/store`: use and bound, the largest and least recently used images, pins, the last
/// eviction, and with replicas their health.
pub async fn store(state: &AppState) -> Result<Value, ApiError> {
    let s = snapshot(state).await?;
    let store = &state.store;
    let storage = &state.config.storage;
    let mut largest: Vec<&ImageRow> = s.images.iter().collect();
    largest.sort_by(|a, b| b.size.cmp(&a.size).then(a.digest.cmp(&b.digest)));
    let mut oldest: Vec<&ImageRow> = s.images.iter().collect();
    oldest.sort_by_key(|i| (i.last_used.unwrap_or(0), i.digest.clone()));
    let rows = |v: Vec<&ImageRow>| -> Vec<Value> {
        v.into_iter().take(LIST).map(|i| image_row(&s, i)).collect()
    };
    let used = s.inv.total_bytes();
    let (backend, max, local_tier, bucket) = match &storage.backend {
        StorageBackend::Fs => ("filesystem", storage.max_size, Value::Null, Value::Null),
        StorageBackend::S3(s3) => (
            "s3",
            s3.max_size,
            json!({
                "used_bytes": store.usage.bytes(),
                "blobs": store.usage.entries(),
                "max_bytes": storage.max_size,
            }),
            json!({
                "bucket": s3.bucket,
                "prefix": s3.prefix,
                "used_bytes": used,
                "max_bytes": s3.max_size,
            }),
        ),
    };
    let cluster = state.cluster.as_ref().map(|c| {
        json!({
            "replica": c.id(),
            "healthy_peers": c.healthy_peers(),
            "members": c.members().iter().map(|(url, health, me)| json!({
                "url": public_peer(url),
                "health": match health {
                    crate::cluster::Health::Up => "up",
                    crate::cluster::Health::Down => "down",
                    crate::cluster::Health::Unknown => "unknown",
                },
                "this_replica": me,
            })).collect::<Vec<_>>(),
        })
    });
    let pins: Vec<Value> =
        s.pins
            .iter()
            .map(|(p, configured)| {
                let up = upstream_name(state, &p.upstream);
                let stored = match &p.reference {
                    Reference::Digest(d) => s.inv.manifests.contains_key(d),
                    Reference::Tag(t) => s.inv.tags.iter().any(|r| {
                        r.upstream == up && r.repo == p.repo.as_str() && r.tag == t.as_str()
                    }),
                };
                json!({
                    "reference": crate::cache::pins::format(p),
                    "source": if *configured { "config" } else { "recorded" },
                    "stored": stored,
                })
            })
            .collect();
    Ok(json!({
        "backend": backend,
        "listed_ms": s.taken_ms,
        "used_bytes": used,
        "max_bytes": max,
        "blobs": s.inv.blobs.len(),
        "manifests": s.inv.manifests.len(),
        "tags": s.inv.tags.len(),
        "images": s.images.len(),
        "local_tier": local_tier,
        "bucket": bucket,
        "largest": rows(largest),
        "least_recently_used": rows(oldest),
        "pins": pins,
        "last_eviction": store.usage.last_eviction().map(|e| json!({
            "at_ms": e.at_ms, "blobs": e.blobs, "bytes": e.bytes,
        })),
        "cluster": cluster,
    }))
}

/// One descriptor of a manifest (`config`, a layer, a platform manifest), as the page lists it.
fn descriptor(s: &StoreSnapshot, d: &Value) -> Value {
    let digest = d.get("digest").and_then(Value::as_str).unwrap_or_default();
    let stored = digest
        .parse::<Digest>()
        .is_ok_and(|x| s.inv.blobs.contains_key(&x));
    json!({
        "digest": digest,
        "media_type": d.get("mediaType").and_then(Value::as_str),
        "size": d.get("size").and_then(Value::as_u64),
        "stored": stored,
    })
}

/// A manifest's config and layers (`fsLayers` for schema 1).
fn manifest_parts(s: &StoreSnapshot, body: &Value) -> (Value, Vec<Value>) {
    let config = body.get("config").map_or(Value::Null, |c| descriptor(s, c));
    let mut layers: Vec<Value> = body
        .get("layers")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .map(|l| descriptor(s, l))
        .collect();
    for l in body
        .get("fsLayers")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
    {
        layers.push(descriptor(s, &json!({ "digest": l.get("blobSum") })));
    }
    (config, layers)
}

/// `/ui/api/image?upstream=&repository=&reference=`: one stored image, from the store only
/// (no upstream is asked).
pub async fn image(state: &AppState, query: &str) -> Result<Value, ApiError> {
    let param = |k: &str| {
        url::form_urlencoded::parse(query.as_bytes())
            .find(|(key, _)| key == k)
            .map(|(_, v)| v.into_owned())
            .unwrap_or_default()
    };
    let given = param("upstream");
    let up = state
        .config
        .upstreams
        .iter()
        .find(|u| u.matches(&given))
        .ok_or_else(|| ApiError::NoUpstream("no configured upstream has this name".into()))?
        .name
        .clone();
    let repo: RepoName = param("repository")
        .parse()
        .map_err(|e: crate::oci::NameError| ApiError::Route(e.into()))?;
    let reference: Reference = param("reference")
        .parse()
        .map_err(|e: crate::oci::NameError| ApiError::Route(e.into()))?;
    let s = snapshot(state).await?;
    let digest = match &reference {
        Reference::Digest(d) => d.clone(),
        Reference::Tag(t) => {
            let listed = s
                .inv
                .tags
                .iter()
                .find(|r| r.upstream == up && r.repo == repo.as_str() && r.tag == t.as_str())
                .map(|r| r.digest.clone());
            // A tag stored since the listing: from the tag index (the store, not the upstream).
            let name = state.upstreams.all().iter().find(|u| **u.name() == *up);
            match (listed, name) {
                (Some(d), _) => d,
                (None, Some(u)) => {
                    state
                        .store
                        .tags
                        .get(u.name(), &repo, t)
                        .await
                        .ok_or(ApiError::ManifestUnknown)?
                        .digest
                }
                (None, None) => return Err(ApiError::ManifestUnknown),
            }
        }
    };
    let store = &state.store;
    let top = store
        .manifest(&digest)
        .await
        .map_err(ApiError::internal)?
        .ok_or(ApiError::ManifestUnknown)?;
    let body: Value = serde_json::from_slice(&top.body).unwrap_or(Value::Null);
    let mut manifests = Vec::new();
    let children = body.get("manifests").and_then(Value::as_array);
    if let Some(children) = children {
        for child in children {
            let mut row = descriptor(&s, child);
            row["platform"] = child.get("platform").cloned().unwrap_or(Value::Null);
            let stored = child
                .get("digest")
                .and_then(Value::as_str)
                .and_then(|d| d.parse::<Digest>().ok());
            let m = match stored {
                Some(d) => store.manifest(&d).await.map_err(ApiError::internal)?,
                None => None,
            };
            if let Some(m) = m {
                let b: Value = serde_json::from_slice(&m.body).unwrap_or(Value::Null);
                let (config, layers) = manifest_parts(&s, &b);
                row["config"] = config;
                row["layers"] = layers.into();
            }
            manifests.push(row);
        }
    } else {
        let (config, layers) = manifest_parts(&s, &body);
        manifests.push(json!({
            "digest": digest.to_string(),
            "media_type": top.media_type,
            "size": top.body.len(),
            "stored": true,
            "platform": Value::Null,
            "config": config,
            "layers": layers,
        }));
    }
    let closure = s.inv.closure(&digest);
    let tags: Vec<&str> = s
        .inv
        .tags
        .iter()
        .filter(|r| r.upstream == up && r.repo == repo.as_str() && r.digest == digest)
        .map(|r| r.tag.as_str())
        .collect();
    Ok(json!({
        "upstream": up,
        "repository": repo.as_str(),
        "reference": reference.to_string(),
        "digest": digest.to_string(),
        "media_type": top.media_type,
        "index": children.is_some(),
        "size": closure.iter().filter_map(|d| s.inv.blobs.get(d)).map(|(n, _)| n).sum::<u64>(),
        "last_used_ms": closure.iter().map(|d| store.usage.last_use_in(&s.inv, d)).max(),
        "pinned": s.pinned.contains(&digest),
        "tags": tags,
        "manifests": manifests,
    }))
}
