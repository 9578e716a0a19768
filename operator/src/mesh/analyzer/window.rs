//! Collecting window summaries until their window is evaluated.
//!
//! Ingest runs for every summary of every agent (millions per window in a large
//! mesh), so it validates with plain arithmetic and stores each summary by moving
//! its strings and histogram vectors, never copying or expanding them.

use std::collections::HashMap;
use std::collections::hash_map::Entry;
use std::hash::BuildHasher;

use pingmesh_proto::ladder::{self, SparseError};
use pingmesh_proto::{limits, v1};

use super::stats::ProbeKind;

/// Windows before the current one that still accept summaries: late reports,
/// and what agents buffered while the controller was restarting or cut off
/// (180 windows: 15 minutes of the default 5 s windows). Summaries for a
/// window that was judged already are still taken, from sources not judged in
/// it (see `Intake`). What this costs while no summary comes late: 8 bytes
/// per source endpoint per closed window, so 180 x 8 B = 1.4 KiB per
/// endpoint (14 MiB for 10,000 endpoints). Windows not closed yet are held
/// as far back: after a restart, what agents resend before the first window
/// is judged waits there (and becomes late at that close), and so does what
/// a lagging judge has not reached. Open windows that are overdue (starting
/// more than two windows and 10 s before the controller's clock) count
/// against [`MAX_LATE_PATHS`] with the late buckets, so neither fills the
/// whole horizon.
pub const MAX_PAST_WINDOWS: u64 = 180;
/// Most late summaries held at once, over all windows, until they are
/// judged: those for windows judged already, and those for overdue open
/// windows (see [`MAX_PAST_WINDOWS`]); beyond this they are refused
/// (`late_full`), except resends of paths held already (duplicates).
pub const MAX_LATE_PATHS: usize = MAX_PATHS_PER_WINDOW;
/// Windows after the current one that accept summaries (agent clocks running ahead).
pub const MAX_FUTURE_WINDOWS: u64 = 1;
/// Most paths buffered for one window; beyond this summaries are refused.
pub const MAX_PATHS_PER_WINDOW: usize = 8_000_000;

/// What happened to an accepted-for-checking summary.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ingested {
    /// Stored for its window.
    Accepted,
    /// Stored for a window judged already, from a source not judged in it:
    /// judged on its own later, into the window's history only.
    AcceptedLate,
    /// The (window, source, target) was reported already; the first report stands.
    Duplicate,
}

/// Why a summary was refused.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum IngestError {
    #[error("summary is for {got} ms windows but the mesh uses {expected} ms windows")]
    WindowLengthMismatch { got: u32, expected: u32 },
    #[error("window start {window_start_ms} is not a multiple of the {window_ms} ms window")]
    MisalignedWindow {
        window_start_ms: u64,
        window_ms: u32,
    },
    #[error("probe counts do not add up: sent {sent} != ok {ok} + lost {lost} + invalid {invalid}")]
    CountsDoNotAddUp {
        sent: u64,
        ok: u64,
        lost: u64,
        invalid: u64,
    },
    #[error("{software_timed} software-timed samples but only {ok} answered probes")]
    SoftwareTimedAboveOk { software_timed: u64, ok: u64 },
    #[error("{which} endpoint id ({len} bytes) is empty, too long or not printable ASCII")]
    InvalidEndpointId { which: &'static str, len: usize },
    /// The window was judged, and with it this summary's source endpoint
    /// (summaries from sources not judged in it are still taken).
    #[error(
        "window {window_start_ms} was already judged with this source's summaries (evaluated through {evaluated_through_ms})"
    )]
    AlreadyEvaluated {
        window_start_ms: u64,
        evaluated_through_ms: u64,
    },
    #[error(
        "window {window_start_ms} is older than the oldest window still accepted ({oldest_accepted_ms})"
    )]
    TooOld {
        window_start_ms: u64,
        oldest_accepted_ms: u64,
    },
    #[error(
        "window {window_start_ms} is ahead of the newest window accepted ({newest_accepted_ms})"
    )]
    TooFarInFuture {
        window_start_ms: u64,
        newest_accepted_ms: u64,
    },
    #[error("malformed network RTT histogram: {0}")]
    MalformedHistogram(#[from] SparseError),
    #[error("window already holds {limit} paths")]
    WindowFull { limit: usize },
    #[error("{limit} late summaries wait to be judged already")]
    LateFull { limit: usize },
}

