//! Retry policy: when a failed delivery is tried again, and when an event is
//! given up on because it is too old.
//!
//! Backoff is exponential with *full jitter* (the delay is drawn uniformly
//! from `[0, min(cap, base * 2^(attempts - 1))]`): when many clients lose
//! their server at once (a deploy, an outage), full jitter spreads their
//! retries over the whole window instead of having them return in waves.
//! A server's `Retry-After` is a floor: the relay never comes back sooner.
//!
//! The policy is pure: it reads no clock and owns no randomness. The caller
//! passes the attempt count, the current time and a [`Jitter`] source, so
//! tests are deterministic with [`Jitter::seeded`].

use std::time::Duration;

use crate::time::Timestamp;

/// When to try a failed delivery again, and when to give up on old events.
///
/// ```
/// use std::time::Duration;
/// use edge_outbox::{Jitter, RetryPolicy};
///
/// let policy = RetryPolicy::new()
///     .with_base(Duration::from_millis(500))
///     .with_cap(Duration::from_secs(60))
///     .with_max_age(Some(Duration::from_secs(7 * 24 * 3600)));
/// let mut jitter = Jitter::seeded(7);
/// // After the third failed attempt the delay is somewhere in [0, 2 s].
/// let delay = policy.backoff(3, &mut jitter);
/// assert!(delay <= Duration::from_secs(2));
/// // A Retry-After of 10 s is honoured: never sooner.
/// assert!(policy.delay(3, Some(Duration::from_secs(10)), &mut jitter) >= Duration::from_secs(10));
/// ```
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RetryPolicy {
    base: Duration,
    cap: Duration,
    max_age: Option<Duration>,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        RetryPolicy::new()
    }
}

impl RetryPolicy {
    /// Default ceiling of the first retry's delay: 1 second.
    pub const DEFAULT_BASE: Duration = Duration::from_secs(1);
    /// Default upper bound of any backoff delay: 5 minutes.
    pub const DEFAULT_CAP: Duration = Duration::from_secs(300);

    /// Base 1 s, cap 5 min, no max age (events are retried forever).
    pub const fn new() -> Self {
        RetryPolicy {
            base: Self::DEFAULT_BASE,
            cap: Self::DEFAULT_CAP,
            max_age: None,
        }
    }

    /// Set the ceiling of the first retry's delay (doubles with every attempt).
    pub fn with_base(mut self, base: Duration) -> Self {
        self.base = base;
        self
    }

    /// Set the upper bound of every backoff delay (a `Retry-After` may exceed it).
    pub fn with_cap(mut self, cap: Duration) -> Self {
        self.cap = cap;
        self
    }

    /// Set the age after which a pending event is dead-lettered as `"expired"`
    /// instead of being sent (`None`: never).
    pub fn with_max_age(mut self, max_age: Option<Duration>) -> Self {
        self.max_age = max_age;
        self
    }

    /// The configured base.
    pub fn base(&self) -> Duration {
        self.base
    }

    /// The configured cap.
    pub fn cap(&self) -> Duration {
        self.cap
    }

    /// The configured max age.
    pub fn max_age(&self) -> Option<Duration> {
        self.max_age
    }

    /// Upper bound of the backoff after `attempts` failed attempts:
    /// `min(cap, base * 2^(attempts - 1))` (`attempts` 0 counts as 1).
    pub fn ceiling(&self, attempts: u32) -> Duration {
        let exp = attempts.saturating_sub(1).min(63);
        let factor = 1u64 << exp;
        let base_ms = self.base.as_millis().min(u64::MAX as u128) as u64;
        let ms = base_ms.saturating_mul(factor);
        Duration::from_millis(ms).min(self.cap)
    }

    /// Full-jitter backoff after `attempts` failed attempts: uniform in
    /// `[0, ceiling(attempts)]`, millisecond resolution.
    pub fn backoff(&self, attempts: u32, jitter: &mut Jitter) -> Duration {
        let ceiling = self.ceiling(attempts).as_millis().min(u64::MAX as u128 - 1) as u64;
        Duration::from_millis(jitter.below(ceiling + 1))
    }

    /// The delay before the next attempt: the jittered backoff, but never less
    /// than the server's `Retry-After` when it sent one.
    pub fn delay(
        &self,
        attempts: u32,
        retry_after: Option<Duration>,
        jitter: &mut Jitter,
    ) -> Duration {
        let backoff = self.backoff(attempts, jitter);
        match retry_after {
            Some(floor) => backoff.max(floor),
            None => backoff,
        }
    }

