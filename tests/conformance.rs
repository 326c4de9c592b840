//! The pull side of the OCI distribution-spec conformance suite (opencontainers/distribution-spec
//! `conformance/`: `01_pull_test.go`, the tag listing of `03_discovery_test.go` /
//! `06_tags_list_test.go`, and the referrers checks), ported and run against the `entrepot`
//! binary fronting a real `docker-registry` (CNCF distribution 2.8) seeded with `skopeo`.
//!
//! Each check runs through both ways of naming the upstream: the path prefix
//! (`/v2/upstream/<repo>/...`) and the default upstream (`/v2/<repo>/...`); the pull checks run
//! once more on the prefix when everything is cached. Every check runs even when another fails;
//! the test lists all failures at the end. Besides the suite's status checks, the exact headers
//! of the spec are checked: `Docker-Content-Digest`, `Content-Length`, `Content-Type`.
//!
//! Needs `docker-registry` and `skopeo` on PATH (`bash .ci/install-deps.sh`).

mod common;

use anyhow::{ensure, Context, Result};
use common::oci_e2e::{send, Reply, Report};
use common::real::{require_programs, skopeo_copy, DockerRegistry, Entrepot, SeedImage, TAG_TTL};
use common::{sha256_digest, upstream, OCI_INDEX, OCI_MANIFEST};
use reqwest::Method;

/// The configured name of the upstream, used as the path prefix.
const UPSTREAM: &str = "upstream";
/// The repository on the upstream.
const REPO: &str = "conformance/app";
/// The suite's "nonexistent manifest": deliberately not even a valid tag.
const SUITE_NONEXISTENT_MANIFEST: &str = ".INVALID_MANIFEST_NAME";
/// A valid tag that is never pushed.
const ABSENT_TAG: &str = "no-such-tag";

/// How a request names the upstream.
#[derive(Clone, Copy, Debug)]
enum Via {
    /// `/v2/upstream/conformance/app/...`
    Prefix,
    /// `/v2/conformance/app/...`, through the default upstream.
    Default,
}

/// A seeded docker-registry behind entrepot. Field order is drop order: the processes go first,
/// while the working directory with their logs still exists.
struct Env {
    entrepot: Entrepot,
    registry: DockerRegistry,
    image: SeedImage,
    http: reqwest::Client,
    /// A digest nothing has: the suite's `dummyDigest`.
    dummy: String,
    _work: tempfile::TempDir,
}

impl Env {
    /// Pushes one generated image to `REPO` under each of `tags` (in that order) and starts
    /// entrepot with the registry as its default upstream.
    async fn start(tags: &[&str]) -> Result<Self> {
        let work = tempfile::tempdir()?;
        let registry = DockerRegistry::start("docker-registry").await?;
        let image = SeedImage::generate(&[300 * 1024, 1000]);
        let layout = work.path().join("seed");
        image.write_layout(&layout, "seed")?;
        for tag in tags {
            skopeo_copy(
                &format!("oci:{}:seed", layout.display()),
                &format!("docker://{}/{REPO}:{tag}", registry.host()),
            )
            .await?;
        }
        let upstreams = upstream(UPSTREAM, &registry.url(), true, TAG_TTL);
        let entrepot = Entrepot::start(work.path(), &upstreams).await?;
        Ok(Self {
            entrepot,
            registry,
            image,
            http: common::client(),
            dummy: sha256_digest(format!("no such blob {}", std::process::id()).as_bytes()),
            _work: work,
        })
    }

    /// The repository name as the client writes it.
    fn name(&self, via: Via, repo: &str) -> String {
        match via {
            Via::Prefix => format!("{UPSTREAM}/{repo}"),
            Via::Default => repo.to_owned(),
        }
    }

    /// `http://<entrepot>/v2/<name>/<rest>` for `REPO`.
    fn proxy(&self, via: Via, rest: &str) -> String {
        self.proxy_repo(via, REPO, rest)
    }

    fn proxy_repo(&self, via: Via, repo: &str, rest: &str) -> String {
        format!(
            "http://{}/v2/{}/{rest}",
            self.entrepot.host(),
            self.name(via, repo)
        )
    }

    /// The same request straight to the upstream, to compare with.
    fn upstream(&self, rest: &str) -> String {
        format!("{}/v2/{REPO}/{rest}", self.registry.url())
    }

    async fn head(&self, url: &str, accept: Option<&str>) -> Result<Reply> {
        send(&self.http, Method::HEAD, url, accept).await
    }

    async fn get(&self, url: &str, accept: Option<&str>) -> Result<Reply> {
        send(&self.http, Method::GET, url, accept).await
    }
}

