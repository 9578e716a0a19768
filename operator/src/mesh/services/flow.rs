//! One traced service flow as the controller accepts it: every field of the
//! agent's `ServiceFlow` checked, addresses parsed, text bounded.
//!
//! A report is a snapshot of up to [`MAX_SERVICE_FLOWS_PER_REPORT`] flows; a
//! flow that fails a check is left out and counted by [`FlowRejection::category`],
//! the rest of the report still counts. Nothing here panics on any input.

use std::collections::HashSet;
use std::net::{IpAddr, Ipv6Addr};

use pingmesh_proto::limits::MAX_SERVICE_FLOWS_PER_REPORT;
use pingmesh_proto::v1::{self, ServiceFlowKind};
use serde::{Deserialize, Serialize};

/// Largest GRH flow label (20 bits).
pub const MAX_FLOW_LABEL: u32 = 0xF_FFFF;
/// Largest queue pair number (24 bits).
pub const MAX_QPN: u32 = 0xFF_FFFF;
/// Longest pod UID accepted (a UID is 36 characters; static pods use a 32-digit hash).
pub const MAX_POD_UID_LEN: usize = 64;
/// Longest container id accepted (runtimes use 64 hex digits).
pub const MAX_CONTAINER_ID_LEN: usize = 128;
/// Longest command kept (the kernel's `comm` is 15 bytes; longer names are cut).
pub const MAX_COMMAND_LEN: usize = 64;

/// What kind of connection a flow is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum FlowKind {
    Tcp,
    Rdma,
}

impl FlowKind {
    pub const ALL: [Self; 2] = [Self::Tcp, Self::Rdma];

    /// Bounded metric label.
    pub fn label(self) -> &'static str {
        match self {
            Self::Tcp => "tcp",
            Self::Rdma => "rdma",
        }
    }
}

/// A flow that passed every check.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TracedFlow {
    pub kind: FlowKind,
    /// TCP: the IP (IPv4-mapped IPv6 read as IPv4). RDMA: the GID.
    pub local: IpAddr,
    pub remote: IpAddr,
    /// TCP ports, or RDMA queue pair numbers.
    pub local_port: u32,
    pub remote_port: u32,
    /// RDMA: the connection's GRH flow label (0: none). TCP: 0.
    pub flow_label: u32,
    /// Lower-case pod UID; `None` outside pods.
    pub pod_uid: Option<String>,
    pub container_id: String,
    pub pid: u32,
    /// Printable ASCII, at most [`MAX_COMMAND_LEN`] bytes.
    pub command: String,
}

/// Why one flow of a report was left out.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FlowRejection {
    #[error("flow kind {0} is neither TCP nor RDMA")]
    UnknownKind(i32),
    #[error("{which} address {value:?} is not {expected}")]
    BadAddress {
        which: &'static str,
        value: String,
        expected: &'static str,
    },
    #[error("{which} {value} is out of range for {kind:?}")]
    BadPort {
        which: &'static str,
        value: u32,
        kind: FlowKind,
    },
    #[error("flow label {0} is above {MAX_FLOW_LABEL}")]
    BadFlowLabel(u32),
    #[error("pod UID {0:?} is not a UID")]
    BadPodUid(String),
    #[error("container id {0:?} is not a container id")]
    BadContainerId(String),
    #[error("flow listed twice in one report")]
    Duplicate,
}

impl FlowRejection {
    /// Every value [`FlowRejection::category`] returns.
    pub const CATEGORIES: [&'static str; 7] = [
        "unknown_kind",
        "bad_address",
        "bad_port",
        "bad_flow_label",
        "bad_pod_uid",
        "bad_container_id",
        "duplicate",
    ];

    /// Bounded metric label.
    pub fn category(&self) -> &'static str {
        match self {
            Self::UnknownKind(_) => "unknown_kind",
            Self::BadAddress { .. } => "bad_address",
            Self::BadPort { .. } => "bad_port",
            Self::BadFlowLabel(_) => "bad_flow_label",
            Self::BadPodUid(_) => "bad_pod_uid",
            Self::BadContainerId(_) => "bad_container_id",
            Self::Duplicate => "duplicate",
        }
    }
}

/// A report too large to look at.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0} service flows in one report; at most {MAX_SERVICE_FLOWS_PER_REPORT}")]
pub struct TooManyFlows(pub usize);

/// The flows of one report that passed, and the rejections of the others.
#[derive(Debug, Default)]
pub struct CheckedReport {
    pub flows: Vec<TracedFlow>,
    pub rejected: Vec<FlowRejection>,
}

/// Checks every flow of a report; refuses the whole report only when it is
/// larger than the contract allows.
pub fn check_report(flows: &[v1::ServiceFlow]) -> Result<CheckedReport, TooManyFlows> {
    if flows.len() > MAX_SERVICE_FLOWS_PER_REPORT {
        return Err(TooManyFlows(flows.len()));
    }
    let mut out = CheckedReport::default();
    let mut seen = HashSet::with_capacity(flows.len());
    for f in flows {
        match check_flow(f) {
            Ok(flow) => {
                let key = (
                    flow.kind,
                    flow.local,
                    flow.remote,
                    flow.local_port,
                    flow.remote_port,
                );
                if seen.insert(key) {
                    out.flows.push(flow);
                } else {
                    out.rejected.push(FlowRejection::Duplicate);
                }
            }
            Err(e) => out.rejected.push(e),
        }
    }
    Ok(out)
}

