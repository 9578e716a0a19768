//! Behaviour of the agent registry, written once and run against every store.
//!
//! - `sqlite_file::*`: a real `SQLite` file in a temporary directory; always runs.
//! - `rqlite_cluster::*`: the same cases against a running rqlite cluster. They
//!   are ignored by default and wipe that cluster's registry tables:
//!
//!   ```text
//!   hack/rqlite.sh start 3
//!   PINGMESH_TEST_RQLITE_URL="$(hack/rqlite.sh url)" \
//!     cargo test -p pingmesh-operator --test registry -- --include-ignored
//!   hack/rqlite.sh stop
//!   ```
//!
//! - `rqlite_cluster_keeps_every_endpoint_when_a_node_stops` starts its own
//!   three-node cluster from the `rqlited` binary named by `PINGMESH_RQLITED`
//!   (`hack/rqlite.sh` installs one under `.tools`), kills its leader, and checks
//!   nothing was lost. Ignored by default too.

#![allow(
    clippy::unwrap_used,
    clippy::panic,
    reason = "test code: a failed step stops the test with its error"
)]

use std::collections::BTreeMap;
use std::sync::Arc;

use pingmesh_operator::mesh::registry::{
    Registry, RegistryConfig, RegistryError, TorMove, open_registry, schema,
};
use pingmesh_operator::mesh::types::{AgentRecord, MeshEndpoint};
use pingmesh_proto::v1::Transport;
use tempfile::TempDir;

const RQLITE_URL_VAR: &str = "PINGMESH_TEST_RQLITE_URL";

/// Tests against the shared cluster run one at a time: they all use the same
/// tables, and `expire` would remove another test's nodes.
static SHARED_RQLITE: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// Where one test keeps its registry; opening it again sees the same data.
enum Store {
    Sqlite(TempDir),
    Rqlite {
        url: String,
        _exclusive: tokio::sync::MutexGuard<'static, ()>,
    },
}

impl Store {
    fn sqlite() -> Self {
        Self::Sqlite(tempfile::tempdir().unwrap())
    }

    /// The cluster named by `PINGMESH_TEST_RQLITE_URL`, emptied for this test.
    async fn rqlite() -> Self {
        let url = std::env::var(RQLITE_URL_VAR).unwrap_or_else(|_| {
            panic!("set {RQLITE_URL_VAR}, e.g. to the output of `hack/rqlite.sh url`")
        });
        let store = Self::Rqlite {
            url,
            _exclusive: SHARED_RQLITE.lock().await,
        };
        store.open().await.expire(u64::MAX).await.unwrap();
        store
    }

    fn location(&self) -> String {
        match self {
            Self::Sqlite(dir) => format!("sqlite://{}", dir.path().join("registry.db").display()),
            Self::Rqlite { url, .. } => url.clone(),
        }
    }

    /// A new handle on the store: a new connection for `SQLite`, a new client for
    /// rqlite.
    async fn open(&self) -> Arc<dyn Registry> {
        open_registry(&self.location()).await.unwrap()
    }

    /// Runs `statements` as one transaction on the store itself, past the registry.
    async fn execute_raw(&self, statements: &[&str]) {
        match self {
            Self::Sqlite(dir) => {
                let mut connection =
                    rusqlite::Connection::open(dir.path().join("registry.db")).unwrap();
                let tx = connection.transaction().unwrap();
                for sql in statements {
                    tx.execute(sql, []).unwrap();
                }
                tx.commit().unwrap();
            }
            Self::Rqlite { url, .. } => {
                let RegistryConfig::Rqlite { hosts } = RegistryConfig::parse(url).unwrap() else {
                    panic!("{url} is not an rqlite location");
                };
                let client = hosts
                    .iter()
                    .fold(rqlite_rs::RqliteClientBuilder::new(), |b, host| {
                        b.known_host(host)
                    })
                    .build()
                    .unwrap();
                let results = client.transaction(statements.to_vec()).await.unwrap();
                for result in results {
                    if let rqlite_rs::response::RqliteResult::Error(e) = result {
                        panic!("{}", e.error);
                    }
                }
            }
        }
    }
}

