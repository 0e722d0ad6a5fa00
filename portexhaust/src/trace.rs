//! `portexhaust trace`: stream failures from the ring buffer, summarise on exit.
use std::{
    io::{self, Write},
    os::fd::{AsRawFd, RawFd},
    time::{Duration, Instant},
};

use log::warn;
use tokio::{
    io::unix::AsyncFd,
    signal::unix::{SignalKind, signal},
};

use crate::{
    aggregate::{Summary, offenders},
    clock::Clock,
    error::{Error, Result},
    loader::{BackendRequest, Filters, Tracer, backend_hooks},
    model::{Failure, decode_event},
    procinfo::NetnsCache,
    render,
};

#[derive(Clone, Debug)]
pub struct TraceOptions {
    pub json: bool,
    pub duration: Option<Duration>,
    pub filters: Filters,
    pub backend: BackendRequest,
}

/// Longest an event can wait in the ring buffer for the reader (events after the first of a
/// burst are submitted without a wakeup).
const DRAIN_INTERVAL: Duration = Duration::from_millis(50);

/// Only the fd, for readiness: the ring buffer itself stays inside the Tracer.
struct Fd(RawFd);
impl AsRawFd for Fd {
    fn as_raw_fd(&self) -> RawFd {
        self.0
    }
}

/// Announce on stderr which backend runs and why the others were not used.
pub fn announce(tracer: &Tracer, skipped: &[(portexhaust_common::Backend, String)]) {
    for (b, reason) in skipped {
        eprintln!("portexhaust: backend {} skipped: {reason}", b.name());
    }
    eprintln!(
        "portexhaust: using backend {} ({})",
        tracer.backend.name(),
        backend_hooks(tracer.backend)
    );
}

/// Writes results to stdout; a closed pipe (`| head`) ends tracing quietly.
struct Out {
    w: io::BufWriter<io::Stdout>,
    closed: bool,
}

impl Out {
    fn line(&mut self, s: &str) {
        if self.closed {
            return;
        }
        if let Err(e) = writeln!(self.w, "{s}") {
            self.fail(e);
        }
    }
    fn flush(&mut self) {
        if !self.closed
            && let Err(e) = self.w.flush()
        {
            self.fail(e);
        }
    }
    fn fail(&mut self, e: io::Error) {
        if e.kind() != io::ErrorKind::BrokenPipe {
            warn!("writing to stdout: {e}");
        }
        self.closed = true;
    }
}

struct Session {
    tracer: Tracer,
    clock: Clock,
    netns: NetnsCache,
    out: Out,
    json: bool,
    decode_errors: u64,
}

impl Session {
    fn drain(&mut self) {
        let Self {
            tracer,
            clock,
            netns,
            out,
            json,
            decode_errors,
        } = self;
        let mut batch: Vec<Failure> = Vec::new();
        tracer.drain(|bytes| match decode_event(bytes, |t| clock.to_unix_ns(t)) {
            Ok((_, f)) => batch.push(f),
            Err(e) => {
                *decode_errors += 1;
                if *decode_errors <= 3 {
                    warn!("undecodable event: {e}");
                }
            }
        });
        for mut f in batch {
            f.netns = netns.get(f.pid);
            let line = if *json {
                render::json_line(&f)
            } else {
                render::human_line(&f)
            };
            out.line(&line);
        }
        out.flush();
    }

    fn summary(&self, elapsed: Duration) -> Result<Summary> {
        let counts = self.tracer.counts()?;
        Ok(Summary {
            backend: self.tracer.backend.name(),
            duration_s: elapsed.as_secs_f64(),
            failures_total: self.tracer.failures_total()?,
            dropped_events: self.tracer.dropped_events()?,
            uncounted_keys: self.tracer.uncounted_keys()?,
            offenders: offenders(&counts, |t| self.clock.to_unix_ns(t)),
        })
    }
}

pub async fn run(opts: TraceOptions) -> Result<Summary> {
    let opened = Tracer::open(opts.backend, &opts.filters)?;
    announce(&opened.tracer, &opened.skipped);
    // SAFETY: the fd belongs to the ring buffer map inside the Tracer, which `s` owns for the
    // whole loop below and drops only after `ready_fd` (declared later, dropped first).
    let ring_fd = opened.tracer.ring_fd();
    let mut sigterm =
        signal(SignalKind::terminate()).map_err(|e| Error::io("installing SIGTERM handler", e))?;
    let mut sigint =
        signal(SignalKind::interrupt()).map_err(|e| Error::io("installing SIGINT handler", e))?;

    let mut s = Session {
        tracer: opened.tracer,
        clock: Clock::new(),
        netns: NetnsCache::default(),
        out: Out {
            w: io::BufWriter::with_capacity(64 * 1024, io::stdout()),
            closed: false,
        },
        json: opts.json,
        decode_errors: 0,
    };
    let ready_fd = unsafe { AsyncFd::register(Fd(ring_fd)) }
        .map_err(|e| Error::io("watching the ring buffer", e.into()))?;
    if !s.json {
        s.out.line(&render::human_header());
        s.out.flush();
    }
    let started = Instant::now();
    // Scripts and benchmarks wait for this line: everything is attached and being read.
    eprintln!(
        "portexhaust: ready: tracing port-exhaustion failures with the {} backend{}",
        s.tracer.backend.name(),
        match opts.duration {
            Some(d) => format!(" for {}s", d.as_secs_f64()),
            None => "; Ctrl-C to stop".to_string(),
        }
    );
    let deadline = opts.duration.map(|d| tokio::time::Instant::now() + d);
    // The eBPF side rate-limits ring-buffer wakeups in a storm (see `wakeup_flags` there): an
    // event submitted without one is picked up by this tick at the latest.
    let mut tick = tokio::time::interval(DRAIN_INTERVAL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        let sleep = async {
            match deadline {
                Some(d) => tokio::time::sleep_until(d).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            guard = ready_fd.readable() => {
                let mut guard = guard.map_err(|e| Error::io("waiting on the ring buffer", e))?;
                s.drain();
                guard.clear_ready();
            }
            _ = tick.tick() => s.drain(),
            _ = sigint.recv() => break,
            _ = sigterm.recv() => break,
            _ = sleep => break,
        }
        if s.out.closed {
            break;
        }
    }
    // Events submitted before the stop request are still in the buffer.
    s.drain();
    let summary = s.summary(started.elapsed())?;
    let text = if s.json {
        render::json_summary(&summary)
    } else {
        render::human_summary(&summary)
    };
    s.out.line(&text);
    s.out.flush();
    Ok(summary)
}
