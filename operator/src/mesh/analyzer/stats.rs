//! Per-path and per-ToR-pair statistics of one window, and their SLA judgement.
//!
//! Loss is lost / (ok + lost), computed only where that denominator is non-zero.
//! Invalid samples (answered, but with timestamps that make no sense) are counted
//! on their own and are never loss: they say the prober or responder host
//! misbehaved, not that the network dropped a packet.

use std::collections::HashMap;

use pingmesh_proto::{ladder, v1};
use serde::{Deserialize, Serialize};

use super::policy::SlaPolicy;
use super::window::{FastHash, PathKey, PathRecord, WindowData};
use crate::mesh::localize::{EndpointTable, PathRow};

/// Where an endpoint sits, as the controller's registry knows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EndpointPlacement {
    pub node: String,
    pub tor: String,
}

/// Which pinglist entry a path came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum ProbeKind {
    Unspecified,
    TorMesh,
    InterTor,
    Service,
}

impl ProbeKind {
    /// Unknown wire values (from newer agents) read as unspecified.
    pub fn from_wire(kind: i32) -> Self {
        match v1::TargetKind::try_from(kind) {
            Ok(v1::TargetKind::TorMesh) => Self::TorMesh,
            Ok(v1::TargetKind::InterTor) => Self::InterTor,
            Ok(v1::TargetKind::Service) => Self::Service,
            _ => Self::Unspecified,
        }
    }
}

/// The SLA verdict on one aspect (loss or latency) of one window.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum Judgement {
    /// Too few probes to judge.
    NotJudged,
    Met,
    Violated,
}

/// One path's window.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PathStats {
    pub source_endpoint: String,
    pub target_endpoint: String,
    pub source_tor: String,
    pub target_tor: String,
    pub kind: ProbeKind,
    pub ok: u64,
    pub lost: u64,
    pub invalid: u64,
    pub software_timed: u64,
    /// lost / (ok + lost); absent when nothing was answered or lost.
    pub loss_ratio: Option<f64>,
    /// The agent's exact percentiles of network RTT.
    pub p50_network_rtt_ns: Option<u64>,
    pub p99_network_rtt_ns: Option<u64>,
    /// Bit i: a probe on flow i was lost.
    pub lost_flows_mask: u64,
    /// Bit i: a probe was sent on flow i (0 from agents that do not say).
    #[serde(default)]
    pub probed_flows_mask: u64,
    /// p99 of the prober's and the responder's host delay (six-timestamp split).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prober_p99_ns: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub responder_p99_ns: Option<u64>,
    pub loss: Judgement,
    pub latency: Judgement,
}

/// All judged paths from one ToR to another (or within one ToR) in one window.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct TorPairStats {
    pub source_tor: String,
    pub target_tor: String,
    /// Paths merged into this pair.
    pub paths: u64,
    pub ok: u64,
    pub lost: u64,
    pub invalid: u64,
    pub loss_ratio: Option<f64>,
    /// Upper bounds of the ladder buckets holding the percentiles of the merged
    /// histograms: at most 12.5 % above the truth, never below it.
    pub p50_network_rtt_ns: Option<u64>,
    pub p99_network_rtt_ns: Option<u64>,
    pub loss: Judgement,
    pub latency: Judgement,
}

/// lost / (ok + lost), or `None` when that is 0 / 0.
pub fn loss_ratio(ok: u64, lost: u64) -> Option<f64> {
    let probes = ok.saturating_add(lost);
    (probes > 0).then(|| lost as f64 / probes as f64)
}

fn judge_loss(sla: &SlaPolicy, ok: u64, lost: u64) -> Judgement {
    match loss_ratio(ok, lost) {
        Some(ratio) if ok.saturating_add(lost) >= sla.min_probes => {
            if ratio > sla.max_loss_ratio {
                Judgement::Violated
            } else {
                Judgement::Met
            }
        }
        _ => Judgement::NotJudged,
    }
}

/// Latency needs `min_probes` answered probes: the p99 of a handful of samples
/// is just their maximum.
fn judge_latency(sla: &SlaPolicy, ok: u64, p99_ns: Option<u64>) -> Judgement {
    match p99_ns {
        Some(p99) if ok >= sla.min_probes => {
            if p99 > sla.max_p99_network_rtt_ns {
                Judgement::Violated
            } else {
                Judgement::Met
            }
        }
        _ => Judgement::NotJudged,
    }
}

