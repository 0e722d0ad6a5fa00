//! `portexhaust trace`: stream failures from the ring buffer, summarise on exit.
//!
//! The loop only moves data: events go to the output and the recorder as they come; once a
//! second the kernel's counts become tallies and metrics; snapshots and the summary are the
//! engine's answer to what the kernel layer gathered ([`Gatherer`]), the same answer `report`
//! replays from the record.
use std::{
    collections::HashMap,
    io,
    os::fd::{AsRawFd, RawFd},
    sync::Arc,
    time::{Duration, Instant},
};

use log::warn;
use portexhaust_common::{Cause, FailureEvent, TcpState};
use tokio::{
    io::unix::AsyncFd,
    signal::unix::{SignalKind, signal},
};

mod check;
pub mod nat;

use super::record::{FLUSH_EVERY, RecordOptions, Recorder, Seen};
use crate::{
    cli::TraceArgs,
    engine::{
        counts::{Exact, ExactId},
        live::{self, Viewer},
    },
    kernel::{
        Error, Result,
        clock::Clock,
        container::Resolver,
        facts::{self, Namespaces},
        gather::{Gatherer, Scope, dest_stats, exact_counts, run_of},
        loader::{Tracer, Tracking},
        netns,
        procinfo::NetnsCache,
    },
    output::{
        http,
        human::{human_header, human_summary, human_tally},
        line::EventWriter,
        prometheus::{Metrics, MetricsOptions},
        stdout::Out,
    },
    schema::{
        ContainerInfo, Errno, Proto, RecordedFilters, Tally, Totals,
        event::{dst_of, failure_from_event, site_event, validate},
    },
};

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

/// The kernel's exact counts, read at most once per tick by whoever needs them first.
#[derive(Default)]
struct Counted(Option<Vec<Exact>>);

impl Counted {
    fn get(&mut self, tracer: &Tracer, clock: &Clock) -> Result<&[Exact]> {
        if self.0.is_none() {
            self.0 = Some(exact_counts(&tracer.counts()?, clock));
        }
        Ok(self.0.as_deref().unwrap_or_default())
    }
}

/// What the previous event of a batch established, so that a storm from one process pays
/// for its lookups once, not per failure.
#[derive(Default)]
struct Memo {
    pid: Option<u32>,
    cgroup: Option<(u64, Option<Arc<ContainerInfo>>)>,
}

struct Session {
    tracer: Tracer,
    writer: EventWriter,
    memo: Memo,
    /// Per count key, the unstreamed failures already tallied.
    tallied: HashMap<ExactId, u64>,
    /// Suppressed plus dropped failures accounted for by the tallies so far.
    unstreamed_seen: u64,
    clock: Clock,
    netns: NetnsCache,
    containers: Resolver,
    metrics: Option<Arc<Metrics>>,
    out: Out,
    json: bool,
    decode_errors: u64,
    gatherer: Gatherer,
    recorder: Option<Recorder>,
    namespaces: Namespaces,
    blame: bool,
    /// The metrics' destination rows over time (rates and the exhaustion forecast need the
    /// samples before), as `top` keeps them; and when tracing started.
    viewer: Viewer,
    started: Instant,
    /// `--catch nat`: the source-NAT drops.
    nat: Option<nat::NatWatch>,
}

