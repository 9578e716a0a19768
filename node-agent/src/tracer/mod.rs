//! Service tracing: which TCP connections and RDMA queue pairs the node's
//! services open and close, from the BPF programs in `ebpf-probes`.
//!
//! On Linux with the `ebpf` feature [`Tracer`] loads the programs into the
//! kernel, attaches the hooks and reads their ring buffer. Everywhere else the
//! same API returns [`TracerError::Unsupported`]. docs/tracing.md says what is
//! traced and which privileges it takes.
use std::fmt;
use std::path::PathBuf;

pub mod btf;
pub mod procmaps;

pub use pingmesh_ebpf_probes::{
    Origin, ParseError, QpDestroyEvent, QpRtrEvent, TcpEvent, TcpState, TraceEvent, parse_event,
};

#[cfg(all(target_os = "linux", feature = "ebpf"))]
mod ib_core;
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
    /// `ib_core`'s `ib_modify_qp` and `ib_modify_qp_with_udata`, in the kernel.
    KernelModifyQp(KernelHook),
    /// `ib_core`'s `ib_destroy_qp_user`, in the kernel.
    KernelDestroyQp(KernelHook),
}

/// How a kernel RDMA hook is attached: the load-time probe tries fentry
/// first, then kprobe.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum KernelHook {
    Fentry,
    Kprobe,
}

impl KernelHook {
    pub fn label(self) -> &'static str {
        match self {
            Self::Fentry => "fentry",
            Self::Kprobe => "kprobe",
        }
    }
}

/// Where the kernel RDMA hooks (`ib_core`) stand.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum IbCoreState {
    /// Not tried yet (the tracer is loaded but `attach_ib_core` was not called).
    NotTried,
    /// Both the modify and the destroy path are hooked.
    On(KernelHook),
    /// Off, and why.
    Off { reason: IbCoreOff, detail: String },
}

impl IbCoreState {
    /// The `reason` label of `pingmesh_tracer_ib_core_state`.
    pub fn label(&self) -> &'static str {
        match self {
            Self::NotTried => "disabled",
            Self::On(KernelHook::Fentry) => "on_fentry",
            Self::On(KernelHook::Kprobe) => "on_kprobe",
            Self::Off { reason, .. } => reason.label(),
        }
    }
}

/// Why the kernel RDMA hooks are off (a bounded set, for metrics).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IbCoreOff {
    /// Not Linux, or built without the `ebpf` feature.
    UnsupportedPlatform,
    /// `ib_core` is neither loaded as a module nor built into the kernel.
    NoIbCore,
    /// `ib_core` is loaded but has no BTF (kernel without
    /// `CONFIG_DEBUG_INFO_BTF_MODULES`), or vmlinux BTF is unreadable.
    NoIbCoreBtf,
    /// The object could not be loaded or relocated against `ib_core`'s BTF.
    LoadFailed,
    /// Neither fentry nor kprobe attached (the detail says why each failed).
    AttachFailed,
}

impl IbCoreOff {
    pub const ALL: [Self; 5] = [
        Self::UnsupportedPlatform,
        Self::NoIbCore,
        Self::NoIbCoreBtf,
        Self::LoadFailed,
        Self::AttachFailed,
    ];

    pub fn label(self) -> &'static str {
        match self {
            Self::UnsupportedPlatform => "unsupported_platform",
            Self::NoIbCore => "no_ib_core",
            Self::NoIbCoreBtf => "no_ib_core_btf",
            Self::LoadFailed => "load_failed",
            Self::AttachFailed => "attach_failed",
        }
    }

    /// Whether a later try may succeed without restarting the agent (the
    /// module may be loaded after the agent starts).
    pub fn retryable(self) -> bool {
        matches!(self, Self::NoIbCore)
    }
}

/// Where the kernel describes itself: `/sys/kernel/btf` and `/sys/module`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KernelPaths {
    pub btf_dir: PathBuf,
    pub module_dir: PathBuf,
}

impl Default for KernelPaths {
    fn default() -> Self {
        Self {
            btf_dir: PathBuf::from("/sys/kernel/btf"),
            module_dir: PathBuf::from("/sys/module"),
        }
    }
}

/// Load-time settings of the tracer.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct TracerOptions {
    /// Size of each object's ring buffer in bytes (a power of two, at least
    /// one page); `None` keeps the built-in sizes (1 MiB main, 256 KiB `ib_core`).
    pub ring_bytes: Option<u32>,
}

impl Hook {
    /// A short label for metrics and logs (no path: bounded cardinality).
    pub fn kind(&self) -> &'static str {
        match self {
            Self::TcpStateTracepoint => "tracepoint_inet_sock_set_state",
            Self::IbvModifyQp { .. } => "uprobe_ibv_modify_qp",
            Self::IbvDestroyQp { .. } => "uprobe_ibv_destroy_qp",
            Self::KernelModifyQp(KernelHook::Fentry) => "fentry_ib_modify_qp",
            Self::KernelModifyQp(KernelHook::Kprobe) => "kprobe_ib_modify_qp",
            Self::KernelDestroyQp(KernelHook::Fentry) => "fentry_ib_destroy_qp",
            Self::KernelDestroyQp(KernelHook::Kprobe) => "kprobe_ib_destroy_qp",
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
            Self::KernelModifyQp(how) => write!(
                f,
                "{} ib_modify_qp and ib_modify_qp_with_udata",
                how.label()
            ),
            Self::KernelDestroyQp(how) => write!(f, "{} ib_destroy_qp_user", how.label()),
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
