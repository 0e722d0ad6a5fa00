//! The file under a [`Recorder`](super::Recorder): whole lines through its own buffer, rotation
//! (`--record-max-size`, `--record-keep`), and the gap a full or failing disk opens.
//!
//! Its own buffer rather than a `BufWriter`: after a failed write it knows how much of each
//! line reached the file, so that the rest of a cut line is written when space returns.
use std::{
    fs::{File, OpenOptions},
    io::{self, Read, Seek, SeekFrom, Write},
    os::unix::fs::{OpenOptionsExt, PermissionsExt},
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use log::warn;

use super::Rotate;
use crate::schema::{Header, SysctlsLine, Ts};

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
/// Lines are handed to the kernel when this much is buffered, or every `FLUSH_EVERY`.
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
pub(super) enum Kind {
    /// Header, settings, tallies (never lost: they wait in memory), summary, the gap line.
    Meta,
    Failure,
    Snapshot,
}

/// The record file of one run: see the module documentation.
pub(super) struct RecordFile {
    path: PathBuf,
    /// None: recording stopped for good.
    pub(super) file: Option<File>,
    /// Whole lines not yet handed to the kernel; `done` of its bytes already are (a write cut
    /// short by a full disk is completed from here).
    buf: Vec<u8>,
    done: usize,
    /// Bytes in the current file, written or buffered.
    size: u64,
    /// Bytes of lines after this file's header: a file that holds only its header is never
    /// rotated (a header larger than the limit would rotate forever).
    since_header: u64,
    rotate: Option<Rotate>,
    /// The run's header, repeated at the top of each rotated part.
    header: Header,
    gap: Option<Gap>,
    pub(super) dirty: bool,
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

impl RecordFile {
    /// Open (or append to) `path` and write the run's header (given a run id and part 0) to
    /// it at once: a record that is only a header still says what ran.
    pub(super) fn create(path: &Path, rotate: Option<Rotate>, header: &Header) -> io::Result<Self> {
        let file = open_private(path)?;
        let meta = file.metadata()?;
        let mut header = header.clone();
        header.run_id.get_or_insert_with(run_id);
        header.part = Some(0);
        if rotate.is_some() && !meta.is_file() {
            warn!(
                "{} is not a regular file: it is not rotated",
                path.display()
            );
        }
        let mut r = Self {
            path: path.to_path_buf(),
            file: Some(file),
            buf: Vec::with_capacity(BUFFER),
            done: 0,
            size: meta.len(),
            since_header: 0,
            rotate: rotate.filter(|_| meta.is_file()),
            header,
            gap: None,
            dirty: false,
        };
        let first = r.header.line();
        // An existing record already past the limit rotates before this run's header.
        if r.rotate
            .is_some_and(|o| r.size > 0 && r.size + first.len() as u64 >= o.max_size)
        {
            r.next_file();
        }
        r.header_line();
        r.flush();
        if r.file.is_none() || r.gap.is_some() {
            return Err(io::Error::other("the header could not be written"));
        }
        Ok(r)
    }

    /// Recording stopped for good (an error no retry fixes).
    pub(super) fn stopped(&self) -> bool {
        self.file.is_none()
    }

    pub(super) fn in_gap(&self) -> bool {
        self.gap.is_some()
    }

    /// A failure that would have had a line of its own but was tallied: the gap says so.
    pub(super) fn skipped_failure(&mut self) {
        if let Some(g) = self.gap.as_mut() {
            g.lines += 1;
            g.failures += 1;
        }
    }

    /// Lines and failures a gap has not written so far.
    #[cfg(test)]
    pub(super) fn gap_counts(&self) -> Option<(u64, u64)> {
        self.gap.as_ref().map(|g| (g.lines, g.failures))
    }

    /// A namespace first seen after the header: later parts carry its settings in theirs.
    pub(super) fn learn(&mut self, l: &SysctlsLine) {
        for (ns, sys) in &l.sysctls {
            self.header.sysctls.insert(*ns, sys.clone());
        }
    }

    pub(super) fn flush(&mut self) {
        if self.gap.is_some() {
            return;
        }
        match self.write_out() {
            Ok(()) => self.dirty = false,
            Err(e) => self.fail(e),
        }
    }

    /// The data on disk (fdatasync), or say why it cannot be.
    pub(super) fn sync(&mut self) {
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

    pub(super) fn line(&mut self, s: &str, kind: Kind) {
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
    pub(super) fn write_out(&mut self) -> io::Result<()> {
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
    pub(super) fn retry(&mut self, now: bool) -> bool {
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
}

impl Drop for RecordFile {
    /// Lines still buffered go to the file (a recorder dropped without `finish`, on an error).
    fn drop(&mut self) {
        if self.gap.is_none() {
            let _ = self.write_out();
        }
    }
}
