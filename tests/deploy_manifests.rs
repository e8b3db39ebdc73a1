//! The deployment files under `deploy/` agree with each other and with the code: ports, probes
//! and flags of every container, the Services in front of them, the Secrets and ConfigMaps they
//! mount, the run config in its ConfigMap (parsed by the coordinator's own parser), the Grafana
//! dashboard's series and the Dockerfile. Nothing here needs a cluster, a network or kubectl:
//! the files are read as they are, so a manifest that would only fail once applied (a probe on
//! a port nobody listens on, a token file no volume holds) fails here first.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use yaml_rust2::{Yaml, YamlLoader};

/// Every manifest's namespace; the run config and the worker's `--coordinator` name it too.
const NAMESPACE: &str = "distill";

/// The roles, by the `distill` subcommand a container runs.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Role {
    Teacher,
    Coordinator,
    Worker,
}

impl Role {
    const ALL: [Role; 3] = [Role::Teacher, Role::Coordinator, Role::Worker];

    fn subcommand(self) -> &'static str {
        match self {
            Role::Teacher => "teacher-server",
            Role::Coordinator => "coordinator",
            Role::Worker => "student-worker",
        }
    }

    /// The gRPC health service the role's server sets SERVING (see
    /// `health_service_names_are_the_ones_the_servers_report`); workers serve no gRPC.
    fn health_service(self) -> Option<&'static str> {
        match self {
            Role::Teacher => Some("distill.v1.Teacher"),
            Role::Coordinator => Some("distill.v1.Coordinator"),
            Role::Worker => None,
        }
    }
}

fn root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

fn read(rel: &str) -> String {
    let path = root().join(rel);
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("reading {}: {e}", path.display()))
}

/// One YAML document of a file under deploy/k8s.
struct Manifest {
    file: String,
    doc: Yaml,
}

impl Manifest {
    fn kind(&self) -> &str {
        self.doc["kind"].as_str().unwrap_or("")
    }

    fn name(&self) -> &str {
        self.doc["metadata"]["name"].as_str().unwrap_or("")
    }

    fn namespace(&self) -> &str {
        self.doc["metadata"]["namespace"]
            .as_str()
            .unwrap_or("default")
    }

    fn id(&self) -> String {
        format!("{}: {} {}", self.file, self.kind(), self.name())
    }
}

/// Every document of every YAML file in deploy/k8s, in file order.
fn manifests() -> Vec<Manifest> {
    let dir = root().join("deploy/k8s");
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("reading {}: {e}", dir.display()))
        .map(|e| e.unwrap().path())
        .filter(|p| matches!(p.extension().and_then(|x| x.to_str()), Some("yaml" | "yml")))
        .collect();
    files.sort();
    assert!(!files.is_empty(), "no YAML files in {}", dir.display());
    let mut out = Vec::new();
    for path in files {
        let file = path.strip_prefix(root()).unwrap().display().to_string();
        let text = std::fs::read_to_string(&path).unwrap();
        let docs = YamlLoader::load_from_str(&text)
            .unwrap_or_else(|e| panic!("{file}: not valid YAML: {e}"));
        for doc in docs {
            // An empty document, as between two `---`.
            if doc.is_null() || doc.is_badvalue() {
                continue;
            }
            assert!(
                doc["apiVersion"].as_str().is_some() && doc["kind"].as_str().is_some(),
                "{file}: a document without apiVersion or kind: {doc:?}"
            );
            assert!(
                doc["metadata"]["name"].as_str().is_some(),
                "{file}: a {} without metadata.name",
                doc["kind"].as_str().unwrap_or("")
            );
            out.push(Manifest {
                file: file.clone(),
                doc,
            });
        }
    }
    out
}

/// A YAML scalar as the string Kubernetes would see (ports may be written either way).
fn scalar(y: &Yaml) -> Option<String> {
    match y {
        Yaml::String(s) | Yaml::Real(s) => Some(s.clone()),
        Yaml::Integer(i) => Some(i.to_string()),
        Yaml::Boolean(b) => Some(b.to_string()),
        _ => None,
    }
}

fn string_map(y: &Yaml) -> BTreeMap<String, String> {
    y.as_hash()
        .map(|h| {
            h.iter()
                .filter_map(|(k, v)| Some((scalar(k)?, scalar(v)?)))
                .collect()
        })
        .unwrap_or_default()
}

fn list(y: &Yaml) -> &[Yaml] {
    y.as_vec().map(Vec::as_slice).unwrap_or(&[])
}

/// A pod template (or a bare Pod): what its labels select and what its containers are.
struct Workload<'a> {
    id: String,
    kind: &'a str,
    namespace: &'a str,
    controller: &'a Yaml,
    labels: BTreeMap<String, String>,
    annotations: BTreeMap<String, String>,
    pod: &'a Yaml,
    /// A StatefulSet's volumeClaimTemplates: volumes its mounts may name.
    claim_templates: Vec<String>,
}

fn workloads(ms: &[Manifest]) -> Vec<Workload<'_>> {
    ms.iter()
        .filter_map(|m| {
            let template = match m.kind() {
                "Deployment" | "StatefulSet" | "DaemonSet" | "ReplicaSet" | "Job" => {
                    &m.doc["spec"]["template"]
                }
                "CronJob" => &m.doc["spec"]["jobTemplate"]["spec"]["template"],
                "Pod" => &m.doc,
                _ => return None,
            };
            Some(Workload {
                id: m.id(),
                kind: m.kind(),
                namespace: m.namespace(),
                controller: &m.doc,
                labels: string_map(&template["metadata"]["labels"]),
                annotations: string_map(&template["metadata"]["annotations"]),
                pod: &template["spec"],
                claim_templates: list(&m.doc["spec"]["volumeClaimTemplates"])
                    .iter()
                    .filter_map(|t| t["metadata"]["name"].as_str().map(str::to_string))
                    .collect(),
            })
        })
        .collect()
}

