//! `cargo xtask vmtest`: prove every probe backend on real kernels (issue 3).
//!
//! The development machines' kernel offers only the tracepoint backend (no kprobes, fentry
//! refused), so the kprobe and fentry paths are checked here, on Debian's cloud kernels booted
//! under QEMU: bullseye 5.10, bookworm 6.1, trixie 6.12. Each kernel boots once, with an
//! initramfs holding the current portexhaust binary; its /init runs `portexhaust selftest` and a
//! short `trace --json` session over a real exhaustion for every backend, and reports back over
//! a serial port. The result is a kernel x backend matrix.
//!
//! Files: vm/kernels.rs (fetch and cache kernels), vm/initramfs.rs + vm/cpio.rs + vm/init.sh
//! (the guest), vm/qemu.rs (one boot), vm/protocol.rs (guest records and their judgement).
use std::{
    collections::BTreeMap,
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};
use serde::Serialize;

use crate::vm::{
    initramfs::{self, GuestConfig, Payload},
    kernels::{self, ArchiveSource, FetchOptions, Kernel, KernelSpec},
    protocol::{self, Cell, Expect, GuestReport, Status},
    qemu::{self, BootConfig, Ended},
};

const BACKENDS: &[&str] = &["tp-btf", "raw-tp", "fentry", "kprobe", "tracepoint"];

/// The exhaustion the trace session makes in the guest: `workload --ports P --failures F`.
const WORKLOAD_PORTS: u32 = 10;
const WORKLOAD_FAILURES: u32 = 20;

/// Console lines shown for a boot that failed or hung.
const CONSOLE_TAIL: usize = 30;

#[derive(clap::Args, Debug)]
#[command(after_help = "Examples:\n  \
    cargo xtask vmtest                      # all kernels, all backends\n  \
    cargo xtask vmtest --kernel 6.1 --backend kprobe\n  \
    cargo xtask vmtest --boot-only          # fetch and boot each kernel, no portexhaust\n  \
    cargo xtask vmtest --binary target/release/portexhaust --json matrix.json")]
pub struct VmtestArgs {
    /// Kernels to boot (comma-separated): 5.10 (bullseye), 6.1 (bookworm), 6.12 (trixie), all.
    #[arg(long, value_delimiter = ',', default_value = "all",
          value_parser = ["5.10", "6.1", "6.12", "all"])]
    kernel: Vec<String>,
    /// Backends to check in each kernel (comma-separated); all = fentry, kprobe, tracepoint;
    /// none = no checks (with --exec).
    #[arg(long, value_delimiter = ',', default_value = "all",
          value_parser = ["auto", "tp-btf", "raw-tp", "fentry", "kprobe", "tracepoint", "all", "none"])]
    backend: Vec<String>,
    /// Also run this shell command in the guest after the checks, as root, and show its output
    /// (repeatable). For digging into a failure, e.g.
    /// --backend none --exec 'portexhaust selftest --backend fentry; dmesg | tail'.
    #[arg(long, value_name = "CMD")]
    exec: Vec<String>,
    /// Kill a guest that has not powered off after this many seconds (one boot checks every
    /// backend).
    #[arg(long, default_value_t = 300)]
    timeout_secs: u64,
    /// Inside the guest, kill one selftest / trace / workload command after this long.
    /// (A check takes 1-3 s under emulation on a 2-core machine.)
    #[arg(long, default_value_t = 60)]
    step_timeout_secs: u64,
    /// `--duration` of the trace session in the guest: a backstop only, since the session is
    /// ended with Ctrl-C (SIGINT) as soon as the workload is done.
    #[arg(long, default_value_t = 60)]
    trace_secs: u64,
    /// Where kernel packages, unpacked kernels and run logs are kept
    /// [default: target/vmtest-cache under the workspace root].
    #[arg(long)]
    cache_dir: Option<PathBuf>,
    /// Test this portexhaust binary instead of building target/release/portexhaust.
    #[arg(long, value_name = "PATH")]
    binary: Option<PathBuf>,
    /// Only fetch and boot each kernel and report what it offers (no portexhaust needed).
    #[arg(long)]
    boot_only: bool,
    /// Use only kernels already in the cache; never touch the network.
    #[arg(long, conflicts_with = "refresh")]
    offline: bool,
    /// Refresh the package lists even if they are recent (they are refreshed once a day).
    #[arg(long)]
    refresh: bool,
    /// Debian archive to fetch kernels from [default: the one this machine's apt uses].
    #[arg(long, value_name = "URI")]
    archive_uri: Option<String>,
    /// Also write the matrix as JSON to this file.
    #[arg(long, value_name = "FILE")]
    json: Option<PathBuf>,
    /// Keep each kernel's initramfs next to its logs in the cache's runs/ folder.
    #[arg(long)]
    keep: bool,
    /// Guest memory in MiB.
    #[arg(long, default_value_t = 1024)]
    memory_mb: u32,
    /// Guest CPUs.
    #[arg(long, default_value_t = 2)]
    smp: u32,
}

