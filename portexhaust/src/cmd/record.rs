//! `portexhaust trace --record FILE`: an NDJSON incident record, appended as events arrive, that
//! `portexhaust report` turns into the story of an outage afterwards.
//!
//! Format, version 1, one JSON object per line:
//! - `{"type":"header","version":1,"host","kernel","start_ts","backend","pid","netns",
//!   "sysctls":{"<netns inode>":{...}},"census":[destination rows],"filters":{...}}` first;
//! - `{"type":"sysctls","ts","netns","sysctls":{"<inode>":{...}},"census":[...]}` the first time
//!   a failure comes from a namespace the header does not describe (read from inside it);
//! - `{"type":"failure",...}` exactly as `trace --json` prints it, at most
//!   `--record-events-per-s` a second;
//! - `{"type":"suppressed","ts","events":[{"pid","comm","netns","dst","errno","count",
//!   "first_ts","last_ts","counted_by_snapshot"?}]}`: the failures beyond that rate, tallied per
//!   (pid, destination, errno) and written at least every second, so that a storm lasting hours
//!   neither fills the disk nor loses a count. `counted_by_snapshot` marks events the last
//!   snapshot had already counted (they were in the ring buffer while it was taken);
//! - `{"type":"snapshot","ts",...}`: the summary's exact in-kernel counts (and whatever else the
//!   summary carries: blame, destinations) every `--snapshot-interval` and at exit, with
//!   `destinations` rows (ports in use per destination) of every namespace that had failures;
//! - `{"type":"summary",...}` as `trace --json` ends, absent if the tracer was killed.
//!
//! Durability: lines are written whole through a buffer that is handed to the kernel at least
//! every second and at exit, so a tracer killed with SIGKILL loses at most the last second, and
//! a cut last line only if it died inside write(2). Appending to an existing record starts a new
//! session (a new header); a cut last line left by a killed run is terminated first so that it
//! stays one bad line rather than corrupting the new header.
use std::{
    collections::{BTreeMap, HashMap, HashSet},
    fs::{File, OpenOptions},
    io::{self, BufWriter, Read, Seek, SeekFrom, Write},
    os::unix::fs::{OpenOptionsExt, PermissionsExt},
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use log::warn;
use serde::{Deserialize, Serialize};

use crate::{
    clock::rfc3339,
    error::{Error, Result},
    kernel::loader::Filters,
    model::Failure,
    nsinfo::{self, NsCensus, in_netns, netns_path},
    procinfo::netns_of,
    render,
    sysctl::NetSysctls,
    usage::{DestRow, busiest, destination_rows},
};

/// The record format this build writes and reads.
pub const RECORD_VERSION: u64 = 1;
/// How often buffered lines are handed to the kernel, at the latest.
pub const FLUSH_EVERY: Duration = Duration::from_millis(500);
/// Census rows kept per namespace: the busiest destinations are what a report needs.
const CENSUS_ROWS: usize = 50;
/// Give up learning a namespace's settings after this many tries (its processes keep exiting).
const NETNS_TRIES: u8 = 3;
/// Namespaces whose destinations a snapshot lists, and rows per namespace.
const USAGE_NAMESPACES: usize = 16;
const USAGE_ROWS: usize = 20;

#[derive(Clone, Debug)]
pub struct RecordOptions {
    pub path: PathBuf,
    pub snapshot_interval: Duration,
    /// Failure lines written per second at most; the rest are tallied (0: tallies only).
    pub events_per_s: u32,
}

/// Failures not written one by one, per (pid, destination, errno, counted by the last snapshot).
/// The destination stays a `SocketAddr` until the tally is written: a storm must not format
/// one string per failure.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
struct TallyKey {
    pid: u32,
    dst: std::net::SocketAddr,
    errno: u32,
    counted: bool,
}

#[derive(Clone, Debug)]
struct Tally {
    comm: String,
    netns: Option<u64>,
    count: u64,
    first_ns: i128,
    last_ns: i128,
}

/// One entry of a `suppressed` line (shared with the reader).
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct SuppressedEntry {
    pub pid: u32,
    #[serde(default)]
    pub comm: String,
    #[serde(default)]
    pub netns: Option<u64>,
    pub dst: String,
    pub errno: u32,
    pub count: u64,
    pub first_ts: String,
    pub last_ts: String,
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub counted_by_snapshot: bool,
}

/// Times in a record have microseconds; comparisons are made at that precision.
fn micros(ns: i128) -> i128 {
    ns.div_euclid(1000) * 1000
}

fn parse_rfc3339(s: &str) -> Option<i128> {
    time::OffsetDateTime::parse(s, &time::format_description::well_known::Rfc3339)
        .ok()
        .map(|t| t.unix_timestamp_nanos())
}

/// Filters the tracer ran with: counts in a filtered record cover only what passed them.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RecordedFilters {
    #[serde(default)]
    pub pids: Vec<u32>,
    #[serde(default)]
    pub comms: Vec<String>,
    #[serde(default)]
    pub dports: Vec<u16>,
}

