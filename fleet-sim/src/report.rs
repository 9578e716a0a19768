//! The table the simulator prints, the series budget, and what `--check` fails on.

use std::fmt::Write as _;
use std::time::Duration;

use crate::fleet::FleetShape;
use crate::run::{Options, Outcome, Propagation};

/// Controller series that do not grow with the fleet (docs/metrics.md,
/// "Series budget"): its own families, the service families at the default
/// `metricsTopServices`, the path-trace and window-processing families.
pub const FIXED_SERIES_BUDGET: usize = 300;

/// Series per probed ToR pair: loss ratio, p99 RTT, probes by result (3).
const SERIES_PER_TOR_PAIR: usize = 5;

#[derive(Debug, Clone, Copy)]
pub struct Budget {
    pub sample_tors: usize,
    pub fixed: usize,
}

impl Budget {
    /// ToR pairs a window can probe: each ToR with itself and its sampled
    /// ToRs, twice as many sampled ToRs in the window a rotation falls in
    /// (agents probe the old sample until their new list arrives, the new
    /// one after), and never more than every other ToR.
    pub fn tor_pairs(&self, shape: &FleetShape) -> usize {
        let tors = shape.tors();
        tors * (1 + self
            .sample_tors
            .saturating_mul(2)
            .min(tors.saturating_sub(1)))
    }

    pub fn series(&self, shape: &FleetShape) -> usize {
        SERIES_PER_TOR_PAIR * self.tor_pairs(shape) + self.fixed
    }
}

fn ms(d: Duration) -> String {
    format!("{:.1}", d.as_secs_f64() * 1e3)
}

fn secs(d: Option<Duration>) -> String {
    d.map_or_else(|| "—".into(), |d| format!("{:.2}", d.as_secs_f64()))
}

fn pct(x: Option<f64>) -> String {
    x.map_or_else(|| "—".into(), |x| format!("{:.1} %", x * 100.0))
}

fn mib(b: Option<u64>) -> String {
    b.map_or_else(|| "—".into(), |b| format!("{:.1}", b as f64 / 1_048_576.0))
}

fn quantile(sorted: &[Duration], q: f64) -> Option<Duration> {
    if sorted.is_empty() {
        return None;
    }
    #[allow(
        clippy::cast_possible_truncation,
        clippy::cast_sign_loss,
        reason = "an index below the slice length"
    )]
    let i = ((sorted.len() as f64 - 1.0) * q).round() as usize;
    sorted.get(i).copied()
}

fn propagation(p: Option<&Propagation>) -> String {
    match p {
        None => "not measured".into(),
        Some(p) => format!(
            "{} agents, p50 {} ms, max {} ms",
            p.agents,
            p.p50.map_or_else(|| "—".into(), ms),
            p.max.map_or_else(|| "—".into(), ms)
        ),
    }
}

fn window_total(out: &Outcome) -> Option<f64> {
    let all: Vec<f64> = out.phases.iter().filter_map(|p| p.1).collect();
    (!all.is_empty()).then(|| all.iter().sum())
}

/// The measurement table (Markdown).
pub fn table(shape: &FleetShape, options: &Options, out: &Outcome, budget: &Budget) -> String {
    let mut t = String::new();
    let window_s = f64::from(options.window_ms) / 1e3;
    let mut row = |k: &str, v: String| {
        let _ = writeln!(t, "| {k} | {v} |");
    };
    row("measure", "value".into());
    row("---", "---".into());
    row(
        "fleet",
        format!(
            "{} nodes × {} endpoints = {} endpoints, {} ToRs, {} paths per window",
            shape.nodes,
            shape.endpoints_per_node,
            shape.endpoints(),
            shape.tors(),
            out.paths_per_window
        ),
    );
    row("cold start: every agent connected (s)", secs(out.join));
    row(
        &format!("controller CPU over {} windows (one core)", options.windows),
        pct(out.steady_cpu),
    );
    row(
        "simulator CPU over the same windows (one core)",
        pct(out.simulator_cpu),
    );
    row(
        "controller RSS / peak (MiB)",
        format!("{} / {}", mib(out.rss_bytes), mib(out.peak_rss_bytes)),
    );
    row(
        "windows judged while measured",
        format!("{}", out.windows_judged),
    );
    for (phase, mean) in &out.phases {
        row(
            &format!("window processing: {phase} (ms, mean per window)"),
            mean.map_or_else(|| "—".into(), |m| format!("{:.1}", m * 1e3)),
        );
    }
    row(
        "window processing: total, share of the window",
        window_total(out).map_or_else(
            || "—".into(),
            |s| format!("{:.1} ms, {:.1} %", s * 1e3, s / window_s * 100.0),
        ),
    );
    let per_window = out.summaries_accepted as f64 / f64::from(options.windows);
    row("summaries accepted per window", format!("{per_window:.0}"));
    let mut lat = out.report_latency.clone();
    lat.sort();
    row(
        "ReportWindows latency p50 / p99 / max (ms)",
        format!(
            "{} / {} / {} ({} calls)",
            quantile(&lat, 0.5).map_or_else(|| "—".into(), ms),
            quantile(&lat, 0.99).map_or_else(|| "—".into(), ms),
            lat.last().copied().map_or_else(|| "—".into(), ms),
            lat.len()
        ),
    );
    t.push_str(&change_rows(shape, out, budget));
    t
}

