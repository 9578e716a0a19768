//! The agent `ConfigMap`: the spec's agent-side settings as environment
//! variables (the `DaemonSet` loads it with `envFrom`), and its hash.

use std::collections::BTreeMap;
use std::fmt::Write as _;

use k8s_openapi::api::core::v1::ConfigMap;
use sha2::{Digest, Sha256};

use super::error::BuildError;
use super::owned::MeshIdentity;
use crate::crd::PingMesh;

/// The agent settings a spec implies, keyed by the agent's environment variable.
pub fn agent_config_data(pm: &PingMesh) -> BTreeMap<String, String> {
    let spec = &pm.spec;
    let mut data = BTreeMap::from([
        (
            "PINGMESH_TRANSPORT".to_owned(),
            spec.transport.as_str().to_owned(),
        ),
        (
            "PINGMESH_RDMA_DEVICES".to_owned(),
            spec.rdma.devices.join(","),
        ),
        (
            "PINGMESH_RDMA_TRAFFIC_CLASS".to_owned(),
            spec.rdma.traffic_class.to_string(),
        ),
        (
            "PINGMESH_RDMA_SERVICE_LEVEL".to_owned(),
            spec.rdma.service_level.to_string(),
        ),
        (
            "PINGMESH_TRACING".to_owned(),
            spec.tracing.enabled.to_string(),
        ),
    ]);
    // Absent means "pick the RoCE v2 GID automatically".
    if let Some(index) = spec.rdma.gid_index {
        data.insert("PINGMESH_RDMA_GID_INDEX".to_owned(), index.to_string());
    }
    data
}

/// Short, stable hash of `ConfigMap` data (SHA-256 of the sorted entries, 16 hex digits).
pub fn config_hash(data: &BTreeMap<String, String>) -> String {
    let mut hasher = Sha256::new();
    for (key, value) in data {
        // Length prefixes keep ("ab", "c") and ("a", "bc") apart.
        hasher.update((key.len() as u64).to_be_bytes());
        hasher.update(key.as_bytes());
        hasher.update((value.len() as u64).to_be_bytes());
        hasher.update(value.as_bytes());
    }
    hasher.finalize()[..8]
        .iter()
        .fold(String::with_capacity(16), |mut hex, byte| {
            let _ = write!(hex, "{byte:02x}");
            hex
        })
}

/// The agent `ConfigMap` of a mesh.
pub fn desired_configmap(pm: &PingMesh) -> Result<ConfigMap, BuildError> {
    let mesh = MeshIdentity::of(pm)?;
    Ok(ConfigMap {
        metadata: mesh.owned_meta(mesh.agent_name()),
        data: Some(agent_config_data(pm)),
        ..ConfigMap::default()
    })
}
