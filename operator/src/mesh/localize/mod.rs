//! Fault localization: from one closed window's path results, name the
//! component that explains the failing paths (an RNIC or UDP endpoint, a
//! host, a ToR, a link, a switch), as R-Pingmesh intends.
//!
//! Three levels, each run by the same search ([`engine`]):
//! 1. Paths ([`paths`]): every judged path votes, ToR mesh and inter-ToR
//!    together. A broken endpoint fails with peers that are fine with each
//!    other and with the rest of the fabric; a broken ToR fails all its paths,
//!    inside and out; a broken downlink fails only inter-ToR paths into its
//!    ToR; a broken spine fails inter-ToR paths everywhere while every ToR mesh
//!    stays clean.
//! 2. Flows ([`flows`]): where traces tell which hops a flow crossed, the
//!    failing and healthy flows of paths not explained by an endpoint, host or
//!    ToR name the link or switch (tomography with a greedy hitting set).
//!    Without traces, a network fault is named as coarsely as the paths allow:
//!    "the links into ToR X", "the spine layer".
//! 3. Host delay ([`host_delay`]): prober and responder delays far above the
//!    fleet's are host problems, never network ones.
//!
//! Loss and latency are localized separately (latency on judged paths only).
//! [`CauseTracker`] adds the SLA's hysteresis.

// Observations and components are u32 indices to halve the memory of the
// largest windows: at most MAX_PATHS_PER_WINDOW (8 M) paths times
// LOCALIZE_WINDOWS (3) rows, and 64 flows a path, stay far below 2^32; flow
// numbers are below 64.
#![allow(clippy::cast_possible_truncation)]

mod engine;
mod flows;
mod horizon;
mod host_delay;
mod paths;
mod rows;
pub mod sim;
mod tracker;

#[cfg(test)]
mod tests;

use serde::{Deserialize, Serialize};

pub use flows::{Hop, PathTraces, SourceTraces, TraceBook};
pub use horizon::{HORIZON_WINDOWS, NetworkHorizon};
pub use host_delay::HostDelayRules;
pub use rows::{EndpointTable, PathRow, rows_of};
pub use tracker::{CauseTracker, CauseTransitions, OpenRootCause};

use engine::{Pick, Rules, explain};
use flows::FlowEvidence;
use horizon::HorizonPick;
use paths::{Component, PathEvidence, PathSignal};

use super::analyzer::{Finding, FindingKind, PathStats};

/// What kind of component a root cause names.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum CauseKind {
    /// One RNIC or UDP endpoint of a node with several.
    Endpoint,
    /// Every endpoint of a node (or a node's only one).
    Host,
    Tor,
    /// A directed link, or the links between a ToR and the spine layer.
    Link,
    /// A spine or aggregation switch, or the spine layer as a whole.
    Switch,
    /// Evidence that fits no single component well. Reserved: not produced
    /// yet (ties are reported as `candidates` of the best cause instead).
    Unknown,
}

impl CauseKind {
    pub const ALL: [Self; 6] = [
        Self::Endpoint,
        Self::Host,
        Self::Tor,
        Self::Link,
        Self::Switch,
        Self::Unknown,
    ];

    /// Bounded label for metrics and Event reasons.
    pub fn label(self) -> &'static str {
        match self {
            Self::Endpoint => "endpoint",
            Self::Host => "host",
            Self::Tor => "tor",
            Self::Link => "link",
            Self::Switch => "switch",
            Self::Unknown => "unknown",
        }
    }
}

/// Which side of the probes an endpoint or host fails on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum Side {
    /// Its probes fail (it cannot send, or cannot receive ACKs).
    Prober,
    /// Probes to it fail.
    Responder,
    Both,
}

/// What went wrong.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum Signal {
    Loss,
    Latency,
    HostDelay,
}

impl Signal {
    pub fn label(self) -> &'static str {
        match self {
            Self::Loss => "loss",
            Self::Latency => "latency",
            Self::HostDelay => "host_delay",
        }
    }
}

