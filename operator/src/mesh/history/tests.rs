#![allow(clippy::unwrap_used, clippy::expect_used)]

use super::*;
use crate::mesh::analyzer::ProbeKind;

const WINDOW: u64 = 5_000;

fn pair(source: &str, target: &str, ok: u64, lost: u64, p99_ns: Option<u64>) -> TorPairStats {
    TorPairStats {
        source_tor: source.into(),
        target_tor: target.into(),
        paths: 2,
        ok,
        lost,
        invalid: 0,
        loss_ratio: crate::mesh::analyzer::loss_ratio(ok, lost),
        p50_network_rtt_ns: p99_ns,
        p99_network_rtt_ns: p99_ns,
        loss: Judgement::Met,
        latency: Judgement::Met,
    }
}

fn path(source: &str, target: &str, source_tor: &str, target_tor: &str) -> PathStats {
    PathStats {
        source_endpoint: source.into(),
        target_endpoint: target.into(),
        source_tor: source_tor.into(),
        target_tor: target_tor.into(),
        kind: ProbeKind::InterTor,
        ok: 10,
        lost: 0,
        invalid: 0,
        software_timed: 0,
        loss_ratio: Some(0.0),
        p50_network_rtt_ns: Some(2_000),
        p99_network_rtt_ns: Some(3_000),
        lost_flows_mask: 0,
        probed_flows_mask: 1,
        prober_p99_ns: None,
        responder_p99_ns: None,
        loss: Judgement::Met,
        latency: Judgement::Met,
    }
}

fn report(start_ms: u64, tor_pairs: Vec<TorPairStats>, paths: Vec<PathStats>) -> Arc<WindowReport> {
    Arc::new(WindowReport {
        window_start_ms: start_ms,
        window_ms: 5_000,
        paths,
        tor_pairs,
        opened: Vec::new(),
        cleared: Vec::new(),
        root_causes: Vec::new(),
        opened_root_causes: Vec::new(),
        cleared_root_causes: Vec::new(),
        excluded_target_gone: 0,
        excluded_unplaced: 0,
    })
}

fn healthy(start_ms: u64) -> Arc<WindowReport> {
    report(
        start_ms,
        vec![
            pair("tor-1", "tor-1", 50, 0, Some(4_000)),
            pair("tor-1", "tor-2", 10, 0, Some(5_000)),
        ],
        vec![
            path("a/0", "b/0", "tor-1", "tor-1"),
            path("a/0", "c/0", "tor-1", "tor-2"),
        ],
    )
}

fn sla() -> SlaPolicy {
    SlaPolicy::default()
}

#[test]
fn cells_are_marked_failing_by_the_sla_even_with_too_few_probes_to_judge() {
    let history = WindowHistory::default();
    let slow = sla().max_p99_network_rtt_ns + 1;
    history.record(
        &report(
            WINDOW,
            vec![
                pair("tor-1", "tor-1", 50, 0, Some(4_000)),
                pair("tor-1", "tor-2", 4, 4, Some(3_000)),
                pair("tor-2", "tor-1", 0, 8, None),
                pair("tor-2", "tor-2", 50, 0, Some(slow)),
            ],
            Vec::new(),
        ),
        &sla(),
        [],
    );
    let w = history.window(WindowRef::Latest).unwrap();
    let bits: Vec<u8> = w.cells.iter().map(|c| c.failing).collect();
    assert_eq!(
        bits,
        [
            0,
            FAILING_LOSS,
            FAILING_LOSS | FAILING_LATENCY,
            FAILING_LATENCY
        ]
    );
    assert_eq!(w.cells[2].p99_network_rtt_ns(), None);
    assert_eq!(w.cells[1].loss_ratio(), Some(0.5));
    assert_eq!(
        (w.failing(FAILING_LOSS), w.failing(FAILING_LATENCY)),
        (2, 2)
    );
}

#[test]
fn a_registered_tor_without_data_still_gets_a_row() {
    let history = WindowHistory::default();
    history.record(&healthy(WINDOW), &sla(), ["tor-3", "tor-1"]);
    let w = history.window(WindowRef::Latest).unwrap();
    assert_eq!(&*w.tors, ["tor-1", "tor-2", "tor-3"]);
    assert_eq!(w.cells.len(), 2);
    assert!(w.cells.iter().all(|c| c.source == 0));
}

