//! Agents in a cluster: the `TokenReview` check against a mocked API server
//! (the requests it sends, and what it makes of each answer), and a real
//! controller refusing an agent whose token names another node.

#![cfg(feature = "kubernetes")]
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::needless_pass_by_value
)]

use std::sync::{Arc, Mutex};

use http::{Request, Response};
use kube::Client;
use kube::client::Body;
use pingmesh_operator::config::MeshConfig;
use pingmesh_operator::mesh::identity::token::TokenReviewAuthenticator;
use pingmesh_operator::mesh::identity::{AgentAuthenticator, AuthError, Caller, Credentials};
use pingmesh_operator::mesh::server;
use pingmesh_proto::v1::mesh_controller_client::MeshControllerClient;
use pingmesh_proto::v1::{Endpoint, RegisterRequest, Transport};
use serde_json::{Value, json};
use tokio_util::sync::CancellationToken;
use tonic::Code;
use tonic::metadata::MetadataMap;

/// What the fake API server answers a `TokenReview` for each token, and the
/// pods it holds; it records every request.
#[derive(Default)]
struct Cluster {
    reviews: Vec<(&'static str, Value)>,
    pods: Vec<Value>,
    /// Users a `SubjectAccessReview` allows to get pingmeshes in "mesh".
    readers: Vec<&'static str>,
    seen: Vec<(String, String, Value)>,
    down: bool,
}

fn fake_api(cluster: Arc<Mutex<Cluster>>) -> Client {
    let (service, mut handle) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
    tokio::spawn(async move {
        while let Some((request, respond)) = handle.next_request().await {
            let (parts, body) = request.into_parts();
            let bytes = body.collect_bytes().await.unwrap();
            let body: Value = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
            let path = parts.uri.path().to_owned();
            let mut c = cluster.lock().unwrap();
            c.seen
                .push((parts.method.to_string(), path.clone(), body.clone()));
            let (code, answer) = if c.down {
                (
                    503,
                    json!({"kind": "Status", "code": 503, "message": "down"}),
                )
            } else if path == "/apis/authentication.k8s.io/v1/tokenreviews" {
                let token = body["spec"]["token"].as_str().unwrap_or_default();
                let status = c.reviews.iter().find(|(t, _)| *t == token).map_or(
                    json!({"authenticated": false, "error": "invalid token"}),
                    |(_, s)| s.clone(),
                );
                let mut review = body.clone();
                review["status"] = status;
                (201, review)
            } else if path == "/apis/authorization.k8s.io/v1/subjectaccessreviews" {
                let spec = &body["spec"];
                let attributes = &spec["resourceAttributes"];
                let allowed = c.readers.iter().any(|r| spec["user"].as_str() == Some(*r))
                    && attributes["group"] == "pingmesh.io"
                    && attributes["resource"] == "pingmeshes"
                    && attributes["verb"] == "get"
                    && attributes["namespace"] == "mesh";
                let mut review = body.clone();
                review["status"] = json!({ "allowed": allowed });
                (201, review)
            } else if let Some(pod) = c.pods.iter().find(|p| {
                path == format!(
                    "/api/v1/namespaces/{}/pods/{}",
                    p["metadata"]["namespace"].as_str().unwrap(),
                    p["metadata"]["name"].as_str().unwrap()
                )
            }) {
                (200, pod.clone())
            } else {
                (
                    404,
                    json!({"kind": "Status", "code": 404, "reason": "NotFound", "message": "not found"}),
                )
            };
            respond.send_response(
                Response::builder()
                    .status(code)
                    .header("content-type", "application/json")
                    .body(Body::from(serde_json::to_vec(&answer).unwrap()))
                    .unwrap(),
            );
        }
    });
    Client::new(service, "default")
}

fn user(account: &str, extra: Value) -> Value {
    json!({
        "authenticated": true,
        "audiences": ["pingmesh"],
        "user": {"username": format!("system:serviceaccount:mesh:{account}"), "extra": extra},
    })
}

async fn verdict(
    auth: &TokenReviewAuthenticator,
    token: Option<&str>,
) -> Result<Caller, AuthError> {
    let mut metadata = MetadataMap::new();
    if let Some(t) = token {
        metadata.insert("authorization", format!("Bearer {t}").parse().unwrap());
    }
    auth.authenticate(Credentials {
        metadata: &metadata,
        peer_certs: None,
    })
    .await
}

#[tokio::test]
async fn a_token_is_bound_to_the_node_its_review_names() {
    let cluster = Arc::new(Mutex::new(Cluster::default()));
    cluster.lock().unwrap().reviews = vec![
        (
            "agent-a",
            user(
                "pingmesh-agent",
                json!({"authentication.kubernetes.io/node-name": ["node-a"]}),
            ),
        ),
        (
            "other-account",
            user(
                "default",
                json!({"authentication.kubernetes.io/node-name": ["node-a"]}),
            ),
        ),
        ("unbound", user("pingmesh-agent", json!({}))),
        (
            "wrong-audience",
            json!({"authenticated": true, "audiences": ["https://kubernetes.default.svc"],
                   "user": {"username": "system:serviceaccount:mesh:pingmesh-agent"}}),
        ),
    ];
    let auth = TokenReviewAuthenticator::new(fake_api(cluster.clone()), "pingmesh-agent");

    assert_eq!(
        verdict(&auth, Some("agent-a")).await,
        Ok(Caller::Node("node-a".into()))
    );
    // The review asked for the pingmesh audience.
    let seen = cluster.lock().unwrap().seen.clone();
    assert_eq!(seen.len(), 1);
    assert_eq!(seen[0].0, "POST");
    assert_eq!(seen[0].2["spec"]["audiences"], json!(["pingmesh"]));
    assert_eq!(seen[0].2["spec"]["token"], "agent-a");

    // Cached: the second check costs no review.
    verdict(&auth, Some("agent-a")).await.unwrap();
    assert_eq!(cluster.lock().unwrap().seen.len(), 1);

    assert!(matches!(
        verdict(&auth, Some("other-account")).await,
        Err(AuthError::Denied(_))
    ));
    assert!(matches!(
        verdict(&auth, Some("unbound")).await,
        Err(AuthError::Denied(_))
    ));
    for refused in [Some("wrong-audience"), Some("forged"), None] {
        assert!(
            matches!(
                verdict(&auth, refused).await,
                Err(AuthError::Unauthenticated(_))
            ),
            "{refused:?}"
        );
    }
}

#[tokio::test]
async fn without_a_node_claim_the_pod_names_the_node_if_its_uid_matches() {
    let cluster = Arc::new(Mutex::new(Cluster::default()));
    {
        let mut c = cluster.lock().unwrap();
        let pod_claims = |uid: &str| {
            json!({"authentication.kubernetes.io/pod-name": ["agent-x"],
                   "authentication.kubernetes.io/pod-uid": [uid]})
        };
        c.reviews = vec![
            ("live", user("pingmesh-agent", pod_claims("uid-1"))),
            ("stale", user("pingmesh-agent", pod_claims("uid-0"))),
        ];
        c.pods = vec![json!({
            "apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": "agent-x", "namespace": "mesh", "uid": "uid-1"},
            "spec": {"nodeName": "node-b", "containers": []},
        })];
    }
    let auth = TokenReviewAuthenticator::new(fake_api(cluster.clone()), "pingmesh-agent");
    assert_eq!(
        verdict(&auth, Some("live")).await,
        Ok(Caller::Node("node-b".into()))
    );
    assert!(
        cluster
            .lock()
            .unwrap()
            .seen
            .iter()
            .any(|(m, p, _)| m == "GET" && p == "/api/v1/namespaces/mesh/pods/agent-x")
    );
    // A token of a pod that was replaced under the same name.
    assert!(matches!(
        verdict(&auth, Some("stale")).await,
        Err(AuthError::Denied(_))
    ));
}

