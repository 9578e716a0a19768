//! The agent's Prometheus metrics.
//!
//! Every series carries a constant `node` label (the agent's identity, so series
//! of different agents never collide, even when several agents share one
//! exposition as in `pingmesh demo`). Probe series are labelled by source and
//! target ToR only; per-target-node detail is opt-in (`--metrics-per-target-node`)
//! because it grows with the mesh. Series of ToRs that leave the pinglist are
//! removed so rollouts do not leave stale series behind. The budget is in
//! `docs/metrics.md`.

use std::collections::{HashMap, HashSet};
use std::sync::{Mutex, OnceLock};

use prometheus::{
    Encoder, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge,
    IntGaugeVec, Opts, Registry, TextEncoder,
};

use crate::probe::timing::{InvalidReason, Sample};

/// Bucket bounds (seconds) for network RTT: 5 us .. 1 s, dense where RDMA and
/// datacenter UDP RTTs live.
const RTT_BUCKETS: &[f64] = &[
    5e-6, 1e-5, 2.5e-5, 5e-5, 1e-4, 2.5e-4, 5e-4, 1e-3, 2.5e-3, 5e-3, 1e-2, 1e-1, 1.0,
];
/// Bucket bounds (seconds) for host-side delays.
const HOST_DELAY_BUCKETS: &[f64] = &[1e-5, 5e-5, 1e-4, 5e-4, 1e-3, 5e-3, 1e-2, 5e-2, 1e-1, 1.0];

#[derive(Debug, thiserror::Error)]
pub enum MetricsError {
    #[error("registering metric: {0}")]
    Register(#[from] prometheus::Error),
}

/// Labels of one probed target, resolved once per pinglist.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct TargetLabels {
    pub src_tor: String,
    pub dst_tor: String,
    pub dst_node: String,
}

/// The probe series of one target, each looked up on first use and then
/// kept: a lookup hashes the label values and takes the vector's lock, which
/// per answered probe was a visible share of the agent's user time. A target
/// lives for one pinglist, and the series of targets still in the pinglist are
/// never removed, so a kept handle stays the exported one.
#[derive(Debug)]
pub struct TargetSeries {
    labels: TargetLabels,
    ok: OnceLock<IntCounter>,
    invalid: OnceLock<IntCounter>,
    lost: OnceLock<IntCounter>,
    network_rtt: OnceLock<Histogram>,
    prober_delay: OnceLock<Histogram>,
    node_ok: OnceLock<IntCounter>,
    node_invalid: OnceLock<IntCounter>,
    node_lost: OnceLock<IntCounter>,
    node_network_rtt: OnceLock<Histogram>,
}

impl From<TargetLabels> for TargetSeries {
    fn from(labels: TargetLabels) -> Self {
        Self {
            labels,
            ok: OnceLock::new(),
            invalid: OnceLock::new(),
            lost: OnceLock::new(),
            network_rtt: OnceLock::new(),
            prober_delay: OnceLock::new(),
            node_ok: OnceLock::new(),
            node_invalid: OnceLock::new(),
            node_lost: OnceLock::new(),
            node_network_rtt: OnceLock::new(),
        }
    }
}

impl TargetSeries {
    pub fn labels(&self) -> &TargetLabels {
        &self.labels
    }
}

#[derive(Debug)]
pub struct AgentMetrics {
    registry: Registry,
    per_target_node: bool,
    probes: IntCounterVec,
    network_rtt: HistogramVec,
    prober_delay: HistogramVec,
    responder_delay: prometheus::Histogram,
    node_probes: IntCounterVec,
    node_network_rtt: HistogramVec,
    software_timed: IntCounter,
    invalid: IntCounterVec,
    malformed: IntCounterVec,
    unmatched: IntCounterVec,
    probe_auth_failures: IntCounterVec,
    probe_key_id: IntGauge,
    probes_not_sent: IntCounterVec,
    responder_answered: IntCounterVec,
    responder_dropped: IntCounterVec,
    pinglist_targets: IntGaugeVec,
    pinglist_version: IntGauge,
    pending: IntGauge,
    controller_connected: IntGauge,
    report_buffer_limit: IntGauge,
    registrations: IntCounterVec,
    reports: IntCounterVec,
    windows_dropped: IntCounterVec,
    transport_info: IntGaugeVec,
    rdma_device_events: IntCounterVec,
    rdma_endpoint_up: IntGaugeVec,
    exported: Mutex<ExportedLabels>,
}

