//! Which flows to trace, and what the traces found.
//!
//! After each window the planner looks at the probed flows of every path
//! (`probed_flows_mask` / `lost_flows_mask`): failing flows are traced at
//! once (again when their trace is older than `failingRefreshSecs`, since a
//! route change may be why they fail), and a rotating sample of healthy flows
//! (refreshed after `healthyRefreshSecs`), because tomography needs healthy
//! flows to exonerate the links they cross. A forward trace runs on the
//! prober's agent; once it reports the source port it used, the responder's
//! agent traces the way the ACKs come back. Requests wait in a per-node queue
//! and go out when the agent calls `ExchangeTraces`.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::net::IpAddr;
use std::sync::Arc;

use pingmesh_proto::v1::{TraceRequest, TraceResult};
use prometheus::{IntCounterVec, IntGauge, Opts, Registry};
use serde::{Deserialize, Serialize};

use super::hop_names::{HopNames, HopNamesError};
use crate::mesh::analyzer::PathStats;
use crate::mesh::localize::TraceBook;
use crate::mesh::types::MeshEndpoint;

/// A request not answered in this long is forgotten (and may be asked again).
const REQUEST_TIMEOUT_MS: u64 = 30_000;
/// A node whose agent cannot trace (no privilege, not Linux) is left alone this long.
const UNTRACEABLE_BACKOFF_MS: u64 = 600_000;
/// Requests waiting per node at most.
const QUEUE_LIMIT: usize = 1_024;
/// State of departed endpoints is dropped every this many windows (a pass
/// over every flow record, so not every window).
pub(super) const PRUNE_EVERY_WINDOWS: u32 = 12;
/// Hops a result may carry at most.
const MAX_RESULT_HOPS: usize = 64;

/// `traces` in the controller configuration.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields, default)]
pub struct TraceSettings {
    /// Ask agents for path traces (they need `CAP_NET_RAW`).
    pub enabled: bool,
    /// A failing flow is traced again after this long.
    pub failing_refresh_secs: u64,
    /// A healthy flow is traced again after this long.
    pub healthy_refresh_secs: u64,
    /// Failing flows asked for per window, mesh-wide.
    pub failing_per_window: u32,
    /// Healthy flows asked for per window, mesh-wide.
    pub healthy_per_window: u32,
    /// Requests handed to one agent per call.
    pub per_exchange: u32,
    /// Highest TTL agents try.
    pub max_hops: u32,
    /// Traced flows kept at most; beyond it no new healthy flow is traced.
    pub max_traced_flows: u32,
    /// Switch name -> its interface addresses: folds the addresses traces
    /// learn into switch names (see docs/localization.md).
    pub switches: BTreeMap<String, Vec<IpAddr>>,
}