/// The first line of a session. Every field but `version` is optional on reading: the reader
/// reports what it can from a hand-edited header.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct Header {
    #[serde(rename = "type", default)]
    pub kind: String,
    pub version: u64,
    #[serde(default)]
    pub host: Option<String>,
    #[serde(default)]
    pub kernel: Option<String>,
    #[serde(default)]
    pub start_ts: Option<String>,
    #[serde(default)]
    pub backend: Option<String>,
    #[serde(default)]
    pub pid: Option<u32>,
    /// The tracer's own network namespace.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub netns: Option<u64>,
    #[serde(default)]
    pub sysctls: BTreeMap<String, NetSysctls>,
    #[serde(default)]
    pub census: Vec<DestRow>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub filters: Option<RecordedFilters>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tool: Option<String>,
}

/// Settings (and census) of a namespace first seen after the header.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct SysctlsLine {
    #[serde(rename = "type", default)]
    pub kind: String,
    #[serde(default)]
    pub ts: Option<String>,
    #[serde(default)]
    pub netns: Option<u64>,
    #[serde(default)]
    pub sysctls: BTreeMap<String, NetSysctls>,
    #[serde(default)]
    pub census: Vec<DestRow>,
}

fn read_proc(path: &str) -> Option<String> {
    std::fs::read_to_string(path)
        .ok()
        .map(|s| s.trim().to_string())
        .filter(|s| !s.is_empty())
}

/// Namespaces whose settings the header lists at most.
const HEADER_NAMESPACES: usize = 256;

/// The start-up census: the settings of every namespace that has processes, and the busiest
/// destinations among all of them (sock_diag, through the blame module's census).
fn startup_facts(own: Option<u64>) -> (BTreeMap<String, NetSysctls>, Vec<DestRow>) {
    let rows = destination_rows(&nsinfo::census(None));
    let mut sysctls = BTreeMap::new();
    for (ino, path) in nsinfo::namespaces().into_iter().take(HEADER_NAMESPACES) {
        if let Ok(s) = in_netns(ino, &path, NetSysctls::read_current) {
            sysctls.insert(ino.to_string(), s);
        }
    }
    if let Some(n) = own {
        sysctls
            .entry(n.to_string())
            .or_insert_with(NetSysctls::read_current);
    }
    (sysctls, busiest(rows, CENSUS_ROWS))
}

/// Settings and busiest destinations of the calling thread's namespace, `netns`.
fn namespace_facts(netns: u64) -> (NetSysctls, Vec<DestRow>) {
    let sysctls = NetSysctls::read_current();
    let mut census = Vec::new();
    if sysctls.range().is_some()
        && let Ok(c) = NsCensus::here(netns, &sysctls)
    {
        census = busiest(destination_rows(&[c]), CENSUS_ROWS);
    }
    (sysctls, census)
}

