//! The registry in an rqlite cluster: for a highly available mesh controller.
//!
//! - Every write is one rqlite request; multi-statement writes (register, remove,
//!   expire) go in one `transaction=true` request, so rqlite applies all of them
//!   or none through a single Raft log entry.
//! - Reads use the `strong` consistency level: they go through the Raft log on the
//!   leader, so a read sees every write acknowledged before it, on any host we
//!   asked. (rqlite also offers `linearizable`, which is cheaper, but this client
//!   only lets us name none/weak/strong; strong is at least as strict.)
//! - All cluster hosts are known to the client. A host that refuses connections
//!   is skipped, and while the cluster elects a new leader (rqlite answers 503)
//!   operations retry with backoff for [`RqliteOptions::retry_for`] before
//!   giving up with [`RegistryError::Unavailable`]. All operations are idempotent,
//!   so retrying one whose answer was lost is safe; only `expire` may then
//!   under-report the nodes it removed.

use std::fmt;
use std::future::Future;
use std::time::Duration;

use async_trait::async_trait;
use rqlite_rs::error::{QueryBuilderError, RequestError};
use rqlite_rs::query::{Operation, RqliteQuery};
use rqlite_rs::query_result::QueryResult;
use rqlite_rs::request::{RqliteFreshnessLevel, RqliteQueryParam};
use rqlite_rs::response::RqliteResult;
use rqlite_rs::{Row, RqliteClient, RqliteClientBuilder, query};
use serde::de::DeserializeOwned;
use tokio::time::Instant;

use super::schema::{self, AgentRow, EndpointRow};
use super::{Registry, RegistryError, TorMove, registration_rows};
use crate::mesh::types::{AgentRecord, MeshEndpoint};

/// First pause before retrying; doubles up to [`MAX_BACKOFF`].
const FIRST_BACKOFF: Duration = Duration::from_millis(50);
const MAX_BACKOFF: Duration = Duration::from_secs(1);

/// How often `register` starts over when an endpoint collision vanished before
/// its owner could be named (the owner was removed in between).
const REGISTER_ATTEMPTS: usize = 3;

/// Longest piece of an rqlite error body kept in an error message.
const MAX_DETAIL_CHARS: usize = 200;

type Statement = Result<RqliteQuery, QueryBuilderError>;
type TransactionResults = Vec<RqliteResult<QueryResult>>;

/// Tuning for [`RqliteRegistry`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RqliteOptions {
    /// How long one operation keeps retrying while no host answers or the
    /// cluster has no leader. rqlite elects a new leader about a second after
    /// losing one (default election timeout), so the default leaves ample room.
    pub retry_for: Duration,
}

impl Default for RqliteOptions {
    fn default() -> Self {
        Self {
            retry_for: Duration::from_secs(15),
        }
    }
}

/// [`Registry`] stored in an rqlite cluster.
pub struct RqliteRegistry {
    client: RqliteClient,
    hosts: Vec<String>,
    options: RqliteOptions,
}

impl fmt::Debug for RqliteRegistry {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RqliteRegistry")
            .field("hosts", &self.hosts)
            .field("options", &self.options)
            .finish_non_exhaustive()
    }
}

/// Why one attempt failed.
enum Failure {
    /// Worth retrying: no host answered, no leader, a connection broke.
    Transient(String),
    /// Retrying cannot help: bad SQL, refused credentials, unreadable answer.
    Fatal(RequestError),
}

impl RqliteRegistry {
    /// Connects to the cluster at `hosts` (`host:port` of each node's HTTP API)
    /// with default options and brings the schema up to date.
    pub async fn connect(hosts: &[String]) -> Result<Self, RegistryError> {
        Self::connect_with(hosts, RqliteOptions::default()).await
    }

