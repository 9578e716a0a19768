//! Mesh controller hot paths at fleet scale.
//!
//! Targets: one pinglist request at 100,000 endpoints under 1 ms; one node's
//! join applied to the view of 100,000 endpoints far below a full build; analyzer ingest
//! at least 1,000,000 summaries per second on one core; evaluating a window of
//! 10,000 paths well inside a 5 s window. Analyzer windows are built from real
//! pinglists, so paths share ToR pairs as they would in a fleet.
//!
//! Run: `cargo bench -p pingmesh-operator --bench mesh -- --warm-up-time 1 --measurement-time 3`
#![allow(
    clippy::expect_used,
    reason = "benchmark setup with constant, known-good inputs"
)]

use std::collections::HashMap;
use std::hint::black_box;

use criterion::{BatchSize, BenchmarkId, Criterion, Throughput, criterion_group};
use pingmesh_operator::mesh::analyzer::{Analyzer, EndpointPlacement, SlaPolicy};
use pingmesh_operator::mesh::pinglist::{MeshView, PinglistPolicy};
use pingmesh_operator::mesh::types::MeshEndpoint;
use pingmesh_proto::{ladder, v1};

const TORS: usize = 3_000;
const ENDPOINTS: usize = 100_000;
const WINDOW_MS: u32 = 5_000;
const WINDOW_START_MS: u64 = 1_700_000_000_000;
const NOW_MS: u64 = WINDOW_START_MS + 6_000;

fn node_name(i: usize) -> String {
    format!("gpu-node-{i:06}")
}

fn tor_name(i: usize) -> String {
    format!("rack-{:04}-tor", i % TORS)
}

/// 100,000 single-endpoint nodes spread over 3,000 ToRs (33 or 34 each).
fn fleet() -> Vec<MeshEndpoint> {
    (0..ENDPOINTS)
        .map(|i| MeshEndpoint {
            id: format!("{}/mlx5_0", node_name(i)),
            node: node_name(i),
            tor: tor_name(i),
            transport: v1::Transport::Rdma.into(),
            address: format!("::ffff:10.{}.{}.{}", i >> 16, (i >> 8) & 255, i & 255),
            qpn: u32::try_from(i).unwrap_or(0),
            device: "mlx5_0".to_owned(),
            tor_from_agent: false,
        })
        .collect()
}

fn bench_pinglist(c: &mut Criterion) {
    let endpoints = fleet();
    let mut group = c.benchmark_group("pinglist");
    group.bench_function("mesh_view_new_100k_endpoints", |b| {
        b.iter_batched(|| endpoints.clone(), MeshView::new, BatchSize::LargeInput);
    });
    // One node (re)joining: only its ToR is rebuilt (the reconnect storm's
    // cost per change, against the full build above).
    let base = MeshView::new(endpoints.clone());
    let mut joins = 0usize;
    group.bench_function("mesh_view_updated_one_node_100k_endpoints", |b| {
        b.iter(|| {
            joins = (joins + 1) % ENDPOINTS;
            let e = endpoints[joins].clone();
            let changed = HashMap::from([(e.node.clone(), vec![e])]);
            black_box(base.updated(changed))
        });
    });
    let view = MeshView::new(endpoints);
    let policy = PinglistPolicy::default();
    let nodes: Vec<String> = (0..ENDPOINTS).step_by(97).map(node_name).collect();
    let mut next = 0usize;
    group.throughput(Throughput::Elements(1));
    group.bench_function("pinglist_for_at_100k_endpoints", |b| {
        b.iter(|| {
            next = (next + 1) % nodes.len();
            let epoch = next as u64;
            black_box(view.pinglist_for(&nodes[next], &policy, epoch))
        });
    });
    group.finish();
}

/// A realistic summary: 50 answered probes around 20 us spread over a few buckets.
fn summary(target: &v1::PingTarget) -> v1::WindowSummary {
    let mut histogram = ladder::Histogram::default();
    for k in 0..50u64 {
        histogram.record(18_000 + k * 150);
    }
    let (buckets, counts) = histogram.to_sparse();
    v1::WindowSummary {
        window_start_ms: WINDOW_START_MS,
        window_ms: WINDOW_MS,
        source_endpoint: target.source_endpoint.clone(),
        target_endpoint: target
            .target
            .as_ref()
            .map(|t| t.id.clone())
            .unwrap_or_default(),
        kind: target.kind,
        sent: 50,
        ok: 50,
        lost: 0,
        invalid: 0,
        software_timed: 0,
        network_rtt: Some(v1::DelayStats {
            min_ns: 18_000,
            p50_ns: 21_700,
            p99_ns: 25_350,
            max_ns: 25_350,
        }),
        prober_delay: None,
        responder_delay: None,
        network_rtt_histogram: Some(v1::LadderHistogram { buckets, counts }),
        lost_flows_mask: 0,
        probed_flows_mask: 0,
    }
}

