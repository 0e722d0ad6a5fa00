//! Loading the eBPF object, choosing and attaching a backend, reading its maps.
use std::{
    os::fd::{AsRawFd, RawFd},
    path::Path,
};

use aya::{
    Btf, Ebpf, EbpfLoader,
    maps::{HashMap, MapData, PerCpuArray, PerCpuHashMap, RingBuf},
    programs::{FEntry, FExit, KProbe, TracePoint},
};
use log::{debug, info};
use portexhaust_common::{
    Backend, CountKey, CountValue, DestKey, DestStats, FILTER_COMM, FILTER_DPORT, FILTER_PID,
    LATENCY_BUCKETS, Owner, TupleKey, names, stat,
};

use crate::{
    btf::TaskOffsets,
    error::{Error, Result, one_line},
    model::comm_bytes,
};

/// The eBPF object built by build.rs, embedded so the binary is self-contained.
static EBPF_OBJECT: &[u8] =
    aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/portexhaust-ebpf"));

/// Which backend the user asked for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BackendRequest {
    Auto,
    Only(Backend),
}

impl BackendRequest {
    /// Backends to try, best first: fentry (cheapest, BTF trampolines), kprobe (the design's
    /// kprobe/kretprobe pair), tracepoint (stable ABI, works everywhere).
    pub fn candidates(self) -> Vec<Backend> {
        match self {
            Self::Auto => vec![Backend::Fentry, Backend::Kprobe, Backend::Tracepoint],
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
        f
    }
}

// ---------------------------------------------------------------------------------------------
// Preflight.

const CAP_SYS_ADMIN: u32 = 21;
const CAP_PERFMON: u32 = 38;
const CAP_BPF: u32 = 39;

fn effective_caps() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("CapEff:"))
                .and_then(|v| u64::from_str_radix(v.trim(), 16).ok())
        })
        .unwrap_or(0)
}

/// Root, or CAP_BPF + CAP_PERFMON (5.8+), or CAP_SYS_ADMIN (older kernels).
pub fn check_privileges() -> Result<()> {
    let caps = effective_caps();
    let has = |c: u32| caps & (1u64 << c) != 0;
    if has(CAP_SYS_ADMIN) || (has(CAP_BPF) && has(CAP_PERFMON)) {
        return Ok(());
    }
    // SAFETY: geteuid has no preconditions.
    let uid = unsafe { libc::geteuid() };
    let mut have: Vec<&str> = Vec::new();
    if has(CAP_BPF) {
        have.push("CAP_BPF");
    }
    if has(CAP_PERFMON) {
        have.push("CAP_PERFMON");
    }
    Err(Error::NotPrivileged {
        have: if have.is_empty() {
            format!("uid {uid} and none of them")
        } else {
            format!("uid {uid} and only {}", have.join(", "))
        },
    })
}

const TRACEFS: &str = "/sys/kernel/tracing";
const DEBUGFS_TRACING: &str = "/sys/kernel/debug/tracing";

/// Make sure tracefs is reachable, mounting it when it is not (as root we can).
pub fn ensure_tracefs() -> Result<()> {
    if Path::new(TRACEFS).join("events").is_dir()
        || Path::new(DEBUGFS_TRACING).join("events").is_dir()
    {
        return Ok(());
    }
    let target = c"/sys/kernel/tracing";
    let fstype = c"tracefs";
    // SAFETY: valid NUL-terminated strings; no data argument.
    let rc = unsafe {
        libc::mount(
            c"none".as_ptr(),
            target.as_ptr(),
            fstype.as_ptr(),
            0,
            std::ptr::null(),
        )
    };
    if rc != 0 {
        return Err(Error::NoTracefs {
            detail: format!(
                "{TRACEFS}/events is missing and mounting it failed: {}",
                std::io::Error::last_os_error()
            ),
        });
    }
    info!("mounted tracefs at {TRACEFS}");
    Ok(())
}

