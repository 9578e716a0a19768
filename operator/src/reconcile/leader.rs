//! Leader election on a `coordination.k8s.io/v1` Lease, so that several
//! operator replicas are safe: only the holder reconciles, writes status,
//! Events and Node conditions, and serves agents.
//!
//! Written here rather than taken from a crate: the one maintained crate for
//! kube 5 (`kube-lease-manager`) keeps reporting leadership while renewals
//! fail, so a replica cut off from the API server would go on acting after
//! another took over. The rules are those of client-go's leader election:
//!
//! - Every write is a create or a resourceVersion-guarded replace, so of two
//!   replicas racing for the Lease one wins and the other gets a conflict.
//! - A Lease held by another replica is taken only once its record (holder,
//!   renew time) has not changed for a whole lease duration as measured on
//!   this replica's own monotonic clock: no clock agreement between machines
//!   is needed. A replica starting next to a dead holder's Lease therefore
//!   waits one lease duration.
//! - The leader renews every retry period. When it has not managed to for the
//!   renew deadline (shorter than the lease duration), or finds the Lease held
//!   by another, it has lost: the caller must stop acting at once (`run` exits
//!   and Kubernetes restarts it as a standby). [`run_election`] wakes up by the
//!   deadline whatever the retry period, and a renewal is given no longer than
//!   the time left to it, so `Lost` is published no later than the renew
//!   deadline after the start of the last successful renewal. Others can take
//!   over only a lease duration after they saw that renewal, which is later:
//!   a standby starts its clock when its read returns, never before.
//! - On a clean shutdown the leader releases the Lease, so a standby takes
//!   over at once instead of after a lease duration.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta};
use k8s_openapi::jiff::Timestamp;
use kube::Api;
use kube::api::PostParams;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

/// Annotation on the Lease with the gRPC address (`ip:port`) the leader serves
/// agents on, for standbys to forward agents to.
pub const LEADER_ADDRESS_ANNOTATION: &str = "pingmesh.io/grpc-address";

/// How this replica takes part in the election.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LeaseSettings {
    pub name: String,
    pub namespace: String,
    /// This replica's name in the Lease (its pod name).
    pub identity: String,
    /// How long a Lease stays held after its last renewal.
    pub lease_duration: Duration,
    /// How long the leader keeps acting without a successful renewal.
    pub renew_deadline: Duration,
    /// Pause between tries to acquire or renew.
    pub retry_period: Duration,
    /// The address published in [`LEADER_ADDRESS_ANNOTATION`] while leading.
    pub address: Option<String>,
}

impl LeaseSettings {
    /// Refuses timings under which two replicas could both act: a leader
    /// that cannot renew publishes `Lost` by the renew deadline, which must
    /// come before a standby may take over (a lease duration after it saw the
    /// last renewal); the retry period must leave room for at least one more
    /// try before the deadline. The chart checks the same (`pingmesh.validate`
    /// and the values schema: every timing at least 1 s).
    pub fn validate(&self) -> Result<(), String> {
        let secs = |d: Duration| d.as_secs_f64();
        if self.name.is_empty() || self.namespace.is_empty() || self.identity.is_empty() {
            return Err("the Lease name, namespace and holder identity must not be empty".into());
        }
        if self.retry_period.is_zero() || self.renew_deadline <= self.retry_period {
            return Err(format!(
                "the renew deadline ({}s) must be longer than the retry period ({}s), which must be above 0",
                secs(self.renew_deadline),
                secs(self.retry_period)
            ));
        }
        if self.lease_duration <= self.renew_deadline {
            return Err(format!(
                "the lease duration ({}s) must be longer than the renew deadline ({}s)",
                secs(self.lease_duration),
                secs(self.renew_deadline)
            ));
        }
        if self.lease_duration.subsec_nanos() != 0 || lease_seconds(self.lease_duration).is_none() {
            return Err(format!(
                "the lease duration ({}s) must be whole seconds, at most {}",
                secs(self.lease_duration),
                i32::MAX
            ));
        }
        Ok(())
    }
}

fn lease_seconds(d: Duration) -> Option<i32> {
    i32::try_from(d.as_secs()).ok()
}

/// Where this replica stands.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Role {
    /// Holds the Lease: may act.
    Leader,
    /// Does not hold it: must not act. `leader` and its `address` as last
    /// seen on the Lease (`None`: free, or not read yet).
    Standby {
        leader: Option<String>,
        address: Option<String>,
    },
    /// Held the Lease and lost it: must stop acting at once.
    Lost { reason: String },
}

