//! libibverbs through `rdma-sys`: the only unsafe code of the RDMA transport.
//!
//! [`RealVerbs`] owns one device context with a protection domain and, per
//! [`QpRole`], a completion channel, a completion queue (extended with
//! completion timestamps where the device has them), a registered buffer and
//! a UD queue pair in RTS. Every raw pointer it holds is either null or a live
//! object it created; [`RealVerbs::release`] destroys one kind and nulls it, so
//! teardown is idempotent and `Drop` cleans up after a half-finished open.

use std::ffi::CStr;
use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::ptr;

use rdma_sys::{
    ibv_access_flags, ibv_ack_async_event, ibv_ack_cq_events, ibv_ah, ibv_ah_attr, ibv_alloc_pd,
    ibv_async_event, ibv_close_device, ibv_comp_channel, ibv_context, ibv_cq, ibv_cq_ex,
    ibv_cq_ex_to_cq, ibv_cq_init_attr_ex, ibv_create_ah, ibv_create_comp_channel, ibv_create_cq,
    ibv_create_cq_ex, ibv_create_cq_wc_flags, ibv_create_qp, ibv_dealloc_pd, ibv_dereg_mr,
    ibv_destroy_ah, ibv_destroy_comp_channel, ibv_destroy_cq, ibv_destroy_qp, ibv_device_attr_ex,
    ibv_end_poll, ibv_free_device_list, ibv_get_async_event, ibv_get_cq_event, ibv_get_device_list,
    ibv_get_device_name, ibv_gid, ibv_global_route, ibv_modify_qp, ibv_mr, ibv_next_poll,
    ibv_open_device, ibv_pd, ibv_poll_cq, ibv_poll_cq_attr, ibv_post_recv, ibv_post_send, ibv_qp,
    ibv_qp_attr, ibv_qp_attr_mask, ibv_qp_cap, ibv_qp_init_attr, ibv_qp_state, ibv_qp_type,
    ibv_query_device_ex, ibv_recv_wr, ibv_reg_mr, ibv_req_notify_cq, ibv_send_flags, ibv_send_wr,
    ibv_sge, ibv_start_poll, ibv_wc, ibv_wc_read_byte_len, ibv_wc_read_completion_ts,
    ibv_wc_read_src_qp, ibv_wr_opcode, ud_t,
};

use tokio::io::Interest;
use tokio::io::unix::AsyncFd;

use super::super::ah_cache::AhKey;
use super::super::engine::SEND_WR_FLAG;
use super::super::verbs::{Completion, CompletionKind, Resource, SendRequest, Verbs};
use super::super::{
    DeviceListing, GRH_LEN, MAX_PAYLOAD, MESH_QKEY, QUEUE_DEPTH, QpRole, RdmaConfig, RdmaError,
};

/// Bytes per receive slot: GRH area and payload, rounded up to a cache line.
const RECV_STRIDE: usize = (GRH_LEN + MAX_PAYLOAD).next_multiple_of(64);
const SEND_STRIDE: usize = MAX_PAYLOAD;
const SLOTS: usize = QUEUE_DEPTH as usize;
/// Completions read per classic poll call.
const POLL_BATCH: usize = 16;
const POLL_BATCH_C: i32 = 16;

/// What the device said about itself at open.
#[derive(Debug, Clone, Copy)]
pub(crate) struct DeviceInfo {
    pub vendor_id: u32,
    pub hca_core_clock_khz: u64,
    pub completion_timestamp_mask: u64,
    /// The completion queues were created with completion timestamps.
    pub timestamps_on_cq: bool,
}

/// A completion queue, extended (timestamps, `ibv_start_poll`) or classic.
#[derive(Debug, Clone, Copy)]
enum Cq {
    None,
    Extended(*mut ibv_cq_ex),
    Classic(*mut ibv_cq),
}

impl Cq {
    fn as_cq(self) -> *mut ibv_cq {
        match self {
            Self::None => ptr::null_mut(),
            // SAFETY: the extended CQ is live; the conversion is pointer arithmetic.
            Self::Extended(cq) => unsafe { ibv_cq_ex_to_cq(cq) },
            Self::Classic(cq) => cq,
        }
    }
}

