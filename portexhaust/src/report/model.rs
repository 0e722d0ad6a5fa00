//! From sessions read out of record files to one report. Pure.
//!
//! # How counts are combined (the rule `report --help` refers to)
//!
//! Per session (one tracer run), the best data wins:
//! 1. a `summary` line (the tracer stopped cleanly): its exact in-kernel counts;
//! 2. else the last `snapshot` (the tracer was killed or is still running): its exact in-kernel
//!    counts, plus the failure lines after it that it had not counted yet. A failure line
//!    written after the snapshot is "already counted" when its time is not later than the
//!    newest failure the kernel had counted for that pid (the offender's `last_ts`): such lines
//!    were waiting in the ring buffer while the snapshot was taken;
//! 3. else (killed before the first snapshot) the failure lines themselves: every line that
//!    was flushed is one failure, so the count is exact for what reached the disk.
//!
//! Failures the ring buffer dropped are in the kernel counts (rules 1 and 2) but have no line;
//! drops after the last snapshot of a killed tracer are unknowable, and the report says so.
//! With `--since`/`--until`, a session that lies wholly inside the window keeps these rules;
//! one that straddles it is counted from its failure lines inside the window (snapshots are
//! cumulative and cannot be cut in time). `--pid` applies to all three.
//! Sessions are added up; the same session passed twice is counted once, and sessions of one
//! host that overlap in time are flagged (two tracers see the same failures).
use std::collections::{BTreeMap, HashMap};

use serde::Serialize;

use super::parse::{Filter, Key, KeyAcc, Problem, Session, parse_ts};
use crate::{
    clock::rfc3339,
    doctor::{Evidence, Finding, Inputs, audit},
    model::errno_name,
    sysctl::{NetSysctls, PortRange},
    usage::DestRow,
};

/// Timeline buckets at most; longer incidents get wider buckets.
pub const MAX_BUCKETS: usize = 600;
const MAX_DEST_ROWS: usize = 30;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum CountSource {
    /// The summary line: exact.
    Summary,
    /// Last snapshot plus the failure lines after it.
    SnapshotAndEvents,
    /// Failure lines only.
    Events,
}

#[derive(Clone, Debug, Serialize)]
pub struct SessionOut {
    pub file: String,
    pub header_line: Option<u64>,
    pub host: String,
    pub kernel: Option<String>,
    pub backend: Option<String>,
    pub tracer_pid: Option<u32>,
    pub start_ts: Option<String>,
    pub end_ts: Option<String>,
    /// A summary was written: the tracer stopped cleanly.
    pub complete: bool,
    pub snapshots: u64,
    pub counts_from: CountSource,
    pub failures: u64,
    pub dropped_events: u64,
    pub recorded_events: u64,
    pub note: Option<String>,
}

#[derive(Clone, Debug, Serialize, PartialEq, Eq)]
pub struct DestOut {
    pub dst: String,
    pub errno: u32,
    pub errname: &'static str,
    pub failures: u64,
}

#[derive(Clone, Debug, Serialize)]
pub struct OffenderOut {
    pub host: String,
    pub pid: u32,
    pub comm: String,
    pub netns: Option<u64>,
    pub failures: u64,
    pub first_ts: Option<String>,
    pub last_ts: Option<String>,
    pub destinations: Vec<DestOut>,
}

#[derive(Clone, Debug, Serialize)]
pub struct HolderOut {
    pub host: String,
    pub dst: String,
    pub pid: u32,
    pub comm: String,
    pub alive: Option<bool>,
    pub sockets: u64,
    pub time_wait: u64,
}

#[derive(Clone, Debug, Serialize)]
pub struct RowOut {
    pub host: String,
    /// When this row (the busiest seen for this destination) was taken.
    pub ts: Option<String>,
    #[serde(flatten)]
    pub row: DestRow,
}

#[derive(Clone, Debug, Serialize)]
pub struct SettingsOut {
    pub host: String,
    pub netns: Option<u64>,
    pub sysctls: NetSysctls,
    pub range: Option<PortRange>,
}