#[tokio::test]
async fn an_unreachable_api_server_is_unavailable_and_not_remembered() {
    let cluster = Arc::new(Mutex::new(Cluster {
        down: true,
        reviews: vec![(
            "agent-a",
            user(
                "pingmesh-agent",
                json!({"authentication.kubernetes.io/node-name": ["node-a"]}),
            ),
        )],
        ..Cluster::default()
    }));
    let auth = TokenReviewAuthenticator::new(fake_api(cluster.clone()), "pingmesh-agent");
    assert!(matches!(
        verdict(&auth, Some("agent-a")).await,
        Err(AuthError::Unavailable(_))
    ));
    cluster.lock().unwrap().down = false;
    assert_eq!(
        verdict(&auth, Some("agent-a")).await,
        Ok(Caller::Node("node-a".into()))
    );
}

#[tokio::test]
async fn the_controller_refuses_an_agent_acting_for_another_node() {
    let cluster = Arc::new(Mutex::new(Cluster::default()));
    cluster.lock().unwrap().reviews = vec![(
        "agent-a",
        user(
            "pingmesh-agent",
            json!({"authentication.kubernetes.io/node-name": ["node-a"]}),
        ),
    )];
    let auth = Arc::new(TokenReviewAuthenticator::new(
        fake_api(cluster),
        "pingmesh-agent",
    ));
    let dir = tempfile::tempdir().unwrap();
    let config = MeshConfig {
        grpc_addr: "127.0.0.1:0".parse().unwrap(),
        http_addr: "127.0.0.1:0".parse().unwrap(),
        registry: format!("sqlite://{}", dir.path().join("registry.db").display()),
        ..MeshConfig::default()
    };
    let cancel = CancellationToken::new();
    let running = server::start_with_auth(config, cancel.clone(), None, Some(auth))
        .await
        .unwrap();
    let mut client = MeshControllerClient::connect(format!("http://{}", running.grpc_addr))
        .await
        .unwrap();
    let register = |node: &str, token: Option<&str>| {
        let mut request = tonic::Request::new(RegisterRequest {
            node: node.into(),
            agent_version: "test".into(),
            endpoints: vec![Endpoint {
                id: format!("{node}/udp0"),
                transport: Transport::Udp as i32,
                address: "127.0.0.1:9403".into(),
                qpn: 0,
                tor: "rack-1".into(),
                device: String::new(),
            }],
        });
        if let Some(t) = token {
            request
                .metadata_mut()
                .insert("authorization", format!("Bearer {t}").parse().unwrap());
        }
        request
    };
    client
        .register(register("node-a", Some("agent-a")))
        .await
        .unwrap();
    let refused = client
        .register(register("node-b", Some("agent-a")))
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Code::PermissionDenied);
    let anonymous = client.register(register("node-a", None)).await.unwrap_err();
    assert_eq!(anonymous.code(), Code::Unauthenticated);
    cancel.cancel();
    running.wait().await.unwrap();
}

