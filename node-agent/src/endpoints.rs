//! The endpoints this agent registers with the mesh controller.
//!
//! The set changes while the agent runs: an RNIC that hits a fatal error
//! leaves it until re-opened, and comes back with a new responder QPN. The
//! control channel watches the set and registers again on every change.

use std::collections::BTreeMap;

use pingmesh_proto::v1::Endpoint;
use tokio::sync::watch;

/// Endpoints by id, as watchers see them.
pub type EndpointMap = BTreeMap<String, Endpoint>;

/// Endpoints by id; cheap to clone, every clone edits the same set.
#[derive(Debug, Clone)]
pub struct EndpointSet {
    tx: watch::Sender<EndpointMap>,
}

impl Default for EndpointSet {
    fn default() -> Self {
        Self::new()
    }
}

impl EndpointSet {
    pub fn new() -> Self {
        Self {
            tx: watch::Sender::new(BTreeMap::new()),
        }
    }

    /// Adds `endpoint`, or replaces the one with its id.
    pub fn insert(&self, endpoint: Endpoint) {
        self.tx.send_if_modified(|set| {
            let changed = set.get(&endpoint.id) != Some(&endpoint);
            if changed {
                set.insert(endpoint.id.clone(), endpoint);
            }
            changed
        });
    }

    /// Removes the endpoint with `id`, if present.
    pub fn remove(&self, id: &str) {
        self.tx.send_if_modified(|set| set.remove(id).is_some());
    }

    /// The endpoints now, ordered by id.
    pub fn current(&self) -> Vec<Endpoint> {
        self.tx.borrow().values().cloned().collect()
    }

    /// A receiver that sees every change.
    pub fn subscribe(&self) -> watch::Receiver<EndpointMap> {
        self.tx.subscribe()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn endpoint(id: &str, qpn: u32) -> Endpoint {
        Endpoint {
            id: id.into(),
            qpn,
            ..Endpoint::default()
        }
    }

    #[test]
    fn only_real_changes_notify_watchers() {
        let set = EndpointSet::new();
        let mut rx = set.subscribe();
        set.insert(endpoint("n/a", 1));
        assert!(rx.has_changed().unwrap());
        rx.mark_unchanged();
        set.insert(endpoint("n/a", 1));
        assert!(!rx.has_changed().unwrap(), "same endpoint again");
        set.insert(endpoint("n/a", 2));
        assert!(rx.has_changed().unwrap(), "new QPN");
        rx.mark_unchanged();
        set.remove("n/b");
        assert!(!rx.has_changed().unwrap(), "removing an absent id");
        set.insert(endpoint("n/b", 3));
        assert_eq!(
            set.current().iter().map(|e| e.qpn).collect::<Vec<_>>(),
            [2, 3]
        );
        set.remove("n/a");
        assert!(rx.has_changed().unwrap());
        assert_eq!(set.current().len(), 1);
    }
}
