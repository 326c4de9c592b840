//! Scoped reads (DESIGN.md, "Who may read what"): the store holds a digest, but this request
//! asks for it under (upstream, repository), which may not be where it was fetched. It is
//! served only if the pair is linked, or once the upstream confirms it holds the digest there
//! (one HEAD with this upstream's credentials, then linked for good). Offline, or with the
//! upstream unavailable, only linked pairs are served.

use http::{header, HeaderMap, HeaderValue, Method};

use super::{AppState, Ctx};
use crate::error::ApiError;
use crate::oci::{media, Digest, Kind};
use crate::upstream::{UpstreamErrorKind, UpstreamRequest};

/// May `ctx` read the stored `digest` (a blob or a manifest, as `kind` says)?
pub async fn check(
    state: &AppState,
    ctx: &Ctx,
    digest: &Digest,
    kind: Kind,
) -> Result<(), ApiError> {
    let links = &state.store.links;
    let up = ctx.upstream.name();
    match links.has(up, &ctx.repo, digest).await {
        Ok(true) => return Ok(()),
        Ok(false) => {}
        Err(e) => {
            tracing::warn!(upstream = %up, repository = %ctx.repo, error = %e, "could not read a link record; asking the upstream")
        }
    }
    let unknown = || match kind {
        Kind::Manifest => ApiError::ManifestUnknown,
        _ => ApiError::BlobUnknown,
    };
    if ctx.upstream.offline() {
        return Err(unknown());
    }
    let (path, headers) = match kind {
        Kind::Manifest => (format!("manifests/{digest}"), manifest_accept()),
        _ => (format!("blobs/{digest}"), HeaderMap::new()),
    };
    let confirmed = ctx
        .upstream
        .send(&UpstreamRequest {
            method: Method::HEAD,
            repo: &ctx.repo,
            path,
            query: None,
            headers,
            streaming: false,
        })
        .await;
    match confirmed {
        Ok(_) => {
            tracing::info!(upstream = %up, repository = %ctx.repo, digest = %digest, "the upstream confirmed a stored digest for this repository; linked");
            if let Err(e) = links.add(up, &ctx.repo, [digest.clone()]).await {
                crate::metrics::storage_error();
                tracing::warn!(error = %e, "could not record a link");
            }
            Ok(())
        }
        Err(e) if matches!(e.kind, UpstreamErrorKind::NotFound) => Err(unknown()),
        // Unconfirmed: never served (an upstream that cannot answer cannot vouch for it).
        Err(e) => Err(e.into()),
    }
}

/// Every manifest type, so that a HEAD by digest is answered whatever the manifest is.
fn manifest_accept() -> HeaderMap {
    let mut h = HeaderMap::new();
    for t in [
        media::OCI_MANIFEST,
        media::OCI_INDEX,
        media::DOCKER_MANIFEST,
        media::DOCKER_LIST,
    ] {
        h.append(header::ACCEPT, HeaderValue::from_static(t));
    }
    h
}
