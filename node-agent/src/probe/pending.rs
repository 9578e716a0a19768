//! Probes in flight, matched against their ACKs and send timestamps.
//!
//! A probe is inserted *before* it is sent: on a fast path the responder's ACK
//! can be read before `send()` has even returned, and an ACK for a sequence
//! number the table does not know yet would be miscounted as unmatched.
//!
//! The events of one probe (send returned, kernel TX timestamp, ACK1, ACK2) may
//! arrive in any order. The probe completes when both ACKs are in, the send has
//! returned, and the kernel TX timestamp is in (if the transport promised one).
//! A probe that has not completed by its deadline is expired: it is still
//! *answered* when both ACKs arrived and only the kernel TX timestamp is missing
//! (the sample then falls back to host timing), and *lost* otherwise.
//!
//! A probe whose `send()` has not returned by its deadline is not ended then:
//! it may still fail to send, and a probe that never left the host must end
//! as [`Outcome::SendFailed`], never as lost. It ends when the send returns
//! (lost, or answered if both ACKs came) or fails. The prober counts a probe
//! sent once its send returned, so no loss is ever booked before its send.
//!
//! Every probe ends in exactly one [`Outcome`]; an event for a sequence number
//! that has already ended is reported as [`Unmatched`] so it can be counted.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap};
use std::hash::{BuildHasherDefault, Hasher};

use thiserror::Error;

use super::timing::{ProbeTimes, Stamp};

/// Stale deadline heap items (of probes that already completed) tolerated
/// beyond twice the live entries before the heap is rebuilt.
const HEAP_SLACK: usize = 64;

/// Hashes a sequence number with one multiplication. Sequence numbers are
/// chosen by this prober, and packets from the network only look entries up,
/// never insert, so a keyed (DoS-resistant) hash buys nothing here.
#[derive(Debug, Default, Clone, Copy)]
struct SeqHasher(u64);

impl Hasher for SeqHasher {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.write_u64(u64::from(b));
        }
    }

    fn write_u64(&mut self, n: u64) {
        // Fibonacci hashing: spreads consecutive numbers over the high bits too.
        self.0 = (self.0 ^ n).wrapping_mul(0x9E37_79B9_7F4A_7C15);
    }
}

type SeqMap<V> = HashMap<u64, V, BuildHasherDefault<SeqHasher>>;

/// How a probe ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome<C> {
    /// Both ACKs arrived; `times` holds every timestamp the probe gathered.
    Answered {
        ctx: C,
        flow: u16,
        window_start_ms: u64,
        times: ProbeTimes,
    },
    /// The deadline passed without both ACKs.
    Lost {
        ctx: C,
        flow: u16,
        window_start_ms: u64,
    },
    /// The transport refused to send the probe; it never left this host.
    SendFailed {
        ctx: C,
        flow: u16,
        window_start_ms: u64,
    },
}

impl<C> Outcome<C> {
    /// The caller context given at insertion.
    pub fn ctx(&self) -> &C {
        match self {
            Self::Answered { ctx, .. } | Self::Lost { ctx, .. } | Self::SendFailed { ctx, .. } => {
                ctx
            }
        }
    }

    /// The window the probe was sent in, which is the window its outcome counts in.
    pub fn window_start_ms(&self) -> u64 {
        match self {
            Self::Answered {
                window_start_ms, ..
            }
            | Self::Lost {
                window_start_ms, ..
            }
            | Self::SendFailed {
                window_start_ms, ..
            } => *window_start_ms,
        }
    }
}

/// Why a probe could not be registered; the caller counts it and does not send.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Error)]
pub enum PendingError {
    #[error("pending probe table is full ({capacity} probes in flight)")]
    Full { capacity: usize },
    #[error("probe sequence number {seq} is already in flight")]
    DuplicateSeq { seq: u64 },
}

impl PendingError {
    /// Bounded label for metrics.
    pub fn category(&self) -> &'static str {
        match self {
            Self::Full { .. } => "pending_full",
            Self::DuplicateSeq { .. } => "duplicate_seq",
        }
    }
}

