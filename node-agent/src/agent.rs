//! Wires one agent together: responder, prober, control channel, HTTP endpoints.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use axum::routing::get;
use pingmesh_proto::v1::{Endpoint, Transport};
use tokio::sync::{mpsc, watch};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use crate::config::{AgentConfig, TransportChoice};
use crate::control::{Identity, run_control};
use crate::metrics::{AgentMetrics, MetricsError};
use crate::probe::prober::{ProberConfig, run_prober};
use crate::probe::responder::{ResponderObserver, run_responder};
use crate::transport::TransportError;
use crate::transport::rdma::{Availability, rdma_available};
use crate::transport::udp::UdpProbeSocket;

#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error("invalid configuration: {0}")]
    Config(String),
    #[error(transparent)]
    Metrics(#[from] MetricsError),
    #[error(transparent)]
    Transport(#[from] TransportError),
    #[error("serving HTTP on {addr}: {source}")]
    Http {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("discovering the address to advertise: {0}")]
    Advertise(std::io::Error),
}

impl AgentError {
    pub fn category(&self) -> &'static str {
        match self {
            Self::Config(_) => "config",
            Self::Metrics(_) => "metrics",
            Self::Transport(e) => e.category(),
            Self::Http { .. } => "http",
            Self::Advertise(_) => "advertise",
        }
    }
}

/// A started agent. Dropping it does not stop it: cancel the token given to
/// [`start`], then [`RunningAgent::wait`].
#[derive(Debug)]
pub struct RunningAgent {
    pub node: String,
    /// Where the responder listens, as advertised to the mesh.
    pub udp_addr: SocketAddr,
    /// Where /metrics, /healthz and /readyz are served.
    pub http_addr: SocketAddr,
    pub metrics: Arc<AgentMetrics>,
    tasks: JoinSet<Result<(), AgentError>>,
}

impl RunningAgent {
    /// Waits for every task to end; the first error wins.
    pub async fn wait(mut self) -> Result<(), AgentError> {
        let mut first = Ok(());
        while let Some(joined) = self.tasks.join_next().await {
            match joined {
                Ok(Err(e)) if first.is_ok() => first = Err(e),
                Err(e) if e.is_panic() => tracing::error!(error = %e, "agent task panicked"),
                _ => {}
            }
        }
        first
    }
}

struct Readiness {
    registered: Arc<AtomicBool>,
}

/// Starts an agent; it runs until `cancel` is cancelled.
pub async fn start(
    config: AgentConfig,
    cancel: CancellationToken,
) -> Result<RunningAgent, AgentError> {
    if !pingmesh_proto::limits::is_valid_id(&config.node) {
        return Err(AgentError::Config(format!(
            "node name {:?} is not a valid identifier",
            config.node
        )));
    }
    if !config.tor.is_empty() && !pingmesh_proto::limits::is_valid_id(&config.tor) {
        return Err(AgentError::Config(format!(
            "ToR {:?} is not a valid identifier",
            config.tor
        )));
    }
    let metrics = Arc::new(AgentMetrics::new(
        &config.node,
        config.metrics_per_target_node,
    )?);
    let responder_socket = Arc::new(UdpProbeSocket::bind(
        config.udp_bind,
        config.timestamps.into(),
    )?);
    let bound = responder_socket.local_addr();
    let advertised = advertise_address(&config, bound).await?;
    let support = responder_socket.timestamp_support();
    metrics.set_transport(
        "udp",
        support.rx && support.tx,
        udp_reason(config.transport)?,
    );
    tracing::info!(node = %config.node, udp = %advertised, kernel_rx = support.rx, kernel_tx = support.tx, "UDP endpoint ready");

    let endpoint = Endpoint {
        id: format!("{}/udp0", config.node),
        transport: Transport::Udp as i32,
        address: advertised.to_string(),
        qpn: 0,
        tor: config.tor.clone(),
        device: String::new(),
    };
    let (pinglist_tx, pinglist_rx) = watch::channel(None);
    let (summary_tx, summary_rx) = mpsc::channel(256);
    let registered = Arc::new(AtomicBool::new(false));
    let mut tasks = JoinSet::new();

    let observer: Arc<dyn ResponderObserver> = Arc::new(MetricsObserver(metrics.clone()));
    let responder_cancel = cancel.clone();
    tasks.spawn(async move {
        run_responder(responder_socket, observer, responder_cancel)
            .await
            .map_err(AgentError::from)
    });

    let prober = ProberConfig {
        bind_ip: advertised.ip(),
        timestamps: config.timestamps.into(),
        max_flows: config.max_flows,
        max_pending: config.max_pending,
    };
    let (m, c) = (metrics.clone(), cancel.clone());
    tasks.spawn(async move {
        run_prober(prober, m, pinglist_rx, summary_tx, c)
            .await
            .map_err(AgentError::from)
    });

    let identity = Identity {
        controller_url: config.controller.clone(),
        node: config.node.clone(),
        agent_version: env!("CARGO_PKG_VERSION").to_owned(),
        endpoints: vec![endpoint],
    };
    let (m, r, c) = (metrics.clone(), registered.clone(), cancel.clone());
    let buffer = config.report_buffer;
    tasks.spawn(async move {
        run_control(identity, m, pinglist_tx, summary_rx, r, buffer, c).await;
        Ok(())
    });

    let http_addr = serve_http(
        &mut tasks,
        config.metrics_addr,
        router(metrics.clone(), Arc::new(Readiness { registered })),
        cancel,
    )
    .await?;

    Ok(RunningAgent {
        node: config.node,
        udp_addr: advertised,
        http_addr,
        metrics,
        tasks,
    })
}

