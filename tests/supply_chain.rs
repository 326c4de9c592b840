//! Supply chain pass-through (issue 12): signatures, SBOMs and attestations survive the cache.
//! `referrers/<digest>` is stored per (upstream, repository, subject) and answered like a tag
//! (within `tag_ttl` from the store, stale when the upstream fails, from the store offline),
//! byte for byte, with `artifactType` filters applied to the one stored copy; the tag
//! fallbacks (`sha256-<hex>` and cosign's `.sig`) are ordinary cached tags. `entrepot prefetch
//! --with-referrers` takes all of it along with the image, pinned.
//!
//! Upstreams: the in-process fake (which lists referrers from its manifests' `subject`, pages
//! them, or has no referrers API), and a real `docker-registry` (distribution 2.8, which
//! predates the referrers API: signatures there live under cosign's tags).

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use bytes::Bytes;
use common::fake_registry::{BlobBehavior, Failure, FakeRegistry, PushedImage};
use common::proxy::Proxy;
use common::real::{run_bounded, DockerRegistry};
use common::{client, random_bytes, sha256_digest, upstream, OCI_INDEX, OCI_MANIFEST};

const BIN: &str = env!("CARGO_BIN_EXE_entrepot");
const COSIGN_SIG: &str = "application/vnd.dev.cosign.artifact.sig.v1+json";
const SBOM: &str = "application/spdx+json";
const ATTESTATION: &str = "application/vnd.in-toto+json";
const EMPTY_CONFIG: &str = "application/vnd.oci.empty.v1+json";

/// A hand-made artifact manifest (`artifactType`, an empty config, one payload layer) whose
/// `subject` is an image: what `cosign` or `oras attach` push.
struct Artifact {
    manifest: String,
    body: Bytes,
    blobs: Vec<(String, Bytes)>,
}

impl Artifact {
    fn new(subject: &str, subject_size: usize, artifact_type: &str, payload: &[u8]) -> Artifact {
        let config = Bytes::from_static(b"{}");
        let layer = Bytes::copy_from_slice(payload);
        let body = Bytes::from(
            serde_json::to_vec(&serde_json::json!({
                "schemaVersion": 2,
                "mediaType": OCI_MANIFEST,
                "artifactType": artifact_type,
                "config": {"mediaType": EMPTY_CONFIG, "digest": sha256_digest(&config), "size": 2},
                "layers": [{
                    "mediaType": artifact_type,
                    "digest": sha256_digest(&layer),
                    "size": layer.len(),
                }],
                "subject": {"mediaType": OCI_MANIFEST, "digest": subject, "size": subject_size},
                "annotations": {"org.opencontainers.image.created": "2024-05-01T00:00:00Z"},
            }))
            .unwrap(),
        );
        Artifact {
            manifest: sha256_digest(&body),
            body,
            blobs: vec![
                (sha256_digest(&config), config),
                (sha256_digest(&layer), layer),
            ],
        }
    }

    /// Pushes it to the fake next to `image`, tagged `tag` if given.
    fn push(&self, up: &FakeRegistry, repo: &str, tag: Option<&str>) {
        for (_, b) in &self.blobs {
            up.add_blob(b.clone());
        }
        up.put_manifest(repo, tag, OCI_MANIFEST, self.body.clone());
    }
}

/// A signature and an SBOM of `image`, pushed to the fake; the signature also under cosign's
/// tag.
fn sign(up: &FakeRegistry, repo: &str, image: &PushedImage) -> (Artifact, Artifact) {
    let size = image.manifest_body.len();
    let sig = Artifact::new(&image.manifest, size, COSIGN_SIG, b"signed: the image");
    let sbom = Artifact::new(
        &image.manifest,
        size,
        SBOM,
        b"{\"spdxVersion\":\"SPDX-2.3\"}",
    );
    sig.push(up, repo, Some(&cosign_tag(&image.manifest, ".sig")));
    sbom.push(up, repo, None);
    (sig, sbom)
}

/// `sha256-<hex><suffix>`: the referrers tag schema (no suffix) or one of cosign's tags.
fn cosign_tag(digest: &str, suffix: &str) -> String {
    format!("{}{suffix}", digest.replacen(':', "-", 1))
}

/// A folder with an entrepot config for `upstreams` and a store under it.
struct Site {
    dir: tempfile::TempDir,
    upstreams: String,
}

