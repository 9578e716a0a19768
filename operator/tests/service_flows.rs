//! `ReportServiceFlows` end to end inside one process: a real controller
//! (SQLite file, real TCP) and a real tonic client acting as agents. Reported
//! flows become service targets on the reporter's pinglist stream, hostile
//! reports get clear errors and counters, and a node that stops reporting is
//! forgotten.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::time::Duration;

use pingmesh_operator::config::MeshConfig;
use pingmesh_operator::mesh::pinglist::PinglistPolicy;
use pingmesh_operator::mesh::server::{self, RunningController};
use pingmesh_proto::limits::MAX_SERVICE_FLOWS_PER_REPORT;
use pingmesh_proto::v1::mesh_controller_client::MeshControllerClient;
use pingmesh_proto::v1::{
    Endpoint, Pinglist, RegisterRequest, ReportServiceFlowsRequest, ServiceFlow, ServiceFlowKind,
    TargetKind, Transport, WatchPinglistRequest,
};
use pingmesh_proto::window::unix_now_ms;
use tokio_util::sync::CancellationToken;
use tonic::Code;
use tonic::transport::Channel;

struct Harness {
    running: Option<RunningController>,
    cancel: CancellationToken,
    client: MeshControllerClient<Channel>,
    /// Open pinglist streams: the nodes are present while they are.
    streams: Vec<(String, tonic::Streaming<Pinglist>)>,
    _dir: tempfile::TempDir,
}

impl Harness {
    async fn start() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let config = MeshConfig {
            grpc_addr: "127.0.0.1:0".parse().unwrap(),
            http_addr: "127.0.0.1:0".parse().unwrap(),
            registry: format!("sqlite://{}", dir.path().join("registry.db").display()),
            // Every node under its own ToR and no inter-ToR samples: only
            // service targets can put anything on a pinglist.
            pinglist: PinglistPolicy {
                inter_tor_sample_tors: 0,
                service_rate_pps: 8.0,
                max_service_targets_per_agent: 2,
                ..PinglistPolicy::default()
            },
            ..MeshConfig::default()
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
            streams: Vec::new(),
            _dir: dir,
        }
    }

    /// Registers `node` (one UDP endpoint on `ip`, its own ToR) and opens its
    /// pinglist stream; returns the session.
    async fn join(&mut self, node: &str, ip: &str) -> u64 {
        let session = self
            .client
            .register(RegisterRequest {
                node: node.into(),
                agent_version: "test".into(),
                endpoints: vec![Endpoint {
                    id: format!("{node}/udp0"),
                    transport: Transport::Udp as i32,
                    address: format!("{ip}:9403"),
                    qpn: 0,
                    tor: format!("tor-{node}"),
                    device: String::new(),
                }],
            })
            .await
            .unwrap()
            .into_inner()
            .session;
        let stream = self
            .client
            .watch_pinglist(WatchPinglistRequest {
                node: node.into(),
                session,
            })
            .await
            .unwrap()
            .into_inner();
        self.streams.push((node.to_owned(), stream));
        session
    }

    /// The next pinglist pushed to `node` whose targets satisfy `done`.
    async fn pinglist_until(&mut self, node: &str, done: impl Fn(&Pinglist) -> bool) -> Pinglist {
        let stream = &mut self.streams.iter_mut().find(|(n, _)| n == node).unwrap().1;
        tokio::time::timeout(Duration::from_secs(10), async {
            loop {
                let list = stream.message().await.unwrap().unwrap();
                if done(&list) {
                    return list;
                }
            }
        })
        .await
        .expect("no matching pinglist within 10 s")
    }

    async fn report(
        &mut self,
        node: &str,
        session: u64,
        flows: Vec<ServiceFlow>,
    ) -> Result<(u32, u32), tonic::Status> {
        self.client
            .report_service_flows(ReportServiceFlowsRequest {
                node: node.into(),
                session,
                flows,
                dropped: 0,
            })
            .await
            .map(|r| {
                let r = r.into_inner();
                (r.accepted, r.rejected)
            })
    }

    fn controller(&self) -> &std::sync::Arc<pingmesh_operator::mesh::controller::MeshController> {
        &self.running.as_ref().unwrap().controller
    }

    async fn stop(mut self) {
        self.streams.clear();
        self.cancel.cancel();
        self.running.take().unwrap().wait().await.unwrap();
    }
}

