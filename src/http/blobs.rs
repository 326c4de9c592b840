//! `GET|HEAD /v2/<name>/blobs/<digest>`: serve from the store, follow a fill, or start one.
//! HEAD never starts a fill: on a miss it asks the upstream with HEAD.

use std::sync::Arc;

use bytes::Bytes;
use futures_util::StreamExt;
use http::{header, HeaderMap, HeaderValue, Method, Response, StatusCode};

use super::access_log::Outcome;
use super::body::{self, Body, BoxError};
use super::{scope, with_outcome, AppState, Ctx};
use crate::cache::fill::Origin;
use crate::cache::{read, BlobState, FillError, FillSource, Progress};
use crate::cluster::Via;
use crate::error::ApiError;
use crate::oci::range::{RangeSpec, Resolved};
use crate::oci::{Digest, Hasher, Kind};
use crate::upstream::UpstreamRequest;

pub async fn serve(
    state: &AppState,
    ctx: &Ctx,
    digest: Digest,
) -> Result<Response<Body>, ApiError> {
    let range = ctx
        .headers
        .get(header::RANGE)
        .and_then(|v| v.to_str().ok())
        .and_then(RangeSpec::parse);
    // Shared storage may serve committed blobs itself (S3 `redirect = true`); not to another
    // replica, which keeps a copy of what it is sent.
    if !ctx.head && ctx.peer.is_none() {
        if let Some(url) = state.store.redirect(&digest).await {
            scope::check(state, ctx, &digest, Kind::Blob).await?;
            state.store.usage.touch(&digest);
            let r = Response::builder()
                .status(StatusCode::TEMPORARY_REDIRECT)
                .header(header::LOCATION, url)
                .header("Docker-Content-Digest", digest.to_string())
                .body(body::empty())
                .expect("valid response");
            return Ok(with_outcome(r, Outcome::Hit));
        }
    }
    // On shared storage, a replica that has nothing of a blob its owner is filling relays the
    // owner's (verified) stream instead of hashing and writing a copy of its own: the cluster
    // does the work of a fill once. Its local tier fills from the bucket on a later request.
    if !ctx.head && state.store.is_tiered() {
        if let Some(via) = ctx.via(state, &digest.to_string()) {
            let absent = matches!(state.store.blob(&digest, None).await, Ok(BlobState::Miss))
                && !state.store.has_blob(&digest).await.unwrap_or(true);
            if absent {
                let relayed = if range.is_none() {
                    shared_relay(state, ctx, via, &digest).await
                } else {
                    relay(ctx, &via, &digest).await
                };
                match relayed {
                    Ok(r) => return Ok(with_outcome(r, Outcome::Miss)),
                    Err(e) => {
                        tracing::warn!(digest = %digest, error = %e, "owner replica unavailable; filling here")
                    }
                }
            }
        }
    }
    // HEAD never starts a fill, and neither does anything offline (a miss is then a 404).
    let source = (!ctx.head && !ctx.upstream.offline()).then(|| FillSource {
        upstream: ctx.upstream.clone(),
        repo: ctx.repo.clone(),
        via: ctx.via(state, &digest.to_string()),
    });
    let found = state
        .store
        .blob(&digest, source)
        .await
        .map_err(ApiError::internal)?;
    match found {
        BlobState::Hit { data } => {
            scope::check(state, ctx, &digest, Kind::Blob).await?;
            state.store.usage.touch(&digest);
            let reading = state.store.usage.reading(&digest);
            let r = respond(&digest, data.len() as u64, range, ctx.head, |start, end| {
                let slices = read::slices(data.slice(start as usize..end as usize));
                // The guard lives as long as the body: the blob is not evicted under a reader.
                body::stream(in_use(slices, reading))
            })?;
            Ok(with_outcome(r, Outcome::Hit))
        }
        BlobState::Fill { fill, joined } => {
            // A fill from this pair's upstream needs no confirmation; bytes that came through
            // another pair, or from shared storage, do.
            let src = fill.source();
            let own = src.upstream.name() == ctx.upstream.name()
                && src.repo == ctx.repo
                && !matches!(fill.origin(), Origin::Shared { .. });
            if !own {
                scope::check(state, ctx, &digest, Kind::Blob).await?;
            }
            // Its file is being read: eviction leaves it alone (the fill may commit any moment).
            let reading = state.store.usage.reading(&digest);
            let outcome = if joined {
                Outcome::Joined
            } else {
                Outcome::Miss
            };
            let size = match fill.started().await {
                Progress::Streaming {
                    total: Some(size), ..
                }
                | Progress::Done { size, .. } => size,
                Progress::Streaming { total: None, .. } => {
                    if range.is_none() && !ctx.head {
                        // No size yet and none needed: stream the whole blob as it comes.
                        let r = Response::builder()
                            .status(StatusCode::OK)
                            .header(header::CONTENT_TYPE, "application/octet-stream")
                            .header("Docker-Content-Digest", digest.to_string())
                            .header(header::ACCEPT_RANGES, "bytes")
                            .body(body::stream(in_use(read::follow(fill, 0, None), reading)))
                            .expect("valid response");
                        return Ok(with_outcome(r, outcome));
                    }
                    match fill.finished().await {
                        Progress::Done { size, .. } => size,
                        Progress::Failed(e) => return fill_failed(ctx, &digest, e).await,
                        _ => unreachable!("finished() waits for Done or Failed"),
                    }
                }
                Progress::Failed(e) => return fill_failed(ctx, &digest, e).await,
                Progress::Connecting => unreachable!("started() waits past Connecting"),
            };
            let r = respond(&digest, size, range, ctx.head, |start, end| {
                body::stream(in_use(read::follow(fill, start, Some(end)), reading))
            })?;
            Ok(with_outcome(r, outcome))
        }
        BlobState::Miss => {
            head_upstream(ctx, ctx.via(state, &digest.to_string()), &digest, range).await
        }
    }
}

