//! Which nodes open findings localize a fault to: the rule behind the
//! `spec.nodeHealth` Node condition.
//!
//! Only path findings between two nodes under the same ToR count. Such a path
//! crosses a single switch, so when one node's paths to several neighbours go
//! bad while the neighbours' other paths are fine, the node (its RNIC, cable
//! or switch port, or its host) is the common factor. One bad path alone
//! blames nobody: either end could be at fault. ToR-pair findings and paths
//! between ToRs blame no node: they point at switches and links.
//!
//! The rule, per ToR, over the graph whose edges are node pairs with an open
//! path finding (loss or latency, either direction):
//!
//! 1. Pick the node with the most neighbours (ties: by name) among those with
//!    at least two neighbours and at least one neighbour that has fewer; blame
//!    it and take its edges out. Repeat until no node qualifies. This finds the
//!    few nodes that explain the bad paths: with one broken RNIC its node has
//!    every other node as neighbour while they have only it; with two, the
//!    second is found once the first's edges are gone.
//! 2. If that blames half the nodes registered under the ToR or more, blame
//!    none of them: a fault that wide is the switch's (the ToR-pair finding
//!    reports it). A complete graph (every pair bad) never gets past step 1,
//!    as no node has a neighbour with fewer neighbours.

use std::collections::{BTreeMap, BTreeSet};

use crate::mesh::analyzer::{Finding, FindingKind};
use crate::mesh::types::MeshEndpoint;

/// A node the findings localize a fault to, and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Blame {
    pub tor: String,
    /// Nodes under the same ToR whose paths with this one have open findings.
    pub peers: BTreeSet<String>,
    /// The findings that involve this node, as (kind, location), sorted.
    pub findings: Vec<(FindingKind, String)>,
}

/// The nodes open `findings` localize a fault to, by name (see the module docs).
/// `endpoints` are all registered endpoints: they place endpoints on nodes and
/// count the nodes under each ToR. Findings on endpoints it does not list are
/// left out.
pub fn faulty_nodes(findings: &[Finding], endpoints: &[MeshEndpoint]) -> BTreeMap<String, Blame> {
    let node_of: BTreeMap<&str, &str> = endpoints
        .iter()
        .map(|e| (e.id.as_str(), e.node.as_str()))
        .collect();
    let mut nodes_under: BTreeMap<&str, BTreeSet<&str>> = BTreeMap::new();
    for e in endpoints {
        nodes_under
            .entry(e.tor.as_str())
            .or_default()
            .insert(e.node.as_str());
    }
    // ToR -> node -> neighbour -> findings between them.
    let mut graphs: BTreeMap<&str, Graph<'_>> = BTreeMap::new();
    for f in findings {
        if !matches!(f.kind, FindingKind::PathLoss | FindingKind::PathLatency)
            || f.source_tor != f.target_tor
        {
            continue;
        }
        let Some((source, target)) = f.location.split_once(" -> ") else {
            continue;
        };
        let (Some(&a), Some(&b)) = (node_of.get(source), node_of.get(target)) else {
            continue;
        };
        if a == b {
            continue;
        }
        let graph = graphs.entry(f.source_tor.as_str()).or_default();
        for (x, y) in [(a, b), (b, a)] {
            graph
                .entry(x)
                .or_default()
                .entry(y)
                .or_default()
                .push((f.kind, f.location.clone()));
        }
    }
    let mut out = BTreeMap::new();
    for (tor, mut graph) in graphs {
        let original = graph.clone();
        let blamed = explain(&mut graph);
        let registered = nodes_under.get(tor).map_or(0, BTreeSet::len);
        if blamed.is_empty() || 2 * blamed.len() >= registered {
            continue;
        }
        for node in blamed {
            let Some(neighbours) = original.get(node) else {
                continue;
            };
            let mut involved: Vec<(FindingKind, String)> =
                neighbours.values().flatten().cloned().collect();
            involved.sort();
            involved.dedup();
            out.insert(
                node.to_owned(),
                Blame {
                    tor: tor.to_owned(),
                    peers: neighbours.keys().map(|p| (*p).to_owned()).collect(),
                    findings: involved,
                },
            );
        }
    }
    out
}

type Graph<'a> = BTreeMap<&'a str, BTreeMap<&'a str, Vec<(FindingKind, String)>>>;

