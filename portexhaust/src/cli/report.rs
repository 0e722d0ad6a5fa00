//! `report`'s arguments.
use std::path::PathBuf;

use crate::schema::Ts;

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Format {
    /// For a terminal: the story, a sparkline, tables, findings.
    Text,
    /// One JSON object.
    Json,
    /// One self-contained HTML page with an inline SVG chart (no network needed to view it).
    Html,
}

/// Seconds since the epoch or RFC 3339 (`2026-11-25T11:20:00Z`).
pub fn parse_time(s: &str) -> Result<Ts, String> {
    if let Some(t) = Ts::parse_rfc3339(s) {
        return Ok(t);
    }
    match s.parse::<f64>() {
        Ok(secs) if secs.is_finite() && secs >= 0.0 => Ok(Ts((secs * 1e9) as i128)),
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

Input: records of `trace --record`, or the output of `trace --json` (the same lines without
snapshots), versions 1 and 2.

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
    pub since: Option<Ts>,
    /// Only failures at or before this time (RFC 3339 or seconds since the epoch).
    #[arg(long, value_name = "T", value_parser = parse_time)]
    pub until: Option<Ts>,
    /// Only this process id (repeatable).
    #[arg(long, value_name = "P")]
    pub pid: Vec<u32>,
    /// Write the report to OUT instead of stdout.
    #[arg(short = 'o', long = "output", value_name = "OUT")]
    pub output: Option<PathBuf>,
}
