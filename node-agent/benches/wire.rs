//! Hot-path costs of the prober: wire encode/decode, one pending-table probe
//! life cycle, and recording one answered probe in the window aggregator.

use std::hint::black_box;
use std::sync::Arc;

use criterion::{Criterion, criterion_group, criterion_main};
use pingmesh_agent::aggregate::{PathInfo, WindowAggregator};
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

criterion_group!(benches, wire_round_trip, pending_cycle, aggregator_answered);
criterion_main!(benches);
