//! Per-window, per-path probe statistics, turned into the
//! [`v1::WindowSummary`] messages the agent reports.
//!
//! Every probe counts in the window it was *sent* in, whenever its outcome
//! arrives. A window is finished once its end plus a grace period (long enough
//! for the probe timeout) has passed; probes of it still unresolved then count
//! as lost, so every summary keeps `sent == ok + lost + invalid`. Outcomes that
//! arrive for a finished window are dropped and counted, never folded into a
//! later window.
//!
//! Delay percentiles are exact (nearest rank, rounded up) while a path has at
//! most `max_exact_samples` samples in a window. Beyond that the samples move
//! into a ladder histogram, bounding memory, and p50/p99 become bucket upper
//! bounds (never below the true value); min and max stay exact.

use std::collections::{BTreeMap, HashMap, btree_map};
use std::sync::Arc;

use pingmesh_proto::ladder::{Histogram, nearest_rank};
use pingmesh_proto::v1;

use crate::probe::timing::{InvalidReason, Sample};

/// Most windows open at once. With a grace below one window, two or three are
/// open in normal operation; more means `take_finished` is not being called or
/// the wall clock jumped, and the oldest is dropped rather than memory growing.
pub const MAX_OPEN_WINDOWS: usize = 8;

/// One probed path: what a summary is keyed and labelled by.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct PathInfo {
    pub source_endpoint: Arc<str>,
    pub target_endpoint: Arc<str>,
    pub target_node: Arc<str>,
    /// A `v1::TargetKind` value.
    pub kind: i32,
}

/// Windows finished by one [`WindowAggregator::take_finished`] call.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct FinishedWindows {
    /// One summary per path per finished window, ordered by window, source, target.
    pub summaries: Vec<v1::WindowSummary>,
    /// Probes still unresolved when their window finished, counted as lost in
    /// `summaries`. Non-zero means the probe timeout outlasts the grace period.
    pub unresolved: u64,
}

/// Events the aggregator could not use; cumulative since creation.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct AggregatorCounters {
    /// Outcomes for a window that had already finished (or was evicted): dropped.
    pub late_outcomes: u64,
    /// Outcomes of an open window with no sent probe left to resolve: dropped.
    pub unmatched_outcomes: u64,
    /// Sends for a window that had already finished (or was evicted): not counted.
    pub refused_sends: u64,
    /// Windows dropped unreported because more than [`MAX_OPEN_WINDOWS`] were open.
    pub evicted_windows: u64,
}

/// Aggregates probe outcomes per wall-clock window and path.
#[derive(Debug)]
pub struct WindowAggregator {
    window_ms: u32,
    max_exact_samples: usize,
    /// Open windows by start (Unix ms).
    windows: BTreeMap<u64, Window>,
    /// Every window starting before this has been finished or evicted.
    closed_before_ms: u64,
    counters: AggregatorCounters,
}

/// Paths of one window, by source then target endpoint. Keyed by name, not by
/// `Arc` identity, so a path rebuilt by a pinglist update keeps one summary.
type Window = HashMap<Arc<str>, HashMap<Arc<str>, PathStats>>;

impl WindowAggregator {
    pub fn new(window_ms: u32, max_exact_samples: usize) -> Self {
        Self {
            window_ms: window_ms.max(1),
            max_exact_samples,
            windows: BTreeMap::new(),
            closed_before_ms: 0,
            counters: AggregatorCounters::default(),
        }
    }

