//! `deploy/kubernetes/`: every manifest parses, the configuration its ConfigMap carries is one the
//! real `entrepot check-config` accepts, and the names, paths and ports that tie the ConfigMap,
//! the Secret, the Deployment, the two Services and containerd's `hosts.toml` together agree.
//! Nothing here needs a Kubernetes cluster: these are the mistakes a cluster would only show
//! as pods that do not start, probes that fail or replicas that never find each other.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::Duration;

use serde::Deserialize as _;
use serde_json::Value;

/// The namespace `namespace.yaml` creates and every other object lives in.
const NAMESPACE: &str = "entrepot";

fn deploy_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy/kubernetes")
}

/// One YAML document of a manifest file.
struct Doc {
    file: String,
    value: Value,
}

impl Doc {
    fn kind(&self) -> &str {
        self.value["kind"].as_str().unwrap_or_default()
    }

    fn name(&self) -> &str {
        self.value["metadata"]["name"].as_str().unwrap_or_default()
    }
}

/// Every document of every `deploy/kubernetes/*.yaml`, file by file in name order.
fn manifests() -> Vec<Doc> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(deploy_dir())
        .expect("deploy/kubernetes exists")
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|x| x == "yaml" || x == "yml"))
        .collect();
    files.sort();
    let mut docs = Vec::new();
    for path in files {
        let file = path.file_name().unwrap().to_string_lossy().into_owned();
        let text = std::fs::read_to_string(&path).unwrap();
        for (i, doc) in serde_yaml_ng::Deserializer::from_str(&text).enumerate() {
            let value = Value::deserialize(doc)
                .unwrap_or_else(|e| panic!("{file}: document {i} is not valid YAML: {e}"));
            assert!(!value.is_null(), "{file}: document {i} is empty");
            docs.push(Doc {
                file: file.clone(),
                value,
            });
        }
    }
    docs
}

fn find<'a>(docs: &'a [Doc], kind: &str, name: &str) -> &'a Value {
    let found: Vec<&Doc> = docs
        .iter()
        .filter(|d| d.kind() == kind && d.name() == name)
        .collect();
    assert_eq!(found.len(), 1, "expected exactly one {kind} {name:?}");
    &found[0].value
}

fn only<'a>(docs: &'a [Doc], kind: &str) -> &'a Value {
    let found: Vec<&Doc> = docs.iter().filter(|d| d.kind() == kind).collect();
    assert_eq!(found.len(), 1, "expected exactly one {kind}");
    &found[0].value
}

fn str_of<'a>(v: &'a Value, what: &str) -> &'a str {
    v.as_str()
        .unwrap_or_else(|| panic!("{what} is not a string: {v}"))
}

fn array_of<'a>(v: &'a Value, what: &str) -> &'a Vec<Value> {
    v.as_array()
        .unwrap_or_else(|| panic!("{what} is not a list: {v}"))
}

fn deployment(docs: &[Doc]) -> &Value {
    only(docs, "Deployment")
}

/// The Deployment's one container.
fn container(docs: &[Doc]) -> &Value {
    let containers = array_of(
        &deployment(docs)["spec"]["template"]["spec"]["containers"],
        "containers",
    );
    assert_eq!(containers.len(), 1, "one container per pod");
    &containers[0]
}

fn pod_spec(docs: &[Doc]) -> &Value {
    &deployment(docs)["spec"]["template"]["spec"]
}

/// The ConfigMap the Deployment mounts its configuration from, and the key holding it.
const CONFIG_MAP: &str = "entrepot-config";
const CONFIG_KEY: &str = "entrepot.toml";

/// The ConfigMap's `entrepot.toml`, as shipped.
fn config_text(docs: &[Doc]) -> String {
    str_of(
        &find(docs, "ConfigMap", CONFIG_MAP)["data"][CONFIG_KEY],
        "the ConfigMap's entrepot.toml",
    )
    .to_string()
}

fn config(docs: &[Doc]) -> toml::Table {
    config_text(docs)
        .parse()
        .expect("the ConfigMap's entrepot.toml is TOML")
}

fn config_str<'a>(config: &'a toml::Table, section: &str, key: &str) -> &'a str {
    config[section][key]
        .as_str()
        .unwrap_or_else(|| panic!("[{section}] {key} is not a string"))
}

fn config_addr(config: &toml::Table, key: &str) -> SocketAddr {
    config_str(config, "server", key)
        .parse()
        .unwrap_or_else(|e| panic!("[server] {key}: {e}"))
}

