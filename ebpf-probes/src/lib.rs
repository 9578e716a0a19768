//! BPF programs for tracing RDMA service connections.
//!
//! Not built yet: service tracing is a separate piece of work. The crate exists
//! so the workspace layout is final and the agent can depend on it later.
