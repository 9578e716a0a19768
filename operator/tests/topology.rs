//! ToRs from Node labels, end to end inside the operator: a Node cache fed
//! by hand, the operator's resolver, a real mesh controller on a `SQLite`
//! registry in a temporary directory, and the pinglists it hands out.
#![cfg(feature = "kubernetes")]
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::collections::BTreeMap;
use std::sync::Arc;

use kube::runtime::reflector::store::Writer;
use kube::runtime::watcher;
use pingmesh_operator::config::MeshConfig;
use pingmesh_operator::crd::TopologySpec;
use pingmesh_operator::mesh::controller::{MeshController, PresenceGuard};
use pingmesh_operator::mesh::registry::open_registry;
use pingmesh_operator::mesh::topology::TorResolver;
use pingmesh_operator::reconcile::{NodeMeta, NodeTorResolver, node_cache};
use pingmesh_proto::v1::{Endpoint, TargetKind, Transport};

const TOR_LABEL: &str = "topology.pingmesh.io/tor";
const RNIC_PREFIX: &str = "topology.pingmesh.io/tor-";

/// A mesh controller whose ToRs come from a hand-fed Node cache.
struct Mesh {
    dir: tempfile::TempDir,
    nodes: Writer<NodeMeta>,
    resolver: NodeTorResolver,
    controller: Arc<MeshController>,
    present: Vec<PresenceGuard>,
}

impl Mesh {
    async fn start(topology: TopologySpec) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let (store, nodes) = node_cache();
        let resolver = NodeTorResolver::new(store, topology);
        let controller = open(&dir, &resolver).await;
        Self {
            dir,
            nodes,
            resolver,
            controller,
            present: Vec::new(),
        }
    }

    fn label(&mut self, node: &str, labels: &[(&str, &str)]) {
        let mut meta = NodeMeta::default();
        meta.metadata.name = Some(node.to_owned());
        meta.metadata.labels = Some(
            labels
                .iter()
                .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                .collect(),
        );
        self.nodes.apply_watcher_event(&watcher::Event::Apply(meta));
    }

    /// Registers `node` and keeps its pinglist stream "open"; returns the session.
    async fn join(&mut self, node: &str, endpoints: Vec<Endpoint>) -> u64 {
        let (session, _) = self
            .controller
            .register(node, "test", &endpoints)
            .await
            .unwrap();
        self.present.push(self.controller.connect(node, session));
        session
    }

    /// ToR of every endpoint, as the registry stores it.
    async fn stored_tors(&self) -> BTreeMap<String, String> {
        self.controller
            .endpoints()
            .await
            .unwrap()
            .into_iter()
            .map(|e| (e.id, e.tor))
            .collect()
    }

    /// Endpoints `node`'s endpoints probe as ToR mesh (same ToR) targets.
    fn tor_mesh_targets(&self, node: &str) -> Vec<String> {
        let snapshot = self.controller.subscribe().borrow().clone();
        let mut targets: Vec<String> = self
            .controller
            .pinglist(node, &snapshot)
            .targets
            .into_iter()
            .filter(|t| t.kind == TargetKind::TorMesh as i32)
            .map(|t| format!("{} -> {}", t.source_endpoint, t.target.unwrap().id))
            .collect();
        targets.sort();
        targets.dedup();
        targets
    }
}

async fn open(dir: &tempfile::TempDir, resolver: &NodeTorResolver) -> Arc<MeshController> {
    let config = MeshConfig {
        registry: format!("sqlite://{}", dir.path().join("registry.db").display()),
        ..MeshConfig::default()
    };
    let registry = open_registry(&config.registry).await.unwrap();
    let resolver: Arc<dyn TorResolver> = Arc::new(resolver.clone());
    MeshController::with_tor_resolver(config, registry, Some(resolver))
        .await
        .unwrap()
}

fn udp(node: &str, port: u16) -> Endpoint {
    Endpoint {
        id: format!("{node}/udp0"),
        transport: Transport::Udp as i32,
        address: format!("127.0.0.1:{port}"),
        qpn: 0,
        tor: String::new(),
        device: String::new(),
    }
}

fn rnic(node: &str, device: &str, host: u8) -> Endpoint {
    Endpoint {
        id: format!("{node}/{device}"),
        transport: Transport::Rdma as i32,
        address: format!("::ffff:10.0.0.{host}"),
        qpn: 7,
        tor: String::new(),
        device: device.to_owned(),
    }
}

