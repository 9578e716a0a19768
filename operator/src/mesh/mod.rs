//! The mesh controller: agent registry, pinglists, analyzer and APIs.
pub mod types;