/// The numbers behind a root cause, from the window that localized it.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct CauseEvidence {
    /// Paths (or, for links and switches, flows) through it that failed.
    pub failing: u64,
    /// Paths (flows) through it that did not.
    pub healthy: u64,
    /// `paths` or `flows`.
    pub unit: String,
    /// Probes and losses through it (loss), or judged and slow paths (latency).
    pub probes: u64,
    pub lost: u64,
    pub loss_ratio: f64,
    /// The same ratio over everything else, at the time it was picked.
    pub elsewhere_loss_ratio: f64,
    /// Log-likelihood gain of "this component is broken" (nats).
    pub score: f64,
}

/// A localized fault: the component that explains failing paths.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct RootCause {
    pub kind: CauseKind,
    /// Endpoint id, node name, ToR name, "a -> b" for links, switch name.
    pub component: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub side: Option<Side>,
    pub signal: Signal,
    /// The node at fault, for endpoint and host causes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node: Option<String>,
    /// The ToR involved, where there is one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tor: Option<String>,
    /// 0..1: how cleanly the component separates failing from healthy paths,
    /// how much evidence there is, and whether another component fits as well.
    pub confidence: f64,
    pub evidence: CauseEvidence,
    /// Other components that fit the evidence exactly as well.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub candidates: Vec<String>,
    /// Open SLA findings this cause explains, as "kind location".
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub explains: Vec<String>,
    /// One line for people: what, where, why.
    pub summary: String,
}

/// How eager localization is.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LocalizeSettings {
    /// A component's loss must be above this to blame it (the SLA's).
    pub max_loss_ratio: f64,
    pub host_delay: HostDelayRules,
}

impl LocalizeSettings {
    fn path_rules(&self, signal: PathSignal) -> Rules {
        match signal {
            PathSignal::Loss => Rules {
                min_loss_ratio: self.max_loss_ratio,
                min_lost: 3,
                min_failing: 2,
                min_failing_share: 0.2,
                min_failing_share_diluted: 0.02,
                min_contrast: 1.5,
                min_baseline_contrast: 3.0,
                min_gain: 10.0,
                max_picks: 32,
            },
            // One observation per judged path: most of a component's paths slow.
            PathSignal::Latency => Rules {
                min_loss_ratio: 0.5,
                min_lost: 2,
                min_failing: 2,
                min_failing_share: 0.5,
                min_failing_share_diluted: 0.1,
                min_contrast: 3.0,
                min_baseline_contrast: 3.0,
                min_gain: 4.0,
                max_picks: 32,
            },
        }
    }

    /// One observation per probed flow (lost or not): a switch losing 1 %
    /// of packets marks about as many of its flows, and the greedy search
    /// must see it whole before any of its links (a low bar here lets the
    /// switch, with far more evidence, win over each link's noise).
    fn flow_rules() -> Rules {
        Rules {
            min_loss_ratio: 0.01,
            min_lost: 5,
            min_failing: 5,
            min_failing_share: 0.01,
            min_failing_share_diluted: 0.01,
            min_contrast: 4.0,
            min_baseline_contrast: 4.0,
            min_gain: 10.0,
            max_picks: 32,
        }
    }
}

/// What localization looks at, as callers holding [`PathStats`] have it:
/// the newest closed window and the few before it, so that sparse inter-ToR
/// probes add up to evidence. [`localize`] numbers their endpoints and hands
/// them to [`localize_rows`], which the analyzer calls directly.
#[derive(Clone, Copy)]
pub struct WindowEvidence<'a> {
    /// Path statistics of each window, oldest first.
    pub windows: &'a [&'a [PathStats]],
    /// The node of an endpoint (unknown endpoints count as nodes of their own).
    pub node_of: &'a dyn Fn(&str) -> Option<&'a str>,
    /// Hops of traced flows, when agents traced any.
    pub traces: Option<&'a dyn PathTraces>,
    /// Open SLA findings, to say which ones each cause explains.
    pub findings: &'a [Finding],
    /// Traced flows of earlier windows, for links and switches losing too
    /// little for three windows to show (see [`NetworkHorizon`]). Given, it
    /// takes in the newest window's flows: hand each window in once.
    pub horizon: Option<&'a NetworkHorizon>,
}

