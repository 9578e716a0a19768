//! The agent's side of `ExchangeTraces`: hand in finished traces, take the
//! next requests, run them (a bounded number at a time), repeat when the
//! controller says to. Traces never hold up probing: they run in their own
//! task, and when they cannot run (no `CAP_NET_RAW`, not Linux) every request is
//! answered with the reason so the controller stops asking this node.

use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use pingmesh_proto::v1::{Endpoint, ExchangeTracesRequest, TraceRequest, TraceResult};
use prometheus::{IntCounterVec, Opts, Registry};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tonic::Code;

use super::{FlowTuple, FlowTuples, TraceError, TraceOutcome, Tracer};
use crate::control::ControlSession;
use crate::endpoints::EndpointSet;

/// Limits of the trace runner.
#[derive(Debug, Clone)]
pub struct TraceSettings {
    /// TTLs tried at most, whatever a request asks.
    pub max_hops: u8,
    /// Datagrams sent per TTL before it counts as unanswered.
    pub attempts: u8,
    pub hop_timeout: Duration,
    /// Traces run at once.
    pub concurrency: usize,
    /// Requests taken per exchange; more wait at the controller.
    pub max_requests: usize,
    /// How often to call when the controller names no time.
    pub default_interval: Duration,
}

impl Default for TraceSettings {
    fn default() -> Self {
        Self {
            max_hops: 16,
            attempts: 3,
            hop_timeout: Duration::from_millis(250),
            concurrency: 16,
            max_requests: 64,
            default_interval: Duration::from_secs(5),
        }
    }
}

/// `pingmesh_agent_path_traces_total{result}`: ok (hops found), empty (no
/// router answered), error (could not run; the reason in `reason`).
#[derive(Debug, Clone)]
pub struct PathTraceMetrics {
    traces: IntCounterVec,
    exchanges: IntCounterVec,
}

impl PathTraceMetrics {
    pub fn register(registry: &Registry) -> Result<Self, prometheus::Error> {
        let traces = IntCounterVec::new(
            Opts::new(
                "pingmesh_agent_path_traces_total",
                "Path traces run for the controller, by result (ok, empty, error) and the reason of errors.",
            ),
            &["result", "reason"],
        )?;
        let exchanges = IntCounterVec::new(
            Opts::new(
                "pingmesh_agent_trace_exchanges_total",
                "ExchangeTraces calls, by result (ok, failed, unimplemented).",
            ),
            &["result"],
        )?;
        registry.register(Box::new(traces.clone()))?;
        registry.register(Box::new(exchanges.clone()))?;
        Ok(Self { traces, exchanges })
    }

    fn traced(&self, r: &TraceResult) {
        let (result, reason) = if !r.error.is_empty() {
            ("error", error_reason(&r.error))
        } else if r.hops.is_empty() {
            ("empty", "")
        } else {
            ("ok", "")
        };
        self.traces.with_label_values(&[result, reason]).inc();
    }
}

/// Bounded label values for the error reasons results carry.
fn error_reason(error: &str) -> &'static str {
    const KNOWN: [&str; 8] = [
        "no_privilege",
        "unsupported",
        "ipv6",
        "socket",
        "send",
        "unknown_endpoint",
        "bad_request",
        "not_probing",
    ];
    KNOWN
        .into_iter()
        .find(|k| error.starts_with(k))
        .unwrap_or("other")
}

