//! `pingmesh-operator run`: leader election, then the reconciler, the mesh
//! controller it hosts, the Node label follower and the findings publisher,
//! and one public HTTP port with the mesh API, `/metrics` (mesh controller and
//! operator), `/livez` and `/readyz`. SIGTERM stops everything gracefully.
//!
//! Several replicas elect a leader on a Lease (see `leader`). Until it leads,
//! a replica only answers probes and forwards agents to the leader (see
//! `forward`); once it leads it starts everything else, and if it loses the
//! Lease it exits at once so that Kubernetes restarts it as a standby.
//!
//! The mesh controller runs with the probing and SLA settings of one
//! `PingMesh` (`--mesh`, default `<pod namespace>/default`), read before it
//! starts; when they change, it restarts in-process with the new ones. Its
//! `topology` and `nodeHealth` settings apply without a restart.

use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use clap::Args;
use futures::StreamExt;
use k8s_openapi::api::apps::v1::DaemonSet;
use k8s_openapi::api::core::v1::ConfigMap;
use kube::runtime::Controller;
use kube::runtime::watcher;
use kube::{Api, Client};
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use super::findings::{FindingsPublisher, publish_findings};
use super::forward::forward_to_leader;
use super::leader::{Elector, LeaseSettings, Role, run_election};
use super::nodes::{
    NodeMeta, NodeTorResolver, RelabeledNodes, follow_node_labels, node_cache, reflect_nodes,
    wait_for_nodes,
};
pub use super::operator_http::{OperatorHttp, operator_router};
use super::{
    Context, MeshHost, MeshPolicy, OperatorSettings, ReconcileMetrics, SourceSettings,
    error_policy, managed_selector, reconcile,
};
use crate::config::{ConfigError, MeshArgs, MeshConfig};
use crate::crd::PingMesh;
use crate::mesh::server::{self, RunningController, ServeError};
use crate::mesh::topology::TorResolver;

/// Longest wait for the Node cache before the mesh controller starts anyway.
const NODE_SYNC_LIMIT: Duration = Duration::from_secs(30);

/// Flags of `pingmesh-operator run` (the mesh controller's flags included).
#[derive(Debug, Clone, Args)]
#[allow(clippy::struct_excessive_bools)] // flags
pub struct RunArgs {
    #[command(flatten)]
    pub mesh: MeshArgs,
    /// gRPC URL agents dial for the mesh controller. Default:
    /// `http://pingmesh-operator.<pod namespace>.svc:<gRPC port>`.
    #[arg(long, env = "PINGMESH_AGENT_CONTROLLER_URL")]
    pub agent_controller_url: Option<String>,
    /// Service account of agent pods (default: the namespace's default).
    #[arg(long, env = "PINGMESH_AGENT_SERVICE_ACCOUNT")]
    pub agent_service_account: Option<String>,
    /// Only watch `PingMeshes` in this namespace (default: all namespaces).
    #[arg(long, env = "PINGMESH_WATCH_NAMESPACE")]
    pub watch_namespace: Option<String>,
    /// Seconds between status refreshes of an unchanged mesh.
    #[arg(long, env = "PINGMESH_RESYNC_SECS", default_value_t = 30)]
    pub resync_secs: u64,
    /// This pod's name (downward API), named in Events and the leader Lease.
    #[arg(long, env = "POD_NAME")]
    pub pod_name: Option<String>,
    /// This pod's namespace (downward API), for the default agent controller
    /// URL and the leader Lease.
    #[arg(long, env = "POD_NAMESPACE", default_value = "pingmesh-system")]
    pub pod_namespace: String,
    /// This pod's IP (downward API): with the gRPC port, where standbys
    /// forward agents to while this replica leads.
    #[arg(long, env = "POD_IP")]
    pub pod_ip: Option<IpAddr>,
    /// `namespace/name` of the PingMesh whose probing and SLA settings the mesh
    /// controller runs with. Default: `<pod namespace>/default`.
    #[arg(long, env = "PINGMESH_MESH")]
    pub mesh_source: Option<String>,
    /// Elect a leader on a Lease, so that several replicas are safe. Off: this
    /// replica acts at once and alone (run exactly one).
    #[arg(long, env = "PINGMESH_LEADER_ELECT", default_value_t = true, action = clap::ArgAction::Set)]
    pub leader_elect: bool,
    /// Name of the leader election Lease.
    #[arg(
        long,
        env = "PINGMESH_LEADER_ELECTION_LEASE",
        default_value = "pingmesh-operator"
    )]
    pub leader_election_lease: String,
    /// Namespace of the leader election Lease (default: the pod namespace).
    #[arg(long, env = "PINGMESH_LEADER_ELECTION_NAMESPACE")]
    pub leader_election_namespace: Option<String>,
    /// Seconds a Lease stays held after its last renewal; standbys take over
    /// this long after a leader stops renewing.
    #[arg(
        long,
        env = "PINGMESH_LEADER_ELECTION_LEASE_DURATION_SECS",
        default_value_t = 15
    )]
    pub leader_election_lease_duration_secs: u64,
    /// Seconds the leader keeps acting without a successful renewal; below
    /// the lease duration.
    #[arg(
        long,
        env = "PINGMESH_LEADER_ELECTION_RENEW_DEADLINE_SECS",
        default_value_t = 10
    )]
    pub leader_election_renew_deadline_secs: u64,
    /// Seconds between tries to acquire or renew the Lease; below the renew deadline.
    #[arg(
        long,
        env = "PINGMESH_LEADER_ELECTION_RETRY_PERIOD_SECS",
        default_value_t = 2
    )]
    pub leader_election_retry_period_secs: u64,
}