struct Container<'a> {
    id: String,
    y: &'a Yaml,
    /// `command` and `args` together: the image's entrypoint is the distill binary.
    args: Vec<String>,
}

impl Container<'_> {
    fn role(&self) -> Option<Role> {
        self.args
            .iter()
            .find_map(|a| Role::ALL.into_iter().find(|r| r.subcommand() == a))
    }

    /// The value of `--name VALUE` or `--name=VALUE`.
    fn flag(&self, name: &str) -> Option<&str> {
        self.args.iter().enumerate().find_map(|(i, a)| {
            if a == name {
                Some(
                    self.args
                        .get(i + 1)
                        .unwrap_or_else(|| panic!("{}: {name} has no value", self.id))
                        .as_str(),
                )
            } else {
                a.strip_prefix(name)?.strip_prefix('=')
            }
        })
    }

    /// Every `--flag VALUE` pair (a flag followed by a non-flag).
    fn flags(&self) -> Vec<(&str, &str)> {
        self.args
            .windows(2)
            .filter(|w| w[0].starts_with("--") && !w[1].starts_with("--"))
            .map(|w| (w[0].as_str(), w[1].as_str()))
            .collect()
    }

    /// (name, containerPort) of every declared port.
    fn ports(&self) -> Vec<(Option<String>, i64)> {
        list(&self.y["ports"])
            .iter()
            .map(|p| {
                let port = p["containerPort"].as_i64().unwrap_or_else(|| {
                    panic!("{}: a port without an integer containerPort", self.id)
                });
                (p["name"].as_str().map(str::to_string), port)
            })
            .collect()
    }

    fn port_named(&self, name: &str) -> Option<i64> {
        self.ports()
            .into_iter()
            .find(|(n, _)| n.as_deref() == Some(name))
            .map(|(_, p)| p)
    }

    /// The containerPort a port reference (a number or a port name) designates.
    fn resolve_port(&self, port: &Yaml) -> Option<i64> {
        match port {
            Yaml::Integer(p) => self.ports().iter().find(|(_, c)| c == p).map(|(_, c)| *c),
            Yaml::String(name) => self.port_named(name),
            _ => None,
        }
    }
}

fn containers<'a>(w: &'a Workload<'a>) -> Vec<Container<'a>> {
    ["initContainers", "containers"]
        .iter()
        .flat_map(|k| list(&w.pod[*k]))
        .map(|c| {
            let args = list(&c["command"])
                .iter()
                .chain(list(&c["args"]))
                .map(|a| scalar(a).unwrap_or_default())
                .collect();
            Container {
                id: format!(
                    "{} container {}",
                    w.id,
                    c["name"].as_str().unwrap_or("<unnamed>")
                ),
                y: c,
                args,
            }
        })
        .collect()
}

/// The port of `HOST:PORT` (or a URL ending in one).
fn port_of(addr: &str, what: &str) -> i64 {
    addr.rsplit_once(':')
        .and_then(|(_, p)| p.trim_end_matches('/').parse().ok())
        .unwrap_or_else(|| panic!("{what}: `{addr}` has no :PORT"))
}

/// `scheme://HOST:PORT` split into its parts.
fn split_url<'u>(url: &'u str, what: &str) -> (&'u str, &'u str, i64) {
    let (scheme, rest) = url
        .split_once("://")
        .unwrap_or_else(|| panic!("{what}: `{url}` has no scheme://"));
    let rest = rest.trim_end_matches('/');
    let (host, _) = rest
        .rsplit_once(':')
        .unwrap_or_else(|| panic!("{what}: `{url}` has no :PORT"));
    (scheme, host, port_of(rest, what))
}

/// Whether every label the selector asks for is on the pod template.
fn selects(selector: &BTreeMap<String, String>, labels: &BTreeMap<String, String>) -> bool {
    !selector.is_empty() && selector.iter().all(|(k, v)| labels.get(k) == Some(v))
}

/// The Service a cluster DNS name (`SERVICE.NAMESPACE.svc.cluster.local`) designates.
fn service_for_host<'a>(ms: &'a [Manifest], host: &str, what: &str) -> &'a Manifest {
    let (svc, ns) = host
        .strip_suffix(".svc.cluster.local")
        .and_then(|s| s.split_once('.'))
        .unwrap_or_else(|| {
            panic!("{what}: `{host}` is not a Service's name, SERVICE.NAMESPACE.svc.cluster.local")
        });
    ms.iter()
        .find(|m| m.kind() == "Service" && m.name() == svc && m.namespace() == ns)
        .unwrap_or_else(|| panic!("{what}: `{host}` names Service {svc} in namespace {ns}, which deploy/k8s does not define"))
}

/// The workloads a Service's selector selects, in its namespace.
fn selected<'a>(svc: &Manifest, ws: &'a [Workload<'a>]) -> Vec<&'a Workload<'a>> {
    let selector = string_map(&svc.doc["spec"]["selector"]);
    ws.iter()
        .filter(|w| w.namespace == svc.namespace() && selects(&selector, &w.labels))
        .collect()
}

/// Checks that `host:port` reaches a container running `role` on the port it listens on, through
/// a Service port; returns the containers it reaches.
fn check_address_reaches<'a>(
    ms: &'a [Manifest],
    ws: &'a [Workload<'a>],
    host: &str,
    port: i64,
    role: Role,
    what: &str,
) -> Vec<Container<'a>> {
    let svc = service_for_host(ms, host, what);
    let ports: Vec<i64> = list(&svc.doc["spec"]["ports"])
        .iter()
        .filter_map(|p| p["port"].as_i64())
        .collect();
    assert!(
        ports.contains(&port),
        "{what}: port {port} is not a port of {} (its ports: {ports:?})",
        svc.id()
    );
    let mut reached = Vec::new();
    for w in selected(svc, ws) {
        let mut found = false;
        for c in containers(w) {
            if c.role() != Some(role) {
                continue;
            }
            found = true;
            let listen = c
                .flag("--listen")
                .unwrap_or_else(|| panic!("{}: no --listen", c.id));
            assert_eq!(
                port_of(listen, &c.id),
                port,
                "{what}: dials port {port}, but {} listens on {listen}",
                c.id
            );
            reached.push(c);
        }
        assert!(
            found,
            "{what}: {} selects {}, which runs no `{}`",
            svc.id(),
            w.id,
            role.subcommand()
        );
    }
    assert!(
        !reached.is_empty(),
        "{what}: {} selects no pod running `{}`",
        svc.id(),
        role.subcommand()
    );
    reached
}

