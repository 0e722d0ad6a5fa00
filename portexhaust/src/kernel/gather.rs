//! One moment of the machine, as the engine takes it: the kernel's exact counts and totals, the
//! socket owners it remembers, the connect statistics, and a sock_diag census of the namespaces
//! that matter. Gathered here (BPF maps, /proc, netns) and handed over as an
//! [`Observed`]; the answers are worked out by the engine, the same code `report` replays.
use std::{
    collections::{BTreeMap, HashMap, HashSet},
    net::SocketAddr,
    path::PathBuf,
};

use portexhaust_common::{
    Cause, CountKey, CountValue, Owner, ProcKey, STACK_NOT_WALKED, SiteKey, SiteValue, TupleKey,
};

use super::{
    Result,
    clock::Clock,
    container::Resolver,
    loader::Tracer,
    netns::{self, comm_of, is_alive, socket_owners},
    procinfo::netns_of,
    symbols::Symbols,
};
use crate::{
    engine::{
        census::{NsCensus, OwnerView, expired_owners},
        counts::{Counts, Exact, ExactId, of_exact},
        live::{DestStat, KernelTotals, Observed, Run},
        sites::{self, SiteObs},
    },
    schema::{
        BlameEntry, ContainerInfo, DestRow, Errno, Family, Holder, Proto,
        event::{comm_str, ip_from_raw},
    },
};

/// Which namespaces to take a census of.
#[derive(Clone, Debug, Default)]
pub enum Scope {
    /// Every namespace that has processes.
    #[default]
    All,
    /// Only these (from `--netns`).
    Only(Vec<(u64, PathBuf)>),
    /// Only the namespaces of the processes that failed (the trace summary and snapshots).
    Failers,
}

/// What a run says of itself in its summary: how long it ran and what it watched.
pub fn run_of(tracer: &Tracer, duration_s: f64, blame: bool) -> Run {
    Run {
        duration_s,
        blame,
        watched: tracer
            .coverage
            .iter()
            .filter(|c| c.watch.is_ok())
            .map(|c| c.name().to_string())
            .collect(),
        not_watched: tracer
            .coverage
            .iter()
            .filter_map(|c| {
                c.watch
                    .as_ref()
                    .err()
                    .map(|why| (c.name().to_string(), why.clone()))
            })
            .collect(),
    }
}

/// The destination of a kernel key, or None for an unknown family.
fn addr(family: u16, daddr: &[u8; 16], dport: u16) -> Option<SocketAddr> {
    let f = Family::from_af(family)?;
    Some(SocketAddr::new(ip_from_raw(f, daddr), dport))
}

/// The kernel's exact counts, named. Keys of an unknown family or protocol are left out (the
/// programs write neither).
pub fn exact_counts(raw: &[(CountKey, CountValue)], clock: &Clock) -> Vec<Exact> {
    raw.iter()
        .filter_map(|(k, v)| {
            Some(Exact {
                id: ExactId {
                    pid: k.pid,
                    dst: addr(k.family, &k.daddr, k.dport)?,
                    errno: Errno(u32::from(k.errno)),
                    proto: Proto::from_ipproto(k.proto)?,
                    cause: Cause::from_u8(k.cause).unwrap_or(Cause::Unknown),
                },
                count: v.count,
                unstreamed: v.unstreamed,
                first: clock.ts(v.first_ns),
                last: clock.ts(v.last_ns),
                comm: comm_str(&v.comm),
            })
        })
        .collect()
}

/// The kernel's connect statistics per destination, named: established connects and the
/// latency histogram (`top`, the summary's observation and the metrics all read them here).
/// Keys of an unknown family are left out.
pub fn dest_stats(tracer: &Tracer) -> Result<Vec<DestStat>> {
    Ok(tracer
        .dest_stats()?
        .into_iter()
        .filter_map(|(k, v)| {
            Some(DestStat {
                netns: u64::from(k.netns),
                dst: addr(k.family, &k.daddr, k.dport)?,
                connects: v.connects,
                hist: v.hist,
            })
        })
        .collect())
}

