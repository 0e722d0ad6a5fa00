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
use std::{
    collections::{BTreeMap, HashMap},
    fs::{File, OpenOptions},
    io::{self, Read, Seek, SeekFrom, Write},
    net::SocketAddr,
    os::unix::fs::{OpenOptionsExt, PermissionsExt},
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use log::warn;
use portexhaust_common::Cause;

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

/// Rotation: `--record-max-size`, `--record-keep`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Rotate {
    /// A file is rotated before a line would take it past this size.
    pub max_size: u64,
    /// Rotated files kept (`FILE.1` to `FILE.keep`).
    pub keep: u32,
}

/// Write errors that pass (space is freed, a path comes back): the recorder keeps counting and
/// retries. Any other write error ends recording (tracing goes on).
fn passes(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::ENOSPC | libc::EIO | libc::EDQUOT)
    ) || e.kind() == io::ErrorKind::StorageFull
}

/// How often a recorder in a gap tries to write again.
const RETRY_EVERY: Duration = Duration::from_secs(1);
/// Lines are handed to the kernel when this much is buffered, or every [`FLUSH_EVERY`].
const BUFFER: usize = 64 * 1024;

/// What a recorder could not write since its disk filled (or failed): the `gap` line to come.
#[derive(Debug)]
struct Gap {
    from: Ts,
    error: String,
    lines: u64,
    failures: u64,
    snapshots: u64,
    last_try: Instant,
}

/// What kind of line is written: what a gap loses when it cannot be.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    /// Header, settings, tallies (never lost: they wait in memory), summary, the gap line.
    Meta,
    Failure,
    Snapshot,
}

/// Writes one session into a record file. Write errors do not stop tracing. A full or failing
/// disk (ENOSPC, EDQUOT, EIO) opens a gap: no line is written, failures go to the tallies
/// (one entry per key, so memory stays bounded) and the kernel's counts stay exact; writing is
/// retried every second and at each snapshot, and once it works the lines still buffered are
/// completed, a `gap` line says what was not written, and the tallies follow. Any other error
/// is reported once on stderr and recording stops (the live output goes on).
pub struct Recorder {
    path: PathBuf,
    /// None: recording stopped for good.
    file: Option<File>,
    /// Whole lines not yet handed to the kernel; `done` of its bytes already are (a write cut
    /// short by a full disk is completed from here).
    buf: Vec<u8>,
    done: usize,
    /// Bytes in the current file, written or buffered.
    size: u64,
    /// Bytes of lines after this file's header: a file that holds only its header is never
    /// rotated (a header larger than the limit would rotate forever).
    since_header: u64,
    regular: bool,
    rotate: Option<Rotate>,
    /// The run's header, repeated at the top of each rotated part.
    header: Header,
    gap: Option<Gap>,
    dirty: bool,
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

/// 128 random bits, as hex: one run's id in every part of its record.
fn run_id() -> String {
    let mut b = [0u8; 16];
    // SAFETY: `b` is writable for its whole length. getrandom only fails before the kernel's
    // pool is ready at boot; the time and pid are unique enough then.
    let got = unsafe { libc::getrandom(b.as_mut_ptr().cast(), b.len(), 0) };
    if got != b.len() as isize {
        let t = Ts::now().0 ^ (i128::from(std::process::id()) << 64);
        b = t.to_le_bytes();
    }
    b.iter().map(|x| format!("{x:02x}")).collect()
}

impl Recorder {
    /// Create the file and write the header. Called before the tracer announces it is ready,
    /// so a bad path is an error before anything is traced.
    pub fn create(opts: &RecordOptions, header: &Header) -> Result<Self> {
        let file = open_private(&opts.path)
            .map_err(|e| Error::io(format!("opening record file {}", opts.path.display()), e))?;
        let meta = file
            .metadata()
            .map_err(|e| Error::io(format!("opening record file {}", opts.path.display()), e))?;
        let mut header = header.clone();
        header.run_id.get_or_insert_with(run_id);
        header.part = Some(0);
        let mut r = Self {
            path: opts.path.clone(),
            file: Some(file),
            buf: Vec::with_capacity(BUFFER),
            done: 0,
            size: meta.len(),
            since_header: 0,
            regular: meta.is_file(),
            rotate: opts.rotate.filter(|_| meta.is_file()),
            header,
            gap: None,
            dirty: false,
            last_flush: Instant::now(),
            last_snapshot: Instant::now(),
            interval: opts.snapshot_interval,
            cap: opts.events_per_s,
            window: i64::MIN,
            in_window: 0,
            tallies: BTreeMap::new(),
            snap_last: HashMap::new(),
        };
        if opts.rotate.is_some() && !r.regular {
            warn!(
                "{} is not a regular file: it is not rotated",
                opts.path.display()
            );
        }
        let first = r.header.line();
        // An existing record already past the limit rotates before this run's header.
        if r.rotate
            .is_some_and(|o| r.size > 0 && r.size + first.len() as u64 >= o.max_size)
        {
            r.next_file();
        }
        r.header_line();
        // The header goes to disk at once: a record that is only a header still says what ran.
        r.flush();
        if r.file.is_none() || r.gap.is_some() {
            return Err(Error::io(
                format!("writing record file {}", opts.path.display()),
                io::Error::other("the header could not be written"),
            ));
        }
        Ok(r)
    }

