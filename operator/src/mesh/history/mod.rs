//! A bounded history of closed windows, for the web view's time slider: the
//! ToR-pair statistics of every window of the last hour, and the per-path
//! detail (for drill-down) of the newest windows only.
//!
//! Memory is bounded three ways, whatever the mesh's size: windows older than
//! [`HistoryLimits::max_age_ms`] are dropped, the oldest windows go once all
//! windows together hold more than [`HistoryLimits::max_cells`] ToR pairs, and
//! path detail is kept only for as many of the newest windows as fit in
//! [`HistoryLimits::max_paths`] paths. A ToR-pair cell takes 40 bytes, so the
//! default cell budget is at most ~40 MiB: an hour of 5 s windows for meshes of
//! up to ~1,450 ToR pairs, a shorter span for larger ones.
//!
//! Path detail shares the analyzer's reports (`Arc`), so the newest window's
//! paths cost nothing extra.

use std::collections::{BTreeSet, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard};

use serde::Serialize;

use super::analyzer::{Judgement, PathStats, SlaPolicy, TorPairStats, WindowReport};

/// How much history is kept.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HistoryLimits {
    /// Windows that started more than this before the newest one are dropped.
    pub max_age_ms: u64,
    /// ToR-pair cells over all windows kept.
    pub max_cells: usize,
    /// Paths over all windows whose per-path detail is kept.
    pub max_paths: usize,
}

impl Default for HistoryLimits {
    fn default() -> Self {
        Self {
            max_age_ms: 3_600_000,
            max_cells: 1 << 20,
            max_paths: 200_000,
        }
    }
}

/// Bit of [`Cell::failing`]: loss above the SLA's maximum.
pub const FAILING_LOSS: u8 = 1;
/// Bit of [`Cell::failing`]: p99 network RTT above the SLA's maximum, or
/// probes sent and none answered (the round trip never completed).
pub const FAILING_LATENCY: u8 = 2;

/// One ToR pair in one window, compact: ToRs are indices into the window's
/// ToR list.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Cell {
    pub source: u32,
    pub target: u32,
    pub paths: u32,
    pub ok: u32,
    pub lost: u32,
    pub invalid: u32,
    /// `u64::MAX`: no answered probe, so no RTT.
    p99_network_rtt_ns: u64,
    /// [`FAILING_LOSS`] | [`FAILING_LATENCY`], by the SLA in force when the
    /// window closed (not only when enough probes were sent to judge: a
    /// heatmap shows what was measured; the findings say what was judged).
    pub failing: u8,
    /// The analyzer's verdicts (which need `minProbes`).
    pub loss: Judgement,
    pub latency: Judgement,
}

impl Cell {
    pub fn p99_network_rtt_ns(&self) -> Option<u64> {
        (self.p99_network_rtt_ns != u64::MAX).then_some(self.p99_network_rtt_ns)
    }

    pub fn loss_ratio(&self) -> Option<f64> {
        let probes = u64::from(self.ok) + u64::from(self.lost);
        (probes > 0).then(|| f64::from(self.lost) / probes as f64)
    }
}

fn saturate(n: u64) -> u32 {
    u32::try_from(n).unwrap_or(u32::MAX)
}

fn failing_bits(pair: &TorPairStats, sla: &SlaPolicy) -> u8 {
    failing_of(
        pair.ok,
        pair.lost,
        pair.p99_network_rtt_ns,
        &Thresholds::from(sla),
    )
}

fn failing_of(ok: u64, lost: u64, p99_ns: Option<u64>, t: &Thresholds) -> u8 {
    let mut bits = 0;
    if super::analyzer::loss_ratio(ok, lost).is_some_and(|l| l > t.max_loss_ratio) {
        bits |= FAILING_LOSS;
    }
    let unanswered = ok == 0 && lost > 0;
    if unanswered || p99_ns.is_some_and(|p| p > t.max_p99_network_rtt_ns) {
        bits |= FAILING_LATENCY;
    }
    bits
}

