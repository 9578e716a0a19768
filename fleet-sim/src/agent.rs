//! One simulated agent: registers its node, holds the pinglist stream, reports
//! a summary per pinglist target every window (just after the window's probes
//! time out, as the real agent does), exchanges path traces, and registers
//! again after any lost connection with the real agent's backoff. Nothing is
//! probed: the summaries come from the fault model (`synth`).

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError, RwLock};
use std::time::{Duration, Instant};

use pingmesh_proto::limits::MAX_MESSAGE_BYTES;
use pingmesh_proto::v1::mesh_controller_client::MeshControllerClient;
use pingmesh_proto::v1::{
    self, ExchangeTracesRequest, Pinglist, RegisterRequest, ReportWindowsRequest,
    WatchPinglistRequest,
};
use pingmesh_proto::window::{unix_now_ms, window_start};
use rand::Rng;
use tokio::sync::watch;
use tonic::transport::Channel;

use crate::fleet::{FaultSet, FleetShape, SimNode};
use crate::synth;

/// The real agent's retry pacing (node-agent/src/control.rs): 200 ms doubling
/// to 10 s, jittered to 50..100 %.
const FIRST_RETRY: Duration = Duration::from_millis(200);
const MAX_RETRY: Duration = Duration::from_secs(10);
/// Summaries per `ReportWindows` call, as the real agent chunks them.
const REPORT_CHUNK: usize = 2_000;
/// Agents spread their reports over this long after a window's probes time out.
const REPORT_SPREAD_MS: u64 = 500;
/// Trace exchanges per window at most (more when the controller has traces waiting).
const MAX_EXCHANGES_PER_WINDOW: usize = 4;
/// Errors kept for the summary (the rest are only counted).
const MAX_KEPT_ERRORS: usize = 20;

/// What every agent shares with the orchestrator: counters and latencies.
#[derive(Debug)]
pub struct Fleet {
    pub shape: FleetShape,
    pub faults: FaultSet,
    pub epoch: Instant,
    /// Agents whose current session has received its first pinglist.
    pub connected: AtomicUsize,
    pub registrations: AtomicU64,
    pub pinglists: AtomicU64,
    /// Microseconds since `epoch` of the latest pinglist any agent received.
    pub last_pinglist_us: AtomicU64,
    /// Sum over agents of the targets in their current pinglist.
    pub targets: AtomicUsize,
    pub summaries_sent: AtomicU64,
    pub summaries_accepted: AtomicU64,
    pub report_failures: AtomicU64,
    pub traces_run: AtomicU64,
    pub trace_failures: AtomicU64,
    pub report_latency: Mutex<Vec<Duration>>,
    pub errors: Mutex<Vec<String>>,
    pub error_count: AtomicU64,
    /// Endpoint-id prefix of the node whose membership is being timed.
    pub marker: RwLock<Option<String>>,
    /// (agent, when, whether its pinglist held the marked node): every pinglist
    /// received while a marker is set.
    pub marker_seen: Mutex<Vec<(usize, Instant, bool)>>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

impl Fleet {
    pub fn new(shape: FleetShape) -> Self {
        let faults = shape.fault_set();
        Self {
            shape,
            faults,
            epoch: Instant::now(),
            connected: AtomicUsize::new(0),
            registrations: AtomicU64::new(0),
            pinglists: AtomicU64::new(0),
            last_pinglist_us: AtomicU64::new(0),
            targets: AtomicUsize::new(0),
            summaries_sent: AtomicU64::new(0),
            summaries_accepted: AtomicU64::new(0),
            report_failures: AtomicU64::new(0),
            traces_run: AtomicU64::new(0),
            trace_failures: AtomicU64::new(0),
            report_latency: Mutex::default(),
            errors: Mutex::default(),
            error_count: AtomicU64::new(0),
            marker: RwLock::default(),
            marker_seen: Mutex::default(),
        }
    }

    pub fn error(&self, what: String) {
        self.error_count.fetch_add(1, Ordering::Relaxed);
        let mut kept = lock(&self.errors);
        if kept.len() < MAX_KEPT_ERRORS {
            kept.push(what);
        }
    }

    pub fn take_report_latencies(&self) -> Vec<Duration> {
        std::mem::take(&mut *lock(&self.report_latency))
    }