/// Gathers [`Observed`] moments for one tracer, remembering what events taught it (where and
/// in which cgroup each failer ran: still known after it exited).
pub struct Gatherer {
    scope: Scope,
    clock: Clock,
    /// pid -> netns learnt from events.
    pub netns_of_pid: HashMap<u32, u64>,
    /// pid -> cgroup id learnt from events, for the failers' containers.
    pub cgroup_of_pid: HashMap<u32, u64>,
    containers: Resolver,
    /// Call-site stacks symbolised so far, by (pid, stack id).
    pub symbols: Symbols,
}

impl Gatherer {
    pub fn new(scope: Scope) -> Self {
        Self {
            scope,
            clock: Clock::new(),
            netns_of_pid: HashMap::new(),
            cgroup_of_pid: HashMap::new(),
            containers: Resolver::new(),
            symbols: Symbols::new(),
        }
    }

    /// Symbolise a call-site stack the kernel just walked (its ring-buffer announcement),
    /// while the process still lives.
    pub fn learn_stack(&mut self, tracer: &Tracer, pid: u32, stack_id: u32) {
        if self.symbols.known(pid, stack_id) {
            return;
        }
        match tracer.stack(stack_id) {
            Ok(ips) => {
                self.symbols.learn(pid, stack_id, &ips);
            }
            Err(e) => log::debug!("reading stack {stack_id}: {e}"),
        }
    }

    /// The kernel's call-site counts, named, with every stack they refer to symbolised (the
    /// ones not announced yet are symbolised now, if their process still lives).
    fn sites(
        &mut self,
        tracer: &mut Tracer,
        obs: &mut Observed,
        owners: Option<&[(TupleKey, Owner)]>,
    ) -> Result<()> {
        let mut raw = tracer.sites()?;
        self.forget_exited_sites(tracer, &mut raw, owners)?;
        for (k, _) in &raw {
            if k.stack_id != STACK_NOT_WALKED {
                self.learn_stack(tracer, k.pid, k.stack_id);
                if let Some(s) = self.symbols.get(k.pid, k.stack_id) {
                    obs.stacks.insert((k.pid, k.stack_id), s);
                }
            }
        }
        // The kernel leaves the namespace out of the key: the process's, from its events or
        // /proc, once per process.
        let mut ns_of: HashMap<u32, u64> = HashMap::new();
        obs.sites = raw
            .iter()
            .filter_map(|(k, v)| {
                let netns = match k.netns {
                    0 => *ns_of
                        .entry(k.pid)
                        .or_insert_with(|| self.netns_for(k.pid).unwrap_or(0)),
                    n => u64::from(n),
                };
                Some(SiteObs {
                    pid: k.pid,
                    stack_id: (k.stack_id != STACK_NOT_WALKED).then_some(k.stack_id),
                    netns,
                    dst: addr(k.family, &k.daddr, k.dport)?,
                    connects: v.connects,
                    bound: v.bound,
                    failures: v.failures,
                    walked: v.walked,
                })
            })
            .collect();
        // Bounded over weeks: only the stacks the kernel still counts are kept.
        if self.symbols.len() > 4 * raw.len().max(1024) {
            let live: std::collections::HashSet<(u32, u32)> =
                raw.iter().map(|(k, _)| (k.pid, k.stack_id)).collect();
            self.symbols.retain(|p, s| live.contains(&(p, s)));
        }
        Ok(())
    }

    /// Drop the call sites of processes that exited and no longer matter (see
    /// [`sites::pids_to_forget`]) from `raw`, the kernel's maps and the symbol cache.
    fn forget_exited_sites(
        &mut self,
        tracer: &mut Tracer,
        raw: &mut Vec<(SiteKey, SiteValue)>,
        owners: Option<&[(TupleKey, Owner)]>,
    ) -> Result<()> {
        let mut failures: BTreeMap<u32, u64> = BTreeMap::new();
        for (k, v) in raw.iter() {
            *failures.entry(k.pid).or_default() += v.failures;
        }
        let exited: HashSet<u32> = failures
            .keys()
            .copied()
            .filter(|&p| !is_alive(p, 0))
            .collect();
        if exited.is_empty() {
            return Ok(());
        }
        // Who still holds a port: the owner map (read anyway when blame is on; here only when
        // some process with call sites has exited).
        let fetched;
        let owners = match owners {
            Some(o) => o,
            None => {
                fetched = tracer.owners()?;
                &fetched
            }
        };
        let holding: HashSet<u32> = owners.iter().map(|(_, o)| o.pid).collect();
        let forget: HashSet<u32> =
            sites::pids_to_forget(&failures, |p| !exited.contains(&p), &holding)
                .into_iter()
                .collect();
        if forget.is_empty() {
            return Ok(());
        }
        let (gone, kept): (Vec<_>, Vec<_>) =
            raw.drain(..).partition(|(k, _)| forget.contains(&k.pid));
        *raw = kept;
        let still_used: HashSet<u32> = raw.iter().map(|(k, _)| k.stack_id).collect();
        let mut stacks: Vec<u32> = gone
            .iter()
            .map(|(k, _)| k.stack_id)
            .filter(|id| *id != STACK_NOT_WALKED && !still_used.contains(id))
            .collect();
        stacks.sort_unstable();
        stacks.dedup();
        let keys: Vec<SiteKey> = gone.iter().map(|(k, _)| *k).collect();
        tracer.forget_sites(&keys, &stacks)?;
        self.symbols.retain(|p, _| !forget.contains(&p));
        log::debug!(
            "forgot the call sites of {} exited process(es): {} key(s), {} stack(s)",
            forget.len(),
            keys.len(),
            stacks.len()
        );
        Ok(())
    }

