//! The agent's side of the control channel: register, hold the pinglist stream
//! open, deliver window summaries; keep going through controller outages.
//!
//! The agent never stops probing because the controller is away: the last
//! pinglist stays in force, summaries are buffered (bounded, oldest dropped and
//! counted), and every reconnect starts with a fresh registration so a restarted
//! controller learns the agent again at once.

pub mod security;

use std::collections::VecDeque;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use pingmesh_proto::limits::MAX_MESSAGE_BYTES;
use pingmesh_proto::v1::mesh_controller_client::MeshControllerClient;
use pingmesh_proto::v1::{
    Pinglist, RegisterRequest, ReportWindowsRequest, ReportWindowsResponse, WatchPinglistRequest,
    WindowSummary,
};
use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;
use tonic::transport::Channel;
use tonic::{Code, Status};

pub use self::security::{BearerToken, ControlClient};
use crate::config::{Backoff, ControlSecurity};
use crate::endpoints::{EndpointMap, EndpointSet};
use crate::metrics::AgentMetrics;
use crate::probe::prober::publish_pinglist_metrics;

/// Summaries per `ReportWindows` call: keeps each message far below the size limit.
const REPORT_CHUNK: usize = 2_000;
const FIRST_RETRY: Duration = Duration::from_millis(200);
const MAX_RETRY: Duration = Duration::from_secs(10);
const FLUSH_EVERY: Duration = Duration::from_secs(1);

#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    #[error("controller URL {url:?} is invalid: {detail}")]
    InvalidUrl { url: String, detail: String },
    #[error("securing the channel to the controller: {0}")]
    Security(#[from] security::SecurityError),
    #[error("connecting to controller {url}: {source}")]
    Connect {
        url: String,
        source: tonic::transport::Error,
    },
    #[error("{op} refused by the controller: {status}")]
    Rpc { op: &'static str, status: Status },
}

impl ControlError {
    pub fn category(&self) -> &'static str {
        match self {
            Self::InvalidUrl { .. } => "invalid_url",
            Self::Security(_) => "security",
            Self::Connect { .. } => "connect",
            Self::Rpc { status, .. } if status.code() == Code::InvalidArgument => {
                "invalid_argument"
            }
            Self::Rpc { .. } => "rpc",
        }
    }
}

/// What the agent tells the controller about itself.
#[derive(Debug, Clone)]
pub struct Identity {
    pub controller_url: String,
    /// TLS files and token the channel is secured with.
    pub security: ControlSecurity,
    pub node: String,
    pub agent_version: String,
    /// Registered again whenever it changes (an RNIC re-opened with a new QPN).
    pub endpoints: EndpointSet,
    /// The live session, for tasks with RPCs of their own (path traces,
    /// service flows): `Some` while registered and streaming, `None` otherwise.
    pub sessions: Arc<watch::Sender<Option<ControlSession>>>,
}

/// A registered session other tasks may call the controller under. The client
/// shares the control channel's connection.
#[derive(Debug, Clone)]
pub struct ControlSession {
    pub client: ControlClient,
    pub node: String,
    pub session: u64,
}

/// Why a registered session ended.
enum SessionEnd {
    /// The endpoint set changed: register again at once.
    EndpointsChanged,
    /// The controller went away or refused us: retry after a backoff.
    Lost(String),
    /// The agent is stopping.
    Stopping,
}

