//! What a bench run produces, as written to results.json and vm-results.json: the runs, their
//! summaries and verdicts, and the VM kernels' rows. Plain data, shared by the modules that
//! fill it in (bench.rs, guest.rs, vm.rs) and by report.rs, which renders it: report.rs needs
//! nothing from them, so vm.rs can use report.rs without a cycle.
use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::{plan::Plan, stats::Spread, sys};

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

/// Median and spread of one metric of one scenario under one variant.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Row {
    pub scenario: String,
    pub variant: String,
    pub metric: String,
    #[serde(flatten)]
    pub spread: Spread,
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
    pub summary: Vec<Row>,
    pub targets: Vec<Target>,
    pub failed_runs: Vec<String>,
    pub runs: Vec<Run>,
}

/// All kernels' bench results (`bench/vm-results.json`).
#[derive(Debug, Serialize, Deserialize)]
pub struct VmResults {
    pub schema: u32,
    /// The host the guests ran on (under TCG).
    pub host: sys::Machine,
    pub qemu: Option<String>,
    pub kernels: Vec<VmKernel>,
}

/// One kernel's boot and what its guest measured.
#[derive(Debug, Serialize, Deserialize)]
pub struct VmKernel {
    pub label: String,
    pub suite: String,
    pub date: String,
    pub git: String,
    pub package: Option<String>,
    pub version: Option<String>,
    pub release: Option<String>,
    pub memory_mb: u32,
    pub smp: u32,
    pub initramfs_mib: Option<f64>,
    /// Seconds from QEMU's start to /init's first record, and to power-off.
    pub boot_secs: Option<f64>,
    pub run_secs: Option<f64>,
    /// The host's load average before and after this guest ran.
    pub host_loadavg: [[f64; 3]; 2],
    /// What went wrong with the boot or the guest's harness, if anything.
    pub error: Option<String>,
    /// The guest's own results (None if it never sent them).
    pub results: Option<Results>,
}
