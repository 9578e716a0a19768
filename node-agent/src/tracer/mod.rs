//! Service tracing: which TCP connections and RDMA queue pairs the node's
//! services open and close, from the BPF programs in `ebpf-probes`.
//!
//! On Linux with the `ebpf` feature [`Tracer`] loads the programs into the
//! kernel, attaches the hooks and reads their ring buffer. Everywhere else the
//! same API returns [`TracerError::Unsupported`]. docs/tracing.md says what is
//! traced and which privileges it takes.
use std::fmt;
use std::path::PathBuf;

pub mod procmaps;

pub use pingmesh_ebpf_probes::{
    Origin, ParseError, QpDestroyEvent, QpRtrEvent, TcpEvent, TcpState, TraceEvent, parse_event,
};

#[cfg(all(target_os = "linux", feature = "ebpf"))]
mod linux;
#[cfg(all(target_os = "linux", feature = "ebpf"))]
pub use linux::Tracer;

#[cfg(not(all(target_os = "linux", feature = "ebpf")))]
mod stub;
#[cfg(not(all(target_os = "linux", feature = "ebpf")))]
pub use stub::Tracer;

/// A hook the tracer has attached.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Hook {
    /// Tracepoint `sock:inet_sock_set_state`.
    TcpStateTracepoint,
    /// Uprobe on `ibv_modify_qp` in one libibverbs file.
    IbvModifyQp { library: PathBuf },
    /// Uprobe on `ibv_destroy_qp` in one libibverbs file.
    IbvDestroyQp { library: PathBuf },
}

impl Hook {
    /// A short label for metrics and logs (no path: bounded cardinality).
    pub fn kind(&self) -> &'static str {
        match self {
            Self::TcpStateTracepoint => "tracepoint_inet_sock_set_state",
            Self::IbvModifyQp { .. } => "uprobe_ibv_modify_qp",
            Self::IbvDestroyQp { .. } => "uprobe_ibv_destroy_qp",
        }
    }
}

impl fmt::Display for Hook {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::TcpStateTracepoint => f.write_str("tracepoint sock:inet_sock_set_state"),
            Self::IbvModifyQp { library } => {
                write!(f, "uprobe ibv_modify_qp in {}", library.display())
            }
            Self::IbvDestroyQp { library } => {
                write!(f, "uprobe ibv_destroy_qp in {}", library.display())
            }
        }
    }
}

/// Why the tracer cannot load, attach or read.
#[derive(Debug, thiserror::Error)]
pub enum TracerError {
    /// Not Linux, or the agent was built without the `ebpf` feature.
    #[error("eBPF tracing is unsupported on this platform (needs Linux and the `ebpf` feature)")]
    Unsupported,
    /// The kernel refused the object (privileges: `CAP_BPF` and `CAP_PERFMON`; BTF).
    #[error("loading the BPF programs failed: {0}")]
    Load(String),
    /// A hook could not attach (tracefs not mounted, library without the symbol...).
    #[error("attaching {hook} failed: {reason}")]
    Attach { hook: String, reason: String },
    #[error("reading the ring buffer failed: {0}")]
    Io(#[from] std::io::Error),
}