/// Where a file inside a container comes from.
#[derive(Debug)]
enum Source {
    Secret {
        name: String,
        key: String,
    },
    ConfigMap {
        name: String,
        key: String,
    },
    /// Any other volume (a claim, an emptyDir); `writable` when neither the mount nor the
    /// volume is read-only.
    Volume {
        name: String,
        writable: bool,
    },
}

/// The volume `path` lies on in container `c`, or why it lies on none.
fn mounted(w: &Workload, c: &Container, path: &str) -> Result<Source, String> {
    let p = Path::new(path);
    if !p.is_absolute() {
        return Err(format!(
            "`{path}` is relative: it would depend on the working directory"
        ));
    }
    let mounts = list(&c.y["volumeMounts"]);
    let best = mounts
        .iter()
        .filter_map(|m| Some((m, m["mountPath"].as_str()?)))
        .filter(|(_, mp)| p.starts_with(mp))
        .max_by_key(|(_, mp)| mp.len());
    let Some((mount, mount_path)) = best else {
        let paths: Vec<_> = mounts
            .iter()
            .filter_map(|m| m["mountPath"].as_str())
            .collect();
        return Err(format!(
            "`{path}` lies under no volumeMount (the root filesystem is the image's; mounts: {paths:?})"
        ));
    };
    let name = mount["name"].as_str().unwrap_or_default().to_string();
    let rel = p.strip_prefix(mount_path).unwrap();
    let rel = match mount["subPath"].as_str() {
        Some(sub) => Path::new(sub).join(rel),
        None => rel.to_path_buf(),
    };
    let rel = rel.to_str().unwrap().to_string();
    let mount_ro = mount["readOnly"].as_bool().unwrap_or(false);
    if w.claim_templates.contains(&name) {
        return Ok(Source::Volume {
            name,
            writable: !mount_ro,
        });
    }
    let volume = list(&w.pod["volumes"])
        .iter()
        .find(|v| v["name"].as_str() == Some(name.as_str()))
        .ok_or_else(|| format!("volumeMount `{name}` names no volume of the pod"))?;
    let key_at = |src: &Yaml| -> Result<String, String> {
        match src["items"].as_vec() {
            Some(items) => items
                .iter()
                .find(|i| i["path"].as_str() == Some(rel.as_str()))
                .and_then(|i| i["key"].as_str().map(str::to_string))
                .ok_or_else(|| {
                    let paths: Vec<_> = items.iter().filter_map(|i| i["path"].as_str()).collect();
                    format!("volume `{name}` projects no file `{rel}` (its items: {paths:?})")
                }),
            None => Ok(rel.clone()),
        }
    };
    if !volume["secret"].is_badvalue() {
        let src = &volume["secret"];
        return Ok(Source::Secret {
            name: src["secretName"].as_str().unwrap_or_default().to_string(),
            key: key_at(src)?,
        });
    }
    if !volume["configMap"].is_badvalue() {
        let src = &volume["configMap"];
        return Ok(Source::ConfigMap {
            name: src["name"].as_str().unwrap_or_default().to_string(),
            key: key_at(src)?,
        });
    }
    let claim_ro = volume["persistentVolumeClaim"]["readOnly"]
        .as_bool()
        .unwrap_or(false);
    let storage =
        !volume["persistentVolumeClaim"].is_badvalue() || !volume["emptyDir"].is_badvalue();
    Ok(Source::Volume {
        name,
        writable: storage && !mount_ro && !claim_ro,
    })
}

/// Keys of every Secret or ConfigMap (`kind`), by (namespace, name).
fn defined_keys(ms: &[Manifest], kind: &str) -> BTreeMap<(String, String), BTreeSet<String>> {
    ms.iter()
        .filter(|m| m.kind() == kind)
        .map(|m| {
            let keys = ["data", "stringData", "binaryData"]
                .iter()
                .flat_map(|k| string_map(&m.doc[*k]).into_keys())
                .collect();
            ((m.namespace().to_string(), m.name().to_string()), keys)
        })
        .collect()
}

/// The text of key `key` of ConfigMap `name`.
fn config_map_value<'a>(ms: &'a [Manifest], ns: &str, name: &str, key: &str) -> &'a str {
    ms.iter()
        .find(|m| m.kind() == "ConfigMap" && m.name() == name && m.namespace() == ns)
        .and_then(|m| m.doc["data"][key].as_str())
        .unwrap_or_else(|| panic!("ConfigMap {ns}/{name} has no data key `{key}`"))
}

#[test]
fn every_resource_is_in_the_distill_namespace() {
    let ms = manifests();
    assert!(
        ms.iter()
            .any(|m| m.kind() == "Namespace" && m.name() == NAMESPACE),
        "deploy/k8s defines no Namespace `{NAMESPACE}`"
    );
    for m in ms.iter().filter(|m| m.kind() != "Namespace") {
        assert_eq!(
            m.doc["metadata"]["namespace"].as_str(),
            Some(NAMESPACE),
            "{}: not in namespace `{NAMESPACE}` (the DNS names in the run config and the \
             worker's --coordinator assume it)",
            m.id()
        );
    }
}

