//! The one schema and every statement the registry runs, shared by the `SQLite` and
//! rqlite stores so the two cannot drift apart.
//!
//! Statements use positional `?` parameters; each constant documents its
//! parameter order, and both stores bind in that order.
//!
//! # How values are stored
//!
//! `SQLite` integers are signed 64-bit, so:
//! - `session` (an opaque u64 compared only for equality) is stored bit-cast to
//!   i64: values above `i64::MAX` read back negative in the table and are cast back
//!   on load, so every u64 round-trips.
//! - millisecond timestamps are stored as their i64 value and compared in SQL
//!   (expiry), so they must keep their order: values above `i64::MAX` (292 million
//!   years) are clamped to `i64::MAX` on write, and a negative stored timestamp
//!   is [`RegistryError::Corrupt`] on read.
//! - `qpn` (u32) and `transport` (i32) fit as they are; a stored value outside
//!   their range is [`RegistryError::Corrupt`].
//! - `tor_from_agent` (bool) is 0 or 1; anything else is [`RegistryError::Corrupt`].
//!
//! # Versions
//!
//! 1. agents and endpoints.
//! 2. endpoints gain `device` (the RNIC name, for per-RNIC ToR labels) and
//!    `tor_from_agent` (whether the agent named the ToR, or the controller
//!    resolved it and may move it when node labels change). Rows from version 1
//!    read as `device = ''` and `tor_from_agent = 1`: their ToR stays as stored
//!    until the agent registers again, which it does whenever the controller
//!    restarts.
//!
//! # Foreign keys
//!
//! `endpoints.node` references `agents` with `ON DELETE CASCADE`, and the `SQLite`
//! store turns foreign keys on. rqlite enforces them only when started with
//! `-fk`, so every removal also deletes endpoints explicitly: both stores behave
//! the same either way.

use super::RegistryError;
use crate::mesh::types::{AgentRecord, MeshEndpoint};

/// The schema version this build writes and understands.
pub const SCHEMA_VERSION: i64 = 2;

/// Creates the schema of version 1 if missing and records its version.
/// Idempotent; run as one transaction on every open, then [`UPGRADES`].
///
/// To change the schema later: bump [`SCHEMA_VERSION`], keep these statements
/// creating version 1, and add an [`Upgrade`] for the new version.
pub const CREATE_SCHEMA: &[&str] = &[
    "CREATE TABLE IF NOT EXISTS schema_version (
        id INTEGER PRIMARY KEY CHECK (id = 1),
        version INTEGER NOT NULL
    )",
    "CREATE TABLE IF NOT EXISTS agents (
        node TEXT PRIMARY KEY NOT NULL,
        session INTEGER NOT NULL,
        agent_version TEXT NOT NULL,
        registered_at_ms INTEGER NOT NULL,
        last_seen_ms INTEGER NOT NULL
    )",
    "CREATE INDEX IF NOT EXISTS agents_by_last_seen ON agents (last_seen_ms)",
    "CREATE TABLE IF NOT EXISTS endpoints (
        id TEXT PRIMARY KEY NOT NULL,
        node TEXT NOT NULL REFERENCES agents (node) ON DELETE CASCADE,
        tor TEXT NOT NULL,
        transport INTEGER NOT NULL,
        address TEXT NOT NULL,
        qpn INTEGER NOT NULL
    )",
    "CREATE INDEX IF NOT EXISTS endpoints_by_node ON endpoints (node)",
    "INSERT OR IGNORE INTO schema_version (id, version) VALUES (1, 1)",
];

/// The statements that take a store from version `to - 1` to version `to`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Upgrade {
    pub to: i64,
    /// Run as one transaction; the last one records the new version, and only
    /// if the store is still at the old one.
    pub statements: &'static [&'static str],
}

/// Every upgrade, oldest first. Upgrades only ever run inside a transaction,
/// which rqlite takes on its execute endpoint whatever the verb (its client
/// library routes single statements by their first word and knows no `ALTER`).
pub const UPGRADES: &[Upgrade] = &[Upgrade {
    to: 2,
    statements: &[
        "ALTER TABLE endpoints ADD COLUMN device TEXT NOT NULL DEFAULT ''",
        "ALTER TABLE endpoints ADD COLUMN tor_from_agent INTEGER NOT NULL DEFAULT 1",
        "UPDATE schema_version SET version = 2 WHERE id = 1 AND version = 1",
    ],
}];

