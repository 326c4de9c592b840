//! Reads are scoped to (upstream, repository): a layer or manifest cached through one pair is
//! served under another only after that pair's upstream confirms it has it (one HEAD, then
//! remembered across restarts); offline only linked pairs are served. Regression tests for the
//! cross-upstream disclosure: a private layer cached through `up0/secret/app` was served to
//! anyone who asked for its digest under any repository of any upstream.

mod common;

use bytes::Bytes;
use common::fake_registry::FakeRegistry;
use common::proxy::Proxy;
use common::{client, get_blob, oci_error_entries, random_bytes, upstream, OCI_MANIFEST};

/// Upstream `priv` (basic auth) and `pub` (anonymous), selected by path prefix.
fn upstreams(private: &FakeRegistry, public: &FakeRegistry) -> String {
    format!(
        "{}{}",
        upstream(
            "priv",
            &private.url(),
            false,
            "username = \"puller\"\npassword = \"s3cret-pass\""
        ),
        upstream("pub", &public.url(), false, ""),
    )
}

async fn status_and_code(resp: reqwest::Response) -> (u16, String) {
    let status = resp.status().as_u16();
    let body = resp.bytes().await.unwrap();
    let code = oci_error_entries(&body)
        .ok()
        .and_then(|e| {
            e.first()
                .map(|e| e["code"].as_str().unwrap_or("").to_string())
        })
        .unwrap_or_default();
    (status, code)
}

#[tokio::test]
async fn regression_a_private_layer_is_not_served_under_another_upstream_or_repository() {
    let private = FakeRegistry::start().await;
    private.require_basic("puller", "s3cret-pass");
    let public = FakeRegistry::start().await;
    let secret = Bytes::from(random_bytes(300_000, 61));
    let img = private.push_image("secret/app", "v1", std::slice::from_ref(&secret));
    let d = img.layers[0].clone();
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("store");
    let proxy = Proxy::start_at(&upstreams(&private, &public), &root).await;

    // Cached through the private pair.
    get_blob(
        &client(),
        &proxy.url(&format!("/v2/priv/secret/app/blobs/{d}")),
        &d,
    )
    .await
    .unwrap();
    // (The fake counts its 401 challenge too.)
    assert!(private.count("GET", &d) >= 1);

    // Under the public upstream: the public upstream is asked (it does not have it): 404.
    let resp = proxy.get(&format!("/v2/pub/anything/blobs/{d}")).await;
    assert_eq!(status_and_code(resp).await, (404, "BLOB_UNKNOWN".into()));
    assert_eq!(
        public.count("HEAD", &d),
        1,
        "the public upstream asked once"
    );
    assert_eq!(public.count("GET", &d), 0);
    // HEAD is a read too.
    let resp = proxy.head(&format!("/v2/pub/anything/blobs/{d}")).await;
    assert_eq!(resp.status(), 404);

    // Under another repository of the private upstream, which has it there: one HEAD, no GET.
    let (heads, gets) = (private.count("HEAD", &d), private.count("GET", &d));
    get_blob(
        &client(),
        &proxy.url(&format!("/v2/priv/other/app/blobs/{d}")),
        &d,
    )
    .await
    .unwrap();
    assert_eq!(private.count("HEAD", &d), heads + 1, "one confirmation");
    assert_eq!(private.count("GET", &d), gets, "no bytes fetched again");
    // Remembered: the next read asks nothing.
    get_blob(
        &client(),
        &proxy.url(&format!("/v2/priv/other/app/blobs/{d}")),
        &d,
    )
    .await
    .unwrap();
    assert_eq!(private.count("HEAD", &d), heads + 1);

    // The manifest, by digest, likewise.
    let resp = client()
        .get(proxy.url(&format!("/v2/pub/anything/manifests/{}", img.manifest)))
        .header("Accept", OCI_MANIFEST)
        .send()
        .await
        .unwrap();
    assert_eq!(
        status_and_code(resp).await,
        (404, "MANIFEST_UNKNOWN".into())
    );

    // The links survive a restart, and offline only linked pairs are served.
    proxy.stop().await;
    let offline =
        Proxy::start_with_server("offline = true", &upstreams(&private, &public), &root).await;
    let (ph, pg) = (private.count("HEAD", &d), private.count("GET", &d));
    for path in ["/v2/priv/secret/app", "/v2/priv/other/app"] {
        get_blob(&client(), &offline.url(&format!("{path}/blobs/{d}")), &d)
            .await
            .unwrap();
    }
    for path in ["/v2/pub/anything", "/v2/priv/third/app"] {
        let resp = offline.get(&format!("{path}/blobs/{d}")).await;
        assert_eq!(resp.status(), 404, "{path} read offline without a link");
    }
    assert_eq!(
        (private.count("HEAD", &d), private.count("GET", &d)),
        (ph, pg)
    );
    // Once for the GET, once for the HEAD before the restart; never offline.
    assert_eq!(public.count("HEAD", &d), 2);
}

#[tokio::test]
async fn an_unavailable_upstream_cannot_vouch_for_a_stored_digest() {
    let a = FakeRegistry::start().await;
    let b = FakeRegistry::start().await;
    let data = Bytes::from(random_bytes(1000, 62));
    let d = a.add_blob(data.clone());
    let proxy = Proxy::start(&format!(
        "{}{}",
        upstream("a", &a.url(), false, ""),
        upstream("b", &b.url(), false, "")
    ))
    .await;
    get_blob(
        &client(),
        &proxy.url(&format!("/v2/a/team/x/blobs/{d}")),
        &d,
    )
    .await
    .unwrap();
    b.set_failure(Some(common::fake_registry::Failure::Status(503)));
    let resp = proxy.get(&format!("/v2/b/team/z/blobs/{d}")).await;
    assert!(
        resp.status().is_server_error(),
        "served or misreported while the upstream could not confirm: {}",
        resp.status()
    );
    b.set_failure(None);
    b.add_blob(data);
    get_blob(
        &client(),
        &proxy.url(&format!("/v2/b/team/z/blobs/{d}")),
        &d,
    )
    .await
    .unwrap();
    assert_eq!(b.count("GET", &d), 0, "confirmed with a HEAD, not fetched");
}
