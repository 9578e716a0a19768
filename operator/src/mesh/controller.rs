//! The mesh controller's state and behaviour, independent of how it is reached
//! (gRPC for agents, HTTP for people and dashboards).
//!
//! Membership is persistent (the registry); presence is in memory: an agent is
//! present while its pinglist stream is open. Pinglists only name present
//! endpoints, so an agent that dies leaves every pinglist as soon as its
//! connection drops, and the analyzer does not blame the network for probes to
//! an agent that was not up for the whole window.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use pingmesh_proto::limits::{MAX_ENDPOINTS_PER_NODE, MAX_SUMMARIES_PER_REPORT, is_valid_id};
use pingmesh_proto::v1::{self, Transport};
use pingmesh_proto::window::{unix_now_ms, window_start};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use super::analyzer::{
    Analyzer, EndpointPlacement, Finding, FindingKind, IngestError, Ingested, Intake, WindowReport,
};
use super::history::WindowHistory;
use super::localize::{CauseKind, OpenRootCause, Signal};
use super::metrics::{ControllerMetrics, WINDOW_PHASES};
use super::pinglist::MeshView;
use super::registry::{Registry, RegistryError, TorMove};
use super::services::metrics::ServiceMetrics;
use super::services::{PodResolver, ServiceTargets};
use super::topology::{TorResolver, choose_tor};
use super::traces::{ProbedPath, TracePlanner};
use super::types::{AgentRecord, MeshEndpoint};
use crate::config::MeshConfig;

mod presence;
mod services;
#[cfg(test)]
mod tests;

use presence::Presence;

pub use services::FlowsOutcome;

/// How often presence is written to the registry (`last_seen`) for connected agents.
const PERSIST_PRESENCE_EVERY: Duration = Duration::from_secs(15);

/// Once the background task runs, membership changes are published at most
/// this often: a fleet reconnecting after a restart then rebuilds the
/// affected ToRs and wakes the pinglist streams a few times a second, not
/// once per agent (which made a fleet-wide reconnect quadratic).
const PUBLISH_EVERY: Duration = Duration::from_millis(200);

#[derive(Debug, thiserror::Error)]
pub enum MeshError {
    #[error("{0}")]
    InvalidRequest(String),
    #[error("node {0} is not registered; register first")]
    UnknownNode(String),
    #[error("node {node} registered again (session {current}); this session ({given}) is over")]
    StaleSession {
        node: String,
        current: u64,
        given: u64,
    },
    #[error("endpoint {endpoint} belongs to node {owner}")]
    Conflict { endpoint: String, owner: String },
    #[error("registry unavailable: {0}")]
    Registry(#[from] RegistryError),
}

impl MeshError {
    pub fn category(&self) -> &'static str {
        match self {
            Self::InvalidRequest(_) => "invalid_request",
            Self::UnknownNode(_) => "unknown_node",
            Self::StaleSession { .. } => "stale_session",
            Self::Conflict { .. } => "endpoint_conflict",
            Self::Registry(e) => e.category(),
        }
    }
}

/// What every pinglist stream computes its list from; replaced on every change.
#[derive(Debug)]
pub struct Snapshot {
    pub version: u64,
    pub rotation_epoch: u64,
    /// The probe keys every pinglist carries (`None` without probe
    /// authentication), derived once per publish, not once per stream.
    pub probe_keys: Option<v1::ProbeKeys>,
    pub view: Arc<MeshView>,
    /// Each node's service targets (see `mesh::services`).
    pub services: Arc<ServiceTargets>,
}

#[derive(Debug, Default)]
struct State {
    presence: HashMap<String, Presence>,
    /// Every registered endpoint (present or not): the analyzer's topology.
    /// Shared with the window being judged, copied on write meanwhile.
    endpoints: Arc<HashMap<String, MeshEndpoint>>,
    /// Nodes whose endpoints or presence changed since the last publish.
    dirty: HashSet<String>,
    version: u64,
    rotation_epoch: u64,
    key_epoch: u64,
}

impl State {
    /// Endpoints for a change of membership; marks the node for the next publish.
    fn endpoints_mut(&mut self, node: &str) -> &mut HashMap<String, MeshEndpoint> {
        self.dirty.insert(node.to_owned());
        Arc::make_mut(&mut self.endpoints)
    }
}

/// What the last judged window left open, readable while the next is judged.
#[derive(Debug, Default)]
struct Verdicts {
    findings: Vec<Finding>,
    root_causes: Vec<OpenRootCause>,
    last_report: Option<Arc<WindowReport>>,
}

#[derive(Debug)]
pub struct MeshController {
    config: MeshConfig,
    registry: Arc<dyn Registry>,
    /// Where ToRs come from when agents name none; `None`: the default ToR.
    tor_resolver: Option<Arc<dyn TorResolver>>,
    state: Mutex<State>,
    snapshot: watch::Sender<Arc<Snapshot>>,
    /// Derives the probe keys handed out with pinglists; `None`: probes are
    /// not authenticated (docs/security.md).
    probe_keys: Option<super::probe_keys::ProbeKeySchedule>,
    /// The view last published; held while publishing, so publishes apply
    /// their changes in the order they took them.
    view: Mutex<Arc<MeshView>>,
    /// Set once the background task paces publishes (see [`PUBLISH_EVERY`]);
    /// until then every change publishes at once.
    paced: std::sync::atomic::AtomicBool,
    publish_wanted: tokio::sync::Notify,
    /// Summaries of windows not closed yet: reports take only this lock.
    intake: Mutex<Intake>,
    /// Judges closed windows, on a blocking thread, without `intake` or `state`.
    analyzer: Mutex<Analyzer>,
    verdicts: Mutex<Verdicts>,
    /// Which flows agents should trace, and the hops they found.
    traces: Mutex<TracePlanner>,
    /// Cancelled on shutdown: ends every pinglist stream so the server can stop.
    stopping: CancellationToken,
    /// Windows judged since this controller started that had path data.
    windows_with_data: AtomicU64,
    /// Nanoseconds spent taking summaries in since the last judged window
    /// (the `ingest` phase of `pingmesh_window_processing_seconds`).
    ingest_ns: AtomicU64,
    pub metrics: ControllerMetrics,
    /// Service flows, targets and impact (see `controller/services.rs`).
    services: Mutex<services::ServiceState>,
    /// Names the services of pods; the operator sets it (`set_pod_resolver`).
    pod_resolver: std::sync::RwLock<Option<Arc<dyn PodResolver>>>,
    service_metrics: ServiceMetrics,
    /// Closed windows of the last hour, for the web view.
    pub history: WindowHistory,
}

