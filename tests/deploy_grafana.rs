//! `deploy/grafana/entrepot.json`: the dashboard imports anywhere (a `${DS_PROMETHEUS}` data
//! source, no data source uid of ours), and every metric and label its queries use is one that
//! real `entrepot serve` replicas export: two of them on a Garage bucket, driven until every
//! panel has data (a miss, a hit, a forward, a fallback, a bucket fill, an eviction, an
//! unreachable upstream). The README's metric table names every metric they export, with its
//! type, and every metric the dashboard uses.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::time::Duration;

use bytes::Bytes;
use common::cluster::{self, owner_of, start_all, static_cluster, wait_peers_healthy};
use common::fake_registry::FakeRegistry;
use common::garage::Garage;
use common::{client, free_port, get_blob, random_bytes, sha256_digest, upstream};
use object_store::path::Path as ObjectPath;
use object_store::ObjectStoreExt as _;
use serde_json::Value;

const DATASOURCE: &str = "${DS_PROMETHEUS}";

/// Labels Prometheus adds when it scrapes: never in `/metrics` itself.
const SCRAPE_LABELS: [&str; 2] = ["instance", "job"];

fn dashboard() -> Value {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy/grafana/entrepot.json");
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).expect("valid JSON")
}

/// Every panel, those inside rows too.
fn panels(dash: &Value) -> Vec<&Value> {
    let mut out = Vec::new();
    for p in dash["panels"].as_array().expect("panels") {
        out.push(p);
        if let Some(inner) = p["panels"].as_array() {
            out.extend(inner);
        }
    }
    out
}

/// Every PromQL query: panel targets and the templating variables' queries.
fn queries(dash: &Value) -> Vec<String> {
    let mut out = Vec::new();
    for p in panels(dash).into_iter().filter(|p| p["type"] != "row") {
        for t in p["targets"].as_array().expect("targets") {
            out.push(t["expr"].as_str().expect("expr").to_string());
        }
    }
    for v in dash["templating"]["list"].as_array().expect("templating") {
        if let Some(q) = v["query"]["query"].as_str() {
            out.push(q.to_string());
        }
    }
    out
}

fn is_name_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || c == '_' || c == ':'
}

/// What a query asks of the metrics: the `entrepot_*` names, the labels each selector
/// (`name{label="..."}`, `label_values(name, label)`) names on its metric, and the `by (...)`
/// labels, which some metric of the query must carry.
#[derive(Debug, Default)]
struct Uses {
    metrics: BTreeSet<String>,
    selector_labels: BTreeSet<(String, String)>,
    by_labels: BTreeSet<String>,
}

fn uses(query: &str) -> Uses {
    let mut u = Uses::default();
    let chars: Vec<char> = query.chars().collect();
    let text = |a: usize, b: usize| chars[a..b].iter().collect::<String>();
    let ident_end = |mut i: usize| {
        while i < chars.len() && is_name_char(chars[i]) {
            i += 1;
        }
        i
    };
    let mut i = 0;
    while i < chars.len() {
        let word_start = i == 0 || !is_name_char(chars[i - 1]);
        if word_start && text(i, (i + 9).min(chars.len())) == "entrepot_" {
            let end = ident_end(i);
            let name = text(i, end);
            u.metrics.insert(name.clone());
            if chars.get(end) == Some(&'{') {
                i = selector_labels(&chars, end + 1, &name, &mut u.selector_labels);
            } else {
                i = end;
            }
            continue;
        }
        if word_start && chars[i].is_ascii_alphabetic() {
            let end = ident_end(i);
            let word = text(i, end);
            let mut j = end;
            while chars.get(j) == Some(&' ') {
                j += 1;
            }
            if word == "by" && chars.get(j) == Some(&'(') {
                let close = j + chars[j..].iter().position(|c| *c == ')').expect("by (...)");
                for l in text(j + 1, close).split(',') {
                    u.by_labels.insert(l.trim().to_string());
                }
            }
            if word == "label_values" && chars.get(j) == Some(&'(') {
                let close = j + chars[j..].iter().position(|c| *c == ')').expect("(...)");
                let args = text(j + 1, close);
                let (metric, label) = args.split_once(',').expect("label_values(metric, label)");
                let label = (metric.trim().to_string(), label.trim().to_string());
                u.selector_labels.insert(label);
            }
            i = end;
            continue;
        }
        i += 1;
    }
    u
}

