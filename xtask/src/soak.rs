//! `cargo xtask soak --minutes N`: `trace` as a service runs it (`--record` rotating,
//! `--metrics-addr`, blame on) for N minutes under a mixed load, sampled every 10 s.
//!
//! The load, each part in network namespaces of its own that come and go with its processes:
//! - healthy churn (`pxh-loadgen churn`, 20 s runs back to back);
//! - a storm of failures every minute (`pxh-loadgen storm`, exact counts);
//! - short-lived failing processes every 7 s (a new process and namespace each);
//! - held connections churned and closed every 30 s (`pxh-loadgen hold`: owners, TIME_WAIT);
//! - containers, if a runtime answers here (else the report says it was not reachable).
//!
//! Checks, after a warm-up (the first fifth, and at least the first 90 s: a hold cycle plus
//! TIME_WAIT's 60 s, until the remembered owners reach their steady state): the tracer's RSS and open
//! fds grow by at most 5% over the run (least-squares slope), the LRU maps stay within their
//! bounds, and the tracer's exact counts equal the workload's own. Writes soak.json (every
//! sample), soak.svg (RSS and CPU over time) and soak.md into the output directory; fails
//! when a check fails.
use std::{
    fmt::Write as _,
    io::{BufRead, BufReader},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};
use serde::Serialize;

use crate::setup::{build_tools, is_root, run_checked, workspace_root};

#[derive(clap::Args, Debug, Clone)]
pub struct SoakArgs {
    /// How long to run.
    #[arg(long, default_value_t = 30.0)]
    pub minutes: f64,
    /// Where soak.json, soak.svg and soak.md go.
    #[arg(long, default_value = "target/soak")]
    pub out_dir: PathBuf,
    /// Use the release binaries already built.
    #[arg(long)]
    pub no_build: bool,
}

const SAMPLE_EVERY: Duration = Duration::from_secs(10);
/// Allowed growth of RSS and fds after warm-up, over the whole run.
const MAX_GROWTH: f64 = 0.05;
/// `trace --max-tracked-sockets` default and the counts map's size: the LRU bounds.
const MAX_TRACKED: u64 = 131_072;
const STORM_FAILURES: u64 = 200_000;
const SHORT_FAILURES: u64 = 50;

#[derive(Clone, Debug, Serialize)]
struct Sample {
    t_s: f64,
    rss_kib: u64,
    fds: u64,
    /// Tracer CPU (user + system) since the previous sample, in percent of one CPU.
    cpu_pct: f64,
    cpu_total_s: f64,
    record_bytes: u64,
    /// From the record's latest snapshot.
    tracked_sockets: u64,
    lru_evictions: u64,
    failures_total: u64,
}

#[derive(Default)]
struct Expected {
    failures: u64,
    storms: u64,
    short_lived: u64,
    churn_connects: u64,
    holds: u64,
    errors: Vec<String>,
}

#[derive(Serialize)]
struct Fit {
    slope_per_min: f64,
    mean: f64,
    growth_pct: f64,
}

fn ticks_per_s() -> f64 {
    // SAFETY: sysconf has no preconditions.
    let t = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if t > 0 { t as f64 } else { 100.0 }
}

fn proc_rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or(0)
}

/// What the tracer's fds point at, at the end (counted by target, sockets and pipes by kind):
/// the evidence when the fd count grows.
fn fd_targets(pid: u32) -> std::collections::BTreeMap<String, u32> {
    let mut out = std::collections::BTreeMap::new();
    let Ok(dir) = std::fs::read_dir(format!("/proc/{pid}/fd")) else {
        return out;
    };
    for e in dir.flatten() {
        let t = std::fs::read_link(e.path())
            .map(|p| p.display().to_string())
            .unwrap_or_else(|_| "?".into());
        // socket:[123] and pipe:[456] by kind, files by path.
        let key = match t.split_once(":[") {
            Some((kind, _)) => kind.to_string(),
            None => t,
        };
        *out.entry(key).or_default() += 1;
    }
    out
}

fn proc_fds(pid: u32) -> u64 {
    std::fs::read_dir(format!("/proc/{pid}/fd")).map_or(0, |d| d.count() as u64)
}

