//! The search behind localization, shared by every level (paths and flows):
//! a greedy minimal hitting set that scores each candidate component by how
//! well "this component is broken" splits failing observations from healthy
//! ones.
//!
//! Each observation (a path, or a flow of a path) went through a few
//! components and saw `lost` of `probes` fail. For a component `c`, the
//! observations through it have loss ratio `r_in`, all others `r_out`. Its
//! score is the log-likelihood gain of two loss rates over one:
//! `LL(in) + LL(out) - LL(all)`. The component at fault maximizes it: a
//! larger one (the ToR of a broken host) mixes healthy observations into
//! `in`, a smaller one (one RNIC of a broken ToR) leaves failing ones in
//! `out`. The best component is blamed, every observation through it is taken
//! out (explained), and the search repeats for further faults. Links on
//! healthy observations are exonerated by the same score: healthy
//! observations through a component lower its `r_in`.

/// What the search needs to know about observations and components.
pub(super) trait Evidence {
    /// Components are `0..component_count()`.
    fn component_count(&self) -> usize;
    /// Observations are `0..observation_count()`.
    fn observation_count(&self) -> usize;
    /// (probes, lost) of one observation.
    fn counts(&self, observation: u32) -> (u64, u64);
    /// The components `observation` went through (appended to `out`).
    fn components_of(&self, observation: u32, out: &mut Vec<u32>);
    /// The observations through `component` (appended to `out`, any order,
    /// duplicates allowed).
    fn observations_of(&self, component: u32, out: &mut Vec<u32>);
    /// Whether `component` may be blamed at all (for example an RNIC of a
    /// node with one RNIC is not: the node stands for it).
    fn blamable(&self, component: u32) -> bool;
    /// Whether a fault of `component` reaches only some of the observations
    /// through it (the links of a ToR: ECMP hashes only some flows of each
    /// path onto the broken one), so that few of them failing is expected.
    fn diluted(&self, _component: u32) -> bool {
        false
    }
    /// A component whose observations, less `component`'s own, are the ones
    /// `component` must stand out from (its siblings: the links of the other
    /// ToRs for the links of one), rather than everything else. A fault of
    /// the parent raises them all alike, and then no sibling is to blame.
    fn baseline(&self, _component: u32) -> Option<u32> {
        None
    }
    /// The tallies of every component over every observation with probes, when the
    /// evidence can sum them faster than one observation at a time; they
    /// must equal what adding each observation to each of its
    /// [`Self::components_of`] gives. `failing(probes, lost)` says whether
    /// an observation counts as failing.
    fn initial_tallies(&self, _failing: &dyn Fn(u64, u64) -> bool) -> Option<Vec<Tally>> {
        None
    }
}

/// When a component may be blamed.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(super) struct Rules {
    /// The component's loss ratio must be above this (the SLA's).
    pub min_loss_ratio: f64,
    /// At least this many lost probes through it.
    pub min_lost: u64,
    /// At least this many failing observations (loss above `min_loss_ratio`)
    /// through it: one bad path alone could be either end's fault.
    pub min_failing: u64,
    /// At least this share of its observations failing: loss spread over
    /// the component, not concentrated on one of its paths.
    pub min_failing_share: f64,
    /// The same for [`Evidence::diluted`] components.
    pub min_failing_share_diluted: f64,
    /// Its loss ratio at least this many times the rest's.
    pub min_contrast: f64,
    /// And this many times its siblings' (see [`Evidence::baseline`]).
    pub min_baseline_contrast: f64,
    /// Least log-likelihood gain (nats): about e^-gain chance of noise.
    pub min_gain: f64,
    /// Most components blamed per search.
    pub max_picks: usize,
}

/// Probes and losses through one component, among observations not yet explained.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(super) struct Tally {
    pub probes: u64,
    pub lost: u64,
    pub observations: u64,
    pub failing: u64,
}

/// One blamed component with its evidence at the time it was picked.
#[derive(Debug, Clone)]
pub(super) struct Pick {
    pub component: u32,
    pub tally: Tally,
    /// Probes and losses of every other observation not yet explained when
    /// it was picked.
    pub elsewhere: (u64, u64),
    pub gain: f64,
    /// Components whose evidence was exactly as good: not told apart.
    pub ties: Vec<u32>,
    /// The observations it explains.
    pub explained: Vec<u32>,
}

impl Tally {
    pub fn add(&mut self, other: &Self) {
        self.probes += other.probes;
        self.lost += other.lost;
        self.observations += other.observations;
        self.failing += other.failing;
    }

    /// Takes out counts that were added before.
    pub fn sub(&mut self, other: &Self) {
        self.probes -= other.probes;
        self.lost -= other.lost;
        self.observations -= other.observations;
        self.failing -= other.failing;
    }
}

impl Pick {
    pub fn loss_ratio(&self) -> f64 {
        ratio(self.tally.lost, self.tally.probes)
    }

