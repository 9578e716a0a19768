//! Pinglist generation: which endpoints each node's endpoints probe, how fast and
//! over how many ECMP flows.
//!
//! Two kinds of targets, as in R-Pingmesh:
//! - ToR mesh: every other endpoint under the same ToR. All those probes cross a
//!   single switch, so they separate RNIC/host faults from network faults.
//! - inter-ToR: a few sampled endpoints under a few sampled other ToRs, probed over
//!   enough flows to touch every ECMP path, to localize switch and link faults.
//!
//! [`MeshView`] is built once per registry change (O(N log N)) so that answering one
//! node's pinglist costs only the size of that pinglist, not the size of the mesh.

use std::collections::HashMap;
use std::sync::Arc;

use pingmesh_proto::{ecmp, limits, v1};
use serde::{Deserialize, Serialize};

use super::types::MeshEndpoint;

mod service_targets;

/// Most flows per target: the agent reports lost flows as bits of a `u64`
/// mask. One constant for both sides, so agent and controller agree.
pub use pingmesh_proto::limits::MAX_FLOWS_PER_TARGET;
/// Most inter-ToR targets one source endpoint may get per rotation epoch
/// (`interTorSampleTors` x `interTorTargetsPerTor`), to keep pinglists small.
pub const MAX_INTER_TOR_TARGETS_PER_ENDPOINT: usize = 4096;
/// Longest accepted aggregation window (one hour).
pub const MAX_WINDOW_MS: u32 = 3_600_000;
/// Most service targets one agent may get (`maxServiceTargetsPerAgent`).
pub const MAX_SERVICE_TARGETS_PER_AGENT: usize = 4096;

/// How pinglists are sized. Field names are camelCase in YAML/JSON; every field has
/// a default, so an empty object is a valid policy.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct PinglistPolicy {
    /// Probes per second to each ToR-mesh target.
    pub tor_mesh_rate_pps: f64,
    /// Probes per second to each inter-ToR target.
    pub inter_tor_rate_pps: f64,
    /// Other ToRs each source ToR samples per rotation epoch; 0 turns inter-ToR off.
    pub inter_tor_sample_tors: usize,
    /// Endpoints probed under each sampled ToR, per source endpoint.
    pub inter_tor_targets_per_tor: usize,
    /// Equal-cost paths expected between two ToRs.
    pub ecmp_paths: u32,
    /// Probability with which inter-ToR flows should touch every ECMP path.
    pub ecmp_coverage: f64,
    /// Upper bound on flows per target (at most [`MAX_FLOWS_PER_TARGET`]).
    pub max_flows: u32,
    /// How often the inter-ToR samples rotate.
    pub rotation_period_ms: u64,
    /// Aggregation window length handed to agents.
    pub window_ms: u32,
    /// A probe without both ACKs after this long counts as lost.
    pub probe_timeout_ms: u32,
    /// Probes per second to each service target (an endpoint pair traced
    /// service flows join, see `mesh::services`).
    pub service_rate_pps: f64,
    /// Most service targets per agent; the pairs carrying the most service
    /// connections win. 0 turns service targets off.
    pub max_service_targets_per_agent: usize,
}

impl Default for PinglistPolicy {
    fn default() -> Self {
        Self {
            tor_mesh_rate_pps: 10.0,
            inter_tor_rate_pps: 1.0,
            inter_tor_sample_tors: 5,
            inter_tor_targets_per_tor: 1,
            ecmp_paths: 4,
            ecmp_coverage: 0.9,
            max_flows: ecmp::DEFAULT_MAX_FLOWS,
            rotation_period_ms: 60_000,
            window_ms: 5_000,
            probe_timeout_ms: 500,
            // Enough for the default SLA's 10 probes in a 5 s window.
            service_rate_pps: 5.0,
            max_service_targets_per_agent: 32,
        }
    }
}

/// Why a [`PinglistPolicy`] was refused. Field names are the camelCase ones users write.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum PolicyError {
    #[error("pinglist policy field {field} = {value}: must be {expected}")]
    OutOfRange {
        field: &'static str,
        value: String,
        expected: String,
    },
    #[error(
        "pinglist policy probeTimeoutMs = {probe_timeout_ms} must be shorter than windowMs = {window_ms}, \
         or no probe could finish inside its window"
    )]
    TimeoutNotBelowWindow {
        probe_timeout_ms: u32,
        window_ms: u32,
    },
    #[error(
        "pinglist policy asks for {sample_tors} ToRs x {targets_per_tor} targets per ToR per endpoint; \
         at most {MAX_INTER_TOR_TARGETS_PER_ENDPOINT} inter-ToR targets per endpoint are allowed"
    )]
    TooManyInterTorTargets {
        sample_tors: usize,
        targets_per_tor: usize,
    },
}

impl PolicyError {
    /// Bounded label for metrics and Event reasons.
    pub fn category(&self) -> &'static str {
        match self {
            Self::OutOfRange { .. } => "policy_out_of_range",
            Self::TimeoutNotBelowWindow { .. } => "policy_timeout_not_below_window",
            Self::TooManyInterTorTargets { .. } => "policy_too_many_targets",
        }
    }
}

fn out_of_range(
    field: &'static str,
    value: &dyn std::fmt::Display,
    expected: &dyn std::fmt::Display,
) -> PolicyError {
    PolicyError::OutOfRange {
        field,
        value: value.to_string(),
        expected: expected.to_string(),
    }
}

fn check_rate(field: &'static str, rate: f64) -> Result<(), PolicyError> {
    if rate.is_finite() && rate > 0.0 && rate <= limits::MAX_RATE_PPS {
        Ok(())
    } else {
        Err(out_of_range(
            field,
            &rate,
            &format!("a number in (0, {}]", limits::MAX_RATE_PPS),
        ))
    }
}

