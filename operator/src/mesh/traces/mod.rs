//! Path traces for fault localization: the controller decides which flows to
//! trace, agents trace them with the flows' own 5-tuples (`ExchangeTraces`),
//! and the hops they report feed the localization's tomography (links on
//! failing flows gain suspicion, links on healthy flows are exonerated).

mod hop_names;
mod planner;

#[cfg(test)]
mod tests;

pub use hop_names::{HopNames, HopNamesError};
pub use planner::{PlannerError, ProbedPath, TracePlanner, TraceSettings};
