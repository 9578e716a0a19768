//! Events on the workloads open root causes hit: when a root cause starts to
//! hit a service (its traced connections cross the cause, see
//! [`crate::mesh::services::impact`]), the workload that owns the service's
//! pods (the `Job`, `StatefulSet`, ... or the bare `Pod`) gets one `Warning`
//! Event `RootCauseHitsService`, with the `PingMesh` as related object, so
//! that `kubectl describe job train` shows what the network does to it.
//!
//! One Event per (service, root cause) while the cause stays open and keeps
//! hitting the service; a pair that stops (the cause cleared, the service's
//! connections moved away) is forgotten and announced again if it comes
//! back. No Event when it stops: the root cause's own `RootCauseCleared`
//! says so. Services outside pods (`Process/...`) and pods the operator does
//! not know yet (`PodUID/...`) have no object to carry an Event; they show in
//! the `PingMesh` status and the mesh API only.
//!
//! Bounded like the root-cause Events: at most [`MAX_ANNOUNCED`] pairs per
//! pass get their own Event (most confident cause first, then most affected
//! service); the rest are counted in one `ManyServicesHit` Event on the
//! `PingMesh`, and not announced later. Refused Events are tried again like
//! every other (see the parent module).

use std::collections::BTreeSet;

use k8s_openapi::api::core::v1::ObjectReference;
use kube::runtime::events::EventType;
use tokio_util::sync::CancellationToken;

use super::super::events::{MAX_NOTE_BYTES, truncate};
use super::super::metrics::EventObject;
use super::root_causes::{CauseKey, key};
use super::{EVENT_RETRIES, FindingsPublisher, FindingsView, MAX_ANNOUNCED, PendingEvent};
use crate::mesh::localize::{OpenRootCause, RootCause};
use crate::mesh::services::ImpactedService;
use crate::mesh::services::identity::POD_KIND;
use crate::mesh::services::impact::ServiceImpact;

/// Event reason on a workload when a root cause starts to hit its service.
pub const SERVICE_HIT_REASON: &str = "RootCauseHitsService";
/// Event reason on the `PingMesh` for pairs past the per-pass bound.
pub const MANY_SERVICES_HIT_REASON: &str = "ManyServicesHit";

/// A service (its id, `Job/ml/train`) and a root cause hitting it.
pub type ServiceHitKey = (String, CauseKey);

/// One (service, root cause) pair with the object its Event goes to.
#[derive(Debug, Clone, PartialEq)]
pub struct ServiceHit {
    pub key: ServiceHitKey,
    pub regarding: ObjectReference,
    pub note: String,
}

/// The pairs of open root causes and the services they hit that have an
/// object to carry an Event: most confident cause first, each cause's most
/// affected services first. `impact` may be a window older or newer than
/// `causes`; only causes in both count.
pub fn service_hits(causes: &[OpenRootCause], impact: &ServiceImpact) -> Vec<ServiceHit> {
    let mut hits = Vec::new();
    for open in causes {
        let Some(hit) = impact.of_cause(&open.cause) else {
            continue;
        };
        for service in &hit.services {
            let Some(regarding) = object_of(service) else {
                continue;
            };
            hits.push(ServiceHit {
                key: (service.service.clone(), key(&open.cause)),
                regarding,
                note: hit_note(&open.cause, service),
            });
        }
    }
    hits
}

/// The object a service's Events go to: its pods' owner, or the bare pod.
fn object_of(service: &ImpactedService) -> Option<ObjectReference> {
    let namespace = &service.name.namespace;
    if namespace.is_empty() {
        return None;
    }
    match &service.workload {
        Some(w) => Some(ObjectReference {
            api_version: Some(w.api_version.clone()),
            kind: Some(w.kind.clone()),
            name: Some(w.name.clone()),
            namespace: Some(namespace.clone()),
            uid: (!w.uid.is_empty()).then(|| w.uid.clone()),
            ..ObjectReference::default()
        }),
        None if service.name.kind == POD_KIND => Some(ObjectReference {
            api_version: Some("v1".to_owned()),
            kind: Some(POD_KIND.to_owned()),
            name: Some(service.name.name.clone()),
            namespace: Some(namespace.clone()),
            ..ObjectReference::default()
        }),
        None => None,
    }
}