    /// The header of the current file.
    fn header_line(&mut self) {
        let text = self.header.line();
        self.buffer(&text);
        self.since_header = 0;
    }

    fn buffer(&mut self, s: &str) {
        self.buf.extend_from_slice(s.as_bytes());
        self.buf.push(b'\n');
        let n = s.len() as u64 + 1;
        self.size += n;
        self.since_header += n;
        self.dirty = true;
    }

    fn line(&mut self, s: &str, kind: Kind) {
        if self.file.is_none() {
            return;
        }
        if let Some(g) = self.gap.as_mut() {
            g.lines += 1;
            match kind {
                Kind::Failure => g.failures += 1,
                Kind::Snapshot => g.snapshots += 1,
                Kind::Meta => {}
            }
            return;
        }
        if let Some(o) = self.rotate
            && self.since_header > 0
            && self.size + s.len() as u64 + 1 > o.max_size
        {
            self.rotate_now();
            if self.gap.is_some() || self.file.is_none() {
                return self.line(s, kind);
            }
        }
        self.buffer(s);
        if self.buf.len() >= BUFFER {
            self.flush();
        }
    }

    /// Start the next part: FILE.i becomes FILE.i+1 and FILE becomes FILE.1 (see
    /// [`Self::next_file`]), and the new FILE starts with the run's header, marked as the next
    /// part.
    fn rotate_now(&mut self) {
        if self.next_file() {
            self.header.part = Some(self.header.part.unwrap_or(0) + 1);
            self.header_line();
        }
    }

    /// What is buffered goes to the current file, then FILE.i becomes FILE.i+1 (the oldest
    /// beyond `keep` is deleted), FILE becomes FILE.1, and an empty FILE is opened. False when
    /// nothing moved (a gap, or renaming failed: then rotation is off).
    fn next_file(&mut self) -> bool {
        let Some(o) = self.rotate else { return false };
        self.flush();
        if self.gap.is_some() || self.file.is_none() {
            return false;
        }
        let numbered = |i: u32| {
            let mut p = self.path.clone().into_os_string();
            p.push(format!(".{i}"));
            PathBuf::from(p)
        };
        let moved = (|| -> io::Result<()> {
            if o.keep == 0 {
                return std::fs::remove_file(&self.path);
            }
            match std::fs::remove_file(numbered(o.keep)) {
                Err(e) if e.kind() != io::ErrorKind::NotFound => return Err(e),
                _ => {}
            }
            for i in (1..o.keep).rev() {
                match std::fs::rename(numbered(i), numbered(i + 1)) {
                    Err(e) if e.kind() != io::ErrorKind::NotFound => return Err(e),
                    _ => {}
                }
            }
            std::fs::rename(&self.path, numbered(1))
        })();
        let file = moved.and_then(|()| open_private(&self.path));
        match file {
            Ok(f) => {
                // The old file is complete on disk before the new one takes over.
                if let Some(old) = self.file.replace(f) {
                    let _ = old.sync_data();
                }
                self.size = 0;
                true
            }
            Err(e) => {
                warn!(
                    "rotating {} failed: {e}; it grows past --record-max-size from now on",
                    self.path.display()
                );
                self.rotate = None;
                false
            }
        }
    }

