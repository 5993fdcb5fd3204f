//! Rate limits for log lines a guest can trigger.
//!
//! A guest decides how often it sends a malformed request or pokes a register
//! the wrong way; one host log line each would let it fill the host's disk or
//! drown other VMs' logs. Every such line goes through a [`LogThrottle`]
//! keyed by what happened (a validation rule, a transport oddity): per key,
//! at most [`LINES_PER_WINDOW`] lines per [`WINDOW`], and the first line after
//! a suppression says how many similar lines were dropped. The counters in
//! `--metrics` count every event; the log is only for a human to notice.
//!
//! Worst case per device: (number of keys) × [`LINES_PER_WINDOW`] lines a
//! minute, whatever the guest does.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Lines per key and window before the rest are suppressed.
pub const LINES_PER_WINDOW: u32 = 5;

/// The window over which [`LINES_PER_WINDOW`] applies.
pub const WINDOW: Duration = Duration::from_secs(60);

#[derive(Debug)]
struct KeyState {
    window_start: Instant,
    logged: u32,
    suppressed: u64,
}

/// Per-key log-line budget. Shared between threads (vCPU threads reach the
/// transport, the event loop the queue worker); the lock is held only to
/// update a few numbers, never while logging.
#[derive(Debug, Default)]
pub struct LogThrottle {
    keys: Mutex<HashMap<&'static str, KeyState>>,
}

/// What to do with one line.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verdict {
    /// Log it; `suppressed` lines of this key were dropped since the last one
    /// logged (say so in the line when non-zero).
    Log {
        /// Lines dropped before this one.
        suppressed: u64,
    },
    /// Drop it.
    Suppress,
}

impl LogThrottle {
    /// Whether a line for `key` may be logged at `now`.
    pub fn check(&self, key: &'static str, now: Instant) -> Verdict {
        let mut keys = self.keys.lock().unwrap_or_else(|p| p.into_inner());
        let state = keys.entry(key).or_insert(KeyState {
            window_start: now,
            logged: 0,
            suppressed: 0,
        });
        if now.saturating_duration_since(state.window_start) >= WINDOW {
            state.window_start = now;
            state.logged = 0;
        }
        if state.logged < LINES_PER_WINDOW {
            state.logged += 1;
            let suppressed = std::mem::take(&mut state.suppressed);
            Verdict::Log { suppressed }
        } else {
            state.suppressed += 1;
            Verdict::Suppress
        }
    }

    /// Logs `message()` at WARN under `key` if the budget allows. The
    /// message is only formatted when it is logged.
    pub fn warn(&self, key: &'static str, message: impl FnOnce() -> String) {
        self.log(log::Level::Warn, key, message);
    }

    /// Logs `message()` at `level` under `key` if the budget allows: for
    /// host failures a guest may be able to provoke again and again.
    pub fn log(&self, level: log::Level, key: &'static str, message: impl FnOnce() -> String) {
        if let Verdict::Log { suppressed } = self.check(key, Instant::now()) {
            if suppressed == 0 {
                log::log!(level, "{}", message());
            } else {
                log::log!(
                    level,
                    "{} ({suppressed} similar lines suppressed before this one)",
                    message()
                );
            }
        }
    }
}

/// `warn!` through a [`LogThrottle`], keyed by the call site: for lines a
/// guest can trigger at will. `guest_warn!(throttle, "format", args...)`.
macro_rules! guest_warn {
    ($throttle:expr, $($arg:tt)+) => {
        $throttle.warn(concat!(file!(), ":", line!()), || format!($($arg)+))
    };
}
pub(crate) use guest_warn;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_key_gets_its_budget_then_a_count_of_what_it_lost() {
        let throttle = LogThrottle::default();
        let t0 = Instant::now();
        let logged = (0..1000)
            .filter(|_| throttle.check("rule", t0) != Verdict::Suppress)
            .count();
        assert_eq!(logged, LINES_PER_WINDOW as usize);
        // Another key has a budget of its own.
        assert_eq!(throttle.check("other", t0), Verdict::Log { suppressed: 0 });
        // Still inside the window: suppressed.
        assert_eq!(throttle.check("rule", t0 + WINDOW / 2), Verdict::Suppress);
        // The next window's first line reports every line dropped.
        assert_eq!(
            throttle.check("rule", t0 + WINDOW),
            Verdict::Log {
                suppressed: 1000 - u64::from(LINES_PER_WINDOW) + 1
            }
        );
        assert_eq!(
            throttle.check("rule", t0 + WINDOW),
            Verdict::Log { suppressed: 0 }
        );
    }
}
