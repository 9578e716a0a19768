//! The tracer's life in the agent: checks what it needs, loads the BPF
//! programs, attaches every hook that can attach, and then, on a thread of
//! its own (the ring buffer is read with a blocking `poll`), feeds the flow
//! table, rescans `/proc` for libibverbs copies that appeared since, and
//! expires flows that died silently.
//!
//! Hooks are tried in this order and each one that attaches is kept:
//! 1. the `sock:inet_sock_set_state` tracepoint (needs tracefs);
//! 2. kernel hooks on `ib_core`'s modify/destroy paths (a second BPF object:
//!    fentry, else kprobe; they also see kernel RDMA consumers). Off with the
//!    reason in `pingmesh_tracer_ib_core_state` when `ib_core` or its BTF is
//!    missing or neither mechanism attaches; retried at each rescan while
//!    `ib_core` is absent, in case the module is loaded later;
//! 3. uprobes on each libibverbs file mapped by a process in the host's
//!    `/proc` (needs the host PID namespace), now and at every rescan.
//!
//! Nothing here can stop the agent: when the tracer cannot run, the reason
//! goes to `pingmesh_tracer_state{reason}` and one log line, and probing goes on.
use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use pingmesh_proto::window::unix_now_ms;
use tokio_util::sync::CancellationToken;

use super::cgroup::PodResolver;
use super::host::{HostResolver, flow_alive};
use super::metrics::TracerMetrics;
use super::table::{FlowTable, Resolve, TableLimits};
use crate::tracer::{Hook, IbCoreState, TraceEvent, Tracer, TracerError};

/// The flow table shared by the consumer thread and the reporter.
pub type SharedTable = Arc<Mutex<FlowTable>>;

/// Locks the table; a panic elsewhere while holding it leaves it usable.
pub fn lock(table: &SharedTable) -> MutexGuard<'_, FlowTable> {
    table
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

#[derive(Debug, Clone)]
pub struct TrackingConfig {
    /// The host's `/proc` (the agent runs with `hostPID`).
    pub proc_root: PathBuf,
    /// RNICs in sysfs (`/sys/class/infiniband`), for local GIDs.
    pub infiniband_sysfs: PathBuf,
    /// How often `/proc` is scanned for new libibverbs copies.
    pub rescan_every: Duration,
    /// How often idle flows are checked.
    pub expire_every: Duration,
    pub limits: TableLimits,
}

impl TrackingConfig {
    pub fn host(infiniband_sysfs: impl Into<PathBuf>) -> Self {
        Self {
            proc_root: PathBuf::from("/proc"),
            infiniband_sysfs: infiniband_sysfs.into(),
            rescan_every: Duration::from_secs(10),
            expire_every: Duration::from_secs(5),
            limits: TableLimits::default(),
        }
    }
}

/// Why the tracer cannot run at all; a `pingmesh_tracer_state` reason.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TracerOff {
    pub reason: &'static str,
    pub detail: String,
}

/// Starts tracing: the table is returned at once (empty while the tracer is
/// off); the consumer thread runs until `cancel`.
pub fn start(
    config: TrackingConfig,
    metrics: TracerMetrics,
    cancel: CancellationToken,
) -> SharedTable {
    let table = Arc::new(Mutex::new(FlowTable::new(config.limits)));
    let shared = table.clone();
    let spawned = std::thread::Builder::new()
        .name("tracer".into())
        .spawn(move || match open(&config.proc_root, &metrics) {
            Ok(tracer) => consume(tracer, &config, &shared, &metrics, &cancel),
            Err(off) => {
                metrics.set_state(off.reason);
                tracing::warn!(
                    reason = off.reason,
                    detail = %off.detail,
                    "service tracing is off; probing goes on without it"
                );
            }
        });
    if let Err(e) = spawned {
        tracing::warn!(error = %e, "cannot start the tracer thread; service tracing is off");
    }
    table
}

