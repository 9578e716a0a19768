//! The tracer where there is no eBPF: not Linux, or built without the `ebpf`
//! feature. Same API; loading fails with [`TracerError::Unsupported`].
use std::path::Path;
use std::time::Duration;

use super::{Hook, IbCoreState, KernelPaths, TraceEvent, TracerError, TracerOptions};

/// Stands in for the eBPF tracer; it can never be constructed.
#[derive(Debug)]
pub struct Tracer {
    never: std::convert::Infallible,
}

impl Tracer {
    pub fn load() -> Result<Self, TracerError> {
        Err(TracerError::Unsupported)
    }

    pub fn load_with(_options: TracerOptions) -> Result<Self, TracerError> {
        Err(TracerError::Unsupported)
    }

    pub fn attach_ib_core(&mut self) -> &IbCoreState {
        match self.never {}
    }

    pub fn attach_ib_core_at(&mut self, _paths: &KernelPaths) -> &IbCoreState {
        match self.never {}
    }

    pub fn ib_core_state(&self) -> &IbCoreState {
        match self.never {}
    }

    pub fn ib_core_present(&self) -> bool {
        false
    }

    pub fn lost_records(&self) -> u64 {
        0
    }

    pub fn attach_tcp(&mut self) -> Result<(), TracerError> {
        Err(TracerError::Unsupported)
    }

    pub fn attach_verbs(&mut self, _library: &Path) -> Result<(), TracerError> {
        Err(TracerError::Unsupported)
    }

    pub fn attach_loaded_verbs(&mut self, _proc_root: &Path) -> Vec<(Hook, TracerError)> {
        Vec::new()
    }

    pub fn active_hooks(&self) -> Vec<Hook> {
        Vec::new()
    }

    pub fn poll(&mut self, _timeout: Duration) -> Result<Vec<TraceEvent>, TracerError> {
        Err(TracerError::Unsupported)
    }

    pub fn drain(&mut self) -> Vec<TraceEvent> {
        Vec::new()
    }

    pub fn malformed_records(&self) -> u64 {
        0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn load_reports_unsupported() {
        assert!(matches!(Tracer::load(), Err(TracerError::Unsupported)));
    }
}
