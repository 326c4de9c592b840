//! `entrepot prefetch`, the real binary against in-process fake upstreams: a list file, one
//! upstream fetch per digest across images, index platforms, resuming, failures with their
//! reasons, pins, and `--server` mode through an in-process entrepot.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use bytes::Bytes;
use common::fake_registry::{BlobBehavior, FakeRegistry, PushedImage};
use common::proxy::Proxy;
use common::real::{run_bounded, Finished};
use common::{random_bytes, upstream, OCI_INDEX, OCI_MANIFEST};

const BIN: &str = env!("CARGO_BIN_EXE_entrepot");
/// Ceiling for one prefetch run; they take well under a second here.
const LIMIT: Duration = Duration::from_secs(60);

/// A working folder with an entrepot config whose upstreams are `upstreams`.
struct Site {
    dir: tempfile::TempDir,
}

impl Site {
    fn new(upstreams: &str) -> Site {
        let dir = tempfile::tempdir().unwrap();
        let text = format!(
            "[server]\nshutdown_grace = \"5s\"\n[storage]\nroot = {:?}\n{upstreams}",
            dir.path().join("store").display().to_string()
        );
        std::fs::write(dir.path().join("entrepot.toml"), text).unwrap();
        Site { dir }
    }

    fn config(&self) -> PathBuf {
        self.dir.path().join("entrepot.toml")
    }

    fn root(&self) -> PathBuf {
        self.dir.path().join("store")
    }

    fn write(&self, name: &str, text: &str) -> PathBuf {
        let path = self.dir.path().join(name);
        std::fs::write(&path, text).unwrap();
        path
    }

    /// `entrepot prefetch --config <site> <args...>`.
    async fn prefetch(&self, args: &[&str]) -> Finished {
        let mut cmd = Command::new(BIN);
        cmd.arg("prefetch")
            .arg("--config")
            .arg(self.config())
            .args(args);
        prefetch_cmd(cmd).await
    }
}

async fn prefetch_cmd(mut cmd: Command) -> Finished {
    cmd.env_remove("ENTREPOT_LOG");
    run_bounded("entrepot prefetch", cmd, LIMIT)
        .await
        .expect("prefetch ran")
}

/// The cells of a summary row (`blobs  5  3  2  0`) after its label.
fn row(out: &str, label: &str) -> Vec<String> {
    let line = out
        .lines()
        .rev()
        .find(|l| l.split_whitespace().next() == Some(label))
        .unwrap_or_else(|| panic!("no {label} row in:\n{out}"));
    line.split_whitespace()
        .skip(1)
        .map(str::to_string)
        .collect()
}

/// `[total, fetched, already cached, failed]` of a count row (`-` cells left out).
fn counts(out: &str, label: &str) -> Vec<usize> {
    row(out, label)
        .iter()
        .filter(|c| *c != "-")
        .map(|c| {
            c.parse()
                .unwrap_or_else(|_| panic!("{label}: {c:?}\n{out}"))
        })
        .collect()
}

fn blob_file(root: &Path, digest: &str) -> PathBuf {
    root.join("blobs/sha256")
        .join(digest.trim_start_matches("sha256:"))
}

fn pins(root: &Path) -> Vec<String> {
    std::fs::read_to_string(root.join("meta/pins"))
        .unwrap_or_default()
        .lines()
        .map(str::to_string)
        .collect()
}

fn all_digests(img: &PushedImage) -> Vec<String> {
    let mut all = vec![img.manifest.clone(), img.config.clone()];
    all.extend(img.layers.iter().cloned());
    all
}

