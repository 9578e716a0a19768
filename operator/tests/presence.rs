//! Presence is per session: a window counts a node's agent as present only
//! when one session of it was connected for the whole window.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::time::Duration;

use pingmesh_operator::config::MeshConfig;
use pingmesh_operator::mesh::controller::MeshController;
use pingmesh_operator::mesh::registry::open_registry;
use pingmesh_proto::v1::{Endpoint, Transport, WindowSummary};
use pingmesh_proto::window::{unix_now_ms, window_start};

const WINDOW_MS: u32 = 1_000;

fn udp(node: &str, port: u16) -> Endpoint {
    Endpoint {
        id: format!("{node}/udp0"),
        transport: Transport::Udp as i32,
        address: format!("127.0.0.1:{port}"),
        ..Endpoint::default()
    }
}

/// 20 probes from n1 to n2 in window `start`, all answered.
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

#[tokio::test]
async fn a_node_that_registered_again_mid_window_is_not_present_for_that_window() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = MeshConfig {
        registry: format!("sqlite://{}", dir.path().join("registry.db").display()),
        ..MeshConfig::default()
    };
    config.pinglist.window_ms = WINDOW_MS;
    config.pinglist.probe_timeout_ms = 50;
    let registry = open_registry(&config.registry).await.unwrap();
    let controller = MeshController::new(config, registry).await.unwrap();

    let mut streams = Vec::new();
    for (node, port) in [("n1", 7001), ("n2", 7002)] {
        let (session, _) = controller
            .register(node, "test", &[udp(node, port)])
            .await
            .unwrap();
        streams.push(controller.connect(node, session));
    }
    let connected_at = unix_now_ms();
    // Into the first window both were connected from its start.
    let window = loop {
        let now = unix_now_ms();
        let start = window_start(now, WINDOW_MS);
        if start > connected_at && now - start >= 20 {
            break start;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    };

    // n2's agent registers again (an RNIC re-opened with a new QPN) and opens
    // its new stream; the old session's stream has not closed yet.
    let (again, _) = controller
        .register("n2", "test", &[udp("n2", 7003)])
        .await
        .unwrap();
    streams.push(controller.connect("n2", again));
    let next = window + u64::from(WINDOW_MS);
    assert!(unix_now_ms() < next, "registered again within the window");

    for start in [window, next] {
        let outcome = controller.report("n1", vec![n1_to_n2(start)]).unwrap();
        assert_eq!(outcome.accepted, 1, "{outcome:?}");
    }
    let switched = controller.evaluate(window).unwrap();
    assert!(
        switched.paths.is_empty(),
        "no session of n2 was there for the whole window: {:?}",
        switched.paths
    );
    // The next window the new session covers from its start.
    let after = controller.evaluate(next).unwrap();
    assert_eq!(after.paths.len(), 1, "{:?}", after.paths);
    drop(streams);
}
