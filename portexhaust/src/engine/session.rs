//! One tracer run, rebuilt from the records it wrote: the replay half of the engine.
//!
//! [`Replay`] is fed [`Record`]s in the order they were written (by `schema::read` from files,
//! or directly), splits them into sessions at each header, and keeps per session what the
//! counting rule of `report` needs: the latest snapshot and the summary (exact in-kernel
//! counts), the failure and tally lines (as [`Counts`], per second, and per namespace), and the
//! destination rows and settings seen. Lines are folded in as they come, so a long incident is
//! replayed without holding its events in memory.
//!
//! A rotated record is one run in several files, each starting with the run's header (the same
//! `run_id`, a higher `part`): fed in order, a later part continues the run's session rather
//! than starting one, so its snapshots (cumulative since the run started) replace the earlier
//! ones and its lines add to the earlier lines. `report` sorts its files so that they are.
use std::collections::{BTreeMap, HashMap};

use portexhaust_common::Cause;

use crate::{
    advice::Evidence,
    engine::counts::{Counts, Key, KeyCount},
    schema::{
        DestRow, Errno, Failure, Gap, Header, Level, NetSysctls, Record, SysctlsLine, Tally,
        Totals, Ts, read::Problems, read::Sink,
    },
};

/// What a report is restricted to.
#[derive(Clone, Debug, Default)]
pub struct Filter {
    pub since: Option<Ts>,
    pub until: Option<Ts>,
    pub pids: Vec<u32>,
}

impl Filter {
    pub fn time_ok(&self, ts: Ts) -> bool {
        self.since.is_none_or(|s| ts >= s) && self.until.is_none_or(|u| ts <= u)
    }
    pub fn pid_ok(&self, pid: u32) -> bool {
        self.pids.is_empty() || self.pids.contains(&pid)
    }
    pub fn windowed(&self) -> bool {
        self.since.is_some() || self.until.is_some()
    }
}

/// A snapshot or summary, with what the replay derives from it.
#[derive(Clone, Debug)]
pub struct Counted {
    pub line: Option<u64>,
    pub totals: Totals,
    /// Latest failure the kernel had counted, per pid (from the offenders' `last_ts`).
    pub last_per_pid: HashMap<u32, Ts>,
}

impl Counted {
    fn new(line: Option<u64>, mut totals: Totals) -> Self {
        if totals.version < 2 {
            // Version 1 wrote 0 for a range it could not read (the namespace was gone); the
            // schema says unknown.
            for b in &mut totals.blame {
                if b.range_size == Some(0) {
                    b.range_size = None;
                }
            }
        }
        let mut last_per_pid: HashMap<u32, Ts> = HashMap::new();
        for o in &totals.offenders {
            if let Some(t) = o.last_ts {
                let e = last_per_pid.entry(o.pid).or_insert(t);
                *e = (*e).max(t);
            }
        }
        Self {
            line,
            totals,
            last_per_pid,
        }
    }

    /// Was a failure of `pid` at `ts` already in these counts?
    fn counted(&self, pid: u32, ts: Ts) -> bool {
        self.last_per_pid.get(&pid).is_some_and(|last| ts <= *last)
    }
}

/// One tracer run: a header and what followed it (or lines with no header at all).
#[derive(Clone, Debug, Default)]
pub struct Session {
    pub file: String,
    pub header_line: Option<u64>,
    pub header: Option<Header>,
    pub start: Option<Ts>,
    /// Latest time any line of the session names.
    pub end: Option<Ts>,
    pub sysctls: BTreeMap<Option<u64>, NetSysctls>,
    /// Destination rows with the time they were taken (census, snapshots, blame).
    pub rows: Vec<(Option<Ts>, DestRow)>,
    pub snapshot: Option<Counted>,
    pub summary: Option<Counted>,
    pub snapshots: u64,
    /// Failure and tally lines that passed the filter, per key.
    pub lines: Counts,
    /// Failure and tally lines (pid filter only) after the last snapshot that it had not
    /// counted yet.
    pub after: Counts,
    /// Failures of the lines that passed the filter, per second.
    pub per_second: BTreeMap<i64, u64>,
    /// Failures recorded (a line each, or tallied) that passed the filter.
    pub recorded: u64,
    /// What the recorded failures were, per namespace.
    pub evidence: BTreeMap<Option<u64>, Evidence>,
    /// Namespace of each pid, from its failures.
    pub pid_netns: HashMap<u32, u64>,
    /// The run's id (a record's header names it; every part of a rotated record has it).
    pub run_id: Option<String>,
    /// The first and the latest part of a rotated record read for this run.
    pub first_part: Option<u32>,
    pub part: Option<u32>,
    /// The files of the run's parts after the first, in order.
    pub more_files: Vec<String>,
    /// What the record could not write (a full disk), with the line that says so.
    pub gaps: Vec<(Option<u64>, String, Gap)>,
}

impl Session {
    fn touch(&mut self, ts: Ts) {
        self.end = Some(self.end.map_or(ts, |e| e.max(ts)));
    }

