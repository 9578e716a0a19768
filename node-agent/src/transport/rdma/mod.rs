//! The RDMA UD transport: one prober and one responder UD queue pair per RNIC,
//! NIC completion timestamps, and one address handle per (GID, flow label) so
//! probes spread over ECMP paths.
//!
//! Layout, so that most of it is tested without an RDMA device:
//!
//! - portable and pure: [`gid`] (GID parsing and selection from sysfs),
//!   [`discovery`] (RNICs and ports under a sysfs root), [`flow_label`],
//!   [`clock`] (NIC clock cycles to nanoseconds), [`grh`] (the 40 bytes in front
//!   of every UD receive), [`ah_cache`], [`verbs`] (the [`verbs::Verbs`] seam
//!   and a recording fake) and [`engine`] (send/receive/completion logic written
//!   against the seam);
//! - `real` (Linux with the `rdma` feature): libibverbs through `rdma-sys`,
//!   its unsafe code confined to one module;
//! - `stub` (everywhere else): the same public API, every operation answering
//!   [`RdmaError::Unsupported`].
//!
//! The wire message is the same 40-byte (56 authenticated) message the UDP
//! transport carries.

use std::io;
use std::path::PathBuf;

use thiserror::Error;

pub mod ah_cache;
pub mod clock;
pub mod device;
pub mod discovery;
pub mod engine;
pub mod flow_label;
pub mod gid;
pub mod grh;
#[cfg(test)]
pub mod loopback;
pub mod verbs;

#[cfg(all(target_os = "linux", feature = "rdma"))]
mod real;
#[cfg(all(target_os = "linux", feature = "rdma"))]
pub use real::{RdmaEndpoint, rdma_available};

#[cfg(not(all(target_os = "linux", feature = "rdma")))]
mod stub;
#[cfg(not(all(target_os = "linux", feature = "rdma")))]
pub use stub::{RdmaEndpoint, rdma_available};

pub use device::{RdmaDevice, RdmaQueuePair};
pub use discovery::{Discovery, RnicEndpointSpec, discover_endpoints};
pub use gid::Gid;

/// The `Q_Key` every queue pair of the mesh uses. UD receives drop datagrams
/// whose `Q_Key` differs, so all agents must agree on it. The high bit is
/// clear: `Q_Keys` with it set are privileged (controlled `Q_Keys`).
pub const MESH_QKEY: u32 = 0x5049_4E47 & 0x7FFF_FFFF;

/// Send and receive work requests per queue pair. Probes are small and paced;
/// 32 outstanding of each is far above what one RNIC's probing needs.
pub const QUEUE_DEPTH: u16 = 32;

/// Bytes of a UD receive taken by the global route header (or, for RoCE v2
/// over IPv4, 20 undefined bytes and the IPv4 header).
pub const GRH_LEN: usize = 40;

/// Largest payload the transport carries (the probe message is 40 bytes, 56
/// when authenticated).
pub const MAX_PAYLOAD: usize = 64;
const _: () = assert!(crate::probe::wire::AUTHENTICATED_LEN <= MAX_PAYLOAD);

/// Which of an RNIC's two queue pairs an operation is on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum QpRole {
    /// Sends probes, receives ACKs. Its QPN is not registered with the mesh.
    Prober,
    /// Receives probes, sends ACKs. Its QPN is the endpoint's registered QPN.
    Responder,
}

impl QpRole {
    /// Both roles, in a fixed order (used for per-role arrays).
    pub const ALL: [Self; 2] = [Self::Prober, Self::Responder];

    /// Index into per-role arrays.
    pub fn index(self) -> usize {
        match self {
            Self::Prober => 0,
            Self::Responder => 1,
        }
    }
}

/// Where a datagram goes to, or came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct RdmaDest {
    pub gid: Gid,
    /// The remote UD queue pair number (24 bits).
    pub qpn: u32,
    /// The GRH flow label (20 bits, non-zero) the datagram travels with.
    pub flow_label: u32,
}

/// What a successful post reports; mirrors the UDP transport's receipt.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SendReceipt {
    /// Host monotonic reading taken right after the post returned.
    pub host_ns: u64,
    /// The key of this send's coming [`RdmaEvent::TxTimestamp`] (or
    /// [`RdmaEvent::SendFailed`]); every send gets one.
    pub tx_key: u32,
}

/// One thing a queue pair has to say.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RdmaEvent {
    /// A datagram, its first `len` payload bytes (after the GRH) in the caller's buffer.
    Datagram {
        len: usize,
        from: RdmaDest,
        /// Host monotonic reading taken when the completion was polled.
        host_ns: u64,
        /// NIC completion timestamp in ns of the NIC clock; comparable only
        /// with other NIC stamps of this RNIC. `None` when the device has none.
        nic_ns: Option<u64>,
        /// The datagram was longer than the buffer and was cut to `len` bytes.
        truncated: bool,
    },
    /// The send whose receipt had `key` completed.
    TxTimestamp {
        key: u32,
        /// Host monotonic reading taken when the completion was polled.
        host_ns: u64,
        /// NIC completion timestamp, `None` when the device has none.
        nic_ns: Option<u64>,
    },
    /// The send whose receipt had `key` completed with an error status.
    SendFailed { key: u32, status: u32 },
    /// A completion that carries nothing usable (failed receive, unreadable
    /// GRH). Worth a counter, not a stop.
    Skipped { reason: &'static str },
}

