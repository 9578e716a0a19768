//! What the operator publishes from findings and root causes: Events on the
//! PingMesh and on Nodes, and the opt-in Node condition, against a scripted
//! API server.
#![cfg(feature = "kubernetes")]
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

#[path = "support/fake_api.rs"]
mod fake_api;

use std::sync::{Arc, Mutex};

use k8s_openapi::api::core::v1::ObjectReference;
use kube::runtime::watcher;
use pingmesh_operator::config::MeshConfig;
use pingmesh_operator::crd::{DEFAULT_NODE_CONDITION_TYPE, NodeHealthSpec};
use pingmesh_operator::mesh::analyzer::{ClearReason, Finding, FindingKind};
use pingmesh_operator::mesh::controller::MeshController;
use pingmesh_operator::mesh::localize::{
    CauseEvidence, CauseKind, OpenRootCause, RootCause, Side, Signal,
};
use pingmesh_operator::mesh::registry::open_registry;
use pingmesh_operator::mesh::services::impact::CauseImpact;
use pingmesh_operator::mesh::services::{ImpactedService, ServiceImpact, ServiceName, WorkloadRef};
use pingmesh_operator::mesh::types::MeshEndpoint;
use pingmesh_operator::reconcile::{
    EVENT_RETRIES, EventObject, FIELD_MANAGER, FindingsPublisher, FindingsView, HOLD_WINDOWS,
    MAX_ANNOUNCED, NO_ROOT_CAUSE_REASON, NodeMeta, PAUSE_AFTER_FAILURE, ROOT_CAUSE_CLEARED_REASON,
    ROOT_CAUSE_REASON, ReconcileMetrics, SERVICE_HIT_REASON, SourceSettings, node_cache,
};
use pingmesh_proto::v1::{Endpoint, Transport, WindowSummary};
use pingmesh_proto::window::{unix_now_ms, window_start};
use serde_json::Value;
use tokio_util::sync::CancellationToken;

use fake_api::{Seen, World};

const MESH_EVENTS: &str = "/apis/events.k8s.io/v1/namespaces/pingmesh-system/events";
const NODE_EVENTS: &str = "/apis/events.k8s.io/v1/namespaces/default/events";

struct Harness {
    publisher: FindingsPublisher,
    world: Arc<Mutex<World>>,
    metrics: ReconcileMetrics,
    server: tokio::task::JoinHandle<()>,
    /// Requests seen before the current step.
    mark: usize,
    /// Passed to every pass.
    cancel: CancellationToken,
}

impl Harness {
    /// Nodes n1..=n6 (uids uid-n1..) under tor-a, each with one UDP endpoint.
    fn start() -> Self {
        let mut world = World::default();
        let (store, mut writer) = node_cache();
        for i in 1..=6 {
            let name = format!("n{i}");
            world
                .nodes
                .insert(name.clone(), fake_api::node(&name, &format!("uid-{name}")));
            let mut meta = NodeMeta::default();
            meta.metadata.name = Some(name.clone());
            meta.metadata.uid = Some(format!("uid-{name}"));
            writer.apply_watcher_event(&watcher::Event::Apply(meta));
        }
        let (client, world, server) = fake_api::start(world);
        let metrics = ReconcileMetrics::new().unwrap();
        let publisher =
            FindingsPublisher::new(client, Some("operator-0".into()), store, metrics.clone());
        Self {
            publisher,
            world,
            metrics,
            server,
            mark: 0,
            cancel: CancellationToken::new(),
        }
    }

    /// One pass; returns the requests it made.
    async fn sync(&mut self, view: &FindingsView, settings: &SourceSettings) -> Vec<Seen> {
        self.publisher.sync(view, settings, &self.cancel).await;
        let seen = self.world.lock().unwrap().seen.clone();
        let new = seen[self.mark..].to_vec();
        self.mark = seen.len();
        new
    }

    fn node(&self, name: &str) -> Value {
        self.world.lock().unwrap().nodes[name].clone()
    }

    /// Every Event object the API server holds.
    fn stored_events(&self) -> Vec<Value> {
        self.world
            .lock()
            .unwrap()
            .events
            .values()
            .cloned()
            .collect()
    }

    /// Sets a condition on `node` as a previous operator process left it.
    fn left_behind(&self, node: &str, status: &str, reason: &str) {
        let mut world = self.world.lock().unwrap();
        world.nodes.get_mut(node).unwrap()["status"]["conditions"]
            .as_array_mut()
            .unwrap()
            .push(serde_json::json!({
                "type": DEFAULT_NODE_CONDITION_TYPE, "status": status, "reason": reason,
                "message": "written before the restart",
                "lastTransitionTime": "2026-01-01T00:00:00Z",
            }));
    }
}

impl Drop for Harness {
    fn drop(&mut self) {
        self.server.abort();
    }
}

fn endpoint(node: &str) -> MeshEndpoint {
    MeshEndpoint {
        id: format!("{node}/udp0"),
        node: node.to_owned(),
        tor: "tor-a".to_owned(),
        transport: 1,
        address: "10.0.0.1:9403".to_owned(),
        qpn: 0,
        device: String::new(),
        tor_from_agent: false,
    }
}

fn fleet() -> Vec<MeshEndpoint> {
    (1..=6).map(|i| endpoint(&format!("n{i}"))).collect()
}

fn path(kind: FindingKind, from: &str, to: &str) -> Finding {
    Finding {
        kind,
        location: format!("{from}/udp0 -> {to}/udp0"),
        source_tor: "tor-a".to_owned(),
        target_tor: "tor-a".to_owned(),
        opened_at_window_ms: 1_800_000_010_000,
        first_bad_window_ms: 1_800_000_005_000,
        last_bad_window_ms: 1_800_000_010_000,
        evidence: "loss 100.0% (20/20) over 2 windows".to_owned(),
        loss_ratio: Some(1.0),
        p99_ns: None,
        cleared_at_window_ms: None,
        clear_reason: None,
    }
}

fn tor_pair(kind: FindingKind, from: &str, to: &str) -> Finding {
    Finding {
        location: format!("{from} -> {to}"),
        source_tor: from.to_owned(),
        target_tor: to.to_owned(),
        ..path(kind, "x", "y")
    }
}

fn cleared(mut finding: Finding, why: ClearReason) -> Finding {
    finding.cleared_at_window_ms = Some(1_800_000_030_000);
    finding.clear_reason = Some(why);
    finding
}

/// What a mesh controller that judged enough windows shows, no root cause open.
fn view(open: Vec<Finding>, cleared: Vec<Finding>) -> FindingsView {
    FindingsView {
        open,
        cleared,
        endpoints: fleet(),
        conditions_ready: true,
        ..FindingsView::default()
    }
}

/// The same, with root causes open.
fn with_causes(open: Vec<Finding>, causes: Vec<OpenRootCause>) -> FindingsView {
    FindingsView {
        root_causes: causes,
        ..view(open, vec![])
    }
}