#[derive(Debug, Serialize)]
struct ExecResult {
    command: String,
    exit: Option<i32>,
    output: String,
}

/// One kernel's row of the matrix, and everything known about its run.
#[derive(Debug, Serialize)]
struct Row {
    kernel: String,
    suite: String,
    package: Option<String>,
    version: Option<String>,
    release: Option<String>,
    /// Why the kernel could not be tested at all (fetch, image, boot, hang).
    error: Option<String>,
    /// One word for `error`, shown in the matrix: no-kernel, fetch-failed, boot-failed, hung,
    /// crashed, error.
    error_kind: Option<&'static str>,
    boot_secs: Option<f64>,
    run_secs: Option<f64>,
    facts: BTreeMap<String, String>,
    cells: BTreeMap<String, Cell>,
    /// `--exec` commands: (command, exit code, output).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    exec: Vec<ExecResult>,
    /// Kernel warnings noticed on the console (BUG, WARNING, Oops), for information.
    kernel_warnings: Vec<String>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    console_tail: Vec<String>,
    #[serde(skip)]
    logs: Option<PathBuf>,
}

impl Row {
    fn new(spec: &KernelSpec) -> Self {
        Self {
            kernel: spec.label.to_string(),
            suite: spec.suite.to_string(),
            package: None,
            version: None,
            release: None,
            error: None,
            error_kind: None,
            boot_secs: None,
            run_secs: None,
            facts: BTreeMap::new(),
            cells: BTreeMap::new(),
            exec: Vec::new(),
            kernel_warnings: Vec::new(),
            console_tail: Vec::new(),
            logs: None,
        }
    }

    /// Record why the kernel could not be (fully) tested; every backend without a result is
    /// marked as not run.
    fn fail_row(&mut self, backends: &[String], kind: &'static str, why: &str) {
        self.error = Some(why.to_string());
        self.error_kind = Some(kind);
        for b in backends {
            self.cells
                .entry(b.clone())
                .or_insert_with(|| Cell::new(Status::NotRun, why));
        }
    }

    fn ok(&self) -> bool {
        self.error.is_none()
            && self
                .cells
                .values()
                .all(|c| matches!(c.status, Status::Pass | Status::Unsupported))
    }
}

fn log(msg: impl AsRef<str>) {
    eprintln!("vmtest: {}", msg.as_ref());
}

pub fn find_in_path(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|d| d.join(name))
        .find(|p| p.is_file())
}

/// What the run needs from the host, said all at once rather than failing half-way.
pub fn check_host_tools(offline: bool) -> Result<PathBuf> {
    let mut missing = Vec::new();
    if find_in_path("qemu-system-x86_64").is_none() {
        missing.push("qemu-system-x86_64 (Debian package qemu-system-x86)");
    }
    let busybox = ["/bin/busybox", "/usr/bin/busybox"]
        .iter()
        .map(PathBuf::from)
        .find(|p| p.is_file());
    if busybox.is_none() {
        missing.push("busybox (Debian package busybox-static)");
    }
    if !offline {
        for (tool, what) in [
            ("apt-get", "apt-get (apt)"),
            ("dpkg-deb", "dpkg-deb (dpkg)"),
        ] {
            if find_in_path(tool).is_none() {
                missing.push(what);
            }
        }
    }
    if !missing.is_empty() {
        bail!(
            "missing on this machine: {}; run `cargo xtask setup` as root",
            missing.join(", ")
        );
    }
    busybox.context("busybox not found")
}

/// Two runs on one cache would share apt state and run folders: hold a lock for the run.
/// The lock goes with the returned file (and with the process, however it ends).
fn lock_cache(cache: &Path) -> Result<std::fs::File> {
    use std::os::fd::AsRawFd as _;
    let path = cache.join("vmtest.lock");
    let f = std::fs::File::create(&path).with_context(|| format!("creating {}", path.display()))?;
    // SAFETY: flock on a file descriptor we own; no memory is involved.
    let rc = unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
    if rc != 0 {
        bail!(
            "another `cargo xtask vmtest` is using {} (wait for it, or pass --cache-dir)",
            cache.display()
        );
    }
    Ok(f)
}

