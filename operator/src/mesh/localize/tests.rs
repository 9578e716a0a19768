//! Localization on small synthetic fabrics: each fault kind named, nothing
//! blamed on a clean fabric, several faults at once.

use std::sync::Arc;

use super::sim::{Fabric, FabricSpec, Fault, host_name, spine_name, tor_name};
use super::*;
use crate::mesh::analyzer::ProbeKind;

fn spec(rail_optimized: bool) -> FabricSpec {
    FabricSpec {
        spines: 4,
        groups: 4,
        hosts_per_group: 4,
        rnics_per_host: if rail_optimized { 4 } else { 1 },
        rail_optimized,
        tor_mesh_probes: 50,
        inter_tor_probes: 5,
        inter_tor_sample_tors: 3,
        inter_tor_flows: 13,
        background_loss: 1e-4,
    }
}

fn settings() -> LocalizeSettings {
    LocalizeSettings {
        max_loss_ratio: 0.01,
        host_delay: HostDelayRules::default(),
    }
}

/// Root causes of `windows` windows of `fabric` under `faults`, together.
fn causes_over(
    fabric: &Fabric,
    faults: &[Fault],
    use_traces: bool,
    seed: u64,
    windows: u64,
) -> Vec<RootCause> {
    let mut book = TraceBook::default();
    let mut all = Vec::new();
    for w in 0..windows {
        let (paths, t) = fabric.window(faults, seed * 100 + w, 0.01);
        all.push(paths);
        book.merge(t);
    }
    let slices: Vec<&[PathStats]> = all.iter().map(Vec::as_slice).collect();
    let node_of = |e: &str| fabric.node_of_name.get(e).map(String::as_str);
    let input = WindowEvidence {
        windows: &slices,
        node_of: &node_of,
        traces: use_traces.then_some(&book as &dyn PathTraces),
        findings: &[],
        horizon: None,
    };
    localize(&input, &settings())
}

/// Root causes of one window.
fn causes(fabric: &Fabric, faults: &[Fault], traced: bool, seed: u64) -> Vec<RootCause> {
    causes_over(fabric, faults, traced, seed, 1)
}

fn named(causes: &[RootCause]) -> Vec<(CauseKind, String, Option<Side>)> {
    causes
        .iter()
        .map(|c| (c.kind, c.component.clone(), c.side))
        .collect()
}

#[test]
fn a_clean_fabric_blames_nothing_over_many_windows() {
    for rail in [false, true] {
        let fabric = Fabric::new(spec(rail), 1);
        for seed in 0..20 {
            let found = causes(&fabric, &[], true, seed);
            assert!(found.is_empty(), "window {seed}: {:?}", named(&found));
        }
    }
}

#[test]
fn a_black_holed_host_is_named_as_the_host_both_ways() {
    let fabric = Fabric::new(spec(false), 2);
    let found = causes(&fabric, &[Fault::Host { host: 5, loss: 1.0 }], true, 7);
    assert_eq!(
        named(&found),
        vec![(CauseKind::Host, host_name(5), Some(Side::Both))]
    );
    assert!(found[0].confidence > 0.5, "{found:?}");
}

#[test]
fn a_host_losing_ten_percent_is_named() {
    let fabric = Fabric::new(spec(false), 3);
    let found = causes(&fabric, &[Fault::Host { host: 9, loss: 0.1 }], false, 3);
    assert_eq!(
        named(&found),
        vec![(CauseKind::Host, host_name(9), Some(Side::Both))]
    );
}

#[test]
fn a_host_on_rails_is_the_host_not_its_rnics_or_their_tors() {
    let fabric = Fabric::new(spec(true), 4);
    let found = causes(&fabric, &[Fault::Host { host: 6, loss: 0.3 }], true, 4);
    assert_eq!(
        named(&found),
        vec![(CauseKind::Host, host_name(6), Some(Side::Both))]
    );
}

#[test]
fn an_rnic_that_cannot_send_is_named_as_the_endpoint() {
    let fabric = Fabric::new(spec(true), 5);
    let endpoint = 4 * 3 + 2;
    let found = causes(
        &fabric,
        &[Fault::Endpoint {
            endpoint,
            send: true,
            receive: false,
            loss: 1.0,
        }],
        true,
        5,
    );
    // A probe and its ACK both cross the RNIC: a dead transmit side fails
    // its own probes (no probe leaves) and others' (no ACK leaves). The
    // side tells which direction of probing failed, so here both.
    assert_eq!(found.len(), 1, "{:?}", named(&found));
    assert_eq!(found[0].kind, CauseKind::Endpoint);
    assert_eq!(found[0].component, fabric.endpoint_names[endpoint as usize]);
}