/// Raise RLIMIT_MEMLOCK: before 5.11 BPF maps are charged against it and the default (64 KiB
/// on older distributions) cannot hold the ring buffer.
fn raise_memlock() {
    let r = libc::rlimit {
        rlim_cur: libc::RLIM_INFINITY,
        rlim_max: libc::RLIM_INFINITY,
    };
    // SAFETY: valid pointer to an rlimit.
    if unsafe { libc::setrlimit(libc::RLIMIT_MEMLOCK, &r) } != 0 {
        debug!(
            "could not raise RLIMIT_MEMLOCK: {}",
            std::io::Error::last_os_error()
        );
    }
}

// ---------------------------------------------------------------------------------------------
// Program sets.

/// Syscall tracepoints every backend uses: datagram/bind failures, socket types, and (for the
/// tracepoint backend) TCP connect itself. (program, category, event)
const COMMON_TRACEPOINTS: &[(&str, &str, &str)] = &[
    ("tp_sys_enter_socket", "syscalls", "sys_enter_socket"),
    ("tp_sys_exit_socket", "syscalls", "sys_exit_socket"),
    ("tp_sys_enter_connect", "syscalls", "sys_enter_connect"),
    ("tp_sys_exit_connect", "syscalls", "sys_exit_connect"),
    ("tp_sys_enter_bind", "syscalls", "sys_enter_bind"),
    ("tp_sys_exit_bind", "syscalls", "sys_exit_bind"),
    ("tp_inet_sock_set_state", "sock", "inet_sock_set_state"),
];

/// kprobe backend: (program, kernel function).
const KPROBES: &[(&str, &str)] = &[
    ("kprobe_tcp_v4_connect", "tcp_v4_connect"),
    ("kprobe_tcp_v6_connect", "tcp_v6_connect"),
    ("kretprobe_tcp_v4_connect", "tcp_v4_connect"),
    ("kretprobe_tcp_v6_connect", "tcp_v6_connect"),
    ("kretprobe_inet_hash_connect", "__inet_hash_connect"),
];

/// fentry backend: (program, kernel function, is fexit).
const FENTRIES: &[(&str, &str, bool)] = &[
    ("fentry_tcp_v4_connect", "tcp_v4_connect", false),
    ("fentry_tcp_v6_connect", "tcp_v6_connect", false),
    ("fexit_tcp_v4_connect", "tcp_v4_connect", true),
    ("fexit_tcp_v6_connect", "tcp_v6_connect", true),
    ("fexit_inet_hash_connect", "inet_hash_connect", true),
    ("fexit_inet6_hash_connect", "inet6_hash_connect", true),
];

/// A short description of what each backend hooks, for the start-up line.
pub fn backend_hooks(b: Backend) -> &'static str {
    match b {
        Backend::Fentry => {
            "fentry/fexit tcp_v4_connect, tcp_v6_connect; fexit inet_hash_connect, inet6_hash_connect; syscall tracepoints for bind/UDP"
        }
        Backend::Kprobe => {
            "kprobe/kretprobe tcp_v4_connect, tcp_v6_connect; kretprobe __inet_hash_connect; syscall tracepoints for bind/UDP"
        }
        Backend::Tracepoint => {
            "syscalls:sys_enter/exit_connect, sys_enter/exit_bind, sock:inet_sock_set_state"
        }
    }
}

/// Why a backend cannot run here, found without loading anything (cheap, and a clearer reason
/// than the kernel's errno).
fn static_unavailability(b: Backend) -> Option<String> {
    match b {
        Backend::Fentry => (!Path::new("/sys/kernel/btf/vmlinux").exists()).then(|| {
            "no kernel BTF (/sys/kernel/btf/vmlinux is missing; needs CONFIG_DEBUG_INFO_BTF)".into()
        }),
        Backend::Kprobe => (!Path::new("/sys/bus/event_source/devices/kprobe").exists()).then(
            || "no kprobe support (/sys/bus/event_source/devices/kprobe is missing; CONFIG_KPROBES is off)".into(),
        ),
        Backend::Tracepoint => None,
    }
}

