//! `entrepot export` / `entrepot import` through the real binary, on stores filled by a real
//! server: a full bundle carries exactly the pinned images and skopeo reads it; tampered and
//! truncated bundles are refused with the store left as it was; a delta on top of a full
//! bundle gives the same store as one full bundle; an offline server serves what was imported.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use bytes::Bytes;
use common::fake_registry::{FakeRegistry, PushedImage};
use common::proxy::Proxy;
use common::{random_bytes, sha256_digest, upstream, OCI_INDEX, OCI_MANIFEST};
use entrepot::cache::inventory::Inventory;
use entrepot::cache::{journal, layout, pins};
use entrepot::config::{parse_image_ref, StorageBackend};
use entrepot::tools::blocking::BlockingStore;
use entrepot::{Config, Server};
use tokio::sync::oneshot;

const BIN: &str = env!("CARGO_BIN_EXE_entrepot");

/// Runs a program to completion within a minute (killed and failed after that).
fn run_bounded(cmd: &mut Command) -> std::process::Output {
    use std::process::Stdio;
    let mut child = cmd
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"));
    let drain = |r: Option<Box<dyn std::io::Read + Send>>| {
        std::thread::spawn(move || {
            let mut buf = Vec::new();
            if let Some(mut r) = r {
                let _ = r.read_to_end(&mut buf);
            }
            buf
        })
    };
    let stdout = drain(child.stdout.take().map(|r| Box::new(r) as _));
    let stderr = drain(child.stderr.take().map(|r| Box::new(r) as _));
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if std::time::Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("{cmd:?} did not finish within 60s");
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    std::process::Output {
        status,
        stdout: stdout.join().unwrap(),
        stderr: stderr.join().unwrap(),
    }
}

