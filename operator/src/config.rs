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
    /// TLS on the agent-facing gRPC port, and with a client CA, agents'
    /// node identity from their certificates (docs/security.md).
    pub grpc_tls: Option<GrpcTlsConfig>,
    /// Serve agents in plain text on an address other hosts can reach. Off:
    /// without `grpcTls` the gRPC port must be on loopback, so that nothing
    /// unencrypted and unauthenticated is ever reachable by accident.
    pub insecure_plaintext: bool,
    /// Probe authentication: agents sign probes and ACKs with keys derived
    /// from this master secret and drop what is not signed (docs/security.md,
    /// "Probe authentication"). Unset: probes are not authenticated.
    pub probe_auth: Option<ProbeAuthConfig>,
}

/// Where the mesh's probe-key master secret is, and how often keys rotate.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ProbeAuthConfig {
    /// File holding the master secret (at least 32 bytes; surrounding
    /// whitespace is ignored). Every replica must read the same secret.
    pub key_file: PathBuf,
    /// Key rotation period in seconds (at least 60). Agents hold the previous,
    /// current and next keys, so clocks may differ by up to one period.
    #[serde(default = "default_probe_key_rotation_secs")]
    pub rotation_secs: u64,
}

pub const DEFAULT_PROBE_KEY_ROTATION_SECS: u64 = 3_600;

fn default_probe_key_rotation_secs() -> u64 {
    DEFAULT_PROBE_KEY_ROTATION_SECS
}

/// Certificate files of the gRPC port; re-read when they change, so
/// certificates rotate without a restart.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct GrpcTlsConfig {
    /// PEM certificate chain of the controller, leaf first.
    pub cert_file: PathBuf,
    /// PEM private key (PKCS#8, PKCS#1 or SEC1).
    pub key_file: PathBuf,
    /// PEM CA bundle that agents' client certificates must chain to. Set:
    /// every agent needs a certificate whose subject common name is its node
    /// name, and may act for that node only. Unset: no client certificates.
    #[serde(default)]
    pub client_ca_file: Option<PathBuf>,
}

