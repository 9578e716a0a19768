//! `/api/v1/history`: the windows the controller keeps (for the time slider),
//! one window's ToR-pair matrix, and one ToR pair's paths in one window.
//!
//! Matrices are columnar (one array per field, ToRs as indices into `tors`):
//! a 1,000-pair window is ~40 KB of JSON instead of ~200 KB as objects.

use std::sync::Arc;

use axum::Json;
use axum::extract::rejection::QueryRejection;
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde::{Deserialize, Serialize};

use crate::mesh::analyzer::PathStats;
use crate::mesh::controller::MeshController;
use crate::mesh::history::{
    FAILING_LATENCY, FAILING_LOSS, PathsError, Thresholds, WindowCells, WindowRef,
};

type Shared = State<Arc<MeshController>>;

fn bad_request(message: String) -> Response {
    (StatusCode::BAD_REQUEST, message).into_response()
}

fn not_found(message: String) -> Response {
    (StatusCode::NOT_FOUND, message).into_response()
}

/// `latest` or a window's start in Unix milliseconds; the error says which
/// was expected.
fn parse_window(raw: &str) -> Result<WindowRef, String> {
    if raw == "latest" {
        return Ok(WindowRef::Latest);
    }
    raw.parse().map(WindowRef::Start).map_err(|_| {
        format!("window {raw:?} is neither \"latest\" nor a window start in Unix milliseconds")
    })
}

/// One window in the index.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct WindowEntry {
    pub start_ms: u64,
    pub pairs: usize,
    /// Pairs whose loss was above the SLA.
    pub failing_loss: usize,
    /// Pairs whose p99 network RTT was above the SLA (or never answered).
    pub failing_latency: usize,
    /// Whether the paths of this window can still be listed.
    pub paths_kept: bool,
}

/// `GET /api/v1/history[?after=MS]`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct HistoryIndex {
    pub window_ms: u32,
    /// How far back the history goes at most (it may hold less: see docs/web.md).
    pub max_age_ms: u64,
    /// Oldest first.
    pub windows: Vec<WindowEntry>,
}

#[derive(Debug, Deserialize)]
pub struct IndexQuery {
    after: Option<u64>,
}

pub async fn index(State(c): Shared, query: Result<Query<IndexQuery>, QueryRejection>) -> Response {
    let Ok(Query(query)) = query else {
        return bad_request("after must be a window start in Unix milliseconds".to_owned());
    };
    let windows = c
        .history
        .windows_after(query.after)
        .iter()
        .map(|w| WindowEntry {
            start_ms: w.start_ms,
            pairs: w.cells.len(),
            failing_loss: w.failing(FAILING_LOSS),
            failing_latency: w.failing(FAILING_LATENCY),
            paths_kept: w.paths_kept(),
        })
        .collect();
    Json(HistoryIndex {
        window_ms: c.config().pinglist.window_ms,
        max_age_ms: c.history.limits().max_age_ms,
        windows,
    })
    .into_response()
}

/// One column per field; entry i of each is cell i.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct CellColumns {
    /// Index into `tors`.
    pub source: Vec<u32>,
    pub target: Vec<u32>,
    pub paths: Vec<u32>,
    pub ok: Vec<u32>,
    pub lost: Vec<u32>,
    pub invalid: Vec<u32>,
    /// lost / (ok + lost); null when no probe was answered or lost.
    pub loss_ratio: Vec<Option<f64>>,
    /// Null when no probe was answered.
    pub p99_network_rtt_ns: Vec<Option<u64>>,
    /// Bit 1: loss above the SLA; bit 2: p99 above the SLA or no answer.
    pub failing: Vec<u8>,
    /// Whether enough probes were sent for the analyzer to judge loss.
    pub judged: Vec<bool>,
}

/// `GET /api/v1/history/{latest|START_MS}`.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct WindowMatrix {
    pub start_ms: u64,
    pub window_ms: u32,
    /// Sorted; `source` and `target` index into it.
    pub tors: Vec<String>,
    pub sla: Thresholds,
    pub paths_kept: bool,
    pub cells: CellColumns,
}

impl From<&WindowCells> for WindowMatrix {
    fn from(w: &WindowCells) -> Self {
        let mut cols = CellColumns::default();
        for c in &w.cells {
            cols.source.push(c.source);
            cols.target.push(c.target);
            cols.paths.push(c.paths);
            cols.ok.push(c.ok);
            cols.lost.push(c.lost);
            cols.invalid.push(c.invalid);
            // Rounded: six digits say all a heatmap can show, in fewer bytes.
            cols.loss_ratio
                .push(c.loss_ratio().map(|l| (l * 1e6).round() / 1e6));
            cols.p99_network_rtt_ns.push(c.p99_network_rtt_ns());
            cols.failing.push(c.failing);
            cols.judged
                .push(c.loss != crate::mesh::analyzer::Judgement::NotJudged);
        }
        Self {
            start_ms: w.start_ms,
            window_ms: w.window_ms,
            tors: w.tors.to_vec(),
            sla: w.thresholds,
            paths_kept: w.paths_kept(),
            cells: cols,
        }
    }
}

pub async fn window(State(c): Shared, Path(raw): Path<String>) -> Response {
    let which = match parse_window(&raw) {
        Ok(w) => w,
        Err(message) => return bad_request(message),
    };
    match c.history.window(which) {
        Some(w) => Json(WindowMatrix::from(w.as_ref())).into_response(),
        None if which == WindowRef::Latest => not_found("no window has closed yet".to_owned()),
        None => not_found(format!(
            "window {raw} is not in the history (too old, or not closed yet)"
        )),
    }
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PairQuery {
    source_tor: Option<String>,
    target_tor: Option<String>,
}

/// `GET /api/v1/history/{latest|START_MS}/paths?sourceTor=A&targetTor=B`.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct WindowPaths {
    pub start_ms: u64,
    pub source_tor: String,
    pub target_tor: String,
    pub paths: Vec<PathStats>,
}

pub async fn paths(
    State(c): Shared,
    Path(raw): Path<String>,
    query: Result<Query<PairQuery>, QueryRejection>,
) -> Response {
    let which = match parse_window(&raw) {
        Ok(w) => w,
        Err(message) => return bad_request(message),
    };
    let Ok(Query(PairQuery {
        source_tor: Some(source_tor),
        target_tor: Some(target_tor),
    })) = query
    else {
        return bad_request("name the ToR pair: ?sourceTor=A&targetTor=B".to_owned());
    };
    match c.history.paths(which, &source_tor, &target_tor) {
        Ok((start_ms, paths)) => Json(WindowPaths {
            start_ms,
            source_tor,
            target_tor,
            paths,
        })
        .into_response(),
        Err(e @ (PathsError::UnknownWindow(_) | PathsError::Empty)) => not_found(e.to_string()),
        // Gone, not missing: the window is known, its detail was let go.
        Err(e @ PathsError::PathsDropped(_)) => (StatusCode::GONE, e.to_string()).into_response(),
    }
}
