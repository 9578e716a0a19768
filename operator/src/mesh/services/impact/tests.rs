use std::collections::HashMap;

use super::*;
use crate::mesh::localize::{CauseEvidence, TraceBook};
use crate::mesh::services::flow::FlowKind;
use crate::mesh::services::identity::PodIdentity;
use crate::mesh::services::identity::tests::{FixedPods, job};
use crate::mesh::services::table::NodeFlows;

/// Hosts h11, h12 under tor1, h21 under tor2, h31 under tor3; one UDP endpoint each.
fn at(host: &str) -> Arc<Placement> {
    Arc::new(Placement {
        endpoint: format!("{host}/udp0"),
        node: host.to_owned(),
        tor: format!("tor{}", &host[1..2]),
        transport: 1,
    })
}

fn path(uid: &str, from: &str, to: Option<&str>, flows: u32, label: u32) -> ServicePath {
    ServicePath {
        owner: FlowOwner::Pod { uid: uid.into() },
        kind: if label == 0 {
            FlowKind::Tcp
        } else {
            FlowKind::Rdma
        },
        local: at(from),
        remote: to.map(at),
        flows,
        flow_label: label,
    }
}

fn table(paths: Vec<(&str, ServicePath)>) -> ServiceTable {
    let mut by_node: HashMap<&str, Vec<ServicePath>> = HashMap::new();
    for (node, p) in paths {
        by_node.entry(node).or_default().push(p);
    }
    let mut table = ServiceTable::default();
    for (node, paths) in by_node {
        table.insert(
            node,
            NodeFlows {
                paths,
                ..NodeFlows::default()
            },
        );
    }
    table
}

fn cause(kind: CauseKind, component: &str, node: Option<&str>) -> OpenRootCause {
    OpenRootCause {
        cause: RootCause {
            kind,
            component: component.to_owned(),
            side: None,
            signal: Signal::Loss,
            node: node.map(str::to_owned),
            tor: None,
            confidence: 0.9,
            evidence: CauseEvidence::default(),
            candidates: Vec::new(),
            explains: Vec::new(),
            summary: String::new(),
        },
        opened_at_window_ms: 0,
        first_window_ms: 0,
        last_window_ms: 0,
        cleared_at_window_ms: None,
    }
}

fn finding(kind: FindingKind, location: &str) -> Finding {
    Finding {
        kind,
        location: location.to_owned(),
        source_tor: String::new(),
        target_tor: String::new(),
        opened_at_window_ms: 0,
        first_bad_window_ms: 0,
        last_bad_window_ms: 0,
        evidence: String::new(),
        loss_ratio: None,
        p99_ns: None,
        cleared_at_window_ms: None,
        clear_reason: None,
    }
}

fn pods() -> FixedPods {
    let mut pods = FixedPods::default();
    for (uid, pod, owner) in [
        ("t0", "train-0", "train"),
        ("t1", "train-1", "train"),
        ("s0", "store-0", "store"),
    ] {
        pods.0.insert(
            uid.to_owned(),
            PodIdentity {
                namespace: "ml".to_owned(),
                name: pod.to_owned(),
                owner: Some(job(owner)),
            },
        );
    }
    pods
}

fn ids(services: &[ImpactedService]) -> Vec<&str> {
    services.iter().map(|s| s.service.as_str()).collect()
}

#[test]
fn a_host_cause_hits_the_services_with_flows_at_that_host_ranked_by_flows_then_pods() {
    let t = table(vec![
        ("h11", path("t0", "h11", Some("h31"), 4, 0)),
        ("h12", path("t1", "h12", Some("h31"), 4, 0)),
        ("h21", path("s0", "h21", Some("h31"), 6, 0)),
        ("h21", path("x9", "h21", Some("h12"), 50, 0)),
    ]);
    let pods = pods();
    let impact = compute(
        &t,
        &[cause(CauseKind::Host, "h31", Some("h31"))],
        &[],
        Some(&pods),
        None,
    );
    let hit = &impact.root_causes[0];
    // train: 8 flows over 2 pods beats store's 6; the unrelated big service is not hit.
    assert_eq!(ids(&hit.services), ["Job/ml/train", "Job/ml/store"]);
    assert_eq!(hit.services[0].flows, 8);
    assert_eq!(hit.services[0].pods, 2);
    assert_eq!(hit.services[0].workload, Some(job("train")));
    assert_eq!(hit.service_count, 2);
    assert_eq!(ids(&impact.ranking), ["Job/ml/train", "Job/ml/store"]);
}

