//! `GET|HEAD /v2/<name>/manifests/<tag|digest>`. Digests are immutable and cached forever.
//! Tags are answered locally within the upstream's `tag_ttl`, revalidated with an upstream HEAD
//! after it, and served stale when the upstream is unavailable.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use bytes::{Bytes, BytesMut};
use futures_util::future::{BoxFuture, Shared};
use futures_util::{FutureExt, StreamExt};
use http::{header, HeaderMap, HeaderValue, Method, Response, StatusCode};

use super::access_log::Outcome;
use super::body::{self, Body};
use super::{scope, with_outcome, AppState, Ctx};
use crate::cache::{Store, StoredManifest, TagEntry};
use crate::cluster::Via;
use crate::error::ApiError;
use crate::oci::{media, Digest, Hasher, Kind, Reference, RepoName, Tag};
use crate::upstream::{Upstream, UpstreamError, UpstreamErrorKind, UpstreamRequest};

pub async fn serve(
    state: &AppState,
    ctx: &Ctx,
    reference: Reference,
) -> Result<Response<Body>, ApiError> {
    match reference {
        Reference::Digest(d) => by_digest(state, ctx, &d).await,
        Reference::Tag(t) => by_tag(state, ctx, &t).await,
    }
}

async fn by_digest(
    state: &AppState,
    ctx: &Ctx,
    digest: &Digest,
) -> Result<Response<Body>, ApiError> {
    if let Some(m) = stored(state, digest).await {
        scope::check(state, ctx, digest, Kind::Manifest).await?;
        return Ok(with_outcome(manifest_response(&m, ctx.head), Outcome::Hit));
    }
    if ctx.head {
        let head = upstream_head(state, ctx, &digest.to_string()).await?;
        let found = head
            .into_entry()
            .filter(|(d, _, _)| d == digest)
            .ok_or(ApiError::ManifestUnknown);
        let (d, media_type, size) = match found {
            Ok(e) => e,
            // The upstream answered HEAD without the headers we need: fetch it instead.
            Err(_) => {
                let m = fetch(state, ctx, &digest.to_string(), Some(digest)).await?;
                return Ok(with_outcome(manifest_response(&m, true), Outcome::Miss));
            }
        };
        return Ok(with_outcome(
            head_response(&d, &media_type, size),
            Outcome::Miss,
        ));
    }
    let m = fetch(state, ctx, &digest.to_string(), Some(digest)).await?;
    Ok(with_outcome(manifest_response(&m, false), Outcome::Miss))
}

async fn by_tag(state: &AppState, ctx: &Ctx, tag: &Tag) -> Result<Response<Body>, ApiError> {
    let up = ctx.upstream.name();
    let tags = &state.store.tags;
    let cached = tags
        .get(up, &ctx.repo, tag)
        .await
        .filter(|e| media::accepts(ctx.accept(), &e.media_type));
    let Some(entry) = cached else {
        return tag_miss(state, ctx, tag).await;
    };
    // Offline, the store is the truth whatever the mapping's age.
    if ctx.upstream.offline() || tags.is_fresh(&entry, ctx.upstream.config().tag_ttl) {
        return serve_entry(state, ctx, &entry, Outcome::Hit).await;
    }
    // Stale: revalidate with a HEAD, which does not count against Docker Hub's pull limit.
    match upstream_head(state, ctx, tag.as_str()).await {
        Ok(head) => match head.into_entry() {
            Some((d, media_type, size)) if d == entry.digest => {
                let entry = tags
                    .put(up, &ctx.repo, tag, d, media_type, size)
                    .await
                    .unwrap_or_else(|e| {
                        tracing::warn!(error = %e, "could not persist tag");
                        entry
                    });
                serve_entry(state, ctx, &entry, Outcome::Revalidated).await
            }
            _ => match tag_miss(state, ctx, tag).await {
                Err(ApiError::Upstream(e)) if e.kind.is_unavailable() => {
                    serve_stale(state, ctx, &entry, e).await
                }
                other => other,
            },
        },
        Err(e) if e.kind.is_unavailable() => serve_stale(state, ctx, &entry, e).await,
        Err(e) => Err(e.into()),
    }
}

async fn serve_stale(
    state: &AppState,
    ctx: &Ctx,
    entry: &TagEntry,
    why: UpstreamError,
) -> Result<Response<Body>, ApiError> {
    tracing::warn!(upstream = %ctx.upstream.name(), repository = %ctx.repo, error = %why, "serving the last known tag mapping");
    if !ctx.head && stored(state, &entry.digest).await.is_none() {
        return Err(why.into());
    }
    serve_entry(state, ctx, entry, Outcome::Stale).await
}