fn program_error(name: &'static str, what: &str, e: &(dyn std::error::Error + 'static)) -> String {
    // The full text (with the verifier log) for RUST_LOG=debug; users get one line.
    debug!("{what} {name}: {e}");
    let msg = one_line(e);
    let hint = if msg.contains("Operation not permitted") || msg.contains("os error 1)") {
        " (the kernel refused it: EPERM)"
    } else {
        ""
    };
    format!("{what} {name}: {msg}{hint}")
}

fn attach_tracepoints(ebpf: &mut Ebpf, set: &[(&'static str, &str, &str)]) -> Result<(), String> {
    for &(prog, cat, event) in set {
        let p: &mut TracePoint = ebpf
            .program_mut(prog)
            .ok_or_else(|| format!("program {prog} missing from the object"))?
            .try_into()
            .map_err(|e: aya::programs::ProgramError| program_error(prog, "type of", &e))?;
        p.load().map_err(|e| program_error(prog, "loading", &e))?;
        p.attach(cat, event)
            .map_err(|e| program_error(prog, &format!("attaching {cat}:{event} with"), &e))?;
    }
    Ok(())
}

fn attach_kprobes(ebpf: &mut Ebpf) -> Result<(), String> {
    for &(prog, func) in KPROBES {
        let p: &mut KProbe = ebpf
            .program_mut(prog)
            .ok_or_else(|| format!("program {prog} missing from the object"))?
            .try_into()
            .map_err(|e: aya::programs::ProgramError| program_error(prog, "type of", &e))?;
        p.load().map_err(|e| program_error(prog, "loading", &e))?;
        p.attach(func, 0)
            .map_err(|e| program_error(prog, &format!("attaching to {func}"), &e))?;
    }
    Ok(())
}

fn attach_fentries(ebpf: &mut Ebpf) -> Result<(), String> {
    let btf = Btf::from_sys_fs().map_err(|e| format!("reading kernel BTF: {}", one_line(&e)))?;
    for &(prog, func, exit) in FENTRIES {
        let p = ebpf
            .program_mut(prog)
            .ok_or_else(|| format!("program {prog} missing from the object"))?;
        let res = if exit {
            let p: &mut FExit = p
                .try_into()
                .map_err(|e: aya::programs::ProgramError| program_error(prog, "type of", &e))?;
            p.load(func, &btf)
                .map_err(|e| program_error(prog, "loading", &e))?;
            p.attach().map(|_| ())
        } else {
            let p: &mut FEntry = p
                .try_into()
                .map_err(|e: aya::programs::ProgramError| program_error(prog, "type of", &e))?;
            p.load(func, &btf)
                .map_err(|e| program_error(prog, "loading", &e))?;
            p.attach().map(|_| ())
        };
        res.map_err(|e| program_error(prog, &format!("attaching to {func}"), &e))?;
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// The tracer.

/// Default size of each socket-ownership LRU map (entries).
pub const DEFAULT_MAX_TRACKED: u32 = 131072;

/// A loaded, attached program set and its maps. Dropping it detaches everything.
pub struct Tracer {
    ebpf: Ebpf,
    ring: RingBuf<MapData>,
    pub backend: Backend,
    /// Whether netns/start time are read in the kernel (BTF offsets were found).
    pub kernel_netns: bool,
    /// Tuple-map entries deleted by user space (expired TIME_WAIT), for the eviction count.
    user_tuple_deletes: u64,
}

/// connect() statistics of one destination, summed over CPUs.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DestTotals {
    pub connects: u64,
    pub failures: u64,
    pub hist: [u64; LATENCY_BUCKETS],
}

/// The outcome of backend selection: the tracer and why earlier candidates were skipped.
pub struct Opened {
    pub tracer: Tracer,
    pub skipped: Vec<(Backend, String)>,
}

/// Offsets for `current->nsproxy->net_ns->ns.inum` and the process start time, from the
/// running kernel's BTF. Without BTF the programs still run; netns then comes from /proc.
pub fn task_offsets() -> Option<TaskOffsets> {
    match crate::btf::Btf::from_sys_fs() {
        Ok(Ok(btf)) => match TaskOffsets::resolve(&btf) {
            Ok(o) => Some(o),
            Err(e) => {
                info!("kernel BTF lacks what netns attribution needs ({e}); using /proc");
                None
            }
        },
        Ok(Err(e)) => {
            info!("kernel BTF unreadable ({e}); network namespaces come from /proc");
            None
        }
        Err(e) => {
            info!("no kernel BTF ({e}); network namespaces come from /proc");
            None
        }
    }
}

/// How much the programs track besides failures.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Tracking {
    /// Size of each socket-ownership LRU map.
    pub max_tracked: u32,
    /// Ownership tracking and latency histograms (off: `trace --no-blame`).
    pub blame: bool,
}

impl Default for Tracking {
    fn default() -> Self {
        Self {
            max_tracked: DEFAULT_MAX_TRACKED,
            blame: true,
        }
    }
}

fn load_object(
    backend: Backend,
    filters: &Filters,
    offsets: Option<TaskOffsets>,
    tracking: Tracking,
) -> Result<Ebpf, String> {
    let backend_code = backend as u32;
    let blame = u32::from(tracking.blame);
    let max_tracked = tracking.max_tracked;
    let flags = filters.flags();
    let have = u32::from(offsets.is_some());
    let o = offsets.unwrap_or_default();
    let mut ebpf = EbpfLoader::new()
        .override_global(names::GLOBAL_BACKEND, &backend_code, true)
        .override_global(names::GLOBAL_FILTER_FLAGS, &flags, true)
        .override_global(names::GLOBAL_TRACK_BLAME, &blame, true)
        .override_global(names::GLOBAL_HAVE_TASK_OFFSETS, &have, true)
        .override_global(names::GLOBAL_OFF_TASK_NSPROXY, &o.task_nsproxy, true)
        .override_global(names::GLOBAL_OFF_NSPROXY_NET, &o.nsproxy_net_ns, true)
        .override_global(names::GLOBAL_OFF_NET_INUM, &o.net_ns_inum, true)
        .override_global(
            names::GLOBAL_OFF_TASK_GROUP_LEADER,
            &o.task_group_leader,
            true,
        )
        .override_global(names::GLOBAL_OFF_TASK_START_TIME, &o.task_start_time, true)
        // Without blame these maps are never written: do not preallocate them (hash maps
        // reserve every entry's memory up front).
        .map_max_entries(
            names::OWNER_BY_SK,
            if tracking.blame { max_tracked } else { 1 },
        )
        .map_max_entries(
            names::OWNER_BY_TUPLE,
            if tracking.blame { max_tracked } else { 1 },
        )
        .map_max_entries(names::DEST_STATS, if tracking.blame { 8192 } else { 1 })
        .load(EBPF_OBJECT)
        .map_err(|e| format!("loading the eBPF object: {}", one_line(&e)))?;
    fill_filters(&mut ebpf, filters).map_err(|e| one_line(&e))?;
    Ok(ebpf)
}

fn filter_map<'a, K: aya::Pod>(
    ebpf: &'a mut Ebpf,
    name: &'static str,
) -> Result<HashMap<&'a mut MapData, K, u8>> {
    let map = ebpf
        .map_mut(name)
        .ok_or(Error::MissingObject { kind: "map", name })?;
    HashMap::try_from(map).map_err(|source| Error::Map { map: name, source })
}

