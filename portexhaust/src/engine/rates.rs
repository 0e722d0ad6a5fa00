//! Rates, forecasts and connect() latency percentiles of destinations over time. Pure.
use std::{
    collections::{HashMap, VecDeque},
    net::{IpAddr, SocketAddr},
};

use portexhaust_common::LATENCY_BUCKETS;

use crate::schema::Latency;

/// Least-squares slope of (t, y) samples; None with fewer than two distinct times.
pub fn slope(samples: &[(f64, f64)]) -> Option<f64> {
    if samples.len() < 2 {
        return None;
    }
    let n = samples.len() as f64;
    let mt = samples.iter().map(|s| s.0).sum::<f64>() / n;
    let my = samples.iter().map(|s| s.1).sum::<f64>() / n;
    let den: f64 = samples.iter().map(|s| (s.0 - mt).powi(2)).sum();
    if den <= f64::EPSILON {
        return None;
    }
    Some(samples.iter().map(|s| (s.0 - mt) * (s.1 - my)).sum::<f64>() / den)
}

/// Seconds until the range is full at the current growth, if it is growing; 0 when full.
pub fn forecast_seconds(range_size: u64, in_use: u64, growth_per_s: Option<f64>) -> Option<f64> {
    if in_use >= range_size {
        return Some(0.0);
    }
    let g = growth_per_s?;
    (g > 1e-9).then(|| (range_size - in_use) as f64 / g)
}

/// One destination's identity across refreshes.
pub type DestId = (u64, IpAddr, SocketAddr);

#[derive(Clone, Copy, Debug)]
struct Sample {
    t: f64,
    in_use: u64,
    connects: Option<u64>,
}

/// Keeps a sliding window of samples per destination.
#[derive(Debug)]
pub struct RateTracker {
    window_s: f64,
    by_dest: HashMap<DestId, VecDeque<Sample>>,
}

/// Rates of one destination over the window.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Rates {
    /// New connections per second (from the kernel's exact connect counter).
    pub new_per_s: Option<f64>,
    /// Growth of ports in use per second (least squares over the window).
    pub growth_per_s: Option<f64>,
}

impl RateTracker {
    pub fn new(window_s: f64) -> Self {
        Self {
            window_s,
            by_dest: HashMap::new(),
        }
    }

    pub fn observe(&mut self, t: f64, id: DestId, in_use: u64, connects: Option<u64>) -> Rates {
        let q = self.by_dest.entry(id).or_default();
        q.push_back(Sample {
            t,
            in_use,
            connects,
        });
        while q.front().is_some_and(|s| t - s.t > self.window_s) && q.len() > 2 {
            q.pop_front();
        }
        let pts: Vec<(f64, f64)> = q.iter().map(|s| (s.t, s.in_use as f64)).collect();
        let new_per_s = match (q.front(), q.back()) {
            (Some(a), Some(b)) if b.t - a.t > 1e-3 => match (a.connects, b.connects) {
                (Some(x), Some(y)) => Some(y.saturating_sub(x) as f64 / (b.t - a.t)),
                (None, Some(y)) => Some(y as f64 / (b.t - a.t)),
                _ => Some(0.0),
            },
            // First sight of this destination: the kernel only counted connects made since
            // tracing began (t = 0), so the average over that time is exact.
            (Some(a), _) if a.t > 1e-3 => a.connects.map(|y| y as f64 / a.t),
            _ => None,
        };
        Rates {
            new_per_s,
            growth_per_s: slope(&pts),
        }
    }

    /// Forget destinations not seen since `t - window`.
    pub fn prune(&mut self, t: f64) {
        let w = self.window_s;
        self.by_dest
            .retain(|_, q| q.back().is_some_and(|s| t - s.t <= w));
    }
}

/// Percentiles from a log2 histogram (bucket i = [2^i, 2^(i+1)) ns): each is reported as the
/// upper bound of its bucket, the honest precision of such a histogram.
pub fn latency(hist: &[u64; LATENCY_BUCKETS]) -> Option<Latency> {
    let count: u64 = hist.iter().sum();
    if count == 0 {
        return None;
    }
    let pct = |p: f64| -> f64 {
        let rank = ((p * count as f64).ceil() as u64).max(1);
        let mut cum = 0;
        for (i, n) in hist.iter().enumerate() {
            cum += n;
            if cum >= rank {
                return (1u64 << (i + 1).min(63)) as f64 / 1000.0;
            }
        }
        (1u64 << LATENCY_BUCKETS) as f64 / 1000.0
    };
    Some(Latency {
        count,
        p50: pct(0.50),
        p90: pct(0.90),
        p99: pct(0.99),
        buckets: hist.to_vec(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slope_and_forecast() {
        assert_eq!(slope(&[(0.0, 1.0)]), None);
        assert_eq!(slope(&[(1.0, 1.0), (1.0, 5.0)]), None);
        let s = slope(&[(0.0, 100.0), (1.0, 110.0), (2.0, 120.0)]).expect("slope");
        assert!((s - 10.0).abs() < 1e-9);
        assert_eq!(forecast_seconds(28232, 28000, Some(10.0)), Some(23.2));
        assert_eq!(forecast_seconds(100, 100, None), Some(0.0));
        assert_eq!(forecast_seconds(100, 50, Some(-1.0)), None);
        assert_eq!(forecast_seconds(100, 50, None), None);
        // The landscape figure: 28,232 ports / 60 s of TIME_WAIT ~ 470 connections per second.
        assert!((28232.0_f64 / 60.0 - 470.5).abs() < 0.1);
    }

    #[test]
    fn rate_tracker_uses_exact_connect_counters_over_the_window() {
        let id: DestId = (
            1,
            "127.0.0.1".parse().expect("ip"),
            "127.0.0.1:80".parse().expect("a"),
        );
        let mut r = RateTracker::new(10.0);
        assert_eq!(r.observe(0.0, id, 0, Some(0)).new_per_s, None);
        let other: DestId = (2, id.1, id.2);
        assert_eq!(r.observe(4.0, other, 8, Some(20)).new_per_s, Some(5.0));
        let x = r.observe(2.0, id, 40, Some(100));
        assert_eq!(x.new_per_s, Some(50.0));
        assert_eq!(x.growth_per_s, Some(20.0));
        // Old samples leave the window.
        let y = r.observe(30.0, id, 40, Some(100));
        let z = r.observe(31.0, id, 40, Some(100));
        assert_eq!(y.new_per_s.map(|v| v < 10.0), Some(true));
        assert_eq!(z.growth_per_s, Some(0.0));
        r.prune(100.0);
        assert!(r.by_dest.is_empty());
    }

    #[test]
    fn latency_percentiles_from_log2_buckets() {
        let mut h = [0u64; LATENCY_BUCKETS];
        assert_eq!(latency(&h), None);
        h[10] = 90; // ~1 us
        h[20] = 10; // ~1 ms
        let l = latency(&h).expect("latency");
        assert_eq!(l.count, 100);
        assert_eq!(l.p50, 2.048);
        assert_eq!(l.p90, 2.048);
        assert_eq!(l.p99, 2097.152);
        // The histogram itself travels with its percentiles (the metrics serve it).
        assert_eq!(l.buckets, h.to_vec());
    }
}
