//! Faults emulated inside the agent: `pingmesh demo --inject` shows a fault
//! open, get localized and clear on one machine without root or iptables.
//! The prober asks before each probe leaves and before it takes each ACK;
//! a dropped packet is lost exactly as on a wire (the probe times out).

use std::fmt::Debug;

/// Decides, packet by packet, which packets a fault would drop.
pub trait EmulatedFabric: Send + Sync + Debug {
    /// Whether this packet from `from_endpoint` to `to_endpoint` is dropped.
    fn drops(&self, from_endpoint: &str, to_endpoint: &str) -> bool;
}
