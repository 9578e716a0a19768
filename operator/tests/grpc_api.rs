//! The agent-facing gRPC API against hostile and broken requests: a real
//! controller (SQLite file, real TCP) and a real tonic client.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use pingmesh_operator::config::MeshConfig;
use pingmesh_operator::mesh::server::{self, RunningController};
use pingmesh_proto::v1::mesh_controller_client::MeshControllerClient;
use pingmesh_proto::v1::{
    Endpoint, Pinglist, RegisterRequest, ReportWindowsRequest, Transport, WatchPinglistRequest,
    WindowSummary,
};
use pingmesh_proto::window::{unix_now_ms, window_start};
use tokio_util::sync::CancellationToken;
use tonic::Code;
use tonic::transport::Channel;

struct Harness {
    running: Option<RunningController>,
    cancel: CancellationToken,
    client: MeshControllerClient<Channel>,
    _dir: tempfile::TempDir,
}

impl Harness {
    async fn start() -> Self {
        Self::start_with(MeshConfig::default()).await
    }

    async fn start_with(base: MeshConfig) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let config = MeshConfig {
            grpc_addr: "127.0.0.1:0".parse().unwrap(),
            http_addr: "127.0.0.1:0".parse().unwrap(),
            registry: format!("sqlite://{}", dir.path().join("registry.db").display()),
            ..base
        };
        let cancel = CancellationToken::new();
        let running = server::start(config, cancel.clone()).await.unwrap();
        let client = MeshControllerClient::connect(format!("http://{}", running.grpc_addr))
            .await
            .unwrap();
        Self {
            running: Some(running),
            cancel,
            client,
            _dir: dir,
        }
    }

    /// Registers `node` with one UDP endpoint; returns the session.
    async fn register_node(&mut self, node: &str, port: u16) -> u64 {
        let request = register(node, vec![udp(node, port)]);
        self.client
            .register(request)
            .await
            .unwrap()
            .into_inner()
            .session
    }

    async fn watch(
        &mut self,
        node: &str,
        session: u64,
    ) -> Result<tonic::Streaming<Pinglist>, tonic::Status> {
        let request = WatchPinglistRequest {
            node: node.into(),
            session,
        };
        self.client
            .watch_pinglist(request)
            .await
            .map(tonic::Response::into_inner)
    }

    async fn stop(mut self) {
        self.cancel.cancel();
        self.running.take().unwrap().wait().await.unwrap();
    }
}

fn udp(node: &str, port: u16) -> Endpoint {
    Endpoint {
        id: format!("{node}/udp0"),
        transport: Transport::Udp as i32,
        address: format!("127.0.0.1:{port}"),
        qpn: 0,
        tor: "rack-1".into(),
        device: String::new(),
    }
}

fn register(node: &str, endpoints: Vec<Endpoint>) -> RegisterRequest {
    RegisterRequest {
        node: node.into(),
        agent_version: "test".into(),
        endpoints,
    }
}

fn summary(source: &str, target: &str, sent: u64, ok: u64) -> WindowSummary {
    WindowSummary {
        window_start_ms: window_start(unix_now_ms(), 5_000),
        window_ms: 5_000,
        source_endpoint: source.into(),
        target_endpoint: target.into(),
        sent,
        ok,
        ..WindowSummary::default()
    }
}

#[tokio::test]
async fn malformed_registrations_are_refused_with_clear_errors() {
    let mut h = Harness::start().await;
    let cases = [
        (
            register("bad node", vec![udp("bad node", 1)]),
            "not a valid identifier",
        ),
        (register("n1", vec![]), "1 to 64 endpoints"),
        (
            register(
                "n1",
                (0..65)
                    .map(|i| Endpoint {
                        id: format!("n1/e{i}"),
                        ..udp("n1", 1)
                    })
                    .collect(),
            ),
            "1 to 64 endpoints",
        ),
        (
            register(
                "n1",
                vec![Endpoint {
                    address: "not-an-address".into(),
                    ..udp("n1", 1)
                }],
            ),
            "not ip:port",
        ),
        (
            register(
                "n1",
                vec![Endpoint {
                    transport: 42,
                    ..udp("n1", 1)
                }],
            ),
            "unknown transport",
        ),
        (
            register("n1", vec![udp("n1", 1), udp("n1", 2)]),
            "listed twice",
        ),
        (
            register(
                "n1",
                vec![Endpoint {
                    tor: "has space".into(),
                    ..udp("n1", 1)
                }],
            ),
            "ToR",
        ),
        (
            register(
                "n1",
                vec![Endpoint {
                    transport: Transport::Rdma as i32,
                    address: "fe80::1".into(),
                    ..udp("n1", 1)
                }],
            ),
            "GID and a QPN",
        ),
    ];
    for (request, expected) in cases {
        let status = h.client.register(request).await.unwrap_err();
        assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
        assert!(
            status.message().contains(expected),
            "{:?} lacks {expected:?}",
            status.message()
        );
    }
    h.stop().await;
}

