//! The contract shared by `PingMesh` agents and the mesh controller: the gRPC API
//! (generated from `proto/pingmesh/v1/mesh.proto`) and small plain types both
//! sides must agree on bit for bit (latency ladder, ECMP sizing, window alignment).

pub mod ecmp;
pub mod ladder;
pub mod limits;
pub mod logging;
pub mod probe_auth;
pub mod signals;
pub mod window;

/// Generated gRPC types and stubs, version 1 of the contract.
#[allow(
    clippy::pedantic,
    clippy::unwrap_used,
    clippy::expect_used,
    missing_debug_implementations
)]
pub mod v1 {
    tonic::include_proto!("pingmesh.v1");
}
