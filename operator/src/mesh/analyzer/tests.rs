//! Whole-analyzer behaviour: ingest, evaluate, hysteresis.

use pingmesh_proto::ladder;

use super::*;

const WINDOW: u32 = 5_000;
const W: u64 = WINDOW as u64;
/// A window start far from the Unix epoch, like real time.
const T0: u64 = 1_700_000_000_000;

/// Endpoint "a1/udp0" lives on node "a1" under "tor-a".
fn topology(id: &str) -> Option<EndpointPlacement> {
    let node = id.split('/').next()?;
    let rack = node.chars().next()?;
    (node != "ghost").then(|| EndpointPlacement {
        node: node.to_owned(),
        tor: format!("tor-{rack}"),
    })
}

fn everyone_present(_: &str, _: u64) -> bool {
    true
}

fn analyzer() -> Analyzer {
    Analyzer::new(SlaPolicy::default(), WINDOW).unwrap_or_else(|e| panic!("{e}"))
}

/// A consistent summary: `ok` answered probes all at `rtt_ns`, `lost` lost.
fn summary(
    window: u64,
    src: &str,
    dst: &str,
    ok: u64,
    lost: u64,
    rtt_ns: u64,
) -> v1::WindowSummary {
    let mut histogram = ladder::Histogram::default();
    for _ in 0..ok {
        histogram.record(rtt_ns);
    }
    let (buckets, counts) = histogram.to_sparse();
    v1::WindowSummary {
        window_start_ms: T0 + window * W,
        window_ms: WINDOW,
        source_endpoint: src.to_owned(),
        target_endpoint: dst.to_owned(),
        kind: v1::TargetKind::InterTor.into(),
        sent: ok + lost,
        ok,
        lost,
        invalid: 0,
        software_timed: 0,
        network_rtt: (ok > 0).then_some(v1::DelayStats {
            min_ns: rtt_ns,
            p50_ns: rtt_ns,
            p99_ns: rtt_ns,
            max_ns: rtt_ns,
        }),
        prober_delay: None,
        responder_delay: None,
        network_rtt_histogram: Some(v1::LadderHistogram { buckets, counts }),
        lost_flows_mask: u64::from(lost > 0),
        probed_flows_mask: u64::from(ok + lost > 0),
    }
}

fn now_for(window: u64) -> u64 {
    T0 + (window + 1) * W + 1_000
}

fn ingest(a: &mut Analyzer, s: v1::WindowSummary) -> Ingested {
    let window = (s.window_start_ms - T0) / W;
    a.ingest(s, now_for(window))
        .unwrap_or_else(|e| panic!("{e}"))
}

fn evaluate(a: &mut Analyzer, window: u64) -> Arc<WindowReport> {
    a.evaluate(T0 + window * W, &topology, &everyone_present)
        .unwrap_or_else(|e| panic!("{e}"))
}

/// One window of a1 -> b1 with the given loss, evaluated.
fn path_window(a: &mut Analyzer, window: u64, ok: u64, lost: u64) -> Arc<WindowReport> {
    ingest(a, summary(window, "a1/udp0", "b1/udp0", ok, lost, 20_000));
    evaluate(a, window)
}

fn kinds(findings: &[Finding]) -> Vec<FindingKind> {
    findings.iter().map(|f| f.kind).collect()
}

#[test]
fn two_bad_windows_open_a_finding_and_one_does_not() {
    let mut a = analyzer();
    let first = path_window(&mut a, 0, 0, 50);
    assert!(first.opened.is_empty());
    assert!(a.open_findings().is_empty());
    let second = path_window(&mut a, 1, 0, 50);
    assert_eq!(
        kinds(&second.opened),
        vec![FindingKind::PathLoss, FindingKind::TorPairLoss]
    );
    let path = &second.opened[0];
    assert_eq!(path.location, "a1/udp0 -> b1/udp0");
    assert_eq!(
        (path.source_tor.as_str(), path.target_tor.as_str()),
        ("tor-a", "tor-b")
    );
    assert_eq!(path.evidence, "loss 100.0% (100/100) over 2 windows");
    assert_eq!(
        (path.first_bad_window_ms, path.opened_at_window_ms),
        (T0, T0 + W)
    );
    assert_eq!(path.loss_ratio, Some(1.0));
    assert_eq!(second.opened[1].location, "tor-a -> tor-b");
    assert_eq!(a.open_findings().len(), 2);
}

