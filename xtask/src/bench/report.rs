//! Turning runs into medians, target verdicts and BENCHMARKS.md. Pure.
use std::{collections::BTreeMap, fmt::Write as _};

use serde::{Deserialize, Serialize};

use super::{
    Results, Run,
    stats::{Spread, human, ratio, spread},
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

fn pct(x: f64) -> String {
    format!("{:.1}%", x * 100.0)
}

pub fn targets(rows: &[Row], runs: &[Run], variants: &[String]) -> Vec<Target> {
    let mut out = Vec::new();
    let pes: Vec<&String> = variants
        .iter()
        .filter(|n| n.starts_with("portexhaust/") || n.starts_with("no-blame/"))
        .collect();
    for pe in &pes {
        for (sc, label) in [("storm", "1 process"), ("storm2", "2 processes")] {
            let u = median(rows, sc, "untraced", "failures_per_s");
            let p = median(rows, sc, pe, "failures_per_s");
            let b = median(rows, sc, "bpftrace", "failures_per_s");
            let r = paired(runs, sc, pe, "untraced", "failures_per_s");
            out.push(Target {
                name: format!("failure storm ({label}) under {pe}"),
                target: ">= 95% of untraced".into(),
                measured: match (r, p, u) {
                    (Some(r), Some(p), Some(u)) => format!(
                        "{} (per repetition {}-{}; medians {}/s vs {}/s)",
                        pct(r.median),
                        pct(r.min),
                        pct(r.max),
                        human(p),
                        human(u)
                    ),
                    _ => "not measured".into(),
                },
                met: r.map(|r| r.median >= 0.95),
            });
            let rb = paired(runs, sc, pe, "bpftrace", "failures_per_s");
            out.push(Target {
                name: format!("failure storm ({label}) under {pe}"),
                target: "not below bpftrace".into(),
                measured: match (rb, b) {
                    (Some(rb), Some(b)) => format!(
                        "{} of bpftrace's rate (per repetition {}-{}; bpftrace median {}/s)",
                        pct(rb.median),
                        pct(rb.min),
                        pct(rb.max),
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
            name: format!("counts under {pe}"),
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
        let cpu = paired(runs, "churn", pe, "untraced", "client_cpu_us_per_connect");
        out.push(Target {
            name: format!("churn overhead of {pe}"),
            target: "<= 2%".into(),
            measured: match (r, p, u) {
                (Some(r), Some(p), Some(u)) => format!(
                    "{} fewer connects/s (per repetition {} to {}; medians {}/s vs {}/s){}",
                    pct(1.0 - r.median),
                    pct(1.0 - r.max),
                    pct(1.0 - r.min),
                    human(p),
                    human(u),
                    cpu.map(|c| format!(
                        "; {} more CPU per connect in the churning process",
                        pct(c.median - 1.0)
                    ))
                    .unwrap_or_default()
                ),
                _ => "not measured".into(),
            },
            met: r.map(|r| 1.0 - r.median <= 0.02),
        });
        let ready = find(rows, "ready", pe, "ready_ms");
        out.push(Target {
            name: format!("time to ready of {pe}"),
            target: "< 300 ms".into(),
            measured: ready
                .map(|s| {
                    format!(
                        "median {} ms (max {}, {} starts)",
                        human(s.median),
                        human(s.max),
                        s.n
                    )
                })
                .unwrap_or_else(|| "not measured".into()),
            met: ready.map(|s| s.median < 300.0),
        });
        let rss = find(rows, "scale100k", pe, "tracer_peak_rss_mib");
        let tracked = median(rows, "scale100k", pe, "tracked_sockets");
        out.push(Target {
            name: format!("tracer memory of {pe} with 100k tracked sockets"),
            target: "RSS < 40 MB".into(),
            measured: match (rss, tracked) {
                (Some(r), Some(t)) => format!(
                    "peak RSS {} MiB with {} sockets tracked",
                    human(r.median),
                    human(t)
                ),
                (Some(r), None) => format!(
                    "ownership tracking not yet in this build: peak RSS {} MiB with 100k \
                     connections open but not tracked",
                    human(r.median)
                ),
                _ => "not measured".into(),
            },
            met: match (rss, tracked) {
                (Some(r), Some(_)) => Some(r.median * 1024.0 * 1024.0 < 40e6),
                _ => None,
            },
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
        "a tracer started with the sockets open: start -> ready (ms)",
        true,
    ),
    ("census_peak_rss_mib", "  its peak RSS (MiB)", true),
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
        .filter(|v| v.starts_with("portexhaust/") || v.starts_with("no-blame/"))
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

pub fn markdown(res: &Results, analysis: Option<&str>) -> String {
    let mut s = String::new();
    let p = &res.plan;
    let _ = writeln!(s, "# Benchmarks\n");
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
    table(&mut s, &res.summary, &res.runs, "churn", v, CHURN);
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
    table(&mut s, &res.summary, &res.runs, "storm", v, STORM);
    let _ = writeln!(
        s,
        "### Two processes ({} failures each)\n",
        human(p.storm2_failures_each as f64)
    );
    table(&mut s, &res.summary, &res.runs, "storm2", v, STORM);
    let _ = writeln!(
        s,
        "## 3. Tracer cost\n\nCPU of the tracer process from ready to exit (/proc/PID/stat \
         at ready, wait4 rusage at exit), per million failures; peak RSS from wait4 \
         (`ru_maxrss`, = VmHWM); BPF map memory is the sum of `memlock:` in \
         /proc/PID/fdinfo of the tracer's map fds. CPU spent in the BPF programs themselves is \
         charged to the process that makes the syscall, so it shows up as a lower storm rate, \
         not here.\n\n### One-process storm\n"
    );
    table(&mut s, &res.summary, &res.runs, "storm", v, COST);
    let _ = writeln!(s, "### Two-process storm\n");
    table(&mut s, &res.summary, &res.runs, "storm2", v, COST);
    profile_section(&mut s, res);
    let _ = writeln!(
        s,
        "## 4. Time to ready\n\nFrom spawning the tracer to: portexhaust's stderr line \
         containing `ready:` (printed once every program is attached and the ring buffer is \
         being read); bpftrace's `__BPFTRACE_NOTIFY_PROBES_ATTACHED` line (its own hook, \
         printed after every probe is attached; its `Attaching N probes...` line comes before \
         attaching). Every traced churn and storm run contributes one start, before its load \
         begins.\n"
    );
    table(&mut s, &res.summary, &res.runs, "ready", v, READY);
    let _ = writeln!(
        s,
        "## 5. Ownership tracking at scale\n\n`pxh-loadgen hold` opens N connections over \
         destinations 127.0.0.1:5000.. in one namespace (worker processes of at most ~9,900 \
         connections each, since RLIMIT_NOFILE cannot be raised past 20,000 here), then closes \
         and reopens them for {} s, with the tracer attached from before the first connect. A \
         second tracer is then started with every connection already open. bpftrace has no \
         ownership tracking and is not run here.\n",
        p.scale_churn_secs
    );
    for n in &p.scale_sizes {
        let _ = writeln!(s, "### {} connections\n", human(*n as f64));
        table(
            &mut s,
            &res.summary,
            &res.runs,
            &format!("scale{}k", n / 1000),
            v,
            SCALE,
        );
    }
    let notes: Vec<String> = res
        .runs
        .iter()
        .flat_map(|r| {
            r.notes
                .iter()
                .map(move |n| format!("- {} {} #{}: {n}", r.scenario, r.variant, r.rep))
        })
        .chain(res.failed_runs.iter().map(|f| format!("- FAILED {f}")))
        .collect();
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bench::Variant;
    use crate::bench::procs::TracerKind;

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
                filtered: false,
                lean: false,
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
        let runs = vec![
            run("storm", "untraced", &[("failures_per_s", 100.0)]),
            run("storm", pe, &[("failures_per_s", 96.0), ("exact", 1.0)]),
            run("storm", "bpftrace", &[("failures_per_s", 97.0)]),
            run("storm2", pe, &[("exact", 0.0)]),
            run("churn", "untraced", &[("connects_per_s", 1000.0)]),
            run(
                "churn",
                pe,
                &[("connects_per_s", 970.0), ("ready_ms", 70.0)],
            ),
            run("scale100k", pe, &[("tracer_peak_rss_mib", 20.0)]),
        ];
        let rows = summarise(&runs);
        let names: Vec<String> = variants().iter().map(Variant::name).collect();
        let t = targets(&rows, &runs, &names);
        let by = |name: &str, goal: &str| {
            t.iter()
                .find(|x| x.name.contains(name) && x.target.contains(goal))
                .unwrap_or_else(|| panic!("{name} {goal}: {t:?}"))
                .met
        };
        assert_eq!(by("storm (1 process)", "95%"), Some(true));
        assert_eq!(by("storm (1 process)", "bpftrace"), Some(false));
        assert_eq!(by("storm (2 processes)", "95%"), None);
        assert_eq!(by("counts", "exact"), Some(false));
        assert_eq!(by("churn", "2%"), Some(false));
        assert_eq!(by("ready", "300"), Some(true));
        // No tracked-socket count: the memory target cannot be judged yet.
        assert_eq!(by("memory", "40 MB"), None);
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
