//! The `PingMesh` reconciler: a spec becomes an agent `ConfigMap` and `DaemonSet`
//! (server-side applied, owned by the `PingMesh`), orphans are deleted, and the
//! status reports the rollout, the mesh controller's view and any problem.
//! The steps of one reconcile are in `flow`; `run` wires the reconciler, the
//! hosted mesh controller and the HTTP port together, behind leader election
//! (`leader`, `forward`), with ToRs from Node labels (`nodes`) and findings
//! published as Events and Node conditions (`findings`).

mod apply;
mod conditions;
mod configmap;
mod daemonset;
mod error;
mod events;
mod findings;
mod flow;
mod forward;
pub mod leader;
mod mesh_host;
mod mesh_status;
mod metrics;
mod names;
mod nodes;
mod operator_http;
mod owned;
pub mod pods;
pub mod run;
mod settings;
mod status;
mod synced;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use kube::runtime::controller::Action;
use kube::runtime::events::{EventType, Recorder, Reporter};
use kube::{Client, Resource, ResourceExt};

pub use apply::{Change, change, orphans};
pub use conditions::{AVAILABLE, DEGRADED, Judged, PROGRESSING, merge};
pub use configmap::{agent_config_data, config_hash, desired_configmap};
pub use daemonset::{AGENT_CONTAINER, desired_daemonset};
pub use error::{BuildError, ReconcileError, api_category};
pub use findings::{
    CauseKey, EVENT_RETRIES, FindingsPublisher, FindingsView, HOLD_WINDOWS,
    MANY_SERVICES_HIT_REASON, MAX_ANNOUNCED, MAX_UNPUBLISHED, NO_ROOT_CAUSE_REASON,
    PAUSE_AFTER_FAILURE, ROOT_CAUSE_CLEARED_REASON, ROOT_CAUSE_REASON, SERVICE_HIT_REASON, Wanted,
    faulty_nodes, reason as finding_reason, wanted_conditions,
};
pub use forward::forward_to_leader;
pub use mesh_host::{MeshHost, MeshPolicy, SourceSettings};
pub use mesh_status::{
    MeshAffectedService, MeshFinding, MeshRootCause, MeshStatus, MeshStatusSource, PolicyState,
};
pub use metrics::{EventObject, Outcome, ReconcileMetrics};
pub use names::{
    CONFIG_HASH_ANNOTATION, FIELD_MANAGER, MANAGED_BY_LABEL, MAX_MESH_NAME_LEN, MESH_LABEL,
    PAUSED_NODE_SELECTOR, agent_name, managed_selector, owned_labels, owned_selector,
    selector_labels,
};
pub use nodes::{
    NodeMeta, NodeTorResolver, RelabeledNodes, follow_node_labels, node_cache, tor_candidates,
};
pub use owned::MeshIdentity;
pub use settings::OperatorSettings;
pub use status::{Observation, Problem, desired_status};

use crate::crd::PingMesh;

/// First retry delay after a failed reconcile; doubles per failure.
const FIRST_RETRY: Duration = Duration::from_secs(5);
/// Longest retry delay.
const MAX_RETRY: Duration = Duration::from_mins(5);

/// What every reconcile shares.
pub struct Context {
    pub client: Client,
    pub settings: OperatorSettings,
    pub mesh: Arc<dyn MeshStatusSource>,
    pub metrics: ReconcileMetrics,
    recorder: Recorder,
    /// Consecutive failures per `namespace/name`, for the retry backoff.
    failures: Mutex<HashMap<String, u32>>,
}

impl std::fmt::Debug for Context {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Context")
            .field("settings", &self.settings)
            .field("mesh", &self.mesh)
            .finish_non_exhaustive()
    }
}

impl Context {
    /// `instance` names this operator replica in Events (its pod name).
    pub fn new(
        client: Client,
        settings: OperatorSettings,
        mesh: Arc<dyn MeshStatusSource>,
        metrics: ReconcileMetrics,
        instance: Option<String>,
    ) -> Self {
        let reporter = Reporter {
            controller: FIELD_MANAGER.to_owned(),
            instance,
        };
        Self {
            recorder: Recorder::new(client.clone(), reporter),
            client,
            settings,
            mesh,
            metrics,
            failures: Mutex::new(HashMap::new()),
        }
    }

    fn failures(&self) -> std::sync::MutexGuard<'_, HashMap<String, u32>> {
        self.failures
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Counts a failed reconcile of `pm` and returns the wait before the next
    /// try: 5 s doubling per consecutive failure up to 5 min, jittered (80 to
    /// 100 %) so meshes that failed together do not retry in lockstep. A
    /// successful reconcile resets the count.
    pub fn retry_after_failure(&self, pm: &PingMesh) -> Duration {
        let failures = {
            let mut map = self.failures();
            let n = map.entry(object_key(pm)).or_insert(0);
            *n = n.saturating_add(1);
            *n
        };
        retry_delay(failures).mul_f64(rand::random_range(0.8..=1.0))
    }

    async fn event(&self, pm: &PingMesh, type_: EventType, reason: &str, note: String) {
        events::publish(&self.recorder, pm, type_, reason, "Reconcile", note, None).await;
    }

    async fn event_about<K: Resource<DynamicType = ()>>(
        &self,
        pm: &PingMesh,
        reason: &str,
        note: String,
        related: &K,
    ) {
        let related = Some(related.object_ref(&()));
        events::publish(
            &self.recorder,
            pm,
            EventType::Normal,
            reason,
            "Apply",
            note,
            related,
        )
        .await;
    }
}

fn object_key(pm: &PingMesh) -> String {
    format!("{}/{}", pm.namespace().unwrap_or_default(), pm.name_any())
}

/// Reconciles one `PingMesh` (the kube-runtime `Controller`'s reconciler).
pub async fn reconcile(pm: Arc<PingMesh>, ctx: Arc<Context>) -> Result<Action, ReconcileError> {
    let started = Instant::now();
    let result = flow::reconcile_mesh(&pm, &ctx).await;
    let took = started.elapsed();
    match &result {
        Ok(outcome) => {
            ctx.metrics.observe(*outcome, None, took);
            ctx.failures().remove(&object_key(&pm));
        }
        Err(e) => {
            ctx.metrics
                .observe(Outcome::Error, Some(e.category()), took);
            tracing::warn!(mesh = %object_key(&pm), category = e.category(), error = %e, "reconcile failed");
            flow::report_failure(&pm, &ctx, e).await;
        }
    }
    result.map(|_| Action::requeue(ctx.settings.resync))
}

/// The `Controller`'s error policy: retry after [`Context::retry_after_failure`].
#[allow(clippy::needless_pass_by_value)] // the signature kube-runtime's Controller calls
pub fn error_policy(pm: Arc<PingMesh>, error: &ReconcileError, ctx: Arc<Context>) -> Action {
    let delay = ctx.retry_after_failure(&pm);
    tracing::debug!(mesh = %object_key(&pm), category = error.category(), ?delay, "retrying");
    Action::requeue(delay)
}

/// Un-jittered delay before retry number `failures` (1-based).
pub fn retry_delay(failures: u32) -> Duration {
    let doublings = failures.saturating_sub(1).min(16);
    FIRST_RETRY.saturating_mul(1 << doublings).min(MAX_RETRY)
}
