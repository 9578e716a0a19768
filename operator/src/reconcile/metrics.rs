//! The operator's own Prometheus metrics (reconciler, leader election, what it
//! publishes from findings), served next to the mesh controller's.

use std::time::Duration;

use prometheus::{
    Encoder, Histogram, HistogramOpts, IntCounterVec, IntGauge, Opts, Registry, TextEncoder,
};

/// Outcome label of `pingmesh_reconcile_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// Objects and status are as the spec asks.
    Ok,
    /// The spec is invalid; reported in status, nothing applied.
    InvalidSpec,
    /// The API server refused or failed a request (see the errors counter).
    Error,
}

impl Outcome {
    fn label(self) -> &'static str {
        match self {
            Self::Ok => "ok",
            Self::InvalidSpec => "invalid_spec",
            Self::Error => "error",
        }
    }
}

/// What a finding Event was published on (`object` label).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EventObject {
    PingMesh,
    Node,
    /// The workload (`Job`, `StatefulSet`, ...) or bare pod of a service a root cause hits.
    Workload,
}

impl EventObject {
    fn label(self) -> &'static str {
        match self {
            Self::PingMesh => "pingmesh",
            Self::Node => "node",
            Self::Workload => "workload",
        }
    }
}

fn result_label(ok: bool) -> &'static str {
    if ok { "ok" } else { "error" }
}

#[derive(Debug, Clone)]
pub struct ReconcileMetrics {
    registry: Registry,
    reconciles: IntCounterVec,
    duration: Histogram,
    errors: IntCounterVec,
    leader: IntGauge,
    finding_events: IntCounterVec,
    condition_writes: IntCounterVec,
    faulty_nodes: IntGauge,
}

impl ReconcileMetrics {
    pub fn new() -> Result<Self, prometheus::Error> {
        let registry = Registry::new();
        let reconciles = IntCounterVec::new(
            Opts::new("pingmesh_reconcile_total", "PingMesh reconciles by result."),
            &["result"],
        )?;
        let duration = Histogram::with_opts(
            HistogramOpts::new(
                "pingmesh_reconcile_duration_seconds",
                "Time one PingMesh reconcile took, API calls included.",
            )
            .buckets(vec![
                0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
            ]),
        )?;
        let errors = IntCounterVec::new(
            Opts::new(
                "pingmesh_reconcile_errors_total",
                "Failed PingMesh reconciles by error category.",
            ),
            &["category"],
        )?;
        let leader = IntGauge::new(
            "pingmesh_operator_leader",
            "1 while this operator replica holds the leader Lease (or runs without leader election), else 0.",
        )?;
        let finding_events = IntCounterVec::new(
            Opts::new(
                "pingmesh_operator_finding_events_total",
                "Events published for root causes and findings opening and clearing, and on the workloads of the services root causes hit, by the object they are about and result.",
            ),
            &["object", "result"],
        )?;
        let condition_writes = IntCounterVec::new(
            Opts::new(
                "pingmesh_operator_node_condition_writes_total",
                "Writes of the spec.nodeHealth condition to nodes/status (set or removed), by result.",
            ),
            &["result"],
        )?;
        let faulty_nodes = IntGauge::new(
            "pingmesh_operator_faulty_nodes",
            "Nodes an open endpoint or host root cause names now (the nodeHealth condition is False on them when enabled).",
        )?;
        registry.register(Box::new(reconciles.clone()))?;
        registry.register(Box::new(duration.clone()))?;
        registry.register(Box::new(errors.clone()))?;
        registry.register(Box::new(leader.clone()))?;
        registry.register(Box::new(finding_events.clone()))?;
        registry.register(Box::new(condition_writes.clone()))?;
        registry.register(Box::new(faulty_nodes.clone()))?;
        // Every known label value starts at zero, so rate() and alerts see
        // the series before the first event.
        for object in [
            EventObject::PingMesh,
            EventObject::Node,
            EventObject::Workload,
        ] {
            for ok in [true, false] {
                finding_events
                    .with_label_values(&[object.label(), result_label(ok)])
                    .inc_by(0);
            }
        }
        for ok in [true, false] {
            condition_writes
                .with_label_values(&[result_label(ok)])
                .inc_by(0);
        }
        Ok(Self {
            registry,
            reconciles,
            duration,
            errors,
            leader,
            finding_events,
            condition_writes,
            faulty_nodes,
        })
    }

    /// Counts one reconcile; `category` is set for [`Outcome::Error`].
    pub fn observe(&self, outcome: Outcome, category: Option<&'static str>, took: Duration) {
        self.reconciles.with_label_values(&[outcome.label()]).inc();
        self.duration.observe(took.as_secs_f64());
        if let Some(category) = category {
            self.errors.with_label_values(&[category]).inc();
        }
    }

    /// Reconciles counted with `result`.
    pub fn count(&self, outcome: Outcome) -> u64 {
        self.reconciles.with_label_values(&[outcome.label()]).get()
    }

    /// Errors counted with `category`.
    pub fn errors(&self, category: &str) -> u64 {
        self.errors.with_label_values(&[category]).get()
    }

    /// Whether this replica leads now.
    pub fn set_leader(&self, leading: bool) {
        self.leader.set(i64::from(leading));
    }

    pub fn is_leader(&self) -> bool {
        self.leader.get() == 1
    }

    pub fn count_finding_event(&self, object: EventObject, ok: bool) {
        self.finding_events
            .with_label_values(&[object.label(), result_label(ok)])
            .inc();
    }

    /// Finding Events counted about `object` with result `ok`.
    pub fn finding_events(&self, object: EventObject, ok: bool) -> u64 {
        self.finding_events
            .with_label_values(&[object.label(), result_label(ok)])
            .get()
    }

    pub fn count_condition_write(&self, ok: bool) {
        self.condition_writes
            .with_label_values(&[result_label(ok)])
            .inc();
    }

    /// Condition writes counted with result `ok`.
    pub fn condition_writes(&self, ok: bool) -> u64 {
        self.condition_writes
            .with_label_values(&[result_label(ok)])
            .get()
    }

    pub fn set_faulty_nodes(&self, nodes: usize) {
        self.faulty_nodes
            .set(i64::try_from(nodes).unwrap_or(i64::MAX));
    }

    /// `pingmesh_operator_faulty_nodes` now.
    pub fn faulty_nodes(&self) -> i64 {
        self.faulty_nodes.get()
    }

    /// Prometheus text format.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::new();
        let _ = TextEncoder::new().encode(&self.registry.gather(), &mut out);
        out
    }
}
