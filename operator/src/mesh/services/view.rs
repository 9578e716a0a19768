//! `GET /api/v1/services`: every service with flows in the latest reports,
//! its endpoint pairs, whether each is probed as a service target, and what
//! open root causes and findings hit it.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use serde::{Deserialize, Serialize};

use super::identity::{FlowOwner, PodResolver, ServiceName, WorkloadRef, name_service};
use super::impact::{ServiceImpact, finding_name};
use super::table::{ServiceTable, ServiceTargets};

/// Most endpoint pairs listed per service.
pub const MAX_PATHS_PER_SERVICE: usize = 50;

/// One endpoint pair of a service.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ServicePathView {
    pub source_endpoint: String,
    /// `None`: the remote end is outside the mesh.
    pub target_endpoint: Option<String>,
    pub flows: u64,
    /// RDMA flow label the service uses on it (0: none).
    #[serde(default, skip_serializing_if = "is_zero")]
    pub flow_label: u32,
    /// On the source agent's pinglist as a service target.
    pub probed: bool,
}

#[allow(clippy::trivially_copy_pass_by_ref)] // serde passes a reference
fn is_zero(n: &u32) -> bool {
    *n == 0
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ServiceView {
    pub service: String,
    #[serde(flatten)]
    pub name: ServiceName,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub workload: Option<WorkloadRef>,
    pub flows: u64,
    pub pods: u64,
    pub nodes: u64,
    /// Endpoint pairs, busiest first, at most [`MAX_PATHS_PER_SERVICE`].
    pub paths: Vec<ServicePathView>,
    /// Open root causes (`<kind> <component>`) and findings (`<kind> <location>`)
    /// its flows cross.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub impacted_by: Vec<String>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ServicesView {
    pub reporting_nodes: u64,
    /// Services by flows, busiest first.
    pub services: Vec<ServiceView>,
}

#[derive(Default)]
struct Tally {
    workload: Option<WorkloadRef>,
    pods: BTreeSet<String>,
    nodes: BTreeSet<String>,
    flows: u64,
    paths: BTreeMap<(String, Option<String>), (u64, u32, bool)>,
}

/// Builds the view.
pub fn services_view(
    table: &ServiceTable,
    targets: &ServiceTargets,
    impact: &ServiceImpact,
    resolver: Option<&dyn PodResolver>,
) -> ServicesView {
    let mut service_names = HashMap::new();
    let mut by_service: BTreeMap<ServiceName, Tally> = BTreeMap::new();
    let mut reporting = 0;
    for (node, flows) in table.nodes() {
        reporting += 1;
        let probed = targets.get(node);
        for p in &flows.paths {
            let named = service_names
                .entry(p.owner.clone())
                .or_insert_with(|| name_service(&p.owner, resolver));
            let t = by_service.entry(named.service.clone()).or_default();
            if t.workload.is_none() {
                t.workload.clone_from(&named.workload);
            }
            t.pods.insert(match &p.owner {
                FlowOwner::Pod { uid } => uid.clone(),
                FlowOwner::Process { pid, .. } => format!("{node}/{pid}"),
            });
            t.nodes.insert(node.to_owned());
            t.flows += u64::from(p.flows);
            let target = p.remote.as_ref().map(|r| r.endpoint.clone());
            let is_probed = target.as_ref().is_some_and(|target| {
                probed.is_some_and(|list| {
                    list.iter()
                        .any(|t| t.source == p.local.endpoint && t.target == *target)
                })
            });
            let e = t
                .paths
                .entry((p.local.endpoint.clone(), target))
                .or_insert((0, p.flow_label, is_probed));
            e.0 += u64::from(p.flows);
        }
    }
    let mut hits: HashMap<&str, Vec<String>> = HashMap::new();
    for c in &impact.root_causes {
        for s in &c.services {
            hits.entry(s.service.as_str()).or_default().push(format!(
                "{} {}",
                c.kind.label(),
                c.component
            ));
        }
    }
    for f in &impact.findings {
        for s in &f.services {
            hits.entry(s.service.as_str()).or_default().push(format!(
                "{} {}",
                finding_name(f.kind),
                f.location
            ));
        }
    }
    let mut services: Vec<ServiceView> = by_service
        .into_iter()
        .map(|(name, t)| {
            let key = name.key();
            let mut paths: Vec<ServicePathView> = t
                .paths
                .into_iter()
                .map(
                    |((source, target), (flows, flow_label, probed))| ServicePathView {
                        source_endpoint: source,
                        target_endpoint: target,
                        flows,
                        flow_label,
                        probed,
                    },
                )
                .collect();
            paths.sort_by_key(|p| std::cmp::Reverse(p.flows));
            paths.truncate(MAX_PATHS_PER_SERVICE);
            ServiceView {
                impacted_by: hits.remove(key.as_str()).unwrap_or_default(),
                service: key,
                name,
                workload: t.workload,
                flows: t.flows,
                pods: t.pods.len() as u64,
                nodes: t.nodes.len() as u64,
                paths,
            }
        })
        .collect();
    // Services a fault hits come first (the person paged wants those), then
    // the busiest.
    services.sort_by(|a, b| {
        a.impacted_by
            .is_empty()
            .cmp(&b.impacted_by.is_empty())
            .then_with(|| b.flows.cmp(&a.flows))
            .then_with(|| a.service.cmp(&b.service))
    });
    ServicesView {
        reporting_nodes: reporting,
        services,
    }
}
