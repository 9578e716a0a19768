//! Agent identity and the JSON API's access check against the real API
//! server, with the chart's defaults (TLS on the agent port, agent and API
//! authentication on): tokens minted by the API server's `TokenRequest`,
//! reviewed by the operator with `TokenReview` and `SubjectAccessReview`
//! under the chart's RBAC. `operator/tests/identity.rs` covers the same rules
//! against a mocked API; this is the check that the real one answers as the
//! mock does.

use std::net::SocketAddr;
use std::time::Duration;

use pingmesh_proto::v1::mesh_controller_client::MeshControllerClient;
use pingmesh_proto::v1::{Endpoint, RegisterRequest, Transport};
use serde_json::Value;
use tonic::Code;
use tonic::transport::{Certificate, Channel, ClientTlsConfig};

use crate::cluster::{
    ApiServer, NAMESPACE, OPERATOR_SA, Operator, RELEASE, base64_decode, eventually, http_get_as,
    ok, serial, start_operator,
};
use crate::operator::test_mesh;

/// The chart's agent service account (`<release>-agent`).
const AGENT_SA: &str = "pingmesh-agent";
const AUDIENCE: &str = "pingmesh";
/// The name the chart's generated serving certificate is for.
const OPERATOR_HOST: &str = "pingmesh-operator.pingmesh-system.svc";

/// A pod of the agent service account on `node`. Nothing runs it (no kubelet
/// here); it exists so that a token can be bound to it and the operator can
/// find its node.
fn agent_pod(api: &ApiServer, name: &str, node: &str) -> String {
    let yaml = format!(
        "apiVersion: v1
kind: Pod
metadata:
  name: {name}
  namespace: {NAMESPACE}
spec:
  nodeName: {node}
  serviceAccountName: {AGENT_SA}
  automountServiceAccountToken: false
  containers:
    - name: agent
      image: pingmesh-agent:envtest
"
    );
    ok(&format!("create Pod {name}"), &api.apply(&yaml));
    let pod = api.get(&["pod", "-n", NAMESPACE, name]).expect("the pod");
    pod["metadata"]["uid"].as_str().expect("pod uid").to_owned()
}

/// `kubectl create token` for `account`, with `extra` flags (audience,
/// binding); the token.
fn token(api: &ApiServer, account: &str, extra: &[&str]) -> String {
    let mut args = vec!["create", "token", account, "--namespace", NAMESPACE];
    args.extend_from_slice(extra);
    api.ok(&args).trim().to_owned()
}

/// What the API server says of `token` for `audience` (admin's own review):
/// the review status.
fn review(api: &ApiServer, token: &str, audience: &str) -> Value {
    let request = format!(
        "{{\"apiVersion\":\"authentication.k8s.io/v1\",\"kind\":\"TokenReview\",\
         \"spec\":{{\"token\":\"{token}\",\"audiences\":[\"{audience}\"]}}}}"
    );
    let out = api.kubectl_as(
        &api.kubeconfig,
        &["create", "-f", "-", "-o", "json"],
        Some(&request),
    );
    let answer: Value = serde_json::from_str(&ok("TokenReview", &out)).expect("review JSON");
    answer["status"].clone()
}

/// A gRPC client over the chart's TLS: the operator's certificate checked
/// against the chart's CA for the Service's name.
async fn client(grpc: SocketAddr, ca_pem: &[u8]) -> MeshControllerClient<Channel> {
    let tls = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(ca_pem))
        .domain_name(OPERATOR_HOST);
    let channel = Channel::from_shared(format!("https://{grpc}"))
        .expect("URL")
        .tls_config(tls)
        .expect("TLS settings")
        .connect_timeout(Duration::from_secs(5))
        .timeout(Duration::from_secs(20))
        .connect()
        .await
        .expect("connect over TLS");
    MeshControllerClient::new(channel)
}

/// `Register` for `node` with `token` as the bearer (none: no header).
async fn register(
    client: &mut MeshControllerClient<Channel>,
    node: &str,
    token: Option<&str>,
) -> Result<u64, tonic::Status> {
    let mut request = tonic::Request::new(RegisterRequest {
        node: node.to_owned(),
        agent_version: "envtest".into(),
        endpoints: vec![Endpoint {
            id: format!("{node}/udp0"),
            transport: Transport::Udp.into(),
            address: "127.0.0.31:18001".into(),
            qpn: 0,
            tor: String::new(),
            device: String::new(),
        }],
    });
    if let Some(token) = token {
        request.metadata_mut().insert(
            "authorization",
            format!("Bearer {token}").parse().expect("header value"),
        );
    }
    client
        .register(request)
        .await
        .map(|r| r.into_inner().session)
}