/// Trace results one `ExchangeTraces` call may carry.
const MAX_TRACE_RESULTS: usize = 1_024;

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// Summary of one `ReportWindows` call.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ReportOutcome {
    pub accepted: u32,
    pub duplicates: u32,
    pub rejected: u32,
}

impl MeshController {
    /// Opens the controller on an already-open registry and loads its contents.
    /// Endpoints whose agent names no ToR get the default ToR.
    pub async fn new(
        config: MeshConfig,
        registry: Arc<dyn Registry>,
    ) -> Result<Arc<Self>, MeshError> {
        Self::with_tor_resolver(config, registry, None).await
    }

    /// Like [`MeshController::new`], with ToRs of endpoints whose agent names
    /// none taken from `tor_resolver` (see [`MeshController::refresh_tors`]).
    pub async fn with_tor_resolver(
        config: MeshConfig,
        registry: Arc<dyn Registry>,
        tor_resolver: Option<Arc<dyn TorResolver>>,
    ) -> Result<Arc<Self>, MeshError> {
        let metrics = ControllerMetrics::new()
            .map_err(|e| MeshError::InvalidRequest(format!("metrics setup: {e}")))?;
        initialize_series(&metrics);
        let service_metrics = ServiceMetrics::new(metrics.registry())
            .map_err(|e| MeshError::InvalidRequest(format!("metrics setup: {e}")))?;
        let probe_keys = (config.probe_auth.as_ref())
            .map(super::probe_keys::ProbeKeySchedule::load)
            .transpose()
            .map_err(|e| MeshError::InvalidRequest(e.to_string()))?;
        let endpoints = registry.endpoints().await?;
        let state = State {
            endpoints: Arc::new(endpoints.into_iter().map(|e| (e.id.clone(), e)).collect()),
            rotation_epoch: config.pinglist.rotation_epoch(unix_now_ms()),
            key_epoch: probe_keys.as_ref().map_or(0, |k| k.epoch(unix_now_ms())),
            ..State::default()
        };
        let (snapshot, _) = watch::channel(Arc::new(Snapshot {
            version: 0,
            rotation_epoch: state.rotation_epoch,
            probe_keys: (probe_keys.as_ref()).map(|k| k.keys(state.key_epoch)),
            view: Arc::default(),
            services: Arc::default(),
        }));
        let traces = TracePlanner::new(config.traces.clone(), Some(metrics.registry()))
            .map_err(|e| MeshError::InvalidRequest(e.to_string()))?;
        let analyzer = Analyzer::new(config.sla.clone(), config.pinglist.window_ms)
            .map_err(|e| MeshError::InvalidRequest(format!("SLA policy: {e}")))?;
        let intake = Intake::new(config.pinglist.window_ms);
        let controller = Arc::new(Self {
            config,
            registry,
            tor_resolver,
            state: Mutex::new(state),
            snapshot,
            probe_keys,
            view: Mutex::default(),
            paced: std::sync::atomic::AtomicBool::new(false),
            publish_wanted: tokio::sync::Notify::new(),
            intake: Mutex::new(intake),
            analyzer: Mutex::new(analyzer),
            verdicts: Mutex::default(),
            traces: Mutex::new(traces),
            stopping: CancellationToken::new(),
            windows_with_data: AtomicU64::new(0),
            ingest_ns: AtomicU64::new(0),
            services: Mutex::default(),
            pod_resolver: std::sync::RwLock::new(None),
            service_metrics,
            metrics,
            history: WindowHistory::default(),
        });
        controller.publish();
        Ok(controller)
    }

    pub fn config(&self) -> &MeshConfig {
        &self.config
    }

    /// Validates and stores a node's endpoints; returns the new session and the
    /// endpoints as stored (ToR resolved).
    pub async fn register(
        &self,
        node: &str,
        agent_version: &str,
        endpoints: &[v1::Endpoint],
    ) -> Result<(u64, Vec<MeshEndpoint>), MeshError> {
        let resolved = self.validate_registration(node, endpoints)?;
        let session = loop {
            let s: u64 = rand::random();
            if s != 0 {
                break s;
            }
        };
        let now = unix_now_ms();
        let version = agent_version.chars().take(64).collect::<String>();
        match self
            .registry
            .register(node, &version, session, &resolved, now)
            .await
        {
            Ok(()) => {}
            Err(RegistryError::EndpointConflict { endpoint, owner }) => {
                self.metrics
                    .registrations
                    .with_label_values(&["conflict"])
                    .inc();
                return Err(MeshError::Conflict { endpoint, owner });
            }
            Err(e) => {
                self.metrics
                    .registrations
                    .with_label_values(&["error"])
                    .inc();
                self.metrics
                    .registry_errors
                    .with_label_values(&[e.category()])
                    .inc();
                return Err(e.into());
            }
        }
        self.metrics.registrations.with_label_values(&["ok"]).inc();
        {
            let mut state = lock(&self.state);
            let endpoints = state.endpoints_mut(node);
            endpoints.retain(|_, e| e.node != node);
            for e in &resolved {
                endpoints.insert(e.id.clone(), e.clone());
            }
            let p = state.presence.entry(node.to_owned()).or_default();
            p.registered(session, now);
            p.persisted_ms = now;
        }
        self.publish();
        tracing::info!(
            node,
            session,
            endpoints = resolved.len(),
            "agent registered"
        );
        Ok((session, resolved))
    }