impl PinglistPolicy {
    /// Refuses values no mesh can run with; the first problem found is reported.
    pub fn validate(&self) -> Result<(), PolicyError> {
        check_rate("torMeshRatePps", self.tor_mesh_rate_pps)?;
        check_rate("interTorRatePps", self.inter_tor_rate_pps)?;
        check_rate("serviceRatePps", self.service_rate_pps)?;
        if self.max_service_targets_per_agent > MAX_SERVICE_TARGETS_PER_AGENT {
            return Err(out_of_range(
                "maxServiceTargetsPerAgent",
                &self.max_service_targets_per_agent,
                &format!("in 0..={MAX_SERVICE_TARGETS_PER_AGENT}"),
            ));
        }
        let inter_tor_targets = self
            .inter_tor_sample_tors
            .saturating_mul(self.inter_tor_targets_per_tor);
        if inter_tor_targets > MAX_INTER_TOR_TARGETS_PER_ENDPOINT {
            return Err(PolicyError::TooManyInterTorTargets {
                sample_tors: self.inter_tor_sample_tors,
                targets_per_tor: self.inter_tor_targets_per_tor,
            });
        }
        if self.inter_tor_sample_tors > 0 && self.inter_tor_targets_per_tor == 0 {
            return Err(out_of_range(
                "interTorTargetsPerTor",
                &0,
                &"at least 1 while interTorSampleTors is above 0",
            ));
        }
        if self.ecmp_paths == 0 {
            return Err(out_of_range("ecmpPaths", &0, &"at least 1"));
        }
        if !(self.ecmp_coverage.is_finite() && self.ecmp_coverage > 0.0 && self.ecmp_coverage < 1.0)
        {
            return Err(out_of_range(
                "ecmpCoverage",
                &self.ecmp_coverage,
                &"a probability in (0, 1)",
            ));
        }
        if self.max_flows == 0 || self.max_flows > MAX_FLOWS_PER_TARGET {
            return Err(out_of_range(
                "maxFlows",
                &self.max_flows,
                &format!("in 1..={MAX_FLOWS_PER_TARGET}"),
            ));
        }
        if self.rotation_period_ms == 0 {
            return Err(out_of_range("rotationPeriodMs", &0, &"at least 1"));
        }
        if self.window_ms == 0 || self.window_ms > MAX_WINDOW_MS {
            return Err(out_of_range(
                "windowMs",
                &self.window_ms,
                &format!("in 1..={MAX_WINDOW_MS}"),
            ));
        }
        if self.probe_timeout_ms == 0 {
            return Err(out_of_range("probeTimeoutMs", &0, &"at least 1"));
        }
        if self.probe_timeout_ms >= self.window_ms {
            return Err(PolicyError::TimeoutNotBelowWindow {
                probe_timeout_ms: self.probe_timeout_ms,
                window_ms: self.window_ms,
            });
        }
        Ok(())
    }

    /// The rotation epoch that contains `unix_ms`.
    pub fn rotation_epoch(&self, unix_ms: u64) -> u64 {
        unix_ms / self.rotation_period_ms.max(1)
    }

    /// Flows per ToR-mesh target. Two endpoints under one ToR have a single path
    /// between them (through that switch), so more flows would only cost address
    /// handles or sockets without covering anything more; this matches the paper.
    pub fn tor_mesh_flows(&self) -> u32 {
        1
    }

    /// Flows per inter-ToR target, from the coupon-collector bound, capped.
    pub fn inter_tor_flows(&self) -> u32 {
        let cap = self.max_flows.clamp(1, MAX_FLOWS_PER_TARGET);
        ecmp::flows_for_coverage(self.ecmp_paths, self.ecmp_coverage, cap)
    }
}

/// One ToR's endpoints, sorted by id; shared between views while unchanged.
#[derive(Debug)]
struct TorGroup {
    name: String,
    members: Vec<MeshEndpoint>,
    /// The same endpoints in wire form, ready to clone into targets.
    wire: Vec<v1::Endpoint>,
}

impl TorGroup {
    fn new(name: String, mut members: Vec<MeshEndpoint>) -> Self {
        members.sort_by(|a, b| a.id.cmp(&b.id));
        let wire = members.iter().map(MeshEndpoint::to_proto).collect();
        Self {
            name,
            members,
            wire,
        }
    }
}

/// Where an endpoint sits in a view: its ToR (index in name order) and its
/// rank under that ToR (in id order).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Pos {
    tor: usize,
    rank: usize,
}

/// A node's endpoints in a view, by id: the (ToR, id) of each placed one.
#[derive(Debug, Default)]
struct NodeEntry {
    placed: Vec<(String, String)>,
    /// Endpoints left out because their ToR was empty.
    unplaced: usize,
}

/// An index of the mesh for answering pinglist requests cheaply.
///
/// Endpoints with an empty ToR (not resolved yet) are left out: without a ToR
/// they have neither ToR-mesh peers nor a place in the inter-ToR rotation.
/// When two endpoints share an id, the first one given wins.
///
/// Built once from scratch ([`MeshView::new`], O(N log N)), then kept up to
/// date with [`MeshView::updated`], which rebuilds only the ToRs whose
/// membership changed and shares the others with the view before.
#[derive(Debug, Clone, Default)]
pub struct MeshView {
    /// Sorted by name.
    tors: Vec<Arc<TorGroup>>,
    tor_index: Arc<HashMap<String, usize>>,
    by_node: HashMap<String, Arc<NodeEntry>>,
    endpoints: usize,
    unplaced: usize,
}

