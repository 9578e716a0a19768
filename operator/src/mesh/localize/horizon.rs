//! A longer memory for network faults: traced flows of the last
//! [`HORIZON_WINDOWS`] windows, per link and switch.
//!
//! One link of 32 uplinks carries about 1/32 of a ToR's inter-ToR flows:
//! some 50 flows a window at the default probing rates. A link losing 1 %
//! fails one of them every other window, which three windows cannot tell
//! from background noise (0.01-0.02 % of flows). 24 windows hold about
//! 1,200 such flows, 12 failing against 0.24 expected: a clear signal.
//!
//! What is kept is small: per window, how many flows crossed each component
//! (a dense count by component id) and, for each failing flow only, the
//! components it crossed (failing flows are rare). Each window:
//! 1. [`NetworkHorizon::record`] adds the newest window's unexplained
//!    inter-ToR flows (paths no endpoint, host or ToR explains) and drops
//!    the oldest window;
//! 2. [`NetworkHorizon::decide`] runs a greedy hitting set over the whole
//!    horizon: each component is scored by how unlikely its failing flows
//!    are under the fleet's background rate (a Poisson tail); the most
//!    significant one is picked, its failing flows are explained away (so
//!    the links of a lossy spine, whose failures the spine explains, are
//!    not blamed beside it), and the search goes on.
//!
//! A strong fault is named in the window it starts: 50 failing flows of 50
//! are significant at once. A picked component is reported only while its
//! fault plausibly goes on: the healthy flows through it since its last
//! failing one must not make its estimated loss rate implausible
//! (`(1 - rate)^clean >= STILL_FAILING`). A 100 % or 10 % fault is therefore
//! dropped after one clean window, a 1 % one after about nine (450 clean
//! flows); either way it is dropped at the latest when its failing flows
//! leave the horizon.

use std::collections::HashMap;

use super::flows::{FlowEvidence, Hop};

/// Windows the horizon holds.
pub const HORIZON_WINDOWS: usize = 24;

/// Least number of failing flows through a component to blame it.
const MIN_FAILING: u64 = 5;
/// Least significance (nats: -ln of the chance that background loss alone
/// fails that many of its flows). About 10^4 components tested every
/// window: 18 nats is a 1.5e-8 chance each.
const MIN_SIGNIFICANCE: f64 = 18.0;
/// Its failing share at least this many times the background's.
const MIN_CONTRAST: f64 = 4.0;
/// The background rate is never taken below this (a fabric that lost
/// nothing at all must not make one lost flow significant).
const BACKGROUND_FLOOR: f64 = 1e-4;
/// A picked component whose clean flows since its last failing one had less
/// than this chance at its estimated rate is taken as healed.
const STILL_FAILING: f64 = 0.01;
/// Most components named at once.
const MAX_PICKS: usize = 32;
/// Beyond this many known components (hop names churned), the horizon
/// starts over rather than grow without bound.
const MAX_COMPONENTS: usize = 4_000_000;

/// One window of the horizon.
#[derive(Debug, Default)]
struct Window {
    /// Flows through each component, by horizon id (shorter: zero beyond).
    flows: Vec<u32>,
    /// Flows in the window.
    total: u64,
    /// Components (horizon ids) of each failing flow.
    failing: Vec<Box<[u32]>>,
}

#[derive(Debug, Default)]
struct State {
    ids: HashMap<Hop, u32, foldhash::fast::RandomState>,
    hops: Vec<Hop>,
    /// Oldest first.
    windows: std::collections::VecDeque<Window>,
    /// Flows through each component over the horizon.
    flows: Vec<u64>,
    total: u64,
}

/// What the localizer remembers of traced flows between windows; the
/// analyzer keeps one. Shared references suffice (localization only reads
/// the window), hence the lock inside.
#[derive(Debug, Default)]
pub struct NetworkHorizon {
    state: std::sync::Mutex<State>,
}

/// A component the horizon blames, with its evidence over the horizon.
#[derive(Debug, Clone, PartialEq)]
pub(super) struct HorizonPick {
    pub hop: Hop,
    /// Flows through it and failing ones (not explained by earlier picks).
    pub flows: u64,
    pub failing: u64,
    /// Failing share of every flow not explained by earlier picks.
    pub background: f64,
    pub significance: f64,
    /// Components whose evidence is exactly the same.
    pub ties: Vec<Hop>,
    /// Windows of data behind it.
    pub windows: usize,
}