    fn validate_registration(
        &self,
        node: &str,
        endpoints: &[v1::Endpoint],
    ) -> Result<Vec<MeshEndpoint>, MeshError> {
        let invalid = |m: String| Err(MeshError::InvalidRequest(m));
        if !is_valid_id(node) {
            return invalid(format!("node name {node:?} is not a valid identifier"));
        }
        if endpoints.is_empty() || endpoints.len() > MAX_ENDPOINTS_PER_NODE {
            return invalid(format!(
                "a node registers 1 to {MAX_ENDPOINTS_PER_NODE} endpoints, not {}",
                endpoints.len()
            ));
        }
        let mut out = Vec::with_capacity(endpoints.len());
        for e in endpoints {
            if !is_valid_id(&e.id) || !e.id.starts_with(&format!("{node}/")) {
                return invalid(format!("endpoint id {:?} must be \"{node}/<name>\"", e.id));
            }
            if out.iter().any(|o: &MeshEndpoint| o.id == e.id) {
                return invalid(format!("endpoint id {:?} is listed twice", e.id));
            }
            match Transport::try_from(e.transport) {
                Ok(Transport::Udp) => {
                    if e.address.parse::<std::net::SocketAddr>().is_err() {
                        return invalid(format!(
                            "UDP endpoint {} has address {:?}, not ip:port",
                            e.id, e.address
                        ));
                    }
                }
                Ok(Transport::Rdma) => {
                    if e.address.parse::<std::net::Ipv6Addr>().is_err() || e.qpn == 0 {
                        return invalid(format!("RDMA endpoint {} needs a GID and a QPN", e.id));
                    }
                }
                _ => {
                    return invalid(format!(
                        "endpoint {} has unknown transport {}",
                        e.id, e.transport
                    ));
                }
            }
            if !e.tor.is_empty() && !is_valid_id(&e.tor) {
                return invalid(format!(
                    "endpoint {} has ToR {:?}, not a valid name",
                    e.id, e.tor
                ));
            }
            if !e.device.is_empty() && !is_valid_id(&e.device) {
                return invalid(format!(
                    "endpoint {} has device {:?}, not a valid name",
                    e.id, e.device
                ));
            }
            let tor_from_agent = !e.tor.is_empty();
            let tor = if tor_from_agent {
                e.tor.clone()
            } else {
                self.resolve_tor(&e.id, node, &e.device)
                    .unwrap_or_else(|| self.config.default_tor.clone())
            };
            out.push(MeshEndpoint {
                id: e.id.clone(),
                node: node.to_owned(),
                tor,
                transport: e.transport,
                address: e.address.clone(),
                qpn: e.qpn,
                device: e.device.clone(),
                tor_from_agent,
            });
        }
        Ok(out)
    }

    /// The ToR the resolver gives `endpoint` (the default ToR when no candidate
    /// is valid); `None` without a resolver or when it does not know `node`.
    /// Invalid candidates are logged and counted.
    fn resolve_tor(&self, endpoint: &str, node: &str, device: &str) -> Option<String> {
        let candidates = self.tor_resolver.as_ref()?.candidates(node, device)?;
        let chosen = choose_tor(candidates, &self.config.default_tor);
        for rejected in &chosen.rejected {
            self.metrics.invalid_tor_labels.inc();
            tracing::warn!(
                endpoint,
                node,
                source = %rejected.source,
                value = %rejected.value.escape_debug(),
                tor = %chosen.tor,
                "ToR label value is not a valid name; falling back"
            );
        }
        Some(chosen.tor)
    }

    /// What the resolver says now for one endpoint, without logging: `None`
    /// when it has no opinion or agrees with the endpoint's ToR.
    fn moved_tor(&self, endpoint: &MeshEndpoint) -> Option<String> {
        if endpoint.tor_from_agent {
            return None;
        }
        let candidates = self
            .tor_resolver
            .as_ref()?
            .candidates(&endpoint.node, &endpoint.device)?;
        let chosen = choose_tor(candidates, &self.config.default_tor);
        (chosen.tor != endpoint.tor).then_some(chosen.tor)
    }

    /// Asks the resolver again for the ToR of every endpoint whose agent named
    /// none (on `nodes` only, when given) and moves those whose answer changed:
    /// in the registry first, then in the pinglists. Agents need not register
    /// again. Returns how many endpoints moved; a registry failure moves none
    /// (the next refresh tries again).
    pub async fn refresh_tors(&self, nodes: Option<&[String]>) -> Result<usize, MeshError> {
        if self.tor_resolver.is_none() {
            return Ok(0);
        }
        // A set: at leader start every node is relabeled, and this runs
        // under the state lock for every endpoint.
        let only: Option<HashSet<&str>> = nodes.map(|n| n.iter().map(String::as_str).collect());
        let wanted: Vec<(MeshEndpoint, String)> = {
            let state = lock(&self.state);
            state
                .endpoints
                .values()
                .filter(|e| {
                    only.as_ref()
                        .is_none_or(|only| only.contains(e.node.as_str()))
                })
                .filter_map(|e| self.moved_tor(e).map(|tor| (e.clone(), tor)))
                .collect()
        };
        if wanted.is_empty() {
            return Ok(0);
        }
        // Resolve again with logging, now that a change is certain: invalid
        // labels are reported when they change something, not on every refresh.
        let moves: Vec<TorMove> = wanted
            .iter()
            .map(|(e, tor)| TorMove {
                endpoint: e.id.clone(),
                tor: self
                    .resolve_tor(&e.id, &e.node, &e.device)
                    .unwrap_or_else(|| tor.clone()),
            })
            .collect();
        if let Err(e) = self.registry.set_tors(&moves).await {
            self.metrics
                .registry_errors
                .with_label_values(&[e.category()])
                .inc();
            return Err(e.into());
        }
        let mut changed = 0;
        {
            let mut state = lock(&self.state);
            for (m, (before, _)) in moves.iter().zip(&wanted) {
                // Registered again meanwhile: the registration resolved its own ToR.
                let Some(current) = state.endpoints.get(&m.endpoint) else {
                    continue;
                };
                if current.tor_from_agent || current.tor != before.tor || current.tor == m.tor {
                    continue;
                }
                let node = current.node.clone();
                let Some(current) = state.endpoints_mut(&node).get_mut(&m.endpoint) else {
                    continue;
                };
                tracing::info!(endpoint = %m.endpoint, from = %current.tor, to = %m.tor, "endpoint moved to another ToR");
                current.tor.clone_from(&m.tor);
                changed += 1;
            }
        }
        if changed > 0 {
            self.metrics
                .tor_changes
                .inc_by(u64::try_from(changed).unwrap_or(u64::MAX));
            self.publish();
        }
        Ok(changed)
    }

