//! The reconciler: pure builders (what the agent pods get), status rules, and
//! whole reconciles against a scripted API server that records every request.
#![cfg(feature = "kubernetes")]
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

#[path = "support/fake_api.rs"]
mod fake_api;

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use k8s_openapi::api::apps::v1::DaemonSet;
use k8s_openapi::api::core::v1::{Container, PodSpec};
use k8s_openapi::jiff::Timestamp;
use kube::runtime::controller::Action;
use pingmesh_operator::crd::{
    DeviceAccess, MAX_AFFECTED_SERVICES, MAX_HITS_PER_SERVICE, MAX_OPEN_FINDINGS, MAX_ROOT_CAUSES,
    PingMesh, PingMeshSpec, PingMeshStatus, TransportMode,
};
use pingmesh_operator::reconcile::{
    AVAILABLE, BuildError, CONFIG_HASH_ANNOTATION, Context, DEGRADED, FIELD_MANAGER,
    MeshAffectedService, MeshFinding, MeshRootCause, MeshStatus, MeshStatusSource, Observation,
    OperatorSettings, Outcome, PAUSED_NODE_SELECTOR, PROGRESSING, PolicyState, Problem,
    ReconcileMetrics, agent_config_data, config_hash, desired_configmap, desired_daemonset,
    desired_status, error_policy, reconcile, retry_delay,
};
use serde_json::{Value, json};

use fake_api::{Seen, World};

const NS: &str = "pingmesh-system";

fn mesh(spec: PingMeshSpec) -> PingMesh {
    let mut pm = PingMesh::new("default", spec);
    pm.metadata.namespace = Some(NS.into());
    pm.metadata.uid = Some("mesh-uid".into());
    pm.metadata.generation = Some(1);
    pm
}

fn settings() -> OperatorSettings {
    OperatorSettings {
        controller_url: "http://pingmesh-operator.pingmesh-system.svc:9400".into(),
        ..OperatorSettings::default()
    }
}

fn pod(pm: &PingMesh) -> PodSpec {
    desired_daemonset(pm, &settings())
        .unwrap()
        .spec
        .unwrap()
        .template
        .spec
        .unwrap()
}

fn agent(pm: &PingMesh) -> Container {
    pod(pm).containers.remove(0)
}

fn capabilities(pm: &PingMesh) -> Vec<String> {
    agent(pm)
        .security_context
        .unwrap()
        .capabilities
        .unwrap()
        .add
        .unwrap_or_default()
}

fn host_paths(pm: &PingMesh) -> Vec<String> {
    pod(pm)
        .volumes
        .unwrap_or_default()
        .into_iter()
        .filter_map(|v| v.host_path.map(|h| h.path))
        .collect()
}

#[test]
fn agents_get_a_pingmesh_token_and_the_controller_ca() {
    let pm = mesh(PingMeshSpec::default());
    let spec = pod(&pm);
    let projected = spec
        .volumes
        .unwrap()
        .into_iter()
        .find_map(|v| v.projected)
        .expect("a projected token volume");
    let token = projected.sources.unwrap()[0]
        .service_account_token
        .clone()
        .unwrap();
    assert_eq!(token.audience.as_deref(), Some("pingmesh"));
    let env = |settings: &OperatorSettings| -> Vec<(String, String)> {
        desired_daemonset(&pm, settings)
            .unwrap()
            .spec
            .unwrap()
            .template
            .spec
            .unwrap()
            .containers[0]
            .env
            .clone()
            .unwrap()
            .into_iter()
            .filter_map(|e| Some((e.name, e.value?)))
            .collect()
    };
    let plain = env(&settings());
    assert!(plain.contains(&(
        "PINGMESH_TOKEN_FILE".into(),
        "/var/run/secrets/pingmesh.io/token".into()
    )));
    assert!(!plain.iter().any(|(k, _)| k == "PINGMESH_CONTROLLER_CA_PEM"));
    let tls = env(&OperatorSettings {
        agent_ca_pem: Some("CA PEM".into()),
        ..settings()
    });
    assert!(tls.contains(&("PINGMESH_CONTROLLER_CA_PEM".into(), "CA PEM".into())));
}

fn template_hash(ds: &DaemonSet) -> String {
    ds.spec
        .as_ref()
        .unwrap()
        .template
        .metadata
        .as_ref()
        .unwrap()
        .annotations
        .as_ref()
        .unwrap()[CONFIG_HASH_ANNOTATION]
        .clone()
}

fn spec_with(change: impl FnOnce(&mut PingMeshSpec)) -> PingMeshSpec {
    let mut spec = PingMeshSpec::default();
    change(&mut spec);
    spec
}

// ---------------------------------------------------------------- builders

#[test]
fn udp_agents_without_path_traces_get_no_capability_and_run_as_non_root() {
    let pm = mesh(spec_with(|s| {
        s.transport = TransportMode::Udp;
        s.topology.path_traces = false;
    }));
    assert!(capabilities(&pm).is_empty());
    assert!(host_paths(&pm).is_empty());
    assert_eq!(
        pod(&pm).host_pid,
        None,
        "no host PID namespace without tracing"
    );
    let security = agent(&pm).security_context.unwrap();
    assert_eq!(security.run_as_non_root, Some(true));
    assert_eq!(
        security.capabilities.unwrap().drop,
        Some(vec!["ALL".to_owned()])
    );
    assert_eq!(security.allow_privilege_escalation, Some(false));
}

