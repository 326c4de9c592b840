//! The listings: `tags/list`, forwarded to the upstream and not cached (with its `Link`
//! rewritten to point at the proxy), and `referrers/<digest>`, cached per (upstream, repository,
//! subject) like a tag: answered from the store within the upstream's `tag_ttl`, refetched
//! after it, the last answer served when the upstream is unavailable or entrepot is offline.
//!
//! # Referrers
//!
//! The stored answer is the upstream's whole, unfiltered index (its pages joined when it pages),
//! kept as a manifest: served byte for byte, and `?artifactType=` filters are applied here to
//! that one copy (with `OCI-Filters-Applied: artifactType`), never forwarded. An upstream
//! without the referrers API answers 404; that is passed on (and remembered for the TTL), so
//! clients fall back to the `sha256-<hex>` tag schema themselves, as the distribution spec
//! says they must. With nothing recorded for a subject:
//! - upstream unavailable or entrepot offline: a stored `sha256-<hex>` tag-schema index (an
//!   import brings one, see `tools::bundle`) answers, since the spec says it holds what the
//!   referrers API would;
//! - else, offline: a valid empty index. A registry with the referrers API must not answer
//!   404, and "no referrers are known here" is what an empty list says; a 404 would also send
//!   clients to a tag schema that, with nothing stored, is not there either.

use std::sync::Arc;

use bytes::{Bytes, BytesMut};
use futures_util::StreamExt;
use http::{header, HeaderMap, HeaderValue, Method, Response, StatusCode};
use http_body_util::BodyExt;

use super::access_log::Outcome;
use super::body::{self, Body};
use super::{with_outcome, AppState, Ctx};
use crate::cache::referrers::{self, ReferrersAnswer, ReferrersEntry};
use crate::cache::StoredManifest;
use crate::error::ApiError;
use crate::oci::{media, Digest};
use crate::upstream::{UpstreamError, UpstreamErrorKind, UpstreamRequest};

/// Tag lists and referrer indexes are small JSON documents; this bounds what is buffered.
const MAX_LISTING: usize = 16 << 20;

/// Keeps only the query parameters that the upstream should see (not `ns`).
fn forward_query(ctx: &Ctx, keep: &[&str]) -> Option<String> {
    let q = ctx.query.as_deref()?;
    let pairs: Vec<(String, String)> = url::form_urlencoded::parse(q.as_bytes())
        .filter(|(k, _)| keep.contains(&k.as_ref()))
        .map(|(k, v)| (k.into_owned(), v.into_owned()))
        .collect();
    if pairs.is_empty() {
        return None;
    }
    Some(
        url::form_urlencoded::Serializer::new(String::new())
            .extend_pairs(pairs)
            .finish(),
    )
}

/// `tags/list`, paginated as the spec says whatever the upstream does: an upstream that pages
/// itself (answers with a `Link`) has its page passed on with the link rewritten; one that
/// ignores `n` and `last` (distribution 2.x) has its list sorted, cut after `last` and to `n`
/// here, with our own `Link` to the next page. `name` is the name the client asked for.
pub async fn tags_list(ctx: &Ctx) -> Result<Response<Body>, ApiError> {
    let params: Vec<(String, String)> = ctx
        .query
        .as_deref()
        .map(|q| {
            url::form_urlencoded::parse(q.as_bytes())
                .map(|(k, v)| (k.into_owned(), v.into_owned()))
                .collect()
        })
        .unwrap_or_default();
    let param = |name: &str| {
        params
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.clone())
    };
    let n: Option<usize> = match param("n") {
        Some(v) => Some(v.parse().map_err(|_| ApiError::PaginationInvalid)?),
        None => None,
    };
    let last = param("last");
    let query = forward_query(ctx, &["n", "last"]);
    let resp = forward(ctx, "tags/list".to_string(), query, |name, value| {
        (name == header::LINK)
            .then(|| rewrite_link(ctx, value))
            .flatten()
    })
    .await?;
    if ctx.head || resp.status() != http::StatusCode::OK {
        return Ok(resp);
    }
    let upstream_paged = resp.headers().contains_key(header::LINK);
    let (mut parts, body) = resp.into_parts();
    let bytes = body
        .collect()
        .await
        .map_err(|e| ApiError::internal(format!("reading tag list: {e}")))?
        .to_bytes();
    #[derive(serde::Deserialize)]
    struct TagList {
        tags: Option<Vec<String>>,
    }
    let list: TagList = serde_json::from_slice(&bytes).map_err(|_| {
        ApiError::from(
            ctx.upstream
                .error(UpstreamErrorKind::Protocol("tag list is not valid JSON")),
        )
    })?;
    let mut tags = list.tags.unwrap_or_default();
    if !upstream_paged {
        tags.sort();
        tags.dedup();
        if let Some(last) = &last {
            tags.retain(|t| t > last);
        }
        if let Some(n) = n {
            if tags.len() > n {
                tags.truncate(n);
                if let Some(next_last) = tags.last() {
                    let link = own_link(ctx, n, next_last);
                    if let Ok(v) = HeaderValue::from_str(&link) {
                        parts.headers.insert(header::LINK, v);
                    }
                }
            }
        }
    }
    let json = serde_json::json!({ "name": ctx.client_name.as_str(), "tags": tags }).to_string();
    parts.headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    parts
        .headers
        .insert(header::CONTENT_LENGTH, json.len().into());
    Ok(Response::from_parts(parts, body::full(json)))
}