    /// Every registered endpoint, present or not, as this controller holds it
    /// (no registry round trip), sorted by id.
    pub fn known_endpoints(&self) -> Vec<MeshEndpoint> {
        let mut all: Vec<MeshEndpoint> = lock(&self.state).endpoints.values().cloned().collect();
        all.sort_by(|a, b| a.id.cmp(&b.id));
        all
    }

    /// Checks that `session` is the node's current one.
    pub async fn check_session(&self, node: &str, session: u64) -> Result<(), MeshError> {
        let known = lock(&self.state).presence.get(node).map(|p| p.session);
        let current = match known {
            Some(s) if s != 0 => s,
            // Not seen since this controller started: the registry may know it.
            _ => match self.registry.agent(node).await? {
                Some(record) => {
                    lock(&self.state)
                        .presence
                        .entry(node.to_owned())
                        .or_default()
                        .session = record.session;
                    record.session
                }
                None => return Err(MeshError::UnknownNode(node.to_owned())),
            },
        };
        if current == session {
            Ok(())
        } else {
            Err(MeshError::StaleSession {
                node: node.to_owned(),
                current,
                given: session,
            })
        }
    }

    /// Marks the node present while the returned guard lives.
    pub fn connect(self: &Arc<Self>, node: &str, session: u64) -> PresenceGuard {
        {
            let mut state = lock(&self.state);
            state.dirty.insert(node.to_owned());
            let p = state.presence.entry(node.to_owned()).or_default();
            p.connect(session, unix_now_ms());
        }
        self.publish();
        tracing::info!(node, session, "agent connected");
        PresenceGuard {
            controller: self.clone(),
            node: node.to_owned(),
            session,
        }
    }

    fn disconnect(&self, node: &str, session: u64) {
        {
            let mut state = lock(&self.state);
            state.dirty.insert(node.to_owned());
            if let Some(p) = state.presence.get_mut(node) {
                p.disconnect(session, unix_now_ms());
            }
        }
        self.publish();
        tracing::info!(node, "agent disconnected");
    }

    /// The session a node is in now (0: none).
    pub fn current_session(&self, node: &str) -> u64 {
        lock(&self.state)
            .presence
            .get(node)
            .map_or(0, |p| p.session)
    }

    /// Ends every pinglist stream (agents reconnect to the next controller).
    pub fn shutdown(&self) {
        self.stopping.cancel();
    }

    /// Resolves once [`MeshController::shutdown`] was called.
    pub async fn stopping(&self) {
        self.stopping.cancelled().await;
    }

    pub fn subscribe(&self) -> watch::Receiver<Arc<Snapshot>> {
        self.snapshot.subscribe()
    }

    /// The pinglist of `node` in `snapshot`. Streams skip recomputing it when
    /// [`MeshController::pinglist_may_differ`] says no: whatever the list
    /// depends on must come from the snapshot (or the fixed config) and be
    /// compared there.
    pub fn pinglist(&self, node: &str, snapshot: &Snapshot) -> v1::Pinglist {
        let mut list = snapshot.view.pinglist(
            node,
            &self.config.pinglist,
            snapshot.rotation_epoch,
            snapshot.version,
        );
        if let Some(targets) = snapshot.services.get(node) {
            snapshot.view.add_service_targets(
                node,
                targets,
                &self.config.pinglist,
                &mut list.targets,
            );
        }
        list.probe_keys.clone_from(&snapshot.probe_keys);
        list
    }

    /// Whether `node`'s pinglist in `after` can differ from the one in
    /// `before` in more than its version: `false` lets a pinglist stream skip
    /// recomputing its list when a publish changed only ToRs its list does
    /// not draw on. Errs towards `true`.
    pub fn pinglist_may_differ(&self, node: &str, before: &Snapshot, after: &Snapshot) -> bool {
        // Exhaustive on purpose: a field added to the snapshot feeds the
        // lists, so it must be compared here before this compiles again.
        let Snapshot {
            version: _,
            rotation_epoch,
            probe_keys,
            view,
            services,
        } = after;
        *rotation_epoch != before.rotation_epoch
            || *probe_keys != before.probe_keys
            // Service targets resolve to endpoints anywhere in the mesh.
            || services.contains_key(node)
            || before.services.contains_key(node)
            || view.pinglist_may_differ(
                &before.view,
                node,
                &self.config.pinglist,
                *rotation_epoch,
            )
    }

    /// Publishes the changes made so far: at once until the background task
    /// paces publishes, then within [`PUBLISH_EVERY`] together with any other
    /// changes made meanwhile.
    fn publish(&self) {
        if self.paced.load(Ordering::Relaxed) {
            self.publish_wanted.notify_one();
        } else {
            self.publish_now();
        }
    }

