//! ToRs from Node labels, end to end inside the operator: a Node cache fed
//! by hand, the operator's resolver, a real mesh controller on a `SQLite`
//! registry in a temporary directory, and the pinglists it hands out.
#![cfg(feature = "kubernetes")]
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use async_trait::async_trait;
use kube::runtime::reflector::store::Writer;
use kube::runtime::watcher;
use pingmesh_operator::config::MeshConfig;
use pingmesh_operator::crd::TopologySpec;
use pingmesh_operator::mesh::controller::{MeshController, PresenceGuard};
use pingmesh_operator::mesh::registry::{Registry, RegistryError, TorMove, open_registry};
use pingmesh_operator::mesh::topology::TorResolver;
use pingmesh_operator::mesh::types::{AgentRecord, MeshEndpoint};
use pingmesh_operator::reconcile::{
    MeshHost, NodeMeta, NodeTorResolver, RelabeledNodes, follow_node_labels, node_cache,
};
use pingmesh_proto::v1::{Endpoint, TargetKind, Transport};
use tokio_util::sync::CancellationToken;

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

/// A registry whose next `set_tors` calls fail, as rqlite's do while it
/// elects a leader.
#[derive(Debug)]
struct Flaky {
    inner: Arc<dyn Registry>,
    failing_moves: AtomicU32,
    moves_tried: AtomicU32,
}

#[async_trait]
impl Registry for Flaky {
    fn backend(&self) -> &'static str {
        self.inner.backend()
    }
    async fn register(
        &self,
        node: &str,
        agent_version: &str,
        session: u64,
        endpoints: &[MeshEndpoint],
        now_ms: u64,
    ) -> Result<(), RegistryError> {
        self.inner
            .register(node, agent_version, session, endpoints, now_ms)
            .await
    }
    async fn touch(&self, node: &str, session: u64, now_ms: u64) -> Result<(), RegistryError> {
        self.inner.touch(node, session, now_ms).await
    }
    async fn set_tors(&self, moves: &[TorMove]) -> Result<u64, RegistryError> {
        self.moves_tried.fetch_add(1, Ordering::SeqCst);
        let failing = self.failing_moves.load(Ordering::SeqCst);
        if failing > 0 {
            self.failing_moves.store(failing - 1, Ordering::SeqCst);
            return Err(RegistryError::Query {
                op: "set_tors",
                source: "leadership lost while committing".into(),
            });
        }
        self.inner.set_tors(moves).await
    }
    async fn remove_node(&self, node: &str) -> Result<bool, RegistryError> {
        self.inner.remove_node(node).await
    }
    async fn expire(&self, last_seen_before_ms: u64) -> Result<Vec<String>, RegistryError> {
        self.inner.expire(last_seen_before_ms).await
    }
    async fn agents(&self) -> Result<Vec<AgentRecord>, RegistryError> {
        self.inner.agents().await
    }
    async fn endpoints(&self) -> Result<Vec<MeshEndpoint>, RegistryError> {
        self.inner.endpoints().await
    }
    async fn agent(&self, node: &str) -> Result<Option<AgentRecord>, RegistryError> {
        self.inner.agent(node).await
    }
}

/// The follower with a mesh controller on a registry whose next `failing`
/// moves fail; returns what the test needs to drive it.
async fn follower(
    dir: &tempfile::TempDir,
    resolver: &NodeTorResolver,
    failing: u32,
) -> (
    Arc<Flaky>,
    Arc<MeshController>,
    Arc<MeshHost>,
    Arc<RelabeledNodes>,
) {
    let config = MeshConfig {
        registry: format!("sqlite://{}", dir.path().join("registry.db").display()),
        ..MeshConfig::default()
    };
    let registry = Arc::new(Flaky {
        inner: open_registry(&config.registry).await.unwrap(),
        failing_moves: AtomicU32::new(failing),
        moves_tried: AtomicU32::new(0),
    });
    let tor_resolver: Arc<dyn TorResolver> = Arc::new(resolver.clone());
    let controller =
        MeshController::with_tor_resolver(config, registry.clone(), Some(tor_resolver))
            .await
            .unwrap();
    let host = Arc::new(MeshHost::new(controller.clone(), "ns/default".into()));
    (
        registry,
        controller,
        host,
        Arc::new(RelabeledNodes::default()),
    )
}