/// Runs until `cancel`: keeps the agent registered, publishes every pinglist on
/// `pinglists`, and delivers the summaries arriving on `reports`.
pub async fn run_control(
    identity: Identity,
    metrics: Arc<AgentMetrics>,
    pinglists: watch::Sender<Option<Arc<Pinglist>>>,
    mut reports: mpsc::Receiver<Vec<WindowSummary>>,
    registered: Arc<AtomicBool>,
    buffer_limit: usize,
    cancel: CancellationToken,
) {
    let mut outbox = Outbox::new(buffer_limit, metrics.clone());
    let mut backoff = Backoff::new(FIRST_RETRY, MAX_RETRY);
    let mut endpoint_updates = identity.endpoints.subscribe();
    loop {
        // Nothing to register while every endpoint is down (RNICs re-opening).
        while identity.endpoints.current().is_empty() {
            registered.store(false, Ordering::Relaxed);
            tokio::select! {
                () = cancel.cancelled() => return,
                update = endpoint_updates.changed() => if update.is_err() { return },
                batch = reports.recv() => match batch {
                    Some(b) => outbox.push(b),
                    None => return,
                },
            }
        }
        endpoint_updates.mark_unchanged();
        let session = tokio::select! {
            () = cancel.cancelled() => return,
            r = connect_and_register(&identity, &metrics) => r,
        };
        match session {
            Ok((client, session)) => {
                registered.store(true, Ordering::Relaxed);
                backoff.reset(FIRST_RETRY);
                let ended = serve_session(
                    client,
                    session,
                    &identity,
                    &metrics,
                    &pinglists,
                    &mut reports,
                    &mut outbox,
                    &mut endpoint_updates,
                    &cancel,
                )
                .await;
                metrics.set_controller_connected(false);
                match ended {
                    SessionEnd::Stopping => return,
                    _ if cancel.is_cancelled() => return,
                    SessionEnd::EndpointsChanged => {
                        tracing::info!("endpoints changed; registering again");
                        continue;
                    }
                    SessionEnd::Lost(reason) => {
                        tracing::warn!(%reason, "lost the mesh controller; probing goes on with the last pinglist");
                    }
                }
            }
            Err(e) => {
                tracing::warn!(error = %e, category = e.category(), "cannot register with the mesh controller; will retry");
            }
        }
        // Wait before retrying, but keep taking summaries so none are lost meanwhile.
        let wait = tokio::time::sleep(backoff.next_delay());
        tokio::pin!(wait);
        loop {
            tokio::select! {
                () = cancel.cancelled() => return,
                () = &mut wait => break,
                batch = reports.recv() => match batch {
                    Some(b) => outbox.push(b),
                    None => return,
                },
            }
        }
    }
}

async fn connect_and_register(
    identity: &Identity,
    metrics: &AgentMetrics,
) -> Result<(ControlClient, u64), ControlError> {
    let endpoint = Channel::from_shared(identity.controller_url.clone()).map_err(|e| {
        ControlError::InvalidUrl {
            url: identity.controller_url.clone(),
            detail: e.to_string(),
        }
    })?;
    // The certificate files as they are now: rotated ones apply from this connect on.
    let endpoint = security::with_tls(endpoint, &identity.controller_url, &identity.security)
        .inspect_err(|_| metrics.registration("unreachable"))?
        .connect_timeout(Duration::from_secs(3))
        .http2_keep_alive_interval(Duration::from_secs(5))
        .keep_alive_timeout(Duration::from_secs(5))
        .keep_alive_while_idle(true);
    let channel = endpoint.connect().await.map_err(|source| {
        metrics.registration("unreachable");
        ControlError::Connect {
            url: identity.controller_url.clone(),
            source,
        }
    })?;
    let token = BearerToken::from_file(identity.security.token_file.as_deref());
    let mut client = MeshControllerClient::with_interceptor(channel, token)
        .max_decoding_message_size(MAX_MESSAGE_BYTES)
        .max_encoding_message_size(MAX_MESSAGE_BYTES);
    let reply = client
        .register(RegisterRequest {
            node: identity.node.clone(),
            agent_version: identity.agent_version.clone(),
            endpoints: identity.endpoints.current(),
        })
        .await
        .map_err(|status| {
            metrics.registration("refused");
            ControlError::Rpc {
                op: "register",
                status,
            }
        })?
        .into_inner();
    metrics.registration("ok");
    tracing::info!(
        session = reply.session,
        endpoints = reply.endpoints.len(),
        "registered with the mesh controller"
    );
    Ok((client, reply.session))
}