/// A window's statistics, with what was left out and why.
#[derive(Debug, Default)]
pub(super) struct WindowStats {
    pub paths: Vec<PathStats>,
    /// `paths` as localization reads them, in the same order, their ends
    /// numbered in the table `collect` was given.
    pub rows: Vec<PathRow>,
    pub tor_pairs: Vec<TorPairStats>,
    /// Endpoints seen that the topology places (at least those on `rows`).
    pub placed_endpoints: usize,
    pub excluded_target_gone: u64,
    pub excluded_unplaced: u64,
}

/// What one window knows of an endpoint, looked up once however many paths
/// it is on.
#[derive(Debug, Clone, Copy)]
struct EndpointInfo {
    /// The table's ToR number; `None`: the topology does not know the endpoint.
    tor: Option<u32>,
    /// Its agent was present for the whole window.
    present: bool,
}

/// Endpoints of one window, numbered in a table that outlives the window:
/// each endpoint id is hashed once per path end, its placement and presence
/// looked up once per window, and everything after works on small integers.
struct PlacementCache<'a> {
    topology: &'a dyn Fn(&str) -> Option<EndpointPlacement>,
    target_present: &'a dyn Fn(&str, u64) -> bool,
    window_start_ms: u64,
    table: &'a mut EndpointTable,
    /// By table number; `None`: not seen this window yet.
    info: Vec<Option<EndpointInfo>>,
    /// Endpoints seen this window that the topology places: every end of a
    /// row is one, so this bounds the endpoints on the window's rows.
    placed: usize,
}

impl PlacementCache<'_> {
    /// The endpoint's number, looking it up on its first sight this window
    /// (placed by the topology's latest word).
    fn intern(&mut self, endpoint: &str) -> (u32, EndpointInfo) {
        if let Some(e) = self.table.get(endpoint)
            && let Some(&Some(info)) = self.info.get(e as usize)
        {
            return (e, info);
        }
        let present = (self.target_present)(endpoint, self.window_start_ms);
        let placement = (self.topology)(endpoint);
        let e = self.table.intern_placed(
            endpoint,
            placement
                .as_ref()
                .map(|p| (p.node.as_str(), p.tor.as_str())),
        );
        let tor = placement.is_some().then(|| self.table.tor_of(e));
        let info = EndpointInfo { tor, present };
        let at = e as usize;
        if at >= self.info.len() {
            self.info.resize(at + 1, None);
        }
        self.info[at] = Some(info);
        if tor.is_some() {
            self.placed += 1;
        }
        (e, info)
    }
}

/// Merged ToR-pair data while a window is being collected.
#[derive(Debug, Default)]
struct PairAccumulator {
    paths: u64,
    ok: u64,
    lost: u64,
    invalid: u64,
    histogram: ladder::Histogram,
}