fn selected_kernels(args: &VmtestArgs) -> Vec<&'static KernelSpec> {
    kernels::KERNELS
        .iter()
        .filter(|k| args.kernel.iter().any(|a| a == "all" || a == k.label))
        .collect()
}

fn selected_backends(args: &VmtestArgs) -> Vec<String> {
    let mut out: Vec<String> = Vec::new();
    for b in &args.backend {
        let names: Vec<&str> = match b.as_str() {
            "all" => BACKENDS.to_vec(),
            "none" => Vec::new(),
            other => vec![other],
        };
        for n in names {
            if !out.iter().any(|o| o == n) {
                out.push(n.to_string());
            }
        }
    }
    out
}

pub fn vmtest(args: &VmtestArgs) -> Result<()> {
    let kernels = selected_kernels(args);
    let backends = if args.boot_only {
        Vec::new()
    } else {
        selected_backends(args)
    };
    let busybox = check_host_tools(args.offline)?;
    let cache = args
        .cache_dir
        .clone()
        .unwrap_or_else(|| crate::setup::workspace_root().join("target/vmtest-cache"));
    std::fs::create_dir_all(&cache).with_context(|| format!("creating {}", cache.display()))?;
    let cache = cache
        .canonicalize()
        .with_context(|| format!("resolving {}", cache.display()))?;
    let _lock = lock_cache(&cache)?;

    // The binary first: a build error should show before minutes of downloading and booting.
    let binary =
        if args.boot_only {
            None
        } else if let Some(b) = &args.binary {
            if !b.is_file() {
                bail!("--binary {}: no such file", b.display());
            }
            Some(
                b.canonicalize()
                    .with_context(|| format!("resolving {}", b.display()))?,
            )
        } else {
            Some(crate::setup::build_release().context(
                "building portexhaust failed (use --binary PATH to test an existing build)",
            )?)
        };

    // Where Debian is, once for all suites (None: --offline); without it every row says why.
    let archive = if args.offline {
        Ok(None)
    } else if let Some(uri) = &args.archive_uri {
        Ok(Some(ArchiveSource {
            uri: uri.trim_end_matches('/').to_string(),
            signed_by: None,
        }))
    } else {
        kernels::host_archive()
            .map(Some)
            .map_err(|e| format!("{e:#}"))
    };

    let run = Run {
        args,
        cache,
        archive,
        busybox,
        binary,
        backends,
        expect: Expect {
            failures: u64::from(WORKLOAD_FAILURES),
            dst: "127.0.0.1:5000".into(),
            errno: 99,
            site: "__inet_hash_connect".into(),
        },
    };
    let started = Instant::now();
    let rows: Vec<Row> = kernels.into_iter().map(|spec| run.kernel(spec)).collect();
    log(format!(
        "all done in {:.0} s",
        started.elapsed().as_secs_f64()
    ));

    let (backends, expect) = (&run.backends, &run.expect);
    print!("{}", render(&rows, backends, args.boot_only));
    if let Some(path) = &args.json {
        let json = serde_json::to_string_pretty(&serde_json::json!({
            "backends": backends,
            "expect": {"failures": expect.failures, "dst": expect.dst, "errno": expect.errno,
                       "site": expect.site},
            "kernels": rows,
        }))
        .context("serialising the matrix")?;
        std::fs::write(path, json + "\n").with_context(|| format!("writing {}", path.display()))?;
        log(format!("matrix written to {}", path.display()));
    }

    let bad: Vec<&str> = rows
        .iter()
        .filter(|r| !r.ok())
        .map(|r| r.kernel.as_str())
        .collect();
    if !bad.is_empty() {
        // Exit here rather than return an error: the matrix above already says everything,
        // and a backtrace of this line (RUST_BACKTRACE=1) would only bury it.
        eprintln!(
            "vmtest: FAILED on kernel(s) {} (see the matrix and notes above)",
            bad.join(", ")
        );
        std::process::exit(1);
    }
    Ok(())
}

/// What every kernel's run shares.
struct Run<'a> {
    args: &'a VmtestArgs,
    cache: PathBuf,
    /// The Debian archive; Ok(None) with --offline.
    archive: Result<Option<ArchiveSource>, String>,
    busybox: PathBuf,
    /// None with --boot-only.
    binary: Option<PathBuf>,
    backends: Vec<String>,
    expect: Expect,
}

