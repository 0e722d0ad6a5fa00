//! Reading records back: line by line, tolerant of everything a real outage produces (a tracer
//! killed mid-write, files concatenated or edited by hand, the wrong file passed). Every problem
//! is reported as `file:line: reason` and the rest of the data is still used; nothing here
//! panics on input (see the property tests of `report`).
//!
//! The reader only decodes: each good line becomes a [`Record`] handed to a [`Sink`] (the
//! engine's replay), in file order. A bad entry inside a line (one holder of a snapshot, one
//! tally of a version 1 `suppressed` line) is named and dropped; the rest of the line is kept.
use std::{
    borrow::Cow,
    fs::File,
    io::{BufRead, BufReader, Read},
    path::Path,
};

use serde::de::DeserializeOwned;
use serde_json::Value;

use super::{
    BlameEntry, DestRow, Failure, Gap, Header, Level, Offender, Problem, READS, Record, Suppressed,
    SysctlsLine, Tally, Totals, Ts,
};

/// Longest line accepted; longer ones are skipped (no record line comes close).
pub const MAX_LINE: usize = 4 << 20;
/// Line problems reported per file; the rest are counted.
const MAX_PROBLEMS: usize = 20;

/// The problems of one file, with the per-file limit on line problems.
pub struct Problems<'a> {
    file: String,
    out: &'a mut Vec<Problem>,
    line_problems: usize,
    unshown: usize,
}

impl Problems<'_> {
    pub fn file(&self) -> &str {
        &self.file
    }

    pub fn add(&mut self, line: Option<u64>, level: Level, message: String) {
        if line.is_some() && level > Level::Note {
            self.line_problems += 1;
            if self.line_problems > MAX_PROBLEMS {
                self.unshown += 1;
                return;
            }
        }
        self.out.push(Problem {
            file: self.file.clone(),
            line,
            level,
            message,
        });
    }

    fn has_error(&self) -> bool {
        self.out
            .iter()
            .any(|p| p.file == self.file && p.level == Level::Error)
    }
}

/// Where the records of a file go.
pub trait Sink {
    /// A new file begins (its sessions are its own).
    fn begin_file(&mut self, name: &str);
    /// One good line.
    fn record(&mut self, line: u64, rec: Record<'static>, problems: &mut Problems<'_>);
    /// The file is done.
    fn end_file(&mut self, problems: &mut Problems<'_>);
}

/// The outcome of reading one file.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct FileRead {
    pub path: String,
    pub lines: u64,
    /// False when nothing in the file could be used (missing, empty, binary, unknown version).
    pub usable: bool,
}

/// Strip serde_json's " at line 1 column 42": the position inside one line helps nobody.
pub fn json_reason(e: &serde_json::Error) -> String {
    let s = e.to_string();
    match s.find(" at line ") {
        Some(i) => s[..i].to_string(),
        None => s,
    }
}

/// Keep the entries of array `field` of `v` that decode as `T`; name the others.
fn keep_good<T: DeserializeOwned>(
    v: &mut Value,
    field: &str,
    what: &str,
    line: u64,
    problems: &mut Problems<'_>,
) {
    let Some(Value::Array(items)) = v.get_mut(field) else {
        return;
    };
    let mut i = 0;
    items.retain(|item| {
        let keep = match serde_json::from_value::<T>(item.clone()) {
            Ok(_) => true,
            Err(e) => {
                problems.add(
                    Some(line),
                    Level::Warning,
                    format!("{what} {i}: {} (skipped)", json_reason(&e)),
                );
                false
            }
        };
        i += 1;
        keep
    });
}

struct Reader<'a, 'p, S: Sink> {
    sink: &'a mut S,
    problems: Problems<'p>,
    /// Inside a session whose header was refused (unknown version): its lines are skipped.
    skipping: bool,
    skipped: u64,
    delivered: u64,
}

impl<S: Sink> Reader<'_, '_, S> {
    fn deliver(&mut self, n: u64, rec: Record<'static>) {
        self.delivered += 1;
        self.sink.record(n, rec, &mut self.problems);
    }

