//! How a prober spreads probes over ECMP paths on each transport.
//!
//! The controller asks for `flows` distinct flows per target (enough to cover
//! its ECMP paths with the configured probability). Over UDP a flow is a
//! source port, so the prober opens one socket per flow. Over RDMA a flow is
//! a GRH flow label, which RoCE v2 drivers hash into the UDP source port: one
//! queue pair carries every flow, and the labels rotate every hour (on the
//! wall clock, so every agent rotates together) so that over time more paths
//! than `flows` get covered. Rotating rarely keeps the address-handle cache
//! warm: each new label costs one `ibv_create_ah`.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use pingmesh_proto::window::unix_now_ms;

use pingmesh_proto::v1::{Endpoint, PingTarget, Transport};

use crate::transport::rdma::flow_label::flow_label;
use crate::transport::rdma::{Gid, RdmaDest};
use crate::transport::socket::ProbeSocket;
use crate::transport::udp::UdpProbeSocket;
use crate::transport::{TimestampMode, TransportError};

/// Largest valid queue pair number (24 bits).
const MAX_QPN: u32 = 0x00FF_FFFF;
/// The GRH flow label is 20 bits.
const FLOW_LABEL_MASK: u32 = 0x000F_FFFF;

/// How long one block of RDMA flow labels is used before the next one.
pub const FLOW_LABEL_ROTATION: Duration = Duration::from_hours(1);

/// The transport side of a prober.
pub trait FlowTransport: Send + 'static {
    type Socket: ProbeSocket;

    /// Where `endpoint` is reached on this transport, or why it cannot be.
    fn target_address(
        &self,
        endpoint: &Endpoint,
    ) -> Result<<Self::Socket as ProbeSocket>::Peer, &'static str>;

    /// Where a pinglist target is probed: its endpoint's address, plus what
    /// the target pins on this transport (RDMA: a service's own flow label).
    fn pinned_address(
        &self,
        target: &PingTarget,
        endpoint: &Endpoint,
    ) -> Result<<Self::Socket as ProbeSocket>::Peer, &'static str> {
        let _ = target;
        self.target_address(endpoint)
    }

    /// Opens what `flows` distinct flows need; returns the sockets it added.
    fn open_flows(&mut self, flows: u16) -> Result<Vec<Arc<Self::Socket>>, TransportError>;

    /// Which socket (in the order opened) carries `flow` to `target`, and the
    /// destination to send to.
    fn route(
        &self,
        target: <Self::Socket as ProbeSocket>::Peer,
        flow: u16,
    ) -> (usize, <Self::Socket as ProbeSocket>::Peer);
}

/// The local addresses of a UDP prober's sockets, in the order opened: flow
/// `f` leaves from entry `f % len`. Shared with the path tracer, which must
/// send from exactly the port a flow is probed from.
#[derive(Debug, Clone, Default)]
pub struct UdpFlowSources(Arc<std::sync::RwLock<Vec<SocketAddr>>>);

impl UdpFlowSources {
    /// Where flow `flow` leaves from; `None` before the prober opened a socket.
    pub fn source_of(&self, flow: u32) -> Option<SocketAddr> {
        let sources = self
            .0
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let count = u32::try_from(sources.len()).ok().filter(|n| *n > 0)?;
        sources.get(usize::try_from(flow % count).ok()?).copied()
    }

    #[cfg(test)]
    pub fn push_for_test(&self, addr: SocketAddr) {
        self.push(addr);
    }

    fn push(&self, addr: SocketAddr) {
        self.0
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .push(addr);
    }
}

/// UDP: one socket, and so one source port, per flow.
#[derive(Debug)]
pub struct UdpFlows {
    bind_ip: IpAddr,
    timestamps: TimestampMode,
    max_flows: u16,
    opened: u16,
    sources: UdpFlowSources,
}

impl UdpFlows {
    /// Sockets bind to `bind_ip`; at most `max_flows` are opened whatever the controller asks.
    pub fn new(bind_ip: IpAddr, timestamps: TimestampMode, max_flows: u16) -> Self {
        Self {
            bind_ip,
            timestamps,
            max_flows: max_flows.max(1),
            opened: 0,
            sources: UdpFlowSources::default(),
        }
    }

    /// The sockets' local addresses as they open, for the path tracer.
    pub fn sources(&self) -> UdpFlowSources {
        self.sources.clone()
    }
}

impl FlowTransport for UdpFlows {
    type Socket = UdpProbeSocket;

