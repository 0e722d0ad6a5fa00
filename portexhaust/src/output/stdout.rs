//! Results to stdout, where a reader that goes away (`| head`, `| grep -m1`, a closed socket) is
//! the normal end of the output, not an error: every command writes through [`Out`] (or
//! [`print`], built on it), so none panics on EPIPE (as `println!` does) and each ends quietly
//! with exit status 0. Rust ignores SIGPIPE, so the kernel's EPIPE arrives here as
//! `BrokenPipe`.
//!
//! Any other write error (a full disk under `> file`) is still an error: [`print`] returns it,
//! and [`Out`]'s infallible methods warn once and stop writing.
use std::{
    io::{self, BufWriter, Stdout, StdoutLock, Write},
    os::fd::{AsFd, AsRawFd},
};

use log::warn;

/// A writer whose reader may go away: once a write fails, everything after it is dropped and
/// `closed` says so (`trace` stops at it, detaching its probes and finishing its record).
pub struct Out<W: Write + Reader = BufWriter<Stdout>> {
    pub w: W,
    pub closed: bool,
}

/// A closed pipe: the reader has what it wanted.
pub fn reader_gone(e: &io::Error) -> bool {
    e.kind() == io::ErrorKind::BrokenPipe
}

/// Whether the reader has gone without a write to find out: `trace --json | head -1` must end
/// when `head` does, not at the next failure, which may be days away.
pub trait Reader {
    fn gone(&self) -> bool {
        false
    }
}

/// poll(2) sets POLLERR on the write end of a pipe with no reader left (and on a socket whose
/// peer went); a terminal or a file never has it.
fn pollerr(fd: impl AsFd) -> bool {
    let mut p = libc::pollfd {
        fd: fd.as_fd().as_raw_fd(),
        events: libc::POLLOUT,
        revents: 0,
    };
    // SAFETY: one valid pollfd, no wait.
    let n = unsafe { libc::poll(&mut p, 1, 0) };
    n == 1 && p.revents & libc::POLLERR != 0
}

impl Reader for BufWriter<Stdout> {
    fn gone(&self) -> bool {
        pollerr(self.get_ref())
    }
}
impl Reader for StdoutLock<'_> {
    fn gone(&self) -> bool {
        pollerr(self)
    }
}
impl Reader for Vec<u8> {}

impl Out {
    /// Buffered stdout (lines reach the reader at each `flush`).
    pub fn stdout() -> Self {
        Self::new(BufWriter::with_capacity(64 * 1024, io::stdout()))
    }
}

impl<W: Write + Reader> Out<W> {
    pub fn new(w: W) -> Self {
        Self { w, closed: false }
    }

    /// `b` as it is. Ok when written, or dropped because the reader has gone; Err for any
    /// other failure (after which nothing more is written either).
    pub fn try_bytes(&mut self, b: &[u8]) -> io::Result<()> {
        if self.closed || b.is_empty() {
            return Ok(());
        }
        let r = self.w.write_all(b);
        self.outcome(r)
    }

    /// Flush, then look whether the reader is still there (one poll(2), no wait): a reader
    /// that went is the same end as a write that failed with EPIPE.
    pub fn try_flush(&mut self) -> io::Result<()> {
        if self.closed {
            return Ok(());
        }
        let r = self.w.flush();
        self.outcome(r)?;
        if !self.closed && self.w.gone() {
            self.closed = true;
        }
        Ok(())
    }

    fn outcome(&mut self, r: io::Result<()>) -> io::Result<()> {
        match r {
            Ok(()) => Ok(()),
            Err(e) => {
                self.closed = true;
                if reader_gone(&e) { Ok(()) } else { Err(e) }
            }
        }
    }

    /// One line (its newline added). A failure other than a closed pipe is warned about.
    pub fn line(&mut self, s: &str) {
        if self.closed {
            return;
        }
        let r = self
            .w
            .write_all(s.as_bytes())
            .and_then(|()| self.w.write_all(b"\n"));
        self.warn(r);
    }

    /// A batch of whole lines, written as it is (one write for a drained ring buffer).
    pub fn bytes(&mut self, b: &[u8]) {
        let r = self.try_bytes(b);
        self.warn(r);
    }

    pub fn flush(&mut self) {
        let r = self.try_flush();
        self.warn(r);
    }

    fn warn(&mut self, r: io::Result<()>) {
        if let Err(e) = self.outcome(r) {
            warn!("writing to stdout: {e}");
        }
    }
}

/// Write `text` to stdout and flush: Ok when the reader took it or went away (EPIPE), Err for
/// any other failure.
pub fn print(text: &str) -> io::Result<()> {
    let mut o = Out::new(io::stdout().lock());
    o.try_bytes(text.as_bytes())?;
    o.try_flush()
}

/// [`print`] with a newline.
pub fn println(text: &str) -> io::Result<()> {
    let mut o = Out::new(io::stdout().lock());
    o.try_bytes(text.as_bytes())?;
    o.try_bytes(b"\n")?;
    o.try_flush()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Accepts `room` bytes, then fails every write with `kind`.
    struct Pipe {
        got: Vec<u8>,
        room: usize,
        kind: io::ErrorKind,
    }
    impl Reader for Pipe {}
    impl Write for Pipe {
        fn write(&mut self, b: &[u8]) -> io::Result<usize> {
            if self.room == 0 {
                return Err(io::Error::from(self.kind));
            }
            let n = b.len().min(self.room);
            self.room -= n;
            self.got.extend_from_slice(&b[..n]);
            Ok(n)
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    fn pipe(room: usize, kind: io::ErrorKind) -> Out<Pipe> {
        Out::new(Pipe {
            got: Vec::new(),
            room,
            kind,
        })
    }

    #[test]
    fn a_closed_pipe_ends_the_output_quietly() {
        let mut o = pipe(6, io::ErrorKind::BrokenPipe);
        o.line("first");
        assert!(!o.closed);
        assert!(o.try_bytes(b"second\n").is_ok(), "EPIPE is not an error");
        assert!(o.closed);
        // Nothing more is tried once the reader is gone.
        o.line("third");
        assert!(o.try_flush().is_ok());
        assert_eq!(o.w.got, b"first\n");
    }

    #[test]
    fn a_pipe_without_a_reader_is_seen_without_writing() {
        let mut fds = [0; 2];
        // SAFETY: a two-int array for pipe(2).
        assert_eq!(unsafe { libc::pipe(fds.as_mut_ptr()) }, 0);
        // SAFETY: both fds are ours, just made, and each is owned once.
        let (r, w) = unsafe {
            use std::os::fd::{FromRawFd, OwnedFd};
            (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1]))
        };
        assert!(!pollerr(&w), "a reader is there");
        drop(r);
        assert!(pollerr(&w), "the reader went");
    }

    #[test]
    fn other_write_errors_are_errors() {
        let mut o = pipe(0, io::ErrorKind::StorageFull);
        let e = o.try_bytes(b"x").expect_err("a full disk is an error");
        assert_eq!(e.kind(), io::ErrorKind::StorageFull);
        assert!(o.closed);
        assert!(o.try_bytes(b"y").is_ok(), "reported once, then dropped");
    }
}
