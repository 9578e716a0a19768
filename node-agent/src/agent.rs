//! Wires one agent together: responder, prober, control channel, HTTP endpoints.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use axum::routing::get;
use pingmesh_proto::v1::{Endpoint, Pinglist, Transport, WindowSummary};
use tokio::sync::{mpsc, watch};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use crate::config::{AgentConfig, RdmaArgs, TransportChoice};
use crate::control::{Identity, run_control};
use crate::endpoints::EndpointSet;
use crate::metrics::{AgentMetrics, MetricsError};
use crate::pathtrace::{FlowTuples, PathTraceMetrics, TraceSettings, run_path_traces};
use crate::probe::auth::ProbeKeyRing;
use crate::probe::flows::{UdpFlowSources, UdpFlows};
use crate::probe::prober::{ProberConfig, run_prober};
use crate::probe::responder::{ResponderObserver, run_responder};
use crate::rnic::{RnicContext, endpoint_of, run_rnic};
use crate::service_flows::tracking::{SharedTable, TrackingConfig};
use crate::transport::TransportError;
use crate::transport::rdma::{
    Availability, RdmaConfig, RdmaEndpoint, RdmaError, RnicEndpointSpec, discover_endpoints,
    rdma_available,
};
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
    /// `"udp"` or `"rdma"`.
    pub transport: &'static str,
    /// Where the UDP responder listens, as advertised to the mesh (UDP transport only).
    pub udp_addr: Option<SocketAddr>,
    /// Where /metrics, /healthz and /readyz are served.
    pub http_addr: SocketAddr,
    pub metrics: Arc<AgentMetrics>,
    /// The endpoints registered now (RNICs leave while they are re-opened).
    pub endpoints: EndpointSet,
    /// The traced service flows (`None` without `--tracing`).
    pub service_flows: Option<SharedTable>,
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

/// What the probers and responders of any transport share.
struct Wiring {
    metrics: Arc<AgentMetrics>,
    observer: Arc<dyn ResponderObserver>,
    pinglists: watch::Receiver<Option<Arc<Pinglist>>>,
    summaries: mpsc::Sender<Vec<WindowSummary>>,
    endpoints: EndpointSet,
    /// Probe keys: every prober installs those of each pinglist, every
    /// responder signs and verifies with them.
    probe_keys: Arc<ProbeKeyRing>,
    cancel: CancellationToken,
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
    crate::control::security::check(&config.controller, &config.control_security)
        .map_err(|e| AgentError::Config(e.to_string()))?;
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
    let (pinglist_tx, pinglist_rx) = watch::channel(None);
    let (summary_tx, summary_rx) = mpsc::channel(256);
    let registered = Arc::new(AtomicBool::new(false));
    let sessions = Arc::new(watch::channel(None).0);
    let mut tasks = JoinSet::new();
    let wiring = Wiring {
        metrics: metrics.clone(),
        observer: Arc::new(MetricsObserver(metrics.clone())),
        pinglists: pinglist_rx,
        summaries: summary_tx,
        endpoints: EndpointSet::new(),
        probe_keys: ProbeKeyRing::off(),
        cancel: cancel.clone(),
    };

    let (transport, udp_addr, flow_tuples) = match choose_transport(&config)? {
        TransportPlan::Udp { reason } => {
            let (addr, sources) = start_udp(&config, reason, &wiring, &mut tasks).await?;
            ("udp", Some(addr), FlowTuples::Udp(sources))
        }
        TransportPlan::Rdma { devices, reason } => {
            start_rdma(&config, devices, reason, &wiring, &mut tasks);
            let tuples = FlowTuples::Rdma {
                max_flows: config.max_flows,
                pinglists: wiring.pinglists.clone(),
            };
            ("rdma", None, tuples)
        }
    };
    let trace_metrics = PathTraceMetrics::register(metrics.registry())
        .map_err(|e| AgentError::Config(format!("path-trace metrics: {e}")))?;
    let (endpoints, trace_sessions, c) = (
        wiring.endpoints.clone(),
        sessions.subscribe(),
        cancel.clone(),
    );
    tasks.spawn(async move {
        run_path_traces(
            flow_tuples,
            endpoints,
            trace_sessions,
            trace_metrics,
            TraceSettings::default(),
            c,
        )
        .await;
        Ok(())
    });