/// Turns a window's summaries into statistics. Paths whose target was not present
/// for the whole window are left out (a vanished responder is not a network
/// fault), as are paths with an endpoint the topology does not know.
/// Endpoints are numbered, and placed, in `table`.
pub(super) fn collect(
    data: WindowData,
    window_start_ms: u64,
    sla: &SlaPolicy,
    topology: &dyn Fn(&str) -> Option<EndpointPlacement>,
    target_present: &dyn Fn(&str, u64) -> bool,
    table: &mut EndpointTable,
) -> WindowStats {
    let info = Vec::with_capacity(table.len());
    let mut cache = PlacementCache {
        topology,
        target_present,
        window_start_ms,
        table,
        info,
        placed: 0,
    };
    let mut stats = WindowStats::default();
    let mut pairs: HashMap<(u32, u32), PairAccumulator, FastHash> = HashMap::default();
    // Each kept path, and its row.
    let mut kept: Vec<Option<PathStats>> = Vec::with_capacity(data.paths.len());
    let mut rows: Vec<PathRow> = Vec::with_capacity(data.paths.len());
    for ((source, target), record) in data.paths {
        let (t, target_info) = cache.intern(&target);
        if !target_info.present {
            stats.excluded_target_gone += 1;
            continue;
        }
        let (s, source_info) = cache.intern(&source);
        let (Some(source_tor), Some(target_tor)) = (source_info.tor, target_info.tor) else {
            stats.excluded_unplaced += 1;
            continue;
        };
        let pair = pairs.entry((source_tor, target_tor)).or_default();
        pair.paths += 1;
        pair.ok = pair.ok.saturating_add(record.ok);
        pair.lost = pair.lost.saturating_add(record.lost);
        pair.invalid = pair.invalid.saturating_add(record.invalid);
        // Checked at ingest; a failure here would only mean a lost histogram.
        if pair
            .histogram
            .merge_sparse(&record.histogram_buckets, &record.histogram_counts)
            .is_err()
        {
            tracing::debug!(%source, %target, "skipping a histogram that no longer merges");
        }
        let names = (
            cache.table.tor_name(source_tor).to_owned(),
            cache.table.tor_name(target_tor).to_owned(),
        );
        let path = path_stats((source, target), names, &record, sla);
        rows.push(PathRow::of(&path, s, t));
        kept.push(Some(path));
    }
    stats.placed_endpoints = cache.placed;
    let table = cache.table;
    stats.tor_pairs = pairs
        .into_iter()
        .map(|((s, t), acc)| {
            let name = |i: u32| table.tor_name(i).to_owned();
            pair_stats(name(s), name(t), &acc, sla)
        })
        .collect();
    let rank = table.ranks();
    // (source, target) is unique per window, so ranks order paths exactly as
    // their ids would. Sorting small (key, index) pairs and moving each path
    // once is far cheaper than sorting the paths themselves.
    let mut order: Vec<(u64, usize)> = rows
        .iter()
        .enumerate()
        .map(|(i, r)| {
            let key =
                (u64::from(rank[r.source as usize]) << 32) | u64::from(rank[r.target as usize]);
            (key, i)
        })
        .collect();
    order.sort_unstable_by_key(|&(key, _)| key);
    stats.paths = order.iter().filter_map(|&(_, i)| kept[i].take()).collect();
    stats.rows = order.iter().map(|&(_, i)| rows[i]).collect();
    stats.tor_pairs.sort_unstable_by(|a, b| {
        (&a.source_tor, &a.target_tor).cmp(&(&b.source_tor, &b.target_tor))
    });
    stats
}

fn path_stats(
    (source_endpoint, target_endpoint): PathKey,
    (source_tor, target_tor): (String, String),
    r: &PathRecord,
    sla: &SlaPolicy,
) -> PathStats {
    let (p50, p99) = if r.ok == 0 {
        (None, None)
    } else if r.p99_ns.is_some() {
        (r.p50_ns, r.p99_ns)
    } else {
        // No exact stats sent: fall back to the histogram's bucket bounds.
        sparse_quantiles(&r.histogram_buckets, &r.histogram_counts)
    };
    PathStats {
        source_endpoint,
        target_endpoint,
        source_tor,
        target_tor,
        kind: r.kind,
        ok: r.ok,
        lost: r.lost,
        invalid: r.invalid,
        software_timed: r.software_timed,
        loss_ratio: loss_ratio(r.ok, r.lost),
        p50_network_rtt_ns: p50,
        p99_network_rtt_ns: p99,
        lost_flows_mask: r.lost_flows_mask,
        probed_flows_mask: r.probed_flows_mask,
        prober_p99_ns: r.prober_p99_ns,
        responder_p99_ns: r.responder_p99_ns,
        loss: judge_loss(sla, r.ok, r.lost),
        latency: judge_latency(sla, r.ok, p99),
    }
}

/// p50 and p99 upper bounds of a sparse ladder histogram (checked at
/// ingest), as `ladder::Histogram::quantile_upper_ns` gives them, without
/// expanding it into a dense one per path.
fn sparse_quantiles(buckets: &[u32], counts: &[u64]) -> (Option<u64>, Option<u64>) {
    // Agents send buckets in ascending order: then nothing is copied or sorted.
    if buckets.is_sorted() {
        return sorted_quantiles(&buckets.iter().copied().zip(counts.iter().copied()));
    }
    let mut sorted: Vec<(u32, u64)> = buckets
        .iter()
        .copied()
        .zip(counts.iter().copied())
        .collect();
    sorted.sort_unstable_by_key(|&(b, _)| b);
    sorted_quantiles(&sorted.into_iter())
}

