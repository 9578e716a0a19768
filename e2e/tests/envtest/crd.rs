//! The CRD, the samples and the chart on the real API server: no warnings,
//! the server's own defaulting, bounds and CEL rules, printer columns.

use serde_json::Value;

use crate::cluster::{ApiServer, NAMESPACE, ok, repo_root, serial, warnings};

const CRD: &str = "crds/pingmesh.io_pingmeshes.yaml";

fn install_crd(api: &ApiServer) {
    let out = api.kubectl(&["apply", "-f", &repo_root().join(CRD).display().to_string()]);
    ok("kubectl apply the CRD", &out);
    assert_eq!(
        warnings(&out),
        Vec::<String>::new(),
        "the CRD draws warnings"
    );
    api.ok(&[
        "wait",
        "--for=condition=Established",
        "crd/pingmeshes.pingmesh.io",
        "--timeout=30s",
    ]);
}

fn mesh(name: &str, spec: &str) -> String {
    format!(
        "apiVersion: pingmesh.io/v1alpha1\nkind: PingMesh\nmetadata:\n  name: {name}\n  namespace: {NAMESPACE}\nspec:\n{spec}"
    )
}

/// Every leaf of `shown` that is not null, with its path.
fn leaves(shown: &Value, path: &str, out: &mut Vec<(String, Value)>) {
    match shown {
        Value::Object(map) => {
            for (k, v) in map {
                leaves(v, &format!("{path}.{k}"), out);
            }
        }
        Value::Null => {}
        other => out.push((path.to_owned(), other.clone())),
    }
}

fn at<'a>(v: &'a Value, path: &str) -> &'a Value {
    path.trim_start_matches('.')
        .split('.')
        .fold(v, |v, key| &v[key])
}

#[test]
#[ignore = "needs KUBEBUILDER_ASSETS (kube-apiserver, etcd): hack/envtest.sh"]
fn the_crd_installs_without_warnings_and_the_server_defaults_and_validates_pingmeshes() {
    let _serial = serial();
    let Some(api) = ApiServer::start() else {
        return;
    };
    install_crd(&api);
    api.ok(&["create", "namespace", NAMESPACE]);

    // The sample and every example, as the docs say to apply them.
    let mut samples = vec![repo_root().join("pingmesh.yaml")];
    let mut examples: Vec<_> = std::fs::read_dir(repo_root().join("docs/examples"))
        .expect("docs/examples")
        .map(|e| e.expect("entry").path())
        .filter(|p| p.extension().is_some_and(|e| e == "yaml"))
        .collect();
    examples.sort();
    assert!(!examples.is_empty());
    samples.extend(examples);
    for sample in &samples {
        let out = api.kubectl(&["apply", "-f", &sample.display().to_string()]);
        ok(&format!("kubectl apply -f {}", sample.display()), &out);
        assert_eq!(
            warnings(&out),
            Vec::<String>::new(),
            "{} draws warnings",
            sample.display()
        );
    }

    // The server fills in every default pingmesh.yaml shows.
    ok("an empty spec", &api.apply(&mesh("empty", "  {}\n")));
    let stored = api
        .get(&["pingmesh", "-n", NAMESPACE, "empty"])
        .expect("stored");
    let shown = yaml_file(&api, &repo_root().join("pingmesh.yaml"));
    let mut expected = Vec::new();
    leaves(&shown["spec"], "", &mut expected);
    assert!(expected.len() > 20, "{expected:?}");
    let differ: Vec<String> = expected
        .iter()
        .filter(|(path, value)| at(&stored["spec"], path) != value)
        .map(|(path, value)| {
            format!(
                "spec{path}: pingmesh.yaml shows {value}, the server defaults {}",
                at(&stored["spec"], path)
            )
        })
        .collect();
    assert!(differ.is_empty(), "{differ:#?}");

    // Printer columns.
    let table = api.ok(&["get", "pingmesh", "-n", NAMESPACE]);
    let header: Vec<&str> = table.lines().next().unwrap().split_whitespace().collect();
    assert_eq!(
        header,
        [
            "NAME",
            "TRANSPORT",
            "DESIRED",
            "READY",
            "ENDPOINTS",
            "FINDINGS",
            "AVAILABLE",
            "AGE"
        ]
    );
    assert!(table.contains("empty") && table.contains("auto"), "{table}");

    assert_refused(&api);
}