/// An address handle.
#[derive(Debug)]
pub(crate) struct AddressHandle(*mut ibv_ah);

// SAFETY: an address handle is a plain device object with no thread affinity;
// it is only used under the engine's lock.
unsafe impl Send for AddressHandle {}

/// One RNIC's verbs objects (see the module docs).
#[derive(Debug)]
pub(crate) struct RealVerbs {
    device: String,
    port: u8,
    sgid_index: u8,
    hop_limit: u8,
    ctx: *mut ibv_context,
    pd: *mut ibv_pd,
    channels: [*mut ibv_comp_channel; 2],
    cqs: [Cq; 2],
    qps: [*mut ibv_qp; 2],
    mrs: [*mut ibv_mr; 2],
    /// Per role: receive slots, then send slots. Boxed so the registered
    /// address never moves.
    buffers: [Box<[u8]>; 2],
}

// SAFETY: libibverbs objects may be used from any thread (the verbs API is
// thread-safe); this struct is only touched under the engine's mutex.
unsafe impl Send for RealVerbs {}

fn last_os_error() -> io::Error {
    io::Error::last_os_error()
}

/// What `ibv_get_device_list` answers, as plain data.
pub(crate) fn device_listing() -> DeviceListing {
    let mut count = 0;
    // SAFETY: `count` is a valid out pointer; the list is freed below.
    let list = unsafe { ibv_get_device_list(&raw mut count) };
    if list.is_null() {
        return DeviceListing::Null {
            errno: last_os_error().raw_os_error().unwrap_or(0),
        };
    }
    let names = (0..usize::try_from(count).unwrap_or(0))
        // SAFETY: the list holds `count` valid device pointers until freed.
        .map(|i| unsafe { device_name(*list.add(i)) })
        .collect();
    // SAFETY: `list` came from ibv_get_device_list and is freed once.
    unsafe { ibv_free_device_list(list) };
    DeviceListing::Devices(names)
}

/// # Safety
/// `device` must be a live entry of a device list.
unsafe fn device_name(device: *mut rdma_sys::ibv_device) -> String {
    // SAFETY: the caller guarantees `device`; the name is a NUL-terminated string it owns.
    let name = unsafe { ibv_get_device_name(device) };
    if name.is_null() {
        return String::new();
    }
    // SAFETY: non-null, NUL-terminated, alive while the list is.
    unsafe { CStr::from_ptr(name) }
        .to_string_lossy()
        .into_owned()
}

/// A descriptor owned by the device (a completion channel or the context's
/// async event fd), watched by tokio. The device closes it, not this type.
#[derive(Debug)]
pub(crate) struct DeviceFd(RawFd);

impl AsRawFd for DeviceFd {
    fn as_raw_fd(&self) -> RawFd {
        self.0
    }
}

/// Registers a device descriptor with the runtime for readability.
///
/// The caller must drop the returned `AsyncFd` before the device closes the
/// descriptor (`RdmaEndpoint` declares its `AsyncFd`s before the engine, so
/// they drop first).
pub(crate) fn watch(fd: RawFd) -> io::Result<AsyncFd<DeviceFd>> {
    // SAFETY: `fd` is open (its channel or context is live) and, per this
    // function's contract, stays open and unchanged until the AsyncFd drops.
    unsafe { AsyncFd::register_with_interest(DeviceFd(fd), Interest::READABLE) }
        .map_err(|e| e.into_parts().1)
}

fn set_nonblocking(fd: RawFd) -> io::Result<()> {
    // SAFETY: fcntl on a descriptor the device owns; no memory is passed.
    let flags = unsafe { libc::fcntl(fd, libc::F_GETFL) };
    if flags < 0 {
        return Err(last_os_error());
    }
    // SAFETY: as above.
    if unsafe { libc::fcntl(fd, libc::F_SETFL, flags | libc::O_NONBLOCK) } < 0 {
        return Err(last_os_error());
    }
    Ok(())
}

