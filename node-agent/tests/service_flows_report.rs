//! The service-flow reporter against a real gRPC server on loopback: it sends
//! the table as a full snapshot under the live session, keeps going through
//! Unimplemented (an older controller), and sends nothing without a session.
#![allow(clippy::expect_used, clippy::unwrap_used, clippy::panic)]

use std::net::{IpAddr, Ipv4Addr};
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::Stream;
use pingmesh_agent::control::{BearerToken, ControlSession};
use pingmesh_agent::service_flows::cgroup::PodRef;
use pingmesh_agent::service_flows::metrics::TracerMetrics;
use pingmesh_agent::service_flows::report::run_reporter;
use pingmesh_agent::service_flows::{FlowTable, Owner, Resolve, TableLimits};
use pingmesh_agent::tracer::{Origin, TcpEvent, TcpState, TraceEvent};
use pingmesh_proto::v1::mesh_controller_client::MeshControllerClient;
use pingmesh_proto::v1::mesh_controller_server::{MeshController, MeshControllerServer};
use pingmesh_proto::v1::{
    ExchangeTracesRequest, ExchangeTracesResponse, Pinglist, RegisterRequest, RegisterResponse,
    ReportServiceFlowsRequest, ReportServiceFlowsResponse, ReportWindowsRequest,
    ReportWindowsResponse, ServiceFlowKind, WatchPinglistRequest,
};
use prometheus::{Encoder, Registry, TextEncoder};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tonic::{Request, Response, Status};

/// Answers `ReportServiceFlows` with `Unimplemented` `refuse` times, then takes them.
#[derive(Default)]
struct Recorder {
    refuse: Mutex<u32>,
    received: Mutex<Vec<ReportServiceFlowsRequest>>,
}

/// The server side of a shared [`Recorder`].
struct Controller(Arc<Recorder>);

#[tonic::async_trait]
impl MeshController for Controller {
    type WatchPinglistStream = Pin<Box<dyn Stream<Item = Result<Pinglist, Status>> + Send>>;

    async fn register(
        &self,
        _: Request<RegisterRequest>,
    ) -> Result<Response<RegisterResponse>, Status> {
        Err(Status::unimplemented("not in this test"))
    }
    async fn watch_pinglist(
        &self,
        _: Request<WatchPinglistRequest>,
    ) -> Result<Response<Self::WatchPinglistStream>, Status> {
        Err(Status::unimplemented("not in this test"))
    }
    async fn report_windows(
        &self,
        _: Request<ReportWindowsRequest>,
    ) -> Result<Response<ReportWindowsResponse>, Status> {
        Err(Status::unimplemented("not in this test"))
    }
    async fn exchange_traces(
        &self,
        _: Request<ExchangeTracesRequest>,
    ) -> Result<Response<ExchangeTracesResponse>, Status> {
        Err(Status::unimplemented("not in this test"))
    }
    async fn report_service_flows(
        &self,
        request: Request<ReportServiceFlowsRequest>,
    ) -> Result<Response<ReportServiceFlowsResponse>, Status> {
        {
            let mut refuse = self.0.refuse.lock().unwrap();
            if *refuse > 0 {
                *refuse -= 1;
                return Err(Status::unimplemented("service flows are not taken yet"));
            }
        }
        let request = request.into_inner();
        let accepted = u32::try_from(request.flows.len()).unwrap();
        self.0.received.lock().unwrap().push(request);
        Ok(Response::new(ReportServiceFlowsResponse {
            accepted,
            rejected: 0,
        }))
    }
}

struct InPod;

impl Resolve for InPod {
    fn owner(&mut self, origin: &Origin, _: u64) -> Owner {
        Owner {
            pid: origin.pid,
            command: origin.comm.clone(),
            pod: Some(PodRef {
                pod_uid: "1b2c3d4e-5f60-7182-93a4-b5c6d7e8f901".into(),
                container_id: "ab".repeat(32),
            }),
        }
    }
    fn local_gid(&mut self, _: &str, _: u8, _: u8) -> Option<String> {
        None
    }
}

