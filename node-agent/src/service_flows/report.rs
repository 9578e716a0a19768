//! Sends the flow table to the mesh controller about once per window, as a
//! full snapshot (a flow missing from the latest report has ended), under
//! the agent's live control session. Without a session nothing is sent; a
//! controller that refuses (an older one answers Unimplemented) is counted
//! and logged at most once a minute, and the next tick tries again.
use std::time::Duration;

use pingmesh_proto::v1::ReportServiceFlowsRequest;
use tokio::sync::watch;
use tokio::time::{Instant, MissedTickBehavior};
use tokio_util::sync::CancellationToken;
use tonic::Code;

use super::metrics::TracerMetrics;
use super::tracking::{SharedTable, lock};
use crate::control::ControlSession;

/// How often a failing report may be logged.
const LOG_EVERY: Duration = Duration::from_mins(1);

/// Runs until `cancel`.
pub async fn run_reporter(
    sessions: watch::Receiver<Option<ControlSession>>,
    table: SharedTable,
    metrics: TracerMetrics,
    every: Duration,
    cancel: CancellationToken,
) {
    let mut tick = tokio::time::interval(every.max(Duration::from_millis(10)));
    tick.set_missed_tick_behavior(MissedTickBehavior::Delay);
    let mut last_log: Option<Instant> = None;
    loop {
        tokio::select! {
            () = cancel.cancelled() => return,
            _ = tick.tick() => {}
        }
        let Some(session) = sessions.borrow().clone() else {
            continue;
        };
        let (flows, dropped) = {
            let t = lock(&table);
            (t.snapshot(), t.dropped_full())
        };
        let count = flows.len();
        let request = ReportServiceFlowsRequest {
            node: session.node.clone(),
            session: session.session,
            flows,
            dropped,
        };
        let mut client = session.client.clone();
        let result = tokio::select! {
            () = cancel.cancelled() => return,
            r = client.report_service_flows(request) => r,
        };
        match result {
            Ok(reply) => {
                metrics.report("accepted");
                let reply = reply.into_inner();
                if reply.rejected > 0 && may_log(&mut last_log) {
                    tracing::warn!(
                        rejected = reply.rejected,
                        accepted = reply.accepted,
                        "the mesh controller rejected some service flows"
                    );
                }
            }
            Err(status) => {
                let result = match status.code() {
                    Code::Unimplemented => "unimplemented",
                    Code::InvalidArgument => "rejected",
                    _ => "failed",
                };
                metrics.report(result);
                if may_log(&mut last_log) {
                    tracing::warn!(%status, flows = count, result, "service flows not reported (logged at most once a minute)");
                }
            }
        }
    }
}

fn may_log(last: &mut Option<Instant>) -> bool {
    let now = Instant::now();
    if last.is_some_and(|t| now.duration_since(t) < LOG_EVERY) {
        return false;
    }
    *last = Some(now);
    true
}