fn tcp(local: &str, remote: &str, port: u32, pod: &str) -> ServiceFlow {
    ServiceFlow {
        kind: ServiceFlowKind::Tcp.into(),
        local_address: local.into(),
        remote_address: remote.into(),
        local_port: port,
        remote_port: 5201,
        flow_label: 0,
        pod_uid: pod.into(),
        container_id: String::new(),
        pid: 100,
        command: "trainer".into(),
        first_seen_ms: 1,
        last_seen_ms: 2,
    }
}

fn service_targets(list: &Pinglist) -> Vec<(String, String)> {
    list.targets
        .iter()
        .filter(|t| t.kind == TargetKind::Service as i32)
        .map(|t| {
            (
                t.source_endpoint.clone(),
                t.target.as_ref().map(|e| e.id.clone()).unwrap_or_default(),
            )
        })
        .collect()
}

#[tokio::test]
async fn reported_flows_become_service_targets_on_the_reporters_pinglist() {
    let mut h = Harness::start().await;
    let a = h.join("a", "10.1.0.1").await;
    h.join("b", "10.1.0.2").await;
    h.join("c", "10.1.0.3").await;
    h.join("d", "10.1.0.4").await;
    let first = h.pinglist_until("a", |_| true).await;
    assert!(first.targets.is_empty(), "{first:?}");

    // Three connections to b, two to c, one to d; the cap is 2 targets per agent.
    let flows = vec![
        tcp(
            "10.1.0.1",
            "10.1.0.2",
            40_001,
            "00000000-0000-0000-0000-000000000001",
        ),
        tcp(
            "10.1.0.1",
            "10.1.0.2",
            40_002,
            "00000000-0000-0000-0000-000000000001",
        ),
        tcp(
            "10.1.0.1",
            "10.1.0.2",
            40_003,
            "00000000-0000-0000-0000-000000000002",
        ),
        tcp(
            "10.1.0.1",
            "10.1.0.3",
            40_004,
            "00000000-0000-0000-0000-000000000002",
        ),
        tcp(
            "10.1.0.1",
            "10.1.0.3",
            40_005,
            "00000000-0000-0000-0000-000000000002",
        ),
        tcp(
            "10.1.0.1",
            "10.1.0.4",
            40_006,
            "00000000-0000-0000-0000-000000000003",
        ),
        tcp(
            "10.1.0.1",
            "192.0.2.9",
            40_007,
            "00000000-0000-0000-0000-000000000003",
        ),
    ];
    assert_eq!(h.report("a", a, flows).await.unwrap(), (7, 0));
    let list = h
        .pinglist_until("a", |l| !service_targets(l).is_empty())
        .await;
    assert_eq!(
        service_targets(&list),
        [
            ("a/udp0".to_owned(), "b/udp0".to_owned()),
            ("a/udp0".to_owned(), "c/udp0".to_owned())
        ]
    );
    let target = &list.targets[0];
    assert!((target.rate_pps - 8.0).abs() < f64::EPSILON);
    assert!(target.flows > 1, "spread over ECMP paths: {}", target.flows);

    let view = h.controller().services_view();
    assert_eq!(view.reporting_nodes, 1);
    let keys: Vec<&str> = view.services.iter().map(|s| s.service.as_str()).collect();
    assert_eq!(
        keys,
        [
            "PodUID/00000000-0000-0000-0000-000000000002",
            "PodUID/00000000-0000-0000-0000-000000000001",
            "PodUID/00000000-0000-0000-0000-000000000003"
        ]
    );
    let pod3 = &view.services[2];
    assert_eq!(pod3.paths.len(), 2, "to d, and outside the mesh");
    assert!(pod3.paths.iter().all(|p| !p.probed), "d is over the cap");

    // The next snapshot replaces this one: the flows to b ended.
    let fewer = vec![tcp(
        "10.1.0.1",
        "10.1.0.4",
        40_006,
        "00000000-0000-0000-0000-000000000003",
    )];
    assert_eq!(h.report("a", a, fewer).await.unwrap(), (1, 0));
    let list = h
        .pinglist_until("a", |l| {
            service_targets(l) == [("a/udp0".to_owned(), "d/udp0".to_owned())]
        })
        .await;
    assert_eq!(list.targets.len(), 1);
    h.stop().await;
}