    /// Hand what is buffered to the kernel, from where the last write stopped.
    fn write_out(&mut self) -> io::Result<()> {
        let Some(f) = self.file.as_mut() else {
            return Ok(());
        };
        while self.done < self.buf.len() {
            match f.write(&self.buf[self.done..]) {
                Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                Ok(n) => self.done += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        self.buf.clear();
        self.done = 0;
        Ok(())
    }

    fn fail(&mut self, e: io::Error) {
        if passes(&e) {
            if self.gap.is_none() {
                warn!(
                    "recording to {}: {e}; tracing goes on and the counts stay exact: failures \
                     are tallied until writing works again (retried every second)",
                    self.path.display()
                );
                self.gap = Some(Gap {
                    from: Ts::now(),
                    error: e.to_string(),
                    lines: 0,
                    failures: 0,
                    snapshots: 0,
                    last_try: Instant::now(),
                });
            }
            return;
        }
        warn!(
            "recording to {} stopped: {e} (tracing goes on)",
            self.path.display()
        );
        self.file = None;
    }

    /// In a gap: write again, at most every [`RETRY_EVERY`] unless `now`. Once the lines still
    /// buffered are out, the `gap` line follows and the gap is over. True when not in a gap.
    fn retry(&mut self, now: bool) -> bool {
        let Some(g) = self.gap.as_mut() else {
            return true;
        };
        if !now && g.last_try.elapsed() < RETRY_EVERY {
            return false;
        }
        g.last_try = Instant::now();
        if let Err(e) = self.write_out() {
            if !passes(&e) {
                self.fail(e);
            }
            return false;
        }
        let Some(g) = self.gap.take() else {
            return true;
        };
        let until = Ts::now();
        log::info!(
            "recording to {} works again after {:.1}s: {} line(s) not written, their failures \
             tallied",
            self.path.display(),
            (until.0 - g.from.0) as f64 / 1e9,
            g.lines
        );
        let line = crate::schema::Gap {
            ts: Some(until),
            from_ts: g.from,
            until_ts: until,
            error: g.error,
            lines: g.lines,
            failures: g.failures,
            snapshots: g.snapshots,
        }
        .line();
        self.line(&line, Kind::Meta);
        self.flush();
        self.gap.is_none()
    }

    /// The settings of a namespace first seen in a failure.
    pub fn sysctls(&mut self, l: &SysctlsLine) {
        // Later parts of a rotated record carry them in their header.
        for (ns, sys) in &l.sysctls {
            self.header.sysctls.insert(*ns, sys.clone());
        }
        self.line(&l.line(), Kind::Meta);
    }

    /// One decoded failure, with its namespace already resolved.
    pub fn failure(&mut self, f: &Failure) {
        let seen = Seen {
            pid: f.pid,
            netns: f.netns,
            ts: f.ts,
            dst: f.dst,
            errno: f.errno,
            proto: f.proto,
            cause: Cause::Unknown,
        };
        self.observe(seen, || Some(f.clone()));
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
            if let Some(g) = self.gap.as_mut() {
                g.lines += 1;
                g.failures += 1;
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
            if self.gap.is_some() {
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
        self.file.is_some() && self.last_snapshot.elapsed() >= self.interval
    }

    /// Write a snapshot of the exact counts: the same totals `trace --json` would print as its
    /// summary now.
    pub fn snapshot(&mut self, totals: &Totals) {
        self.last_snapshot = Instant::now();
        if !self.retry(true) {
            // Not written: the tallies keep counting against the last snapshot that was.
            self.line("", Kind::Snapshot);
            return;
        }
        // Tallies so far belong before the snapshot that counted them.
        self.write_tallies();
        self.line(&totals.snapshot_line(), Kind::Snapshot);
        if self.gap.is_some() {
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
        if self.gap.is_some() {
            // The tallies wait in memory for the disk.
            self.retry(false);
            return;
        }
        if (self.dirty || !self.tallies.is_empty()) && self.last_flush.elapsed() >= FLUSH_EVERY {
            self.write_tallies();
            self.flush();
        }
    }

    pub fn flush(&mut self) {
        self.last_flush = Instant::now();
        if self.gap.is_some() {
            return;
        }
        match self.write_out() {
            Ok(()) => self.dirty = false,
            Err(e) => self.fail(e),
        }
    }

    /// Final snapshot, the summary line, and the data on disk (fdatasync). A disk still full
    /// loses them: the report then counts from the last snapshot that was written.
    pub fn finish(&mut self, totals: &Totals) {
        self.snapshot(totals);
        self.line(&totals.summary_line(), Kind::Meta);
        self.flush();
        if let Some(g) = &self.gap {
            warn!(
                "recording to {}: the disk is still failing ({}): the record ends without its \
                 last {} line(s)",
                self.path.display(),
                g.error,
                g.lines
            );
            return;
        }
        if let Some(f) = self.file.as_ref()
            && let Err(e) = f.sync_data()
        {
            self.fail(e);
        }
    }

    /// Failures whose lines a gap has not written so far (for tests).
    #[cfg(test)]
    fn in_gap(&self) -> Option<(u64, u64)> {
        self.gap.as_ref().map(|g| (g.lines, g.failures))
    }
}

impl Drop for Recorder {
    /// Lines still buffered go to the file (a recorder dropped without `finish`, on an error).
    fn drop(&mut self) {
        if self.gap.is_none() {
            let _ = self.write_out();
        }
    }
}

#[cfg(test)]
mod tests;
