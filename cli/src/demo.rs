//! `pingmesh demo`: a whole mesh on this machine — a mesh controller on a
//! temporary SQLite registry and N agents on loopback UDP, in one process.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::time::Duration;

use anyhow::Context;
use pingmesh_agent::agent::{self, RunningAgent};
use pingmesh_agent::config::AgentConfig;
use pingmesh_operator::config::MeshConfig;
use pingmesh_operator::mesh::http::summarize;
use pingmesh_operator::mesh::server;
use tokio_util::sync::CancellationToken;

use crate::inject::{DemoFabric, Injection};
use crate::table;

#[derive(Debug, clap::Args)]
pub struct DemoArgs {
    /// Agents to start.
    #[arg(long, default_value_t = 6, value_parser = clap::value_parser!(u16).range(2..=200))]
    pub agents: u16,
    /// ToRs to spread the agents over (round robin).
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u16).range(1..=100))]
    pub tors: u16,
    /// Stop by itself after this many seconds (default: run until Ctrl-C).
    #[arg(long, value_parser = parse_seconds)]
    pub duration: Option<Duration>,
    /// Print the final mesh summary as JSON on stdout (the live table goes to stderr).
    #[arg(long)]
    pub json: bool,
    /// Aggregation window in milliseconds.
    #[arg(long, default_value_t = 5_000)]
    pub window_ms: u32,
    /// Probes per second from each agent to each other agent under its ToR.
    #[arg(long, default_value_t = 10.0)]
    pub tor_mesh_rate: f64,
    /// Address of the controller's HTTP API and /metrics (port 0: any free port).
    #[arg(long, default_value = "127.0.0.1:9401")]
    pub http_addr: SocketAddr,
    /// Emulate a fault, for example `host:node-3` (black hole),
    /// `loss:node-2:30%` or `tor:tor-2:20%`, optionally timed as
    /// `@START[-END]` in seconds since the start (`loss:node-2:30%@20s-60s`).
    /// Repeatable. No root needed: the agents drop the packets themselves.
    #[arg(long, value_name = "SPEC")]
    pub inject: Vec<Injection>,
}

/// Accepts "30", "30s", "2m".
pub fn parse_seconds(s: &str) -> Result<Duration, String> {
    let (digits, unit) = match s.strip_suffix('m') {
        Some(d) => (d, 60),
        None => (s.strip_suffix('s').unwrap_or(s), 1),
    };
    let n: u64 = digits
        .parse()
        .map_err(|_| format!("{s:?} is not a duration like 30, 30s or 2m"))?;
    Ok(Duration::from_secs(n * unit))
}

