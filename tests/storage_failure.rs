//! A store that fails in the middle of a fill (here: a file-size limit, so writes past 1 MiB fail
//! with EFBIG) degrades instead of breaking pulls: the client's transfer continues straight
//! from the upstream with a Range request, completes with the right bytes, and nothing is
//! stored. Runs the real binary under `prlimit --fsize`, with SIGXFSZ ignored (an ignored
//! signal stays ignored across exec), so only the writes fail.

mod common;

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::Duration;

use common::fake_registry::{BlobBehavior, FakeRegistry};
use common::{random_bytes, upstream};

#[tokio::test]
async fn a_disk_failing_mid_fill_still_serves_the_whole_blob_from_upstream() {
    let up = FakeRegistry::start().await;
    let data = random_bytes(6 << 20, 7);
    let digest = up.add_blob(data.clone());
    // Paced (64 KiB every 5 ms, ~80 ms to the 1 MiB limit) so the client has received bytes
    // when the disk gives out: a fill spliced at full speed reached the limit before the
    // client's first read, and its transfer then started over from upstream without a Range.
    up.set_blob_behavior(
        &digest,
        BlobBehavior::Slow {
            chunk: 64 << 10,
            delay: Duration::from_millis(5),
        },
    );
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("store");
    let cfg = dir.path().join("e.toml");
    std::fs::write(
        &cfg,
        format!(
            "[server]\nlisten = \"127.0.0.1:0\"\n[storage]\nroot = \"{}\"\n{}",
            root.display(),
            upstream("fake", &up.url(), true, "")
        ),
    )
    .unwrap();
    let script = format!(
        "trap '' XFSZ; exec prlimit --fsize={} {} serve --config {}",
        1 << 20,
        env!("CARGO_BIN_EXE_entrepot"),
        cfg.display()
    );
    let mut child = Command::new("bash")
        .args(["-c", &script])
        .env("NO_COLOR", "1")
        .stderr(Stdio::piped())
        .spawn()
        .expect("bash and prlimit (util-linux) are needed");
    let (tx, rx) = std::sync::mpsc::channel::<String>();
    let stderr = child.stderr.take().unwrap();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let addr = loop {
        let line = rx
            .recv_timeout(Duration::from_secs(20))
            .expect("entrepot did not start");
        if let Some(i) = line.find("addr=") {
            break line[i + 5..].split_whitespace().next().unwrap().to_string();
        }
    };

    let r = common::client()
        .get(format!("http://{addr}/v2/team/app/blobs/{digest}"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let body = r
        .bytes()
        .await
        .expect("the transfer must complete despite the disk");
    assert!(body.len() == data.len() && body == data, "wrong bytes");

    // The fill stopped at the disk's failure; the rest came from upstream with a Range.
    let ranged = up
        .requests()
        .into_iter()
        .filter(|r| r.path.contains("/blobs/") && r.headers.contains_key("range"))
        .count();
    assert!(
        ranged >= 1,
        "no ranged upstream request: {:?}",
        up.requests()
            .iter()
            .map(|r| (&r.path, r.headers.get("range")))
            .collect::<Vec<_>>()
    );
    let stored = root
        .join("blobs/sha256")
        .join(digest.trim_start_matches("sha256:"));
    assert!(
        !stored.exists(),
        "a blob the disk could not hold was stored"
    );
    let tmp_left: Vec<_> = std::fs::read_dir(root.join("tmp")).unwrap().collect();
    assert!(tmp_left.is_empty(), "temp files left: {tmp_left:?}");

    let _ = child.kill();
    let _ = child.wait();
    // Everything it logged, to the end of its stderr.
    let log: Vec<String> = tokio::task::spawn_blocking(move || rx.iter().collect())
        .await
        .unwrap();
    assert!(
        log.iter().any(|l| l.contains("store unavailable")),
        "the storage failure was not logged:\n{}",
        log.join("\n")
    );
}