#[test]
fn path_traces_add_net_raw_and_so_run_the_agent_as_root() {
    let pm = mesh(spec_with(|s| s.transport = TransportMode::Udp));
    assert!(pm.spec.topology.path_traces, "on by default");
    assert_eq!(capabilities(&pm), ["NET_RAW"]);
    assert!(host_paths(&pm).is_empty());
    let security = agent(&pm).security_context.unwrap();
    assert_eq!(security.run_as_user, Some(0));
    assert_eq!(security.run_as_non_root, Some(false));
    assert_eq!(security.allow_privilege_escalation, Some(false));
}

#[test]
fn rdma_and_auto_agents_get_ipc_lock_and_the_infiniband_devices() {
    for transport in [TransportMode::Rdma, TransportMode::Auto] {
        let pm = mesh(spec_with(|s| s.transport = transport));
        assert_eq!(capabilities(&pm), ["IPC_LOCK", "NET_RAW"], "{transport:?}");
        assert_eq!(host_paths(&pm), ["/dev/infiniband"], "{transport:?}");
        assert!(agent(&pm).resources.is_none(), "{transport:?}");
    }
}

#[test]
fn device_plugin_access_requests_the_resource_instead_of_a_host_path() {
    let pm = mesh(spec_with(|s| {
        s.transport = TransportMode::Rdma;
        s.rdma.device_access = DeviceAccess::DevicePlugin;
        s.rdma.device_plugin_resource = "rdma/rdma_shared_device_a".into();
    }));
    assert!(host_paths(&pm).is_empty());
    assert_eq!(capabilities(&pm), ["IPC_LOCK", "NET_RAW"]);
    let limits = agent(&pm).resources.unwrap().limits.unwrap();
    assert_eq!(limits["rdma/rdma_shared_device_a"].0, "1");
    // UDP meshes never ask for RDMA devices, however the RDMA section reads.
    let udp = mesh(spec_with(|s| {
        s.transport = TransportMode::Udp;
        s.rdma.device_access = DeviceAccess::DevicePlugin;
    }));
    assert!(agent(&udp).resources.is_none());
}

#[test]
fn tracing_adds_bpf_perfmon_and_read_only_kernel_mounts() {
    let pm = mesh(spec_with(|s| {
        s.transport = TransportMode::Udp;
        s.tracing.enabled = true;
    }));
    assert_eq!(
        capabilities(&pm),
        ["BPF", "PERFMON", "SYS_PTRACE", "NET_RAW"]
    );
    assert_eq!(
        host_paths(&pm),
        ["/sys/kernel/btf", "/sys/kernel/tracing", "/sys/fs/cgroup"]
    );
    assert_eq!(
        pod(&pm).host_pid,
        Some(true),
        "services' processes in /proc"
    );
    let mounts = agent(&pm).volume_mounts.unwrap();
    assert!(mounts.iter().all(|m| m.read_only == Some(true)));
    assert_eq!(agent(&pm).security_context.unwrap().run_as_user, Some(0));
}

#[test]
fn agent_pods_use_the_host_network_and_the_contract_environment() {
    let pm = mesh(spec_with(|s| {
        s.agent.udp_port = 7000;
        s.agent.metrics_port = 7001;
    }));
    let pod = pod(&pm);
    assert_eq!(pod.host_network, Some(true));
    assert_eq!(pod.dns_policy.as_deref(), Some("ClusterFirstWithHostNet"));
    assert_eq!(pod.automount_service_account_token, Some(false));
    let env = agent(&pm).env.unwrap();
    let value = |name: &str| {
        env.iter()
            .find(|e| e.name == name)
            .and_then(|e| e.value.clone())
    };
    let node = env.iter().find(|e| e.name == "NODE_NAME").unwrap();
    let field = node
        .value_from
        .as_ref()
        .unwrap()
        .field_ref
        .as_ref()
        .unwrap();
    assert_eq!(field.field_path, "spec.nodeName");
    assert_eq!(
        value("PINGMESH_CONTROLLER").unwrap(),
        settings().controller_url
    );
    assert_eq!(value("PINGMESH_UDP_BIND").unwrap(), "0.0.0.0:7000");
    assert_eq!(value("PINGMESH_METRICS_ADDR").unwrap(), "0.0.0.0:7001");
    assert_eq!(value("PINGMESH_LOG_LEVEL").unwrap(), "info");
    let from = agent(&pm).env_from.unwrap();
    assert_eq!(
        from[0].config_map_ref.as_ref().unwrap().name,
        "default-agent"
    );
}

#[test]
fn scheduling_fields_come_from_the_spec() {
    let pm = mesh(spec_with(|s| {
        s.node_selector.insert("gpu".into(), "true".into());
        s.tolerations = vec![k8s_openapi::api::core::v1::Toleration {
            operator: Some("Exists".into()),
            ..Default::default()
        }];
        s.agent.priority_class_name = "system-node-critical".into();
        s.agent.image = "registry.local/agent:dev".into();
    }));
    let pod = pod(&pm);
    let selector = pod.node_selector.unwrap();
    assert_eq!(selector["gpu"], "true");
    assert_eq!(selector["kubernetes.io/os"], "linux");
    assert_eq!(pod.tolerations.unwrap().len(), 1);
    assert_eq!(
        pod.priority_class_name.as_deref(),
        Some("system-node-critical")
    );
    assert_eq!(
        agent(&pm).image.as_deref(),
        Some("registry.local/agent:dev")
    );
}