/// "host h31 (loss, confidence 0.91) hits 5 connections of 2 pods of
/// Job/ml/train: h11/udp0 -> h31/udp0, ...; <the cause's summary>".
pub fn hit_note(cause: &RootCause, service: &ImpactedService) -> String {
    let plural = |n: u64, one: &str, many: &str| format!("{n} {}", if n == 1 { one } else { many });
    let paths = if service.paths.is_empty() {
        String::new()
    } else {
        format!(": {}", service.paths.join(", "))
    };
    truncate(
        format!(
            "{} {} ({}, confidence {:.2}) hits {} of {} of {}{paths}; {}",
            cause.kind.label(),
            cause.component,
            cause.signal.label(),
            cause.confidence,
            plural(service.flows, "connection", "connections"),
            plural(service.pods, "pod", "pods"),
            service.service,
            cause.summary
        ),
        MAX_NOTE_BYTES,
    )
}

/// Which pairs to announce this pass: `(individually, counted)`, at most
/// [`MAX_ANNOUNCED`] individually. `announced` learns every new pair and
/// forgets pairs no longer in `hits`.
pub fn to_announce(
    hits: Vec<ServiceHit>,
    announced: &mut BTreeSet<ServiceHitKey>,
) -> (Vec<ServiceHit>, usize) {
    let current: BTreeSet<&ServiceHitKey> = hits.iter().map(|h| &h.key).collect();
    announced.retain(|k| current.contains(k));
    let mut individually = Vec::new();
    let mut counted = 0;
    for hit in hits {
        if !announced.insert(hit.key.clone()) {
            continue;
        }
        if individually.len() < MAX_ANNOUNCED {
            individually.push(hit);
        } else {
            counted += 1;
        }
    }
    (individually, counted)
}