#[test]
fn a_good_window_between_bad_ones_resets_the_streak() {
    let mut a = analyzer();
    path_window(&mut a, 0, 0, 50);
    path_window(&mut a, 1, 100, 0);
    let third = path_window(&mut a, 2, 0, 50);
    assert!(third.opened.is_empty());
    let fourth = path_window(&mut a, 3, 0, 50);
    assert_eq!(fourth.opened.len(), 2);
}

#[test]
fn three_good_windows_clear_a_finding_and_two_do_not() {
    let mut a = analyzer();
    path_window(&mut a, 0, 0, 50);
    path_window(&mut a, 1, 0, 50);
    assert!(path_window(&mut a, 2, 100, 0).cleared.is_empty());
    assert!(path_window(&mut a, 3, 100, 0).cleared.is_empty());
    assert_eq!(a.open_findings().len(), 2);
    let third_good = path_window(&mut a, 4, 100, 0);
    assert_eq!(
        kinds(&third_good.cleared),
        vec![FindingKind::PathLoss, FindingKind::TorPairLoss]
    );
    assert!(
        third_good
            .cleared
            .iter()
            .all(|f| f.clear_reason == Some(ClearReason::Recovered))
    );
    assert_eq!(third_good.cleared[0].cleared_at_window_ms, Some(T0 + 4 * W));
    assert!(a.open_findings().is_empty());
}

#[test]
fn a_bad_window_while_open_restarts_the_count_to_clear() {
    let mut a = analyzer();
    path_window(&mut a, 0, 0, 50);
    path_window(&mut a, 1, 0, 50);
    path_window(&mut a, 2, 100, 0);
    path_window(&mut a, 3, 100, 0);
    let bad_again = path_window(&mut a, 4, 0, 50);
    assert!(bad_again.opened.is_empty(), "already open");
    assert_eq!(a.open_findings()[0].last_bad_window_ms, T0 + 4 * W);
    for window in 5..7 {
        assert!(path_window(&mut a, window, 100, 0).cleared.is_empty());
    }
    assert_eq!(path_window(&mut a, 7, 100, 0).cleared.len(), 2);
}

#[test]
fn windows_without_data_neither_advance_nor_reset_the_streak() {
    let mut a = analyzer();
    path_window(&mut a, 0, 0, 50);
    assert!(evaluate(&mut a, 1).opened.is_empty());
    assert!(evaluate(&mut a, 2).opened.is_empty());
    assert_eq!(path_window(&mut a, 3, 0, 50).opened.len(), 2);
}

#[test]
fn a_key_without_data_for_long_is_forgotten_and_its_finding_closes_as_gone() {
    let mut a = analyzer();
    path_window(&mut a, 0, 0, 50);
    path_window(&mut a, 1, 0, 50);
    let forget_after = u64::from(a.sla().forget_after_windows);
    for window in 2..=forget_after {
        assert!(
            evaluate(&mut a, window).cleared.is_empty(),
            "window {window}"
        );
    }
    let last = evaluate(&mut a, 1 + forget_after);
    assert_eq!(last.cleared.len(), 2);
    assert!(
        last.cleared
            .iter()
            .all(|f| f.clear_reason == Some(ClearReason::Gone))
    );
    assert!(a.open_findings().is_empty());
}

#[test]
fn paths_to_a_target_that_went_away_are_excluded_not_findings() {
    let mut a = analyzer();
    let b1_gone = |id: &str, _: u64| id != "b1/udp0";
    for window in 0..3 {
        ingest(&mut a, summary(window, "a1/udp0", "b1/udp0", 0, 50, 20_000));
        ingest(&mut a, summary(window, "a1/udp0", "b2/udp0", 50, 0, 20_000));
        let report = a
            .evaluate(T0 + window * W, &topology, &b1_gone)
            .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(report.excluded_target_gone, 1);
        assert_eq!(report.paths.len(), 1);
        assert_eq!(report.paths[0].target_endpoint, "b2/udp0");
        assert_eq!(report.tor_pairs[0].lost, 0);
        assert!(report.opened.is_empty());
    }
    assert!(a.open_findings().is_empty());
}

