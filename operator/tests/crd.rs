//! The generated `PingMesh` CRD: checked-in copies in sync, the shared
//! contract's names, documentation, defaults, bounds, and CEL rules evaluated
//! offline the way the API server evaluates them.
#![cfg(feature = "kubernetes")]
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::path::Path;

use k8s_openapi::api::core::v1::{Affinity, ResourceRequirements};
use pingmesh_operator::crd::{
    AgentSpec, KUBERNETES_FORMATS, PingMesh, PingMeshSpec, crd, crd_yaml, sync_targets,
};
use serde_json::{Value, json};

fn schema() -> Value {
    let crd = crd();
    serde_json::to_value(
        crd.spec.versions[0]
            .schema
            .as_ref()
            .unwrap()
            .open_api_v3_schema
            .as_ref()
            .unwrap(),
    )
    .unwrap()
}

fn spec_schema() -> Value {
    schema()["properties"]["spec"].clone()
}

fn mesh_with(spec: &Value) -> Value {
    json!({
        "apiVersion": "pingmesh.io/v1alpha1",
        "kind": "PingMesh",
        "metadata": {"name": "default", "namespace": "pingmesh-system"},
        "spec": spec,
    })
}

/// CEL failures of `spec` (schema defaults applied first, as in admission).
fn cel_errors(spec: &Value) -> Vec<String> {
    match kube_cel::Validator::new().validate(&schema(), &mesh_with(spec), None) {
        Ok(()) => Vec::new(),
        Err(errors) => errors.iter().map(ToString::to_string).collect(),
    }
}

#[test]
fn checked_in_crds_match_the_generated_one() {
    let repo_root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let generated = crd_yaml().unwrap();
    for path in sync_targets(&repo_root) {
        let on_disk = std::fs::read_to_string(&path).unwrap_or_default();
        assert!(
            on_disk == generated,
            "{} is not what operator/src/crd generates; regenerate it with \
             `cargo run -p pingmesh-operator -- crd --write crds/` from the repository root",
            path.display()
        );
    }
}

/// Every `format` in `schema` and below, with its JSON path.
fn formats(schema: &Value, path: &str, out: &mut Vec<(String, String)>) {
    match schema {
        Value::Object(map) => {
            for (key, value) in map {
                let here = format!("{path}.{key}");
                if key == "format"
                    && let Value::String(format) = value
                {
                    out.push((here, format.clone()));
                } else {
                    formats(value, &here, out);
                }
            }
        }
        Value::Array(items) => {
            for (i, item) in items.iter().enumerate() {
                formats(item, &format!("{path}[{i}]"), out);
            }
        }
        _ => {}
    }
}

#[test]
fn every_number_format_is_one_the_api_server_knows() {
    let mut found = Vec::new();
    formats(&schema(), "", &mut found);
    assert!(
        found.iter().any(|(_, f)| f == "int32"),
        "the walk found the ports"
    );
    let unknown: Vec<_> = found
        .iter()
        .filter(|(_, f)| !KUBERNETES_FORMATS.contains(&f.as_str()))
        .collect();
    assert!(
        unknown.is_empty(),
        "formats the API server warns about: {unknown:?}"
    );
    let ports = &spec_schema()["properties"]["agent"]["properties"];
    assert_eq!(ports["udpPort"]["format"], "int32");
    assert_eq!(ports["udpPort"]["maximum"], 65_535.0);
}

#[test]
fn the_crd_has_the_names_of_the_shared_contract() {
    let crd = crd();
    assert_eq!(crd.metadata.name.as_deref(), Some("pingmeshes.pingmesh.io"));
    assert_eq!(crd.spec.group, "pingmesh.io");
    assert_eq!(crd.spec.scope, "Namespaced");
    let names = &crd.spec.names;
    assert_eq!(names.kind, "PingMesh");
    assert_eq!(names.plural, "pingmeshes");
    assert_eq!(names.singular.as_deref(), Some("pingmesh"));
    assert_eq!(names.short_names.as_deref(), Some(&["pm".to_owned()][..]));
    let version = &crd.spec.versions[0];
    assert_eq!(version.name, "v1alpha1");
    assert!(version.subresources.as_ref().unwrap().status.is_some());
    let columns: Vec<(&str, &str)> = version
        .additional_printer_columns
        .as_ref()
        .unwrap()
        .iter()
        .map(|c| (c.name.as_str(), c.json_path.as_str()))
        .collect();
    assert_eq!(
        columns,
        [
            ("Transport", ".spec.transport"),
            ("Desired", ".status.agentsDesired"),
            ("Ready", ".status.agentsReady"),
            ("Endpoints", ".status.endpointsRegistered"),
            ("Findings", ".status.openFindingCount"),
            (
                "Available",
                r#".status.conditions[?(@.type=="Available")].status"#
            ),
            ("Age", ".metadata.creationTimestamp"),
        ]
    );
}

