//! The measured scenarios: one run of one scenario under one variant, with the load in private
//! network namespaces and a paused start (see bench.rs), and the context they run in.
use std::{collections::BTreeMap, path::PathBuf, time::Duration};

use anyhow::{Context as _, Result};
use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::{
    measure::{MIB, finish_tracer, reported, tracked_sockets},
    plan::Plan,
    procs::{Flavor, Load, Tracer, TracerKind},
    results::Run,
    stats, sys,
    variants::Variant,
};

const STORM_COMM: &str = "pxhb-storm";
const CHURN_COMM: &str = "pxhb-churn";
const HOLD_COMM: &str = "pxhb-hold";
pub(super) const READY_TIMEOUT: Duration = Duration::from_secs(30);
/// Under software emulation a tracer (bpftrace above all: LLVM) takes many seconds to start.
pub(super) const GUEST_READY_TIMEOUT: Duration = Duration::from_secs(180);

// Mirrors of pxh-loadgen's reports (loadgen/src/report.rs): xtask must build on a fresh
// machine before the eBPF toolchain exists, so it cannot depend on crates that embed eBPF.
#[derive(Clone, Debug, Serialize, Deserialize)]
struct StormReport {
    pid: u32,
    failures: u64,
    other: BTreeMap<String, u64>,
    truncated: bool,
    elapsed_s: f64,
    rate_per_s: f64,
    user_s: f64,
    sys_s: f64,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
struct ChurnReport {
    pid: u32,
    connects: u64,
    errors: BTreeMap<String, u64>,
    elapsed_s: f64,
    rate_per_s: f64,
    user_s: f64,
    sys_s: f64,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
struct HoldReport {
    pid: u32,
    connections: u64,
    dests: u16,
    workers: u32,
    open_s: f64,
    open_rate_per_s: f64,
    churned: u64,
    established: u64,
    rss_kib: u64,
}

pub(super) struct Ctx {
    pub(super) portexhaust: PathBuf,
    pub(super) loadgen: PathBuf,
    pub(super) plan: Plan,
    pub(super) ready_timeout: Duration,
    /// Inside a guest: progress also goes here (the results serial port) as
    /// `@@PXH-LOG ...@@` lines, so that the host can show it live.
    pub(super) log: Option<PathBuf>,
}

impl Ctx {
    fn tracer(&self, v: &Variant) -> Result<Option<Tracer>> {
        match v {
            Variant::Untraced => Ok(None),
            Variant::Traced(k) => {
                Tracer::start(k.clone(), &self.portexhaust, self.ready_timeout).map(Some)
            }
        }
    }