impl std::fmt::Debug for WindowEvidence<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WindowEvidence")
            .field("windows", &self.windows.len())
            .field("findings", &self.findings.len())
            .finish_non_exhaustive()
    }
}

/// [`WindowEvidence`] with every endpoint numbered in one table: what the
/// analyzer keeps of its last windows.
#[derive(Clone, Copy)]
pub struct RowEvidence<'a> {
    /// Rows of each window, oldest first.
    pub windows: &'a [&'a [PathRow]],
    /// Names, nodes and ToRs of the rows' endpoint numbers.
    pub table: &'a EndpointTable,
    pub traces: Option<&'a dyn PathTraces>,
    pub findings: &'a [Finding],
    pub horizon: Option<&'a NetworkHorizon>,
}

impl std::fmt::Debug for RowEvidence<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RowEvidence")
            .field("windows", &self.windows.len())
            .field("endpoints", &self.table.len())
            .field("findings", &self.findings.len())
            .finish_non_exhaustive()
    }
}

/// The root causes of one window, most confident first.
pub fn localize(input: &WindowEvidence<'_>, settings: &LocalizeSettings) -> Vec<RootCause> {
    let mut table = EndpointTable::new();
    let rows: Vec<Vec<PathRow>> = input
        .windows
        .iter()
        .map(|paths| rows_of(paths, &mut table, input.node_of))
        .collect();
    let windows: Vec<&[PathRow]> = rows.iter().map(Vec::as_slice).collect();
    localize_rows(
        &RowEvidence {
            windows: &windows,
            table: &table,
            traces: input.traces,
            findings: input.findings,
            horizon: input.horizon,
        },
        settings,
    )
}

/// The root causes of the newest of `input`'s windows, most confident first.
pub fn localize_rows(input: &RowEvidence<'_>, settings: &LocalizeSettings) -> Vec<RootCause> {
    let mut causes = Vec::new();
    for signal in [PathSignal::Loss, PathSignal::Latency] {
        let evidence = PathEvidence::new(input.windows, input.table, signal);
        let picks = explain(&evidence, &settings.path_rules(signal));
        causes.extend(path_causes(&evidence, &picks, input, settings, signal));
        if signal == PathSignal::Loss {
            causes.extend(host_delay_causes(&evidence, settings));
        }
    }
    causes.sort_by(|a, b| {
        b.confidence
            .total_cmp(&a.confidence)
            .then_with(|| a.component.cmp(&b.component))
    });
    causes
}

/// Causes from path-level picks, network ones refined by traced flows.
fn path_causes(
    evidence: &PathEvidence<'_>,
    picks: &[Pick],
    input: &RowEvidence<'_>,
    settings: &LocalizeSettings,
    signal: PathSignal,
) -> Vec<RootCause> {
    let cause_signal = match signal {
        PathSignal::Loss => Signal::Loss,
        PathSignal::Latency => Signal::Latency,
    };
    let mut causes = Vec::new();
    let mut network_picks = Vec::new();
    let mut explained = vec![false; evidence.rows() as usize];
    for pick in picks {
        let component = evidence.component(pick.component);
        if matches!(component, Component::TorLinks(_) | Component::Fabric) {
            network_picks.push(pick);
            continue;
        }
        for &r in &pick.explained {
            explained[r as usize] = true;
        }
        causes.push(path_cause(evidence, pick, component, input, cause_signal));
    }
    // Traced flows of every inter-ToR path no endpoint, host or ToR explains
    // name links and switches, also where ECMP spreads a fault too thin for
    // the path level (one link of 32 uplinks). Loss only: flows carry loss
    // bits, not latencies.
    let refined = match (signal, input.traces) {
        (PathSignal::Loss, Some(traces)) => {
            // With a horizon, only the newest window's flows are new to it
            // (rows are in window order: the newest window's are the last).
            let newest = evidence.window_count().saturating_sub(1);
            let first = if input.horizon.is_some() {
                evidence.first_row_of(newest)
            } else {
                0
            };
            let rows: Vec<u32> = (first..evidence.rows())
                .filter(|&r| {
                    let (s, t) = evidence.ends(r);
                    !explained[r as usize] && evidence.tor_of(s) != evidence.tor_of(t)
                })
                .collect();
            match input.horizon {
                Some(horizon) => horizon_causes(evidence, &rows, traces, horizon, input, settings),
                None => Some(flow_causes(evidence, &rows, traces, input)).filter(|c| !c.is_empty()),
            }
        }
        _ => None,
    };
    // Named as coarsely as paths allow only where no traced flow had a say.
    if let Some(refined) = refined {
        causes.extend(refined);
    } else {
        for pick in network_picks {
            let component = evidence.component(pick.component);
            causes.push(path_cause(evidence, pick, component, input, cause_signal));
        }
    }
    causes
}

