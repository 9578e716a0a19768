//! `pingmesh-operator`: wiring only.

use clap::{Parser, Subcommand};
use pingmesh_operator::config::MeshArgs;
use pingmesh_operator::mesh::server;
use pingmesh_proto::logging::{self, LogArgs};
use tokio_util::sync::CancellationToken;

/// PingMesh operator.
#[derive(Debug, Parser)]
#[command(name = "pingmesh-operator", version)]
struct Cli {
    #[command(subcommand)]
    command: Command,
    #[command(flatten)]
    log: LogArgs,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the mesh controller on its own, without Kubernetes (systemd, a shell, the demo).
    Standalone(MeshArgs),
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    logging::init(&cli.log);
    match cli.command {
        Command::Standalone(args) => {
            let config = args.resolve()?;
            let cancel = CancellationToken::new();
            let running = server::start(config, cancel.clone()).await?;
            pingmesh_proto::signals::shutdown_signal().await;
            tracing::info!("shutting down");
            cancel.cancel();
            running.wait().await?;
        }
    }
    Ok(())
}
