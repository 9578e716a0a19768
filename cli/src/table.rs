//! The ToR-pair table `pingmesh demo` and `pingmesh status` print.

use std::fmt::Write;

use pingmesh_operator::mesh::http::MeshSummary;

/// Renders the summary: root causes first, then the ToR-pair table, then
/// the open SLA findings.
pub fn render(summary: &MeshSummary) -> String {
    let mut out = String::new();
    let window = summary
        .window_start_ms
        .map_or_else(|| "none judged yet".to_owned(), utc_time_of_day);
    let _ = writeln!(
        out,
        "window {window} ({} ms) | agents {}/{} connected | paths judged {} | excluded (target gone) {}",
        summary.window_ms,
        summary.agents_connected,
        summary.agents_registered,
        summary.paths_judged,
        summary.excluded_target_gone
    );
    if summary.root_causes.is_empty() {
        out.push_str("root causes: none\n");
    } else {
        let _ = writeln!(out, "root causes ({}):", summary.root_causes.len());
        for c in &summary.root_causes {
            let explains = match c.cause.explains.len() {
                0 => String::new(),
                n => format!(" [explains {n} finding{}]", if n == 1 { "" } else { "s" }),
            };
            let _ = writeln!(
                out,
                "  {:<8} {:<28} confidence {:.2}  {}{explains}",
                c.cause.kind.label(),
                c.cause.component,
                c.cause.confidence,
                c.cause.summary
            );
        }
    }
    let _ = writeln!(
        out,
        "{:<16} {:<16} {:>6} {:>8} {:>8} {:>8} {:>10} {:>10}",
        "SRC TOR", "DST TOR", "PATHS", "OK", "LOST", "INVALID", "P50 RTT", "P99 RTT"
    );
    for p in &summary.tor_pairs {
        let loss = p
            .loss_ratio
            .map_or_else(|| "-".to_owned(), |r| format!("{:.1}%", r * 100.0));
        let _ = writeln!(
            out,
            "{:<16} {:<16} {:>6} {:>8} {:>8} {:>8} {:>10} {:>10}  loss {loss}",
            p.source_tor,
            p.target_tor,
            p.paths,
            p.ok,
            p.lost,
            p.invalid,
            duration(p.p50_network_rtt_ns),
            duration(p.p99_network_rtt_ns),
        );
    }
    if summary.findings.is_empty() {
        out.push_str("findings: none\n");
    } else {
        let _ = writeln!(out, "findings ({}):", summary.findings.len());
        for f in &summary.findings {
            let _ = writeln!(out, "  {:?} {} — {}", f.kind, f.location, f.evidence);
        }
    }
    out
}

/// "HH:MM:SS.mmmZ" of a Unix-ms instant: enough to tell windows apart at a glance.
fn utc_time_of_day(unix_ms: u64) -> String {
    let ms_of_day = unix_ms % 86_400_000;
    let (h, m, s, ms) = (
        ms_of_day / 3_600_000,
        ms_of_day / 60_000 % 60,
        ms_of_day / 1_000 % 60,
        ms_of_day % 1_000,
    );
    format!("{h:02}:{m:02}:{s:02}.{ms:03}Z")
}

fn duration(ns: Option<u64>) -> String {
    match ns {
        None => "-".to_owned(),
        Some(ns) if ns < 1_000_000 => format!("{:.1}us", ns as f64 / 1e3),
        Some(ns) => format!("{:.2}ms", ns as f64 / 1e6),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn window_starts_print_as_utc_time_of_day() {
        // 2026-11-27T05:12:35Z
        assert_eq!(utc_time_of_day(1_795_756_355_000), "05:12:35.000Z");
    }

    #[test]
    fn durations_pick_a_readable_unit() {
        assert_eq!(duration(None), "-");
        assert_eq!(duration(Some(12_300)), "12.3us");
        assert_eq!(duration(Some(2_500_000)), "2.50ms");
    }

    #[test]
    fn an_empty_mesh_renders_a_header_and_no_findings() {
        let s = MeshSummary {
            window_start_ms: None,
            window_ms: 5000,
            agents_registered: 0,
            agents_connected: 0,
            paths_judged: 0,
            excluded_target_gone: 0,
            tor_pairs: vec![],
            root_causes: vec![],
            findings: vec![],
        };
        let text = render(&s);
        assert!(text.contains("none judged yet"));
        assert!(text.contains("findings: none"));
        assert!(text.contains("root causes: none"));
    }
}
