//! One `recvmmsg` for up to [`BATCH`] datagrams or error-queue entries, with
//! their control messages, so a wake-up that finds several things queued reads
//! them in one system call instead of one each (plus the one that says "empty").
//!
//! The buffers live as long as the socket and are reused; the `mmsghdr`s that
//! point into them are built on the stack for each call, so no raw pointer is
//! kept between calls and the socket stays `Send + Sync`. Every header is set
//! afresh each call: the kernel shrinks `msg_controllen` and `msg_namelen` to
//! what it wrote, and a reused header would offer less room the next time.

use std::io;
use std::mem::size_of;
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4, SocketAddrV6};
use std::os::fd::AsRawFd;

use socket2::Socket;

use super::udp::Queue;

/// Most messages one call reads. At 1,000 probes/s a socket rarely has more
/// than a few queued; the rest of the room is for bursts.
pub(super) const BATCH: usize = 16;
/// Datagrams longer than this are cut (and flagged); a probe message is 40 bytes.
pub(super) const SLOT_LEN: usize = 256;
/// Room for one `SCM_TIMESTAMPING` and one `IP_RECVERR` message with slack.
const CONTROL_LEN: usize = 256;

/// Control-message buffer, aligned for the `cmsghdr`s the kernel writes into it.
#[repr(C, align(8))]
#[derive(Clone, Copy)]
struct ControlBuffer([u8; CONTROL_LEN]);

/// Reusable buffers for one socket's batched receives.
pub(super) struct RecvBatch {
    data: Box<[[u8; SLOT_LEN]; BATCH]>,
    control: Box<[ControlBuffer; BATCH]>,
    names: Box<[libc::sockaddr_storage; BATCH]>,
    /// What the last call got, per message.
    results: [Lengths; BATCH],
    len: usize,
}

impl std::fmt::Debug for RecvBatch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RecvBatch")
            .field("len", &self.len)
            .finish_non_exhaustive()
    }
}

/// What the kernel wrote for one message.
#[derive(Debug, Clone, Copy, Default)]
struct Lengths {
    bytes: usize,
    flags: libc::c_int,
    name: usize,
    control: usize,
}

/// One message of the last batch, borrowed from its buffers.
pub(super) struct Received<'a> {
    /// The bytes received (at most [`SLOT_LEN`]).
    pub data: &'a [u8],
    /// The datagram was longer than its slot.
    pub truncated: bool,
    pub from: Option<SocketAddr>,
    control: &'a [u8],
}

/// A control message the probe socket understands.
pub(super) enum Control {
    /// `SCM_TIMESTAMPING`: software, (deprecated), raw hardware stamps.
    Timestamps([libc::timespec; 3]),
    /// `IP_RECVERR` / `IPV6_RECVERR`: why an error-queue entry is there.
    ExtendedError(libc::sock_extended_err),
}

impl Default for RecvBatch {
    fn default() -> Self {
        Self {
            data: Box::new([[0; SLOT_LEN]; BATCH]),
            control: Box::new([ControlBuffer([0; CONTROL_LEN]); BATCH]),
            // SAFETY: sockaddr_storage is plain data; all zeroes is a valid value.
            names: Box::new(unsafe { std::mem::zeroed() }),
            results: [Lengths::default(); BATCH],
            len: 0,
        }
    }
}

impl RecvBatch {
    /// Reads up to [`BATCH`] messages from `queue` without waiting; returns
    /// how many. `WouldBlock` when the queue is empty. A count under
    /// [`BATCH`] means the queue was empty when the call returned.
    // msg_controllen is size_t with glibc and socklen_t with musl.
    #[allow(clippy::unnecessary_cast)]
    pub(super) fn recv(&mut self, socket: &Socket, queue: Queue) -> io::Result<usize> {
        self.len = 0;
        let mut iovecs: [libc::iovec; BATCH] = std::array::from_fn(|i| libc::iovec {
            iov_base: self.data[i].as_mut_ptr().cast(),
            iov_len: SLOT_LEN,
        });
        // SAFETY: mmsghdr is plain data (pointers and integers); zeroes are valid.
        let mut headers: [libc::mmsghdr; BATCH] = unsafe { std::mem::zeroed() };
        for (i, header) in headers.iter_mut().enumerate() {
            let hdr = &mut header.msg_hdr;
            hdr.msg_name = (&raw mut self.names[i]).cast();
            hdr.msg_namelen = socklen(size_of::<libc::sockaddr_storage>());
            hdr.msg_iov = &raw mut iovecs[i];
            hdr.msg_iovlen = 1;
            hdr.msg_control = self.control[i].0.as_mut_ptr().cast();
            hdr.msg_controllen = CONTROL_LEN as _;
        }
        let flags = match queue {
            Queue::Receive => libc::MSG_DONTWAIT,
            Queue::Error => libc::MSG_DONTWAIT | libc::MSG_ERRQUEUE,
        };
        // SAFETY: every header points at buffers of `self` (and `iovecs` on
        // this stack frame) with the lengths stated, all alive and exclusively
        // borrowed for the call; no timeout is passed.
        let got = unsafe {
            libc::recvmmsg(
                socket.as_raw_fd(),
                headers.as_mut_ptr(),
                libc::c_uint::try_from(BATCH).unwrap_or(1),
                flags,
                std::ptr::null_mut(),
            )
        };
        let got = usize::try_from(got).map_err(|_| io::Error::last_os_error())?;
        for (result, header) in self.results.iter_mut().zip(&headers).take(got) {
            *result = Lengths {
                bytes: (header.msg_len as usize).min(SLOT_LEN),
                flags: header.msg_hdr.msg_flags,
                name: header.msg_hdr.msg_namelen as usize,
                control: (header.msg_hdr.msg_controllen as usize).min(CONTROL_LEN),
            };
        }
        self.len = got;
        Ok(got)
    }

