//! The localization simulator: the real localizer on synthetic windows of a
//! rail-optimized Clos fabric with random faults of every kind, single and
//! several at once, at loss rates from 0.1 % to 100 %, over background noise.
//! Prints precision, recall and windows-to-localize per fault kind, then the
//! time to localize one window of about 100,000 endpoints.
//!
//! Run: `cargo bench -p pingmesh-operator --bench localize`
//! (`PINGMESH_SIM_TRIALS=N` trials per cell, default 8, 0 for the timing
//! only; `PINGMESH_SIM_SEED`; `PINGMESH_SIM_VERBOSE=1` prints every wrong cause).
//! Results and what they mean: docs/localization.md.
#![allow(
    clippy::expect_used,
    clippy::cast_precision_loss,
    clippy::cast_possible_truncation,
    reason = "a benchmark binary over constant inputs"
)]

use std::hash::{Hash, Hasher};
use std::time::{Duration, Instant};

use pingmesh_operator::mesh::analyzer::PathStats;
use pingmesh_operator::mesh::localize::sim::{
    Fabric, FabricSpec, Fault, host_name, spine_name, tor_name,
};
use pingmesh_operator::mesh::localize::{
    CauseKind, EndpointTable, HORIZON_WINDOWS, HostDelayRules, LocalizeSettings, NetworkHorizon,
    PathRow, PathTraces, RootCause, RowEvidence, TraceBook, WindowEvidence, localize,
    localize_rows, rows_of,
};
use pingmesh_operator::mesh::traces::TraceSettings;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

/// Windows localization looks at together (the analyzer's `LOCALIZE_WINDOWS`).
const WINDOWS_TOGETHER: usize = 3;
/// A fault not localized within this many windows counts as missed...
const MAX_WINDOWS: usize = 5;
/// ...or this many for link and switch faults below 10 % loss, which the
/// horizon of traced flows names only once enough of their flows failed.
const MAX_WINDOWS_WEAK_NETWORK: usize = 30;
/// Windows of the clean-fabric check per trial.
const CLEAN_WINDOWS: usize = 20;
const LOSS_RATES: [f64; 6] = [0.001, 0.01, 0.03, 0.1, 0.3, 1.0];

fn settings() -> LocalizeSettings {
    LocalizeSettings {
        max_loss_ratio: 0.01,
        host_delay: HostDelayRules::default(),
    }
}

/// 32 spines, 16 groups of 32 hosts with 8 RNICs, each RNIC on its rail's ToR:
/// 128 ToRs, 512 hosts, 4,096 endpoints; default pinglist rates over a 5 s window.
fn accuracy_fabric() -> FabricSpec {
    FabricSpec {
        spines: 32,
        groups: 16,
        hosts_per_group: 32,
        rnics_per_host: 8,
        rail_optimized: true,
        tor_mesh_probes: 50,
        inter_tor_probes: 5,
        inter_tor_sample_tors: 5,
        inter_tor_flows: 64,
        background_loss: 1e-4,
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Endpoint,
    EndpointSendOnly,
    Host,
    Tor,
    Downlink,
    Uplink,
    Spine,
}

const KINDS: [Kind; 7] = [
    Kind::Endpoint,
    Kind::EndpointSendOnly,
    Kind::Host,
    Kind::Tor,
    Kind::Downlink,
    Kind::Uplink,
    Kind::Spine,
];

impl Kind {
    fn label(self) -> &'static str {
        match self {
            Self::Endpoint => "endpoint (RNIC)",
            Self::EndpointSendOnly => "endpoint, send side",
            Self::Host => "host",
            Self::Tor => "ToR",
            Self::Downlink => "link spine->ToR",
            Self::Uplink => "link ToR->spine",
            Self::Spine => "spine switch",
        }
    }

    fn random(self, spec: &FabricSpec, loss: f64, rng: &mut StdRng) -> Fault {
        let spine = rng.random_range(0..spec.spines);
        let tor = rng.random_range(0..spec.tors());
        match self {
            Self::Endpoint | Self::EndpointSendOnly => Fault::Endpoint {
                endpoint: rng.random_range(0..spec.endpoints()),
                send: true,
                receive: self == Self::Endpoint,
                loss,
            },
            Self::Host => Fault::Host {
                host: rng.random_range(0..spec.hosts()),
                loss,
            },
            Self::Tor => Fault::Tor { tor, loss },
            Self::Downlink => Fault::Downlink { spine, tor, loss },
            Self::Uplink => Fault::Uplink { tor, spine, loss },
            Self::Spine => Fault::Spine { spine, loss },
        }
    }
}

