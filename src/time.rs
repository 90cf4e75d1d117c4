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
    /// (the `created_at` format of the sync protocol). Years before 1 AD are
    /// written with a sign (`-0001-...`); a time outside the years -9999 to
    /// 9999 is written as the epoch, `1970-01-01T00:00:00.000Z`.
    pub fn to_rfc3339(self) -> String {
        // By hand rather than with `core::fmt` or a date crate: every byte of
        // this ships in the wasm package (the `time` crate cost ~10 KB gzip).
        let ms = if (MIN_MS..=MAX_MS).contains(&self.0) {
            self.0
        } else {
            0
        };
        let (days, ms_of_day) = (ms.div_euclid(MS_PER_DAY), ms.rem_euclid(MS_PER_DAY));
        let (year, month, day) = civil_from_days(days);
        let mut out = String::with_capacity(25);
        if year < 0 {
            out.push('-');
        }
        push_digits(&mut out, year.unsigned_abs(), 4);
        out.push('-');
        push_digits(&mut out, month, 2);
        out.push('-');
        push_digits(&mut out, day, 2);
        out.push('T');
        let secs = (ms_of_day / 1000) as u32;
        push_digits(&mut out, secs / 3600, 2);
        out.push(':');
        push_digits(&mut out, secs / 60 % 60, 2);
        out.push(':');
        push_digits(&mut out, secs % 60, 2);
        out.push('.');
        push_digits(&mut out, (ms_of_day % 1000) as u32, 3);
        out.push('Z');
        out
    }

    /// Parse an RFC 3339 timestamp, truncated to milliseconds (toward zero).
    ///
    /// Accepts `YYYY-MM-DD`, any one separator byte (`T`, `t`, a space),
    /// `hh:mm:ss`, an optional fraction of any number of digits, and `Z`,
    /// `z` or an offset `+hh:mm`/`-hh:mm` (hours up to 23). A leap second
    /// (`:60`) is read as the last millisecond before it, and only where one
    /// can occur (23:59:60 UTC on the last day of a month). `None` for
    /// anything else, including an impossible date such as February 30.
    pub fn parse_rfc3339(s: &str) -> Option<Self> {
        let b = s.as_bytes();
        let year = digits(b, 0, 4)?;
        let month = lit(b, 4, b'-').and_then(|()| digits(b, 5, 2))?;
        let day = lit(b, 7, b'-').and_then(|()| digits(b, 8, 2))?;
        // b[10] is the separator: RFC 3339 allows others than `T`.
        b.get(10)?;
        let hour = digits(b, 11, 2)?;
        let minute = lit(b, 13, b':').and_then(|()| digits(b, 14, 2))?;
        let second = lit(b, 16, b':').and_then(|()| digits(b, 17, 2))?;
        let mut i = 19;
        let mut nanos: i64 = 0;
        if b.get(i) == Some(&b'.') {
            i += 1;
            let first = i;
            let mut scale = 100_000_000;
            while let Some(d) = b.get(i).filter(|c| c.is_ascii_digit()) {
                nanos += i64::from(d - b'0') * scale;
                scale /= 10;
                i += 1;
            }
            if i == first {
                return None;
            }
        }
        let offset_secs = match b.get(i)? {
            b'Z' | b'z' => {
                i += 1;
                0
            }
            sign @ (b'+' | b'-') => {
                let h = digits(b, i + 1, 2).filter(|h| *h <= 23)?;
                let m = lit(b, i + 3, b':').and_then(|()| digits(b, i + 4, 2))?;
                if m > 59 {
                    return None;
                }
                i += 6;
                let secs = i64::from(h * 3600 + m * 60);
                if *sign == b'-' { -secs } else { secs }
            }
            _ => return None,
        };
        if i != b.len() || !(1..=12).contains(&month) || hour > 23 || minute > 59 {
            return None;
        }
        if day == 0 || day > days_in_month(year as i32, month) {
            return None;
        }
        let leap = second == 60;
        let (second, nanos) = if leap {
            (59, 999_999_999)
        } else if second > 59 {
            return None;
        } else {
            (second, nanos)
        };
        let days = days_from_civil(year as i32, month, day);
        let secs = days * 86_400 + i64::from(hour * 3600 + minute * 60 + second) - offset_secs;
        if leap {
            // A leap second ends a month, in UTC.
            let (y, m, d) = civil_from_days(secs.div_euclid(86_400));
            if secs.rem_euclid(86_400) != 86_399 || d != days_in_month(y, m) {
                return None;
            }
        }
        let total_nanos = i128::from(secs) * 1_000_000_000 + i128::from(nanos);
        Some(Timestamp((total_nanos / 1_000_000) as i64))
    }

    /// Parse an HTTP-date in the IMF-fixdate form every server sends
    /// (`Wed, 21 Oct 2015 07:28:00 GMT`, RFC 9110 section 5.6.7), as in a
    /// `Retry-After` header. The weekday must be a valid name but is not
    /// checked against the date. The obsolete RFC 850 and asctime forms are
    /// not read (`None`).
    pub fn parse_http_date(s: &str) -> Option<Self> {
        const WEEKDAYS: [&[u8]; 7] = [b"Mon", b"Tue", b"Wed", b"Thu", b"Fri", b"Sat", b"Sun"];
        const MONTHS: [&[u8]; 12] = [
            b"Jan", b"Feb", b"Mar", b"Apr", b"May", b"Jun", b"Jul", b"Aug", b"Sep", b"Oct", b"Nov",
            b"Dec",
        ];
        let b = s.as_bytes();
        if b.len() != 29 || !WEEKDAYS.contains(&&b[..3]) || &b[3..5] != b", " {
            return None;
        }
        let day = digits(b, 5, 2)?;
        lit(b, 7, b' ')?;
        let month = MONTHS.iter().position(|m| *m == &b[8..11])? as u32 + 1;
        lit(b, 11, b' ')?;
        let year = digits(b, 12, 4)?;
        lit(b, 16, b' ')?;
        let hour = digits(b, 17, 2)?;
        let minute = lit(b, 19, b':').and_then(|()| digits(b, 20, 2))?;
        let second = lit(b, 22, b':').and_then(|()| digits(b, 23, 2))?;
        if &b[25..] != b" GMT" || hour > 23 || minute > 59 || second > 59 {
            return None;
        }
        if day == 0 || day > days_in_month(year as i32, month) {
            return None;
        }
        let days = days_from_civil(year as i32, month, day);
        let secs = days * 86_400 + i64::from(hour * 3600 + minute * 60 + second);
        Some(Timestamp(secs * 1000))
    }
}