fn counter(registry: &Registry, result: &str) -> u64 {
    let mut out = Vec::new();
    TextEncoder::new()
        .encode(&registry.gather(), &mut out)
        .unwrap();
    let series = format!("pingmesh_service_flow_reports_total{{result=\"{result}\"}} ");
    String::from_utf8(out)
        .unwrap()
        .lines()
        .find_map(|l| l.strip_prefix(series.as_str())?.parse().ok())
        .unwrap_or(0)
}

#[tokio::test]
async fn the_table_is_reported_under_the_live_session_through_unimplemented_answers() {
    let recorder = Arc::new(Recorder {
        refuse: Mutex::new(2),
        ..Recorder::default()
    });
    let listener = tokio::net::TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
        .await
        .unwrap();
    let addr = listener.local_addr().unwrap();
    let server = tonic::transport::Server::builder()
        .add_service(MeshControllerServer::new(Controller(recorder.clone())))
        .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener));
    tokio::spawn(server);
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let client = MeshControllerClient::with_interceptor(channel, BearerToken::default());

    let mut table = FlowTable::new(TableLimits::default());
    let event = TraceEvent::Tcp(TcpEvent {
        origin: Origin {
            pid: 4242,
            cgroup_id: 9,
            ts_ns: 1,
            comm: "trainer".into(),
        },
        sock: 1,
        src: IpAddr::V4(Ipv4Addr::new(10, 0, 0, 1)),
        dst: IpAddr::V4(Ipv4Addr::new(10, 0, 0, 2)),
        sport: 40000,
        dport: 5201,
        old_state: TcpState::SynSent,
        new_state: TcpState::Established,
        netns: 1,
    });
    table.apply(&event, &mut InPod, 1_000);
    let table = Arc::new(Mutex::new(table));

    let registry = Registry::new();
    let metrics = TracerMetrics::new(&registry).unwrap();
    let (sessions_tx, sessions) = watch::channel(None);
    let cancel = CancellationToken::new();
    let reporter = tokio::spawn(run_reporter(
        sessions,
        table.clone(),
        metrics,
        Duration::from_millis(20),
        cancel.clone(),
    ));

    // No session: nothing is sent.
    tokio::time::sleep(Duration::from_millis(150)).await;
    assert_eq!(
        counter(&registry, "unimplemented") + counter(&registry, "accepted"),
        0
    );

    sessions_tx.send_replace(Some(ControlSession {
        client,
        node: "node-a".into(),
        session: 7,
    }));
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    while recorder.received.lock().unwrap().is_empty() {
        assert!(tokio::time::Instant::now() < deadline, "no report arrived");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(
        counter(&registry, "unimplemented"),
        2,
        "refused twice, then taken"
    );
    // The server records a report before it answers; the reporter counts it
    // accepted only once the answer is back, so wait for that too.
    while counter(&registry, "accepted") < 1 {
        assert!(tokio::time::Instant::now() < deadline, "no report accepted");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let first = recorder.received.lock().unwrap()[0].clone();
    assert_eq!(
        (first.node.as_str(), first.session, first.dropped),
        ("node-a", 7, 0)
    );
    assert_eq!(first.flows.len(), 1);
    let flow = &first.flows[0];
    assert_eq!(flow.kind, ServiceFlowKind::Tcp as i32);
    assert_eq!(
        (flow.local_address.as_str(), flow.local_port),
        ("10.0.0.1", 40000)
    );
    assert_eq!(
        (flow.remote_address.as_str(), flow.remote_port),
        ("10.0.0.2", 5201)
    );
    assert_eq!(flow.pod_uid, "1b2c3d4e-5f60-7182-93a4-b5c6d7e8f901");
    assert_eq!((flow.pid, flow.command.as_str()), (4242, "trainer"));

    // The session goes away: reports stop.
    sessions_tx.send_replace(None);
    tokio::time::sleep(Duration::from_millis(60)).await;
    let sent = recorder.received.lock().unwrap().len();
    tokio::time::sleep(Duration::from_millis(150)).await;
    assert_eq!(recorder.received.lock().unwrap().len(), sent);

    cancel.cancel();
    reporter.await.unwrap();
}