    /// Like [`RqliteRegistry::connect`] with explicit options.
    pub async fn connect_with(
        hosts: &[String],
        options: RqliteOptions,
    ) -> Result<Self, RegistryError> {
        let location = format!("rqlite://{}", hosts.join(","));
        let client = hosts
            .iter()
            .fold(RqliteClientBuilder::new(), |builder, host| {
                builder.known_host(host)
            })
            .default_query_params(vec![RqliteQueryParam::Level(RqliteFreshnessLevel::Strong)])
            // Keep using the host that answered last instead of walking the list
            // from the top (and past a dead first host) on every request.
            .fallback_persistence(true)
            .build()
            .map_err(|e| RegistryError::Open {
                location: location.clone(),
                source: Box::new(e),
            })?;
        let registry = Self {
            client,
            hosts: hosts.to_vec(),
            options,
        };
        registry.migrate().await?;
        tracing::info!(%location, "connected to rqlite registry");
        Ok(registry)
    }

    /// The hosts this client knows.
    pub fn hosts(&self) -> &[String] {
        &self.hosts
    }

    async fn migrate(&self) -> Result<(), RegistryError> {
        let results = self
            .retrying("migrate", || {
                self.send_transaction(
                    schema::CREATE_SCHEMA
                        .iter()
                        .map(|sql| (*sql).try_into())
                        .collect(),
                )
            })
            .await?;
        if let Some(error) = first_statement_error(&results) {
            return Err(RegistryError::Migrate {
                detail: "creating the rqlite schema failed".to_owned(),
                source: Some(error.into()),
            });
        }
        let version = self.schema_version().await?;
        for upgrade in schema::pending_upgrades(version)? {
            let results = self
                .retrying("migrate", || {
                    self.send_transaction(
                        upgrade
                            .statements
                            .iter()
                            .map(|sql| Ok(write(sql)))
                            .collect(),
                    )
                })
                .await?;
            if let Some(error) = first_statement_error(&results) {
                // Another replica may have upgraded the store between our version
                // read and this transaction (the ALTERs then fail on existing
                // columns and roll back): that is as good as our own upgrade.
                if self.schema_version().await? >= upgrade.to {
                    continue;
                }
                return Err(RegistryError::Migrate {
                    detail: format!("upgrading the rqlite schema to version {}", upgrade.to),
                    source: Some(error.into()),
                });
            }
            tracing::info!(version = upgrade.to, "upgraded the rqlite registry schema");
        }
        Ok(())
    }

    async fn schema_version(&self) -> Result<i64, RegistryError> {
        let rows = self
            .fetch("migrate", || query!(schema::SELECT_SCHEMA_VERSION))
            .await?;
        match rows.first() {
            Some(row) => column::<i64>(row, "schema_version", "version"),
            None => Err(RegistryError::Migrate {
                detail: "schema_version has no row after creating the schema".to_owned(),
                source: None,
            }),
        }
    }

    /// Sends one transaction; an answer without results failed on its way.
    async fn send_transaction(
        &self,
        statements: Vec<Statement>,
    ) -> Result<TransactionResults, RequestError> {
        let results = self.client.transaction(statements).await?;
        if results.is_empty() {
            return Err(RequestError::NoRowsReturned);
        }
        Ok(results)
    }

    /// Runs `attempt` until it succeeds, fails for good, or `retry_for` is spent.
    async fn retrying<T, F, Fut>(
        &self,
        op: &'static str,
        mut attempt: F,
    ) -> Result<T, RegistryError>
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = Result<T, RequestError>>,
    {
        let deadline = Instant::now() + self.options.retry_for;
        let mut backoff = FIRST_BACKOFF;
        loop {
            let error = match attempt().await {
                Ok(value) => return Ok(value),
                Err(error) => error,
            };
            match classify(error) {
                Failure::Fatal(source) => {
                    return Err(RegistryError::Query {
                        op,
                        source: Box::new(source),
                    });
                }
                Failure::Transient(detail) if Instant::now() + backoff < deadline => {
                    tracing::debug!(op, %detail, ?backoff, "rqlite not ready; retrying");
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(MAX_BACKOFF);
                }
                Failure::Transient(detail) => {
                    return Err(RegistryError::Unavailable { op, detail });
                }
            }
        }
    }

    async fn fetch(
        &self,
        op: &'static str,
        statement: impl Fn() -> Statement,
    ) -> Result<Vec<Row>, RegistryError> {
        self.retrying(op, || self.client.fetch(statement())).await
    }

