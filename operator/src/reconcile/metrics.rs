//! The reconciler's Prometheus metrics, served next to the mesh controller's.

use std::time::Duration;

use prometheus::{Encoder, Histogram, HistogramOpts, IntCounterVec, Opts, Registry, TextEncoder};

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

#[derive(Debug, Clone)]
pub struct ReconcileMetrics {
    registry: Registry,
    reconciles: IntCounterVec,
    duration: Histogram,
    errors: IntCounterVec,
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
        registry.register(Box::new(reconciles.clone()))?;
        registry.register(Box::new(duration.clone()))?;
        registry.register(Box::new(errors.clone()))?;
        Ok(Self {
            registry,
            reconciles,
            duration,
            errors,
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

    /// Prometheus text format.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::new();
        let _ = TextEncoder::new().encode(&self.registry.gather(), &mut out);
        out
    }
}
