//! API calls on owned objects: server-side apply under [`FIELD_MANAGER`],
//! listing by label, and finding orphans.

use std::fmt::Debug;

use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams};
use kube::{Resource, ResourceExt};
use serde::Serialize;
use serde::de::DeserializeOwned;

use super::names::FIELD_MANAGER;

/// What an apply did to an object.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Change {
    Created,
    Updated,
    Unchanged,
}

/// Server-side applies `object`, taking over fields other managers set: the
/// operator is the source of truth for what it owns.
pub async fn apply<K>(api: &Api<K>, object: &K) -> Result<K, kube::Error>
where
    K: Resource + Clone + Serialize + DeserializeOwned + Debug,
{
    let params = PatchParams::apply(FIELD_MANAGER).force();
    api.patch(&object.name_any(), &params, &Patch::Apply(object))
        .await
}

/// Objects matching `selector` in the API's namespace.
pub async fn list<K>(api: &Api<K>, selector: &str) -> Result<Vec<K>, kube::Error>
where
    K: Resource + Clone + DeserializeOwned + Debug,
{
    Ok(api
        .list(&ListParams::default().labels(selector))
        .await?
        .items)
}

/// Deletes `name`; an object already gone counts as deleted.
pub async fn delete<K>(api: &Api<K>, name: &str) -> Result<(), kube::Error>
where
    K: Resource + Clone + DeserializeOwned + Debug,
{
    match api.delete(name, &DeleteParams::background()).await {
        Ok(_) => Ok(()),
        Err(kube::Error::Api(status)) if status.code == 404 => Ok(()),
        Err(e) => Err(e),
    }
}

/// Created, updated or untouched, from the object before and after an apply.
pub fn change<K: Resource>(before: Option<&K>, after: &K) -> Change {
    match before {
        None => Change::Created,
        Some(b) if b.meta().resource_version != after.meta().resource_version => Change::Updated,
        Some(_) => Change::Unchanged,
    }
}

/// Names of `owned` objects that the mesh with uid `owner_uid` controls but
/// no longer wants (anything not called `desired`). Objects carrying our
/// labels without our owner reference are left alone: someone else made them.
pub fn orphans<K: Resource>(owned: &[K], desired: &str, owner_uid: &str) -> Vec<String> {
    owned
        .iter()
        .filter(|o| o.meta().name.as_deref() != Some(desired))
        .filter(|o| {
            o.owner_references()
                .iter()
                .any(|r| r.uid == owner_uid && r.controller == Some(true))
        })
        .filter_map(|o| o.meta().name.clone())
        .collect()
}
