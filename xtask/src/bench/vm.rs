//! `cargo xtask bench --vm KERNELS`: the benchmarks inside Debian's cloud kernels, where the
//! backends this machine's kernel refuses (fentry, kprobe) load.
//!
//! Each kernel boots once under QEMU with the vmtest machinery (`crate::vm`): an initramfs with
//! busybox, portexhaust, pxh-loadgen, this xtask binary as the guest's harness
//! (`pxh-xtask bench-guest`, see guest.rs) and, when this machine has it, Debian's bpftrace with
//! its libraries. In the guest every variant (untraced, each backend that loads, bpftrace) runs
//! the churn and the one-process storm, interleaved in rotating order with repetitions, so the
//! ratios compare runs on the same emulated machine. Absolute rates under TCG say nothing about
//! real hardware; ratios between variants of one guest do. The guest counts time in
//! instructions on one CPU (see QEMU_ARGS and SMP below for why).
use std::{
    path::{Path, PathBuf},
    process::Command,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};

use super::{
    BenchArgs, RESULTS_FILE, ScenarioArg, VM_RESULTS_FILE, binaries, git_revision,
    guest::{GUEST_BPFTRACE, GUEST_LOADGEN, GUEST_PORTEXHAUST, GUEST_XTASK, GuestPlan},
    now_rfc3339, out_paths,
    plan::Plan,
    read_json, render_markdown, report,
    results::{Results, VmKernel, VmResults},
    sys, write_json,
};
use crate::{
    setup::workspace_root,
    vm::{
        initramfs::{self, GuestConfig, Payload},
        kernels::{self, FetchOptions, Kernel, KernelSpec},
        protocol::{self, GuestReport},
        qemu::{self, BootConfig, Ended},
    },
    vmtest::{check_host_tools, find_in_path},
};

/// Guest time is counted in instructions, not read from the host's clock (`-icount`): one
/// guest nanosecond per instruction executed (shift=0), idle time skipped (sleep=off). Under
/// plain TCG the guest's clock is the host's, so every rate and CPU time inside the guest moves
/// with whatever else this shared 2-core machine is doing: consecutive identical churn runs
/// differed by up to 3x. With icount they agree within about 1%, whatever the host's load,
/// and the guest's rates become instruction counts per operation: a cost model without caches
/// or pipelines, so ratios between variants compare instructions executed, not cycles.
const QEMU_ARGS: &[&str] = &["-icount", "shift=0,sleep=off"];

/// One guest CPU. icount runs every vCPU in one host thread and advances the guest's clock
/// for all of them together, so a second vCPU would not add throughput, only blur the CPU
/// accounting (a process would be charged for the other vCPU's turns). With one CPU the
/// tracer's own user-space work competes with the load for it: the rates include the
/// tracer's whole cost, and the load's own CPU per operation isolates what the kernel-side
/// hooks cost it.
const SMP: u32 = 1;

/// Under TCG the guest kernel finds its CPUs' TSCs "unsynchronized" and falls back to the
/// HPET: every clock read (the TCP stack takes many per connection) is then an emulated MMIO
/// access under QEMU's global lock, which makes the guest several times slower and its timings
/// depend on whatever else QEMU is doing. Real machines run on the TSC (so does the 6.18
/// development VM: current_clocksource is tsc); so does the guest with this.
const KERNEL_ARGS: &str = "tsc=reliable";

impl VmResults {
    /// Medians again from the runs (targets are the host's: none are judged in a guest).
    pub fn recompute(&mut self) {
        for k in &mut self.kernels {
            if let Some(r) = k.results.as_mut() {
                r.summary = report::summarise(&r.runs);
                r.targets.clear();
            }
        }
    }
}

fn log(msg: impl AsRef<str>) {
    eprintln!("xtask: bench --vm: {}", msg.as_ref());
}

/// Debian's bpftrace as installed on this machine, for the image: (path, description), or why
/// there is none.
fn host_bpftrace() -> Result<(PathBuf, String), String> {
    let path = find_in_path("bpftrace").ok_or_else(|| {
        "bpftrace is not installed on the host (`cargo xtask setup --tests` installs Debian's package), \
         so the guest image has none"
            .to_string()
    })?;
    let path = path.canonicalize().unwrap_or(path);
    let pkg = Command::new("dpkg-query")
        .args(["-S", &path.to_string_lossy()])
        .output()
        .ok()
        .filter(|o| o.status.success())
        .and_then(|o| {
            let t = String::from_utf8_lossy(&o.stdout).into_owned();
            Some(t.split(':').next()?.trim().to_string())
        });
    let what = match pkg {
        Some(p) => {
            let version = Command::new("dpkg-query")
                .args(["-W", "-f", "${Version}", &p])
                .output()
                .ok()
                .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
                .unwrap_or_default();
            format!("Debian package {p} {version}, as installed on the host")
        }
        None => format!("{} (not from a Debian package)", path.display()),
    };
    Ok((path, what))
}

