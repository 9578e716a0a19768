//! Hot-path costs of the prober: wire encode/decode (plain, and signed and
//! verified with a probe key), one pending-table probe life cycle, and
//! recording one answered probe in the window aggregator.

use std::hint::black_box;
use std::sync::Arc;

use criterion::{Criterion, criterion_group, criterion_main};
use pingmesh_agent::aggregate::{PathInfo, WindowAggregator};
use pingmesh_agent::probe::auth::{ProbeKeyRing, seal, verify};
use pingmesh_agent::probe::pending::PendingTable;
use pingmesh_agent::probe::timing::{Sample, Stamp};
use pingmesh_agent::probe::wire::Message;

fn wire_round_trip(c: &mut Criterion) {
    let probe = Message::probe(0xDEAD_BEEF_CAFE, 1);
    let ack2 = Message::ack2(&probe, 1_000_000, 1_000_300, false);
    c.bench_function("wire/encode_decode_ack2", |b| {
        b.iter(|| {
            let bytes = black_box(&ack2).encode();
            Message::decode(black_box(&bytes))
        });
    });
}

/// What probe authentication adds per message: signing on the way out,
/// verifying on the way in. The sender and the receiver each pay one side.
fn authenticated(c: &mut Criterion) {
    let probe = Message::probe(0xDEAD_BEEF_CAFE, 1);
    let ack2 = Message::ack2(&probe, 1_000_000, 1_000_300, false);
    let ring = ProbeKeyRing::off();
    let master = b"0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";
    ring.update(Some(&pingmesh_proto::probe_auth::keys_around(
        master, 490_000,
    )))
    .unwrap_or_else(|e| unreachable!("valid keys: {e}"));
    let keys = ring.keys();
    // Every tag covers the responder's endpoint id as well as the message.
    let responder = "node-2/udp0";
    let sealed = seal(keys.as_deref(), &ack2, responder);
    c.bench_function("wire/encode_ack2_plain", |b| {
        b.iter(|| seal(None, black_box(&ack2), responder));
    });
    c.bench_function("wire/encode_sign_ack2", |b| {
        b.iter(|| seal(black_box(keys.as_deref()), black_box(&ack2), responder));
    });
    c.bench_function("wire/decode_ack2_plain", |b| {
        let plain = ack2.encode();
        b.iter(|| {
            let bytes = black_box(&plain[..]);
            Message::decode(bytes).map(|m| (m, verify(None, bytes, responder)))
        });
    });
    c.bench_function("wire/decode_verify_ack2", |b| {
        b.iter(|| {
            let bytes = black_box(sealed.as_bytes());
            Message::decode(bytes)
                .map(|m| (m, verify(black_box(keys.as_deref()), bytes, responder)))
        });
    });
    // What the prober and responder do per message: take the keys in force
    // from the shared ring (a read lock and a reference count), then sign.
    c.bench_function("wire/ring_keys_encode_sign_ack2", |b| {
        b.iter(|| {
            seal(
                black_box(&ring).keys().as_deref(),
                black_box(&ack2),
                responder,
            )
        });
    });
}

fn pending_cycle(c: &mut Criterion) {
    // Sized like a busy prober: many probes in flight around the measured one.
    let mut table: PendingTable<u32> = PendingTable::new(8_192);
    for seq in 0..1_000u64 {
        let _ = table.insert(seq, 0, 0, 0, 1, u64::MAX, true);
    }
    let mut seq = 1_000_000u64;
    c.bench_function("pending/insert_sent_ack1_ack2_tx", |b| {
        b.iter(|| {
            seq += 1;
            let s = black_box(seq);
            let _ = table.insert(s, 7, 3, 10_000, 100, s, true);
            let _ = table.on_sent(s, 200);
            let _ = table.on_ack1(
                s,
                Stamp {
                    host_ns: 4_000,
                    kernel_ns: Some(3_900),
                },
            );
            let _ = table.on_ack2(s, 9_000, 9_300, false);
            table.on_tx_timestamp(s, 150)
        });
    });
}

fn aggregator_answered(c: &mut Criterion) {
    let path = Arc::new(PathInfo {
        source_endpoint: "node-a/udp0".into(),
        target_endpoint: "node-b/udp0".into(),
        target_node: "node-b".into(),
        kind: 1,
    });
    let mut agg = WindowAggregator::new(5_000, 512);
    let sample = Sample {
        network_rtt_ns: 12_345,
        prober_delay_ns: 2_000,
        responder_delay_ns: 900,
        software_timed: false,
    };
    // Answers count only against sent probes, so each iteration sends one too.
    // The window never finishes here: after the first 512 samples this measures
    // the binned regime of a busy path.
    c.bench_function("aggregate/on_sent_on_answered", |b| {
        b.iter(|| {
            agg.on_sent(10_000, black_box(&path), 0);
            agg.on_answered(10_000, black_box(&path), Ok(black_box(sample)));
        });
    });
}

criterion_group!(
    benches,
    wire_round_trip,
    authenticated,
    pending_cycle,
    aggregator_answered
);
criterion_main!(benches);
