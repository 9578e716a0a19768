//! Platforms without `SO_TIMESTAMPING`: every reading is host monotonic, and the
//! kernel-timestamp state cannot even be built.

use std::io;
use std::net::SocketAddr;

use socket2::{SockAddr, Socket};

use super::udp::{Queue, SocketEvent};
use super::{TimestampMode, TimestampSupport, TransportError};

/// Uninhabited: no socket on this platform has kernel timestamps.
#[derive(Debug)]
pub(super) enum KernelTimestamps {}

/// Always `None`; asking for more than [`TimestampMode::Off`] is noted, not refused.
#[allow(clippy::unnecessary_wraps)]
pub(super) fn enable(
    _socket: &Socket,
    local: SocketAddr,
    mode: TimestampMode,
) -> Result<Option<KernelTimestamps>, TransportError> {
    if mode != TimestampMode::Off {
        tracing::info!(
            %local,
            ?mode,
            "kernel timestamps are Linux-only, using host monotonic time"
        );
    }
    Ok(None)
}

impl KernelTimestamps {
    pub(super) fn support(&self) -> TimestampSupport {
        match *self {}
    }

    pub(super) fn send(
        &self,
        _socket: &Socket,
        _payload: &[u8],
        _dst: &SockAddr,
    ) -> io::Result<u32> {
        match *self {}
    }

    pub(super) fn take_buffered(&self, _buf: &mut [u8]) -> Option<SocketEvent> {
        match *self {}
    }

    pub(super) fn fill(&self, _socket: &Socket, _queue: Queue) -> io::Result<bool> {
        match *self {}
    }
}