#[tokio::test]
async fn hostile_reports_get_clear_errors_and_bad_flows_are_counted() {
    let mut h = Harness::start().await;
    let a = h.join("a", "10.1.0.1").await;
    h.join("b", "10.1.0.2").await;

    let status = h.report("a", a ^ 1, vec![]).await.unwrap_err();
    assert_eq!(status.code(), Code::FailedPrecondition, "{status:?}");
    let status = h.report("nobody", 1, vec![]).await.unwrap_err();
    assert_eq!(status.code(), Code::NotFound, "{status:?}");
    let status = h.report("bad node", 1, vec![]).await.unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
    let many = vec![tcp("10.1.0.1", "10.1.0.2", 1, ""); MAX_SERVICE_FLOWS_PER_REPORT + 1];
    let status = h.report("a", a, many).await.unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
    assert!(status.message().contains("at most"), "{status:?}");

    let mut bad_kind = tcp("10.1.0.1", "10.1.0.2", 2, "");
    bad_kind.kind = 99;
    let mut bad_uid = tcp("10.1.0.1", "10.1.0.2", 3, "");
    bad_uid.pod_uid = "../../etc".into();
    let flows = vec![
        tcp(
            "10.1.0.1",
            "10.1.0.2",
            1,
            "00000000-0000-0000-0000-000000000001",
        ),
        tcp(
            "10.1.0.1",
            "not an address",
            1,
            "00000000-0000-0000-0000-000000000001",
        ),
        bad_kind,
        bad_uid,
    ];
    assert_eq!(h.report("a", a, flows).await.unwrap(), (1, 3));
    let metrics = String::from_utf8(h.controller().metrics.encode()).unwrap();
    for line in [
        "pingmesh_controller_service_flows_rejected_total{reason=\"bad_address\"} 1",
        "pingmesh_controller_service_flows_rejected_total{reason=\"unknown_kind\"} 1",
        "pingmesh_controller_service_flows_rejected_total{reason=\"bad_pod_uid\"} 1",
        "pingmesh_controller_rejected_requests_total{reason=\"stale_session\",rpc=\"report_service_flows\"} 1",
        "pingmesh_service_flows{kind=\"tcp\",state=\"mapped\"} 1",
        "pingmesh_service_targets 1",
    ] {
        assert!(metrics.contains(line), "missing {line:?} in\n{metrics}");
    }
    h.stop().await;
}

#[tokio::test]
async fn a_node_that_stops_reporting_loses_its_service_targets() {
    let mut h = Harness::start().await;
    let a = h.join("a", "10.1.0.1").await;
    h.join("b", "10.1.0.2").await;
    h.report(
        "a",
        a,
        vec![tcp(
            "10.1.0.1",
            "10.1.0.2",
            1,
            "00000000-0000-0000-0000-000000000001",
        )],
    )
    .await
    .unwrap();
    h.pinglist_until("a", |l| !service_targets(l).is_empty())
        .await;
    let expire_ms = h.controller().config().services.expire_after_ms;
    h.controller()
        .housekeeping(unix_now_ms() + expire_ms + 1_000)
        .await;
    let list = h
        .pinglist_until("a", |l| service_targets(l).is_empty())
        .await;
    assert!(list.targets.is_empty());
    assert_eq!(h.controller().services_view().reporting_nodes, 0);
    h.stop().await;
}
