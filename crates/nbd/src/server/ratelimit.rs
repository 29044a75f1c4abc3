//! Rate limits for log lines that a client (or a failing disk) can make the server repeat:
//! I/O errors returned to clients, refused connections.
//!
//! Owns the counting only: at most [`RateLimit::PER_SECOND`] lines per one-second window; the
//! lines over that are counted, and the count is handed to the next line logged (or to
//! [`RateLimit::take_suppressed`]) so the log says how many were left out. Owns no message
//! text; callers log.

use std::sync::Mutex;
use std::time::{Duration, Instant};

use super::lock;

/// Counts events of one kind and says which of them may be logged.
#[derive(Debug, Default)]
pub(crate) struct RateLimit {
    state: Mutex<Window>,
}

#[derive(Debug, Default)]
struct Window {
    /// Start of the current window; `None` before the first event.
    start: Option<Instant>,
    /// Lines logged in the current window.
    logged: u32,
    /// Events not logged since the last line that reported them.
    suppressed: u64,
}

impl RateLimit {
    /// Lines logged per one-second window, at most.
    pub(crate) const PER_SECOND: u32 = 10;
    const WINDOW: Duration = Duration::from_secs(1);

    /// Notes one event now. `Some(n)`: log it, saying that `n` events before it were not
    /// logged; `None`: do not log it (it is counted).
    pub(crate) fn admit(&self) -> Option<u64> {
        self.admit_at(Instant::now())
    }

    fn admit_at(&self, now: Instant) -> Option<u64> {
        let mut w = lock(&self.state);
        if w.start.is_none_or(|s| now.saturating_duration_since(s) >= Self::WINDOW) {
            w.start = Some(now);
            w.logged = 0;
        }
        if w.logged < Self::PER_SECOND {
            w.logged += 1;
            Some(std::mem::take(&mut w.suppressed))
        } else {
            w.suppressed += 1;
            None
        }
    }

    /// The events not logged and not yet reported, now reported (zero if none).
    pub(crate) fn take_suppressed(&self) -> u64 {
        std::mem::take(&mut lock(&self.state).suppressed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_storm_logs_a_few_lines_per_second_and_counts_the_rest() {
        let r = RateLimit::default();
        let t0 = Instant::now();
        let logged = (0..1000).filter(|_| r.admit_at(t0).is_some()).count();
        assert_eq!(logged, RateLimit::PER_SECOND as usize);
        // The next window's first line reports what the last one left out.
        assert_eq!(
            r.admit_at(t0 + Duration::from_millis(1500)),
            Some(1000 - u64::from(RateLimit::PER_SECOND))
        );
        assert_eq!(r.admit_at(t0 + Duration::from_millis(1600)), Some(0));
        for _ in 0..20 {
            r.admit_at(t0 + Duration::from_millis(1700));
        }
        assert_eq!(r.take_suppressed(), 20 - u64::from(RateLimit::PER_SECOND) + 2);
        assert_eq!(r.take_suppressed(), 0);
    }
}
