//! The bounded table of the node's live service flows, fed by tracer events.
//!
//! - A TCP connection enters when it reaches ESTABLISHED and leaves at CLOSE.
//!   It is keyed by the socket's kernel address, which every event of one
//!   connection carries (and which the kernel reuses only after CLOSE).
//! - An RDMA queue pair enters when it moves to RTR and leaves when
//!   `ibv_destroy_qp` is called on it; keyed by (pid, QPN).
//! - A flow nothing has said anything about for `idle_ttl` is checked with the
//!   caller's liveness test: still alive, it stays (TCP and RDMA connections
//!   are silent while they carry data); gone, it leaves. That covers close and
//!   destroy records lost to a full ring buffer and processes that died
//!   without tearing their queue pairs down.
//! - Full table: new flows are refused and counted, never an unbounded table.
//!
//! Who owns a connection: a process's own `connect()` runs in its context, so
//! the record of an active open names it. A passive open completes in softirq
//! context, where the pid and cgroup are whatever task was interrupted: those
//! flows take the owner of the listening socket on their port (its `listen()`
//! ran in the server's context), or stay unattributed when the listener was
//! opened before the tracer started.
use std::collections::HashMap;
use std::net::IpAddr;

use pingmesh_proto::v1::{ServiceFlow, ServiceFlowKind};

use super::cgroup::PodRef;
use crate::tracer::{Origin, QpDestroyEvent, QpRtrEvent, TcpEvent, TcpState, TraceEvent};

/// Which process (and pod) a flow belongs to.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Owner {
    /// 0: unknown (a passive open whose listener was not seen).
    pub pid: u32,
    pub command: String,
    pub pod: Option<PodRef>,
}

/// What the table needs from the host: process to pod, RNIC port to GID.
pub trait Resolve {
    /// The owner of the process a record came from.
    fn owner(&mut self, origin: &Origin, now_ms: u64) -> Owner;
    /// The GID at `sgid_index` of `device` port `port`, in IPv6 notation.
    fn local_gid(&mut self, device: &str, port: u8, sgid_index: u8) -> Option<String>;
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum FlowKey {
    Tcp { sock: u64 },
    Rdma { pid: u32, qpn: u32 },
}

/// One live flow.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Flow {
    pub kind: ServiceFlowKind,
    /// TCP: local IP. RDMA: the local GID (empty when it could not be read).
    pub local_address: String,
    /// TCP: remote IP. RDMA: the destination GID.
    pub remote_address: String,
    /// TCP: ports. RDMA: QPNs.
    pub local_port: u32,
    pub remote_port: u32,
    pub flow_label: u32,
    /// RDMA: the RNIC's device name (empty for TCP or when unknown).
    pub device: String,
    pub owner: Owner,
    pub first_seen_ms: u64,
    pub last_seen_ms: u64,
}

impl Flow {
    pub fn to_proto(&self) -> ServiceFlow {
        let pod = self.owner.pod.clone().unwrap_or_default();
        ServiceFlow {
            kind: self.kind as i32,
            local_address: self.local_address.clone(),
            remote_address: self.remote_address.clone(),
            local_port: self.local_port,
            remote_port: self.remote_port,
            flow_label: self.flow_label,
            pod_uid: pod.pod_uid,
            container_id: pod.container_id,
            pid: self.owner.pid,
            command: self.owner.command.clone(),
            first_seen_ms: self.first_seen_ms,
            last_seen_ms: self.last_seen_ms,
        }
    }
}

/// What one event did to the table (a metric label each).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    Added,
    /// A flow already in the table was seen again (same key).
    Refreshed,
    /// TCP reached CLOSE.
    Closed,
    /// RDMA queue pair destroyed.
    Destroyed,
    /// A new flow while the table was full: left out and counted.
    DroppedFull,
    /// A listening socket opened or closed (owner of later passive opens).
    Listener,
    /// Nothing to keep: loopback or unspecified addresses, a transition of a
    /// flow not in the table, a destroy of an untracked queue pair.
    Ignored,
}

