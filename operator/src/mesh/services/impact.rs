//! Service impact: for every open root cause and SLA finding, the services
//! whose flows cross it, ranked by affected flows, then pods.
//!
//! A service path (one owner's flows between two endpoints) crosses:
//!
//! - an endpoint, host or ToR cause when either end is on it;
//! - the links of a ToR to the spine layer when its ends are under different
//!   ToRs, one of them that ToR; the spine layer when they are under
//!   different ToRs;
//! - a traced link or switch (`sp2 -> tor3`, `sp2`) when the path's own
//!   trace crosses it: [`ServiceRoutes`] gives the hops of a service path
//!   (the lead's path traces, see [`TracedRoutes`]). Without a trace of the
//!   path, it crosses when the cause explains an SLA finding on the path's
//!   endpoint pair or ToR pair;
//! - a path finding on its endpoint pair (either direction), a ToR-pair
//!   finding on its ToR pair (either direction).
//!
//! A path whose remote end is outside the mesh is only crossed at its local
//! end (its endpoint, host or ToR).

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use super::identity::{FlowOwner, Named, PodResolver, ServiceName, WorkloadRef, name_service};
use super::mapping::Placement;
use super::table::{ServicePath, ServiceTable};
use crate::mesh::analyzer::{Finding, FindingKind};
use crate::mesh::localize::{CauseKind, OpenRootCause, PathTraces, RootCause, Signal};

/// Most services listed per root cause or finding (the rest are counted).
pub const MAX_SERVICES_PER_ITEM: usize = 20;
/// Most endpoint pairs listed per impacted service.
pub const MAX_PATHS_LISTED: usize = 5;
/// Most root causes and findings listed as hitting one ranked service.
pub const MAX_HITS_LISTED: usize = 5;
/// How the localizer names the links of a ToR to the spine layer.
const TOR_LINKS_PREFIX: &str = "spine layer <-> ";
/// How the localizer names the spine layer as a whole.
const SPINE_LAYER: &str = "spine layer";

/// Routers a service path crosses, and those its replies cross back when traced.
pub type Route = (Vec<Arc<str>>, Option<Vec<Arc<str>>>);

/// Hops of service paths, when traced.
pub trait ServiceRoutes {
    /// The routers a service path from `source` to `target` (over RDMA flow
    /// label `flow_label`, 0 for none) crosses, and those its replies cross
    /// back when traced; `None` when this path's own route is not known.
    fn hops(&self, source: &str, target: &str, flow_label: u32) -> Option<Route>;
}

/// Service routes from the localizer's path traces. A service target with a
/// flow label is probed on flow 0 with that label, so the trace of flow 0 of
/// the pair is the service's own route; without a label (UDP, TCP services)
/// the service's ECMP choice is not known and no route is given.
#[derive(Debug, Clone, Copy)]
pub struct TracedRoutes<'a>(pub &'a dyn PathTraces);

impl ServiceRoutes for TracedRoutes<'_> {
    fn hops(&self, source: &str, target: &str, flow_label: u32) -> Option<Route> {
        if flow_label == 0 {
            return None;
        }
        let trace = self.0.path(source, target)?;
        Some((
            trace.hops(0)?.to_vec(),
            trace.return_hops(0).map(<[Arc<str>]>::to_vec),
        ))
    }
}

/// A service hit by one root cause or finding (or by any, in the ranking).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ImpactedService {
    /// `Job/ml/train`: the service's id (see `ServiceName::key`).
    pub service: String,
    #[serde(flatten)]
    pub name: ServiceName,
    /// Connections (TCP) or connected queue pairs (RDMA) that cross it.
    pub flows: u64,
    /// Pods with such flows (processes outside pods count one per node and pid).
    pub pods: u64,
    /// The workload Events go to, when the pods' owner is known.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub workload: Option<WorkloadRef>,
    /// Up to [`MAX_PATHS_LISTED`] crossing endpoint pairs, `source -> target`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub paths: Vec<String>,
    /// In the ranking only: what hits it, root causes (`host h31`) in their
    /// order, then findings (`pathLoss a -> b`), at most [`MAX_HITS_LISTED`].
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub hit_by: Vec<String>,
}

/// The services one root cause hits.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct CauseImpact {
    pub kind: CauseKind,
    pub signal: Signal,
    pub component: String,
    /// Ranked, at most [`MAX_SERVICES_PER_ITEM`].
    pub services: Vec<ImpactedService>,
    /// All services it hits (listed or not).
    pub service_count: usize,
}

/// The services one SLA finding hits.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct FindingImpact {
    pub kind: FindingKind,
    pub location: String,
    pub services: Vec<ImpactedService>,
    pub service_count: usize,
}

/// Service impact of everything open, computed once per judged window.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ServiceImpact {
    /// Start (Unix ms) of the window it was computed after.
    pub window_start_ms: Option<u64>,
    /// In the order of the open root causes given (most confident first).
    pub root_causes: Vec<CauseImpact>,
    pub findings: Vec<FindingImpact>,
    /// Every service hit by any root cause or finding, ranked; flows counted
    /// once however many causes they cross.
    pub ranking: Vec<ImpactedService>,
}