/// Checks the prerequisites, loads, attaches. `Err` when nothing can run.
pub fn open(proc_root: &Path, metrics: &TracerMetrics) -> Result<Tracer, TracerOff> {
    preflight()?;
    let mut tracer = Tracer::load().map_err(|e| match e {
        TracerError::Unsupported => TracerOff {
            reason: "unsupported_platform",
            detail: e.to_string(),
        },
        other => TracerOff {
            reason: "load_failed",
            detail: other.to_string(),
        },
    })?;
    let tcp = tracer.attach_tcp();
    metrics.set_hook(Hook::TcpStateTracepoint.kind(), tcp.is_ok());
    if let Err(e) = &tcp {
        metrics.attach_failed(Hook::TcpStateTracepoint.kind());
        let hint = if tracefs_mounted() {
            ""
        } else {
            "tracefs is not mounted at /sys/kernel/tracing"
        };
        tracing::warn!(error = %e, hint, "TCP service connections are not traced");
    }
    attach_kernel_hooks(&mut tracer, metrics);
    let mut failed = HashSet::new();
    attach_verbs(&mut tracer, proc_root, metrics, &mut failed);
    if tracer.active_hooks().is_empty() {
        // Uprobes may still attach when a service loads libibverbs later.
        metrics.set_state("no_hooks");
        tracing::warn!("no tracing hook attached yet; rescanning for libibverbs");
    } else {
        metrics.set_state("on");
        let hooks: Vec<String> = tracer
            .active_hooks()
            .iter()
            .map(ToString::to_string)
            .collect();
        tracing::info!(?hooks, "service tracing on");
    }
    Ok(tracer)
}

/// What can be told before loading: the platform, BTF, capabilities.
fn preflight() -> Result<(), TracerOff> {
    if !cfg!(all(target_os = "linux", feature = "ebpf")) {
        return Err(TracerOff {
            reason: "unsupported_platform",
            detail: TracerError::Unsupported.to_string(),
        });
    }
    if !Path::new("/sys/kernel/btf/vmlinux").exists() {
        return Err(TracerOff {
            reason: "no_btf",
            detail: "/sys/kernel/btf/vmlinux is missing (kernel without CONFIG_DEBUG_INFO_BTF, or /sys not mounted)".into(),
        });
    }
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    if let Some(missing) = missing_capabilities(&status) {
        return Err(TracerOff {
            reason: "no_privileges",
            detail: format!("missing {missing} (grant CAP_BPF and CAP_PERFMON, or run as root)"),
        });
    }
    Ok(())
}

/// `CAP_BPF` and `CAP_PERFMON` (or `CAP_SYS_ADMIN`, which implies both on
/// kernels before 5.8) from the `CapEff` line of `/proc/self/status`.
pub fn missing_capabilities(status: &str) -> Option<&'static str> {
    const CAP_SYS_ADMIN: u32 = 21;
    const CAP_PERFMON: u32 = 38;
    const CAP_BPF: u32 = 39;
    let eff = status
        .lines()
        .find_map(|l| l.strip_prefix("CapEff:"))
        .and_then(|v| u64::from_str_radix(v.trim(), 16).ok())?;
    let has = |cap: u32| eff & (1 << cap) != 0;
    if has(CAP_SYS_ADMIN) {
        return None;
    }
    match (has(CAP_BPF), has(CAP_PERFMON)) {
        (true, true) => None,
        (false, true) => Some("CAP_BPF"),
        (true, false) => Some("CAP_PERFMON"),
        (false, false) => Some("CAP_BPF and CAP_PERFMON"),
    }
}

fn tracefs_mounted() -> bool {
    Path::new("/sys/kernel/tracing/events").exists()
        || Path::new("/sys/kernel/debug/tracing/events").exists()
}

