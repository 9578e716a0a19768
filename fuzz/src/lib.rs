//! Shared by the fuzz targets and the seed generator: how a gRPC fuzz input
//! is laid out, so seeds and target agree.

pub mod grpc_input;

/// The master secret and epoch of the keys the wire target verifies with and
/// its signed seeds are made with (a fixed test key, nothing secret).
pub const WIRE_MASTER: &[u8] = b"pingmesh-fuzz-wire-master-secret-0123456789";
pub const WIRE_EPOCH: u64 = 7;
/// The responder endpoint id the wire target verifies tags for and its
/// signed seeds are made for (every tag covers the responder's id).
pub const WIRE_RESPONDER: &str = "node-2/udp0";
