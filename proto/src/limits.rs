//! Bounds both sides enforce on what crosses the control channel, so a hostile
//! or broken peer cannot make the other allocate without limit.

/// Largest gRPC message either side decodes.
pub const MAX_MESSAGE_BYTES: usize = 4 * 1024 * 1024;
/// Most endpoints one node may register (RNICs plus UDP ports).
pub const MAX_ENDPOINTS_PER_NODE: usize = 64;
/// Most window summaries in one report.
pub const MAX_SUMMARIES_PER_REPORT: usize = 20_000;
/// Longest identifier (node name, endpoint id, ToR) accepted: a DNS subdomain plus a suffix.
pub const MAX_ID_LEN: usize = 320;
/// Most probes per second the controller hands out for one target.
pub const MAX_RATE_PPS: f64 = 1_000.0;
/// Most flows (UDP source ports or RoCE flow labels) per pinglist target. A
/// window summary reports lost and probed flows as bits of a `u64`, so flow
/// `i` owns bit `i` and no two flows share one. The controller refuses a
/// `maxFlows` above it; the agent clamps pinglist targets and its own
/// `--max-flows` to it.
pub const MAX_FLOWS_PER_TARGET: u32 = u64::BITS;
/// Most service flows in one `ReportServiceFlows` snapshot (a few hundred
/// bytes each, so a full report stays well under [`MAX_MESSAGE_BYTES`]).
pub const MAX_SERVICE_FLOWS_PER_REPORT: usize = 8_192;

/// Whether `id` is acceptable as a node name, endpoint id or ToR name:
/// non-empty, bounded, printable ASCII without whitespace.
pub fn is_valid_id(id: &str) -> bool {
    !id.is_empty() && id.len() <= MAX_ID_LEN && id.bytes().all(|b| b.is_ascii_graphic())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_flow_has_a_bit_of_its_own_in_the_flow_masks() {
        let last_flow = MAX_FLOWS_PER_TARGET - 1;
        assert_eq!(1u64.checked_shl(last_flow), Some(1 << 63));
        assert_eq!(1u64.checked_shl(MAX_FLOWS_PER_TARGET), None);
    }

    #[test]
    fn ids_must_be_printable_and_bounded() {
        assert!(is_valid_id("node-a/udp0"));
        assert!(!is_valid_id(""));
        assert!(!is_valid_id("has space"));
        assert!(!is_valid_id("tab\there"));
        assert!(!is_valid_id(&"x".repeat(MAX_ID_LEN + 1)));
        assert!(!is_valid_id("ünïcode"));
    }
}