/// Our own next-page link, under the name the client used.
fn own_link(ctx: &Ctx, n: usize, last: &str) -> String {
    let mut ser = url::form_urlencoded::Serializer::new(String::new());
    ser.append_pair("n", &n.to_string());
    ser.append_pair("last", last);
    if let Some(ns) = &ctx.ns {
        ser.append_pair("ns", ns);
    }
    format!(
        "</v2/{}/tags/list?{}>; rel=\"next\"",
        ctx.client_name,
        ser.finish()
    )
}

/// Pages of one referrers list followed before giving up on an upstream.
const MAX_REFERRER_PAGES: usize = 64;

/// What offline entrepot answers for a subject it knows nothing about.
const EMPTY_INDEX: &str =
    r#"{"schemaVersion":2,"mediaType":"application/vnd.oci.image.index.v1+json","manifests":[]}"#;

/// What is known of a subject's referrers, ready to serve.
enum Known {
    Index(Arc<StoredManifest>),
    /// The upstream has no referrers API (it said 404).
    Unsupported,
}

/// `referrers/<subject>`: see the module's notes.
pub async fn referrers(
    state: &AppState,
    ctx: &Ctx,
    subject: &Digest,
) -> Result<Response<Body>, ApiError> {
    let filter = artifact_types(ctx);
    let offline = ctx.upstream.offline();
    let stored = last_known(state, ctx, subject).await;
    if let Some((known, entry)) = &stored {
        let ttl = ctx.upstream.config().tag_ttl;
        if offline || state.store.referrers.is_fresh(entry, ttl) {
            return answer(ctx, known, &filter, Outcome::Hit);
        }
    }
    if offline {
        return match tag_schema_index(state, ctx, subject).await {
            Some(m) => answer(ctx, &Known::Index(m), &filter, Outcome::Hit),
            None => Ok(index_response(
                ctx,
                Bytes::from_static(EMPTY_INDEX.as_bytes()),
                !filter.is_empty(),
                Outcome::Miss,
            )),
        };
    }
    let before = stored.as_ref().map(|(_, e)| e.answer.clone());
    match refresh(state, ctx, subject, before).await {
        Ok((known, outcome)) => answer(ctx, &known, &filter, outcome),
        Err(e) if e.kind.is_unavailable() => {
            let last = match stored {
                Some((known, _)) => Some(known),
                None => tag_schema_index(state, ctx, subject)
                    .await
                    .map(Known::Index),
            };
            match last {
                Some(known) => {
                    tracing::warn!(upstream = %ctx.upstream.name(), repository = %ctx.repo, subject = %subject, error = %e, "serving the last known referrers");
                    answer(ctx, &known, &filter, Outcome::Stale)
                }
                None => Err(e.into()),
            }
        }
        Err(e) => Err(e.into()),
    }
}

/// The `artifactType` values the client filters on (any of them matches). A `+` left unescaped
/// (`application/spdx+json`) decodes as a space, which no media type holds: it is read back
/// as the `+` it was.
fn artifact_types(ctx: &Ctx) -> Vec<String> {
    let Some(q) = ctx.query.as_deref() else {
        return Vec::new();
    };
    url::form_urlencoded::parse(q.as_bytes())
        .filter(|(k, v)| k == "artifactType" && !v.is_empty())
        .map(|(_, v)| v.replace(' ', "+"))
        .collect()
}