/// Loads and attaches the kernel RDMA hooks (`ib_core`), and says in the
/// metrics and the log what attached or why nothing did.
fn attach_kernel_hooks(tracer: &mut Tracer, metrics: &TracerMetrics) {
    let state = tracer.attach_ib_core().clone();
    metrics.set_ib_core_state(state.label());
    for hook in ["fentry", "kprobe"] {
        let on = state.label() == format!("on_{hook}");
        metrics.set_hook(&format!("{hook}_ib_modify_qp"), on);
        metrics.set_hook(&format!("{hook}_ib_destroy_qp"), on);
    }
    match &state {
        IbCoreState::On(how) => tracing::info!(
            mechanism = how.label(),
            "kernel RDMA hooks on (ib_core modify and destroy QP)"
        ),
        IbCoreState::Off { reason, detail } => {
            if matches!(reason, crate::tracer::IbCoreOff::AttachFailed) {
                metrics.attach_failed("kprobe_ib_modify_qp");
            }
            tracing::info!(
                reason = reason.label(),
                %detail,
                "kernel RDMA hooks off; kernel RDMA consumers are not traced"
            );
        }
        IbCoreState::NotTried => {}
    }
    if matches!(state, IbCoreState::On(_)) {
        metrics.set_state("on");
    }
}

/// Whether the kernel RDMA hooks should be tried again: `ib_core` was absent
/// and has appeared since.
fn retry_kernel_hooks(tracer: &Tracer) -> bool {
    matches!(tracer.ib_core_state(), IbCoreState::Off { reason, .. } if reason.retryable())
        && tracer.ib_core_present()
}

/// Attaches the uprobes to libibverbs copies not attached yet; logs each
/// failing file once.
fn attach_verbs(
    tracer: &mut Tracer,
    proc_root: &Path,
    metrics: &TracerMetrics,
    failed: &mut HashSet<PathBuf>,
) {
    for (hook, err) in tracer.attach_loaded_verbs(proc_root) {
        metrics.attach_failed(hook.kind());
        let library = match &hook {
            Hook::IbvModifyQp { library } | Hook::IbvDestroyQp { library } => library.clone(),
            Hook::TcpStateTracepoint | Hook::KernelModifyQp(_) | Hook::KernelDestroyQp(_) => {
                PathBuf::new()
            }
        };
        if failed.insert(library) {
            tracing::warn!(error = %err, "libibverbs copy not traced");
        }
    }
    let libraries = tracer
        .active_hooks()
        .iter()
        .filter(|h| matches!(h, Hook::IbvModifyQp { .. }))
        .count();
    metrics.set_verbs_libraries(libraries);
    metrics.set_hook("uprobe_ibv_modify_qp", libraries > 0);
    let destroy = tracer
        .active_hooks()
        .iter()
        .any(|h| matches!(h, Hook::IbvDestroyQp { .. }));
    metrics.set_hook("uprobe_ibv_destroy_qp", destroy);
    if libraries > 0 {
        metrics.set_state("on");
    }
}