fn qemu_version() -> Option<String> {
    let o = Command::new("qemu-system-x86_64")
        .arg("--version")
        .output()
        .ok()?;
    String::from_utf8_lossy(&o.stdout)
        .lines()
        .next()
        .map(str::to_string)
}

fn selected(labels: &[String]) -> Vec<&'static KernelSpec> {
    kernels::KERNELS
        .iter()
        .filter(|k| labels.iter().any(|a| a == "all" || a == k.label))
        .collect()
}

/// The cached kernel if there is one (nothing is written to the cache then), else fetch it
/// (unless --offline).
fn kernel(spec: &KernelSpec, cache: &Path, offline: bool) -> Result<Kernel> {
    let say = |m: &str| log(format!("[{}] {m}", spec.label));
    let cached = kernels::fetch(
        spec,
        &FetchOptions {
            cache,
            archive: None,
            offline: true,
            refresh: false,
        },
        &say,
    );
    match cached {
        Ok(k) => Ok(k),
        Err(e) if offline => Err(e),
        Err(_) => {
            let archive = kernels::host_archive()?;
            kernels::fetch(
                spec,
                &FetchOptions {
                    cache,
                    archive: Some(&archive),
                    offline: false,
                    refresh: false,
                },
                &say,
            )
        }
    }
}

/// Everything one guest needs from the host.
struct Guest<'a> {
    busybox: &'a Path,
    portexhaust: &'a Path,
    programs: Vec<(PathBuf, String)>,
    plan: GuestPlan,
    memory_mb: u32,
    timeout: Duration,
    keep: bool,
    exec: Vec<String>,
}

fn run_kernel(spec: &KernelSpec, kernel: &Kernel, g: &Guest, run_dir: &Path) -> VmKernel {
    let mut row = VmKernel {
        label: spec.label.to_string(),
        suite: spec.suite.to_string(),
        date: now_rfc3339(),
        git: g.plan.git.clone(),
        package: Some(kernel.package.clone()),
        version: Some(kernel.version.clone()),
        release: Some(kernel.release.clone()),
        memory_mb: g.memory_mb,
        smp: SMP,
        initramfs_mib: None,
        boot_secs: None,
        run_secs: None,
        host_loadavg: [sys::loadavg(), [0.0; 3]],
        error: None,
        results: None,
    };
    if let Err(e) = boot_and_collect(spec, kernel, g, run_dir, &mut row) {
        let msg = format!("{e:#}");
        log(format!("[{}] error: {msg}", spec.label));
        row.error = Some(msg);
    }
    row.host_loadavg[1] = sys::loadavg();
    row
}

