//! What the tracer and the flow table export, on the agent's registry (so
//! every series carries the agent's `node` label). Bounded: hooks, states,
//! event kinds and outcomes are fixed sets; nothing per flow, pod or library.
use prometheus::{IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Registry};

use super::table::Outcome;
use crate::metrics::{MetricsError, counter, counter_vec, gauge, gauge_vec};

/// Every hook the tracer may attach, as a `hook` label.
pub const HOOKS: [&str; 7] = [
    "fentry_ib_modify_qp",
    "fentry_ib_destroy_qp",
    "kprobe_ib_modify_qp",
    "kprobe_ib_destroy_qp",
    "tracepoint_inet_sock_set_state",
    "uprobe_ibv_modify_qp",
    "uprobe_ibv_destroy_qp",
];

/// Why the tracer is off (or `on`): the `reason` label of `pingmesh_tracer_state`.
pub const STATES: [&str; 7] = [
    "on",
    "disabled",
    "unsupported_platform",
    "no_btf",
    "no_privileges",
    "load_failed",
    "no_hooks",
];

/// The kernel RDMA hooks' state: `reason` of `pingmesh_tracer_ib_core_state`
/// (`crate::tracer::IbCoreState::label`).
pub const IB_CORE_STATES: [&str; 8] = [
    "on_fentry",
    "on_kprobe",
    "disabled",
    "unsupported_platform",
    "no_ib_core",
    "no_ib_core_btf",
    "load_failed",
    "attach_failed",
];

const EVENT_KINDS: [&str; 3] = ["tcp", "qp_rtr", "qp_destroy"];
const REPORT_RESULTS: [&str; 4] = ["accepted", "unimplemented", "rejected", "failed"];

#[derive(Debug, Clone)]
pub struct TracerMetrics {
    hooks: IntGaugeVec,
    state: IntGaugeVec,
    verbs_libraries: IntGauge,
    attach_failures: IntCounterVec,
    events: IntCounterVec,
    malformed: IntCounter,
    lost: IntCounter,
    ib_core_state: IntGaugeVec,
    flows: IntGaugeVec,
    dropped_full: IntCounter,
    expired: IntCounter,
    reports: IntCounterVec,
}

impl TracerMetrics {
    pub fn new(registry: &Registry) -> Result<Self, MetricsError> {
        let m = Self {
            hooks: gauge_vec(
                registry,
                "pingmesh_tracer_hooks",
                "Service tracing hooks attached (1) or not (0).",
                &["hook"],
            )?,
            state: gauge_vec(
                registry,
                "pingmesh_tracer_state",
                "1 for the tracer's state: reason=\"on\", or why it is off.",
                &["reason"],
            )?,
            verbs_libraries: gauge(
                registry,
                "pingmesh_tracer_verbs_libraries",
                "Distinct libibverbs files (device, inode) the uprobes are attached to.",
            )?,
            attach_failures: counter_vec(
                registry,
                "pingmesh_tracer_attach_failures_total",
                "Hooks that failed to attach, by hook.",
                &["hook"],
            )?,
            events: counter_vec(
                registry,
                "pingmesh_tracer_events_total",
                "Tracer records consumed, by kind and what they did to the flow table.",
                &["kind", "outcome"],
            )?,
            malformed: counter(
                registry,
                "pingmesh_tracer_malformed_records_total",
                "Ring-buffer records that did not parse (dropped).",
            )?,
            lost: counter(
                registry,
                "pingmesh_tracer_events_lost_total",
                "Records the BPF programs could not write because the ring buffer was full.",
            )?,
            ib_core_state: gauge_vec(
                registry,
                "pingmesh_tracer_ib_core_state",
                "1 for the kernel RDMA hooks' state: reason=\"on_fentry\" or \"on_kprobe\", or why they are off.",
                &["reason"],
            )?,
            flows: gauge_vec(
                registry,
                "pingmesh_service_flows",
                "Service flows in the agent's table, by kind.",
                &["kind"],
            )?,
            dropped_full: counter(
                registry,
                "pingmesh_service_flows_dropped_total",
                "New service flows left out because the table was full.",
            )?,
            expired: counter(
                registry,
                "pingmesh_service_flows_expired_total",
                "Idle service flows removed because they no longer existed.",
            )?,
            reports: counter_vec(
                registry,
                "pingmesh_service_flow_reports_total",
                "ReportServiceFlows calls by result.",
                &["result"],
            )?,
        };
        for hook in HOOKS {
            m.hooks.with_label_values(&[hook]).set(0);
        }
        for kind in EVENT_KINDS {
            for outcome in Outcome::ALL {
                m.events
                    .with_label_values(&[kind, outcome.label()])
                    .inc_by(0);
            }
        }
        for result in REPORT_RESULTS {
            m.reports.with_label_values(&[result]).inc_by(0);
        }
        for kind in ["tcp", "rdma"] {
            m.flows.with_label_values(&[kind]).set(0);
        }
        m.set_state("disabled");
        m.set_ib_core_state("disabled");
        Ok(m)
    }

