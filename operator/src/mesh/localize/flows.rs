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

use super::engine::{Evidence, Tally};
use super::paths::PathEvidence;

/// The traced flows of every path, by (source endpoint, target endpoint).
pub trait PathTraces: Send + Sync + std::fmt::Debug {
    /// What is known of the flows of one path.
    fn path(&self, source: &str, target: &str) -> Option<&PathTrace> {
        self.paths_from(source)?.to(target)
    }

    /// Every traced path from `source`.
    fn paths_from(&self, source: &str) -> Option<&SourceTraces>;

    /// The link or switch a [`PathTrace::components`] id stands for.
    fn component(&self, id: u32) -> Option<&Hop>;

    /// Component ids are below this.
    fn component_count(&self) -> usize;
}

type Map<K, V> = HashMap<K, V, foldhash::fast::RandomState>;

/// One traced flow: the routers it crosses in order (named: a switch map
/// turns addresses into switch names before they get here), the routers its
/// ACKs cross on the way back (from the target's side), and the components
/// (links and switches, as book-wide ids) of both ways, sorted, once each.
#[derive(Debug, Default, Clone)]
struct FlowTrace {
    there: Option<Vec<Arc<str>>>,
    back: Option<Vec<Arc<str>>>,
    components: Box<[u32]>,
}

/// The traced flows of one path, sorted by flow: a path has a few dozen
/// flows at most, and a sorted vector finds one faster than a map (and
/// keeps it in one allocation beside the others).
#[derive(Debug, Default, Clone)]
pub struct PathTrace {
    flows: Vec<(u16, FlowTrace)>,
}

impl PathTrace {
    fn get(&self, flow: u16) -> Option<&FlowTrace> {
        let at = self.flows.binary_search_by_key(&flow, |(f, _)| *f).ok()?;
        Some(&self.flows[at].1)
    }

    fn put(&mut self, flow: u16, trace: FlowTrace) {
        match self.flows.binary_search_by_key(&flow, |(f, _)| *f) {
            Ok(at) => self.flows[at].1 = trace,
            Err(at) => self.flows.insert(at, (flow, trace)),
        }
    }

    pub fn hops(&self, flow: u16) -> Option<&[Arc<str>]> {
        self.get(flow)?.there.as_deref()
    }

    pub fn return_hops(&self, flow: u16) -> Option<&[Arc<str>]> {
        self.get(flow)?.back.as_deref()
    }

    /// The links and switches a flow and its ACKs cross (ids of the book's
    /// components); `None` when its way there is not traced.
    pub fn components(&self, flow: u16) -> Option<&[u32]> {
        let f = self.get(flow)?;
        f.there.as_ref()?;
        Some(&f.components)
    }
}

/// The traced paths from one source endpoint, by target.
#[derive(Debug, Default, Clone)]
pub struct SourceTraces(Map<Box<str>, PathTrace>);

impl SourceTraces {
    pub fn to(&self, target: &str) -> Option<&PathTrace> {
        self.0.get(target)
    }
}

/// A component of the flow level.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Hop {
    /// Directed link between two hops.
    Link(Arc<str>, Arc<str>),
    /// A switch inside a path (not its first or last hop).
    Switch(Arc<str>),
}

/// Traces by source endpoint, target endpoint and flow. Hop names are
/// interned (equal names share one allocation), and so are the links and
/// switches between them: each gets a book-wide id when first traced, so
/// localization reads a flow's components without hashing a name.
#[derive(Debug, Default, Clone)]
pub struct TraceBook {
    paths: Map<Box<str>, SourceTraces>,
    names: std::collections::HashSet<Arc<str>, foldhash::fast::RandomState>,
    components: Vec<Hop>,
    component_ids: Map<Hop, u32>,
    len: usize,
    both_ways: usize,
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

    fn component_id(&mut self, hop: Hop) -> u32 {
        if let Some(&id) = self.component_ids.get(&hop) {
            return id;
        }
        let id = u32::try_from(self.components.len()).unwrap_or(u32::MAX);
        self.components.push(hop.clone());
        self.component_ids.insert(hop, id);
        id
    }

    /// The links between consecutive hops of both ways and the switches
    /// inside them, once each (a switch crossed both ways is one component).
    fn components_of(
        &mut self,
        there: Option<&[Arc<str>]>,
        back: Option<&[Arc<str>]>,
    ) -> Box<[u32]> {
        let mut ids = Vec::new();
        for way in there.into_iter().chain(back) {
            for pair in way.windows(2) {
                ids.push(self.component_id(Hop::Link(pair[0].clone(), pair[1].clone())));
            }
            if way.len() > 2 {
                for hop in &way[1..way.len() - 1] {
                    ids.push(self.component_id(Hop::Switch(hop.clone())));
                }
            }
        }
        ids.sort_unstable();
        ids.dedup();
        ids.into_boxed_slice()
    }

