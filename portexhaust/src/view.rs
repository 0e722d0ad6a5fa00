//! One consistent picture of port pressure, assembled from the kernel maps, sock_diag and
//! /proc: what `top` shows on every refresh and what `trace` puts in its summary.
use std::{collections::HashMap, net::SocketAddr, path::PathBuf, time::Instant};

use portexhaust_common::{CountKey, CountValue, ProcKey, TupleKey};
use serde::Serialize;

use crate::{
    blame::{
        BlameEntry, DestUsage, Holder, Latency, OwnerView, RateTracker, blame, expired_owners,
        forecast_seconds, latency, usage,
    },
    clock::Clock,
    error::Result,
    kernel::loader::{DestTotals, Tracer},
    model::{Family, ip_from_raw},
    nsinfo::{self, NsCensus, NsSysctls},
};

/// A destination row as `top --json` and the records show it.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct DestinationRow {
    pub netns: u64,
    pub src: String,
    pub dst: String,
    pub proto: &'static str,
    pub range_size: u32,
    pub in_use: u64,
    pub by_state: std::collections::BTreeMap<&'static str, u64>,
    pub utilisation: f64,
    pub new_per_s: Option<f64>,
    pub tw_expiring_per_s: f64,
    pub forecast_s: Option<f64>,
    pub latency_us: Option<Latency>,
    pub holders: Vec<Holder>,
}

/// A process with failures, for `top`.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct FailingProcess {
    pub pid: u32,
    pub comm: String,
    pub failures: u64,
    /// Failures per second since the previous refresh.
    pub rate: f64,
    pub top_dst: String,
}

#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct View {
    /// Shown as the RFC 3339 `ts` by the renderers.
    #[serde(skip)]
    pub ts_unix_ns: i128,
    pub backend: &'static str,
    pub failures_total: u64,
    pub dropped_events: u64,
    pub lru_evictions: u64,
    pub tracked_sockets: u64,
    pub destinations: Vec<DestinationRow>,
    pub failing: Vec<FailingProcess>,
    pub blame: Vec<BlameEntry>,
}

/// Which namespaces to look at.
#[derive(Clone, Debug, Default)]
pub enum Scope {
    /// Every namespace that has processes.
    #[default]
    All,
    /// Only these (from `--netns`).
    Only(Vec<(u64, PathBuf)>),
    /// Only the namespaces of the processes that failed (the trace summary).
    Failers,
}

pub struct Collector {
    rates: RateTracker,
    started: Instant,
    scope: Scope,
    /// pid -> netns learnt from events (still known after the process exited).
    pub netns_of_pid: HashMap<u32, u64>,
    /// pid -> cgroup id learnt from events, for the failers' containers.
    pub cgroup_of_pid: HashMap<u32, u64>,
    prev_failures: HashMap<u32, (u64, f64)>,
    containers: crate::container::Resolver,
}

fn dest_addr(k: &portexhaust_common::DestKey) -> Option<SocketAddr> {
    let f = Family::from_af(k.family)?;
    Some(SocketAddr::new(ip_from_raw(f, &k.daddr), k.dport))
}

impl Collector {
    pub fn new(scope: Scope) -> Self {
        Self {
            rates: RateTracker::new(30.0),
            started: Instant::now(),
            scope,
            netns_of_pid: HashMap::new(),
            cgroup_of_pid: HashMap::new(),
            prev_failures: HashMap::new(),
            containers: crate::container::Resolver::new(),
        }
    }

    fn netns_for(&self, pid: u32) -> Option<u64> {
        self.netns_of_pid
            .get(&pid)
            .copied()
            .or_else(|| crate::procinfo::netns_of(pid))
    }

    fn census(&self, counts: &[(CountKey, CountValue)]) -> Vec<NsCensus> {
        match &self.scope {
            Scope::All => nsinfo::census(None),
            Scope::Only(v) => nsinfo::census(Some(v)),
            Scope::Failers => {
                let all = nsinfo::namespaces();
                let mut want: Vec<(u64, PathBuf)> = counts
                    .iter()
                    .filter_map(|(k, _)| self.netns_for(k.pid))
                    .filter_map(|n| all.get(&n).map(|p| (n, p.clone())))
                    .collect();
                want.sort();
                want.dedup();
                nsinfo::census(Some(&want))
            }
        }
    }

    /// Take a fresh picture. Also forgets owners whose TIME_WAIT is over.
    pub fn collect(&mut self, tracer: &mut Tracer) -> Result<View> {
        let t = self.started.elapsed().as_secs_f64();
        let now_ns = Clock::now_mono_ns();
        let counts = tracer.counts()?;
        let kernel_owners = tracer.owners()?;
        // at_ns comes from bpf_ktime_get_ns(): CLOCK_MONOTONIC, like now_ns.
        let expired = expired_owners(&kernel_owners, now_ns);
        if !expired.is_empty() {
            tracer.forget_owners(&expired)?;
        }
        let procs = tracer.procs()?;
        let owners: HashMap<TupleKey, OwnerView> = kernel_owners
            .iter()
            .map(|(k, o)| {
                let key = ProcKey {
                    pid: o.pid,
                    _pad: 0,
                    start_ns: o.start_ns,
                };
                let alive = nsinfo::is_alive(o.pid, o.start_ns);
                let mut v = OwnerView::from_kernel(o, procs.get(&key), alive);
                // PROCS is an LRU map: a live process it dropped is still in /proc.
                if v.comm.is_empty() && alive {
                    v.comm = nsinfo::comm_of(o.pid).unwrap_or_default();
                }
                (*k, v)
            })
            .collect();
        let census = self.census(&counts);
        let fd_owners = nsinfo::socket_owners();
        let mut usage_rows = usage(&census, &owners, &fd_owners);
        for h in usage_rows.iter_mut().flat_map(|u| u.holders.iter_mut()) {
            h.container = self.container_of(h.pid, h.cgroup_id);
        }
        let dest_stats = tracer.dest_stats()?;
        let destinations = self.rows(t, &usage_rows, &dest_stats);
        self.rates.prune(t);

        let sysctls: HashMap<u64, NsSysctls> = census
            .iter()
            .map(|c| (c.netns, c.sysctls.clone()))
            .collect();
        let mut blame = blame(&counts, &|pid| self.netns_for(pid), &sysctls, &usage_rows);
        for f in blame.iter_mut().flat_map(|b| b.failers.iter_mut()) {
            let cg = self.cgroup_of_pid.get(&f.pid).copied().unwrap_or(0);
            f.container = self.container_of(Some(f.pid), cg);
        }
        let failing = self.failing(t, &counts);
        let clock = Clock::new();
        Ok(View {
            ts_unix_ns: clock.to_unix_ns(now_ns),
            backend: tracer.backend.name(),
            failures_total: tracer.failures_total()?,
            dropped_events: tracer.dropped_events()?,
            lru_evictions: tracer.lru_evictions()?,
            tracked_sockets: kernel_owners.len() as u64,
            destinations,
            failing,
            blame,
        })
    }