impl IngestError {
    /// Bounded label for metrics.
    pub fn category(&self) -> &'static str {
        match self {
            Self::WindowLengthMismatch { .. } => "window_length_mismatch",
            Self::MisalignedWindow { .. } => "misaligned_window",
            Self::CountsDoNotAddUp { .. } => "counts_do_not_add_up",
            Self::SoftwareTimedAboveOk { .. } => "software_timed_above_ok",
            Self::InvalidEndpointId { .. } => "invalid_endpoint_id",
            Self::AlreadyEvaluated { .. } => "already_evaluated",
            Self::TooOld { .. } => "too_old",
            Self::TooFarInFuture { .. } => "too_far_in_future",
            Self::MalformedHistogram(_) => "malformed_histogram",
            Self::WindowFull { .. } => "window_full",
            Self::LateFull { .. } => "late_full",
        }
    }
}

/// What the analyzer keeps of one summary.
#[derive(Debug, Clone)]
pub(super) struct PathRecord {
    pub kind: ProbeKind,
    pub ok: u64,
    pub lost: u64,
    pub invalid: u64,
    pub software_timed: u64,
    /// The agent's exact percentiles, when it sent them.
    pub p50_ns: Option<u64>,
    pub p99_ns: Option<u64>,
    pub histogram_buckets: Vec<u32>,
    pub histogram_counts: Vec<u64>,
    pub lost_flows_mask: u64,
    pub probed_flows_mask: u64,
    /// p99 of the prober's and the responder's host delay.
    pub prober_p99_ns: Option<u64>,
    pub responder_p99_ns: Option<u64>,
}

/// (source endpoint, target endpoint).
pub(super) type PathKey = (String, String);

/// Seeded per process (so crafted endpoint ids cannot aim at collisions) and
/// several times faster than `SipHash` on short ids.
pub(super) type FastHash = foldhash::fast::RandomState;

/// Everything received for one window.
#[derive(Debug, Default)]
pub(super) struct WindowData {
    pub paths: HashMap<PathKey, PathRecord, FastHash>,
    /// Hashes of the source endpoints stored, one per run of summaries from
    /// one source (an agent reports a source's paths together, so this
    /// stays near one entry per source); sorted and deduplicated on take.
    sources: Vec<u64>,
    /// The source of the last path stored: the next one from it adds no hash.
    last_source: String,
}

impl WindowData {
    /// Sized up front: growing a map of millions of entries rehashes all of them.
    pub fn with_capacity(paths: usize) -> Self {
        Self {
            paths: HashMap::with_capacity_and_hasher(paths, FastHash::default()),
            ..Self::default()
        }
    }

    /// Whether the path is stored already (costs two id copies: for the
    /// rare checks only).
    pub fn holds(&self, source: &str, target: &str) -> bool {
        self.paths
            .contains_key(&(source.to_owned(), target.to_owned()))
    }

    /// The source endpoints stored, as sorted distinct `hasher` hashes.
    pub fn take_sources(&mut self) -> Vec<u64> {
        let mut sources = std::mem::take(&mut self.sources);
        sources.sort_unstable();
        sources.dedup();
        sources
    }

    /// Stores a summary that passed [`check`]; the first report of a path
    /// wins. `hasher` hashes the sources kept for [`WindowData::take_sources`].
    pub fn insert(
        &mut self,
        mut summary: v1::WindowSummary,
        hasher: FastHash,
    ) -> Result<Ingested, IngestError> {
        let key = (
            std::mem::take(&mut summary.source_endpoint),
            std::mem::take(&mut summary.target_endpoint),
        );
        if self.paths.len() >= MAX_PATHS_PER_WINDOW {
            return if self.paths.contains_key(&key) {
                Ok(Ingested::Duplicate)
            } else {
                Err(IngestError::WindowFull {
                    limit: MAX_PATHS_PER_WINDOW,
                })
            };
        }
        match self.paths.entry(key) {
            Entry::Occupied(_) => Ok(Ingested::Duplicate),
            Entry::Vacant(slot) => {
                let source = &slot.key().0;
                if *source != self.last_source {
                    self.sources.push(hasher.hash_one(source.as_str()));
                    self.last_source.clone_from(source);
                }
                slot.insert(PathRecord::from(summary));
                Ok(Ingested::Accepted)
            }
        }
    }
}