    /// Publishes waiting changes, at most once per [`PUBLISH_EVERY`]; the
    /// first change after a quiet spell goes out at once.
    async fn run_publisher(self: Arc<Self>, cancel: CancellationToken) {
        self.paced.store(true, Ordering::Relaxed);
        // Changes made before pacing began were published at once.
        let mut last = tokio::time::Instant::now();
        loop {
            tokio::select! {
                () = cancel.cancelled() => break,
                () = self.publish_wanted.notified() => {}
            }
            tokio::select! {
                () = cancel.cancelled() => break,
                () = tokio::time::sleep_until(last + PUBLISH_EVERY) => {}
            }
            last = tokio::time::Instant::now();
            self.publish_now();
        }
        self.paced.store(false, Ordering::Relaxed);
        self.publish_now();
    }

    /// Updates the view for the nodes changed since the last publish (only
    /// their ToRs are rebuilt) and wakes every stream.
    fn publish_now(&self) {
        let mut view = lock(&self.view);
        let (version, epoch, changed, registered, connected) = {
            let mut state = lock(&self.state);
            state.version += 1;
            let dirty = std::mem::take(&mut state.dirty);
            let mut changed: HashMap<String, Vec<MeshEndpoint>> =
                dirty.into_iter().map(|node| (node, Vec::new())).collect();
            let mut registered = HashSet::new();
            for e in state.endpoints.values() {
                registered.insert(e.node.as_str());
                if let Some(list) = changed.get_mut(&e.node)
                    && state.presence.get(&e.node).is_some_and(Presence::connected)
                {
                    list.push(e.clone());
                }
            }
            let connected = state.presence.values().filter(|p| p.connected()).count();
            (
                state.version,
                state.rotation_epoch,
                changed,
                registered.len(),
                connected,
            )
        };
        if !changed.is_empty() {
            *view = Arc::new(view.updated(changed));
        }
        self.metrics
            .endpoints
            .set(i64::try_from(view.endpoint_count() + view.unplaced_count()).unwrap_or(i64::MAX));
        self.metrics
            .agents
            .with_label_values(&["registered"])
            .set(i64::try_from(registered).unwrap_or(i64::MAX));
        self.metrics
            .agents
            .with_label_values(&["connected"])
            .set(i64::try_from(connected).unwrap_or(i64::MAX));
        let services = lock(&self.services).targets();
        let key_epoch = lock(&self.state).key_epoch;
        self.snapshot.send_replace(Arc::new(Snapshot {
            version,
            rotation_epoch: epoch,
            probe_keys: (self.probe_keys.as_ref()).map(|k| k.keys(key_epoch)),
            view: Arc::clone(&view),
            services,
        }));
    }

    /// Takes a node's window summaries into the analyzer.
    pub fn report(
        &self,
        node: &str,
        windows: Vec<v1::WindowSummary>,
    ) -> Result<ReportOutcome, MeshError> {
        if windows.len() > MAX_SUMMARIES_PER_REPORT {
            return Err(MeshError::InvalidRequest(format!(
                "{} summaries in one report; at most {MAX_SUMMARIES_PER_REPORT}",
                windows.len()
            )));
        }
        let owned: Vec<bool> = {
            let state = lock(&self.state);
            windows
                .iter()
                .map(|w| {
                    state
                        .endpoints
                        .get(&w.source_endpoint)
                        .is_some_and(|e| e.node == node)
                })
                .collect()
        };
        let mut outcome = ReportOutcome::default();
        let now = unix_now_ms();
        let mut late_accepted = 0u64;
        let mut intake = lock(&self.intake);
        // Time under the lock only: concurrent reports' waits would count twice.
        let ingest_began = std::time::Instant::now();
        for (summary, owned) in windows.into_iter().zip(owned) {
            if !owned {
                outcome.rejected += 1;
                self.metrics
                    .summaries
                    .with_label_values(&["not_own_endpoint"])
                    .inc();
                continue;
            }
            match intake.ingest(summary, now) {
                Ok(Ingested::Accepted) => outcome.accepted += 1,
                Ok(Ingested::AcceptedLate) => {
                    outcome.accepted += 1;
                    late_accepted += 1;
                }
                Ok(Ingested::Duplicate) => outcome.duplicates += 1,
                Err(e) => {
                    outcome.rejected += 1;
                    self.metrics
                        .summaries
                        .with_label_values(&[e.category()])
                        .inc();
                    if let Some(late) = late_outcome(&e) {
                        self.metrics.late_summaries.with_label_values(&[late]).inc();
                    }
                    tracing::debug!(node, error = %e, "window summary rejected");
                }
            }
        }
        drop(intake);
        self.ingest_ns.fetch_add(
            u64::try_from(ingest_began.elapsed().as_nanos()).unwrap_or(u64::MAX),
            Ordering::Relaxed,
        );
        self.metrics
            .summaries
            .with_label_values(&["accepted"])
            .inc_by(u64::from(outcome.accepted));
        self.metrics
            .summaries
            .with_label_values(&["duplicate"])
            .inc_by(u64::from(outcome.duplicates));
        self.metrics
            .late_summaries
            .with_label_values(&["accepted"])
            .inc_by(late_accepted);
        Ok(outcome)
    }

    /// Judges the late summaries taken in since the last call (see
    /// `analyzer::Intake`) into the window history only: live findings,
    /// root causes, Events and metrics of the ToR pairs stay as the live
    /// windows left them. Returns the summaries judged. Blocking; the
    /// background task runs it after the live windows due, never beside them.
    pub fn judge_late(&self) -> u64 {
        let late = lock(&self.intake).take_late();
        if late.is_empty() {
            return 0;
        }
        let window_ms = u64::from(self.config.pinglist.window_ms);
        let timeout_ms = u64::from(self.config.pinglist.probe_timeout_ms);
        let endpoints = Arc::clone(&lock(&self.state).endpoints);
        let topology = |endpoint: &str| {
            endpoints.get(endpoint).map(|e| EndpointPlacement {
                node: e.node.clone(),
                tor: e.tor.clone(),
            })
        };
        let mut judged = 0;
        for closed in late {
            let start = closed.window_start_ms();
            let present_nodes: HashSet<String> = lock(&self.state)
                .presence
                .iter()
                .filter(|(_, p)| p.present(start, start + window_ms + timeout_ms))
                .map(|(node, _)| node.clone())
                .collect();
            let present = |endpoint: &str, _window: u64| {
                endpoints
                    .get(endpoint)
                    .is_some_and(|e| present_nodes.contains(&e.node))
            };
            judged += u64::try_from(closed.paths()).unwrap_or(u64::MAX);
            let analyzer = lock(&self.analyzer);
            let report = Arc::new(analyzer.judge_late(closed, &topology, &present));
            let tors = endpoints.values().map(|e| e.tor.as_str());
            self.history.record_late(&report, analyzer.sla(), tors);
        }
        self.metrics
            .late_summaries
            .with_label_values(&["judged"])
            .inc_by(judged);
        judged
    }

