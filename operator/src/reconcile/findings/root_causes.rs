//! Root causes (localized faults, see [`crate::mesh::localize`]) as the
//! operator shows them: the notes of their Events, the SLA findings they
//! explain (which then get no Events of their own), and the nodes they name,
//! which drive the `spec.nodeHealth` Node condition.
//!
//! A node is at fault while an open root cause of kind `endpoint` (one of its
//! RNICs or UDP ports) or `host` (all of them, or its host's delays) names it,
//! whatever the signal (loss, latency, host delay). The localizer weighs every
//! path, ToR mesh and inter-ToR alike, so a node is named even when it is one
//! of two under its ToR; ToR, link, switch and unknown causes name no node.

use std::collections::{BTreeMap, BTreeSet};

use k8s_openapi::jiff::Timestamp;

use crate::mesh::localize::{CauseKind, OpenRootCause, RootCause, Side, Signal};
use crate::mesh::types::MeshEndpoint;

use super::super::events::{MAX_NOTE_BYTES, truncate};
use super::node_condition::Wanted;

/// Event reason when a root cause opens (`Warning`), and the Node
/// condition's reason while one names the node.
pub const LOCALIZED_REASON: &str = "RootCauseLocalized";
/// Event reason when a root cause clears (`Normal`).
pub const CLEARED_REASON: &str = "RootCauseCleared";
/// The Node condition's reason while no root cause names the node.
pub const NOT_LOCALIZED_REASON: &str = "NoRootCauseLocalized";

/// Most explained findings a root cause's Event note lists by location.
const MAX_LISTED: usize = 5;

/// What identifies a root cause across windows (as the mesh controller's
/// tracker does: its side may change as evidence grows).
pub type CauseKey = (CauseKind, Signal, String);

pub fn key(cause: &RootCause) -> CauseKey {
    (cause.kind, cause.signal, cause.component.clone())
}

/// The node `cause` puts at fault: endpoint and host causes only.
pub fn node_at_fault(cause: &RootCause) -> Option<&str> {
    match cause.kind {
        CauseKind::Endpoint | CauseKind::Host => cause.node.as_deref(),
        CauseKind::Tor | CauseKind::Link | CauseKind::Switch | CauseKind::Unknown => None,
    }
}

/// The SLA findings open root causes explain, as `"<kind> <location>"`
/// (`pathLoss n1/udp0 -> n3/udp0`), the form of [`RootCause::explains`].
pub fn explained(causes: &[OpenRootCause]) -> BTreeSet<&str> {
    causes
        .iter()
        .flat_map(|c| c.cause.explains.iter().map(String::as_str))
        .collect()
}

/// The nodes open root causes put at fault, each with those causes (in the
/// order given: most confident first).
pub fn faulty_nodes(causes: &[OpenRootCause]) -> BTreeMap<&str, Vec<&OpenRootCause>> {
    let mut nodes: BTreeMap<&str, Vec<&OpenRootCause>> = BTreeMap::new();
    for c in causes {
        if let Some(node) = node_at_fault(&c.cause) {
            nodes.entry(node).or_default().push(c);
        }
    }
    nodes
}

/// The condition every node with registered endpoints should carry: `False`
/// with the summaries of the root causes that name it, `True` otherwise.
pub fn wanted_conditions(
    causes: &[OpenRootCause],
    endpoints: &[MeshEndpoint],
) -> BTreeMap<String, Wanted> {
    let faulty = faulty_nodes(causes);
    endpoints
        .iter()
        .map(|e| {
            let wanted = faulty.get(e.node.as_str()).map_or_else(
                || Wanted {
                    healthy: true,
                    reason: NOT_LOCALIZED_REASON.to_owned(),
                    message: "no open root cause names this node".to_owned(),
                },
                |causes| Wanted {
                    healthy: false,
                    reason: LOCALIZED_REASON.to_owned(),
                    message: condition_message(causes),
                },
            );
            (e.node.clone(), wanted)
        })
        .collect()
}

fn condition_message(causes: &[&OpenRootCause]) -> String {
    let parts: Vec<String> = causes
        .iter()
        .map(|c| {
            format!(
                "{} (open since {})",
                c.cause.summary,
                time(c.first_window_ms)
            )
        })
        .collect();
    truncate(parts.join("; "), MAX_NOTE_BYTES)
}

