//! The controller's service side: taking agents' service flow reports,
//! keeping the service targets pinglists carry, expiring nodes that stopped
//! reporting, and recomputing service impact after every judged window.
//! The pieces themselves live in `mesh::services`.

use std::sync::Arc;

use pingmesh_proto::v1;

use super::{MeshController, MeshError, lock};
use crate::mesh::analyzer::Finding;
use crate::mesh::localize::OpenRootCause;
use crate::mesh::services::flow::{FlowKind, check_report};
use crate::mesh::services::identity::name_service;
use crate::mesh::services::impact::{self, ServiceImpact};
use crate::mesh::services::mapping::EndpointBook;
use crate::mesh::services::metrics::{ServiceMetrics, gauge};
use crate::mesh::services::table::{NodeFlows, ServiceTable, ServiceTargets, fold};
use crate::mesh::services::view::{ServicesView, services_view};
use crate::mesh::services::{PodResolver, TracedRoutes};

/// What the controller holds of service flows.
#[derive(Debug, Default)]
pub(super) struct ServiceState {
    table: ServiceTable,
    /// Endpoints by address, and the state version it was built at.
    book: Option<(u64, Arc<EndpointBook>)>,
    targets: Arc<ServiceTargets>,
    impact: Arc<ServiceImpact>,
}

impl ServiceState {
    pub(super) fn targets(&self) -> Arc<ServiceTargets> {
        self.targets.clone()
    }
}

/// Summary of one `ReportServiceFlows` call.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct FlowsOutcome {
    pub accepted: u32,
    pub rejected: u32,
}

impl MeshController {
    /// Names services by their pods' owners from now on (the operator's Pod
    /// cache); without a resolver they are named by pod UID or command.
    pub fn set_pod_resolver(&self, resolver: Arc<dyn PodResolver>) {
        *self
            .pod_resolver
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = Some(resolver);
    }

    fn pod_resolver(&self) -> Option<Arc<dyn PodResolver>> {
        self.pod_resolver
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }

    /// Takes `node`'s snapshot of its service flows (the caller checked its
    /// session). Invalid flows are left out and counted; a report above the
    /// contract's bound is refused whole.
    pub fn report_service_flows(
        &self,
        node: &str,
        session: u64,
        flows: &[v1::ServiceFlow],
        dropped: u64,
    ) -> Result<FlowsOutcome, MeshError> {
        let checked = check_report(flows).map_err(|e| MeshError::InvalidRequest(e.to_string()))?;
        for e in &checked.rejected {
            self.service_metrics
                .rejected_flows
                .with_label_values(&[e.category()])
                .inc();
        }
        if let Some(first) = checked.rejected.first() {
            tracing::debug!(node, rejected = checked.rejected.len(), first = %first, "service flows rejected");
        }
        let book = self.endpoint_book();
        let (paths, counts) = fold(node, &checked.flows, &book);
        let outcome = FlowsOutcome {
            accepted: u32::try_from(checked.flows.len()).unwrap_or(u32::MAX),
            rejected: u32::try_from(checked.rejected.len()).unwrap_or(u32::MAX),
        };
        let changed = {
            let mut services = lock(&self.services);
            services.table.insert(
                node,
                NodeFlows {
                    session,
                    received_ms: pingmesh_proto::window::unix_now_ms(),
                    paths,
                    flows: outcome.accepted,
                    dropped_by_agent: dropped,
                    counts,
                },
            );
            self.retarget(&mut services, Some(node))
        };
        self.publish_flow_metrics();
        if changed {
            self.publish();
        }
        Ok(outcome)
    }

    /// The endpoints by address, rebuilt when the mesh changed since.
    fn endpoint_book(&self) -> Arc<EndpointBook> {
        let state = lock(&self.state);
        let mut services = lock(&self.services);
        if let Some((version, book)) = &services.book
            && *version == state.version
        {
            return book.clone();
        }
        let book = Arc::new(EndpointBook::new(state.endpoints.values()));
        services.book = Some((state.version, book.clone()));
        book
    }

