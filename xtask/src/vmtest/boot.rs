//! One kernel's run: fetch it, boot it with the checks in its initramfs, and judge every
//! backend from what the guest reports.
use std::{
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};

use super::{
    CONSOLE_TAIL, VmtestArgs, WORKLOAD_FAILURES, WORKLOAD_PORTS, log,
    matrix::{ExecResult, Row},
};
use crate::vm::{
    initramfs::{self, GuestConfig, Payload},
    kernels::{self, ArchiveSource, FetchOptions, Kernel, KernelSpec},
    protocol::{self, Expect, GuestReport},
    qemu::{self, BootConfig, Ended},
};

/// What every kernel's run shares.
pub(super) struct Run<'a> {
    pub(super) args: &'a VmtestArgs,
    pub(super) cache: PathBuf,
    /// The Debian archive; Ok(None) with --offline.
    pub(super) archive: Result<Option<ArchiveSource>, String>,
    pub(super) busybox: PathBuf,
    /// None with --boot-only.
    pub(super) binary: Option<PathBuf>,
    pub(super) backends: Vec<String>,
    /// NAT hooks the NAT scenario runs with, and the host programs it needs in the guest.
    pub(super) nat_hooks: Vec<String>,
    pub(super) nat_programs: Vec<(PathBuf, String)>,
    pub(super) expect: Expect,
}

