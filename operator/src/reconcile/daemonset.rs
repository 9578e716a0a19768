//! The agent `DaemonSet`: one host-network agent pod per selected node, with
//! only the privileges its transport and tracer use.

use std::collections::BTreeMap;

use k8s_openapi::api::apps::v1::{
    DaemonSet, DaemonSetSpec, DaemonSetUpdateStrategy, RollingUpdateDaemonSet,
};
use k8s_openapi::api::core::v1::{
    Capabilities, ConfigMapEnvSource, Container, ContainerPort, EnvFromSource, EnvVar,
    EnvVarSource, HTTPGetAction, HostPathVolumeSource, ObjectFieldSelector, PodSpec,
    PodTemplateSpec, Probe, ProjectedVolumeSource, ResourceRequirements, SecurityContext,
    ServiceAccountTokenProjection, Volume, VolumeMount, VolumeProjection,
};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use kube::api::ObjectMeta;

use super::configmap::{agent_config_data, config_hash};
use super::error::BuildError;
use super::names::{CONFIG_HASH_ANNOTATION, PAUSED_NODE_SELECTOR, owned_labels, selector_labels};
use super::owned::MeshIdentity;
use super::settings::OperatorSettings;
use crate::crd::{DeviceAccess, PingMesh};

/// Name of the agent container.
pub const AGENT_CONTAINER: &str = "agent";
/// Unprivileged user of agents that need no capability (UDP without tracing).
const NON_ROOT_UID: i64 = 65_532;

/// The agent `DaemonSet` of a mesh. Its pod template carries the hash of the
/// agent `ConfigMap`'s data, so any config change rolls the agents.
pub fn desired_daemonset(
    pm: &PingMesh,
    settings: &OperatorSettings,
) -> Result<DaemonSet, BuildError> {
    let mesh = MeshIdentity::of(pm)?;
    let name = mesh.agent_name();
    let hash = config_hash(&agent_config_data(pm));
    let template = PodTemplateSpec {
        metadata: Some(ObjectMeta {
            labels: Some(owned_labels(&mesh.name)),
            annotations: Some(BTreeMap::from([
                (CONFIG_HASH_ANNOTATION.to_owned(), hash),
                (
                    "kubectl.kubernetes.io/default-container".to_owned(),
                    AGENT_CONTAINER.to_owned(),
                ),
            ])),
            ..ObjectMeta::default()
        }),
        spec: Some(pod_spec(pm, settings, &name)),
    };
    Ok(DaemonSet {
        metadata: mesh.owned_meta(name),
        spec: Some(DaemonSetSpec {
            selector: LabelSelector {
                match_labels: Some(selector_labels(&mesh.name)),
                ..LabelSelector::default()
            },
            template,
            // One node at a time is far too slow for thousands of nodes.
            update_strategy: Some(DaemonSetUpdateStrategy {
                type_: Some("RollingUpdate".to_owned()),
                rolling_update: Some(RollingUpdateDaemonSet {
                    max_unavailable: Some(IntOrString::String("10%".to_owned())),
                    ..RollingUpdateDaemonSet::default()
                }),
            }),
            ..DaemonSetSpec::default()
        }),
        ..DaemonSet::default()
    })
}

/// Where agents find their `pingmesh`-audience token (docs/security.md).
const TOKEN_DIR: &str = "/var/run/secrets/pingmesh.io";
/// Lifetime asked for the agent token; kubelet renews it at 80 %.
const TOKEN_SECONDS: i64 = 3_600;

/// The projected `ServiceAccount` token agents prove their pod (and so their
/// node) with: audience `pingmesh`, so it is good for nothing else.
fn agent_token() -> (Volume, VolumeMount) {
    let volume = Volume {
        name: "pingmesh-token".to_owned(),
        projected: Some(ProjectedVolumeSource {
            sources: Some(vec![VolumeProjection {
                service_account_token: Some(ServiceAccountTokenProjection {
                    audience: Some(crate::mesh::identity::token::AGENT_AUDIENCE.to_owned()),
                    expiration_seconds: Some(TOKEN_SECONDS),
                    path: "token".to_owned(),
                }),
                ..VolumeProjection::default()
            }]),
            ..ProjectedVolumeSource::default()
        }),
        ..Volume::default()
    };
    let mount = VolumeMount {
        name: "pingmesh-token".to_owned(),
        mount_path: TOKEN_DIR.to_owned(),
        read_only: Some(true),
        ..VolumeMount::default()
    };
    (volume, mount)
}