/// p50 and p99 upper bounds of (bucket, count) pairs in bucket order.
fn sorted_quantiles(
    sorted: &(impl Iterator<Item = (u32, u64)> + Clone),
) -> (Option<u64>, Option<u64>) {
    let total = sorted
        .clone()
        .try_fold(0u64, |sum, (_, c)| sum.checked_add(c));
    let Some(total) = total.filter(|&t| t > 0) else {
        return (None, None);
    };
    let quantile = |q: f64| {
        let rank = ladder::nearest_rank(total, q);
        let mut seen = 0u64;
        sorted
            .clone()
            .find(|&(_, c)| {
                seen += c;
                seen >= rank
            })
            .map(|(b, _)| ladder::upper_bound_ns(b as usize))
    };
    (quantile(0.5), quantile(0.99))
}

fn pair_stats(
    source_tor: String,
    target_tor: String,
    acc: &PairAccumulator,
    sla: &SlaPolicy,
) -> TorPairStats {
    let p99 = acc.histogram.quantile_upper_ns(0.99);
    // Latency is judged on the samples the histograms actually hold.
    let timed = acc.histogram.total().min(acc.ok);
    TorPairStats {
        source_tor,
        target_tor,
        paths: acc.paths,
        ok: acc.ok,
        lost: acc.lost,
        invalid: acc.invalid,
        loss_ratio: loss_ratio(acc.ok, acc.lost),
        p50_network_rtt_ns: acc.histogram.quantile_upper_ns(0.5),
        p99_network_rtt_ns: p99,
        loss: judge_loss(sla, acc.ok, acc.lost),
        latency: judge_latency(sla, timed, p99),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loss_ratio_is_undefined_without_answered_or_lost_probes() {
        assert_eq!(loss_ratio(0, 0), None);
        assert_eq!(loss_ratio(3, 1), Some(0.25));
        assert_eq!(loss_ratio(0, 7), Some(1.0));
    }

    #[test]
    fn judgements_need_enough_probes() {
        let sla = SlaPolicy {
            min_probes: 10,
            ..SlaPolicy::default()
        };
        assert_eq!(judge_loss(&sla, 0, 9), Judgement::NotJudged);
        assert_eq!(judge_loss(&sla, 0, 10), Judgement::Violated);
        assert_eq!(judge_loss(&sla, 100, 1), Judgement::Met);
        assert_eq!(judge_loss(&sla, 98, 2), Judgement::Violated);
        assert_eq!(
            judge_latency(&sla, 9, Some(10_000_000)),
            Judgement::NotJudged
        );
        assert_eq!(
            judge_latency(&sla, 10, Some(10_000_000)),
            Judgement::Violated
        );
        assert_eq!(
            judge_latency(&sla, 10, Some(sla.max_p99_network_rtt_ns)),
            Judgement::Met
        );
        assert_eq!(judge_latency(&sla, 10, None), Judgement::NotJudged);
    }

    #[test]
    fn sparse_quantiles_agree_with_the_dense_histogram() {
        let cases: [(&[u32], &[u64]); 5] = [
            (&[40, 3, 17], &[1, 98, 1]),
            (&[5, 5, 2], &[10, 10, 1]),
            (&[9], &[0]),
            (&[], &[]),
            (&[100, 1], &[1, 1]),
        ];
        for (buckets, counts) in cases {
            let mut dense = ladder::Histogram::default();
            assert!(dense.merge_sparse(buckets, counts).is_ok());
            assert_eq!(
                sparse_quantiles(buckets, counts),
                (dense.quantile_upper_ns(0.5), dense.quantile_upper_ns(0.99)),
                "{buckets:?} {counts:?}"
            );
        }
    }

    #[test]
    fn unknown_wire_kinds_read_as_unspecified() {
        assert_eq!(
            ProbeKind::from_wire(v1::TargetKind::InterTor as i32),
            ProbeKind::InterTor
        );
        assert_eq!(ProbeKind::from_wire(99), ProbeKind::Unspecified);
    }
}
