//! The prober: paces probes to every pinglist target, matches what comes back,
//! and feeds outcomes to the metrics and the window aggregator.
//!
//! Tasks: one scheduler (sends), one receiver per socket (ACKs and kernel or
//! NIC TX timestamps), one sweeper (timeouts, finished windows). Probes are
//! registered in the pending table before they are sent, and pacing is jittered
//! per target so a fleet never probes in lockstep.
//!
//! One prober serves one source endpoint and is generic over how it reaches
//! targets ([`FlowTransport`]): UDP spreads flows over source-port sockets,
//! RDMA over GRH flow labels of one queue pair.

use std::cmp::Reverse;
use std::collections::{BTreeMap, BinaryHeap};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use pingmesh_proto::limits::MAX_FLOWS_PER_TARGET;
use pingmesh_proto::v1::{Pinglist, TargetKind, WindowSummary};
use pingmesh_proto::window::{unix_now_ms, window_start};
use tokio::sync::{mpsc, watch};
use tokio::task::JoinSet;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::auth::{self, ProbeKeyRing, seal, verify};
use super::clock::host_now_ns;
use super::emulate::EmulatedFabric;
use super::flows::FlowTransport;
use super::pending::{Outcome, PendingTable, Unmatched};
use super::timing::{Stamp, classify};
use super::wire::{Message, MessageType};
use crate::aggregate::{PathInfo, WindowAggregator};
use crate::metrics::{AgentMetrics, TargetLabels, TargetSeries};
use crate::transport::TransportError;
use crate::transport::socket::{ProbeEvent, ProbeSocket};

/// Exact percentiles are kept for up to this many samples per path and window.
const MAX_EXACT_SAMPLES: usize = 4_096;
/// TX-timestamp keys remembered per socket; older ones are forgotten.
const MAX_TX_KEYS: usize = 8_192;
/// Receive failures in a row after which a socket counts as broken and the
/// prober (or the responder) ends with the error (an RDMA endpoint is then
/// re-opened). Fewer are transient: counted, waited out, and gone past.
pub(crate) const MAX_RECEIVE_FAILURES: u32 = 100;
/// Pause after a failed receive, so a broken socket is not spun on.
pub(crate) const RECEIVE_RETRY: Duration = Duration::from_millis(10);
/// Window length and timeout used until the first pinglist says otherwise.
const DEFAULT_WINDOW_MS: u32 = 5_000;
const DEFAULT_TIMEOUT_MS: u32 = 500;

#[derive(Debug, Clone)]
pub struct ProberConfig {
    /// The endpoint probes leave from; pinglist targets of other endpoints
    /// (another RNIC of this node) are left to their own prober.
    pub source_endpoint: String,
    pub max_pending: usize,
    /// While set (the RNIC port is down), due probes are not sent but counted.
    pub paused: Arc<AtomicBool>,
    /// Faults to emulate (the local demo); `None` in production.
    pub emulated: Option<Arc<dyn EmulatedFabric>>,
    /// The probe keys, shared with the endpoint's responder; this prober
    /// installs the keys each pinglist brings.
    pub probe_keys: Arc<ProbeKeyRing>,
}

impl ProberConfig {
    pub fn new(source_endpoint: &str, max_pending: usize) -> Self {
        Self {
            source_endpoint: source_endpoint.to_owned(),
            max_pending,
            paused: Arc::new(AtomicBool::new(false)),
            emulated: None,
            probe_keys: ProbeKeyRing::off(),
        }
    }
}

/// One pinglist target, resolved once per pinglist.
#[derive(Debug)]
struct Target<P> {
    path: Arc<PathInfo>,
    labels: TargetSeries,
    addr: P,
    interval: Duration,
    flows: u16,
}

/// What the pending table remembers per probe.
#[derive(Debug)]
struct ProbeCtx<P> {
    target: Arc<Target<P>>,
}

impl<P> Clone for ProbeCtx<P> {
    fn clone(&self) -> Self {
        Self {
            target: self.target.clone(),
        }
    }
}

struct Shared<P> {
    prober_id: u64,
    next_seq: AtomicU64,
    pending: Mutex<PendingTable<ProbeCtx<P>>>,
    aggregator: Mutex<WindowAggregator>,
    timeout_ms: AtomicU64,
    metrics: Arc<AgentMetrics>,
    emulated: Option<Arc<dyn EmulatedFabric>>,
    probe_keys: Arc<ProbeKeyRing>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panic while holding one of these locks is a bug elsewhere; keep going with the data.
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// A socket and the send-completion keys of the probes sent on it.
struct FlowSocket<S> {
    socket: Arc<S>,
    tx_keys: Mutex<TxKeys>,
}

/// Matches kernel TX timestamps to probes. The kernel can report a timestamp
/// before `send_to` has returned its key to us, so either side may come first.
#[derive(Default)]
struct TxKeys {
    seq_of_key: BTreeMap<u32, u64>,
    early_stamps: BTreeMap<u32, u64>,
}

impl TxKeys {
    /// The probe `seq` was sent under `key`; returns its stamp if it already came.
    fn sent(&mut self, key: u32, seq: u64) -> Option<u64> {
        if let Some(stamp) = self.early_stamps.remove(&key) {
            return Some(stamp);
        }
        self.seq_of_key.insert(key, seq);
        Self::bound(&mut self.seq_of_key);
        None
    }