#[test]
fn probes_listen_flags_metrics_and_services_agree_with_container_ports() {
    let ms = manifests();
    let ws = workloads(&ms);
    let mut roles = BTreeSet::new();
    for w in &ws {
        let matches = string_map(&w.controller["spec"]["selector"]["matchLabels"]);
        if w.kind != "Job" && w.kind != "Pod" {
            assert!(
                selects(&matches, &w.labels),
                "{}: selector.matchLabels {matches:?} is not a subset of its template's labels {:?}",
                w.id,
                w.labels
            );
        }
        let mut metrics_ports = Vec::new();
        for c in containers(w) {
            let role = c.role();
            if let Some(r) = role {
                roles.insert(r.subcommand());
                assert_eq!(
                    c.flag("--log-format"),
                    Some("json"),
                    "{}: every role logs JSON (`--log-format json`) for the cluster's log collector",
                    c.id
                );
            }
            for kind in ["startupProbe", "readinessProbe", "livenessProbe"] {
                let probe = &c.y[kind];
                if probe.is_badvalue() {
                    continue;
                }
                let what = format!("{}: {kind}", c.id);
                if !probe["grpc"].is_badvalue() {
                    // The kubelet takes only a number for a gRPC probe's port.
                    let port = probe["grpc"]["port"]
                        .as_i64()
                        .unwrap_or_else(|| panic!("{what}: grpc.port must be a number"));
                    assert!(
                        c.ports().iter().any(|(_, p)| *p == port),
                        "{what}: probes port {port}, which is not among the container's ports {:?}",
                        c.ports()
                    );
                    let expected = role.and_then(Role::health_service).unwrap_or_else(|| {
                        panic!("{what}: a gRPC probe on a container with no gRPC server ({role:?})")
                    });
                    assert_eq!(
                        probe["grpc"]["service"].as_str(),
                        Some(expected),
                        "{what}: the server sets health service `{expected}` SERVING; any other name \
                         is answered NOT_FOUND and the probe never passes"
                    );
                } else {
                    let port = [&probe["httpGet"]["port"], &probe["tcpSocket"]["port"]]
                        .into_iter()
                        .find(|p| !p.is_badvalue())
                        .unwrap_or_else(|| panic!("{what}: neither grpc, httpGet nor tcpSocket"));
                    assert!(
                        c.resolve_port(port).is_some(),
                        "{what}: probes port {port:?}, which is not among the container's ports {:?}",
                        c.ports()
                    );
                }
            }
            if let Some(r) = role.filter(|r| r.health_service().is_some()) {
                assert!(
                    !c.y["readinessProbe"]["grpc"].is_badvalue(),
                    "{}: a {} needs a gRPC readiness probe: without one a pod is in its Service's \
                     DNS before it serves",
                    c.id,
                    r.subcommand()
                );
                let listen = c.flag("--listen").unwrap_or_else(|| {
                    panic!("{}: no --listen (the default is loopback only)", c.id)
                });
                assert_eq!(
                    Some(port_of(listen, &c.id)),
                    c.port_named("grpc"),
                    "{}: --listen {listen} is not its containerPort named `grpc`",
                    c.id
                );
            }
            if let Some(addr) = c.flag("--metrics-listen") {
                let port = port_of(addr, &c.id);
                assert_eq!(
                    Some(port),
                    c.port_named("metrics"),
                    "{}: --metrics-listen {addr} is not its containerPort named `metrics`",
                    c.id
                );
                metrics_ports.push(port);
            } else if role.is_some() {
                panic!(
                    "{}: no --metrics-listen: Prometheus would scrape nothing",
                    c.id
                );
            }
        }
        match w
            .annotations
            .get("prometheus.io/scrape")
            .map(String::as_str)
        {
            Some("true") => {
                let port: i64 = w
                    .annotations
                    .get("prometheus.io/port")
                    .and_then(|p| p.parse().ok())
                    .unwrap_or_else(|| {
                        panic!(
                            "{}: prometheus.io/scrape without a numeric prometheus.io/port",
                            w.id
                        )
                    });
                assert!(
                    metrics_ports.contains(&port),
                    "{}: prometheus.io/port is {port}, but its containers serve metrics on {metrics_ports:?}",
                    w.id
                );
                assert_eq!(
                    w.annotations.get("prometheus.io/path").map(String::as_str),
                    Some("/metrics"),
                    "{}: the metrics endpoint is /metrics",
                    w.id
                );
            }
            _ => assert!(
                metrics_ports.is_empty(),
                "{}: serves metrics but has no `prometheus.io/scrape: \"true\"` annotation",
                w.id
            ),
        }
    }
    for r in Role::ALL {
        assert!(
            roles.contains(r.subcommand()),
            "no workload in deploy/k8s runs `{}`",
            r.subcommand()
        );
    }

    for svc in ms.iter().filter(|m| m.kind() == "Service") {
        let pods = selected(svc, &ws);
        assert!(
            !pods.is_empty(),
            "{}: its selector {:?} selects no pod template in deploy/k8s",
            svc.id(),
            string_map(&svc.doc["spec"]["selector"])
        );
        for p in list(&svc.doc["spec"]["ports"]) {
            let port = p["port"]
                .as_i64()
                .unwrap_or_else(|| panic!("{}: a port without a number", svc.id()));
            let target = if p["targetPort"].is_badvalue() {
                &p["port"]
            } else {
                &p["targetPort"]
            };
            for w in &pods {
                let found: Vec<i64> = containers(w)
                    .iter()
                    .filter_map(|c| c.resolve_port(target))
                    .collect();
                assert!(
                    !found.is_empty(),
                    "{}: targetPort {target:?} is no container port of {}",
                    svc.id(),
                    w.id
                );
                // A headless Service does not translate ports, and the addresses in the run
                // config and --coordinator use the Service's: the two must be one number.
                assert!(
                    found.contains(&port),
                    "{}: port {port} leads to container port {found:?} of {}; keep them equal",
                    svc.id(),
                    w.id
                );
            }
        }
    }
}