impl Default for TraceSettings {
    fn default() -> Self {
        Self {
            enabled: true,
            failing_refresh_secs: 30,
            healthy_refresh_secs: 600,
            failing_per_window: 256,
            healthy_per_window: 128,
            per_exchange: 32,
            max_hops: 16,
            max_traced_flows: 200_000,
            switches: BTreeMap::new(),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Way {
    Forward,
    Return,
}

/// One flow: (source endpoint, target endpoint, flow index).
type FlowKey = (String, String, u16);

#[derive(Debug, Default, Clone, Copy)]
/// Unix milliseconds; 0: never.
struct FlowRecord {
    /// When its forward trace came in.
    traced_there: u64,
    /// When the trace of its ACKs' way back came in.
    traced_back: u64,
    /// When a trace of it was asked for (0: nothing outstanding).
    asked: u64,
    /// The source port and flow label its forward trace reported, which the
    /// trace of the way back needs.
    source_port: u16,
    flow_label: u32,
}

#[derive(Debug)]
struct Asked {
    node: String,
    key: FlowKey,
    way: Way,
    at_ms: u64,
}

/// Counters of what came back.
#[derive(Debug, Clone)]
struct TraceMetrics {
    results: IntCounterVec,
    traced_flows: IntGauge,
    traced_both_ways: IntGauge,
}

impl TraceMetrics {
    fn new(registry: Option<&Registry>) -> Result<Self, prometheus::Error> {
        let results = IntCounterVec::new(
            Opts::new(
                "pingmesh_path_trace_results_total",
                "Path-trace results from agents: ok, incomplete (ends not at the endpoints' ToRs or no hop), error (the agent could not trace), rejected (not asked of that agent, malformed), expired (never answered).",
            ),
            &["result"],
        )?;
        let traced_flows = IntGauge::new(
            "pingmesh_traced_flows",
            "Flows whose hops the controller knows from path traces.",
        )?;
        let traced_both_ways = IntGauge::new(
            "pingmesh_traced_flows_both_ways",
            "Flows whose hops the controller knows both ways (the probes' and the ACKs').",
        )?;
        if let Some(r) = registry {
            r.register(Box::new(results.clone()))?;
            r.register(Box::new(traced_flows.clone()))?;
            r.register(Box::new(traced_both_ways.clone()))?;
        }
        Ok(Self {
            results,
            traced_flows,
            traced_both_ways,
        })
    }

    fn count(&self, result: &str) {
        self.results.with_label_values(&[result]).inc();
    }
}

/// What a window says about one path's flows.
#[derive(Debug, Clone, Copy)]
pub struct ProbedPath<'a> {
    pub source: &'a str,
    pub target: &'a str,
    /// Bit i: flow i was probed.
    pub probed_flows: u64,
    /// Bit i: a probe on flow i was lost.
    pub lost_flows: u64,
}

impl<'a> From<&'a PathStats> for ProbedPath<'a> {
    fn from(p: &'a PathStats) -> Self {
        Self {
            source: &p.source_endpoint,
            target: &p.target_endpoint,
            probed_flows: p.probed_flows_mask,
            lost_flows: p.lost_flows_mask,
        }
    }
}

/// Plans traces and keeps what they found.
#[derive(Debug)]
pub struct TracePlanner {
    settings: TraceSettings,
    names: HopNames,
    book: Arc<TraceBook>,
    flows: HashMap<FlowKey, FlowRecord>,
    queues: HashMap<String, VecDeque<(TraceRequest, Asked)>>,
    asked: HashMap<u64, Asked>,
    /// Node -> until when it is not asked (its agent cannot trace).
    untraceable: HashMap<String, u64>,
    next_id: u64,
    /// Where the healthy sample starts next window, so every flow gets its turn.
    healthy_cursor: usize,
    /// Windows planned since state of departed endpoints was last dropped.
    windows_since_pruned: u32,
    metrics: TraceMetrics,
}

/// The traced hops of one result, named, or why they cannot be used.
enum Hops {
    Usable(Vec<Arc<str>>),
    Incomplete,
    Malformed,
}

impl TracePlanner {
    /// A planner; its counters go to `registry` when one is given.
    pub fn new(settings: TraceSettings, registry: Option<&Registry>) -> Result<Self, PlannerError> {
        let names = HopNames::new(&settings.switches)?;
        Ok(Self {
            settings,
            names,
            book: Arc::default(),
            flows: HashMap::new(),
            queues: HashMap::new(),
            asked: HashMap::new(),
            untraceable: HashMap::new(),
            next_id: 1,
            healthy_cursor: 0,
            windows_since_pruned: 0,
            metrics: TraceMetrics::new(registry)?,
        })
    }

    /// The traces known now, for the analyzer.
    pub fn book(&self) -> Arc<TraceBook> {
        Arc::clone(&self.book)
    }

    /// Requests waiting for `node`'s agent.
    pub fn waiting(&self, node: &str) -> usize {
        self.queues.get(node).map_or(0, VecDeque::len)
    }

