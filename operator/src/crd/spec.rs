//! The parts of `PingMesh.spec`. Doc comments here are what `kubectl explain`
//! shows; defaults are serde defaults that schemars also writes into the schema,
//! so the API server fills them in and the stored object shows them.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::ResourceRequirements;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// Image the agents run unless `spec.agent.image` says otherwise.
pub const DEFAULT_AGENT_IMAGE: &str = "ghcr.io/pingmesh/pingmesh-agent:0.1.0";
/// Extended resource an RDMA shared-device plugin commonly advertises.
pub const DEFAULT_DEVICE_PLUGIN_RESOURCE: &str = "rdma/hca_shared_devices_a";
/// Node label that names the ToR switch of a node's endpoints.
pub const DEFAULT_TOR_LABEL: &str = "topology.pingmesh.io/tor";
/// Node condition type written when `spec.nodeHealth.conditions` is on.
pub const DEFAULT_NODE_CONDITION_TYPE: &str = "RdmaNetworkHealthy";

/// How agents probe: RDMA (RoCE v2 UD queue pairs), UDP with kernel timestamps,
/// or `auto`: RDMA on every RNIC a node has, UDP on nodes without one.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub enum TransportMode {
    // Variants carry no doc comments on purpose: schemars would turn them into a
    // `oneOf`, which is not a structural schema. The enum's doc says it all.
    #[default]
    Auto,
    Rdma,
    Udp,
}

impl TransportMode {
    /// The value as users write it.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Auto => "auto",
            Self::Rdma => "rdma",
            Self::Udp => "udp",
        }
    }

    /// Whether agents may open RDMA devices (and so need device access and `IPC_LOCK`).
    pub fn may_use_rdma(self) -> bool {
        matches!(self, Self::Auto | Self::Rdma)
    }
}

/// How agent pods reach RDMA devices: `hostPath` mounts the node's
/// `/dev/infiniband`; `devicePlugin` requests one unit of
/// `rdma.devicePluginResource` and lets the device plugin hand the devices over.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub enum DeviceAccess {
    #[default]
    HostPath,
    DevicePlugin,
}

/// Pull policy of the agent image (as for any container).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub enum ImagePullPolicy {
    Always,
    #[default]
    IfNotPresent,
    Never,
}

impl ImagePullPolicy {
    /// The value as the container spec takes it.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Always => "Always",
            Self::IfNotPresent => "IfNotPresent",
            Self::Never => "Never",
        }
    }
}

/// Agent log level.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub enum LogLevel {
    Error,
    Warn,
    #[default]
    Info,
    Debug,
    Trace,
}

impl LogLevel {
    /// The value as `PINGMESH_LOG_LEVEL` takes it.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Error => "error",
            Self::Warn => "warn",
            Self::Info => "info",
            Self::Debug => "debug",
            Self::Trace => "trace",
        }
    }
}

/// RDMA settings (used where `transport` is `auto` or `rdma`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", default)]
#[schemars(extend("x-kubernetes-validations" = [{
    "rule": "self.deviceAccess != 'devicePlugin' || self.devicePluginResource.matches('^[A-Za-z0-9.-]+/[A-Za-z0-9_.-]+$')",
    "message": "rdma.devicePluginResource must name an extended resource such as rdma/hca_shared_devices_a when rdma.deviceAccess is devicePlugin",
    "fieldPath": ".devicePluginResource",
    "reason": "FieldValueInvalid"
}]))]
pub struct RdmaSpec {
    /// Allow-list of RNIC names (for example `mlx5_0`) the agents probe from;
    /// empty means every RNIC with an active RoCE v2 port.
    #[schemars(
        length(max = 64),
        inner(length(min = 1, max = 64), regex(pattern = r"^[A-Za-z0-9_.-]+$"))
    )]
    pub devices: Vec<String>,
    /// GID table index to probe with, 0 to 255. Leave unset to pick the RoCE v2
    /// IPv4-mapped GID automatically; many NICs put RoCE v1 at index 0, so a
    /// fixed index is only right when every node's GID table agrees.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub gid_index: Option<u8>,
    /// IP traffic class (DSCP << 2 | ECN) of probe packets, 0 to 255.
    pub traffic_class: u8,
    /// InfiniBand service level of probe packets, 0 to 15.
    #[schemars(range(min = 0, max = 15))]
    pub service_level: u8,
    /// How agent pods reach RDMA devices: `hostPath` or `devicePlugin`.
    pub device_access: DeviceAccess,
    /// Extended resource requested (one unit per agent) when `deviceAccess` is `devicePlugin`.
    #[schemars(length(max = 253))]
    pub device_plugin_resource: String,
}

