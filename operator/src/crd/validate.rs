//! The spec's rules in Rust: the same bounds and cross-field rules the CRD
//! schema and its CEL rules give the API server. The reconciler checks them
//! again because a CRD applied from an older chart, or a cluster that skips CEL,
//! may let a bad spec through; it then reports `Degraded` with these messages
//! instead of rolling out agents that cannot work.

use std::collections::BTreeMap;
use std::fmt;
use std::net::IpAddr;

use pingmesh_proto::limits::MAX_RATE_PPS;

use super::PingMeshSpec;
use super::spec::{DeviceAccess, ProbingSpec, RdmaSpec, SlaSpec};
use crate::mesh::analyzer::SlaPolicy;
use crate::mesh::pinglist::PinglistPolicy;
use crate::mesh::traces::{HopNames, TraceSettings};

/// `probing.maxServiceTargetsPerAgent` at most (the controller's bound, and
/// the schema's).
const MAX_SERVICE_TARGETS: u32 = 4_096;

/// Every problem found in a spec, each naming its field as users write it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub struct SpecError {
    pub problems: Vec<String>,
}

impl fmt::Display for SpecError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.problems.join("; "))
    }
}

impl SpecError {
    /// Bounded label for metrics and Event reasons.
    pub fn category(&self) -> &'static str {
        "invalid_spec"
    }
}

#[derive(Debug, Default)]
struct Problems(Vec<String>);

impl Problems {
    fn check(&mut self, ok: bool, message: impl FnOnce() -> String) {
        if !ok {
            self.0.push(message());
        }
    }

    fn in_range<T: PartialOrd + fmt::Display + Copy>(
        &mut self,
        field: &str,
        value: T,
        min: T,
        max: T,
    ) {
        self.check(value >= min && value <= max, || {
            format!("{field} is {value}, must be {min} to {max}")
        });
    }
}

impl PingMeshSpec {
    /// Checks every field; `Err` lists all problems, not only the first.
    pub fn validate(&self) -> Result<(), SpecError> {
        let mut p = Problems::default();
        check_probing(&mut p, &self.probing);
        check_sla(&mut p, &self.sla);
        check_rdma(&mut p, &self.rdma);
        p.check(!self.agent.image.trim().is_empty(), || {
            "agent.image must not be empty".to_owned()
        });
        p.check(self.agent.metrics_port != 0, || {
            "agent.metricsPort must be 1 to 65535".to_owned()
        });
        p.check(self.agent.udp_port != 0, || {
            "agent.udpPort must be 1 to 65535".to_owned()
        });
        p.check(!self.topology.tor_label.is_empty(), || {
            "topology.torLabel must not be empty".to_owned()
        });
        if let Err(e) = self.trace_settings() {
            p.0.push(e);
        }
        p.check(is_condition_type(&self.node_health.condition_type), || {
            format!(
                "nodeHealth.conditionType {:?} is not a condition type (letters, digits, '_', '.', '-', optional DNS prefix)",
                self.node_health.condition_type
            )
        });
        // The mesh controller's own rules, so nothing it would refuse gets through.
        if p.0.is_empty() {
            if let Err(e) = self.pinglist_policy().validate() {
                p.0.push(e.to_string());
            }
            if let Err(e) = self.sla_policy().validate() {
                p.0.push(e.to_string());
            }
        }
        if p.0.is_empty() {
            Ok(())
        } else {
            Err(SpecError { problems: p.0 })
        }
    }

    /// The mesh controller's pinglist policy for this spec; fields the spec does
    /// not expose keep the controller's defaults.
    pub fn pinglist_policy(&self) -> PinglistPolicy {
        let probing = &self.probing;
        PinglistPolicy {
            tor_mesh_rate_pps: probing.tor_mesh_rate_pps,
            inter_tor_rate_pps: probing.inter_tor_rate_pps,
            inter_tor_sample_tors: usize::try_from(probing.inter_tor_sample_tors)
                .unwrap_or(usize::MAX),
            ecmp_paths: probing.ecmp_paths,
            ecmp_coverage: probing.ecmp_coverage,
            window_ms: probing.window_ms,
            probe_timeout_ms: probing.probe_timeout_ms,
            service_rate_pps: probing.service_rate_pps,
            max_service_targets_per_agent: usize::try_from(probing.max_service_targets_per_agent)
                .unwrap_or(usize::MAX),
            ..PinglistPolicy::default()
        }
    }