    /// Picks the flows of a closed window's paths to trace.
    pub fn plan<'a>(
        &mut self,
        paths: impl IntoIterator<Item = ProbedPath<'a>>,
        endpoints: &HashMap<String, MeshEndpoint>,
        now_ms: u64,
    ) {
        if !self.settings.enabled {
            return;
        }
        self.expire(now_ms);
        self.windows_since_pruned += 1;
        if self.windows_since_pruned >= PRUNE_EVERY_WINDOWS {
            self.forget_departed(endpoints);
        }
        let failing_refresh = self.settings.failing_refresh_secs.saturating_mul(1_000);
        let healthy_refresh = self.settings.healthy_refresh_secs.saturating_mul(1_000);
        let mut failing_budget = self.settings.failing_per_window;
        let mut healthy = Vec::new();
        let mut backs = Vec::new();
        for p in paths {
            let (Some(source), Some(target)) = (endpoints.get(p.source), endpoints.get(p.target))
            else {
                continue;
            };
            if self
                .untraceable
                .get(&source.node)
                .is_some_and(|&t| t > now_ms)
            {
                continue;
            }
            let mut probed = p.probed_flows;
            while probed != 0 {
                let bit = probed.trailing_zeros();
                probed &= probed - 1;
                let flow = u16::try_from(bit).unwrap_or(0);
                let key = (source.id.clone(), target.id.clone(), flow);
                let record = self.flows.get(&key).copied().unwrap_or_default();
                if record.asked != 0 {
                    continue; // a trace of it is on its way
                }
                let failing = p.lost_flows & (1 << bit) != 0;
                // Traced there, but the way back is missing or older (its
                // trace was lost or cut short): ask for it again.
                let needs_back = record.traced_there != 0
                    && record.traced_back < record.traced_there
                    && record.source_port != 0;
                if failing {
                    let stale = record.traced_there == 0
                        || now_ms.saturating_sub(record.traced_there) >= failing_refresh;
                    if (stale || needs_back) && failing_budget > 0 {
                        failing_budget -= 1;
                        if stale {
                            self.ask_forward(source, target, key, now_ms);
                        } else {
                            self.ask_return(&key, record, endpoints, now_ms);
                        }
                    }
                } else if record.traced_there == 0
                    || now_ms.saturating_sub(record.traced_there) >= healthy_refresh
                {
                    healthy.push((key, record.traced_there == 0));
                } else if needs_back {
                    backs.push(key);
                }
            }
        }
        // Healthy flows' missing ways back share the healthy budget, first.
        let budget = usize::try_from(self.settings.healthy_per_window).unwrap_or(usize::MAX);
        let backs_asked = backs.len().min(budget);
        for key in backs.into_iter().take(budget) {
            let record = self.flows.get(&key).copied().unwrap_or_default();
            self.ask_return(&key, record, endpoints, now_ms);
        }
        self.sample_healthy(healthy, budget - backs_asked, endpoints, now_ms);
    }

    fn sample_healthy(
        &mut self,
        mut candidates: Vec<(FlowKey, bool)>,
        take: usize,
        endpoints: &HashMap<String, MeshEndpoint>,
        now_ms: u64,
    ) {
        if candidates.is_empty() {
            return;
        }
        // Paths come in a stable order; rotating the start gives every flow a turn.
        let start = self.healthy_cursor % candidates.len();
        candidates.rotate_left(start);
        self.healthy_cursor = self.healthy_cursor.wrapping_add(take);
        let room = usize::try_from(self.settings.max_traced_flows).unwrap_or(usize::MAX);
        for (key, new) in candidates.into_iter().take(take) {
            if new && self.flows.len() >= room {
                continue;
            }
            let (Some(source), Some(target)) = (endpoints.get(&key.0), endpoints.get(&key.1))
            else {
                continue;
            };
            self.ask_forward(source, target, key, now_ms);
        }
    }

    fn ask_forward(
        &mut self,
        source: &MeshEndpoint,
        target: &MeshEndpoint,
        key: FlowKey,
        now_ms: u64,
    ) {
        let request = TraceRequest {
            source_endpoint: source.id.clone(),
            target: Some(target.to_proto()),
            flow: u32::from(key.2),
            max_hops: self.settings.max_hops,
            ..TraceRequest::default()
        };
        self.enqueue(&source.node, request, key, Way::Forward, now_ms);
    }