/// Embedded Kubernetes types document themselves; ours must too.
const EMBEDDED: [&str; 5] = [
    "affinity",
    "tolerations",
    "resources",
    "conditions",
    "since",
];

fn undocumented(schema: &Value, path: &str, out: &mut Vec<String>) {
    let Some(properties) = schema.get("properties").and_then(Value::as_object) else {
        return;
    };
    for (name, property) in properties {
        let here = format!("{path}.{name}");
        if property.get("description").is_none() {
            out.push(here.clone());
        }
        if !EMBEDDED.contains(&name.as_str()) {
            undocumented(property, &here, out);
            if let Some(items) = property.get("items") {
                undocumented(items, &here, out);
            }
        }
    }
}

#[test]
fn every_field_is_documented_for_kubectl_explain() {
    let mut missing = Vec::new();
    undocumented(&schema()["properties"]["spec"], "spec", &mut missing);
    undocumented(&schema()["properties"]["status"], "status", &mut missing);
    assert!(
        missing.is_empty(),
        "fields without a description: {missing:?}"
    );
}

#[test]
fn schema_defaults_and_serde_defaults_agree() {
    // What the API server stores for `spec: {}`.
    let defaulted = kube_cel::apply_defaults(&spec_schema(), &json!({}));
    let spec: PingMeshSpec = serde_json::from_value(defaulted.clone()).unwrap();
    assert_eq!(spec, PingMeshSpec::default());
    assert_eq!(defaulted["probing"]["windowMs"], 5_000);
    assert_eq!(defaulted["rdma"]["deviceAccess"], "hostPath");
    assert_eq!(defaulted["agent"]["logLevel"], "info");
    assert!(
        defaulted["rdma"].get("gidIndex").is_none(),
        "gidIndex defaults to automatic"
    );
}

#[test]
fn the_schema_bounds_the_numbers() {
    let spec = spec_schema();
    let field = |path: &[&str]| {
        let mut v = &spec;
        for p in path {
            v = &v["properties"][*p];
        }
        v.clone()
    };
    let bounds = |path: &[&str]| {
        let f = field(path);
        (f["minimum"].as_f64(), f["maximum"].as_f64())
    };
    assert_eq!(bounds(&["rdma", "gidIndex"]), (Some(0.0), Some(255.0)));
    assert_eq!(bounds(&["rdma", "trafficClass"]), (Some(0.0), Some(255.0)));
    assert_eq!(bounds(&["rdma", "serviceLevel"]), (Some(0.0), Some(15.0)));
    assert_eq!(bounds(&["probing", "ecmpPaths"]), (Some(1.0), Some(64.0)));
    assert_eq!(
        bounds(&["probing", "probeTimeoutMs"]),
        (Some(10.0), Some(60_000.0))
    );
    assert_eq!(
        bounds(&["probing", "windowMs"]),
        (Some(1_000.0), Some(3_600_000.0))
    );
    assert_eq!(
        bounds(&["probing", "interTorSampleTors"]),
        (Some(0.0), Some(1_000.0))
    );
    let rate = field(&["probing", "torMeshRatePps"]);
    assert_eq!(rate["exclusiveMinimum"], true);
    assert_eq!(rate["maximum"], 1_000.0);
    let coverage = field(&["probing", "ecmpCoverage"]);
    assert_eq!(
        (
            coverage["exclusiveMinimum"].clone(),
            coverage["exclusiveMaximum"].clone()
        ),
        (json!(true), json!(true))
    );
    assert_eq!(
        schema()["properties"]["status"]["properties"]["openFindings"]["maxItems"],
        20
    );
    assert_eq!(
        field(&["transport"])["enum"],
        json!(["auto", "rdma", "udp"])
    );
}

#[test]
fn the_cel_rules_compile() {
    let compiled = kube_cel::compile_schema(&schema());
    assert!(
        !compiled.has_errors(),
        "{:?}",
        compiled.compilation_errors()
    );
}

#[test]
fn an_empty_spec_passes_the_cel_rules() {
    assert_eq!(cel_errors(&json!({})), Vec::<String>::new());
}

#[test]
fn cel_refuses_a_probe_timeout_not_below_the_window() {
    let errors = cel_errors(&json!({"probing": {"probeTimeoutMs": 5000, "windowMs": 5000}}));
    assert_eq!(errors.len(), 1, "{errors:?}");
    assert!(
        errors[0].contains("probeTimeoutMs must be shorter than probing.windowMs"),
        "{errors:?}"
    );
    // The default window (5000) applies when only the timeout is given.
    assert_eq!(
        cel_errors(&json!({"probing": {"probeTimeoutMs": 4999}})),
        Vec::<String>::new()
    );
    assert_eq!(
        cel_errors(&json!({"probing": {"probeTimeoutMs": 6000}})).len(),
        1
    );
}