/// `pingmesh_controller_rejected_requests_total{rpc="register",reason="identity"}`.
fn identity_refusals(op: &Operator) -> u64 {
    let (_, text) = http_get_as(op.http, "/metrics", None).expect("/metrics");
    text.lines()
        .filter(|l| l.starts_with("pingmesh_controller_rejected_requests_total{"))
        .filter(|l| l.contains("rpc=\"register\"") && l.contains("reason=\"identity\""))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
        .sum()
}

fn install(api: &ApiServer) -> (Operator, tempfile::TempDir, Vec<u8>) {
    let dir = tempfile::tempdir().unwrap();
    // The chart's defaults: TLS from a generated Secret, agents and API
    // readers authenticated.
    api.install_chart(&[]);
    api.node("node-a", &[]);
    api.node("node-b", &[]);
    let kubeconfig = api.token_kubeconfig(dir.path(), NAMESPACE, OPERATOR_SA, None);
    let op = start_operator(api, dir.path(), "operator-0", &kubeconfig, &[]);
    let context = || format!("operator log:\n{}", op.log_text());
    eventually(
        Duration::from_secs(30),
        "/readyz 200 on the leader",
        context,
        || op.is_ready_leader().then_some(()),
    );
    ok("apply the test mesh", &api.apply(&test_mesh(0)));
    let secret = api
        .get(&[
            "secret",
            "-n",
            NAMESPACE,
            &format!("{RELEASE}-operator-grpc-tls"),
        ])
        .expect("the chart's TLS Secret");
    let ca = base64_decode(secret["data"]["ca.crt"].as_str().expect("ca.crt"));
    (op, dir, ca)
}

#[test]
#[ignore = "needs KUBEBUILDER_ASSETS (kube-apiserver, etcd): hack/envtest.sh"]
#[allow(clippy::too_many_lines)] // one story, in order
fn an_agent_token_from_the_api_server_acts_for_its_pods_node_only() {
    let _serial = serial();
    let Some(api) = ApiServer::start() else {
        return;
    };
    let (op, _dir, ca) = install(&api);
    let context = || format!("operator log:\n{}", op.log_text());
    let pod_uid = agent_pod(&api, "agent-a", "node-a");

    let bound = token(
        &api,
        AGENT_SA,
        &[
            "--audience",
            AUDIENCE,
            "--bound-object-kind",
            "Pod",
            "--bound-object-name",
            "agent-a",
            "--bound-object-uid",
            &pod_uid,
        ],
    );
    // Which way the operator finds the node: the token's node claim
    // (Kubernetes 1.30 and later), else the pod's spec.nodeName.
    let status = review(&api, &bound, AUDIENCE);
    assert_eq!(status["authenticated"], true, "{status}");
    let extra = &status["user"]["extra"];
    assert_eq!(
        extra["authentication.kubernetes.io/pod-name"][0], "agent-a",
        "{status}"
    );
    let by_claim = extra["authentication.kubernetes.io/node-name"][0] == "node-a";
    eprintln!(
        "envtest identity: the node is taken from {}",
        if by_claim {
            "the token's node-name claim"
        } else {
            "the pod (no node-name claim in this API server's tokens)"
        }
    );
    // The API server's own audience, and a pingmesh token bound to nothing.
    let wrong_audience = token(
        &api,
        AGENT_SA,
        &[
            "--bound-object-kind",
            "Pod",
            "--bound-object-name",
            "agent-a",
        ],
    );
    let unbound = token(&api, AGENT_SA, &["--audience", AUDIENCE]);
    // The right audience and a pod on node-a, but another service account.
    api.ok(&["create", "serviceaccount", "impostor", "-n", NAMESPACE]);
    let impostor = token(&api, "impostor", &["--audience", AUDIENCE]);

    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async {
        let mut grpc = client(op.grpc, &ca).await;
        // The mesh controller starts once the PingMesh is seen: until then
        // nothing serves Register (Unavailable or Unimplemented).
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        let session = loop {
            match register(&mut grpc, "node-a", Some(&bound)).await {
                Ok(session) => break session,
                Err(e) if tokio::time::Instant::now() < deadline => {
                    assert!(
                        !matches!(e.code(), Code::PermissionDenied | Code::Unauthenticated),
                        "node-a's own token refused: {e}\n{}",
                        context()
                    );
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
                Err(e) => panic!("Register for node-a: {e}\n{}", context()),
            }
        };
        assert!(session > 0);
        let before = identity_refusals(&op);

        let other = register(&mut grpc, "node-b", Some(&bound)).await;
        assert_eq!(
            other.as_ref().map_err(tonic::Status::code),
            Err(Code::PermissionDenied),
            "node-a's token acting for node-b: {other:?}"
        );
        for (what, token) in [
            (
                "a token for the API server's audience",
                Some(wrong_audience.as_str()),
            ),
            ("no token", None),
            ("a token that is no token", Some("not-a-jwt")),
        ] {
            let answer = register(&mut grpc, "node-a", token).await;
            assert_eq!(
                answer.as_ref().map_err(tonic::Status::code),
                Err(Code::Unauthenticated),
                "{what}: {answer:?}"
            );
        }
        for (what, token) in [
            ("a pingmesh token bound to no pod", unbound.as_str()),
            ("another service account's token", impostor.as_str()),
        ] {
            let answer = register(&mut grpc, "node-a", Some(token)).await;
            assert_eq!(
                answer.as_ref().map_err(tonic::Status::code),
                Err(Code::PermissionDenied),
                "{what}: {answer:?}"
            );
        }
        // Every refusal counted, and nothing else was.
        assert_eq!(identity_refusals(&op) - before, 6, "{}", context());
        // Still good for its own node.
        register(&mut grpc, "node-a", Some(&bound))
            .await
            .unwrap_or_else(|e| panic!("Register for node-a again: {e}"));
    });
    let log = op.log_text();
    assert!(
        !log.contains("forbidden") && !log.contains("Forbidden"),
        "RBAC denials: {log}"
    );
}

