//! Routing and refusals through the real server: ns / path-prefix / default selection, the
//! `library/` rule, unknown upstreams, invalid input, push, and the forwarded endpoints.

mod common;

use common::fake_registry::FakeRegistry;
use common::proxy::Proxy;
use common::{random_bytes, upstream, OCI_INDEX};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

async fn two_upstreams() -> (FakeRegistry, FakeRegistry, Proxy) {
    let a = FakeRegistry::start().await;
    let b = FakeRegistry::start().await;
    let cfg = upstream("reg-a.example", &a.url(), true, "")
        + &upstream(
            "reg-b.example",
            &b.url(),
            false,
            "aliases = [\"b.example\"]",
        );
    let proxy = Proxy::start(&cfg).await;
    (a, b, proxy)
}

/// The first OCI error code of a JSON error body.
async fn error_code(r: reqwest::Response) -> String {
    assert_eq!(r.headers()["content-type"], "application/json");
    common::error_code(r).await
}

/// Sends a request line as written (no URL normalisation) and returns status and body.
async fn raw(proxy: &Proxy, method: &str, path: &str) -> (u16, String) {
    let addr = proxy.url.trim_start_matches("http://");
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    let req = format!("{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
    s.write_all(req.as_bytes()).await.unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).await.unwrap();
    let status = out[9..12].parse().unwrap();
    let body = out.split("\r\n\r\n").nth(1).unwrap_or("").to_string();
    (status, body)
}