/// Whether `cause` names `fault` exactly, or (`coarse`) as precisely as
/// paths without traces can.
fn names(cause: &RootCause, fault: &Fault, fabric: &Fabric, coarse: bool) -> bool {
    let c = (cause.kind, cause.component.as_str());
    match *fault {
        Fault::Endpoint { endpoint, .. } => {
            c == (
                CauseKind::Endpoint,
                &fabric.endpoint_names[endpoint as usize],
            )
        }
        Fault::Host { host, .. } => c == (CauseKind::Host, &host_name(host)),
        Fault::Tor { tor, .. } => c == (CauseKind::Tor, &tor_name(tor)),
        Fault::Downlink { spine, tor, .. } if !coarse => {
            c == (
                CauseKind::Link,
                &format!("{} -> {}", spine_name(spine), tor_name(tor)),
            )
        }
        Fault::Uplink { tor, spine, .. } if !coarse => {
            c == (
                CauseKind::Link,
                &format!("{} -> {}", tor_name(tor), spine_name(spine)),
            )
        }
        Fault::Downlink { tor, .. } | Fault::Uplink { tor, .. } => {
            c == (
                CauseKind::Link,
                &format!("spine layer <-> {}", tor_name(tor)),
            )
        }
        Fault::Spine { spine, .. } if !coarse => c == (CauseKind::Switch, &spine_name(spine)),
        Fault::Spine { .. } => c == (CauseKind::Switch, "spine layer"),
    }
}

/// Outcome of one trial.
#[derive(Debug, Default, Clone, Copy)]
struct Trial {
    /// Faults named within `MAX_WINDOWS` windows.
    found: usize,
    faults: usize,
    /// Window (1-based) by which every fault was named.
    windows: Option<usize>,
    true_causes: usize,
    false_causes: usize,
}

/// Windows a trial gets before its faults count as missed.
fn allowance(faults: &[Fault]) -> usize {
    let weak_network = faults.iter().any(|f| match *f {
        Fault::Downlink { loss, .. } | Fault::Uplink { loss, .. } | Fault::Spine { loss, .. } => {
            (0.01..0.1).contains(&loss)
        }
        _ => false,
    });
    if weak_network {
        MAX_WINDOWS_WEAK_NETWORK
    } else {
        MAX_WINDOWS
    }
}

/// One trial of `windows` windows (0: the fault's [`allowance`]).
fn run_trial(fabric: &Fabric, faults: &[Fault], traced: bool, seed: u64, windows: usize) -> Trial {
    let windows = if windows == 0 {
        allowance(faults)
    } else {
        windows
    };
    let mut history: Vec<Vec<PathStats>> = Vec::new();
    let mut trial = Trial {
        faults: faults.len(),
        ..Trial::default()
    };
    let mut named = vec![false; faults.len()];
    // As the controller does: traces are kept once taken, and the analyzer
    // keeps one horizon.
    let mut book = TraceBook::default();
    let horizon = NetworkHorizon::new();
    for w in 0..windows {
        let (paths, window_traces) =
            fabric.window(faults, seed.wrapping_mul(31).wrapping_add(w as u64), 0.01);
        history.push(paths);
        if history.len() > WINDOWS_TOGETHER {
            history.remove(0);
        }
        if traced {
            book.merge(window_traces);
        }
        let windows: Vec<&[PathStats]> = history.iter().map(Vec::as_slice).collect();
        let node_of = |e: &str| fabric.node_of_name.get(e).map(String::as_str);
        let causes = localize(
            &WindowEvidence {
                windows: &windows,
                node_of: &node_of,
                traces: traced.then_some(&book as &dyn PathTraces),
                findings: &[],
                horizon: Some(&horizon),
            },
            &settings(),
        );
        for c in &causes {
            let mut hit = false;
            for (i, f) in faults.iter().enumerate() {
                if names(c, f, fabric, !traced) {
                    named[i] = true;
                    hit = true;
                }
            }
            if hit {
                trial.true_causes += 1;
            } else {
                trial.false_causes += 1;
                if std::env::var_os("PINGMESH_SIM_VERBOSE").is_some() {
                    println!(
                        "  wrong: {faults:?} -> {} {} ({})",
                        c.kind.label(),
                        c.component,
                        c.summary
                    );
                }
            }
        }
        if named.iter().all(|&n| n) {
            trial.windows = Some(w + 1);
            break;
        }
    }
    trial.found = named.iter().filter(|&&n| n).count();
    trial
}

