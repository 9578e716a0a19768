//! The seam between the transport's logic and libibverbs.
//!
//! [`Verbs`] is what the [`super::engine::Engine`] needs from a device: address
//! handles, posting sends and receives into registered buffers, polling and
//! arming completion queues, and releasing resources. The real implementation
//! wraps `rdma-sys` (Linux with the `rdma` feature); [`RecordingVerbs`] is a
//! fake that records every call and loops datagrams back between the two queue
//! pairs, so the engine is tested and benchmarked without an RDMA device.

use std::collections::VecDeque;
use std::io;

use super::ah_cache::AhKey;
use super::gid::Gid;
use super::grh::encode_grh;
use super::{GRH_LEN, MAX_PAYLOAD, QUEUE_DEPTH, QpRole};

/// Completion status of success (`IBV_WC_SUCCESS`).
pub const STATUS_SUCCESS: u32 = 0;

/// One UD send to post.
#[derive(Debug)]
pub struct SendRequest<'a, A> {
    /// Comes back in the send's [`Completion`].
    pub wr_id: u64,
    /// The registered send slot the payload is copied into.
    pub slot: u16,
    pub ah: &'a A,
    pub remote_qpn: u32,
    pub remote_qkey: u32,
    pub payload: &'a [u8],
}

/// Whether a completion is of a send or a receive.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CompletionKind {
    Send,
    Recv,
}

/// One work completion, reduced to what the engine reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Completion {
    pub wr_id: u64,
    pub kind: CompletionKind,
    /// `ibv_wc_status`; [`STATUS_SUCCESS`] or an error.
    pub status: u32,
    /// Bytes received, GRH area included.
    pub byte_len: u32,
    /// The sender's QPN (receives only).
    pub src_qp: u32,
    /// Raw NIC clock cycles, when the CQ has completion timestamps.
    pub raw_timestamp: Option<u64>,
}

/// Resources released at teardown, in the order the engine releases them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Resource {
    QueuePairs,
    CompletionQueues,
    MemoryRegions,
    ProtectionDomain,
    CompletionChannels,
    Context,
}

/// What the transport needs from an RDMA device with two UD queue pairs
/// (one per [`QpRole`]), each with [`QUEUE_DEPTH`] send and receive slots in
/// registered memory.
pub trait Verbs {
    /// An address handle.
    type Ah;

    /// The device name, for errors.
    fn device(&self) -> &str;
    fn create_ah(&mut self, key: &AhKey) -> io::Result<Self::Ah>;
    fn destroy_ah(&mut self, ah: Self::Ah);
    /// Copies the payload into the send slot and posts a signaled UD send.
    fn post_send(&mut self, role: QpRole, request: &SendRequest<'_, Self::Ah>) -> io::Result<()>;
    /// Posts receive slot `slot` (its `wr_id` is the slot number).
    fn post_recv(&mut self, role: QpRole, slot: u16) -> io::Result<()>;
    /// The bytes of receive slot `slot`: GRH area, then payload.
    fn recv_area(&self, role: QpRole, slot: u16) -> &[u8];
    /// Appends every completion ready on `role`'s completion queue.
    fn poll(&mut self, role: QpRole, out: &mut Vec<Completion>) -> io::Result<()>;
    /// Asks for a channel notification at the next completion on `role`'s queue.
    fn arm(&mut self, role: QpRole) -> io::Result<()>;
    /// Releases one kind of resource; called once per kind, in teardown order.
    fn release(&mut self, resource: Resource);
}

/// A call the fake saw.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Call {
    CreateAh {
        id: u32,
        key: AhKey,
    },
    DestroyAh {
        id: u32,
    },
    PostSend {
        role: QpRole,
        wr_id: u64,
        ah: u32,
        remote_qpn: u32,
    },
    PostRecv {
        role: QpRole,
        slot: u16,
    },
    Arm {
        role: QpRole,
    },
    Release(Resource),
}

/// A fake address handle: an id and the key it was made for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FakeAh {
    pub id: u32,
    pub key: AhKey,
}

/// A fake device whose two queue pairs are wired to each other: a send to the
/// other role's QPN lands in that role's next posted receive slot with a GRH
/// built from the address handle, and both completions carry stamps of a fake
/// NIC clock that advances `cycles_per_op` per completion.
#[derive(Debug)]
pub struct RecordingVerbs {
    pub calls: Vec<Call>,
    /// Record calls (benchmarks turn this off).
    pub recording: bool,
    pub local_gid: Gid,
    pub qpns: [u32; 2],
    /// `None`: completions carry no timestamps (a device without a clock).
    pub clock: Option<u64>,
    pub cycles_per_op: u64,
    /// Make the next `post_send` fail with this errno.
    pub fail_next_send: Option<i32>,
    /// Make the next `create_ah` fail with this errno.
    pub fail_next_ah: Option<i32>,
    /// Sends to an unknown QPN still complete, but nothing arrives.
    pub completions: [VecDeque<Completion>; 2],
    posted_recv: [VecDeque<u16>; 2],
    recv_slots: [Vec<[u8; GRH_LEN + MAX_PAYLOAD]>; 2],
    next_ah: u32,
    ipv4: bool,
}

