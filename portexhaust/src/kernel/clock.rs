//! Converting `bpf_ktime_get_ns()` (CLOCK_MONOTONIC) to wall-clock time, and formatting it.
use time::{OffsetDateTime, macros::format_description};

/// Offset between CLOCK_REALTIME and CLOCK_MONOTONIC, taken once at start-up. Wall-clock steps
/// after that (NTP) are deliberately not followed: event order must stay monotonic.
#[derive(Clone, Copy, Debug)]
pub struct Clock {
    offset_ns: i128,
}

fn now_ns(clock: libc::clockid_t) -> i128 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: valid pointer to a timespec; the clocks used always exist on Linux.
    unsafe { libc::clock_gettime(clock, &mut ts) };
    ts.tv_sec as i128 * 1_000_000_000 + ts.tv_nsec as i128
}

impl Clock {
    pub fn new() -> Self {
        // Bracket the realtime read with two monotonic reads to halve the error.
        let m1 = now_ns(libc::CLOCK_MONOTONIC);
        let r = now_ns(libc::CLOCK_REALTIME);
        let m2 = now_ns(libc::CLOCK_MONOTONIC);
        Self {
            offset_ns: r - (m1 + m2) / 2,
        }
    }

    pub fn from_offset(offset_ns: i128) -> Self {
        Self { offset_ns }
    }

    pub fn to_unix_ns(&self, mono_ns: u64) -> i128 {
        mono_ns as i128 + self.offset_ns
    }

    pub fn now_mono_ns() -> u64 {
        now_ns(libc::CLOCK_MONOTONIC) as u64
    }
}

impl Default for Clock {
    fn default() -> Self {
        Self::new()
    }
}

/// RFC 3339 in UTC with microseconds, e.g. `2026-11-25T11:20:00.123456Z`.
pub fn rfc3339(unix_ns: i128) -> String {
    let fmt =
        format_description!("[year]-[month]-[day]T[hour]:[minute]:[second].[subsecond digits:6]Z");
    OffsetDateTime::from_unix_timestamp_nanos(unix_ns)
        .ok()
        .and_then(|t| t.format(&fmt).ok())
        .unwrap_or_else(|| format!("@{unix_ns}ns"))
}

/// `HH:MM:SS.mmm` (UTC) for the live human output.
pub fn hms(unix_ns: i128) -> String {
    let fmt = format_description!("[hour]:[minute]:[second].[subsecond digits:3]");
    OffsetDateTime::from_unix_timestamp_nanos(unix_ns)
        .ok()
        .and_then(|t| t.format(&fmt).ok())
        .unwrap_or_else(|| "??:??:??.???".to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formats_rfc3339_with_micros() {
        assert_eq!(
            rfc3339(1_764_069_600_123_456_789),
            "2025-11-25T11:20:00.123456Z"
        );
        assert_eq!(hms(1_764_069_600_123_456_789), "11:20:00.123");
    }

    #[test]
    fn converts_monotonic_with_offset() {
        let c = Clock::from_offset(1_000);
        assert_eq!(c.to_unix_ns(5), 1_005);
    }

    #[test]
    fn live_clock_is_close_to_realtime() {
        let c = Clock::new();
        let unix = c.to_unix_ns(Clock::now_mono_ns());
        let real = now_ns(libc::CLOCK_REALTIME);
        assert!((unix - real).abs() < 50_000_000, "{unix} vs {real}");
    }
}