impl Run<'_> {
    /// The matrix columns: the backends, then one per NAT hook.
    pub(super) fn columns(&self) -> Vec<String> {
        let mut c = self.backends.clone();
        c.extend(self.nat_hooks.iter().map(|h| protocol::nat_column(h)));
        c
    }

    /// Fetch, boot and judge one kernel. Never fails: what goes wrong is in the row.
    pub(super) fn kernel(&self, spec: &KernelSpec) -> Row {
        let args = self.args;
        let backends = &self.columns();
        let mut row = Row::new(spec);
        let label = spec.label;
        let say = |m: &str| log(format!("[{label}] {m}"));
        let archive = match &self.archive {
            Ok(a) => a.as_ref(),
            Err(e) => {
                row.fail_row(
                    backends,
                    "fetch-failed",
                    &format!("could not fetch the kernel: {e}"),
                );
                return row;
            }
        };

        say(&format!("fetching the newest {} cloud kernel", spec.suite));
        let t = Instant::now();
        let opts = FetchOptions {
            cache: &self.cache,
            archive,
            offline: args.offline,
            refresh: args.refresh,
        };
        let kernel = match kernels::fetch(spec, &opts, &|m| say(m)) {
            Ok(k) => k,
            Err(e) => {
                let msg = format!("{e:#}");
                // Absent from the archive, or there but not to be had (network, unpacking).
                let (kind, msg) = if msg.starts_with("kernel package not found") {
                    ("no-kernel", msg)
                } else {
                    ("fetch-failed", format!("could not fetch the kernel: {msg}"))
                };
                say(&msg);
                row.fail_row(backends, kind, &msg);
                return row;
            }
        };
        say(&format!(
            "{} {} ready ({:.0} s)",
            kernel.package,
            kernel.version,
            t.elapsed().as_secs_f64()
        ));
        row.package = Some(kernel.package.clone());
        row.version = Some(kernel.version.clone());
        row.release = Some(kernel.release.clone());
        for w in &kernel.warnings {
            say(&format!("warning: {w}"));
        }

        let run_dir = self.cache.join("runs").join(label);
        if let Err(e) = self.boot_and_judge(spec, &kernel, &run_dir, &mut row) {
            let msg = format!("{e:#}");
            say(&format!("error: {msg}"));
            row.fail_row(backends, "error", &msg);
        }
        row.logs = Some(run_dir);
        row
    }

    fn boot_and_judge(
        &self,
        spec: &KernelSpec,
        kernel: &Kernel,
        run_dir: &Path,
        row: &mut Row,
    ) -> Result<()> {
        let (args, backends, expect) = (self.args, &self.backends, &self.expect);
        let columns = &self.columns();
        let binary = self.binary.as_deref();
        let label = spec.label;
        std::fs::create_dir_all(run_dir)
            .with_context(|| format!("creating {}", run_dir.display()))?;
        let image = run_dir.join("initramfs.cpio");
        let guest = GuestConfig {
            kernel_label: label.to_string(),
            backends: backends.to_vec(),
            nat_hooks: self.nat_hooks.clone(),
            boot_only: args.boot_only,
            step_timeout_secs: args.step_timeout_secs,
            trace_secs: args.trace_secs,
            workload_ports: WORKLOAD_PORTS,
            workload_failures: WORKLOAD_FAILURES,
            exec: args.exec.clone(),
            bench_plan: None,
            bench_timeout_secs: 0,
        };
        let size = initramfs::build(
            &Payload {
                busybox: &self.busybox,
                portexhaust: binary,
                modules: &kernel.modules,
                programs: &self.nat_programs,
            },
            &guest,
            &image,
        )
        .context("building the initramfs")?;
        log(format!(
            "[{label}] booting {} under QEMU (TCG, initramfs {:.1} MiB, timeout {} s)",
            kernel.release,
            size as f64 / (1024.0 * 1024.0),
            args.timeout_secs
        ));

        let mut booted_at: Option<f64> = None;
        let outcome = qemu::boot(
            &BootConfig {
                vmlinuz: &kernel.vmlinuz,
                initramfs: &image,
                run_dir,
                memory_mb: args.memory_mb,
                smp: args.smp,
                timeout: Duration::from_secs(args.timeout_secs),
                append: "",
                qemu_args: &[],
            },
            |line, at| {
                if line.contains("@@PXH-BOOTED") {
                    booted_at = Some(round1(at.as_secs_f64()));
                }
                progress(label, line, at);
            },
        );
        if !args.keep {
            let _ = std::fs::remove_file(&image);
        }
        let outcome = outcome?;
        let report = protocol::parse(&outcome.results);
        row.facts = report.facts.clone();
        row.run_secs = Some(round1(outcome.elapsed.as_secs_f64()));
        row.boot_secs = booted_at;
        row.kernel_warnings = kernel_warnings(&outcome.console);
        if let Some(r) = &report.booted {
            row.release = Some(r.clone());
        }
        save_guest_files(&report, &run_dir.join("guest"));
        for name in &report.damaged {
            log(format!("[{label}] warning: output {name} arrived damaged"));
        }

        for b in backends {
            if let Some(cell) = protocol::classify(&report, b, expect) {
                row.cells.insert(b.clone(), cell);
            }
        }
        for h in &self.nat_hooks {
            if let Some(cell) = protocol::classify_nat(&report, h) {
                row.cells.insert(protocol::nat_column(h), cell);
            }
        }
        for (i, cmd) in args.exec.iter().enumerate() {
            let n = format!("{:02}", i + 1);
            if let Some(step) = report.step("exec", &n) {
                row.exec.push(ExecResult {
                    command: cmd.clone(),
                    exit: step.exit,
                    output: report.text(&format!("exec.{n}.out")),
                });
            }
        }
        if let Some((kind, why)) = boot_problem(
            &outcome.ended,
            &report,
            args.timeout_secs,
            &outcome.qemu_log,
        ) {
            log(format!("[{label}] {why}"));
            row.console_tail = qemu::last_lines(&outcome.console, CONSOLE_TAIL);
            if row.console_tail.is_empty() {
                row.console_tail = vec!["(the console stayed empty)".into()];
            }
            row.fail_row(columns, kind, &why);
        } else if binary.is_some() && report.facts.get("payload").is_some_and(|v| v == "missing") {
            bail!("the guest found no /usr/bin/portexhaust");
        }
        log(format!(
            "[{label}] finished in {:.0} s (logs in {})",
            outcome.elapsed.as_secs_f64(),
            run_dir.display()
        ));
        Ok(())
    }
}

