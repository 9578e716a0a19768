//! The agent-facing gRPC service. Validation and state live in the controller;
//! this maps requests and errors, enforces message-size bounds, and lets an
//! agent act only for the node it proved (see `identity`).

use std::pin::Pin;
use std::sync::Arc;

use futures::Stream;
use pingmesh_proto::limits::{MAX_MESSAGE_BYTES, is_valid_id};
use pingmesh_proto::v1::mesh_controller_server::{
    MeshController as MeshService, MeshControllerServer,
};
use pingmesh_proto::v1::{
    ExchangeTracesRequest, ExchangeTracesResponse, Pinglist, RegisterRequest, RegisterResponse,
    ReportServiceFlowsRequest, ReportServiceFlowsResponse, ReportWindowsRequest,
    ReportWindowsResponse, WatchPinglistRequest,
};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status};

use super::controller::{MeshController, MeshError, Snapshot};
use super::identity::{AgentAuthenticator, AuthError, Credentials, may_act_for};

#[derive(Debug, Clone)]
pub struct GrpcService {
    controller: Arc<MeshController>,
    auth: Arc<dyn AgentAuthenticator>,
}

/// The tonic server for `controller`, with decoding bounded and every
/// request's node checked against what `auth` says the caller is.
pub fn server(
    controller: Arc<MeshController>,
    auth: Arc<dyn AgentAuthenticator>,
) -> MeshControllerServer<GrpcService> {
    MeshControllerServer::new(GrpcService { controller, auth })
        .max_decoding_message_size(MAX_MESSAGE_BYTES)
        .max_encoding_message_size(MAX_MESSAGE_BYTES)
}

impl GrpcService {
    /// Refuses a request whose caller is unknown or may not act for `node`;
    /// counted as `pingmesh_controller_rejected_requests_total{reason="identity"}`.
    async fn authorize<T>(
        &self,
        rpc: &'static str,
        request: &Request<T>,
        node: &str,
    ) -> Result<(), Status> {
        let certs = request.peer_certs();
        let credentials = Credentials {
            metadata: request.metadata(),
            peer_certs: certs.as_deref().map(Vec::as_slice),
        };
        let verdict = match self.auth.authenticate(credentials).await {
            Ok(caller) => may_act_for(&caller, node),
            Err(e) => Err(e),
        };
        verdict.map_err(|e| {
            self.controller
                .metrics
                .rejected_requests
                .with_label_values(&[rpc, "identity"])
                .inc();
            tracing::debug!(rpc, node, error = %e, "request refused");
            match e {
                AuthError::Unauthenticated(m) => Status::unauthenticated(m),
                AuthError::Denied(m) => Status::permission_denied(m),
                AuthError::Unavailable(m) => Status::unavailable(m),
            }
        })
    }

    fn refuse(&self, rpc: &'static str, node: &str, e: &MeshError) -> Status {
        self.controller
            .metrics
            .rejected_requests
            .with_label_values(&[rpc, e.category()])
            .inc();
        // The caller's mistakes are counted only; a registry that cannot
        // write (disk full, rqlite without a leader) is the operator's to fix,
        // so it is also logged with what was lost.
        if let MeshError::Registry(_) = e {
            tracing::warn!(rpc, node, error = %e, "request refused: the registry failed");
        }
        match e {
            MeshError::InvalidRequest(m) => Status::invalid_argument(m.clone()),
            MeshError::UnknownNode(_) => Status::not_found(e.to_string()),
            MeshError::StaleSession { .. } => Status::failed_precondition(e.to_string()),
            MeshError::Conflict { .. } => Status::already_exists(e.to_string()),
            MeshError::Registry(_) => Status::unavailable(e.to_string()),
        }
    }

    fn check_node(&self, rpc: &'static str, node: &str) -> Result<(), Status> {
        if is_valid_id(node) {
            Ok(())
        } else {
            Err(self.refuse(
                rpc,
                node,
                &MeshError::InvalidRequest(format!("node name {node:?} is not a valid identifier")),
            ))
        }
    }
}

/// Equal in everything but `version`: whatever else a pinglist carries
/// (targets, timings, probe keys, fields added later) is compared.
fn same_but_version(sent: &Pinglist, list: &mut Pinglist) -> bool {
    let version = std::mem::replace(&mut list.version, sent.version);
    let same = list == sent;
    list.version = version;
    same
}

type PinglistStream = Pin<Box<dyn Stream<Item = Result<Pinglist, Status>> + Send>>;

#[tonic::async_trait]
impl MeshService for GrpcService {
    async fn register(
        &self,
        request: Request<RegisterRequest>,
    ) -> Result<Response<RegisterResponse>, Status> {
        self.authorize("register", &request, &request.get_ref().node)
            .await?;
        let r = request.into_inner();
        let (session, endpoints) = self
            .controller
            .register(&r.node, &r.agent_version, &r.endpoints)
            .await
            .map_err(|e| self.refuse("register", &r.node, &e))?;
        Ok(Response::new(RegisterResponse {
            session,
            endpoints: endpoints
                .iter()
                .map(super::types::MeshEndpoint::to_proto)
                .collect(),
        }))
    }

    type WatchPinglistStream = PinglistStream;

