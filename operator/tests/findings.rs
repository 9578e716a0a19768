//! What the operator publishes from findings: Events on the PingMesh and on
//! Nodes, and the opt-in Node condition, against a scripted API server.
#![cfg(feature = "kubernetes")]
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

#[path = "support/fake_api.rs"]
mod fake_api;

use std::sync::{Arc, Mutex};

use k8s_openapi::api::core::v1::ObjectReference;
use kube::runtime::watcher;
use pingmesh_operator::crd::{DEFAULT_NODE_CONDITION_TYPE, NodeHealthSpec};
use pingmesh_operator::mesh::analyzer::{ClearReason, Finding, FindingKind};
use pingmesh_operator::mesh::types::MeshEndpoint;
use pingmesh_operator::reconcile::{
    EventObject, FAULT_REASON, FIELD_MANAGER, FindingsPublisher, FindingsView, HEALTHY_REASON,
    MAX_ANNOUNCED, NodeMeta, PAUSE_AFTER_FAILURE, ReconcileMetrics, SourceSettings, node_cache,
};
use serde_json::Value;

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
        }
    }

    /// One pass; returns the requests it made.
    async fn sync(&mut self, view: &FindingsView, settings: &SourceSettings) -> Vec<Seen> {
        self.publisher.sync(view, settings).await;
        let seen = self.world.lock().unwrap().seen.clone();
        let new = seen[self.mark..].to_vec();
        self.mark = seen.len();
        new
    }

    fn node(&self, name: &str) -> Value {
        self.world.lock().unwrap().nodes[name].clone()
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

fn view(open: Vec<Finding>, cleared: Vec<Finding>) -> FindingsView {
    FindingsView {
        open,
        cleared,
        endpoints: fleet(),
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

/// (path, type, reason, regarding name, related name) of every Event posted.
fn events(seen: &[Seen]) -> Vec<(String, String, String, String, String)> {
    seen.iter()
        .filter(|s| s.is_event())
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
    // Clearing announces exactly the findings that were announced one by one.
    let closed = h.sync(&view(vec![], vec![]), &settings(false)).await;
    assert_eq!(events(&closed).len(), MAX_ANNOUNCED);
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

// ---------------------------------------------------------------- Node condition

/// n3's paths to every other node fail both ways.
fn broken_n3() -> Vec<Finding> {
    let mut findings = Vec::new();
    for other in ["n1", "n2", "n4", "n5", "n6"] {
        findings.push(path(FindingKind::PathLoss, "n3", other));
        findings.push(path(FindingKind::PathLoss, other, "n3"));
    }
    findings
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
        (Some("True"), Some(HEALTHY_REASON))
    );
    assert!(
        condition(&n1, "Ready").is_some(),
        "the kubelet's conditions stay"
    );

    let fault = h.sync(&view(broken_n3(), vec![]), &on).await;
    assert_eq!(node_calls(&fault), ["PATCH /api/v1/nodes/n3/status"]);
    let n3 = h.node("n3");
    let faulty = condition(&n3, DEFAULT_NODE_CONDITION_TYPE).unwrap();
    assert_eq!(
        (faulty["status"].as_str(), faulty["reason"].as_str()),
        (Some("False"), Some(FAULT_REASON))
    );
    let message = faulty["message"].as_str().unwrap();
    assert!(
        message.contains("5 other nodes under ToR tor-a"),
        "{message}"
    );
    assert!(message.contains("pathLoss n1/udp0 -> n3/udp0"), "{message}");
    assert!(faulty["lastTransitionTime"].is_string());
    assert_eq!(h.metrics.condition_writes(true), 7);

    // Unchanged in the next window: nothing written.
    let steady = h.sync(&view(broken_n3(), vec![]), &on).await;
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
async fn one_bad_path_does_not_flip_either_end() {
    let mut h = Harness::start();
    let on = settings(true);
    h.sync(&view(vec![], vec![]), &on).await;
    let one = h
        .sync(
            &view(vec![path(FindingKind::PathLoss, "n1", "n2")], vec![]),
            &on,
        )
        .await;
    assert!(node_calls(&one).is_empty(), "{:?}", node_calls(&one));
}

#[tokio::test]
async fn nothing_is_written_on_nodes_when_node_conditions_are_off() {
    let mut h = Harness::start();
    for findings in [vec![], broken_n3(), vec![]] {
        let seen = h.sync(&view(findings, vec![]), &settings(false)).await;
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
    h.sync(&view(broken_n3(), vec![]), &settings(true)).await;
    assert!(condition(&h.node("n3"), DEFAULT_NODE_CONDITION_TYPE).is_some());

    let off = h.sync(&view(broken_n3(), vec![]), &settings(false)).await;

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
                    "reason": HEALTHY_REASON,
                    "message": "no open finding localizes a fault to this node",
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
    let fault = h.sync(&view(broken_n3(), vec![]), &settings(true)).await;
    assert_eq!(node_calls(&fault), ["PATCH /api/v1/nodes/n3/status"]);
    let n3 = h.node("n3");
    assert_ne!(
        condition(&n3, DEFAULT_NODE_CONDITION_TYPE).unwrap()["lastTransitionTime"],
        "2026-01-01T00:00:00Z"
    );
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
