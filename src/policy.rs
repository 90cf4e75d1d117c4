//! Retry policy: when a failed delivery is tried again, and when an event is
//! given up on because it is too old.
//!
//! Backoff is exponential with *full jitter* (the delay is drawn uniformly
//! from `[0, min(cap, base * 2^(attempts - 1))]`): when many clients lose
//! their server at once (a deploy, an outage), full jitter spreads their
//! retries over the whole window instead of having them return in waves.
//! A server's `Retry-After` is a floor, up to the cap: the relay never comes
//! back sooner than it asks, unless it asks for more than the cap (a
//! misconfigured proxy's `Retry-After: 315360000` must not park a queue for
//! ten years).
//!
//! This module also holds the **answer policy** (`Verdict`, `classify`):
//! what each answer to a push does to the batch and to the next attempt, and
//! the [`PushWindow`] that narrows pushes after repeated channel failures.
//!
//! The policy is pure: it reads no clock and owns no randomness. The caller
//! passes the attempt count, the current time and a [`Jitter`] source, so
//! tests are deterministic with [`Jitter::seeded`].

use std::time::Duration;

use crate::protocol::{ErrorBody, PROTOCOL_VERSION, PushResponse};
use crate::time::Timestamp;
use crate::transport::Response;

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

    /// Set the upper bound of every backoff delay, and the ceiling of a
    /// server's `Retry-After`.
    pub fn with_cap(mut self, cap: Duration) -> Self {
        self.cap = cap;
        self
    }

    /// Set the age after which a pending event is dead-lettered as `"expired"`
    /// instead of being sent (`None`: never). See [`RetryPolicy::is_expired`]
    /// for what the age measures.
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
    /// than the server's `Retry-After` when it sent one, up to the cap (a
    /// longer `Retry-After` counts as the cap).
    pub fn delay(
        &self,
        attempts: u32,
        retry_after: Option<Duration>,
        jitter: &mut Jitter,
    ) -> Duration {
        let backoff = self.backoff(attempts, jitter);
        match retry_after {
            Some(floor) => backoff.max(floor.min(self.cap)),
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

    /// True when an event whose age counts from `since` is older than the max
    /// age at `now`.
    ///
    /// What the age measures: the device's wall clock at `now` minus `since`,
    /// which is the event's commit time (`created_at`, the wall clock at
    /// commit) or, for a dead letter the app retried, the time of that retry
    /// ([`Event::age_base`](crate::Event::age_base)). Both are wall-clock
    /// claims, so a wrong clock must never turn into lost events:
    /// - a `since` before [`CLOCK_FLOOR`] was written by a clock that was
    ///   reset (a dead RTC battery boots at 1970 or 2000), so that event is
    ///   never expired by age;
    /// - a `since` in the future (a clock that ran ahead) counts as age 0;
    /// - the relay also never believes an event to be older than one committed
    ///   before it in the same claim (see the relay), so a clock set back and
    ///   corrected does not expire what was committed moments ago.
    pub fn is_expired(&self, since: Timestamp, now: Timestamp) -> bool {
        since >= CLOCK_FLOOR && self.max_age.is_some_and(|max| now.since(since) > max)
    }
}

/// 2026-01-01T00:00:00Z. No event of this library was committed before it,
/// so a stored time before it comes from a clock that was wrong (see
/// [`RetryPolicy::is_expired`]).
pub const CLOCK_FLOOR: Timestamp = Timestamp::from_millis(1_767_225_600_000);

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

// ---- The answer policy ----------------------------------------------------

/// What one answer to a push says, classified by [`classify`]. The failure
/// model (docs/protocol.md, "Whole-request answers"): only evidence against
/// one event may dead-letter it; anything that may be the channel's fault
/// (a proxy, a load balancer, a server that is down) leaves every event
/// pending.
#[derive(Debug)]
pub(crate) enum Verdict {
    /// 200 with a readable push response: one result per event.
    Results(PushResponse),
    /// Evidence against the channel, not against any event: every event of
    /// the push stays pending and the relay backs off.
    Channel {
        /// The server's `Retry-After`, honoured up to the policy's cap.
        retry_after: Option<Duration>,
        /// What the status shows.
        error: String,
        /// A failure that a smaller push may avoid (a network error or
        /// timeout, a 5xx other than 503, a 408): repeated, it narrows the
        /// next pushes (see [`PushWindow`]).
        narrows: bool,
    },
    /// The server refused the push's content: a 413, or a 400/422 that
    /// carries the protocol's error body with a code that blames the
    /// request's content. The relay bisects; a lone refused event goes dead
    /// only when other events pass on the same channel (see the relay).
    Refused {
        /// The reason recorded on an event found guilty.
        reason: String,
        /// It was a 413: the window narrows at once.
        too_large: bool,
    },
}

/// The error codes of a 400/422 that blame the request's content (protocol
/// "Error body"); any other 400/422, and one whose body is not the protocol's
/// error body (a proxy's HTML page), is a channel failure.
const CONTENT_ERRORS: [&str; 3] = ["invalid_request", "malformed_json", "invalid_event"];

/// What an answer means (the table in docs/protocol.md and the relay docs).
pub(crate) fn classify(response: Response) -> Verdict {
    let status = response.status;
    let channel = |error: String, narrows: bool| Verdict::Channel {
        retry_after: response.retry_after,
        error,
        narrows,
    };
    match status {
        200 => match PushResponse::from_json(&response.body) {
            Ok(parsed) => Verdict::Results(parsed),
            Err(e) => channel(format!("unreadable 200 answer from the server: {e}"), false),
        },
        413 => Verdict::Refused {
            reason: format!(
                "too large for the server (413 Payload Too Large): {}",
                error_text(&response.body)
            ),
            too_large: true,
        },
        // Parsed here only: a 200's body is never read as an error body.
        400 | 422 => match ErrorBody::from_json(&response.body) {
            Some(body) if CONTENT_ERRORS.contains(&body.error.as_str()) => Verdict::Refused {
                reason: format!("rejected by the server ({status}): {}", body.message),
                too_large: false,
            },
            // A deployment mismatch, not a poison event: dead-lettering
            // would empty the outbox.
            Some(body) if body.error == "unsupported_protocol" => channel(
                format!(
                    "the server does not speak protocol {PROTOCOL_VERSION}: {}",
                    body.message
                ),
                false,
            ),
            Some(body) => channel(
                format!(
                    "the server refused the request ({status} {}): {}",
                    body.error, body.message
                ),
                false,
            ),
            None => channel(
                format!(
                    "the push was refused with {status} and no protocol error body \
                     (a proxy or gateway in between?): {}",
                    error_text(&response.body)
                ),
                false,
            ),
        },
        401 | 403 => channel(
            format!(
                "the server refused the credentials ({status}), fresh ones too: {}",
                error_text(&response.body)
            ),
            false,
        ),
        // A timeout or a server error may be the push's size or one of its
        // events; 429 and 503 say "too busy", which a smaller push would not help.
        _ => channel(
            format!(
                "the server answered {status}: {}",
                error_text(&response.body)
            ),
            status == 408 || (status >= 500 && status != 503),
        ),
    }
}

/// A network failure (no answer, a reset, a timeout) as a [`Verdict`].
pub(crate) fn network_failure(error: &crate::Error) -> Verdict {
    Verdict::Channel {
        retry_after: None,
        error: error.to_string(),
        narrows: true,
    }
}

/// The message of an [`ErrorBody`], or the body's text (shortened).
pub(crate) fn error_text(body: &[u8]) -> String {
    if let Some(e) = ErrorBody::from_json(body) {
        return e.message;
    }
    let text = String::from_utf8_lossy(body);
    let text = text.trim();
    if text.is_empty() {
        return "(no body)".to_owned();
    }
    match text.char_indices().nth(200) {
        Some((cut, _)) => format!("{}…", &text[..cut]),
        None => text.to_owned(),
    }
}

/// How many events the next push may carry.
///
/// A failure that a smaller push may avoid (`Verdict::Channel` with
/// `narrows`), seen twice in a row, halves the window down to one event: a
/// slow uplink that times out on large pushes, a proxy that resets
/// connections carrying large bodies, a backend that fails with 5xx on one
/// event of a batch. The events before the trouble then get through, and the
/// event that fails alone is retried alone, with backoff, and never
/// dead-lettered for it. A 413 halves the window at once.
///
/// Every push that passes doubles the window back, up to the configured most
/// events per push, but below the size that last failed (its *ceiling*)
/// until [`PushWindow::PROBE_AFTER`] pushes in a row have passed: a link
/// that cannot carry two events in time is not asked to, push after push.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PushWindow {
    max: usize,
    limit: usize,
    /// Pushes of this many events or more failed lately.
    ceiling: Option<usize>,
    failures: u32,
    passes: u32,
}

