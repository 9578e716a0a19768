//! PingMesh node agent.
pub mod probe;