    fn enqueue(
        &mut self,
        node: &str,
        mut request: TraceRequest,
        key: FlowKey,
        way: Way,
        now_ms: u64,
    ) {
        let queue = self.queues.entry(node.to_owned()).or_default();
        if queue.len() >= QUEUE_LIMIT {
            return;
        }
        request.id = self.next_id;
        self.next_id += 1;
        self.flows.entry(key.clone()).or_default().asked = now_ms;
        queue.push_back((
            request,
            Asked {
                node: node.to_owned(),
                key,
                way,
                at_ms: now_ms,
            },
        ));
    }

    /// Takes `node`'s results and hands out its next requests.
    pub fn exchange(
        &mut self,
        node: &str,
        results: Vec<TraceResult>,
        endpoints: &HashMap<String, MeshEndpoint>,
        now_ms: u64,
    ) -> Vec<TraceRequest> {
        for result in results {
            self.take_result(node, &result, endpoints, now_ms);
        }
        self.show_book_size();
        let Some(queue) = self.queues.get_mut(node) else {
            return Vec::new();
        };
        let n = queue
            .len()
            .min(usize::try_from(self.settings.per_exchange).unwrap_or(usize::MAX));
        let mut out = Vec::with_capacity(n);
        for (request, mut asked) in queue.drain(..n) {
            asked.at_ms = now_ms;
            self.asked.insert(request.id, asked);
            out.push(request);
        }
        out
    }

    fn take_result(
        &mut self,
        node: &str,
        result: &TraceResult,
        endpoints: &HashMap<String, MeshEndpoint>,
        now_ms: u64,
    ) {
        // Only the agent a request went to may answer it.
        if self.asked.get(&result.id).is_none_or(|a| a.node != node) {
            self.metrics.count("rejected");
            return;
        }
        let Some(asked) = self.asked.remove(&result.id) else {
            return;
        };
        let record = self.flows.entry(asked.key.clone()).or_default();
        record.asked = 0;
        if !result.error.is_empty() {
            self.metrics.count("error");
            if result.error.starts_with("no_privilege") || result.error.starts_with("unsupported") {
                self.untraceable
                    .insert(node.to_owned(), now_ms + UNTRACEABLE_BACKOFF_MS);
                self.queues.remove(node);
            }
            return;
        }
        let (source, target, flow) = &asked.key;
        let (from, to) = match asked.way {
            Way::Forward => (source, target),
            Way::Return => (target, source),
        };
        let hops = self.named_hops(result, endpoints.get(from), endpoints.get(to));
        let hops = match hops {
            Hops::Usable(h) => h,
            Hops::Incomplete => return self.metrics.count("incomplete"),
            Hops::Malformed => return self.metrics.count("rejected"),
        };
        self.metrics.count("ok");
        let book = Arc::make_mut(&mut self.book);
        match asked.way {
            Way::Forward => {
                book.insert(source, target, *flow, hops);
                let mut record = FlowRecord::default();
                if let Some(r) = self.flows.get_mut(&asked.key) {
                    r.traced_there = now_ms;
                    r.source_port = u16::try_from(result.source_port).unwrap_or(0);
                    r.flow_label = result.flow_label;
                    record = *r;
                }
                self.ask_return(&asked.key, record, endpoints, now_ms);
            }
            Way::Return => {
                book.insert_return(source, target, *flow, hops);
                if let Some(r) = self.flows.get_mut(&asked.key) {
                    r.traced_back = now_ms;
                }
            }
        }
    }

