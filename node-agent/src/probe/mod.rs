//! The six-timestamp probe protocol: wire format, timing math, the pending
//! table, and the prober and responder loops.
pub mod auth;
pub mod clock;
pub mod emulate;
pub mod flows;
pub mod pending;
pub mod prober;
pub mod responder;
pub mod timing;
pub mod wire;
