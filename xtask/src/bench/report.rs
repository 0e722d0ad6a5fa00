//! Turning runs into medians, target verdicts and BENCHMARKS.md. Pure.
use std::{collections::BTreeMap, fmt::Write as _};

use serde::{Deserialize, Serialize};

use super::{
    Results, Run,
    stats::{Spread, human, ratio, spread},
    vm::VmResults,
};

/// Median and spread of one metric of one scenario under one variant.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Row {
    pub scenario: String,
    pub variant: String,
    pub metric: String,
    #[serde(flatten)]
    pub spread: Spread,
}

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

/// A ratio for a table cell: paired per repetition when the runs allow it, else of medians.
fn ratio_cell(
    rows: &[Row],
    runs: &[Run],
    scenario: &str,
    a: &str,
    b: &str,
    metric: &str,
) -> String {
    match paired(runs, scenario, a, b, metric) {
        Some(s) if s.n > 1 && s.min != s.max => {
            format!("{:.3} ({:.3}-{:.3})", s.median, s.min, s.max)
        }
        Some(s) => format!("{:.3}", s.median),
        None => ratio(
            median(rows, scenario, a, metric),
            median(rows, scenario, b, metric),
        )
        .map(|r| format!("{r:.3}"))
        .unwrap_or_else(|| "-".into()),
    }
}

