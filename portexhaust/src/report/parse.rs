//! Reading incident records: line by line, tolerant of everything a real outage produces
//! (a tracer killed mid-write, files concatenated or edited by hand, the wrong file passed).
//! Every problem is reported as `file:line: reason` and the rest of the data is still used;
//! nothing here panics on input (see the property tests).
//!
//! Lines are aggregated as they are read (counts per key, failures per second) so a long
//! incident is reported without holding every event in memory.
use std::{
    collections::{BTreeMap, HashMap},
    fmt,
    fs::File,
    io::{BufRead, BufReader, Read},
    path::Path,
};

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::{
    doctor::Evidence,
    record::{Header, RECORD_VERSION, SuppressedEntry, SysctlsLine},
    sysctl::NetSysctls,
    usage::DestRow,
};

/// Longest line accepted; longer ones are skipped (no record line comes close).
pub const MAX_LINE: usize = 4 << 20;
/// Line problems reported per file; the rest are counted.
const MAX_PROBLEMS: usize = 20;

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Level {
    Note,
    Warning,
    Error,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Problem {
    pub file: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub line: Option<u64>,
    pub level: Level,
    pub message: String,
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.line {
            Some(l) => write!(f, "{}:{l}: {}", self.file, self.message),
            None => write!(f, "{}: {}", self.file, self.message),
        }
    }
}

/// What the report is restricted to.
#[derive(Clone, Debug, Default)]
pub struct Filter {
    pub since: Option<i128>,
    pub until: Option<i128>,
    pub pids: Vec<u32>,
}

impl Filter {
    pub fn time_ok(&self, ts: i128) -> bool {
        self.since.is_none_or(|s| ts >= s) && self.until.is_none_or(|u| ts <= u)
    }
    pub fn pid_ok(&self, pid: u32) -> bool {
        self.pids.is_empty() || self.pids.contains(&pid)
    }
    pub fn windowed(&self) -> bool {
        self.since.is_some() || self.until.is_some()
    }
}

/// RFC 3339 -> nanoseconds since the epoch.
pub fn parse_ts(s: &str) -> Option<i128> {
    time::OffsetDateTime::parse(s, &time::format_description::well_known::Rfc3339)
        .ok()
        .map(|t| t.unix_timestamp_nanos())
}

/// A failure line as `trace --json` prints it. Only what a report needs is required.
#[derive(Clone, Debug, Deserialize)]
pub struct FailureRec {
    pub ts: String,
    pub pid: u32,
    #[serde(default)]
    pub comm: String,
    #[serde(default)]
    pub netns: Option<u64>,
    #[serde(default)]
    pub proto: Option<String>,
    pub dst: String,
    pub errno: u32,
}

#[derive(Clone, Debug, Deserialize, Serialize)]
pub struct DestCountRec {
    pub dst: String,
    pub errno: u32,
    pub failures: u64,
}

#[derive(Clone, Debug, Deserialize)]
pub struct OffenderRec {
    pub pid: u32,
    #[serde(default)]
    pub comm: String,
    pub failures: u64,
    #[serde(default)]
    pub first_ts: Option<String>,
    #[serde(default)]
    pub last_ts: Option<String>,
    #[serde(default)]
    pub destinations: Vec<DestCountRec>,
}

#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq)]
pub struct PidCount {
    #[serde(default)]
    pub pid: u32,
    #[serde(default)]
    pub comm: String,
    #[serde(default)]
    pub failures: u64,
}

#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq)]
pub struct HolderRec {
    #[serde(default)]
    pub pid: u32,
    #[serde(default)]
    pub comm: String,
    #[serde(default)]
    pub alive: Option<bool>,
    #[serde(default)]
    pub sockets: u64,
    #[serde(default)]
    pub time_wait: u64,
}

/// One entry of the summary's `blame` array (who failed, who held the ports).
#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq)]
pub struct BlameRec {
    #[serde(default)]
    pub dst: String,
    #[serde(default)]
    pub netns: Option<u64>,
    #[serde(default)]
    pub range_size: u64,
    #[serde(default)]
    pub in_use: u64,
    #[serde(default)]
    pub by_state: BTreeMap<String, u64>,
    #[serde(default)]
    pub failers: Vec<PidCount>,
    #[serde(default)]
    pub holders: Vec<HolderRec>,
}

