//! The OpenAPI 3.1 document of the HTTP API, served at [`PATH`]
//! (`/api/v1/openapi.json`), for clients and for the schema-based API fuzzer
//! (hack/api-fuzz.sh, docs/fuzzing.md).
//!
//! The document is built from [`ROUTES`], one entry per route the router
//! serves; a test fails when the router gains a route this table lacks.
//! Bodies are described to their top-level fields ([`schemas`]); nested
//! objects (findings, path statistics, services) are typed as objects
//! without their fields: their types carry no schema derive yet.

mod schemas;

use std::sync::Arc;

use axum::Json;
use axum::Router;
use axum::routing::get;
use serde_json::{Map, Value, json};

use crate::mesh::controller::MeshController;

/// Where the document is served.
pub const PATH: &str = "/api/v1/openapi.json";

/// What a route answers with on success.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Body {
    /// `application/json` with this schema (a name under `components.schemas`).
    Json(&'static str),
    /// `text/plain` (health probes, Prometheus exposition).
    Text,
    /// A page or asset of the web view.
    Asset(&'static str),
}

/// A query or path parameter.
#[derive(Debug, Clone, Copy)]
pub struct Param {
    pub name: &'static str,
    pub in_path: bool,
    pub required: bool,
    pub schema: fn() -> Value,
    pub description: &'static str,
}

/// One GET route.
#[derive(Debug, Clone, Copy)]
pub struct Route {
    /// The path as OpenAPI writes it (`{window}`), which is also axum 0.8's syntax.
    pub path: &'static str,
    pub summary: &'static str,
    pub body: Body,
    pub params: &'static [Param],
    /// Client errors the route answers with, besides 200.
    pub errors: &'static [(u16, &'static str)],
}

const REGISTRY_DOWN: (u16, &str) = (503, "the registry is unavailable");

fn window_param() -> Value {
    json!({"oneOf": [
        {"type": "string", "const": "latest"},
        {"type": "string", "pattern": "^[0-9]{1,19}$", "description": "a window start, Unix ms (at most 19 digits)"}
    ]})
}

fn unix_ms() -> Value {
    json!({"type": "integer", "minimum": 0, "maximum": u64::MAX})
}

fn tor_name() -> Value {
    json!({"type": "string"})
}

const WINDOW: Param = Param {
    name: "window",
    in_path: true,
    required: true,
    schema: window_param,
    description: "`latest` or the window's start in Unix milliseconds",
};

