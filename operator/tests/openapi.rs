//! The OpenAPI document (`/api/v1/openapi.json`) against the router that
//! serves it: every route the router has is documented, and every documented
//! route answers, on a controller with agents, reports and a judged window,
//! with a documented status, media type and the documented top-level fields.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::sync::Arc;

use pingmesh_operator::config::MeshConfig;
use pingmesh_operator::mesh::controller::MeshController;
use pingmesh_operator::mesh::http;
use pingmesh_operator::mesh::http::openapi::{self, Body, ROUTES};
use pingmesh_operator::mesh::registry::open_registry;
use pingmesh_proto::v1::{Endpoint, Transport, WindowSummary};
use pingmesh_proto::window::{unix_now_ms, window_start};
use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const WINDOW_MS: u32 = 200;

/// Route paths written as string literals in the router's sources: the
/// `.route("...")` calls and the web view's asset table.
fn routes_in_source() -> BTreeSet<String> {
    let sources = [
        include_str!("../src/mesh/http.rs"),
        include_str!("../src/mesh/web/mod.rs"),
    ];
    let mut found = BTreeSet::new();
    for source in sources {
        for marker in [".route(\"", "path: \""] {
            for rest in source.split(marker).skip(1) {
                let path = rest.split('"').next().unwrap();
                if path.starts_with('/') {
                    found.insert(path.to_owned());
                }
            }
        }
    }
    found.insert(openapi::PATH.to_owned());
    found
}

#[test]
fn every_route_the_router_serves_is_documented_and_nothing_else() {
    let documented: BTreeSet<String> = ROUTES.iter().map(|r| r.path.to_owned()).collect();
    let served = routes_in_source();
    let undocumented: Vec<_> = served.difference(&documented).collect();
    let extra: Vec<_> = documented.difference(&served).collect();
    assert!(
        undocumented.is_empty(),
        "served but not in the document: {undocumented:?}"
    );
    assert!(
        extra.is_empty(),
        "in the document but not served: {extra:?}"
    );
    let doc = openapi::document();
    assert_eq!(doc["openapi"], "3.1.0");
    for route in ROUTES {
        assert!(
            doc["paths"][route.path]["get"].is_object(),
            "{}",
            route.path
        );
        if let Body::Json(name) = route.body {
            assert!(
                doc["components"]["schemas"][name].is_object(),
                "{} refers to a missing schema {name}",
                route.path
            );
        }
    }
}

struct Reply {
    status: u16,
    content_type: String,
    body: String,
}

async fn get(addr: SocketAddr, path: &str) -> Reply {
    let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    let request = format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut raw = Vec::new();
    stream.read_to_end(&mut raw).await.unwrap();
    let raw = String::from_utf8(raw).unwrap();
    let (head, body) = raw.split_once("\r\n\r\n").unwrap();
    let status = head.split(' ').nth(1).unwrap().parse().unwrap();
    let content_type = head
        .lines()
        .find_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.eq_ignore_ascii_case("content-type")
                .then(|| v.trim().to_owned())
        })
        .unwrap_or_default();
    Reply {
        status,
        content_type,
        body: body.to_owned(),
    }
}

fn udp(node: &str, tor: &str, port: u16) -> Endpoint {
    Endpoint {
        id: format!("{node}/udp0"),
        transport: Transport::Udp as i32,
        address: format!("127.0.0.1:{port}"),
        tor: tor.into(),
        ..Endpoint::default()
    }
}

fn summary(source: &str, target: &str, start: u64) -> WindowSummary {
    WindowSummary {
        window_start_ms: start,
        window_ms: WINDOW_MS,
        source_endpoint: format!("{source}/udp0"),
        target_endpoint: format!("{target}/udp0"),
        sent: 20,
        ok: 15,
        lost: 5,
        ..WindowSummary::default()
    }
}

