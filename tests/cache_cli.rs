//! `entrepot cache ls|rm|verify|gc` on a store filled by a real server, and the JSON log format.

mod common;

use std::process::Command;

use bytes::Bytes;
use common::fake_registry::FakeRegistry;
use common::proxy::Proxy;
use common::{random_bytes, upstream};

const BIN: &str = env!("CARGO_BIN_EXE_entrepot");

fn cache(root: &std::path::Path, args: &[&str]) -> (bool, String, String) {
    let out = Command::new(BIN)
        .arg("cache")
        .args(args)
        .arg("--root")
        .arg(root)
        .output()
        .unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

async fn pull_all(proxy: &Proxy, repo: &str, img: &common::fake_registry::PushedImage) {
    assert_eq!(
        proxy
            .get(&format!("/v2/{repo}/manifests/v1"))
            .await
            .status(),
        200
    );
    for d in img.layers.iter().chain([&img.config]) {
        common::get_blob(
            &common::client(),
            &proxy.url(&format!("/v2/{repo}/blobs/{d}")),
            d,
        )
        .await
        .unwrap();
    }
    proxy.wait_idle().await;
}

#[tokio::test]
async fn ls_rm_verify_gc() {
    let up = FakeRegistry::start().await;
    let shared = Bytes::from(random_bytes(50_000, 1));
    let a = up.push_image(
        "team/a",
        "v1",
        &[shared.clone(), Bytes::from(random_bytes(70_000, 2))],
    );
    let b = up.push_image(
        "team/b",
        "v1",
        &[shared.clone(), Bytes::from(random_bytes(90_000, 3))],
    );
    let c = up.push_image("team/c", "v1", &[Bytes::from(random_bytes(30_000, 4))]);
    let proxy = Proxy::start(&upstream("fake", &up.url(), true, "")).await;
    pull_all(&proxy, "team/a", &a).await;
    pull_all(&proxy, "team/b", &b).await;
    pull_all(&proxy, "team/c", &c).await;
    let root = proxy.root.clone();

    // ls: every tag with its repository, digest and size.
    let (ok, out, err) = cache(&root, &["ls"]);
    assert!(ok, "{err}");
    for repo in ["fake/team/a", "fake/team/b", "fake/team/c"] {
        let line = out
            .lines()
            .find(|l| l.starts_with(repo))
            .unwrap_or_else(|| panic!("{repo} not in:\n{out}"));
        assert!(line.contains("v1") && line.contains("KiB"), "{line}");
    }
    assert!(out.contains("3 tags"), "{out}");

    // rm: the tag and what only that image used; the shared layer stays for team/b.
    let (ok, out, err) = cache(&root, &["rm", "fake/team/a:v1"]);
    assert!(ok, "{out}{err}");
    assert!(!proxy.blob_path(&a.manifest).exists());
    assert!(!proxy.blob_path(&a.layers[1]).exists());
    assert!(
        proxy.blob_path(&a.layers[0]).exists(),
        "shared layer removed"
    );
    let (_, out, _) = cache(&root, &["ls"]);
    assert!(!out.contains("fake/team/a "), "{out}");
    let (ok, _, err) = cache(&root, &["rm", "fake/team/a:v1"]);
    assert!(!ok && err.contains("not in the store"), "{err}");

    // verify: a flipped byte is found, quarantined, and the exit status says so.
    let victim = proxy.blob_path(&b.layers[1]);
    let mut bytes = std::fs::read(&victim).unwrap();
    bytes[100] ^= 0xff;
    std::fs::write(&victim, bytes).unwrap();
    let (ok, out, _) = cache(&root, &["verify"]);
    assert!(!ok, "verify passed a corrupt store:\n{out}");
    assert!(
        out.contains(&b.layers[1]) && out.contains("1 corrupt"),
        "{out}"
    );
    assert!(!victim.exists());
    assert!(root.join("quarantine").read_dir().unwrap().count() == 1);
    let (ok, out, _) = cache(&root, &["verify"]);
    assert!(ok && out.contains("0 corrupt"), "{out}");
    // The server fetches the quarantined layer again on the next pull.
    let r = proxy
        .get(&format!("/v2/team/b/blobs/{}", b.layers[1]))
        .await;
    assert_eq!(
        common::sha256_digest(&r.bytes().await.unwrap()),
        b.layers[1]
    );
    proxy.wait_idle().await;

    // gc: down to a size now, least recently used first; a pinned image stays.
    let cfg = root.parent().unwrap().join("entrepot.toml");
    std::fs::write(
        &cfg,
        format!(
            "[storage]\nroot = \"{}\"\n{}[[pin]]\nimage = \"fake/team/c:v1\"\n",
            root.display(),
            upstream("fake", &up.url(), true, "")
        ),
    )
    .unwrap();
    let out = Command::new(BIN)
        .args(["cache", "gc", "--to", "1KiB", "--config"])
        .arg(&cfg)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(!proxy.blob_path(&b.manifest).exists());
    assert!(!proxy.blob_path(&b.layers[0]).exists());
    for d in c.layers.iter().chain([&c.manifest, &c.config]) {
        assert!(proxy.blob_path(d).exists(), "pinned {d} collected");
    }
    let (_, out, _) = cache(&root, &["ls"]);
    assert!(
        out.contains("fake/team/c") && !out.contains("fake/team/b"),
        "{out}"
    );
    let (ok, _, err) = cache(&root, &["gc"]);
    assert!(!ok && err.contains("--to"), "{err}");
}

#[test]
fn cache_commands_refuse_a_folder_that_is_not_a_store() {
    let dir = tempfile::tempdir().unwrap();
    let (ok, _, err) = cache(dir.path(), &["ls"]);
    assert!(!ok && err.contains("not an entrepot store"), "{err}");
}

#[tokio::test]
async fn json_log_lines_carry_the_access_fields() {
    use std::io::{BufRead, BufReader};
    let up = FakeRegistry::start().await;
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("e.toml");
    std::fs::write(
        &cfg,
        format!(
            "[server]\nlisten = \"127.0.0.1:0\"\n[storage]\nroot = \"{}\"\n{}",
            dir.path().join("store").display(),
            upstream("fake", &up.url(), true, "")
        ),
    )
    .unwrap();
    let mut child = Command::new(BIN)
        .args(["--log-format", "json", "serve", "--config"])
        .arg(&cfg)
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stderr.take().unwrap()).lines();
    let addr = loop {
        let line = lines.next().expect("server exited").unwrap();
        let v: serde_json::Value =
            serde_json::from_str(&line).unwrap_or_else(|_| panic!("not JSON: {line}"));
        if let Some(a) = v["fields"]["addr"].as_str() {
            break a.to_string();
        }
    };
    let r = common::client()
        .get(format!("http://{addr}/v2/team/app/manifests/v1"))
        .header("X-Request-Id", "trace-me-42")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 404);
    assert_eq!(r.headers()["x-request-id"], "trace-me-42");
    let access = loop {
        let line = lines.next().expect("no access line").unwrap();
        let v: serde_json::Value = serde_json::from_str(&line).unwrap();
        if v["target"] == "entrepot::access" {
            break v;
        }
    };
    let f = &access["fields"];
    assert_eq!(f["request_id"], "trace-me-42");
    assert_eq!(f["upstream"], "fake");
    assert_eq!(f["repository"], "team/app");
    assert_eq!(f["reference"], "v1");
    assert_eq!(f["outcome"], "error");
    assert_eq!(f["status"], 404);
    assert!(f["remote"].as_str().unwrap().starts_with("127.0.0.1:"));
    assert!(f["duration_ms"].is_u64() && f["bytes"].is_u64());
    let _ = child.kill();
    let _ = child.wait();
}

