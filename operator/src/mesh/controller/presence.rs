//! When a node's agent was connected, session by session.
//!
//! A window counts a node as present only when one session of its agent was
//! connected for all of it: an agent that registered again (an RNIC re-opened
//! with a new QPN, a reconnect after an outage) is a new session, and probes
//! sent to the old one's endpoints during the switch are not the network's
//! fault. A session ends when its last pinglist stream closes, or when the
//! node registers again, whichever comes first: the old stream may linger a
//! while before the server notices it is gone, and must not stand in for the
//! new session meanwhile.

use std::collections::VecDeque;

/// Sessions remembered per node: the current one and enough before it to
/// judge the windows still waiting for their reports.
const MAX_SPANS: usize = 8;

/// One session's time on the pinglist stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Span {
    session: u64,
    open_streams: u32,
    since_ms: u64,
    /// When the session stopped counting (last stream closed, or the node
    /// registered again); `None` while it counts.
    ended_ms: Option<u64>,
}

/// When a node's agent was connected, and under which session.
#[derive(Debug, Clone, Default)]
pub(super) struct Presence {
    /// The node's registered session (0: none known yet).
    pub session: u64,
    /// When presence was last written to the registry.
    pub persisted_ms: u64,
    /// Oldest first.
    spans: VecDeque<Span>,
}

impl Presence {
    /// The node registered again as `session` at `now_ms`: every other
    /// session stops counting now, even if its stream is still open.
    pub fn registered(&mut self, session: u64, now_ms: u64) {
        self.session = session;
        for span in &mut self.spans {
            if span.session != session && span.ended_ms.is_none() {
                span.ended_ms = Some(now_ms);
            }
        }
    }

    /// A pinglist stream of `session` opened at `now_ms`.
    pub fn connect(&mut self, session: u64, now_ms: u64) {
        if let Some(span) = self
            .spans
            .iter_mut()
            .rev()
            .find(|s| s.session == session && s.ended_ms.is_none())
        {
            span.open_streams += 1;
            return;
        }
        self.spans.push_back(Span {
            session,
            open_streams: 1,
            since_ms: now_ms,
            ended_ms: None,
        });
        while self.spans.len() > MAX_SPANS {
            // The oldest span that has ended, else the oldest of all.
            let drop = self
                .spans
                .iter()
                .position(|s| s.ended_ms.is_some())
                .unwrap_or(0);
            self.spans.remove(drop);
        }
    }

    /// A pinglist stream of `session` closed at `now_ms`.
    pub fn disconnect(&mut self, session: u64, now_ms: u64) {
        if let Some(span) = self
            .spans
            .iter_mut()
            .rev()
            .find(|s| s.session == session && s.open_streams > 0)
        {
            span.open_streams -= 1;
            if span.open_streams == 0 && span.ended_ms.is_none() {
                span.ended_ms = Some(now_ms);
            }
        }
    }

    /// Whether any pinglist stream of the node is open.
    pub fn connected(&self) -> bool {
        self.spans.iter().any(|s| s.open_streams > 0)
    }

    /// Whether one session was connected from `from_ms` through `until_ms`.
    pub fn present(&self, from_ms: u64, until_ms: u64) -> bool {
        self.spans
            .iter()
            .any(|s| s.since_ms <= from_ms && s.ended_ms.is_none_or(|end| end >= until_ms))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_session_connected_all_window_is_present() {
        let mut p = Presence::default();
        p.registered(1, 10);
        p.connect(1, 100);
        assert!(p.connected());
        assert!(p.present(100, 500));
        assert!(!p.present(99, 500), "connected after the window began");
        p.disconnect(1, 400);
        assert!(!p.connected());
        assert!(
            !p.present(100, 500),
            "gone before the window's probes timed out"
        );
        assert!(p.present(100, 400));
    }

    #[test]
    fn registering_again_ends_the_old_session_though_its_stream_is_open() {
        let mut p = Presence::default();
        p.registered(1, 0);
        p.connect(1, 100);
        p.registered(2, 300);
        p.connect(2, 310);
        assert!(!p.present(200, 500), "neither session covers the window");
        assert!(
            p.present(100, 300),
            "the old session covers what came before"
        );
        assert!(p.present(310, 900), "the new one what comes after");
        // The old stream closing late changes nothing.
        p.disconnect(1, 600);
        assert!(!p.present(200, 500));
        assert!(p.connected());
    }

    #[test]
    fn a_gap_between_streams_of_one_session_is_absence() {
        let mut p = Presence::default();
        p.registered(1, 0);
        p.connect(1, 100);
        p.disconnect(1, 200);
        p.connect(1, 250);
        assert!(!p.present(150, 400));
        assert!(p.present(250, 400));
    }

    #[test]
    fn two_streams_of_one_session_keep_it_present_until_both_close() {
        let mut p = Presence::default();
        p.registered(1, 0);
        p.connect(1, 100);
        p.connect(1, 150);
        p.disconnect(1, 200);
        assert!(p.present(100, 1_000));
        p.disconnect(1, 300);
        assert!(!p.present(100, 1_000));
        assert!(!p.connected());
    }

    #[test]
    fn old_sessions_are_forgotten_beyond_a_bound() {
        let mut p = Presence::default();
        for session in 1..=100 {
            p.registered(session, session * 10);
            p.connect(session, session * 10);
        }
        assert_eq!(p.spans.len(), MAX_SPANS);
        assert!(p.present(1_000, 5_000), "the current session is kept");
        // A stray disconnect of a forgotten session is harmless.
        p.disconnect(1, 2_000);
        assert!(p.connected());
    }
}