impl PushWindow {
    /// Channel failures in a row after which the window narrows.
    pub const NARROW_AFTER: u32 = 2;
    /// Passed pushes in a row after which the ceiling is forgotten (and
    /// larger pushes tried again).
    pub const PROBE_AFTER: u32 = 16;

    /// A full window of `max` events per push (at least 1).
    pub fn new(max: usize) -> Self {
        let max = max.max(1);
        PushWindow {
            max,
            limit: max,
            ceiling: None,
            failures: 0,
            passes: 0,
        }
    }

    /// Most events in the next push.
    pub fn limit(&self) -> usize {
        self.limit
    }

    /// A push passed (the server answered 200): widen again.
    pub fn passed(&mut self) {
        self.failures = 0;
        self.passes += 1;
        if self.passes >= Self::PROBE_AFTER {
            self.ceiling = None;
        }
        let below_ceiling = self
            .ceiling
            .map_or(self.max, |c| c.saturating_sub(1).max(1));
        self.limit = self
            .limit
            .saturating_mul(2)
            .min(self.max)
            .min(below_ceiling);
    }

    /// A push of `events` events failed on the channel; `narrows` as in
    /// `Verdict::Channel`.
    pub fn failed(&mut self, events: usize, narrows: bool) {
        if !narrows {
            return;
        }
        if events <= 1 {
            // A single event failing as well: the size was not the cause
            // (a channel that is down altogether), so once pushes pass again
            // they may widen at once instead of staying small.
            self.ceiling = None;
            return;
        }
        self.failures += 1;
        if self.failures >= Self::NARROW_AFTER {
            self.narrow(events);
        }
    }

