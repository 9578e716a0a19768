//! GIDs and the choice of which GID table entry an endpoint uses.
//!
//! Each port's GID table lists one entry per (address, RoCE version). The type
//! of entry `i` is in `gid_attrs/types/<i>` ("IB/RoCE v1" or "RoCE v2"), the
//! address in `gids/<i>`. Many NICs put RoCE v1 at index 0, so the index is
//! chosen by looking, not fixed: the first RoCE v2 entry holding an
//! IPv4-mapped address. Unpopulated entries read as all zeroes, and their type
//! file often cannot be read at all (the kernel answers EINVAL): both are
//! skipped, never fatal.

use std::fmt;
use std::net::Ipv6Addr;
use std::str::FromStr;

/// A 128-bit RoCE/InfiniBand global identifier (an IPv6 address on RoCE).
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Default)]
pub struct Gid(pub [u8; 16]);

impl Gid {
    /// The IPv4-mapped GID of an IPv4 address (`::ffff:a.b.c.d`), as RoCE v2
    /// over IPv4 uses.
    pub fn from_ipv4(octets: [u8; 4]) -> Self {
        let mut raw = [0u8; 16];
        raw[10] = 0xff;
        raw[11] = 0xff;
        raw[12..].copy_from_slice(&octets);
        Self(raw)
    }

    /// All zeroes: an unpopulated table entry.
    pub fn is_zero(&self) -> bool {
        self.0 == [0; 16]
    }

    /// `::ffff:a.b.c.d`.
    pub fn is_ipv4_mapped(&self) -> bool {
        self.0[..10] == [0; 10] && self.0[10] == 0xff && self.0[11] == 0xff
    }

    /// `fe80::/10`, the default GID every RoCE port has.
    pub fn is_link_local(&self) -> bool {
        self.0[0] == 0xfe && self.0[1] & 0xc0 == 0x80
    }
}

impl fmt::Display for Gid {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(&Ipv6Addr::from(self.0), f)
    }
}

impl fmt::Debug for Gid {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Gid({self})")
    }
}

/// A GID that is not IPv6 text (sysfs writes eight groups of four hex digits).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0:?} is not a GID")]
pub struct GidParseError(pub String);

impl FromStr for Gid {
    type Err = GidParseError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let text = s.trim();
        Ipv6Addr::from_str(text)
            .map(|a| Self(a.octets()))
            .map_err(|_| GidParseError(text.to_owned()))
    }
}

/// The RoCE version of a GID table entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GidType {
    /// "IB/RoCE v1": InfiniBand, or RoCE v1 (layer 2 only, not routable).
    IbRoceV1,
    /// "RoCE v2": UDP/IP encapsulated, routable, ECMP-hashable.
    RoceV2,
}

impl GidType {
    /// Parses the text of a `gid_attrs/types/<i>` file.
    pub fn parse(text: &str) -> Option<Self> {
        match text.trim() {
            "IB/RoCE v1" => Some(Self::IbRoceV1),
            "RoCE v2" => Some(Self::RoceV2),
            _ => None,
        }
    }
}

/// One row of a port's GID table as read from sysfs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GidEntry {
    pub index: u16,
    /// `None` when the address file could not be read or parsed.
    pub gid: Option<Gid>,
    /// `None` when the type file could not be read (common for empty entries)
    /// or named an unknown type.
    pub kind: Option<GidType>,
    /// The network device the entry belongs to (`gid_attrs/ndevs/<i>`), if any.
    pub netdev: Option<String>,
}

impl GidEntry {
    /// Why this entry cannot carry mesh traffic, or `None` when it can.
    pub fn unusable_reason(&self) -> Option<String> {
        match (self.gid, self.kind) {
            (None, _) => Some("its address could not be read".to_owned()),
            (Some(gid), _) if gid.is_zero() => Some("it is empty (all-zero GID)".to_owned()),
            (_, None) => Some("its type could not be read".to_owned()),
            (Some(gid), Some(GidType::IbRoceV1)) => {
                Some(format!("{gid} is IB/RoCE v1, which is not routable"))
            }
            (Some(_), Some(GidType::RoceV2)) => None,
        }
    }

    /// RoCE v2 with an IPv4-mapped address: what automatic selection wants.
    fn is_roce_v2_ipv4(&self) -> bool {
        self.kind == Some(GidType::RoceV2) && self.gid.is_some_and(|g| g.is_ipv4_mapped())
    }
}

/// Why no GID could be chosen; the caller adds device and port.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum GidChoiceError {
    /// The override names an entry that is missing or unusable.
    Unusable { index: u16, reason: String },
    /// Automatic selection found no RoCE v2 IPv4-mapped entry.
    NoRoceV2Ipv4 { checked: usize },
}