/// One target of the issue, measured.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Target {
    pub name: String,
    pub target: String,
    pub measured: String,
    /// None: could not be measured in this build or run.
    pub met: Option<bool>,
}

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
/// say so). `no-blame/`, `hooks-only/` and `catch/` variants are diagnostics: they are in the
/// tables, not here.
pub fn targets(
    rows: &[Row],
    runs: &[Run],
    variants: &[String],
    default_backend: Option<&str>,
) -> Vec<Target> {
    let mut out = Vec::new();
    let pes: Vec<&String> = variants
        .iter()
        .filter(|n| n.starts_with("portexhaust/"))
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

/// (metric, label, whether a ratio between variants means something)
type Spec = (&'static str, &'static str, bool);

const CHURN: &[Spec] = &[
    ("connects_per_s", "connects/s (higher is better)", true),
    (
        "false_failures",
        "failures reported (all connects succeeded: must be 0)",
        false,
    ),
    (
        "client_cpu_us_per_connect",
        "churn process CPU us per connect (lower is better)",
        true,
    ),
    ("tracer_cpu_s", "tracer CPU seconds during the run", true),
    (
        "tracer_cpu_s_per_m",
        "tracer CPU seconds per million connects",
        true,
    ),
    ("tracer_peak_rss_mib", "tracer peak RSS (MiB)", true),
    ("map_memlock_mib", "BPF map memory, memlock (MiB)", true),
];

const STORM: &[Spec] = &[
    ("failures_per_s", "failures/s (higher is better)", true),
    (
        "client_cpu_us_per_failure",
        "storm processes' CPU us per failure (lower is better)",
        true,
    ),
    ("client_failures", "failures the clients saw", false),
    ("reported_failures", "failures the tracer reported", false),
    ("exact", "exact (1 = every run)", false),
    (
        "events_streamed",
        "events streamed (every process on the machine)",
        false,
    ),
    (
        "dropped_events",
        "events dropped from the stream (still counted)",
        false,
    ),
];

const COST: &[Spec] = &[
    (
        "tracer_cpu_s_per_m",
        "tracer CPU s per million failures",
        true,
    ),
    ("tracer_user_s_per_m", "  of which user", true),
    ("tracer_sys_s_per_m", "  of which system", true),
    ("tracer_peak_rss_mib", "tracer peak RSS (MiB)", true),
    (
        "tracer_rss_mib",
        "tracer RSS at the end of the storm (MiB)",
        true,
    ),
    ("map_memlock_mib", "BPF map memory, memlock (MiB)", true),
    ("bpf_maps", "BPF maps", false),
    ("bpf_programs", "BPF programs", false),
];

const READY: &[Spec] = &[
    ("ready_ms", "start -> attached and reading (ms)", true),
    (
        "attaching_ms",
        "start -> \"Attaching N probes\" (ms)",
        false,
    ),
];

const START: &[Spec] = &[
    ("ready_ms", "start -> attached and reading (ms)", true),
    (
        "attaching_ms",
        "start -> \"Attaching N probes\" (ms)",
        false,
    ),
    ("tracer_peak_rss_mib", "tracer peak RSS (MiB)", true),
    ("map_memlock_mib", "BPF map memory, memlock (MiB)", true),
    ("bpf_maps", "BPF maps", false),
    ("bpf_programs", "BPF programs", false),
];

const SCALE: &[Spec] = &[
    ("connections", "connections held", false),
    ("established", "ESTABLISHED sockets in the namespace", false),
    (
        "open_rate_per_s",
        "holder connects/s while opening (higher is better)",
        true,
    ),
    ("tracked_sockets", "sockets the tracer tracks", false),
    (
        "tracer_rss_mib",
        "tracer RSS with the sockets open (MiB)",
        true,
    ),
    ("tracer_peak_rss_mib", "tracer peak RSS (MiB)", true),
    ("map_memlock_mib", "BPF map memory, memlock (MiB)", true),
    (
        "census_ready_ms",
        "a tracer started with the sockets open: start -> ready (ms, median of its starts)",
        true,
    ),
    (
        "census_done_ms",
        "  start -> its census of the open sockets done (ms)",
        true,
    ),
    (
        "census_peak_rss_mib",
        "  its peak RSS (MiB, highest of its starts)",
        true,
    ),
    ("census_tracked_sockets", "  sockets it tracks", false),
    ("holder_rss_mib", "holder processes' RSS (MiB)", false),
];

fn cell(s: Option<&Spread>) -> String {
    match s {
        None => "-".into(),
        Some(s) if s.n == 1 || s.min == s.max => human(s.median),
        Some(s) => format!("{} ({}-{})", human(s.median), human(s.min), human(s.max)),
    }
}

fn table(
    out: &mut String,
    rows: &[Row],
    runs: &[Run],
    scenario: &str,
    variants: &[String],
    specs: &[Spec],
) {
    let pes: Vec<&String> = variants
        .iter()
        .filter(|v| {
            v.starts_with("portexhaust/") || v.starts_with("no-blame/") || v.starts_with("catch/")
        })
        .collect();
    let has_untraced = variants.iter().any(|v| v == "untraced");
    let has_bpftrace = variants.iter().any(|v| v == "bpftrace");
    let shown: Vec<&String> = variants
        .iter()
        .filter(|v| {
            rows.iter()
                .any(|r| r.scenario == scenario && &r.variant == *v)
        })
        .collect();
    if shown.is_empty() {
        out.push_str("(not run)\n\n");
        return;
    }
    let _ = write!(out, "| metric |");
    for v in &shown {
        let _ = write!(out, " {v} |");
    }
    let mut ratio_cols: Vec<(&String, &str)> = Vec::new();
    let untraced_shown = has_untraced && shown.iter().any(|v| v.as_str() == "untraced");
    let bpftrace_shown = has_bpftrace && shown.iter().any(|v| v.as_str() == "bpftrace");
    for pe in &pes {
        if untraced_shown {
            ratio_cols.push((pe, "untraced"));
        }
        if bpftrace_shown {
            ratio_cols.push((pe, "bpftrace"));
        }
    }
    for h in shown.iter().filter(|v| v.starts_with("hooks-only/")) {
        if untraced_shown {
            ratio_cols.push((h, "untraced"));
        }
    }
    for (pe, base) in &ratio_cols {
        let _ = write!(out, " {pe} / {base} |");
    }
    out.push_str("\n|---|");
    for _ in 0..shown.len() + ratio_cols.len() {
        out.push_str("---|");
    }
    out.push('\n');
    for &(metric, label, with_ratio) in specs {
        if !rows
            .iter()
            .any(|r| r.scenario == scenario && r.metric == metric)
        {
            continue;
        }
        let _ = write!(out, "| {label} |");
        for v in &shown {
            let _ = write!(out, " {} |", cell(find(rows, scenario, v, metric)));
        }
        for (pe, base) in &ratio_cols {
            let r = if with_ratio {
                ratio_cell(rows, runs, scenario, pe, base, metric)
            } else {
                "-".into()
            };
            let _ = write!(out, " {r} |");
        }
        out.push('\n');
    }
    out.push('\n');
}

/// BPF time per failure, by program, from the profile runs.
fn profile_section(s: &mut String, res: &Results) {
    let profiles: Vec<&Run> = res
        .runs
        .iter()
        .filter(|r| r.scenario == "profile")
        .collect();
    if profiles.is_empty() {
        return;
    }
    let _ = writeln!(
        s,
        "### Where a traced failure's time goes\n\nOne storm of {} failures per tracer with BPF \
         run-time statistics on (`BPF_ENABLE_STATS`, held only for that run; each program run \
         then also pays two clock reads, so these runs are not in the rates above). Time is the \
         kernel's `run_time_ns` of each program the tracer holds, read from \
         /proc/PID/fdinfo.\n",
        human(res.plan.profile_failures as f64)
    );
    let _ = writeln!(
        s,
        "| tracer | program | runs per failure | ns per run | ns per failure |\n|---|---|---|---|---|"
    );
    for r in profiles {
        for p in r.detail["programs"].as_array().into_iter().flatten() {
            let _ = writeln!(
                s,
                "| {} | {} | {} | {} | {} |",
                r.variant,
                p["program"].as_str().unwrap_or("?"),
                human(p["runs_per_failure"].as_f64().unwrap_or(0.0)),
                human(p["ns_per_run"].as_f64().unwrap_or(0.0)),
                human(p["ns_per_failure"].as_f64().unwrap_or(0.0)),
            );
        }
        let _ = writeln!(
            s,
            "| {} | **all** | {} | | **{}** |",
            r.variant,
            human(
                r.metrics
                    .get("bpf_runs_per_failure")
                    .copied()
                    .unwrap_or(0.0)
            ),
            human(r.metrics.get("bpf_ns_per_failure").copied().unwrap_or(0.0)),
        );
    }
    s.push('\n');
}

/// BENCHMARKS.md: the run on this machine, the runs inside the VM kernels, whichever there
/// are, then the notes of their runs and the hand-written analysis.
pub fn markdown(host: Option<&Results>, vm: Option<&VmResults>, analysis: Option<&str>) -> String {
    let mut s = String::new();
    let _ = writeln!(s, "# Benchmarks\n");
    let mut notes = Vec::new();
    match host {
        Some(res) => {
            host_sections(&mut s, res);
            notes.extend(run_notes(res, ""));
        }
        None => {
            let _ = writeln!(
                s,
                "No run on this machine yet (`cargo xtask bench` writes `bench/results.json`); \
                 only the VM kernels' section below.\n"
            );
        }
    }
    if let Some(vm) = vm {
        s.push_str(&vm_section(vm));
        for k in &vm.kernels {
            if let Some(r) = &k.results {
                notes.extend(run_notes(r, &format!("[VM {}] ", k.label)));
            }
            if let Some(e) = &k.error {
                notes.push(format!("- [VM {}] {e}", k.label));
            }
        }
    }
    let mut seen = std::collections::BTreeSet::new();
    let notes: Vec<String> = notes
        .into_iter()
        .filter(|n| seen.insert(n.clone()))
        .collect();
    if !notes.is_empty() {
        let _ = writeln!(s, "## Notes from the runs\n\n{}\n", notes.join("\n"));
    }
    if let Some(a) = analysis {
        let _ = writeln!(s, "{}", a.trim_end());
    }
    s
}

/// Every run's notes and every failed run, one markdown list item each.
fn run_notes(res: &Results, prefix: &str) -> Vec<String> {
    res.runs
        .iter()
        .flat_map(|r| {
            r.notes
                .iter()
                .map(move |n| format!("- {prefix}{} {} #{}: {n}", r.scenario, r.variant, r.rep))
        })
        .chain(
            res.failed_runs
                .iter()
                .map(|f| format!("- {prefix}FAILED {f}")),
        )
        .collect()
}

fn host_sections(s: &mut String, res: &Results) {
    let p = &res.plan;
    let _ = writeln!(
        s,
        "Generated by `cargo xtask bench{}` on {} ({} run: {} repetitions per scenario and \
         variant, interleaved in rotating order; scale: {} repetition(s)). Cells are \
         `median (min-max)`; ratios are taken per repetition (the variants of one repetition \
         run back to back) and shown as `median (min-max)` of those. Do not edit by hand: rerun it; commentary lives in \
         `bench/analysis.md` and is copied in below. Every run is in `bench/results.json`.\n",
        if p.mode == "quick" { " --quick" } else { "" },
        res.date,
        p.mode,
        p.reps,
        p.scale_reps
    );
    let m = &res.machine;
    let _ = writeln!(s, "## Machine\n\n| | |\n|---|---|");
    let _ = writeln!(s, "| CPU | {} x {} |", m.nproc, m.cpu_model);
    let _ = writeln!(
        s,
        "| memory | {:.1} GiB |",
        m.mem_total_kib as f64 / 1024.0 / 1024.0
    );
    let _ = writeln!(s, "| kernel | {} |", m.kernel);
    let _ = writeln!(s, "| portexhaust | {} |", res.git);
    let _ = writeln!(
        s,
        "| bpftrace | {} |",
        res.bpftrace.as_deref().unwrap_or("not installed")
    );
    let _ = writeln!(s, "| backends run | {} |", res.backends_ran.join(", "));
    if let Some(d) = &res.default_backend {
        let _ = writeln!(s, "| default backend (plain `trace`) | {d} |");
    }
    let _ = writeln!(
        s,
        "| `trace --catch` | {} |",
        if res.catch_offered {
            "offered: `catch/B` = `trace --catch bind,udp` measured as its own variant"
        } else {
            "not offered by this build (no `catch/B` variants)"
        }
    );
    for (b, why) in &res.backends_skipped {
        let _ = writeln!(s, "| backend {b} skipped | {} |", why.replace('|', "/"));
    }
    let la = |l: [f64; 3]| format!("{:.2} {:.2} {:.2}", l[0], l[1], l[2]);
    let _ = writeln!(
        s,
        "| load average | {} at the start, {} at the end (other work shares this machine) |",
        la(res.loadavg_start),
        la(res.loadavg_end)
    );
    let _ = writeln!(s, "| run time | {:.0} s |\n", res.elapsed_s);

    let _ = writeln!(s, "## Targets\n\n{}", targets_table(&res.targets));
    let v = &res.variants;
    let _ = writeln!(
        s,
        "## 1. Connect/close churn that succeeds\n\nOne process in its own namespace: connect \
         to 127.0.0.1, accept, server closes first, client reads EOF and closes, for {} s \
         (range of 20000 ports, `tcp_tw_reuse=1`).\n",
        p.churn_secs
    );
    table(s, &res.summary, &res.runs, "churn", v, CHURN);
    let _ = writeln!(
        s,
        "## 2. Failure storm\n\nEach process holds every port of a {}-port range to \
         127.0.0.1:5000 in its own namespace, then calls socket() + connect() in a tight loop; \
         each connect fails with EADDRNOTAVAIL. The rate is failures over the slowest \
         process's time; exactness compares the tracer's count for the storm's pids (bpftrace: \
         its comm) with the count the clients saw. `hooks-only/B` is a diagnostic: backend B \
         with `--pid 1`, so every program runs but no failure is counted or reported (what \
         tracking costs without reporting).\n\n### One process ({} failures)\n",
        p.storm_ports,
        human(p.storm_failures as f64)
    );
    table(s, &res.summary, &res.runs, "storm", v, STORM);
    let _ = writeln!(
        s,
        "### Two processes ({} failures each)\n",
        human(p.storm2_failures_each as f64)
    );
    table(s, &res.summary, &res.runs, "storm2", v, STORM);
    let _ = writeln!(
        s,
        "## 3. Tracer cost\n\nCPU of the tracer process from ready to exit (/proc/PID/stat \
         at ready, wait4 rusage at exit), per million failures; peak RSS from wait4 \
         (`ru_maxrss`, = VmHWM); BPF map memory is the sum of `memlock:` in \
         /proc/PID/fdinfo of the tracer's map fds. CPU spent in the BPF programs themselves is \
         charged to the process that makes the syscall, so it shows up as a lower storm rate, \
         not here.\n\n### One-process storm\n"
    );
    table(s, &res.summary, &res.runs, "storm", v, COST);
    let _ = writeln!(s, "### Two-process storm\n");
    table(s, &res.summary, &res.runs, "storm2", v, COST);
    profile_section(s, res);
    let _ = writeln!(
        s,
        "## 4. Time to ready\n\nFrom spawning the tracer to: portexhaust's stderr line \
         containing `ready:` (printed once every program is attached and the ring buffer is \
         being read); bpftrace's `__BPFTRACE_NOTIFY_PROBES_ATTACHED` line (its own hook, \
         printed after every probe is attached; its `Attaching N probes...` line comes before \
         attaching). Every traced churn and storm run contributes one start, before its load \
         begins.\n"
    );
    table(s, &res.summary, &res.runs, "ready", v, READY);
    if res.runs.iter().any(|r| r.scenario == "start") {
        let _ = writeln!(
            s,
            "### Start-up alone ({} starts of each tracer)\n\nEach tracer started and stopped as \
             soon as it is ready, nothing else running: the time-to-ready target is the median \
             of these; memory and BPF maps are at defaults.\n",
            p.ready_starts
        );
        table(s, &res.summary, &res.runs, "start", v, START);
    }
    let _ = writeln!(
        s,
        "## 5. Ownership tracking at scale\n\n`pxh-loadgen hold` opens N connections over \
         destinations 127.0.0.1:5000.. in one namespace (worker processes of at most ~9,900 \
         connections each, since RLIMIT_NOFILE cannot be raised past 20,000 here), then closes \
         and reopens them for {} s, with the tracer attached from before the first connect. A \
         second tracer is then started with every connection already open ({} times at the \
         largest size per run; its `ready:` line comes before its census of the open sockets, \
         whose end is timed by its `census:` line). bpftrace has no ownership tracking and is \
         not run here.\n",
        p.scale_churn_secs,
        p.census_starts.max(1)
    );
    for n in &p.scale_sizes {
        let _ = writeln!(s, "### {} connections\n", human(*n as f64));
        table(
            s,
            &res.summary,
            &res.runs,
            &format!("scale{}k", n / 1000),
            v,
            SCALE,
        );
    }
}

/// A paired ratio for the VM table: `median (min-max)`, or `-`.
fn vm_ratio(runs: &[Run], scenario: &str, a: &str, b: &str, metric: &str) -> String {
    match paired(runs, scenario, a, b, metric) {
        Some(s) if format!("{:.3}", s.min) != format!("{:.3}", s.max) => {
            format!("{:.3} ({:.3}-{:.3})", s.median, s.min, s.max)
        }
        Some(s) => format!("{:.3}", s.median),
        None => "-".into(),
    }
}

/// "## Inside the VM kernels": one table per kernel, a row per variant.
pub fn vm_section(vm: &VmResults) -> String {
    let mut s = String::new();
    let _ = writeln!(
        s,
        "## 6. Inside the VM kernels\n\nGenerated by `cargo xtask bench --vm KERNELS`: each \
         Debian cloud kernel boots under QEMU ({}; software emulation, TCG, no KVM) on the \
         machine above, with an initramfs holding busybox, portexhaust, pxh-loadgen, the \
         bench harness itself and, when the host has it, Debian's bpftrace with its libraries. \
         In the guest every variant (untraced, portexhaust with each backend that loads there, \
         `catch/B` when the binary offers `--catch`, bpftrace) runs the successful churn and \
         the one-process failure storm, interleaved in rotating order, repetitions as listed.\n\n\
         How to read it: the guest has one CPU and counts time in instructions \
         (`-icount shift=0,sleep=off`: one guest nanosecond per instruction, idle time skipped), \
         so its numbers do not move with this shared machine's load (repeated runs agree within \
         about 1%) but they are instruction counts, not cycles: no caches, no pipeline. Absolute \
         rates say nothing about real machines; the ratios compare variants inside one guest, \
         like with like. On one CPU the tracer's own user-space work competes with the load, so \
         the rates include the tracer's whole cost (on the 2-core host most of it runs beside \
         the load), while the load process's CPU per operation is what the kernel-side hooks \
         cost it. Ratios are per repetition, `median (min-max)`; \"exact\" counts storm runs \
         in which the tracer's count for the storm's pid (bpftrace: its comm) equals the \
         client's own; ready is from spawn to the tracer's ready line in guest time, pooled over \
         every traced run. The guests boot with `tsc=reliable` (otherwise the kernel falls back \
         to the emulated HPET for every clock read). Every run is in `bench/vm-results.json`.\n",
        vm.qemu.as_deref().unwrap_or("QEMU")
    );
    for k in &vm.kernels {
        let _ = writeln!(
            s,
            "### {} ({}): {}\n",
            k.label,
            k.suite,
            k.release.as_deref().unwrap_or("no kernel")
        );
        let _ = writeln!(s, "| | |\n|---|---|");
        if let (Some(p), Some(v)) = (&k.package, &k.version) {
            let _ = writeln!(s, "| kernel package | {p} {v} |");
        }
        let _ = writeln!(s, "| portexhaust | {} |", k.git);
        let la = |l: [f64; 3]| format!("{:.2}", l[0]);
        let _ = writeln!(
            s,
            "| measured | {}; {} CPU(s), {} MiB, initramfs {} MiB; /init after {} s, whole guest \
             {} s; host load average {} before, {} after |",
            k.date,
            k.smp,
            k.memory_mb,
            k.initramfs_mib.map_or("?".into(), human),
            k.boot_secs.map_or("?".into(), human),
            k.run_secs.map_or("?".into(), human),
            la(k.host_loadavg[0]),
            la(k.host_loadavg[1]),
        );
        if let Some(e) = &k.error {
            let _ = writeln!(s, "| **error** | {} |", e.replace('|', "/"));
        }
        let Some(r) = &k.results else {
            let _ = writeln!(s, "\n(no results from this guest)\n");
            continue;
        };
        let _ = writeln!(
            s,
            "| backends that load | {}{} |",
            r.backends_ran.join(", "),
            r.default_backend
                .as_ref()
                .map(|d| format!(" (plain `trace` picks {d})"))
                .unwrap_or_default()
        );
        for (b, why) in &r.backends_skipped {
            let _ = writeln!(s, "| backend {b} skipped | {} |", why.replace('|', "/"));
        }
        let _ = writeln!(
            s,
            "| bpftrace | {} |",
            match (&r.bpftrace, &r.bpftrace_skipped) {
                (Some(v), _) => format!("{v}, the host bench's one-liner"),
                (None, Some(why)) => format!("not run: {}", why.replace('|', "/")),
                (None, None) => "not run".into(),
            }
        );
        let p = &r.plan;
        let _ = writeln!(
            s,
            "| sizes | churn {} s; storm {} failures on a {}-port range; {} repetition(s) |\n",
            p.churn_secs,
            human(p.storm_failures as f64),
            p.storm_ports,
            p.reps
        );
        let _ = writeln!(
            s,
            "| variant | storm failures/s | / untraced | storm process CPU us per failure | \
             / untraced | counts exact | churn connects/s | / untraced | churn CPU us per \
             connect | / untraced | failures reported in churn (must be 0) | ready (ms) |\n\
             |---|---|---|---|---|---|---|---|---|---|---|---|"
        );
        let rows = &r.summary;
        for v in &r.variants {
            let traced = v != "untraced";
            let storms: Vec<&Run> = r
                .runs
                .iter()
                .filter(|x| x.scenario == "storm" && &x.variant == v)
                .collect();
            let exact = storms
                .iter()
                .filter(|x| x.metrics.get("exact") == Some(&1.0))
                .count();
            let exact_cell = match (traced, storms.len()) {
                (false, _) | (true, 0) => "-".to_string(),
                (true, n) if exact == n => format!("{exact} of {n}"),
                (true, n) => format!("**{exact} of {n}**"),
            };
            let false_failures = r
                .runs
                .iter()
                .filter(|x| x.scenario == "churn" && &x.variant == v)
                .filter_map(|x| x.metrics.get("false_failures").copied())
                .reduce(f64::max);
            let ratio_or_dash = |sc: &str, m: &str| {
                if traced {
                    vm_ratio(&r.runs, sc, v, "untraced", m)
                } else {
                    "-".into()
                }
            };
            let _ = writeln!(
                s,
                "| {v} | {} | {} | {} | {} | {exact_cell} | {} | {} | {} | {} | {} | {} |",
                cell(find(rows, "storm", v, "failures_per_s")),
                ratio_or_dash("storm", "failures_per_s"),
                cell(find(rows, "storm", v, "client_cpu_us_per_failure")),
                ratio_or_dash("storm", "client_cpu_us_per_failure"),
                cell(find(rows, "churn", v, "connects_per_s")),
                ratio_or_dash("churn", "connects_per_s"),
                cell(find(rows, "churn", v, "client_cpu_us_per_connect")),
                ratio_or_dash("churn", "client_cpu_us_per_connect"),
                false_failures.map_or("-".into(), human),
                cell(find(rows, "ready", v, "ready_ms")),
            );
        }
        s.push('\n');
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bench::Variant;
    use crate::bench::procs::{Flavor, TracerKind};

    fn run(scenario: &str, variant: &str, metrics: &[(&str, f64)]) -> Run {
        Run {
            scenario: scenario.into(),
            variant: variant.into(),
            rep: 0,
            metrics: metrics.iter().map(|(k, v)| (k.to_string(), *v)).collect(),
            notes: vec![],
            detail: serde_json::Value::Null,
        }
    }

    fn variants() -> Vec<Variant> {
        vec![
            Variant::Untraced,
            Variant::Traced(TracerKind::Portexhaust {
                backend: "tracepoint".into(),
                flavor: Flavor::Default,
            }),
            Variant::Traced(TracerKind::Portexhaust {
                backend: "tracepoint".into(),
                flavor: Flavor::NoBlame,
            }),
            Variant::Traced(TracerKind::Bpftrace),
        ]
    }

    #[test]
    fn ready_times_are_pooled_over_scenarios() {
        let runs = vec![
            run("churn", "bpftrace", &[("ready_ms", 80.0)]),
            run("storm", "bpftrace", &[("ready_ms", 90.0)]),
            run("scale10k", "bpftrace", &[("ready_ms", 500.0)]),
        ];
        let rows = summarise(&runs);
        let r = find(&rows, "ready", "bpftrace", "ready_ms").expect("pooled");
        assert_eq!((r.n, r.median), (2, 85.0));
    }

    #[test]
    fn targets_are_judged_on_medians() {
        let pe = "portexhaust/tracepoint";
        let mut runs = vec![
            run("storm", "untraced", &[("failures_per_s", 100.0)]),
            run(
                "storm",
                pe,
                &[
                    ("failures_per_s", 96.0),
                    ("exact", 1.0),
                    ("tracer_cpu_s_per_m", 0.2),
                ],
            ),
            run("storm", "bpftrace", &[("failures_per_s", 97.0)]),
            run("storm2", pe, &[("exact", 0.0), ("tracer_cpu_s_per_m", 0.3)]),
            run(
                "churn",
                "untraced",
                &[
                    ("connects_per_s", 1000.0),
                    ("client_cpu_us_per_connect", 30.0),
                ],
            ),
            run(
                "churn",
                pe,
                &[
                    ("connects_per_s", 985.0),
                    ("client_cpu_us_per_connect", 30.9),
                    ("ready_ms", 70.0),
                    ("map_memlock_mib", 59.7),
                ],
            ),
            run("scale100k", pe, &[("tracer_peak_rss_mib", 20.0)]),
        ];
        // Census starts kept in the detail: pooled one sample per start.
        runs[6].detail = serde_json::json!({"census_starts": [
            {"ready_ms": 120.0, "census_done_ms": 400.0, "peak_rss_mib": 30.0},
            {"ready_ms": 160.0, "census_done_ms": 420.0, "peak_rss_mib": 39.0},
            {"ready_ms": 140.0, "peak_rss_mib": 31.0},
        ]});
        for i in 0..15 {
            let mut r = run(
                "start",
                pe,
                &[("ready_ms", 90.0 + i as f64), ("map_memlock_mib", 20.0)],
            );
            r.rep = i;
            runs.push(r);
        }
        let rows = summarise(&runs);
        let names: Vec<String> = variants().iter().map(Variant::name).collect();
        let t = targets(&rows, &runs, &names, Some("tracepoint"));
        let by = |name: &str, goal: &str| {
            t.iter()
                .find(|x| x.name.contains(name) && x.target.contains(goal))
                .unwrap_or_else(|| panic!("{name} {goal}: {t:?}"))
                .met
        };
        assert_eq!(by("storm (1 process)", "0.95x"), Some(true));
        assert_eq!(by("storm (1 process)", "bpftrace"), Some(false));
        assert_eq!(by("storm (2 processes)", "0.95x"), None);
        assert_eq!(by("counts", "exact"), Some(false));
        assert_eq!(by("churn connects/s", "0.98x"), Some(true));
        // +3% CPU per connect is over the +2% budget.
        assert_eq!(by("churn CPU", "+2%"), Some(false));
        // The 15 start-up runs decide (median 97 ms), not the start before the churn.
        assert_eq!(by("ready of", "100 ms"), Some(true));
        assert_eq!(by("already open", "150 ms"), Some(true));
        // No tracked-socket count: the tracked-sockets memory target cannot be judged.
        assert_eq!(by("100k tracked sockets", "40 MB"), None);
        assert_eq!(by("started with 100k", "40 MB"), Some(false));
        // At defaults = the start-up runs (20 MiB), not the loaded churn (59.7).
        assert_eq!(by("BPF map memory", "24 MiB"), Some(true));
        // storm2 is over 0.25 s per million.
        assert_eq!(by("tracer CPU", "0.25 s"), Some(false));
        assert!(t.iter().all(|x| !x.name.contains("no-blame")), "{t:?}");
        assert!(t[0].name.contains("(default trace)"), "{}", t[0].name);
    }

    #[test]
    fn too_few_starts_are_not_judged() {
        let pe = "portexhaust/tracepoint";
        let runs = vec![run("start", pe, &[("ready_ms", 50.0)])];
        let rows = summarise(&runs);
        let names = vec![pe.to_string()];
        let t = targets(&rows, &runs, &names, None);
        let ready = t
            .iter()
            .find(|x| x.name == format!("time to ready of {pe}"))
            .expect("ready target");
        assert_eq!(ready.met, None);
    }

    #[test]
    fn vm_section_shows_ratios_and_why_bpftrace_did_not_run() {
        use crate::bench::{Plan, sys::Machine, vm::VmKernel};
        let pe = "portexhaust/fentry";
        let mut runs = Vec::new();
        for rep in 0..2 {
            for (v, rate, exact) in [("untraced", 1000.0, None), (pe, 900.0, Some(1.0))] {
                let mut m = vec![("failures_per_s", rate + rep as f64)];
                if let Some(e) = exact {
                    m.push(("exact", e));
                    m.push(("ready_ms", 1500.0));
                }
                let mut r = run("storm", v, &m);
                r.rep = rep;
                runs.push(r);
            }
        }
        let machine = Machine {
            cpu_model: "QEMU".into(),
            nproc: 2,
            mem_total_kib: 1,
            kernel: "6.1.0-50-cloud-amd64".into(),
        };
        let results = Results {
            schema: 2,
            date: "d".into(),
            machine: machine.clone(),
            git: "abc".into(),
            bpftrace: None,
            bpftrace_skipped: Some("no bpftrace on the host".into()),
            plan: Plan::vm(false, None),
            backends_ran: vec!["fentry".into()],
            backends_skipped: vec![("kprobe".into(), "no kprobe PMU".into())],
            default_backend: Some("fentry".into()),
            catch_offered: false,
            variants: vec!["untraced".into(), pe.into()],
            loadavg_start: [0.0; 3],
            loadavg_end: [0.0; 3],
            elapsed_s: 1.0,
            summary: summarise(&runs),
            targets: vec![],
            failed_runs: vec![],
            runs,
        };
        let vm = VmResults {
            schema: 1,
            host: machine,
            qemu: None,
            kernels: vec![VmKernel {
                label: "6.1".into(),
                suite: "bookworm".into(),
                date: "d".into(),
                git: "abc".into(),
                package: None,
                version: None,
                release: Some("6.1.0-50-cloud-amd64".into()),
                memory_mb: 1536,
                smp: 2,
                initramfs_mib: None,
                boot_secs: Some(5.0),
                run_secs: Some(200.0),
                host_loadavg: [[0.0; 3]; 2],
                error: None,
                results: Some(results),
            }],
        };
        let s = vm_section(&vm);
        assert!(
            s.contains("### 6.1 (bookworm): 6.1.0-50-cloud-amd64"),
            "{s}"
        );
        assert!(
            s.contains("| bpftrace | not run: no bpftrace on the host |"),
            "{s}"
        );
        assert!(
            s.contains("| backend kprobe skipped | no kprobe PMU |"),
            "{s}"
        );
        assert!(
            s.contains("| portexhaust/fentry | 900 (900-901) | 0.900 | - | - | 2 of 2 |"),
            "{s}"
        );
        let md = markdown(None, Some(&vm), Some("## Analysis"));
        assert!(md.contains("No run on this machine yet"), "{md}");
        assert!(md.trim_end().ends_with("## Analysis"), "{md}");
    }

    #[test]
    fn markdown_has_every_section_and_ratio() {
        let pe = "portexhaust/tracepoint";
        let runs = vec![
            run("churn", "untraced", &[("connects_per_s", 1000.0)]),
            run("churn", pe, &[("connects_per_s", 990.0)]),
            run("churn", "bpftrace", &[("connects_per_s", 1100.0)]),
        ];
        let rows = summarise(&runs);
        let mut s = String::new();
        let names: Vec<String> = variants().iter().map(Variant::name).collect();
        table(&mut s, &rows, &runs, "churn", &names, CHURN);
        assert!(
            s.contains("| connects/s (higher is better) | 1,000 | 990 | 1,100 | 0.990 | 0.900 |"),
            "{s}"
        );
        let mut empty = String::new();
        table(&mut empty, &rows, &runs, "storm", &names, STORM);
        assert_eq!(empty, "(not run)\n\n");
    }
}