/// Serves one registered session; returns why it ended.
#[allow(clippy::too_many_arguments)]
async fn serve_session(
    mut client: ControlClient,
    session: u64,
    identity: &Identity,
    metrics: &AgentMetrics,
    pinglists: &watch::Sender<Option<Arc<Pinglist>>>,
    reports: &mut mpsc::Receiver<Vec<WindowSummary>>,
    outbox: &mut Outbox,
    endpoint_changes: &mut watch::Receiver<EndpointMap>,
    cancel: &CancellationToken,
) -> SessionEnd {
    let request = WatchPinglistRequest {
        node: identity.node.clone(),
        session,
    };
    let mut stream = match client.watch_pinglist(request).await {
        Ok(s) => s.into_inner(),
        Err(status) => return SessionEnd::Lost(format!("watch refused: {status}")),
    };
    metrics.set_controller_connected(true);
    identity.sessions.send_replace(Some(ControlSession {
        client: client.clone(),
        node: identity.node.clone(),
        session,
    }));
    let _withdraw = WithdrawSession(&identity.sessions);
    let mut flush = tokio::time::interval(FLUSH_EVERY);
    flush.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            () = cancel.cancelled() => {
                // Best effort: hand over what is buffered before exiting.
                let _ = outbox.flush(&mut client, &identity.node, session).await;
                return SessionEnd::Stopping;
            }
            changed = endpoint_changes.changed() => {
                if changed.is_err() {
                    return SessionEnd::Stopping;
                }
                // Hand over what is buffered under this session before it is replaced.
                let _ = outbox.flush(&mut client, &identity.node, session).await;
                return SessionEnd::EndpointsChanged;
            }
            msg = stream.message() => match msg {
                Ok(Some(list)) => {
                    tracing::info!(version = list.version, targets = list.targets.len(), "pinglist received");
                    publish_pinglist_metrics(&list, metrics);
                    pinglists.send_replace(Some(Arc::new(list)));
                }
                Ok(None) => return SessionEnd::Lost("pinglist stream closed by the controller".into()),
                Err(status) => return SessionEnd::Lost(format!("pinglist stream failed: {status}")),
            },
            batch = reports.recv() => {
                let Some(batch) = batch else { return SessionEnd::Stopping };
                outbox.push(batch);
                if let Err(e) = outbox.flush(&mut client, &identity.node, session).await
                    && must_reregister(&e)
                {
                    return SessionEnd::Lost(format!("report refused: {e}"));
                }
            }
            _ = flush.tick() => {
                if let Err(e) = outbox.flush(&mut client, &identity.node, session).await
                    && must_reregister(&e)
                {
                    return SessionEnd::Lost(format!("report refused: {e}"));
                }
            }
        }
    }
}

/// Withdraws the published session when a session ends, however it ends.
struct WithdrawSession<'a>(&'a watch::Sender<Option<ControlSession>>);

impl Drop for WithdrawSession<'_> {
    fn drop(&mut self) {
        self.0.send_replace(None);
    }
}

/// The controller no longer knows this session (it expired us, or restarted with
/// another registry): register again rather than retrying the same call.
fn must_reregister(e: &ControlError) -> bool {
    matches!(e, ControlError::Rpc { status, .. }
        if matches!(status.code(), Code::NotFound | Code::FailedPrecondition | Code::Unavailable))
}

/// Summaries waiting for delivery, oldest first, bounded.
struct Outbox {
    queue: VecDeque<WindowSummary>,
    limit: usize,
    metrics: Arc<AgentMetrics>,
}

impl Outbox {
    fn new(limit: usize, metrics: Arc<AgentMetrics>) -> Self {
        Self {
            queue: VecDeque::new(),
            limit: limit.max(1),
            metrics,
        }
    }

    fn push(&mut self, batch: Vec<WindowSummary>) {
        self.queue.extend(batch);
        let excess = self.queue.len().saturating_sub(self.limit);
        if excess > 0 {
            self.queue.drain(..excess);
            self.metrics
                .windows_dropped("buffer_full", u64::try_from(excess).unwrap_or(u64::MAX));
            tracing::warn!(
                dropped = excess,
                "report buffer full; dropped the oldest window summaries"
            );
        }
    }

