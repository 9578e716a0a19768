//! Kubernetes Events on the `PingMesh` (and on Nodes) for what the operator did,
//! could not do, or found.

use k8s_openapi::api::core::v1::ObjectReference;
use kube::Resource;
use kube::runtime::events::{Event, EventType, Recorder};

use crate::crd::PingMesh;

/// Publishes one Event about `pm`, about `related` too when given. Events are
/// a courtesy: a failure is logged and never fails the reconcile.
///
/// The recorder folds Events with the same reason and related object into a
/// series that keeps the first note, so distinct happenings need distinct
/// reasons or related objects.
pub async fn publish(
    recorder: &Recorder,
    pm: &PingMesh,
    type_: EventType,
    reason: &str,
    action: &str,
    note: String,
    related: Option<ObjectReference>,
) {
    publish_about(
        recorder,
        &pm.object_ref(&()),
        type_,
        reason,
        action,
        note,
        related,
    )
    .await;
}

/// Publishes one Event about `regarding`; returns whether the API server took
/// it. A failure is logged, never raised.
pub async fn publish_about(
    recorder: &Recorder,
    regarding: &ObjectReference,
    type_: EventType,
    reason: &str,
    action: &str,
    note: String,
    related: Option<ObjectReference>,
) -> bool {
    let event = Event {
        type_,
        reason: reason.to_owned(),
        note: Some(truncate(note, MAX_NOTE_BYTES)),
        action: action.to_owned(),
        secondary: related,
    };
    match recorder.publish(&event, regarding).await {
        Ok(()) => true,
        Err(e) => {
            tracing::warn!(reason, kind = ?regarding.kind, name = ?regarding.name, error = %e, "publishing an Event failed");
            false
        }
    }
}

/// The API server's limit on an Event's note.
pub const MAX_NOTE_BYTES: usize = 1_024;

/// Cuts `text` to at most `max` bytes on a character boundary.
pub fn truncate(mut text: String, max: usize) -> String {
    if text.len() > max {
        let mut end = max;
        while !text.is_char_boundary(end) {
            end -= 1;
        }
        text.truncate(end);
    }
    text
}
