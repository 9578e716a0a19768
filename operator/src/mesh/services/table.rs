//! The controller's memory of service flows: each node's latest snapshot,
//! folded into service paths (one owner, one endpoint pair), and the service
//! targets those paths put on pinglists.
//!
//! A node's snapshot replaces its previous one; a node that stops reporting
//! (agent gone, tracer off) is forgotten after the policy's `expireAfterMs`.
//! Memory follows the number of distinct (owner, endpoint pair) paths, not
//! the number of connections.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use super::flow::{FlowKind, TracedFlow};
use super::identity::FlowOwner;
use super::mapping::{EndpointBook, Placed};

/// The flows of one owner between one pair of endpoints on one node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServicePath {
    pub owner: FlowOwner,
    pub kind: FlowKind,
    pub local: Placed,
    /// `None`: the remote end is outside the mesh (or could not be told).
    pub remote: Option<Placed>,
    /// Connections (TCP) or connected queue pairs (RDMA).
    pub flows: u32,
    /// RDMA: the flow label most of its connections use (0: none).
    pub flow_label: u32,
}

/// What one report left after mapping.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct NodeFlows {
    pub session: u64,
    pub received_ms: u64,
    pub paths: Vec<ServicePath>,
    /// Valid flows in the report.
    pub flows: u32,
    /// Flows the agent's own table could not hold.
    pub dropped_by_agent: u64,
    pub counts: MappingCounts,
}

/// `pingmesh_service_flows` state of flows whose both ends are endpoints.
pub const MAPPED: &str = "mapped";

/// Flows of one report by kind and what became of them: [`MAPPED`] or an
/// [`Unmapped`](super::mapping::Unmapped) label (`remote_*`: only the local end is known).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct MappingCounts(pub BTreeMap<(FlowKind, &'static str), u32>);

impl MappingCounts {
    fn count(&mut self, kind: FlowKind, state: &'static str) {
        *self.0.entry((kind, state)).or_default() += 1;
    }

    /// Flows in `state`, of any kind.
    pub fn get(&self, state: &str) -> u32 {
        self.0
            .iter()
            .filter(|((_, s), _)| *s == state)
            .map(|(_, n)| n)
            .sum()
    }
}

/// Folds one node's valid flows into service paths.
pub fn fold(
    node: &str,
    flows: &[TracedFlow],
    book: &EndpointBook,
) -> (Vec<ServicePath>, MappingCounts) {
    type Key = (FlowOwner, FlowKind, String, Option<String>);
    /// Both ends, connections, and connections per flow label.
    type Folded = (Placed, Option<Placed>, u32, LabelCounts);
    let mut counts = MappingCounts::default();
    let mut folded: HashMap<Key, Folded> = HashMap::new();
    for flow in flows {
        let (local, remote) = match book.place(node, flow) {
            Ok(placed) => placed,
            Err(why) => {
                counts.count(flow.kind, why.label());
                continue;
            }
        };
        let remote = match remote {
            Ok(r) => {
                counts.count(flow.kind, MAPPED);
                Some(r)
            }
            Err(why) => {
                counts.count(flow.kind, why.label());
                None
            }
        };
        let owner = match &flow.pod_uid {
            Some(uid) => FlowOwner::Pod { uid: uid.clone() },
            None => FlowOwner::Process {
                command: flow.command.clone(),
                pid: flow.pid,
            },
        };
        let key = (
            owner,
            flow.kind,
            local.endpoint.clone(),
            remote.as_ref().map(|r| r.endpoint.clone()),
        );
        let entry = folded
            .entry(key)
            .or_insert_with(|| (local, remote, 0, HashMap::new()));
        entry.2 += 1;
        if flow.flow_label != 0 {
            *entry.3.entry(flow.flow_label).or_default() += 1;
        }
    }
    let mut paths: Vec<ServicePath> = folded
        .into_iter()
        .map(
            |((owner, kind, _, _), (local, remote, flows, labels))| ServicePath {
                owner,
                kind,
                local,
                remote,
                flows,
                flow_label: most_used(&labels),
            },
        )
        .collect();
    paths.sort_by(|a, b| {
        (&a.owner, a.kind, &a.local, &a.remote).cmp(&(&b.owner, b.kind, &b.local, &b.remote))
    });
    (paths, counts)
}

/// Connections per RDMA flow label.
type LabelCounts = HashMap<u32, u32>;