/// One ToR pair's cell of a window judged in two parts (live and late
/// summaries, disjoint by source): counts add up, the p99 is the larger of
/// the two (the merged p99 lies between them: an upper bound, like the
/// ladder's), and the verdicts are taken again from the merged figures.
fn combine(live: &Cell, late: &Cell, limits: &Thresholds) -> Cell {
    let ok = u64::from(live.ok) + u64::from(late.ok);
    let lost = u64::from(live.lost) + u64::from(late.lost);
    let p99 = match (live.p99_network_rtt_ns(), late.p99_network_rtt_ns()) {
        (Some(one), Some(other)) => Some(one.max(other)),
        (one, other) => one.or(other),
    };
    let loss_verdict = match super::analyzer::loss_ratio(ok, lost) {
        Some(ratio) if ok + lost >= limits.min_probes => verdict(ratio > limits.max_loss_ratio),
        _ => Judgement::NotJudged,
    };
    let latency_verdict = match p99 {
        Some(p99) if ok >= limits.min_probes => verdict(p99 > limits.max_p99_network_rtt_ns),
        _ => Judgement::NotJudged,
    };
    Cell {
        source: live.source,
        target: live.target,
        paths: live.paths.saturating_add(late.paths),
        ok: saturate(ok),
        lost: saturate(lost),
        invalid: live.invalid.saturating_add(late.invalid),
        p99_network_rtt_ns: p99.unwrap_or(u64::MAX),
        failing: failing_of(ok, lost, p99, limits),
        loss: loss_verdict,
        latency: latency_verdict,
    }
}

fn verdict(violated: bool) -> Judgement {
    if violated {
        Judgement::Violated
    } else {
        Judgement::Met
    }
}

/// The SLA thresholds a window was drawn against.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Thresholds {
    pub max_loss_ratio: f64,
    pub max_p99_network_rtt_ns: u64,
    pub min_probes: u64,
}

impl From<&SlaPolicy> for Thresholds {
    fn from(sla: &SlaPolicy) -> Self {
        Self {
            max_loss_ratio: sla.max_loss_ratio,
            max_p99_network_rtt_ns: sla.max_p99_network_rtt_ns,
            min_probes: sla.min_probes,
        }
    }
}

/// One closed window as the history keeps it.
#[derive(Debug, Clone)]
pub struct WindowCells {
    pub start_ms: u64,
    pub window_ms: u32,
    /// Sorted; shared with the previous window when unchanged.
    pub tors: Arc<[String]>,
    /// By (source, target).
    pub cells: Box<[Cell]>,
    pub thresholds: Thresholds,
    /// Paths judged in the window.
    pub path_count: usize,
    /// The analyzer's report, while its per-path detail is kept.
    report: Option<Arc<WindowReport>>,
}

impl WindowCells {
    pub fn failing(&self, bit: u8) -> usize {
        self.cells.iter().filter(|c| c.failing & bit != 0).count()
    }

    pub fn paths_kept(&self) -> bool {
        self.report.is_some()
    }
}

/// Why paths of a window cannot be given.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PathsError {
    #[error(
        "window {0} is not in the history (it is older than the history keeps, or not closed yet)"
    )]
    UnknownWindow(u64),
    #[error(
        "the per-path detail of window {0} is no longer kept (only the newest windows keep it)"
    )]
    PathsDropped(u64),
    #[error("no window has closed yet")]
    Empty,
}

impl PathsError {
    /// Bounded label for logs and metrics.
    pub fn category(&self) -> &'static str {
        match self {
            Self::UnknownWindow(_) => "unknown_window",
            Self::PathsDropped(_) => "paths_dropped",
            Self::Empty => "empty",
        }
    }
}

/// Which window a request means.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WindowRef {
    Latest,
    Start(u64),
}

#[derive(Debug, Default)]
struct Inner {
    /// Oldest first, starts strictly increasing.
    windows: VecDeque<Arc<WindowCells>>,
    cells: usize,
    paths: usize,
}

/// Adds the ToRs with data in `report` to a window's rows (every known ToR).
fn add_tors<'a>(names: &mut BTreeSet<&'a str>, report: &'a WindowReport) {
    for pair in &report.tor_pairs {
        names.insert(&pair.source_tor);
        names.insert(&pair.target_tor);
    }
}

/// A report's window as the history keeps it, with ToR rows `names`
/// (shared with `beside`, a neighbouring window, when the same).
fn window_cells(
    report: &Arc<WindowReport>,
    sla: &SlaPolicy,
    names: &BTreeSet<&str>,
    beside: Option<&WindowCells>,
) -> WindowCells {
    let tors: Arc<[String]> = match beside {
        Some(prev)
            if prev
                .tors
                .iter()
                .map(String::as_str)
                .eq(names.iter().copied()) =>
        {
            Arc::clone(&prev.tors)
        }
        _ => names.iter().map(|s| (*s).to_owned()).collect(),
    };
    let index = |name: &str| tor_index(&tors, name);
    let mut cells: Vec<Cell> = report
        .tor_pairs
        .iter()
        .filter_map(|pair| {
            Some(Cell {
                source: index(&pair.source_tor)?,
                target: index(&pair.target_tor)?,
                paths: saturate(pair.paths),
                ok: saturate(pair.ok),
                lost: saturate(pair.lost),
                invalid: saturate(pair.invalid),
                p99_network_rtt_ns: pair.p99_network_rtt_ns.unwrap_or(u64::MAX),
                failing: failing_bits(pair, sla),
                loss: pair.loss,
                latency: pair.latency,
            })
        })
        .collect();
    cells.sort_by_key(|c| (c.source, c.target));
    WindowCells {
        start_ms: report.window_start_ms,
        window_ms: report.window_ms,
        tors,
        cells: cells.into_boxed_slice(),
        thresholds: Thresholds::from(sla),
        path_count: report.paths.len(),
        report: Some(Arc::clone(report)),
    }
}