pub async fn run(args: DemoArgs) -> anyhow::Result<()> {
    let dir = tempfile::tempdir().context("creating a temporary directory for the registry")?;
    let loopback = IpAddr::V4(Ipv4Addr::LOCALHOST);
    let mut config = MeshConfig {
        grpc_addr: SocketAddr::new(loopback, 0),
        http_addr: args.http_addr,
        registry: format!("sqlite://{}", dir.path().join("registry.db").display()),
        ..MeshConfig::default()
    };
    config.pinglist.window_ms = args.window_ms;
    config.pinglist.tor_mesh_rate_pps = args.tor_mesh_rate;
    // Small demo mesh: probe every other ToR and every endpoint in it.
    config.pinglist.inter_tor_sample_tors = usize::from(args.tors);
    config.pinglist.inter_tor_targets_per_tor = usize::from(args.agents);
    config.validate()?;

    let cancel = CancellationToken::new();
    let controller = match server::start(config.clone(), cancel.clone()).await {
        Ok(c) => c,
        Err(server::ServeError::Bind { what: "HTTP", .. }) if args.http_addr.port() != 0 => {
            eprintln!(
                "{} is taken; serving the API on a free port instead",
                args.http_addr
            );
            config.http_addr = SocketAddr::new(args.http_addr.ip(), 0);
            server::start(config, cancel.clone()).await?
        }
        Err(e) => return Err(e.into()),
    };
    let grpc_url = format!("http://{}", controller.grpc_addr);
    let agents = start_agents(&args, &grpc_url, &cancel).await?;
    eprintln!(
        "PingMesh demo: {} agents over {} ToRs, window {} ms",
        args.agents, args.tors, args.window_ms
    );
    eprintln!("  web view     http://{}/", controller.http_addr);
    eprintln!(
        "  mesh API     http://{}/api/v1/summary",
        controller.http_addr
    );
    eprintln!("  controller   http://{}/metrics", controller.http_addr);
    for a in &agents {
        eprintln!(
            "  {:<12} udp {}  metrics http://{}/metrics",
            a.node,
            a.udp_addr.map_or_else(|| "-".to_owned(), |u| u.to_string()),
            a.http_addr
        );
    }
    for f in &args.inject {
        eprintln!(
            "  injecting    {} dropping {:.0}% of its packets from {}s{}",
            f.target,
            f.loss * 100.0,
            f.start.as_secs(),
            f.end
                .map(|e| format!(" to {}s", e.as_secs()))
                .unwrap_or_default()
        );
    }
    eprintln!("Ctrl-C stops it.\n");

    let deadline = args.duration.map(|d| tokio::time::Instant::now() + d);
    let mut last_printed = None;
    let mut tick = tokio::time::interval(Duration::from_millis(250));
    loop {
        tokio::select! {
            () = pingmesh_proto::signals::shutdown_signal() => break,
            () = sleep_until(deadline) => break,
            _ = tick.tick() => {}
        }
        let summary = summarize(&controller.controller).await?;
        if summary.window_start_ms.is_some() && summary.window_start_ms != last_printed {
            last_printed = summary.window_start_ms;
            eprintln!("{}", table::render(&summary));
        }
    }
    let summary = summarize(&controller.controller).await?;
    cancel.cancel();
    for a in agents {
        a.wait().await?;
    }
    controller.wait().await?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&summary)?);
    }
    Ok(())
}

/// Starts the agents, round robin over the ToRs, each emulating the
/// `--inject` faults.
async fn start_agents(
    args: &DemoArgs,
    grpc_url: &str,
    cancel: &CancellationToken,
) -> anyhow::Result<Vec<RunningAgent>> {
    let loopback = IpAddr::V4(Ipv4Addr::LOCALHOST);
    let placement: Vec<(String, String)> = (0..args.agents)
        .map(|i| {
            (
                format!("node-{}", i + 1),
                format!("tor-{}", i % args.tors + 1),
            )
        })
        .collect();
    let fabric = DemoFabric::new(placement.iter().cloned().collect(), args.inject.clone());
    let unknown = fabric.unknown_targets();
    if !unknown.is_empty() {
        anyhow::bail!(
            "--inject names {} that this demo does not have (nodes node-1..node-{}, ToRs tor-1..tor-{})",
            unknown.join(", "),
            args.agents,
            args.tors
        );
    }
    let mut agents = Vec::new();
    for (node, tor) in &placement {
        let mut config = AgentConfig::local(node, tor, grpc_url, loopback);
        if !args.inject.is_empty() {
            config.emulated_fabric = Some(fabric.clone());
        }
        agents.push(agent::start(config, cancel.clone()).await?);
    }
    Ok(agents)
}

async fn sleep_until(deadline: Option<tokio::time::Instant>) {
    match deadline {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_accept_plain_seconds_and_units() {
        assert_eq!(parse_seconds("30").unwrap(), Duration::from_secs(30));
        assert_eq!(parse_seconds("30s").unwrap(), Duration::from_secs(30));
        assert_eq!(parse_seconds("2m").unwrap(), Duration::from_mins(2));
        assert!(parse_seconds("soon").is_err());
    }
}
