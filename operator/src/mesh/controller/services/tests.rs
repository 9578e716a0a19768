//! The controller's service impact uses the path-trace planner's hops: a
//! traced link hits the services whose own routes cross it, and no other.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeMap;
use std::sync::Arc;

use pingmesh_proto::v1;
use pingmesh_proto::window::unix_now_ms;

use super::super::{MeshController, lock};
use crate::config::MeshConfig;
use crate::mesh::localize::{CauseEvidence, CauseKind, OpenRootCause, RootCause, Signal};
use crate::mesh::registry::SqliteRegistry;
use crate::mesh::traces::{ProbedPath, TraceSettings};

/// RoCE v2 GID of an IPv4 address.
fn gid(ip: &str) -> String {
    format!("::ffff:{ip}")
}

/// tor1 and tor3 joined by two spines; each switch answers traces from one address.
fn switches() -> BTreeMap<String, Vec<std::net::IpAddr>> {
    [
        ("tor1", "10.0.1.1"),
        ("sp1", "10.0.100.1"),
        ("sp2", "10.0.100.2"),
        ("tor3", "10.0.3.1"),
    ]
    .into_iter()
    .map(|(name, ip)| (name.to_owned(), vec![ip.parse().unwrap()]))
    .collect()
}

async fn controller(dir: &tempfile::TempDir) -> Arc<MeshController> {
    let registry = SqliteRegistry::open(dir.path().join("registry.db"))
        .await
        .unwrap();
    let config = MeshConfig {
        traces: TraceSettings {
            switches: switches(),
            ..TraceSettings::default()
        },
        ..MeshConfig::default()
    };
    MeshController::new(config, Arc::new(registry))
        .await
        .unwrap()
}

/// Registers `node` with one RNIC whose GID maps `ip`; returns its session.
async fn join(c: &MeshController, node: &str, ip: &str, tor: &str) -> u64 {
    let endpoint = v1::Endpoint {
        id: format!("{node}/mlx5_0"),
        transport: v1::Transport::Rdma as i32,
        address: gid(ip),
        qpn: 17,
        tor: tor.to_owned(),
        device: "mlx5_0".to_owned(),
    };
    c.register(node, "test", &[endpoint]).await.unwrap().0
}

/// `connections` queue pairs of `pod` from `from` to `to` with one flow label.
fn queue_pairs(
    from: &str,
    to: &str,
    pod: &str,
    label: u32,
    connections: u32,
) -> Vec<v1::ServiceFlow> {
    (1..=connections)
        .map(|qpn| v1::ServiceFlow {
            kind: v1::ServiceFlowKind::Rdma.into(),
            local_address: gid(from),
            remote_address: gid(to),
            local_port: 100 + qpn,
            remote_port: 200 + qpn,
            flow_label: label,
            pod_uid: pod.to_owned(),
            pid: 7,
            command: "trainer".to_owned(),
            ..v1::ServiceFlow::default()
        })
        .collect()
}

/// Pod UIDs of the two services (hex and dashes, as agents report them).
const TRAIN: &str = "7a1e-0001";
const STORE: &str = "5707-0002";

/// Has the planner trace flow 0 of `source -> target` and answers with `hops`.
fn trace(c: &MeshController, node: &str, source: &str, target: &str, hops: &[&str]) {
    let state = lock(&c.state);
    let mut traces = lock(&c.traces);
    let now = unix_now_ms();
    traces.plan(
        [ProbedPath {
            source,
            target,
            probed_flows: 1,
            lost_flows: 1,
        }],
        &state.endpoints,
        now,
    );
    let asked = traces.exchange(node, Vec::new(), &state.endpoints, now);
    let request = asked
        .iter()
        .find(|r| r.source_endpoint == source && r.flow == 0)
        .expect("flow 0 is asked for");
    let answer = v1::TraceResult {
        id: request.id,
        source_port: 49_152,
        hops: hops.iter().map(|h| (*h).to_owned()).collect(),
        reached: true,
        ..v1::TraceResult::default()
    };
    traces.exchange(node, vec![answer], &state.endpoints, now);
}

