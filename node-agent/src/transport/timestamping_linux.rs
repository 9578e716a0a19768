//! Linux `SO_TIMESTAMPING` for the UDP probe socket: turning it on (with NIC
//! timestamps on request), sending under a known TX timestamp key, reading RX
//! stamps from control messages and TX stamps from the error queue.
//!
//! RX stamps are on for the whole socket; TX stamps are asked for per send
//! (an `SO_TIMESTAMPING` control message), so only the sends whose stamp the
//! protocol uses (probes, ACK1s) put an entry on the error queue. Both queues
//! are read in batches ([`super::recv_batch_linux`]).
//!
//! Software stamps are `CLOCK_REALTIME` and NIC stamps come from the NIC's own
//! clock. A socket reports stamps of exactly one of the two kinds, so any two
//! stamps of one socket can be subtracted; none may be compared with a host
//! monotonic reading.

use std::io::{self, IoSlice};
use std::net::SocketAddr;
use std::sync::{Mutex, MutexGuard, PoisonError};

use nix::sys::socket::{TimestampingFlag, setsockopt, sockopt};
use socket2::{MsgHdr, SockAddr, Socket};

use super::recv_batch_linux::{BATCH, Control, Received, RecvBatch};
use super::udp::{Queue, SocketEvent};
use super::{TimestampMode, TimestampSupport, TransportError};
use crate::probe::clock::host_now_ns;

/// `ee_info` of a TX timestamp taken when the packet left the stack (or NIC).
const SCM_TSTAMP_SND: u32 = 0;

/// Control message that sets the TX timestamp key of one send (Linux 6.13+).
/// The value is from `asm-generic/socket.h`; architectures with their own
/// numbering rely on the kernel's counter instead.
#[cfg(any(
    target_arch = "x86_64",
    target_arch = "x86",
    target_arch = "aarch64",
    target_arch = "arm",
    target_arch = "riscv64",
    target_arch = "loongarch64"
))]
const SCM_TS_OPT_ID: Option<libc::c_int> = Some(81);
#[cfg(not(any(
    target_arch = "x86_64",
    target_arch = "x86",
    target_arch = "aarch64",
    target_arch = "arm",
    target_arch = "riscv64",
    target_arch = "loongarch64"
)))]
const SCM_TS_OPT_ID: Option<libc::c_int> = None;

/// How the key of the next TX timestamp is known.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum KeySource {
    /// Not yet known whether the kernel takes a key per send.
    Probing,
    /// Each send names its key in an `SCM_TS_OPT_ID` control message, so keys
    /// are ours and cannot drift from the kernel's.
    PerSend,
    /// Older kernels: keys come from the socket's `OPT_ID` counter, mirrored here.
    KernelCounter,
}

#[derive(Debug)]
struct TxKeys {
    next: u32,
    source: KeySource,
}

/// Kernel timestamping state of one socket.
#[derive(Debug)]
pub(super) struct KernelTimestamps {
    hardware: bool,
    /// Held across "pick key, send" so concurrent senders cannot swap keys.
    tx_keys: Mutex<TxKeys>,
    /// Events read in the last batch and not yet handed out. Only the task
    /// waiting for events takes this lock, so it is never contended.
    inbox: Mutex<Inbox>,
}

/// The last batch read from one of the socket's queues, handed out one event
/// at a time.
#[derive(Debug, Default)]
struct Inbox {
    batch: RecvBatch,
    /// Events of the batch, in the order read; entry `i` is message `i`.
    events: Vec<SocketEvent>,
    next: usize,
    /// `recvmmsg` calls that returned something, per queue (receive, error),
    /// for tests.
    reads: [u64; 2],
}

/// Turns on the timestamps `mode` asks for; `None` for [`TimestampMode::Off`].
pub(super) fn enable(
    socket: &Socket,
    local: SocketAddr,
    mode: TimestampMode,
) -> Result<Option<KernelTimestamps>, TransportError> {
    let want_hardware = match mode {
        TimestampMode::Off => return Ok(None),
        TimestampMode::Software => false,
        TimestampMode::Hardware => match nic::enable_timestamping(socket, local.ip()) {
            Ok(()) => true,
            Err(reason) => {
                tracing::warn!(
                    %local,
                    %reason,
                    "NIC timestamps unavailable, using kernel software timestamps"
                );
                false
            }
        },
    };
    let hardware = if want_hardware {
        match set_flags(socket, true, true) {
            Ok(()) => true,
            Err(error) => {
                tracing::warn!(
                    %local,
                    %error,
                    "socket refused NIC timestamps, using kernel software timestamps"
                );
                false
            }
        }
    } else {
        false
    };
    if !hardware {
        set_flags(socket, false, true).map_err(|source| TransportError::Timestamping {
            addr: local,
            source,
        })?;
    }
    let source = if SCM_TS_OPT_ID.is_some() {
        KeySource::Probing
    } else {
        KeySource::KernelCounter
    };
    Ok(Some(KernelTimestamps {
        hardware,
        tx_keys: Mutex::new(TxKeys { next: 0, source }),
        inbox: Mutex::new(Inbox {
            events: Vec::with_capacity(BATCH),
            ..Inbox::default()
        }),
    }))
}

