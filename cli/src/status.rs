//! `pingmesh status`: the ToR-pair table from a running mesh controller.

use anyhow::Context;
use pingmesh_operator::mesh::http::MeshSummary;

use crate::table;

#[derive(Debug, clap::Args)]
pub struct StatusArgs {
    /// The mesh controller's HTTP API.
    #[arg(
        long,
        env = "PINGMESH_CONTROLLER_HTTP",
        default_value = "http://127.0.0.1:9401"
    )]
    pub controller: String,
    /// Print the summary as JSON instead of a table.
    #[arg(long)]
    pub json: bool,
}

pub async fn run(args: StatusArgs) -> anyhow::Result<()> {
    let url = format!("{}/api/v1/summary", args.controller.trim_end_matches('/'));
    let response = reqwest::get(&url)
        .await
        .with_context(|| format!("reaching {url}"))?;
    let status = response.status();
    if !status.is_success() {
        let body = response.text().await.unwrap_or_default();
        anyhow::bail!("{url} answered {status}: {body}");
    }
    let summary: MeshSummary = response
        .json()
        .await
        .with_context(|| format!("decoding {url}"))?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&summary)?);
    } else {
        print!("{}", table::render(&summary));
    }
    Ok(())
}
