//! What the operator does with the hosted mesh controller's findings and
//! root causes besides the `PingMesh` status: Kubernetes Events, and the
//! opt-in Node condition.
//!
//! Once per judged window the publisher compares the open root causes and
//! findings with the ones it announced before:
//!
//! - a root cause (a localized fault: an endpoint, host, ToR, link or switch,
//!   see [`crate::mesh::localize`]) it has not announced gets a `Warning`
//!   Event `RootCauseLocalized` on the policy-source `PingMesh`, and for
//!   endpoint and host causes on the Node too; its note names the component,
//!   kind, signal and confidence and summarizes the SLA findings it explains.
//!   An announced one no longer open gets a `Normal` `RootCauseCleared`;
//! - an SLA finding that an open root cause explains gets no Event of its
//!   own: one Event per root cause, not one per path;
//! - any other finding it has not announced, once it has been open for
//!   [`HOLD_WINDOWS`] windows without a root cause explaining it (the
//!   localizer may name the cause a window or two after the finding opens),
//!   gets a `Warning` Event `<Kind>Detected` (`PathLossDetected`, `PathLatencyDetected`,
//!   `TorPairLossDetected`, `TorPairLatencyDetected`) on the `PingMesh`, and an
//!   announced one no longer open gets a `Normal` `<Kind>Cleared`; path
//!   findings get the same Event on the Nodes at both ends (the other end as
//!   the related object). ToR-pair findings get none on Nodes. A finding left
//!   unannounced because a root cause explained it is announced once no open
//!   root cause explains it any more.
//!
//! So a root cause or finding is announced once when it opens and once when it
//! clears, however long it stays open. At most [`MAX_ANNOUNCED`] root causes
//! and findings opening (and as many clearing) get their own Events per
//! window, root causes first; the rest are counted in one
//! `ManyFindingsDetected` / `ManyFindingsCleared` Event, and their clearing is
//! not announced either. What opens and clears between two looks (a stalled
//! API server) goes unannounced; what is open when the mesh controller
//! restarts with new settings is announced as cleared and, if the fault
//! persists, again when it reopens.
//!
//! Every Event is a new Event object with a name of its own, carrying its own
//! note: kube's event recorder would fold Events with the same type, reason
//! and objects into one series that keeps the first note, so twenty findings
//! of one kind would show as one Event with a count of 20. The publisher does
//! its own deduplication. An Event the API server refused is tried again on
//! each of the next [`EVENT_RETRIES`] passes (at most [`MAX_UNPUBLISHED`] wait).
//!
//! The Node condition follows the open endpoint and host root causes (see
//! [`root_causes`]). It is left alone until the mesh controller serving now
//! has judged one window with path data more than its SLA policy's
//! `openAfterWindows` (see [`MeshController::windows_with_data`]): a
//! restarted controller (a new leader, or new settings) starts with no open
//! root causes, and writing conditions at once would mark every node healthy,
//! a faulty one included, until its root cause opened again.

mod node_condition;
mod root_causes;
mod services;

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::api::core::v1::{Node, ObjectReference};
use kube::runtime::events::{Event, EventType, Reporter};
use kube::runtime::reflector::{ObjectRef, Store};
use kube::{Api, Client};
use tokio_util::sync::CancellationToken;

use super::events::create_event;
use super::mesh_host::{MeshHost, SourceSettings};
use super::metrics::{EventObject, ReconcileMetrics};
use super::names::FIELD_MANAGER;
use super::nodes::NodeMeta;
use crate::mesh::analyzer::{ClearReason, Finding, FindingKind};
use crate::mesh::controller::MeshController;
use crate::mesh::localize::{OpenRootCause, RootCause};
use crate::mesh::services::impact::ServiceImpact;
use crate::mesh::types::MeshEndpoint;

pub use node_condition::{NodeConditions, PAUSE_AFTER_FAILURE, Wanted};
pub use root_causes::{
    CLEARED_REASON as ROOT_CAUSE_CLEARED_REASON, CauseKey, LOCALIZED_REASON as ROOT_CAUSE_REASON,
    NOT_LOCALIZED_REASON as NO_ROOT_CAUSE_REASON, faulty_nodes, wanted_conditions,
};
pub use services::{MANY_SERVICES_HIT_REASON, SERVICE_HIT_REASON};

/// Most root causes and findings opening (and, separately, clearing)
/// announced one by one per pass.
pub const MAX_ANNOUNCED: usize = 20;