/// The Lease record as last read, and when (on this replica's clock) it last changed.
#[derive(Debug, Clone)]
struct Observed {
    holder: Option<String>,
    renew_time: Option<MicroTime>,
    transitions: Option<i32>,
    duration: Duration,
    address: Option<String>,
    changed_at: Instant,
}

/// What one try at the Lease found.
#[derive(Debug)]
enum Attempt {
    /// This replica holds it now.
    Held,
    /// Another replica holds it and it has not expired.
    HeldByOther,
    /// Someone wrote it between our read and our write.
    Conflict,
}

/// One replica's view of the election; [`Elector::step`] once per retry period.
pub struct Elector {
    api: Api<Lease>,
    settings: LeaseSettings,
    observed: Option<Observed>,
    /// Start of the last successful acquire or renewal while leading.
    renewed_at: Option<Instant>,
    /// Why this replica lost: it never leads again (a fresh process may).
    lost: Option<String>,
}

impl std::fmt::Debug for Elector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Elector")
            .field("settings", &self.settings)
            .field("observed", &self.observed)
            .field("renewed_at", &self.renewed_at)
            .field("lost", &self.lost)
            .finish_non_exhaustive()
    }
}

impl Elector {
    /// An elector for the Lease `settings.name` in `settings.namespace`.
    pub fn new(client: kube::Client, settings: LeaseSettings) -> Self {
        Self {
            api: Api::namespaced(client, &settings.namespace),
            settings,
            observed: None,
            renewed_at: None,
            lost: None,
        }
    }

    pub fn settings(&self) -> &LeaseSettings {
        &self.settings
    }

    /// Tries once to acquire or renew the Lease; `now` is this replica's
    /// monotonic clock at the start of the step (time spent inside the step is
    /// measured with tokio's clock and added to it). A replica that lost stays
    /// lost.
    pub async fn step(&mut self, now: Instant) -> Role {
        if let Some(reason) = &self.lost {
            return Role::Lost {
                reason: reason.clone(),
            };
        }
        let role = self.try_step(now).await;
        if let Role::Lost { reason } = &role {
            self.lost = Some(reason.clone());
            self.renewed_at = None;
        }
        role
    }

    /// While leading: the instant by which a renewal must succeed, or this
    /// replica has lost (the start of the last successful renewal plus the
    /// renew deadline).
    pub fn renew_by(&self) -> Option<Instant> {
        self.renewed_at.map(|at| at + self.settings.renew_deadline)
    }

    async fn try_step(&mut self, now: Instant) -> Role {
        let clock = StepClock::start(now);
        let limit = match self.renew_by() {
            Some(deadline) if now >= deadline => {
                // Not renewed in time (the previous try failed or came back
                // late): lost, without asking again.
                return Role::Lost {
                    reason: format!(
                        "could not renew the Lease {} within the renew deadline ({:?})",
                        self.settings.name, self.settings.renew_deadline
                    ),
                };
            }
            // Past the deadline a late answer is of no use.
            Some(deadline) => deadline.saturating_duration_since(now),
            None => self.settings.lease_duration,
        };
        let attempt = match tokio::time::timeout(limit, self.attempt(&clock)).await {
            Ok(attempt) => attempt.map_err(|e| e.to_string()),
            Err(_) => Err(format!("no answer from the API server within {limit:?}")),
        };
        let finished = clock.now();
        match (self.renewed_at, attempt) {
            (_, Ok(Attempt::Held)) => {
                if self.renewed_at.is_none() {
                    tracing::info!(lease = %self.settings.name, identity = %self.settings.identity, "acquired the leader Lease");
                }
                // The write happened after `now`, so others saw it no earlier:
                // counting the deadline from `now` keeps it on the safe side.
                self.renewed_at = Some(now);
                Role::Leader
            }
            (Some(_), Ok(Attempt::HeldByOther)) => Role::Lost {
                reason: format!(
                    "the Lease {} is held by {}",
                    self.settings.name,
                    self.observed
                        .as_ref()
                        .and_then(|o| o.holder.clone())
                        .unwrap_or_default()
                ),
            },
            (Some(at), failed) => {
                let why = match failed {
                    Err(e) => e,
                    _ => "the Lease changed under us".to_owned(),
                };
                let silent = finished.saturating_duration_since(at);
                if silent >= self.settings.renew_deadline {
                    Role::Lost {
                        reason: format!(
                            "could not renew the Lease {} for {silent:?} (deadline {:?}): {why}",
                            self.settings.name, self.settings.renew_deadline
                        ),
                    }
                } else {
                    tracing::warn!(lease = %self.settings.name, error = %why, "renewing the leader Lease failed; retrying");
                    Role::Leader
                }
            }
            (None, outcome) => {
                if let Err(e) = outcome {
                    tracing::warn!(lease = %self.settings.name, error = %e, "reading the leader Lease failed; retrying");
                }
                Role::Standby {
                    leader: self.observed.as_ref().and_then(|o| o.holder.clone()),
                    address: self.observed.as_ref().and_then(|o| o.address.clone()),
                }
            }
        }
    }