impl RealVerbs {
    /// Opens `config.spec.device` and builds everything. `soft_roce` forces
    /// classic CQs without timestamps.
    pub(crate) fn open(
        config: &RdmaConfig,
        is_soft_roce: impl Fn(u32) -> bool,
    ) -> Result<(Self, DeviceInfo), RdmaError> {
        let spec = &config.spec;
        let sgid_index = u8::try_from(spec.gid_index).map_err(|_| RdmaError::GidNotUsable {
            device: spec.device.clone(),
            port: spec.port,
            index: spec.gid_index,
            reason: "address handles take GID indexes up to 255".to_owned(),
        })?;
        let mut verbs = Self {
            device: spec.device.clone(),
            port: spec.port,
            sgid_index,
            hop_limit: config.hop_limit,
            ctx: ptr::null_mut(),
            pd: ptr::null_mut(),
            channels: [ptr::null_mut(); 2],
            cqs: [Cq::None; 2],
            qps: [ptr::null_mut(); 2],
            mrs: [ptr::null_mut(); 2],
            buffers: [
                vec![0u8; SLOTS * (RECV_STRIDE + SEND_STRIDE)].into_boxed_slice(),
                vec![0u8; SLOTS * (RECV_STRIDE + SEND_STRIDE)].into_boxed_slice(),
            ],
        };
        verbs.open_context()?;
        let mut info = verbs.query_device()?;
        let soft = is_soft_roce(info.vendor_id);
        let want_timestamps = config.nic_timestamps
            && !soft
            && info.hca_core_clock_khz != 0
            && info.completion_timestamp_mask != 0;
        // SAFETY: the context is live.
        verbs.pd = unsafe { ibv_alloc_pd(verbs.ctx) };
        if verbs.pd.is_null() {
            return Err(verbs.error("ibv_alloc_pd", last_os_error()));
        }
        let mut timestamps = want_timestamps;
        for role in QpRole::ALL {
            timestamps &= verbs.create_queue(role, want_timestamps)?;
        }
        info.timestamps_on_cq = timestamps;
        tracing::debug!(device = %verbs.device, soft_roce = soft, nic_timestamps = timestamps, "RDMA device opened");
        Ok((verbs, info))
    }

    fn error(&self, op: &'static str, source: io::Error) -> RdmaError {
        RdmaError::Verbs {
            op,
            device: self.device.clone(),
            source,
        }
    }

    fn open_context(&mut self) -> Result<(), RdmaError> {
        let mut count = 0;
        // SAFETY: valid out pointer; the list is freed before returning.
        let list = unsafe { ibv_get_device_list(&raw mut count) };
        if list.is_null() {
            let source = last_os_error();
            return Err(RdmaError::NoDevices {
                reason: format!("ibv_get_device_list: {source}"),
            });
        }
        let mut found = false;
        for i in 0..usize::try_from(count).unwrap_or(0) {
            // SAFETY: index within the list's `count` entries.
            let device = unsafe { *list.add(i) };
            // SAFETY: a live list entry.
            if unsafe { device_name(device) } == self.device {
                found = true;
                // SAFETY: a live list entry; the context outlives the list.
                self.ctx = unsafe { ibv_open_device(device) };
                break;
            }
        }
        let open_error = last_os_error();
        // SAFETY: freed once; contexts opened from it stay valid.
        unsafe { ibv_free_device_list(list) };
        if self.ctx.is_null() {
            return Err(if found {
                self.error("ibv_open_device", open_error)
            } else {
                RdmaError::DeviceNotFound {
                    device: self.device.clone(),
                }
            });
        }
        // SAFETY: the context is live; its async fd belongs to it.
        let async_fd = unsafe { (*self.ctx).async_fd };
        set_nonblocking(async_fd).map_err(|e| self.error("fcntl(async_fd)", e))
    }

    fn query_device(&self) -> Result<DeviceInfo, RdmaError> {
        // SAFETY: an all-zero attribute struct is a valid input (plain integers).
        let mut attr: ibv_device_attr_ex = unsafe { std::mem::zeroed() };
        // SAFETY: live context, valid out pointer, no input struct.
        let rc = unsafe { ibv_query_device_ex(self.ctx, ptr::null(), &raw mut attr) };
        if rc != 0 {
            return Err(self.error("ibv_query_device_ex", io::Error::from_raw_os_error(rc)));
        }
        Ok(DeviceInfo {
            vendor_id: attr.orig_attr.vendor_id,
            hca_core_clock_khz: attr.hca_core_clock,
            completion_timestamp_mask: attr.completion_timestamp_mask,
            timestamps_on_cq: false,
        })
    }