/// A container port given by number or by name.
fn container_port(container: &Value, port: &Value) -> u16 {
    if let Some(n) = port.as_u64() {
        return u16::try_from(n).unwrap();
    }
    let name = str_of(port, "a port reference");
    let found = array_of(&container["ports"], "container ports")
        .iter()
        .find(|p| p["name"] == name)
        .unwrap_or_else(|| panic!("the container has no port named {name:?}"));
    u16::try_from(found["containerPort"].as_u64().unwrap()).unwrap()
}

/// The keys a ConfigMap or Secret holds.
fn keys_of(object: &Value) -> Vec<String> {
    ["data", "stringData"]
        .iter()
        .filter_map(|field| object[field].as_object())
        .flat_map(|m| m.keys().cloned())
        .collect()
}

/// Where a ConfigMap or Secret key shows up as a file in the container.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Source {
    kind: &'static str,
    name: String,
    key: String,
}

/// Every file the container sees from a ConfigMap or Secret volume: path → (kind, name, key).
fn mounted_files(docs: &[Doc]) -> BTreeMap<PathBuf, Source> {
    let spec = pod_spec(docs);
    let volumes = array_of(&spec["volumes"], "volumes");
    let mut files = BTreeMap::new();
    for mount in array_of(&container(docs)["volumeMounts"], "volumeMounts") {
        let mount_path = PathBuf::from(str_of(&mount["mountPath"], "mountPath"));
        let volume = volumes
            .iter()
            .find(|v| v["name"] == mount["name"])
            .unwrap_or_else(|| panic!("volumeMount {} names no volume", mount["name"]));
        let (kind, name, object) = if volume["configMap"].is_object() {
            let name = str_of(&volume["configMap"]["name"], "configMap.name");
            ("ConfigMap", name, find(docs, "ConfigMap", name))
        } else if volume["secret"].is_object() {
            let name = str_of(&volume["secret"]["secretName"], "secret.secretName");
            ("Secret", name, find(docs, "Secret", name))
        } else {
            continue;
        };
        let source = if kind == "ConfigMap" {
            &volume["configMap"]
        } else {
            &volume["secret"]
        };
        // key → file name inside the volume: the items, or every key under its own name.
        let items: Vec<(String, String)> = match source["items"].as_array() {
            Some(items) => items
                .iter()
                .map(|i| {
                    (
                        str_of(&i["key"], "items[].key").to_string(),
                        str_of(&i["path"], "items[].path").to_string(),
                    )
                })
                .collect(),
            None => keys_of(object)
                .into_iter()
                .map(|k| (k.clone(), k))
                .collect(),
        };
        let held = keys_of(object);
        for (key, path) in items {
            assert!(
                held.contains(&key),
                "{kind} {name} has no key {key:?} (it has {held:?})"
            );
            let file = match mount["subPath"].as_str() {
                Some(sub) if sub == path => mount_path.clone(),
                Some(_) => continue,
                None => mount_path.join(&path),
            };
            let source = Source {
                kind,
                name: name.to_string(),
                key,
            };
            files.insert(file, source);
        }
    }
    files
}

/// A Kubernetes quantity like `12Gi` in bytes (binary suffixes and plain numbers only).
fn quantity_bytes(q: &str) -> u64 {
    for (suffix, shift) in [("Ki", 10), ("Mi", 20), ("Gi", 30), ("Ti", 40)] {
        if let Some(n) = q.strip_suffix(suffix) {
            return n.parse::<u64>().unwrap() << shift;
        }
    }
    q.parse()
        .unwrap_or_else(|_| panic!("{q:?} is not a quantity these tests read"))
}

/// Runs the real `entrepot check-config` on `text` with `cluster_secret` as the content of the
/// cluster's `secret_file` (the path the ConfigMap names is rewritten to a temporary file), and
/// the S3 keys set in the environment as the Deployment sets them.
fn check_config(text: &str, secret_path: &str, cluster_secret: &str) -> Output {
    let dir = tempfile::tempdir().unwrap();
    let secret_file = dir.path().join("cluster-secret");
    std::fs::write(&secret_file, format!("{cluster_secret}\n")).unwrap();
    assert_eq!(
        text.matches(secret_path).count(),
        1,
        "the secret_file path appears once in entrepot.toml"
    );
    let rewritten = text.replace(secret_path, secret_file.to_str().unwrap());
    let config = dir.path().join("entrepot.toml");
    std::fs::write(&config, rewritten).unwrap();
    Command::new(env!("CARGO_BIN_EXE_entrepot"))
        .arg("check-config")
        .arg(&config)
        .env("AWS_ACCESS_KEY_ID", "GK31c2f218a2e44f485b94239e")
        .env(
            "AWS_SECRET_ACCESS_KEY",
            "b892c0665f0ada8a4755dae98baa3b133590e11dae3bcc1f9d769d67f16c3835",
        )
        .output()
        .expect("entrepot runs")
}