    /// A push of `events` events was refused as too large: narrow at once.
    pub fn too_large(&mut self, events: usize) {
        self.narrow(events);
    }

    fn narrow(&mut self, events: usize) {
        self.passes = 0;
        self.ceiling = Some(events.max(1));
        self.limit = (events / 2).clamp(1, self.limit);
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
    fn retry_after_is_a_floor_up_to_the_cap() {
        let p = RetryPolicy::new().with_cap(Duration::from_secs(60));
        let mut j = Jitter::seeded(1);
        for attempts in 1..20 {
            let d = p.delay(attempts, Some(Duration::from_secs(30)), &mut j);
            assert!(d >= Duration::from_secs(30));
            let d = p.delay(attempts, Some(Duration::from_millis(1)), &mut j);
            assert!(d <= Duration::from_secs(60));
            // Ten years asked: the cap is the ceiling.
            let d = p.delay(attempts, Some(Duration::from_secs(315_360_000)), &mut j);
            assert_eq!(d, Duration::from_secs(60));
        }
        let now = Timestamp::from_millis(1_000_000);
        let at = p.next_attempt(now, 1, Some(Duration::from_secs(5)), &mut j);
        assert!(at >= Timestamp::from_millis(1_005_000));
    }

    #[test]
    fn max_age_expires_old_events_only() {
        let now = Timestamp::now();
        let p = RetryPolicy::new();
        assert!(!p.is_expired(CLOCK_FLOOR, now));
        let p = p.with_max_age(Some(Duration::from_secs(60)));
        assert!(!p.is_expired(now.sub(Duration::from_secs(60)), now));
        assert!(p.is_expired(now.sub(Duration::from_secs(61)), now));
    }

    #[test]
    fn a_clock_that_was_reset_expires_nothing() {
        let p = RetryPolicy::new().with_max_age(Some(Duration::from_secs(60)));
        let now = Timestamp::now();
        assert!(!p.is_expired(Timestamp::from_millis(946_684_800_000), now));
        assert!(!p.is_expired(CLOCK_FLOOR.sub(Duration::from_millis(1)), now));
        assert!(p.is_expired(CLOCK_FLOOR, now));
        // A clock that ran ahead: age 0.
        assert!(!p.is_expired(now.add(Duration::from_secs(86_400)), now));
    }

    fn response(status: u16, body: &str) -> Response {
        Response {
            status,
            retry_after: None,
            body: body.as_bytes().to_vec(),
        }
    }

    #[test]
    fn only_a_protocol_error_body_that_blames_the_content_makes_a_400_a_refusal() {
        let refused = |status: u16, body: &str| {
            matches!(classify(response(status, body)), Verdict::Refused { .. })
        };
        let narrows = |status: u16, body: &str| {
            matches!(
                classify(response(status, body)),
                Verdict::Channel { narrows: true, .. }
            )
        };
        for code in CONTENT_ERRORS {
            let body = format!(r#"{{"error":"{code}","message":"m"}}"#);
            assert!(refused(400, &body) && refused(422, &body), "{code}");
        }
        assert!(refused(413, ""));
        for body in [
            "<html>400 Bad Request</html>",
            "",
            r#"{"message":"Bad Request"}"#,
            r#"{"error":"unsupported_protocol","message":"speaks 2"}"#,
            r#"{"error":"unreadable_body","message":"gzip"}"#,
        ] {
            assert!(!refused(400, body), "{body}");
        }
        assert!(narrows(500, "") && narrows(502, "") && narrows(408, ""));
        assert!(!narrows(503, "") && !narrows(429, "") && !narrows(401, ""));
        assert!(matches!(
            network_failure(&crate::Error::Network {
                message: "reset".into(),
                source: None
            }),
            Verdict::Channel { narrows: true, .. }
        ));
    }

    #[test]
    fn the_push_window_narrows_after_repeated_failures_and_widens_on_success() {
        let mut w = PushWindow::new(100);
        w.failed(100, true);
        assert_eq!(w.limit(), 100, "one failure is not a pattern");
        w.failed(100, true);
        assert_eq!(w.limit(), 50);
        w.failed(50, false);
        assert_eq!(w.limit(), 50, "a failure a smaller push cannot help");
        for expected in [25, 12, 6, 3, 1] {
            w.failed(w.limit(), true);
            assert_eq!(w.limit(), expected);
        }
        // Pushes of 3 failed: stay below that size...
        for _ in 0..PushWindow::PROBE_AFTER - 1 {
            w.passed();
            assert_eq!(w.limit(), 2);
        }
        // ...until enough pushes passed to try larger ones again.
        for expected in [4, 8, 16, 32, 64, 100, 100] {
            w.passed();
            assert_eq!(w.limit(), expected);
        }
        w.too_large(100);
        assert_eq!(w.limit(), 50, "a 413 narrows at once");
        w.passed();
        assert_eq!(w.limit(), 99, "below the size refused");
    }

    #[test]
    fn a_channel_that_was_down_altogether_widens_at_once_when_it_is_back() {
        let mut w = PushWindow::new(100);
        // An outage: every push fails, down to single events.
        while w.limit() > 1 {
            w.failed(w.limit(), true);
        }
        w.failed(1, true);
        for expected in [2, 4, 8, 16, 32, 64, 100] {
            w.passed();
            assert_eq!(w.limit(), expected);
        }
    }

    #[test]
    fn seeds_differ_between_generators() {
        let mut a = Jitter::from_entropy();
        let mut b = Jitter::from_entropy();
        assert_ne!(a.next_u64(), b.next_u64());
        assert_eq!(Jitter::seeded(0).below(0), 0);
    }
}