fn proc_cpu_s(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Fields after the command (which may hold spaces): state is field 3, utime 14, stime 15.
    let rest = stat.rsplit_once(')').map_or("", |(_, r)| r);
    let f: Vec<&str> = rest.split_whitespace().collect();
    let get = |i: usize| f.get(i).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
    (get(11) + get(12)) / ticks_per_s()
}

fn record_bytes(dir: &Path) -> u64 {
    std::fs::read_dir(dir).map_or(0, |d| {
        d.filter_map(|e| e.ok())
            .filter(|e| e.file_name().to_string_lossy().starts_with("soak.ndjson"))
            .filter_map(|e| e.metadata().ok())
            .map(|m| m.len())
            .sum()
    })
}

/// The latest snapshot or summary line of the newest part of the record.
fn latest_totals(record: &Path) -> Option<serde_json::Value> {
    let text = std::fs::read_to_string(record).ok()?;
    text.lines().rev().find_map(|l| {
        if !(l.contains("\"type\":\"snapshot\"") || l.contains("\"type\":\"summary\"")) {
            return None;
        }
        serde_json::from_str(l).ok()
    })
}

/// Run one load generator to its end and return its report line.
fn loadgen(bin: &Path, args: &[&str]) -> Result<serde_json::Value> {
    let out = Command::new(bin)
        .args(args)
        .stdin(Stdio::null())
        .stderr(Stdio::null())
        .output()
        .with_context(|| format!("running pxh-loadgen {args:?}"))?;
    if !out.status.success() {
        bail!("pxh-loadgen {args:?}: {}", out.status);
    }
    let text = String::from_utf8_lossy(&out.stdout);
    let line = text.lines().rev().find(|l| l.trim_start().starts_with('{'));
    serde_json::from_str(line.unwrap_or("")).context("pxh-loadgen report")
}

/// A loop of one kind of load until `stop`, every `every` (0: back to back).
fn load_loop(
    stop: Arc<AtomicBool>,
    every: Duration,
    expected: Arc<Mutex<Expected>>,
    mut f: impl FnMut(&mut Expected) -> Result<()> + Send + 'static,
) -> thread::JoinHandle<()> {
    thread::spawn(move || {
        while !stop.load(Ordering::Relaxed) {
            let t0 = Instant::now();
            let mut e = Expected::default();
            let r = f(&mut e);
            {
                let mut all = expected.lock().unwrap_or_else(|p| p.into_inner());
                all.failures += e.failures;
                all.storms += e.storms;
                all.short_lived += e.short_lived;
                all.churn_connects += e.churn_connects;
                all.holds += e.holds;
                if let Err(err) = r {
                    all.errors.push(format!("{err:#}"));
                }
            }
            while !stop.load(Ordering::Relaxed) && t0.elapsed() < every {
                thread::sleep(Duration::from_millis(200));
            }
        }
    })
}

fn fit(samples: &[(f64, f64)]) -> Fit {
    let n = samples.len() as f64;
    let mean_t = samples.iter().map(|s| s.0).sum::<f64>() / n;
    let mean = samples.iter().map(|s| s.1).sum::<f64>() / n;
    let cov: f64 = samples.iter().map(|s| (s.0 - mean_t) * (s.1 - mean)).sum();
    let var: f64 = samples.iter().map(|s| (s.0 - mean_t).powi(2)).sum();
    let slope = if var > 0.0 { cov / var } else { 0.0 };
    let span = samples.last().map_or(0.0, |l| l.0) - samples.first().map_or(0.0, |f| f.0);
    Fit {
        slope_per_min: slope * 60.0,
        mean,
        growth_pct: if mean > 0.0 {
            slope * span / mean * 100.0
        } else {
            0.0
        },
    }
}