    /// Runs `statements` as one transaction; a failed statement (which rolled the
    /// whole transaction back) is a [`RegistryError::Query`].
    async fn transaction(
        &self,
        op: &'static str,
        statements: impl Fn() -> Vec<Statement>,
    ) -> Result<TransactionResults, RegistryError> {
        let results = self
            .retrying(op, || self.send_transaction(statements()))
            .await?;
        match first_statement_error(&results) {
            Some(error) => Err(RegistryError::Query {
                op,
                source: error.into(),
            }),
            None => Ok(results),
        }
    }

    /// Names the node that owns one of `endpoints`, if any other node does.
    async fn foreign_owner(
        &self,
        node: &str,
        endpoints: &[EndpointRow],
    ) -> Result<Option<RegistryError>, RegistryError> {
        for endpoint in endpoints {
            let rows = self
                .fetch("register", || {
                    query!(schema::SELECT_FOREIGN_OWNER, endpoint.id, node)
                })
                .await?;
            if let Some(row) = rows.first() {
                return Ok(Some(RegistryError::EndpointConflict {
                    endpoint: endpoint.id.clone(),
                    owner: column(row, "endpoints", "node")?,
                }));
            }
        }
        Ok(None)
    }
}

/// A write statement without parameters, built by hand: the client library's
/// `query!` refuses verbs it does not route (such as `ALTER`), and inside a
/// transaction the verb does not matter (every statement goes to the execute
/// endpoint).
fn write(sql: &str) -> RqliteQuery {
    RqliteQuery {
        query: sql.to_owned(),
        args: Vec::new(),
        op: Operation::Update,
    }
}

fn classify(error: RequestError) -> Failure {
    match error {
        RequestError::NoAvailableHosts => {
            Failure::Transient("no rqlite host accepted the connection".to_owned())
        }
        RequestError::ReqwestError { status, body }
            if status.is_server_error() || matches!(status.as_u16(), 408 | 429) =>
        {
            Failure::Transient(format!("HTTP {status}: {}", shorten(&body)))
        }
        // rqlite answers a request it could not forward to the leader with an
        // empty result list and a top-level error the client library drops; every
        // statement we send yields a result, so none means the request failed.
        RequestError::NoRowsReturned => Failure::Transient(
            "rqlite answered without results (a node could not reach the leader)".to_owned(),
        ),
        RequestError::FailedReadingResponse(_) | RequestError::SwitchoverWrongError(_) => {
            Failure::Transient(shorten(&error.to_string()))
        }
        // A node that lost its leader reports it as an error of the statement.
        RequestError::DatabaseError(ref message) if message.contains("leader") => {
            Failure::Transient(shorten(message))
        }
        other => Failure::Fatal(other),
    }
}

fn shorten(text: &str) -> String {
    text.trim().chars().take(MAX_DETAIL_CHARS).collect()
}

fn first_statement_error(results: &[RqliteResult<QueryResult>]) -> Option<String> {
    results.iter().find_map(|result| match result {
        RqliteResult::Error(error) => Some(error.error.clone()),
        RqliteResult::Success(_) => None,
    })
}

/// Rows changed by statement `index` of a transaction.
fn rows_affected(
    op: &'static str,
    results: &[RqliteResult<QueryResult>],
    index: usize,
) -> Result<i64, RegistryError> {
    match results.get(index) {
        Some(RqliteResult::Success(result)) => Ok(result.rows_affected().unwrap_or(0)),
        Some(RqliteResult::Error(error)) => Err(RegistryError::Query {
            op,
            source: error.error.clone().into(),
        }),
        None => Err(RegistryError::Query {
            op,
            source: format!(
                "rqlite answered {} results, statement {index} has none",
                results.len()
            )
            .into(),
        }),
    }
}

fn column<T: DeserializeOwned>(row: &Row, table: &str, name: &str) -> Result<T, RegistryError> {
    row.get(name).map_err(|e| RegistryError::Corrupt {
        detail: format!("{table}.{name}: {e}"),
    })
}

