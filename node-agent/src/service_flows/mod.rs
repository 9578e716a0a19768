//! Service flows: the TCP connections and RDMA queue pairs the node's
//! services run, from the eBPF tracer, kept in a bounded table and reported
//! to the mesh controller so that it can probe the services' own paths and
//! rank faults by the services they hit.
//!
//! - [`cgroup`]: process -> pod UID and container id, from the cgroup tree.
//! - [`table`]: the bounded flow table and its expiry.
//! - [`host`]: the table's view of the host (`/proc`, cgroups, RNIC GIDs in
//!   sysfs) and the liveness check of idle flows.
//! - [`tracking`]: the tracer's lifecycle in the agent: load, attach what
//!   can attach (in order, with the reason when nothing can), rescan `/proc`
//!   for new libibverbs copies, consume the ring buffer into the table.
//! - [`report`]: the task that sends the table to the controller.
//! - [`metrics`]: what the tracer and the table export.
//!
//! docs/tracing.md has the whole picture, privileges included.
pub mod cgroup;
pub mod host;
pub mod metrics;
pub mod report;
pub mod table;
pub mod tracking;

pub use table::{Flow, FlowKey, FlowTable, Outcome, Owner, Resolve, TableLimits};

use std::time::Duration;

use prometheus::Registry;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::control::ControlSession;
use crate::metrics::MetricsError;

/// How often the table goes to the controller: once per default window.
pub const REPORT_EVERY: Duration = Duration::from_secs(5);

/// Registers the tracer's metrics (state `disabled` when `enabled` is off)
/// and, when enabled, starts the tracer thread. Returns the reporter task to
/// run and the table it reads, or `None` when tracing is off.
pub fn start(
    enabled: bool,
    config: tracking::TrackingConfig,
    registry: &Registry,
    sessions: watch::Receiver<Option<ControlSession>>,
    cancel: CancellationToken,
) -> Result<Option<(tracking::SharedTable, impl Future<Output = ()> + use<>)>, MetricsError> {
    let metrics = metrics::TracerMetrics::new(registry)?;
    if !enabled {
        return Ok(None);
    }
    let table = tracking::start(config, metrics.clone(), cancel.clone());
    let reporter = report::run_reporter(sessions, table.clone(), metrics, REPORT_EVERY, cancel);
    Ok(Some((table, reporter)))
}