/// Picks the GID entry to use: the override's index if given (it must be a
/// usable RoCE v2 entry, of either address family), else the lowest-indexed
/// RoCE v2 entry with an IPv4-mapped address.
pub fn choose_gid(
    entries: &[GidEntry],
    override_index: Option<u16>,
) -> Result<GidEntry, GidChoiceError> {
    if let Some(index) = override_index {
        let Some(entry) = entries.iter().find(|e| e.index == index) else {
            return Err(GidChoiceError::Unusable {
                index,
                reason: format!("the port's GID table has no entry {index}"),
            });
        };
        return match entry.unusable_reason() {
            Some(reason) => Err(GidChoiceError::Unusable { index, reason }),
            None => Ok(entry.clone()),
        };
    }
    entries
        .iter()
        .filter(|e| e.is_roce_v2_ipv4())
        .min_by_key(|e| e.index)
        .cloned()
        .ok_or(GidChoiceError::NoRoceV2Ipv4 {
            checked: entries.len(),
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(index: u16, gid: &str, kind: Option<GidType>) -> GidEntry {
        GidEntry {
            index,
            gid: Some(gid.parse().unwrap()),
            kind,
            netdev: None,
        }
    }

    /// A typical RoCE port: v1 and v2 of the link-local address, then v1 and v2
    /// of the interface's IPv4 address, then empty slots.
    fn typical_table() -> Vec<GidEntry> {
        vec![
            entry(0, "fe80::1", Some(GidType::IbRoceV1)),
            entry(1, "fe80::1", Some(GidType::RoceV2)),
            entry(2, "::ffff:10.0.0.7", Some(GidType::IbRoceV1)),
            entry(3, "::ffff:10.0.0.7", Some(GidType::RoceV2)),
            entry(4, "::", None),
        ]
    }

    #[test]
    fn sysfs_gid_text_parses_and_prints_as_ipv6() {
        let gid: Gid = "0000:0000:0000:0000:0000:ffff:0a00:0007\n".parse().unwrap();
        assert_eq!(gid, Gid::from_ipv4([10, 0, 0, 7]));
        assert!(gid.is_ipv4_mapped());
        assert_eq!(gid.to_string(), "::ffff:10.0.0.7");
        assert!(
            "fe80:0000:0000:0000:0202:c9ff:fe00:0001"
                .parse::<Gid>()
                .unwrap()
                .is_link_local()
        );
        assert!("not a gid".parse::<Gid>().is_err());
        assert!("::".parse::<Gid>().unwrap().is_zero());
    }

    #[test]
    fn gid_types_parse_from_sysfs_text() {
        assert_eq!(GidType::parse("RoCE v2\n"), Some(GidType::RoceV2));
        assert_eq!(GidType::parse("IB/RoCE v1"), Some(GidType::IbRoceV1));
        assert_eq!(GidType::parse("RoCE v3"), None);
    }

    #[test]
    fn automatic_selection_skips_roce_v1_and_link_local_for_the_v2_ipv4_entry() {
        assert_eq!(choose_gid(&typical_table(), None).unwrap().index, 3);
    }

    #[test]
    fn an_override_wins_over_automatic_selection() {
        let chosen = choose_gid(&typical_table(), Some(1)).unwrap();
        assert_eq!(chosen.index, 1);
        assert!(chosen.gid.unwrap().is_link_local());
    }

    #[test]
    fn an_override_naming_a_v1_empty_or_missing_entry_says_why() {
        let table = typical_table();
        for (index, needle) in [(0, "v1"), (4, "empty"), (9, "no entry 9")] {
            match choose_gid(&table, Some(index)) {
                Err(GidChoiceError::Unusable { index: i, reason }) => {
                    assert_eq!(i, index);
                    assert!(reason.contains(needle), "{reason}");
                }
                other => panic!("index {index}: expected unusable, got {other:?}"),
            }
        }
    }

    #[test]
    fn a_table_without_v2_ipv4_entries_is_an_error_not_index_zero() {
        let table = vec![
            entry(0, "fe80::1", Some(GidType::IbRoceV1)),
            entry(1, "fe80::1", Some(GidType::RoceV2)),
            entry(2, "::", Some(GidType::RoceV2)),
        ];
        assert_eq!(
            choose_gid(&table, None),
            Err(GidChoiceError::NoRoceV2Ipv4 { checked: 3 })
        );
    }

    #[test]
    fn entries_with_unreadable_files_are_skipped() {
        let mut table = typical_table();
        table[3].kind = None; // type file unreadable
        table.push(GidEntry {
            index: 5,
            gid: None,
            kind: Some(GidType::RoceV2),
            netdev: None,
        });
        table.push(entry(7, "::ffff:10.0.0.8", Some(GidType::RoceV2)));
        assert_eq!(choose_gid(&table, None).unwrap().index, 7);
    }
}