#[test]
fn cel_requires_a_resource_name_for_device_plugin_access() {
    let errors =
        cel_errors(&json!({"rdma": {"deviceAccess": "devicePlugin", "devicePluginResource": ""}}));
    assert_eq!(errors.len(), 1, "{errors:?}");
    assert!(
        errors[0].contains("devicePluginResource must name an extended resource"),
        "{errors:?}"
    );
    let errors = cel_errors(
        &json!({"rdma": {"deviceAccess": "devicePlugin", "devicePluginResource": "no-slash"}}),
    );
    assert_eq!(errors.len(), 1, "{errors:?}");
    // The default resource name is a valid one; host-path access ignores the field.
    assert_eq!(
        cel_errors(&json!({"rdma": {"deviceAccess": "devicePlugin"}})),
        Vec::<String>::new()
    );
    assert_eq!(
        cel_errors(&json!({"rdma": {"deviceAccess": "hostPath", "devicePluginResource": ""}})),
        Vec::<String>::new()
    );
}

#[test]
fn cel_and_rust_validation_agree_on_the_cross_field_rules() {
    for spec in [
        json!({"probing": {"probeTimeoutMs": 5000, "windowMs": 5000}}),
        json!({"probing": {"probeTimeoutMs": 900, "windowMs": 1000}}),
        json!({"rdma": {"deviceAccess": "devicePlugin", "devicePluginResource": "x"}}),
        json!({"rdma": {"deviceAccess": "devicePlugin", "devicePluginResource": "example.com/rdma"}}),
    ] {
        let cel_ok = cel_errors(&spec).is_empty();
        let defaulted = kube_cel::apply_defaults(&spec_schema(), &spec);
        let parsed: PingMeshSpec = serde_json::from_value(defaulted).unwrap();
        assert_eq!(parsed.validate().is_ok(), cel_ok, "{spec}");
    }
}

/// The sample of the shared contract, as users write it.
const CONTRACT_SAMPLE: &str = r#"
apiVersion: pingmesh.io/v1alpha1
kind: PingMesh
metadata: {name: default, namespace: pingmesh-system}
spec:
  paused: false
  transport: auto
  nodeSelector: {}
  affinity: {}
  tolerations: []
  rdma:
    devices: []
    gidIndex: null
    trafficClass: 0
    serviceLevel: 0
    deviceAccess: hostPath
    devicePluginResource: rdma/hca_shared_devices_a
  topology:
    torLabel: topology.pingmesh.io/tor
    rnicTorLabelPrefix: ""
  probing:
    torMeshRatePps: 10
    interTorRatePps: 1
    interTorSampleTors: 5
    ecmpPaths: 4
    ecmpCoverage: 0.9
    probeTimeoutMs: 500
    windowMs: 5000
    serviceRatePps: 5
    maxServiceTargetsPerAgent: 32
  sla:
    maxLossRatio: 0.01
    maxP99NetworkRttMicros: 500
  tracing:
    enabled: false
  nodeHealth:
    conditions: false
    conditionType: RdmaNetworkHealthy
  agent:
    image: ghcr.io/pingmesh/pingmesh-agent:0.1.0
    imagePullPolicy: IfNotPresent
    resources: {}
    priorityClassName: ""
    metricsPort: 9402
    udpPort: 9403
    logLevel: info
status:
  observedGeneration: 3
  conditions: []
  agentsDesired: 4
  agentsReady: 4
  endpointsRegistered: 4
  pathsProbed: 12
  openFindings: [{kind: pathLoss, location: "n1/udp0 -> n3/udp0", since: "2026-11-27T05:00:00Z"}]
  openFindingCount: 1
"#;

#[test]
fn the_contract_sample_parses_validates_and_passes_cel() {
    let mesh: PingMesh = serde_yaml::from_str(CONTRACT_SAMPLE).unwrap();
    mesh.spec.validate().unwrap();
    assert_eq!(
        mesh.status.as_ref().unwrap().open_findings[0].kind,
        "pathLoss"
    );
    let value: Value = serde_yaml::from_str(CONTRACT_SAMPLE).unwrap();
    assert_eq!(cel_errors(&value["spec"]), Vec::<String>::new());
    // Everything the sample spells out is a default.
    let defaults = PingMeshSpec {
        affinity: Some(Affinity::default()),
        agent: AgentSpec {
            resources: Some(ResourceRequirements::default()),
            ..AgentSpec::default()
        },
        ..PingMeshSpec::default()
    };
    assert_eq!(mesh.spec, defaults);
}
