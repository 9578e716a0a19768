//! Writes the seed corpora under fuzz/corpus/<target>/ from the project's own
//! encoders: valid messages, requests, configs and specs, so the fuzzers start
//! past the parsers. Run it after a wire or API change:
//! `hack/fuzz.sh --seeds`.

// Linked for its coverage callbacks: the crates below are instrumented.
extern crate libfuzzer_sys;

use std::fs;
use std::path::{Path, PathBuf};

use pingmesh_agent::probe::auth;
use pingmesh_agent::probe::wire::Message;
use pingmesh_fuzz::grpc_input::{
    Call, FLAG_LIVE_SESSION, FLAG_RECENT_WINDOWS, SEEDED_NODE, selector,
};
use pingmesh_operator::config::MeshConfig;
use pingmesh_operator::crd::PingMeshSpec;
use pingmesh_proto::probe_auth::{KeySet, keys_around};
use pingmesh_proto::v1::{
    DelayStats, Endpoint, ExchangeTracesRequest, RegisterRequest, ReportServiceFlowsRequest,
    ReportWindowsRequest, ServiceFlow, ServiceFlowKind, TargetKind, TraceResult, Transport,
    WatchPinglistRequest, WindowSummary,
};
use prost::Message as _;

fn write(dir: &Path, name: &str, bytes: &[u8]) -> std::io::Result<()> {
    fs::create_dir_all(dir)?;
    fs::write(dir.join(format!("seed-{name}")), bytes)
}

fn wire(dir: &Path) -> std::io::Result<()> {
    let probe = Message::probe(0x0123_4567_89ab_cdef, 42);
    write(dir, "probe", &probe.encode())?;
    write(dir, "ack1", &Message::ack1(&probe).encode())?;
    write(
        dir,
        "ack2-hardware",
        &Message::ack2(&probe, 1_000, 2_500, false).encode(),
    )?;
    write(
        dir,
        "ack2-software",
        &Message::ack2(&probe, 1_000, 2_500, true).encode(),
    )?;
    write(dir, "truncated", &probe.encode()[..10])?;
    // Signed with the keys the target verifies with, so the fuzzer starts
    // past the tag check as well as the decoder.
    let keys = KeySet::from_proto(&keys_around(
        pingmesh_fuzz::WIRE_MASTER,
        pingmesh_fuzz::WIRE_EPOCH,
    ))
    .map_err(std::io::Error::other)?;
    let signed = |m: &Message| auth::seal(Some(&keys), m, pingmesh_fuzz::WIRE_RESPONDER);
    write(dir, "probe-signed", signed(&probe).as_bytes())?;
    write(
        dir,
        "ack1-signed",
        signed(&Message::ack1(&probe)).as_bytes(),
    )?;
    write(
        dir,
        "ack2-signed",
        signed(&Message::ack2(&probe, 1_000, 2_500, false)).as_bytes(),
    )
}

fn endpoint(node: &str, port: u32) -> Endpoint {
    Endpoint {
        id: format!("{node}/udp0"),
        transport: Transport::Udp.into(),
        address: format!("10.0.0.{port}:9500"),
        tor: if port % 2 == 0 { "tor-a" } else { "tor-b" }.into(),
        ..Endpoint::default()
    }
}

fn rdma_endpoint(node: &str) -> Endpoint {
    Endpoint {
        id: format!("{node}/mlx5_0"),
        transport: Transport::Rdma.into(),
        address: "::ffff:10.0.1.2".into(),
        qpn: 1234,
        device: "mlx5_0".into(),
        ..Endpoint::default()
    }
}

fn summary(source: &str, target: &str, back: u64) -> WindowSummary {
    let delay = DelayStats {
        min_ns: 8_000,
        p50_ns: 10_000,
        p99_ns: 30_000,
        max_ns: 50_000,
    };
    WindowSummary {
        window_start_ms: back,
        window_ms: 10_000,
        source_endpoint: source.into(),
        target_endpoint: target.into(),
        kind: TargetKind::TorMesh.into(),
        sent: 100,
        ok: 97,
        lost: 3,
        network_rtt: Some(delay),
        prober_delay: Some(delay),
        responder_delay: Some(delay),
        lost_flows_mask: 0b101,
        probed_flows_mask: 0b111,
        ..WindowSummary::default()
    }
}