fn endpoint(node: &str, port: u32) -> MeshEndpoint {
    MeshEndpoint {
        id: format!("{node}/p{port}"),
        node: node.to_owned(),
        tor: format!("tor-{}", port % 2),
        transport: Transport::Udp as i32,
        address: format!("10.0.{port}.1:{}", 7000 + port),
        qpn: 0,
        device: String::new(),
        tor_from_agent: port.is_multiple_of(2),
    }
}

fn endpoints(node: &str, ports: &[u32]) -> Vec<MeshEndpoint> {
    ports.iter().map(|&port| endpoint(node, port)).collect()
}

/// The endpoints the registry holds for `node`.
async fn endpoints_of(registry: &dyn Registry, node: &str) -> Vec<MeshEndpoint> {
    let mut all = registry.endpoints().await.unwrap();
    all.retain(|endpoint| endpoint.node == node);
    all
}

async fn registered_agent_and_endpoints_read_back(store: Store) {
    let registry = store.open().await;
    let mut listed = endpoints("node-a", &[1, 0]);
    registry
        .register("node-a", "v1.2.3", 7, &listed, 1_000)
        .await
        .unwrap();

    let expected_agent = AgentRecord {
        node: "node-a".to_owned(),
        session: 7,
        agent_version: "v1.2.3".to_owned(),
        registered_at_ms: 1_000,
        last_seen_ms: 1_000,
    };
    assert_eq!(
        registry.agent("node-a").await.unwrap(),
        Some(expected_agent.clone())
    );
    assert_eq!(registry.agents().await.unwrap(), vec![expected_agent]);
    listed.sort_by(|a, b| a.id.cmp(&b.id));
    assert_eq!(registry.endpoints().await.unwrap(), listed);
    assert_eq!(registry.agent("node-b").await.unwrap(), None);
}

async fn values_at_the_edges_of_their_types_round_trip(store: Store) {
    let registry = store.open().await;
    let rdma = MeshEndpoint {
        id: "node-x/mlx5_0".to_owned(),
        node: "node-x".to_owned(),
        tor: "tor-9".to_owned(),
        transport: Transport::Rdma as i32,
        address: "fe80::268a:7ff:fe55:4660".to_owned(),
        qpn: u32::MAX,
        device: "mlx5_0".to_owned(),
        tor_from_agent: false,
    };
    let far_future_ms = 1 << 62;
    registry
        .register(
            "node-x",
            "",
            u64::MAX,
            std::slice::from_ref(&rdma),
            far_future_ms,
        )
        .await
        .unwrap();

    let agent = registry.agent("node-x").await.unwrap().unwrap();
    assert_eq!(agent.session, u64::MAX);
    assert_eq!(agent.last_seen_ms, far_future_ms);
    assert_eq!(registry.endpoints().await.unwrap(), vec![rdma]);
    registry
        .touch("node-x", u64::MAX, far_future_ms + 1)
        .await
        .unwrap();
}

async fn reregistration_replaces_the_whole_endpoint_set(store: Store) {
    let registry = store.open().await;
    registry
        .register("node-a", "v1", 1, &endpoints("node-a", &[0, 1, 2]), 1_000)
        .await
        .unwrap();
    registry
        .register("node-b", "v1", 1, &endpoints("node-b", &[0]), 1_000)
        .await
        .unwrap();

    registry
        .register("node-a", "v2", 2, &endpoints("node-a", &[2, 3]), 2_000)
        .await
        .unwrap();

    assert_eq!(
        endpoints_of(&*registry, "node-a").await,
        endpoints("node-a", &[2, 3])
    );
    assert_eq!(
        endpoints_of(&*registry, "node-b").await,
        endpoints("node-b", &[0])
    );
    let agent = registry.agent("node-a").await.unwrap().unwrap();
    assert_eq!((agent.session, agent.agent_version.as_str()), (2, "v2"));
    assert_eq!((agent.registered_at_ms, agent.last_seen_ms), (2_000, 2_000));

    registry
        .register("node-a", "v2", 3, &[], 3_000)
        .await
        .unwrap();
    assert!(endpoints_of(&*registry, "node-a").await.is_empty());
    assert!(registry.agent("node-a").await.unwrap().is_some());
}