impl RunArgs {
    /// Reconciler settings; `grpc_port` is the port the mesh controller serves agents on.
    pub fn settings(&self, grpc_port: u16) -> OperatorSettings {
        OperatorSettings {
            controller_url: self.agent_controller_url.clone().unwrap_or_else(|| {
                format!(
                    "http://pingmesh-operator.{}.svc:{grpc_port}",
                    self.pod_namespace
                )
            }),
            agent_service_account: self.agent_service_account.clone(),
            resync: Duration::from_secs(self.resync_secs.max(1)),
        }
    }

    /// `(namespace, name)` of the policy source.
    pub fn policy_source(&self) -> (String, String) {
        match self.mesh_source.as_deref().and_then(|s| s.split_once('/')) {
            Some((ns, name)) => (ns.to_owned(), name.to_owned()),
            None => (
                self.pod_namespace.clone(),
                self.mesh_source
                    .clone()
                    .unwrap_or_else(|| "default".to_owned()),
            ),
        }
    }

    /// The election this replica takes part in; `None` with `--leader-elect=false`.
    /// `grpc_port` is where it serves agents when it leads.
    pub fn lease_settings(&self, grpc_port: u16) -> Result<Option<LeaseSettings>, RunError> {
        if !self.leader_elect {
            return Ok(None);
        }
        let identity = self.pod_name.clone().unwrap_or_else(|| {
            let made_up = format!("pingmesh-operator-{:016x}", rand::random::<u64>());
            tracing::warn!(identity = %made_up, "POD_NAME is not set; electing under a made-up name");
            made_up
        });
        let settings = LeaseSettings {
            name: self.leader_election_lease.clone(),
            namespace: self
                .leader_election_namespace
                .clone()
                .unwrap_or_else(|| self.pod_namespace.clone()),
            identity,
            lease_duration: Duration::from_secs(self.leader_election_lease_duration_secs),
            renew_deadline: Duration::from_secs(self.leader_election_renew_deadline_secs),
            retry_period: Duration::from_secs(self.leader_election_retry_period_secs),
            address: self
                .pod_ip
                .map(|ip| SocketAddr::new(ip, grpc_port).to_string()),
        };
        settings.validate().map_err(RunError::LeaderElection)?;
        Ok(Some(settings))
    }
}