/// The recorded answer for `subject`, with its index read from the store. A record whose index
/// is gone (evicted) counts as none.
async fn last_known(
    state: &AppState,
    ctx: &Ctx,
    subject: &Digest,
) -> Option<(Known, ReferrersEntry)> {
    let entry = state
        .store
        .referrers
        .get(ctx.upstream.name(), &ctx.repo, subject)
        .await?;
    let known = match &entry.answer {
        ReferrersAnswer::Unsupported => Known::Unsupported,
        ReferrersAnswer::Index(d) => match state.store.manifest(d).await {
            Ok(Some(m)) => {
                state.store.usage.touch(d);
                Known::Index(m)
            }
            Ok(None) => return None,
            Err(e) => {
                tracing::warn!(digest = %d, error = %e, "could not read a stored referrers index");
                return None;
            }
        },
    };
    Some((known, entry))
}

/// The stored index tagged with the referrers tag schema (`sha256-<hex>`), if any.
async fn tag_schema_index(
    state: &AppState,
    ctx: &Ctx,
    subject: &Digest,
) -> Option<Arc<StoredManifest>> {
    let tag = referrers::tag_schema(subject);
    let entry = state
        .store
        .tags
        .get(ctx.upstream.name(), &ctx.repo, &tag)
        .await?;
    let m = state.store.manifest(&entry.digest).await.ok()??;
    (m.media_type == media::OCI_INDEX).then(|| {
        state.store.usage.touch(&m.digest);
        m
    })
}

/// Asks the upstream (one request per subject at a time; a request that waited for another's
/// refresh takes its answer) and records what it says. `before` is what was recorded.
async fn refresh(
    state: &AppState,
    ctx: &Ctx,
    subject: &Digest,
    before: Option<ReferrersAnswer>,
) -> Result<(Known, Outcome), UpstreamError> {
    let index = &state.store.referrers;
    let up = ctx.upstream.name();
    let _turn = index.refresh_turn(up, &ctx.repo, subject).await;
    if let Some((known, entry)) = last_known(state, ctx, subject).await {
        if index.is_fresh(&entry, ctx.upstream.config().tag_ttl) {
            return Ok((known, Outcome::Joined));
        }
    }
    let (known, answer) = match fetch_index(state, ctx, subject).await {
        Ok(body) => {
            let m = Arc::new(StoredManifest {
                digest: Digest::sha256_of(&body),
                media_type: media::OCI_INDEX.to_string(),
                body,
            });
            if let Err(e) = state.store.put_manifest(m.clone()).await {
                crate::metrics::storage_error();
                tracing::error!(digest = %m.digest, error = %e, "could not store a referrers index; serving it uncached");
                return Ok((Known::Index(m), Outcome::Bypass));
            }
            let answer = ReferrersAnswer::Index(m.digest.clone());
            (Known::Index(m), answer)
        }
        Err(e) if matches!(e.kind, UpstreamErrorKind::NotFound) => {
            (Known::Unsupported, ReferrersAnswer::Unsupported)
        }
        Err(e) => return Err(e),
    };
    let outcome = if before.as_ref() == Some(&answer) {
        Outcome::Revalidated
    } else {
        Outcome::Miss
    };
    if let Err(e) = index.put(up, &ctx.repo, subject, answer).await {
        crate::metrics::storage_error();
        tracing::warn!(error = %e, "could not persist a referrers record");
    }
    Ok((known, outcome))
}

/// The upstream's whole referrers list for `subject`, unfiltered: its bytes as sent when it
/// fits one page, else its pages (followed by their `Link`) joined into one index.
async fn fetch_index(
    state: &AppState,
    ctx: &Ctx,
    subject: &Digest,
) -> Result<Bytes, UpstreamError> {
    let up = &ctx.upstream;
    let via = ctx.via(
        state,
        &format!("{}/{}/referrers/{subject}", up.name(), ctx.repo),
    );
    let mut pages: Vec<Bytes> = Vec::new();
    let mut total = 0;
    let mut query = None;
    loop {
        let mut headers = HeaderMap::new();
        headers.insert(header::ACCEPT, HeaderValue::from_static(media::OCI_INDEX));
        let req = UpstreamRequest {
            method: Method::GET,
            repo: &ctx.repo,
            path: format!("referrers/{subject}"),
            query: query.take(),
            headers,
            streaming: false,
        };
        let resp = crate::cluster::ask(up, via.as_ref(), &req).await?;
        if resp.status() != StatusCode::OK {
            return Err(up.error(UpstreamErrorKind::Status(resp.status().as_u16())));
        }
        let next = next_page(resp.headers());
        let mut stream = resp.bytes_stream();
        let mut buf = BytesMut::new();
        while let Some(chunk) = stream.next().await {
            let chunk = chunk.map_err(|e| up.error(up.transport_error(&e)))?;
            total += chunk.len();
            if total > MAX_LISTING {
                return Err(up.error(UpstreamErrorKind::Protocol("listing too large")));
            }
            buf.extend_from_slice(&chunk);
        }
        pages.push(buf.freeze());
        match next {
            None => break,
            Some(_) if pages.len() >= MAX_REFERRER_PAGES => {
                return Err(up.error(UpstreamErrorKind::Protocol(
                    "referrers list has too many pages",
                )))
            }
            Some(q) => query = Some(q),
        }
    }
    join_pages(pages).ok_or_else(|| {
        up.error(UpstreamErrorKind::Protocol(
            "referrers list is not an image index",
        ))
    })
}