#[test]
fn paths_with_an_endpoint_the_topology_does_not_know_are_excluded() {
    let mut a = analyzer();
    ingest(&mut a, summary(0, "ghost/udp0", "b1/udp0", 0, 50, 20_000));
    let report = evaluate(&mut a, 0);
    assert_eq!((report.excluded_unplaced, report.paths.len()), (1, 0));
}

#[test]
fn invalid_samples_are_counted_apart_and_are_not_loss() {
    let mut a = analyzer();
    for window in 0..3 {
        let mut s = summary(window, "a1/udp0", "b1/udp0", 20, 0, 20_000);
        s.invalid = 80;
        s.sent = 100;
        ingest(&mut a, s);
        let report = evaluate(&mut a, window);
        let path = &report.paths[0];
        assert_eq!((path.ok, path.lost, path.invalid), (20, 0, 80));
        assert_eq!(path.loss_ratio, Some(0.0));
        assert_eq!(path.loss, Judgement::Met);
        assert_eq!(report.tor_pairs[0].invalid, 80);
        assert_eq!(report.tor_pairs[0].loss_ratio, Some(0.0));
        assert!(report.opened.is_empty());
    }
}

#[test]
fn windows_below_min_probes_are_not_judged() {
    let mut a = analyzer();
    for window in 0..4 {
        let report = path_window(&mut a, window, 0, 9);
        assert_eq!(report.paths[0].loss, Judgement::NotJudged);
        assert_eq!(report.paths[0].latency, Judgement::NotJudged);
        assert_eq!(report.paths[0].loss_ratio, Some(1.0));
        assert!(report.opened.is_empty());
    }
    assert!(a.open_findings().is_empty());
}

#[test]
fn slow_path_opens_a_latency_finding_with_its_p99() {
    let mut a = analyzer();
    for window in 0..2 {
        ingest(
            &mut a,
            summary(window, "a1/udp0", "a2/udp0", 100, 0, 2_000_000),
        );
        evaluate(&mut a, window);
    }
    let open = a.open_findings();
    assert_eq!(
        open.iter().map(|f| f.kind).collect::<Vec<_>>(),
        vec![FindingKind::PathLatency, FindingKind::TorPairLatency]
    );
    assert_eq!(open[0].p99_ns, Some(2_000_000));
    assert_eq!(open[1].location, "tor-a -> tor-a");
    assert!(
        open[0].evidence.contains("2000.0 us"),
        "{}",
        open[0].evidence
    );
}

#[test]
fn tor_pair_merges_histograms_and_reports_bucket_upper_bounds() {
    let mut a = analyzer();
    // 99 fast samples on one path, 2 slow ones on another: the merged p99 is slow.
    ingest(&mut a, summary(0, "a1/udp0", "b1/udp0", 99, 0, 10_000));
    ingest(&mut a, summary(0, "a2/udp0", "b2/udp0", 2, 0, 3_000_000));
    ingest(&mut a, summary(0, "b1/udp0", "a1/udp0", 10, 0, 10_000));
    let report = evaluate(&mut a, 0);
    assert_eq!(report.tor_pairs.len(), 2);
    let ab = &report.tor_pairs[0];
    assert_eq!(
        (ab.source_tor.as_str(), ab.target_tor.as_str()),
        ("tor-a", "tor-b")
    );
    assert_eq!((ab.paths, ab.ok), (2, 101));
    let slow_bucket = ladder::upper_bound_ns(ladder::bucket_of(3_000_000));
    let fast_bucket = ladder::upper_bound_ns(ladder::bucket_of(10_000));
    assert_eq!(ab.p99_network_rtt_ns, Some(slow_bucket));
    assert_eq!(ab.p50_network_rtt_ns, Some(fast_bucket));
    assert_eq!(ab.latency, Judgement::Violated);
    // The paths keep their agents' exact values.
    assert_eq!(report.paths[0].p99_network_rtt_ns, Some(10_000));
    assert_eq!(report.paths[0].latency, Judgement::Met);
}

#[test]
fn duplicate_summary_is_reported_and_the_first_one_stands() {
    let mut a = analyzer();
    assert_eq!(
        ingest(&mut a, summary(0, "a1/udp0", "b1/udp0", 100, 0, 10_000)),
        Ingested::Accepted
    );
    assert_eq!(
        ingest(&mut a, summary(0, "a1/udp0", "b1/udp0", 0, 100, 10_000)),
        Ingested::Duplicate
    );
    assert_eq!(
        ingest(&mut a, summary(0, "b1/udp0", "a1/udp0", 0, 100, 10_000)),
        Ingested::Accepted
    );
    assert_eq!(a.buffered_summaries(), 2);
    let report = evaluate(&mut a, 0);
    assert_eq!(report.paths[0].lost, 0);
}

