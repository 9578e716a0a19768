//! Transports that carry probe messages between endpoints.
//!
//! [`udp`] runs everywhere. On Linux it asks the kernel for `SO_TIMESTAMPING`
//! receive and transmit timestamps so host scheduling noise stays out of the
//! network RTT; elsewhere (and with [`TimestampMode::Off`]) it reports host
//! monotonic readings only and callers flag their samples as software-timed.

use std::io;
use std::net::SocketAddr;

use thiserror::Error;

pub mod rdma;
pub mod socket;
pub mod udp;

// Feature `portable-timestamps` compiles the non-Linux code on Linux too, so
// that CI builds and runs exactly what a Mac runs (hack/test.sh does).
#[cfg(all(target_os = "linux", not(feature = "portable-timestamps")))]
mod recv_batch_linux;
#[cfg(all(target_os = "linux", not(feature = "portable-timestamps")))]
mod send_batch_linux;
#[cfg(all(target_os = "linux", not(feature = "portable-timestamps")))]
mod timestamping_linux;
#[cfg(all(target_os = "linux", not(feature = "portable-timestamps")))]
use timestamping_linux as timestamping;
#[cfg(any(not(target_os = "linux"), feature = "portable-timestamps"))]
mod timestamping_none;
#[cfg(any(not(target_os = "linux"), feature = "portable-timestamps"))]
use timestamping_none as timestamping;

/// Whether this build asks the kernel for `SO_TIMESTAMPING` stamps (Linux,
/// unless built with `portable-timestamps`); elsewhere every reading is host
/// monotonic and samples are flagged software-timed.
pub const KERNEL_TIMESTAMPS: bool = cfg!(all(
    target_os = "linux",
    not(feature = "portable-timestamps")
));

/// Which kernel timestamps a socket should ask for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum TimestampMode {
    /// Host monotonic readings only.
    Off,
    /// Kernel software timestamps (taken in the network stack, on RX and TX).
    #[default]
    Software,
    /// NIC timestamps. Needs `CAP_NET_ADMIN` and a NIC that stamps every
    /// packet; falls back to [`TimestampMode::Software`] when the NIC or the
    /// ioctl refuses.
    Hardware,
}

/// What a socket actually got from the kernel, which may be less than was asked.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct TimestampSupport {
    /// Received datagrams carry a kernel timestamp.
    pub rx: bool,
    /// Every stamped send (`send_to`, not `send_unstamped`) reports a kernel
    /// timestamp under the key in its receipt.
    pub tx: bool,
    /// The timestamps come from the NIC's clock rather than the kernel's.
    pub hardware: bool,
}

impl TimestampSupport {
    /// No kernel timestamps at all: every reading is host monotonic.
    pub const NONE: Self = Self {
        rx: false,
        tx: false,
        hardware: false,
    };
}

/// Failures of a transport operation, named after the operation.
#[derive(Debug, Error)]
pub enum TransportError {
    #[error("no tokio runtime: the probe socket must be created inside one")]
    NoRuntime,
    #[error("creating a UDP socket for {addr} failed: {source}")]
    Create { addr: SocketAddr, source: io::Error },
    #[error("binding the UDP probe socket to {addr} failed: {source}")]
    Bind { addr: SocketAddr, source: io::Error },
    #[error("registering the probe socket bound to {addr} with the runtime failed: {source}")]
    Register { addr: SocketAddr, source: io::Error },
    #[error("enabling kernel timestamps on the socket bound to {addr} failed: {source}")]
    Timestamping { addr: SocketAddr, source: io::Error },
    #[error("sending a probe datagram to {dst} failed: {source}")]
    Send { dst: SocketAddr, source: io::Error },
    #[error("receiving from the probe socket failed: {source}")]
    Receive { source: io::Error },
    #[error("{what} is not supported on this platform")]
    Unsupported { what: &'static str },
    #[error(transparent)]
    Rdma(#[from] rdma::RdmaError),
}

impl TransportError {
    /// Bounded label for metrics and events.
    pub fn category(&self) -> &'static str {
        match self {
            Self::NoRuntime => "no_runtime",
            Self::Create { .. } => "create",
            Self::Bind { .. } => "bind",
            Self::Register { .. } => "register",
            Self::Timestamping { .. } => "timestamping",
            Self::Send { .. } => "send",
            Self::Receive { .. } => "receive",
            Self::Unsupported { .. } => "unsupported",
            // RDMA failures keep their own bounded categories (a full send queue, ...).
            Self::Rdma(e) => e.category(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn error_categories_are_distinct_per_operation() {
        let addr: SocketAddr = ([127, 0, 0, 1], 9).into();
        let io = || io::Error::other("x");
        let errors = [
            TransportError::NoRuntime,
            TransportError::Create { addr, source: io() },
            TransportError::Bind { addr, source: io() },
            TransportError::Register { addr, source: io() },
            TransportError::Timestamping { addr, source: io() },
            TransportError::Send {
                dst: addr,
                source: io(),
            },
            TransportError::Receive { source: io() },
            TransportError::Unsupported { what: "x" },
            TransportError::Rdma(rdma::RdmaError::PayloadTooLarge { len: 1, max: 0 }),
        ];
        let mut categories: Vec<_> = errors.iter().map(TransportError::category).collect();
        categories.sort_unstable();
        categories.dedup();
        assert_eq!(categories.len(), errors.len());
    }
}