/// Windows a new finding that no root cause explains waits for one before it
/// gets Events of its own: localization weighs the last few windows together
/// and may name the cause a window or two after the SLA finding opened (a
/// finding stays open at least `clearAfterWindows`, 3 by default, so one
/// still unexplained is announced before it can clear).
pub const HOLD_WINDOWS: u32 = 2;

/// The Event action of everything published here.
const ACTION: &str = "Analyze";

/// Passes on which an Event the API server refused is tried again.
pub const EVENT_RETRIES: u32 = 3;
/// Most refused Events kept for another try; the oldest are dropped first.
pub const MAX_UNPUBLISHED: usize = 256;

/// What the publisher reads from the mesh controller in one pass.
#[derive(Debug, Clone, Default)]
pub struct FindingsView {
    pub open: Vec<Finding>,
    /// Findings the last judged window closed, for the reason in `Cleared` Events.
    pub cleared: Vec<Finding>,
    /// Open root causes, most confident first.
    pub root_causes: Vec<OpenRootCause>,
    /// Root causes the last judged window closed, for the note of their
    /// `RootCauseCleared` Events.
    pub cleared_root_causes: Vec<OpenRootCause>,
    /// Every registered endpoint: which node and ToR each is on.
    pub endpoints: Vec<MeshEndpoint>,
    /// Start (Unix ms) of the last judged window, and the window length:
    /// how long a new finding has been open. `None`: not known, and new
    /// findings are not held back (see [`HOLD_WINDOWS`]).
    pub judged_window: Option<(u64, u32)>,
    /// Whether the controller has judged enough windows since it started that
    /// a fault that persists would have opened its root cause again: until
    /// then an empty `root_causes` says nothing, and Node conditions are not
    /// written.
    pub conditions_ready: bool,
    /// The services open root causes hit, for the Events on their workloads.
    pub service_impact: Arc<ServiceImpact>,
}

impl FindingsView {
    pub fn of(controller: &MeshController) -> Self {
        // One more than it takes to open a finding or root cause: agents
        // reconnecting to a new controller may probe the first window with
        // data only in part.
        let needed = u64::from(controller.config().sla.open_after_windows) + 1;
        let last = controller.last_report();
        Self {
            open: controller.open_findings(),
            cleared: last.as_ref().map(|r| r.cleared.clone()).unwrap_or_default(),
            root_causes: controller.open_root_causes(),
            cleared_root_causes: last
                .as_ref()
                .map(|r| r.cleared_root_causes.clone())
                .unwrap_or_default(),
            endpoints: controller.known_endpoints(),
            judged_window: last.as_ref().map(|r| (r.window_start_ms, r.window_ms)),
            conditions_ready: controller.windows_with_data() >= needed,
            service_impact: controller.service_impact(),
        }
    }

    /// Whether `finding`'s Events wait: it opened fewer than
    /// [`HOLD_WINDOWS`] judged windows ago.
    fn holds(&self, finding: &Finding) -> bool {
        self.judged_window.is_some_and(|(judged, window_ms)| {
            let until = finding
                .opened_at_window_ms
                .saturating_add(u64::from(HOLD_WINDOWS) * u64::from(window_ms));
            judged < until
        })
    }
}

/// One Event about one object, as published (or to publish again).
#[derive(Debug, Clone)]
struct PendingEvent {
    regarding: ObjectReference,
    object: EventObject,
    type_: EventType,
    reason: String,
    note: String,
    related: Option<ObjectReference>,
    /// Passes left on which it is tried again if this try fails.
    retries_left: u32,
}

type FindingKey = (FindingKind, String);

/// How an open finding or root cause was announced.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Announcement {
    /// With Events of its own: its clearing is announced too.
    Individually,
    /// Only counted in a `ManyFindingsDetected` Event.
    Counted,
    /// Not at all: an open root cause explained it (findings only).
    Explained,
}

/// An open finding as announced.
#[derive(Debug, Clone)]
struct Announced {
    how: Announcement,
    /// Nodes at its ends (path findings), for the Events when it clears.
    nodes: Vec<String>,
}

/// An open root cause as announced.
#[derive(Debug, Clone)]
struct AnnouncedCause {
    how: Announcement,
    /// The node it puts at fault (endpoint and host causes).
    node: Option<String>,
    /// The cause as it opened. The Node condition's message keeps its
    /// summary while the cause stays open, so that evidence changing from
    /// window to window does not rewrite the condition every window.
    cause: RootCause,
}

