//! BPF programs that trace the node's services: TCP connections (the
//! `sock:inet_sock_set_state` tracepoint) and RDMA queue pairs (uprobes on
//! libibverbs' `ibv_modify_qp` and `ibv_destroy_qp`, and kernel hooks on
//! `ib_core`'s modify and destroy paths). The C sources are in `bpf/`; with the
//! `build-bpf` feature on Linux, build.rs compiles them with clang and
//! `TRACER_OBJECT` and `IB_CORE_OBJECT` hold the object files.
//!
//! The record types and their parser are plain Rust and build everywhere, so
//! the agent's flow handling can be tested on any platform.
use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

/// The compiled BPF object (ELF, BTF included), loaded by the agent's tracer.
#[cfg(all(target_os = "linux", feature = "build-bpf"))]
pub static TRACER_OBJECT: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/tracer.bpf.o"));

/// The kernel RDMA hooks (`bpf/ib_core.bpf.c`): a separate object, relocated
/// against `ib_core`'s BTF, loaded after [`TRACER_OBJECT`]. Same records, its
/// own `EVENTS` and `LOST` maps.
#[cfg(all(target_os = "linux", feature = "build-bpf"))]
pub static IB_CORE_OBJECT: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/ib_core.bpf.o"));

/// Program names in the object, as the loader looks them up.
pub mod programs {
    /// Tracepoint `sock/inet_sock_set_state`.
    pub const TCP_STATE: &str = "pingmesh_tcp_state";
    /// Uprobe on `ibv_modify_qp`.
    pub const IBV_MODIFY_QP: &str = "pingmesh_ibv_modify_qp";
    /// Uprobe on `ibv_destroy_qp`.
    pub const IBV_DESTROY_QP: &str = "pingmesh_ibv_destroy_qp";
    /// The ring buffer every program of an object writes to.
    pub const EVENTS_MAP: &str = "EVENTS";
    /// Per-CPU count of records that found `EVENTS` full (one `u64` at key 0).
    pub const LOST_MAP: &str = "LOST";

    /// Programs of the kernel RDMA hooks object ([`crate::IB_CORE_OBJECT`]).
    pub mod ib_core {
        /// Kprobe for `ib_modify_qp` and `ib_modify_qp_with_udata`.
        pub const KPROBE_MODIFY_QP: &str = "pingmesh_kprobe_ib_modify_qp";
        /// Kprobe for `ib_destroy_qp_user`.
        pub const KPROBE_DESTROY_QP: &str = "pingmesh_kprobe_ib_destroy_qp_user";
        /// Fentry on `ib_modify_qp`.
        pub const FENTRY_MODIFY_QP: &str = "pingmesh_fentry_ib_modify_qp";
        /// Fentry on `ib_modify_qp_with_udata`.
        pub const FENTRY_MODIFY_QP_WITH_UDATA: &str = "pingmesh_fentry_ib_modify_qp_with_udata";
        /// Fentry on `ib_destroy_qp_user`.
        pub const FENTRY_DESTROY_QP: &str = "pingmesh_fentry_ib_destroy_qp_user";
        /// The kernel functions hooked for a modify (kernel consumers call
        /// the first, uverbs the second).
        pub const MODIFY_FUNCTIONS: [&str; 2] = ["ib_modify_qp", "ib_modify_qp_with_udata"];
        /// The kernel function hooked for a destroy.
        pub const DESTROY_FUNCTION: &str = "ib_destroy_qp_user";
    }
}

/// `kind` values of [`EventHeader`] (bpf/events.h).
pub mod kind {
    pub const TCP_STATE: u32 = 1;
    pub const QP_RTR: u32 = 2;
    pub const QP_DESTROY: u32 = 3;
}

const COMM_LEN: usize = 16;
const DEVICE_LEN: usize = 16;