/// Socket-wide flags: RX stamps of the chosen kind and how TX stamps are
/// reported, but no TX stamps themselves (those are asked for per send).
fn set_flags(socket: &Socket, hardware: bool, with_keys: bool) -> io::Result<()> {
    // TSONLY: the error queue returns the stamp alone, not a copy of the packet.
    let mut flags = TimestampingFlag::SOF_TIMESTAMPING_OPT_TSONLY;
    if with_keys {
        flags |= TimestampingFlag::SOF_TIMESTAMPING_OPT_ID;
    }
    if hardware {
        flags |= TimestampingFlag::SOF_TIMESTAMPING_RX_HARDWARE
            | TimestampingFlag::SOF_TIMESTAMPING_RAW_HARDWARE;
    } else {
        flags |= TimestampingFlag::SOF_TIMESTAMPING_RX_SOFTWARE
            | TimestampingFlag::SOF_TIMESTAMPING_SOFTWARE;
    }
    setsockopt(socket, sockopt::Timestamping, &flags).map_err(io::Error::from)
}

/// The per-send flag that asks for this socket's kind of TX stamp.
fn tx_record_flag(hardware: bool) -> u32 {
    if hardware {
        libc::SOF_TIMESTAMPING_TX_HARDWARE
    } else {
        libc::SOF_TIMESTAMPING_TX_SOFTWARE
    }
}

impl KernelTimestamps {
    pub(super) fn support(&self) -> TimestampSupport {
        TimestampSupport {
            rx: true,
            tx: true,
            hardware: self.hardware,
        }
    }

    fn keys(&self) -> MutexGuard<'_, TxKeys> {
        // The guarded state stays consistent even if a holder panicked.
        self.tx_keys.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Sends one datagram with a TX stamp and returns the key the stamp will
    /// carry. The key advances only when the send succeeds.
    pub(super) fn send(&self, socket: &Socket, payload: &[u8], dst: &SockAddr) -> io::Result<u32> {
        let tx_flag = tx_record_flag(self.hardware);
        let mut keys = self.keys();
        let key = keys.next;
        let (result, via_counter) = match (keys.source, SCM_TS_OPT_ID) {
            (KeySource::PerSend, Some(cmsg_type)) => (
                send_stamped(socket, payload, dst, tx_flag, Some((cmsg_type, key))),
                false,
            ),
            (KeySource::Probing, Some(cmsg_type)) => {
                match send_stamped(socket, payload, dst, tx_flag, Some((cmsg_type, key))) {
                    Ok(n) => {
                        keys.source = KeySource::PerSend;
                        (Ok(n), false)
                    }
                    // Kernels before 6.13 reject the unknown control message.
                    Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {
                        let result = send_stamped(socket, payload, dst, tx_flag, None);
                        if result.is_ok() {
                            tracing::debug!(
                                "kernel has no per-send timestamp keys, mirroring its counter"
                            );
                            keys.source = KeySource::KernelCounter;
                        }
                        (result, true)
                    }
                    Err(e) => (Err(e), false),
                }
            }
            // The kernel's counter moves only for sends that ask for a stamp,
            // so unstamped sends in between do not shift the keys.
            _ => (send_stamped(socket, payload, dst, tx_flag, None), true),
        };
        match result {
            Ok(_) => {
                keys.next = key.wrapping_add(1);
                Ok(key)
            }
            Err(error) => {
                if via_counter && may_have_used_a_key(&error) {
                    restart_counter(socket, self.hardware, &mut keys);
                }
                Err(error)
            }
        }
    }

    /// Hands out the next event of the last batch, its datagram (if any)
    /// copied into `buf` and cut to it (then flagged `truncated`).
    pub(super) fn take_buffered(&self, buf: &mut [u8]) -> Option<SocketEvent> {
        let mut inbox = self.inbox();
        let i = inbox.next;
        let mut event = *inbox.events.get(i)?;
        inbox.next += 1;
        if let SocketEvent::Datagram { len, truncated, .. } = &mut event
            && let Some(message) = inbox.batch.get(i)
        {
            let kept = message.data.len().min(buf.len());
            buf[..kept].copy_from_slice(&message.data[..kept]);
            *truncated |= kept < message.data.len();
            *len = kept;
        }
        Some(event)
    }