/// A controller with two agents on two ToRs and one judged, lossy window.
async fn fed_controller(dir: &tempfile::TempDir) -> (Arc<MeshController>, SocketAddr) {
    let mut config = MeshConfig {
        registry: format!("sqlite://{}", dir.path().join("registry.db").display()),
        ..MeshConfig::default()
    };
    config.pinglist.window_ms = WINDOW_MS;
    config.pinglist.probe_timeout_ms = 50;
    let registry = open_registry(&config.registry).await.unwrap();
    let controller = MeshController::new(config, registry).await.unwrap();
    controller
        .register("a", "test", &[udp("a", "tor-1", 9001)])
        .await
        .unwrap();
    controller
        .register("b", "test", &[udp("b", "tor-2", 9002)])
        .await
        .unwrap();
    let start = window_start(unix_now_ms(), WINDOW_MS) - u64::from(WINDOW_MS);
    controller
        .report("a", vec![summary("a", "b", start)])
        .unwrap();
    controller
        .report("b", vec![summary("b", "a", start)])
        .unwrap();
    assert!(
        controller.evaluate(start).is_some(),
        "the window was judged"
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let router = http::router(controller.clone());
    tokio::spawn(async move { axum::serve(listener, router).await });
    (controller, addr)
}

/// The route's path with its parameters filled in for the fed controller.
fn concrete(path: &str) -> String {
    match path {
        "/api/v1/history/{window}" => "/api/v1/history/latest".to_owned(),
        "/api/v1/history/{window}/paths" => {
            "/api/v1/history/latest/paths?sourceTor=tor-1&targetTor=tor-2".to_owned()
        }
        other => other.to_owned(),
    }
}

/// Checks `value` against the document's schema to the depth the document
/// goes: types, required fields, and no undocumented top-level field.
fn conforms(schema: &Value, value: &Value, at: &str) {
    match schema["type"].as_str() {
        Some("array") => {
            let items = value
                .as_array()
                .unwrap_or_else(|| panic!("{at}: not an array"));
            for (i, item) in items.iter().enumerate() {
                conforms(&schema["items"], item, &format!("{at}[{i}]"));
            }
        }
        Some("object") => {
            let object = value
                .as_object()
                .unwrap_or_else(|| panic!("{at}: not an object"));
            for field in schema["required"].as_array().into_iter().flatten() {
                let field = field.as_str().unwrap();
                assert!(object.contains_key(field), "{at}: no {field}");
            }
            if let Some(properties) = schema["properties"].as_object() {
                if schema["required"].as_array().is_some_and(|r| !r.is_empty()) {
                    for key in object.keys() {
                        assert!(
                            properties.contains_key(key),
                            "{at}: field {key} is not in the document"
                        );
                    }
                }
                for (key, sub) in properties {
                    if let Some(v) = object.get(key) {
                        conforms(sub, v, &format!("{at}.{key}"));
                    }
                }
            }
        }
        _ => {}
    }
}

#[tokio::test]
async fn every_documented_route_answers_as_documented() {
    let dir = tempfile::tempdir().unwrap();
    let (_controller, addr) = fed_controller(&dir).await;
    let served = get(addr, openapi::PATH).await;
    assert_eq!(served.status, 200);
    let doc: Value = serde_json::from_str(&served.body).unwrap();
    assert_eq!(
        doc,
        openapi::document(),
        "the served document is the built one"
    );
    for route in ROUTES {
        let path = concrete(route.path);
        let reply = get(addr, &path).await;
        assert_eq!(reply.status, 200, "{path}: {}", reply.body);
        match route.body {
            Body::Json(name) => {
                assert!(reply.content_type.starts_with("application/json"), "{path}");
                let value: Value = serde_json::from_str(&reply.body).unwrap();
                conforms(&doc["components"]["schemas"][name], &value, &path);
            }
            Body::Text => assert!(reply.content_type.starts_with("text/plain"), "{path}"),
            Body::Asset(media) => assert_eq!(reply.content_type, media, "{path}"),
        }
    }
    // The documented refusals are what the routes answer.
    for (path, status) in [
        ("/api/v1/history?after=soon", 400),
        ("/api/v1/history/yesterday", 400),
        ("/api/v1/history/1", 404),
        ("/api/v1/history/latest/paths", 400),
    ] {
        let reply = get(addr, path).await;
        assert_eq!(reply.status, status, "{path}: {}", reply.body);
    }
}
