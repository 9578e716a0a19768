//! Who may read the JSON API in a cluster: whoever may read `PingMeshes`.
//!
//! A request under `/api/` must carry `Authorization: Bearer <token>`; the
//! API server authenticates the token (`TokenReview`, its own audiences)
//! and says whether that user may `get` `pingmeshes.pingmesh.io` in the
//! mesh's namespace (`SubjectAccessReview`). So the JSON API follows the
//! cluster's RBAC, as `kubectl get pingmeshes` does. `/metrics`, `/livez`
//! and `/readyz` stay open for Prometheus and kubelet (docs/security.md).
//! Verdicts are cached for a short while by the token's SHA-256.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::Json;
use axum::extract::{Request, State};
use axum::http::{StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use k8s_openapi::api::authorization::v1::{
    ResourceAttributes, SubjectAccessReview, SubjectAccessReviewSpec,
};
use kube::api::PostParams;
use kube::{Api, Client};
use sha2::{Digest, Sha256};

use super::AuthError;
use super::token::review_token;

/// How long a verdict on one token stands: a revoked role binding stops
/// working within this long.
const CACHE_TTL: Duration = Duration::from_secs(30);
const CACHE_LIMIT: usize = 10_000;

type Verdicts = HashMap<[u8; 32], (Instant, Result<(), AuthError>)>;

/// Checks JSON API callers against the cluster's RBAC.
pub struct ApiAccess {
    client: Client,
    /// Namespace of the `PingMesh` the controller serves; read access there is required.
    namespace: String,
    cache: Mutex<Verdicts>,
}

impl std::fmt::Debug for ApiAccess {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ApiAccess")
            .field("namespace", &self.namespace)
            .finish_non_exhaustive()
    }
}

impl ApiAccess {
    pub fn new(client: Client, namespace: impl Into<String>) -> Self {
        Self {
            client,
            namespace: namespace.into(),
            cache: Mutex::new(HashMap::new()),
        }
    }

    /// Whether the bearer of `authorization` (the header's value) may read.
    pub async fn check(&self, authorization: Option<&str>) -> Result<(), AuthError> {
        let token = authorization
            .and_then(|v| v.split_once(' '))
            .filter(|(scheme, token)| scheme.eq_ignore_ascii_case("bearer") && !token.is_empty())
            .map(|(_, token)| token.trim())
            .ok_or_else(|| {
                AuthError::Unauthenticated("send Authorization: Bearer <token>".into())
            })?;
        let key: [u8; 32] = Sha256::digest(token.as_bytes()).into();
        if let Some(verdict) = self.cached(&key) {
            return verdict;
        }
        let verdict = self.review(token).await;
        if !matches!(verdict, Err(AuthError::Unavailable(_))) {
            let mut cache = self
                .cache
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            if cache.len() >= CACHE_LIMIT {
                cache.clear();
            }
            cache.insert(key, (Instant::now(), verdict.clone()));
        }
        verdict
    }

    fn cached(&self, key: &[u8; 32]) -> Option<Result<(), AuthError>> {
        let cache = self
            .cache
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let (at, verdict) = cache.get(key)?;
        (at.elapsed() < CACHE_TTL).then(|| verdict.clone())
    }

    async fn review(&self, token: &str) -> Result<(), AuthError> {
        let user = review_token(&self.client, token, None).await?;
        let username = user.username.clone().unwrap_or_default();
        let review = SubjectAccessReview {
            spec: SubjectAccessReviewSpec {
                user: user.username,
                groups: user.groups,
                uid: user.uid,
                extra: user.extra,
                resource_attributes: Some(ResourceAttributes {
                    group: Some("pingmesh.io".into()),
                    resource: Some("pingmeshes".into()),
                    verb: Some("get".into()),
                    namespace: Some(self.namespace.clone()),
                    ..ResourceAttributes::default()
                }),
                ..SubjectAccessReviewSpec::default()
            },
            ..SubjectAccessReview::default()
        };
        let answer = Api::<SubjectAccessReview>::all(self.client.clone())
            .create(&PostParams::default(), &review)
            .await
            .map_err(|e| AuthError::Unavailable(format!("SubjectAccessReview: {e}")))?;
        if answer.status.is_some_and(|s| s.allowed) {
            Ok(())
        } else {
            Err(AuthError::Denied(format!(
                "{username} may not get pingmeshes in namespace {}",
                self.namespace
            )))
        }
    }
}

/// Middleware: `/api/` routes need a reader's token; everything else passes.
pub async fn require_reader(
    State(access): State<Arc<ApiAccess>>,
    request: Request,
    next: Next,
) -> Response {
    if !request.uri().path().starts_with("/api/") {
        return next.run(request).await;
    }
    let authorization = request
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok());
    match access.check(authorization).await {
        Ok(()) => next.run(request).await,
        Err(e) => refusal(&e),
    }
}

fn refusal(e: &AuthError) -> Response {
    let status = match e {
        AuthError::Unauthenticated(_) => StatusCode::UNAUTHORIZED,
        AuthError::Denied(_) => StatusCode::FORBIDDEN,
        AuthError::Unavailable(_) => StatusCode::SERVICE_UNAVAILABLE,
    };
    let body = Json(serde_json::json!({ "error": e.to_string() }));
    if status == StatusCode::UNAUTHORIZED {
        (status, [(header::WWW_AUTHENTICATE, "Bearer")], body).into_response()
    } else {
        (status, body).into_response()
    }
}