/// The upgrades a store at version `stored` needs, oldest first; refuses a
/// store written by a newer operator (or one no operator wrote).
pub fn pending_upgrades(stored: i64) -> Result<&'static [Upgrade], RegistryError> {
    if !(1..=SCHEMA_VERSION).contains(&stored) {
        return Err(RegistryError::Migrate {
            detail: format!(
                "the store holds schema version {stored}, this operator understands \
                 1 to {SCHEMA_VERSION}; run a matching operator version"
            ),
            source: None,
        });
    }
    let first = UPGRADES.partition_point(|u| u.to <= stored);
    Ok(UPGRADES.get(first..).unwrap_or_default())
}

/// Returns the stored schema version. No parameters; one row, column `version`.
pub const SELECT_SCHEMA_VERSION: &str = "SELECT version FROM schema_version WHERE id = 1";

/// Inserts or replaces the agent row in place (an upsert, not `INSERT OR REPLACE`,
/// which would delete the row first and cascade to its endpoints).
/// Parameters: node, session, `agent_version`, `registered_at_ms`, `last_seen_ms`.
pub const UPSERT_AGENT: &str = "INSERT INTO agents \
    (node, session, agent_version, registered_at_ms, last_seen_ms) VALUES (?, ?, ?, ?, ?) \
    ON CONFLICT (node) DO UPDATE SET session = excluded.session, \
    agent_version = excluded.agent_version, registered_at_ms = excluded.registered_at_ms, \
    last_seen_ms = excluded.last_seen_ms";

/// Deletes all endpoints of a node. Parameter: node.
pub const DELETE_NODE_ENDPOINTS: &str = "DELETE FROM endpoints WHERE node = ?";

/// Inserts one endpoint; fails with a UNIQUE constraint error if the id exists.
/// Parameters: id, node, tor, transport, address, qpn, device, `tor_from_agent`.
pub const INSERT_ENDPOINT: &str = "INSERT INTO endpoints \
    (id, node, tor, transport, address, qpn, device, tor_from_agent) \
    VALUES (?, ?, ?, ?, ?, ?, ?, ?)";

/// Moves an endpoint to another ToR, unless its agent named the ToR itself.
/// Parameters: tor, id. One row affected if moved.
pub const UPDATE_ENDPOINT_TOR: &str =
    "UPDATE endpoints SET tor = ? WHERE id = ? AND tor_from_agent = 0";

/// The part of a store's error message that marks an endpoint id collision.
pub const ENDPOINT_ID_COLLISION: &str = "UNIQUE constraint failed: endpoints.id";

/// Returns the node owning endpoint `id` if that is not `node`.
/// Parameters: id, node; column `node`.
pub const SELECT_FOREIGN_OWNER: &str = "SELECT node FROM endpoints WHERE id = ? AND node <> ?";

/// Moves `last_seen_ms` forward (never back) if the session matches.
/// Parameters: `now_ms`, node, session. One row affected on success.
pub const TOUCH_AGENT: &str =
    "UPDATE agents SET last_seen_ms = MAX(last_seen_ms, ?) WHERE node = ? AND session = ?";

/// Deletes the agent row of a node. Parameter: node.
pub const DELETE_AGENT: &str = "DELETE FROM agents WHERE node = ?";

/// Nodes last seen before a time. Parameter: `last_seen_before_ms`; column `node`.
pub const SELECT_EXPIRED_NODES: &str =
    "SELECT node FROM agents WHERE last_seen_ms < ? ORDER BY node";

/// Deletes a node's endpoints only if the node is still expired, so an agent that
/// checked in after [`SELECT_EXPIRED_NODES`] keeps them.
/// Parameters: node, node, `last_seen_before_ms`.
pub const DELETE_EXPIRED_NODE_ENDPOINTS: &str = "DELETE FROM endpoints WHERE node = ? AND \
    EXISTS (SELECT 1 FROM agents WHERE node = ? AND last_seen_ms < ?)";

/// Deletes a node's agent row only if still expired; one row affected if removed.
/// Parameters: node, `last_seen_before_ms`.
pub const DELETE_EXPIRED_AGENT: &str = "DELETE FROM agents WHERE node = ? AND last_seen_ms < ?";