/// The query of a `Link: <...?last=x>; rel="next"` header, to ask the same path with.
fn next_page(headers: &HeaderMap) -> Option<String> {
    headers
        .get_all(header::LINK)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter(|link| link.contains("rel=\"next\"") || link.contains("rel=next"))
        .find_map(|link| {
            let start = link.find('<')?;
            let end = start + link[start..].find('>')?;
            let (_, query) = link[start + 1..end].split_once('?')?;
            Some(query.to_string())
        })
}

/// One index from the pages of a referrers list (a single page as it is), or `None` when a
/// page is not an image index.
fn join_pages(mut pages: Vec<Bytes>) -> Option<Bytes> {
    type Index = serde_json::Map<String, serde_json::Value>;
    let mut parsed = Vec::with_capacity(pages.len());
    for page in &pages {
        let v: Index = serde_json::from_slice(page).ok()?;
        v.get("manifests")?.as_array()?;
        parsed.push(v);
    }
    if pages.len() == 1 {
        return pages.pop();
    }
    let mut all = Vec::new();
    for v in &mut parsed {
        if let Some(serde_json::Value::Array(list)) = v.remove("manifests") {
            all.extend(list);
        }
    }
    let mut first = parsed.into_iter().next()?;
    first.insert("manifests".into(), serde_json::Value::Array(all));
    serde_json::to_vec(&first).ok().map(Bytes::from)
}

/// `index` with only the descriptors whose `artifactType` is one of `types`.
fn filter_index(index: &[u8], types: &[String]) -> Option<Bytes> {
    let mut v: serde_json::Map<String, serde_json::Value> = serde_json::from_slice(index).ok()?;
    if let Some(serde_json::Value::Array(list)) = v.get_mut("manifests") {
        list.retain(|d| {
            d.get("artifactType")
                .and_then(|t| t.as_str())
                .is_some_and(|t| types.iter().any(|w| w == t))
        });
    }
    serde_json::to_vec(&v).ok().map(Bytes::from)
}

fn answer(
    ctx: &Ctx,
    known: &Known,
    filter: &[String],
    outcome: Outcome,
) -> Result<Response<Body>, ApiError> {
    let m = match known {
        Known::Index(m) => m,
        Known::Unsupported => return Err(ctx.upstream.error(UpstreamErrorKind::NotFound).into()),
    };
    if filter.is_empty() {
        return Ok(index_response(ctx, m.body.clone(), false, outcome));
    }
    let body = filter_index(&m.body, filter).ok_or_else(|| {
        ApiError::internal(format!("stored referrers index {} is not JSON", m.digest))
    })?;
    Ok(index_response(ctx, body, true, outcome))
}

fn index_response(ctx: &Ctx, index: Bytes, filtered: bool, outcome: Outcome) -> Response<Body> {
    let mut b = Response::builder()
        .status(StatusCode::OK)
        .header(header::CONTENT_TYPE, media::OCI_INDEX)
        .header(header::CONTENT_LENGTH, index.len());
    if filtered {
        b = b.header("OCI-Filters-Applied", "artifactType");
    }
    let body = if ctx.head {
        body::empty()
    } else {
        body::full(index)
    };
    with_outcome(b.body(body).expect("valid response"), outcome)
}