/// Events left to announce one by one in this pass, and what was only counted.
#[derive(Debug)]
struct Budget {
    left: usize,
    causes_counted: usize,
    findings_counted: usize,
}

impl Budget {
    fn new() -> Self {
        Self {
            left: MAX_ANNOUNCED,
            causes_counted: 0,
            findings_counted: 0,
        }
    }

    /// Takes one individual announcement if any is left.
    fn take(&mut self) -> bool {
        if self.left == 0 {
            return false;
        }
        self.left -= 1;
        true
    }

    /// "3 more root causes and 5 more findings", or `None` if nothing was counted.
    fn counted(&self) -> Option<String> {
        let plural = |n: usize, one: &str, many: &str| {
            format!("{n} more {}", if n == 1 { one } else { many })
        };
        match (self.causes_counted, self.findings_counted) {
            (0, 0) => None,
            (c, 0) => Some(plural(c, "root cause", "root causes")),
            (0, f) => Some(plural(f, "finding", "findings")),
            (c, f) => Some(format!(
                "{} and {}",
                plural(c, "root cause", "root causes"),
                plural(f, "finding", "findings")
            )),
        }
    }
}

/// Publishes Events for root causes and findings and keeps the Node
/// condition; see the module docs.
pub struct FindingsPublisher {
    client: Client,
    reporter: Reporter,
    nodes: Store<NodeMeta>,
    metrics: ReconcileMetrics,
    announced: BTreeMap<FindingKey, Announced>,
    announced_causes: BTreeMap<CauseKey, AnnouncedCause>,
    /// (service, root cause) pairs announced on the service's workload.
    announced_services: BTreeSet<services::ServiceHitKey>,
    /// Events the API server refused, oldest first, to try again.
    unpublished: VecDeque<PendingEvent>,
    conditions: NodeConditions,
    /// Whether the last pass left the Node condition alone for the warm-up.
    warming_up: bool,
}

impl std::fmt::Debug for FindingsPublisher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FindingsPublisher")
            .field("announced", &self.announced.len())
            .field("announced_causes", &self.announced_causes.len())
            .field("unpublished", &self.unpublished.len())
            .field("conditions", &self.conditions)
            .finish_non_exhaustive()
    }
}

impl FindingsPublisher {
    /// `instance` names this operator replica in Events; `nodes` supplies the
    /// Node uids Events refer to.
    pub fn new(
        client: Client,
        instance: Option<String>,
        nodes: Store<NodeMeta>,
        metrics: ReconcileMetrics,
    ) -> Self {
        Self {
            client,
            reporter: Reporter {
                controller: FIELD_MANAGER.to_owned(),
                instance,
            },
            nodes,
            metrics,
            announced: BTreeMap::new(),
            announced_causes: BTreeMap::new(),
            announced_services: BTreeSet::new(),
            unpublished: VecDeque::new(),
            conditions: NodeConditions::default(),
            warming_up: false,
        }
    }

    /// One pass: Events refused before tried again, Events for what opened
    /// and cleared since the last pass, and the Node condition as
    /// `settings.node_health` asks (once `view.conditions_ready`). Stops
    /// between two requests once `cancel` is cancelled.
    pub async fn sync(
        &mut self,
        view: &FindingsView,
        settings: &SourceSettings,
        cancel: &CancellationToken,
    ) {
        self.retry_unpublished(cancel).await;
        self.announce(view, settings.mesh.as_ref(), cancel).await;
        let causes = self.as_opened(&view.root_causes);
        self.metrics.set_faulty_nodes(faulty_nodes(&causes).len());
        let api: Api<Node> = Api::all(self.client.clone());
        let health = &settings.node_health;
        if !health.conditions {
            self.conditions
                .remove_all(&api, &self.metrics, cancel)
                .await;
        } else if view.conditions_ready {
            if std::mem::take(&mut self.warming_up) {
                tracing::info!(
                    "the mesh controller has judged enough windows; writing Node conditions"
                );
            }
            let wanted = wanted_conditions(&causes, &view.endpoints);
            self.conditions
                .sync(&api, &health.condition_type, &wanted, &self.metrics, cancel)
                .await;
        } else if !std::mem::replace(&mut self.warming_up, true) {
            tracing::info!(
                "Node conditions left as they are until the mesh controller has judged enough windows to reopen root causes"
            );
        }
    }

