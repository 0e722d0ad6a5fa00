//! `trace --catch nat`: the source-NAT drops of the ring buffer, named and written as `nf_nat`
//! failures, and the summary's NAT section.
//!
//! Who caused a drop: the packet's original tuple (client address and port -> destination) is
//! the client socket's own 4-tuple, still in SYN_SENT while its SYN is being dropped (the
//! kernel retransmits it). The ownership map `OWNERS` cannot name it: it learns owners only at
//! the active close. So the sockets of every namespace are listed (sock_diag, in-kernel
//! filtering by nothing: a few ms per namespace) and the socket's inode leads to the process
//! holding it (/proc/PID/fd), as the port holders are found. A listing is taken at most every
//! `REFRESH` while drops name tuples it does not know.
use std::{
    collections::HashMap,
    net::SocketAddr,
    path::PathBuf,
    time::{Duration, Instant},
};

use portexhaust_common::{Backend, NAT_EVENT_MAGIC, NatEvent};

use crate::{
    engine::nat::{self, Client, CtRow, NatBook, NatDrop, NatId, NsView},
    kernel::{
        Result,
        conntrack::{self, NatView},
        container::Resolver,
        loader::Tracer,
        netns::{self, socket_owners},
        sockdiag,
    },
    schema::{Family, NatRange, Proto, Totals, event::ip_from_raw},
};

/// Longest between two listings of every namespace's sockets while drops need one.
const REFRESH: Duration = Duration::from_millis(250);
/// How long a NAT namespace's conntrack table is reused for the clash check of new drops.
const VIEW_TTL: Duration = Duration::from_secs(1);

/// The ring-buffer record of a NAT drop, told from the others by size and magic.
pub fn nat_event(bytes: &[u8]) -> Option<NatEvent> {
    if bytes.len() != std::mem::size_of::<NatEvent>() {
        return None;
    }
    // SAFETY: NatEvent is a Pod (integers and byte arrays only) and `bytes` holds exactly its
    // size; read_unaligned copes with any alignment.
    let ev: NatEvent = unsafe { std::ptr::read_unaligned(bytes.as_ptr().cast()) };
    (ev.magic == NAT_EVENT_MAGIC).then_some(ev)
}

/// Client sockets by (source, destination), from the last listing.
#[derive(Default)]
struct Sockets {
    by_tuple: HashMap<(SocketAddr, SocketAddr), Client>,
    at: Option<Instant>,
}

impl Sockets {
    fn refresh(&mut self, containers: &Resolver) {
        let owners = socket_owners();
        let mut by_tuple = HashMap::new();
        for (ino, path) in netns::namespaces() {
            let rows = match netns::in_netns(ino, &path, sockdiag::dump_tcp) {
                Ok(Ok(rows)) => rows,
                Ok(Err(e)) | Err(e) => {
                    log::debug!("listing the sockets of netns {ino}: {e}");
                    continue;
                }
            };
            for r in rows {
                let Some(o) = owners.get(&r.inode).filter(|_| r.inode != 0) else {
                    continue;
                };
                by_tuple.insert(
                    (
                        SocketAddr::new(r.src, r.sport),
                        SocketAddr::new(r.dst, r.dport),
                    ),
                    Client {
                        pid: o.pid,
                        comm: o.comm.clone(),
                        netns: ino,
                        uid: r.uid,
                        container: containers.by_pid(o.pid),
                    },
                );
            }
        }
        self.by_tuple = by_tuple;
        self.at = Some(Instant::now());
    }

    /// The client behind `(src, dst)`, listing again if that is not recent.
    fn find(&mut self, src: SocketAddr, dst: SocketAddr, containers: &Resolver) -> Option<Client> {
        if let Some(c) = self.by_tuple.get(&(src, dst)) {
            return Some(c.clone());
        }
        if self.at.is_none_or(|t| t.elapsed() >= REFRESH) {
            self.refresh(containers);
            return self.by_tuple.get(&(src, dst)).cloned();
        }
        None
    }
}

/// Every handle to a namespace: the ones with processes, and the named ones of `ip netns`
/// (a router namespace often has no process in it).
fn handles() -> HashMap<u64, PathBuf> {
    let mut all: HashMap<u64, PathBuf> = netns::namespaces().into_iter().collect();
    use std::os::unix::fs::MetadataExt;
    for dir in ["/run/netns", "/var/run/netns"] {
        let Ok(rd) = std::fs::read_dir(dir) else {
            continue;
        };
        for e in rd.flatten() {
            if let Ok(m) = std::fs::metadata(e.path()) {
                all.entry(m.ino()).or_insert(e.path());
            }
        }
    }
    all
}

