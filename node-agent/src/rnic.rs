//! One RNIC endpoint for its whole life: answer and send probes on its queue
//! pairs, follow its port state, and re-open it after a fatal device error.
//!
//! - port down: probing from it pauses (due probes are counted, not sent)
//!   and resumes on port up; the endpoint stays registered, so the mesh sees
//!   the outage as loss to it, which is what it is;
//! - fatal error (or a queue pair that stops working): the endpoint leaves
//!   the registered set at once (peers stop probing it), every resource is
//!   torn down, and the device is re-opened with backoff; it comes back with
//!   a new responder QPN and the agent registers again.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use pingmesh_proto::v1::{Endpoint, Pinglist, Transport, WindowSummary};
use tokio::sync::{mpsc, watch};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use crate::config::Backoff;
use crate::endpoints::EndpointSet;
use crate::metrics::AgentMetrics;
use crate::probe::auth::ProbeKeyRing;
use crate::probe::flows::RdmaFlows;
use crate::probe::prober::{ProberConfig, run_prober};
use crate::probe::responder::{ResponderObserver, run_responder};
use crate::transport::TransportError;
use crate::transport::rdma::{DeviceEvent, QpRole, RdmaDevice, RdmaError, RdmaQueuePair};

const FIRST_REOPEN: Duration = Duration::from_secs(1);
const MAX_REOPEN: Duration = Duration::from_secs(30);

/// What every RNIC of the agent shares.
#[derive(Clone)]
#[allow(missing_debug_implementations)] // holds a trait object without Debug
pub struct RnicContext {
    pub metrics: Arc<AgentMetrics>,
    pub observer: Arc<dyn ResponderObserver>,
    /// ToR the agent was told (empty: the controller resolves it per RNIC).
    pub tor: String,
    pub max_flows: u16,
    pub max_pending: usize,
    pub pinglists: watch::Receiver<Option<Arc<Pinglist>>>,
    pub summaries: mpsc::Sender<Vec<WindowSummary>>,
    pub endpoints: EndpointSet,
    /// Probe keys, shared by every RNIC's prober and responder.
    pub probe_keys: Arc<ProbeKeyRing>,
}

/// How a device's service ended.
#[derive(Debug, PartialEq, Eq)]
enum DeviceEnd {
    Stop,
    Fatal(String),
}

/// The registration of an opened RNIC endpoint.
pub fn endpoint_of<D: RdmaDevice>(device: &D, tor: &str) -> Endpoint {
    let spec = device.spec();
    Endpoint {
        id: spec.endpoint_id.clone(),
        transport: Transport::Rdma as i32,
        address: spec.gid.to_string(),
        qpn: device.qpn(QpRole::Responder),
        tor: tor.to_owned(),
        device: spec.device.clone(),
    }
}

/// Serves `first` until `cancel`; re-opens with `reopen` after fatal errors.
pub async fn run_rnic<D, F>(
    first: Arc<D>,
    mut reopen: F,
    ctx: RnicContext,
    cancel: CancellationToken,
) where
    D: RdmaDevice,
    F: FnMut() -> Result<Arc<D>, RdmaError> + Send,
{
    let mut device = first;
    let mut backoff = Backoff::new(FIRST_REOPEN, MAX_REOPEN);
    loop {
        let spec = device.spec().clone();
        let end = serve_device(&device, &ctx, &cancel).await;
        ctx.endpoints.remove(&spec.endpoint_id);
        ctx.metrics
            .set_rdma_endpoint_up(&spec.endpoint_id, &spec.device, false);
        let DeviceEnd::Fatal(reason) = end else {
            return;
        };
        tracing::error!(endpoint = %spec.endpoint_id, %reason, "RNIC endpoint failed; re-opening it");
        ctx.metrics.rdma_device_event(&spec.device, "fatal");
        // Every task holding the device has ended: this drop tears it down
        // (QPs, CQs, AHs, MRs, PD, context) before the device is opened again.
        drop(device);
        device = loop {
            tokio::select! {
                () = cancel.cancelled() => return,
                () = tokio::time::sleep(backoff.next_delay()) => {}
            }
            match reopen() {
                Ok(d) => {
                    ctx.metrics.rdma_device_event(&spec.device, "reopened");
                    break d;
                }
                Err(e) => {
                    ctx.metrics.rdma_device_event(&spec.device, "reopen_failed");
                    tracing::warn!(endpoint = %spec.endpoint_id, error = %e, "re-opening the RNIC failed; will retry");
                }
            }
        };
        backoff.reset(FIRST_REOPEN);
    }
}