/// An open root cause explaining `findings`; `node` for endpoint and host causes.
fn root_cause(kind: CauseKind, component: &str, findings: &[Finding]) -> OpenRootCause {
    let node = matches!(kind, CauseKind::Endpoint | CauseKind::Host)
        .then(|| component.split('/').next().unwrap().to_owned());
    OpenRootCause {
        cause: RootCause {
            kind,
            component: component.to_owned(),
            side: node.as_ref().map(|_| Side::Both),
            signal: Signal::Loss,
            node,
            tor: Some("tor-a".to_owned()),
            confidence: 0.9,
            evidence: CauseEvidence {
                failing: 10,
                healthy: 0,
                unit: "paths".to_owned(),
                ..CauseEvidence::default()
            },
            candidates: Vec::new(),
            explains: findings
                .iter()
                .map(|f| format!("{} {}", kind_label(f.kind), f.location))
                .collect(),
            summary: format!(
                "{} {component}: 10 of 10 paths through it losing, loss 100.0% vs 0.00% elsewhere",
                kind.label()
            ),
        },
        opened_at_window_ms: 1_800_000_010_000,
        first_window_ms: 1_800_000_005_000,
        last_window_ms: 1_800_000_010_000,
        cleared_at_window_ms: None,
    }
}

fn kind_label(kind: FindingKind) -> &'static str {
    match kind {
        FindingKind::PathLoss => "pathLoss",
        FindingKind::PathLatency => "pathLatency",
        FindingKind::TorPairLoss => "torPairLoss",
        FindingKind::TorPairLatency => "torPairLatency",
    }
}

/// What a mesh controller that (re)started moments ago shows.
fn warming_up() -> FindingsView {
    FindingsView {
        conditions_ready: false,
        ..view(vec![], vec![])
    }
}

fn settings(conditions: bool) -> SourceSettings {
    SourceSettings {
        node_health: NodeHealthSpec {
            conditions,
            ..NodeHealthSpec::default()
        },
        mesh: Some(ObjectReference {
            api_version: Some("pingmesh.io/v1alpha1".into()),
            kind: Some("PingMesh".into()),
            name: Some("default".into()),
            namespace: Some("pingmesh-system".into()),
            uid: Some("mesh-uid".into()),
            ..ObjectReference::default()
        }),
        ..SourceSettings::default()
    }
}

/// (path, type, reason, regarding name, related name) of every Event
/// created. Every request about Events must create a new one: a PATCH would
/// fold a finding into another one's Event.
fn events(seen: &[Seen]) -> Vec<(String, String, String, String, String)> {
    seen.iter()
        .filter(|s| s.is_event())
        .inspect(|s| assert_eq!(s.method, "POST", "{}", s.line()))
        .map(|s| {
            let text = |v: &Value| v.as_str().unwrap_or_default().to_owned();
            (
                s.path.clone(),
                text(&s.body["type"]),
                text(&s.body["reason"]),
                text(&s.body["regarding"]["name"]),
                text(&s.body["related"]["name"]),
            )
        })
        .collect()
}

fn event(
    path: &str,
    type_: &str,
    reason: &str,
    regarding: &str,
    related: &str,
) -> (String, String, String, String, String) {
    (
        path.to_owned(),
        type_.to_owned(),
        reason.to_owned(),
        regarding.to_owned(),
        related.to_owned(),
    )
}

/// Requests to nodes (reads and condition writes), as "METHOD path".
fn node_calls(seen: &[Seen]) -> Vec<String> {
    seen.iter()
        .filter(|s| s.path.starts_with("/api/v1/nodes/"))
        .map(Seen::line)
        .collect()
}

fn condition<'a>(node: &'a Value, type_: &str) -> Option<&'a Value> {
    node["status"]["conditions"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["type"] == type_)
}

// ---------------------------------------------------------------- Events

/// `cause` hitting Job ml/train (5 connections) and a process outside pods.
fn hitting_services(cause: &OpenRootCause) -> Arc<ServiceImpact> {
    let train = ImpactedService {
        service: "Job/ml/train".into(),
        name: ServiceName {
            kind: "Job".into(),
            namespace: "ml".into(),
            name: "train".into(),
        },
        flows: 5,
        pods: 2,
        workload: Some(WorkloadRef {
            api_version: "batch/v1".into(),
            kind: "Job".into(),
            name: "train".into(),
            uid: "uid-train".into(),
        }),
        paths: vec!["n1/udp0 -> n3/udp0".into()],
        hit_by: Vec::new(),
    };
    let process = ImpactedService {
        service: "Process/ib_write_bw".into(),
        name: ServiceName {
            kind: "Process".into(),
            namespace: String::new(),
            name: "ib_write_bw".into(),
        },
        workload: None,
        ..train.clone()
    };
    Arc::new(ServiceImpact {
        root_causes: vec![CauseImpact {
            kind: cause.cause.kind,
            signal: cause.cause.signal,
            component: cause.cause.component.clone(),
            services: vec![train, process],
            service_count: 2,
        }],
        ..ServiceImpact::default()
    })
}

#[tokio::test]
async fn a_root_cause_hitting_a_service_puts_one_event_on_its_workload_while_it_lasts() {
    let mut h = Harness::start();
    let cause = root_cause(CauseKind::Host, "n3", &[]);
    let hit = FindingsView {
        service_impact: hitting_services(&cause),
        ..with_causes(vec![], vec![cause.clone()])
    };
    let seen = h.sync(&hit, &settings(false)).await;
    let on_workloads: Vec<_> = events(&seen)
        .into_iter()
        .filter(|e| e.2 == SERVICE_HIT_REASON)
        .collect();
    assert_eq!(
        on_workloads,
        [event(
            "/apis/events.k8s.io/v1/namespaces/ml/events",
            "Warning",
            SERVICE_HIT_REASON,
            "train",
            "default"
        )],
        "one Event, on the Job in its namespace; none for the process outside pods"
    );
    let stored = h.stored_events();
    let body = stored
        .iter()
        .find(|e| e["reason"] == SERVICE_HIT_REASON)
        .unwrap();
    assert_eq!(body["regarding"]["kind"], "Job");
    assert_eq!(body["regarding"]["uid"], "uid-train");
    assert!(
        body["note"].as_str().unwrap().starts_with(
            "host n3 (loss, confidence 0.90) hits 5 connections of 2 pods of Job/ml/train"
        ),
        "{body}"
    );
    assert_eq!(h.metrics.finding_events(EventObject::Workload, true), 1);

    // The same window judged again, and the next: nothing new.
    assert!(events(&h.sync(&hit, &settings(false)).await).is_empty());
    // The cause clears, then opens again and hits the Job again: a new Event.
    h.sync(&view(vec![], vec![]), &settings(false)).await;
    let again = events(&h.sync(&hit, &settings(false)).await);
    assert_eq!(
        again.iter().filter(|e| e.2 == SERVICE_HIT_REASON).count(),
        1,
        "{again:?}"
    );
}