#[test]
fn a_tor_dropping_twenty_percent_is_the_tor() {
    let fabric = Fabric::new(spec(false), 6);
    let found = causes(&fabric, &[Fault::Tor { tor: 2, loss: 0.2 }], true, 6);
    assert_eq!(named(&found), vec![(CauseKind::Tor, tor_name(2), None)]);
}

#[test]
fn a_spine_to_tor_link_is_named_from_traced_flows_and_coarsely_without() {
    let fabric = Fabric::new(spec(false), 7);
    let fault = [Fault::Downlink {
        spine: 1,
        tor: 3,
        loss: 0.3,
    }];
    // Inter-ToR probes are sparse (5 a window per target here): three
    // windows together carry enough of them.
    let traced = causes_over(&fabric, &fault, true, 8, 3);
    assert_eq!(
        named(&traced),
        vec![(
            CauseKind::Link,
            format!("{} -> {}", spine_name(1), tor_name(3)),
            None
        )]
    );
    let coarse = causes_over(&fabric, &fault, false, 8, 3);
    assert_eq!(
        named(&coarse),
        vec![(
            CauseKind::Link,
            format!("spine layer <-> {}", tor_name(3)),
            None
        )]
    );
}

#[test]
fn a_spine_dropping_thirty_percent_is_the_switch() {
    let fabric = Fabric::new(spec(false), 8);
    let fault = [Fault::Spine {
        spine: 2,
        loss: 0.3,
    }];
    assert_eq!(
        named(&causes(&fabric, &fault, true, 9)),
        vec![(CauseKind::Switch, spine_name(2), None)]
    );
    assert_eq!(
        named(&causes(&fabric, &fault, false, 9)),
        vec![(CauseKind::Switch, "spine layer".to_owned(), None)]
    );
}

#[test]
fn a_host_and_a_tor_at_once_are_both_named() {
    let fabric = Fabric::new(spec(false), 9);
    let found = causes(
        &fabric,
        &[
            Fault::Host { host: 1, loss: 1.0 },
            Fault::Tor { tor: 3, loss: 0.2 },
        ],
        true,
        10,
    );
    let mut got = named(&found);
    got.sort();
    assert_eq!(
        got,
        vec![
            (CauseKind::Host, host_name(1), Some(Side::Both)),
            (CauseKind::Tor, tor_name(3), None)
        ]
    );
}

#[test]
fn causes_say_which_open_findings_they_explain() {
    let fabric = Fabric::new(spec(false), 10);
    let (paths, _) = fabric.window(&[Fault::Host { host: 5, loss: 1.0 }], 11, 0.01);
    let bad = paths
        .iter()
        .find(|p| p.lost > 0 && p.kind == ProbeKind::TorMesh)
        .unwrap();
    let finding = Finding {
        kind: FindingKind::PathLoss,
        location: format!("{} -> {}", bad.source_endpoint, bad.target_endpoint),
        source_tor: bad.source_tor.clone(),
        target_tor: bad.target_tor.clone(),
        opened_at_window_ms: 0,
        first_bad_window_ms: 0,
        last_bad_window_ms: 0,
        evidence: String::new(),
        loss_ratio: Some(1.0),
        p99_ns: None,
        cleared_at_window_ms: None,
        clear_reason: None,
    };
    let node_of = |e: &str| fabric.node_of_name.get(e).map(String::as_str);
    let found = localize(
        &WindowEvidence {
            windows: &[&paths],
            node_of: &node_of,
            traces: None,
            findings: std::slice::from_ref(&finding),
            horizon: None,
        },
        &settings(),
    );
    assert_eq!(
        found[0].explains,
        vec![format!("pathLoss {}", finding.location)]
    );
}

#[test]
fn a_slow_responder_host_is_a_host_delay_cause_not_a_network_one() {
    let fabric = Fabric::new(spec(false), 11);
    let (mut paths, _) = fabric.window(&[], 12, 0.01);
    let slow = fabric.endpoint_names[3].clone();
    for p in &mut paths {
        p.prober_p99_ns = Some(20_000);
        p.responder_p99_ns = Some(if p.target_endpoint == slow {
            40_000_000
        } else {
            25_000
        });
    }
    let node_of = |e: &str| fabric.node_of_name.get(e).map(String::as_str);
    let found = localize(
        &WindowEvidence {
            windows: &[&paths],
            node_of: &node_of,
            traces: None,
            findings: &[],
            horizon: None,
        },
        &settings(),
    );
    assert_eq!(found.len(), 1, "{:?}", named(&found));
    assert_eq!(
        (found[0].kind, found[0].signal, found[0].side),
        (CauseKind::Host, Signal::HostDelay, Some(Side::Responder))
    );
    assert_eq!(found[0].component, host_name(3));
}

