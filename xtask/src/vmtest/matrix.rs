//! The kernel x backend matrix: a row per kernel, and the table and notes printed from them.
use std::{collections::BTreeMap, path::PathBuf};

use serde::Serialize;

use crate::vm::{
    kernels::KernelSpec,
    protocol::{Cell, Status},
};

#[derive(Debug, Serialize)]
pub(super) struct ExecResult {
    pub(super) command: String,
    pub(super) exit: Option<i32>,
    pub(super) output: String,
}

/// One kernel's row of the matrix, and everything known about its run.
#[derive(Debug, Serialize)]
pub(super) struct Row {
    pub(super) kernel: String,
    pub(super) suite: String,
    pub(super) package: Option<String>,
    pub(super) version: Option<String>,
    pub(super) release: Option<String>,
    /// Why the kernel could not be tested at all (fetch, image, boot, hang).
    pub(super) error: Option<String>,
    /// One word for `error`, shown in the matrix: no-kernel, fetch-failed, boot-failed, hung,
    /// crashed, error.
    pub(super) error_kind: Option<&'static str>,
    pub(super) boot_secs: Option<f64>,
    pub(super) run_secs: Option<f64>,
    pub(super) facts: BTreeMap<String, String>,
    pub(super) cells: BTreeMap<String, Cell>,
    /// `--exec` commands: (command, exit code, output).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub(super) exec: Vec<ExecResult>,
    /// Kernel warnings noticed on the console (BUG, WARNING, Oops), for information.
    pub(super) kernel_warnings: Vec<String>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub(super) console_tail: Vec<String>,
    #[serde(skip)]
    pub(super) logs: Option<PathBuf>,
}

impl Row {
    pub(super) fn new(spec: &KernelSpec) -> Self {
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
    pub(super) fn fail_row(&mut self, backends: &[String], kind: &'static str, why: &str) {
        self.error = Some(why.to_string());
        self.error_kind = Some(kind);
        for b in backends {
            self.cells
                .entry(b.clone())
                .or_insert_with(|| Cell::new(Status::NotRun, why));
        }
    }

    pub(super) fn ok(&self) -> bool {
        self.error.is_none()
            && self
                .cells
                .values()
                .all(|c| matches!(c.status, Status::Pass | Status::Unsupported))
    }
}

/// The matrix and the notes below it (stdout).
pub(super) fn render(rows: &[Row], backends: &[String], boot_only: bool) -> String {
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
