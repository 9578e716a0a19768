//! Agents in a cluster: a projected `ServiceAccount` token with the
//! `pingmesh` audience, checked with a `TokenReview` and bound to one node.
//!
//! The node comes from the token itself: since Kubernetes 1.30 a pod-bound
//! token carries `authentication.kubernetes.io/node-name` in the review's
//! `extra`. Older clusters give only the pod's name and UID; the pod is then
//! read and its `spec.nodeName` taken, provided the UID matches (a pod
//! deleted and re-created under the same name is another pod). Verdicts are
//! cached for a short while by a SHA-256 of the token, so an agent's
//! once-a-second reports do not each cost a review.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use k8s_openapi::api::authentication::v1::{TokenReview, TokenReviewSpec, UserInfo};
use k8s_openapi::api::core::v1::Pod;
use kube::api::PostParams;
use kube::{Api, Client};
use sha2::{Digest, Sha256};

use super::{AgentAuthenticator, AuthError, Caller, Credentials};

/// The audience agents' tokens are minted for; a token for the API server
/// (or anything else) is refused.
pub const AGENT_AUDIENCE: &str = "pingmesh";
const NODE_NAME: &str = "authentication.kubernetes.io/node-name";
const POD_NAME: &str = "authentication.kubernetes.io/pod-name";
const POD_UID: &str = "authentication.kubernetes.io/pod-uid";
/// How long a verdict on one token stands. Short: a deleted pod's token
/// stops working within this long.
const CACHE_TTL: Duration = Duration::from_mins(1);
/// Bound on cached verdicts (one per live agent token, normally).
const CACHE_LIMIT: usize = 100_000;

/// Checks agents' bearer tokens with the API server.
pub struct TokenReviewAuthenticator {
    client: Client,
    /// Service account agents run as; tokens of any other are refused.
    service_account: String,
    cache: Mutex<Verdicts>,
}

/// Verdicts by SHA-256 of the token, with when each was reached.
type Verdicts = HashMap<[u8; 32], (Instant, Result<Caller, AuthError>)>;

impl std::fmt::Debug for TokenReviewAuthenticator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TokenReviewAuthenticator")
            .field("service_account", &self.service_account)
            .finish_non_exhaustive()
    }
}

impl TokenReviewAuthenticator {
    /// `service_account`: the name agents' pods run under (in whatever
    /// namespace their `PingMesh` lives).
    pub fn new(client: Client, service_account: impl Into<String>) -> Self {
        Self {
            client,
            service_account: service_account.into(),
            cache: Mutex::new(HashMap::new()),
        }
    }

    fn cached(&self, key: &[u8; 32]) -> Option<Result<Caller, AuthError>> {
        let cache = self
            .cache
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let (at, verdict) = cache.get(key)?;
        (at.elapsed() < CACHE_TTL).then(|| verdict.clone())
    }

    fn remember(&self, key: [u8; 32], verdict: &Result<Caller, AuthError>) {
        // The API server being away says nothing about the token.
        if matches!(verdict, Err(AuthError::Unavailable(_))) {
            return;
        }
        let mut cache = self
            .cache
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if cache.len() >= CACHE_LIMIT {
            cache.retain(|_, (at, _)| at.elapsed() < CACHE_TTL);
            if cache.len() >= CACHE_LIMIT {
                cache.clear();
            }
        }
        cache.insert(key, (Instant::now(), verdict.clone()));
    }

    async fn review(&self, token: &str) -> Result<Caller, AuthError> {
        let user = review_token(&self.client, token, Some(AGENT_AUDIENCE)).await?;
        let username = user.username.unwrap_or_default();
        let Some((namespace, account)) = username
            .strip_prefix("system:serviceaccount:")
            .and_then(|rest| rest.split_once(':'))
        else {
            return Err(AuthError::Denied(format!(
                "{username:?} is not a service account"
            )));
        };
        if account != self.service_account {
            return Err(AuthError::Denied(format!(
                "service account {namespace}/{account} is not the agents' ({})",
                self.service_account
            )));
        }
        let extra = user.extra.unwrap_or_default();
        let first = |key: &str| extra.get(key).and_then(|v| v.first()).cloned();
        if let Some(node) = first(NODE_NAME) {
            return Ok(Caller::Node(node));
        }
        let (Some(pod), Some(uid)) = (first(POD_NAME), first(POD_UID)) else {
            return Err(AuthError::Denied(
                "the token is not bound to a pod (mount a projected token)".into(),
            ));
        };
        let found = Api::<Pod>::namespaced(self.client.clone(), namespace)
            .get_opt(&pod)
            .await
            .map_err(|e| AuthError::Unavailable(format!("reading pod {namespace}/{pod}: {e}")))?;
        let Some(found) = found.filter(|p| p.metadata.uid.as_deref() == Some(uid.as_str())) else {
            return Err(AuthError::Denied(format!(
                "pod {namespace}/{pod} of the token no longer exists"
            )));
        };
        found
            .spec
            .and_then(|s| s.node_name)
            .map(Caller::Node)
            .ok_or_else(|| AuthError::Denied(format!("pod {namespace}/{pod} is not on a node")))
    }
}

#[tonic::async_trait]
impl AgentAuthenticator for TokenReviewAuthenticator {
    async fn authenticate(&self, credentials: Credentials<'_>) -> Result<Caller, AuthError> {
        let token = credentials
            .bearer_token()
            .ok_or_else(|| AuthError::Unauthenticated("no bearer token".into()))?;
        let key: [u8; 32] = Sha256::digest(token.as_bytes()).into();
        if let Some(verdict) = self.cached(&key) {
            return verdict;
        }
        let verdict = self.review(token).await;
        self.remember(key, &verdict);
        verdict
    }
}

/// The user behind `token` if the API server authenticates it for
/// `audience` (`None`: the API server's own audiences, as for a user's
/// token); shared with the HTTP API's check.
pub async fn review_token(
    client: &Client,
    token: &str,
    audience: Option<&str>,
) -> Result<UserInfo, AuthError> {
    let review = TokenReview {
        spec: TokenReviewSpec {
            token: Some(token.to_owned()),
            audiences: audience.map(|a| vec![a.to_owned()]),
        },
        ..TokenReview::default()
    };
    let answer = Api::<TokenReview>::all(client.clone())
        .create(&PostParams::default(), &review)
        .await
        .map_err(|e| AuthError::Unavailable(format!("TokenReview: {e}")))?;
    let status = answer.status.unwrap_or_default();
    if status.authenticated != Some(true) {
        let why = status.error.unwrap_or_else(|| "token not accepted".into());
        return Err(AuthError::Unauthenticated(why));
    }
    if let Some(audience) = audience
        && !status
            .audiences
            .unwrap_or_default()
            .iter()
            .any(|a| a == audience)
    {
        return Err(AuthError::Unauthenticated(format!(
            "the token is not for the {audience:?} audience"
        )));
    }
    status
        .user
        .ok_or_else(|| AuthError::Unauthenticated("the review names no user".into()))
}