    let service_flows = start_service_flows(&config, &metrics, &sessions, &cancel, &mut tasks)?;

    let identity = Identity {
        controller_url: config.controller.clone(),
        security: config.control_security.clone(),
        node: config.node.clone(),
        agent_version: env!("CARGO_PKG_VERSION").to_owned(),
        endpoints: wiring.endpoints.clone(),
        sessions: sessions.clone(),
    };
    let (m, r, c) = (metrics.clone(), registered.clone(), cancel.clone());
    let buffer = config.report_buffer;
    // The outbox keeps at least one summary, whatever the setting.
    metrics.set_report_buffer_limit(buffer.max(1));
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
        transport,
        udp_addr,
        http_addr,
        metrics,
        endpoints: wiring.endpoints,
        service_flows,
        tasks,
    })
}

/// Service tracing: off (its metric says "disabled") unless asked for; when
/// it cannot run, its metric says why and probing goes on.
fn start_service_flows(
    config: &AgentConfig,
    metrics: &AgentMetrics,
    sessions: &watch::Sender<Option<crate::control::ControlSession>>,
    cancel: &CancellationToken,
    tasks: &mut JoinSet<Result<(), AgentError>>,
) -> Result<Option<SharedTable>, AgentError> {
    let started = crate::service_flows::start(
        config.tracing,
        TrackingConfig::host(&config.rdma.sysfs_root),
        metrics.registry(),
        sessions.subscribe(),
        cancel.clone(),
    )?;
    Ok(started.map(|(table, reporter)| {
        tasks.spawn(async move {
            reporter.await;
            Ok(())
        });
        table
    }))
}

/// The UDP endpoint: one responder socket, one prober with a socket per flow.
async fn start_udp(
    config: &AgentConfig,
    reason: &'static str,
    wiring: &Wiring,
    tasks: &mut JoinSet<Result<(), AgentError>>,
) -> Result<(SocketAddr, UdpFlowSources), AgentError> {
    let responder_socket = Arc::new(UdpProbeSocket::bind(
        config.udp_bind,
        config.timestamps.into(),
    )?);
    let bound = responder_socket.local_addr();
    let advertised = advertise_address(config, bound).await?;
    let support = responder_socket.timestamp_support();
    let timestamps = if support.rx && support.tx {
        "kernel"
    } else {
        "software"
    };
    wiring.metrics.set_transport("udp", timestamps, reason);
    tracing::info!(node = %config.node, udp = %advertised, kernel_rx = support.rx, kernel_tx = support.tx, reason, "UDP endpoint ready");

    let endpoint = Endpoint {
        id: format!("{}/udp0", config.node),
        transport: Transport::Udp as i32,
        address: advertised.to_string(),
        qpn: 0,
        tor: config.tor.clone(),
        device: String::new(),
    };
    let observer = wiring.observer.clone();
    let responder_cancel = wiring.cancel.clone();
    let responder_keys = wiring.probe_keys.clone();
    // Every tag covers the responder's endpoint id, as probers see it in their pinglists.
    let responder_id: Arc<str> = endpoint.id.as_str().into();
    spawn_essential(tasks, &wiring.cancel, "UDP responder", async move {
        run_responder(
            responder_socket,
            observer,
            responder_keys,
            responder_id,
            responder_cancel,
        )
        .await
        .map_err(AgentError::from)
    });

    let prober = ProberConfig {
        emulated: config.emulated_fabric.clone(),
        probe_keys: wiring.probe_keys.clone(),
        ..ProberConfig::new(&endpoint.id, config.max_pending)
    };
    let flows = UdpFlows::new(advertised.ip(), config.timestamps.into(), config.max_flows);
    let sources = flows.sources();
    let (m, p, s, c) = (
        wiring.metrics.clone(),
        wiring.pinglists.clone(),
        wiring.summaries.clone(),
        wiring.cancel.clone(),
    );
    spawn_essential(tasks, &wiring.cancel, "UDP prober", async move {
        run_prober(prober, flows, m, p, s, c)
            .await
            .map_err(AgentError::from)
    });
    wiring.endpoints.insert(endpoint);
    Ok((advertised, sources))
}