#[derive(Debug, Default)]
struct Cell {
    trials: usize,
    faults: usize,
    found: usize,
    true_causes: usize,
    false_causes: usize,
    windows: Vec<usize>,
}

impl Cell {
    fn add(&mut self, t: Trial) {
        self.trials += 1;
        self.faults += t.faults;
        self.found += t.found;
        self.true_causes += t.true_causes;
        self.false_causes += t.false_causes;
        self.windows.extend(t.windows);
    }

    fn row(&self, label: &str, loss: &str) -> String {
        let precision = if self.true_causes + self.false_causes == 0 {
            "-".to_owned()
        } else {
            format!(
                "{:.1}%",
                100.0 * self.true_causes as f64 / (self.true_causes + self.false_causes) as f64
            )
        };
        let mut w = self.windows.clone();
        w.sort_unstable();
        let median = w
            .get(w.len() / 2)
            .map_or("-".to_owned(), ToString::to_string);
        let worst = w.last().map_or("-".to_owned(), ToString::to_string);
        format!(
            "| {label:<22} | {loss:>6} | {:>6} | {:>9} | {:>7.1}% | {median:>6} | {worst:>5} |",
            self.trials,
            precision,
            100.0 * self.found as f64 / self.faults.max(1) as f64,
        )
    }
}

fn header() {
    println!("| fault                  |   loss | trials | precision |  recall | median | worst |");
    println!("|------------------------|-------:|-------:|----------:|--------:|-------:|------:|");
}

fn pct(loss: f64) -> String {
    if loss < 0.01 {
        format!("{:.1}%", loss * 100.0)
    } else {
        format!("{:.0}%", loss * 100.0)
    }
}