    /// The mesh controller's path-trace settings for this spec: `topology.pathTraces`
    /// and the switch map, its addresses parsed and checked.
    pub fn trace_settings(&self) -> Result<TraceSettings, String> {
        let mut switches = BTreeMap::new();
        for (name, addresses) in &self.topology.switches {
            let parsed = addresses
                .iter()
                .map(|a| {
                    a.parse::<IpAddr>().map_err(|_| {
                        format!("topology.switches.{name}: {a:?} is not an IP address")
                    })
                })
                .collect::<Result<Vec<_>, _>>()?;
            switches.insert(name.clone(), parsed);
        }
        HopNames::new(&switches).map_err(|e| format!("topology.switches: {e}"))?;
        Ok(TraceSettings {
            enabled: self.topology.path_traces,
            switches,
            ..TraceSettings::default()
        })
    }

    /// The analyzer's SLA policy for this spec; hysteresis keeps its defaults.
    pub fn sla_policy(&self) -> SlaPolicy {
        SlaPolicy {
            max_loss_ratio: self.sla.max_loss_ratio,
            max_p99_network_rtt_ns: u64::from(self.sla.max_p99_network_rtt_micros) * 1_000,
            ..SlaPolicy::default()
        }
    }
}

fn check_probing(p: &mut Problems, probing: &ProbingSpec) {
    for (field, rate) in [
        ("probing.torMeshRatePps", probing.tor_mesh_rate_pps),
        ("probing.interTorRatePps", probing.inter_tor_rate_pps),
        ("probing.serviceRatePps", probing.service_rate_pps),
    ] {
        p.check(
            rate.is_finite() && rate > 0.0 && rate <= MAX_RATE_PPS,
            || format!("{field} is {rate}, must be above 0 and at most {MAX_RATE_PPS}"),
        );
    }
    p.in_range(
        "probing.interTorSampleTors",
        probing.inter_tor_sample_tors,
        0,
        1_000,
    );
    p.in_range("probing.ecmpPaths", probing.ecmp_paths, 1, 64);
    p.in_range(
        "probing.maxServiceTargetsPerAgent",
        probing.max_service_targets_per_agent,
        0,
        MAX_SERVICE_TARGETS,
    );
    let coverage = probing.ecmp_coverage;
    p.check(
        coverage.is_finite() && coverage > 0.0 && coverage < 1.0,
        || format!("probing.ecmpCoverage is {coverage}, must be strictly between 0 and 1"),
    );
    p.in_range(
        "probing.probeTimeoutMs",
        probing.probe_timeout_ms,
        10,
        60_000,
    );
    p.in_range("probing.windowMs", probing.window_ms, 1_000, 3_600_000);
    p.check(probing.probe_timeout_ms < probing.window_ms, || {
        format!(
            "probing.probeTimeoutMs ({}) must be shorter than probing.windowMs ({}), or no probe could finish inside its window",
            probing.probe_timeout_ms, probing.window_ms
        )
    });
}

fn check_sla(p: &mut Problems, sla: &SlaSpec) {
    let loss = sla.max_loss_ratio;
    p.check(loss.is_finite() && (0.0..1.0).contains(&loss), || {
        format!("sla.maxLossRatio is {loss}, must be at least 0 and below 1")
    });
    p.check(sla.max_p99_network_rtt_micros >= 1, || {
        "sla.maxP99NetworkRttMicros must be at least 1".to_owned()
    });
}

fn check_rdma(p: &mut Problems, rdma: &RdmaSpec) {
    p.in_range("rdma.serviceLevel", rdma.service_level, 0, 15);
    p.check(rdma.devices.len() <= 64, || {
        format!(
            "rdma.devices lists {} devices, at most 64 are allowed",
            rdma.devices.len()
        )
    });
    for device in &rdma.devices {
        p.check(is_device_name(device), || {
            format!("rdma.devices entry {device:?} is not an RNIC name such as mlx5_0")
        });
    }
    if rdma.device_access == DeviceAccess::DevicePlugin {
        p.check(is_extended_resource(&rdma.device_plugin_resource), || {
            format!(
                "rdma.devicePluginResource {:?} must name an extended resource such as rdma/hca_shared_devices_a when rdma.deviceAccess is devicePlugin",
                rdma.device_plugin_resource
            )
        });
    }
}

fn is_device_name(name: &str) -> bool {
    (1..=64).contains(&name.len())
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-'))
}

/// `domain/name`, as the CEL rule's pattern.
fn is_extended_resource(resource: &str) -> bool {
    let Some((domain, name)) = resource.split_once('/') else {
        return false;
    };
    resource.len() <= 253
        && !domain.is_empty()
        && !name.is_empty()
        && domain
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '-'))
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-'))
}

