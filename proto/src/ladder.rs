//! The shared latency ladder: log-linear histogram buckets over nanoseconds.
//!
//! Bucket 0 holds everything below 1024 ns. Above that, each power of two is
//! split into 8 equal sub-buckets, so a bucket's width is at most 12.5 % of its
//! lower bound. The top bucket also takes everything from ~17 s up. Agents send
//! sparse ladder histograms; the controller merges them across paths and reads
//! percentiles as bucket upper bounds, so a merged tail is never understated.

/// Sub-buckets per power of two.
const SUB_BITS: u32 = 3;
const SUBS: u64 = 1 << SUB_BITS;
/// log2 of the first bucketed value (1024 ns).
const BASE_SHIFT: u32 = 10;
/// Powers of two covered above the base: 1024 ns .. 2^34 ns (~17.2 s).
const OCTAVES: u32 = 24;

/// Number of buckets on the ladder.
pub const BUCKETS: usize = 1 + (OCTAVES as usize) * (1 << SUB_BITS);

/// Bucket index for a value in nanoseconds.
#[inline]
pub fn bucket_of(ns: u64) -> usize {
    if ns < (1 << BASE_SHIFT) {
        return 0;
    }
    let top = ns.ilog2(); // position of the leading one, >= BASE_SHIFT
    let octave = top - BASE_SHIFT;
    if octave >= OCTAVES {
        return BUCKETS - 1;
    }
    let sub = (ns >> (top - SUB_BITS)) & (SUBS - 1);
    // octave < 24 and sub < 8: the index fits comfortably.
    1 + (octave as usize) * (1 << SUB_BITS) + usize::try_from(sub).unwrap_or(0)
}

/// Largest value (inclusive, ns) that falls into `bucket`; `u64::MAX` for the top one.
pub fn upper_bound_ns(bucket: usize) -> u64 {
    if bucket == 0 {
        return (1 << BASE_SHIFT) - 1;
    }
    if bucket >= BUCKETS - 1 {
        return u64::MAX;
    }
    let i = (bucket - 1) as u64;
    let octave = i / SUBS;
    let sub = i % SUBS;
    let shift = octave + u64::from(BASE_SHIFT) - u64::from(SUB_BITS);
    ((SUBS + sub + 1) << shift) - 1
}

/// A dense histogram on the ladder.
#[derive(Clone, PartialEq, Eq)]
pub struct Histogram {
    counts: Box<[u64; BUCKETS]>,
    total: u64,
}

impl std::fmt::Debug for Histogram {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Histogram")
            .field("total", &self.total)
            .finish_non_exhaustive()
    }
}

impl Default for Histogram {
    fn default() -> Self {
        Self {
            counts: Box::new([0; BUCKETS]),
            total: 0,
        }
    }
}

/// Why a sparse histogram from the wire was refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SparseError {
    #[error("sparse histogram has {buckets} bucket indexes but {counts} counts")]
    LengthMismatch { buckets: usize, counts: usize },
    #[error("bucket index {0} is beyond the ladder's {BUCKETS} buckets")]
    BucketOutOfRange(u32),
    #[error("histogram total overflows")]
    Overflow,
}

impl Histogram {
    pub fn record(&mut self, ns: u64) {
        self.counts[bucket_of(ns)] += 1;
        self.total += 1;
    }

    pub fn total(&self) -> u64 {
        self.total
    }

    pub fn merge(&mut self, other: &Histogram) {
        for (mine, theirs) in self.counts.iter_mut().zip(other.counts.iter()) {
            *mine = mine.saturating_add(*theirs);
        }
        self.total = self.total.saturating_add(other.total);
    }

    /// Adds a sparse histogram received from the wire, refusing malformed ones whole.
    pub fn merge_sparse(&mut self, buckets: &[u32], counts: &[u64]) -> Result<(), SparseError> {
        if buckets.len() != counts.len() {
            return Err(SparseError::LengthMismatch {
                buckets: buckets.len(),
                counts: counts.len(),
            });
        }
        let mut added: u64 = 0;
        for &b in buckets {
            if b as usize >= BUCKETS {
                return Err(SparseError::BucketOutOfRange(b));
            }
        }
        for &c in counts {
            added = added.checked_add(c).ok_or(SparseError::Overflow)?;
        }
        self.total.checked_add(added).ok_or(SparseError::Overflow)?;
        for (&b, &c) in buckets.iter().zip(counts) {
            self.counts[b as usize] = self.counts[b as usize].saturating_add(c);
        }
        self.total += added;
        Ok(())
    }

