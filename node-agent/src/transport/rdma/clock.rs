//! NIC completion timestamps to nanoseconds.
//!
//! `ibv_wc_read_completion_ts` returns raw cycles of the NIC's free-running
//! clock: `hca_core_clock` (from `ibv_query_device_ex`) is its frequency in
//! kHz, and `completion_timestamp_mask` says how many bits it has before it
//! wraps. The converter extends the counter past wraps so nanoseconds keep
//! increasing; it assumes it sees a stamp at least once per half wrap period
//! (days for the usual 48+ bit counters).

/// Converts raw NIC cycles to monotonically extended nanoseconds.
#[derive(Debug, Clone)]
pub struct NicClock {
    khz: u64,
    mask: u64,
    /// The raw value of the newest stamp seen, and its extended cycle count.
    newest: Option<(u64, u128)>,
}

impl NicClock {
    /// `None` when the device reports no usable clock (a zero frequency or mask):
    /// callers then time completions on the host.
    pub fn new(hca_core_clock_khz: u64, completion_timestamp_mask: u64) -> Option<Self> {
        if hca_core_clock_khz == 0 || completion_timestamp_mask == 0 {
            return None;
        }
        Some(Self {
            khz: hca_core_clock_khz,
            mask: completion_timestamp_mask,
            newest: None,
        })
    }

    /// Nanoseconds of the NIC clock at raw stamp `raw`. Stamps may arrive
    /// slightly out of order (two completion queues): a stamp behind the newest
    /// by less than half the counter range is older, not a wrap.
    pub fn to_ns(&mut self, raw: u64) -> u64 {
        let raw = raw & self.mask;
        let range = u128::from(self.mask) + 1;
        let extended = match self.newest {
            None => u128::from(raw),
            Some((last_raw, last_ext)) => {
                let ahead = u128::from(raw.wrapping_sub(last_raw) & self.mask);
                if ahead < range / 2 {
                    last_ext + ahead
                } else {
                    let behind = range - ahead;
                    last_ext.saturating_sub(behind)
                }
            }
        };
        if self.newest.is_none_or(|(_, last_ext)| extended > last_ext) {
            self.newest = Some((raw, extended));
        }
        let ns = extended * 1_000_000 / u128::from(self.khz);
        u64::try_from(ns).unwrap_or(u64::MAX)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cycles_convert_with_the_core_clock_in_khz() {
        // 1 GHz: one cycle per ns. 156.25 MHz: 6.4 ns per cycle.
        let mut ghz = NicClock::new(1_000_000, u64::MAX).unwrap();
        assert_eq!(ghz.to_ns(1_234), 1_234);
        let mut slow = NicClock::new(156_250, u64::MAX).unwrap();
        assert_eq!(slow.to_ns(1_000), 6_400);
    }

    #[test]
    fn large_cycle_counts_do_not_overflow() {
        let mut clock = NicClock::new(1_000_000, u64::MAX).unwrap();
        assert_eq!(clock.to_ns(u64::MAX / 2), u64::MAX / 2);
    }

    #[test]
    fn a_wrapping_counter_keeps_increasing_in_nanoseconds() {
        // A 16-bit counter at 1 GHz wraps every 65_536 ns.
        let mut clock = NicClock::new(1_000_000, 0xFFFF).unwrap();
        assert_eq!(clock.to_ns(0xFFF0), 0xFFF0);
        assert_eq!(clock.to_ns(0x0010), 0x1_0010);
        assert_eq!(clock.to_ns(0x8000), 0x1_8000);
        assert_eq!(clock.to_ns(0xF000), 0x1_F000);
        assert_eq!(clock.to_ns(0x0001), 0x2_0001);
    }

    #[test]
    fn a_slightly_older_stamp_is_not_taken_for_a_wrap() {
        let mut clock = NicClock::new(1_000_000, 0xFFFF).unwrap();
        assert_eq!(clock.to_ns(0x0010), 0x0010);
        assert_eq!(clock.to_ns(0x0100), 0x0100);
        assert_eq!(clock.to_ns(0x00F0), 0x00F0, "older stamp stays older");
        assert_eq!(
            clock.to_ns(0x0200),
            0x0200,
            "and does not move the newest back"
        );
        // Older across a wrap: newest is just past the wrap, the straggler just before.
        let mut clock = NicClock::new(1_000_000, 0xFFFF).unwrap();
        clock.to_ns(0xFFF0);
        assert_eq!(clock.to_ns(0x0005), 0x1_0005);
        assert_eq!(clock.to_ns(0xFFF8), 0xFFF8);
    }

    #[test]
    fn a_device_without_a_clock_has_no_converter() {
        assert!(NicClock::new(0, u64::MAX).is_none());
        assert!(NicClock::new(1_000, 0).is_none());
    }
}
