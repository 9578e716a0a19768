//! Leader election on the chart's Lease, on the real API server, with two
//! operator processes under the chart's RBAC and short timings (set through
//! the chart): a killed leader is replaced within the lease duration, a
//! leader cut off from the API server stops before its renew deadline and
//! before anyone takes over, and a replica that loses the Lease while it is
//! still starting to lead never starts leader work.

use std::time::{Duration, Instant, SystemTime};

use crate::cluster::{
    AGENTS_OUTSIDE_PODS, ApiServer, NAMESPACE, OPERATOR_SA, Operator, eventually, parse_time,
    serial, start_operator,
};
use crate::common::{get_json, start_agent_with};
use crate::proxy::Proxy;

const LEASE_S: u64 = 6;
const RENEW_S: u64 = 4;
const RETRY_S: u64 = 1;

fn install(api: &ApiServer) {
    api.install_chart(&[
        &format!("operator.leaderElection.leaseDurationSeconds={LEASE_S}"),
        &format!("operator.leaderElection.renewDeadlineSeconds={RENEW_S}"),
        &format!("operator.leaderElection.retryPeriodSeconds={RETRY_S}"),
        // Agents run outside pods here (see AGENTS_OUTSIDE_PODS).
        AGENTS_OUTSIDE_PODS[0],
        AGENTS_OUTSIDE_PODS[1],
        AGENTS_OUTSIDE_PODS[2],
    ]);
}

fn holder(api: &ApiServer) -> Option<String> {
    api.lease().map(|(holder, _, _)| holder)
}

fn is_standby(op: &Operator) -> bool {
    op.readyz()
        .is_some_and(|(code, body)| code == 200 && body.starts_with("standby"))
}

fn logs(ops: &[&Operator]) -> String {
    ops.iter()
        .map(|op| format!("--- {} log:\n{}", op.name, op.log_text()))
        .collect::<Vec<_>>()
        .concat()
}

fn connected_agents(op: &Operator) -> usize {
    get_json(op.http, "/api/v1/agents")
        .and_then(|v| {
            v.as_array()
                .map(|a| a.iter().filter(|x| x["connected"] == true).count())
        })
        .unwrap_or(0)
}

#[test]
#[ignore = "needs KUBEBUILDER_ASSETS (kube-apiserver, etcd): hack/envtest.sh"]
fn a_standby_takes_over_within_the_lease_duration_when_the_leader_is_killed() {
    let _serial = serial();
    let Some(api) = ApiServer::start() else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    install(&api);
    let kubeconfig = api.token_kubeconfig(dir.path(), NAMESPACE, OPERATOR_SA, None);
    let mut a = start_operator(&api, dir.path(), "operator-a", &kubeconfig, &[]);
    eventually(
        Duration::from_secs(30),
        "operator-a leads",
        || logs(&[&a]),
        || a.is_ready_leader().then_some(()),
    );
    let b = start_operator(&api, dir.path(), "operator-b", &kubeconfig, &[]);
    eventually(
        Duration::from_secs(30),
        "operator-b stands by",
        || logs(&[&a, &b]),
        || is_standby(&b).then_some(()),
    );
    assert_eq!(holder(&api).as_deref(), Some("operator-a"));

    // An agent that dials the standby is forwarded to the leader.
    let mut agent = start_agent_with(
        dir.path(),
        "node-1",
        "127.0.0.31",
        b.grpc,
        &[
            "--transport",
            "udp",
            "--tor",
            "tor-a",
            "--udp-bind",
            "127.0.0.31:0",
        ],
    );
    eventually(
        Duration::from_secs(20),
        "the agent registers through the standby",
        || logs(&[&a, &b]),
        || (connected_agents(&a) == 1).then_some(()),
    );

    a.proc.kill();
    let killed = Instant::now();
    let (_, renewed, _) = api.lease().expect("Lease");
    eventually(
        Duration::from_secs(LEASE_S + RETRY_S + 10),
        "operator-b leads",
        || logs(&[&a, &b]),
        || b.is_ready_leader().then_some(()),
    );
    let took = killed.elapsed();
    eprintln!("operator-b leads {took:?} after operator-a was killed (lease duration {LEASE_S}s)");
    let (holder, _, acquired) = api.lease().expect("Lease");
    assert_eq!(holder, "operator-b");
    // Not before the Lease expired: a lease duration after operator-a's last
    // renewal at the earliest.
    let gap = parse_time(&acquired)
        .duration_since(parse_time(&renewed))
        .unwrap_or_default();
    assert!(
        gap >= Duration::from_secs(LEASE_S),
        "operator-b acquired the Lease {gap:?} after operator-a's last renewal"
    );
    // Not before the Lease expired (the last renewal was at most a retry
    // period before the kill), and within the lease duration of it (plus a
    // retry period to notice, and time to start).
    assert!(
        took >= Duration::from_secs(LEASE_S - RETRY_S),
        "took over after {took:?}, before the Lease expired"
    );
    assert!(
        took <= Duration::from_secs(LEASE_S + RETRY_S + 3),
        "took over after {took:?}"
    );
    // The agent reconnects, now to the new leader itself.
    eventually(
        Duration::from_secs(30),
        "the agent registers with operator-b",
        || logs(&[&b]),
        || (connected_agents(&b) == 1).then_some(()),
    );
    agent.proc.kill();
}