/// The note of the `Warning` Event when `cause` opens: what, where, how sure,
/// and which SLA findings it explains.
pub fn opened_note(cause: &RootCause) -> String {
    let fits = if cause.candidates.is_empty() {
        String::new()
    } else {
        format!("; fits as well: {}", cause.candidates.join(", "))
    };
    let note = format!(
        "{} {} ({}{}, confidence {:.2}): {}{fits}; {}",
        cause.kind.label(),
        cause.component,
        cause.signal.label(),
        cause.side.map(side_words).unwrap_or_default(),
        cause.confidence,
        cause.summary,
        explained_summary(&cause.explains)
    );
    truncate(note, MAX_NOTE_BYTES)
}

/// The note of the `Normal` Event when `cause` clears; `cleared` is the mesh
/// controller's record of it clearing, when it has one (not after a restart).
pub fn cleared_note(cause: &RootCause, cleared: Option<&OpenRootCause>) -> String {
    let why = cleared.map_or_else(
        || "no longer reported by the mesh controller".to_owned(),
        |c| {
            format!(
                "no longer localized (open since {}, last localized in the window of {})",
                time(c.first_window_ms),
                time(c.last_window_ms)
            )
        },
    );
    truncate(
        format!(
            "{} {} ({}): {why}",
            cause.kind.label(),
            cause.component,
            cause.signal.label()
        ),
        MAX_NOTE_BYTES,
    )
}

/// "explains 11 open SLA findings (10 pathLoss, 1 torPairLoss): pathLoss
/// n1/udp0 -> n3/udp0, ... and 6 more".
fn explained_summary(explains: &[String]) -> String {
    if explains.is_empty() {
        return "explains no open SLA finding yet".to_owned();
    }
    let mut by_kind: BTreeMap<&str, usize> = BTreeMap::new();
    for e in explains {
        let kind = e.split_once(' ').map_or(e.as_str(), |(k, _)| k);
        *by_kind.entry(kind).or_default() += 1;
    }
    let kinds: Vec<String> = by_kind.iter().map(|(k, n)| format!("{n} {k}")).collect();
    let listed: Vec<&str> = explains
        .iter()
        .take(MAX_LISTED)
        .map(String::as_str)
        .collect();
    let more = explains.len().saturating_sub(MAX_LISTED);
    let more = if more > 0 {
        format!(" and {more} more")
    } else {
        String::new()
    };
    format!(
        "explains {} open SLA finding{} ({}): {}{more}",
        explains.len(),
        if explains.len() == 1 { "" } else { "s" },
        kinds.join(", "),
        listed.join(", ")
    )
}

fn side_words(side: Side) -> &'static str {
    match side {
        Side::Prober => ", as prober",
        Side::Responder => ", as responder",
        Side::Both => ", both ways",
    }
}

