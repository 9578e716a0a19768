//! Host-delay anomalies from the six timestamps: a node whose prober delay
//! (T1 to its send completion and ACK1's arrival to its handling) or responder
//! delay (probe arrival to ACK1's send completion) is far above the fleet's is
//! slow as a host: CPU starved, interrupts pinned, a busy RNIC driver. The
//! network RTT already excludes both delays, so this is never a network fault.

use super::paths::PathEvidence;

/// When a node's host delay is an anomaly.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct HostDelayRules {
    /// Below this p99 no host is slow, whatever the fleet does (ns).
    pub floor_ns: u64,
    /// A node's median p99 must be this many times the fleet's median p99.
    pub factor: f64,
    /// Paths a node needs on the side judged.
    pub min_paths: usize,
}

impl Default for HostDelayRules {
    fn default() -> Self {
        Self {
            floor_ns: 1_000_000,
            factor: 10.0,
            min_paths: 3,
        }
    }
}

/// A node with slow host delay: which sides, with the node's and the
/// fleet's median p99.
#[derive(Debug, Clone, PartialEq)]
pub(super) struct SlowHost {
    pub node: u32,
    pub prober: Option<(u64, u64)>,
    pub responder: Option<(u64, u64)>,
    pub paths: usize,
}

fn median(values: &mut [u64]) -> Option<u64> {
    if values.is_empty() {
        return None;
    }
    let mid = values.len() / 2;
    Some(*values.select_nth_unstable(mid).1)
}

/// Nodes whose prober or responder delay stands out from the fleet's.
pub(super) fn slow_hosts(evidence: &PathEvidence<'_>, rules: &HostDelayRules) -> Vec<SlowHost> {
    let nodes = evidence.nodes.len();
    let (mut prober, mut responder) = (vec![Vec::new(); nodes], vec![Vec::new(); nodes]);
    for &(row, prober_p99, responder_p99) in evidence.host_delays() {
        let (s, t) = evidence.ends(row);
        if let Some(d) = prober_p99 {
            prober[evidence.node_of(s) as usize].push(d);
        }
        if let Some(d) = responder_p99 {
            responder[evidence.node_of(t) as usize].push(d);
        }
    }
    let side = |per_node: &mut Vec<Vec<u64>>| -> Vec<Option<(u64, u64)>> {
        let mut node_medians: Vec<Option<u64>> = per_node
            .iter_mut()
            .map(|v| {
                if v.len() >= rules.min_paths {
                    median(v)
                } else {
                    None
                }
            })
            .collect();
        let mut all: Vec<u64> = node_medians.iter().flatten().copied().collect();
        let Some(fleet) = median(&mut all) else {
            return vec![None; per_node.len()];
        };
        let bar = (fleet as f64 * rules.factor).max(rules.floor_ns as f64);
        node_medians
            .iter_mut()
            .map(|m| m.filter(|&m| m as f64 > bar).map(|m| (m, fleet)))
            .collect()
    };
    let (slow_prober, slow_responder) = (side(&mut prober), side(&mut responder));
    (0..nodes)
        .filter(|&n| slow_prober[n].is_some() || slow_responder[n].is_some())
        .map(|n| SlowHost {
            node: n as u32,
            prober: slow_prober[n],
            responder: slow_responder[n],
            paths: prober[n].len() + responder[n].len(),
        })
        .collect()
}