/// The label most connections use; the lowest among equals (deterministic).
fn most_used(labels: &LabelCounts) -> u32 {
    labels
        .iter()
        .max_by(|a, b| a.1.cmp(b.1).then_with(|| b.0.cmp(a.0)))
        .map_or(0, |(label, _)| *label)
}

/// A service path to probe: from an endpoint of the reporting node to another
/// node's endpoint, over the service's flow label (RDMA) when it has one.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ServiceTarget {
    pub source: String,
    pub target: String,
    pub flow_label: u32,
    /// Service connections it stands for (the ranking under the cap).
    pub flows: u32,
}

/// Service targets of every node, each list sorted and capped.
pub type ServiceTargets = HashMap<String, Arc<[ServiceTarget]>>;

/// Every node's latest service flows.
#[derive(Debug, Default)]
pub struct ServiceTable {
    nodes: BTreeMap<String, NodeFlows>,
}

impl ServiceTable {
    /// Replaces `node`'s snapshot.
    pub fn insert(&mut self, node: &str, flows: NodeFlows) {
        self.nodes.insert(node.to_owned(), flows);
    }

    /// Forgets nodes whose last report is older than `cutoff_ms`; returns them.
    pub fn expire(&mut self, cutoff_ms: u64) -> Vec<String> {
        let gone: Vec<String> = self
            .nodes
            .iter()
            .filter(|(_, n)| n.received_ms < cutoff_ms)
            .map(|(node, _)| node.clone())
            .collect();
        for node in &gone {
            self.nodes.remove(node);
        }
        gone
    }

    pub fn nodes(&self) -> impl Iterator<Item = (&str, &NodeFlows)> {
        self.nodes.iter().map(|(n, f)| (n.as_str(), f))
    }

    pub fn node(&self, node: &str) -> Option<&NodeFlows> {
        self.nodes.get(node)
    }

    /// Every service path of every node.
    pub fn paths(&self) -> impl Iterator<Item = (&str, &ServicePath)> {
        self.nodes
            .iter()
            .flat_map(|(n, f)| f.paths.iter().map(move |p| (n.as_str(), p)))
    }

    /// The service targets of `node`: one per endpoint pair its flows join,
    /// those carrying the most connections first, at most `cap`.
    pub fn targets_of(&self, node: &str, cap: usize) -> Vec<ServiceTarget> {
        let Some(flows) = self.nodes.get(node) else {
            return Vec::new();
        };
        let mut pairs: BTreeMap<(&str, &str), (u32, LabelCounts)> = BTreeMap::new();
        for p in &flows.paths {
            let Some(remote) = &p.remote else { continue };
            let entry = pairs
                .entry((p.local.endpoint.as_str(), remote.endpoint.as_str()))
                .or_default();
            entry.0 = entry.0.saturating_add(p.flows);
            if p.flow_label != 0 {
                *entry.1.entry(p.flow_label).or_default() += p.flows;
            }
        }
        let mut targets: Vec<ServiceTarget> = pairs
            .into_iter()
            .map(|((source, target), (flows, labels))| ServiceTarget {
                source: source.to_owned(),
                target: target.to_owned(),
                flow_label: most_used(&labels),
                flows,
            })
            .collect();
        // Most connections first; ties by endpoint ids (stable pinglists).
        targets.sort_by(|a, b| b.flows.cmp(&a.flows).then_with(|| a.cmp(b)));
        targets.truncate(cap);
        targets.sort();
        targets
    }

