//! `pingmesh demo --inject SPEC`: faults the demo's agents emulate in
//! process (no root, no iptables), so a newcomer can watch one open, get
//! localized and clear.
//!
//! SPEC is `KIND:ARGS[@START[-END]]`:
//! - `host:NODE`: the node is black-holed (every packet to or from it dropped);
//! - `loss:NODE:PCT%`: the node drops PCT % of the packets it sends or receives;
//! - `tor:TOR:PCT%`: the ToR drops PCT % of the packets crossing it (from,
//!   to or within it; a packet crosses a ToR once).
//!
//! START and END are seconds since the demo started (`20s`, `1m`); by
//! default a fault starts at 0 and never ends.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use pingmesh_agent::probe::emulate::EmulatedFabric;

/// What a fault hits.
#[derive(Debug, Clone, PartialEq)]
pub enum Target {
    Node(String),
    Tor(String),
}

impl std::fmt::Display for Target {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Node(n) => write!(f, "node {n}"),
            Self::Tor(t) => write!(f, "ToR {t}"),
        }
    }
}

/// One `--inject` fault.
#[derive(Debug, Clone, PartialEq)]
pub struct Injection {
    pub target: Target,
    /// Share of packets dropped, 0..=1.
    pub loss: f64,
    pub start: Duration,
    pub end: Option<Duration>,
}

impl std::str::FromStr for Injection {
    type Err = String;

    fn from_str(spec: &str) -> Result<Self, String> {
        let (fault, when) = match spec.split_once('@') {
            Some((f, w)) => (f, Some(w)),
            None => (spec, None),
        };
        let parts: Vec<&str> = fault.split(':').collect();
        let (target, loss) = match parts.as_slice() {
            ["host", node] => (Target::Node(name(node)?), 1.0),
            ["loss", node, pct] => (Target::Node(name(node)?), percent(pct)?),
            ["tor", tor, pct] => (Target::Tor(name(tor)?), percent(pct)?),
            _ => {
                return Err(format!(
                    "{spec:?}: expected host:NODE, loss:NODE:PCT% or tor:TOR:PCT%, optionally @START[-END]"
                ));
            }
        };
        let (start, end) = match when {
            None => (Duration::ZERO, None),
            Some(w) => match w.split_once('-') {
                Some((a, b)) => (seconds(a)?, Some(seconds(b)?)),
                None => (seconds(w)?, None),
            },
        };
        if end.is_some_and(|e| e <= start) {
            return Err(format!("{spec:?}: the fault must end after it starts"));
        }
        Ok(Self {
            target,
            loss,
            start,
            end,
        })
    }
}

fn name(s: &str) -> Result<String, String> {
    if s.is_empty() {
        Err("empty node or ToR name".to_owned())
    } else {
        Ok(s.to_owned())
    }
}

fn percent(s: &str) -> Result<f64, String> {
    let n: f64 = s
        .strip_suffix('%')
        .unwrap_or(s)
        .parse()
        .map_err(|_| format!("{s:?} is not a percentage like 30%"))?;
    if (0.0..=100.0).contains(&n) {
        Ok(n / 100.0)
    } else {
        Err(format!("{s:?} is not between 0% and 100%"))
    }
}

fn seconds(s: &str) -> Result<Duration, String> {
    crate::demo::parse_seconds(s)
}

/// The demo's emulated fabric: which node and ToR each endpoint is on, and
/// the faults, timed from the demo's start.
#[derive(Debug)]
pub struct DemoFabric {
    started: Instant,
    tor_of_node: HashMap<String, String>,
    faults: Vec<Injection>,
}

impl DemoFabric {
    pub fn new(tor_of_node: HashMap<String, String>, faults: Vec<Injection>) -> Arc<Self> {
        Arc::new(Self {
            started: Instant::now(),
            tor_of_node,
            faults,
        })
    }

