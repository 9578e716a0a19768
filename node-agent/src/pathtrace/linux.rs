//! Same-5-tuple traceroute on Linux: UDP datagrams built by hand on a raw
//! socket (so the source port can be one another socket owns), with
//! increasing TTL, and the routers' ICMP answers read from a raw ICMP socket.
//! Both need `CAP_NET_RAW`.
//!
//! Each datagram carries a unique IPv4 identification; routers quote the
//! expired datagram's IP header and first 8 bytes in their ICMP message, so an
//! answer is matched by that id and checked against the quoted addresses and
//! ports. The id is not part of any ECMP hash.

use std::collections::HashMap;
use std::io::Read;
use std::net::{IpAddr, Ipv4Addr, SocketAddr, SocketAddrV4};
use std::sync::atomic::{AtomicU16, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use socket2::{Domain, Protocol, SockAddr, Socket, Type};
use tokio::io::Interest;
use tokio::io::unix::AsyncFd;
use tokio::sync::oneshot;

use super::{FlowTuple, TRACE_MAGIC, TraceError, TraceOutcome};

const IPPROTO_RAW: i32 = 255;
const ICMP_TIME_EXCEEDED: u8 = 11;
const ICMP_DEST_UNREACHABLE: u8 = 3;

/// What answered one TTL.
#[derive(Debug, Clone, Copy)]
enum Answer {
    /// A router on the way: the TTL expired there.
    Expired(Ipv4Addr),
    /// The destination (or a router refusing to forward): the end of the path.
    Unreachable(Ipv4Addr),
}

type Waiters = Arc<Mutex<HashMap<u16, (FlowTuple, oneshot::Sender<Answer>)>>>;

/// Sends trace datagrams and matches the ICMP answers. One per agent.
#[derive(Debug)]
pub struct Tracer {
    send: Socket,
    waiters: Waiters,
    next_id: AtomicU16,
    receiver: tokio::task::JoinHandle<()>,
}

impl Drop for Tracer {
    fn drop(&mut self) {
        self.receiver.abort();
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

impl Tracer {
    /// Opens the raw sockets; needs `CAP_NET_RAW` and a tokio runtime.
    pub fn open() -> Result<Self, TraceError> {
        let permission = |e: std::io::Error| {
            if e.kind() == std::io::ErrorKind::PermissionDenied {
                TraceError::NoPrivilege
            } else {
                TraceError::Socket(e.to_string())
            }
        };
        // IPPROTO_RAW implies IP_HDRINCL: we write the IP header ourselves.
        let send = Socket::new(Domain::IPV4, Type::RAW, Some(Protocol::from(IPPROTO_RAW)))
            .map_err(permission)?;
        let icmp =
            Socket::new(Domain::IPV4, Type::RAW, Some(Protocol::ICMPV4)).map_err(permission)?;
        icmp.set_nonblocking(true)
            .map_err(|e| TraceError::Socket(e.to_string()))?;
        // SAFETY: the socket owns its descriptor and moves into the AsyncFd,
        // which never replaces it, so the descriptor stays open and the same
        // for the AsyncFd's whole life.
        let icmp = unsafe { AsyncFd::register_with_interest(icmp, Interest::READABLE) }
            .map_err(|e| TraceError::Socket(e.into_parts().1.to_string()))?;
        let waiters: Waiters = Arc::default();
        let receiver = tokio::spawn(receive_answers(icmp, waiters.clone()));
        Ok(Self {
            send,
            waiters,
            next_id: AtomicU16::new(rand::random()),
            receiver,
        })
    }

    /// Traces `tuple` hop by hop up to `max_hops`, trying each TTL `attempts`
    /// times for `hop_timeout`. Stops at the first TTL nothing answers (the
    /// destination's own port is open and answers nothing) or at an ICMP
    /// unreachable (the destination reached, or a router refusing).
    pub async fn trace(
        &self,
        tuple: FlowTuple,
        max_hops: u8,
        attempts: u8,
        hop_timeout: Duration,
    ) -> Result<TraceOutcome, TraceError> {
        let (SocketAddr::V4(source), SocketAddr::V4(destination)) =
            (tuple.source, tuple.destination)
        else {
            return Err(TraceError::Ipv6);
        };
        let mut outcome = TraceOutcome::default();
        for ttl in 1..=max_hops {
            let mut answer = None;
            for _ in 0..attempts.max(1) {
                answer = self
                    .probe(source, destination, ttl, hop_timeout, tuple)
                    .await?;
                if answer.is_some() {
                    break;
                }
            }
            match answer {
                Some(Answer::Expired(hop)) => outcome.hops.push(IpAddr::V4(hop)),
                Some(Answer::Unreachable(at)) => {
                    outcome.reached = at == *destination.ip();
                    if !outcome.reached {
                        outcome.hops.push(IpAddr::V4(at));
                    }
                    break;
                }
                None => break,
            }
        }
        Ok(outcome)
    }

    async fn probe(
        &self,
        source: SocketAddrV4,
        destination: SocketAddrV4,
        ttl: u8,
        timeout: Duration,
        tuple: FlowTuple,
    ) -> Result<Option<Answer>, TraceError> {
        let id = self.fresh_id();
        let (tx, rx) = oneshot::channel();
        lock(&self.waiters).insert(id, (tuple, tx));
        let datagram = build_datagram(source, destination, ttl, id);
        let sent = self.send.send_to(
            &datagram,
            &SockAddr::from(SocketAddrV4::new(*destination.ip(), 0)),
        );
        if let Err(e) = sent {
            lock(&self.waiters).remove(&id);
            return Err(TraceError::Send(e.to_string()));
        }
        let answer = tokio::time::timeout(timeout, rx)
            .await
            .ok()
            .and_then(Result::ok);
        lock(&self.waiters).remove(&id);
        Ok(answer)
    }

    /// A non-zero id no trace in flight uses (the kernel fills in id 0 itself).
    fn fresh_id(&self) -> u16 {
        let waiters = lock(&self.waiters);
        loop {
            let id = self.next_id.fetch_add(1, Ordering::Relaxed);
            if id != 0 && !waiters.contains_key(&id) {
                return id;
            }
        }
    }
}

/// An IPv4 header (DF, the given TTL and id) and a UDP header with checksum,
/// then the trace payload: the magic and the id, so a responder that receives
/// it can tell a trace from a malformed probe.
fn build_datagram(source: SocketAddrV4, destination: SocketAddrV4, ttl: u8, id: u16) -> Vec<u8> {
    let mut payload = TRACE_MAGIC.to_vec();
    payload.extend_from_slice(&id.to_be_bytes());
    let udp_len = u16::try_from(8 + payload.len()).unwrap_or(u16::MAX);
    let total = 20 + udp_len;
    let mut d = Vec::with_capacity(usize::from(total));
    d.extend_from_slice(&[0x45, 0]);
    d.extend_from_slice(&total.to_be_bytes());
    d.extend_from_slice(&id.to_be_bytes());
    d.extend_from_slice(&0x4000u16.to_be_bytes()); // DF, no fragment offset
    d.extend_from_slice(&[ttl, 17, 0, 0]); // UDP; header checksum: the kernel's
    d.extend_from_slice(&source.ip().octets());
    d.extend_from_slice(&destination.ip().octets());
    let udp_start = d.len();
    d.extend_from_slice(&source.port().to_be_bytes());
    d.extend_from_slice(&destination.port().to_be_bytes());
    d.extend_from_slice(&udp_len.to_be_bytes());
    d.extend_from_slice(&[0, 0]);
    d.extend_from_slice(&payload);
    let checksum = udp_checksum(*source.ip(), *destination.ip(), &d[udp_start..]);
    d[udp_start + 6..udp_start + 8].copy_from_slice(&checksum.to_be_bytes());
    d
}

fn udp_checksum(source: Ipv4Addr, destination: Ipv4Addr, udp: &[u8]) -> u16 {
    let mut sum: u32 = 0;
    let mut add = |bytes: &[u8]| {
        for pair in bytes.chunks(2) {
            let word = u16::from_be_bytes([pair[0], pair.get(1).copied().unwrap_or(0)]);
            sum += u32::from(word);
        }
    };
    add(&source.octets());
    add(&destination.octets());
    add(&[0, 17]);
    add(&u16::try_from(udp.len()).unwrap_or(u16::MAX).to_be_bytes());
    add(udp);
    while sum > 0xFFFF {
        sum = (sum & 0xFFFF) + (sum >> 16);
    }
    // A computed 0 is sent as all ones (RFC 768): 0 means "no checksum".
    match !(u16::try_from(sum).unwrap_or(u16::MAX)) {
        0 => 0xFFFF,
        c => c,
    }
}

/// Reads every ICMP message the host receives and hands the ones answering a
/// trace datagram to its waiter. Ends with the tracer.
async fn receive_answers(icmp: AsyncFd<Socket>, waiters: Waiters) {
    let mut buf = [0u8; 1500];
    loop {
        let Ok(mut ready) = icmp.readable().await else {
            tracing::warn!("path-trace ICMP socket failed; traces will time out");
            return;
        };
        match ready.try_io(|fd| fd.get_ref().read(&mut buf)) {
            Ok(Ok(n)) => {
                if let Some((id, answer, quoted)) = parse_icmp(&buf[..n]) {
                    let mut waiters = lock(&waiters);
                    if waiters.get(&id).is_some_and(|(t, _)| quoted.matches(t))
                        && let Some((_, tx)) = waiters.remove(&id)
                    {
                        let _ = tx.send(answer);
                    }
                }
            }
            Ok(Err(e)) => tracing::debug!(error = %e, "reading ICMP"),
            Err(_would_block) => {}
        }
    }
}

/// The addresses and ports an ICMP message quotes from the datagram it answers.
#[derive(Debug, PartialEq, Eq)]
struct Quoted {
    source: SocketAddrV4,
    destination: SocketAddrV4,
}

impl Quoted {
    fn matches(&self, t: &FlowTuple) -> bool {
        SocketAddr::V4(self.source) == t.source && SocketAddr::V4(self.destination) == t.destination
    }
}

/// An ICMP time-exceeded or unreachable message (with its IPv4 header, as raw
/// sockets deliver it) that quotes a UDP datagram: the quoted IP id, what
/// answered, and the quoted tuple. Anything else, or anything short: `None`.
fn parse_icmp(packet: &[u8]) -> Option<(u16, Answer, Quoted)> {
    let outer_len = usize::from(packet.first()? & 0x0F) * 4;
    if outer_len < 20 {
        return None;
    }
    let from = Ipv4Addr::new(
        *packet.get(12)?,
        *packet.get(13)?,
        *packet.get(14)?,
        *packet.get(15)?,
    );
    let icmp = packet.get(outer_len..)?;
    let kind = *icmp.first()?;
    let inner = icmp.get(8..)?;
    let inner_len = usize::from(inner.first()? & 0x0F) * 4;
    if inner_len < 20 || inner.get(9) != Some(&17) {
        return None;
    }
    let id = u16::from_be_bytes([*inner.get(4)?, *inner.get(5)?]);
    let addr = |at: usize| -> Option<Ipv4Addr> {
        Some(Ipv4Addr::new(
            *inner.get(at)?,
            *inner.get(at + 1)?,
            *inner.get(at + 2)?,
            *inner.get(at + 3)?,
        ))
    };
    let udp = inner.get(inner_len..inner_len + 8)?;
    let quoted = Quoted {
        source: SocketAddrV4::new(addr(12)?, u16::from_be_bytes([udp[0], udp[1]])),
        destination: SocketAddrV4::new(addr(16)?, u16::from_be_bytes([udp[2], udp[3]])),
    };
    let answer = match kind {
        ICMP_TIME_EXCEEDED => Answer::Expired(from),
        ICMP_DEST_UNREACHABLE => Answer::Unreachable(from),
        _ => return None,
    };
    Some((id, answer, quoted))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tuple() -> (SocketAddrV4, SocketAddrV4) {
        (
            "10.1.0.1:40000".parse().unwrap(),
            "10.2.0.1:9403".parse().unwrap(),
        )
    }

    /// What a router sends back: its IP header, ICMP header, the datagram's
    /// IP header and first 8 bytes.
    fn icmp_answer(kind: u8, from: Ipv4Addr, datagram: &[u8]) -> Vec<u8> {
        let mut p = vec![0x45, 0, 0, 0, 0, 0, 0, 0, 64, 1, 0, 0];
        p.extend_from_slice(&from.octets());
        p.extend_from_slice(&[10, 1, 0, 1]);
        p.extend_from_slice(&[kind, 0, 0, 0, 0, 0, 0, 0]);
        p.extend_from_slice(&datagram[..28]);
        p
    }

    #[test]
    fn a_time_exceeded_answer_is_matched_by_id_and_tuple() {
        let (s, d) = tuple();
        let datagram = build_datagram(s, d, 3, 0xBEEF);
        let router = Ipv4Addr::new(10, 9, 9, 9);
        let (id, answer, quoted) = parse_icmp(&icmp_answer(11, router, &datagram)).unwrap();
        assert_eq!(id, 0xBEEF);
        assert!(matches!(answer, Answer::Expired(a) if a == router));
        assert_eq!(
            quoted,
            Quoted {
                source: s,
                destination: d
            }
        );
        let (_, answer, _) = parse_icmp(&icmp_answer(3, *d.ip(), &datagram)).unwrap();
        assert!(matches!(answer, Answer::Unreachable(a) if a == *d.ip()));
    }

    #[test]
    fn other_icmp_and_short_or_garbage_packets_are_ignored() {
        let (s, d) = tuple();
        let datagram = build_datagram(s, d, 1, 7);
        let echo_reply = icmp_answer(0, Ipv4Addr::LOCALHOST, &datagram);
        assert!(parse_icmp(&echo_reply).is_none());
        let full = icmp_answer(11, Ipv4Addr::LOCALHOST, &datagram);
        for cut in 0..full.len() {
            assert!(parse_icmp(&full[..cut]).is_none(), "cut at {cut}");
        }
        assert!(parse_icmp(&[0xFF; 64]).is_none());
        assert!(parse_icmp(&[]).is_none());
    }

    #[test]
    fn the_datagram_carries_the_tuple_ttl_and_a_valid_udp_checksum() {
        let (s, d) = tuple();
        let datagram = build_datagram(s, d, 5, 0x1234);
        assert_eq!(datagram[8], 5, "TTL");
        assert_eq!(datagram[9], 17, "UDP");
        assert_eq!(&datagram[4..6], &[0x12, 0x34], "id");
        assert_eq!(&datagram[20..22], &40000u16.to_be_bytes());
        assert_eq!(&datagram[22..24], &9403u16.to_be_bytes());
        assert_eq!(&datagram[28..32], TRACE_MAGIC);
        // Summing the pseudo-header and datagram with the checksum in gives all ones.
        let udp = &datagram[20..];
        let mut zeroed = udp.to_vec();
        zeroed[6..8].copy_from_slice(&[0, 0]);
        let expected = udp_checksum(*s.ip(), *d.ip(), &zeroed);
        assert_eq!(u16::from_be_bytes([udp[6], udp[7]]), expected);
        assert_ne!(expected, 0);
    }
}
