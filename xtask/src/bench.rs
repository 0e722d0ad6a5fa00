//! `cargo xtask bench`: what portexhaust costs and how exactly it counts, side by side with the
//! untraced kernel and the bpftrace one-liner users reach for today.
//!
//! Every load runs in private network namespaces (`pxh-loadgen`, the `loadgen/` crate) with a
//! paused start, so that tracers are attached before the measured part and their start-up is
//! timed separately. Variants (untraced, portexhaust with each backend this kernel runs,
//! bpftrace) run interleaved, in a rotated order each repetition, so that whatever else the
//! machine is doing spreads over all of them; results are medians with min-max spreads.
mod guest;
mod measure;
mod offer;
mod plan;
mod procs;
mod report;
mod results;
mod scenarios;
mod schedule;
mod stats;
mod sys;
mod variants;
mod vm;

use std::{
    path::{Path, PathBuf},
    process::Command,
    time::Instant,
};

use anyhow::{Context as _, Result, bail};
use serde::Serialize;
use serde_json::Value;

use crate::setup::{is_root, workspace_root};
use offer::discover;
use plan::Plan;
use results::{Results, VmResults};
use scenarios::{Ctx, READY_TIMEOUT};
use schedule::run_plan;
use variants::{Sets, Variant};

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
    vm: Option<VmResults>,
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
            Some(p) => Some(read_json::<VmResults>(&p)?),
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
        (None, Some(read_json::<VmResults>(json)?))
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
        crate::setup::build_tools()?;
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
            ctx.say("bpftrace is not installed: `cargo xtask setup --tests` installs it");
            Some("bpftrace is not installed (`cargo xtask setup --tests` installs it)".to_string())
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