    fn target_address(&self, endpoint: &Endpoint) -> Result<SocketAddr, &'static str> {
        if endpoint.transport != Transport::Udp as i32 {
            return Err("not a UDP endpoint");
        }
        endpoint
            .address
            .parse()
            .map_err(|_| "address is not ip:port")
    }

    fn open_flows(&mut self, flows: u16) -> Result<Vec<Arc<UdpProbeSocket>>, TransportError> {
        let wanted = flows.clamp(1, self.max_flows);
        let mut added = Vec::new();
        while self.opened < wanted {
            let addr = SocketAddr::new(self.bind_ip, 0);
            let socket = UdpProbeSocket::bind(addr, self.timestamps)?;
            self.sources.push(socket.local_addr());
            added.push(Arc::new(socket));
            self.opened += 1;
        }
        Ok(added)
    }

    fn route(&self, target: SocketAddr, flow: u16) -> (usize, SocketAddr) {
        (usize::from(flow % self.opened.max(1)), target)
    }
}

/// RDMA: every flow on the prober queue pair, told apart by flow label.
#[derive(Debug)]
pub struct RdmaFlows<S> {
    prober: Arc<S>,
    handed_out: bool,
    max_flows: u16,
    rotation_ms: u64,
}

impl<S> RdmaFlows<S> {
    /// Flows of `prober` (the RNIC's prober queue pair); at most `max_flows`
    /// labels, rotated every [`FLOW_LABEL_ROTATION`].
    pub fn new(prober: Arc<S>, max_flows: u16) -> Self {
        Self {
            prober,
            handed_out: false,
            max_flows: max_flows.max(1),
            rotation_ms: u64::try_from(FLOW_LABEL_ROTATION.as_millis()).unwrap_or(u64::MAX),
        }
    }

    /// The label of `flow` at wall-clock time `unix_ms` (see [`rotating_label`]).
    pub fn label_at(&self, flow: u16, unix_ms: u64) -> u32 {
        rotating_label(flow, self.max_flows, self.rotation_ms, unix_ms)
    }
}

/// The RDMA flow label a prober with `max_flows` flows gives `flow` at
/// wall-clock time `unix_ms`: block `unix_ms / rotation_ms` of `max_flows`
/// consecutive labels, so consecutive blocks share none.
pub fn rotating_label(flow: u16, max_flows: u16, rotation_ms: u64, unix_ms: u64) -> u32 {
    let max_flows = max_flows.max(1);
    let block = unix_ms / rotation_ms.max(1);
    let salt = block.wrapping_mul(u64::from(max_flows)) % u64::from(u32::MAX);
    flow_label(
        u32::from(flow % max_flows),
        u32::try_from(salt).unwrap_or(0),
    )
}

impl<S: ProbeSocket<Peer = RdmaDest>> FlowTransport for RdmaFlows<S> {
    type Socket = S;