#[tokio::test]
async fn ns_then_path_prefix_then_default() {
    let (a, b, proxy) = two_upstreams().await;
    let ia = a.push_image("team/app", "v1", &[random_bytes(10, 1).into()]);
    let ib = b.push_image("team/app", "v1", &[random_bytes(10, 2).into()]);
    let c = common::client();

    // containerd: ?ns=<registry>, echoed as OCI-Namespace.
    let r = c
        .get(proxy.url("/v2/team/app/manifests/v1?ns=reg-b.example"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["docker-content-digest"], ib.manifest.as_str());
    assert_eq!(r.headers()["oci-namespace"], "reg-b.example");

    // CRI-O / podman: the first path component names the upstream (or an alias).
    for prefix in ["reg-b.example", "b.example"] {
        let r = c
            .get(proxy.url(&format!("/v2/{prefix}/team/app/manifests/{}", ib.manifest)))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200, "{prefix}");
    }
    // docker registry-mirrors: bare names go to the default upstream.
    let r = c
        .get(proxy.url("/v2/team/app/manifests/v1"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.headers()["docker-content-digest"], ia.manifest.as_str());
    assert!(b.count("GET", "/v2/team/app/manifests/v1") == 1);
    assert!(a.count("GET", "/v2/team/app/manifests/v1") == 1);
}

#[tokio::test]
async fn docker_hub_names_gain_library() {
    let hub = FakeRegistry::start().await;
    hub.push_image("library/alpine", "3.20", &[random_bytes(10, 3).into()]);
    let proxy = Proxy::start(&upstream("docker.io", &hub.url(), true, "")).await;
    let c = common::client();
    for path in [
        "/v2/alpine/manifests/3.20",
        "/v2/library/alpine/manifests/3.20",
        "/v2/docker.io/alpine/manifests/3.20",
        "/v2/alpine/manifests/3.20?ns=docker.io",
    ] {
        let r = c.get(proxy.url(path)).send().await.unwrap();
        assert_eq!(r.status(), 200, "{path}");
    }
    assert!(hub
        .requests()
        .iter()
        .all(|r| r.path.starts_with("/v2/library/alpine/")));
}

#[tokio::test]
async fn a_request_that_selects_no_upstream_is_refused_without_contacting_anyone() {
    let a = FakeRegistry::start().await;
    // No default upstream.
    let proxy = Proxy::start(&upstream("reg-a.example", &a.url(), false, "")).await;
    let c = common::client();
    let r = c
        .get(proxy.url("/v2/team/app/manifests/v1?ns=evil.example"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 404);
    assert_eq!(error_code(r).await, "NAME_UNKNOWN");
    let r = c
        .get(proxy.url("/v2/team/app/manifests/v1"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 404);
    assert_eq!(error_code(r).await, "NAME_UNKNOWN");
    assert!(a.requests().is_empty());
}

#[tokio::test]
async fn invalid_names_digests_and_traversal_are_400_json() {
    let (a, b, proxy) = two_upstreams().await;
    let c = common::client();
    let zeros = "0".repeat(64);
    let cases = [
        ("/v2/UPPER/manifests/latest".to_string(), "NAME_INVALID"),
        ("/v2/a//b/manifests/latest".to_string(), "NAME_INVALID"),
        (
            format!("/v2/{}/manifests/latest", "a".repeat(256)),
            "NAME_INVALID",
        ),
        (
            "/v2/team/app/blobs/sha256:1234".to_string(),
            "DIGEST_INVALID",
        ),
        ("/v2/team/app/blobs/latest".to_string(), "DIGEST_INVALID"),
        (
            format!("/v2/team/app/blobs/md5:{}", &zeros[..32]),
            "DIGEST_INVALID",
        ),
        (
            format!(
                "/v2/team/app/blobs/sha256:{}",
                zeros.to_uppercase().replace('0', "A")
            ),
            "DIGEST_INVALID",
        ),
        (
            "/v2/team/app/manifests/sha256:xyz".to_string(),
            "DIGEST_INVALID",
        ),
    ];
    for (path, code) in cases {
        let r = c.get(proxy.url(&path)).send().await.unwrap();
        assert_eq!(r.status(), 400, "{path}");
        assert_eq!(error_code(r).await, code, "{path}");
    }
    // Traversal, sent as written (an HTTP client library would normalise these away).
    for path in [
        format!("/v2/../../etc/passwd/blobs/sha256:{zeros}"),
        format!("/v2/team/../../../blobs/sha256:{zeros}"),
        format!("/v2/%2e%2e/%2e%2e/etc/blobs/sha256:{zeros}"),
        "/v2/team/app%2f..%2f..%2fetc/manifests/latest".to_string(),
    ] {
        let (status, body) = raw(&proxy, "GET", &path).await;
        assert_eq!(status, 400, "{path}");
        let v: serde_json::Value = serde_json::from_str(&body).unwrap();
        assert!(
            v["errors"][0]["code"]
                .as_str()
                .unwrap()
                .ends_with("_INVALID"),
            "{path}: {body}"
        );
    }
    // `..` as a reference cannot be a tag: an unknown manifest, not a path.
    let (status, body) = raw(&proxy, "GET", "/v2/team/app/manifests/..").await;
    assert_eq!(status, 404);
    assert!(body.contains("MANIFEST_UNKNOWN"), "{body}");
    // Not an API path at all: 404 JSON.
    let (status, body) = raw(&proxy, "GET", "/etc/passwd").await;
    assert_eq!(status, 404);
    assert!(body.contains("\"errors\""));
    assert!(a.requests().is_empty() && b.requests().is_empty());
}

#[tokio::test]
async fn push_and_delete_are_405_unsupported() {
    let (a, _b, proxy) = two_upstreams().await;
    let c = common::client();
    let digest = format!("sha256:{}", "0".repeat(64));
    let cases = [
        (
            reqwest::Method::POST,
            "/v2/team/app/blobs/uploads/".to_string(),
        ),
        (
            reqwest::Method::PATCH,
            "/v2/team/app/blobs/uploads/abc-123".to_string(),
        ),
        (
            reqwest::Method::PUT,
            "/v2/team/app/blobs/uploads/abc-123?digest=x".to_string(),
        ),
        (
            reqwest::Method::PUT,
            "/v2/team/app/manifests/latest".to_string(),
        ),
        (
            reqwest::Method::DELETE,
            format!("/v2/team/app/manifests/{digest}"),
        ),
        (
            reqwest::Method::DELETE,
            format!("/v2/team/app/blobs/{digest}"),
        ),
        (
            reqwest::Method::GET,
            "/v2/team/app/blobs/uploads/abc".to_string(),
        ),
    ];
    for (m, path) in cases {
        let r = c.request(m.clone(), proxy.url(&path)).send().await.unwrap();
        assert_eq!(r.status(), 405, "{m} {path}");
        assert_eq!(error_code(r).await, "UNSUPPORTED", "{m} {path}");
    }
    assert!(a.requests().is_empty());
}

#[tokio::test]
async fn base_endpoint() {
    let (_a, _b, proxy) = two_upstreams().await;
    let r = proxy.get("/v2/").await;
    assert_eq!(r.status(), 200);
    assert_eq!(
        r.headers()["docker-distribution-api-version"],
        "registry/2.0"
    );
    assert_eq!(r.text().await.unwrap(), "{}");
}

#[tokio::test]
async fn tags_list_is_forwarded_with_link_rewritten_to_the_proxy() {
    let (_a, b, proxy) = two_upstreams().await;
    let img = b.push_image("team/app", "t1", &[random_bytes(10, 4).into()]);
    for t in ["t2", "t3", "t4", "t5"] {
        b.set_tag("team/app", t, &img.manifest);
    }
    let c = common::client();
    let mut tags = Vec::new();
    let mut next = Some(proxy.url("/v2/reg-b.example/team/app/tags/list?n=2"));
    while let Some(url) = next.take() {
        let r = c.get(&url).send().await.unwrap();
        assert_eq!(r.status(), 200);
        if let Some(link) = r.headers().get("link") {
            let link = link.to_str().unwrap();
            assert!(
                link.starts_with("</v2/reg-b.example/team/app/tags/list?"),
                "{link}"
            );
            assert!(link.ends_with("; rel=\"next\""), "{link}");
            let path = &link[1..link.find('>').unwrap()];
            next = Some(proxy.url(path));
        }
        let v = common::json(r).await;
        for t in v["tags"].as_array().unwrap() {
            tags.push(t.as_str().unwrap().to_string());
        }
    }
    assert_eq!(tags, ["t1", "t2", "t3", "t4", "t5"]);

    // With ns=, the link keeps it.
    let r = c
        .get(proxy.url("/v2/team/app/tags/list?n=1&ns=reg-b.example"))
        .send()
        .await
        .unwrap();
    let link = r.headers()["link"].to_str().unwrap().to_string();
    assert!(link.contains("ns=reg-b.example"), "{link}");
    assert!(link.starts_with("</v2/team/app/tags/list?"), "{link}");
    // Unknown repository: the upstream's 404.
    let r = c
        .get(proxy.url("/v2/reg-b.example/nobody/tags/list"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 404);
    assert_eq!(error_code(r).await, "NAME_UNKNOWN");
}

#[tokio::test]
async fn referrers_are_forwarded() {
    let (a, _b, proxy) = two_upstreams().await;
    let img = a.push_image("team/app", "v1", &[random_bytes(10, 5).into()]);
    let r = proxy
        .get(&format!("/v2/team/app/referrers/{}", img.manifest))
        .await;
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["content-type"], OCI_INDEX);
    let v = common::json(r).await;
    assert_eq!(v["manifests"], serde_json::json!([]));
    assert_eq!(a.count("GET", "/referrers/"), 1);
}

#[tokio::test]
async fn an_impossible_tag_is_an_unknown_manifest_and_never_forwarded() {
    let (a, _b, proxy) = two_upstreams().await;
    for path in [
        "/v2/team/app/manifests/-latest",
        "/v2/team/app/manifests/.INVALID_MANIFEST_NAME",
    ] {
        for head in [false, true] {
            let c = common::client();
            let r = if head {
                c.head(proxy.url(path))
            } else {
                c.get(proxy.url(path))
            };
            let r = r.send().await.unwrap();
            assert_eq!(r.status(), 404, "{path}");
            if !head {
                assert_eq!(error_code(r).await, "MANIFEST_UNKNOWN");
            }
        }
    }
    assert!(a.requests().is_empty());
}