fn main() {
    // `cargo bench` passes `--bench`; `cargo test --benches` runs it with no
    // argument: then only a smoke run on a small fabric.
    let benching = std::env::args().any(|a| a == "--bench");
    let trials: usize = std::env::var("PINGMESH_SIM_TRIALS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(if benching { 8 } else { 1 });
    let seed: u64 = std::env::var("PINGMESH_SIM_SEED")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(42);
    let spec = if benching {
        accuracy_fabric()
    } else {
        FabricSpec {
            groups: 2,
            hosts_per_group: 8,
            spines: 4,
            ..accuracy_fabric()
        }
    };
    let fabric = Fabric::new(spec.clone(), seed);
    println!(
        "fabric: {} spines, {} ToRs, {} hosts x {} RNICs = {} endpoints (rail-optimized), {} paths per window; \
         {} probes per ToR-mesh path and {} per inter-ToR path a window over {} flows; background loss {:.2}% per probe; \
         localization over {WINDOWS_TOGETHER} windows with a horizon of {HORIZON_WINDOWS} for traced flows, \
         a fault missed after {MAX_WINDOWS} windows ({MAX_WINDOWS_WEAK_NETWORK} for links and spines at 1-9 % loss)",
        spec.spines,
        spec.tors(),
        spec.hosts(),
        spec.rnics_per_host,
        spec.endpoints(),
        fabric.pinglist.len(),
        spec.tor_mesh_probes,
        spec.inter_tor_probes,
        spec.inter_tor_flows,
        spec.background_loss * 100.0,
    );
    let mut rng = StdRng::seed_from_u64(seed);
    let started = Instant::now();
    if trials == 0 {
        // PINGMESH_SIM_TRIALS=0: the timing only.
        if benching {
            time_large_window(seed);
        }
        return;
    }

    clean_check(&fabric, trials, &mut rng);

    println!("\nSingle faults, flows traced:");
    header();
    for kind in KINDS {
        for loss in LOSS_RATES {
            let mut cell = Cell::default();
            for _ in 0..trials {
                let fault = kind.random(&spec, loss, &mut rng);
                cell.add(run_trial(&fabric, &[fault], true, rng.random(), 0));
            }
            println!("{}", cell.row(kind.label(), &pct(loss)));
        }
    }

    println!("\nNetwork faults without traces (named as the links of a ToR, or the spine layer):");
    header();
    for kind in [Kind::Downlink, Kind::Spine] {
        for loss in [0.01, 0.1, 0.3, 1.0] {
            let mut cell = Cell::default();
            for _ in 0..trials {
                let fault = kind.random(&spec, loss, &mut rng);
                cell.add(run_trial(&fabric, &[fault], false, rng.random(), 0));
            }
            println!("{}", cell.row(kind.label(), &pct(loss)));
        }
    }

    println!("\nSeveral faults at once (kinds drawn at random), flows traced:");
    header();
    for n in [2, 3] {
        for loss in [0.03, 0.3, 1.0] {
            let mut cell = Cell::default();
            for _ in 0..trials {
                let faults: Vec<Fault> = (0..n)
                    .map(|_| {
                        let kind = KINDS[rng.random_range(0..KINDS.len())];
                        kind.random(&spec, loss, &mut rng)
                    })
                    .collect();
                cell.add(run_trial(&fabric, &faults, true, rng.random(), 0));
            }
            println!("{}", cell.row(&format!("{n} at once"), &pct(loss)));
        }
    }
    println!("\nsimulated in {:.0?}", started.elapsed());

    if benching {
        time_large_window(seed);
    }
}

/// Root causes blamed on a clean fabric over `trials` runs of `CLEAN_WINDOWS`.
fn clean_check(fabric: &Fabric, trials: usize, rng: &mut StdRng) {
    println!("\nClean fabric ({} windows):", trials * CLEAN_WINDOWS);
    let mut clean = Cell::default();
    for _ in 0..trials {
        clean.add(run_trial(fabric, &[], true, rng.random(), CLEAN_WINDOWS));
    }
    println!(
        "  root causes blamed on a clean fabric: {} in {} windows",
        clean.false_causes,
        trials * CLEAN_WINDOWS
    );
}

/// The windows' rows with their endpoints numbered in one table, and the
/// time that took.
fn number_windows(
    fabric: &Fabric,
    windows: &[(Vec<PathStats>, TraceBook)],
) -> (EndpointTable, Vec<Vec<PathRow>>, Duration) {
    let node_of = |e: &str| fabric.node_of_name.get(e).map(String::as_str);
    let mut table = EndpointTable::new();
    let started = Instant::now();
    let rows = windows
        .iter()
        .map(|(p, _)| rows_of(p, &mut table, &node_of))
        .collect();
    (table, rows, started.elapsed())
}

/// Time to localize one window of about 100,000 endpoints (median of 3);
/// `PINGMESH_SIM_GROUPS` makes the fabric smaller or larger (391 groups of 8
/// ToRs: 100,096 endpoints), for profiling.
fn time_large_window(seed: u64) {
    let groups = std::env::var("PINGMESH_SIM_GROUPS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(391);
    let spec = FabricSpec {
        groups,
        ..accuracy_fabric()
    };
    let fabric = Fabric::new(spec.clone(), seed);
    let faults = [
        Fault::Host {
            host: 17,
            loss: 1.0,
        },
        Fault::Tor {
            tor: 101,
            loss: 0.2,
        },
        Fault::Downlink {
            spine: 3,
            tor: 2000,
            loss: 0.3,
        },
    ];
    let mut windows: Vec<(Vec<PathStats>, TraceBook)> = (0..3)
        .map(|w| fabric.window(&faults, seed + w, 0.01))
        .collect();
    let mut book = TraceBook::default();
    for (_, t) in &mut windows {
        book.merge(std::mem::take(t));
    }
    // The analyzer numbers endpoints as it judges a window and keeps the
    // rows: localization starts from rows. Numbering these windows from
    // their `PathStats` is timed apart, as what the analyzer no longer
    // repeats per localization.
    let (table, rows, numbering) = number_windows(&fabric, &windows);
    let paths = &windows[2].0;
    println!(
        "\nLocalizing at scale: {} endpoints, {} ToRs, {} paths a window, {} traced flows in 3 windows, 3 faults",
        spec.endpoints(),
        spec.tors(),
        paths.len(),
        book.len()
    );
    println!("| windows together | traced flows | causes | median time |");
    println!("|-----------------:|-------------:|-------:|------------:|");
    let untraced = TraceBook::default();
    let configurations = [(1, false), (1, true), (3, false), (3, true)];
    for (together, traced) in configurations {
        let traces = if traced { &book } else { &untraced };
        time_localizing(&table, &rows, traces, together, false);
    }
    // The analyzer's configuration: three windows, traces, and the horizon
    // taking in the newest window's flows (the two before it went in
    // first, untimed).
    time_localizing(&table, &rows, &book, 3, true);
    // Every inter-ToR flow traced is far beyond what a controller keeps:
    // `traces.maxTracedFlows` (200,000 by default) caps its book. The same
    // windows with a book of that size, flows kept at random.
    let cap = TraceSettings::default().max_traced_flows;
    let share = (f64::from(cap) / book.len().max(1) as f64).min(1.0);
    book.retain_flows(|source, target, flow| {
        let mut h = std::hash::DefaultHasher::new();
        (source, target, flow, seed).hash(&mut h);
        (h.finish() % 1_000_000) as f64 <= share * 1e6
    });
    for (together, with_horizon) in [(1, false), (3, false), (3, true)] {
        time_localizing(&table, &rows, &book, together, with_horizon);
    }
    println!(
        "(numbering the three windows' endpoints from their path statistics here: {:.0} ms; the \
         analyzer numbers endpoints inside judging instead, where it looks every path end up anyway)",
        numbering.as_secs_f64() * 1e3
    );
}

/// Times `localize_rows` on the newest of `rows` with `together` windows
/// (median of 3) and prints a table row.
fn time_localizing(
    table: &EndpointTable,
    rows: &[Vec<PathRow>],
    book: &TraceBook,
    together: usize,
    with_horizon: bool,
) {
    let traces = (!book.is_empty()).then_some(book as &dyn PathTraces);
    let run = |newest: usize, horizon: Option<&NetworkHorizon>| {
        let first = (newest + 1).saturating_sub(together);
        let slices: Vec<&[PathRow]> = rows[first..=newest].iter().map(Vec::as_slice).collect();
        localize_rows(
            &RowEvidence {
                windows: &slices,
                table,
                traces,
                findings: &[],
                horizon,
            },
            &settings(),
        )
    };
    let newest = rows.len() - 1;
    let mut times: Vec<Duration> = Vec::new();
    let mut found = 0;
    for _ in 0..3 {
        let horizon = NetworkHorizon::new();
        let horizon = with_horizon.then_some(&horizon);
        if horizon.is_some() {
            for earlier in 0..newest {
                run(earlier, horizon);
            }
        }
        let started = Instant::now();
        let causes = run(newest, horizon);
        times.push(started.elapsed());
        found = causes.len();
    }
    times.sort_unstable();
    println!(
        "| {:>16} | {:>12} | {found:>6} | {:>9.0} ms |",
        if with_horizon {
            format!("{together} + horizon")
        } else {
            together.to_string()
        },
        book.len(),
        times[1].as_secs_f64() * 1e3
    );
}