    /// Reads a batch from `queue` into the inbox (whose events must all have
    /// been handed out); returns whether that emptied the queue (fewer than a
    /// full batch came). `WouldBlock` when the queue was empty already.
    pub(super) fn fill(&self, socket: &Socket, queue: Queue) -> io::Result<bool> {
        let mut inbox = self.inbox();
        let Inbox {
            batch,
            events,
            next,
            reads,
        } = &mut *inbox;
        events.clear();
        *next = 0;
        let got = batch.recv(socket, queue)?;
        reads[usize::from(queue == Queue::Error)] += 1;
        let host_ns = host_now_ns();
        for i in 0..got {
            let Some(message) = batch.get(i) else { break };
            events.push(match queue {
                Queue::Receive => self.datagram_event(&message, host_ns),
                Queue::Error => self.error_queue_event(&message),
            });
        }
        Ok(got < BATCH)
    }

    fn inbox(&self) -> MutexGuard<'_, Inbox> {
        // The inbox stays consistent even if a holder panicked.
        self.inbox.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// `recvmmsg` calls that returned something so far: (receive queue,
    /// error queue).
    #[cfg(test)]
    pub(super) fn batch_reads(&self) -> (u64, u64) {
        let reads = self.inbox().reads;
        (reads[0], reads[1])
    }

    fn datagram_event(&self, message: &Received<'_>, host_ns: u64) -> SocketEvent {
        let Some(from) = message.from else {
            return SocketEvent::Skipped {
                reason: "datagram_without_source",
            };
        };
        // A truncated control buffer only loses the stamp; the datagram stays good.
        let kernel_ns = message.controls().find_map(|control| match control {
            Control::Timestamps(ts) => self.pick(&ts),
            Control::ExtendedError(_) => None,
        });
        SocketEvent::Datagram {
            len: message.data.len(),
            from,
            host_ns,
            kernel_ns,
            truncated: message.truncated,
        }
    }

    /// An error-queue entry: a TX timestamp or something to skip.
    fn error_queue_event(&self, message: &Received<'_>) -> SocketEvent {
        let mut extended_error = None;
        let mut stamps = None;
        for control in message.controls() {
            match control {
                Control::Timestamps(ts) => stamps = Some(ts),
                Control::ExtendedError(err) => extended_error = Some(err),
            }
        }
        let Some(err) = extended_error else {
            return SocketEvent::Skipped {
                reason: "unknown_error_queue_entry",
            };
        };
        match err.ee_origin {
            libc::SO_EE_ORIGIN_TIMESTAMPING if err.ee_info == SCM_TSTAMP_SND => {
                match stamps.and_then(|ts| self.pick(&ts)) {
                    Some(kernel_ns) => SocketEvent::TxTimestamp {
                        key: err.ee_data,
                        kernel_ns,
                    },
                    None => SocketEvent::Skipped {
                        reason: "tx_timestamp_missing",
                    },
                }
            }
            libc::SO_EE_ORIGIN_TIMESTAMPING => SocketEvent::Skipped {
                reason: "unrequested_tx_timestamp",
            },
            libc::SO_EE_ORIGIN_ICMP | libc::SO_EE_ORIGIN_ICMP6 => SocketEvent::Skipped {
                reason: "icmp_error",
            },
            _ => SocketEvent::Skipped {
                reason: "local_error",
            },
        }
    }

    /// The stamp of this socket's kind; never the other kind, so clocks don't mix.
    fn pick(&self, ts: &[libc::timespec; 3]) -> Option<u64> {
        // [0] software, [1] deprecated, [2] raw hardware.
        timespec_ns(if self.hardware { &ts[2] } else { &ts[0] })
    }

    /// Keys come from the kernel counter from now on, as if the kernel had no
    /// per-send keys.
    #[cfg(test)]
    pub(super) fn use_kernel_counter(&self) {
        self.keys().source = KeySource::KernelCounter;
    }

    /// Whether sends name their keys (known after the first successful send).
    #[cfg(test)]
    pub(super) fn uses_per_send_keys(&self) -> bool {
        self.keys().source == KeySource::PerSend
    }

    /// Makes the next key `next`; only meaningful with per-send keys.
    #[cfg(test)]
    pub(super) fn skip_keys_to(&self, next: u32) {
        self.keys().next = next;
    }
}