    /// A probe on `path` over flow `flow` is about to be sent in the window
    /// starting at `window_start_ms`.
    pub fn on_sent(&mut self, window_start_ms: u64, path: &Arc<PathInfo>, flow: u16) {
        if window_start_ms < self.closed_before_ms {
            self.counters.refused_sends += 1;
            return;
        }
        if let btree_map::Entry::Vacant(slot) = self.windows.entry(window_start_ms) {
            slot.insert(Window::new());
            self.evict_excess_windows();
        }
        let Some(window) = self.windows.get_mut(&window_start_ms) else {
            return; // the new window was itself the oldest and got evicted (counted)
        };
        let targets = match window.get_mut(&*path.source_endpoint) {
            Some(targets) => targets,
            None => window.entry(Arc::clone(&path.source_endpoint)).or_default(),
        };
        let stats = match targets.get_mut(&*path.target_endpoint) {
            Some(stats) => stats,
            None => targets
                .entry(Arc::clone(&path.target_endpoint))
                .or_insert_with(|| PathStats::new(Arc::clone(path))),
        };
        stats.sent += 1;
        stats.probed_flows_mask |= flow_bit(flow);
    }

    /// The transport refused to send a probe counted by [`Self::on_sent`]: it
    /// never left the host, so it is taken back rather than counted as lost.
    pub fn on_send_failed(&mut self, window_start_ms: u64, path: &Arc<PathInfo>) {
        if let Some(stats) = self.unresolved_path(window_start_ms, path) {
            stats.sent -= 1;
        }
    }

    /// A probe sent in `window_start_ms` on `path` was answered; `result` is
    /// what `classify()` made of its timestamps.
    pub fn on_answered(
        &mut self,
        window_start_ms: u64,
        path: &Arc<PathInfo>,
        result: Result<Sample, InvalidReason>,
    ) {
        let max_exact = self.max_exact_samples;
        let Some(stats) = self.unresolved_path(window_start_ms, path) else {
            return;
        };
        match result {
            Ok(sample) => stats.record_ok(&sample, max_exact),
            Err(_) => stats.invalid += 1,
        }
    }

    /// A probe sent in `window_start_ms` on `path` over flow `flow` timed out.
    pub fn on_lost(&mut self, window_start_ms: u64, path: &Arc<PathInfo>, flow: u16) {
        if let Some(stats) = self.unresolved_path(window_start_ms, path) {
            stats.lost += 1;
            stats.lost_flows_mask |= flow_bit(flow);
        }
    }

    /// Finishes every window whose end plus `grace_ms` is at or before
    /// `now_unix_ms`, oldest first.
    pub fn take_finished(&mut self, now_unix_ms: u64, grace_ms: u64) -> FinishedWindows {
        let window_ms = u64::from(self.window_ms);
        let cutoff = now_unix_ms.saturating_sub(grace_ms);
        let mut finished = FinishedWindows::default();
        while let Some(entry) = self.windows.first_entry() {
            let start = *entry.key();
            if start.saturating_add(window_ms) > cutoff {
                break;
            }
            let window = entry.remove();
            finished.unresolved += self.summarize(start, window, &mut finished.summaries);
        }
        // Windows with start + window_ms <= cutoff are closed even if nothing was sent in them.
        if cutoff >= window_ms {
            self.closed_before_ms = self.closed_before_ms.max(cutoff - window_ms + 1);
        }
        finished
    }

    /// Events dropped or refused so far.
    pub fn counters(&self) -> AggregatorCounters {
        self.counters
    }

    /// Windows currently open.
    pub fn open_windows(&self) -> usize {
        self.windows.len()
    }

    /// The path's stats if an outcome may still be counted there; counts the
    /// outcome as late or unmatched otherwise.
    fn unresolved_path(&mut self, window_start_ms: u64, path: &PathInfo) -> Option<&mut PathStats> {
        let Self {
            windows,
            counters,
            closed_before_ms,
            ..
        } = self;
        if window_start_ms < *closed_before_ms {
            counters.late_outcomes += 1;
            return None;
        }
        let stats = windows
            .get_mut(&window_start_ms)
            .and_then(|w| w.get_mut(&*path.source_endpoint))
            .and_then(|t| t.get_mut(&*path.target_endpoint))
            .filter(|s| s.resolved() < s.sent);
        if stats.is_none() {
            counters.unmatched_outcomes += 1;
        }
        stats
    }

