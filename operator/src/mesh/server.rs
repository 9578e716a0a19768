//! Runs the mesh controller: opens the registry, binds gRPC and HTTP, and
//! serves until cancelled.

use std::net::SocketAddr;
use std::sync::Arc;

use tokio::net::TcpListener;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tonic::transport::server::TcpIncoming;

use super::controller::{MeshController, MeshError};
use super::identity::{AgentAuthenticator, ClientCertificates, Unverified};
use super::registry::{RegistryError, open_registry};
use super::tls::{ReloadingServerConfig, TlsError};
use super::topology::TorResolver;
use super::{grpc, http, tls};
use crate::config::MeshConfig;

#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error(transparent)]
    Registry(#[from] RegistryError),
    #[error(transparent)]
    Mesh(#[from] MeshError),
    #[error("binding {what} on {addr}: {source}")]
    Bind {
        what: &'static str,
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("gRPC server: {0}")]
    Grpc(#[from] tonic::transport::Error),
    #[error("gRPC TLS: {0}")]
    Tls(#[from] TlsError),
    #[error("HTTP server: {0}")]
    Http(std::io::Error),
}

/// A started mesh controller.
#[derive(Debug)]
pub struct RunningController {
    pub controller: Arc<MeshController>,
    pub grpc_addr: SocketAddr,
    pub http_addr: SocketAddr,
    tasks: JoinSet<Result<(), ServeError>>,
}

impl RunningController {
    pub async fn wait(mut self) -> Result<(), ServeError> {
        let mut first = Ok(());
        while let Some(joined) = self.tasks.join_next().await {
            if let Ok(Err(e)) = joined
                && first.is_ok()
            {
                first = Err(e);
            }
        }
        first
    }
}

async fn bind(
    what: &'static str,
    addr: SocketAddr,
) -> Result<(TcpListener, SocketAddr), ServeError> {
    let listener = TcpListener::bind(addr)
        .await
        .map_err(|source| ServeError::Bind { what, addr, source })?;
    let local = listener
        .local_addr()
        .map_err(|source| ServeError::Bind { what, addr, source })?;
    Ok((listener, local))
}

/// Starts everything; ports 0 in the config pick free ports (see the returned addresses).
pub async fn start(
    config: MeshConfig,
    cancel: CancellationToken,
) -> Result<RunningController, ServeError> {
    start_with(config, cancel, None).await
}

/// Like [`start`], with ToRs of endpoints whose agent names none taken from
/// `tor_resolver` (the operator's Node labels).
pub async fn start_with(
    config: MeshConfig,
    cancel: CancellationToken,
    tor_resolver: Option<Arc<dyn TorResolver>>,
) -> Result<RunningController, ServeError> {
    start_with_auth(config, cancel, tor_resolver, None).await
}

/// Like [`start_with`], with agents authenticated by `auth` (the operator's
/// `TokenReview` check). `None`: by their client certificates when the config
/// names a client CA, else not at all (plain text on loopback, or explicitly).
pub async fn start_with_auth(
    config: MeshConfig,
    cancel: CancellationToken,
    tor_resolver: Option<Arc<dyn TorResolver>>,
    auth: Option<Arc<dyn AgentAuthenticator>>,
) -> Result<RunningController, ServeError> {
    // TLS files first: a controller with broken certificates must not start
    // (and must not open a registry it cannot serve).
    let tls = config
        .grpc_tls
        .clone()
        .map(ReloadingServerConfig::load)
        .transpose()?
        .map(Arc::new);
    let auth = auth.unwrap_or_else(|| default_authenticator(tls.as_deref()));
    let registry = open_registry(&config.registry).await?;
    let (grpc_listener, grpc_addr) = bind("gRPC", config.grpc_addr).await?;
    let config_tls = tls.is_some();
    let (http_listener, http_addr) = bind("HTTP", config.http_addr).await?;
    let controller = MeshController::with_tor_resolver(config, registry, tor_resolver).await?;
    let mut tasks = JoinSet::new();

    tasks.spawn({
        let (c, cancel) = (controller.clone(), cancel.clone());
        async move {
            c.clone().run_background(cancel).await;
            // Open pinglist streams would hold the gRPC server's graceful shutdown forever.
            c.shutdown();
            Ok(())
        }
    });
    tasks.spawn({
        let (c, cancel) = (controller.clone(), cancel.clone());
        async move {
            let router = tonic::transport::Server::builder()
                .http2_keepalive_interval(Some(std::time::Duration::from_secs(10)))
                .http2_keepalive_timeout(Some(std::time::Duration::from_secs(5)))
                .add_service(grpc::server(c, auth));
            if let Some(tls) = tls {
                router
                    .serve_with_incoming_shutdown(
                        tls::incoming(grpc_listener, tls),
                        cancel.cancelled_owned(),
                    )
                    .await?;
            } else {
                // TCP_NODELAY as on the TLS path: without it, small
                // replies wait on Nagle and delayed ACKs (tens of ms).
                let incoming = TcpIncoming::from(grpc_listener).with_nodelay(Some(true));
                router
                    .serve_with_incoming_shutdown(incoming, cancel.cancelled_owned())
                    .await?;
            }
            Ok(())
        }
    });
    tasks.spawn({
        let (c, cancel) = (controller.clone(), cancel.clone());
        async move {
            axum::serve(http_listener, http::router(c))
                .with_graceful_shutdown(cancel.cancelled_owned())
                .await
                .map_err(ServeError::Http)
        }
    });
    tracing::info!(%grpc_addr, %http_addr, tls = config_tls, "mesh controller serving");
    Ok(RunningController {
        controller,
        grpc_addr,
        http_addr,
        tasks,
    })
}

/// Client certificates when TLS asks for them; otherwise nobody is checked
/// (the config allowed that: loopback or `insecurePlaintext`, or TLS without
/// a client CA, which encrypts but leaves identity to the network).
fn default_authenticator(tls: Option<&ReloadingServerConfig>) -> Arc<dyn AgentAuthenticator> {
    match tls {
        Some(tls) if tls.requires_client_certificates() => Arc::new(ClientCertificates),
        Some(_) => {
            tracing::warn!(
                "gRPC TLS without a client CA: agents are not authenticated and may act for any node"
            );
            Arc::new(Unverified)
        }
        None => Arc::new(Unverified),
    }
}
