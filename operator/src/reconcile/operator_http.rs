//! The operator's public HTTP port: `/livez`, `/readyz`, `/metrics` (the
//! operator's and, on the leader, the mesh controller's) and, on the leader,
//! the mesh controller's JSON API.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};

use axum::Router;
use axum::extract::{Request, State};
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use tokio::sync::watch;
use tower::ServiceExt as _;

use super::leader::Role;
use super::mesh_host::MeshHost;
use super::metrics::ReconcileMetrics;
use crate::mesh::http as mesh_http;

/// What the operator's HTTP port answers from.
#[derive(Debug, Clone)]
pub struct OperatorHttp {
    /// The hosted mesh controller, once this replica leads.
    pub hosted: Arc<OnceLock<Arc<MeshHost>>>,
    pub metrics: ReconcileMetrics,
    /// The leader's `PingMesh` cache has synced.
    pub synced: Arc<AtomicBool>,
    pub role: watch::Receiver<Role>,
}

impl OperatorHttp {
    /// A replica that leads (or runs without election) and hosts `host`.
    pub fn leading(
        host: Arc<MeshHost>,
        metrics: ReconcileMetrics,
        synced: Arc<AtomicBool>,
    ) -> Self {
        let hosted = Arc::new(OnceLock::new());
        let _ = hosted.set(host);
        let (_, role) = watch::channel(Role::Leader);
        Self {
            hosted,
            metrics,
            synced,
            role,
        }
    }
}

/// `/livez` (the process answers), `/readyz`, `/metrics`; everything else goes
/// to the API of the mesh controller serving now.
///
/// `/readyz` is 200 on a leader whose `PingMesh` cache synced, 503 on one
/// still syncing, and 200 on a standby: it takes agents and forwards them to
/// the leader (see `forward`), and a Deployment with standbys that never
/// became ready could never finish a rollout. A standby answers the mesh API
/// with 503 and the leader's name.
pub fn operator_router(state: OperatorHttp) -> Router {
    Router::new()
        .route("/livez", get(|| async { "ok" }))
        .route("/readyz", get(readyz))
        .route("/metrics", get(prometheus_text))
        .fallback(to_mesh)
        .with_state(state)
}

fn leader_name(role: &Role) -> String {
    match role {
        Role::Standby {
            leader: Some(leader),
            ..
        } => format!("the leader is {leader}"),
        _ => "no leader is known yet".to_owned(),
    }
}

async fn to_mesh(State(s): State<OperatorHttp>, request: Request) -> Response {
    let Some(host) = s.hosted.get() else {
        let role = s.role.borrow().clone();
        return (
            StatusCode::SERVICE_UNAVAILABLE,
            format!("not the leader; {}", leader_name(&role)),
        )
            .into_response();
    };
    match mesh_http::router(host.current()).oneshot(request).await {
        Ok(response) => response,
        Err(never) => match never {},
    }
}

async fn readyz(State(s): State<OperatorHttp>) -> (StatusCode, String) {
    let role = s.role.borrow().clone();
    match role {
        Role::Leader if s.synced.load(Ordering::Relaxed) => (StatusCode::OK, "ready".to_owned()),
        Role::Leader => (
            StatusCode::SERVICE_UNAVAILABLE,
            "PingMesh cache not synced yet".to_owned(),
        ),
        Role::Standby { .. } => (
            StatusCode::OK,
            format!(
                "standby, forwarding agents to the leader; {}",
                leader_name(&role)
            ),
        ),
        Role::Lost { reason } => (
            StatusCode::SERVICE_UNAVAILABLE,
            format!("lost leadership ({reason}); restarting"),
        ),
    }
}

async fn prometheus_text(State(s): State<OperatorHttp>) -> impl IntoResponse {
    let mut body = s
        .hosted
        .get()
        .map(|host| host.current().metrics.encode())
        .unwrap_or_default();
    body.extend(s.metrics.encode());
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], body)
}