async fn endpoint_owned_by_another_node_is_refused_and_nothing_is_written(store: Store) {
    let registry = store.open().await;
    registry
        .register("node-a", "v1", 1, &endpoints("node-a", &[0]), 1_000)
        .await
        .unwrap();
    registry
        .register("node-b", "v1", 1, &endpoints("node-b", &[0]), 1_000)
        .await
        .unwrap();
    let before = (
        registry.agents().await.unwrap(),
        registry.endpoints().await.unwrap(),
    );

    let stolen = MeshEndpoint {
        node: "node-b".to_owned(),
        ..endpoint("node-a", 0)
    };
    let mut claim = endpoints("node-b", &[1]);
    claim.push(stolen);
    let err = registry
        .register("node-b", "v2", 2, &claim, 2_000)
        .await
        .unwrap_err();
    assert!(
        matches!(&err, RegistryError::EndpointConflict { endpoint, owner }
            if endpoint == "node-a/p0" && owner == "node-a"),
        "{err}"
    );

    let err = registry
        .register("node-c", "v1", 1, &[endpoint("node-b", 0)], 2_000)
        .await
        .unwrap_err();
    assert_eq!(err.category(), "invalid_registration", "{err}");

    let after = (
        registry.agents().await.unwrap(),
        registry.endpoints().await.unwrap(),
    );
    assert_eq!(after, before);
}

async fn touch_with_a_stale_session_or_unknown_node_is_refused(store: Store) {
    let registry = store.open().await;
    registry
        .register("node-a", "v1", 10, &endpoints("node-a", &[0]), 1_000)
        .await
        .unwrap();
    registry
        .register("node-a", "v1", 11, &endpoints("node-a", &[0]), 2_000)
        .await
        .unwrap();

    let err = registry.touch("node-a", 10, 3_000).await.unwrap_err();
    assert!(
        matches!(&err, RegistryError::StaleSession { node, current: 11, given: 10 } if node == "node-a"),
        "{err}"
    );
    assert!(err.requires_reregistration());
    let err = registry.touch("node-z", 1, 3_000).await.unwrap_err();
    assert!(
        matches!(&err, RegistryError::UnknownNode { node } if node == "node-z"),
        "{err}"
    );
    assert_eq!(
        registry
            .agent("node-a")
            .await
            .unwrap()
            .unwrap()
            .last_seen_ms,
        2_000
    );

    registry.touch("node-a", 11, 4_000).await.unwrap();
    registry.touch("node-a", 11, 3_500).await.unwrap();
    assert_eq!(
        registry
            .agent("node-a")
            .await
            .unwrap()
            .unwrap()
            .last_seen_ms,
        4_000
    );
}

async fn expire_removes_stale_nodes_and_their_endpoints(store: Store) {
    let registry = store.open().await;
    for node in ["node-a", "node-b", "node-c"] {
        registry
            .register(node, "v1", 1, &endpoints(node, &[0, 1]), 1_000)
            .await
            .unwrap();
    }
    registry.touch("node-b", 1, 5_000).await.unwrap();

    let removed = registry.expire(3_000).await.unwrap();

    assert_eq!(removed, vec!["node-a".to_owned(), "node-c".to_owned()]);
    let agents: Vec<String> = registry
        .agents()
        .await
        .unwrap()
        .into_iter()
        .map(|agent| agent.node)
        .collect();
    assert_eq!(agents, vec!["node-b".to_owned()]);
    assert_eq!(
        registry.endpoints().await.unwrap(),
        endpoints("node-b", &[0, 1])
    );
    assert!(registry.expire(3_000).await.unwrap().is_empty());
    assert_eq!(registry.expire(5_000).await.unwrap(), Vec::<String>::new());
    assert_eq!(
        registry.expire(5_001).await.unwrap(),
        vec!["node-b".to_owned()]
    );

    registry
        .register("node-a", "v1", 2, &endpoints("node-a", &[0, 1]), 6_000)
        .await
        .unwrap();
    assert_eq!(
        registry.endpoints().await.unwrap(),
        endpoints("node-a", &[0, 1])
    );
}