#[derive(Debug, Default)]
struct ExportedLabels {
    tor_pairs: HashSet<(String, String)>,
    dst_nodes: HashSet<String>,
}

impl AgentMetrics {
    #[allow(clippy::too_many_lines)] // one declaration per metric, nothing to split
    pub fn new(node: &str, per_target_node: bool) -> Result<Self, MetricsError> {
        let labels = HashMap::from([("node".to_owned(), node.to_owned())]);
        let registry = Registry::new_custom(None, Some(labels))?;
        let tor_pair = &["src_tor", "dst_tor"];
        let m = Self {
            per_target_node,
            probes: counter_vec(
                &registry,
                "pingmesh_probes_total",
                "Probes by result: ok (answered, valid), lost (no answer in time), invalid (answered, impossible timestamps).",
                &["src_tor", "dst_tor", "result"],
            )?,
            network_rtt: histogram_vec(
                &registry,
                "pingmesh_network_rtt_seconds",
                "Network round-trip time: (T5-T2)-(T4-T3), host delays excluded.",
                tor_pair,
                RTT_BUCKETS,
            )?,
            prober_delay: histogram_vec(
                &registry,
                "pingmesh_prober_delay_seconds",
                "Delay the probing host added: (T6-T1)-(T5-T2).",
                &["src_tor"],
                HOST_DELAY_BUCKETS,
            )?,
            responder_delay: histogram(
                &registry,
                "pingmesh_responder_delay_seconds",
                "Delay the responding hosts added: T4-T3, over all targets.",
                HOST_DELAY_BUCKETS,
            )?,
            node_probes: counter_vec(
                &registry,
                "pingmesh_target_node_probes_total",
                "Probes by target node and result (only with --metrics-per-target-node).",
                &["dst_node", "result"],
            )?,
            node_network_rtt: histogram_vec(
                &registry,
                "pingmesh_target_node_network_rtt_seconds",
                "Network RTT by target node (only with --metrics-per-target-node).",
                &["dst_node"],
                RTT_BUCKETS,
            )?,
            software_timed: counter(
                &registry,
                "pingmesh_software_timed_samples_total",
                "Valid samples timed in user space because kernel or NIC timestamps were missing.",
            )?,
            invalid: counter_vec(
                &registry,
                "pingmesh_invalid_samples_total",
                "Answered probes whose timestamps were impossible, by reason.",
                &["reason"],
            )?,
            malformed: counter_vec(
                &registry,
                "pingmesh_malformed_packets_total",
                "Datagrams that failed to decode, by receiving role and reason.",
                &["role", "reason"],
            )?,
            unmatched: counter_vec(
                &registry,
                "pingmesh_unmatched_acks_total",
                "ACKs that matched no pending probe (late after timeout, duplicate, or another prober's).",
                &["reason"],
            )?,
            probe_auth_failures: counter_vec(
                &registry,
                "pingmesh_probe_auth_failures_total",
                "Probes and ACKs dropped because their tag was missing, named an unknown key or was wrong (forged or corrupted), by message kind and reason.",
                &["kind", "reason"],
            )?,
            probe_key_id: gauge(
                &registry,
                "pingmesh_probe_key_id",
                "Wire id (1-255) of the probe key this agent signs with; 0 while probe authentication is off.",
            )?,
            probes_not_sent: counter_vec(
                &registry,
                "pingmesh_probes_not_sent_total",
                "Probes the agent could not send, by reason.",
                &["reason"],
            )?,
            responder_answered: counter_vec(
                &registry,
                "pingmesh_responder_answered_total",
                "Probes the responder answered, by how T3/T4 were timed.",
                &["timestamps"],
            )?,
            responder_dropped: counter_vec(
                &registry,
                "pingmesh_responder_dropped_total",
                "Datagrams the responder ignored or could not answer, by reason.",
                &["reason"],
            )?,
            pinglist_targets: gauge_vec(
                &registry,
                "pingmesh_pinglist_targets",
                "Targets in the current pinglist, by kind.",
                &["kind"],
            )?,
            pinglist_version: gauge(
                &registry,
                "pingmesh_pinglist_version",
                "Version of the pinglist in use (0: none yet).",
            )?,
            pending: gauge(
                &registry,
                "pingmesh_pending_probes",
                "Probes awaiting their ACKs.",
            )?,
            controller_connected: gauge(
                &registry,
                "pingmesh_controller_connected",
                "1 while the pinglist stream from the mesh controller is open.",
            )?,
            report_buffer_limit: gauge(
                &registry,
                "pingmesh_report_buffer_limit",
                "Most window summaries kept for the controller while it is unreachable (--report-buffer); beyond it the oldest are dropped as buffer_full.",
            )?,
            registrations: counter_vec(
                &registry,
                "pingmesh_controller_registrations_total",
                "Registration attempts with the mesh controller, by result.",
                &["result"],
            )?,
            reports: counter_vec(
                &registry,
                "pingmesh_window_reports_total",
                "Window summaries sent to the mesh controller, by result.",
                &["result"],
            )?,
            windows_dropped: counter_vec(
                &registry,
                "pingmesh_window_summaries_dropped_total",
                "Window summaries never delivered, by reason.",
                &["reason"],
            )?,
            transport_info: gauge_vec(
                &registry,
                "pingmesh_transport_info",
                "The transport in use (value 1), how probes are timed (nic, kernel or software), and why this transport.",
                &["transport", "timestamps", "reason"],
            )?,
            rdma_device_events: counter_vec(
                &registry,
                "pingmesh_rdma_device_events_total",
                "RDMA device events and recoveries, by RNIC device and event.",
                &["device", "event"],
            )?,
            rdma_endpoint_up: gauge_vec(
                &registry,
                "pingmesh_rdma_endpoint_up",
                "1 while an RNIC endpoint is open with its port active, 0 while down or re-opening.",
                &["endpoint", "device"],
            )?,
            exported: Mutex::new(ExportedLabels::default()),
            registry,
        };
        m.initialize_series();
        Ok(m)
    }