/// A window start (Unix ms) as RFC 3339.
fn time(ms: u64) -> String {
    i64::try_from(ms)
        .ok()
        .and_then(|ms| Timestamp::from_millisecond(ms).ok())
        .map_or_else(|| format!("{ms} ms"), |t| t.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::mesh::localize::CauseEvidence;

    fn cause(kind: CauseKind, component: &str, node: Option<&str>) -> OpenRootCause {
        OpenRootCause {
            cause: RootCause {
                kind,
                component: component.to_owned(),
                side: Some(Side::Both),
                signal: Signal::Loss,
                node: node.map(str::to_owned),
                tor: Some("tor-a".to_owned()),
                confidence: 0.912,
                evidence: CauseEvidence::default(),
                candidates: Vec::new(),
                explains: Vec::new(),
                summary: format!(
                    "{} {component} both ways: 5 of 5 paths through it losing",
                    kind.label()
                ),
            },
            opened_at_window_ms: 1_800_000_010_000,
            first_window_ms: 1_800_000_005_000,
            last_window_ms: 1_800_000_010_000,
            cleared_at_window_ms: None,
        }
    }

    fn endpoint(node: &str) -> MeshEndpoint {
        MeshEndpoint {
            id: format!("{node}/udp0"),
            node: node.to_owned(),
            tor: "tor-a".to_owned(),
            transport: 1,
            address: "10.0.0.1:9403".to_owned(),
            qpn: 0,
            device: String::new(),
            tor_from_agent: false,
        }
    }

    #[test]
    fn endpoint_and_host_causes_put_their_node_at_fault_network_ones_none() {
        let causes = vec![
            cause(CauseKind::Host, "n3", Some("n3")),
            cause(CauseKind::Endpoint, "n5/mlx5_1", Some("n5")),
            cause(CauseKind::Tor, "tor-a", None),
            cause(CauseKind::Link, "spine-1 -> tor-a", None),
            cause(CauseKind::Switch, "spine layer", None),
        ];
        let faulty = faulty_nodes(&causes);
        assert_eq!(faulty.keys().copied().collect::<Vec<_>>(), ["n3", "n5"]);

        let endpoints: Vec<MeshEndpoint> = ["n1", "n3", "n5"].iter().map(|n| endpoint(n)).collect();
        let wanted = wanted_conditions(&causes, &endpoints);
        assert!(wanted["n1"].healthy);
        assert_eq!(wanted["n1"].reason, NOT_LOCALIZED_REASON);
        assert!(!wanted["n3"].healthy);
        assert_eq!(wanted["n3"].reason, LOCALIZED_REASON);
        assert_eq!(
            wanted["n3"].message,
            "host n3 both ways: 5 of 5 paths through it losing (open since 2027-01-15T08:00:05Z)"
        );
        assert!(!wanted["n5"].healthy);
    }

    #[test]
    fn two_causes_on_one_node_are_both_in_its_message() {
        let mut slow = cause(CauseKind::Host, "n3", Some("n3"));
        slow.cause.signal = Signal::HostDelay;
        slow.cause.summary = "host n3 as prober: prober delay p99 9.00 ms".to_owned();
        let causes = vec![cause(CauseKind::Host, "n3", Some("n3")), slow];
        let wanted = wanted_conditions(&causes, &[endpoint("n3")]);
        let message = &wanted["n3"].message;
        assert!(
            message.contains("losing") && message.contains("prober delay"),
            "{message}"
        );
    }

    #[test]
    fn a_cause_not_on_a_registered_node_writes_no_condition() {
        let causes = vec![cause(CauseKind::Host, "gone", Some("gone"))];
        assert!(wanted_conditions(&causes, &[endpoint("n1")])["n1"].healthy);
        assert!(!wanted_conditions(&causes, &[endpoint("n1")]).contains_key("gone"));
    }

    #[test]
    fn the_opened_note_names_the_component_and_summarizes_what_it_explains() {
        let mut c = cause(CauseKind::Host, "n3", Some("n3")).cause;
        c.explains = (1..=6)
            .map(|i| format!("pathLoss n3/udp0 -> n{i}/udp0"))
            .chain(["torPairLoss tor-a -> tor-a".to_owned()])
            .collect();
        let note = opened_note(&c);
        assert!(
            note.starts_with("host n3 (loss, both ways, confidence 0.91): host n3 both ways"),
            "{note}"
        );
        assert!(
            note.contains("explains 7 open SLA findings (6 pathLoss, 1 torPairLoss): pathLoss n3/udp0 -> n1/udp0"),
            "{note}"
        );
        assert!(note.ends_with("and 2 more"), "{note}");

        c.explains.clear();
        c.candidates = vec!["host n4".to_owned()];
        let note = opened_note(&c);
        assert!(note.contains("fits as well: host n4"), "{note}");
        assert!(note.ends_with("explains no open SLA finding yet"), "{note}");
    }

    #[test]
    fn the_cleared_note_says_since_when_or_that_the_controller_forgot_it() {
        let open = cause(CauseKind::Tor, "tor-a", None);
        let note = cleared_note(&open.cause, Some(&open));
        assert!(
            note.starts_with(
                "tor tor-a (loss): no longer localized (open since 2027-01-15T08:00:05Z"
            ),
            "{note}"
        );
        assert!(
            cleared_note(&open.cause, None).ends_with("no longer reported by the mesh controller")
        );
    }

    #[test]
    fn explained_findings_are_collected_from_every_open_cause() {
        let mut a = cause(CauseKind::Host, "n3", Some("n3"));
        a.cause.explains = vec!["pathLoss n3/udp0 -> n1/udp0".to_owned()];
        let mut b = cause(CauseKind::Tor, "tor-b", None);
        b.cause.explains = vec!["torPairLoss tor-b -> tor-b".to_owned()];
        let causes = [a, b];
        let all = explained(&causes);
        assert!(all.contains("pathLoss n3/udp0 -> n1/udp0"));
        assert!(all.contains("torPairLoss tor-b -> tor-b"));
        assert_eq!(all.len(), 2);
    }
}
