//! The UDP probe socket: non-blocking, driven by tokio, with kernel RX and TX
//! timestamps where the platform has them.
//!
//! One task may send while another waits for events: both take `&self`, so the
//! socket is shared through an `Arc`. A datagram's TX timestamp arrives later as
//! its own [`SocketEvent::TxTimestamp`], under the key its [`SendReceipt`] named;
//! only [`UdpProbeSocket::send_to`] asks for one,
//! [`UdpProbeSocket::send_unstamped`] does not.
//!
//! With kernel timestamps (Linux) both queues are read in batches of up to
//! 16 with one `recvmmsg` each, and a batch that came back short ends the
//! wake-up without the extra read that would only say "empty": the socket's
//! readiness is cleared by hand, which is sound because epoll reports every
//! later arrival as a new edge.

use std::io;
use std::mem::MaybeUninit;
use std::net::SocketAddr;

use socket2::{Domain, MaybeUninitSlice, Protocol, SockAddr, Socket, Type};
use tokio::io::unix::AsyncFd;
use tokio::io::{Interest, Ready};

use super::socket::{ProbeEvent, ProbeSocket};
use super::timestamping::{self, KernelTimestamps};
use super::{TimestampMode, TimestampSupport, TransportError};
use crate::probe::clock::host_now_ns;

pub use super::socket::SendReceipt;

/// One thing the socket has to say. UDP sends never report
/// [`ProbeEvent::SendDone`] or [`ProbeEvent::SendFailed`]: a failed send is an
/// error of the send call itself.
pub type SocketEvent = ProbeEvent<SocketAddr>;

/// Which queue of the socket a read is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Queue {
    /// Datagrams from peers.
    Receive,
    /// TX timestamps and errors (`MSG_ERRQUEUE`).
    Error,
}

/// A UDP socket for probe traffic.
#[derive(Debug)]
pub struct UdpProbeSocket {
    io: AsyncFd<Socket>,
    local_addr: SocketAddr,
    /// `None` when no kernel timestamps are on (mode `Off`, or not Linux).
    kernel: Option<KernelTimestamps>,
}

impl UdpProbeSocket {
    /// Binds a non-blocking socket to `addr` and turns on the timestamps `mode`
    /// asks for (as far as the platform allows: see [`Self::timestamp_support`]).
    /// Must be called inside a tokio runtime with IO enabled.
    pub fn bind(addr: SocketAddr, mode: TimestampMode) -> Result<Self, TransportError> {
        if tokio::runtime::Handle::try_current().is_err() {
            return Err(TransportError::NoRuntime);
        }
        let create = |source| TransportError::Create { addr, source };
        let socket = Socket::new(Domain::for_address(addr), Type::DGRAM, Some(Protocol::UDP))
            .map_err(create)?;
        socket.set_nonblocking(true).map_err(create)?;
        socket
            .bind(&addr.into())
            .map_err(|source| TransportError::Bind { addr, source })?;
        let local_addr = socket
            .local_addr()
            .and_then(|a| {
                a.as_socket()
                    .ok_or_else(|| io::Error::other("bound address is not IP"))
            })
            .map_err(|source| TransportError::Bind { addr, source })?;
        let kernel = timestamping::enable(&socket, local_addr, mode)?;
        // SAFETY: the socket owns its descriptor and moves into the AsyncFd, which
        // never replaces it, so the descriptor stays open and the same for the
        // AsyncFd's whole life.
        let io = unsafe {
            AsyncFd::register_with_interest(socket, Interest::READABLE | Interest::WRITABLE)
        }
        .map_err(|e| TransportError::Register {
            addr: local_addr,
            source: e.into_parts().1,
        })?;
        let socket = Self {
            io,
            local_addr,
            kernel,
        };
        tracing::debug!(
            local = %socket.local_addr,
            ?mode,
            support = ?socket.timestamp_support(),
            "probe socket bound"
        );
        Ok(socket)
    }

    /// The address the socket is bound to (with the port the OS picked for port 0).
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// The timestamps that actually got turned on.
    pub fn timestamp_support(&self) -> TimestampSupport {
        self.kernel
            .as_ref()
            .map_or(TimestampSupport::NONE, KernelTimestamps::support)
    }

    /// Sends one datagram to `dst`, waiting while the send buffer is full.
    /// With kernel timestamps on, the receipt names the key of its coming TX stamp.
    pub async fn send_to(
        &self,
        payload: &[u8],
        dst: SocketAddr,
    ) -> Result<SendReceipt, TransportError> {
        self.send(payload, dst, true).await
    }

    /// Sends one datagram whose TX stamp nobody needs (an ACK2): no stamp
    /// is taken and no key given, so it costs the error queue nothing.
    pub async fn send_unstamped(
        &self,
        payload: &[u8],
        dst: SocketAddr,
    ) -> Result<SendReceipt, TransportError> {
        self.send(payload, dst, false).await
    }

