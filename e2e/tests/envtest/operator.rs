//! The operator as the chart installs it, on the real API server: Ready once
//! synced, server-side apply of the agent objects, status through the status
//! subresource, agents placed on ToRs from Node labels, a fault turned into
//! Events and a Node condition, all under the chart's RBAC.

use std::process::Command;
use std::time::Duration;

use serde_json::Value;

use crate::cluster::{
    AGENTS_OUTSIDE_PODS, ApiServer, NAMESPACE, OPERATOR_SA, Operator, eventually, ok, serial,
    start_operator, warnings,
};
use crate::common::{Agent, get_json, start_agent_with};

const TOR_LABEL: &str = "topology.pingmesh.io/tor";
const MANAGER: &str = "pingmesh-operator";
const CONDITION: &str = "RdmaNetworkHealthy";

/// The policy source: 1 s windows and rates that make a stopped agent's
/// paths fail at once; an RTT budget a debug build on a busy machine meets.
/// `traffic_class` is an agent setting that goes through the `ConfigMap`.
pub fn test_mesh(traffic_class: u8) -> String {
    format!(
        "apiVersion: pingmesh.io/v1alpha1
kind: PingMesh
metadata:
  name: default
  namespace: {NAMESPACE}
spec:
  transport: udp
  probing:
    windowMs: 1000
    probeTimeoutMs: 200
    torMeshRatePps: 50
    interTorRatePps: 20
  sla:
    maxP99NetworkRttMicros: 100000
  nodeHealth:
    conditions: true
  rdma:
    trafficClass: {traffic_class}
"
    )
}

fn agent(dir: &std::path::Path, node: &str, ip: &str, controller: std::net::SocketAddr) -> Agent {
    // No --tor: the operator places the endpoint from the Node's labels.
    start_agent_with(
        dir,
        node,
        ip,
        controller,
        &["--transport", "udp", "--udp-bind", &format!("{ip}:0")],
    )
}

fn endpoint_tor(op: &Operator, node: &str) -> Option<String> {
    get_json(op.http, "/api/v1/endpoints")?
        .as_array()?
        .iter()
        .find(|e| e["node"] == node)
        .and_then(|e| e["tor"].as_str().map(str::to_owned))
}

fn condition(api: &ApiServer, node: &str) -> Option<(String, String)> {
    let node = api.get(&["node", node])?;
    node["status"]["conditions"]
        .as_array()?
        .iter()
        .find(|c| c["type"] == CONDITION)
        .map(|c| {
            (
                c["status"].as_str().unwrap_or_default().to_owned(),
                c["reason"].as_str().unwrap_or_default().to_owned(),
            )
        })
}

/// (regarding kind/name, reason) of the `events.k8s.io` Events in `namespace`.
fn events(api: &ApiServer, namespace: &str) -> Vec<(String, String)> {
    api.get(&["events.events.k8s.io", "-n", namespace])
        .and_then(|list| list["items"].as_array().cloned())
        .unwrap_or_default()
        .iter()
        .map(|e| {
            (
                format!(
                    "{}/{}",
                    e["regarding"]["kind"].as_str().unwrap_or_default(),
                    e["regarding"]["name"].as_str().unwrap_or_default()
                ),
                e["reason"].as_str().unwrap_or_default().to_owned(),
            )
        })
        .collect()
}

fn has_event(api: &ApiServer, namespace: &str, regarding: &str, reason: &str) -> bool {
    events(api, namespace)
        .iter()
        .any(|(r, why)| r == regarding && why == reason)
}

/// The managed-fields entry of `manager` on `object`, by subresource ("" for the main resource).
fn managed<'a>(object: &'a Value, manager: &str, subresource: &str) -> Option<&'a Value> {
    object["metadata"]["managedFields"]
        .as_array()?
        .iter()
        .find(|m| {
            m["manager"] == manager && m["subresource"].as_str().unwrap_or_default() == subresource
        })
}

fn config_hash(api: &ApiServer) -> Option<String> {
    let ds = api.get(&["daemonset", "-n", NAMESPACE, "default-agent"])?;
    ds["spec"]["template"]["metadata"]["annotations"]["pingmesh.io/config-hash"]
        .as_str()
        .map(str::to_owned)
}

fn signal(agent: &Agent, sig: &str) {
    let status = Command::new("kill")
        .args([sig, &agent.proc.child.id().to_string()])
        .status()
        .expect("kill");
    assert!(status.success(), "kill {sig} {}", agent.node);
}

