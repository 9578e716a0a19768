//! What a simulated agent would have measured: one window summary per
//! pinglist target, and path traces with made-up but consistent hops.

use std::collections::BTreeMap;

use pingmesh_proto::ladder;
use pingmesh_proto::v1;
use rand::Rng;

use crate::fleet::{FaultSet, FleetShape, tor_of_endpoint};

/// Probes sent to `target` in one window, as the agent paces them.
fn probes_per_window(target: &v1::PingTarget, window_ms: u32) -> u64 {
    let n = (target.rate_pps * f64::from(window_ms) / 1_000.0).round();
    if n.is_finite() && n >= 1.0 {
        // Bounded by MAX_RATE_PPS x window: far below u64::MAX.
        #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
        let n = n as u64;
        n
    } else {
        1
    }
}

/// The loss ratio of one flow of a path under the fault model.
fn flow_loss(
    faults: &FaultSet,
    source: &str,
    target: &str,
    source_tor: &str,
    target_tor: &str,
    flow: u32,
    spines: u32,
) -> f64 {
    let mut pass = 1.0;
    if faults.endpoints.contains(source) || faults.endpoints.contains(target) {
        pass *= 1.0 - faults.endpoint_loss;
    }
    if faults.tors.contains(source_tor) || faults.tors.contains(target_tor) {
        pass *= 1.0 - faults.tor_loss;
    }
    if source_tor != target_tor {
        let spine = flow % spines.max(1);
        if faults.links.contains(&(source_tor.to_owned(), spine))
            || faults.links.contains(&(target_tor.to_owned(), spine))
        {
            pass = 0.0;
        }
    }
    1.0 - pass
}

/// The summary an agent would report for `target` over one window.
pub fn summary<R: Rng>(
    shape: &FleetShape,
    faults: &FaultSet,
    target: &v1::PingTarget,
    window_start_ms: u64,
    window_ms: u32,
    rng: &mut R,
) -> v1::WindowSummary {
    let target_id = target.target.as_ref().map_or("", |t| t.id.as_str());
    let target_tor = target
        .target
        .as_ref()
        .map(|t| t.tor.clone())
        .filter(|t| !t.is_empty())
        .or_else(|| tor_of_endpoint(shape, target_id))
        .unwrap_or_default();
    let source_tor = if target.source_tor.is_empty() {
        tor_of_endpoint(shape, &target.source_endpoint).unwrap_or_default()
    } else {
        target.source_tor.clone()
    };
    let sent = probes_per_window(target, window_ms);
    let flows = target.flows.clamp(1, 64);
    let (mut ok, mut lost) = (0u64, 0u64);
    let (mut probed_mask, mut lost_mask) = (0u64, 0u64);
    for flow in 0..flows {
        // Probes go round-robin over the flows.
        let on_flow =
            sent / u64::from(flows) + u64::from(u64::from(flow) < sent % u64::from(flows));
        if on_flow == 0 {
            continue;
        }
        probed_mask |= 1 << flow;
        let p = flow_loss(
            faults,
            &target.source_endpoint,
            target_id,
            &source_tor,
            &target_tor,
            flow,
            shape.spines,
        );
        let lost_here = (0..on_flow).filter(|_| rng.random_bool(p)).count() as u64;
        if lost_here > 0 {
            lost_mask |= 1 << flow;
        }
        lost += lost_here;
        ok += on_flow - lost_here;
    }
    // Network RTT: a few microseconds, more across the spine.
    let base: u64 = if source_tor == target_tor {
        3_000
    } else {
        6_000
    };
    let jitter = rng.random_range(0..500);
    let p50 = base + jitter;
    let p99 = p50 * 2 + rng.random_range(0..2_000);
    let max = p99 + rng.random_range(0..5_000);
    let mut buckets: BTreeMap<u32, u64> = BTreeMap::new();
    if ok > 0 {
        let tail = (ok / 50).max(1).min(ok);
        let body = ok - tail;
        for (value, count) in [(p50, body), (p99, tail.saturating_sub(1)), (max, 1)] {
            if count > 0 {
                let b = u32::try_from(ladder::bucket_of(value)).unwrap_or(0);
                *buckets.entry(b).or_default() += count;
            }
        }
    }
    let delay = |lo: u64| v1::DelayStats {
        min_ns: lo,
        p50_ns: lo * 2,
        p99_ns: lo * 6,
        max_ns: lo * 10,
    };
    v1::WindowSummary {
        window_start_ms,
        window_ms,
        source_endpoint: target.source_endpoint.clone(),
        target_endpoint: target_id.to_owned(),
        kind: target.kind,
        sent,
        ok,
        lost,
        invalid: 0,
        software_timed: 0,
        network_rtt: (ok > 0).then_some(v1::DelayStats {
            min_ns: base,
            p50_ns: p50,
            p99_ns: p99,
            max_ns: max,
        }),
        prober_delay: (ok > 0).then(|| delay(800)),
        responder_delay: (ok > 0).then(|| delay(500)),
        network_rtt_histogram: Some(v1::LadderHistogram {
            buckets: buckets.keys().copied().collect(),
            counts: buckets.values().copied().collect(),
        }),
        lost_flows_mask: lost_mask,
        probed_flows_mask: probed_mask,
    }
}

