//! The live answers: the trace summary (and each snapshot of a record) and `top`'s view, from
//! what the kernel layer observed at one moment. Pure: the observation comes in as data.
use std::{
    collections::{HashMap, HashSet},
    net::SocketAddr,
    sync::Arc,
};

use portexhaust_common::{Backend, LATENCY_BUCKETS, SiteRef, TupleKey};

use super::nat::NatId;
use super::{
    blame::blame,
    census::{DestUsage, FdOwner, NsCensus, OwnerView, PortSpace, busiest, sort_holders, usage},
    counts::{Counts, offenders},
    rates::{RateTracker, forecast_seconds, latency},
    sites::{Inputs, SiteObs, Stack, call_sites},
    whatif::with_what_if,
};
use crate::schema::{
    CallSite, DestRow, FailingProcess, Holder, NatEntry, NatRow, TopView, Totals, Ts, VERSION,
};

/// Namespaces whose destinations a snapshot lists, and rows per namespace.
const SNAPSHOT_NAMESPACES: usize = 16;
const SNAPSHOT_ROWS: usize = 20;

/// New connections and connect() latency towards one destination (the kernel's `DEST_STATS`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DestStat {
    /// 0: the kernel could not read namespaces (no BTF).
    pub netns: u64,
    pub dst: SocketAddr,
    pub connects: u64,
    pub hist: [u64; LATENCY_BUCKETS],
}

/// The kernel's own totals.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct KernelTotals {
    pub failures_total: u64,
    pub dropped_events: u64,
    pub uncounted_keys: u64,
    pub tracked_sockets: u64,
    pub lru_evictions: u64,
}

/// Everything the kernel layer gathered at one moment.
#[derive(Clone, Debug)]
pub struct Observed {
    pub ts: Ts,
    pub backend: Backend,
    pub kernel: KernelTotals,
    pub counts: Counts,
    /// The namespaces looked at: the failers' (trace) or all or some (top).
    pub census: Vec<NsCensus>,
    pub owners: HashMap<TupleKey, OwnerView>,
    pub fd_owners: HashMap<u64, FdOwner>,
    pub dest_stats: Vec<DestStat>,
    /// Where each failer ran, learnt from its events (still known after it exited).
    pub netns_of_pid: HashMap<u32, u64>,
    /// The kernel's call-site counts, their symbolised stacks by (pid, stack id), and the
    /// call site of each walked connection by 4-tuple.
    pub sites: Vec<SiteObs>,
    pub stacks: HashMap<(u32, u32), Arc<Stack>>,
    pub sock_sites: HashMap<TupleKey, SiteRef>,
}

impl Observed {
    /// The call-site rows, with their holds now.
    pub fn call_sites(&self) -> Vec<CallSite> {
        if self.sites.is_empty() {
            return Vec::new();
        }
        let mut comms: HashMap<u32, String> = HashMap::new();
        for (k, c) in &self.counts {
            comms.entry(k.pid).or_insert_with(|| c.comm.clone());
        }
        for f in self.fd_owners.values() {
            comms.entry(f.pid).or_insert_with(|| f.comm.clone());
        }
        for o in self.owners.values() {
            comms.entry(o.pid).or_insert_with(|| o.comm.clone());
        }
        call_sites(&Inputs {
            sites: &self.sites,
            stacks: &self.stacks,
            sock_sites: &self.sock_sites,
            census: &self.census,
            owners: &self.owners,
            fd_owners: &self.fd_owners,
            comms: &comms,
        })
    }

    fn usage(&self) -> Vec<DestUsage> {
        usage(&self.census, &self.owners, &self.fd_owners)
    }

    fn ports(&self) -> HashMap<u64, PortSpace> {
        self.census
            .iter()
            .map(|c| (c.netns, c.ports.clone()))
            .collect()
    }
}

/// What the tracer says of itself in a summary.
#[derive(Clone, Debug, Default)]
pub struct Run {
    pub duration_s: f64,
    /// Ownership tracking was on (`--no-blame` turns it off).
    pub blame: bool,
    pub watched: Vec<String>,
    pub not_watched: Vec<(String, String)>,
}