/// Reads `label op "value", ...}` from `i` (just after `{`); returns the index after `}`.
fn selector_labels(
    chars: &[char],
    mut i: usize,
    metric: &str,
    out: &mut BTreeSet<(String, String)>,
) -> usize {
    loop {
        while matches!(chars.get(i), Some(' ' | ',')) {
            i += 1;
        }
        match chars.get(i) {
            Some('}') => return i + 1,
            None => panic!("unclosed selector after {metric}"),
            _ => {}
        }
        let start = i;
        while is_name_char(chars[i]) {
            i += 1;
        }
        out.insert((metric.to_string(), chars[start..i].iter().collect()));
        while matches!(chars.get(i), Some('=' | '!' | '~' | ' ')) {
            i += 1;
        }
        assert_eq!(
            chars.get(i),
            Some(&'"'),
            "a quoted label value after {metric}"
        );
        i += 1;
        while chars[i] != '"' {
            i += if chars[i] == '\\' { 2 } else { 1 };
        }
        i += 1;
    }
}

/// What `/metrics` pages show: `# TYPE` of each metric, and the label names each sample name
/// (`_bucket`, `_sum`, `_count` included) was seen with.
#[derive(Debug, Default)]
struct Exported {
    types: BTreeMap<String, String>,
    samples: BTreeMap<String, BTreeSet<String>>,
}

impl Exported {
    fn add(&mut self, page: &str) {
        for line in page.lines() {
            if let Some(rest) = line.strip_prefix("# TYPE ") {
                let (name, kind) = rest.split_once(' ').expect("# TYPE name type");
                self.types.insert(name.to_string(), kind.to_string());
                continue;
            }
            if line.starts_with('#') || line.trim().is_empty() {
                continue;
            }
            let chars: Vec<char> = line.chars().collect();
            let end = chars
                .iter()
                .position(|c| !is_name_char(*c))
                .expect("a value");
            let name: String = chars[..end].iter().collect();
            let mut labels = BTreeSet::new();
            if chars[end] == '{' {
                selector_labels(&chars, end + 1, &name, &mut labels);
            }
            self.samples
                .entry(name)
                .or_default()
                .extend(labels.into_iter().map(|(_, l)| l));
        }
    }

    /// `name` without a histogram's or summary's sample suffix.
    fn family<'a>(&self, name: &'a str) -> &'a str {
        for suffix in ["_bucket", "_sum", "_count"] {
            if let Some(base) = name.strip_suffix(suffix) {
                if self
                    .types
                    .get(base)
                    .is_some_and(|t| t == "histogram" || t == "summary")
                {
                    return base;
                }
            }
        }
        name
    }
}

/// What in `queries` the exported metrics do not have, one line each.
fn not_exported(queries: &[String], exported: &Exported) -> Vec<String> {
    let mut wrong = Vec::new();
    for q in queries {
        let u = uses(q);
        for m in &u.metrics {
            if !exported.samples.contains_key(m) {
                wrong.push(format!("{m}: not exported (in {q})"));
            }
        }
        for (m, l) in &u.selector_labels {
            let has = exported.samples.get(m).is_some_and(|ls| ls.contains(l));
            if !has && !SCRAPE_LABELS.contains(&l.as_str()) {
                wrong.push(format!("{m}: no label {l:?} (in {q})"));
            }
        }
        for l in &u.by_labels {
            let has = u.metrics.iter().any(|m| {
                exported
                    .samples
                    .get(m)
                    .is_some_and(|ls| ls.contains(l.as_str()))
            });
            if !has && !SCRAPE_LABELS.contains(&l.as_str()) {
                wrong.push(format!("by ({l}): on none of its metrics (in {q})"));
            }
        }
    }
    wrong
}

/// The README's metric table: name → type (`| `a`, `b` | counter | ...`).
fn readme_metrics() -> BTreeMap<String, String> {
    let readme =
        std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("README.md")).unwrap();
    let mut out = BTreeMap::new();
    for line in readme.lines().filter(|l| l.starts_with("| `entrepot_")) {
        let cells: Vec<&str> = line.split('|').map(str::trim).collect();
        let kind = cells[2];
        if !["counter", "gauge", "histogram"].contains(&kind) {
            continue; // the replicas' "What to watch" table: healthy / otherwise
        }
        for name in cells[1].split(',') {
            out.insert(name.trim().trim_matches('`').to_string(), kind.to_string());
        }
    }
    assert!(out.len() > 10, "no metric table in README.md: {out:?}");
    out
}

