//! One reconcile, in order: list owned objects (to tell created from updated
//! and to find orphans), ask the mesh controller for its numbers, validate the
//! spec (invalid: report `Degraded`, apply nothing), apply the `ConfigMap` and
//! the `DaemonSet` (paused: the `DaemonSet` only, scaled to no node), delete
//! orphans, hand the probing and SLA settings to the mesh controller, write
//! the status when it changed.

use k8s_openapi::api::apps::v1::DaemonSet;
use k8s_openapi::api::core::v1::ConfigMap;
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, Patch, PatchParams};
use kube::runtime::events::EventType;
use kube::{Resource, ResourceExt};

use super::apply::{self, Change, change, orphans};
use super::conditions::{DEGRADED, Judged, merge};
use super::configmap::desired_configmap;
use super::daemonset::desired_daemonset;
use super::error::ReconcileError;
use super::mesh_status::PolicyState;
use super::metrics::Outcome;
use super::names::{CONFIG_HASH_ANNOTATION, FIELD_MANAGER, owned_selector};
use super::owned::MeshIdentity;
use super::status::{Observation, Problem, desired_status};
use super::{Context, object_key};
use crate::crd::{PingMesh, PingMeshStatus};

pub(super) async fn reconcile_mesh(
    pm: &PingMesh,
    ctx: &Context,
) -> Result<Outcome, ReconcileError> {
    let mesh = MeshIdentity::of(pm)?;
    let configmaps: Api<ConfigMap> = Api::namespaced(ctx.client.clone(), &mesh.namespace);
    let daemonsets: Api<DaemonSet> = Api::namespaced(ctx.client.clone(), &mesh.namespace);
    let selector = owned_selector(&mesh.name);
    let list_error = |kind: &'static str| {
        let mesh = mesh.name.clone();
        move |source| ReconcileError::List { kind, mesh, source }
    };
    let owned_cms = apply::list(&configmaps, &selector)
        .await
        .map_err(list_error("ConfigMap"))?;
    let owned_dss = apply::list(&daemonsets, &selector)
        .await
        .map_err(list_error("DaemonSet"))?;
    let mesh_status = ctx.mesh.mesh_status().await;
    let name = mesh.agent_name();
    let existing_ds = owned_dss.iter().find(|d| d.name_any() == name);

    if let Err(invalid) = pm.spec.validate() {
        let problem = Problem::InvalidSpec(invalid.to_string());
        let seen = Observation {
            daemonset: existing_ds,
            mesh: &mesh_status,
            problem: Some(&problem),
            policy: &PolicyState::NotHosted,
        };
        let status = desired_status(pm, seen, Timestamp::now());
        // Once per new problem, not once per resync.
        if pm.status.as_ref().map(|s| &s.conditions) != Some(&status.conditions) {
            ctx.event(pm, EventType::Warning, "InvalidSpec", invalid.to_string())
                .await;
        }
        write_status(pm, ctx, status).await?;
        return Ok(Outcome::InvalidSpec);
    }

    let desired_ds = desired_daemonset(pm, &ctx.settings)?;
    if !pm.spec.paused {
        let desired_cm = desired_configmap(pm)?;
        let before = owned_cms.iter().find(|c| c.name_any() == name);
        let applied = apply::apply(&configmaps, &desired_cm)
            .await
            .map_err(|source| ReconcileError::Apply {
                kind: "ConfigMap",
                name: name.clone(),
                source,
            })?;
        announce(ctx, pm, &applied, change(before, &applied), String::new()).await;
    }
    let applied_ds = apply::apply(&daemonsets, &desired_ds)
        .await
        .map_err(|source| ReconcileError::Apply {
            kind: "DaemonSet",
            name: name.clone(),
            source,
        })?;
    let ds_change = change(existing_ds, &applied_ds);
    if pm.spec.paused && ds_change != Change::Unchanged {
        let note = format!("spec.paused is true: DaemonSet {name} now selects no node");
        ctx.event_about(pm, "Paused", note, &applied_ds).await;
    } else {
        let detail = hash_change(existing_ds, &applied_ds);
        announce(ctx, pm, &applied_ds, ds_change, detail).await;
    }

    if !pm.spec.paused {
        delete_orphans(ctx, pm, &configmaps, &owned_cms, &mesh, "ConfigMap").await?;
        delete_orphans(ctx, pm, &daemonsets, &owned_dss, &mesh, "DaemonSet").await?;
    }

    let policy = ctx.mesh.sync_policy(pm);
    if policy == PolicyState::Restarting {
        ctx.event(
            pm,
            EventType::Normal,
            "RestartingMeshController",
            "spec.probing or spec.sla changed: the mesh controller restarts with them".to_owned(),
        )
        .await;
    }
    let seen = Observation {
        daemonset: Some(&applied_ds),
        mesh: &mesh_status,
        problem: None,
        policy: &policy,
    };
    write_status(pm, ctx, desired_status(pm, seen, Timestamp::now())).await?;
    Ok(Outcome::Ok)
}

