//! The 5-tuple a probed flow travels on, worked out the way the prober and
//! responder send it, so that a trace with that tuple hashes onto the same
//! ECMP path (switches hash addresses, protocol and ports only).

use std::net::{IpAddr, Ipv4Addr, SocketAddr};

use std::sync::Arc;

use pingmesh_proto::v1::{Endpoint, Pinglist, Transport};
use pingmesh_proto::window::unix_now_ms;
use tokio::sync::watch;

use super::roce::{ROCE_V2_PORT, roce_udp_source_port};
use crate::probe::flows::{FLOW_LABEL_ROTATION, UdpFlowSources, rotating_label};
use crate::transport::rdma::Gid;
use crate::transport::rdma::flow_label::{FLOW_LABEL_MASK, ack_flow_label};

/// A UDP 5-tuple (the protocol is always UDP) and, for RDMA, the flow label it
/// was derived from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FlowTuple {
    pub source: SocketAddr,
    pub destination: SocketAddr,
    /// RDMA: the GRH flow label the source port derives from. 0 over UDP.
    pub flow_label: u32,
}

/// Why a flow's tuple cannot be worked out.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum TupleError {
    #[error("the endpoint's transport is not the one this agent probes with")]
    WrongTransport,
    #[error("the endpoint address is not ip:port (UDP) or a GID (RDMA)")]
    BadAddress,
    #[error("IPv6 GIDs are not traced (RoCE v2 over IPv4 only)")]
    Ipv6,
    #[error("the prober has no socket open yet")]
    NotProbing,
}

impl TupleError {
    pub fn category(self) -> &'static str {
        match self {
            Self::WrongTransport => "wrong_transport",
            Self::BadAddress => "bad_address",
            Self::Ipv6 => "ipv6",
            Self::NotProbing => "not_probing",
        }
    }
}

/// How this agent's probes and ACKs leave, per transport.
#[derive(Debug, Clone)]
pub enum FlowTuples {
    /// Flow `f` leaves from prober socket `f % n`; ACKs leave from the
    /// responder socket (the endpoint's address) to the prober's port.
    Udp(UdpFlowSources),
    /// Every flow leaves the RNIC's GID address towards the target's, to port
    /// 4791, from the port the driver derives from the flow label: the
    /// prober's rotating label of the flow, or the label a SERVICE target of
    /// the pinglist in force pins (its probes all carry it).
    Rdma {
        max_flows: u16,
        pinglists: watch::Receiver<Option<Arc<Pinglist>>>,
    },
}

impl FlowTuples {
    /// The tuple of flow `flow` from this agent's endpoint `source` to `target`.
    pub fn forward(
        &self,
        source: &Endpoint,
        target: &Endpoint,
        flow: u32,
    ) -> Result<FlowTuple, TupleError> {
        match self {
            Self::Udp(sources) => {
                let destination = udp_address(target)?;
                udp_address(source)?;
                let source = sources.source_of(flow).ok_or(TupleError::NotProbing)?;
                Ok(FlowTuple {
                    source,
                    destination,
                    flow_label: 0,
                })
            }
            Self::Rdma {
                max_flows,
                pinglists,
            } => {
                let from = rdma_ipv4(source)?;
                let to = rdma_ipv4(target)?;
                let label = pinned_label(pinglists, &source.id, &target.id).unwrap_or_else(|| {
                    let rotation =
                        u64::try_from(FLOW_LABEL_ROTATION.as_millis()).unwrap_or(u64::MAX);
                    let flow = u16::try_from(flow % u32::from((*max_flows).max(1))).unwrap_or(0);
                    rotating_label(flow, *max_flows, rotation, unix_now_ms())
                });
                Ok(roce_tuple(from, to, label))
            }
        }
    }