    /// Exactly one `reason` series is 1.
    pub fn set_state(&self, reason: &str) {
        for r in STATES {
            self.state
                .with_label_values(&[r])
                .set(i64::from(r == reason));
        }
    }

    /// Exactly one `reason` series of the kernel RDMA hooks is 1.
    pub fn set_ib_core_state(&self, reason: &str) {
        for r in IB_CORE_STATES {
            self.ib_core_state
                .with_label_values(&[r])
                .set(i64::from(r == reason));
        }
    }

    /// Adds records lost to a full ring buffer (a delta).
    pub fn lost(&self, n: u64) {
        self.lost.inc_by(n);
    }

    pub fn set_hook(&self, hook: &str, attached: bool) {
        self.hooks
            .with_label_values(&[hook])
            .set(i64::from(attached));
    }

    pub fn attach_failed(&self, hook: &str) {
        self.attach_failures.with_label_values(&[hook]).inc();
    }

    pub fn set_verbs_libraries(&self, n: usize) {
        self.verbs_libraries
            .set(i64::try_from(n).unwrap_or(i64::MAX));
    }

    pub fn event(&self, kind: &'static str, outcome: Outcome) {
        self.events
            .with_label_values(&[kind, outcome.label()])
            .inc();
        if outcome == Outcome::DroppedFull {
            self.dropped_full.inc();
        }
    }

    pub fn malformed(&self, n: u64) {
        self.malformed.inc_by(n);
    }

    pub fn expired(&self, n: usize) {
        self.expired.inc_by(u64::try_from(n).unwrap_or(u64::MAX));
    }

    pub fn set_flows(&self, tcp: usize, rdma: usize) {
        for (kind, n) in [("tcp", tcp), ("rdma", rdma)] {
            self.flows
                .with_label_values(&[kind])
                .set(i64::try_from(n).unwrap_or(i64::MAX));
        }
    }

    pub fn report(&self, result: &'static str) {
        self.reports.with_label_values(&[result]).inc();
    }
}

#[cfg(test)]
mod tests {
    use prometheus::Encoder;

    use super::*;

    #[test]
    fn exactly_one_state_is_set_and_every_hook_is_listed() {
        let registry = Registry::new();
        let m = TracerMetrics::new(&registry).unwrap();
        m.set_state("no_btf");
        m.set_hook("tracepoint_inet_sock_set_state", true);
        let mut text = Vec::new();
        prometheus::TextEncoder::new()
            .encode(&registry.gather(), &mut text)
            .unwrap();
        let text = String::from_utf8(text).unwrap();
        assert!(
            text.contains("pingmesh_tracer_state{reason=\"no_btf\"} 1"),
            "{text}"
        );
        assert_eq!(
            text.lines()
                .filter(|l| l.starts_with("pingmesh_tracer_state{") && l.ends_with(" 1"))
                .count(),
            1
        );
        for hook in HOOKS {
            assert!(text.contains(&format!("pingmesh_tracer_hooks{{hook=\"{hook}\"}}")));
        }
        assert!(text.contains("pingmesh_tracer_hooks{hook=\"tracepoint_inet_sock_set_state\"} 1"));
        assert!(text.contains("pingmesh_tracer_ib_core_state{reason=\"disabled\"} 1"));
        assert!(text.contains("pingmesh_tracer_events_lost_total 0"));
    }

    #[test]
    fn every_kernel_hook_and_ib_core_state_has_its_series() {
        use crate::tracer::{Hook, IbCoreOff, IbCoreState, KernelHook};
        for how in [KernelHook::Fentry, KernelHook::Kprobe] {
            assert!(HOOKS.contains(&Hook::KernelModifyQp(how).kind()));
            assert!(HOOKS.contains(&Hook::KernelDestroyQp(how).kind()));
            assert!(IB_CORE_STATES.contains(&IbCoreState::On(how).label()));
        }
        assert!(IB_CORE_STATES.contains(&IbCoreState::NotTried.label()));
        for reason in IbCoreOff::ALL {
            assert!(IB_CORE_STATES.contains(&reason.label()), "{reason:?}");
        }
    }
}
