//! `portexhaust trace --record FILE`: an NDJSON incident record, appended as events arrive, that
//! `portexhaust report` turns into the story of an outage afterwards.
//!
//! Its lines are the schema's records (see `crate::schema`), version 2: the `header` first,
//! `sysctls` when a failure comes from a namespace the header does not describe, `failure`
//! lines exactly as `trace --json` prints them (at most `--record-events-per-s` a second), and
//! `tally` lines for the failures beyond that rate or not streamed at all, per (pid,
//! destination, errno, cause), written at least every second, so that a storm lasting hours
//! neither fills the disk nor loses a count. `counted_by_snapshot` marks failures the last
//! snapshot had already counted (they were in the ring buffer while it was taken). A
//! `snapshot` of the exact in-kernel counts follows every `--snapshot-interval` and at exit,
//! and the `summary` as `trace --json` ends it (absent if the tracer was killed).
//!
//! The recorder writes what it is given: the header's facts, each namespace's settings, the
//! counts. Gathering them is the kernel layer's job.
//!
//! Durability: lines are written whole through a buffer that is handed to the kernel at least
//! every second and at exit, so a tracer killed with SIGKILL loses at most the last second, and
//! a cut last line only if it died inside write(2). Appending to an existing record starts a new
//! session (a new header); a cut last line left by a killed run is terminated first so that it
//! stays one bad line rather than corrupting the new header.
//!
//! Long runs (`record/file.rs`): `--record-max-size` rotates the file at a line boundary, each
//! part starting with the run's header (one `run_id`, the next `part`); a full or failing disk
//! opens a gap in which failures are only tallied, ended by a `gap` line once writing works.
use std::{
    collections::{BTreeMap, HashMap},
    net::SocketAddr,
    path::PathBuf,
    time::{Duration, Instant},
};

use portexhaust_common::Cause;

use self::file::{Kind, RecordFile};
use crate::{
    engine::counts::KeyCount,
    kernel::{Error, Result},
    schema::{Errno, Failure, Header, Proto, SysctlsLine, Tally, Totals, Ts},
};

/// How often buffered lines are handed to the kernel at least.
pub const FLUSH_EVERY: Duration = Duration::from_millis(500);

#[derive(Clone, Debug)]
pub struct RecordOptions {
    pub path: PathBuf,
    pub snapshot_interval: Duration,
    /// Failure lines written per second at most; the rest are tallied (0: tallies only).
    pub events_per_s: u32,
    /// None: the file grows as long as tracing runs.
    pub rotate: Option<Rotate>,
}

/// One failure as the live path knows it, before (or without) decoding it whole.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Seen {
    pub pid: u32,
    pub netns: Option<u64>,
    pub ts: Ts,
    pub dst: SocketAddr,
    pub errno: Errno,
    pub proto: Proto,
    pub cause: Cause,
}

impl Seen {
    /// A decoded failure as seen, tallied under `cause`.
    pub fn of(f: &Failure, cause: Cause) -> Self {
        Self {
            pid: f.pid,
            netns: f.netns,
            ts: f.ts,
            dst: f.dst,
            errno: f.errno,
            proto: f.proto,
            cause,
        }
    }
}

/// Failures not written one by one, per (pid, destination, errno, cause, counted by the last
/// snapshot). The destination stays a `SocketAddr` until the tally is written: a storm must
/// not format one string per failure.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
struct TallyKey {
    pid: u32,
    dst: SocketAddr,
    errno: Errno,
    proto: Proto,
    cause: Cause,
    counted: bool,
}

/// Rotation: `--record-max-size`, `--record-keep`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Rotate {
    /// A file is rotated before a line would take it past this size.
    pub max_size: u64,
    /// Rotated files kept (`FILE.1` to `FILE.keep`).
    pub keep: u32,
}

/// Writes one session into a record file. Write errors do not stop tracing. A full or failing
/// disk (ENOSPC, EDQUOT, EIO) opens a gap: no line is written, failures go to the tallies
/// (one entry per key, so memory stays bounded) and the kernel's counts stay exact; writing is
/// retried every second and at each snapshot, and once it works the lines still buffered are
/// completed, a `gap` line says what was not written, and the tallies follow. Any other error
/// is reported once on stderr and recording stops (the live output goes on).
pub struct Recorder {
    file: RecordFile,
    last_flush: Instant,
    last_snapshot: Instant,
    interval: Duration,
    cap: u32,
    /// The second (of the events' own timestamps) the line budget is counted in.
    window: i64,
    in_window: u32,
    tallies: BTreeMap<TallyKey, KeyCount>,
    /// Per pid, the newest failure the last snapshot written had counted (microseconds).
    snap_last: HashMap<u32, Ts>,
}

impl Recorder {
    /// Create the file and write the header. Called before the tracer announces it is ready,
    /// so a bad path is an error before anything is traced.
    pub fn create(opts: &RecordOptions, header: &Header) -> Result<Self> {
        let file = RecordFile::create(&opts.path, opts.rotate, header)
            .map_err(|e| Error::io(format!("opening record file {}", opts.path.display()), e))?;
        Ok(Self {
            file,
            last_flush: Instant::now(),
            last_snapshot: Instant::now(),
            interval: opts.snapshot_interval,
            cap: opts.events_per_s,
            window: i64::MIN,
            in_window: 0,
            tallies: BTreeMap::new(),
            snap_last: HashMap::new(),
        })
    }

    fn line(&mut self, s: &str, kind: Kind) {
        self.file.line(s, kind);
    }