/// Why an event matched no probe in flight. Not a fault of this host: late and
/// duplicated packets are normal on a network, they are only counted.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Error)]
pub enum Unmatched {
    /// No probe with this sequence number is in flight: it already completed or
    /// expired (a late ACK), or it was never sent by this prober.
    #[error("no probe with this sequence number is in flight")]
    UnknownSeq,
    /// The probe is in flight but already received this event.
    #[error("the probe in flight already received this event")]
    Duplicate,
}

impl Unmatched {
    /// Bounded label for metrics.
    pub fn category(self) -> &'static str {
        match self {
            Self::UnknownSeq => "unknown_seq",
            Self::Duplicate => "duplicate",
        }
    }
}

/// What an event handler returns: `Ok(Some(_))` when the event finished the
/// probe, `Ok(None)` when the probe still waits for more, `Err` when it matched
/// nothing in flight.
pub type EventResult<C> = Result<Option<Outcome<C>>, Unmatched>;

#[derive(Debug, Clone, Copy)]
struct Ack2 {
    t3_ns: u64,
    t4_ns: u64,
    responder_software_timed: bool,
}

#[derive(Debug)]
struct Entry<C> {
    ctx: C,
    flow: u16,
    window_start_ms: u64,
    t1_host_ns: u64,
    deadline_host_ns: u64,
    expect_kernel_tx: bool,
    sent_host_ns: Option<u64>,
    tx_kernel_ns: Option<u64>,
    t5: Option<Stamp>,
    ack2: Option<Ack2>,
    /// The deadline passed while the send had not returned: the probe ends
    /// as soon as it does.
    expired: bool,
}

impl<C> Entry<C> {
    fn acked(&self) -> bool {
        self.t5.is_some() && self.ack2.is_some()
    }

    fn complete(&self) -> bool {
        let sent = self.sent_host_ns.is_some();
        (self.expired && sent)
            || (self.acked() && sent && (self.tx_kernel_ns.is_some() || !self.expect_kernel_tx))
    }

    /// Answered when both ACKs are in (whatever else is missing), else lost.
    fn into_outcome(self) -> Outcome<C> {
        let Self {
            ctx,
            flow,
            window_start_ms,
            ..
        } = self;
        match (self.t5, self.ack2) {
            (Some(t5), Some(ack2)) => Outcome::Answered {
                ctx,
                flow,
                window_start_ms,
                times: ProbeTimes {
                    t1_host_ns: self.t1_host_ns,
                    // A missing send return leaves host T2 at 0: classify() calls that
                    // invalid unless the kernel stamps alone suffice.
                    t2: Stamp {
                        host_ns: self.sent_host_ns.unwrap_or(0),
                        kernel_ns: self.tx_kernel_ns,
                    },
                    t3_ns: ack2.t3_ns,
                    t4_ns: ack2.t4_ns,
                    responder_software_timed: ack2.responder_software_timed,
                    t5,
                    // T6 is when the prober host handled ACK1, not ACK2's
                    // arrival: that would charge the responder's wait for
                    // ACK1's TX stamp and ACK2's flight to the prober host.
                    t6_host_ns: t5.host_ns,
                },
            },
            _ => Outcome::Lost {
                ctx,
                flow,
                window_start_ms,
            },
        }
    }
}

/// Probes in flight for one prober, keyed by sequence number.
///
/// `C` is the caller's context (which path and flow the probe measures), handed
/// back in the probe's [`Outcome`].
#[derive(Debug)]
pub struct PendingTable<C> {
    entries: SeqMap<Entry<C>>,
    /// Min-heap of (deadline, seq). Completed probes leave their item behind
    /// (lazy deletion); an item counts only while its seq is in flight with the
    /// same deadline.
    deadlines: BinaryHeap<Reverse<(u64, u64)>>,
    capacity: usize,
}

impl<C> PendingTable<C> {
    /// A table holding at most `capacity` probes in flight.
    pub fn new(capacity: usize) -> Self {
        Self {
            entries: SeqMap::with_capacity_and_hasher(
                capacity.min(1 << 16),
                BuildHasherDefault::default(),
            ),
            deadlines: BinaryHeap::new(),
            capacity,
        }
    }