#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error("connecting to the Kubernetes API: {0}")]
    Kube(#[from] kube::Error),
    #[error(transparent)]
    Mesh(#[from] ServeError),
    #[error("metrics setup: {0}")]
    Metrics(#[from] prometheus::Error),
    #[error("binding {what} on {addr}: {source}")]
    Bind {
        what: &'static str,
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("HTTP server: {0}")]
    Http(std::io::Error),
    #[error("leader election settings: {0}")]
    LeaderElection(String),
    #[error("lost leadership: {0}; exiting so that Kubernetes restarts this replica as a standby")]
    LostLeadership(String),
}

impl RunError {
    /// Bounded label for logs.
    pub fn category(&self) -> &'static str {
        match self {
            Self::Config(_) => "config",
            Self::Kube(_) => "kube_client",
            Self::Mesh(_) => "mesh_controller",
            Self::Metrics(_) => "metrics",
            Self::Bind { .. } => "bind",
            Self::Http(_) => "http",
            Self::LeaderElection(_) => "leader_election",
            Self::LostLeadership(_) => "lost_leadership",
        }
    }
}

/// How a wait for something ended.
enum Waited {
    Done,
    Shutdown,
    Lost(String),
}

/// Runs until SIGTERM/SIGINT, or until this replica loses leadership (an error).
pub async fn run(args: RunArgs) -> Result<(), RunError> {
    let mut config = args.mesh.resolve()?;
    let public_addr = config.http_addr;
    // The mesh controller's own HTTP server moves to an unused loopback port;
    // the public port serves its routes behind the operator's.
    config.http_addr = SocketAddr::from(([127, 0, 0, 1], 0));
    let lease = args.lease_settings(config.grpc_addr.port())?;
    let client = Client::try_default().await?;
    let metrics = ReconcileMetrics::new()?;
    let (roles_tx, roles) = watch::channel(if lease.is_some() {
        Role::Standby {
            leader: None,
            address: None,
        }
    } else {
        Role::Leader
    });
    let http_state = OperatorHttp {
        hosted: Arc::new(OnceLock::new()),
        metrics: metrics.clone(),
        synced: Arc::new(AtomicBool::new(false)),
        role: roles.clone(),
    };
    let http_stop = CancellationToken::new();
    let http = serve_http(public_addr, http_state.clone(), http_stop.clone()).await?;
    let shutdown = pingmesh_proto::signals::shutdown_signal();
    tokio::pin!(shutdown);

    let election_stop = CancellationToken::new();
    // Without an election the role never changes; the sender stays alive so
    // that receivers keep waiting instead of seeing a closed channel.
    let mut fixed_role = None;
    let election = if let Some(settings) = lease {
        tracing::info!(lease = %settings.name, namespace = %settings.namespace, identity = %settings.identity, "waiting to lead");
        Some(tokio::spawn(run_election(
            Elector::new(client.clone(), settings),
            roles_tx,
            election_stop.clone(),
        )))
    } else {
        fixed_role = Some(roles_tx);
        None
    };
    let outcome =
        match standby_until_leading(config.grpc_addr, roles.clone(), &mut shutdown).await? {
            Waited::Done => {
                metrics.set_leader(true);
                tracing::info!(%public_addr, "leading");
                let led = start_leading(&args, config, client, &http_state).await?;
                led.serve(roles, &mut shutdown).await
            }
            Waited::Shutdown => Ok(()),
            Waited::Lost(reason) => return Err(RunError::LostLeadership(reason)),
        };
    if outcome
        .as_ref()
        .is_err_and(|e| matches!(e, RunError::LostLeadership(_)))
    {
        // Another replica may lead already: exit without touching anything.
        return outcome;
    }
    tracing::info!("shutting down");
    // Only now, with nothing acting any more, may a standby take over.
    election_stop.cancel();
    if let Some(election) = election {
        let _ = election.await;
    }
    http_stop.cancel();
    drop(fixed_role);
    match (outcome, http.await) {
        (Err(e), _) => Err(e),
        (Ok(()), Ok(Err(e))) => Err(RunError::Http(e)),
        (Ok(()), _) => Ok(()),
    }
}

/// Everything a leader runs.
struct Led {
    host: Arc<MeshHost>,
    config: MeshConfig,
    /// `None` only while restarting.
    running: Option<RunningController>,
    mesh_cancel: CancellationToken,
    tor_resolver: Arc<dyn TorResolver>,
    reconciler: JoinHandle<()>,
    metrics: ReconcileMetrics,
    /// Stops the reconciler, the Node label follower and the findings publisher.
    work: CancellationToken,
}

/// Starts what only the leader runs: the Node cache (synced first, so that
/// agents registering at once get their ToR), the mesh controller with the
/// policy source's settings, the Node label follower, the findings publisher
/// and the reconciler.
async fn start_leading(
    args: &RunArgs,
    mut config: MeshConfig,
    client: Client,
    http: &OperatorHttp,
) -> Result<Led, RunError> {
    let (nodes, node_writer) = node_cache();
    let relabeled = Arc::new(RelabeledNodes::default());
    let work = CancellationToken::new();
    tokio::spawn(reflect_nodes(
        Api::<NodeMeta>::all(client.clone()),
        node_writer,
        relabeled.clone(),
        work.clone(),
    ));
    wait_for_nodes(&nodes, NODE_SYNC_LIMIT).await;

    let (source_ns, source_name) = args.policy_source();
    let mut source_settings = SourceSettings::default();
    if let Some(pm) = Api::<PingMesh>::namespaced(client.clone(), &source_ns)
        .get_opt(&source_name)
        .await?
        .filter(|pm| pm.spec.validate().is_ok())
    {
        with_policy(&mut config, MeshPolicy::of(&pm));
        source_settings = SourceSettings::of(&pm);
    }
    let resolver = NodeTorResolver::new(nodes.clone(), source_settings.topology.clone());
    let tor_resolver: Arc<dyn TorResolver> = Arc::new(resolver.clone());
    let mesh_cancel = CancellationToken::new();
    let running = server::start_with(
        config.clone(),
        mesh_cancel.clone(),
        Some(tor_resolver.clone()),
    )
    .await?;
    let host = Arc::new(MeshHost::with_settings(
        running.controller.clone(),
        format!("{source_ns}/{source_name}"),
        source_settings,
    ));
    let _ = http.hosted.set(host.clone());
    tokio::spawn(follow_node_labels(
        resolver,
        relabeled,
        host.clone(),
        work.clone(),
    ));
    tokio::spawn(publish_findings(
        FindingsPublisher::new(
            client.clone(),
            args.pod_name.clone(),
            nodes,
            http.metrics.clone(),
        ),
        host.clone(),
        work.clone(),
    ));

    let ctx = Arc::new(Context::new(
        client.clone(),
        args.settings(running.grpc_addr.port()),
        host.clone(),
        http.metrics.clone(),
        args.pod_name.clone(),
    ));
    let controller = kube_controller(&client, args.watch_namespace.as_deref())
        .graceful_shutdown_on(work.clone().cancelled_owned());
    tokio::spawn({
        let (store, synced) = (controller.store(), http.synced.clone());
        async move {
            if store.wait_until_ready().await.is_ok() {
                synced.store(true, Ordering::Relaxed);
                tracing::info!("PingMesh cache synced; ready");
            }
        }
    });
    let reconciler = tokio::spawn(controller.run(reconcile, error_policy, ctx).for_each(
        |result| async move {
            if let Err(e) = result {
                tracing::debug!(error = %e, "controller event");
            }
        },
    ));
    tracing::info!(grpc_addr = %running.grpc_addr, "operator running");
    Ok(Led {
        host,
        config,
        running: Some(running),
        mesh_cancel,
        tor_resolver,
        reconciler,
        metrics: http.metrics.clone(),
        work,
    })
}

impl Led {
    /// Serves until shutdown (then stops everything) or until leadership is
    /// lost (then stops acting at once and returns the error without waiting).
    async fn serve(
        mut self,
        mut roles: watch::Receiver<Role>,
        shutdown: &mut std::pin::Pin<&mut impl std::future::Future<Output = ()>>,
    ) -> Result<(), RunError> {
        let mut policies = self.host.policy_requests();
        let mut electing = true;
        loop {
            tokio::select! {
                () = &mut *shutdown => break,
                changed = roles.changed(), if electing => {
                    if changed.is_err() {
                        electing = false;
                        continue;
                    }
                    if let Role::Lost { reason } = roles.borrow_and_update().clone() {
                        tracing::error!(%reason, "lost leadership; stopping at once and exiting");
                        self.metrics.set_leader(false);
                        self.work.cancel();
                        self.mesh_cancel.cancel();
                        return Err(RunError::LostLeadership(reason));
                    }
                }
                changed = policies.changed() => {
                    let wanted = policies.borrow_and_update().clone();
                    let (Ok(()), Some(policy)) = (changed, wanted) else { continue };
                    self.restart_mesh(policy).await?;
                }
            }
        }
        self.work.cancel();
        self.mesh_cancel.cancel();
        let _ = self.reconciler.await;
        match self.running.take() {
            Some(running) => Ok(running.wait().await?),
            None => Ok(()),
        }
    }

    async fn restart_mesh(&mut self, policy: MeshPolicy) -> Result<(), RunError> {
        tracing::info!("probing or SLA settings changed; restarting the mesh controller");
        self.mesh_cancel.cancel();
        // The old controller lets go of its ports before the new one binds them.
        if let Some(old) = self.running.take() {
            old.wait().await?;
        }
        with_policy(&mut self.config, policy);
        self.mesh_cancel = CancellationToken::new();
        let running = server::start_with(
            self.config.clone(),
            self.mesh_cancel.clone(),
            Some(self.tor_resolver.clone()),
        )
        .await?;
        self.host.replace(running.controller.clone());
        self.running = Some(running);
        Ok(())
    }
}

/// Serves the operator's HTTP port until `stop`.
async fn serve_http(
    addr: SocketAddr,
    state: OperatorHttp,
    stop: CancellationToken,
) -> Result<JoinHandle<Result<(), std::io::Error>>, RunError> {
    let listener = TcpListener::bind(addr)
        .await
        .map_err(|source| RunError::Bind {
            what: "HTTP",
            addr,
            source,
        })?;
    Ok(tokio::spawn(
        axum::serve(listener, operator_router(state))
            .with_graceful_shutdown(stop.cancelled_owned())
            .into_future(),
    ))
}

/// Forwards agents arriving on `grpc_addr` to the leader until this replica
/// leads (then frees the port for its own mesh controller), shuts down, or
/// loses (an election that ends without leading).
async fn standby_until_leading(
    grpc_addr: SocketAddr,
    mut roles: watch::Receiver<Role>,
    shutdown: &mut std::pin::Pin<&mut impl std::future::Future<Output = ()>>,
) -> Result<Waited, RunError> {
    if *roles.borrow_and_update() == Role::Leader {
        return Ok(Waited::Done);
    }
    let listener = TcpListener::bind(grpc_addr)
        .await
        .map_err(|source| RunError::Bind {
            what: "gRPC",
            addr: grpc_addr,
            source,
        })?;
    let (leader_tx, leader_rx) = watch::channel(None);
    let stop_forwarding = CancellationToken::new();
    let forwarder = tokio::spawn(forward_to_leader(
        listener,
        leader_rx,
        stop_forwarding.clone(),
    ));
    let waited = loop {
        tokio::select! {
            () = &mut *shutdown => break Waited::Shutdown,
            changed = roles.changed() => {
                if changed.is_err() {
                    break Waited::Lost("the election ended".to_owned());
                }
                match roles.borrow_and_update().clone() {
                    Role::Leader => break Waited::Done,
                    Role::Lost { reason } => break Waited::Lost(reason),
                    Role::Standby { leader, address } => {
                        let address = address.and_then(|a| a.parse::<SocketAddr>().ok());
                        tracing::info!(leader = ?leader, address = ?address, "standby");
                        leader_tx.send_replace(address);
                    }
                }
            }
        }
    };
    stop_forwarding.cancel();
    let _ = forwarder.await;
    Ok(waited)
}

fn with_policy(config: &mut MeshConfig, policy: MeshPolicy) {
    config.pinglist = policy.pinglist;
    config.sla = policy.sla;
}

/// The `PingMesh` controller, watching owned objects by label only (the cache
/// holds ours, not every `ConfigMap` of the cluster).
fn kube_controller(client: &Client, namespace: Option<&str>) -> Controller<PingMesh> {
    let owned = watcher::Config::default().labels(&managed_selector());
    match namespace {
        Some(ns) => Controller::new(
            Api::<PingMesh>::namespaced(client.clone(), ns),
            watcher::Config::default(),
        )
        .owns(
            Api::<ConfigMap>::namespaced(client.clone(), ns),
            owned.clone(),
        )
        .owns(Api::<DaemonSet>::namespaced(client.clone(), ns), owned),
        None => Controller::new(
            Api::<PingMesh>::all(client.clone()),
            watcher::Config::default(),
        )
        .owns(Api::<ConfigMap>::all(client.clone()), owned.clone())
        .owns(Api::<DaemonSet>::all(client.clone()), owned),
    }
}