    /// Non-empty buckets as (index, count) pairs, for the wire.
    pub fn to_sparse(&self) -> (Vec<u32>, Vec<u64>) {
        let mut buckets = Vec::new();
        let mut counts = Vec::new();
        for (i, &c) in self.counts.iter().enumerate() {
            if c > 0 {
                buckets.push(u32::try_from(i).unwrap_or(u32::MAX));
                counts.push(c);
            }
        }
        (buckets, counts)
    }

    /// Upper bound (ns) of the bucket holding quantile `q` (0..=1); `None` when empty.
    ///
    /// Uses the nearest-rank definition rounded up, so p99 of 100 samples is the
    /// 99th smallest: a single bad sample in 100 does not hide.
    pub fn quantile_upper_ns(&self, q: f64) -> Option<u64> {
        if self.total == 0 {
            return None;
        }
        let rank = nearest_rank(self.total, q);
        let mut seen = 0;
        for (i, &c) in self.counts.iter().enumerate() {
            seen += c;
            if seen >= rank {
                return Some(upper_bound_ns(i));
            }
        }
        Some(upper_bound_ns(BUCKETS - 1))
    }
}

/// 1-based nearest rank of quantile `q` among `n` samples (at least 1, at most n).
pub fn nearest_rank(n: u64, q: f64) -> u64 {
    let q = if q.is_finite() {
        q.clamp(0.0, 1.0)
    } else {
        1.0
    };
    // q*n <= n < 2^53 for any real sample count, so the cast is exact enough.
    #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
    let rank = (q * n as f64).ceil() as u64;
    rank.clamp(1, n.max(1))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_value_falls_into_a_bucket_whose_bounds_hold_it() {
        let mut v = 1u64;
        while v < u64::MAX / 3 {
            let b = bucket_of(v);
            assert!(v <= upper_bound_ns(b), "value {v} above bucket {b}");
            if b > 0 {
                assert!(
                    v > upper_bound_ns(b - 1),
                    "value {v} not above bucket {}",
                    b - 1
                );
            }
            v = v * 3 / 2 + 1;
        }
    }

    #[test]
    fn bucket_width_is_at_most_an_eighth_of_its_lower_bound() {
        for b in 2..BUCKETS - 1 {
            let lower = upper_bound_ns(b - 1) + 1;
            let width = upper_bound_ns(b) - lower + 1;
            assert!(
                width * 8 <= lower,
                "bucket {b}: width {width} lower {lower}"
            );
        }
    }

    #[test]
    fn p99_of_a_hundred_samples_shows_the_single_outlier_only_at_p100() {
        let mut h = Histogram::default();
        for _ in 0..99 {
            h.record(10_000);
        }
        h.record(5_000_000);
        assert!(h.quantile_upper_ns(0.99).unwrap() < 12_000);
        assert!(h.quantile_upper_ns(1.0).unwrap() >= 5_000_000);
        let mut h2 = h.clone();
        h2.record(5_000_000);
        assert!(h2.quantile_upper_ns(0.99).unwrap() >= 5_000_000);
    }

    #[test]
    fn sparse_round_trip_and_malformed_input_is_refused_whole() {
        let mut h = Histogram::default();
        for v in [500, 20_000, 20_001, 3_000_000] {
            h.record(v);
        }
        let (b, c) = h.to_sparse();
        let mut back = Histogram::default();
        back.merge_sparse(&b, &c).unwrap();
        assert_eq!(back, h);

        let mut victim = Histogram::default();
        assert_eq!(
            victim.merge_sparse(&[1, 2], &[1]),
            Err(SparseError::LengthMismatch {
                buckets: 2,
                counts: 1
            })
        );
        assert_eq!(
            victim.merge_sparse(&[9999], &[1]),
            Err(SparseError::BucketOutOfRange(9999))
        );
        assert_eq!(
            victim.merge_sparse(&[1, 2], &[u64::MAX, 1]),
            Err(SparseError::Overflow)
        );
        assert_eq!(victim.total(), 0);
    }

    #[test]
    fn empty_histogram_has_no_quantiles() {
        assert_eq!(Histogram::default().quantile_upper_ns(0.5), None);
        assert_eq!(nearest_rank(100, 0.99), 99);
        assert_eq!(nearest_rank(1, 0.0), 1);
    }
}
