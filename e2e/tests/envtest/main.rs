//! The envtest tier: the real operator binary against a real API server
//! (etcd and kube-apiserver from `KUBEBUILDER_ASSETS`, started per test by
//! `hack/envtest.sh`), installed with the real chart and running under exactly
//! the chart's RBAC (a token of its `ServiceAccount`). Nothing runs pods there
//! (no scheduler, kubelet or controller-manager): agents run as processes
//! next to the operator and Node objects are made by the tests.
//!
//! ```sh
//! cargo build --workspace --bins
//! KUBEBUILDER_ASSETS=/path/to/assets cargo test -p pingmesh-e2e --test envtest -- --include-ignored
//! ```
//!
//! Without `KUBEBUILDER_ASSETS` every test prints a note and passes.
//! `PINGMESH_ENVTEST_KEEP=1` leaves each test's API server running.

#![allow(clippy::expect_used, clippy::unwrap_used, clippy::panic)]

#[path = "../common/mod.rs"]
mod common;

mod cluster;
mod crd;
mod identity;
mod leader;
mod operator;
mod proxy;