    /// Channel, CQ, MR and QP of `role`; returns whether the CQ has timestamps.
    fn create_queue(&mut self, role: QpRole, want_timestamps: bool) -> Result<bool, RdmaError> {
        let r = role.index();
        // SAFETY: live context.
        self.channels[r] = unsafe { ibv_create_comp_channel(self.ctx) };
        if self.channels[r].is_null() {
            return Err(self.error("ibv_create_comp_channel", last_os_error()));
        }
        // SAFETY: the channel is live.
        let fd = unsafe { (*self.channels[r]).fd };
        set_nonblocking(fd).map_err(|e| self.error("fcntl(comp_channel)", e))?;

        let cqe = i32::from(QUEUE_DEPTH) * 2;
        let mut timestamps = false;
        if want_timestamps {
            match self.create_extended_cq(r, cqe) {
                Ok(cq) => {
                    self.cqs[r] = Cq::Extended(cq);
                    timestamps = true;
                }
                Err(e)
                    if matches!(
                        e.raw_os_error(),
                        Some(libc::EOPNOTSUPP | libc::EINVAL | libc::ENOSYS)
                    ) =>
                {
                    tracing::info!(device = %self.device, error = %e, "no completion timestamps; timing completions on the host");
                }
                Err(e) => return Err(self.error("ibv_create_cq_ex", e)),
            }
        }
        if matches!(self.cqs[r], Cq::None) {
            // SAFETY: live context and channel.
            let cq = unsafe { ibv_create_cq(self.ctx, cqe, ptr::null_mut(), self.channels[r], 0) };
            if cq.is_null() {
                return Err(self.error("ibv_create_cq", last_os_error()));
            }
            self.cqs[r] = Cq::Classic(cq);
        }

        let buffer = &mut self.buffers[r];
        // SAFETY: the boxed buffer outlives the MR (deregistered before the box drops).
        self.mrs[r] = unsafe {
            ibv_reg_mr(
                self.pd,
                buffer.as_mut_ptr().cast(),
                buffer.len(),
                ibv_access_flags::IBV_ACCESS_LOCAL_WRITE.0.cast_signed(),
            )
        };
        if self.mrs[r].is_null() {
            return Err(self.error("ibv_reg_mr", last_os_error()));
        }
        self.create_qp(r)?;
        Ok(timestamps)
    }

    fn create_extended_cq(&self, r: usize, cqe: i32) -> io::Result<*mut ibv_cq_ex> {
        let flags = ibv_create_cq_wc_flags::IBV_WC_EX_WITH_BYTE_LEN
            | ibv_create_cq_wc_flags::IBV_WC_EX_WITH_SRC_QP
            | ibv_create_cq_wc_flags::IBV_WC_EX_WITH_COMPLETION_TIMESTAMP;
        // SAFETY: all-zero is a valid init attribute (null pointers, zero masks).
        let mut attr: ibv_cq_init_attr_ex = unsafe { std::mem::zeroed() };
        attr.cqe = cqe.unsigned_abs();
        attr.channel = self.channels[r];
        attr.wc_flags = u64::from(flags.0);
        // SAFETY: live context; attr is valid for the call.
        match unsafe { ibv_create_cq_ex(self.ctx, &raw mut attr) } {
            Some(cq) if !cq.is_null() => Ok(cq),
            Some(_) => Err(last_os_error()),
            None => Err(io::Error::from_raw_os_error(libc::EOPNOTSUPP)),
        }
    }