/// Starts the environment, or fails the test with the reason.
async fn start(tags: &[&str]) -> Env {
    require_programs(&["docker-registry", "skopeo"]);
    Env::start(tags)
        .await
        .unwrap_or_else(|e| panic!("starting docker-registry + entrepot: {e:#}"))
}

/// A successful blob answer: status, the spec's headers, the upstream's `Content-Type`, and
/// (for GET) the exact bytes.
async fn check_blob(env: &Env, via: Via, method: Method, blob: &common::real::Blob) -> Result<()> {
    let rest = format!("blobs/{}", blob.digest);
    let r = send(&env.http, method.clone(), &env.proxy(via, &rest), None).await?;
    r.expect_status(200)?;
    r.expect_header("docker-content-digest", &blob.digest)?;
    r.expect_header("content-length", &blob.data.len().to_string())?;
    let upstream = send(&env.http, method.clone(), &env.upstream(&rest), None).await?;
    if let Some(want) = upstream.header("content-type") {
        r.expect_header("content-type", want)?;
    }
    if method == Method::HEAD {
        ensure!(r.body.is_empty(), "HEAD with a body: {}", r.describe());
    } else {
        ensure!(
            r.body[..] == blob.data[..],
            "body ({} bytes, {}) is not the blob: {}",
            r.body.len(),
            sha256_digest(&r.body),
            r.describe()
        );
    }
    Ok(())
}

/// A successful manifest answer for `reference` with `Accept: <OCI manifest>`.
async fn check_manifest(env: &Env, via: Via, method: Method, reference: &str) -> Result<()> {
    let m = &env.image.manifest;
    let url = env.proxy(via, &format!("manifests/{reference}"));
    let r = send(&env.http, method.clone(), &url, Some(OCI_MANIFEST)).await?;
    r.expect_status(200)?;
    r.expect_header("docker-content-digest", &m.digest)?;
    r.expect_header("content-type", OCI_MANIFEST)?;
    r.expect_header("content-length", &m.data.len().to_string())?;
    if method == Method::HEAD {
        ensure!(r.body.is_empty(), "HEAD with a body: {}", r.describe());
    } else {
        ensure!(
            r.body[..] == m.data[..],
            "body is not the pushed manifest ({} bytes, {}): {}",
            r.body.len(),
            sha256_digest(&r.body),
            r.describe()
        );
    }
    Ok(())
}

