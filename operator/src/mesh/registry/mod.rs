//! The agent registry: which agents are alive and which endpoints they own.
//!
//! One [`Registry`] trait with two stores behind it, both speaking the same SQL
//! from [`schema`]:
//!
//! - [`SqliteRegistry`]: a `SQLite` file, the embedded default (one operator replica).
//! - [`RqliteRegistry`]: an rqlite cluster, for a highly available controller.
//!
//! Pick one with a location string and [`open_registry`]:
//!
//! | location                                  | store                              |
//! |-------------------------------------------|------------------------------------|
//! | `sqlite:///var/lib/pingmesh/registry.db`  | `SQLite` file at an absolute path    |
//! | `sqlite://registry.db`, `sqlite:reg.db`   | `SQLite` file, relative path         |
//! | `/var/lib/pingmesh/registry.db`           | `SQLite` file (no scheme means path) |
//! | `rqlite://10.0.0.1:4001,10.0.0.2:4001`    | rqlite cluster, every host known   |
//! | `http://rqlite.pingmesh.svc:4001`         | rqlite, same as `rqlite://`        |
//!
//! rqlite hosts without a port get 4001. HTTPS and credentials are not supported:
//! the client is built without TLS, so run rqlite inside the cluster network.
//!
//! The registry never reads a clock: callers pass `now_ms` (wall-clock
//! milliseconds), which keeps expiry testable and lets every replica agree on time
//! through the values it stores.

mod rqlite;
pub mod schema;
mod sqlite;

use std::collections::HashSet;
use std::fmt;
use std::path::PathBuf;
use std::str::FromStr;
use std::sync::Arc;

use async_trait::async_trait;

use super::types::{AgentRecord, MeshEndpoint};

pub use rqlite::{RqliteOptions, RqliteRegistry};
pub use sqlite::SqliteRegistry;

/// A boxed error from a store's client library.
pub type BoxError = Box<dyn std::error::Error + Send + Sync + 'static>;

/// Persistent state of the mesh: one row per agent, one per endpoint.
///
/// Every method is a single atomic step in the store: readers never see half a
/// registration, and concurrent callers (several controller replicas on rqlite)
/// cannot interleave inside one.
#[async_trait]
pub trait Registry: Send + Sync + fmt::Debug {
    /// Short store name for logs and metric labels: `"sqlite"` or `"rqlite"`.
    fn backend(&self) -> &'static str;

    /// Records that `node` runs an agent with `session` and owns exactly
    /// `endpoints`.
    ///
    /// Replaces the node's agent row and its whole endpoint set: endpoints the node
    /// registered before but does not list now are removed. Sets both
    /// `registered_at_ms` and `last_seen_ms` to `now_ms`.
    ///
    /// Fails with [`RegistryError::EndpointConflict`] if another node owns one of
    /// the endpoint ids, and with [`RegistryError::InvalidRegistration`] if the
    /// request contradicts itself (empty node or endpoint id, an endpoint naming
    /// another node, an id listed twice). Nothing is written when it fails.
    async fn register(
        &self,
        node: &str,
        agent_version: &str,
        session: u64,
        endpoints: &[MeshEndpoint],
        now_ms: u64,
    ) -> Result<(), RegistryError>;

    /// Records that the agent of `node` in `session` is alive at `now_ms`.
    ///
    /// `last_seen_ms` never moves backwards. Fails with
    /// [`RegistryError::UnknownNode`] if the node is not registered (expired, or
    /// the store was reset) and [`RegistryError::StaleSession`] if the node has
    /// registered again since; both mean the agent must register.
    async fn touch(&self, node: &str, session: u64, now_ms: u64) -> Result<(), RegistryError>;

    /// Moves endpoints to other ToRs in one step, skipping endpoints whose agent
    /// named the ToR itself and ids that are not registered. Returns how many
    /// endpoints moved.
    async fn set_tors(&self, moves: &[TorMove]) -> Result<u64, RegistryError>;

    /// Removes the agent of `node` and all its endpoints. Returns whether it was
    /// registered.
    async fn remove_node(&self, node: &str) -> Result<bool, RegistryError>;

    /// Removes every agent last seen before `last_seen_before_ms` (strictly
    /// earlier), together with its endpoints. Returns the removed nodes, sorted.
    async fn expire(&self, last_seen_before_ms: u64) -> Result<Vec<String>, RegistryError>;