fn tor_index(tors: &[String], name: &str) -> Option<u32> {
    tors.binary_search_by(|t| t.as_str().cmp(name))
        .ok()
        .and_then(|i| u32::try_from(i).ok())
}

/// `live` with the late paths of `late` added (disjoint by source), drawn
/// against `live`'s thresholds; `names` holds both windows' ToRs. Path detail
/// stays only when `live` still has its own.
fn merge_late(
    live: &WindowCells,
    late: &Arc<WindowReport>,
    sla: &SlaPolicy,
    names: &BTreeSet<&str>,
) -> WindowCells {
    let mut merged = window_cells(late, sla, names, Some(live));
    let thresholds = live.thresholds;
    let mut cells: Vec<Cell> = live
        .cells
        .iter()
        .filter_map(|c| {
            let source = tor_index(&merged.tors, live.tors.get(c.source as usize)?)?;
            let target = tor_index(&merged.tors, live.tors.get(c.target as usize)?)?;
            Some(Cell {
                source,
                target,
                ..*c
            })
        })
        .collect();
    for late_cell in &merged.cells {
        match cells
            .iter_mut()
            .find(|c| (c.source, c.target) == (late_cell.source, late_cell.target))
        {
            Some(cell) => *cell = combine(cell, late_cell, &thresholds),
            None => cells.push(Cell {
                failing: failing_of(
                    u64::from(late_cell.ok),
                    u64::from(late_cell.lost),
                    late_cell.p99_network_rtt_ns(),
                    &thresholds,
                ),
                ..*late_cell
            }),
        }
    }
    cells.sort_by_key(|c| (c.source, c.target));
    merged.cells = cells.into_boxed_slice();
    merged.thresholds = thresholds;
    merged.start_ms = live.start_ms;
    merged.path_count = live.path_count + late.paths.len();
    merged.report = live.report.as_ref().map(|kept| {
        let mut paths = kept.paths.clone();
        paths.extend(late.paths.iter().cloned());
        paths.sort_by(|a, b| {
            (&a.source_endpoint, &a.target_endpoint).cmp(&(&b.source_endpoint, &b.target_endpoint))
        });
        // Path detail only: the history reads nothing else of its reports.
        Arc::new(WindowReport {
            paths,
            ..(**kept).clone()
        })
    });
    merged
}

/// The history the controller keeps; every method takes its own lock.
#[derive(Debug, Default)]
pub struct WindowHistory {
    limits: HistoryLimits,
    inner: Mutex<Inner>,
}

impl WindowHistory {
    pub fn new(limits: HistoryLimits) -> Self {
        Self {
            limits,
            inner: Mutex::default(),
        }
    }

    pub fn limits(&self) -> HistoryLimits {
        self.limits
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Adds a closed window. `known_tors` are the ToRs of every registered
    /// endpoint: ToRs without data this window still get a row, so a ToR whose
    /// agents all went away shows as empty instead of vanishing. A window not
    /// newer than the newest kept is ignored (the analyzer closes each window
    /// once, in order).
    pub fn record<'a>(
        &self,
        report: &Arc<WindowReport>,
        sla: &SlaPolicy,
        known_tors: impl IntoIterator<Item = &'a str>,
    ) {
        let mut inner = self.lock();
        if inner
            .windows
            .back()
            .is_some_and(|w| w.start_ms >= report.window_start_ms)
        {
            return;
        }
        let mut names: BTreeSet<&str> = known_tors.into_iter().collect();
        add_tors(&mut names, report);
        let window = window_cells(report, sla, &names, inner.windows.back().map(AsRef::as_ref));
        inner.cells += window.cells.len();
        inner.paths += window.path_count;
        inner.windows.push_back(Arc::new(window));
        self.enforce_limits(&mut inner);
    }