    pub fn set_marker(&self, prefix: Option<String>) {
        *self.marker.write().unwrap_or_else(PoisonError::into_inner) = prefix;
    }

    pub fn marker_events(&self) -> Vec<(usize, Instant, bool)> {
        lock(&self.marker_seen).clone()
    }

    pub fn clear_marker_events(&self) {
        lock(&self.marker_seen).clear();
    }

    pub fn errors(&self) -> Vec<String> {
        lock(&self.errors).clone()
    }

    /// When the latest pinglist arrived.
    pub fn last_pinglist_at(&self) -> Instant {
        self.epoch + Duration::from_micros(self.last_pinglist_us.load(Ordering::Relaxed))
    }

    fn saw_pinglist(&self, agent: usize, list: &Pinglist) {
        self.pinglists.fetch_add(1, Ordering::Relaxed);
        let us = u64::try_from(self.epoch.elapsed().as_micros()).unwrap_or(u64::MAX);
        self.last_pinglist_us.fetch_max(us, Ordering::Relaxed);
        let marker = self
            .marker
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .clone();
        if let Some(prefix) = marker {
            let holds = list
                .targets
                .iter()
                .any(|t| t.target.as_ref().is_some_and(|e| e.id.starts_with(&prefix)));
            lock(&self.marker_seen).push((agent, Instant::now(), holds));
        }
    }
}

/// Counts the agent as connected while it lives.
struct Connected<'a> {
    fleet: &'a Fleet,
    targets: usize,
}

impl Drop for Connected<'_> {
    fn drop(&mut self) {
        self.fleet.connected.fetch_sub(1, Ordering::Relaxed);
        self.fleet
            .targets
            .fetch_sub(self.targets, Ordering::Relaxed);
    }
}

impl Connected<'_> {
    fn set_targets(&mut self, n: usize) {
        self.fleet.targets.fetch_add(n, Ordering::Relaxed);
        self.fleet
            .targets
            .fetch_sub(self.targets, Ordering::Relaxed);
        self.targets = n;
    }
}

fn jittered(d: Duration) -> Duration {
    d.mul_f64(rand::rng().random_range(0.5..=1.0))
}

/// Runs one agent until its task is aborted.
pub async fn run(fleet: Arc<Fleet>, node: SimNode, channel: Channel) {
    let mut backoff = FIRST_RETRY;
    loop {
        let mut client = MeshControllerClient::new(channel.clone())
            .max_decoding_message_size(MAX_MESSAGE_BYTES)
            .max_encoding_message_size(MAX_MESSAGE_BYTES);
        if let Err(e) = session(&fleet, &node, &mut client, &mut backoff).await {
            fleet.error(format!("{}: {e}", node.name));
        }
        tokio::time::sleep(jittered(backoff)).await;
        backoff = (backoff * 2).min(MAX_RETRY);
    }
}

/// One registered session: until the stream ends. `Ok` when it ended because
/// the controller went away (the usual way a session ends here).
async fn session(
    fleet: &Arc<Fleet>,
    node: &SimNode,
    client: &mut MeshControllerClient<Channel>,
    backoff: &mut Duration,
) -> Result<(), tonic::Status> {
    let registered = client
        .register(RegisterRequest {
            node: node.name.clone(),
            agent_version: "fleet-sim".into(),
            endpoints: node.endpoints.clone(),
        })
        .await;
    let session = match registered {
        Ok(r) => r.into_inner().session,
        // Controller not up (yet): the usual case during a restart.
        Err(s) if s.code() == tonic::Code::Unavailable => return Ok(()),
        Err(s) => return Err(s),
    };
    fleet.registrations.fetch_add(1, Ordering::Relaxed);
    let mut stream = match client
        .watch_pinglist(WatchPinglistRequest {
            node: node.name.clone(),
            session,
        })
        .await
    {
        Ok(s) => s.into_inner(),
        Err(s) if s.code() == tonic::Code::Unavailable => return Ok(()),
        Err(s) => return Err(s),
    };
    let (lists, lists_rx) = watch::channel::<Option<Arc<Pinglist>>>(None);
    let reporter = tokio::spawn(report_loop(
        fleet.clone(),
        node.name.clone(),
        session,
        client.clone(),
        lists_rx,
    ));
    let mut connected: Option<Connected<'_>> = None;
    let ended = loop {
        match stream.message().await {
            Ok(Some(list)) => {
                fleet.saw_pinglist(node.index, &list);
                let c = connected.get_or_insert_with(|| {
                    fleet.connected.fetch_add(1, Ordering::Relaxed);
                    *backoff = FIRST_RETRY;
                    Connected { fleet, targets: 0 }
                });
                c.set_targets(list.targets.len());
                lists.send_replace(Some(Arc::new(list)));
            }
            Ok(None) => break Ok(()),
            Err(s)
                if matches!(
                    s.code(),
                    tonic::Code::Unavailable | tonic::Code::Unknown | tonic::Code::Cancelled
                ) =>
            {
                break Ok(());
            }
            Err(s) => break Err(s),
        }
    };
    reporter.abort();
    drop(connected);
    ended
}