    /// Starts the reason-labelled counters at zero for every known reason, so
    /// dashboards see series (and `rate()` works) before the first event.
    fn initialize_series(&self) {
        use crate::probe::pending::{PendingError, Unmatched};
        use crate::probe::wire::DecodeError;
        for reason in [
            InvalidReason::ZeroTimestamp,
            InvalidReason::NegativeNetworkRtt,
            InvalidReason::AbsurdNetworkRtt,
            InvalidReason::NegativeResponderDelay,
            InvalidReason::NegativeProberDelay,
        ] {
            self.invalid
                .with_label_values(&[reason.category()])
                .inc_by(0);
        }
        let decode = [
            DecodeError::WrongLength(0),
            DecodeError::BadMagic,
            DecodeError::UnsupportedVersion(0),
            DecodeError::UnknownType(0),
            DecodeError::ReservedBitsSet,
            DecodeError::AuthFraming,
        ];
        for role in ["prober", "responder"] {
            for e in &decode {
                self.malformed
                    .with_label_values(&[role, e.category()])
                    .inc_by(0);
            }
        }
        for kind in ["probe", "ack1", "ack2"] {
            for reason in ["missing_tag", "unknown_key", "bad_tag"] {
                self.probe_auth_failures
                    .with_label_values(&[kind, reason])
                    .inc_by(0);
            }
        }
        for u in [Unmatched::UnknownSeq, Unmatched::Duplicate] {
            self.unmatched.with_label_values(&[u.category()]).inc_by(0);
        }
        self.unmatched
            .with_label_values(&["other_prober"])
            .inc_by(0);
        let full = PendingError::Full { capacity: 0 };
        for reason in [
            full.category(),
            "send",
            "bad_target_address",
            "port_down",
            "send_completion_error",
        ] {
            self.probes_not_sent.with_label_values(&[reason]).inc_by(0);
        }
        for reason in [
            "buffer_full",
            "rejected",
            "reporter_busy",
            "unresolved_probes",
        ] {
            self.windows_dropped.with_label_values(&[reason]).inc_by(0);
        }
        for result in ["accepted", "duplicate", "rejected", "failed"] {
            self.reports.with_label_values(&[result]).inc_by(0);
        }
        for reason in [
            "tx_timestamp_mismatch",
            "ack1_send_failed",
            "send_completion_failed",
            "pending_ack2_overflow",
            "tx_timestamp_timeout",
            "ack2_send_failed",
            "receive_failed",
            "path_trace",
        ] {
            self.responder_dropped
                .with_label_values(&[reason])
                .inc_by(0);
        }
    }

    pub fn registry(&self) -> &Registry {
        &self.registry
    }

