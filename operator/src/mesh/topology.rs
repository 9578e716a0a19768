//! Where an endpoint sits in the fabric when its agent does not say.
//!
//! An agent may name the ToR of each endpoint itself (`Endpoint.tor`); the
//! controller keeps that. For every other endpoint it asks a [`TorResolver`]
//! (in a cluster: the Node's labels, see `reconcile::nodes`) and falls back to
//! its `defaultTor`. Without a resolver (`standalone`) every such endpoint
//! lands in the default ToR.
//!
//! A resolver only says where to look and what it found; the controller checks
//! the values ([`choose_tor`]), because they come from outside (Node labels
//! anyone with node access can set) and end up in pinglists and metric labels.

use std::fmt;

use pingmesh_proto::limits::is_valid_id;

/// One place that may name an endpoint's ToR, and what it holds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TorCandidate {
    /// Where the value came from, for logs (for example the label key).
    pub source: String,
    pub value: String,
}

/// Where the controller learns the ToR of endpoints whose agent names none.
pub trait TorResolver: Send + Sync + fmt::Debug {
    /// The candidates for an endpoint on `node` with RNIC `device` (empty for
    /// UDP), most specific first; empty when no source names one. `None` when
    /// the resolver knows nothing about `node` (not in its cache yet): the
    /// controller then keeps what it has.
    fn candidates(&self, node: &str, device: &str) -> Option<Vec<TorCandidate>>;
}

/// The ToR chosen from a resolver's candidates.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChosenTor {
    pub tor: String,
    /// Candidates passed over because their value is not a valid ToR name.
    pub rejected: Vec<TorCandidate>,
}

/// The first candidate whose value is a valid ToR name (see
/// `pingmesh_proto::limits::is_valid_id`), else `default_tor`.
pub fn choose_tor(candidates: Vec<TorCandidate>, default_tor: &str) -> ChosenTor {
    let mut rejected = Vec::new();
    for candidate in candidates {
        if is_valid_id(&candidate.value) {
            return ChosenTor {
                tor: candidate.value,
                rejected,
            };
        }
        rejected.push(candidate);
    }
    ChosenTor {
        tor: default_tor.to_owned(),
        rejected,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn candidate(source: &str, value: &str) -> TorCandidate {
        TorCandidate {
            source: source.to_owned(),
            value: value.to_owned(),
        }
    }

    #[test]
    fn the_most_specific_valid_candidate_wins() {
        let chosen = choose_tor(
            vec![candidate("rnic", "rail-3"), candidate("node", "rack-12")],
            "default",
        );
        assert_eq!(chosen.tor, "rail-3");
        assert!(chosen.rejected.is_empty());
    }

    #[test]
    fn an_invalid_value_falls_back_to_the_next_candidate_and_is_reported() {
        let chosen = choose_tor(
            vec![candidate("rnic", "has space"), candidate("node", "rack-12")],
            "default",
        );
        assert_eq!(chosen.tor, "rack-12");
        assert_eq!(chosen.rejected, [candidate("rnic", "has space")]);
    }

    #[test]
    fn without_a_valid_candidate_the_default_tor_is_used() {
        assert_eq!(choose_tor(Vec::new(), "default").tor, "default");
        let too_long = "x".repeat(pingmesh_proto::limits::MAX_ID_LEN + 1);
        let chosen = choose_tor(
            vec![candidate("node", &too_long), candidate("rnic", "")],
            "d",
        );
        assert_eq!(chosen.tor, "d");
        assert_eq!(chosen.rejected.len(), 2);
    }
}
