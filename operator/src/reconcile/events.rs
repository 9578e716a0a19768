//! Kubernetes Events on the `PingMesh` for what the operator did or could not do.

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
    let event = Event {
        type_,
        reason: reason.to_owned(),
        note: Some(truncate(note, 1_024)),
        action: action.to_owned(),
        secondary: related,
    };
    if let Err(e) = recorder.publish(&event, &pm.object_ref(&())).await {
        tracing::warn!(reason, error = %e, "publishing an Event failed");
    }
}

/// Cuts `text` to at most `max` bytes on a character boundary (the API's limit on notes).
fn truncate(mut text: String, max: usize) -> String {
    if text.len() > max {
        let mut end = max;
        while !text.is_char_boundary(end) {
            end -= 1;
        }
        text.truncate(end);
    }
    text
}