/// The consumer loop: until `cancel`, read records into the table.
fn consume(
    mut tracer: Tracer,
    config: &TrackingConfig,
    table: &SharedTable,
    metrics: &TracerMetrics,
    cancel: &CancellationToken,
) {
    let mut resolver = HostResolver::new(
        PodResolver::host_with_proc(&config.proc_root),
        &config.infiniband_sysfs,
    );
    let mut failed = HashSet::new();
    let mut next_rescan = Instant::now() + config.rescan_every;
    let mut next_expiry = Instant::now() + config.expire_every;
    let mut malformed_seen = 0;
    let mut lost_seen = 0;
    let mut next_lost = Instant::now();
    let mut poll_errors = 0u64;
    while !cancel.is_cancelled() {
        match tracer.poll(Duration::from_millis(100)) {
            Ok(events) => apply(&events, table, &mut resolver, metrics),
            Err(e) => {
                poll_errors += 1;
                if poll_errors == 1 {
                    tracing::warn!(error = %e, "reading the tracer's ring buffer failed");
                }
                std::thread::sleep(Duration::from_millis(100));
            }
        }
        let malformed = tracer.malformed_records();
        metrics.malformed(malformed - malformed_seen.min(malformed));
        malformed_seen = malformed;
        let now = Instant::now();
        if now >= next_lost {
            // A counter the kernel keeps: read once a second, exported as a delta.
            next_lost = now + Duration::from_secs(1);
            let lost = tracer.lost_records();
            if lost > lost_seen {
                if lost_seen == 0 {
                    tracing::warn!(
                        lost,
                        "the tracer's ring buffer overflowed; records were lost \
                         (pingmesh_tracer_events_lost_total)"
                    );
                }
                metrics.lost(lost - lost_seen);
                lost_seen = lost;
            }
        }
        if now >= next_rescan {
            next_rescan = now + config.rescan_every;
            attach_verbs(&mut tracer, &config.proc_root, metrics, &mut failed);
            if retry_kernel_hooks(&tracer) {
                attach_kernel_hooks(&mut tracer, metrics);
            }
        }
        if now >= next_expiry {
            next_expiry = now + config.expire_every;
            let proc_root = &config.proc_root;
            let removed =
                lock(table).expire(unix_now_ms(), &mut |k, f| flow_alive(proc_root, k, f));
            metrics.expired(removed);
            publish_sizes(table, metrics);
        }
    }
}

/// Applies a batch of records to the table under one lock.
pub fn apply(
    events: &[TraceEvent],
    table: &SharedTable,
    resolver: &mut dyn Resolve,
    metrics: &TracerMetrics,
) {
    if events.is_empty() {
        return;
    }
    let now = unix_now_ms();
    {
        let mut t = lock(table);
        for event in events {
            let outcome = t.apply(event, resolver, now);
            metrics.event(event_kind(event), outcome);
        }
    }
    publish_sizes(table, metrics);
}

fn publish_sizes(table: &SharedTable, metrics: &TracerMetrics) {
    let t = lock(table);
    let rdma = t
        .flows()
        .iter()
        .filter(|(k, _)| matches!(k, super::FlowKey::Rdma { .. }))
        .count();
    metrics.set_flows(t.len() - rdma, rdma);
}

fn event_kind(event: &TraceEvent) -> &'static str {
    match event {
        TraceEvent::Tcp(_) => "tcp",
        TraceEvent::QpRtr(_) => "qp_rtr",
        TraceEvent::QpDestroy(_) => "qp_destroy",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn capabilities_are_read_from_cap_eff() {
        let status = |eff: u64| format!("Name:\tagent\nCapEff:\t{eff:016x}\n");
        assert_eq!(
            missing_capabilities(&status(1 << 21)),
            None,
            "CAP_SYS_ADMIN"
        );
        assert_eq!(missing_capabilities(&status((1 << 38) | (1 << 39))), None);
        assert_eq!(missing_capabilities(&status(1 << 38)), Some("CAP_BPF"));
        assert_eq!(missing_capabilities(&status(1 << 39)), Some("CAP_PERFMON"));
        assert_eq!(
            missing_capabilities(&status(0)),
            Some("CAP_BPF and CAP_PERFMON")
        );
        // Unreadable: let the load itself say.
        assert_eq!(missing_capabilities("garbage"), None);
    }

    #[test]
    fn without_the_tracer_the_table_stays_empty_and_the_state_says_why() {
        if cfg!(all(target_os = "linux", feature = "ebpf")) {
            // Covered by the root tests (tests/service_flows_bpf.rs).
            return;
        }
        let registry = prometheus::Registry::new();
        let metrics = TracerMetrics::new(&registry).unwrap();
        let Err(off) = open(Path::new("/proc"), &metrics) else {
            panic!("no tracer on this platform");
        };
        assert_eq!(off.reason, "unsupported_platform");
    }
}
