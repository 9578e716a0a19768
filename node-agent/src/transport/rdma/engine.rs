//! The transport's logic, written against the [`Verbs`] seam: send slots and
//! keys, address-handle lookup, completion matching, GRH parsing, timestamp
//! conversion and teardown order. The real endpoint wraps one of these around
//! libibverbs; tests and benches wrap one around [`super::verbs::RecordingVerbs`].

use std::collections::VecDeque;
use std::io;

use super::ah_cache::{AhCache, AhKey};
use super::clock::NicClock;
use super::flow_label::ack_flow_label;
use super::gid::Gid;
use super::grh::parse_grh;
use super::verbs::{Completion, CompletionKind, Resource, STATUS_SUCCESS, SendRequest, Verbs};
use super::{
    GRH_LEN, MAX_PAYLOAD, MESH_QKEY, QUEUE_DEPTH, QpRole, RdmaDest, RdmaError, RdmaEvent,
    SendReceipt,
};
use crate::probe::clock::host_now_ns;

/// Settings the engine needs besides the device.
#[derive(Debug, Clone)]
pub struct EngineConfig {
    pub local_gid: Gid,
    pub traffic_class: u8,
    pub service_level: u8,
    pub ah_cache_capacity: usize,
}

/// Send slots and keys of one queue pair, and completions polled but not yet handed out.
#[derive(Debug)]
struct QueueState {
    free_slots: Vec<u16>,
    /// The key of the send occupying each slot.
    key_of_slot: Vec<Option<u32>>,
    next_key: u32,
    backlog: VecDeque<(Completion, u64)>,
}

impl QueueState {
    fn new() -> Self {
        Self {
            free_slots: (0..QUEUE_DEPTH).rev().collect(),
            key_of_slot: vec![None; usize::from(QUEUE_DEPTH)],
            next_key: 0,
            backlog: VecDeque::new(),
        }
    }

    fn outstanding(&self) -> usize {
        usize::from(QUEUE_DEPTH) - self.free_slots.len()
    }
}

/// One RNIC's two queue pairs, driven through `V`.
#[derive(Debug)]
pub struct Engine<V: Verbs> {
    verbs: V,
    config: EngineConfig,
    ahs: AhCache<V::Ah>,
    /// Evicted handles waiting until no send that may use them is outstanding.
    retired: Vec<V::Ah>,
    clock: Option<NicClock>,
    queues: [QueueState; 2],
    scratch: Vec<Completion>,
    torn_down: bool,
}

/// Set in the work request id of every send and of no receive (a receive's id
/// is its slot). An error completion's opcode is undefined, so this bit is how
/// the device layer tells sends from receives.
pub const SEND_WR_FLAG: u64 = 1 << 63;

/// The work request id of a send: the flag, its key, its slot.
fn send_wr_id(key: u32, slot: u16) -> u64 {
    SEND_WR_FLAG | (u64::from(key) << 16) | u64::from(slot)
}

fn split_send_wr_id(wr_id: u64) -> (u32, u16) {
    let wr_id = wr_id & !SEND_WR_FLAG;
    let slot = u16::try_from(wr_id & 0xFFFF).unwrap_or(u16::MAX);
    let key = u32::try_from(wr_id >> 16).unwrap_or(u32::MAX);
    (key, slot)
}

impl<V: Verbs> Engine<V> {
    /// Takes over `verbs` and posts every receive slot of both queue pairs.
    /// `clock` converts NIC stamps; `None` means completions are host-timed.
    pub fn new(verbs: V, config: EngineConfig, clock: Option<NicClock>) -> Result<Self, RdmaError> {
        let mut engine = Self {
            ahs: AhCache::new(config.ah_cache_capacity),
            verbs,
            config,
            retired: Vec::new(),
            clock,
            queues: [QueueState::new(), QueueState::new()],
            scratch: Vec::with_capacity(usize::from(QUEUE_DEPTH) * 2),
            torn_down: false,
        };
        for role in QpRole::ALL {
            for slot in 0..QUEUE_DEPTH {
                engine
                    .verbs
                    .post_recv(role, slot)
                    .map_err(|e| engine.verbs_error("ibv_post_recv", e))?;
            }
        }
        Ok(engine)
    }

    /// The device layer (for its file descriptors).
    pub fn verbs(&self) -> &V {
        &self.verbs
    }

    pub fn verbs_mut(&mut self) -> &mut V {
        &mut self.verbs
    }

    /// Completions carry NIC timestamps.
    pub fn nic_timed(&self) -> bool {
        self.clock.is_some()
    }