const MS_PER_DAY: i64 = 86_400_000;
/// `-9999-01-01T00:00:00.000Z`, the earliest time [`Timestamp::to_rfc3339`] writes.
const MIN_MS: i64 = -377_705_116_800_000;
/// `9999-12-31T23:59:59.999Z`, the latest time [`Timestamp::to_rfc3339`] writes.
const MAX_MS: i64 = 253_402_300_799_999;

/// Append `n` in decimal, zero-padded to `width` digits.
fn push_digits(out: &mut String, n: u32, width: u32) {
    let mut div = 10u32.pow(width - 1);
    while div > 0 {
        out.push(char::from(b'0' + (n / div % 10) as u8));
        div /= 10;
    }
}

/// The `n` ASCII digits at `at` as a number.
fn digits(b: &[u8], at: usize, n: usize) -> Option<u32> {
    b.get(at..at + n)?.iter().try_fold(0u32, |acc, c| {
        c.is_ascii_digit().then(|| acc * 10 + u32::from(c - b'0'))
    })
}

/// `Some(())` when byte `at` is `c`.
fn lit(b: &[u8], at: usize, c: u8) -> Option<()> {
    (b.get(at) == Some(&c)).then_some(())
}

fn is_leap_year(y: i32) -> bool {
    y % 4 == 0 && (y % 100 != 0 || y % 400 == 0)
}

fn days_in_month(y: i32, m: u32) -> u32 {
    match m {
        2 if is_leap_year(y) => 29,
        2 => 28,
        4 | 6 | 9 | 11 => 30,
        _ => 31,
    }
}