impl MeshView {
    /// Indexes `endpoints` by ToR and by node. O(N log N).
    pub fn new(endpoints: Vec<MeshEndpoint>) -> Self {
        let (mut placed, unplaced): (Vec<_>, Vec<_>) =
            endpoints.into_iter().partition(|e| !e.tor.is_empty());
        // Stable sort then dedup keeps the first endpoint given for an id.
        placed.sort_by(|a, b| a.id.cmp(&b.id));
        placed.dedup_by(|later, earlier| later.id == earlier.id);
        let mut by_node: HashMap<String, Vec<MeshEndpoint>> = HashMap::new();
        for e in placed.into_iter().chain(unplaced) {
            by_node.entry(e.node.clone()).or_default().push(e);
        }
        Self::default().updated(by_node)
    }

    /// The view after the nodes in `changed` got the endpoints given there
    /// (all of a node's endpoints in the mesh now; none: the node left).
    /// Nodes not named keep theirs. Only the ToRs that a changed node's
    /// endpoints left or joined are rebuilt: O(changed endpoints + members of
    /// the ToRs touched + nodes + ToRs), the last two for copying handles.
    ///
    /// Endpoint ids must be unique across nodes (the controller makes every id
    /// "<node>/<name>"); within a node the first endpoint given for an id wins.
    #[must_use]
    pub fn updated(&self, changed: HashMap<String, Vec<MeshEndpoint>>) -> Self {
        let mut by_node = self.by_node.clone();
        let mut unplaced = self.unplaced;
        // Per ToR touched: endpoint ids leaving it, endpoints joining it.
        let mut leaving: HashMap<&str, std::collections::HashSet<&str>> = HashMap::new();
        let mut joining: HashMap<String, Vec<MeshEndpoint>> = HashMap::new();
        let old = &self.by_node;
        for (node, mut endpoints) in changed {
            if let Some(entry) = old.get(&node) {
                unplaced -= entry.unplaced;
                for (tor, id) in &entry.placed {
                    leaving.entry(tor).or_default().insert(id);
                }
            }
            let before = endpoints.len();
            endpoints.retain(|e| !e.tor.is_empty());
            let mut entry = NodeEntry {
                placed: Vec::with_capacity(endpoints.len()),
                unplaced: before - endpoints.len(),
            };
            endpoints.sort_by(|a, b| a.id.cmp(&b.id));
            endpoints.dedup_by(|later, earlier| later.id == earlier.id);
            for e in endpoints {
                entry.placed.push((e.tor.clone(), e.id.clone()));
                joining.entry(e.tor.clone()).or_default().push(e);
            }
            unplaced += entry.unplaced;
            if entry.placed.is_empty() && entry.unplaced == 0 {
                by_node.remove(&node);
            } else {
                by_node.insert(node, Arc::new(entry));
            }
        }
        let mut touched: Vec<&str> = leaving.keys().copied().collect();
        touched.extend(joining.keys().map(String::as_str));
        touched.sort_unstable();
        touched.dedup();
        let mut rebuilt: HashMap<&str, Option<Arc<TorGroup>>> = HashMap::new();
        for &tor in &touched {
            let gone = leaving.get(tor);
            let mut members: Vec<MeshEndpoint> = self
                .group(tor)
                .map(|g| {
                    g.members
                        .iter()
                        .filter(|e| gone.is_none_or(|gone| !gone.contains(e.id.as_str())))
                        .cloned()
                        .collect()
                })
                .unwrap_or_default();
            members.extend(joining.get(tor).into_iter().flatten().cloned());
            let group =
                (!members.is_empty()).then(|| Arc::new(TorGroup::new(tor.to_owned(), members)));
            rebuilt.insert(tor, group);
        }
        let same_tor_set = rebuilt
            .iter()
            .all(|(tor, group)| group.is_some() == self.tor_index.contains_key(*tor));
        let (tors, tor_index) = if same_tor_set {
            let mut tors = self.tors.clone();
            for (tor, group) in rebuilt {
                if let (Some(&i), Some(group)) = (self.tor_index.get(tor), group) {
                    tors[i] = group;
                }
            }
            (tors, Arc::clone(&self.tor_index))
        } else {
            let mut tors: Vec<Arc<TorGroup>> = self
                .tors
                .iter()
                .filter(|g| !rebuilt.contains_key(g.name.as_str()))
                .cloned()
                .collect();
            tors.extend(rebuilt.into_values().flatten());
            tors.sort_by(|a, b| a.name.cmp(&b.name));
            let index = tors
                .iter()
                .enumerate()
                .map(|(i, g)| (g.name.clone(), i))
                .collect();
            (tors, Arc::new(index))
        };
        let endpoints = tors.iter().map(|g| g.members.len()).sum();
        Self {
            tors,
            tor_index,
            by_node,
            endpoints,
            unplaced,
        }
    }

    fn group(&self, tor: &str) -> Option<&TorGroup> {
        self.tor_index.get(tor).map(|&i| self.tors[i].as_ref())
    }

    /// Endpoints in the view (placed under a ToR).
    pub fn endpoint_count(&self) -> usize {
        self.endpoints
    }

    /// Distinct ToRs in the view.
    pub fn tor_count(&self) -> usize {
        self.tors.len()
    }

    /// Endpoints left out because their ToR was empty.
    pub fn unplaced_count(&self) -> usize {
        self.unplaced
    }

    /// Nodes with at least one endpoint in the view (placed or not).
    pub fn node_count(&self) -> usize {
        self.by_node.len()
    }

    /// Names of the ToRs in the view, in name order.
    pub fn tor_names(&self) -> impl Iterator<Item = &str> {
        self.tors.iter().map(|g| g.name.as_str())
    }

