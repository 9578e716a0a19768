//! The analyzer: joins window summaries from all agents, computes per-path
//! and per-ToR-pair loss and latency, judges them against the SLA and keeps
//! findings with hysteresis, then localizes the root causes (see
//! [`crate::mesh::localize`]) over the last few windows, with the same
//! hysteresis. Pure logic: the caller supplies time, topology and agent
//! presence.
//!
//! Flow: [`Analyzer::ingest`] every summary as it arrives; once a window is
//! complete (its end plus a grace period for late reports), [`Analyzer::evaluate`]
//! it. Windows are evaluated in increasing order; summaries for a window that has
//! been evaluated are taken late from sources not judged in it (see [`Intake`])
//! and judged on their own ([`Analyzer::judge_late`]), for the history only.

mod findings;
mod policy;
mod stats;
mod window;

#[cfg(test)]
mod tests;

use std::collections::{BTreeMap, VecDeque};
use std::hash::BuildHasher;
use std::sync::Arc;

use pingmesh_proto::v1;
use serde::{Deserialize, Serialize};

pub use findings::{ClearReason, Finding, FindingKind};
pub use policy::{MAX_HYSTERESIS_WINDOWS, SlaPolicy, SlaPolicyError};
pub use stats::{EndpointPlacement, Judgement, PathStats, ProbeKind, TorPairStats, loss_ratio};
pub use window::{
    IngestError, Ingested, MAX_FUTURE_WINDOWS, MAX_LATE_PATHS, MAX_PAST_WINDOWS,
    MAX_PATHS_PER_WINDOW,
};

use findings::Hysteresis;
use window::{Acceptance, FastHash, WindowData};

use crate::mesh::localize::{
    self, CauseTracker, EndpointTable, HostDelayRules, LocalizeSettings, OpenRootCause, PathRow,
    RootCause, RowEvidence,
};

/// Closed windows localization looks at together (the newest and the ones
/// before it): inter-ToR targets get one probe a second, so one 5 s window
/// holds too few of them to tell a link fault from noise.
pub const LOCALIZE_WINDOWS: usize = 3;

/// Endpoints the analyzer's table may number before departed ones are
/// dropped from it (beyond twice those of the windows kept).
const MIN_ENDPOINT_TABLE: usize = 4096;

/// Everything the analyzer concluded about one window.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct WindowReport {
    pub window_start_ms: u64,
    pub window_ms: u32,
    /// Judged and unjudged paths, by (source, target).
    pub paths: Vec<PathStats>,
    /// By (source ToR, target ToR); same-ToR pairs hold the ToR mesh.
    pub tor_pairs: Vec<TorPairStats>,
    /// Findings opened by this window, by (kind, location).
    pub opened: Vec<Finding>,
    /// Findings closed by this window (recovered or gone).
    pub cleared: Vec<Finding>,
    /// Root causes localized from this window and the ones before it.
    #[serde(default)]
    pub root_causes: Vec<RootCause>,
    /// Root causes opened and cleared (hysteresis) by this window.
    #[serde(default)]
    pub opened_root_causes: Vec<OpenRootCause>,
    #[serde(default)]
    pub cleared_root_causes: Vec<OpenRootCause>,
    /// Paths left out because their target's agent was not present all window.
    pub excluded_target_gone: u64,
    /// Paths left out because an endpoint is unknown to the topology.
    pub excluded_unplaced: u64,
}

/// Why a window could not be evaluated.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EvaluateError {
    #[error("window {window_start_ms} is not a multiple of the {window_ms} ms window")]
    MisalignedWindow {
        window_start_ms: u64,
        window_ms: u32,
    },
    #[error(
        "window {window_start_ms} is not after the last evaluated window {evaluated_through_ms}"
    )]
    AlreadyEvaluated {
        window_start_ms: u64,
        evaluated_through_ms: u64,
    },
}

impl EvaluateError {
    /// Bounded label for metrics.
    pub fn category(&self) -> &'static str {
        match self {
            Self::MisalignedWindow { .. } => "misaligned_window",
            Self::AlreadyEvaluated { .. } => "already_evaluated",
        }
    }
}