fn sided(out: bool, inn: bool) -> Side {
    match (out, inn) {
        (true, false) => Side::Prober,
        (false, true) => Side::Responder,
        _ => Side::Both,
    }
}

fn side_words(side: Side) -> &'static str {
    match side {
        Side::Prober => "as prober",
        Side::Responder => "as responder",
        Side::Both => "both ways",
    }
}

/// A root cause named from a path-level pick.
fn path_cause(
    evidence: &PathEvidence<'_>,
    pick: &Pick,
    component: Component,
    input: &RowEvidence<'_>,
    signal: Signal,
) -> RootCause {
    let tor_name = |t: u32| evidence.tors[t as usize].to_owned();
    let (kind, name, side, node, tor, small_tor) = match component {
        Component::EndpointOut(e) | Component::EndpointIn(e) | Component::Endpoint(e) => {
            let n = evidence.node_of(e);
            (
                CauseKind::Endpoint,
                evidence.endpoints[e as usize].to_owned(),
                Some(sided(
                    !matches!(component, Component::EndpointIn(_)),
                    !matches!(component, Component::EndpointOut(_)),
                )),
                Some(evidence.nodes[n as usize].to_owned()),
                Some(tor_name(evidence.tor_of(e))),
                evidence.nodes_under(evidence.tor_of(e)) <= 2,
            )
        }
        Component::HostOut(n) | Component::HostIn(n) | Component::Host(n) => {
            let t = evidence.tor_of_node(n);
            (
                CauseKind::Host,
                evidence.nodes[n as usize].to_owned(),
                Some(sided(
                    !matches!(component, Component::HostIn(_)),
                    !matches!(component, Component::HostOut(_)),
                )),
                Some(evidence.nodes[n as usize].to_owned()),
                t.map(tor_name),
                t.is_some_and(|t| evidence.nodes_under(t) <= 2),
            )
        }
        Component::Tor(t) => (
            CauseKind::Tor,
            tor_name(t),
            None,
            None,
            Some(tor_name(t)),
            false,
        ),
        Component::TorLinks(t) => (
            CauseKind::Link,
            format!("spine layer <-> {}", tor_name(t)),
            None,
            None,
            Some(tor_name(t)),
            false,
        ),
        Component::Fabric => (
            CauseKind::Switch,
            "spine layer".to_owned(),
            None,
            None,
            None,
            false,
        ),
    };
    let candidates: Vec<String> = pick
        .ties
        .iter()
        .map(|&c| describe(evidence, evidence.component(c)))
        .collect();
    let mut confidence = confidence(pick);
    if !candidates.is_empty() {
        confidence *= 0.5;
    }
    if small_tor {
        // With two nodes under a ToR, each one's ToR-mesh paths all involve
        // the other: the inter-ToR paths carry the decision (R-Pingmesh notes
        // the ToR mesh alone breaks down there).
        confidence *= 0.8;
    }
    let unit = "paths";
    let mut cause = RootCause {
        kind,
        summary: String::new(),
        component: name,
        side,
        signal,
        node,
        tor,
        confidence,
        evidence: evidence_of(pick, unit),
        candidates,
        explains: explained_findings(evidence, component, input.findings),
    };
    cause.summary = summarize(&cause);
    cause
}

