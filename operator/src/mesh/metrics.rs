//! The mesh controller's own Prometheus metrics, including the fleet-level
//! ToR-pair view (one series per probed ToR pair, replaced every window), which
//! is what a 10,000-node fleet should scrape instead of every agent's histograms.

use prometheus::{
    Encoder, GaugeVec, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge,
    IntGaugeVec, Opts, Registry, TextEncoder,
};

/// Phases of [`ControllerMetrics::window_processing`]: summaries taken in
/// since the previous judged window, the analyzer's pass (path and ToR-pair
/// statistics, SLA hysteresis, localization), and what follows it (trace
/// planning, history, metrics, service impact).
pub const WINDOW_PHASES: [&str; 3] = ["ingest", "evaluate", "publish"];

#[derive(Debug)]
pub struct ControllerMetrics {
    registry: Registry,
    pub agents: IntGaugeVec,
    pub endpoints: IntGauge,
    pub registrations: IntCounterVec,
    pub summaries: IntCounterVec,
    /// Summaries for windows judged already, by outcome (see `analyzer::Intake`).
    pub late_summaries: IntCounterVec,
    pub rejected_requests: IntCounterVec,
    pub windows_evaluated: IntCounter,
    pub excluded_paths: IntCounterVec,
    pub findings_open: IntGaugeVec,
    pub findings_opened: IntCounterVec,
    pub localized_faults: IntGaugeVec,
    pub root_causes_opened: IntCounterVec,
    pub root_causes_localized: IntGaugeVec,
    pub registry_errors: IntCounterVec,
    pub invalid_tor_labels: IntCounter,
    pub tor_changes: IntCounter,
    pub tor_pair_loss: GaugeVec,
    pub tor_pair_p99: GaugeVec,
    pub tor_pair_probes: IntGaugeVec,
    /// Seconds each judged window cost the controller, by phase ([`WINDOW_PHASES`]).
    pub window_processing: HistogramVec,
}