/// Common prefix of every record (`struct pm_event_header`).
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EventHeader {
    pub kind: u32,
    /// Thread-group id, the process. 0 in the `ib_core` hooks' records of a
    /// queue pair a kernel consumer owns (no process does).
    pub pid: u32,
    /// `bpf_get_current_cgroup_id()`: the cgroup v2 inode of the task (0
    /// where `pid` is 0).
    pub cgroup_id: u64,
    /// `bpf_ktime_get_ns()`, `CLOCK_MONOTONIC`.
    pub ts_ns: u64,
    pub comm: [u8; COMM_LEN],
}

/// `struct pm_tcp_event`.
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RawTcpEvent {
    pub hdr: EventHeader,
    pub sock: u64,
    pub saddr: [u8; 16],
    pub daddr: [u8; 16],
    pub family: u16,
    pub sport: u16,
    pub dport: u16,
    pub oldstate: u8,
    pub newstate: u8,
    pub netns: u32,
    pub pad: u32,
}

/// `struct pm_qp_rtr_event`.
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RawQpRtrEvent {
    pub hdr: EventHeader,
    pub qp_num: u32,
    pub dest_qp_num: u32,
    pub dgid: [u8; 16],
    pub flow_label: u32,
    pub attr_mask: u32,
    pub sgid_index: u8,
    pub port_num: u8,
    pub traffic_class: u8,
    pub hop_limit: u8,
    pub qp_type: u32,
    pub device: [u8; DEVICE_LEN],
}

/// `struct pm_qp_destroy_event`.
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RawQpDestroyEvent {
    pub hdr: EventHeader,
    pub qp_num: u32,
    pub pad: u32,
}

const _: () = {
    // The same sizes bpf/events.h asserts.
    assert!(size_of::<EventHeader>() == 40);
    assert!(size_of::<RawTcpEvent>() == 96);
    assert!(size_of::<RawQpRtrEvent>() == 96);
    assert!(size_of::<RawQpDestroyEvent>() == 48);
};

/// TCP states of `include/net/tcp_states.h`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TcpState {
    Established,
    SynSent,
    SynRecv,
    FinWait1,
    FinWait2,
    TimeWait,
    Close,
    CloseWait,
    LastAck,
    Listen,
    Closing,
    NewSynRecv,
    Other(u8),
}

impl From<u8> for TcpState {
    fn from(v: u8) -> Self {
        match v {
            1 => Self::Established,
            2 => Self::SynSent,
            3 => Self::SynRecv,
            4 => Self::FinWait1,
            5 => Self::FinWait2,
            6 => Self::TimeWait,
            7 => Self::Close,
            8 => Self::CloseWait,
            9 => Self::LastAck,
            10 => Self::Listen,
            11 => Self::Closing,
            12 => Self::NewSynRecv,
            other => Self::Other(other),
        }
    }
}

/// Which process a record came from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Origin {
    /// The process; 0 for a kernel consumer's queue pair (`ib_core` hooks).
    pub pid: u32,
    pub cgroup_id: u64,
    pub ts_ns: u64,
    /// The task's name (`comm`), lossily decoded.
    pub comm: String,
}

/// A TCP connection's state change.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TcpEvent {
    pub origin: Origin,
    /// The socket's kernel address: the same for every event of one connection.
    pub sock: u64,
    pub src: IpAddr,
    pub dst: IpAddr,
    pub sport: u16,
    pub dport: u16,
    pub old_state: TcpState,
    pub new_state: TcpState,
    /// Inode of the socket's network namespace (0 when it could not be read).
    pub netns: u32,
}

/// A queue pair moved to RTR: its peer is now known.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QpRtrEvent {
    pub origin: Origin,
    pub qp_num: u32,
    pub dest_qp_num: u32,
    /// `attr->ah_attr.grh.dgid`, as libibverbs holds it (network order).
    pub dgid: [u8; 16],
    /// 20-bit IPv6 flow label (the RoCE v2 UDP source port is derived from it).
    pub flow_label: u32,
    pub sgid_index: u8,
    pub traffic_class: u8,
    pub hop_limit: u8,
    /// `attr->ah_attr.port_num`.
    pub port_num: u8,
    pub attr_mask: u32,
    /// `qp->qp_type` (`enum ibv_qp_type`: 2 is RC, 3 UC, 4 UD).
    pub qp_type: u32,
    /// The RNIC (`qp->context->device->name`, such as `mlx5_0`); empty when
    /// the process's structures could not be read.
    pub device: String,
}