/// Registers `device`, runs its responder and prober, and follows its
/// device events until `cancel` or a fatal error.
async fn serve_device<D: RdmaDevice>(
    device: &Arc<D>,
    ctx: &RnicContext,
    cancel: &CancellationToken,
) -> DeviceEnd {
    let spec = device.spec().clone();
    let (id, name) = (spec.endpoint_id.as_str(), spec.device.as_str());
    let paused = Arc::new(AtomicBool::new(!spec.port_active));
    ctx.metrics.set_rdma_endpoint_up(id, name, spec.port_active);
    ctx.endpoints.insert(endpoint_of(device.as_ref(), &ctx.tor));

    let child = cancel.child_token();
    let mut tasks: JoinSet<Result<(), TransportError>> = JoinSet::new();
    let responder = Arc::new(RdmaQueuePair::new(device.clone(), QpRole::Responder));
    tasks.spawn(run_responder(
        responder,
        ctx.observer.clone(),
        ctx.probe_keys.clone(),
        Arc::from(id),
        child.clone(),
    ));
    let flows = RdmaFlows::new(
        Arc::new(RdmaQueuePair::new(device.clone(), QpRole::Prober)),
        ctx.max_flows,
    );
    let config = ProberConfig {
        paused: paused.clone(),
        probe_keys: ctx.probe_keys.clone(),
        ..ProberConfig::new(id, ctx.max_pending)
    };
    let mut pinglists = ctx.pinglists.clone();
    // A re-opened endpoint starts with the pinglist already in force.
    pinglists.mark_changed();
    tasks.spawn(run_prober(
        config,
        flows,
        ctx.metrics.clone(),
        pinglists,
        ctx.summaries.clone(),
        child.clone(),
    ));

    let end = loop {
        tokio::select! {
            () = cancel.cancelled() => break DeviceEnd::Stop,
            Some(joined) = tasks.join_next() => {
                break match joined {
                    Ok(Err(e)) => DeviceEnd::Fatal(format!("queue pair failed: {e}")),
                    Err(e) if e.is_panic() => DeviceEnd::Fatal(format!("RNIC task panicked: {e}")),
                    // The prober ends without error only when the agent stops.
                    _ => DeviceEnd::Stop,
                };
            }
            event = device.next_device_event() => match event {
                Ok(DeviceEvent::PortDown { port }) if port == spec.port => {
                    tracing::warn!(endpoint = id, port, "RNIC port down; probing from it paused");
                    paused.store(true, Ordering::Relaxed);
                    ctx.metrics.set_rdma_endpoint_up(id, name, false);
                    ctx.metrics.rdma_device_event(name, "port_down");
                }
                Ok(DeviceEvent::PortUp { port }) if port == spec.port => {
                    tracing::info!(endpoint = id, port, "RNIC port up; probing resumed");
                    paused.store(false, Ordering::Relaxed);
                    ctx.metrics.set_rdma_endpoint_up(id, name, true);
                    ctx.metrics.rdma_device_event(name, "port_up");
                }
                // Another port of the same device: its own endpoint follows it.
                Ok(DeviceEvent::PortDown { .. } | DeviceEvent::PortUp { .. }) => {}
                Ok(DeviceEvent::Fatal { reason }) => break DeviceEnd::Fatal(reason),
                Ok(DeviceEvent::Other { name: event }) => {
                    tracing::info!(endpoint = id, event, "RNIC event");
                    ctx.metrics.rdma_device_event(name, "other");
                }
                Err(e) => break DeviceEnd::Fatal(format!("reading device events: {e}")),
            }
        }
    };
    child.cancel();
    while tasks.join_next().await.is_some() {}
    end
}

#[cfg(test)]
mod tests;