fn link(component: &str) -> OpenRootCause {
    OpenRootCause {
        cause: RootCause {
            kind: CauseKind::Link,
            component: component.to_owned(),
            side: None,
            signal: Signal::Loss,
            node: None,
            tor: None,
            confidence: 0.9,
            evidence: CauseEvidence::default(),
            candidates: Vec::new(),
            explains: Vec::new(),
            summary: String::new(),
        },
        opened_at_window_ms: 0,
        first_window_ms: 0,
        last_window_ms: 0,
        cleared_at_window_ms: None,
    }
}

fn hit_by(c: &MeshController, cause: usize) -> Vec<String> {
    c.service_impact().root_causes[cause]
        .services
        .iter()
        .map(|s| s.service.clone())
        .collect()
}

#[tokio::test]
async fn a_traced_link_hits_only_the_services_whose_traced_routes_cross_it() {
    let dir = tempfile::tempdir().unwrap();
    let c = controller(&dir).await;
    let h11 = join(&c, "h11", "10.0.1.11", "tor1").await;
    let h12 = join(&c, "h12", "10.0.1.12", "tor1").await;
    join(&c, "h31", "10.0.3.11", "tor3").await;
    // Both services run from tor1 to the same host under tor3, with their own
    // flow labels; "store" has more connections, so it would rank first if
    // the link hit both.
    c.report_service_flows(
        "h11",
        h11,
        &queue_pairs("10.0.1.11", "10.0.3.11", TRAIN, 0x11, 2),
        0,
    )
    .unwrap();
    c.report_service_flows(
        "h12",
        h12,
        &queue_pairs("10.0.1.12", "10.0.3.11", STORE, 0x22, 5),
        0,
    )
    .unwrap();

    let links = [link("sp2 -> tor3"), link("sp1 -> tor3")];
    // Before any trace, a link cause explains no finding on their paths: no service.
    c.set_service_impact(1_000, &links, &[]);
    assert_eq!(
        c.services_view().services.len(),
        2,
        "both services are known"
    );
    assert!(hit_by(&c, 0).is_empty(), "{:?}", c.service_impact());
    assert!(hit_by(&c, 1).is_empty(), "{:?}", c.service_impact());

    trace(
        &c,
        "h11",
        "h11/mlx5_0",
        "h31/mlx5_0",
        &["10.0.1.1", "10.0.100.2", "10.0.3.1"],
    );
    trace(
        &c,
        "h12",
        "h12/mlx5_0",
        "h31/mlx5_0",
        &["10.0.1.1", "10.0.100.1", "10.0.3.1"],
    );
    c.set_service_impact(2_000, &links, &[]);

    let (train, store) = (format!("PodUID/{TRAIN}"), format!("PodUID/{STORE}"));
    assert_eq!(hit_by(&c, 0), std::slice::from_ref(&train));
    assert_eq!(hit_by(&c, 1), [store]);
    let impact = c.service_impact();
    assert_eq!(impact.window_start_ms, Some(2_000));
    assert_eq!(impact.root_causes[0].services[0].flows, 2);
    let views = c.services_view();
    let train_view = views.services.iter().find(|s| s.service == train).unwrap();
    assert_eq!(train_view.impacted_by, ["link sp2 -> tor3"]);

    // Only the sp2 link still faulty: the service it hits leads the services
    // view although the other has more connections.
    c.set_service_impact(3_000, &links[..1], &[]);
    let views = c.services_view();
    let order: Vec<&str> = views.services.iter().map(|s| s.service.as_str()).collect();
    assert_eq!(order, [train.as_str(), format!("PodUID/{STORE}").as_str()]);
    assert!(views.services[1].impacted_by.is_empty());
}
