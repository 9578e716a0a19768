//! `PingMesh.status`: written by the operator only.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// Most open findings listed in the status; the rest are counted in
/// `openFindingCount` and served in full by the mesh controller's HTTP API.
pub const MAX_OPEN_FINDINGS: usize = 20;

/// Observed state of a mesh.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", default)]
pub struct PingMeshStatus {
    /// The `metadata.generation` this status describes.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// `Available` (agents are up and probing), `Progressing` (agents are being
    /// rolled out or changed) and `Degraded` (the spec is invalid or the operator
    /// cannot apply it; the message says why).
    #[schemars(extend("x-kubernetes-list-type" = "map", "x-kubernetes-list-map-keys" = ["type"]))]
    pub conditions: Vec<Condition>,
    /// Nodes that should run an agent (the `DaemonSet`'s desired count).
    pub agents_desired: i32,
    /// Agent pods that are ready.
    pub agents_ready: i32,
    /// Endpoints (RNICs or UDP ports) registered with the mesh controller.
    pub endpoints_registered: i64,
    /// Paths judged in the last analyzed window.
    pub paths_probed: i64,
    /// Open findings, oldest first, at most 20 (see `openFindingCount`).
    #[schemars(length(max = 20))]
    pub open_findings: Vec<OpenFinding>,
    /// Number of open findings, including those not listed in `openFindings`.
    pub open_finding_count: i64,
    /// Open root causes (the components localization blames), most confident
    /// first, at most 10 (see `rootCauseCount`).
    #[serde(default)]
    #[schemars(length(max = 10))]
    pub root_causes: Vec<StatusRootCause>,
    /// Number of open root causes, including those not listed in `rootCauses`.
    #[serde(default)]
    pub root_cause_count: i64,
    /// Services whose traced connections cross open root causes or findings,
    /// most affected connections first, at most 10 (see
    /// `affectedServiceCount`; the mesh controller's `/api/v1/services` has
    /// them all). Needs `spec.tracing.enabled`.
    #[serde(default)]
    #[schemars(length(max = 10))]
    pub affected_services: Vec<AffectedService>,
    /// Number of affected services, including those not listed.
    #[serde(default)]
    pub affected_service_count: i64,
}

/// Affected services listed in status at most.
pub const MAX_AFFECTED_SERVICES: usize = 10;
/// Root causes and findings listed per affected service at most.
pub const MAX_HITS_PER_SERVICE: usize = 5;

/// A service hit by open faults: the workload that owns the pods whose
/// connections cross them.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct AffectedService {
    /// `kind/namespace/name` of the owner (`Job/ml/train`), `Pod/ns/name` for
    /// a bare pod, `PodUID/<uid>` while the operator does not know the pod
    /// yet, `Process/<command>` for connections outside pods.
    pub service: String,
    /// The owner's kind (`Job`, `StatefulSet`, ...), or `Pod`, `PodUID`, `Process`.
    pub kind: String,
    /// The owner's namespace; absent for `PodUID` and `Process` services.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub namespace: Option<String>,
    /// The owner's name (the pod UID or command when there is no owner).
    pub name: String,
    /// Its connections (TCP) or connected queue pairs (RDMA) that cross a fault.
    pub flows: i64,
    /// Its pods with such connections (processes count one per node and pid).
    pub pods: i64,
    /// What hits it: root causes (`host h31`, `link sp2 -> tor3`) first, then
    /// findings (`pathLoss a -> b`), at most 5.
    #[schemars(length(max = 5))]
    pub hit_by: Vec<String>,
}

/// Root causes listed in status at most.
pub const MAX_ROOT_CAUSES: usize = 10;

/// A localized fault: the component at fault and how sure the analysis is.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct StatusRootCause {
    /// `endpoint`, `host`, `tor`, `link`, `switch` or `unknown`.
    pub kind: String,
    /// The component: a node's endpoint or the node, a ToR, a link
    /// `from -> to`, a switch.
    pub component: String,
    /// `loss`, `latency`, `proberDelay` or `responderDelay`.
    pub signal: String,
    /// 0 to 100.
    pub confidence_percent: i32,
    /// One line for people, with the evidence.
    pub summary: String,
    /// Start of the first window of the streak that opened it.
    pub since: Time,
}

/// A finding the analyzer holds open.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct OpenFinding {
    /// What is wrong: `pathLoss`, `pathLatency`, `torPairLoss` or `torPairLatency`.
    pub kind: String,
    /// Where: `source -> target` endpoints for path findings, ToRs for ToR pairs.
    pub location: String,
    /// Start of the first bad window of the streak that opened the finding.
    pub since: Time,
}