    pub fn host(&self) -> String {
        self.header
            .as_ref()
            .and_then(|h| h.host.clone())
            .unwrap_or_else(|| "?".into())
    }

    /// Identity for spotting the same session passed twice.
    pub fn identity(&self) -> Option<(String, u32, Ts)> {
        let h = self.header.as_ref()?;
        Some((h.host.clone()?, h.pid?, h.start_ts?))
    }

    /// The best counts of the session: its summary, else its last snapshot.
    pub fn latest(&self) -> Option<&Counted> {
        self.summary.as_ref().or(self.snapshot.as_ref())
    }

    fn header(line: Option<u64>, file: &str, h: Header) -> Self {
        let start = h.start_ts;
        let mut s = Self {
            file: file.to_string(),
            header_line: line,
            start,
            end: start,
            ..Default::default()
        };
        for (ns, sys) in &h.sysctls {
            s.sysctls.insert(Some(*ns), sys.clone());
        }
        for r in &h.census {
            s.rows.push((start, r.clone()));
        }
        s.run_id = h.run_id.clone();
        s.first_part = h.part;
        s.part = h.part;
        s.header = Some(h);
        s
    }

    /// The next part of a rotated record: the same run goes on, its counting state intact
    /// (snapshots are cumulative from the run's start; lines after the last one are counted
    /// against it, whichever file they are in). The header repeats the run's: its census is
    /// not new, its settings may be.
    fn next_part(&mut self, file: &str, h: &Header) {
        self.part = h.part;
        if self
            .more_files
            .last()
            .map_or(self.file.as_str(), String::as_str)
            != file
        {
            self.more_files.push(file.to_string());
        }
        for (ns, sys) in &h.sysctls {
            self.sysctls.insert(Some(*ns), sys.clone());
        }
    }

    /// Whether a header continues this session: a later part of the same run.
    fn continued_by(&self, h: &Header) -> bool {
        match (&self.run_id, &h.run_id, self.part, h.part) {
            (Some(a), Some(b), Some(p), Some(q)) => a == b && q > p,
            _ => false,
        }
    }

    fn gap(&mut self, line: Option<u64>, g: &Gap) {
        self.touch(g.until_ts);
        let file = self.more_files.last().unwrap_or(&self.file).clone();
        self.gaps.push((line, file, g.clone()));
    }

    /// `n` failures of one key between `first` and `last`; `counted`: the last snapshot had
    /// them already. In the timeline and in time windows a tally is placed at its last time
    /// (it covers about a second at most).
    #[allow(clippy::too_many_arguments)]
    fn failures(
        &mut self,
        key: Key,
        n: u64,
        first: Ts,
        last: Ts,
        comm: &str,
        netns: Option<u64>,
        counted: bool,
        filter: &Filter,
    ) {
        self.touch(last);
        if !filter.pid_ok(key.pid) || n == 0 {
            return;
        }
        if !counted {
            self.after
                .entry(key)
                .or_default()
                .add_n(n, Some(first), Some(last), comm, netns);
        }
        if !filter.time_ok(last) {
            return;
        }
        if let Some(ns) = netns {
            self.pid_netns.insert(key.pid, ns);
        }
        let ev = self.evidence.entry(netns).or_default();
        match key.errno {
            Errno::EADDRNOTAVAIL if key.cause == Cause::TupleCollision => ev.collisions += n,
            Errno::EADDRNOTAVAIL => ev.connect_failures += n,
            Errno::EADDRINUSE => ev.bind_failures += n,
            Errno::EAGAIN => ev.udp_failures += n,
            _ if key.cause == Cause::SnatExhausted => ev.snat_drops += n,
            _ => {}
        }
        self.lines
            .entry(key)
            .or_default()
            .add_n(n, Some(first), Some(last), comm, netns);
        *self.per_second.entry(last.secs()).or_default() += n;
        self.recorded += n;
    }

    pub fn failure(&mut self, f: &Failure, filter: &Filter) {
        let ts = f.ts.micros();
        let counted = self.snapshot.as_ref().is_some_and(|s| s.counted(f.pid, ts));
        let key = Key {
            pid: f.pid,
            dst: f.dst,
            errno: f.errno,
            cause: f.cause,
        };
        self.failures(key, 1, ts, ts, &f.comm, f.netns, counted, filter);
    }

    pub fn tally(&mut self, t: &Tally, filter: &Filter) {
        let last = t.last_ts.micros();
        let first = t.first_ts.map_or(last, Ts::micros).min(last);
        // The recorder decided which of its tallies the last snapshot had counted (it splits
        // a tally at each snapshot).
        let counted = t.counted_by_snapshot;
        let key = Key {
            pid: t.pid,
            dst: t.dst,
            errno: t.errno,
            cause: t.cause,
        };
        self.failures(key, t.count, first, last, &t.comm, t.netns, counted, filter);
    }

    fn sysctls(&mut self, l: &SysctlsLine) {
        for (ns, sys) in &l.sysctls {
            self.sysctls.insert(Some(*ns), sys.clone());
        }
        for r in &l.census {
            self.rows.push((l.ts, r.clone()));
        }
    }

