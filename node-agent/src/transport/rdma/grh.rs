//! The 40 bytes in front of every UD receive.
//!
//! On an IPv6 (or InfiniBand) path they are the global route header, laid out
//! like an IPv6 header: version, traffic class, flow label, ..., source GID at
//! 8..24. For RoCE v2 over IPv4 the first 20 bytes are undefined and bytes
//! 20..40 hold the IPv4 header: there is no flow label, and the source GID is
//! the IPv4-mapped form of the source address. Which of the two arrived is
//! decided by the receiving GID's family, since a port only receives on its
//! own GID: the undefined bytes may look like anything.

use super::GRH_LEN;
use super::gid::Gid;

/// What a receive's GRH area says about the sender.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GrhInfo {
    pub src_gid: Gid,
    /// The GRH flow label; `None` on RoCE v2 over IPv4.
    pub flow_label: Option<u32>,
    pub traffic_class: u8,
}

/// Reads the sender out of the first [`GRH_LEN`] bytes of a UD receive buffer.
/// `local_is_ipv4` is whether the receiving endpoint's GID is IPv4-mapped.
/// `None` when the bytes are not a header of the expected kind.
pub fn parse_grh(area: &[u8], local_is_ipv4: bool) -> Option<GrhInfo> {
    let area: &[u8; GRH_LEN] = area.get(..GRH_LEN)?.try_into().ok()?;
    if local_is_ipv4 {
        let ip = &area[20..];
        // Version 4 with a 20-byte header (no options in RoCE).
        if ip[0] != 0x45 {
            return None;
        }
        let mut src = [0u8; 4];
        src.copy_from_slice(&ip[12..16]);
        return Some(GrhInfo {
            src_gid: Gid::from_ipv4(src),
            flow_label: None,
            traffic_class: ip[1],
        });
    }
    if area[0] >> 4 != 6 {
        return None;
    }
    let mut src = [0u8; 16];
    src.copy_from_slice(&area[8..24]);
    Some(GrhInfo {
        src_gid: Gid(src),
        flow_label: Some(
            (u32::from(area[1] & 0x0F) << 16) | (u32::from(area[2]) << 8) | u32::from(area[3]),
        ),
        traffic_class: (area[0] << 4) | (area[1] >> 4),
    })
}

/// Writes a GRH area the way a NIC would; for the fake verbs layer and tests.
pub fn encode_grh(
    src: &Gid,
    dst: &Gid,
    flow_label: u32,
    traffic_class: u8,
    ipv4: bool,
) -> [u8; GRH_LEN] {
    let mut out = [0u8; GRH_LEN];
    if ipv4 {
        let ip = &mut out[20..];
        ip[0] = 0x45;
        ip[1] = traffic_class;
        ip[8] = 64; // TTL
        ip[9] = 17; // UDP
        ip[12..16].copy_from_slice(&src.0[12..]);
        ip[16..20].copy_from_slice(&dst.0[12..]);
        // The undefined first 20 bytes: garbage, to prove the parser ignores them.
        out[..20].fill(0x6A);
    } else {
        let label = flow_label & 0x000F_FFFF;
        out[0] = 0x60 | (traffic_class >> 4);
        let [_, high, mid, low] = label.to_be_bytes();
        out[1] = (traffic_class << 4) | (high & 0x0F);
        out[2] = mid;
        out[3] = low;
        out[6] = 0x11; // next header: UDP
        out[7] = 64; // hop limit
        out[8..24].copy_from_slice(&src.0);
        out[24..40].copy_from_slice(&dst.0);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_ipv6_grh_yields_source_gid_flow_label_and_traffic_class() {
        let src: Gid = "fd00::1".parse().unwrap();
        let dst: Gid = "fd00::2".parse().unwrap();
        let area = encode_grh(&src, &dst, 0xA_BCDE, 0x68, false);
        assert_eq!(
            parse_grh(&area, false),
            Some(GrhInfo {
                src_gid: src,
                flow_label: Some(0xA_BCDE),
                traffic_class: 0x68
            })
        );
    }

    #[test]
    fn an_ipv4_header_yields_the_mapped_source_gid_and_no_flow_label() {
        let src = Gid::from_ipv4([10, 0, 0, 1]);
        let dst = Gid::from_ipv4([10, 0, 0, 2]);
        let area = encode_grh(&src, &dst, 0x1234, 0x60, true);
        assert_eq!(
            parse_grh(&area, true),
            Some(GrhInfo {
                src_gid: src,
                flow_label: None,
                traffic_class: 0x60
            })
        );
    }

    #[test]
    fn areas_of_the_wrong_kind_or_length_are_rejected() {
        let v6 = encode_grh(&Gid::default(), &Gid::default(), 1, 0, false);
        assert_eq!(parse_grh(&v6, true), None);
        let mut v4 = encode_grh(&Gid::from_ipv4([1, 2, 3, 4]), &Gid::default(), 1, 0, true);
        v4[0] = 0x00; // first 20 bytes are undefined; still IPv4 if the port is
        assert!(parse_grh(&v4, true).is_some());
        assert_eq!(parse_grh(&v4, false), None);
        assert_eq!(parse_grh(&v6[..39], false), None);
    }
}
