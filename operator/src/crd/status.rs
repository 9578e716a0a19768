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
