//! The registry in a `SQLite` file: the embedded default for a single operator.
//!
//! rusqlite is synchronous, so each operation runs on tokio's blocking pool with
//! the one connection behind a mutex: operations are serialized in this process,
//! and the async runtime never waits on disk. The file is in WAL mode so other
//! processes (a `sqlite3` shell, a backup) can read while the operator writes.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use async_trait::async_trait;
use rusqlite::{Connection, OptionalExtension, Row, TransactionBehavior, params};

use super::schema::{self, AgentRow, EndpointRow};
use super::{Registry, RegistryError, TorMove, registration_rows};
use crate::mesh::types::{AgentRecord, MeshEndpoint};

/// How long a statement waits for another process's lock on the file before
/// failing.
const BUSY_TIMEOUT: Duration = Duration::from_secs(5);

/// [`Registry`] stored in one `SQLite` file.
#[derive(Debug)]
pub struct SqliteRegistry {
    path: PathBuf,
    connection: Arc<Mutex<Connection>>,
}

impl SqliteRegistry {
    /// Opens (creating if missing) the `SQLite` file at `path` and brings its schema
    /// up to date. The directory must exist. Needs a tokio runtime.
    pub async fn open(path: impl Into<PathBuf>) -> Result<Self, RegistryError> {
        let path = path.into();
        let open_path = path.clone();
        let connection = tokio::task::spawn_blocking(move || open_connection(&open_path))
            .await
            .map_err(|e| RegistryError::Open {
                location: path.display().to_string(),
                source: Box::new(e),
            })??;
        tracing::info!(path = %path.display(), "opened SQLite registry");
        Ok(Self {
            path,
            connection: Arc::new(Mutex::new(connection)),
        })
    }