/// Spawns a task the agent cannot do without: when it fails, the error is
/// logged and the whole agent stops (and exits non-zero, so that it is restarted).
fn spawn_essential(
    tasks: &mut JoinSet<Result<(), AgentError>>,
    cancel: &CancellationToken,
    what: &'static str,
    task: impl Future<Output = Result<(), AgentError>> + Send + 'static,
) {
    let cancel = cancel.clone();
    tasks.spawn(async move {
        let result = task.await;
        if let Err(e) = &result {
            tracing::error!(task = what, error = %e, category = e.category(), "agent task failed; stopping the agent");
            cancel.cancel();
        }
        result
    });
}

/// One supervised endpoint per opened RNIC port, each with its own prober and responder.
fn start_rdma(
    config: &AgentConfig,
    devices: Vec<Arc<RdmaEndpoint>>,
    reason: &'static str,
    wiring: &Wiring,
    tasks: &mut JoinSet<Result<(), AgentError>>,
) {
    let all_nic_timed = devices.iter().all(|d| d.nic_timestamps());
    let timestamps = if all_nic_timed { "nic" } else { "software" };
    wiring.metrics.set_transport("rdma", timestamps, reason);
    let ctx = RnicContext {
        metrics: wiring.metrics.clone(),
        observer: wiring.observer.clone(),
        tor: config.tor.clone(),
        max_flows: config.max_flows,
        max_pending: config.max_pending,
        pinglists: wiring.pinglists.clone(),
        summaries: wiring.summaries.clone(),
        endpoints: wiring.endpoints.clone(),
        probe_keys: wiring.probe_keys.clone(),
    };
    for device in devices {
        // Registered now, so the first registration names every RNIC that opened.
        wiring
            .endpoints
            .insert(endpoint_of(device.as_ref(), &config.tor));
        let endpoint_id = device.spec().endpoint_id.clone();
        let (node, rdma) = (config.node.clone(), config.rdma.clone());
        // Re-discovered on every attempt: a reset device may come back with another GID.
        let reopen = move || open_rnic(&node, &rdma, &endpoint_id).map(Arc::new);
        let (ctx, cancel) = (ctx.clone(), wiring.cancel.clone());
        tasks.spawn(async move {
            run_rnic(device, reopen, ctx, cancel).await;
            Ok(())
        });
    }
}

/// Which transport the agent runs, decided once at start.
enum TransportPlan {
    Udp {
        reason: &'static str,
    },
    Rdma {
        devices: Vec<Arc<RdmaEndpoint>>,
        reason: &'static str,
    },
}

/// Picks the transport: UDP when asked; RDMA when asked (or refuses to start
/// without a usable RNIC port); with `auto`, RDMA when at least one RNIC
/// port opens, else UDP with the reason as a metric label.
fn choose_transport(config: &AgentConfig) -> Result<TransportPlan, AgentError> {
    match config.transport {
        TransportChoice::Udp => Ok(TransportPlan::Udp {
            reason: "configured",
        }),
        TransportChoice::Rdma => {
            let (devices, failures) = open_rnics(config);
            if devices.is_empty() {
                return Err(AgentError::Config(format!(
                    "--transport rdma: no RNIC port could be opened: {}",
                    describe_failures(&failures)
                )));
            }
            log_failures(&failures);
            Ok(TransportPlan::Rdma {
                devices,
                reason: "configured",
            })
        }
        TransportChoice::Auto => {
            if let Availability::Unavailable { reason } = rdma_available() {
                tracing::info!(%reason, "no RDMA devices; probing over UDP");
                return Ok(TransportPlan::Udp {
                    reason: "no_rdma_device",
                });
            }
            let (devices, failures) = open_rnics(config);
            if devices.is_empty() {
                tracing::warn!(
                    failures = %describe_failures(&failures),
                    "RDMA devices found but no port could be opened; probing over UDP"
                );
                return Ok(TransportPlan::Udp {
                    reason: "no_usable_rdma_port",
                });
            }
            log_failures(&failures);
            Ok(TransportPlan::Rdma {
                devices,
                reason: "rdma_device_found",
            })
        }
    }
}

