//! What the report says of a session besides its counts: a rotated record whose first parts
//! are missing, and the gaps a full disk left.
use super::GapOut;
use crate::{
    engine::session::Session,
    schema::{Level, Problem},
};

/// Notes on `s` (of `host`) into `problems`, its gaps into `gaps`.
pub(super) fn notes(s: &Session, host: &str, problems: &mut Vec<Problem>, gaps: &mut Vec<GapOut>) {
    if let Some(p) = s.first_part.filter(|p| *p > 0) {
        problems.push(Problem {
            file: s.file.clone(),
            line: s.header_line,
            level: Level::Note,
            message: format!(
                "starts at part {p} of a rotated record: the earlier parts were not given \
                 (or were rotated away); the counts are still the run's own since it \
                 started (snapshots are cumulative), the timeline covers the lines given"
            ),
        });
    }
    for (line, file, g) in &s.gaps {
        problems.push(Problem {
            file: file.clone(),
            line: *line,
            level: Level::Note,
            message: format!(
                "a gap in the record from {} to {} ({}): {} line(s) not written, {} \
                 snapshot(s) among them; the {} failure(s) of those lines are in the tally \
                 lines after it, and the counts stay exact",
                g.from_ts, g.until_ts, g.error, g.lines, g.snapshots, g.failures
            ),
        });
        gaps.push(GapOut {
            host: host.to_string(),
            file: file.clone(),
            line: *line,
            gap: g.clone(),
        });
    }
}