/// `cache rm` and `cache verify` beside a running server whose caches are warm: the server used
/// to keep serving the removed tag and blobs from its in-memory tags and mappings (and held the
/// deleted files' space). It now notices the store changed, drops what it holds, and fetches
/// the content again from the upstream.
#[tokio::test]
async fn regression_cache_rm_and_verify_beside_a_warm_server_take_effect() {
    let up = FakeRegistry::start().await;
    let x = up.push_image("team/x", "v1", &[Bytes::from(random_bytes(300_000, 21))]);
    let y = up.push_image("team/y", "v1", &[Bytes::from(random_bytes(300_000, 22))]);
    let proxy = Proxy::start(&upstream("fake", &up.url(), true, "")).await;
    let root = proxy.root.clone();
    for _ in 0..2 {
        proxy.pull_image("team/x", "v1").await.unwrap();
        proxy.pull_image("team/y", "v1").await.unwrap();
        proxy.wait_idle().await;
    }
    let layer = proxy.blob_path(&x.layers[0]);
    assert!(mapped(&layer), "the second pull is served from a mapping");

    let manifests_before = up.count("GET", "/team/x/manifests/");
    let (ok, out, err) = cache(&root, &["rm", "fake/team/x:v1"]);
    assert!(ok, "{out}{err}");
    assert!(!layer.exists());
    common::eventually(
        std::time::Duration::from_secs(10),
        "the server to fetch the removed image again",
        || async {
            proxy.pull_image("team/x", "v1").await.unwrap();
            up.count("GET", "/team/x/manifests/") > manifests_before
        },
    )
    .await;
    proxy.wait_idle().await;
    assert!(layer.exists(), "the layer was fetched and stored again");
    assert!(
        !deleted_mapping(&layer),
        "a mapping of the removed file is still held"
    );

    // A stored layer corrupted in place (the server's mapping sees it too), then verify.
    let victim = proxy.blob_path(&y.layers[0]);
    {
        use std::os::unix::fs::FileExt as _;
        let f = std::fs::OpenOptions::new()
            .write(true)
            .open(&victim)
            .unwrap();
        f.write_at(b"\0\0\0\0", 1000).unwrap();
    }
    let (ok, out, _) = cache(&root, &["verify"]);
    assert!(!ok && out.contains("1 corrupt"), "{out}");
    let url = proxy.url(&format!("/v2/team/y/blobs/{}", y.layers[0]));
    common::eventually(
        std::time::Duration::from_secs(10),
        "the server to serve the quarantined layer right again",
        || async {
            common::get_blob(&common::client(), &url, &y.layers[0])
                .await
                .is_ok()
        },
    )
    .await;
    proxy.wait_idle().await;
}

/// Is `path` mapped into this process (the in-process server)?
fn mapped(path: &std::path::Path) -> bool {
    let maps = std::fs::read_to_string("/proc/self/maps").unwrap();
    maps.lines().any(|l| l.ends_with(&*path.to_string_lossy()))
}

/// Is a removed file that was at `path` still mapped into this process?
fn deleted_mapping(path: &std::path::Path) -> bool {
    let maps = std::fs::read_to_string("/proc/self/maps").unwrap();
    let gone = format!("{} (deleted)", path.display());
    maps.lines().any(|l| l.ends_with(&gone))
}
