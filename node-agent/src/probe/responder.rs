//! The responder: answers every probe with two ACKs.
//!
//! ACK1 goes back at once, so the prober's T5 includes as little responder time
//! as possible. ACK2 follows with T3 (the probe's receive stamp) and T4 (ACK1's
//! send stamp). Both come from the socket's kernel clock, or both from the host
//! monotonic clock with the software flag set: a kernel T3 is never paired with
//! a host T4, since the two clocks cannot be subtracted.
//!
//! ACK1's kernel TX stamp arrives as a separate socket event, so ACK2 waits in a
//! bounded table keyed by the stamp's key until the stamp comes or
//! [`TX_TIMESTAMP_WAIT`] passes.
//!
//! A finished ACK2 is then held for up to [`ACK2_FLUSH_DELAY`] so that the
//! ACK2s of several probes go out with one send (`sendmmsg` on UDP) and reach
//! their probers in fewer reads: ACK2's arrival time is none of the six
//! timestamps (T6 is taken when ACK1 is handled), so holding it changes no
//! measurement, only when the prober may complete the probe.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::probe::auth::{ProbeKeyRing, Sealed, seal, verify};
use crate::probe::prober::{MAX_RECEIVE_FAILURES, RECEIVE_RETRY};
use crate::probe::wire::{AUTHENTICATED_LEN, DecodeError, Message, MessageType};
use crate::transport::TransportError;
use crate::transport::socket::{ProbeEvent, ProbeSocket};

/// How long ACK2 waits for ACK1's kernel TX stamp before going out host-timed.
pub const TX_TIMESTAMP_WAIT: Duration = Duration::from_millis(20);

/// Most ACK2s waiting for a TX stamp at once; beyond it the oldest goes out host-timed.
pub const MAX_PENDING_ACK2: usize = 4096;

/// Longest an ACK2 is held so that it goes out together with others; far
/// below any probe timeout (the prober's default is 500 ms). docs/protocol.md
/// states it as the delay a prober must allow for.
pub const ACK2_FLUSH_DELAY: Duration = Duration::from_millis(4);

/// Most ACK2s held at once: a full outbox is sent at once.
pub const ACK2_BATCH_MAX: usize = 16;

/// Room for any valid message plus enough to tell "too long" from "cut".
const RECEIVE_BUFFER_LEN: usize = AUTHENTICATED_LEN + 24;

