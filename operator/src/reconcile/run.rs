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
//! However leading ends (shutdown, an error, lost leadership), everything the
//! leader started is cancelled. Except when leadership was lost (then another
//! replica may lead already, and this one just exits), the Lease is released
//! only after the reconciler, the findings publisher, the Node label follower
//! and the mesh controller have stopped; if they do not within
//! [`STOP_GRACE`], the Lease is left to expire instead.
//!
//! The mesh controller runs with the probing and SLA settings of one
//! `PingMesh` (`--mesh`, default `<pod namespace>/default`), read before it
//! starts; when they change, it restarts in-process with the new ones. Its
//! `topology` and `nodeHealth` settings apply without a restart.

use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::AtomicBool;
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
use super::pods::start_pod_caches;
use super::synced::watched;
use super::{
    Context, MeshHost, MeshPolicy, OperatorSettings, ReconcileMetrics, SourceSettings,
    error_policy, managed_selector, reconcile,
};
use crate::config::{ConfigError, MeshArgs, MeshConfig};
use crate::crd::PingMesh;
use crate::mesh::identity::api_access::{ApiAccess, require_reader};
use crate::mesh::identity::token::TokenReviewAuthenticator;
use crate::mesh::identity::{AgentAuthenticator, Unverified};
use crate::mesh::server::{self, RunningController, ServeError};
use crate::mesh::services::PodResolver;
use crate::mesh::topology::TorResolver;

/// Longest wait for the Node cache before the mesh controller starts anyway.
const NODE_SYNC_LIMIT: Duration = Duration::from_secs(30);
/// Longest wait, when leading ends, for what the leader ran to stop before
/// the Lease is released.
pub const STOP_GRACE: Duration = Duration::from_secs(10);

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
    /// Agents prove their node with a token of this account (docs/security.md).
    #[arg(long, env = "PINGMESH_AGENT_SERVICE_ACCOUNT")]
    pub agent_service_account: Option<String>,
    /// PEM CA bundle agents check the controller's gRPC certificate against
    /// (the `ca.crt` of the controller's TLS Secret). Set: agents dial https://.
    #[arg(long, env = "PINGMESH_AGENT_CA_FILE")]
    pub agent_ca_file: Option<std::path::PathBuf>,
    /// The JSON API (`/api/`) answers only bearer tokens of users who may
    /// get `PingMeshes` (`TokenReview` + `SubjectAccessReview`); `/metrics`,
    /// `/livez`, `/readyz` stay open.
    #[arg(long, env = "PINGMESH_API_AUTH", default_value_t = true, action = clap::ArgAction::Set)]
    pub api_auth: bool,
    /// Agents prove their node with a `pingmesh`-audience token (`TokenReview`).
    /// Off: any caller may act for any node (test clusters, agents outside
    /// the cluster without client certificates).
    #[arg(long, env = "PINGMESH_AGENT_AUTH", default_value_t = true, action = clap::ArgAction::Set)]
    pub agent_auth: bool,
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
        let agent_ca_pem = self.agent_ca_file.as_ref().and_then(|path| {
            std::fs::read_to_string(path)
                .inspect_err(|e| tracing::error!(path = %path.display(), error = %e, "cannot read the agents' CA file"))
                .ok()
        });
        let scheme = if agent_ca_pem.is_some() {
            "https"
        } else {
            "http"
        };
        OperatorSettings {
            controller_url: self.agent_controller_url.clone().unwrap_or_else(|| {
                format!(
                    "{scheme}://pingmesh-operator.{}.svc:{grpc_port}",
                    self.pod_namespace
                )
            }),
            agent_service_account: self.agent_service_account.clone(),
            agent_ca_pem,
            insecure_plaintext: self.mesh.insecure_plaintext.unwrap_or(false),
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
    let access = api_access(&args, &client);
    let http = serve_http(public_addr, http_state.clone(), access, http_stop.clone()).await?;
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
    let (outcome, stopped) =
        match standby_until_leading(config.grpc_addr, roles.clone(), &mut shutdown).await? {
            Waited::Done => {
                metrics.set_leader(true);
                tracing::info!(%public_addr, "leading");
                lead(&args, config, client, &http_state, roles, &mut shutdown).await
            }
            Waited::Shutdown => (Ok(()), Stopped::All),
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
    match (stopped, election) {
        // Only now, with nothing acting any more, may a standby take over.
        (Stopped::All, Some(election)) => {
            election_stop.cancel();
            let _ = election.await;
        }
        (Stopped::NotInTime, Some(election)) => {
            tracing::warn!(
                "not releasing the leader Lease while leader work may still be running; a standby takes over once it expires"
            );
            election.abort();
            let _ = election.await;
        }
        (_, None) => {}
    }
    http_stop.cancel();
    drop(fixed_role);
    match (outcome, http.await) {
        (Err(e), _) => Err(e),
        (Ok(()), Ok(Err(e))) => Err(RunError::Http(e)),
        (Ok(()), _) => Ok(()),
    }
}

/// Whether what the leader ran stopped before the Lease may be released.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Stopped {
    All,
    NotInTime,
}

