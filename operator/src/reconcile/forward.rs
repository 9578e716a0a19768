//! A standby replica's agent port: every connection is passed, byte for byte,
//! to the leader's gRPC address (published on the leader Lease).
//!
//! Why standbys take agents at all: the Service sends agents to every ready
//! operator pod, and a standby has to count as ready, or a Deployment with
//! more than one replica would never finish a rollout (only one pod could
//! ever be ready) and its old leader could never be replaced under
//! `maxUnavailable: 0`. Forwarding keeps agents on the leader whichever pod
//! they reach. Without a known leader address a connection is closed, and the
//! agent tries again, as it does whenever the controller is away.

use std::net::SocketAddr;
use std::time::Duration;

use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

/// How long connecting to the leader may take before the agent's connection is dropped.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);
/// Pause after a failed accept: errors such as EMFILE (out of file
/// descriptors) come back at once until something changes, and retrying
/// without a pause would spin a core.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);

/// Accepts on `listener` and forwards each connection to the address in
/// `leader` at the time it arrives, until `cancel`; then closes the listener
/// and every forwarded connection (this replica is about to serve itself).
pub async fn forward_to_leader(
    listener: TcpListener,
    leader: watch::Receiver<Option<SocketAddr>>,
    cancel: CancellationToken,
) {
    forward_accepted(|| listener.accept(), leader, cancel).await;
}

/// [`forward_to_leader`] with `accept` in place of the listener's.
async fn forward_accepted<A, F>(
    mut accept: A,
    leader: watch::Receiver<Option<SocketAddr>>,
    cancel: CancellationToken,
) where
    A: FnMut() -> F,
    F: Future<Output = std::io::Result<(TcpStream, SocketAddr)>>,
{
    let mut connections = JoinSet::new();
    loop {
        let accepted = tokio::select! {
            () = cancel.cancelled() => break,
            accepted = accept() => accepted,
            // Reap finished connections so the set does not grow.
            Some(_) = connections.join_next(), if !connections.is_empty() => continue,
        };
        let (inbound, peer) = match accepted {
            Ok(accepted) => accepted,
            Err(e) => {
                tracing::warn!(error = %e, pause = ?ACCEPT_BACKOFF, "accepting an agent connection failed");
                tokio::select! {
                    () = cancel.cancelled() => break,
                    () = tokio::time::sleep(ACCEPT_BACKOFF) => {}
                }
                continue;
            }
        };
        let Some(target) = *leader.borrow() else {
            tracing::debug!(%peer, "no leader address known; closing the agent connection");
            continue;
        };
        connections.spawn(pipe(inbound, peer, target));
    }
    connections.abort_all();
}

async fn pipe(mut inbound: TcpStream, peer: SocketAddr, target: SocketAddr) {
    let mut outbound = match tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(target)).await
    {
        Ok(Ok(stream)) => stream,
        Ok(Err(e)) => {
            tracing::debug!(%peer, %target, error = %e, "connecting to the leader failed");
            return;
        }
        Err(_) => {
            tracing::debug!(%peer, %target, "connecting to the leader timed out");
            return;
        }
    };
    let _ = inbound.set_nodelay(true);
    let _ = outbound.set_nodelay(true);
    if let Err(e) = tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await {
        tracing::debug!(%peer, %target, error = %e, "forwarded agent connection ended");
    }
}

#[cfg(test)]
mod tests {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    use super::*;

    async fn listener() -> (TcpListener, SocketAddr) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        (listener, addr)
    }

    #[tokio::test]
    async fn connections_reach_the_leader_and_end_when_this_replica_takes_over() {
        let (leader, leader_addr) = listener().await;
        let echo = tokio::spawn(async move {
            let (mut socket, _) = leader.accept().await.unwrap();
            let mut buf = [0u8; 5];
            socket.read_exact(&mut buf).await.unwrap();
            socket.write_all(&buf).await.unwrap();
            // Keep the connection open until the other side goes.
            let _ = socket.read(&mut buf).await;
        });
        let (front, front_addr) = listener().await;
        let (_tx, rx) = watch::channel(Some(leader_addr));
        let cancel = CancellationToken::new();
        let forwarder = tokio::spawn(forward_to_leader(front, rx, cancel.clone()));

        let mut agent = TcpStream::connect(front_addr).await.unwrap();
        agent.write_all(b"hello").await.unwrap();
        let mut answer = [0u8; 5];
        agent.read_exact(&mut answer).await.unwrap();
        assert_eq!(&answer, b"hello");

        cancel.cancel();
        forwarder.await.unwrap();
        // The forwarded connection is closed, and nothing listens any more.
        let mut rest = Vec::new();
        let read = tokio::time::timeout(Duration::from_secs(5), agent.read_to_end(&mut rest)).await;
        assert!(matches!(read, Ok(Ok(0) | Err(_))), "{read:?}");
        assert!(TcpStream::connect(front_addr).await.is_err());
        echo.await.unwrap();
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn accept_errors_are_retried_after_a_pause_not_in_a_tight_loop() {
        use std::sync::Arc;
        use std::sync::atomic::{AtomicUsize, Ordering};

        let tries = Arc::new(AtomicUsize::new(0));
        let counted = tries.clone();
        // Fails at once every time, as accept does when out of file descriptors.
        let accept = move || {
            counted.fetch_add(1, Ordering::Relaxed);
            std::future::ready(Err(std::io::Error::from_raw_os_error(24)))
        };
        let (_tx, rx) = watch::channel(None);
        let cancel = CancellationToken::new();
        let forwarder = tokio::spawn(forward_accepted(accept, rx, cancel.clone()));
        tokio::time::sleep(Duration::from_millis(350)).await;
        cancel.cancel();
        tokio::time::timeout(Duration::from_secs(5), forwarder)
            .await
            .unwrap()
            .unwrap();
        // About one try per 100 ms pause (a slow machine only makes it fewer).
        let tries = tries.load(Ordering::Relaxed);
        assert!((1..=6).contains(&tries), "{tries} accepts in 350 ms");
    }

    #[tokio::test]
    async fn without_a_leader_address_connections_are_closed() {
        let (front, front_addr) = listener().await;
        let (_tx, rx) = watch::channel(None);
        let cancel = CancellationToken::new();
        let forwarder = tokio::spawn(forward_to_leader(front, rx, cancel.clone()));
        let mut agent = TcpStream::connect(front_addr).await.unwrap();
        let mut rest = Vec::new();
        let read = tokio::time::timeout(Duration::from_secs(5), agent.read_to_end(&mut rest)).await;
        assert!(matches!(read, Ok(Ok(0) | Err(_))), "{read:?}");
        cancel.cancel();
        forwarder.await.unwrap();
    }
}
