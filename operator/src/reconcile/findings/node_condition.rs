//! The opt-in Node condition (`spec.nodeHealth`): server-side applied on
//! `nodes/<name>/status` under the operator's field manager, so it owns that
//! one condition and nothing else of the Node (Node conditions are a list map
//! keyed by type). Written only when it changes.
//!
//! - Which nodes: every node with registered endpoints.
//! - Status: what the caller wants: `False` while an open endpoint or host
//!   root cause names the node, `True` otherwise (see `root_causes`).
//! - Removed again (the operator applies the node's status without it) when
//!   the node no longer has registered endpoints, when `conditionType` changes
//!   (the old type goes, the new one comes), and when `conditions` is turned
//!   off; only from nodes this operator process wrote it on, since it keeps no
//!   record elsewhere. After an operator restart a node's condition is read
//!   back before it is first written.
//! - `lastTransitionTime` moves only when the status flips;
//!   `lastHeartbeatTime` is when the operator last wrote the condition.
//! - A failed read or write ends the pass and pauses the next few
//!   ([`PAUSE_AFTER_FAILURE`]); what was not written is written after.
//! - A pass stops between two nodes once it is cancelled (this replica is
//!   stopping, or lost its leadership).
//! - Not written at all while the mesh controller warms up (see the parent
//!   module): the caller does not call [`NodeConditions::sync`] then.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::{Node, NodeCondition};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::Timestamp;
use kube::Api;
use kube::api::{Patch, PatchParams};
use serde_json::json;
use tokio_util::sync::CancellationToken;

use super::super::metrics::ReconcileMetrics;
use super::super::names::FIELD_MANAGER;

/// What the condition should say on one node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Wanted {
    pub healthy: bool,
    pub reason: String,
    pub message: String,
}

impl Wanted {
    fn status(&self) -> &'static str {
        if self.healthy { "True" } else { "False" }
    }
}

/// The condition as this process last wrote (or read) it on a node.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Written {
    type_: String,
    wanted: Wanted,
    since: Timestamp,
}

/// Passes skipped after a failed read or write, so that a lasting refusal
/// (RBAC without `nodes/status`, an API server in trouble) costs one log line
/// and one request every few windows, not one per node per window.
pub const PAUSE_AFTER_FAILURE: u32 = 6;

/// Keeps the condition on nodes as wanted, writing only what changed.
#[derive(Debug, Default)]
pub struct NodeConditions {
    written: BTreeMap<String, Written>,
    /// Passes left to skip after a failure.
    paused: u32,
}

impl NodeConditions {
    /// Makes `condition_type` say `wanted` on every node listed, and removes
    /// it from nodes it was written on that are not listed. The first failure
    /// is logged and counted and ends the pass; the next
    /// [`PAUSE_AFTER_FAILURE`] passes do nothing, and the one after carries on
    /// where this one stopped. Once `cancel` is cancelled no further node is
    /// read or written.
    pub async fn sync(
        &mut self,
        api: &Api<Node>,
        condition_type: &str,
        wanted: &BTreeMap<String, Wanted>,
        metrics: &ReconcileMetrics,
        cancel: &CancellationToken,
    ) {
        if self.paused > 0 {
            self.paused -= 1;
            return;
        }
        if let Err(failed) = self
            .write_all(api, condition_type, wanted, metrics, cancel)
            .await
        {
            metrics.count_condition_write(false);
            tracing::warn!(node = %failed.node, error = %failed.error, passes = PAUSE_AFTER_FAILURE, "writing the node condition failed; pausing");
            self.paused = PAUSE_AFTER_FAILURE;
        }
    }

    /// Removes the condition from every node it was written on (paused like
    /// [`NodeConditions::sync`] after a failure).
    pub async fn remove_all(
        &mut self,
        api: &Api<Node>,
        metrics: &ReconcileMetrics,
        cancel: &CancellationToken,
    ) {
        if self.written.is_empty() {
            return;
        }
        self.sync(api, "", &BTreeMap::new(), metrics, cancel).await;
    }