#[test]
fn an_unchanged_tor_list_is_shared_between_windows() {
    let history = WindowHistory::default();
    history.record(&healthy(WINDOW), &sla(), []);
    history.record(&healthy(2 * WINDOW), &sla(), []);
    let w = history.windows_after(None);
    assert!(Arc::ptr_eq(&w[0].tors, &w[1].tors));
}

#[test]
fn windows_older_than_the_maximum_age_are_dropped() {
    let history = WindowHistory::new(HistoryLimits {
        max_age_ms: 3 * WINDOW,
        ..HistoryLimits::default()
    });
    for i in 1..=10 {
        history.record(&healthy(i * WINDOW), &sla(), []);
    }
    let starts: Vec<u64> = history
        .windows_after(None)
        .iter()
        .map(|w| w.start_ms / WINDOW)
        .collect();
    assert_eq!(starts, [7, 8, 9, 10]);
    assert_eq!(history.held(), (4, 8, 8));
}

#[test]
fn the_cell_budget_drops_the_oldest_windows_but_never_the_newest() {
    let history = WindowHistory::new(HistoryLimits {
        max_cells: 5,
        ..HistoryLimits::default()
    });
    for i in 1..=4 {
        history.record(&healthy(i * WINDOW), &sla(), []);
    }
    assert_eq!(history.held().0, 2, "two windows of two cells fit in five");
    let tiny = WindowHistory::new(HistoryLimits {
        max_cells: 1,
        ..HistoryLimits::default()
    });
    tiny.record(&healthy(WINDOW), &sla(), []);
    tiny.record(&healthy(2 * WINDOW), &sla(), []);
    let kept = tiny.windows_after(None);
    assert_eq!(kept.len(), 1);
    assert_eq!(kept[0].start_ms, 2 * WINDOW);
}

#[test]
fn path_detail_is_kept_for_the_newest_windows_only() {
    let history = WindowHistory::new(HistoryLimits {
        max_paths: 4,
        ..HistoryLimits::default()
    });
    for i in 1..=3 {
        history.record(&healthy(i * WINDOW), &sla(), []);
    }
    let kept: Vec<bool> = history
        .windows_after(None)
        .iter()
        .map(|w| w.paths_kept())
        .collect();
    assert_eq!(kept, [false, true, true]);
    assert_eq!(
        history.paths(WindowRef::Start(WINDOW), "tor-1", "tor-2"),
        Err(PathsError::PathsDropped(WINDOW))
    );
    let (start, paths) = history
        .paths(WindowRef::Start(2 * WINDOW), "tor-1", "tor-2")
        .unwrap();
    assert_eq!(start, 2 * WINDOW);
    assert_eq!(paths.len(), 1);
    assert_eq!(paths[0].target_endpoint, "c/0");
}

#[test]
fn the_newest_window_keeps_its_paths_whatever_the_budget() {
    let history = WindowHistory::new(HistoryLimits {
        max_paths: 0,
        ..HistoryLimits::default()
    });
    history.record(&healthy(WINDOW), &sla(), []);
    history.record(&healthy(2 * WINDOW), &sla(), []);
    let (start, paths) = history.paths(WindowRef::Latest, "tor-1", "tor-1").unwrap();
    assert_eq!((start, paths.len()), (2 * WINDOW, 1));
    assert_eq!(history.held(), (2, 4, 2));
}

#[test]
fn paths_of_unknown_windows_are_a_clear_error() {
    let history = WindowHistory::default();
    assert_eq!(
        history.paths(WindowRef::Latest, "tor-1", "tor-1"),
        Err(PathsError::Empty)
    );
    history.record(&healthy(WINDOW), &sla(), []);
    assert_eq!(
        history.paths(WindowRef::Start(7), "tor-1", "tor-1"),
        Err(PathsError::UnknownWindow(7))
    );
    let (_, none) = history.paths(WindowRef::Latest, "tor-9", "tor-1").unwrap();
    assert!(none.is_empty());
}

#[test]
fn a_window_not_newer_than_the_newest_is_ignored() {
    let history = WindowHistory::default();
    history.record(&healthy(2 * WINDOW), &sla(), []);
    history.record(&healthy(WINDOW), &sla(), []);
    history.record(&healthy(2 * WINDOW), &sla(), []);
    assert_eq!(history.held(), (1, 2, 2));
}

