//! `PingMesh` node agent: probes the endpoints its pinglist names with the
//! six-timestamp protocol, answers other agents' probes, and reports window
//! summaries to the mesh controller. Nothing here is Kubernetes-specific.
pub mod agent;
pub mod aggregate;
pub mod config;
pub mod control;
pub mod endpoints;
pub mod metrics;
pub mod pathtrace;
pub mod probe;
pub mod rnic;
pub mod service_flows;
pub mod tracer;
pub mod transport;
