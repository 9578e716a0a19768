//! Six-timestamp arithmetic and sample validity.
//!
//! Each difference is taken between two readings of one clock:
//! T5 - T2 on the prober's kernel/NIC clock (or its host clock as a fallback),
//! T4 - T3 on the responder's, T6 - T1 on the prober's host monotonic clock.
//! No clock is ever compared with another machine's, so no sync is needed.

/// When a prober-side event happened: the host monotonic reading taken by user
/// space, and the kernel/NIC timestamp if the transport delivered one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Stamp {
    pub host_ns: u64,
    pub kernel_ns: Option<u64>,
}

impl Stamp {
    pub fn host(host_ns: u64) -> Self {
        Self {
            host_ns,
            kernel_ns: None,
        }
    }
}

/// Everything one completed probe measured.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ProbeTimes {
    /// T1: host monotonic, just before the probe was posted.
    pub t1_host_ns: u64,
    /// T2: probe send completion.
    pub t2: Stamp,
    /// T3: responder receive completion (responder clock).
    pub t3_ns: u64,
    /// T4: responder ACK1 send completion (responder clock).
    pub t4_ns: u64,
    /// The responder had no kernel timestamps for T3/T4.
    pub responder_software_timed: bool,
    /// T5: ACK1 receive completion.
    pub t5: Stamp,
    /// T6: host monotonic when the prober handled ACK1's completion (the host
    /// part of T5's stamp). Not ACK2's arrival: that would charge the
    /// responder's wait for ACK1's TX stamp and ACK2's flight to the prober.
    pub t6_host_ns: u64,
}

/// Above this a "network RTT" is a broken clock, not a slow network.
pub const MAX_PLAUSIBLE_NS: u64 = 10_000_000_000;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Sample {
    pub network_rtt_ns: u64,
    pub prober_delay_ns: u64,
    pub responder_delay_ns: u64,
    /// Some difference fell back to user-space timestamps, so host scheduling
    /// noise may be inside the network RTT.
    pub software_timed: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum InvalidReason {
    ZeroTimestamp,
    NegativeNetworkRtt,
    AbsurdNetworkRtt,
    NegativeResponderDelay,
    NegativeProberDelay,
}

impl InvalidReason {
    pub fn category(self) -> &'static str {
        match self {
            Self::ZeroTimestamp => "zero_timestamp",
            Self::NegativeNetworkRtt => "negative_network_rtt",
            Self::AbsurdNetworkRtt => "absurd_network_rtt",
            Self::NegativeResponderDelay => "negative_responder_delay",
            Self::NegativeProberDelay => "negative_prober_delay",
        }
    }
}

/// Computes the three delays, or says why the sample is invalid.
///
/// network RTT = (T5 - T2) - (T4 - T3); responder delay = T4 - T3;
/// prober delay = (T6 - T1) - (T5 - T2).
pub fn classify(t: &ProbeTimes) -> Result<Sample, InvalidReason> {
    // Prober pair: kernel stamps only if both ends have one, else both host readings.
    let (t2, t5, prober_soft) = match (t.t2.kernel_ns, t.t5.kernel_ns) {
        (Some(a), Some(b)) => (a, b, false),
        _ => (t.t2.host_ns, t.t5.host_ns, true),
    };
    if [t.t1_host_ns, t2, t.t3_ns, t.t4_ns, t5, t.t6_host_ns].contains(&0) {
        return Err(InvalidReason::ZeroTimestamp);
    }
    let responder = i128::from(t.t4_ns) - i128::from(t.t3_ns);
    if responder < 0 {
        return Err(InvalidReason::NegativeResponderDelay);
    }
    let on_wire_and_responder = i128::from(t5) - i128::from(t2);
    let network = on_wire_and_responder - responder;
    if network < 0 {
        return Err(InvalidReason::NegativeNetworkRtt);
    }
    if network > i128::from(MAX_PLAUSIBLE_NS) {
        return Err(InvalidReason::AbsurdNetworkRtt);
    }
    let total = i128::from(t.t6_host_ns) - i128::from(t.t1_host_ns);
    let prober = total - on_wire_and_responder;
    if prober < 0 {
        return Err(InvalidReason::NegativeProberDelay);
    }
    let to_u64 = |v: i128| u64::try_from(v).unwrap_or(u64::MAX);
    Ok(Sample {
        network_rtt_ns: to_u64(network),
        prober_delay_ns: to_u64(prober),
        responder_delay_ns: to_u64(responder),
        software_timed: prober_soft || t.responder_software_timed,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn times() -> ProbeTimes {
        // Prober kernel clock around 1_000_000, responder clock around 9_000_000,
        // host clock around 500: three unrelated clocks.
        ProbeTimes {
            t1_host_ns: 500,
            t2: Stamp {
                host_ns: 700,
                kernel_ns: Some(1_000_000),
            },
            t3_ns: 9_000_000,
            t4_ns: 9_000_300,
            responder_software_timed: false,
            t5: Stamp {
                host_ns: 3_000,
                kernel_ns: Some(1_002_300),
            },
            t6_host_ns: 3_500,
        }
    }

    #[test]
    fn splits_rtt_into_network_prober_and_responder_delay_across_unrelated_clocks() {
        let s = classify(&times()).unwrap();
        assert_eq!(s.responder_delay_ns, 300);
        assert_eq!(s.network_rtt_ns, 2_000);
        // (3500 - 500) - (1_002_300 - 1_000_000) = 700
        assert_eq!(s.prober_delay_ns, 700);
        assert!(!s.software_timed);
    }

    #[test]
    fn falls_back_to_host_pairs_and_flags_software_timing() {
        let mut t = times();
        t.t5.kernel_ns = None; // no RX timestamp: both prober stamps use the host clock
        let s = classify(&t).unwrap();
        assert_eq!(s.network_rtt_ns, 3_000 - 700 - 300);
        assert!(s.software_timed);

        let mut t = times();
        t.responder_software_timed = true;
        assert!(classify(&t).unwrap().software_timed);
    }

    #[test]
    fn invalid_samples_say_why() {
        let mut t = times();
        t.t3_ns = 0;
        assert_eq!(classify(&t), Err(InvalidReason::ZeroTimestamp));
        let mut t = times();
        t.t4_ns = t.t3_ns - 1;
        assert_eq!(classify(&t), Err(InvalidReason::NegativeResponderDelay));
        let mut t = times();
        t.t4_ns = t.t3_ns + 5_000; // responder claims longer than the whole round trip
        assert_eq!(classify(&t), Err(InvalidReason::NegativeNetworkRtt));
        let mut t = times();
        t.t5.kernel_ns = Some(1_000_000 + MAX_PLAUSIBLE_NS + 1_000);
        t.t6_host_ns = u64::MAX / 2;
        assert_eq!(classify(&t), Err(InvalidReason::AbsurdNetworkRtt));
        let mut t = times();
        t.t6_host_ns = 600; // total shorter than the wire time
        assert_eq!(classify(&t), Err(InvalidReason::NegativeProberDelay));
    }
}
