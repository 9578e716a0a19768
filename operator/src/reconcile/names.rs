//! Names, labels and annotations of the objects the operator owns.

use std::collections::BTreeMap;

/// The one field manager of every server-side apply the operator makes, so
/// field ownership stays with one name across versions and replicas.
pub const FIELD_MANAGER: &str = "pingmesh-operator";
/// Pod-template annotation with the hash of the agent `ConfigMap`'s data: a
/// config change changes the template, so the `DaemonSet` rolls its agents.
pub const CONFIG_HASH_ANNOTATION: &str = "pingmesh.io/config-hash";
/// Label naming the `PingMesh` an object belongs to.
pub const MESH_LABEL: &str = "pingmesh.io/mesh";
/// Standard label naming the tool that manages an object.
pub const MANAGED_BY_LABEL: &str = "app.kubernetes.io/managed-by";
/// Node label no node carries: a paused mesh selects it, so no agent runs.
pub const PAUSED_NODE_SELECTOR: (&str, &str) = ("pingmesh.io/paused", "match-no-node");
/// Longest `PingMesh` name: it becomes a label value (at most 63 characters)
/// and, with `-agent`, the `DaemonSet` name.
pub const MAX_MESH_NAME_LEN: usize = 57;

/// Name of the agent `ConfigMap` and `DaemonSet` of a mesh.
pub fn agent_name(mesh: &str) -> String {
    format!("{mesh}-agent")
}

/// Labels of the agent pods that the `DaemonSet` selects on (immutable once created).
pub fn selector_labels(mesh: &str) -> BTreeMap<String, String> {
    BTreeMap::from([
        (
            "app.kubernetes.io/name".to_owned(),
            "pingmesh-agent".to_owned(),
        ),
        ("app.kubernetes.io/instance".to_owned(), mesh.to_owned()),
    ])
}

/// Labels of every object the operator owns for `mesh`.
pub fn owned_labels(mesh: &str) -> BTreeMap<String, String> {
    let mut labels = selector_labels(mesh);
    labels.insert("app.kubernetes.io/component".to_owned(), "agent".to_owned());
    labels.insert(MANAGED_BY_LABEL.to_owned(), FIELD_MANAGER.to_owned());
    labels.insert(MESH_LABEL.to_owned(), mesh.to_owned());
    labels
}

/// Label selector of every object the operator manages (for its watches).
pub fn managed_selector() -> String {
    format!("{MANAGED_BY_LABEL}={FIELD_MANAGER}")
}

/// Label selector of the objects owned for `mesh`.
pub fn owned_selector(mesh: &str) -> String {
    format!("{MANAGED_BY_LABEL}={FIELD_MANAGER},{MESH_LABEL}={mesh}")
}