    /// Prometheus text exposition of every metric.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::new();
        // Encoding into a Vec cannot fail for well-formed families.
        let _ = TextEncoder::new().encode(&self.registry.gather(), &mut out);
        out
    }

    pub fn sent_nothing(&self, reason: &'static str) {
        self.probes_not_sent.with_label_values(&[reason]).inc();
    }

    pub fn answered(&self, series: &TargetSeries, sample: &Sample) {
        let t = &series.labels;
        series
            .ok
            .get_or_init(|| {
                self.probes
                    .with_label_values(&[&t.src_tor, &t.dst_tor, "ok"])
            })
            .inc();
        let rtt = ns_to_seconds(sample.network_rtt_ns);
        series
            .network_rtt
            .get_or_init(|| {
                self.network_rtt
                    .with_label_values(&[&t.src_tor, &t.dst_tor])
            })
            .observe(rtt);
        series
            .prober_delay
            .get_or_init(|| self.prober_delay.with_label_values(&[&t.src_tor]))
            .observe(ns_to_seconds(sample.prober_delay_ns));
        self.responder_delay
            .observe(ns_to_seconds(sample.responder_delay_ns));
        if sample.software_timed {
            self.software_timed.inc();
        }
        if self.per_target_node {
            series
                .node_ok
                .get_or_init(|| self.node_probes.with_label_values(&[&t.dst_node, "ok"]))
                .inc();
            series
                .node_network_rtt
                .get_or_init(|| self.node_network_rtt.with_label_values(&[&t.dst_node]))
                .observe(rtt);
        }
    }

    pub fn invalid(&self, series: &TargetSeries, reason: InvalidReason) {
        let t = &series.labels;
        series
            .invalid
            .get_or_init(|| {
                self.probes
                    .with_label_values(&[&t.src_tor, &t.dst_tor, "invalid"])
            })
            .inc();
        self.invalid.with_label_values(&[reason.category()]).inc();
        if self.per_target_node {
            series
                .node_invalid
                .get_or_init(|| {
                    self.node_probes
                        .with_label_values(&[&t.dst_node, "invalid"])
                })
                .inc();
        }
    }

    pub fn lost(&self, series: &TargetSeries) {
        let t = &series.labels;
        series
            .lost
            .get_or_init(|| {
                self.probes
                    .with_label_values(&[&t.src_tor, &t.dst_tor, "lost"])
            })
            .inc();
        if self.per_target_node {
            series
                .node_lost
                .get_or_init(|| self.node_probes.with_label_values(&[&t.dst_node, "lost"]))
                .inc();
        }
    }

    pub fn malformed(&self, role: &'static str, reason: &'static str) {
        self.malformed.with_label_values(&[role, reason]).inc();
    }

    pub fn probe_auth_failed(&self, kind: &'static str, reason: &'static str) {
        self.probe_auth_failures
            .with_label_values(&[kind, reason])
            .inc();
    }

    /// The probe key in force: its wire id, or 0 with authentication off.
    pub fn set_probe_key_id(&self, id: u8) {
        self.probe_key_id.set(i64::from(id));
    }

    pub fn unmatched(&self, reason: &'static str) {
        self.unmatched.with_label_values(&[reason]).inc();
    }

    pub fn responder_answered(&self, software_timed: bool) {
        let how = if software_timed { "software" } else { "kernel" };
        self.responder_answered.with_label_values(&[how]).inc();
    }

    pub fn responder_dropped(&self, reason: &'static str) {
        self.responder_dropped.with_label_values(&[reason]).inc();
    }

    pub fn set_pending(&self, n: usize) {
        self.pending.set(i64::try_from(n).unwrap_or(i64::MAX));
    }

    pub fn set_controller_connected(&self, up: bool) {
        self.controller_connected.set(i64::from(up));
    }

    /// The report buffer's size: how long a controller outage loses nothing
    /// is this over the summaries a window produces.
    pub fn set_report_buffer_limit(&self, summaries: usize) {
        self.report_buffer_limit
            .set(i64::try_from(summaries).unwrap_or(i64::MAX));
    }

    pub fn registration(&self, result: &'static str) {
        self.registrations.with_label_values(&[result]).inc();
    }

    pub fn reports(&self, result: &'static str, n: usize) {
        self.reports
            .with_label_values(&[result])
            .inc_by(u64::try_from(n).unwrap_or(u64::MAX));
    }

    pub fn windows_dropped(&self, reason: &'static str, n: u64) {
        self.windows_dropped.with_label_values(&[reason]).inc_by(n);
    }

    /// `timestamps`: `nic`, `kernel` or `software`.
    pub fn set_transport(&self, transport: &str, timestamps: &str, reason: &str) {
        self.transport_info.reset();
        self.transport_info
            .with_label_values(&[transport, timestamps, reason])
            .set(1);
    }

    /// An RNIC endpoint's device event or recovery step (`port_down`,
    /// `port_up`, `fatal`, `reopened`, `reopen_failed`, `other`).
    pub fn rdma_device_event(&self, device: &str, event: &str) {
        self.rdma_device_events
            .with_label_values(&[device, event])
            .inc();
    }

    /// Whether an RNIC endpoint is open with its port active.
    pub fn set_rdma_endpoint_up(&self, endpoint: &str, device: &str, up: bool) {
        self.rdma_endpoint_up
            .with_label_values(&[endpoint, device])
            .set(i64::from(up));
    }

    /// Records a new pinglist: target counts by kind, and removal of the series
    /// of ToR pairs and nodes that are no longer probed.
    pub fn set_pinglist(
        &self,
        version: u64,
        targets_by_kind: &[(&str, usize)],
        labels: &[TargetLabels],
    ) {
        self.pinglist_version
            .set(i64::try_from(version).unwrap_or(i64::MAX));
        self.pinglist_targets.reset();
        for (kind, n) in targets_by_kind {
            self.pinglist_targets
                .with_label_values(&[kind])
                .set(i64::try_from(*n).unwrap_or(i64::MAX));
        }
        let now_pairs: HashSet<(String, String)> = labels
            .iter()
            .map(|l| (l.src_tor.clone(), l.dst_tor.clone()))
            .collect();
        let now_nodes: HashSet<String> = labels.iter().map(|l| l.dst_node.clone()).collect();
        let Ok(mut exported) = self.exported.lock() else {
            return;
        };
        for (src, dst) in exported.tor_pairs.difference(&now_pairs) {
            for result in ["ok", "lost", "invalid"] {
                let _ = self.probes.remove_label_values(&[src, dst, result]);
            }
            let _ = self.network_rtt.remove_label_values(&[src, dst]);
        }
        for node in exported.dst_nodes.difference(&now_nodes) {
            for result in ["ok", "lost", "invalid"] {
                let _ = self.node_probes.remove_label_values(&[node, result]);
            }
            let _ = self.node_network_rtt.remove_label_values(&[node]);
        }
        exported.tor_pairs = now_pairs;
        exported.dst_nodes = now_nodes;
    }
}