/// Checks one flow.
pub fn check_flow(f: &v1::ServiceFlow) -> Result<TracedFlow, FlowRejection> {
    let kind = match ServiceFlowKind::try_from(f.kind) {
        Ok(ServiceFlowKind::Tcp) => FlowKind::Tcp,
        Ok(ServiceFlowKind::Rdma) => FlowKind::Rdma,
        _ => return Err(FlowRejection::UnknownKind(f.kind)),
    };
    let local = address(kind, "local", &f.local_address)?;
    let remote = address(kind, "remote", &f.remote_address)?;
    let max_port = match kind {
        FlowKind::Tcp => u32::from(u16::MAX),
        FlowKind::Rdma => MAX_QPN,
    };
    for (which, value) in [("local port", f.local_port), ("remote port", f.remote_port)] {
        if value == 0 || value > max_port {
            return Err(FlowRejection::BadPort { which, value, kind });
        }
    }
    if f.flow_label > MAX_FLOW_LABEL {
        return Err(FlowRejection::BadFlowLabel(f.flow_label));
    }
    let pod_uid = if f.pod_uid.is_empty() {
        None
    } else if f.pod_uid.len() <= MAX_POD_UID_LEN
        && f.pod_uid
            .bytes()
            .all(|b| b.is_ascii_hexdigit() || b == b'-')
    {
        Some(f.pod_uid.to_ascii_lowercase())
    } else {
        return Err(FlowRejection::BadPodUid(clip(&f.pod_uid)));
    };
    if f.container_id.len() > MAX_CONTAINER_ID_LEN
        || !f.container_id.bytes().all(|b| b.is_ascii_alphanumeric())
    {
        return Err(FlowRejection::BadContainerId(clip(&f.container_id)));
    }
    Ok(TracedFlow {
        kind,
        local,
        remote,
        local_port: f.local_port,
        remote_port: f.remote_port,
        flow_label: if kind == FlowKind::Rdma {
            f.flow_label
        } else {
            0
        },
        pod_uid,
        container_id: f.container_id.clone(),
        pid: f.pid,
        command: printable_command(&f.command),
    })
}

fn address(kind: FlowKind, which: &'static str, value: &str) -> Result<IpAddr, FlowRejection> {
    let bad = |expected| FlowRejection::BadAddress {
        which,
        value: clip(value),
        expected,
    };
    let ip = match kind {
        // IPv4 sockets on dual-stack listeners show as ::ffff:a.b.c.d.
        FlowKind::Tcp => value
            .parse::<IpAddr>()
            .map_err(|_| bad("an IP address"))?
            .to_canonical(),
        FlowKind::Rdma => IpAddr::V6(
            value
                .parse::<Ipv6Addr>()
                .map_err(|_| bad("a GID in IPv6 notation"))?,
        ),
    };
    if ip.is_unspecified() {
        return Err(bad("a specific address"));
    }
    Ok(ip)
}

/// The command with anything but printable ASCII replaced by `_`, cut to
/// [`MAX_COMMAND_LEN`] bytes: it ends up in service names, JSON and metric labels.
fn printable_command(command: &str) -> String {
    command
        .chars()
        .take(MAX_COMMAND_LEN)
        .map(|c| if c.is_ascii_graphic() { c } else { '_' })
        .collect()
}