fn describe(evidence: &PathEvidence<'_>, component: Component) -> String {
    match component {
        Component::EndpointOut(e) | Component::EndpointIn(e) | Component::Endpoint(e) => {
            format!("endpoint {}", evidence.endpoints[e as usize])
        }
        Component::HostOut(n) | Component::HostIn(n) | Component::Host(n) => {
            format!("host {}", evidence.nodes[n as usize])
        }
        Component::Tor(t) => format!("tor {}", evidence.tors[t as usize]),
        Component::TorLinks(t) => format!("link spine layer <-> {}", evidence.tors[t as usize]),
        Component::Fabric => "switch spine layer".to_owned(),
    }
}

/// How cleanly the pick separates failing from healthy, and on how much evidence.
fn confidence(pick: &Pick) -> f64 {
    let r_in = pick.loss_ratio();
    let purity = if r_in > 0.0 {
        (1.0 - pick.elsewhere_loss_ratio() / r_in).clamp(0.0, 1.0)
    } else {
        0.0
    };
    let support = pick.tally.failing as f64 / (pick.tally.failing as f64 + 1.0);
    (purity * support * 1000.0).round() / 1000.0
}

fn evidence_of(pick: &Pick, unit: &str) -> CauseEvidence {
    CauseEvidence {
        failing: pick.tally.failing,
        healthy: pick.tally.observations - pick.tally.failing,
        unit: unit.to_owned(),
        probes: pick.tally.probes,
        lost: pick.tally.lost,
        loss_ratio: round4(pick.loss_ratio()),
        elsewhere_loss_ratio: round4(pick.elsewhere_loss_ratio()),
        score: (pick.gain * 10.0).round() / 10.0,
    }
}

fn round4(x: f64) -> f64 {
    (x * 10_000.0).round() / 10_000.0
}

fn summarize(c: &RootCause) -> String {
    let what = match c.kind {
        CauseKind::Endpoint => format!("endpoint {}", c.component),
        CauseKind::Host => format!("host {}", c.component),
        CauseKind::Tor => format!("ToR {}", c.component),
        CauseKind::Link => format!("link {}", c.component),
        CauseKind::Switch => format!("switch {}", c.component),
        CauseKind::Unknown => format!("unknown ({})", c.component),
    };
    let side = c
        .side
        .map(|s| format!(" {}", side_words(s)))
        .unwrap_or_default();
    let e = &c.evidence;
    match c.signal {
        Signal::Loss => format!(
            "{what}{side}: {} of {} {} through it losing, loss {:.1}% vs {:.2}% elsewhere",
            e.failing,
            e.failing + e.healthy,
            e.unit,
            e.loss_ratio * 100.0,
            e.elsewhere_loss_ratio * 100.0
        ),
        Signal::Latency => format!(
            "{what}{side}: {} of {} judged {} through it over the latency SLA",
            e.failing,
            e.failing + e.healthy,
            e.unit
        ),
        Signal::HostDelay => format!("{what}{side}: {}", e.unit),
    }
}

/// Open SLA findings whose paths cross `component`.
fn explained_findings(
    evidence: &PathEvidence<'_>,
    component: Component,
    findings: &[Finding],
) -> Vec<String> {
    let mut out = Vec::new();
    let target = evidence.index(component);
    for f in findings {
        let Some((a, b)) = f.location.split_once(" -> ") else {
            continue;
        };
        let hit = match f.kind {
            FindingKind::PathLoss | FindingKind::PathLatency => {
                match (evidence.endpoint_index(a), evidence.endpoint_index(b)) {
                    (Some(s), Some(t)) => evidence
                        .components_between(s, t)
                        .as_slice()
                        .contains(&target),
                    _ => false,
                }
            }
            FindingKind::TorPairLoss | FindingKind::TorPairLatency => {
                tor_pair_crosses(evidence, component, a, b)
            }
        };
        if hit {
            out.push(format!("{} {}", finding_label(f.kind), f.location));
        }
    }
    out
}

fn finding_label(kind: FindingKind) -> &'static str {
    match kind {
        FindingKind::PathLoss => "pathLoss",
        FindingKind::PathLatency => "pathLatency",
        FindingKind::TorPairLoss => "torPairLoss",
        FindingKind::TorPairLatency => "torPairLatency",
    }
}

