//! The window handover: reports go on while a window is judged.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::sync::Arc;
use std::time::Duration;

use pingmesh_proto::v1::{Endpoint, Transport, WindowSummary};
use pingmesh_proto::window::{unix_now_ms, window_start};

use super::{MeshController, Snapshot, lock};
use crate::config::MeshConfig;
use crate::mesh::registry::open_registry;

const WINDOW_MS: u32 = 1_000;

fn udp(node: &str, port: u16) -> Endpoint {
    Endpoint {
        id: format!("{node}/udp0"),
        transport: Transport::Udp as i32,
        address: format!("127.0.0.1:{port}"),
        ..Endpoint::default()
    }
}

fn n1_to_n2(start: u64) -> WindowSummary {
    WindowSummary {
        window_start_ms: start,
        window_ms: WINDOW_MS,
        source_endpoint: "n1/udp0".into(),
        target_endpoint: "n2/udp0".into(),
        sent: 20,
        ok: 20,
        ..WindowSummary::default()
    }
}

async fn controller(dir: &tempfile::TempDir) -> Arc<MeshController> {
    let mut config = MeshConfig {
        registry: format!("sqlite://{}", dir.path().join("registry.db").display()),
        ..MeshConfig::default()
    };
    config.pinglist.window_ms = WINDOW_MS;
    config.pinglist.probe_timeout_ms = 50;
    let registry = open_registry(&config.registry).await.unwrap();
    MeshController::new(config, registry).await.unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[allow(
    clippy::await_holding_lock,
    reason = "the held analyzer lock stands in for a long judgement"
)]
async fn reports_during_a_long_judgement_are_neither_blocked_nor_lost() {
    let dir = tempfile::tempdir().unwrap();
    let controller = controller(&dir).await;
    let mut streams = Vec::new();
    for (node, port) in [("n1", 7001), ("n2", 7002)] {
        let (session, _) = controller
            .register(node, "test", &[udp(node, port)])
            .await
            .unwrap();
        streams.push(controller.connect(node, session));
    }
    // The first window both were connected for all of.
    let connected = window_start(unix_now_ms(), WINDOW_MS);
    let first = connected + u64::from(WINDOW_MS);
    while unix_now_ms() < first {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let second = first + u64::from(WINDOW_MS);
    assert_eq!(
        controller
            .report("n1", vec![n1_to_n2(first)])
            .unwrap()
            .accepted,
        1
    );

    // Stand in for a judgement that takes long: hold the judging side.
    let analyzer = lock(&controller.analyzer);
    let judging = {
        let controller = Arc::clone(&controller);
        std::thread::spawn(move || controller.evaluate(first))
    };
    // The first window is closed (its data moved out) before judging waits.
    let closed = std::time::Instant::now();
    while lock(&controller.intake).evaluated_through_ms() != Some(first) {
        assert!(
            closed.elapsed() < Duration::from_secs(10),
            "window never closed"
        );
        std::thread::sleep(Duration::from_millis(1));
    }
    // Reports for the next window go in meanwhile; late ones for the
    // window being judged are refused as such, not queued behind it.
    let outcome = controller.report("n1", vec![n1_to_n2(second)]).unwrap();
    assert_eq!(outcome.accepted, 1);
    let late = controller.report("n1", vec![n1_to_n2(first)]).unwrap();
    assert_eq!(late.rejected, 1);
    // Registrations and pinglists do not wait either.
    let (session, _) = controller
        .register("n3", "test", &[udp("n3", 7003)])
        .await
        .unwrap();
    streams.push(controller.connect("n3", session));
    let snapshot = controller.subscribe().borrow().clone();
    assert!(!controller.pinglist("n3", &snapshot).targets.is_empty());
    assert!(!judging.is_finished(), "judging waited for the analyzer");
    drop(analyzer);

    let report = judging.join().unwrap().expect("the first window is judged");
    assert_eq!(report.window_start_ms, first);
    assert_eq!(report.paths.len(), 1);
    assert_eq!(controller.last_report().unwrap().window_start_ms, first);
    // What came in during the judgement is in the next window.
    let next = controller
        .evaluate(second)
        .expect("the second window is judged");
    assert_eq!(next.paths.len(), 1);
    assert_eq!(next.paths[0].source_endpoint, "n1/udp0");
}

#[tokio::test]
async fn paced_publishes_coalesce_changes_and_lose_none() {
    let dir = tempfile::tempdir().unwrap();
    let controller = controller(&dir).await;
    let cancel = tokio_util::sync::CancellationToken::new();
    let publisher = tokio::spawn(Arc::clone(&controller).run_publisher(cancel.clone()));
    while !controller.paced.load(std::sync::atomic::Ordering::Relaxed) {
        tokio::task::yield_now().await;
    }
    let mut versions = controller.subscribe();
    let before = versions.borrow_and_update().version;
    let mut streams = Vec::new();
    for i in 0..20u16 {
        let node = format!("n{i}");
        let (session, _) = controller
            .register(&node, "test", &[udp(&node, 7000 + i)])
            .await
            .unwrap();
        streams.push(controller.connect(&node, session));
    }
    // Every change shows within a couple of publish periods.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    loop {
        let snapshot = versions.borrow_and_update().clone();
        if snapshot.view.endpoint_count() == 20 {
            // 40 changes (20 registrations, 20 connects), far fewer publishes.
            assert!(
                snapshot.version - before < 40,
                "{} publishes for 40 changes",
                snapshot.version - before
            );
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "changes not published"
        );
        let _ = tokio::time::timeout(Duration::from_secs(1), versions.changed()).await;
    }
    streams.truncate(10);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    while versions.borrow_and_update().view.endpoint_count() != 10 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "leaves not published"
        );
        let _ = tokio::time::timeout(Duration::from_secs(1), versions.changed()).await;
    }
    cancel.cancel();
    publisher.await.unwrap();
}