#[test]
fn the_dashboard_takes_its_data_source_as_an_input_and_names_no_uid() {
    let dash = dashboard();
    let version = dash["schemaVersion"].as_u64().expect("schemaVersion");
    assert!((36..=41).contains(&version), "schemaVersion {version}");
    let inputs = dash["__inputs"].as_array().expect("__inputs");
    assert!(
        inputs
            .iter()
            .any(|i| i["name"] == "DS_PROMETHEUS" && i["pluginId"] == "prometheus"),
        "{inputs:?}"
    );
    // Provisioned from a file (no import step fills the input in), the variable of the same
    // name picks the data source.
    let vars = dash["templating"]["list"].as_array().expect("templating");
    assert!(
        vars.iter()
            .any(|v| v["name"] == "DS_PROMETHEUS" && v["type"] == "datasource"),
        "{vars:?}"
    );
    // Every data source reference anywhere is the input: a uid of ours would not exist at
    // the operator's Grafana.
    fn walk(v: &Value, at: &str, refs: &mut Vec<(String, Value)>) {
        match v {
            Value::Object(m) => {
                for (k, x) in m {
                    if k == "datasource" {
                        refs.push((at.to_string(), x.clone()));
                    }
                    walk(x, &format!("{at}.{k}"), refs);
                }
            }
            Value::Array(a) => a
                .iter()
                .enumerate()
                .for_each(|(i, x)| walk(x, &format!("{at}[{i}]"), refs)),
            _ => {}
        }
    }
    let mut refs = Vec::new();
    walk(&dash, "", &mut refs);
    assert!(refs.len() > 20, "{refs:?}");
    for (at, r) in refs {
        assert_eq!(r["uid"], DATASOURCE, "{at}");
        assert_eq!(r["type"], "prometheus", "{at}");
    }
    let mut ids = BTreeSet::new();
    for p in panels(&dash) {
        assert!(ids.insert(p["id"].as_u64().unwrap()), "panel id twice: {p}");
        let g = &p["gridPos"];
        let (x, w) = (g["x"].as_u64().unwrap(), g["w"].as_u64().unwrap());
        assert!(x + w <= 24, "wider than the grid: {}", p["title"]);
        if p["type"] != "row" {
            assert!(
                !p["targets"].as_array().unwrap().is_empty(),
                "{}",
                p["title"]
            );
        }
    }
}

#[test]
fn the_query_reader_finds_names_and_labels() {
    let u = uses(
        r#"sum by (upstream, le) (rate(entrepot_a_bucket{instance=~"$i",status!~"2..|4\"04"}[5m])) / label_values(entrepot_b, kind)"#,
    );
    assert_eq!(
        u.metrics,
        BTreeSet::from(["entrepot_a_bucket".into(), "entrepot_b".into()])
    );
    let labels: Vec<(String, String)> = u.selector_labels.into_iter().collect();
    assert_eq!(
        labels,
        [
            ("entrepot_a_bucket".to_string(), "instance".to_string()),
            ("entrepot_a_bucket".to_string(), "status".to_string()),
            ("entrepot_b".to_string(), "kind".to_string()),
        ]
    );
    assert_eq!(
        u.by_labels,
        BTreeSet::from(["upstream".into(), "le".into()])
    );
}

/// `n` layers of `size` bytes, at least two of them owned by each replica.
fn layers_owned_by_each(replicas: &[cluster::Replica], size: usize) -> Vec<Bytes> {
    let mut by_owner: [Vec<Bytes>; 2] = Default::default();
    for seed in 1000.. {
        let data = Bytes::from(random_bytes(size, seed));
        let owner = owner_of(replicas, &sha256_digest(&data));
        if by_owner[owner].len() < 2 {
            by_owner[owner].push(data);
        }
        if by_owner.iter().all(|v| v.len() == 2) {
            break;
        }
    }
    by_owner.concat()
}