    /// Positions of `node`'s placed endpoints, in id order.
    fn positions_of(&self, node: &str) -> Vec<Pos> {
        let Some(entry) = self.by_node.get(node) else {
            return Vec::new();
        };
        entry
            .placed
            .iter()
            .filter_map(|(tor, id)| self.position(tor, id))
            .collect()
    }

    fn position(&self, tor: &str, id: &str) -> Option<Pos> {
        let t = *self.tor_index.get(tor)?;
        let rank = self.tors[t]
            .members
            .binary_search_by(|e| e.id.as_str().cmp(id))
            .ok()?;
        Some(Pos { tor: t, rank })
    }

    fn endpoint(&self, at: Pos) -> &MeshEndpoint {
        &self.tors[at.tor].members[at.rank]
    }

    /// The pinglist of `node` for one rotation epoch, or an empty list for an
    /// unknown node. Costs O(size of the answer + ToR sizes touched), independent
    /// of the size of the mesh.
    ///
    /// Order: by source endpoint id; per source, ToR-mesh targets by id, then
    /// inter-ToR targets by id. Only endpoints of the same transport are paired.
    pub fn pinglist_for(
        &self,
        node: &str,
        policy: &PinglistPolicy,
        rotation_epoch: u64,
    ) -> Vec<v1::PingTarget> {
        let mut targets = Vec::new();
        for source in self.positions_of(node) {
            self.push_tor_mesh_targets(source, policy, &mut targets);
            let inter_start = targets.len();
            for tor in self.sampled_tors(source.tor, policy.inter_tor_sample_tors, rotation_epoch) {
                self.push_inter_tor_targets(source, tor, policy, rotation_epoch, &mut targets);
            }
            targets[inter_start..].sort_by(|a, b| target_id(a).cmp(target_id(b)));
        }
        targets
    }

    /// The whole message pushed to an agent.
    pub fn pinglist(
        &self,
        node: &str,
        policy: &PinglistPolicy,
        rotation_epoch: u64,
        version: u64,
    ) -> v1::Pinglist {
        v1::Pinglist {
            version,
            window_ms: policy.window_ms,
            probe_timeout_ms: policy.probe_timeout_ms,
            targets: self.pinglist_for(node, policy, rotation_epoch),
            probe_keys: None,
        }
    }

    fn push_tor_mesh_targets(
        &self,
        source: Pos,
        policy: &PinglistPolicy,
        out: &mut Vec<v1::PingTarget>,
    ) {
        for rank in 0..self.tors[source.tor].members.len() {
            let target = Pos {
                tor: source.tor,
                rank,
            };
            if self.pairable(source, target) {
                out.push(self.target(
                    source,
                    target,
                    v1::TargetKind::TorMesh,
                    policy.tor_mesh_rate_pps,
                    policy.tor_mesh_flows(),
                ));
            }
        }
    }

    /// Up to `per_tor` endpoints under `tor`, starting at a position that moves
    /// with the source's rank (so peers under one ToR spread over the target ToR)
    /// and with the epoch (so every endpoint gets its turn).
    fn push_inter_tor_targets(
        &self,
        source: Pos,
        tor: usize,
        policy: &PinglistPolicy,
        rotation_epoch: u64,
        out: &mut Vec<v1::PingTarget>,
    ) {
        let size = self.tors[tor].members.len();
        let wanted = policy.inter_tor_targets_per_tor.min(size);
        if wanted == 0 {
            return;
        }
        let start = rotate(source.rank, rotation_epoch, wanted, size);
        let flows = policy.inter_tor_flows();
        let mut taken = 0;
        for step in 0..size {
            let target = Pos {
                tor,
                rank: (start + step) % size,
            };
            if self.pairable(source, target) {
                out.push(self.target(
                    source,
                    target,
                    v1::TargetKind::InterTor,
                    policy.inter_tor_rate_pps,
                    flows,
                ));
                taken += 1;
                if taken == wanted {
                    break;
                }
            }
        }
    }

    /// The ToRs source ToR `own` samples in `epoch`: a window of `k` consecutive
    /// positions over the other ToRs (in name order), starting at `own` and moving
    /// by `k` each epoch. So over ceil((T-1)/k) consecutive epochs the windows
    /// cover every other ToR, and in any one epoch different source ToRs start at
    /// different positions: each ToR is picked by about `k` sources.
    fn sampled_tors(&self, own: usize, k: usize, epoch: u64) -> impl Iterator<Item = usize> {
        let others = self.tors.len().saturating_sub(1);
        let take = k.min(others);
        let start = if others == 0 {
            0
        } else {
            rotate(own, epoch, k, others)
        };
        (0..take).map(move |j| {
            let position = (start + j) % others;
            // Positions skip the source ToR itself.
            if position < own {
                position
            } else {
                position + 1
            }
        })
    }

    /// Whether `node`'s list for `rotation_epoch` can differ between `before`
    /// and this view. `false` only when both views share (the same `Arc`s)
    /// the ToR set, the node's own entry, and every ToR its list draws from:
    /// the ToRs of its endpoints and the ToRs they sample. So a pinglist
    /// stream skips recomputing its list after a change elsewhere, in
    /// O(ToRs the node's list touches) instead of O(size of the list).
    pub fn pinglist_may_differ(
        &self,
        before: &MeshView,
        node: &str,
        policy: &PinglistPolicy,
        rotation_epoch: u64,
    ) -> bool {
        // Another ToR set moves ToR positions, hence every node's sampling.
        if !Arc::ptr_eq(&self.tor_index, &before.tor_index) || self.tors.len() != before.tors.len()
        {
            return true;
        }
        let same_entry = match (self.by_node.get(node), before.by_node.get(node)) {
            (Some(now), Some(then)) => Arc::ptr_eq(now, then),
            (None, None) => true,
            _ => false,
        };
        if !same_entry {
            return true;
        }
        let shared = |t: usize| Arc::ptr_eq(&self.tors[t], &before.tors[t]);
        self.positions_of(node).into_iter().any(|source| {
            !shared(source.tor)
                || self
                    .sampled_tors(source.tor, policy.inter_tor_sample_tors, rotation_epoch)
                    .any(|t| !shared(t))
        })
    }

