//! CPU-side cost of one RDMA probe without hardware: building the message,
//! an address-handle cache hit, and posting plus matching completions through
//! the engine over the recording fake verbs layer (recording off). The device's
//! own costs (doorbell, DMA, `ibv_poll_cq`) are not in these numbers.

use std::hint::black_box;

use criterion::{Criterion, criterion_group, criterion_main};
use pingmesh_agent::probe::wire::Message;
use pingmesh_agent::transport::rdma::ah_cache::{AhCache, AhKey};
use pingmesh_agent::transport::rdma::clock::NicClock;
use pingmesh_agent::transport::rdma::engine::{Engine, EngineConfig};
use pingmesh_agent::transport::rdma::flow_label::flow_label;
use pingmesh_agent::transport::rdma::verbs::RecordingVerbs;
use pingmesh_agent::transport::rdma::{Gid, QpRole, RdmaDest, RdmaEvent};

fn packet_build(c: &mut Criterion) {
    let mut seq = 0u64;
    c.bench_function("rdma/probe_build_with_flow_label", |b| {
        b.iter(|| {
            seq += 1;
            let label = flow_label(black_box(u32::try_from(seq % 64).unwrap_or(0)), 0);
            (Message::probe(0xDEAD_BEEF, black_box(seq)).encode(), label)
        });
    });
}

fn ah_cache_hit(c: &mut Criterion) {
    // A busy prober: 64 targets x 64 flow labels cached.
    let mut cache: AhCache<u32> = AhCache::new(4_096);
    let key = |t: u8, l: u32| AhKey {
        gid: Gid::from_ipv4([10, 0, 0, t]),
        flow_label: flow_label(l, 0),
        traffic_class: 0,
        service_level: 0,
    };
    for t in 0..64 {
        for l in 0..64 {
            let _ = cache.get_or_create(&key(t, l), |_| Ok::<_, ()>(l));
        }
    }
    let wanted = key(17, 33);
    c.bench_function("rdma/ah_cache_hit", |b| {
        b.iter(|| {
            cache
                .get_or_create(black_box(&wanted), |_| Err(()))
                .map(|l| *l.handle)
        });
    });
}

fn engine(gid: Gid) -> Engine<RecordingVerbs> {
    let mut verbs = RecordingVerbs::new(gid);
    verbs.recording = false;
    let config = EngineConfig {
        local_gid: gid,
        traffic_class: 0,
        service_level: 0,
        ah_cache_capacity: 4_096,
    };
    let Ok(engine) = Engine::new(verbs, config, NicClock::new(1_000_000, u64::MAX)) else {
        unreachable!("the fake device cannot fail to start")
    };
    engine
}

fn send_and_match_completion(c: &mut Criterion) {
    let mut e = engine(Gid::from_ipv4([10, 0, 0, 7]));
    let remote = RdmaDest {
        gid: Gid::from_ipv4([10, 0, 0, 9]),
        qpn: 0x999,
        flow_label: flow_label(3, 0),
    };
    let payload = Message::probe(1, 2).encode();
    let mut buf = [0u8; 64];
    c.bench_function("rdma/post_send_and_match_send_completion", |b| {
        b.iter(|| {
            let receipt = e.send(QpRole::Prober, black_box(&payload), &remote);
            let event = e.next_ready(QpRole::Prober, &mut buf);
            (
                receipt.is_ok(),
                matches!(event, Ok(Some(RdmaEvent::TxTimestamp { .. }))),
            )
        });
    });
}

fn loopback_probe(c: &mut Criterion) {
    let gid = Gid::from_ipv4([10, 0, 0, 7]);
    let mut e = engine(gid);
    let responder = RdmaDest {
        gid,
        qpn: e.verbs().qpns[QpRole::Responder.index()],
        flow_label: flow_label(3, 0),
    };
    let payload = Message::probe(1, 2).encode();
    let mut buf = [0u8; 64];
    c.bench_function("rdma/probe_send_receive_parse_grh_repost", |b| {
        b.iter(|| {
            let _ = e.send(QpRole::Prober, black_box(&payload), &responder);
            let received = e.next_ready(QpRole::Responder, &mut buf);
            let completed = e.next_ready(QpRole::Prober, &mut buf);
            (received.is_ok(), completed.is_ok())
        });
    });
}

criterion_group!(
    benches,
    packet_build,
    ah_cache_hit,
    send_and_match_completion,
    loopback_probe
);
criterion_main!(benches);