/// Summaries collected per window until their window closes, and late ones
/// for windows closed already.
///
/// Apart from [`Analyzer`] so that a controller can keep taking summaries in
/// (under this one's lock only) while a closed window is judged elsewhere.
///
/// Late summaries: agents buffer what they could not deliver (controller
/// restarting or cut off) and send it when they reconnect, after its windows
/// were judged without it. For every closed window of the last
/// [`MAX_PAST_WINDOWS`] the intake keeps the source endpoints whose summaries
/// were judged in it, as sorted 64-bit hashes from its own seeded hasher
/// (8 bytes per source per window, nothing else). A summary for a closed
/// window is taken into the window's late bucket when its source was not
/// judged in the window, and refused as `already_evaluated` when it was; in
/// the bucket the first report of a (source, target) wins as in a live
/// window. [`Intake::take_late`] hands the buckets out to be judged, marking
/// their sources judged at once, so no path of a window is judged twice.
/// An agent reports all of a window's summaries of one source in one call,
/// so per source this is exact for agents; summaries of one source split
/// over calls with the window judged in between are refused (never counted
/// twice). Late buckets, and open windows the judge should have reached
/// long ago, hold at most [`MAX_LATE_PATHS`] summaries together.
#[derive(Debug)]
pub struct Intake {
    window_ms: u32,
    windows: BTreeMap<u64, WindowData>,
    evaluated_through_ms: Option<u64>,
    /// Paths in the last closed window: the size new windows start with.
    expected_paths: usize,
    /// Closed windows inside the horizon, by start.
    closed: BTreeMap<u64, Judged>,
    /// Hashes source endpoints for `closed`; seeded per intake.
    hasher: FastHash,
    /// Summaries waiting in late buckets.
    late_paths: usize,
    /// Summaries late buckets and overdue open windows may hold together ([`MAX_LATE_PATHS`]).
    late_limit: usize,
}

/// What the intake remembers of a closed window.
#[derive(Debug, Default)]
struct Judged {
    /// Sorted distinct hashes of the sources judged in the window.
    sources: Box<[u64]>,
    /// Late summaries from other sources, not judged yet.
    late: Option<WindowData>,
}

/// One window's summaries, taken out of an [`Intake`] to be judged.
#[derive(Debug)]
pub struct ClosedWindow {
    window_start_ms: u64,
    data: WindowData,
    /// Late windows only: every source judged in the window (these
    /// summaries' included), hashed by `hasher`.
    reported: Box<[u64]>,
    hasher: FastHash,
    /// Summaries of older windows never closed that this close made late.
    made_late: usize,
}

impl ClosedWindow {
    pub fn window_start_ms(&self) -> u64 {
        self.window_start_ms
    }

    /// Paths reported for the window.
    pub fn paths(&self) -> usize {
        self.data.paths.len()
    }

    /// Summaries taken in for windows older than this one that were never
    /// closed (held from before the intake's first close), which closing
    /// it moved to late buckets: taken in as live, judged as late.
    pub fn made_late(&self) -> usize {
        self.made_late
    }

    /// Whether summaries from `endpoint` as a source were judged in this
    /// window (late windows only; always false for a live one).
    pub fn reported(&self, endpoint: &str) -> bool {
        self.reported
            .binary_search(&self.hasher.hash_one(endpoint))
            .is_ok()
    }
}

/// How long after its end the judge has a window for sure: it judges one
/// within the probe timeout (below a window) and a report grace of a few
/// seconds after the window ends; this leaves room for a slow judge.
const JUDGED_WITHIN_MS: u64 = 10_000;

/// Windows starting before this (by the controller's clock `now_ms`) are
/// overdue: the judge should have reached them long ago.
fn overdue_before(now_ms: u64, window_ms: u32) -> u64 {
    now_ms.saturating_sub(2 * u64::from(window_ms) + JUDGED_WITHIN_MS)
}

/// Merges two sorted distinct lists into one.
fn merge_sorted(a: &[u64], b: &[u64]) -> Box<[u64]> {
    let mut all = Vec::with_capacity(a.len() + b.len());
    all.extend_from_slice(a);
    all.extend_from_slice(b);
    all.sort_unstable();
    all.dedup();
    all.into_boxed_slice()
}

impl Intake {
    /// An intake for `window_ms` windows (at least 1 ms).
    pub fn new(window_ms: u32) -> Self {
        Self {
            window_ms: window_ms.max(1),
            windows: BTreeMap::new(),
            evaluated_through_ms: None,
            expected_paths: 0,
            closed: BTreeMap::new(),
            hasher: FastHash::default(),
            late_paths: 0,
            late_limit: MAX_LATE_PATHS,
        }
    }

