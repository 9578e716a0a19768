//! `sendmmsg`: several unstamped datagrams (ACK2s) in one system call.
//!
//! No control messages are attached, so no TX stamp is asked for and no
//! error-queue key is used: the same as a plain `send_to` per datagram.

use std::io;
use std::net::SocketAddr;
use std::os::fd::AsRawFd;

use socket2::{SockAddr, Socket};

/// Sends `batch` in order with one `sendmmsg`; returns how many went out (at
/// least one). The first datagram's failure is the call's error; a later
/// one's ends the batch early, and the caller retries from there.
pub(super) fn send_many(socket: &Socket, batch: &[(&[u8], SocketAddr)]) -> io::Result<usize> {
    if batch.is_empty() {
        return Ok(0);
    }
    let addrs: Vec<SockAddr> = batch.iter().map(|(_, dst)| SockAddr::from(*dst)).collect();
    let mut iovecs: Vec<libc::iovec> = batch
        .iter()
        .map(|(payload, _)| libc::iovec {
            // sendmmsg only reads the payload; the cast is what the C type asks for.
            iov_base: payload.as_ptr().cast_mut().cast(),
            iov_len: payload.len(),
        })
        .collect();
    let mut messages: Vec<libc::mmsghdr> = iovecs
        .iter_mut()
        .zip(&addrs)
        .map(|(iovec, addr)| {
            // SAFETY: msghdr is plain old data; all-zero is an empty header.
            let mut header: libc::msghdr = unsafe { std::mem::zeroed() };
            header.msg_name = addr.as_ptr().cast_mut().cast();
            header.msg_namelen = addr.len();
            header.msg_iov = std::ptr::from_mut(iovec);
            header.msg_iovlen = 1;
            libc::mmsghdr {
                msg_hdr: header,
                msg_len: 0,
            }
        })
        .collect();
    let count = libc::c_uint::try_from(messages.len()).unwrap_or(libc::c_uint::MAX);
    // SAFETY: every header points into `addrs` and `iovecs`, which outlive the
    // call, and `count` is at most the length of `messages`.
    let sent = unsafe { libc::sendmmsg(socket.as_raw_fd(), messages.as_mut_ptr(), count, 0) };
    if sent < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(usize::try_from(sent).unwrap_or(0))
}