/// Summaries for window 5 that must be refused once window 3 was evaluated,
/// each with the category it must be refused under.
fn refused_summaries() -> Vec<(v1::WindowSummary, &'static str)> {
    let good = || summary(5, "a1/udp0", "b1/udp0", 10, 0, 10_000);
    vec![
        (
            v1::WindowSummary {
                window_ms: 1_000,
                ..good()
            },
            "window_length_mismatch",
        ),
        (
            v1::WindowSummary {
                window_start_ms: T0 + 5 * W + 1,
                ..good()
            },
            "misaligned_window",
        ),
        (
            v1::WindowSummary { sent: 11, ..good() },
            "counts_do_not_add_up",
        ),
        (
            v1::WindowSummary {
                sent: 0,
                ok: u64::MAX,
                lost: 1,
                ..good()
            },
            "counts_do_not_add_up",
        ),
        (
            v1::WindowSummary {
                software_timed: 11,
                ..good()
            },
            "software_timed_above_ok",
        ),
        (
            v1::WindowSummary {
                source_endpoint: String::new(),
                ..good()
            },
            "invalid_endpoint_id",
        ),
        (
            v1::WindowSummary {
                target_endpoint: "b 1".into(),
                ..good()
            },
            "invalid_endpoint_id",
        ),
        (
            summary(3, "a1/udp0", "b2/udp0", 10, 0, 10_000),
            "already_evaluated",
        ),
        (
            v1::WindowSummary {
                window_start_ms: T0 + 4 * W - (MAX_PAST_WINDOWS + 10) * W,
                ..good()
            },
            "too_old",
        ),
        (
            v1::WindowSummary {
                window_start_ms: T0 + 20 * W,
                ..good()
            },
            "too_far_in_future",
        ),
        (
            v1::WindowSummary {
                network_rtt_histogram: Some(v1::LadderHistogram {
                    buckets: vec![1, 2],
                    counts: vec![1],
                }),
                ..good()
            },
            "malformed_histogram",
        ),
        (
            v1::WindowSummary {
                network_rtt_histogram: Some(v1::LadderHistogram {
                    buckets: vec![60_000],
                    counts: vec![1],
                }),
                ..good()
            },
            "malformed_histogram",
        ),
        (
            v1::WindowSummary {
                network_rtt_histogram: Some(v1::LadderHistogram {
                    buckets: vec![1, 2],
                    counts: vec![u64::MAX, 1],
                }),
                ..good()
            },
            "malformed_histogram",
        ),
    ]
}

#[test]
fn every_inconsistent_summary_is_refused_with_its_category() {
    let mut a = analyzer();
    ingest(&mut a, summary(3, "a1/udp0", "b1/udp0", 10, 0, 10_000));
    evaluate(&mut a, 3);
    let now = now_for(5);
    for (s, category) in refused_summaries() {
        let err = a.ingest(s, now).err();
        assert_eq!(
            err.as_ref().map(IngestError::category),
            Some(category),
            "{err:?}"
        );
    }
    assert_eq!(a.buffered_summaries(), 0, "nothing refused was stored");
    let good = summary(5, "a1/udp0", "b1/udp0", 10, 0, 10_000);
    assert_eq!(a.ingest(good, now), Ok(Ingested::Accepted));
}

#[test]
fn evaluating_out_of_order_or_off_the_grid_is_refused() {
    let mut a = analyzer();
    evaluate(&mut a, 2);
    let again = a.evaluate(T0 + 2 * W, &topology, &everyone_present).err();
    assert_eq!(
        again.as_ref().map(EvaluateError::category),
        Some("already_evaluated")
    );
    let older = a.evaluate(T0 + W, &topology, &everyone_present).err();
    assert!(matches!(
        older,
        Some(EvaluateError::AlreadyEvaluated { .. })
    ));
    let off = a
        .evaluate(T0 + 3 * W + 7, &topology, &everyone_present)
        .err();
    assert_eq!(off.map(|e| e.category()), Some("misaligned_window"));
}