#[test]
fn a_paused_mesh_selects_no_node() {
    let pm = mesh(spec_with(|s| {
        s.paused = true;
        s.node_selector.insert("gpu".into(), "true".into());
    }));
    let selector = pod(&pm).node_selector.unwrap();
    let (key, value) = PAUSED_NODE_SELECTOR;
    assert_eq!(selector.len(), 1);
    assert_eq!(selector[key], value);
}

#[test]
fn the_config_hash_follows_the_configmap_data_only() {
    let base = mesh(PingMeshSpec::default());
    let base_hash = template_hash(&desired_daemonset(&base, &settings()).unwrap());
    assert_eq!(base_hash, config_hash(&agent_config_data(&base)));
    assert_eq!(base_hash.len(), 16);
    let traced = mesh(spec_with(|s| s.tracing.enabled = true));
    assert_ne!(
        template_hash(&desired_daemonset(&traced, &settings()).unwrap()),
        base_hash
    );
    let gid = mesh(spec_with(|s| s.rdma.gid_index = Some(3)));
    assert_ne!(config_hash(&agent_config_data(&gid)), base_hash);
    // Scheduling is not agent config: it changes the template by itself.
    let elsewhere = mesh(spec_with(|s| {
        s.node_selector.insert("rack".into(), "7".into());
    }));
    assert_eq!(
        template_hash(&desired_daemonset(&elsewhere, &settings()).unwrap()),
        base_hash
    );
}

#[test]
fn owned_objects_carry_a_controller_reference_to_the_mesh() {
    let pm = mesh(PingMeshSpec::default());
    let cm = desired_configmap(&pm).unwrap();
    let ds = desired_daemonset(&pm, &settings()).unwrap();
    for meta in [&cm.metadata, &ds.metadata] {
        let owner = &meta.owner_references.as_ref().unwrap()[0];
        assert_eq!(owner.kind, "PingMesh");
        assert_eq!(owner.api_version, "pingmesh.io/v1alpha1");
        assert_eq!(owner.uid, "mesh-uid");
        assert_eq!(owner.controller, Some(true));
        assert_eq!(meta.namespace.as_deref(), Some(NS));
        assert_eq!(meta.name.as_deref(), Some("default-agent"));
        assert_eq!(meta.labels.as_ref().unwrap()["pingmesh.io/mesh"], "default");
    }
    assert_eq!(cm.data.unwrap()["PINGMESH_TRANSPORT"], "auto");
}

#[test]
fn objects_are_not_built_for_a_mesh_the_api_server_never_saw() {
    let mut pm = mesh(PingMeshSpec::default());
    pm.metadata.uid = None;
    assert_eq!(
        desired_configmap(&pm).unwrap_err(),
        BuildError::MissingMetadata("metadata.uid")
    );
    let mut long = mesh(PingMeshSpec::default());
    long.metadata.name = Some("m".repeat(58));
    assert!(matches!(
        desired_daemonset(&long, &settings()),
        Err(BuildError::NameTooLong { .. })
    ));
}

// ---------------------------------------------------------------- status

fn daemonset_with(desired: i32, ready: i32, updated: i32) -> DaemonSet {
    let mut ds = desired_daemonset(&mesh(PingMeshSpec::default()), &settings()).unwrap();
    ds.metadata.generation = Some(2);
    ds.status = Some(serde_json::from_value(json!({
        "desiredNumberScheduled": desired, "numberReady": ready, "updatedNumberScheduled": updated,
        "numberAvailable": ready, "currentNumberScheduled": desired, "numberMisscheduled": 0,
        "observedGeneration": 2,
    })).unwrap());
    ds
}

fn condition<'a>(
    status: &'a PingMeshStatus,
    type_: &str,
) -> &'a k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition {
    status.conditions.iter().find(|c| c.type_ == type_).unwrap()
}