#[derive(Clone, Debug, Serialize)]
pub struct ScopedFinding {
    pub host: String,
    pub netns: Option<u64>,
    #[serde(flatten)]
    pub finding: Finding,
}

#[derive(Clone, Debug, Default, Serialize)]
pub struct Timeline {
    pub start_ts: Option<String>,
    #[serde(skip)]
    pub start_ns: Option<i128>,
    pub bucket_s: u64,
    /// Recorded failures per bucket.
    pub counts: Vec<u64>,
}

impl Timeline {
    pub fn peak(&self) -> Option<(usize, u64)> {
        self.counts
            .iter()
            .copied()
            .enumerate()
            .max_by(|a, b| a.1.cmp(&b.1).then(b.0.cmp(&a.0)))
            .filter(|(_, c)| *c > 0)
    }

    /// Time at the start of bucket `i`.
    pub fn bucket_ts(&self, i: usize) -> Option<i128> {
        self.start_ns
            .map(|s| s + i as i128 * self.bucket_s as i128 * 1_000_000_000)
    }
}

#[derive(Clone, Debug, Serialize)]
pub struct FileOut {
    pub path: String,
    pub usable: bool,
    pub lines: u64,
    pub sessions: usize,
}

#[derive(Clone, Debug, Default, Serialize)]
pub struct Window {
    pub since: Option<String>,
    pub until: Option<String>,
    pub pids: Vec<u32>,
}

#[derive(Clone, Debug, Serialize)]
pub struct Report {
    #[serde(rename = "type")]
    pub kind: &'static str,
    pub version: u64,
    pub files: Vec<FileOut>,
    pub filter: Window,
    pub sessions: Vec<SessionOut>,
    pub failures_total: u64,
    /// Every session ended with a summary. Otherwise the counts of a session whose tracer was
    /// killed cover what it had flushed (see the module documentation).
    pub complete: bool,
    pub dropped_events: u64,
    pub recorded_events: u64,
    pub first_failure_ts: Option<String>,
    pub last_failure_ts: Option<String>,
    pub peak_per_s: Option<f64>,
    pub peak_ts: Option<String>,
    pub timeline: Timeline,
    pub offenders: Vec<OffenderOut>,
    pub holders: Vec<HolderOut>,
    pub destinations: Vec<RowOut>,
    pub settings: Vec<SettingsOut>,
    pub findings: Vec<ScopedFinding>,
    pub problems: Vec<Problem>,
}

struct KeyCount {
    count: u64,
    first: Option<i128>,
    last: Option<i128>,
    comm: String,
}

fn merge_acc(into: &mut KeyCount, a: &KeyAcc) {
    into.count += a.count;
    into.first = min_opt(into.first, a.first);
    into.last = max_opt(into.last, a.last);
    if into.comm.is_empty() {
        into.comm = a.comm.clone();
    }
}

fn min_opt(a: Option<i128>, b: Option<i128>) -> Option<i128> {
    match (a, b) {
        (Some(x), Some(y)) => Some(x.min(y)),
        (x, y) => x.or(y),
    }
}
fn max_opt(a: Option<i128>, b: Option<i128>) -> Option<i128> {
    match (a, b) {
        (Some(x), Some(y)) => Some(x.max(y)),
        (x, y) => x.or(y),
    }
}

struct SessionCounts {
    source: CountSource,
    keys: BTreeMap<Key, KeyCount>,
    total: u64,
    dropped: u64,
    note: Option<String>,
}

fn from_counts(c: &super::parse::Counts, f: &Filter) -> BTreeMap<Key, KeyCount> {
    let mut keys = BTreeMap::new();
    for o in c.offenders.iter().filter(|o| f.pid_ok(o.pid)) {
        let first = o.first_ts.as_deref().and_then(parse_ts);
        let last = o.last_ts.as_deref().and_then(parse_ts);
        for d in &o.destinations {
            let k: &mut KeyCount = keys
                .entry(Key {
                    pid: o.pid,
                    dst: d.dst.clone(),
                    errno: d.errno,
                })
                .or_insert(KeyCount {
                    count: 0,
                    first,
                    last,
                    comm: o.comm.clone(),
                });
            k.count += d.failures;
        }
    }
    keys
}