    /// Recomputes service targets (of `node` only, when given); whether they changed.
    fn retarget(&self, services: &mut ServiceState, node: Option<&str>) -> bool {
        let cap = self.config.pinglist.max_service_targets_per_agent;
        let targets: ServiceTargets = match node {
            Some(node) => {
                let mut all = (*services.targets).clone();
                let mine = services.table.targets_of(node, cap);
                if mine.is_empty() {
                    all.remove(node);
                } else {
                    all.insert(node.to_owned(), mine.into());
                }
                all
            }
            None => services
                .table
                .targets(cap)
                .into_iter()
                .filter(|(_, t)| !t.is_empty())
                .collect(),
        };
        let changed = *services.targets != targets;
        if changed {
            services.targets = Arc::new(targets);
        }
        changed
    }

    /// Forgets the service flows of nodes that stopped reporting; from housekeeping.
    pub(super) fn expire_service_flows(&self, now: u64) {
        let cutoff = now.saturating_sub(self.config.services.expire_after_ms);
        let changed = {
            let mut services = lock(&self.services);
            let gone = services.table.expire(cutoff);
            if gone.is_empty() {
                return;
            }
            tracing::info!(nodes = ?gone, "service flows expired: no report for too long");
            self.retarget(&mut services, None)
        };
        self.publish_flow_metrics();
        if changed {
            self.publish();
        }
    }

    /// Recomputes which services the open root causes and findings hit;
    /// after every judged window.
    pub(super) fn refresh_service_impact(&self, window_start_ms: u64) {
        let causes = self.open_root_causes();
        let findings = self.open_findings();
        self.set_service_impact(window_start_ms, &causes, &findings);
    }

    /// The impact of `causes` and `findings` on the services known now.
    /// Traced links and switches are matched against each service path's own
    /// route where the path-trace planner has one.
    fn set_service_impact(
        &self,
        window_start_ms: u64,
        causes: &[OpenRootCause],
        findings: &[Finding],
    ) {
        let resolver = self.pod_resolver();
        // Taken (and the lock released) before the services lock: the
        // controller's lock order is state, analyzer, traces.
        let traced = lock(&self.traces).book();
        let routes = TracedRoutes(&*traced);
        let (mut impact, named) = {
            let services = lock(&self.services);
            let named: std::collections::BTreeSet<String> = services
                .table
                .paths()
                .map(|(_, p)| name_service(&p.owner, resolver.as_deref()).service.key())
                .collect();
            let impact = impact::compute(
                &services.table,
                causes,
                findings,
                resolver.as_deref(),
                Some(&routes),
            );
            (impact, named.len())
        };
        self.service_metrics.services.set(gauge(named as u64));
        impact.window_start_ms = Some(window_start_ms);
        self.service_metrics
            .set_impact(&impact, self.config.services.metrics_top_services);
        lock(&self.services).impact = Arc::new(impact);
        self.publish_flow_metrics();
    }

    /// Service impact as of the last judged window.
    pub fn service_impact(&self) -> Arc<ServiceImpact> {
        lock(&self.services).impact.clone()
    }

    /// What `/api/v1/services` serves.
    pub fn services_view(&self) -> ServicesView {
        let resolver = self.pod_resolver();
        let services = lock(&self.services);
        services_view(
            &services.table,
            &services.targets,
            &services.impact,
            resolver.as_deref(),
        )
    }

    fn publish_flow_metrics(&self) {
        let m: &ServiceMetrics = &self.service_metrics;
        let services = lock(&self.services);
        let mut rows: Vec<(FlowKind, &str, u64)> = Vec::new();
        let mut dropped = 0u64;
        let mut reporting = 0u64;
        for (_, node) in services.table.nodes() {
            reporting += 1;
            dropped = dropped.saturating_add(node.dropped_by_agent);
            rows.extend(
                node.counts
                    .0
                    .iter()
                    .map(|((kind, state), n)| (*kind, *state, u64::from(*n))),
            );
        }
        m.set_flows(&rows);
        m.dropped_by_agents.set(gauge(dropped));
        m.reporting_nodes.set(gauge(reporting));
        m.targets.set(gauge(
            services.targets.values().map(|t| t.len() as u64).sum(),
        ));
    }
}

#[cfg(test)]
mod tests;