impl Session {
    /// Everything the ring buffer holds: each event is remembered for the blame, handed to the
    /// recorder, and appended to one reused buffer that goes to stdout in one write. No
    /// allocation or time formatting per event (see `output::line`).
    fn drain(&mut self) {
        let Self {
            tracer,
            writer,
            memo,
            clock,
            netns,
            containers,
            metrics,
            out,
            json,
            decode_errors,
            gatherer,
            recorder,
            namespaces,
            nat: nat_watch,
            ..
        } = self;
        let want = std::mem::size_of::<FailureEvent>();
        let mut announced: Vec<(u32, u32)> = Vec::new();
        let mut nat_events = Vec::new();
        tracer.drain(|bytes| {
            if let Some(n) = nat::nat_event(bytes) {
                nat_events.push(n);
                return;
            }
            if let Some(s) = site_event(bytes) {
                announced.push((s.pid, s.stack_id));
                return;
            }
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
            if let Err(e) = validate(&ev) {
                *decode_errors += 1;
                if *decode_errors <= 3 {
                    warn!("undecodable event: {e}");
                }
                return;
            }
            let ts = clock.ts(ev.ts_ns);
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
                gatherer.learn(ev.pid, ns, ev.cgroup_id);
                if let Some(m) = metrics {
                    m.observe_container(ev.pid, container.clone());
                }
            }
            if let Some(r) = recorder.as_mut()
                && let Some(dst) = dst_of(&ev)
            {
                if let Some(n) = ns
                    && !namespaces.known(n)
                    && let Some(line) = namespaces.learn(n, ev.pid)
                {
                    r.sysctls(&line);
                }
                let seen = Seen {
                    pid: ev.pid,
                    netns: ns,
                    ts,
                    dst,
                    errno: Errno(ev.errno),
                    proto: Proto::from_ipproto(ev.proto).unwrap_or_default(),
                    cause: Cause::from_u8(ev.cause).unwrap_or(Cause::Unknown),
                };
                r.observe(seen, || {
                    failure_from_event(&ev, |_| ts).ok().map(|mut f| {
                        f.netns = ns;
                        f.container = container.clone();
                        f
                    })
                });
            }
            if *json {
                writer.json(&ev, ts, ns, container.as_ref());
            } else {
                writer.human(&ev, ts, ns, container.as_ref());
            }
        });
        out.bytes(writer.bytes());
        writer.clear();
        // NAT drops after the batch: naming them may take a listing of every namespace's
        // sockets, which the failure lines above must not wait for.
        if let Some(w) = nat_watch.as_mut()
            && !nat_events.is_empty()
        {
            let drops = nat::decode(&nat_events, |ns| clock.ts(ns));
            for f in w.named(drops, tracer.backend, containers) {
                if let Some(r) = recorder.as_mut() {
                    r.observe(Seen::of(&f, f.cause), || Some(f.clone()));
                }
                if *json {
                    out.line(&f.line());
                } else {
                    out.line(&crate::output::nat::live(&f));
                }
            }
        }
        out.flush();
        if let Some(r) = recorder.as_mut() {
            r.flush_if_due();
        }
        // Symbolised now, while the processes live (a few a second at most: the kernel
        // announces each (process, stack) pair when its walk finds it new).
        for (pid, stack_id) in announced {
            gatherer.learn_stack(tracer, pid, stack_id);
        }
    }

    /// Tally lines for the failures counted but not streamed since the last tally: exact, from
    /// the kernel's per-key `unstreamed` counts, so that events and tallies together account
    /// for every failure once. Cheap when nothing was suppressed (two counters are read).
    fn tally(&mut self, counts: &mut Counted) -> Result<()> {
        let total = self.tracer.suppressed()? + self.tracer.dropped_events()?;
        if total == self.unstreamed_seen {
            return Ok(());
        }
        let counts = counts.get(&self.tracer, &self.clock)?;
        let mut in_counts = 0;
        let mut lines = Vec::new();
        for e in counts {
            in_counts += e.unstreamed;
            let seen = self.tallied.entry(e.id).or_insert(0);
            if e.unstreamed <= *seen {
                continue;
            }
            let n = e.unstreamed - *seen;
            *seen = e.unstreamed;
            lines.push(Tally {
                ts: Some(e.last),
                pid: e.id.pid,
                comm: e.comm.clone(),
                netns: self.gatherer.netns_of_pid.get(&e.id.pid).copied(),
                proto: e.id.proto,
                dst: e.id.dst,
                errno: e.id.errno,
                cause: e.id.cause,
                count: n,
                first_ts: None,
                last_ts: e.last,
                counted_by_snapshot: false,
            });
        }
        // A failure is counted in the statistics a moment before its key: if the keys do not
        // hold all of it yet, look again next time.
        self.unstreamed_seen = total.min(in_counts);
        for t in &lines {
            let text = if self.json { t.line() } else { human_tally(t) };
            self.out.line(&text);
            if let Some(r) = self.recorder.as_mut() {
                r.tally(t);
            }
        }
        self.out.flush();
        Ok(())
    }

    /// The metrics of one second: the kernel's totals, and its exact counts when failures
    /// happened; every fifth second the destinations (a sock_diag census of every namespace
    /// and the kernel's connect statistics), with their forecast from the samples so far.
    fn metrics_tick(&mut self, ticks: u64, counts: &mut Counted) -> Result<()> {
        let Some(m) = &self.metrics else {
            return Ok(());
        };
        let seen = self.tracer.failures_total()?;
        m.set_dropped(self.tracer.dropped_events()?);
        // As the summary counts them: the NAT drops that found no key too.
        let nat_uncounted = match &self.nat {
            Some(_) => self.tracer.nat_stats()?.uncounted,
            None => 0,
        };
        m.set_uncounted(self.tracer.uncounted_keys()? + nat_uncounted);
        if m.counts_changed(seen) {
            let counts = counts.get(&self.tracer, &self.clock)?;
            m.update_counts(counts, |pid| self.containers.by_pid(pid));
        }
        m.set_failures_seen(seen);
        if ticks % 5 == 1 {
            // The rows `top` shows (one engine): ports, forecast, connect counts and latency.
            let stats = dest_stats(&self.tracer)?;
            let rows = self.viewer.destinations(
                self.started.elapsed().as_secs_f64(),
                &netns::census(None),
                &stats,
            );
            m.set_destinations(&rows);
            m.set_lru_evictions(self.tracer.lru_evictions()?);
            // The NAT section's entries, as the summary has them (only with --catch nat).
            if let Some(n) = self.nat.as_mut() {
                match n.entries(&self.tracer, &self.containers) {
                    Ok(entries) => m.set_nat(&entries),
                    Err(e) => warn!("reading the NAT drops for the metrics: {e}"),
                }
            }
        }
        Ok(())
    }

    /// Periodic record upkeep: a snapshot of the exact counts when one is due (after draining,
    /// so the lines before it are what the counts had seen), and the flush-every-second rule.
    fn record_tick(&mut self, elapsed: Duration) -> Result<()> {
        if self.recorder.as_ref().is_some_and(Recorder::snapshot_due) {
            self.drain();
            self.tally(&mut Counted::default())?;
            let totals = self.totals(elapsed)?;
            if let Some(r) = self.recorder.as_mut() {
                r.snapshot(&totals);
            }
        }
        if let Some(r) = self.recorder.as_mut() {
            r.flush_if_due();
        }
        Ok(())
    }

    /// The engine's totals of what the kernel layer sees now: the summary, and each snapshot.
    fn totals(&mut self, elapsed: Duration) -> Result<Totals> {
        let obs = self.gatherer.observe(&mut self.tracer, self.blame)?;
        let run = run_of(&self.tracer, elapsed.as_secs_f64(), self.blame);
        let mut totals = live::totals(&obs, &run);
        self.gatherer
            .label(&mut totals.blame, &mut totals.destinations);
        if let Some(n) = self.nat.as_mut()
            && let Err(e) = n.fold(&self.tracer, &mut totals, &self.containers)
        {
            warn!("reading the NAT drops: {e}");
        }
        Ok(totals)
    }
}