/// Open (or append to) a record file, private to its owner: records name hosts, processes
/// and peers.
fn open_private(path: &Path) -> io::Result<File> {
    let mut f = OpenOptions::new()
        .read(true)
        .append(true)
        .create(true)
        .mode(0o600)
        .open(path)?;
    let meta = f.metadata()?;
    if !meta.is_file() {
        return Ok(f); // a FIFO or a device: nothing to tighten or repair
    }
    if meta.permissions().mode() & 0o077 != 0 {
        warn!(
            "{} was readable by others; making it private (0600)",
            path.display()
        );
        f.set_permissions(std::fs::Permissions::from_mode(0o600))?;
    }
    if meta.len() > 0 {
        let mut last = [0u8; 1];
        f.seek(SeekFrom::End(-1))?;
        f.read_exact(&mut last)?;
        if last[0] != b'\n' {
            // A previous tracer died mid-line: end that line so the new header stands alone.
            f.write_all(b"\n")?;
        }
    }
    Ok(f)
}

/// Writes one session into a record file. Write errors do not stop tracing: they are reported
/// once on stderr and recording stops (the live output goes on).
pub struct Recorder {
    path: PathBuf,
    out: Option<BufWriter<File>>,
    dirty: bool,
    last_flush: Instant,
    last_snapshot: Instant,
    interval: Duration,
    known_netns: HashSet<u64>,
    netns_tries: HashMap<u64, u8>,
    /// A recent failing pid per namespace: the way into it for usage rows.
    netns_pid: HashMap<u64, u32>,
    cap: u32,
    /// The second (of the events' own timestamps) the line budget is counted in.
    window: i128,
    in_window: u32,
    tallies: std::collections::BTreeMap<TallyKey, Tally>,
    /// Per pid, the newest failure the last snapshot had counted (microseconds).
    snap_last: HashMap<u32, i128>,
}

impl Recorder {
    /// Create the file and write the header. Called before the tracer announces it is ready,
    /// so a bad path is an error before anything is traced.
    pub fn create(opts: &RecordOptions, backend: &str, filters: &Filters) -> Result<Self> {
        let file = open_private(&opts.path)
            .map_err(|e| Error::io(format!("opening record file {}", opts.path.display()), e))?;
        let netns = netns_of(std::process::id());
        let (sysctls, census) = startup_facts(netns);
        let header = Header {
            kind: "header".into(),
            version: RECORD_VERSION,
            host: read_proc("/proc/sys/kernel/hostname"),
            kernel: read_proc("/proc/sys/kernel/osrelease"),
            start_ts: Some(rfc3339(now_unix_ns())),
            backend: Some(backend.to_string()),
            pid: Some(std::process::id()),
            netns,
            sysctls: sysctls.clone(),
            census,
            filters: Some(RecordedFilters {
                pids: filters.pids.clone(),
                comms: filters.comms.clone(),
                dports: filters.dports.clone(),
            }),
            tool: Some(format!("portexhaust {}", env!("CARGO_PKG_VERSION"))),
        };
        let mut r = Self {
            path: opts.path.clone(),
            out: Some(BufWriter::with_capacity(64 * 1024, file)),
            dirty: false,
            last_flush: Instant::now(),
            last_snapshot: Instant::now(),
            interval: opts.snapshot_interval,
            known_netns: sysctls.keys().filter_map(|k| k.parse().ok()).collect(),
            netns_tries: HashMap::new(),
            netns_pid: HashMap::new(),
            cap: opts.events_per_s,
            window: i128::MIN,
            in_window: 0,
            tallies: std::collections::BTreeMap::new(),
            snap_last: HashMap::new(),
        };
        let line = serde_json::to_string(&header)
            .map_err(|e| Error::io("encoding the record header", io::Error::other(e)))?;
        r.line(&line);
        // The header goes to disk at once: a record that is only a header still says what ran.
        r.flush();
        if r.out.is_none() {
            return Err(Error::io(
                format!("writing record file {}", opts.path.display()),
                io::Error::other("the header could not be written"),
            ));
        }
        Ok(r)
    }

    fn line(&mut self, s: &str) {
        let Some(out) = self.out.as_mut() else { return };
        let r = out
            .write_all(s.as_bytes())
            .and_then(|()| out.write_all(b"\n"));
        match r {
            Ok(()) => self.dirty = true,
            Err(e) => self.fail(e),
        }
    }