    fn snapshot(&mut self, c: Counted, problems: &mut Problems<'_>) {
        if let Some(prev) = &self.snapshot
            && c.totals.failures_total < prev.totals.failures_total
        {
            problems.add(
                c.line,
                Level::Warning,
                format!(
                    "snapshot counts went down ({} after {}): edited file? the latest is used",
                    c.totals.failures_total, prev.totals.failures_total
                ),
            );
        }
        let ts = c.totals.ts;
        if let Some(t) = ts {
            self.touch(t);
        }
        for r in &c.totals.destinations {
            self.rows.push((ts, r.clone()));
        }
        for b in &c.totals.blame {
            self.rows.push((ts, b.as_row()));
        }
        self.snapshots += 1;
        self.snapshot = Some(c);
        // Lines after this snapshot are counted against it from now on.
        self.after.clear();
    }

    fn summary(&mut self, c: Counted, problems: &mut Problems<'_>) {
        if let (Some(start), Some(d)) = (self.start, c.totals.duration_s)
            && d.is_finite()
            && d >= 0.0
        {
            self.touch(start.plus_secs_f64(d));
        }
        if let Some(t) = c.totals.ts {
            self.touch(t);
        }
        for r in &c.totals.destinations {
            self.rows.push((c.totals.ts.or(self.end), r.clone()));
        }
        for b in &c.totals.blame {
            self.rows.push((c.totals.ts.or(self.end), b.as_row()));
        }
        if self.summary.is_some() {
            problems.add(
                c.line,
                Level::Warning,
                "a second summary in one session: the later one is used".into(),
            );
        }
        self.summary = Some(c);
    }
}

/// Feeds records into sessions; see the module documentation.
pub struct Replay {
    filter: Filter,
    file: String,
    cur: Option<Session>,
    /// Where `cur` was in `sessions` before a later part of its run reopened it.
    reopened: Option<usize>,
    pub sessions: Vec<Session>,
}

impl Replay {
    pub fn new(filter: Filter) -> Self {
        Self {
            filter,
            file: String::new(),
            cur: None,
            reopened: None,
            sessions: Vec::new(),
        }
    }

    pub fn filter(&self) -> &Filter {
        &self.filter
    }

    fn session(&mut self, line: Option<u64>, problems: &mut Problems<'_>) -> &mut Session {
        if self.cur.is_none() {
            problems.add(
                line,
                Level::Warning,
                "records before any header: reported without host and settings".into(),
            );
        }
        let file = self.file.clone();
        self.cur.get_or_insert_with(|| Session {
            file,
            ..Default::default()
        })
    }

    fn close(&mut self) {
        if let Some(s) = self.cur.take() {
            // A continued run goes back to where it began, so that it stays the first of its
            // identity (a copy given later is the one `report` drops).
            match self.reopened.take() {
                Some(i) => self.sessions.insert(i, s),
                None => self.sessions.push(s),
            }
        }
    }

    /// One record, as it was written (`line`: its line number in the file, if any).
    pub fn push(&mut self, line: Option<u64>, rec: &Record<'_>, problems: &mut Problems<'_>) {
        let filter = self.filter.clone();
        match rec {
            Record::Header(h) => {
                self.close();
                let file = self.file.clone();
                match self.sessions.iter().position(|s| s.continued_by(h)) {
                    Some(i) => {
                        let mut s = self.sessions.remove(i);
                        s.next_part(&file, h);
                        self.cur = Some(s);
                        self.reopened = Some(i);
                    }
                    None => self.cur = Some(Session::header(line, &file, h.as_ref().clone())),
                }
            }
            Record::Gap(g) => self.session(line, problems).gap(line, g),
            Record::Sysctls(l) => self.session(line, problems).sysctls(l),
            Record::Failure(f) => self.session(line, problems).failure(f, &filter),
            Record::Tally(t) => self.session(line, problems).tally(t, &filter),
            Record::Suppressed(s) => {
                let session = self.session(line, problems);
                for t in &s.events {
                    session.tally(t, &filter);
                }
            }
            Record::Snapshot(t) => {
                let c = Counted::new(line, t.as_ref().clone());
                self.session(line, problems).snapshot(c, problems);
            }
            Record::Summary(t) => {
                let c = Counted::new(line, t.as_ref().clone());
                self.session(line, problems).summary(c, problems);
            }
        }
    }

    /// Every session, once the input is done.
    pub fn finish(mut self) -> Vec<Session> {
        self.close();
        self.sessions
    }
}

impl Sink for Replay {
    fn begin_file(&mut self, name: &str) {
        self.close();
        self.file = name.to_string();
    }

    fn record(&mut self, line: u64, rec: Record<'static>, problems: &mut Problems<'_>) {
        self.push(Some(line), &rec, problems);
    }

    fn end_file(&mut self, _problems: &mut Problems<'_>) {
        self.close();
    }
}

/// The counts of one key, for tests and the report.
pub fn count_of(counts: &Counts, key: &Key) -> u64 {
    counts.get(key).map_or(0, |c: &KeyCount| c.count)
}