    /// `causes` with the summaries they had when announced.
    fn as_opened(&self, causes: &[OpenRootCause]) -> Vec<OpenRootCause> {
        causes
            .iter()
            .map(|c| {
                let mut c = c.clone();
                if let Some(was) = self.announced_causes.get(&root_causes::key(&c.cause)) {
                    c.cause.summary.clone_from(&was.cause.summary);
                }
                c
            })
            .collect()
    }

    async fn announce(
        &mut self,
        view: &FindingsView,
        mesh: Option<&ObjectReference>,
        cancel: &CancellationToken,
    ) {
        let mut opening = Budget::new();
        let mut clearing = Budget::new();
        self.announce_causes(view, mesh, &mut opening, &mut clearing, cancel)
            .await;
        self.announce_findings(view, mesh, &mut opening, &mut clearing, cancel)
            .await;
        self.announce_services(view, mesh, cancel).await;
        if let Some(counted) = opening.counted() {
            let note = format!(
                "{counted} opened in this window; the PingMesh status and the mesh API (/api/v1/findings) list them"
            );
            self.publish(
                mesh,
                &[],
                EventType::Warning,
                "ManyFindingsDetected",
                &note,
                cancel,
            )
            .await;
        }
        if let Some(counted) = clearing.counted() {
            let note = format!("{counted} cleared in this window");
            self.publish(
                mesh,
                &[],
                EventType::Normal,
                "ManyFindingsCleared",
                &note,
                cancel,
            )
            .await;
        }
    }

    async fn announce_causes(
        &mut self,
        view: &FindingsView,
        mesh: Option<&ObjectReference>,
        opening: &mut Budget,
        clearing: &mut Budget,
        cancel: &CancellationToken,
    ) {
        let open: BTreeSet<CauseKey> = view
            .root_causes
            .iter()
            .map(|c| root_causes::key(&c.cause))
            .collect();
        let closed: Vec<CauseKey> = self
            .announced_causes
            .keys()
            .filter(|key| !open.contains(*key))
            .cloned()
            .collect();
        for open in &view.root_causes {
            let key = root_causes::key(&open.cause);
            if self.announced_causes.contains_key(&key) {
                continue;
            }
            let at_fault = root_causes::node_at_fault(&open.cause).map(str::to_owned);
            let how = if opening.take() {
                let nodes: Vec<String> = at_fault.iter().cloned().collect();
                self.publish(
                    mesh,
                    &nodes,
                    EventType::Warning,
                    root_causes::LOCALIZED_REASON,
                    &root_causes::opened_note(&open.cause),
                    cancel,
                )
                .await;
                Announcement::Individually
            } else {
                opening.causes_counted += 1;
                Announcement::Counted
            };
            self.announced_causes.insert(
                key,
                AnnouncedCause {
                    how,
                    node: at_fault,
                    cause: open.cause.clone(),
                },
            );
        }
        for key in closed {
            let Some(was) = self.announced_causes.remove(&key) else {
                continue;
            };
            if was.how != Announcement::Individually {
                continue;
            }
            if !clearing.take() {
                clearing.causes_counted += 1;
                continue;
            }
            let record = view
                .cleared_root_causes
                .iter()
                .find(|c| root_causes::key(&c.cause) == key);
            let note = root_causes::cleared_note(&was.cause, record);
            let nodes: Vec<String> = was.node.into_iter().collect();
            self.publish(
                mesh,
                &nodes,
                EventType::Normal,
                root_causes::CLEARED_REASON,
                &note,
                cancel,
            )
            .await;
        }
    }