/// A queue pair was destroyed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QpDestroyEvent {
    pub origin: Origin,
    pub qp_num: u32,
}

/// One ring-buffer record, parsed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TraceEvent {
    Tcp(TcpEvent),
    QpRtr(QpRtrEvent),
    QpDestroy(QpDestroyEvent),
}

/// Why a record could not be parsed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ParseError {
    /// Shorter than its kind's record.
    Truncated {
        kind: u32,
        len: usize,
        need: usize,
    },
    UnknownKind(u32),
    UnknownFamily(u16),
}

impl fmt::Display for ParseError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Truncated { kind, len, need } => {
                write!(f, "record of kind {kind} is {len} bytes, needs {need}")
            }
            Self::UnknownKind(kind) => write!(f, "unknown record kind {kind}"),
            Self::UnknownFamily(family) => write!(f, "unknown address family {family}"),
        }
    }
}

impl std::error::Error for ParseError {}

const AF_INET: u16 = 2;
const AF_INET6: u16 = 10;

/// Reads native-endian fields at fixed offsets; every read is bounds-checked
/// by the caller's length check, and still returns zeros rather than panic.
struct Fields<'a>(&'a [u8]);

impl Fields<'_> {
    fn bytes<const N: usize>(&self, at: usize) -> [u8; N] {
        let mut out = [0; N];
        if let Some(src) = self.0.get(at..at + N) {
            out.copy_from_slice(src);
        }
        out
    }
    fn u8(&self, at: usize) -> u8 {
        self.0.get(at).copied().unwrap_or(0)
    }
    fn u16(&self, at: usize) -> u16 {
        u16::from_ne_bytes(self.bytes(at))
    }
    fn u32(&self, at: usize) -> u32 {
        u32::from_ne_bytes(self.bytes(at))
    }
    fn u64(&self, at: usize) -> u64 {
        u64::from_ne_bytes(self.bytes(at))
    }
    fn c_string<const N: usize>(&self, at: usize) -> String {
        let raw: [u8; N] = self.bytes(at);
        let end = raw.iter().position(|&b| b == 0).unwrap_or(N);
        String::from_utf8_lossy(&raw[..end]).into_owned()
    }
    fn origin(&self) -> Origin {
        Origin {
            pid: self.u32(4),
            cgroup_id: self.u64(8),
            ts_ns: self.u64(16),
            comm: self.c_string::<COMM_LEN>(24),
        }
    }
}