/// Every route of `http::router`, the web view's included.
pub const ROUTES: &[Route] = &[
    Route {
        path: "/api/v1/agents",
        summary: "Registered agents, whether each is connected, and their endpoints",
        body: Body::Json("Agents"),
        params: &[],
        errors: &[REGISTRY_DOWN],
    },
    Route {
        path: "/api/v1/endpoints",
        summary: "Every registered endpoint",
        body: Body::Json("Endpoints"),
        params: &[],
        errors: &[REGISTRY_DOWN],
    },
    Route {
        path: "/api/v1/paths",
        summary: "Per-path statistics of the last judged window",
        body: Body::Json("Paths"),
        params: &[],
        errors: &[],
    },
    Route {
        path: "/api/v1/findings",
        summary: "Open root causes and SLA findings, each with the services it hits",
        body: Body::Json("FindingsView"),
        params: &[],
        errors: &[],
    },
    Route {
        path: "/api/v1/services",
        summary: "Services with traced flows, their paths and what hits them",
        body: Body::Json("ServicesView"),
        params: &[],
        errors: &[],
    },
    Route {
        path: "/api/v1/summary",
        summary: "The mesh at a glance (what `pingmesh status` prints)",
        body: Body::Json("MeshSummary"),
        params: &[],
        errors: &[REGISTRY_DOWN],
    },
    Route {
        path: "/api/v1/history",
        summary: "The windows the controller keeps, oldest first",
        body: Body::Json("HistoryIndex"),
        params: &[Param {
            name: "after",
            in_path: false,
            required: false,
            schema: unix_ms,
            description: "only windows that start after this Unix ms",
        }],
        errors: &[(400, "`after` is not a Unix ms")],
    },
    Route {
        path: "/api/v1/history/{window}",
        summary: "One window's ToR-pair matrix (columnar)",
        body: Body::Json("WindowMatrix"),
        params: &[WINDOW],
        errors: &[
            (400, "the window is neither `latest` nor a Unix ms"),
            (404, "no such window"),
        ],
    },
    Route {
        path: "/api/v1/history/{window}/paths",
        summary: "One ToR pair's paths in one window",
        body: Body::Json("WindowPaths"),
        params: &[
            WINDOW,
            Param {
                name: "sourceTor",
                in_path: false,
                required: true,
                schema: tor_name,
                description: "the pair's source ToR",
            },
            Param {
                name: "targetTor",
                in_path: false,
                required: true,
                schema: tor_name,
                description: "the pair's target ToR",
            },
        ],
        errors: &[
            (400, "a bad window or a missing ToR"),
            (404, "no such window or pair"),
            (410, "the window is known but its paths were let go"),
        ],
    },
    Route {
        path: PATH,
        summary: "This document",
        body: Body::Json("OpenApi"),
        params: &[],
        errors: &[],
    },
    Route {
        path: "/metrics",
        summary: "The controller's Prometheus metrics (text exposition 0.0.4)",
        body: Body::Text,
        params: &[],
        errors: &[],
    },
    Route {
        path: "/healthz",
        summary: "Liveness: `ok`",
        body: Body::Text,
        params: &[],
        errors: &[],
    },
    Route {
        path: "/readyz",
        summary: "Readiness: `ready`",
        body: Body::Text,
        params: &[],
        errors: &[],
    },
    Route {
        path: "/",
        summary: "The web view",
        body: Body::Asset("text/html; charset=utf-8"),
        params: &[],
        errors: &[],
    },
    Route {
        path: "/ui/app.js",
        summary: "The web view's script",
        body: Body::Asset("text/javascript; charset=utf-8"),
        params: &[],
        errors: &[],
    },
    Route {
        path: "/ui/heatmap.js",
        summary: "The web view's heatmap model",
        body: Body::Asset("text/javascript; charset=utf-8"),
        params: &[],
        errors: &[],
    },
    Route {
        path: "/ui/matrix.js",
        summary: "The web view's ToR-pair matrix",
        body: Body::Asset("text/javascript; charset=utf-8"),
        params: &[],
        errors: &[],
    },
    Route {
        path: "/ui/panels.js",
        summary: "The web view's panels",
        body: Body::Asset("text/javascript; charset=utf-8"),
        params: &[],
        errors: &[],
    },
    Route {
        path: "/ui/app.css",
        summary: "The web view's style sheet",
        body: Body::Asset("text/css; charset=utf-8"),
        params: &[],
        errors: &[],
    },
];

fn text(media: &str) -> Value {
    let mut content = Map::new();
    content.insert(media.to_owned(), json!({"schema": {"type": "string"}}));
    Value::Object(content)
}

fn operation(route: &Route) -> Value {
    let content = match route.body {
        Body::Json(name) => {
            json!({"application/json": {"schema": {"$ref": format!("#/components/schemas/{name}")}}})
        }
        Body::Text => text("text/plain"),
        Body::Asset(media) => text(media),
    };
    let mut responses = Map::new();
    responses.insert(
        "200".into(),
        json!({"description": "OK", "content": content}),
    );
    for (code, why) in route.errors {
        responses.insert(
            code.to_string(),
            json!({"description": why, "content": text("text/plain")}),
        );
    }
    let params: Vec<Value> = route
        .params
        .iter()
        .map(|p| {
            json!({
                "name": p.name,
                "in": if p.in_path { "path" } else { "query" },
                "required": p.required,
                "description": p.description,
                "schema": (p.schema)(),
            })
        })
        .collect();
    let id = match route.path.trim_matches('/') {
        "" => "index".to_owned(),
        path => path.replace(['/', '.', '{', '}'], "_"),
    };
    json!({"get": {
        "operationId": id,
        "summary": route.summary,
        "parameters": params,
        "responses": responses,
    }})
}

/// The whole document.
pub fn document() -> Value {
    let paths: Map<String, Value> = ROUTES
        .iter()
        .map(|r| (r.path.to_owned(), operation(r)))
        .collect();
    json!({
        "openapi": "3.1.0",
        "info": {
            "title": "PingMesh mesh controller HTTP API",
            "version": env!("CARGO_PKG_VERSION"),
            "description": "Read-only JSON views of the mesh, the web view, metrics and health probes (docs/web.md; fuzzed as docs/fuzzing.md describes).",
        },
        "paths": paths,
        "components": {"schemas": schemas::all()},
    })
}

/// The route serving the document, merged into `http::router`.
pub fn routes() -> Router<Arc<MeshController>> {
    let document = Arc::new(document());
    Router::new().route(
        PATH,
        get(move || {
            let document = document.clone();
            async move { Json(document.as_ref().clone()) }
        }),
    )
}