    /// Remember where a failer ran, from its event.
    pub fn learn(&mut self, pid: u32, netns: Option<u64>, cgroup_id: u64) {
        self.cgroup_of_pid.entry(pid).or_insert(cgroup_id);
        if let Some(n) = netns {
            self.netns_of_pid.entry(pid).or_insert(n);
        }
    }

    fn netns_for(&self, pid: u32) -> Option<u64> {
        self.netns_of_pid
            .get(&pid)
            .copied()
            .or_else(|| netns_of(pid))
    }

    fn census(&self, counts: &Counts) -> Vec<NsCensus> {
        match &self.scope {
            Scope::All => netns::census(None),
            Scope::Only(v) => netns::census(Some(v)),
            Scope::Failers => {
                if counts.is_empty() {
                    return Vec::new();
                }
                let all = netns::namespaces();
                let mut want: Vec<(u64, PathBuf)> = counts
                    .keys()
                    .filter_map(|k| self.netns_for(k.pid))
                    .filter_map(|n| all.get(&n).map(|p| (n, p.clone())))
                    .collect();
                want.sort();
                want.dedup();
                netns::census(Some(&want))
            }
        }
    }

    /// The kernel's counts and totals only: cheap (no census, no owners), for metrics and
    /// the tally of unstreamed failures.
    pub fn totals(&self, tracer: &Tracer) -> Result<KernelTotals> {
        Self::totals_with(tracer, tracer.tracked_sockets()?)
    }

    /// The totals for a caller that has counted the owners (the owner map is walked once).
    fn totals_with(tracer: &Tracer, tracked_sockets: u64) -> Result<KernelTotals> {
        Ok(KernelTotals {
            failures_total: tracer.failures_total()?,
            dropped_events: tracer.dropped_events()?,
            uncounted_keys: tracer.uncounted_keys()?,
            tracked_sockets,
            lru_evictions: tracer.lru_evictions_given(tracked_sockets)?,
        })
    }