/// Keep what the guest sent (selftest tables, trace NDJSON, dmesg) next to the console log,
/// for a look after the run. Best effort: the report itself is already parsed.
fn save_guest_files(report: &GuestReport, dir: &Path) {
    let _ = std::fs::remove_dir_all(dir);
    if std::fs::create_dir_all(dir).is_err() {
        return;
    }
    for (name, bytes) in &report.files {
        // Names come from our own /init ("kprobe.trace.out"); refuse anything path-like.
        if !name.contains('/') && !name.starts_with('.') {
            let _ = std::fs::write(dir.join(format!("{name}.txt")), bytes);
        }
    }
}

/// Why a boot did not deliver a complete report (a one-word kind and a sentence), or None.
fn boot_problem(
    ended: &Ended,
    r: &GuestReport,
    timeout: u64,
    qemu_log: &str,
) -> Option<(&'static str, String)> {
    let during = || match r.running.last() {
        Some((b, s)) => format!(" during {b} {s}"),
        None => String::new(),
    };
    match ended {
        _ if r.done => None,
        Ended::TimedOut if r.booted.is_none() => Some((
            "hung",
            format!(
                "hung: /init never reported within {timeout} s (the kernel did not finish booting)"
            ),
        )),
        Ended::TimedOut => Some((
            "hung",
            format!(
                "hung: the guest stopped answering{} and was killed after {timeout} s",
                during()
            ),
        )),
        Ended::Exited(code) if r.booted.is_none() => {
            let qemu = qemu::last_lines(qemu_log, 1).pop();
            Some((
                "boot-failed",
                format!(
                    "boot failed: the kernel stopped before /init reported (QEMU exit {}){}",
                    code.map_or("?".into(), |c| c.to_string()),
                    qemu.map(|q| format!(": {q}")).unwrap_or_default()
                ),
            ))
        }
        Ended::Exited(_) => Some((
            "crashed",
            format!(
                "the guest stopped{} without finishing (kernel panic or init crash?)",
                during()
            ),
        )),
    }
}

fn round1(x: f64) -> f64 {
    (x * 10.0).round() / 10.0
}

/// Progress lines on stderr as the guest's records arrive.
fn progress(label: &str, line: &str, at: Duration) {
    let t = at.as_secs_f64();
    let Some((kind, f)) = protocol::parse_marker(line) else {
        return;
    };
    let get = |k: &str| f.get(k).map(String::as_str).unwrap_or("?");
    match kind.as_str() {
        "BOOTED" => {
            log(format!(
                "[{label}] {} reached /init after {t:.1} s",
                get("release")
            ));
        }
        "BEGIN" => log(format!(
            "[{label}] {} {} ... ({t:.0} s)",
            get("backend"),
            get("step")
        )),
        "STEP" => log(format!(
            "[{label}] {} {}: exit {} in {} s ({t:.0} s)",
            get("backend"),
            get("step"),
            get("exit"),
            get("secs")
        )),
        "FACT" => log(format!("[{label}] {} = {}", get("name"), get("value"))),
        "DONE" => log(format!("[{label}] guest done after {t:.1} s")),
        _ => {}
    }
}

/// Kernel complaints on the console worth showing even when every check passed.
fn kernel_warnings(console: &str) -> Vec<String> {
    const SIGNS: &[&str] = &[
        "BUG:",
        "Oops",
        "WARNING:",
        "Kernel panic",
        "Call Trace",
        "segfault",
    ];
    let mut out: Vec<String> = console
        .lines()
        .map(|l| l.trim_end_matches('\r').trim())
        .filter(|l| SIGNS.iter().any(|s| l.contains(s)))
        .map(str::to_string)
        .collect();
    out.truncate(10);
    out
}