fn tors(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
    pairs
        .iter()
        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
        .collect()
}

#[tokio::test]
async fn endpoints_follow_their_node_label_to_a_new_tor_without_registering_again() {
    let mut mesh = Mesh::start(TopologySpec::default()).await;
    for (node, tor) in [("n1", "rack-1"), ("n2", "rack-1"), ("n3", "rack-2")] {
        mesh.label(node, &[(TOR_LABEL, tor)]);
    }
    let s1 = mesh.join("n1", vec![udp("n1", 7001)]).await;
    mesh.join("n2", vec![udp("n2", 7002)]).await;
    mesh.join("n3", vec![udp("n3", 7003)]).await;
    assert_eq!(
        mesh.stored_tors().await,
        tors(&[
            ("n1/udp0", "rack-1"),
            ("n2/udp0", "rack-1"),
            ("n3/udp0", "rack-2")
        ])
    );
    assert_eq!(mesh.tor_mesh_targets("n3"), Vec::<String>::new());

    // n2 is moved to rack 2.
    mesh.label("n2", &[(TOR_LABEL, "rack-2")]);
    let moved = mesh
        .controller
        .refresh_tors(Some(&["n2".to_owned()]))
        .await
        .unwrap();

    assert_eq!(moved, 1);
    assert_eq!(
        mesh.stored_tors().await,
        tors(&[
            ("n1/udp0", "rack-1"),
            ("n2/udp0", "rack-2"),
            ("n3/udp0", "rack-2")
        ])
    );
    assert_eq!(mesh.tor_mesh_targets("n3"), ["n3/udp0 -> n2/udp0"]);
    assert_eq!(mesh.tor_mesh_targets("n1"), Vec::<String>::new());
    assert_eq!(
        mesh.controller.current_session("n1"),
        s1,
        "no one registered again"
    );
    let snapshot = mesh.controller.subscribe().borrow().clone();
    let n2_list = mesh.controller.pinglist("n2", &snapshot);
    assert!(n2_list.targets.iter().all(|t| t.source_tor == "rack-2"));
    // Nothing changed since: a second refresh moves nothing.
    assert_eq!(mesh.controller.refresh_tors(None).await.unwrap(), 0);
}

#[tokio::test]
async fn each_rnic_goes_under_its_own_rail_tor_and_udp_under_the_node_tor() {
    let topology = TopologySpec {
        rnic_tor_label_prefix: RNIC_PREFIX.to_owned(),
        ..TopologySpec::default()
    };
    let mut mesh = Mesh::start(topology).await;
    mesh.label(
        "g1",
        &[
            (TOR_LABEL, "rack-1"),
            ("topology.pingmesh.io/tor-mlx5_0", "rail-0"),
            ("topology.pingmesh.io/tor-mlx5_1", "rail-1"),
        ],
    );
    mesh.join(
        "g1",
        vec![
            rnic("g1", "mlx5_0", 1),
            rnic("g1", "mlx5_1", 2),
            // No label of its own: the node's ToR.
            rnic("g1", "mlx5_2", 3),
            udp("g1", 7001),
        ],
    )
    .await;
    assert_eq!(
        mesh.stored_tors().await,
        tors(&[
            ("g1/mlx5_0", "rail-0"),
            ("g1/mlx5_1", "rail-1"),
            ("g1/mlx5_2", "rack-1"),
            ("g1/udp0", "rack-1"),
        ])
    );
    let stored = mesh.controller.endpoints().await.unwrap();
    assert_eq!(stored[0].device, "mlx5_0");
    assert!(stored.iter().all(|e| !e.tor_from_agent));
}

#[tokio::test]
async fn an_invalid_label_value_falls_back_and_is_counted() {
    let topology = TopologySpec {
        rnic_tor_label_prefix: RNIC_PREFIX.to_owned(),
        ..TopologySpec::default()
    };
    let mut mesh = Mesh::start(topology).await;
    mesh.label(
        "g1",
        &[
            (TOR_LABEL, "rack-1"),
            ("topology.pingmesh.io/tor-mlx5_0", "not a tor"),
        ],
    );
    mesh.label("g2", &[(TOR_LABEL, "räck")]);
    mesh.join("g1", vec![rnic("g1", "mlx5_0", 1)]).await;
    mesh.join("g2", vec![udp("g2", 7002)]).await;

    assert_eq!(
        mesh.stored_tors().await,
        tors(&[("g1/mlx5_0", "rack-1"), ("g2/udp0", "default")])
    );
    assert_eq!(mesh.controller.metrics.invalid_tor_labels.get(), 2);
}

