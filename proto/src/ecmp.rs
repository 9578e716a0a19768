//! How many flows (UDP source ports or RoCE flow labels) a prober needs to touch
//! every ECMP path between two endpoints with a given probability.

/// Default upper bound on flows per target: more flows mean more address handles
/// (RDMA) or sockets (UDP) and the reference hung when this was unbounded. It is
/// also the most the flow masks of a window summary can tell apart.
pub const DEFAULT_MAX_FLOWS: u32 = crate::limits::MAX_FLOWS_PER_TARGET;

/// Flows needed to hit all `paths` equal-cost paths with probability `coverage`,
/// using the coupon-collector bound `n = ceil(ln(1 - p^(1/m)) / ln((m-1)/m))`,
/// capped at `max_flows` (at least 1).
///
/// Out-of-range inputs are clamped rather than rejected: `paths` of 0 or 1 needs
/// one flow, and `coverage` is limited to (0, 0.9999].
pub fn flows_for_coverage(paths: u32, coverage: f64, max_flows: u32) -> u32 {
    let cap = max_flows.max(1);
    if paths <= 1 {
        return 1;
    }
    let p = if coverage.is_finite() {
        coverage.clamp(1e-6, 0.9999)
    } else {
        0.9
    };
    let m = f64::from(paths);
    let n = (1.0 - p.powf(1.0 / m)).ln() / ((m - 1.0) / m).ln();
    if !n.is_finite() || n >= f64::from(cap) {
        return cap;
    }
    // n is finite and in [0, cap): the conversion cannot truncate.
    #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
    let flows = n.ceil().max(1.0) as u32;
    flows.min(cap)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn matches_the_reference_table_at_ninety_percent() {
        assert_eq!(flows_for_coverage(4, 0.9, 1000), 13);
        assert_eq!(flows_for_coverage(8, 0.9, 1000), 33);
        assert_eq!(flows_for_coverage(16, 0.9, 1000), 78);
        assert_eq!(flows_for_coverage(32, 0.9, 1000), 181);
    }

    #[test]
    fn caps_at_the_configured_maximum() {
        assert_eq!(flows_for_coverage(32, 0.9, DEFAULT_MAX_FLOWS), 64);
        assert_eq!(flows_for_coverage(32, 0.9, 0), 1);
    }

    #[test]
    fn single_path_needs_one_flow_and_bad_coverage_is_clamped() {
        assert_eq!(flows_for_coverage(0, 0.9, 64), 1);
        assert_eq!(flows_for_coverage(1, 0.99, 64), 1);
        assert_eq!(flows_for_coverage(4, f64::NAN, 1000), 13);
        assert!(flows_for_coverage(4, 5.0, 1000) <= 1000);
    }
}