    fn set(
        &mut self,
        source: &str,
        target: &str,
        flow: u16,
        there: Option<Vec<Arc<str>>>,
        back: Option<Vec<Arc<str>>>,
    ) {
        let known = self
            .paths
            .get(source)
            .and_then(|s| s.0.get(target))
            .and_then(|p| p.get(flow))
            .cloned();
        let is_new = known.is_none();
        let known = known.unwrap_or_default();
        let was_both = known.there.is_some() && known.back.is_some();
        let there = there.map(|h| self.intern(h)).or(known.there);
        let back = back.map(|h| self.intern(h)).or(known.back);
        let components = self.components_of(there.as_deref(), back.as_deref());
        if !was_both && there.is_some() && back.is_some() {
            self.both_ways += 1;
        }
        self.paths
            .entry(source.into())
            .or_default()
            .0
            .entry(target.into())
            .or_default()
            .put(
                flow,
                FlowTrace {
                    there,
                    back,
                    components,
                },
            );
        if is_new {
            self.len += 1;
        }
    }

    /// The hops of a flow from `source` to `target`.
    pub fn insert(&mut self, source: &str, target: &str, flow: u16, hops: Vec<Arc<str>>) {
        self.set(source, target, flow, Some(hops), None);
    }

    /// The hops its ACKs take back, from `target` to `source`.
    pub fn insert_return(&mut self, source: &str, target: &str, flow: u16, hops: Vec<Arc<str>>) {
        self.set(source, target, flow, None, Some(hops));
    }

    /// Takes in every trace of `other` (newer ones win).
    pub fn merge(&mut self, other: TraceBook) {
        for (source, targets) in other.paths {
            for (target, trace) in targets.0 {
                for (flow, f) in trace.flows {
                    self.set(&source, &target, flow, f.there, f.back);
                }
            }
        }
    }

    /// Whether any traced path has an end `keep` refuses (so the book, shared
    /// with judgements in flight, is copied only when something goes).
    pub fn paths_of_departed(&self, keep: impl Fn(&str) -> bool) -> bool {
        self.paths
            .iter()
            .any(|(source, targets)| !keep(source) || targets.0.keys().any(|t| !keep(t)))
    }

    /// Drops the traces of paths with an end `keep` refuses (endpoints that
    /// left the mesh), so a fleet's churn does not pile up traces of the
    /// departed. Hop names and component ids stay: they are bounded by the
    /// fabric, and localization's horizon may still hold those ids.
    pub fn retain_endpoints(&mut self, keep: impl Fn(&str) -> bool) {
        let (mut len, mut both_ways) = (0, 0);
        self.paths.retain(|source, targets| {
            if !keep(source) {
                return false;
            }
            targets.0.retain(|target, _| keep(target));
            for trace in targets.0.values() {
                for (_, f) in &trace.flows {
                    len += 1;
                    both_ways += usize::from(f.there.is_some() && f.back.is_some());
                }
            }
            !targets.0.is_empty()
        });
        self.len = len;
        self.both_ways = both_ways;
    }

    /// Keeps the traced flows `keep` accepts, by (source, target, flow).
    pub fn retain_flows(&mut self, mut keep: impl FnMut(&str, &str, u16) -> bool) {
        let (mut len, mut both_ways) = (0, 0);
        self.paths.retain(|source, targets| {
            targets.0.retain(|target, trace| {
                trace.flows.retain(|(flow, f)| {
                    let kept = keep(source, target, *flow);
                    if kept {
                        len += 1;
                        both_ways += usize::from(f.there.is_some() && f.back.is_some());
                    }
                    kept
                });
                !trace.flows.is_empty()
            });
            !targets.0.is_empty()
        });
        self.len = len;
        self.both_ways = both_ways;
    }

    /// Traced flows.
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Traced flows whose way back is traced too.
    pub fn both_ways(&self) -> usize {
        self.both_ways
    }
}

impl PathTraces for TraceBook {
    fn paths_from(&self, source: &str) -> Option<&SourceTraces> {
        self.paths.get(source)
    }

    fn component(&self, id: u32) -> Option<&Hop> {
        self.components.get(usize::try_from(id).ok()?)
    }

    fn component_count(&self) -> usize {
        self.components.len()
    }
}