fn pod_spec(pm: &PingMesh, settings: &OperatorSettings, configmap: &str) -> PodSpec {
    let spec = &pm.spec;
    let privileges = Privileges::of(pm);
    let (token_volume, token_mount) = agent_token();
    let mut volumes = vec![token_volume];
    let mut mounts = vec![token_mount];
    for (name, path) in privileges.host_paths() {
        volumes.push(Volume {
            name: name.to_owned(),
            host_path: Some(HostPathVolumeSource {
                path: path.to_owned(),
                // No type check: `auto` meshes also run on nodes without RDMA devices.
                type_: None,
            }),
            ..Volume::default()
        });
        mounts.push(VolumeMount {
            name: name.to_owned(),
            mount_path: path.to_owned(),
            read_only: Some(path != "/dev/infiniband"),
            ..VolumeMount::default()
        });
    }
    let container = Container {
        name: AGENT_CONTAINER.to_owned(),
        image: Some(spec.agent.image.clone()),
        image_pull_policy: Some(spec.agent.image_pull_policy.as_str().to_owned()),
        env: Some(env(pm, settings)),
        env_from: Some(vec![EnvFromSource {
            config_map_ref: Some(ConfigMapEnvSource {
                name: configmap.to_owned(),
                optional: None,
            }),
            ..EnvFromSource::default()
        }]),
        ports: Some(vec![
            ContainerPort {
                name: Some("metrics".to_owned()),
                container_port: i32::from(spec.agent.metrics_port),
                protocol: Some("TCP".to_owned()),
                ..ContainerPort::default()
            },
            ContainerPort {
                name: Some("probe".to_owned()),
                container_port: i32::from(spec.agent.udp_port),
                protocol: Some("UDP".to_owned()),
                ..ContainerPort::default()
            },
        ]),
        liveness_probe: Some(http_probe("/healthz", spec.agent.metrics_port, 10)),
        readiness_probe: Some(http_probe("/readyz", spec.agent.metrics_port, 5)),
        resources: resources(pm),
        security_context: Some(privileges.security_context()),
        volume_mounts: (!mounts.is_empty()).then_some(mounts),
        ..Container::default()
    };
    PodSpec {
        host_network: Some(true),
        // The tracer finds services' processes (their libibverbs, their
        // cgroups) in the host's /proc.
        host_pid: privileges.tracing.then_some(true),
        // Host network pods would otherwise resolve with the node's resolver only.
        dns_policy: Some("ClusterFirstWithHostNet".to_owned()),
        node_selector: Some(node_selector(pm)),
        affinity: spec.affinity.clone(),
        tolerations: (!spec.tolerations.is_empty()).then(|| spec.tolerations.clone()),
        priority_class_name: (!spec.agent.priority_class_name.is_empty())
            .then(|| spec.agent.priority_class_name.clone()),
        service_account_name: settings.agent_service_account.clone(),
        // Agents talk to the mesh controller only, never to the API server.
        automount_service_account_token: Some(false),
        termination_grace_period_seconds: Some(15),
        containers: vec![container],
        volumes: (!volumes.is_empty()).then_some(volumes),
        ..PodSpec::default()
    }
}

fn env(pm: &PingMesh, settings: &OperatorSettings) -> Vec<EnvVar> {
    let agent = &pm.spec.agent;
    let plain = |name: &str, value: String| EnvVar {
        name: name.to_owned(),
        value: Some(value),
        ..EnvVar::default()
    };
    let mut vars = vec![
        EnvVar {
            name: "NODE_NAME".to_owned(),
            value_from: Some(EnvVarSource {
                field_ref: Some(ObjectFieldSelector {
                    field_path: "spec.nodeName".to_owned(),
                    ..ObjectFieldSelector::default()
                }),
                ..EnvVarSource::default()
            }),
            ..EnvVar::default()
        },
        plain("PINGMESH_CONTROLLER", settings.controller_url.clone()),
        plain("PINGMESH_TOKEN_FILE", format!("{TOKEN_DIR}/token")),
        plain("PINGMESH_UDP_BIND", format!("0.0.0.0:{}", agent.udp_port)),
        plain(
            "PINGMESH_METRICS_ADDR",
            format!("0.0.0.0:{}", agent.metrics_port),
        ),
        plain("PINGMESH_LOG_LEVEL", agent.log_level.as_str().to_owned()),
    ];
    if let Some(ca) = &settings.agent_ca_pem {
        vars.push(plain("PINGMESH_CONTROLLER_CA_PEM", ca.clone()));
    }
    if settings.insecure_plaintext {
        vars.push(plain("PINGMESH_INSECURE_PLAINTEXT", "true".to_owned()));
    }
    vars
}

