//! Shared by the fuzz targets and the seed generator: how a gRPC fuzz input
//! is laid out, so seeds and target agree.

pub mod grpc_input;

/// The master secret and epoch of the keys the wire target verifies with and
/// its signed seeds are made with (a fixed test key, nothing secret).
pub const WIRE_MASTER: &[u8] = b"pingmesh-fuzz-wire-master-secret-0123456789";
pub const WIRE_EPOCH: u64 = 7;