    /// Address handles cached.
    pub fn cached_address_handles(&self) -> usize {
        self.ahs.len()
    }

    /// Sends outstanding on `role` (posted, completion not yet handed out).
    pub fn outstanding_sends(&self, role: QpRole) -> usize {
        self.queues[role.index()].outstanding()
    }

    /// Posts `payload` to `dest` from `role`'s queue pair. The key in the
    /// receipt comes back in the send's completion event; a failed post uses
    /// up no key.
    pub fn send(
        &mut self,
        role: QpRole,
        payload: &[u8],
        dest: &RdmaDest,
    ) -> Result<SendReceipt, RdmaError> {
        if payload.len() > MAX_PAYLOAD {
            return Err(RdmaError::PayloadTooLarge {
                len: payload.len(),
                max: MAX_PAYLOAD,
            });
        }
        let queue = &mut self.queues[role.index()];
        let Some(slot) = queue.free_slots.pop() else {
            return Err(RdmaError::SendQueueFull {
                device: self.verbs.device().to_owned(),
                role,
                depth: QUEUE_DEPTH,
            });
        };
        let key = queue.next_key;
        let ah_key = AhKey {
            gid: dest.gid,
            flow_label: dest.flow_label,
            traffic_class: self.config.traffic_class,
            service_level: self.config.service_level,
        };
        let verbs = &mut self.verbs;
        let posted = match self.ahs.get_or_create(&ah_key, |k| verbs.create_ah(k)) {
            Ok(lookup) => {
                if let Some(evicted) = lookup.evicted {
                    self.retired.push(evicted);
                }
                let request = SendRequest {
                    wr_id: send_wr_id(key, slot),
                    slot,
                    ah: lookup.handle,
                    remote_qpn: dest.qpn,
                    remote_qkey: MESH_QKEY,
                    payload,
                };
                verbs
                    .post_send(role, &request)
                    .map_err(|e| ("ibv_post_send", e))
            }
            Err(e) => Err(("ibv_create_ah", e)),
        };
        let queue = &mut self.queues[role.index()];
        if let Err((op, e)) = posted {
            queue.free_slots.push(slot);
            return Err(self.verbs_error(op, e));
        }
        queue.key_of_slot[usize::from(slot)] = Some(key);
        queue.next_key = key.wrapping_add(1);
        Ok(SendReceipt {
            host_ns: host_now_ns(),
            tx_key: key,
        })
    }

    /// The next event of `role`'s queue pair, or `None` when there is none and
    /// the completion queue has been armed: the caller then waits for the
    /// completion channel and calls again.
    pub fn next_ready(
        &mut self,
        role: QpRole,
        buf: &mut [u8],
    ) -> Result<Option<RdmaEvent>, RdmaError> {
        let mut armed = false;
        loop {
            if let Some((completion, host_ns)) = self.queues[role.index()].backlog.pop_front() {
                return self.event_of(role, completion, host_ns, buf).map(Some);
            }
            self.poll_into_backlog(role)?;
            if !self.queues[role.index()].backlog.is_empty() {
                continue;
            }
            if armed {
                return Ok(None);
            }
            // Arm, then poll once more: a completion that landed between the
            // empty poll and the arm would otherwise wait for the next one.
            self.verbs
                .arm(role)
                .map_err(|e| self.verbs_error("ibv_req_notify_cq", e))?;
            armed = true;
        }
    }

    fn poll_into_backlog(&mut self, role: QpRole) -> Result<(), RdmaError> {
        self.scratch.clear();
        if let Err(e) = self.verbs.poll(role, &mut self.scratch) {
            return Err(self.verbs_error("poll_cq", e));
        }
        if self.scratch.is_empty() {
            return Ok(());
        }
        let host_ns = host_now_ns();
        let backlog = &mut self.queues[role.index()].backlog;
        backlog.extend(self.scratch.drain(..).map(|c| (c, host_ns)));
        Ok(())
    }

    fn event_of(
        &mut self,
        role: QpRole,
        c: Completion,
        host_ns: u64,
        buf: &mut [u8],
    ) -> Result<RdmaEvent, RdmaError> {
        let nic_ns = match (c.raw_timestamp, self.clock.as_mut()) {
            (Some(raw), Some(clock)) => Some(clock.to_ns(raw)),
            _ => None,
        };
        match c.kind {
            CompletionKind::Send => Ok(self.send_completed(role, c, host_ns, nic_ns)),
            CompletionKind::Recv => self.received(role, c, host_ns, nic_ns, buf),
        }
    }