    /// Adds a window judged from late summaries (see `mesh::analyzer::Intake`):
    /// merged into the window's record when the history holds one (its
    /// paths and the late ones are disjoint by source), inserted in order
    /// when not. A window older than the history keeps, or without paths, is
    /// ignored. Returns whether the history changed.
    pub fn record_late<'a>(
        &self,
        report: &Arc<WindowReport>,
        sla: &SlaPolicy,
        known_tors: impl IntoIterator<Item = &'a str>,
    ) -> bool {
        if report.paths.is_empty() {
            return false;
        }
        let mut inner = self.lock();
        let start = report.window_start_ms;
        if let Some(newest) = inner.windows.back().map(|w| w.start_ms)
            && start < newest.saturating_sub(self.limits.max_age_ms)
        {
            return false;
        }
        let mut names: BTreeSet<&str> = known_tors.into_iter().collect();
        add_tors(&mut names, report);
        match inner.windows.binary_search_by_key(&start, |w| w.start_ms) {
            Ok(i) => {
                let live = Arc::clone(&inner.windows[i]);
                let merged = if live.path_count == 0 {
                    window_cells(report, sla, &names, Some(live.as_ref()))
                } else {
                    names.extend(live.tors.iter().map(String::as_str));
                    merge_late(&live, report, sla, &names)
                };
                inner.cells = inner.cells - live.cells.len() + merged.cells.len();
                if live.report.is_some() {
                    inner.paths -= live.path_count;
                }
                if merged.report.is_some() {
                    inner.paths += merged.path_count;
                }
                inner.windows[i] = Arc::new(merged);
            }
            Err(i) => {
                let prev = i.checked_sub(1).and_then(|p| inner.windows.get(p));
                let window = window_cells(report, sla, &names, prev.map(AsRef::as_ref));
                inner.cells += window.cells.len();
                inner.paths += window.path_count;
                inner.windows.insert(i, Arc::new(window));
            }
        }
        self.enforce_limits(&mut inner);
        true
    }

    fn enforce_limits(&self, inner: &mut Inner) {
        let newest = inner.windows.back().map_or(0, |w| w.start_ms);
        let oldest_kept = newest.saturating_sub(self.limits.max_age_ms);
        while inner.windows.len() > 1
            && inner
                .windows
                .front()
                .is_some_and(|w| w.start_ms < oldest_kept || inner.cells > self.limits.max_cells)
        {
            if let Some(w) = inner.windows.pop_front() {
                inner.cells -= w.cells.len();
                if w.report.is_some() {
                    inner.paths -= w.path_count;
                }
            }
        }
        // Path detail goes oldest first; the newest window always keeps its
        // own (the analyzer holds that report anyway).
        let mut i = 0;
        while inner.paths > self.limits.max_paths && i + 1 < inner.windows.len() {
            if inner.windows[i].report.is_some() {
                let mut lighter = (*inner.windows[i]).clone();
                lighter.report = None;
                inner.paths -= lighter.path_count;
                inner.windows[i] = Arc::new(lighter);
            }
            i += 1;
        }
    }

    /// Every window kept that started after `after_ms` (all when `None`), oldest first.
    pub fn windows_after(&self, after_ms: Option<u64>) -> Vec<Arc<WindowCells>> {
        self.lock()
            .windows
            .iter()
            .filter(|w| after_ms.is_none_or(|a| w.start_ms > a))
            .cloned()
            .collect()
    }

    pub fn window(&self, which: WindowRef) -> Option<Arc<WindowCells>> {
        let inner = self.lock();
        match which {
            WindowRef::Latest => inner.windows.back().cloned(),
            WindowRef::Start(start) => inner
                .windows
                .binary_search_by_key(&start, |w| w.start_ms)
                .ok()
                .and_then(|i| inner.windows.get(i).cloned()),
        }
    }

    /// The paths of one ToR pair in one window, by (source, target) endpoint.
    pub fn paths(
        &self,
        which: WindowRef,
        source_tor: &str,
        target_tor: &str,
    ) -> Result<(u64, Vec<PathStats>), PathsError> {
        let window = self.window(which).ok_or(match which {
            WindowRef::Latest => PathsError::Empty,
            WindowRef::Start(s) => PathsError::UnknownWindow(s),
        })?;
        let report = window
            .report
            .as_ref()
            .ok_or(PathsError::PathsDropped(window.start_ms))?;
        let paths = report
            .paths
            .iter()
            .filter(|p| p.source_tor == source_tor && p.target_tor == target_tor)
            .cloned()
            .collect();
        Ok((window.start_ms, paths))
    }

    /// Windows, cells and paths held now: (windows, cells, paths with detail).
    pub fn held(&self) -> (usize, usize, usize) {
        let inner = self.lock();
        (inner.windows.len(), inner.cells, inner.paths)
    }
}

#[cfg(test)]
mod tests;
