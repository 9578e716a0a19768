//! Findings with hysteresis: a finding opens after `open_after_windows`
//! consecutive bad windows and clears after `clear_after_windows` consecutive good
//! ones. A window without judgeable data for a key neither advances nor resets its
//! counters; after `forget_after_windows` such windows in a row the key is
//! forgotten, and an open finding on it closes as gone.
//!
//! Only keys with a bad streak or an open finding are tracked, so memory follows
//! the number of problems, not the number of paths.

use std::collections::HashMap;

use serde::{Deserialize, Serialize};

use super::policy::SlaPolicy;
use super::stats::{Judgement, PathStats, TorPairStats};

/// What a finding is about.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum FindingKind {
    PathLoss,
    PathLatency,
    TorPairLoss,
    TorPairLatency,
}

impl FindingKind {
    const ALL: [Self; 4] = [
        Self::PathLoss,
        Self::PathLatency,
        Self::TorPairLoss,
        Self::TorPairLatency,
    ];

    fn index(self) -> usize {
        match self {
            Self::PathLoss => 0,
            Self::PathLatency => 1,
            Self::TorPairLoss => 2,
            Self::TorPairLatency => 3,
        }
    }

    fn is_loss(self) -> bool {
        matches!(self, Self::PathLoss | Self::TorPairLoss)
    }
}

/// Why a finding closed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum ClearReason {
    /// Enough consecutive good windows.
    Recovered,
    /// No judgeable data for long enough (endpoint or path went away).
    Gone,
}

/// An analyzer conclusion with its evidence.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Finding {
    pub kind: FindingKind,
    /// "source -> target": endpoint ids for path findings, ToR names for ToR pairs.
    pub location: String,
    pub source_tor: String,
    pub target_tor: String,
    /// The window in which the finding opened.
    pub opened_at_window_ms: u64,
    /// First window of the bad streak that opened it.
    pub first_bad_window_ms: u64,
    pub last_bad_window_ms: u64,
    /// Human-readable, e.g. "loss 100.0% (50/50) over 2 windows".
    pub evidence: String,
    /// Of the last bad window.
    pub loss_ratio: Option<f64>,
    /// Of the last bad window.
    pub p99_ns: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cleared_at_window_ms: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub clear_reason: Option<ClearReason>,
}

/// State of one key with a bad streak or an open finding.
#[derive(Debug, Clone)]
struct Tracker {
    source_tor: String,
    target_tor: String,
    consecutive_bad: u32,
    consecutive_good: u32,
    windows_without_data: u32,
    last_data_window_ms: u64,
    streak_first_window_ms: u64,
    streak_lost: u64,
    streak_probes: u64,
    open: Option<Finding>,
}

/// One judged key in one window, borrowed from the window's statistics.
struct Observation<'a> {
    kind: FindingKind,
    source: &'a str,
    target: &'a str,
    source_tor: &'a str,
    target_tor: &'a str,
    judgement: Judgement,
    lost: u64,
    probes: u64,
    loss_ratio: Option<f64>,
    p99_ns: Option<u64>,
}

/// Findings opened and cleared by one window.
#[derive(Debug, Default)]
pub(super) struct Transitions {
    pub opened: Vec<Finding>,
    pub cleared: Vec<Finding>,
}

/// All tracked keys, one map per kind, keyed by location.
#[derive(Debug, Default)]
pub(super) struct Hysteresis {
    by_kind: [HashMap<String, Tracker>; 4],
    /// Reused to build locations for lookups without allocating.
    location: String,
}

impl Hysteresis {
    /// Advances every key by one window.
    pub fn step(
        &mut self,
        window_start_ms: u64,
        paths: &[PathStats],
        tor_pairs: &[TorPairStats],
        sla: &SlaPolicy,
    ) -> Transitions {
        let mut out = Transitions::default();
        for p in paths {
            for (kind, judgement) in [
                (FindingKind::PathLoss, p.loss),
                (FindingKind::PathLatency, p.latency),
            ] {
                self.observe(
                    window_start_ms,
                    &Observation {
                        kind,
                        source: &p.source_endpoint,
                        target: &p.target_endpoint,
                        source_tor: &p.source_tor,
                        target_tor: &p.target_tor,
                        judgement,
                        lost: p.lost,
                        probes: p.ok.saturating_add(p.lost),
                        loss_ratio: p.loss_ratio,
                        p99_ns: p.p99_network_rtt_ns,
                    },
                    sla,
                    &mut out,
                );
            }
        }
        for p in tor_pairs {
            for (kind, judgement) in [
                (FindingKind::TorPairLoss, p.loss),
                (FindingKind::TorPairLatency, p.latency),
            ] {
                self.observe(
                    window_start_ms,
                    &Observation {
                        kind,
                        source: &p.source_tor,
                        target: &p.target_tor,
                        source_tor: &p.source_tor,
                        target_tor: &p.target_tor,
                        judgement,
                        lost: p.lost,
                        probes: p.ok.saturating_add(p.lost),
                        loss_ratio: p.loss_ratio,
                        p99_ns: p.p99_network_rtt_ns,
                    },
                    sla,
                    &mut out,
                );
            }
        }
        self.age_keys_without_data(window_start_ms, sla, &mut out);
        out.opened
            .sort_by(|a, b| (a.kind, &a.location).cmp(&(b.kind, &b.location)));
        out.cleared
            .sort_by(|a, b| (a.kind, &a.location).cmp(&(b.kind, &b.location)));
        out
    }