/// Synthetic switch addresses: ToR `rackR-railI` is 10.255.x.y, spine `k` 10.254.0.k.
fn tor_address(tor: &str) -> String {
    let n = tor
        .bytes()
        .fold(0u32, |h, b| h.wrapping_mul(31).wrapping_add(u32::from(b)));
    format!("10.255.{}.{}", (n >> 8) & 0xff, n & 0xff)
}

fn spine_address(spine: u32) -> String {
    format!("10.254.0.{}", spine + 1)
}

/// Runs a trace request in the model: the hops of the flow through its ToRs
/// and spine (a black-holed link cuts the trace short, as on a real fabric).
pub fn trace(shape: &FleetShape, faults: &FaultSet, request: &v1::TraceRequest) -> v1::TraceResult {
    let (from, to, source_port, flow) = match (&request.prober, &request.target) {
        // Return trace: responder (our endpoint) back to the prober.
        (Some(prober), _) => (
            request.source_endpoint.clone(),
            prober.clone(),
            request.prober_port,
            request.prober_port.saturating_sub(49_152),
        ),
        (None, Some(target)) => (
            request.source_endpoint.clone(),
            target.clone(),
            49_152 + request.flow,
            request.flow,
        ),
        (None, None) => {
            return v1::TraceResult {
                id: request.id,
                error: "bad_request: no target".into(),
                ..v1::TraceResult::default()
            };
        }
    };
    let from_tor = tor_of_endpoint(shape, &from).unwrap_or_default();
    let to_tor = if to.tor.is_empty() {
        tor_of_endpoint(shape, &to.id).unwrap_or_default()
    } else {
        to.tor.clone()
    };
    let spine = flow % shape.spines.max(1);
    let mut hops = vec![tor_address(&from_tor)];
    let mut reached = true;
    if from_tor != to_tor {
        if faults.links.contains(&(from_tor.clone(), spine)) {
            hops.push(String::new());
            reached = false;
        } else {
            hops.push(spine_address(spine));
            if faults.links.contains(&(to_tor.clone(), spine)) {
                hops.push(String::new());
                reached = false;
            } else {
                hops.push(tor_address(&to_tor));
            }
        }
    }
    let from_address = shape
        .node_endpoint_address(&from)
        .unwrap_or_else(|| "::1".into());
    v1::TraceResult {
        id: request.id,
        source_address: from_address,
        source_port,
        destination_address: to.address.clone(),
        destination_port: 4_791,
        flow_label: if to.qpn != 0 { flow + 1 } else { 0 },
        hops,
        reached,
        error: String::new(),
    }
}

impl FleetShape {
    /// The address of endpoint id `node/rnicI` (derived like [`FleetShape::node`]).
    pub fn node_endpoint_address(&self, endpoint_id: &str) -> Option<String> {
        let (node, port) = endpoint_id.split_once('/')?;
        let index: usize = node.strip_prefix("sim-")?.parse().ok()?;
        let rail: usize = port.strip_prefix("rnic")?.parse().ok()?;
        self.node(index)
            .endpoints
            .get(rail)
            .map(|e| e.address.clone())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fleet::{Faults, test_shape};

    fn shape() -> FleetShape {
        test_shape(
            64,
            Faults {
                endpoints: 0,
                endpoint_loss: 0.5,
                tors: 0,
                tor_loss: 0.3,
                links: 0,
            },
        )
    }

    fn target(from: &str, to: &str, rate: f64, flows: u32) -> v1::PingTarget {
        v1::PingTarget {
            source_endpoint: from.into(),
            target: Some(v1::Endpoint {
                id: to.into(),
                ..v1::Endpoint::default()
            }),
            rate_pps: rate,
            flows,
            ..v1::PingTarget::default()
        }
    }

    #[test]
    fn healthy_summary_counts_add_up_and_every_flow_is_probed() {
        let s = shape();
        let mut rng = rand::rng();
        let t = target("sim-000000/rnic0", "sim-000001/rnic0", 10.0, 8);
        let w = summary(&s, &FaultSet::default(), &t, 10_000, 5_000, &mut rng);
        assert_eq!(w.sent, 50);
        assert_eq!(w.ok + w.lost + w.invalid, w.sent);
        assert_eq!(w.lost, 0);
        assert_eq!(w.probed_flows_mask, 0xff);
        let h = w.network_rtt_histogram.unwrap_or_default();
        assert_eq!(h.counts.iter().sum::<u64>(), w.ok);
    }

    #[test]
    fn black_holed_link_loses_exactly_the_flows_on_its_spine() {
        let s = shape();
        let mut faults = FaultSet::default();
        faults.links.insert(("rack00000-rail0".into(), 1));
        let mut rng = rand::rng();
        let t = target("sim-000000/rnic0", "sim-000040/rnic0", 8.0, 8);
        let w = summary(&s, &faults, &t, 0, 5_000, &mut rng);
        assert_eq!(w.lost_flows_mask, (1 << 1) | (1 << 5));
        assert_eq!(w.lost, 10);
        let r = trace(
            &s,
            &faults,
            &v1::TraceRequest {
                id: 7,
                source_endpoint: "sim-000000/rnic0".into(),
                target: Some(s.node(40).endpoints[0].clone()),
                flow: 5,
                ..v1::TraceRequest::default()
            },
        );
        assert!(!r.reached);
        assert_eq!(r.hops.len(), 2);
    }
}