    /// Names in `faults` that are no node or ToR of the demo.
    pub fn unknown_targets(&self) -> Vec<String> {
        self.faults
            .iter()
            .filter_map(|f| match &f.target {
                Target::Node(n) if !self.tor_of_node.contains_key(n) => Some(n.clone()),
                Target::Tor(t) if !self.tor_of_node.values().any(|v| v == t) => Some(t.clone()),
                _ => None,
            })
            .collect()
    }

    /// Share of packets from `from` to `to` (node names) dropped `at` after the start.
    fn loss_between(&self, from: &str, to: &str, at: Duration) -> f64 {
        let tor = |n: &str| self.tor_of_node.get(n).map(String::as_str);
        let mut pass = 1.0;
        for f in &self.faults {
            if at < f.start || f.end.is_some_and(|e| at >= e) {
                continue;
            }
            let hit = match &f.target {
                Target::Node(n) => n == from || n == to,
                Target::Tor(t) => tor(from) == Some(t) || tor(to) == Some(t),
            };
            if hit {
                pass *= 1.0 - f.loss;
            }
        }
        1.0 - pass
    }
}

/// The node of an agent's endpoint id (`<node>/<port>`).
fn node_of(endpoint: &str) -> &str {
    endpoint.split_once('/').map_or(endpoint, |(node, _)| node)
}

impl EmulatedFabric for DemoFabric {
    fn drops(&self, from_endpoint: &str, to_endpoint: &str) -> bool {
        let loss = self.loss_between(
            node_of(from_endpoint),
            node_of(to_endpoint),
            self.started.elapsed(),
        );
        loss > 0.0 && rand::random::<f64>() < loss
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fabric(faults: &[&str]) -> DemoFabric {
        DemoFabric {
            started: Instant::now(),
            tor_of_node: [("n1", "t1"), ("n2", "t1"), ("n3", "t2")]
                .into_iter()
                .map(|(n, t)| (n.to_owned(), t.to_owned()))
                .collect(),
            faults: faults.iter().map(|f| f.parse().unwrap()).collect(),
        }
    }

    #[test]
    fn specs_parse_with_and_without_times() {
        let host: Injection = "host:agent-3".parse().unwrap();
        assert_eq!(host.target, Target::Node("agent-3".to_owned()));
        assert!((host.loss - 1.0).abs() < f64::EPSILON);
        let loss: Injection = "loss:agent-2:30%@20s-1m".parse().unwrap();
        assert!((loss.loss - 0.3).abs() < 1e-9);
        assert_eq!(
            (loss.start, loss.end),
            (Duration::from_secs(20), Some(Duration::from_mins(1)))
        );
        let tor: Injection = "tor:tor-2:20%@15".parse().unwrap();
        assert_eq!(tor.target, Target::Tor("tor-2".to_owned()));
        assert_eq!((tor.start, tor.end), (Duration::from_secs(15), None));
    }

    #[test]
    fn bad_specs_say_what_is_expected() {
        for bad in [
            "",
            "host:",
            "loss:n1",
            "loss:n1:150%",
            "tor:t1:x%",
            "rack:t1:5%",
            "host:n1@30s-10s",
        ] {
            assert!(bad.parse::<Injection>().is_err(), "{bad} was accepted");
        }
    }

    #[test]
    fn faults_hit_their_node_or_tor_only_while_active() {
        let f = fabric(&["loss:n1:30%@10s-20s", "tor:t2:20%"]);
        let at = Duration::from_secs;
        assert!((f.loss_between("n1", "n2", at(15)) - 0.3).abs() < 1e-9);
        assert!(f.loss_between("n1", "n2", at(25)).abs() < 1e-9, "ended");
        assert!(
            f.loss_between("n1", "n2", at(5)).abs() < 1e-9,
            "not started"
        );
        assert!((f.loss_between("n2", "n3", at(25)) - 0.2).abs() < 1e-9);
        // Both at once: a packet survives each independently.
        assert!((f.loss_between("n1", "n3", at(15)) - (1.0 - 0.7 * 0.8)).abs() < 1e-9);
        assert!(f.unknown_targets().is_empty());
        assert_eq!(
            fabric(&["host:n9"]).unknown_targets(),
            vec!["n9".to_owned()]
        );
    }
}
