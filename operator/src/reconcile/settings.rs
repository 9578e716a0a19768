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
    /// PEM CA bundle agents check the controller's certificate against
    /// (`https://` controller URLs); handed to agents in their environment,
    /// so a new CA rolls the agents.
    pub agent_ca_pem: Option<String>,
    /// The controller serves agents in plain text (`--insecure-plaintext`):
    /// agents are told they may dial it so.
    pub insecure_plaintext: bool,
    /// How often a mesh is reconciled when nothing changes, to refresh its
    /// status from the mesh controller.
    pub resync: Duration,
}

impl Default for OperatorSettings {
    fn default() -> Self {
        Self {
            controller_url: "http://pingmesh-operator.pingmesh-system.svc:9400".to_owned(),
            agent_service_account: None,
            agent_ca_pem: None,
            insecure_plaintext: false,
            resync: Duration::from_secs(30),
        }
    }
}