    fn fail(&mut self, e: io::Error) {
        warn!(
            "recording to {} stopped: {e} (tracing goes on)",
            self.path.display()
        );
        self.out = None;
    }

    /// One decoded failure, with its namespace already resolved.
    pub fn failure(&mut self, f: &Failure) {
        self.observe(f.pid, f.netns, f.ts_unix_ns, f.dst, f.errno, || {
            Some(f.clone())
        });
    }

    /// One failure as the live path has it: `full` builds the decoded failure, which only the
    /// lines within the per-second budget need; the rest are tallied without it.
    pub fn observe(
        &mut self,
        pid: u32,
        netns: Option<u64>,
        unix_ns: i128,
        dst: std::net::SocketAddr,
        errno: u32,
        full: impl FnOnce() -> Option<Failure>,
    ) {
        if let Some(ns) = netns {
            if !self.known_netns.contains(&ns) {
                self.learn_netns(ns, pid);
            }
            if self.netns_pid.len() < 4 * USAGE_NAMESPACES || self.netns_pid.contains_key(&ns) {
                self.netns_pid.insert(ns, pid);
            }
        }
        let second = unix_ns.div_euclid(1_000_000_000);
        if second != self.window {
            self.window = second;
            self.in_window = 0;
        }
        if self.in_window < self.cap {
            self.in_window += 1;
            if let Some(f) = full() {
                self.line(&render::json_line(&f));
            }
            return;
        }
        let ts = micros(unix_ns);
        let counted = self.snap_last.get(&pid).is_some_and(|last| ts <= *last);
        let key = TallyKey {
            pid,
            dst,
            errno,
            counted,
        };
        match self.tallies.get_mut(&key) {
            Some(t) => {
                t.count += 1;
                t.first_ns = t.first_ns.min(ts);
                t.last_ns = t.last_ns.max(ts);
            }
            None => {
                let comm = full().map(|f| f.comm).unwrap_or_default();
                self.tallies.insert(
                    key,
                    Tally {
                        comm,
                        netns,
                        count: 1,
                        first_ns: ts,
                        last_ns: ts,
                    },
                );
            }
        }
    }

    /// Failures the kernel counted but did not stream (a storm over the events-per-second
    /// budget): they join the record's own tallies, exactly.
    #[allow(clippy::too_many_arguments)]
    pub fn tally(
        &mut self,
        pid: u32,
        netns: Option<u64>,
        comm: &str,
        dst: std::net::SocketAddr,
        errno: u32,
        count: u64,
        last_ts: &str,
    ) {
        let ts = micros(parse_rfc3339(last_ts).unwrap_or_else(now_unix_ns));
        let counted = self.snap_last.get(&pid).is_some_and(|last| ts <= *last);
        let t = self
            .tallies
            .entry(TallyKey {
                pid,
                dst,
                errno,
                counted,
            })
            .or_insert_with(|| Tally {
                comm: comm.to_string(),
                netns,
                count: 0,
                first_ns: ts,
                last_ns: ts,
            });
        t.count += count;
        t.first_ns = t.first_ns.min(ts);
        t.last_ns = t.last_ns.max(ts);
    }

    /// Write the tallied failures as one `suppressed` line.
    fn write_tallies(&mut self) {
        if self.tallies.is_empty() {
            return;
        }
        let events: Vec<SuppressedEntry> = std::mem::take(&mut self.tallies)
            .into_iter()
            .map(|(k, t)| SuppressedEntry {
                pid: k.pid,
                comm: t.comm,
                netns: t.netns,
                dst: k.dst.to_string(),
                errno: k.errno,
                count: t.count,
                first_ts: rfc3339(t.first_ns),
                last_ts: rfc3339(t.last_ns),
                counted_by_snapshot: k.counted,
            })
            .collect();
        let line = serde_json::json!({
            "type": "suppressed",
            "ts": rfc3339(now_unix_ns()),
            "events": events,
        });
        self.line(&line.to_string());
    }