fn tor_pair_crosses(evidence: &PathEvidence<'_>, component: Component, s: &str, t: &str) -> bool {
    let tor = |i: u32| evidence.tors[i as usize];
    match component {
        Component::EndpointOut(e) | Component::EndpointIn(e) | Component::Endpoint(e) => {
            let own = tor(evidence.tor_of(e));
            own == s || own == t
        }
        Component::HostOut(n) | Component::HostIn(n) | Component::Host(n) => evidence
            .tor_of_node(n)
            .is_some_and(|own| tor(own) == s || tor(own) == t),
        Component::Tor(i) => tor(i) == s || tor(i) == t,
        Component::TorLinks(i) => (tor(i) == s || tor(i) == t) && s != t,
        Component::Fabric => s != t,
    }
}

/// Links and switches from the traced flows of `rows` (paths no endpoint,
/// host or ToR explains).
fn flow_causes(
    paths: &PathEvidence<'_>,
    rows: &[u32],
    traces: &dyn PathTraces,
    input: &RowEvidence<'_>,
) -> Vec<RootCause> {
    let Some(flows) = FlowEvidence::new(paths, rows, traces) else {
        return Vec::new();
    };
    let picks = explain(&flows, &LocalizeSettings::flow_rules());
    picks
        .iter()
        .map(|pick| {
            let (kind, component) = match &flows.components[pick.component as usize] {
                Hop::Link(a, b) => (CauseKind::Link, format!("{a} -> {b}")),
                Hop::Switch(s) => (CauseKind::Switch, s.to_string()),
            };
            let candidates = pick
                .ties
                .iter()
                .map(|&c| match &flows.components[c as usize] {
                    Hop::Link(a, b) => format!("link {a} -> {b}"),
                    Hop::Switch(s) => format!("switch {s}"),
                })
                .collect::<Vec<_>>();
            let mut confidence = confidence(pick);
            if !candidates.is_empty() {
                confidence *= 0.5;
            }
            let rows = pick.explained.iter().map(|&f| flows.row_of(f)).collect();
            let explains = findings_on_rows(paths, rows, input.findings);
            let mut cause = RootCause {
                kind,
                component,
                side: None,
                signal: Signal::Loss,
                node: None,
                tor: None,
                confidence,
                evidence: evidence_of(pick, "flows"),
                candidates,
                explains,
                summary: String::new(),
            };
            cause.summary = summarize(&cause);
            cause
        })
        .collect()
}

/// Loss findings of the paths of `rows`.
fn findings_on_rows(
    paths: &PathEvidence<'_>,
    mut rows: Vec<u32>,
    findings: &[Finding],
) -> Vec<String> {
    rows.sort_unstable();
    rows.dedup();
    let mut explains = Vec::new();
    for f in findings {
        let hit = match f.kind {
            FindingKind::PathLoss => rows.iter().any(|&r| {
                let (s, t) = paths.ends(r);
                let name = |e: u32| paths.endpoints[e as usize];
                f.location == format!("{} -> {}", name(s), name(t))
            }),
            FindingKind::TorPairLoss => rows.iter().any(|&r| {
                let (s, t) = paths.ends(r);
                let tor = |e: u32| paths.tors[paths.tor_of(e) as usize];
                f.location == format!("{} -> {}", tor(s), tor(t))
            }),
            _ => false,
        };
        if hit {
            explains.push(format!("{} {}", finding_label(f.kind), f.location));
        }
    }
    explains
}

fn hop_words(hop: &Hop) -> (CauseKind, String) {
    match hop {
        Hop::Link(a, b) => (CauseKind::Link, format!("{a} -> {b}")),
        Hop::Switch(s) => (CauseKind::Switch, s.to_string()),
    }
}