    fn warn(&mut self, n: u64, message: String) {
        self.problems.add(Some(n), Level::Warning, message);
    }

    fn header(&mut self, n: u64, v: Value) {
        let version = v.get("version").cloned();
        match version.as_ref().and_then(Value::as_u64) {
            Some(ver) if READS.contains(&ver) => {}
            Some(other) => {
                self.problems.add(
                    Some(n),
                    Level::Error,
                    format!(
                        "record version {other} is not supported (this portexhaust reads \
                         versions {}); this session is skipped",
                        READS.map(|r| r.to_string()).join(" and ")
                    ),
                );
                self.skipping = true;
                return;
            }
            None => {
                self.problems.add(
                    Some(n),
                    Level::Error,
                    format!(
                        "header has no valid version ({}); this session is skipped",
                        version.map_or("missing".to_string(), |v| v.to_string())
                    ),
                );
                self.skipping = true;
                return;
            }
        }
        self.skipping = false;
        let mut v = v;
        keep_good::<DestRow>(&mut v, "census", "header census row", n, &mut self.problems);
        let h = match serde_json::from_value::<Header>(v.clone()) {
            Ok(h) => h,
            Err(e) => {
                self.warn(
                    n,
                    format!(
                        "header: {}; its events are reported without host and settings",
                        json_reason(&e)
                    ),
                );
                Header {
                    version: version.and_then(|v| v.as_u64()).unwrap_or(1),
                    ..Default::default()
                }
            }
        };
        self.deliver(n, Record::Header(Cow::Owned(h)));
    }

    fn totals(&mut self, n: u64, mut v: Value, kind: &str) -> Option<Totals> {
        keep_good::<Offender>(
            &mut v,
            "offenders",
            &format!("{kind} offender"),
            n,
            &mut self.problems,
        );
        keep_good::<BlameEntry>(
            &mut v,
            "blame",
            &format!("{kind} blame entry"),
            n,
            &mut self.problems,
        );
        keep_good::<DestRow>(
            &mut v,
            "destinations",
            &format!("{kind} destination row"),
            n,
            &mut self.problems,
        );
        match serde_json::from_value::<Totals>(v) {
            Ok(t) => Some(t),
            Err(e) => {
                self.warn(n, format!("{kind} record: {} (skipped)", json_reason(&e)));
                None
            }
        }
    }

    fn whole<T: DeserializeOwned>(&mut self, n: u64, v: Value, kind: &str) -> Option<T> {
        match serde_json::from_value::<T>(v) {
            Ok(t) => Some(t),
            Err(e) => {
                self.warn(n, format!("{kind} record: {} (skipped)", json_reason(&e)));
                None
            }
        }
    }

    fn typed(&mut self, n: u64, kind: &str, mut v: Value) {
        match kind {
            "failure" => {
                if let Some(f) = self.whole::<Failure>(n, v, "failure") {
                    self.deliver(n, Record::Failure(Cow::Owned(f)));
                }
            }
            "tally" => {
                if let Some(t) = self.whole::<Tally>(n, v, "tally") {
                    self.deliver(n, Record::Tally(Cow::Owned(t)));
                }
            }
            "suppressed" => {
                if !matches!(v.get("events"), Some(Value::Array(_))) {
                    self.warn(
                        n,
                        "suppressed record without an \"events\" array (skipped)".into(),
                    );
                    return;
                }
                keep_good::<Tally>(&mut v, "events", "suppressed entry", n, &mut self.problems);
                if let Some(s) = self.whole::<Suppressed>(n, v, "suppressed") {
                    self.deliver(n, Record::Suppressed(Cow::Owned(s)));
                }
            }
            "snapshot" => {
                if let Some(t) = self.totals(n, v, "snapshot") {
                    self.deliver(n, Record::Snapshot(Cow::Owned(t)));
                }
            }
            "summary" => {
                if let Some(t) = self.totals(n, v, "summary") {
                    self.deliver(n, Record::Summary(Cow::Owned(t)));
                }
            }
            "gap" => {
                if let Some(g) = self.whole::<Gap>(n, v, "gap") {
                    self.deliver(n, Record::Gap(Cow::Owned(g)));
                }
            }
            "sysctls" => {
                keep_good::<DestRow>(
                    &mut v,
                    "census",
                    "sysctls census row",
                    n,
                    &mut self.problems,
                );
                if let Some(s) = self.whole::<SysctlsLine>(n, v, "sysctls") {
                    self.deliver(n, Record::Sysctls(Cow::Owned(s)));
                }
            }
            other => self.warn(n, format!("unknown record type {other:?} (skipped)")),
        }
    }

