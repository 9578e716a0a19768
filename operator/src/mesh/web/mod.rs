//! The web view: a read-only page at `/` drawn from the JSON API (ToR-pair
//! heatmap over the history, root causes and findings, services, agents),
//! and the history endpoints it reads.
//!
//! The page is an HTML file, four small script modules and a stylesheet
//! (`assets/`), embedded in the binary so it works offline
//! and ships with whatever serves the mesh API (the demo, `standalone`, the
//! operator's HTTP port); no CDN, no build step. Only GET routes: the page
//! changes nothing. A strict Content-Security-Policy keeps it to its own
//! origin.

mod history_api;

use std::sync::Arc;

use axum::Router;
use axum::http::{HeaderValue, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;

use super::controller::MeshController;

pub use history_api::{HistoryIndex, WindowMatrix, WindowPaths};

/// An embedded file: its path under the page and its type.
struct Asset {
    path: &'static str,
    content_type: &'static str,
    body: &'static str,
}

const HTML: &str = "text/html; charset=utf-8";
const JS: &str = "text/javascript; charset=utf-8";
const CSS: &str = "text/css; charset=utf-8";

/// The page, then its script modules and style.
const ASSETS: [Asset; 6] = [
    Asset {
        path: "/",
        content_type: HTML,
        body: include_str!("assets/index.html"),
    },
    Asset {
        path: "/ui/app.js",
        content_type: JS,
        body: include_str!("assets/app.js"),
    },
    Asset {
        path: "/ui/matrix.js",
        content_type: JS,
        body: include_str!("assets/matrix.js"),
    },
    Asset {
        path: "/ui/heatmap.js",
        content_type: JS,
        body: include_str!("assets/heatmap.js"),
    },
    Asset {
        path: "/ui/panels.js",
        content_type: JS,
        body: include_str!("assets/panels.js"),
    },
    Asset {
        path: "/ui/app.css",
        content_type: CSS,
        body: include_str!("assets/app.css"),
    },
];

/// Own origin only: no inline script, nothing fetched from elsewhere.
const CSP: &str = "default-src 'none'; script-src 'self'; style-src 'self'; \
     connect-src 'self'; img-src 'self' data:; base-uri 'none'; form-action 'none'; \
     frame-ancestors 'none'";

fn serve(asset: &'static Asset) -> Response {
    (
        [
            (
                header::CONTENT_TYPE,
                HeaderValue::from_static(asset.content_type),
            ),
            // Small files: always revalidate, so a new binary's page is seen at once.
            (header::CACHE_CONTROL, HeaderValue::from_static("no-cache")),
            (
                header::CONTENT_SECURITY_POLICY,
                HeaderValue::from_static(CSP),
            ),
            (
                header::X_CONTENT_TYPE_OPTIONS,
                HeaderValue::from_static("nosniff"),
            ),
        ],
        asset.body,
    )
        .into_response()
}

/// The page, its assets and the history API; merged into the mesh HTTP router.
pub fn routes() -> Router<Arc<MeshController>> {
    let mut router = Router::new();
    for asset in &ASSETS {
        router = router.route(asset.path, get(move || async move { serve(asset) }));
    }
    router
        .route("/api/v1/history", get(history_api::index))
        .route("/api/v1/history/{window}", get(history_api::window))
        .route("/api/v1/history/{window}/paths", get(history_api::paths))
}