/// The summary (or a record's snapshot) of a live run.
pub fn totals(obs: &Observed, run: &Run) -> Totals {
    let usage_rows = obs.usage();
    let mut offenders = offenders(&obs.counts);
    for o in &mut offenders {
        o.netns = o.netns.or_else(|| obs.netns_of_pid.get(&o.pid).copied());
    }
    let blame = if run.blame && !obs.counts.is_empty() {
        blame(
            &obs.counts,
            &|pid| obs.netns_of_pid.get(&pid).copied(),
            &obs.ports(),
            &usage_rows,
        )
    } else {
        Vec::new()
    };
    let mut destinations = Vec::new();
    let mut namespaces = HashSet::new();
    let mut rows: Vec<DestRow> = usage_rows.iter().map(DestUsage::row).collect();
    rows.sort_by(|a, b| b.in_use.cmp(&a.in_use).then_with(|| a.dst.cmp(&b.dst)));
    for ns in rows.iter().filter_map(|r| r.netns) {
        if namespaces.len() < SNAPSHOT_NAMESPACES {
            namespaces.insert(ns);
        }
    }
    for ns in namespaces {
        let of_ns: Vec<DestRow> = rows
            .iter()
            .filter(|r| r.netns == Some(ns))
            .cloned()
            .collect();
        destinations.extend(busiest(of_ns, SNAPSHOT_ROWS));
    }
    destinations.sort_by(|a, b| {
        b.in_use
            .cmp(&a.in_use)
            .then_with(|| a.netns.cmp(&b.netns))
            .then_with(|| a.dst.cmp(&b.dst))
    });
    Totals {
        version: VERSION,
        ts: Some(obs.ts),
        backend: Some(obs.backend),
        duration_s: Some((run.duration_s * 1000.0).round() / 1000.0),
        failures_total: obs.kernel.failures_total,
        dropped_events: obs.kernel.dropped_events,
        uncounted_keys: obs.kernel.uncounted_keys,
        offenders,
        blame,
        destinations,
        call_sites: if run.blame {
            obs.call_sites()
        } else {
            Vec::new()
        },
        tracked_sockets: if run.blame {
            obs.kernel.tracked_sockets
        } else {
            0
        },
        lru_evictions: if run.blame {
            obs.kernel.lru_evictions
        } else {
            0
        },
        watched: run.watched.clone(),
        not_watched: run.not_watched.iter().cloned().collect(),
        // Filled in by the NAT watch (`--catch nat`), which has its own kernel counts.
        nat: Vec::new(),
        nat_unstreamed: 0,
    }
}

/// `top`'s state between refreshes: rate windows and the previous failure counts.
pub struct Viewer {
    rates: RateTracker,
    prev_failures: HashMap<u32, (u64, f64)>,
    /// Drops of each NAT destination at the previous refresh, and when.
    prev_nat: HashMap<NatId, (u64, f64)>,
    /// NAT drops of each client at the previous refresh, and when.
    prev_nat_failers: HashMap<u32, (u64, f64)>,
}

impl Default for Viewer {
    fn default() -> Self {
        Self::new()
    }
}

impl Viewer {
    pub fn new() -> Self {
        Self {
            rates: RateTracker::new(30.0),
            prev_failures: HashMap::new(),
            prev_nat: HashMap::new(),
            prev_nat_failers: HashMap::new(),
        }
    }

    /// The view at `t` seconds since start.
    pub fn view(&mut self, t: f64, obs: &Observed) -> TopView {
        let usage_rows = obs.usage();
        let ports = obs.ports();
        let destinations = self
            .rows(t, &usage_rows, &obs.dest_stats)
            .into_iter()
            .map(|r| {
                let p = r
                    .netns
                    .and_then(|n| ports.get(&n))
                    .cloned()
                    .unwrap_or_default();
                with_what_if(r, &p)
            })
            .collect();
        self.rates.prune(t);
        let blame = blame(
            &obs.counts,
            &|pid| obs.netns_of_pid.get(&pid).copied(),
            &obs.ports(),
            &usage_rows,
        );
        let failing = self.failing(t, &obs.counts);
        TopView {
            ts: obs.ts,
            backend: obs.backend,
            failures_total: obs.kernel.failures_total,
            dropped_events: obs.kernel.dropped_events,
            lru_evictions: obs.kernel.lru_evictions,
            tracked_sockets: obs.kernel.tracked_sockets,
            destinations,
            failing,
            blame,
            call_sites: obs.call_sites(),
            nat: Vec::new(),
        }
    }