#[test]
#[ignore = "needs KUBEBUILDER_ASSETS (kube-apiserver, etcd): hack/envtest.sh"]
fn the_json_api_answers_readers_of_pingmeshes_only() {
    let _serial = serial();
    let Some(api) = ApiServer::start() else {
        return;
    };
    let (op, _dir, _ca) = install(&api);
    let context = || format!("operator log:\n{}", op.log_text());
    for account in ["reader", "stranger"] {
        api.ok(&["create", "serviceaccount", account, "-n", NAMESPACE]);
    }
    api.ok(&[
        "create",
        "role",
        "pingmesh-reader",
        "-n",
        NAMESPACE,
        "--verb=get",
        "--resource=pingmeshes.pingmesh.io",
    ]);
    api.ok(&[
        "create",
        "rolebinding",
        "pingmesh-reader",
        "-n",
        NAMESPACE,
        "--role=pingmesh-reader",
        &format!("--serviceaccount={NAMESPACE}:reader"),
    ]);
    // Tokens as a user gets them: the API server's own audience.
    let reader = token(&api, "reader", &[]);
    let stranger = token(&api, "stranger", &[]);
    let path = "/api/v1/summary";

    let (code, body) = eventually(
        Duration::from_secs(30),
        "the summary for the reader",
        context,
        || {
            let answer = http_get_as(op.http, path, Some(&reader))?;
            // 503 until the mesh controller serves; anything else is the verdict.
            (answer.0 != 503).then_some(answer)
        },
    );
    assert_eq!(code, 200, "reader: {body}");
    serde_json::from_str::<Value>(&body).expect("the summary is JSON");

    let (code, body) = http_get_as(op.http, path, Some(&stranger)).expect("answer");
    assert_eq!(code, 403, "stranger: {body}");
    assert!(body.contains("\"error\""), "{body}");
    for (what, token) in [("no token", None), ("garbage", Some("not-a-jwt"))] {
        let (code, body) = http_get_as(op.http, path, token).expect("answer");
        assert_eq!(code, 401, "{what}: {body}");
    }
    // An agent's token is no reader's: its audience is pingmesh only.
    let agent = token(&api, AGENT_SA, &["--audience", AUDIENCE]);
    let (code, body) = http_get_as(op.http, path, Some(&agent)).expect("answer");
    assert_eq!(code, 401, "agent token: {body}");
    // What stays open stays open.
    let (code, _) = http_get_as(op.http, "/metrics", None).expect("/metrics");
    assert_eq!(code, 200);
    let log = op.log_text();
    assert!(
        !log.contains("forbidden") && !log.contains("Forbidden"),
        "RBAC denials: {log}"
    );
}