    async fn write_all(
        &mut self,
        api: &Api<Node>,
        condition_type: &str,
        wanted: &BTreeMap<String, Wanted>,
        metrics: &ReconcileMetrics,
        cancel: &CancellationToken,
    ) -> Result<(), Failed> {
        let gone: Vec<String> = self
            .written
            .keys()
            .filter(|node| !wanted.contains_key(*node))
            .cloned()
            .collect();
        for node in gone {
            if cancel.is_cancelled() {
                return Ok(());
            }
            apply(api, &node, None).await.map_err(|error| Failed {
                node: node.clone(),
                error,
            })?;
            metrics.count_condition_write(true);
            tracing::info!(node, "node condition removed");
            self.written.remove(&node);
        }
        for (node, want) in wanted {
            if cancel.is_cancelled() {
                return Ok(());
            }
            let failed = |error| Failed {
                node: node.clone(),
                error,
            };
            let previous = match self.written.get(node) {
                Some(w) if w.type_ == condition_type && w.wanted == *want => continue,
                Some(w) if w.type_ == condition_type => Some(w.clone()),
                // Not written by this process (or another type): what is on the node?
                _ => match read(api, node, condition_type).await.map_err(failed)? {
                    Some(on_node) if on_node.wanted == *want => {
                        self.written.insert(node.clone(), on_node);
                        continue;
                    }
                    on_node => on_node,
                },
            };
            let since = previous
                .filter(|w| w.wanted.healthy == want.healthy)
                .map_or_else(Timestamp::now, |w| w.since);
            let written = Written {
                type_: condition_type.to_owned(),
                wanted: want.clone(),
                since,
            };
            if cancel.is_cancelled() {
                return Ok(());
            }
            apply(api, node, Some(&written)).await.map_err(failed)?;
            metrics.count_condition_write(true);
            tracing::info!(node, condition = condition_type, status = want.status(), reason = %want.reason, "node condition written");
            self.written.insert(node.clone(), written);
        }
        Ok(())
    }
}

/// The node a pass stopped at, and why.
struct Failed {
    node: String,
    error: kube::Error,
}

/// The condition of `condition_type` on `node` now; `None` if it has none.
/// A node that is gone has none.
async fn read(
    api: &Api<Node>,
    node: &str,
    condition_type: &str,
) -> Result<Option<Written>, kube::Error> {
    let Some(found) = api.get_opt(node).await? else {
        return Ok(None);
    };
    let condition = found
        .status
        .and_then(|s| s.conditions)
        .unwrap_or_default()
        .into_iter()
        .find(|c| c.type_ == condition_type);
    Ok(condition.map(|c| written_from(condition_type, c)))
}

fn written_from(condition_type: &str, c: NodeCondition) -> Written {
    Written {
        type_: condition_type.to_owned(),
        wanted: Wanted {
            healthy: c.status == "True",
            reason: c.reason.unwrap_or_default(),
            message: c.message.unwrap_or_default(),
        },
        since: c.last_transition_time.map_or_else(Timestamp::now, |t| t.0),
    }
}

/// Server-side applies the operator's part of `node`'s status: `written`, or
/// nothing at all (which removes what the operator wrote before). A node that
/// is gone needs nothing.
async fn apply(api: &Api<Node>, node: &str, written: Option<&Written>) -> Result<(), kube::Error> {
    let mut body = json!({
        "apiVersion": "v1",
        "kind": "Node",
        "metadata": { "name": node },
    });
    if let Some(w) = written {
        body["status"] = json!({
            "conditions": [{
                "type": w.type_,
                "status": w.wanted.status(),
                "reason": w.wanted.reason,
                "message": w.wanted.message,
                "lastTransitionTime": Time(w.since),
                "lastHeartbeatTime": Time(Timestamp::now()),
            }]
        });
    }
    let params = PatchParams::apply(FIELD_MANAGER).force();
    match api.patch_status(node, &params, &Patch::Apply(&body)).await {
        Ok(_) => Ok(()),
        Err(kube::Error::Api(status)) if status.code == 404 => Ok(()),
        Err(e) => Err(e),
    }
}