/// A snapshot or the summary: exact in-kernel counts at one moment.
#[derive(Clone, Debug, Deserialize)]
pub struct CountsRec {
    #[serde(default)]
    pub ts: Option<String>,
    pub failures_total: u64,
    #[serde(default)]
    pub dropped_events: u64,
    #[serde(default)]
    pub duration_s: Option<f64>,
    #[serde(default)]
    pub offenders: Vec<OffenderRec>,
    #[serde(default)]
    pub blame: Vec<Value>,
    #[serde(default)]
    pub destinations: Vec<Value>,
}

/// A parsed snapshot or summary.
#[derive(Clone, Debug)]
pub struct Counts {
    pub line: u64,
    pub ts: Option<i128>,
    pub failures_total: u64,
    pub dropped_events: u64,
    pub duration_s: Option<f64>,
    pub offenders: Vec<OffenderRec>,
    pub blame: Vec<BlameRec>,
    pub destinations: Vec<DestRow>,
    /// Latest failure the kernel had counted, per pid (from the offenders' `last_ts`).
    pub last_per_pid: HashMap<u32, i128>,
}

/// (pid, destination, errno): the key of the kernel's counts.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Key {
    pub pid: u32,
    pub dst: String,
    pub errno: u32,
}

#[derive(Clone, Debug, Default)]
pub struct KeyAcc {
    pub count: u64,
    pub first: Option<i128>,
    pub last: Option<i128>,
    pub comm: String,
}

impl KeyAcc {
    pub fn add(&mut self, ts: i128, comm: &str) {
        self.add_n(1, ts, ts, comm);
    }

    pub fn add_n(&mut self, n: u64, first: i128, last: i128, comm: &str) {
        self.count += n;
        self.first = Some(self.first.map_or(first, |f| f.min(first)));
        self.last = Some(self.last.map_or(last, |l| l.max(last)));
        if self.comm.is_empty() {
            self.comm = comm.to_string();
        }
    }
}

/// One tracer run: a header and what followed it (or lines with no header at all).
#[derive(Clone, Debug, Default)]
pub struct Session {
    pub file: String,
    pub header_line: Option<u64>,
    pub header: Option<Header>,
    pub start: Option<i128>,
    /// Latest time any line of the session names.
    pub end: Option<i128>,
    pub sysctls: BTreeMap<Option<u64>, NetSysctls>,
    /// Destination rows with the time they were taken (census, snapshots, blame).
    pub rows: Vec<(Option<i128>, DestRow)>,
    pub snapshot: Option<Counts>,
    pub summary: Option<Counts>,
    pub snapshots: u64,
    /// Failure lines that passed the filter, per key.
    pub lines: BTreeMap<Key, KeyAcc>,
    /// Failure lines (pid filter only) after the last snapshot that it had not counted yet.
    pub after: BTreeMap<Key, KeyAcc>,
    /// Failure lines that passed the filter, per second.
    pub per_second: BTreeMap<i64, u64>,
    /// Failures recorded (one line each, or tallied in `suppressed` lines) that passed the
    /// filter.
    pub recorded: u64,
    /// What the recorded failures were, per namespace.
    pub evidence: BTreeMap<Option<u64>, Evidence>,
    /// Namespace of each pid, from its failures.
    pub pid_netns: HashMap<u32, u64>,
}

impl Session {
    fn touch(&mut self, ts: i128) {
        self.end = Some(self.end.map_or(ts, |e| e.max(ts)));
    }

    pub fn host(&self) -> String {
        self.header
            .as_ref()
            .and_then(|h| h.host.clone())
            .unwrap_or_else(|| "?".into())
    }

    /// Identity for spotting the same session passed twice.
    pub fn identity(&self) -> Option<(String, u32, String)> {
        let h = self.header.as_ref()?;
        Some((h.host.clone()?, h.pid?, h.start_ts.clone()?))
    }

    fn failure(&mut self, f: FailureRec, ts: i128, filter: &Filter) {
        self.touch(ts);
        if !filter.pid_ok(f.pid) {
            return;
        }
        let key = Key {
            pid: f.pid,
            dst: f.dst,
            errno: f.errno,
        };
        let counted_by_snapshot = self
            .snapshot
            .as_ref()
            .and_then(|s| s.last_per_pid.get(&f.pid))
            .is_some_and(|last| ts <= *last);
        if !counted_by_snapshot {
            self.after.entry(key.clone()).or_default().add(ts, &f.comm);
        }
        if !filter.time_ok(ts) {
            return;
        }
        if let Some(ns) = f.netns {
            self.pid_netns.insert(f.pid, ns);
        }
        let ev = self.evidence.entry(f.netns).or_default();
        match f.errno {
            99 => ev.connect_failures += 1,
            98 => ev.bind_failures += 1,
            11 => ev.udp_failures += 1,
            _ => {}
        }
        self.lines.entry(key).or_default().add(ts, &f.comm);
        *self
            .per_second
            .entry(ts.div_euclid(1_000_000_000) as i64)
            .or_default() += 1;
        self.recorded += 1;
    }