    fn create_qp(&mut self, r: usize) -> Result<(), RdmaError> {
        let cq = self.cqs[r].as_cq();
        let mut init = ibv_qp_init_attr {
            qp_context: ptr::null_mut(),
            send_cq: cq,
            recv_cq: cq,
            srq: ptr::null_mut(),
            cap: ibv_qp_cap {
                max_send_wr: u32::from(QUEUE_DEPTH),
                max_recv_wr: u32::from(QUEUE_DEPTH),
                max_send_sge: 1,
                max_recv_sge: 1,
                max_inline_data: 0,
            },
            qp_type: ibv_qp_type::IBV_QPT_UD,
            sq_sig_all: 0,
        };
        // SAFETY: live PD and CQ; init is valid for the call.
        self.qps[r] = unsafe { ibv_create_qp(self.pd, &raw mut init) };
        if self.qps[r].is_null() {
            return Err(self.error("ibv_create_qp", last_os_error()));
        }
        let qp = self.qps[r];
        let steps = [
            (
                ibv_qp_state::IBV_QPS_INIT,
                ibv_qp_attr_mask::IBV_QP_STATE
                    | ibv_qp_attr_mask::IBV_QP_PKEY_INDEX
                    | ibv_qp_attr_mask::IBV_QP_PORT
                    | ibv_qp_attr_mask::IBV_QP_QKEY,
                "ibv_modify_qp(INIT)",
            ),
            (
                ibv_qp_state::IBV_QPS_RTR,
                ibv_qp_attr_mask::IBV_QP_STATE,
                "ibv_modify_qp(RTR)",
            ),
            (
                ibv_qp_state::IBV_QPS_RTS,
                ibv_qp_attr_mask::IBV_QP_STATE | ibv_qp_attr_mask::IBV_QP_SQ_PSN,
                "ibv_modify_qp(RTS)",
            ),
        ];
        for (state, mask, op) in steps {
            // SAFETY: all-zero is a valid attribute set; only masked fields are read.
            let mut attr: ibv_qp_attr = unsafe { std::mem::zeroed() };
            attr.qp_state = state;
            attr.pkey_index = 0;
            attr.port_num = self.port;
            attr.qkey = MESH_QKEY;
            attr.sq_psn = 0;
            // SAFETY: live QP; attr valid for the call.
            let rc = unsafe { ibv_modify_qp(qp, &raw mut attr, mask.0.cast_signed()) };
            if rc != 0 {
                return Err(self.error(op, io::Error::from_raw_os_error(rc)));
            }
        }
        Ok(())
    }

    /// The QPN of `role`'s queue pair.
    pub(crate) fn qpn(&self, role: QpRole) -> u32 {
        let qp = self.qps[role.index()];
        if qp.is_null() {
            return 0;
        }
        // SAFETY: non-null QPs are live.
        unsafe { (*qp).qp_num }
    }

    /// The completion channel descriptor of `role`.
    pub(crate) fn channel_fd(&self, role: QpRole) -> RawFd {
        let channel = self.channels[role.index()];
        // SAFETY: channels are live between open and release.
        if channel.is_null() {
            -1
        } else {
            unsafe { (*channel).fd }
        }
    }

    /// The asynchronous event descriptor of the context.
    pub(crate) fn async_fd(&self) -> RawFd {
        // SAFETY: the context is live between open and release.
        if self.ctx.is_null() {
            -1
        } else {
            unsafe { (*self.ctx).async_fd }
        }
    }

    /// Reads and acknowledges every pending notification on `role`'s channel.
    pub(crate) fn drain_channel(&mut self, role: QpRole) -> io::Result<usize> {
        let channel = self.channels[role.index()];
        let mut consumed = 0;
        while !channel.is_null() {
            let mut cq: *mut ibv_cq = ptr::null_mut();
            let mut cq_context = ptr::null_mut();
            // SAFETY: live non-blocking channel; valid out pointers.
            if unsafe { ibv_get_cq_event(channel, &raw mut cq, &raw mut cq_context) } != 0 {
                let e = last_os_error();
                if e.kind() == io::ErrorKind::WouldBlock {
                    break;
                }
                return Err(e);
            }
            // SAFETY: `cq` is the live CQ the event was for; each event is acked once.
            unsafe { ibv_ack_cq_events(cq, 1) };
            consumed += 1;
        }
        Ok(consumed)
    }

