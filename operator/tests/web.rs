//! The web view's HTTP side on a real server: the embedded page and every
//! module it imports, its security headers, and the history API it reads,
//! fed through the controller's own report and evaluate path.
//! (The page itself is driven in a real browser by `hack/web-test.sh`.)

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use pingmesh_operator::config::MeshConfig;
use pingmesh_operator::mesh::controller::MeshController;
use pingmesh_operator::mesh::http;
use pingmesh_operator::mesh::registry::open_registry;
use pingmesh_proto::v1::{Endpoint, Transport, WindowSummary};
use pingmesh_proto::window::{unix_now_ms, window_start};
use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const WINDOW_MS: u32 = 200;

struct Response {
    status: u16,
    headers: String,
    body: String,
}

impl Response {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers.lines().find_map(|line| {
            let (k, v) = line.split_once(':')?;
            k.eq_ignore_ascii_case(name).then(|| v.trim())
        })
    }

    fn json(&self) -> Value {
        serde_json::from_str(&self.body).unwrap_or_else(|e| panic!("{e}: {}", self.body))
    }
}

/// One HTTP/1.1 GET on a fresh connection.
async fn get(addr: SocketAddr, path: &str) -> Response {
    let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    let request = format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut raw = Vec::new();
    stream.read_to_end(&mut raw).await.unwrap();
    let raw = String::from_utf8(raw).unwrap();
    let (head, body) = raw.split_once("\r\n\r\n").unwrap();
    let (status_line, headers) = head.split_once("\r\n").unwrap_or((head, ""));
    Response {
        status: status_line.split(' ').nth(1).unwrap().parse().unwrap(),
        headers: headers.to_owned(),
        body: body.to_owned(),
    }
}