fn session_counts(s: &Session, f: &Filter) -> SessionCounts {
    let whole = !f.windowed()
        || (s.start.is_some_and(|t| f.time_ok(t)) && s.end.is_some_and(|t| f.time_ok(t)));
    let by_pid = !f.pids.is_empty();
    let lines_only = |note: Option<String>| {
        let mut keys = BTreeMap::new();
        for (k, a) in &s.lines {
            merge_acc(
                keys.entry(k.clone()).or_insert(KeyCount {
                    count: 0,
                    first: None,
                    last: None,
                    comm: String::new(),
                }),
                a,
            );
        }
        SessionCounts {
            source: CountSource::Events,
            total: s.recorded,
            keys,
            // Drops are known only as a session total: they cannot be placed in a window.
            dropped: 0,
            note,
        }
    };
    if !whole {
        return lines_only(Some(
            "straddles the time window: counted from its failure lines inside it".into(),
        ));
    }
    if let Some(sum) = &s.summary {
        let keys = from_counts(sum, f);
        let total = if by_pid {
            keys.values().map(|k| k.count).sum()
        } else {
            sum.failures_total
        };
        return SessionCounts {
            source: CountSource::Summary,
            keys,
            total,
            dropped: sum.dropped_events,
            note: None,
        };
    }
    if let Some(snap) = &s.snapshot {
        let mut keys = from_counts(snap, f);
        let mut added = 0;
        for (k, a) in &s.after {
            added += a.count;
            merge_acc(
                keys.entry(k.clone()).or_insert(KeyCount {
                    count: 0,
                    first: None,
                    last: None,
                    comm: String::new(),
                }),
                a,
            );
        }
        let total = if by_pid {
            keys.values().map(|k| k.count).sum()
        } else {
            snap.failures_total + added
        };
        return SessionCounts {
            source: CountSource::SnapshotAndEvents,
            keys,
            total,
            dropped: snap.dropped_events,
            note: Some(format!(
                "no summary (tracer killed?): exact counts of the snapshot at {} plus {added} \
                 failure line(s) recorded after it",
                snap.ts
                    .map(rfc3339)
                    .unwrap_or_else(|| format!("line {}", snap.line))
            )),
        };
    }
    let note = s
        .header
        .is_some()
        .then(|| "no summary and no snapshot (tracer killed early?): counted from the failure lines flushed to disk".to_string());
    lines_only(note)
}

/// Failures per bucket over `[first, last]` seconds (the recording, not just the failures:
/// the quiet time before the first failure is part of the story).
fn timeline(per_second: &BTreeMap<i64, u64>, span: Option<(i64, i64)>) -> Timeline {
    let failures = per_second
        .first_key_value()
        .zip(per_second.last_key_value());
    let (first, last) = match (failures, span) {
        (Some(((&a, _), (&b, _))), Some((s, e))) => (a.min(s), b.max(e)),
        (Some(((&a, _), (&b, _))), None) => (a, b),
        (None, _) => {
            return Timeline {
                bucket_s: 1,
                ..Default::default()
            };
        }
    };
    let span = (last - first + 1) as u64;
    let bucket_s = span.div_ceil(MAX_BUCKETS as u64).max(1);
    let n = span.div_ceil(bucket_s) as usize;
    let mut counts = vec![0u64; n];
    for (&sec, &c) in per_second {
        let i = ((sec - first) as u64 / bucket_s) as usize;
        if let Some(slot) = counts.get_mut(i) {
            *slot += c;
        }
    }
    let start_ns = first as i128 * 1_000_000_000;
    Timeline {
        start_ts: Some(rfc3339(start_ns)),
        start_ns: Some(start_ns),
        bucket_s,
        counts,
    }
}

/// Failures per (destination, errno) of one offender.
type DestTally = BTreeMap<(String, u32), u64>;
/// (host, netns, source, destination).
type RowKey = (String, Option<u64>, Option<String>, String);