fn ns_to_seconds(ns: u64) -> f64 {
    ns as f64 / 1e9
}

pub(crate) fn counter_vec(
    r: &Registry,
    name: &str,
    help: &str,
    labels: &[&str],
) -> Result<IntCounterVec, MetricsError> {
    let m = IntCounterVec::new(Opts::new(name, help), labels)?;
    r.register(Box::new(m.clone()))?;
    Ok(m)
}

pub(crate) fn counter(r: &Registry, name: &str, help: &str) -> Result<IntCounter, MetricsError> {
    let m = IntCounter::with_opts(Opts::new(name, help))?;
    r.register(Box::new(m.clone()))?;
    Ok(m)
}

pub(crate) fn gauge_vec(
    r: &Registry,
    name: &str,
    help: &str,
    labels: &[&str],
) -> Result<IntGaugeVec, MetricsError> {
    let m = IntGaugeVec::new(Opts::new(name, help), labels)?;
    r.register(Box::new(m.clone()))?;
    Ok(m)
}

pub(crate) fn gauge(r: &Registry, name: &str, help: &str) -> Result<IntGauge, MetricsError> {
    let m = IntGauge::with_opts(Opts::new(name, help))?;
    r.register(Box::new(m.clone()))?;
    Ok(m)
}

fn histogram(
    r: &Registry,
    name: &str,
    help: &str,
    buckets: &[f64],
) -> Result<prometheus::Histogram, MetricsError> {
    let m =
        prometheus::Histogram::with_opts(HistogramOpts::new(name, help).buckets(buckets.to_vec()))?;
    r.register(Box::new(m.clone()))?;
    Ok(m)
}