impl ControllerMetrics {
    #[allow(clippy::too_many_lines)] // one declaration per metric, nothing to split
    pub fn new() -> Result<Self, prometheus::Error> {
        let registry = Registry::new();
        let tor_pair = &["src_tor", "dst_tor"];
        Ok(Self {
            agents: reg(
                &registry,
                IntGaugeVec::new(
                    Opts::new(
                        "pingmesh_controller_agents",
                        "Agents known to the registry (registered) and with an open pinglist stream (connected).",
                    ),
                    &["state"],
                )?,
            )?,
            endpoints: reg(
                &registry,
                IntGauge::new(
                    "pingmesh_controller_endpoints",
                    "Endpoints in the registry.",
                )?,
            )?,
            registrations: reg(
                &registry,
                IntCounterVec::new(
                    Opts::new(
                        "pingmesh_controller_registrations_total",
                        "Agent registrations by result.",
                    ),
                    &["result"],
                )?,
            )?,
            summaries: reg(
                &registry,
                IntCounterVec::new(
                    Opts::new(
                        "pingmesh_controller_window_summaries_total",
                        "Window summaries received, by result.",
                    ),
                    &["result"],
                )?,
            )?,
            late_summaries: reg(
                &registry,
                IntCounterVec::new(
                    Opts::new(
                        "pingmesh_controller_late_summaries_total",
                        "Window summaries for windows judged already, by outcome: accepted (into the window's late bucket), judged (into the window history), duplicate (their source was judged in the window), too_old (beyond the horizon), late_full (late summaries, with those of overdue open windows, at their cap).",
                    ),
                    &["outcome"],
                )?,
            )?,
            rejected_requests: reg(
                &registry,
                IntCounterVec::new(
                    Opts::new(
                        "pingmesh_controller_rejected_requests_total",
                        "gRPC requests refused, by call and reason.",
                    ),
                    &["rpc", "reason"],
                )?,
            )?,
            windows_evaluated: reg(
                &registry,
                IntCounter::new(
                    "pingmesh_controller_windows_evaluated_total",
                    "Windows the analyzer has judged.",
                )?,
            )?,
            excluded_paths: reg(
                &registry,
                IntCounterVec::new(
                    Opts::new(
                        "pingmesh_controller_excluded_paths_total",
                        "Path-windows left out of analysis, by reason (target_gone: the target's agent was not up for the whole window).",
                    ),
                    &["reason"],
                )?,
            )?,
            findings_open: reg(
                &registry,
                IntGaugeVec::new(
                    Opts::new("pingmesh_findings_open", "Open findings by kind."),
                    &["kind"],
                )?,
            )?,
            findings_opened: reg(
                &registry,
                IntCounterVec::new(
                    Opts::new(
                        "pingmesh_findings_opened_total",
                        "Findings opened, by kind.",
                    ),
                    &["kind"],
                )?,
            )?,
            localized_faults: reg(
                &registry,
                IntGaugeVec::new(
                    Opts::new(
                        "pingmesh_localized_faults",
                        "Open root causes (localized faults, after hysteresis) by component kind (endpoint, host, tor, link, switch, unknown) and signal (loss, latency, host_delay).",
                    ),
                    &["kind", "signal"],
                )?,
            )?,
            root_causes_opened: reg(
                &registry,
                IntCounterVec::new(
                    Opts::new(
                        "pingmesh_root_causes_opened_total",
                        "Root causes opened, by component kind and signal.",
                    ),
                    &["kind", "signal"],
                )?,
            )?,
            root_causes_localized: reg(
                &registry,
                IntGaugeVec::new(
                    Opts::new(
                        "pingmesh_root_causes_localized",
                        "Root causes the last judged window localized (before hysteresis), by component kind and signal.",
                    ),
                    &["kind", "signal"],
                )?,
            )?,
            registry_errors: reg(
                &registry,
                IntCounterVec::new(
                    Opts::new(
                        "pingmesh_controller_registry_errors_total",
                        "Registry store errors, by category.",
                    ),
                    &["category"],
                )?,
            )?,
            invalid_tor_labels: reg(
                &registry,
                IntCounter::new(
                    "pingmesh_controller_invalid_tor_labels_total",
                    "ToR label values passed over because they are not valid ToR names (the endpoint fell back to the next label or the default ToR).",
                )?,
            )?,
            tor_changes: reg(
                &registry,
                IntCounter::new(
                    "pingmesh_controller_endpoint_tor_changes_total",
                    "Endpoints moved to another ToR because their node's labels (or the topology settings) changed.",
                )?,
            )?,
            tor_pair_loss: reg(
                &registry,
                GaugeVec::new(
                    Opts::new(
                        "pingmesh_tor_pair_loss_ratio",
                        "Loss ratio lost/(ok+lost) between two ToRs in the last judged window (absent when nothing was probed).",
                    ),
                    tor_pair,
                )?,
            )?,
            tor_pair_p99: reg(
                &registry,
                GaugeVec::new(
                    Opts::new(
                        "pingmesh_tor_pair_network_rtt_p99_seconds",
                        "p99 network RTT between two ToRs in the last judged window (upper bucket bound).",
                    ),
                    tor_pair,
                )?,
            )?,
            tor_pair_probes: reg(
                &registry,
                IntGaugeVec::new(
                    Opts::new(
                        "pingmesh_tor_pair_window_probes",
                        "Probes between two ToRs in the last judged window, by result.",
                    ),
                    &["src_tor", "dst_tor", "result"],
                )?,
            )?,
            window_processing: reg(
                &registry,
                HistogramVec::new(
                    HistogramOpts::new(
                        "pingmesh_window_processing_seconds",
                        "Controller time per judged window, by phase: ingest (taking in summaries since the previous judged window), evaluate (the analyzer: statistics, SLA, localization), publish (trace planning, history, metrics, service impact).",
                    )
                    .buckets(vec![
                        0.001, 0.005, 0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
                    ]),
                    &["phase"],
                )?,
            )?,
            registry,
        })
    }

    /// For parts of the controller that register their own series.
    pub fn registry(&self) -> &Registry {
        &self.registry
    }

    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::new();
        let _ = TextEncoder::new().encode(&self.registry.gather(), &mut out);
        out
    }
}

fn reg<M: prometheus::core::Collector + Clone + 'static>(
    r: &Registry,
    m: M,
) -> Result<M, prometheus::Error> {
    r.register(Box::new(m.clone()))?;
    Ok(m)
}