/// Bounds, enums, CEL rules and unknown fields are the server's to refuse.
fn assert_refused(api: &ApiServer) {
    let refused = [
        (
            "probeTimeoutMs not below windowMs (CEL)",
            "  probing:\n    windowMs: 5000\n    probeTimeoutMs: 5000\n",
            "probing.probeTimeoutMs must be shorter than probing.windowMs",
        ),
        (
            "windowMs under its minimum",
            "  probing:\n    windowMs: 999\n    probeTimeoutMs: 100\n",
            "spec.probing.windowMs: Invalid value",
        ),
        (
            "ecmpPaths 0",
            "  probing:\n    ecmpPaths: 0\n",
            "spec.probing.ecmpPaths: Invalid value",
        ),
        (
            "udpPort over 65535",
            "  agent:\n    udpPort: 70000\n",
            "spec.agent.udpPort: Invalid value",
        ),
        (
            "maxLossRatio over 1",
            "  sla:\n    maxLossRatio: 1.5\n",
            "spec.sla.maxLossRatio: Invalid value",
        ),
        (
            "an unknown transport",
            "  transport: tcp\n",
            "spec.transport: Unsupported value",
        ),
        (
            "devicePlugin without an extended resource name (CEL)",
            "  rdma:\n    deviceAccess: devicePlugin\n    devicePluginResource: nope\n",
            "rdma.devicePluginResource must name an extended resource",
        ),
        (
            "an unknown field",
            "  probing:\n    windowMillis: 5000\n",
            "unknown field \"spec.probing.windowMillis\"",
        ),
    ];
    let mut accepted = Vec::new();
    for (what, spec, message) in refused {
        let out = api.apply(&mesh("refused", spec));
        let stderr = String::from_utf8_lossy(&out.stderr);
        if out.status.success() || !stderr.contains(message) {
            accepted.push(format!("{what}: {stderr}"));
            let _ = api.kubectl(&["delete", "pingmesh", "-n", NAMESPACE, "refused"]);
        }
    }
    assert!(
        accepted.is_empty(),
        "not refused as expected: {accepted:#?}"
    );
}

#[test]
#[ignore = "needs KUBEBUILDER_ASSETS (kube-apiserver, etcd): hack/envtest.sh"]
fn the_chart_installs_with_the_rqlite_registry_and_two_replicas() {
    let _serial = serial();
    let Some(api) = ApiServer::start() else {
        return;
    };
    api.install_chart(&["registry.rqlite.enabled=true", "operator.replicas=2"]);
    for object in [
        "statefulset/pingmesh-rqlite",
        "service/pingmesh-rqlite",
        "service/pingmesh-rqlite-headless",
        "poddisruptionbudget/pingmesh-rqlite",
        "deployment/pingmesh-operator",
        "crd/pingmeshes.pingmesh.io",
    ] {
        let mut args = vec![object];
        if !object.starts_with("crd/") {
            args.extend_from_slice(&["-n", NAMESPACE]);
        }
        assert!(api.get(&args).is_some(), "{object} missing");
    }
    let deployment = api
        .get(&["deployment", "-n", NAMESPACE, "pingmesh-operator"])
        .unwrap();
    assert_eq!(deployment["spec"]["replicas"], 2);
    let args = deployment["spec"]["template"]["spec"]["containers"][0]["args"].to_string();
    assert!(args.contains("rqlite://"), "{args}");
    assert!(
        api.get(&["pvc", "-n", NAMESPACE, "pingmesh-registry"])
            .is_none(),
        "no SQLite claim with rqlite"
    );
}

/// A YAML file as JSON (kubectl converts it client-side).
fn yaml_file(api: &ApiServer, path: &std::path::Path) -> Value {
    let out = api.kubectl(&[
        "create",
        "--dry-run=client",
        "-o",
        "json",
        "-f",
        &path.display().to_string(),
    ]);
    serde_json::from_str(&ok("kubectl create --dry-run=client", &out)).expect("JSON")
}
