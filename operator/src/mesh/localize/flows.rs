//! Flow-level evidence: network tomography over traced flows.
//!
//! A flow is one (source, target, flow label or UDP source port) of a path;
//! switches hash it onto one ECMP path, which a same-5-tuple trace reveals as
//! a list of hops. Its ACKs come back on a 5-tuple of their own, hashed onto
//! a return path that a trace from the target's side reveals. Each probed
//! flow of a window is an observation: failing if one of its probes was lost
//! (`lost_flows_mask`), healthy if it was probed (`probed_flows_mask`) and
//! none was. Its components are the directed links between consecutive hops
//! of both ways and the switches inside them. Links on
//! failing flows gain suspicion, links on healthy flows are exonerated, and
//! the engine's greedy hitting set names the links or switches that explain
//! the failing flows; a switch wins over its links when all its links fail.

use std::collections::HashMap;
use std::sync::Arc;

use super::engine::Evidence;
use super::paths::PathEvidence;

/// The traced flows of every path, by (source endpoint, target endpoint).
pub trait PathTraces: Send + Sync + std::fmt::Debug {
    /// What is known of the flows of one path.
    fn path(&self, source: &str, target: &str) -> Option<&PathTrace>;
}

type Map<K, V> = HashMap<K, V, foldhash::fast::RandomState>;
/// Hops there and, when traced, back.
type BothWays = (Option<Vec<Arc<str>>>, Option<Vec<Arc<str>>>);

/// The traced flows of one path: for each flow, the routers it crosses in
/// order (named: a topology map turns addresses into switch names before
/// they get here), and the routers its ACKs cross on the way back (from the
/// target's side).
#[derive(Debug, Default, Clone)]
pub struct PathTrace {
    flows: Map<u16, BothWays>,
}

impl PathTrace {
    pub fn hops(&self, flow: u16) -> Option<&[Arc<str>]> {
        self.flows.get(&flow)?.0.as_deref()
    }

    pub fn return_hops(&self, flow: u16) -> Option<&[Arc<str>]> {
        self.flows.get(&flow)?.1.as_deref()
    }
}

/// Traces by source endpoint, target endpoint and flow. Hop names are
/// interned: equal names share one allocation, which the tomography keys on.
#[derive(Debug, Default, Clone)]
pub struct TraceBook {
    paths: Map<Box<str>, Map<Box<str>, PathTrace>>,
    names: std::collections::HashSet<Arc<str>, foldhash::fast::RandomState>,
    len: usize,
}

impl TraceBook {
    fn intern(&mut self, hops: Vec<Arc<str>>) -> Vec<Arc<str>> {
        hops.into_iter()
            .map(|h| {
                if let Some(known) = self.names.get(&h) {
                    return known.clone();
                }
                self.names.insert(h.clone());
                h
            })
            .collect()
    }

    fn slot(&mut self, source: &str, target: &str, flow: u16) -> &mut BothWays {
        let flows = &mut self
            .paths
            .entry(source.into())
            .or_default()
            .entry(target.into())
            .or_default()
            .flows;
        if !flows.contains_key(&flow) {
            self.len += 1;
        }
        flows.entry(flow).or_default()
    }

    /// The hops of a flow from `source` to `target`.
    pub fn insert(&mut self, source: &str, target: &str, flow: u16, hops: Vec<Arc<str>>) {
        let hops = self.intern(hops);
        self.slot(source, target, flow).0 = Some(hops);
    }

    /// The hops its ACKs take back, from `target` to `source`.
    pub fn insert_return(&mut self, source: &str, target: &str, flow: u16, hops: Vec<Arc<str>>) {
        let hops = self.intern(hops);
        self.slot(source, target, flow).1 = Some(hops);
    }

    /// Takes in every trace of `other` (newer ones win).
    pub fn merge(&mut self, other: TraceBook) {
        for (source, targets) in other.paths {
            for (target, trace) in targets {
                for (flow, (there, back)) in trace.flows {
                    if let Some(there) = there {
                        self.insert(&source, &target, flow, there);
                    }
                    if let Some(back) = back {
                        self.insert_return(&source, &target, flow, back);
                    }
                }
            }
        }
    }