    /// Different nodes, same transport.
    fn pairable(&self, source: Pos, target: Pos) -> bool {
        let (s, t) = (self.endpoint(source), self.endpoint(target));
        s.node != t.node && s.transport == t.transport
    }

    fn target(
        &self,
        source: Pos,
        target: Pos,
        kind: v1::TargetKind,
        rate_pps: f64,
        flows: u32,
    ) -> v1::PingTarget {
        let s = self.endpoint(source);
        v1::PingTarget {
            source_endpoint: s.id.clone(),
            target: Some(self.tors[target.tor].wire[target.rank].clone()),
            target_node: self.endpoint(target).node.clone(),
            source_tor: s.tor.clone(),
            kind: kind.into(),
            rate_pps,
            flows,
            flow_label: 0,
        }
    }
}

/// `(offset + epoch * stride) mod modulus`, without overflow for any epoch.
fn rotate(offset: usize, epoch: u64, stride: usize, modulus: usize) -> usize {
    if modulus == 0 {
        return 0;
    }
    let m = modulus as u128;
    let r = (offset as u128 + u128::from(epoch) * (stride as u128)) % m;
    // r < modulus, which is a usize.
    usize::try_from(r).unwrap_or(0)
}

fn target_id(t: &v1::PingTarget) -> &str {
    t.target.as_ref().map_or("", |e| e.id.as_str())
}

#[cfg(test)]
mod tests {
    use std::collections::{BTreeSet, HashSet};

    use proptest::prelude::*;

    use super::*;

    const UDP: i32 = v1::Transport::Udp as i32;
    const RDMA: i32 = v1::Transport::Rdma as i32;

    fn endpoint(node: &str, port: &str, tor: &str, transport: i32) -> MeshEndpoint {
        MeshEndpoint {
            id: format!("{node}/{port}"),
            node: node.to_owned(),
            tor: tor.to_owned(),
            transport,
            address: format!("10.0.0.1:{}", port.len()),
            qpn: 0,
            device: String::new(),
            tor_from_agent: true,
        }
    }

    /// `tors` ToRs named tor-000.., each with `per_tor` single-endpoint nodes.
    fn grid(tors: usize, per_tor: usize) -> Vec<MeshEndpoint> {
        let mut out = Vec::new();
        for t in 0..tors {
            for n in 0..per_tor {
                out.push(endpoint(
                    &format!("n-{t:03}-{n:02}"),
                    "udp0",
                    &format!("tor-{t:03}"),
                    UDP,
                ));
            }
        }
        out
    }

    fn of_kind(targets: &[v1::PingTarget], kind: v1::TargetKind) -> Vec<&v1::PingTarget> {
        targets.iter().filter(|t| t.kind == kind as i32).collect()
    }

    fn target_tor(t: &v1::PingTarget) -> &str {
        t.target.as_ref().map_or("", |e| e.tor.as_str())
    }

    #[test]
    fn tor_mesh_targets_every_peer_under_the_tor_but_not_the_own_node() {
        let endpoints = vec![
            endpoint("a", "udp0", "tor-1", UDP),
            endpoint("a", "udp1", "tor-1", UDP),
            endpoint("b", "udp0", "tor-1", UDP),
            endpoint("c", "udp0", "tor-1", UDP),
            endpoint("d", "udp0", "tor-2", UDP),
        ];
        let view = MeshView::new(endpoints);
        let policy = PinglistPolicy {
            inter_tor_sample_tors: 0,
            ..PinglistPolicy::default()
        };
        let targets = view.pinglist_for("a", &policy, 0);
        let pairs: Vec<(&str, &str)> = targets
            .iter()
            .map(|t| (t.source_endpoint.as_str(), target_id(t)))
            .collect();
        assert_eq!(
            pairs,
            vec![
                ("a/udp0", "b/udp0"),
                ("a/udp0", "c/udp0"),
                ("a/udp1", "b/udp0"),
                ("a/udp1", "c/udp0"),
            ]
        );
        assert!(
            targets
                .iter()
                .all(|t| t.kind == v1::TargetKind::TorMesh as i32)
        );
    }

    #[test]
    fn endpoint_alone_under_its_tor_gets_only_inter_tor_targets() {
        let mut endpoints = grid(4, 3);
        endpoints.push(endpoint("lonely", "udp0", "tor-zzz", UDP));
        let view = MeshView::new(endpoints);
        let targets = view.pinglist_for("lonely", &PinglistPolicy::default(), 7);
        assert!(!targets.is_empty());
        assert!(
            targets
                .iter()
                .all(|t| t.kind == v1::TargetKind::InterTor as i32)
        );
        assert!(targets.iter().all(|t| target_tor(t) != "tor-zzz"));
    }