    /// The time of the next attempt (see [`RetryPolicy::delay`]).
    pub fn next_attempt(
        &self,
        now: Timestamp,
        attempts: u32,
        retry_after: Option<Duration>,
        jitter: &mut Jitter,
    ) -> Timestamp {
        now.add(self.delay(attempts, retry_after, jitter))
    }

    /// True when an event created at `created_at` is older than the max age at `now`.
    pub fn is_expired(&self, created_at: Timestamp, now: Timestamp) -> bool {
        self.max_age.is_some_and(|max| now.since(created_at) > max)
    }
}

/// A small, fast pseudo-random source for jitter (SplitMix64).
///
/// Jitter needs spread, not secrecy, so a dependency-free generator is
/// enough; [`Jitter::from_entropy`] seeds it from the OS (or `crypto` in the
/// browser) so that clients do not share a sequence, and [`Jitter::seeded`]
/// makes tests reproducible.
#[derive(Clone, Debug)]
pub struct Jitter {
    state: u64,
}

impl Jitter {
    /// A generator with a fixed seed: the same seed gives the same delays.
    pub const fn seeded(seed: u64) -> Self {
        Jitter { state: seed }
    }

    /// A generator seeded from the platform's random source.
    pub fn from_entropy() -> Self {
        // uuid's v4 already draws from getrandom on every target we build for
        // (with the `js` feature on wasm32), so no extra dependency is needed.
        let bits = uuid::Uuid::new_v4().as_u128();
        Jitter::seeded((bits as u64) ^ ((bits >> 64) as u64))
    }

    /// The next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        self.state = self.state.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.state;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// A number uniform in `[0, n)` (0 when `n` is 0).
    pub fn below(&mut self, n: u64) -> u64 {
        if n == 0 {
            return 0;
        }
        // Lemire's multiply-shift; the tiny bias is irrelevant for jitter.
        ((u128::from(self.next_u64()) * u128::from(n)) >> 64) as u64
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ceiling_doubles_up_to_the_cap() {
        let p = RetryPolicy::new();
        assert_eq!(p.ceiling(0), Duration::from_secs(1));
        assert_eq!(p.ceiling(1), Duration::from_secs(1));
        assert_eq!(p.ceiling(2), Duration::from_secs(2));
        assert_eq!(p.ceiling(5), Duration::from_secs(16));
        assert_eq!(p.ceiling(9), Duration::from_secs(256));
        assert_eq!(p.ceiling(10), Duration::from_secs(300));
        assert_eq!(p.ceiling(u32::MAX), Duration::from_secs(300));
    }

    #[test]
    fn full_jitter_covers_the_whole_window_deterministically() {
        let p = RetryPolicy::new();
        let mut a = Jitter::seeded(42);
        let mut b = Jitter::seeded(42);
        let mut min = Duration::MAX;
        let mut max = Duration::ZERO;
        for _ in 0..10_000 {
            let d = p.backoff(4, &mut a);
            assert_eq!(d, p.backoff(4, &mut b), "same seed, same delays");
            assert!(d <= Duration::from_secs(8));
            min = min.min(d);
            max = max.max(d);
        }
        // Full jitter: both ends of [0, 8 s] are reached, not just the top.
        assert!(min < Duration::from_millis(100), "min {min:?}");
        assert!(max > Duration::from_millis(7_900), "max {max:?}");
    }

    #[test]
    fn retry_after_is_a_floor() {
        let p = RetryPolicy::new().with_cap(Duration::from_secs(2));
        let mut j = Jitter::seeded(1);
        for attempts in 1..20 {
            let d = p.delay(attempts, Some(Duration::from_secs(30)), &mut j);
            assert!(d >= Duration::from_secs(30));
            let d = p.delay(attempts, Some(Duration::from_millis(1)), &mut j);
            assert!(d <= Duration::from_secs(2));
        }
        let now = Timestamp::from_millis(1_000_000);
        let at = p.next_attempt(now, 1, Some(Duration::from_secs(5)), &mut j);
        assert!(at >= Timestamp::from_millis(1_005_000));
    }

    #[test]
    fn max_age_expires_old_events_only() {
        let now = Timestamp::from_millis(10_000_000);
        let p = RetryPolicy::new();
        assert!(!p.is_expired(Timestamp::from_millis(0), now));
        let p = p.with_max_age(Some(Duration::from_secs(60)));
        assert!(!p.is_expired(now.sub(Duration::from_secs(60)), now));
        assert!(p.is_expired(now.sub(Duration::from_secs(61)), now));
    }

    #[test]
    fn seeds_differ_between_generators() {
        let mut a = Jitter::from_entropy();
        let mut b = Jitter::from_entropy();
        assert_ne!(a.next_u64(), b.next_u64());
        assert_eq!(Jitter::seeded(0).below(0), 0);
    }
}