    /// The file this registry lives in.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Runs `work` with the connection on the blocking pool.
    async fn with_connection<T, F>(&self, op: &'static str, work: F) -> Result<T, RegistryError>
    where
        T: Send + 'static,
        F: FnOnce(&mut Connection) -> Result<T, RegistryError> + Send + 'static,
    {
        let connection = Arc::clone(&self.connection);
        tokio::task::spawn_blocking(move || {
            // A panic inside `work` poisons the mutex, but the connection is still
            // sound: an open transaction rolled back when it was dropped.
            let mut connection = connection.lock().unwrap_or_else(PoisonError::into_inner);
            work(&mut connection)
        })
        .await
        .map_err(|e| RegistryError::Query {
            op,
            source: Box::new(e),
        })?
    }
}

fn open_connection(path: &Path) -> Result<Connection, RegistryError> {
    let open_error = |e: rusqlite::Error| RegistryError::Open {
        location: path.display().to_string(),
        source: Box::new(e),
    };
    let mut connection = Connection::open(path).map_err(open_error)?;
    connection.busy_timeout(BUSY_TIMEOUT).map_err(open_error)?;
    let journal_mode: String = connection
        .pragma_update_and_check(None, "journal_mode", "WAL", |row| row.get(0))
        .map_err(open_error)?;
    if !journal_mode.eq_ignore_ascii_case("wal") {
        tracing::warn!(path = %path.display(), journal_mode, "SQLite registry is not in WAL mode");
    }
    // WAL with synchronous=NORMAL cannot corrupt the file; a power cut may lose
    // the last commits, which agents repair by registering again.
    connection
        .pragma_update(None, "synchronous", "NORMAL")
        .map_err(open_error)?;
    connection
        .pragma_update(None, "foreign_keys", true)
        .map_err(open_error)?;
    migrate(&mut connection)?;
    Ok(connection)
}

fn migrate(connection: &mut Connection) -> Result<(), RegistryError> {
    let migrate_error = |e: rusqlite::Error| RegistryError::Migrate {
        detail: "creating the SQLite schema failed".to_owned(),
        source: Some(Box::new(e)),
    };
    let tx = connection
        .transaction_with_behavior(TransactionBehavior::Immediate)
        .map_err(migrate_error)?;
    for statement in schema::CREATE_SCHEMA {
        tx.execute(statement, []).map_err(migrate_error)?;
    }
    let version: i64 = tx
        .query_row(schema::SELECT_SCHEMA_VERSION, [], |row| row.get("version"))
        .map_err(migrate_error)?;
    // The IMMEDIATE transaction holds the write lock: no other process can
    // upgrade the file between the version read above and these statements.
    for upgrade in schema::pending_upgrades(version)? {
        for statement in upgrade.statements {
            tx.execute(statement, []).map_err(migrate_error)?;
        }
        tracing::info!(version = upgrade.to, "upgraded the SQLite registry schema");
    }
    tx.commit().map_err(migrate_error)
}

/// Maps a rusqlite error: decoding failures mean a corrupt row, the rest a failed
/// statement.
fn sql_error(op: &'static str) -> impl Fn(rusqlite::Error) -> RegistryError {
    move |e| match e {
        rusqlite::Error::InvalidColumnType(..)
        | rusqlite::Error::FromSqlConversionFailure(..)
        | rusqlite::Error::IntegralValueOutOfRange(..) => RegistryError::Corrupt {
            detail: format!("{op}: {e}"),
        },
        other => RegistryError::Query {
            op,
            source: Box::new(other),
        },
    }
}

fn agent_row(row: &Row<'_>) -> rusqlite::Result<AgentRow> {
    Ok(AgentRow {
        node: row.get("node")?,
        session: row.get("session")?,
        agent_version: row.get("agent_version")?,
        registered_at_ms: row.get("registered_at_ms")?,
        last_seen_ms: row.get("last_seen_ms")?,
    })
}

fn endpoint_row(row: &Row<'_>) -> rusqlite::Result<EndpointRow> {
    Ok(EndpointRow {
        id: row.get("id")?,
        node: row.get("node")?,
        tor: row.get("tor")?,
        transport: row.get("transport")?,
        address: row.get("address")?,
        qpn: row.get("qpn")?,
        device: row.get("device")?,
        tor_from_agent: row.get("tor_from_agent")?,
    })
}

fn register_in(
    connection: &mut Connection,
    agent: &AgentRow,
    endpoints: &[EndpointRow],
) -> Result<(), RegistryError> {
    const OP: &str = "register";
    let error = sql_error(OP);
    // IMMEDIATE takes the write lock up front, so the ownership check below and
    // the writes after it see the same state.
    let tx = connection
        .transaction_with_behavior(TransactionBehavior::Immediate)
        .map_err(&error)?;
    {
        let mut owner_of = tx
            .prepare_cached(schema::SELECT_FOREIGN_OWNER)
            .map_err(&error)?;
        for endpoint in endpoints {
            let owner: Option<String> = owner_of
                .query_row(params![endpoint.id, agent.node], |row| row.get("node"))
                .optional()
                .map_err(&error)?;
            if let Some(owner) = owner {
                return Err(RegistryError::EndpointConflict {
                    endpoint: endpoint.id.clone(),
                    owner,
                });
            }
        }
    }
    tx.prepare_cached(schema::UPSERT_AGENT)
        .and_then(|mut upsert| {
            upsert.execute(params![
                agent.node,
                agent.session,
                agent.agent_version,
                agent.registered_at_ms,
                agent.last_seen_ms
            ])
        })
        .map_err(&error)?;
    tx.prepare_cached(schema::DELETE_NODE_ENDPOINTS)
        .and_then(|mut delete| delete.execute(params![agent.node]))
        .map_err(&error)?;
    {
        let mut insert = tx.prepare_cached(schema::INSERT_ENDPOINT).map_err(&error)?;
        for endpoint in endpoints {
            insert
                .execute(params![
                    endpoint.id,
                    endpoint.node,
                    endpoint.tor,
                    endpoint.transport,
                    endpoint.address,
                    endpoint.qpn,
                    endpoint.device,
                    endpoint.tor_from_agent
                ])
                .map_err(&error)?;
        }
    }
    tx.commit().map_err(error)
}

fn touch_in(
    connection: &Connection,
    node: &str,
    session: u64,
    now_ms: u64,
) -> Result<(), RegistryError> {
    let error = sql_error("touch");
    let updated = connection
        .prepare_cached(schema::TOUCH_AGENT)
        .and_then(|mut touch| {
            touch.execute(params![
                schema::millis_to_sql(now_ms),
                node,
                schema::session_to_sql(session)
            ])
        })
        .map_err(&error)?;
    if updated > 0 {
        return Ok(());
    }
    super::touch_refusal(node, session, agent_in(connection, node)?)
}

fn agent_in(connection: &Connection, node: &str) -> Result<Option<AgentRecord>, RegistryError> {
    let error = sql_error("agent");
    connection
        .prepare_cached(schema::SELECT_AGENT)
        .and_then(|mut select| select.query_row(params![node], agent_row).optional())
        .map_err(error)?
        .map(AgentRow::into_record)
        .transpose()
}

fn remove_in(connection: &mut Connection, node: &str) -> Result<bool, RegistryError> {
    let error = sql_error("remove_node");
    let tx = connection.transaction().map_err(&error)?;
    tx.execute(schema::DELETE_NODE_ENDPOINTS, params![node])
        .map_err(&error)?;
    let removed = tx
        .execute(schema::DELETE_AGENT, params![node])
        .map_err(&error)?;
    tx.commit().map_err(error)?;
    Ok(removed > 0)
}

fn set_tors_in(connection: &mut Connection, moves: &[TorMove]) -> Result<u64, RegistryError> {
    let error = sql_error("set_tors");
    let tx = connection.transaction().map_err(&error)?;
    let mut changed = 0u64;
    {
        let mut update = tx
            .prepare_cached(schema::UPDATE_ENDPOINT_TOR)
            .map_err(&error)?;
        for m in moves {
            let rows = update.execute(params![m.tor, m.endpoint]).map_err(&error)?;
            changed += u64::try_from(rows).unwrap_or(u64::MAX);
        }
    }
    tx.commit().map_err(error)?;
    Ok(changed)
}

fn expire_in(connection: &mut Connection, before_ms: u64) -> Result<Vec<String>, RegistryError> {
    let error = sql_error("expire");
    let before = schema::millis_to_sql(before_ms);
    let tx = connection
        .transaction_with_behavior(TransactionBehavior::Immediate)
        .map_err(&error)?;
    let candidates: Vec<String> = tx
        .prepare_cached(schema::SELECT_EXPIRED_NODES)
        .and_then(|mut select| {
            select
                .query_map(params![before], |row| row.get("node"))?
                .collect()
        })
        .map_err(&error)?;
    let mut removed = Vec::with_capacity(candidates.len());
    for node in candidates {
        tx.execute(
            schema::DELETE_EXPIRED_NODE_ENDPOINTS,
            params![node, node, before],
        )
        .map_err(&error)?;
        if tx
            .execute(schema::DELETE_EXPIRED_AGENT, params![node, before])
            .map_err(&error)?
            > 0
        {
            removed.push(node);
        }
    }
    tx.commit().map_err(error)?;
    Ok(removed)
}

#[async_trait]
impl Registry for SqliteRegistry {
    fn backend(&self) -> &'static str {
        "sqlite"
    }

