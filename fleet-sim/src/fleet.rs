//! The simulated fleet: nodes, their endpoints, the ToRs they hang off, and
//! the fault model that makes some paths lose probes.
//!
//! The fabric is rail-optimized, as GPU clusters are built: nodes sit in racks
//! of `nodes_per_rack`; endpoint `i` of every node in a rack hangs off that
//! rack's rail-`i` ToR. So a ToR has `nodes_per_rack` endpoints (its ToR mesh)
//! and every rack has `endpoints_per_node` ToRs. ToRs reach each other over
//! `spines` spine switches; a flow's spine is its flow index modulo `spines`.

use std::collections::HashSet;

use pingmesh_proto::v1::{self, Transport};

/// How the fleet looks and what is broken in it.
#[derive(Debug, Clone)]
pub struct FleetShape {
    pub nodes: usize,
    pub endpoints_per_node: usize,
    pub nodes_per_rack: usize,
    pub transport: Transport,
    pub spines: u32,
    pub faults: Faults,
}

/// The fault model (counts; which components is derived, deterministically).
#[derive(Debug, Clone, Copy)]
pub struct Faults {
    /// Endpoints (RNICs) that lose `endpoint_loss` of every probe sent to or from them.
    pub endpoints: usize,
    pub endpoint_loss: f64,
    /// ToRs that lose `tor_loss` of every probe through them.
    pub tors: usize,
    pub tor_loss: f64,
    /// ToR-to-spine links that drop every probe hashed onto them.
    pub links: usize,
}

/// One node's identity in the simulation.
#[derive(Debug, Clone)]
pub struct SimNode {
    pub index: usize,
    pub name: String,
    pub endpoints: Vec<v1::Endpoint>,
}

/// The broken components, resolved to names.
#[derive(Debug, Clone, Default)]
pub struct FaultSet {
    pub endpoints: HashSet<String>,
    pub tors: HashSet<String>,
    /// (ToR, spine index): both directions through that link are black holes.
    pub links: HashSet<(String, u32)>,
    pub endpoint_loss: f64,
    pub tor_loss: f64,
}

pub fn node_name(index: usize) -> String {
    format!("sim-{index:06}")
}

pub fn tor_name(rack: usize, rail: usize) -> String {
    format!("rack{rack:05}-rail{rail}")
}

/// The ToR of endpoint id `node/port` (ids and ToRs are derived, not looked up).
pub fn tor_of_endpoint(shape: &FleetShape, endpoint_id: &str) -> Option<String> {
    let (node, port) = endpoint_id.split_once('/')?;
    let index: usize = node.strip_prefix("sim-")?.parse().ok()?;
    let rail: usize = port.strip_prefix("rnic")?.parse().ok()?;
    Some(tor_name(rack_of(shape, index), rail))
}

fn rack_of(shape: &FleetShape, node: usize) -> usize {
    // Nodes past the fleet (the joiner of the membership test) go to rack 0.
    if node >= shape.nodes {
        0
    } else {
        node / shape.nodes_per_rack.max(1)
    }
}

impl FleetShape {
    pub fn racks(&self) -> usize {
        self.nodes.div_ceil(self.nodes_per_rack.max(1))
    }

    pub fn tors(&self) -> usize {
        self.racks() * self.endpoints_per_node
    }

    pub fn endpoints(&self) -> usize {
        self.nodes * self.endpoints_per_node
    }

    /// Node `index` with its endpoints (RDMA: a GID and a QPN each; UDP: an address).
    pub fn node(&self, index: usize) -> SimNode {
        let name = node_name(index);
        let rack = rack_of(self, index);
        let endpoints = (0..self.endpoints_per_node)
            .map(|rail| {
                let (address, qpn) = match self.transport {
                    Transport::Udp => (
                        format!(
                            "10.{}.{}.{}:4791",
                            (index >> 16) & 0xff,
                            (index >> 8) & 0xff,
                            index & 0xff
                        ),
                        0,
                    ),
                    _ => (
                        format!(
                            "fd00::{:x}:{:x}:{:x}",
                            index >> 16,
                            index & 0xffff,
                            rail + 1
                        ),
                        0x100 + u32::try_from(rail).unwrap_or(0),
                    ),
                };
                v1::Endpoint {
                    id: format!("{name}/rnic{rail}"),
                    transport: self.transport as i32,
                    address,
                    qpn,
                    tor: tor_name(rack, rail),
                    device: format!("mlx5_{rail}"),
                }
            })
            .collect();
        SimNode {
            index,
            name,
            endpoints,
        }
    }

    /// Which components are broken: spread over the fleet, the same every run.
    pub fn fault_set(&self) -> FaultSet {
        let total = self.endpoints();
        let mut set = FaultSet {
            endpoint_loss: self.faults.endpoint_loss,
            tor_loss: self.faults.tor_loss,
            ..FaultSet::default()
        };
        for j in 0..self.faults.endpoints.min(total) {
            // A stride coprime with any realistic fleet size spreads them out.
            let e = (j * 7_919 + 13) % total;
            let node = e / self.endpoints_per_node;
            let rail = e % self.endpoints_per_node;
            set.endpoints
                .insert(format!("{}/rnic{rail}", node_name(node)));
        }
        let tors = self.tors();
        for j in 0..self.faults.tors.min(tors) {
            let t = (j * 104_729 + tors / 2) % tors;
            set.tors.insert(tor_name(
                t / self.endpoints_per_node,
                t % self.endpoints_per_node,
            ));
        }
        for j in 0..self.faults.links.min(tors) {
            let t = (j * 15_485_863 + tors / 3 + 1) % tors;
            let spine = u32::try_from(j).unwrap_or(0) % self.spines.max(1);
            set.links.insert((
                tor_name(t / self.endpoints_per_node, t % self.endpoints_per_node),
                spine,
            ));
        }
        set
    }
}

/// A rail-optimized RDMA fleet of `nodes` nodes (8 RNICs each, racks of
/// 32, 4 spines) with `faults`, for the simulator's tests.
#[cfg(test)]
pub(crate) fn test_shape(nodes: usize, faults: Faults) -> FleetShape {
    FleetShape {
        nodes,
        endpoints_per_node: 8,
        nodes_per_rack: 32,
        transport: Transport::Rdma,
        spines: 4,
        faults,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn shape(nodes: usize) -> FleetShape {
        test_shape(
            nodes,
            Faults {
                endpoints: 2,
                endpoint_loss: 0.5,
                tors: 1,
                tor_loss: 0.3,
                links: 1,
            },
        )
    }

    #[test]
    fn rail_optimized_racks_give_each_rail_its_own_tor() {
        let s = shape(64);
        assert_eq!(s.tors(), 16);
        let n = s.node(33);
        assert_eq!(n.endpoints.len(), 8);
        assert_eq!(n.endpoints[3].tor, "rack00001-rail3");
        assert_eq!(
            tor_of_endpoint(&s, &n.endpoints[3].id).as_deref(),
            Some("rack00001-rail3")
        );
        assert!(n.endpoints[0].address.parse::<std::net::Ipv6Addr>().is_ok());
    }

    #[test]
    fn faults_are_deterministic_and_within_the_fleet() {
        let s = shape(125);
        let a = s.fault_set();
        assert_eq!(a.endpoints.len(), 2);
        assert_eq!(a.tors.len(), 1);
        assert_eq!(a.links.len(), 1);
        assert_eq!(a.endpoints, s.fault_set().endpoints);
        for e in &a.endpoints {
            assert!(tor_of_endpoint(&s, e).is_some());
        }
    }
}