    /// After a forward trace: the ACKs' way back, from the responder's agent.
    fn ask_return(
        &mut self,
        key: &FlowKey,
        forward: FlowRecord,
        endpoints: &HashMap<String, MeshEndpoint>,
        now_ms: u64,
    ) {
        let (Some(source), Some(target)) = (endpoints.get(&key.0), endpoints.get(&key.1)) else {
            return;
        };
        if forward.source_port == 0 {
            return;
        }
        if self
            .untraceable
            .get(&target.node)
            .is_some_and(|&t| t > now_ms)
        {
            return;
        }
        let request = TraceRequest {
            source_endpoint: target.id.clone(),
            prober: Some(source.to_proto()),
            prober_port: u32::from(forward.source_port),
            prober_flow_label: forward.flow_label,
            max_hops: self.settings.max_hops,
            ..TraceRequest::default()
        };
        self.enqueue(&target.node, request, key.clone(), Way::Return, now_ms);
    }

    /// The result's hops as switch names. With a switch map, a trace must
    /// run from the sender's ToR to the receiver's (a trace cut short by a
    /// lost answer would otherwise blame the wrong links).
    fn named_hops(
        &self,
        result: &TraceResult,
        from: Option<&MeshEndpoint>,
        to: Option<&MeshEndpoint>,
    ) -> Hops {
        if result.hops.len() > MAX_RESULT_HOPS {
            return Hops::Malformed;
        }
        let mut named = Vec::with_capacity(result.hops.len());
        for hop in &result.hops {
            let Ok(address) = hop.parse::<IpAddr>() else {
                return Hops::Malformed;
            };
            named.push(Arc::<str>::from(self.names.name(address)));
        }
        let (Some(first), Some(last)) = (named.first(), named.last()) else {
            return Hops::Incomplete;
        };
        if !self.names.is_empty() {
            let ends_at_tors =
                from.is_some_and(|f| **first == *f.tor) && to.is_some_and(|t| **last == *t.tor);
            if !ends_at_tors {
                return Hops::Incomplete;
            }
        }
        Hops::Usable(named)
    }

    /// Forgets requests nobody answered, so their flows can be asked again.
    /// Drops what is kept for endpoints and nodes no longer in the mesh:
    /// their flows' records, queued requests and traces. Without this a
    /// churning fleet grows the planner by every agent that ever came.
    pub fn forget_departed(&mut self, endpoints: &HashMap<String, MeshEndpoint>) {
        self.windows_since_pruned = 0;
        let known = |id: &str| endpoints.contains_key(id);
        self.flows
            .retain(|(source, target, _), _| known(source) && known(target));
        let nodes: std::collections::HashSet<&str> =
            endpoints.values().map(|e| e.node.as_str()).collect();
        self.queues.retain(|node, _| nodes.contains(node.as_str()));
        self.untraceable
            .retain(|node, _| nodes.contains(node.as_str()));
        if self.book.paths_of_departed(known) {
            Arc::make_mut(&mut self.book).retain_endpoints(known);
        }
        self.show_book_size();
    }

    /// The traced-flow gauges, after the book changed.
    fn show_book_size(&self) {
        let gauge = |n: usize| i64::try_from(n).unwrap_or(i64::MAX);
        self.metrics.traced_flows.set(gauge(self.book.len()));
        self.metrics
            .traced_both_ways
            .set(gauge(self.book.both_ways()));
    }

    /// Flow records kept (tests: that pruning empties them).
    #[cfg(test)]
    pub(super) fn flow_records(&self) -> usize {
        self.flows.len()
    }

    fn expire(&mut self, now_ms: u64) {
        let before = self.asked.len();
        let flows = &mut self.flows;
        self.asked.retain(|_, a| {
            let keep = now_ms.saturating_sub(a.at_ms) < REQUEST_TIMEOUT_MS;
            if !keep && let Some(r) = flows.get_mut(&a.key) {
                r.asked = 0;
            }
            keep
        });
        let expired = before - self.asked.len();
        if expired > 0 {
            self.metrics
                .results
                .with_label_values(&["expired"])
                .inc_by(expired as u64);
        }
        self.untraceable.retain(|_, until| *until > now_ms);
    }
}

/// Why the planner cannot start.
#[derive(Debug, thiserror::Error)]
pub enum PlannerError {
    #[error("traces.switches: {0}")]
    Switches(#[from] HopNamesError),
    #[error("path-trace metrics: {0}")]
    Metrics(#[from] prometheus::Error),
}
