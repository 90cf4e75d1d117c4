//! Wall-clock time as Unix milliseconds, the one representation stored in
//! SQLite, in IndexedDB and (formatted as RFC 3339) on the wire.
//!
//! `web_time::SystemTime` is `std::time::SystemTime` natively and
//! `Date.now()` on wasm32, where std's clock panics.

use std::time::Duration;

use serde::{Deserialize, Serialize};
use web_time::{SystemTime, UNIX_EPOCH};

/// A point in time, in milliseconds since the Unix epoch (UTC).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Timestamp(i64);

impl Timestamp {
    /// The current wall-clock time.
    pub fn now() -> Self {
        let ms = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_millis() as i64)
            // A clock before 1970 is a broken clock; clamp rather than panic.
            .unwrap_or(0);
        Timestamp(ms)
    }

    /// From Unix milliseconds.
    pub const fn from_millis(ms: i64) -> Self {
        Timestamp(ms)
    }

    /// Unix milliseconds.
    pub const fn as_millis(self) -> i64 {
        self.0
    }

    /// This time plus a duration (saturating).
    // A method, not `impl Add`: the saturation should be visible at the call.
    #[allow(clippy::should_implement_trait)]
    pub fn add(self, d: Duration) -> Self {
        Timestamp(
            self.0
                .saturating_add(d.as_millis().min(i64::MAX as u128) as i64),
        )
    }

    /// This time minus a duration (saturating).
    #[allow(clippy::should_implement_trait)]
    pub fn sub(self, d: Duration) -> Self {
        Timestamp(
            self.0
                .saturating_sub(d.as_millis().min(i64::MAX as u128) as i64),
        )
    }

    /// Time elapsed from `earlier` to `self`, zero if `earlier` is later.
    pub fn since(self, earlier: Timestamp) -> Duration {
        Duration::from_millis(self.0.saturating_sub(earlier.0).max(0) as u64)
    }

    /// RFC 3339 in UTC with millisecond precision, e.g. `2026-11-27T12:00:00.123Z`
    /// (the `created_at` format of the sync protocol).
    pub fn to_rfc3339(self) -> String {
        let nanos = i128::from(self.0) * 1_000_000;
        let dt = time::OffsetDateTime::from_unix_timestamp_nanos(nanos)
            .unwrap_or(time::OffsetDateTime::UNIX_EPOCH);
        let fmt = time::macros::format_description!(
            "[year]-[month]-[day]T[hour]:[minute]:[second].[subsecond digits:3]Z"
        );
        dt.format(&fmt)
            .unwrap_or_else(|_| "1970-01-01T00:00:00.000Z".to_owned())
    }

    /// Parse an RFC 3339 timestamp (any offset), truncated to milliseconds.
    pub fn parse_rfc3339(s: &str) -> Option<Self> {
        let dt =
            time::OffsetDateTime::parse(s, &time::format_description::well_known::Rfc3339).ok()?;
        Some(Timestamp((dt.unix_timestamp_nanos() / 1_000_000) as i64))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rfc3339_round_trip() {
        let t = Timestamp::from_millis(1_795_780_800_123);
        let s = t.to_rfc3339();
        assert_eq!(s, "2026-11-27T12:00:00.123Z");
        assert_eq!(Timestamp::parse_rfc3339(&s), Some(t));
    }
}
