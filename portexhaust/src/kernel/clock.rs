//! Converting `bpf_ktime_get_ns()` (CLOCK_MONOTONIC) to wall-clock time.
use crate::schema::Ts;

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

    /// A kernel time as a wall-clock time.
    pub fn ts(&self, mono_ns: u64) -> Ts {
        Ts(self.to_unix_ns(mono_ns))
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

#[cfg(test)]
mod tests {
    use super::*;

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
