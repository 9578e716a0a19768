//! From a flow's addresses to registered endpoints: the reporting node's own
//! endpoint at the local end, another node's at the remote end.
//!
//! - RDMA flows match RDMA endpoints by GID.
//! - TCP flows match UDP endpoints by IP, else RDMA endpoints whose GID is the
//!   IPv4-mapped form of the IP (TCP over the RNIC's own address crosses the
//!   same port and ToR).
//!
//! The remote end is left unmapped (and counted) when no other node has the
//! address, when the address is the reporting node's own (the flow never
//! leaves the host), or when several nodes share it (the loopback demo: every
//! agent is 127.0.0.1); guessing would blame faults on the wrong service.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use pingmesh_proto::v1::Transport;
use serde::Serialize;

use super::flow::{FlowKind, TracedFlow};
use crate::mesh::types::MeshEndpoint;

/// Where one end of a service flow sits.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Placement {
    /// Endpoint id.
    pub endpoint: String,
    pub node: String,
    pub tor: String,
    /// `v1::Transport` wire number of the endpoint.
    #[serde(skip)]
    pub transport: i32,
}

pub type Placed = Arc<Placement>;

/// Why a flow's end matched no endpoint.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Unmapped {
    /// The local address is none of the reporting node's endpoints.
    LocalUnknown,
    /// No other node registered the remote address.
    RemoteUnknown,
    /// The remote address is the reporting node's own.
    RemoteSameNode,
    /// Several nodes registered the remote address.
    RemoteAmbiguous,
}

impl Unmapped {
    pub const ALL: [Self; 4] = [
        Self::LocalUnknown,
        Self::RemoteUnknown,
        Self::RemoteSameNode,
        Self::RemoteAmbiguous,
    ];

    /// Bounded metric label.
    pub fn label(self) -> &'static str {
        match self {
            Self::LocalUnknown => "local_unknown",
            Self::RemoteUnknown => "remote_unknown",
            Self::RemoteSameNode => "remote_same_node",
            Self::RemoteAmbiguous => "remote_ambiguous",
        }
    }
}

/// Registered endpoints by address; built once per registry change.
#[derive(Debug, Default)]
pub struct EndpointBook {
    /// UDP endpoints by IP.
    udp: HashMap<IpAddr, Vec<Placed>>,
    /// RDMA endpoints by GID.
    gid: HashMap<IpAddr, Vec<Placed>>,
    /// RDMA endpoints by the IPv4 address in an IPv4-mapped GID.
    gid_v4: HashMap<IpAddr, Vec<Placed>>,
}