    fn evict_excess_windows(&mut self) {
        while self.windows.len() > MAX_OPEN_WINDOWS {
            if let Some((start, _)) = self.windows.pop_first() {
                tracing::warn!(
                    window_start_ms = start,
                    "too many open windows, dropping the oldest"
                );
                self.counters.evicted_windows += 1;
                self.closed_before_ms = self.closed_before_ms.max(start.saturating_add(1));
            }
        }
    }

    /// Appends the window's summaries in (source, target) order; returns how
    /// many probes were still unresolved.
    fn summarize(&self, start: u64, window: Window, out: &mut Vec<v1::WindowSummary>) -> u64 {
        let mut paths: Vec<PathStats> = window
            .into_values()
            .flat_map(HashMap::into_values)
            .collect();
        paths.sort_unstable_by(|a, b| {
            (&a.info.source_endpoint, &a.info.target_endpoint)
                .cmp(&(&b.info.source_endpoint, &b.info.target_endpoint))
        });
        let mut unresolved = 0;
        for stats in paths {
            let (summary, open) = stats.finish(start, self.window_ms);
            unresolved += open;
            out.push(summary);
        }
        unresolved
    }
}

/// Flow `flow`'s bit in the flow masks of a summary. Flows are numbered below
/// [`pingmesh_proto::limits::MAX_FLOWS_PER_TARGET`] (the prober clamps targets to it), so each has a
/// bit of its own; a flow beyond the mask gets none rather than another
/// flow's bit, which would blame a clean flow's path for its losses.
fn flow_bit(flow: u16) -> u64 {
    1u64.checked_shl(u32::from(flow)).unwrap_or(0)
}

/// Counters and delay samples of one path in one window.
#[derive(Debug)]
struct PathStats {
    info: Arc<PathInfo>,
    sent: u64,
    ok: u64,
    lost: u64,
    invalid: u64,
    software_timed: u64,
    lost_flows_mask: u64,
    probed_flows_mask: u64,
    network_rtt: DelayAccumulator,
    prober_delay: DelayAccumulator,
    responder_delay: DelayAccumulator,
}

impl PathStats {
    fn new(info: Arc<PathInfo>) -> Self {
        Self {
            info,
            sent: 0,
            ok: 0,
            lost: 0,
            invalid: 0,
            software_timed: 0,
            lost_flows_mask: 0,
            probed_flows_mask: 0,
            network_rtt: DelayAccumulator::default(),
            prober_delay: DelayAccumulator::default(),
            responder_delay: DelayAccumulator::default(),
        }
    }

    fn resolved(&self) -> u64 {
        self.ok + self.lost + self.invalid
    }

    fn record_ok(&mut self, sample: &Sample, max_exact: usize) {
        self.ok += 1;
        if sample.software_timed {
            self.software_timed += 1;
        }
        self.network_rtt.record(sample.network_rtt_ns, max_exact);
        self.prober_delay.record(sample.prober_delay_ns, max_exact);
        self.responder_delay
            .record(sample.responder_delay_ns, max_exact);
    }

    /// The summary, with unresolved probes counted as lost, and how many there were.
    fn finish(mut self, window_start_ms: u64, window_ms: u32) -> (v1::WindowSummary, u64) {
        let unresolved = self.sent.saturating_sub(self.resolved());
        self.lost += unresolved;
        let summary = v1::WindowSummary {
            window_start_ms,
            window_ms,
            source_endpoint: self.info.source_endpoint.to_string(),
            target_endpoint: self.info.target_endpoint.to_string(),
            kind: self.info.kind,
            sent: self.sent,
            ok: self.ok,
            lost: self.lost,
            invalid: self.invalid,
            software_timed: self.software_timed,
            network_rtt: Some(self.network_rtt.stats()),
            prober_delay: Some(self.prober_delay.stats()),
            responder_delay: Some(self.responder_delay.stats()),
            network_rtt_histogram: Some(self.network_rtt.ladder()),
            lost_flows_mask: self.lost_flows_mask,
            probed_flows_mask: self.probed_flows_mask,
        };
        (summary, unresolved)
    }
}

