//! Leader election on a Lease against a scripted API server that checks
//! resourceVersions like the real one. Time is passed in, and tokio's clock
//! (which the elector measures time within a step with) is paused, so expiry
//! and deadlines are tested exactly and without waiting for them.
#![cfg(feature = "kubernetes")]
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

#[path = "support/fake_api.rs"]
mod fake_api;

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use pingmesh_operator::reconcile::leader::{
    Elector, LEADER_ADDRESS_ANNOTATION, LeaseSettings, Role, run_election,
};
use serde_json::{Value, json};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use fake_api::World;

const LEASE: &str = "pingmesh-operator";

fn settings(identity: &str) -> LeaseSettings {
    LeaseSettings {
        name: LEASE.into(),
        namespace: "pingmesh-system".into(),
        identity: identity.into(),
        lease_duration: Duration::from_secs(15),
        renew_deadline: Duration::from_secs(10),
        retry_period: Duration::from_secs(2),
        address: Some("10.0.0.7:9400".into()),
    }
}

struct Cluster {
    world: Arc<Mutex<World>>,
    client: kube::Client,
    server: tokio::task::JoinHandle<()>,
}

impl Cluster {
    fn start() -> Self {
        let (client, world, server) = fake_api::start(World::default());
        Self {
            world,
            client,
            server,
        }
    }

    fn elector(&self, identity: &str) -> Elector {
        Elector::new(self.client.clone(), settings(identity))
    }

    fn lease(&self) -> Value {
        self.world.lock().unwrap().leases[LEASE].clone()
    }

    /// Another replica holds (or renews) the Lease, renewed at `renew_time`.
    fn held_by(&self, holder: &str, renew_time: &str) {
        let mut world = self.world.lock().unwrap();
        let transitions = world
            .leases
            .get(LEASE)
            .and_then(|l| l["spec"]["leaseTransitions"].as_i64())
            .unwrap_or(3);
        world.store_lease(
            LEASE,
            json!({
                "metadata": {"name": LEASE, "namespace": "pingmesh-system",
                             "annotations": {LEADER_ADDRESS_ANNOTATION: "10.0.0.9:9400"}},
                "spec": {"holderIdentity": holder, "leaseDurationSeconds": 15,
                         "renewTime": renew_time, "acquireTime": "2026-01-01T00:00:00.000000Z",
                         "leaseTransitions": transitions},
            }),
        );
    }

    fn writes(&self) -> Vec<String> {
        self.world
            .lock()
            .unwrap()
            .seen
            .iter()
            .filter(|s| s.method != "GET")
            .map(fake_api::Seen::line)
            .collect()
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        self.server.abort();
    }
}

fn after(t0: Instant, secs: u64) -> Instant {
    t0 + Duration::from_secs(secs)
}

fn standby_behind(leader: &str) -> Role {
    Role::Standby {
        leader: Some(leader.into()),
        address: Some("10.0.0.9:9400".into()),
    }
}

#[tokio::test(start_paused = true)]
async fn a_free_lease_is_created_and_held() {
    let cluster = Cluster::start();
    let mut a = cluster.elector("op-a");

    assert_eq!(a.step(Instant::now()).await, Role::Leader);

    assert_eq!(
        cluster.writes(),
        ["POST /apis/coordination.k8s.io/v1/namespaces/pingmesh-system/leases"]
    );
    let lease = cluster.lease();
    assert_eq!(lease["spec"]["holderIdentity"], "op-a");
    assert_eq!(lease["spec"]["leaseDurationSeconds"], 15);
    assert_eq!(
        lease["metadata"]["annotations"][LEADER_ADDRESS_ANNOTATION],
        "10.0.0.7:9400"
    );
}

