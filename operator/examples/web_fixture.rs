//! A real mesh controller (registry, pinglists, analyzer, localization, HTTP
//! API and web view) fed by synthetic agents: each window, every synthetic
//! node reports a summary for every target of the pinglist the controller gave
//! it. Only the probing is synthetic, so a mesh of any size can be shown in a
//! browser on one machine: the web view's aggregation test and its page-weight
//! and first-render measurement (`hack/web-bench.sh`) use it.
//!
//! ```sh
//! cargo run -p pingmesh-operator --example web_fixture -- --tors 32 --nodes-per-tor 2
//! ```
//!
//! Prints `web view http://ADDR/` once serving and `window START` for each
//! window it reported. `--lossy-tor` and `--slow-tor` make every path from or to
//! that ToR lose half its probes or take 1 ms. `--service-flows` has every node
//! report one TCP connection to the next node (a ring over the ToRs) for one of
//! three processes, so root causes hit services.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::time::Duration;

use anyhow::Context;
use clap::Parser;
use pingmesh_operator::config::MeshConfig;
use pingmesh_operator::mesh::server;
use pingmesh_proto::ladder;
use pingmesh_proto::v1::{self, Transport};
use pingmesh_proto::window::{unix_now_ms, window_start};
use tokio_util::sync::CancellationToken;

#[derive(Debug, Parser)]
struct Args {
    /// ToRs, named tor-001, tor-002, ...
    #[arg(long, default_value_t = 32)]
    tors: u32,
    /// Nodes (one endpoint each) under every ToR.
    #[arg(long, default_value_t = 2)]
    nodes_per_tor: u32,
    /// Other ToRs each node probes every window (default: all, a full ToR-pair matrix).
    #[arg(long)]
    sample_tors: Option<usize>,
    #[arg(long, default_value_t = 2_000)]
    window_ms: u32,
    #[arg(long, default_value = "127.0.0.1:0")]
    http_addr: SocketAddr,
    /// Paths from or to this ToR lose half their probes.
    #[arg(long)]
    lossy_tor: Option<String>,
    /// Paths from or to this ToR take 1 ms (p99 network RTT above the SLA).
    #[arg(long)]
    slow_tor: Option<String>,
    /// Stop after this many seconds (default: run until killed).
    #[arg(long)]
    duration_secs: Option<u64>,
    /// Report service flows (TCP, outside pods) along a ring of the nodes.
    #[arg(long)]
    service_flows: bool,
}

/// The processes the ring's connections belong to, by the source's ToR.
const SERVICES: [&str; 3] = ["allreduce", "parameter-server", "checkpoint"];

/// Node `n` of ToR `t`'s own loopback address: flows map to endpoints by IP.
fn node_ip(t: u32, n: u32) -> String {
    format!("127.{}.{}.{}", n + 1, t >> 8, t & 0xff)
}

/// One TCP connection from each node to the next one, round the ring.
fn ring_flow(nodes: &[(String, u64, String, u32)], i: usize) -> v1::ServiceFlow {
    let (_, _, ip, t) = &nodes[i];
    let (_, _, next_ip, _) = &nodes[(i + 1) % nodes.len()];
    v1::ServiceFlow {
        kind: v1::ServiceFlowKind::Tcp as i32,
        local_address: ip.clone(),
        remote_address: next_ip.clone(),
        local_port: 40_000,
        remote_port: 29_500,
        pid: 4_242,
        command: SERVICES[*t as usize % SERVICES.len()].to_owned(),
        ..Default::default()
    }
}

const PROBES: u64 = 20;

fn tor_name(i: u32) -> String {
    format!("tor-{:03}", i + 1)
}