    async fn attempt(&mut self, clock: &StepClock) -> Result<Attempt, kube::Error> {
        let identity = self.settings.identity.clone();
        let read = self.api.get_opt(&self.settings.name).await?;
        // The record was seen when the read returned, not when it was sent: a
        // slow read must not start the expiry clock early.
        let seen_at = clock.now();
        let Some(lease) = read else {
            let fresh = Lease {
                metadata: ObjectMeta {
                    name: Some(self.settings.name.clone()),
                    namespace: Some(self.settings.namespace.clone()),
                    annotations: self.annotations(),
                    ..ObjectMeta::default()
                },
                spec: Some(self.held_spec(None)),
            };
            return match self.api.create(&PostParams::default(), &fresh).await {
                Ok(_) => Ok(Attempt::Held),
                Err(kube::Error::Api(s)) if s.code == 409 => Ok(Attempt::Conflict),
                Err(e) => Err(e),
            };
        };
        let spec = lease.spec.clone().unwrap_or_default();
        self.observe(&lease, seen_at);
        let holder = spec.holder_identity.clone().filter(|h| !h.is_empty());
        if holder.as_ref().is_some_and(|h| *h != identity) && !self.expired(seen_at) {
            return Ok(Attempt::HeldByOther);
        }
        // Free, expired or ours: take or renew it, guarded by resourceVersion.
        let mut next = lease;
        let mut annotations = next.metadata.annotations.take().unwrap_or_default();
        annotations.remove(LEADER_ADDRESS_ANNOTATION);
        annotations.extend(self.annotations().unwrap_or_default());
        next.metadata.annotations = (!annotations.is_empty()).then_some(annotations);
        next.spec = Some(self.held_spec(Some(&spec)));
        match self
            .api
            .replace(&self.settings.name, &PostParams::default(), &next)
            .await
        {
            Ok(_) => Ok(Attempt::Held),
            Err(kube::Error::Api(s)) if s.code == 409 => Ok(Attempt::Conflict),
            Err(e) => Err(e),
        }
    }

    /// The spec with this replica as holder, renewed now; `before` is the
    /// current spec (keeps the acquire time while renewing, counts a new holder).
    fn held_spec(&self, before: Option<&LeaseSpec>) -> LeaseSpec {
        let now = MicroTime(Timestamp::now());
        let ours = before
            .and_then(|b| b.holder_identity.as_deref())
            .is_some_and(|h| h == self.settings.identity);
        let transitions = before.and_then(|b| b.lease_transitions).unwrap_or(0);
        let had_holder = before
            .and_then(|b| b.holder_identity.as_deref())
            .is_some_and(|h| !h.is_empty());
        LeaseSpec {
            holder_identity: Some(self.settings.identity.clone()),
            lease_duration_seconds: lease_seconds(self.settings.lease_duration),
            acquire_time: if ours {
                before.and_then(|b| b.acquire_time.clone())
            } else {
                Some(now.clone())
            },
            renew_time: Some(now),
            lease_transitions: Some(if ours || !had_holder {
                transitions
            } else {
                transitions.saturating_add(1)
            }),
            ..LeaseSpec::default()
        }
    }

    fn annotations(&self) -> Option<BTreeMap<String, String>> {
        self.settings.address.as_ref().map(|address| {
            BTreeMap::from([(LEADER_ADDRESS_ANNOTATION.to_owned(), address.clone())])
        })
    }

