//! The host's monotonic clock in nanoseconds, the one clock for T1 and T6 and for
//! every user-space fallback timestamp.

use std::sync::OnceLock;
use std::time::Instant;

fn origin() -> Instant {
    static ORIGIN: OnceLock<Instant> = OnceLock::new();
    *ORIGIN.get_or_init(Instant::now)
}

/// Monotonic nanoseconds since the first call in this process (never 0 after
/// the first call, so 0 can mean "missing" on the wire).
pub fn host_now_ns() -> u64 {
    let base = origin();
    u64::try_from(base.elapsed().as_nanos())
        .unwrap_or(u64::MAX)
        .saturating_add(1)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_clock_never_goes_back_and_is_never_zero() {
        let a = host_now_ns();
        let b = host_now_ns();
        assert!(a >= 1);
        assert!(b >= a);
    }
}