/// Links and switches from the horizon, after it takes in the traced flows
/// of `rows` (the newest window's paths no endpoint, host or ToR explains);
/// `None` when the horizon holds no traced flow at all.
fn horizon_causes(
    paths: &PathEvidence<'_>,
    rows: &[u32],
    traces: &dyn PathTraces,
    horizon: &NetworkHorizon,
    input: &RowEvidence<'_>,
    settings: &LocalizeSettings,
) -> Option<Vec<RootCause>> {
    let flows = FlowEvidence::new(paths, rows, traces);
    horizon.record(flows.as_ref());
    if horizon.flows() == 0 {
        return None;
    }
    let picks = horizon.decide(settings.max_loss_ratio * 0.5);
    Some(
        picks
            .iter()
            .map(|pick| horizon_cause(paths, flows.as_ref(), pick, input))
            .collect(),
    )
}

fn horizon_cause(
    paths: &PathEvidence<'_>,
    flows: Option<&FlowEvidence>,
    pick: &HorizonPick,
    input: &RowEvidence<'_>,
) -> RootCause {
    let (kind, component) = hop_words(&pick.hop);
    let candidates: Vec<String> = pick
        .ties
        .iter()
        .map(|hop| {
            let (kind, name) = hop_words(hop);
            format!("{} {name}", kind.label())
        })
        .collect();
    // The newest window's failing flows through it: the findings it explains.
    let mut rows = Vec::new();
    if let Some(flows) = flows
        && let Some(local) = flows.components.iter().position(|h| *h == pick.hop)
    {
        for f in 0..flows.flow_count() {
            let (lost, members, row) = flows.flow(f);
            if lost && members.contains(&(local as u32)) {
                rows.push(row);
            }
        }
    }
    let explains = findings_on_rows(paths, rows, input.findings);
    let rate = pick.failing as f64 / pick.flows.max(1) as f64;
    let purity = (1.0 - pick.background / rate).clamp(0.0, 1.0);
    let support = pick.failing as f64 / (pick.failing as f64 + 1.0);
    let mut confidence = (purity * support * 1000.0).round() / 1000.0;
    if !candidates.is_empty() {
        confidence *= 0.5;
    }
    let mut cause = RootCause {
        kind,
        component,
        side: None,
        signal: Signal::Loss,
        node: None,
        tor: None,
        confidence,
        evidence: CauseEvidence {
            failing: pick.failing,
            healthy: pick.flows - pick.failing,
            unit: "flows".to_owned(),
            probes: pick.flows,
            lost: pick.failing,
            loss_ratio: round4(rate),
            elsewhere_loss_ratio: round4(pick.background),
            score: (pick.significance * 10.0).round() / 10.0,
        },
        candidates,
        explains,
        summary: String::new(),
    };
    cause.summary = summarize(&cause);
    cause
}

fn host_delay_causes(evidence: &PathEvidence<'_>, settings: &LocalizeSettings) -> Vec<RootCause> {
    host_delay::slow_hosts(evidence, &settings.host_delay)
        .into_iter()
        .map(|slow| {
            let side = sided(slow.prober.is_some(), slow.responder.is_some());
            let ms = |ns: u64| ns as f64 / 1e6;
            let mut parts = Vec::new();
            if let Some((node, fleet)) = slow.prober {
                parts.push(format!(
                    "prober delay p99 {:.2} ms vs fleet {:.3} ms",
                    ms(node),
                    ms(fleet)
                ));
            }
            if let Some((node, fleet)) = slow.responder {
                parts.push(format!(
                    "responder delay p99 {:.2} ms vs fleet {:.3} ms",
                    ms(node),
                    ms(fleet)
                ));
            }
            let name = evidence.nodes[slow.node as usize].to_owned();
            let mut cause = RootCause {
                kind: CauseKind::Host,
                component: name.clone(),
                side: Some(side),
                signal: Signal::HostDelay,
                node: Some(name),
                tor: evidence
                    .tor_of_node(slow.node)
                    .map(|t| evidence.tors[t as usize].to_owned()),
                confidence: 0.9,
                evidence: CauseEvidence {
                    failing: slow.paths as u64,
                    unit: parts.join("; "),
                    ..CauseEvidence::default()
                },
                candidates: Vec::new(),
                explains: Vec::new(),
                summary: String::new(),
            };
            cause.summary = summarize(&cause);
            cause
        })
        .collect()
}