    /// An intake whose late summaries are capped at `limit` instead of
    /// [`MAX_LATE_PATHS`], so tests can reach the cap.
    #[cfg(test)]
    pub(crate) fn with_late_limit(window_ms: u32, limit: usize) -> Self {
        Self {
            late_limit: limit,
            ..Self::new(window_ms)
        }
    }

    /// Summaries held for windows not closed yet.
    pub fn buffered_summaries(&self) -> usize {
        self.windows.values().map(|w| w.paths.len()).sum()
    }

    /// Late summaries waiting for [`Intake::take_late`].
    pub fn late_summaries(&self) -> usize {
        self.late_paths
    }

    /// The newest window closed so far.
    pub fn evaluated_through_ms(&self) -> Option<u64> {
        self.evaluated_through_ms
    }

    /// Checks and stores one summary. `now_ms` (Unix ms, the controller's clock)
    /// bounds which windows are accepted: from [`MAX_PAST_WINDOWS`] before the
    /// current one to [`MAX_FUTURE_WINDOWS`] after it. A summary for a closed
    /// window goes to its late bucket (see [`Intake`]).
    pub fn ingest(
        &mut self,
        summary: v1::WindowSummary,
        now_ms: u64,
    ) -> Result<Ingested, IngestError> {
        let accept = Acceptance {
            window: self.window_ms,
            now: now_ms,
        };
        window::check(&summary, &accept)?;
        let start = summary.window_start_ms;
        if let Some(done) = self.evaluated_through_ms.filter(|&done| start <= done) {
            return self.ingest_late(summary, done);
        }
        if !self.windows.contains_key(&start) {
            // Windows nobody evaluated in time can no longer receive data: drop them
            // so a stalled evaluator cannot make memory grow without bound.
            let oldest = accept.oldest_accepted_ms();
            self.windows.retain(|&s, _| s >= oldest);
        }
        // Normally one window fills while the previous one waits for late reports;
        // beyond that, windows start small so stray summaries for many windows
        // cannot each reserve a whole window's worth of memory.
        let expected = if self.windows.len() < 2 {
            self.expected_paths
        } else {
            0
        };
        // A window the judge should have reached long ago is open only
        // before the first close (summaries agents held while the controller
        // was away) or while judging lags: its summaries are late, and share
        // the late buckets' cap, so a resend or a stalled judge cannot fill
        // every window of the horizon.
        let overdue = overdue_before(now_ms, self.window_ms);
        if start < overdue {
            self.check_room_for_late(overdue, &summary)?;
        }
        self.windows
            .entry(start)
            .or_insert_with(|| WindowData::with_capacity(expected))
            .insert(summary, self.hasher)
    }

    /// A checked summary for a window closed already (`done`: the newest
    /// closed): into the late bucket unless its source was judged there.
    /// Rare: kept out of line so it costs the live path nothing.
    #[cold]
    #[inline(never)]
    fn ingest_late(
        &mut self,
        summary: v1::WindowSummary,
        done: u64,
    ) -> Result<Ingested, IngestError> {
        let start = summary.window_start_ms;
        // Windows before this intake's first close have no record: none of
        // their sources was judged.
        let judged = self.closed.entry(start).or_default();
        let source = self.hasher.hash_one(summary.source_endpoint.as_str());
        if judged.sources.binary_search(&source).is_ok() {
            return Err(IngestError::AlreadyEvaluated {
                window_start_ms: start,
                evaluated_through_ms: done,
            });
        }
        let duplicate = || {
            judged
                .late
                .as_ref()
                .is_some_and(|l| l.holds(&summary.source_endpoint, &summary.target_endpoint))
        };
        if self.late_paths >= self.late_limit && !duplicate() {
            return Err(IngestError::LateFull {
                limit: self.late_limit,
            });
        }
        let stored = judged
            .late
            .get_or_insert_with(WindowData::default)
            .insert(summary, self.hasher)?;
        Ok(match stored {
            Ingested::Accepted | Ingested::AcceptedLate => {
                self.late_paths += 1;
                Ingested::AcceptedLate
            }
            Ingested::Duplicate => Ingested::Duplicate,
        })
    }

    /// Refuses a summary for an open window starting before `overdue` when
    /// late buckets and such windows hold the late cap already (a path held
    /// already passes, to be reported a duplicate). Rare, hence out of line:
    /// a pass over the open windows (at most the horizon's).
    #[cold]
    #[inline(never)]
    fn check_room_for_late(
        &self,
        overdue: u64,
        summary: &v1::WindowSummary,
    ) -> Result<(), IngestError> {
        let held: usize = self
            .windows
            .range(..overdue)
            .map(|(_, w)| w.paths.len())
            .sum();
        if self.late_paths + held < self.late_limit
            || self
                .windows
                .get(&summary.window_start_ms)
                .is_some_and(|w| w.holds(&summary.source_endpoint, &summary.target_endpoint))
        {
            return Ok(());
        }
        Err(IngestError::LateFull {
            limit: self.late_limit,
        })
    }