fn agent_from(row: &Row) -> Result<AgentRecord, RegistryError> {
    AgentRow {
        node: column(row, "agents", "node")?,
        session: column(row, "agents", "session")?,
        agent_version: column(row, "agents", "agent_version")?,
        registered_at_ms: column(row, "agents", "registered_at_ms")?,
        last_seen_ms: column(row, "agents", "last_seen_ms")?,
    }
    .into_record()
}

fn endpoint_from(row: &Row) -> Result<MeshEndpoint, RegistryError> {
    EndpointRow {
        id: column(row, "endpoints", "id")?,
        node: column(row, "endpoints", "node")?,
        tor: column(row, "endpoints", "tor")?,
        transport: column(row, "endpoints", "transport")?,
        address: column(row, "endpoints", "address")?,
        qpn: column(row, "endpoints", "qpn")?,
        device: column(row, "endpoints", "device")?,
        tor_from_agent: column(row, "endpoints", "tor_from_agent")?,
    }
    .into_endpoint()
}

fn register_statements(agent: &AgentRow, endpoints: &[EndpointRow]) -> Vec<Statement> {
    let mut statements = Vec::with_capacity(endpoints.len() + 2);
    statements.push(query!(
        schema::UPSERT_AGENT,
        agent.node,
        agent.session,
        agent.agent_version,
        agent.registered_at_ms,
        agent.last_seen_ms
    ));
    statements.push(query!(schema::DELETE_NODE_ENDPOINTS, agent.node));
    // With the node's own endpoints deleted first, an id collision on insert can
    // only be another node's endpoint, and it rolls the whole transaction back.
    statements.extend(endpoints.iter().map(|endpoint| {
        query!(
            schema::INSERT_ENDPOINT,
            endpoint.id,
            endpoint.node,
            endpoint.tor,
            endpoint.transport,
            endpoint.address,
            endpoint.qpn,
            endpoint.device,
            endpoint.tor_from_agent
        )
    }));
    statements
}

fn expire_statements(nodes: &[String], before: i64) -> Vec<Statement> {
    nodes
        .iter()
        .flat_map(|node| {
            [
                query!(
                    schema::DELETE_EXPIRED_NODE_ENDPOINTS,
                    node.as_str(),
                    node.as_str(),
                    before
                ),
                query!(schema::DELETE_EXPIRED_AGENT, node.as_str(), before),
            ]
        })
        .collect()
}