    #[test]
    fn rates_and_flows_follow_the_policy() {
        let view = MeshView::new(grid(3, 3));
        let policy = PinglistPolicy {
            tor_mesh_rate_pps: 7.5,
            inter_tor_rate_pps: 0.5,
            ecmp_paths: 8,
            ..PinglistPolicy::default()
        };
        let targets = view.pinglist_for("n-001-01", &policy, 0);
        let mesh = of_kind(&targets, v1::TargetKind::TorMesh);
        let inter = of_kind(&targets, v1::TargetKind::InterTor);
        assert_eq!(mesh.len(), 2);
        assert_eq!(inter.len(), 2, "two other ToRs, one target each");
        assert!(
            mesh.iter()
                .all(|t| (t.rate_pps - 7.5).abs() < f64::EPSILON && t.flows == 1)
        );
        assert!(
            inter
                .iter()
                .all(|t| (t.rate_pps - 0.5).abs() < f64::EPSILON)
        );
        assert!(
            inter
                .iter()
                .all(|t| t.flows == ecmp::flows_for_coverage(8, 0.9, 64))
        );
        assert!(inter.iter().all(|t| t.flows > 1));
        assert!(
            targets
                .iter()
                .all(|t| !t.target_node.is_empty() && t.target.is_some())
        );
        assert!(targets.iter().all(|t| t.source_tor == "tor-001"));
    }

    #[test]
    fn unknown_node_gets_an_empty_pinglist() {
        let view = MeshView::new(grid(3, 3));
        assert!(
            view.pinglist_for("nobody", &PinglistPolicy::default(), 0)
                .is_empty()
        );
        assert!(
            MeshView::default()
                .pinglist_for("n-000-00", &PinglistPolicy::default(), 0)
                .is_empty()
        );
    }

    #[test]
    fn single_tor_mesh_has_only_tor_mesh_targets() {
        let view = MeshView::new(grid(1, 5));
        let targets = view.pinglist_for("n-000-02", &PinglistPolicy::default(), 3);
        assert_eq!(targets.len(), 4);
        assert!(
            targets
                .iter()
                .all(|t| t.kind == v1::TargetKind::TorMesh as i32)
        );
    }

    #[test]
    fn udp_and_rdma_endpoints_are_never_paired() {
        let endpoints = vec![
            endpoint("a", "mlx0", "tor-1", RDMA),
            endpoint("b", "mlx0", "tor-1", RDMA),
            endpoint("c", "udp0", "tor-1", UDP),
            endpoint("d", "udp0", "tor-2", UDP),
            endpoint("e", "mlx0", "tor-2", RDMA),
        ];
        let view = MeshView::new(endpoints);
        let targets = view.pinglist_for("a", &PinglistPolicy::default(), 0);
        let ids: BTreeSet<&str> = targets.iter().map(target_id).collect();
        assert_eq!(ids, BTreeSet::from(["b/mlx0", "e/mlx0"]));
        let udp_targets = view.pinglist_for("c", &PinglistPolicy::default(), 0);
        let ids: BTreeSet<&str> = udp_targets.iter().map(target_id).collect();
        assert_eq!(ids, BTreeSet::from(["d/udp0"]));
    }

    #[test]
    fn same_registry_in_any_order_gives_the_same_pinglist() {
        let endpoints = grid(20, 4);
        let mut reversed = endpoints.clone();
        reversed.reverse();
        let (a, b) = (MeshView::new(endpoints), MeshView::new(reversed));
        let policy = PinglistPolicy::default();
        for epoch in 0..5 {
            assert_eq!(
                a.pinglist_for("n-007-01", &policy, epoch),
                b.pinglist_for("n-007-01", &policy, epoch)
            );
        }
    }

    #[test]
    fn inter_tor_samples_change_between_epochs() {
        let view = MeshView::new(grid(30, 2));
        let policy = PinglistPolicy::default();
        let tors_in = |epoch| -> BTreeSet<String> {
            view.pinglist_for("n-003-00", &policy, epoch)
                .iter()
                .filter(|t| t.kind == v1::TargetKind::InterTor as i32)
                .map(|t| target_tor(t).to_owned())
                .collect()
        };
        assert_eq!(tors_in(0).len(), 5);
        assert_ne!(tors_in(0), tors_in(1));
    }

    #[test]
    fn source_tors_do_not_all_sample_the_same_tors_in_one_epoch() {
        let view = MeshView::new(grid(40, 1));
        let policy = PinglistPolicy::default();
        let samples: HashSet<BTreeSet<String>> = (0..40)
            .map(|t| {
                view.pinglist_for(&format!("n-{t:03}-00"), &policy, 11)
                    .iter()
                    .map(|p| target_tor(p).to_owned())
                    .collect()
            })
            .collect();
        assert!(
            samples.len() > 30,
            "only {} distinct samples",
            samples.len()
        );
    }

    #[test]
    fn inter_tor_target_within_a_tor_rotates_over_epochs() {
        let view = MeshView::new(grid(2, 4));
        let policy = PinglistPolicy::default();
        let picked: BTreeSet<String> = (0..4)
            .flat_map(|epoch| view.pinglist_for("n-000-00", &policy, epoch))
            .filter(|t| t.kind == v1::TargetKind::InterTor as i32)
            .map(|t| target_id(&t).to_owned())
            .collect();
        assert_eq!(
            picked.len(),
            4,
            "every endpoint under tor-001 in 4 epochs: {picked:?}"
        );
    }

    #[test]
    fn endpoints_without_a_tor_are_left_out_and_counted() {
        let mut endpoints = grid(2, 2);
        endpoints.push(endpoint("x", "udp0", "", UDP));
        let view = MeshView::new(endpoints);
        assert_eq!(view.unplaced_count(), 1);
        assert_eq!(view.endpoint_count(), 4);
        assert_eq!(view.tor_count(), 2);
        assert!(
            view.pinglist_for("x", &PinglistPolicy::default(), 0)
                .is_empty()
        );
    }