fn fill_filters(ebpf: &mut Ebpf, f: &Filters) -> Result<()> {
    {
        let mut m = filter_map::<u32>(ebpf, names::FILTER_PIDS)?;
        for &pid in &f.pids {
            m.insert(pid, 1, 0).map_err(|source| Error::Map {
                map: names::FILTER_PIDS,
                source,
            })?;
        }
    }
    {
        let mut m = filter_map::<[u8; 16]>(ebpf, names::FILTER_COMMS)?;
        for c in &f.comms {
            m.insert(comm_bytes(c), 1, 0).map_err(|source| Error::Map {
                map: names::FILTER_COMMS,
                source,
            })?;
        }
    }
    let mut m = filter_map::<u16>(ebpf, names::FILTER_DPORTS)?;
    for &p in &f.dports {
        m.insert(p, 1, 0).map_err(|source| Error::Map {
            map: names::FILTER_DPORTS,
            source,
        })?;
    }
    Ok(())
}

fn try_backend(
    backend: Backend,
    filters: &Filters,
    offsets: Option<TaskOffsets>,
    tracking: Tracking,
) -> Result<Ebpf, String> {
    if let Some(reason) = static_unavailability(backend) {
        return Err(reason);
    }
    let mut ebpf = load_object(backend, filters, offsets, tracking)?;
    match backend {
        Backend::Fentry => attach_fentries(&mut ebpf)?,
        Backend::Kprobe => attach_kprobes(&mut ebpf)?,
        Backend::Tracepoint => {}
    }
    attach_tracepoints(&mut ebpf, COMMON_TRACEPOINTS)?;
    Ok(ebpf)
}