/// Counts what the responder did; implementations feed metrics.
pub trait ResponderObserver: Send + Sync {
    /// An ACK2 went out; `software_timed` when its T3/T4 are host readings.
    fn answered(&self, software_timed: bool);
    /// A datagram was not a probe: a [`DecodeError::category`], or
    /// `"not_a_probe"` for a well-formed message of another type.
    fn malformed(&self, reason: &'static str);
    /// A well-formed probe was dropped for its tag (probe keys are in
    /// force): an [`crate::probe::auth::AuthFailure::category`].
    fn auth_failed(&self, reason: &'static str);
    /// Something was let go:
    /// - `"ack1_send_failed"`, `"ack2_send_failed"`: that probe got no full answer;
    /// - `"tx_timestamp_timeout"`, `"pending_ack2_overflow"`,
    ///   `"tx_timestamp_mismatch"`: ACK1's kernel stamp was given up and that
    ///   probe's ACK2 went out host-timed;
    /// - `"send_completion_failed"`: a send the transport had accepted
    ///   completed with an error (RDMA), and it was not an ACK1 still waited on;
    /// - `"receive_failed"`: the socket failed to receive (whatever it was
    ///   is lost); the responder goes on unless it fails persistently;
    /// - a reason the socket gave for a skipped event (`"icmp_error"`, ...).
    fn dropped(&self, reason: &'static str);
}

/// Answers probes on `socket` until `cancel` fires (then returns `Ok`); with
/// probe keys in `probe_keys`, only authenticated probes, with signed ACKs;
/// `endpoint_id` is this responder's endpoint id, which every tag covers (a
/// probe signed for another responder is dropped as `bad_tag`). Only a
/// persistent failure to receive ([`MAX_RECEIVE_FAILURES`] in a row, as the
/// prober) ends it early, with the error; a transient one, bad input and
/// failed sends are counted and skipped.
pub async fn run_responder<S: ProbeSocket>(
    socket: Arc<S>,
    observer: Arc<dyn ResponderObserver>,
    probe_keys: Arc<ProbeKeyRing>,
    endpoint_id: Arc<str>,
    cancel: CancellationToken,
) -> Result<(), TransportError> {
    let mut responder = Responder {
        socket: Arc::clone(&socket),
        observer,
        probe_keys,
        endpoint_id,
        pending: PendingAck2s::default(),
        outbox: Ack2Outbox::default(),
    };
    let mut buf = [0u8; RECEIVE_BUFFER_LEN];
    let mut failures = 0u32;
    tracing::debug!(support = ?socket.timestamp_support(), "responder running");
    // The cancellation future and the expiry timer are made once and the
    // timer is moved only when the earliest deadline changes (about once per
    // TX_TIMESTAMP_WAIT): made afresh per event, each would register and
    // deregister itself (the timer in the runtime's timer wheel) every time.
    let cancelled = cancel.cancelled();
    tokio::pin!(cancelled);
    let timer = tokio::time::sleep_until(Instant::now());
    tokio::pin!(timer);
    let mut armed: Option<Instant> = None;
    loop {
        // One timer serves both the TX stamp waits and the held ACK2s.
        let deadline = match (responder.pending.next_deadline(), responder.outbox.flush_at) {
            (Some(stamp), Some(flush)) => Some(stamp.min(flush)),
            (stamp, flush) => stamp.or(flush),
        };
        if deadline != armed {
            if let Some(at) = deadline {
                timer.as_mut().reset(at);
            }
            armed = deadline;
        }
        tokio::select! {
            biased;
            () = &mut cancelled => {
                responder.flush().await;
                return Ok(());
            }
            () = &mut timer, if armed.is_some() => {
                armed = None;
                let now = Instant::now();
                responder.expire(now).await;
                if responder.outbox.flush_at.is_some_and(|at| at <= now) {
                    responder.flush().await;
                }
            }
            event = socket.next_event(&mut buf) => match event {
                Ok(event) => {
                    failures = 0;
                    responder.handle(event, &buf).await;
                }
                Err(error) => {
                    failures += 1;
                    responder.observer.dropped("receive_failed");
                    if failures >= MAX_RECEIVE_FAILURES {
                        tracing::error!(%error, failures, "responder socket keeps failing to receive; giving up on it");
                        responder.flush().await;
                        return Err(error);
                    }
                    tracing::warn!(%error, failures, "responder socket receive failed");
                    tokio::time::sleep(RECEIVE_RETRY).await;
                }
            },
        }
    }
}

struct Responder<S: ProbeSocket> {
    socket: Arc<S>,
    observer: Arc<dyn ResponderObserver>,
    probe_keys: Arc<ProbeKeyRing>,
    /// This responder's endpoint id, covered by every tag.
    endpoint_id: Arc<str>,
    pending: PendingAck2s<S::Peer>,
    outbox: Ack2Outbox<S::Peer>,
}

impl<S: ProbeSocket> Responder<S> {
    async fn handle(&mut self, event: ProbeEvent<S::Peer>, buf: &[u8]) {
        match event {
            ProbeEvent::Datagram {
                len,
                from,
                host_ns,
                kernel_ns,
                truncated,
            } => {
                if truncated {
                    self.observer
                        .malformed(DecodeError::WrongLength(len).category());
                    return;
                }
                if buf[..len].starts_with(&crate::pathtrace::TRACE_MAGIC) {
                    // The last datagram of another agent's path trace: it
                    // reached us, which is all it was for.
                    self.observer.dropped("path_trace");
                    return;
                }
                match Message::decode(&buf[..len]) {
                    Ok(probe) if probe.kind == MessageType::Probe => {
                        // A forged probe, or one signed for another
                        // responder, gets no answer: counted and dropped.
                        let keys = self.probe_keys.keys();
                        match verify(keys.as_deref(), &buf[..len], &self.endpoint_id) {
                            Ok(()) => self.answer(probe, from, host_ns, kernel_ns).await,
                            Err(failure) => self.observer.auth_failed(failure.category()),
                        }
                    }
                    Ok(_) => self.observer.malformed("not_a_probe"),
                    Err(error) => self.observer.malformed(error.category()),
                }
            }
            ProbeEvent::TxTimestamp { key, kernel_ns } => {
                // Stamps of ACK2s (and of ACK1s already answered host-timed) match nothing.
                let Some(ack) = self.pending.take(key) else {
                    return;
                };
                if kernel_ns >= ack.t3_kernel_ns {
                    self.send_ack2(&ack.probe, ack.peer, ack.t3_kernel_ns, kernel_ns, false)
                        .await;
                } else {
                    // A stamp from before the probe arrived belongs to an older
                    // send under a reused key, not to this ACK1.
                    self.observer.dropped("tx_timestamp_mismatch");
                    self.send_host_timed(&ack).await;
                }
            }
            // Completions of ACK2s, and of ACK1s that were answered host-timed.
            ProbeEvent::SendDone { .. } => {}
            ProbeEvent::SendFailed { key } => {
                if self.pending.take(key).is_some() {
                    // ACK1 never left: no ACK2 either, the prober counts the probe lost.
                    self.observer.dropped("ack1_send_failed");
                } else {
                    self.observer.dropped("send_completion_failed");
                }
            }
            ProbeEvent::Skipped { reason } => self.observer.dropped(reason),
        }
    }

    async fn answer(
        &mut self,
        probe: Message,
        peer: S::Peer,
        t3_host_ns: u64,
        t3_kernel_ns: Option<u64>,
    ) {
        let ack1 = seal(
            self.probe_keys.keys().as_deref(),
            &Message::ack1(&probe),
            &self.endpoint_id,
        );
        let receipt = match self.socket.send_to(ack1.as_bytes(), peer).await {
            Ok(receipt) => receipt,
            Err(error) => {
                tracing::debug!(?peer, %error, "ACK1 send failed");
                self.observer.dropped("ack1_send_failed");
                return;
            }
        };
        let waiting = PendingAck2 {
            probe,
            peer,
            t3_kernel_ns: 0,
            t3_host_ns,
            t4_host_ns: receipt.host_ns,
            deadline: Instant::now() + TX_TIMESTAMP_WAIT,
        };
        let (Some(t3_kernel_ns), Some(key)) = (t3_kernel_ns, receipt.tx_key) else {
            // One kernel stamp without the other is useless: both host readings.
            self.send_host_timed(&waiting).await;
            return;
        };
        let displaced = self.pending.insert(
            key,
            PendingAck2 {
                t3_kernel_ns,
                ..waiting
            },
        );
        if let Some(oldest) = displaced {
            self.observer.dropped("pending_ack2_overflow");
            self.send_host_timed(&oldest).await;
        }
    }

    /// Sends the ACK2s whose TX stamp did not come in time, host-timed.
    async fn expire(&mut self, now: Instant) {
        while let Some(ack) = self.pending.pop_expired(now) {
            self.observer.dropped("tx_timestamp_timeout");
            self.send_host_timed(&ack).await;
        }
    }

    async fn send_host_timed(&mut self, ack: &PendingAck2<S::Peer>) {
        self.send_ack2(&ack.probe, ack.peer, ack.t3_host_ns, ack.t4_host_ns, true)
            .await;
    }

    /// Seals ACK2 and holds it for the next flush: at once when the outbox
    /// is full, else at most [`ACK2_FLUSH_DELAY`] after the first one held.
    async fn send_ack2(
        &mut self,
        probe: &Message,
        peer: S::Peer,
        t3_ns: u64,
        t4_ns: u64,
        software_timed: bool,
    ) {
        let ack2 = seal(
            self.probe_keys.keys().as_deref(),
            &Message::ack2(probe, t3_ns, t4_ns, software_timed),
            &self.endpoint_id,
        );
        if self.outbox.hold(ack2, peer, software_timed, Instant::now()) {
            self.flush().await;
        }
    }

    /// Sends every held ACK2 with one batch send.
    async fn flush(&mut self) {
        self.outbox.flush_at = None;
        if self.outbox.held.is_empty() {
            return;
        }
        let batch: Vec<(&[u8], S::Peer)> = self
            .outbox
            .held
            .iter()
            .map(|held| (held.ack2.as_bytes(), held.peer))
            .collect();
        // No one reads ACK2's own TX stamp: not asking for it saves an
        // error-queue entry, a wake-up and a read per probe answered.
        let results = self.socket.send_unstamped_batch(&batch).await;
        drop(batch);
        for (held, result) in self.outbox.held.iter().zip(results) {
            match result {
                Ok(()) => self.observer.answered(held.software_timed),
                Err(error) => {
                    tracing::debug!(peer = ?held.peer, %error, "ACK2 send failed");
                    self.observer.dropped("ack2_send_failed");
                }
            }
        }
        self.outbox.held.clear();
    }
}

/// A sealed ACK2 waiting for the next flush.
#[derive(Debug, Clone, Copy)]
struct HeldAck2<P> {
    ack2: Sealed,
    peer: P,
    software_timed: bool,
}

/// ACK2s held so that they go out together; bounded by [`ACK2_BATCH_MAX`].
#[derive(Debug)]
struct Ack2Outbox<P> {
    held: Vec<HeldAck2<P>>,
    /// When the held ACK2s must go: [`ACK2_FLUSH_DELAY`] after the first.
    flush_at: Option<Instant>,
}

impl<P> Default for Ack2Outbox<P> {
    fn default() -> Self {
        Self {
            held: Vec::with_capacity(ACK2_BATCH_MAX),
            flush_at: None,
        }
    }
}

impl<P> Ack2Outbox<P> {
    /// Holds `ack2`; true when the outbox is full and must be flushed now.
    fn hold(&mut self, ack2: Sealed, peer: P, software_timed: bool, now: Instant) -> bool {
        self.flush_at.get_or_insert(now + ACK2_FLUSH_DELAY);
        self.held.push(HeldAck2 {
            ack2,
            peer,
            software_timed,
        });
        self.held.len() >= ACK2_BATCH_MAX
    }
}

/// An ACK2 waiting for ACK1's kernel TX stamp, with the host readings to fall back on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct PendingAck2<P> {
    probe: Message,
    peer: P,
    t3_kernel_ns: u64,
    t3_host_ns: u64,
    t4_host_ns: u64,
    deadline: Instant,
}

/// ACK2s by TX stamp key, bounded, expiring in the order they were added
/// (every entry waits equally long).
#[derive(Debug)]
struct PendingAck2s<P> {
    by_key: HashMap<u32, PendingAck2<P>>,
    /// Deadlines in insertion order; entries already taken are skipped lazily.
    order: VecDeque<(Instant, u32)>,
}

impl<P> Default for PendingAck2s<P> {
    fn default() -> Self {
        Self {
            by_key: HashMap::new(),
            order: VecDeque::new(),
        }
    }
}

impl<P: Copy> PendingAck2s<P> {
    /// Adds `ack`; returns an entry it displaced: the oldest when the table is
    /// full, or an older entry under the same key (keys wrap or restart).
    fn insert(&mut self, key: u32, ack: PendingAck2<P>) -> Option<PendingAck2<P>> {
        let displaced = match self.by_key.remove(&key) {
            Some(same_key) => Some(same_key),
            None if self.by_key.len() >= MAX_PENDING_ACK2 => self.pop_oldest(),
            None => None,
        };
        self.order.push_back((ack.deadline, key));
        self.by_key.insert(key, ack);
        // Taken entries leave stale order slots behind; keep those bounded too.
        if self.order.len() > 2 * MAX_PENDING_ACK2 {
            let by_key = &self.by_key;
            self.order
                .retain(|(deadline, key)| by_key.get(key).is_some_and(|a| a.deadline == *deadline));
        }
        displaced
    }

    fn take(&mut self, key: u32) -> Option<PendingAck2<P>> {
        self.by_key.remove(&key)
    }

    fn next_deadline(&self) -> Option<Instant> {
        self.order.front().map(|(deadline, _)| *deadline)
    }

    fn pop_expired(&mut self, now: Instant) -> Option<PendingAck2<P>> {
        while let Some(&(deadline, _)) = self.order.front() {
            if deadline > now {
                return None;
            }
            if let Some(ack) = self.pop_front_if_live() {
                return Some(ack);
            }
        }
        None
    }

    fn pop_oldest(&mut self) -> Option<PendingAck2<P>> {
        while !self.order.is_empty() {
            if let Some(ack) = self.pop_front_if_live() {
                return Some(ack);
            }
        }
        None
    }

    /// Pops the front slot; returns its entry unless that was taken already.
    fn pop_front_if_live(&mut self) -> Option<PendingAck2<P>> {
        let (deadline, key) = self.order.pop_front()?;
        if self
            .by_key
            .get(&key)
            .is_some_and(|ack| ack.deadline == deadline)
        {
            self.by_key.remove(&key)
        } else {
            None
        }
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        self.by_key.len()
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;
    use std::sync::Mutex;

    use std::net::SocketAddr;

    use super::*;
    use crate::probe::wire::MESSAGE_LEN;
    use crate::transport::TimestampMode;
    use crate::transport::udp::{SocketEvent, UdpProbeSocket};

    const GUARD: Duration = Duration::from_secs(5);

    #[derive(Debug, Default)]
    struct Counts {
        answered_kernel: usize,
        answered_software: usize,
        malformed: BTreeMap<&'static str, usize>,
        dropped: BTreeMap<&'static str, usize>,
        auth_failed: BTreeMap<&'static str, usize>,
    }

    #[derive(Debug, Default)]
    struct CountingObserver(Mutex<Counts>);

    impl CountingObserver {
        fn counts(&self) -> std::sync::MutexGuard<'_, Counts> {
            self.0.lock().unwrap()
        }
    }

    impl ResponderObserver for CountingObserver {
        fn answered(&self, software_timed: bool) {
            let mut counts = self.counts();
            if software_timed {
                counts.answered_software += 1;
            } else {
                counts.answered_kernel += 1;
            }
        }
        fn malformed(&self, reason: &'static str) {
            *self.counts().malformed.entry(reason).or_default() += 1;
        }
        fn dropped(&self, reason: &'static str) {
            *self.counts().dropped.entry(reason).or_default() += 1;
        }
        fn auth_failed(&self, reason: &'static str) {
            *self.counts().auth_failed.entry(reason).or_default() += 1;
        }
    }

    struct Running {
        addr: SocketAddr,
        observer: Arc<CountingObserver>,
        cancel: CancellationToken,
        task: tokio::task::JoinHandle<Result<(), TransportError>>,
    }

    /// The endpoint id of the responder under test.
    const RESPONDER_ID: &str = "b/udp0";

    fn start(mode: TimestampMode) -> Running {
        start_with_keys(mode, ProbeKeyRing::off())
    }

    fn start_with_keys(mode: TimestampMode, probe_keys: Arc<ProbeKeyRing>) -> Running {
        let socket = Arc::new(UdpProbeSocket::bind(([127, 0, 0, 1], 0).into(), mode).unwrap());
        let observer = Arc::new(CountingObserver::default());
        let cancel = CancellationToken::new();
        let task = tokio::spawn(run_responder(
            Arc::clone(&socket),
            Arc::clone(&observer) as Arc<dyn ResponderObserver>,
            probe_keys,
            RESPONDER_ID.into(),
            cancel.clone(),
        ));
        Running {
            addr: socket.local_addr(),
            observer,
            cancel,
            task,
        }
    }

    impl Running {
        /// Cancels the responder, checks it ended cleanly, and hands back its counts.
        async fn stop(self) -> Arc<CountingObserver> {
            self.cancel.cancel();
            let result = tokio::time::timeout(GUARD, self.task)
                .await
                .unwrap()
                .unwrap();
            assert!(result.is_ok(), "responder ended with {result:?}");
            self.observer
        }
    }

    fn prober() -> UdpProbeSocket {
        UdpProbeSocket::bind(([127, 0, 0, 1], 0).into(), TimestampMode::Off).unwrap()
    }

    async fn next_message(socket: &UdpProbeSocket) -> Message {
        let mut buf = [0u8; 64];
        let event = tokio::time::timeout(GUARD, socket.next_event(&mut buf))
            .await
            .unwrap()
            .unwrap();
        let SocketEvent::Datagram { len, .. } = event else {
            panic!("expected a datagram, got {event:?}")
        };
        Message::decode(&buf[..len]).unwrap()
    }

    #[tokio::test]
    async fn with_keys_only_authentic_probes_are_answered_and_the_acks_are_signed() {
        use pingmesh_proto::probe_auth::{key_id, keys_around};
        let ring = ProbeKeyRing::off();
        ring.update(Some(&keys_around(b"0123456789abcdef0123456789abcdef", 3)))
            .unwrap();
        let keys = ring.keys().unwrap();
        let running = start_with_keys(TimestampMode::Off, ring);
        let prober = prober();
        // Unsigned, then signed with the right key id but a made-up tag.
        let unsigned = Message::probe(5, 1).encode();
        let forged = Message::probe(5, 2).encode_authenticated(key_id(3), |_| [7; 16]);
        let signed = seal(Some(&keys), &Message::probe(5, 3), RESPONDER_ID);
        for datagram in [&unsigned[..], &forged[..], signed.as_bytes()] {
            prober.send_to(datagram, running.addr).await.unwrap();
        }
        // Loopback keeps order: the first answers are the signed probe's.
        for kind in [MessageType::Ack1, MessageType::Ack2] {
            let mut buf = [0u8; 128];
            let event = tokio::time::timeout(GUARD, prober.next_event(&mut buf))
                .await
                .unwrap()
                .unwrap();
            let SocketEvent::Datagram { len, .. } = event else {
                panic!("expected a datagram, got {event:?}")
            };
            assert_eq!(len, AUTHENTICATED_LEN);
            assert_eq!(verify(Some(&keys), &buf[..len], RESPONDER_ID), Ok(()));
            let ack = Message::decode(&buf[..len]).unwrap();
            assert_eq!((ack.kind, ack.seq), (kind, 3));
        }
        let counts = running.stop().await;
        let counts = counts.counts();
        assert_eq!(counts.auth_failed.get("missing_tag"), Some(&1));
        assert_eq!(counts.auth_failed.get("bad_tag"), Some(&1));
        assert_eq!(counts.answered_software, 1);
    }

    #[tokio::test]
    async fn a_probe_signed_for_another_responder_is_dropped_unanswered() {
        // Someone on the path copies a probe the prober signed for "a/udp0"
        // (perhaps dead) to this responder ("b/udp0"), the prober's address
        // as source: answering it would complete the probe to "a/udp0".
        use pingmesh_proto::probe_auth::keys_around;
        let ring = ProbeKeyRing::off();
        ring.update(Some(&keys_around(b"0123456789abcdef0123456789abcdef", 3)))
            .unwrap();
        let keys = ring.keys().unwrap();
        let running = start_with_keys(TimestampMode::Off, ring);
        let prober = prober();
        let misdirected = seal(Some(&keys), &Message::probe(5, 1), "a/udp0");
        let meant = seal(Some(&keys), &Message::probe(5, 2), RESPONDER_ID);
        for datagram in [misdirected.as_bytes(), meant.as_bytes()] {
            prober.send_to(datagram, running.addr).await.unwrap();
        }
        // Loopback keeps order: the first answer is the second probe's.
        let ack = next_message(&prober).await;
        assert_eq!((ack.kind, ack.seq), (MessageType::Ack1, 2));
        let counts = running.stop().await;
        let counts = counts.counts();
        assert_eq!(counts.auth_failed.get("bad_tag"), Some(&1));
        assert_eq!(counts.answered_software, 1);
    }

    /// Sends `probe` and returns (ACK1, ACK2), checking both answer this probe.
    async fn ask(
        prober: &UdpProbeSocket,
        responder: SocketAddr,
        probe: Message,
    ) -> (Message, Message) {
        prober.send_to(&probe.encode(), responder).await.unwrap();
        let ack1 = next_message(prober).await;
        let ack2 = next_message(prober).await;
        assert_eq!(
            (ack1.kind, ack2.kind),
            (MessageType::Ack1, MessageType::Ack2)
        );
        for ack in [ack1, ack2] {
            assert_eq!((ack.prober_id, ack.seq), (probe.prober_id, probe.seq));
        }
        (ack1, ack2)
    }

    #[tokio::test]
    async fn a_probe_gets_ack1_then_ack2_with_t4_not_before_t3() {
        let responder = start(TimestampMode::Software);
        let prober = prober();
        let (mut asked, mut kernel_timed) = (0, 0);
        // The first probes may miss their RX stamp while the kernel turns
        // stamping on; those are answered host-timed, which is also correct.
        for seq in 0..200 {
            let (_, ack2) = ask(&prober, responder.addr, Message::probe(0xABCD, seq)).await;
            asked += 1;
            assert!(ack2.t3_ns > 0);
            assert!(
                ack2.t4_ns >= ack2.t3_ns,
                "t4 {} before t3 {}",
                ack2.t4_ns,
                ack2.t3_ns
            );
            if ack2.responder_software_timed() {
                if !crate::transport::KERNEL_TIMESTAMPS && asked == 10 {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(5)).await;
            } else {
                kernel_timed += 1;
                if kernel_timed == 10 {
                    break;
                }
            }
        }
        if crate::transport::KERNEL_TIMESTAMPS {
            assert!(kernel_timed > 0, "no ACK2 used kernel timestamps");
        } else {
            // A Mac (or the portable build): every ACK2 is host-timed.
            assert_eq!(kernel_timed, 0);
        }
        let observer = responder.stop().await;
        let counts = observer.counts();
        assert_eq!(counts.answered_kernel, kernel_timed);
        assert_eq!(counts.answered_kernel + counts.answered_software, asked);
    }

    #[tokio::test]
    async fn with_timestamping_off_ack2_carries_the_software_flag() {
        let responder = start(TimestampMode::Off);
        let prober = prober();
        let (_, ack2) = ask(&prober, responder.addr, Message::probe(7, 1)).await;
        assert!(ack2.responder_software_timed());
        assert!(ack2.t3_ns > 0 && ack2.t4_ns >= ack2.t3_ns);
        assert_eq!(responder.stop().await.counts().answered_software, 1);
    }

    #[tokio::test]
    async fn malformed_input_is_counted_and_the_next_probe_is_still_answered() {
        let responder = start(TimestampMode::Software);
        let prober = prober();
        let probe = Message::probe(42, 9);
        let mut wrong_version = probe.encode();
        wrong_version[4] = 2;
        let junk: [&[u8]; 6] = [
            b"garbage",
            &[0xFF; MESSAGE_LEN],
            &wrong_version,
            &Message::ack1(&probe).encode(),
            &Message::ack2(&probe, 1, 2, false).encode(),
            &[0u8; 200],
        ];
        for datagram in junk {
            prober.send_to(datagram, responder.addr).await.unwrap();
        }
        ask(&prober, responder.addr, probe).await;

        let observer = responder.stop().await;
        let counts = observer.counts();
        let expected: BTreeMap<&str, usize> = [
            ("wrong_length", 2),
            ("bad_magic", 1),
            ("unsupported_version", 1),
            ("not_a_probe", 2),
        ]
        .into();
        assert_eq!(counts.malformed, expected);
        assert_eq!(counts.answered_kernel + counts.answered_software, 1);
    }

    #[tokio::test]
    async fn malformed_datagrams_read_in_one_batch_are_counted_and_the_probe_among_them_answered() {
        let socket = Arc::new(
            UdpProbeSocket::bind(([127, 0, 0, 1], 0).into(), TimestampMode::Software).unwrap(),
        );
        let prober = prober();
        let probe = Message::probe(5, 1);
        // Queued before the responder runs, so its first read takes them all.
        let queued: [&[u8]; 4] = [
            b"junk",
            &probe.encode(),
            &[0u8; 200],
            &Message::ack1(&probe).encode(),
        ];
        for datagram in queued {
            prober.send_to(datagram, socket.local_addr()).await.unwrap();
        }
        let observer = Arc::new(CountingObserver::default());
        let cancel = CancellationToken::new();
        let task = tokio::spawn(run_responder(
            Arc::clone(&socket),
            Arc::clone(&observer) as Arc<dyn ResponderObserver>,
            ProbeKeyRing::off(),
            RESPONDER_ID.into(),
            cancel.clone(),
        ));
        let (ack1, ack2) = (next_message(&prober).await, next_message(&prober).await);
        assert_eq!(
            (ack1.kind, ack2.kind),
            (MessageType::Ack1, MessageType::Ack2)
        );
        assert_eq!(ack2.seq, 1);
        cancel.cancel();
        assert!(
            tokio::time::timeout(GUARD, task)
                .await
                .unwrap()
                .unwrap()
                .is_ok()
        );
        let counts = observer.counts();
        let expected: BTreeMap<&str, usize> = [("wrong_length", 2), ("not_a_probe", 1)].into();
        assert_eq!(counts.malformed, expected);
        assert_eq!(counts.answered_kernel + counts.answered_software, 1);
        #[cfg(all(target_os = "linux", not(feature = "portable-timestamps")))]
        assert_eq!(
            socket.batch_reads().map(|(receive, _)| receive),
            Some(1),
            "all four datagrams came in one read"
        );
    }

    #[tokio::test]
    async fn each_prober_is_answered_at_its_own_address() {
        let responder = start(TimestampMode::Software);
        let (first, second) = (prober(), prober());
        first
            .send_to(&Message::probe(1, 10).encode(), responder.addr)
            .await
            .unwrap();
        second
            .send_to(&Message::probe(2, 20).encode(), responder.addr)
            .await
            .unwrap();
        for (socket, id) in [(&first, 1), (&second, 2)] {
            for _ in 0..2 {
                assert_eq!(next_message(socket).await.prober_id, id);
            }
        }
        responder.stop().await;
    }

    #[tokio::test]
    async fn cancelling_stops_an_idle_responder_cleanly() {
        let responder = start(TimestampMode::Software);
        tokio::task::yield_now().await;
        responder.stop().await;
    }

    /// A responder driven by hand, answering to a fresh prober socket.
    fn responder_by_hand() -> (
        Responder<UdpProbeSocket>,
        Arc<CountingObserver>,
        UdpProbeSocket,
    ) {
        let observer = Arc::new(CountingObserver::default());
        let socket = UdpProbeSocket::bind(([127, 0, 0, 1], 0).into(), TimestampMode::Off).unwrap();
        let responder = Responder {
            socket: Arc::new(socket),
            observer: Arc::clone(&observer) as Arc<dyn ResponderObserver>,
            probe_keys: ProbeKeyRing::off(),
            endpoint_id: RESPONDER_ID.into(),
            pending: PendingAck2s::default(),
            outbox: Ack2Outbox::default(),
        };
        (responder, observer, prober())
    }

    fn waiting_for(
        prober: &UdpProbeSocket,
        t3_kernel_ns: u64,
        deadline: Instant,
    ) -> PendingAck2<SocketAddr> {
        PendingAck2 {
            peer: prober.local_addr(),
            t3_kernel_ns,
            ..pending(77, deadline)
        }
    }

    #[tokio::test]
    async fn a_tx_stamp_that_never_comes_sends_ack2_with_both_host_stamps() {
        let (mut responder, observer, prober) = responder_by_hand();
        let now = Instant::now();
        responder
            .pending
            .insert(5, waiting_for(&prober, 10, now + TX_TIMESTAMP_WAIT));
        responder.expire(now).await;
        assert_eq!(responder.pending.len(), 1, "not due yet");

        responder.expire(now + TX_TIMESTAMP_WAIT).await;
        responder.flush().await;
        let ack2 = next_message(&prober).await;
        assert_eq!((ack2.kind, ack2.seq), (MessageType::Ack2, 77));
        assert_eq!((ack2.t3_ns, ack2.t4_ns), (20, 30), "host T3 and host T4");
        assert!(ack2.responder_software_timed());
        let counts = observer.counts();
        assert_eq!(counts.dropped.get("tx_timestamp_timeout"), Some(&1));
        assert_eq!(counts.answered_software, 1);
    }

    #[tokio::test]
    async fn a_tx_stamp_arriving_in_time_pairs_with_the_kernel_rx_stamp() {
        let (mut responder, observer, prober) = responder_by_hand();
        let later = Instant::now() + TX_TIMESTAMP_WAIT;
        responder
            .pending
            .insert(5, waiting_for(&prober, 1_000, later));
        let stamp = SocketEvent::TxTimestamp {
            key: 5,
            kernel_ns: 1_500,
        };
        responder.handle(stamp, &[]).await;
        responder.flush().await;
        let ack2 = next_message(&prober).await;
        assert_eq!((ack2.t3_ns, ack2.t4_ns), (1_000, 1_500));
        assert!(!ack2.responder_software_timed());
        assert_eq!(observer.counts().answered_kernel, 1);
        assert_eq!(responder.pending.len(), 0);
    }

    #[tokio::test]
    async fn a_tx_stamp_from_before_the_probe_arrived_is_not_used() {
        let (mut responder, observer, prober) = responder_by_hand();
        let later = Instant::now() + TX_TIMESTAMP_WAIT;
        responder
            .pending
            .insert(5, waiting_for(&prober, 1_000, later));
        let stamp = SocketEvent::TxTimestamp {
            key: 5,
            kernel_ns: 999,
        };
        responder.handle(stamp, &[]).await;
        responder.flush().await;
        let ack2 = next_message(&prober).await;
        assert_eq!((ack2.t3_ns, ack2.t4_ns), (20, 30));
        assert!(ack2.responder_software_timed());
        assert_eq!(
            observer.counts().dropped.get("tx_timestamp_mismatch"),
            Some(&1)
        );
    }

    fn pending(seq: u64, deadline: Instant) -> PendingAck2<SocketAddr> {
        PendingAck2 {
            probe: Message::probe(1, seq),
            peer: ([127, 0, 0, 1], 9).into(),
            t3_kernel_ns: 10,
            t3_host_ns: 20,
            t4_host_ns: 30,
            deadline,
        }
    }

    #[test]
    fn pending_ack2s_expire_in_order_and_skip_taken_ones() {
        let t0 = Instant::now();
        let mut table = PendingAck2s::default();
        for (key, ms) in [(5, 1), (6, 2), (7, 3)] {
            assert!(
                table
                    .insert(key, pending(u64::from(key), t0 + Duration::from_millis(ms)))
                    .is_none()
            );
        }
        assert_eq!(table.take(6).map(|a| a.probe.seq), Some(6));
        assert_eq!(table.take(6), None);
        assert_eq!(table.next_deadline(), Some(t0 + Duration::from_millis(1)));

        let later = t0 + Duration::from_millis(3);
        let expired: Vec<u64> = std::iter::from_fn(|| table.pop_expired(later))
            .map(|a| a.probe.seq)
            .collect();
        assert_eq!(expired, vec![5, 7]);
        assert_eq!(table.len(), 0);
        assert_eq!(table.pop_expired(later + Duration::from_secs(1)), None);
    }

    #[test]
    fn pending_ack2s_not_yet_due_stay() {
        let t0 = Instant::now();
        let mut table = PendingAck2s::default();
        table.insert(1, pending(1, t0 + Duration::from_millis(5)));
        assert_eq!(table.pop_expired(t0), None);
        assert_eq!(table.len(), 1);
    }

    #[test]
    fn a_full_pending_table_displaces_its_oldest_entry() {
        let t0 = Instant::now();
        let mut table = PendingAck2s::default();
        let max = u32::try_from(MAX_PENDING_ACK2).unwrap();
        for key in 0..max {
            assert!(table.insert(key, pending(u64::from(key), t0)).is_none());
        }
        table.take(0);
        // Key 0 is gone, so the oldest live entry is key 1 once the table is full again.
        assert!(table.insert(max, pending(u64::from(max), t0)).is_none());
        let displaced = table.insert(max + 1, pending(u64::from(max) + 1, t0));
        assert_eq!(displaced.map(|a| a.probe.seq), Some(1));
        assert_eq!(table.len(), MAX_PENDING_ACK2);
    }

    #[test]
    fn a_reused_key_displaces_the_older_entry() {
        let t0 = Instant::now();
        let mut table = PendingAck2s::default();
        table.insert(3, pending(30, t0));
        let displaced = table.insert(3, pending(31, t0 + Duration::from_millis(1)));
        assert_eq!(displaced.map(|a| a.probe.seq), Some(30));
        assert_eq!(table.take(3).map(|a| a.probe.seq), Some(31));
        // The displaced entry's slot is stale and must not expire anything.
        assert_eq!(table.pop_expired(t0 + Duration::from_secs(1)), None);
    }

    #[test]
    fn stale_slots_stay_bounded_when_acks_are_taken_in_time() {
        let t0 = Instant::now();
        let mut table = PendingAck2s::default();
        for key in 0..(10 * MAX_PENDING_ACK2) {
            let key = u32::try_from(key).unwrap();
            table.insert(key, pending(u64::from(key), t0));
            table.take(key);
        }
        assert!(table.order.len() <= 2 * MAX_PENDING_ACK2 + 1);
    }

    /// A socket that delivers `probes` (host-timed, no TX keys), then waits
    /// forever; it keeps each batch of unstamped sends with when it went.
    struct Recorder {
        probes: Mutex<VecDeque<Message>>,
        singles: Mutex<Vec<Message>>,
        batches: Mutex<Vec<(Instant, Vec<Message>)>>,
    }

    impl Recorder {
        fn new(probes: impl IntoIterator<Item = Message>) -> Arc<Self> {
            Arc::new(Self {
                probes: Mutex::new(probes.into_iter().collect()),
                singles: Mutex::new(Vec::new()),
                batches: Mutex::new(Vec::new()),
            })
        }

        fn batch_sizes(&self) -> Vec<usize> {
            let batches = self.batches.lock().unwrap();
            batches.iter().map(|(_, batch)| batch.len()).collect()
        }
    }

    impl ProbeSocket for Recorder {
        type Peer = u32;
        fn timestamp_support(&self) -> crate::transport::TimestampSupport {
            crate::transport::TimestampSupport::NONE
        }
        async fn send_to(
            &self,
            payload: &[u8],
            _: u32,
        ) -> Result<crate::transport::socket::SendReceipt, TransportError> {
            self.singles
                .lock()
                .unwrap()
                .push(Message::decode(payload).unwrap());
            Ok(crate::transport::socket::SendReceipt {
                host_ns: 2_000,
                tx_key: None,
            })
        }
        async fn send_unstamped_batch(
            &self,
            batch: &[(&[u8], u32)],
        ) -> Vec<Result<(), TransportError>> {
            let decoded = batch
                .iter()
                .map(|(payload, _)| Message::decode(payload).unwrap())
                .collect();
            self.batches.lock().unwrap().push((Instant::now(), decoded));
            batch.iter().map(|_| Ok(())).collect()
        }
        async fn next_event(&self, buf: &mut [u8]) -> Result<ProbeEvent<u32>, TransportError> {
            let next = self.probes.lock().unwrap().pop_front();
            let Some(probe) = next else {
                return std::future::pending().await;
            };
            let bytes = probe.encode();
            buf[..bytes.len()].copy_from_slice(&bytes);
            Ok(ProbeEvent::Datagram {
                len: bytes.len(),
                from: 9,
                host_ns: 1_000 + probe.seq,
                kernel_ns: None,
                truncated: false,
            })
        }
    }

    fn recorder_by_hand(socket: &Arc<Recorder>) -> (Responder<Recorder>, Arc<CountingObserver>) {
        let observer = Arc::new(CountingObserver::default());
        let responder = Responder {
            socket: Arc::clone(socket),
            observer: Arc::clone(&observer) as Arc<dyn ResponderObserver>,
            probe_keys: ProbeKeyRing::off(),
            endpoint_id: RESPONDER_ID.into(),
            pending: PendingAck2s::default(),
            outbox: Ack2Outbox::default(),
        };
        (responder, observer)
    }

    #[tokio::test]
    async fn held_ack2s_go_out_in_one_batch_each_with_its_own_t3_and_t4() {
        let socket = Recorder::new([]);
        let (mut responder, observer) = recorder_by_hand(&socket);
        for seq in 1..=3u64 {
            let probe = Message::probe(1, seq);
            responder
                .send_ack2(&probe, 9, 100 * seq, 100 * seq + 7, false)
                .await;
        }
        assert!(socket.batch_sizes().is_empty(), "held, not sent yet");
        assert_eq!(observer.counts().answered_kernel, 0);
        responder.flush().await;
        assert_eq!(socket.batch_sizes(), [3]);
        let batch = socket.batches.lock().unwrap()[0].1.clone();
        let sent: Vec<(u64, u64, u64)> = batch
            .iter()
            .map(|ack2| (ack2.seq, ack2.t3_ns, ack2.t4_ns))
            .collect();
        assert_eq!(sent, [(1, 100, 107), (2, 200, 207), (3, 300, 307)]);
        assert!(batch.iter().all(|m| m.kind == MessageType::Ack2));
        assert_eq!(observer.counts().answered_kernel, 3);
        assert_eq!(responder.outbox.flush_at, None);
        responder.flush().await;
        assert_eq!(socket.batch_sizes(), [3], "an empty outbox sends nothing");
    }

    #[tokio::test]
    async fn a_full_outbox_is_sent_at_once() {
        let socket = Recorder::new([]);
        let (mut responder, observer) = recorder_by_hand(&socket);
        for seq in 0..u64::try_from(ACK2_BATCH_MAX + 1).unwrap() {
            responder
                .send_ack2(&Message::probe(1, seq), 9, 1, 2, true)
                .await;
        }
        assert_eq!(socket.batch_sizes(), [ACK2_BATCH_MAX]);
        assert_eq!(observer.counts().answered_software, ACK2_BATCH_MAX);
        assert_eq!(
            responder.outbox.held.len(),
            1,
            "the one after the full batch waits"
        );
        assert!(responder.outbox.flush_at.is_some());
    }

    #[tokio::test]
    async fn held_ack2s_go_out_together_once_the_flush_delay_has_passed() {
        let probes = (1..=3).map(|seq| Message::probe(0xAB, seq));
        let socket = Recorder::new(probes);
        let observer = Arc::new(CountingObserver::default());
        let cancel = CancellationToken::new();
        let started = Instant::now();
        let task = tokio::spawn(run_responder(
            Arc::clone(&socket),
            Arc::clone(&observer) as Arc<dyn ResponderObserver>,
            ProbeKeyRing::off(),
            RESPONDER_ID.into(),
            cancel.clone(),
        ));
        let waited = tokio::time::timeout(GUARD, async {
            while socket.batch_sizes().is_empty() {
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
        })
        .await;
        assert!(waited.is_ok(), "the held ACK2s were never flushed");
        let (sent_at, batch) = socket.batches.lock().unwrap()[0].clone();
        assert_eq!(batch.len(), 3, "all three held ACK2s in one batch");
        assert!(
            sent_at - started >= ACK2_FLUSH_DELAY,
            "flushed before the delay"
        );
        let host_times: Vec<(u64, u64, bool)> = batch
            .iter()
            .map(|ack2| (ack2.t3_ns, ack2.t4_ns, ack2.responder_software_timed()))
            .collect();
        assert_eq!(
            host_times,
            [
                (1_001, 2_000, true),
                (1_002, 2_000, true),
                (1_003, 2_000, true)
            ]
        );
        let ack1s = socket.singles.lock().unwrap().len();
        assert_eq!(ack1s, 3, "ACK1s go out one by one, at once");
        cancel.cancel();
        tokio::time::timeout(GUARD, task)
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        assert_eq!(observer.counts().answered_software, 3);
    }

    #[tokio::test]
    async fn cancelling_sends_the_held_ack2s_first() {
        let socket = Recorder::new([Message::probe(1, 5)]);
        let observer = Arc::new(CountingObserver::default());
        let cancel = CancellationToken::new();
        let task = tokio::spawn(run_responder(
            Arc::clone(&socket),
            Arc::clone(&observer) as Arc<dyn ResponderObserver>,
            ProbeKeyRing::off(),
            RESPONDER_ID.into(),
            cancel.clone(),
        ));
        while socket.singles.lock().unwrap().is_empty() {
            tokio::task::yield_now().await;
        }
        cancel.cancel();
        tokio::time::timeout(GUARD, task)
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        assert_eq!(socket.batch_sizes(), [1]);
    }

    /// A socket whose receives fail `failures` times, then deliver one probe,
    /// then fail for good; it keeps what is sent.
    struct Flaky {
        failures: u32,
        receives: std::sync::atomic::AtomicU32,
        sent: Mutex<Vec<Message>>,
    }

    impl Flaky {
        fn new(failures: u32) -> Arc<Self> {
            Arc::new(Self {
                failures,
                receives: std::sync::atomic::AtomicU32::new(0),
                sent: Mutex::new(Vec::new()),
            })
        }
    }

    impl ProbeSocket for Flaky {
        type Peer = u32;
        fn timestamp_support(&self) -> crate::transport::TimestampSupport {
            crate::transport::TimestampSupport::NONE
        }
        async fn send_to(
            &self,
            payload: &[u8],
            _: u32,
        ) -> Result<crate::transport::socket::SendReceipt, TransportError> {
            self.sent
                .lock()
                .unwrap()
                .push(Message::decode(payload).unwrap());
            Ok(crate::transport::socket::SendReceipt {
                host_ns: 1_000,
                tx_key: None,
            })
        }
        async fn next_event(&self, buf: &mut [u8]) -> Result<ProbeEvent<u32>, TransportError> {
            let n = self
                .receives
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            if n == self.failures {
                let probe = Message::probe(0xABCD, 42).encode();
                buf[..probe.len()].copy_from_slice(&probe);
                return Ok(ProbeEvent::Datagram {
                    len: probe.len(),
                    from: 9,
                    host_ns: 500,
                    kernel_ns: None,
                    truncated: false,
                });
            }
            Err(TransportError::Receive {
                source: std::io::Error::other("receive queue overrun"),
            })
        }
    }

    fn spawn_flaky(
        socket: &Arc<Flaky>,
    ) -> (
        Arc<CountingObserver>,
        tokio::task::JoinHandle<Result<(), TransportError>>,
    ) {
        let observer = Arc::new(CountingObserver::default());
        let task = tokio::spawn(run_responder(
            Arc::clone(socket),
            Arc::clone(&observer) as Arc<dyn ResponderObserver>,
            ProbeKeyRing::off(),
            RESPONDER_ID.into(),
            CancellationToken::new(),
        ));
        (observer, task)
    }

    #[tokio::test]
    async fn transient_receive_failures_are_counted_and_probes_after_them_answered() {
        let socket = Flaky::new(MAX_RECEIVE_FAILURES - 1);
        let (observer, task) = spawn_flaky(&socket);
        let ended = tokio::time::timeout(GUARD * 4, task)
            .await
            .unwrap()
            .unwrap();
        // It gave up only after the probe, on the next run of failures.
        assert_eq!(ended.unwrap_err().category(), "receive");
        let kinds: Vec<MessageType> = socket.sent.lock().unwrap().iter().map(|m| m.kind).collect();
        assert_eq!(kinds, [MessageType::Ack1, MessageType::Ack2]);
        let counts = observer.counts();
        assert_eq!(counts.answered_software, 1);
        assert_eq!(
            counts.dropped.get("receive_failed"),
            Some(&usize::try_from(2 * MAX_RECEIVE_FAILURES - 1).unwrap())
        );
    }

    #[tokio::test]
    async fn a_persistent_receive_failure_ends_the_responder_with_its_error() {
        let socket = Flaky::new(u32::MAX);
        let (observer, task) = spawn_flaky(&socket);
        let ended = tokio::time::timeout(GUARD * 4, task)
            .await
            .unwrap()
            .unwrap();
        assert_eq!(ended.unwrap_err().category(), "receive");
        assert_eq!(
            socket.receives.load(std::sync::atomic::Ordering::Relaxed),
            MAX_RECEIVE_FAILURES
        );
        assert_eq!(
            observer.counts().dropped.get("receive_failed"),
            Some(&usize::try_from(MAX_RECEIVE_FAILURES).unwrap())
        );
    }
}