    async fn register(
        &self,
        node: &str,
        agent_version: &str,
        session: u64,
        endpoints: &[MeshEndpoint],
        now_ms: u64,
    ) -> Result<(), RegistryError> {
        let (agent, rows) = registration_rows(node, agent_version, session, endpoints, now_ms)?;
        self.with_connection("register", move |connection| {
            register_in(connection, &agent, &rows)
        })
        .await
    }

    async fn touch(&self, node: &str, session: u64, now_ms: u64) -> Result<(), RegistryError> {
        let node = node.to_owned();
        self.with_connection("touch", move |connection| {
            touch_in(connection, &node, session, now_ms)
        })
        .await
    }

    async fn remove_node(&self, node: &str) -> Result<bool, RegistryError> {
        let node = node.to_owned();
        self.with_connection("remove_node", move |connection| {
            remove_in(connection, &node)
        })
        .await
    }

    async fn set_tors(&self, moves: &[TorMove]) -> Result<u64, RegistryError> {
        if moves.is_empty() {
            return Ok(0);
        }
        let moves = moves.to_vec();
        self.with_connection("set_tors", move |connection| {
            set_tors_in(connection, &moves)
        })
        .await
    }

    async fn expire(&self, last_seen_before_ms: u64) -> Result<Vec<String>, RegistryError> {
        self.with_connection("expire", move |connection| {
            expire_in(connection, last_seen_before_ms)
        })
        .await
    }

    async fn agents(&self) -> Result<Vec<AgentRecord>, RegistryError> {
        self.with_connection("agents", |connection| {
            let rows: Vec<AgentRow> = connection
                .prepare_cached(schema::SELECT_AGENTS)
                .and_then(|mut select| select.query_map([], agent_row)?.collect())
                .map_err(sql_error("agents"))?;
            rows.into_iter().map(AgentRow::into_record).collect()
        })
        .await
    }

    async fn endpoints(&self) -> Result<Vec<MeshEndpoint>, RegistryError> {
        self.with_connection("endpoints", |connection| {
            let rows: Vec<EndpointRow> = connection
                .prepare_cached(schema::SELECT_ENDPOINTS)
                .and_then(|mut select| select.query_map([], endpoint_row)?.collect())
                .map_err(sql_error("endpoints"))?;
            rows.into_iter().map(EndpointRow::into_endpoint).collect()
        })
        .await
    }

    async fn agent(&self, node: &str) -> Result<Option<AgentRecord>, RegistryError> {
        let node = node.to_owned();
        self.with_connection("agent", move |connection| agent_in(connection, &node))
            .await
    }
}