    #[test]
    fn pinglist_message_carries_window_and_timeout() {
        let view = MeshView::new(grid(2, 2));
        let policy = PinglistPolicy::default();
        let list = view.pinglist("n-000-00", &policy, 0, 42);
        assert_eq!(
            (list.version, list.window_ms, list.probe_timeout_ms),
            (42, 5_000, 500)
        );
        assert_eq!(list.targets, view.pinglist_for("n-000-00", &policy, 0));
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]
        #[test]
        fn every_other_tor_is_sampled_within_a_rotation_cycle(
            tors in 2usize..60,
            k in 1usize..12,
            first_epoch in 0u64..1_000_000_000_000,
        ) {
            let view = MeshView::new(grid(tors, 1));
            let policy = PinglistPolicy { inter_tor_sample_tors: k, ..PinglistPolicy::default() };
            let cycle = (tors - 1).div_ceil(k) as u64;
            for source in 0..tors {
                let node = format!("n-{source:03}-00");
                let mut seen = BTreeSet::new();
                for epoch in first_epoch..first_epoch + cycle {
                    let targets = view.pinglist_for(&node, &policy, epoch);
                    prop_assert_eq!(targets.len(), k.min(tors - 1));
                    seen.extend(targets.iter().map(|t| target_tor(t).to_owned()));
                }
                prop_assert_eq!(seen.len(), tors - 1);
                let own_tor = format!("tor-{source:03}");
                prop_assert!(!seen.contains(&own_tor));
            }
        }
    }

    #[test]
    fn default_policy_is_valid_and_parses_from_an_empty_object() {
        assert_eq!(PinglistPolicy::default().validate(), Ok(()));
        let parsed: PinglistPolicy = serde_json::from_str("{}").unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(parsed, PinglistPolicy::default());
        let parsed: PinglistPolicy =
            serde_json::from_str(r#"{"interTorSampleTors": 3, "windowMs": 1000}"#)
                .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!((parsed.inter_tor_sample_tors, parsed.window_ms), (3, 1000));
    }

    #[test]
    fn validate_names_each_out_of_range_field() {
        let base = PinglistPolicy::default();
        let cases: Vec<(PinglistPolicy, &str)> = vec![
            (
                PinglistPolicy {
                    tor_mesh_rate_pps: -1.0,
                    ..base.clone()
                },
                "torMeshRatePps",
            ),
            (
                PinglistPolicy {
                    tor_mesh_rate_pps: f64::NAN,
                    ..base.clone()
                },
                "torMeshRatePps",
            ),
            (
                PinglistPolicy {
                    inter_tor_rate_pps: 0.0,
                    ..base.clone()
                },
                "interTorRatePps",
            ),
            (
                PinglistPolicy {
                    inter_tor_rate_pps: limits::MAX_RATE_PPS * 2.0,
                    ..base.clone()
                },
                "interTorRatePps",
            ),
            (
                PinglistPolicy {
                    ecmp_paths: 0,
                    ..base.clone()
                },
                "ecmpPaths",
            ),
            (
                PinglistPolicy {
                    ecmp_coverage: 1.0,
                    ..base.clone()
                },
                "ecmpCoverage",
            ),
            (
                PinglistPolicy {
                    max_flows: 0,
                    ..base.clone()
                },
                "maxFlows",
            ),
            (
                PinglistPolicy {
                    max_flows: 65,
                    ..base.clone()
                },
                "maxFlows",
            ),
            (
                PinglistPolicy {
                    rotation_period_ms: 0,
                    ..base.clone()
                },
                "rotationPeriodMs",
            ),
            (
                PinglistPolicy {
                    window_ms: 0,
                    ..base.clone()
                },
                "windowMs",
            ),
            (
                PinglistPolicy {
                    probe_timeout_ms: 0,
                    ..base.clone()
                },
                "probeTimeoutMs",
            ),
            (
                PinglistPolicy {
                    inter_tor_targets_per_tor: 0,
                    ..base.clone()
                },
                "interTorTargetsPerTor",
            ),
        ];
        for (policy, field) in cases {
            match policy.validate() {
                Err(PolicyError::OutOfRange { field: f, .. }) => assert_eq!(f, field),
                other => panic!("{field}: expected out of range, got {other:?}"),
            }
        }
    }

    #[test]
    fn validate_refuses_a_timeout_not_below_the_window_and_huge_samples() {
        let base = PinglistPolicy::default();
        let slow = PinglistPolicy {
            probe_timeout_ms: 5_000,
            ..base.clone()
        };
        let err = slow.validate().err();
        assert!(
            matches!(err, Some(PolicyError::TimeoutNotBelowWindow { .. })),
            "{err:?}"
        );
        assert_eq!(
            err.map(|e| e.category()),
            Some("policy_timeout_not_below_window")
        );
        let huge = PinglistPolicy {
            inter_tor_sample_tors: 10_000,
            inter_tor_targets_per_tor: 10,
            ..base
        };
        assert!(matches!(
            huge.validate(),
            Err(PolicyError::TooManyInterTorTargets { .. })
        ));
    }

    #[test]
    fn rotation_epoch_counts_periods_since_the_unix_epoch() {
        let policy = PinglistPolicy {
            rotation_period_ms: 60_000,
            ..PinglistPolicy::default()
        };
        assert_eq!(policy.rotation_epoch(59_999), 0);
        assert_eq!(policy.rotation_epoch(120_000), 2);
    }

    /// One membership change for the incremental-view property test: node
    /// `node` now has endpoints `(port, ToR, transport)` (none: it left).
    type Change = (usize, Vec<(usize, usize, bool)>);

    fn node_endpoints(node: usize, endpoints: &[(usize, usize, bool)]) -> Vec<MeshEndpoint> {
        endpoints
            .iter()
            .map(|&(port, tor, rdma)| {
                // ToR 0 stands for "not resolved yet".
                let tor = if tor == 0 {
                    String::new()
                } else {
                    format!("tor-{tor}")
                };
                let transport = if rdma {
                    v1::Transport::Rdma
                } else {
                    v1::Transport::Udp
                };
                endpoint(
                    &format!("n{node}"),
                    &format!("p{port}"),
                    &tor,
                    transport as i32,
                )
            })
            .collect()
    }

    fn change() -> impl Strategy<Value = Change> {
        (
            0..8usize,
            prop::collection::vec((0..3usize, 0..5usize, any::<bool>()), 0..4),
        )
    }

    /// Samples fewer ToRs than the property tests' views hold, so that some
    /// lists do not draw on every ToR.
    fn answers_policy() -> PinglistPolicy {
        PinglistPolicy {
            inter_tor_sample_tors: 2,
            inter_tor_targets_per_tor: 2,
            ..PinglistPolicy::default()
        }
    }

    /// Everything a view answers, for comparing two views.
    fn answers(view: &MeshView, nodes: usize) -> Vec<(usize, usize, Vec<v1::PingTarget>)> {
        let policy = answers_policy();
        let mut all = vec![(view.endpoint_count(), view.unplaced_count(), Vec::new())];
        for node in 0..nodes {
            for epoch in 0..3 {
                all.push((
                    node,
                    epoch,
                    view.pinglist_for(&format!("n{node}"), &policy, epoch as u64),
                ));
            }
        }
        all
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(256))]
        #[test]
        fn incremental_updates_equal_a_full_rebuild(
            changes in prop::collection::vec(prop::collection::vec(change(), 1..4), 1..12)
        ) {
            let mut members: std::collections::BTreeMap<usize, Vec<MeshEndpoint>> =
                std::collections::BTreeMap::new();
            let mut view = MeshView::default();
            for batch in changes {
                let mut changed = HashMap::new();
                for (node, endpoints) in batch {
                    let endpoints = node_endpoints(node, &endpoints);
                    members.insert(node, endpoints.clone());
                    changed.insert(format!("n{node}"), endpoints);
                }
                let before = view.clone();
                view = view.updated(changed.clone());
                let full = MeshView::new(members.values().flatten().cloned().collect());
                prop_assert_eq!(answers(&view, 8), answers(&full, 8));
                // A list said not to differ is the same list.
                let policy = answers_policy();
                for node in (0..8).map(|n| format!("n{n}")) {
                    for epoch in 0..3 {
                        if !view.pinglist_may_differ(&before, &node, &policy, epoch) {
                            prop_assert_eq!(
                                view.pinglist_for(&node, &policy, epoch),
                                before.pinglist_for(&node, &policy, epoch),
                                "{} in epoch {}", node, epoch
                            );
                        }
                    }
                }
                // ToRs none of the changed nodes was or is under are shared, not rebuilt.
                let touched: HashSet<String> = changed
                    .values()
                    .flatten()
                    .map(|e| e.tor.clone())
                    .chain(changed.keys().flat_map(|n| {
                        before.by_node.get(n).into_iter().flat_map(|e| e.placed.iter().map(|(t, _)| t.clone()))
                    }))
                    .collect();
                for group in &view.tors {
                    if touched.contains(&group.name) {
                        continue;
                    }
                    let old = &before.tors[before.tor_index[&group.name]];
                    prop_assert!(Arc::ptr_eq(old, group), "{} was rebuilt", group.name);
                }
            }
        }
    }

    #[test]
    fn a_join_changes_only_the_lists_of_its_tor() {
        let endpoints = grid(4, 3);
        let view = MeshView::new(endpoints.clone());
        let policy = PinglistPolicy {
            inter_tor_sample_tors: 0,
            ..PinglistPolicy::default()
        };
        let joined = view.updated(HashMap::from([(
            "late".to_owned(),
            vec![endpoint(
                "late",
                "udp0",
                "tor-001",
                v1::Transport::Udp as i32,
            )],
        )]));
        for e in &endpoints {
            let (before, after) = (
                view.pinglist_for(&e.node, &policy, 0),
                joined.pinglist_for(&e.node, &policy, 0),
            );
            if e.tor == "tor-001" {
                assert_eq!(after.len(), before.len() + 1, "{}", e.node);
            } else {
                assert_eq!(after, before, "{}", e.node);
            }
        }
        assert_eq!(joined.pinglist_for("late", &policy, 0).len(), 3);
    }

    #[test]
    fn a_join_may_change_only_lists_drawing_on_its_tor() {
        let view = MeshView::new(grid(6, 3));
        let policy = PinglistPolicy {
            inter_tor_sample_tors: 1,
            ..PinglistPolicy::default()
        };
        let joined = view.updated(HashMap::from([(
            "late".to_owned(),
            vec![endpoint("late", "udp0", "tor-001", UDP)],
        )]));
        let mut spared = 0;
        for e in grid(6, 3) {
            let samples_tor_1 = joined
                .positions_of(&e.node)
                .into_iter()
                .any(|p| joined.sampled_tors(p.tor, 1, 0).any(|t| t == 1));
            let draws_on_tor_1 = e.tor == "tor-001" || samples_tor_1;
            let may_differ = joined.pinglist_may_differ(&view, &e.node, &policy, 0);
            assert_eq!(may_differ, draws_on_tor_1, "{}", e.node);
            if e.tor == "tor-001" {
                assert_ne!(
                    joined.pinglist_for(&e.node, &policy, 0),
                    view.pinglist_for(&e.node, &policy, 0)
                );
            }
            if !may_differ {
                spared += 1;
                assert_eq!(
                    joined.pinglist_for(&e.node, &policy, 0),
                    view.pinglist_for(&e.node, &policy, 0)
                );
            }
        }
        assert!(spared > 0, "some lists do not draw on tor-001");
        assert!(joined.pinglist_may_differ(&view, "late", &policy, 0));
    }
}