fn histogram_vec(
    r: &Registry,
    name: &str,
    help: &str,
    labels: &[&str],
    buckets: &[f64],
) -> Result<HistogramVec, MetricsError> {
    let m = HistogramVec::new(
        HistogramOpts::new(name, help).buckets(buckets.to_vec()),
        labels,
    )?;
    r.register(Box::new(m.clone()))?;
    Ok(m)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn labels(dst_tor: &str) -> TargetLabels {
        TargetLabels {
            src_tor: "tor-a".into(),
            dst_tor: dst_tor.into(),
            dst_node: format!("n-{dst_tor}"),
        }
    }

    fn text(m: &AgentMetrics) -> String {
        String::from_utf8(m.encode()).unwrap()
    }

    #[test]
    fn report_results_and_responder_drop_reasons_start_at_zero() {
        let t = text(&AgentMetrics::new("node-1", false).unwrap());
        for series in [
            r#"pingmesh_window_reports_total{result="duplicate",node="node-1"} 0"#,
            r#"pingmesh_window_reports_total{result="rejected",node="node-1"} 0"#,
            r#"pingmesh_responder_dropped_total{reason="receive_failed",node="node-1"} 0"#,
            r#"pingmesh_responder_dropped_total{reason="path_trace",node="node-1"} 0"#,
        ] {
            assert!(t.lines().any(|l| l == series), "missing {series}");
        }
    }

    #[test]
    fn the_report_buffer_limit_is_exported() {
        let m = AgentMetrics::new("node-1", false).unwrap();
        m.set_report_buffer_limit(40);
        let series = r#"pingmesh_report_buffer_limit{node="node-1"} 40"#;
        assert!(text(&m).lines().any(|l| l == series), "missing {series}");
    }

    #[test]
    fn every_series_carries_the_node_label() {
        let m = AgentMetrics::new("node-1", false).unwrap();
        m.lost(&labels("tor-b").into());
        let t = text(&m);
        let series: Vec<&str> = t.lines().filter(|l| !l.starts_with('#')).collect();
        assert!(!series.is_empty());
        for line in &series {
            assert!(
                line.contains(r#"node="node-1""#),
                "series without the node label: {line}"
            );
        }
        let lost = series
            .iter()
            .find(|l| l.starts_with("pingmesh_probes_total{"))
            .unwrap();
        for label in [
            r#"dst_tor="tor-b""#,
            r#"src_tor="tor-a""#,
            r#"result="lost""#,
        ] {
            assert!(lost.contains(label), "{lost}");
        }
        assert!(lost.ends_with(" 1"), "{lost}");
    }

    #[test]
    fn per_target_node_series_exist_only_when_asked_for() {
        let sample = Sample {
            network_rtt_ns: 1000,
            prober_delay_ns: 1,
            responder_delay_ns: 1,
            software_timed: false,
        };
        let off = AgentMetrics::new("n", false).unwrap();
        off.answered(&labels("tor-b").into(), &sample);
        assert!(!text(&off).contains("dst_node="));
        let on = AgentMetrics::new("n", true).unwrap();
        on.answered(&labels("tor-b").into(), &sample);
        assert!(text(&on).contains(r#"dst_node="n-tor-b""#));
    }

    #[test]
    fn a_target_s_kept_series_keep_counting_into_the_exported_ones() {
        let m = AgentMetrics::new("n", true).unwrap();
        let target: TargetSeries = labels("tor-b").into();
        let sample = Sample {
            network_rtt_ns: 2_000,
            prober_delay_ns: 1,
            responder_delay_ns: 1,
            software_timed: false,
        };
        for _ in 0..3 {
            m.answered(&target, &sample);
        }
        m.lost(&target);
        m.lost(&target);
        let t = text(&m);
        let value = |prefix: &str, label: &str| -> String {
            t.lines()
                .find(|l| l.starts_with(prefix) && l.contains(label))
                .unwrap_or_else(|| panic!("no {prefix} with {label} in {t}"))
                .rsplit(' ')
                .next()
                .unwrap()
                .to_string()
        };
        assert_eq!(value("pingmesh_probes_total{", r#"result="ok""#), "3");
        assert_eq!(value("pingmesh_probes_total{", r#"result="lost""#), "2");
        assert_eq!(
            value("pingmesh_target_node_probes_total{", r#"result="ok""#),
            "3"
        );
        assert!(
            !t.contains(r#"result="invalid""#),
            "not resolved before use: {t}"
        );
    }

    #[test]
    fn series_of_tors_that_left_the_pinglist_are_removed() {
        let m = AgentMetrics::new("n", true).unwrap();
        m.set_pinglist(1, &[("tor_mesh", 2)], &[labels("tor-b"), labels("tor-c")]);
        m.lost(&labels("tor-b").into());
        m.lost(&labels("tor-c").into());
        m.set_pinglist(2, &[("tor_mesh", 1)], &[labels("tor-c")]);
        let t = text(&m);
        assert!(!t.contains(r#"dst_tor="tor-b""#), "{t}");
        assert!(!t.contains(r#"dst_node="n-tor-b""#), "{t}");
        assert!(t.contains(r#"dst_tor="tor-c""#));
    }
}
