//! Root causes with hysteresis, like SLA findings: a cause opens after it was
//! localized in `open_after` consecutive windows with data and clears after
//! `clear_after` such windows without it. Windows without any path data
//! (agents away, controller restarting) neither advance nor reset it.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use super::{CauseKind, RootCause, Signal};

/// What identifies a cause across windows (its side may change as evidence grows).
type CauseKey = (CauseKind, Signal, String);

/// An open (or just cleared) root cause: the latest window's evidence plus its history.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct OpenRootCause {
    #[serde(flatten)]
    pub cause: RootCause,
    /// The window in which it opened.
    pub opened_at_window_ms: u64,
    /// First window of the streak that opened it.
    pub first_window_ms: u64,
    /// Last window it was localized in.
    pub last_window_ms: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cleared_at_window_ms: Option<u64>,
}

#[derive(Debug, Clone)]
struct Entry {
    present: u32,
    absent: u32,
    first_window_ms: u64,
    latest: RootCause,
    last_window_ms: u64,
    open: Option<u64>,
}

/// Causes opened and cleared by one window.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct CauseTransitions {
    pub opened: Vec<OpenRootCause>,
    pub cleared: Vec<OpenRootCause>,
}

#[derive(Debug)]
pub struct CauseTracker {
    open_after: u32,
    clear_after: u32,
    entries: BTreeMap<CauseKey, Entry>,
}

impl CauseTracker {
    pub fn new(open_after: u32, clear_after: u32) -> Self {
        Self {
            open_after: open_after.max(1),
            clear_after: clear_after.max(1),
            entries: BTreeMap::new(),
        }
    }

    pub fn set_windows(&mut self, open_after: u32, clear_after: u32) {
        self.open_after = open_after.max(1);
        self.clear_after = clear_after.max(1);
    }

    /// Feeds one window's localized causes; `had_data` is false for a window
    /// without any path data (then nothing changes).
    pub fn step(
        &mut self,
        window_ms: u64,
        localized: &[RootCause],
        had_data: bool,
    ) -> CauseTransitions {
        let mut transitions = CauseTransitions::default();
        if !had_data {
            return transitions;
        }
        let mut seen = std::collections::BTreeSet::new();
        for cause in localized {
            let key = (cause.kind, cause.signal, cause.component.clone());
            seen.insert(key.clone());
            let entry = self.entries.entry(key).or_insert_with(|| Entry {
                present: 0,
                absent: 0,
                first_window_ms: window_ms,
                latest: cause.clone(),
                last_window_ms: window_ms,
                open: None,
            });
            entry.present += 1;
            entry.absent = 0;
            entry.latest = cause.clone();
            entry.last_window_ms = window_ms;
            if entry.open.is_none() && entry.present >= self.open_after {
                entry.open = Some(window_ms);
                transitions.opened.push(view(entry, None));
            }
        }
        let clear_after = self.clear_after;
        self.entries.retain(|key, entry| {
            if seen.contains(key) {
                return true;
            }
            entry.absent += 1;
            entry.present = 0;
            if entry.open.is_none() {
                // A streak that did not open yet is forgotten at once.
                return false;
            }
            if entry.absent >= clear_after {
                transitions.cleared.push(view(entry, Some(window_ms)));
                return false;
            }
            true
        });
        transitions
    }

    /// Open causes, most confident first.
    pub fn open(&self) -> Vec<OpenRootCause> {
        let mut open: Vec<OpenRootCause> = self
            .entries
            .values()
            .filter(|e| e.open.is_some())
            .map(|e| view(e, None))
            .collect();
        open.sort_by(|a, b| {
            b.cause
                .confidence
                .total_cmp(&a.cause.confidence)
                .then_with(|| a.cause.component.cmp(&b.cause.component))
        });
        open
    }
}

fn view(entry: &Entry, cleared: Option<u64>) -> OpenRootCause {
    OpenRootCause {
        cause: entry.latest.clone(),
        opened_at_window_ms: entry.open.unwrap_or(entry.last_window_ms),
        first_window_ms: entry.first_window_ms,
        last_window_ms: entry.last_window_ms,
        cleared_at_window_ms: cleared,
    }
}
