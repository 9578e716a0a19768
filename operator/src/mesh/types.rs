//! Plain types the registry, pinglist generator and analyzer share.

use pingmesh_proto::v1;
use serde::{Deserialize, Serialize};

/// An endpoint as the mesh controller knows it: owned by a node, under a ToR.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct MeshEndpoint {
    /// Unique in the mesh: "<node>/<port name>".
    pub id: String,
    pub node: String,
    pub tor: String,
    /// `v1::Transport` as its wire number.
    pub transport: i32,
    /// UDP "ip:port" or RDMA GID.
    pub address: String,
    /// RDMA responder QPN; 0 for UDP.
    pub qpn: u32,
    /// RDMA: the RNIC's device name (for example `mlx5_0`), which per-RNIC ToR
    /// labels are keyed by. Empty for UDP.
    #[serde(default)]
    pub device: String,
    /// The agent named `tor` itself. Such a ToR is kept as given; any other was
    /// resolved by the controller and follows the node's labels when they change.
    #[serde(default)]
    pub tor_from_agent: bool,
}

impl MeshEndpoint {
    pub fn to_proto(&self) -> v1::Endpoint {
        v1::Endpoint {
            id: self.id.clone(),
            transport: self.transport,
            address: self.address.clone(),
            qpn: self.qpn,
            tor: self.tor.clone(),
            device: self.device.clone(),
        }
    }
}

/// A registered agent (one per node).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AgentRecord {
    pub node: String,
    /// Changes on every registration of the node.
    pub session: u64,
    pub agent_version: String,
    pub registered_at_ms: u64,
    /// Last time the controller persisted that it heard from the agent.
    pub last_seen_ms: u64,
}
