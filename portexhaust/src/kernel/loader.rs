//! Loading the eBPF object, choosing and attaching a backend, reading its maps.
use std::os::fd::{AsRawFd, RawFd};

use aya::{
    Btf, Ebpf, EbpfLoader,
    maps::{HashMap, MapData, PerCpuArray, RingBuf},
    programs::{
        BtfTracePoint, FEntry, FExit, KProbe, Program as AyaProgram, ProgramError, RawTracePoint,
        TracePoint,
    },
};
use log::{debug, info};
use portexhaust_common::{
    Backend, ConnMemo, CountKey, CountValue, DestKey, DestStats, FILTER_CGROUP, FILTER_COMM,
    FILTER_DPORT, FILTER_PID, KIND_CONNECT, LATENCY_BUCKETS, Offsets, Owner, ProcInfo, ProcKey,
    SiteKey, SiteMemo, SiteRef, SiteValue, TupleKey, kind_name, names,
    programs::{self, Hook, Program, Set},
    stat,
};

mod attach;
mod maps;
mod nat;

pub use attach::set_hooks;
use attach::{KernelBtf, attach_plan, filter_map, load_object, static_unavailability};

use super::{
    btf::Resolved,
    klog::{self, KernelLog},
    plan::{Offer, Plan, Watch},
    preflight::{self, Caps},
};
use crate::{
    error::one_line,
    kernel::error::{Error, Result},
    schema::event::comm_bytes,
};

/// The eBPF object built by build.rs, embedded so the binary is self-contained.
static EBPF_OBJECT: &[u8] =
    aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/portexhaust-ebpf"));

/// `--backend auto` tries these, cheapest first, as measured by `cargo xtask bench` on every
/// kernel of the matrix (BENCHMARKS.md): the tp_btf state hook runs only on TCP state changes,
/// with direct loads and no record; raw_tp is the same hook with a helper call per field;
/// fentry and kprobe add hooks on every connect() on top of the state hook; the perf
/// tracepoint builds a record on every state change of every socket.
pub const AUTO_ORDER: [Backend; 5] = [
    Backend::TpBtf,
    Backend::RawTp,
    Backend::Fentry,
    Backend::Kprobe,
    Backend::Tracepoint,
];

/// Which backend the user asked for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BackendRequest {
    Auto,
    Only(Backend),
}

impl BackendRequest {
    pub fn candidates(self) -> Vec<Backend> {
        match self {
            Self::Auto => AUTO_ORDER.to_vec(),
            Self::Only(b) => vec![b],
        }
    }
}

/// In-kernel filters. A failure is counted and reported only if it passes every active one.
#[derive(Clone, Debug, Default)]
pub struct Filters {
    pub pids: Vec<u32>,
    /// Turn the pid filter on even with no pid yet (pids are added after load, see selftest).
    pub pid_whitelist: bool,
    pub comms: Vec<String>,
    pub dports: Vec<u16>,
    /// `--cgroup`/`--container`: the cgroup v2 subtrees whose tasks pass.
    pub cgroups: super::cgroups::Subtrees,
}

impl Filters {
    fn flags(&self) -> u32 {
        let mut f = 0;
        if self.pid_whitelist || !self.pids.is_empty() {
            f |= FILTER_PID;
        }
        if !self.comms.is_empty() {
            f |= FILTER_COMM;
        }
        if !self.dports.is_empty() {
            f |= FILTER_DPORT;
        }
        if !self.cgroups.targets.is_empty() {
            f |= FILTER_CGROUP;
        }
        f
    }
}

/// Default size of the socket-ownership map (entries).
pub const DEFAULT_MAX_TRACKED: u32 = 131072;

/// Default size of the exact-counts map (keys: pid, destination, errno, cause).
pub const DEFAULT_MAX_COUNT_KEYS: u32 = 16384;

/// How much the programs track besides failures, and which extra kinds to watch.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Tracking {
    /// Size of the socket-ownership LRU map.
    pub max_tracked: u32,
    /// Size of the exact-counts map; failures of keys beyond it are counted only in total
    /// (`uncounted_keys`). Shrunk by tests to reach that path.
    pub max_count_keys: u32,
    /// Ownership tracking and latency histograms (off: `trace --no-blame`).
    pub blame: bool,
    /// `KIND_*` bits to watch even where that takes syscall tracepoints (`--catch`).
    pub catch: u32,
    /// Failure events streamed per second at most (0: every one). The kernel splits it between
    /// the CPUs; failures beyond it are counted exactly and tallied, not streamed one by one.
    pub events_per_s: u32,
    /// Call sites: connects and failures counted per user stack, with rate-limited stack walks
    /// (off: `trace --no-call-sites`; needs `blame`).
    pub call_sites: bool,
}