async fn remove_node_deletes_its_agent_and_endpoints(store: Store) {
    let registry = store.open().await;
    registry
        .register("node-a", "v1", 1, &endpoints("node-a", &[0, 1]), 1_000)
        .await
        .unwrap();
    registry
        .register("node-b", "v1", 1, &endpoints("node-b", &[0]), 1_000)
        .await
        .unwrap();

    assert!(registry.remove_node("node-a").await.unwrap());
    assert!(!registry.remove_node("node-a").await.unwrap());

    assert_eq!(registry.agent("node-a").await.unwrap(), None);
    assert_eq!(
        registry.endpoints().await.unwrap(),
        endpoints("node-b", &[0])
    );
    let err = registry.touch("node-a", 1, 2_000).await.unwrap_err();
    assert_eq!(err.category(), "unknown_node");
    registry
        .register("node-b2", "v1", 1, &[endpoint("node-b2", 7)], 2_000)
        .await
        .unwrap();
}

async fn registrations_survive_reopening(store: Store) {
    let registry = store.open().await;
    for (session, node) in (1..).zip(["node-a", "node-b"]) {
        registry
            .register(node, "v1", session, &endpoints(node, &[0, 1]), 1_000)
            .await
            .unwrap();
    }
    registry.touch("node-b", 2, 1_500).await.unwrap();
    let agents = registry.agents().await.unwrap();
    let all_endpoints = registry.endpoints().await.unwrap();
    drop(registry);

    let reopened = store.open().await;

    assert_eq!(reopened.agents().await.unwrap(), agents);
    assert_eq!(reopened.endpoints().await.unwrap(), all_endpoints);
    reopened.touch("node-a", 1, 2_000).await.unwrap();
}

async fn concurrent_registrations_of_fifty_nodes_all_land(store: Store) {
    const NODES: u32 = 50;
    let registry = store.open().await;
    let mut tasks = tokio::task::JoinSet::new();
    for index in 0..NODES {
        let registry = Arc::clone(&registry);
        tasks.spawn(async move {
            let node = format!("node-{index:03}");
            registry
                .register(
                    &node,
                    "v1",
                    u64::from(index),
                    &endpoints(&node, &[0, 1]),
                    1_000,
                )
                .await
        });
    }
    while let Some(outcome) = tasks.join_next().await {
        outcome.unwrap().unwrap();
    }

    let agents = registry.agents().await.unwrap();
    assert_eq!(agents.len(), NODES as usize);
    let mut by_node: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for endpoint in registry.endpoints().await.unwrap() {
        by_node.entry(endpoint.node).or_default().push(endpoint.id);
    }
    for (index, agent) in (0..NODES).zip(&agents) {
        assert_eq!(agent.node, format!("node-{index:03}"));
        assert_eq!(agent.session, u64::from(index));
        assert_eq!(
            by_node[&agent.node],
            vec![format!("{}/p0", agent.node), format!("{}/p1", agent.node)]
        );
    }
    assert_eq!(by_node.len(), NODES as usize);
}

async fn set_tors_moves_resolved_endpoints_and_keeps_the_agents_own(store: Store) {
    let registry = store.open().await;
    // Port 0 carries a ToR its agent named, port 1 one the controller resolved.
    let listed = endpoints("node-a", &[0, 1]);
    assert!(listed[0].tor_from_agent && !listed[1].tor_from_agent);
    registry
        .register("node-a", "v1", 1, &listed, 1_000)
        .await
        .unwrap();

    let to_rail = |endpoint: &str| TorMove {
        endpoint: endpoint.to_owned(),
        tor: "rail-9".to_owned(),
    };
    let moved = registry
        .set_tors(&[
            to_rail("node-a/p0"),
            to_rail("node-a/p1"),
            to_rail("node-z/p0"),
        ])
        .await
        .unwrap();

    assert_eq!(moved, 1);
    let stored = endpoints_of(&*registry, "node-a").await;
    assert_eq!(stored[0], listed[0], "an agent's own ToR is kept");
    assert_eq!(stored[1].tor, "rail-9");
    assert_eq!(
        MeshEndpoint {
            tor: listed[1].tor.clone(),
            ..stored[1].clone()
        },
        listed[1],
        "only the ToR changed"
    );
    assert_eq!(registry.set_tors(&[]).await.unwrap(), 0);
    drop(registry);
    assert_eq!(endpoints_of(&*store.open().await, "node-a").await, stored);
}