    pub(super) fn say(&self, msg: &str) {
        eprintln!("xtask: bench: {msg}");
        if let Some(p) = &self.log {
            use std::io::Write as _;
            // One open per line, as the guest's /init does: best effort, the line is also on
            // stderr, which the guest sends back at the end.
            if let Ok(mut f) = std::fs::OpenOptions::new().append(true).open(p) {
                let _ = writeln!(f, "@@PXH-LOG {}@@", msg.replace("@@", "@"));
            }
        }
    }
}

pub(super) fn storm_run(ctx: &Ctx, v: &Variant, rep: u32, procs: u32, each: u64) -> Result<Run> {
    let mut run = Run::new(if procs == 1 { "storm" } else { "storm2" }, v, rep);
    let each_s = each.to_string();
    let ports = ctx.plan.storm_ports.to_string();
    let args: Vec<Vec<String>> = (0..procs)
        .map(|_| {
            [
                "storm",
                "--failures",
                &each_s,
                "--ports",
                &ports,
                "--max-secs",
                "120",
                "--comm",
                STORM_COMM,
            ]
            .map(String::from)
            .to_vec()
        })
        .collect();
    let mut load = Load::start(&ctx.loadgen, &args, Duration::from_secs(60))?;
    let tracer = ctx.tracer(v)?;
    let cpu0 = tracer.as_ref().and_then(|t| sys::cpu_seconds(t.pid));
    load.go()?;
    let reports: Vec<StormReport> = load.reports(Duration::from_secs(200))?;
    let client: u64 = reports.iter().map(|r| r.failures).sum();
    // All loads start on the same go: the aggregate rate is over the slowest one's time.
    let slowest = reports.iter().map(|r| r.elapsed_s).fold(0.0, f64::max);
    run.set("failures_per_s", client as f64 / slowest.max(1e-9));
    run.set("client_failures", client as f64);
    // The storm processes' own CPU per failure: the in-kernel cost of tracing (BPF programs
    // run in the failing task's context) with less noise from whatever else shares the CPUs.
    let client_cpu: f64 = reports.iter().map(|r| r.user_s + r.sys_s).sum();
    run.set(
        "client_cpu_us_per_failure",
        client_cpu / (client as f64).max(1.0) * 1e6,
    );
    for r in &reports {
        if r.failures != each || !r.other.is_empty() || r.truncated {
            run.notes.push(format!(
                "load {} planned {each} failures, saw {} (other outcomes {:?}, truncated {})",
                r.pid, r.failures, r.other, r.truncated
            ));
        }
    }
    if let Some(t) = tracer {
        let (kind, stopped) = finish_tracer(&mut run, t, cpu0)?;
        let rep = reported(&kind, &stopped, &load.pids, STORM_COMM);
        let filtered = matches!(
            kind,
            TracerKind::Portexhaust {
                flavor: Flavor::HooksOnly,
                ..
            }
        );
        match rep.count {
            // The hooks-only variant reports nothing by design.
            _ if filtered => {}
            Some(c) => {
                run.set("reported_failures", c as f64);
                run.set("exact", f64::from(u8::from(c == client)));
                if c != client {
                    run.notes.push(format!(
                        "not exact: the tracer reported {c}, the clients saw {client}"
                    ));
                }
            }
            None => {
                run.set("exact", 0.0);
                run.notes.push("the tracer printed no summary".into());
            }
        }
        if let Some(x) = rep.streamed {
            run.set("events_streamed", x as f64);
        }
        if let Some(x) = rep.dropped {
            run.set("dropped_events", x as f64);
        }
        let millions = client as f64 / 1e6;
        if millions > 0.0 {
            for k in ["tracer_cpu_s", "tracer_user_s", "tracer_sys_s"] {
                if let Some(x) = run.metrics.get(k).copied() {
                    run.set(&format!("{k}_per_m"), x / millions);
                }
            }
        }
    }
    run.detail["loads"] = serde_json::to_value(&reports)?;
    load.finish(Duration::from_secs(30))?;
    Ok(run)
}

pub(super) fn churn_run(ctx: &Ctx, v: &Variant, rep: u32) -> Result<Run> {
    let mut run = Run::new("churn", v, rep);
    let args = vec![
        [
            "churn",
            "--secs",
            &ctx.plan.churn_secs.to_string(),
            "--comm",
            CHURN_COMM,
        ]
        .map(String::from)
        .to_vec(),
    ];
    let mut load = Load::start(&ctx.loadgen, &args, Duration::from_secs(60))?;
    let tracer = ctx.tracer(v)?;
    let cpu0 = tracer.as_ref().and_then(|t| sys::cpu_seconds(t.pid));
    load.go()?;
    let reports: Vec<ChurnReport> =
        load.reports(Duration::from_secs_f64(ctx.plan.churn_secs + 60.0))?;
    let r = reports.first().context("churn sent no report")?;
    run.set("connects_per_s", r.rate_per_s);
    run.set("connects", r.connects as f64);
    run.set(
        "client_cpu_us_per_connect",
        (r.user_s + r.sys_s) / (r.connects as f64).max(1.0) * 1e6,
    );
    if !r.errors.is_empty() {
        run.notes
            .push(format!("churn connects failed: {:?}", r.errors));
    }
    if let Some(t) = tracer {
        let (kind, stopped) = finish_tracer(&mut run, t, cpu0)?;
        // Every connect succeeded: a tracer that reports a failure here is wrong.
        let rep = reported(&kind, &stopped, &load.pids, CHURN_COMM);
        run.set("false_failures", rep.count.unwrap_or(0) as f64);
        if let Some(x) = run.metrics.get("tracer_cpu_s").copied() {
            run.set(
                "tracer_cpu_s_per_m",
                x / (r.connects as f64 / 1e6).max(1e-9),
            );
        }
    }
    run.detail["loads"] = serde_json::to_value(&reports)?;
    load.finish(Duration::from_secs(30))?;
    Ok(run)
}

/// One start of a tracer with the scale scenario's connections already open.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct CensusStart {
    pub ready_ms: f64,
    /// Until portexhaust's `census:` line: its count of the sockets already open, which it
    /// takes after the ready line.
    #[serde(default)]
    pub census_done_ms: Option<f64>,
    pub rss_mib: Option<f64>,
    pub peak_rss_mib: f64,
    pub tracked_sockets: Option<u64>,
    pub exit_code: Option<i32>,
}

/// One start of a tracer with nothing else going on: time to ready, memory, BPF maps at
/// defaults. The tracer is stopped as soon as it is ready.
pub(super) fn start_run(ctx: &Ctx, v: &Variant, rep: u32) -> Result<Run> {
    let mut run = Run::new("start", v, rep);
    let t = ctx.tracer(v)?.context("a start-up run needs a tracer")?;
    let cpu0 = sys::cpu_seconds(t.pid);
    finish_tracer(&mut run, t, cpu0)?;
    Ok(run)
}

pub(super) fn scale_run(ctx: &Ctx, v: &Variant, rep: u32, n: u64) -> Result<Run> {
    let mut run = Run::new(&format!("scale{}k", n / 1000), v, rep);
    let args = vec![
        [
            "hold",
            "--connections",
            &n.to_string(),
            "--churn-secs",
            &ctx.plan.scale_churn_secs.to_string(),
            "--comm",
            HOLD_COMM,
        ]
        .map(String::from)
        .to_vec(),
    ];
    let mut load = Load::start(&ctx.loadgen, &args, Duration::from_secs(60))?;
    let tracer = ctx.tracer(v)?;
    let cpu0 = tracer.as_ref().and_then(|t| sys::cpu_seconds(t.pid));
    load.go()?;
    let reports: Vec<HoldReport> = load.reports(Duration::from_secs(300))?;
    let r = reports.first().context("hold sent no report")?.clone();
    run.set("open_rate_per_s", r.open_rate_per_s);
    run.set("connections", r.connections as f64);
    run.set("established", r.established as f64);
    run.set("churned", r.churned as f64);
    run.set("holder_rss_mib", r.rss_kib as f64 / MIB);
    if r.established != 2 * n {
        run.notes.push(format!(
            "expected {} established sockets in the holder's namespace, saw {}",
            2 * n,
            r.established
        ));
    }
    if let Some(t) = tracer {
        // A second tracer started now sees every socket already open: how long its start-up
        // (and its census of existing sockets) takes, and what that costs in memory. Several
        // starts at the largest size, one at the others; each start is kept in the detail so
        // that the targets can pool them over repetitions.
        let kind = t.kind.clone();
        let largest = ctx.plan.scale_sizes.iter().copied().max() == Some(n);
        let starts = if largest {
            ctx.plan.census_starts.max(1)
        } else {
            1
        };
        let mut samples = Vec::new();
        for _ in 0..starts {
            let census = Tracer::start(kind.clone(), &ctx.portexhaust, ctx.ready_timeout)?;
            let ready_ms = census.ready_after.as_secs_f64() * 1e3;
            let rss = sys::memory(census.pid).map(|m| m.rss_kib as f64 / MIB);
            // The tracer takes its census before it handles the signal, so the peak RSS
            // covers it.
            let stopped = census.stop()?;
            let peak = stopped.exit.maxrss_kib as f64 / MIB;
            let summary: Option<Value> = serde_json::from_str(&stopped.out.last_line).ok();
            samples.push(CensusStart {
                ready_ms,
                census_done_ms: stopped.census_after.map(|d| d.as_secs_f64() * 1e3),
                rss_mib: rss,
                peak_rss_mib: peak,
                tracked_sockets: summary.as_ref().and_then(tracked_sockets),
                exit_code: stopped.exit.code,
            });
        }
        let ready: Vec<f64> = samples.iter().map(|c| c.ready_ms).collect();
        let peak: Vec<f64> = samples.iter().map(|c| c.peak_rss_mib).collect();
        if let Some(s) = stats::spread(&ready) {
            run.set("census_ready_ms", s.median);
        }
        if let Some(s) = stats::spread(&peak) {
            run.set("census_peak_rss_mib", s.max);
        }
        let done: Vec<f64> = samples.iter().filter_map(|c| c.census_done_ms).collect();
        if let Some(s) = stats::spread(&done) {
            run.set("census_done_ms", s.median);
        }
        if let Some(r) = samples.iter().filter_map(|c| c.rss_mib).reduce(f64::max) {
            run.set("census_rss_mib", r);
        }
        if let Some(t) = samples.iter().filter_map(|c| c.tracked_sockets).max() {
            run.set("census_tracked_sockets", t as f64);
        }
        for c in &samples {
            if c.exit_code != Some(0) {
                run.notes.push(format!(
                    "a tracer started with the connections open exited with {:?}",
                    c.exit_code
                ));
            }
        }
        run.detail["census_starts"] = serde_json::to_value(&samples)?;
        // Released, the holders close every connection client side first: the N TIME_WAIT
        // sockets they leave are what the tracer must remember (the kernel names no owner for
        // them; live sockets are named by their files). Their TIME_WAIT lasts 60 s, long after
        // the tracer is stopped.
        let pids = load.pids.clone();
        load.finish(Duration::from_secs(120))?;
        std::thread::sleep(Duration::from_secs(2));
        let (kind, stopped) = finish_tracer(&mut run, t, cpu0)?;
        let rep = reported(&kind, &stopped, &pids, HOLD_COMM);
        match rep.summary.as_ref().and_then(tracked_sockets) {
            Some(x) => run.set("tracked_sockets", x as f64),
            None => run
                .notes
                .push("ownership tracking not yet in this build (no tracked-socket count)".into()),
        }
        run.detail["loads"] = serde_json::to_value(&reports)?;
        return Ok(run);
    }
    run.detail["loads"] = serde_json::to_value(&reports)?;
    load.finish(Duration::from_secs(120))?;
    Ok(run)
}

/// One storm with BPF run-time statistics on (not timed with the others: the statistics cost
/// two clock reads per program run): how much BPF time each failure costs, and in which program.
pub(super) fn profile_run(ctx: &Ctx, v: &Variant, failures: u64) -> Result<Run> {
    let mut run = Run::new("profile", v, 0);
    let args = vec![
        [
            "storm",
            "--failures",
            &failures.to_string(),
            "--ports",
            &ctx.plan.storm_ports.to_string(),
            "--comm",
            STORM_COMM,
        ]
        .map(String::from)
        .to_vec(),
    ];
    let mut load = Load::start(&ctx.loadgen, &args, Duration::from_secs(60))?;
    let stats = sys::enable_bpf_stats()
        .context("enabling BPF run-time statistics (BPF_ENABLE_STATS, 5.8+)")?;
    let tracer = ctx.tracer(v)?.context("profiling needs a tracer")?;
    let before = sys::prog_stats(tracer.pid);
    load.go()?;
    let reports: Vec<StormReport> = load.reports(Duration::from_secs(200))?;
    let after = sys::prog_stats(tracer.pid);
    drop(stats);
    let names = sys::prog_names();
    let client = reports.iter().map(|r| r.failures).sum::<u64>().max(1) as f64;
    let (mut ns, mut runs) = (0u64, 0u64);
    let mut progs: Vec<(f64, Value)> = Vec::new();
    for (id, a) in &after {
        let b = before.get(id).copied().unwrap_or(sys::ProgStat {
            prog_id: *id,
            run_cnt: 0,
            run_time_ns: 0,
        });
        let (cnt, t) = (
            a.run_cnt.saturating_sub(b.run_cnt),
            a.run_time_ns.saturating_sub(b.run_time_ns),
        );
        ns += t;
        runs += cnt;
        if cnt > 0 {
            progs.push((
                t as f64 / client,
                serde_json::json!({
                    "program": names.get(id).cloned().unwrap_or_else(|| format!("id {id}")),
                    "runs_per_failure": cnt as f64 / client,
                    "ns_per_run": t as f64 / cnt as f64,
                    "ns_per_failure": t as f64 / client,
                }),
            ));
        }
    }
    progs.sort_by(|a, b| b.0.total_cmp(&a.0));
    run.set("bpf_ns_per_failure", ns as f64 / client);
    run.set("bpf_runs_per_failure", runs as f64 / client);
    run.detail["programs"] = Value::Array(progs.into_iter().map(|(_, v)| v).collect());
    run.detail["loads"] = serde_json::to_value(&reports)?;
    tracer.stop()?;
    load.finish(Duration::from_secs(30))?;
    Ok(run)
}