/// Step 1 of the rule: the nodes that explain the edges, taking them out.
fn explain<'a>(graph: &mut Graph<'a>) -> Vec<&'a str> {
    let mut blamed = Vec::new();
    loop {
        let degree = |node: &str, graph: &Graph<'_>| graph.get(node).map_or(0, BTreeMap::len);
        let pick = graph
            .iter()
            .filter(|(_, neighbours)| neighbours.len() >= 2)
            .filter(|(_, neighbours)| {
                neighbours
                    .keys()
                    .any(|n| degree(n, graph) < neighbours.len())
            })
            // Most neighbours first; the map's order (by name) breaks ties.
            .max_by(|(a, x), (b, y)| x.len().cmp(&y.len()).then_with(|| b.cmp(a)))
            .map(|(node, _)| *node);
        let Some(node) = pick else {
            return blamed;
        };
        if let Some(neighbours) = graph.remove(node) {
            for neighbour in neighbours.keys() {
                if let Some(theirs) = graph.get_mut(neighbour) {
                    theirs.remove(node);
                    if theirs.is_empty() {
                        graph.remove(neighbour);
                    }
                }
            }
        }
        blamed.push(node);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn endpoint(node: &str, tor: &str) -> MeshEndpoint {
        MeshEndpoint {
            id: format!("{node}/mlx5_0"),
            node: node.to_owned(),
            tor: tor.to_owned(),
            transport: 2,
            address: "fe80::1".to_owned(),
            qpn: 1,
            device: "mlx5_0".to_owned(),
            tor_from_agent: false,
        }
    }

    /// `count` nodes n0.. under `tor`.
    fn rack(tor: &str, count: usize) -> Vec<MeshEndpoint> {
        (0..count)
            .map(|i| endpoint(&format!("{tor}-n{i}"), tor))
            .collect()
    }

    fn path(kind: FindingKind, from: &MeshEndpoint, to: &MeshEndpoint) -> Finding {
        Finding {
            kind,
            location: format!("{} -> {}", from.id, to.id),
            source_tor: from.tor.clone(),
            target_tor: to.tor.clone(),
            opened_at_window_ms: 10_000,
            first_bad_window_ms: 5_000,
            last_bad_window_ms: 10_000,
            evidence: "loss 100.0% (20/20) over 2 windows".to_owned(),
            loss_ratio: Some(1.0),
            p99_ns: None,
            cleared_at_window_ms: None,
            clear_reason: None,
        }
    }

    fn names(blamed: &BTreeMap<String, Blame>) -> Vec<&str> {
        blamed.keys().map(String::as_str).collect()
    }

    #[test]
    fn one_broken_rnic_blames_its_node_only() {
        let r = rack("tor-a", 6);
        let bad = &r[2];
        let mut findings = Vec::new();
        for other in r.iter().filter(|e| e.node != bad.node) {
            findings.push(path(FindingKind::PathLoss, bad, other));
            findings.push(path(FindingKind::PathLoss, other, bad));
        }
        let blamed = faulty_nodes(&findings, &r);
        assert_eq!(names(&blamed), ["tor-a-n2"]);
        let blame = &blamed["tor-a-n2"];
        assert_eq!(blame.tor, "tor-a");
        assert_eq!(blame.peers.len(), 5);
        assert_eq!(blame.findings.len(), 10);
    }

    #[test]
    fn a_single_bad_path_blames_neither_end() {
        let r = rack("tor-a", 6);
        let findings = [path(FindingKind::PathLoss, &r[0], &r[1])];
        assert!(faulty_nodes(&findings, &r).is_empty());
    }

    #[test]
    fn two_broken_rnics_under_one_tor_are_both_found() {
        let r = rack("tor-a", 8);
        let mut findings = Vec::new();
        for bad in [&r[1], &r[5]] {
            for other in r.iter().filter(|e| e.node != bad.node) {
                findings.push(path(FindingKind::PathLatency, bad, other));
            }
        }
        assert_eq!(
            names(&faulty_nodes(&findings, &r)),
            ["tor-a-n1", "tor-a-n5"]
        );
    }

    #[test]
    fn every_pair_failing_blames_no_node_but_the_switch() {
        let r = rack("tor-a", 5);
        let mut findings = Vec::new();
        for a in &r {
            for b in &r {
                if a.node != b.node {
                    findings.push(path(FindingKind::PathLoss, a, b));
                }
            }
        }
        assert!(faulty_nodes(&findings, &r).is_empty());
    }

    #[test]
    fn bad_paths_with_no_common_factor_blame_no_one_in_particular() {
        // Three nodes of ten whose paths to each other fail: any of them could
        // be the cause, and none explains more than the others.
        let r = rack("tor-a", 10);
        let findings = [
            path(FindingKind::PathLoss, &r[0], &r[1]),
            path(FindingKind::PathLoss, &r[1], &r[2]),
            path(FindingKind::PathLoss, &r[2], &r[0]),
        ];
        assert!(faulty_nodes(&findings, &r).is_empty());
    }

    #[test]
    fn a_fault_spanning_half_the_tor_blames_none_of_it() {
        // Two of four nodes fail to everyone: as likely half the switch as two
        // RNICs at once. Two of eight would be two RNICs.
        for (size, blamed) in [(4, 0), (8, 2)] {
            let r = rack("tor-a", size);
            let mut findings = Vec::new();
            for bad in &r[..2] {
                for other in r.iter().filter(|e| e.node != bad.node) {
                    findings.push(path(FindingKind::PathLoss, bad, other));
                }
            }
            assert_eq!(faulty_nodes(&findings, &r).len(), blamed, "{size} nodes");
        }
    }

    #[test]
    fn paths_between_tors_and_unknown_endpoints_blame_nobody() {
        let a = rack("tor-a", 4);
        let b = rack("tor-b", 4);
        let mut all = a.clone();
        all.extend(b.clone());
        let mut findings: Vec<Finding> = b
            .iter()
            .map(|to| path(FindingKind::PathLoss, &a[0], to))
            .collect();
        let ghost = endpoint("gone", "tor-a");
        findings.push(path(FindingKind::PathLoss, &a[1], &ghost));
        findings.push(path(FindingKind::PathLoss, &ghost, &a[2]));
        assert!(faulty_nodes(&findings, &all).is_empty());
    }

    #[test]
    fn tor_pair_findings_blame_no_node() {
        let r = rack("tor-a", 4);
        let mut pair = path(FindingKind::TorPairLoss, &r[0], &r[1]);
        pair.location = "tor-a -> tor-a".to_owned();
        let findings = vec![pair.clone(), pair.clone(), pair];
        assert!(faulty_nodes(&findings, &r).is_empty());
    }
}