/// Waits (a few seconds at most) until `done` holds.
async fn eventually(what: &str, done: impl Fn() -> bool) {
    let until = tokio::time::Instant::now() + Duration::from_secs(10);
    while !done() {
        assert!(tokio::time::Instant::now() < until, "timed out: {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn a_move_the_registry_refused_is_tried_again_until_it_succeeds() {
    let dir = tempfile::tempdir().unwrap();
    let (store, mut nodes) = node_cache();
    let resolver = NodeTorResolver::new(store, TopologySpec::default());
    let (registry, controller, host, relabeled) = follower(&dir, &resolver, 2).await;
    let label = |nodes: &mut Writer<NodeMeta>, node: &str, tor: &str| {
        let mut meta = NodeMeta::default();
        meta.metadata.name = Some(node.to_owned());
        meta.metadata.labels = Some(BTreeMap::from([(TOR_LABEL.to_owned(), tor.to_owned())]));
        nodes.apply_watcher_event(&watcher::Event::Apply(meta));
    };
    label(&mut nodes, "n1", "rack-1");
    controller
        .register("n1", "test", &[udp("n1", 7001)])
        .await
        .unwrap();
    let cancel = CancellationToken::new();
    let task = tokio::spawn(follow_node_labels(
        resolver.clone(),
        relabeled.clone(),
        host,
        cancel.clone(),
    ));

    // n1 moves to rack 2; the registry refuses the first two tries.
    label(&mut nodes, "n1", "rack-2");
    relabeled.add("n1".to_owned());
    eventually("the move is tried three times", || {
        registry.moves_tried.load(Ordering::SeqCst) >= 3
    })
    .await;
    eventually("n1 is no longer noted as relabeled", || {
        relabeled.is_empty()
    })
    .await;
    assert_eq!(controller.known_endpoints()[0].tor, "rack-2");
    assert_eq!(
        controller.endpoints().await.unwrap()[0].tor,
        "rack-2",
        "stored in the registry too"
    );
    assert_eq!(registry.moves_tried.load(Ordering::SeqCst), 3);

    cancel.cancel();
    task.await.unwrap();
}

#[tokio::test]
async fn a_topology_change_the_registry_refused_is_tried_again() {
    let dir = tempfile::tempdir().unwrap();
    let (store, mut nodes) = node_cache();
    let resolver = NodeTorResolver::new(store, TopologySpec::default());
    let (registry, controller, host, relabeled) = follower(&dir, &resolver, 1).await;
    let mut meta = NodeMeta::default();
    meta.metadata.name = Some("n1".to_owned());
    meta.metadata.labels = Some(BTreeMap::from([
        (TOR_LABEL.to_owned(), "rack-1".to_owned()),
        ("example.com/rack".to_owned(), "r7".to_owned()),
    ]));
    nodes.apply_watcher_event(&watcher::Event::Apply(meta));
    controller
        .register("n1", "test", &[udp("n1", 7001)])
        .await
        .unwrap();
    let cancel = CancellationToken::new();
    let task = tokio::spawn(follow_node_labels(
        resolver.clone(),
        relabeled,
        host.clone(),
        cancel.clone(),
    ));

    // The policy source now takes ToRs from another label.
    let pm: pingmesh_operator::crd::PingMesh = serde_json::from_value(serde_json::json!({
        "apiVersion": "pingmesh.io/v1alpha1", "kind": "PingMesh",
        "metadata": {"name": "default", "namespace": "ns"},
        "spec": {"topology": {"torLabel": "example.com/rack"}},
    }))
    .unwrap();
    pingmesh_operator::reconcile::MeshStatusSource::sync_policy(&*host, &pm);
    eventually("the move is tried again after the refusal", || {
        registry.moves_tried.load(Ordering::SeqCst) >= 2
    })
    .await;
    eventually("n1 is under r7", || {
        controller.known_endpoints()[0].tor == "r7"
    })
    .await;

    cancel.cancel();
    task.await.unwrap();
}
