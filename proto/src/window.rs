//! Wall-clock aligned aggregation windows. Every agent and the controller cut
//! time at the same instants, so summaries of one window join across agents.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// Start (Unix ms) of the window containing `unix_ms`.
pub fn window_start(unix_ms: u64, window_ms: u32) -> u64 {
    let w = u64::from(window_ms.max(1));
    unix_ms - unix_ms % w
}

/// Milliseconds since the Unix epoch; 0 if the clock is before 1970.
pub fn unix_now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

/// Time from `unix_ms` until the next window boundary.
pub fn until_next_window(unix_ms: u64, window_ms: u32) -> Duration {
    let w = u64::from(window_ms.max(1));
    Duration::from_millis(w - unix_ms % w)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn windows_are_aligned_to_the_epoch() {
        assert_eq!(window_start(12_345, 5_000), 10_000);
        assert_eq!(window_start(10_000, 5_000), 10_000);
        assert_eq!(window_start(9_999, 5_000), 5_000);
        assert_eq!(
            until_next_window(12_345, 5_000),
            Duration::from_millis(2_655)
        );
    }

    #[test]
    fn zero_window_is_treated_as_one_millisecond() {
        assert_eq!(window_start(7, 0), 7);
    }
}