fn grpc(dir: &Path) -> std::io::Result<()> {
    let input = |call: Call, flags: u8, message: &dyn Fn() -> Vec<u8>| {
        let mut bytes = vec![selector(call, flags)];
        bytes.extend(message());
        bytes
    };
    let live = FLAG_LIVE_SESSION;
    let recent = FLAG_LIVE_SESSION | FLAG_RECENT_WINDOWS;
    let register = |node: &str, endpoints: Vec<Endpoint>| {
        RegisterRequest {
            node: node.into(),
            agent_version: "0.1.0".into(),
            endpoints,
        }
        .encode_to_vec()
    };
    let seeds: Vec<(&str, Vec<u8>)> = vec![
        (
            "register-udp",
            input(Call::Register, 0, &|| {
                register("node-b", vec![endpoint("node-b", 3)])
            }),
        ),
        (
            "register-rdma",
            input(Call::Register, 0, &|| {
                register("node-c", vec![rdma_endpoint("node-c")])
            }),
        ),
        (
            "watch",
            input(Call::WatchPinglist, live, &|| {
                WatchPinglistRequest {
                    node: SEEDED_NODE.into(),
                    session: 0,
                }
                .encode_to_vec()
            }),
        ),
        (
            "report-windows",
            input(Call::ReportWindows, recent, &|| {
                ReportWindowsRequest {
                    node: SEEDED_NODE.into(),
                    session: 0,
                    windows: vec![
                        summary(&format!("{SEEDED_NODE}/udp0"), "node-b/udp0", 0),
                        summary(&format!("{SEEDED_NODE}/udp0"), "node-c/mlx5_0", 1),
                    ],
                }
                .encode_to_vec()
            }),
        ),
        (
            "exchange-traces",
            input(Call::ExchangeTraces, live, &|| {
                ExchangeTracesRequest {
                    node: SEEDED_NODE.into(),
                    session: 0,
                    results: vec![TraceResult {
                        id: 1,
                        source_address: "10.0.0.1".into(),
                        source_port: 40_000,
                        destination_address: "10.0.0.3".into(),
                        destination_port: 9500,
                        flow_label: 0,
                        hops: vec!["10.1.0.1".into(), "10.2.0.1".into()],
                        ..TraceResult::default()
                    }],
                }
                .encode_to_vec()
            }),
        ),
        (
            "report-service-flows",
            input(Call::ReportServiceFlows, live, &|| {
                ReportServiceFlowsRequest {
                    node: SEEDED_NODE.into(),
                    session: 0,
                    flows: vec![ServiceFlow {
                        kind: ServiceFlowKind::Tcp.into(),
                        local_address: "10.0.0.1".into(),
                        remote_address: "10.0.0.3".into(),
                        local_port: 40_000,
                        remote_port: 443,
                        pod_uid: "0f1e2d3c-0000-4000-8000-000000000001".into(),
                        ..ServiceFlow::default()
                    }],
                    dropped: 0,
                }
                .encode_to_vec()
            }),
        ),
        ("evaluate", input(Call::Evaluate, 0, &Vec::new)),
    ];
    for (name, bytes) in seeds {
        write(dir, name, &bytes)?;
    }
    Ok(())
}

fn mesh_config(dir: &Path) -> Result<(), Box<dyn std::error::Error>> {
    write(
        dir,
        "default",
        serde_yaml::to_string(&MeshConfig::default())?.as_bytes(),
    )?;
    write(dir, "empty", b"{}\n")?;
    write(
        dir,
        "overrides",
        b"registry: sqlite:///tmp/r.db\ndefaultTor: rack-1\nstaleAfterSecs: 60\npinglist:\n  windowMs: 5000\n  probeTimeoutMs: 500\n",
    )?;
    Ok(())
}

fn pingmesh_spec(dir: &Path) -> Result<(), Box<dyn std::error::Error>> {
    let spec = PingMeshSpec::default();
    let mut json = vec![0];
    json.extend(serde_json::to_vec(&spec)?);
    write(dir, "default-json", &json)?;
    let mut yaml = vec![1];
    yaml.extend(serde_yaml::to_string(&spec)?.into_bytes());
    write(dir, "default-yaml", &yaml)?;
    write(dir, "empty-json", b"\x00{}")?;
    write(
        dir,
        "udp-yaml",
        b"\x01transport: udp\nprobing:\n  windowSeconds: 5\n",
    )?;
    Ok(())
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let corpus = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("corpus");
    wire(&corpus.join("wire"))?;
    grpc(&corpus.join("grpc"))?;
    mesh_config(&corpus.join("mesh_config"))?;
    pingmesh_spec(&corpus.join("pingmesh_spec"))?;
    println!("seed corpora written under {}", corpus.display());
    Ok(())
}