    /// The kernel stamped `key`; returns the probe's seq if we know it yet.
    fn stamped(&mut self, key: u32, kernel_ns: u64) -> Option<u64> {
        if let Some(seq) = self.seq_of_key.remove(&key) {
            return Some(seq);
        }
        self.early_stamps.insert(key, kernel_ns);
        Self::bound(&mut self.early_stamps);
        None
    }

    /// The send under `key` completed without a stamp, or failed: forgets the
    /// key and returns the probe's seq if we know it.
    fn completed(&mut self, key: u32) -> Option<u64> {
        self.seq_of_key.remove(&key)
    }

    fn bound(map: &mut BTreeMap<u32, u64>) {
        while map.len() > MAX_TX_KEYS {
            map.pop_first();
        }
    }
}

/// Runs the prober until `cancel`. Window summaries go to `summaries`. Ends
/// early, with the error, when a socket cannot be opened or keeps failing to
/// receive.
pub async fn run_prober<T: FlowTransport>(
    config: ProberConfig,
    mut transport: T,
    metrics: Arc<AgentMetrics>,
    mut pinglists: watch::Receiver<Option<Arc<Pinglist>>>,
    summaries: mpsc::Sender<Vec<WindowSummary>>,
    cancel: CancellationToken,
) -> Result<(), TransportError> {
    let shared = Arc::new(Shared {
        prober_id: rand::random(),
        next_seq: AtomicU64::new(1),
        pending: Mutex::new(PendingTable::new(config.max_pending)),
        aggregator: Mutex::new(WindowAggregator::new(DEFAULT_WINDOW_MS, MAX_EXACT_SAMPLES)),
        timeout_ms: AtomicU64::new(u64::from(DEFAULT_TIMEOUT_MS)),
        metrics: metrics.clone(),
        emulated: config.emulated.clone(),
        probe_keys: config.probe_keys.clone(),
    });
    // Stops this prober's own tasks, whatever ends it.
    let local = cancel.child_token();
    let mut tasks: JoinSet<Result<(), TransportError>> = JoinSet::new();
    tasks.spawn(sweep(shared.clone(), summaries, local.clone()));

    let mut sockets: Vec<Arc<FlowSocket<T::Socket>>> = Vec::new();
    let mut schedule = Schedule::default();
    let mut window_ms = DEFAULT_WINDOW_MS;
    let mut timeout_ms = DEFAULT_TIMEOUT_MS;
    let mut ended = Ok(());
    loop {
        let next_due = schedule.next_due();
        tokio::select! {
            () = cancel.cancelled() => break,
            Some(joined) = tasks.join_next() => {
                // Only a receiver gives up on its own, on a broken socket.
                if let Ok(Err(e)) = joined {
                    ended = Err(e);
                    break;
                }
            }
            changed = pinglists.changed() => {
                if changed.is_err() {
                    break; // the control task is gone: the agent is stopping
                }
                let Some(list) = pinglists.borrow_and_update().clone() else { continue };
                // Before any probe of this list goes out, so none leaves unsigned.
                if let Err(e) = config.probe_keys.update(list.probe_keys.as_ref()) {
                    tracing::error!(error = %e, "the pinglist's probe keys are unusable; keeping the keys held");
                }
                metrics.set_probe_key_id(config.probe_keys.keys().map_or(0, |k| k.current().id()));
                if list.window_ms != window_ms && list.window_ms > 0 {
                    window_ms = list.window_ms;
                    *lock(&shared.aggregator) = WindowAggregator::new(window_ms, MAX_EXACT_SAMPLES);
                }
                if list.probe_timeout_ms > 0 {
                    timeout_ms = list.probe_timeout_ms;
                    shared.timeout_ms.store(u64::from(timeout_ms), Ordering::Relaxed);
                }
                let targets = resolve_targets(&list, &config.source_endpoint, &transport, &metrics);
                let wanted = targets.iter().map(|t| t.flows).max().unwrap_or(1);
                let opened = match transport.open_flows(wanted) {
                    Ok(opened) => opened,
                    Err(e) => {
                        ended = Err(e);
                        break;
                    }
                };
                for socket in opened {
                    let flow = Arc::new(FlowSocket { socket, tx_keys: Mutex::new(TxKeys::default()) });
                    tasks.spawn(receive(shared.clone(), flow.clone(), local.clone()));
                    sockets.push(flow);
                }
                schedule = Schedule::new(targets);
            }
            () = sleep_until(next_due) => {
                // Every probe already due goes out on this wake-up, so targets
                // due within the same timer tick cost one wake-up, not one each.
                let now = Instant::now();
                while let Some(target_index) = schedule.pop_due_by(now) {
                    if config.paused.load(Ordering::Relaxed) {
                        metrics.sent_nothing("port_down");
                        continue;
                    }
                    let target = schedule.targets[target_index].clone();
                    let flow = schedule.next_flow(target_index);
                    let (socket_index, peer) = transport.route(target.addr, flow);
                    if let Some(socket) = sockets.get(socket_index) {
                        send_probe(&shared, socket, target, peer, flow, window_ms, timeout_ms).await;
                    }
                }
            }
        }
    }
    local.cancel();
    while tasks.join_next().await.is_some() {}
    ended
}

async fn sleep_until(due: Option<Instant>) {
    match due {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

fn resolve_targets<T: FlowTransport>(
    list: &Pinglist,
    source_endpoint: &str,
    transport: &T,
    metrics: &AgentMetrics,
) -> Vec<Arc<Target<<T::Socket as ProbeSocket>::Peer>>> {
    let mut out = Vec::with_capacity(list.targets.len());
    for t in &list.targets {
        // Empty: a controller that names no source means this node's only endpoint.
        if !t.source_endpoint.is_empty() && t.source_endpoint != source_endpoint {
            continue;
        }
        let Some(endpoint) = &t.target else { continue };
        let addr = match transport.pinned_address(t, endpoint) {
            Ok(addr) => addr,
            Err(reason) => {
                tracing::warn!(target = %endpoint.id, address = %endpoint.address, reason, "pinglist target cannot be probed from this endpoint; skipped");
                metrics.sent_nothing("bad_target_address");
                continue;
            }
        };
        if !(t.rate_pps.is_finite() && t.rate_pps > 0.0) {
            continue;
        }
        out.push(Arc::new(Target {
            path: Arc::new(PathInfo {
                source_endpoint: t.source_endpoint.as_str().into(),
                target_endpoint: endpoint.id.as_str().into(),
                target_node: t.target_node.as_str().into(),
                kind: t.kind,
            }),
            labels: TargetLabels {
                src_tor: t.source_tor.clone(),
                dst_tor: endpoint.tor.clone(),
                dst_node: t.target_node.clone(),
            }
            .into(),
            addr,
            interval: Duration::from_secs_f64(
                1.0 / t.rate_pps.min(pingmesh_proto::limits::MAX_RATE_PPS),
            ),
            // The controller never asks for more; anything above would share
            // bits of the summary's flow masks.
            flows: u16::try_from(t.flows.clamp(1, MAX_FLOWS_PER_TARGET)).unwrap_or(1),
        }));
    }
    out
}

/// When each target's next probe is due.
struct Pacing {
    intervals: Vec<Duration>,
    /// How early each target's probe may leave ([`MAX_SEND_AHEAD`]).
    ahead: Vec<Duration>,
    due: BinaryHeap<Reverse<(Instant, usize)>>,
}

impl Pacing {
    /// Targets with these periods, each first due at a random phase after `now`.
    fn new(intervals: &[Duration], now: Instant) -> Self {
        let due = intervals
            .iter()
            .enumerate()
            .map(|(i, interval)| Reverse((now + interval.mul_f64(rand::random_range(0.0..1.0)), i)))
            .collect();
        Self {
            ahead: intervals
                .iter()
                .map(|&interval| (interval / 10).min(MAX_SEND_AHEAD))
                .collect(),
            intervals: intervals.to_vec(),
            due,
        }
    }

    fn next_due(&self) -> Option<Instant> {
        self.due.peek().map(|Reverse((at, _))| *at)
    }

    /// Takes the most overdue target if it is due by `now`, or will be
    /// within its send-ahead, and schedules its next probe one jittered
    /// period after this one was due (not after now, so pacing does not
    /// drift, and an early send does not shorten the next period).
    fn pop_due_by(&mut self, now: Instant) -> Option<usize> {
        let &Reverse((at, i)) = self.due.peek()?;
        if at > now + self.ahead[i] {
            return None;
        }
        self.due.pop();
        let period = self.intervals[i].mul_f64(rand::random_range(0.9..1.1));
        let next = (at + period).max(now);
        self.due.push(Reverse((next, i)));
        Some(i)
    }
}

/// Exports what a pinglist asks of the whole node (every endpoint's prober):
/// targets per kind, and which ToR pairs and nodes have series.
pub fn publish_pinglist_metrics(list: &Pinglist, metrics: &AgentMetrics) {
    let mut by_kind: BTreeMap<&'static str, usize> = BTreeMap::new();
    let mut labels = Vec::with_capacity(list.targets.len());
    for t in &list.targets {
        let Some(endpoint) = &t.target else { continue };
        let kind = TargetKind::try_from(t.kind).unwrap_or(TargetKind::Unspecified);
        *by_kind.entry(kind_label(kind)).or_default() += 1;
        labels.push(TargetLabels {
            src_tor: t.source_tor.clone(),
            dst_tor: endpoint.tor.clone(),
            dst_node: t.target_node.clone(),
        });
    }
    let kinds: Vec<(&str, usize)> = by_kind.into_iter().collect();
    metrics.set_pinglist(list.version, &kinds, &labels);
}

fn kind_label(kind: TargetKind) -> &'static str {
    match kind {
        TargetKind::TorMesh => "tor_mesh",
        TargetKind::InterTor => "inter_tor",
        TargetKind::Service => "service",
        TargetKind::Unspecified => "unspecified",
    }
}

/// How early a probe may leave so that it shares a wake-up with one due
/// now: at most this, and at most a tenth of its target's period (inside
/// the period's own ±10 % jitter). An agent with ~40 targets at 10 pps has
/// a probe due every 2.5 ms on average; each wake-up costs a timer expiry
/// and a scheduler round trip, and sending what falls due within the next
/// 5 ms together wakes the prober about once for every three probes.
const MAX_SEND_AHEAD: Duration = Duration::from_millis(5);

/// Per-target pacing: each target has its own jittered period, started at a
/// random phase, so probes from many agents never line up.
struct Schedule<P> {
    targets: Vec<Arc<Target<P>>>,
    pacing: Pacing,
    flow_cursor: Vec<u16>,
}

impl<P> Default for Schedule<P> {
    fn default() -> Self {
        Self {
            targets: Vec::new(),
            pacing: Pacing::new(&[], Instant::now()),
            flow_cursor: Vec::new(),
        }
    }
}

impl<P> Schedule<P> {
    fn new(targets: Vec<Arc<Target<P>>>) -> Self {
        let intervals: Vec<Duration> = targets.iter().map(|t| t.interval).collect();
        let flow_cursor = targets
            .iter()
            .map(|t| rand::random_range(0..t.flows.max(1)))
            .collect();
        Self {
            pacing: Pacing::new(&intervals, Instant::now()),
            targets,
            flow_cursor,
        }
    }

    fn next_due(&self) -> Option<Instant> {
        self.pacing.next_due()
    }

    fn pop_due_by(&mut self, now: Instant) -> Option<usize> {
        self.pacing.pop_due_by(now)
    }

    /// Round-robin over the target's flows (the transport maps them onto
    /// sockets or flow labels).
    fn next_flow(&mut self, i: usize) -> u16 {
        let flows = self.targets[i].flows.max(1);
        let flow = self.flow_cursor[i] % flows;
        self.flow_cursor[i] = (flow + 1) % flows;
        flow
    }
}

async fn send_probe<S: ProbeSocket>(
    shared: &Shared<S::Peer>,
    flow_socket: &FlowSocket<S>,
    target: Arc<Target<S::Peer>>,
    peer: S::Peer,
    flow: u16,
    window_ms: u32,
    timeout_ms: u32,
) {
    let seq = shared.next_seq.fetch_add(1, Ordering::Relaxed);
    let window = window_start(unix_now_ms(), window_ms);
    let t1 = host_now_ns();
    let deadline = t1 + u64::from(timeout_ms) * 1_000_000;
    let expect_tx = flow_socket.socket.timestamp_support().tx;
    let ctx = ProbeCtx {
        target: target.clone(),
    };
    // Registered before the send: the ACK may be read before send_to returns.
    let inserted = lock(&shared.pending).insert(seq, ctx, flow, window, t1, deadline, expect_tx);
    if let Err(e) = inserted {
        shared.metrics.sent_nothing(e.category());
        return;
    }
    // Signed for this target's responder: copied to another one, the probe
    // is dropped there, not answered in the target's name.
    let payload = seal(
        shared.probe_keys.keys().as_deref(),
        &Message::probe(shared.prober_id, seq),
        &target.path.target_endpoint,
    );
    if let Some(fabric) = &shared.emulated
        && fabric.drops(&target.path.source_endpoint, &target.path.target_endpoint)
    {
        // Gone on the (emulated) wire: counted as sent, times out as lost.
        lock(&shared.aggregator).on_sent(window, &target.path, flow);
        let finished = lock(&shared.pending).on_sent(seq, host_now_ns());
        if let Ok(Some(outcome)) = finished {
            record(shared, outcome);
        }
        return;
    }
    match flow_socket.socket.send_to(payload.as_bytes(), peer).await {
        Ok(receipt) => {
            lock(&shared.aggregator).on_sent(window, &target.path, flow);
            let early_stamp = receipt
                .tx_key
                .and_then(|key| lock(&flow_socket.tx_keys).sent(key, seq));
            let mut pending = lock(&shared.pending);
            if let Some(kernel_ns) = early_stamp {
                // Cannot finish the probe: it also waits for on_sent below.
                let _ = pending.on_tx_timestamp(seq, kernel_ns);
            }
            let finished = pending.on_sent(seq, receipt.host_ns);
            drop(pending);
            if let Ok(Some(outcome)) = finished {
                record(shared, outcome);
            }
        }
        Err(e) => {
            tracing::debug!(error = %e, ?peer, "probe send failed");
            shared.metrics.sent_nothing(e.category());
            // Never counted sent, so nothing to take back: the outcome (the
            // probe ends here even when its deadline passed during the send,
            // see the pending table) is only dropped.
            let _ = lock(&shared.pending).on_send_failed(seq);
        }
    }
}

/// Reads ACKs and send completions from one socket; gives up with the error
/// after [`MAX_RECEIVE_FAILURES`] failed receives in a row.
async fn receive<S: ProbeSocket>(
    shared: Arc<Shared<S::Peer>>,
    flow: Arc<FlowSocket<S>>,
    cancel: CancellationToken,
) -> Result<(), TransportError> {
    let mut buf = [0u8; 256];
    let mut failures = 0u32;
    // Made once: a fresh one per event would join and leave the token's
    // waiter list every time.
    let cancelled = cancel.cancelled();
    tokio::pin!(cancelled);
    loop {
        let event = tokio::select! {
            () = &mut cancelled => return Ok(()),
            e = flow.socket.next_event(&mut buf) => e,
        };
        if event.is_ok() {
            failures = 0;
        }
        let result = match event {
            Ok(ProbeEvent::TxTimestamp { key, kernel_ns }) => {
                let seq = lock(&flow.tx_keys).stamped(key, kernel_ns);
                match seq {
                    Some(seq) => lock(&shared.pending).on_tx_timestamp(seq, kernel_ns),
                    None => continue,
                }
            }
            Ok(ProbeEvent::SendDone { key }) => {
                lock(&flow.tx_keys).completed(key);
                continue;
            }
            Ok(ProbeEvent::SendFailed { key }) => {
                // Counted with the outcome (send_completion_error) in record().
                match lock(&flow.tx_keys).completed(key) {
                    Some(seq) => lock(&shared.pending).on_send_failed(seq),
                    None => continue,
                }
            }
            Ok(ProbeEvent::Datagram {
                len,
                host_ns,
                kernel_ns,
                truncated,
                ..
            }) => {
                if truncated {
                    shared.metrics.malformed("prober", "truncated");
                    continue;
                }
                let Some(message) = ack_for_this_prober(&shared, &buf[..len]) else {
                    continue;
                };
                let keys = shared.probe_keys.keys();
                let mut pending = lock(&shared.pending);
                // The tag is checked against the endpoint id of the probe's
                // target, under the same lock as the match: an ACK that does
                // not verify never touches the pending table.
                let Some(ctx) = pending.context(message.seq) else {
                    // Late, or never ours: nothing to check the tag against.
                    drop(pending);
                    shared.metrics.unmatched(Unmatched::UnknownSeq.category());
                    continue;
                };
                let path = &ctx.target.path;
                let verified = verify(keys.as_deref(), &buf[..len], &path.target_endpoint);
                let dropped = shared.emulated.as_ref().is_some_and(|fabric| {
                    fabric.drops(&path.target_endpoint, &path.source_endpoint)
                });
                if let Err(failure) = verified {
                    // Forged, or answered by another responder than the
                    // probe's target: the probe times out as lost.
                    drop(pending);
                    shared
                        .metrics
                        .probe_auth_failed(auth::kind_label(message.kind), failure.category());
                    continue;
                }
                if dropped {
                    continue;
                }
                match message.kind {
                    MessageType::Ack1 => pending.on_ack1(message.seq, Stamp { host_ns, kernel_ns }),
                    MessageType::Ack2 => pending.on_ack2(
                        message.seq,
                        message.t3_ns,
                        message.t4_ns,
                        message.responder_software_timed(),
                    ),
                    // Counted and dropped by ack_for_this_prober.
                    MessageType::Probe => continue,
                }
            }
            Ok(_) => continue,
            Err(e) => {
                failures += 1;
                if failures >= MAX_RECEIVE_FAILURES {
                    tracing::error!(error = %e, failures, "prober socket keeps failing to receive; giving up on it");
                    return Err(e);
                }
                tracing::warn!(error = %e, "prober socket receive failed");
                tokio::time::sleep(RECEIVE_RETRY).await;
                continue;
            }
        };
        match result {
            Ok(Some(outcome)) => record(&shared, outcome),
            Ok(None) => {}
            Err(unmatched) => shared.metrics.unmatched(unmatched.category()),
        }
    }
}

/// The message in `bytes` if it decodes, is an ACK and is meant for this
/// prober; else counts why not. Its tag is checked by the caller, against
/// the endpoint id of the target of the probe it answers.
fn ack_for_this_prober<P>(shared: &Shared<P>, bytes: &[u8]) -> Option<Message> {
    let message = match Message::decode(bytes) {
        Ok(m) => m,
        Err(e) => {
            shared.metrics.malformed("prober", e.category());
            return None;
        }
    };
    if message.kind == MessageType::Probe {
        shared.metrics.malformed("prober", "unexpected_probe");
        return None;
    }
    if message.prober_id != shared.prober_id {
        shared.metrics.unmatched("other_prober");
        return None;
    }
    Some(message)
}

/// Expires probes past their deadline and hands finished windows to the reporter.
async fn sweep<P>(
    shared: Arc<Shared<P>>,
    summaries: mpsc::Sender<Vec<WindowSummary>>,
    cancel: CancellationToken,
) -> Result<(), TransportError> {
    let mut tick = tokio::time::interval(Duration::from_millis(10));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut ticks: u64 = 0;
    loop {
        tokio::select! {
            () = cancel.cancelled() => return Ok(()),
            _ = tick.tick() => {}
        }
        ticks += 1;
        let expired = lock(&shared.pending).expire(host_now_ns());
        for outcome in expired {
            record(&shared, outcome);
        }
        if !ticks.is_multiple_of(10) {
            continue;
        }
        shared.metrics.set_pending(lock(&shared.pending).len());
        // A window closes once every probe sent in it has had its full timeout.
        let grace = shared.timeout_ms.load(Ordering::Relaxed) + 100;
        let finished = lock(&shared.aggregator).take_finished(unix_now_ms(), grace);
        if finished.unresolved > 0 {
            shared
                .metrics
                .windows_dropped("unresolved_probes", finished.unresolved);
        }
        if !finished.summaries.is_empty() && summaries.try_send(finished.summaries).is_err() {
            shared.metrics.windows_dropped("reporter_busy", 1);
        }
    }
}

/// Books one finished probe in the metrics and its window.
fn record<P>(shared: &Shared<P>, outcome: Outcome<ProbeCtx<P>>) {
    match outcome {
        Outcome::Answered {
            ctx,
            window_start_ms,
            times,
            ..
        } => {
            let result = classify(&times);
            match &result {
                Ok(sample) => shared.metrics.answered(&ctx.target.labels, sample),
                Err(reason) => shared.metrics.invalid(&ctx.target.labels, *reason),
            }
            lock(&shared.aggregator).on_answered(window_start_ms, &ctx.target.path, result);
        }
        Outcome::Lost {
            ctx,
            flow,
            window_start_ms,
        } => {
            shared.metrics.lost(&ctx.target.labels);
            lock(&shared.aggregator).on_lost(window_start_ms, &ctx.target.path, flow);
        }
        Outcome::SendFailed {
            ctx,
            window_start_ms,
            ..
        } => {
            // Only a send the transport accepted and then failed (an RDMA
            // completion error) ends here: it was counted sent, take it back.
            shared.metrics.sent_nothing("send_completion_error");
            lock(&shared.aggregator).on_send_failed(window_start_ms, &ctx.target.path);
        }
    }
}

#[cfg(test)]
mod tests {
    use std::io;
    use std::sync::atomic::AtomicU32;

    use pingmesh_proto::v1::{Endpoint, PingTarget};

    use super::*;
    use crate::transport::TimestampSupport;
    use crate::transport::socket::SendReceipt;

    /// A socket whose sends succeed and whose receives always fail.
    #[derive(Default)]
    struct BrokenReceive {
        receives: AtomicU32,
    }

    impl ProbeSocket for BrokenReceive {
        type Peer = u32;
        fn timestamp_support(&self) -> TimestampSupport {
            TimestampSupport::NONE
        }
        async fn send_to(&self, _: &[u8], _: u32) -> Result<SendReceipt, TransportError> {
            Ok(SendReceipt {
                host_ns: host_now_ns(),
                tx_key: None,
            })
        }
        async fn next_event(&self, _: &mut [u8]) -> Result<ProbeEvent<u32>, TransportError> {
            self.receives.fetch_add(1, Ordering::Relaxed);
            Err(TransportError::Receive {
                source: io::Error::other("queue pair in error state"),
            })
        }
    }

    struct OneSocket(Arc<BrokenReceive>, bool);

    impl FlowTransport for OneSocket {
        type Socket = BrokenReceive;
        fn target_address(&self, _: &Endpoint) -> Result<u32, &'static str> {
            Ok(7)
        }
        fn open_flows(&mut self, _: u16) -> Result<Vec<Arc<BrokenReceive>>, TransportError> {
            let first = !self.1;
            self.1 = true;
            Ok(if first {
                vec![self.0.clone()]
            } else {
                Vec::new()
            })
        }
        fn route(&self, target: u32, _: u16) -> (usize, u32) {
            (0, target)
        }
    }

    /// Runs `pacing` as the prober does (sleep until the next due, send
    /// everything due) for `run`: each target's send times, and wake-ups.
    fn paced(intervals: &[Duration], run: Duration) -> (Vec<Vec<Instant>>, usize) {
        let start = Instant::now();
        let mut pacing = Pacing::new(intervals, start);
        let mut sent = vec![Vec::new(); intervals.len()];
        let mut wakeups = 0;
        while let Some(now) = pacing.next_due().filter(|&t| t < start + run) {
            wakeups += 1;
            while let Some(i) = pacing.pop_due_by(now) {
                sent[i].push(now);
            }
        }
        (sent, wakeups)
    }

    #[test]
    fn probes_due_soon_share_a_wake_up_and_every_target_keeps_its_rate() {
        // A ToR mesh of 41 nodes at 10 pps: a probe due every 2.5 ms.
        let (sent, wakeups) = paced(&[Duration::from_millis(100); 40], Duration::from_secs(20));
        let total: usize = sent.iter().map(Vec::len).sum();
        for times in &sent {
            // 20 s at 10 pps, periods jittered by ±10 %.
            assert!((190..=210).contains(&times.len()), "{} probes", times.len());
            let closest = times.windows(2).map(|w| w[1] - w[0]).min();
            assert!(closest >= Some(Duration::from_millis(80)), "{closest:?}");
        }
        assert!(
            wakeups * 10 < total * 7,
            "{wakeups} wake-ups for {total} probes"
        );
        // Fast targets may leave only a tenth of their period early.
        let (sent, _) = paced(&[Duration::from_millis(2); 2], Duration::from_secs(2));
        for times in &sent {
            assert!(
                (950..=1050).contains(&times.len()),
                "{} probes",
                times.len()
            );
            let closest = times.windows(2).map(|w| w[1] - w[0]).min();
            assert!(closest >= Some(Duration::from_micros(1_600)), "{closest:?}");
        }
    }

    #[test]
    fn targets_get_at_most_as_many_flows_as_the_flow_masks_can_tell_apart() {
        let metrics = AgentMetrics::new("n1", false).unwrap();
        let target = |flows| PingTarget {
            source_endpoint: "n1/e0".into(),
            target: Some(Endpoint::default()),
            target_node: "n2".into(),
            kind: TargetKind::TorMesh as i32,
            rate_pps: 10.0,
            flows,
            source_tor: String::new(),
            flow_label: 0,
        };
        let list = Pinglist {
            version: 1,
            window_ms: 1_000,
            probe_timeout_ms: 100,
            targets: vec![target(1_000), target(64), target(0), target(u32::MAX)],
            probe_keys: None,
        };
        let transport = OneSocket(Arc::new(BrokenReceive::default()), false);
        let flows: Vec<u16> = resolve_targets(&list, "n1/e0", &transport, &metrics)
            .iter()
            .map(|t| t.flows)
            .collect();
        assert_eq!(flows, [64, 64, 1, 64]);
    }

    mod authentication {
        use pingmesh_proto::probe_auth::keys_around;
        use pingmesh_proto::v1::Transport;

        use super::*;
        use crate::probe::auth::ProbeKeyRing;
        use crate::probe::flows::UdpFlows;
        use crate::probe::responder::{ResponderObserver, run_responder};
        use crate::probe::wire::{AUTHENTICATED_LEN, TAG_LEN};
        use crate::transport::TimestampMode;

        const MASTER: &[u8] = b"0123456789abcdef0123456789abcdef";

        struct Quiet;
        impl ResponderObserver for Quiet {
            fn answered(&self, _: bool) {}
            fn malformed(&self, _: &'static str) {}
            fn dropped(&self, _: &'static str) {}
            fn auth_failed(&self, _: &'static str) {}
        }

        /// A pinglist probing `target` at 50 pps, with the mesh's keys of epoch 40.
        fn pinglist_to(target: std::net::SocketAddr) -> Arc<Pinglist> {
            Arc::new(Pinglist {
                version: 1,
                window_ms: 1_000,
                probe_timeout_ms: 200,
                targets: vec![PingTarget {
                    source_endpoint: "n1/udp0".into(),
                    target: Some(Endpoint {
                        id: "n2/udp0".into(),
                        transport: Transport::Udp as i32,
                        address: target.to_string(),
                        ..Endpoint::default()
                    }),
                    target_node: "n2".into(),
                    kind: TargetKind::TorMesh as i32,
                    rate_pps: 50.0,
                    flows: 1,
                    source_tor: String::new(),
                    flow_label: 0,
                }],
                probe_keys: Some(keys_around(MASTER, 40)),
            })
        }

        /// Runs a prober at `target` until it reports a window with probes
        /// sent; returns that window and the prober's metrics text.
        async fn probe_one_window(target: std::net::SocketAddr) -> (WindowSummary, String) {
            let metrics = Arc::new(AgentMetrics::new("n1", false).unwrap());
            let (pinglist_tx, pinglists) = watch::channel(None);
            let (summaries_tx, mut summaries) = mpsc::channel(8);
            pinglist_tx.send_replace(Some(pinglist_to(target)));
            let cancel = CancellationToken::new();
            let prober = tokio::spawn(run_prober(
                ProberConfig::new("n1/udp0", 1_024),
                UdpFlows::new([127, 0, 0, 1].into(), TimestampMode::Off, 1),
                metrics.clone(),
                pinglists,
                summaries_tx,
                cancel.clone(),
            ));
            let window = tokio::time::timeout(Duration::from_secs(10), async {
                loop {
                    let batch = summaries.recv().await.expect("prober gone");
                    // The first window may have begun before the first probe.
                    if let Some(w) = batch.into_iter().find(|w| w.sent >= 10) {
                        return w;
                    }
                }
            })
            .await
            .expect("a full window in time");
            cancel.cancel();
            prober.await.unwrap().unwrap();
            let text = String::from_utf8(metrics.encode()).unwrap();
            (window, text)
        }

        /// The value of the auth-failure series of `kind` and `reason`.
        fn auth_failures(text: &str, kind: &str, reason: &str) -> u64 {
            let (kind, reason) = (format!("kind=\"{kind}\""), format!("reason=\"{reason}\""));
            text.lines()
                .filter(|l| l.starts_with("pingmesh_probe_auth_failures_total{"))
                .filter(|l| l.contains(&kind) && l.contains(&reason))
                .find_map(|l| l.rsplit(' ').next()?.parse().ok())
                .unwrap_or(0)
        }

        #[tokio::test]
        async fn forged_acks_do_not_complete_probes_and_are_counted() {
            // The forger sees every probe (it is the target) and answers with
            // the right prober id and seq: ACK1 plain, ACK2 with a made-up tag
            // under a key id the prober holds.
            let forger = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
            let target = forger.local_addr().unwrap();
            let forging = tokio::spawn(async move {
                let mut buf = [0u8; 128];
                loop {
                    let Ok((len, from)) = forger.recv_from(&mut buf).await else {
                        return;
                    };
                    let Ok(probe) = Message::decode(&buf[..len]) else {
                        continue;
                    };
                    assert_eq!(len, AUTHENTICATED_LEN, "probes go out signed");
                    let key_id = buf[7];
                    let ack1 = Message::ack1(&probe).encode();
                    let ack2 = Message::ack2(&probe, 1_000, 2_000, true)
                        .encode_authenticated(key_id, |_| [0x5A; TAG_LEN]);
                    let _ = forger.send_to(&ack1, from).await;
                    let _ = forger.send_to(&ack2, from).await;
                }
            });
            let (window, text) = probe_one_window(target).await;
            forging.abort();
            assert_eq!(window.ok, 0, "a forged ACK completed a probe: {window:?}");
            assert_eq!(window.lost, window.sent);
            let missing = auth_failures(&text, "ack1", "missing_tag");
            let bad = auth_failures(&text, "ack2", "bad_tag");
            assert!(
                missing >= 10 && bad >= 10,
                "ack1 missing_tag {missing}, ack2 bad_tag {bad}"
            );
        }

        #[tokio::test]
        async fn acks_signed_by_another_responder_do_not_complete_probes() {
            // The probe to "n2/udp0" was reflected to another agent's
            // responder, "n3/udp0", which holds the mesh's keys and answers
            // it with tags valid for itself: the probe to n2 is still lost.
            use crate::probe::auth::seal;
            let keys =
                pingmesh_proto::probe_auth::KeySet::from_proto(&keys_around(MASTER, 40)).unwrap();
            let other = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
            let target = other.local_addr().unwrap();
            let answering = tokio::spawn(async move {
                let mut buf = [0u8; 128];
                loop {
                    let Ok((len, from)) = other.recv_from(&mut buf).await else {
                        return;
                    };
                    let Ok(probe) = Message::decode(&buf[..len]) else {
                        continue;
                    };
                    let ack1 = seal(Some(&keys), &Message::ack1(&probe), "n3/udp0");
                    let ack2 = seal(
                        Some(&keys),
                        &Message::ack2(&probe, 1_000, 2_000, true),
                        "n3/udp0",
                    );
                    let _ = other.send_to(ack1.as_bytes(), from).await;
                    let _ = other.send_to(ack2.as_bytes(), from).await;
                }
            });
            let (window, text) = probe_one_window(target).await;
            answering.abort();
            assert_eq!(
                window.ok, 0,
                "another responder's ACK completed a probe: {window:?}"
            );
            assert_eq!(window.lost, window.sent);
            let ack1 = auth_failures(&text, "ack1", "bad_tag");
            let ack2 = auth_failures(&text, "ack2", "bad_tag");
            assert!(
                ack1 >= 10 && ack2 >= 10,
                "ack1 bad_tag {ack1}, ack2 bad_tag {ack2}"
            );
        }

        #[tokio::test]
        async fn a_responder_with_the_meshs_keys_completes_every_probe() {
            let ring = ProbeKeyRing::off();
            ring.update(Some(&keys_around(MASTER, 41))).unwrap();
            let socket = Arc::new(
                crate::transport::udp::UdpProbeSocket::bind(
                    ([127, 0, 0, 1], 0).into(),
                    TimestampMode::Off,
                )
                .unwrap(),
            );
            let target = socket.local_addr();
            let cancel = CancellationToken::new();
            // An epoch ahead of the prober: it signs with a key the prober
            // holds as "next", as a peer whose pinglist came first would.
            let responder = tokio::spawn(run_responder(
                socket,
                Arc::new(Quiet),
                ring,
                "n2/udp0".into(),
                cancel.clone(),
            ));
            let (window, text) = probe_one_window(target).await;
            cancel.cancel();
            responder.await.unwrap().unwrap();
            assert_eq!((window.ok, window.lost), (window.sent, 0), "{window:?}");
            // The gauge names the key the prober signs with: epoch 40's.
            let key_line = format!(
                "pingmesh_probe_key_id{{node=\"n1\"}} {}",
                pingmesh_proto::probe_auth::key_id(40)
            );
            assert!(
                text.lines().any(|l| l == key_line),
                "{key_line} not in:\n{text}"
            );
            for kind in ["ack1", "ack2"] {
                for reason in ["missing_tag", "unknown_key", "bad_tag"] {
                    assert_eq!(auth_failures(&text, kind, reason), 0, "{kind} {reason}");
                }
            }
        }
    }

    #[tokio::test]
    async fn a_socket_that_keeps_failing_to_receive_ends_the_prober_with_its_error() {
        let socket = Arc::new(BrokenReceive::default());
        let metrics = Arc::new(AgentMetrics::new("n1", false).unwrap());
        let (pinglist_tx, pinglists) = watch::channel(None);
        let (summaries, _summaries_rx) = mpsc::channel(8);
        pinglist_tx.send_replace(Some(Arc::new(Pinglist {
            version: 1,
            window_ms: 1_000,
            probe_timeout_ms: 100,
            targets: vec![PingTarget {
                source_endpoint: "n1/e0".into(),
                target: Some(Endpoint::default()),
                target_node: "n2".into(),
                kind: TargetKind::TorMesh as i32,
                rate_pps: 10.0,
                flows: 1,
                source_tor: String::new(),
                flow_label: 0,
            }],
            probe_keys: None,
        })));
        let cancel = CancellationToken::new();
        let ended = tokio::time::timeout(
            Duration::from_secs(10),
            run_prober(
                ProberConfig::new("n1/e0", 64),
                OneSocket(socket.clone(), false),
                metrics,
                pinglists,
                summaries,
                cancel.clone(),
            ),
        )
        .await
        .expect("the prober gave up in time");
        assert_eq!(ended.unwrap_err().category(), "receive");
        assert_eq!(
            socket.receives.load(Ordering::Relaxed),
            MAX_RECEIVE_FAILURES
        );
        assert!(
            !cancel.is_cancelled(),
            "the caller's token is the caller's to cancel"
        );
    }
}
