//! Times. Inside the program a time is [`Ts`], nanoseconds since the Unix epoch; only at the
//! edge (a JSON line, a table cell) does it become text: RFC 3339 in UTC with microseconds, the
//! precision every record keeps.
use std::fmt;

use serde::{Deserialize, Deserializer, Serialize, Serializer, de};
use time::{OffsetDateTime, format_description::well_known::Rfc3339, macros::format_description};

/// A wall-clock time: nanoseconds since the Unix epoch (UTC).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Ts(pub i128);

impl Ts {
    pub const fn from_unix_ns(ns: i128) -> Self {
        Self(ns)
    }

    pub const fn unix_ns(self) -> i128 {
        self.0
    }

    /// The current wall-clock time.
    pub fn now() -> Self {
        Self(
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_nanos() as i128)
                .unwrap_or(0),
        )
    }

    /// The same time at the precision a record keeps (whole microseconds): what a time read
    /// back from a record compares equal to.
    pub const fn micros(self) -> Self {
        Self(self.0.div_euclid(1000) * 1000)
    }

    /// Whole seconds since the epoch (the timeline's unit).
    pub const fn secs(self) -> i64 {
        self.0.div_euclid(1_000_000_000) as i64
    }

    pub const fn plus_secs_f64(self, s: f64) -> Self {
        Self(self.0 + (s * 1e9) as i128)
    }

    /// `2026-11-25T11:20:00.123456Z`.
    pub fn rfc3339(self) -> String {
        let fmt = format_description!(
            "[year]-[month]-[day]T[hour]:[minute]:[second].[subsecond digits:6]Z"
        );
        OffsetDateTime::from_unix_timestamp_nanos(self.0)
            .ok()
            .and_then(|t| t.format(&fmt).ok())
            .unwrap_or_else(|| format!("@{}ns", self.0))
    }

    /// `HH:MM:SS.mmm` (UTC), for the live human output.
    pub fn hms(self) -> String {
        let fmt = format_description!("[hour]:[minute]:[second].[subsecond digits:3]");
        OffsetDateTime::from_unix_timestamp_nanos(self.0)
            .ok()
            .and_then(|t| t.format(&fmt).ok())
            .unwrap_or_else(|| "??:??:??.???".to_string())
    }

    /// Any RFC 3339 time (any precision, any offset).
    pub fn parse_rfc3339(s: &str) -> Option<Self> {
        OffsetDateTime::parse(s, &Rfc3339)
            .ok()
            .map(|t| Self(t.unix_timestamp_nanos()))
    }
}

impl fmt::Display for Ts {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.rfc3339())
    }
}

impl Serialize for Ts {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.rfc3339())
    }
}

impl<'de> Deserialize<'de> for Ts {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl de::Visitor<'_> for V {
            type Value = Ts;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("an RFC 3339 time")
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Ts, E> {
                Ts::parse_rfc3339(v).ok_or_else(|| E::custom(format_args!("bad timestamp {v:?}")))
            }
        }
        d.deserialize_str(V)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formats_with_micros_and_reads_any_precision() {
        let t = Ts(1_764_069_600_123_456_789);
        assert_eq!(t.rfc3339(), "2025-11-25T11:20:00.123456Z");
        assert_eq!(t.hms(), "11:20:00.123");
        let back: Ts = serde_json::from_str(&serde_json::to_string(&t).expect("ser")).expect("de");
        assert_eq!(back, t.micros());
        assert_eq!(
            Ts::parse_rfc3339("2025-11-25T12:20:00+01:00"),
            Some(Ts(1_764_069_600_000_000_000))
        );
        let e = serde_json::from_str::<Ts>("\"yesterday\"").expect_err("bad");
        assert!(
            e.to_string().starts_with("bad timestamp \"yesterday\""),
            "{e}"
        );
        assert_eq!(Ts(-1).secs(), -1);
    }
}