#[test]
fn windows_after_a_start_are_the_newer_ones() {
    let history = WindowHistory::default();
    for i in 1..=3 {
        history.record(&healthy(i * WINDOW), &sla(), []);
    }
    let newer: Vec<u64> = history
        .windows_after(Some(WINDOW))
        .iter()
        .map(|w| w.start_ms)
        .collect();
    assert_eq!(newer, [2 * WINDOW, 3 * WINDOW]);
}

#[test]
fn a_cell_takes_the_forty_bytes_the_memory_budget_counts_on() {
    // docs/web.md and HistoryLimits::max_cells size the history by this.
    assert!(std::mem::size_of::<Cell>() <= 40);
}

#[test]
fn a_late_window_the_history_lacks_is_inserted_in_order() {
    let history = WindowHistory::default();
    history.record(&healthy(WINDOW), &sla(), []);
    history.record(&healthy(4 * WINDOW), &sla(), []);
    assert!(history.record_late(&healthy(2 * WINDOW), &sla(), []));
    let starts: Vec<u64> = history
        .windows_after(None)
        .iter()
        .map(|w| w.start_ms)
        .collect();
    assert_eq!(starts, [WINDOW, 2 * WINDOW, 4 * WINDOW]);
    let (start, paths) = history
        .paths(WindowRef::Start(2 * WINDOW), "tor-1", "tor-2")
        .unwrap();
    assert_eq!((start, paths.len()), (2 * WINDOW, 1));
    assert_eq!(history.held(), (3, 6, 6));
}

#[test]
fn a_late_window_replaces_a_window_judged_without_data() {
    let history = WindowHistory::default();
    history.record(&report(WINDOW, Vec::new(), Vec::new()), &sla(), ["tor-1"]);
    history.record(&healthy(2 * WINDOW), &sla(), []);
    assert!(history.record_late(&healthy(WINDOW), &sla(), []));
    let w = history.window(WindowRef::Start(WINDOW)).unwrap();
    assert_eq!((w.cells.len(), w.path_count), (2, 2));
    assert_eq!(history.held(), (2, 4, 4));
}

#[test]
fn late_paths_merge_into_the_window_judged_live() {
    let history = WindowHistory::default();
    history.record(&healthy(WINDOW), &sla(), []);
    let slow = sla().max_p99_network_rtt_ns + 1;
    let late = report(
        WINDOW,
        vec![
            pair("tor-1", "tor-2", 5, 5, Some(slow)),
            pair("tor-3", "tor-1", 20, 0, Some(1_000)),
        ],
        vec![
            path("d/0", "c/0", "tor-1", "tor-2"),
            path("e/0", "a/0", "tor-3", "tor-1"),
        ],
    );
    assert!(history.record_late(&late, &sla(), []));
    let w = history.window(WindowRef::Latest).unwrap();
    assert_eq!(&*w.tors, ["tor-1", "tor-2", "tor-3"]);
    let cells: Vec<(u32, u32, u32, u32, u32)> = w
        .cells
        .iter()
        .map(|c| (c.source, c.target, c.paths, c.ok, c.lost))
        .collect();
    assert_eq!(
        cells,
        [(0, 0, 2, 50, 0), (0, 1, 4, 15, 5), (2, 0, 2, 20, 0)],
        "counts of the same ToR pair add up; new pairs are added"
    );
    let merged = &w.cells[1];
    assert_eq!(
        merged.p99_network_rtt_ns(),
        Some(slow),
        "the larger p99 bounds the merged one"
    );
    assert_eq!(merged.failing, FAILING_LOSS | FAILING_LATENCY);
    assert_eq!(
        (merged.loss, merged.latency),
        (Judgement::Violated, Judgement::Violated)
    );
    assert_eq!(w.path_count, 4);
    let (_, paths) = history.paths(WindowRef::Latest, "tor-1", "tor-2").unwrap();
    let sources: Vec<&str> = paths.iter().map(|p| p.source_endpoint.as_str()).collect();
    assert_eq!(sources, ["a/0", "d/0"]);
    assert_eq!(history.held(), (1, 3, 4));
}

#[test]
fn a_late_window_older_than_the_history_keeps_is_ignored() {
    let history = WindowHistory::new(HistoryLimits {
        max_age_ms: 3 * WINDOW,
        ..HistoryLimits::default()
    });
    history.record(&healthy(10 * WINDOW), &sla(), []);
    assert!(!history.record_late(&healthy(6 * WINDOW), &sla(), []));
    assert!(!history.record_late(&report(9 * WINDOW, Vec::new(), Vec::new()), &sla(), []));
    assert_eq!(history.held().0, 1);
}