/// Parses one ring-buffer record. Longer records than expected are accepted
/// (a newer program may append fields); shorter ones are an error.
pub fn parse_event(record: &[u8]) -> Result<TraceEvent, ParseError> {
    let f = Fields(record);
    let kind = if record.len() >= 4 { f.u32(0) } else { 0 };
    let need = match kind {
        kind::TCP_STATE => size_of::<RawTcpEvent>(),
        kind::QP_RTR => size_of::<RawQpRtrEvent>(),
        kind::QP_DESTROY => size_of::<RawQpDestroyEvent>(),
        _ if record.len() < 4 => {
            return Err(ParseError::Truncated {
                kind: 0,
                len: record.len(),
                need: 4,
            });
        }
        other => return Err(ParseError::UnknownKind(other)),
    };
    if record.len() < need {
        return Err(ParseError::Truncated {
            kind,
            len: record.len(),
            need,
        });
    }
    let origin = f.origin();
    Ok(match kind {
        kind::TCP_STATE => {
            let family = f.u16(80);
            let saddr: [u8; 16] = f.bytes(48);
            let daddr: [u8; 16] = f.bytes(64);
            let (src, dst) = match family {
                AF_INET => (ipv4(&saddr), ipv4(&daddr)),
                AF_INET6 => (
                    IpAddr::V6(Ipv6Addr::from(saddr)),
                    IpAddr::V6(Ipv6Addr::from(daddr)),
                ),
                other => return Err(ParseError::UnknownFamily(other)),
            };
            TraceEvent::Tcp(TcpEvent {
                origin,
                sock: f.u64(40),
                src,
                dst,
                sport: f.u16(82),
                dport: f.u16(84),
                old_state: TcpState::from(f.u8(86)),
                new_state: TcpState::from(f.u8(87)),
                netns: f.u32(88),
            })
        }
        kind::QP_RTR => TraceEvent::QpRtr(QpRtrEvent {
            origin,
            qp_num: f.u32(40),
            dest_qp_num: f.u32(44),
            dgid: f.bytes(48),
            flow_label: f.u32(64),
            attr_mask: f.u32(68),
            sgid_index: f.u8(72),
            port_num: f.u8(73),
            traffic_class: f.u8(74),
            hop_limit: f.u8(75),
            qp_type: f.u32(76),
            device: f.c_string::<DEVICE_LEN>(80),
        }),
        _ => TraceEvent::QpDestroy(QpDestroyEvent {
            origin,
            qp_num: f.u32(40),
        }),
    })
}

