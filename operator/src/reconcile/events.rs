//! Kubernetes Events on the `PingMesh` (and on Nodes) for what the operator did,
//! could not do, or found.

use std::sync::atomic::{AtomicU32, Ordering};

use k8s_openapi::api::core::v1::ObjectReference;
use k8s_openapi::api::events::v1::Event as K8sEvent;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta};
use k8s_openapi::jiff::Timestamp;
use kube::api::PostParams;
use kube::runtime::events::{Event, EventType, Recorder, Reporter};
use kube::{Api, Client, Resource};

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
        note: Some(truncate(note, MAX_NOTE_BYTES)),
        action: action.to_owned(),
        secondary: related,
    };
    let regarding = pm.object_ref(&());
    if let Err(e) = recorder.publish(&event, &regarding).await {
        tracing::warn!(reason, kind = ?regarding.kind, name = ?regarding.name, error = %e, "publishing an Event failed");
    }
}

/// Creates one new `events.k8s.io/v1` Event about `regarding` under a name
/// of its own; returns whether the API server took it. A failure is logged,
/// never raised.
///
/// Unlike [`Recorder::publish`] it never folds the Event into an earlier one:
/// the recorder turns Events with the same type, reason, regarding and
/// related object into one series that keeps the first note, so distinct
/// findings of one kind would show as one Event with a count.
pub async fn create_event(
    client: &Client,
    reporter: &Reporter,
    regarding: &ObjectReference,
    event: &Event,
) -> bool {
    let namespace = regarding.namespace.as_deref().unwrap_or("default");
    let now = Timestamp::now();
    let base = regarding
        .name
        .as_deref()
        .unwrap_or(reporter.controller.as_str());
    // Unique within this process even for Events created in one nanosecond
    // (or one microsecond, where the clock is that coarse).
    let seq = NEXT_EVENT.fetch_add(1, Ordering::Relaxed) & 0xffff;
    let object = K8sEvent {
        metadata: ObjectMeta {
            name: Some(format!("{base}.{:x}{seq:04x}", now.as_nanosecond())),
            namespace: Some(namespace.to_owned()),
            ..ObjectMeta::default()
        },
        action: Some(event.action.clone()),
        reason: Some(event.reason.clone()),
        note: event.note.clone().map(|n| truncate(n, MAX_NOTE_BYTES)),
        event_time: Some(MicroTime(now)),
        regarding: Some(regarding.clone()),
        related: event.secondary.clone(),
        reporting_controller: Some(reporter.controller.clone()),
        reporting_instance: Some(
            reporter
                .instance
                .clone()
                .unwrap_or_else(|| reporter.controller.clone()),
        ),
        type_: Some(
            match event.type_ {
                EventType::Normal => "Normal",
                EventType::Warning => "Warning",
            }
            .to_owned(),
        ),
        ..K8sEvent::default()
    };
    let api: Api<K8sEvent> = Api::namespaced(client.clone(), namespace);
    match api.create(&PostParams::default(), &object).await {
        Ok(_) => true,
        Err(e) => {
            tracing::warn!(reason = %event.reason, kind = ?regarding.kind, name = ?regarding.name, error = %e, "publishing an Event failed");
            false
        }
    }
}

/// Makes the names [`create_event`] gives unique within this process.
static NEXT_EVENT: AtomicU32 = AtomicU32::new(0);

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
