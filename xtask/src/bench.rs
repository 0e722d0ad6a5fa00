//! `cargo xtask bench`: what portexhaust costs and how exactly it counts, side by side with the
//! untraced kernel and the bpftrace one-liner users reach for today.
//!
//! Every load runs in private network namespaces (`pxh-loadgen`, the `loadgen/` crate) with a
//! paused start, so that tracers are attached before the measured part and their start-up is
//! timed separately. Variants (untraced, portexhaust with each backend this kernel runs,
//! bpftrace) run interleaved, in a rotated order each repetition, so that whatever else the
//! machine is doing spreads over all of them; results are medians with min-max spreads.
mod guest;
mod procs;
mod report;
mod stats;
mod sys;
mod vm;

use std::{
    collections::BTreeMap,
    path::{Path, PathBuf},
    process::Command,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::setup::{is_root, run_checked, setup, workspace_root};
use procs::{Flavor, Load, Stopped, Tracer, TracerKind, parse_bpftrace_counts};

pub use guest::{GuestArgs, bench_guest};

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, clap::ValueEnum)]
pub enum ScenarioArg {
    /// Successful connect/close churn on loopback.
    Churn,
    /// Failure storm, one process.
    Storm,
    /// Failure storm, two processes at once.
    Storm2,
    /// Ownership tracking at scale: 10k and 100k held connections.
    Scale,
    /// One storm per tracer with BPF run-time statistics on: BPF time per failure, by program.
    Profile,
    /// Tracer start-up alone, many times over (median of 15 starts in a full run): time to
    /// ready, peak RSS and BPF map memory at defaults.
    Start,
}

#[derive(clap::Args, Debug)]
pub struct BenchArgs {
    /// Short run (fewer repetitions, smaller counts; under 3 minutes) that still runs every
    /// scenario. Writes to target/bench-quick/ unless --out-dir is given.
    #[arg(long)]
    pub quick: bool,
    /// Repetitions of each scenario and variant (default: 5, quick: 2).
    #[arg(long, value_parser = clap::value_parser!(u32).range(1..=50))]
    pub reps: Option<u32>,
    /// Only these scenarios (repeatable; default: all).
    #[arg(long, value_enum)]
    pub only: Vec<ScenarioArg>,
    /// Where BENCHMARKS.md and results.json go (default: the workspace root and bench/ for a
    /// full run, target/bench-quick/ for --quick).
    #[arg(long, value_name = "DIR")]
    pub out_dir: Option<PathBuf>,
    /// Use the release binaries already built instead of building them first.
    #[arg(long)]
    pub no_build: bool,
    /// Measure nothing: render BENCHMARKS.md again from an earlier results.json or
    /// vm-results.json (for example after editing bench/analysis.md); the other file of the
    /// pair is read too when it sits in the same folder.
    #[arg(long, value_name = "RESULTS_JSON")]
    pub render: Option<PathBuf>,
    /// Benchmark inside these Debian kernels under QEMU instead of on this machine
    /// (comma-separated: 5.10, 6.1, 6.12, all): untraced vs every backend that loads there
    /// (and bpftrace), the churn and one-process storm only, sized for software emulation.
    /// Writes bench/vm-results.json (target/bench-quick/ with --quick) and re-renders
    /// BENCHMARKS.md. Needs no KVM.
    #[arg(long, value_delimiter = ',', value_name = "KERNELS",
          value_parser = ["5.10", "6.1", "6.12", "all"])]
    pub vm: Vec<String>,
    /// --vm: where the kernels are cached (as `cargo xtask vmtest` keeps them); only read
    /// when the kernel is already there [default: target/vmtest-cache].
    #[arg(long, value_name = "DIR", requires = "vm")]
    pub cache_dir: Option<PathBuf>,
    /// --vm: never touch the network (use only kernels already in the cache).
    #[arg(long, requires = "vm")]
    pub offline: bool,
    /// --vm: kill a guest that has not finished after this many seconds.
    #[arg(long, default_value_t = 900, value_name = "SECS", requires = "vm")]
    pub vm_timeout_secs: u64,
    /// --vm: guest memory in MiB (the initramfs holds bpftrace and its ~200 MB of libraries).
    #[arg(long, default_value_t = 1536, value_name = "MIB", requires = "vm")]
    pub vm_memory_mb: u32,
    /// --vm: keep each guest's initramfs next to its logs.
    #[arg(long, requires = "vm")]
    pub keep: bool,
    /// --vm: also run this shell command in each guest before the bench, as root (repeatable;
    /// for digging into a result: pxh-loadgen, portexhaust and bpftrace are on its PATH). Its
    /// output lands in target/vmbench/KERNEL/guest/exec.NN.out.
    #[arg(long, value_name = "CMD", requires = "vm")]
    pub vm_exec: Vec<String>,
}