async fn a_version_1_store_is_upgraded_and_keeps_its_rows(store: Store) {
    let mut statements = vec![
        "DROP TABLE IF EXISTS endpoints",
        "DROP TABLE IF EXISTS agents",
        "DROP TABLE IF EXISTS schema_version",
    ];
    statements.extend(schema::CREATE_SCHEMA);
    statements.extend([
        "INSERT INTO agents (node, session, agent_version, registered_at_ms, last_seen_ms) \
         VALUES ('node-old', 3, 'v0', 10, 20)",
        "INSERT INTO endpoints (id, node, tor, transport, address, qpn) \
         VALUES ('node-old/p0', 'node-old', 'rack-1', 1, '10.0.0.1:7000', 0)",
    ]);
    store.execute_raw(&statements).await;

    let registry = store.open().await;

    assert_eq!(
        registry.endpoints().await.unwrap(),
        [MeshEndpoint {
            id: "node-old/p0".to_owned(),
            node: "node-old".to_owned(),
            tor: "rack-1".to_owned(),
            transport: 1,
            address: "10.0.0.1:7000".to_owned(),
            qpn: 0,
            device: String::new(),
            // Unknown provenance: kept as stored until the agent registers again.
            tor_from_agent: true,
        }]
    );
    assert_eq!(
        registry.agent("node-old").await.unwrap().unwrap().session,
        3
    );
    // New columns are written and read like the old ones.
    let fresh = endpoints("node-new", &[1]);
    registry
        .register("node-new", "v1", 1, &fresh, 30)
        .await
        .unwrap();
    assert_eq!(endpoints_of(&*registry, "node-new").await, fresh);
    drop(registry);
    // Opening an upgraded store again changes nothing.
    assert_eq!(store.open().await.endpoints().await.unwrap().len(), 2);
}

/// Generates one test per behaviour and store.
macro_rules! behaviour_suite {
    ($($behaviour:ident),+ $(,)?) => {
        mod sqlite_file {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
                async fn $behaviour() {
                    super::$behaviour(super::Store::sqlite()).await;
                }
            )+
        }

        mod rqlite_cluster {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
                #[ignore = "needs a running rqlite (hack/rqlite.sh start 3) in PINGMESH_TEST_RQLITE_URL"]
                async fn $behaviour() {
                    super::$behaviour(super::Store::rqlite().await).await;
                }
            )+
        }
    };
}

behaviour_suite!(
    registered_agent_and_endpoints_read_back,
    values_at_the_edges_of_their_types_round_trip,
    reregistration_replaces_the_whole_endpoint_set,
    endpoint_owned_by_another_node_is_refused_and_nothing_is_written,
    touch_with_a_stale_session_or_unknown_node_is_refused,
    expire_removes_stale_nodes_and_their_endpoints,
    remove_node_deletes_its_agent_and_endpoints,
    registrations_survive_reopening,
    concurrent_registrations_of_fifty_nodes_all_land,
    set_tors_moves_resolved_endpoints_and_keeps_the_agents_own,
    a_version_1_store_is_upgraded_and_keeps_its_rows,
);

mod sqlite_only {
    use super::*;

    fn raw_connection(store: &Store) -> rusqlite::Connection {
        let Store::Sqlite(dir) = store else {
            unreachable!("SQLite-only test")
        };
        rusqlite::Connection::open(dir.path().join("registry.db")).unwrap()
    }

    #[tokio::test]
    async fn a_corrupt_row_is_reported_instead_of_read() {
        let store = Store::sqlite();
        let registry = store.open().await;
        registry
            .register("node-a", "v1", 1, &endpoints("node-a", &[0]), 1_000)
            .await
            .unwrap();
        raw_connection(&store)
            .execute("UPDATE agents SET last_seen_ms = -5", [])
            .unwrap();
        raw_connection(&store)
            .execute("UPDATE endpoints SET qpn = 'not a number'", [])
            .unwrap();

        let err = registry.agents().await.unwrap_err();
        assert_eq!(err.category(), "corrupt", "{err}");
        let err = registry.endpoints().await.unwrap_err();
        assert_eq!(err.category(), "corrupt", "{err}");
    }