#[tokio::test]
async fn a_path_finding_is_announced_once_when_it_opens_and_once_when_it_clears() {
    let mut h = Harness::start();
    let loss = path(FindingKind::PathLoss, "n1", "n2");

    let opened = h
        .sync(&view(vec![loss.clone()], vec![]), &settings(false))
        .await;
    assert_eq!(
        events(&opened),
        [
            event(MESH_EVENTS, "Warning", "PathLossDetected", "default", "n1"),
            event(NODE_EVENTS, "Warning", "PathLossDetected", "n1", "n2"),
            event(NODE_EVENTS, "Warning", "PathLossDetected", "n2", "n1"),
        ]
    );
    let on_mesh = &opened[0].body;
    assert_eq!(on_mesh["regarding"]["uid"], "mesh-uid");
    assert_eq!(on_mesh["action"], "Analyze");
    assert_eq!(on_mesh["reportingController"], FIELD_MANAGER);
    assert_eq!(on_mesh["reportingInstance"], "operator-0");
    let note = on_mesh["note"].as_str().unwrap();
    assert!(
        note.contains("n1/udp0 -> n2/udp0") && note.contains("loss 100.0%"),
        "{note}"
    );
    assert_eq!(opened[1].body["regarding"]["kind"], "Node");
    assert_eq!(opened[1].body["regarding"]["uid"], "uid-n1");

    // Still open in the next windows: nothing new.
    for _ in 0..3 {
        let again = h
            .sync(&view(vec![loss.clone()], vec![]), &settings(false))
            .await;
        assert!(again.is_empty(), "{:?}", events(&again));
    }

    let closed = h
        .sync(
            &view(vec![], vec![cleared(loss, ClearReason::Recovered)]),
            &settings(false),
        )
        .await;
    assert_eq!(
        events(&closed),
        [
            event(MESH_EVENTS, "Normal", "PathLossCleared", "default", "n1"),
            event(NODE_EVENTS, "Normal", "PathLossCleared", "n1", "n2"),
            event(NODE_EVENTS, "Normal", "PathLossCleared", "n2", "n1"),
        ]
    );
    assert!(
        closed[0].body["note"]
            .as_str()
            .unwrap()
            .ends_with("recovered")
    );
    assert_eq!(h.metrics.finding_events(EventObject::PingMesh, true), 2);
    assert_eq!(h.metrics.finding_events(EventObject::Node, true), 4);
    // Cleared for good: a later pass announces nothing.
    assert!(
        h.sync(&view(vec![], vec![]), &settings(false))
            .await
            .is_empty()
    );
}

#[tokio::test]
async fn a_finding_that_opens_again_after_clearing_is_announced_again() {
    let mut h = Harness::start();
    let slow = path(FindingKind::PathLatency, "n4", "n5");
    h.sync(&view(vec![slow.clone()], vec![]), &settings(false))
        .await;
    h.sync(&view(vec![], vec![]), &settings(false)).await;
    let again = h.sync(&view(vec![slow], vec![]), &settings(false)).await;
    assert_eq!(events(&again)[0].2, "PathLatencyDetected");
    assert_eq!(events(&again).len(), 3);
}

#[tokio::test]
async fn tor_pair_findings_are_announced_on_the_mesh_only() {
    let mut h = Harness::start();
    let pair = tor_pair(FindingKind::TorPairLoss, "tor-a", "tor-b");
    let opened = h
        .sync(&view(vec![pair.clone()], vec![]), &settings(false))
        .await;
    assert_eq!(
        events(&opened),
        [event(
            MESH_EVENTS,
            "Warning",
            "TorPairLossDetected",
            "default",
            ""
        )]
    );
    let closed = h
        .sync(
            &view(vec![], vec![cleared(pair, ClearReason::Gone)]),
            &settings(false),
        )
        .await;
    assert_eq!(events(&closed)[0].2, "TorPairLossCleared");
    assert!(
        closed[0].body["note"].as_str().unwrap().contains("no data"),
        "{}",
        closed[0].body["note"]
    );
}

#[tokio::test]
async fn a_burst_of_findings_is_announced_up_to_a_bound_and_the_rest_summarized() {
    let mut h = Harness::start();
    let burst: Vec<Finding> = (0..MAX_ANNOUNCED + 5)
        .map(|i| tor_pair(FindingKind::TorPairLatency, "tor-a", &format!("tor-{i:03}")))
        .collect();
    let opened = h.sync(&view(burst, vec![]), &settings(false)).await;
    let reasons: Vec<String> = events(&opened).into_iter().map(|e| e.2).collect();
    assert_eq!(reasons.len(), MAX_ANNOUNCED + 1);
    assert!(
        reasons[..MAX_ANNOUNCED]
            .iter()
            .all(|r| r == "TorPairLatencyDetected")
    );
    assert_eq!(reasons[MAX_ANNOUNCED], "ManyFindingsDetected");
    assert!(
        opened[MAX_ANNOUNCED].body["note"]
            .as_str()
            .unwrap()
            .starts_with("5 more")
    );
    // Every finding got an Event object of its own, with its own note.
    let stored = h.stored_events();
    assert_eq!(stored.len(), MAX_ANNOUNCED + 1);
    for i in 0..MAX_ANNOUNCED {
        let location = format!("tor-a -> tor-{i:03}");
        let with_note: Vec<&Value> = stored
            .iter()
            .filter(|e| e["note"].as_str().unwrap().contains(&location))
            .collect();
        assert_eq!(with_note.len(), 1, "{location}: {with_note:?}");
        assert!(with_note[0]["series"].is_null());
    }
    // Clearing announces exactly the findings that were announced one by one.
    let closed = h.sync(&view(vec![], vec![]), &settings(false)).await;
    assert_eq!(events(&closed).len(), MAX_ANNOUNCED);
    assert_eq!(h.stored_events().len(), 2 * MAX_ANNOUNCED + 1);
}