    /// A tally of failures the recorder did not write one by one. The recorder has already
    /// decided which of them the last snapshot had counted. In the timeline and in time
    /// windows they are placed at their last time (a tally covers at most about a second).
    fn tallied(&mut self, e: SuppressedEntry, first: i128, last: i128, filter: &Filter) {
        self.touch(last);
        if !filter.pid_ok(e.pid) || e.count == 0 {
            return;
        }
        let key = Key {
            pid: e.pid,
            dst: e.dst,
            errno: e.errno,
        };
        if !e.counted_by_snapshot {
            self.after
                .entry(key.clone())
                .or_default()
                .add_n(e.count, first, last, &e.comm);
        }
        if !filter.time_ok(last) {
            return;
        }
        if let Some(ns) = e.netns {
            self.pid_netns.insert(e.pid, ns);
        }
        let ev = self.evidence.entry(e.netns).or_default();
        match e.errno {
            99 => ev.connect_failures += e.count,
            98 => ev.bind_failures += e.count,
            11 => ev.udp_failures += e.count,
            _ => {}
        }
        self.lines
            .entry(key)
            .or_default()
            .add_n(e.count, first, last, &e.comm);
        *self
            .per_second
            .entry(last.div_euclid(1_000_000_000) as i64)
            .or_default() += e.count;
        self.recorded += e.count;
    }
}

/// The outcome of reading one file.
#[derive(Debug, Default)]
pub struct FileRead {
    pub path: String,
    pub sessions: Vec<Session>,
    pub lines: u64,
    /// False when nothing in the file could be used (missing, empty, binary, unknown version).
    pub usable: bool,
}

/// Strip serde_json's " at line 1 column 42": the position inside one line helps nobody.
fn json_reason(e: &serde_json::Error) -> String {
    let s = e.to_string();
    match s.find(" at line ") {
        Some(i) => s[..i].to_string(),
        None => s,
    }
}

struct Reader<'a> {
    path: String,
    filter: &'a Filter,
    problems: &'a mut Vec<Problem>,
    line_problems: usize,
    suppressed: usize,
    sessions: Vec<Session>,
    cur: Option<Session>,
    /// Inside a session whose header was refused (unknown version): its lines are skipped.
    skipping: bool,
    skipped: u64,
    records: u64,
}