/// Opens every RNIC port discovery finds; returns those that opened and why the others did not.
fn open_rnics(config: &AgentConfig) -> (Vec<Arc<RdmaEndpoint>>, Vec<RdmaError>) {
    let found = discover_endpoints(
        &config.rdma.sysfs_root,
        &config.node,
        &config.rdma.allow_list(),
        config.rdma.gid_index,
    );
    let mut failures = found.skipped;
    let mut devices = Vec::new();
    for spec in found.endpoints {
        match RdmaEndpoint::open(&rdma_config(&config.rdma, spec)) {
            Ok(device) => devices.push(Arc::new(device)),
            Err(e) => failures.push(e),
        }
    }
    (devices, failures)
}

/// Re-discovers and opens the port of `endpoint_id` (after a fatal error).
fn open_rnic(node: &str, rdma: &RdmaArgs, endpoint_id: &str) -> Result<RdmaEndpoint, RdmaError> {
    let found = discover_endpoints(&rdma.sysfs_root, node, &rdma.allow_list(), rdma.gid_index);
    let spec = found
        .endpoints
        .into_iter()
        .find(|s| s.endpoint_id == endpoint_id)
        .ok_or_else(|| RdmaError::DeviceNotFound {
            device: endpoint_id.to_owned(),
        })?;
    RdmaEndpoint::open(&rdma_config(rdma, spec))
}

fn rdma_config(rdma: &RdmaArgs, spec: RnicEndpointSpec) -> RdmaConfig {
    RdmaConfig {
        traffic_class: rdma.traffic_class,
        service_level: rdma.service_level,
        ..RdmaConfig::new(spec)
    }
}

fn describe_failures(failures: &[RdmaError]) -> String {
    if failures.is_empty() {
        return "discovery found no RNIC ports".to_owned();
    }
    failures
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join("; ")
}

fn log_failures(failures: &[RdmaError]) {
    for e in failures {
        tracing::warn!(error = %e, category = e.category(), "RNIC port left out");
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
    let stop = cancel.clone();
    spawn_essential(tasks, &cancel, "HTTP server", async move {
        axum::serve(listener, app)
            .with_graceful_shutdown(async move { stop.cancelled().await })
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
    fn auth_failed(&self, reason: &'static str) {
        self.0.probe_auth_failed("probe", reason);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn probes_the_responder_drops_unauthenticated_count_as_probe_auth_failures() {
        let metrics = Arc::new(AgentMetrics::new("n1", false).unwrap());
        let observer = MetricsObserver(metrics.clone());
        observer.auth_failed("bad_tag");
        observer.auth_failed("bad_tag");
        let text = String::from_utf8(metrics.encode()).unwrap();
        let series = text
            .lines()
            .find(|l| {
                l.starts_with("pingmesh_probe_auth_failures_total{")
                    && l.contains("kind=\"probe\"")
                    && l.contains("reason=\"bad_tag\"")
            })
            .unwrap();
        assert!(series.ends_with(" 2"), "{series}");
    }

    fn config_with(transport: TransportChoice, sysfs_root: &std::path::Path) -> AgentConfig {
        let mut config = AgentConfig::local("n1", "", "http://127.0.0.1:1", [127, 0, 0, 1].into());
        config.transport = transport;
        config.rdma.sysfs_root = sysfs_root.to_path_buf();
        config
    }

    #[test]
    fn transport_choice_maps_to_udp_rdma_or_a_clear_refusal() {
        let empty = tempfile::tempdir().unwrap();
        let udp = choose_transport(&config_with(TransportChoice::Udp, empty.path())).unwrap();
        assert!(matches!(
            udp,
            TransportPlan::Udp {
                reason: "configured"
            }
        ));
        let Err(refused) = choose_transport(&config_with(TransportChoice::Rdma, empty.path()))
        else {
            panic!("rdma without RNIC ports must refuse to start");
        };
        assert!(refused.to_string().contains("no RNIC port"), "{refused}");
        // Whatever this host has, auto never fails.
        match choose_transport(&config_with(TransportChoice::Auto, empty.path())).unwrap() {
            TransportPlan::Udp { reason } => {
                assert!(["no_rdma_device", "no_usable_rdma_port"].contains(&reason));
            }
            TransportPlan::Rdma { .. } => panic!("no ports under an empty sysfs root"),
        }
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