    fn target_address(&self, endpoint: &Endpoint) -> Result<RdmaDest, &'static str> {
        if endpoint.transport != Transport::Rdma as i32 {
            return Err("not an RDMA endpoint");
        }
        let gid: Gid = endpoint
            .address
            .parse()
            .map_err(|_| "address is not a GID")?;
        if endpoint.qpn == 0 || endpoint.qpn > MAX_QPN {
            return Err("QPN is not a 24-bit non-zero number");
        }
        Ok(RdmaDest {
            gid,
            qpn: endpoint.qpn,
            flow_label: 0,
        })
    }

    /// A SERVICE target with a flow label is probed with exactly that label,
    /// so the probes hash onto the service's own ECMP path.
    fn pinned_address(
        &self,
        target: &PingTarget,
        endpoint: &Endpoint,
    ) -> Result<RdmaDest, &'static str> {
        Ok(RdmaDest {
            flow_label: target.flow_label & FLOW_LABEL_MASK,
            ..self.target_address(endpoint)?
        })
    }

    fn open_flows(&mut self, _flows: u16) -> Result<Vec<Arc<S>>, TransportError> {
        if self.handed_out {
            return Ok(Vec::new());
        }
        self.handed_out = true;
        Ok(vec![self.prober.clone()])
    }

    fn route(&self, target: RdmaDest, flow: u16) -> (usize, RdmaDest) {
        if target.flow_label != 0 {
            return (0, target);
        }
        (
            0,
            RdmaDest {
                flow_label: self.label_at(flow, unix_now_ms()),
                ..target
            },
        )
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashSet;

    use super::*;
    use crate::transport::TimestampSupport;
    use crate::transport::socket::{ProbeEvent, SendReceipt};

    /// A socket that is never used: route and address checks only.
    struct Unused;

    impl ProbeSocket for Unused {
        type Peer = RdmaDest;
        fn timestamp_support(&self) -> TimestampSupport {
            TimestampSupport::NONE
        }
        async fn send_to(&self, _: &[u8], _: RdmaDest) -> Result<SendReceipt, TransportError> {
            Err(TransportError::Unsupported { what: "test" })
        }
        async fn next_event(&self, _: &mut [u8]) -> Result<ProbeEvent<RdmaDest>, TransportError> {
            std::future::pending().await
        }
    }

    fn rdma_endpoint(address: &str, qpn: u32) -> Endpoint {
        Endpoint {
            id: "n2/mlx5_0-p1".into(),
            transport: Transport::Rdma as i32,
            address: address.into(),
            qpn,
            tor: String::new(),
            device: "mlx5_0".into(),
        }
    }

    #[test]
    fn rdma_targets_need_a_gid_and_a_24_bit_qpn() {
        let flows = RdmaFlows::new(Arc::new(Unused), 8);
        let ok = flows
            .target_address(&rdma_endpoint("::ffff:10.0.0.2", 0x11))
            .unwrap();
        assert_eq!(ok.gid, Gid::from_ipv4([10, 0, 0, 2]));
        assert_eq!(ok.qpn, 0x11);
        assert!(
            flows
                .target_address(&rdma_endpoint("::ffff:10.0.0.2", 0))
                .is_err()
        );
        assert!(
            flows
                .target_address(&rdma_endpoint("::ffff:10.0.0.2", 0x0100_0000))
                .is_err()
        );
        assert!(
            flows
                .target_address(&rdma_endpoint("10.0.0.2:9", 5))
                .is_err()
        );
        let mut udp = rdma_endpoint("10.0.0.2:9403", 0);
        udp.transport = Transport::Udp as i32;
        assert_eq!(flows.target_address(&udp), Err("not an RDMA endpoint"));
    }

    #[test]
    fn rdma_flows_share_one_queue_pair_with_distinct_labels_that_rotate_hourly() {
        let mut flows = RdmaFlows::new(Arc::new(Unused), 4);
        assert_eq!(flows.open_flows(16).unwrap().len(), 1);
        assert!(flows.open_flows(16).unwrap().is_empty());
        let target = flows
            .target_address(&rdma_endpoint("::ffff:10.0.0.2", 0x11))
            .unwrap();
        let (socket, dest) = flows.route(target, 3);
        assert_eq!(socket, 0);
        assert_eq!((dest.gid, dest.qpn), (target.gid, target.qpn));
        assert_ne!(dest.flow_label, 0);

        let hour = 3_600_000;
        let labels =
            |unix_ms: u64| -> Vec<u32> { (0..8).map(|f| flows.label_at(f, unix_ms)).collect() };
        let first = labels(5 * hour + 1);
        // Capped at max_flows distinct labels, none zero, flow f and f+4 alike.
        let distinct: HashSet<u32> = first.iter().copied().collect();
        assert_eq!(distinct.len(), 4);
        assert!(!distinct.contains(&0));
        assert_eq!(first[0], first[4]);
        assert_eq!(labels(6 * hour - 1), first, "stable within the hour");
        let next: HashSet<u32> = labels(6 * hour).into_iter().collect();
        assert!(distinct.is_disjoint(&next), "{distinct:?} vs {next:?}");
    }

    #[test]
    fn a_service_target_is_probed_with_exactly_its_flow_label() {
        let flows = RdmaFlows::new(Arc::new(Unused), 4);
        let endpoint = rdma_endpoint("::ffff:10.0.0.2", 0x11);
        let service = PingTarget {
            flow_label: 0xF_ABCDE,
            ..PingTarget::default()
        };
        let pinned = flows.pinned_address(&service, &endpoint).unwrap();
        assert_eq!(pinned.flow_label, 0xA_BCDE, "20 bits");
        for flow in 0..8 {
            assert_eq!(flows.route(pinned, flow).1.flow_label, 0xA_BCDE);
        }
        // Without a label: the rotating ECMP labels.
        let plain = flows
            .pinned_address(&PingTarget::default(), &endpoint)
            .unwrap();
        assert_eq!(plain.flow_label, 0);
        assert_ne!(flows.route(plain, 1).1.flow_label, 0);
    }

    #[tokio::test]
    async fn udp_flows_open_one_socket_per_flow_up_to_the_cap() {
        let mut flows = UdpFlows::new([127, 0, 0, 1].into(), TimestampMode::Off, 3);
        assert_eq!(flows.open_flows(2).unwrap().len(), 2);
        assert_eq!(flows.open_flows(8).unwrap().len(), 1);
        assert!(flows.open_flows(8).unwrap().is_empty());
        let target: SocketAddr = ([127, 0, 0, 2], 9).into();
        let sockets: Vec<usize> = (0..6).map(|f| flows.route(target, f).0).collect();
        assert_eq!(sockets, [0, 1, 2, 0, 1, 2]);
        let mut rdma = rdma_endpoint("::ffff:10.0.0.2", 1);
        assert!(flows.target_address(&rdma).is_err());
        rdma.transport = Transport::Udp as i32;
        rdma.address = "127.0.0.2:9".into();
        assert_eq!(flows.target_address(&rdma), Ok(target));
    }
}