fn rows_of(v: &NatView) -> Vec<CtRow> {
    v.entries
        .iter()
        .filter(|e| e.snat())
        .filter_map(|e| {
            Some(CtRow {
                proto: Proto::from_ipproto(e.proto)?,
                src: e.orig.src,
                dst: e.orig.dst,
                nat: e.reply.dst,
            })
        })
        .collect()
}

/// The NAT side of a trace session (or of `doctor`, which may look without tracing: no
/// baseline, no drops).
#[derive(Default)]
pub struct NatWatch {
    book: NatBook,
    sockets: Sockets,
    /// `insert_failed` of every namespace when tracing started.
    baseline: HashMap<u64, u64>,
    /// Each NAT namespace's conntrack table, for the clash check.
    views: HashMap<u64, (Instant, NatView)>,
    /// `confirm_unmatched` as last warned about.
    unmatched_said: u64,
}

impl NatWatch {
    /// Read every namespace's `insert_failed` before the first drop can be counted.
    pub fn start() -> Self {
        let mut baseline = HashMap::new();
        for (ino, path) in handles() {
            if let Ok(Ok((failed, _))) = netns::in_netns(ino, &path, conntrack::stat_here) {
                baseline.insert(ino, failed);
            }
        }
        Self {
            baseline,
            ..Self::default()
        }
    }

    fn view(&mut self, ino: u64, max_age: Duration) -> Option<&NatView> {
        let fresh = self
            .views
            .get(&ino)
            .is_some_and(|(t, _)| t.elapsed() < max_age);
        if !fresh {
            let path = conntrack::netns_handle(ino)?;
            let v = conntrack::view_of(ino, &path)?;
            self.views.insert(ino, (Instant::now(), v));
        }
        self.views.get(&ino).map(|(_, v)| v)
    }

    /// Name a batch of drops and turn each into its failure line.
    pub fn named(
        &mut self,
        drops: Vec<NatDrop>,
        backend: Backend,
        containers: &Resolver,
    ) -> Vec<crate::schema::Failure> {
        let mut out = Vec::with_capacity(drops.len());
        for d in drops {
            let client = self.sockets.find(d.client, d.dst, containers);
            let clash = self
                .view(d.router_netns, VIEW_TTL)
                .map(|v| nat::clashes(&rows_of(v), d.dst, d.nat));
            self.book.add(&d, client.as_ref());
            out.push(nat::failure(&d, client.as_ref(), backend, clash));
        }
        out
    }

    /// The NAT drops into the summary (or a snapshot): the kernel's exact counts, the NAT's
    /// view of each destination now, and who holds its ports.
    pub fn fold(
        &mut self,
        tracer: &Tracer,
        totals: &mut Totals,
        containers: &Resolver,
    ) -> Result<()> {
        let entries = self.entries(tracer, containers)?;
        if !entries.is_empty() {
            nat::fold(totals, entries, &self.book);
        }
        // Drops whose key found no room in NAT_COUNTS are in no entry: in the total and
        // `uncounted_keys`, as the connect failures beyond the counts map are.
        let stats = tracer.nat_stats()?;
        totals.failures_total += stats.uncounted;
        totals.uncounted_keys += stats.uncounted;
        totals.nat_unstreamed = stats.unstreamed;
        // The confirm kprobe pair could not pair some calls (nested too deep, a lost return):
        // drops among them would be missed. Said once, when it first happens.
        if stats.confirm_unmatched > self.unmatched_said {
            log::warn!(
                "{} __nf_conntrack_confirm call(s) could not be paired with their return: NAT \
                 drops among them are not counted",
                stats.confirm_unmatched
            );
            self.unmatched_said = stats.confirm_unmatched;
        }
        Ok(())
    }

    /// The NAT section as of now: the kernel's exact drops per NAT namespace, destination and
    /// NAT address, with the NAT's own view and the clients (the summary, snapshots and the
    /// metrics all take it from here).
    pub fn entries(
        &mut self,
        tracer: &Tracer,
        containers: &Resolver,
    ) -> Result<Vec<crate::schema::NatEntry>> {
        let kernel = kernel_counts(tracer)?;
        if kernel.is_empty() {
            return Ok(Vec::new());
        }
        Ok(self.entries_of(kernel, None, containers))
    }

