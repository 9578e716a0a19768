//! Path traces for fault localization: the agent runs the same-5-tuple
//! traceroutes the mesh controller asks for (`ExchangeTraces`) and hands back
//! the hops each flow crosses. The controller turns them into the links and
//! switches its tomography blames (see `docs/localization.md`).
//!
//! A trace uses exactly the tuple the probes of a flow use (see [`tuple`]),
//! so switches hash it onto the same ECMP path; for RDMA flows that is the
//! RoCE v2 tuple ([`roce`]).

mod roce;
mod task;
mod tuple;

#[cfg(target_os = "linux")]
mod linux;
#[cfg(target_os = "linux")]
pub use linux::Tracer;

#[cfg(not(target_os = "linux"))]
mod stub;
#[cfg(not(target_os = "linux"))]
pub use stub::Tracer;

use std::net::IpAddr;

pub use roce::{ROCE_V2_PORT, roce_udp_source_port};
pub use task::{PathTraceMetrics, TraceSettings, run_path_traces};
pub use tuple::{FlowTuple, FlowTuples, TupleError};

/// The first bytes of every trace datagram's payload. A responder that gets
/// one (the TTL outlived the path) drops it without counting it malformed.
pub const TRACE_MAGIC: [u8; 4] = *b"PMTR";

/// The hops one trace found.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TraceOutcome {
    /// The routers that answered TTL 1, 2, ... in order.
    pub hops: Vec<IpAddr>,
    /// The destination itself answered (port unreachable).
    pub reached: bool,
}

/// Why a trace could not run.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TraceError {
    #[error("path traces need CAP_NET_RAW (raw sockets)")]
    NoPrivilege,
    #[error("path traces need Linux raw sockets; not available on this platform")]
    Unsupported,
    #[error("IPv6 flows are not traced")]
    Ipv6,
    #[error("opening the trace sockets: {0}")]
    Socket(String),
    #[error("sending a trace datagram: {0}")]
    Send(String),
}

impl TraceError {
    pub fn category(&self) -> &'static str {
        match self {
            Self::NoPrivilege => "no_privilege",
            Self::Unsupported => "unsupported",
            Self::Ipv6 => "ipv6",
            Self::Socket(_) => "socket",
            Self::Send(_) => "send",
        }
    }
}