impl Site {
    fn new(upstreams: &str) -> Site {
        let dir = tempfile::tempdir().unwrap();
        let text = format!(
            "[server]\nshutdown_grace = \"5s\"\n[storage]\nroot = {:?}\n{upstreams}",
            dir.path().join("store").display().to_string()
        );
        std::fs::write(dir.path().join("entrepot.toml"), text).unwrap();
        Site {
            dir,
            upstreams: upstreams.to_string(),
        }
    }

    fn root(&self) -> PathBuf {
        self.dir.path().join("store")
    }

    /// `entrepot prefetch --config <site> --with-referrers <images...>`, which must succeed.
    async fn prefetch_with_referrers(&self, images: &[&str]) -> String {
        let mut cmd = Command::new(BIN);
        cmd.arg("prefetch")
            .arg("--config")
            .arg(self.dir.path().join("entrepot.toml"))
            .arg("--with-referrers")
            .args(images)
            .env_remove("ENTREPOT_LOG");
        let run = run_bounded("entrepot prefetch", cmd, Duration::from_secs(60))
            .await
            .expect("prefetch ran");
        assert!(run.success(), "{}", run.output);
        run.output
    }

    /// entrepot with `[server] offline = true` on this site's store.
    async fn offline(&self) -> Proxy {
        Proxy::start_with_server("offline = true", &self.upstreams, &self.root()).await
    }
}

fn pins(root: &Path) -> Vec<String> {
    std::fs::read_to_string(root.join("meta/pins"))
        .unwrap_or_default()
        .lines()
        .map(str::to_string)
        .collect()
}

/// `GET <proxy><path>` with `Accept: accept`: status, a header's value, body.
async fn get(proxy: &Proxy, path: &str, accept: &str) -> (u16, reqwest::header::HeaderMap, Bytes) {
    let r = client()
        .get(proxy.url(path))
        .header("accept", accept)
        .send()
        .await
        .unwrap();
    let (status, headers) = (r.status().as_u16(), r.headers().clone());
    (status, headers, r.bytes().await.unwrap())
}

fn header<'h>(h: &'h reqwest::header::HeaderMap, name: &str) -> &'h str {
    h.get(name).map_or("", |v| v.to_str().unwrap())
}

/// The upstream's own answer to `referrers/<subject>[?query]`.
async fn upstream_referrers(up: &FakeRegistry, repo: &str, subject: &str, query: &str) -> Bytes {
    let r = client()
        .get(format!("{}/v2/{repo}/referrers/{subject}{query}", up.url()))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    r.bytes().await.unwrap()
}

/// A media type as a query value (`+` escaped).
fn q(media_type: &str) -> String {
    media_type.replace('+', "%2B")
}

fn json(b: &[u8]) -> serde_json::Value {
    serde_json::from_slice(b).unwrap()
}