impl Tracer {
    /// Check privileges and tracefs, then try the requested backends in order.
    pub fn open(req: BackendRequest, filters: &Filters) -> Result<Opened> {
        Self::open_with(req, filters, Tracking::default())
    }

    /// As `open`, choosing what is tracked besides failures.
    pub fn open_with(req: BackendRequest, filters: &Filters, tracking: Tracking) -> Result<Opened> {
        check_privileges()?;
        ensure_tracefs()?;
        raise_memlock();
        let offsets = task_offsets();
        let mut skipped = Vec::new();
        for backend in req.candidates() {
            match try_backend(backend, filters, offsets, tracking) {
                Ok(mut ebpf) => {
                    let map = ebpf.take_map(names::EVENTS).ok_or(Error::MissingObject {
                        kind: "map",
                        name: names::EVENTS,
                    })?;
                    let ring = RingBuf::try_from(map).map_err(|source| Error::Map {
                        map: names::EVENTS,
                        source,
                    })?;
                    return Ok(Opened {
                        tracer: Tracer {
                            ebpf,
                            ring,
                            backend,
                            kernel_netns: offsets.is_some(),
                            user_tuple_deletes: 0,
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

    /// Add a pid to the pid whitelist (needs `Filters::pid_whitelist` at open time).
    pub fn add_pid_filter(&mut self, pid: u32) -> Result<()> {
        let mut m = filter_map::<u32>(&mut self.ebpf, names::FILTER_PIDS)?;
        m.insert(pid, 1, 0).map_err(|source| Error::Map {
            map: names::FILTER_PIDS,
            source,
        })
    }

    /// The exact per-(pid, destination, errno) counts.
    pub fn counts(&self) -> Result<Vec<(CountKey, CountValue)>> {
        let map = self.ebpf.map(names::COUNTS).ok_or(Error::MissingObject {
            kind: "map",
            name: names::COUNTS,
        })?;
        let m: HashMap<&MapData, CountKey, CountValue> =
            HashMap::try_from(map).map_err(|source| Error::Map {
                map: names::COUNTS,
                source,
            })?;
        let mut out = Vec::new();
        for kv in m.iter() {
            match kv {
                Ok(kv) => out.push(kv),
                // An entry deleted while iterating: nothing to count.
                Err(e) => debug!("counts iteration: {e}"),
            }
        }
        Ok(out)
    }

    /// One global counter (`portexhaust_common::stat`), summed over CPUs.
    pub fn stat(&self, index: u32) -> Result<u64> {
        let map = self.ebpf.map(names::STATS).ok_or(Error::MissingObject {
            kind: "map",
            name: names::STATS,
        })?;
        let a: PerCpuArray<&MapData, u64> =
            PerCpuArray::try_from(map).map_err(|source| Error::Map {
                map: names::STATS,
                source,
            })?;
        let v = a.get(&index, 0).map_err(|source| Error::Map {
            map: names::STATS,
            source,
        })?;
        Ok(v.iter().sum())
    }

    fn map_ref(&self, name: &'static str) -> Result<&aya::maps::Map> {
        self.ebpf
            .map(name)
            .ok_or(Error::MissingObject { kind: "map", name })
    }

    /// Every remembered socket owner by (netns, 4-tuple): ESTABLISHED and TIME_WAIT sockets
    /// opened while tracing.
    pub fn owners(&self) -> Result<Vec<(TupleKey, Owner)>> {
        let name = names::OWNER_BY_TUPLE;
        let m: HashMap<&MapData, TupleKey, Owner> = HashMap::try_from(self.map_ref(name)?)
            .map_err(|source| Error::Map { map: name, source })?;
        Ok(m.iter().filter_map(|kv| kv.ok()).collect())
    }

    /// Keys of a map, counted without reading their values (one syscall per key).
    fn count_keys<K: aya::Pod>(&self, name: &'static str) -> Result<u64> {
        let m: HashMap<&MapData, K, Owner> = HashMap::try_from(self.map_ref(name)?)
            .map_err(|source| Error::Map { map: name, source })?;
        Ok(m.keys().filter(|k| k.is_ok()).count() as u64)
    }

    /// Sockets whose opener is remembered by 4-tuple (ESTABLISHED through TIME_WAIT).
    pub fn tracked_sockets(&self) -> Result<u64> {
        self.count_keys::<TupleKey>(names::OWNER_BY_TUPLE)
    }

    /// Forget owners whose TIME_WAIT is over (60 s, TCP_TIMEWAIT_LEN, fixed in the kernel).
    pub fn forget_owners(&mut self, keys: &[TupleKey]) -> Result<()> {
        let name = names::OWNER_BY_TUPLE;
        let map = self
            .ebpf
            .map_mut(name)
            .ok_or(Error::MissingObject { kind: "map", name })?;
        let mut m: HashMap<&mut MapData, TupleKey, Owner> =
            HashMap::try_from(map).map_err(|source| Error::Map { map: name, source })?;
        for k in keys {
            if m.remove(k).is_ok() {
                self.user_tuple_deletes += 1;
            }
        }
        Ok(())
    }

    /// Entries the LRU ownership maps dropped to make room (so attribution was lost):
    /// kernel insertions minus deletions minus what is still there.
    pub fn lru_evictions(&self) -> Result<u64> {
        let tuples = self.tracked_sockets()?;
        let live = self.count_keys::<u64>(names::OWNER_BY_SK)?;
        let ins = self.stat(stat::TUPLE_INSERTS)? + self.stat(stat::SK_INSERTS)?;
        let del = self.stat(stat::TUPLE_DELETES)?
            + self.stat(stat::SK_DELETES)?
            + self.user_tuple_deletes;
        Ok(ins.saturating_sub(del + tuples + live))
    }

    /// connect() counts and latency histograms per destination.
    pub fn dest_stats(&self) -> Result<Vec<(DestKey, DestTotals)>> {
        let name = names::DEST_STATS;
        let m: PerCpuHashMap<&MapData, DestKey, DestStats> =
            PerCpuHashMap::try_from(self.map_ref(name)?)
                .map_err(|source| Error::Map { map: name, source })?;
        let mut out = Vec::new();
        for kv in m.iter() {
            let Ok((k, per_cpu)) = kv else { continue };
            let mut t = DestTotals {
                connects: 0,
                failures: 0,
                hist: [0; LATENCY_BUCKETS],
            };
            for v in per_cpu.iter() {
                t.connects += v.connects;
                t.failures += v.failures;
                for (a, b) in t.hist.iter_mut().zip(v.hist.iter()) {
                    *a += b;
                }
            }
            out.push((k, t));
        }
        Ok(out)
    }

    pub fn failures_total(&self) -> Result<u64> {
        self.stat(stat::FAILURES)
    }
    pub fn dropped_events(&self) -> Result<u64> {
        self.stat(stat::RINGBUF_DROPS)
    }
    pub fn uncounted_keys(&self) -> Result<u64> {
        self.stat(stat::COUNT_MAP_FULL)
    }
}
