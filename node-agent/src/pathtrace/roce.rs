//! Which UDP 5-tuple a RoCE v2 flow travels on, so that a trace sent as plain
//! UDP hashes onto the same ECMP path as the RDMA packets.
//!
//! RoCE v2 packets go to UDP port 4791. Their source port is not chosen by the
//! application: the driver derives it from the address handle's GRH flow label
//! with the kernel's `rdma_flow_label_to_udp_sport` (`include/rdma/ib_verbs.h`;
//! libibverbs has the same formula as `ibv_flow_label_to_udp_sport`): the low
//! 14 bits of the label xor its high 6 bits, in the range 0xC000..=0xFFFF.
//! Switches hash that 5-tuple, so a UDP datagram with the same addresses and
//! ports takes the path the RDMA flow takes.

/// The IANA port of RoCE v2.
pub const ROCE_V2_PORT: u16 = 4791;

/// The first port of the range RoCE v2 source ports come from.
const ROCE_SOURCE_PORT_MIN: u32 = 0xC000;

/// The UDP source port a RoCE v2 driver sends a flow labelled `flow_label` on
/// (only the label's low 20 bits count, as on the wire).
pub fn roce_udp_source_port(flow_label: u32) -> u16 {
    let low = flow_label & 0x0_3FFF;
    let high = flow_label & 0xF_C000;
    let port = (low ^ (high >> 14)) | ROCE_SOURCE_PORT_MIN;
    // At most 0xFFFF: 14 low bits or'ed with 0xC000.
    u16::try_from(port).unwrap_or(u16::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn matches_the_kernel_formula_on_known_values() {
        // fl = 0: no bits, the range start.
        assert_eq!(roce_udp_source_port(0), 0xC000);
        // Only low bits: kept as they are.
        assert_eq!(roce_udp_source_port(0x0_1234), 0xC000 | 0x1234);
        // High bits fold onto the lowest six: 0xFC000 >> 14 = 0x3F.
        assert_eq!(roce_udp_source_port(0xF_C000), 0xC000 | 0x3F);
        assert_eq!(roce_udp_source_port(0xF_FFFF), 0xC000 | (0x3FFF ^ 0x3F));
        // Bits above the 20-bit label do not exist on the wire.
        assert_eq!(
            roce_udp_source_port(0xFFF0_0001),
            roce_udp_source_port(0x0_0001)
        );
    }

    #[test]
    fn every_label_lands_in_the_roce_source_port_range() {
        for label in (0..=0xF_FFFFu32).step_by(977) {
            let port = roce_udp_source_port(label);
            assert!(port >= 0xC000, "label {label:#x} gave {port:#x}");
        }
    }
}