    /// Takes one complete window's data out: summaries for it from the
    /// sources it holds are refused from now on, others go to its late
    /// bucket. Windows older than it that were never closed (held from
    /// before this intake's first close) become late buckets. A move, plus
    /// sorting the window's source hashes (one per source).
    pub fn close(&mut self, window_start_ms: u64) -> Result<ClosedWindow, EvaluateError> {
        if !window_start_ms.is_multiple_of(u64::from(self.window_ms)) {
            return Err(EvaluateError::MisalignedWindow {
                window_start_ms,
                window_ms: self.window_ms,
            });
        }
        if let Some(done) = self
            .evaluated_through_ms
            .filter(|&done| window_start_ms <= done)
        {
            return Err(EvaluateError::AlreadyEvaluated {
                window_start_ms,
                evaluated_through_ms: done,
            });
        }
        let later = match window_start_ms.checked_add(1) {
            Some(next) => self.windows.split_off(&next),
            None => BTreeMap::new(),
        };
        let mut older = std::mem::replace(&mut self.windows, later);
        let mut data = older.remove(&window_start_ms).unwrap_or_default();
        let oldest = window_start_ms
            .saturating_sub(MAX_PAST_WINDOWS.saturating_mul(u64::from(self.window_ms)));
        let mut made_late = 0;
        for (start, skipped) in older {
            if start >= oldest && !skipped.paths.is_empty() {
                made_late += skipped.paths.len();
                self.late_paths += skipped.paths.len();
                self.closed.entry(start).or_default().late = Some(skipped);
            }
        }
        self.forget_before(oldest);
        self.closed.insert(
            window_start_ms,
            Judged {
                sources: data.take_sources().into_boxed_slice(),
                late: None,
            },
        );
        self.evaluated_through_ms = Some(window_start_ms);
        self.expected_paths = data.paths.len().min(MAX_PATHS_PER_WINDOW);
        Ok(ClosedWindow {
            window_start_ms,
            data,
            reported: Box::default(),
            hasher: self.hasher,
            made_late,
        })
    }

    /// Drops what is kept of closed windows older than `oldest`.
    fn forget_before(&mut self, oldest: u64) {
        let kept = self.closed.split_off(&oldest);
        for gone in std::mem::replace(&mut self.closed, kept).into_values() {
            self.late_paths -= gone.late.map_or(0, |l| l.paths.len());
        }
    }

    /// Takes every late bucket out to be judged, oldest window first; their
    /// sources count as judged in their windows from now on.
    pub fn take_late(&mut self) -> Vec<ClosedWindow> {
        if self.late_paths == 0 {
            return Vec::new();
        }
        let mut out = Vec::new();
        for (&start, judged) in &mut self.closed {
            let Some(mut data) = judged.late.take() else {
                continue;
            };
            self.late_paths -= data.paths.len();
            judged.sources = merge_sorted(&judged.sources, &data.take_sources());
            out.push(ClosedWindow {
                window_start_ms: start,
                data,
                reported: judged.sources.clone(),
                hasher: self.hasher,
                made_late: 0,
            });
        }
        out
    }
}

/// Judges closed windows into reports, with findings and root causes kept
/// across windows. Holds its own [`Intake`] for callers that do both in one
/// place ([`Analyzer::ingest`], [`Analyzer::evaluate`]); a controller that
/// takes summaries in while judging keeps a separate one and calls
/// [`Analyzer::judge`].
#[derive(Debug)]
pub struct Analyzer {
    sla: SlaPolicy,
    window_ms: u32,
    intake: Intake,
    hysteresis: Hysteresis,
    last_report: Option<Arc<WindowReport>>,
    /// Endpoints of the windows judged, numbered for localization.
    table: EndpointTable,
    /// The paths of the windows before the newest that localization looks
    /// at ([`LOCALIZE_WINDOWS`] in all), oldest first, numbered in `table`.
    recent: VecDeque<Vec<PathRow>>,
    causes: CauseTracker,
    /// Hops of traced flows, for link and switch localization.
    traces: Option<Arc<localize::TraceBook>>,
    /// Traced flows of the last windows, for weak link and switch faults.
    horizon: localize::NetworkHorizon,
}