    /// Sends datagrams whose TX stamps nobody needs (ACK2s), in order, with
    /// as few system calls as the platform allows (one `sendmmsg` on Linux
    /// with kernel timestamps built in); one result per datagram. A datagram
    /// the kernel refuses gets its error and the rest are still sent.
    pub async fn send_unstamped_batch(
        &self,
        batch: &[(&[u8], SocketAddr)],
    ) -> Vec<Result<(), TransportError>> {
        let mut results = Vec::with_capacity(batch.len());
        while let Some(&(_, dst)) = batch.get(results.len()) {
            let rest = &batch[results.len()..];
            let mut guard = match self.io.writable().await {
                Ok(guard) => guard,
                Err(source) => {
                    results.push(Err(TransportError::Send { dst, source }));
                    continue;
                }
            };
            match guard.try_io(|io| send_many(io.get_ref(), rest)) {
                Ok(Ok(0)) => results.push(Err(TransportError::Send {
                    dst,
                    source: io::Error::other("the kernel took none of the batch"),
                })),
                Ok(Ok(sent)) => results.extend((0..sent).map(|_| Ok(()))),
                Ok(Err(e)) if e.kind() == io::ErrorKind::Interrupted => {}
                Ok(Err(source)) => results.push(Err(TransportError::Send { dst, source })),
                // Send buffer full: readiness was cleared, wait for room.
                Err(_would_block) => {}
            }
        }
        results
    }

    async fn send(
        &self,
        payload: &[u8],
        dst: SocketAddr,
        stamped: bool,
    ) -> Result<SendReceipt, TransportError> {
        let dst_addr = SockAddr::from(dst);
        loop {
            let mut guard = self
                .io
                .writable()
                .await
                .map_err(|source| TransportError::Send { dst, source })?;
            let attempt = guard.try_io(|io| {
                let socket = io.get_ref();
                let tx_key = match &self.kernel {
                    Some(kernel) if stamped => Some(kernel.send(socket, payload, &dst_addr)?),
                    _ => {
                        socket.send_to(payload, &dst_addr)?;
                        None
                    }
                };
                Ok(SendReceipt {
                    host_ns: host_now_ns(),
                    tx_key,
                })
            });
            match attempt {
                Ok(Ok(receipt)) => return Ok(receipt),
                Ok(Err(e)) if e.kind() == io::ErrorKind::Interrupted => {}
                Ok(Err(source)) => return Err(TransportError::Send { dst, source }),
                // Send buffer full: readiness was cleared, wait for room.
                Err(_would_block) => {}
            }
        }
    }

    /// Waits for the next datagram, TX timestamp or skippable error. A datagram
    /// longer than `buf` is cut and marked `truncated`.
    ///
    /// Cancel-safe: dropping the future before it completes loses nothing.
    pub async fn next_event(&self, buf: &mut [u8]) -> Result<SocketEvent, TransportError> {
        // TX timestamps wake the socket through its error readiness, not readable.
        let interest = if self.kernel.is_some() {
            Interest::READABLE | Interest::ERROR
        } else {
            Interest::READABLE
        };
        loop {
            if let Some(kernel) = &self.kernel
                && let Some(event) = kernel.take_buffered(buf)
            {
                return Ok(event);
            }
            let mut guard = self
                .io
                .ready(interest)
                .await
                .map_err(|source| TransportError::Receive { source })?;
            // Read only the queue the wake-up was for: trying the other one first
            // would cost an extra failing receive per wake-up.
            let ready = guard.ready();
            let (result, queue) = match &self.kernel {
                Some(kernel) if ready.is_error() => (
                    kernel
                        .fill(self.io.get_ref(), Queue::Error)
                        .map(|drained| Received::Batch { drained }),
                    Ready::ERROR,
                ),
                Some(kernel) => (
                    kernel
                        .fill(self.io.get_ref(), Queue::Receive)
                        .map(|drained| Received::Batch { drained }),
                    Ready::READABLE,
                ),
                None => (
                    recv_without_timestamps(self.io.get_ref(), buf).map(Received::One),
                    Ready::READABLE,
                ),
            };
            match result {
                Ok(Received::One(event)) => return Ok(event),
                // Handed out from the inbox at the top of the loop.
                Ok(Received::Batch { drained }) => {
                    if drained {
                        guard.clear_ready_matching(queue);
                    }
                }
                // This queue is drained; the edge of the other one is still recorded.
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    guard.clear_ready_matching(queue);
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) if is_delivered_network_error(&e) => {
                    return Ok(SocketEvent::Skipped {
                        reason: "icmp_error",
                    });
                }
                Err(source) => return Err(TransportError::Receive { source }),
            }
        }
    }

    #[cfg(all(test, target_os = "linux", not(feature = "portable-timestamps")))]
    fn kernel_timestamps(&self) -> Option<&KernelTimestamps> {
        self.kernel.as_ref()
    }

    /// Batched reads so far, (receive queue, error queue); `None` without
    /// kernel timestamps (no batching there).
    #[cfg(all(test, target_os = "linux", not(feature = "portable-timestamps")))]
    pub(crate) fn batch_reads(&self) -> Option<(u64, u64)> {
        self.kernel.as_ref().map(KernelTimestamps::batch_reads)
    }
}