    /// Probes in flight.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Registers a probe about to be sent. `t1_host_ns` is T1; the probe expires
    /// at `deadline_host_ns` (host monotonic). `expect_kernel_tx` says the
    /// transport will deliver a kernel/NIC TX timestamp the probe should wait for.
    #[allow(clippy::too_many_arguments)]
    pub fn insert(
        &mut self,
        seq: u64,
        ctx: C,
        flow: u16,
        window_start_ms: u64,
        t1_host_ns: u64,
        deadline_host_ns: u64,
        expect_kernel_tx: bool,
    ) -> Result<(), PendingError> {
        if self.entries.contains_key(&seq) {
            return Err(PendingError::DuplicateSeq { seq });
        }
        if self.entries.len() >= self.capacity {
            return Err(PendingError::Full {
                capacity: self.capacity,
            });
        }
        self.entries.insert(
            seq,
            Entry {
                ctx,
                flow,
                window_start_ms,
                t1_host_ns,
                deadline_host_ns,
                expect_kernel_tx,
                sent_host_ns: None,
                tx_kernel_ns: None,
                t5: None,
                ack2: None,
                expired: false,
            },
        );
        self.deadlines.push(Reverse((deadline_host_ns, seq)));
        self.compact_deadlines_if_stale();
        Ok(())
    }

    /// The caller's context of a probe in flight.
    pub fn context(&self, seq: u64) -> Option<&C> {
        self.entries.get(&seq).map(|e| &e.ctx)
    }

    /// `send()` returned for `seq` at host time `host_ns` (the host part of T2).
    pub fn on_sent(&mut self, seq: u64, host_ns: u64) -> EventResult<C> {
        self.update(seq, |e| set_once(&mut e.sent_host_ns, host_ns))
    }

    /// The transport delivered the kernel/NIC TX timestamp of `seq` (kernel part of T2).
    pub fn on_tx_timestamp(&mut self, seq: u64, kernel_ns: u64) -> EventResult<C> {
        self.update(seq, |e| set_once(&mut e.tx_kernel_ns, kernel_ns))
    }

    /// ACK1 of `seq` arrived; `t5` is its receive stamp.
    pub fn on_ack1(&mut self, seq: u64, t5: Stamp) -> EventResult<C> {
        self.update(seq, |e| set_once(&mut e.t5, t5))
    }

    /// ACK2 of `seq` arrived, carrying the responder's T3 and T4. Its arrival
    /// time plays no part: T6 is taken from ACK1's handling (see [`ProbeTimes`]).
    pub fn on_ack2(
        &mut self,
        seq: u64,
        t3_ns: u64,
        t4_ns: u64,
        responder_software_timed: bool,
    ) -> EventResult<C> {
        let ack2 = Ack2 {
            t3_ns,
            t4_ns,
            responder_software_timed,
        };
        self.update(seq, |e| set_once(&mut e.ack2, ack2))
    }

    /// The transport refused to send `seq`: the probe ends as [`Outcome::SendFailed`].
    pub fn on_send_failed(&mut self, seq: u64) -> EventResult<C> {
        let entry = self.entries.remove(&seq).ok_or(Unmatched::UnknownSeq)?;
        let Entry {
            ctx,
            flow,
            window_start_ms,
            ..
        } = entry;
        Ok(Some(Outcome::SendFailed {
            ctx,
            flow,
            window_start_ms,
        }))
    }