/// Build the report. `files`: (path, usable, lines, sessions).
pub fn build(
    files: Vec<FileOut>,
    sessions: Vec<Session>,
    filter: &Filter,
    mut problems: Vec<Problem>,
) -> Report {
    // The same session given twice (the same file, or a copy) is counted once.
    let mut seen: HashMap<(String, u32, String), String> = HashMap::new();
    let mut unique: Vec<Session> = Vec::new();
    for s in sessions {
        if let Some(id) = s.identity() {
            if let Some(first) = seen.get(&id) {
                problems.push(Problem {
                    file: s.file.clone(),
                    line: s.header_line,
                    level: super::parse::Level::Warning,
                    message: format!(
                        "the same session as in {first} (host {}, tracer pid {}): counted once",
                        id.0, id.1
                    ),
                });
                continue;
            }
            seen.insert(id, s.file.clone());
        }
        unique.push(s);
    }
    // Two tracers on one host at once see the same failures.
    for (i, a) in unique.iter().enumerate() {
        for b in unique.iter().skip(i + 1) {
            if a.header.is_some()
                && a.host() == b.host()
                && let (Some(a0), Some(a1), Some(b0), Some(b1)) = (a.start, a.end, b.start, b.end)
                && a0 < b1
                && b0 < a1
            {
                problems.push(Problem {
                    file: b.file.clone(),
                    line: b.header_line,
                    level: super::parse::Level::Warning,
                    message: format!(
                        "overlaps in time with the session of {} on host {}: failures both \
                         tracers saw are counted twice",
                        a.file,
                        a.host()
                    ),
                });
            }
        }
    }

    let mut out_sessions = Vec::new();
    let mut offenders: BTreeMap<(String, u32), (OffenderOut, DestTally)> = BTreeMap::new();
    let mut total = 0;
    let mut dropped = 0;
    let mut recorded = 0;
    let mut complete = true;
    let mut per_second: BTreeMap<i64, u64> = BTreeMap::new();
    let mut first_fail: Option<i128> = None;
    let mut last_fail: Option<i128> = None;
    let mut holders: BTreeMap<(String, String, u32), HolderOut> = BTreeMap::new();
    let mut rows: BTreeMap<RowKey, (Option<i128>, DestRow)> = BTreeMap::new();
    let mut settings: BTreeMap<(String, Option<u64>), NetSysctls> = BTreeMap::new();
    let mut evidence: BTreeMap<(String, Option<u64>), Evidence> = BTreeMap::new();

    for s in &unique {
        let host = s.host();
        let c = session_counts(s, filter);
        total += c.total;
        dropped += c.dropped;
        recorded += s.recorded;
        complete &= s.summary.is_some();
        for (sec, n) in &s.per_second {
            *per_second.entry(*sec).or_default() += n;
        }
        for (k, kc) in &c.keys {
            if kc.count == 0 {
                continue;
            }
            first_fail = min_opt(first_fail, kc.first);
            last_fail = max_opt(last_fail, kc.last);
            let (o, dests) = offenders.entry((host.clone(), k.pid)).or_insert_with(|| {
                (
                    OffenderOut {
                        host: host.clone(),
                        pid: k.pid,
                        comm: kc.comm.clone(),
                        netns: s.pid_netns.get(&k.pid).copied(),
                        failures: 0,
                        first_ts: None,
                        last_ts: None,
                        destinations: vec![],
                    },
                    BTreeMap::new(),
                )
            });
            o.failures += kc.count;
            o.first_ts = min_opt(o.first_ts.as_deref().and_then(parse_ts), kc.first).map(rfc3339);
            o.last_ts = max_opt(o.last_ts.as_deref().and_then(parse_ts), kc.last).map(rfc3339);
            if o.comm.is_empty() {
                o.comm = kc.comm.clone();
            }
            *dests.entry((k.dst.clone(), k.errno)).or_default() += kc.count;
        }
        // Holders and busiest destinations: the latest blame of the session.
        if let Some(c) = s.summary.as_ref().or(s.snapshot.as_ref()) {
            for b in &c.blame {
                for h in &b.holders {
                    if !filter.pids.is_empty() && !filter.pid_ok(h.pid) {
                        continue;
                    }
                    let e = holders
                        .entry((host.clone(), b.dst.clone(), h.pid))
                        .or_insert_with(|| HolderOut {
                            host: host.clone(),
                            dst: b.dst.clone(),
                            pid: h.pid,
                            comm: h.comm.clone(),
                            alive: h.alive,
                            sockets: 0,
                            time_wait: 0,
                        });
                    e.sockets = e.sockets.max(h.sockets);
                    e.time_wait = e.time_wait.max(h.time_wait);
                }
            }
        }
        for (ts, r) in &s.rows {
            if r.in_use < 2 || ts.is_some_and(|t| !filter.time_ok(t)) {
                continue;
            }
            let key = (host.clone(), r.netns, r.src.clone(), r.dst.clone());
            let keep = rows
                .get(&key)
                .is_none_or(|(_, old)| r.utilisation > old.utilisation);
            if keep {
                rows.insert(key, (*ts, r.clone()));
            }
        }
        for (ns, sys) in &s.sysctls {
            settings.insert((host.clone(), *ns), sys.clone());
        }
        for (ns, ev) in &s.evidence {
            let e = evidence.entry((host.clone(), *ns)).or_default();
            e.connect_failures += ev.connect_failures;
            e.bind_failures += ev.bind_failures;
            e.udp_failures += ev.udp_failures;
        }
        let (start_ts, end_ts) = (s.start.map(rfc3339), s.end.map(rfc3339));
        let h = s.header.as_ref();
        out_sessions.push(SessionOut {
            file: s.file.clone(),
            header_line: s.header_line,
            host,
            kernel: h.and_then(|h| h.kernel.clone()),
            backend: h.and_then(|h| h.backend.clone()),
            tracer_pid: h.and_then(|h| h.pid),
            start_ts,
            end_ts,
            complete: s.summary.is_some(),
            snapshots: s.snapshots,
            counts_from: c.source,
            failures: c.total,
            dropped_events: c.dropped,
            recorded_events: s.recorded,
            note: c.note,
        });
    }

    let mut offenders: Vec<OffenderOut> = offenders
        .into_values()
        .map(|(mut o, dests)| {
            let mut d: Vec<DestOut> = dests
                .into_iter()
                .map(|((dst, errno), failures)| DestOut {
                    dst,
                    errno,
                    errname: errno_name(errno),
                    failures,
                })
                .collect();
            d.sort_by(|a, b| b.failures.cmp(&a.failures).then_with(|| a.dst.cmp(&b.dst)));
            o.destinations = d;
            o
        })
        .collect();
    offenders.sort_by(|a, b| {
        b.failures
            .cmp(&a.failures)
            .then_with(|| a.host.cmp(&b.host))
            .then(a.pid.cmp(&b.pid))
    });
    let mut holders: Vec<HolderOut> = holders.into_values().collect();
    holders.sort_by(|a, b| b.sockets.cmp(&a.sockets).then(a.pid.cmp(&b.pid)));

    // A destination seen both in a blame entry (no source address) and in a destination row
    // (with one) is the same ports counted twice: keep the row that names the source.
    let with_src: std::collections::BTreeSet<_> = rows
        .keys()
        .filter(|(_, _, src, _)| src.is_some())
        .map(|(host, ns, _, dst)| (host.clone(), *ns, dst.clone()))
        .collect();
    rows.retain(|(host, ns, src, dst), _| {
        src.is_some() || !with_src.contains(&(host.clone(), *ns, dst.clone()))
    });
    let mut dest_rows: Vec<RowOut> = rows
        .into_iter()
        .map(|((host, ..), (ts, row))| RowOut {
            host,
            ts: ts.map(rfc3339),
            row,
        })
        .collect();
    dest_rows.sort_by(|a, b| {
        b.row
            .utilisation
            .partial_cmp(&a.row.utilisation)
            .unwrap_or(std::cmp::Ordering::Equal)
            .then(b.row.in_use.cmp(&a.row.in_use))
            .then_with(|| a.row.dst.cmp(&b.row.dst))
    });

    // Findings per namespace: recorded settings, the busiest rows seen there, and what failed.
    let mut findings = Vec::new();
    let mut scopes: Vec<(String, Option<u64>)> = settings.keys().cloned().collect();
    for k in evidence.keys() {
        if !scopes.contains(k) {
            scopes.push(k.clone());
        }
    }
    let unknown = NetSysctls::default();
    for (host, ns) in &scopes {
        let sys = settings.get(&(host.clone(), *ns)).unwrap_or(&unknown);
        let ns_rows: Vec<DestRow> = dest_rows
            .iter()
            .filter(|r| &r.host == host && (r.row.netns == *ns || r.row.netns.is_none()))
            .map(|r| r.row.clone())
            .collect();
        let ev = evidence.get(&(host.clone(), *ns));
        // A namespace with neither failures nor busy destinations gets only what is wrong.
        let quiet = ev.is_none() && ns_rows.iter().all(|r| r.utilisation < 0.5);
        let recorded = settings.contains_key(&(host.clone(), *ns));
        if !recorded {
            findings.push(ScopedFinding {
                host: host.clone(),
                netns: *ns,
                finding: Finding {
                    id: "settings_not_recorded".into(),
                    severity: crate::doctor::Severity::Info,
                    title: "The settings of this namespace were not recorded".into(),
                    detail: "Its processes exited before the tracer could look inside; run \
                             `portexhaust doctor` there (nsenter --net=/proc/PID/ns/net) to audit \
                             it."
                    .into(),
                    fixes: vec![],
                },
            });
        }
        for f in audit(&Inputs {
            sysctls: sys,
            counters: None,
            destinations: &ns_rows,
            time_wait_total: None,
            bind_holders: None,
            evidence: Some(ev.unwrap_or(&Evidence::default())),
        }) {
            if (quiet && f.severity < crate::doctor::Severity::Warning)
                || (!recorded && f.id == "ip_local_port_range")
            {
                continue;
            }
            findings.push(ScopedFinding {
                host: host.clone(),
                netns: *ns,
                finding: f,
            });
        }
    }
    findings.sort_by_key(|f| std::cmp::Reverse(f.finding.severity));
    dest_rows.truncate(MAX_DEST_ROWS);

    // The recorded time inside the window, in whole seconds.
    let secs = |t: i128| t.div_euclid(1_000_000_000) as i64;
    let clamp = |t: i128| {
        let t = filter.since.map_or(t, |s| t.max(s));
        filter.until.map_or(t, |u| t.min(u))
    };
    let span = unique
        .iter()
        .filter_map(|s| Some((clamp(s.start?), clamp(s.end?))))
        .fold(None, |acc: Option<(i64, i64)>, (a, b)| {
            let (a, b) = (secs(a), secs(b));
            Some(acc.map_or((a, b), |(x, y)| (x.min(a), y.max(b))))
        });
    let tl = timeline(&per_second, span);
    let (peak_per_s, peak_ts) = match tl.peak() {
        Some((i, c)) => (
            Some(c as f64 / tl.bucket_s as f64),
            tl.bucket_ts(i).map(rfc3339),
        ),
        None => (None, None),
    };
    let settings = settings
        .into_iter()
        .map(|((host, netns), sysctls)| SettingsOut {
            host,
            netns,
            range: sysctls.range(),
            sysctls,
        })
        .collect();
    Report {
        kind: "report",
        version: 1,
        files,
        filter: Window {
            since: filter.since.map(rfc3339),
            until: filter.until.map(rfc3339),
            pids: filter.pids.clone(),
        },
        sessions: out_sessions,
        failures_total: total,
        complete,
        dropped_events: dropped,
        recorded_events: recorded,
        first_failure_ts: first_fail.map(rfc3339),
        last_failure_ts: last_fail.map(rfc3339),
        peak_per_s,
        peak_ts,
        timeline: tl,
        offenders,
        holders,
        destinations: dest_rows,
        settings,
        findings,
        problems,
    }
}