impl From<v1::WindowSummary> for PathRecord {
    fn from(s: v1::WindowSummary) -> Self {
        let rtt = s.network_rtt.filter(|_| s.ok > 0);
        let histogram = s.network_rtt_histogram.unwrap_or_default();
        Self {
            kind: ProbeKind::from_wire(s.kind),
            ok: s.ok,
            lost: s.lost,
            invalid: s.invalid,
            software_timed: s.software_timed,
            p50_ns: rtt.map(|r| r.p50_ns),
            p99_ns: rtt.map(|r| r.p99_ns),
            histogram_buckets: histogram.buckets,
            histogram_counts: histogram.counts,
            lost_flows_mask: s.lost_flows_mask,
            probed_flows_mask: s.probed_flows_mask,
            prober_p99_ns: s.prober_delay.filter(|_| s.ok > 0).map(|d| d.p99_ns),
            responder_p99_ns: s.responder_delay.filter(|_| s.ok > 0).map(|d| d.p99_ns),
        }
    }
}

/// Which windows currently accept summaries (judged ones too: the intake
/// decides what a judged window still takes).
#[derive(Debug, Clone, Copy)]
pub(super) struct Acceptance {
    /// Window length, ms.
    pub window: u32,
    /// The controller's clock, Unix ms.
    pub now: u64,
}

impl Acceptance {
    pub fn oldest_accepted_ms(&self) -> u64 {
        let step = u64::from(self.window);
        self.current_ms().saturating_sub(MAX_PAST_WINDOWS * step)
    }

    fn current_ms(&self) -> u64 {
        pingmesh_proto::window::window_start(self.now, self.window)
    }

    fn newest_accepted_ms(&self) -> u64 {
        self.current_ms()
            .saturating_add(MAX_FUTURE_WINDOWS * u64::from(self.window))
    }
}

/// Refuses summaries that cannot be right, before anything is stored.
pub(super) fn check(s: &v1::WindowSummary, accept: &Acceptance) -> Result<(), IngestError> {
    if s.window_ms != accept.window {
        return Err(IngestError::WindowLengthMismatch {
            got: s.window_ms,
            expected: accept.window,
        });
    }
    let start = s.window_start_ms;
    if !start.is_multiple_of(u64::from(accept.window.max(1))) {
        return Err(IngestError::MisalignedWindow {
            window_start_ms: start,
            window_ms: s.window_ms,
        });
    }
    let oldest = accept.oldest_accepted_ms();
    if start < oldest {
        return Err(IngestError::TooOld {
            window_start_ms: start,
            oldest_accepted_ms: oldest,
        });
    }
    let newest = accept.newest_accepted_ms();
    if start > newest {
        return Err(IngestError::TooFarInFuture {
            window_start_ms: start,
            newest_accepted_ms: newest,
        });
    }
    let total =
        s.ok.checked_add(s.lost)
            .and_then(|n| n.checked_add(s.invalid));
    if total != Some(s.sent) {
        return Err(IngestError::CountsDoNotAddUp {
            sent: s.sent,
            ok: s.ok,
            lost: s.lost,
            invalid: s.invalid,
        });
    }
    if s.software_timed > s.ok {
        return Err(IngestError::SoftwareTimedAboveOk {
            software_timed: s.software_timed,
            ok: s.ok,
        });
    }
    for (which, id) in [
        ("source", &s.source_endpoint),
        ("target", &s.target_endpoint),
    ] {
        if !limits::is_valid_id(id) {
            return Err(IngestError::InvalidEndpointId {
                which,
                len: id.len(),
            });
        }
    }
    if let Some(h) = &s.network_rtt_histogram {
        check_sparse(&h.buckets, &h.counts)?;
    }
    Ok(())
}

/// The checks `ladder::Histogram::merge_sparse` makes, without building a dense
/// histogram per summary (that would cost a 1.5 KiB allocation each).
fn check_sparse(buckets: &[u32], counts: &[u64]) -> Result<(), SparseError> {
    if buckets.len() != counts.len() {
        return Err(SparseError::LengthMismatch {
            buckets: buckets.len(),
            counts: counts.len(),
        });
    }
    if let Some(&b) = buckets.iter().find(|&&b| b as usize >= ladder::BUCKETS) {
        return Err(SparseError::BucketOutOfRange(b));
    }
    counts
        .iter()
        .try_fold(0u64, |sum, &c| sum.checked_add(c))
        .ok_or(SparseError::Overflow)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sparse_check_agrees_with_the_ladder_merge() {
        let cases: [(&[u32], &[u64]); 5] = [
            (&[1, 5], &[3, 4]),
            (&[1, 2], &[1]),
            (&[9_999], &[1]),
            (&[1, 2], &[u64::MAX, 1]),
            (&[], &[]),
        ];
        for (buckets, counts) in cases {
            let mut dense = ladder::Histogram::default();
            assert_eq!(
                check_sparse(buckets, counts),
                dense.merge_sparse(buckets, counts),
                "{buckets:?}"
            );
        }
    }
}