/// All agents, sorted by node. Columns as in [`AgentRow`].
pub const SELECT_AGENTS: &str = "SELECT node, session, agent_version, registered_at_ms, \
    last_seen_ms FROM agents ORDER BY node";

/// One agent. Parameter: node. Columns as in [`AgentRow`].
pub const SELECT_AGENT: &str = "SELECT node, session, agent_version, registered_at_ms, \
    last_seen_ms FROM agents WHERE node = ?";

/// All endpoints, sorted by id (byte order, the same as Rust's `String` order).
/// Columns as in [`EndpointRow`].
pub const SELECT_ENDPOINTS: &str = "SELECT id, node, tor, transport, address, qpn, device, \
    tor_from_agent FROM endpoints ORDER BY id";

/// An `agents` row as stored, before it is checked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AgentRow {
    pub node: String,
    pub session: i64,
    pub agent_version: String,
    pub registered_at_ms: i64,
    pub last_seen_ms: i64,
}

impl AgentRow {
    /// The row for `record`, in stored form.
    pub fn from_record(record: &AgentRecord) -> Self {
        Self {
            node: record.node.clone(),
            session: session_to_sql(record.session),
            agent_version: record.agent_version.clone(),
            registered_at_ms: millis_to_sql(record.registered_at_ms),
            last_seen_ms: millis_to_sql(record.last_seen_ms),
        }
    }

    /// Decodes the row; fails on values no registry write produces.
    pub fn into_record(self) -> Result<AgentRecord, RegistryError> {
        Ok(AgentRecord {
            session: session_from_sql(self.session),
            registered_at_ms: millis_from_sql(
                &self.node,
                "registered_at_ms",
                self.registered_at_ms,
            )?,
            last_seen_ms: millis_from_sql(&self.node, "last_seen_ms", self.last_seen_ms)?,
            node: self.node,
            agent_version: self.agent_version,
        })
    }
}

/// An `endpoints` row as stored, before it is checked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EndpointRow {
    pub id: String,
    pub node: String,
    pub tor: String,
    pub transport: i64,
    pub address: String,
    pub qpn: i64,
    pub device: String,
    pub tor_from_agent: i64,
}

impl EndpointRow {
    /// The row for `endpoint`, in stored form.
    pub fn from_endpoint(endpoint: &MeshEndpoint) -> Self {
        Self {
            id: endpoint.id.clone(),
            node: endpoint.node.clone(),
            tor: endpoint.tor.clone(),
            transport: i64::from(endpoint.transport),
            address: endpoint.address.clone(),
            qpn: i64::from(endpoint.qpn),
            device: endpoint.device.clone(),
            tor_from_agent: i64::from(endpoint.tor_from_agent),
        }
    }

    /// Decodes the row; fails on values no registry write produces.
    pub fn into_endpoint(self) -> Result<MeshEndpoint, RegistryError> {
        let out_of_range = |column: &str, value: i64| RegistryError::Corrupt {
            detail: format!("endpoint {}: {column} {value} is out of range", self.id),
        };
        let transport =
            i32::try_from(self.transport).map_err(|_| out_of_range("transport", self.transport))?;
        let qpn = u32::try_from(self.qpn).map_err(|_| out_of_range("qpn", self.qpn))?;
        let tor_from_agent = match self.tor_from_agent {
            0 => false,
            1 => true,
            other => return Err(out_of_range("tor_from_agent", other)),
        };
        Ok(MeshEndpoint {
            id: self.id,
            node: self.node,
            tor: self.tor,
            transport,
            address: self.address,
            qpn,
            device: self.device,
            tor_from_agent,
        })
    }
}

/// Stores a session id: bit-cast, so every u64 survives the round trip.
#[expect(
    clippy::cast_possible_wrap,
    reason = "bit-cast on purpose; undone on load"
)]
pub fn session_to_sql(session: u64) -> i64 {
    session as i64
}

/// Loads a session id stored by [`session_to_sql`].
#[expect(
    clippy::cast_sign_loss,
    reason = "undoes the bit-cast of session_to_sql"
)]
pub fn session_from_sql(stored: i64) -> u64 {
    stored as u64
}

/// Stores a millisecond timestamp, clamped so SQL comparisons keep its order.
pub fn millis_to_sql(ms: u64) -> i64 {
    i64::try_from(ms).unwrap_or(i64::MAX)
}