    /// Put the NAT section (the summary's entries, from the same watch) into a view at `t`
    /// seconds: one row per NAT destination with its drop rate, its drops in the total and
    /// its named clients among the failing processes, as the summary counts its offenders.
    pub fn with_nat(&mut self, t: f64, v: &mut TopView, entries: Vec<NatEntry>) {
        let mut drops_of: HashMap<u32, (String, u64, SocketAddr)> = HashMap::new();
        for e in &entries {
            for f in &e.failers {
                if let Some(pid) = f.pid {
                    let d = drops_of.entry(pid).or_insert((f.comm.clone(), 0, e.dst));
                    d.1 += f.count;
                }
            }
        }
        for (&pid, (comm, n, dst)) in &drops_of {
            let rate = match self.prev_nat_failers.get(&pid) {
                Some(&(n0, t0)) if t > t0 => n.saturating_sub(n0) as f64 / (t - t0),
                _ => 0.0,
            };
            match v.failing.iter_mut().find(|f| f.pid == pid) {
                Some(f) => {
                    f.failures += n;
                    f.rate += rate;
                }
                None => v.failing.push(FailingProcess {
                    pid,
                    comm: comm.clone(),
                    failures: *n,
                    rate,
                    top_dst: Some(*dst),
                }),
            }
        }
        v.failing
            .sort_by(|a, b| b.failures.cmp(&a.failures).then(a.pid.cmp(&b.pid)));
        self.prev_nat_failers = drops_of
            .into_iter()
            .map(|(p, (_, n, _))| (p, (n, t)))
            .collect();
        let mut seen = HashMap::new();
        v.nat = entries
            .into_iter()
            .map(|entry| {
                let id = NatId::of_entry(&entry);
                let drops_per_s = self
                    .prev_nat
                    .get(&id)
                    .filter(|(_, t0)| t > *t0)
                    .map(|(n, t0)| entry.drops.saturating_sub(*n) as f64 / (t - t0));
                seen.insert(id, (entry.drops, t));
                v.failures_total += entry.drops;
                NatRow { entry, drops_per_s }
            })
            .collect();
        // Rows the kernel no longer lists (never, today: NAT_COUNTS keeps its keys) are
        // forgotten with it.
        self.prev_nat = seen;
    }

    /// The destination rows alone, at `t` seconds since start: what `top` shows of each
    /// destination (ports, rates, forecast, connect counts and latency), without holders,
    /// blame or call sites. `trace --metrics-addr` serves these, so its metrics and `top` are
    /// one answer.
    pub fn destinations(
        &mut self,
        t: f64,
        census: &[NsCensus],
        stats: &[DestStat],
    ) -> Vec<DestRow> {
        let usage_rows = usage(census, &HashMap::new(), &HashMap::new());
        let rows = self.rows(t, &usage_rows, stats);
        self.rates.prune(t);
        rows
    }

    fn rows(&mut self, t: f64, usage_rows: &[DestUsage], stats: &[DestStat]) -> Vec<DestRow> {
        let by_dst: HashMap<(u64, SocketAddr), &DestStat> =
            stats.iter().map(|s| ((s.netns, s.dst), s)).collect();
        let mut rows: Vec<DestRow> = usage_rows
            .iter()
            .map(|u| {
                // netns 0: the kernel could not read namespaces (no BTF); match on address.
                let st = by_dst
                    .get(&(u.netns, u.dst))
                    .or_else(|| by_dst.get(&(0, u.dst)))
                    .copied();
                let r = self.rates.observe(
                    t,
                    (u.netns, u.src, u.dst),
                    u.in_use,
                    st.map(|s| s.connects),
                );
                DestRow {
                    new_per_s: r.new_per_s,
                    tw_expiring_per_s: Some(u.tw_expiring_10s as f64 / 10.0),
                    forecast_s: forecast_seconds(u.range_size, u.in_use, r.growth_per_s),
                    latency_us: st.and_then(|s| latency(&s.hist)),
                    connects: st.map(|s| s.connects),
                    holders: u.holders.clone(),
                    ..u.row()
                }
            })
            .collect();
        rows.sort_by(|a, b| {
            b.utilisation
                .unwrap_or(0.0)
                .total_cmp(&a.utilisation.unwrap_or(0.0))
                .then_with(|| b.in_use.cmp(&a.in_use))
                .then_with(|| a.dst.cmp(&b.dst))
        });
        rows
    }

    fn failing(&mut self, t: f64, counts: &Counts) -> Vec<FailingProcess> {
        let offenders = offenders(counts);
        let out: Vec<FailingProcess> = offenders
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
                    top_dst: o.destinations.first().map(|d| d.dst),
                }
            })
            .collect();
        self.prev_failures = offenders.iter().map(|o| (o.pid, (o.failures, t))).collect();
        out
    }
}

/// Holders summed over every destination (the "who holds ports" panel of `top`).
pub fn top_holders(rows: &[DestRow]) -> Vec<Holder> {
    let mut acc: HashMap<(Option<u32>, String), Holder> = HashMap::new();
    let total: u64 = rows.iter().map(|r| r.in_use).sum();
    for r in rows {
        for h in &r.holders {
            acc.entry((h.pid, h.comm.clone()))
                .or_insert_with(|| h.empty_like())
                .absorb(h);
        }
    }
    let mut v: Vec<Holder> = acc
        .into_values()
        .map(|mut h| {
            h.share = h.sockets as f64 / total.max(1) as f64;
            h
        })
        .collect();
    sort_holders(&mut v);
    v
}