async fn serve(dir: &tempfile::TempDir) -> (Arc<MeshController>, SocketAddr) {
    let mut config = MeshConfig {
        registry: format!("sqlite://{}", dir.path().join("registry.db").display()),
        ..MeshConfig::default()
    };
    config.pinglist.window_ms = WINDOW_MS;
    config.pinglist.probe_timeout_ms = 50;
    let registry = open_registry(&config.registry).await.unwrap();
    let controller = MeshController::new(config, registry).await.unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let router = http::router(controller.clone());
    tokio::spawn(async move { axum::serve(listener, router).await });
    (controller, addr)
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

fn summary(source: &str, target: &str, start: u64, lost: u64) -> WindowSummary {
    WindowSummary {
        window_start_ms: start,
        window_ms: WINDOW_MS,
        source_endpoint: format!("{source}/udp0"),
        target_endpoint: format!("{target}/udp0"),
        sent: 20,
        ok: 20 - lost,
        lost,
        ..WindowSummary::default()
    }
}

#[tokio::test]
async fn the_page_and_every_module_it_imports_are_served_with_a_strict_policy() {
    let dir = tempfile::tempdir().unwrap();
    let (_controller, addr) = serve(&dir).await;
    let page = get(addr, "/").await;
    assert_eq!(page.status, 200);
    assert!(
        page.header("content-type")
            .unwrap()
            .starts_with("text/html")
    );
    let csp = page.header("content-security-policy").unwrap();
    assert!(
        csp.contains("default-src 'none'") && csp.contains("script-src 'self'"),
        "{csp}"
    );
    assert!(page.body.contains("src=\"/ui/app.js\""), "{}", page.body);
    assert!(page.body.contains("href=\"/ui/app.css\""));

    // Follow the module graph from the entry point: a module the binary does
    // not serve would leave the page blank.
    let mut pending = vec!["app.js".to_owned()];
    let mut seen = Vec::new();
    while let Some(module) = pending.pop() {
        let r = get(addr, &format!("/ui/{module}")).await;
        assert_eq!(r.status, 200, "/ui/{module}");
        assert!(
            r.header("content-type")
                .unwrap()
                .starts_with("text/javascript")
        );
        for import in r.body.split("from './").skip(1) {
            let name = import.split('\'').next().unwrap().to_owned();
            if !seen.contains(&name) && !pending.contains(&name) {
                pending.push(name);
            }
        }
        seen.push(module);
    }
    seen.sort();
    assert_eq!(seen, ["app.js", "heatmap.js", "matrix.js", "panels.js"]);
    let css = get(addr, "/ui/app.css").await;
    assert_eq!(css.status, 200);
    assert!(css.header("content-type").unwrap().starts_with("text/css"));
    // Nothing comes from elsewhere: no absolute URL in the page's files.
    for body in [&page.body, &css.body] {
        assert!(!body.contains("http://") && !body.contains("https://"));
    }
}

#[tokio::test]
async fn the_history_follows_closed_windows_and_names_the_failing_pairs() {
    let dir = tempfile::tempdir().unwrap();
    let (controller, addr) = serve(&dir).await;
    let empty = get(addr, "/api/v1/history").await.json();
    assert_eq!(empty["windows"], serde_json::json!([]));
    assert_eq!(get(addr, "/api/v1/history/latest").await.status, 404);

    let mut presence = Vec::new();
    for (node, tor, port) in [
        ("a", "tor-1", 7001),
        ("b", "tor-2", 7002),
        ("c", "tor-3", 7003),
    ] {
        let (session, _) = controller
            .register(node, "test", &[udp(node, tor, port)])
            .await
            .unwrap();
        presence.push(controller.connect(node, session));
    }
    // The first window every agent was present for all of.
    let start = window_start(unix_now_ms(), WINDOW_MS) + u64::from(WINDOW_MS);
    while unix_now_ms() < start {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    // a -> b loses half its probes; b -> a is clean; c reports nothing.
    controller
        .report("a", vec![summary("a", "b", start, 10)])
        .unwrap();
    controller
        .report("b", vec![summary("b", "a", start, 0)])
        .unwrap();
    controller.evaluate(start).unwrap();

    let index = get(addr, "/api/v1/history").await.json();
    assert_eq!(index["windowMs"], WINDOW_MS);
    let windows = index["windows"].as_array().unwrap();
    assert_eq!(windows.len(), 1);
    assert_eq!(windows[0]["startMs"], start);
    assert_eq!(windows[0]["pairs"], 2);
    assert_eq!(windows[0]["failingLoss"], 1);
    assert_eq!(windows[0]["pathsKept"], true);
    let after = get(addr, &format!("/api/v1/history?after={start}"))
        .await
        .json();
    assert_eq!(after["windows"], serde_json::json!([]));

    let latest = get(addr, "/api/v1/history/latest").await.json();
    assert_eq!(
        latest,
        get(addr, &format!("/api/v1/history/{start}")).await.json()
    );
    // tor-3 has no data but a registered endpoint: it keeps its row.
    assert_eq!(
        latest["tors"],
        serde_json::json!(["tor-1", "tor-2", "tor-3"])
    );
    let cells = &latest["cells"];
    assert_eq!(cells["source"], serde_json::json!([0, 1]));
    assert_eq!(cells["target"], serde_json::json!([1, 0]));
    assert_eq!(cells["lossRatio"], serde_json::json!([0.5, 0.0]));
    assert_eq!(cells["failing"], serde_json::json!([1, 0]));
    assert_eq!(latest["sla"]["maxLossRatio"], 0.01);

    let paths = get(
        addr,
        &format!("/api/v1/history/{start}/paths?sourceTor=tor-1&targetTor=tor-2"),
    )
    .await
    .json();
    let paths = paths["paths"].as_array().unwrap();
    assert_eq!(paths.len(), 1);
    assert_eq!(paths[0]["sourceEndpoint"], "a/udp0");
    assert_eq!(paths[0]["lost"], 10);
}

#[tokio::test]
async fn bad_history_requests_get_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let (_controller, addr) = serve(&dir).await;
    for (path, status, says) in [
        ("/api/v1/history?after=soon", 400, "Unix milliseconds"),
        ("/api/v1/history/yesterday", 400, "neither \"latest\""),
        ("/api/v1/history/1000", 404, "not in the history"),
        (
            "/api/v1/history/latest/paths",
            400,
            "sourceTor=A&targetTor=B",
        ),
        (
            "/api/v1/history/1000/paths?sourceTor=a&targetTor=b",
            404,
            "not in the history",
        ),
    ] {
        let r = get(addr, path).await;
        assert_eq!(r.status, status, "{path}: {}", r.body);
        assert!(r.body.contains(says), "{path}: {}", r.body);
    }
}

/// In a cluster the page comes through the operator's own HTTP port, as the
/// JSON API does: from the leader, and not from a standby.
#[cfg(feature = "kubernetes")]
mod operator_port {
    use std::sync::atomic::AtomicBool;

    use pingmesh_operator::reconcile::leader::Role;
    use pingmesh_operator::reconcile::run::{OperatorHttp, operator_router};
    use pingmesh_operator::reconcile::{MeshHost, ReconcileMetrics};

    use super::*;

    async fn serve_router(router: axum::Router) -> SocketAddr {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move { axum::serve(listener, router).await });
        addr
    }

    #[tokio::test]
    async fn the_leader_serves_the_page_and_a_standby_names_the_leader() {
        let dir = tempfile::tempdir().unwrap();
        let (controller, _) = serve(&dir).await;
        let host = Arc::new(MeshHost::new(controller, "pingmesh-system/default".into()));
        let leader = serve_router(operator_router(OperatorHttp::leading(
            host,
            ReconcileMetrics::new().unwrap(),
            Arc::new(AtomicBool::new(true)),
        )))
        .await;
        let page = get(leader, "/").await;
        assert_eq!(page.status, 200);
        assert!(page.body.contains("/ui/app.js"));
        assert_eq!(get(leader, "/ui/matrix.js").await.status, 200);
        assert_eq!(get(leader, "/api/v1/history").await.status, 200);

        let (_role_tx, role) = tokio::sync::watch::channel(Role::Standby {
            leader: Some("operator-1".into()),
            address: None,
        });
        let standby = serve_router(operator_router(OperatorHttp {
            hosted: Arc::default(),
            metrics: ReconcileMetrics::new().unwrap(),
            synced: Arc::new(AtomicBool::new(false)),
            role,
        }))
        .await;
        let page = get(standby, "/").await;
        assert_eq!(page.status, 503);
        assert!(page.body.contains("operator-1"), "{}", page.body);
    }
}