/// One window's summaries as the fleet's agents would send them: the pinglists
/// of nodes spread over all ToRs (ToR mesh plus inter-ToR), cut at `paths`.
fn window_of(view: &MeshView, paths: usize) -> Vec<v1::WindowSummary> {
    let policy = PinglistPolicy::default();
    (0..ENDPOINTS)
        .flat_map(|i| view.pinglist_for(&node_name(i), &policy, 0))
        .take(paths)
        .map(|t| summary(&t))
        .collect()
}

fn fresh_analyzer() -> Analyzer {
    Analyzer::new(SlaPolicy::default(), WINDOW_MS).expect("the default SLA is valid")
}

fn bench_ingest(c: &mut Criterion) {
    const BATCH: usize = 100_000;
    let summaries = window_of(&MeshView::new(fleet()), BATCH);
    let mut group = c.benchmark_group("analyzer");
    group.throughput(Throughput::Elements(BATCH as u64));
    group.bench_function("ingest_100k_summaries", |b| {
        b.iter_batched(
            || (fresh_analyzer(), summaries.clone()),
            |(mut analyzer, batch)| {
                for s in batch {
                    let _ = black_box(analyzer.ingest(s, NOW_MS));
                }
                analyzer
            },
            BatchSize::LargeInput,
        );
    });
    group.finish();
}

/// Where every endpoint of the bench fleet sits, for the analyzer's topology.
fn fleet_placements() -> HashMap<String, EndpointPlacement> {
    (0..ENDPOINTS)
        .map(|i| {
            let placement = EndpointPlacement {
                node: node_name(i),
                tor: tor_name(i),
            };
            (format!("{}/mlx5_0", node_name(i)), placement)
        })
        .collect()
}

fn bench_evaluate(c: &mut Criterion) {
    let placements = fleet_placements();
    let topology = |id: &str| placements.get(id).cloned();
    let present = |_: &str, _: u64| true;
    let view = MeshView::new(fleet());
    let mut group = c.benchmark_group("analyzer");
    for paths in [10_000usize, 100_000] {
        let summaries = window_of(&view, paths);
        group.throughput(Throughput::Elements(paths as u64));
        group.bench_with_input(
            BenchmarkId::new("evaluate_window", paths),
            &summaries,
            |b, summaries| {
                b.iter_batched(
                    || {
                        let mut analyzer = fresh_analyzer();
                        for s in summaries.iter().cloned() {
                            let _ = analyzer.ingest(s, NOW_MS);
                        }
                        analyzer
                    },
                    |mut analyzer| {
                        let report = analyzer.evaluate(WINDOW_START_MS, &topology, &present);
                        (analyzer, report)
                    },
                    BatchSize::LargeInput,
                );
            },
        );
    }
    group.finish();
}

/// Judges `windows` consecutive windows of `paths` paths each, once, outside
/// criterion: a fixed amount of work whose instructions callgrind can count
/// (`--toggle-collect='*Analyzer::evaluate*'` leaves the setup out). From the
/// third window on, localization looks at three windows, as in a fleet.
fn evaluate_once(paths: usize, windows: u64) {
    let placements = fleet_placements();
    let topology = |id: &str| placements.get(id).cloned();
    let present = |_: &str, _: u64| true;
    let summaries = window_of(&MeshView::new(fleet()), paths);
    let mut analyzer = fresh_analyzer();
    let mut judged = 0usize;
    for w in 0..windows {
        let start = WINDOW_START_MS + w * u64::from(WINDOW_MS);
        for mut s in summaries.iter().cloned() {
            s.window_start_ms = start;
            let _ = analyzer.ingest(s, start + 6_000);
        }
        let report = analyzer
            .evaluate(start, &topology, &present)
            .expect("windows are judged in order");
        judged += report.paths.len();
    }
    println!("evaluated {windows} windows of {paths} paths ({judged} paths judged)");
}

criterion_group!(benches, bench_pinglist, bench_ingest, bench_evaluate);

/// `PINGMESH_EVALUATE_ONCE=<paths>[x<windows>]` runs [`evaluate_once`]
/// instead of the benchmarks, e.g. under
/// `valgrind --tool=callgrind --toggle-collect='*Analyzer::evaluate*'`.
fn main() {
    if let Ok(spec) = std::env::var("PINGMESH_EVALUATE_ONCE") {
        let (paths, windows) = spec.split_once('x').unwrap_or((spec.as_str(), "3"));
        let paths = paths.parse().expect("PINGMESH_EVALUATE_ONCE: paths");
        let windows = windows.parse().expect("PINGMESH_EVALUATE_ONCE: windows");
        evaluate_once(paths, windows);
        return;
    }
    benches();
    Criterion::default().configure_from_args().final_summary();
}