/// Forwards GET/HEAD and copies the body, its type, and the headers `keep` returns a value for.
async fn forward(
    ctx: &Ctx,
    path: String,
    query: Option<String>,
    keep: impl Fn(&header::HeaderName, &HeaderValue) -> Option<HeaderValue>,
) -> Result<Response<Body>, ApiError> {
    let up = &ctx.upstream;
    let mut headers = HeaderMap::new();
    for v in ctx.headers.get_all(header::ACCEPT) {
        headers.append(header::ACCEPT, v.clone());
    }
    let resp = up
        .send(&UpstreamRequest {
            method: if ctx.head { Method::HEAD } else { Method::GET },
            repo: &ctx.repo,
            path,
            query,
            headers,
            streaming: false,
        })
        .await?;
    let mut b = Response::builder().status(resp.status());
    for (name, value) in resp.headers() {
        if name == header::CONTENT_TYPE {
            b = b.header(name, value.clone());
        } else if let Some(v) = keep(name, value) {
            b = b.header(name, v);
        }
    }
    if ctx.head {
        if let Some(len) = resp.headers().get(header::CONTENT_LENGTH) {
            b = b.header(header::CONTENT_LENGTH, len.clone());
        }
        return Ok(with_outcome(
            b.body(body::empty()).expect("valid response"),
            Outcome::Bypass,
        ));
    }
    let mut buf = BytesMut::new();
    let mut stream = resp.bytes_stream();
    while let Some(chunk) = stream.next().await {
        let chunk = chunk.map_err(|e| up.error(up.transport_error(&e)))?;
        if buf.len() + chunk.len() > MAX_LISTING {
            return Err(up
                .error(UpstreamErrorKind::Protocol("listing too large"))
                .into());
        }
        buf.extend_from_slice(&chunk);
    }
    let r = b
        .header(header::CONTENT_LENGTH, buf.len())
        .body(body::full(buf.freeze()))
        .expect("valid response");
    Ok(with_outcome(r, Outcome::Bypass))
}

/// `<…/v2/<upstream repo>/tags/list?last=x&n=2>; rel="next"` → the same page through the proxy,
/// under the name the client used (and its `ns=`, if any). Only `n` and `last` are carried over.
fn rewrite_link(ctx: &Ctx, value: &HeaderValue) -> Option<HeaderValue> {
    let v = value.to_str().ok()?;
    let start = v.find('<')?;
    let end = start + v[start..].find('>')?;
    let target = &v[start + 1..end];
    let rest = &v[end + 1..];
    let query = target.split_once('?').map(|(_, q)| q).unwrap_or("");
    let mut ser = url::form_urlencoded::Serializer::new(String::new());
    for (k, val) in url::form_urlencoded::parse(query.as_bytes()) {
        if k == "n" || k == "last" {
            ser.append_pair(&k, &val);
        }
    }
    if let Some(ns) = &ctx.ns {
        ser.append_pair("ns", ns);
    }
    let q = ser.finish();
    let link = if q.is_empty() {
        format!("</v2/{}/tags/list>{rest}", ctx.client_name)
    } else {
        format!("</v2/{}/tags/list?{q}>{rest}", ctx.client_name)
    };
    HeaderValue::from_str(&link).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_next_page_is_the_query_of_the_link_marked_next() {
        let mut h = HeaderMap::new();
        assert_eq!(next_page(&h), None);
        h.insert(
            header::LINK,
            HeaderValue::from_static(
                "<https://r.example/v2/a/referrers/sha256:x?n=1&last=y>; rel=\"prev\", </v2/a/referrers/sha256:x?n=1&last=z>; rel=\"next\"",
            ),
        );
        assert_eq!(next_page(&h).as_deref(), Some("n=1&last=z"));
        h.insert(
            header::LINK,
            HeaderValue::from_static("</v2/a/referrers/sha256:x>; rel=next"),
        );
        assert_eq!(
            next_page(&h),
            None,
            "a next page without a query cannot be asked for"
        );
    }

    #[test]
    fn one_page_is_kept_as_sent_and_pages_are_joined() {
        let page = |d: &str| {
            Bytes::from(format!(
                r#"{{"schemaVersion":2,"manifests":[{{"digest":"{d}","artifactType":"t/{d}"}}]}}"#
            ))
        };
        assert_eq!(join_pages(vec![page("a")]), Some(page("a")));
        let joined = join_pages(vec![page("a"), page("b")]).unwrap();
        let v: serde_json::Value = serde_json::from_slice(&joined).unwrap();
        assert_eq!(v["manifests"][0]["digest"], "a");
        assert_eq!(v["manifests"][1]["digest"], "b");
        assert_eq!(join_pages(vec![Bytes::from_static(b"{}")]), None);
        assert_eq!(join_pages(vec![page("a"), Bytes::from_static(b"[]")]), None);

        let only_b = filter_index(&joined, &["t/b".to_string()]).unwrap();
        let v: serde_json::Value = serde_json::from_slice(&only_b).unwrap();
        assert_eq!(v["manifests"].as_array().unwrap().len(), 1);
        assert_eq!(v["manifests"][0]["digest"], "b");
    }
}