/// Everything a leader runs. Dropping it cancels all of it (without waiting),
/// so that no way out of [`Led::serve`] leaves leader work running.
struct Led {
    host: Arc<MeshHost>,
    config: MeshConfig,
    /// `None` only while restarting (or after a restart failed).
    running: Option<RunningController>,
    mesh_cancel: CancellationToken,
    tor_resolver: Arc<dyn TorResolver>,
    /// Checks agents' tokens; `None` where the config authenticates them
    /// otherwise (client certificates).
    agent_auth: Option<Arc<dyn AgentAuthenticator>>,
    /// Names services after their pods' owners; set on every controller started.
    pod_resolver: Arc<dyn PodResolver>,
    /// Policies the source asks for, subscribed before the reconciler starts
    /// so that none is missed.
    policies: watch::Receiver<Option<MeshPolicy>>,
    /// The reconciler, the findings publisher, the Node label follower and
    /// the Node cache, by name; all stop on `work`.
    tasks: Vec<(&'static str, JoinHandle<()>)>,
    metrics: ReconcileMetrics,
    /// Stops the reconciler, the Node label follower, the findings publisher
    /// and the Node cache.
    work: CancellationToken,
}

impl Drop for Led {
    fn drop(&mut self) {
        self.work.cancel();
        self.mesh_cancel.cancel();
    }
}

/// Leads: starts what only the leader runs, then serves until shutdown, an
/// error or lost leadership (see [`Led::serve`]).
///
/// Starting can take longer than the renew deadline (the Node cache is waited
/// for up to [`NODE_SYNC_LIMIT`]), so it is raced against losing leadership:
/// once `roles` says lost, starting is abandoned where it stands (whatever had
/// started is cancelled as the half-built leader is dropped), and nothing
/// further is started: no mesh controller, reconciler or publisher runs on a
/// replica that no longer leads.
async fn lead(
    args: &RunArgs,
    config: MeshConfig,
    client: Client,
    http: &OperatorHttp,
    mut roles: watch::Receiver<Role>,
    shutdown: &mut std::pin::Pin<&mut impl std::future::Future<Output = ()>>,
) -> (Result<(), RunError>, Stopped) {
    let started = tokio::select! {
        biased;
        reason = lost(&mut roles) => Err(reason),
        started = start_leading(args, config, client, http) => Ok(started),
    };
    match started {
        Ok(Ok(led)) => led.serve(roles, shutdown).await,
        // What had started is cancelled already (see `start_leading`).
        Ok(Err(e)) => (Err(e), Stopped::All),
        Err(reason) => {
            tracing::error!(%reason, "lost leadership while starting to lead; stopping at once and exiting");
            http.metrics.set_leader(false);
            (Err(RunError::LostLeadership(reason)), Stopped::NotInTime)
        }
    }
}

/// Starts what only the leader runs: the Node cache (synced first, so that
/// agents registering at once get their ToR), the mesh controller with the
/// policy source's settings, the Node label follower, the findings publisher
/// and the reconciler.
#[allow(clippy::too_many_lines)] // wiring, step by step
async fn start_leading(
    args: &RunArgs,
    mut config: MeshConfig,
    client: Client,
    http: &OperatorHttp,
) -> Result<Led, RunError> {
    let (nodes, node_writer) = node_cache();
    let relabeled = Arc::new(RelabeledNodes::default());
    let work = CancellationToken::new();
    let mesh_cancel = CancellationToken::new();
    // Until `Led` takes over: stop what started if starting fails or is
    // abandoned (this future dropped, see `lead`).
    let stop_on_error = (work.clone().drop_guard(), mesh_cancel.clone().drop_guard());
    let reflector = tokio::spawn(reflect_nodes(
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
    let agent_auth = agent_authenticator(&config, &client, args);
    let running = server::start_with_auth(
        config.clone(),
        mesh_cancel.clone(),
        Some(tor_resolver.clone()),
        agent_auth.clone(),
    )
    .await?;
    let (pod_resolver, pod_caches) = start_pod_caches(&client, &work);
    running.controller.set_pod_resolver(pod_resolver.clone());
    let host = Arc::new(MeshHost::with_settings(
        running.controller.clone(),
        format!("{source_ns}/{source_name}"),
        source_settings,
    ));
    let _ = http.hosted.set(host.clone());
    let policies = host.policy_requests();
    let follower = tokio::spawn(follow_node_labels(
        resolver,
        relabeled,
        host.clone(),
        work.clone(),
    ));
    let publisher = tokio::spawn(publish_findings(
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
    let controller = kube_controller(&client, args.watch_namespace.as_deref(), &http.synced)
        .graceful_shutdown_on(work.clone().cancelled_owned());
    let reconciler = tokio::spawn(controller.run(reconcile, error_policy, ctx).for_each(
        |result| async move {
            match result {
                // Reconcile failures are logged, counted and retried by the
                // reconciler itself.
                Ok(_) | Err(kube::runtime::controller::Error::ReconcilerFailed(..)) => {}
                // An owned object whose PingMesh is gone (deleted, and the
                // garbage collector has not removed the object yet).
                Err(e @ kube::runtime::controller::Error::ObjectNotFound(..)) => {
                    tracing::debug!(error = %e, "PingMesh controller");
                }
                Err(e) => tracing::warn!(error = %e, "PingMesh controller"),
            }
        },
    ));
    tracing::info!(grpc_addr = %running.grpc_addr, "operator running");
    let (work_guard, mesh_guard) = stop_on_error;
    work_guard.disarm();
    mesh_guard.disarm();
    let mut led = Led {
        host,
        config,
        running: Some(running),
        mesh_cancel,
        tor_resolver,
        agent_auth,
        pod_resolver,
        policies,
        tasks: vec![
            ("reconciler", reconciler),
            ("findings publisher", publisher),
            ("Node label follower", follower),
            ("Node cache", reflector),
        ],
        metrics: http.metrics.clone(),
        work,
    };
    led.tasks.extend(pod_caches);
    Ok(led)
}

impl Led {
    /// Serves until shutdown or an error (then stops everything and waits for
    /// it, see [`Led::stop`]), or until leadership is lost (then stops acting
    /// at once and returns the error without waiting).
    async fn serve(
        mut self,
        roles: watch::Receiver<Role>,
        shutdown: &mut std::pin::Pin<&mut impl std::future::Future<Output = ()>>,
    ) -> (Result<(), RunError>, Stopped) {
        let mut roles = roles;
        let served = self.serve_until(&mut roles, shutdown).await;
        if let Err(RunError::LostLeadership(_)) = &served {
            // Dropping `self` cancels everything; nothing is waited for.
            return (served, Stopped::NotInTime);
        }
        if let Err(e) = &served {
            tracing::error!(error = %e, "leading failed; stopping");
        }
        let (stopped, outcome) = self.stop(&mut roles).await;
        match outcome {
            Err(lost @ RunError::LostLeadership(_)) => (Err(lost), stopped),
            outcome => (served.and(outcome), stopped),
        }
    }

    async fn serve_until(
        &mut self,
        roles: &mut watch::Receiver<Role>,
        shutdown: &mut std::pin::Pin<&mut impl std::future::Future<Output = ()>>,
    ) -> Result<(), RunError> {
        let mut electing = true;
        loop {
            tokio::select! {
                () = &mut *shutdown => return Ok(()),
                changed = roles.changed(), if electing => {
                    if changed.is_err() {
                        electing = false;
                        continue;
                    }
                    if let Role::Lost { reason } = roles.borrow_and_update().clone() {
                        return Err(self.lose(reason));
                    }
                }
                changed = self.policies.changed() => {
                    let wanted = self.policies.borrow_and_update().clone();
                    let (Ok(()), Some(policy)) = (changed, wanted) else { continue };
                    // A restart waits for the old controller to stop and the
                    // new one to open its registry: leadership can be lost
                    // meanwhile, and then the restart is abandoned.
                    tokio::select! {
                        biased;
                        reason = lost(roles) => return Err(self.lose(reason)),
                        restarted = self.restart_mesh(policy) => restarted?,
                    }
                }
            }
        }
    }

    /// Stops acting at once (without waiting for anything) because leadership
    /// was lost; the error to return.
    fn lose(&mut self, reason: String) -> RunError {
        tracing::error!(%reason, "lost leadership; stopping at once and exiting");
        self.metrics.set_leader(false);
        self.work.cancel();
        self.mesh_cancel.cancel();
        RunError::LostLeadership(reason)
    }

    /// Cancels everything and waits, at most [`STOP_GRACE`], for the tasks
    /// and the mesh controller to end; returns whether they did, and the mesh
    /// controller's outcome. Tasks still running then are aborted, and so
    /// they are at once if leadership is lost meanwhile (the outcome is then
    /// [`RunError::LostLeadership`]).
    async fn stop(&mut self, roles: &mut watch::Receiver<Role>) -> (Stopped, Result<(), RunError>) {
        self.work.cancel();
        self.mesh_cancel.cancel();
        let mut tasks = std::mem::take(&mut self.tasks);
        let running = self.running.take();
        let ended = {
            let all = async {
                for (name, task) in &mut tasks {
                    if let Err(e) = task.await
                        && e.is_panic()
                    {
                        tracing::error!(task = *name, "leader task panicked");
                    }
                }
                match running {
                    Some(running) => running.wait().await.map_err(RunError::from),
                    None => Ok(()),
                }
            };
            tokio::select! {
                waited = tokio::time::timeout(STOP_GRACE, all) => waited.map_err(|_| None),
                reason = lost(roles) => Err(Some(reason)),
            }
        };
        let lost = match ended {
            Ok(outcome) => return (Stopped::All, outcome),
            Err(lost) => lost,
        };
        let late: Vec<&str> = tasks
            .iter()
            .filter(|(_, task)| !task.is_finished())
            .map(|(name, _)| *name)
            .collect();
        for (_, task) in &tasks {
            task.abort();
        }
        if let Some(reason) = lost {
            tracing::error!(%reason, ?late, "lost leadership while stopping; aborting the rest");
            self.metrics.set_leader(false);
            return (Stopped::NotInTime, Err(RunError::LostLeadership(reason)));
        }
        tracing::warn!(?late, grace = ?STOP_GRACE, "leader work did not stop in time; aborted");
        (Stopped::NotInTime, Ok(()))
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
        let running = server::start_with_auth(
            self.config.clone(),
            self.mesh_cancel.clone(),
            Some(self.tor_resolver.clone()),
            self.agent_auth.clone(),
        )
        .await?;
        running
            .controller
            .set_pod_resolver(self.pod_resolver.clone());
        self.host.replace(running.controller.clone());
        self.running = Some(running);
        Ok(())
    }
}

/// Resolves with the reason once `roles` says leadership is lost; never
/// without an election.
async fn lost(roles: &mut watch::Receiver<Role>) -> String {
    match roles
        .wait_for(|r| matches!(r, Role::Lost { .. }))
        .await
        .map(|r| r.clone())
    {
        Ok(Role::Lost { reason }) => reason,
        _ => std::future::pending().await,
    }
}

/// Serves the operator's HTTP port until `stop`.
async fn serve_http(
    addr: SocketAddr,
    state: OperatorHttp,
    access: Option<Arc<ApiAccess>>,
    stop: CancellationToken,
) -> Result<JoinHandle<Result<(), std::io::Error>>, RunError> {
    let mut router = operator_router(state);
    if let Some(access) = access {
        router = router.layer(axum::middleware::from_fn_with_state(access, require_reader));
    }
    let listener = TcpListener::bind(addr)
        .await
        .map_err(|source| RunError::Bind {
            what: "HTTP",
            addr,
            source,
        })?;
    Ok(tokio::spawn(
        axum::serve(listener, router)
            .with_graceful_shutdown(stop.cancelled_owned())
            .into_future(),
    ))
}

/// The JSON API's check: readers of the mesh's `PingMesh`, unless
/// `--api-auth=false` (docs/security.md).
fn api_access(args: &RunArgs, client: &Client) -> Option<Arc<ApiAccess>> {
    args.api_auth.then(|| {
        let (namespace, _) = args.policy_source();
        Arc::new(ApiAccess::new(client.clone(), namespace))
    })
}

/// In a cluster agents prove their node with a projected token checked by
/// `TokenReview`, unless the config asks for client certificates instead.
fn agent_authenticator(
    config: &MeshConfig,
    client: &Client,
    args: &RunArgs,
) -> Option<Arc<dyn AgentAuthenticator>> {
    let certificates = config
        .grpc_tls
        .as_ref()
        .is_some_and(|t| t.client_ca_file.is_some());
    if !args.agent_auth {
        tracing::warn!("--agent-auth=false: agents are not authenticated and may act for any node");
        return Some(Arc::new(Unverified));
    }
    (!certificates).then(|| {
        let account = args.agent_service_account.as_deref().unwrap_or("default");
        Arc::new(TokenReviewAuthenticator::new(client.clone(), account))
            as Arc<dyn AgentAuthenticator>
    })
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
    config.traces = policy.traces;
}

/// The `PingMesh` controller, watching owned objects by label only (the cache
/// holds ours, not every `ConfigMap` of the cluster). `synced` rises once the
/// `PingMesh` cache holds the whole initial list (see `synced`).
fn kube_controller(
    client: &Client,
    namespace: Option<&str>,
    synced: &Arc<AtomicBool>,
) -> Controller<PingMesh> {
    let owned = watcher::Config::default().labels(&managed_selector());
    let meshes = match namespace {
        Some(ns) => Api::<PingMesh>::namespaced(client.clone(), ns),
        None => Api::<PingMesh>::all(client.clone()),
    };
    let (trigger, store) = watched(
        meshes,
        watcher::Config::default(),
        synced.clone(),
        "PingMesh",
    );
    let controller = Controller::for_stream(trigger, store);
    match namespace {
        Some(ns) => controller
            .owns(
                Api::<ConfigMap>::namespaced(client.clone(), ns),
                owned.clone(),
            )
            .owns(Api::<DaemonSet>::namespaced(client.clone(), ns), owned),
        None => controller
            .owns(Api::<ConfigMap>::all(client.clone()), owned.clone())
            .owns(Api::<DaemonSet>::all(client.clone()), owned),
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};

    use super::*;
    use crate::crd::TopologySpec;
    use crate::mesh::controller::MeshController;
    use crate::mesh::registry::open_registry;

    /// A Pod cache that knows no pod.
    #[derive(Debug)]
    struct NoPods;

    impl PodResolver for NoPods {
        fn pod(&self, _: &str) -> Option<crate::mesh::services::PodIdentity> {
            None
        }
    }

    /// A leader with no mesh controller running (as after a failed restart)
    /// and no tasks; the mesh controller restarts on a registry that cannot
    /// be opened.
    async fn led(dir: &tempfile::TempDir) -> Led {
        let config = MeshConfig {
            registry: format!("sqlite://{}", dir.path().join("registry.db").display()),
            ..MeshConfig::default()
        };
        let registry = open_registry(&config.registry).await.unwrap();
        let controller = MeshController::new(config.clone(), registry).await.unwrap();
        let (nodes, _writer) = node_cache();
        let host = Arc::new(MeshHost::new(controller, "ns/default".to_owned()));
        Led {
            policies: host.policy_requests(),
            host,
            config: MeshConfig {
                registry: "nosuchstore://here".to_owned(),
                ..config
            },
            running: None,
            mesh_cancel: CancellationToken::new(),
            tor_resolver: Arc::new(NodeTorResolver::new(nodes, TopologySpec::default())),
            agent_auth: None,
            pod_resolver: Arc::new(NoPods),
            tasks: Vec::new(),
            metrics: ReconcileMetrics::new().unwrap(),
            work: CancellationToken::new(),
        }
    }

    /// A task that, once `work` is cancelled, takes `linger` to finish and
    /// then counts itself in `finished`.
    fn lingering(
        work: &CancellationToken,
        linger: Duration,
        finished: &Arc<AtomicUsize>,
    ) -> JoinHandle<()> {
        let (work, finished) = (work.clone(), finished.clone());
        tokio::spawn(async move {
            work.cancelled().await;
            tokio::time::sleep(linger).await;
            finished.fetch_add(1, Ordering::SeqCst);
        })
    }

    /// A client whose requests are recorded (`METHOD path?query`) and never
    /// answered, as if the API server hung.
    fn unanswering_client() -> (Client, Arc<std::sync::Mutex<Vec<String>>>) {
        let (service, mut handle) = tower_test::mock::pair::<
            http::Request<kube::client::Body>,
            http::Response<kube::client::Body>,
        >();
        let seen = Arc::new(std::sync::Mutex::new(Vec::new()));
        tokio::spawn({
            let seen = seen.clone();
            async move {
                let mut unanswered = Vec::new();
                while let Some((request, respond)) = handle.next_request().await {
                    seen.lock()
                        .unwrap()
                        .push(format!("{} {}", request.method(), request.uri()));
                    unanswered.push(respond);
                }
            }
        });
        (Client::new(service, "default"), seen)
    }

    #[derive(Debug, clap::Parser)]
    struct Cli {
        #[command(flatten)]
        run: RunArgs,
    }

    #[tokio::test(start_paused = true)]
    async fn leadership_lost_while_starting_to_lead_starts_no_leader_work() {
        // The Node list never comes back, so starting waits for it up to
        // NODE_SYNC_LIMIT (30 s); the Lease is lost after 10 s meanwhile.
        let dir = tempfile::tempdir().unwrap();
        let (client, seen) = unanswering_client();
        let args = <Cli as clap::Parser>::try_parse_from(["run", "--pod-namespace", "ns"])
            .unwrap()
            .run;
        let config = MeshConfig {
            grpc_addr: SocketAddr::from(([127, 0, 0, 1], 0)),
            http_addr: SocketAddr::from(([127, 0, 0, 1], 0)),
            registry: format!("sqlite://{}", dir.path().join("registry.db").display()),
            ..MeshConfig::default()
        };
        let (roles_tx, roles) = watch::channel(Role::Leader);
        let http = OperatorHttp {
            hosted: Arc::new(OnceLock::new()),
            metrics: ReconcileMetrics::new().unwrap(),
            synced: Arc::new(AtomicBool::new(false)),
            role: roles.clone(),
        };
        http.metrics.set_leader(true);
        let started = tokio::time::Instant::now();
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_secs(10)).await;
            roles_tx.send_replace(Role::Lost {
                reason: "could not renew".to_owned(),
            });
            std::future::pending::<()>().await;
        });
        let shutdown = std::future::pending::<()>();
        tokio::pin!(shutdown);

        let (outcome, stopped) = tokio::time::timeout(
            Duration::from_mins(2),
            lead(&args, config, client, &http, roles, &mut shutdown),
        )
        .await
        .expect("leading ends once leadership is lost");

        assert!(
            matches!(outcome, Err(RunError::LostLeadership(_))),
            "{outcome:?}"
        );
        assert_eq!(stopped, Stopped::NotInTime, "the Lease is not released");
        assert_eq!(started.elapsed(), Duration::from_secs(10), "at once");
        assert!(http.hosted.get().is_none(), "no mesh controller started");
        // Only the Node cache asked for anything: no PingMesh read or watch,
        // no reconciler.
        tokio::time::sleep(Duration::from_mins(1)).await;
        let seen = seen.lock().unwrap().clone();
        assert!(!seen.is_empty());
        assert!(
            seen.iter().all(|r| r.starts_with("GET /api/v1/nodes")),
            "{seen:?}"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn leadership_lost_while_the_mesh_controller_restarts_stops_at_once() {
        let dir = tempfile::tempdir().unwrap();
        let mut led = led(&dir).await;
        // The new controller's registry refuses connections: opening it is
        // retried for 15 s before the restart gives up.
        let refused = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap();
        led.config.registry = format!("rqlite://{refused}");
        let finished = Arc::new(AtomicUsize::new(0));
        let stuck = tokio::spawn(std::future::pending::<()>());
        led.tasks = vec![
            (
                "publisher",
                lingering(&led.work, Duration::from_secs(1), &finished),
            ),
            ("stuck", stuck),
        ];
        let (work, mesh) = (led.work.clone(), led.mesh_cancel.clone());
        let pm: PingMesh = serde_json::from_value(serde_json::json!({
            "apiVersion": "pingmesh.io/v1alpha1", "kind": "PingMesh",
            "metadata": {"name": "default", "namespace": "ns"},
            "spec": {"sla": {"maxLossRatio": 0.05}},
        }))
        .unwrap();
        let (roles_tx, roles) = watch::channel(Role::Leader);
        assert_eq!(
            super::super::MeshStatusSource::sync_policy(&*led.host, &pm),
            super::super::PolicyState::Restarting
        );
        let started = tokio::time::Instant::now();
        let serving = tokio::spawn(async move {
            let shutdown = std::future::pending::<()>();
            tokio::pin!(shutdown);
            led.serve(roles, &mut shutdown).await
        });
        tokio::time::sleep(Duration::from_secs(2)).await;
        assert!(!serving.is_finished(), "still restarting");
        roles_tx.send_replace(Role::Lost {
            reason: "could not renew".to_owned(),
        });

        let (outcome, stopped) = serving.await.unwrap();
        assert!(
            matches!(outcome, Err(RunError::LostLeadership(_))),
            "{outcome:?}"
        );
        assert_eq!(stopped, Stopped::NotInTime, "nothing is waited for");
        assert_eq!(started.elapsed(), Duration::from_secs(2), "at once");
        assert!(work.is_cancelled() && mesh.is_cancelled());
    }

    #[tokio::test]
    async fn dropping_a_leader_cancels_everything_it_runs() {
        let dir = tempfile::tempdir().unwrap();
        let led = led(&dir).await;
        let (work, mesh) = (led.work.clone(), led.mesh_cancel.clone());
        drop(led);
        assert!(work.is_cancelled() && mesh.is_cancelled());
    }

    #[tokio::test(start_paused = true)]
    async fn stopping_waits_for_every_leader_task_to_end() {
        let dir = tempfile::tempdir().unwrap();
        let mut led = led(&dir).await;
        let finished = Arc::new(AtomicUsize::new(0));
        led.tasks = vec![
            ("a", lingering(&led.work, Duration::from_secs(1), &finished)),
            ("b", lingering(&led.work, Duration::from_secs(3), &finished)),
        ];
        let (_roles_tx, mut roles) = watch::channel(Role::Leader);
        let (stopped, outcome) = led.stop(&mut roles).await;
        assert_eq!(stopped, Stopped::All);
        assert!(outcome.is_ok());
        assert_eq!(finished.load(Ordering::SeqCst), 2);
    }

    #[tokio::test(start_paused = true)]
    async fn a_task_that_does_not_stop_in_time_is_reported_so_the_lease_is_kept() {
        let dir = tempfile::tempdir().unwrap();
        let mut led = led(&dir).await;
        let finished = Arc::new(AtomicUsize::new(0));
        let stuck = tokio::spawn(std::future::pending::<()>());
        led.tasks = vec![
            ("quick", lingering(&led.work, Duration::ZERO, &finished)),
            ("stuck", stuck),
        ];
        let started = tokio::time::Instant::now();
        let (_roles_tx, mut roles) = watch::channel(Role::Leader);
        let (stopped, _) = led.stop(&mut roles).await;
        assert_eq!(stopped, Stopped::NotInTime);
        assert_eq!(started.elapsed(), STOP_GRACE);
        assert_eq!(finished.load(Ordering::SeqCst), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn leadership_lost_while_stopping_aborts_what_still_runs_at_once() {
        let dir = tempfile::tempdir().unwrap();
        let mut led = led(&dir).await;
        led.tasks = vec![("stuck", tokio::spawn(std::future::pending::<()>()))];
        let (roles_tx, mut roles) = watch::channel(Role::Leader);
        let started = tokio::time::Instant::now();
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_secs(1)).await;
            roles_tx.send_replace(Role::Lost {
                reason: "renewals failed".to_owned(),
            });
            // Keep the channel open.
            std::future::pending::<()>().await;
        });
        let (stopped, outcome) = led.stop(&mut roles).await;
        assert_eq!(stopped, Stopped::NotInTime);
        assert!(
            matches!(outcome, Err(RunError::LostLeadership(_))),
            "{outcome:?}"
        );
        assert_eq!(started.elapsed(), Duration::from_secs(1));
    }

    #[tokio::test(start_paused = true)]
    async fn a_failed_mesh_controller_restart_stops_all_leader_work_before_returning() {
        let dir = tempfile::tempdir().unwrap();
        let mut led = led(&dir).await;
        let finished = Arc::new(AtomicUsize::new(0));
        led.tasks = vec![(
            "publisher",
            lingering(&led.work, Duration::from_secs(1), &finished),
        )];
        let (work, mesh) = (led.work.clone(), led.mesh_cancel.clone());
        // The policy source asks for other SLA settings: the mesh controller
        // restarts, on a registry that cannot be opened.
        let pm: PingMesh = serde_json::from_value(serde_json::json!({
            "apiVersion": "pingmesh.io/v1alpha1", "kind": "PingMesh",
            "metadata": {"name": "default", "namespace": "ns"},
            "spec": {"sla": {"maxLossRatio": 0.05}},
        }))
        .unwrap();
        let (_roles_tx, roles) = watch::channel(Role::Leader);
        let host = led.host.clone();
        assert_eq!(
            super::super::MeshStatusSource::sync_policy(&*host, &pm),
            super::super::PolicyState::Restarting
        );
        let serving = tokio::spawn(async move {
            let shutdown = std::future::pending::<()>();
            tokio::pin!(shutdown);
            led.serve(roles, &mut shutdown).await
        });

        let (outcome, stopped) = tokio::time::timeout(Duration::from_secs(30), serving)
            .await
            .unwrap()
            .unwrap();
        assert!(matches!(outcome, Err(RunError::Mesh(_))), "{outcome:?}");
        assert_eq!(stopped, Stopped::All);
        assert!(work.is_cancelled() && mesh.is_cancelled());
        assert_eq!(
            finished.load(Ordering::SeqCst),
            1,
            "the task was waited for"
        );
    }
}