/// Answers from a tag entry: HEAD from the entry alone, GET with the stored manifest (fetched
/// by digest if only the mapping was known).
async fn serve_entry(
    state: &AppState,
    ctx: &Ctx,
    entry: &TagEntry,
    outcome: Outcome,
) -> Result<Response<Body>, ApiError> {
    if ctx.head {
        state.store.usage.touch(&entry.digest);
        return Ok(with_outcome(
            head_response(&entry.digest, &entry.media_type, entry.size),
            outcome,
        ));
    }
    let m = match stored(state, &entry.digest).await {
        Some(m) => m,
        None => fetch(state, ctx, &entry.digest.to_string(), Some(&entry.digest)).await?,
    };
    Ok(with_outcome(manifest_response(&m, false), outcome))
}

/// A tag we cannot answer locally: HEAD asks the upstream with HEAD and records the mapping;
/// GET fetches, verifies, stores and records.
async fn tag_miss(state: &AppState, ctx: &Ctx, tag: &Tag) -> Result<Response<Body>, ApiError> {
    let up = ctx.upstream.name();
    if ctx.head {
        if let Some((d, media_type, size)) =
            upstream_head(state, ctx, tag.as_str()).await?.into_entry()
        {
            if let Err(e) = state
                .store
                .tags
                .put(up, &ctx.repo, tag, d.clone(), media_type.clone(), size)
                .await
            {
                tracing::warn!(error = %e, "could not persist tag");
            }
            // The upstream named this manifest for this repository.
            if let Err(e) = state.store.links.add(up, &ctx.repo, [d.clone()]).await {
                tracing::warn!(error = %e, "could not link the manifest to its repository");
            }
            return Ok(with_outcome(
                head_response(&d, &media_type, size),
                Outcome::Miss,
            ));
        }
    }
    let m = fetch(state, ctx, tag.as_str(), None).await?;
    if let Err(e) = state
        .store
        .tags
        .put(
            up,
            &ctx.repo,
            tag,
            m.digest.clone(),
            m.media_type.clone(),
            m.body.len() as u64,
        )
        .await
    {
        tracing::warn!(error = %e, "could not persist tag");
    }
    Ok(with_outcome(manifest_response(&m, ctx.head), Outcome::Miss))
}

async fn stored(state: &AppState, digest: &Digest) -> Option<Arc<StoredManifest>> {
    match state.store.manifest(digest).await {
        Ok(m) => {
            if m.is_some() {
                state.store.usage.touch(digest);
            }
            m
        }
        Err(e) => {
            tracing::warn!(digest = %digest, error = %e, "could not read stored manifest");
            None
        }
    }
}

fn forwarded_accept(ctx: &Ctx) -> HeaderMap {
    let mut h = HeaderMap::new();
    for v in ctx.headers.get_all(header::ACCEPT) {
        h.append(header::ACCEPT, v.clone());
    }
    h
}

/// What an upstream HEAD of a manifest said.
struct HeadAnswer {
    digest: Option<Digest>,
    media_type: Option<String>,
    size: Option<u64>,
}

impl HeadAnswer {
    fn into_entry(self) -> Option<(Digest, String, u64)> {
        Some((self.digest?, self.media_type?, self.size?))
    }
}

/// The key that decides which replica asks the upstream about `reference`: a digest is owned
/// like a blob, a tag per upstream, repository and tag.
fn owner_key(ctx: &Ctx, reference: &str) -> String {
    if reference.contains(':') {
        reference.to_string()
    } else {
        format!("{}/{}:{reference}", ctx.upstream.name(), ctx.repo)
    }
}

async fn upstream_head(
    state: &AppState,
    ctx: &Ctx,
    reference: &str,
) -> Result<HeadAnswer, UpstreamError> {
    let via = ctx.via(state, &owner_key(ctx, reference));
    let req = UpstreamRequest {
        method: Method::HEAD,
        repo: &ctx.repo,
        path: format!("manifests/{reference}"),
        query: None,
        headers: forwarded_accept(ctx),
        streaming: false,
    };
    let resp = crate::cluster::ask(&ctx.upstream, via.as_ref(), &req).await?;
    let h = resp.headers();
    let text = |name: &str| h.get(name).and_then(|v| v.to_str().ok());
    Ok(HeadAnswer {
        digest: text("docker-content-digest").and_then(|d| d.parse().ok()),
        media_type: text("content-type")
            .map(|t| media::essence(t).to_string())
            .filter(|t| is_manifest_type(t)),
        size: text("content-length").and_then(|s| s.parse().ok()),
    })
}

/// Content types that say nothing about which manifest this is.
fn is_manifest_type(t: &str) -> bool {
    !t.is_empty() && t != "application/octet-stream" && t != "text/plain"
}

/// Manifest fetches in flight, so concurrent requests for the same cold manifest (a whole
/// cluster resolving one tag) cost one upstream GET. The fetch runs in whichever request polls
/// it; if they all go away it is dropped, and the next request resumes it.
#[derive(Default)]
pub struct ManifestFlights {
    map: Mutex<HashMap<String, Flight>>,
}

type Flight = Shared<BoxFuture<'static, Result<Arc<StoredManifest>, ApiError>>>;

