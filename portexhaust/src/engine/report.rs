//! From replayed sessions to one report. Pure.
//!
//! # How counts are combined (the rule `report --help` refers to)
//!
//! Per session (one tracer run), the best data wins:
//! 1. a `summary` line (the tracer stopped cleanly): its exact in-kernel counts;
//! 2. else the last `snapshot` (the tracer was killed or is still running): its exact in-kernel
//!    counts, plus the failure and tally lines after it that it had not counted yet. A line
//!    written after the snapshot is "already counted" when its time is not later than the
//!    newest failure the kernel had counted for that pid (the offender's `last_ts`): such lines
//!    were waiting in the ring buffer while the snapshot was taken;
//! 3. else (killed before the first snapshot) the lines themselves: every failure line that was
//!    flushed is one failure, every tally its count, so the count is exact for what reached
//!    the disk.
//!
//! Failures the ring buffer dropped are in the kernel counts (rules 1 and 2) but have no line;
//! drops after the last snapshot of a killed tracer are unknowable, and the report says so.
//! With `--since`/`--until`, a session that lies wholly inside the window keeps these rules;
//! one that straddles it is counted from its lines inside the window (snapshots are cumulative
//! and cannot be cut in time). `--pid` applies to all three.
//! The parts of a rotated record are one session (see `engine::session`): its latest snapshot
//! or summary, never a sum of the parts' snapshots.
//! Sessions are added up; the same session passed twice is counted once, and sessions of one
//! host that overlap in time are flagged (two tracers see the same failures).
use std::collections::{BTreeMap, BTreeSet, HashMap};

use serde::Serialize;

use super::{
    census::PortSpace,
    counts::{self, Counts},
    session::{Filter, Session},
    timeline::Timeline,
    whatif::with_what_if,
};
use crate::{
    advice::{BoundConnects, Evidence, Finding},
    schema::{
        BlameEntry, CallSite, DestRow, Gap, Holder, Level, NatEntry, NetSysctls, Offender,
        PortRange, Problem, Ts,
    },
};

mod findings;
mod notes;

use findings::findings;
use notes::notes;

const MAX_DEST_ROWS: usize = 30;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum CountSource {
    /// The summary line: exact.
    Summary,
    /// Last snapshot plus the lines after it.
    SnapshotAndEvents,
    /// Failure and tally lines only.
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
    pub start_ts: Option<Ts>,
    pub end_ts: Option<Ts>,
    /// A summary was written: the tracer stopped cleanly.
    pub complete: bool,
    pub snapshots: u64,
    pub counts_from: CountSource,
    pub failures: u64,
    pub dropped_events: u64,
    pub recorded_events: u64,
    /// From the latest counts of the session (0 when it had none).
    pub uncounted_keys: u64,
    pub tracked_sockets: u64,
    pub lru_evictions: u64,
    pub note: Option<String>,
    /// A rotated record: the files of the run's later parts, in order (`file` is the first).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub more_files: Vec<String>,
}

/// Lines a record could not write (a full disk): where it says so, and what was lost.
#[derive(Clone, Debug, Serialize)]
pub struct GapOut {
    pub host: String,
    pub file: String,
    pub line: Option<u64>,
    #[serde(flatten)]
    pub gap: Gap,
}

/// A value of one host.
#[derive(Clone, Debug, Serialize)]
pub struct OnHost<T> {
    pub host: String,
    #[serde(flatten)]
    pub item: T,
}

/// A holder of one destination of one host.
#[derive(Clone, Debug, Serialize)]
pub struct HolderOut {
    pub host: String,
    pub dst: std::net::SocketAddr,
    pub netns: Option<u64>,
    #[serde(flatten)]
    pub holder: Holder,
}