impl ProbeSocket for UdpProbeSocket {
    type Peer = SocketAddr;

    fn timestamp_support(&self) -> TimestampSupport {
        UdpProbeSocket::timestamp_support(self)
    }

    async fn send_to(
        &self,
        payload: &[u8],
        peer: SocketAddr,
    ) -> Result<SendReceipt, TransportError> {
        UdpProbeSocket::send_to(self, payload, peer).await
    }

    async fn send_unstamped(
        &self,
        payload: &[u8],
        peer: SocketAddr,
    ) -> Result<SendReceipt, TransportError> {
        UdpProbeSocket::send_unstamped(self, payload, peer).await
    }

    async fn send_unstamped_batch(
        &self,
        batch: &[(&[u8], SocketAddr)],
    ) -> Vec<Result<(), TransportError>> {
        UdpProbeSocket::send_unstamped_batch(self, batch).await
    }

    async fn next_event(&self, buf: &mut [u8]) -> Result<SocketEvent, TransportError> {
        UdpProbeSocket::next_event(self, buf).await
    }
}

#[cfg(all(target_os = "linux", not(feature = "portable-timestamps")))]
use super::send_batch_linux::send_many;

/// The portable batch send: one `send_to` per datagram, with `sendmmsg`'s
/// contract (how many went out; the first one's failure is the error).
#[cfg(any(not(target_os = "linux"), feature = "portable-timestamps"))]
fn send_many(socket: &Socket, batch: &[(&[u8], SocketAddr)]) -> io::Result<usize> {
    for (sent, (payload, dst)) in batch.iter().enumerate() {
        if let Err(error) = socket.send_to(payload, &SockAddr::from(*dst)) {
            return if sent == 0 { Err(error) } else { Ok(sent) };
        }
    }
    Ok(batch.len())
}

/// What one read got.
enum Received {
    /// A single event (the portable path).
    One(SocketEvent),
    /// A batch now in the inbox; `drained` when it emptied the queue.
    Batch { drained: bool },
}

/// The portable receive path, used everywhere when kernel timestamps are off.
fn recv_without_timestamps(socket: &Socket, buf: &mut [u8]) -> io::Result<SocketEvent> {
    let mut bufs = [MaybeUninitSlice::new(as_uninit(buf))];
    let (len, flags, from) = socket.recv_from_vectored(&mut bufs)?;
    let host_ns = host_now_ns();
    let Some(from) = from.as_socket() else {
        return Ok(SocketEvent::Skipped {
            reason: "datagram_without_source",
        });
    };
    Ok(SocketEvent::Datagram {
        len,
        from,
        host_ns,
        kernel_ns: None,
        truncated: flags.is_truncated(),
    })
}

fn as_uninit(buf: &mut [u8]) -> &mut [MaybeUninit<u8>] {
    // SAFETY: `MaybeUninit<u8>` has the layout of `u8`, and a receive only ever
    // writes initialised bytes, so `buf` stays fully initialised.
    unsafe { &mut *(std::ptr::from_mut::<[u8]>(buf) as *mut [MaybeUninit<u8>]) }
}

/// An error an earlier datagram provoked (ICMP unreachable and kin), delivered
/// on a later call; the socket itself is fine.
fn is_delivered_network_error(error: &io::Error) -> bool {
    matches!(
        error.kind(),
        io::ErrorKind::ConnectionRefused
            | io::ErrorKind::ConnectionReset
            | io::ErrorKind::HostUnreachable
            | io::ErrorKind::NetworkUnreachable
    )
}

#[cfg(test)]
mod tests {
    #[cfg(all(target_os = "linux", not(feature = "portable-timestamps")))]
    use std::collections::BTreeSet;
    use std::sync::Arc;
    use std::time::Duration;

    use super::*;

    const GUARD: Duration = Duration::from_secs(5);