/// Pushes one image per platform and an index over them, tagged `tag`; returns the index digest
/// and the per-platform images.
fn push_index(up: &FakeRegistry, repo: &str, tag: &str, seed: u64) -> (String, Vec<PushedImage>) {
    let platforms = [("linux", "amd64"), ("linux", "arm64")];
    let mut images = Vec::new();
    let mut entries = Vec::new();
    for (i, (os, arch)) in platforms.iter().enumerate() {
        let layers = [
            Bytes::from(random_bytes(40_000, seed + i as u64 * 10)),
            Bytes::from(random_bytes(9_000, seed + i as u64 * 10 + 1)),
        ];
        let img = up.push_image(repo, &format!("{tag}-{arch}"), &layers);
        entries.push(serde_json::json!({
            "mediaType": OCI_MANIFEST,
            "digest": img.manifest,
            "size": img.manifest_body.len(),
            "platform": {"os": os, "architecture": arch},
        }));
        images.push(img);
    }
    let index = serde_json::to_vec(&serde_json::json!({
        "schemaVersion": 2,
        "mediaType": OCI_INDEX,
        "manifests": entries,
    }))
    .unwrap();
    let digest = up.put_manifest(repo, Some(tag), OCI_INDEX, index);
    (digest, images)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_list_file_fills_the_store_once_per_digest_and_a_second_run_fetches_nothing() {
    let up = FakeRegistry::start().await;
    let shared = Bytes::from(random_bytes(300_000, 1));
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
    let site = Site::new(&upstream("up", &up.url(), true, ""));
    let list = site.write(
        "images.txt",
        "# the team's images\n\nup/team/a:v1\n   up/team/b:v1   # shares a layer with a\n\n# end\n",
    );

    let run = site
        .prefetch(&["--file", list.to_str().unwrap(), "--jobs", "3"])
        .await;
    assert!(run.success(), "{}", run.output);
    // The shared layer crossed the upstream link once; every other blob once too.
    assert_eq!(up.count("GET", &format!("/blobs/{}", a.layers[0])), 1);
    for d in [&a.config, &a.layers[1], &b.config, &b.layers[1]] {
        assert_eq!(up.count("GET", &format!("/blobs/{d}")), 1, "{d}");
    }
    // Verified copies of everything, manifests included, are in the store.
    for d in all_digests(&a).iter().chain(&all_digests(&b)) {
        let data = std::fs::read(blob_file(&site.root(), d)).unwrap_or_else(|e| panic!("{d}: {e}"));
        assert_eq!(&common::sha256_digest(&data), d);
    }
    assert_eq!(
        counts(&run.output, "images"),
        [2, 2, 0, 0],
        "{}",
        run.output
    );
    assert_eq!(counts(&run.output, "blobs"), [5, 5, 0, 0], "{}", run.output);
    assert_eq!(
        counts(&run.output, "manifests"),
        [2, 2, 0],
        "{}",
        run.output
    );
    // Not a terminal: plain lines, blob by blob and image by image.
    assert!(
        run.output.contains(&format!("fetched {}", a.layers[0])),
        "{}",
        run.output
    );
    assert!(run.output.contains("up/team/b:v1: done"), "{}", run.output);
    // Pinned under the upstream's name.
    assert_eq!(pins(&site.root()), ["up/team/a:v1", "up/team/b:v1"]);

    // Resumed: everything is there, so nothing goes upstream at all.
    up.reset_counts();
    let again = site.prefetch(&["--file", list.to_str().unwrap()]).await;
    assert!(again.success(), "{}", again.output);
    assert_eq!(up.count("GET", "/blobs/"), 0, "{:?}", up.requests());
    assert_eq!(
        counts(&again.output, "blobs"),
        [5, 0, 5, 0],
        "{}",
        again.output
    );
    assert_eq!(
        counts(&again.output, "images"),
        [2, 0, 2, 0],
        "{}",
        again.output
    );
    assert!(again
        .output
        .contains(&format!("already cached {}", b.layers[1])));
    assert_eq!(pins(&site.root()).len(), 2, "pins are not repeated");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_partial_store_is_completed_with_what_is_missing() {
    let up = FakeRegistry::start().await;
    let a = up.push_image("team/a", "v1", &[Bytes::from(random_bytes(50_000, 4))]);
    let b = up.push_image("team/b", "v1", &[Bytes::from(random_bytes(60_000, 5))]);
    let site = Site::new(&upstream("up", &up.url(), true, ""));
    let first = site.prefetch(&["up/team/a:v1"]).await;
    assert!(first.success(), "{}", first.output);
    up.reset_counts();
    let second = site.prefetch(&["up/team/a:v1", "up/team/b:v1"]).await;
    assert!(second.success(), "{}", second.output);
    for d in [&a.config, &a.layers[0]] {
        assert_eq!(up.count("GET", &format!("/blobs/{d}")), 0, "{d}");
    }
    for d in [&b.config, &b.layers[0]] {
        assert_eq!(up.count("GET", &format!("/blobs/{d}")), 1, "{d}");
    }
    assert_eq!(
        counts(&second.output, "blobs"),
        [4, 2, 2, 0],
        "{}",
        second.output
    );
    assert_eq!(
        counts(&second.output, "images"),
        [2, 1, 1, 0],
        "{}",
        second.output
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_index_brings_all_platforms_or_the_chosen_ones() {
    let up = FakeRegistry::start().await;
    let (index, images) = push_index(&up, "multi/app", "1.0", 100);
    let (amd64, arm64) = (&images[0], &images[1]);
    let site = Site::new(&upstream("up", &up.url(), true, ""));

    // Default: every platform.
    let all = site.prefetch(&["up/multi/app:1.0"]).await;
    assert!(all.success(), "{}", all.output);
    for d in std::iter::once(&index)
        .chain(&all_digests(amd64))
        .chain(&all_digests(arm64))
    {
        assert!(blob_file(&site.root(), d).is_file(), "{d} missing");
    }
    assert_eq!(
        counts(&all.output, "manifests"),
        [3, 3, 0],
        "{}",
        all.output
    );
    assert_eq!(counts(&all.output, "blobs")[0], 6, "{}", all.output);

    // --platform: only arm64, into a fresh store given with --root; --no-pin records no pin.
    up.reset_counts();
    let other = tempfile::tempdir().unwrap();
    let root = other.path().join("store");
    let one = site
        .prefetch(&[
            "--root",
            root.to_str().unwrap(),
            "--platform",
            "linux/arm64",
            "--no-pin",
            "up/multi/app:1.0",
        ])
        .await;
    assert!(one.success(), "{}", one.output);
    for d in all_digests(arm64) {
        assert!(blob_file(&root, &d).is_file(), "{d} missing");
    }
    for d in all_digests(amd64) {
        assert!(!blob_file(&root, &d).exists(), "{d} fetched for amd64");
        assert_eq!(up.count("GET", &d), 0, "{d} asked upstream");
    }
    assert_eq!(counts(&one.output, "blobs"), [3, 3, 0, 0], "{}", one.output);
    assert!(pins(&root).is_empty(), "--no-pin pinned: {:?}", pins(&root));
    assert!(!root.join("meta/pins").exists());
    assert_eq!(pins(&site.root()), ["up/multi/app:1.0"]);

    // A platform the index does not have is a failure that says so.
    let none = site
        .prefetch(&["--platform", "linux/s390x,linux/arm/v7", "up/multi/app:1.0"])
        .await;
    assert!(!none.success(), "{}", none.output);
    assert!(
        none.output
            .contains("no manifest for linux/s390x, linux/arm/v7"),
        "{}",
        none.output
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failures_are_listed_with_their_reason_and_the_rest_is_done() {
    let up = FakeRegistry::start().await;
    let good = up.push_image("team/good", "v1", &[Bytes::from(random_bytes(80_000, 6))]);
    let bad = up.push_image("team/bad", "v1", &[Bytes::from(random_bytes(80_000, 7))]);
    up.set_blob_behavior(&bad.layers[0], BlobBehavior::Corrupt);
    let site = Site::new(&upstream("up", &up.url(), true, ""));
    let list = site.write(
        "images.txt",
        "up/team/good:v1\nup/team/good:nope\nup/team/bad:v1\nnowhere/x/y:1\nalpine\n",
    );
    let run = site.prefetch(&["--file", list.to_str().unwrap()]).await;
    assert!(!run.success(), "{}", run.output);
    assert_eq!(run.status.code(), Some(1), "{}", run.output);
    let failed = run
        .output
        .split("\nfailed:\n")
        .nth(1)
        .unwrap_or_else(|| panic!("no failures listed:\n{}", run.output));
    let reason = |image: &str| {
        failed
            .lines()
            .find(|l| l.trim_start().starts_with(&format!("{image}:")))
            .unwrap_or_else(|| panic!("{image} not listed as failed:\n{}", run.output))
            .to_string()
    };
    assert!(
        reason("up/team/good:nope").contains("MANIFEST_UNKNOWN"),
        "{failed}"
    );
    // The corrupt layer never entered the store and the image says which blob broke.
    assert!(
        reason("up/team/bad:v1").contains(&bad.layers[0]),
        "{failed}"
    );
    assert!(!blob_file(&site.root(), &bad.layers[0]).exists());
    assert!(
        reason("nowhere/x/y:1").contains("names no configured upstream"),
        "{failed}"
    );
    assert!(
        reason("alpine").contains("must start with the registry"),
        "{failed}"
    );
    assert!(!failed.contains("up/team/good:v1"), "{failed}");
    assert_eq!(
        counts(&run.output, "images"),
        [5, 1, 0, 4],
        "{}",
        run.output
    );
    assert_eq!(counts(&run.output, "blobs")[3], 1, "{}", run.output);

    // The good image is complete and pinned; the failed ones are not pinned.
    for d in all_digests(&good) {
        assert!(blob_file(&site.root(), &d).is_file(), "{d}");
    }
    assert_eq!(pins(&site.root()), ["up/team/good:v1"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn referrers_are_asked_for_every_manifest_when_wanted() {
    let up = FakeRegistry::start().await;
    let (index, images) = push_index(&up, "multi/app", "2.0", 200);
    let site = Site::new(&upstream("up", &up.url(), true, ""));
    let run = site
        .prefetch(&["--with-referrers", "up/multi/app:2.0"])
        .await;
    assert!(run.success(), "{}", run.output);
    for d in std::iter::once(&index).chain(images.iter().map(|i| &i.manifest)) {
        assert_eq!(up.count("GET", &format!("/referrers/{d}")), 1, "{d}");
    }
    let plain = Site::new(&upstream("up", &up.url(), true, ""));
    up.reset_counts();
    let run = plain.prefetch(&["up/multi/app:2.0"]).await;
    assert!(run.success(), "{}", run.output);
    assert_eq!(up.count("GET", "/referrers/"), 0);
}

/// An upstream in front of `fake` that forwards everything to it, except that its referrers
/// endpoint lists `referrer` (a descriptor) for `subject`: the fake has no referrers of its own.
struct ReferrersFront {
    url: String,
    task: tokio::task::JoinHandle<()>,
}

impl ReferrersFront {
    async fn start(fake: &FakeRegistry, subject: &str, referrer: serde_json::Value) -> Self {
        use http_body_util::Full;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let (target, subject) = (fake.url(), subject.to_string());
        let index = Bytes::from(
            serde_json::to_vec(&serde_json::json!({
                "schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": [referrer],
            }))
            .unwrap(),
        );
        let task = tokio::spawn(common::serve_connections(listener, move |stream| {
            let (target, subject, index) = (target.clone(), subject.clone(), index.clone());
            async move {
                let svc = hyper::service::service_fn(move |req: http::Request<_>| {
                    let (target, subject, index) = (target.clone(), subject.clone(), index.clone());
                    async move {
                        let path = req.uri().path().to_string();
                        if path.ends_with(&format!("/referrers/{subject}")) {
                            let resp = http::Response::builder()
                                .header("content-type", OCI_INDEX)
                                .body(Full::new(index))
                                .unwrap();
                            return Ok::<_, std::convert::Infallible>(resp);
                        }
                        let mut fwd = common::client()
                            .request(req.method().clone(), format!("{target}{path}"));
                        if let Some(accept) = req.headers().get("accept") {
                            fwd = fwd.header("accept", accept.clone());
                        }
                        let got = fwd.send().await.unwrap();
                        let mut resp = http::Response::builder().status(got.status());
                        for (k, v) in got.headers() {
                            resp = resp.header(k, v);
                        }
                        let body = got.bytes().await.unwrap();
                        Ok(resp.body(Full::new(body)).unwrap())
                    }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(hyper_util::rt::TokioIo::new(stream), svc)
                    .await;
            }
        }));
        ReferrersFront { url, task }
    }
}

impl Drop for ReferrersFront {
    fn drop(&mut self) {
        self.task.abort();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_referrers_a_signature_and_its_blobs_come_along() {
    let up = FakeRegistry::start().await;
    let app = up.push_image("team/app", "v1", &[Bytes::from(random_bytes(30_000, 12))]);
    // A signature: a manifest of its own in the same repository, listed as a referrer of app.
    let sig = up.push_image("team/app", "sig", &[Bytes::from(random_bytes(700, 13))]);
    let front = ReferrersFront::start(
        &up,
        &app.manifest,
        serde_json::json!({
            "mediaType": OCI_MANIFEST,
            "digest": sig.manifest,
            "size": sig.manifest_body.len(),
            "artifactType": "application/vnd.dev.cosign.simplesigning.v1+json",
        }),
    )
    .await;
    let site = Site::new(&upstream("up", &front.url, true, ""));
    let plain = site.prefetch(&["up/team/app:v1"]).await;
    assert!(plain.success(), "{}", plain.output);
    for d in all_digests(&sig) {
        assert!(
            !blob_file(&site.root(), &d).exists(),
            "{d} without --with-referrers"
        );
    }
    let run = site.prefetch(&["--with-referrers", "up/team/app:v1"]).await;
    assert!(run.success(), "{}", run.output);
    for d in all_digests(&app).iter().chain(&all_digests(&sig)) {
        assert!(blob_file(&site.root(), d).is_file(), "{d} missing");
    }
    // The image was there already; only the signature was new.
    assert_eq!(
        counts(&run.output, "manifests"),
        [2, 1, 1],
        "{}",
        run.output
    );
    assert_eq!(counts(&run.output, "blobs"), [4, 2, 2, 0], "{}", run.output);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_mode_pulls_through_a_running_entrepot_and_pins_there() {
    let up = FakeRegistry::start().await;
    let shared = Bytes::from(random_bytes(200_000, 8));
    let a = up.push_image(
        "team/a",
        "v1",
        &[shared.clone(), Bytes::from(random_bytes(10_000, 9))],
    );
    let b = up.push_image("team/b", "v2", std::slice::from_ref(&shared));
    let proxy = Proxy::start(&upstream(
        "up",
        &up.url(),
        true,
        "aliases = [\"up.example\"]",
    ))
    .await;

    let server_run = |images: &'static [&'static str]| {
        let url = proxy.url.clone();
        async move {
            let mut cmd = Command::new(BIN);
            cmd.args(["prefetch", "--server", &url]).args(images);
            prefetch_cmd(cmd).await
        }
    };
    // An alias selects the upstream; the pin is recorded under its name.
    let run = server_run(&["up.example/team/a:v1", "up/team/b:v2"]).await;
    assert!(run.success(), "{}", run.output);
    proxy.wait_idle().await;
    assert_eq!(up.count("GET", &format!("/blobs/{}", a.layers[0])), 1);
    for d in all_digests(&a).iter().chain(&all_digests(&b)) {
        assert!(
            proxy.blob_path(d).is_file(),
            "{d} not in the server's store"
        );
    }
    assert_eq!(pins(&proxy.root), ["up/team/a:v1", "up/team/b:v2"]);
    assert_eq!(counts(&run.output, "blobs"), [4, 4, 0, 0], "{}", run.output);

    up.reset_counts();
    let again = server_run(&["up/team/a:v1", "up/team/b:v2"]).await;
    assert!(again.success(), "{}", again.output);
    assert_eq!(up.count("GET", "/blobs/"), 0);
    assert_eq!(
        counts(&again.output, "blobs"),
        [4, 0, 4, 0],
        "{}",
        again.output
    );

    // --admin: the pins go to the operator endpoints there (this server has them on its main
    // listener); when they cannot be recorded the run says so and fails.
    let dead = format!("http://127.0.0.1:{}", common::free_port());
    let c = up.push_image("team/c", "v1", &[Bytes::from(random_bytes(5_000, 11))]);
    let mut cmd = Command::new(BIN);
    cmd.args(["prefetch", "--server", &proxy.url, "--admin", &dead])
        .arg("up/team/c:v1");
    let run = prefetch_cmd(cmd).await;
    assert!(!run.success(), "{}", run.output);
    assert!(
        run.output.contains("pinning failed") && run.output.contains(&format!("{dead}/pins")),
        "{}",
        run.output
    );
    proxy.wait_idle().await;
    assert!(proxy.blob_path(&c.layers[0]).is_file());
    assert_eq!(pins(&proxy.root).len(), 2);
    let mut cmd = Command::new(BIN);
    cmd.args(["prefetch", "--server", &proxy.url, "--admin", &proxy.url])
        .arg("up/team/c:v1");
    let run = prefetch_cmd(cmd).await;
    assert!(run.success(), "{}", run.output);
    assert_eq!(pins(&proxy.root).last().unwrap(), "up/team/c:v1");

    // A server that is not there: a clear error, not a list of failed images.
    let dead = format!("http://127.0.0.1:{}", common::free_port());
    let mut cmd = Command::new(BIN);
    cmd.args(["prefetch", "--server", &dead, "up/team/a:v1"]);
    let run = prefetch_cmd(cmd).await;
    assert!(!run.success());
    assert!(
        run.output.contains(&format!("{dead}/v2/")),
        "{}",
        run.output
    );
    proxy.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reference_by_digest_and_bad_arguments() {
    let up = FakeRegistry::start().await;
    let a = up.push_image("team/a", "v1", &[Bytes::from(random_bytes(20_000, 10))]);
    let site = Site::new(&upstream("up", &up.url(), true, ""));
    let by_digest = format!("up/team/a@{}", a.manifest);
    let run = site.prefetch(&[&by_digest]).await;
    assert!(run.success(), "{}", run.output);
    for d in all_digests(&a) {
        assert!(blob_file(&site.root(), &d).is_file(), "{d}");
    }
    assert_eq!(pins(&site.root()), [by_digest]);

    let nothing = site.prefetch(&[]).await;
    assert!(!nothing.success());
    assert!(
        nothing.output.contains("nothing to prefetch"),
        "{}",
        nothing.output
    );
    let bad = site
        .prefetch(&["--platform", "linux", "up/team/a:v1"])
        .await;
    assert!(!bad.success());
    assert!(bad.output.contains("not a platform"), "{}", bad.output);
    let both = site
        .prefetch(&["--server", "http://127.0.0.1:1", "up/team/a:v1"])
        .await;
    assert!(!both.success());
    assert!(
        both.output.contains("cannot be used with"),
        "{}",
        both.output
    );
}