    async fn watch_pinglist(
        &self,
        request: Request<WatchPinglistRequest>,
    ) -> Result<Response<Self::WatchPinglistStream>, Status> {
        self.authorize("watch_pinglist", &request, &request.get_ref().node)
            .await?;
        let r = request.into_inner();
        self.check_node("watch_pinglist", &r.node)?;
        self.controller
            .check_session(&r.node, r.session)
            .await
            .map_err(|e| self.refuse("watch_pinglist", &r.node, &e))?;
        let controller = self.controller.clone();
        let (tx, rx) = mpsc::channel(4);
        tokio::spawn(async move {
            let _present = controller.connect(&r.node, r.session);
            let mut snapshots = controller.subscribe();
            // The last list sent and the snapshot it was computed from.
            let mut last_sent: Option<(Pinglist, Arc<Snapshot>)> = None;
            loop {
                if controller.current_session(&r.node) != r.session {
                    let _ = tx
                        .send(Err(Status::failed_precondition(
                            "the node registered again; this stream is over",
                        )))
                        .await;
                    return;
                }
                let snapshot = snapshots.borrow_and_update().clone();
                match &mut last_sent {
                    // A change elsewhere in the mesh: this node's list is the one sent.
                    Some((_, from))
                        if !controller.pinglist_may_differ(&r.node, from, &snapshot) =>
                    {
                        *from = snapshot;
                    }
                    _ => {
                        let mut list = controller.pinglist(&r.node, &snapshot);
                        // Versions change on every publish; only push when the rest did.
                        if last_sent
                            .as_ref()
                            .is_none_or(|(sent, _)| !same_but_version(sent, &mut list))
                        {
                            if tx.send(Ok(list.clone())).await.is_err() {
                                return; // the agent went away
                            }
                            last_sent = Some((list, snapshot));
                        } else if let Some((_, from)) = &mut last_sent {
                            *from = snapshot;
                        }
                    }
                }
                tokio::select! {
                    () = tx.closed() => return,
                    () = controller.stopping() => {
                        let _ = tx.send(Err(Status::unavailable("mesh controller shutting down"))).await;
                        return;
                    }
                    changed = snapshots.changed() => if changed.is_err() { return },
                }
            }
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }

    async fn report_windows(
        &self,
        request: Request<ReportWindowsRequest>,
    ) -> Result<Response<ReportWindowsResponse>, Status> {
        self.authorize("report_windows", &request, &request.get_ref().node)
            .await?;
        let r = request.into_inner();
        self.check_node("report_windows", &r.node)?;
        self.controller
            .check_session(&r.node, r.session)
            .await
            .map_err(|e| self.refuse("report_windows", &r.node, &e))?;
        let outcome = self
            .controller
            .report(&r.node, r.windows)
            .map_err(|e| self.refuse("report_windows", &r.node, &e))?;
        Ok(Response::new(ReportWindowsResponse {
            accepted: outcome.accepted,
            duplicates: outcome.duplicates,
            rejected: outcome.rejected,
        }))
    }

    async fn exchange_traces(
        &self,
        request: Request<ExchangeTracesRequest>,
    ) -> Result<Response<ExchangeTracesResponse>, Status> {
        self.authorize("exchange_traces", &request, &request.get_ref().node)
            .await?;
        let r = request.into_inner();
        self.check_node("exchange_traces", &r.node)?;
        let (requests, next_exchange_ms) = self
            .controller
            .exchange_traces(&r.node, r.session, r.results)
            .await
            .map_err(|e| self.refuse("exchange_traces", &r.node, &e))?;
        Ok(Response::new(ExchangeTracesResponse {
            requests,
            next_exchange_ms,
        }))
    }

    async fn report_service_flows(
        &self,
        request: Request<ReportServiceFlowsRequest>,
    ) -> Result<Response<ReportServiceFlowsResponse>, Status> {
        const RPC: &str = "report_service_flows";
        self.authorize(RPC, &request, &request.get_ref().node)
            .await?;
        let r = request.into_inner();
        self.check_node(RPC, &r.node)?;
        self.controller
            .check_session(&r.node, r.session)
            .await
            .map_err(|e| self.refuse(RPC, &r.node, &e))?;
        let outcome = self
            .controller
            .report_service_flows(&r.node, r.session, &r.flows, r.dropped)
            .map_err(|e| self.refuse(RPC, &r.node, &e))?;
        Ok(Response::new(ReportServiceFlowsResponse {
            accepted: outcome.accepted,
            rejected: outcome.rejected,
        }))
    }
}

#[cfg(test)]
mod tests {
    use pingmesh_proto::v1::ProbeKeys;

    use super::*;

    #[test]
    fn only_the_version_is_left_out_of_the_comparison() {
        let sent = Pinglist {
            version: 1,
            window_ms: 5_000,
            ..Pinglist::default()
        };
        let mut republished = Pinglist {
            version: 2,
            ..sent.clone()
        };
        assert!(same_but_version(&sent, &mut republished));
        assert_eq!(republished.version, 2, "the new version is kept");
        let mut rekeyed = Pinglist {
            version: 3,
            probe_keys: Some(ProbeKeys::default()),
            ..sent.clone()
        };
        assert!(!same_but_version(&sent, &mut rekeyed));
        let mut retimed = Pinglist {
            version: 4,
            probe_timeout_ms: 1,
            ..sent.clone()
        };
        assert!(!same_but_version(&sent, &mut retimed));
    }
}