#[tokio::test]
async fn the_json_api_answers_readers_of_pingmeshes_and_metrics_stay_open() {
    use axum::Router;
    use axum::body::Body as AxumBody;
    use axum::routing::get;
    use pingmesh_operator::mesh::identity::api_access::{ApiAccess, require_reader};
    use tower::ServiceExt as _;

    let cluster = Arc::new(Mutex::new(Cluster::default()));
    {
        let mut c = cluster.lock().unwrap();
        let person = |name: &str| {
            json!({"authenticated": true, "audiences": ["https://kubernetes.default.svc"],
                   "user": {"username": name, "groups": ["system:authenticated"]}})
        };
        c.reviews = vec![
            ("alice-token", person("alice")),
            ("bob-token", person("bob")),
        ];
        c.readers = vec!["alice"];
    }
    let access = Arc::new(ApiAccess::new(fake_api(cluster.clone()), "mesh"));
    let router = Router::new()
        .route("/api/v1/summary", get(|| async { "summary" }))
        .route("/metrics", get(|| async { "metrics" }))
        .layer(axum::middleware::from_fn_with_state(access, require_reader));
    let status = |path: &'static str, token: Option<&'static str>| {
        let router = router.clone();
        async move {
            let mut request = http::Request::get(path);
            if let Some(t) = token {
                request = request.header("authorization", format!("Bearer {t}"));
            }
            let response = router
                .oneshot(request.body(AxumBody::empty()).unwrap())
                .await
                .unwrap();
            let challenge = response.headers().get("www-authenticate").cloned();
            (response.status().as_u16(), challenge)
        }
    };
    let (code, challenge) = status("/api/v1/summary", None).await;
    assert_eq!(code, 401);
    assert_eq!(challenge.unwrap(), "Bearer");
    assert_eq!(status("/api/v1/summary", Some("forged")).await.0, 401);
    assert_eq!(status("/api/v1/summary", Some("bob-token")).await.0, 403);
    assert_eq!(status("/api/v1/summary", Some("alice-token")).await.0, 200);
    assert_eq!(status("/metrics", None).await.0, 200);
    // The user's own token is reviewed for the API server's audiences.
    let seen = cluster.lock().unwrap().seen.clone();
    let review = seen
        .iter()
        .find(|(_, p, b)| p.ends_with("/tokenreviews") && b["spec"]["token"] == "alice-token")
        .unwrap();
    assert!(review.2["spec"]["audiences"].is_null());
}