#[derive(Clone, Debug, Serialize)]
pub struct RowOut {
    pub host: String,
    /// When this row (the busiest seen for this destination) was taken.
    pub ts: Option<Ts>,
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

#[derive(Clone, Debug, Serialize)]
pub struct FileOut {
    pub path: String,
    pub usable: bool,
    pub lines: u64,
    pub sessions: usize,
}

#[derive(Clone, Debug, Default, Serialize)]
pub struct Window {
    pub since: Option<Ts>,
    pub until: Option<Ts>,
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
    /// Failures in the totals that no offender holds (the kernel's counts map was full).
    pub uncounted_keys: u64,
    /// Socket owners the tracers' bounded maps had to forget (attribution lost).
    pub lru_evictions: u64,
    pub first_failure_ts: Option<Ts>,
    pub last_failure_ts: Option<Ts>,
    pub peak_per_s: Option<f64>,
    pub peak_ts: Option<Ts>,
    pub timeline: Timeline,
    pub offenders: Vec<OnHost<Offender>>,
    /// The latest blame of each session: who failed towards each destination, who held it.
    pub blame: Vec<OnHost<BlameEntry>>,
    pub holders: Vec<HolderOut>,
    /// The latest call sites of each session (cumulative in-kernel counts: the last snapshot
    /// or the summary, never a sum), most failures and holds first.
    pub call_sites: Vec<OnHost<CallSite>>,
    /// The latest source-NAT section of each session (`trace --catch nat`): per NAT namespace,
    /// destination and NAT address, the exact drops, the NAT's ports in use and who held them.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub nat: Vec<OnHost<NatEntry>>,
    pub destinations: Vec<RowOut>,
    pub settings: Vec<SettingsOut>,
    pub findings: Vec<ScopedFinding>,
    /// Where the records could not write (their failures are still counted).
    pub gaps: Vec<GapOut>,
    pub problems: Vec<Problem>,
}

struct SessionCounts {
    source: CountSource,
    keys: Counts,
    total: u64,
    dropped: u64,
    note: Option<String>,
}

fn pid_filtered(offenders: &[Offender], f: &Filter) -> Counts {
    counts::from_offenders(offenders.iter().filter(|o| f.pid_ok(o.pid)))
}

fn session_counts(s: &Session, f: &Filter) -> SessionCounts {
    let whole = !f.windowed()
        || (s.start.is_some_and(|t| f.time_ok(t)) && s.end.is_some_and(|t| f.time_ok(t)));
    let by_pid = !f.pids.is_empty();
    let lines_only = |note: Option<String>| SessionCounts {
        source: CountSource::Events,
        total: s.recorded,
        keys: s.lines.clone(),
        // Drops are known only as a session total: they cannot be placed in a window.
        dropped: 0,
        note,
    };
    if !whole {
        return lines_only(Some(
            "straddles the time window: counted from its failure lines inside it".into(),
        ));
    }
    if let Some(sum) = &s.summary {
        let keys = pid_filtered(&sum.totals.offenders, f);
        let total = if by_pid {
            keys.values().map(|k| k.count).sum()
        } else {
            sum.totals.failures_total
        };
        return SessionCounts {
            source: CountSource::Summary,
            keys,
            total,
            dropped: sum.totals.dropped_events,
            note: None,
        };
    }
    if let Some(snap) = &s.snapshot {
        let mut keys = pid_filtered(&snap.totals.offenders, f);
        let mut added = 0;
        for (k, a) in &s.after {
            added += a.count;
            counts::tally(&mut keys, *k, a);
        }
        let total = if by_pid {
            keys.values().map(|k| k.count).sum()
        } else {
            snap.totals.failures_total + added
        };
        return SessionCounts {
            source: CountSource::SnapshotAndEvents,
            keys,
            total,
            dropped: snap.totals.dropped_events,
            note: Some(format!(
                "no summary (tracer killed?): exact counts of the snapshot at {} plus {added} \
                 failure line(s) recorded after it",
                snap.totals
                    .ts
                    .map(Ts::rfc3339)
                    .unwrap_or_else(|| format!("line {}", snap.line.unwrap_or(0)))
            )),
        };
    }
    let note = s
        .header
        .is_some()
        .then(|| "no summary and no snapshot (tracer killed early?): counted from the failure lines flushed to disk".to_string());
    lines_only(note)
}

/// (host, netns, source, destination).
type RowKey = (
    String,
    Option<u64>,
    Option<std::net::IpAddr>,
    std::net::SocketAddr,
);

/// The same session given twice (the same file, or a copy) is counted once; two tracers on
/// one host at once see the same failures, which is said.
fn distinct(sessions: Vec<Session>, problems: &mut Vec<Problem>) -> Vec<Session> {
    let mut seen: HashMap<(String, u32, Ts), String> = HashMap::new();
    let mut unique: Vec<Session> = Vec::new();
    for s in sessions {
        if let Some(id) = s.identity() {
            if let Some(first) = seen.get(&id) {
                problems.push(Problem {
                    file: s.file.clone(),
                    line: s.header_line,
                    level: Level::Warning,
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
                    level: Level::Warning,
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
    unique
}

/// Build the report.
pub fn build(
    files: Vec<FileOut>,
    sessions: Vec<Session>,
    filter: &Filter,
    mut problems: Vec<Problem>,
) -> Report {
    let unique = distinct(sessions, &mut problems);
    let mut out_sessions = Vec::new();
    let mut per_host: BTreeMap<String, Counts> = BTreeMap::new();
    let mut netns_of: HashMap<(String, u32), u64> = HashMap::new();
    let (mut total, mut dropped, mut recorded, mut uncounted, mut evicted) = (0, 0, 0, 0, 0);
    let mut complete = true;
    let mut per_second: BTreeMap<i64, u64> = BTreeMap::new();
    let mut blame: Vec<OnHost<BlameEntry>> = Vec::new();
    let mut holders: BTreeMap<(String, std::net::SocketAddr, Option<u32>, String), HolderOut> =
        BTreeMap::new();
    let mut rows: BTreeMap<RowKey, (Option<Ts>, DestRow)> = BTreeMap::new();
    let mut settings: BTreeMap<(String, Option<u64>), NetSysctls> = BTreeMap::new();
    let mut evidence: BTreeMap<(String, Option<u64>), Evidence> = BTreeMap::new();
    let mut call_sites: Vec<OnHost<CallSite>> = Vec::new();
    let mut nat: Vec<OnHost<NatEntry>> = Vec::new();

    let mut gaps = Vec::new();
    for s in &unique {
        let host = s.host();
        let c = session_counts(s, filter);
        notes(s, &host, &mut problems, &mut gaps);
        total += c.total;
        dropped += c.dropped;
        recorded += s.recorded;
        complete &= s.summary.is_some();
        for (sec, n) in &s.per_second {
            *per_second.entry(*sec).or_default() += n;
        }
        let keys = per_host.entry(host.clone()).or_default();
        for (k, kc) in &c.keys {
            counts::tally(keys, *k, kc);
        }
        for (pid, ns) in &s.pid_netns {
            netns_of.insert((host.clone(), *pid), *ns);
        }
        let latest = s.latest().map(|l| &l.totals);
        // Cumulative, like the call sites: the latest section, never a sum.
        nat.extend(latest.iter().flat_map(|t| &t.nat).map(|e| OnHost {
            host: host.clone(),
            item: e.clone(),
        }));
        let (u, tracked, lru) = latest.map_or((0, 0, 0), |t| {
            (t.uncounted_keys, t.tracked_sockets, t.lru_evictions)
        });
        uncounted += u;
        evicted += lru;
        // Holders and blame: the latest of the session.
        for b in latest.map(|t| t.blame.as_slice()).unwrap_or_default() {
            if !filter.pids.is_empty() && !b.failers.iter().any(|f| filter.pid_ok(f.pid)) {
                continue;
            }
            for h in &b.holders {
                if !filter.pids.is_empty() && !h.pid.is_some_and(|p| filter.pid_ok(p)) {
                    continue;
                }
                let e = holders
                    .entry((host.clone(), b.dst, h.pid, h.comm.clone()))
                    .or_insert_with(|| HolderOut {
                        host: host.clone(),
                        dst: b.dst,
                        netns: b.netns,
                        holder: Holder {
                            sockets: 0,
                            time_wait: 0,
                            ..h.clone()
                        },
                    });
                e.holder.sockets = e.holder.sockets.max(h.sockets);
                e.holder.time_wait = e.holder.time_wait.max(h.time_wait);
                e.holder.share = e.holder.share.max(h.share);
            }
            blame.push(OnHost {
                host: host.clone(),
                item: b.clone(),
            });
        }
        let sites: Vec<CallSite> = latest
            .map(|t| t.call_sites.as_slice())
            .unwrap_or_default()
            .iter()
            .filter(|c| filter.pid_ok(c.pid))
            .cloned()
            .collect();
        let mut by_ns: BTreeMap<Option<u64>, Vec<CallSite>> = BTreeMap::new();
        for c in &sites {
            by_ns.entry(c.netns).or_default().push(c.clone());
        }
        for (ns, list) in by_ns {
            let bound = BoundConnects::of_sites(&list);
            if !bound.is_empty() {
                evidence
                    .entry((host.clone(), ns))
                    .or_default()
                    .bound_connects
                    .extend(bound);
            }
        }
        call_sites.extend(sites.into_iter().map(|c| OnHost {
            host: host.clone(),
            item: c,
        }));
        for (ts, r) in &s.rows {
            if r.in_use < 2 || ts.is_some_and(|t| !filter.time_ok(t)) {
                continue;
            }
            let key = (host.clone(), r.netns, r.src, r.dst);
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
            e.collisions += ev.collisions;
            e.snat_drops += ev.snat_drops;
            e.udp_failures += ev.udp_failures;
            e.bound_connects.extend(ev.bound_connects.iter().cloned());
        }
        let h = s.header.as_ref();
        out_sessions.push(SessionOut {
            file: s.file.clone(),
            header_line: s.header_line,
            host,
            kernel: h.and_then(|h| h.kernel.clone()),
            backend: h.and_then(|h| h.backend).map(|b| b.name().to_string()),
            tracer_pid: h.and_then(|h| h.pid),
            start_ts: s.start,
            end_ts: s.end,
            complete: s.summary.is_some(),
            snapshots: s.snapshots,
            counts_from: c.source,
            failures: c.total,
            dropped_events: c.dropped,
            recorded_events: s.recorded,
            uncounted_keys: u,
            tracked_sockets: tracked,
            lru_evictions: lru,
            note: c.note,
            more_files: s.more_files.clone(),
        });
    }

    // Offenders: one list per host, through the same grouping the tracer uses.
    let mut offenders: Vec<OnHost<Offender>> = Vec::new();
    for (host, keys) in &per_host {
        for mut o in counts::offenders(keys) {
            if o.netns.is_none() {
                o.netns = netns_of.get(&(host.clone(), o.pid)).copied();
            }
            offenders.push(OnHost {
                host: host.clone(),
                item: o,
            });
        }
    }
    offenders.sort_by(|a, b| {
        b.item
            .failures
            .cmp(&a.item.failures)
            .then_with(|| a.host.cmp(&b.host))
            .then(a.item.pid.cmp(&b.item.pid))
    });
    let first_fail = offenders.iter().filter_map(|o| o.item.first_ts).min();
    let last_fail = offenders.iter().filter_map(|o| o.item.last_ts).max();
    let mut holders: Vec<HolderOut> = holders.into_values().collect();
    holders.sort_by(|a, b| {
        b.holder
            .sockets
            .cmp(&a.holder.sockets)
            .then(a.holder.pid.cmp(&b.holder.pid))
    });

    // A destination seen both in a blame entry (no source address) and in a destination row
    // (with one) is the same ports counted twice: keep the row that names the source.
    let with_src: BTreeSet<_> = rows
        .keys()
        .filter(|(_, _, src, _)| src.is_some())
        .map(|(host, ns, _, dst)| (host.clone(), *ns, *dst))
        .collect();
    rows.retain(|(host, ns, src, dst), _| {
        src.is_some() || !with_src.contains(&(host.clone(), *ns, *dst))
    });
    let mut dest_rows: Vec<RowOut> = rows
        .into_iter()
        .map(|((host, ..), (ts, row))| RowOut { host, ts, row })
        .collect();
    dest_rows.sort_by(|a, b| {
        b.row
            .utilisation
            .partial_cmp(&a.row.utilisation)
            .unwrap_or(std::cmp::Ordering::Equal)
            .then(b.row.in_use.cmp(&a.row.in_use))
            .then_with(|| a.row.dst.cmp(&b.row.dst))
    });

    call_sites.sort_by(|a, b| {
        (b.item.failures, b.item.holds(), b.item.connects)
            .cmp(&(a.item.failures, a.item.holds(), a.item.connects))
            .then_with(|| a.host.cmp(&b.host))
    });
    let findings = findings(&settings, &evidence, &dest_rows, &nat);
    dest_rows.truncate(MAX_DEST_ROWS);
    // What each fix would buy, from what the record saw (its rows have no live rate: the
    // TIME_WAIT sockets give it) under the namespace's recorded settings.
    for d in &mut dest_rows {
        let ports = settings
            .get(&(d.host.clone(), d.row.netns))
            .map(PortSpace::from)
            .unwrap_or_default();
        d.row = with_what_if(std::mem::replace(&mut d.row, placeholder()), &ports);
    }

    // The recorded time inside the window, in whole seconds.
    let clamp = |t: Ts| {
        let t = filter.since.map_or(t, |s| t.max(s));
        filter.until.map_or(t, |u| t.min(u))
    };
    let span = unique
        .iter()
        .filter_map(|s| Some((clamp(s.start?), clamp(s.end?))))
        .fold(None, |acc: Option<(i64, i64)>, (a, b)| {
            let (a, b) = (a.secs(), b.secs());
            Some(acc.map_or((a, b), |(x, y)| (x.min(a), y.max(b))))
        });
    let tl = Timeline::new(&per_second, span);
    let (peak_per_s, peak_ts) = match tl.peak() {
        Some((i, c)) => (Some(c as f64 / tl.bucket_s as f64), tl.bucket_ts(i)),
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
        version: crate::schema::VERSION,
        files,
        filter: Window {
            since: filter.since,
            until: filter.until,
            pids: filter.pids.clone(),
        },
        sessions: out_sessions,
        failures_total: total,
        complete,
        dropped_events: dropped,
        recorded_events: recorded,
        uncounted_keys: uncounted,
        lru_evictions: evicted,
        first_failure_ts: first_fail,
        last_failure_ts: last_fail,
        peak_per_s,
        peak_ts,
        timeline: tl,
        offenders,
        blame,
        holders,
        call_sites,
        nat,
        destinations: dest_rows,
        settings,
        findings,
        gaps,
        problems,
    }
}
/// A row to swap out while its owner is rewritten (never seen).
fn placeholder() -> DestRow {
    DestRow::new(
        None,
        None,
        std::net::SocketAddr::from(([0, 0, 0, 0], 0)),
        None,
        0,
        Default::default(),
    )
}