    /// All registered agents, sorted by node.
    async fn agents(&self) -> Result<Vec<AgentRecord>, RegistryError>;

    /// All registered endpoints, sorted by id.
    async fn endpoints(&self) -> Result<Vec<MeshEndpoint>, RegistryError>;

    /// The agent of `node`, if registered.
    async fn agent(&self, node: &str) -> Result<Option<AgentRecord>, RegistryError>;
}

/// One endpoint to put under another ToR ([`Registry::set_tors`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TorMove {
    pub endpoint: String,
    pub tor: String,
}

/// Everything that can go wrong in the registry.
#[derive(Debug, thiserror::Error)]
pub enum RegistryError {
    /// The location string names no store this build can open.
    #[error("registry location {location:?} is not usable: {detail}")]
    InvalidLocation { location: String, detail: String },
    /// The store could not be opened or connected to.
    #[error("opening registry {location}: {source}")]
    Open {
        location: String,
        #[source]
        source: BoxError,
    },
    /// Creating or checking the schema failed, or the store holds a schema from
    /// a newer operator.
    #[error("registry schema: {detail}")]
    Migrate {
        detail: String,
        #[source]
        source: Option<BoxError>,
    },
    /// A statement failed in the store.
    #[error("registry {op} failed: {source}")]
    Query {
        op: &'static str,
        #[source]
        source: BoxError,
    },
    /// Another node already owns this endpoint id.
    #[error("endpoint {endpoint} is already registered by node {owner}")]
    EndpointConflict { endpoint: String, owner: String },
    /// The registration request contradicts itself.
    #[error("registration of node {node:?} is invalid: {detail}")]
    InvalidRegistration { node: String, detail: String },
    /// The node has no agent row.
    #[error("node {node} is not registered")]
    UnknownNode { node: String },
    /// The node registered again with another session.
    #[error("node {node} is in session {current}, not {given}")]
    StaleSession {
        node: String,
        current: u64,
        given: u64,
    },
    /// A stored row does not decode into registry types.
    #[error("registry row is corrupt: {detail}")]
    Corrupt { detail: String },
    /// The store (rqlite) did not answer, or had no leader, for the whole retry
    /// window.
    #[error("registry {op} failed: store unavailable: {detail}")]
    Unavailable { op: &'static str, detail: String },
}

impl RegistryError {
    /// Bounded label for metrics and Event reasons.
    pub fn category(&self) -> &'static str {
        match self {
            Self::InvalidLocation { .. } => "invalid_location",
            Self::Open { .. } => "open",
            Self::Migrate { .. } => "migrate",
            Self::Query { .. } => "query",
            Self::EndpointConflict { .. } => "endpoint_conflict",
            Self::InvalidRegistration { .. } => "invalid_registration",
            Self::UnknownNode { .. } => "unknown_node",
            Self::StaleSession { .. } => "stale_session",
            Self::Corrupt { .. } => "corrupt",
            Self::Unavailable { .. } => "unavailable",
        }
    }

    /// Whether the agent should register again (its row is gone or superseded).
    pub fn requires_reregistration(&self) -> bool {
        matches!(self, Self::UnknownNode { .. } | Self::StaleSession { .. })
    }
}

/// Which store to open; parsed from a location string (see the module docs).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RegistryConfig {
    /// A `SQLite` file; created if missing (its directory must exist).
    Sqlite { path: PathBuf },
    /// An rqlite cluster; `hosts` are `host:port` HTTP API addresses. Listing
    /// every node lets the client carry on when one of them is down.
    Rqlite { hosts: Vec<String> },
}

/// The port rqlite serves its HTTP API on unless told otherwise.
const RQLITE_DEFAULT_PORT: u16 = 4001;

impl RegistryConfig {
    /// Parses a location string (see the module docs for the accepted forms).
    pub fn parse(location: &str) -> Result<Self, RegistryError> {
        let trimmed = location.trim();
        let invalid = |detail: &str| RegistryError::InvalidLocation {
            location: location.to_owned(),
            detail: detail.to_owned(),
        };
        if trimmed.is_empty() {
            return Err(invalid("empty location"));
        }
        if let Some(rest) = trimmed.strip_prefix("sqlite:") {
            let path = rest.strip_prefix("//").unwrap_or(rest);
            if path.is_empty() {
                return Err(invalid("sqlite location without a file path"));
            }
            return Ok(Self::Sqlite {
                path: PathBuf::from(path),
            });
        }
        let Some((scheme, rest)) = trimmed.split_once("://") else {
            return Ok(Self::Sqlite {
                path: PathBuf::from(trimmed),
            });
        };
        match scheme.to_ascii_lowercase().as_str() {
            "rqlite" | "http" => Ok(Self::Rqlite {
                hosts: parse_rqlite_hosts(rest).map_err(|detail| invalid(&detail))?,
            }),
            "https" | "rqlites" => Err(invalid(
                "TLS to rqlite is not built in; reach rqlite over plain HTTP inside the cluster network",
            )),
            other => Err(invalid(&format!(
                "unknown scheme {other:?}; use sqlite://, rqlite:// or http://"
            ))),
        }
    }