#[test]
fn evaluating_a_window_drops_its_data_and_older_windows() {
    let mut a = analyzer();
    ingest(&mut a, summary(0, "a1/udp0", "b1/udp0", 10, 0, 10_000));
    ingest(&mut a, summary(1, "a1/udp0", "b1/udp0", 10, 0, 10_000));
    ingest(&mut a, summary(2, "a1/udp0", "b1/udp0", 10, 0, 10_000));
    let report = evaluate(&mut a, 1);
    assert_eq!(report.paths.len(), 1);
    assert_eq!(a.buffered_summaries(), 1, "only window 2 is left");
    assert_eq!(a.last_report().map(|r| r.window_start_ms), Some(T0 + W));
    assert_eq!(a.evaluated_through_ms(), Some(T0 + W));
}

#[test]
fn report_serializes_in_camel_case() {
    let mut a = analyzer();
    path_window(&mut a, 0, 0, 50);
    let report = path_window(&mut a, 1, 0, 50);
    let json = serde_json::to_value(report.as_ref()).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(json["windowStartMs"], T0 + W);
    assert_eq!(json["excludedTargetGone"], 0);
    assert_eq!(json["paths"][0]["lossRatio"], 1.0);
    assert!(
        json["paths"][0]["p99NetworkRttNs"].is_null(),
        "nothing answered, no RTT"
    );
    assert_eq!(json["paths"][0]["loss"], "violated");
    assert_eq!(json["opened"][0]["kind"], "pathLoss");
    assert_eq!(json["opened"][0]["openedAtWindowMs"], T0 + W);
    assert!(json["opened"][0].get("clearReason").is_none());
    let back: WindowReport = serde_json::from_value(json).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(&back, report.as_ref());
}

#[test]
fn invalid_sla_or_window_is_refused_at_construction() {
    assert!(
        Analyzer::new(
            SlaPolicy {
                min_probes: 0,
                ..SlaPolicy::default()
            },
            WINDOW
        )
        .is_err()
    );
    let err = Analyzer::new(SlaPolicy::default(), 0).err();
    assert_eq!(err.map(|e| e.field), Some("windowMs"));
}

fn intake_with_window_3_judged() -> Intake {
    let mut intake = Intake::new(WINDOW);
    let now = now_for(3);
    for s in [
        summary(3, "a1/udp0", "b1/udp0", 10, 0, 10_000),
        summary(3, "a1/udp0", "c1/udp0", 10, 0, 10_000),
    ] {
        assert_eq!(intake.ingest(s, now), Ok(Ingested::Accepted));
    }
    let closed = intake.close(T0 + 3 * W).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(closed.paths(), 2);
    intake
}

#[test]
fn a_closed_window_takes_late_summaries_from_sources_not_judged_in_it() {
    let mut intake = intake_with_window_3_judged();
    let now = now_for(9);
    let late = summary(3, "b1/udp0", "a1/udp0", 10, 0, 10_000);
    assert_eq!(intake.ingest(late.clone(), now), Ok(Ingested::AcceptedLate));
    assert_eq!(
        intake.ingest(late, now),
        Ok(Ingested::Duplicate),
        "the first report of a path in the late bucket wins"
    );
    let judged_source = summary(3, "a1/udp0", "d1/udp0", 10, 0, 10_000);
    assert_eq!(
        intake
            .ingest(judged_source, now)
            .err()
            .map(|e| e.category()),
        Some("already_evaluated"),
        "a1's summaries of window 3 were judged: another would count twice"
    );
    assert_eq!(intake.late_summaries(), 1);
    assert_eq!(intake.buffered_summaries(), 0, "no live window holds it");

    let taken = intake.take_late();
    assert_eq!(taken.len(), 1);
    assert_eq!(
        (taken[0].window_start_ms(), taken[0].paths()),
        (T0 + 3 * W, 1)
    );
    assert!(taken[0].reported("a1/udp0") && taken[0].reported("b1/udp0"));
    assert!(!taken[0].reported("c1/udp0"));
    assert_eq!(intake.late_summaries(), 0);
    let again = summary(3, "b1/udp0", "c1/udp0", 10, 0, 10_000);
    assert_eq!(
        intake.ingest(again, now).err().map(|e| e.category()),
        Some("already_evaluated"),
        "b1 counts as judged once its bucket was taken"
    );
    assert!(intake.take_late().is_empty());
}