/// Runs the binary; returns (success, stdout, stderr).
fn entrepot(args: &[&str]) -> (bool, String, String) {
    let out = run_bounded(Command::new(BIN).args(args));
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn p(path: &Path) -> &str {
    path.to_str().unwrap()
}

/// `entrepot export`; returns the marker it printed on its last line.
fn export(root: &Path, out: &Path, extra: &[&str]) -> u64 {
    let mut args = vec!["export", "--root", p(root), "--out", p(out)];
    args.extend_from_slice(extra);
    let (ok, stdout, stderr) = entrepot(&args);
    assert!(ok, "export failed:\n{stdout}\n{stderr}");
    assert!(
        !Path::new(&format!("{}.tmp", out.display())).exists(),
        "temp bundle left behind"
    );
    let last = stdout.lines().last().unwrap_or_default();
    last.strip_prefix("marker: ")
        .unwrap_or_else(|| panic!("last line is not the marker: {stdout}"))
        .parse()
        .unwrap()
}

fn import(root: &Path, bundle: &Path) -> (bool, String, String) {
    entrepot(&["import", p(bundle), "--root", p(root)])
}

fn import_ok(root: &Path, bundle: &Path) -> String {
    let (ok, out, err) = import(root, bundle);
    assert!(ok, "import of {} failed:\n{out}\n{err}", bundle.display());
    out
}

/// What a store holds, as far as carrying it matters: blobs, manifests with their media
/// types, tags (without their fetch time) and pins.
#[derive(Debug, PartialEq, Eq)]
struct Content {
    blobs: BTreeSet<String>,
    manifests: BTreeMap<String, String>,
    tags: BTreeSet<(String, String, String, String, String, u64)>,
    pins: BTreeSet<String>,
}

/// Runs `f` on the store at `root`, on a thread of its own (the store's blocking view runs a
/// runtime, which an async test's thread cannot).
fn with_store<T: Send>(root: &Path, f: impl FnOnce(&BlockingStore) -> T + Send) -> T {
    std::thread::scope(|s| {
        s.spawn(|| f(&BlockingStore::open_beside(root, &StorageBackend::Fs).unwrap()))
            .join()
            .unwrap()
    })
}

fn content(root: &Path) -> Content {
    with_store(root, |bs| {
        let store = bs.store();
        let inv = bs.wait(Inventory::load(store)).unwrap();
        let manifests = inv
            .manifests
            .keys()
            .map(|d| {
                let mt = bs
                    .wait(store.meta().get(&layout::manifest_type(d)))
                    .unwrap();
                (
                    d.to_string(),
                    String::from_utf8(mt.unwrap().to_vec())
                        .unwrap()
                        .trim()
                        .to_string(),
                )
            })
            .collect();
        let tags = inv
            .tags
            .iter()
            .map(|t| {
                let text = bs.wait(store.meta().get(&t.key)).unwrap().unwrap();
                let rec: entrepot::cache::tags::TagRecord = serde_json::from_slice(&text).unwrap();
                assert_eq!(rec.digest, t.digest.to_string());
                (
                    t.upstream.clone(),
                    t.repo.clone(),
                    t.tag.clone(),
                    rec.digest,
                    rec.media_type,
                    rec.size,
                )
            })
            .collect();
        Content {
            blobs: inv.blobs.keys().map(|d| d.to_string()).collect(),
            manifests,
            tags,
            pins: bs
                .wait(store.recorded_pins())
                .unwrap()
                .iter()
                .map(pins::format)
                .collect(),
        }
    })
}

/// The source store's content restricted to its pinned images: what a full bundle carries.
fn pinned_content(root: &Path) -> Content {
    let all = content(root);
    let (inv, pinned) = with_store(root, |bs| {
        (
            bs.wait(Inventory::load(bs.store())).unwrap(),
            bs.wait(bs.store().recorded_pins()).unwrap(),
        )
    });
    let mut closure = BTreeSet::new();
    let mut tags = BTreeSet::new();
    for pin in &pinned {
        let tag = match &pin.reference {
            entrepot::oci::Reference::Tag(t) => t.to_string(),
            entrepot::oci::Reference::Digest(_) => unreachable!("tests pin tags"),
        };
        let t = all
            .tags
            .iter()
            .find(|t| t.0 == pin.upstream && t.1 == pin.repo.as_str() && t.2 == tag)
            .unwrap_or_else(|| panic!("{} not in the source store", pins::format(pin)))
            .clone();
        closure.extend(
            inv.closure(&t.3.parse().unwrap())
                .iter()
                .map(|d| d.to_string()),
        );
        tags.insert(t);
    }
    Content {
        blobs: all.blobs.intersection(&closure).cloned().collect(),
        manifests: all
            .manifests
            .into_iter()
            .filter(|(d, _)| closure.contains(d))
            .collect(),
        tags,
        pins: all.pins,
    }
}

/// Every file and folder under `root`, with a hash of each file's content.
/// Every folder and file of a store with its content's digest; the store's `lock` file (which
/// an import takes, empty) is coordination, not content.
fn listing(root: &Path) -> BTreeMap<String, String> {
    fn walk(base: &Path, dir: &Path, out: &mut BTreeMap<String, String>) {
        for e in std::fs::read_dir(dir).unwrap() {
            let e = e.unwrap();
            let rel = e.path().strip_prefix(base).unwrap().display().to_string();
            if rel == "lock" {
                continue;
            }
            if e.file_type().unwrap().is_dir() {
                out.insert(rel, "dir".to_string());
                walk(base, &e.path(), out);
            } else {
                out.insert(rel, sha256_digest(&std::fs::read(e.path()).unwrap()));
            }
        }
    }
    let mut out = BTreeMap::new();
    walk(root, root, &mut out);
    out
}

/// Names and contents of a tar's files.
fn tar_files(path: &Path) -> BTreeMap<String, Vec<u8>> {
    let mut ar = tar::Archive::new(std::fs::File::open(path).unwrap());
    let mut out = BTreeMap::new();
    for e in ar.entries().unwrap() {
        let mut e = e.unwrap();
        let name = e.path().unwrap().display().to_string();
        let mut data = Vec::new();
        std::io::Read::read_to_end(&mut e, &mut data).unwrap();
        out.insert(name, data);
    }
    out
}

/// Writes a tar holding `files`, in order, ended properly.
fn write_tar(path: &Path, files: &[(String, Vec<u8>)]) {
    let mut b = tar::Builder::new(std::fs::File::create(path).unwrap());
    for (name, data) in files {
        let mut h = tar::Header::new_gnu();
        h.set_size(data.len() as u64);
        h.set_mode(0o644);
        b.append_data(&mut h, name, data.as_slice()).unwrap();
    }
    b.finish().unwrap();
}

/// Rewrites a bundle with its files passed through `edit` (returning `None` drops one),
/// keeping their order.
fn rewrite(from: &Path, to: &Path, edit: impl Fn(&str, Vec<u8>) -> Option<Vec<u8>>) {
    let mut ar = tar::Archive::new(std::fs::File::open(from).unwrap());
    let mut files = Vec::new();
    for e in ar.entries().unwrap() {
        let mut e = e.unwrap();
        let name = e.path().unwrap().display().to_string();
        let mut data = Vec::new();
        std::io::Read::read_to_end(&mut e, &mut data).unwrap();
        if let Some(d) = edit(&name, data) {
            files.push((name, d));
        }
    }
    write_tar(to, &files);
}

/// Offset of an entry's data (and of its header, 512 bytes before) in a tar.
fn entry_offset(path: &Path, name: &str) -> u64 {
    let mut ar = tar::Archive::new(std::fs::File::open(path).unwrap());
    for e in ar.entries().unwrap() {
        let e = e.unwrap();
        if e.path().unwrap().display().to_string() == name {
            return e.raw_file_position();
        }
    }
    panic!("{name} not in {}", path.display());
}

fn blob_entry(digest: &str) -> String {
    format!("blobs/{}", digest.replace(':', "/"))
}

fn index_json(bundle: &Path) -> serde_json::Value {
    serde_json::from_slice(&tar_files(bundle)["index.json"]).unwrap()
}

/// The `ref.name`s in a bundle's index.json.
fn ref_names(bundle: &Path) -> BTreeSet<String> {
    index_json(bundle)["manifests"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| {
            m["annotations"]["org.opencontainers.image.ref.name"]
                .as_str()
                .unwrap()
                .to_string()
        })
        .collect()
}

/// Pulls an image (an index with all its platforms) through `base`, checking every digest;
/// returns the digest of the manifest the reference resolved to.
async fn pull(base: &str, repo: &str, reference: &str) -> String {
    let c = common::client();
    let get = |path: String| {
        let c = c.clone();
        async move {
            let r = c.get(format!("{base}{path}")).send().await.unwrap();
            assert_eq!(r.status(), 200, "GET {path}");
            r.bytes().await.unwrap()
        }
    };
    let top = get(format!("/v2/{repo}/manifests/{reference}")).await;
    let mut manifests = vec![top.clone()];
    while let Some(body) = manifests.pop() {
        let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
        for m in v["manifests"].as_array().into_iter().flatten() {
            let d = m["digest"].as_str().unwrap();
            let child = get(format!("/v2/{repo}/manifests/{d}")).await;
            assert_eq!(sha256_digest(&child), d);
            manifests.push(child);
        }
        let blobs = v["layers"]
            .as_array()
            .into_iter()
            .flatten()
            .chain(v.get("config"));
        for b in blobs {
            let d = b["digest"].as_str().unwrap();
            let data = get(format!("/v2/{repo}/blobs/{d}")).await;
            assert_eq!(sha256_digest(&data), d, "{repo} blob");
        }
    }
    sha256_digest(&top)
}

async fn pull_through(proxy: &Proxy, repo: &str, reference: &str) -> String {
    let d = pull(&proxy.url, repo, reference).await;
    proxy.wait_idle().await;
    d
}

/// Two single-platform images and an index over them, in `repo`; the index is tagged `tag`.
fn push_index(up: &FakeRegistry, repo: &str, tag: &str, seed: u64) -> (String, Vec<PushedImage>) {
    let mut platforms = Vec::new();
    let mut entries = Vec::new();
    for (i, arch) in ["amd64", "arm64"].into_iter().enumerate() {
        let img = up.push_image(
            repo,
            &format!("{tag}-{arch}"),
            &[Bytes::from(random_bytes(40_000, seed + i as u64))],
        );
        entries.push(serde_json::json!({
            "mediaType": OCI_MANIFEST, "digest": img.manifest, "size": img.manifest_body.len(),
            "platform": {"architecture": arch, "os": "linux"},
        }));
        platforms.push(img);
    }
    let body = serde_json::to_vec(&serde_json::json!({
        "schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": entries,
    }))
    .unwrap();
    (up.put_manifest(repo, Some(tag), OCI_INDEX, body), platforms)
}

fn pin(root: &Path, images: &[&str]) {
    let p: Vec<_> = images.iter().map(|i| parse_image_ref(i).unwrap()).collect();
    with_store(root, |bs| bs.wait(bs.store().add_pins(&p)).unwrap());
}

/// entrepot with `[server] offline = true` on `root`; its upstream points at `up`, which it
/// must never contact.
struct Offline {
    url: String,
    shutdown: Option<oneshot::Sender<()>>,
    handle: tokio::task::JoinHandle<std::io::Result<()>>,
}

impl Offline {
    async fn start(root: &Path, up: &FakeRegistry) -> Offline {
        common::install_crypto();
        let text = format!(
            "[server]\nlisten = \"127.0.0.1:0\"\noffline = true\nshutdown_grace = \"2s\"\n[storage]\nroot = \"{}\"\n{}",
            root.display(),
            upstream("fake", &up.url(), true, "")
        );
        let server = Server::new(Config::parse(&text).unwrap()).unwrap();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let (tx, rx) = oneshot::channel::<()>();
        let handle = tokio::spawn(server.run(listener, async {
            let _ = rx.await;
        }));
        Offline {
            url,
            shutdown: Some(tx),
            handle,
        }
    }

    async fn stop(mut self) {
        let _ = self.shutdown.take().unwrap().send(());
        tokio::time::timeout(Duration::from_secs(10), &mut self.handle)
            .await
            .expect("offline server drains in time")
            .unwrap()
            .unwrap();
    }
}

/// A store filled through a real server: team/a and team/b share a layer, team/multi is a
/// two-platform index, team/c is cached but not pinned.
struct Source {
    up: FakeRegistry,
    dir: tempfile::TempDir,
    root: PathBuf,
    a: PushedImage,
    multi: String,
    c: PushedImage,
}

async fn source() -> Source {
    let up = FakeRegistry::start().await;
    let shared = Bytes::from(random_bytes(60_000, 1));
    let a = up.push_image(
        "team/a",
        "v1",
        &[shared.clone(), Bytes::from(random_bytes(80_000, 2))],
    );
    up.push_image(
        "team/b",
        "v1",
        &[shared, Bytes::from(random_bytes(30_000, 3))],
    );
    let (multi, _) = push_index(&up, "team/multi", "v1", 10);
    let c = up.push_image("team/c", "v1", &[Bytes::from(random_bytes(20_000, 4))]);
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("source");
    let proxy = Proxy::start_at(&upstream("fake", &up.url(), true, ""), &root).await;
    for repo in ["team/a", "team/b", "team/multi", "team/c"] {
        pull_through(&proxy, repo, "v1").await;
    }
    proxy.stop().await;
    pin(
        &root,
        &["fake/team/a:v1", "fake/team/b:v1", "fake/team/multi:v1"],
    );
    Source {
        up,
        dir,
        root,
        a,
        multi,
        c,
    }
}

#[tokio::test]
async fn full_bundle_carries_the_pinned_images_reads_in_skopeo_and_serves_offline() {
    let src = source().await;
    let bundle = src.dir.path().join("bundle.tar");
    let marker = export(&src.root, &bundle, &[]);
    assert_eq!(
        marker,
        journal::last_seq(&journal::path(&src.root)).unwrap(),
        "the marker is the journal's position"
    );
    assert!(marker > 0);

    // An OCI image layout, named with full names, without the unpinned image.
    let files = tar_files(&bundle);
    assert_eq!(
        files["oci-layout"],
        br#"{"imageLayoutVersion":"1.0.0"}"#.to_vec()
    );
    let info: serde_json::Value = serde_json::from_slice(&files["entrepot-bundle.json"]).unwrap();
    assert_eq!(info["since"], 0);
    assert_eq!(info["marker"], marker);
    assert_eq!(info["upstreams"], serde_json::json!(["fake"]));
    assert_eq!(
        ref_names(&bundle),
        BTreeSet::from([
            "fake/team/a:v1".to_string(),
            "fake/team/b:v1".to_string(),
            "fake/team/multi:v1".to_string()
        ])
    );
    let index = index_json(&bundle);
    let a = index["manifests"]
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["annotations"]["io.entrepot.repository"] == "team/a")
        .unwrap();
    assert_eq!(a["digest"], src.a.manifest);
    assert_eq!(a["mediaType"], OCI_MANIFEST);
    assert_eq!(a["annotations"]["io.entrepot.upstream"], "fake");
    assert_eq!(a["annotations"]["io.entrepot.tag"], "v1");
    assert!(!files.contains_key(&blob_entry(&src.c.layers[0])));
    for (name, data) in files.iter().filter(|(n, _)| n.starts_with("blobs/")) {
        assert_eq!(blob_entry(&sha256_digest(data)), *name);
    }

    // Import into an empty store: exactly the pinned images, tags and pins.
    let dst = src.dir.path().join("site");
    let out = import_ok(&dst, &bundle);
    assert!(out.contains("imported 3 image(s)"), "{out}");
    let expected = pinned_content(&src.root);
    assert_eq!(expected.tags.len(), 3);
    assert_eq!(content(&dst), expected);
    assert!(!content(&dst).blobs.contains(&src.c.manifest));
    assert_eq!(
        std::fs::read_dir(dst.join("tmp")).unwrap().count(),
        0,
        "staging left behind"
    );
    // Importing it again changes nothing.
    let out = import_ok(&dst, &bundle);
    assert!(out.contains(" 0 new blob(s)"), "{out}");
    assert_eq!(content(&dst), expected);

    // skopeo reads it, by the full name, with every digest intact.
    let a_dir = src.dir.path().join("skopeo-a");
    skopeo(&[
        "copy",
        &format!("oci-archive:{}:fake/team/a:v1", bundle.display()),
        &format!("dir:{}", a_dir.display()),
    ]);
    let m = std::fs::read(a_dir.join("manifest.json")).unwrap();
    assert_eq!(sha256_digest(&m), src.a.manifest);
    for l in &src.a.layers {
        let data = std::fs::read(a_dir.join(l.split_once(':').unwrap().1)).unwrap();
        assert_eq!(sha256_digest(&data), *l);
    }
    let multi_dir = src.dir.path().join("skopeo-multi");
    skopeo(&[
        "copy",
        "--all",
        &format!("oci-archive:{}:fake/team/multi:v1", bundle.display()),
        &format!("dir:{}", multi_dir.display()),
    ]);
    let m = std::fs::read(multi_dir.join("manifest.json")).unwrap();
    assert_eq!(sha256_digest(&m), src.multi);

    // An OCI archive skopeo wrote (only ref.name survives) imports too, on a site whose
    // configuration names the upstream.
    let foreign = src.dir.path().join("skopeo.tar");
    skopeo(&[
        "copy",
        "--preserve-digests",
        &format!("oci-archive:{}:fake/team/a:v1", bundle.display()),
        &format!("oci-archive:{}:fake/team/a:v1", foreign.display()),
    ]);
    let other = src.dir.path().join("other-site");
    let cfg = src.dir.path().join("other.toml");
    std::fs::write(
        &cfg,
        format!(
            "[storage]\nroot = \"{}\"\n{}",
            other.display(),
            upstream("fake", &src.up.url(), true, "")
        ),
    )
    .unwrap();
    let (ok, out, err) = entrepot(&["import", p(&foreign), "--config", p(&cfg)]);
    assert!(ok, "{out}{err}");
    let got = content(&other);
    assert!(
        got.tags
            .iter()
            .any(|t| t.2 == "v1" && t.3 == src.a.manifest),
        "{got:?}"
    );
    assert!(src.a.layers.iter().all(|l| got.blobs.contains(l)));

    // An offline server on the imported store serves the images without its upstream.
    src.up.reset_counts();
    let site = Offline::start(&dst, &src.up).await;
    assert_eq!(pull(&site.url, "team/a", "v1").await, src.a.manifest);
    assert_eq!(pull(&site.url, "team/multi", "v1").await, src.multi);
    pull(&site.url, "team/b", "v1").await;
    let miss = common::client()
        .get(format!("{}/v2/team/c/manifests/v1", site.url))
        .send()
        .await
        .unwrap();
    assert_eq!(miss.status(), 404, "team/c was not carried");
    site.stop().await;
    assert!(
        src.up.requests().is_empty(),
        "the offline server contacted its upstream: {:?}",
        src.up.requests()
    );
}