    /// The settings of a namespace first seen in a failure.
    pub fn sysctls(&mut self, l: &SysctlsLine) {
        self.file.learn(l);
        self.line(&l.line(), Kind::Meta);
    }

    /// One decoded failure, with its namespace already resolved.
    pub fn failure(&mut self, f: &Failure) {
        self.observe(Seen::of(f, Cause::Unknown), || Some(f.clone()));
    }

    /// One failure as the live path has it: `full` builds the decoded failure, which only the
    /// lines within the per-second budget need; the rest are tallied without it.
    pub fn observe(&mut self, seen: Seen, full: impl FnOnce() -> Option<Failure>) {
        let second = seen.ts.secs();
        if second != self.window {
            self.window = second;
            self.in_window = 0;
        }
        // In a gap no line is written: every failure is tallied, and counted as a line the
        // gap did not write if it would have had one.
        if self.in_window < self.cap {
            self.in_window += 1;
            if self.file.in_gap() {
                self.file.skipped_failure();
            } else {
                if let Some(f) = full() {
                    self.line(&f.line(), Kind::Failure);
                }
                return;
            }
        }
        let key = self.key(&seen);
        let ts = seen.ts.micros();
        match self.tallies.get_mut(&key) {
            Some(t) => t.add(ts, "", seen.netns),
            None => {
                let mut t = KeyCount::default();
                let comm = full().map(|f| f.comm).unwrap_or_default();
                t.add(ts, &comm, seen.netns);
                self.tallies.insert(key, t);
            }
        }
    }

    fn key(&self, s: &Seen) -> TallyKey {
        let ts = s.ts.micros();
        TallyKey {
            pid: s.pid,
            dst: s.dst,
            errno: s.errno,
            proto: s.proto,
            cause: s.cause,
            counted: self.snap_last.get(&s.pid).is_some_and(|last| ts <= *last),
        }
    }

    /// Failures the kernel counted but did not stream (a storm over the events-per-second
    /// budget, or a full ring buffer): they join the record's own tallies, exactly.
    pub fn tally(&mut self, t: &Tally) {
        let seen = Seen {
            pid: t.pid,
            netns: t.netns,
            ts: t.last_ts,
            dst: t.dst,
            errno: t.errno,
            proto: t.proto,
            cause: t.cause,
        };
        let key = self.key(&seen);
        let last = t.last_ts.micros();
        self.tallies.entry(key).or_default().add_n(
            t.count,
            Some(t.first_ts.map_or(last, Ts::micros)),
            Some(last),
            &t.comm,
            t.netns,
        );
    }

    /// Write the tallied failures, one `tally` line per key.
    fn write_tallies(&mut self) {
        let now = Ts::now();
        for (k, c) in std::mem::take(&mut self.tallies) {
            if self.file.in_gap() {
                // The disk filled while writing them: the rest wait in memory, still counted.
                self.tallies.insert(k, c);
                continue;
            }
            let Some(last_ts) = c.last else { continue };
            let t = Tally {
                ts: Some(now),
                pid: k.pid,
                comm: c.comm,
                netns: c.netns,
                proto: k.proto,
                dst: k.dst,
                errno: k.errno,
                cause: k.cause,
                count: c.count,
                first_ts: c.first,
                last_ts,
                counted_by_snapshot: k.counted,
            };
            self.line(&t.line(), Kind::Meta);
        }
    }

    pub fn snapshot_due(&self) -> bool {
        !self.file.stopped() && self.last_snapshot.elapsed() >= self.interval
    }

    /// Write a snapshot of the exact counts: the same totals `trace --json` would print as its
    /// summary now.
    pub fn snapshot(&mut self, totals: &Totals) {
        self.last_snapshot = Instant::now();
        if !self.file.retry(true) {
            // Not written: the tallies keep counting against the last snapshot that was.
            self.line("", Kind::Snapshot);
            return;
        }
        // Tallies so far belong before the snapshot that counted them.
        self.write_tallies();
        self.line(&totals.snapshot_line(), Kind::Snapshot);
        if self.file.in_gap() {
            return;
        }
        self.snap_last.clear();
        for o in &totals.offenders {
            if let Some(last) = o.last_ts {
                let e = self.snap_last.entry(o.pid).or_insert(last.micros());
                *e = (*e).max(last.micros());
            }
        }
        self.flush();
    }

    /// Hand buffered lines to the kernel if the oldest may be getting old.
    pub fn flush_if_due(&mut self) {
        if self.file.in_gap() {
            // The tallies wait in memory for the disk.
            self.file.retry(false);
            return;
        }
        if (self.file.dirty || !self.tallies.is_empty()) && self.last_flush.elapsed() >= FLUSH_EVERY
        {
            self.write_tallies();
            self.flush();
        }
    }

    pub fn flush(&mut self) {
        self.last_flush = Instant::now();
        self.file.flush();
    }

    /// Final snapshot, the summary line, and the data on disk (fdatasync). A disk still full
    /// loses them: the report then counts from the last snapshot that was written.
    pub fn finish(&mut self, totals: &Totals) {
        self.snapshot(totals);
        self.line(&totals.summary_line(), Kind::Meta);
        self.flush();
        self.file.sync();
    }

    /// Lines and failures a gap has not written so far (for tests).
    #[cfg(test)]
    fn in_gap(&self) -> Option<(u64, u64)> {
        self.file.gap_counts()
    }
}

mod file;
#[cfg(test)]
mod tests;