#[test]
fn late_summaries_beyond_the_horizon_are_too_old() {
    let mut intake = intake_with_window_3_judged();
    // The current window is 3 + MAX_PAST_WINDOWS + 1: window 4 is the oldest taken.
    let now = now_for(3 + MAX_PAST_WINDOWS);
    let late = summary(3, "b1/udp0", "a1/udp0", 10, 0, 10_000);
    assert_eq!(
        intake.ingest(late, now).err().map(|e| e.category()),
        Some("too_old")
    );
    intake.close(T0 + 4 * W).unwrap_or_else(|e| panic!("{e}"));
    let inside = summary(4, "b1/udp0", "a1/udp0", 10, 0, 10_000);
    assert_eq!(intake.ingest(inside, now), Ok(Ingested::AcceptedLate));
}

#[test]
fn windows_held_from_before_the_first_close_are_judged_late() {
    // A controller that started while agents resent their buffers: the
    // windows before its first judged one were never closed.
    let mut intake = Intake::new(WINDOW);
    let now = now_for(10);
    for window in [6, 7, 10] {
        let s = summary(window, "a1/udp0", "b1/udp0", 10, 0, 10_000);
        assert_eq!(intake.ingest(s, now), Ok(Ingested::Accepted));
    }
    let closed = intake.close(T0 + 8 * W).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!((closed.paths(), closed.made_late()), (0, 2));
    assert_eq!(intake.late_summaries(), 2);
    assert_eq!(intake.buffered_summaries(), 1, "window 10 is still open");
    let taken: Vec<u64> = intake
        .take_late()
        .iter()
        .map(|c| (c.window_start_ms() - T0) / W)
        .collect();
    assert_eq!(taken, vec![6, 7]);
}

#[test]
fn a_late_window_is_judged_without_touching_live_findings() {
    let mut a = analyzer();
    let mut intake = Intake::new(WINDOW);
    for window in 0..3 {
        let closed = intake
            .close(T0 + window * W)
            .unwrap_or_else(|e| panic!("{e}"));
        a.judge(closed, &topology, &everyone_present);
    }
    for window in 0..3 {
        for s in [
            summary(window, "a1/udp0", "b1/udp0", 0, 50, 20_000),
            summary(window, "a1/udp0", "c1/udp0", 0, 50, 20_000),
            summary(window, "b1/udp0", "a1/udp0", 50, 0, 20_000),
        ] {
            assert_eq!(intake.ingest(s, now_for(4)), Ok(Ingested::AcceptedLate));
        }
    }
    // The controller saw no agent (cut off from all of them): a target
    // counts as present when its own agent reported the window.
    let nobody_present = |_: &str, _: u64| false;
    for closed in intake.take_late() {
        let report = a.judge_late(closed, &topology, &nobody_present);
        let paths: Vec<(&str, &str, Judgement)> = report
            .paths
            .iter()
            .map(|p| {
                (
                    p.source_endpoint.as_str(),
                    p.target_endpoint.as_str(),
                    p.loss,
                )
            })
            .collect();
        assert_eq!(
            paths,
            vec![
                ("a1/udp0", "b1/udp0", Judgement::Violated),
                ("b1/udp0", "a1/udp0", Judgement::Met),
            ]
        );
        assert_eq!(report.excluded_target_gone, 1, "c1 never reported");
        assert!(report.opened.is_empty() && report.root_causes.is_empty());
    }
    assert!(a.open_findings().is_empty(), "late data opens no finding");
}

/// A mesh of three ToRs with three single-endpoint hosts each, every host
/// probing every other; `a1` loses everything it sends and everything sent
/// to it.
fn mesh_with_a1_dark(window: u64) -> Vec<v1::WindowSummary> {
    let hosts: Vec<String> = ["a", "b", "c"]
        .iter()
        .flat_map(|rack| (1..=3).map(move |i| format!("{rack}{i}/udp0")))
        .collect();
    let mut out = Vec::new();
    for s in &hosts {
        for t in hosts.iter().filter(|t| *t != s) {
            let dark = s.starts_with("a1/") || t.starts_with("a1/");
            let (ok, lost) = if dark { (0, 50) } else { (50, 0) };
            out.push(summary(window, s, t, ok, lost, 20_000));
        }
    }
    out
}

