//! `pingmesh status`: the ToR-pair table from a running mesh controller.

use std::path::{Path, PathBuf};

use anyhow::Context;
use pingmesh_operator::mesh::http::MeshSummary;

use crate::table;

/// Where a pod finds its own service account token.
const IN_CLUSTER_TOKEN: &str = "/var/run/secrets/kubernetes.io/serviceaccount/token";

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
    /// A file holding the bearer token for the JSON API (in a cluster it
    /// needs `get` on `PingMeshes`, docs/security.md). Without it: the token in
    /// `PINGMESH_TOKEN`, else this pod's service account token when there is
    /// one, else none.
    #[arg(long, value_name = "PATH")]
    pub token_file: Option<PathBuf>,
}

/// Where the token comes from, first found wins: `--token-file`, then
/// `PINGMESH_TOKEN`, then the in-cluster service account token if that
/// file exists. An empty or unreadable file named on purpose is an error;
/// the in-cluster default is only used when it reads.
fn bearer_token(
    token_file: Option<&Path>,
    env_token: Option<String>,
    in_cluster: &Path,
) -> anyhow::Result<Option<String>> {
    if let Some(path) = token_file {
        let token = std::fs::read_to_string(path)
            .with_context(|| format!("reading token file {}", path.display()))?;
        let token = token.trim();
        anyhow::ensure!(!token.is_empty(), "token file {} is empty", path.display());
        return Ok(Some(token.to_owned()));
    }
    if let Some(token) = env_token.map(|t| t.trim().to_owned())
        && !token.is_empty()
    {
        return Ok(Some(token));
    }
    Ok(std::fs::read_to_string(in_cluster)
        .ok()
        .map(|t| t.trim().to_owned())
        .filter(|t| !t.is_empty()))
}

pub async fn run(args: StatusArgs) -> anyhow::Result<()> {
    let url = format!("{}/api/v1/summary", args.controller.trim_end_matches('/'));
    let token = bearer_token(
        args.token_file.as_deref(),
        std::env::var("PINGMESH_TOKEN").ok(),
        Path::new(IN_CLUSTER_TOKEN),
    )?;
    let mut request = reqwest::Client::new().get(&url);
    if let Some(token) = &token {
        request = request.bearer_auth(token);
    }
    let response = request
        .send()
        .await
        .with_context(|| format!("reaching {url}"))?;
    let status = response.status();
    if !status.is_success() {
        let body = response.text().await.unwrap_or_default();
        let hint = match (status.as_u16(), token.is_some()) {
            (401, false) => {
                "\nthe API needs a token: --token-file PATH or PINGMESH_TOKEN (docs/security.md)"
            }
            (401, true) => "\nthe token was not accepted (expired, or not for this cluster)",
            (403, _) => "\nthe token's user may not get PingMeshes in the mesh's namespace",
            _ => "",
        };
        anyhow::bail!("{url} answered {status}: {body}{hint}");
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

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    #[test]
    fn the_token_file_wins_then_the_environment_then_the_pods_own_token() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("token");
        std::fs::write(&file, "from-file\n").unwrap();
        let pod = dir.path().join("pod-token");
        std::fs::write(&pod, "from-pod").unwrap();
        let env = || Some("from-env".to_owned());
        assert_eq!(
            bearer_token(Some(&file), env(), &pod).unwrap().as_deref(),
            Some("from-file")
        );
        assert_eq!(
            bearer_token(None, env(), &pod).unwrap().as_deref(),
            Some("from-env")
        );
        assert_eq!(
            bearer_token(None, Some("  ".into()), &pod)
                .unwrap()
                .as_deref(),
            Some("from-pod")
        );
        let nowhere = dir.path().join("absent");
        assert_eq!(bearer_token(None, None, &nowhere).unwrap(), None);
    }

    #[test]
    fn a_token_file_asked_for_must_exist_and_hold_a_token() {
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("missing");
        let err = bearer_token(Some(&missing), None, &missing).unwrap_err();
        assert!(format!("{err:#}").contains("reading token file"), "{err:#}");
        let empty = dir.path().join("empty");
        std::fs::write(&empty, "\n").unwrap();
        let err = bearer_token(Some(&empty), None, &missing).unwrap_err();
        assert!(err.to_string().contains("is empty"), "{err}");
    }

    /// A one-request HTTP server on loopback answering `status` with `body`;
    /// yields the request's head.
    async fn answer_once(
        status: &'static str,
        body: &'static str,
    ) -> (String, tokio::task::JoinHandle<String>) {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let served = tokio::spawn(async move {
            let (mut conn, _) = listener.accept().await.unwrap();
            let mut head = Vec::new();
            let mut buf = [0u8; 1024];
            while !head.windows(4).any(|w| w == b"\r\n\r\n") {
                let n = conn.read(&mut buf).await.unwrap();
                assert!(n > 0, "request cut short");
                head.extend_from_slice(&buf[..n]);
            }
            let reply = format!(
                "HTTP/1.1 {status}\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                body.len()
            );
            conn.write_all(reply.as_bytes()).await.unwrap();
            String::from_utf8_lossy(&head).to_lowercase()
        });
        (url, served)
    }

    #[tokio::test]
    async fn the_token_goes_out_as_a_bearer_and_a_refusal_says_what_to_check() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("token");
        std::fs::write(&file, "s3cret\n").unwrap();
        let (url, served) = answer_once("403 Forbidden", r#"{"error":"may not get"}"#).await;
        let err = run(StatusArgs {
            controller: url,
            json: false,
            token_file: Some(file),
        })
        .await
        .unwrap_err()
        .to_string();
        let head = served.await.unwrap();
        assert!(head.contains("authorization: bearer s3cret\r\n"), "{head}");
        assert!(
            err.contains("403") && err.contains("may not get PingMeshes"),
            "{err}"
        );
    }
}
