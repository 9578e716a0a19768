//! GRH flow labels: RoCE v2 drivers derive the UDP source port of a packet
//! from its address handle's flow label, so probing with `n` labels spreads
//! probes over up to `n` ECMP paths (`n` comes from the controller's flow count).
//!
//! Label `i` is a fixed permutation of `i + 1` over the 20-bit label space:
//! distinct indexes give distinct labels, none is zero (zero would let the
//! driver pick the port itself), and every agent derives the same labels.

use super::gid::Gid;

/// Flow labels are 20 bits wide.
pub const FLOW_LABEL_MASK: u32 = 0x000F_FFFF;

/// Distinct non-zero labels there are.
const LABEL_SPACE: u32 = FLOW_LABEL_MASK;

/// The flow label of flow `index` in rotation `salt`. Distinct for distinct
/// `(index + salt) mod (2^20 - 1)`, never zero, always within 20 bits.
pub fn flow_label(index: u32, salt: u32) -> u32 {
    let slot = (u64::from(index) + u64::from(salt)) % u64::from(LABEL_SPACE);
    // slot + 1 is in 1..=2^20-1; the permutation fixes 0, so its image is non-zero.
    permute(u32::try_from(slot).unwrap_or(0) + 1)
}

/// The flow label an ACK travels with: the probe's own label when the receive
/// carried one (IPv6 GRH). RoCE v2 over IPv4 puts an IPv4 header where the GRH
/// would be, which has no flow label; then the label is derived from the
/// prober's GID and QPN, so each prober's ACKs keep one stable return path.
pub fn ack_flow_label(received: Option<u32>, prober_gid: &Gid, prober_qpn: u32) -> u32 {
    match received.map(|l| l & FLOW_LABEL_MASK) {
        Some(label) if label != 0 => label,
        _ => {
            let mut h: u32 = 0x811C_9DC5;
            for b in prober_gid.0.iter().chain(prober_qpn.to_be_bytes().iter()) {
                h = (h ^ u32::from(*b)).wrapping_mul(0x0100_0193);
            }
            flow_label(h % LABEL_SPACE, 0)
        }
    }
}

/// A bijection on 20-bit values that maps 0 to 0 and scatters neighbours:
/// odd multiplications modulo 2^20 and xor-shifts are each invertible.
fn permute(x: u32) -> u32 {
    let mut v = x & FLOW_LABEL_MASK;
    v = v.wrapping_mul(0x9_E3B5) & FLOW_LABEL_MASK;
    v ^= v >> 11;
    v = v.wrapping_mul(0x6_B2C7) & FLOW_LABEL_MASK;
    v ^= v >> 9;
    v
}

#[cfg(test)]
mod tests {
    use std::collections::HashSet;

    use super::*;

    #[test]
    fn labels_of_distinct_flows_are_distinct_non_zero_and_twenty_bits() {
        let labels: Vec<u32> = (0..4_096).map(|i| flow_label(i, 0)).collect();
        assert!(labels.iter().all(|&l| l != 0 && l <= FLOW_LABEL_MASK));
        assert_eq!(labels.iter().collect::<HashSet<_>>().len(), labels.len());
    }

    #[test]
    fn the_permutation_covers_the_whole_label_space() {
        let image: HashSet<u32> = (0..=FLOW_LABEL_MASK).map(permute).collect();
        assert_eq!(image.len(), 1 << 20);
        assert_eq!(permute(0), 0);
    }

    #[test]
    fn labels_are_deterministic_and_neighbours_are_scattered() {
        assert_eq!(flow_label(5, 0), flow_label(5, 0));
        assert_ne!(flow_label(0, 0) + 1, flow_label(1, 0));
        // Rotation shifts which labels a prober uses: salt 1 reuses all but one.
        let a: HashSet<u32> = (0..64).map(|i| flow_label(i, 0)).collect();
        let b: HashSet<u32> = (0..64).map(|i| flow_label(i, 1)).collect();
        assert_eq!(a.intersection(&b).count(), 63);
    }

    #[test]
    fn the_last_index_wraps_instead_of_producing_zero() {
        assert_ne!(flow_label(u32::MAX, u32::MAX), 0);
        assert_eq!(flow_label(LABEL_SPACE, 0), flow_label(0, 0));
    }

    #[test]
    fn an_ack_reuses_the_probe_label_when_the_grh_carried_one() {
        let gid = Gid::from_ipv4([10, 0, 0, 1]);
        assert_eq!(ack_flow_label(Some(0x1_2345), &gid, 7), 0x1_2345);
    }

    #[test]
    fn without_a_received_label_acks_use_a_stable_per_prober_label() {
        let gid = Gid::from_ipv4([10, 0, 0, 1]);
        let first = ack_flow_label(None, &gid, 7);
        assert_ne!(first, 0);
        assert_eq!(first, ack_flow_label(Some(0), &gid, 7));
        assert_ne!(first, ack_flow_label(None, &gid, 8));
        assert_ne!(
            first,
            ack_flow_label(None, &Gid::from_ipv4([10, 0, 0, 2]), 7)
        );
    }
}