    /// Open findings, by kind then location.
    pub fn open_findings(&self) -> Vec<&Finding> {
        let mut open: Vec<&Finding> = self
            .by_kind
            .iter()
            .flat_map(HashMap::values)
            .filter_map(|t| t.open.as_ref())
            .collect();
        open.sort_by(|a, b| (a.kind, &a.location).cmp(&(b.kind, &b.location)));
        open
    }

    fn observe(
        &mut self,
        window_ms: u64,
        o: &Observation<'_>,
        sla: &SlaPolicy,
        out: &mut Transitions,
    ) {
        let bad = match o.judgement {
            Judgement::NotJudged => return,
            Judgement::Met => false,
            Judgement::Violated => true,
        };
        let trackers = &mut self.by_kind[o.kind.index()];
        if !bad && trackers.is_empty() {
            return;
        }
        self.location.clear();
        self.location.push_str(o.source);
        self.location.push_str(" -> ");
        self.location.push_str(o.target);
        if !bad {
            let Some(tracker) = trackers.get_mut(self.location.as_str()) else {
                return;
            };
            tracker.windows_without_data = 0;
            tracker.last_data_window_ms = window_ms;
            tracker.consecutive_bad = 0;
            tracker.consecutive_good += 1;
            let recovered = tracker.consecutive_good >= sla.clear_after_windows;
            if tracker.open.is_none() || recovered {
                // A streak broken before opening, or an open finding that recovered:
                // either way the key is back to untracked.
                if let Some(mut finding) =
                    trackers.remove(self.location.as_str()).and_then(|t| t.open)
                {
                    finding.cleared_at_window_ms = Some(window_ms);
                    finding.clear_reason = Some(ClearReason::Recovered);
                    out.cleared.push(finding);
                }
            }
            return;
        }
        let tracker = trackers
            .entry(self.location.clone())
            .or_insert_with(|| Tracker {
                source_tor: o.source_tor.to_owned(),
                target_tor: o.target_tor.to_owned(),
                consecutive_bad: 0,
                consecutive_good: 0,
                windows_without_data: 0,
                last_data_window_ms: window_ms,
                streak_first_window_ms: window_ms,
                streak_lost: 0,
                streak_probes: 0,
                open: None,
            });
        if tracker.consecutive_bad == 0 {
            tracker.streak_first_window_ms = window_ms;
            tracker.streak_lost = 0;
            tracker.streak_probes = 0;
        }
        tracker.consecutive_bad += 1;
        tracker.consecutive_good = 0;
        tracker.windows_without_data = 0;
        tracker.last_data_window_ms = window_ms;
        tracker.streak_lost = tracker.streak_lost.saturating_add(o.lost);
        tracker.streak_probes = tracker.streak_probes.saturating_add(o.probes);
        let evidence = evidence(o, tracker, sla);
        if let Some(finding) = &mut tracker.open {
            finding.last_bad_window_ms = window_ms;
            finding.evidence = evidence;
            finding.loss_ratio = o.loss_ratio;
            finding.p99_ns = o.p99_ns;
        } else if tracker.consecutive_bad >= sla.open_after_windows {
            let finding = Finding {
                kind: o.kind,
                location: self.location.clone(),
                source_tor: tracker.source_tor.clone(),
                target_tor: tracker.target_tor.clone(),
                opened_at_window_ms: window_ms,
                first_bad_window_ms: tracker.streak_first_window_ms,
                last_bad_window_ms: window_ms,
                evidence,
                loss_ratio: o.loss_ratio,
                p99_ns: o.p99_ns,
                cleared_at_window_ms: None,
                clear_reason: None,
            };
            out.opened.push(finding.clone());
            tracker.open = Some(finding);
        }
    }

    fn age_keys_without_data(&mut self, window_ms: u64, sla: &SlaPolicy, out: &mut Transitions) {
        for kind in FindingKind::ALL {
            self.by_kind[kind.index()].retain(|_, tracker| {
                if tracker.last_data_window_ms == window_ms {
                    return true;
                }
                tracker.windows_without_data += 1;
                if tracker.windows_without_data < sla.forget_after_windows {
                    return true;
                }
                if let Some(mut finding) = tracker.open.take() {
                    finding.cleared_at_window_ms = Some(window_ms);
                    finding.clear_reason = Some(ClearReason::Gone);
                    out.cleared.push(finding);
                }
                false
            });
        }
    }
}

fn evidence(o: &Observation<'_>, t: &Tracker, sla: &SlaPolicy) -> String {
    let windows = t.consecutive_bad;
    let plural = if windows == 1 { "" } else { "s" };
    if o.kind.is_loss() {
        let ratio = t.streak_lost as f64 / t.streak_probes.max(1) as f64;
        format!(
            "loss {:.1}% ({}/{}) over {windows} window{plural}",
            ratio * 100.0,
            t.streak_lost,
            t.streak_probes
        )
    } else {
        let us = |ns: u64| ns as f64 / 1_000.0;
        format!(
            "p99 network RTT {:.1} us above {:.1} us, {windows} window{plural} in a row",
            us(o.p99_ns.unwrap_or(0)),
            us(sla.max_p99_network_rtt_ns)
        )
    }
}
