//! What localization reads of a window: one small row per path, its ends as
//! numbers of an [`EndpointTable`] that outlives the window.
//!
//! The analyzer numbers endpoints once, when it judges a window, and keeps
//! each window's rows for the next few localizations: localization then never
//! hashes an endpoint id, where it used to intern four strings per path for
//! every window it looked at, twice (loss, then latency).

use std::collections::HashMap;
use std::sync::Arc;

use crate::mesh::analyzer::{Judgement, PathStats};

type Map<K, V> = HashMap<K, V, foldhash::fast::RandomState>;

/// Names numbered in the order they are first seen.
#[derive(Debug, Default, Clone)]
struct Names {
    index: Map<Arc<str>, u32>,
    names: Vec<Arc<str>>,
}

impl Names {
    fn get(&self, name: &str) -> Option<u32> {
        self.index.get(name).copied()
    }

    fn intern(&mut self, name: &str) -> u32 {
        if let Some(i) = self.get(name) {
            return i;
        }
        let i = u32::try_from(self.names.len()).unwrap_or(u32::MAX);
        let name: Arc<str> = name.into();
        self.names.push(Arc::clone(&name));
        self.index.insert(name, i);
        i
    }

    fn name(&self, i: u32) -> &str {
        self.names.get(i as usize).map_or("", |n| n)
    }

    fn len(&self) -> usize {
        self.names.len()
    }
}

/// Endpoints by number, with the node and ToR each was last placed under.
///
/// Numbers stay the same from window to window, so rows of earlier windows
/// can be read with the table of a later one. An endpoint that has not been
/// placed is a node of its own under the ToR named "".
#[derive(Debug, Default, Clone)]
pub struct EndpointTable {
    endpoints: Names,
    nodes: Names,
    tors: Names,
    node_of: Vec<u32>,
    tor_of: Vec<u32>,
    /// Each endpoint's position in id order, recomputed after a new one.
    ranks: Option<Vec<u32>>,
}

impl EndpointTable {
    pub fn new() -> Self {
        Self::default()
    }

    /// The endpoint's number, adding it when new (unplaced: a node of its
    /// own under the ToR "").
    pub fn intern(&mut self, endpoint: &str) -> u32 {
        self.intern_placed(endpoint, None)
    }

    /// The endpoint's number, placed under `(node, ToR)` when given; a new
    /// endpoint without one is a node of its own under the ToR "". Placing
    /// a new endpoint at once keeps its own-node name out of the table.
    pub fn intern_placed(&mut self, endpoint: &str, placement: Option<(&str, &str)>) -> u32 {
        if let Some(e) = self.endpoints.get(endpoint) {
            if let Some((node, tor)) = placement {
                self.place(e, node, tor);
            }
            return e;
        }
        let e = self.endpoints.intern(endpoint);
        let (node, tor) = placement.unwrap_or((endpoint, ""));
        self.node_of.push(self.nodes.intern(node));
        self.tor_of.push(self.tors.intern(tor));
        self.ranks = None;
        e
    }

    /// Puts an endpoint under a node and a ToR (where it already is: no change).
    pub fn place(&mut self, endpoint: u32, node: &str, tor: &str) -> Option<u32> {
        let e = endpoint as usize;
        let (&n, &t) = (self.node_of.get(e)?, self.tor_of.get(e)?);
        if self.nodes.name(n) != node {
            self.node_of[e] = self.nodes.intern(node);
        }
        if self.tors.name(t) != tor {
            self.tor_of[e] = self.tors.intern(tor);
        }
        Some(self.tor_of[e])
    }

    pub fn get(&self, endpoint: &str) -> Option<u32> {
        self.endpoints.get(endpoint)
    }

    pub fn endpoint_name(&self, endpoint: u32) -> &str {
        self.endpoints.name(endpoint)
    }

    pub fn node_name(&self, node: u32) -> &str {
        self.nodes.name(node)
    }

    pub fn tor_name(&self, tor: u32) -> &str {
        self.tors.name(tor)
    }

    pub fn node_of(&self, endpoint: u32) -> u32 {
        self.node_of.get(endpoint as usize).copied().unwrap_or(0)
    }

    pub fn tor_of(&self, endpoint: u32) -> u32 {
        self.tor_of.get(endpoint as usize).copied().unwrap_or(0)
    }

    /// Endpoints numbered.
    pub fn len(&self) -> usize {
        self.endpoints.len()
    }

    pub fn is_empty(&self) -> bool {
        self.endpoints.len() == 0
    }

    pub fn node_count(&self) -> usize {
        self.nodes.len()
    }

    pub fn tor_count(&self) -> usize {
        self.tors.len()
    }

    /// Each endpoint's position in id order (sorting by these numbers sorts
    /// by id); sorted again only after endpoints were added.
    pub fn ranks(&mut self) -> &[u32] {
        let names = &self.endpoints.names;
        self.ranks.get_or_insert_with(|| {
            let mut by_id: Vec<u32> = (0..names.len() as u32).collect();
            by_id.sort_unstable_by(|&a, &b| names[a as usize].cmp(&names[b as usize]));
            let mut rank = vec![0u32; names.len()];
            for (r, &e) in by_id.iter().enumerate() {
                rank[e as usize] = r as u32;
            }
            rank
        })
    }