fn millis_from_sql(node: &str, column: &str, stored: i64) -> Result<u64, RegistryError> {
    u64::try_from(stored).map_err(|_| RegistryError::Corrupt {
        detail: format!("agent {node}: {column} {stored} is negative"),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_session_id_survives_the_round_trip() {
        for session in [
            0,
            1,
            u64::from(u32::MAX),
            i64::MAX.unsigned_abs(),
            1 << 63,
            u64::MAX,
        ] {
            assert_eq!(session_from_sql(session_to_sql(session)), session);
        }
    }

    #[test]
    fn timestamps_beyond_i64_are_clamped_and_keep_their_order() {
        assert_eq!(millis_to_sql(42), 42);
        assert_eq!(millis_to_sql(u64::MAX), i64::MAX);
        assert!(millis_to_sql(u64::MAX) >= millis_to_sql(i64::MAX.unsigned_abs()));
    }

    fn agent_row(last_seen_ms: i64) -> AgentRow {
        AgentRow {
            node: "n1".to_owned(),
            session: -1,
            agent_version: "v1".to_owned(),
            registered_at_ms: 5,
            last_seen_ms,
        }
    }

    #[test]
    fn negative_timestamp_is_a_corrupt_row() {
        let err = agent_row(-5).into_record().unwrap_err();
        assert_eq!(err.category(), "corrupt");
        let record = agent_row(7).into_record().unwrap();
        assert_eq!(record.session, u64::MAX);
        assert_eq!(AgentRow::from_record(&record), agent_row(7));
    }

    #[test]
    fn qpn_or_transport_out_of_range_is_a_corrupt_row() {
        let endpoint = MeshEndpoint {
            id: "n1/p0".to_owned(),
            node: "n1".to_owned(),
            tor: "t".to_owned(),
            transport: 2,
            address: "fe80::1".to_owned(),
            qpn: u32::MAX,
            device: "mlx5_0".to_owned(),
            tor_from_agent: false,
        };
        let row = EndpointRow::from_endpoint(&endpoint);
        assert_eq!(row.clone().into_endpoint().unwrap(), endpoint);
        let too_big_qpn = EndpointRow {
            qpn: i64::from(u32::MAX) + 1,
            ..row.clone()
        };
        assert_eq!(
            too_big_qpn.into_endpoint().unwrap_err().category(),
            "corrupt"
        );
        let negative_transport = EndpointRow {
            transport: i64::from(i32::MIN) - 1,
            ..row.clone()
        };
        assert_eq!(
            negative_transport.into_endpoint().unwrap_err().category(),
            "corrupt"
        );
        let not_a_bool = EndpointRow {
            tor_from_agent: 2,
            ..row
        };
        assert_eq!(
            not_a_bool.into_endpoint().unwrap_err().category(),
            "corrupt"
        );
    }

    #[test]
    fn a_store_needs_the_upgrades_after_its_version_and_a_newer_one_is_refused() {
        assert_eq!(pending_upgrades(1).unwrap(), UPGRADES);
        assert!(pending_upgrades(SCHEMA_VERSION).unwrap().is_empty());
        for unknown in [0, SCHEMA_VERSION + 1] {
            assert_eq!(
                pending_upgrades(unknown).unwrap_err().category(),
                "migrate",
                "{unknown}"
            );
        }
        assert_eq!(UPGRADES.last().map(|u| u.to), Some(SCHEMA_VERSION));
        assert!(UPGRADES.windows(2).all(|w| w[1].to == w[0].to + 1));
    }

    #[test]
    fn every_statement_starts_with_a_verb_the_rqlite_client_routes() {
        let all = CREATE_SCHEMA.iter().copied().chain([
            SELECT_SCHEMA_VERSION,
            UPSERT_AGENT,
            DELETE_NODE_ENDPOINTS,
            INSERT_ENDPOINT,
            SELECT_FOREIGN_OWNER,
            TOUCH_AGENT,
            DELETE_AGENT,
            SELECT_EXPIRED_NODES,
            DELETE_EXPIRED_NODE_ENDPOINTS,
            DELETE_EXPIRED_AGENT,
            SELECT_AGENTS,
            SELECT_AGENT,
            SELECT_ENDPOINTS,
            UPDATE_ENDPOINT_TOR,
        ]);
        for sql in all {
            assert!(
                rqlite_rs::query::Operation::from_query_string(sql).is_ok(),
                "{sql}"
            );
        }
    }
}