#[async_trait]
impl Registry for RqliteRegistry {
    fn backend(&self) -> &'static str {
        "rqlite"
    }

    async fn register(
        &self,
        node: &str,
        agent_version: &str,
        session: u64,
        endpoints: &[MeshEndpoint],
        now_ms: u64,
    ) -> Result<(), RegistryError> {
        const OP: &str = "register";
        let (agent, rows) = registration_rows(node, agent_version, session, endpoints, now_ms)?;
        for _ in 0..REGISTER_ATTEMPTS {
            let results = self
                .retrying(OP, || {
                    self.send_transaction(register_statements(&agent, &rows))
                })
                .await?;
            match first_statement_error(&results) {
                None => return Ok(()),
                Some(error) if error.contains(schema::ENDPOINT_ID_COLLISION) => {
                    if let Some(conflict) = self.foreign_owner(node, &rows).await? {
                        return Err(conflict);
                    }
                    tracing::debug!(node, "endpoint collision vanished; registering again");
                }
                Some(error) => {
                    return Err(RegistryError::Query {
                        op: OP,
                        source: error.into(),
                    });
                }
            }
        }
        Err(RegistryError::Query {
            op: OP,
            source: "endpoint ownership kept changing during registration".into(),
        })
    }

    async fn touch(&self, node: &str, session: u64, now_ms: u64) -> Result<(), RegistryError> {
        let result = self
            .retrying("touch", || {
                self.client.exec(query!(
                    schema::TOUCH_AGENT,
                    schema::millis_to_sql(now_ms),
                    node,
                    schema::session_to_sql(session)
                ))
            })
            .await?;
        if result.changed() {
            return Ok(());
        }
        super::touch_refusal(node, session, self.agent(node).await?)
    }

    async fn remove_node(&self, node: &str) -> Result<bool, RegistryError> {
        const OP: &str = "remove_node";
        let results = self
            .transaction(OP, || {
                vec![
                    query!(schema::DELETE_NODE_ENDPOINTS, node),
                    query!(schema::DELETE_AGENT, node),
                ]
            })
            .await?;
        Ok(rows_affected(OP, &results, 1)? > 0)
    }

    async fn set_tors(&self, moves: &[TorMove]) -> Result<u64, RegistryError> {
        const OP: &str = "set_tors";
        if moves.is_empty() {
            return Ok(0);
        }
        let results = self
            .transaction(OP, || {
                moves
                    .iter()
                    .map(|m| {
                        query!(
                            schema::UPDATE_ENDPOINT_TOR,
                            m.tor.as_str(),
                            m.endpoint.as_str()
                        )
                    })
                    .collect()
            })
            .await?;
        let mut changed = 0u64;
        for index in 0..moves.len() {
            changed += u64::try_from(rows_affected(OP, &results, index)?).unwrap_or(0);
        }
        Ok(changed)
    }

    async fn expire(&self, last_seen_before_ms: u64) -> Result<Vec<String>, RegistryError> {
        const OP: &str = "expire";
        let before = schema::millis_to_sql(last_seen_before_ms);
        let candidates = self
            .fetch(OP, || query!(schema::SELECT_EXPIRED_NODES, before))
            .await?
            .iter()
            .map(|row| column::<String>(row, "agents", "node"))
            .collect::<Result<Vec<_>, _>>()?;
        if candidates.is_empty() {
            return Ok(Vec::new());
        }
        let results = self
            .transaction(OP, || expire_statements(&candidates, before))
            .await?;
        let mut removed = Vec::with_capacity(candidates.len());
        for (index, node) in candidates.into_iter().enumerate() {
            if rows_affected(OP, &results, 2 * index + 1)? > 0 {
                removed.push(node);
            }
        }
        Ok(removed)
    }

    async fn agents(&self) -> Result<Vec<AgentRecord>, RegistryError> {
        self.fetch("agents", || query!(schema::SELECT_AGENTS))
            .await?
            .iter()
            .map(agent_from)
            .collect()
    }

    async fn endpoints(&self) -> Result<Vec<MeshEndpoint>, RegistryError> {
        self.fetch("endpoints", || query!(schema::SELECT_ENDPOINTS))
            .await?
            .iter()
            .map(endpoint_from)
            .collect()
    }

    async fn agent(&self, node: &str) -> Result<Option<AgentRecord>, RegistryError> {
        self.fetch("agent", || query!(schema::SELECT_AGENT, node))
            .await?
            .first()
            .map(agent_from)
            .transpose()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn leader_loss_and_unreachable_hosts_are_worth_retrying() {
        for error in [
            RequestError::NoAvailableHosts,
            RequestError::NoRowsReturned,
            RequestError::DatabaseError("leader not found".to_owned()),
        ] {
            assert!(matches!(classify(error), Failure::Transient(_)));
        }
    }

    #[test]
    fn sql_errors_are_not_retried() {
        let error = RequestError::DatabaseError("no such table: agents".to_owned());
        assert!(matches!(classify(error), Failure::Fatal(_)));
        assert!(matches!(
            classify(RequestError::Unauthorized),
            Failure::Fatal(_)
        ));
    }

    #[test]
    fn register_statements_bind_every_placeholder() {
        let agent = AgentRow {
            node: "n1".to_owned(),
            session: 1,
            agent_version: "v".to_owned(),
            registered_at_ms: 1,
            last_seen_ms: 1,
        };
        let endpoint = EndpointRow {
            id: "n1/p0".to_owned(),
            node: "n1".to_owned(),
            tor: "t".to_owned(),
            transport: 1,
            address: "a".to_owned(),
            qpn: 0,
            device: String::new(),
            tor_from_agent: 1,
        };
        let statements = register_statements(&agent, &[endpoint.clone(), endpoint]);
        assert_eq!(statements.len(), 4);
        assert!(statements.iter().all(Result::is_ok));
        assert!(
            expire_statements(&["n1".to_owned()], 5)
                .iter()
                .all(Result::is_ok)
        );
    }
}