impl Default for MeshConfig {
    fn default() -> Self {
        Self {
            // Loopback unless told otherwise: the standalone JSON API has no
            // authentication, and the gRPC port none without TLS.
            grpc_addr: SocketAddr::from(([127, 0, 0, 1], 9400)),
            http_addr: SocketAddr::from(([127, 0, 0, 1], 9401)),
            registry: "sqlite://pingmesh-registry.db".into(),
            default_tor: "default".into(),
            stale_after_secs: 300,
            report_grace_ms: 1_500,
            pinglist: PinglistPolicy::default(),
            sla: SlaPolicy::default(),
            services: ServicePolicy::default(),
            traces: TraceSettings::default(),
            grpc_tls: None,
            insecure_plaintext: false,
            probe_auth: None,
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
    /// PEM certificate chain of the gRPC port (with `--grpc-tls-key`).
    #[arg(long, env = "PINGMESH_GRPC_TLS_CERT", requires = "grpc_tls_key")]
    pub grpc_tls_cert: Option<PathBuf>,
    /// PEM private key of the gRPC port (with `--grpc-tls-cert`).
    #[arg(long, env = "PINGMESH_GRPC_TLS_KEY", requires = "grpc_tls_cert")]
    pub grpc_tls_key: Option<PathBuf>,
    /// PEM CA bundle agents' client certificates must chain to (their
    /// subject CN is their node name; see docs/security.md).
    #[arg(long, env = "PINGMESH_GRPC_CLIENT_CA", requires = "grpc_tls_cert")]
    pub grpc_client_ca: Option<PathBuf>,
    /// Serve agents in plain text on a non-loopback address (trusted networks,
    /// tests). Plain text is never the default.
    #[arg(long, env = "PINGMESH_INSECURE_PLAINTEXT", num_args = 0..=1, default_missing_value = "true")]
    pub insecure_plaintext: Option<bool>,
    /// File with the mesh's probe-key master secret: turns probe
    /// authentication on (docs/security.md).
    #[arg(long, env = "PINGMESH_PROBE_KEY_FILE")]
    pub probe_key_file: Option<PathBuf>,
    /// Probe key rotation period in seconds (with `--probe-key-file`; default 3600).
    #[arg(
        long,
        env = "PINGMESH_PROBE_KEY_ROTATION_SECS",
        requires = "probe_key_file"
    )]
    pub probe_key_rotation_secs: Option<u64>,
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
        if let (Some(cert_file), Some(key_file)) = (&self.grpc_tls_cert, &self.grpc_tls_key) {
            config.grpc_tls = Some(GrpcTlsConfig {
                cert_file: cert_file.clone(),
                key_file: key_file.clone(),
                client_ca_file: self.grpc_client_ca.clone(),
            });
        }
        if let Some(insecure) = self.insecure_plaintext {
            config.insecure_plaintext = insecure;
        }
        if let Some(key_file) = &self.probe_key_file {
            let rotation_secs = self.probe_key_rotation_secs.unwrap_or_else(|| {
                (config.probe_auth.as_ref())
                    .map_or(DEFAULT_PROBE_KEY_ROTATION_SECS, |p| p.rotation_secs)
            });
            config.probe_auth = Some(ProbeAuthConfig {
                key_file: key_file.clone(),
                rotation_secs,
            });
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
        if let Some(auth) = &self.probe_auth
            && auth.rotation_secs < 60
        {
            return Err(ConfigError::Invalid(format!(
                "probeAuth.rotationSecs must be at least 60, got {}",
                auth.rotation_secs
            )));
        }
        if self.grpc_tls.is_none() && !self.insecure_plaintext && !self.grpc_addr.ip().is_loopback()
        {
            return Err(ConfigError::Invalid(format!(
                "the gRPC address {} is reachable from other hosts but has no TLS: set grpcTls \
                 (--grpc-tls-cert, --grpc-tls-key, --grpc-client-ca), or insecurePlaintext: true \
                 (--insecure-plaintext) to serve agents in plain text (docs/security.md)",
                self.grpc_addr
            )));
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
    fn probe_auth_comes_from_the_file_or_the_flag() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("mesh.yaml");
        std::fs::write(
            &path,
            "probeAuth:\n  keyFile: /etc/a\n  rotationSecs: 600\n",
        )
        .unwrap();
        let from_file = MeshArgs {
            config: Some(path.clone()),
            ..MeshArgs::default()
        };
        let auth = from_file.resolve().unwrap().probe_auth.unwrap();
        assert_eq!((auth.key_file, auth.rotation_secs), ("/etc/a".into(), 600));
        let flag = MeshArgs {
            config: Some(path),
            probe_key_file: Some("/etc/b".into()),
            ..MeshArgs::default()
        };
        let auth = flag.resolve().unwrap().probe_auth.unwrap();
        assert_eq!((auth.key_file, auth.rotation_secs), ("/etc/b".into(), 600));
        let only_flag = MeshArgs {
            probe_key_file: Some("/etc/c".into()),
            ..MeshArgs::default()
        };
        let auth = only_flag.resolve().unwrap().probe_auth.unwrap();
        assert_eq!(auth.rotation_secs, DEFAULT_PROBE_KEY_ROTATION_SECS);
        assert_eq!(MeshArgs::default().resolve().unwrap().probe_auth, None);
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

    #[test]
    fn plain_text_on_a_reachable_address_needs_the_explicit_setting() {
        let reachable = Some("0.0.0.0:9400".parse().unwrap());
        let err = MeshArgs {
            grpc_addr: reachable,
            ..MeshArgs::default()
        }
        .resolve()
        .unwrap_err()
        .to_string();
        assert!(err.contains("insecurePlaintext"), "{err}");
        let plain = MeshArgs {
            grpc_addr: reachable,
            insecure_plaintext: Some(true),
            ..MeshArgs::default()
        };
        assert!(plain.resolve().unwrap().insecure_plaintext);
        let tls = MeshArgs {
            grpc_addr: reachable,
            grpc_tls_cert: Some("tls.crt".into()),
            grpc_tls_key: Some("tls.key".into()),
            grpc_client_ca: Some("ca.crt".into()),
            ..MeshArgs::default()
        }
        .resolve()
        .unwrap();
        let files = tls.grpc_tls.unwrap();
        assert_eq!(files.client_ca_file, Some(PathBuf::from("ca.crt")));
        // The default binds loopback, where plain text is allowed.
        let defaults = MeshArgs::default().resolve().unwrap();
        assert!(defaults.grpc_addr.ip().is_loopback() && defaults.http_addr.ip().is_loopback());
    }
}