impl Default for RdmaSpec {
    fn default() -> Self {
        Self {
            devices: Vec::new(),
            gid_index: None,
            traffic_class: 0,
            service_level: 0,
            device_access: DeviceAccess::HostPath,
            device_plugin_resource: DEFAULT_DEVICE_PLUGIN_RESOURCE.to_owned(),
        }
    }
}

/// Where endpoints sit in the fabric, read from node labels. An endpoint whose
/// agent names no ToR gets, in order: the value of the label
/// `<rnicTorLabelPrefix><RNIC name>` (RNIC endpoints, when the prefix is set),
/// else the value of `torLabel`, else the mesh controller's default ToR.
/// Values that are not valid ToR names (empty, spaces, non-ASCII, over 320
/// characters) are skipped. When a node's labels (or these settings) change,
/// its endpoints move to the new ToR without their agents registering again.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", default)]
pub struct TopologySpec {
    /// Node label whose value names the ToR switch of all the node's endpoints.
    #[schemars(length(min = 1, max = 317))]
    pub tor_label: String,
    /// Rail-optimized fabrics: the label `<prefix><rnic>` names the ToR of each
    /// RNIC separately (for example prefix `topology.pingmesh.io/tor-` and label
    /// `topology.pingmesh.io/tor-mlx5_0`). Empty turns per-RNIC ToRs off.
    #[schemars(length(max = 253))]
    pub rnic_tor_label_prefix: String,
    /// Agents traceroute probed flows with the flows' own 5-tuples, so a
    /// fault is named down to a link or a spine switch rather than "the
    /// fabric". Needs `CAP_NET_RAW`, which agents then get (and so run as
    /// uid 0, as RDMA agents already do).
    pub path_traces: bool,
    /// Switch name -> the addresses its interfaces answer traces from. Folds
    /// the addresses traces learn into switch names ("link spine-2 -> tor-7");
    /// a traced flow must then run from the sender's ToR to the receiver's,
    /// so name ToRs as the ToR labels do. Without it hops are named by address.
    #[schemars(extend("maxProperties" = 4096))]
    pub switches: BTreeMap<String, Vec<String>>,
}

impl Default for TopologySpec {
    fn default() -> Self {
        Self {
            tor_label: DEFAULT_TOR_LABEL.to_owned(),
            rnic_tor_label_prefix: String::new(),
            path_traces: true,
            switches: BTreeMap::new(),
        }
    }
}

/// Probe rates, ECMP coverage and timing.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", default)]
#[schemars(extend("x-kubernetes-validations" = [{
    "rule": "self.probeTimeoutMs < self.windowMs",
    "message": "probing.probeTimeoutMs must be shorter than probing.windowMs, or no probe could finish inside its window",
    "fieldPath": ".probeTimeoutMs",
    "reason": "FieldValueInvalid"
}]))]
pub struct ProbingSpec {
    /// Probes per second from each endpoint to each endpoint under the same ToR,
    /// above 0 and at most 1000.
    #[schemars(range(max = 1000), extend("minimum" = 0, "exclusiveMinimum" = true))]
    pub tor_mesh_rate_pps: f64,
    /// Probes per second from each endpoint to each sampled endpoint under
    /// another ToR, above 0 and at most 1000.
    #[schemars(range(max = 1000), extend("minimum" = 0, "exclusiveMinimum" = true))]
    pub inter_tor_rate_pps: f64,
    /// Other ToRs each ToR samples for inter-ToR probes (re-drawn every minute);
    /// 0 turns inter-ToR probing off.
    #[schemars(range(min = 0, max = 1000))]
    pub inter_tor_sample_tors: u32,
    /// Equal-cost paths expected between two ToRs, 1 to 64.
    #[schemars(range(min = 1, max = 64))]
    pub ecmp_paths: u32,
    /// Probability, strictly between 0 and 1, that inter-ToR probes of one
    /// target touch every ECMP path; sets how many flow labels (RDMA) or source
    /// ports (UDP) each target gets.
    #[schemars(extend("minimum" = 0, "exclusiveMinimum" = true, "maximum" = 1, "exclusiveMaximum" = true))]
    pub ecmp_coverage: f64,
    /// A probe without both acknowledgements after this many milliseconds counts
    /// as lost; 10 to 60000 and below `windowMs`.
    #[schemars(range(min = 10, max = 60_000))]
    pub probe_timeout_ms: u32,
    /// Aggregation window in milliseconds (wall-clock aligned), 1000 to 3600000.
    #[schemars(range(min = 1_000, max = 3_600_000))]
    pub window_ms: u32,
    /// Probes per second to each service target (an endpoint pair the
    /// services' traced connections join, see `tracing`), above 0 and at most
    /// 1000. The default gives the SLA its 10 probes per 5 s window.
    #[schemars(range(max = 1000), extend("minimum" = 0, "exclusiveMinimum" = true))]
    pub service_rate_pps: f64,
    /// Most service targets per agent, 0 to 4096: the endpoint pairs carrying
    /// the most service connections win. 0 turns service probing off.
    #[schemars(range(min = 0, max = 4096))]
    pub max_service_targets_per_agent: u32,
}