impl Default for Tracking {
    fn default() -> Self {
        Self {
            max_tracked: DEFAULT_MAX_TRACKED,
            max_count_keys: DEFAULT_MAX_COUNT_KEYS,
            blame: true,
            catch: 0,
            events_per_s: 0,
            call_sites: true,
        }
    }
}

/// The per-CPU share of an events-per-second budget (rounded up; 0 stays "no limit").
pub fn per_cpu_budget(events_per_s: u32, cpus: u32) -> u32 {
    if events_per_s == 0 {
        return 0;
    }
    events_per_s.div_ceil(cpus.max(1))
}

/// What the NAT hook choice needs (see `plan::nat_hooks`).
fn nat_facts(caps: &Caps, btf: &mut KernelBtf) -> crate::kernel::plan::NatFacts {
    use crate::kernel::plan::{NAT_HOOK_ENV, NatFacts, NatHook};
    NatFacts {
        conntrack: btf.nat().map(|_| ()),
        kfree_skb: btf.nat_reason().map(|_| ()),
        kprobe: caps.kprobe.clone(),
        nf_conntrack_loaded: nf_conntrack_loaded(),
        force: std::env::var(NAT_HOOK_ENV)
            .ok()
            .filter(|v| !v.is_empty())
            .map(|v| NatHook::parse(&v)),
    }
}

/// Whether `__nf_conntrack_confirm` exists to be probed: nf_conntrack is a module on most
/// distributions (Debian's included), loaded by the first conntrack or NAT rule. It has
/// parameters, so /sys/module lists it built in too; /proc/kallsyms is the slower check.
fn nf_conntrack_loaded() -> bool {
    if std::path::Path::new("/sys/module/nf_conntrack").is_dir() {
        return true;
    }
    std::fs::read_to_string("/proc/kallsyms").is_ok_and(|t| {
        t.lines()
            .any(|l| l.split_whitespace().nth(2) == Some("__nf_conntrack_confirm"))
    })
}

/// One failure kind and the hook watching it, or why nothing does.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Coverage {
    pub kind: u32,
    pub watch: std::result::Result<String, String>,
}

impl Coverage {
    pub fn name(&self) -> &'static str {
        kind_name(self.kind)
    }
}

/// A loaded, attached program set and its maps. Dropping it detaches everything.
pub struct Tracer {
    ebpf: Ebpf,
    ring: RingBuf<MapData>,
    pub backend: Backend,
    /// Whether netns and process start times are read in the kernel (BTF offsets were found).
    pub kernel_netns: bool,
    /// What each failure kind is watched by.
    pub coverage: Vec<Coverage>,
    /// Every program attached, in attach order.
    pub attached: Vec<&'static Program>,
    /// Owner-map entries deleted by user space (expired TIME_WAIT), for the eviction count.
    user_owner_deletes: u64,
    /// The programs' own warnings (aya-log), drained by `drain_log`.
    klog: KernelLog,
    /// Counts of exited processes moved out of the kernel's `COUNTS` (see
    /// `retire_exited_counts`); `counts()` adds them back.
    retired: std::collections::HashMap<CountKey, CountValue>,
    /// `COUNTS`'s size.
    count_capacity: u32,
}

/// connect() statistics of one destination.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DestTotals {
    /// Established connections.
    pub connects: u64,
    pub hist: [u64; LATENCY_BUCKETS],
}

/// The outcome of backend selection: the tracer and why earlier candidates were skipped.
pub struct Opened {
    pub tracer: Tracer,
    pub skipped: Vec<(Backend, String)>,
}

impl Tracer {
    /// Check privileges, then try the requested backends in order.
    pub fn open(req: BackendRequest, filters: &Filters) -> Result<Opened> {
        Self::open_with(req, filters, Tracking::default())
    }