/// `stream`, holding `guard` for as long as the body is alive.
fn in_use<S: futures_util::Stream + Send + 'static, G: Send + 'static>(
    stream: S,
    guard: G,
) -> impl futures_util::Stream<Item = S::Item> + Send {
    stream.inspect(move |_| {
        let _ = &guard;
    })
}

/// The whole blob from the owner, on the stream this replica's clients share
/// (`cluster::fanout`): the owner serves one stream per replica, not one per client.
async fn shared_relay(
    state: &AppState,
    ctx: &Ctx,
    via: Via,
    digest: &Digest,
) -> Result<Response<Body>, crate::cluster::ForwardError> {
    let source = crate::cluster::fanout::Source {
        via,
        upstream: ctx.upstream.name().to_string(),
        repo: ctx.repo.clone(),
        digest: digest.clone(),
    };
    let (total, stream) = state.fanouts.whole(source).await?;
    let mut b = passed_through(StatusCode::OK, digest, &HeaderMap::new());
    if let Some(n) = total {
        b = b.header(header::CONTENT_LENGTH, n);
    }
    Ok(b.body(body::stream(stream)).expect("valid response"))
}

/// The head of a blob response whose body comes from elsewhere (the upstream or the owner
/// replica): its status, and its length and range as the source sent them.
fn passed_through(
    status: StatusCode,
    digest: &Digest,
    source: &HeaderMap,
) -> http::response::Builder {
    let mut b = Response::builder()
        .status(status)
        .header(header::CONTENT_TYPE, "application/octet-stream")
        .header("Docker-Content-Digest", digest.to_string())
        .header(header::ACCEPT_RANGES, "bytes");
    for h in [header::CONTENT_LENGTH, header::CONTENT_RANGE] {
        if let Some(v) = source.get(&h) {
            b = b.header(h, v.clone());
        }
    }
    b
}

/// The owner's answer to this request (Range included), streamed through. The owner holds its
/// last byte back until it verified the blob, so a relayed body that ends cleanly is whole.
async fn relay(
    ctx: &Ctx,
    via: &Via,
    digest: &Digest,
) -> Result<Response<Body>, crate::cluster::ForwardError> {
    let mut headers = identity();
    if let Some(r) = ctx
        .headers
        .get(header::RANGE)
        .filter(|v| v.to_str().ok().and_then(RangeSpec::parse).is_some())
    {
        headers.insert(header::RANGE, r.clone());
    }
    let req = UpstreamRequest {
        method: Method::GET,
        repo: &ctx.repo,
        path: format!("blobs/{digest}"),
        query: None,
        headers,
        streaming: true,
    };
    crate::metrics::cluster_relay_stream("range");
    let resp = via
        .cluster
        .forward(&via.owner, ctx.upstream.name(), &req)
        .await?;
    let b = passed_through(resp.status(), digest, resp.headers());
    let stream = resp.bytes_stream().map(|r| r.map_err(BoxError::from));
    Ok(b.body(body::stream(stream)).expect("valid response"))
}

async fn fill_failed(ctx: &Ctx, digest: &Digest, e: FillError) -> Result<Response<Body>, ApiError> {
    match e {
        FillError::Upstream(e) => Err(e.into()),
        FillError::Storage(why) => {
            tracing::error!(digest = %digest, error = %why, "store unavailable; serving straight from upstream");
            bypass(ctx, digest).await
        }
        FillError::Cancelled => Err(ApiError::Internal("server shutting down".into())),
    }
}

/// The headers (and body, unless HEAD) for a blob of `size` bytes and an optional range.
fn respond(
    digest: &Digest,
    size: u64,
    range: Option<RangeSpec>,
    head: bool,
    body: impl FnOnce(u64, u64) -> Body,
) -> Result<Response<Body>, ApiError> {
    let (status, start, end) = match range.map(|r| r.resolve(size)) {
        None => (StatusCode::OK, 0, size),
        Some(Resolved::Partial { start, end }) => (StatusCode::PARTIAL_CONTENT, start, end),
        Some(Resolved::Unsatisfiable) => return Err(ApiError::RangeNotSatisfiable { size }),
    };
    let mut b = Response::builder()
        .status(status)
        .header(header::CONTENT_TYPE, "application/octet-stream")
        .header(header::CONTENT_LENGTH, end - start)
        .header("Docker-Content-Digest", digest.to_string())
        .header(header::ACCEPT_RANGES, "bytes")
        .header(header::ETAG, format!("\"{digest}\""))
        .header(header::CACHE_CONTROL, "max-age=31536000");
    if status == StatusCode::PARTIAL_CONTENT {
        b = b.header(
            header::CONTENT_RANGE,
            format!("bytes {start}-{}/{size}", end - 1),
        );
    }
    let body = if head || start == end {
        body::empty()
    } else {
        body(start, end)
    };
    Ok(b.body(body).expect("valid response"))
}