/// A summary of `PROBES` probes from `target.source_endpoint` to its target.
fn summary(
    target: &v1::PingTarget,
    window_start_ms: u64,
    window_ms: u32,
    lossy: bool,
    slow: bool,
) -> v1::WindowSummary {
    let lost = if lossy { PROBES / 2 } else { 0 };
    let ok = PROBES - lost;
    let base = if slow { 1_000_000 } else { 4_000 };
    let mut histogram = ladder::Histogram::default();
    for k in 0..ok {
        histogram.record(base + k * 50);
    }
    let (buckets, counts) = histogram.to_sparse();
    v1::WindowSummary {
        window_start_ms,
        window_ms,
        source_endpoint: target.source_endpoint.clone(),
        target_endpoint: target
            .target
            .as_ref()
            .map(|t| t.id.clone())
            .unwrap_or_default(),
        kind: target.kind,
        sent: PROBES,
        ok,
        lost,
        network_rtt: (ok > 0).then(|| v1::DelayStats {
            min_ns: base,
            p50_ns: base + ok / 2 * 50,
            p99_ns: base + (ok - 1) * 50,
            max_ns: base + (ok - 1) * 50,
        }),
        network_rtt_histogram: Some(v1::LadderHistogram { buckets, counts }),
        ..Default::default()
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    anyhow::ensure!(
        args.tors >= 1 && args.nodes_per_tor >= 1,
        "--tors and --nodes-per-tor must be at least 1"
    );
    let dir = tempfile::tempdir().context("temporary directory for the registry")?;
    let mut config = MeshConfig {
        grpc_addr: "127.0.0.1:0".parse()?,
        http_addr: args.http_addr,
        registry: format!("sqlite://{}", dir.path().join("registry.db").display()),
        ..MeshConfig::default()
    };
    config.pinglist.window_ms = args.window_ms;
    config.pinglist.inter_tor_sample_tors = args
        .sample_tors
        .unwrap_or(usize::try_from(args.tors)?.saturating_sub(1));
    config.pinglist.inter_tor_targets_per_tor = 1;
    config.validate()?;
    let cancel = CancellationToken::new();
    let running = server::start(config, cancel.clone()).await?;
    let controller = running.controller.clone();

    let mut tor_of = HashMap::new();
    let mut nodes = Vec::new();
    for t in 0..args.tors {
        for n in 0..args.nodes_per_tor {
            let node = format!("node-{:03}-{}", t + 1, n + 1);
            let id = format!("{node}/udp0");
            let ip = node_ip(t, n);
            let endpoint = v1::Endpoint {
                id: id.clone(),
                transport: Transport::Udp as i32,
                address: format!("{ip}:9999"),
                tor: tor_name(t),
                ..Default::default()
            };
            let (session, _) = controller
                .register(&node, "web-fixture", &[endpoint])
                .await?;
            tor_of.insert(id, tor_name(t));
            nodes.push((node, session, ip, t));
        }
    }
    let _presence: Vec<_> = nodes
        .iter()
        .map(|(node, session, _, _)| controller.connect(node, *session))
        .collect();
    println!("web view http://{}/", running.http_addr);

    let window = u64::from(args.window_ms);
    // The first window every node was present for all of.
    let mut next = window_start(unix_now_ms(), args.window_ms) + window;
    let deadline = args
        .duration_secs
        .map(|s| tokio::time::Instant::now() + Duration::from_secs(s));
    loop {
        // Report a window just after it ends, as agents do.
        let due = (next + window + 100).saturating_sub(unix_now_ms());
        tokio::time::sleep(Duration::from_millis(due)).await;
        if deadline.is_some_and(|d| tokio::time::Instant::now() >= d) {
            break;
        }
        let began = std::time::Instant::now();
        let snapshot = controller.subscribe().borrow().clone();
        let hit = |tor: Option<&String>, id: &str| tor.is_some_and(|t| tor_of.get(id) == Some(t));
        for (i, (node, session, _, _)) in nodes.iter().enumerate() {
            if args.service_flows {
                controller.report_service_flows(node, *session, &[ring_flow(&nodes, i)], 0)?;
            }
            let list = controller.pinglist(node, &snapshot);
            let summaries: Vec<v1::WindowSummary> = list
                .targets
                .iter()
                .map(|target| {
                    let to = target.target.as_ref().map_or("", |t| t.id.as_str());
                    let from = target.source_endpoint.as_str();
                    let lossy =
                        hit(args.lossy_tor.as_ref(), from) || hit(args.lossy_tor.as_ref(), to);
                    let slow = hit(args.slow_tor.as_ref(), from) || hit(args.slow_tor.as_ref(), to);
                    summary(target, next, args.window_ms, lossy, slow)
                })
                .collect();
            for chunk in summaries.chunks(pingmesh_proto::limits::MAX_SUMMARIES_PER_REPORT) {
                controller.report(node, chunk.to_vec())?;
            }
        }
        println!(
            "window {next} reported in {} ms",
            began.elapsed().as_millis()
        );
        next += window;
    }
    cancel.cancel();
    running.wait().await?;
    Ok(())
}
