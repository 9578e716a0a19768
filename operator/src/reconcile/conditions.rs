//! metav1.Condition bookkeeping: a condition keeps its lastTransitionTime
//! while its status stays the same, whatever happens to reason and message.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use k8s_openapi::jiff::Timestamp;

/// `Available`: agents are up and probing.
pub const AVAILABLE: &str = "Available";
/// `Progressing`: agents are being created or rolled.
pub const PROGRESSING: &str = "Progressing";
/// `Degraded`: the spec is invalid or the operator cannot apply it.
pub const DEGRADED: &str = "Degraded";

/// A condition as this reconcile judges it; the time is filled in by [`merge`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Judged {
    pub type_: &'static str,
    pub status: bool,
    pub reason: &'static str,
    pub message: String,
}

impl Judged {
    pub fn new(
        type_: &'static str,
        status: bool,
        reason: &'static str,
        message: impl Into<String>,
    ) -> Self {
        Self {
            type_,
            status,
            reason,
            message: message.into(),
        }
    }
}

fn status_word(status: bool) -> &'static str {
    if status { "True" } else { "False" }
}

/// The conditions after this reconcile: each judged condition replaces the one
/// of its type, keeping the old lastTransitionTime when the status did not
/// change; other types already present are kept as they are.
pub fn merge(
    previous: &[Condition],
    judged: &[Judged],
    generation: Option<i64>,
    now: Timestamp,
) -> Vec<Condition> {
    let mut out: Vec<Condition> = previous
        .iter()
        .filter(|c| !judged.iter().any(|j| j.type_ == c.type_))
        .cloned()
        .collect();
    for j in judged {
        let status = status_word(j.status);
        let last_transition_time = previous
            .iter()
            .find(|c| c.type_ == j.type_ && c.status == status)
            .map_or(Time(now), |c| c.last_transition_time.clone());
        out.push(Condition {
            type_: j.type_.to_owned(),
            status: status.to_owned(),
            reason: j.reason.to_owned(),
            message: j.message.clone(),
            observed_generation: generation,
            last_transition_time,
        });
    }
    out.sort_by(|a, b| a.type_.cmp(&b.type_));
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(secs: i64) -> Timestamp {
        Timestamp::from_second(secs).unwrap()
    }

    #[test]
    fn a_condition_keeps_its_transition_time_while_its_status_holds() {
        let first = merge(
            &[],
            &[Judged::new(AVAILABLE, true, "AgentsReady", "1 of 2")],
            Some(1),
            at(100),
        );
        let second = merge(
            &first,
            &[Judged::new(AVAILABLE, true, "AgentsReady", "2 of 2")],
            Some(2),
            at(200),
        );
        assert_eq!(second[0].last_transition_time, Time(at(100)));
        assert_eq!(second[0].message, "2 of 2");
        assert_eq!(second[0].observed_generation, Some(2));
        let third = merge(
            &second,
            &[Judged::new(AVAILABLE, false, "NoAgentReady", "0 of 2")],
            Some(2),
            at(300),
        );
        assert_eq!(third[0].last_transition_time, Time(at(300)));
        assert_eq!(third[0].status, "False");
    }

    #[test]
    fn conditions_of_other_types_are_kept() {
        let first = merge(
            &[],
            &[Judged::new(DEGRADED, false, "AsExpected", "")],
            None,
            at(1),
        );
        let second = merge(
            &first,
            &[Judged::new(AVAILABLE, true, "AgentsReady", "")],
            None,
            at(2),
        );
        let types: Vec<&str> = second.iter().map(|c| c.type_.as_str()).collect();
        assert_eq!(types, [AVAILABLE, DEGRADED]);
    }
}