    pub fn elsewhere_loss_ratio(&self) -> f64 {
        ratio(self.elsewhere.1, self.elsewhere.0)
    }
}

pub(super) fn ratio(lost: u64, probes: u64) -> f64 {
    if probes == 0 {
        0.0
    } else {
        lost as f64 / probes as f64
    }
}

/// Log-likelihood of `lost` of `probes` at their own ratio.
fn log_likelihood(lost: u64, probes: u64) -> f64 {
    if probes == 0 || lost == 0 || lost >= probes {
        return 0.0;
    }
    let (l, n) = (lost as f64, probes as f64);
    let r = l / n;
    l * r.ln() + (n - l) * (1.0 - r).ln()
}

fn failing(lost: u64, probes: u64, rules: &Rules) -> bool {
    lost > 0 && ratio(lost, probes) > rules.min_loss_ratio
}

/// Running sums over the observations not yet explained.
struct Sums {
    tallies: Vec<Tally>,
    probes: u64,
    lost: u64,
    scratch: Vec<u32>,
}

impl Sums {
    /// Adds (`add`) or takes out observation `o` everywhere it counts.
    fn count(&mut self, evidence: &impl Evidence, rules: &Rules, o: u32, add: bool) {
        let (probes, lost) = evidence.counts(o);
        let bad = u64::from(failing(lost, probes, rules));
        let apply = |sum: &mut u64, by: u64| {
            *sum = if add { *sum + by } else { *sum - by };
        };
        apply(&mut self.probes, probes);
        apply(&mut self.lost, lost);
        self.scratch.clear();
        evidence.components_of(o, &mut self.scratch);
        for &c in &self.scratch {
            let t = &mut self.tallies[c as usize];
            apply(&mut t.probes, probes);
            apply(&mut t.lost, lost);
            apply(&mut t.observations, 1);
            apply(&mut t.failing, bad);
        }
    }
}

/// The components that explain the failing observations, most convincing
/// first (see the module docs).
pub(super) fn explain(evidence: &impl Evidence, rules: &Rules) -> Vec<Pick> {
    let mut sums = Sums {
        tallies: vec![Tally::default(); evidence.component_count()],
        probes: 0,
        lost: 0,
        scratch: Vec::new(),
    };
    let mut active = vec![false; evidence.observation_count()];
    let summed = evidence.initial_tallies(&|probes, lost| failing(lost, probes, rules));
    let summed = summed.filter(|t| t.len() == sums.tallies.len());
    for o in 0..evidence.observation_count() as u32 {
        let (probes, lost) = evidence.counts(o);
        if probes > 0 {
            active[o as usize] = true;
            if summed.is_some() {
                sums.probes += probes;
                sums.lost += lost;
            } else {
                sums.count(evidence, rules, o, true);
            }
        }
    }
    if let Some(tallies) = summed {
        sums.tallies = tallies;
    }

    let mut picks = Vec::new();
    while picks.len() < rules.max_picks && sums.lost > 0 {
        let Some((best, gain, ties)) =
            best_component(evidence, &sums.tallies, (sums.probes, sums.lost), rules)
        else {
            break;
        };
        let tally = sums.tallies[best as usize];
        let elsewhere = (sums.probes - tally.probes, sums.lost - tally.lost);
        let mut explained = Vec::new();
        evidence.observations_of(best, &mut explained);
        explained.sort_unstable();
        explained.dedup();
        explained.retain(|&o| active[o as usize]);
        for &o in &explained {
            active[o as usize] = false;
            sums.count(evidence, rules, o, false);
        }
        picks.push(Pick {
            component: best,
            tally,
            elsewhere,
            gain,
            ties,
            explained,
        });
    }
    picks
}

