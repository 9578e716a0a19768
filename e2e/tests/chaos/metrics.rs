//! Reading Prometheus expositions and /proc: the figures the chaos scenarios
//! assert on.

use std::net::SocketAddr;

use crate::common::get_text;

/// Sum of the samples of `family` (exact name, no `_bucket` suffix handling)
/// whose labels include every `(name, value)` in `labels`. 0 when none match.
pub fn sum(text: &str, family: &str, labels: &[(&str, &str)]) -> f64 {
    text.lines()
        .filter_map(|line| line.strip_prefix(family))
        .filter(|rest| rest.starts_with('{') || rest.starts_with(' '))
        .filter(|rest| {
            labels
                .iter()
                .all(|(k, v)| rest.contains(&format!("{k}=\"{v}\"")))
        })
        .filter_map(|rest| rest.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// Like [`sum`], as a whole count (counters and gauges of counts).
pub fn count(text: &str, family: &str, labels: &[(&str, &str)]) -> u64 {
    // Counts in an exposition are integers written as floats.
    #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
    let n = sum(text, family, labels).round() as u64;
    n
}

/// The /metrics page at `addr`, or an empty string when it does not answer.
pub fn scrape(addr: SocketAddr) -> String {
    get_text(addr, "/metrics").unwrap_or_default()
}

/// Resident set size of process `pid` in KiB (`VmRSS` of /proc/PID/status).
pub fn rss_kib(pid: u32) -> Option<u64> {
    proc_status_kib(pid, "VmRSS:")
}

/// Peak resident set size of process `pid` in KiB (`VmHWM`).
pub fn peak_rss_kib(pid: u32) -> Option<u64> {
    proc_status_kib(pid, "VmHWM:")
}

fn proc_status_kib(pid: u32, key: &str) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix(key))?
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

/// What an agent's report counters say, summed over the agents scraped.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct AgentReports {
    /// Summaries the controller answered for: accepted + duplicate + rejected.
    pub answered: u64,
    pub accepted: u64,
    pub duplicate: u64,
    pub rejected: u64,
    /// Summaries dropped because the report buffer was full.
    pub buffer_full: u64,
    /// Every other drop reason (`reporter_busy`, `unresolved_probes`).
    pub other_drops: u64,
    /// Targets in the pinglist in force: summaries one window produces.
    pub targets: u64,
    /// Probes ended (ok + lost + invalid).
    pub probes: u64,
}

impl AgentReports {
    pub fn of(text: &str) -> Self {
        let reports = |r| count(text, "pingmesh_window_reports_total", &[("result", r)]);
        let dropped = |r| {
            count(
                text,
                "pingmesh_window_summaries_dropped_total",
                &[("reason", r)],
            )
        };
        let (accepted, duplicate, rejected) = (
            reports("accepted"),
            reports("duplicate"),
            reports("rejected"),
        );
        Self {
            answered: accepted + duplicate + rejected,
            accepted,
            duplicate,
            rejected,
            buffer_full: dropped("buffer_full"),
            other_drops: dropped("reporter_busy") + dropped("unresolved_probes"),
            targets: count(text, "pingmesh_pinglist_targets", &[]),
            probes: count(text, "pingmesh_probes_total", &[]),
        }
    }
}

/// The controller's summary counters.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ControllerSummaries {
    pub accepted: u64,
    pub duplicate: u64,
    /// Every rejection reason together.
    pub rejected: u64,
}

impl ControllerSummaries {
    pub fn of(text: &str) -> Self {
        const FAMILY: &str = "pingmesh_controller_window_summaries_total";
        let accepted = count(text, FAMILY, &[("result", "accepted")]);
        let duplicate = count(text, FAMILY, &[("result", "duplicate")]);
        Self {
            accepted,
            duplicate,
            rejected: count(text, FAMILY, &[]) - accepted - duplicate,
        }
    }
}

/// What the controller did with summaries for windows it had judged already
/// (`pingmesh_controller_late_summaries_total`, docs/protocol.md#windows).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct LateSummaries {
    pub accepted: u64,
    pub judged: u64,
    /// Refused: their source was judged in the window already.
    pub duplicate: u64,
    pub too_old: u64,
}

impl LateSummaries {
    pub fn of(text: &str) -> Self {
        const FAMILY: &str = "pingmesh_controller_late_summaries_total";
        let outcome = |o: &str| count(text, FAMILY, &[("outcome", o)]);
        Self {
            accepted: outcome("accepted"),
            judged: outcome("judged"),
            duplicate: outcome("duplicate"),
            too_old: outcome("too_old"),
        }
    }

    /// Buffered summaries refused: delivered but never analysed.
    pub fn refused(&self) -> u64 {
        self.duplicate + self.too_old
    }
}

/// Every `result` of the controller's summary counter with a non-zero count.
pub fn summary_results(text: &str) -> Vec<(String, u64)> {
    const FAMILY: &str = "pingmesh_controller_window_summaries_total{";
    text.lines()
        .filter_map(|l| l.strip_prefix(FAMILY))
        .filter_map(|rest| {
            let result = rest.split("result=\"").nth(1)?.split('"').next()?;
            let n: f64 = rest.rsplit(' ').next()?.parse().ok()?;
            #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
            let n = n.round() as u64;
            (n > 0).then(|| (result.to_owned(), n))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    const TEXT: &str = "# HELP x y\n\
        pingmesh_window_reports_total{node=\"a\",result=\"accepted\"} 7\n\
        pingmesh_window_reports_total{node=\"a\",result=\"rejected\"} 2\n\
        pingmesh_window_reports_total_extra{result=\"accepted\"} 100\n\
        pingmesh_pinglist_targets{kind=\"tor_mesh\",node=\"a\"} 3\n\
        pingmesh_pinglist_targets{kind=\"inter_tor\",node=\"a\"} 1\n";

    #[test]
    fn sums_only_the_named_family_and_matching_labels() {
        assert_eq!(
            count(
                TEXT,
                "pingmesh_window_reports_total",
                &[("result", "accepted")]
            ),
            7
        );
        assert_eq!(count(TEXT, "pingmesh_window_reports_total", &[]), 9);
        assert_eq!(count(TEXT, "pingmesh_pinglist_targets", &[]), 4);
        assert_eq!(count(TEXT, "pingmesh_absent", &[]), 0);
    }
}