async fn in_bucket(garage: &Garage, digest: &str) -> bool {
    let s3 = garage.s3_builder().build().unwrap();
    let key = ObjectPath::from(format!("blobs/{}", digest.replace(':', "/")));
    s3.head(&key).await.is_ok()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_metric_and_label_the_dashboard_uses_is_exported_and_in_the_readme() {
    let up = FakeRegistry::start().await;
    up.add_response_header("RateLimit-Remaining", "97;w=21600");
    let garage = Garage::start().await.unwrap();
    let work = tempfile::tempdir().unwrap();
    let unreachable = format!("http://127.0.0.1:{}", free_port());
    let upstreams = format!(
        "{}{}",
        upstream("fake", &up.url(), true, ""),
        upstream(
            "down.example",
            &unreachable,
            false,
            "connect_timeout = \"1s\""
        )
    );
    // A local tier smaller than the layers each replica fetches itself (the two it owns):
    // committing them evicts. A blob still being uploaded is in use and kept: the next sweep
    // (every second here) evicts it.
    let storage = cluster::s3_storage(
        &garage,
        "max_size = \"100000\"\nsweep_interval = \"1s\"",
        "",
    );
    let addrs = cluster::addresses(2);
    let mut replicas = static_cluster(work.path(), &addrs, &storage, &upstreams, "").unwrap();
    let layers = layers_owned_by_each(&replicas, 60_000);
    let img = up.push_image("team/app", "v1", &layers);
    start_all(&mut replicas).await.unwrap();
    wait_peers_healthy(&replicas, 1).await.unwrap();
    let c = client();
    let blob = |r: usize, d: &str| format!("{}/v2/team/app/blobs/{d}", replicas[r].url());

    // Through replica 0: misses; replica 1's layers are forwarded to it. Then hits.
    let manifest = c
        .get(format!("{}/v2/team/app/manifests/v1", replicas[0].url()))
        .header("Accept", common::OCI_MANIFEST)
        .send()
        .await
        .unwrap();
    assert_eq!(manifest.status(), 200);
    for round in 0..2 {
        for d in img.layers.iter().chain([&img.config]) {
            get_blob(&c, &blob(0, d), d)
                .await
                .unwrap_or_else(|e| panic!("round {round}: {e:#}"));
        }
    }
    // Through replica 1, replica 0's layers once they are in the bucket: bucket fills.
    let own0: Vec<&String> = img
        .layers
        .iter()
        .filter(|d| owner_of(&replicas, d) == 0)
        .collect();
    for d in &own0 {
        common::eventually(Duration::from_secs(30), "the upload", || {
            in_bucket(&garage, d.as_str())
        })
        .await;
        get_blob(&c, &blob(1, d), d).await.unwrap();
    }
    // An unreachable upstream behind a forward: both replicas fail to reach it, replica 0
    // counts the failed forward as a fallback.
    let missing = (0u64..)
        .map(|i| sha256_digest(&i.to_le_bytes()))
        .find(|d| owner_of(&replicas, d) == 1)
        .unwrap();
    let down = c
        .get(format!(
            "{}/v2/down.example/team/app/blobs/{missing}",
            replicas[0].url()
        ))
        .send()
        .await
        .unwrap();
    assert!(down.status().is_server_error(), "{}", down.status());
    common::eventually(Duration::from_secs(20), "an eviction", || async {
        replicas[0]
            .metric("entrepot_evictions_total")
            .await
            .unwrap_or(0.0)
            > 0.0
    })
    .await;

    let mut exported = Exported::default();
    for r in &replicas {
        let page = c
            .get(format!("{}/metrics", r.url()))
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
        exported.add(&page);
    }
    let dash = dashboard();
    let queries = queries(&dash);
    let wrong = not_exported(&queries, &exported);
    assert!(
        wrong.is_empty(),
        "the dashboard asks for what entrepot does not export:\n{}\nexported: {:#?}",
        wrong.join("\n"),
        exported.samples
    );
    // The check bites: a misspelt name and a misspelt label are reported.
    let typos = [
        "rate(entrepot_request_total[5m])".to_string(),
        "entrepot_requests_total{outcom=\"hit\"}".to_string(),
    ];
    assert_eq!(not_exported(&typos, &exported).len(), 2);

    let readme = readme_metrics();
    for q in &queries {
        for m in uses(q).metrics {
            let family = exported.family(&m);
            assert!(
                readme.contains_key(family),
                "{family} missing from README.md"
            );
        }
    }
    for (name, kind) in &exported.types {
        if name.starts_with("entrepot_") {
            assert_eq!(
                readme.get(name),
                Some(kind),
                "README.md's metric table on {name}"
            );
        }
    }
}