#[test]
fn status_reports_the_rollout_and_bounds_the_findings() {
    let pm = mesh(PingMeshSpec::default());
    let ds = daemonset_with(4, 3, 2);
    let findings = (0..25u64)
        .rev()
        .map(|i| MeshFinding {
            kind: "pathLoss".into(),
            location: format!("n{i}/udp0 -> n0/udp0"),
            since_ms: 1_800_000_000_000 + i * 5_000,
        })
        .collect();
    let root_causes = (0..12u64)
        .map(|i| MeshRootCause {
            kind: "host".into(),
            component: format!("n{i}"),
            signal: "loss".into(),
            confidence_percent: i32::try_from(95 - i).unwrap(),
            summary: format!("host n{i} loses probes"),
            since_ms: 1_800_000_000_000,
        })
        .collect();
    let mesh_status = Ok(MeshStatus {
        endpoints_registered: 4,
        paths_probed: 12,
        open_findings: findings,
        root_causes,
        affected_services: affected_services(),
    });
    let seen = Observation {
        daemonset: Some(&ds),
        mesh: &mesh_status,
        problem: None,
        policy: &PolicyState::NotHosted,
    };
    let status = desired_status(&pm, seen, Timestamp::now());
    assert_eq!((status.agents_desired, status.agents_ready), (4, 3));
    assert_eq!((status.endpoints_registered, status.paths_probed), (4, 12));
    assert_eq!(status.open_finding_count, 25);
    assert_eq!(status.open_findings.len(), MAX_OPEN_FINDINGS);
    assert_eq!(
        status.open_findings[0].location, "n0/udp0 -> n0/udp0",
        "oldest first"
    );
    // Root causes: the most confident first (the mesh's order), bounded.
    assert_eq!(status.root_cause_count, 12);
    assert_eq!(status.root_causes.len(), MAX_ROOT_CAUSES);
    assert_eq!(status.root_causes[0].component, "n0");
    assert_eq!(status.root_causes[0].confidence_percent, 95);
    assert_eq!(status.root_causes[0].kind, "host");
    // Affected services: the mesh's ranking, bounded, with owners and hits.
    assert_eq!(status.affected_service_count, 13);
    assert_eq!(status.affected_services.len(), MAX_AFFECTED_SERVICES);
    let first = &status.affected_services[0];
    assert_eq!(first.service, "Job/ml/train-0");
    assert_eq!(
        (
            first.kind.as_str(),
            first.namespace.as_deref(),
            first.name.as_str()
        ),
        ("Job", Some("ml"), "train-0")
    );
    assert_eq!((first.flows, first.pods), (40, 4));
    assert_eq!(first.hit_by.len(), MAX_HITS_PER_SERVICE);
    assert_eq!(first.hit_by[0], "host n0");
    let process = &status.affected_services[1];
    assert_eq!(process.service, "Process/ib_write_bw");
    assert_eq!(process.namespace, None, "no namespace outside pods");
    assert_eq!(condition(&status, AVAILABLE).status, "True");
    assert_eq!(condition(&status, PROGRESSING).reason, "RollingOut");
    assert_eq!(condition(&status, DEGRADED).status, "False");
    assert_eq!(status.observed_generation, Some(1));
}

/// 13 services, most affected first: a Job hit by 7 causes, a process, 11 more Jobs.
fn affected_services() -> Vec<MeshAffectedService> {
    let job = |i: u64, flows: u64| MeshAffectedService {
        service: format!("Job/ml/train-{i}"),
        kind: "Job".into(),
        namespace: "ml".into(),
        name: format!("train-{i}"),
        flows,
        pods: flows / 10,
        hit_by: vec!["host n0".into()],
    };
    let mut all = vec![
        MeshAffectedService {
            hit_by: (0..7).map(|i| format!("host n{i}")).collect(),
            ..job(0, 40)
        },
        MeshAffectedService {
            service: "Process/ib_write_bw".into(),
            kind: "Process".into(),
            namespace: String::new(),
            name: "ib_write_bw".into(),
            flows: 30,
            pods: 1,
            hit_by: vec!["pathLoss n1/udp0 -> n0/udp0".into()],
        },
    ];
    all.extend((1..12).map(|i| job(i, 20 - i)));
    all
}

#[test]
fn an_unreachable_mesh_controller_keeps_the_last_numbers_and_degrades() {
    let mut pm = mesh(PingMeshSpec::default());
    pm.status = Some(PingMeshStatus {
        endpoints_registered: 9,
        ..PingMeshStatus::default()
    });
    let ds = daemonset_with(2, 2, 2);
    let mesh_status = Err("registry unavailable: disk full".to_owned());
    let seen = Observation {
        daemonset: Some(&ds),
        mesh: &mesh_status,
        problem: None,
        policy: &PolicyState::NotHosted,
    };
    let status = desired_status(&pm, seen, Timestamp::now());
    assert_eq!(status.endpoints_registered, 9);
    let degraded = condition(&status, DEGRADED);
    assert_eq!(
        (degraded.status.as_str(), degraded.reason.as_str()),
        ("True", "MeshControllerUnavailable")
    );
    assert_eq!(condition(&status, PROGRESSING).reason, "RolloutComplete");
}

#[test]
fn an_invalid_spec_degrades_with_its_message() {
    let pm = mesh(PingMeshSpec::default());
    let problem = Problem::InvalidSpec("probing.windowMs is 1, must be 1000 to 3600000".into());
    let mesh_status = Ok(MeshStatus::default());
    let seen = Observation {
        daemonset: None,
        mesh: &mesh_status,
        problem: Some(&problem),
        policy: &PolicyState::NotHosted,
    };
    let status = desired_status(&pm, seen, Timestamp::now());
    let degraded = condition(&status, DEGRADED);
    assert_eq!(degraded.reason, "InvalidSpec");
    assert!(degraded.message.contains("windowMs"));
    assert_eq!(condition(&status, AVAILABLE).reason, "NoDaemonSet");
}

// ---------------------------------------------------------------- reconcile

#[derive(Debug)]
struct FakeMesh(Result<MeshStatus, String>);

#[async_trait]
impl MeshStatusSource for FakeMesh {
    async fn mesh_status(&self) -> Result<MeshStatus, String> {
        self.0.clone()
    }
}

