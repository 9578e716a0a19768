//! `PingMesh` operator: hosts the mesh controller (registry, pinglists,
//! analyzer, gRPC and HTTP APIs); `pingmesh-operator standalone` runs it
//! without Kubernetes.
pub mod config;
pub mod mesh;