impl Outcome {
    pub fn label(self) -> &'static str {
        match self {
            Self::Added => "added",
            Self::Refreshed => "refreshed",
            Self::Closed => "closed",
            Self::Destroyed => "destroyed",
            Self::DroppedFull => "dropped_full",
            Self::Listener => "listener",
            Self::Ignored => "ignored",
        }
    }

    pub const ALL: [Self; 7] = [
        Self::Added,
        Self::Refreshed,
        Self::Closed,
        Self::Destroyed,
        Self::DroppedFull,
        Self::Listener,
        Self::Ignored,
    ];
}

#[derive(Debug, Clone, Copy)]
pub struct TableLimits {
    /// Most flows held at once.
    pub capacity: usize,
    /// Most listening sockets remembered for passive-open attribution.
    pub listeners: usize,
    /// Silence after which a flow's liveness is checked.
    pub idle_ttl_ms: u64,
}

impl Default for TableLimits {
    fn default() -> Self {
        Self {
            capacity: 4096,
            listeners: 4096,
            idle_ttl_ms: 60_000,
        }
    }
}

/// A listening socket: network namespace and port (address left out: a
/// wildcard listener takes connections to every address of its namespace).
type ListenerKey = (u32, u16);

#[derive(Debug)]
pub struct FlowTable {
    limits: TableLimits,
    flows: HashMap<FlowKey, Flow>,
    listeners: HashMap<ListenerKey, (u64, Owner)>,
    dropped_full: u64,
}

impl FlowTable {
    pub fn new(limits: TableLimits) -> Self {
        Self {
            limits,
            flows: HashMap::new(),
            listeners: HashMap::new(),
            dropped_full: 0,
        }
    }

    pub fn len(&self) -> usize {
        self.flows.len()
    }

    pub fn is_empty(&self) -> bool {
        self.flows.is_empty()
    }

    /// New flows refused because the table was full, since the start.
    pub fn dropped_full(&self) -> u64 {
        self.dropped_full
    }

    pub fn get(&self, key: &FlowKey) -> Option<&Flow> {
        self.flows.get(key)
    }

    /// Every flow, in key order.
    pub fn flows(&self) -> Vec<(FlowKey, Flow)> {
        let mut all: Vec<_> = self.flows.iter().map(|(k, f)| (*k, f.clone())).collect();
        all.sort_by_key(|(k, _)| *k);
        all
    }

    /// The table as the controller wants it: a full snapshot.
    pub fn snapshot(&self) -> Vec<ServiceFlow> {
        self.flows().iter().map(|(_, f)| f.to_proto()).collect()
    }

    pub fn apply(&mut self, event: &TraceEvent, resolve: &mut dyn Resolve, now_ms: u64) -> Outcome {
        match event {
            TraceEvent::Tcp(e) => self.on_tcp(e, resolve, now_ms),
            TraceEvent::QpRtr(e) => self.on_rtr(e, resolve, now_ms),
            TraceEvent::QpDestroy(e) => self.on_destroy(e),
        }
    }

    fn on_tcp(&mut self, e: &TcpEvent, resolve: &mut dyn Resolve, now_ms: u64) -> Outcome {
        let key = FlowKey::Tcp { sock: e.sock };
        let listener: ListenerKey = (e.netns, e.sport);
        match (e.old_state, e.new_state) {
            (_, TcpState::Listen) => {
                if self.listeners.len() < self.limits.listeners
                    || self.listeners.contains_key(&listener)
                {
                    let owner = resolve.owner(&e.origin, now_ms);
                    self.listeners.insert(listener, (e.sock, owner));
                }
                Outcome::Listener
            }
            (TcpState::Listen, _) => {
                if self
                    .listeners
                    .get(&listener)
                    .is_some_and(|(s, _)| *s == e.sock)
                {
                    self.listeners.remove(&listener);
                }
                Outcome::Listener
            }
            (_, TcpState::Close) => {
                if self.flows.remove(&key).is_some() {
                    Outcome::Closed
                } else {
                    Outcome::Ignored
                }
            }
            (old, TcpState::Established) => {
                if !crosses_the_network(e.src) || !crosses_the_network(e.dst) {
                    return Outcome::Ignored;
                }
                let owner = if old == TcpState::SynSent {
                    resolve.owner(&e.origin, now_ms)
                } else {
                    // Passive open, softirq context: the listener's owner.
                    self.listeners
                        .get(&listener)
                        .map(|(_, o)| o.clone())
                        .unwrap_or_default()
                };
                let flow = Flow {
                    kind: ServiceFlowKind::Tcp,
                    local_address: e.src.to_string(),
                    remote_address: e.dst.to_string(),
                    local_port: u32::from(e.sport),
                    remote_port: u32::from(e.dport),
                    flow_label: 0,
                    device: String::new(),
                    owner,
                    first_seen_ms: now_ms,
                    last_seen_ms: now_ms,
                };
                self.upsert(key, flow)
            }
            _ => match self.flows.get_mut(&key) {
                // Leaving ESTABLISHED: still a flow until CLOSE.
                Some(flow) => {
                    flow.last_seen_ms = now_ms;
                    Outcome::Refreshed
                }
                None => Outcome::Ignored,
            },
        }
    }

