//! What the reconciler needs to know beyond the `PingMesh` itself.

use std::time::Duration;

/// Operator-wide settings of the objects it builds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OperatorSettings {
    /// gRPC URL agents dial for the mesh controller (`PINGMESH_CONTROLLER`),
    /// e.g. `http://pingmesh-operator.pingmesh-system.svc:9400`.
    pub controller_url: String,
    /// Service account of agent pods; `None`: the namespace's default.
    pub agent_service_account: Option<String>,
    /// How often a mesh is reconciled when nothing changes, to refresh its
    /// status from the mesh controller.
    pub resync: Duration,
}

impl Default for OperatorSettings {
    fn default() -> Self {
        Self {
            controller_url: "http://pingmesh-operator.pingmesh-system.svc:9400".to_owned(),
            agent_service_account: None,
            resync: Duration::from_secs(30),
        }
    }
}