impl Run<'_> {
    /// Fetch, boot and judge one kernel. Never fails: what goes wrong is in the row.
    fn kernel(&self, spec: &KernelSpec) -> Row {
        let (args, backends) = (self.args, &self.backends);
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
        let binary = self.binary.as_deref();
        let label = spec.label;
        std::fs::create_dir_all(run_dir)
            .with_context(|| format!("creating {}", run_dir.display()))?;
        let image = run_dir.join("initramfs.cpio");
        let guest = GuestConfig {
            kernel_label: label.to_string(),
            backends: backends.to_vec(),
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
                programs: &[],
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
            row.fail_row(backends, kind, &why);
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

/// The matrix and the notes below it (stdout).
fn render(rows: &[Row], backends: &[String], boot_only: bool) -> String {
    // Without checks (--boot-only, --backend none) the table shows what each kernel offers.
    let boot_only = boot_only || backends.is_empty();
    let mut out = String::new();
    let mut header = vec!["kernel".to_string()];
    if boot_only {
        header.extend([
            "boot".into(),
            "btf".into(),
            "kprobe_pmu".into(),
            "filter_functions".into(),
        ]);
    } else {
        header.extend(backends.iter().cloned());
    }
    let mut table = vec![header];
    for r in rows {
        let mut line = vec![r.kernel.clone()];
        if boot_only {
            let fact = |k: &str| r.facts.get(k).cloned().unwrap_or_else(|| "-".into());
            line.push(match (&r.error, r.boot_secs) {
                (Some(_), _) => r.error_kind.unwrap_or("error").into(),
                (None, Some(s)) => format!("{s:.1}s"),
                (None, None) => "ok".into(),
            });
            line.extend([
                fact("btf"),
                fact("kprobe_pmu"),
                fact("available_filter_functions"),
            ]);
        } else {
            for b in backends {
                let word = match r.cells.get(b) {
                    Some(c) if c.status != Status::NotRun => c.status.word(),
                    _ => r.error_kind.unwrap_or("not-run"),
                };
                line.push(word.to_string());
            }
        }
        table.push(line);
    }
    let cols = table.iter().map(Vec::len).max().unwrap_or(0);
    let widths: Vec<usize> = (0..cols)
        .map(|i| {
            table
                .iter()
                .filter_map(|r| r.get(i))
                .map(String::len)
                .max()
                .unwrap_or(0)
        })
        .collect();
    out.push('\n');
    for line in &table {
        let cells: Vec<String> = line
            .iter()
            .enumerate()
            .map(|(i, c)| format!("{c:<w$}", w = widths[i]))
            .collect();
        out.push_str(cells.join("  ").trim_end());
        out.push('\n');
    }
    out.push('\n');
    for r in rows {
        let pkg = match (&r.package, &r.version) {
            (Some(p), Some(v)) => format!("{p} {v}"),
            _ => format!("({} kernel not fetched)", r.suite),
        };
        let timing = match (r.boot_secs, r.run_secs) {
            (Some(b), Some(t)) => format!(": /init after {b:.1} s, whole boot {t:.0} s"),
            (None, Some(t)) => format!(": whole boot {t:.0} s"),
            _ => String::new(),
        };
        out.push_str(&format!("{} ({}): {pkg}{timing}\n", r.kernel, r.suite));
        if let Some(e) = &r.error {
            out.push_str(&format!("  ERROR: {e}\n"));
        }
        for b in backends {
            let Some(c) = r.cells.get(b) else { continue };
            // A row-level error already explains every not-run cell.
            if c.status == Status::NotRun && r.error.is_some() {
                continue;
            }
            out.push_str(&format!("  {b}: {}: {}\n", c.status.word(), c.reason));
            for d in &c.details {
                out.push_str(&format!("      {d}\n"));
            }
        }
        for e in &r.exec {
            let code = e.exit.map_or("?".into(), |c| c.to_string());
            out.push_str(&format!("  exec `{}`: exit {code}\n", e.command));
            for l in e.output.lines() {
                out.push_str(&format!("    | {l}\n"));
            }
        }
        for w in &r.kernel_warnings {
            out.push_str(&format!("  kernel: {w}\n"));
        }
        if !r.console_tail.is_empty() {
            out.push_str(&format!("  last {} console lines:\n", r.console_tail.len()));
            for l in &r.console_tail {
                out.push_str(&format!("    | {l}\n"));
            }
        }
        if !r.ok()
            && let Some(l) = &r.logs
        {
            out.push_str(&format!("  logs: {}\n", l.display()));
        }
    }
    out
}