/// Probed flows of the given paths with their traced hops.
#[derive(Debug)]
pub(super) struct FlowEvidence {
    pub components: Vec<Hop>,
    /// Per flow: lost, components (range into `members`), the path it belongs to.
    flows: Vec<(bool, u32, u32, u32)>,
    members: Vec<u32>,
    /// Flows of component c: `by_component[offsets[c]..offsets[c + 1]]`.
    offsets: Vec<u32>,
    by_component: Vec<u32>,
}

impl FlowEvidence {
    /// Flows of the paths of `rows`; `None` without any trace.
    pub fn new(paths: &PathEvidence<'_>, rows: &[u32], traces: &dyn PathTraces) -> Option<Self> {
        // Book component id -> this evidence's component index (u32::MAX: not yet).
        let mut local = vec![u32::MAX; traces.component_count()];
        let mut components = Vec::new();
        // A traced inter-ToR path has a few probed flows of a few components each.
        let mut flows = Vec::with_capacity(rows.len() * 4);
        let mut members = Vec::with_capacity(rows.len() * 24);
        // One name lookup per source endpoint, not per path (by interned
        // index: None not looked up yet).
        let mut sources: Vec<Option<Option<&SourceTraces>>> = vec![None; paths.endpoints.len()];
        for &row in rows {
            let p = paths.path(row);
            let (s, t) = paths.ends(row);
            let Some(slot) = sources.get_mut(s as usize) else {
                continue;
            };
            let from = *slot.get_or_insert_with(|| traces.paths_from(paths.endpoints[s as usize]));
            let Some(trace) = from.and_then(|f| f.to(paths.endpoints[t as usize])) else {
                continue;
            };
            let mut probed = p.probed_flows_mask;
            while probed != 0 {
                let flow = probed.trailing_zeros();
                probed &= probed - 1;
                let Some(ids) = trace.components(flow as u16) else {
                    continue;
                };
                let lost = p.lost_flows_mask & (1 << flow) != 0;
                let first = members.len() as u32;
                for &id in ids {
                    let Some(slot) = local.get_mut(id as usize) else {
                        continue;
                    };
                    if *slot == u32::MAX {
                        let Some(hop) = traces.component(id) else {
                            continue;
                        };
                        *slot = components.len() as u32;
                        components.push(hop.clone());
                    }
                    members.push(*slot);
                }
                flows.push((lost, first, members.len() as u32, row));
            }
        }
        if flows.is_empty() {
            return None;
        }
        // Flows by component, as one array cut at offsets (one allocation,
        // not one per component).
        let mut offsets = vec![0u32; components.len() + 1];
        for &c in &members {
            offsets[c as usize + 1] += 1;
        }
        for i in 1..offsets.len() {
            offsets[i] += offsets[i - 1];
        }
        let mut fill = offsets.clone();
        let mut by_component = vec![0u32; members.len()];
        for (i, &(_, a, b, _)) in flows.iter().enumerate() {
            for &c in &members[a as usize..b as usize] {
                let at = &mut fill[c as usize];
                by_component[*at as usize] = i as u32;
                *at += 1;
            }
        }
        Some(Self {
            components,
            flows,
            members,
            offsets,
            by_component,
        })
    }

    /// The path row (of the [`PathEvidence`]) a flow belongs to.
    pub fn row_of(&self, flow: u32) -> u32 {
        self.flows[flow as usize].3
    }

    pub fn flow_count(&self) -> u32 {
        self.flows.len() as u32
    }

    /// Whether a flow failed, its components (indices into `components`)
    /// and its path row.
    pub fn flow(&self, flow: u32) -> (bool, &[u32], u32) {
        let (lost, a, b, row) = self.flows[flow as usize];
        (lost, &self.members[a as usize..b as usize], row)
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
        let (a, b) = (self.offsets[c as usize], self.offsets[c as usize + 1]);
        out.extend(&self.by_component[a as usize..b as usize]);
    }

    fn blamable(&self, _: u32) -> bool {
        true
    }

    fn initial_tallies(&self, failing: &dyn Fn(u64, u64) -> bool) -> Option<Vec<Tally>> {
        // Every flow is one probe: one of two tallies, added to its members.
        let one = |lost: u64| Tally {
            probes: 1,
            lost,
            observations: 1,
            failing: u64::from(failing(1, lost)),
        };
        let (healthy, lost) = (one(0), one(1));
        let mut tallies = vec![Tally::default(); self.components.len()];
        for &(failed, a, b, _) in &self.flows {
            let flow = if failed { &lost } else { &healthy };
            for &c in &self.members[a as usize..b as usize] {
                tallies[c as usize].add(flow);
            }
        }
        Some(tallies)
    }
}