/// `[prefix/]Name`, as the schema's pattern.
fn is_condition_type(value: &str) -> bool {
    let name = match value.rsplit_once('/') {
        Some((prefix, name)) => {
            if prefix.is_empty()
                || !prefix
                    .chars()
                    .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || matches!(c, '.' | '-'))
            {
                return false;
            }
            name
        }
        None => value,
    };
    value.len() <= 316
        && name.chars().next().is_some_and(|c| c.is_ascii_alphabetic())
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-'))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_default_spec_is_valid() {
        PingMeshSpec::default().validate().unwrap();
    }

    #[test]
    fn a_probe_timeout_not_below_the_window_is_refused_with_both_values() {
        let mut spec = PingMeshSpec::default();
        spec.probing.probe_timeout_ms = 5_000;
        spec.probing.window_ms = 5_000;
        let err = spec.validate().unwrap_err().to_string();
        assert!(err.contains("probeTimeoutMs (5000)"), "{err}");
        assert!(err.contains("windowMs (5000)"), "{err}");
    }

    #[test]
    fn every_problem_is_listed_not_only_the_first() {
        let mut spec = PingMeshSpec::default();
        spec.probing.tor_mesh_rate_pps = 0.0;
        spec.probing.ecmp_paths = 65;
        spec.rdma.service_level = 16;
        spec.sla.max_loss_ratio = 1.0;
        let err = spec.validate().unwrap_err();
        assert_eq!(err.problems.len(), 4, "{err}");
    }

    #[test]
    fn device_plugin_access_needs_an_extended_resource_name() {
        let mut spec = PingMeshSpec::default();
        spec.rdma.device_access = DeviceAccess::DevicePlugin;
        spec.rdma.device_plugin_resource = String::new();
        let err = spec.validate().unwrap_err().to_string();
        assert!(err.contains("rdma.devicePluginResource"), "{err}");
        spec.rdma.device_plugin_resource = "nvidia.com/hostdev".into();
        spec.validate().unwrap();
        // Host-path access ignores the resource name.
        spec.rdma.device_access = DeviceAccess::HostPath;
        spec.rdma.device_plugin_resource = String::new();
        spec.validate().unwrap();
    }

    #[test]
    fn device_names_and_condition_types_are_checked() {
        let mut spec = PingMeshSpec::default();
        spec.rdma.devices = vec!["mlx5_0".into(), "bad name".into()];
        spec.node_health.condition_type = "example.com/RdmaOk".into();
        let err = spec.validate().unwrap_err();
        assert_eq!(err.problems.len(), 1, "{err}");
        assert!(err.problems[0].contains("bad name"), "{err}");
        spec.rdma.devices.pop();
        spec.node_health.condition_type = "9lives".into();
        assert!(
            spec.validate()
                .unwrap_err()
                .to_string()
                .contains("conditionType")
        );
    }

    #[test]
    fn spec_values_become_mesh_policies() {
        let mut spec = PingMeshSpec::default();
        spec.probing.window_ms = 10_000;
        spec.probing.service_rate_pps = 20.0;
        spec.probing.max_service_targets_per_agent = 0;
        spec.sla.max_p99_network_rtt_micros = 250;
        let policy = spec.pinglist_policy();
        assert_eq!(policy.window_ms, 10_000);
        assert!((policy.service_rate_pps - 20.0).abs() < f64::EPSILON);
        assert_eq!(policy.max_service_targets_per_agent, 0);
        assert_eq!(spec.sla_policy().max_p99_network_rtt_ns, 250_000);
    }

    #[test]
    fn the_service_probing_defaults_are_the_controllers() {
        let spec = PingMeshSpec::default().pinglist_policy();
        let controller = PinglistPolicy::default();
        assert!((spec.service_rate_pps - controller.service_rate_pps).abs() < f64::EPSILON);
        assert_eq!(
            spec.max_service_targets_per_agent,
            controller.max_service_targets_per_agent
        );
        assert_eq!(
            usize::try_from(MAX_SERVICE_TARGETS).unwrap(),
            crate::mesh::pinglist::MAX_SERVICE_TARGETS_PER_AGENT
        );
    }

    #[test]
    fn service_probing_out_of_bounds_is_refused() {
        let mut spec = PingMeshSpec::default();
        spec.probing.service_rate_pps = 0.0;
        spec.probing.max_service_targets_per_agent = 5_000;
        let message = spec.validate().unwrap_err().to_string();
        assert!(message.contains("probing.serviceRatePps is 0"), "{message}");
        assert!(
            message.contains("probing.maxServiceTargetsPerAgent"),
            "{message}"
        );
        assert!(spec.pinglist_policy().validate().is_err());
    }
}