    async fn announce_findings(
        &mut self,
        view: &FindingsView,
        mesh: Option<&ObjectReference>,
        opening: &mut Budget,
        clearing: &mut Budget,
        cancel: &CancellationToken,
    ) {
        let node_of: BTreeMap<&str, &str> = view
            .endpoints
            .iter()
            .map(|e| (e.id.as_str(), e.node.as_str()))
            .collect();
        let explained = root_causes::explained(&view.root_causes);
        let open: BTreeMap<FindingKey, &Finding> = view
            .open
            .iter()
            .map(|f| ((f.kind, f.location.clone()), f))
            .collect();
        let closed: Vec<FindingKey> = self
            .announced
            .keys()
            .filter(|key| !open.contains_key(*key))
            .cloned()
            .collect();
        // New findings, and findings no open root cause explains any more
        // that were left unannounced while one did.
        let opened: Vec<&Finding> = open
            .iter()
            .filter(|(key, _)| {
                self.announced.get(*key).is_none_or(|a| {
                    a.how == Announcement::Explained
                        && !explained.contains(explained_key(key).as_str())
                })
            })
            .map(|(_, f)| *f)
            .collect();
        for finding in opened {
            let key = (finding.kind, finding.location.clone());
            let is_explained = explained.contains(explained_key(&key).as_str());
            if !is_explained && !self.announced.contains_key(&key) && view.holds(finding) {
                // Not announced yet: the next window may open its root cause.
                continue;
            }
            let nodes = ends(finding, &node_of);
            let how = if is_explained {
                Announcement::Explained
            } else if opening.take() {
                let note = format!(
                    "{} {}: {}",
                    kind_name(finding.kind),
                    finding.location,
                    finding.evidence
                );
                self.publish(
                    mesh,
                    &nodes,
                    EventType::Warning,
                    &reason(finding.kind, true),
                    &note,
                    cancel,
                )
                .await;
                Announcement::Individually
            } else {
                opening.findings_counted += 1;
                Announcement::Counted
            };
            self.announced.insert(key, Announced { how, nodes });
        }
        self.announce_closed(closed, &view.cleared, mesh, clearing, cancel)
            .await;
    }

    async fn announce_closed(
        &mut self,
        closed: Vec<FindingKey>,
        cleared: &[Finding],
        mesh: Option<&ObjectReference>,
        clearing: &mut Budget,
        cancel: &CancellationToken,
    ) {
        for key in closed {
            let Some(was) = self.announced.remove(&key) else {
                continue;
            };
            if was.how != Announcement::Individually {
                continue;
            }
            if !clearing.take() {
                clearing.findings_counted += 1;
                continue;
            }
            let why = cleared
                .iter()
                .find(|f| f.kind == key.0 && f.location == key.1)
                .and_then(|f| f.clear_reason)
                .map_or("no longer reported by the mesh controller", |r| match r {
                    ClearReason::Recovered => "recovered",
                    ClearReason::Gone => "no data any more (an endpoint or path went away)",
                });
            let note = format!("{} {}: {why}", kind_name(key.0), key.1);
            self.publish(
                mesh,
                &was.nodes,
                EventType::Normal,
                &reason(key.0, false),
                &note,
                cancel,
            )
            .await;
        }
    }

    /// One Event on the mesh (when known) and one on each node, the other node
    /// of the pair as related object.
    async fn publish(
        &mut self,
        mesh: Option<&ObjectReference>,
        nodes: &[String],
        type_: EventType,
        reason: &str,
        note: &str,
        cancel: &CancellationToken,
    ) {
        let pending = |regarding: ObjectReference, object, related| PendingEvent {
            regarding,
            object,
            type_,
            reason: reason.to_owned(),
            note: note.to_owned(),
            related,
            retries_left: EVENT_RETRIES,
        };
        let mut events = Vec::with_capacity(nodes.len() + 1);
        if let Some(mesh) = mesh {
            let first_node = nodes.first().map(|n| self.node_ref(n));
            events.push(pending(mesh.clone(), EventObject::PingMesh, first_node));
        }
        for (index, node) in nodes.iter().enumerate() {
            let other = nodes
                .iter()
                .enumerate()
                .find(|(i, _)| *i != index)
                .map(|(_, n)| self.node_ref(n));
            events.push(pending(self.node_ref(node), EventObject::Node, other));
        }
        for event in events {
            if cancel.is_cancelled() {
                return;
            }
            self.send(event).await;
        }
    }

    /// Tries the Events refused on earlier passes once more, oldest first.
    async fn retry_unpublished(&mut self, cancel: &CancellationToken) {
        let due = std::mem::take(&mut self.unpublished);
        for mut event in due {
            if cancel.is_cancelled() {
                return;
            }
            event.retries_left = event.retries_left.saturating_sub(1);
            self.send(event).await;
        }
    }