#[test]
fn a_cause_opens_after_two_windows_and_clears_after_three() {
    let fabric = Fabric::new(spec(false), 12);
    let mut tracker = CauseTracker::new(2, 3);
    let fault = [Fault::Host { host: 2, loss: 1.0 }];
    let step = |tracker: &mut CauseTracker, w: u64, faults: &[Fault]| {
        tracker.step(w, &causes(&fabric, faults, false, w), true)
    };
    assert!(step(&mut tracker, 1, &fault).opened.is_empty());
    let opened = step(&mut tracker, 2, &fault).opened;
    assert_eq!(opened.len(), 1);
    assert_eq!(opened[0].opened_at_window_ms, 2);
    assert_eq!(opened[0].first_window_ms, 1);
    // A window without data changes nothing.
    assert_eq!(tracker.step(3, &[], false), CauseTransitions::default());
    assert!(step(&mut tracker, 4, &[]).cleared.is_empty());
    assert!(step(&mut tracker, 5, &[]).cleared.is_empty());
    let cleared = step(&mut tracker, 6, &[]).cleared;
    assert_eq!(cleared.len(), 1);
    assert_eq!(cleared[0].cleared_at_window_ms, Some(6));
    assert!(tracker.open().is_empty());
}

/// Windows of `fabric` under `faults` (`fault_in` says, per window, whether the
/// faults are in), each localized once with its two predecessors and `horizon`,
/// as the analyzer does: the causes of each window.
fn causes_with_horizon(
    fabric: &Fabric,
    faults: &[Fault],
    fault_in: impl Fn(usize) -> bool,
    windows: usize,
    seed: u64,
) -> Vec<Vec<RootCause>> {
    let horizon = NetworkHorizon::new();
    let mut book = TraceBook::default();
    let mut recent: Vec<Vec<PathStats>> = Vec::new();
    (0..windows)
        .map(|w| {
            let now: &[Fault] = if fault_in(w) { faults } else { &[] };
            let (paths, t) = fabric.window(now, seed * 1000 + w as u64, 0.01);
            book.merge(t);
            recent.push(paths);
            if recent.len() > 3 {
                recent.remove(0);
            }
            let slices: Vec<&[PathStats]> = recent.iter().map(Vec::as_slice).collect();
            let node_of = |e: &str| fabric.node_of_name.get(e).map(String::as_str);
            localize(
                &WindowEvidence {
                    windows: &slices,
                    node_of: &node_of,
                    traces: Some(&book as &dyn PathTraces),
                    findings: &[],
                    horizon: Some(&horizon),
                },
                &settings(),
            )
        })
        .collect()
}

/// A fabric where one link carries about 50 probed flows a window, as one
/// uplink of 32 does at the default rates.
fn wide_spec() -> FabricSpec {
    FabricSpec {
        spines: 8,
        groups: 8,
        hosts_per_group: 10,
        rnics_per_host: 1,
        rail_optimized: false,
        tor_mesh_probes: 50,
        inter_tor_probes: 5,
        inter_tor_sample_tors: 10,
        inter_tor_flows: 64,
        background_loss: 1e-4,
    }
}

fn link_named(causes: &[RootCause], spine: u32, tor: u32) -> bool {
    causes.iter().any(|c| {
        c.kind == CauseKind::Link
            && c.component == format!("{} -> {}", spine_name(spine), tor_name(tor))
    })
}

#[test]
fn weak_persistent_loss_on_one_link_is_named_over_the_horizon_not_in_one_window() {
    let fabric = Fabric::new(wide_spec(), 11);
    let fault = Fault::Downlink {
        spine: 3,
        tor: 5,
        loss: 0.02,
    };
    let per_window = causes_with_horizon(
        &fabric,
        std::slice::from_ref(&fault),
        |_| true,
        HORIZON_WINDOWS,
        11,
    );
    // Nothing else is ever blamed.
    for (w, causes) in per_window.iter().enumerate() {
        for c in causes {
            assert!(
                link_named(std::slice::from_ref(c), 3, 5),
                "window {w}: {}",
                c.summary
            );
        }
    }
    // One window of it is not enough (a few lost flows at most)...
    assert!(per_window[0].is_empty(), "{:?}", named(&per_window[0]));
    // ...the horizon is.
    let first = per_window.iter().position(|c| link_named(c, 3, 5));
    assert!(first.is_some_and(|w| w >= 1), "{first:?}");
    assert!(link_named(per_window.last().unwrap(), 3, 5));
}

