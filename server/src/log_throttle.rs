//! Rate-limited warnings and errors. During an outage of a dependency (Redis, a CQL node) the same
//! failure repeats for every message, receipt and retry; one line per interval, carrying
//! how many were left out since the previous line, keeps the log readable without hiding
//! that the failure goes on. Time comes from `tokio::time`, so under the simulator it is
//! simulated time.

use std::sync::Mutex;
use std::time::Duration;

use tokio::time::Instant;

/// How often a throttled warning is written at most.
pub const WARN_INTERVAL: Duration = Duration::from_secs(10);

/// Admits one occurrence per interval and counts the rest.
#[derive(Debug)]
pub struct Throttle {
    interval: Duration,
    /// When an occurrence was last admitted, and how many were refused since.
    state: Mutex<Option<(Instant, u64)>>,
}

impl Throttle {
    /// A throttle admitting one occurrence per `interval`.
    pub const fn new(interval: Duration) -> Self {
        Self {
            interval,
            state: Mutex::new(None),
        }
    }

    /// `Some(left_out)` when the occurrence at `now` is to be written, with the number
    /// of occurrences left out since the last one written; `None` to leave it out.
    pub fn admit(&self, now: Instant) -> Option<u64> {
        let mut state = self.state.lock().expect("throttle");
        match *state {
            Some((last, left_out)) if now.saturating_duration_since(last) < self.interval => {
                *state = Some((last, left_out + 1));
                None
            }
            Some((_, left_out)) => {
                *state = Some((now, 0));
                Some(left_out)
            }
            None => {
                *state = Some((now, 0));
                Some(0)
            }
        }
    }
}

/// A `tracing` event at `$level` (a `tracing::Level`) at most once per
/// [`WARN_INTERVAL`] for this call site, with a `left_out` field counting the
/// occurrences not written since the last line.
#[macro_export]
macro_rules! log_throttled {
    ($level:expr, $($arg:tt)+) => {{
        static THROTTLE: $crate::log_throttle::Throttle =
            $crate::log_throttle::Throttle::new($crate::log_throttle::WARN_INTERVAL);
        if let Some(left_out) = THROTTLE.admit(::tokio::time::Instant::now()) {
            ::tracing::event!($level, left_out, $($arg)+);
        }
    }};
}

/// [`log_throttled!`] at WARN.
#[macro_export]
macro_rules! warn_throttled {
    ($($arg:tt)+) => { $crate::log_throttled!(::tracing::Level::WARN, $($arg)+) };
}

/// [`log_throttled!`] at ERROR.
#[macro_export]
macro_rules! error_throttled {
    ($($arg:tt)+) => { $crate::log_throttled!(::tracing::Level::ERROR, $($arg)+) };
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The first occurrence is written, then one per interval with the count between.
    #[test]
    fn admits_one_per_interval_and_counts_the_rest() {
        let throttle = Throttle::new(Duration::from_secs(10));
        let t0 = Instant::now();
        assert_eq!(throttle.admit(t0), Some(0));
        for ms in [1, 500, 9_999] {
            assert_eq!(throttle.admit(t0 + Duration::from_millis(ms)), None);
        }
        assert_eq!(throttle.admit(t0 + Duration::from_secs(10)), Some(3));
        assert_eq!(throttle.admit(t0 + Duration::from_secs(11)), None);
        assert_eq!(throttle.admit(t0 + Duration::from_secs(25)), Some(1));
    }
}
