//! `pingmesh-fleet-sim`: a fleet of simulated agents against a real mesh
//! controller over the real gRPC API, measured. See docs/scale.md.
//!
//! ```sh
//! cargo build --release -p pingmesh-operator -p pingmesh-fleet-sim
//! target/release/pingmesh-fleet-sim --endpoints 10000
//! # CI smoke run: 50 nodes, 3 windows of 1 s, fails on any problem
//! target/debug/pingmesh-fleet-sim --endpoints 400 --window-ms 1000 --windows 3 --check
//! ```

mod agent;
mod controller;
mod fleet;
mod report;
mod run;
mod synth;

use std::net::SocketAddr;
use std::path::PathBuf;

use clap::{Parser, ValueEnum};
use pingmesh_proto::v1::Transport;

use crate::fleet::{Faults, FleetShape};

#[derive(Debug, Clone, Copy, ValueEnum)]
enum TransportArg {
    Rdma,
    Udp,
}

/// Simulated agents against a real mesh controller; prints a table of what it measured.
#[derive(Debug, Parser)]
#[command(name = "pingmesh-fleet-sim", version)]
#[allow(clippy::struct_excessive_bools)] // independent switches
struct Args {
    /// Endpoints in the fleet (rounded up to whole nodes).
    #[arg(long, env = "FLEET_SIM_ENDPOINTS", default_value_t = 1_000)]
    endpoints: usize,
    /// Endpoints (RNICs) per node; endpoint i of every node hangs off its rack's rail-i ToR.
    #[arg(long, env = "FLEET_SIM_ENDPOINTS_PER_NODE", default_value_t = 8)]
    endpoints_per_node: usize,
    /// Nodes per rack: the size of each ToR's mesh.
    #[arg(long, env = "FLEET_SIM_NODES_PER_RACK", default_value_t = 32)]
    nodes_per_rack: usize,
    #[arg(long, env = "FLEET_SIM_TRANSPORT", value_enum, default_value_t = TransportArg::Rdma)]
    transport: TransportArg,
    /// Window length the controller is started with (its default is 5000).
    #[arg(long, env = "FLEET_SIM_WINDOW_MS", default_value_t = 5_000)]
    window_ms: u32,
    /// Steady-state windows measured.
    #[arg(long, env = "FLEET_SIM_WINDOWS", default_value_t = 3)]
    windows: u32,
    /// The `pingmesh-operator` binary (default: next to this one).
    #[arg(long, env = "FLEET_SIM_CONTROLLER_BIN")]
    controller_bin: Option<PathBuf>,
    /// Use a controller that is already running (its gRPC address) instead of
    /// starting one; CPU, memory and the restart are then not measured.
    #[arg(long, env = "FLEET_SIM_CONTROLLER", requires = "controller_http")]
    controller: Option<SocketAddr>,
    /// HTTP address (/metrics) of the controller given with --controller.
    #[arg(long, env = "FLEET_SIM_CONTROLLER_HTTP")]
    controller_http: Option<SocketAddr>,
    /// Endpoints that lose --endpoint-loss of their probes.
    #[arg(long, default_value_t = 2)]
    faulty_endpoints: usize,
    #[arg(long, default_value_t = 0.5)]
    endpoint_loss: f64,
    /// ToRs that lose --tor-loss of the probes through them.
    #[arg(long, default_value_t = 1)]
    faulty_tors: usize,
    #[arg(long, default_value_t = 0.3)]
    tor_loss: f64,
    /// ToR-to-spine links that black-hole the flows hashed onto them.
    #[arg(long, default_value_t = 1)]
    faulty_links: usize,
    /// Spine switches (a flow's spine is its flow index modulo this).
    #[arg(long, default_value_t = 4)]
    spines: u32,
    /// Simulated agents sharing one HTTP/2 connection (1: one each, as real agents).
    #[arg(long, env = "FLEET_SIM_AGENTS_PER_CONNECTION", default_value_t = 1)]
    agents_per_connection: usize,
    /// Longest wait for the fleet to connect (at start and after the restart).
    #[arg(long, default_value_t = 900)]
    settle_limit_secs: u64,
    /// Skip the membership-change measurement.
    #[arg(long)]
    skip_membership: bool,
    /// Skip the controller restart.
    #[arg(long)]
    skip_restart: bool,
    /// Inter-ToR sampled ToRs per source ToR, as configured on the controller
    /// (its default, 5): sizes the series budget.
    #[arg(long, default_value_t = 5)]
    inter_tor_sample_tors: usize,
    /// Controller series that do not grow with the fleet, as docs/metrics.md budgets them.
    #[arg(long, default_value_t = report::FIXED_SERIES_BUDGET)]
    fixed_series_budget: usize,
    /// Fail (exit 1) when the controller logs an error or exits, a window is not
    /// judged with data, summaries are rejected, or the series budget is exceeded.
    #[arg(long)]
    check: bool,
    /// Also print one CSV line (header first) for collecting runs.
    #[arg(long)]
    csv: bool,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    anyhow::ensure!(
        args.endpoints >= 1 && args.endpoints_per_node >= 1 && args.nodes_per_rack >= 1,
        "--endpoints, --endpoints-per-node and --nodes-per-rack must be at least 1"
    );
    anyhow::ensure!(args.windows >= 1, "--windows must be at least 1");
    let shape = FleetShape {
        nodes: args.endpoints.div_ceil(args.endpoints_per_node),
        endpoints_per_node: args.endpoints_per_node,
        nodes_per_rack: args.nodes_per_rack,
        transport: match args.transport {
            TransportArg::Rdma => Transport::Rdma,
            TransportArg::Udp => Transport::Udp,
        },
        spines: args.spines.max(1),
        faults: Faults {
            endpoints: args.faulty_endpoints,
            endpoint_loss: args.endpoint_loss.clamp(0.0, 1.0),
            tors: args.faulty_tors,
            tor_loss: args.tor_loss.clamp(0.0, 1.0),
            links: args.faulty_links,
        },
    };
    let target = match (args.controller, args.controller_http) {
        (Some(grpc), Some(http)) => run::Target::Existing { grpc, http },
        _ => run::Target::Child {
            binary: args
                .controller_bin
                .clone()
                .or_else(controller::default_binary)
                .ok_or_else(|| {
                    anyhow::anyhow!(
                        "pingmesh-operator not found next to this binary; build it \
                         (cargo build -p pingmesh-operator) or pass --controller-bin"
                    )
                })?,
        },
    };
    let options = run::Options {
        window_ms: args.window_ms,
        windows: args.windows,
        agents_per_connection: args.agents_per_connection.max(1),
        settle_limit: std::time::Duration::from_secs(args.settle_limit_secs),
        membership: !args.skip_membership,
        restart: !args.skip_restart,
    };
    let outcome = run::run(shape.clone(), target, &options).await?;
    let budget = report::Budget {
        sample_tors: args.inter_tor_sample_tors,
        fixed: args.fixed_series_budget,
    };
    let table = report::table(&shape, &options, &outcome, &budget);
    println!("{table}");
    if args.csv {
        println!("{}", report::csv(&shape, &outcome, &budget));
    }
    let problems = report::problems(&shape, &options, &outcome, &budget);
    for p in &problems {
        eprintln!("problem: {p}");
    }
    if args.check && !problems.is_empty() {
        std::process::exit(1);
    }
    Ok(())
}