fn healthy_mesh() -> FakeMesh {
    FakeMesh(Ok(MeshStatus {
        endpoints_registered: 3,
        paths_probed: 6,
        open_findings: vec![MeshFinding {
            kind: "pathLoss".into(),
            location: "n1/udp0 -> n3/udp0".into(),
            since_ms: 1_800_000_000_000,
        }],
        root_causes: Vec::new(),
        affected_services: Vec::new(),
    }))
}

fn ready_daemonset_status() -> Value {
    json!({"desiredNumberScheduled": 3, "numberReady": 3, "updatedNumberScheduled": 3,
           "numberAvailable": 3, "currentNumberScheduled": 3, "numberMisscheduled": 0,
           "observedGeneration": 1})
}

struct Run {
    result: Result<Action, pingmesh_operator::reconcile::ReconcileError>,
    seen: Vec<Seen>,
    ctx: Arc<Context>,
}

impl Run {
    /// Requests other than Events, as "METHOD path".
    fn calls(&self) -> Vec<String> {
        self.seen
            .iter()
            .filter(|s| !s.is_event())
            .map(Seen::line)
            .collect()
    }

    fn events(&self) -> Vec<(String, String)> {
        self.seen
            .iter()
            .filter(|s| s.is_event())
            .map(|s| {
                (
                    s.body["reason"].as_str().unwrap_or_default().to_owned(),
                    s.body["note"].as_str().unwrap_or_default().to_owned(),
                )
            })
            .collect()
    }

    fn patch_to(&self, path_end: &str) -> &Seen {
        self.seen
            .iter()
            .find(|s| s.method == "PATCH" && s.path.ends_with(path_end))
            .unwrap_or_else(|| panic!("no PATCH to {path_end} in {:?}", self.calls()))
    }
}

async fn run(pm: PingMesh, world: World, mesh_source: FakeMesh) -> Run {
    let (client, world, server) = fake_api::start(world);
    let ctx = Arc::new(Context::new(
        client,
        settings(),
        Arc::new(mesh_source),
        ReconcileMetrics::new().unwrap(),
        Some("operator-0".into()),
    ));
    let result = reconcile(Arc::new(pm), ctx.clone()).await;
    let seen = world.lock().unwrap().seen.clone();
    server.abort();
    Run { result, seen, ctx }
}

const CM_PATH: &str = "/api/v1/namespaces/pingmesh-system/configmaps";
const DS_PATH: &str = "/apis/apps/v1/namespaces/pingmesh-system/daemonsets";
const STATUS_PATH: &str =
    "/apis/pingmesh.io/v1alpha1/namespaces/pingmesh-system/pingmeshes/default/status";

fn assert_server_side_apply(seen: &Seen) {
    assert_eq!(
        seen.content_type,
        "application/apply-patch+yaml",
        "{}",
        seen.line()
    );
    assert_eq!(
        seen.query.get("fieldManager").map(String::as_str),
        Some(FIELD_MANAGER),
        "{}",
        seen.line()
    );
    assert_eq!(
        seen.query.get("force").map(String::as_str),
        Some("true"),
        "{}",
        seen.line()
    );
}

#[tokio::test]
async fn a_new_mesh_gets_a_configmap_a_daemonset_and_a_status() {
    let world = World {
        daemonset_status: ready_daemonset_status(),
        ..World::default()
    };
    let run = run(mesh(PingMeshSpec::default()), world, healthy_mesh()).await;
    assert!(run.result.is_ok(), "{:?}", run.result);
    assert_eq!(
        run.calls(),
        [
            format!("GET {CM_PATH}"),
            format!("GET {DS_PATH}"),
            format!("PATCH {CM_PATH}/default-agent"),
            format!("PATCH {DS_PATH}/default-agent"),
            format!("PATCH {STATUS_PATH}"),
        ]
    );
    assert_eq!(
        run.seen[0].query["labelSelector"],
        "app.kubernetes.io/managed-by=pingmesh-operator,pingmesh.io/mesh=default"
    );
    for path in [
        "configmaps/default-agent",
        "daemonsets/default-agent",
        "default/status",
    ] {
        assert_server_side_apply(run.patch_to(path));
    }
    let ds = &run.patch_to("daemonsets/default-agent").body;
    assert_eq!(ds["kind"], "DaemonSet");
    assert_eq!(ds["spec"]["template"]["spec"]["hostNetwork"], true);
    let status = &run.patch_to("default/status").body["status"];
    assert_eq!(status["agentsDesired"], 3);
    assert_eq!(status["agentsReady"], 3);
    assert_eq!(status["endpointsRegistered"], 3);
    assert_eq!(status["openFindingCount"], 1);
    assert_eq!(status["openFindings"][0]["kind"], "pathLoss");
    let available = status["conditions"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["type"] == "Available")
        .unwrap();
    assert_eq!(available["status"], "True");
    let reasons: Vec<String> = run.events().into_iter().map(|(r, _)| r).collect();
    assert_eq!(reasons, ["Created", "Created"]);
    assert_eq!(run.ctx.metrics.count(Outcome::Ok), 1);
}

fn existing(pm: &PingMesh) -> (Value, Value) {
    let mut cm = serde_json::to_value(desired_configmap(pm).unwrap()).unwrap();
    cm["metadata"]["resourceVersion"] = json!("5");
    let mut ds = serde_json::to_value(desired_daemonset(pm, &settings()).unwrap()).unwrap();
    ds["metadata"]["resourceVersion"] = json!("6");
    (cm, ds)
}