#[test]
fn equal_flows_rank_by_pods() {
    let t = table(vec![
        ("h11", path("t0", "h11", Some("h21"), 2, 0)),
        ("h12", path("t1", "h12", Some("h21"), 2, 0)),
        ("h31", path("s0", "h31", Some("h21"), 4, 0)),
    ]);
    let pods = pods();
    let impact = compute(
        &t,
        &[cause(CauseKind::Tor, "tor2", None)],
        &[],
        Some(&pods),
        None,
    );
    assert_eq!(
        ids(&impact.root_causes[0].services),
        ["Job/ml/train", "Job/ml/store"]
    );
}

#[test]
fn endpoint_and_tor_causes_hit_either_end_and_local_only_paths_at_their_local_end() {
    let t = table(vec![
        ("h11", path("a", "h11", Some("h21"), 1, 0)),
        ("h31", path("b", "h31", None, 1, 0)),
    ]);
    let hit = |c: OpenRootCause| {
        let impact = compute(&t, &[c], &[], None, None);
        ids(&impact.root_causes[0].services)
            .into_iter()
            .map(str::to_owned)
            .collect::<Vec<_>>()
    };
    assert_eq!(
        hit(cause(CauseKind::Endpoint, "h21/udp0", Some("h21"))),
        ["PodUID/a"]
    );
    assert_eq!(hit(cause(CauseKind::Tor, "tor3", None)), ["PodUID/b"]);
    assert!(hit(cause(CauseKind::Tor, "tor9", None)).is_empty());
}

#[test]
fn spine_causes_hit_only_paths_between_tors() {
    let t = table(vec![
        ("h11", path("intra", "h11", Some("h12"), 1, 0)),
        ("h11", path("inter", "h11", Some("h31"), 1, 0)),
    ]);
    let impact = compute(
        &t,
        &[
            cause(CauseKind::Switch, "spine layer", None),
            cause(CauseKind::Link, "spine layer <-> tor3", None),
            cause(CauseKind::Link, "spine layer <-> tor2", None),
        ],
        &[],
        None,
        None,
    );
    assert_eq!(ids(&impact.root_causes[0].services), ["PodUID/inter"]);
    assert_eq!(ids(&impact.root_causes[1].services), ["PodUID/inter"]);
    assert!(impact.root_causes[2].services.is_empty());
}

#[test]
fn a_traced_link_hits_the_service_whose_own_route_crosses_it() {
    let t = table(vec![
        ("h11", path("via-sp1", "h11", Some("h31"), 1, 0x11)),
        ("h12", path("via-sp2", "h12", Some("h31"), 1, 0x22)),
    ]);
    let mut book = TraceBook::default();
    let hops = |names: &[&str]| names.iter().map(|n| Arc::<str>::from(*n)).collect();
    book.insert("h11/udp0", "h31/udp0", 0, hops(&["tor1", "sp1", "tor3"]));
    book.insert("h12/udp0", "h31/udp0", 0, hops(&["tor1", "sp2", "tor3"]));
    let routes = TracedRoutes(&book);
    let impact = compute(
        &t,
        &[
            cause(CauseKind::Link, "sp2 -> tor3", None),
            cause(CauseKind::Switch, "sp1", None),
        ],
        &[],
        None,
        Some(&routes),
    );
    assert_eq!(ids(&impact.root_causes[0].services), ["PodUID/via-sp2"]);
    assert_eq!(ids(&impact.root_causes[1].services), ["PodUID/via-sp1"]);
}