    #[tokio::test]
    async fn a_file_written_by_a_newer_schema_is_refused() {
        let store = Store::sqlite();
        drop(store.open().await);
        raw_connection(&store)
            .execute("UPDATE schema_version SET version = version + 1", [])
            .unwrap();

        let err = open_registry(&store.location()).await.unwrap_err();

        assert_eq!(err.category(), "migrate", "{err}");
    }

    #[tokio::test]
    async fn a_missing_directory_is_an_open_error() {
        let dir = tempfile::tempdir().unwrap();
        let location = dir.path().join("absent").join("registry.db");

        let err = open_registry(&location.display().to_string())
            .await
            .unwrap_err();

        assert_eq!(err.category(), "open", "{err}");
    }
}

mod rqlite_only {
    use std::fs::File;
    use std::net::TcpListener;
    use std::path::Path;
    use std::process::{Child, Command, Stdio};
    use std::time::Duration;

    use pingmesh_operator::mesh::registry::{RqliteOptions, RqliteRegistry};
    use rqlite_rs::{RqliteClient, RqliteClientBuilder};

    use super::*;

    const RQLITED_VAR: &str = "PINGMESH_RQLITED";
    /// Bound on waiting for a node or the cluster to come up.
    const STARTUP_ATTEMPTS: u32 = 300;
    const STARTUP_POLL: Duration = Duration::from_millis(100);

    fn free_ports(count: usize) -> Vec<u16> {
        // Hold every listener until all ports are picked so none repeats.
        let listeners: Vec<TcpListener> = (0..count)
            .map(|_| TcpListener::bind("127.0.0.1:0").unwrap())
            .collect();
        listeners
            .iter()
            .map(|listener| listener.local_addr().unwrap().port())
            .collect()
    }

    /// One `rqlited` process, killed when dropped.
    struct RqliteNode {
        http: String,
        process: Option<Child>,
    }

    impl RqliteNode {
        fn start(
            binary: &Path,
            dir: &Path,
            id: usize,
            ports: (u16, u16),
            join: Option<&str>,
        ) -> Self {
            let http = format!("127.0.0.1:{}", ports.0);
            let raft = format!("127.0.0.1:{}", ports.1);
            let log = File::create(dir.join(format!("node-{id}.log"))).unwrap();
            let mut command = Command::new(binary);
            command
                .arg(format!("-node-id={id}"))
                .arg(format!("-http-addr={http}"))
                .arg(format!("-raft-addr={raft}"));
            if let Some(join) = join {
                command.arg(format!("-join={join}"));
            }
            let process = command
                .arg(dir.join(format!("node-{id}")))
                .stdin(Stdio::null())
                .stdout(log.try_clone().unwrap())
                .stderr(log)
                .spawn()
                .unwrap();
            Self {
                http,
                process: Some(process),
            }
        }

        fn client(&self) -> RqliteClient {
            RqliteClientBuilder::new()
                .known_host(&self.http)
                .build()
                .unwrap()
        }

        async fn wait_ready(&self) {
            let client = self.client();
            for _ in 0..STARTUP_ATTEMPTS {
                if client.ready().await {
                    return;
                }
                tokio::time::sleep(STARTUP_POLL).await;
            }
            panic!("rqlited at {} never became ready", self.http);
        }

        fn kill(&mut self) {
            if let Some(mut process) = self.process.take() {
                let _ = process.kill();
                let _ = process.wait();
            }
        }
    }

    impl Drop for RqliteNode {
        fn drop(&mut self) {
            self.kill();
        }
    }

    /// A three-node cluster on free loopback ports, its data in a temporary
    /// directory.
    struct RqliteTestCluster {
        nodes: Vec<RqliteNode>,
        _dir: TempDir,
    }