    /// Sends everything queued; a summary leaves the queue once the controller
    /// answered for it (accepted, duplicate or rejected: see [`ReportCounts`]).
    async fn flush(
        &mut self,
        client: &mut ControlClient,
        node: &str,
        session: u64,
    ) -> Result<(), ControlError> {
        while !self.queue.is_empty() {
            let n = self.queue.len().min(REPORT_CHUNK);
            let windows: Vec<WindowSummary> = self.queue.iter().take(n).cloned().collect();
            let request = ReportWindowsRequest {
                node: node.to_owned(),
                session,
                windows,
            };
            match client.report_windows(request).await {
                Ok(reply) => {
                    self.queue.drain(..n);
                    self.book(&ReportCounts::of(n, reply.get_ref()));
                }
                Err(status) if status.code() == Code::InvalidArgument => {
                    // The controller will never take these: drop them, say so, go on.
                    self.queue.drain(..n);
                    self.metrics.reports("rejected", n);
                    self.metrics
                        .windows_dropped("rejected", u64::try_from(n).unwrap_or(u64::MAX));
                    tracing::warn!(%status, count = n, "controller rejected window summaries");
                }
                Err(status) => {
                    self.metrics.reports("failed", n);
                    return Err(ControlError::Rpc {
                        op: "report windows",
                        status,
                    });
                }
            }
        }
        Ok(())
    }

    /// Exports what the controller made of one report: accepted, duplicate
    /// (taken before; nothing lost) and rejected (never taken: dropped).
    fn book(&self, counts: &ReportCounts) {
        self.metrics.reports("accepted", counts.accepted);
        self.metrics.reports("duplicate", counts.duplicates);
        self.metrics.reports("rejected", counts.rejected);
        if counts.rejected > 0 {
            self.metrics.windows_dropped(
                "rejected",
                u64::try_from(counts.rejected).unwrap_or(u64::MAX),
            );
            tracing::warn!(
                count = counts.rejected,
                "controller rejected window summaries (pingmesh_controller_window_summaries_total says why)"
            );
        }
    }
}

/// How the summaries of one answered report ended, each counted once.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct ReportCounts {
    accepted: usize,
    duplicates: usize,
    rejected: usize,
}

impl ReportCounts {
    /// From the controller's answer for `sent` summaries. What it neither
    /// accepted nor called a duplicate was rejected: a controller older than
    /// the `rejected` field leaves that 0, and a reply whose counts exceed
    /// `sent` is capped rather than trusted.
    fn of(sent: usize, reply: &ReportWindowsResponse) -> Self {
        let accepted = usize::try_from(reply.accepted)
            .unwrap_or(usize::MAX)
            .min(sent);
        let duplicates = usize::try_from(reply.duplicates)
            .unwrap_or(usize::MAX)
            .min(sent - accepted);
        let rejected = sent - accepted - duplicates;
        let said = usize::try_from(reply.rejected).unwrap_or(usize::MAX);
        if said != 0 && said != rejected {
            tracing::debug!(
                sent,
                accepted,
                duplicates,
                said_rejected = said,
                "report answer does not add up; counting the rest as rejected"
            );
        }
        Self {
            accepted,
            duplicates,
            rejected,
        }
    }
}

#[cfg(test)]
mod tests {
    use std::net::Ipv4Addr;
    use std::pin::Pin;

    use futures::Stream;
    use pingmesh_proto::v1::mesh_controller_server::{MeshController, MeshControllerServer};
    use pingmesh_proto::v1::{
        ExchangeTracesRequest, ExchangeTracesResponse, RegisterResponse, ReportServiceFlowsRequest,
        ReportServiceFlowsResponse,
    };
    use tonic::{Request, Response};

    use super::*;

    /// A controller that answers every `ReportWindows` with the same counts.
    struct Answers(ReportWindowsResponse);

    #[tonic::async_trait]
    impl MeshController for Answers {
        type WatchPinglistStream = Pin<Box<dyn Stream<Item = Result<Pinglist, Status>> + Send>>;