impl ServiceImpact {
    /// The services `cause` hits, if it is one of the root causes this was computed for.
    pub fn of_cause(&self, cause: &RootCause) -> Option<&CauseImpact> {
        self.root_causes.iter().find(|c| {
            c.kind == cause.kind && c.signal == cause.signal && c.component == cause.component
        })
    }

    pub fn of_finding(&self, finding: &Finding) -> Option<&FindingImpact> {
        self.findings
            .iter()
            .find(|f| f.kind == finding.kind && f.location == finding.location)
    }
}

/// One service path with its node and service name.
struct Candidate<'a> {
    node: &'a str,
    path: &'a ServicePath,
    named: Arc<Named>,
    hops: Option<Route>,
}

/// Computes the impact of `causes` and `findings` on the services in `table`.
pub fn compute(
    table: &ServiceTable,
    causes: &[OpenRootCause],
    findings: &[Finding],
    resolver: Option<&dyn PodResolver>,
    routes: Option<&dyn ServiceRoutes>,
) -> ServiceImpact {
    let mut service_names: HashMap<&FlowOwner, Arc<Named>> = HashMap::new();
    let candidates: Vec<Candidate<'_>> = table
        .paths()
        .map(|(node, path)| {
            let named = service_names
                .entry(&path.owner)
                .or_insert_with(|| Arc::new(name_service(&path.owner, resolver)))
                .clone();
            let hops = match (&path.remote, routes) {
                (Some(remote), Some(routes)) => {
                    routes.hops(&path.local.endpoint, &remote.endpoint, path.flow_label)
                }
                _ => None,
            };
            Candidate {
                node,
                path,
                named,
                hops,
            }
        })
        .collect();
    // What hits each candidate path: indices into `labels`, which holds the
    // root causes in their order, then the findings.
    let mut hit_by: Vec<Vec<usize>> = vec![Vec::new(); candidates.len()];
    let mut labels: Vec<String> = Vec::with_capacity(causes.len() + findings.len());
    let root_causes = causes
        .iter()
        .map(|c| {
            let hits: Vec<usize> = (0..candidates.len())
                .filter(|&i| cause_crosses(&c.cause, &candidates[i]))
                .collect();
            labels.push(format!("{} {}", c.cause.kind.label(), c.cause.component));
            for &i in &hits {
                hit_by[i].push(labels.len() - 1);
            }
            let (services, service_count) = rank(&candidates, &hits, None, MAX_SERVICES_PER_ITEM);
            CauseImpact {
                kind: c.cause.kind,
                signal: c.cause.signal,
                component: c.cause.component.clone(),
                services,
                service_count,
            }
        })
        .collect();
    let findings = findings
        .iter()
        .map(|f| {
            let hits: Vec<usize> = (0..candidates.len())
                .filter(|&i| finding_crosses(f.kind, &f.location, candidates[i].path))
                .collect();
            labels.push(format!("{} {}", finding_name(f.kind), f.location));
            for &i in &hits {
                hit_by[i].push(labels.len() - 1);
            }
            let (services, service_count) = rank(&candidates, &hits, None, MAX_SERVICES_PER_ITEM);
            FindingImpact {
                kind: f.kind,
                location: f.location.clone(),
                services,
                service_count,
            }
        })
        .collect();
    let all: Vec<usize> = (0..candidates.len())
        .filter(|&i| !hit_by[i].is_empty())
        .collect();
    let (ranking, _) = rank(
        &candidates,
        &all,
        Some(HitBy {
            paths: &hit_by,
            labels: &labels,
        }),
        usize::MAX,
    );
    ServiceImpact {
        window_start_ms: None,
        root_causes,
        findings,
        ranking,
    }
}

/// What hits each candidate path (indices into `labels`).
#[derive(Clone, Copy)]
struct HitBy<'a> {
    paths: &'a [Vec<usize>],
    labels: &'a [String],
}