fn describe(out: &Output) -> String {
    format!(
        "{}\nstdout:\n{}\nstderr:\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

#[test]
fn every_manifest_document_parses_and_has_api_version_kind_and_name() {
    let docs = manifests();
    for d in &docs {
        for (field, v) in [
            ("apiVersion", &d.value["apiVersion"]),
            ("kind", &d.value["kind"]),
            ("metadata.name", &d.value["metadata"]["name"]),
        ] {
            assert!(
                v.as_str().is_some_and(|s| !s.is_empty()),
                "{}: a document has no {field}",
                d.file
            );
        }
    }
    let mut kinds: Vec<&str> = docs.iter().map(Doc::kind).collect();
    kinds.sort_unstable();
    assert_eq!(
        kinds,
        [
            "ConfigMap",
            "Deployment",
            "Namespace",
            "PodDisruptionBudget",
            "Secret",
            "Service",
            "Service"
        ]
    );
}

#[test]
fn every_object_lives_in_the_namespace_that_namespace_yaml_creates() {
    let docs = manifests();
    assert_eq!(only(&docs, "Namespace")["metadata"]["name"], NAMESPACE);
    for d in docs.iter().filter(|d| d.kind() != "Namespace") {
        assert_eq!(
            d.value["metadata"]["namespace"],
            NAMESPACE,
            "{}: {} {}",
            d.file,
            d.kind(),
            d.name()
        );
    }
}

#[test]
fn the_configmap_configuration_passes_check_config() {
    let docs = manifests();
    let config = config(&docs);
    let out = check_config(
        &config_text(&docs),
        config_str(&config, "cluster", "secret_file"),
        "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08",
    );
    assert!(out.status.success(), "{}", describe(&out));
    // Several replicas on one bucket, finding each other by DNS.
    assert_eq!(config_str(&config, "storage", "backend"), "s3");
    assert!(config["cluster"].get("peers_dns").is_some());
    assert!(
        config["cluster"].get("advertise").is_none(),
        "pod addresses change: replicas recognise themselves instead"
    );
}

#[test]
fn the_placeholder_cluster_secret_is_refused_so_it_cannot_ship_unchanged() {
    let docs = manifests();
    let config = config(&docs);
    let placeholder = str_of(
        &find(&docs, "Secret", "entrepot")["stringData"]["cluster-secret"],
        "stringData.cluster-secret",
    );
    let out = check_config(
        &config_text(&docs),
        config_str(&config, "cluster", "secret_file"),
        placeholder,
    );
    assert!(!out.status.success(), "{}", describe(&out));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("cluster.secret_file") && stderr.contains("at least 16"),
        "{}",
        describe(&out)
    );
}

#[test]
fn the_deployment_mounts_the_configmap_and_the_cluster_secret_where_entrepot_reads_them() {
    let docs = manifests();
    let config = config(&docs);
    let files = mounted_files(&docs);

    // `serve --config <path>` reads the ConfigMap's entrepot.toml.
    let args: Vec<&str> = array_of(&container(&docs)["args"], "args")
        .iter()
        .map(|a| str_of(a, "an arg"))
        .collect();
    let at = args
        .iter()
        .position(|a| *a == "--config")
        .expect("serve --config");
    assert!(args.contains(&"serve"));
    assert_eq!(
        files.get(Path::new(args[at + 1])),
        Some(&Source {
            kind: "ConfigMap",
            name: CONFIG_MAP.into(),
            key: CONFIG_KEY.into()
        }),
        "--config {} is not the ConfigMap's key (mounted: {files:?})",
        args[at + 1]
    );

    // [cluster] secret_file is the Secret's cluster-secret.
    let secret_file = config_str(&config, "cluster", "secret_file");
    assert_eq!(
        files.get(Path::new(secret_file)),
        Some(&Source {
            kind: "Secret",
            name: "entrepot".into(),
            key: "cluster-secret".into()
        }),
        "secret_file {secret_file} is not the Secret's cluster-secret (mounted: {files:?})"
    );

    // No S3 keys in the file: they come from the Secret as the variables entrepot reads.
    let s3 = config["storage"]["s3"].as_table().expect("[storage.s3]");
    assert!(s3.get("access_key_id").is_none() && s3.get("secret_access_key").is_none());
    let secret = find(&docs, "Secret", "entrepot");
    let env = array_of(&container(&docs)["env"], "env");
    for var in ["AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"] {
        let e = env
            .iter()
            .find(|e| e["name"] == var)
            .unwrap_or_else(|| panic!("the container does not set {var}"));
        let from = &e["valueFrom"]["secretKeyRef"];
        assert_eq!(from["name"], "entrepot", "{var}");
        let key = str_of(&from["key"], "secretKeyRef.key");
        assert!(
            keys_of(secret).iter().any(|k| k == key),
            "{var}: no key {key}"
        );
    }
}

#[test]
fn the_local_tier_is_an_emptydir_larger_than_its_max_size() {
    let docs = manifests();
    let config = config(&docs);
    let root = config_str(&config, "storage", "root");
    let mount = array_of(&container(&docs)["volumeMounts"], "volumeMounts")
        .iter()
        .find(|m| m["mountPath"] == root)
        .unwrap_or_else(|| panic!("[storage] root {root} is not a volume mount"));
    assert!(mount["readOnly"] != true);
    let volume = array_of(&pod_spec(&docs)["volumes"], "volumes")
        .iter()
        .find(|v| v["name"] == mount["name"])
        .unwrap();
    let limit = quantity_bytes(str_of(
        &volume["emptyDir"]["sizeLimit"],
        "the local tier's emptyDir.sizeLimit",
    ));
    let max_size = entrepot::config::parse_size(config_str(&config, "storage", "max_size"))
        .expect("[storage] max_size is a size");
    assert!(
        max_size < limit,
        "[storage] max_size ({max_size}) must leave room in the emptyDir ({limit}) for fills"
    );
}

#[test]
fn the_container_ports_are_the_listen_and_admin_listen_ports() {
    let docs = manifests();
    let config = config(&docs);
    let c = container(&docs);
    let listen = config_addr(&config, "listen");
    let admin = config_addr(&config, "admin_listen");
    assert_ne!(listen.port(), admin.port());
    // Both answer on the pod's address: the kubelet probes it, peers and Services connect to it.
    assert!(listen.ip().is_unspecified(), "listen {listen}");
    assert!(admin.ip().is_unspecified(), "admin_listen {admin}");
    assert_eq!(container_port(c, &Value::from("http")), listen.port());
    assert_eq!(container_port(c, &Value::from("admin")), admin.port());
}

#[test]
fn the_probes_ask_the_admin_listener_for_readyz_and_healthz() {
    let docs = manifests();
    let admin = config_addr(&config(&docs), "admin_listen");
    let c = container(&docs);
    for (probe, path) in [("readinessProbe", "/readyz"), ("livenessProbe", "/healthz")] {
        let get = &c[probe]["httpGet"];
        assert_eq!(get["path"], path, "{probe}");
        assert_eq!(container_port(c, &get["port"]), admin.port(), "{probe}");
    }
}

#[test]
fn termination_grace_outlasts_shutdown_grace() {
    let docs = manifests();
    let grace = humantime::parse_duration(config_str(&config(&docs), "server", "shutdown_grace"))
        .expect("[server] shutdown_grace is a duration");
    let termination = pod_spec(&docs)["terminationGracePeriodSeconds"]
        .as_u64()
        .expect("terminationGracePeriodSeconds");
    assert!(
        Duration::from_secs(termination) > grace,
        "the kubelet kills the pod ({termination}s) before fills may finish ({grace:?})"
    );
}

#[test]
fn the_pods_run_as_non_root_on_a_read_only_root_filesystem() {
    let docs = manifests();
    assert_eq!(pod_spec(&docs)["securityContext"]["runAsNonRoot"], true);
    let sc = &container(&docs)["securityContext"];
    assert_eq!(sc["readOnlyRootFilesystem"], true);
    assert_eq!(sc["allowPrivilegeEscalation"], false);
    assert_eq!(sc["capabilities"]["drop"], serde_json::json!(["ALL"]));
    let requests = &container(&docs)["resources"]["requests"];
    assert!(requests["cpu"].is_string() && requests["memory"].is_string());
}

#[test]
fn several_replicas_run_and_a_disruption_budget_keeps_the_others_up() {
    let docs = manifests();
    let d = deployment(&docs);
    assert_eq!(d["spec"]["replicas"], 3);
    let labels = &d["spec"]["template"]["metadata"]["labels"];
    assert_eq!(d["spec"]["selector"]["matchLabels"], *labels);
    let pdb = only(&docs, "PodDisruptionBudget");
    assert_eq!(pdb["spec"]["selector"]["matchLabels"], *labels);
    assert_eq!(pdb["spec"]["maxUnavailable"], 1);
}

/// The Services, each checked to select the Deployment's pods and to reach `port_name` on them.
fn services(docs: &[Doc]) -> Vec<&Value> {
    let labels = deployment(docs)["spec"]["template"]["metadata"]["labels"]
        .as_object()
        .unwrap();
    let services: Vec<&Value> = docs
        .iter()
        .filter(|d| d.kind() == "Service")
        .map(|d| &d.value)
        .collect();
    for s in &services {
        let selector = s["spec"]["selector"].as_object().expect("a selector");
        for (k, v) in selector {
            assert_eq!(
                labels.get(k),
                Some(v),
                "{}: selects other pods",
                s["metadata"]["name"]
            );
        }
    }
    services
}

/// The one port of a Service, and the container port it sends to.
fn service_port(docs: &[Doc], service: &Value) -> (u16, u16) {
    let ports = array_of(&service["spec"]["ports"], "Service ports");
    assert_eq!(ports.len(), 1);
    let port = u16::try_from(ports[0]["port"].as_u64().unwrap()).unwrap();
    let target = match &ports[0]["targetPort"] {
        Value::Null => port,
        t => container_port(container(docs), t),
    };
    (port, target)
}

#[test]
fn peers_dns_names_the_headless_service_at_the_port_replicas_listen_on() {
    let docs = manifests();
    let config = config(&docs);
    let services = services(&docs);
    let headless: Vec<&&Value> = services
        .iter()
        .filter(|s| s["spec"]["clusterIP"] == "None")
        .collect();
    assert_eq!(headless.len(), 1, "one headless Service");
    let peers = headless[0];
    // A pod joins the members once ready, and leaves when it is not.
    assert_eq!(peers["spec"]["publishNotReadyAddresses"], false);

    let peers_dns = config_str(&config, "cluster", "peers_dns");
    let (host, port) = peers_dns.rsplit_once(':').expect("name:port");
    let name = str_of(&peers["metadata"]["name"], "the headless Service's name");
    assert_eq!(host, format!("{name}.{NAMESPACE}.svc.cluster.local"));
    // The name resolves to pod addresses, which peers connect to directly: the port is the one
    // entrepot listens on, and the Service's own port says the same.
    let listen = config_addr(&config, "listen");
    let port: u16 = port.parse().unwrap();
    assert_eq!(port, listen.port());
    assert_eq!(service_port(&docs, peers), (port, listen.port()));
}

#[test]
fn the_client_service_sends_to_the_registry_listener() {
    let docs = manifests();
    let listen = config_addr(&config(&docs), "listen");
    let client = find(&docs, "Service", "entrepot");
    assert_eq!(client["spec"]["type"], "ClusterIP");
    assert!(client["spec"]["clusterIP"] != "None");
    assert!(services(&docs).contains(&client));
    assert_eq!(service_port(&docs, client).1, listen.port());
}

#[test]
fn hosts_toml_points_containerd_at_the_client_service_for_an_upstream_the_config_has() {
    let docs = manifests();
    let text = std::fs::read_to_string(deploy_dir().join("hosts.toml")).unwrap();
    let hosts: toml::Table = text.parse().expect("hosts.toml is TOML");
    assert_eq!(
        hosts["server"].as_str(),
        Some("https://registry-1.docker.io")
    );
    let mirrors = hosts["host"].as_table().expect("[host.\"...\"]");
    assert_eq!(mirrors.len(), 1);
    let (url, host) = mirrors.iter().next().unwrap();
    let url = url::Url::parse(url).expect("the host key is a URL");

    let client = find(&docs, "Service", "entrepot");
    assert_eq!(url.scheme(), "http");
    assert_eq!(
        url.host_str(),
        Some(format!("entrepot.{NAMESPACE}.svc.cluster.local").as_str())
    );
    assert_eq!(url.port(), Some(service_port(&docs, client).0));
    assert_eq!(url.path(), "/");
    let caps: Vec<&str> = host["capabilities"]
        .as_array()
        .expect("capabilities")
        .iter()
        .filter_map(|c| c.as_str())
        .collect();
    assert_eq!(caps, ["pull", "resolve"]);

    // containerd sends ?ns=docker.io (this file's folder): the configuration must have an
    // upstream of that name. check-config lists them, one `name<TAB>url` a line.
    let config = config(&docs);
    let out = check_config(
        &config_text(&docs),
        config_str(&config, "cluster", "secret_file"),
        "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08",
    );
    assert!(out.status.success(), "{}", describe(&out));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout
            .lines()
            .any(|l| l.split('\t').next() == Some("docker.io")),
        "{}",
        describe(&out)
    );
}