    /// The next asynchronous event as (`ibv_event_type` code, port), if any.
    pub(crate) fn next_async_event(&mut self) -> io::Result<Option<(u32, u8)>> {
        /// `struct ibv_async_event` read with a plain integer type: the
        /// generated Rust enum would be undefined behaviour for a code newer
        /// than the bindings.
        #[repr(C)]
        union Element {
            ptr: *mut libc::c_void,
            port_num: libc::c_int,
        }
        #[repr(C)]
        struct RawAsyncEvent {
            element: Element,
            event_type: u32,
        }
        if self.ctx.is_null() {
            return Ok(None);
        }
        let mut event = RawAsyncEvent {
            element: Element {
                ptr: ptr::null_mut(),
            },
            event_type: u32::MAX,
        };
        let raw = (&raw mut event).cast::<ibv_async_event>();
        // SAFETY: RawAsyncEvent has the C layout of ibv_async_event (an 8-byte
        // union, then a 4-byte enum); the context's async fd is non-blocking.
        if unsafe { ibv_get_async_event(self.ctx, raw) } != 0 {
            let e = last_os_error();
            return if e.kind() == io::ErrorKind::WouldBlock {
                Ok(None)
            } else {
                Err(e)
            };
        }
        // SAFETY: port events fill `port_num`; for other events this is
        // harmless garbage that the caller ignores.
        let port = u8::try_from(unsafe { event.element.port_num }).unwrap_or(0);
        let code = event.event_type;
        // SAFETY: acknowledges the event just received, once.
        unsafe { ibv_ack_async_event(raw) };
        Ok(Some((code, port)))
    }

    fn recv_sge(&self, r: usize, slot: u16) -> ibv_sge {
        let offset = usize::from(slot) * RECV_STRIDE;
        ibv_sge {
            addr: self.buffers[r][offset..].as_ptr() as u64,
            length: u32::try_from(RECV_STRIDE).unwrap_or(0),
            // SAFETY: the MR is live while queues are.
            lkey: unsafe { (*self.mrs[r]).lkey },
        }
    }

    fn poll_extended(cq: *mut ibv_cq_ex, out: &mut Vec<Completion>) -> io::Result<()> {
        let mut attr = ibv_poll_cq_attr { comp_mask: 0 };
        // SAFETY: live extended CQ; attr valid for the call.
        let rc = unsafe { ibv_start_poll(cq, &raw mut attr) };
        if rc == libc::ENOENT {
            return Ok(());
        }
        if rc != 0 {
            return Err(io::Error::from_raw_os_error(rc));
        }
        loop {
            // SAFETY: between a successful start/next_poll and end_poll the CQ
            // exposes the current completion; status and wr_id are plain fields.
            let (wr_id, status) = unsafe { ((*cq).wr_id, (*cq).status) };
            let kind = if wr_id & SEND_WR_FLAG == 0 {
                CompletionKind::Recv
            } else {
                CompletionKind::Send
            };
            let ok = status == 0;
            out.push(Completion {
                wr_id,
                kind,
                status,
                // SAFETY: the CQ was created with BYTE_LEN, SRC_QP and
                // COMPLETION_TIMESTAMP; fields of failed completions are not read.
                byte_len: if ok {
                    unsafe { ibv_wc_read_byte_len(cq) }
                } else {
                    0
                },
                // SAFETY: as above.
                src_qp: if ok && kind == CompletionKind::Recv {
                    unsafe { ibv_wc_read_src_qp(cq) }
                } else {
                    0
                },
                // SAFETY: as above.
                raw_timestamp: ok.then(|| unsafe { ibv_wc_read_completion_ts(cq) }),
            });
            // SAFETY: inside a poll started above.
            let rc = unsafe { ibv_next_poll(cq) };
            if rc == libc::ENOENT {
                break;
            }
            if rc != 0 {
                // SAFETY: ends the poll started above.
                unsafe { ibv_end_poll(cq) };
                return Err(io::Error::from_raw_os_error(rc));
            }
        }
        // SAFETY: ends the poll started above.
        unsafe { ibv_end_poll(cq) };
        Ok(())
    }

    fn poll_classic(cq: *mut ibv_cq, out: &mut Vec<Completion>) -> io::Result<()> {
        loop {
            // SAFETY: ibv_wc is plain integers; all-zero is valid.
            let mut wcs: [ibv_wc; POLL_BATCH] = unsafe { std::mem::zeroed() };
            // SAFETY: live CQ; the array holds POLL_BATCH entries.
            let n = unsafe { ibv_poll_cq(cq, POLL_BATCH_C, wcs.as_mut_ptr()) };
            if n < 0 {
                return Err(io::Error::other(format!("ibv_poll_cq returned {n}")));
            }
            let n = usize::try_from(n).unwrap_or(0);
            for wc in &wcs[..n] {
                out.push(Completion {
                    wr_id: wc.wr_id,
                    kind: if wc.wr_id & SEND_WR_FLAG == 0 {
                        CompletionKind::Recv
                    } else {
                        CompletionKind::Send
                    },
                    status: wc.status,
                    byte_len: wc.byte_len,
                    src_qp: wc.src_qp,
                    raw_timestamp: None,
                });
            }
            if n < POLL_BATCH {
                return Ok(());
            }
        }
    }
}