/// One delay's samples: exact values up to a limit, then a ladder histogram.
#[derive(Debug, Default)]
struct DelayAccumulator {
    count: u64,
    min_ns: u64,
    max_ns: u64,
    exact: Vec<u64>,
    binned: Option<Histogram>,
}

impl DelayAccumulator {
    fn record(&mut self, ns: u64, max_exact: usize) {
        if self.count == 0 {
            (self.min_ns, self.max_ns) = (ns, ns);
        } else {
            self.min_ns = self.min_ns.min(ns);
            self.max_ns = self.max_ns.max(ns);
        }
        self.count += 1;
        if let Some(h) = &mut self.binned {
            h.record(ns);
        } else if self.exact.len() < max_exact {
            self.exact.push(ns);
        } else {
            let mut h = Histogram::default();
            for &v in &self.exact {
                h.record(v);
            }
            h.record(ns);
            self.exact = Vec::new();
            self.binned = Some(h);
        }
    }

    fn stats(&mut self) -> v1::DelayStats {
        if self.count == 0 {
            return v1::DelayStats::default();
        }
        let (p50_ns, p99_ns) = if let Some(h) = &self.binned {
            // The top ladder bucket is unbounded; the true quantile never exceeds max.
            let at = |q| {
                h.quantile_upper_ns(q)
                    .unwrap_or(self.max_ns)
                    .min(self.max_ns)
            };
            (at(0.5), at(0.99))
        } else {
            self.exact.sort_unstable();
            let n = self.exact.len() as u64;
            let at = |q| {
                let index = usize::try_from(nearest_rank(n, q) - 1).unwrap_or(usize::MAX);
                self.exact.get(index).copied().unwrap_or(self.max_ns)
            };
            (at(0.5), at(0.99))
        };
        v1::DelayStats {
            min_ns: self.min_ns,
            p50_ns,
            p99_ns,
            max_ns: self.max_ns,
        }
    }

