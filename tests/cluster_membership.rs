//! Replicas coming and going: a replica added mid-run takes the keys rendezvous hashing gives
//! it while pulls in flight complete, a rolling restart of every replica costs no pull that
//! retries on another replica, and `peers_dns` finds the replicas behind one name (a hosts-file
//! name with several loopback addresses) and follows its answers as they change.
//!
//! Real `entrepot serve` binaries on one Garage bucket; the upstream is the in-process fake,
//! which counts requests per digest.

mod common;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use common::cluster::{self, owner_of, start_all, static_cluster, wait_peers_healthy, Replica};
use common::fake_registry::{BlobBehavior, FakeRegistry, PushedImage};
use common::garage::Garage;
use common::{client, get_blob, random_bytes, upstream, OCI_MANIFEST};

const MIB: usize = 1 << 20;

/// Pulls `image` (`team/<repo>:v1`) through `base`: the manifest by tag, then every blob,
/// each checked against its digest.
async fn pull(
    c: &reqwest::Client,
    base: &str,
    repo: &str,
    image: &PushedImage,
) -> anyhow::Result<()> {
    let resp = c
        .get(format!("{base}/v2/team/{repo}/manifests/v1"))
        .header("Accept", OCI_MANIFEST)
        .send()
        .await?;
    anyhow::ensure!(resp.status() == 200, "manifest: {}", resp.status());
    let body = resp.bytes().await?;
    anyhow::ensure!(body == image.manifest_body, "manifest bytes differ");
    for d in std::iter::once(&image.config).chain(&image.layers) {
        get_blob(c, &format!("{base}/v2/team/{repo}/blobs/{d}"), d).await?;
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_replica_added_mid_run_takes_its_keys_while_pulls_in_flight_complete() {
    let up = FakeRegistry::start().await;
    let garage = Garage::start().await.unwrap();
    let work = tempfile::tempdir().unwrap();
    let addrs = cluster::addresses(3);
    let mut replicas = static_cluster(
        work.path(),
        &addrs,
        &cluster::s3_storage(&garage, "", ""),
        &upstream("fake", &up.url(), true, ""),
        "",
    )
    .unwrap();
    // Two of the three members run; the third is down until later.
    start_all(&mut replicas[..2]).await.unwrap();
    wait_peers_healthy(&replicas, 1).await.unwrap();

    // A slow pull through replica 0 that spans the newcomer's arrival.
    let slow = Bytes::from(random_bytes(4 * MIB, 21));
    let slow_digest = up.add_blob(slow.clone());
    up.set_blob_behavior(
        &slow_digest,
        BlobBehavior::Slow {
            chunk: 256 * 1024,
            delay: Duration::from_millis(150),
        },
    );
    let slow_url = format!("{}/v2/team/app/blobs/{slow_digest}", replicas[0].url());
    let slow_pull = tokio::spawn({
        let d = slow_digest.clone();
        async move { get_blob(&client(), &slow_url, &d).await }
    });

    // Blobs, some of which the third member will own: before it runs they are fetched by the
    // two others, each once. The six after its arrival are chosen so that it owns three of
    // them (ownership depends on the members' ports, so random blobs might give it none).
    let mut blobs: Vec<(Bytes, String)> = Vec::new();
    let (mut theirs, mut its) = (0, 0);
    for seed in 100u64.. {
        if blobs.len() == 12 {
            break;
        }
        let b = Bytes::from(random_bytes(256 * 1024, seed));
        let d = common::sha256_digest(&b);
        if blobs.len() >= 6 {
            let owned = owner_of(&replicas, &d) == 2;
            if (owned && its == 3) || (!owned && theirs == 3) {
                continue;
            }
            if owned {
                its += 1;
            } else {
                theirs += 1;
            }
        }
        assert_eq!(up.add_blob(b.clone()), d);
        blobs.push((b, d));
    }
    let c = client();
    for (i, (_, d)) in blobs.iter().enumerate().take(6) {
        let url = format!("{}/v2/team/app/blobs/{d}", replicas[i % 2].url());
        get_blob(&c, &url, d).await.unwrap();
    }

    replicas[2].start().await.unwrap();
    wait_peers_healthy(&replicas, 2).await.unwrap();
    let newcomer_before = replicas[2]
        .metric("entrepot_cluster_served_for_peer_total")
        .await
        .unwrap();
    let mut newcomer_owns = 0;
    for (i, (_, d)) in blobs.iter().enumerate().skip(6) {
        if owner_of(&replicas, d) == 2 {
            newcomer_owns += 1;
        }
        let url = format!("{}/v2/team/app/blobs/{d}", replicas[i % 2].url());
        get_blob(&c, &url, d).await.unwrap();
    }
    assert!(
        newcomer_owns > 0,
        "the test's blobs should include some the newcomer owns"
    );
    let newcomer_after = replicas[2]
        .metric("entrepot_cluster_served_for_peer_total")
        .await
        .unwrap();
    assert_eq!(
        newcomer_after - newcomer_before,
        newcomer_owns as f64,
        "the newcomer did not serve exactly the keys it owns"
    );
    for (_, d) in &blobs {
        assert_eq!(up.count("GET", d), 1, "upstream GETs of {d}");
    }
    assert_eq!(slow_pull.await.unwrap().unwrap(), slow);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_rolling_restart_of_every_replica_fails_no_pull_that_retries_on_another() {
    let up = Arc::new(FakeRegistry::start().await);
    let garage = Garage::start().await.unwrap();
    let work = tempfile::tempdir().unwrap();
    let addrs = cluster::addresses(3);
    let mut replicas = static_cluster(
        work.path(),
        &addrs,
        &cluster::s3_storage(&garage, "", ""),
        &upstream("fake", &up.url(), true, ""),
        "",
    )
    .unwrap();
    start_all(&mut replicas).await.unwrap();
    wait_peers_healthy(&replicas, 2).await.unwrap();

    let urls: Arc<Vec<String>> = Arc::new(replicas.iter().map(Replica::url).collect());
    let stop = Arc::new(AtomicBool::new(false));
    let (pulls, failed) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
    let mut clients = tokio::task::JoinSet::new();
    for k in 0..3usize {
        let (up, urls, stop) = (up.clone(), urls.clone(), stop.clone());
        let (pulls, failed) = (pulls.clone(), failed.clone());
        clients.spawn(async move {
            let c = client();
            let mut n = k;
            while !stop.load(Ordering::Relaxed) {
                // Every pull is of an image no replica has seen: its blobs and manifest are
                // owned all over the cluster, so forwards to the restarting owners happen.
                let repo = format!("app{k}-{n}");
                let seed = (k * 100_000 + n) as u64;
                let img = up.push_image(
                    &format!("team/{repo}"),
                    "v1",
                    &[
                        Bytes::from(random_bytes(512 * 1024, seed)),
                        Bytes::from(random_bytes(64 * 1024, seed + 50_000)),
                    ],
                );
                let (repo, img) = (&repo, &img);
                // A client that fails retries on the next replica, as a load balancer would.
                let mut last = None;
                for attempt in 0..urls.len() {
                    match pull(&c, &urls[(n + attempt) % urls.len()], repo, img).await {
                        Ok(()) => {
                            last = None;
                            break;
                        }
                        Err(e) => last = Some(e),
                    }
                }
                if let Some(e) = last {
                    eprintln!("pull of {repo} failed on every replica: {e:#}");
                    failed.fetch_add(1, Ordering::Relaxed);
                }
                pulls.fetch_add(1, Ordering::Relaxed);
                n += 3;
            }
        });
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    for i in 0..replicas.len() {
        replicas[i].stop(Duration::from_secs(30)).await.unwrap();
        tokio::time::sleep(Duration::from_millis(300)).await;
        replicas[i].start().await.unwrap();
        wait_peers_healthy(&replicas, 2).await.unwrap();
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    stop.store(true, Ordering::Relaxed);
    while let Some(r) = clients.join_next().await {
        r.unwrap();
    }
    let pulls = pulls.load(Ordering::Relaxed);
    assert!(pulls >= 30, "only {pulls} pulls ran during the restarts");
    let fallbacks = {
        let mut n = 0.0;
        for r in &replicas {
            n += r
                .metric("entrepot_cluster_local_fallback_total")
                .await
                .unwrap();
        }
        n
    };
    eprintln!("{pulls} pulls; {fallbacks} forwards fell back to a local fill after the restarts");
    assert_eq!(
        failed.load(Ordering::Relaxed),
        0,
        "pulls that failed on every replica"
    );
}

/// Lines added to `/etc/hosts` for one test, removed when dropped: a name that resolves to
/// several loopback addresses, as a Kubernetes headless Service does.
struct HostsEntry {
    name: String,
}

const HOSTS: &str = "/etc/hosts";

impl HostsEntry {
    fn add(name: &str, ips: &[&str]) -> Self {
        Self::append(name, ips);
        HostsEntry {
            name: name.to_string(),
        }
    }

    fn append(name: &str, ips: &[&str]) {
        let mut text = std::fs::read_to_string(HOSTS).unwrap_or_default();
        if !text.is_empty() && !text.ends_with('\n') {
            text.push('\n');
        }
        for ip in ips {
            text.push_str(&format!("{ip} {name}\n"));
        }
        std::fs::write(HOSTS, text).unwrap_or_else(|e| {
            panic!("this test names its replicas in {HOSTS} and cannot write it ({e}); run it as root, as CI does")
        });
    }

    /// Keeps only `ips` for the name.
    fn set(&self, ips: &[&str]) {
        self.remove();
        Self::append(&self.name, ips);
    }

    fn remove(&self) {
        let text = std::fs::read_to_string(HOSTS).unwrap_or_default();
        let kept: String = text
            .lines()
            .filter(|l| l.split_whitespace().nth(1) != Some(self.name.as_str()))
            .map(|l| format!("{l}\n"))
            .collect();
        let _ = std::fs::write(HOSTS, kept);
    }
}

impl Drop for HostsEntry {
    fn drop(&mut self) {
        self.remove();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn peers_dns_finds_the_replicas_behind_one_name_and_follows_its_answers() {
    let up = FakeRegistry::start().await;
    let work = tempfile::tempdir().unwrap();
    let port = common::free_port();
    let ips = ["127.0.0.2", "127.0.0.3", "127.0.0.4"];
    let name = format!("entrepot-peers-{}.test", std::process::id());
    let hosts = HostsEntry::add(&name, &ips);
    let mut replicas: Vec<Replica> = ips
        .iter()
        .enumerate()
        .map(|(i, ip)| {
            let addr: SocketAddr = format!("{ip}:{port}").parse().unwrap();
            let rname = format!("replica{i}");
            // No advertise: each finds itself among the answers by probing them.
            let toml = cluster::config(
                addr,
                &work.path().join(&rname),
                "",
                &upstream("fake", &up.url(), true, ""),
                &format!("peers_dns = \"{name}:{port}\"\ndns_refresh = \"500ms\""),
            );
            Replica::new(work.path(), &rname, addr, &toml).unwrap()
        })
        .collect();
    start_all(&mut replicas).await.unwrap();
    wait_peers_healthy(&replicas, 2).await.unwrap();

    // One cold blob through all three: one upstream GET.
    let data = Bytes::from(random_bytes(8 * MIB, 31));
    let digest = up.add_blob(data.clone());
    let mut pulls = tokio::task::JoinSet::new();
    for r in &replicas {
        let url = format!("{}/v2/team/app/blobs/{digest}", r.url());
        let d = digest.clone();
        pulls.spawn(async move { get_blob(&client(), &url, &d).await });
    }
    while let Some(r) = pulls.join_next().await {
        assert_eq!(r.unwrap().unwrap(), data);
    }
    assert_eq!(
        up.count("GET", &digest),
        1,
        "upstream GETs through three replicas"
    );

    // The name stops answering with the third address: the other two drop it, although it
    // still runs and answers probes.
    hosts.set(&ips[..2]);
    wait_peers_healthy(&replicas[..2], 1).await.unwrap();
    let data = Bytes::from(random_bytes(MIB, 32));
    let digest = up.add_blob(data.clone());
    for r in &replicas[..2] {
        let url = format!("{}/v2/team/app/blobs/{digest}", r.url());
        assert_eq!(get_blob(&client(), &url, &digest).await.unwrap(), data);
    }
    assert_eq!(up.count("GET", &digest), 1);
    for r in &replicas[..2] {
        assert_eq!(
            r.metric("entrepot_cluster_local_fallback_total")
                .await
                .unwrap(),
            0.0,
            "{} forwarded to a member the name no longer lists",
            r.name
        );
    }
}