    /// As `open`, choosing what is tracked besides failures.
    pub fn open_with(req: BackendRequest, filters: &Filters, tracking: Tracking) -> Result<Opened> {
        let t0 = std::time::Instant::now();
        preflight::check_privileges()?;
        preflight::raise_memlock();
        let caps = Caps::probe();
        let mut btf = KernelBtf::read(&caps);
        debug!("start-up: capabilities and BTF after {:?}", t0.elapsed());
        let offer = Offer {
            fentry: caps.fentry.clone(),
            kprobe: caps.kprobe.clone(),
        };
        let mut skipped = Vec::new();
        for backend in req.candidates() {
            btf.aya = None;
            let attempt = match static_unavailability(backend, &caps, &btf) {
                Some(reason) => Err(reason),
                None => {
                    let mut plan = Plan::new(backend, &offer, tracking.catch);
                    if plan.watches_nat() {
                        let facts = nat_facts(&caps, &mut btf);
                        plan.choose_nat(&facts);
                    }
                    load_object(&plan, filters, tracking, &mut btf).and_then(|mut ebpf| {
                        debug!("start-up: object loaded after {:?}", t0.elapsed());
                        attach_plan(&mut ebpf, &plan, btf.aya(&plan)).map(|a| (ebpf, a))
                    })
                }
            };
            debug!(
                "start-up: backend {} tried after {:?}",
                backend.name(),
                t0.elapsed()
            );
            match attempt {
                Ok((mut ebpf, (attached, coverage))) => {
                    let map = ebpf.take_map(names::EVENTS).ok_or(Error::MissingObject {
                        kind: "map",
                        name: names::EVENTS,
                    })?;
                    let ring = RingBuf::try_from(map).map_err(|source| Error::Map {
                        map: names::EVENTS,
                        source,
                    })?;
                    let klog = KernelLog::start(&mut ebpf);
                    return Ok(Opened {
                        tracer: Tracer {
                            ebpf,
                            ring,
                            backend,
                            kernel_netns: btf.resolved.is_some_and(|r| r.task),
                            coverage,
                            attached,
                            user_owner_deletes: 0,
                            klog,
                            retired: std::collections::HashMap::new(),
                            count_capacity: tracking.max_count_keys.max(1),
                        },
                        skipped,
                    });
                }
                Err(reason) => {
                    if let BackendRequest::Only(b) = req {
                        return Err(Error::BackendUnavailable {
                            backend: b.name(),
                            reason,
                        });
                    }
                    skipped.push((backend, reason));
                }
            }
        }
        Err(Error::NoBackend(
            skipped
                .iter()
                .map(|(b, r)| format!("{}: {r}", b.name()))
                .collect::<Vec<_>>()
                .join("; "),
        ))
    }

    /// `KIND_*` bits of the kinds some hook watches.
    pub fn watched_kinds(&self) -> u32 {
        self.coverage
            .iter()
            .filter(|c| c.watch.is_ok())
            .fold(0, |a, c| a | c.kind)
    }

    /// Whether any attached program sits on the syscall path.
    pub fn on_syscall_path(&self) -> bool {
        self.attached.iter().any(|p| p.hook.on_syscall_path())
    }

    /// The ring buffer's fd, to wait on with epoll/AsyncFd.
    pub fn ring_fd(&self) -> RawFd {
        self.ring.as_raw_fd()
    }

    /// Hand every pending ring-buffer record to `f`; returns how many there were.
    pub fn drain(&mut self, mut f: impl FnMut(&[u8])) -> usize {
        let mut n = 0;
        while let Some(item) = self.ring.next() {
            f(&item);
            n += 1;
        }
        n
    }

    /// Pass the programs' pending log records (cold-path warnings) on to `log`.
    pub fn drain_log(&mut self) {
        self.klog.drain();
    }

    /// Bring `FILTER_CGROUPS` up to date with the cgroups that exist now under the filtered
    /// subtrees (only needed without the ancestor helper, before 5.14: see kernel/cgroups.rs).
    /// Returns how many ids were added.
    pub fn refresh_cgroup_filter(&mut self, cgroups: &super::cgroups::Subtrees) -> Result<usize> {
        let want: std::collections::HashSet<u64> = cgroups.ids().into_iter().collect();
        let mut m = filter_map::<u64>(&mut self.ebpf, names::FILTER_CGROUPS)?;
        let have: std::collections::HashSet<u64> = m.keys().filter_map(|k| k.ok()).collect();
        for gone in have.difference(&want) {
            // Already gone is fine: nothing else deletes from this map.
            let _ = m.remove(gone);
        }
        let mut added = 0;
        for id in want.difference(&have) {
            m.insert(*id, 1, 0).map_err(|source| Error::Map {
                map: names::FILTER_CGROUPS,
                source,
            })?;
            added += 1;
        }
        Ok(added)
    }

    /// Add a pid to the pid whitelist (needs `Filters::pid_whitelist` at open time).
    pub fn add_pid_filter(&mut self, pid: u32) -> Result<()> {
        let mut m = filter_map::<u32>(&mut self.ebpf, names::FILTER_PIDS)?;
        m.insert(pid, 1, 0).map_err(|source| Error::Map {
            map: names::FILTER_PIDS,
            source,
        })
    }
}

#[cfg(test)]
mod tests;