    fn send_completed(
        &mut self,
        role: QpRole,
        c: Completion,
        host_ns: u64,
        nic_ns: Option<u64>,
    ) -> RdmaEvent {
        let (key, slot) = split_send_wr_id(c.wr_id);
        let queue = &mut self.queues[role.index()];
        let Some(occupant) = queue.key_of_slot.get_mut(usize::from(slot)) else {
            return RdmaEvent::Skipped {
                reason: "unknown_send_completion",
            };
        };
        if *occupant != Some(key) {
            return RdmaEvent::Skipped {
                reason: "unknown_send_completion",
            };
        }
        *occupant = None;
        queue.free_slots.push(slot);
        if !self.retired.is_empty()
            && QpRole::ALL
                .iter()
                .all(|r| self.queues[r.index()].outstanding() == 0)
        {
            for ah in self.retired.drain(..) {
                self.verbs.destroy_ah(ah);
            }
        }
        if c.status == STATUS_SUCCESS {
            RdmaEvent::TxTimestamp {
                key,
                host_ns,
                nic_ns,
            }
        } else {
            RdmaEvent::SendFailed {
                key,
                status: c.status,
            }
        }
    }

    fn received(
        &mut self,
        role: QpRole,
        c: Completion,
        host_ns: u64,
        nic_ns: Option<u64>,
        buf: &mut [u8],
    ) -> Result<RdmaEvent, RdmaError> {
        let Ok(slot) = u16::try_from(c.wr_id) else {
            return Ok(RdmaEvent::Skipped {
                reason: "unknown_receive_completion",
            });
        };
        if slot >= QUEUE_DEPTH {
            return Ok(RdmaEvent::Skipped {
                reason: "unknown_receive_completion",
            });
        }
        let event = self.read_datagram(role, slot, &c, host_ns, nic_ns, buf);
        // The slot goes back to the NIC whatever it held; a flushed receive
        // (QP in error) fails to repost, which is the caller's signal to re-open.
        self.verbs
            .post_recv(role, slot)
            .map_err(|e| self.verbs_error("ibv_post_recv", e))?;
        Ok(event)
    }

    fn read_datagram(
        &self,
        role: QpRole,
        slot: u16,
        c: &Completion,
        host_ns: u64,
        nic_ns: Option<u64>,
        buf: &mut [u8],
    ) -> RdmaEvent {
        if c.status != STATUS_SUCCESS {
            return RdmaEvent::Skipped {
                reason: "receive_error",
            };
        }
        let area = self.verbs.recv_area(role, slot);
        let received = usize::try_from(c.byte_len)
            .unwrap_or(usize::MAX)
            .min(area.len());
        if received < GRH_LEN {
            return RdmaEvent::Skipped {
                reason: "short_receive",
            };
        }
        let Some(grh) = parse_grh(&area[..GRH_LEN], self.config.local_gid.is_ipv4_mapped()) else {
            return RdmaEvent::Skipped {
                reason: "unreadable_grh",
            };
        };
        let payload = &area[GRH_LEN..received];
        let len = payload.len().min(buf.len());
        buf[..len].copy_from_slice(&payload[..len]);
        RdmaEvent::Datagram {
            len,
            from: RdmaDest {
                gid: grh.src_gid,
                qpn: c.src_qp,
                flow_label: ack_flow_label(grh.flow_label, &grh.src_gid, c.src_qp),
            },
            host_ns,
            nic_ns,
            truncated: len < payload.len(),
        }
    }

    /// Releases everything in dependency order: queue pairs, completion queues,
    /// address handles, memory regions, protection domain, completion
    /// channels, context. Runs once; `Drop` calls it too.
    pub fn teardown(&mut self) {
        if self.torn_down {
            return;
        }
        self.torn_down = true;
        self.verbs.release(Resource::QueuePairs);
        self.verbs.release(Resource::CompletionQueues);
        for ah in self.ahs.drain().into_iter().chain(self.retired.drain(..)) {
            self.verbs.destroy_ah(ah);
        }
        self.verbs.release(Resource::MemoryRegions);
        self.verbs.release(Resource::ProtectionDomain);
        self.verbs.release(Resource::CompletionChannels);
        self.verbs.release(Resource::Context);
    }

    fn verbs_error(&self, op: &'static str, source: io::Error) -> RdmaError {
        RdmaError::Verbs {
            op,
            device: self.verbs.device().to_owned(),
            source,
        }
    }
}

impl<V: Verbs> Drop for Engine<V> {
    fn drop(&mut self) {
        self.teardown();
    }
}

#[cfg(test)]
mod tests;