#[tokio::test(start_paused = true)]
async fn a_lease_held_by_another_replica_is_left_alone_until_it_expires() {
    let cluster = Cluster::start();
    cluster.held_by("op-b", "2026-01-01T00:00:00.000000Z");
    let mut a = cluster.elector("op-a");
    let t0 = Instant::now();

    assert_eq!(a.step(t0).await, standby_behind("op-b"));
    assert_eq!(a.step(after(t0, 14)).await, standby_behind("op-b"));
    assert!(cluster.writes().is_empty(), "{:?}", cluster.writes());

    // Unchanged for a whole lease duration on our clock: expired.
    assert_eq!(a.step(after(t0, 15)).await, Role::Leader);
    let lease = cluster.lease();
    assert_eq!(lease["spec"]["holderIdentity"], "op-a");
    assert_eq!(lease["spec"]["leaseTransitions"], 4);
    assert_ne!(lease["spec"]["acquireTime"], "2026-01-01T00:00:00.000000Z");
    assert_eq!(
        lease["metadata"]["annotations"][LEADER_ADDRESS_ANNOTATION],
        "10.0.0.7:9400"
    );
}

#[tokio::test(start_paused = true)]
async fn a_lease_its_holder_keeps_renewing_is_never_taken() {
    let cluster = Cluster::start();
    let mut a = cluster.elector("op-a");
    let t0 = Instant::now();
    for step in 0..30u64 {
        cluster.held_by("op-b", &format!("2026-01-01T00:00:{:02}.000000Z", step * 2));
        assert_eq!(
            a.step(after(t0, step * 2)).await,
            standby_behind("op-b"),
            "step {step}"
        );
    }
    assert!(cluster.writes().iter().all(|w| !w.starts_with("PUT")));
}

#[tokio::test(start_paused = true)]
async fn the_leader_renews_its_lease_under_its_resource_version() {
    let cluster = Cluster::start();
    let mut a = cluster.elector("op-a");
    let t0 = Instant::now();
    assert_eq!(a.step(t0).await, Role::Leader);
    let acquired = cluster.lease();

    assert_eq!(a.step(after(t0, 2)).await, Role::Leader);
    assert_eq!(a.step(after(t0, 4)).await, Role::Leader);

    let renewed = cluster.lease();
    let puts: Vec<fake_api::Seen> = cluster
        .world
        .lock()
        .unwrap()
        .seen
        .iter()
        .filter(|s| s.method == "PUT")
        .cloned()
        .collect();
    assert_eq!(puts.len(), 2);
    assert_eq!(
        puts[0].body["metadata"]["resourceVersion"],
        acquired["metadata"]["resourceVersion"]
    );
    assert_eq!(renewed["spec"]["holderIdentity"], "op-a");
    assert_eq!(
        renewed["spec"]["acquireTime"],
        acquired["spec"]["acquireTime"]
    );
    assert_ne!(renewed["spec"]["renewTime"], acquired["spec"]["renewTime"]);
    assert_eq!(
        renewed["spec"]["leaseTransitions"],
        acquired["spec"]["leaseTransitions"]
    );
}

#[tokio::test(start_paused = true)]
async fn the_leader_gives_up_when_renewals_fail_past_the_deadline() {
    let cluster = Cluster::start();
    let mut a = cluster.elector("op-a");
    let t0 = Instant::now();
    assert_eq!(a.step(t0).await, Role::Leader);
    cluster
        .world
        .lock()
        .unwrap()
        .failures
        .push(("GET", "/leases/", 500));

    // Within the renew deadline it keeps leading and retrying.
    assert_eq!(a.step(after(t0, 2)).await, Role::Leader);
    assert_eq!(a.step(after(t0, 9)).await, Role::Leader);
    let Role::Lost { reason } = a.step(after(t0, 10)).await else {
        panic!("still leading past the renew deadline");
    };
    assert!(reason.contains("could not renew"), "{reason}");
    // The API server is back, but a replica that lost stays lost.
    cluster.world.lock().unwrap().failures.clear();
    assert!(matches!(a.step(after(t0, 11)).await, Role::Lost { .. }));
}