    /// One complete line. `last_cut`: the file ends without a newline after it.
    fn line(&mut self, n: u64, bytes: &[u8], last_cut: bool) {
        let text = match std::str::from_utf8(bytes) {
            Ok(t) if !t.contains('\0') => t.trim(),
            _ => {
                if last_cut {
                    self.problems.add(
                        Some(n),
                        Level::Note,
                        "the file ends in binary data (NULs: it was not fully written before a \
                         crash); ignored"
                            .into(),
                    );
                } else {
                    self.warn(n, "binary data, not a JSON line (skipped)".into());
                }
                return;
            }
        };
        if text.is_empty() {
            return;
        }
        let v: Value = match serde_json::from_str(text) {
            Ok(v @ Value::Object(_)) => v,
            Ok(_) => {
                self.warn(n, "not a JSON object (skipped)".into());
                return;
            }
            Err(e) => {
                if last_cut {
                    self.problems.add(
                        Some(n),
                        Level::Note,
                        "the last line is cut off (the tracer stopped mid-write); ignored".into(),
                    );
                } else {
                    self.warn(n, format!("not valid JSON: {} (skipped)", json_reason(&e)));
                }
                return;
            }
        };
        let kind = v.get("type").and_then(Value::as_str).map(str::to_string);
        match kind.as_deref() {
            Some("header") => self.header(n, v),
            _ if self.skipping => self.skipped += 1,
            Some(k) => self.typed(n, k, v),
            None => self.warn(n, "record without a \"type\" (skipped)".into()),
        }
    }
}

/// Read lines of at most [`MAX_LINE`] bytes; `f(line_no, bytes, terminated, too_long)`.
fn for_each_line(
    r: &mut impl BufRead,
    mut f: impl FnMut(u64, &[u8], bool, bool),
) -> std::io::Result<u64> {
    let mut buf: Vec<u8> = Vec::new();
    let mut n = 0u64;
    let mut too_long = false;
    loop {
        let chunk = r.fill_buf()?;
        if chunk.is_empty() {
            if !buf.is_empty() || too_long {
                n += 1;
                f(n, &buf, false, too_long);
            }
            return Ok(n);
        }
        let (take, done) = match chunk.iter().position(|&b| b == b'\n') {
            Some(i) => (i + 1, true),
            None => (chunk.len(), false),
        };
        let body = if done { &chunk[..take - 1] } else { chunk };
        if buf.len() + body.len() > MAX_LINE {
            too_long = true;
        } else if !too_long {
            buf.extend_from_slice(body);
        }
        r.consume(take);
        if done {
            n += 1;
            f(n, &buf, true, too_long);
            buf.clear();
            too_long = false;
        }
    }
}

/// Read one record file (`-`: standard input) into `sink`. Problems go to `problems`.
pub fn read_file(path: &Path, sink: &mut impl Sink, problems: &mut Vec<Problem>) -> FileRead {
    if path == Path::new("-") {
        return read_from("<stdin>", std::io::stdin().lock(), sink, problems);
    }
    let name = path.display().to_string();
    let err = |problems: &mut Vec<Problem>, message: String| {
        problems.push(Problem {
            file: name.clone(),
            line: None,
            level: Level::Error,
            message,
        })
    };
    let out = FileRead {
        path: name.clone(),
        ..Default::default()
    };
    let file = match File::open(path) {
        Ok(f) => f,
        Err(e) => {
            err(problems, format!("cannot open: {e}"));
            return out;
        }
    };
    if file.metadata().is_ok_and(|m| m.is_dir()) {
        err(problems, "is a directory, not a record file".into());
        return out;
    }
    read_from(&name, file, sink, problems)
}

