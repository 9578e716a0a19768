//! The `PingMesh` custom resource (`pingmesh.io/v1alpha1`, short name `pm`).
//!
//! One `PingMesh` describes one mesh: the nodes that run an agent, how they
//! probe and when the analyzer calls a window bad. The operator turns it into a
//! `ConfigMap` and a `DaemonSet` of agents and reports progress in its status.
//! Field docs double as `kubectl explain pingmesh.spec...` output.

mod manifest;
mod spec;
mod status;
mod validate;

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::{Affinity, Toleration};
use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

pub use manifest::{
    CRD_FILE_NAME, CrdWriteError, KUBERNETES_FORMATS, crd, crd_yaml, sync_targets, write_crd,
};
pub use spec::{
    AgentSpec, DEFAULT_AGENT_IMAGE, DEFAULT_DEVICE_PLUGIN_RESOURCE, DEFAULT_NODE_CONDITION_TYPE,
    DEFAULT_TOR_LABEL, DeviceAccess, ImagePullPolicy, LogLevel, NodeHealthSpec, ProbingSpec,
    RdmaSpec, SlaSpec, TopologySpec, TracingSpec, TransportMode,
};
pub use status::{
    AffectedService, MAX_AFFECTED_SERVICES, MAX_HITS_PER_SERVICE, MAX_OPEN_FINDINGS,
    MAX_ROOT_CAUSES, OpenFinding, PingMeshStatus, StatusRootCause,
};
pub use validate::SpecError;

/// Desired state of a mesh: which nodes run an agent, how agents probe, and
/// when the analyzer calls a path or ToR pair bad. Every field has a default,
/// so `spec: {}` is a working UDP/RDMA mesh on every schedulable node.
#[derive(CustomResource, Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[kube(
    group = "pingmesh.io",
    version = "v1alpha1",
    kind = "PingMesh",
    plural = "pingmeshes",
    singular = "pingmesh",
    shortname = "pm",
    namespaced,
    status = "PingMeshStatus",
    derive = "PartialEq",
    doc = "A mesh of agents that probe each other's RDMA NICs (or UDP ports) and report loss, latency and localized faults.",
    printcolumn = r#"{"name":"Transport","type":"string","description":"Probe transport","jsonPath":".spec.transport"}"#,
    printcolumn = r#"{"name":"Desired","type":"integer","description":"Nodes that should run an agent","jsonPath":".status.agentsDesired"}"#,
    printcolumn = r#"{"name":"Ready","type":"integer","description":"Agents ready","jsonPath":".status.agentsReady"}"#,
    printcolumn = r#"{"name":"Endpoints","type":"integer","description":"Endpoints registered with the mesh controller","jsonPath":".status.endpointsRegistered"}"#,
    printcolumn = r#"{"name":"Findings","type":"integer","description":"Open findings","jsonPath":".status.openFindingCount"}"#,
    printcolumn = r#"{"name":"Available","type":"string","description":"Whether agents are up and probing","jsonPath":".status.conditions[?(@.type==\"Available\")].status"}"#,
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#
)]
#[serde(rename_all = "camelCase", default)]
pub struct PingMeshSpec {
    /// Pause the mesh: the operator scales the agent `DaemonSet` to no node (its
    /// nodeSelector then matches no node) and changes nothing else until
    /// unpaused; pending config changes are applied on unpause. Status keeps
    /// being reported.
    pub paused: bool,
    /// Probe transport: `auto` (RDMA on nodes with RNICs, UDP elsewhere),
    /// `rdma` or `udp`.
    pub transport: TransportMode,
    /// Only nodes with all these labels run an agent (empty: every node the
    /// tolerations allow).
    pub node_selector: BTreeMap<String, String>,
    /// Node affinity and anti-affinity of agent pods.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub affinity: Option<Affinity>,
    /// Taints agent pods tolerate (for example GPU node taints).
    pub tolerations: Vec<Toleration>,
    /// RDMA settings, used where `transport` is `auto` or `rdma`.
    pub rdma: RdmaSpec,
    /// Where endpoints sit in the fabric, read from node labels. An endpoint
    /// whose agent names no ToR gets the value of the node label
    /// `<rnicTorLabelPrefix><RNIC name>` (RNIC endpoints, when the prefix is
    /// set), else of `torLabel`, else the mesh controller's default ToR; values
    /// that are not valid names are skipped. Endpoints move when their node's
    /// labels change. Like `probing`, taken from the policy-source PingMesh
    /// only; changes apply without a restart.
    pub topology: TopologySpec,
    /// Probe rates, ECMP coverage and timing. The operator's mesh controller
    /// takes `probing` and `sla` from one PingMesh (by default the one named
    /// `default` in the operator's namespace) and restarts when they change;
    /// on any other PingMesh they are ignored and the status says so.
    pub probing: ProbingSpec,
    /// When a window of a path or ToR pair counts as bad (see `probing` for
    /// which PingMesh sets it).
    pub sla: SlaSpec,
    /// eBPF tracing of RDMA connections, to rank findings by the services they hit.
    pub tracing: TracingSpec,
    /// Opt-in Node condition from findings, on every node with registered
    /// endpoints: `False` while open findings localize a fault to the node
    /// (its paths to two or more other nodes under its ToR fail, with it as
    /// the common factor), `True` otherwise; removed again when turned off.
    /// Like `probing`, taken from the policy-source PingMesh only.
    pub node_health: NodeHealthSpec,
    /// The agent pods.
    pub agent: AgentSpec,
}

impl Default for PingMeshSpec {
    fn default() -> Self {
        Self {
            paused: false,
            transport: TransportMode::Auto,
            node_selector: BTreeMap::new(),
            affinity: None,
            tolerations: Vec::new(),
            rdma: RdmaSpec::default(),
            topology: TopologySpec::default(),
            probing: ProbingSpec::default(),
            sla: SlaSpec::default(),
            tracing: TracingSpec::default(),
            node_health: NodeHealthSpec::default(),
            agent: AgentSpec::default(),
        }
    }
}