    /// Notes the record of `lease`, read at `seen_at`.
    fn observe(&mut self, lease: &Lease, seen_at: Instant) {
        let spec = lease.spec.clone().unwrap_or_default();
        let duration = spec
            .lease_duration_seconds
            .and_then(|s| u64::try_from(s).ok())
            .map_or(self.settings.lease_duration, Duration::from_secs);
        let holder = spec.holder_identity.filter(|h| !h.is_empty());
        let address = lease
            .metadata
            .annotations
            .as_ref()
            .and_then(|a| a.get(LEADER_ADDRESS_ANNOTATION).cloned());
        let same = self.observed.as_ref().is_some_and(|o| {
            o.holder == holder
                && o.renew_time == spec.renew_time
                && o.transitions == spec.lease_transitions
        });
        let changed_at = match &self.observed {
            Some(o) if same => o.changed_at,
            _ => seen_at,
        };
        self.observed = Some(Observed {
            holder,
            renew_time: spec.renew_time,
            transitions: spec.lease_transitions,
            duration,
            address,
            changed_at,
        });
    }

    fn expired(&self, now: Instant) -> bool {
        self.observed
            .as_ref()
            .is_some_and(|o| now.saturating_duration_since(o.changed_at) >= o.duration)
    }

    /// Gives the Lease up if this replica holds it, so a standby takes over
    /// without waiting for it to expire.
    pub async fn release(&mut self) -> Result<(), kube::Error> {
        if self.renewed_at.take().is_none() {
            return Ok(());
        }
        let Some(mut lease) = self.api.get_opt(&self.settings.name).await? else {
            return Ok(());
        };
        let mut spec = lease.spec.take().unwrap_or_default();
        if spec.holder_identity.as_deref() != Some(self.settings.identity.as_str()) {
            return Ok(());
        }
        spec.holder_identity = None;
        spec.renew_time = Some(MicroTime(Timestamp::now()));
        spec.lease_duration_seconds = Some(1);
        lease.spec = Some(spec);
        if let Some(annotations) = lease.metadata.annotations.as_mut() {
            annotations.remove(LEADER_ADDRESS_ANNOTATION);
        }
        match self
            .api
            .replace(&self.settings.name, &PostParams::default(), &lease)
            .await
        {
            Ok(_) => {
                tracing::info!(lease = %self.settings.name, "released the leader Lease");
                Ok(())
            }
            // Someone else wrote it meanwhile: it is not ours to release.
            Err(kube::Error::Api(s)) if s.code == 409 => Ok(()),
            Err(e) => Err(e),
        }
    }
}

/// This replica's monotonic clock: tokio's, so that tests can pause it.
fn clock_now() -> Instant {
    tokio::time::Instant::now().into_std()
}

/// Time within one [`Elector::step`]: the `now` it was given plus what
/// elapsed since on tokio's clock.
struct StepClock {
    now: Instant,
    started: tokio::time::Instant,
}

impl StepClock {
    fn start(now: Instant) -> Self {
        Self {
            now,
            started: tokio::time::Instant::now(),
        }
    }

    fn now(&self) -> Instant {
        self.now + self.started.elapsed()
    }
}

/// Steps `elector` every retry period and publishes the role in `roles`
/// until it is lost (the last value sent) or `cancel` (then the Lease is
/// released). While leading it steps again no later than the renew deadline,
/// so that a leader whose renewals fail publishes `Lost` by then, not up to a
/// retry period later.
pub async fn run_election(
    mut elector: Elector,
    roles: watch::Sender<Role>,
    cancel: CancellationToken,
) {
    let retry = elector.settings().retry_period;
    loop {
        let role = tokio::select! {
            role = elector.step(clock_now()) => role,
            () = cancel.cancelled() => break,
        };
        let lost = matches!(role, Role::Lost { .. });
        roles.send_if_modified(|current| {
            let changed = *current != role;
            *current = role;
            changed
        });
        if lost {
            return;
        }
        let pause = elector.renew_by().map_or(retry, |deadline| {
            retry.min(deadline.saturating_duration_since(clock_now()))
        });
        tokio::select! {
            () = tokio::time::sleep(pause) => {}
            () = cancel.cancelled() => break,
        }
    }
    if let Err(e) = elector.release().await {
        tracing::warn!(error = %e, "releasing the leader Lease failed; a standby takes over once it expires");
    }
}