/// Sizes of one run. Chosen so that the full run fits in about 15 minutes on 2 cores.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Plan {
    pub mode: String,
    pub reps: u32,
    pub churn_secs: f64,
    /// Failing connects of the one-process storm.
    pub storm_failures: u64,
    /// Failing connects of each process of the two-process storm.
    pub storm2_failures_each: u64,
    /// Ports in each storm namespace's range (all held during the storm).
    pub storm_ports: u16,
    pub scale_sizes: Vec<u64>,
    pub scale_reps: u32,
    pub scale_churn_secs: f64,
    /// Failing connects of the storm run once per tracer with BPF run-time statistics on.
    pub profile_failures: u64,
    /// Starts of each tracer in the start-up scenario (the ready target is a median of 15).
    #[serde(default)]
    pub ready_starts: u32,
    /// Starts of a second tracer with the largest scale's connections already open, per
    /// scale run (pooled over the scale repetitions).
    #[serde(default)]
    pub census_starts: u32,
}

impl Plan {
    fn new(quick: bool, reps: Option<u32>) -> Self {
        if quick {
            Self {
                mode: "quick".into(),
                reps: reps.unwrap_or(2),
                churn_secs: 2.0,
                storm_failures: 200_000,
                storm2_failures_each: 100_000,
                storm_ports: 10,
                scale_sizes: vec![10_000, 100_000],
                scale_reps: 1,
                scale_churn_secs: 0.5,
                profile_failures: 100_000,
                ready_starts: 5,
                census_starts: 3,
            }
        } else {
            Self {
                mode: "full".into(),
                reps: reps.unwrap_or(5),
                churn_secs: 5.0,
                storm_failures: 1_000_000,
                storm2_failures_each: 500_000,
                storm_ports: 10,
                scale_sizes: vec![10_000, 100_000],
                scale_reps: 2,
                scale_churn_secs: 2.0,
                profile_failures: 300_000,
                ready_starts: 15,
                census_starts: 8,
            }
        }
    }

    /// Sizes for a guest under software emulation with instruction-counted time (see
    /// bench/vm.rs; a busy guest second takes 5-10 real seconds here): the churn and the
    /// one-process storm only, each measured part a fraction of a guest second (a churn run
    /// of 1 guest second took 20 s with the tracer's start and stop), so that one kernel's
    /// whole bench takes about 5 minutes. Run-to-run noise is about 1% in such a guest, so
    /// small runs suffice.
    pub fn vm(quick: bool, reps: Option<u32>) -> Self {
        Self {
            mode: if quick { "vm-quick" } else { "vm" }.into(),
            reps: reps.unwrap_or(if quick { 1 } else { 3 }),
            churn_secs: if quick { 0.2 } else { 0.3 },
            storm_failures: if quick { 3_000 } else { 10_000 },
            storm2_failures_each: 0,
            storm_ports: 10,
            scale_sizes: Vec::new(),
            scale_reps: 0,
            scale_churn_secs: 0.0,
            profile_failures: 0,
            ready_starts: 0,
            census_starts: 0,
        }
    }
}

const STORM_COMM: &str = "pxhb-storm";
const CHURN_COMM: &str = "pxhb-churn";
const HOLD_COMM: &str = "pxhb-hold";
const READY_TIMEOUT: Duration = Duration::from_secs(30);
/// Under software emulation a tracer (bpftrace above all: LLVM) takes many seconds to start.
const GUEST_READY_TIMEOUT: Duration = Duration::from_secs(180);

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Variant {
    Untraced,
    Traced(TracerKind),
}

impl Variant {
    pub fn name(&self) -> String {
        match self {
            Self::Untraced => "untraced".into(),
            Self::Traced(TracerKind::Portexhaust { backend, flavor }) => {
                format!("{}/{backend}", flavor.prefix())
            }
            Self::Traced(TracerKind::Bpftrace) => "bpftrace".into(),
        }
    }

    fn portexhaust(backend: &str, flavor: Flavor) -> Self {
        Self::Traced(TracerKind::Portexhaust {
            backend: backend.to_string(),
            flavor,
        })
    }
}

