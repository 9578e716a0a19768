//! `PingMesh.status` from what a reconcile saw: the agent `DaemonSet`, the mesh
//! controller, and any problem with the spec or the API server.

use k8s_openapi::api::apps::v1::DaemonSet;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::Timestamp;

use super::conditions::{AVAILABLE, DEGRADED, Judged, PROGRESSING, merge};
use super::mesh_status::{MeshStatus, PolicyState};
use crate::crd::{
    AffectedService, MAX_AFFECTED_SERVICES, MAX_HITS_PER_SERVICE, MAX_OPEN_FINDINGS,
    MAX_ROOT_CAUSES, OpenFinding, PingMesh, PingMeshStatus, StatusRootCause,
};

/// Why a mesh is not what its spec asks for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Problem {
    /// The spec breaks a rule; nothing was applied.
    InvalidSpec(String),
}

/// What one reconcile saw.
#[derive(Debug, Clone, Copy)]
pub struct Observation<'a> {
    /// The agent `DaemonSet` as the API server returned it (with its status).
    pub daemonset: Option<&'a DaemonSet>,
    pub mesh: &'a Result<MeshStatus, String>,
    pub problem: Option<&'a Problem>,
    /// Whether the mesh controller runs with this mesh's probing and SLA settings.
    pub policy: &'a PolicyState,
}

/// Rollout counts of the agent `DaemonSet`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
struct Rollout {
    desired: i32,
    ready: i32,
    updated: i32,
    available: i32,
    /// The `DaemonSet` controller has seen the latest template.
    observed: bool,
}

impl Rollout {
    fn of(ds: &DaemonSet) -> Self {
        let Some(status) = &ds.status else {
            return Self::default();
        };
        Self {
            desired: status.desired_number_scheduled,
            ready: status.number_ready,
            updated: status.updated_number_scheduled.unwrap_or(0),
            available: status.number_available.unwrap_or(0),
            observed: status.observed_generation.is_some()
                && status.observed_generation >= ds.metadata.generation,
        }
    }
}

/// The status to write; conditions keep their transition times where their
/// status did not change.
pub fn desired_status(pm: &PingMesh, seen: Observation<'_>, now: Timestamp) -> PingMeshStatus {
    let previous = pm.status.clone().unwrap_or_default();
    let generation = pm.metadata.generation;
    let rollout = seen.daemonset.map(Rollout::of);
    let mut judged = [
        available(pm.spec.paused, rollout),
        progressing(pm.spec.paused, rollout),
        degraded(seen),
    ];
    match seen.policy {
        PolicyState::Restarting => {
            judged[1] = Judged::new(
                PROGRESSING,
                true,
                "RestartingMeshController",
                "the mesh controller restarts to apply spec.probing and spec.sla",
            );
        }
        PolicyState::FromOtherMesh(source) => {
            judged[0].message = format!(
                "{}; spec.probing, spec.sla, spec.topology and spec.nodeHealth are taken from PingMesh {source}",
                judged[0].message
            );
        }
        PolicyState::Applied | PolicyState::NotHosted => {}
    }
    let mut status = PingMeshStatus {
        observed_generation: generation,
        conditions: merge(&previous.conditions, &judged, generation, now),
        agents_desired: rollout.map_or(0, |r| r.desired),
        agents_ready: rollout.map_or(0, |r| r.ready),
        // Without an answer from the mesh controller the last numbers stand.
        endpoints_registered: previous.endpoints_registered,
        paths_probed: previous.paths_probed,
        open_findings: previous.open_findings,
        open_finding_count: previous.open_finding_count,
        root_causes: previous.root_causes,
        root_cause_count: previous.root_cause_count,
        affected_services: previous.affected_services,
        affected_service_count: previous.affected_service_count,
    };
    if let Ok(mesh) = seen.mesh {
        status.endpoints_registered = clamp(mesh.endpoints_registered);
        status.paths_probed = clamp(mesh.paths_probed);
        let mut findings = mesh.open_findings.clone();
        findings.sort_by(|a, b| (a.since_ms, &a.location).cmp(&(b.since_ms, &b.location)));
        status.open_finding_count = clamp(findings.len() as u64);
        status.open_findings = findings
            .into_iter()
            .take(MAX_OPEN_FINDINGS)
            .map(|f| OpenFinding {
                kind: f.kind,
                location: f.location,
                since: Time(
                    Timestamp::from_millisecond(i64::try_from(f.since_ms).unwrap_or(i64::MAX))
                        .unwrap_or(Timestamp::UNIX_EPOCH),
                ),
            })
            .collect();
        status.root_cause_count = clamp(mesh.root_causes.len() as u64);
        status.root_causes = mesh
            .root_causes
            .iter()
            .take(MAX_ROOT_CAUSES)
            .map(|c| StatusRootCause {
                kind: c.kind.clone(),
                component: c.component.clone(),
                signal: c.signal.clone(),
                confidence_percent: c.confidence_percent,
                summary: c.summary.clone(),
                since: time_of(c.since_ms),
            })
            .collect();
        status.affected_service_count = clamp(mesh.affected_services.len() as u64);
        status.affected_services = mesh
            .affected_services
            .iter()
            .take(MAX_AFFECTED_SERVICES)
            .map(|s| AffectedService {
                service: s.service.clone(),
                kind: s.kind.clone(),
                namespace: (!s.namespace.is_empty()).then(|| s.namespace.clone()),
                name: s.name.clone(),
                flows: clamp(s.flows),
                pods: clamp(s.pods),
                hit_by: s
                    .hit_by
                    .iter()
                    .take(MAX_HITS_PER_SERVICE)
                    .cloned()
                    .collect(),
            })
            .collect();
    }
    status
}