/// What the RNIC's asynchronous event queue has to say.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DeviceEvent {
    /// The port went down: pause probing from (and expect no probes to) it.
    PortDown { port: u8 },
    /// The port is active again: resume.
    PortUp { port: u8 },
    /// The device is unusable until re-opened; every resource must be
    /// re-created and the endpoint re-registered (its QPN changes).
    Fatal { reason: String },
    /// An event that needs no action (logged by the caller).
    Other { name: &'static str },
}

/// Maps an `ibv_event_type` code and its port element to what the agent acts
/// on. Codes are plain integers here so an unknown (newer) code is harmless.
pub fn device_event_of(code: u32, port: u8) -> DeviceEvent {
    match code {
        9 => DeviceEvent::PortUp { port },
        10 => DeviceEvent::PortDown { port },
        8 => DeviceEvent::Fatal {
            reason: "device fatal error (IBV_EVENT_DEVICE_FATAL)".to_owned(),
        },
        0 => DeviceEvent::Fatal {
            reason: "completion queue error (IBV_EVENT_CQ_ERR)".to_owned(),
        },
        1 => DeviceEvent::Fatal {
            reason: "queue pair fatal error (IBV_EVENT_QP_FATAL)".to_owned(),
        },
        2 | 3 => DeviceEvent::Fatal {
            reason: format!("queue pair error (event {code})"),
        },
        18 => DeviceEvent::Other { name: "gid_change" },
        11 => DeviceEvent::Other { name: "lid_change" },
        12 => DeviceEvent::Other {
            name: "pkey_change",
        },
        _ => DeviceEvent::Other { name: "other" },
    }
}

/// Whether this host can run the RDMA transport, for the agent's choice of
/// transport. Never a panic: a host without RDMA is a normal host.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Availability {
    /// libibverbs lists these devices.
    Available { devices: Vec<String> },
    /// No RDMA here; the agent falls back to UDP and says why.
    Unavailable { reason: String },
}

/// What `ibv_get_device_list` answered, reduced to plain data so the mapping
/// to [`Availability`] is testable without the library.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DeviceListing {
    /// It returned NULL with this errno (ENOSYS: no kernel RDMA stack).
    Null { errno: i32 },
    /// It returned a list with these device names (maybe none).
    Devices(Vec<String>),
}

impl Availability {
    /// Maps a device listing to availability: NULL or an empty list means no RDMA.
    pub fn from_listing(listing: DeviceListing) -> Self {
        match listing {
            DeviceListing::Null { errno } => Self::Unavailable {
                reason: format!(
                    "ibv_get_device_list failed: {} (no RDMA stack in this kernel?)",
                    io::Error::from_raw_os_error(errno)
                ),
            },
            DeviceListing::Devices(devices) if devices.is_empty() => Self::Unavailable {
                reason: "no RDMA devices found".to_owned(),
            },
            DeviceListing::Devices(devices) => Self::Available { devices },
        }
    }
}

/// How an RNIC endpoint is opened.
#[derive(Debug, Clone)]
pub struct RdmaConfig {
    /// The RNIC port and GID to use (from [`discover_endpoints`]).
    pub spec: RnicEndpointSpec,
    /// GRH traffic class (DSCP << 2 | ECN) of every probe and ACK.
    pub traffic_class: u8,
    /// Service level (maps to a priority / PFC class on RoCE).
    pub service_level: u8,
    /// GRH hop limit.
    pub hop_limit: u8,
    /// Address handles kept; the least recently used is destroyed beyond this.
    pub ah_cache_capacity: usize,
    /// Ask for NIC completion timestamps (falls back to host time when refused).
    pub nic_timestamps: bool,
}

impl RdmaConfig {
    /// Defaults for `spec`: best-effort traffic class and service level 0.
    pub fn new(spec: RnicEndpointSpec) -> Self {
        Self {
            spec,
            traffic_class: 0,
            service_level: 0,
            hop_limit: 64,
            ah_cache_capacity: ah_cache::DEFAULT_CAPACITY,
            nic_timestamps: true,
        }
    }
}

