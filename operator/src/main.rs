//! `pingmesh-operator`: wiring only.

use clap::{Parser, Subcommand};
use pingmesh_operator::config::MeshArgs;
use pingmesh_operator::mesh::server;
use pingmesh_proto::logging::{self, LogArgs};
use tokio_util::sync::CancellationToken;

mod heap;

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
    Standalone(Box<MeshArgs>),
    /// Run in a cluster: reconcile PingMesh resources and host the mesh controller.
    #[cfg(feature = "kubernetes")]
    Run(Box<pingmesh_operator::reconcile::run::RunArgs>),
    /// Print the PingMesh CRD (custom resource definition) as YAML, or write it with `--write DIR`.
    #[cfg(feature = "kubernetes")]
    Crd {
        /// Directory to write `pingmesh.io_pingmeshes.yaml` into (also refreshes the
        /// Helm chart's copy when `DIR/../charts/pingmesh/files/crds` exists).
        #[arg(long, value_name = "DIR")]
        write: Option<std::path::PathBuf>,
    },
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    logging::init(&cli.log);
    match cli.command {
        Command::Standalone(args) => {
            let config = args.resolve()?;
            heap::spawn_trimmer();
            let cancel = CancellationToken::new();
            let running = server::start(config, cancel.clone()).await?;
            pingmesh_proto::signals::shutdown_signal().await;
            tracing::info!("shutting down");
            cancel.cancel();
            running.wait().await?;
        }
        #[cfg(feature = "kubernetes")]
        Command::Run(args) => {
            heap::spawn_trimmer();
            pingmesh_operator::reconcile::run::run(*args).await?;
        }
        #[cfg(feature = "kubernetes")]
        Command::Crd { write: None } => {
            use std::io::Write as _;
            std::io::stdout().write_all(pingmesh_operator::crd::crd_yaml()?.as_bytes())?;
        }
        #[cfg(feature = "kubernetes")]
        Command::Crd { write: Some(dir) } => {
            for path in pingmesh_operator::crd::write_crd(&dir)? {
                tracing::info!(path = %path.display(), "wrote CRD");
            }
        }
    }
    Ok(())
}