    /// Ends every probe whose deadline is at or before `now_host_ns`, in deadline
    /// order, except those whose send has not returned: they end when it
    /// returns or fails. Costs O(log n) per expired probe or stale heap item,
    /// never a scan.
    pub fn expire(&mut self, now_host_ns: u64) -> Vec<Outcome<C>> {
        let mut out = Vec::new();
        while let Some(&Reverse((deadline, seq))) = self.deadlines.peek() {
            if deadline > now_host_ns {
                break;
            }
            self.deadlines.pop();
            // A stale item: the probe completed, or the seq was reused with another deadline.
            let live = self
                .entries
                .get(&seq)
                .is_some_and(|e| e.deadline_host_ns == deadline);
            if !live {
                continue;
            }
            if let Some(entry) = self.entries.get_mut(&seq)
                && entry.sent_host_ns.is_none()
            {
                entry.expired = true;
            } else if let Some(entry) = self.entries.remove(&seq) {
                out.push(entry.into_outcome());
            }
        }
        out
    }

    fn update(
        &mut self,
        seq: u64,
        apply: impl FnOnce(&mut Entry<C>) -> Result<(), Unmatched>,
    ) -> EventResult<C> {
        let entry = self.entries.get_mut(&seq).ok_or(Unmatched::UnknownSeq)?;
        apply(entry)?;
        if !entry.complete() {
            return Ok(None);
        }
        Ok(self.entries.remove(&seq).map(Entry::into_outcome))
    }

    /// Bounds the heap when probes complete long before their deadlines and
    /// `expire` has not yet popped their items.
    fn compact_deadlines_if_stale(&mut self) {
        if self.deadlines.len() > 2 * self.entries.len() + HEAP_SLACK {
            self.deadlines = self
                .entries
                .iter()
                .map(|(&seq, e)| Reverse((e.deadline_host_ns, seq)))
                .collect();
        }
    }
}