/// Failures of the RDMA transport, named after the operation.
#[derive(Debug, Error)]
pub enum RdmaError {
    #[error("{what} is not supported on this platform or build")]
    Unsupported { what: &'static str },
    #[error("no RDMA devices: {reason}")]
    NoDevices { reason: String },
    #[error("RDMA device {device} not found")]
    DeviceNotFound { device: String },
    #[error("reading {path}: {source}")]
    Sysfs { path: PathBuf, source: io::Error },
    #[error("GID {index} of {device} port {port} is not usable: {reason}")]
    GidNotUsable {
        device: String,
        port: u8,
        index: u16,
        reason: String,
    },
    #[error("{device} port {port} has no RoCE v2 IPv4-mapped GID (checked {checked} entries)")]
    NoRoceV2Gid {
        device: String,
        port: u8,
        checked: usize,
    },
    #[error(
        "{device} port {port} has link layer {link_layer:?}; only RoCE (Ethernet) is supported"
    )]
    NotRoce {
        device: String,
        port: u8,
        link_layer: String,
    },
    #[error("{op} on {device} failed: {source}")]
    Verbs {
        op: &'static str,
        device: String,
        source: io::Error,
    },
    #[error("the {role:?} send queue of {device} is full ({depth} sends outstanding)")]
    SendQueueFull {
        device: String,
        role: QpRole,
        depth: u16,
    },
    #[error("payload of {len} bytes exceeds the {max}-byte RDMA message slot")]
    PayloadTooLarge { len: usize, max: usize },
    #[error("no tokio runtime: the RDMA endpoint must be opened inside one")]
    NoRuntime,
}

impl RdmaError {
    /// Bounded label for metrics and events.
    pub fn category(&self) -> &'static str {
        match self {
            Self::Unsupported { .. } => "unsupported",
            Self::NoDevices { .. } => "no_devices",
            Self::DeviceNotFound { .. } => "device_not_found",
            Self::Sysfs { .. } => "sysfs",
            Self::GidNotUsable { .. } => "gid_not_usable",
            Self::NoRoceV2Gid { .. } => "no_roce_v2_gid",
            Self::NotRoce { .. } => "not_roce",
            Self::Verbs { .. } => "verbs",
            Self::SendQueueFull { .. } => "send_queue_full",
            Self::PayloadTooLarge { .. } => "payload_too_large",
            Self::NoRuntime => "no_runtime",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_null_device_list_with_enosys_means_rdma_is_unavailable() {
        // ENOSYS on Linux: the kernel has no RDMA stack.
        let availability = Availability::from_listing(DeviceListing::Null { errno: 38 });
        let Availability::Unavailable { reason } = availability else {
            panic!("expected unavailable, got {availability:?}");
        };
        assert!(reason.contains("ibv_get_device_list"), "{reason}");
    }

    #[test]
    fn an_empty_device_list_means_rdma_is_unavailable() {
        assert!(matches!(
            Availability::from_listing(DeviceListing::Devices(Vec::new())),
            Availability::Unavailable { .. }
        ));
    }

    #[test]
    fn listed_devices_mean_rdma_is_available() {
        let devices = vec!["mlx5_0".to_owned(), "mlx5_1".to_owned()];
        assert_eq!(
            Availability::from_listing(DeviceListing::Devices(devices.clone())),
            Availability::Available { devices }
        );
    }

    #[test]
    fn port_and_fatal_events_map_to_pause_resume_and_reopen() {
        assert_eq!(device_event_of(10, 1), DeviceEvent::PortDown { port: 1 });
        assert_eq!(device_event_of(9, 2), DeviceEvent::PortUp { port: 2 });
        for fatal in [0, 1, 2, 3, 8] {
            assert!(
                matches!(device_event_of(fatal, 1), DeviceEvent::Fatal { .. }),
                "code {fatal}"
            );
        }
        assert_eq!(
            device_event_of(18, 1),
            DeviceEvent::Other { name: "gid_change" }
        );
        assert_eq!(
            device_event_of(4_000, 1),
            DeviceEvent::Other { name: "other" }
        );
    }

    #[test]
    fn the_mesh_qkey_is_not_a_privileged_qkey() {
        assert_eq!(MESH_QKEY & 0x8000_0000, 0);
        assert_ne!(MESH_QKEY, 0);
    }

    #[test]
    fn error_categories_are_distinct_per_operation() {
        let io = || io::Error::other("x");
        let errors = [
            RdmaError::Unsupported { what: "x" },
            RdmaError::NoDevices {
                reason: String::new(),
            },
            RdmaError::DeviceNotFound {
                device: String::new(),
            },
            RdmaError::Sysfs {
                path: PathBuf::new(),
                source: io(),
            },
            RdmaError::GidNotUsable {
                device: String::new(),
                port: 1,
                index: 0,
                reason: String::new(),
            },
            RdmaError::NoRoceV2Gid {
                device: String::new(),
                port: 1,
                checked: 0,
            },
            RdmaError::NotRoce {
                device: String::new(),
                port: 1,
                link_layer: String::new(),
            },
            RdmaError::Verbs {
                op: "x",
                device: String::new(),
                source: io(),
            },
            RdmaError::SendQueueFull {
                device: String::new(),
                role: QpRole::Prober,
                depth: 1,
            },
            RdmaError::PayloadTooLarge { len: 1, max: 0 },
            RdmaError::NoRuntime,
        ];
        let mut categories: Vec<_> = errors.iter().map(RdmaError::category).collect();
        categories.sort_unstable();
        categories.dedup();
        assert_eq!(categories.len(), errors.len());
    }
}
