//! `portexhaust trace`: stream failures from the ring buffer, summarise on exit.
use std::{
    io::{self, Write},
    net::SocketAddr,
    os::fd::{AsRawFd, RawFd},
    sync::Arc,
    time::{Duration, Instant},
};

use log::warn;
use portexhaust_common::FailureEvent;
use tokio::{
    io::unix::AsyncFd,
    signal::unix::{SignalKind, signal},
};

use crate::{
    aggregate::{Summary, offenders},
    clock::Clock,
    container::Resolver,
    error::{Error, Result},
    kernel::loader::{BackendRequest, Filters, Tracer},
    line::EventWriter,
    metrics::{self, Metrics, MetricsOptions},
    model::failure_from_event,
    procinfo::NetnsCache,
    record::{RecordOptions, Recorder},
    render::{self, Tally},
    view::{Collector, Scope},
};

#[derive(Clone, Debug)]
pub struct TraceOptions {
    pub json: bool,
    pub duration: Option<Duration>,
    pub filters: Filters,
    pub backend: BackendRequest,
    pub max_tracked: u32,
    /// Ownership tracking, latency histograms and the blame summary (`--no-blame` turns off).
    pub blame: bool,
    /// Serve Prometheus metrics here (`--metrics-addr`).
    pub metrics_addr: Option<SocketAddr>,
    /// Container labels on the metrics (`--no-container-labels` turns them off).
    pub container_labels: bool,
    /// `--record FILE`: an incident record for `portexhaust report`.
    pub record: Option<RecordOptions>,
    /// `--catch`: extra failure kinds to watch even with syscall tracepoints (`KIND_*` bits).
    pub catch: u32,
    /// `--events-per-s`: failure events streamed per second at most (0: all); the rest are
    /// counted and tallied.
    pub events_per_s: u32,
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

/// Announce on stderr which backend runs, why the others were not used, and which failure
/// kinds are watched (a kind that is not watched is said so, never shown as 0 later).
pub fn announce(tracer: &Tracer, skipped: &[(portexhaust_common::Backend, String)]) {
    for (b, reason) in skipped {
        eprintln!("portexhaust: backend {} skipped: {reason}", b.name());
    }
    eprintln!(
        "portexhaust: using backend {}{}",
        tracer.backend.name(),
        if tracer.on_syscall_path() {
            "; syscall tracepoints attached (every syscall on the machine pays for them)"
        } else {
            "; nothing on the syscall path"
        }
    );
    for c in &tracer.coverage {
        match &c.watch {
            Ok(hooks) => eprintln!("portexhaust: watching {}: {hooks}", c.name()),
            Err(why) => eprintln!("portexhaust: not watching {}: {why}", c.name()),
        }
    }
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

    /// A batch of whole lines, written as it is (one write for a drained ring buffer).
    fn bytes(&mut self, b: &[u8]) {
        if self.closed || b.is_empty() {
            return;
        }
        if let Err(e) = self.w.write_all(b) {
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

/// What the previous event of a batch established, so that a storm from one process pays
/// for its lookups once, not per failure.
#[derive(Default)]
struct Memo {
    pid: Option<u32>,
    cgroup: Option<(u64, Option<Arc<crate::container::ContainerInfo>>)>,
}

struct Session {
    tracer: Tracer,
    writer: EventWriter,
    memo: Memo,
    /// Per count key, the unstreamed failures already tallied.
    tallied: std::collections::HashMap<portexhaust_common::CountKey, u64>,
    /// Suppressed plus dropped failures accounted for by the tallies so far.
    unstreamed_seen: u64,
    clock: Clock,
    netns: NetnsCache,
    containers: Resolver,
    metrics: Option<Arc<Metrics>>,
    out: Out,
    json: bool,
    decode_errors: u64,
    collector: Collector,
    recorder: Option<Recorder>,
    blame: bool,
}

impl Session {
    /// Everything the ring buffer holds: each event is counted, remembered for the blame and
    /// the record, and appended to one reused buffer that goes to stdout in one write. No
    /// allocation or time formatting per event (see line.rs).
    fn drain(&mut self) {
        let Self {
            tracer,
            writer,
            memo,
            tallied: _,
            unstreamed_seen: _,
            clock,
            netns,
            containers,
            metrics,
            out,
            json,
            decode_errors,
            collector,
            recorder,
            blame: _,
        } = self;
        let want = std::mem::size_of::<FailureEvent>();
        tracer.drain(|bytes| {
            if bytes.len() < want {
                *decode_errors += 1;
                if *decode_errors <= 3 {
                    warn!("undecodable event: {} bytes, expected {want}", bytes.len());
                }
                return;
            }
            // SAFETY: FailureEvent is a Pod (integers and byte arrays only) and `bytes` holds
            // at least its size; read_unaligned copes with any alignment.
            let ev: FailureEvent = unsafe { std::ptr::read_unaligned(bytes.as_ptr().cast()) };
            if let Err(e) = crate::line::validate(&ev) {
                *decode_errors += 1;
                if *decode_errors <= 3 {
                    warn!("undecodable event: {e}");
                }
                return;
            }
            let unix_ns = clock.to_unix_ns(ev.ts_ns);
            // 0: the kernel could not read it (no BTF offsets); learnt from /proc instead.
            let ns = if ev.netns != 0 {
                Some(u64::from(ev.netns))
            } else {
                netns.get(ev.pid)
            };
            let container = match &memo.cgroup {
                Some((id, c)) if *id == ev.cgroup_id => c.clone(),
                _ => {
                    let c = containers.by_cgroup_id(ev.cgroup_id);
                    memo.cgroup = Some((ev.cgroup_id, c.clone()));
                    c
                }
            };
            if memo.pid != Some(ev.pid) {
                memo.pid = Some(ev.pid);
                // Remembered for the blame: the failer may be gone by the summary.
                collector
                    .cgroup_of_pid
                    .entry(ev.pid)
                    .or_insert(ev.cgroup_id);
                if let Some(n) = ns {
                    collector.netns_of_pid.entry(ev.pid).or_insert(n);
                }
                if let Some(m) = metrics {
                    m.observe_container(ev.pid, container.clone());
                }
            }
            if let Some(r) = recorder.as_mut()
                && let Some(dst) = crate::model::dst_of(&ev)
            {
                r.observe(ev.pid, ns, unix_ns, dst, ev.errno, || {
                    failure_from_event(&ev, |_| unix_ns).ok().map(|mut f| {
                        f.netns = ns;
                        f.container = container.clone();
                        f
                    })
                });
            }
            if *json {
                writer.json(&ev, unix_ns, ns, container.as_ref());
            } else {
                writer.human(&ev, unix_ns, ns, container.as_ref());
            }
        });
        out.bytes(writer.bytes());
        writer.clear();
        out.flush();
        if let Some(r) = recorder.as_mut() {
            r.flush_if_due();
        }
    }

    /// Tally lines for the failures counted but not streamed since the last tally: exact, from
    /// the kernel's per-key `unstreamed` counts, so that events and tallies together account
    /// for every failure once. Cheap when nothing was suppressed (two counters are read).
    fn tally(&mut self) -> Result<()> {
        let total = self.tracer.suppressed()? + self.tracer.dropped_events()?;
        if total == self.unstreamed_seen {
            return Ok(());
        }
        let counts = self.tracer.counts()?;
        let mut in_counts = 0;
        let mut lines = Vec::new();
        for (k, v) in &counts {
            in_counts += v.unstreamed;
            let seen = self.tallied.entry(*k).or_insert(0);
            if v.unstreamed <= *seen {
                continue;
            }
            let n = v.unstreamed - *seen;
            *seen = v.unstreamed;
            let dst = crate::aggregate::dst_string(k);
            let last = self.clock.to_unix_ns(v.last_ns);
            lines.push(Tally {
                kind: "tally",
                ts: crate::clock::rfc3339(last),
                pid: k.pid,
                comm: crate::model::comm_str(&v.comm),
                netns: self.collector.netns_of_pid.get(&k.pid).copied(),
                proto: if k.proto == portexhaust_common::IPPROTO_UDP {
                    "udp"
                } else {
                    "tcp"
                },
                dst,
                errno: u32::from(k.errno),
                errname: portexhaust_common::errno_name(u32::from(k.errno)).unwrap_or("UNKNOWN"),
                cause: portexhaust_common::Cause::from_u8(k.cause)
                    .map_or("unknown", portexhaust_common::Cause::name),
                count: n,
                last_ts: crate::clock::rfc3339(last),
            });
        }
        // A failure is counted in the statistics a moment before its key: if the keys do not
        // hold all of it yet, look again next time.
        self.unstreamed_seen = total.min(in_counts);
        for t in &lines {
            let text = if self.json {
                render::json_tally(t)
            } else {
                render::human_tally(t)
            };
            self.out.line(&text);
            if let Some(r) = self.recorder.as_mut()
                && let Ok(dst) = t.dst.parse()
            {
                r.tally(t.pid, t.netns, &t.comm, dst, t.errno, t.count, &t.last_ts);
            }
        }
        self.out.flush();
        Ok(())
    }

    /// Periodic record upkeep: a snapshot of the exact counts when one is due (after draining,
    /// so the lines before it are what the counts had seen), and the flush-every-second rule.
    fn record_tick(&mut self, elapsed: Duration) -> Result<()> {
        if self.recorder.as_ref().is_some_and(Recorder::snapshot_due) {
            self.drain();
            self.tally()?;
            let summary = render::json_summary(&self.summary(elapsed)?);
            if let Some(r) = self.recorder.as_mut() {
                r.snapshot(&summary);
            }
        }
        if let Some(r) = self.recorder.as_mut() {
            r.flush_if_due();
        }
        Ok(())
    }

    fn summary(&mut self, elapsed: Duration) -> Result<Summary> {
        let counts = self.tracer.counts()?;
        let blame = if counts.is_empty() || !self.blame {
            Vec::new()
        } else {
            match self.collector.collect(&mut self.tracer) {
                Ok(v) => v.blame,
                Err(e) => {
                    warn!("could not work out who holds the ports: {e}");
                    Vec::new()
                }
            }
        };
        Ok(Summary {
            backend: self.tracer.backend.name(),
            duration_s: elapsed.as_secs_f64(),
            failures_total: self.tracer.failures_total()?,
            dropped_events: self.tracer.dropped_events()?,
            uncounted_keys: self.tracer.uncounted_keys()?,
            offenders: offenders(&counts, |t| self.clock.to_unix_ns(t)),
            blame,
            tracked_sockets: if self.blame {
                self.tracer.tracked_sockets()?
            } else {
                0
            },
            lru_evictions: if self.blame {
                self.tracer.lru_evictions()?
            } else {
                0
            },
            watched: self
                .tracer
                .coverage
                .iter()
                .filter(|c| c.watch.is_ok())
                .map(|c| c.name())
                .collect(),
            not_watched: self
                .tracer
                .coverage
                .iter()
                .filter_map(|c| c.watch.as_ref().err().map(|why| (c.name(), why.clone())))
                .collect(),
        })
    }
}

/// Ports in use per destination in every namespace, for the metrics (no holders needed).
fn destination_gauges() -> Vec<metrics::DestinationGauge> {
    let census = crate::nsinfo::census(None);
    crate::blame::usage(&census, &Default::default(), &Default::default())
        .into_iter()
        .map(|u| metrics::DestinationGauge {
            netns: Some(u.netns),
            src: Some(u.src),
            dst: u.dst.to_string(),
            proto: "tcp",
            range_size: u64::from(u.range_size),
            in_use: u.in_use,
            utilisation: u.utilisation(),
            time_wait: u.by_state.get("TIME_WAIT").copied().unwrap_or(0),
        })
        .collect()
}

pub async fn run(opts: TraceOptions) -> Result<Summary> {
    let opened = Tracer::open_with(
        opts.backend,
        &opts.filters,
        crate::kernel::loader::Tracking {
            max_tracked: opts.max_tracked,
            blame: opts.blame,
            catch: opts.catch,
            events_per_s: opts.events_per_s,
        },
    )?;
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
        writer: EventWriter::new(),
        memo: Memo::default(),
        tallied: std::collections::HashMap::new(),
        unstreamed_seen: 0,
        clock: Clock::new(),
        netns: NetnsCache::default(),
        containers: Resolver::new(),
        metrics: None,
        out: Out {
            w: io::BufWriter::with_capacity(64 * 1024, io::stdout()),
            closed: false,
        },
        json: opts.json,
        decode_errors: 0,
        collector: Collector::new(Scope::Failers),
        recorder: None,
        blame: opts.blame,
    };
    if let Some(rec) = &opts.record {
        s.recorder = Some(Recorder::create(
            rec,
            s.tracer.backend.name(),
            &opts.filters,
        )?);
    }
    let ready_fd = unsafe { AsyncFd::register(Fd(ring_fd)) }
        .map_err(|e| Error::io("watching the ring buffer", e.into()))?;
    // Bound before the ready line, so that a taken port fails the start instead of a scrape.
    let _server = match opts.metrics_addr {
        Some(addr) => {
            let m = Arc::new(Metrics::new(MetricsOptions {
                container_labels: opts.container_labels,
                ..Default::default()
            }));
            m.set_backend(s.tracer.backend.name());
            let server = metrics::serve(addr, m.clone()).await?;
            eprintln!(
                "portexhaust: serving Prometheus metrics on http://{}/metrics",
                server.addr
            );
            s.metrics = Some(m);
            Some(server)
        }
        None => None,
    };
    // The failure counters come from the kernel's exact counts, read once a second.
    let mut ticks: u64 = 0;
    let mut dropped_reported: u64 = 0;
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
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
    // The start-up census: what already holds ports before the first event.
    let census = crate::nsinfo::census(None);
    let sockets: usize = census.iter().map(|c| c.sockets.len()).sum();
    let tw: usize = census
        .iter()
        .flat_map(|c| &c.sockets)
        .filter(|r| r.state == crate::sockdiag::TCP_TIME_WAIT)
        .count();
    eprintln!(
        "portexhaust: census: {sockets} TCP sockets ({tw} in TIME_WAIT) in {} network namespace(s) before tracing",
        census.len()
    );
    let deadline = opts.duration.map(|d| tokio::time::Instant::now() + d);
    let mut record_tick = tokio::time::interval(crate::record::FLUSH_EVERY);
    // The eBPF side rate-limits ring-buffer wakeups in a storm (see `wakeup_flags` there): an
    // event submitted without one is picked up by this tick at the latest.
    let mut drain_tick = tokio::time::interval(DRAIN_INTERVAL);
    drain_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
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
            _ = tick.tick() => {
                s.drain();
                s.tally()?;
                ticks += 1;
                // Drops mean the reader fell behind; the counts stay exact, but say so now.
                if let Ok(d) = s.tracer.dropped_events()
                    && d > dropped_reported
                {
                    eprintln!(
                        "portexhaust: {} more event(s) dropped (ring buffer full: output is not \
                         keeping up); the counts stay exact, see the summary",
                        d - dropped_reported
                    );
                    dropped_reported = d;
                }
                if let Some(m) = &s.metrics {
                    if let Err(e) = m.refresh_from_tracer(&s.tracer, &s.containers) {
                        warn!("updating metrics: {e}");
                    }
                    // Port usage needs a sock_diag census of every namespace: every 5 s.
                    if ticks % 5 == 1 {
                        m.set_destinations(&destination_gauges());
                        match s.tracer.lru_evictions() {
                            Ok(n) => m.set_lru_evictions(n),
                            Err(e) => warn!("reading LRU evictions: {e}"),
                        }
                    }
                }
            }
            _ = drain_tick.tick() => s.drain(),
            _ = sigint.recv() => break,
            _ = sigterm.recv() => break,
            _ = sleep => break,
            _ = record_tick.tick(), if s.recorder.is_some() => s.record_tick(started.elapsed())?,
        }
        if s.out.closed {
            break;
        }
    }
    // Events submitted before the stop request are still in the buffer.
    s.drain();
    s.tally()?;
    let summary = s.summary(started.elapsed())?;
    let text = if s.json {
        render::json_summary(&summary)
    } else {
        render::human_summary(&summary)
    };
    s.out.line(&text);
    s.out.flush();
    if let Some(r) = s.recorder.as_mut() {
        r.finish(&render::json_summary(&summary));
    }
    Ok(summary)
}
