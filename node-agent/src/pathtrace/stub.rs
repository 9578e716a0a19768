//! Path traces need raw sockets the way Linux offers them; elsewhere the tracer
//! cannot open and the agent answers every trace request with that reason.

use std::time::Duration;

use super::{FlowTuple, TraceError, TraceOutcome};

#[derive(Debug)]
pub struct Tracer;

impl Tracer {
    pub fn open() -> Result<Self, TraceError> {
        Err(TraceError::Unsupported)
    }

    pub async fn trace(
        &self,
        _tuple: FlowTuple,
        _max_hops: u8,
        _attempts: u8,
        _hop_timeout: Duration,
    ) -> Result<TraceOutcome, TraceError> {
        Err(TraceError::Unsupported)
    }
}
