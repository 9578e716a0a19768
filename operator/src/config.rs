//! Mesh controller configuration: a YAML file (optional) with every field
//! overridable by a flag or environment variable.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use clap::Args;
use serde::{Deserialize, Serialize};

use crate::mesh::analyzer::SlaPolicy;
use crate::mesh::pinglist::PinglistPolicy;
use crate::mesh::services::ServicePolicy;
use crate::mesh::traces::{HopNames, TraceSettings};

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("reading config file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("parsing config file {path}: {source}")]
    Parse {
        path: PathBuf,
        source: serde_yaml::Error,
    },
    #[error("invalid configuration: {0}")]
    Invalid(String),
}

/// Everything the mesh controller needs, as it appears in the YAML file.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields, default)]
pub struct MeshConfig {
    /// Agent-facing gRPC address.
    pub grpc_addr: SocketAddr,
    /// Read-only HTTP/JSON API, /metrics, /healthz, /readyz.
    pub http_addr: SocketAddr,
    /// Registry store: a SQLite path (`sqlite:///var/lib/pingmesh/registry.db`) or
    /// rqlite nodes (`rqlite://host:4001,host2:4001`).
    pub registry: String,
    /// ToR for endpoints whose agent names none and whose node has no ToR label.
    pub default_tor: String,
    /// Agents not heard from for this long are removed from the registry.
    pub stale_after_secs: u64,
    /// How long after a window's probes time out the analyzer waits for late reports.
    pub report_grace_ms: u64,
    pub pinglist: PinglistPolicy,
    pub sla: SlaPolicy,
    /// Service flows: how long a node's report counts, how many services get
    /// their own metric series (see docs/services.md).
    pub services: ServicePolicy,
    /// Path traces for link and switch localization (docs/localization.md).
    pub traces: TraceSettings,
}

impl Default for MeshConfig {
    fn default() -> Self {
        Self {
            grpc_addr: SocketAddr::from(([0, 0, 0, 0], 9400)),
            http_addr: SocketAddr::from(([0, 0, 0, 0], 9401)),
            registry: "sqlite://pingmesh-registry.db".into(),
            default_tor: "default".into(),
            stale_after_secs: 300,
            report_grace_ms: 1_500,
            pinglist: PinglistPolicy::default(),
            sla: SlaPolicy::default(),
            services: ServicePolicy::default(),
            traces: TraceSettings::default(),
        }
    }
}

/// Flags of `pingmesh-operator standalone`; each overrides the file.
#[derive(Debug, Clone, Default, Args)]
pub struct MeshArgs {
    /// YAML file with a `MeshConfig` (see docs/configuration.md).
    #[arg(long, env = "PINGMESH_CONFIG")]
    pub config: Option<PathBuf>,
    #[arg(long, env = "PINGMESH_GRPC_ADDR")]
    pub grpc_addr: Option<SocketAddr>,
    #[arg(long, env = "PINGMESH_HTTP_ADDR")]
    pub http_addr: Option<SocketAddr>,
    /// Registry store URL (`sqlite://PATH` or `rqlite://HOST:PORT[,HOST:PORT]`).
    #[arg(long, env = "PINGMESH_REGISTRY")]
    pub registry: Option<String>,
    #[arg(long, env = "PINGMESH_DEFAULT_TOR")]
    pub default_tor: Option<String>,
    /// Aggregation window in milliseconds.
    #[arg(long, env = "PINGMESH_WINDOW_MS")]
    pub window_ms: Option<u32>,
    /// Probe timeout in milliseconds.
    #[arg(long, env = "PINGMESH_PROBE_TIMEOUT_MS")]
    pub probe_timeout_ms: Option<u32>,
}

impl MeshArgs {
    /// The file (or defaults) with the flags applied, validated.
    pub fn resolve(&self) -> Result<MeshConfig, ConfigError> {
        let mut config = match &self.config {
            Some(path) => MeshConfig::from_file(path)?,
            None => MeshConfig::default(),
        };
        if let Some(a) = self.grpc_addr {
            config.grpc_addr = a;
        }
        if let Some(a) = self.http_addr {
            config.http_addr = a;
        }
        if let Some(r) = &self.registry {
            config.registry.clone_from(r);
        }
        if let Some(t) = &self.default_tor {
            config.default_tor.clone_from(t);
        }
        if let Some(w) = self.window_ms {
            config.pinglist.window_ms = w;
        }
        if let Some(t) = self.probe_timeout_ms {
            config.pinglist.probe_timeout_ms = t;
        }
        config.validate()?;
        Ok(config)
    }
}

impl MeshConfig {
    pub fn from_file(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        serde_yaml::from_str(&text).map_err(|source| ConfigError::Parse {
            path: path.to_owned(),
            source,
        })
    }

    pub fn validate(&self) -> Result<(), ConfigError> {
        self.pinglist
            .validate()
            .map_err(|e| ConfigError::Invalid(e.to_string()))?;
        self.sla
            .validate()
            .map_err(|e| ConfigError::Invalid(e.to_string()))?;
        if !pingmesh_proto::limits::is_valid_id(&self.default_tor) {
            return Err(ConfigError::Invalid(format!(
                "defaultTor {:?} is not a valid name",
                self.default_tor
            )));
        }
        self.services.validate().map_err(ConfigError::Invalid)?;
        if self.stale_after_secs == 0 {
            return Err(ConfigError::Invalid(
                "staleAfterSecs must be at least 1".into(),
            ));
        }
        HopNames::new(&self.traces.switches)
            .map_err(|e| ConfigError::Invalid(format!("traces.switches: {e}")))?;
        if self.traces.max_hops == 0 || self.traces.max_hops > 64 {
            return Err(ConfigError::Invalid(
                "traces.maxHops must be between 1 and 64".into(),
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_partial_yaml_file_keeps_defaults_for_the_rest() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("mesh.yaml");
        std::fs::write(
            &path,
            "registry: rqlite://10.0.0.1:4001\npinglist:\n  windowMs: 10000\n",
        )
        .unwrap();
        let config = MeshArgs {
            config: Some(path),
            ..MeshArgs::default()
        }
        .resolve()
        .unwrap();
        assert_eq!(config.registry, "rqlite://10.0.0.1:4001");
        assert_eq!(config.pinglist.window_ms, 10_000);
        assert_eq!(config.default_tor, "default");
    }

    #[test]
    fn flags_override_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("mesh.yaml");
        std::fs::write(&path, "defaultTor: rack-1\n").unwrap();
        let args = MeshArgs {
            config: Some(path),
            default_tor: Some("rack-2".into()),
            ..MeshArgs::default()
        };
        assert_eq!(args.resolve().unwrap().default_tor, "rack-2");
    }

    #[test]
    fn unknown_fields_and_bad_values_are_clear_errors() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("mesh.yaml");
        std::fs::write(&path, "regsitry: typo\n").unwrap();
        let err = MeshConfig::from_file(&path).unwrap_err().to_string();
        assert!(err.contains("regsitry"), "{err}");
        let args = MeshArgs {
            window_ms: Some(0),
            ..MeshArgs::default()
        };
        assert!(matches!(args.resolve(), Err(ConfigError::Invalid(_))));
    }
}