/// The services of the candidate paths `hits`, ranked: most flows, then
/// most pods, then by id; at most `limit`, with the number of all. With
/// `hit_by` (what hits each candidate), each service lists what hits it.
fn rank(
    candidates: &[Candidate<'_>],
    hits: &[usize],
    hit_by: Option<HitBy<'_>>,
    limit: usize,
) -> (Vec<ImpactedService>, usize) {
    #[derive(Default)]
    struct Tally {
        flows: u64,
        pods: BTreeSet<String>,
        paths: BTreeSet<String>,
        workload: Option<WorkloadRef>,
        hit_by: BTreeSet<usize>,
    }
    let mut by_service: BTreeMap<&ServiceName, Tally> = BTreeMap::new();
    for &i in hits {
        let c = &candidates[i];
        let t = by_service.entry(&c.named.service).or_default();
        t.flows += u64::from(c.path.flows);
        t.pods.insert(match &c.path.owner {
            FlowOwner::Pod { uid } => uid.clone(),
            FlowOwner::Process { pid, .. } => format!("{}/{pid}", c.node),
        });
        let remote = c
            .path
            .remote
            .as_ref()
            .map_or("(outside the mesh)", |r| r.endpoint.as_str());
        t.paths
            .insert(format!("{} -> {remote}", c.path.local.endpoint));
        if t.workload.is_none() {
            t.workload.clone_from(&c.named.workload);
        }
        if let Some(h) = hit_by.and_then(|h| h.paths.get(i)) {
            t.hit_by.extend(h);
        }
    }
    let count = by_service.len();
    let mut ranked: Vec<ImpactedService> = by_service
        .into_iter()
        .map(|(name, t)| ImpactedService {
            service: name.key(),
            name: name.clone(),
            flows: t.flows,
            pods: t.pods.len() as u64,
            workload: t.workload,
            paths: t.paths.into_iter().take(MAX_PATHS_LISTED).collect(),
            hit_by: t
                .hit_by
                .into_iter()
                .filter_map(|l| hit_by.and_then(|h| h.labels.get(l)).cloned())
                .take(MAX_HITS_LISTED)
                .collect(),
        })
        .collect();
    ranked.sort_by(|a, b| {
        b.flows
            .cmp(&a.flows)
            .then_with(|| b.pods.cmp(&a.pods))
            .then_with(|| a.service.cmp(&b.service))
    });
    ranked.truncate(limit);
    (ranked, count)
}

fn either_end(path: &ServicePath, on: impl Fn(&Placement) -> bool) -> bool {
    on(&path.local) || path.remote.as_deref().is_some_and(on)
}

fn cause_crosses(cause: &RootCause, c: &Candidate<'_>) -> bool {
    let path = c.path;
    match cause.kind {
        CauseKind::Endpoint => either_end(path, |p| p.endpoint == cause.component),
        CauseKind::Host => {
            let node = cause.node.as_deref().unwrap_or(&cause.component);
            either_end(path, |p| p.node == node)
        }
        CauseKind::Tor => either_end(path, |p| p.tor == cause.component),
        CauseKind::Link if cause.component.starts_with(TOR_LINKS_PREFIX) => {
            let tor = &cause.component[TOR_LINKS_PREFIX.len()..];
            path.remote
                .as_ref()
                .is_some_and(|r| r.tor != path.local.tor && (r.tor == tor || path.local.tor == tor))
        }
        CauseKind::Switch if cause.component == SPINE_LAYER => path
            .remote
            .as_ref()
            .is_some_and(|r| r.tor != path.local.tor),
        CauseKind::Link | CauseKind::Switch | CauseKind::Unknown => match &c.hops {
            Some((there, back)) => std::iter::once(there)
                .chain(back)
                .any(|way| route_crosses(cause, way)),
            None => cause.explains.iter().any(|e| {
                e.split_once(' ')
                    .and_then(|(kind, location)| {
                        finding_kind(kind).map(|k| finding_crosses(k, location, path))
                    })
                    .unwrap_or(false)
            }),
        },
    }
}

/// Whether a traced way (routers in order) crosses a flow-level link
/// (`a -> b`) or switch cause.
fn route_crosses(cause: &RootCause, way: &[Arc<str>]) -> bool {
    match cause.kind {
        CauseKind::Link => cause
            .component
            .split_once(" -> ")
            .is_some_and(|(a, b)| way.windows(2).any(|w| &*w[0] == a && &*w[1] == b)),
        CauseKind::Switch => way.iter().any(|h| **h == *cause.component),
        _ => false,
    }
}

/// How `RootCause::explains` and the API name a finding kind.
pub fn finding_name(kind: FindingKind) -> &'static str {
    match kind {
        FindingKind::PathLoss => "pathLoss",
        FindingKind::PathLatency => "pathLatency",
        FindingKind::TorPairLoss => "torPairLoss",
        FindingKind::TorPairLatency => "torPairLatency",
    }
}

/// The inverse of [`finding_name`].
fn finding_kind(name: &str) -> Option<FindingKind> {
    match name {
        "pathLoss" => Some(FindingKind::PathLoss),
        "pathLatency" => Some(FindingKind::PathLatency),
        "torPairLoss" => Some(FindingKind::TorPairLoss),
        "torPairLatency" => Some(FindingKind::TorPairLatency),
        _ => None,
    }
}

fn finding_crosses(kind: FindingKind, location: &str, path: &ServicePath) -> bool {
    let Some((a, b)) = location.split_once(" -> ") else {
        return false;
    };
    let Some(remote) = &path.remote else {
        return false;
    };
    let same_pair = |x: &str, y: &str| (x == a && y == b) || (x == b && y == a);
    match kind {
        FindingKind::PathLoss | FindingKind::PathLatency => {
            same_pair(&path.local.endpoint, &remote.endpoint)
        }
        FindingKind::TorPairLoss | FindingKind::TorPairLatency => {
            same_pair(&path.local.tor, &remote.tor)
        }
    }
}

#[cfg(test)]
mod tests;
