//! The targets, judged for every blame-on portexhaust variant.
use std::fmt::Write as _;

use super::{find, median, paired};
use crate::bench::{
    results::{Row, Run, Target},
    stats::{Spread, human, spread},
};

/// The targets for a plain `trace` (blame on) on the development machine.
const STORM_VS_UNTRACED: f64 = 0.95;
const CHURN_RATE_VS_UNTRACED: f64 = 0.98;
const CHURN_CPU_OVER_UNTRACED: f64 = 0.02;
const READY_MS: f64 = 100.0;
const READY_WITH_CONNECTIONS_MS: f64 = 150.0;
const RSS_BYTES: f64 = 40e6;
const MEMLOCK_MIB: f64 = 24.0;
const TRACER_CPU_S_PER_M: f64 = 0.25;

const MIB_BYTES: f64 = 1024.0 * 1024.0;

/// Every start of a tracer with the largest scale's connections open: (ready ms, census done
/// ms, peak RSS MiB). Runs that kept each start in their detail give one sample per start;
/// earlier ones give their single census start.
fn census_samples(runs: &[Run], scenario: &str, variant: &str) -> Vec<(f64, Option<f64>, f64)> {
    let mut out = Vec::new();
    for r in runs
        .iter()
        .filter(|r| r.scenario == scenario && r.variant == variant)
    {
        match r.detail.get("census_starts").and_then(|v| v.as_array()) {
            Some(starts) => out.extend(starts.iter().filter_map(|c| {
                Some((
                    c["ready_ms"].as_f64()?,
                    c["census_done_ms"].as_f64(),
                    c["peak_rss_mib"].as_f64()?,
                ))
            })),
            None => {
                if let (Some(ready), Some(peak)) = (
                    r.metrics.get("census_ready_ms"),
                    r.metrics.get("census_peak_rss_mib"),
                ) {
                    out.push((*ready, None, *peak));
                }
            }
        }
    }
    out
}

fn max_of(runs: &[Run], pred: impl Fn(&Run) -> bool, metric: &str) -> Option<(f64, usize)> {
    let v: Vec<f64> = runs
        .iter()
        .filter(|r| pred(r))
        .filter_map(|r| r.metrics.get(metric).copied())
        .collect();
    let n = v.len();
    v.into_iter().reduce(f64::max).map(|m| (m, n))
}

fn ms_spread(s: &Spread) -> String {
    format!(
        "median {} ms (min {}, max {}; {} starts)",
        human(s.median),
        human(s.min),
        human(s.max),
        s.n
    )
}

