//! The half of `cargo xtask bench --vm` that runs inside the guest: this very binary, copied
//! into the initramfs and started by /init as `pxh-xtask bench-guest`. It runs the same
//! scenario code as the bench on the host (same load generators, same tracer handling, same
//! exactness checks), so that the guest's ratios compare like with like, and writes a
//! [`Results`] for the host to collect over the serial port.
use std::{path::PathBuf, time::Instant};

use anyhow::{Context as _, Result};
use serde::{Deserialize, Serialize};

use super::{
    ScenarioArg, now_rfc3339,
    offer::discover,
    plan::Plan,
    procs::{Tracer, TracerKind},
    read_json,
    results::Results,
    scenarios::{Ctx, GUEST_READY_TIMEOUT},
    schedule::run_plan,
    sys,
    variants::{Sets, Variant},
    write_json,
};

/// What the host tells the guest to do (`/vmtest/bench-plan.json`).
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct GuestPlan {
    pub plan: Plan,
    /// Scenarios to run (`churn`, `storm`); the plan's sizes say how much.
    pub scenarios: Vec<String>,
    pub portexhaust: PathBuf,
    pub loadgen: PathBuf,
    /// Whether the host put bpftrace into the image, or why it did not.
    pub bpftrace: Result<(), String>,
    /// The host's revision, so that the guest's results name the code they measured.
    pub git: String,
}

impl GuestPlan {
    fn wants(&self, s: ScenarioArg) -> bool {
        let name = match s {
            ScenarioArg::Churn => "churn",
            ScenarioArg::Storm => "storm",
            ScenarioArg::Storm2 => "storm2",
            ScenarioArg::Scale => "scale",
            ScenarioArg::Profile => "profile",
            ScenarioArg::Start => "start",
        };
        self.scenarios.iter().any(|w| w == name)
    }
}

#[derive(clap::Args, Debug)]
pub struct GuestArgs {
    /// The plan the host wrote (JSON).
    #[arg(long)]
    plan: PathBuf,
    /// Where to write the results (JSON).
    #[arg(long)]
    out: PathBuf,
    /// Also write progress here as `@@PXH-LOG ...@@` lines (the guest's results port).
    #[arg(long)]
    log: Option<PathBuf>,
}

/// Start bpftrace once with the bench's one-liner: whether it attaches in this kernel, and
/// why not if it does not.
fn bpftrace_works(ctx: &Ctx) -> Result<String, String> {
    let version = super::command_line("bpftrace", &["--version"])
        .ok_or_else(|| "bpftrace is in the image but `bpftrace --version` failed".to_string())?;
    let t = Tracer::start(TracerKind::Bpftrace, &ctx.portexhaust, ctx.ready_timeout)
        .map_err(|e| format!("bpftrace {version} did not attach the one-liner: {e:#}"))?;
    let ready = t.ready_after;
    let stopped = t
        .stop()
        .map_err(|e| format!("bpftrace {version} could not be stopped: {e:#}"))?;
    if stopped.exit.code != Some(0) {
        return Err(format!(
            "bpftrace {version} attached but exited with {:?}: {}",
            stopped.exit.code,
            stopped.stderr.lines().last().unwrap_or("")
        ));
    }
    ctx.say(&format!(
        "bpftrace {version} attaches here (ready after {:.1} s)",
        ready.as_secs_f64()
    ));
    Ok(version)
}

pub fn bench_guest(args: &GuestArgs) -> Result<()> {
    let gp: GuestPlan = read_json(&args.plan)?;
    let ctx = Ctx {
        portexhaust: gp.portexhaust.clone(),
        loadgen: gp.loadgen.clone(),
        plan: gp.plan.clone(),
        ready_timeout: GUEST_READY_TIMEOUT,
        log: args.log.clone(),
    };
    let started = Instant::now();
    let loadavg_start = sys::loadavg();
    let date = now_rfc3339();
    let offer = discover(&ctx.portexhaust)?;
    ctx.say(&format!(
        "backends that load here: {}; default: {}; --catch offered: {}",
        offer.backends_ran.join(", "),
        offer.default_backend.as_deref().unwrap_or("?"),
        offer.catch
    ));
    for (b, why) in &offer.backends_skipped {
        ctx.say(&format!("backend {b} skipped: {why}"));
    }
    let (bpftrace, bpftrace_skipped) = match &gp.bpftrace {
        Err(why) => (None, Some(why.clone())),
        Ok(()) => match bpftrace_works(&ctx) {
            Ok(v) => (Some(v), None),
            Err(why) => {
                ctx.say(&format!("bpftrace skipped: {why}"));
                (None, Some(why))
            }
        },
    };
    // No diagnostics variants in a guest: every run costs seconds under emulation.
    let sets = Sets::new(&offer, bpftrace.is_some(), false);
    ctx.say(&format!(
        "variants: {}",
        sets.storm
            .iter()
            .map(Variant::name)
            .collect::<Vec<_>>()
            .join(", ")
    ));
    let (runs, failed) = run_plan(&ctx, &sets, &|s| gp.wants(s), started);
    let mut results = Results {
        schema: 2,
        date,
        machine: sys::machine(),
        git: gp.git.clone(),
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
    // The host has the full picture (bpftrace maps and the loads' reports are not needed
    // there, and every byte crosses an emulated serial port).
    for r in &mut results.runs {
        r.detail = serde_json::Value::Null;
    }
    write_json(&args.out, &results).with_context(|| "writing the guest's results")?;
    ctx.say(&format!(
        "guest bench done in {:.0} s ({} runs, {} failed)",
        results.elapsed_s,
        results.runs.len(),
        results.failed_runs.len()
    ));
    Ok(())
}

/// The guest's paths of the programs the host puts into the image.
pub const GUEST_PORTEXHAUST: &str = "/usr/bin/portexhaust";
pub const GUEST_LOADGEN: &str = "/usr/bin/pxh-loadgen";
pub const GUEST_XTASK: &str = "/usr/bin/pxh-xtask";
pub const GUEST_BPFTRACE: &str = "/usr/bin/bpftrace";
