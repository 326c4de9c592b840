//! The `entrepot` binary itself: help, refusal of a bad configuration, the access log line, and
//! a clean drain on SIGTERM.

mod common;

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use common::fake_registry::FakeRegistry;
use common::random_bytes;

const BIN: &str = env!("CARGO_BIN_EXE_entrepot");

#[test]
fn help_documents_every_flag() {
    let out = Command::new(BIN)
        .args(["serve", "--help"])
        .output()
        .unwrap();
    assert!(out.status.success());
    let text = String::from_utf8(out.stdout).unwrap();
    for flag in ["--config", "--listen", "--root", "--log-format"] {
        assert!(text.contains(flag), "{flag} missing from:\n{text}");
    }
    let out = Command::new(BIN).arg("--help").output().unwrap();
    let text = String::from_utf8(out.stdout).unwrap();
    assert!(
        text.contains("serve") && text.contains("check-config"),
        "{text}"
    );
}

#[test]
fn a_bad_config_is_refused_naming_the_key() {
    let dir = tempfile::tempdir().unwrap();
    let cases = [
        (
            "[[upstream]]\nname = \"a\"\nurl = \"http://x\"\ntag_ttl = \"soon\"\n",
            "upstream[0].tag_ttl",
        ),
        ("[server]\nlisten = \"localhost\"\n", "server.listen"),
        ("[[upstream]]\nname = \"a\"\n", "upstream[0].url"),
        ("[storage]\nroot = 5\n", "root"),
        ("[server]\nlisten = \"127.0.0.1:0\"\ntypo = 1\n", "typo"),
    ];
    for (i, (text, key)) in cases.iter().enumerate() {
        let path = dir.path().join(format!("bad{i}.toml"));
        std::fs::write(&path, text).unwrap();
        let out = Command::new(BIN)
            .args(["serve", "--config"])
            .arg(&path)
            .output()
            .unwrap();
        assert!(!out.status.success(), "{text}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains(key), "{key} not named in: {err}");
    }
    let out = Command::new(BIN)
        .args(["serve", "--config", "/nonexistent/entrepot.toml"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("/nonexistent/entrepot.toml"));
}

#[tokio::test]
async fn serves_logs_each_request_and_drains_on_sigterm() {
    let up = FakeRegistry::start().await;
    let layer = random_bytes(123_456, 1);
    let img = up.push_image("team/app", "v1", &[layer.into()]);
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("entrepot.toml");
    std::fs::write(
        &cfg,
        format!(
            "[server]\nlisten = \"127.0.0.1:0\"\nshutdown_grace = \"5s\"\n[storage]\nroot = \"{}\"\n\
             [[upstream]]\nname = \"fake\"\nurl = \"{}\"\ndefault = true\n",
            dir.path().join("store").display(),
            up.url()
        ),
    )
    .unwrap();
    let mut child = Command::new(BIN)
        .args(["serve", "--config"])
        .arg(&cfg)
        .env("NO_COLOR", "1")
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let (tx, rx) = mpsc::channel::<String>();
    let stderr = child.stderr.take().unwrap();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let mut log = Vec::new();
    let addr = loop {
        let line = rx
            .recv_timeout(Duration::from_secs(20))
            .unwrap_or_else(|_| panic!("no 'listening' line; log so far: {log:?}"));
        log.push(line.clone());
        if let Some(i) = line.find("addr=") {
            break line[i + 5..].split_whitespace().next().unwrap().to_string();
        }
    };
    let url = format!("http://{addr}/v2/team/app/blobs/{}", img.layers[0]);
    let body = common::get_blob(&common::client(), &url, &img.layers[0])
        .await
        .unwrap();
    assert_eq!(body.len(), 123_456);

    let status = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    let exit = tokio::task::spawn_blocking(move || child.wait())
        .await
        .unwrap()
        .unwrap();
    assert!(exit.success(), "exit status {exit:?}");
    // Everything the process wrote, up to the end of its stderr (the reader thread ends there).
    let rest: Vec<String> = tokio::task::spawn_blocking(move || rx.iter().collect())
        .await
        .unwrap();
    log.extend(rest);
    let all = log.join("\n");
    let access = log
        .iter()
        .find(|l| l.contains("entrepot::access") && l.contains("/blobs/"))
        .unwrap_or_else(|| panic!("no access line in:\n{all}"));
    for field in [
        "upstream=fake",
        "repository=team/app",
        "outcome=miss",
        "status=200",
        "bytes=123456",
        "duration_ms=",
        "kind=blob",
        "complete=true",
    ] {
        assert!(access.contains(field), "{field} missing in: {access}");
    }
    assert!(all.contains("SIGTERM received"), "{all}");
    assert!(all.contains("stopped"), "{all}");
}