/// The blamable component with the highest gain that passes the rules, its
/// gain, and the components that tie with it exactly.
fn best_component(
    evidence: &impl Evidence,
    tallies: &[Tally],
    (all_probes, all_lost): (u64, u64),
    rules: &Rules,
) -> Option<(u32, f64, Vec<u32>)> {
    let pooled = log_likelihood(all_lost, all_probes);
    let mut best: Option<(u32, f64)> = None;
    let mut ties = Vec::new();
    for (c, t) in tallies.iter().enumerate() {
        if t.lost < rules.min_lost.max(1) || t.failing < rules.min_failing {
            continue;
        }
        let share = if evidence.diluted(c as u32) {
            rules.min_failing_share_diluted
        } else {
            rules.min_failing_share
        };
        if (t.failing as f64) < share * t.observations as f64 {
            continue;
        }
        let r_in = ratio(t.lost, t.probes);
        let (out_probes, out_lost) = (all_probes - t.probes, all_lost - t.lost);
        let r_out = ratio(out_lost, out_probes);
        if r_in <= rules.min_loss_ratio || r_in < rules.min_contrast * r_out {
            continue;
        }
        if let Some(b) = evidence.baseline(c as u32) {
            let b = &tallies[b as usize];
            let siblings = ratio(
                b.lost.saturating_sub(t.lost),
                b.probes.saturating_sub(t.probes),
            );
            if r_in < rules.min_baseline_contrast * siblings {
                continue;
            }
        }
        let gain = log_likelihood(t.lost, t.probes) + log_likelihood(out_lost, out_probes) - pooled;
        if gain < rules.min_gain || !evidence.blamable(c as u32) {
            continue;
        }
        match best {
            Some((b, g)) if gain <= g => {
                // Same observations, same counts: the evidence cannot tell them apart.
                if tallies[b as usize] == *t && g - gain <= 1e-9 * g.abs().max(1.0) {
                    ties.push(c as u32);
                }
            }
            _ => {
                best = Some((c as u32, gain));
                ties.clear();
            }
        }
    }
    best.map(|(c, g)| (c, g, ties))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Observations over explicit component lists.
    struct Table {
        components: usize,
        rows: Vec<(u64, u64, Vec<u32>)>,
    }

    impl Evidence for Table {
        fn component_count(&self) -> usize {
            self.components
        }
        fn observation_count(&self) -> usize {
            self.rows.len()
        }
        fn counts(&self, o: u32) -> (u64, u64) {
            let (n, l, _) = &self.rows[o as usize];
            (*n, *l)
        }
        fn components_of(&self, o: u32, out: &mut Vec<u32>) {
            out.extend(&self.rows[o as usize].2);
        }
        fn observations_of(&self, c: u32, out: &mut Vec<u32>) {
            for (i, (_, _, cs)) in self.rows.iter().enumerate() {
                if cs.contains(&c) {
                    out.push(i as u32);
                }
            }
        }
        fn blamable(&self, _: u32) -> bool {
            true
        }
    }

    fn rules() -> Rules {
        Rules {
            min_loss_ratio: 0.01,
            min_lost: 3,
            min_failing: 2,
            min_failing_share: 0.2,
            min_failing_share_diluted: 0.02,
            min_contrast: 1.5,
            min_baseline_contrast: 3.0,
            min_gain: 10.0,
            max_picks: 8,
        }
    }

    #[test]
    fn the_component_shared_by_the_failing_observations_is_blamed_not_its_parent() {
        // Components: 0 = broken node, 1 = healthy node, 2 = their ToR.
        let mut rows = Vec::new();
        for _ in 0..4 {
            rows.push((50, 50, vec![0, 2]));
            rows.push((50, 0, vec![1, 2]));
        }
        let picks = explain(
            &Table {
                components: 3,
                rows,
            },
            &rules(),
        );
        assert_eq!(picks.len(), 1);
        assert_eq!(picks[0].component, 0);
        assert_eq!(picks[0].explained, vec![0, 2, 4, 6]);
    }

    #[test]
    fn a_fault_of_the_parent_is_not_split_among_its_children() {
        let mut rows = Vec::new();
        for _ in 0..4 {
            rows.push((50, 10, vec![0, 2]));
            rows.push((50, 10, vec![1, 2]));
            rows.push((50, 0, vec![3]));
        }
        let picks = explain(
            &Table {
                components: 4,
                rows,
            },
            &rules(),
        );
        assert_eq!(picks.len(), 1);
        assert_eq!(picks[0].component, 2);
    }

    #[test]
    fn two_faults_are_both_found_and_a_single_bad_observation_blames_nobody() {
        let mut rows = Vec::new();
        for _ in 0..5 {
            rows.push((50, 25, vec![0]));
            rows.push((50, 25, vec![1]));
            rows.push((50, 0, vec![2]));
        }
        rows.push((50, 50, vec![3]));
        let picks = explain(
            &Table {
                components: 4,
                rows,
            },
            &rules(),
        );
        let mut blamed: Vec<u32> = picks.iter().map(|p| p.component).collect();
        blamed.sort_unstable();
        assert_eq!(blamed, vec![0, 1]);
    }

    #[test]
    fn components_with_identical_evidence_are_reported_as_ties() {
        let rows = (0..4)
            .map(|_| (50, 50, vec![0, 1]))
            .chain((0..4).map(|_| (50, 0, vec![2])))
            .collect();
        let picks = explain(
            &Table {
                components: 3,
                rows,
            },
            &rules(),
        );
        assert_eq!(picks.len(), 1);
        assert_eq!(picks[0].component, 0);
        assert_eq!(picks[0].ties, vec![1]);
    }

    #[test]
    fn healthy_noise_blames_nothing() {
        let rows = (0..200u32)
            .map(|i| (50, u64::from(i % 37 == 0), vec![i % 10]))
            .collect();
        assert!(
            explain(
                &Table {
                    components: 10,
                    rows
                },
                &rules()
            )
            .is_empty()
        );
    }
}
