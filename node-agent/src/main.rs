//! `pingmesh-agent`: wiring only.

use clap::Parser;
use pingmesh_agent::agent;
use pingmesh_agent::config::AgentConfig;
use pingmesh_proto::logging::{self, LogArgs};
use tokio_util::sync::CancellationToken;

/// PingMesh node agent: probes the endpoints its pinglist names and reports to the mesh controller.
#[derive(Debug, Parser)]
#[command(name = "pingmesh-agent", version)]
struct Cli {
    #[command(flatten)]
    agent: AgentConfig,
    #[command(flatten)]
    log: LogArgs,
}

// One thread: the agent is I/O-bound and cross-thread wakeups cost more CPU than
// they save; network RTT comes from kernel timestamps, so scheduling delay
// shows up only in the prober-delay figure, where it belongs.
#[tokio::main(flavor = "current_thread")]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    logging::init(&cli.log);
    let cancel = CancellationToken::new();
    let running = agent::start(cli.agent, cancel.clone()).await?;
    tracing::info!(
        transport = running.transport,
        endpoints = ?running.endpoints.current().iter().map(|e| e.id.clone()).collect::<Vec<_>>(),
        http = %running.http_addr,
        "agent started"
    );
    tokio::select! {
        () = pingmesh_proto::signals::shutdown_signal() => tracing::info!("shutting down"),
        // A task the agent cannot run without failed (logged where it failed).
        () = cancel.cancelled() => {}
    }
    cancel.cancel();
    running.wait().await?;
    Ok(())
}
