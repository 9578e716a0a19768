use std::collections::{BTreeMap, HashMap};

use pingmesh_proto::v1::{TraceRequest, TraceResult, Transport};

use super::*;
use crate::mesh::localize::PathTraces;
use crate::mesh::types::MeshEndpoint;

fn endpoint(node: &str, tor: &str, ip: &str) -> MeshEndpoint {
    MeshEndpoint {
        id: format!("{node}/udp0"),
        node: node.into(),
        tor: tor.into(),
        transport: Transport::Udp as i32,
        address: format!("{ip}:9403"),
        qpn: 0,
        device: String::new(),
        tor_from_agent: true,
    }
}

fn mesh() -> HashMap<String, MeshEndpoint> {
    [
        endpoint("h11", "tor1", "10.0.1.11"),
        endpoint("h31", "tor3", "10.0.3.11"),
    ]
    .into_iter()
    .map(|e| (e.id.clone(), e))
    .collect()
}

fn path(probed: u64, lost: u64) -> ProbedPath<'static> {
    ProbedPath {
        source: "h11/udp0",
        target: "h31/udp0",
        probed_flows: probed,
        lost_flows: lost,
    }
}

/// tor1 answers from 10.0.1.1, sp1 from 10.0.13.1 (towards tor3) or
/// 10.0.11.1 (towards tor1), tor3 from 10.0.3.1 or 10.0.13.2.
fn switch_map() -> BTreeMap<String, Vec<std::net::IpAddr>> {
    let ip = |s: &str| s.parse().unwrap();
    BTreeMap::from([
        ("tor1".into(), vec![ip("10.0.1.1"), ip("10.0.11.2")]),
        ("sp1".into(), vec![ip("10.0.11.1"), ip("10.0.13.1")]),
        ("tor3".into(), vec![ip("10.0.3.1"), ip("10.0.13.2")]),
    ])
}

fn planner(switches: BTreeMap<String, Vec<std::net::IpAddr>>) -> TracePlanner {
    TracePlanner::new(
        TraceSettings {
            switches,
            ..TraceSettings::default()
        },
        None,
    )
    .unwrap()
}

fn answer(request: &TraceRequest, source_port: u32, hops: &[&str]) -> TraceResult {
    TraceResult {
        id: request.id,
        source_port,
        hops: hops.iter().map(|h| (*h).to_owned()).collect(),
        ..TraceResult::default()
    }
}

#[test]
fn a_failing_flow_is_traced_both_ways_and_its_hops_are_named() {
    let mesh = mesh();
    let mut p = planner(switch_map());
    // Flow 2 lost probes; flows 0 and 2 were probed.
    p.plan([path(0b101, 0b100)], &mesh, 1_000);
    let asked = p.exchange("h11", Vec::new(), &mesh, 1_000);
    assert_eq!(
        asked.len(),
        2,
        "the failing flow and a healthy one: {asked:?}"
    );
    assert!(asked.iter().all(|r| r.source_endpoint == "h11/udp0"));
    let failing = asked.iter().find(|r| r.flow == 2).unwrap();
    assert_eq!(failing.target.as_ref().unwrap().id, "h31/udp0");

    // h31 cannot answer h11's requests.
    let forged = answer(failing, 40_002, &["10.0.1.1", "10.0.13.1", "10.0.13.2"]);
    assert!(
        p.exchange("h31", vec![forged.clone()], &mesh, 1_100)
            .is_empty()
    );
    assert!(p.book().is_empty());

    p.exchange("h11", vec![forged], &mesh, 1_200);
    let book = p.book();
    let trace = book.path("h11/udp0", "h31/udp0").unwrap();
    let names: Vec<&str> = trace.hops(2).unwrap().iter().map(AsRef::as_ref).collect();
    assert_eq!(names, ["tor1", "sp1", "tor3"]);

    // The way back is asked of the responder's agent, to the port used.
    let back = p.exchange("h31", Vec::new(), &mesh, 1_300);
    assert_eq!(back.len(), 1);
    assert_eq!(back[0].source_endpoint, "h31/udp0");
    assert_eq!(back[0].prober.as_ref().unwrap().id, "h11/udp0");
    assert_eq!(back[0].prober_port, 40_002);
    p.exchange(
        "h31",
        vec![answer(
            &back[0],
            9403,
            &["10.0.3.1", "10.0.13.1", "10.0.11.2"],
        )],
        &mesh,
        1_400,
    );
    let book = p.book();
    let back_names: Vec<&str> = book
        .path("h11/udp0", "h31/udp0")
        .unwrap()
        .return_hops(2)
        .unwrap()
        .iter()
        .map(AsRef::as_ref)
        .collect();
    assert_eq!(back_names, ["tor3", "sp1", "tor1"]);
}