#[tokio::test]
async fn a_tor_the_agent_names_itself_is_kept_whatever_the_labels_say() {
    let mut mesh = Mesh::start(TopologySpec::default()).await;
    mesh.label("n1", &[(TOR_LABEL, "rack-1")]);
    let mut own = udp("n1", 7001);
    own.tor = "agent-says".to_owned();
    mesh.join("n1", vec![own]).await;
    mesh.label("n1", &[(TOR_LABEL, "rack-9")]);

    assert_eq!(mesh.controller.refresh_tors(None).await.unwrap(), 0);
    assert_eq!(mesh.stored_tors().await, tors(&[("n1/udp0", "agent-says")]));
}

#[tokio::test]
async fn a_node_missing_from_the_cache_keeps_its_tor_until_it_shows_up() {
    let mut mesh = Mesh::start(TopologySpec::default()).await;
    // Registered before the Node cache knew the node: the default ToR.
    mesh.join("n1", vec![udp("n1", 7001)]).await;
    assert_eq!(mesh.stored_tors().await, tors(&[("n1/udp0", "default")]));
    assert_eq!(mesh.controller.refresh_tors(None).await.unwrap(), 0);

    mesh.label("n1", &[(TOR_LABEL, "rack-1")]);

    assert_eq!(mesh.controller.refresh_tors(None).await.unwrap(), 1);
    assert_eq!(mesh.stored_tors().await, tors(&[("n1/udp0", "rack-1")]));
}

#[tokio::test]
async fn devices_survive_a_controller_restart_and_a_topology_change_moves_endpoints() {
    let mut mesh = Mesh::start(TopologySpec::default()).await;
    mesh.label(
        "g1",
        &[
            (TOR_LABEL, "rack-1"),
            ("topology.pingmesh.io/tor-mlx5_0", "rail-0"),
        ],
    );
    mesh.join("g1", vec![rnic("g1", "mlx5_0", 1)]).await;
    assert_eq!(mesh.stored_tors().await, tors(&[("g1/mlx5_0", "rack-1")]));
    mesh.present.clear();

    // A new controller on the same registry, then per-RNIC ToRs are turned on.
    let restarted = open(&mesh.dir, &mesh.resolver).await;
    assert_eq!(restarted.known_endpoints()[0].device, "mlx5_0");
    assert!(mesh.resolver.set_topology(&TopologySpec {
        rnic_tor_label_prefix: RNIC_PREFIX.to_owned(),
        ..TopologySpec::default()
    }));
    assert_eq!(restarted.refresh_tors(None).await.unwrap(), 1);

    let stored: Vec<(String, String)> = restarted
        .endpoints()
        .await
        .unwrap()
        .into_iter()
        .map(|e| (e.id, e.tor))
        .collect();
    assert_eq!(stored, [("g1/mlx5_0".to_owned(), "rail-0".to_owned())]);
    assert_eq!(restarted.metrics.tor_changes.get(), 1);
}

#[tokio::test]
async fn without_a_resolver_every_endpoint_lands_in_the_default_tor() {
    let dir = tempfile::tempdir().unwrap();
    let config = MeshConfig {
        registry: format!("sqlite://{}", dir.path().join("registry.db").display()),
        default_tor: "fallback".into(),
        ..MeshConfig::default()
    };
    let registry = open_registry(&config.registry).await.unwrap();
    let controller = MeshController::new(config, registry).await.unwrap();
    let (_, stored) = controller
        .register("n1", "test", &[rnic("n1", "mlx5_0", 1)])
        .await
        .unwrap();
    assert_eq!(stored[0].tor, "fallback");
    assert_eq!(controller.refresh_tors(None).await.unwrap(), 0);
    // The device goes back to the agent as it came.
    assert_eq!(stored[0].to_proto().device, "mlx5_0");
}

#[tokio::test]
async fn a_device_name_that_is_not_a_valid_name_is_refused() {
    let mesh = Mesh::start(TopologySpec::default()).await;
    let err = mesh
        .controller
        .register("n1", "test", &[rnic("n1", "mlx5 0", 1)])
        .await
        .unwrap_err();
    assert_eq!(err.category(), "invalid_request", "{err}");
}
