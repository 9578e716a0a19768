//! `pingmesh`: the user-facing command. Wiring only.

mod demo;
mod inject;
mod status;
mod table;

use clap::{Parser, Subcommand};
use pingmesh_proto::logging::{self, LogArgs};

/// PingMesh: RDMA and UDP network monitoring for Kubernetes.
#[derive(Debug, Parser)]
#[command(name = "pingmesh", version)]
struct Cli {
    #[command(subcommand)]
    command: Command,
    #[command(flatten)]
    log: LogArgs,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run a whole mesh on this machine: a controller and N agents on loopback UDP.
    Demo(demo::DemoArgs),
    /// Print the root causes, ToR-pair table and open findings of a running mesh controller.
    Status(status::StatusArgs),
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let mut log = cli.log;
    if matches!(cli.command, Command::Demo(_)) && log.log_level == "info" {
        // The demo's table is the output; keep routine agent logs out of its way.
        log.log_level = "warn".into();
    }
    logging::init(&log);
    match cli.command {
        Command::Demo(args) => demo::run(args).await,
        Command::Status(args) => status::run(args).await,
    }
}
