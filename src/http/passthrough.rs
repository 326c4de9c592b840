//! Endpoints forwarded to the upstream and not cached: `tags/list` (with its `Link` rewritten to
//! point at the proxy) and `referrers/<digest>`.

use bytes::BytesMut;
use futures_util::StreamExt;
use http::{header, HeaderMap, HeaderValue, Method, Response};
use http_body_util::BodyExt;

use super::access_log::Outcome;
use super::body::{self, Body};
use super::{with_outcome, Ctx};
use crate::error::ApiError;
use crate::oci::Digest;
use crate::upstream::{UpstreamErrorKind, UpstreamRequest};

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

pub async fn referrers(ctx: &Ctx, digest: &Digest) -> Result<Response<Body>, ApiError> {
    let query = forward_query(ctx, &["artifactType"]);
    forward(ctx, format!("referrers/{digest}"), query, |name, value| {
        (name == "oci-filters-applied").then(|| value.clone())
    })
    .await
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