    /// Keeps only the endpoints `keep` accepts (and the nodes and ToRs they
    /// are under), numbered anew; returns each old number's new one
    /// (`u32::MAX`: dropped) for the rows still held.
    pub fn retain(&mut self, keep: impl Fn(u32) -> bool) -> Vec<u32> {
        let mut kept = Self::default();
        let remap = (0..self.len() as u32)
            .map(|e| {
                if !keep(e) {
                    return u32::MAX;
                }
                let (n, t) = (self.node_of(e), self.tor_of(e));
                let placement = (self.node_name(n), self.tor_name(t));
                kept.intern_placed(self.endpoint_name(e), Some(placement))
            })
            .collect();
        *self = kept;
        remap
    }
}

/// One path of one window, as localization reads it.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct PathRow {
    /// Endpoint numbers ([`EndpointTable`]).
    pub source: u32,
    pub target: u32,
    pub ok: u64,
    pub lost: u64,
    /// Bit i: a probe on flow i was lost / was sent.
    pub lost_flows_mask: u64,
    pub probed_flows_mask: u64,
    pub prober_p99_ns: Option<u64>,
    pub responder_p99_ns: Option<u64>,
    pub latency: Judgement,
}

impl PathRow {
    /// The row of a judged path whose ends are numbered `source` and `target`.
    pub fn of(p: &PathStats, source: u32, target: u32) -> Self {
        Self {
            source,
            target,
            ok: p.ok,
            lost: p.lost,
            lost_flows_mask: p.lost_flows_mask,
            probed_flows_mask: p.probed_flows_mask,
            prober_p99_ns: p.prober_p99_ns,
            responder_p99_ns: p.responder_p99_ns,
            latency: p.latency,
        }
    }

    /// Rewrites both ends by `remap` ([`EndpointTable::retain`]); false when
    /// an end was dropped.
    pub fn renumber(&mut self, remap: &[u32]) -> bool {
        let new = |e: u32| remap.get(e as usize).copied().unwrap_or(u32::MAX);
        (self.source, self.target) = (new(self.source), new(self.target));
        self.source != u32::MAX && self.target != u32::MAX
    }
}

/// The rows of `paths`, their ends numbered in `table`. An endpoint new to
/// the table is placed under the node `node_of` names (the endpoint itself
/// when it names none) and the ToR its first path names; one the table
/// knows keeps its placement, so over several windows the oldest placement
/// holds (the analyzer instead places endpoints by the registry's latest
/// placement as it judges). For callers that hold [`PathStats`] only.
pub fn rows_of<'n>(
    paths: &[PathStats],
    table: &mut EndpointTable,
    node_of: &dyn Fn(&str) -> Option<&'n str>,
) -> Vec<PathRow> {
    let number = |table: &mut EndpointTable, id: &str, tor: &str| match table.get(id) {
        Some(e) => e,
        None => table.intern_placed(id, Some((node_of(id).unwrap_or(id), tor))),
    };
    let mut rows = Vec::with_capacity(paths.len());
    // Paths come sorted by source: most repeat the last one's.
    let mut last_source: Option<(&str, u32)> = None;
    for p in paths {
        let source = match last_source {
            Some((id, e)) if id == p.source_endpoint => e,
            _ => number(table, &p.source_endpoint, &p.source_tor),
        };
        last_source = Some((&p.source_endpoint, source));
        let target = number(table, &p.target_endpoint, &p.target_tor);
        rows.push(PathRow::of(p, source, target));
    }
    rows
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn numbers_stay_and_placements_follow_the_latest() {
        let mut table = EndpointTable::new();
        let a = table.intern("n1/mlx5_0");
        let b = table.intern("n2/mlx5_0");
        assert_eq!(table.intern("n1/mlx5_0"), a);
        // Unplaced: a node of its own under "".
        assert_eq!(table.node_name(table.node_of(b)), "n2/mlx5_0");
        assert_eq!(table.tor_name(table.tor_of(b)), "");
        table.place(a, "n1", "tor-1");
        table.place(b, "n2", "tor-1");
        assert_eq!(table.tor_of(a), table.tor_of(b));
        table.place(b, "n2", "tor-2");
        assert_eq!(table.tor_name(table.tor_of(b)), "tor-2");
        assert_eq!(table.node_name(table.node_of(a)), "n1");
    }

    #[test]
    fn ranks_order_endpoints_by_id_and_follow_new_ones() {
        let mut table = EndpointTable::new();
        for id in ["c", "a", "b"] {
            table.intern(id);
        }
        assert_eq!(table.ranks(), &[2, 0, 1]);
        table.intern("0");
        assert_eq!(table.ranks(), &[3, 1, 2, 0]);
    }

    #[test]
    fn retain_renumbers_and_rows_follow() {
        let mut table = EndpointTable::new();
        let (a, b, c) = (table.intern("a"), table.intern("b"), table.intern("c"));
        table.place(c, "node-c", "tor-c");
        let row = |s, t| PathRow {
            source: s,
            target: t,
            ok: 1,
            lost: 0,
            lost_flows_mask: 0,
            probed_flows_mask: 0,
            prober_p99_ns: None,
            responder_p99_ns: None,
            latency: Judgement::NotJudged,
        };
        let (mut kept, mut dropped) = (row(c, a), row(a, b));
        let remap = table.retain(|e| e != b);
        assert!(kept.renumber(&remap));
        assert!(!dropped.renumber(&remap));
        assert_eq!(table.len(), 2);
        assert_eq!(table.endpoint_name(kept.source), "c");
        assert_eq!(table.endpoint_name(kept.target), "a");
        assert_eq!(table.node_name(table.node_of(kept.source)), "node-c");
        assert_eq!(table.tor_name(table.tor_of(kept.source)), "tor-c");
        assert_eq!(table.get("b"), None);
    }
}