    /// One moment. `blame`: also the owners and the census (who holds the ports); without it
    /// only the counts and totals. Forgets owners whose TIME_WAIT is over.
    pub fn observe(&mut self, tracer: &mut Tracer, blame: bool) -> Result<Observed> {
        let now_mono = Clock::now_mono_ns();
        // Exited failers' keys leave the kernel's map before it fills (still counted).
        if let Err(e) = tracer.retire_exited_counts(|p| is_alive(p, 0)) {
            log::debug!("retiring the counts of exited processes: {e}");
        }
        let counts = of_exact(&exact_counts(&tracer.counts()?, &self.clock));
        // Who holds the ports of no failure: nothing to look up for the failers' summary.
        let nothing_failed = matches!(self.scope, Scope::Failers) && counts.is_empty();
        let kernel_owners = if blame && !nothing_failed {
            Some(tracer.owners()?)
        } else {
            None
        };
        let kernel = match &kernel_owners {
            Some(o) => Self::totals_with(tracer, o.len() as u64)?,
            None => self.totals(tracer)?,
        };
        let mut obs = Observed {
            ts: self.clock.ts(now_mono),
            backend: tracer.backend,
            kernel,
            counts,
            census: Vec::new(),
            owners: HashMap::new(),
            fd_owners: HashMap::new(),
            dest_stats: Vec::new(),
            netns_of_pid: HashMap::new(),
            sites: Vec::new(),
            stacks: HashMap::new(),
            sock_sites: HashMap::new(),
        };
        if blame {
            self.sites(tracer, &mut obs, kernel_owners.as_deref())?;
        }
        // Where each failer ran: from its events, else (still alive) from /proc.
        obs.netns_of_pid = obs
            .counts
            .keys()
            .map(|k| k.pid)
            .collect::<std::collections::BTreeSet<_>>()
            .into_iter()
            .filter_map(|pid| Some((pid, self.netns_for(pid)?)))
            .collect();
        let Some(kernel_owners) = kernel_owners else {
            return Ok(obs);
        };
        // at_ns comes from bpf_ktime_get_ns(): CLOCK_MONOTONIC, like now_mono.
        let mut expired = expired_owners(&kernel_owners, now_mono);
        // A namespace destroyed while its sockets were closing takes them with it, and they
        // never reach TIME_WAIT's CLOSE: their owners would linger for STUCK_CLOSING_NS (the
        // soak saw them pile up a hold cycle at a time). A census sees only namespaces with
        // processes, so an owner in any other one can name nothing: forgotten.
        if kernel_owners.iter().any(|(k, _)| k.netns != 0) {
            let live = netns::namespaces();
            expired.extend(
                kernel_owners
                    .iter()
                    .filter(|(k, _)| k.netns != 0 && !live.contains_key(&u64::from(k.netns)))
                    .map(|(k, _)| *k),
            );
            expired.sort();
            expired.dedup();
        }
        if !expired.is_empty() {
            tracer.forget_owners(&expired)?;
        }
        let procs = tracer.procs()?;
        obs.owners = kernel_owners
            .iter()
            .map(|(k, o)| {
                let key = ProcKey {
                    pid: o.pid,
                    _pad: 0,
                    start_ns: o.start_ns,
                };
                let proc = procs.get(&key);
                let alive = is_alive(o.pid, o.start_ns);
                let mut comm = proc.map(|p| comm_str(&p.comm)).unwrap_or_default();
                // PROCS is an LRU map: a live process it dropped is still in /proc.
                if comm.is_empty() && alive {
                    comm = comm_of(o.pid).unwrap_or_default();
                }
                (*k, OwnerView::from_kernel(o, proc, comm, alive))
            })
            .collect::<HashMap<TupleKey, OwnerView>>();
        obs.census = self.census(&obs.counts);
        obs.fd_owners = socket_owners();
        if !obs.sites.is_empty() {
            obs.sock_sites = tracer.sock_sites()?;
        }
        obs.dest_stats = dest_stats(tracer)?;
        Ok(obs)
    }

    /// The container of a process: by the cgroup the kernel saw (still right after exit, as
    /// long as the cgroup exists), else by its current /proc/PID/cgroup.
    fn container_of(&mut self, pid: Option<u32>, cgroup_id: u64) -> Option<ContainerInfo> {
        if cgroup_id != 0
            && let Some(c) = self.containers.by_cgroup_id(cgroup_id)
        {
            return Some((*c).clone());
        }
        pid.and_then(|p| self.containers.by_pid(p))
    }

    /// Name the containers of the holders and failers the engine worked out (records carry
    /// them, so `report` needs no cgroup walk).
    pub fn label(&mut self, blame: &mut [BlameEntry], rows: &mut [DestRow]) {
        let mut memo: BTreeMap<(Option<u32>, u64), Option<ContainerInfo>> = BTreeMap::new();
        let mut holder = |g: &mut Self, h: &mut Holder| {
            let c = memo
                .entry((h.pid, h.cgroup_id))
                .or_insert_with(|| g.container_of(h.pid, h.cgroup_id))
                .clone();
            h.container = c;
        };
        for b in blame.iter_mut() {
            for h in &mut b.holders {
                holder(self, h);
            }
            for f in &mut b.failers {
                let cg = self.cgroup_of_pid.get(&f.pid).copied().unwrap_or(0);
                f.container = self.container_of(Some(f.pid), cg);
            }
        }
        for h in rows.iter_mut().flat_map(|r| r.holders.iter_mut()) {
            holder(self, h);
        }
    }

    pub fn clock(&self) -> &Clock {
        &self.clock
    }
}