impl Analyzer {
    /// An analyzer for `window_ms` windows; refuses an invalid SLA or a zero window.
    pub fn new(sla: SlaPolicy, window_ms: u32) -> Result<Self, SlaPolicyError> {
        sla.validate()?;
        if window_ms == 0 {
            return Err(SlaPolicyError::new("windowMs", &0, &"at least 1"));
        }
        let causes = CauseTracker::new(sla.open_after_windows, sla.clear_after_windows);
        Ok(Self {
            sla,
            window_ms,
            intake: Intake::new(window_ms),
            hysteresis: Hysteresis::default(),
            last_report: None,
            table: EndpointTable::new(),
            recent: VecDeque::new(),
            causes,
            traces: None,
            horizon: localize::NetworkHorizon::new(),
        })
    }

    pub fn sla(&self) -> &SlaPolicy {
        &self.sla
    }

    /// Replaces the SLA; open findings and streaks carry over.
    pub fn set_sla(&mut self, sla: SlaPolicy) -> Result<(), SlaPolicyError> {
        sla.validate()?;
        self.causes
            .set_windows(sla.open_after_windows, sla.clear_after_windows);
        self.sla = sla;
        Ok(())
    }

    fn localize_settings(&self) -> LocalizeSettings {
        LocalizeSettings {
            max_loss_ratio: self.sla.max_loss_ratio,
            host_delay: HostDelayRules::default(),
        }
    }

    pub fn window_ms(&self) -> u32 {
        self.window_ms
    }

    /// Summaries held for windows not evaluated yet.
    pub fn buffered_summaries(&self) -> usize {
        self.intake.buffered_summaries()
    }

    /// The newest window evaluated so far.
    pub fn evaluated_through_ms(&self) -> Option<u64> {
        self.intake.evaluated_through_ms()
    }

    /// Checks and stores one summary (see [`Intake::ingest`]).
    pub fn ingest(
        &mut self,
        summary: v1::WindowSummary,
        now_ms: u64,
    ) -> Result<Ingested, IngestError> {
        self.intake.ingest(summary, now_ms)
    }

    /// Evaluates one complete window and drops its data (and any older window's).
    ///
    /// `topology` maps an endpoint id to its node and ToR; `target_present` says
    /// whether the endpoint's agent was present for the whole window starting at
    /// the given time. Each is asked once per endpoint per window.
    pub fn evaluate(
        &mut self,
        window_start_ms: u64,
        topology: &dyn Fn(&str) -> Option<EndpointPlacement>,
        target_present: &dyn Fn(&str, u64) -> bool,
    ) -> Result<Arc<WindowReport>, EvaluateError> {
        let closed = self.intake.close(window_start_ms)?;
        Ok(self.judge(closed, topology, target_present))
    }

    /// Judges a window closed by an [`Intake`] of the same window length.
    /// Windows must come in increasing order, as one intake closes them.
    pub fn judge(
        &mut self,
        closed: ClosedWindow,
        topology: &dyn Fn(&str) -> Option<EndpointPlacement>,
        target_present: &dyn Fn(&str, u64) -> bool,
    ) -> Arc<WindowReport> {
        let ClosedWindow {
            window_start_ms,
            data,
            ..
        } = closed;
        let stats = stats::collect(
            data,
            window_start_ms,
            &self.sla,
            topology,
            target_present,
            &mut self.table,
        );
        let transitions =
            self.hysteresis
                .step(window_start_ms, &stats.paths, &stats.tor_pairs, &self.sla);
        let had_data = !stats.paths.is_empty();
        let mut report = WindowReport {
            window_start_ms,
            window_ms: self.window_ms,
            paths: stats.paths,
            tor_pairs: stats.tor_pairs,
            opened: transitions.opened,
            cleared: transitions.cleared,
            root_causes: Vec::new(),
            opened_root_causes: Vec::new(),
            cleared_root_causes: Vec::new(),
            excluded_target_gone: stats.excluded_target_gone,
            excluded_unplaced: stats.excluded_unplaced,
        };
        if had_data {
            report.root_causes = self.localize(&stats.rows);
        }
        let causes = self
            .causes
            .step(window_start_ms, &report.root_causes, had_data);
        report.opened_root_causes = causes.opened;
        report.cleared_root_causes = causes.cleared;
        let report = Arc::new(report);
        if had_data {
            self.recent.push_back(stats.rows);
            while self.recent.len() >= LOCALIZE_WINDOWS {
                self.recent.pop_front();
            }
        }
        // Every window, with data or not: targets agents name are numbered
        // before their paths are excluded, so a window of excluded paths
        // fills the table too.
        self.forget_departed_endpoints(stats.placed_endpoints);
        self.last_report = Some(Arc::clone(&report));
        report
    }