#[test]
#[ignore = "needs KUBEBUILDER_ASSETS (kube-apiserver, etcd): hack/envtest.sh"]
#[allow(clippy::too_many_lines)] // one story, in order
fn the_operator_under_the_charts_rbac_turns_ready_reconciles_and_reports_a_fault() {
    let _serial = serial();
    let Some(api) = ApiServer::start() else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    // helm install with default values except agent and API security: this
    // harness runs agents and reads the JSON API from outside any pod, with
    // no projected token to present (docs/security.md; the TLS and token
    // checks are tested in operator/tests/tls.rs and identity.rs, and
    // against this API server in identity.rs here). The CRD comes with it.
    api.install_chart(AGENTS_OUTSIDE_PODS);
    for (node, tor) in [
        ("node-1", "tor-a"),
        ("node-2", "tor-a"),
        ("node-3", "tor-a"),
        ("node-4", "tor-b"),
    ] {
        api.node(node, &[(TOR_LABEL, tor)]);
    }
    let kubeconfig = api.token_kubeconfig(dir.path(), NAMESPACE, OPERATOR_SA, None);
    let whoami = api.kubectl_as(&kubeconfig, &["auth", "whoami", "-o", "json"], None);
    assert!(
        ok("kubectl auth whoami", &whoami)
            .contains(&format!("system:serviceaccount:{NAMESPACE}:{OPERATOR_SA}"))
    );
    let op = start_operator(
        &api,
        dir.path(),
        "operator-0",
        &kubeconfig,
        // Status refreshes every 2 s instead of 30 s, to keep the test short.
        &[("PINGMESH_RESYNC_SECS", "2")],
    );
    let context = || format!("operator log:\n{}", op.log_text());

    // Ready on the leader once the PingMesh cache synced.
    eventually(
        Duration::from_secs(30),
        "/readyz 200 on the leader",
        context,
        || op.is_ready_leader().then_some(()),
    );
    assert!(
        op.log_text().contains("cache synced; ready"),
        "{}",
        context()
    );

    // The sample as shipped, then the test's settings (a mesh controller restart).
    let sample = api.kubectl_as(
        &api.kubeconfig,
        &[
            "apply",
            "-f",
            &crate::cluster::repo_root()
                .join("pingmesh.yaml")
                .display()
                .to_string(),
        ],
        None,
    );
    ok("kubectl apply -f pingmesh.yaml", &sample);
    assert_eq!(warnings(&sample), Vec::<String>::new());
    ok("apply the test mesh", &api.apply(&test_mesh(0)));

    let pm = eventually(
        Duration::from_secs(30),
        "PingMesh status conditions",
        context,
        || {
            let pm = api.get(&["pingmesh", "-n", NAMESPACE, "default"])?;
            pm["status"]["conditions"]
                .as_array()
                .is_some_and(|c| !c.is_empty())
                .then_some(pm)
        },
    );
    let uid = pm["metadata"]["uid"].as_str().unwrap().to_owned();
    // Status through the status subresource, by server-side apply or patch.
    assert!(
        managed(&pm, MANAGER, "status").is_some(),
        "status not written through the status subresource: {}",
        pm["metadata"]["managedFields"]
    );
    assert!(
        managed(&pm, MANAGER, "").is_none(),
        "the operator wrote the spec or metadata: {}",
        pm["metadata"]["managedFields"]
    );

    // ConfigMap and DaemonSet by server-side apply, owned by the PingMesh.
    for kind in ["configmap", "daemonset"] {
        let object = eventually(Duration::from_secs(20), kind, context, || {
            api.get(&[kind, "-n", NAMESPACE, "default-agent"])
        });
        let owners = &object["metadata"]["ownerReferences"];
        assert_eq!(owners.as_array().map(Vec::len), Some(1), "{kind}: {owners}");
        assert_eq!(owners[0]["kind"], "PingMesh");
        assert_eq!(owners[0]["uid"], uid.as_str());
        assert_eq!(owners[0]["controller"], true);
        let entry = managed(&object, MANAGER, "")
            .unwrap_or_else(|| panic!("{kind} not managed by {MANAGER}: {}", object["metadata"]));
        assert_eq!(entry["operation"], "Apply", "{kind}: {entry}");
    }

    // The pod template's config hash rolls with an agent setting.
    let before = config_hash(&api).expect("config hash");
    ok("change an agent setting", &api.apply(&test_mesh(96)));
    eventually(
        Duration::from_secs(20),
        "a new config hash",
        context,
        || config_hash(&api).filter(|h| *h != before),
    );
    let cm = api
        .get(&["configmap", "-n", NAMESPACE, "default-agent"])
        .unwrap();
    assert_eq!(
        cm["data"]["PINGMESH_RDMA_TRAFFIC_CLASS"], "96",
        "{}",
        cm["data"]
    );

    // Agents as processes register, and land on the ToRs their Nodes name.
    let mut agents: Vec<Agent> = [
        ("node-1", "127.0.0.21"),
        ("node-2", "127.0.0.22"),
        ("node-3", "127.0.0.23"),
        ("node-4", "127.0.0.24"),
    ]
    .iter()
    .map(|(node, ip)| agent(dir.path(), node, ip, op.grpc))
    .collect();
    for (node, tor) in [
        ("node-1", "tor-a"),
        ("node-2", "tor-a"),
        ("node-3", "tor-a"),
        ("node-4", "tor-b"),
    ] {
        eventually(
            Duration::from_secs(30),
            &format!("{node} under {tor}"),
            context,
            || (endpoint_tor(&op, node)? == tor).then_some(()),
        );
    }
    // Relabelled, a node's endpoint moves without the agent registering again.
    api.ok(&[
        "label",
        "node",
        "node-4",
        &format!("{TOR_LABEL}=tor-c"),
        "--overwrite",
    ]);
    eventually(
        Duration::from_secs(10),
        "node-4 moved to tor-c",
        context,
        || (endpoint_tor(&op, "node-4")? == "tor-c").then_some(()),
    );
    eventually(
        Duration::from_secs(20),
        "status.endpointsRegistered = 4",
        context,
        || {
            let pm = api.get(&["pingmesh", "-n", NAMESPACE, "default"])?;
            (pm["status"]["endpointsRegistered"] == 4).then_some(())
        },
    );

    // Healthy: every node with an agent gets the condition True.
    for node in ["node-1", "node-2", "node-3", "node-4"] {
        eventually(
            Duration::from_secs(40),
            &format!("{CONDITION}=True on {node}"),
            context,
            || {
                (condition(&api, node)? == ("True".to_owned(), "NoRootCauseLocalized".to_owned()))
                    .then_some(())
            },
        );
    }

    // A fault: node-3's agent stops answering (SIGSTOP). Every path to it
    // fails, from its ToR neighbours and from node-4 under another ToR, while
    // theirs to each other do not: the localizer names host node-3.
    signal(&agents[2], "-STOP");
    eventually(
        Duration::from_secs(15),
        "node-3 condition False",
        context,
        || {
            (condition(&api, "node-3")? == ("False".to_owned(), "RootCauseLocalized".to_owned()))
                .then_some(())
        },
    );
    eventually(
        Duration::from_secs(10),
        "RootCauseLocalized Events",
        context,
        || {
            (has_event(&api, NAMESPACE, "PingMesh/default", "RootCauseLocalized")
                && has_event(&api, "default", "Node/node-3", "RootCauseLocalized"))
            .then_some(())
        },
    );
    assert_eq!(
        condition(&api, "node-1"),
        Some(("True".to_owned(), "NoRootCauseLocalized".to_owned()))
    );
    let table = api.ok(&["get", "pingmesh", "-n", NAMESPACE, "default"]);
    eventually(
        Duration::from_secs(10),
        "FINDINGS column above 0",
        context,
        || {
            let table = api.ok(&[
                "get",
                "pingmesh",
                "-n",
                NAMESPACE,
                "default",
                "--no-headers",
            ]);
            let findings: u64 = table.split_whitespace().nth(5)?.parse().ok()?;
            (findings > 0).then_some(())
        },
    );
    drop(table);

    // One Event per root cause: the path findings it explains get none.
    for (namespace, regarding) in [(NAMESPACE, "PingMesh/default"), ("default", "Node/node-3")] {
        assert!(
            !has_event(&api, namespace, regarding, "PathLossDetected"),
            "{regarding}: {:?}",
            events(&api, namespace)
        );
    }

    // It recovers: the root cause clears and the condition is True again.
    signal(&agents[2], "-CONT");
    eventually(
        Duration::from_secs(30),
        "node-3 condition True again",
        context,
        || (condition(&api, "node-3")?.0 == "True").then_some(()),
    );
    eventually(
        Duration::from_secs(10),
        "RootCauseCleared Events",
        context,
        || {
            (has_event(&api, NAMESPACE, "PingMesh/default", "RootCauseCleared")
                && has_event(&api, "default", "Node/node-3", "RootCauseCleared"))
            .then_some(())
        },
    );

    // Nothing the chart's RBAC does not allow was tried.
    let log = op.log_text();
    assert!(
        !log.contains("forbidden") && !log.contains("Forbidden"),
        "RBAC denials: {log}"
    );
    for a in &mut agents {
        a.proc.kill();
    }
}