/// Fetches a manifest (joining an identical fetch in flight), verifies and stores it.
async fn fetch(
    state: &AppState,
    ctx: &Ctx,
    reference: &str,
    expected: Option<&Digest>,
) -> Result<Arc<StoredManifest>, ApiError> {
    let accept = forwarded_accept(ctx);
    let accept_key: Vec<&str> = accept
        .get_all(header::ACCEPT)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .collect();
    let key = format!(
        "{}\n{}\n{reference}\n{}",
        ctx.upstream.name(),
        ctx.repo,
        accept_key.join(",")
    );
    let flight = state
        .manifest_flights
        .map
        .lock()
        .unwrap()
        .entry(key.clone())
        .or_insert_with(|| {
            fetch_upstream(
                state.store.clone(),
                ctx.upstream.clone(),
                ctx.via(state, &owner_key(ctx, reference)),
                ctx.repo.clone(),
                reference.to_string(),
                expected.cloned(),
                accept,
                state.config.storage.max_manifest_size,
            )
            .boxed()
            .shared()
        })
        .clone();
    let result = flight.clone().await;
    let mut map = state.manifest_flights.map.lock().unwrap();
    if map.get(&key).is_some_and(|f| f.ptr_eq(&flight)) {
        map.remove(&key);
    }
    result
}

/// Fetches a manifest whole (up to the size cap), verifies it (against `expected`, else against
/// the upstream's `Docker-Content-Digest`) and stores it. Storage failure is logged and the
/// manifest still served.
#[allow(clippy::too_many_arguments)]
async fn fetch_upstream(
    store: Arc<Store>,
    up: Arc<Upstream>,
    via: Option<Via>,
    repo: RepoName,
    reference: String,
    expected: Option<Digest>,
    accept: HeaderMap,
    cap: u64,
) -> Result<Arc<StoredManifest>, ApiError> {
    let req = UpstreamRequest {
        method: Method::GET,
        repo: &repo,
        path: format!("manifests/{reference}"),
        query: None,
        headers: accept,
        streaming: false,
    };
    let resp = crate::cluster::ask(&up, via.as_ref(), &req).await?;
    if resp.status() != StatusCode::OK {
        return Err(up
            .error(UpstreamErrorKind::Status(resp.status().as_u16()))
            .into());
    }
    if resp.content_length().is_some_and(|n| n > cap) {
        return Err(up.error(UpstreamErrorKind::TooLarge(cap)).into());
    }
    let header_type = resp
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .map(|t| media::essence(t).to_string())
        .filter(|t| is_manifest_type(t));
    let header_digest: Option<Digest> = resp
        .headers()
        .get("docker-content-digest")
        .and_then(|v| v.to_str().ok())
        .and_then(|d| d.parse().ok());
    let mut body = BytesMut::new();
    let mut stream = resp.bytes_stream();
    while let Some(chunk) = stream.next().await {
        let chunk = chunk.map_err(|e| up.error(up.transport_error(&e)))?;
        if body.len() + chunk.len() > cap as usize {
            return Err(up.error(UpstreamErrorKind::TooLarge(cap)).into());
        }
        body.extend_from_slice(&chunk);
    }
    let body: Bytes = body.freeze();
    let digest = match expected.or(header_digest) {
        Some(want) => {
            let mut h = Hasher::new(want.algorithm());
            h.update(&body);
            if h.finish() != want {
                return Err(up.error(UpstreamErrorKind::DigestMismatch).into());
            }
            want
        }
        None => Digest::sha256_of(&body),
    };
    let media_type = header_type
        .or_else(|| media::sniff(&body))
        .ok_or_else(|| up.error(UpstreamErrorKind::Protocol("manifest without a media type")))?;
    let m = Arc::new(StoredManifest {
        digest,
        media_type,
        body,
    });
    // The upstream served it for this repository.
    if let Err(e) = store.links.add(up.name(), &repo, [m.digest.clone()]).await {
        tracing::warn!(digest = %m.digest, error = %e, "could not link the manifest to its repository");
    }
    if let Err(e) = store.put_manifest(m.clone()).await {
        crate::metrics::storage_error();
        tracing::error!(digest = %m.digest, error = %e, "could not store manifest; serving it uncached");
    }
    Ok(m)
}

fn manifest_headers(digest: &Digest, media_type: &str, size: u64) -> http::response::Builder {
    let mut b = Response::builder()
        .status(StatusCode::OK)
        .header(header::CONTENT_LENGTH, size)
        .header("Docker-Content-Digest", digest.to_string())
        .header(header::ETAG, format!("\"{digest}\""));
    if let Ok(v) = HeaderValue::from_str(media_type) {
        b = b.header(header::CONTENT_TYPE, v);
    }
    b
}

fn manifest_response(m: &StoredManifest, head: bool) -> Response<Body> {
    manifest_headers(&m.digest, &m.media_type, m.body.len() as u64)
        .body(if head {
            body::empty()
        } else {
            body::full(m.body.clone())
        })
        .expect("valid response")
}

fn head_response(digest: &Digest, media_type: &str, size: u64) -> Response<Body> {
    manifest_headers(digest, media_type, size)
        .body(body::empty())
        .expect("valid response")
}