#[test]
fn the_same_loss_for_one_window_on_a_clean_fabric_is_not_named() {
    let fabric = Fabric::new(wide_spec(), 12);
    let fault = Fault::Downlink {
        spine: 2,
        tor: 1,
        loss: 0.02,
    };
    // One faulty window amid clean ones: 1-2 failing flows, never enough.
    let per_window = causes_with_horizon(&fabric, &[fault], |w| w == 4, 12, 12);
    for (w, causes) in per_window.iter().enumerate() {
        assert!(causes.is_empty(), "window {w}: {:?}", named(causes));
    }
}

#[test]
fn a_clean_fabric_blames_nothing_with_the_horizon() {
    let fabric = Fabric::new(wide_spec(), 13);
    for (w, causes) in causes_with_horizon(&fabric, &[], |_| true, 2 * HORIZON_WINDOWS, 13)
        .iter()
        .enumerate()
    {
        assert!(causes.is_empty(), "window {w}: {:?}", named(causes));
    }
}

#[test]
fn horizon_causes_clear_after_the_fault_is_gone() {
    let fabric = Fabric::new(wide_spec(), 14);
    // A strong fault: named in its first window, gone one clean window after.
    let strong = Fault::Downlink {
        spine: 1,
        tor: 6,
        loss: 0.3,
    };
    let per_window = causes_with_horizon(&fabric, &[strong], |w| w < 4, 10, 14);
    assert!(
        link_named(&per_window[0], 1, 6),
        "{:?}",
        named(&per_window[0])
    );
    assert!(link_named(&per_window[3], 1, 6));
    for (w, causes) in per_window.iter().enumerate().skip(5) {
        assert!(causes.is_empty(), "window {w}: {:?}", named(causes));
    }
    // A weak one takes longer to be believed gone, but is gone within the horizon.
    let weak = Fault::Uplink {
        tor: 2,
        spine: 4,
        loss: 0.03,
    };
    let faulty = HORIZON_WINDOWS;
    let per_window = causes_with_horizon(
        &fabric,
        &[weak],
        |w| w < faulty,
        faulty + HORIZON_WINDOWS,
        15,
    );
    let named_up = |c: &[RootCause]| {
        c.iter()
            .any(|c| c.component == format!("{} -> {}", tor_name(2), spine_name(4)))
    };
    assert!(per_window[..faulty].iter().any(|c| named_up(c)));
    let last = per_window.iter().rposition(|c| named_up(c)).unwrap_or(0);
    assert!(
        last < faulty + HORIZON_WINDOWS - 1,
        "still named at window {last}"
    );
    for (w, causes) in per_window.iter().enumerate().skip(faulty) {
        for c in causes {
            assert!(
                named_up(std::slice::from_ref(c)),
                "window {w}: {}",
                c.summary
            );
        }
    }
}

#[test]
fn a_weak_spine_is_the_switch_not_its_links() {
    let fabric = Fabric::new(wide_spec(), 16);
    let fault = Fault::Spine {
        spine: 5,
        loss: 0.01,
    };
    let per_window = causes_with_horizon(&fabric, &[fault], |_| true, 8, 16);
    let mut switch_named = false;
    for (w, causes) in per_window.iter().enumerate() {
        for c in causes {
            assert_eq!(
                (c.kind, c.component.as_str()),
                (CauseKind::Switch, spine_name(5).as_str()),
                "window {w}: {}",
                c.summary
            );
            switch_named = true;
        }
    }
    assert!(switch_named);
}

#[test]
fn retain_flows_keeps_exactly_the_flows_accepted() {
    let hops = |names: &[&str]| names.iter().map(|&n| Arc::<str>::from(n)).collect();
    let mut book = TraceBook::default();
    for flow in 0..4u16 {
        book.insert("a/0", "b/0", flow, hops(&["tor-a", "spine-1", "tor-b"]));
        book.insert("c/0", "b/0", flow, hops(&["tor-c", "spine-2", "tor-b"]));
    }
    book.insert_return("a/0", "b/0", 2, hops(&["tor-b", "spine-1", "tor-a"]));
    assert_eq!((book.len(), book.both_ways()), (8, 1));
    book.retain_flows(|source, _, flow| source == "a/0" && flow >= 2);
    assert_eq!((book.len(), book.both_ways()), (2, 1));
    let ab = book.path("a/0", "b/0").expect("a -> b keeps flows 2 and 3");
    assert!(ab.hops(1).is_none() && ab.hops(2).is_some() && ab.hops(3).is_some());
    assert!(ab.return_hops(2).is_some());
    assert!(
        book.path("c/0", "b/0").is_none(),
        "a path left without flows goes"
    );
}
