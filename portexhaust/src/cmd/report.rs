//! `portexhaust report FILE...`: the blame report after the fact, from `trace --record` files.
//!
//! Reading is in [`parse`] (tolerant, line-numbered problems), combining sessions in [`model`]
//! (the counting rule is documented there), rendering in [`text`] and [`html`]; JSON is the
//! [`model::Report`] itself.
pub mod html;
pub mod model;
pub mod parse;
#[cfg(test)]
mod tests;
pub mod text;

use std::{io::Write, path::PathBuf};

use thiserror::Error;

use parse::{Filter, Level, Problem};

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Format {
    /// For a terminal: the story, a sparkline, tables, findings.
    Text,
    /// One JSON object.
    Json,
    /// One self-contained HTML page with an inline SVG chart (no network needed to view it).
    Html,
}

/// Seconds since the epoch or RFC 3339 (`2026-11-25T11:20:00Z`) -> ns since the epoch.
pub fn parse_time(s: &str) -> Result<i128, String> {
    if let Some(t) = parse::parse_ts(s) {
        return Ok(t);
    }
    match s.parse::<f64>() {
        Ok(secs) if secs.is_finite() && secs >= 0.0 => Ok((secs * 1e9) as i128),
        _ => Err(format!(
            "{s:?} is not a time: use RFC 3339 (2026-11-25T11:20:00Z) or seconds since the epoch"
        )),
    }
}

const REPORT_HELP: &str = "\
Counting: a session (one tracer run) that ended cleanly is counted from its summary (exact
in-kernel counts). A tracer killed with SIGKILL is counted from its last snapshot (exact) plus the
failure lines it flushed after it; one killed before its first snapshot from its flushed failure
lines. Bad lines are reported as FILE:LINE and skipped; a cut last line is expected after a kill.

Exit status: 0 report written; 2 report written but some file could not be used; 1 nothing usable.

Examples:
  portexhaust report incident.ndjson
  portexhaust report node1.ndjson node2.ndjson --format html -o incident.html
  portexhaust report incident.ndjson --since 2026-11-25T11:20:00Z --pid 4242 --format json";

#[derive(clap::Args, Debug, Clone)]
#[command(after_help = REPORT_HELP)]
pub struct ReportArgs {
    /// Record files written by `portexhaust trace --record` (several are merged; `-` reads
    /// standard input).
    #[arg(required = true, value_name = "FILE")]
    pub files: Vec<PathBuf>,
    /// Output format.
    #[arg(long, value_enum, default_value = "text")]
    pub format: Format,
    /// Only failures at or after this time (RFC 3339 or seconds since the epoch).
    #[arg(long, value_name = "T", value_parser = parse_time)]
    pub since: Option<i128>,
    /// Only failures at or before this time (RFC 3339 or seconds since the epoch).
    #[arg(long, value_name = "T", value_parser = parse_time)]
    pub until: Option<i128>,
    /// Only this process id (repeatable).
    #[arg(long, value_name = "P")]
    pub pid: Vec<u32>,
    /// Write the report to OUT instead of stdout.
    #[arg(short = 'o', long = "output", value_name = "OUT")]
    pub output: Option<PathBuf>,
}

#[derive(Debug, Error)]
pub enum ReportError {
    #[error("--since is later than --until")]
    EmptyWindow,
    #[error("nothing to report: {0}")]
    NothingUsable(String),
    #[error("writing {path}: {source}")]
    Write {
        path: String,
        #[source]
        source: std::io::Error,
    },
}

/// Read, combine and render. Returns the rendered report (its problems inside it).
pub fn build(args: &ReportArgs) -> Result<(String, model::Report), ReportError> {
    if let (Some(a), Some(b)) = (args.since, args.until)
        && a > b
    {
        return Err(ReportError::EmptyWindow);
    }
    let filter = Filter {
        since: args.since,
        until: args.until,
        pids: args.pid.clone(),
    };
    let mut problems: Vec<Problem> = Vec::new();
    let mut files = Vec::new();
    let mut sessions = Vec::new();
    for path in &args.files {
        let f = parse::read_file(path, &filter, &mut problems);
        files.push(model::FileOut {
            path: f.path.clone(),
            usable: f.usable,
            lines: f.lines,
            sessions: f.sessions.len(),
        });
        sessions.extend(f.sessions);
    }
    if files.iter().all(|f| !f.usable) {
        // Notes and warnings first; the errors that made every file unusable become the one
        // error line.
        let (errors, rest): (Vec<&Problem>, Vec<&Problem>) =
            problems.iter().partition(|p| p.level == Level::Error);
        for p in rest {
            eprintln!("portexhaust: {}: {p}", p.level_name());
        }
        let msg = errors
            .iter()
            .map(|p| p.to_string())
            .collect::<Vec<_>>()
            .join("; ");
        return Err(ReportError::NothingUsable(if msg.is_empty() {
            "no records".into()
        } else {
            msg
        }));
    }
    let report = model::build(files, sessions, &filter, problems);
    let text = match args.format {
        Format::Text => text::render(&report),
        Format::Json => serde_json::to_string(&report).unwrap_or_default() + "\n",
        Format::Html => html::render(&report),
    };
    Ok((text, report))
}

/// `portexhaust report`: problems on stderr, the report on stdout or in OUT. Returns the exit
/// status documented in `--help`.
pub fn run(args: &ReportArgs) -> Result<u8, ReportError> {
    let (text, report) = build(args)?;
    for p in &report.problems {
        eprintln!("portexhaust: {}: {p}", p.level_name());
    }
    match &args.output {
        Some(path) => {
            std::fs::write(path, text.as_bytes()).map_err(|source| ReportError::Write {
                path: path.display().to_string(),
                source,
            })?
        }
        None => {
            let mut out = std::io::stdout().lock();
            // A closed pipe (`| head`) is not an error worth reporting.
            let _ = out.write_all(text.as_bytes()).and_then(|()| out.flush());
        }
    }
    Ok(if report.files.iter().all(|f| f.usable) {
        0
    } else {
        2
    })
}

impl Problem {
    pub fn level_name(&self) -> &'static str {
        match self.level {
            Level::Note => "note",
            Level::Warning => "warning",
            Level::Error => "error",
        }
    }
}
