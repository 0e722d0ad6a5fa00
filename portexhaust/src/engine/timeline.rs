//! Failures over time, in at most [`MAX_BUCKETS`] buckets. Pure.
use std::collections::BTreeMap;

use serde::Serialize;

use crate::schema::Ts;

/// Timeline buckets at most; longer incidents get wider buckets.
pub const MAX_BUCKETS: usize = 600;

#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct Timeline {
    pub start_ts: Option<Ts>,
    pub bucket_s: u64,
    /// Recorded failures per bucket.
    pub counts: Vec<u64>,
}

impl Timeline {
    /// Failures per bucket over `[first, last]` seconds: the recording, not just the
    /// failures (the quiet time before the first failure is part of the story).
    pub fn new(per_second: &BTreeMap<i64, u64>, span: Option<(i64, i64)>) -> Self {
        let failures = per_second
            .first_key_value()
            .zip(per_second.last_key_value());
        let (first, last) = match (failures, span) {
            (Some(((&a, _), (&b, _))), Some((s, e))) => (a.min(s), b.max(e)),
            (Some(((&a, _), (&b, _))), None) => (a, b),
            (None, _) => {
                return Self {
                    bucket_s: 1,
                    ..Default::default()
                };
            }
        };
        let span = (last - first + 1) as u64;
        let bucket_s = span.div_ceil(MAX_BUCKETS as u64).max(1);
        let n = span.div_ceil(bucket_s) as usize;
        let mut counts = vec![0u64; n];
        for (&sec, &c) in per_second {
            let i = ((sec - first) as u64 / bucket_s) as usize;
            if let Some(slot) = counts.get_mut(i) {
                *slot += c;
            }
        }
        Self {
            start_ts: Some(Ts(i128::from(first) * 1_000_000_000)),
            bucket_s,
            counts,
        }
    }

    /// The busiest bucket and its count (the earliest of equals), if any failed.
    pub fn peak(&self) -> Option<(usize, u64)> {
        self.counts
            .iter()
            .copied()
            .enumerate()
            .max_by(|a, b| a.1.cmp(&b.1).then(b.0.cmp(&a.0)))
            .filter(|(_, c)| *c > 0)
    }

    /// Time at the start of bucket `i`.
    pub fn bucket_ts(&self, i: usize) -> Option<Ts> {
        self.start_ts
            .map(|s| Ts(s.0 + i as i128 * self.bucket_s as i128 * 1_000_000_000))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wide_incidents_get_wide_buckets() {
        let per: BTreeMap<i64, u64> = [(10, 1), (11, 2), (2000, 5)].into();
        let t = Timeline::new(&per, Some((0, 2000)));
        assert_eq!(t.bucket_s, 4);
        assert_eq!(t.counts.len(), 501);
        assert_eq!(t.counts.iter().sum::<u64>(), 8);
        assert_eq!(t.peak(), Some((500, 5)));
        assert_eq!(t.bucket_ts(1), Some(Ts(4_000_000_000)));
        assert_eq!(Timeline::new(&BTreeMap::new(), None).peak(), None);
    }
}
