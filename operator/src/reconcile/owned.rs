//! Metadata every owned object shares: name, labels, owner reference.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::OwnerReference;
use kube::Resource;
use kube::api::ObjectMeta;

use super::error::BuildError;
use super::names::{MAX_MESH_NAME_LEN, agent_name, owned_labels};
use crate::crd::PingMesh;

/// Where a `PingMesh` lives and what owns its objects.
#[derive(Debug, Clone, PartialEq)]
pub struct MeshIdentity {
    pub name: String,
    pub namespace: String,
    pub owner: OwnerReference,
}

impl MeshIdentity {
    /// Fails for an object that did not come from the API server (no namespace
    /// or uid) and for names too long to become label values.
    pub fn of(pm: &PingMesh) -> Result<Self, BuildError> {
        let name = pm
            .meta()
            .name
            .clone()
            .ok_or(BuildError::MissingMetadata("metadata.name"))?;
        if name.len() > MAX_MESH_NAME_LEN {
            return Err(BuildError::NameTooLong {
                name,
                max: MAX_MESH_NAME_LEN,
            });
        }
        let namespace = pm
            .meta()
            .namespace
            .clone()
            .ok_or(BuildError::MissingMetadata("metadata.namespace"))?;
        // Controller reference: deleting the PingMesh garbage-collects what it owns.
        let owner = pm
            .controller_owner_ref(&())
            .ok_or(BuildError::MissingMetadata("metadata.uid"))?;
        Ok(Self {
            name,
            namespace,
            owner,
        })
    }

    /// Name of the agent `ConfigMap` and `DaemonSet`.
    pub fn agent_name(&self) -> String {
        agent_name(&self.name)
    }

    /// Metadata of an owned object called `name`.
    pub fn owned_meta(&self, name: String) -> ObjectMeta {
        ObjectMeta {
            name: Some(name),
            namespace: Some(self.namespace.clone()),
            labels: Some(owned_labels(&self.name)),
            owner_references: Some(vec![self.owner.clone()]),
            ..ObjectMeta::default()
        }
    }
}
