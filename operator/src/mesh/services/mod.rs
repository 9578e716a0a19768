//! Service awareness in the mesh controller: the service flows agents' tracers
//! report (`ReportServiceFlows`), mapped to registered endpoints, probed as
//! service targets on pinglists, named after their workloads, and ranked by
//! how much of them each open root cause and SLA finding hits.
//!
//! - [`flow`]: checks each reported flow (bounded sizes, parsed addresses).
//! - [`mapping`]: from addresses to endpoints (IP for UDP, GID for RDMA).
//! - [`table`]: per-node snapshots folded into service paths, their expiry,
//!   and the service targets each agent probes (capped, busiest first).
//! - [`identity`]: service names, through a [`PodResolver`] the operator
//!   gives (a Pod cache); pod UID or command without one.
//! - [`impact`]: which services each open root cause and finding hits.
//! - [`view`]: what `/api/v1/services` serves.
//!
//! The controller's side (`MeshController::report_service_flows` and friends)
//! lives in `controller/services.rs`; docs/services.md describes it all for users.

pub mod flow;
pub mod identity;
pub mod impact;
pub mod mapping;
pub mod metrics;
pub mod table;
pub mod view;

use serde::{Deserialize, Serialize};

pub use identity::{PodIdentity, PodResolver, ServiceName, WorkloadRef};
pub use impact::{ImpactedService, ServiceImpact, ServiceRoutes, TracedRoutes};
pub use table::{ServiceTarget, ServiceTargets};

/// Most services with their own impact metric series (`metricsTopServices`).
pub const MAX_METRICS_TOP_SERVICES: usize = 100;

/// How the controller keeps service flows. camelCase in YAML; every field has a default.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default, deny_unknown_fields)]
pub struct ServicePolicy {
    /// A node's service flows are forgotten this long after its last report
    /// (agents report about once per window).
    pub expire_after_ms: u64,
    /// Services with their own `pingmesh_service_impact_*` series: the top
    /// ones by impact. 0 leaves only the totals.
    pub metrics_top_services: usize,
}

impl Default for ServicePolicy {
    fn default() -> Self {
        Self {
            expire_after_ms: 60_000,
            metrics_top_services: 10,
        }
    }
}

impl ServicePolicy {
    /// Refuses values the controller cannot work with.
    pub fn validate(&self) -> Result<(), String> {
        if self.expire_after_ms == 0 {
            return Err("services.expireAfterMs must be at least 1".to_owned());
        }
        if self.metrics_top_services > MAX_METRICS_TOP_SERVICES {
            return Err(format!(
                "services.metricsTopServices is {}, at most {MAX_METRICS_TOP_SERVICES}",
                self.metrics_top_services
            ));
        }
        Ok(())
    }
}
