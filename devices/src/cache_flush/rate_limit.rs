//! The token buckets behind the configuration space's rate limits
//! (`full_per_sec_limit`, `range_bytes_per_sec_limit`). A FLUSH_ALL pauses
//! the whole VM and evicts every cache of the cores it runs on, so a guest
//! that issues them in a loop hurts itself and, through shared caches, its
//! neighbours; the limit is how the host says "not that often".

use std::time::Instant;

/// A token bucket refilled at `rate` tokens per second, holding at most one
/// second's worth, and owing at most one second's worth: a request larger
/// than the bucket passes when the bucket is full and leaves a debt of at
/// most `rate` tokens, so it is followed by at most one second of BUSY for small requests
/// (two for another oversized one), not
/// (for a 1 GiB request under a 4 KiB/s limit) by days of it.
#[derive(Debug)]
pub(crate) struct TokenBucket {
    /// Tokens per second; 0 = unlimited.
    rate: u64,
    /// Current tokens, in `-rate..=rate`; negative while a request larger
    /// than the bucket is being paid off.
    tokens: f64,
    last: Instant,
}

impl TokenBucket {
    /// A full bucket refilled at `rate` per second (0 = no limit).
    pub(crate) fn new(rate: u64, now: Instant) -> Self {
        Self {
            rate,
            tokens: rate as f64,
            last: now,
        }
    }

    /// Takes `cost` tokens if the bucket allows it at `now`. A cost larger
    /// than the bucket passes when the bucket is full and leaves it in debt,
    /// so such a request is slowed down, not refused forever.
    pub(crate) fn try_take(&mut self, cost: u64, now: Instant) -> bool {
        if self.rate == 0 {
            return true;
        }
        let capacity = self.rate as f64;
        let elapsed = now.saturating_duration_since(self.last).as_secs_f64();
        self.last = now;
        self.tokens = (self.tokens + elapsed * capacity).min(capacity);
        let needed = (cost as f64).min(capacity);
        if self.tokens >= needed {
            self.tokens = (self.tokens - cost as f64).max(-capacity);
            true
        } else {
            false
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn unlimited_always_passes() {
        let now = Instant::now();
        let mut bucket = TokenBucket::new(0, now);
        assert!((0..1000).all(|_| bucket.try_take(u64::MAX, now)));
    }

    #[test]
    fn refills_over_time() {
        let t0 = Instant::now();
        let mut bucket = TokenBucket::new(2, t0);
        assert!(bucket.try_take(1, t0));
        assert!(bucket.try_take(1, t0));
        assert!(!bucket.try_take(1, t0));
        assert!(!bucket.try_take(1, t0 + Duration::from_millis(400)));
        assert!(bucket.try_take(1, t0 + Duration::from_millis(600)));
        // Never more than one second's worth.
        let later = t0 + Duration::from_secs(100);
        assert!(bucket.try_take(2, later));
        assert!(!bucket.try_take(1, later));
    }

    #[test]
    fn oversized_cost_passes_when_full_then_pays_off() {
        let t0 = Instant::now();
        let mut bucket = TokenBucket::new(1000, t0);
        assert!(bucket.try_take(3000, t0));
        // 1000 tokens of debt (the cap): one second to get back to zero, a
        // second one to have 1000 again.
        assert!(!bucket.try_take(1, t0 + Duration::from_millis(900)));
        assert!(!bucket.try_take(1000, t0 + Duration::from_millis(1900)));
        assert!(bucket.try_take(1000, t0 + Duration::from_millis(2000)));
    }

    #[test]
    fn debt_is_capped_at_one_seconds_worth() {
        let t0 = Instant::now();
        let mut bucket = TokenBucket::new(4096, t0);
        // 1 GiB under a 4 KiB/s limit: passes once, and the debt it leaves
        // is 4096 tokens, not 2^30.
        assert!(bucket.try_take(1 << 30, t0));
        assert!(!bucket.try_take(1, t0 + Duration::from_millis(900)));
        assert!(bucket.try_take(1, t0 + Duration::from_millis(1100)));
        assert!(bucket.try_take(1 << 30, t0 + Duration::from_millis(3000)));
    }
}
