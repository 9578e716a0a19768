//! The shape every probe transport has, so the prober and the responder are
//! written once: a UDP socket and an RDMA UD queue pair both send datagrams to
//! a peer address, report a receipt per send, and hand out receive and send
//! completion events in one stream.

use std::fmt;
use std::future::Future;

use super::{TimestampSupport, TransportError};

/// What a successful send reports.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SendReceipt {
    /// Host monotonic reading taken right after the send returned.
    pub host_ns: u64,
    /// The key of this send's coming completion event: a
    /// [`ProbeEvent::TxTimestamp`], or on transports that complete every send
    /// (RDMA) a [`ProbeEvent::SendDone`] or [`ProbeEvent::SendFailed`].
    /// `None` when no event will follow.
    pub tx_key: Option<u32>,
}

/// One thing a probe socket has to say.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProbeEvent<P> {
    /// A datagram, its first `len` bytes in the caller's buffer.
    Datagram {
        len: usize,
        from: P,
        /// Host monotonic reading taken right after the receive returned.
        host_ns: u64,
        /// Kernel or NIC receive timestamp; comparable only with other such
        /// stamps of this socket.
        kernel_ns: Option<u64>,
        /// The datagram was longer than the buffer and was cut to `len` bytes.
        truncated: bool,
    },
    /// The kernel or NIC transmit timestamp of the send whose receipt had `key`.
    TxTimestamp { key: u32, kernel_ns: u64 },
    /// The send whose receipt had `key` completed, with no usable timestamp.
    SendDone { key: u32 },
    /// The send whose receipt had `key` completed with an error: it never left.
    SendFailed { key: u32 },
    /// Something that is none of these (an ICMP error for an earlier send, a
    /// completion without a usable payload). Worth a counter, not a stop.
    Skipped { reason: &'static str },
}

/// A datagram endpoint the prober and the responder can drive.
///
/// Shared through an `Arc`: one task may send while another waits in
/// [`Self::next_event`].
pub trait ProbeSocket: Send + Sync + 'static {
    /// Where datagrams go to and come from.
    type Peer: Copy + Eq + Send + Sync + fmt::Debug + 'static;

    /// Which stamps the events carry.
    fn timestamp_support(&self) -> TimestampSupport;

    /// Sends one datagram to `peer`.
    fn send_to(
        &self,
        payload: &[u8],
        peer: Self::Peer,
    ) -> impl Future<Output = Result<SendReceipt, TransportError>> + Send;

    /// Sends one datagram whose transmit time nobody needs (an ACK2). Where
    /// a TX stamp costs something per send (UDP's error queue) it is not
    /// taken and the receipt has no key; transports that complete every send
    /// anyway (RDMA) send as [`Self::send_to`] does.
    fn send_unstamped(
        &self,
        payload: &[u8],
        peer: Self::Peer,
    ) -> impl Future<Output = Result<SendReceipt, TransportError>> + Send {
        self.send_to(payload, peer)
    }

    /// Sends several datagrams whose transmit time nobody needs (ACK2s held
    /// for a moment so they go out together), in order; one result per
    /// datagram. UDP sends them with one system call where it can; other
    /// transports send them one by one with [`Self::send_unstamped`].
    fn send_unstamped_batch(
        &self,
        batch: &[(&[u8], Self::Peer)],
    ) -> impl Future<Output = Vec<Result<(), TransportError>>> + Send {
        async move {
            let mut results = Vec::with_capacity(batch.len());
            for (payload, peer) in batch {
                results.push(self.send_unstamped(payload, *peer).await.map(|_| ()));
            }
            results
        }
    }

    /// Waits for the next event. Cancel-safe: dropping the future loses nothing.
    fn next_event(
        &self,
        buf: &mut [u8],
    ) -> impl Future<Output = Result<ProbeEvent<Self::Peer>, TransportError>> + Send;
}