/// Where a file belongs among the parts of rotated records: its first header's start time
/// and part. None for standard input, and for a file that does not start with a header.
pub fn order_key(path: &Path) -> Option<(Ts, u32)> {
    #[derive(serde::Deserialize)]
    struct Peek {
        #[serde(rename = "type")]
        kind: String,
        #[serde(default)]
        start_ts: Option<Ts>,
        #[serde(default)]
        part: Option<u32>,
    }
    if path == Path::new("-") {
        return None;
    }
    let mut first = Vec::new();
    BufReader::new(File::open(path).ok()?)
        .take(MAX_LINE as u64)
        .read_until(b'\n', &mut first)
        .ok()?;
    let p: Peek = serde_json::from_slice(&first).ok()?;
    (p.kind == "header").then_some((p.start_ts?, p.part.unwrap_or(0)))
}

/// Refuse the wrong file (a pcap, a tarball, a core dump) before a flood of bad lines.
fn looks_like_a_record(r: &mut impl BufRead) -> Result<(), String> {
    match r.fill_buf() {
        Ok([]) => Err("is empty: no header, nothing to report".into()),
        Ok(head) => {
            let head = &head[..head.len().min(4096)];
            let first_line = head.split(|&b| b == b'\n').next().unwrap_or(&[]);
            // Only the first line decides: a record whose tail is NULs (a crash before the
            // file system wrote the data) is still a record.
            if first_line.contains(&0) || std::str::from_utf8(first_line).is_err() {
                return Err(
                    "binary data: not a portexhaust record (NDJSON from `trace --record`)".into(),
                );
            }
            let t = String::from_utf8_lossy(first_line);
            let t = t.trim_start();
            if !t.is_empty() && !t.starts_with('{') {
                let shown: String = t.chars().take(40).collect();
                return Err(format!(
                    "line 1 is not JSON ({shown:?}...): not a portexhaust record (NDJSON from \
                     `trace --record`)"
                ));
            }
            Ok(())
        }
        Err(e) => Err(format!("cannot read: {e}")),
    }
}

/// Read a record from any byte stream, reporting problems under `name`.
pub fn read_from(
    name: &str,
    src: impl Read,
    sink: &mut impl Sink,
    problems: &mut Vec<Problem>,
) -> FileRead {
    let mut out = FileRead {
        path: name.to_string(),
        ..Default::default()
    };
    let mut r = BufReader::with_capacity(256 * 1024, src);
    if let Err(message) = looks_like_a_record(&mut r) {
        problems.push(Problem {
            file: name.to_string(),
            line: None,
            level: Level::Error,
            message,
        });
        return out;
    }
    sink.begin_file(name);
    let mut rd = Reader {
        sink,
        problems: Problems {
            file: name.to_string(),
            out: problems,
            line_problems: 0,
            unshown: 0,
        },
        skipping: false,
        skipped: 0,
        delivered: 0,
    };
    let res = for_each_line(&mut r, |n, bytes, terminated, too_long| {
        if too_long {
            rd.warn(
                n,
                format!("line longer than {} MiB (skipped)", MAX_LINE >> 20),
            );
        } else {
            rd.line(n, bytes, !terminated);
        }
    });
    match res {
        Ok(n) => out.lines = n,
        Err(e) => rd.problems.add(
            None,
            Level::Error,
            format!("read error: {e}; the rest is lost"),
        ),
    }
    if rd.problems.unshown > 0 {
        let n = rd.problems.unshown;
        rd.problems.add(
            None,
            Level::Warning,
            format!("{n} more bad lines not shown"),
        );
    }
    rd.sink.end_file(&mut rd.problems);
    if rd.skipped > 0 {
        let n = rd.skipped;
        rd.problems.add(
            None,
            Level::Note,
            format!("{n} lines of unsupported sessions skipped"),
        );
    }
    if rd.delivered == 0 {
        if !rd.problems.has_error() {
            rd.problems.add(
                None,
                Level::Error,
                "no portexhaust records in this file".into(),
            );
        }
        return out;
    }
    out.usable = true;
    out
}