#[tokio::test]
async fn path_findings_from_one_node_each_get_an_event_with_their_own_note() {
    let mut h = Harness::start();
    let findings = vec![
        path(FindingKind::PathLoss, "n1", "n2"),
        path(FindingKind::PathLoss, "n1", "n3"),
        path(FindingKind::PathLoss, "n1", "n4"),
    ];
    let opened = h.sync(&view(findings, vec![]), &settings(false)).await;
    let on_mesh: Vec<String> = opened
        .iter()
        .filter(|s| s.path == MESH_EVENTS)
        .map(|s| s.body["note"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(on_mesh.len(), 3, "{on_mesh:?}");
    for (note, target) in on_mesh.iter().zip(["n2", "n3", "n4"]) {
        assert!(
            note.contains(&format!("n1/udp0 -> {target}/udp0")),
            "{note}"
        );
    }
    let names: std::collections::BTreeSet<&str> = opened
        .iter()
        .filter(|s| s.is_event())
        .map(|s| s.body["metadata"]["name"].as_str().unwrap())
        .collect();
    assert_eq!(names.len(), 9, "{names:?}");
    assert_eq!(h.stored_events().len(), 9);
}

#[tokio::test]
async fn an_event_the_api_server_refused_is_published_on_the_next_pass() {
    let mut h = Harness::start();
    h.world
        .lock()
        .unwrap()
        .fail_once
        .push(("POST", "/events", 500));
    let loss = path(FindingKind::PathLoss, "n1", "n2");

    let first = h
        .sync(&view(vec![loss.clone()], vec![]), &settings(false))
        .await;
    assert_eq!(events(&first).len(), 3);
    assert_eq!(
        h.stored_events().len(),
        2,
        "the one on the mesh was refused"
    );
    assert_eq!(h.metrics.finding_events(EventObject::PingMesh, false), 1);

    // Still open and announced: only the refused Event is sent again.
    let second = h
        .sync(&view(vec![loss.clone()], vec![]), &settings(false))
        .await;
    assert_eq!(
        events(&second),
        [event(
            MESH_EVENTS,
            "Warning",
            "PathLossDetected",
            "default",
            "n1"
        )]
    );
    assert!(
        second[0].body["note"]
            .as_str()
            .unwrap()
            .contains("n1/udp0 -> n2/udp0")
    );
    assert_eq!(h.metrics.finding_events(EventObject::PingMesh, true), 1);
    assert_eq!(h.stored_events().len(), 3);

    let third = h.sync(&view(vec![loss], vec![]), &settings(false)).await;
    assert!(events(&third).is_empty(), "{:?}", events(&third));
}

#[tokio::test]
async fn an_event_the_api_server_keeps_refusing_is_given_up_after_a_few_passes() {
    let mut h = Harness::start();
    h.world
        .lock()
        .unwrap()
        .failures
        .push(("POST", "/events", 403));
    let pair = tor_pair(FindingKind::TorPairLoss, "tor-a", "tor-b");
    let mut posts = Vec::new();
    for _ in 0..EVENT_RETRIES + 3 {
        let seen = h
            .sync(&view(vec![pair.clone()], vec![]), &settings(false))
            .await;
        posts.push(events(&seen).len());
    }
    let mut expected = vec![1; EVENT_RETRIES as usize + 1];
    expected.extend([0, 0]);
    assert_eq!(posts, expected);
    assert_eq!(
        h.metrics.finding_events(EventObject::PingMesh, false),
        u64::from(EVENT_RETRIES) + 1
    );
}

#[tokio::test]
async fn a_cancelled_pass_writes_nothing() {
    let mut h = Harness::start();
    h.cancel.cancel();
    let seen = h.sync(&broken_n3(), &settings(true)).await;
    assert!(
        seen.is_empty(),
        "{:?}",
        seen.iter().map(Seen::line).collect::<Vec<_>>()
    );
}

#[tokio::test]
async fn without_the_policy_source_only_nodes_get_events() {
    let mut h = Harness::start();
    let mut no_mesh = settings(false);
    no_mesh.mesh = None;
    let opened = h
        .sync(
            &view(vec![path(FindingKind::PathLoss, "n2", "n3")], vec![]),
            &no_mesh,
        )
        .await;
    let regarding: Vec<String> = events(&opened).into_iter().map(|e| e.3).collect();
    assert_eq!(regarding, ["n2", "n3"]);
}

// ---------------------------------------------------------------- Root causes

#[tokio::test]
async fn a_root_cause_is_one_event_and_the_findings_it_explains_get_none() {
    let mut h = Harness::start();
    let opened = h.sync(&broken_n3(), &settings(false)).await;
    assert_eq!(
        events(&opened),
        [
            event(MESH_EVENTS, "Warning", ROOT_CAUSE_REASON, "default", "n3"),
            event(NODE_EVENTS, "Warning", ROOT_CAUSE_REASON, "n3", ""),
        ]
    );
    let note = opened[0].body["note"].as_str().unwrap();
    assert!(
        note.starts_with("host n3 (loss, both ways, confidence 0.90): host n3: 10 of 10 paths"),
        "{note}"
    );
    assert!(
        note.contains("explains 10 open SLA findings (10 pathLoss): pathLoss n3/udp0 -> n1/udp0"),
        "{note}"
    );
    assert_eq!(opened[1].body["regarding"]["uid"], "uid-n3");
    assert_eq!(opened[1].body["note"], opened[0].body["note"]);

    // Still open: nothing new.
    let again = h.sync(&broken_n3(), &settings(false)).await;
    assert!(again.is_empty(), "{:?}", events(&again));

    // It clears with its findings: one Event each on the mesh and the node,
    // none for the findings.
    let mut record = broken_n3().root_causes.remove(0);
    record.cleared_at_window_ms = Some(1_800_000_030_000);
    let recovered = FindingsView {
        cleared_root_causes: vec![record],
        ..view(
            vec![],
            n3_paths()
                .into_iter()
                .map(|f| cleared(f, ClearReason::Recovered))
                .collect(),
        )
    };
    let closed = h.sync(&recovered, &settings(false)).await;
    assert_eq!(
        events(&closed),
        [
            event(
                MESH_EVENTS,
                "Normal",
                ROOT_CAUSE_CLEARED_REASON,
                "default",
                "n3"
            ),
            event(NODE_EVENTS, "Normal", ROOT_CAUSE_CLEARED_REASON, "n3", ""),
        ]
    );
    let note = closed[0].body["note"].as_str().unwrap();
    assert!(
        note.starts_with("host n3 (loss): no longer localized (open since 2027-01-15T08:00:05Z"),
        "{note}"
    );
    assert_eq!(h.metrics.finding_events(EventObject::PingMesh, true), 2);
    assert_eq!(h.metrics.finding_events(EventObject::Node, true), 2);
}

#[tokio::test]
async fn network_root_causes_are_announced_on_the_mesh_only() {
    let mut h = Harness::start();
    let pair = tor_pair(FindingKind::TorPairLoss, "tor-a", "tor-b");
    let link = root_cause(
        CauseKind::Link,
        "spine-1 -> tor-b",
        std::slice::from_ref(&pair),
    );
    let opened = h
        .sync(&with_causes(vec![pair], vec![link]), &settings(false))
        .await;
    assert_eq!(
        events(&opened),
        [event(
            MESH_EVENTS,
            "Warning",
            ROOT_CAUSE_REASON,
            "default",
            ""
        )]
    );
    let closed = h.sync(&view(vec![], vec![]), &settings(false)).await;
    assert_eq!(
        events(&closed),
        [event(
            MESH_EVENTS,
            "Normal",
            ROOT_CAUSE_CLEARED_REASON,
            "default",
            ""
        )]
    );
    assert!(
        closed[0].body["note"]
            .as_str()
            .unwrap()
            .ends_with("no longer reported by the mesh controller")
    );
}

#[tokio::test]
async fn findings_no_root_cause_explains_keep_their_own_events() {
    let mut h = Harness::start();
    let mut findings = n3_paths();
    let host = root_cause(CauseKind::Host, "n3", &findings);
    findings.push(tor_pair(FindingKind::TorPairLatency, "tor-b", "tor-c"));
    let opened = h
        .sync(&with_causes(findings, vec![host]), &settings(false))
        .await;
    let reasons: Vec<String> = events(&opened).into_iter().map(|e| e.2).collect();
    assert_eq!(
        reasons,
        [
            ROOT_CAUSE_REASON,
            ROOT_CAUSE_REASON,
            "TorPairLatencyDetected"
        ]
    );
}

#[tokio::test]
async fn a_finding_announced_before_its_root_cause_opened_is_announced_clearing_too() {
    let mut h = Harness::start();
    let loss = path(FindingKind::PathLoss, "n1", "n3");
    let first = h
        .sync(&view(vec![loss.clone()], vec![]), &settings(false))
        .await;
    assert_eq!(events(&first).len(), 3);

    let host = root_cause(CauseKind::Host, "n3", std::slice::from_ref(&loss));
    let second = h
        .sync(&with_causes(vec![loss], vec![host]), &settings(false))
        .await;
    let reasons: Vec<String> = events(&second).into_iter().map(|e| e.2).collect();
    assert_eq!(reasons, [ROOT_CAUSE_REASON, ROOT_CAUSE_REASON]);

    let third = h.sync(&view(vec![], vec![]), &settings(false)).await;
    let reasons: Vec<String> = events(&third).into_iter().map(|e| e.2).collect();
    assert_eq!(
        reasons,
        [
            ROOT_CAUSE_CLEARED_REASON,
            ROOT_CAUSE_CLEARED_REASON,
            "PathLossCleared",
            "PathLossCleared",
            "PathLossCleared"
        ]
    );
}

#[tokio::test]
async fn a_finding_its_root_cause_no_longer_explains_is_announced_then() {
    let mut h = Harness::start();
    let loss = path(FindingKind::PathLoss, "n1", "n3");
    let host = root_cause(CauseKind::Host, "n3", std::slice::from_ref(&loss));
    let first = h
        .sync(
            &with_causes(vec![loss.clone()], vec![host]),
            &settings(false),
        )
        .await;
    assert_eq!(events(&first).len(), 2);

    // The cause cleared, the finding stays open: now it gets its Events.
    let second = h
        .sync(&view(vec![loss.clone()], vec![]), &settings(false))
        .await;
    let reasons: Vec<String> = events(&second).into_iter().map(|e| e.2).collect();
    assert_eq!(
        reasons,
        [
            ROOT_CAUSE_CLEARED_REASON,
            ROOT_CAUSE_CLEARED_REASON,
            "PathLossDetected",
            "PathLossDetected",
            "PathLossDetected",
        ]
    );
    let third = h.sync(&view(vec![], vec![]), &settings(false)).await;
    let reasons: Vec<String> = events(&third).into_iter().map(|e| e.2).collect();
    assert_eq!(reasons, ["PathLossCleared"; 3]);
}

/// `view` as the mesh controller shows it `windows` 5 s windows after the
/// findings of these tests opened.
fn judged(mut view: FindingsView, windows: u32) -> FindingsView {
    view.judged_window = Some((1_800_000_010_000 + u64::from(windows) * 5_000, 5_000));
    view
}

#[tokio::test]
async fn a_new_finding_waits_a_few_windows_for_a_root_cause_before_its_own_events() {
    let mut h = Harness::start();
    let loss = path(FindingKind::PathLoss, "n1", "n3");
    for windows in 0..HOLD_WINDOWS {
        let seen = h
            .sync(
                &judged(view(vec![loss.clone()], vec![]), windows),
                &settings(false),
            )
            .await;
        assert!(events(&seen).is_empty(), "{:?}", events(&seen));
    }
    let seen = h
        .sync(
            &judged(view(vec![loss.clone()], vec![]), HOLD_WINDOWS),
            &settings(false),
        )
        .await;
    let reasons: Vec<String> = events(&seen).into_iter().map(|e| e.2).collect();
    assert_eq!(reasons, ["PathLossDetected"; 3]);
    let later = h
        .sync(
            &judged(view(vec![loss], vec![]), HOLD_WINDOWS + 1),
            &settings(false),
        )
        .await;
    assert!(events(&later).is_empty());
}

#[tokio::test]
async fn a_root_cause_named_a_window_after_its_findings_is_their_only_event() {
    let mut h = Harness::start();
    let early = h
        .sync(&judged(view(n3_paths(), vec![]), 0), &settings(false))
        .await;
    assert!(events(&early).is_empty(), "{:?}", events(&early));
    let named = h.sync(&judged(broken_n3(), 1), &settings(false)).await;
    let reasons: Vec<String> = events(&named).into_iter().map(|e| e.2).collect();
    assert_eq!(reasons, [ROOT_CAUSE_REASON; 2]);
    for windows in 2..6 {
        let seen = h
            .sync(&judged(broken_n3(), windows), &settings(false))
            .await;
        assert!(events(&seen).is_empty(), "{:?}", events(&seen));
    }
    let cleared = h
        .sync(&judged(view(vec![], vec![]), 6), &settings(false))
        .await;
    let reasons: Vec<String> = events(&cleared).into_iter().map(|e| e.2).collect();
    assert_eq!(reasons, [ROOT_CAUSE_CLEARED_REASON; 2]);
}

#[tokio::test]
async fn root_causes_and_findings_share_the_bound_on_events_per_window() {
    let mut h = Harness::start();
    let causes: Vec<OpenRootCause> = (0..MAX_ANNOUNCED + 2)
        .map(|i| root_cause(CauseKind::Tor, &format!("tor-{i:03}"), &[]))
        .collect();
    let findings: Vec<Finding> = (0..3)
        .map(|i| tor_pair(FindingKind::TorPairLoss, "tor-x", &format!("tor-y{i}")))
        .collect();
    let opened = h
        .sync(&with_causes(findings, causes), &settings(false))
        .await;
    let reasons: Vec<String> = events(&opened).into_iter().map(|e| e.2).collect();
    assert_eq!(reasons.len(), MAX_ANNOUNCED + 1);
    assert!(
        reasons[..MAX_ANNOUNCED]
            .iter()
            .all(|r| r == ROOT_CAUSE_REASON)
    );
    assert_eq!(reasons[MAX_ANNOUNCED], "ManyFindingsDetected");
    let note = opened[MAX_ANNOUNCED].body["note"].as_str().unwrap();
    assert!(
        note.starts_with("2 more root causes and 3 more findings opened in this window"),
        "{note}"
    );
    // Clearing announces exactly what was announced one by one.
    let closed = h.sync(&view(vec![], vec![]), &settings(false)).await;
    let reasons: Vec<String> = events(&closed).into_iter().map(|e| e.2).collect();
    assert_eq!(reasons, [ROOT_CAUSE_CLEARED_REASON; MAX_ANNOUNCED]);
}

// ---------------------------------------------------------------- Node condition

/// n3's paths to every other node fail both ways.
fn n3_paths() -> Vec<Finding> {
    let mut findings = Vec::new();
    for other in ["n1", "n2", "n4", "n5", "n6"] {
        findings.push(path(FindingKind::PathLoss, "n3", other));
        findings.push(path(FindingKind::PathLoss, other, "n3"));
    }
    findings
}

/// n3's paths fail, and the localizer names host n3.
fn broken_n3() -> FindingsView {
    let findings = n3_paths();
    let host = root_cause(CauseKind::Host, "n3", &findings);
    with_causes(findings, vec![host])
}

#[tokio::test]
async fn the_node_condition_turns_false_on_a_localized_fault_and_true_again_when_it_clears() {
    let mut h = Harness::start();
    let on = settings(true);

    let first = h.sync(&view(vec![], vec![]), &on).await;
    // Read once (nothing there yet), then written True, on every node.
    let calls = node_calls(&first);
    assert_eq!(calls.len(), 12, "{calls:?}");
    assert_eq!(calls[0], "GET /api/v1/nodes/n1");
    assert_eq!(calls[1], "PATCH /api/v1/nodes/n1/status");
    let patch = first.iter().find(|s| s.method == "PATCH").unwrap();
    assert_eq!(patch.content_type, "application/apply-patch+yaml");
    assert_eq!(patch.query["fieldManager"], FIELD_MANAGER);
    assert_eq!(patch.query["force"], "true");
    let n1 = h.node("n1");
    let written = condition(&n1, DEFAULT_NODE_CONDITION_TYPE).unwrap();
    assert_eq!(
        (written["status"].as_str(), written["reason"].as_str()),
        (Some("True"), Some(NO_ROOT_CAUSE_REASON))
    );
    assert!(
        condition(&n1, "Ready").is_some(),
        "the kubelet's conditions stay"
    );

    let fault = h.sync(&broken_n3(), &on).await;
    assert_eq!(node_calls(&fault), ["PATCH /api/v1/nodes/n3/status"]);
    let n3 = h.node("n3");
    let faulty = condition(&n3, DEFAULT_NODE_CONDITION_TYPE).unwrap();
    assert_eq!(
        (faulty["status"].as_str(), faulty["reason"].as_str()),
        (Some("False"), Some(ROOT_CAUSE_REASON))
    );
    let message = faulty["message"].as_str().unwrap();
    assert_eq!(
        message,
        "host n3: 10 of 10 paths through it losing, loss 100.0% vs 0.00% elsewhere \
         (open since 2027-01-15T08:00:05Z)"
    );
    assert!(faulty["lastTransitionTime"].is_string());
    assert_eq!(h.metrics.condition_writes(true), 7);

    // Unchanged in the next window: nothing written, even though the
    // evidence in the cause's summary moved.
    let mut steady = broken_n3();
    steady.root_causes[0].cause.summary =
        "host n3: 9 of 10 paths through it losing, loss 93.0% vs 0.00% elsewhere".to_owned();
    let steady = h.sync(&steady, &on).await;
    assert!(node_calls(&steady).is_empty(), "{:?}", node_calls(&steady));

    let recovered = h.sync(&view(vec![], vec![]), &on).await;
    assert_eq!(node_calls(&recovered), ["PATCH /api/v1/nodes/n3/status"]);
    let n3 = h.node("n3");
    assert_eq!(
        condition(&n3, DEFAULT_NODE_CONDITION_TYPE).unwrap()["status"],
        "True"
    );
}

#[tokio::test]
async fn findings_without_a_root_cause_flip_no_node() {
    let mut h = Harness::start();
    let on = settings(true);
    h.sync(&view(vec![], vec![]), &on).await;
    // Even n3's paths to every node failing: until the localizer names n3,
    // the condition stays as it is.
    for findings in [vec![path(FindingKind::PathLoss, "n1", "n2")], n3_paths()] {
        let seen = h.sync(&view(findings, vec![]), &on).await;
        assert!(node_calls(&seen).is_empty(), "{:?}", node_calls(&seen));
    }
    assert_eq!(h.metrics.faulty_nodes(), 0);
}

#[tokio::test]
async fn network_root_causes_flip_no_node_and_endpoint_ones_flip_theirs() {
    let mut h = Harness::start();
    let on = settings(true);
    h.sync(&view(vec![], vec![]), &on).await;
    let network = with_causes(
        vec![],
        vec![
            root_cause(CauseKind::Tor, "tor-a", &[]),
            root_cause(CauseKind::Link, "spine-1 -> tor-a", &[]),
            root_cause(CauseKind::Switch, "spine layer", &[]),
        ],
    );
    let seen = h.sync(&network, &on).await;
    assert!(node_calls(&seen).is_empty(), "{:?}", node_calls(&seen));

    let rnic = with_causes(
        vec![],
        vec![root_cause(CauseKind::Endpoint, "n5/udp0", &[])],
    );
    let seen = h.sync(&rnic, &on).await;
    assert_eq!(node_calls(&seen), ["PATCH /api/v1/nodes/n5/status"]);
    let n5 = h.node("n5");
    let written = condition(&n5, DEFAULT_NODE_CONDITION_TYPE).unwrap();
    assert_eq!(written["status"], "False");
    assert!(
        written["message"]
            .as_str()
            .unwrap()
            .starts_with("endpoint n5/udp0: 10 of 10 paths"),
        "{written}"
    );
    assert_eq!(h.metrics.faulty_nodes(), 1);
}

/// Two nodes under one ToR, one black-holed: the ToR mesh alone cannot say
/// which (each one's only same-ToR path is to the other), the inter-ToR paths
/// can, and the localizer's host cause flips exactly that node.
#[tokio::test]
async fn a_host_cause_flips_its_node_even_with_two_nodes_per_tor() {
    let mut h = Harness::start();
    let on = settings(true);
    h.sync(&view(vec![], vec![]), &on).await;
    let findings = vec![
        path(FindingKind::PathLoss, "n1", "n2"),
        path(FindingKind::PathLoss, "n2", "n1"),
    ];
    let host = root_cause(CauseKind::Host, "n2", &findings);
    let seen = h.sync(&with_causes(findings, vec![host]), &on).await;
    assert_eq!(node_calls(&seen), ["PATCH /api/v1/nodes/n2/status"]);
    assert_eq!(
        condition(&h.node("n1"), DEFAULT_NODE_CONDITION_TYPE).unwrap()["status"],
        "True"
    );
}

#[tokio::test]
async fn nothing_is_written_on_nodes_when_node_conditions_are_off() {
    let mut h = Harness::start();
    for view in [view(vec![], vec![]), broken_n3(), view(vec![], vec![])] {
        let seen = h.sync(&view, &settings(false)).await;
        assert!(node_calls(&seen).is_empty(), "{:?}", node_calls(&seen));
    }
    assert_eq!(
        h.metrics.condition_writes(true) + h.metrics.condition_writes(false),
        0
    );
    assert!(condition(&h.node("n3"), DEFAULT_NODE_CONDITION_TYPE).is_none());
}

#[tokio::test]
async fn turning_node_conditions_off_removes_the_condition_it_wrote() {
    let mut h = Harness::start();
    h.sync(&broken_n3(), &settings(true)).await;
    assert!(condition(&h.node("n3"), DEFAULT_NODE_CONDITION_TYPE).is_some());

    let off = h.sync(&broken_n3(), &settings(false)).await;

    let patches: Vec<&Seen> = off.iter().filter(|s| s.method == "PATCH").collect();
    assert_eq!(patches.len(), 6);
    assert!(
        patches.iter().all(|p| p.body.get("status").is_none()),
        "{:?}",
        patches[0].body
    );
    for i in 1..=6 {
        let node = h.node(&format!("n{i}"));
        assert!(condition(&node, DEFAULT_NODE_CONDITION_TYPE).is_none());
        assert!(condition(&node, "Ready").is_some());
    }
    // Off and removed: nothing more to do.
    let later = h.sync(&view(vec![], vec![]), &settings(false)).await;
    assert!(node_calls(&later).is_empty());
}

#[tokio::test]
async fn a_condition_already_on_the_node_is_read_back_not_written_again() {
    let mut h = Harness::start();
    {
        let mut world = h.world.lock().unwrap();
        for node in world.nodes.values_mut() {
            node["status"]["conditions"]
                .as_array_mut()
                .unwrap()
                .push(serde_json::json!({
                    "type": DEFAULT_NODE_CONDITION_TYPE, "status": "True",
                    "reason": NO_ROOT_CAUSE_REASON,
                    "message": "no open root cause names this node",
                    "lastTransitionTime": "2026-01-01T00:00:00Z",
                }));
        }
    }
    let seen = h.sync(&view(vec![], vec![]), &settings(true)).await;
    assert!(
        node_calls(&seen).iter().all(|c| c.starts_with("GET")),
        "{:?}",
        node_calls(&seen)
    );
    // When it does flip, the transition time moves and the old one is not kept.
    let fault = h.sync(&broken_n3(), &settings(true)).await;
    assert_eq!(node_calls(&fault), ["PATCH /api/v1/nodes/n3/status"]);
    let n3 = h.node("n3");
    assert_ne!(
        condition(&n3, DEFAULT_NODE_CONDITION_TYPE).unwrap()["lastTransitionTime"],
        "2026-01-01T00:00:00Z"
    );
}

#[tokio::test]
async fn after_a_restart_no_condition_is_written_until_the_mesh_controller_warmed_up() {
    let mut h = Harness::start();
    // n3 was found faulty before the operator (or the mesh controller) restarted.
    h.left_behind("n3", "False", ROOT_CAUSE_REASON);
    let on = settings(true);

    // The restarted mesh controller has no open findings yet: nothing is
    // read or written, n3 keeps False.
    for _ in 0..3 {
        let early = h.sync(&warming_up(), &on).await;
        assert!(node_calls(&early).is_empty(), "{:?}", node_calls(&early));
    }
    let n3 = h.node("n3");
    assert_eq!(
        condition(&n3, DEFAULT_NODE_CONDITION_TYPE).unwrap()["status"],
        "False"
    );
    assert_eq!(h.metrics.condition_writes(true), 0);

    // Warmed up, the fault persists: n3 stays False, the others turn True.
    let warm = h.sync(&broken_n3(), &on).await;
    let patches: Vec<String> = node_calls(&warm)
        .into_iter()
        .filter(|c| c.starts_with("PATCH"))
        .collect();
    assert_eq!(patches.len(), 6, "{patches:?}");
    let n3 = h.node("n3");
    let kept = condition(&n3, DEFAULT_NODE_CONDITION_TYPE).unwrap();
    assert_eq!(kept["status"], "False");
    assert_eq!(kept["reason"], ROOT_CAUSE_REASON);
    assert_eq!(
        kept["lastTransitionTime"], "2026-01-01T00:00:00Z",
        "no flip, so the transition time stays"
    );
    assert_eq!(
        condition(&h.node("n1"), DEFAULT_NODE_CONDITION_TYPE).unwrap()["status"],
        "True"
    );
}

#[tokio::test]
async fn after_the_warm_up_a_fault_gone_meanwhile_turns_the_condition_true() {
    let mut h = Harness::start();
    h.left_behind("n3", "False", ROOT_CAUSE_REASON);
    let on = settings(true);
    let early = h.sync(&warming_up(), &on).await;
    assert!(node_calls(&early).is_empty(), "{:?}", node_calls(&early));

    let warm = h.sync(&view(vec![], vec![]), &on).await;
    assert!(
        node_calls(&warm).contains(&"PATCH /api/v1/nodes/n3/status".to_owned()),
        "{:?}",
        node_calls(&warm)
    );
    assert_eq!(
        condition(&h.node("n3"), DEFAULT_NODE_CONDITION_TYPE).unwrap()["status"],
        "True"
    );
}

/// A summary of `sent` probes from `source` to `target` in window `start`, all answered.
fn summary(source: &str, target: &str, start: u64, window_ms: u32) -> WindowSummary {
    WindowSummary {
        window_start_ms: start,
        window_ms,
        source_endpoint: format!("{source}/udp0"),
        target_endpoint: format!("{target}/udp0"),
        sent: 20,
        ok: 20,
        ..WindowSummary::default()
    }
}

fn udp(node: &str, port: u16) -> Endpoint {
    Endpoint {
        id: format!("{node}/udp0"),
        transport: Transport::Udp as i32,
        address: format!("127.0.0.1:{port}"),
        ..Endpoint::default()
    }
}

#[tokio::test]
async fn conditions_wait_for_one_window_with_data_more_than_opening_a_finding_takes() {
    const WINDOW_MS: u32 = 200;
    let dir = tempfile::tempdir().unwrap();
    let mut config = MeshConfig {
        registry: format!("sqlite://{}", dir.path().join("registry.db").display()),
        ..MeshConfig::default()
    };
    config.pinglist.window_ms = WINDOW_MS;
    config.pinglist.probe_timeout_ms = 50;
    config.sla.open_after_windows = 1;
    let registry = open_registry(&config.registry).await.unwrap();
    let controller = MeshController::new(config, registry).await.unwrap();
    // The window under way when the agents connect: they were not there for
    // all of it.
    let before = window_start(unix_now_ms(), WINDOW_MS);
    tokio::time::sleep(std::time::Duration::from_millis(2)).await;
    let mut present = Vec::new();
    for (node, port) in [("n1", 7001), ("n2", 7002)] {
        let (session, _) = controller
            .register(node, "test", &[udp(node, port)])
            .await
            .unwrap();
        present.push(controller.connect(node, session));
    }
    let report = |start: u64| {
        for (source, target) in [("n1", "n2"), ("n2", "n1")] {
            let outcome = controller
                .report(source, vec![summary(source, target, start, WINDOW_MS)])
                .unwrap();
            assert_eq!(outcome.accepted, 1, "{outcome:?}");
        }
    };
    assert!(!FindingsView::of(&controller).conditions_ready);

    // That window is judged, but no path in it counts, so it does not count
    // either.
    report(before);
    controller.evaluate(before).unwrap();
    assert_eq!(controller.windows_with_data(), 0);
    assert!(!FindingsView::of(&controller).conditions_ready);

    // Two windows with data: one to open a finding, and one more.
    let mut start = window_start(unix_now_ms(), WINDOW_MS);
    for judged in 1..=2 {
        start += u64::from(WINDOW_MS);
        // A window is taken at most one window ahead of the clock.
        while unix_now_ms() + u64::from(WINDOW_MS) < start {
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
        assert!(!FindingsView::of(&controller).conditions_ready);
        report(start);
        assert!(!controller.evaluate(start).unwrap().paths.is_empty());
        assert_eq!(controller.windows_with_data(), judged);
    }
    assert!(FindingsView::of(&controller).conditions_ready);
}

#[tokio::test]
async fn a_new_condition_type_replaces_the_old_one() {
    let mut h = Harness::start();
    h.sync(&view(vec![], vec![]), &settings(true)).await;
    let mut renamed = settings(true);
    renamed.node_health.condition_type = "example.com/RdmaOk".into();
    h.sync(&view(vec![], vec![]), &renamed).await;
    let n1 = h.node("n1");
    assert!(condition(&n1, DEFAULT_NODE_CONDITION_TYPE).is_none());
    assert_eq!(
        condition(&n1, "example.com/RdmaOk").unwrap()["status"],
        "True"
    );
}

#[tokio::test]
async fn a_failed_write_pauses_the_condition_for_a_few_windows_then_carries_on() {
    let mut h = Harness::start();
    h.world
        .lock()
        .unwrap()
        .failures
        .push(("PATCH", "/nodes/", 403));
    let refused = h.sync(&view(vec![], vec![]), &settings(true)).await;
    // One read, one refused write, and the pass stops there.
    assert_eq!(
        node_calls(&refused),
        ["GET /api/v1/nodes/n1", "PATCH /api/v1/nodes/n1/status"]
    );
    assert_eq!(h.metrics.condition_writes(false), 1);
    h.world.lock().unwrap().failures.clear();
    for _ in 0..PAUSE_AFTER_FAILURE {
        let paused = h.sync(&view(vec![], vec![]), &settings(true)).await;
        assert!(node_calls(&paused).is_empty(), "{:?}", node_calls(&paused));
    }
    let resumed = h.sync(&view(vec![], vec![]), &settings(true)).await;
    let patches = node_calls(&resumed)
        .iter()
        .filter(|c| c.starts_with("PATCH"))
        .count();
    assert_eq!(patches, 6);
    assert_eq!(h.metrics.condition_writes(true), 6);
}

/// `sent` probes from `source` to `target` in window `start`, `lost` of them lost.
fn lossy_summary(
    source: &str,
    target: &str,
    start: u64,
    window_ms: u32,
    lost: u64,
) -> WindowSummary {
    WindowSummary {
        ok: 20 - lost,
        lost,
        ..summary(source, target, start, window_ms)
    }
}

/// A mesh controller with `window_ms` windows and the default SLA, and
/// nodes n1..=n6 registered (one UDP endpoint each) and connected.
async fn six_nodes(
    dir: &tempfile::TempDir,
    window_ms: u32,
) -> (
    Arc<MeshController>,
    Vec<pingmesh_operator::mesh::controller::PresenceGuard>,
) {
    let mut config = MeshConfig {
        registry: format!("sqlite://{}", dir.path().join("registry.db").display()),
        ..MeshConfig::default()
    };
    config.pinglist.window_ms = window_ms;
    config.pinglist.probe_timeout_ms = 50;
    let registry = open_registry(&config.registry).await.unwrap();
    let controller = MeshController::new(config, registry).await.unwrap();
    let mut present = Vec::new();
    for i in 1..=6 {
        let node = format!("n{i}");
        let (session, _) = controller
            .register(&node, "test", &[udp(&node, 7000 + i)])
            .await
            .unwrap();
        present.push(controller.connect(&node, session));
    }
    (controller, present)
}

/// Reports window `start` from every node to every other one, every probe to
/// and from n3 lost when `n3_broken`, judges it and returns what the publisher
/// reads.
async fn judge(
    controller: &MeshController,
    nodes: &[String],
    start: u64,
    n3_broken: bool,
) -> FindingsView {
    let window_ms = controller.config().pinglist.window_ms;
    // A window is taken at most one window ahead of the clock.
    while unix_now_ms() + u64::from(window_ms) < start {
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    for source in nodes {
        let summaries = nodes
            .iter()
            .filter(|target| *target != source)
            .map(|target| {
                let lost = if n3_broken && (source == "n3" || target == "n3") {
                    20
                } else {
                    0
                };
                lossy_summary(source, target, start, window_ms, lost)
            })
            .collect();
        controller.report(source, summaries).unwrap();
    }
    controller.evaluate(start).unwrap();
    FindingsView::of(controller)
}

/// The whole chain on a real mesh controller: six nodes under one ToR, every
/// probe to and from n3 lost. The localizer names host n3: one root-cause
/// Event on the PingMesh and on n3 (none per path), n3's condition False;
/// after n3 recovers, one Event each again and the condition True.
#[tokio::test]
async fn a_black_holed_node_on_a_real_mesh_controller_is_one_root_cause_and_its_condition() {
    const WINDOW_MS: u32 = 200;
    let dir = tempfile::tempdir().unwrap();
    let (controller, _present) = six_nodes(&dir, WINDOW_MS).await;
    let nodes: Vec<String> = (1..=6).map(|i| format!("n{i}")).collect();
    let mut h = Harness::start();
    let on = settings(true);
    let mut start = window_start(unix_now_ms(), WINDOW_MS);
    let mut seen = Vec::new();
    let mut view = FindingsView::default();
    for _ in 0..4 {
        start += u64::from(WINDOW_MS);
        view = judge(&controller, &nodes, start, true).await;
        seen.extend(h.sync(&view, &on).await);
    }
    let causes: Vec<(CauseKind, String)> = view
        .root_causes
        .iter()
        .map(|c| (c.cause.kind, c.cause.component.clone()))
        .collect();
    assert_eq!(causes, [(CauseKind::Host, "n3".to_owned())]);
    assert!(!view.open.is_empty(), "path findings open too");
    assert!(view.conditions_ready);
    let announced: Vec<(String, String, String, String, String)> = events(&seen);
    assert_eq!(
        announced,
        [
            event(MESH_EVENTS, "Warning", ROOT_CAUSE_REASON, "default", "n3"),
            event(NODE_EVENTS, "Warning", ROOT_CAUSE_REASON, "n3", ""),
        ],
        "one Event per root cause, none per path"
    );
    let note = seen.iter().find(|s| s.is_event()).unwrap().body["note"]
        .as_str()
        .unwrap()
        .to_owned();
    assert!(note.starts_with("host n3 (loss, both ways"), "{note}");
    assert!(note.contains("pathLoss n1/udp0 -> n3/udp0"), "{note}");
    let n3 = condition(&h.node("n3"), DEFAULT_NODE_CONDITION_TYPE)
        .unwrap()
        .clone();
    assert_eq!(
        (n3["status"].as_str(), n3["reason"].as_str()),
        (Some("False"), Some(ROOT_CAUSE_REASON))
    );
    assert!(
        n3["message"].as_str().unwrap().starts_with("host n3"),
        "{n3}"
    );
    for node in ["n1", "n2", "n4", "n5", "n6"] {
        assert_eq!(
            condition(&h.node(node), DEFAULT_NODE_CONDITION_TYPE).unwrap()["status"],
            "True",
            "{node}"
        );
    }

    // n3 recovers: the cause clears once the windows localization looks at
    // together are clean, and then the SLA's clearAfterWindows (3) more.
    let mut seen = Vec::new();
    let mut clean = 0;
    while !view.root_causes.is_empty() || !view.open.is_empty() {
        clean += 1;
        assert!(
            clean <= 8,
            "still open after {clean} clean windows: {view:?}"
        );
        start += u64::from(WINDOW_MS);
        view = judge(&controller, &nodes, start, false).await;
        seen.extend(h.sync(&view, &on).await);
    }
    assert_eq!(
        events(&seen),
        [
            event(
                MESH_EVENTS,
                "Normal",
                ROOT_CAUSE_CLEARED_REASON,
                "default",
                "n3"
            ),
            event(NODE_EVENTS, "Normal", ROOT_CAUSE_CLEARED_REASON, "n3", ""),
        ]
    );
    assert_eq!(
        condition(&h.node("n3"), DEFAULT_NODE_CONDITION_TYPE).unwrap()["status"],
        "True"
    );
}
