//! The SLA the analyzer judges windows against, and its hysteresis settings.

use std::fmt::Display;

use serde::{Deserialize, Serialize};

/// Longest hysteresis the analyzer accepts, in windows: beyond this a finding
/// would take so long to open or clear that it says nothing about the present.
pub const MAX_HYSTERESIS_WINDOWS: u32 = 1_000;

/// What counts as a bad window, and how many windows it takes to open, clear
/// and forget a finding. camelCase in YAML/JSON; every field has a default.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct SlaPolicy {
    /// A window is bad when lost / (ok + lost) is above this.
    pub max_loss_ratio: f64,
    /// A window is bad when the p99 network RTT is above this.
    pub max_p99_network_rtt_ns: u64,
    /// Fewer probes than this in a window (answered + lost for loss, answered for
    /// latency) and the window is not judged: too few samples to mean anything.
    pub min_probes: u64,
    /// Consecutive bad windows before a finding opens.
    pub open_after_windows: u32,
    /// Consecutive good windows before an open finding clears.
    pub clear_after_windows: u32,
    /// Consecutive windows without judgeable data after which a key is forgotten
    /// (an open finding on it closes as gone).
    pub forget_after_windows: u32,
}

impl Default for SlaPolicy {
    fn default() -> Self {
        Self {
            max_loss_ratio: 0.01,
            max_p99_network_rtt_ns: 500_000,
            min_probes: 10,
            open_after_windows: 2,
            clear_after_windows: 3,
            forget_after_windows: 6,
        }
    }
}

/// Why an SLA policy (or the analyzer's window length) was refused.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("SLA policy field {field} = {value}: must be {expected}")]
pub struct SlaPolicyError {
    pub field: &'static str,
    pub value: String,
    pub expected: String,
}

impl SlaPolicyError {
    /// Bounded label for metrics and Event reasons.
    pub fn category(&self) -> &'static str {
        "sla_policy_out_of_range"
    }

    pub(super) fn new(field: &'static str, value: &dyn Display, expected: &dyn Display) -> Self {
        Self {
            field,
            value: value.to_string(),
            expected: expected.to_string(),
        }
    }
}

impl SlaPolicy {
    /// Refuses values the analyzer cannot work with; the first problem is reported.
    pub fn validate(&self) -> Result<(), SlaPolicyError> {
        if !(self.max_loss_ratio.is_finite() && (0.0..1.0).contains(&self.max_loss_ratio)) {
            return Err(SlaPolicyError::new(
                "maxLossRatio",
                &self.max_loss_ratio,
                &"a ratio in [0, 1)",
            ));
        }
        if self.max_p99_network_rtt_ns == 0 {
            return Err(SlaPolicyError::new("maxP99NetworkRttNs", &0, &"at least 1"));
        }
        if self.min_probes == 0 {
            return Err(SlaPolicyError::new("minProbes", &0, &"at least 1"));
        }
        for (field, value) in [
            ("openAfterWindows", self.open_after_windows),
            ("clearAfterWindows", self.clear_after_windows),
            ("forgetAfterWindows", self.forget_after_windows),
        ] {
            if value == 0 || value > MAX_HYSTERESIS_WINDOWS {
                return Err(SlaPolicyError::new(
                    field,
                    &value,
                    &format!("in 1..={MAX_HYSTERESIS_WINDOWS}"),
                ));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_policy_is_valid_and_parses_from_an_empty_object() {
        assert_eq!(SlaPolicy::default().validate(), Ok(()));
        let parsed: SlaPolicy = serde_json::from_str("{}").unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(parsed, SlaPolicy::default());
        let parsed: SlaPolicy =
            serde_json::from_str(r#"{"maxLossRatio": 0.05, "openAfterWindows": 4}"#)
                .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(
            (parsed.max_loss_ratio, parsed.open_after_windows),
            (0.05, 4)
        );
    }

    #[test]
    fn validate_names_the_offending_field() {
        let base = SlaPolicy::default();
        let cases = [
            (
                SlaPolicy {
                    max_loss_ratio: f64::NAN,
                    ..base.clone()
                },
                "maxLossRatio",
            ),
            (
                SlaPolicy {
                    max_loss_ratio: -0.1,
                    ..base.clone()
                },
                "maxLossRatio",
            ),
            (
                SlaPolicy {
                    max_loss_ratio: 1.0,
                    ..base.clone()
                },
                "maxLossRatio",
            ),
            (
                SlaPolicy {
                    max_p99_network_rtt_ns: 0,
                    ..base.clone()
                },
                "maxP99NetworkRttNs",
            ),
            (
                SlaPolicy {
                    min_probes: 0,
                    ..base.clone()
                },
                "minProbes",
            ),
            (
                SlaPolicy {
                    open_after_windows: 0,
                    ..base.clone()
                },
                "openAfterWindows",
            ),
            (
                SlaPolicy {
                    clear_after_windows: 5_000,
                    ..base.clone()
                },
                "clearAfterWindows",
            ),
            (
                SlaPolicy {
                    forget_after_windows: 0,
                    ..base
                },
                "forgetAfterWindows",
            ),
        ];
        for (policy, field) in cases {
            let err = policy.validate().err();
            assert_eq!(err.as_ref().map(|e| e.field), Some(field), "{err:?}");
            assert_eq!(err.map(|e| e.category()), Some("sla_policy_out_of_range"));
        }
    }
}