#[test]
fn referenced_secrets_and_config_maps_exist_and_file_flags_lie_on_their_volumes() {
    let ms = manifests();
    let ws = workloads(&ms);
    let defined = [
        ("Secret", defined_keys(&ms, "Secret")),
        ("ConfigMap", defined_keys(&ms, "ConfigMap")),
    ];
    let check = |kind: &str, ns: &str, name: &str, key: Option<&str>, what: &str| {
        let defs = &defined.iter().find(|(k, _)| *k == kind).unwrap().1;
        let keys = defs
            .get(&(ns.to_string(), name.to_string()))
            .unwrap_or_else(|| panic!("{what}: {kind} {ns}/{name} is not defined in deploy/k8s"));
        if let Some(key) = key {
            assert!(
                keys.contains(key),
                "{what}: {kind} {ns}/{name} has no key `{key}` (its keys: {keys:?})"
            );
        }
    };
    for w in &ws {
        let ns = w.namespace;
        for v in list(&w.pod["volumes"]) {
            let what = format!("{} volume {}", w.id, v["name"].as_str().unwrap_or(""));
            let mut sources = vec![
                ("Secret", &v["secret"], "secretName"),
                ("ConfigMap", &v["configMap"], "name"),
            ];
            for s in list(&v["projected"]["sources"]) {
                sources.push(("Secret", &s["secret"], "name"));
                sources.push(("ConfigMap", &s["configMap"], "name"));
            }
            for (kind, src, name_key) in sources {
                if src.is_badvalue() {
                    continue;
                }
                let name = src[name_key].as_str().unwrap_or_default();
                check(kind, ns, name, None, &what);
                for item in list(&src["items"]) {
                    check(kind, ns, name, item["key"].as_str(), &what);
                }
            }
        }
        for c in containers(w) {
            for e in list(&c.y["env"]) {
                let what = format!("{} env {}", c.id, e["name"].as_str().unwrap_or(""));
                for (kind, r) in [
                    ("Secret", &e["valueFrom"]["secretKeyRef"]),
                    ("ConfigMap", &e["valueFrom"]["configMapKeyRef"]),
                ] {
                    if !r.is_badvalue() {
                        let name = r["name"].as_str().unwrap_or_default();
                        check(kind, ns, name, r["key"].as_str(), &what);
                    }
                }
            }
            for e in list(&c.y["envFrom"]) {
                for (kind, r) in [
                    ("Secret", &e["secretRef"]),
                    ("ConfigMap", &e["configMapRef"]),
                ] {
                    if !r.is_badvalue() {
                        let name = r["name"].as_str().unwrap_or_default();
                        check(kind, ns, name, None, &format!("{} envFrom", c.id));
                    }
                }
            }
            for m in list(&c.y["volumeMounts"]) {
                let name = m["name"].as_str().unwrap_or_default();
                assert!(
                    w.claim_templates.iter().any(|t| t == name)
                        || list(&w.pod["volumes"])
                            .iter()
                            .any(|v| v["name"].as_str() == Some(name)),
                    "{}: volumeMount `{name}` names no volume",
                    c.id
                );
            }
            for (flag, path) in c.flags() {
                let is_file = matches!(flag, "--config" | "--model" | "--work-dir")
                    || flag.starts_with("--tls-")
                    || flag.ends_with("-token-file");
                if !is_file {
                    continue;
                }
                let what = format!("{}: {flag} {path}", c.id);
                match mounted(w, &c, path).unwrap_or_else(|e| panic!("{what}: {e}")) {
                    Source::Secret { name, key } => check("Secret", ns, &name, Some(&key), &what),
                    Source::ConfigMap { name, key } => {
                        check("ConfigMap", ns, &name, Some(&key), &what)
                    }
                    Source::Volume { name, writable } => {
                        // The root filesystem is read-only: the worker writes its checkpoints
                        // into --work-dir.
                        if flag == "--work-dir" {
                            assert!(writable, "{what}: volume `{name}` is not writable");
                        }
                    }
                }
            }
        }
    }
}

/// The coordinator's container and its workload: exactly one in deploy/k8s.
fn coordinator<'a>(ws: &'a [Workload<'a>]) -> (&'a Workload<'a>, Container<'a>) {
    let mut found: Vec<_> = ws
        .iter()
        .flat_map(|w| containers(w).into_iter().map(move |c| (w, c)))
        .filter(|(_, c)| c.role() == Some(Role::Coordinator))
        .collect();
    assert_eq!(
        found.len(),
        1,
        "deploy/k8s should run exactly one coordinator"
    );
    let (w, c) = found.pop().unwrap();
    assert_eq!(
        w.controller["spec"]["replicas"].as_i64().unwrap_or(1),
        1,
        "{}: a run has one coordinator (a second one is refused by coordinator.lock)",
        w.id
    );
    (w, c)
}