/// Days since 1970-01-01 of a date of the proleptic Gregorian calendar
/// (Howard Hinnant's `days_from_civil`).
fn days_from_civil(y: i32, m: u32, d: u32) -> i64 {
    let y = i64::from(y) - i64::from(m <= 2);
    let era = y.div_euclid(400);
    let yoe = y.rem_euclid(400);
    let mp = i64::from((m + 9) % 12);
    let doy = (153 * mp + 2) / 5 + i64::from(d) - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

/// The date (year, month, day) `days` days after 1970-01-01 (Howard
/// Hinnant's `civil_from_days`).
fn civil_from_days(days: i64) -> (i32, u32, u32) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let y = yoe + era * 400 + i64::from(m <= 2);
    (y as i32, m, d)
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

    #[test]
    fn rfc3339_edges() {
        let f = |ms| Timestamp::from_millis(ms).to_rfc3339();
        assert_eq!(f(-1), "1969-12-31T23:59:59.999Z");
        assert_eq!(f(951_782_400_000), "2000-02-29T00:00:00.000Z");
        assert_eq!(f(MIN_MS), "-9999-01-01T00:00:00.000Z");
        assert_eq!(f(MAX_MS), "9999-12-31T23:59:59.999Z");
        assert_eq!(f(MAX_MS + 1), "1970-01-01T00:00:00.000Z");
        assert_eq!(f(i64::MIN), "1970-01-01T00:00:00.000Z");
        let p = |s| Timestamp::parse_rfc3339(s).map(Timestamp::as_millis);
        assert_eq!(p("2026-11-27t13:30:00.1239+01:30"), Some(1_795_780_800_123));
        assert_eq!(p("2016-12-31T23:59:60Z"), Some(1_483_228_799_999));
        assert_eq!(p("2016-12-31T23:59:60.5+00:00"), Some(1_483_228_799_999));
        for bad in [
            "2026-02-29T00:00:00Z",
            "2026-11-27T24:00:00Z",
            "2026-11-27T12:00:60Z",
            "2026-11-27T12:00:00.Z",
            "2026-11-27T12:00:00",
            "2026-11-27T12:00:00+24:00",
            "2026-11-27T12:00:00+01:60",
            "2026-11-27T12:00:00Z ",
            "2026-13-01T12:00:00Z",
            "26-11-27T12:00:00Z",
            "",
        ] {
            assert_eq!(p(bad), None, "{bad}");
        }
    }

    #[test]
    fn http_date() {
        let p = |s| Timestamp::parse_http_date(s).map(Timestamp::as_millis);
        assert_eq!(p("Wed, 21 Oct 2015 07:28:00 GMT"), Some(1_445_412_480_000));
        // The weekday is not checked against the date (as the `time` crate did).
        assert_eq!(p("Mon, 21 Oct 2015 07:28:00 GMT"), Some(1_445_412_480_000));
        for bad in [
            "Wed, 21 Oct 2015 07:28:00 UTC",
            "Wed, 21 oct 2015 07:28:00 GMT",
            "Wednesday, 21-Oct-15 07:28:00 GMT",
            "Wed Oct 21 07:28:00 2015",
            "Xyz, 21 Oct 2015 07:28:00 GMT",
            "Wed, 31 Nov 2015 07:28:00 GMT",
            "Wed, 21 Oct 2015 07:28:60 GMT",
        ] {
            assert_eq!(p(bad), None, "{bad}");
        }
    }

    /// The `time` crate wrote and read these formats before; the hand-written
    /// code must agree with it byte for byte (native only: it is a
    /// dev-dependency there).
    #[cfg(not(all(target_arch = "wasm32", target_os = "unknown")))]
    mod against_the_time_crate {
        use super::super::*;

        fn time_format(ms: i64) -> String {
            let dt = ::time::OffsetDateTime::from_unix_timestamp_nanos(i128::from(ms) * 1_000_000)
                .unwrap_or(::time::OffsetDateTime::UNIX_EPOCH);
            let fmt = ::time::macros::format_description!(
                "[year]-[month]-[day]T[hour]:[minute]:[second].[subsecond digits:3]Z"
            );
            dt.format(&fmt).unwrap()
        }

        fn time_parse(s: &str) -> Option<i64> {
            let dt =
                ::time::OffsetDateTime::parse(s, &::time::format_description::well_known::Rfc3339)
                    .ok()?;
            Some((dt.unix_timestamp_nanos() / 1_000_000) as i64)
        }

        fn time_http(s: &str) -> Option<i64> {
            let fmt = ::time::macros::format_description!(
                "[weekday repr:short], [day] [month repr:short] [year] [hour]:[minute]:[second] GMT"
            );
            let at = ::time::PrimitiveDateTime::parse(s, &fmt).ok()?.assume_utc();
            Some((at.unix_timestamp_nanos() / 1_000_000) as i64)
        }

        /// A fixed pseudo-random sequence (xorshift), so failures repeat.
        fn numbers(mut x: u64) -> impl FnMut() -> u64 {
            move || {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x
            }
        }

        #[test]
        fn format_and_parse_agree() {
            let mut next = numbers(0x9E37_79B9_7F4A_7C15);
            let span = (MAX_MS - MIN_MS + 3) as u64;
            let mut cases: Vec<i64> = vec![0, -1, 1, MIN_MS - 1, MIN_MS, MAX_MS, MAX_MS + 1];
            cases.extend([i64::MIN, i64::MAX, -62_135_596_800_000, -62_135_596_800_001]);
            // Every day of 1899-2101 at a random time, and random times anywhere.
            for day in -25_600..48_000i64 {
                cases.push(day * MS_PER_DAY + (next() % MS_PER_DAY as u64) as i64);
            }
            for _ in 0..100_000 {
                cases.push(MIN_MS - 1 + (next() % span) as i64);
            }
            for ms in cases {
                let ours = Timestamp::from_millis(ms).to_rfc3339();
                assert_eq!(ours, time_format(ms), "{ms}");
                assert_eq!(
                    Timestamp::parse_rfc3339(&ours).map(Timestamp::as_millis),
                    time_parse(&ours),
                    "{ours}"
                );
            }
        }

        #[test]
        fn parse_agrees_on_variants() {
            let mut next = numbers(0x2545_F491_4F6C_DD1D);
            let mut inputs: Vec<String> = Vec::new();
            for _ in 0..60_000 {
                let year = next() % 10_000;
                let month = next() % 14;
                let day = next() % 33;
                let (h, m, s) = (next() % 26, next() % 62, next() % 62);
                let sep = [b'T', b't', b' ', b'x', b'1'][(next() % 5) as usize] as char;
                let frac = match next() % 4 {
                    0 => String::new(),
                    1 => ".".into(),
                    _ => format!(".{}", &next().to_string()[..(next() % 13 + 1) as usize]),
                };
                let zone = match next() % 5 {
                    0 => "Z".to_owned(),
                    1 => "z".to_owned(),
                    2 => String::new(),
                    _ => format!(
                        "{}{:02}:{:02}",
                        if next().is_multiple_of(2) { '+' } else { '-' },
                        next() % 26,
                        next() % 62
                    ),
                };
                inputs.push(format!(
                    "{year:04}-{month:02}-{day:02}{sep}{h:02}:{m:02}:{s:02}{frac}{zone}"
                ));
            }
            // Leap seconds where they may and may not be.
            for date in [
                "2016-12-31",
                "2016-06-30",
                "2016-02-29",
                "2015-02-28",
                "2016-12-30",
            ] {
                for zone in ["Z", "+01:00", "-00:30", "+00:00"] {
                    for time in ["23:59:60", "00:59:60", "23:29:60", "23:59:60.25"] {
                        inputs.push(format!("{date}T{time}{zone}"));
                    }
                }
            }
            inputs.extend(
                [
                    "2026-11-27T12:00:00Z+",
                    "2026-11-27\u{e9}12:00:00Z",
                    "2026-11-27T12:00:00+1:00",
                    "2026-11-27T12:00:00+01",
                    "2026-11-27T12:00",
                    "-001-11-27T12:00:00Z",
                    "+2026-11-27T12:00:00Z",
                    "2026-11-27T12:00:00.000000000001Z",
                    "1969-12-31T23:59:59.9999Z",
                    "0000-01-01T00:00:00+23:59",
                    "9999-12-31T23:59:59.999-23:59",
                ]
                .map(String::from),
            );
            for s in &inputs {
                assert_eq!(
                    Timestamp::parse_rfc3339(s).map(Timestamp::as_millis),
                    time_parse(s),
                    "{s}"
                );
            }
        }

        #[test]
        fn http_dates_agree() {
            let mut next = numbers(0xDEAD_BEEF_CAFE_F00D);
            let days = [
                "Mon", "Tue", "Wed", "Thu", "Fri", "Sat", "Sun", "mon", "Wen",
            ];
            let months = [
                "Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct",
            ];
            let months2 = ["Nov", "Dec", "jan", "Foo"];
            for _ in 0..40_000 {
                let wd = days[(next() % days.len() as u64) as usize];
                let mi = next() % (months.len() + months2.len()) as u64;
                let mon = months
                    .get(mi as usize)
                    .copied()
                    .unwrap_or_else(|| months2[mi as usize - months.len()]);
                let s = format!(
                    "{wd}, {:02} {mon} {:04} {:02}:{:02}:{:02} {}",
                    next() % 33,
                    next() % 10_000,
                    next() % 25,
                    next() % 61,
                    next() % 61,
                    if next().is_multiple_of(8) {
                        "UTC"
                    } else {
                        "GMT"
                    }
                );
                assert_eq!(
                    Timestamp::parse_http_date(&s).map(Timestamp::as_millis),
                    time_http(&s),
                    "{s}"
                );
            }
        }
    }
}
