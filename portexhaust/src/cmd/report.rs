//! `portexhaust report FILE...`: the blame report after the fact, from `trace --record` files
//! (or `trace --json` output, which is the same lines without the snapshots).
//!
//! Report is a replay: the schema's tolerant reader feeds each file's records, in order, to the
//! engine's [`Replay`] (the same counting code the live tracer's summary uses), the engine
//! combines the sessions (the counting rule is documented in `engine::report`), and an output
//! renders it. Offline: no BPF, no /proc, no namespaces.
#[cfg(test)]
mod fuzz;
#[cfg(test)]
mod inputs;
#[cfg(test)]
mod tests;

use thiserror::Error;

use crate::{
    cli::{Format, ReportArgs},
    engine::{
        report::{self, FileOut, Report},
        session::{Filter, Replay},
    },
    output::{html, report_text, stdout::print},
    schema::{
        Level, Problem,
        read::{order_key, read_file},
    },
};

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

/// Read, replay, combine and render. Returns the rendered report (its problems inside it).
pub fn build(args: &ReportArgs) -> Result<(String, Report), ReportError> {
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
    let mut replay = Replay::new(filter.clone());
    // The parts of a rotated record are replayed oldest first (FILE.2 FILE.1 FILE), whatever
    // order they were given in: by the start time and part of each file's first header (a
    // stable sort; files without one come first, as given).
    let mut paths: Vec<&std::path::PathBuf> = args.files.iter().collect();
    paths.sort_by_cached_key(|p| order_key(p));
    for path in paths {
        let before = replay.sessions.len();
        let f = read_file(path, &mut replay, &mut problems);
        files.push(FileOut {
            path: f.path.clone(),
            usable: f.usable,
            lines: f.lines,
            sessions: replay.sessions.len() - before,
        });
    }
    let sessions = replay.finish();
    if files.iter().all(|f| !f.usable) {
        // Notes and warnings first; the errors that made every file unusable become the one
        // error line.
        let (errors, rest): (Vec<&Problem>, Vec<&Problem>) =
            problems.iter().partition(|p| p.level == Level::Error);
        for p in rest {
            eprintln!("portexhaust: {}: {p}", p.level.name());
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
    let report = report::build(files, sessions, &filter, problems);
    let text = match args.format {
        Format::Text => report_text::render(&report),
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
        eprintln!("portexhaust: {}: {p}", p.level.name());
    }
    match &args.output {
        Some(path) => {
            std::fs::write(path, text.as_bytes()).map_err(|source| ReportError::Write {
                path: path.display().to_string(),
                source,
            })?
        }
        // A closed pipe (`| head`) is the reader's end, not an error.
        None => print(&text).map_err(|source| ReportError::Write {
            path: "stdout".into(),
            source,
        })?,
    }
    Ok(if report.files.iter().all(|f| f.usable) {
        0
    } else {
        2
    })
}