    /// Judges one window: called once every agent had time to report it.
    /// `None` when the window was judged already.
    ///
    /// Blocking (a large window takes a good part of a second): the
    /// background task runs it with `spawn_blocking`. The window's summaries
    /// are moved out of the intake under a short lock and the topology is an
    /// `Arc` taken under a short state lock, so reports, registrations and
    /// pinglist pushes go on while the window is judged.
    pub fn evaluate(&self, window_start_ms: u64) -> Option<Arc<WindowReport>> {
        let closed = match lock(&self.intake).close(window_start_ms) {
            Ok(closed) => closed,
            Err(e) => {
                tracing::debug!(error = %e, "window not judged");
                return None;
            }
        };
        self.metrics
            .late_summaries
            .with_label_values(&["accepted"])
            .inc_by(u64::try_from(closed.made_late()).unwrap_or(u64::MAX));
        let ingested = Duration::from_nanos(self.ingest_ns.swap(0, Ordering::Relaxed));
        let window_ms = u64::from(self.config.pinglist.window_ms);
        let timeout_ms = u64::from(self.config.pinglist.probe_timeout_ms);
        // Present for the whole window: one session connected before it
        // began, and still connected, or gone (disconnected, or registered
        // again) only after its last probe timed out.
        let (endpoints, present_nodes) = {
            let state = lock(&self.state);
            let until = window_start_ms + window_ms + timeout_ms;
            let present: HashSet<String> = state
                .presence
                .iter()
                .filter(|(_, p)| p.present(window_start_ms, until))
                .map(|(node, _)| node.clone())
                .collect();
            (Arc::clone(&state.endpoints), present)
        };
        let topology = |endpoint: &str| {
            endpoints.get(endpoint).map(|e| EndpointPlacement {
                node: e.node.clone(),
                tor: e.tor.clone(),
            })
        };
        let present = |endpoint: &str, _window: u64| {
            endpoints
                .get(endpoint)
                .is_some_and(|e| present_nodes.contains(&e.node))
        };
        let (report, evaluated, publish_began) = {
            let mut analyzer = lock(&self.analyzer);
            let book = lock(&self.traces).book();
            analyzer.set_traces(book);
            let began = std::time::Instant::now();
            let report = analyzer.judge(closed, &topology, &present);
            let publish_began = std::time::Instant::now();
            lock(&self.traces).plan(
                report.paths.iter().map(ProbedPath::from),
                &endpoints,
                unix_now_ms(),
            );
            let tors = endpoints.values().map(|e| e.tor.as_str());
            self.history.record(&report, analyzer.sla(), tors);
            *lock(&self.verdicts) = Verdicts {
                findings: analyzer.open_findings().into_iter().cloned().collect(),
                root_causes: analyzer.open_root_causes(),
                last_report: analyzer.last_report(),
            };
            (report, publish_began.duration_since(began), publish_began)
        };
        if !report.paths.is_empty() {
            self.windows_with_data.fetch_add(1, Ordering::Relaxed);
        }
        self.publish_report_metrics(&report);
        self.refresh_service_impact(report.window_start_ms);
        self.observe_window_phases([ingested, evaluated, publish_began.elapsed()]);
        Some(report)
    }

    /// One judged window's cost, in the order of [`WINDOW_PHASES`].
    fn observe_window_phases(&self, phases: [Duration; 3]) {
        for (phase, took) in WINDOW_PHASES.into_iter().zip(phases) {
            self.metrics
                .window_processing
                .with_label_values(&[phase])
                .observe(took.as_secs_f64());
        }
    }

    fn publish_report_metrics(&self, report: &WindowReport) {
        let m = &self.metrics;
        m.windows_evaluated.inc();
        m.excluded_paths
            .with_label_values(&["target_gone"])
            .inc_by(report.excluded_target_gone);
        m.tor_pair_loss.reset();
        m.tor_pair_p99.reset();
        m.tor_pair_probes.reset();
        for pair in &report.tor_pairs {
            let labels = [pair.source_tor.as_str(), pair.target_tor.as_str()];
            if let Some(loss) = pair.loss_ratio {
                m.tor_pair_loss.with_label_values(&labels).set(loss);
            }
            if let Some(p99) = pair.p99_network_rtt_ns {
                m.tor_pair_p99
                    .with_label_values(&labels)
                    .set(p99 as f64 / 1e9);
            }
            for (result, n) in [
                ("ok", pair.ok),
                ("lost", pair.lost),
                ("invalid", pair.invalid),
            ] {
                m.tor_pair_probes
                    .with_label_values(&[labels[0], labels[1], result])
                    .set(i64::try_from(n).unwrap_or(i64::MAX));
            }
        }
        for f in &report.opened {
            m.findings_opened
                .with_label_values(&[kind_label(f.kind)])
                .inc();
            tracing::warn!(kind = kind_label(f.kind), location = %f.location, evidence = %f.evidence, "finding opened");
        }
        for f in &report.cleared {
            tracing::info!(kind = kind_label(f.kind), location = %f.location, "finding cleared");
        }
        for kind in FINDING_KINDS {
            m.findings_open
                .with_label_values(&[kind_label(kind)])
                .set(0);
        }
        for f in self.open_findings() {
            m.findings_open
                .with_label_values(&[kind_label(f.kind)])
                .inc();
        }
        self.publish_root_cause_metrics(report);
    }