/// Registers `node` with one UDP endpoint under `tor` and connects it.
async fn join(
    controller: &Arc<MeshController>,
    node: &str,
    tor: &str,
    port: u16,
) -> super::PresenceGuard {
    let endpoint = Endpoint {
        tor: tor.into(),
        ..udp(node, port)
    };
    let (session, _) = controller
        .register(node, "test", &[endpoint])
        .await
        .unwrap();
    controller.connect(node, session)
}

#[tokio::test]
async fn a_join_wakes_only_the_lists_that_draw_on_its_tor() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = MeshConfig {
        registry: format!("sqlite://{}", dir.path().join("registry.db").display()),
        ..MeshConfig::default()
    };
    // No inter-ToR sampling: a list draws on its own ToR only.
    config.pinglist.inter_tor_sample_tors = 0;
    let registry = open_registry(&config.registry).await.unwrap();
    let controller = MeshController::new(config, registry).await.unwrap();
    let _a1 = join(&controller, "a1", "tor-a", 1).await;
    let _b1 = join(&controller, "b1", "tor-b", 2).await;
    let _b2 = join(&controller, "b2", "tor-b", 3).await;
    let before = controller.subscribe().borrow().clone();

    let _a2 = join(&controller, "a2", "tor-a", 4).await;
    let after = controller.subscribe().borrow().clone();
    assert!(after.version > before.version);

    // Under tor-b: nothing to recompute, and indeed the same list.
    assert!(!controller.pinglist_may_differ("b1", &before, &after));
    let (old, new) = (
        controller.pinglist("b1", &before),
        controller.pinglist("b1", &after),
    );
    assert_eq!(old.targets, new.targets);
    // Under tor-a: recomputed, and the new peer is in it.
    assert!(controller.pinglist_may_differ("a1", &before, &after));
    let a1 = controller.pinglist("a1", &after);
    assert!(
        a1.targets
            .iter()
            .any(|t| t.target.as_ref().is_some_and(|e| e.id == "a2/udp0")),
        "{a1:?}"
    );
    assert!(controller.pinglist_may_differ("a2", &before, &after));

    // What feeds every list wakes every stream.
    let rotated = Snapshot {
        rotation_epoch: after.rotation_epoch + 1,
        ..snapshot_like(&after)
    };
    assert!(controller.pinglist_may_differ("b1", &after, &rotated));
    let rekeyed = Snapshot {
        probe_keys: Some(pingmesh_proto::v1::ProbeKeys::default()),
        ..snapshot_like(&after)
    };
    assert_ne!(rekeyed.probe_keys, after.probe_keys);
    assert!(controller.pinglist_may_differ("b1", &after, &rekeyed));
}