    /// The service targets of every node that reported.
    pub fn targets(&self, cap: usize) -> ServiceTargets {
        self.nodes
            .keys()
            .map(|node| (node.clone(), self.targets_of(node, cap).into()))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use std::net::IpAddr;

    use pingmesh_proto::v1::Transport;

    use super::*;
    use crate::mesh::types::MeshEndpoint;

    fn endpoint(node: &str, ip: &str, transport: Transport) -> MeshEndpoint {
        MeshEndpoint {
            id: format!("{node}/ep"),
            node: node.to_owned(),
            tor: "t".to_owned(),
            transport: transport as i32,
            address: match transport {
                Transport::Rdma => ip.to_owned(),
                _ => format!("{ip}:9403"),
            },
            qpn: 3,
            device: String::new(),
            tor_from_agent: true,
        }
    }

    fn flow(remote: &str, port: u32, uid: Option<&str>, label: u32) -> TracedFlow {
        TracedFlow {
            kind: if label == 0 {
                FlowKind::Tcp
            } else {
                FlowKind::Rdma
            },
            local: if label == 0 {
                "10.0.0.1".parse().unwrap()
            } else {
                "fe80::1".parse().unwrap()
            },
            remote: remote.parse::<IpAddr>().unwrap(),
            local_port: port,
            remote_port: 5000,
            flow_label: label,
            pod_uid: uid.map(str::to_owned),
            container_id: String::new(),
            pid: 9,
            command: "trainer".into(),
        }
    }

    fn book() -> EndpointBook {
        EndpointBook::new(&[
            endpoint("a", "10.0.0.1", Transport::Udp),
            endpoint("b", "10.0.0.2", Transport::Udp),
            endpoint("c", "10.0.0.3", Transport::Udp),
        ])
    }

    #[test]
    fn flows_of_one_owner_between_one_pair_fold_into_one_path() {
        let flows = vec![
            flow("10.0.0.2", 1, Some("p1"), 0),
            flow("10.0.0.2", 2, Some("p1"), 0),
            flow("10.0.0.3", 3, Some("p1"), 0),
            flow("10.0.0.2", 4, None, 0),
            flow("192.168.1.1", 5, Some("p1"), 0),
        ];
        let (paths, counts) = fold("a", &flows, &book());
        assert_eq!(counts.get(MAPPED), 4);
        assert_eq!(
            counts.get(super::super::mapping::Unmapped::RemoteUnknown.label()),
            1
        );
        assert_eq!(counts.0.len(), 2, "{counts:?}");
        let summary: Vec<(String, Option<String>, u32)> = paths
            .iter()
            .map(|p| {
                (
                    format!("{:?}", p.owner),
                    p.remote.as_ref().map(|r| r.endpoint.clone()),
                    p.flows,
                )
            })
            .collect();
        assert_eq!(summary.len(), 4, "{summary:?}");
        let p1_to_b = paths
            .iter()
            .find(|p| {
                p.owner == FlowOwner::Pod { uid: "p1".into() }
                    && p.remote.as_ref().is_some_and(|r| r.endpoint == "b/ep")
            })
            .unwrap();
        assert_eq!(p1_to_b.flows, 2);
    }

    #[test]
    fn the_most_used_flow_label_of_rdma_connections_is_kept() {
        let book = EndpointBook::new(&[
            endpoint("a", "fe80::1", Transport::Rdma),
            endpoint("b", "fe80::2", Transport::Rdma),
        ]);
        let flows = vec![
            flow("fe80::2", 1, Some("p"), 0x300),
            flow("fe80::2", 2, Some("p"), 0x200),
            flow("fe80::2", 3, Some("p"), 0x200),
        ];
        let (paths, _) = fold("a", &flows, &book);
        assert_eq!(paths.len(), 1);
        assert_eq!(paths[0].flow_label, 0x200);
    }

    #[test]
    fn targets_keep_the_busiest_pairs_under_the_cap() {
        let mut table = ServiceTable::default();
        let flows = vec![
            flow("10.0.0.2", 1, Some("p1"), 0),
            flow("10.0.0.3", 2, Some("p1"), 0),
            flow("10.0.0.3", 3, Some("p2"), 0),
            flow("192.168.1.1", 4, Some("p2"), 0),
        ];
        let (paths, _) = fold("a", &flows, &book());
        table.insert(
            "a",
            NodeFlows {
                paths,
                ..NodeFlows::default()
            },
        );
        let all = table.targets_of("a", 10);
        let pairs: Vec<(&str, u32)> = all.iter().map(|t| (t.target.as_str(), t.flows)).collect();
        assert_eq!(pairs, [("b/ep", 1), ("c/ep", 2)]);
        let capped = table.targets_of("a", 1);
        assert_eq!(capped.len(), 1);
        assert_eq!(capped[0].target, "c/ep");
        assert!(table.targets_of("unknown", 10).is_empty());
    }

    #[test]
    fn nodes_that_stop_reporting_expire() {
        let mut table = ServiceTable::default();
        for (node, at) in [("a", 1_000), ("b", 5_000)] {
            table.insert(
                node,
                NodeFlows {
                    received_ms: at,
                    ..NodeFlows::default()
                },
            );
        }
        assert_eq!(table.expire(2_000), ["a"]);
        assert!(table.node("a").is_none());
        assert!(table.node("b").is_some());
    }
}
