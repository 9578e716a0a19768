//! The controller's service metrics, registered in its own registry. The
//! series budget is fixed: totals by bounded labels, plus impact series for
//! at most `metricsTopServices` services (replaced every judged window), never
//! one per pod or flow. docs/metrics.md lists them.

use prometheus::{IntCounterVec, IntGauge, IntGaugeVec, Opts, Registry};

use super::ServiceImpact;
use super::flow::{FlowKind, FlowRejection};
use super::mapping::Unmapped;
use super::table::MAPPED;

#[derive(Debug, Clone)]
pub struct ServiceMetrics {
    pub rejected_flows: IntCounterVec,
    pub flows: IntGaugeVec,
    pub dropped_by_agents: IntGauge,
    pub reporting_nodes: IntGauge,
    pub services: IntGauge,
    pub targets: IntGauge,
    pub impacted: IntGauge,
    pub impact_flows: IntGaugeVec,
    pub impact_pods: IntGaugeVec,
}

impl ServiceMetrics {
    #[allow(clippy::too_many_lines)] // one declaration per metric
    pub fn new(registry: &Registry) -> Result<Self, prometheus::Error> {
        let m = Self {
            rejected_flows: IntCounterVec::new(
                Opts::new(
                    "pingmesh_controller_service_flows_rejected_total",
                    "Reported service flows left out because a field was invalid, by reason.",
                ),
                &["reason"],
            )?,
            flows: IntGaugeVec::new(
                Opts::new(
                    "pingmesh_service_flows",
                    "Service flows in the agents' latest reports, by kind (tcp, rdma) and how they map to endpoints (mapped: both ends; remote_unknown, remote_same_node, remote_ambiguous: local end only; local_unknown: neither).",
                ),
                &["kind", "state"],
            )?,
            dropped_by_agents: IntGauge::new(
                "pingmesh_service_flows_dropped_by_agents",
                "Service flows the agents' full flow tables left out of their latest reports.",
            )?,
            reporting_nodes: IntGauge::new(
                "pingmesh_service_reporting_nodes",
                "Nodes whose service flow report is current (not expired).",
            )?,
            services: IntGauge::new(
                "pingmesh_services",
                "Distinct services with flows in the latest reports.",
            )?,
            targets: IntGauge::new(
                "pingmesh_service_targets",
                "Service targets handed to agents (endpoint pairs of service flows, after the per-agent cap).",
            )?,
            impacted: IntGauge::new(
                "pingmesh_services_impacted",
                "Services whose flows cross an open root cause or SLA finding.",
            )?,
            impact_flows: IntGaugeVec::new(
                Opts::new(
                    "pingmesh_service_impact_flows",
                    "Flows of a service that cross open root causes or SLA findings; only the top metricsTopServices services by impact.",
                ),
                &["service", "namespace", "kind"],
            )?,
            impact_pods: IntGaugeVec::new(
                Opts::new(
                    "pingmesh_service_impact_pods",
                    "Pods of a service with flows that cross open root causes or SLA findings; only the top metricsTopServices services by impact.",
                ),
                &["service", "namespace", "kind"],
            )?,
        };
        registry.register(Box::new(m.rejected_flows.clone()))?;
        registry.register(Box::new(m.flows.clone()))?;
        registry.register(Box::new(m.dropped_by_agents.clone()))?;
        registry.register(Box::new(m.reporting_nodes.clone()))?;
        registry.register(Box::new(m.services.clone()))?;
        registry.register(Box::new(m.targets.clone()))?;
        registry.register(Box::new(m.impacted.clone()))?;
        registry.register(Box::new(m.impact_flows.clone()))?;
        registry.register(Box::new(m.impact_pods.clone()))?;
        for reason in FlowRejection::CATEGORIES {
            m.rejected_flows.with_label_values(&[reason]).inc_by(0);
        }
        m.set_flows(&[]);
        Ok(m)
    }

    /// Flow totals by kind and state, from `(kind, state, count)` rows; every
    /// known series is written (0 where absent).
    pub fn set_flows(&self, rows: &[(FlowKind, &str, u64)]) {
        for kind in FlowKind::ALL {
            for state in std::iter::once(MAPPED).chain(Unmapped::ALL.iter().map(|u| u.label())) {
                let n: u64 = rows
                    .iter()
                    .filter(|(k, s, _)| *k == kind && *s == state)
                    .map(|(_, _, n)| n)
                    .sum();
                self.flows
                    .with_label_values(&[kind.label(), state])
                    .set(gauge(n));
            }
        }
    }

    /// The impact series: totals, and the top `top` services.
    pub fn set_impact(&self, impact: &ServiceImpact, top: usize) {
        self.impacted.set(gauge(impact.ranking.len() as u64));
        self.impact_flows.reset();
        self.impact_pods.reset();
        for s in impact.ranking.iter().take(top) {
            let labels = [
                s.service.as_str(),
                s.name.namespace.as_str(),
                s.name.kind.as_str(),
            ];
            self.impact_flows
                .with_label_values(&labels)
                .set(gauge(s.flows));
            self.impact_pods
                .with_label_values(&labels)
                .set(gauge(s.pods));
        }
    }
}

pub fn gauge(n: u64) -> i64 {
    i64::try_from(n).unwrap_or(i64::MAX)
}