    fn loopback() -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], 0))
    }

    async fn next(socket: &UdpProbeSocket, buf: &mut [u8]) -> SocketEvent {
        tokio::time::timeout(GUARD, socket.next_event(buf))
            .await
            .expect("socket event within the guard time")
            .expect("receive")
    }

    /// Next datagram, setting aside the TX stamps this socket's own sends produce.
    async fn next_datagram(socket: &UdpProbeSocket, buf: &mut [u8]) -> SocketEvent {
        loop {
            let event = next(socket, buf).await;
            if matches!(event, SocketEvent::Datagram { .. }) {
                return event;
            }
        }
    }

    /// Only kernel timestamping produces TX stamps.
    #[cfg(all(target_os = "linux", not(feature = "portable-timestamps")))]
    async fn tx_stamps(socket: &UdpProbeSocket, count: usize) -> Vec<(u32, u64)> {
        let mut buf = [0u8; 64];
        let mut stamps = Vec::new();
        while stamps.len() < count {
            match next(socket, &mut buf).await {
                SocketEvent::TxTimestamp { key, kernel_ns } => stamps.push((key, kernel_ns)),
                other => panic!("expected a TX timestamp, got {other:?}"),
            }
        }
        stamps
    }

    #[test]
    fn binding_outside_a_runtime_is_an_error_not_a_panic() {
        let err = UdpProbeSocket::bind(loopback(), TimestampMode::Off).unwrap_err();
        assert_eq!(err.category(), "no_runtime");
    }

    #[tokio::test]
    async fn with_timestamping_off_datagrams_flow_and_carry_no_kernel_stamps() {
        let a = UdpProbeSocket::bind(loopback(), TimestampMode::Off).unwrap();
        let b = UdpProbeSocket::bind(loopback(), TimestampMode::Off).unwrap();
        assert_eq!(a.timestamp_support(), TimestampSupport::NONE);

        let receipt = a.send_to(b"hello", b.local_addr()).await.unwrap();
        assert_eq!(receipt.tx_key, None);
        assert!(receipt.host_ns > 0);

        let mut buf = [0u8; 64];
        let SocketEvent::Datagram {
            len,
            from,
            host_ns,
            kernel_ns,
            truncated,
        } = next(&b, &mut buf).await
        else {
            panic!("expected a datagram");
        };
        assert_eq!(&buf[..len], b"hello");
        assert_eq!(from, a.local_addr());
        assert!(host_ns >= receipt.host_ns);
        assert_eq!(kernel_ns, None);
        assert!(!truncated);
    }

    #[tokio::test]
    async fn a_batch_send_delivers_each_datagram_in_order_and_reports_each_failure() {
        let socket = UdpProbeSocket::bind(loopback(), TimestampMode::Software).unwrap();
        let (first, second) = (
            UdpProbeSocket::bind(loopback(), TimestampMode::Off).unwrap(),
            UdpProbeSocket::bind(loopback(), TimestampMode::Off).unwrap(),
        );
        // An IPv6 destination cannot be reached from an IPv4 socket: the kernel
        // refuses that one datagram, not the batch.
        let unreachable = SocketAddr::from((std::net::Ipv6Addr::LOCALHOST, 9));
        let batch: [(&[u8], SocketAddr); 5] = [
            (b"a1", first.local_addr()),
            (b"b1", second.local_addr()),
            (b"xx", unreachable),
            (b"a2", first.local_addr()),
            (b"b2", second.local_addr()),
        ];
        let results = socket.send_unstamped_batch(&batch).await;
        let sent: Vec<bool> = results.iter().map(Result::is_ok).collect();
        assert_eq!(sent, [true, true, false, true, true]);
        let mut buf = [0u8; 64];
        for (sink, expected) in [(&first, [b"a1", b"a2"]), (&second, [b"b1", b"b2"])] {
            for payload in expected {
                let SocketEvent::Datagram { len, from, .. } = next(sink, &mut buf).await else {
                    panic!("expected a datagram");
                };
                assert_eq!((&buf[..len], from), (&payload[..], socket.local_addr()));
            }
        }
        // The batch asked for no TX stamp: the next stamped send takes the first key.
        let receipt = socket.send_to(b"s", first.local_addr()).await.unwrap();
        if socket.timestamp_support().tx {
            assert_eq!(receipt.tx_key, Some(0));
        }
    }

    async fn oversized_datagram_is_cut_and_flagged(mode: TimestampMode) {
        let a = UdpProbeSocket::bind(loopback(), mode).unwrap();
        let b = UdpProbeSocket::bind(loopback(), mode).unwrap();
        let payload: Vec<u8> = (0..100u8).collect();
        a.send_to(&payload, b.local_addr()).await.unwrap();
        a.send_to(&payload[..10], b.local_addr()).await.unwrap();

        let mut buf = [0u8; 40];
        let SocketEvent::Datagram { len, truncated, .. } = next_datagram(&b, &mut buf).await else {
            unreachable!()
        };
        assert!(truncated, "a 100-byte datagram does not fit 40 bytes");
        assert_eq!(len, 40);
        assert_eq!(&buf[..], &payload[..40]);

        let SocketEvent::Datagram { len, truncated, .. } = next_datagram(&b, &mut buf).await else {
            unreachable!()
        };
        assert!(!truncated);
        assert_eq!(len, 10);
    }

    #[tokio::test]
    async fn oversized_datagram_is_cut_and_flagged_without_timestamps() {
        oversized_datagram_is_cut_and_flagged(TimestampMode::Off).await;
    }

    #[tokio::test]
    async fn sender_and_receiver_tasks_share_one_socket() {
        let a = Arc::new(UdpProbeSocket::bind(loopback(), TimestampMode::Off).unwrap());
        let b = UdpProbeSocket::bind(loopback(), TimestampMode::Off).unwrap();
        let b_addr = b.local_addr();
        let receiver = {
            let a = Arc::clone(&a);
            tokio::spawn(async move {
                let mut buf = [0u8; 16];
                let SocketEvent::Datagram { len, .. } = next(&a, &mut buf).await else {
                    unreachable!()
                };
                buf[..len].to_vec()
            })
        };
        a.send_to(b"ping", b_addr).await.unwrap();
        let mut buf = [0u8; 16];
        let SocketEvent::Datagram { from, .. } = next(&b, &mut buf).await else {
            unreachable!()
        };
        b.send_to(b"pong", from).await.unwrap();
        assert_eq!(receiver.await.unwrap(), b"pong");
    }

    #[cfg(all(target_os = "linux", not(feature = "portable-timestamps")))]
    mod kernel_timestamps {
        use super::*;

        /// A datagram that carried kernel stamps at both ends.
        struct Stamped {
            receipt: SendReceipt,
            tx_ns: u64,
            len: usize,
            from: SocketAddr,
            rx_ns: u64,
        }

        /// The kernel turns RX software stamping on asynchronously when the first
        /// socket of the host asks for it, so the first datagrams after that may
        /// arrive unstamped: retry a bounded number of times.
        async fn send_until_rx_stamped(
            sender: &UdpProbeSocket,
            receiver: &UdpProbeSocket,
            payload: &[u8],
            buf: &mut [u8],
        ) -> Stamped {
            const ATTEMPTS: usize = 100;
            for _ in 0..ATTEMPTS {
                let receipt = sender
                    .send_to(payload, receiver.local_addr())
                    .await
                    .unwrap();
                let [(key, tx_ns)] = tx_stamps(sender, 1).await[..] else {
                    unreachable!()
                };
                assert_eq!(Some(key), receipt.tx_key);
                let SocketEvent::Datagram {
                    len,
                    from,
                    kernel_ns,
                    ..
                } = next_datagram(receiver, buf).await
                else {
                    unreachable!()
                };
                if let Some(rx_ns) = kernel_ns {
                    return Stamped {
                        receipt,
                        tx_ns,
                        len,
                        from,
                        rx_ns,
                    };
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            panic!("none of {ATTEMPTS} datagrams carried an RX timestamp");
        }

        /// A receiver whose RX stamping is known to be on, and a sender to it.
        async fn stamped_pair() -> (UdpProbeSocket, UdpProbeSocket) {
            let sender = UdpProbeSocket::bind(loopback(), TimestampMode::Software).unwrap();
            let receiver = UdpProbeSocket::bind(loopback(), TimestampMode::Software).unwrap();
            send_until_rx_stamped(&sender, &receiver, b"warm", &mut [0u8; 64]).await;
            (sender, receiver)
        }

        #[tokio::test]
        async fn queued_datagrams_come_in_one_batch_each_with_its_rx_stamp() {
            let (sender, receiver) = stamped_pair().await;
            let (reads_before, _) = receiver.batch_reads().unwrap();
            for i in 0..5u8 {
                sender
                    .send_unstamped(&[i; 3], receiver.local_addr())
                    .await
                    .unwrap();
            }
            let mut buf = [0u8; 64];
            let mut last_stamp = 0;
            for i in 0..5u8 {
                let SocketEvent::Datagram {
                    len,
                    from,
                    kernel_ns,
                    truncated,
                    ..
                } = next(&receiver, &mut buf).await
                else {
                    panic!("expected datagram {i}");
                };
                assert_eq!(
                    (&buf[..len], from, truncated),
                    (&[i; 3][..], sender.local_addr(), false)
                );
                let stamp = kernel_ns.expect("every datagram of the batch has its RX stamp");
                assert!(stamp >= last_stamp, "stamps in arrival order");
                last_stamp = stamp;
            }
            let (reads_after, _) = receiver.batch_reads().unwrap();
            assert_eq!(
                reads_after - reads_before,
                1,
                "five queued datagrams, one recvmmsg"
            );
        }

        #[tokio::test]
        async fn more_than_a_batch_is_read_in_full_batches_then_the_rest() {
            let (sender, receiver) = stamped_pair().await;
            let (reads_before, _) = receiver.batch_reads().unwrap();
            let count = 2 * crate::transport::recv_batch_linux::BATCH + 3;
            for i in 0..count {
                let i = u16::try_from(i).unwrap();
                sender
                    .send_unstamped(&i.to_be_bytes(), receiver.local_addr())
                    .await
                    .unwrap();
            }
            let mut buf = [0u8; 64];
            for i in 0..count {
                let SocketEvent::Datagram { len, .. } = next(&receiver, &mut buf).await else {
                    panic!("expected datagram {i}");
                };
                assert_eq!(&buf[..len], &u16::try_from(i).unwrap().to_be_bytes());
            }
            let (reads_after, _) = receiver.batch_reads().unwrap();
            assert_eq!(reads_after - reads_before, 3, "16 + 16 + 3");
        }

        #[tokio::test]
        async fn tx_stamps_queued_together_come_in_one_batch() {
            let socket = UdpProbeSocket::bind(loopback(), TimestampMode::Software).unwrap();
            let sink = UdpProbeSocket::bind(loopback(), TimestampMode::Off).unwrap();
            let mut keys = Vec::new();
            for _ in 0..5 {
                keys.push(
                    socket
                        .send_to(b"k", sink.local_addr())
                        .await
                        .unwrap()
                        .tx_key
                        .unwrap(),
                );
            }
            let reported: Vec<u32> = tx_stamps(&socket, 5)
                .await
                .into_iter()
                .map(|(key, _)| key)
                .collect();
            assert_eq!(reported, keys);
            assert_eq!(socket.batch_reads(), Some((0, 1)));
        }

        /// Stamped sends get keys 0, 1, 2, ...; unstamped ones in between get
        /// none and leave nothing on the error queue.
        async fn only_stamped_sends_report(socket: UdpProbeSocket) {
            let sink = UdpProbeSocket::bind(loopback(), TimestampMode::Off).unwrap();
            let mut keys = Vec::new();
            for i in 0..6u8 {
                if i % 2 == 0 {
                    let receipt = socket.send_to(&[i], sink.local_addr()).await.unwrap();
                    keys.push(receipt.tx_key.expect("a stamped send has a key"));
                } else {
                    let receipt = socket
                        .send_unstamped(&[i], sink.local_addr())
                        .await
                        .unwrap();
                    assert_eq!(receipt.tx_key, None);
                }
            }
            assert_eq!(keys, vec![0, 1, 2]);
            let reported: Vec<u32> = tx_stamps(&socket, 3)
                .await
                .into_iter()
                .map(|(key, _)| key)
                .collect();
            assert_eq!(reported, keys);
            let mut buf = [0u8; 64];
            let more =
                tokio::time::timeout(Duration::from_millis(200), socket.next_event(&mut buf)).await;
            assert!(
                more.is_err(),
                "an unstamped send was stamped after all: {more:?}"
            );
            // Every datagram still arrived.
            for i in 0..6u8 {
                let SocketEvent::Datagram { len, .. } = next(&sink, &mut buf).await else {
                    unreachable!()
                };
                assert_eq!(&buf[..len], &[i]);
            }
        }

        #[tokio::test]
        async fn unstamped_sends_take_no_key_and_leave_no_stamp() {
            only_stamped_sends_report(
                UdpProbeSocket::bind(loopback(), TimestampMode::Software).unwrap(),
            )
            .await;
        }

        #[tokio::test]
        async fn unstamped_sends_take_no_key_and_leave_no_stamp_with_the_kernel_counter() {
            let socket = UdpProbeSocket::bind(loopback(), TimestampMode::Software).unwrap();
            socket.kernel_timestamps().unwrap().use_kernel_counter();
            only_stamped_sends_report(socket).await;
        }

        #[tokio::test]
        async fn a_datagram_longer_than_a_batch_slot_is_cut_and_flagged() {
            let (sender, receiver) = stamped_pair().await;
            let long = vec![7u8; crate::transport::recv_batch_linux::SLOT_LEN + 100];
            sender
                .send_unstamped(&long, receiver.local_addr())
                .await
                .unwrap();
            sender
                .send_unstamped(b"after", receiver.local_addr())
                .await
                .unwrap();
            let mut buf = [0u8; 1024];
            let SocketEvent::Datagram { len, truncated, .. } = next(&receiver, &mut buf).await
            else {
                unreachable!()
            };
            assert!(truncated);
            assert_eq!(len, crate::transport::recv_batch_linux::SLOT_LEN);
            let SocketEvent::Datagram { len, truncated, .. } = next(&receiver, &mut buf).await
            else {
                unreachable!()
            };
            assert_eq!((&buf[..len], truncated), (&b"after"[..], false));
        }

        #[tokio::test]
        async fn datagram_round_trip_carries_kernel_rx_timestamps() {
            let a = UdpProbeSocket::bind(loopback(), TimestampMode::Software).unwrap();
            let b = UdpProbeSocket::bind(loopback(), TimestampMode::Software).unwrap();
            let software = TimestampSupport {
                rx: true,
                tx: true,
                hardware: false,
            };
            assert_eq!(a.timestamp_support(), software);

            let mut buf = [0u8; 64];
            let there = send_until_rx_stamped(&a, &b, b"ping", &mut buf).await;
            assert_eq!(&buf[..there.len], b"ping");
            assert_eq!(there.from, a.local_addr());

            let back = send_until_rx_stamped(&b, &a, b"pong", &mut buf).await;
            assert_eq!(&buf[..back.len], b"pong");
            assert_eq!(back.from, b.local_addr());
            assert!(back.receipt.host_ns >= there.receipt.host_ns);
        }

        async fn tx_keys_follow_send_order(socket: UdpProbeSocket) {
            let sink = UdpProbeSocket::bind(loopback(), TimestampMode::Off).unwrap();
            let mut keys = Vec::new();
            for i in 0..50u8 {
                let receipt = socket.send_to(&[i], sink.local_addr()).await.unwrap();
                keys.push(receipt.tx_key.expect("TX timestamping is on"));
            }
            assert_eq!(keys, (0..50).collect::<Vec<u32>>());
            let reported: Vec<u32> = tx_stamps(&socket, 50)
                .await
                .into_iter()
                .map(|(key, _)| key)
                .collect();
            assert_eq!(reported, keys);
        }

        #[tokio::test]
        async fn tx_timestamps_arrive_under_keys_in_send_order() {
            tx_keys_follow_send_order(
                UdpProbeSocket::bind(loopback(), TimestampMode::Software).unwrap(),
            )
            .await;
        }

        #[tokio::test]
        async fn tx_timestamps_arrive_under_keys_in_send_order_with_the_kernel_counter() {
            let socket = UdpProbeSocket::bind(loopback(), TimestampMode::Software).unwrap();
            socket.kernel_timestamps().unwrap().use_kernel_counter();
            tx_keys_follow_send_order(socket).await;
        }

        async fn failed_send_keeps_its_key(socket: UdpProbeSocket) {
            let sink = UdpProbeSocket::bind(loopback(), TimestampMode::Off).unwrap();
            let first = socket.send_to(b"1", sink.local_addr()).await.unwrap();
            // Broadcast without SO_BROADCAST is refused (EACCES).
            let refused = socket
                .send_to(b"x", SocketAddr::from(([255, 255, 255, 255], 9)))
                .await;
            assert_eq!(refused.unwrap_err().category(), "send");
            let second = socket.send_to(b"2", sink.local_addr()).await.unwrap();
            assert_eq!(first.tx_key, Some(0));
            assert_eq!(second.tx_key, Some(1));
            let reported: Vec<u32> = tx_stamps(&socket, 2)
                .await
                .into_iter()
                .map(|(key, _)| key)
                .collect();
            assert_eq!(reported, vec![0, 1]);
        }

        #[tokio::test]
        async fn a_failed_send_does_not_use_up_a_key() {
            failed_send_keeps_its_key(
                UdpProbeSocket::bind(loopback(), TimestampMode::Software).unwrap(),
            )
            .await;
        }

        #[tokio::test]
        async fn a_failed_send_does_not_use_up_a_key_with_the_kernel_counter() {
            let socket = UdpProbeSocket::bind(loopback(), TimestampMode::Software).unwrap();
            socket.kernel_timestamps().unwrap().use_kernel_counter();
            failed_send_keeps_its_key(socket).await;
        }

        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn concurrent_senders_get_distinct_keys_that_all_report() {
            let socket =
                Arc::new(UdpProbeSocket::bind(loopback(), TimestampMode::Software).unwrap());
            let sink = UdpProbeSocket::bind(loopback(), TimestampMode::Off).unwrap();
            let dst = sink.local_addr();
            let senders: Vec<_> = (0..4)
                .map(|_| {
                    let socket = Arc::clone(&socket);
                    tokio::spawn(async move {
                        let mut keys = Vec::new();
                        for _ in 0..25 {
                            keys.push(socket.send_to(b"k", dst).await.unwrap().tx_key.unwrap());
                        }
                        keys
                    })
                })
                .collect();
            let mut sent = BTreeSet::new();
            for sender in senders {
                sent.extend(sender.await.unwrap());
            }
            assert_eq!(sent, (0..100).collect::<BTreeSet<u32>>());
            let reported: BTreeSet<u32> = tx_stamps(&socket, 100)
                .await
                .into_iter()
                .map(|(key, _)| key)
                .collect();
            assert_eq!(reported, sent);
        }

        #[tokio::test]
        async fn rx_stamp_minus_tx_stamp_of_one_datagram_is_non_negative_and_small() {
            let a = UdpProbeSocket::bind(loopback(), TimestampMode::Software).unwrap();
            let b = UdpProbeSocket::bind(loopback(), TimestampMode::Software).unwrap();
            let mut buf = [0u8; 64];
            let stamped = send_until_rx_stamped(&a, &b, b"stamp me", &mut buf).await;
            let one_way = i128::from(stamped.rx_ns) - i128::from(stamped.tx_ns);
            assert!(
                one_way >= 0,
                "RX stamp precedes TX stamp by {} ns",
                -one_way
            );
            // Stamps from two different clocks would be seconds or years apart.
            assert!(
                one_way < 1_000_000_000,
                "one-way loopback time of {one_way} ns"
            );
        }

        #[tokio::test]
        async fn oversized_datagram_is_cut_and_flagged_with_timestamps() {
            oversized_datagram_is_cut_and_flagged(TimestampMode::Software).await;
        }

        #[tokio::test]
        async fn hardware_mode_falls_back_to_software_where_the_nic_has_none() {
            // Loopback has no NIC clock, so the ioctl is refused.
            let socket = UdpProbeSocket::bind(loopback(), TimestampMode::Hardware).unwrap();
            assert_eq!(
                socket.timestamp_support(),
                TimestampSupport {
                    rx: true,
                    tx: true,
                    hardware: false
                }
            );
            let sink = UdpProbeSocket::bind(loopback(), TimestampMode::Off).unwrap();
            let receipt = socket.send_to(b"hw?", sink.local_addr()).await.unwrap();
            assert_eq!(tx_stamps(&socket, 1).await[0].0, receipt.tx_key.unwrap());
        }

        #[tokio::test]
        async fn per_send_keys_are_the_ones_the_kernel_reports() {
            let socket = UdpProbeSocket::bind(loopback(), TimestampMode::Software).unwrap();
            let kernel = socket.kernel_timestamps().unwrap();
            kernel.skip_keys_to(u32::MAX - 1);
            let sink = UdpProbeSocket::bind(loopback(), TimestampMode::Off).unwrap();
            let mut keys = Vec::new();
            for _ in 0..3 {
                keys.push(
                    socket
                        .send_to(b"k", sink.local_addr())
                        .await
                        .unwrap()
                        .tx_key
                        .unwrap(),
                );
            }
            if !kernel.uses_per_send_keys() {
                // Kernels before 6.13 number sends themselves; the other tests cover that.
                return;
            }
            assert_eq!(keys, vec![u32::MAX - 1, u32::MAX, 0]);
            let reported: Vec<u32> = tx_stamps(&socket, 3)
                .await
                .into_iter()
                .map(|(key, _)| key)
                .collect();
            assert_eq!(reported, keys);
        }

        /// A datagram dropped by the firewall fails with `EPERM` after the kernel
        /// counter has moved on; the keys must still match.
        ///
        /// The tests using this need root and nft; run them in a private network
        /// namespace so the rule touches nothing else (build first: `cargo test
        /// -p pingmesh-agent --lib --no-run`, then run the test binary it names):
        ///
        /// ```text
        /// unshare -n sh -c 'ip link set lo up && nft add table inet t &&
        ///   nft add chain inet t out "{ type filter hook output priority 0 ; }" &&
        ///   nft add rule inet t out udp dport 9 drop &&
        ///   target/debug/deps/pingmesh_agent-HASH firewall_drop --ignored'
        /// ```
        async fn firewall_drop_keeps_keys_matched(socket: UdpProbeSocket) {
            let sink = UdpProbeSocket::bind(loopback(), TimestampMode::Off).unwrap();
            let mut receipts = vec![socket.send_to(b"1", sink.local_addr()).await.unwrap()];
            let dropped = socket
                .send_to(b"x", SocketAddr::from(([127, 0, 0, 1], 9)))
                .await;
            let Err(TransportError::Send { source, .. }) = dropped else {
                panic!("expected the firewall to refuse the send, got {dropped:?}");
            };
            assert_eq!(source.raw_os_error(), Some(libc::EPERM));
            for _ in 0..3 {
                receipts.push(socket.send_to(b"2", sink.local_addr()).await.unwrap());
            }
            let sent: Vec<u32> = receipts.iter().map(|r| r.tx_key.unwrap()).collect();
            let reported: Vec<u32> = tx_stamps(&socket, sent.len())
                .await
                .into_iter()
                .map(|(key, _)| key)
                .collect();
            assert_eq!(reported, sent);
        }

        #[tokio::test]
        #[ignore = "needs root and an nft drop rule in a private network namespace"]
        async fn a_firewall_drop_keeps_keys_matched() {
            firewall_drop_keeps_keys_matched(
                UdpProbeSocket::bind(loopback(), TimestampMode::Software).unwrap(),
            )
            .await;
        }

        #[tokio::test]
        #[ignore = "needs root and an nft drop rule in a private network namespace"]
        async fn a_firewall_drop_keeps_keys_matched_with_the_kernel_counter() {
            let socket = UdpProbeSocket::bind(loopback(), TimestampMode::Software).unwrap();
            socket.kernel_timestamps().unwrap().use_kernel_counter();
            firewall_drop_keeps_keys_matched(socket).await;
        }
    }
}