/// One measured run of one scenario under one variant.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Run {
    pub scenario: String,
    pub variant: String,
    pub rep: u32,
    pub metrics: BTreeMap<String, f64>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub notes: Vec<String>,
    /// Anything else worth keeping (BPF maps of the tracer, the loads' own reports).
    #[serde(default)]
    pub detail: Value,
}

impl Run {
    fn new(scenario: &str, v: &Variant, rep: u32) -> Self {
        Self {
            scenario: scenario.into(),
            variant: v.name(),
            rep,
            metrics: BTreeMap::new(),
            notes: Vec::new(),
            detail: Value::Null,
        }
    }
    fn set(&mut self, k: &str, v: f64) {
        self.metrics.insert(k.into(), v);
    }
}

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

struct Ctx {
    portexhaust: PathBuf,
    loadgen: PathBuf,
    plan: Plan,
    ready_timeout: Duration,
    /// Inside a guest: progress also goes here (the results serial port) as
    /// `@@PXH-LOG ...@@` lines, so that the host can show it live.
    log: Option<PathBuf>,
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

    fn say(&self, msg: &str) {
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

/// What a tracer looked like at the end of the load, before it was stopped.
struct Sample {
    cpu_at_ready: Option<(f64, f64)>,
    memory: Option<sys::Memory>,
    bpf: sys::BpfObjects,
}

const MIB: f64 = 1024.0;

/// Sample a tracer at the end of the load, stop it, and record what every traced run has:
/// start-up time, CPU while loaded, memory, BPF maps.
fn finish_tracer(
    run: &mut Run,
    t: Tracer,
    cpu_at_ready: Option<(f64, f64)>,
) -> Result<(TracerKind, Stopped)> {
    let s = Sample {
        cpu_at_ready,
        memory: sys::memory(t.pid),
        bpf: sys::bpf_objects(t.pid),
    };
    let (kind, ready_after, attaching_after) = (t.kind.clone(), t.ready_after, t.attaching_after);
    let stopped = t.stop()?;
    run.set("ready_ms", ready_after.as_secs_f64() * 1e3);
    if let Some(a) = attaching_after {
        run.set("attaching_ms", a.as_secs_f64() * 1e3);
    }
    if let Some((u0, s0)) = s.cpu_at_ready {
        let user = (stopped.exit.user_s - u0).max(0.0);
        let sys = (stopped.exit.sys_s - s0).max(0.0);
        run.set("tracer_user_s", user);
        run.set("tracer_sys_s", sys);
        run.set("tracer_cpu_s", user + sys);
    }
    if let Some(m) = s.memory {
        run.set("tracer_rss_mib", m.rss_kib as f64 / MIB);
    }
    run.set("tracer_peak_rss_mib", stopped.exit.maxrss_kib as f64 / MIB);
    run.set("map_memlock_mib", s.bpf.memlock_kib() / MIB);
    run.set("bpf_maps", s.bpf.maps.len() as f64);
    run.set("bpf_programs", f64::from(s.bpf.programs));
    if stopped.exit.code != Some(0) {
        run.notes.push(format!(
            "tracer exited with code {:?} (signal {:?}): {}",
            stopped.exit.code,
            stopped.exit.signal,
            stopped.stderr.lines().last().unwrap_or("")
        ));
    }
    run.detail["bpf_maps"] = serde_json::to_value(&s.bpf.maps).unwrap_or(Value::Null);
    Ok((kind, stopped))
}

/// Failures a tracer attributed to the given pids (portexhaust) or comm (bpftrace).
struct Reported {
    count: Option<u64>,
    streamed: Option<u64>,
    dropped: Option<u64>,
    summary: Option<Value>,
}

fn reported(kind: &TracerKind, stopped: &Stopped, pids: &[u32], comm: &str) -> Reported {
    match kind {
        TracerKind::Portexhaust { .. } => {
            let summary: Option<Value> = serde_json::from_str(&stopped.out.last_line)
                .ok()
                .filter(|v: &Value| v["type"] == "summary");
            let count = summary.as_ref().map(|s| offender_failures(s, pids));
            Reported {
                count,
                // Every line but the summary is one failure event.
                streamed: summary
                    .as_ref()
                    .map(|_| stopped.out.newlines.saturating_sub(1)),
                dropped: summary.as_ref().and_then(|s| s["dropped_events"].as_u64()),
                summary,
            }
        }
        TracerKind::Bpftrace => Reported {
            count: Some(
                parse_bpftrace_counts(&stopped.out.text)
                    .get(comm)
                    .copied()
                    .unwrap_or(0),
            ),
            streamed: None,
            dropped: None,
            summary: None,
        },
    }
}

/// Failures a portexhaust summary attributes to any of `pids`.
pub fn offender_failures(summary: &Value, pids: &[u32]) -> u64 {
    summary["offenders"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|o| {
            o["pid"]
                .as_u64()
                .is_some_and(|p| pids.contains(&(p as u32)))
        })
        .filter_map(|o| o["failures"].as_u64())
        .sum()
}

/// Sockets the tracer says it tracks, if this build reports it (issue 4). Looked for where the
/// ownership work is expected to put it; None means "not reported".
pub fn tracked_sockets(summary: &Value) -> Option<u64> {
    summary["tracked_sockets"]
        .as_u64()
        .or_else(|| summary["ownership"]["tracked_sockets"].as_u64())
        .or_else(|| summary["ownership"]["tracked"].as_u64())
}

fn storm_run(ctx: &Ctx, v: &Variant, rep: u32, procs: u32, each: u64) -> Result<Run> {
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

fn churn_run(ctx: &Ctx, v: &Variant, rep: u32) -> Result<Run> {
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
fn start_run(ctx: &Ctx, v: &Variant, rep: u32) -> Result<Run> {
    let mut run = Run::new("start", v, rep);
    let t = ctx.tracer(v)?.context("a start-up run needs a tracer")?;
    let cpu0 = sys::cpu_seconds(t.pid);
    finish_tracer(&mut run, t, cpu0)?;
    Ok(run)
}

fn scale_run(ctx: &Ctx, v: &Variant, rep: u32, n: u64) -> Result<Run> {
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
fn profile_run(ctx: &Ctx, v: &Variant, failures: u64) -> Result<Run> {
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

// ---------------------------------------------------------------------------------------------
// What the binary offers.

/// `portexhaust trace --help`, or an empty text if it cannot be run.
fn trace_help(portexhaust: &Path) -> String {
    Command::new(portexhaust)
        .args(["trace", "--help"])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
        .unwrap_or_default()
}

/// The values `--backend` takes, as clap lists them in `trace --help`, without `auto`: either
/// `[possible values: a, b]` or a `Possible values:` list of `- a: ...` lines under the option.
pub fn parse_backend_values(help: &str) -> Vec<String> {
    let mut lines = help.lines().skip_while(|l| !l.contains("--backend"));
    let mut out: Vec<String> = Vec::new();
    let mut first = true;
    for line in lines.by_ref() {
        let t = line.trim();
        // The next option ends this one's text.
        if !first && (t.starts_with("--") || (t.starts_with('-') && t.chars().nth(2) == Some(',')))
        {
            break;
        }
        first = false;
        if let Some(rest) = t.split_once("[possible values:").map(|(_, r)| r) {
            let list = rest.split(']').next().unwrap_or("");
            out.extend(list.split(',').map(|v| v.trim().to_string()));
        } else if let Some(item) = t.strip_prefix("- ") {
            let name = item.split([':', ' ']).next().unwrap_or("").trim();
            out.push(name.to_string());
        }
    }
    let mut seen = std::collections::BTreeSet::new();
    out.into_iter()
        .filter(|v| !v.is_empty() && v != "auto" && seen.insert(v.clone()))
        .collect()
}

/// Whether this build's `trace` offers `--catch` (bind/UDP coverage on demand).
pub fn offers_catch(help: &str) -> bool {
    help.contains("--catch")
}

/// The reason a failed `portexhaust` command gives: its last non-empty stderr line.
fn last_error_line(stderr: &[u8]) -> String {
    String::from_utf8_lossy(stderr)
        .lines()
        .rev()
        .find(|l| !l.trim().is_empty())
        .unwrap_or("no output")
        .trim_start_matches("portexhaust: error: ")
        .to_string()
}

/// Which of `names` this kernel runs: each is started for a moment; (ran, skipped with reason).
fn detect_backends(portexhaust: &Path, names: &[String]) -> (Vec<String>, Vec<(String, String)>) {
    let mut ran = Vec::new();
    let mut skipped = Vec::new();
    for b in names {
        let out = Command::new(portexhaust)
            .args(["trace", "--json", "--backend", b, "--duration", "0.2"])
            .output();
        match out {
            Ok(o)
                if o.status.success() && String::from_utf8_lossy(&o.stderr).contains("ready:") =>
            {
                ran.push(b.to_string())
            }
            Ok(o) => skipped.push((b.to_string(), last_error_line(&o.stderr))),
            Err(e) => skipped.push((b.to_string(), format!("could not start: {e}"))),
        }
    }
    (ran, skipped)
}

/// The backend a plain `trace` (no --backend) picks here, from its ready line: "... with the
/// X backend".
fn default_backend(portexhaust: &Path) -> Option<String> {
    let o = Command::new(portexhaust)
        .args(["trace", "--json", "--duration", "0.2"])
        .output()
        .ok()?;
    parse_ready_backend(&String::from_utf8_lossy(&o.stderr))
}

pub fn parse_ready_backend(stderr: &str) -> Option<String> {
    let line = stderr.lines().find(|l| l.contains("ready:"))?;
    let (_, rest) = line.split_once("with the ")?;
    let name = rest.split_whitespace().next()?;
    rest.split_whitespace()
        .nth(1)
        .is_some_and(|w| w.starts_with("backend"))
        .then(|| name.to_string())
}

/// What this machine (or guest) runs, found out by asking the binary.
struct Offer {
    backends_ran: Vec<String>,
    backends_skipped: Vec<(String, String)>,
    default_backend: Option<String>,
    catch: bool,
}

fn discover(portexhaust: &Path) -> Result<Offer> {
    let help = trace_help(portexhaust);
    let names = parse_backend_values(&help);
    if names.is_empty() {
        bail!(
            "`{} trace --help` lists no --backend values (cannot tell which backends to measure)",
            portexhaust.display()
        );
    }
    let (backends_ran, backends_skipped) = detect_backends(portexhaust, &names);
    Ok(Offer {
        default_backend: default_backend(portexhaust),
        catch: offers_catch(&help),
        backends_ran,
        backends_skipped,
    })
}

fn command_line(cmd: &str, args: &[&str]) -> Option<String> {
    let o = Command::new(cmd).args(args).output().ok()?;
    o.status
        .success()
        .then(|| String::from_utf8_lossy(&o.stdout).trim().to_string())
}

fn git_revision(root: &Path) -> String {
    let rev = command_line(
        "git",
        &[
            "-C",
            &root.to_string_lossy(),
            "rev-parse",
            "--short",
            "HEAD",
        ],
    )
    .unwrap_or_else(|| "unknown".into());
    let dirty = command_line(
        "git",
        // Untracked files (this run's own outputs among them) do not change what was measured.
        &[
            "-C",
            &root.to_string_lossy(),
            "status",
            "--porcelain",
            "--untracked-files=no",
        ],
    )
    .is_some_and(|s| !s.is_empty());
    if dirty { format!("{rev}+dirty") } else { rev }
}

fn now_rfc3339() -> String {
    time::OffsetDateTime::now_utc()
        .format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_else(|_| "unknown".into())
}

/// Everything a run produced: the JSON file, and what the markdown is rendered from. A guest
/// of `--vm` writes one of these too (one per kernel, inside vm-results.json).
#[derive(Debug, Serialize, Deserialize)]
pub struct Results {
    pub schema: u32,
    pub date: String,
    pub machine: sys::Machine,
    pub git: String,
    pub bpftrace: Option<String>,
    /// Why bpftrace was not measured, when it was not.
    #[serde(default)]
    pub bpftrace_skipped: Option<String>,
    pub plan: Plan,
    pub backends_ran: Vec<String>,
    pub backends_skipped: Vec<(String, String)>,
    /// The backend a plain `trace` picks on this kernel (the targets are about it).
    #[serde(default)]
    pub default_backend: Option<String>,
    /// Whether the binary offers `trace --catch` (then `catch/B` variants ran).
    #[serde(default)]
    pub catch_offered: bool,
    pub variants: Vec<String>,
    pub loadavg_start: [f64; 3],
    pub loadavg_end: [f64; 3],
    pub elapsed_s: f64,
    pub summary: Vec<report::Row>,
    pub targets: Vec<report::Target>,
    pub failed_runs: Vec<String>,
    pub runs: Vec<Run>,
}

impl Results {
    /// Summaries and verdicts again from the runs, so that a change in how they are computed
    /// applies to earlier measurements too.
    fn recompute(&mut self) {
        self.summary = report::summarise(&self.runs);
        self.targets = report::targets(
            &self.summary,
            &self.runs,
            &self.variants,
            self.default_backend.as_deref(),
        );
    }
}

fn rotated<T: Clone>(v: &[T], by: usize) -> Vec<T> {
    let mut v = v.to_vec();
    if !v.is_empty() {
        let n = by % v.len();
        v.rotate_left(n);
    }
    v
}

/// The variants each scenario runs.
struct Sets {
    /// Churn and the two-process storm.
    main: Vec<Variant>,
    /// The one-process storm: `main` and the hooks-only diagnostics.
    storm: Vec<Variant>,
    /// Ownership tracking at scale: portexhaust only (bpftrace has none).
    scale: Vec<Variant>,
}

impl Sets {
    fn new(offer: &Offer, bpftrace: bool, diagnostics: bool) -> Self {
        let b = &offer.backends_ran;
        let mut main = vec![Variant::Untraced];
        main.extend(b.iter().map(|b| Variant::portexhaust(b, Flavor::Default)));
        if diagnostics {
            // The same tracer with `--no-blame`: failures only, what the blame machinery costs.
            main.extend(b.iter().map(|b| Variant::portexhaust(b, Flavor::NoBlame)));
        }
        if offer.catch {
            main.extend(b.iter().map(|b| Variant::portexhaust(b, Flavor::Catch)));
        }
        if bpftrace {
            main.push(Variant::Traced(TracerKind::Bpftrace));
        }
        let mut storm = main.clone();
        if diagnostics {
            // Every program attached, nothing reported.
            storm.extend(b.iter().map(|b| Variant::portexhaust(b, Flavor::HooksOnly)));
        }
        let scale = main
            .iter()
            .filter(|v| !matches!(v, Variant::Traced(TracerKind::Bpftrace)))
            .cloned()
            .collect();
        Self { main, storm, scale }
    }
}

/// Every scenario of the plan that `wanted` lets through, interleaved in rotating order.
/// Scenarios whose size in the plan is zero are skipped (a guest's plan has only two).
fn run_plan(
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

/// Where a run's files go: (BENCHMARKS.md, the JSON file).
fn out_paths(args: &BenchArgs, file: &str) -> (PathBuf, PathBuf) {
    let root = workspace_root();
    match (&args.out_dir, args.quick) {
        (Some(d), _) => (d.join("BENCHMARKS.md"), d.join(file)),
        (None, true) => {
            let d = root.join("target/bench-quick");
            (d.join("BENCHMARKS.md"), d.join(file))
        }
        (None, false) => (root.join("BENCHMARKS.md"), root.join("bench").join(file)),
    }
}

const RESULTS_FILE: &str = "results.json";
const VM_RESULTS_FILE: &str = "vm-results.json";

fn read_json<T: serde::de::DeserializeOwned>(path: &Path) -> Result<T> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    serde_json::from_str(&text)
        .with_context(|| format!("{} is not a results file of this version", path.display()))
}

fn write_json<T: Serialize>(path: &Path, value: &T) -> Result<()> {
    if let Some(d) = path.parent() {
        std::fs::create_dir_all(d).with_context(|| format!("creating {}", d.display()))?;
    }
    std::fs::write(path, serde_json::to_string_pretty(value)? + "\n")
        .with_context(|| format!("writing {}", path.display()))
}

/// Write BENCHMARKS.md from whichever of results.json and vm-results.json there are in
/// `dir` (with `host` / `vm` taking their place when given).
fn render_markdown(
    out_md: &Path,
    dir: &Path,
    host: Option<Results>,
    vm: Option<vm::VmResults>,
) -> Result<()> {
    let sibling = |name: &str| Some(dir.join(name)).filter(|p| p.is_file());
    let host = match host {
        Some(h) => Some(h),
        None => match sibling(RESULTS_FILE) {
            Some(p) => Some(read_json::<Results>(&p)?),
            None => None,
        },
    };
    let vm = match vm {
        Some(v) => Some(v),
        None => match sibling(VM_RESULTS_FILE) {
            Some(p) => Some(read_json::<vm::VmResults>(&p)?),
            None => None,
        },
    };
    let mut host = host;
    if let Some(h) = host.as_mut() {
        h.recompute();
    }
    let mut vm = vm;
    if let Some(v) = vm.as_mut() {
        v.recompute();
    }
    let analysis = std::fs::read_to_string(workspace_root().join("bench/analysis.md")).ok();
    let text = report::markdown(host.as_ref(), vm.as_ref(), analysis.as_deref());
    if let Some(d) = out_md.parent() {
        std::fs::create_dir_all(d).with_context(|| format!("creating {}", d.display()))?;
    }
    std::fs::write(out_md, text).with_context(|| format!("writing {}", out_md.display()))
}

/// `--render FILE`: either kind of results file; its partner in the same folder joins in.
fn render_only(args: &BenchArgs, json: &Path) -> Result<()> {
    let dir = json
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_else(|| PathBuf::from("."));
    let text =
        std::fs::read_to_string(json).with_context(|| format!("reading {}", json.display()))?;
    let value: Value =
        serde_json::from_str(&text).with_context(|| format!("{} is not JSON", json.display()))?;
    let (host, vm) = if value.get("kernels").is_some() {
        (None, Some(read_json::<vm::VmResults>(json)?))
    } else {
        (Some(read_json::<Results>(json)?), None)
    };
    let out = match &args.out_dir {
        Some(d) => d.join("BENCHMARKS.md"),
        None => workspace_root().join("BENCHMARKS.md"),
    };
    render_markdown(&out, &dir, host, vm)?;
    eprintln!(
        "xtask: bench: rendered {} from {}",
        out.display(),
        json.display()
    );
    Ok(())
}

/// Build the release binaries the bench runs (unless --no-build) and return their paths:
/// (portexhaust, pxh-loadgen).
fn binaries(args: &BenchArgs) -> Result<(PathBuf, PathBuf)> {
    let root = workspace_root();
    if !args.no_build {
        setup()?;
        eprintln!("xtask: building portexhaust and pxh-loadgen (release)");
        run_checked(Command::new("cargo").current_dir(&root).args([
            "build",
            "--release",
            "--package",
            "portexhaust",
            "--package",
            "pxh-loadgen",
        ]))?;
    }
    let bins = (
        root.join("target/release/portexhaust"),
        root.join("target/release/pxh-loadgen"),
    );
    for b in [&bins.0, &bins.1] {
        if !b.exists() {
            bail!("{} is missing: run without --no-build", b.display());
        }
    }
    Ok(bins)
}

pub fn bench(args: &BenchArgs) -> Result<()> {
    if let Some(json) = &args.render {
        return render_only(args, json);
    }
    if !args.vm.is_empty() {
        return vm::bench_vm(args);
    }
    let root = workspace_root();
    if !is_root() {
        bail!(
            "the benchmarks need root (they load eBPF programs and create network namespaces): \
             run `sudo -E cargo xtask bench`"
        );
    }
    let (portexhaust, loadgen) = binaries(args)?;
    let ctx = Ctx {
        portexhaust,
        loadgen,
        plan: Plan::new(args.quick, args.reps),
        ready_timeout: READY_TIMEOUT,
        log: None,
    };
    let (out_md, out_json) = out_paths(args, RESULTS_FILE);
    let wanted = |s: ScenarioArg| args.only.is_empty() || args.only.contains(&s);

    let started = Instant::now();
    let loadavg_start = sys::loadavg();
    let date = now_rfc3339();
    let offer = discover(&ctx.portexhaust)?;
    for (b, why) in &offer.backends_skipped {
        ctx.say(&format!("backend {b} skipped: {why}"));
    }
    if offer.backends_ran.is_empty() {
        bail!(
            "no portexhaust backend runs on this kernel: {:?}",
            offer.backends_skipped
        );
    }
    let bpftrace = command_line("bpftrace", &["--version"]);
    let bpftrace_skipped = match &bpftrace {
        Some(_) => None,
        None => {
            ctx.say("bpftrace is not installed: `cargo xtask setup` installs it");
            Some("bpftrace is not installed (`cargo xtask setup` installs it)".to_string())
        }
    };
    let sets = Sets::new(&offer, bpftrace.is_some(), true);
    let (runs, failed) = run_plan(&ctx, &sets, &wanted, started);

    let mut results = Results {
        schema: 2,
        date,
        machine: sys::machine(),
        git: git_revision(&root),
        bpftrace,
        bpftrace_skipped,
        plan: ctx.plan.clone(),
        backends_ran: offer.backends_ran,
        backends_skipped: offer.backends_skipped,
        default_backend: offer.default_backend,
        catch_offered: offer.catch,
        variants: sets.storm.iter().map(Variant::name).collect(),
        loadavg_start,
        loadavg_end: sys::loadavg(),
        elapsed_s: started.elapsed().as_secs_f64(),
        summary: Vec::new(),
        targets: Vec::new(),
        failed_runs: failed,
        runs,
    };
    results.recompute();
    write_json(&out_json, &results)?;
    println!("{}", report::targets_table(&results.targets));
    let (elapsed, failed_runs) = (results.elapsed_s, results.failed_runs.clone());
    let dir = out_json.parent().unwrap_or(Path::new(".")).to_path_buf();
    render_markdown(&out_md, &dir, Some(results), None)?;
    eprintln!(
        "xtask: bench: wrote {} and {} in {elapsed:.0} s",
        out_md.display(),
        out_json.display(),
    );
    if !failed_runs.is_empty() {
        bail!(
            "{} run(s) failed (listed in the results): {}",
            failed_runs.len(),
            failed_runs.join("; ")
        );
    }
    Ok(())
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

    #[test]
    fn offender_failures_counts_only_our_pids() {
        let s: Value = serde_json::from_str(
            r#"{"type":"summary","offenders":[{"pid":10,"failures":5},{"pid":11,"failures":7},{"pid":99,"failures":1}]}"#,
        )
        .expect("json");
        assert_eq!(offender_failures(&s, &[10, 11]), 12);
        assert_eq!(offender_failures(&s, &[12]), 0);
        assert_eq!(offender_failures(&Value::Null, &[10]), 0);
    }

    #[test]
    fn tracked_sockets_is_optional() {
        let none: Value = serde_json::from_str(r#"{"type":"summary"}"#).expect("json");
        assert_eq!(tracked_sockets(&none), None);
        let top: Value = serde_json::from_str(r#"{"tracked_sockets":100000}"#).expect("json");
        assert_eq!(tracked_sockets(&top), Some(100000));
        let nested: Value =
            serde_json::from_str(r#"{"ownership":{"tracked_sockets":42}}"#).expect("json");
        assert_eq!(tracked_sockets(&nested), Some(42));
    }

    #[test]
    fn backend_values_come_from_either_help_format() {
        let long = "Options:\n      --json\n          NDJSON\n\n      --backend <BACKEND>\n          Probe backend\n\n          Possible values:\n          - auto:       fentry, then kprobe\n          - fentry:     fentry/fexit on x\n          - tp-btf:     BTF raw tracepoint\n          - tracepoint: syscalls\n          \n          [default: auto]\n\n      --record <FILE>\n          - not: a value\n";
        assert_eq!(
            parse_backend_values(long),
            vec!["fentry", "tp-btf", "tracepoint"]
        );
        let short = "      --backend <BACKEND>  Probe backend [default: auto] [possible values: auto, fentry, kprobe, raw-tp]\n      --record <FILE>  x\n";
        assert_eq!(
            parse_backend_values(short),
            vec!["fentry", "kprobe", "raw-tp"]
        );
        assert!(parse_backend_values("--pid <PID>\n").is_empty());
        assert!(offers_catch("      --catch <WHAT>  bind,udp"));
        assert!(!offers_catch(short));
    }

    #[test]
    fn the_ready_line_names_the_backend() {
        let err = "portexhaust: ready: tracing port-exhaustion failures with the tracepoint backend for 0.2s\nportexhaust: census: 3 TCP sockets\n";
        assert_eq!(parse_ready_backend(err).as_deref(), Some("tracepoint"));
        assert_eq!(parse_ready_backend("portexhaust: error: x\n"), None);
    }

    #[test]
    fn plans_differ_in_size_only() {
        let q = Plan::new(true, None);
        let f = Plan::new(false, None);
        assert!(q.reps < f.reps && q.storm_failures < f.storm_failures);
        assert_eq!(q.scale_sizes, f.scale_sizes);
        assert_eq!(Plan::new(false, Some(9)).reps, 9);
        assert_eq!(f.ready_starts, 15);
        // A guest runs the churn and the one-process storm only.
        let vm = Plan::vm(false, None);
        assert!(vm.storm_failures > 0 && vm.churn_secs > 0.0);
        assert_eq!(
            (
                vm.storm2_failures_each,
                vm.profile_failures,
                vm.ready_starts
            ),
            (0, 0, 0)
        );
        assert!(vm.scale_sizes.is_empty());
    }
}
