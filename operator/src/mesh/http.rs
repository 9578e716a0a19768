//! The read-only HTTP/JSON API, the controller's /metrics, and health probes.
//!
//! `GET /api/v1/summary` is what `pingmesh status` and the demo print: the last
//! judged window per ToR pair plus open findings.

use std::sync::Arc;

use axum::Json;
use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use serde::Serialize;

use super::analyzer::{Finding, TorPairStats};
use super::controller::{MeshController, MeshError};
use super::localize::OpenRootCause;
use super::services::ImpactedService;
use super::services::view::ServicesView;

pub mod openapi;

type Shared = State<Arc<MeshController>>;

pub fn router(controller: Arc<MeshController>) -> Router {
    Router::new()
        .route("/api/v1/agents", get(agents))
        .route("/api/v1/endpoints", get(endpoints))
        .route("/api/v1/paths", get(paths))
        .route("/api/v1/findings", get(findings))
        .route("/api/v1/services", get(services))
        .route("/api/v1/summary", get(summary))
        .route("/metrics", get(metrics))
        .route("/healthz", get(|| async { "ok" }))
        .route("/readyz", get(|| async { "ready" }))
        // The web view at `/` and the history it reads.
        .merge(super::web::routes())
        .merge(openapi::routes())
        .with_state(controller)
}

fn unavailable(e: &dyn std::fmt::Display) -> Response {
    (
        StatusCode::SERVICE_UNAVAILABLE,
        format!("registry unavailable: {e}"),
    )
        .into_response()
}

async fn agents(State(c): Shared) -> Response {
    match c.agents().await {
        Ok(a) => Json(a).into_response(),
        Err(e) => unavailable(&e),
    }
}

async fn endpoints(State(c): Shared) -> Response {
    match c.endpoints().await {
        Ok(e) => Json(e).into_response(),
        Err(e) => unavailable(&e),
    }
}

async fn paths(State(c): Shared) -> Response {
    match c.last_report() {
        Some(r) => Json(&r.paths).into_response(),
        None => Json(Vec::<()>::new()).into_response(),
    }
}

/// What is broken: root causes first (each with the SLA findings it
/// explains), then every open SLA finding; each with the services whose
/// traced flows cross it, most affected first (see docs/services.md).
#[derive(Debug, Clone, Serialize, serde::Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct FindingsView {
    pub root_causes: Vec<Impacted<OpenRootCause>>,
    pub findings: Vec<Impacted<Finding>>,
}

/// A root cause or finding with the services it hits.
#[derive(Debug, Clone, Serialize, serde::Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Impacted<T> {
    #[serde(flatten)]
    pub item: T,
    /// Ranked by affected flows, then pods; at most 20 (see `impactedServiceCount`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub impacted_services: Vec<ImpactedService>,
    #[serde(default)]
    pub impacted_service_count: usize,
}

/// Open root causes and findings with the services each hits, as of the
/// last judged window.
pub fn findings_view(c: &MeshController) -> FindingsView {
    let impact = c.service_impact();
    FindingsView {
        root_causes: c
            .open_root_causes()
            .into_iter()
            .map(|cause| {
                let hit = impact.of_cause(&cause.cause);
                Impacted {
                    impacted_services: hit.map(|h| h.services.clone()).unwrap_or_default(),
                    impacted_service_count: hit.map_or(0, |h| h.service_count),
                    item: cause,
                }
            })
            .collect(),
        findings: c
            .open_findings()
            .into_iter()
            .map(|finding| {
                let hit = impact.of_finding(&finding);
                Impacted {
                    impacted_services: hit.map(|h| h.services.clone()).unwrap_or_default(),
                    impacted_service_count: hit.map_or(0, |h| h.service_count),
                    item: finding,
                }
            })
            .collect(),
    }
}

async fn findings(State(c): Shared) -> Json<FindingsView> {
    Json(findings_view(&c))
}

/// Services with traced flows, their paths and what hits them.
async fn services(State(c): Shared) -> Json<ServicesView> {
    Json(c.services_view())
}

/// The mesh at a glance.
#[derive(Debug, Clone, Serialize, serde::Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct MeshSummary {
    /// Start (Unix ms) of the last judged window; absent before the first one.
    pub window_start_ms: Option<u64>,
    pub window_ms: u32,
    pub agents_registered: usize,
    pub agents_connected: usize,
    pub paths_judged: usize,
    pub excluded_target_gone: u64,
    pub tor_pairs: Vec<TorPairStats>,
    /// Open root causes (localized faults), most confident first.
    #[serde(default)]
    pub root_causes: Vec<OpenRootCause>,
    pub findings: Vec<Finding>,
}

/// The mesh at a glance, as `/api/v1/summary` serves it.
pub async fn summarize(c: &MeshController) -> Result<MeshSummary, MeshError> {
    let agents = c.agents().await?;
    let report = c.last_report();
    Ok(MeshSummary {
        window_start_ms: report.as_ref().map(|r| r.window_start_ms),
        window_ms: c.config().pinglist.window_ms,
        agents_registered: agents.len(),
        agents_connected: agents.iter().filter(|a| a.connected).count(),
        paths_judged: report.as_ref().map_or(0, |r| r.paths.len()),
        excluded_target_gone: report.as_ref().map_or(0, |r| r.excluded_target_gone),
        tor_pairs: report
            .as_ref()
            .map(|r| r.tor_pairs.clone())
            .unwrap_or_default(),
        root_causes: c.open_root_causes(),
        findings: c.open_findings(),
    })
}

async fn summary(State(c): Shared) -> Response {
    match summarize(&c).await {
        Ok(s) => Json(s).into_response(),
        Err(e) => unavailable(&e),
    }
}

async fn metrics(State(c): Shared) -> impl IntoResponse {
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        c.metrics.encode(),
    )
}