    impl RqliteTestCluster {
        async fn start(binary: &Path) -> Self {
            let dir = tempfile::tempdir().unwrap();
            let ports = free_ports(6);
            let first_raft = format!("127.0.0.1:{}", ports[1]);
            let mut nodes = vec![RqliteNode::start(
                binary,
                dir.path(),
                1,
                (ports[0], ports[1]),
                None,
            )];
            nodes[0].wait_ready().await;
            for id in 2..=3 {
                let pair = (ports[2 * id - 2], ports[2 * id - 1]);
                nodes.push(RqliteNode::start(
                    binary,
                    dir.path(),
                    id,
                    pair,
                    Some(&first_raft),
                ));
            }
            for node in &nodes {
                node.wait_ready().await;
            }
            let cluster = Self { nodes, _dir: dir };
            cluster.wait_for_members(3).await;
            cluster
        }

        async fn wait_for_members(&self, count: usize) {
            let client = self.nodes[0].client();
            for _ in 0..STARTUP_ATTEMPTS {
                if let Ok(members) = client.nodes().await
                    && members.len() == count
                    && members.iter().all(|member| member.reachable)
                {
                    return;
                }
                tokio::time::sleep(STARTUP_POLL).await;
            }
            panic!("the rqlite cluster never reached {count} reachable members");
        }

        fn url(&self) -> String {
            let hosts: Vec<&str> = self.nodes.iter().map(|node| node.http.as_str()).collect();
            format!("rqlite://{}", hosts.join(","))
        }

        async fn leader_index(&self) -> usize {
            let leader = self.nodes[0].client().leader().await.unwrap().unwrap();
            self.nodes
                .iter()
                .position(|node| leader.api_addr.ends_with(&node.http))
                .unwrap_or_else(|| panic!("leader {} is not one of ours", leader.api_addr))
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    #[ignore = "needs rqlited in PINGMESH_RQLITED (hack/rqlite.sh start installs it under .tools)"]
    async fn rqlite_cluster_keeps_every_endpoint_when_a_node_stops() {
        const NODES: u32 = 100;
        let binary = std::env::var(RQLITED_VAR)
            .unwrap_or_else(|_| panic!("set {RQLITED_VAR} to an rqlited binary"));
        let mut cluster = RqliteTestCluster::start(Path::new(&binary)).await;
        let registry = open_registry(&cluster.url()).await.unwrap();
        let mut tasks = tokio::task::JoinSet::new();
        for index in 0..NODES {
            let registry = Arc::clone(&registry);
            tasks.spawn(async move {
                let node = format!("node-{index:03}");
                registry
                    .register(&node, "v1", 1, &endpoints(&node, &[0, 1]), 1_000)
                    .await
            });
        }
        while let Some(outcome) = tasks.join_next().await {
            outcome.unwrap().unwrap();
        }
        let before = registry.endpoints().await.unwrap();
        assert_eq!(before.len(), 2 * NODES as usize);

        let leader = cluster.leader_index().await;
        cluster.nodes[leader].kill();

        assert_eq!(registry.endpoints().await.unwrap(), before);
        registry
            .register("node-late", "v1", 1, &endpoints("node-late", &[0]), 2_000)
            .await
            .unwrap();
        registry.touch("node-000", 1, 2_000).await.unwrap();
        let fresh_client = open_registry(&cluster.url()).await.unwrap();
        let after = fresh_client.endpoints().await.unwrap();
        assert_eq!(after.len(), before.len() + 1);
        assert!(before.iter().all(|endpoint| after.contains(endpoint)));
        assert_eq!(
            fresh_client
                .agent("node-000")
                .await
                .unwrap()
                .unwrap()
                .last_seen_ms,
            2_000
        );
    }

    #[tokio::test]
    async fn unreachable_rqlite_cluster_is_reported_unavailable() {
        let hosts: Vec<String> = free_ports(2)
            .into_iter()
            .map(|port| format!("127.0.0.1:{port}"))
            .collect();
        let options = RqliteOptions {
            retry_for: Duration::from_millis(300),
        };

        let err = RqliteRegistry::connect_with(&hosts, options)
            .await
            .unwrap_err();

        assert_eq!(err.category(), "unavailable", "{err}");
    }
}