#[test]
#[ignore = "needs KUBEBUILDER_ASSETS (kube-apiserver, etcd): hack/envtest.sh"]
fn a_leader_cut_off_from_the_api_server_stops_before_its_renew_deadline_and_before_a_takeover() {
    let _serial = serial();
    let Some(api) = ApiServer::start() else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    install(&api);
    let upstream = api
        .server
        .trim_start_matches("https://")
        .parse()
        .expect("server address");
    let proxy = Proxy::start(upstream);
    let through_proxy =
        api.token_kubeconfig(dir.path(), NAMESPACE, OPERATOR_SA, Some(&proxy.url()));
    let direct = api.token_kubeconfig(dir.path(), NAMESPACE, OPERATOR_SA, None);
    let mut a = start_operator(&api, dir.path(), "operator-a", &through_proxy, &[]);
    eventually(
        Duration::from_secs(30),
        "operator-a leads",
        || logs(&[&a]),
        || a.is_ready_leader().then_some(()),
    );
    let b = start_operator(&api, dir.path(), "operator-b", &direct, &[]);
    eventually(
        Duration::from_secs(30),
        "operator-b stands by",
        || logs(&[&a, &b]),
        || is_standby(&b).then_some(()),
    );

    proxy.cut();
    let cut = Instant::now();
    let exited = a
        .wait_exit(Duration::from_secs(RENEW_S + 5))
        .unwrap_or_else(|| panic!("operator-a still runs after the cut\n{}", logs(&[&a, &b])));
    let after_cut = cut.elapsed();
    // Its last successful renewal is what the Lease still holds.
    let (still, renewed, _) = api.lease().expect("Lease");
    assert_eq!(still, "operator-a", "{}", logs(&[&a, &b]));
    let renewed = parse_time(&renewed);
    let silent = exited.duration_since(renewed).unwrap_or_default();
    assert!(
        silent <= Duration::from_millis(RENEW_S * 1000 + 500),
        "operator-a exited {silent:?} after its last renewal (renew deadline {RENEW_S}s; {after_cut:?} after the cut)\n{}",
        logs(&[&a])
    );
    assert!(a.log_text().contains("lost leadership"), "{}", logs(&[&a]));

    eventually(
        Duration::from_secs(LEASE_S + RETRY_S + 10),
        "operator-b leads",
        || logs(&[&a, &b]),
        || b.is_ready_leader().then_some(()),
    );
    let (holder, _, acquired) = api.lease().expect("Lease");
    assert_eq!(holder, "operator-b");
    let acquired = parse_time(&acquired);
    assert!(
        acquired > exited,
        "operator-b acquired the Lease at {acquired:?}, before operator-a stopped at {exited:?}"
    );
    let gap = acquired.duration_since(renewed).unwrap_or_default();
    eprintln!(
        "operator-a exited {silent:?} after its last renewal ({after_cut:?} after the cut; renew deadline {RENEW_S}s); \
         operator-b acquired the Lease {gap:?} after that renewal (lease duration {LEASE_S}s)"
    );
    assert!(
        gap >= Duration::from_secs(LEASE_S) && gap <= Duration::from_secs(LEASE_S + RETRY_S + 3),
        "operator-b took over {gap:?} after operator-a's last renewal (lease duration {LEASE_S}s)"
    );
}

#[test]
#[ignore = "needs KUBEBUILDER_ASSETS (kube-apiserver, etcd): hack/envtest.sh"]
fn a_replica_that_loses_the_lease_while_starting_to_lead_never_starts_leader_work() {
    let _serial = serial();
    let Some(api) = ApiServer::start() else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    install(&api);
    // Without the right to list Nodes, a new leader waits for its Node cache
    // (up to 30 s) before it starts the mesh controller and the reconciler.
    let role = api
        .get(&["clusterrole", "pingmesh-operator"])
        .expect("the chart's ClusterRole");
    let nodes = role["rules"]
        .as_array()
        .unwrap()
        .iter()
        .position(|r| r["resources"] == serde_json::json!(["nodes"]))
        .expect("the nodes rule");
    api.ok(&[
        "patch",
        "clusterrole",
        "pingmesh-operator",
        "--type",
        "json",
        "-p",
        &format!(r#"[{{"op":"remove","path":"/rules/{nodes}"}}]"#),
    ]);
    let kubeconfig = api.token_kubeconfig(dir.path(), NAMESPACE, OPERATOR_SA, None);
    let mut a = start_operator(&api, dir.path(), "operator-a", &kubeconfig, &[]);
    eventually(
        Duration::from_secs(20),
        "operator-a acquires the Lease",
        || logs(&[&a]),
        || (holder(&api)? == "operator-a").then_some(()),
    );
    // Then it can no longer renew.
    api.ok(&[
        "delete",
        "rolebinding",
        "-n",
        NAMESPACE,
        "pingmesh-operator-leader-election",
    ]);
    let revoked = SystemTime::now();
    let exited = a
        .wait_exit(Duration::from_secs(RENEW_S + 5))
        .unwrap_or_else(|| panic!("operator-a still runs\n{}", logs(&[&a])));
    let (_, renewed, _) = api.lease().expect("Lease");
    let silent = exited
        .duration_since(parse_time(&renewed))
        .unwrap_or_default();
    assert!(
        silent <= Duration::from_millis(RENEW_S * 1000 + 500),
        "exited {silent:?} after its last renewal ({:?} after losing the right to renew)\n{}",
        exited.duration_since(revoked).unwrap_or_default(),
        logs(&[&a])
    );
    eprintln!("operator-a exited {silent:?} after its last renewal (renew deadline {RENEW_S}s)");
    let log = a.log_text();
    assert!(
        log.contains("lost leadership while starting to lead"),
        "{log}"
    );
    for started in [
        "mesh controller serving",
        "operator running",
        "cache synced; ready",
    ] {
        assert!(
            !log.contains(started),
            "a replica that lost the Lease started leader work ({started}):\n{log}"
        );
    }
}