#[tokio::test]
async fn a_node_cannot_claim_another_nodes_endpoint() {
    let mut h = Harness::start().await;
    h.register_node("n1", 1).await;
    let status = h
        .client
        .register(register("n2", vec![udp("n1", 2)]))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument);
    assert!(
        status.message().contains("must be \"n2/<name>\""),
        "{}",
        status.message()
    );
    h.stop().await;
}

#[tokio::test]
async fn unknown_nodes_and_stale_sessions_are_told_to_register() {
    let mut h = Harness::start().await;
    let watch = h.watch("ghost", 1).await;
    assert_eq!(watch.unwrap_err().code(), Code::NotFound);
    let report = h
        .client
        .report_windows(ReportWindowsRequest {
            node: "ghost".into(),
            session: 1,
            windows: vec![],
        })
        .await;
    assert_eq!(report.unwrap_err().code(), Code::NotFound);

    let first = h.register_node("n1", 1).await;
    let second = h.register_node("n1", 1).await;
    assert_ne!(first, second);
    let stale = h.watch("n1", first).await;
    assert_eq!(stale.unwrap_err().code(), Code::FailedPrecondition);
    h.watch("n1", second).await.unwrap();
    h.stop().await;
}

#[tokio::test]
async fn bad_summaries_are_counted_and_good_ones_in_the_same_report_kept() {
    let mut h = Harness::start().await;
    let session = h.register_node("n1", 1).await;
    h.register_node("n2", 2).await;
    let windows = vec![
        summary("n1/udp0", "n2/udp0", 10, 10), // fine
        summary("n1/udp0", "n2/udp0", 10, 10), // duplicate
        summary("n1/udp0", "n3/udp0", 10, 3),  // counts do not add up
        summary("n2/udp0", "n1/udp0", 10, 10), // not n1's endpoint
        WindowSummary {
            window_ms: 7,
            ..summary("n1/udp0", "x", 1, 1)
        }, // wrong window length
    ];
    let reply = h
        .client
        .report_windows(ReportWindowsRequest {
            node: "n1".into(),
            session,
            windows,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        (reply.accepted, reply.duplicates, reply.rejected),
        (1, 1, 3),
        "every summary is counted once"
    );

    let too_many = vec![summary("n1/udp0", "n2/udp0", 0, 0); 20_001];
    let status = h
        .client
        .report_windows(ReportWindowsRequest {
            node: "n1".into(),
            session,
            windows: too_many,
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument);
    h.stop().await;
}

#[tokio::test]
async fn an_oversized_message_is_refused_and_the_server_keeps_serving() {
    let mut h = Harness::start().await;
    let huge = RegisterRequest {
        agent_version: "x".repeat(5 * 1024 * 1024),
        ..register("n1", vec![udp("n1", 1)])
    };
    let status = h.client.register(huge).await.unwrap_err();
    assert!(
        matches!(
            status.code(),
            Code::ResourceExhausted | Code::OutOfRange | Code::Internal
        ),
        "{status:?}"
    );
    h.register_node("n1", 1).await;
    h.stop().await;
}

#[tokio::test]
async fn the_pinglist_stream_pushes_a_new_list_when_a_peer_connects() {
    let mut h = Harness::start().await;
    let s1 = h.register_node("n1", 1).await;
    let mut stream = h.watch("n1", s1).await.unwrap();
    let first = stream.message().await.unwrap().unwrap();
    assert!(first.targets.is_empty(), "alone in the mesh: {first:?}");

    let s2 = h.register_node("n2", 2).await;
    let mut peer_stream = h.watch("n2", s2).await.unwrap();
    let _ = peer_stream.message().await.unwrap().unwrap();

    let second = stream.message().await.unwrap().unwrap();
    assert_eq!(second.targets.len(), 1);
    let target = &second.targets[0];
    assert_eq!(target.target.as_ref().unwrap().id, "n2/udp0");
    assert_eq!(target.source_tor, "rack-1");
    assert!(second.version > first.version);

    // The peer goes away: n1's list empties again at once.
    drop(peer_stream);
    let third = stream.message().await.unwrap().unwrap();
    assert!(third.targets.is_empty(), "{third:?}");
    h.stop().await;
}

#[tokio::test]
async fn stale_agents_expire_but_connected_ones_stay() {
    let mut h = Harness::start_with(MeshConfig {
        stale_after_secs: 3,
        ..MeshConfig::default()
    })
    .await;
    h.register_node("gone", 1).await;
    let session = h.register_node("here", 2).await;
    let _stream = h.watch("here", session).await.unwrap();
    let controller = h.running.as_ref().unwrap().controller.clone();
    tokio::time::sleep(std::time::Duration::from_millis(100)).await; // let the stream connect

    controller.housekeeping(unix_now_ms() + 10_000).await;
    let nodes: Vec<String> = controller
        .agents()
        .await
        .unwrap()
        .into_iter()
        .map(|a| a.record.node)
        .collect();
    assert_eq!(nodes, vec!["here".to_owned()]);
    let endpoints: Vec<String> = controller
        .endpoints()
        .await
        .unwrap()
        .into_iter()
        .map(|e| e.id)
        .collect();
    assert_eq!(endpoints, vec!["here/udp0".to_owned()]);
    h.stop().await;
}