/// The targets, judged for every blame-on `portexhaust/B` variant (the default backend's rows
/// say so), and for `catch-nat/B` (the same trace with NAT detection on: the targets must
/// still hold). `no-blame/`, `hooks-only/` and `catch/` variants are diagnostics: they are in
/// the tables, not here.
pub fn targets(
    rows: &[Row],
    runs: &[Run],
    variants: &[String],
    default_backend: Option<&str>,
) -> Vec<Target> {
    let mut out = Vec::new();
    let pes: Vec<&String> = variants
        .iter()
        .filter(|n| n.starts_with("portexhaust/") || n.starts_with("catch-nat/"))
        .collect();
    for pe in &pes {
        let who = match default_backend {
            Some(d) if pe.strip_prefix("portexhaust/") == Some(d) => {
                format!("{pe} (default trace)")
            }
            _ => pe.to_string(),
        };
        for (sc, label) in [("storm", "1 process"), ("storm2", "2 processes")] {
            let u = median(rows, sc, "untraced", "failures_per_s");
            let p = median(rows, sc, pe, "failures_per_s");
            let b = median(rows, sc, "bpftrace", "failures_per_s");
            let r = paired(runs, sc, pe, "untraced", "failures_per_s");
            out.push(Target {
                name: format!("failure storm ({label}) under {who}"),
                target: format!(">= {STORM_VS_UNTRACED:.2}x untraced"),
                measured: match (r, p, u) {
                    (Some(r), Some(p), Some(u)) => format!(
                        "{:.3}x (per repetition {:.3}-{:.3}; medians {}/s vs {}/s)",
                        r.median,
                        r.min,
                        r.max,
                        human(p),
                        human(u)
                    ),
                    _ => "not measured".into(),
                },
                met: r.map(|r| r.median >= STORM_VS_UNTRACED),
            });
            let rb = paired(runs, sc, pe, "bpftrace", "failures_per_s");
            out.push(Target {
                name: format!("failure storm ({label}) under {who}"),
                target: ">= bpftrace's rate".into(),
                measured: match (rb, b) {
                    (Some(rb), Some(b)) => format!(
                        "{:.3}x bpftrace's rate (per repetition {:.3}-{:.3}; bpftrace median {}/s)",
                        rb.median,
                        rb.min,
                        rb.max,
                        human(b)
                    ),
                    _ => "not measured".into(),
                },
                met: rb.map(|r| r.median >= 1.0),
            });
        }
        let storms: Vec<&Run> = runs
            .iter()
            .filter(|r| &r.variant == *pe && (r.scenario == "storm" || r.scenario == "storm2"))
            .collect();
        let exact = storms
            .iter()
            .filter(|r| r.metrics.get("exact") == Some(&1.0))
            .count();
        let dropped: f64 = storms
            .iter()
            .filter_map(|r| r.metrics.get("dropped_events"))
            .sum();
        out.push(Target {
            name: format!("counts under {who}"),
            target: "exact in every storm run".into(),
            measured: format!(
                "{exact} of {} runs exact; {} events dropped from the stream (counted)",
                storms.len(),
                human(dropped)
            ),
            met: (!storms.is_empty()).then_some(exact == storms.len()),
        });
        let u = median(rows, "churn", "untraced", "connects_per_s");
        let p = median(rows, "churn", pe, "connects_per_s");
        let r = paired(runs, "churn", pe, "untraced", "connects_per_s");
        out.push(Target {
            name: format!("churn connects/s under {who}"),
            target: format!(">= {CHURN_RATE_VS_UNTRACED:.2}x untraced"),
            measured: match (r, p, u) {
                (Some(r), Some(p), Some(u)) => format!(
                    "{:.3}x (per repetition {:.3}-{:.3}; medians {}/s vs {}/s)",
                    r.median,
                    r.min,
                    r.max,
                    human(p),
                    human(u)
                ),
                _ => "not measured".into(),
            },
            met: r.map(|r| r.median >= CHURN_RATE_VS_UNTRACED),
        });
        let cpu = paired(runs, "churn", pe, "untraced", "client_cpu_us_per_connect");
        let (cu, cp) = (
            median(rows, "churn", "untraced", "client_cpu_us_per_connect"),
            median(rows, "churn", pe, "client_cpu_us_per_connect"),
        );
        out.push(Target {
            name: format!("churn CPU per connect under {who}"),
            target: format!("<= +{:.0}% over untraced", CHURN_CPU_OVER_UNTRACED * 100.0),
            measured: match (cpu, cp, cu) {
                (Some(c), Some(p), Some(u)) => format!(
                    "{:+.1}% (per repetition {:+.1}% to {:+.1}%; medians {} us vs {} us in the \
                     churning process)",
                    (c.median - 1.0) * 100.0,
                    (c.min - 1.0) * 100.0,
                    (c.max - 1.0) * 100.0,
                    human(p),
                    human(u)
                ),
                _ => "not measured".into(),
            },
            met: cpu.map(|c| c.median - 1.0 <= CHURN_CPU_OVER_UNTRACED),
        });
        // Dedicated start-up runs when there are any; else every start before a load.
        let (ready, from) = match find(rows, "start", pe, "ready_ms") {
            Some(s) => (Some(s), "start-up runs"),
            None => (
                find(rows, "ready", pe, "ready_ms"),
                "starts before each load",
            ),
        };
        out.push(Target {
            name: format!("time to ready of {who}"),
            target: format!("<= {READY_MS:.0} ms (median of 15 starts)"),
            measured: ready
                .map(|s| format!("{} of the {from}", ms_spread(s)))
                .unwrap_or_else(|| "not measured".into()),
            // Fewer than 15 starts (a quick run) is too few to judge.
            met: ready.filter(|s| s.n >= 15).map(|s| s.median <= READY_MS),
        });
        let census = census_samples(runs, "scale100k", pe);
        let c_ready = spread(&census.iter().map(|c| c.0).collect::<Vec<_>>());
        let c_done = spread(&census.iter().filter_map(|c| c.1).collect::<Vec<_>>());
        out.push(Target {
            name: format!("time to ready of {who} with 100k connections already open"),
            target: format!("<= {READY_WITH_CONNECTIONS_MS:.0} ms"),
            measured: c_ready
                .map(|s| {
                    format!(
                        "{}{}",
                        ms_spread(&s),
                        c_done
                            .map(|d| format!(
                                "; its census of the open sockets (after the ready line) \
                                 done after a median {} ms",
                                human(d.median)
                            ))
                            .unwrap_or_default()
                    )
                })
                .unwrap_or_else(|| "not measured".into()),
            met: c_ready.map(|s| s.median <= READY_WITH_CONNECTIONS_MS),
        });
        let rss = max_of(
            runs,
            |r| r.scenario == "scale100k" && &r.variant == *pe,
            "tracer_peak_rss_mib",
        );
        let tracked = median(rows, "scale100k", pe, "tracked_sockets");
        out.push(Target {
            name: format!("tracer memory of {who} with 100k tracked sockets"),
            target: "RSS < 40 MB".into(),
            measured: match (rss, tracked) {
                (Some((r, n)), Some(t)) => format!(
                    "peak RSS {} MiB at most over {n} run(s), {} sockets tracked",
                    human(r),
                    human(t)
                ),
                (Some((r, _)), None) => format!(
                    "this build reports no tracked-socket count: peak RSS {} MiB with 100k \
                     connections open",
                    human(r)
                ),
                _ => "not measured".into(),
            },
            met: match (rss, tracked) {
                (Some((r, _)), Some(_)) => Some(r * MIB_BYTES < RSS_BYTES),
                _ => None,
            },
        });
        let c_peak = census.iter().map(|c| c.2).reduce(f64::max);
        out.push(Target {
            name: format!("tracer memory of {who} started with 100k connections open"),
            target: "RSS < 40 MB".into(),
            measured: c_peak
                .map(|p| {
                    format!(
                        "peak RSS {} MiB at most over {} start(s){}",
                        human(p),
                        census.len(),
                        median(rows, "scale100k", pe, "census_tracked_sockets")
                            .map(|t| format!(", {} sockets tracked", human(t)))
                            .unwrap_or_default()
                    )
                })
                .unwrap_or_else(|| "not measured".into()),
            met: c_peak.map(|p| p * MIB_BYTES < RSS_BYTES),
        });
        // At defaults: the start-up runs (nothing loaded), else the loaded runs.
        let memlock = max_of(
            runs,
            |r| r.scenario == "start" && &r.variant == *pe,
            "map_memlock_mib",
        )
        .or_else(|| {
            max_of(
                runs,
                |r| {
                    &r.variant == *pe && matches!(r.scenario.as_str(), "churn" | "storm" | "storm2")
                },
                "map_memlock_mib",
            )
        });
        out.push(Target {
            name: format!("BPF map memory of {who}"),
            target: format!("<= {MEMLOCK_MIB:.0} MiB memlock at defaults"),
            measured: memlock
                .map(|(m, n)| format!("{} MiB at most over {n} run(s)", human(m)))
                .unwrap_or_else(|| "not measured".into()),
            met: memlock.map(|(m, _)| m <= MEMLOCK_MIB),
        });
        let cpu: Vec<(&str, Spread)> = [("1 process", "storm"), ("2 processes", "storm2")]
            .into_iter()
            .filter_map(|(l, sc)| Some((l, *find(rows, sc, pe, "tracer_cpu_s_per_m")?)))
            .collect();
        out.push(Target {
            name: format!("tracer CPU of {who} in the failure storms"),
            target: format!("<= {TRACER_CPU_S_PER_M} s (user + system) per million failures"),
            measured: if cpu.is_empty() {
                "not measured".into()
            } else {
                cpu.iter()
                    .map(|(l, s)| {
                        format!(
                            "{l}: {} s (per run {}-{})",
                            human(s.median),
                            human(s.min),
                            human(s.max)
                        )
                    })
                    .collect::<Vec<_>>()
                    .join("; ")
            },
            met: (!cpu.is_empty()).then(|| cpu.iter().all(|(_, s)| s.median <= TRACER_CPU_S_PER_M)),
        });
    }
    out
}

pub fn targets_table(targets: &[Target]) -> String {
    let mut s = String::from("| target | goal | measured | met |\n|---|---|---|---|\n");
    for t in targets {
        let met = match t.met {
            Some(true) => "yes",
            Some(false) => "**no**",
            None => "n/a",
        };
        let _ = writeln!(s, "| {} | {} | {} | {met} |", t.name, t.target, t.measured);
    }
    s
}