impl NetworkHorizon {
    pub fn new() -> Self {
        Self::default()
    }

    /// Windows held now.
    pub fn windows(&self) -> usize {
        self.lock().windows.len()
    }

    /// Traced flows held now.
    pub fn flows(&self) -> u64 {
        self.lock().total
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        // A panic elsewhere while holding it leaves counts that are still
        // consistent enough to go on with.
        self.state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Adds one window's flows (none: a window without traced flows, which
    /// still ages the others) and forgets the oldest beyond
    /// [`HORIZON_WINDOWS`].
    pub(super) fn record(&self, flows: Option<&FlowEvidence>) {
        let mut state = self.lock();
        let components = flows.map_or(&[][..], |f| &f.components[..]);
        if state.hops.len() + components.len() > MAX_COMPONENTS {
            *state = State::default();
        }
        let state = &mut *state;
        // This window's component index -> horizon id.
        let local: Vec<u32> = components
            .iter()
            .map(|hop| {
                if let Some(&id) = state.ids.get(hop) {
                    return id;
                }
                let id = state.hops.len() as u32;
                state.hops.push(hop.clone());
                state.ids.insert(hop.clone(), id);
                id
            })
            .collect();
        let mut window = Window {
            flows: vec![0; state.hops.len()],
            ..Window::default()
        };
        for f in 0..flows.map_or(0, FlowEvidence::flow_count) {
            let Some((lost, members, _)) = flows.map(|e| e.flow(f)) else {
                break;
            };
            window.total += 1;
            for &c in members {
                window.flows[local[c as usize] as usize] += 1;
            }
            if lost {
                window.failing.push(
                    members
                        .iter()
                        .map(|&c| local[c as usize])
                        .collect::<Box<[u32]>>(),
                );
            }
        }
        state.flows.resize(state.hops.len(), 0);
        for (sum, &n) in state.flows.iter_mut().zip(&window.flows) {
            *sum += u64::from(n);
        }
        state.total += window.total;
        state.windows.push_back(window);
        while state.windows.len() > HORIZON_WINDOWS {
            if let Some(old) = state.windows.pop_front() {
                for (sum, &n) in state.flows.iter_mut().zip(&old.flows) {
                    *sum -= u64::from(n);
                }
                state.total -= old.total;
            }
        }
    }

    /// The links and switches the horizon blames, most significant first;
    /// `min_rate` is the least failing share above the background worth
    /// naming (half the SLA's loss ratio).
    pub(super) fn decide(&self, min_rate: f64) -> Vec<HorizonPick> {
        let state = self.lock();
        let n = state.hops.len();
        let mut failing = vec![0u64; n];
        // Newest window (index into `windows`) with a failing flow through it.
        let mut last_failing = vec![usize::MAX; n];
        let mut alive = Vec::new();
        let mut through: Vec<Vec<u32>> = vec![Vec::new(); n];
        let mut all_failing = 0u64;
        for (w, window) in state.windows.iter().enumerate() {
            for members in &window.failing {
                let f = alive.len() as u32;
                alive.push((w, &**members));
                all_failing += 1;
                for &c in &**members {
                    failing[c as usize] += 1;
                    last_failing[c as usize] = w;
                    through[c as usize].push(f);
                }
            }
        }
        let mut explained = vec![false; alive.len()];
        let mut picked = vec![false; n];
        let (mut rest_total, mut rest_failing) = (state.total, all_failing);
        let mut picks = Vec::new();
        for _ in 0..MAX_PICKS {
            if rest_failing == 0 {
                break;
            }
            // (component, significance, background elsewhere)
            let mut best: Option<(usize, f64, f64)> = None;
            let mut ties = Vec::new();
            for c in 0..n {
                let (k, flows) = (failing[c], state.flows[c]);
                if picked[c] || k < MIN_FAILING || flows == 0 {
                    continue;
                }
                // Everyone else's failing share: the component's own
                // failures must not raise the bar it is measured against.
                let background = (rest_failing.saturating_sub(k) as f64
                    / rest_total.saturating_sub(flows).max(1) as f64)
                    .max(BACKGROUND_FLOOR);
                let rate = k as f64 / flows as f64;
                if rate < MIN_CONTRAST * background || rate - background < min_rate {
                    continue;
                }
                let significance = poisson_tail_nats(k, flows as f64 * background);
                if significance < MIN_SIGNIFICANCE {
                    continue;
                }
                match best {
                    Some((b, s, _)) if significance <= s => {
                        if failing[b] == k
                            && state.flows[b] == flows
                            && s - significance <= 1e-9 * s
                        {
                            ties.push(c);
                        }
                    }
                    _ => {
                        best = Some((c, significance, background));
                        ties.clear();
                    }
                }
            }
            let Some((c, significance, background)) = best else {
                break;
            };
            picked[c] = true;
            let (k, flows) = (failing[c], state.flows[c]);
            // Healthy flows through it in the windows after its last failing one.
            let clean: u64 = state
                .windows
                .iter()
                .skip(last_failing[c].saturating_add(1))
                .map(|w| u64::from(w.flows.get(c).copied().unwrap_or(0)))
                .sum();
            let rate = k as f64 / flows as f64;
            let healed = (1.0 - rate).powf(clean as f64) < STILL_FAILING;
            for &f in &through[c] {
                if std::mem::replace(&mut explained[f as usize], true) {
                    continue;
                }
                rest_failing -= 1;
                for &other in alive[f as usize].1 {
                    failing[other as usize] -= 1;
                }
            }
            rest_total = rest_total.saturating_sub(flows);
            // A healed one still explains its old failures (so they blame
            // nothing else); it is not reported.
            if !healed {
                picks.push(HorizonPick {
                    hop: state.hops[c].clone(),
                    flows,
                    failing: k,
                    background,
                    significance,
                    ties: ties.iter().map(|&t| state.hops[t].clone()).collect(),
                    windows: state.windows.len(),
                });
            }
        }
        picks
    }
}

/// -ln P(X >= k) for X ~ Poisson(lambda); 0 unless k is above lambda.
pub(super) fn poisson_tail_nats(k: u64, lambda: f64) -> f64 {
    let kf = k as f64;
    if k == 0 || kf <= lambda {
        return 0.0;
    }
    if lambda <= 0.0 {
        return f64::INFINITY;
    }
    // P(X = k) times the sum of the ratios of the later terms to it.
    let log_first = -lambda + kf * lambda.ln() - ln_factorial(k);
    let (mut term, mut sum) = (1.0f64, 1.0f64);
    let mut i = kf;
    for _ in 0..1000 {
        i += 1.0;
        term *= lambda / i;
        sum += term;
        if term < 1e-12 * sum {
            break;
        }
    }
    // What is left is below a geometric series of the last ratio.
    let r = lambda / (i + 1.0);
    sum += term * r / (1.0 - r);
    (-(log_first + sum.ln())).max(0.0)
}

fn ln_factorial(k: u64) -> f64 {
    if k < 32 {
        return (2..=k).map(|i| (i as f64).ln()).sum();
    }
    // Stirling's series: exact to 1e-10 here.
    let x = k as f64;
    x * x.ln() - x + 0.5 * (2.0 * std::f64::consts::PI * x).ln() + 1.0 / (12.0 * x)
        - 1.0 / (360.0 * x * x * x)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_poisson_tail_matches_direct_sums() {
        // P(X >= 7 | 0.2) = 2.54e-9 (direct sum of the first terms).
        let p: f64 = (7..40)
            .map(|i| (-0.2f64).exp() * 0.2f64.powi(i) / (1..=i).map(f64::from).product::<f64>())
            .sum();
        assert!((poisson_tail_nats(7, 0.2) - (-p.ln())).abs() < 1e-6);
        // At or below the mean: not significant at all.
        assert!(poisson_tail_nats(3, 3.0) <= 0.0);
        assert!(poisson_tail_nats(0, 0.0) <= 0.0);
        assert!(poisson_tail_nats(5, 0.0).is_infinite());
        // Large counts stay finite and grow with the excess.
        let (a, b) = (poisson_tail_nats(200, 100.0), poisson_tail_nats(300, 100.0));
        assert!(a.is_finite() && a > 30.0 && b > a, "{a} {b}");
    }

    #[test]
    fn stirling_meets_the_direct_sum_where_they_switch() {
        let direct: f64 = (2..=40u32).map(|i| f64::from(i).ln()).sum();
        assert!((ln_factorial(40) - direct).abs() < 1e-9);
    }
}