impl Reader<'_> {
    fn problem(&mut self, line: Option<u64>, level: Level, message: String) {
        if line.is_some() && level > Level::Note {
            self.line_problems += 1;
            if self.line_problems > MAX_PROBLEMS {
                self.suppressed += 1;
                return;
            }
        }
        self.problems.push(Problem {
            file: self.path.clone(),
            line,
            level,
            message,
        });
    }

    fn session(&mut self, n: u64) -> &mut Session {
        if self.cur.is_none() {
            self.problem(
                Some(n),
                Level::Warning,
                "records before any header: reported without host and settings".into(),
            );
        }
        let path = self.path.clone();
        self.cur.get_or_insert_with(|| Session {
            file: path,
            ..Default::default()
        })
    }

    fn close_session(&mut self) {
        if let Some(s) = self.cur.take() {
            self.sessions.push(s);
        }
    }

    fn header(&mut self, n: u64, v: Value) {
        self.close_session();
        let version = v.get("version").cloned();
        match version.as_ref().and_then(Value::as_u64) {
            Some(RECORD_VERSION) => {}
            Some(other) => {
                self.problem(
                    Some(n),
                    Level::Error,
                    format!(
                        "record version {other} is not supported (this portexhaust reads version \
                         {RECORD_VERSION}); this session is skipped"
                    ),
                );
                self.skipping = true;
                return;
            }
            None => {
                self.problem(
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
        let h: Header = match serde_json::from_value(v) {
            Ok(h) => h,
            Err(e) => {
                self.problem(
                    Some(n),
                    Level::Warning,
                    format!(
                        "header: {}; its events are reported without host and settings",
                        json_reason(&e)
                    ),
                );
                Header {
                    version: RECORD_VERSION,
                    ..Default::default()
                }
            }
        };
        let start = h.start_ts.as_deref().and_then(parse_ts);
        let mut s = Session {
            file: self.path.clone(),
            header_line: Some(n),
            start,
            end: start,
            ..Default::default()
        };
        for (ns, sys) in &h.sysctls {
            s.sysctls.insert(ns.parse().ok(), sys.clone());
        }
        for r in &h.census {
            s.rows.push((start, r.clone()));
        }
        s.header = Some(h);
        self.cur = Some(s);
    }

    fn counts(&mut self, n: u64, v: Value, kind: &str) -> Option<Counts> {
        let c: CountsRec = match serde_json::from_value(v) {
            Ok(c) => c,
            Err(e) => {
                self.problem(
                    Some(n),
                    Level::Warning,
                    format!("{kind} record: {} (skipped)", json_reason(&e)),
                );
                return None;
            }
        };
        let mut blame = Vec::new();
        for (i, b) in c.blame.into_iter().enumerate() {
            match serde_json::from_value::<BlameRec>(b) {
                Ok(b) => blame.push(b),
                Err(e) => self.problem(
                    Some(n),
                    Level::Warning,
                    format!("{kind} blame entry {i}: {} (skipped)", json_reason(&e)),
                ),
            }
        }
        let mut destinations = Vec::new();
        for (i, d) in c.destinations.into_iter().enumerate() {
            match serde_json::from_value::<DestRow>(d) {
                Ok(d) => destinations.push(d),
                Err(e) => self.problem(
                    Some(n),
                    Level::Warning,
                    format!("{kind} destination row {i}: {} (skipped)", json_reason(&e)),
                ),
            }
        }
        let mut last_per_pid = HashMap::new();
        for o in &c.offenders {
            if let Some(t) = o.last_ts.as_deref().and_then(parse_ts) {
                let e = last_per_pid.entry(o.pid).or_insert(t);
                *e = (*e).max(t);
            }
        }
        let ts = match c.ts.as_deref() {
            Some(t) => {
                let p = parse_ts(t);
                if p.is_none() {
                    self.problem(
                        Some(n),
                        Level::Warning,
                        format!("{kind} record: bad timestamp {t:?}"),
                    );
                }
                p
            }
            None => None,
        };
        Some(Counts {
            line: n,
            ts,
            failures_total: c.failures_total,
            dropped_events: c.dropped_events,
            duration_s: c.duration_s,
            offenders: c.offenders,
            blame,
            destinations,
            last_per_pid,
        })
    }

    fn snapshot(&mut self, n: u64, v: Value) {
        let Some(c) = self.counts(n, v, "snapshot") else {
            return;
        };
        let prev = self.session(n).snapshot.as_ref().map(|p| p.failures_total);
        if prev.is_some_and(|p| c.failures_total < p) {
            self.problem(
                Some(n),
                Level::Warning,
                format!(
                    "snapshot counts went down ({} after {}): edited file? the latest is used",
                    c.failures_total,
                    prev.unwrap_or(0)
                ),
            );
        }
        let s = self.session(n);
        if let Some(t) = c.ts {
            s.touch(t);
        }
        for r in &c.destinations {
            s.rows.push((c.ts, r.clone()));
        }
        for b in &c.blame {
            s.rows.push((c.ts, blame_row(b)));
        }
        s.snapshots += 1;
        s.snapshot = Some(c);
        // Lines after this snapshot are counted against it from now on.
        s.after.clear();
    }

    fn summary(&mut self, n: u64, v: Value) {
        let Some(c) = self.counts(n, v, "summary") else {
            return;
        };
        let s = self.session(n);
        if let (Some(start), Some(d)) = (s.start, c.duration_s)
            && d.is_finite()
            && d >= 0.0
        {
            s.touch(start + (d * 1e9) as i128);
        }
        for b in &c.blame {
            s.rows.push((s.end, blame_row(b)));
        }
        if s.summary.is_some() {
            self.problem(
                Some(n),
                Level::Warning,
                "a second summary in one session: the later one is used".into(),
            );
        }
        self.session(n).summary = Some(c);
    }

    fn sysctls(&mut self, n: u64, v: Value) {
        let l: SysctlsLine = match serde_json::from_value(v) {
            Ok(l) => l,
            Err(e) => {
                self.problem(
                    Some(n),
                    Level::Warning,
                    format!("sysctls record: {} (skipped)", json_reason(&e)),
                );
                return;
            }
        };
        let ts = l.ts.as_deref().and_then(parse_ts);
        let s = self.session(n);
        for (ns, sys) in l.sysctls {
            s.sysctls.insert(ns.parse().ok(), sys);
        }
        for r in l.census {
            s.rows.push((ts, r));
        }
    }

    fn suppressed(&mut self, n: u64, v: Value) {
        let events = match v.get("events") {
            Some(Value::Array(a)) => a.clone(),
            _ => {
                self.problem(
                    Some(n),
                    Level::Warning,
                    "suppressed record without an \"events\" array (skipped)".into(),
                );
                return;
            }
        };
        let filter = self.filter;
        for (i, e) in events.into_iter().enumerate() {
            let e: SuppressedEntry = match serde_json::from_value(e) {
                Ok(e) => e,
                Err(err) => {
                    self.problem(
                        Some(n),
                        Level::Warning,
                        format!("suppressed entry {i}: {} (skipped)", json_reason(&err)),
                    );
                    continue;
                }
            };
            let (Some(first), Some(last)) = (parse_ts(&e.first_ts), parse_ts(&e.last_ts)) else {
                self.problem(
                    Some(n),
                    Level::Warning,
                    format!("suppressed entry {i}: bad timestamp (skipped)"),
                );
                continue;
            };
            self.session(n)
                .tallied(e, first.min(last), last.max(first), filter);
        }
    }

    fn failure(&mut self, n: u64, v: Value) {
        let f: FailureRec = match serde_json::from_value(v) {
            Ok(f) => f,
            Err(e) => {
                self.problem(
                    Some(n),
                    Level::Warning,
                    format!("failure record: {} (skipped)", json_reason(&e)),
                );
                return;
            }
        };
        let Some(ts) = parse_ts(&f.ts) else {
            self.problem(
                Some(n),
                Level::Warning,
                format!("failure record: bad timestamp {:?} (skipped)", f.ts),
            );
            return;
        };
        let filter = self.filter;
        self.session(n).failure(f, ts, filter);
    }

    /// One complete line. `last_cut`: the file ends without a newline after it.
    fn line(&mut self, n: u64, bytes: &[u8], last_cut: bool) {
        let text = match std::str::from_utf8(bytes) {
            Ok(t) if !t.contains('\0') => t.trim(),
            _ => {
                if last_cut {
                    self.problem(
                        Some(n),
                        Level::Note,
                        "the file ends in binary data (NULs: it was not fully written before a \
                         crash); ignored"
                            .into(),
                    );
                } else {
                    self.problem(
                        Some(n),
                        Level::Warning,
                        "binary data, not a JSON line (skipped)".into(),
                    );
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
                self.problem(
                    Some(n),
                    Level::Warning,
                    "not a JSON object (skipped)".into(),
                );
                return;
            }
            Err(e) => {
                if last_cut {
                    self.problem(
                        Some(n),
                        Level::Note,
                        "the last line is cut off (the tracer stopped mid-write); ignored".into(),
                    );
                } else {
                    self.problem(
                        Some(n),
                        Level::Warning,
                        format!("not valid JSON: {} (skipped)", json_reason(&e)),
                    );
                }
                return;
            }
        };
        let kind = v.get("type").and_then(Value::as_str).map(str::to_string);
        if kind.as_deref() == Some("header") {
            self.records += 1;
            self.header(n, v);
            return;
        }
        if self.skipping {
            self.skipped += 1;
            return;
        }
        self.records += 1;
        match kind.as_deref() {
            Some("failure") => self.failure(n, v),
            Some("suppressed") => self.suppressed(n, v),
            Some("snapshot") => self.snapshot(n, v),
            Some("summary") => self.summary(n, v),
            Some("sysctls") => self.sysctls(n, v),
            Some(other) => {
                self.records -= 1;
                self.problem(
                    Some(n),
                    Level::Warning,
                    format!("unknown record type {other:?} (skipped)"),
                );
            }
            None => {
                self.records -= 1;
                self.problem(
                    Some(n),
                    Level::Warning,
                    "record without a \"type\" (skipped)".into(),
                );
            }
        }
    }
}

/// A destination row from a blame entry (which has no source address or rates).
fn blame_row(b: &BlameRec) -> DestRow {
    DestRow {
        netns: b.netns,
        src: None,
        dst: b.dst.clone(),
        proto: "tcp".into(),
        range_size: b.range_size,
        in_use: b.in_use,
        by_state: b.by_state.clone(),
        utilisation: if b.range_size == 0 {
            0.0
        } else {
            (b.in_use as f64 / b.range_size as f64).min(1.0)
        },
        ..Default::default()
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

/// Read one record file. Problems go to `problems`; what could be read is returned.
pub fn read_file(path: &Path, filter: &Filter, problems: &mut Vec<Problem>) -> FileRead {
    if path == Path::new("-") {
        return read_from("<stdin>", std::io::stdin().lock(), filter, problems);
    }
    let name = path.display().to_string();
    let out = FileRead {
        path: name.clone(),
        ..Default::default()
    };
    let err = |problems: &mut Vec<Problem>, message: String| {
        problems.push(Problem {
            file: name.clone(),
            line: None,
            level: Level::Error,
            message,
        })
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
    read_from(&name, file, filter, problems)
}

/// Read a record from any byte stream, reporting problems under `name`.
pub fn read_from(
    name: &str,
    src: impl Read,
    filter: &Filter,
    problems: &mut Vec<Problem>,
) -> FileRead {
    let mut out = FileRead {
        path: name.to_string(),
        ..Default::default()
    };
    let err = |problems: &mut Vec<Problem>, message: String| {
        problems.push(Problem {
            file: name.to_string(),
            line: None,
            level: Level::Error,
            message,
        })
    };
    let mut r = BufReader::with_capacity(256 * 1024, src);
    // The wrong file (a pcap, a tarball, a core dump) is refused before a flood of bad lines.
    match r.fill_buf() {
        Ok([]) => {
            err(problems, "is empty: no header, nothing to report".into());
            return out;
        }
        Ok(head) => {
            let head = &head[..head.len().min(4096)];
            let first_line = head.split(|&b| b == b'\n').next().unwrap_or(&[]);
            // Only the first line decides: a record whose tail is NULs (a crash before the
            // file system wrote the data) is still a record.
            if first_line.contains(&0) || std::str::from_utf8(first_line).is_err() {
                err(
                    problems,
                    "binary data: not a portexhaust record (NDJSON from `trace --record`)".into(),
                );
                return out;
            }
            let t = String::from_utf8_lossy(first_line);
            let t = t.trim_start();
            if !t.is_empty() && !t.starts_with('{') {
                let shown: String = t.chars().take(40).collect();
                err(
                    problems,
                    format!(
                        "line 1 is not JSON ({shown:?}...): not a portexhaust record (NDJSON \
                         from `trace --record`)"
                    ),
                );
                return out;
            }
        }
        Err(e) => {
            err(problems, format!("cannot read: {e}"));
            return out;
        }
    }
    let mut rd = Reader {
        path: name.to_string(),
        filter,
        problems,
        line_problems: 0,
        suppressed: 0,
        sessions: Vec::new(),
        cur: None,
        skipping: false,
        skipped: 0,
        records: 0,
    };
    let res = for_each_line(&mut r, |n, bytes, terminated, too_long| {
        if too_long {
            rd.problem(
                Some(n),
                Level::Warning,
                format!("line longer than {} MiB (skipped)", MAX_LINE >> 20),
            );
        } else {
            rd.line(n, bytes, !terminated);
        }
    });
    match res {
        Ok(n) => out.lines = n,
        Err(e) => rd.problem(
            None,
            Level::Error,
            format!("read error: {e}; the rest is lost"),
        ),
    }
    if rd.suppressed > 0 {
        let n = rd.suppressed;
        rd.problem(
            None,
            Level::Warning,
            format!("{n} more bad lines not shown"),
        );
    }
    rd.close_session();
    if rd.skipped > 0 {
        let n = rd.skipped;
        rd.problem(
            None,
            Level::Note,
            format!("{n} lines of unsupported sessions skipped"),
        );
    }
    if rd.records == 0 && rd.sessions.iter().all(|s| s.header.is_none()) {
        let level_msg = if rd
            .problems
            .iter()
            .any(|p| p.file == name && p.level == Level::Error)
        {
            None
        } else {
            Some("no portexhaust records in this file".to_string())
        };
        if let Some(m) = level_msg {
            rd.problem(None, Level::Error, m);
        }
        return out;
    }
    out.usable = !rd.sessions.is_empty();
    if !out.usable {
        // Only refused sessions: the version error above already says why.
        return out;
    }
    out.sessions = rd.sessions;
    out
}