/// Runs until `cancel`: exchanges traces whenever a session is live.
pub async fn run_path_traces(
    tuples: FlowTuples,
    endpoints: EndpointSet,
    mut sessions: watch::Receiver<Option<ControlSession>>,
    metrics: PathTraceMetrics,
    settings: TraceSettings,
    cancel: CancellationToken,
) {
    let mut runner = Runner {
        tuples,
        endpoints,
        settings,
        tracer: None,
    };
    let mut results: Vec<TraceResult> = Vec::new();
    let mut unimplemented_logged = false;
    loop {
        let Some(mut session) = wait_for_session(&mut sessions, &cancel).await else {
            return;
        };
        let request = ExchangeTracesRequest {
            node: session.node.clone(),
            session: session.session,
            results: std::mem::take(&mut results),
        };
        let wait = match session.client.exchange_traces(request).await {
            Ok(reply) => {
                metrics.exchanges.with_label_values(&["ok"]).inc();
                let reply = reply.into_inner();
                let asked = !reply.requests.is_empty();
                tokio::select! {
                    () = cancel.cancelled() => return,
                    done = runner.run_all(reply.requests) => results = done,
                }
                for r in &results {
                    metrics.traced(r);
                }
                if asked || !results.is_empty() {
                    Duration::ZERO
                } else if reply.next_exchange_ms > 0 {
                    Duration::from_millis(u64::from(reply.next_exchange_ms))
                } else {
                    runner.settings.default_interval
                }
            }
            Err(status) if status.code() == Code::Unimplemented => {
                metrics
                    .exchanges
                    .with_label_values(&["unimplemented"])
                    .inc();
                if !unimplemented_logged {
                    tracing::info!(
                        "the mesh controller takes no path traces; asking again every minute"
                    );
                    unimplemented_logged = true;
                }
                Duration::from_mins(1)
            }
            Err(status) => {
                metrics.exchanges.with_label_values(&["failed"]).inc();
                tracing::debug!(%status, "exchanging path traces failed");
                runner.settings.default_interval
            }
        };
        if wait.is_zero() {
            continue;
        }
        tokio::select! {
            () = cancel.cancelled() => return,
            () = tokio::time::sleep(wait) => {}
            changed = sessions.changed() => if changed.is_err() { return },
        }
        let _ = &mut session;
    }
}

async fn wait_for_session(
    sessions: &mut watch::Receiver<Option<ControlSession>>,
    cancel: &CancellationToken,
) -> Option<ControlSession> {
    loop {
        if let Some(s) = sessions.borrow_and_update().clone() {
            return Some(s);
        }
        tokio::select! {
            () = cancel.cancelled() => return None,
            changed = sessions.changed() => if changed.is_err() { return None },
        }
    }
}

struct Runner {
    tuples: FlowTuples,
    endpoints: EndpointSet,
    settings: TraceSettings,
    /// Opened at the first request; an open that failed stays failed.
    tracer: Option<Result<Arc<Tracer>, TraceError>>,
}

impl Runner {
    async fn run_all(&mut self, mut requests: Vec<TraceRequest>) -> Vec<TraceResult> {
        if requests.is_empty() {
            return Vec::new();
        }
        requests.truncate(self.settings.max_requests);
        let tracer = self
            .tracer
            .get_or_insert_with(|| {
                let opened = Tracer::open().map(Arc::new);
                if let Err(e) = &opened {
                    tracing::warn!(error = %e, "path traces cannot run on this node; fault localization falls back to path evidence");
                }
                opened
            })
            .clone();
        let own: Vec<Endpoint> = self.endpoints.current();
        let jobs = requests.into_iter().map(|request| {
            let tracer = tracer.clone();
            let planned = plan(&self.tuples, &own, &request);
            let settings = self.settings.clone();
            async move {
                let tuple = match planned {
                    Ok(t) => t,
                    Err(error) => return failed(&request, None, &error),
                };
                let tracer = match tracer {
                    Ok(t) => t,
                    Err(e) => {
                        return failed(&request, Some(tuple), &format!("{}: {e}", e.category()));
                    }
                };
                let hops = u8::try_from(request.max_hops)
                    .unwrap_or(u8::MAX)
                    .clamp(1, settings.max_hops);
                match tracer
                    .trace(tuple, hops, settings.attempts, settings.hop_timeout)
                    .await
                {
                    Ok(outcome) => result(&request, tuple, &outcome),
                    Err(e) => failed(&request, Some(tuple), &format!("{}: {e}", e.category())),
                }
            }
        });
        futures::stream::iter(jobs)
            .buffer_unordered(self.settings.concurrency.max(1))
            .collect()
            .await
    }
}