/// Keeps the first value of an event: a duplicated packet must not move a timestamp.
fn set_once<T>(slot: &mut Option<T>, value: T) -> Result<(), Unmatched> {
    if slot.is_some() {
        return Err(Unmatched::Duplicate);
    }
    *slot = Some(value);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const TIMEOUT: u64 = 1_000_000;

    fn table_with_probe(seq: u64, expect_kernel_tx: bool) -> PendingTable<&'static str> {
        let mut t = PendingTable::new(16);
        t.insert(
            seq,
            "path-a",
            3,
            10_000,
            100,
            100 + TIMEOUT,
            expect_kernel_tx,
        )
        .unwrap();
        t
    }

    fn ack2(t: &mut PendingTable<&'static str>, seq: u64) -> EventResult<&'static str> {
        t.on_ack2(seq, 9_000, 9_300, false)
    }

    fn answered_times(o: Option<Outcome<&'static str>>) -> ProbeTimes {
        match o {
            Some(Outcome::Answered { times, .. }) => times,
            other => panic!("expected an answered probe, got {other:?}"),
        }
    }

    #[test]
    fn an_ack_that_arrives_before_send_returns_is_matched() {
        let mut t = table_with_probe(1, false);
        assert_eq!(t.on_ack1(1, Stamp::host(4_000)), Ok(None));
        assert_eq!(ack2(&mut t, 1), Ok(None));
        let times = answered_times(t.on_sent(1, 200).unwrap());
        assert_eq!(times.t1_host_ns, 100);
        assert_eq!(times.t2, Stamp::host(200));
        assert_eq!(times.t5, Stamp::host(4_000));
        assert_eq!(
            (times.t3_ns, times.t4_ns, times.t6_host_ns),
            (9_000, 9_300, 4_000),
            "T6 is ACK1's host handling time"
        );
        assert!(t.is_empty());
    }

    #[test]
    fn ack2_before_ack1_completes_on_ack1() {
        let mut t = table_with_probe(1, false);
        t.on_sent(1, 200).unwrap();
        assert_eq!(ack2(&mut t, 1), Ok(None));
        let times = answered_times(
            t.on_ack1(
                1,
                Stamp {
                    host_ns: 4_000,
                    kernel_ns: Some(77),
                },
            )
            .unwrap(),
        );
        assert_eq!(times.t5.kernel_ns, Some(77));
    }

    #[test]
    fn a_probe_expecting_a_tx_timestamp_waits_for_it_after_both_acks() {
        let mut t = table_with_probe(1, true);
        t.on_sent(1, 200).unwrap();
        assert_eq!(t.on_ack1(1, Stamp::host(4_000)), Ok(None));
        assert_eq!(ack2(&mut t, 1), Ok(None));
        assert_eq!(t.len(), 1);
        let times = answered_times(t.on_tx_timestamp(1, 55_555).unwrap());
        assert_eq!(
            times.t2,
            Stamp {
                host_ns: 200,
                kernel_ns: Some(55_555)
            }
        );
    }

    #[test]
    fn a_tx_timestamp_before_send_returns_is_kept() {
        let mut t = table_with_probe(1, true);
        assert_eq!(t.on_tx_timestamp(1, 55_555), Ok(None));
        t.on_ack1(1, Stamp::host(4_000)).unwrap();
        ack2(&mut t, 1).unwrap();
        let times = answered_times(t.on_sent(1, 200).unwrap());
        assert_eq!(
            times.t2,
            Stamp {
                host_ns: 200,
                kernel_ns: Some(55_555)
            }
        );
    }

    #[test]
    fn a_missing_tx_timestamp_completes_with_host_t2_at_the_deadline() {
        let mut t = table_with_probe(1, true);
        t.on_sent(1, 200).unwrap();
        t.on_ack1(1, Stamp::host(4_000)).unwrap();
        ack2(&mut t, 1).unwrap();
        assert!(t.expire(100 + TIMEOUT - 1).is_empty());
        let out = t.expire(100 + TIMEOUT);
        assert_eq!(out.len(), 1);
        let times = answered_times(out.into_iter().next());
        assert_eq!(times.t2, Stamp::host(200));
        assert!(t.is_empty());
    }

    #[test]
    fn a_timed_out_probe_is_lost_in_the_window_it_was_sent_in() {
        let mut t = table_with_probe(1, false);
        t.on_sent(1, 200).unwrap();
        t.on_ack1(1, Stamp::host(4_000)).unwrap(); // ACK2 never comes
        let out = t.expire(u64::MAX);
        assert_eq!(
            out,
            vec![Outcome::Lost {
                ctx: "path-a",
                flow: 3,
                window_start_ms: 10_000
            }]
        );
        assert_eq!(out[0].window_start_ms(), 10_000);
    }

    #[test]
    fn a_probe_whose_send_returns_after_its_deadline_is_lost_only_once_sent() {
        let mut t = table_with_probe(1, false);
        // The deadline passes while send() is still running: nothing ends yet,
        // or a loss would be booked for a probe not (yet) counted as sent.
        assert!(t.expire(u64::MAX).is_empty());
        assert_eq!(t.len(), 1);
        assert_eq!(
            t.on_sent(1, 200),
            Ok(Some(Outcome::Lost {
                ctx: "path-a",
                flow: 3,
                window_start_ms: 10_000
            }))
        );
        assert!(t.is_empty());
    }

    #[test]
    fn a_send_that_fails_after_its_deadline_ends_as_send_failed_not_lost() {
        let mut t = table_with_probe(1, true);
        assert!(t.expire(u64::MAX).is_empty());
        assert_eq!(
            t.on_send_failed(1),
            Ok(Some(Outcome::SendFailed {
                ctx: "path-a",
                flow: 3,
                window_start_ms: 10_000
            }))
        );
        assert!(t.is_empty());
    }

    #[test]
    fn acks_before_a_late_send_return_still_answer_the_probe() {
        let mut t = table_with_probe(1, true);
        t.on_ack1(1, Stamp::host(4_000)).unwrap();
        assert!(t.expire(u64::MAX).is_empty());
        assert_eq!(ack2(&mut t, 1), Ok(None));
        // Past the deadline the kernel TX stamp is not waited for any more.
        let times = answered_times(t.on_sent(1, 200).unwrap());
        assert_eq!(times.t2, Stamp::host(200));
    }

    #[test]
    fn an_ack_after_expiry_is_unmatched() {
        let mut t = table_with_probe(1, false);
        t.on_sent(1, 200).unwrap();
        assert_eq!(t.expire(u64::MAX).len(), 1);
        assert_eq!(t.on_ack1(1, Stamp::host(4_000)), Err(Unmatched::UnknownSeq));
        assert_eq!(ack2(&mut t, 1), Err(Unmatched::UnknownSeq));
        assert_eq!(t.on_tx_timestamp(1, 5), Err(Unmatched::UnknownSeq));
    }

    #[test]
    fn duplicate_acks_are_unmatched_and_keep_the_first_timestamp() {
        let mut t = table_with_probe(1, false);
        t.on_sent(1, 200).unwrap();
        t.on_ack1(1, Stamp::host(4_000)).unwrap();
        assert_eq!(t.on_ack1(1, Stamp::host(4_500)), Err(Unmatched::Duplicate));
        assert_eq!(t.on_sent(1, 300), Err(Unmatched::Duplicate));
        let times = answered_times(ack2(&mut t, 1).unwrap());
        assert_eq!(times.t5, Stamp::host(4_000));
        assert_eq!(times.t2, Stamp::host(200));
        // After completion the same ACKs match nothing.
        assert_eq!(ack2(&mut t, 1), Err(Unmatched::UnknownSeq));
        assert_eq!(t.on_ack1(1, Stamp::host(4_000)), Err(Unmatched::UnknownSeq));
    }

    #[test]
    fn a_full_table_refuses_new_probes_and_duplicate_seqs_are_refused() {
        let mut t = PendingTable::new(2);
        t.insert(1, (), 0, 0, 1, 10, false).unwrap();
        assert_eq!(
            t.insert(1, (), 0, 0, 1, 10, false),
            Err(PendingError::DuplicateSeq { seq: 1 })
        );
        t.insert(2, (), 0, 0, 1, 10, false).unwrap();
        let full = t.insert(3, (), 0, 0, 1, 10, false);
        assert_eq!(full, Err(PendingError::Full { capacity: 2 }));
        assert_eq!(full.unwrap_err().category(), "pending_full");
        assert_eq!(t.len(), 2);
        // Room again once a probe ends.
        t.on_send_failed(1).unwrap();
        t.insert(3, (), 0, 0, 1, 10, false).unwrap();
    }

    #[test]
    fn a_failed_send_ends_the_probe_at_once() {
        let mut t = table_with_probe(7, true);
        assert_eq!(
            t.on_send_failed(7),
            Ok(Some(Outcome::SendFailed {
                ctx: "path-a",
                flow: 3,
                window_start_ms: 10_000
            }))
        );
        assert!(t.is_empty());
        assert!(t.expire(u64::MAX).is_empty());
        assert_eq!(t.on_send_failed(7), Err(Unmatched::UnknownSeq));
    }

    #[test]
    fn expiry_follows_deadlines_even_when_they_are_not_in_insertion_order() {
        let mut t = PendingTable::new(8);
        for (seq, deadline) in [(1, 300), (2, 100), (3, 200), (4, 100)] {
            t.insert(seq, seq, 0, 0, 1, deadline, false).unwrap();
            t.on_sent(seq, 2).unwrap();
        }
        let seqs = |v: Vec<Outcome<u64>>| v.iter().map(|o| *o.ctx()).collect::<Vec<_>>();
        assert_eq!(seqs(t.expire(99)), Vec::<u64>::new());
        let mut first = seqs(t.expire(150));
        first.sort_unstable();
        assert_eq!(first, vec![2, 4]);
        assert_eq!(seqs(t.expire(250)), vec![3]);
        assert_eq!(seqs(t.expire(1_000)), vec![1]);
        assert!(t.is_empty());
    }

    #[test]
    fn a_reused_seq_is_not_expired_by_its_predecessors_deadline() {
        let mut t = PendingTable::new(8);
        t.insert(1, "old", 0, 0, 1, 100, false).unwrap();
        t.on_send_failed(1).unwrap();
        t.insert(1, "new", 0, 0, 1, 500, false).unwrap();
        t.on_sent(1, 2).unwrap();
        assert!(t.expire(200).is_empty());
        assert_eq!(t.len(), 1);
        assert_eq!(t.expire(500).len(), 1);
    }

    #[test]
    fn completed_probes_do_not_grow_the_deadline_heap_without_bound() {
        let mut t = PendingTable::new(4);
        for seq in 0..10_000 {
            t.insert(seq, (), 0, 0, 1, u64::MAX, false).unwrap();
            t.on_send_failed(seq).unwrap();
        }
        assert!(t.deadlines.len() <= HEAP_SLACK + 1);
    }

    /// One event of the interleaving proptest.
    #[derive(Debug, Clone)]
    enum Event {
        Sent(usize),
        Tx(usize),
        Ack1(usize),
        Ack2(usize),
        SendFailed(usize),
        Expire(u64),
    }

    fn event(n: usize) -> impl Strategy<Value = Event> {
        prop_oneof![
            (0..n).prop_map(Event::Sent),
            (0..n).prop_map(Event::Tx),
            (0..n).prop_map(Event::Ack1),
            (0..n).prop_map(Event::Ack2),
            (0..n).prop_map(Event::SendFailed),
            (0u64..1_000).prop_map(Event::Expire),
        ]
    }

    proptest! {
        #[test]
        fn any_interleaving_of_events_ends_every_probe_exactly_once(
            probes in prop::collection::vec((0u64..1_000, any::<bool>()), 1..16),
            events in prop::collection::vec(event(16), 0..120),
        ) {
            let mut t: PendingTable<u64> = PendingTable::new(64);
            for (seq, &(deadline, expect_tx)) in (0u64..).zip(&probes) {
                t.insert(seq, seq, 0, 0, 1, deadline, expect_tx).unwrap();
            }
            let n = probes.len();
            let mut ended = vec![0u32; n];
            let mut acks = vec![(false, false); n];
            // Whether the probe's send returned: only then may it be answered or lost.
            let mut sent = vec![false; n];
            let mut record = |o: Outcome<u64>, acks: &[(bool, bool)], sent: &[bool]| {
                let i = usize::try_from(*o.ctx()).unwrap();
                ended[i] += 1;
                if let Outcome::Answered { .. } = o {
                    assert_eq!(acks[i], (true, true), "probe {i} answered without both ACKs");
                    assert!(sent[i], "probe {i} answered before its send returned");
                }
                if let Outcome::Lost { .. } = o {
                    assert_ne!(acks[i], (true, true), "probe {i} lost despite both ACKs");
                    assert!(sent[i], "probe {i} lost before its send returned");
                }
            };
            for e in events {
                let result = match e {
                    Event::Expire(now) => {
                        for o in t.expire(now) {
                            record(o, &acks, &sent);
                        }
                        continue;
                    }
                    Event::Sent(i) if i < n => {
                        let r = t.on_sent(i as u64, 10);
                        if r.is_ok() { sent[i] = true; }
                        r
                    }
                    Event::Tx(i) if i < n => t.on_tx_timestamp(i as u64, 20),
                    Event::Ack1(i) if i < n => {
                        let r = t.on_ack1(i as u64, Stamp::host(30));
                        if r.is_ok() { acks[i].0 = true; }
                        r
                    }
                    Event::Ack2(i) if i < n => {
                        let r = t.on_ack2(i as u64, 40, 50, false);
                        if r.is_ok() { acks[i].1 = true; }
                        r
                    }
                    Event::SendFailed(i) if i < n => t.on_send_failed(i as u64),
                    _ => continue,
                };
                if let Ok(Some(o)) = result {
                    record(o, &acks, &sent);
                }
            }
            // Every send returns in the end; then every deadline passes.
            for i in 0..n {
                if let Ok(r) = t.on_sent(i as u64, 10) {
                    sent[i] = true;
                    if let Some(o) = r {
                        record(o, &acks, &sent);
                    }
                }
            }
            for o in t.expire(u64::MAX) {
                record(o, &acks, &sent);
            }
            prop_assert!(t.is_empty());
            prop_assert!(ended.iter().all(|&c| c == 1), "outcomes per probe: {:?}", ended);
        }
    }
}
