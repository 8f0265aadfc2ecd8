//! A token bucket that holds a publishing rate.
//!
//! The clock is a parameter of every call (`now: Instant`), never read
//! inside: the arithmetic is deterministic, so a test drives it with a
//! simulated clock and checks the long-run average without sleeping or
//! timing anything.
//!
//! # The rule
//!
//! Tokens accrue at `rate` per second up to `burst`. [`TokenBucket::take`]
//! takes `n` tokens *at once*, even if that leaves the bucket in debt, and
//! returns how long the caller must wait for the debt to be paid off before
//! it sends. Taking first and waiting after means a request larger than the
//! burst (a bulk publish) is never refused, and the long-run average is
//! exactly `rate`: every token taken was either accrued or waited for.

use std::time::{Duration, Instant};

/// A token bucket: `rate` tokens per second, at most `burst` saved up.
#[derive(Debug, Clone)]
pub struct TokenBucket {
    rate: f64,
    burst: f64,
    /// Tokens now; negative while in debt.
    tokens: f64,
    /// When `tokens` was last brought up to date.
    last: Instant,
}

impl TokenBucket {
    /// A bucket of `rate` tokens per second holding at most `burst`, full at
    /// `now`. A non-finite or non-positive `rate` is taken as unlimited
    /// (every `take` returns zero); `burst` is at least one token.
    pub fn new(rate: f64, burst: f64, now: Instant) -> Self {
        let burst = if burst.is_finite() {
            burst.max(1.0)
        } else {
            1.0
        };
        TokenBucket {
            rate,
            burst,
            tokens: burst,
            last: now,
        }
    }

    /// The rate, tokens per second.
    pub fn rate(&self) -> f64 {
        self.rate
    }

    /// Whether this bucket limits anything.
    pub fn is_unlimited(&self) -> bool {
        !(self.rate.is_finite() && self.rate > 0.0)
    }

    /// Takes `n` tokens at `now` and returns how long to wait before acting
    /// on them (zero if the bucket had them). A `now` earlier than the last
    /// call is taken as the last call's time: clocks handed in are monotonic,
    /// but a caller mixing two of them must not mint tokens.
    pub fn take(&mut self, n: f64, now: Instant) -> Duration {
        if self.is_unlimited() {
            return Duration::ZERO;
        }
        self.refill(now);
        self.tokens -= n;
        if self.tokens >= 0.0 {
            Duration::ZERO
        } else {
            Duration::from_secs_f64(-self.tokens / self.rate)
        }
    }

    /// Tokens available at `now` (negative while in debt).
    pub fn available(&mut self, now: Instant) -> f64 {
        self.refill(now);
        self.tokens
    }

    fn refill(&mut self, now: Instant) {
        let elapsed = now.saturating_duration_since(self.last).as_secs_f64();
        self.last = self.last.max(now);
        self.tokens = (self.tokens + elapsed * self.rate).min(self.burst);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Drives a bucket the way `loadgen` does (take, then sleep what it
    /// says), on a simulated clock, and returns tokens per simulated second.
    fn simulate(rate: f64, burst: f64, per_take: f64, takes: usize, work: Duration) -> f64 {
        let start = Instant::now();
        let mut now = start;
        let mut bucket = TokenBucket::new(rate, burst, now);
        let mut taken = 0.0;
        for _ in 0..takes {
            now += bucket.take(per_take, now);
            taken += per_take;
            // The publish itself takes time too.
            now += work;
        }
        taken / (now - start).as_secs_f64()
    }

    #[test]
    fn long_run_average_is_within_five_percent_of_the_target() {
        for &(rate, burst, per_take) in &[
            (1_000.0, 100.0, 1.0),
            (20_000.0, 2_000.0, 100.0),
            (50.0, 1.0, 1.0),
            // A bulk larger than the burst is never refused.
            (10_000.0, 10.0, 500.0),
        ] {
            let takes = (rate * 60.0 / per_take) as usize;
            let got = simulate(rate, burst, per_take, takes, Duration::from_micros(3));
            assert!(
                (got / rate - 1.0).abs() < 0.05,
                "rate {rate}, burst {burst}, {per_take} per take: {got}/s"
            );
        }
    }

    #[test]
    fn a_slow_caller_gets_at_most_its_own_pace_and_no_saved_up_flood() {
        // A caller slower than the rate is not held back...
        let got = simulate(1_000.0, 10.0, 1.0, 10_000, Duration::from_millis(2));
        assert!((got - 500.0).abs() < 1.0, "{got}");
        // ...and a long pause saves up at most `burst` tokens.
        let t0 = Instant::now();
        let mut b = TokenBucket::new(100.0, 5.0, t0);
        let later = t0 + Duration::from_secs(3600);
        assert_eq!(b.available(later), 5.0);
        assert_eq!(b.take(5.0, later), Duration::ZERO);
        assert_eq!(b.take(1.0, later), Duration::from_millis(10));
    }

    #[test]
    fn unlimited_and_backwards_clocks() {
        let t0 = Instant::now() + Duration::from_secs(10);
        let mut b = TokenBucket::new(0.0, 1.0, t0);
        assert!(b.is_unlimited());
        assert_eq!(b.take(1e9, t0), Duration::ZERO);
        let mut b = TokenBucket::new(10.0, 1.0, t0);
        b.take(1.0, t0);
        // An earlier instant mints nothing.
        assert_eq!(b.available(t0 - Duration::from_secs(5)), 0.0);
    }
}