/// The tuple a request asks for, or why it cannot be traced here.
fn plan(
    tuples: &FlowTuples,
    own: &[Endpoint],
    request: &TraceRequest,
) -> Result<FlowTuple, String> {
    let source = own
        .iter()
        .find(|e| e.id == request.source_endpoint)
        .ok_or_else(|| {
            format!(
                "unknown_endpoint: {:?} is not this agent's",
                request.source_endpoint
            )
        })?;
    let tuple = match (&request.prober, &request.target) {
        (Some(prober), _) => {
            let port = u16::try_from(request.prober_port)
                .map_err(|_| "bad_request: prober_port is not a port".to_owned())?;
            tuples.reverse(source, prober, port, request.prober_flow_label)
        }
        (None, Some(target)) => tuples.forward(source, target, request.flow),
        (None, None) => return Err("bad_request: neither a target nor a prober".into()),
    };
    tuple.map_err(|e| format!("{}: {e}", e.category()))
}

fn base(request: &TraceRequest, tuple: Option<FlowTuple>) -> TraceResult {
    let mut r = TraceResult {
        id: request.id,
        ..TraceResult::default()
    };
    if let Some(t) = tuple {
        r.source_address = t.source.ip().to_string();
        r.source_port = u32::from(t.source.port());
        r.destination_address = t.destination.ip().to_string();
        r.destination_port = u32::from(t.destination.port());
        r.flow_label = t.flow_label;
    }
    r
}

fn result(request: &TraceRequest, tuple: FlowTuple, outcome: &TraceOutcome) -> TraceResult {
    TraceResult {
        hops: outcome.hops.iter().map(ToString::to_string).collect(),
        reached: outcome.reached,
        ..base(request, Some(tuple))
    }
}

fn failed(request: &TraceRequest, tuple: Option<FlowTuple>, error: &str) -> TraceResult {
    TraceResult {
        error: error.to_owned(),
        ..base(request, tuple)
    }
}

#[cfg(test)]
mod tests {
    use pingmesh_proto::v1::Transport;

    use super::*;
    use crate::probe::flows::UdpFlowSources;

    fn endpoint(id: &str, address: &str) -> Endpoint {
        Endpoint {
            id: id.into(),
            transport: Transport::Udp as i32,
            address: address.into(),
            ..Endpoint::default()
        }
    }

    #[test]
    fn requests_for_endpoints_that_are_not_ours_or_malformed_are_refused_with_a_reason() {
        let tuples = FlowTuples::Udp(UdpFlowSources::default());
        let own = [endpoint("n1/udp0", "10.0.0.1:9403")];
        let target = endpoint("n2/udp0", "10.0.0.2:9403");
        let foreign = TraceRequest {
            source_endpoint: "n9/udp0".into(),
            target: Some(target.clone()),
            ..TraceRequest::default()
        };
        let e = plan(&tuples, &own, &foreign).unwrap_err();
        assert!(e.starts_with("unknown_endpoint"), "{e}");
        let empty = TraceRequest {
            source_endpoint: "n1/udp0".into(),
            ..TraceRequest::default()
        };
        assert!(
            plan(&tuples, &own, &empty)
                .unwrap_err()
                .starts_with("bad_request")
        );
        let bad_port = TraceRequest {
            source_endpoint: "n1/udp0".into(),
            prober: Some(target),
            prober_port: 70_000,
            ..TraceRequest::default()
        };
        assert!(
            plan(&tuples, &own, &bad_port)
                .unwrap_err()
                .starts_with("bad_request")
        );
        assert_eq!(
            error_reason("no_privilege: path traces need"),
            "no_privilege"
        );
        assert_eq!(error_reason("something new"), "other");
    }

    #[test]
    fn a_reverse_request_traces_from_our_responder_to_the_probers_port() {
        let tuples = FlowTuples::Udp(UdpFlowSources::default());
        let own = [endpoint("n2/udp0", "10.0.0.2:9403")];
        let request = TraceRequest {
            source_endpoint: "n2/udp0".into(),
            prober: Some(endpoint("n1/udp0", "10.0.0.1:9403")),
            prober_port: 40_001,
            ..TraceRequest::default()
        };
        let t = plan(&tuples, &own, &request).unwrap();
        assert_eq!(t.source, "10.0.0.2:9403".parse().unwrap());
        assert_eq!(t.destination, "10.0.0.1:40001".parse().unwrap());
        let r = failed(&request, Some(t), "no_privilege: x");
        assert_eq!((r.source_port, r.destination_port), (9403, 40_001));
    }
}