    /// Opens (or connects to) the store and makes sure the schema is in place.
    pub async fn open(&self) -> Result<Arc<dyn Registry>, RegistryError> {
        match self {
            Self::Sqlite { path } => Ok(Arc::new(SqliteRegistry::open(path.clone()).await?)),
            Self::Rqlite { hosts } => Ok(Arc::new(RqliteRegistry::connect(hosts).await?)),
        }
    }
}

impl FromStr for RegistryConfig {
    type Err = RegistryError;

    fn from_str(location: &str) -> Result<Self, Self::Err> {
        Self::parse(location)
    }
}

impl fmt::Display for RegistryConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Sqlite { path } => write!(f, "sqlite://{}", path.display()),
            Self::Rqlite { hosts } => write!(f, "rqlite://{}", hosts.join(",")),
        }
    }
}

/// Parses `location` (see the module docs) and opens that store.
pub async fn open_registry(location: &str) -> Result<Arc<dyn Registry>, RegistryError> {
    RegistryConfig::parse(location)?.open().await
}

fn parse_rqlite_hosts(list: &str) -> Result<Vec<String>, String> {
    let mut hosts = Vec::new();
    for raw in list.split(',') {
        let host = raw.trim().trim_end_matches('/');
        if host.is_empty() {
            return Err("empty host in rqlite host list".to_owned());
        }
        if host.contains(['/', '@', '?', '#']) {
            return Err(format!(
                "rqlite host {host:?} must be plain host:port (no path, query or credentials)"
            ));
        }
        let with_port = if has_port(host) {
            host.to_owned()
        } else {
            format!("{host}:{RQLITE_DEFAULT_PORT}")
        };
        if !hosts.contains(&with_port) {
            hosts.push(with_port);
        }
    }
    Ok(hosts)
}

/// `host:port` or `[v6]:port`; a bare IPv6 literal has colons but no port.
fn has_port(host: &str) -> bool {
    match host.rsplit_once(':') {
        Some((name, port)) => {
            !port.is_empty()
                && port.bytes().all(|b| b.is_ascii_digit())
                && (!name.contains(':') || name.ends_with(']'))
        }
        None => false,
    }
}

/// Checks a registration and turns it into the rows both stores write.
fn registration_rows(
    node: &str,
    agent_version: &str,
    session: u64,
    endpoints: &[MeshEndpoint],
    now_ms: u64,
) -> Result<(schema::AgentRow, Vec<schema::EndpointRow>), RegistryError> {
    validate_registration(node, endpoints)?;
    let agent = schema::AgentRow::from_record(&AgentRecord {
        node: node.to_owned(),
        session,
        agent_version: agent_version.to_owned(),
        registered_at_ms: now_ms,
        last_seen_ms: now_ms,
    });
    let rows = endpoints
        .iter()
        .map(schema::EndpointRow::from_endpoint)
        .collect();
    Ok((agent, rows))
}

/// Refuses registrations that contradict themselves before any store sees them.
fn validate_registration(node: &str, endpoints: &[MeshEndpoint]) -> Result<(), RegistryError> {
    let invalid = |detail: String| RegistryError::InvalidRegistration {
        node: node.to_owned(),
        detail,
    };
    if node.is_empty() {
        return Err(invalid("empty node name".to_owned()));
    }
    let mut seen = HashSet::with_capacity(endpoints.len());
    for endpoint in endpoints {
        if endpoint.id.is_empty() {
            return Err(invalid("endpoint with an empty id".to_owned()));
        }
        if endpoint.node != node {
            return Err(invalid(format!(
                "endpoint {} names node {:?}",
                endpoint.id, endpoint.node
            )));
        }
        if !seen.insert(endpoint.id.as_str()) {
            return Err(invalid(format!("endpoint {} is listed twice", endpoint.id)));
        }
    }
    Ok(())
}