#[tokio::test(start_paused = true)]
async fn a_leader_that_finds_its_lease_taken_has_lost() {
    let cluster = Cluster::start();
    let mut a = cluster.elector("op-a");
    let t0 = Instant::now();
    assert_eq!(a.step(t0).await, Role::Leader);
    cluster.held_by("op-b", "2026-01-01T00:00:00.000000Z");

    let Role::Lost { reason } = a.step(after(t0, 2)).await else {
        panic!("kept leading with the Lease held by another");
    };
    assert!(reason.contains("op-b"), "{reason}");
}

#[tokio::test(start_paused = true)]
async fn a_released_lease_is_taken_at_once() {
    let cluster = Cluster::start();
    let mut a = cluster.elector("op-a");
    let mut b = cluster.elector("op-b");
    let t0 = Instant::now();
    assert_eq!(a.step(t0).await, Role::Leader);
    assert!(matches!(b.step(t0).await, Role::Standby { .. }));

    a.release().await.unwrap();

    let lease = cluster.lease();
    assert!(lease["spec"]["holderIdentity"].is_null(), "{lease}");
    assert!(lease["metadata"]["annotations"][LEADER_ADDRESS_ANNOTATION].is_null());
    assert_eq!(b.step(after(t0, 1)).await, Role::Leader);
    // Releasing a Lease one does not hold leaves it alone.
    a.release().await.unwrap();
    assert_eq!(cluster.lease()["spec"]["holderIdentity"], "op-b");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replicas_racing_for_an_expired_lease_never_both_lead() {
    for round in 0..20 {
        let cluster = Cluster::start();
        cluster.held_by("op-dead", "2026-01-01T00:00:00.000000Z");
        let mut a = cluster.elector("op-a");
        let mut b = cluster.elector("op-b");
        let t0 = Instant::now();
        let (ra, rb) = tokio::join!(a.step(t0), b.step(t0));
        assert!(matches!(ra, Role::Standby { .. }) && matches!(rb, Role::Standby { .. }));
        let later = after(t0, 16);
        let (ra, rb) = tokio::join!(a.step(later), b.step(later));
        let leaders = [&ra, &rb].iter().filter(|r| ***r == Role::Leader).count();
        assert_eq!(leaders, 1, "round {round}: {ra:?} {rb:?}");
        let holder = cluster.lease()["spec"]["holderIdentity"].clone();
        let expected = if ra == Role::Leader { "op-a" } else { "op-b" };
        assert_eq!(holder, expected, "round {round}");
    }
}

#[test]
fn timings_under_which_two_replicas_could_act_are_refused() {
    assert!(settings("op-a").validate().is_ok());
    let with = |change: &dyn Fn(&mut LeaseSettings)| {
        let mut s = settings("op-a");
        change(&mut s);
        s.validate()
    };
    assert!(with(&|s| s.renew_deadline = s.lease_duration).is_err());
    assert!(with(&|s| s.retry_period = s.renew_deadline).is_err());
    assert!(with(&|s| s.retry_period = Duration::ZERO).is_err());
    assert!(with(&|s| s.lease_duration = Duration::from_millis(15_500)).is_err());
    assert!(with(&|s| s.identity.clear()).is_err());
}

/// Runs an election for `settings` as `run` does; returns its roles, its stop and its task.
fn spawn_election(
    cluster: &Cluster,
    settings: LeaseSettings,
) -> (
    watch::Receiver<Role>,
    CancellationToken,
    tokio::task::JoinHandle<()>,
) {
    let (roles_tx, roles) = watch::channel(Role::Standby {
        leader: None,
        address: None,
    });
    let cancel = CancellationToken::new();
    let election = tokio::spawn(run_election(
        Elector::new(cluster.client.clone(), settings),
        roles_tx,
        cancel.clone(),
    ));
    (roles, cancel, election)
}

#[tokio::test(start_paused = true)]
async fn an_election_publishes_leadership_and_releases_the_lease_on_shutdown() {
    let cluster = Cluster::start();
    let quick = LeaseSettings {
        lease_duration: Duration::from_secs(3),
        renew_deadline: Duration::from_secs(2),
        retry_period: Duration::from_secs(1),
        ..settings("op-a")
    };
    let (mut roles, cancel, election) = spawn_election(&cluster, quick);
    tokio::time::timeout(
        Duration::from_secs(5),
        roles.wait_for(|r| *r == Role::Leader),
    )
    .await
    .unwrap()
    .unwrap();

    cancel.cancel();
    tokio::time::timeout(Duration::from_secs(5), election)
        .await
        .unwrap()
        .unwrap();

    assert!(cluster.lease()["spec"]["holderIdentity"].is_null());
}

#[tokio::test(start_paused = true)]
async fn a_standby_starts_the_expiry_clock_when_its_read_returns() {
    let cluster = Cluster::start();
    cluster.held_by("op-b", "2026-01-01T00:00:00.000000Z");
    // The API server takes 3 s to answer the first read.
    cluster.world.lock().unwrap().delay = Some(Duration::from_secs(3));
    let mut a = cluster.elector("op-a");
    let t0 = Instant::now();
    assert_eq!(a.step(t0).await, standby_behind("op-b"));
    cluster.world.lock().unwrap().delay = None;

    // The record was seen at t0 + 3 s: 15 s after t0 it has not expired yet.
    assert_eq!(a.step(after(t0, 15)).await, standby_behind("op-b"));
    assert!(cluster.writes().is_empty(), "{:?}", cluster.writes());
    assert_eq!(a.step(after(t0, 18)).await, Role::Leader);
}

#[tokio::test(start_paused = true)]
async fn a_leader_whose_renewals_fail_publishes_lost_by_its_renew_deadline() {
    let cluster = Cluster::start();
    // A renew deadline that is not a multiple of the retry period.
    let uneven = LeaseSettings {
        lease_duration: Duration::from_secs(15),
        renew_deadline: Duration::from_secs(9),
        retry_period: Duration::from_secs(2),
        ..settings("op-a")
    };
    let (mut roles, _stop, election) = spawn_election(&cluster, uneven);
    roles.wait_for(|r| *r == Role::Leader).await.unwrap();
    let t0 = tokio::time::Instant::now();
    // Renewed at t0 + 2 s and t0 + 4 s; every try from t0 + 6 s fails.
    tokio::time::sleep(Duration::from_millis(4_500)).await;
    cluster
        .world
        .lock()
        .unwrap()
        .failures
        .push(("GET", "/leases/", 500));
    let last_renewal = t0 + Duration::from_secs(4);

    roles
        .wait_for(|r| matches!(r, Role::Lost { .. }))
        .await
        .unwrap();
    let lost_at = tokio::time::Instant::now();
    let deadline = last_renewal + Duration::from_secs(9);
    assert!(
        lost_at <= deadline,
        "Lost published {:?} after the renew deadline",
        lost_at - deadline
    );
    assert!(
        lost_at > last_renewal + Duration::from_secs(7),
        "gave up {:?} after the last renewal",
        lost_at - last_renewal
    );
    // A replica that lost does not release the Lease: it simply stops.
    tokio::time::timeout(Duration::from_secs(5), election)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(cluster.lease()["spec"]["holderIdentity"], "op-a");
}

#[tokio::test(start_paused = true)]
async fn a_renewal_that_hangs_is_cut_off_at_the_renew_deadline() {
    let cluster = Cluster::start();
    let mut a = cluster.elector("op-a");
    let t0 = Instant::now();
    assert_eq!(a.step(t0).await, Role::Leader);
    // The API server stops answering within the deadline.
    cluster.world.lock().unwrap().delay = Some(Duration::from_mins(1));
    let started = tokio::time::Instant::now();
    let Role::Lost { reason } = a.step(after(t0, 8)).await else {
        panic!("still leading past the renew deadline");
    };
    assert!(reason.contains("could not renew"), "{reason}");
    // 2 s were left to the deadline (10 s after t0), not a whole retry period.
    assert_eq!(started.elapsed(), Duration::from_secs(2));
}