/// Sends `payload` asking for a TX stamp (`tx_flag`), under `key` when the
/// kernel takes one per send (`(SCM_TS_OPT_ID, key)`).
fn send_stamped(
    socket: &Socket,
    payload: &[u8],
    dst: &SockAddr,
    tx_flag: u32,
    key: Option<(libc::c_int, u32)>,
) -> io::Result<usize> {
    let mut control = [0u8; 2 * KEY_CMSG_SPACE];
    control[..KEY_CMSG_SPACE].copy_from_slice(&key_control_message(libc::SO_TIMESTAMPING, tx_flag));
    let len = match key {
        Some((cmsg_type, key)) => {
            control[KEY_CMSG_SPACE..].copy_from_slice(&key_control_message(cmsg_type, key));
            2 * KEY_CMSG_SPACE
        }
        None => KEY_CMSG_SPACE,
    };
    let bufs = [IoSlice::new(payload)];
    let msg = MsgHdr::new()
        .with_addr(dst)
        .with_buffers(&bufs)
        .with_control(&control[..len]);
    socket.sendmsg(&msg, 0)
}

const fn cmsg_align(len: usize) -> usize {
    let word = size_of::<usize>();
    (len + word - 1) & !(word - 1)
}

/// `cmsghdr` as the kernel reads it: `size_t` length, then level and type.
const CMSG_HEADER_LEN: usize = cmsg_align(size_of::<usize>() + 2 * size_of::<libc::c_int>());
const KEY_CMSG_LEN: usize = CMSG_HEADER_LEN + size_of::<u32>();
const KEY_CMSG_SPACE: usize = cmsg_align(KEY_CMSG_LEN);

/// One `SOL_SOCKET` control message carrying the `u32` `key` (a timestamp key
/// or the TX flags), laid out byte by byte so no alignment of the buffer is
/// assumed (the kernel copies it before parsing).
fn key_control_message(cmsg_type: libc::c_int, key: u32) -> [u8; KEY_CMSG_SPACE] {
    let mut out = [0u8; KEY_CMSG_SPACE];
    let word = size_of::<usize>();
    let int = size_of::<libc::c_int>();
    out[..word].copy_from_slice(&KEY_CMSG_LEN.to_ne_bytes());
    out[word..word + int].copy_from_slice(&libc::SOL_SOCKET.to_ne_bytes());
    out[word + int..word + 2 * int].copy_from_slice(&cmsg_type.to_ne_bytes());
    out[CMSG_HEADER_LEN..KEY_CMSG_LEN].copy_from_slice(&key.to_ne_bytes());
    out
}

/// Whether a failed send may still have taken a key from the kernel counter.
/// Errors raised before the datagram is built (route lookup, buffer space,
/// size, permission to broadcast) give the key back; a datagram dropped later
/// on the way out (a firewall rule answers `EPERM`) does not.
fn may_have_used_a_key(error: &io::Error) -> bool {
    !matches!(
        error.raw_os_error(),
        Some(
            libc::EAGAIN
                | libc::EMSGSIZE
                | libc::EACCES
                | libc::ENETUNREACH
                | libc::EHOSTUNREACH
                | libc::EINVAL
                | libc::EAFNOSUPPORT
                | libc::EDESTADDRREQ
                | libc::EFAULT
        )
    )
}

/// Re-arms `OPT_ID`, which resets the kernel counter to 0, and follows it.
/// Keys are reused from 0 afterwards; stamps still in flight under small keys
/// could be taken for new ones, which is why this runs only after an error.
fn restart_counter(socket: &Socket, hardware: bool, keys: &mut TxKeys) {
    let rearmed =
        set_flags(socket, hardware, false).and_then(|()| set_flags(socket, hardware, true));
    match rearmed {
        Ok(()) => keys.next = 0,
        Err(error) => {
            tracing::warn!(%error, "could not resynchronise TX timestamp keys after a failed send");
        }
    }
}

/// Nanoseconds of a kernel timestamp; a zero stamp means "not taken".
fn timespec_ns(ts: &libc::timespec) -> Option<u64> {
    let secs = u64::try_from(ts.tv_sec).ok()?;
    let nanos = u64::try_from(ts.tv_nsec).ok()?;
    let ns = secs.checked_mul(1_000_000_000)?.checked_add(nanos)?;
    (ns != 0).then_some(ns)
}

/// NIC timestamp configuration through `SIOCSHWTSTAMP`.
///
/// This is a device-wide setting shared with every other user of the NIC
/// (a PTP daemon, for one); it only asks for "stamp every packet" and never
/// turns stamping off again.
mod nic {
    use std::net::IpAddr;
    use std::os::fd::AsRawFd;

    use socket2::Socket;

