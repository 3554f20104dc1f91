//! Per-user rate limits: a token bucket per user, refilled at a steady rate up
//! to a burst, on the service's clock (so the simulator drives it too).
//!
//! A user whose bucket is full holds no memory: buckets that refilled to the
//! burst are forgotten when the map grows, so memory follows the users who sent
//! recently, not every user ever seen.

use std::collections::HashMap;
use std::sync::Mutex;

/// How fast and how much at once one user may do something.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Rate {
    /// Sustained operations per second.
    pub per_sec: f64,
    /// Operations allowed at once after a quiet spell.
    pub burst: u32,
}

impl Rate {
    /// Checks the rate makes sense (positive, a burst of at least one).
    pub fn validate(&self, what: &str) -> Result<(), String> {
        if !(self.per_sec.is_finite() && self.per_sec > 0.0) || self.burst == 0 {
            return Err(format!("the {what} rate and burst must be positive"));
        }
        Ok(())
    }
}

#[derive(Debug, Clone, Copy)]
struct Bucket {
    tokens: f64,
    at_ms: u64,
}

/// Token buckets of one kind of operation, by user.
#[derive(Debug)]
pub struct RateLimiter {
    rate: Rate,
    buckets: Mutex<Buckets>,
}

#[derive(Debug, Default)]
struct Buckets {
    by_user: HashMap<String, Bucket>,
    /// Size after the last sweep of full buckets; the next sweep at twice it.
    swept_len: usize,
}

/// Buckets kept before the first sweep of full ones.
const SWEEP_LEN_MIN: usize = 1024;

impl RateLimiter {
    /// Buckets refilled at `rate`.
    pub fn new(rate: Rate) -> Self {
        assert!(rate.validate("limiter").is_ok(), "invalid rate {rate:?}");
        Self {
            rate,
            buckets: Mutex::new(Buckets::default()),
        }
    }

    /// Takes one token of `user`'s bucket at `now_ms`: `Ok` if there was one,
    /// else `Err(ms)`: how long until there is.
    pub fn take(&self, user: &str, now_ms: u64) -> Result<(), u64> {
        let burst = f64::from(self.rate.burst);
        let mut b = self.buckets.lock().expect("rate buckets");
        if !b.by_user.contains_key(user) {
            let full = Bucket {
                tokens: burst,
                at_ms: now_ms,
            };
            b.by_user.insert(user.to_owned(), full);
        }
        let bucket = b.by_user.get_mut(user).expect("inserted above");
        // A clock that went back refills nothing (and takes nothing away).
        let elapsed_ms = now_ms.saturating_sub(bucket.at_ms);
        bucket.tokens = (bucket.tokens + elapsed_ms as f64 * self.rate.per_sec / 1000.0).min(burst);
        bucket.at_ms = bucket.at_ms.max(now_ms);
        let taken = if bucket.tokens >= 1.0 {
            bucket.tokens -= 1.0;
            Ok(())
        } else {
            let missing = 1.0 - bucket.tokens;
            Err(((missing * 1000.0 / self.rate.per_sec).ceil() as u64).max(1))
        };
        debug_assert!(bucket.tokens >= 0.0 && bucket.tokens <= burst);
        if b.by_user.len() >= SWEEP_LEN_MIN.max(2 * b.swept_len) {
            self.sweep(&mut b, now_ms);
        }
        taken
    }

    /// Forgets the buckets that refilled to the burst (equivalent to no bucket).
    fn sweep(&self, b: &mut Buckets, now_ms: u64) {
        let burst = f64::from(self.rate.burst);
        let per_ms = self.rate.per_sec / 1000.0;
        b.by_user.retain(|_, bucket| {
            bucket.tokens + now_ms.saturating_sub(bucket.at_ms) as f64 * per_ms < burst
        });
        b.swept_len = b.by_user.len();
    }

    /// Users with a bucket held now (for tests and metrics).
    pub fn tracked(&self) -> usize {
        self.buckets.lock().expect("rate buckets").by_user.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limiter(per_sec: f64, burst: u32) -> RateLimiter {
        RateLimiter::new(Rate { per_sec, burst })
    }

    #[test]
    fn a_burst_then_the_steady_rate() {
        let l = limiter(10.0, 3);
        for _ in 0..3 {
            assert_eq!(l.take("a", 1_000), Ok(()));
        }
        // Empty: one token comes back every 100 ms.
        assert_eq!(l.take("a", 1_000), Err(100));
        assert_eq!(l.take("a", 1_050), Err(50));
        assert_eq!(l.take("a", 1_100), Ok(()));
        assert_eq!(l.take("a", 1_100), Err(100));
        // Users do not share buckets.
        assert_eq!(l.take("b", 1_100), Ok(()));
        // A long pause refills to the burst, never beyond.
        for _ in 0..3 {
            assert_eq!(l.take("a", 60_000), Ok(()));
        }
        assert!(l.take("a", 60_000).is_err());
    }

    #[test]
    fn a_clock_going_back_neither_refills_nor_drains() {
        let l = limiter(1.0, 1);
        assert_eq!(l.take("a", 10_000), Ok(()));
        assert!(l.take("a", 5_000).is_err());
        assert_eq!(l.take("a", 11_000), Ok(()));
    }

    #[test]
    fn idle_users_are_forgotten() {
        let l = limiter(1000.0, 2);
        for i in 0..5_000 {
            let _ = l.take(&format!("u{i}"), 0);
        }
        // Everyone refilled long ago: the next sweep keeps only the recent.
        for i in 0..SWEEP_LEN_MIN * 4 {
            let _ = l.take(&format!("v{i}"), 1_000_000);
        }
        assert!(l.tracked() <= SWEEP_LEN_MIN * 4 + 1, "{}", l.tracked());
    }

    #[test]
    fn invalid_rates_are_refused() {
        assert!(Rate {
            per_sec: 0.0,
            burst: 1
        }
        .validate("send")
        .is_err());
        assert!(Rate {
            per_sec: 1.0,
            burst: 0
        }
        .validate("send")
        .is_err());
        assert!(Rate {
            per_sec: f64::NAN,
            burst: 1
        }
        .validate("send")
        .is_err());
        assert!(Rate {
            per_sec: 0.5,
            burst: 1
        }
        .validate("send")
        .is_ok());
    }
}