        async fn register(
            &self,
            _: Request<RegisterRequest>,
        ) -> Result<Response<RegisterResponse>, Status> {
            Err(Status::unimplemented("not in this test"))
        }
        async fn watch_pinglist(
            &self,
            _: Request<WatchPinglistRequest>,
        ) -> Result<Response<Self::WatchPinglistStream>, Status> {
            Err(Status::unimplemented("not in this test"))
        }
        async fn report_windows(
            &self,
            _: Request<ReportWindowsRequest>,
        ) -> Result<Response<ReportWindowsResponse>, Status> {
            Ok(Response::new(self.0))
        }
        async fn exchange_traces(
            &self,
            _: Request<ExchangeTracesRequest>,
        ) -> Result<Response<ExchangeTracesResponse>, Status> {
            Err(Status::unimplemented("not in this test"))
        }
        async fn report_service_flows(
            &self,
            _: Request<ReportServiceFlowsRequest>,
        ) -> Result<Response<ReportServiceFlowsResponse>, Status> {
            Err(Status::unimplemented("not in this test"))
        }
    }

    async fn client_of(answer: ReportWindowsResponse) -> ControlClient {
        let listener = tokio::net::TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
            .await
            .unwrap();
        let addr = listener.local_addr().unwrap();
        let server = tonic::transport::Server::builder()
            .add_service(MeshControllerServer::new(Answers(answer)))
            .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener));
        tokio::spawn(server);
        let channel = Channel::from_shared(format!("http://{addr}"))
            .unwrap()
            .connect()
            .await
            .unwrap();
        MeshControllerClient::with_interceptor(channel, BearerToken::default())
    }

    fn series(metrics: &AgentMetrics, name: &str, label: &str) -> u64 {
        let text = String::from_utf8(metrics.encode()).unwrap();
        text.lines()
            .filter(|l| l.starts_with(&format!("{name}{{")) && l.contains(label))
            .find_map(|l| l.rsplit(' ').next()?.parse().ok())
            .unwrap_or(0)
    }

    /// Reports five summaries to a controller answering `answer`; returns
    /// (accepted, duplicate, rejected, dropped as rejected, left queued).
    async fn report_five(answer: ReportWindowsResponse) -> (u64, u64, u64, u64, usize) {
        let metrics = Arc::new(AgentMetrics::new("n1", false).unwrap());
        let mut outbox = Outbox::new(100, metrics.clone());
        outbox.push(vec![WindowSummary::default(); 5]);
        let mut client = client_of(answer).await;
        outbox.flush(&mut client, "n1", 7).await.unwrap();
        let reports = |result: &str| {
            series(
                &metrics,
                "pingmesh_window_reports_total",
                &format!("result=\"{result}\""),
            )
        };
        (
            reports("accepted"),
            reports("duplicate"),
            reports("rejected"),
            series(
                &metrics,
                "pingmesh_window_summaries_dropped_total",
                "reason=\"rejected\"",
            ),
            outbox.queue.len(),
        )
    }

    #[tokio::test]
    async fn reports_are_counted_as_the_controller_answers_accepted_duplicate_or_rejected() {
        let counts = report_five(ReportWindowsResponse {
            accepted: 2,
            duplicates: 1,
            rejected: 2,
        })
        .await;
        assert_eq!(counts, (2, 1, 2, 2, 0));
    }

    #[tokio::test]
    async fn an_older_controller_without_rejected_counts_the_rest_as_rejected() {
        let counts = report_five(ReportWindowsResponse {
            accepted: 3,
            duplicates: 1,
            rejected: 0,
        })
        .await;
        assert_eq!(counts, (3, 1, 1, 1, 0));
    }

    #[test]
    fn an_answer_claiming_more_than_was_sent_is_capped() {
        let counts = ReportCounts::of(
            4,
            &ReportWindowsResponse {
                accepted: 3,
                duplicates: u32::MAX,
                rejected: 9,
            },
        );
        assert_eq!(
            counts,
            ReportCounts {
                accepted: 3,
                duplicates: 1,
                rejected: 0
            }
        );
    }
}