/// A hostile value, shortened for an error message.
fn clip(value: &str) -> String {
    value.chars().take(80).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    pub fn tcp(local: &str, remote: &str, lport: u32, rport: u32) -> v1::ServiceFlow {
        v1::ServiceFlow {
            kind: ServiceFlowKind::Tcp.into(),
            local_address: local.to_owned(),
            remote_address: remote.to_owned(),
            local_port: lport,
            remote_port: rport,
            flow_label: 0,
            pod_uid: "0b7f3c1e-5d2a-4c7e-9f00-1a2b3c4d5e6f".to_owned(),
            container_id: "abc123".to_owned(),
            pid: 42,
            command: "python3".to_owned(),
            first_seen_ms: 1,
            last_seen_ms: 2,
        }
    }

    #[test]
    fn a_well_formed_tcp_flow_passes_with_ipv4_mapped_addresses_read_as_ipv4() {
        let flow = check_flow(&tcp("::ffff:10.0.0.1", "10.0.0.2", 40_000, 5201)).unwrap();
        assert_eq!(flow.local, "10.0.0.1".parse::<IpAddr>().unwrap());
        assert_eq!(flow.kind, FlowKind::Tcp);
        assert_eq!(
            flow.pod_uid.as_deref(),
            Some("0b7f3c1e-5d2a-4c7e-9f00-1a2b3c4d5e6f")
        );
    }

    #[test]
    fn an_rdma_flow_keeps_its_gid_and_flow_label() {
        let mut f = tcp("fe80::1", "::ffff:10.0.0.2", 0x11, 0x22);
        f.kind = ServiceFlowKind::Rdma.into();
        f.flow_label = 0xABCDE;
        let flow = check_flow(&f).unwrap();
        assert_eq!(flow.remote, "::ffff:10.0.0.2".parse::<IpAddr>().unwrap());
        assert_eq!(flow.flow_label, 0xABCDE);
    }

    #[test]
    fn each_bad_field_is_named_by_its_category() {
        let cases: Vec<(v1::ServiceFlow, &str)> = vec![
            (
                v1::ServiceFlow {
                    kind: 7,
                    ..tcp("10.0.0.1", "10.0.0.2", 1, 2)
                },
                "unknown_kind",
            ),
            (tcp("10.0.0.300", "10.0.0.2", 1, 2), "bad_address"),
            (tcp("10.0.0.1", "0.0.0.0", 1, 2), "bad_address"),
            (tcp("10.0.0.1", "10.0.0.2", 0, 2), "bad_port"),
            (tcp("10.0.0.1", "10.0.0.2", 1, 70_000), "bad_port"),
            (
                v1::ServiceFlow {
                    kind: ServiceFlowKind::Rdma.into(),
                    ..tcp("10.0.0.1", "fe80::2", 1, 2)
                },
                "bad_address",
            ),
            (
                v1::ServiceFlow {
                    kind: ServiceFlowKind::Rdma.into(),
                    flow_label: MAX_FLOW_LABEL + 1,
                    ..tcp("fe80::1", "fe80::2", 1, 2)
                },
                "bad_flow_label",
            ),
            (
                v1::ServiceFlow {
                    pod_uid: "../../etc/passwd".to_owned(),
                    ..tcp("10.0.0.1", "10.0.0.2", 1, 2)
                },
                "bad_pod_uid",
            ),
            (
                v1::ServiceFlow {
                    container_id: "x".repeat(MAX_CONTAINER_ID_LEN + 1),
                    ..tcp("10.0.0.1", "10.0.0.2", 1, 2)
                },
                "bad_container_id",
            ),
        ];
        for (flow, category) in cases {
            let e = check_flow(&flow).unwrap_err();
            assert_eq!(e.category(), category, "{e}");
            assert!(FlowRejection::CATEGORIES.contains(&e.category()));
        }
    }

    #[test]
    fn commands_are_made_printable_and_cut() {
        let mut f = tcp("10.0.0.1", "10.0.0.2", 1, 2);
        f.command = format!("bad\u{7}name ü{}", "x".repeat(200));
        let flow = check_flow(&f).unwrap();
        assert!(flow.command.starts_with("bad_name__x"), "{}", flow.command);
        assert_eq!(flow.command.len(), MAX_COMMAND_LEN);
    }

    #[test]
    fn a_report_keeps_good_flows_and_counts_bad_and_duplicate_ones() {
        let flows = vec![
            tcp("10.0.0.1", "10.0.0.2", 1, 2),
            tcp("10.0.0.1", "10.0.0.2", 1, 2),
            tcp("nonsense", "10.0.0.2", 1, 2),
            tcp("10.0.0.1", "10.0.0.3", 1, 2),
        ];
        let checked = check_report(&flows).unwrap();
        assert_eq!(checked.flows.len(), 2);
        let categories: Vec<&str> = checked
            .rejected
            .iter()
            .map(FlowRejection::category)
            .collect();
        assert_eq!(categories, ["duplicate", "bad_address"]);
    }

    #[test]
    fn a_report_above_the_bound_is_refused_whole() {
        let flows = vec![tcp("10.0.0.1", "10.0.0.2", 1, 2); MAX_SERVICE_FLOWS_PER_REPORT + 1];
        assert_eq!(
            check_report(&flows).unwrap_err(),
            TooManyFlows(MAX_SERVICE_FLOWS_PER_REPORT + 1)
        );
    }

    proptest::proptest! {
        #[test]
        fn any_flow_is_accepted_or_rejected_without_panicking(
            kind in 0i32..4,
            local in ".{0,60}",
            remote in "[0-9a-f:.]{0,45}",
            lport in proptest::num::u32::ANY,
            rport in proptest::num::u32::ANY,
            label in proptest::num::u32::ANY,
            uid in ".{0,80}",
            command in ".{0,100}",
        ) {
            let f = v1::ServiceFlow {
                kind,
                local_address: local,
                remote_address: remote,
                local_port: lport,
                remote_port: rport,
                flow_label: label,
                pod_uid: uid,
                container_id: String::new(),
                pid: 1,
                command,
                first_seen_ms: 0,
                last_seen_ms: 0,
            };
            if let Ok(flow) = check_flow(&f) {
                proptest::prop_assert!(flow.command.len() <= MAX_COMMAND_LEN);
                proptest::prop_assert!(flow.flow_label <= MAX_FLOW_LABEL);
            }
        }
    }
}