fn listed(index: &[u8]) -> Vec<String> {
    json(index)["manifests"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| d["digest"].as_str().unwrap().to_string())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_prefetched_images_signatures_and_sbom_are_served_offline_byte_exact() {
    let up = FakeRegistry::start().await;
    let app = up.push_image("team/app", "v1", &[Bytes::from(random_bytes(40_000, 1))]);
    let (sig, sbom) = sign(&up, "team/app", &app);
    let want_index = upstream_referrers(&up, "team/app", &app.manifest, "").await;
    assert_eq!(listed(&want_index).len(), 2, "premise: the fake lists both");
    let want_sigs = upstream_referrers(
        &up,
        "team/app",
        &app.manifest,
        &format!("?artifactType={}", q(COSIGN_SIG)),
    )
    .await;

    let site = Site::new(&upstream("up", &up.url(), true, "tag_ttl = \"1m\""));
    site.prefetch_with_referrers(&["up/team/app:v1"]).await;
    let sig_tag = cosign_tag(&app.manifest, ".sig");
    let pinned = pins(&site.root());
    for p in [
        "up/team/app:v1".to_string(),
        format!("up/team/app@{}", sig.manifest),
        format!("up/team/app@{}", sbom.manifest),
        format!("up/team/app:{sig_tag}"),
    ] {
        assert!(pinned.contains(&p), "{p} not pinned: {pinned:?}");
    }

    up.reset_counts();
    let offline = site.offline().await;
    offline.clock.advance(Duration::from_secs(3600)); // far past the TTL
    let referrers = format!("/v2/team/app/referrers/{}", app.manifest);

    // The index, as the upstream sent it.
    let (status, h, body) = get(&offline, &referrers, OCI_INDEX).await;
    assert_eq!(status, 200);
    assert_eq!(header(&h, "content-type"), OCI_INDEX);
    assert_eq!(header(&h, "x-entrepot-cache"), "hit");
    assert!(h.get("oci-filters-applied").is_none());
    assert_eq!(body, want_index, "the referrers index is not byte-exact");

    // Filtered here, from that one copy.
    let (status, h, body) = get(
        &offline,
        &format!("{referrers}?artifactType={}", q(COSIGN_SIG)),
        OCI_INDEX,
    )
    .await;
    assert_eq!(status, 200);
    assert_eq!(header(&h, "oci-filters-applied"), "artifactType");
    assert_eq!(json(&body), json(&want_sigs));
    assert_eq!(listed(&body), [sig.manifest.as_str()]);
    // A `+` sent unescaped (read as a space by form decoding) filters the same.
    let (_, _, raw) = get(
        &offline,
        &format!("{referrers}?artifactType={COSIGN_SIG}"),
        OCI_INDEX,
    )
    .await;
    assert_eq!(raw, body);
    let (_, h, body) = get(
        &offline,
        &format!("{referrers}?artifactType=application%2Fvnd.example.none"),
        OCI_INDEX,
    )
    .await;
    assert_eq!(header(&h, "oci-filters-applied"), "artifactType");
    assert!(listed(&body).is_empty());

    // Every referrer by digest, the cosign tag, and their blobs.
    for a in [&sig, &sbom] {
        let (status, h, body) = get(
            &offline,
            &format!("/v2/team/app/manifests/{}", a.manifest),
            OCI_MANIFEST,
        )
        .await;
        assert_eq!(status, 200, "{}", a.manifest);
        assert_eq!(body, a.body, "referrer {} is not byte-exact", a.manifest);
        assert_eq!(header(&h, "docker-content-digest"), a.manifest);
        for (d, data) in &a.blobs {
            let got = common::get_blob(
                &client(),
                &offline.url(&format!("/v2/team/app/blobs/{d}")),
                d,
            )
            .await
            .unwrap();
            assert_eq!(&got, data);
        }
    }
    let (status, _, body) = get(
        &offline,
        &format!("/v2/team/app/manifests/{sig_tag}"),
        OCI_MANIFEST,
    )
    .await;
    assert_eq!(status, 200);
    assert_eq!(body, sig.body, "the .sig tag is not byte-exact");

    // A subject nothing is known of: a valid empty index (no 404: see passthrough.rs).
    let unknown = format!("/v2/team/app/referrers/{}", app.config);
    let (status, h, body) = get(&offline, &unknown, OCI_INDEX).await;
    assert_eq!(status, 200);
    assert_eq!(header(&h, "content-type"), OCI_INDEX);
    assert_eq!(
        json(&body),
        serde_json::json!({"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": []})
    );
    assert!(
        up.requests().is_empty(),
        "offline contacted the upstream: {:?}",
        up.requests().iter().map(|r| &r.path).collect::<Vec<_>>()
    );
    offline.stop().await;
}

#[tokio::test]
async fn referrers_within_the_tag_ttl_are_answered_without_asking_the_upstream() {
    let up = FakeRegistry::start().await;
    let app = up.push_image("team/app", "v1", &[Bytes::from(random_bytes(1_000, 2))]);
    let (sig, _) = sign(&up, "team/app", &app);
    let proxy = Proxy::start(&upstream("up", &up.url(), true, "tag_ttl = \"1m\"")).await;
    let referrers = format!("/v2/team/app/referrers/{}", app.manifest);
    let asked = || up.count("GET", "/referrers/");

    let first = upstream_referrers(&up, "team/app", &app.manifest, "").await;
    up.reset_counts();
    let (status, h, body) = get(&proxy, &referrers, OCI_INDEX).await;
    assert_eq!((status, header(&h, "x-entrepot-cache")), (200, "miss"));
    assert_eq!(body, first);
    assert_eq!(asked(), 1);
    let forwarded = &up.requests()[0];
    assert_eq!(
        forwarded.query, None,
        "a filter or anything else was forwarded"
    );

    // Within the TTL: the store answers, whatever the filter, GET or HEAD.
    proxy.clock.advance(Duration::from_secs(59));
    let (status, h, body) = get(&proxy, &referrers, OCI_INDEX).await;
    assert_eq!((status, header(&h, "x-entrepot-cache")), (200, "hit"));
    assert_eq!(body, first);
    for t in [COSIGN_SIG, SBOM, ATTESTATION] {
        let (status, h, _) = get(
            &proxy,
            &format!("{referrers}?artifactType={}", q(t)),
            OCI_INDEX,
        )
        .await;
        assert_eq!(
            (status, header(&h, "x-entrepot-cache")),
            (200, "hit"),
            "{t}"
        );
    }
    assert_eq!(proxy.head(&referrers).await.status(), 200);
    assert_eq!(asked(), 1, "asked the upstream within the TTL");

    // A referrer pushed meanwhile shows once the TTL is over.
    let att = Artifact::new(
        &app.manifest,
        app.manifest_body.len(),
        ATTESTATION,
        b"{\"_type\":\"https://in-toto.io/Statement/v1\"}",
    );
    att.push(&up, "team/app", None);
    let (_, _, body) = get(&proxy, &referrers, OCI_INDEX).await;
    assert_eq!(body, first, "the stored copy changed within the TTL");
    proxy.clock.advance(Duration::from_secs(2));
    let (status, h, body) = get(&proxy, &referrers, OCI_INDEX).await;
    assert_eq!((status, header(&h, "x-entrepot-cache")), (200, "miss"));
    assert_eq!(asked(), 2);
    assert!(listed(&body).contains(&att.manifest));
    let second = body;
    let (_, h, body) = get(
        &proxy,
        &format!("{referrers}?artifactType={}", q(ATTESTATION)),
        OCI_INDEX,
    )
    .await;
    assert_eq!(header(&h, "oci-filters-applied"), "artifactType");
    assert_eq!(listed(&body), [att.manifest.as_str()]);

    // Unchanged after the TTL: revalidated.
    proxy.clock.advance(Duration::from_secs(61));
    let (_, h, _) = get(&proxy, &referrers, OCI_INDEX).await;
    assert_eq!(header(&h, "x-entrepot-cache"), "revalidated");
    assert_eq!(asked(), 3);

    // Upstream down after the TTL: the last copy.
    for failure in [Failure::Status(503), Failure::Status(429)] {
        up.set_failure(Some(failure));
        proxy.clock.advance(Duration::from_secs(61));
        let (status, h, body) = get(&proxy, &referrers, OCI_INDEX).await;
        assert_eq!((status, header(&h, "x-entrepot-cache")), (200, "stale"));
        assert_eq!(body, second);
    }
    // A subject with no copy yet gets the upstream's failure, not an invented list.
    up.set_failure(Some(Failure::Status(503)));
    let (status, _, _) = get(
        &proxy,
        &format!("/v2/team/app/referrers/{}", sig.manifest),
        OCI_INDEX,
    )
    .await;
    assert_eq!(status, 502);
    proxy.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sixteen_cold_clients_of_one_subject_cost_one_upstream_request() {
    let up = FakeRegistry::start().await;
    let app = up.push_image("team/app", "v1", &[Bytes::from(random_bytes(1_000, 7))]);
    let (sig, _) = sign(&up, "team/app", &app);
    let release = std::sync::Arc::new(tokio::sync::Notify::new());
    up.set_blob_behavior(
        &app.manifest,
        BlobBehavior::Gate {
            release: release.clone(),
        },
    );
    let proxy = Proxy::start(&upstream("up", &up.url(), true, "")).await;
    let url = proxy.url(&format!("/v2/team/app/referrers/{}", app.manifest));
    let asked = || up.count("GET", "/referrers/");
    let fetch = |url: String| {
        tokio::spawn(async move {
            let r = client().get(url).send().await.unwrap();
            let outcome = header(r.headers(), "x-entrepot-cache").to_string();
            (r.status().as_u16(), outcome, r.bytes().await.unwrap())
        })
    };
    let first = fetch(url.clone());
    common::eventually(
        Duration::from_secs(10),
        "the first upstream request",
        || async { asked() == 1 },
    )
    .await;
    let rest: Vec<_> = (0..15).map(|_| fetch(url.clone())).collect();
    // Nothing signals that a request waits for another's refresh: the 15 get a moment to reach
    // the upstream, as each would without one refresh at a time.
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(
        asked(),
        1,
        "a second upstream request while one was running"
    );
    release.notify_one();
    let (status, outcome, index) = first.await.unwrap();
    assert_eq!((status, outcome.as_str()), (200, "miss"));
    assert!(listed(&index).contains(&sig.manifest));
    for r in rest {
        let (status, outcome, body) = r.await.unwrap();
        assert_eq!(status, 200);
        assert!(outcome == "joined" || outcome == "hit", "{outcome}");
        assert_eq!(body, index);
    }
    assert_eq!(asked(), 1);
    proxy.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upstream_without_the_referrers_api_has_its_404_passed_on_and_its_tag_schema_cached() {
    let up = FakeRegistry::start().await;
    up.disable_referrers_api();
    let app = up.push_image("team/app", "v1", &[Bytes::from(random_bytes(2_000, 3))]);
    let (sig, sbom) = sign(&up, "team/app", &app);
    // What an OCI 1.1 client pushes to such a registry: the referrers list under the tag
    // schema.
    let descriptor = |a: &Artifact, t: &str| {
        serde_json::json!({
            "mediaType": OCI_MANIFEST, "digest": a.manifest, "size": a.body.len(),
            "artifactType": t,
        })
    };
    let schema_index = Bytes::from(
        serde_json::to_vec(&serde_json::json!({
            "schemaVersion": 2, "mediaType": OCI_INDEX,
            "manifests": [descriptor(&sig, COSIGN_SIG), descriptor(&sbom, SBOM)],
        }))
        .unwrap(),
    );
    let schema_tag = cosign_tag(&app.manifest, "");
    up.put_manifest(
        "team/app",
        Some(&schema_tag),
        OCI_INDEX,
        schema_index.clone(),
    );

    let site = Site::new(&upstream("up", &up.url(), true, "tag_ttl = \"1m\""));
    site.prefetch_with_referrers(&["up/team/app:v1"]).await;
    assert!(pins(&site.root()).contains(&format!("up/team/app:{schema_tag}")));

    // Online: the 404 is passed on as an OCI error, and remembered for the TTL.
    let online = Proxy::start_at(&site.upstreams, &site.root()).await;
    up.reset_counts();
    let referrers = format!("/v2/team/app/referrers/{}", app.manifest);
    let (status, _, body) = get(&online, &referrers, OCI_INDEX).await;
    assert_eq!(status, 404);
    assert!(common::oci_errors(&body).is_ok(), "{body:?}");
    assert_eq!(
        up.count("GET", "/referrers/"),
        0,
        "the prefetch's 404 was not kept"
    );
    online.stop().await;

    // Offline: still a 404 (so clients take the tag schema), and the tag schema is there.
    let offline = site.offline().await;
    offline.clock.advance(Duration::from_secs(3600));
    let (status, _, _) = get(&offline, &referrers, OCI_INDEX).await;
    assert_eq!(
        status, 404,
        "offline invented a referrers list for a registry without them"
    );
    let (status, _, body) = get(
        &offline,
        &format!("/v2/team/app/manifests/{schema_tag}"),
        OCI_INDEX,
    )
    .await;
    assert_eq!(status, 200);
    assert_eq!(body, schema_index);
    for a in [&sig, &sbom] {
        let (status, _, body) = get(
            &offline,
            &format!("/v2/team/app/manifests/{}", a.manifest),
            OCI_MANIFEST,
        )
        .await;
        assert_eq!(status, 200);
        assert_eq!(body, a.body);
    }
    assert!(up.requests().is_empty());
    offline.stop().await;
}

#[tokio::test]
async fn a_paged_referrers_list_is_stored_whole_and_filtered_here() {
    let up = FakeRegistry::start().await;
    up.page_referrers(1);
    let app = up.push_image("team/app", "v1", &[Bytes::from(random_bytes(3_000, 4))]);
    let (sig, sbom) = sign(&up, "team/app", &app);
    let att = Artifact::new(&app.manifest, app.manifest_body.len(), ATTESTATION, b"{}");
    att.push(&up, "team/app", None);
    let proxy = Proxy::start(&upstream("up", &up.url(), true, "")).await;
    let referrers = format!("/v2/team/app/referrers/{}", app.manifest);

    let (status, h, body) = get(&proxy, &referrers, OCI_INDEX).await;
    assert_eq!(status, 200);
    assert!(h.get("link").is_none(), "one answer, no pages");
    let mut want = vec![
        sig.manifest.clone(),
        sbom.manifest.clone(),
        att.manifest.clone(),
    ];
    want.sort();
    assert_eq!(listed(&body), want);
    assert_eq!(up.count("GET", "/referrers/"), 3, "one request a page");
    let (_, h, body) = get(
        &proxy,
        &format!("{referrers}?artifactType={}", q(SBOM)),
        OCI_INDEX,
    )
    .await;
    assert_eq!(header(&h, "oci-filters-applied"), "artifactType");
    assert_eq!(listed(&body), [sbom.manifest.as_str()]);
    assert_eq!(up.count("GET", "/referrers/"), 3);
    proxy.stop().await;
}

/// Pushes `data` to a real registry; returns its digest.
async fn push_blob(c: &reqwest::Client, base: &str, repo: &str, data: &[u8]) -> String {
    let digest = sha256_digest(data);
    let r = c
        .post(format!("{base}/v2/{repo}/blobs/uploads/"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 202, "start upload");
    let location = r.headers()["location"].to_str().unwrap().to_string();
    let location = if location.starts_with('/') {
        format!("{base}{location}")
    } else {
        location
    };
    let sep = if location.contains('?') { '&' } else { '?' };
    let r = c
        .put(format!("{location}{sep}digest={digest}"))
        .header("content-type", "application/octet-stream")
        .body(data.to_vec())
        .send()
        .await
        .unwrap();
    assert_eq!(
        r.status(),
        201,
        "finish upload: {}",
        r.text().await.unwrap()
    );
    digest
}

async fn push_manifest(c: &reqwest::Client, base: &str, repo: &str, reference: &str, body: &Bytes) {
    let r = c
        .put(format!("{base}/v2/{repo}/manifests/{reference}"))
        .header("content-type", OCI_MANIFEST)
        .body(body.clone())
        .send()
        .await
        .unwrap();
    assert_eq!(
        r.status(),
        201,
        "push {reference}: {}",
        r.text().await.unwrap()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cosign_signature_on_distribution_2_8_is_prefetched_and_served_offline() {
    let mut registry = DockerRegistry::start("supply-chain").await.unwrap();
    let base = registry.url();
    let c = client();
    let repo = "team/signed";
    let layer = random_bytes(20_000, 5);
    let config =
        br#"{"architecture":"amd64","os":"linux","rootfs":{"type":"layers","diff_ids":[]}}"#;
    let image = Bytes::from(
        serde_json::to_vec(&serde_json::json!({
            "schemaVersion": 2, "mediaType": OCI_MANIFEST,
            "config": {
                "mediaType": common::OCI_CONFIG,
                "digest": push_blob(&c, &base, repo, config).await, "size": config.len(),
            },
            "layers": [{
                "mediaType": common::OCI_LAYER,
                "digest": push_blob(&c, &base, repo, &layer).await, "size": layer.len(),
            }],
        }))
        .unwrap(),
    );
    push_manifest(&c, &base, repo, "v1", &image).await;
    let image_digest = sha256_digest(&image);
    let sig = Artifact::new(
        &image_digest,
        image.len(),
        COSIGN_SIG,
        b"signed by distribution 2.8",
    );
    for (_, b) in &sig.blobs {
        push_blob(&c, &base, repo, b).await;
    }
    let sig_tag = cosign_tag(&image_digest, ".sig");
    push_manifest(&c, &base, repo, &sig_tag, &sig.body).await;
    // Premise: the registry keeps the manifest as pushed, `subject` and all, and has no
    // referrers API.
    let r = c
        .get(format!("{base}/v2/{repo}/manifests/{sig_tag}"))
        .header("accept", OCI_MANIFEST)
        .send()
        .await
        .unwrap();
    assert_eq!(r.bytes().await.unwrap(), sig.body);
    let r = c
        .get(format!("{base}/v2/{repo}/referrers/{image_digest}"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 404);

    let site = Site::new(&upstream("reg", &base, true, ""));
    let out = site
        .prefetch_with_referrers(&[&format!("reg/{repo}:v1")])
        .await;
    assert!(
        pins(&site.root()).contains(&format!("reg/{repo}:{sig_tag}")),
        "{out}"
    );
    registry.stop();

    let offline = site.offline().await;
    let (status, _, body) = get(
        &offline,
        &format!("/v2/{repo}/manifests/{sig_tag}"),
        OCI_MANIFEST,
    )
    .await;
    assert_eq!(status, 200);
    assert_eq!(body, sig.body, "the .sig tag is not byte-exact");
    let (status, _, body) = get(
        &offline,
        &format!("/v2/{repo}/manifests/{}", sig.manifest),
        OCI_MANIFEST,
    )
    .await;
    assert_eq!(status, 200);
    assert_eq!(body, sig.body);
    for (d, data) in &sig.blobs {
        let got = common::get_blob(&client(), &offline.url(&format!("/v2/{repo}/blobs/{d}")), d)
            .await
            .unwrap();
        assert_eq!(&got, data);
    }
    // The registry's 404 was remembered: offline says the same, so clients use the tags.
    let (status, _, _) = get(
        &offline,
        &format!("/v2/{repo}/referrers/{image_digest}"),
        OCI_INDEX,
    )
    .await;
    assert_eq!(status, 404);
    offline.stop().await;
}

/// `entrepot export` / `import`, which must succeed; returns the output.
async fn entrepot(args: &[&str]) -> String {
    let mut cmd = Command::new(BIN);
    cmd.args(args).env_remove("ENTREPOT_LOG");
    run_bounded("entrepot", cmd, Duration::from_secs(60))
        .await
        .expect("entrepot ran")
        .ok()
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn referrers_travel_in_a_bundle_and_are_served_offline_on_the_other_side() {
    let up = FakeRegistry::start().await;
    let app = up.push_image("team/app", "v1", &[Bytes::from(random_bytes(10_000, 6))]);
    let (sig, sbom) = sign(&up, "team/app", &app);
    let want_index = upstream_referrers(&up, "team/app", &app.manifest, "").await;
    let online = Site::new(&upstream("up", &up.url(), true, ""));
    online.prefetch_with_referrers(&["up/team/app:v1"]).await;

    // Every pinned image: the image, its referrers and cosign tag, and the referrers list
    // under the tag schema.
    let bundle = online.dir.path().join("bundle.tar");
    let root = online.root();
    let out = entrepot(&[
        "export",
        "--root",
        root.to_str().unwrap(),
        "--out",
        bundle.to_str().unwrap(),
    ])
    .await;
    let schema_tag = cosign_tag(&app.manifest, "");
    assert!(out.contains(&format!("up/team/app:{schema_tag}")), "{out}");

    let airgap = Site::new(&upstream("up", &up.url(), true, ""));
    entrepot(&[
        "import",
        bundle.to_str().unwrap(),
        "--root",
        airgap.root().to_str().unwrap(),
    ])
    .await;
    up.reset_counts();
    let offline = airgap.offline().await;
    let referrers = format!("/v2/team/app/referrers/{}", app.manifest);
    let (status, h, body) = get(&offline, &referrers, OCI_INDEX).await;
    assert_eq!(status, 200);
    assert_eq!(header(&h, "content-type"), OCI_INDEX);
    assert_eq!(
        body, want_index,
        "the referrers index did not travel byte-exact"
    );
    let (_, h, body) = get(
        &offline,
        &format!("{referrers}?artifactType={}", q(SBOM)),
        OCI_INDEX,
    )
    .await;
    assert_eq!(header(&h, "oci-filters-applied"), "artifactType");
    assert_eq!(listed(&body), [sbom.manifest.as_str()]);
    for (path, want) in [
        (
            format!("/v2/team/app/manifests/{}", sig.manifest),
            &sig.body,
        ),
        (
            format!("/v2/team/app/manifests/{}", sbom.manifest),
            &sbom.body,
        ),
        (
            format!(
                "/v2/team/app/manifests/{}",
                cosign_tag(&app.manifest, ".sig")
            ),
            &sig.body,
        ),
    ] {
        let (status, _, body) = get(&offline, &path, OCI_MANIFEST).await;
        assert_eq!(status, 200, "{path}");
        assert_eq!(&body, want, "{path}");
    }
    assert!(up.requests().is_empty());
    offline.stop().await;
}