    /// Creates `event`; if the API server refuses it, keeps it for the next
    /// pass while it has retries left.
    async fn send(&mut self, event: PendingEvent) {
        let ok = create_event(
            &self.client,
            &self.reporter,
            &event.regarding,
            &Event {
                type_: event.type_,
                reason: event.reason.clone(),
                note: Some(event.note.clone()),
                action: ACTION.to_owned(),
                secondary: event.related.clone(),
            },
        )
        .await;
        self.metrics.count_finding_event(event.object, ok);
        if ok {
            return;
        }
        if event.retries_left == 0 {
            tracing::warn!(reason = %event.reason, name = ?event.regarding.name, "giving up on an Event the API server kept refusing");
            return;
        }
        if self.unpublished.len() >= MAX_UNPUBLISHED
            && let Some(dropped) = self.unpublished.pop_front()
        {
            tracing::warn!(reason = %dropped.reason, name = ?dropped.regarding.name, "too many Events waiting for another try; dropping the oldest");
        }
        self.unpublished.push_back(event);
    }

    /// A reference to Node `name`, with its uid when cached (`kubectl describe
    /// node` matches Events by uid).
    fn node_ref(&self, name: &str) -> ObjectReference {
        ObjectReference {
            api_version: Some("v1".to_owned()),
            kind: Some("Node".to_owned()),
            name: Some(name.to_owned()),
            uid: self
                .nodes
                .get(&ObjectRef::new(name))
                .and_then(|n| n.metadata.uid.clone()),
            ..ObjectReference::default()
        }
    }
}

/// How often the publisher looks for a newly judged window.
const LOOK_EVERY: Duration = Duration::from_secs(1);

/// Runs `publisher` once for every window the mesh controller `host` serves
/// judges (and when it is replaced, or the policy source's settings change),
/// until `cancel`; a pass under way stops between two requests. Refused
/// Events are tried again on the next few passes, and a Node condition whose
/// write failed is written on a later pass (after a pause).
pub async fn publish_findings(
    mut publisher: FindingsPublisher,
    host: Arc<MeshHost>,
    cancel: CancellationToken,
) {
    let mut settings = host.settings();
    let mut tick = tokio::time::interval(LOOK_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut seen: Option<(usize, Option<u64>)> = None;
    loop {
        let settings_changed = tokio::select! {
            () = cancel.cancelled() => return,
            _ = tick.tick() => false,
            changed = settings.changed() => {
                if changed.is_err() {
                    return;
                }
                true
            }
        };
        let controller = host.current();
        // A new controller (restart) or a newly judged window.
        let now = (
            Arc::as_ptr(&controller) as usize,
            controller.last_report().map(|r| r.window_start_ms),
        );
        if !settings_changed && seen == Some(now) {
            continue;
        }
        seen = Some(now);
        let current = settings.borrow_and_update().clone();
        publisher
            .sync(&FindingsView::of(&controller), &current, &cancel)
            .await;
    }
}

/// The distinct nodes at the ends of a path finding (none for ToR pairs or
/// endpoints no longer registered).
fn ends(finding: &Finding, node_of: &BTreeMap<&str, &str>) -> Vec<String> {
    if !matches!(
        finding.kind,
        FindingKind::PathLoss | FindingKind::PathLatency
    ) {
        return Vec::new();
    }
    let Some((source, target)) = finding.location.split_once(" -> ") else {
        return Vec::new();
    };
    let mut nodes: Vec<String> = [source, target]
        .iter()
        .filter_map(|e| node_of.get(e).map(|n| (*n).to_owned()))
        .collect();
    nodes.dedup();
    nodes
}

/// `PathLossDetected`, `TorPairLatencyCleared`, ...
pub fn reason(kind: FindingKind, opened: bool) -> String {
    let kind = match kind {
        FindingKind::PathLoss => "PathLoss",
        FindingKind::PathLatency => "PathLatency",
        FindingKind::TorPairLoss => "TorPairLoss",
        FindingKind::TorPairLatency => "TorPairLatency",
    };
    format!("{kind}{}", if opened { "Detected" } else { "Cleared" })
}

/// How [`RootCause::explains`] names a finding: `pathLoss n1/udp0 -> n3/udp0`.
fn explained_key((kind, location): &FindingKey) -> String {
    format!("{} {location}", kind_name(*kind))
}

fn kind_name(kind: FindingKind) -> &'static str {
    match kind {
        FindingKind::PathLoss => "pathLoss",
        FindingKind::PathLatency => "pathLatency",
        FindingKind::TorPairLoss => "torPairLoss",
        FindingKind::TorPairLatency => "torPairLatency",
    }
}