    /// The container of a process: by the cgroup the kernel saw (still right after exit, as
    /// long as the cgroup exists), else by its current /proc/PID/cgroup.
    fn container_of(
        &mut self,
        pid: Option<u32>,
        cgroup_id: u64,
    ) -> Option<crate::container::ContainerInfo> {
        if cgroup_id != 0
            && let Some(c) = self.containers.by_cgroup_id(cgroup_id)
        {
            return Some((*c).clone());
        }
        pid.and_then(|p| self.containers.by_pid(p))
    }

    fn rows(
        &mut self,
        t: f64,
        usage_rows: &[DestUsage],
        dest_stats: &[(portexhaust_common::DestKey, DestTotals)],
    ) -> Vec<DestinationRow> {
        let mut stats: HashMap<(u64, SocketAddr), &DestTotals> = HashMap::new();
        for (k, v) in dest_stats {
            if let Some(a) = dest_addr(k) {
                stats.insert((u64::from(k.netns), a), v);
            }
        }
        let mut rows: Vec<DestinationRow> = usage_rows
            .iter()
            .map(|u| {
                // netns 0: the kernel could not read namespaces (no BTF); match on address.
                let st = stats
                    .get(&(u.netns, u.dst))
                    .or_else(|| stats.get(&(0, u.dst)))
                    .copied();
                let r = self.rates.observe(
                    t,
                    (u.netns, u.src, u.dst),
                    u.in_use,
                    st.map(|s| s.connects),
                );
                DestinationRow {
                    netns: u.netns,
                    src: u.src.to_string(),
                    dst: u.dst.to_string(),
                    proto: "tcp",
                    range_size: u.range_size,
                    in_use: u.in_use,
                    by_state: u.by_state.clone(),
                    utilisation: u.utilisation(),
                    new_per_s: r.new_per_s,
                    tw_expiring_per_s: u.tw_expiring_10s as f64 / 10.0,
                    forecast_s: forecast_seconds(u.range_size, u.in_use, r.growth_per_s),
                    latency_us: st.and_then(|s| latency(&s.hist)),
                    holders: u.holders.clone(),
                }
            })
            .collect();
        rows.sort_by(|a, b| {
            b.utilisation
                .total_cmp(&a.utilisation)
                .then_with(|| b.in_use.cmp(&a.in_use))
                .then_with(|| a.dst.cmp(&b.dst))
        });
        rows
    }

    fn failing(&mut self, t: f64, counts: &[(CountKey, CountValue)]) -> Vec<FailingProcess> {
        let offenders = crate::aggregate::offenders(counts, |n| n as i128);
        let mut out: Vec<FailingProcess> = offenders
            .iter()
            .map(|o| {
                let rate = match self.prev_failures.get(&o.pid) {
                    Some(&(n, t0)) if t > t0 => o.failures.saturating_sub(n) as f64 / (t - t0),
                    _ => 0.0,
                };
                FailingProcess {
                    pid: o.pid,
                    comm: o.comm.clone(),
                    failures: o.failures,
                    rate,
                    top_dst: o
                        .destinations
                        .first()
                        .map(|d| d.dst.clone())
                        .unwrap_or_default(),
                }
            })
            .collect();
        self.prev_failures = offenders.iter().map(|o| (o.pid, (o.failures, t))).collect();
        out.sort_by(|a, b| b.failures.cmp(&a.failures).then(a.pid.cmp(&b.pid)));
        out
    }
}

/// Holders summed over every destination (the "who holds ports" panel of `top`).
pub fn top_holders(rows: &[DestinationRow]) -> Vec<Holder> {
    let mut acc: HashMap<(Option<u32>, String), Holder> = HashMap::new();
    let total: u64 = rows.iter().map(|r| r.in_use).sum();
    for r in rows {
        for h in &r.holders {
            let e = acc
                .entry((h.pid, h.comm.clone()))
                .or_insert_with(|| Holder {
                    sockets: 0,
                    time_wait: 0,
                    ..h.clone()
                });
            e.sockets += h.sockets;
            e.time_wait += h.time_wait;
            e.alive |= h.alive;
        }
    }
    let mut v: Vec<Holder> = acc
        .into_values()
        .map(|mut h| {
            h.share = h.sockets as f64 / total.max(1) as f64;
            h
        })
        .collect();
    v.sort_by(|a, b| b.sockets.cmp(&a.sockets).then_with(|| a.pid.cmp(&b.pid)));
    v
}
