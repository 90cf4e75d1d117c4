//! Per-client push rate limiting: a keyed GCRA limiter (`governor`).
//!
//! One budget per key: the client id an authenticated credential is bound to
//! (every token of a client shares it; a reader credential does not push),
//! and on an anonymous server the `client_id` of the push body. A push over
//! the budget is answered `429` with `Retry-After` (whole seconds, rounded
//! up, at least 1), which the relay honours. Only pushes are limited: reads
//! are a backend's paging.

use std::num::NonZeroU32;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use governor::clock::{Clock, DefaultClock};
use governor::{DefaultKeyedRateLimiter, Quota};

/// Default sustained pushes per second per client ([`RateLimit::default`]).
pub const DEFAULT_RATE_PER_SECOND: u32 = 100;
/// Default burst: pushes a client may make at once before the sustained rate applies.
pub const DEFAULT_RATE_BURST: u32 = 200;

/// Keys are forgotten once their budget is full again; the sweep runs every
/// this many checks, so memory follows the clients active in the last
/// `burst / rate` seconds, not every client id ever seen.
const SWEEP_EVERY: u64 = 4096;

/// A push rate limit per client: `per_second` pushes sustained, up to
/// `burst` at once. The default (100/s, burst 200) is far above what a relay
/// needs (it batches up to hundreds of events per push) and far below a
/// flood.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RateLimit {
    per_second: NonZeroU32,
    burst: NonZeroU32,
}

impl Default for RateLimit {
    fn default() -> Self {
        RateLimit::new(DEFAULT_RATE_PER_SECOND, DEFAULT_RATE_BURST)
    }
}

impl RateLimit {
    /// `per_second` pushes per second sustained, `burst` at once (each at least 1).
    pub fn new(per_second: u32, burst: u32) -> Self {
        RateLimit {
            per_second: NonZeroU32::new(per_second).unwrap_or(NonZeroU32::MIN),
            burst: NonZeroU32::new(burst).unwrap_or(NonZeroU32::MIN),
        }
    }

    /// Sustained pushes per second.
    pub fn per_second(&self) -> u32 {
        self.per_second.get()
    }

    /// Pushes allowed at once.
    pub fn burst(&self) -> u32 {
        self.burst.get()
    }
}

/// The running limiter of one server instance (limits are per instance:
/// behind a load balancer of N instances a client gets up to N times the rate).
pub(crate) struct Limiter {
    limiter: DefaultKeyedRateLimiter<String>,
    checks: AtomicU64,
}

impl Limiter {
    pub(crate) fn new(limit: RateLimit) -> Self {
        let quota = Quota::per_second(limit.per_second).allow_burst(limit.burst);
        Limiter {
            limiter: DefaultKeyedRateLimiter::keyed(quota),
            checks: AtomicU64::new(0),
        }
    }

    /// Count one push of `key`: `Err(wait)` when it is over the budget, with
    /// the time until a push of `key` would be accepted again.
    pub(crate) fn check(&self, key: &str) -> Result<(), Duration> {
        if self.checks.fetch_add(1, Ordering::Relaxed) % SWEEP_EVERY == SWEEP_EVERY - 1 {
            self.limiter.retain_recent();
        }
        // Owned key: the keyed store needs `K`, and a push allocates far more anyway.
        self.limiter
            .check_key(&key.to_owned())
            .map_err(|not_until| not_until.wait_time_from(DefaultClock::default().now()))
    }
}

/// `Retry-After` seconds for a wait: rounded up, at least 1 (a `0` would
/// invite an immediate retry that is refused again).
pub(crate) fn retry_after_secs(wait: Duration) -> u64 {
    let secs = wait.as_secs() + u64::from(wait.subsec_nanos() > 0);
    secs.max(1)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retry_after_rounds_up_and_is_never_zero() {
        assert_eq!(retry_after_secs(Duration::ZERO), 1);
        assert_eq!(retry_after_secs(Duration::from_millis(10)), 1);
        assert_eq!(retry_after_secs(Duration::from_secs(1)), 1);
        assert_eq!(retry_after_secs(Duration::from_millis(1001)), 2);
    }

    /// An anonymous client rotating its client id makes a new key per
    /// push: the keyed map must forget keys whose budget is full again, or
    /// it grows with every id ever seen.
    #[test]
    fn keys_whose_budget_is_full_again_are_forgotten() {
        // A budget refills in 1 ms: any key is forgettable 1 ms after its push.
        let limiter = Limiter::new(RateLimit::new(1000, 1));
        let distinct = 3 * SWEEP_EVERY as usize;
        for i in 0..distinct {
            assert!(limiter.check(&format!("client:{i}")).is_ok());
        }
        std::thread::sleep(Duration::from_millis(20));
        // One more sweep's worth of pushes, all from one client: the sweep
        // drops every rotated key (without sweeps all 12288 would stay).
        for _ in 0..SWEEP_EVERY {
            let _ = limiter.check("client:steady");
        }
        assert!(
            limiter.limiter.len() <= 2,
            "{} keys kept",
            limiter.limiter.len()
        );
    }

    #[test]
    fn a_burst_is_refused_past_its_size_and_keys_are_apart() {
        let limiter = Limiter::new(RateLimit::new(1, 3));
        for _ in 0..3 {
            assert!(limiter.check("a").is_ok());
        }
        let wait = limiter.check("a").unwrap_err();
        assert!(wait <= Duration::from_secs(1), "{wait:?}");
        assert!(limiter.check("b").is_ok());
    }
}