#[tokio::test]
async fn a_config_change_rolls_the_daemonset_with_a_new_hash() {
    let old = mesh(PingMeshSpec::default());
    let (cm, ds) = existing(&old);
    let old_hash =
        ds["spec"]["template"]["metadata"]["annotations"][CONFIG_HASH_ANNOTATION].clone();
    let world = World {
        configmaps: vec![cm],
        daemonsets: vec![ds],
        daemonset_status: ready_daemonset_status(),
        ..World::default()
    };
    let new = mesh(spec_with(|s| s.transport = TransportMode::Udp));
    let run = run(new, world, healthy_mesh()).await;
    assert!(run.result.is_ok(), "{:?}", run.result);
    let applied_cm = &run.patch_to("configmaps/default-agent").body;
    assert_eq!(applied_cm["data"]["PINGMESH_TRANSPORT"], "udp");
    let applied = &run.patch_to("daemonsets/default-agent").body;
    let new_hash = &applied["spec"]["template"]["metadata"]["annotations"][CONFIG_HASH_ANNOTATION];
    assert_ne!(new_hash, &old_hash);
    let events = run.events();
    assert_eq!(events.len(), 2, "{events:?}");
    assert_eq!(
        (events[0].0.as_str(), events[1].0.as_str()),
        ("Updated", "AgentsRolling")
    );
    assert!(
        events[1].1.contains("DaemonSet default-agent"),
        "{events:?}"
    );
    assert!(events[1].1.contains("agents roll"), "{events:?}");
}

#[tokio::test]
async fn a_mesh_in_its_desired_state_gets_no_events_and_no_status_write() {
    let pm = mesh(PingMeshSpec::default());
    let (cm, ds) = existing(&pm);
    let world = || World {
        configmaps: vec![cm.clone()],
        daemonsets: vec![ds.clone()],
        daemonset_status: ready_daemonset_status(),
        ..World::default()
    };
    let first = run(pm.clone(), world(), healthy_mesh()).await;
    let written: PingMeshStatus =
        serde_json::from_value(first.patch_to("default/status").body["status"].clone()).unwrap();
    let mut settled = pm;
    settled.status = Some(written);
    let second = run(settled, world(), healthy_mesh()).await;
    assert!(second.result.is_ok(), "{:?}", second.result);
    assert!(second.events().is_empty(), "{:?}", second.events());
    assert!(
        !second.calls().iter().any(|c| c.ends_with("/status")),
        "{:?}",
        second.calls()
    );
}

#[tokio::test]
async fn orphans_owned_by_the_mesh_are_deleted_and_foreign_objects_kept() {
    let pm = mesh(PingMeshSpec::default());
    let (cm, ds) = existing(&pm);
    let mut orphan = ds.clone();
    orphan["metadata"]["name"] = json!("default-agent-rdma");
    let mut foreign = ds.clone();
    foreign["metadata"]["name"] = json!("hand-made");
    foreign["metadata"]["ownerReferences"] = json!([]);
    let world = World {
        configmaps: vec![cm],
        daemonsets: vec![ds, orphan, foreign],
        daemonset_status: ready_daemonset_status(),
        ..World::default()
    };
    let run = run(pm, world, healthy_mesh()).await;
    assert!(run.result.is_ok(), "{:?}", run.result);
    let deletes: Vec<String> = run
        .calls()
        .into_iter()
        .filter(|c| c.starts_with("DELETE"))
        .collect();
    assert_eq!(deletes, [format!("DELETE {DS_PATH}/default-agent-rdma")]);
    assert!(
        run.events()
            .iter()
            .any(|(reason, _)| reason == "DeletedOrphan")
    );
}

#[tokio::test]
async fn a_paused_mesh_only_scales_its_daemonset_to_no_node() {
    let running = mesh(PingMeshSpec::default());
    let (cm, ds) = existing(&running);
    let mut orphan = ds.clone();
    orphan["metadata"]["name"] = json!("default-agent-old");
    let world = World {
        configmaps: vec![cm],
        daemonsets: vec![ds, orphan],
        daemonset_status: json!({"desiredNumberScheduled": 0, "numberReady": 0,
            "currentNumberScheduled": 0, "numberMisscheduled": 0, "observedGeneration": 1}),
        ..World::default()
    };
    let paused = mesh(spec_with(|s| s.paused = true));
    let run = run(paused, world, healthy_mesh()).await;
    assert!(run.result.is_ok(), "{:?}", run.result);
    assert_eq!(
        run.calls(),
        [
            format!("GET {CM_PATH}"),
            format!("GET {DS_PATH}"),
            format!("PATCH {DS_PATH}/default-agent"),
            format!("PATCH {STATUS_PATH}"),
        ]
    );
    let selector =
        &run.patch_to("daemonsets/default-agent").body["spec"]["template"]["spec"]["nodeSelector"];
    assert_eq!(
        selector,
        &json!({PAUSED_NODE_SELECTOR.0: PAUSED_NODE_SELECTOR.1})
    );
    let status = &run.patch_to("default/status").body["status"];
    let available = status["conditions"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["type"] == "Available")
        .unwrap();
    assert_eq!(
        (available["status"].as_str(), available["reason"].as_str()),
        (Some("False"), Some("Paused"))
    );
    assert_eq!(
        run.events()
            .iter()
            .map(|(r, _)| r.as_str())
            .collect::<Vec<_>>(),
        ["Paused"]
    );
}