/// Two panels, RSS (MiB) and CPU (% of one CPU), over minutes.
fn svg(samples: &[Sample], warmup_s: f64) -> String {
    let (w, h, pad) = (720.0, 200.0, 48.0);
    let t_max = samples.last().map_or(1.0, |s| s.t_s).max(1.0);
    let mut out = format!(
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{w}\" height=\"{}\" \
         font-family=\"sans-serif\" font-size=\"11\">\n",
        2.0 * h + 30.0
    );
    type Panel<'a> = (&'a str, Box<dyn Fn(&Sample) -> f64>, &'a str);
    let panels: [Panel; 2] = [
        (
            "tracer RSS (MiB)",
            Box::new(|s| s.rss_kib as f64 / 1024.0),
            "#1f77b4",
        ),
        (
            "tracer CPU (% of one CPU, per 10 s)",
            Box::new(|s| s.cpu_pct),
            "#d62728",
        ),
    ];
    for (i, (title, val, colour)) in panels.iter().enumerate() {
        let top = i as f64 * (h + 15.0) + 15.0;
        let v_max = samples.iter().map(val).fold(0.0, f64::max).max(1e-9) * 1.15;
        let x = |t: f64| pad + (w - 2.0 * pad) * t / t_max;
        let y = |v: f64| top + h - 24.0 - (h - 40.0) * v / v_max;
        let _ = writeln!(
            out,
            "<text x=\"{pad}\" y=\"{}\">{title}</text>\
             <line x1=\"{pad}\" y1=\"{}\" x2=\"{}\" y2=\"{}\" stroke=\"#999\"/>\
             <line x1=\"{pad}\" y1=\"{}\" x2=\"{pad}\" y2=\"{}\" stroke=\"#999\"/>\
             <text x=\"4\" y=\"{}\">{:.1}</text><text x=\"4\" y=\"{}\">0</text>\
             <text x=\"{}\" y=\"{}\">{:.0} min</text>\
             <rect x=\"{pad}\" y=\"{}\" width=\"{:.1}\" height=\"{}\" fill=\"#eee\"/>",
            top + 8.0,
            y(0.0),
            w - pad,
            y(0.0),
            y(0.0),
            y(v_max),
            y(v_max) + 4.0,
            v_max,
            y(0.0),
            w - pad - 30.0,
            y(0.0) + 14.0,
            t_max / 60.0,
            y(v_max),
            x(warmup_s) - pad,
            y(0.0) - y(v_max),
        );
        let points: Vec<String> = samples
            .iter()
            .map(|s| format!("{:.1},{:.1}", x(s.t_s), y(val(s))))
            .collect();
        let _ = writeln!(
            out,
            "<polyline fill=\"none\" stroke=\"{colour}\" stroke-width=\"1.5\" points=\"{}\"/>",
            points.join(" ")
        );
    }
    out.push_str("</svg>\n");
    out
}