impl RecordingVerbs {
    /// A fake device whose GID is `local_gid`, prober QPN 0x100 and responder QPN 0x200.
    pub fn new(local_gid: Gid) -> Self {
        let slots = vec![[0u8; GRH_LEN + MAX_PAYLOAD]; usize::from(QUEUE_DEPTH)];
        Self {
            calls: Vec::new(),
            recording: true,
            local_gid,
            qpns: [0x100, 0x200],
            clock: Some(1_000),
            cycles_per_op: 10,
            fail_next_send: None,
            fail_next_ah: None,
            completions: [VecDeque::new(), VecDeque::new()],
            posted_recv: [VecDeque::new(), VecDeque::new()],
            recv_slots: [slots.clone(), slots],
            next_ah: 1,
            ipv4: local_gid.is_ipv4_mapped(),
        }
    }

    /// Receive slots currently posted on `role`.
    pub fn posted_receives(&self, role: QpRole) -> usize {
        self.posted_recv[role.index()].len()
    }

    /// Delivers a datagram to `role` as if it came from `from` over the wire.
    /// Returns false when no receive was posted (the datagram is dropped, as a NIC would).
    pub fn deliver(
        &mut self,
        role: QpRole,
        from: &Gid,
        from_qpn: u32,
        flow_label: u32,
        payload: &[u8],
    ) -> bool {
        let Some(slot) = self.posted_recv[role.index()].pop_front() else {
            return false;
        };
        let area = &mut self.recv_slots[role.index()][usize::from(slot)];
        area[..GRH_LEN].copy_from_slice(&encode_grh(
            from,
            &self.local_gid,
            flow_label,
            0,
            self.ipv4,
        ));
        let len = payload.len().min(MAX_PAYLOAD);
        area[GRH_LEN..GRH_LEN + len].copy_from_slice(&payload[..len]);
        let raw_timestamp = self.tick();
        self.completions[role.index()].push_back(Completion {
            wr_id: u64::from(slot),
            kind: CompletionKind::Recv,
            status: STATUS_SUCCESS,
            byte_len: u32::try_from(GRH_LEN + len).unwrap_or(u32::MAX),
            src_qp: from_qpn,
            raw_timestamp,
        });
        true
    }

    fn tick(&mut self) -> Option<u64> {
        let now = self.clock?;
        self.clock = Some(now + self.cycles_per_op);
        Some(now)
    }

    fn record(&mut self, call: Call) {
        if self.recording {
            self.calls.push(call);
        }
    }
}

impl Verbs for RecordingVerbs {
    type Ah = FakeAh;

    fn device(&self) -> &'static str {
        "fake0"
    }

    fn create_ah(&mut self, key: &AhKey) -> io::Result<FakeAh> {
        if let Some(errno) = self.fail_next_ah.take() {
            return Err(io::Error::from_raw_os_error(errno));
        }
        let ah = FakeAh {
            id: self.next_ah,
            key: *key,
        };
        self.next_ah += 1;
        self.record(Call::CreateAh {
            id: ah.id,
            key: *key,
        });
        Ok(ah)
    }

    fn destroy_ah(&mut self, ah: FakeAh) {
        self.record(Call::DestroyAh { id: ah.id });
    }

    fn post_send(&mut self, role: QpRole, request: &SendRequest<'_, FakeAh>) -> io::Result<()> {
        if let Some(errno) = self.fail_next_send.take() {
            return Err(io::Error::from_raw_os_error(errno));
        }
        self.record(Call::PostSend {
            role,
            wr_id: request.wr_id,
            ah: request.ah.id,
            remote_qpn: request.remote_qpn,
        });
        let raw_timestamp = self.tick();
        self.completions[role.index()].push_back(Completion {
            wr_id: request.wr_id,
            kind: CompletionKind::Send,
            status: STATUS_SUCCESS,
            byte_len: 0,
            src_qp: 0,
            raw_timestamp,
        });
        if let Some(target) = QpRole::ALL
            .into_iter()
            .find(|r| self.qpns[r.index()] == request.remote_qpn)
        {
            let from = self.local_gid;
            let qpn = self.qpns[role.index()];
            self.deliver(
                target,
                &from,
                qpn,
                request.ah.key.flow_label,
                request.payload,
            );
        }
        Ok(())
    }

    fn post_recv(&mut self, role: QpRole, slot: u16) -> io::Result<()> {
        self.record(Call::PostRecv { role, slot });
        self.posted_recv[role.index()].push_back(slot);
        Ok(())
    }

    fn recv_area(&self, role: QpRole, slot: u16) -> &[u8] {
        self.recv_slots[role.index()]
            .get(usize::from(slot))
            .map_or(&[], |s| &s[..])
    }

    fn poll(&mut self, role: QpRole, out: &mut Vec<Completion>) -> io::Result<()> {
        out.extend(self.completions[role.index()].drain(..));
        Ok(())
    }

    fn arm(&mut self, role: QpRole) -> io::Result<()> {
        self.record(Call::Arm { role });
        Ok(())
    }

    fn release(&mut self, resource: Resource) {
        self.record(Call::Release(resource));
    }
}
