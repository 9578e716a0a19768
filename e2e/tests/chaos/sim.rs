//! Simulated agents: real gRPC clients of the controller (the proto crate's
//! tonic client), each on its own HTTP/2 connection as real agents are, that
//! register one UDP endpoint, hold the pinglist stream open and report window
//! summaries. Hundreds fit in one test process; no probing happens.

use std::net::SocketAddr;
use std::time::Duration;

use pingmesh_proto::v1::mesh_controller_client::MeshControllerClient;
use pingmesh_proto::v1::{
    DelayStats, Endpoint, Pinglist, RegisterRequest, ReportWindowsRequest, ReportWindowsResponse,
    TargetKind, Transport, WatchPinglistRequest, WindowSummary,
};
use tonic::transport::Channel;
use tonic::{Status, Streaming};

/// Probes one simulated summary claims; all answered.
const PROBES_PER_SUMMARY: u64 = 10;

/// One simulated agent's connection and identity.
pub struct SimAgent {
    pub node: String,
    pub index: usize,
    pub session: u64,
    client: MeshControllerClient<Channel>,
    stream: Option<Streaming<Pinglist>>,
}

/// Endpoint id of a simulated node (`<node>/udp0`).
pub fn endpoint_id(node: &str) -> String {
    format!("{node}/udp0")
}

/// A node name for simulated agent `index` of group `prefix`.
pub fn node_name(prefix: &str, index: usize) -> String {
    format!("{prefix}-{index:04}")
}

impl SimAgent {
    /// Opens a connection to the controller (lazily: the first call connects).
    pub fn new(grpc: SocketAddr, prefix: &str, index: usize) -> Self {
        let channel = Channel::from_shared(format!("http://{grpc}"))
            .expect("controller URL")
            .connect_timeout(Duration::from_secs(3))
            .timeout(Duration::from_secs(30))
            .connect_lazy();
        Self {
            node: node_name(prefix, index),
            index,
            session: 0,
            client: MeshControllerClient::new(channel),
            stream: None,
        }
    }

    /// Registers one UDP endpoint on a loopback port of its own; keeps the session.
    pub async fn register(&mut self) -> Result<u64, Status> {
        let port = 20_000 + u16::try_from(self.index % 40_000).expect("port");
        let reply = self
            .client
            .register(RegisterRequest {
                node: self.node.clone(),
                agent_version: "chaos-sim".into(),
                endpoints: vec![Endpoint {
                    id: endpoint_id(&self.node),
                    transport: Transport::Udp.into(),
                    address: format!("127.0.0.1:{port}"),
                    qpn: 0,
                    tor: format!("tor-{}", self.index % 8),
                    device: String::new(),
                }],
            })
            .await?
            .into_inner();
        self.session = reply.session;
        Ok(reply.session)
    }

    /// Opens the pinglist stream (the agent counts as connected while it is
    /// open) and waits for the first pinglist.
    pub async fn watch(&mut self) -> Result<(), Status> {
        let mut stream = self
            .client
            .watch_pinglist(WatchPinglistRequest {
                node: self.node.clone(),
                session: self.session,
            })
            .await?
            .into_inner();
        stream.message().await?;
        self.stream = Some(stream);
        Ok(())
    }

    /// Reports one all-answered summary of `window_start_ms` for the path to
    /// `target` (a node name).
    pub async fn report(
        &mut self,
        window_start_ms: u64,
        window_ms: u32,
        target: &str,
    ) -> Result<ReportWindowsResponse, Status> {
        let summary = summary(&self.node, target, window_start_ms, window_ms);
        Ok(self
            .client
            .report_windows(ReportWindowsRequest {
                node: self.node.clone(),
                session: self.session,
                windows: vec![summary],
            })
            .await?
            .into_inner())
    }

    /// Closes the pinglist stream and the connection: the agent leaves.
    pub fn leave(self) {
        drop(self);
    }
}

/// A valid summary of a path on which every probe was answered.
pub fn summary(node: &str, target: &str, window_start_ms: u64, window_ms: u32) -> WindowSummary {
    let rtt = DelayStats {
        min_ns: 20_000,
        p50_ns: 25_000,
        p99_ns: 40_000,
        max_ns: 50_000,
    };
    WindowSummary {
        window_start_ms,
        window_ms,
        source_endpoint: endpoint_id(node),
        target_endpoint: endpoint_id(target),
        kind: TargetKind::TorMesh.into(),
        sent: PROBES_PER_SUMMARY,
        ok: PROBES_PER_SUMMARY,
        network_rtt: Some(rtt),
        probed_flows_mask: 1,
        ..WindowSummary::default()
    }
}