    /// Every destination the NAT of namespace `ino` maps connections to now, dropped or not,
    /// with the drops `tracer` counted there (`doctor`; without a tracer, the NAT's view
    /// alone).
    pub fn entries_in(
        &mut self,
        ino: u64,
        tracer: Option<&Tracer>,
        containers: &Resolver,
    ) -> Result<Vec<crate::schema::NatEntry>> {
        let kernel = match tracer {
            Some(t) => kernel_counts(t)?
                .into_iter()
                .filter(|(id, _)| id.router_netns == ino)
                .collect(),
            None => Vec::new(),
        };
        Ok(self.entries_of(kernel, Some(ino), containers))
    }

    /// The entries of `kernel`'s keys, and with `idle`, of every destination that namespace's
    /// NAT maps (0 drops where the kernel counted none).
    fn entries_of(
        &mut self,
        mut kernel: Vec<(NatId, u64)>,
        idle: Option<u64>,
        containers: &Resolver,
    ) -> Vec<crate::schema::NatEntry> {
        let mut views = HashMap::new();
        let mut routers: Vec<u64> = kernel.iter().map(|(id, _)| id.router_netns).collect();
        routers.extend(idle);
        routers.sort_unstable();
        routers.dedup();
        // The counters first, right after the kernel's counts: drops still happening while
        // the conntrack tables are dumped would otherwise land in one and not the other.
        let stats: HashMap<u64, u64> = routers
            .iter()
            .filter_map(|&ino| {
                let path = conntrack::netns_handle(ino)?;
                let (failed, _) = netns::in_netns(ino, &path, conntrack::stat_here)
                    .ok()?
                    .ok()?;
                Some((ino, failed))
            })
            .collect();
        for ino in routers {
            let Some(v) = self.view(ino, Duration::ZERO).cloned() else {
                continue;
            };
            let rows = rows_of(&v);
            if idle == Some(ino) {
                for r in &rows {
                    let id = NatId {
                        router_netns: ino,
                        proto: r.proto,
                        dst: r.dst,
                        nat_addr: r.nat.ip(),
                    };
                    if !kernel.iter().any(|(k, _)| *k == id) {
                        kernel.push((id, 0));
                    }
                }
            }
            let delta = stats
                .get(&ino)
                .zip(self.baseline.get(&ino))
                .map(|(now, before)| now.saturating_sub(*before));
            views.insert(
                ino,
                NsView {
                    rows,
                    range: v.range.map(|(lo, hi, source)| NatRange {
                        lo,
                        hi,
                        source: source.to_string(),
                    }),
                    insert_failed_delta: delta,
                },
            );
        }
        // A listing of its own: refreshing the drops' listing here would make a drop that
        // arrives right after look up a listing taken before its SYN (see `Sockets::find`).
        let mut sockets = Sockets::default();
        if views.values().any(|v: &NsView| !v.rows.is_empty()) {
            sockets.refresh(containers);
        }
        let sockets = &sockets;
        let holder_of =
            |src: SocketAddr, dst: SocketAddr| sockets.by_tuple.get(&(src, dst)).cloned();
        nat::entries(&kernel, &self.book, &views, &holder_of)
    }
}

/// The kernel's exact drop counts, by key.
fn kernel_counts(tracer: &Tracer) -> Result<Vec<(NatId, u64)>> {
    Ok(tracer
        .nat_counts()?
        .into_iter()
        .filter_map(|(k, n)| {
            let f = Family::from_af(k.family)?;
            let dst = SocketAddr::new(ip_from_raw(f, &k.daddr), k.dport);
            Some((
                NatId {
                    router_netns: u64::from(k.netns),
                    proto: Proto::from_ipproto(k.proto)?,
                    dst,
                    nat_addr: ip_from_raw(f, &k.nat_addr),
                },
                n,
            ))
        })
        .collect())
}

/// Decode a batch of records (the clock converts the kernel's monotonic times).
pub fn decode(evs: &[NatEvent], ts: impl Fn(u64) -> crate::schema::Ts) -> Vec<NatDrop> {
    evs.iter()
        .filter_map(|e| nat::decode(e, ts(e.ts_ns)))
        .collect()
}