    /// The tuple the ACKs of a prober's flow take back: from this agent's
    /// endpoint `responder` to `prober`, whose forward trace reported
    /// `prober_port` (UDP) or `prober_label` (RDMA).
    pub fn reverse(
        &self,
        responder: &Endpoint,
        prober: &Endpoint,
        prober_port: u16,
        _prober_label: u32,
    ) -> Result<FlowTuple, TupleError> {
        match self {
            Self::Udp(_) => {
                let source = udp_address(responder)?;
                let prober_ip = udp_address(prober)?.ip();
                Ok(FlowTuple {
                    source,
                    destination: SocketAddr::new(prober_ip, prober_port),
                    flow_label: 0,
                })
            }
            Self::Rdma { .. } => {
                let from = rdma_ipv4(responder)?;
                let to = rdma_ipv4(prober)?;
                let prober_gid = Gid::from_ipv4(to.octets());
                // RoCE v2 over IPv4 carries no flow label, so the responder
                // derives its ACK label from the prober's GID and QPN (see
                // flow_label::ack_flow_label); the probe's own label (which an
                // IPv6 GRH would carry and the ACK echo) does not reach it.
                let label = ack_flow_label(None, &prober_gid, prober.qpn);
                Ok(roce_tuple(from, to, label))
            }
        }
    }
}

/// The flow label the pinglist in force pins for probes from `source` to
/// `target` (a SERVICE target with the service's own label), if any.
fn pinned_label(
    pinglists: &watch::Receiver<Option<Arc<Pinglist>>>,
    source: &str,
    target: &str,
) -> Option<u32> {
    let list = pinglists.borrow();
    list.as_ref()?
        .targets
        .iter()
        .find(|t| {
            t.source_endpoint == source
                && t.flow_label & FLOW_LABEL_MASK != 0
                && t.target.as_ref().is_some_and(|e| e.id == target)
        })
        .map(|t| t.flow_label & FLOW_LABEL_MASK)
}

fn roce_tuple(from: Ipv4Addr, to: Ipv4Addr, label: u32) -> FlowTuple {
    FlowTuple {
        source: SocketAddr::new(IpAddr::V4(from), roce_udp_source_port(label)),
        destination: SocketAddr::new(IpAddr::V4(to), ROCE_V2_PORT),
        flow_label: label,
    }
}

fn udp_address(endpoint: &Endpoint) -> Result<SocketAddr, TupleError> {
    if endpoint.transport != Transport::Udp as i32 {
        return Err(TupleError::WrongTransport);
    }
    endpoint.address.parse().map_err(|_| TupleError::BadAddress)
}