    /// Ports in use per destination in every namespace that had failures (read from inside
    /// each, through a process that failed there). Namespaces that are gone are forgotten.
    fn usage_rows(&mut self) -> Vec<DestRow> {
        let mut rows = Vec::new();
        let mut gone = Vec::new();
        for (&ns, &pid) in self.netns_pid.iter().take(USAGE_NAMESPACES) {
            match in_netns(ns, &netns_path(pid), || namespace_facts(ns).1) {
                Ok(r) => rows.extend(busiest(r, USAGE_ROWS)),
                Err(_) => gone.push(ns),
            }
        }
        for ns in gone {
            self.netns_pid.remove(&ns);
        }
        rows
    }

    /// Read the settings of a namespace first seen in an event, from inside it (through the
    /// failing process, which is most likely still alive right after its failure).
    fn learn_netns(&mut self, ns: u64, pid: u32) {
        let tries = self.netns_tries.entry(ns).or_default();
        if *tries >= NETNS_TRIES {
            return;
        }
        *tries += 1;
        match in_netns(ns, &netns_path(pid), || namespace_facts(ns)) {
            Ok((sysctls, census)) => {
                self.known_netns.insert(ns);
                let line = SysctlsLine {
                    kind: "sysctls".into(),
                    ts: Some(rfc3339(now_unix_ns())),
                    netns: Some(ns),
                    sysctls: BTreeMap::from([(ns.to_string(), sysctls)]),
                    census,
                };
                if let Ok(s) = serde_json::to_string(&line) {
                    self.line(&s);
                }
            }
            Err(e) => {
                log::debug!("settings of network namespace {ns} (pid {pid}): {e}");
            }
        }
    }

    pub fn snapshot_due(&self) -> bool {
        self.out.is_some() && self.last_snapshot.elapsed() >= self.interval
    }

    /// Write a snapshot from the summary line `trace --json` would print now. Whatever the
    /// summary carries (offenders; blame and destinations when it has them) is kept, and
    /// destination rows from the namespaces that failed are added when it has none.
    pub fn snapshot(&mut self, summary_json: &str) {
        self.last_snapshot = Instant::now();
        // Tallies so far belong before the snapshot that counted them.
        self.write_tallies();
        let rows = self.usage_rows();
        if let Some(line) = snapshot_line(summary_json, now_unix_ns(), &rows) {
            self.line(&line);
        }
        self.snap_last = last_per_pid(summary_json);
        self.flush();
    }

    /// Hand buffered lines to the kernel if the oldest may be getting old.
    pub fn flush_if_due(&mut self) {
        if (self.dirty || !self.tallies.is_empty()) && self.last_flush.elapsed() >= FLUSH_EVERY {
            self.write_tallies();
            self.flush();
        }
    }

    pub fn flush(&mut self) {
        self.last_flush = Instant::now();
        if let Some(out) = self.out.as_mut() {
            match out.flush() {
                Ok(()) => self.dirty = false,
                Err(e) => self.fail(e),
            }
        }
    }

    /// Final snapshot, the summary line, and the data on disk (fdatasync).
    pub fn finish(&mut self, summary_json: &str) {
        self.snapshot(summary_json);
        self.line(summary_json);
        self.flush();
        if let Some(out) = self.out.as_mut()
            && let Err(e) = out.get_ref().sync_data()
        {
            self.fail(e);
        }
    }
}

fn now_unix_ns() -> i128 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as i128)
        .unwrap_or(0)
}

/// `{"type":"summary",...}` -> `{"type":"snapshot","ts":...,...}`, with `rows` as its
/// `destinations` unless the summary brings its own.
pub fn snapshot_line(summary_json: &str, unix_ns: i128, rows: &[DestRow]) -> Option<String> {
    let mut v: serde_json::Map<String, serde_json::Value> =
        serde_json::from_str(summary_json).ok()?;
    v.insert("type".into(), "snapshot".into());
    v.insert("ts".into(), rfc3339(unix_ns).into());
    if !rows.is_empty() && !v.contains_key("destinations") {
        v.insert("destinations".into(), serde_json::to_value(rows).ok()?);
    }
    serde_json::to_string(&v).ok()
}