fn ipv4(addr: &[u8; 16]) -> IpAddr {
    IpAddr::V4(Ipv4Addr::new(addr[0], addr[1], addr[2], addr[3]))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::mem::offset_of;

    #[test]
    fn parser_offsets_match_the_repr_c_layout() {
        assert_eq!(offset_of!(RawTcpEvent, sock), 40);
        assert_eq!(offset_of!(RawTcpEvent, saddr), 48);
        assert_eq!(offset_of!(RawTcpEvent, daddr), 64);
        assert_eq!(offset_of!(RawTcpEvent, family), 80);
        assert_eq!(offset_of!(RawTcpEvent, sport), 82);
        assert_eq!(offset_of!(RawTcpEvent, dport), 84);
        assert_eq!(offset_of!(RawTcpEvent, oldstate), 86);
        assert_eq!(offset_of!(RawTcpEvent, newstate), 87);
        assert_eq!(offset_of!(RawQpRtrEvent, qp_num), 40);
        assert_eq!(offset_of!(RawQpRtrEvent, dest_qp_num), 44);
        assert_eq!(offset_of!(RawQpRtrEvent, dgid), 48);
        assert_eq!(offset_of!(RawQpRtrEvent, flow_label), 64);
        assert_eq!(offset_of!(RawQpRtrEvent, attr_mask), 68);
        assert_eq!(offset_of!(RawQpRtrEvent, sgid_index), 72);
        assert_eq!(offset_of!(RawQpRtrEvent, port_num), 73);
        assert_eq!(offset_of!(RawQpRtrEvent, traffic_class), 74);
        assert_eq!(offset_of!(RawQpRtrEvent, hop_limit), 75);
        assert_eq!(offset_of!(RawQpRtrEvent, qp_type), 76);
        assert_eq!(offset_of!(RawQpRtrEvent, device), 80);
        assert_eq!(offset_of!(RawTcpEvent, netns), 88);
        assert_eq!(offset_of!(RawQpDestroyEvent, qp_num), 40);
        assert_eq!(offset_of!(EventHeader, comm), 24);
    }

    fn header(kind: u32) -> Vec<u8> {
        let mut v = Vec::new();
        v.extend_from_slice(&kind.to_ne_bytes());
        v.extend_from_slice(&4242u32.to_ne_bytes());
        v.extend_from_slice(&77u64.to_ne_bytes());
        v.extend_from_slice(&1234u64.to_ne_bytes());
        let mut comm = [0u8; 16];
        comm[..4].copy_from_slice(b"demo");
        v.extend_from_slice(&comm);
        v
    }

    #[test]
    fn parses_a_tcp_record() {
        let mut v = header(kind::TCP_STATE);
        v.extend_from_slice(&0xdead_beefu64.to_ne_bytes());
        let mut s = [0u8; 16];
        s[..4].copy_from_slice(&[10, 0, 0, 1]);
        let mut d = [0u8; 16];
        d[..4].copy_from_slice(&[10, 0, 0, 2]);
        v.extend_from_slice(&s);
        v.extend_from_slice(&d);
        v.extend_from_slice(&AF_INET.to_ne_bytes());
        v.extend_from_slice(&40000u16.to_ne_bytes());
        v.extend_from_slice(&5201u16.to_ne_bytes());
        v.extend_from_slice(&[2, 1]);
        v.extend_from_slice(&4_026_531_840u32.to_ne_bytes());
        v.extend_from_slice(&0u32.to_ne_bytes());
        let Ok(TraceEvent::Tcp(e)) = parse_event(&v) else {
            unreachable!("{:?}", parse_event(&v))
        };
        assert_eq!(e.origin.pid, 4242);
        assert_eq!(e.origin.cgroup_id, 77);
        assert_eq!(e.origin.comm, "demo");
        assert_eq!(e.src, IpAddr::V4(Ipv4Addr::new(10, 0, 0, 1)));
        assert_eq!(e.dst, IpAddr::V4(Ipv4Addr::new(10, 0, 0, 2)));
        assert_eq!((e.sport, e.dport), (40000, 5201));
        assert_eq!(
            (e.old_state, e.new_state),
            (TcpState::SynSent, TcpState::Established)
        );
        assert_eq!(e.sock, 0xdead_beef);
        assert_eq!(e.netns, 4_026_531_840);
    }

    #[test]
    fn parses_a_qp_rtr_record_with_its_device() {
        let mut v = header(kind::QP_RTR);
        v.extend_from_slice(&0x1234u32.to_ne_bytes());
        v.extend_from_slice(&0x5678u32.to_ne_bytes());
        v.extend_from_slice(&[0xfe; 16]);
        v.extend_from_slice(&0xabcdeu32.to_ne_bytes());
        v.extend_from_slice(&0x0010_0081u32.to_ne_bytes());
        v.extend_from_slice(&[3, 1, 106, 64]);
        v.extend_from_slice(&2u32.to_ne_bytes());
        let mut device = [0xffu8; 16];
        device[..7].copy_from_slice(b"mlx5_0\0");
        v.extend_from_slice(&device);
        let Ok(TraceEvent::QpRtr(e)) = parse_event(&v) else {
            unreachable!("{:?}", parse_event(&v))
        };
        assert_eq!((e.qp_num, e.dest_qp_num), (0x1234, 0x5678));
        assert_eq!(e.flow_label, 0xabcde);
        assert_eq!((e.sgid_index, e.port_num), (3, 1));
        assert_eq!(e.device, "mlx5_0", "bytes after the NUL are ignored");
    }

    #[test]
    fn malformed_records_are_errors_never_panics() {
        assert!(matches!(
            parse_event(&[]),
            Err(ParseError::Truncated { .. })
        ));
        assert!(matches!(
            parse_event(&[1, 0]),
            Err(ParseError::Truncated { .. })
        ));
        let h = header(kind::QP_RTR);
        assert_eq!(
            parse_event(&h),
            Err(ParseError::Truncated {
                kind: kind::QP_RTR,
                len: 40,
                need: 96
            })
        );
        assert_eq!(parse_event(&header(99)), Err(ParseError::UnknownKind(99)));
        let mut tcp = header(kind::TCP_STATE);
        tcp.resize(96, 0);
        assert_eq!(parse_event(&tcp), Err(ParseError::UnknownFamily(0)));
        // Every prefix of a valid record: an error or a value, never a panic.
        let mut rtr = header(kind::QP_RTR);
        rtr.resize(96, 0xff);
        for len in 0..rtr.len() {
            assert!(parse_event(&rtr[..len]).is_err());
        }
        assert!(parse_event(&rtr).is_ok());
    }
}