impl Default for ProbingSpec {
    fn default() -> Self {
        Self {
            tor_mesh_rate_pps: 10.0,
            inter_tor_rate_pps: 1.0,
            inter_tor_sample_tors: 5,
            ecmp_paths: 4,
            ecmp_coverage: 0.9,
            probe_timeout_ms: 500,
            window_ms: 5_000,
            service_rate_pps: 5.0,
            max_service_targets_per_agent: 32,
        }
    }
}

/// When a window of a path or ToR pair is bad.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", default)]
pub struct SlaSpec {
    /// A window is bad when lost / (answered + lost) is above this ratio, at
    /// least 0 and below 1.
    #[schemars(extend("minimum" = 0, "maximum" = 1, "exclusiveMaximum" = true))]
    pub max_loss_ratio: f64,
    /// A window is bad when its p99 network RTT (responder delay removed) is
    /// above this many microseconds; at least 1.
    #[schemars(range(min = 1))]
    pub max_p99_network_rtt_micros: u32,
}

impl Default for SlaSpec {
    fn default() -> Self {
        Self {
            max_loss_ratio: 0.01,
            max_p99_network_rtt_micros: 500,
        }
    }
}

/// eBPF tracing of RDMA connections, to rank findings by the services they hit.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", default)]
pub struct TracingSpec {
    /// Load the tracer: agents get `CAP_BPF` and `CAP_PERFMON` and read-only
    /// mounts of `/sys/kernel/btf` and `/sys/kernel/tracing`. Off: neither.
    pub enabled: bool,
}

/// Opt-in Node conditions from findings: a condition of type `conditionType`
/// on every node with registered endpoints, `False` while open findings
/// localize a fault to the node (its paths to at least two other nodes under
/// the same ToR fail and it is their common factor), `True` otherwise. Turning
/// it off removes the condition again.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", default)]
pub struct NodeHealthSpec {
    /// Write a condition of type `conditionType` on each probed Node (False
    /// while findings localize a fault to the node's RNIC, link or host). The
    /// operator's RBAC needs `nodes/status` patch (chart: `rbac.nodeConditions`).
    pub conditions: bool,
    /// Type of the Node condition written when `conditions` is true.
    #[schemars(
        length(min = 1, max = 316),
        regex(pattern = r"^([a-z0-9.-]+/)?[A-Za-z][A-Za-z0-9_.-]*$")
    )]
    pub condition_type: String,
}

impl Default for NodeHealthSpec {
    fn default() -> Self {
        Self {
            conditions: false,
            condition_type: DEFAULT_NODE_CONDITION_TYPE.to_owned(),
        }
    }
}

/// The agent pods (one per selected node, host network).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", default)]
pub struct AgentSpec {
    /// Agent container image.
    #[schemars(length(min = 1, max = 512))]
    pub image: String,
    /// Agent image pull policy: `Always`, `IfNotPresent` or `Never`.
    pub image_pull_policy: ImagePullPolicy,
    /// CPU and memory requests and limits of the agent container. With
    /// `rdma.deviceAccess: devicePlugin` the operator adds the device resource.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub resources: Option<ResourceRequirements>,
    /// `PriorityClass` of agent pods; empty: the cluster default.
    #[schemars(length(max = 253))]
    pub priority_class_name: String,
    /// Host TCP port of the agent's /metrics, /healthz and /readyz.
    #[schemars(range(min = 1, max = 65_535))]
    pub metrics_port: u16,
    /// Host UDP port the agent's UDP responder listens on.
    #[schemars(range(min = 1, max = 65_535))]
    pub udp_port: u16,
    /// Agent log level: `error`, `warn`, `info`, `debug` or `trace`.
    pub log_level: LogLevel,
}

impl Default for AgentSpec {
    fn default() -> Self {
        Self {
            image: DEFAULT_AGENT_IMAGE.to_owned(),
            image_pull_policy: ImagePullPolicy::IfNotPresent,
            resources: None,
            priority_class_name: String::new(),
            metrics_port: 9402,
            udp_port: 9403,
            log_level: LogLevel::Info,
        }
    }
}
