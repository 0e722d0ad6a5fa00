//! Turning runs into medians, target verdicts and BENCHMARKS.md. Pure.
mod markdown;
mod tables;
mod targets;
#[cfg(test)]
mod tests;
mod vm_section;

use std::collections::BTreeMap;

use super::{
    results::{Row, Run},
    stats::{Spread, ratio, spread},
};

pub use markdown::markdown;
pub use targets::{targets, targets_table};
pub use vm_section::vm_section;

/// Scenarios whose runs time each tracer's start (before any load begins).
const READY_FROM: &[&str] = &["churn", "storm", "storm2"];

pub fn summarise(runs: &[Run]) -> Vec<Row> {
    let mut samples: BTreeMap<(String, String, String), Vec<f64>> = BTreeMap::new();
    for r in runs {
        for (m, v) in &r.metrics {
            samples
                .entry((r.scenario.clone(), r.variant.clone(), m.clone()))
                .or_default()
                .push(*v);
            if READY_FROM.contains(&r.scenario.as_str()) && (m == "ready_ms" || m == "attaching_ms")
            {
                samples
                    .entry(("ready".into(), r.variant.clone(), m.clone()))
                    .or_default()
                    .push(*v);
            }
        }
    }
    samples
        .into_iter()
        .filter_map(|((scenario, variant, metric), v)| {
            Some(Row {
                scenario,
                variant,
                metric,
                spread: spread(&v)?,
            })
        })
        .collect()
}

fn find<'a>(rows: &'a [Row], scenario: &str, variant: &str, metric: &str) -> Option<&'a Spread> {
    rows.iter()
        .find(|r| r.scenario == scenario && r.variant == variant && r.metric == metric)
        .map(|r| &r.spread)
}

fn median(rows: &[Row], scenario: &str, variant: &str, metric: &str) -> Option<f64> {
    find(rows, scenario, variant, metric).map(|s| s.median)
}

/// Per-repetition ratio a/b of a metric, summarised. The variants of one repetition run back
/// to back, so load from other work on the machine, which drifts over minutes, mostly cancels
/// in the ratio; a ratio of medians taken over the whole run does not have that property.
pub fn paired(runs: &[Run], scenario: &str, a: &str, b: &str, metric: &str) -> Option<Spread> {
    let v: Vec<f64> = runs
        .iter()
        .filter(|r| r.scenario == scenario && r.variant == a)
        .filter_map(|ra| {
            let rb = runs
                .iter()
                .find(|r| r.scenario == scenario && r.variant == b && r.rep == ra.rep)?;
            ratio(
                ra.metrics.get(metric).copied(),
                rb.metrics.get(metric).copied(),
            )
        })
        .collect();
    spread(&v)
}
