//! Endpoints forwarded to the upstream and not cached: `tags/list` (with its `Link` rewritten to
//! point at the proxy) and `referrers/<digest>`.

use bytes::BytesMut;
use futures_util::StreamExt;
use http::{header, HeaderMap, HeaderValue, Method, Response};

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

pub async fn tags_list(ctx: &Ctx) -> Result<Response<Body>, ApiError> {
    let query = forward_query(ctx, &["n", "last"]);
    forward(ctx, "tags/list".to_string(), query, |name, value| {
        (name == header::LINK)
            .then(|| rewrite_link(ctx, value))
            .flatten()
    })
    .await
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