#[test]
fn without_a_trace_a_link_hits_the_paths_of_the_findings_it_explains() {
    let t = table(vec![
        ("h11", path("hit", "h11", Some("h31"), 1, 0)),
        ("h12", path("missed", "h12", Some("h21"), 1, 0)),
    ]);
    let mut link = cause(CauseKind::Link, "sp2 -> tor3", None);
    link.cause.explains = vec!["pathLoss h31/udp0 -> h11/udp0".to_owned()];
    let impact = compute(&t, &[link], &[], None, None);
    assert_eq!(ids(&impact.root_causes[0].services), ["PodUID/hit"]);
}

#[test]
fn findings_hit_paths_on_their_endpoint_or_tor_pair_either_way() {
    let t = table(vec![
        ("h11", path("a", "h11", Some("h31"), 1, 0)),
        ("h12", path("b", "h12", Some("h21"), 1, 0)),
        ("h12", path("c", "h12", None, 1, 0)),
    ]);
    let impact = compute(
        &t,
        &[],
        &[
            finding(FindingKind::PathLoss, "h31/udp0 -> h11/udp0"),
            finding(FindingKind::TorPairLatency, "tor1 -> tor2"),
        ],
        None,
        None,
    );
    assert_eq!(ids(&impact.findings[0].services), ["PodUID/a"]);
    assert_eq!(ids(&impact.findings[1].services), ["PodUID/b"]);
    assert_eq!(ids(&impact.ranking), ["PodUID/a", "PodUID/b"]);
}

#[test]
fn a_service_hit_by_two_causes_counts_its_flows_once_in_the_ranking() {
    let t = table(vec![("h11", path("a", "h11", Some("h31"), 3, 0))]);
    let impact = compute(
        &t,
        &[
            cause(CauseKind::Host, "h11", Some("h11")),
            cause(CauseKind::Tor, "tor3", None),
        ],
        &[],
        None,
        None,
    );
    assert_eq!(impact.ranking.len(), 1);
    assert_eq!(impact.ranking[0].flows, 3);
    assert_eq!(impact.ranking[0].paths, ["h11/udp0 -> h31/udp0"]);
    assert_eq!(impact.ranking[0].hit_by, ["host h11", "tor tor3"]);
    assert!(
        impact.root_causes[0].services[0].hit_by.is_empty(),
        "only the ranking says what hits a service"
    );
}

#[test]
fn the_ranking_lists_root_causes_before_findings_whatever_path_they_hit() {
    // The finding hits the first path only, the cause the second only.
    let t = table(vec![
        ("h11", path("a", "h11", Some("h21"), 1, 0)),
        ("h12", path("a", "h12", Some("h31"), 1, 0)),
    ]);
    let causes = [
        cause(CauseKind::Host, "h31", Some("h31")),
        cause(CauseKind::Endpoint, "h12/udp0", None),
    ];
    let impact = compute(
        &t,
        &causes,
        &[finding(FindingKind::PathLoss, "h11/udp0 -> h21/udp0")],
        None,
        None,
    );
    assert_eq!(impact.ranking.len(), 1);
    assert_eq!(
        impact.ranking[0].hit_by,
        [
            "host h31",
            "endpoint h12/udp0",
            "pathLoss h11/udp0 -> h21/udp0"
        ],
        "the finding comes last, though its path comes first"
    );
    let many: Vec<OpenRootCause> = (0..MAX_HITS_LISTED + 2)
        .map(|i| cause(CauseKind::Host, &format!("h12-{i}"), Some("h12")))
        .collect();
    let capped = compute(&t, &many, &[], None, None);
    assert_eq!(capped.ranking[0].hit_by.len(), MAX_HITS_LISTED);
    assert_eq!(capped.ranking[0].hit_by[0], "host h12-0");
}

#[test]
fn processes_outside_pods_count_one_pod_per_node_and_pid() {
    let mut p1 = path("x", "h11", Some("h31"), 1, 0);
    p1.owner = FlowOwner::Process {
        command: "ib_write_bw".into(),
        pid: 10,
    };
    let mut p2 = p1.clone();
    p2.local = at("h12");
    let t = table(vec![("h11", p1), ("h12", p2)]);
    let impact = compute(&t, &[cause(CauseKind::Tor, "tor3", None)], &[], None, None);
    let s = &impact.root_causes[0].services[0];
    assert_eq!(s.service, "Process/ib_write_bw");
    assert_eq!((s.flows, s.pods), (2, 2));
}