#[test]
fn a_trace_cut_short_or_malformed_is_not_kept() {
    let mesh = mesh();
    let mut p = planner(switch_map());
    p.plan([path(0b11, 0b11)], &mesh, 1_000);
    let asked = p.exchange("h11", Vec::new(), &mesh, 1_000);
    assert_eq!(asked.len(), 2);
    let short = answer(&asked[0], 40_000, &["10.0.1.1", "10.0.13.1"]);
    let garbage = answer(&asked[1], 40_001, &["not an address"]);
    p.exchange("h11", vec![short, garbage], &mesh, 1_100);
    assert!(p.book().is_empty());
    assert_eq!(
        p.waiting("h31"),
        0,
        "no way back asked for an unusable trace"
    );
    // Both flows may be asked again at once: nothing is outstanding.
    p.plan([path(0b11, 0b11)], &mesh, 40_000);
    assert_eq!(p.exchange("h11", Vec::new(), &mesh, 40_000).len(), 2);
}

#[test]
fn an_agent_that_cannot_trace_is_left_alone_for_a_while() {
    let mesh = mesh();
    let mut p = planner(BTreeMap::new());
    p.plan([path(0b1, 0b1)], &mesh, 1_000);
    let asked = p.exchange("h11", Vec::new(), &mesh, 1_000);
    let refused = TraceResult {
        id: asked[0].id,
        error: "no_privilege: path traces need CAP_NET_RAW".into(),
        ..TraceResult::default()
    };
    p.exchange("h11", vec![refused], &mesh, 1_100);
    p.plan([path(0b1, 0b1)], &mesh, 60_000);
    assert!(p.exchange("h11", Vec::new(), &mesh, 60_000).is_empty());
    p.plan([path(0b1, 0b1)], &mesh, 1_000_000);
    assert_eq!(p.exchange("h11", Vec::new(), &mesh, 1_000_000).len(), 1);
}

#[test]
fn healthy_flows_are_sampled_within_the_budget_and_refreshed_late() {
    let mesh = mesh();
    let mut p = TracePlanner::new(
        TraceSettings {
            healthy_per_window: 4,
            per_exchange: 100,
            ..TraceSettings::default()
        },
        None,
    )
    .unwrap();
    let all = u64::MAX; // 64 healthy flows
    let mut seen = std::collections::HashSet::new();
    for window in 0..16u64 {
        let now = 1_000 + window * 5_000;
        p.plan([path(all, 0)], &mesh, now);
        let asked = p.exchange("h11", Vec::new(), &mesh, now);
        assert!(asked.len() <= 4, "window {window}: {}", asked.len());
        let results = asked
            .iter()
            .map(|r| {
                seen.insert(r.flow);
                answer(r, 40_000 + r.flow, &["10.0.1.1", "10.0.13.1", "10.0.3.1"])
            })
            .collect();
        p.exchange("h11", results, &mesh, now + 1);
    }
    assert_eq!(seen.len(), 64, "every flow had its turn");
    // All traced and fresh: nothing more to ask.
    p.plan([path(all, 0)], &mesh, 90_000);
    assert!(p.exchange("h11", Vec::new(), &mesh, 90_000).is_empty());
    assert_eq!(p.book().len(), 64);
}

#[test]
fn unanswered_requests_expire_and_are_asked_again() {
    let mesh = mesh();
    let mut p = planner(BTreeMap::new());
    p.plan([path(0b1, 0b1)], &mesh, 1_000);
    assert_eq!(p.exchange("h11", Vec::new(), &mesh, 1_000).len(), 1);
    p.plan([path(0b1, 0b1)], &mesh, 10_000);
    assert!(
        p.exchange("h11", Vec::new(), &mesh, 10_000).is_empty(),
        "still outstanding"
    );
    p.plan([path(0b1, 0b1)], &mesh, 40_000);
    assert_eq!(p.exchange("h11", Vec::new(), &mesh, 40_000).len(), 1);
}