/// `--record-max-size`, `--record-keep`.
fn rotation(args: &TraceArgs) -> Option<super::record::Rotate> {
    args.record_max_size.map(|max_size| super::record::Rotate {
        max_size,
        keep: args.record_keep,
    })
}

pub async fn run(args: &TraceArgs) -> Result<Totals> {
    // Bad arguments end here, before anything is loaded.
    let cgroups = check::args(args)?;
    let mut filters = args.filter.filters();
    filters.cgroups = cgroups;
    let opened = Tracer::open_with(
        args.backend.request(),
        &filters,
        Tracking {
            max_tracked: args.tracking.max_tracked_sockets,
            max_count_keys: args.max_count_keys,
            blame: !args.no_blame,
            catch: args.catch.unwrap_or(0),
            events_per_s: args.events_per_s,
            call_sites: !args.no_call_sites,
        },
    )?;
    announce(&opened.tracer, &opened.skipped);
    // Before the ready line: the NAT namespaces' insert_failed counters to compare with.
    let nat_watch = opened.tracer.watches_nat().then(nat::NatWatch::start);
    // SAFETY: the fd belongs to the ring buffer map inside the Tracer, which `s` owns for the
    // whole loop below and drops only after `ready_fd` (declared later, dropped first).
    let ring_fd = opened.tracer.ring_fd();
    let mut sigterm =
        signal(SignalKind::terminate()).map_err(|e| Error::io("installing SIGTERM handler", e))?;
    let mut sigint =
        signal(SignalKind::interrupt()).map_err(|e| Error::io("installing SIGINT handler", e))?;

    // Bound before the ready line, so that a taken port fails the start instead of a scrape.
    let (metrics, _server) = match args.metrics_addr {
        Some(addr) => {
            let m = Arc::new(Metrics::new(MetricsOptions {
                container_labels: !args.no_container_labels,
                ..Default::default()
            }));
            m.set_backend(opened.tracer.backend.name());
            let server = http::serve(addr, m.clone())
                .await
                .map_err(|e| Error::io(format!("serving metrics on {addr}"), e))?;
            eprintln!(
                "portexhaust: serving Prometheus metrics on http://{}/metrics",
                server.addr
            );
            (Some(m), Some(server))
        }
        None => (None, None),
    };
    // Scripts and benchmarks wait for this line. Everything is attached: from here on every
    // failure is counted in the kernel and queued in the ring buffer, even while the header
    // below (a census and the settings of every namespace, ~100 ms on a busy host) is gathered,
    // so the line does not wait for it; with --record it waits for the record, which must
    // exist, header written, once the tracer says it is ready.
    let started = Instant::now();
    let ready_line = format!(
        "portexhaust: ready: tracing port-exhaustion failures with the {} backend{}",
        opened.tracer.backend.name(),
        match args.duration {
            Some(d) => format!(" for {}s", d.as_secs_f64()),
            None => "; Ctrl-C to stop".to_string(),
        }
    );
    if args.record.is_none() {
        eprintln!("{ready_line}");
    }
    let recorded = RecordedFilters {
        pids: filters.pids.clone(),
        comms: filters.comms.clone(),
        dports: filters.dports.clone(),
        cgroups: filters
            .cgroups
            .targets
            .iter()
            .map(|t| t.rel.clone())
            .collect(),
    };
    // The header: a record starts with the settings and census of every namespace; the
    // `--json` stream with the same header (so `report` can read it) when there is no record
    // to carry the census, else one without it.
    let header = (args.record.is_some() || args.json)
        .then(|| facts::header(opened.tracer.backend, recorded));
    let mut s = Session {
        tracer: opened.tracer,
        writer: EventWriter::new(),
        memo: Memo::default(),
        tallied: HashMap::new(),
        unstreamed_seen: 0,
        clock: Clock::new(),
        netns: NetnsCache::default(),
        containers: Resolver::new(),
        metrics,
        out: Out {
            w: io::BufWriter::with_capacity(64 * 1024, io::stdout()),
            closed: false,
        },
        json: args.json,
        decode_errors: 0,
        gatherer: Gatherer::new(Scope::Failers),
        recorder: None,
        namespaces: header
            .as_ref()
            .map(Namespaces::from_header)
            .unwrap_or_default(),
        blame: !args.no_blame,
        viewer: Viewer::new(),
        started,
        nat: nat_watch,
    };
    if let (Some(path), Some(h)) = (&args.record, &header) {
        let opts = RecordOptions {
            path: path.clone(),
            snapshot_interval: args.snapshot_interval,
            events_per_s: args.record_events_per_s,
            rotate: rotation(args),
        };
        s.recorder = Some(Recorder::create(&opts, h)?);
        eprintln!("{ready_line}");
    }
    let ready_fd = unsafe { AsyncFd::register(Fd(ring_fd)) }
        .map_err(|e| Error::io("watching the ring buffer", e.into()))?;
    // The failure counters come from the kernel's exact counts, read once a second.
    let mut ticks: u64 = 0;
    let mut dropped_reported: u64 = 0;
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    match (&header, s.json) {
        (Some(h), true) => s.out.line(&h.line()),
        (_, false) => s.out.line(&human_header()),
        (None, true) => {}
    }
    s.out.flush();
    // The start-up census: what already holds ports before the first event.
    let census = netns::census(None);
    let sockets: usize = census.iter().map(|c| c.sockets.len()).sum();
    let tw: usize = census
        .iter()
        .flat_map(|c| &c.sockets)
        .filter(|r| r.state == TcpState::TimeWait)
        .count();
    eprintln!(
        "portexhaust: census: {sockets} TCP sockets ({tw} in TIME_WAIT) in {} network namespace(s) before tracing",
        census.len()
    );
    drop(census);
    let deadline = args.duration.map(|d| tokio::time::Instant::now() + d);
    let mut record_tick = tokio::time::interval(FLUSH_EVERY);
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
                // One walk of the kernel's counts a second, shared by the tallies and the
                // metrics (in a storm both need it).
                let mut counts = Counted::default();
                s.tally(&mut counts)?;
                s.tracer.drain_log();
                // Before 5.14 a cgroup created under a filtered one since the last tick
                // passes only once its id is in the map.
                if filters.cgroups.needs_refresh()
                    && let Err(e) = s.tracer.refresh_cgroup_filter(&filters.cgroups)
                {
                    warn!("refreshing the --cgroup/--container filter: {e}");
                }
                ticks += 1;
                // Exited failers' count keys leave the kernel's map before it fills (they
                // stay counted: `Tracer::counts` adds them back).
                if ticks.is_multiple_of(5)
                    && let Err(e) = s.tracer.retire_exited_counts(|p| netns::is_alive(p, 0))
                {
                    warn!("retiring the counts of exited processes: {e}");
                }
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
                if let Err(e) = s.metrics_tick(ticks, &mut counts) {
                    warn!("updating metrics: {e}");
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
    // Events submitted before the stop request are still in the buffer (and warnings in the
    // programs' log).
    s.drain();
    s.tally(&mut Counted::default())?;
    s.tracer.drain_log();
    let totals = s.totals(started.elapsed())?;
    let text = if s.json {
        totals.summary_line()
    } else {
        human_summary(&totals)
    };
    s.out.line(&text);
    s.out.flush();
    if let Some(r) = s.recorder.as_mut() {
        r.finish(&totals);
    }
    Ok(totals)
}