/// Rows of the membership change, the restart, the series budget and errors.
fn change_rows(shape: &FleetShape, out: &Outcome, budget: &Budget) -> String {
    let mut t = String::new();
    let mut row = |k: &str, v: String| {
        let _ = writeln!(t, "| {k} | {v} |");
    };
    row(
        "pinglist push after a node joins (from its Register)",
        propagation(out.membership_join.as_ref()),
    );
    row(
        "pinglist push after it leaves (from its stream closing)",
        propagation(out.membership_leave.as_ref()),
    );
    row(
        "restart: controller serving again (s)",
        secs(out.restart_ready),
    );
    row(
        "restart: every agent reconnected (s, from the new process)",
        secs(out.reconnect),
    );
    row(
        "restart: last pinglist pushed (s, settled)",
        secs(out.reconnect_settled),
    );
    row(
        "restart: controller CPU while reconnecting",
        pct(out.reconnect_cpu),
    );
    row(
        "restart: controller peak RSS (MiB)",
        mib(out.reconnect_peak_rss_bytes),
    );
    let series = out.after.series;
    let limit = budget.series(shape);
    row(
        "/metrics series (ToR-pair series) vs budget",
        format!(
            "{series} ({}) vs {limit} = 5 × {} ToR pairs + {}: {}",
            out.after.tor_pair_series,
            budget.tor_pairs(shape),
            budget.fixed,
            if series <= limit { "within" } else { "OVER" }
        ),
    );
    row(
        "root causes localized (last judged window)",
        format!("{}", out.after.root_causes_localized),
    );
    row("path traces answered", format!("{}", out.traces_run));
    row(
        "agent errors / failed reports (failures include the restart's)",
        format!("{} / {}", out.agent_error_count, out.report_failures),
    );
    row(
        "controller error log lines",
        format!("{}", out.controller_errors.len()),
    );
    t
}

/// One CSV line with its header, for collecting runs into a plot.
pub fn csv(shape: &FleetShape, out: &Outcome, budget: &Budget) -> String {
    let f = |x: Option<f64>| x.map_or_else(String::new, |x| format!("{x:.4}"));
    let d = |x: Option<Duration>| f(x.map(|d| d.as_secs_f64()));
    let phase = |name: &str| f(out.phases.iter().find(|p| p.0 == name).and_then(|p| p.1));
    let mut lat = out.report_latency.clone();
    lat.sort();
    format!(
        "endpoints,nodes,paths,cpu,rss_mib,ingest_s,evaluate_s,publish_s,report_p99_s,join_push_max_s,reconnect_s,settled_s,series,budget\n\
         {},{},{},{},{},{},{},{},{},{},{},{},{},{}",
        shape.endpoints(),
        shape.nodes,
        out.paths_per_window,
        f(out.steady_cpu),
        f(out.rss_bytes.map(|b| b as f64 / 1_048_576.0)),
        phase("ingest"),
        phase("evaluate"),
        phase("publish"),
        d(quantile(&lat, 0.99)),
        d(out.membership_join.as_ref().and_then(|p| p.max)),
        d(out.reconnect),
        d(out.reconnect_settled),
        out.after.series,
        budget.series(shape),
    )
}

/// What `--check` fails on; empty when the run was clean.
pub fn problems(
    shape: &FleetShape,
    options: &Options,
    out: &Outcome,
    budget: &Budget,
) -> Vec<String> {
    let mut p = Vec::new();
    if let Some(status) = &out.controller_exited {
        p.push(format!("the controller exited on its own: {status}"));
    }
    for line in out.controller_errors.iter().take(5) {
        p.push(format!("controller error: {line}"));
    }
    if out.windows_judged < f64::from(options.windows) {
        p.push(format!(
            "{} windows judged while {} were measured",
            out.windows_judged, options.windows
        ));
    }
    // Window boundaries fall between scrapes: one window's worth of slack.
    let expected = (f64::from(options.windows) - 1.0).max(1.0) * out.paths_per_window as f64;
    if out.paths_per_window == 0 || (out.summaries_accepted as f64) < expected * 0.9 {
        p.push(format!(
            "{} summaries accepted, expected at least {expected:.0}: windows judged without data",
            out.summaries_accepted
        ));
    }
    if out.after.summaries_rejected > 0.0 {
        p.push(format!(
            "the controller rejected {} summaries",
            out.after.summaries_rejected
        ));
    }
    let limit = budget.series(shape);
    if out.after.series > limit {
        p.push(format!(
            "/metrics has {} series, over the budget of {limit}",
            out.after.series
        ));
    }
    if out.restart_exit_ok == Some(false) {
        p.push("the controller did not exit cleanly on SIGTERM".into());
    }
    if options.restart && out.restart_ready.is_some() && out.reconnect.is_none() {
        p.push("the fleet did not reconnect after the restart".into());
    }
    if out.agent_error_count > 0 {
        p.push(format!(
            "{} agent errors, first: {}",
            out.agent_error_count,
            out.agent_errors.first().cloned().unwrap_or_default()
        ));
    }
    p
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fleet::{Faults, test_shape};

    fn shape(nodes: usize) -> FleetShape {
        test_shape(
            nodes,
            Faults {
                endpoints: 0,
                endpoint_loss: 0.0,
                tors: 0,
                tor_loss: 0.0,
                links: 0,
            },
        )
    }

    #[test]
    fn the_budget_holds_both_samples_of_a_rotation_window_and_no_more_than_every_tor() {
        let budget = Budget {
            sample_tors: 5,
            fixed: 300,
        };
        // 2,500 nodes: 632 ToRs (rail-optimized), each with itself and up to
        // 2 × 5 sampled ToRs.
        assert_eq!(budget.tor_pairs(&shape(2_500)), 632 * 11);
        assert_eq!(budget.series(&shape(2_500)), 5 * 632 * 11 + 300);
        // 64 nodes: 16 ToRs, so at most the 15 others.
        let wide = Budget {
            sample_tors: 10,
            fixed: 300,
        };
        assert_eq!(wide.tor_pairs(&shape(64)), 16 * 16);
    }
}