fn http_probe(path: &str, port: u16, period_seconds: i32) -> Probe {
    Probe {
        http_get: Some(HTTPGetAction {
            path: Some(path.to_owned()),
            port: IntOrString::Int(i32::from(port)),
            ..HTTPGetAction::default()
        }),
        period_seconds: Some(period_seconds),
        // The agent opens its HTTP port within about a second of starting; a
        // probe before that only leaves a "connection refused" Warning Event
        // on every agent start (seen on a real kubelet).
        initial_delay_seconds: Some(2),
        ..Probe::default()
    }
}

/// `spec.nodeSelector` (Linux nodes only, agents are Linux binaries), or a
/// selector no node matches while paused.
fn node_selector(pm: &PingMesh) -> BTreeMap<String, String> {
    if pm.spec.paused {
        let (key, value) = PAUSED_NODE_SELECTOR;
        return BTreeMap::from([(key.to_owned(), value.to_owned())]);
    }
    let mut selector = BTreeMap::from([("kubernetes.io/os".to_owned(), "linux".to_owned())]);
    selector.extend(pm.spec.node_selector.clone());
    selector
}

/// The spec's resources, plus one unit of the RDMA device plugin's resource
/// when devices come from a device plugin.
fn resources(pm: &PingMesh) -> Option<ResourceRequirements> {
    let spec = &pm.spec;
    let mut resources = spec.agent.resources.clone();
    if spec.transport.may_use_rdma() && spec.rdma.device_access == DeviceAccess::DevicePlugin {
        let r = resources.get_or_insert_with(ResourceRequirements::default);
        r.limits.get_or_insert_with(BTreeMap::new).insert(
            spec.rdma.device_plugin_resource.clone(),
            Quantity("1".to_owned()),
        );
    }
    resources
}

/// What the agent needs from the host beyond an unprivileged container.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[allow(clippy::struct_excessive_bools)] // independent features, each granting its own
struct Privileges {
    rdma: bool,
    rdma_host_path: bool,
    tracing: bool,
    path_traces: bool,
}

impl Privileges {
    fn of(pm: &PingMesh) -> Self {
        let rdma = pm.spec.transport.may_use_rdma();
        Self {
            rdma,
            rdma_host_path: rdma && pm.spec.rdma.device_access == DeviceAccess::HostPath,
            tracing: pm.spec.tracing.enabled,
            path_traces: pm.spec.topology.path_traces,
        }
    }

    fn capabilities(self) -> Vec<String> {
        let mut caps = Vec::new();
        if self.rdma {
            // Pinning queue-pair memory.
            caps.push("IPC_LOCK".to_owned());
        }
        if self.tracing {
            caps.push("BPF".to_owned());
            caps.push("PERFMON".to_owned());
            // Reading the memory maps and root of other containers' processes
            // (to find their libibverbs) passes the kernel's ptrace access check.
            caps.push("SYS_PTRACE".to_owned());
        }
        if self.path_traces {
            // Raw sockets: trace datagrams with a flow's own source port, and
            // the routers' ICMP answers.
            caps.push("NET_RAW".to_owned());
        }
        caps
    }

    /// (volume name, host path) pairs, mounted at the same path.
    fn host_paths(self) -> Vec<(&'static str, &'static str)> {
        let mut paths = Vec::new();
        if self.rdma_host_path {
            paths.push(("dev-infiniband", "/dev/infiniband"));
        }
        if self.tracing {
            paths.push(("sys-kernel-btf", "/sys/kernel/btf"));
            paths.push(("sys-kernel-tracing", "/sys/kernel/tracing"));
            // Pod attribution of processes that exited: cgroup id -> directory.
            paths.push(("sys-fs-cgroup", "/sys/fs/cgroup"));
        }
        paths
    }

    fn security_context(self) -> SecurityContext {
        let add = self.capabilities();
        // Added capabilities only take effect for root in a container (no
        // ambient capabilities), so only agents that need one run as root.
        let needs_root = !add.is_empty();
        SecurityContext {
            allow_privilege_escalation: Some(false),
            read_only_root_filesystem: Some(true),
            run_as_non_root: Some(!needs_root),
            run_as_user: Some(if needs_root { 0 } else { NON_ROOT_UID }),
            capabilities: Some(Capabilities {
                drop: Some(vec!["ALL".to_owned()]),
                add: (!add.is_empty()).then_some(add),
            }),
            ..SecurityContext::default()
        }
    }
}
