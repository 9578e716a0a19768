//! Service targets on pinglists: the endpoint pairs traced service flows
//! join, probed along the service's own ECMP path where the transport allows.
//!
//! - RDMA pairs whose connections carry a flow label are probed on one flow
//!   with that label: the RNIC derives the UDP source port from it, so the
//!   probes hash onto the service's path.
//! - Other pairs (TCP services, RDMA without a label) are probed like
//!   inter-ToR targets, over enough flows to cover every ECMP path: a UDP
//!   prober cannot borrow a TCP connection's 5-tuple.
//!
//! A pair already on the list (ToR mesh, inter-ToR sample) becomes a service
//! target: one target per pair, since agents report one summary per pair
//! and window. It keeps the higher rate and, without a flow label, its flows.

use pingmesh_proto::v1;

use super::{MeshView, PinglistPolicy};
use crate::mesh::services::ServiceTarget;

impl MeshView {
    /// Index of endpoint `id` in the view (present, placed under a ToR).
    fn index_of(&self, id: &str) -> Option<super::Pos> {
        // Registration makes every endpoint id "<node>/<name>".
        let node = id.split_once('/').map(|(n, _)| n)?;
        let (tor, _) = self
            .by_node
            .get(node)?
            .placed
            .iter()
            .find(|(_, i)| i == id)?;
        self.position(tor, id)
    }

    /// Adds `node`'s service targets to `out` (its pinglist), turning pairs
    /// already listed into service targets. Targets whose ends are not both in
    /// the view, or cannot be paired, are skipped.
    pub fn add_service_targets(
        &self,
        node: &str,
        targets: &[ServiceTarget],
        policy: &PinglistPolicy,
        out: &mut Vec<v1::PingTarget>,
    ) {
        let first_new = out.len();
        for t in targets {
            let (Some(source), Some(target)) = (self.index_of(&t.source), self.index_of(&t.target))
            else {
                continue;
            };
            if self.endpoint(source).node != node || !self.pairable(source, target) {
                continue;
            }
            let labelled =
                t.flow_label != 0 && self.endpoint(source).transport == v1::Transport::Rdma as i32;
            let listed = out.iter_mut().find(|p| {
                p.source_endpoint == t.source && p.target.as_ref().is_some_and(|e| e.id == t.target)
            });
            if let Some(existing) = listed {
                existing.kind = v1::TargetKind::Service.into();
                existing.rate_pps = existing.rate_pps.max(policy.service_rate_pps);
                if labelled {
                    existing.flows = 1;
                    existing.flow_label = t.flow_label;
                }
                continue;
            }
            let flows = if labelled {
                1
            } else if source.tor == target.tor {
                policy.tor_mesh_flows()
            } else {
                policy.inter_tor_flows()
            };
            let mut probe = self.target(
                source,
                target,
                v1::TargetKind::Service,
                policy.service_rate_pps,
                flows,
            );
            if labelled {
                probe.flow_label = t.flow_label;
            }
            out.push(probe);
        }
        out[first_new..].sort_by(|a, b| {
            (&a.source_endpoint, super::target_id(a))
                .cmp(&(&b.source_endpoint, super::target_id(b)))
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::mesh::types::MeshEndpoint;

    fn endpoint(node: &str, tor: &str, transport: v1::Transport) -> MeshEndpoint {
        MeshEndpoint {
            id: format!("{node}/ep"),
            node: node.to_owned(),
            tor: tor.to_owned(),
            transport: transport as i32,
            address: "10.0.0.1:9403".to_owned(),
            qpn: 5,
            device: String::new(),
            tor_from_agent: true,
        }
    }

    fn service(source: &str, target: &str, label: u32) -> ServiceTarget {
        ServiceTarget {
            source: format!("{source}/ep"),
            target: format!("{target}/ep"),
            flow_label: label,
            flows: 1,
        }
    }

    fn policy() -> PinglistPolicy {
        PinglistPolicy {
            inter_tor_sample_tors: 0,
            service_rate_pps: 7.0,
            ..PinglistPolicy::default()
        }
    }

    #[test]
    fn a_service_pair_not_on_the_list_is_added_as_a_service_target() {
        let view = MeshView::new(vec![
            endpoint("a", "t1", v1::Transport::Udp),
            endpoint("b", "t2", v1::Transport::Udp),
        ]);
        let policy = policy();
        let mut list = view.pinglist_for("a", &policy, 0);
        assert!(list.is_empty(), "inter-ToR probing is off");
        view.add_service_targets("a", &[service("a", "b", 0)], &policy, &mut list);
        assert_eq!(list.len(), 1);
        assert_eq!(list[0].kind, v1::TargetKind::Service as i32);
        assert!((list[0].rate_pps - 7.0).abs() < f64::EPSILON);
        assert_eq!(list[0].flows, policy.inter_tor_flows());
        assert_eq!(list[0].flow_label, 0);
    }

    #[test]
    fn a_listed_pair_becomes_a_service_target_with_the_services_flow_label() {
        let view = MeshView::new(vec![
            endpoint("a", "t1", v1::Transport::Rdma),
            endpoint("b", "t1", v1::Transport::Rdma),
        ]);
        let policy = PinglistPolicy {
            tor_mesh_rate_pps: 20.0,
            ..policy()
        };
        let mut list = view.pinglist_for("a", &policy, 0);
        assert_eq!(list.len(), 1, "the ToR mesh pair");
        view.add_service_targets("a", &[service("a", "b", 0xBEEF)], &policy, &mut list);
        assert_eq!(list.len(), 1, "still one target per pair");
        assert_eq!(list[0].kind, v1::TargetKind::Service as i32);
        assert_eq!((list[0].flows, list[0].flow_label), (1, 0xBEEF));
        assert!(
            (list[0].rate_pps - 20.0).abs() < f64::EPSILON,
            "the higher rate stays"
        );
    }

    #[test]
    fn absent_foreign_or_unpairable_service_targets_are_skipped() {
        let view = MeshView::new(vec![
            endpoint("a", "t1", v1::Transport::Udp),
            endpoint("b", "t1", v1::Transport::Rdma),
            endpoint("c", "t2", v1::Transport::Udp),
        ]);
        let policy = policy();
        let mut list = Vec::new();
        view.add_service_targets(
            "a",
            &[
                service("a", "b", 0),    // UDP to RDMA
                service("a", "gone", 0), // not present
                service("c", "a", 0),    // another node's source
                service("a", "a", 0),    // itself
            ],
            &policy,
            &mut list,
        );
        assert!(list.is_empty(), "{list:?}");
    }
}