#[test]
fn the_run_config_parses_and_its_paths_and_teachers_are_in_the_manifests() {
    let ms = manifests();
    let ws = workloads(&ms);
    let (w, c) = coordinator(&ws);
    let path = c
        .flag("--config")
        .unwrap_or_else(|| panic!("{}: no --config", c.id));
    let Source::ConfigMap { name, key } =
        mounted(w, &c, path).unwrap_or_else(|e| panic!("{}: --config {path}: {e}", c.id))
    else {
        panic!("{}: --config {path} is not a file of a ConfigMap", c.id);
    };
    let text = config_map_value(&ms, w.namespace, &name, &key);
    let what = format!("the run config (ConfigMap {name}, key {key})");
    let cfg = coordinator::RunConfig::from_toml(text)
        .unwrap_or_else(|e| panic!("{what} does not parse: {e}"));

    // The config's directory is a read-only ConfigMap mount: a relative run_dir would land there.
    let run_dir = cfg.run_dir.to_str().unwrap();
    match mounted(w, &c, run_dir).unwrap_or_else(|e| panic!("{what}: run_dir {run_dir}: {e}")) {
        Source::Volume {
            name,
            writable: true,
        } => assert!(
            w.claim_templates.contains(&name),
            "{what}: run_dir {run_dir} is on volume `{name}`, not on a volumeClaimTemplate: the \
             run would not survive the pod"
        ),
        other => panic!("{what}: run_dir {run_dir} is not on a writable volume ({other:?})"),
    }
    if let Some((_, data)) = cfg
        .data
        .split_once(':')
        .filter(|(kind, _)| matches!(*kind, "mnist" | "safetensors"))
    {
        mounted(w, &c, data).unwrap_or_else(|e| panic!("{what}: data {}: {e}", cfg.data));
    }

    assert!(!cfg.members.is_empty(), "{what}: no [[members]]");
    for m in &cfg.members {
        for e in &m.endpoints {
            let what = format!("{what}: member `{}` endpoint {e}", m.name);
            let (scheme, host, port) = split_url(e, &what);
            if scheme == "dns" {
                let svc = service_for_host(&ms, host, &what);
                // Each address the name resolves to is taken as one replica: only a headless
                // Service resolves to the replicas rather than to one virtual IP.
                assert_eq!(
                    svc.doc["spec"]["clusterIP"].as_str(),
                    Some("None"),
                    "{what}: {} is not headless (clusterIP: None)",
                    svc.id()
                );
            }
            for t in check_address_reaches(&ms, &ws, host, port, Role::Teacher, &what) {
                assert_eq!(
                    t.flag("--member"),
                    Some(m.name.as_str()),
                    "{what}: reaches {}, which serves another member",
                    t.id
                );
            }
        }
    }

    // The run leases no batch before min_workers workers are in: more than the Job runs at once
    // and it never starts.
    let parallel: i64 = ws
        .iter()
        .filter(|w| w.kind == "Job" && containers(w).iter().any(|c| c.role() == Some(Role::Worker)))
        .map(|w| w.controller["spec"]["parallelism"].as_i64().unwrap_or(1))
        .sum();
    assert!(
        cfg.min_workers as i64 <= parallel,
        "{what}: min_workers = {}, but the worker Jobs run {parallel} pods at once",
        cfg.min_workers
    );
}

#[test]
fn workers_dial_the_coordinator_service() {
    let ms = manifests();
    let ws = workloads(&ms);
    let mut workers = 0;
    for w in &ws {
        for c in containers(w)
            .into_iter()
            .filter(|c| c.role() == Some(Role::Worker))
        {
            workers += 1;
            let url = c
                .flag("--coordinator")
                .unwrap_or_else(|| panic!("{}: no --coordinator", c.id));
            let what = format!("{}: --coordinator {url}", c.id);
            let (scheme, host, port) = split_url(url, &what);
            // The transport refuses an http:// address under TLS and an https:// one without.
            let expected = if c.flag("--tls-ca").is_some() {
                "https"
            } else {
                "http"
            };
            assert_eq!(
                scheme, expected,
                "{what}: with these TLS flags the scheme is {expected}"
            );
            check_address_reaches(&ms, &ws, host, port, Role::Coordinator, &what);
            assert!(
                list(&c.y["env"])
                    .iter()
                    .any(|e| e["name"].as_str() == Some("DISTILL_WORKER_ID"))
                    || c.flag("--worker-id").is_some(),
                "{}: no worker id: restarted pods would join as new workers",
                c.id
            );
        }
    }
    assert!(workers > 0, "no student-worker in deploy/k8s");
}

#[test]
fn health_service_names_are_the_ones_the_servers_report() {
    // tonic names a service `package.Service` from its .proto; the servers set these SERVING.
    for (role, proto, service, rust, server) in [
        (
            Role::Teacher,
            "proto/distill/v1/teacher.proto",
            "service Teacher {",
            "teacher-server/src/lib.rs",
            "set_serving::<TeacherServer<",
        ),
        (
            Role::Coordinator,
            "proto/distill/v1/coordinator.proto",
            "service Coordinator {",
            "coordinator/src/api/mod.rs",
            "set_serving::<CoordinatorServer<",
        ),
    ] {
        let name = role.health_service().unwrap();
        let (package, short) = name.rsplit_once('.').unwrap();
        let proto_text = read(proto);
        assert!(
            proto_text.contains(&format!("package {package};")) && proto_text.contains(service),
            "{proto} no longer declares `{service}` in package {package}: the health service \
             name `{name}` in this test and in deploy/k8s must follow"
        );
        assert!(
            service.contains(short),
            "{name} is not {service} of {proto}"
        );
        assert!(
            read(rust).contains(server),
            "{rust} no longer reports `{server}…>` SERVING: the probes in deploy/k8s ask for \
             `{name}`"
        );
    }
    // The names as the Rust sources spell them (their credential policies route on them).
    for (file, name) in [
        (
            "teacher-server/src/lib.rs",
            Role::Teacher.health_service().unwrap(),
        ),
        (
            "coordinator/src/security.rs",
            Role::Coordinator.health_service().unwrap(),
        ),
    ] {
        assert!(
            read(file).contains(&format!("/{name}/")),
            "{file} no longer mentions `/{name}/`: was the service renamed?"
        );
    }
}

/// Every series the roles export (the names are the dashboard's contract with the code).
const COUNTERS: &[&str] = &[
    "distill_teacher_requests_total",
    "distill_teacher_rows_total",
    "distill_teacher_rejections_total",
    "distill_coordinator_batches_leased_total",
    "distill_coordinator_batches_acked_total",
    "distill_coordinator_batches_requeued_total",
    "distill_coordinator_member_failures_total",
    "distill_coordinator_hedges_total",
    "distill_coordinator_degraded_batches_total",
    "distill_coordinator_student_wait_seconds_total",
    "distill_coordinator_rounds_total",
    "distill_worker_samples_total",
    "distill_worker_wait_seconds_total",
];
const GAUGES: &[&str] = &[
    "distill_teacher_queue_depth",
    "distill_coordinator_prefetch_depth",
    "distill_coordinator_replicas",
    "distill_worker_loss",
];
const HISTOGRAMS: &[&str] = &[
    "distill_teacher_batch_rows",
    "distill_teacher_request_seconds",
    "distill_coordinator_member_request_seconds",
    "distill_worker_step_seconds",
];