    /// Traced flows.
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

impl PathTraces for TraceBook {
    fn path(&self, source: &str, target: &str) -> Option<&PathTrace> {
        self.paths.get(source)?.get(target)
    }
}

/// A component of the flow level.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum Hop {
    /// Directed link between two hops.
    Link(Arc<str>, Arc<str>),
    /// A switch inside the path (not the first or last hop).
    Switch(Arc<str>),
}

/// Probed flows of the given paths with their traced hops.
#[derive(Debug)]
pub(super) struct FlowEvidence {
    pub components: Vec<Hop>,
    /// Per flow: lost, components (range into `members`), the path it belongs to.
    flows: Vec<(bool, u32, u32, u32)>,
    members: Vec<u32>,
    by_component: Vec<Vec<u32>>,
}

impl FlowEvidence {
    /// Flows of the paths of `rows`; `None` without any trace.
    pub fn new(paths: &PathEvidence<'_>, rows: &[u32], traces: &dyn PathTraces) -> Option<Self> {
        // Hop names are interned by the trace book: their addresses identify them.
        let mut index: Map<(usize, usize), u32> = Map::default();
        let mut components = Vec::new();
        let mut flows = Vec::new();
        let mut members = Vec::new();
        for &row in rows {
            let p = paths.path(row);
            let Some(trace) = traces.path(&p.source_endpoint, &p.target_endpoint) else {
                continue;
            };
            let mut probed = p.probed_flows_mask;
            while probed != 0 {
                let flow = probed.trailing_zeros();
                probed &= probed - 1;
                let Some(hops) = trace.hops(flow as u16) else {
                    continue;
                };
                let back = trace.return_hops(flow as u16);
                let lost = p.lost_flows_mask & (1 << flow) != 0;
                let first = members.len() as u32;
                // A switch is keyed (its address, 0), a link (from, to).
                let addr = |h: &Arc<str>| Arc::as_ptr(h).cast::<u8>() as usize;
                let mut add = |key: (usize, usize), hop: &dyn Fn() -> Hop| {
                    let next = components.len() as u32;
                    let c = *index.entry(key).or_insert_with(|| {
                        components.push(hop());
                        next
                    });
                    members.push(c);
                };
                for way in std::iter::once(hops).chain(back) {
                    for pair in way.windows(2) {
                        add((addr(&pair[0]), addr(&pair[1])), &|| {
                            Hop::Link(pair[0].clone(), pair[1].clone())
                        });
                    }
                    if way.len() > 2 {
                        for hop in &way[1..way.len() - 1] {
                            add((addr(hop), 0), &|| Hop::Switch(hop.clone()));
                        }
                    }
                }
                // A switch both ways is one component, not two.
                let mine = &mut members[first as usize..];
                mine.sort_unstable();
                let unique = {
                    let mut n = 0;
                    for i in 0..mine.len() {
                        if i == 0 || mine[i] != mine[i - 1] {
                            mine[n] = mine[i];
                            n += 1;
                        }
                    }
                    n
                };
                members.truncate(first as usize + unique);
                flows.push((lost, first, members.len() as u32, row));
            }
        }
        if flows.is_empty() {
            return None;
        }
        let mut by_component = vec![Vec::new(); components.len()];
        for (i, &(_, a, b, _)) in flows.iter().enumerate() {
            for &c in &members[a as usize..b as usize] {
                by_component[c as usize].push(i as u32);
            }
        }
        Some(Self {
            components,
            flows,
            members,
            by_component,
        })
    }

    /// The path row (of the [`PathEvidence`]) a flow belongs to.
    pub fn row_of(&self, flow: u32) -> u32 {
        self.flows[flow as usize].3
    }
}

impl Evidence for FlowEvidence {
    fn component_count(&self) -> usize {
        self.components.len()
    }

    fn observation_count(&self) -> usize {
        self.flows.len()
    }

    fn counts(&self, o: u32) -> (u64, u64) {
        (1, u64::from(self.flows[o as usize].0))
    }

    fn components_of(&self, o: u32, out: &mut Vec<u32>) {
        let (_, a, b, _) = self.flows[o as usize];
        out.extend(&self.members[a as usize..b as usize]);
    }

    fn observations_of(&self, c: u32, out: &mut Vec<u32>) {
        out.extend(&self.by_component[c as usize]);
    }

    fn blamable(&self, _: u32) -> bool {
        true
    }
}
