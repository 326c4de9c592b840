//! The status page's JSON API (`/ui/api/...`) and its HTML through the real server (issue 14):
//! a fill held open by a slow upstream shows its bytes growing, its total and its followers; a
//! warm pull shows in the hit ratio and bytes; an upstream failure shows in its row, and no
//! configured password ever appears; text an upstream controls (platforms, media types) is
//! escaped in the HTML; with `[auth]` the page needs a user some rule names; only GET and HEAD.

mod common;

use std::time::Duration;

use bytes::Bytes;
use common::fake_registry::{BlobBehavior, Failure, FakeRegistry};
use common::proxy::Proxy;
use common::{base64_encode, random_bytes, upstream, OCI_INDEX, OCI_MANIFEST};
use serde_json::Value;

async fn api(proxy: &Proxy, path: &str) -> Value {
    let r = proxy.get(path).await;
    assert_eq!(r.status(), 200, "GET {path}");
    assert_eq!(r.headers()["cache-control"], "no-store", "GET {path}");
    assert_eq!(r.headers()["content-type"], "application/json");
    common::json(r).await
}

/// Polls `path` every 50 ms until `ok` holds of its JSON, and returns that JSON; fails the test,
/// naming `what`, after `limit`.
async fn poll(proxy: &Proxy, path: &str, what: &str, ok: impl Fn(&Value) -> bool) -> Value {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let v = api(proxy, path).await;
        if ok(&v) {
            return v;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "waited 10s for {what}; last {path}: {v}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The row of `/ui/api/fills` for `digest`, if it is being filled.
async fn fill_of(proxy: &Proxy, digest: &str) -> Option<Value> {
    let f = api(proxy, "/ui/api/fills").await;
    f["fills"]
        .as_array()
        .unwrap()
        .iter()
        .find(|x| x["digest"] == digest)
        .cloned()
}

#[tokio::test]
async fn a_fill_in_progress_shows_its_bytes_growing_its_total_and_its_followers() {
    let up = FakeRegistry::start().await;
    let layer = Bytes::from(random_bytes(2 << 20, 1));
    let img = up.push_image("team/app", "v1", std::slice::from_ref(&layer));
    let digest = img.layers[0].clone();
    // 32 KiB every 60 ms: about four seconds for the whole layer (room for a slow machine).
    up.set_blob_behavior(
        &digest,
        BlobBehavior::Slow {
            chunk: 32 << 10,
            delay: Duration::from_millis(60),
        },
    );
    let proxy = Proxy::start(&upstream("fake", &up.url(), true, "")).await;
    assert_eq!(
        api(&proxy, "/ui/api/fills").await["fills"],
        Value::Array(vec![])
    );
    let url = proxy.url(&format!("/v2/team/app/blobs/{digest}"));
    let clients: Vec<_> = (0..2)
        .map(|_| {
            let (url, digest) = (url.clone(), digest.clone());
            tokio::spawn(async move { common::get_blob(&common::client(), &url, &digest).await })
        })
        .collect();

    let row = |f: &Value| -> Option<Value> {
        f["fills"]
            .as_array()
            .unwrap()
            .iter()
            .find(|x| x["digest"] == digest.as_str())
            .cloned()
    };
    let first = poll(
        &proxy,
        "/ui/api/fills",
        "the fill with both followers",
        |f| row(f).is_some_and(|x| x["followers"] == 2 && x["bytes"].as_u64() > Some(0)),
    )
    .await;
    let first = row(&first).unwrap();
    assert_eq!(first["total"], layer.len());
    assert_eq!(first["upstream"], "fake");
    assert_eq!(first["repository"], "team/app");
    assert_eq!(first["origin"], "upstream");
    assert_eq!(first["state"], "streaming");
    assert_eq!(first["requests"], 2);
    let summary = api(&proxy, "/ui/api/summary").await;
    assert_eq!(summary["fills_in_progress"], 1);

    tokio::time::sleep(Duration::from_millis(400)).await;
    let second = fill_of(&proxy, &digest)
        .await
        .expect("still filling 400 ms later");
    assert!(
        second["bytes"].as_u64() > first["bytes"].as_u64(),
        "bytes did not grow: {first} then {second}"
    );
    assert!(second["bytes_per_second"].as_f64().unwrap() > 0.0);

    for c in clients {
        c.await.unwrap().unwrap();
    }
    proxy.wait_idle().await;
    assert_eq!(
        api(&proxy, "/ui/api/fills").await["fills"],
        Value::Array(vec![])
    );
}

#[tokio::test]
async fn a_warm_pull_shows_in_the_hit_ratio_and_the_bytes() {
    let up = FakeRegistry::start().await;
    let layer = Bytes::from(random_bytes(300_000, 2));
    let img = up.push_image("team/app", "v1", std::slice::from_ref(&layer));
    let proxy = Proxy::start(&upstream("fake", &up.url(), true, "")).await;
    let s = api(&proxy, "/ui/api/summary").await;
    assert_eq!(s["since_start"]["hit_ratio"], Value::Null);
    assert_eq!(s["minutes"].as_array().unwrap().len(), 60);

    proxy.pull_image("team/app", "v1").await.unwrap();
    proxy.wait_idle().await;
    proxy.pull_image("team/app", "v1").await.unwrap();

    let blobs = img.manifest_body.len() as u64 + layer.len() as u64;
    let s = poll(&proxy, "/ui/api/summary", "six requests counted", |s| {
        s["since_start"]["from_cache"] == 3 && s["since_start"]["from_upstream"] == 3
    })
    .await;
    let total = &s["since_start"];
    assert_eq!(total["hit_ratio"], 0.5);
    // Manifest, config and layer, served once from the cache.
    let served = total["bytes_from_cache"].as_u64().unwrap();
    assert!(
        served > blobs && served == total["bytes_from_upstream"].as_u64().unwrap(),
        "{total}"
    );
    // Fills fetch blobs (config and layer), not manifests.
    let fetched = total["bytes_fetched_upstream"].as_u64().unwrap();
    assert!(fetched > layer.len() as u64 && fetched < served, "{total}");
    // The last hour holds the same, spread over its minutes.
    assert_eq!(s["last_hour"], s["since_start"]);
    let minutes = s["minutes"].as_array().unwrap();
    let sum = |k: &str| minutes.iter().map(|m| m[k].as_u64().unwrap()).sum::<u64>();
    assert_eq!(sum("from_cache"), 3);
    assert_eq!(sum("bytes_fetched_upstream"), fetched);
}

#[tokio::test]
async fn upstream_rows_show_failures_and_never_a_configured_password() {
    const PASSWORD: &str = "Pa55-never-shown-9f3c";
    let up = FakeRegistry::start().await;
    up.require_basic("robot", PASSWORD);
    up.add_response_header("RateLimit-Remaining", "97;w=21600");
    up.push_image("team/app", "v1", &[Bytes::from(random_bytes(1000, 3))]);
    up.push_image("team/app", "v2", &[Bytes::from(random_bytes(1000, 4))]);
    let dead = common::free_port();
    let config = format!(
        "{}{}",
        upstream(
            "fake",
            &up.url(),
            true,
            &format!("username = \"robot\"\npassword = \"{PASSWORD}\"")
        ),
        upstream(
            "dead.example",
            &format!("http://127.0.0.1:{dead}"),
            false,
            ""
        )
    );
    let proxy = Proxy::start(&config).await;
    proxy.pull_image("team/app", "v1").await.unwrap();
    // Failing: the upstream answers 500; the other is not there at all.
    up.set_failure(Some(Failure::Status(500)));
    assert_ne!(proxy.get("/v2/team/app/manifests/v2").await.status(), 200);
    assert_ne!(
        proxy
            .get("/v2/dead.example/team/app/manifests/v1")
            .await
            .status(),
        200
    );

    let u = api(&proxy, "/ui/api/upstreams").await;
    let rows = u["upstreams"].as_array().unwrap();
    assert_eq!(rows.len(), 2);
    let fake = &rows[0];
    assert_eq!(fake["name"], "fake");
    assert_eq!(fake["url"], format!("{}/", up.url()));
    assert_eq!(fake["reachable"], true, "it answered, with 500: {fake}");
    assert_eq!(fake["last_status"], 500);
    assert_eq!(fake["last_error"]["kind"], "status");
    assert_eq!(fake["last_error"]["message"], "answered 500");
    assert!(fake["last_error"]["at_ms"].as_u64().is_some());
    assert_eq!(fake["ratelimit_remaining"]["value"], 97.0);
    assert!(fake["requests_last_hour"].as_u64().unwrap() >= 4, "{fake}");
    assert!(fake["errors_last_hour"].as_u64().unwrap() >= 1, "{fake}");
    assert!(fake["latency_ms"]["last"].as_u64().is_some());
    assert!(fake["latency_ms"]["avg_last_hour"].as_f64().is_some());
    let gone = &rows[1];
    assert_eq!(gone["reachable"], false, "{gone}");
    assert_eq!(gone["last_error"]["kind"], "unreachable");

    // The password, anywhere the page or its API can show.
    let pages = [
        "/ui/",
        "/ui/api/summary",
        "/ui/api/upstreams",
        "/ui/api/fills",
        "/ui/api/store",
        "/ui/api/image?upstream=fake&repository=team/app&reference=v1",
        "/ui/image?upstream=fake&repository=team/app&reference=v1",
    ];
    for p in pages {
        let r = proxy.get(p).await;
        assert_eq!(r.status(), 200, "{p}");
        let body = r.text().await.unwrap();
        assert!(!body.contains(PASSWORD), "{p} shows the password");
        assert!(!body.contains(&base64_encode(format!("robot:{PASSWORD}").as_bytes())));
    }
}

/// An image index whose platforms and media types are markup: whatever an upstream sends
/// reaches the image page only escaped. (Repository names and tags cannot hold markup: the OCI
/// grammar refuses them before anything is stored.)
#[tokio::test]
async fn text_an_upstream_controls_is_escaped_in_the_html() {
    const OS: &str = "linux<script>window.pwned=1</script>";
    const ARCH: &str = "amd64\"><img src=x onerror=alert(1)>";
    const LAYER_TYPE: &str = "application/x-evil'><b>bold</b>";
    let up = FakeRegistry::start().await;
    let layer = up.add_blob(random_bytes(500, 5));
    let config = up.add_blob(Bytes::from_static(b"{}"));
    let child = serde_json::to_vec(&serde_json::json!({
        "schemaVersion": 2, "mediaType": OCI_MANIFEST,
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": config, "size": 2},
        "layers": [{"mediaType": LAYER_TYPE, "digest": layer, "size": 500}],
    }))
    .unwrap();
    let child_len = child.len();
    let child = up.put_manifest("team/app", None, OCI_MANIFEST, child);
    let index = serde_json::to_vec(&serde_json::json!({
        "schemaVersion": 2, "mediaType": OCI_INDEX,
        "manifests": [{"mediaType": OCI_MANIFEST, "digest": child, "size": child_len,
            "platform": {"os": OS, "architecture": ARCH}}],
    }))
    .unwrap();
    up.put_manifest("team/app", Some("v1"), OCI_INDEX, index);
    let proxy = Proxy::start(&upstream("fake", &up.url(), true, "")).await;
    let c = common::client();
    for reference in ["v1", child.as_str()] {
        let r = c
            .get(proxy.url(&format!("/v2/team/app/manifests/{reference}")))
            .header("Accept", format!("{OCI_INDEX}, {OCI_MANIFEST}"))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200, "{reference}");
    }

    // The API gives the text as it is (JSON, not HTML).
    let q = "upstream=fake&repository=team/app&reference=v1";
    let img = api(&proxy, &format!("/ui/api/image?{q}")).await;
    assert_eq!(img["index"], true);
    assert_eq!(img["tags"], serde_json::json!(["v1"]));
    let m = &img["manifests"][0];
    assert_eq!(m["platform"]["os"], OS);
    assert_eq!(m["layers"][0]["media_type"], LAYER_TYPE);
    assert_eq!(m["layers"][0]["size"], 500);
    assert_eq!(
        m["layers"][0]["stored"], false,
        "only manifests were pulled"
    );

    let r = proxy.get(&format!("/ui/image?{q}")).await;
    assert_eq!(r.status(), 200);
    assert!(r.headers()["content-type"]
        .to_str()
        .unwrap()
        .starts_with("text/html"));
    assert!(r.headers()["content-security-policy"]
        .to_str()
        .unwrap()
        .contains("script-src 'self'"));
    let html = r.text().await.unwrap();
    for raw in ["<script>window", "<img src=x", "<b>bold"] {
        assert!(
            !html.contains(raw),
            "the page holds {raw:?} unescaped:\n{html}"
        );
    }
    assert!(
        html.contains("linux&lt;script&gt;window.pwned=1&lt;/script&gt;"),
        "{html}"
    );
    assert!(html.contains("amd64&quot;&gt;&lt;img src=x onerror=alert(1)&gt;"));
    assert!(html.contains("application/x-evil&#39;&gt;&lt;b&gt;bold&lt;/b&gt;"));
}

#[tokio::test]
async fn the_store_lists_images_with_sizes_pins_and_the_image_page_its_layers() {
    let up = FakeRegistry::start().await;
    let small = up.push_image("team/small", "v1", &[Bytes::from(random_bytes(10_000, 6))]);
    let big = up.push_image(
        "team/big",
        "v1",
        &[
            Bytes::from(random_bytes(200_000, 7)),
            Bytes::from(random_bytes(100_000, 8)),
        ],
    );
    let config = format!(
        "{}[[pin]]\nimage = \"fake/team/small:v1\"\n",
        upstream("fake", &up.url(), true, "")
    );
    let proxy = Proxy::start(&config).await;
    proxy.pull_image("team/big", "v1").await.unwrap();
    proxy.pull_image("team/small", "v1").await.unwrap();
    proxy.wait_idle().await;
    // The listing is reused for a few seconds: wait for one with both images.
    let s = poll(&proxy, "/ui/api/store", "both images listed", |s| {
        s["images"] == 2
    })
    .await;
    assert_eq!(s["backend"], "filesystem");
    assert_eq!(s["tags"], 2);
    assert_eq!(s["blobs"], 7);
    let largest = &s["largest"][0];
    assert_eq!(largest["repository"], "team/big");
    assert_eq!(largest["digest"], big.manifest);
    let big_size = big.manifest_body.len() as u64 + 300_000;
    assert!(largest["size"].as_u64().unwrap() > big_size, "{largest}");
    assert_eq!(largest["pinned"], false);
    // Pulled first, so used least recently.
    assert_eq!(s["least_recently_used"][0]["repository"], "team/big");
    let small_row = &s["largest"][1];
    assert_eq!(small_row["digest"], small.manifest);
    assert_eq!(small_row["pinned"], true);
    assert_eq!(
        s["pins"],
        serde_json::json!([{"reference": "fake/team/small:v1", "source": "config", "stored": true}])
    );
    assert_eq!(s["last_eviction"], Value::Null);
    assert_eq!(s["cluster"], Value::Null);

    let img = api(
        &proxy,
        "/ui/api/image?upstream=fake&repository=team/big&reference=v1",
    )
    .await;
    assert_eq!(img["digest"], big.manifest);
    assert_eq!(img["index"], false);
    assert_eq!(img["pinned"], false);
    assert!(img["last_used_ms"].as_u64().is_some());
    let layers = img["manifests"][0]["layers"].as_array().unwrap();
    let sizes: Vec<_> = layers.iter().map(|l| l["size"].as_u64().unwrap()).collect();
    assert_eq!(sizes, [200_000, 100_000]);
    assert!(layers.iter().all(|l| l["stored"] == true));
    assert_eq!(img["manifests"][0]["config"]["digest"], big.config);
    // By digest too; an unknown one is an OCI 404.
    let by_digest = api(
        &proxy,
        &format!(
            "/ui/api/image?upstream=fake&repository=team/big&reference={}",
            big.manifest
        ),
    )
    .await;
    assert_eq!(by_digest["tags"], serde_json::json!(["v1"]));
    let r = proxy
        .get("/ui/api/image?upstream=fake&repository=team/big&reference=v9")
        .await;
    assert_eq!(r.status(), 404);
    assert_eq!(common::error_code(r).await, "MANIFEST_UNKNOWN");
    // The overview links to the image page.
    let html = proxy.get("/ui/").await.text().await.unwrap();
    assert!(
        html.contains("href=\"image?upstream=fake&amp;repository=team%2Fbig&amp;reference=v1\""),
        "{html}"
    );
}

#[tokio::test]
async fn only_get_and_head_and_nothing_is_cached_by_the_browser() {
    let up = FakeRegistry::start().await;
    let proxy = Proxy::start(&upstream("fake", &up.url(), true, "")).await;
    let c = common::client();
    for path in ["/ui/", "/ui/api/summary", "/ui/api/store"] {
        let r = c.post(proxy.url(path)).body("x").send().await.unwrap();
        assert_eq!(r.status(), 405, "POST {path}");
        assert_eq!(r.headers()["allow"], "GET, HEAD");
        assert_eq!(r.headers()["cache-control"], "no-store");
        assert_eq!(common::error_code(r).await, "UNSUPPORTED");
        let r = c.delete(proxy.url(path)).send().await.unwrap();
        assert_eq!(r.status(), 405, "DELETE {path}");
    }
    let head = proxy.head("/ui/api/upstreams").await;
    assert_eq!(head.status(), 200);
    assert_eq!(head.headers()["cache-control"], "no-store");
    assert!(head.bytes().await.unwrap().is_empty());
    for asset in ["/ui/app.js", "/ui/style.css"] {
        let r = proxy.get(asset).await;
        assert_eq!(r.status(), 200, "{asset}");
        assert!(!r.bytes().await.unwrap().is_empty());
    }
    assert_eq!(proxy.get("/ui/api/nothing").await.status(), 404);
    let r = common::client_no_redirect()
        .get(proxy.url("/ui"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 308);
    assert_eq!(r.headers()["location"], "/ui/");
    assert!(up.requests().is_empty(), "the page asks no upstream");
}

fn htpasswd(users: &[(&str, &str)]) -> String {
    users
        .iter()
        .map(|(u, p)| format!("{u}:{}\n", bcrypt::hash(p, 4).unwrap()))
        .collect()
}

fn basic(user: &str, password: &str) -> String {
    format!(
        "Basic {}",
        base64_encode(format!("{user}:{password}").as_bytes())
    )
}

/// "Same authentication as reads": the page names every cached repository, so it takes a user
/// (or certificate) that some `[[access]]` rule names; anyone only when every rule is anonymous.
#[tokio::test]
async fn with_auth_the_page_needs_a_user_some_rule_names() {
    let up = FakeRegistry::start().await;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("htpasswd");
    std::fs::write(&path, htpasswd(&[("alice", "a-pw"), ("bob", "b-pw")])).unwrap();
    let auth = |rules: &str| {
        format!(
            "{}[auth]\nhtpasswd = {:?}\nrealm = \"ui-test\"\n{rules}",
            upstream("fake", &up.url(), true, ""),
            path.display().to_string()
        )
    };
    let mixed = "[[access]]\nmatch = \"fake/public/**\"\nanonymous = true\n\
                 [[access]]\nmatch = \"fake/acme/**\"\nusers = [\"alice\"]\n";
    let proxy = Proxy::start(&auth(mixed)).await;
    let c = common::client();
    let get = |path: &str, authz: Option<String>| {
        let mut b = c.get(proxy.url(path));
        if let Some(a) = authz {
            b = b.header("Authorization", a);
        }
        async move { b.send().await.unwrap() }
    };
    for path in ["/ui/", "/ui/api/summary", "/ui/api/fills", "/ui/app.js"] {
        let r = get(path, None).await;
        assert_eq!(r.status(), 401, "anonymous {path}");
        assert_eq!(r.headers()["www-authenticate"], "Basic realm=\"ui-test\"");
        assert_eq!(common::error_code(r).await, "UNAUTHORIZED");
        assert_eq!(get(path, Some(basic("alice", "nope"))).await.status(), 401);
        // bob has a password but no rule names him.
        assert_eq!(get(path, Some(basic("bob", "b-pw"))).await.status(), 403);
        assert_eq!(get(path, Some(basic("alice", "a-pw"))).await.status(), 200);
    }
    // Anonymous reads of public/** still work: the page's rule is its own.
    assert_eq!(get("/v2/", None).await.status(), 200);

    let open = Proxy::start(&auth("[[access]]\nmatch = \"*/**\"\nanonymous = true\n")).await;
    assert_eq!(open.get("/ui/api/summary").await.status(), 200);
}

#[tokio::test]
async fn with_an_admin_listener_the_page_is_served_there_only() {
    common::install_crypto();
    let up = FakeRegistry::start().await;
    let dir = tempfile::tempdir().unwrap();
    let cfg = entrepot::Config::parse(&format!(
        "[server]\nadmin_listen = \"127.0.0.1:0\"\n[storage]\nroot = \"{}\"\n{}",
        dir.path().join("store").display(),
        upstream("fake", &up.url(), true, "")
    ))
    .unwrap();
    let server = entrepot::Server::new(cfg).unwrap();
    let main = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let admin = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let (main_addr, admin_addr) = (main.local_addr().unwrap(), admin.local_addr().unwrap());
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    let run = tokio::spawn(server.run_with_admin(main, Some(admin), async {
        let _ = rx.await;
    }));
    let c = common::client();
    let status = |url: String| {
        let c = c.clone();
        async move { c.get(url).send().await.unwrap().status() }
    };
    assert_eq!(status(format!("http://{admin_addr}/ui/")).await, 200);
    assert_eq!(
        status(format!("http://{admin_addr}/ui/api/fills")).await,
        200
    );
    assert_eq!(status(format!("http://{main_addr}/ui/")).await, 404);
    tx.send(()).unwrap();
    run.await.unwrap().unwrap();
}
