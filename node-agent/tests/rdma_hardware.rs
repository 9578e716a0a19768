//! RDMA transport against a real device (an RNIC or soft-RoCE).
//!
//! Ignored by default. Run on a host with an RDMA device (see hack/softroce.sh
//! for a soft-RoCE setup on any Linux VM):
//!
//! ```text
//! PINGMESH_RDMA_DEVICE=rxe0 cargo test -p pingmesh-agent --test rdma_hardware -- --ignored
//! ```
#![cfg(all(target_os = "linux", feature = "rdma"))]
#![allow(clippy::expect_used, clippy::unwrap_used, clippy::panic)]

use std::path::Path;
use std::time::Duration;

use pingmesh_agent::probe::clock::host_now_ns;
use pingmesh_agent::probe::timing::{ProbeTimes, Stamp, classify};
use pingmesh_agent::probe::wire::{Message, MessageType};
use pingmesh_agent::transport::rdma::discovery::DEFAULT_SYSFS_ROOT;
use pingmesh_agent::transport::rdma::flow_label::flow_label;
use pingmesh_agent::transport::rdma::{
    Availability, QpRole, RdmaConfig, RdmaDest, RdmaEndpoint, RdmaEvent, discover_endpoints,
    rdma_available,
};

const GUARD: Duration = Duration::from_secs(5);

fn device() -> String {
    std::env::var("PINGMESH_RDMA_DEVICE").expect("set PINGMESH_RDMA_DEVICE to an RDMA device name")
}

fn open() -> RdmaEndpoint {
    let device = device();
    let found = discover_endpoints(
        Path::new(DEFAULT_SYSFS_ROOT),
        "hw-test",
        std::slice::from_ref(&device),
        None,
    );
    let spec = found
        .endpoints
        .into_iter()
        .next()
        .unwrap_or_else(|| panic!("no usable port on {device}: {:?}", found.skipped));
    RdmaEndpoint::open(&RdmaConfig::new(spec)).expect("open the RDMA endpoint")
}

async fn next(endpoint: &RdmaEndpoint, role: QpRole, buf: &mut [u8]) -> RdmaEvent {
    tokio::time::timeout(GUARD, endpoint.next_event(role, buf))
        .await
        .expect("an event within the guard time")
        .expect("no device error")
}

/// The NIC stamp when there is one, else the host reading (software-timed).
fn stamp_of(host_ns: u64, nic_ns: Option<u64>) -> Stamp {
    Stamp {
        host_ns,
        kernel_ns: nic_ns,
    }
}

#[test]
#[ignore = "needs an RDMA device (PINGMESH_RDMA_DEVICE)"]
fn the_named_device_is_listed() {
    let Availability::Available { devices } = rdma_available() else {
        panic!("no RDMA devices on this host");
    };
    assert!(devices.contains(&device()), "{devices:?}");
}

#[tokio::test]
#[ignore = "needs an RDMA device (PINGMESH_RDMA_DEVICE)"]
async fn a_probe_to_the_own_responder_yields_a_valid_six_timestamp_sample() {
    let endpoint = open();
    let responder = RdmaDest {
        gid: endpoint.spec().gid,
        qpn: endpoint.qpn(QpRole::Responder),
        flow_label: flow_label(0, 0),
    };
    let probe = Message::probe(0x5EED, 1);
    let mut buf = [0u8; 64];

    // Prober: T1, post.
    let t1 = host_now_ns();
    let receipt = endpoint
        .send_to(QpRole::Prober, &probe.encode(), &responder)
        .unwrap();

    // Responder: T3 from the receive, ACK1 at once, T4 from its send completion, ACK2.
    let RdmaEvent::Datagram {
        len,
        from,
        host_ns,
        nic_ns,
        ..
    } = next(&endpoint, QpRole::Responder, &mut buf).await
    else {
        panic!("the responder's first event must be the probe");
    };
    assert_eq!(Message::decode(&buf[..len]).unwrap(), probe);
    assert_eq!(from.qpn, endpoint.qpn(QpRole::Prober));
    let (t3, responder_soft) = (nic_ns.unwrap_or(host_ns), nic_ns.is_none());
    let ack1_key = endpoint
        .send_to(QpRole::Responder, &Message::ack1(&probe).encode(), &from)
        .unwrap()
        .tx_key;
    let RdmaEvent::TxTimestamp {
        key,
        host_ns,
        nic_ns,
    } = next(&endpoint, QpRole::Responder, &mut buf).await
    else {
        panic!("the responder's next event must be its ACK1 completion");
    };
    assert_eq!(key, ack1_key);
    let t4 = nic_ns.unwrap_or(host_ns);
    let ack2 = Message::ack2(&probe, t3, t4, responder_soft);
    endpoint
        .send_to(QpRole::Responder, &ack2.encode(), &from)
        .unwrap();

    // Prober: T2 (send completion), T5 (ACK1 receive), T6 (ACK2 seen).
    let (mut t2, mut t5, mut t6, mut carried) = (None, None, None, None);
    while t2.is_none() || t5.is_none() || t6.is_none() {
        match next(&endpoint, QpRole::Prober, &mut buf).await {
            RdmaEvent::TxTimestamp {
                key,
                host_ns,
                nic_ns,
            } if key == receipt.tx_key => {
                t2 = Some(stamp_of(host_ns, nic_ns));
            }
            RdmaEvent::Datagram {
                len,
                host_ns,
                nic_ns,
                ..
            } => {
                let message = Message::decode(&buf[..len]).unwrap();
                match message.kind {
                    MessageType::Ack1 => {
                        t5 = Some(stamp_of(host_ns, nic_ns));
                        // T6: the host handled ACK1's completion.
                        t6 = Some(host_ns);
                    }
                    MessageType::Ack2 => carried = Some(message),
                    MessageType::Probe => panic!("the prober received a probe"),
                }
            }
            other => panic!("prober got {other:?}"),
        }
    }
    let carried = carried.unwrap();
    let times = ProbeTimes {
        t1_host_ns: t1,
        t2: t2.unwrap(),
        t3_ns: carried.t3_ns,
        t4_ns: carried.t4_ns,
        responder_software_timed: carried.responder_software_timed(),
        t5: t5.unwrap(),
        t6_host_ns: t6.unwrap(),
    };
    let sample =
        classify(&times).unwrap_or_else(|why| panic!("invalid sample ({why:?}): {times:?}"));
    assert_eq!(sample.software_timed, !endpoint.nic_timestamps());
    assert!(sample.network_rtt_ns < 1_000_000_000, "{sample:?}");
}

#[tokio::test]
#[ignore = "needs an RDMA device (PINGMESH_RDMA_DEVICE)"]
async fn probes_on_many_flow_labels_all_arrive_and_acks_reuse_a_label() {
    let endpoint = open();
    let mut buf = [0u8; 64];
    for i in 0..16 {
        let dest = RdmaDest {
            gid: endpoint.spec().gid,
            qpn: endpoint.qpn(QpRole::Responder),
            flow_label: flow_label(i, 0),
        };
        endpoint
            .send_to(
                QpRole::Prober,
                &Message::probe(1, u64::from(i)).encode(),
                &dest,
            )
            .unwrap();
        loop {
            if let RdmaEvent::Datagram { from, .. } =
                next(&endpoint, QpRole::Responder, &mut buf).await
            {
                assert_ne!(from.flow_label, 0);
                break;
            }
        }
        // The send completion.
        next(&endpoint, QpRole::Prober, &mut buf).await;
    }
}