/// HEAD of a blob that is neither stored nor filling: ask the owner replica or the upstream,
/// fetch nothing.
async fn head_upstream(
    ctx: &Ctx,
    via: Option<Via>,
    digest: &Digest,
    range: Option<RangeSpec>,
) -> Result<Response<Body>, ApiError> {
    let req = UpstreamRequest {
        method: Method::HEAD,
        repo: &ctx.repo,
        path: format!("blobs/{digest}"),
        query: None,
        headers: identity(),
        streaming: false,
    };
    let resp = crate::cluster::ask(&ctx.upstream, via.as_ref(), &req).await?;
    // The header, not `content_length()`: for HEAD that is the (empty) body's size.
    let size: Option<u64> = resp
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse().ok());
    let size = size.ok_or_else(|| {
        ApiError::from(
            ctx.upstream
                .error(crate::upstream::UpstreamErrorKind::Protocol(
                    "blob HEAD without Content-Length",
                )),
        )
    })?;
    let r = respond(digest, size, range, true, |_, _| body::empty())?;
    Ok(with_outcome(r, Outcome::Miss))
}

fn identity() -> HeaderMap {
    let mut h = HeaderMap::new();
    h.insert(
        header::ACCEPT_ENCODING,
        HeaderValue::from_static("identity"),
    );
    h
}

/// The store cannot take the blob: forward the request upstream (with the client's range) and
/// stream the answer, still verifying a whole body against its digest.
async fn bypass(ctx: &Ctx, digest: &Digest) -> Result<Response<Body>, ApiError> {
    let mut headers = identity();
    let range = ctx
        .headers
        .get(header::RANGE)
        .filter(|v| v.to_str().ok().and_then(RangeSpec::parse).is_some());
    if let Some(r) = range {
        headers.insert(header::RANGE, r.clone());
    }
    let resp = ctx
        .upstream
        .send(&UpstreamRequest {
            method: Method::GET,
            repo: &ctx.repo,
            path: format!("blobs/{digest}"),
            query: None,
            headers,
            streaming: true,
        })
        .await?;
    let status = resp.status();
    if status == StatusCode::RANGE_NOT_SATISFIABLE {
        let size = resp
            .headers()
            .get(header::CONTENT_RANGE)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.rsplit('/').next())
            .and_then(|s| s.parse().ok())
            .unwrap_or(0);
        return Err(ApiError::RangeNotSatisfiable { size });
    }
    let b = passed_through(status, digest, resp.headers());
    let upstream = resp.bytes_stream().map(|r| r.map_err(BoxError::from));
    let body = if status == StatusCode::OK {
        body::stream(verified(upstream, digest.clone()))
    } else {
        body::stream(upstream)
    };
    Ok(with_outcome(
        b.body(body).expect("valid response"),
        Outcome::Bypass,
    ))
}

/// Passes a whole blob through, verifying it. The last chunk is held back until the digest is
/// checked, so a mismatch ends the body with an error and never looks like a complete blob.
fn verified(
    inner: impl futures_util::Stream<Item = Result<Bytes, BoxError>> + Send + 'static,
    digest: Digest,
) -> impl futures_util::Stream<Item = Result<Bytes, BoxError>> + Send {
    struct St<S> {
        inner: std::pin::Pin<Box<S>>,
        hasher: Hasher,
        held: Option<Bytes>,
        digest: Arc<Digest>,
        done: bool,
    }
    let st = St {
        inner: Box::pin(inner),
        hasher: Hasher::new(digest.algorithm()),
        held: None,
        digest: Arc::new(digest),
        done: false,
    };
    futures_util::stream::try_unfold(st, |mut st| async move {
        if st.done {
            return Ok(None);
        }
        loop {
            match st.inner.next().await {
                Some(Ok(bytes)) if bytes.is_empty() => continue,
                Some(Ok(bytes)) => {
                    st.hasher.update(&bytes);
                    if let Some(prev) = st.held.replace(bytes) {
                        return Ok(Some((prev, st)));
                    }
                }
                Some(Err(e)) => return Err(e),
                None => {
                    let actual = st.hasher.clone().finish();
                    if actual != *st.digest {
                        return Err(BoxError::from("upstream blob does not match its digest"));
                    }
                    st.done = true;
                    return match st.held.take() {
                        Some(last) => Ok(Some((last, st))),
                        None => Ok(None),
                    };
                }
            }
        }
    })
}