/// Every string under a key `expr` (targets), and every templating query.
fn queries(v: &serde_json::Value, out: &mut Vec<String>) {
    match v {
        serde_json::Value::Object(o) => {
            for (k, x) in o {
                match (k.as_str(), x) {
                    ("expr" | "definition", serde_json::Value::String(s)) => out.push(s.clone()),
                    _ => queries(x, out),
                }
            }
        }
        serde_json::Value::Array(a) => a.iter().for_each(|x| queries(x, out)),
        _ => {}
    }
}

/// (series as written, series without a histogram suffix, text before it) of each `distill_…`
/// name in a query.
fn series(expr: &str) -> Vec<(String, String, String)> {
    let mut out = Vec::new();
    let mut rest = expr;
    let mut offset = 0;
    while let Some(i) = rest.find("distill_") {
        let start = offset + i;
        let before = &expr[..start];
        let tail = &expr[start..];
        let len = tail
            .find(|c: char| !(c.is_ascii_lowercase() || c == '_'))
            .unwrap_or(tail.len());
        let name = &tail[..len];
        offset = start + len;
        rest = &expr[offset..];
        // Part of a longer identifier (a label name, say), not a series.
        if before
            .chars()
            .last()
            .is_some_and(|c| c.is_ascii_alphanumeric() || c == '_')
        {
            continue;
        }
        let base = ["_bucket", "_sum", "_count"]
            .iter()
            .find_map(|s| name.strip_suffix(s))
            .unwrap_or(name);
        out.push((name.to_string(), base.to_string(), before.to_string()));
    }
    out
}