/// Why the agent runs over UDP (a bounded metric label), or why it must not start.
///
/// The RDMA transport is built and tested on its own (`transport::rdma`) but the
/// prober does not drive it yet, so RDMA hosts run the same protocol over UDP.
fn udp_reason(choice: TransportChoice) -> Result<&'static str, AgentError> {
    match choice {
        TransportChoice::Udp => Ok("configured"),
        TransportChoice::Rdma => Err(AgentError::Config(
            "--transport rdma: this agent cannot probe over RDMA yet; use auto or udp".into(),
        )),
        TransportChoice::Auto => match rdma_available() {
            Availability::Unavailable { reason } => {
                tracing::info!(%reason, "no RDMA devices; probing over UDP");
                Ok("no_rdma_device")
            }
            Availability::Available { devices } => {
                tracing::warn!(
                    ?devices,
                    "RDMA devices found, but RDMA probing is not available in this agent yet; probing over UDP"
                );
                Ok("rdma_prober_not_available")
            }
        },
    }
}

/// Binds `addr` and serves `app` on it until `cancel`; returns the bound address.
async fn serve_http(
    tasks: &mut JoinSet<Result<(), AgentError>>,
    addr: SocketAddr,
    app: Router,
    cancel: CancellationToken,
) -> Result<SocketAddr, AgentError> {
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|source| AgentError::Http { addr, source })?;
    let bound = listener
        .local_addr()
        .map_err(|source| AgentError::Http { addr, source })?;
    tasks.spawn(async move {
        axum::serve(listener, app)
            .with_graceful_shutdown(async move { cancel.cancelled().await })
            .await
            .map_err(|source| AgentError::Http {
                addr: bound,
                source,
            })
    });
    Ok(bound)
}

/// The address other agents should probe: the configured one, else the bound
/// one, else (bound to all interfaces) the local address towards the controller.
async fn advertise_address(
    config: &AgentConfig,
    bound: SocketAddr,
) -> Result<SocketAddr, AgentError> {
    match config.advertise_addr {
        Some(a) => Ok(a),
        None if bound.ip().is_unspecified() => {
            let ip = local_ip_towards(&config.controller)
                .await
                .map_err(AgentError::Advertise)?;
            Ok(SocketAddr::new(ip, bound.port()))
        }
        None => Ok(bound),
    }
}

fn router(metrics: Arc<AgentMetrics>, ready: Arc<Readiness>) -> Router {
    Router::new()
        .route(
            "/metrics",
            get(
                |State((m, _)): State<(Arc<AgentMetrics>, Arc<Readiness>)>| async move {
                    (
                        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
                        m.encode(),
                    )
                },
            ),
        )
        .route("/healthz", get(|| async { "ok" }))
        .route(
            "/readyz",
            get(
                |State((_, r)): State<(Arc<AgentMetrics>, Arc<Readiness>)>| async move {
                    if r.registered.load(Ordering::Relaxed) {
                        (StatusCode::OK, "ready").into_response()
                    } else {
                        (
                            StatusCode::SERVICE_UNAVAILABLE,
                            "not registered with the mesh controller yet",
                        )
                            .into_response()
                    }
                },
            ),
        )
        .with_state((metrics, ready))
}

/// The local IP this host would use to reach the controller: the address other
/// agents can most likely reach us on when we listen on all interfaces.
async fn local_ip_towards(controller_url: &str) -> std::io::Result<IpAddr> {
    let authority = controller_url
        .split("://")
        .nth(1)
        .unwrap_or(controller_url)
        .split('/')
        .next()
        .unwrap_or_default()
        .to_owned();
    let target = tokio::net::lookup_host(&authority)
        .await?
        .next()
        .ok_or_else(|| {
            std::io::Error::new(
                std::io::ErrorKind::NotFound,
                format!("{authority} resolves to nothing"),
            )
        })?;
    let any: SocketAddr = if target.is_ipv4() {
        ([0, 0, 0, 0], 0).into()
    } else {
        ([0u16; 8], 0).into()
    };
    let probe = tokio::net::UdpSocket::bind(any).await?;
    probe.connect(target).await?;
    Ok(probe.local_addr()?.ip())
}

struct MetricsObserver(Arc<AgentMetrics>);

impl ResponderObserver for MetricsObserver {
    fn answered(&self, software_timed: bool) {
        self.0.responder_answered(software_timed);
    }
    fn malformed(&self, reason: &'static str) {
        self.0.malformed("responder", reason);
    }
    fn dropped(&self, reason: &'static str) {
        self.0.responder_dropped(reason);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn transport_choice_maps_to_udp_or_a_clear_refusal() {
        assert_eq!(udp_reason(TransportChoice::Udp).unwrap(), "configured");
        let refused = udp_reason(TransportChoice::Rdma).unwrap_err().to_string();
        assert!(refused.contains("cannot probe over RDMA yet"), "{refused}");
        // Whatever this host has, auto never fails.
        let auto = udp_reason(TransportChoice::Auto).unwrap();
        assert!(["no_rdma_device", "rdma_prober_not_available"].contains(&auto));
    }

    #[tokio::test]
    async fn an_invalid_node_name_is_refused_before_anything_starts() {
        let mut config =
            AgentConfig::local("bad name", "", "http://127.0.0.1:1", [127, 0, 0, 1].into());
        config.transport = TransportChoice::Udp;
        let err = start(config, CancellationToken::new()).await.unwrap_err();
        assert_eq!(err.category(), "config");
    }
}