impl Verbs for RealVerbs {
    type Ah = AddressHandle;

    fn device(&self) -> &str {
        &self.device
    }

    fn create_ah(&mut self, key: &AhKey) -> io::Result<AddressHandle> {
        let mut attr = ibv_ah_attr {
            grh: ibv_global_route {
                dgid: ibv_gid { raw: key.gid.0 },
                flow_label: key.flow_label,
                sgid_index: self.sgid_index,
                hop_limit: self.hop_limit,
                traffic_class: key.traffic_class,
            },
            dlid: 0,
            sl: key.service_level,
            src_path_bits: 0,
            static_rate: 0,
            is_global: 1,
            port_num: self.port,
        };
        // SAFETY: live PD; attr valid for the call.
        let ah = unsafe { ibv_create_ah(self.pd, &raw mut attr) };
        if ah.is_null() {
            Err(last_os_error())
        } else {
            Ok(AddressHandle(ah))
        }
    }

    fn destroy_ah(&mut self, ah: AddressHandle) {
        // SAFETY: the handle is live and destroyed once (it is consumed here).
        let rc = unsafe { ibv_destroy_ah(ah.0) };
        if rc != 0 {
            tracing::warn!(device = %self.device, error = %io::Error::from_raw_os_error(rc), "ibv_destroy_ah failed");
        }
    }

    fn post_send(
        &mut self,
        role: QpRole,
        request: &SendRequest<'_, AddressHandle>,
    ) -> io::Result<()> {
        let r = role.index();
        if self.qps[r].is_null() {
            return Err(io::Error::from(io::ErrorKind::NotConnected));
        }
        let len = request.payload.len().min(SEND_STRIDE);
        let offset = SLOTS * RECV_STRIDE + usize::from(request.slot) * SEND_STRIDE;
        let Some(slot) = self.buffers[r].get_mut(offset..offset + SEND_STRIDE) else {
            return Err(io::Error::from(io::ErrorKind::InvalidInput));
        };
        slot[..len].copy_from_slice(&request.payload[..len]);
        let mut sge = ibv_sge {
            addr: slot.as_ptr() as u64,
            length: u32::try_from(len).unwrap_or(0),
            // SAFETY: the MR is live while the QP is.
            lkey: unsafe { (*self.mrs[r]).lkey },
        };
        // SAFETY: all-zero is a valid send WR (null pointers, zero unions).
        let mut wr: ibv_send_wr = unsafe { std::mem::zeroed() };
        wr.wr_id = request.wr_id;
        wr.sg_list = &raw mut sge;
        wr.num_sge = 1;
        wr.opcode = ibv_wr_opcode::IBV_WR_SEND;
        wr.send_flags = ibv_send_flags::IBV_SEND_SIGNALED.0;
        wr.wr.ud = ud_t {
            ah: request.ah.0,
            remote_qpn: request.remote_qpn,
            remote_qkey: request.remote_qkey,
        };
        let mut bad: *mut ibv_send_wr = ptr::null_mut();
        // SAFETY: live QP; wr, sge and the registered slot outlive the call
        // (the slot stays untouched until the send completes).
        let rc = unsafe { ibv_post_send(self.qps[r], &raw mut wr, &raw mut bad) };
        if rc == 0 {
            Ok(())
        } else {
            Err(io::Error::from_raw_os_error(rc))
        }
    }