/// ": agent config changed (hash a -> b), agents roll" when the template's hash moved.
fn hash_change(before: Option<&DaemonSet>, after: &DaemonSet) -> String {
    let hash = |ds: &DaemonSet| {
        ds.spec
            .as_ref()
            .and_then(|s| s.template.metadata.as_ref())
            .and_then(|m| m.annotations.as_ref())
            .and_then(|a| a.get(CONFIG_HASH_ANNOTATION).cloned())
    };
    match (before.and_then(hash), hash(after)) {
        (Some(old), Some(new)) if old != new => {
            format!(": agent config changed (hash {old} -> {new}), agents roll")
        }
        _ => String::new(),
    }
}

/// Logs and publishes a create or update; `detail` set means the agents roll.
async fn announce<K: Resource<DynamicType = ()>>(
    ctx: &Context,
    pm: &PingMesh,
    object: &K,
    what: Change,
    detail: String,
) {
    let (reason, verb) = match what {
        Change::Created => ("Created", "created"),
        Change::Updated if !detail.is_empty() => ("AgentsRolling", "updated"),
        Change::Updated => ("Updated", "updated"),
        Change::Unchanged => return,
    };
    let kind = K::kind(&());
    let name = object.name_any();
    tracing::info!(mesh = %object_key(pm), %kind, %name, verb, "applied");
    ctx.event_about(pm, reason, format!("{verb} {kind} {name}{detail}"), object)
        .await;
}

async fn delete_orphans<K>(
    ctx: &Context,
    pm: &PingMesh,
    api: &Api<K>,
    owned: &[K],
    mesh: &MeshIdentity,
    kind: &'static str,
) -> Result<(), ReconcileError>
where
    K: Resource<DynamicType = ()> + Clone + serde::de::DeserializeOwned + std::fmt::Debug,
{
    for name in orphans(owned, &mesh.agent_name(), &mesh.owner.uid) {
        apply::delete(api, &name)
            .await
            .map_err(|source| ReconcileError::Delete {
                kind,
                name: name.clone(),
                source,
            })?;
        tracing::info!(mesh = %object_key(pm), kind, name, "deleted orphan");
        let note = format!("deleted {kind} {name}, which this mesh no longer uses");
        if let Some(object) = owned
            .iter()
            .find(|o| o.meta().name.as_deref() == Some(name.as_str()))
        {
            ctx.event_about(pm, "DeletedOrphan", note, object).await;
        }
    }
    Ok(())
}

/// Server-side applies the status subresource, unless nothing changed (a
/// status write would only wake the controller again).
async fn write_status(
    pm: &PingMesh,
    ctx: &Context,
    status: PingMeshStatus,
) -> Result<(), ReconcileError> {
    if pm.status.as_ref() == Some(&status) {
        return Ok(());
    }
    let name = pm.name_any();
    let api: Api<PingMesh> =
        Api::namespaced(ctx.client.clone(), &pm.namespace().unwrap_or_default());
    let body = serde_json::json!({
        "apiVersion": PingMesh::api_version(&()),
        "kind": PingMesh::kind(&()),
        "status": status,
    });
    let params = PatchParams::apply(FIELD_MANAGER).force();
    api.patch_status(&name, &params, &Patch::Apply(&body))
        .await
        .map_err(|source| ReconcileError::Status { name, source })?;
    Ok(())
}

/// Best effort after a failed reconcile: a Warning Event and `Degraded=True`
/// with the error, the rest of the status left as it was.
pub(super) async fn report_failure(pm: &PingMesh, ctx: &Context, error: &ReconcileError) {
    let message = format!("{}: {error}", error.category());
    ctx.event(pm, EventType::Warning, "ReconcileFailed", message.clone())
        .await;
    let mut status = pm.status.clone().unwrap_or_default();
    let judged = [Judged::new(DEGRADED, true, "ApplyFailed", message)];
    status.conditions = merge(
        &status.conditions,
        &judged,
        pm.metadata.generation,
        Timestamp::now(),
    );
    if let Err(e) = write_status(pm, ctx, status).await {
        tracing::debug!(error = %e, "could not record the failure in status");
    }
}