fn snapshot_like(s: &Snapshot) -> Snapshot {
    Snapshot {
        version: s.version + 1,
        rotation_epoch: s.rotation_epoch,
        probe_keys: s.probe_keys.clone(),
        view: Arc::clone(&s.view),
        services: Arc::clone(&s.services),
    }
}

fn lossy(start: u64, source: &str, target: &str) -> WindowSummary {
    WindowSummary {
        window_start_ms: start,
        window_ms: WINDOW_MS,
        source_endpoint: format!("{source}/udp0"),
        target_endpoint: format!("{target}/udp0"),
        sent: 20,
        lost: 20,
        ..WindowSummary::default()
    }
}

#[tokio::test]
async fn windows_judged_empty_take_late_summaries_into_history_only() {
    let dir = tempfile::tempdir().unwrap();
    let controller = controller(&dir).await;
    let mut streams = Vec::new();
    for (node, port) in [("n1", 7101), ("n2", 7102)] {
        let (session, _) = controller
            .register(node, "test", &[udp(node, port)])
            .await
            .unwrap();
        streams.push(controller.connect(node, session));
    }
    // Windows the controller judged while no agent could reach it (before
    // they connected, as after a partition or a restart).
    let first = window_start(unix_now_ms(), WINDOW_MS) - 6 * u64::from(WINDOW_MS);
    let windows: Vec<u64> = (0..4).map(|i| first + i * u64::from(WINDOW_MS)).collect();
    for &w in &windows {
        assert!(controller.evaluate(w).unwrap().paths.is_empty());
    }
    let late_count = |outcome: &str| {
        controller
            .metrics
            .late_summaries
            .with_label_values(&[outcome])
            .get()
    };
    // The agents' buffers arrive: every path lost all its probes.
    let n1: Vec<WindowSummary> = windows.iter().map(|&w| lossy(w, "n1", "n2")).collect();
    let n2: Vec<WindowSummary> = windows.iter().map(|&w| lossy(w, "n2", "n1")).collect();
    assert_eq!(controller.report("n1", n1.clone()).unwrap().accepted, 4);
    assert_eq!(controller.report("n2", n2).unwrap().accepted, 4);
    assert_eq!(late_count("accepted"), 8);
    assert_eq!(controller.judge_late(), 8);
    assert_eq!(late_count("judged"), 8);

    for &w in &windows {
        let cells = controller
            .history
            .window(crate::mesh::history::WindowRef::Start(w))
            .expect("the window is in the history");
        assert_eq!(cells.path_count, 2, "window {w}");
        assert_eq!(cells.failing(crate::mesh::history::FAILING_LOSS), 1);
    }
    assert!(
        controller.open_findings().is_empty(),
        "four windows of total loss, but late: no finding opens"
    );
    assert!(controller.open_root_causes().is_empty());
    assert!(controller.last_report().unwrap().paths.is_empty());

    // Sent again (the agent did not see the answer): judged already, refused.
    let again = controller.report("n1", n1).unwrap();
    assert_eq!((again.accepted, again.rejected), (0, 4));
    assert_eq!(late_count("duplicate"), 4);
    assert_eq!(controller.judge_late(), 0);
    drop(streams);
}