impl FindingsPublisher {
    /// Events for the (service, root cause) pairs that started this pass.
    pub(super) async fn announce_services(
        &mut self,
        view: &FindingsView,
        mesh: Option<&ObjectReference>,
        cancel: &CancellationToken,
    ) {
        let hits = service_hits(&view.root_causes, &view.service_impact);
        let (individually, counted) = to_announce(hits, &mut self.announced_services);
        for hit in individually {
            if cancel.is_cancelled() {
                return;
            }
            self.send(PendingEvent {
                regarding: hit.regarding,
                object: EventObject::Workload,
                type_: EventType::Warning,
                reason: SERVICE_HIT_REASON.to_owned(),
                note: hit.note,
                related: mesh.cloned(),
                retries_left: EVENT_RETRIES,
            })
            .await;
        }
        if counted > 0 {
            let note = format!(
                "root causes started to hit {counted} more services in this window; the PingMesh status and the mesh API (/api/v1/services) list them"
            );
            self.publish(
                mesh,
                &[],
                EventType::Warning,
                MANY_SERVICES_HIT_REASON,
                &note,
                cancel,
            )
            .await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::mesh::localize::{CauseEvidence, CauseKind, Signal};
    use crate::mesh::services::identity::{PROCESS_KIND, ServiceName, WorkloadRef};
    use crate::mesh::services::impact::CauseImpact;

    fn cause(component: &str) -> OpenRootCause {
        OpenRootCause {
            cause: RootCause {
                kind: CauseKind::Host,
                component: component.to_owned(),
                side: None,
                signal: Signal::Loss,
                node: Some(component.to_owned()),
                tor: None,
                confidence: 0.912,
                evidence: CauseEvidence::default(),
                candidates: Vec::new(),
                explains: Vec::new(),
                summary: format!("host {component} both ways: 4 of 4 paths losing"),
            },
            opened_at_window_ms: 0,
            first_window_ms: 0,
            last_window_ms: 0,
            cleared_at_window_ms: None,
        }
    }

    fn job(name: &str, flows: u64) -> ImpactedService {
        ImpactedService {
            service: format!("Job/ml/{name}"),
            name: ServiceName {
                kind: "Job".into(),
                namespace: "ml".into(),
                name: name.into(),
            },
            flows,
            pods: 2,
            workload: Some(WorkloadRef {
                api_version: "batch/v1".into(),
                kind: "Job".into(),
                name: name.into(),
                uid: format!("uid-{name}"),
            }),
            paths: vec!["h11/udp0 -> h31/udp0".into()],
            hit_by: Vec::new(),
        }
    }

    fn process(command: &str) -> ImpactedService {
        ImpactedService {
            service: format!("{PROCESS_KIND}/{command}"),
            name: ServiceName {
                kind: PROCESS_KIND.into(),
                namespace: String::new(),
                name: command.into(),
            },
            workload: None,
            ..job(command, 1)
        }
    }

    fn bare_pod(name: &str) -> ImpactedService {
        ImpactedService {
            service: format!("Pod/ml/{name}"),
            name: ServiceName {
                kind: POD_KIND.into(),
                namespace: "ml".into(),
                name: name.into(),
            },
            workload: None,
            ..job(name, 1)
        }
    }

    fn impact(per_cause: Vec<(&OpenRootCause, Vec<ImpactedService>)>) -> ServiceImpact {
        ServiceImpact {
            root_causes: per_cause
                .into_iter()
                .map(|(c, services)| CauseImpact {
                    kind: c.cause.kind,
                    signal: c.cause.signal,
                    component: c.cause.component.clone(),
                    service_count: services.len(),
                    services,
                })
                .collect(),
            ..ServiceImpact::default()
        }
    }

    fn regarding(hit: &ServiceHit) -> (String, String, String, String) {
        let r = &hit.regarding;
        (
            r.kind.clone().unwrap_or_default(),
            r.namespace.clone().unwrap_or_default(),
            r.name.clone().unwrap_or_default(),
            r.uid.clone().unwrap_or_default(),
        )
    }

    #[test]
    fn a_root_cause_hitting_services_gives_one_event_per_owned_service_on_its_owner() {
        let h31 = cause("h31");
        let services = vec![job("train", 5), process("ib_write_bw"), bare_pod("debug")];
        let hits = service_hits(std::slice::from_ref(&h31), &impact(vec![(&h31, services)]));
        let on: Vec<_> = hits.iter().map(regarding).collect();
        assert_eq!(
            on,
            [
                (
                    "Job".into(),
                    "ml".into(),
                    "train".into(),
                    "uid-train".into()
                ),
                ("Pod".into(), "ml".into(), "debug".into(), String::new()),
            ],
            "processes outside pods have no object to carry an Event"
        );
        assert_eq!(hits[0].regarding.api_version.as_deref(), Some("batch/v1"));
        assert_eq!(
            hits[0].note,
            "host h31 (loss, confidence 0.91) hits 5 connections of 2 pods of Job/ml/train: \
             h11/udp0 -> h31/udp0; host h31 both ways: 4 of 4 paths losing"
        );
    }

    #[test]
    fn a_pair_is_announced_once_while_it_lasts_and_again_after_it_stopped() {
        let h31 = cause("h31");
        let tor = cause("h21");
        let mut announced = BTreeSet::new();
        let both = impact(vec![
            (&h31, vec![job("train", 5)]),
            (&tor, vec![job("train", 5), job("store", 3)]),
        ]);
        let causes = [h31.clone(), tor.clone()];
        let (first, counted) = to_announce(service_hits(&causes, &both), &mut announced);
        assert_eq!(first.len(), 3);
        assert_eq!(counted, 0);
        let (again, _) = to_announce(service_hits(&causes, &both), &mut announced);
        assert!(again.is_empty(), "nothing new while the same pairs last");

        // h31 clears; then it opens again and hits train again.
        let only_tor = impact(vec![(&tor, vec![job("train", 5), job("store", 3)])]);
        let (none, _) = to_announce(
            service_hits(std::slice::from_ref(&tor), &only_tor),
            &mut announced,
        );
        assert!(none.is_empty());
        let (back, _) = to_announce(service_hits(&causes, &both), &mut announced);
        let keys: Vec<_> = back
            .iter()
            .map(|h| (h.key.0.as_str(), h.key.1.2.as_str()))
            .collect();
        assert_eq!(keys, [("Job/ml/train", "h31")]);
    }

    #[test]
    fn an_impact_of_a_cause_no_longer_open_announces_nothing() {
        let h31 = cause("h31");
        let stale = impact(vec![(&h31, vec![job("train", 5)])]);
        assert!(service_hits(&[cause("h12")], &stale).is_empty());
    }

    #[test]
    fn a_burst_is_announced_up_to_the_bound_and_the_rest_counted_once() {
        let h31 = cause("h31");
        let many: Vec<ImpactedService> = (0..MAX_ANNOUNCED + 7)
            .map(|i| job(&format!("j{i}"), 100 - i as u64))
            .collect();
        let all = impact(vec![(&h31, many)]);
        let causes = [h31];
        let mut announced = BTreeSet::new();
        let (first, counted) = to_announce(service_hits(&causes, &all), &mut announced);
        assert_eq!((first.len(), counted), (MAX_ANNOUNCED, 7));
        assert_eq!(first[0].key.0, "Job/ml/j0", "most affected first");
        let (later, counted) = to_announce(service_hits(&causes, &all), &mut announced);
        assert_eq!(
            (later.len(), counted),
            (0, 0),
            "counted pairs are not announced later"
        );
    }

    #[test]
    fn notes_stay_within_the_api_servers_bound() {
        let mut c = cause("h31").cause;
        c.summary = "x".repeat(4 * MAX_NOTE_BYTES);
        assert!(hit_note(&c, &job("train", 1)).len() <= MAX_NOTE_BYTES);
    }
}