    fn post_recv(&mut self, role: QpRole, slot: u16) -> io::Result<()> {
        let r = role.index();
        if self.qps[r].is_null() || usize::from(slot) >= SLOTS {
            return Err(io::Error::from(io::ErrorKind::InvalidInput));
        }
        let mut sge = self.recv_sge(r, slot);
        let mut wr = ibv_recv_wr {
            wr_id: u64::from(slot),
            next: ptr::null_mut(),
            sg_list: &raw mut sge,
            num_sge: 1,
        };
        let mut bad: *mut ibv_recv_wr = ptr::null_mut();
        // SAFETY: live QP; the registered slot stays untouched until its completion.
        let rc = unsafe { ibv_post_recv(self.qps[r], &raw mut wr, &raw mut bad) };
        if rc == 0 {
            Ok(())
        } else {
            Err(io::Error::from_raw_os_error(rc))
        }
    }

    fn recv_area(&self, role: QpRole, slot: u16) -> &[u8] {
        let offset = usize::from(slot) * RECV_STRIDE;
        self.buffers[role.index()]
            .get(offset..offset + RECV_STRIDE)
            .unwrap_or(&[])
    }

    fn poll(&mut self, role: QpRole, out: &mut Vec<Completion>) -> io::Result<()> {
        match self.cqs[role.index()] {
            Cq::None => Ok(()),
            Cq::Extended(cq) => Self::poll_extended(cq, out),
            Cq::Classic(cq) => Self::poll_classic(cq, out),
        }
    }

    fn arm(&mut self, role: QpRole) -> io::Result<()> {
        let cq = self.cqs[role.index()].as_cq();
        if cq.is_null() {
            return Ok(());
        }
        // SAFETY: live CQ.
        let rc = unsafe { ibv_req_notify_cq(cq, 0) };
        if rc == 0 {
            Ok(())
        } else {
            Err(io::Error::from_raw_os_error(rc))
        }
    }

    fn release(&mut self, resource: Resource) {
        let device = self.device.clone();
        let check = |op: &str, rc: i32| {
            if rc != 0 {
                tracing::warn!(%device, op, error = %io::Error::from_raw_os_error(rc.abs()), "RDMA teardown step failed");
            }
        };
        match resource {
            Resource::QueuePairs => {
                for qp in &mut self.qps {
                    if !qp.is_null() {
                        // SAFETY: live QP, destroyed once, then nulled.
                        check("ibv_destroy_qp", unsafe { ibv_destroy_qp(*qp) });
                        *qp = ptr::null_mut();
                    }
                }
            }
            Resource::CompletionQueues => {
                for cq in &mut self.cqs {
                    let raw = cq.as_cq();
                    if !raw.is_null() {
                        // SAFETY: live CQ whose events were all acked, destroyed once.
                        check("ibv_destroy_cq", unsafe { ibv_destroy_cq(raw) });
                    }
                    *cq = Cq::None;
                }
            }
            Resource::MemoryRegions => {
                for mr in &mut self.mrs {
                    if !mr.is_null() {
                        // SAFETY: live MR, no QP left that could use it.
                        check("ibv_dereg_mr", unsafe { ibv_dereg_mr(*mr) });
                        *mr = ptr::null_mut();
                    }
                }
            }
            Resource::ProtectionDomain => {
                if !self.pd.is_null() {
                    // SAFETY: live PD with no QP, MR or AH left.
                    check("ibv_dealloc_pd", unsafe { ibv_dealloc_pd(self.pd) });
                    self.pd = ptr::null_mut();
                }
            }
            Resource::CompletionChannels => {
                for channel in &mut self.channels {
                    if !channel.is_null() {
                        // SAFETY: live channel with no CQ left on it.
                        check("ibv_destroy_comp_channel", unsafe {
                            ibv_destroy_comp_channel(*channel)
                        });
                        *channel = ptr::null_mut();
                    }
                }
            }
            Resource::Context => {
                if !self.ctx.is_null() {
                    // SAFETY: live context with every child object gone.
                    check("ibv_close_device", unsafe { ibv_close_device(self.ctx) });
                    self.ctx = ptr::null_mut();
                }
            }
        }
    }
}

impl Drop for RealVerbs {
    /// Cleans up after an open that failed half-way (the engine's teardown has
    /// already released everything otherwise, and this finds only nulls).
    fn drop(&mut self) {
        for resource in [
            Resource::QueuePairs,
            Resource::CompletionQueues,
            Resource::MemoryRegions,
            Resource::ProtectionDomain,
            Resource::CompletionChannels,
            Resource::Context,
        ] {
            self.release(resource);
        }
    }
}