#[tokio::test]
async fn an_invalid_spec_is_reported_and_nothing_is_applied() {
    let pm = mesh(spec_with(|s| {
        s.probing.probe_timeout_ms = 8_000;
        s.probing.window_ms = 5_000;
    }));
    let run = run(pm, World::default(), healthy_mesh()).await;
    assert!(run.result.is_ok(), "{:?}", run.result);
    assert_eq!(
        run.calls(),
        [
            format!("GET {CM_PATH}"),
            format!("GET {DS_PATH}"),
            format!("PATCH {STATUS_PATH}")
        ]
    );
    let status = &run.patch_to("default/status").body["status"];
    let degraded = status["conditions"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["type"] == "Degraded")
        .unwrap();
    assert_eq!(degraded["status"], "True");
    assert!(
        degraded["message"]
            .as_str()
            .unwrap()
            .contains("probeTimeoutMs (8000)")
    );
    assert_eq!(run.events()[0].0, "InvalidSpec");
    assert_eq!(run.ctx.metrics.count(Outcome::InvalidSpec), 1);
}

#[tokio::test]
async fn an_api_server_error_is_categorized_reported_and_retried_later() {
    let world = World {
        failures: vec![("PATCH", "/daemonsets/", 500)],
        ..World::default()
    };
    let pm = mesh(PingMeshSpec::default());
    let run = run(pm.clone(), world, healthy_mesh()).await;
    let error = run.result.as_ref().unwrap_err();
    assert_eq!(error.category(), "api_server_error");
    assert!(
        error.to_string().contains("DaemonSet default-agent"),
        "{error}"
    );
    assert_eq!(run.ctx.metrics.errors("api_server_error"), 1);
    assert_eq!(run.ctx.metrics.count(Outcome::Error), 1);
    let reasons: Vec<String> = run.events().into_iter().map(|(r, _)| r).collect();
    assert!(
        reasons.contains(&"ReconcileFailed".to_owned()),
        "{reasons:?}"
    );
    let status = &run.patch_to("default/status").body["status"];
    let degraded = status["conditions"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["type"] == "Degraded")
        .unwrap();
    assert_eq!(
        (degraded["status"].as_str(), degraded["reason"].as_str()),
        (Some("True"), Some("ApplyFailed"))
    );
    // The retry waits longer after each consecutive failure.
    let first = run.ctx.retry_after_failure(&pm);
    let second = run.ctx.retry_after_failure(&pm);
    let third = run.ctx.retry_after_failure(&pm);
    assert!(
        first >= Duration::from_secs(4) && first <= Duration::from_secs(5),
        "{first:?}"
    );
    assert!(second >= Duration::from_secs(8), "{second:?}");
    assert!(third >= Duration::from_secs(16), "{third:?}");
    let _: Action = error_policy(Arc::new(pm), error, run.ctx.clone());
}

#[test]
fn retries_double_up_to_five_minutes() {
    assert_eq!(retry_delay(1), Duration::from_secs(5));
    assert_eq!(retry_delay(2), Duration::from_secs(10));
    assert_eq!(retry_delay(4), Duration::from_secs(40));
    assert_eq!(retry_delay(30), Duration::from_mins(5));
}

// ---------------------------------------------------------------- hosting

mod hosting {
    use std::sync::atomic::{AtomicBool, Ordering};

    use axum::body::{Body, to_bytes};
    use http::{Request, StatusCode};
    use pingmesh_operator::config::MeshConfig;
    use pingmesh_operator::mesh::server;
    use pingmesh_operator::reconcile::run::{OperatorHttp, operator_router};
    use pingmesh_operator::reconcile::{MeshHost, MeshPolicy};
    use tokio_util::sync::CancellationToken;
    use tower::ServiceExt as _;

    use super::*;

    async fn hosted(dir: &tempfile::TempDir) -> (Arc<MeshHost>, server::RunningController) {
        let config = MeshConfig {
            grpc_addr: "127.0.0.1:0".parse().unwrap(),
            http_addr: "127.0.0.1:0".parse().unwrap(),
            registry: format!("sqlite://{}", dir.path().join("registry.db").display()),
            ..MeshConfig::default()
        };
        let running = server::start(config, CancellationToken::new())
            .await
            .unwrap();
        let host = Arc::new(MeshHost::new(
            running.controller.clone(),
            "pingmesh-system/default".into(),
        ));
        (host, running)
    }

    async fn get(router: &axum::Router, path: &str) -> (StatusCode, String) {
        let response = router
            .clone()
            .oneshot(Request::get(path).body(Body::empty()).unwrap())
            .await
            .unwrap();
        let status = response.status();
        let body = to_bytes(response.into_body(), 1 << 20).await.unwrap();
        (status, String::from_utf8_lossy(&body).into_owned())
    }