#[test]
fn a_churning_fleet_keeps_the_endpoint_table_bounded_and_still_localizes() {
    // 2,500 endpoints that each report one window only (pods coming and
    // going): without forgetting them, the table would number 25,000.
    const CHURN: usize = 2_500;
    let mut a = analyzer();
    let mut largest = 0;
    for window in 0..10u64 {
        for s in mesh_with_a1_dark(window) {
            ingest(&mut a, s);
        }
        for i in 0..CHURN {
            let churner = format!("x{window}n{i}/udp0");
            ingest(&mut a, summary(window, &churner, "b1/udp0", 50, 0, 20_000));
        }
        let report = evaluate(&mut a, window);
        largest = largest.max(a.table.len());
        let hosts: Vec<&str> = report
            .root_causes
            .iter()
            .filter(|c| c.kind == localize::CauseKind::Host)
            .map(|c| c.component.as_str())
            .collect();
        assert_eq!(
            hosts,
            vec!["a1"],
            "window {window}: {:?}",
            report.root_causes
        );
    }
    // At most the two windows kept (5,000 churners and the mesh), doubled,
    // plus the window that went over.
    assert!(
        largest <= 2 * (2 * CHURN + 9) + CHURN,
        "table reached {largest}"
    );
    assert!(largest >= 3 * CHURN, "the test needs the table to fill up");
    // Every number still held by a kept row names its endpoint.
    for row in a.recent.iter().flatten() {
        let source = a.table.endpoint_name(row.source);
        assert!(source.starts_with('x') || source.len() == 7, "{source}");
        assert_eq!(a.table.get(source), Some(row.source));
    }
}

#[test]
fn overdue_open_windows_share_the_late_cap() {
    // Before the first close (a restarted controller), agents resend what
    // they held: windows the judge should have reached long ago fill like
    // late buckets.
    let mut intake = Intake::with_late_limit(WINDOW, 3);
    // Just after window 10: windows before 10 s + 2 windows ago (5 to 7)
    // are overdue; 8 and 9 may still be waiting for their judgement.
    let now = now_for(10);
    let sources = ["a1/udp0", "a2/udp0", "a3/udp0", "b1/udp0"];
    let ingest_at = |intake: &mut Intake, window: u64, src: &str| {
        intake
            .ingest(summary(window, src, "c1/udp0", 10, 0, 10_000), now)
            .map_err(|e| e.category())
    };
    let outcomes: Vec<_> = sources
        .iter()
        .enumerate()
        .map(|(i, src)| ingest_at(&mut intake, 5 + i as u64 % 2, src))
        .collect();
    assert_eq!(
        outcomes,
        vec![
            Ok(Ingested::Accepted),
            Ok(Ingested::Accepted),
            Ok(Ingested::Accepted),
            Err("late_full"),
        ]
    );
    // A resend of a path held already is a duplicate, full or not.
    assert_eq!(
        ingest_at(&mut intake, 5, "a1/udp0"),
        Ok(Ingested::Duplicate)
    );
    // Windows not overdue are not capped.
    for window in 8..=11 {
        for src in sources {
            assert_eq!(ingest_at(&mut intake, window, src), Ok(Ingested::Accepted));
        }
    }
    // Closing window 10 moves windows 5, 6, 8 and 9 into late buckets, so
    // the cap refuses a late summary for window 7, but not a duplicate.
    let closed = intake.close(T0 + 10 * W).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!((closed.paths(), closed.made_late()), (4, 11));
    assert_eq!(ingest_at(&mut intake, 7, "a1/udp0"), Err("late_full"));
    assert_eq!(
        ingest_at(&mut intake, 8, "a1/udp0"),
        Ok(Ingested::Duplicate)
    );
}

#[test]
fn targets_nobody_placed_do_not_pile_up_in_the_endpoint_table() {
    // An agent naming 5,000 targets the topology does not know, every
    // window: all its paths are excluded, so no window has data.
    let mut a = analyzer();
    for window in 0..5u64 {
        for i in 0..5_000 {
            let target = format!("ghost/w{window}t{i}");
            ingest(&mut a, summary(window, "a1/udp0", &target, 10, 0, 20_000));
        }
        let report = evaluate(&mut a, window);
        assert_eq!(report.excluded_unplaced, 5_000);
        assert!(a.table.len() <= 5_001, "window {window}: {}", a.table.len());
    }
}
