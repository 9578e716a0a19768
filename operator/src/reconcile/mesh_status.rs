//! What the hosted mesh controller reports into `PingMesh` status.

use async_trait::async_trait;

use crate::mesh::controller::{MeshController, kind_label};

/// A finding as the status lists it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MeshFinding {
    /// camelCase kind, e.g. `pathLoss`.
    pub kind: String,
    pub location: String,
    /// Start (Unix ms) of the first bad window of the streak that opened it.
    pub since_ms: u64,
}

/// A root cause as the status lists it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MeshRootCause {
    pub kind: String,
    pub component: String,
    /// camelCase signal, e.g. `proberDelay`.
    pub signal: String,
    pub confidence_percent: i32,
    pub summary: String,
    /// Start (Unix ms) of the first window of the streak that opened it.
    pub since_ms: u64,
}

/// A service hit by open faults, as the status lists it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MeshAffectedService {
    /// `Job/ml/train`.
    pub service: String,
    pub kind: String,
    /// Empty for `PodUID` and `Process` services.
    pub namespace: String,
    pub name: String,
    pub flows: u64,
    pub pods: u64,
    /// Root causes, then findings (`host h31`, `pathLoss a -> b`).
    pub hit_by: Vec<String>,
}

/// The mesh as the status shows it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct MeshStatus {
    pub endpoints_registered: u64,
    pub paths_probed: u64,
    pub open_findings: Vec<MeshFinding>,
    /// Most confident first.
    pub root_causes: Vec<MeshRootCause>,
    /// Most affected first (as of the last judged window).
    pub affected_services: Vec<MeshAffectedService>,
}

/// Whether the mesh controller runs with a mesh's probing and SLA settings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PolicyState {
    /// It does.
    Applied,
    /// It is restarting to.
    Restarting,
    /// It takes them from another `PingMesh` (`namespace/name`).
    FromOtherMesh(String),
    /// This process does not host the mesh controller (tests, tools).
    NotHosted,
}

/// The mesh controller as the reconciler sees it: the in-process one, or a
/// fake in tests.
#[async_trait]
pub trait MeshStatusSource: Send + Sync + std::fmt::Debug {
    /// `Err` carries a message for the `Degraded` condition.
    async fn mesh_status(&self) -> Result<MeshStatus, String>;

    /// Asks the mesh controller to run with `pm`'s probing and SLA settings.
    fn sync_policy(&self, pm: &crate::crd::PingMesh) -> PolicyState {
        let _ = pm;
        PolicyState::NotHosted
    }
}

#[async_trait]
impl MeshStatusSource for MeshController {
    async fn mesh_status(&self) -> Result<MeshStatus, String> {
        let endpoints = self.endpoints().await.map_err(|e| e.to_string())?;
        let paths = self.last_report().map_or(0, |r| r.paths.len());
        let open_findings = self
            .open_findings()
            .into_iter()
            .map(|f| MeshFinding {
                kind: camel_kind(kind_label(f.kind)),
                location: f.location,
                since_ms: f.first_bad_window_ms,
            })
            .collect();
        let root_causes = self
            .open_root_causes()
            .into_iter()
            .map(|c| MeshRootCause {
                kind: c.cause.kind.label().to_owned(),
                component: c.cause.component.clone(),
                signal: camel_kind(c.cause.signal.label()),
                // confidence is in [0, 1]: the product fits an i32.
                #[allow(clippy::cast_possible_truncation)]
                confidence_percent: (c.cause.confidence.clamp(0.0, 1.0) * 100.0).round() as i32,
                summary: c.cause.summary.clone(),
                since_ms: c.first_window_ms,
            })
            .collect();
        let affected_services = self
            .service_impact()
            .ranking
            .iter()
            .map(|s| MeshAffectedService {
                service: s.service.clone(),
                kind: s.name.kind.clone(),
                namespace: s.name.namespace.clone(),
                name: s.name.name.clone(),
                flows: s.flows,
                pods: s.pods,
                hit_by: s.hit_by.clone(),
            })
            .collect();
        Ok(MeshStatus {
            endpoints_registered: endpoints.len() as u64,
            paths_probed: paths as u64,
            open_findings,
            root_causes,
            affected_services,
        })
    }
}

/// `path_loss` -> `pathLoss`: status fields are camelCase, metric labels `snake_case`.
fn camel_kind(label: &str) -> String {
    let mut out = String::with_capacity(label.len());
    let mut upper = false;
    for c in label.chars() {
        if c == '_' {
            upper = true;
        } else if upper {
            out.push(c.to_ascii_uppercase());
            upper = false;
        } else {
            out.push(c);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::camel_kind;

    #[test]
    fn finding_kinds_read_as_in_the_api() {
        assert_eq!(camel_kind("tor_pair_latency"), "torPairLatency");
        assert_eq!(camel_kind("path_loss"), "pathLoss");
    }
}