    fn publish_root_cause_metrics(&self, report: &WindowReport) {
        let m = &self.metrics;
        for c in &report.opened_root_causes {
            m.root_causes_opened
                .with_label_values(&[c.cause.kind.label(), c.cause.signal.label()])
                .inc();
            tracing::warn!(
                kind = c.cause.kind.label(),
                component = %c.cause.component,
                confidence = c.cause.confidence,
                summary = %c.cause.summary,
                "root cause opened"
            );
        }
        for c in &report.cleared_root_causes {
            tracing::info!(kind = c.cause.kind.label(), component = %c.cause.component, "root cause cleared");
        }
        for kind in CauseKind::ALL {
            for signal in CAUSE_SIGNALS {
                let labels = [kind.label(), signal.label()];
                m.localized_faults.with_label_values(&labels).set(0);
                m.root_causes_localized.with_label_values(&labels).set(0);
            }
        }
        for c in &report.root_causes {
            m.root_causes_localized
                .with_label_values(&[c.kind.label(), c.signal.label()])
                .inc();
        }
        for c in self.open_root_causes() {
            m.localized_faults
                .with_label_values(&[c.cause.kind.label(), c.cause.signal.label()])
                .inc();
        }
    }

    /// Takes `node`'s path-trace results and hands out its next requests,
    /// with when to call again (milliseconds; 0 when more wait).
    pub async fn exchange_traces(
        &self,
        node: &str,
        session: u64,
        results: Vec<v1::TraceResult>,
    ) -> Result<(Vec<v1::TraceRequest>, u32), MeshError> {
        self.check_session(node, session).await?;
        if results.len() > MAX_TRACE_RESULTS {
            return Err(MeshError::InvalidRequest(format!(
                "{} trace results in one call; at most {MAX_TRACE_RESULTS}",
                results.len()
            )));
        }
        // Lock order everywhere: state, analyzer, traces.
        let state = lock(&self.state);
        let mut traces = lock(&self.traces);
        let requests = traces.exchange(node, results, &state.endpoints, unix_now_ms());
        let next = if traces.waiting(node) > 0 {
            0
        } else {
            self.config.pinglist.window_ms
        };
        Ok((requests, next))
    }

    /// Open root causes (localized faults), most confident first.
    pub fn open_root_causes(&self) -> Vec<OpenRootCause> {
        lock(&self.verdicts).root_causes.clone()
    }

    pub fn open_findings(&self) -> Vec<Finding> {
        lock(&self.verdicts).findings.clone()
    }

    pub fn last_report(&self) -> Option<Arc<WindowReport>> {
        lock(&self.verdicts).last_report.clone()
    }

    /// How many windows this controller judged since it started in which at
    /// least one path had data (agents present and reporting). Windows judged
    /// while agents were still reconnecting do not count: a fault cannot
    /// reopen its finding in them. Once this reaches the SLA policy's
    /// `open_after_windows`, a fault that persisted across the start has
    /// opened its finding again.
    pub fn windows_with_data(&self) -> u64 {
        self.windows_with_data.load(Ordering::Relaxed)
    }

    pub async fn agents(&self) -> Result<Vec<AgentView>, MeshError> {
        let records = self.registry.agents().await?;
        let state = lock(&self.state);
        Ok(records
            .into_iter()
            .map(|record| {
                let connected = state
                    .presence
                    .get(&record.node)
                    .is_some_and(Presence::connected);
                let endpoints = state
                    .endpoints
                    .values()
                    .filter(|e| e.node == record.node)
                    .cloned()
                    .collect();
                AgentView {
                    record,
                    connected,
                    endpoints,
                }
            })
            .collect())
    }

    pub async fn endpoints(&self) -> Result<Vec<MeshEndpoint>, MeshError> {
        Ok(self.registry.endpoints().await?)
    }

    /// Background work: judging windows, rotating inter-ToR samples, expiring
    /// stale agents. Runs until `cancel`.
    pub async fn run_background(self: Arc<Self>, cancel: CancellationToken) {
        let window_ms = self.config.pinglist.window_ms;
        let delay = u64::from(window_ms)
            + u64::from(self.config.pinglist.probe_timeout_ms)
            + self.config.report_grace_ms;
        let mut next_window = window_start(unix_now_ms(), window_ms);
        let mut tick = tokio::time::interval(Duration::from_millis(200));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut last_housekeeping = unix_now_ms();
        let publisher = tokio::spawn(Arc::clone(&self).run_publisher(cancel.clone()));
        loop {
            tokio::select! {
                () = cancel.cancelled() => break,
                _ = tick.tick() => {}
            }
            let now = unix_now_ms();
            while now >= next_window + delay {
                // Off the async workers: streams and reports go on meanwhile.
                let this = Arc::clone(&self);
                let window = next_window;
                if let Err(e) = tokio::task::spawn_blocking(move || this.evaluate(window)).await {
                    tracing::error!(error = %e, window, "judging a window failed");
                }
                next_window += u64::from(window_ms);
            }
            if lock(&self.intake).late_summaries() > 0 {
                let this = Arc::clone(&self);
                if let Err(e) = tokio::task::spawn_blocking(move || this.judge_late()).await {
                    tracing::error!(error = %e, "judging late summaries failed");
                }
            }
            let epoch = self.config.pinglist.rotation_epoch(now);
            let rotated = {
                let mut state = lock(&self.state);
                let changed = state.rotation_epoch != epoch;
                state.rotation_epoch = epoch;
                changed
            };
            if rotated {
                self.publish();
            }
            if self.roll_probe_keys(now) {
                self.publish();
            }
            if now.saturating_sub(last_housekeeping) >= 5_000 {
                last_housekeeping = now;
                self.housekeeping(now).await;
            }
        }
        // Stopped: the last changes go out unpaced.
        let _ = publisher.await;
    }