/// Per pid, the newest failure a summary's offenders had counted (microseconds).
fn last_per_pid(summary_json: &str) -> HashMap<u32, i128> {
    let mut out = HashMap::new();
    let Ok(v) = serde_json::from_str::<serde_json::Value>(summary_json) else {
        return out;
    };
    for o in v["offenders"].as_array().into_iter().flatten() {
        let (Some(pid), Some(last)) = (
            o["pid"].as_u64().and_then(|p| u32::try_from(p).ok()),
            o["last_ts"].as_str().and_then(parse_rfc3339),
        ) else {
            continue;
        };
        let e = out.entry(pid).or_insert(last);
        *e = (*e).max(last);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::MetadataExt;

    fn opts(path: &Path) -> RecordOptions {
        RecordOptions {
            path: path.to_path_buf(),
            snapshot_interval: Duration::from_secs(10),
            events_per_s: 1000,
        }
    }

    fn lines(path: &Path) -> Vec<serde_json::Value> {
        std::fs::read_to_string(path)
            .expect("read")
            .lines()
            .map(|l| serde_json::from_str(l).expect("json line"))
            .collect()
    }

    #[test]
    fn header_is_written_at_once_and_the_file_is_private() {
        let dir = tempfile::tempdir().expect("tmp");
        let path = dir.path().join("rec.ndjson");
        let r = Recorder::create(&opts(&path), "tracepoint", &Filters::default()).expect("create");
        let meta = std::fs::metadata(&path).expect("meta");
        assert_eq!(meta.mode() & 0o777, 0o600);
        let l = lines(&path);
        assert_eq!(l.len(), 1);
        assert_eq!(l[0]["type"], "header");
        assert_eq!(l[0]["version"], 1);
        assert_eq!(l[0]["backend"], "tracepoint");
        assert_eq!(l[0]["pid"], std::process::id());
        assert!(l[0]["start_ts"].as_str().is_some_and(|t| t.ends_with('Z')));
        let ns = l[0]["netns"].as_u64().expect("netns").to_string();
        assert!(
            l[0]["sysctls"][&ns]["ip_local_port_range"].is_array(),
            "{}",
            l[0]
        );
        assert!(l[0]["census"].is_array());
        drop(r);
    }

    #[test]
    fn snapshot_and_summary_lines() {
        let dir = tempfile::tempdir().expect("tmp");
        let path = dir.path().join("rec.ndjson");
        let mut r =
            Recorder::create(&opts(&path), "tracepoint", &Filters::default()).expect("create");
        let summary = r#"{"type":"summary","backend":"tracepoint","duration_s":1.0,"failures_total":3,"dropped_events":0,"offenders":[],"blame":[{"dst":"1.2.3.4:80"}]}"#;
        r.snapshot(summary);
        r.finish(summary);
        let l = lines(&path);
        let kinds: Vec<&str> = l.iter().filter_map(|v| v["type"].as_str()).collect();
        assert_eq!(kinds, ["header", "snapshot", "snapshot", "summary"]);
        assert_eq!(l[1]["failures_total"], 3);
        assert_eq!(
            l[1]["blame"][0]["dst"], "1.2.3.4:80",
            "extra summary fields are kept"
        );
        assert!(l[1]["ts"].as_str().is_some());
    }

    #[test]
    fn appending_terminates_a_cut_line_and_tightens_permissions() {
        let dir = tempfile::tempdir().expect("tmp");
        let path = dir.path().join("rec.ndjson");
        std::fs::write(
            &path,
            "{\"type\":\"header\",\"version\":1}\n{\"type\":\"fail",
        )
        .expect("w");
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).expect("chmod");
        let r = Recorder::create(&opts(&path), "tracepoint", &Filters::default()).expect("create");
        drop(r);
        let text = std::fs::read_to_string(&path).expect("read");
        let l: Vec<&str> = text.lines().collect();
        assert_eq!(l[1], "{\"type\":\"fail");
        assert!(l[2].starts_with("{\"type\":\"header\""), "{text}");
        assert_eq!(std::fs::metadata(&path).expect("m").mode() & 0o777, 0o600);
    }

    #[test]
    fn unwritable_path_is_a_clear_error() {
        let e = Recorder::create(
            &opts(Path::new("/nonexistent-dir/x.ndjson")),
            "tracepoint",
            &Filters::default(),
        )
        .err()
        .expect("error");
        let s = e.to_string();
        assert!(s.contains("/nonexistent-dir/x.ndjson"), "{s}");
    }

    #[test]
    fn snapshot_line_rewrites_the_type() {
        let s = snapshot_line(r#"{"type":"summary","failures_total":1}"#, 0, &[]).expect("line");
        let v: serde_json::Value = serde_json::from_str(&s).expect("json");
        assert_eq!(v["type"], "snapshot");
        assert_eq!(v["ts"], "1970-01-01T00:00:00.000000Z");
        assert!(v.get("destinations").is_none());
        assert!(snapshot_line("not json", 0, &[]).is_none());
        let row = DestRow {
            dst: "1.2.3.4:80".into(),
            in_use: 5,
            ..Default::default()
        };
        let s =
            snapshot_line(r#"{"type":"summary"}"#, 0, std::slice::from_ref(&row)).expect("line");
        let v: serde_json::Value = serde_json::from_str(&s).expect("json");
        assert_eq!(v["destinations"][0]["dst"], "1.2.3.4:80");
        // The summary's own rows win.
        let s = snapshot_line(r#"{"type":"summary","destinations":[]}"#, 0, &[row]).expect("line");
        let v: serde_json::Value = serde_json::from_str(&s).expect("json");
        assert_eq!(v["destinations"], serde_json::json!([]));
    }

    fn failure_at(pid: u32, us: i128) -> Failure {
        use crate::model::{Family, Proto};
        use portexhaust_common::{Backend, Site};
        Failure {
            ts_unix_ns: 1_764_069_600_000_000_000 + us * 1000 + 7,
            pid,
            tid: pid,
            uid: 0,
            comm: "app".into(),
            cgroup_id: 1,
            netns: None,
            family: Family::Ipv4,
            proto: Proto::Tcp,
            dst: "10.0.0.1:80".parse().expect("addr"),
            src: None,
            container: None,
            errno: 99,
            site: Site::InetHashConnect,
            backend: Backend::Tracepoint,
        }
    }

    #[test]
    fn failures_beyond_the_rate_are_tallied_exactly() {
        let dir = tempfile::tempdir().expect("tmp");
        let path = dir.path().join("rec.ndjson");
        let mut o = opts(&path);
        o.events_per_s = 3;
        let mut r = Recorder::create(&o, "tracepoint", &Filters::default()).expect("create");
        for us in 0..10 {
            r.failure(&failure_at(7, us));
        }
        // The kernel had counted up to us=9 (plus two it still held, us=10 and 11).
        let summary = format!(
            r#"{{"type":"summary","failures_total":12,"dropped_events":0,"offenders":[{{"pid":7,"comm":"app","failures":12,"first_ts":"{}","last_ts":"{}","destinations":[]}}]}}"#,
            rfc3339(1_764_069_600_000_000_000),
            rfc3339(1_764_069_600_000_011_000),
        );
        r.snapshot(&summary);
        for us in 10..15 {
            r.failure(&failure_at(7, us));
        }
        r.finish(&summary);
        let l = lines(&path);
        let kinds: Vec<&str> = l.iter().filter_map(|v| v["type"].as_str()).collect();
        assert_eq!(
            kinds,
            [
                "header",
                "failure",
                "failure",
                "failure",
                "suppressed",
                "snapshot",
                "suppressed",
                "snapshot",
                "summary"
            ]
        );
        assert_eq!(l[4]["events"][0]["count"], 7);
        assert!(l[4]["events"][0].get("counted_by_snapshot").is_none());
        let after = l[6]["events"].as_array().expect("events");
        assert_eq!(after.len(), 2);
        let counted: Vec<(u64, bool)> = after
            .iter()
            .map(|e| {
                (
                    e["count"].as_u64().expect("count"),
                    e["counted_by_snapshot"].as_bool().unwrap_or(false),
                )
            })
            .collect();
        assert!(
            counted.contains(&(2, true)) && counted.contains(&(3, false)),
            "{counted:?}"
        );
    }
}