fn container_runtime() -> Option<String> {
    for rt in ["docker", "podman"] {
        let ok = Command::new(rt)
            .args(["info", "--format", "{{.ServerVersion}}"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        if ok {
            return Some(rt.to_string());
        }
    }
    None
}

struct Killed(Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

pub fn soak(args: &SoakArgs) -> Result<()> {
    if !is_root() {
        bail!(
            "the soak needs root (it loads eBPF programs and creates network namespaces): run it as root"
        );
    }
    if args.minutes.is_nan() || args.minutes <= 0.0 {
        bail!("--minutes must be positive");
    }
    let root = workspace_root();
    if !args.no_build {
        build_tools()?;
    }
    let pxh = root.join("target/release/portexhaust");
    let loadgen_bin = root.join("target/release/pxh-loadgen");
    let out_dir = if args.out_dir.is_absolute() {
        args.out_dir.clone()
    } else {
        root.join(&args.out_dir)
    };
    std::fs::create_dir_all(&out_dir)?;
    let rec_dir = out_dir.join("record");
    let _ = std::fs::remove_dir_all(&rec_dir);
    std::fs::create_dir_all(&rec_dir)?;
    let record = rec_dir.join("soak.ndjson");
    let metrics_port = std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?;

    let runtime = container_runtime();
    let mut tracer_cmd = Command::new(&pxh);
    tracer_cmd
        .args(["trace", "--json", "--record"])
        .arg(&record)
        .args([
            "--record-max-size",
            "1M",
            "--record-keep",
            "3",
            "--metrics-addr",
            &metrics_port.to_string(),
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    let mut tracer = Killed(tracer_cmd.spawn().context("starting portexhaust trace")?);
    let pid = tracer.0.id();
    let stderr = tracer.0.stderr.take().context("tracer stderr")?;
    let mut lines = BufReader::new(stderr).lines();
    let started = Instant::now();
    loop {
        match lines.next() {
            Some(Ok(l)) if l.contains("ready:") => break,
            Some(Ok(_)) => {}
            _ => bail!("the tracer exited before it was ready"),
        }
        if started.elapsed() > Duration::from_secs(60) {
            bail!("the tracer was not ready within 60 s");
        }
    }
    // Keep draining its diagnostics so that it never blocks on a full pipe.
    let diag = thread::spawn(move || lines.map_while(Result::ok).collect::<Vec<String>>());
    eprintln!(
        "xtask: soak: tracer {pid} ready; {} min of mixed load; containers: {}",
        args.minutes,
        runtime
            .as_deref()
            .unwrap_or("no runtime reachable here, not run")
    );

    let stop = Arc::new(AtomicBool::new(false));
    let expected = Arc::new(Mutex::new(Expected::default()));
    let g = loadgen_bin.clone();
    let mut loops = vec![load_loop(
        stop.clone(),
        Duration::ZERO,
        expected.clone(),
        move |e| {
            let r = loadgen(&g, &["churn", "--secs", "20", "--comm", "pxhs-churn"])?;
            e.churn_connects += r["connects"].as_u64().unwrap_or(0);
            Ok(())
        },
    )];
    // The storms and the short-lived failing processes: one generator, two paces.
    for (comm, failures, every, short) in [
        ("pxhs-storm", STORM_FAILURES, 60, false),
        ("pxhs-short", SHORT_FAILURES, 7, true),
    ] {
        let g = loadgen_bin.clone();
        let n = failures.to_string();
        loops.push(load_loop(
            stop.clone(),
            Duration::from_secs(every),
            expected.clone(),
            move |e| {
                let r = loadgen(&g, &["storm", "--failures", &n, "--comm", comm])?;
                // +1: before its loop each storm proves its range full with one connect that
                // fails (not in its own count, which is the loop's); the tracer sees it too.
                e.failures += r["failures"].as_u64().unwrap_or(0) + 1;
                if short {
                    e.short_lived += 1;
                } else {
                    e.storms += 1;
                }
                Ok(())
            },
        ));
    }
    let g = loadgen_bin.clone();
    loops.push(load_loop(
        stop.clone(),
        Duration::from_secs(30),
        expected.clone(),
        move |e| {
            loadgen(
                &g,
                &[
                    "hold",
                    "--connections",
                    "1000",
                    "--churn-secs",
                    "10",
                    "--comm",
                    "pxhs-hold",
                ],
            )?;
            e.holds += 1;
            Ok(())
        },
    ));
    if let Some(rt) = runtime.clone() {
        loops.push(load_loop(
            stop.clone(),
            Duration::from_secs(60),
            expected.clone(),
            move |_| {
                // A container that connects in a loop and exits: the tracer's cgroup and
                // container names come and go with it.
                run_checked(Command::new(&rt).args([
                    "run",
                    "--rm",
                    "--network",
                    "none",
                    "busybox",
                    "sh",
                    "-c",
                    "for i in $(seq 200); do nc -w1 127.0.0.1 9 </dev/null; done; true",
                ]))
            },
        ));
    }

    let mut samples: Vec<Sample> = Vec::new();
    let end = Duration::from_secs_f64(args.minutes * 60.0);
    let mut last_cpu = proc_cpu_s(pid);
    let mut last_t = 0.0;
    while started.elapsed() < end {
        thread::sleep(SAMPLE_EVERY.min(end.saturating_sub(started.elapsed())));
        if let Ok(Some(status)) = tracer.0.try_wait() {
            stop.store(true, Ordering::Relaxed);
            bail!("the tracer exited during the soak: {status}");
        }
        let t = started.elapsed().as_secs_f64();
        let cpu = proc_cpu_s(pid);
        let totals = latest_totals(&record);
        let num = |k: &str| {
            totals
                .as_ref()
                .and_then(|v| v[k].as_u64())
                .unwrap_or_default()
        };
        let s = Sample {
            t_s: (t * 10.0).round() / 10.0,
            rss_kib: proc_rss_kib(pid),
            fds: proc_fds(pid),
            cpu_pct: if t > last_t {
                (cpu - last_cpu) / (t - last_t) * 100.0
            } else {
                0.0
            },
            cpu_total_s: cpu,
            record_bytes: record_bytes(&rec_dir),
            tracked_sockets: num("tracked_sockets"),
            lru_evictions: num("lru_evictions"),
            failures_total: num("failures_total"),
        };
        eprintln!(
            "xtask: soak: [{:>5.0}s] rss {} KiB, fds {}, cpu {:.1}%, record {} KiB, tracked {}, \
             failures {}",
            s.t_s,
            s.rss_kib,
            s.fds,
            s.cpu_pct,
            s.record_bytes / 1024,
            s.tracked_sockets,
            s.failures_total
        );
        last_cpu = cpu;
        last_t = t;
        samples.push(s);
    }
    stop.store(true, Ordering::Relaxed);
    let fds_at_end = fd_targets(pid);
    eprintln!("xtask: soak: stopping the load");
    for l in loops {
        let _ = l.join();
    }
    // SAFETY: signalling our own child, not yet reaped.
    unsafe { libc::kill(pid as i32, libc::SIGTERM) };
    let status = tracer.0.wait()?;
    let diagnostics = diag.join().unwrap_or_default();
    let summary = latest_totals(&record).context("the record has no summary")?;
    let expected = Arc::try_unwrap(expected)
        .map(|m| m.into_inner().unwrap_or_else(|p| p.into_inner()))
        .unwrap_or_default();

    // The checks.
    let mut failed: Vec<String> = Vec::new();
    if !status.success() {
        failed.push(format!("the tracer ended with {status}"));
    }
    if summary["type"] != "summary" {
        failed.push("the record ends without its summary".into());
    }
    for e in &expected.errors {
        failed.push(format!("load: {e}"));
    }
    let counted: u64 = summary["offenders"]
        .as_array()
        .map(|o| {
            o.iter()
                // The storms' and short-lived processes' own counts are the load's; the
                // churn and hold generators do not count what they may fail.
                .filter(|o| o["comm"] == "pxhs-storm" || o["comm"] == "pxhs-short")
                .map(|o| o["failures"].as_u64().unwrap_or(0))
                .sum()
        })
        .unwrap_or(0);
    if counted != expected.failures {
        failed.push(format!(
            "exact counts: the tracer counted {counted} failures of the load, the load saw {}",
            expected.failures
        ));
    }
    let warm = (samples.len() / 5).max(samples.iter().take_while(|s| s.t_s < 90.0).count());
    let steady = samples.get(warm..).unwrap_or_default();
    let (rss_fit, fd_fit) = if steady.len() >= 3 {
        let rss = fit(&steady
            .iter()
            .map(|s| (s.t_s, s.rss_kib as f64))
            .collect::<Vec<_>>());
        let fds = fit(&steady
            .iter()
            .map(|s| (s.t_s, s.fds as f64))
            .collect::<Vec<_>>());
        (Some(rss), Some(fds))
    } else {
        failed.push(format!(
            "only {} samples after warm-up: run for longer",
            steady.len()
        ));
        (None, None)
    };
    for (what, f) in [("RSS", &rss_fit), ("open fds", &fd_fit)] {
        if let Some(f) = f
            && f.growth_pct > MAX_GROWTH * 100.0
        {
            failed.push(format!(
                "{what} grew {:.1}% after warm-up (slope {:.2}/min over a mean of {:.0})",
                f.growth_pct, f.slope_per_min, f.mean
            ));
        }
    }
    let max_tracked = samples.iter().map(|s| s.tracked_sockets).max().unwrap_or(0);
    if max_tracked > MAX_TRACKED {
        failed.push(format!(
            "tracked sockets {max_tracked} above the LRU bound {MAX_TRACKED}"
        ));
    }

    let warmup_s = samples.get(warm).map_or(0.0, |s| s.t_s);
    std::fs::write(out_dir.join("soak.svg"), svg(&samples, warmup_s))?;
    let max_rss = samples.iter().map(|s| s.rss_kib).max().unwrap_or(0);
    let cpu_mean =
        samples.last().map_or(0.0, |s| s.cpu_total_s) / started.elapsed().as_secs_f64() * 100.0;
    let record_total = samples.last().map_or(0, |s| s.record_bytes);
    let mut md = String::new();
    let _ = writeln!(
        md,
        "| | |\n|---|---|\n| duration | {:.1} min, a sample every {} s, warm-up {:.0} s |\n\
         | load | {} storms of {STORM_FAILURES}, {} short-lived failing processes, {} churn \
         connects, {} hold cycles of 1,000 connections; containers: {} |\n\
         | exact counts | tracer {counted}, load {} ({}) |\n\
         | tracer RSS | peak {:.1} MiB; after warm-up {} |\n\
         | open fds | {} |\n\
         | tracer CPU | {:.2}% of one CPU on average |\n\
         | tracked sockets | {max_tracked} at most (bound {MAX_TRACKED}); LRU evictions {} |\n\
         | record | {:.1} MiB on disk at the end (rotated at 1 MiB, 3 kept) |\n\
         | result | {} |",
        args.minutes,
        SAMPLE_EVERY.as_secs(),
        warmup_s,
        expected.storms,
        expected.short_lived,
        expected.churn_connects,
        expected.holds,
        runtime
            .as_deref()
            .unwrap_or("no runtime reachable, not run"),
        expected.failures,
        if counted == expected.failures {
            "equal"
        } else {
            "DIFFERENT"
        },
        max_rss as f64 / 1024.0,
        rss_fit.as_ref().map_or("-".into(), |f| format!(
            "{:+.2}% over the run (slope {:+.1} KiB/min, mean {:.0} KiB)",
            f.growth_pct, f.slope_per_min, f.mean
        )),
        fd_fit.as_ref().map_or("-".into(), |f| format!(
            "{:+.2}% over the run (mean {:.1})",
            f.growth_pct, f.mean
        )),
        cpu_mean,
        samples.last().map_or(0, |s| s.lru_evictions),
        record_total as f64 / (1024.0 * 1024.0),
        if failed.is_empty() {
            "every check passed".to_string()
        } else {
            failed.join("; ")
        },
    );
    std::fs::write(out_dir.join("soak.md"), &md)?;
    #[derive(Serialize)]
    struct Out<'a> {
        minutes: f64,
        samples: &'a [Sample],
        rss: Option<Fit>,
        fds: Option<Fit>,
        expected_failures: u64,
        counted_failures: u64,
        failed: &'a [String],
        tracer_stderr_tail: Vec<&'a String>,
        tracer_fds_at_end: &'a std::collections::BTreeMap<String, u32>,
    }
    let out = Out {
        minutes: args.minutes,
        samples: &samples,
        rss: rss_fit,
        fds: fd_fit,
        expected_failures: expected.failures,
        counted_failures: counted,
        failed: &failed,
        tracer_stderr_tail: diagnostics.iter().rev().take(20).collect(),
        tracer_fds_at_end: &fds_at_end,
    };
    std::fs::write(
        out_dir.join("soak.json"),
        serde_json::to_string_pretty(&out)?,
    )?;
    println!("{md}");
    eprintln!(
        "xtask: soak: wrote {}/soak.md, soak.json and soak.svg",
        out_dir.display()
    );
    if !failed.is_empty() {
        bail!("soak failed: {}", failed.join("; "));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_flat_series_does_not_grow_and_a_rising_one_does() {
        let flat: Vec<(f64, f64)> = (0..10).map(|i| (i as f64 * 10.0, 100.0)).collect();
        assert!(fit(&flat).growth_pct.abs() < 1e-9);
        let rising: Vec<(f64, f64)> = (0..10)
            .map(|i| (i as f64 * 10.0, 100.0 + i as f64))
            .collect();
        let f = fit(&rising);
        // 9 over a mean of 104.5.
        assert!(
            (f.growth_pct - 9.0 / 104.5 * 100.0).abs() < 1e-6,
            "{}",
            f.growth_pct
        );
        assert!((f.slope_per_min - 6.0).abs() < 1e-9);
    }

    #[test]
    fn the_plot_has_both_panels() {
        let s: Vec<Sample> = (0..5)
            .map(|i| Sample {
                t_s: i as f64 * 10.0,
                rss_kib: 30_000 + i,
                fds: 40,
                cpu_pct: 1.0,
                cpu_total_s: i as f64,
                record_bytes: 0,
                tracked_sockets: 0,
                lru_evictions: 0,
                failures_total: 0,
            })
            .collect();
        let svg = svg(&s, 20.0);
        assert_eq!(svg.matches("<polyline").count(), 2);
        assert!(svg.contains("tracer RSS") && svg.contains("tracer CPU"));
    }
}