    /// Moves to the probe-key epoch of `now`; true when it changed (every
    /// agent's pinglist then carries the next key set). Public for tests.
    pub fn roll_probe_keys(&self, now: u64) -> bool {
        let Some(keys) = &self.probe_keys else {
            return false;
        };
        let epoch = keys.epoch(now);
        std::mem::replace(&mut lock(&self.state).key_epoch, epoch) != epoch
    }

    /// Persists presence of connected agents and expires agents gone too long.
    ///
    /// Runs every few seconds from [`MeshController::run_background`]; public so
    /// tests can run it at a chosen time.
    pub async fn housekeeping(&self, now: u64) {
        self.expire_service_flows(now);
        let stale_after_ms = self.config.stale_after_secs.saturating_mul(1_000);
        let due: Vec<(String, u64)> = {
            let mut state = lock(&self.state);
            // Often enough that a connected agent is never older than the cutoff.
            let persist_every = u64::try_from(PERSIST_PRESENCE_EVERY.as_millis())
                .unwrap_or(u64::MAX)
                .min(stale_after_ms / 3);
            state
                .presence
                .iter_mut()
                .filter(|(_, p)| {
                    p.connected() && now.saturating_sub(p.persisted_ms) >= persist_every
                })
                .map(|(node, p)| {
                    p.persisted_ms = now;
                    (node.clone(), p.session)
                })
                .collect()
        };
        for (node, session) in due {
            if let Err(e) = self.registry.touch(&node, session, now).await {
                self.metrics
                    .registry_errors
                    .with_label_values(&[e.category()])
                    .inc();
            }
        }
        let cutoff = now.saturating_sub(stale_after_ms);
        match self.registry.expire(cutoff).await {
            Ok(removed) if !removed.is_empty() => {
                {
                    let mut state = lock(&self.state);
                    for node in &removed {
                        // An agent connected right now is not stale whatever the store says.
                        if state.presence.get(node).is_some_and(Presence::connected) {
                            continue;
                        }
                        state.presence.remove(node);
                        state.endpoints_mut(node).retain(|_, e| &e.node != node);
                    }
                }
                tracing::info!(nodes = ?removed, "expired stale agents");
                self.publish();
            }
            Ok(_) => {}
            Err(e) => {
                self.metrics
                    .registry_errors
                    .with_label_values(&[e.category()])
                    .inc();
                tracing::warn!(error = %e, "expiring stale agents failed");
            }
        }
    }
}

const CAUSE_SIGNALS: [Signal; 3] = [Signal::Loss, Signal::Latency, Signal::HostDelay];

const FINDING_KINDS: [FindingKind; 4] = [
    FindingKind::PathLoss,
    FindingKind::PathLatency,
    FindingKind::TorPairLoss,
    FindingKind::TorPairLatency,
];

/// Starts the labelled counters and gauges at zero for every known label value,
/// so dashboards and alerts see series (and `rate()` works) before the first event.
fn initialize_series(m: &ControllerMetrics) {
    for phase in WINDOW_PHASES {
        m.window_processing.with_label_values(&[phase]);
    }
    for outcome in LATE_OUTCOMES {
        m.late_summaries.with_label_values(&[outcome]).inc_by(0);
    }
    for kind in CauseKind::ALL {
        for signal in CAUSE_SIGNALS {
            let labels = [kind.label(), signal.label()];
            m.localized_faults.with_label_values(&labels).set(0);
            m.root_causes_localized.with_label_values(&labels).set(0);
            m.root_causes_opened.with_label_values(&labels).inc_by(0);
        }
    }
    for kind in FINDING_KINDS {
        m.findings_open
            .with_label_values(&[kind_label(kind)])
            .set(0);
        m.findings_opened
            .with_label_values(&[kind_label(kind)])
            .inc_by(0);
    }
    for rpc in [
        "register",
        "watch_pinglist",
        "report_windows",
        "report_service_flows",
    ] {
        for reason in [
            "invalid_request",
            "unknown_node",
            "stale_session",
            "endpoint_conflict",
            "unavailable",
        ] {
            m.rejected_requests
                .with_label_values(&[rpc, reason])
                .inc_by(0);
        }
    }
    for category in [
        "query",
        "unavailable",
        "corrupt",
        "unknown_node",
        "stale_session",
    ] {
        m.registry_errors.with_label_values(&[category]).inc_by(0);
    }
}

/// Outcomes of `pingmesh_controller_late_summaries_total`.
const LATE_OUTCOMES: [&str; 5] = ["accepted", "judged", "duplicate", "too_old", "late_full"];

/// The late-summary outcome of a refusal, if it is one: a summary whose
/// source was judged in its window already, or older than the horizon.
fn late_outcome(e: &IngestError) -> Option<&'static str> {
    match e {
        IngestError::AlreadyEvaluated { .. } => Some("duplicate"),
        IngestError::TooOld { .. } => Some("too_old"),
        IngestError::LateFull { .. } => Some("late_full"),
        _ => None,
    }
}

/// Bounded metric label of a finding kind.
pub fn kind_label(kind: FindingKind) -> &'static str {
    match kind {
        FindingKind::PathLoss => "path_loss",
        FindingKind::PathLatency => "path_latency",
        FindingKind::TorPairLoss => "tor_pair_loss",
        FindingKind::TorPairLatency => "tor_pair_latency",
    }
}

/// Keeps a node marked present; dropping it (the stream ended) marks it gone.
#[derive(Debug)]
pub struct PresenceGuard {
    controller: Arc<MeshController>,
    node: String,
    session: u64,
}

impl Drop for PresenceGuard {
    fn drop(&mut self) {
        self.controller.disconnect(&self.node, self.session);
    }
}

/// An agent as the HTTP API shows it.
#[derive(Debug, Clone, serde::Serialize)]
#[serde(rename_all = "camelCase")]
pub struct AgentView {
    #[serde(flatten)]
    pub record: AgentRecord,
    pub connected: bool,
    pub endpoints: Vec<MeshEndpoint>,
}