fn boot_and_collect(
    spec: &KernelSpec,
    kernel: &Kernel,
    g: &Guest,
    run_dir: &Path,
    row: &mut VmKernel,
) -> Result<()> {
    let label = spec.label;
    std::fs::create_dir_all(run_dir).with_context(|| format!("creating {}", run_dir.display()))?;
    let image = run_dir.join("initramfs.cpio");
    let plan_json = serde_json::to_string_pretty(&g.plan).context("serialising the plan")?;
    let size = initramfs::build(
        &Payload {
            busybox: g.busybox,
            portexhaust: Some(g.portexhaust),
            modules: &kernel.modules,
            programs: &g.programs,
        },
        &GuestConfig {
            kernel_label: label.to_string(),
            backends: Vec::new(),
            nat_hooks: Vec::new(),
            boot_only: false,
            step_timeout_secs: 60,
            trace_secs: 60,
            workload_ports: 10,
            workload_failures: 20,
            exec: g.exec.clone(),
            bench_plan: Some(plan_json),
            // The guest's own deadline comes first, so that it still sends what it has.
            bench_timeout_secs: g.timeout.as_secs().saturating_sub(60).max(60),
        },
        &image,
    )
    .context("building the initramfs")?;
    row.initramfs_mib = Some((size as f64 / 1048576.0 * 10.0).round() / 10.0);
    log(format!(
        "[{label}] booting {} under QEMU (TCG, {} CPU(s), {} MiB, initramfs {:.0} MiB, timeout {} s)",
        kernel.release,
        SMP,
        g.memory_mb,
        size as f64 / 1048576.0,
        g.timeout.as_secs()
    ));
    let mut booted_at = None;
    let outcome = qemu::boot(
        &BootConfig {
            vmlinuz: &kernel.vmlinuz,
            initramfs: &image,
            run_dir,
            memory_mb: g.memory_mb,
            smp: SMP,
            timeout: g.timeout,
            append: KERNEL_ARGS,
            qemu_args: QEMU_ARGS,
        },
        |line, at| {
            if line.contains("@@PXH-BOOTED") {
                booted_at = Some((at.as_secs_f64() * 10.0).round() / 10.0);
            }
            progress(label, line, at);
        },
    );
    if !g.keep {
        let _ = std::fs::remove_file(&image);
    }
    let outcome = outcome?;
    row.boot_secs = booted_at;
    row.run_secs = Some((outcome.elapsed.as_secs_f64() * 10.0).round() / 10.0);
    let report = protocol::parse(&outcome.results);
    if let Some(r) = &report.booted {
        row.release = Some(r.clone());
    }
    save_files(&report, run_dir);
    let step = report.step("bench", "run");
    let results = report
        .files
        .get("bench.json")
        .filter(|b| !b.is_empty())
        .map(|b| serde_json::from_slice::<Results>(b));
    match results {
        Some(Ok(r)) => row.results = Some(r),
        Some(Err(e)) => bail!("the guest's results do not parse: {e}"),
        None => {}
    }
    let harness_tail = || {
        let err = report.text("bench.err");
        err.lines()
            .rev()
            .find(|l| !l.trim().is_empty())
            .unwrap_or("(no output)")
            .to_string()
    };
    match (&outcome.ended, report.done, step) {
        (Ended::TimedOut, _, _) => bail!(
            "the guest did not finish within {} s and was killed{}",
            g.timeout.as_secs(),
            if row.results.is_some() {
                " (its results arrived)"
            } else {
                ""
            }
        ),
        (_, false, _) if report.booted.is_none() => {
            bail!(
                "the kernel did not reach /init (logs in {})",
                run_dir.display()
            )
        }
        (_, false, _) => bail!(
            "the guest stopped before it finished (logs in {})",
            run_dir.display()
        ),
        (_, true, None) => bail!("the guest never ran the bench"),
        (_, true, Some(s)) if s.exit != Some(0) => bail!(
            "the guest's bench exited {:?} after {} s: {}",
            s.exit,
            s.secs.unwrap_or(0),
            harness_tail()
        ),
        _ if row.results.is_none() => bail!("the guest sent no results"),
        _ => {}
    }
    log(format!(
        "[{label}] done in {:.0} s (logs in {})",
        outcome.elapsed.as_secs_f64(),
        run_dir.display()
    ));
    Ok(())
}

/// What the guest sent, next to the console log, for a look afterwards.
fn save_files(report: &GuestReport, run_dir: &Path) {
    let dir = run_dir.join("guest");
    let _ = std::fs::remove_dir_all(&dir);
    if std::fs::create_dir_all(&dir).is_err() {
        return;
    }
    for (name, bytes) in &report.files {
        if !name.contains('/') && !name.starts_with('.') {
            let _ = std::fs::write(dir.join(name), bytes);
        }
    }
}

/// The guest's progress on stderr as it arrives.
fn progress(label: &str, line: &str, at: Duration) {
    let t = at.as_secs_f64();
    if let Some(start) = line.find("@@PXH-LOG ") {
        let rest = &line[start + "@@PXH-LOG ".len()..];
        let msg = rest.split("@@").next().unwrap_or(rest);
        log(format!("[{label} {t:>4.0}s] {msg}"));
        return;
    }
    match protocol::parse_marker(line) {
        Some((kind, f)) if kind == "BOOTED" => log(format!(
            "[{label}] {} reached /init after {t:.1} s",
            f.get("release").map(String::as_str).unwrap_or("?")
        )),
        Some((kind, _)) if kind == "DONE" => log(format!("[{label}] guest done after {t:.0} s")),
        _ => {}
    }
}