    /// Message `i` of the last call (`i` below what [`Self::recv`] returned).
    pub(super) fn get(&self, i: usize) -> Option<Received<'_>> {
        if i >= self.len {
            return None;
        }
        let lengths = self.results[i];
        Some(Received {
            data: &self.data[i][..lengths.bytes],
            truncated: lengths.flags & libc::MSG_TRUNC != 0,
            // No address written (an error-queue entry may have none).
            from: (lengths.name > 0)
                .then(|| socket_addr(&self.names[i]))
                .flatten(),
            control: &self.control[i].0[..lengths.control],
        })
    }
}

impl Received<'_> {
    /// The control messages the probe socket understands; others are passed over.
    pub(super) fn controls(&self) -> impl Iterator<Item = Control> + '_ {
        ControlMessages { rest: self.control }
    }
}

/// Walks a control buffer as `CMSG_NXTHDR` does, reading every field
/// unaligned so no assumption is made about where the slice starts.
struct ControlMessages<'a> {
    rest: &'a [u8],
}

const HEADER_LEN: usize = size_of::<libc::cmsghdr>();

const fn cmsg_align(len: usize) -> usize {
    let word = size_of::<usize>();
    (len + word - 1) & !(word - 1)
}

impl Iterator for ControlMessages<'_> {
    type Item = Control;

    // cmsg_len is size_t with glibc and socklen_t with musl.
    #[allow(clippy::unnecessary_cast)]
    fn next(&mut self) -> Option<Control> {
        loop {
            if self.rest.len() < HEADER_LEN {
                return None;
            }
            // SAFETY: at least HEADER_LEN bytes are there; cmsghdr is plain data.
            let header: libc::cmsghdr =
                unsafe { std::ptr::read_unaligned(self.rest.as_ptr().cast()) };
            let len = header.cmsg_len as usize;
            if len < HEADER_LEN || len > self.rest.len() {
                return None; // malformed or cut: stop, as CMSG_NXTHDR would
            }
            let data = &self.rest[cmsg_align(HEADER_LEN)..len];
            self.rest = &self.rest[cmsg_align(len).min(self.rest.len())..];
            let known = match (header.cmsg_level, header.cmsg_type) {
                (libc::SOL_SOCKET, libc::SCM_TIMESTAMPING) => {
                    read::<[libc::timespec; 3]>(data).map(Control::Timestamps)
                }
                (libc::SOL_IP, libc::IP_RECVERR) | (libc::SOL_IPV6, libc::IPV6_RECVERR) => {
                    read::<libc::sock_extended_err>(data).map(Control::ExtendedError)
                }
                _ => None,
            };
            if known.is_some() {
                return known;
            }
        }
    }
}

/// Reads a `T` from the start of `data` when it is long enough.
fn read<T: Copy>(data: &[u8]) -> Option<T> {
    // SAFETY: the length is checked, the read is unaligned, and T is only ever
    // a plain-data C struct here (every bit pattern valid).
    (data.len() >= size_of::<T>())
        .then(|| unsafe { std::ptr::read_unaligned(data.as_ptr().cast()) })
}

fn socket_addr(storage: &libc::sockaddr_storage) -> Option<SocketAddr> {
    match libc::c_int::from(storage.ss_family) {
        libc::AF_INET => {
            // SAFETY: the family says the storage holds a sockaddr_in.
            let v4: libc::sockaddr_in = unsafe { std::ptr::read((&raw const *storage).cast()) };
            Some(SocketAddr::V4(SocketAddrV4::new(
                Ipv4Addr::from(u32::from_be(v4.sin_addr.s_addr)),
                u16::from_be(v4.sin_port),
            )))
        }
        libc::AF_INET6 => {
            // SAFETY: the family says the storage holds a sockaddr_in6.
            let v6: libc::sockaddr_in6 = unsafe { std::ptr::read((&raw const *storage).cast()) };
            Some(SocketAddr::V6(SocketAddrV6::new(
                Ipv6Addr::from(v6.sin6_addr.s6_addr),
                u16::from_be(v6.sin6_port),
                v6.sin6_flowinfo,
                v6.sin6_scope_id,
            )))
        }
        _ => None,
    }
}

fn socklen(len: usize) -> libc::socklen_t {
    libc::socklen_t::try_from(len).unwrap_or(libc::socklen_t::MAX)
}