    #[tokio::test]
    async fn the_operator_port_serves_probes_metrics_and_the_mesh_api() {
        let dir = tempfile::tempdir().unwrap();
        let (host, _running) = hosted(&dir).await;
        let metrics = ReconcileMetrics::new().unwrap();
        metrics.observe(Outcome::Ok, None, Duration::from_millis(3));
        let ready = Arc::new(AtomicBool::new(false));
        let router = operator_router(OperatorHttp::leading(host, metrics, ready.clone()));
        assert_eq!(get(&router, "/livez").await.0, StatusCode::OK);
        assert_eq!(
            get(&router, "/readyz").await.0,
            StatusCode::SERVICE_UNAVAILABLE
        );
        ready.store(true, Ordering::Relaxed);
        assert_eq!(get(&router, "/readyz").await.0, StatusCode::OK);
        let (status, text) = get(&router, "/metrics").await;
        assert_eq!(status, StatusCode::OK);
        assert!(
            text.contains("pingmesh_reconcile_total{result=\"ok\"} 1"),
            "{text}"
        );
        assert!(
            text.contains("pingmesh_reconcile_duration_seconds_count 1"),
            "{text}"
        );
        assert!(text.contains("pingmesh_controller_agents"), "{text}");
        let (status, summary) = get(&router, "/api/v1/summary").await;
        assert_eq!(status, StatusCode::OK);
        assert!(summary.contains("\"agentsRegistered\":0"), "{summary}");
    }

    #[tokio::test]
    async fn a_standby_is_ready_but_leaves_the_mesh_api_to_the_leader() {
        use pingmesh_operator::reconcile::leader::Role;
        let (role_tx, role) = tokio::sync::watch::channel(Role::Standby {
            leader: Some("operator-1".into()),
            address: Some("10.0.0.9:9400".into()),
        });
        let router = operator_router(OperatorHttp {
            hosted: Arc::default(),
            metrics: ReconcileMetrics::new().unwrap(),
            synced: Arc::new(AtomicBool::new(false)),
            role,
        });
        assert_eq!(get(&router, "/livez").await.0, StatusCode::OK);
        let (status, text) = get(&router, "/readyz").await;
        assert_eq!(status, StatusCode::OK);
        assert!(text.contains("standby"), "{text}");
        let (status, text) = get(&router, "/api/v1/summary").await;
        assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
        assert!(text.contains("operator-1"), "{text}");
        let (_, metrics) = get(&router, "/metrics").await;
        assert!(metrics.contains("pingmesh_operator_leader 0"), "{metrics}");
        assert!(!metrics.contains("pingmesh_controller_agents"), "{metrics}");
        role_tx.send_replace(Role::Lost {
            reason: "the Lease is held by operator-1".into(),
        });
        assert_eq!(
            get(&router, "/readyz").await.0,
            StatusCode::SERVICE_UNAVAILABLE
        );
    }

    #[tokio::test]
    async fn only_the_policy_source_restarts_the_mesh_controller() {
        let dir = tempfile::tempdir().unwrap();
        let (host, _running) = hosted(&dir).await;
        let mut requests = host.policy_requests();
        // The controller's defaults are the spec's defaults.
        let source = mesh(PingMeshSpec::default());
        assert_eq!(host.sync_policy(&source), PolicyState::Applied);
        let faster = mesh(spec_with(|s| s.probing.window_ms = 2_000));
        assert_eq!(host.sync_policy(&faster), PolicyState::Restarting);
        assert!(requests.has_changed().unwrap());
        let wanted: Option<MeshPolicy> = requests.borrow_and_update().clone();
        assert_eq!(wanted.unwrap().pinglist.window_ms, 2_000);
        // Topology and node health settings of the source are taken as they
        // come, without a restart.
        let mut settings = host.settings();
        let rails = mesh(spec_with(|s| {
            s.topology.rnic_tor_label_prefix = "topology.pingmesh.io/tor-".into();
            s.node_health.conditions = true;
        }));
        assert_eq!(host.sync_policy(&rails), PolicyState::Applied);
        assert!(settings.has_changed().unwrap());
        let taken = settings.borrow_and_update().clone();
        assert_eq!(
            taken.topology.rnic_tor_label_prefix,
            "topology.pingmesh.io/tor-"
        );
        assert!(taken.node_health.conditions);
        assert_eq!(taken.mesh.unwrap().uid.as_deref(), Some("mesh-uid"));
        let _ = requests.borrow_and_update();
        let mut other = faster.clone();
        other.metadata.name = Some("other".into());
        assert_eq!(
            host.sync_policy(&other),
            PolicyState::FromOtherMesh("pingmesh-system/default".into())
        );
        assert!(!requests.has_changed().unwrap());
    }
}

#[tokio::test]
async fn an_invalid_spec_is_announced_once_not_on_every_resync() {
    let pm = mesh(spec_with(|s| s.probing.window_ms = 100));
    let first = run(pm.clone(), World::default(), healthy_mesh()).await;
    assert_eq!(first.events().len(), 1);
    let mut reported = pm;
    reported.status = Some(
        serde_json::from_value(first.patch_to("default/status").body["status"].clone()).unwrap(),
    );
    let second = run(reported, World::default(), healthy_mesh()).await;
    assert!(second.events().is_empty(), "{:?}", second.events());
    assert!(!second.calls().iter().any(|c| c.ends_with("/status")));
}