    fn ladder(&self) -> v1::LadderHistogram {
        let (buckets, counts) = if let Some(h) = &self.binned {
            h.to_sparse()
        } else {
            let mut h = Histogram::default();
            for &v in &self.exact {
                h.record(v);
            }
            h.to_sparse()
        };
        v1::LadderHistogram { buckets, counts }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::probe::timing::{InvalidReason, Sample};
    use pingmesh_proto::ladder::{bucket_of, upper_bound_ns};
    use proptest::prelude::*;

    const W: u32 = 5_000;
    const GRACE: u64 = 2_000;

    fn path(source: &str, target: &str) -> Arc<PathInfo> {
        Arc::new(PathInfo {
            source_endpoint: source.into(),
            target_endpoint: target.into(),
            target_node: "node-b".into(),
            kind: v1::TargetKind::TorMesh as i32,
        })
    }

    fn sample(network_rtt_ns: u64) -> Sample {
        Sample {
            network_rtt_ns,
            prober_delay_ns: network_rtt_ns / 2,
            responder_delay_ns: 7,
            software_timed: false,
        }
    }

    /// Sends one probe per value in window `10_000` and answers it with that network RTT.
    fn window_with_rtts(agg: &mut WindowAggregator, p: &Arc<PathInfo>, rtts: &[u64]) {
        for &rtt in rtts {
            agg.on_sent(10_000, p, 0);
            agg.on_answered(10_000, p, Ok(sample(rtt)));
        }
    }

    fn only_summary(agg: &mut WindowAggregator) -> v1::WindowSummary {
        let mut done = agg.take_finished(10_000 + u64::from(W) + GRACE, GRACE);
        assert_eq!(done.summaries.len(), 1);
        done.summaries.remove(0)
    }

    fn assert_invariant(s: &v1::WindowSummary) {
        assert_eq!(s.sent, s.ok + s.lost + s.invalid, "summary {s:?}");
    }

    #[test]
    fn a_window_without_ok_samples_reports_all_zero_stats() {
        let mut agg = WindowAggregator::new(W, 100);
        let p = path("a/udp0", "b/udp0");
        for _ in 0..3 {
            agg.on_sent(10_000, &p, 0);
        }
        agg.on_lost(10_000, &p, 1);
        agg.on_lost(10_000, &p, 1);
        agg.on_answered(10_000, &p, Err(InvalidReason::NegativeNetworkRtt));
        let s = only_summary(&mut agg);
        assert_eq!(
            (s.sent, s.ok, s.lost, s.invalid, s.software_timed),
            (3, 0, 2, 1, 0)
        );
        assert_eq!(s.network_rtt, Some(v1::DelayStats::default()));
        assert_eq!(s.prober_delay, Some(v1::DelayStats::default()));
        assert_eq!(s.responder_delay, Some(v1::DelayStats::default()));
        assert_eq!(
            s.network_rtt_histogram,
            Some(v1::LadderHistogram::default())
        );
        assert_invariant(&s);
    }

    #[test]
    fn p99_of_a_hundred_samples_is_the_99th_smallest_so_one_outlier_shows_only_in_max() {
        let mut agg = WindowAggregator::new(W, 1_000);
        let p = path("a/udp0", "b/udp0");
        let mut rtts: Vec<u64> = (1..=99).map(|i| 10_000 + i).collect();
        rtts.insert(37, 5_000_000);
        window_with_rtts(&mut agg, &p, &rtts);
        let rtt = only_summary(&mut agg).network_rtt.unwrap();
        assert_eq!(rtt.min_ns, 10_001);
        assert_eq!(rtt.p50_ns, 10_050);
        assert_eq!(rtt.p99_ns, 10_099);
        assert_eq!(rtt.max_ns, 5_000_000);

        // A second outlier makes it the 99th smallest of 101 (rank ceil(99.99) = 100).
        let mut agg = WindowAggregator::new(W, 1_000);
        rtts.push(6_000_000);
        window_with_rtts(&mut agg, &p, &rtts);
        assert_eq!(
            only_summary(&mut agg).network_rtt.unwrap().p99_ns,
            5_000_000
        );
    }

    #[test]
    fn exact_percentiles_use_nearest_rank_rounded_up() {
        let mut agg = WindowAggregator::new(W, 16);
        let p = path("a/udp0", "b/udp0");
        window_with_rtts(&mut agg, &p, &[40, 10, 30, 20]);
        let s = only_summary(&mut agg);
        // n = 4: p50 rank ceil(2.0) = 2, p99 rank ceil(3.96) = 4.
        let rtt = s.network_rtt.unwrap();
        assert_eq!(
            (rtt.min_ns, rtt.p50_ns, rtt.p99_ns, rtt.max_ns),
            (10, 20, 40, 40)
        );
        let prober = s.prober_delay.unwrap();
        assert_eq!((prober.min_ns, prober.p50_ns, prober.max_ns), (5, 10, 20));
        assert_eq!(s.responder_delay.unwrap().p99_ns, 7);
    }

    #[test]
    fn beyond_the_exact_limit_percentiles_are_ladder_upper_bounds_and_extremes_stay_exact() {
        let mut agg = WindowAggregator::new(W, 10);
        let p = path("a/udp0", "b/udp0");
        let mut rtts: Vec<u64> = (1..=99).map(|i| i * 1_000 + 3).collect();
        rtts.push(5_000_000);
        window_with_rtts(&mut agg, &p, &rtts);
        let rtt = only_summary(&mut agg).network_rtt.unwrap();
        assert_eq!(rtt.min_ns, 1_003);
        assert_eq!(rtt.max_ns, 5_000_000);
        assert_eq!(rtt.p50_ns, upper_bound_ns(bucket_of(50_003)));
        assert_eq!(rtt.p99_ns, upper_bound_ns(bucket_of(99_003)));
        assert!(rtt.p50_ns > 50_003 && rtt.p99_ns > 99_003);
    }

    #[test]
    fn a_binned_percentile_never_exceeds_the_exact_max() {
        let mut agg = WindowAggregator::new(W, 2);
        let p = path("a/udp0", "b/udp0");
        window_with_rtts(&mut agg, &p, &[99_001, 99_002, 99_003]);
        let rtt = only_summary(&mut agg).network_rtt.unwrap();
        assert!(upper_bound_ns(bucket_of(99_003)) > 99_003);
        assert_eq!(
            (rtt.p50_ns, rtt.p99_ns, rtt.max_ns),
            (99_003, 99_003, 99_003)
        );
    }

    #[test]
    fn exactly_max_exact_samples_are_still_exact() {
        let mut agg = WindowAggregator::new(W, 4);
        let p = path("a/udp0", "b/udp0");
        window_with_rtts(&mut agg, &p, &[50_001, 50_002, 50_003, 50_004]);
        assert_eq!(only_summary(&mut agg).network_rtt.unwrap().p50_ns, 50_002);
    }

    #[test]
    fn the_network_rtt_histogram_holds_every_ok_sample_on_the_ladder() {
        for max_exact in [0, 1_000] {
            let mut agg = WindowAggregator::new(W, max_exact);
            let p = path("a/udp0", "b/udp0");
            window_with_rtts(&mut agg, &p, &[500, 20_000, 20_001, 3_000_000]);
            agg.on_sent(10_000, &p, 0);
            agg.on_lost(10_000, &p, 0);
            let h = only_summary(&mut agg).network_rtt_histogram.unwrap();
            let mut expected = Histogram::default();
            for v in [500, 20_000, 20_001, 3_000_000] {
                expected.record(v);
            }
            let (buckets, counts) = expected.to_sparse();
            assert_eq!(
                (h.buckets, h.counts),
                (buckets, counts),
                "max_exact {max_exact}"
            );
        }
    }

    #[test]
    fn software_timed_counts_only_ok_samples_with_the_flag() {
        let mut agg = WindowAggregator::new(W, 100);
        let p = path("a/udp0", "b/udp0");
        for soft in [true, false, true] {
            agg.on_sent(10_000, &p, 0);
            let mut s = sample(1_000);
            s.software_timed = soft;
            agg.on_answered(10_000, &p, Ok(s));
        }
        agg.on_sent(10_000, &p, 0);
        agg.on_answered(10_000, &p, Err(InvalidReason::ZeroTimestamp));
        let s = only_summary(&mut agg);
        assert_eq!((s.ok, s.invalid, s.software_timed), (3, 1, 2));
    }

    #[test]
    fn losses_set_the_bit_of_their_flow_and_no_other_flows_bit() {
        let mut agg = WindowAggregator::new(W, 100);
        let p = path("a/udp0", "b/udp0");
        for flow in [5, 63] {
            agg.on_sent(10_000, &p, flow);
            agg.on_lost(10_000, &p, flow);
        }
        // Flow 3 is clean; a flow beyond the mask (no prober sends one, a
        // target has at most 64) must not put its loss on flow 3's bit.
        let beyond = u16::try_from(pingmesh_proto::limits::MAX_FLOWS_PER_TARGET + 3).unwrap();
        agg.on_sent(10_000, &p, beyond);
        agg.on_lost(10_000, &p, beyond);
        for flow in [3, 9] {
            agg.on_sent(10_000, &p, flow);
        }
        agg.on_answered(10_000, &p, Ok(sample(1_000)));
        agg.on_answered(10_000, &p, Err(InvalidReason::ZeroTimestamp));
        let s = only_summary(&mut agg);
        assert_eq!(s.lost_flows_mask, (1 << 5) | (1 << 63));
        assert_eq!(
            s.probed_flows_mask,
            (1 << 3) | (1 << 5) | (1 << 9) | (1 << 63),
            "flows 3 and 9 were probed and not lost"
        );
        assert_eq!(s.lost, 3);
    }

    #[test]
    fn a_window_finishes_only_after_its_end_plus_grace() {
        let mut agg = WindowAggregator::new(W, 100);
        let p = path("a/udp0", "b/udp0");
        agg.on_sent(10_000, &p, 0);
        agg.on_sent(15_000, &p, 0);
        let end = 15_000;
        assert!(
            agg.take_finished(end + GRACE - 1, GRACE)
                .summaries
                .is_empty()
        );
        let done = agg.take_finished(end + GRACE, GRACE);
        assert_eq!(done.summaries.len(), 1);
        assert_eq!(done.summaries[0].window_start_ms, 10_000);
        assert_eq!(done.summaries[0].window_ms, W);
        assert_eq!(agg.open_windows(), 1);
    }

    #[test]
    fn unresolved_probes_count_as_lost_when_their_window_finishes() {
        let mut agg = WindowAggregator::new(W, 100);
        let p = path("a/udp0", "b/udp0");
        for _ in 0..5 {
            agg.on_sent(10_000, &p, 0);
        }
        agg.on_answered(10_000, &p, Ok(sample(1_000)));
        agg.on_lost(10_000, &p, 2);
        let done = agg.take_finished(u64::MAX, GRACE);
        assert_eq!(done.unresolved, 3);
        let s = &done.summaries[0];
        assert_eq!((s.sent, s.ok, s.lost), (5, 1, 4));
        assert_invariant(s);
    }

    #[test]
    fn outcomes_for_a_finished_window_are_dropped_and_counted_as_late() {
        let mut agg = WindowAggregator::new(W, 100);
        let p = path("a/udp0", "b/udp0");
        agg.on_sent(10_000, &p, 0);
        let done = agg.take_finished(10_000 + u64::from(W) + GRACE, GRACE);
        assert_eq!(done.summaries.len(), 1);
        agg.on_answered(10_000, &p, Ok(sample(1_000)));
        agg.on_lost(10_000, &p, 0);
        agg.on_sent(10_000, &p, 0);
        // A window that saw no probe at all is closed too.
        agg.on_lost(5_000, &p, 0);
        let c = agg.counters();
        assert_eq!(
            (c.late_outcomes, c.refused_sends, c.unmatched_outcomes),
            (3, 1, 0)
        );
        assert!(agg.take_finished(u64::MAX, GRACE).summaries.is_empty());
    }

    #[test]
    fn outcomes_without_a_sent_probe_are_unmatched_and_keep_the_invariant() {
        let mut agg = WindowAggregator::new(W, 100);
        let p = path("a/udp0", "b/udp0");
        agg.on_answered(10_000, &p, Ok(sample(1_000))); // no window yet
        agg.on_sent(10_000, &p, 0);
        agg.on_answered(10_000, &p, Ok(sample(1_000)));
        agg.on_lost(10_000, &p, 0); // one more outcome than sends
        agg.on_lost(10_000, &path("a/udp0", "c/udp0"), 0); // path never probed
        assert_eq!(agg.counters().unmatched_outcomes, 3);
        let s = only_summary(&mut agg);
        assert_eq!((s.sent, s.ok, s.lost), (1, 1, 0));
    }

    #[test]
    fn a_failed_send_is_taken_back_instead_of_counted_lost() {
        let mut agg = WindowAggregator::new(W, 100);
        let p = path("a/udp0", "b/udp0");
        agg.on_sent(10_000, &p, 0);
        agg.on_sent(10_000, &p, 0);
        agg.on_send_failed(10_000, &p);
        agg.on_answered(10_000, &p, Ok(sample(1_000)));
        let done = agg.take_finished(u64::MAX, GRACE);
        assert_eq!(done.unresolved, 0);
        assert_eq!((done.summaries[0].sent, done.summaries[0].lost), (1, 0));
    }

    #[test]
    fn paths_are_keyed_by_name_and_summaries_are_ordered() {
        let mut agg = WindowAggregator::new(W, 100);
        agg.on_sent(10_000, &path("a/udp1", "b/udp0"), 0);
        agg.on_sent(10_000, &path("a/udp0", "c/udp0"), 0);
        // A rebuilt Arc for the same path counts in the same summary.
        agg.on_sent(10_000, &path("a/udp0", "b/udp0"), 0);
        agg.on_sent(10_000, &path("a/udp0", "b/udp0"), 0);
        agg.on_sent(15_000, &path("a/udp0", "b/udp0"), 0);
        let done = agg.take_finished(u64::MAX, GRACE);
        let keys: Vec<_> = done
            .summaries
            .iter()
            .map(|s| {
                (
                    s.window_start_ms,
                    s.source_endpoint.as_str(),
                    s.target_endpoint.as_str(),
                    s.sent,
                )
            })
            .collect();
        assert_eq!(
            keys,
            vec![
                (10_000, "a/udp0", "b/udp0", 2),
                (10_000, "a/udp0", "c/udp0", 1),
                (10_000, "a/udp1", "b/udp0", 1),
                (15_000, "a/udp0", "b/udp0", 1),
            ]
        );
        assert!(
            done.summaries
                .iter()
                .all(|s| s.kind == v1::TargetKind::TorMesh as i32)
        );
    }

    #[test]
    fn too_many_open_windows_evict_the_oldest() {
        let mut agg = WindowAggregator::new(W, 100);
        let p = path("a/udp0", "b/udp0");
        let starts: Vec<u64> = (0..=MAX_OPEN_WINDOWS as u64)
            .map(|i| 10_000 + i * 5_000)
            .collect();
        for &start in &starts {
            agg.on_sent(start, &p, 0);
        }
        assert_eq!(agg.open_windows(), MAX_OPEN_WINDOWS);
        assert_eq!(agg.counters().evicted_windows, 1);
        agg.on_lost(starts[0], &p, 0);
        assert_eq!(agg.counters().late_outcomes, 1);
        let done = agg.take_finished(u64::MAX, GRACE);
        let reported: Vec<u64> = done.summaries.iter().map(|s| s.window_start_ms).collect();
        assert_eq!(reported, starts[1..]);
    }

    /// One call of the invariant proptest.
    #[derive(Debug, Clone)]
    enum Op {
        Sent(u64),
        Ok(u64, u64),
        Invalid(u64),
        Lost(u64, u16),
        Finish(u64),
    }

    fn op() -> impl Strategy<Value = Op> {
        let window = (0u64..6).prop_map(|i| i * u64::from(W));
        prop_oneof![
            3 => window.clone().prop_map(Op::Sent),
            2 => (window.clone(), 0u64..5_000_000).prop_map(|(w, r)| Op::Ok(w, r)),
            1 => window.clone().prop_map(Op::Invalid),
            1 => (window, any::<u16>()).prop_map(|(w, f)| Op::Lost(w, f)),
            1 => (0u64..40_000).prop_map(Op::Finish),
        ]
    }

    proptest! {
        #[test]
        fn every_summary_keeps_sent_equal_to_ok_plus_lost_plus_invalid(
            ops in prop::collection::vec(op(), 0..300),
            max_exact in 0usize..8,
        ) {
            let mut agg = WindowAggregator::new(W, max_exact);
            let p = path("a/udp0", "b/udp0");
            let mut summaries = Vec::new();
            let mut now = 0;
            for op in ops {
                match op {
                    Op::Sent(w) => agg.on_sent(w, &p, 0),
                    Op::Ok(w, rtt) => agg.on_answered(w, &p, Ok(sample(rtt))),
                    Op::Invalid(w) => agg.on_answered(w, &p, Err(InvalidReason::ZeroTimestamp)),
                    Op::Lost(w, f) => agg.on_lost(w, &p, f),
                    Op::Finish(step) => {
                        now += step;
                        summaries.extend(agg.take_finished(now, GRACE).summaries);
                    }
                }
            }
            summaries.extend(agg.take_finished(u64::MAX, GRACE).summaries);
            let mut seen = std::collections::HashSet::new();
            for s in &summaries {
                prop_assert_eq!(s.sent, s.ok + s.lost + s.invalid);
                prop_assert!(seen.insert(s.window_start_ms), "window reported twice");
                let rtt = s.network_rtt.unwrap();
                prop_assert!(rtt.min_ns <= rtt.p50_ns && rtt.p50_ns <= rtt.p99_ns);
                prop_assert!(rtt.p99_ns <= rtt.max_ns);
            }
        }
    }
}
