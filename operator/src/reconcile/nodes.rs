//! Node labels as the mesh controller's topology: a cache of Node metadata
//! (labels, no status), the ToR rules of `spec.topology`, and the task that
//! moves endpoints when a Node's labels change.
//!
//! For an endpoint whose agent names no ToR the candidates are, in order:
//!
//! 1. `<topology.rnicTorLabelPrefix><device>`, when the prefix is set and the
//!    endpoint is an RNIC (rail-optimized fabrics: one ToR per RNIC);
//! 2. `<topology.torLabel>`, the ToR of the whole node;
//!
//! and the first valid value wins, else the controller's `defaultTor` (see
//! `mesh::topology::choose_tor`). The settings come from the policy-source
//! `PingMesh`; changing them moves endpoints without restarting anything.
//!
//! A move the registry refuses (an rqlite election, say) is tried again after
//! a pause ([`RETRY_FIRST`], doubling up to [`RETRY_MAX`]) until it succeeds:
//! the nodes it was for stay noted as relabeled, and a topology change stays
//! pending.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex, PoisonError, RwLock};
use std::time::Duration;

use futures::TryStreamExt;
use k8s_openapi::api::core::v1::Node;
use kube::api::PartialObjectMeta;
use kube::runtime::reflector::{ObjectRef, Store, store::Writer};
use kube::runtime::{PredicateConfig, WatchStreamExt, predicates, reflector, watcher};
use kube::{Api, ResourceExt};
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use super::mesh_host::MeshHost;
use crate::crd::TopologySpec;
use crate::mesh::topology::{TorCandidate, TorResolver};

/// What the operator caches of a Node: its metadata only. Labels are all it
/// needs, and a full Node (images, status) would cost far more memory.
pub type NodeMeta = PartialObjectMeta<Node>;

/// How long label changes are gathered before endpoints are moved.
const GATHER_CHANGES: Duration = Duration::from_secs(1);
/// Pause before moving endpoints again after the registry refused a move.
pub const RETRY_FIRST: Duration = Duration::from_secs(1);
/// Longest pause between tries while the registry keeps refusing.
pub const RETRY_MAX: Duration = Duration::from_secs(30);

/// The labels that may name the ToR of an endpoint with RNIC `device` (empty
/// for UDP) on a node with `labels`, most specific first.
pub fn tor_candidates(
    labels: &BTreeMap<String, String>,
    topology: &TopologySpec,
    device: &str,
) -> Vec<TorCandidate> {
    let mut out = Vec::with_capacity(2);
    let mut look = |key: String| {
        if let Some(value) = labels.get(&key) {
            out.push(TorCandidate {
                source: format!("label {key}"),
                value: value.clone(),
            });
        }
    };
    if !topology.rnic_tor_label_prefix.is_empty() && !device.is_empty() {
        look(format!("{}{device}", topology.rnic_tor_label_prefix));
    }
    if !topology.tor_label.is_empty() {
        look(topology.tor_label.clone());
    }
    out
}

/// ToRs from the labels of cached Nodes, under the policy source's `spec.topology`.
#[derive(Debug, Clone)]
pub struct NodeTorResolver {
    nodes: Store<NodeMeta>,
    topology: Arc<RwLock<TopologySpec>>,
}

impl NodeTorResolver {
    pub fn new(nodes: Store<NodeMeta>, topology: TopologySpec) -> Self {
        Self {
            nodes,
            topology: Arc::new(RwLock::new(topology)),
        }
    }

    /// Takes new topology settings; returns whether they differ from the old ones
    /// (then every endpoint needs resolving again).
    pub fn set_topology(&self, topology: &TopologySpec) -> bool {
        let mut current = self
            .topology
            .write()
            .unwrap_or_else(PoisonError::into_inner);
        if *current == *topology {
            return false;
        }
        current.clone_from(topology);
        true
    }
}

impl TorResolver for NodeTorResolver {
    fn candidates(&self, node: &str, device: &str) -> Option<Vec<TorCandidate>> {
        let meta = self.nodes.get(&ObjectRef::new(node))?;
        let topology = self.topology.read().unwrap_or_else(PoisonError::into_inner);
        Some(tor_candidates(meta.labels(), &topology, device))
    }
}

/// Names of Nodes whose labels changed (or that were seen for the first
/// time) and whose endpoints were not resolved again since.
#[derive(Debug, Default)]
pub struct RelabeledNodes {
    names: Mutex<BTreeSet<String>>,
    added: Notify,
}

impl RelabeledNodes {
    /// Notes that `name`'s labels changed (or that it was seen for the first time).
    pub fn add(&self, name: String) {
        self.names
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(name);
        self.added.notify_one();
    }