fn rdma_ipv4(endpoint: &Endpoint) -> Result<Ipv4Addr, TupleError> {
    if endpoint.transport != Transport::Rdma as i32 {
        return Err(TupleError::WrongTransport);
    }
    let gid: Gid = endpoint
        .address
        .parse()
        .map_err(|_| TupleError::BadAddress)?;
    if !gid.is_ipv4_mapped() {
        return Err(TupleError::Ipv6);
    }
    let o = gid.0;
    Ok(Ipv4Addr::new(o[12], o[13], o[14], o[15]))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn endpoint(transport: Transport, address: &str, qpn: u32) -> Endpoint {
        Endpoint {
            id: "n/e".into(),
            transport: transport as i32,
            address: address.into(),
            qpn,
            ..Endpoint::default()
        }
    }

    #[test]
    fn udp_flows_leave_from_the_probers_socket_of_that_flow() {
        let sources = UdpFlowSources::default();
        let tuples = FlowTuples::Udp(sources.clone());
        let me = endpoint(Transport::Udp, "10.0.0.1:9403", 0);
        let peer = endpoint(Transport::Udp, "10.0.0.2:9403", 0);
        assert_eq!(
            tuples.forward(&me, &peer, 0),
            Err(TupleError::NotProbing),
            "no socket yet"
        );
        sources.push_for_test("10.0.0.1:40001".parse().unwrap());
        sources.push_for_test("10.0.0.1:40002".parse().unwrap());
        let t = tuples.forward(&me, &peer, 3).unwrap();
        assert_eq!(t.source, "10.0.0.1:40002".parse().unwrap());
        assert_eq!(t.destination, "10.0.0.2:9403".parse().unwrap());
        // The ACK way: responder socket to the prober's port.
        let back = tuples.reverse(&peer, &me, 40002, 0).unwrap();
        assert_eq!(back.source, "10.0.0.2:9403".parse().unwrap());
        assert_eq!(back.destination, "10.0.0.1:40002".parse().unwrap());
    }

    #[test]
    fn rdma_flows_use_the_roce_port_and_the_label_derived_source_port() {
        let tuples = FlowTuples::Rdma {
            max_flows: 8,
            pinglists: watch::channel(None).1,
        };
        let me = endpoint(Transport::Rdma, "::ffff:10.0.0.1", 0x11);
        let peer = endpoint(Transport::Rdma, "::ffff:10.0.0.2", 0x22);
        let t = tuples.forward(&me, &peer, 2).unwrap();
        assert_eq!(t.destination, "10.0.0.2:4791".parse().unwrap());
        assert_eq!(t.source.ip(), "10.0.0.1".parse::<IpAddr>().unwrap());
        assert_ne!(t.flow_label, 0);
        assert_eq!(t.source.port(), roce_udp_source_port(t.flow_label));
        let back = tuples
            .reverse(&peer, &me, t.source.port(), t.flow_label)
            .unwrap();
        assert_eq!(back.destination, "10.0.0.1:4791".parse().unwrap());
        let ack_label = ack_flow_label(None, &Gid::from_ipv4([10, 0, 0, 1]), 0x11);
        assert_eq!(back.source.port(), roce_udp_source_port(ack_label));
    }

    #[test]
    fn a_service_target_traces_with_the_services_own_flow_label() {
        let me = endpoint(Transport::Rdma, "::ffff:10.0.0.1", 0x11);
        let mut peer = endpoint(Transport::Rdma, "::ffff:10.0.0.2", 0x22);
        peer.id = "n2/mlx5_0".into();
        let service = pingmesh_proto::v1::PingTarget {
            source_endpoint: me.id.clone(),
            target: Some(peer.clone()),
            flow_label: 0xA_BCDE,
            ..pingmesh_proto::v1::PingTarget::default()
        };
        let (tx, rx) = watch::channel(None);
        let tuples = FlowTuples::Rdma {
            max_flows: 8,
            pinglists: rx,
        };
        let rotating = tuples.forward(&me, &peer, 3).unwrap();
        assert_ne!(rotating.flow_label, 0xA_BCDE);
        tx.send_replace(Some(Arc::new(Pinglist {
            targets: vec![service],
            ..Pinglist::default()
        })));
        for flow in [0, 3] {
            let t = tuples.forward(&me, &peer, flow).unwrap();
            assert_eq!(t.flow_label, 0xA_BCDE);
            assert_eq!(t.source.port(), roce_udp_source_port(0xA_BCDE));
        }
    }

    #[test]
    fn wrong_transports_bad_addresses_and_ipv6_gids_are_refused() {
        let udp = FlowTuples::Udp(UdpFlowSources::default());
        let rdma = FlowTuples::Rdma {
            max_flows: 4,
            pinglists: watch::channel(None).1,
        };
        let u = endpoint(Transport::Udp, "10.0.0.1:1", 0);
        let r = endpoint(Transport::Rdma, "::ffff:10.0.0.2", 3);
        assert_eq!(udp.forward(&u, &r, 0), Err(TupleError::WrongTransport));
        assert_eq!(rdma.forward(&r, &u, 0), Err(TupleError::WrongTransport));
        let bad = endpoint(Transport::Udp, "not an address", 0);
        assert_eq!(udp.reverse(&bad, &u, 1, 0), Err(TupleError::BadAddress));
        let v6 = endpoint(Transport::Rdma, "fe80::1", 3);
        assert_eq!(rdma.forward(&v6, &r, 0), Err(TupleError::Ipv6));
    }
}