#[test]
fn the_grafana_dashboard_queries_only_series_the_roles_export() {
    let text = read("deploy/grafana/distill.json");
    let dash: serde_json::Value = serde_json::from_str(&text)
        .unwrap_or_else(|e| panic!("deploy/grafana/distill.json is not JSON: {e}"));
    assert!(
        dash["schemaVersion"].as_i64().is_some_and(|v| v >= 36),
        "schemaVersion {:?}: too old for the panels used",
        dash["schemaVersion"]
    );
    let vars = dash["templating"]["list"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    assert!(
        vars.iter().any(|v| v["name"] == "datasource"
            && v["type"] == "datasource"
            && v["query"] == "prometheus"),
        "no `datasource` variable of type prometheus: the dashboard would be tied to one data source"
    );

    let mut exprs = Vec::new();
    queries(&dash, &mut exprs);
    assert!(!exprs.is_empty(), "the dashboard has no queries");
    let mut used = BTreeSet::new();
    for expr in &exprs {
        let found = series(expr);
        assert!(!found.is_empty(), "query `{expr}` reads no distill_ series");
        for (name, base, before) in found {
            let what = format!("query `{expr}`: `{name}`");
            let histogram = HISTOGRAMS.contains(&base.as_str());
            assert!(
                histogram || COUNTERS.contains(&base.as_str()) || GAUGES.contains(&base.as_str()),
                "{what} is not a series any role exports"
            );
            // A histogram exists only as its _bucket, _sum and _count series.
            assert_eq!(
                histogram,
                name != base,
                "{what}: the _bucket/_sum/_count suffixes belong to histograms, and only to them"
            );
            let in_rate = ["rate(", "increase(", "irate("]
                .iter()
                .any(|f| before.trim_end().ends_with(f));
            if COUNTERS.contains(&name.as_str()) || histogram {
                assert!(
                    in_rate || expr.starts_with("label_values("),
                    "{what}: a counter is only meaningful through rate() or increase()"
                );
            }
            if GAUGES.contains(&name.as_str()) {
                assert!(!in_rate, "{what}: rate() of a gauge");
            }
            if name.ends_with("_bucket") {
                assert!(
                    expr.contains("histogram_quantile(") && expr.contains("le"),
                    "{what}: buckets go through histogram_quantile(…, sum by (le…) (rate(…)))"
                );
            }
            used.insert(base);
        }
    }
    for s in COUNTERS.iter().chain(GAUGES).chain(HISTOGRAMS) {
        assert!(used.contains(*s), "no panel shows `{s}`");
    }

    // Every panel (rows' nested ones too) reads through the datasource variable.
    let mut panels: Vec<serde_json::Value> = dash["panels"].as_array().cloned().unwrap_or_default();
    let mut ids = BTreeSet::new();
    while let Some(p) = panels.pop() {
        panels.extend(p["panels"].as_array().cloned().unwrap_or_default());
        let id = p["id"]
            .as_i64()
            .unwrap_or_else(|| panic!("panel {} has no id", p["title"]));
        assert!(ids.insert(id), "panel id {id} is used twice");
        if p["type"] == "row" {
            continue;
        }
        for ds in std::iter::once(&p["datasource"]).chain(
            p["targets"]
                .as_array()
                .into_iter()
                .flatten()
                .map(|t| &t["datasource"]),
        ) {
            let uid = ds["uid"].as_str().unwrap_or_default();
            assert!(
                uid == "${datasource}" || uid == "${DS_PROMETHEUS}",
                "panel {}: data source {ds} is not the dashboard's variable",
                p["title"]
            );
        }
    }
}

#[test]
fn the_dockerfile_builds_only_the_binary_and_runs_it_unprivileged() {
    let text = read("deploy/Dockerfile");
    // Instructions, continuation lines joined, comments dropped.
    let mut lines = Vec::new();
    let mut current = String::new();
    for line in text.lines() {
        let t = line.trim();
        if t.starts_with('#') || (t.is_empty() && current.is_empty()) {
            continue;
        }
        match t.strip_suffix('\\') {
            Some(part) => {
                current.push_str(part);
                current.push(' ');
            }
            None => {
                current.push_str(t);
                lines.push(std::mem::take(&mut current));
            }
        }
    }
    let mut global_args = BTreeMap::new();
    let mut stages: Vec<(String, Option<String>, Vec<String>)> = Vec::new();
    for l in lines {
        let (op, rest) = l.split_once(' ').unwrap_or((l.as_str(), ""));
        let op = op.to_ascii_uppercase();
        if op == "FROM" {
            let words: Vec<&str> = rest.split_whitespace().collect();
            let image = words[0].to_string();
            let alias = words
                .iter()
                .position(|w| w.eq_ignore_ascii_case("as"))
                .map(|i| words[i + 1].to_string());
            stages.push((image, alias, Vec::new()));
        } else if let Some((_, _, body)) = stages.last_mut() {
            body.push(format!("{op} {}", rest.trim()));
        } else if op == "ARG" {
            let (k, v) = rest.split_once('=').unwrap_or((rest, ""));
            global_args.insert(k.trim().to_string(), v.trim().to_string());
        }
    }
    let image = |s: &str| -> String {
        match s.strip_prefix("${").and_then(|s| s.strip_suffix('}')) {
            Some(arg) => global_args
                .get(arg)
                .cloned()
                .unwrap_or_else(|| panic!("Dockerfile: FROM ${{{arg}}} with no ARG default")),
            None => s.to_string(),
        }
    };
    assert!(stages.len() >= 2, "Dockerfile: not a multi-stage build");

    let (builder_image, builder, body) = &stages[0];
    let builder = builder
        .as_deref()
        .expect("Dockerfile: the build stage has no name (FROM … AS builder)");
    let builder_image = image(builder_image);
    let rust = builder_image.strip_prefix("rust:").unwrap_or_else(|| {
        panic!("Dockerfile: the build stage is {builder_image}, not the official rust image")
    });
    let wanted = read("Cargo.toml")
        .lines()
        .find_map(|l| {
            l.strip_prefix("rust-version = \"")?
                .strip_suffix('"')
                .map(str::to_string)
        })
        .expect("Cargo.toml has no rust-version");
    let version = |v: &str| -> Vec<u32> {
        v.split(['.', '-'])
            .take(2)
            .map(|x| x.parse().unwrap_or(0))
            .collect()
    };
    assert!(
        version(rust) >= version(&wanted),
        "Dockerfile: {builder_image} is older than the workspace's rust-version {wanted}"
    );
    let build = body
        .iter()
        .find(|l| l.contains("cargo build"))
        .expect("Dockerfile: the build stage runs no cargo build");
    for part in [
        "--release",
        "--locked",
        "--bin distill",
        "--features \"$FEATURES\"",
    ] {
        assert!(build.contains(part), "Dockerfile: `{build}` lacks {part}");
    }
    assert!(
        body.iter().any(|l| l.starts_with("ARG FEATURES")),
        "Dockerfile: no ARG FEATURES in the build stage"
    );

    let (runtime, _, body) = stages.last().unwrap();
    let runtime = image(runtime);
    assert!(
        runtime.starts_with("debian:") && runtime.ends_with("-slim"),
        "Dockerfile: the runtime image is {runtime}, not a slim Debian"
    );
    let copies: Vec<&String> = body
        .iter()
        .filter(|l| l.starts_with("COPY ") || l.starts_with("ADD "))
        .collect();
    assert_eq!(
        copies.len(),
        1,
        "Dockerfile: the runtime stage should copy one file, the binary: {copies:?}"
    );
    let words: Vec<&str> = copies[0].split_whitespace().collect();
    assert_eq!(
        words.as_slice().first().copied(),
        Some("COPY"),
        "Dockerfile: {}",
        copies[0]
    );
    assert!(
        words.contains(&format!("--from={builder}").as_str()),
        "Dockerfile: `{}` does not copy from the build stage",
        copies[0]
    );
    let (src, dst) = (words[words.len() - 2], words[words.len() - 1]);
    assert!(
        src.ends_with("/distill") && dst == "/usr/local/bin/distill",
        "Dockerfile: `{}` should copy the distill binary, and only it, to /usr/local/bin/distill",
        copies[0]
    );
    let user = body
        .iter()
        .rev()
        .find_map(|l| l.strip_prefix("USER "))
        .expect("Dockerfile: the runtime stage has no USER: it would run as root");
    let uid = user.split(':').next().unwrap().trim();
    let uid: i64 = uid.parse().unwrap_or_else(|_| {
        panic!("Dockerfile: USER {user}: a numeric UID lets runAsNonRoot verify it")
    });
    assert!(uid > 0, "Dockerfile: USER {user} is root");
    assert!(
        body.iter()
            .any(|l| l == "ENTRYPOINT [\"/usr/local/bin/distill\"]"),
        "Dockerfile: the entrypoint is not the distill binary"
    );

    // The pods run as the image's user, and say so (runAsNonRoot needs a numeric UID).
    let ms = manifests();
    for w in workloads(&ms) {
        let sc = &w.pod["securityContext"];
        assert_eq!(
            sc["runAsNonRoot"].as_bool(),
            Some(true),
            "{}: no runAsNonRoot: true",
            w.id
        );
        assert_eq!(
            sc["runAsUser"].as_i64(),
            Some(uid),
            "{}: runAsUser is not the image's USER {uid}",
            w.id
        );
    }

    let ignore = read("deploy/Dockerfile.dockerignore");
    assert!(
        ignore.lines().any(|l| l.trim() == "target"),
        "deploy/Dockerfile.dockerignore does not keep target/ out of the build context"
    );
}
