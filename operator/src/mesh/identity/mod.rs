//! Who is calling the agent-facing gRPC API, and for which node it may act.
//!
//! An agent may act only for the node it runs on: every RPC names a node,
//! and [`may_act_for`] refuses a request whose node differs from the one
//! the caller proved. How the caller proves it depends on where the
//! controller runs (docs/security.md):
//! - outside a cluster, a client certificate whose subject common name is
//!   the node name ([`ClientCertificates`]);
//! - in a cluster, a projected `ServiceAccount` token checked with a
//!   `TokenReview` and bound to the pod's node (`token`, feature `kubernetes`);
//! - on loopback or with the explicit plain-text setting, nothing
//!   ([`Unverified`]): every caller may act for any node.

use std::fmt::Debug;

use tokio_rustls::rustls::pki_types::CertificateDer;
use tonic::metadata::MetadataMap;

#[cfg(feature = "kubernetes")]
pub mod api_access;
#[cfg(feature = "kubernetes")]
pub mod token;

/// What a caller proved.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Caller {
    /// May act for this node only.
    Node(String),
    /// Nothing was checked (plain text on loopback, or the explicit setting).
    Unverified,
}

#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
pub enum AuthError {
    /// No credentials, or credentials that prove nothing.
    #[error("not authenticated: {0}")]
    Unauthenticated(String),
    /// Valid credentials of someone who is not an agent.
    #[error("not allowed: {0}")]
    Denied(String),
    /// The check itself failed (API server unreachable): try again later.
    #[error("cannot check credentials now: {0}")]
    Unavailable(String),
}

/// The credentials of one request.
#[derive(Debug, Clone, Copy)]
pub struct Credentials<'a> {
    pub metadata: &'a MetadataMap,
    /// The TLS client certificate chain, leaf first; `None` without mutual TLS.
    pub peer_certs: Option<&'a [CertificateDer<'static>]>,
}

impl Credentials<'_> {
    /// The bearer token of the `authorization` header, if there is one.
    pub fn bearer_token(&self) -> Option<&str> {
        let value = self.metadata.get("authorization")?.to_str().ok()?;
        let (scheme, token) = value.split_once(' ')?;
        let token = token.trim();
        (scheme.eq_ignore_ascii_case("bearer") && !token.is_empty()).then_some(token)
    }
}

/// Decides who a gRPC caller is.
#[tonic::async_trait]
pub trait AgentAuthenticator: Send + Sync + Debug {
    async fn authenticate(&self, credentials: Credentials<'_>) -> Result<Caller, AuthError>;
}

/// Checks nothing: for plain text on loopback or by explicit setting.
#[derive(Debug, Clone, Copy, Default)]
pub struct Unverified;

#[tonic::async_trait]
impl AgentAuthenticator for Unverified {
    async fn authenticate(&self, _: Credentials<'_>) -> Result<Caller, AuthError> {
        Ok(Caller::Unverified)
    }
}

/// Mutual TLS: the TLS layer already checked that the client certificate
/// chains to the configured client CA and is valid for client
/// authentication; this reads the node name out of it.
#[derive(Debug, Clone, Copy, Default)]
pub struct ClientCertificates;

#[tonic::async_trait]
impl AgentAuthenticator for ClientCertificates {
    async fn authenticate(&self, credentials: Credentials<'_>) -> Result<Caller, AuthError> {
        let leaf = credentials
            .peer_certs
            .and_then(<[_]>::first)
            .ok_or_else(|| AuthError::Unauthenticated("no client certificate".into()))?;
        node_of_certificate(leaf).map(Caller::Node)
    }
}

/// The node a client certificate names: its subject common name, which must
/// be the only one and a valid node name.
pub fn node_of_certificate(der: &[u8]) -> Result<String, AuthError> {
    let (_, cert) = x509_parser::parse_x509_certificate(der)
        .map_err(|e| AuthError::Unauthenticated(format!("unreadable client certificate: {e}")))?;
    let mut names = cert.subject().iter_common_name();
    let (Some(name), None) = (names.next(), names.next()) else {
        return Err(AuthError::Unauthenticated(
            "a client certificate must carry exactly one subject common name (the node name)"
                .into(),
        ));
    };
    let node = name.as_str().map_err(|e| {
        AuthError::Unauthenticated(format!("client certificate common name unreadable: {e}"))
    })?;
    if !pingmesh_proto::limits::is_valid_id(node) {
        return Err(AuthError::Unauthenticated(format!(
            "client certificate common name {node:?} is not a node name"
        )));
    }
    Ok(node.to_owned())
}

/// Whether `caller` may send a request for `node`.
pub fn may_act_for(caller: &Caller, node: &str) -> Result<(), AuthError> {
    match caller {
        Caller::Unverified => Ok(()),
        Caller::Node(own) if own == node => Ok(()),
        Caller::Node(own) => Err(AuthError::Denied(format!(
            "the agent of node {own:?} may not act for node {node:?}"
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cert_with_names(names: &[&str]) -> Vec<u8> {
        let mut params = rcgen::CertificateParams::default();
        params.distinguished_name = rcgen::DistinguishedName::new();
        for name in names {
            params
                .distinguished_name
                .push(rcgen::DnType::CommonName, *name);
        }
        let key = rcgen::KeyPair::generate().unwrap();
        params.self_signed(&key).unwrap().der().to_vec()
    }

    #[test]
    fn the_common_name_is_the_node() {
        assert_eq!(
            node_of_certificate(&cert_with_names(&["node-a"])).unwrap(),
            "node-a"
        );
    }

    #[test]
    fn no_common_name_a_bad_one_or_garbage_prove_nothing() {
        for der in [
            cert_with_names(&[]),
            cert_with_names(&["two words"]),
            b"not a certificate".to_vec(),
        ] {
            assert!(matches!(
                node_of_certificate(&der),
                Err(AuthError::Unauthenticated(_))
            ));
        }
    }

    #[test]
    fn a_node_acts_for_itself_only() {
        let a = Caller::Node("a".into());
        assert!(may_act_for(&a, "a").is_ok());
        assert!(matches!(may_act_for(&a, "b"), Err(AuthError::Denied(_))));
        assert!(may_act_for(&Caller::Unverified, "b").is_ok());
    }

    #[test]
    fn only_a_bearer_authorization_is_a_token() {
        let mut metadata = MetadataMap::new();
        let credentials = |m: &MetadataMap| {
            Credentials {
                metadata: m,
                peer_certs: None,
            }
            .bearer_token()
            .map(str::to_owned)
        };
        assert_eq!(credentials(&metadata), None);
        metadata.insert("authorization", "Bearer abc.def".parse().unwrap());
        assert_eq!(credentials(&metadata).as_deref(), Some("abc.def"));
        metadata.insert("authorization", "Basic abc".parse().unwrap());
        assert_eq!(credentials(&metadata), None);
        metadata.insert("authorization", "Bearer ".parse().unwrap());
        assert_eq!(credentials(&metadata), None);
    }
}
