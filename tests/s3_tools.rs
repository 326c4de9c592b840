//! The tools on the S3 backend, through the real binary: `prefetch` fills the bucket,
//! `cache ls` lists it, `export` writes a bundle from it, `import` loads the bundle into
//! another bucket, `cache verify` takes out an object that does not match its key, and
//! `cache rm` removes an image from the bucket.
//!
//! Needs `garage` 2.5.0 (`bash .ci/install-garage.sh`).

mod common;

use std::path::Path;
use std::process::Command;

use bytes::Bytes;
use common::fake_registry::FakeRegistry;
use common::garage::Garage;
use common::{random_bytes, upstream};
use futures_util::TryStreamExt as _;
use object_store::path::Path as ObjectPath;
use object_store::ObjectStore as _;

const BIN: &str = env!("CARGO_BIN_EXE_entrepot");

/// A configuration for the s3 backend on `bucket`, with its local root under `dir`.
fn config(dir: &Path, garage: &Garage, bucket: &str, up: &FakeRegistry) -> std::path::PathBuf {
    let path = dir.join(format!("{bucket}.toml"));
    std::fs::write(
        &path,
        format!(
            "[storage]\nroot = \"{}\"\nbackend = \"s3\"\n\n[storage.s3]\nendpoint = \"{}\"\nregion = \"{}\"\nbucket = \"{bucket}\"\naccess_key_id = \"{}\"\nsecret_access_key = \"{}\"\n\n{}",
            dir.join(format!("root-{bucket}")).display(),
            garage.endpoint(),
            garage.region(),
            garage.access_key_id(),
            garage.secret_access_key(),
            upstream("up", &up.url(), true, ""),
        ),
    )
    .unwrap();
    path
}

/// Runs the binary; panics with its output if it fails. Returns stdout.
fn run(args: &[&str]) -> String {
    let out = Command::new(BIN).args(args).output().unwrap();
    let (stdout, stderr) = (
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    );
    assert!(
        out.status.success(),
        "entrepot {args:?} failed:\n{stdout}\n{stderr}"
    );
    stdout
}

async fn blob_keys(garage: &Garage, bucket: &str) -> Vec<String> {
    let s3 = garage
        .s3_builder()
        .with_bucket_name(bucket)
        .build()
        .unwrap();
    let found: Vec<_> = s3
        .list(Some(&ObjectPath::from("blobs")))
        .try_collect()
        .await
        .unwrap();
    let mut keys: Vec<String> = found.iter().map(|m| m.location.to_string()).collect();
    keys.sort();
    keys
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prefetch_ls_export_import_verify_and_rm_work_on_buckets() {
    let garage = Garage::start().await.unwrap();
    garage.create_bucket("site").await.unwrap();
    let up = FakeRegistry::start().await;
    let a = up.push_image("team/a", "v1", &[Bytes::from(random_bytes(9 << 20, 1))]);
    let b = up.push_image("team/b", "v1", &[Bytes::from(random_bytes(100_000, 2))]);
    let dir = tempfile::tempdir().unwrap();
    let online = config(dir.path(), &garage, garage.bucket(), &up);
    let site = config(dir.path(), &garage, "site", &up);
    let list = dir.path().join("images.txt");
    std::fs::write(&list, "up/team/a:v1\nup/team/b:v1\n").unwrap();

    let online = online.to_str().unwrap();
    let site = site.to_str().unwrap();
    run(&[
        "prefetch",
        "--config",
        online,
        "--file",
        list.to_str().unwrap(),
    ]);
    let stored = blob_keys(&garage, garage.bucket()).await;
    for d in a
        .layers
        .iter()
        .chain(&b.layers)
        .chain([&a.config, &a.manifest])
    {
        let key = format!("blobs/{}", d.replace(':', "/"));
        assert!(stored.contains(&key), "{key} not in the bucket: {stored:?}");
    }
    let ls = run(&["cache", "ls", "--config", online]);
    assert!(
        ls.contains("up/team/a") && ls.contains("up/team/b") && ls.contains("2 tags"),
        "{ls}"
    );

    // Export every pinned image (prefetch pins), import into the other bucket.
    let bundle = dir.path().join("bundle.tar");
    run(&[
        "export",
        "--config",
        online,
        "--out",
        bundle.to_str().unwrap(),
    ]);
    run(&["import", "--config", site, bundle.to_str().unwrap()]);
    assert_eq!(blob_keys(&garage, "site").await, stored);
    let ls = run(&["cache", "ls", "--config", site]);
    assert!(ls.contains("up/team/a") && ls.contains("2 tags"), "{ls}");

    // verify finds an object whose bytes do not match its key and takes it out.
    let s3 = garage.s3_builder().build().unwrap();
    let victim = format!("blobs/{}", b.layers[0].replace(':', "/"));
    object_store::ObjectStoreExt::put(
        &s3,
        &ObjectPath::from(victim.as_str()),
        Bytes::from_static(b"not the layer").into(),
    )
    .await
    .unwrap();
    let out = Command::new(BIN)
        .args(["cache", "verify", "--config", online])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        !out.status.success() && text.contains("1 corrupt"),
        "{text}"
    );
    assert!(!blob_keys(&garage, garage.bucket()).await.contains(&victim));

    // rm takes an image out of the bucket.
    run(&["cache", "rm", "--config", online, "up/team/a:v1"]);
    let left = blob_keys(&garage, garage.bucket()).await;
    let layer = format!("blobs/{}", a.layers[0].replace(':', "/"));
    assert!(!left.contains(&layer), "{left:?}");
    let ls = run(&["cache", "ls", "--config", online]);
    assert!(!ls.contains("up/team/a "), "{ls}");
}