/// Reports every window that began after the first pinglist, and exchanges traces.
async fn report_loop(
    fleet: Arc<Fleet>,
    node: String,
    session: u64,
    mut client: MeshControllerClient<Channel>,
    mut lists: watch::Receiver<Option<Arc<Pinglist>>>,
) {
    let first = loop {
        if lists.changed().await.is_err() {
            return;
        }
        if let Some(list) = lists.borrow_and_update().clone() {
            break list;
        }
    };
    let mut window_ms = first.window_ms.max(1);
    let mut next = window_start(unix_now_ms(), window_ms) + u64::from(window_ms);
    let mut trace_results: Vec<v1::TraceResult> = Vec::new();
    loop {
        let list = lists.borrow().clone().unwrap_or_else(|| first.clone());
        window_ms = list.window_ms.max(1);
        let spread = rand::rng().random_range(0..REPORT_SPREAD_MS);
        let due = next + u64::from(window_ms) + u64::from(list.probe_timeout_ms) + spread;
        tokio::time::sleep(Duration::from_millis(due.saturating_sub(unix_now_ms()))).await;
        let list = lists.borrow().clone().unwrap_or_else(|| first.clone());
        let summaries: Vec<v1::WindowSummary> = {
            let mut rng = rand::rng();
            list.targets
                .iter()
                .map(|t| synth::summary(&fleet.shape, &fleet.faults, t, next, window_ms, &mut rng))
                .collect()
        };
        for chunk in summaries.chunks(REPORT_CHUNK) {
            let n = chunk.len() as u64;
            let began = Instant::now();
            let sent = client
                .report_windows(ReportWindowsRequest {
                    node: node.clone(),
                    session,
                    windows: chunk.to_vec(),
                })
                .await;
            let took = began.elapsed();
            fleet.summaries_sent.fetch_add(n, Ordering::Relaxed);
            match sent {
                Ok(r) => {
                    let r = r.into_inner();
                    fleet
                        .summaries_accepted
                        .fetch_add(u64::from(r.accepted), Ordering::Relaxed);
                    lock(&fleet.report_latency).push(took);
                }
                Err(s) => {
                    fleet.report_failures.fetch_add(1, Ordering::Relaxed);
                    // A connection cut by a controller restart, or a session it
                    // no longer knows (the real agent registers again), is expected.
                    if !matches!(
                        s.code(),
                        tonic::Code::Unavailable
                            | tonic::Code::Cancelled
                            | tonic::Code::Unknown
                            | tonic::Code::NotFound
                            | tonic::Code::FailedPrecondition
                    ) {
                        fleet.error(format!("{node}: report: {s}"));
                    }
                }
            }
        }
        for _ in 0..MAX_EXCHANGES_PER_WINDOW {
            let answer = client
                .exchange_traces(ExchangeTracesRequest {
                    node: node.clone(),
                    session,
                    results: std::mem::take(&mut trace_results),
                })
                .await;
            let Ok(answer) = answer else {
                fleet.trace_failures.fetch_add(1, Ordering::Relaxed);
                break;
            };
            let answer = answer.into_inner();
            trace_results = answer
                .requests
                .iter()
                .map(|r| synth::trace(&fleet.shape, &fleet.faults, r))
                .collect();
            fleet
                .traces_run
                .fetch_add(trace_results.len() as u64, Ordering::Relaxed);
            if trace_results.is_empty() || answer.next_exchange_ms > 0 {
                break;
            }
        }
        next += u64::from(window_ms);
    }
}