impl EndpointBook {
    pub fn new<'a>(endpoints: impl IntoIterator<Item = &'a MeshEndpoint>) -> Self {
        let mut book = Self::default();
        for e in endpoints {
            let placed = Arc::new(Placement {
                endpoint: e.id.clone(),
                node: e.node.clone(),
                tor: e.tor.clone(),
                transport: e.transport,
            });
            match Transport::try_from(e.transport) {
                Ok(Transport::Udp) => {
                    if let Ok(addr) = e.address.parse::<SocketAddr>() {
                        book.udp
                            .entry(addr.ip().to_canonical())
                            .or_default()
                            .push(placed);
                    }
                }
                Ok(Transport::Rdma) => {
                    if let Ok(gid) = e.address.parse::<std::net::Ipv6Addr>() {
                        if let Some(v4) = gid.to_ipv4_mapped() {
                            book.gid_v4
                                .entry(IpAddr::V4(v4))
                                .or_default()
                                .push(placed.clone());
                        }
                        book.gid.entry(IpAddr::V6(gid)).or_default().push(placed);
                    }
                }
                _ => {}
            }
        }
        for list in book
            .udp
            .values_mut()
            .chain(book.gid.values_mut())
            .chain(book.gid_v4.values_mut())
        {
            list.sort_by(|a, b| a.endpoint.cmp(&b.endpoint));
        }
        book
    }

    /// Endpoints with `address`, for a flow of `kind`.
    fn candidates(&self, kind: FlowKind, address: IpAddr) -> &[Placed] {
        let found = match kind {
            FlowKind::Rdma => self.gid.get(&address),
            FlowKind::Tcp => self.udp.get(&address).or_else(|| self.gid_v4.get(&address)),
        };
        found.map_or(&[], Vec::as_slice)
    }

    /// The endpoints at both ends of a flow `node` reported: the local one, and
    /// the remote one or why there is none.
    pub fn place(
        &self,
        node: &str,
        flow: &TracedFlow,
    ) -> Result<(Placed, Result<Placed, Unmapped>), Unmapped> {
        let local = self
            .candidates(flow.kind, flow.local)
            .iter()
            .find(|p| p.node == node)
            .cloned()
            .ok_or(Unmapped::LocalUnknown)?;
        let all = self.candidates(flow.kind, flow.remote);
        let remote = if all.iter().any(|p| p.node == node) {
            Err(Unmapped::RemoteSameNode)
        } else {
            match all.first() {
                None => Err(Unmapped::RemoteUnknown),
                Some(first) if all.iter().any(|p| p.node != first.node) => {
                    Err(Unmapped::RemoteAmbiguous)
                }
                Some(first) => Ok(first.clone()),
            }
        };
        Ok((local, remote))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::mesh::services::flow::TracedFlow;

    fn udp(node: &str, ip: &str) -> MeshEndpoint {
        MeshEndpoint {
            id: format!("{node}/udp0"),
            node: node.to_owned(),
            tor: format!("tor-{node}"),
            transport: Transport::Udp as i32,
            address: format!("{ip}:9403"),
            qpn: 0,
            device: String::new(),
            tor_from_agent: true,
        }
    }

    fn rdma(node: &str, gid: &str) -> MeshEndpoint {
        MeshEndpoint {
            id: format!("{node}/mlx5_0"),
            transport: Transport::Rdma as i32,
            address: gid.to_owned(),
            qpn: 7,
            ..udp(node, "0.0.0.0")
        }
    }

    fn flow(kind: FlowKind, local: &str, remote: &str) -> TracedFlow {
        TracedFlow {
            kind,
            local: local.parse::<IpAddr>().unwrap().to_canonical(),
            remote: remote.parse::<IpAddr>().unwrap().to_canonical(),
            local_port: 1,
            remote_port: 2,
            flow_label: 0,
            pod_uid: None,
            container_id: String::new(),
            pid: 1,
            command: "x".into(),
        }
    }

    #[test]
    fn tcp_flows_map_to_udp_endpoints_by_ip_and_to_rnics_by_their_ipv4_gid() {
        let book = EndpointBook::new(&[
            udp("a", "10.0.0.1"),
            udp("b", "10.0.0.2"),
            rdma("c", "::ffff:10.0.1.3"),
        ]);
        let (local, remote) = book
            .place("a", &flow(FlowKind::Tcp, "10.0.0.1", "10.0.0.2"))
            .unwrap();
        assert_eq!(local.endpoint, "a/udp0");
        assert_eq!(remote.unwrap().endpoint, "b/udp0");
        let (_, remote) = book
            .place("a", &flow(FlowKind::Tcp, "10.0.0.1", "10.0.1.3"))
            .unwrap();
        assert_eq!(remote.unwrap().endpoint, "c/mlx5_0");
    }

    #[test]
    fn rdma_flows_map_by_gid_only() {
        let book = EndpointBook::new(&[
            rdma("a", "fe80::1"),
            rdma("b", "fe80::2"),
            udp("c", "10.0.0.3"),
        ]);
        let (local, remote) = book
            .place("a", &flow(FlowKind::Rdma, "fe80::1", "fe80::2"))
            .unwrap();
        assert_eq!(
            (local.endpoint.as_str(), remote.unwrap().endpoint.as_str()),
            ("a/mlx5_0", "b/mlx5_0")
        );
        assert_eq!(
            book.place("a", &flow(FlowKind::Rdma, "fe80::9", "fe80::2"))
                .unwrap_err(),
            Unmapped::LocalUnknown
        );
    }

    #[test]
    fn a_local_address_of_another_node_is_not_the_reporters() {
        let book = EndpointBook::new(&[udp("a", "10.0.0.1"), udp("b", "10.0.0.2")]);
        assert_eq!(
            book.place("a", &flow(FlowKind::Tcp, "10.0.0.2", "10.0.0.1"))
                .unwrap_err(),
            Unmapped::LocalUnknown
        );
    }

    #[test]
    fn remote_ends_that_are_unknown_local_or_shared_stay_unmapped() {
        let book = EndpointBook::new(&[
            udp("a", "10.0.0.1"),
            udp("b", "127.0.0.1"),
            udp("c", "127.0.0.1"),
        ]);
        let remote = |r: &str| {
            book.place("a", &flow(FlowKind::Tcp, "10.0.0.1", r))
                .unwrap()
                .1
        };
        assert_eq!(remote("10.9.9.9"), Err(Unmapped::RemoteUnknown));
        assert_eq!(remote("10.0.0.1"), Err(Unmapped::RemoteSameNode));
        assert_eq!(remote("127.0.0.1"), Err(Unmapped::RemoteAmbiguous));
    }
}
