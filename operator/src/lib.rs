//! `PingMesh` operator: hosts the mesh controller (registry, pinglists,
//! analyzer, gRPC and HTTP APIs); `pingmesh-operator standalone` runs it
//! without Kubernetes. With the `kubernetes` feature (the default) it also
//! carries the `PingMesh` custom resource and its reconciler.
pub mod config;
#[cfg(feature = "kubernetes")]
pub mod crd;
pub mod mesh;
#[cfg(feature = "kubernetes")]
pub mod reconcile;