    /// Judges a late window from [`Intake::take_late`] by the SLA alone: its
    /// paths and ToR pairs, without findings, hysteresis or localization (live
    /// verdicts never change from late data). A target counts as present when
    /// `target_present` says so or when its own agent reported the window:
    /// presence is the controller's view, and a controller cut off from the
    /// agents saw none of them.
    pub fn judge_late(
        &self,
        closed: ClosedWindow,
        topology: &dyn Fn(&str) -> Option<EndpointPlacement>,
        target_present: &dyn Fn(&str, u64) -> bool,
    ) -> WindowReport {
        let ClosedWindow {
            window_start_ms,
            data,
            reported,
            hasher,
            ..
        } = closed;
        let present = |endpoint: &str, window: u64| {
            target_present(endpoint, window)
                || reported.binary_search(&hasher.hash_one(endpoint)).is_ok()
        };
        // Late windows are not localized: their numbering is thrown away.
        let mut table = EndpointTable::new();
        let stats = stats::collect(
            data,
            window_start_ms,
            &self.sla,
            topology,
            &present,
            &mut table,
        );
        WindowReport {
            window_start_ms,
            window_ms: self.window_ms,
            paths: stats.paths,
            tor_pairs: stats.tor_pairs,
            opened: Vec::new(),
            cleared: Vec::new(),
            root_causes: Vec::new(),
            opened_root_causes: Vec::new(),
            cleared_root_causes: Vec::new(),
            excluded_target_gone: stats.excluded_target_gone,
            excluded_unplaced: stats.excluded_unplaced,
        }
    }

    /// Root causes of the window of `newest` together with the ones before it.
    fn localize(&self, newest: &[PathRow]) -> Vec<RootCause> {
        let windows: Vec<&[PathRow]> = self
            .recent
            .iter()
            .map(Vec::as_slice)
            .chain(std::iter::once(newest))
            .collect();
        let findings: Vec<Finding> = self.open_findings().into_iter().cloned().collect();
        localize::localize_rows(
            &RowEvidence {
                windows: &windows,
                table: &self.table,
                traces: self
                    .traces
                    .as_deref()
                    .map(|t| t as &dyn localize::PathTraces),
                findings: &findings,
                horizon: Some(&self.horizon),
            },
            &self.localize_settings(),
        )
    }

    /// Numbers the table no longer needs: once it holds more than twice the
    /// endpoints of the windows kept (and a floor), it keeps only those, so
    /// a fleet's churn, or targets nobody placed, do not grow it without
    /// end. `placed` (the newest window's placed endpoints) skips the pass
    /// over the kept rows while the table is within twice that: bounded by
    /// the registry then.
    fn forget_departed_endpoints(&mut self, placed: usize) {
        if self.table.len() <= (2 * placed).max(MIN_ENDPOINT_TABLE) {
            return;
        }
        let mut used = vec![false; self.table.len()];
        for row in self.recent.iter().flatten() {
            for e in [row.source, row.target] {
                if let Some(u) = used.get_mut(e as usize) {
                    *u = true;
                }
            }
        }
        let live = used.iter().filter(|&&u| u).count();
        if self.table.len() <= (2 * live).max(MIN_ENDPOINT_TABLE) {
            return;
        }
        let remap = self
            .table
            .retain(|e| used.get(e as usize).copied().unwrap_or(false));
        for rows in &mut self.recent {
            rows.retain_mut(|row| row.renumber(&remap));
        }
    }

    /// The path traces localization uses from the next window on.
    pub fn set_traces(&mut self, traces: Arc<localize::TraceBook>) {
        self.traces = (!traces.is_empty()).then_some(traces);
    }

    /// Open findings, by kind then location.
    pub fn open_findings(&self) -> Vec<&Finding> {
        self.hysteresis.open_findings()
    }

    /// Open root causes, most confident first.
    pub fn open_root_causes(&self) -> Vec<OpenRootCause> {
        self.causes.open()
    }

    /// The report of the last evaluated window.
    pub fn last_report(&self) -> Option<Arc<WindowReport>> {
        self.last_report.clone()
    }
}