/// `01_pull_test.go` ("Pull blobs", "Pull manifests", "Error codes"), plus the 404 codes of the
/// spec's error table and unknown repositories.
async fn pull_checks(env: &Env, report: &mut Report, label: &str, via: Via) {
    let accept = Some(OCI_MANIFEST);
    let img = &env.image;
    let check = |name: &str| format!("[{label}] {name}");

    // Pull blobs. HEAD before GET, so on a cold cache HEAD takes the upstream-HEAD path.
    let url = env.proxy(via, &format!("blobs/{}", env.dummy));
    report.record(
        &check("HEAD request to nonexistent blob should result in 404 response"),
        async { env.head(&url, None).await?.expect_head_error(404) }.await,
    );
    for (what, blob) in
        std::iter::once(("config", &img.config)).chain(img.layers.iter().map(|l| ("layer", l)))
    {
        report.record(
            &check(&format!(
                "HEAD request to existing blob ({what} {}) should yield 200 with its digest and length",
                blob.digest
            )),
            check_blob(env, via, Method::HEAD, blob).await,
        );
    }
    report.record(
        &check("GET nonexistent blob should result in 404 response with BLOB_UNKNOWN"),
        async {
            env.get(&url, None)
                .await?
                .expect_oci_error(404, &["BLOB_UNKNOWN"])
        }
        .await,
    );
    for (what, blob) in
        std::iter::once(("config", &img.config)).chain(img.layers.iter().map(|l| ("layer", l)))
    {
        report.record(
            &check(&format!(
                "GET request to existing blob URL ({what} {}) should yield 200 with its bytes",
                blob.digest
            )),
            check_blob(env, via, Method::GET, blob).await,
        );
    }

    // Pull manifests.
    let suite_missing = env.proxy(via, &format!("manifests/{SUITE_NONEXISTENT_MANIFEST}"));
    let absent = env.proxy(via, &format!("manifests/{ABSENT_TAG}"));
    report.record(
        &check(&format!(
            "HEAD request to nonexistent manifest ({SUITE_NONEXISTENT_MANIFEST}) should return 404"
        )),
        async {
            env.head(&suite_missing, accept)
                .await?
                .expect_head_error(404)
        }
        .await,
    );
    report.record(
        &check(&format!(
            "HEAD request to nonexistent manifest (valid tag {ABSENT_TAG}) should return 404"
        )),
        async { env.head(&absent, accept).await?.expect_head_error(404) }.await,
    );
    report.record(
        &check("HEAD request to manifest path (digest) should yield 200 response"),
        check_manifest(env, via, Method::HEAD, &img.manifest.digest).await,
    );
    report.record(
        &check("HEAD request to manifest path (tag) should yield 200 response"),
        check_manifest(env, via, Method::HEAD, "tagtest0").await,
    );
    report.record(
        &check(&format!(
            "GET nonexistent manifest ({SUITE_NONEXISTENT_MANIFEST}) should return 404"
        )),
        async {
            let r = env.get(&suite_missing, accept).await?;
            r.expect_status(404)?;
            r.oci_error_codes().map(drop)
        }
        .await,
    );
    report.record(
        &check(&format!(
            "GET nonexistent manifest (valid tag {ABSENT_TAG}) should return 404 with MANIFEST_UNKNOWN"
        )),
        async {
            env.get(&absent, accept)
                .await?
                .expect_oci_error(404, &["MANIFEST_UNKNOWN"])
        }
        .await,
    );
    report.record(
        &check("GET request to manifest path (digest) should yield 200 response"),
        check_manifest(env, via, Method::GET, &img.manifest.digest).await,
    );
    report.record(
        &check("GET request to manifest path (tag) should yield 200 response"),
        check_manifest(env, via, Method::GET, "tagtest0").await,
    );

    // Unknown repository: the upstream says NAME_UNKNOWN; MANIFEST_UNKNOWN / BLOB_UNKNOWN
    // are as true and as useful to a client.
    report.record(
        &check("GET manifest in an unknown repository should return 404 NAME_UNKNOWN or MANIFEST_UNKNOWN"),
        async {
            let url = env.proxy_repo(via, "conformance/nope", "manifests/tagtest0");
            env.get(&url, accept)
                .await?
                .expect_oci_error(404, &["NAME_UNKNOWN", "MANIFEST_UNKNOWN"])
        }
        .await,
    );
    report.record(
        &check("GET blob in an unknown repository should return 404 NAME_UNKNOWN or BLOB_UNKNOWN"),
        async {
            let url = env.proxy_repo(via, "conformance/nope", &format!("blobs/{}", env.dummy));
            env.get(&url, None)
                .await?
                .expect_oci_error(404, &["NAME_UNKNOWN", "BLOB_UNKNOWN"])
        }
        .await,
    );

    // Error codes: a malformed digest is a 400 with an OCI error body, or a 404.
    report.record(
        &check("400 response body should contain OCI-conforming JSON message"),
        async {
            let r = env
                .get(&env.proxy(via, "manifests/sha256:totallywrong"), accept)
                .await?;
            ensure!(
                matches!(r.status.as_u16(), 400 | 404),
                "expected 400 or 404: {}",
                r.describe()
            );
            if r.status.as_u16() == 400 {
                r.oci_error_codes()?;
            }
            Ok(())
        }
        .await,
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pull_blobs_and_manifests_by_tag_and_digest() {
    let env = start(&["tagtest0"]).await;
    let mut report = Report::default();
    for (label, via) in [
        ("prefix, cold", Via::Prefix),
        ("default upstream", Via::Default),
        ("prefix, cached", Via::Prefix),
    ] {
        pull_checks(&env, &mut report, label, via).await;
    }
    report.finish();
}

/// Pushed in this (non-lexical) order; docker-registry 2.8 lists them unsorted.
const TAGS: &[&str] = &["1.0", "latest", "0.9", "edge", "2.0-rc"];

fn sorted_tags() -> Vec<String> {
    let mut tags: Vec<String> = TAGS.iter().map(|t| t.to_string()).collect();
    tags.sort();
    tags
}

/// `GET tags/list?<query>` through entrepot: 200, JSON, and the `tags` array.
async fn tags_page(env: &Env, via: Via, query: &str) -> Result<(Reply, Vec<String>)> {
    let url = if query.is_empty() {
        env.proxy(via, "tags/list")
    } else {
        env.proxy(via, &format!("tags/list?{query}"))
    };
    let r = env.get(&url, None).await?;
    r.expect_status(200)?;
    let content_type = r.header("content-type").unwrap_or("");
    ensure!(
        content_type.starts_with("application/json"),
        "tag list is not JSON: {}",
        r.describe()
    );
    let body = r.json()?;
    let tags = body["tags"]
        .as_array()
        .with_context(|| format!("no `tags` array: {}", r.describe()))?
        .iter()
        .map(|t| t.as_str().map(str::to_owned))
        .collect::<Option<Vec<_>>>()
        .with_context(|| format!("a tag that is not a string: {}", r.describe()))?;
    Ok((r, tags))
}

/// The target of a `Link: <...>; rel="next"` header, which must lead back to entrepot under the
/// name the client used. `None` when there is no Link.
fn next_link(env: &Env, via: Via, r: &Reply) -> Result<Option<String>> {
    let Some(link) = r.header("link") else {
        return Ok(None);
    };
    let (target, params) = link
        .trim()
        .strip_prefix('<')
        .and_then(|l| l.split_once('>'))
        .with_context(|| format!("Link is not `<url>; rel=\"next\"`: {}", r.describe()))?;
    ensure!(
        params.replace(' ', "").contains("rel=\"next\""),
        "Link without rel=\"next\": {}",
        r.describe()
    );
    let base = url::Url::parse(&r.url)?;
    let next = base.join(target)?;
    ensure!(
        next.host_str() == Some("127.0.0.1") && next.port() == Some(env.entrepot.port),
        "Link leads to {next}, not to entrepot at {}: {}",
        env.entrepot.host(),
        r.describe()
    );
    let want_path = format!("/v2/{}/tags/list", env.name(via, REPO));
    ensure!(
        next.path() == want_path,
        "Link path is {}, expected {want_path}: {}",
        next.path(),
        r.describe()
    );
    Ok(Some(next.to_string()))
}

/// `03_discovery_test.go` / `06_tags_list_test.go` and the spec's rules for `n`, `last`, order
/// and `Link`.
async fn tags_checks(env: &Env, report: &mut Report, via: Via) {
    let all = sorted_tags();
    let check = |name: &str| format!("[{via:?}] {name}");

    report.record(
        &check("GET request to list tags should yield 200 with every tag, in lexical order"),
        async {
            let (r, tags) = tags_page(env, via, "").await?;
            ensure!(
                tags == all,
                "tags {tags:?}, expected {all:?}: {}",
                r.describe()
            );
            Ok(())
        }
        .await,
    );
    report.record(
        &check("tag list `name` is the repository name the client asked for"),
        async {
            let (r, _) = tags_page(env, via, "").await?;
            let want = env.name(via, REPO);
            ensure!(
                r.json()?["name"] == want.as_str(),
                "name is not {want:?}: {}",
                r.describe()
            );
            Ok(())
        }
        .await,
    );
    report.record(
        &check("GET number of tags should be limitable by `n` query parameter"),
        async {
            let (r, tags) = tags_page(env, via, "n=2").await?;
            ensure!(
                tags == all[..2],
                "n=2 gave {tags:?}, expected {:?}: {}",
                &all[..2],
                r.describe()
            );
            next_link(env, via, &r).map(drop)
        }
        .await,
    );
    report.record(
        &check("GET start of tag is set by `last` query parameter"),
        async {
            let query = format!("n=2&last={}", all[1]);
            let (r, tags) = tags_page(env, via, &query).await?;
            ensure!(
                tags == all[2..4],
                "{query} gave {tags:?}, expected {:?}: {}",
                &all[2..4],
                r.describe()
            );
            Ok(())
        }
        .await,
    );
    report.record(
        &check("`last` without `n` lists every tag after it"),
        async {
            let query = format!("last={}", all[2]);
            let (r, tags) = tags_page(env, via, &query).await?;
            ensure!(
                tags == all[3..],
                "{query} gave {tags:?}, expected {:?}: {}",
                &all[3..],
                r.describe()
            );
            Ok(())
        }
        .await,
    );
    report.record(
        &check("n=0 returns an empty list and no Link header"),
        async {
            let (r, tags) = tags_page(env, via, "n=0").await?;
            ensure!(tags.is_empty(), "n=0 gave {tags:?}: {}", r.describe());
            ensure!(
                r.header("link").is_none(),
                "Link with n=0: {}",
                r.describe()
            );
            Ok(())
        }
        .await,
    );
    report.record(
        &check("n above the number of tags returns every tag and no Link header"),
        async {
            let (r, tags) = tags_page(env, via, "n=100").await?;
            ensure!(tags == all, "n=100 gave {tags:?}: {}", r.describe());
            ensure!(
                r.header("link").is_none(),
                "Link on the last page: {}",
                r.describe()
            );
            Ok(())
        }
        .await,
    );
    report.record(
        &check("paging with n=2 (Link when given, else `last`) lists every tag once"),
        async {
            let mut seen = Vec::new();
            let mut url = env.proxy(via, "tags/list?n=2");
            for _ in 0..all.len() + 2 {
                let r = env.get(&url, None).await?;
                r.expect_status(200)?;
                let page: Vec<String> = serde_json::from_value(r.json()?["tags"].clone())
                    .with_context(|| format!("no tags array: {}", r.describe()))?;
                ensure!(
                    page.len() <= 2,
                    "page of {} tags with n=2: {}",
                    page.len(),
                    r.describe()
                );
                seen.extend(page.iter().cloned());
                match next_link(env, via, &r)? {
                    Some(next) => url = next,
                    None if page.len() < 2 => break,
                    None => {
                        let last = page.last().expect("two tags");
                        url = env.proxy(via, &format!("tags/list?n=2&last={last}"));
                    }
                }
            }
            ensure!(seen == all, "paging listed {seen:?}, expected {all:?}");
            Ok(())
        }
        .await,
    );
    report.record(
        &check("tag list of an unknown repository should return 404 NAME_UNKNOWN"),
        async {
            let url = env.proxy_repo(via, "conformance/nope", "tags/list");
            env.get(&url, None)
                .await?
                .expect_oci_error(404, &["NAME_UNKNOWN"])
        }
        .await,
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tags_list_with_n_last_and_link() {
    let env = start(TAGS).await;
    let mut report = Report::default();
    for via in [Via::Prefix, Via::Default] {
        tags_checks(&env, &mut report, via).await;
    }
    report.finish();
}

/// Referrers (`05_referrers.go`, the referrers part of `03_discovery_test.go`). docker-registry
/// 2.8 predates the referrers API: it answers `404 page not found` (text/plain). A proxy in front
/// of it must pass that 404 on, as an OCI error, and not invent an empty index: to a client a 404
/// means "no referrers API here, fall back to the `sha256-<hex>` tag schema", while a 200 with no
/// manifests would claim there are no referrers at all. The spec names no error code for this;
/// entrepot answers `NAME_UNKNOWN`, so only "a code from the spec's table" is checked. The
/// fallback tag is then a plain manifest miss.
async fn referrers_checks(env: &Env, report: &mut Report, via: Via) {
    let subject = &env.image.manifest.digest;
    let check = |name: &str| format!("[{via:?}] {name}");

    report.record(
        &check("premise: docker-registry 2.8 itself answers 404 to referrers"),
        async {
            let r = env
                .get(&env.upstream(&format!("referrers/{subject}")), None)
                .await?;
            r.expect_status(404)
        }
        .await,
    );
    for (what, digest) in [
        ("existing manifest", subject),
        ("nonexistent digest", &env.dummy),
    ] {
        report.record(
            &check(&format!(
                "GET referrers of {what} passes the upstream's 404 on as an OCI error"
            )),
            async {
                let r = env
                    .get(
                        &env.proxy(via, &format!("referrers/{digest}")),
                        Some(OCI_INDEX),
                    )
                    .await?;
                r.expect_status(404)?;
                r.oci_error_codes().map(drop)
            }
            .await,
        );
    }
    report.record(
        &check("GET referrers with an artifactType filter passes the upstream's 404 on"),
        async {
            let url = env.proxy(
                via,
                &format!("referrers/{subject}?artifactType=application%2Fvnd.example.sbom"),
            );
            let r = env.get(&url, None).await?;
            r.expect_status(404)?;
            r.oci_error_codes().map(drop)
        }
        .await,
    );
    report.record(
        &check("GET referrers of a malformed digest should return 400"),
        async {
            let r = env
                .get(&env.proxy(via, "referrers/sha256:totallywrong"), None)
                .await?;
            r.expect_status(400)?;
            r.oci_error_codes().map(drop)
        }
        .await,
    );
    report.record(
        &check("referrers tag-schema fallback (`sha256-<hex>`) is a 404 MANIFEST_UNKNOWN"),
        async {
            let tag = subject.replacen(':', "-", 1);
            let url = env.proxy(via, &format!("manifests/{tag}"));
            env.get(&url, Some(OCI_INDEX))
                .await?
                .expect_oci_error(404, &["MANIFEST_UNKNOWN"])
        }
        .await,
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn referrers_pass_the_upstreams_404_through() {
    let env = start(&["tagtest0"]).await;
    let mut report = Report::default();
    for via in [Via::Prefix, Via::Default] {
        referrers_checks(&env, &mut report, via).await;
    }
    report.finish();
}

/// The report behind every test above fails a run that recorded no check, so a scenario that
/// silently skips its checks cannot pass.
#[test]
#[should_panic(expected = "no conformance check ran")]
fn an_empty_conformance_report_fails() {
    Report::default().finish();
}