pub fn bench_vm(args: &BenchArgs) -> Result<()> {
    let started = Instant::now();
    let busybox = check_host_tools(true)?;
    let (portexhaust, loadgen) = binaries(args)?;
    let xtask = std::env::current_exe().context("finding this xtask binary")?;
    let cache = args
        .cache_dir
        .clone()
        .unwrap_or_else(|| workspace_root().join("target/vmtest-cache"));
    let cache = cache
        .canonicalize()
        .with_context(|| format!("no kernel cache at {}", cache.display()))?;
    let mut programs = vec![
        (loadgen, GUEST_LOADGEN.to_string()),
        (xtask, GUEST_XTASK.to_string()),
    ];
    let bpftrace = match host_bpftrace() {
        Ok((path, what)) => {
            log(format!(
                "bpftrace for the guests: {what}, with its libraries"
            ));
            programs.push((path, GUEST_BPFTRACE.to_string()));
            Ok(())
        }
        Err(why) => {
            log(format!("no bpftrace in the guests: {why}"));
            Err(why)
        }
    };
    let scenarios: Vec<String> = [(ScenarioArg::Churn, "churn"), (ScenarioArg::Storm, "storm")]
        .into_iter()
        .filter(|(s, _)| args.only.is_empty() || args.only.contains(s))
        .map(|(_, n)| n.to_string())
        .collect();
    if scenarios.is_empty() {
        bail!("--vm runs only the churn and storm scenarios: --only names neither");
    }
    let guest = Guest {
        busybox: &busybox,
        portexhaust: &portexhaust,
        programs,
        plan: GuestPlan {
            plan: Plan::vm(args.quick, args.reps),
            scenarios,
            portexhaust: GUEST_PORTEXHAUST.into(),
            loadgen: GUEST_LOADGEN.into(),
            bpftrace,
            git: git_revision(&workspace_root()),
        },
        memory_mb: args.vm_memory_mb,
        timeout: Duration::from_secs(args.vm_timeout_secs),
        keep: args.keep,
        exec: args.vm_exec.clone(),
    };
    let (out_md, out_json) = out_paths(args, VM_RESULTS_FILE);
    // Kernels measured earlier and not now keep their rows.
    let mut all: VmResults = if out_json.is_file() {
        read_json(&out_json).unwrap_or_else(|e| {
            log(format!("starting a new {}: {e:#}", out_json.display()));
            VmResults::empty()
        })
    } else {
        VmResults::empty()
    };
    all.host = sys::machine();
    all.qemu = qemu_version();
    let runs_root = workspace_root().join("target/vmbench");
    for spec in selected(&args.vm) {
        let row = match kernel(spec, &cache, args.offline) {
            Ok(k) => {
                log(format!(
                    "[{}] {} {} ({})",
                    spec.label, k.package, k.version, k.release
                ));
                run_kernel(spec, &k, &guest, &runs_root.join(spec.label))
            }
            Err(e) => VmKernel::failed(spec, &guest, format!("no kernel: {e:#}")),
        };
        all.put(row);
        // After every kernel, so that a later hang loses nothing.
        write_json(&out_json, &all)?;
    }
    let dir = out_json.parent().unwrap_or(Path::new(".")).to_path_buf();
    if !dir.join(RESULTS_FILE).is_file() {
        log(format!(
            "no {RESULTS_FILE} next to {}: BENCHMARKS.md gets the VM section only",
            out_json.display()
        ));
    }
    all.recompute();
    print!("{}", report::vm_section(&all));
    let bad: Vec<String> = all
        .kernels
        .iter()
        .filter(|k| selected(&args.vm).iter().any(|s| s.label == k.label))
        .filter_map(|k| {
            let failed = k.results.as_ref().map_or(0, |r| r.failed_runs.len());
            match &k.error {
                Some(e) => Some(format!("{}: {e}", k.label)),
                None if failed > 0 => Some(format!("{}: {failed} run(s) failed", k.label)),
                None => None,
            }
        })
        .collect();
    render_markdown(&out_md, &dir, None, Some(all))?;
    log(format!(
        "wrote {} and {} in {:.0} s",
        out_json.display(),
        out_md.display(),
        started.elapsed().as_secs_f64()
    ));
    if !bad.is_empty() {
        bail!("inside the VM kernels: {}", bad.join("; "));
    }
    Ok(())
}

impl VmResults {
    fn empty() -> Self {
        Self {
            schema: 1,
            host: sys::machine(),
            qemu: None,
            kernels: Vec::new(),
        }
    }

    /// Replace this kernel's row (or add it), keeping vmtest's kernel order.
    fn put(&mut self, row: VmKernel) {
        self.kernels.retain(|k| k.label != row.label);
        self.kernels.push(row);
        let order = |l: &str| kernels::KERNELS.iter().position(|k| k.label == l);
        self.kernels.sort_by_key(|k| order(&k.label));
    }
}

impl VmKernel {
    fn failed(spec: &KernelSpec, g: &Guest, why: String) -> Self {
        log(format!("[{}] {why}", spec.label));
        Self {
            label: spec.label.to_string(),
            suite: spec.suite.to_string(),
            date: now_rfc3339(),
            git: g.plan.git.clone(),
            package: None,
            version: None,
            release: None,
            memory_mb: g.memory_mb,
            smp: SMP,
            initramfs_mib: None,
            boot_secs: None,
            run_secs: None,
            host_loadavg: [sys::loadavg(); 2],
            error: Some(why),
            results: None,
        }
    }
}