fn time_of(unix_ms: u64) -> Time {
    Time(
        Timestamp::from_millisecond(i64::try_from(unix_ms).unwrap_or(i64::MAX))
            .unwrap_or(Timestamp::UNIX_EPOCH),
    )
}

fn clamp(n: u64) -> i64 {
    i64::try_from(n).unwrap_or(i64::MAX)
}

fn available(paused: bool, rollout: Option<Rollout>) -> Judged {
    let j = |status, reason, message: String| Judged::new(AVAILABLE, status, reason, message);
    match rollout {
        _ if paused => j(false, "Paused", "spec.paused is true: no agent runs".into()),
        None => j(
            false,
            "NoDaemonSet",
            "the agent DaemonSet does not exist yet".into(),
        ),
        Some(r) if r.desired == 0 => j(
            false,
            "NoNodes",
            "no node matches spec.nodeSelector, spec.affinity and spec.tolerations".into(),
        ),
        Some(r) if r.ready > 0 => j(
            true,
            "AgentsReady",
            format!("{} of {} agents ready", r.ready, r.desired),
        ),
        Some(r) => j(
            false,
            "NoAgentReady",
            format!("0 of {} agents ready", r.desired),
        ),
    }
}

fn progressing(paused: bool, rollout: Option<Rollout>) -> Judged {
    let j = |status, reason, message: String| Judged::new(PROGRESSING, status, reason, message);
    match rollout {
        _ if paused => j(false, "Paused", "spec.paused is true".into()),
        None => j(true, "Creating", "creating the agent DaemonSet".into()),
        Some(r) if !r.observed => j(
            true,
            "RollingOut",
            "the DaemonSet controller has not seen the latest agent template yet".into(),
        ),
        Some(r) if r.updated < r.desired || r.available < r.desired => j(
            true,
            "RollingOut",
            format!(
                "{} of {} agents updated, {} available",
                r.updated, r.desired, r.available
            ),
        ),
        Some(r) => j(
            false,
            "RolloutComplete",
            format!("{} agents up to date", r.desired),
        ),
    }
}

fn degraded(seen: Observation<'_>) -> Judged {
    let j = |status, reason, message: String| Judged::new(DEGRADED, status, reason, message);
    match (seen.problem, seen.mesh) {
        (Some(Problem::InvalidSpec(m)), _) => j(true, "InvalidSpec", m.clone()),
        (None, Err(m)) => j(true, "MeshControllerUnavailable", m.clone()),
        (None, Ok(_)) => j(false, "AsExpected", String::new()),
    }
}