#[test]
fn a_lost_way_back_is_asked_again_without_tracing_the_way_there_again() {
    let mesh = mesh();
    let mut p = planner(switch_map());
    p.plan([path(0b1, 0b1)], &mesh, 1_000);
    let asked = p.exchange("h11", Vec::new(), &mesh, 1_000);
    let there = answer(&asked[0], 40_000, &["10.0.1.1", "10.0.13.1", "10.0.13.2"]);
    p.exchange("h11", vec![there], &mesh, 1_100);
    let back = p.exchange("h31", Vec::new(), &mesh, 1_200);
    assert_eq!(back.len(), 1);
    // The way back comes in cut short (a lost ICMP answer): not kept.
    let short = answer(&back[0], 9403, &["10.0.3.1", "10.0.13.1"]);
    p.exchange("h31", vec![short], &mesh, 1_300);
    assert_eq!((p.book().len(), p.book().both_ways()), (1, 0));

    // The flow still fails: the next window asks the responder again, to the
    // port the forward trace reported, and not the prober.
    p.plan([path(0b1, 0b1)], &mesh, 6_000);
    assert!(p.exchange("h11", Vec::new(), &mesh, 6_000).is_empty());
    let again = p.exchange("h31", Vec::new(), &mesh, 6_000);
    assert_eq!(again.len(), 1);
    assert_eq!(again[0].prober_port, 40_000);
    let full = answer(&again[0], 9403, &["10.0.3.1", "10.0.13.1", "10.0.11.2"]);
    p.exchange("h31", vec![full], &mesh, 6_100);
    assert_eq!(p.book().both_ways(), 1);
    // Complete both ways and fresh: nothing more to ask.
    p.plan([path(0b1, 0b1)], &mesh, 11_000);
    assert!(p.exchange("h11", Vec::new(), &mesh, 11_000).is_empty());
    assert!(p.exchange("h31", Vec::new(), &mesh, 11_000).is_empty());
}

#[test]
fn state_of_endpoints_that_left_the_mesh_is_dropped() {
    let mut mesh = mesh();
    let mut p = planner(switch_map());
    p.plan([path(0b101, 0b100)], &mesh, 1_000);
    let asked = p.exchange("h11", Vec::new(), &mesh, 1_000);
    let failing = asked.iter().find(|r| r.flow == 2).unwrap();
    let hops = ["10.0.1.1", "10.0.13.1", "10.0.13.2"];
    p.exchange("h11", vec![answer(failing, 40_002, &hops)], &mesh, 1_100);
    assert_eq!(p.book().len(), 1);
    assert_eq!(p.waiting("h31"), 1, "the way back is queued for h31");
    assert!(p.flow_records() > 0);

    // h31 leaves. Until the next pruning nothing is lost...
    mesh.remove("h31/udp0");
    p.plan(std::iter::empty(), &mesh, 6_000);
    assert_eq!(p.book().len(), 1);
    // ...and once it comes, no record, request or trace of h31 is left.
    for w in 2..=planner::PRUNE_EVERY_WINDOWS {
        p.plan(std::iter::empty(), &mesh, 1_000 + u64::from(w) * 5_000);
    }
    assert_eq!(p.book().len(), 0);
    assert_eq!(p.book().both_ways(), 0);
    assert!(p.book().path("h11/udp0", "h31/udp0").is_none());
    assert_eq!(p.waiting("h31"), 0);
    assert_eq!(p.flow_records(), 0);
}

#[test]
fn pruning_keeps_the_traces_of_endpoints_still_there() {
    let mesh = mesh();
    let mut p = planner(switch_map());
    p.plan([path(0b1, 0b1)], &mesh, 1_000);
    let asked = p.exchange("h11", Vec::new(), &mesh, 1_000);
    let hops = ["10.0.1.1", "10.0.13.1", "10.0.13.2"];
    p.exchange("h11", vec![answer(&asked[0], 40_000, &hops)], &mesh, 1_100);
    let before = p.book();
    p.forget_departed(&mesh);
    assert_eq!(p.book().len(), 1);
    assert!(
        std::sync::Arc::ptr_eq(&before, &p.book()),
        "nothing left, so the shared book is not copied"
    );
    assert_eq!(p.waiting("h31"), 1);
}