/// Runs skopeo and requires it to succeed.
fn skopeo(args: &[&str]) {
    // Fails (never skips) when skopeo is not installed; scripts/test.sh installs it.
    let out = run_bounded(Command::new("skopeo").arg("--insecure-policy").args(args));
    assert!(
        out.status.success(),
        "skopeo {args:?}:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[tokio::test]
async fn damaged_or_altered_bundles_are_refused_and_the_store_is_unchanged() {
    let src = source().await;
    let dir = src.dir.path();
    let good = dir.join("good.tar");
    export(&src.root, &good, &[]);
    let only_b = dir.join("b.tar");
    export(&src.root, &only_b, &["fake/team/b:v1"]);
    assert_eq!(
        ref_names(&only_b),
        BTreeSet::from(["fake/team/b:v1".to_string()])
    );
    // The receiving store already holds team/b (and so team/a's shared layer).
    let dst = dir.join("site");
    import_ok(&dst, &only_b);
    let before = listing(&dst);
    let own_layer = &src.a.layers[1];
    let good_bytes = std::fs::read(&good).unwrap();

    let refused = |bundle: &Path, expect: &[&str]| {
        let (ok, out, err) = import(&dst, bundle);
        assert!(!ok, "{} was imported:\n{out}", bundle.display());
        for e in expect {
            assert!(err.contains(e), "{e:?} not in:\n{err}");
        }
        assert!(err.contains("the store is unchanged"), "{err}");
        assert_eq!(listing(&dst), before, "the store changed");
        // A refused bundle does not create a store either.
        let fresh = dir.join("never-created");
        let (ok, _, _) = import(&fresh, bundle);
        assert!(!ok);
        assert!(!fresh.exists(), "a refused import left {}", fresh.display());
    };

    // One byte flipped in a layer.
    let flipped = dir.join("flipped.tar");
    let mut bytes = good_bytes.clone();
    let at = entry_offset(&good, &blob_entry(own_layer)) as usize + 1000;
    bytes[at] ^= 0x01;
    std::fs::write(&flipped, &bytes).unwrap();
    refused(
        &flipped,
        &[&blob_entry(own_layer), "does not match its digest"],
    );

    // Cut short in the middle of a blob, and at an entry boundary.
    let half = dir.join("half.tar");
    std::fs::write(&half, &good_bytes[..good_bytes.len() / 2 + 100]).unwrap();
    refused(&half, &["truncated"]);
    let boundary = dir.join("boundary.tar");
    let last_header = entry_offset(&good, &blob_entry(own_layer)) as usize - 512;
    std::fs::write(&boundary, &good_bytes[..last_header]).unwrap();
    refused(&boundary, &["truncated"]);

    // A blob taken out (the archive itself well formed).
    let missing = dir.join("missing.tar");
    let victim = blob_entry(own_layer);
    rewrite(&good, &missing, |name, data| {
        (name != victim).then_some(data)
    });
    refused(
        &missing,
        &[own_layer, "neither in the bundle nor in the store"],
    );

    // index.json broken, or naming a manifest the bundle does not hold.
    let bad_index = dir.join("bad-index.json.tar");
    rewrite(&good, &bad_index, |name, data| {
        Some(if name == "index.json" {
            br#"{"schemaVersion":2,"manifests":[{"digest":"sha256:12"#.to_vec()
        } else {
            data
        })
    });
    refused(&bad_index, &["index.json"]);
    let ghost = sha256_digest(b"no such manifest");
    let wrong_digest = dir.join("wrong-digest.tar");
    rewrite(&good, &wrong_digest, |name, data| {
        Some(if name == "index.json" {
            String::from_utf8(data)
                .unwrap()
                .replacen(&src.a.manifest, &ghost, 1)
                .into_bytes()
        } else {
            data
        })
    });
    refused(&wrong_digest, &[&ghost, "fake/team/a:v1"]);

    // Not a tar at all.
    let noise = dir.join("noise.tar");
    std::fs::write(&noise, random_bytes(8192, 99)).unwrap();
    refused(&noise, &["not a complete tar archive"]);

    // The intact bundle still imports.
    import_ok(&dst, &good);
    assert_eq!(content(&dst), pinned_content(&src.root));
}

#[tokio::test]
async fn a_delta_on_top_of_a_full_bundle_equals_one_full_bundle() {
    let up = FakeRegistry::start().await;
    let shared = Bytes::from(random_bytes(50_000, 21));
    let a1 = up.push_image(
        "team/a",
        "v1",
        &[shared.clone(), Bytes::from(random_bytes(70_000, 22))],
    );
    up.set_tag("team/a", "stable", &a1.manifest);
    let (multi, _) = push_index(&up, "team/multi", "v1", 30);
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("source");
    let proxy = Proxy::start_at(&upstream("fake", &up.url(), true, ""), &root).await;
    for (repo, tag) in [("team/a", "v1"), ("team/a", "stable"), ("team/multi", "v1")] {
        pull_through(&proxy, repo, tag).await;
    }
    pin(
        &root,
        &["fake/team/a:v1", "fake/team/a:stable", "fake/team/multi:v1"],
    );

    // Month one: everything. The server keeps running; export reads the folder.
    let full_a = dir.path().join("full-a.tar");
    let marker_a = export(&root, &full_a, &[]);

    // Then: a new image, and `stable` moves to a new build sharing a layer with the old one.
    let d = up.push_image("team/d", "v1", &[Bytes::from(random_bytes(45_000, 23))]);
    let a2 = up.push_image(
        "team/a",
        "stable",
        &[shared, Bytes::from(random_bytes(65_000, 24))],
    );
    pull_through(&proxy, "team/d", "v1").await;
    proxy.clock.advance(Duration::from_secs(3600));
    assert_eq!(pull_through(&proxy, "team/a", "stable").await, a2.manifest);
    pin(&root, &["fake/team/d:v1"]);

    let delta = dir.path().join("delta.tar");
    let marker_b = export(&root, &delta, &["--since", &marker_a.to_string()]);
    assert!(marker_b > marker_a);
    let full_c = dir.path().join("full-c.tar");
    let marker_c = export(&root, &full_c, &[]);
    assert_eq!(marker_c, marker_b, "nothing happened in between");
    proxy.stop().await;

    // The delta holds what changed, and only that.
    assert_eq!(
        ref_names(&delta),
        BTreeSet::from([
            "fake/team/a:stable".to_string(),
            "fake/team/d:v1".to_string()
        ])
    );
    let files = tar_files(&delta);
    let info: serde_json::Value = serde_json::from_slice(&files["entrepot-bundle.json"]).unwrap();
    assert_eq!(info["since"], marker_a);
    assert_eq!(info["marker"], marker_b);
    for new in [
        &a2.manifest,
        &a2.config,
        &a2.layers[1],
        &d.manifest,
        &d.layers[0],
    ] {
        assert!(
            files.contains_key(&blob_entry(new)),
            "{new} not in the delta"
        );
    }
    for old in [&a1.layers[0], &a1.layers[1], &a1.manifest, &multi] {
        assert!(!files.contains_key(&blob_entry(old)), "{old} sent again");
    }
    assert!(std::fs::metadata(&delta).unwrap().len() < std::fs::metadata(&full_c).unwrap().len());

    // Full, then delta == one full bundle made at the end == the source's pinned images.
    let x = dir.path().join("site-x");
    import_ok(&x, &full_a);
    let out = import_ok(&x, &delta);
    assert!(out.contains("delta since"), "{out}");
    let y = dir.path().join("site-y");
    import_ok(&y, &full_c);
    assert_eq!(content(&x), content(&y));
    assert_eq!(content(&y), pinned_content(&root));

    // A delta alone is refused, saying what it needs.
    let z = dir.path().join("site-z");
    let (ok, _, err) = import(&z, &delta);
    assert!(!ok);
    assert!(
        err.contains("neither in the bundle nor in the store") && err.contains("delta since"),
        "{err}"
    );
    assert!(!z.exists());

    // The site serves the new image and the moved tag, offline.
    up.reset_counts();
    let site = Offline::start(&x, &up).await;
    assert_eq!(pull(&site.url, "team/d", "v1").await, d.manifest);
    assert_eq!(pull(&site.url, "team/a", "stable").await, a2.manifest);
    assert_eq!(pull(&site.url, "team/a", "v1").await, a1.manifest);
    site.stop().await;
    assert!(up.requests().is_empty(), "{:?}", up.requests());
}

#[test]
fn export_refuses_what_the_store_does_not_hold() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("store");
    std::fs::create_dir_all(root.join("blobs/sha256")).unwrap();
    std::fs::create_dir_all(root.join("meta")).unwrap();
    let out = dir.path().join("b.tar");
    let (ok, _, err) = entrepot(&["export", "--root", p(&root), "--out", p(&out)]);
    assert!(!ok && err.contains("nothing to export"), "{err}");
    let (ok, _, err) = entrepot(&[
        "export",
        "--root",
        p(&root),
        "--out",
        p(&out),
        "docker.io/library/alpine:3.20",
    ]);
    assert!(
        !ok && err.contains("docker.io/library/alpine:3.20: not in the store"),
        "{err}"
    );
    let (ok, _, err) = entrepot(&[
        "export",
        "--root",
        p(&root),
        "--out",
        p(&out),
        "--since",
        "5",
        "docker.io/library/alpine:3.20",
    ]);
    assert!(!ok && err.contains("past this store's journal"), "{err}");
    assert!(!out.exists() && !dir.path().join("b.tar.tmp").exists());
}
