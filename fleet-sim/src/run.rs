//! The scenario: start the controller, bring the fleet up, measure steady
//! windows, a membership change, and a controller restart.

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use pingmesh_proto::window::{unix_now_ms, window_start};
use tokio::task::JoinSet;
use tonic::transport::{Channel, Endpoint};

use crate::agent::{self, Fleet};
use crate::controller::{
    self, ChildController, Launch, ProcSample, Scrape, cpu_share, proc_sample, scrape,
};
use crate::fleet::{FleetShape, node_name};

#[derive(Debug, Clone)]
pub enum Target {
    Child { binary: PathBuf },
    Existing { grpc: SocketAddr, http: SocketAddr },
}

#[derive(Debug, Clone)]
pub struct Options {
    pub window_ms: u32,
    pub windows: u32,
    pub agents_per_connection: usize,
    pub settle_limit: Duration,
    pub membership: bool,
    pub restart: bool,
}

/// Latencies of one membership change as the affected agents saw it.
#[derive(Debug, Clone, Default)]
pub struct Propagation {
    pub agents: usize,
    pub p50: Option<Duration>,
    pub max: Option<Duration>,
}

#[derive(Debug, Default)]
pub struct Outcome {
    pub join: Option<Duration>,
    pub steady_cpu: Option<f64>,
    /// The simulator's own CPU over the same windows (it shares the machine).
    pub simulator_cpu: Option<f64>,
    pub rss_bytes: Option<u64>,
    pub peak_rss_bytes: Option<u64>,
    pub before: Scrape,
    pub after: Scrape,
    pub windows_judged: f64,
    /// Mean seconds per judged window: ingest, evaluate, publish.
    pub phases: Vec<(&'static str, Option<f64>)>,
    pub report_latency: Vec<Duration>,
    pub paths_per_window: usize,
    pub summaries_accepted: u64,
    pub report_failures: u64,
    pub traces_run: u64,
    pub membership_join: Option<Propagation>,
    pub membership_leave: Option<Propagation>,
    pub restart_ready: Option<Duration>,
    pub reconnect: Option<Duration>,
    pub reconnect_settled: Option<Duration>,
    pub reconnect_cpu: Option<f64>,
    pub reconnect_peak_rss_bytes: Option<u64>,
    pub restart_exit_ok: Option<bool>,
    pub controller_exited: Option<String>,
    pub controller_errors: Vec<String>,
    pub agent_errors: Vec<String>,
    pub agent_error_count: u64,
}

struct Controller {
    child: Option<ChildController>,
    grpc: SocketAddr,
    http: SocketAddr,
}

impl Controller {
    fn sample(&self) -> Option<ProcSample> {
        proc_sample(self.child.as_ref()?.pid()?)
    }
}

async fn start(
    target: &Target,
    window_ms: u32,
    dir: &std::path::Path,
) -> anyhow::Result<Controller> {
    match target {
        Target::Existing { grpc, http } => Ok(Controller {
            child: None,
            grpc: *grpc,
            http: *http,
        }),
        Target::Child { binary } => {
            let (grpc, http) = controller::free_addrs()?;
            let child = ChildController::start(Launch {
                binary: binary.clone(),
                registry: dir.join("registry.db"),
                grpc_addr: grpc,
                http_addr: http,
                window_ms,
                log: dir.join("controller.log"),
            })
            .await?;
            Ok(Controller {
                child: Some(child),
                grpc,
                http,
            })
        }
    }
}

/// Waits until `done()` or `limit`; the time it took.
async fn wait_for(limit: Duration, mut done: impl FnMut() -> bool) -> Option<Duration> {
    let began = Instant::now();
    while began.elapsed() < limit {
        if done() {
            return Some(began.elapsed());
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    None
}

/// Waits until no pinglist arrived for `quiet`; when the last one came.
async fn wait_quiet(fleet: &Fleet, quiet: Duration, limit: Duration) -> Instant {
    let began = Instant::now();
    loop {
        let last = fleet.last_pinglist_at();
        if last.elapsed() >= quiet || began.elapsed() > limit {
            return last;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn channel(addr: SocketAddr) -> anyhow::Result<Channel> {
    Ok(Endpoint::from_shared(format!("http://{addr}"))?
        .connect_timeout(Duration::from_secs(5))
        .http2_keep_alive_interval(Duration::from_secs(10))
        .keep_alive_timeout(Duration::from_secs(20))
        .connect_lazy())
}

/// Sleeps until `ms` (Unix milliseconds).
async fn sleep_until_unix(ms: u64) {
    tokio::time::sleep(Duration::from_millis(ms.saturating_sub(unix_now_ms()))).await;
}

pub async fn run(shape: FleetShape, target: Target, options: &Options) -> anyhow::Result<Outcome> {
    let dir = tempfile::tempdir().context("temporary directory")?;
    let mut ctl = start(&target, options.window_ms, dir.path()).await?;
    let fleet = Arc::new(Fleet::new(shape.clone()));
    let mut out = Outcome::default();
    let mut agents = JoinSet::new();

    // Cold start: every agent at once.
    let began = Instant::now();
    let mut chan = channel(ctl.grpc)?;
    for i in 0..shape.nodes {
        if i % options.agents_per_connection == 0 {
            chan = channel(ctl.grpc)?;
        }
        agents.spawn(agent::run(fleet.clone(), shape.node(i), chan.clone()));
    }
    let nodes = shape.nodes;
    out.join = wait_for(options.settle_limit, || {
        fleet.connected.load(Ordering::Relaxed) >= nodes
    })
    .await
    .map(|_| began.elapsed());
    if out.join.is_none() {
        bail!(
            "only {} of {nodes} agents connected within {:?}",
            fleet.connected.load(Ordering::Relaxed),
            options.settle_limit
        );
    }
    wait_quiet(&fleet, Duration::from_secs(1), options.settle_limit).await;

    steady(&fleet, &ctl, options, &mut out).await?;

    if options.membership {
        let (join, leave) = membership(&fleet, &shape, ctl.grpc, options).await?;
        out.membership_join = Some(join);
        out.membership_leave = Some(leave);
    }

    if options.restart {
        restart(&fleet, &mut ctl, options, &mut out).await?;
    }

    agents.abort_all();
    if let Some(child) = ctl.child.as_mut() {
        if let Some(status) = child.exited() {
            out.controller_exited = Some(status.to_string());
        }
        out.controller_errors = controller::error_lines(&child.launch.log);
        child.stop().await?;
    }
    out.report_failures = fleet.report_failures.load(Ordering::Relaxed);
    out.traces_run = fleet.traces_run.load(Ordering::Relaxed);
    out.agent_errors = fleet.errors();
    out.agent_error_count = fleet.error_count.load(Ordering::Relaxed);
    Ok(out)
}

/// Steady windows: controller CPU and memory, window processing, reports.
async fn steady(
    fleet: &Fleet,
    ctl: &Controller,
    options: &Options,
    out: &mut Outcome,
) -> anyhow::Result<()> {
    // Steady state: from the first window every agent reports in full.
    let window = u64::from(options.window_ms);
    let first = window_start(unix_now_ms(), options.window_ms) + window;
    // Measure from just after the window before `first` was judged.
    sleep_until_unix(first + window / 2).await;
    let s0 = scrape(ctl.http).await?;
    let p0 = ctl.sample();
    let me0 = proc_sample(std::process::id());
    fleet.take_report_latencies();
    let accepted0 = fleet.summaries_accepted.load(Ordering::Relaxed);
    sleep_until_unix(first + window / 2 + u64::from(options.windows) * window).await;
    // Every measured window judged (the last one a little after its end).
    let judged_by = Instant::now() + Duration::from_millis(window * 3 + 5_000);
    let mut s1 = scrape(ctl.http).await?;
    while s1.windows_evaluated < s0.windows_evaluated + f64::from(options.windows)
        && Instant::now() < judged_by
    {
        tokio::time::sleep(Duration::from_millis(200)).await;
        s1 = scrape(ctl.http).await?;
    }
    let p1 = ctl.sample();
    let me1 = proc_sample(std::process::id());
    out.simulator_cpu = me0
        .as_ref()
        .zip(me1.as_ref())
        .and_then(|(a, b)| cpu_share(a, b));
    out.steady_cpu = p0
        .as_ref()
        .zip(p1.as_ref())
        .and_then(|(a, b)| cpu_share(a, b));
    out.rss_bytes = p1.map(|p| p.rss_bytes);
    out.peak_rss_bytes = p1.map(|p| p.peak_rss_bytes);
    out.windows_judged = s1.windows_evaluated - s0.windows_evaluated;
    out.phases = ["ingest", "evaluate", "publish"]
        .into_iter()
        .map(|p| (p, s0.phase_mean(&s1, p)))
        .collect();
    out.report_latency = fleet.take_report_latencies();
    out.paths_per_window = fleet.targets.load(Ordering::Relaxed);
    out.summaries_accepted = fleet.summaries_accepted.load(Ordering::Relaxed) - accepted0;
    out.before = s0;
    out.after = s1;
    Ok(())
}

/// SIGTERM, start again on the same ports and registry, and time the fleet's return.
async fn restart(
    fleet: &Fleet,
    ctl: &mut Controller,
    options: &Options,
    out: &mut Outcome,
) -> anyhow::Result<()> {
    let Some(child) = ctl.child.as_mut() else {
        return Ok(());
    };
    let nodes = fleet.shape.nodes;
    let status = child.stop().await?;
    out.restart_exit_ok = Some(status.success());
    let launch = child.launch.clone();
    let restarted = Instant::now();
    let fresh = ChildController::start(launch).await?;
    out.restart_ready = Some(restarted.elapsed());
    ctl.child = Some(fresh);
    out.reconnect = wait_for(options.settle_limit, || {
        fleet.connected.load(Ordering::Relaxed) >= nodes
    })
    .await
    .map(|_| restarted.elapsed());
    if out.reconnect.is_some() {
        let last = wait_quiet(fleet, Duration::from_secs(2), options.settle_limit).await;
        out.reconnect_settled = Some(last.saturating_duration_since(restarted));
    }
    // The new process started at zero: its CPU time is all the restart's.
    let sample = ctl.sample();
    let wall = restarted.elapsed().as_secs_f64();
    out.reconnect_cpu = sample.map(|p| p.cpu_secs / wall);
    out.reconnect_peak_rss_bytes = sample.map(|p| p.peak_rss_bytes);
    Ok(())
}

/// One node joins the first rack, then leaves: how long until the affected
/// agents' pinglists show it, and stop showing it.
async fn membership(
    fleet: &Arc<Fleet>,
    shape: &FleetShape,
    grpc: SocketAddr,
    options: &Options,
) -> anyhow::Result<(Propagation, Propagation)> {
    let joiner = shape.node(shape.nodes);
    let prefix = format!("{}/", node_name(shape.nodes));
    fleet.clear_marker_events();
    fleet.set_marker(Some(prefix));
    let join_began = Instant::now();
    let handle = tokio::spawn(agent::run(fleet.clone(), joiner, channel(grpc)?));
    let quiet = Duration::from_secs(2).max(Duration::from_millis(u64::from(options.window_ms)));
    // Until the set of agents whose pinglist holds the joiner stops growing.
    wait_stable(quiet, options.settle_limit, || {
        let seen: HashSet<usize> = fleet
            .marker_events()
            .iter()
            .filter(|e| e.2)
            .map(|e| e.0)
            .collect();
        seen.len()
    })
    .await;
    let events = fleet.marker_events();
    let join = propagation(&events, join_began, true, None);
    let holders: HashSet<usize> = events.iter().filter(|e| e.2).map(|e| e.0).collect();
    fleet.clear_marker_events();
    let left = Instant::now();
    handle.abort();
    let _ = handle.await;
    wait_stable(quiet, options.settle_limit, || {
        let gone: HashSet<usize> = fleet
            .marker_events()
            .iter()
            .filter(|e| !e.2 && holders.contains(&e.0))
            .map(|e| e.0)
            .collect();
        gone.len()
    })
    .await;
    let leave = propagation(&fleet.marker_events(), left, false, Some(&holders));
    fleet.set_marker(None);
    Ok((join, leave))
}

/// Waits until `count()` is above zero and unchanged for `quiet` (or `limit`).
async fn wait_stable(quiet: Duration, limit: Duration, mut count: impl FnMut() -> usize) {
    let began = Instant::now();
    let (mut last, mut since) = (0, Instant::now());
    while began.elapsed() < limit {
        let now = count();
        if now != last {
            (last, since) = (now, Instant::now());
        } else if now > 0 && since.elapsed() >= quiet {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// For each agent (of `only`, when given), the first pinglist after `since`
/// whose holding of the marked node is `holds`.
fn propagation(
    events: &[(usize, Instant, bool)],
    since: Instant,
    holds: bool,
    only: Option<&HashSet<usize>>,
) -> Propagation {
    let mut first: HashMap<usize, Duration> = HashMap::new();
    for &(agent, at, h) in events {
        if h == holds && at >= since && only.is_none_or(|o| o.contains(&agent)) {
            first
                .entry(agent)
                .or_insert_with(|| at.duration_since(since));
        }
    }
    let mut all: Vec<Duration> = first.into_values().collect();
    all.sort();
    Propagation {
        agents: all.len(),
        p50: all.get(all.len() / 2).copied(),
        max: all.last().copied(),
    }
}