/// Why a `touch` that changed no row was refused, given the node's current row;
/// `Ok` when the row already carries this session (it registered again meanwhile).
pub(crate) fn touch_refusal(
    node: &str,
    session: u64,
    current: Option<AgentRecord>,
) -> Result<(), RegistryError> {
    match current {
        None => Err(RegistryError::UnknownNode {
            node: node.to_owned(),
        }),
        Some(current) if current.session != session => Err(RegistryError::StaleSession {
            node: node.to_owned(),
            current: current.session,
            given: session,
        }),
        Some(_) => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parsed(location: &str) -> RegistryConfig {
        RegistryConfig::parse(location).unwrap()
    }

    #[test]
    fn sqlite_url_with_three_slashes_is_an_absolute_path() {
        assert_eq!(
            parsed("sqlite:///var/lib/pingmesh/registry.db"),
            RegistryConfig::Sqlite {
                path: PathBuf::from("/var/lib/pingmesh/registry.db")
            }
        );
    }

    #[test]
    fn sqlite_url_with_two_slashes_or_none_is_a_relative_path() {
        let relative = RegistryConfig::Sqlite {
            path: PathBuf::from("data/registry.db"),
        };
        assert_eq!(parsed("sqlite://data/registry.db"), relative);
        assert_eq!(parsed("sqlite:data/registry.db"), relative);
    }

    #[test]
    fn location_without_scheme_is_a_sqlite_path() {
        assert_eq!(
            parsed("./registry.db"),
            RegistryConfig::Sqlite {
                path: PathBuf::from("./registry.db")
            }
        );
    }

    #[test]
    fn rqlite_url_lists_every_host_and_fills_in_the_default_port() {
        assert_eq!(
            parsed("rqlite://10.0.0.1:4001, 10.0.0.2:4011/,rqlite-2"),
            RegistryConfig::Rqlite {
                hosts: vec![
                    "10.0.0.1:4001".to_owned(),
                    "10.0.0.2:4011".to_owned(),
                    "rqlite-2:4001".to_owned()
                ]
            }
        );
    }

    #[test]
    fn http_url_means_rqlite_and_keeps_ipv6_ports() {
        assert_eq!(
            parsed("http://[::1]:4001,[::2]"),
            RegistryConfig::Rqlite {
                hosts: vec!["[::1]:4001".to_owned(), "[::2]:4001".to_owned()]
            }
        );
    }

    #[test]
    fn unusable_locations_are_refused_with_their_reason() {
        for location in [
            "",
            "sqlite://",
            "https://rqlite:4001",
            "rqlite://",
            "rqlite://a:4001,,b:4001",
            "rqlite://user:pw@host:4001",
            "rqlite://host:4001/db",
            "postgres://db",
        ] {
            let err = RegistryConfig::parse(location).unwrap_err();
            assert_eq!(err.category(), "invalid_location", "{location:?}: {err}");
        }
    }

    #[test]
    fn config_displays_as_a_location_that_parses_back() {
        for location in ["sqlite:///tmp/r.db", "rqlite://a:4001,b:4011"] {
            let config = parsed(location);
            assert_eq!(parsed(&config.to_string()), config);
        }
    }

    fn endpoint(id: &str, node: &str) -> MeshEndpoint {
        MeshEndpoint {
            id: id.to_owned(),
            node: node.to_owned(),
            tor: "tor-a".to_owned(),
            transport: 1,
            address: "127.0.0.1:1".to_owned(),
            qpn: 0,
            device: String::new(),
            tor_from_agent: false,
        }
    }

    #[test]
    fn registration_must_name_its_own_node_on_every_endpoint() {
        let err = validate_registration("n1", &[endpoint("n2/p0", "n2")]).unwrap_err();
        assert_eq!(err.category(), "invalid_registration");
    }

    #[test]
    fn registration_must_not_list_an_endpoint_twice() {
        let err = validate_registration("n1", &[endpoint("n1/p0", "n1"), endpoint("n1/p0", "n1")])
            .unwrap_err();
        assert_eq!(err.category(), "invalid_registration");
    }

    #[test]
    fn registration_without_endpoints_is_valid() {
        assert!(validate_registration("n1", &[]).is_ok());
        assert!(validate_registration("", &[]).is_err());
    }
}