    fn on_rtr(&mut self, e: &QpRtrEvent, resolve: &mut dyn Resolve, now_ms: u64) -> Outcome {
        let key = FlowKey::Rdma {
            pid: e.origin.pid,
            qpn: e.qp_num,
        };
        let local_address = resolve
            .local_gid(&e.device, e.port_num, e.sgid_index)
            .unwrap_or_default();
        let flow = Flow {
            kind: ServiceFlowKind::Rdma,
            local_address,
            remote_address: std::net::Ipv6Addr::from(e.dgid).to_string(),
            local_port: e.qp_num,
            remote_port: e.dest_qp_num,
            flow_label: e.flow_label & 0x000F_FFFF,
            device: e.device.clone(),
            owner: resolve.owner(&e.origin, now_ms),
            first_seen_ms: now_ms,
            last_seen_ms: now_ms,
        };
        self.upsert(key, flow)
    }

    fn on_destroy(&mut self, e: &QpDestroyEvent) -> Outcome {
        let key = FlowKey::Rdma {
            pid: e.origin.pid,
            qpn: e.qp_num,
        };
        if self.flows.remove(&key).is_some() {
            Outcome::Destroyed
        } else {
            Outcome::Ignored
        }
    }

    /// Inserts, or for a key already present (a reused socket whose CLOSE was
    /// lost, a QP moved to RTR again) replaces the flow but keeps its first sighting.
    fn upsert(&mut self, key: FlowKey, mut flow: Flow) -> Outcome {
        if let Some(old) = self.flows.get_mut(&key) {
            if old.remote_address == flow.remote_address && old.remote_port == flow.remote_port {
                flow.first_seen_ms = old.first_seen_ms;
            }
            *old = flow;
            return Outcome::Refreshed;
        }
        if self.flows.len() >= self.limits.capacity {
            self.dropped_full += 1;
            return Outcome::DroppedFull;
        }
        self.flows.insert(key, flow);
        Outcome::Added
    }

    /// Checks every flow silent for `idle_ttl`: alive ones are kept (their
    /// last sighting moves to now), the others removed. Returns how many left.
    pub fn expire(&mut self, now_ms: u64, alive: &mut dyn FnMut(&FlowKey, &Flow) -> bool) -> usize {
        let ttl = self.limits.idle_ttl_ms;
        let before = self.flows.len();
        self.flows.retain(|key, flow| {
            if now_ms.saturating_sub(flow.last_seen_ms) < ttl {
                return true;
            }
            let keep = alive(key, flow);
            if keep {
                flow.last_seen_ms = now_ms;
            }
            keep
        });
        before - self.flows.len()
    }
}

/// Loopback and unspecified addresses never cross the fabric.
fn crosses_the_network(ip: IpAddr) -> bool {
    let ip = match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(IpAddr::V6(v6), IpAddr::V4),
        v4 @ IpAddr::V4(_) => v4,
    };
    !(ip.is_loopback() || ip.is_unspecified())
}

#[cfg(test)]
mod tests;
