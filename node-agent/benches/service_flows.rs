//! What the tracer's consumer spends per ring-buffer record once it has it:
//! parsing the record and applying it to the flow table (a table already
//! holding 2,000 flows), and building the snapshot the reporter sends.
//! The owner lookup is a fixed answer here: the agent's resolver caches by
//! cgroup id, so after a container's first record it is one map lookup.
//! The kernel side (ring buffer, uprobe traps) is not measured here; see
//! docs/benchmarks.md.

use std::hint::black_box;

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use pingmesh_agent::service_flows::cgroup::PodRef;
use pingmesh_agent::service_flows::{FlowTable, Owner, Resolve, TableLimits};
use pingmesh_agent::tracer::{Origin, parse_event};

struct CachedOwner(Owner);

impl Resolve for CachedOwner {
    fn owner(&mut self, _: &Origin, _: u64) -> Owner {
        self.0.clone()
    }
    fn local_gid(&mut self, _: &str, _: u8, _: u8) -> Option<String> {
        Some("::ffff:10.0.0.1".into())
    }
}

fn header(kind: u32) -> Vec<u8> {
    let mut v = Vec::with_capacity(96);
    v.extend_from_slice(&kind.to_ne_bytes());
    v.extend_from_slice(&4242u32.to_ne_bytes());
    v.extend_from_slice(&77u64.to_ne_bytes());
    v.extend_from_slice(&1u64.to_ne_bytes());
    v.extend_from_slice(b"trainer\0\0\0\0\0\0\0\0\0");
    v
}

/// A `pm_tcp_event` record (bpf/events.h).
fn tcp_record(sock: u64, sport: u16, old: u8, new: u8) -> Vec<u8> {
    let mut v = header(1);
    v.extend_from_slice(&sock.to_ne_bytes());
    let mut s = [0u8; 16];
    s[..4].copy_from_slice(&[10, 0, 0, 1]);
    let mut d = [0u8; 16];
    d[..4].copy_from_slice(&[10, 0, 0, 2]);
    v.extend_from_slice(&s);
    v.extend_from_slice(&d);
    v.extend_from_slice(&2u16.to_ne_bytes());
    v.extend_from_slice(&sport.to_ne_bytes());
    v.extend_from_slice(&5201u16.to_ne_bytes());
    v.extend_from_slice(&[old, new]);
    v.extend_from_slice(&4_026_531_840u32.to_ne_bytes());
    v.extend_from_slice(&0u32.to_ne_bytes());
    v
}

/// A `pm_qp_rtr_event` or `pm_qp_destroy_event` record.
fn qp_record(rtr: bool, qpn: u32) -> Vec<u8> {
    let mut v = header(if rtr { 2 } else { 3 });
    v.extend_from_slice(&qpn.to_ne_bytes());
    if rtr {
        v.extend_from_slice(&0x5678u32.to_ne_bytes());
        v.extend_from_slice(&[0xfe; 16]);
        v.extend_from_slice(&0xabcdeu32.to_ne_bytes());
        v.extend_from_slice(&0u32.to_ne_bytes());
        v.extend_from_slice(&[3, 1, 0, 64]);
        v.extend_from_slice(&2u32.to_ne_bytes());
        v.extend_from_slice(b"mlx5_0\0\0\0\0\0\0\0\0\0\0");
    } else {
        v.extend_from_slice(&0u32.to_ne_bytes());
    }
    v
}

fn owner() -> CachedOwner {
    CachedOwner(Owner {
        pid: 4242,
        command: "trainer".into(),
        pod: Some(PodRef {
            pod_uid: "1b2c3d4e-5f60-7182-93a4-b5c6d7e8f901".into(),
            container_id: "ab".repeat(32),
        }),
    })
}

/// A table holding `n` TCP flows (sockets 1..=n).
fn busy_table(n: u64, resolve: &mut CachedOwner) -> FlowTable {
    let mut table = FlowTable::new(TableLimits::default());
    for sock in 1..=n {
        let port = u16::try_from(sock % 60_000).unwrap_or(1) + 1;
        let record = tcp_record(sock, port, 2, 1);
        if let Ok(event) = parse_event(&record) {
            table.apply(&event, resolve, 0);
        }
    }
    table
}

fn consume(c: &mut Criterion) {
    let mut resolve = owner();
    let mut table = busy_table(2_000, &mut resolve);
    // One TCP connection's life: ESTABLISHED, FIN_WAIT1, CLOSE.
    let tcp = [
        tcp_record(1 << 40, 40_000, 2, 1),
        tcp_record(1 << 40, 40_000, 1, 4),
        tcp_record(1 << 40, 40_000, 4, 7),
    ];
    let mut group = c.benchmark_group("service_flows");
    group.throughput(Throughput::Elements(3));
    group.bench_function("tcp_connection_3_records", |b| {
        b.iter(|| {
            for record in &tcp {
                if let Ok(event) = parse_event(black_box(record)) {
                    black_box(table.apply(&event, &mut resolve, 1));
                }
            }
        });
    });
    // One queue pair's life: RTR, destroy.
    let qp = [qp_record(true, 0x1234), qp_record(false, 0x1234)];
    group.throughput(Throughput::Elements(2));
    group.bench_function("rdma_queue_pair_2_records", |b| {
        b.iter(|| {
            for record in &qp {
                if let Ok(event) = parse_event(black_box(record)) {
                    black_box(table.apply(&event, &mut resolve, 1));
                }
            }
        });
    });
    group.finish();
}

fn snapshot(c: &mut Criterion) {
    let mut resolve = owner();
    let table = busy_table(4_096, &mut resolve);
    let mut group = c.benchmark_group("service_flows");
    group.throughput(Throughput::Elements(4_096));
    group.bench_function("snapshot_4096_flows", |b| {
        b.iter(|| black_box(table.snapshot()));
    });
    group.finish();
}

criterion_group!(benches, consume, snapshot);
criterion_main!(benches);