    /// The nodes noted, and forgets them.
    pub fn take(&self) -> Vec<String> {
        std::mem::take(&mut *self.names.lock().unwrap_or_else(PoisonError::into_inner))
            .into_iter()
            .collect()
    }

    /// Notes `names` again after moving their endpoints failed, without
    /// waking the follower (it tries again after a pause).
    fn put_back(&self, names: Vec<String>) {
        self.names
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .extend(names);
    }

    /// Whether no node is noted.
    pub fn is_empty(&self) -> bool {
        self.names
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .is_empty()
    }
}

/// Keeps `writer`'s store in sync with the cluster's Nodes (metadata only) and
/// notes in `relabeled` every Node whose labels changed. Runs until `cancel`.
pub async fn reflect_nodes(
    api: Api<NodeMeta>,
    writer: Writer<NodeMeta>,
    relabeled: Arc<RelabeledNodes>,
    cancel: CancellationToken,
) {
    let nodes = reflector(
        writer,
        // An Api of PartialObjectMeta asks for metadata only.
        watcher(api, watcher::Config::default()).default_backoff(),
    )
    .touched_objects()
    // Nodes change all the time (heartbeats, taints); only new label sets
    // matter here, and a node seen for the first time counts as one.
    .predicate_filter(predicates::labels, PredicateConfig::default());
    let mut nodes = std::pin::pin!(nodes);
    loop {
        tokio::select! {
            () = cancel.cancelled() => return,
            next = nodes.try_next() => match next {
                Ok(Some(node)) => relabeled.add(node.name_any()),
                Ok(None) => return,
                // The backoff above retries; a lasting error (RBAC) shows here.
                Err(e) => tracing::warn!(error = %e, "watching Nodes failed; retrying"),
            },
        }
    }
}

/// Moves the endpoints of relabeled nodes, and of every node when the policy
/// source's topology settings change, in the mesh controller `host` serves.
/// A move the registry refuses is tried again after a pause (see the module
/// docs). Runs until `cancel`.
pub async fn follow_node_labels(
    resolver: NodeTorResolver,
    relabeled: Arc<RelabeledNodes>,
    host: Arc<MeshHost>,
    cancel: CancellationToken,
) {
    let mut settings = host.settings();
    // The topology settings changed and not every endpoint was moved since.
    // Settings that changed before this task subscribed count too.
    let mut all_pending = resolver.set_topology(&settings.borrow_and_update().topology);
    // While the registry refuses: when to try again, and the pause after that.
    let mut retry: Option<(tokio::time::Instant, Duration)> = None;
    loop {
        let retry_at = retry.map(|(at, _)| at);
        // Wait for something to do, unless a topology change is not done yet
        // and no pause is under way.
        if !all_pending || retry.is_some() {
            tokio::select! {
                () = cancel.cancelled() => return,
                () = relabeled.added.notified(), if retry.is_none() => {
                    // Gather a relabel of a whole rack into one batch, so the
                    // pinglists change once instead of once per node.
                    tokio::select! {
                        () = cancel.cancelled() => return,
                        () = tokio::time::sleep(GATHER_CHANGES) => {}
                    }
                }
                () = sleep_until(retry_at) => {}
                changed = settings.changed() => {
                    if changed.is_err() {
                        return;
                    }
                    let topology = settings.borrow_and_update().topology.clone();
                    if !resolver.set_topology(&topology) {
                        continue;
                    }
                    tracing::info!(tor_label = %topology.tor_label, rnic_tor_label_prefix = %topology.rnic_tor_label_prefix, "topology settings changed; resolving every ToR again");
                    all_pending = true;
                }
            }
        }
        let nodes = relabeled.take();
        let scope = if all_pending {
            None
        } else if nodes.is_empty() {
            continue;
        } else {
            Some(nodes.as_slice())
        };
        if refresh(&host, scope).await {
            all_pending = false;
            retry = None;
        } else {
            let pause = retry.map_or(RETRY_FIRST, |(_, pause)| pause);
            tracing::warn!(retry_in = ?pause, "moving endpoints to new ToRs failed; trying again");
            retry = Some((
                tokio::time::Instant::now() + pause,
                (pause * 2).min(RETRY_MAX),
            ));
            if !all_pending {
                relabeled.put_back(nodes);
            }
        }
    }
}