    pub(super) fn enable_timestamping(socket: &Socket, ip: IpAddr) -> Result<(), String> {
        if ip.is_unspecified() {
            return Err(
                "the socket is bound to the unspecified address; NIC timestamps need one interface"
                    .into(),
            );
        }
        let name = interface_of(ip).ok_or_else(|| format!("no interface has address {ip}"))?;
        let mut name_field = [0 as libc::c_char; libc::IFNAMSIZ];
        if name.len() >= libc::IFNAMSIZ {
            return Err(format!("interface name {name} is too long"));
        }
        for (dst, src) in name_field.iter_mut().zip(name.bytes()) {
            *dst = libc::c_char::from_ne_bytes([src]);
        }
        let mut config = libc::hwtstamp_config {
            flags: 0,
            tx_type: c_int(libc::HWTSTAMP_TX_ON),
            rx_filter: c_int(libc::HWTSTAMP_FILTER_ALL),
        };
        let mut request = libc::ifreq {
            ifr_name: name_field,
            ifr_ifru: libc::__c_anonymous_ifr_ifru {
                ifru_data: (&raw mut config).cast::<libc::c_char>(),
            },
        };
        // Ioctl is c_ulong on glibc and c_int on musl.
        #[allow(clippy::unnecessary_cast, clippy::cast_possible_truncation)]
        let op = libc::SIOCSHWTSTAMP as libc::Ioctl;
        // SAFETY: `request` is a valid ifreq whose data pointer refers to
        // `config`, which outlives the call; the kernel writes at most one
        // hwtstamp_config back through it.
        let rc = unsafe { libc::ioctl(socket.as_raw_fd(), op, &raw mut request) };
        if rc != 0 {
            return Err(format!(
                "SIOCSHWTSTAMP on {name}: {}",
                std::io::Error::last_os_error()
            ));
        }
        let every_packet = [
            c_int(libc::HWTSTAMP_FILTER_ALL),
            c_int(libc::HWTSTAMP_FILTER_SOME),
        ];
        if config.tx_type != c_int(libc::HWTSTAMP_TX_ON)
            || !every_packet.contains(&config.rx_filter)
        {
            return Err(format!(
                "{name} stamps only some packets (tx_type {}, rx_filter {})",
                config.tx_type, config.rx_filter
            ));
        }
        Ok(())
    }

    fn c_int(value: libc::c_uint) -> libc::c_int {
        libc::c_int::try_from(value).unwrap_or(libc::c_int::MAX)
    }

    fn interface_of(ip: IpAddr) -> Option<String> {
        let addrs = nix::ifaddrs::getifaddrs().ok()?;
        for iface in addrs {
            let Some(addr) = iface.address else { continue };
            let matches = match ip {
                IpAddr::V4(v4) => addr.as_sockaddr_in().is_some_and(|a| a.ip() == v4),
                IpAddr::V6(v6) => addr.as_sockaddr_in6().is_some_and(|a| a.ip() == v6),
            };
            if matches {
                return Some(iface.interface_name);
            }
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_control_message_has_the_kernel_layout() {
        let bytes = key_control_message(81, 0x0102_0304);
        let word = size_of::<usize>();
        let mut len = [0u8; size_of::<usize>()];
        len.copy_from_slice(&bytes[..word]);
        // SAFETY: CMSG_LEN only does arithmetic on its argument.
        let expected = unsafe { libc::CMSG_LEN(4) } as usize;
        assert_eq!(usize::from_ne_bytes(len), expected);
        // SAFETY: as above.
        assert_eq!(KEY_CMSG_SPACE, unsafe { libc::CMSG_SPACE(4) } as usize);
        assert_eq!(
            &bytes[CMSG_HEADER_LEN..KEY_CMSG_LEN],
            &0x0102_0304u32.to_ne_bytes()
        );
    }

    #[test]
    fn zero_and_negative_stamps_mean_not_taken() {
        let ts = |tv_sec, tv_nsec| libc::timespec { tv_sec, tv_nsec };
        assert_eq!(timespec_ns(&ts(0, 0)), None);
        assert_eq!(timespec_ns(&ts(-1, 0)), None);
        assert_eq!(timespec_ns(&ts(2, 5)), Some(2_000_000_005));
    }

    #[test]
    fn errors_before_the_datagram_is_built_keep_the_key() {
        assert!(!may_have_used_a_key(&io::Error::from_raw_os_error(
            libc::EAGAIN
        )));
        assert!(!may_have_used_a_key(&io::Error::from_raw_os_error(
            libc::ENETUNREACH
        )));
        assert!(may_have_used_a_key(&io::Error::from_raw_os_error(
            libc::EPERM
        )));
    }
}
