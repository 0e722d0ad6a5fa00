//! Running a plan: every scenario it sizes, under each of its variants, interleaved in an
//! order that rotates with every repetition.
use std::time::Instant;

use anyhow::Result;

use super::{
    ScenarioArg,
    results::Run,
    scenarios::{Ctx, churn_run, profile_run, scale_run, start_run, storm_run},
    stats,
    variants::{Sets, Variant},
};

fn rotated<T: Clone>(v: &[T], by: usize) -> Vec<T> {
    let mut v = v.to_vec();
    if !v.is_empty() {
        let n = by % v.len();
        v.rotate_left(n);
    }
    v
}

/// Every scenario of the plan that `wanted` lets through, interleaved in rotating order.
/// Scenarios whose size in the plan is zero are skipped (a guest's plan has only two).
pub(super) fn run_plan(
    ctx: &Ctx,
    sets: &Sets,
    wanted: &dyn Fn(ScenarioArg) -> bool,
    started: Instant,
) -> (Vec<Run>, Vec<String>) {
    let plan = &ctx.plan;
    let mut runs: Vec<Run> = Vec::new();
    let mut failed: Vec<String> = Vec::new();
    let mut record = |what: String, r: Result<Run>| match r {
        Ok(run) => {
            let key = [
                "failures_per_s",
                "connects_per_s",
                "open_rate_per_s",
                "bpf_ns_per_failure",
                "ready_ms",
            ]
            .iter()
            .find_map(|k| {
                run.metrics
                    .get(*k)
                    .map(|v| format!("{k}={}", stats::human(*v)))
            })
            .unwrap_or_default();
            ctx.say(&format!(
                "[{:>5.0}s] {what}: {key}{}",
                started.elapsed().as_secs_f64(),
                if run.notes.is_empty() {
                    String::new()
                } else {
                    format!(" ({})", run.notes.join("; "))
                }
            ));
            runs.push(run);
        }
        Err(e) => {
            ctx.say(&format!("{what} FAILED: {e:#}"));
            failed.push(format!("{what}: {e:#}"));
        }
    };
    let traced: Vec<Variant> = sets
        .main
        .iter()
        .filter(|v| matches!(v, Variant::Traced(_)))
        .cloned()
        .collect();
    if wanted(ScenarioArg::Start) {
        for i in 0..plan.ready_starts {
            for v in rotated(&traced, i as usize) {
                record(format!("start {} #{i}", v.name()), start_run(ctx, &v, i));
            }
        }
    }
    for rep in 0..plan.reps {
        if wanted(ScenarioArg::Churn) && plan.churn_secs > 0.0 {
            for v in rotated(&sets.main, rep as usize) {
                record(
                    format!("churn {} #{rep}", v.name()),
                    churn_run(ctx, &v, rep),
                );
            }
        }
        if wanted(ScenarioArg::Storm) && plan.storm_failures > 0 {
            for v in rotated(&sets.storm, rep as usize + 1) {
                record(
                    format!("storm {} #{rep}", v.name()),
                    storm_run(ctx, &v, rep, 1, plan.storm_failures),
                );
            }
        }
        if wanted(ScenarioArg::Storm2) && plan.storm2_failures_each > 0 {
            for v in rotated(&sets.main, rep as usize + 2) {
                record(
                    format!("storm2 {} #{rep}", v.name()),
                    storm_run(ctx, &v, rep, 2, plan.storm2_failures_each),
                );
            }
        }
    }
    if wanted(ScenarioArg::Scale) {
        for rep in 0..plan.scale_reps {
            for &n in &plan.scale_sizes {
                for v in rotated(&sets.scale, rep as usize) {
                    record(
                        format!("scale {n} {} #{rep}", v.name()),
                        scale_run(ctx, &v, rep, n),
                    );
                }
            }
        }
    }
    if wanted(ScenarioArg::Profile) && plan.profile_failures > 0 {
        for v in &traced {
            record(
                format!("profile {}", v.name()),
                profile_run(ctx, v, plan.profile_failures),
            );
        }
    }
    (runs, failed)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rotation_spreads_the_order() {
        assert_eq!(rotated(&[1, 2, 3], 0), vec![1, 2, 3]);
        assert_eq!(rotated(&[1, 2, 3], 1), vec![2, 3, 1]);
        assert_eq!(rotated(&[1, 2, 3], 4), vec![2, 3, 1]);
        assert!(rotated::<u8>(&[], 3).is_empty());
    }
}