/// Sleeps until `at`; never wakes without one.
async fn sleep_until(at: Option<tokio::time::Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

/// Moves endpoints (of `nodes` only, when given); whether the registry took it.
async fn refresh(host: &MeshHost, nodes: Option<&[String]>) -> bool {
    match host.current().refresh_tors(nodes).await {
        Ok(0) => true,
        Ok(moved) => {
            tracing::info!(moved, "endpoints moved to new ToRs");
            true
        }
        Err(e) => {
            tracing::warn!(error = %e, "moving endpoints to new ToRs failed");
            false
        }
    }
}

/// Waits until the Node cache holds the whole cluster, at most `limit`: the
/// mesh controller should start with labels at hand, but not wait forever
/// when Nodes cannot be listed (endpoints then move once they can).
pub async fn wait_for_nodes(store: &Store<NodeMeta>, limit: Duration) {
    if let Ok(Ok(())) = tokio::time::timeout(limit, store.wait_until_ready()).await {
        tracing::info!(nodes = store.state().len(), "Node cache synced");
    } else {
        tracing::warn!(
            ?limit,
            "Node labels not listed in time; endpoints start under the default ToR and move once they are"
        );
    }
}

/// An empty Node cache and its writer.
pub fn node_cache() -> (Store<NodeMeta>, Writer<NodeMeta>) {
    let writer = Writer::default();
    (writer.as_reader(), writer)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn labels(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect()
    }

    fn rail_optimized() -> TopologySpec {
        TopologySpec {
            rnic_tor_label_prefix: "topology.pingmesh.io/tor-".to_owned(),
            ..TopologySpec::default()
        }
    }

    fn values(candidates: &[TorCandidate]) -> Vec<&str> {
        candidates.iter().map(|c| c.value.as_str()).collect()
    }

    #[test]
    fn an_rnic_label_comes_before_the_node_label() {
        let node = labels(&[
            ("topology.pingmesh.io/tor", "rack-12"),
            ("topology.pingmesh.io/tor-mlx5_0", "rail-0"),
            ("topology.pingmesh.io/tor-mlx5_1", "rail-1"),
        ]);
        let candidates = tor_candidates(&node, &rail_optimized(), "mlx5_1");
        assert_eq!(values(&candidates), ["rail-1", "rack-12"]);
        assert_eq!(
            candidates[0].source,
            "label topology.pingmesh.io/tor-mlx5_1"
        );
    }

    #[test]
    fn an_rnic_without_its_own_label_falls_back_to_the_node_label() {
        let node = labels(&[
            ("topology.pingmesh.io/tor", "rack-12"),
            ("topology.pingmesh.io/tor-mlx5_0", "rail-0"),
        ]);
        assert_eq!(
            values(&tor_candidates(&node, &rail_optimized(), "mlx5_7")),
            ["rack-12"]
        );
    }

    #[test]
    fn udp_endpoints_and_an_empty_prefix_ignore_rnic_labels() {
        let node = labels(&[
            ("topology.pingmesh.io/tor", "rack-12"),
            ("topology.pingmesh.io/tor-", "odd"),
            ("topology.pingmesh.io/tor-mlx5_0", "rail-0"),
        ]);
        assert_eq!(
            values(&tor_candidates(&node, &rail_optimized(), "")),
            ["rack-12"]
        );
        assert_eq!(
            values(&tor_candidates(&node, &TopologySpec::default(), "mlx5_0")),
            ["rack-12"]
        );
    }

    #[test]
    fn a_node_without_the_labels_has_no_candidates() {
        let node = labels(&[("kubernetes.io/hostname", "n1")]);
        assert!(tor_candidates(&node, &rail_optimized(), "mlx5_0").is_empty());
        let custom = TopologySpec {
            tor_label: "example.com/rack".to_owned(),
            ..TopologySpec::default()
        };
        let node = labels(&[("example.com/rack", "r7")]);
        assert_eq!(values(&tor_candidates(&node, &custom, "")), ["r7"]);
    }

    fn node(name: &str, pairs: &[(&str, &str)]) -> NodeMeta {
        let mut meta = NodeMeta::default();
        meta.metadata.name = Some(name.to_owned());
        meta.metadata.labels = Some(labels(pairs));
        meta
    }

    #[test]
    fn the_resolver_reads_the_cached_node_and_knows_unknown_nodes_apart() {
        let (store, mut writer) = node_cache();
        writer.apply_watcher_event(&watcher::Event::Apply(node(
            "n1",
            &[("topology.pingmesh.io/tor", "rack-1")],
        )));
        let resolver = NodeTorResolver::new(store, TopologySpec::default());
        assert_eq!(values(&resolver.candidates("n1", "").unwrap()), ["rack-1"]);
        assert!(resolver.candidates("n2", "").is_none());
        assert!(!resolver.set_topology(&TopologySpec::default()));
        assert!(resolver.set_topology(&rail_optimized()));
    }
}
