//! The mesh controller: agent registry, pinglists, analyzer and APIs.
pub mod analyzer;
pub mod controller;
pub mod grpc;
pub mod history;
pub mod http;
pub mod identity;
pub mod localize;
pub mod metrics;
pub mod pinglist;
pub mod registry;
pub mod server;
pub mod services;
pub mod tls;
pub mod topology;
pub mod traces;
pub mod types;
pub mod web;
