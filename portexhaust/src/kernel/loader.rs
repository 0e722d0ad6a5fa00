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
    Backend, ConnMemo, CountKey, CountValue, DestKey, DestStats, FILTER_COMM, FILTER_DPORT,
    FILTER_PID, KIND_CONNECT, LATENCY_BUCKETS, Offsets, Owner, ProcInfo, ProcKey, TupleKey,
    kind_name, names,
    programs::{self, Hook, Program, Set},
    stat,
};

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
}

impl Default for Tracking {
    fn default() -> Self {
        Self {
            max_tracked: DEFAULT_MAX_TRACKED,
            max_count_keys: DEFAULT_MAX_COUNT_KEYS,
            blame: true,
            catch: 0,
            events_per_s: 0,
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

/// The kernel's BTF and the offsets resolved from it, read once per start.
struct KernelBtf {
    /// The kernel BTF as our own reader has it (offsets; the ids attach points need).
    ours: Option<super::btf::Btf>,
    /// What aya's tp_btf and fentry loads need of the kernel BTF: the ids of their attach
    /// targets. A skeleton with just those (see `btf::Btf::id_skeleton`), made when first
    /// needed: a full parse by aya costs ~20 ms and ~15 MB of start-up.
    aya: Option<Option<Btf>>,
    resolved: Option<Resolved>,
    /// An `EbpfLoader`, made on another thread too: `EbpfLoader::new()` parses the kernel BTF
    /// itself (aya 0.14 offers no constructor that does not).
    loader: Option<std::thread::JoinHandle<EbpfLoader<'static>>>,
}

impl KernelBtf {
    fn read(caps: &Caps) -> Self {
        let loader = Some(std::thread::spawn(EbpfLoader::new));
        if let Err(why) = &caps.btf {
            info!("{why}: network namespaces come from /proc");
            return Self {
                ours: None,
                aya: Some(None),
                resolved: None,
                loader,
            };
        }
        let t = std::time::Instant::now();
        let ours = match super::btf::Btf::from_sys_fs() {
            Ok(Ok(btf)) => Some(btf),
            Ok(Err(e)) => {
                info!("kernel BTF unreadable ({e})");
                None
            }
            Err(e) => {
                info!("no kernel BTF ({e})");
                None
            }
        };
        let resolved = ours.as_ref().map(|btf| {
            let (r, errors) = Resolved::resolve(btf);
            for e in errors {
                info!("kernel BTF lacks a field portexhaust reads: {e}");
            }
            r
        });
        debug!("start-up: offsets from BTF took {:?}", t.elapsed());
        Self {
            ours,
            aya: None,
            resolved,
            loader,
        }
    }

    /// The ids of the tp_btf and fentry/fexit targets `plan` may attach, in a BTF aya can read
    /// (only those: the skeleton reaches up to the highest id, and parsing it costs ~0.1 us an
    /// id).
    fn aya(&mut self, plan: &Plan) -> Option<&Btf> {
        if self.aya.is_none() {
            let t = std::time::Instant::now();
            let sets = plan.all_sets();
            let targets: Vec<(u32, String)> = programs::PROGRAMS
                .iter()
                .filter(|p| sets.contains(&p.set))
                .filter_map(|p| match p.hook {
                    Hook::BtfTracePoint(t) => {
                        Some((super::btf::KIND_TYPEDEF, format!("btf_trace_{t}")))
                    }
                    Hook::FEntry(f) | Hook::FExit(f) => {
                        Some((super::btf::KIND_FUNC, f.to_string()))
                    }
                    _ => None,
                })
                .collect();
            let wanted: Vec<(u32, &str)> = targets.iter().map(|(k, n)| (*k, n.as_str())).collect();
            let parsed = self
                .ours
                .as_ref()
                .and_then(|b| b.id_skeleton(&wanted))
                .and_then(|blob| {
                    Btf::parse(&blob, aya::Endianness::default())
                        .map_err(|e| info!("attach ids for aya: {}", one_line(&e)))
                        .ok()
                });
            self.aya = Some(parsed);
            debug!("start-up: attach ids for aya in {:?}", t.elapsed());
        }
        self.aya.as_ref().and_then(Option::as_ref)
    }

    /// The loader made ahead of time for the first attempt, a new one for the others.
    fn loader(&mut self) -> EbpfLoader<'static> {
        self.loader
            .take()
            .and_then(|h| h.join().ok())
            .unwrap_or_default()
    }

    fn sock_offsets(&self) -> bool {
        self.resolved.is_some_and(|r| r.sock)
    }
}

/// Why a backend cannot run here, found without loading anything.
fn static_unavailability(b: Backend, caps: &Caps, btf: &KernelBtf) -> Option<String> {
    let no_sock = || {
        "the kernel's BTF does not give the struct sock offsets this hook reads \
         (run with RUST_LOG=info to see which)"
            .to_string()
    };
    match b {
        Backend::TpBtf => match &caps.btf {
            Err(why) => Some(why.clone()),
            Ok(()) if !btf.sock_offsets() => Some(no_sock()),
            Ok(()) => None,
        },
        Backend::RawTp => (!btf.sock_offsets()).then(no_sock),
        Backend::Fentry => caps.fentry.clone().err(),
        Backend::Kprobe => caps.kprobe.clone().err(),
        Backend::Tracepoint => None,
    }
}

/// A one-line reason from a program error, keeping the kernel's errno readable.
fn program_error(p: &Program, what: &str, e: &ProgramError) -> String {
    // The full text (with the verifier log) for RUST_LOG=debug; users get one line.
    debug!("{what} {}: {e:?}", p.name);
    let eperm = match e {
        ProgramError::LoadError { io_error, .. } => io_error.raw_os_error() == Some(libc::EPERM),
        ProgramError::SyscallError(s) => s.io_error.raw_os_error() == Some(libc::EPERM),
        _ => false,
    };
    let hint = if eperm {
        " (the kernel refused it: EPERM)"
    } else {
        ""
    };
    format!("{what} {}: {}{hint}", p.name, one_line(e))
}

fn load_and_attach(
    ebpf: &mut Ebpf,
    p: &'static Program,
    btf: Option<&Btf>,
) -> std::result::Result<(), String> {
    let prog = ebpf
        .program_mut(p.name)
        .ok_or_else(|| format!("program {} missing from the object", p.name))?;
    let need_btf = || btf.ok_or_else(|| format!("{} needs kernel BTF", p.name));
    let type_err = |e: ProgramError| program_error(p, "type of", &e);
    let load_err = |e: ProgramError| program_error(p, "loading", &e);
    let attach_err = |e: ProgramError| {
        program_error(
            p,
            &format!("attaching {}:{} with", p.hook.kind(), p.hook.target()),
            &e,
        )
    };
    match p.hook {
        Hook::TracePoint { category, name } => {
            let t: &mut TracePoint = prog.try_into().map_err(type_err)?;
            t.load().map_err(load_err)?;
            t.attach(category, name).map(drop).map_err(attach_err)
        }
        Hook::BtfTracePoint(name) => {
            let t: &mut BtfTracePoint = prog.try_into().map_err(type_err)?;
            t.load(name, need_btf()?).map_err(load_err)?;
            t.attach().map(drop).map_err(attach_err)
        }
        Hook::RawTracePoint(name) => {
            let t: &mut RawTracePoint = prog.try_into().map_err(type_err)?;
            t.load().map_err(load_err)?;
            t.attach(name).map(drop).map_err(attach_err)
        }
        Hook::FEntry(f) => {
            let t: &mut FEntry = prog.try_into().map_err(type_err)?;
            t.load(f, need_btf()?).map_err(load_err)?;
            t.attach().map(drop).map_err(attach_err)
        }
        Hook::FExit(f) => {
            let t: &mut FExit = prog.try_into().map_err(type_err)?;
            t.load(f, need_btf()?).map_err(load_err)?;
            t.attach().map(drop).map_err(attach_err)
        }
        Hook::KProbe(f) | Hook::KRetProbe(f) => {
            let t: &mut KProbe = prog.try_into().map_err(type_err)?;
            t.load().map_err(load_err)?;
            t.attach(f, 0).map(drop).map_err(attach_err)
        }
    }
}

/// Unload (and so detach) a program that was loaded, after a set failed halfway.
fn unload(ebpf: &mut Ebpf, p: &Program) {
    let Some(prog) = ebpf.program_mut(p.name) else {
        return;
    };
    let r = match prog {
        AyaProgram::TracePoint(t) => t.unload(),
        AyaProgram::BtfTracePoint(t) => t.unload(),
        AyaProgram::RawTracePoint(t) => t.unload(),
        AyaProgram::FEntry(t) => t.unload(),
        AyaProgram::FExit(t) => t.unload(),
        AyaProgram::KProbe(t) => t.unload(),
        _ => Ok(()),
    };
    if let Err(e) = r {
        debug!("unloading {}: {e}", p.name);
    }
}

/// Attach a whole set, or none of it.
fn attach_set(
    ebpf: &mut Ebpf,
    set: Set,
    btf: Option<&Btf>,
    attached: &mut Vec<&'static Program>,
) -> std::result::Result<(), String> {
    let needs_tracefs = programs::of(set).any(|p| matches!(p.hook, Hook::TracePoint { .. }));
    if needs_tracefs {
        preflight::ensure_tracefs().map_err(|e| e.to_string())?;
    }
    let mut done: Vec<&'static Program> = Vec::new();
    for p in programs::of(set) {
        if let Err(e) = load_and_attach(ebpf, p, btf) {
            for q in &done {
                unload(ebpf, q);
            }
            unload(ebpf, p);
            return Err(e);
        }
        done.push(p);
    }
    attached.extend(done);
    Ok(())
}

/// The hook descriptions of a set, for the startup line: "tp_btf inet_sock_set_state".
pub fn set_hooks(set: Set) -> String {
    let mut parts: Vec<String> = Vec::new();
    for p in programs::of(set) {
        let s = format!("{} {}", p.hook.kind(), p.hook.target());
        if !parts.contains(&s) {
            parts.push(s);
        }
    }
    parts.join(", ")
}

fn load_object(
    plan: &Plan,
    filters: &Filters,
    tracking: Tracking,
    btf: &mut KernelBtf,
) -> Result<Ebpf, String> {
    let backend_code = plan.backend as u32;
    let flags = filters.flags();
    let blame = u32::from(tracking.blame);
    let syscall_kinds = plan.syscall_kinds();
    let cpus = aya::util::online_cpus().map_or(1, |c| c.len() as u32);
    let events_per_cpu = per_cpu_budget(tracking.events_per_s, cpus);

    let resolved = btf.resolved.unwrap_or_default();
    let have_task = u32::from(resolved.task);
    let have_sock = u32::from(resolved.sock);
    let values = resolved.offsets.values();
    let log_level = klog::ebpf_level();
    let mut loader = btf.loader();
    // No kernel BTF for the object: it carries no CO-RE relocations (Rust eBPF emits none);
    // the offsets it needs come in as globals.
    loader
        .btf(None)
        .override_global(names::GLOBAL_BACKEND, &backend_code, true)
        .override_global(names::GLOBAL_FILTER_FLAGS, &flags, true)
        .override_global(names::GLOBAL_TRACK_BLAME, &blame, true)
        .override_global(names::GLOBAL_SYSCALL_KINDS, &syscall_kinds, true)
        .override_global(names::GLOBAL_EVENTS_PER_CPU, &events_per_cpu, true)
        .override_global(names::GLOBAL_HAVE_TASK_OFFSETS, &have_task, true)
        .override_global(names::GLOBAL_HAVE_SOCK_OFFSETS, &have_sock, true)
        // Not required: an object that logs nothing has no such global.
        .override_global(klog::LEVEL_GLOBAL, &log_level, false);
    for (name, v) in Offsets::GLOBALS.iter().zip(values.iter()) {
        loader.override_global(name, v, true);
    }
    // Hash maps reserve every entry's memory up front: a map whose programs are not attached
    // gets one entry, so nothing is preallocated that is not used.
    let sized = |on: bool, n: u32| if on { n } else { 1 };
    let syscalls = syscall_kinds != 0;
    let socket_types = plan.syscall_sets().contains(&Set::SyscallSocket);
    loader
        .map_max_entries(names::COUNTS, tracking.max_count_keys.max(1))
        .map_max_entries(names::OWNERS, sized(tracking.blame, tracking.max_tracked))
        .map_max_entries(names::PENDING, sized(tracking.blame, 4096))
        .map_max_entries(names::PROCS, sized(tracking.blame, 8192))
        .map_max_entries(names::DEST_STATS, sized(tracking.blame, 4096))
        .map_max_entries(
            names::KFUNC_INFLIGHT,
            sized(plan.uses_kfunc_inflight(), 4096),
        )
        .map_max_entries(names::SYSCALL_INFLIGHT, sized(syscalls, 4096))
        .map_max_entries(names::SOCKET_ARGS, sized(socket_types, 4096))
        .map_max_entries(names::SOCK_TYPES, sized(socket_types, 65536))
        .map_max_entries(names::FILTER_PIDS, sized(flags & FILTER_PID != 0, 1024))
        .map_max_entries(names::FILTER_COMMS, sized(flags & FILTER_COMM != 0, 1024))
        .map_max_entries(names::FILTER_DPORTS, sized(flags & FILTER_DPORT != 0, 1024));
    let mut ebpf = loader
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
    fn put<K: aya::Pod>(
        ebpf: &mut Ebpf,
        name: &'static str,
        keys: impl Iterator<Item = K>,
    ) -> Result<()> {
        let mut m = filter_map::<K>(ebpf, name)?;
        for k in keys {
            m.insert(k, 1, 0)
                .map_err(|source| Error::Map { map: name, source })?;
        }
        Ok(())
    }
    put(ebpf, names::FILTER_PIDS, f.pids.iter().copied())?;
    put(
        ebpf,
        names::FILTER_COMMS,
        f.comms.iter().map(|c| comm_bytes(c)),
    )?;
    put(ebpf, names::FILTER_DPORTS, f.dports.iter().copied())
}

/// Attach what the plan says; the backend's own sets must attach, the extra kinds' hooks are
/// tried in order and end up described in the coverage.
fn attach_plan(
    ebpf: &mut Ebpf,
    plan: &Plan,
    btf: Option<&Btf>,
) -> std::result::Result<(Vec<&'static Program>, Vec<Coverage>), String> {
    let mut attached = Vec::new();
    let mut state_errors = Vec::new();
    let mut state = None;
    for &set in &plan.state {
        match attach_set(ebpf, set, btf, &mut attached) {
            Ok(()) => {
                state = Some(set);
                break;
            }
            Err(e) => state_errors.push(e),
        }
    }
    let Some(state) = state else {
        return Err(state_errors.join("; "));
    };
    let connect_hooks = match plan.connect {
        Some(set) => {
            attach_set(ebpf, set, btf, &mut attached)?;
            format!("{}, with {}", set_hooks(set), set_hooks(state))
        }
        None => set_hooks(state),
    };
    let mut coverage = vec![Coverage {
        kind: KIND_CONNECT,
        watch: Ok(connect_hooks.clone()),
    }];
    for set in plan.syscall_sets() {
        attach_set(ebpf, set, btf, &mut attached)?;
    }
    for (kind, watch) in plan.kinds() {
        let w = match watch {
            Watch::Backend => Ok(connect_hooks.clone()),
            Watch::Syscalls => Ok(format!(
                "syscall tracepoints ({}), as asked",
                plan.syscall_sets()
                    .into_iter()
                    .map(set_hooks)
                    .collect::<Vec<_>>()
                    .join(", ")
            )),
            Watch::No(why) => Err(why.clone()),
            Watch::Functions(sets) => {
                let mut errors = Vec::new();
                let mut ok = None;
                for &set in sets {
                    match attach_set(ebpf, set, btf, &mut attached) {
                        Ok(()) => {
                            ok = Some(set_hooks(set));
                            break;
                        }
                        Err(e) => errors.push(e),
                    }
                }
                ok.ok_or_else(|| errors.join("; "))
            }
        };
        coverage.push(Coverage { kind, watch: w });
    }
    Ok((attached, coverage))
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
                    let plan = Plan::new(backend, &offer, tracking.catch);
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

    /// Add a pid to the pid whitelist (needs `Filters::pid_whitelist` at open time).
    pub fn add_pid_filter(&mut self, pid: u32) -> Result<()> {
        let mut m = filter_map::<u32>(&mut self.ebpf, names::FILTER_PIDS)?;
        m.insert(pid, 1, 0).map_err(|source| Error::Map {
            map: names::FILTER_PIDS,
            source,
        })
    }

    fn map_ref(&self, name: &'static str) -> Result<&aya::maps::Map> {
        self.ebpf
            .map(name)
            .ok_or(Error::MissingObject { kind: "map", name })
    }

    fn hash<K: aya::Pod, V: aya::Pod>(&self, name: &'static str) -> Result<Vec<(K, V)>> {
        let m: HashMap<&MapData, K, V> = HashMap::try_from(self.map_ref(name)?)
            .map_err(|source| Error::Map { map: name, source })?;
        let mut out = Vec::new();
        for kv in m.iter() {
            match kv {
                Ok(kv) => out.push(kv),
                // An entry deleted while iterating: nothing to read.
                Err(e) => debug!("{name} iteration: {e}"),
            }
        }
        Ok(out)
    }

    /// The exact per-(pid, destination, errno, cause) counts.
    pub fn counts(&self) -> Result<Vec<(CountKey, CountValue)>> {
        self.hash(names::COUNTS)
    }

    /// One global counter (`portexhaust_common::stat`), summed over CPUs.
    pub fn stat(&self, index: u32) -> Result<u64> {
        let map = self.map_ref(names::STATS)?;
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

    /// Every remembered socket owner by (netns, 4-tuple): sockets closed actively while tracing,
    /// through their TIME_WAIT.
    pub fn owners(&self) -> Result<Vec<(TupleKey, Owner)>> {
        self.hash(names::OWNERS)
    }

    /// Command and cgroup of every connecting process seen.
    pub fn procs(&self) -> Result<std::collections::HashMap<ProcKey, ProcInfo>> {
        Ok(self.hash(names::PROCS)?.into_iter().collect())
    }

    /// Keys of a map, counted without reading their values (one syscall per key).
    fn count_keys<K: aya::Pod, V: aya::Pod>(&self, name: &'static str) -> Result<u64> {
        let m: HashMap<&MapData, K, V> = HashMap::try_from(self.map_ref(name)?)
            .map_err(|source| Error::Map { map: name, source })?;
        Ok(m.keys().filter(|k| k.is_ok()).count() as u64)
    }

    /// Sockets whose active closer is remembered by 4-tuple (closing and TIME_WAIT).
    pub fn tracked_sockets(&self) -> Result<u64> {
        self.count_keys::<TupleKey, Owner>(names::OWNERS)
    }

    /// Forget owners whose TIME_WAIT is over (60 s, TCP_TIMEWAIT_LEN, fixed in the kernel).
    pub fn forget_owners(&mut self, keys: &[TupleKey]) -> Result<()> {
        let name = names::OWNERS;
        let map = self
            .ebpf
            .map_mut(name)
            .ok_or(Error::MissingObject { kind: "map", name })?;
        let mut m: HashMap<&mut MapData, TupleKey, Owner> =
            HashMap::try_from(map).map_err(|source| Error::Map { map: name, source })?;
        for k in keys {
            if m.remove(k).is_ok() {
                self.user_owner_deletes += 1;
            }
        }
        Ok(())
    }

    /// Entries the LRU ownership maps dropped to make room (so attribution was lost):
    /// kernel insertions minus deletions minus what is still there.
    pub fn lru_evictions(&self) -> Result<u64> {
        let owners = self.tracked_sockets()?;
        let pending = self.count_keys::<u64, u64>(names::PENDING)?;
        let ins = self.stat(stat::OWNER_INSERTS)? + self.stat(stat::PENDING_INSERTS)?;
        let del = self.stat(stat::OWNER_DELETES)?
            + self.stat(stat::PENDING_DELETES)?
            + self.user_owner_deletes;
        Ok(ins.saturating_sub(del + owners + pending))
    }

    /// connect() counts and latency histograms per destination: the map, plus each CPU's run
    /// of connects not yet added to it (`ConnMemo`).
    pub fn dest_stats(&self) -> Result<Vec<(DestKey, DestTotals)>> {
        let mut out: Vec<(DestKey, DestTotals)> = self
            .hash::<DestKey, DestStats>(names::DEST_STATS)?
            .into_iter()
            .map(|(k, v)| {
                (
                    k,
                    DestTotals {
                        connects: v.connects,
                        hist: v.hist,
                    },
                )
            })
            .collect();
        let name = names::CONN_MEMO;
        let memo: PerCpuArray<&MapData, ConnMemo> = PerCpuArray::try_from(self.map_ref(name)?)
            .map_err(|source| Error::Map { map: name, source })?;
        let per_cpu = memo
            .get(&0, 0)
            .map_err(|source| Error::Map { map: name, source })?;
        for m in per_cpu.iter().filter(|m| m.pending > 0) {
            match out.iter_mut().find(|(k, _)| *k == m.key) {
                Some((_, t)) => t.connects += m.pending,
                None => out.push((
                    m.key,
                    DestTotals {
                        connects: m.pending,
                        hist: [0; LATENCY_BUCKETS],
                    },
                )),
            }
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
    /// Failures over the events-per-second budget (counted, tallied, not streamed).
    pub fn suppressed(&self) -> Result<u64> {
        self.stat(stat::SUPPRESSED)
    }
    /// Kernel reads through BTF offsets that failed (offsets that do not fit this kernel).
    pub fn read_errors(&self) -> Result<u64> {
        self.stat(stat::READ_ERRORS)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every entry of the program table exists in the object with a matching program type, and
    /// every program in the object is in the table: the two cannot disagree.
    #[test]
    fn program_table_matches_the_object() {
        let obj = aya_obj::Object::parse(EBPF_OBJECT).expect("the embedded object parses");
        for p in programs::PROGRAMS {
            let prog = obj
                .programs
                .get(p.name)
                .unwrap_or_else(|| panic!("{} is not in the object", p.name));
            use aya_obj::ProgramSection as S;
            let ok = matches!(
                (&p.hook, &prog.section),
                (Hook::TracePoint { .. }, S::TracePoint)
                    | (Hook::BtfTracePoint(_), S::BtfTracePoint)
                    | (Hook::RawTracePoint(_), S::RawTracePoint)
                    | (Hook::FEntry(_), S::FEntry { .. })
                    | (Hook::FExit(_), S::FExit { .. })
                    | (Hook::KProbe(_), S::KProbe)
                    | (Hook::KRetProbe(_), S::KRetProbe)
            );
            assert!(
                ok,
                "{}: table says {:?}, object has {:?}",
                p.name, p.hook, prog.section
            );
        }
        for name in obj.programs.keys() {
            assert!(
                programs::PROGRAMS.iter().any(|p| p.name == name.as_str()),
                "{name} is in the object but not in the program table"
            );
        }
    }

    #[test]
    fn budgets_split_between_cpus() {
        assert_eq!(per_cpu_budget(0, 8), 0);
        assert_eq!(per_cpu_budget(1000, 2), 500);
        assert_eq!(per_cpu_budget(1000, 3), 334);
        assert_eq!(per_cpu_budget(1, 64), 1);
        assert_eq!(per_cpu_budget(5, 0), 5);
    }

    #[test]
    fn auto_tries_every_backend_once() {
        let mut v = AUTO_ORDER.to_vec();
        v.sort();
        v.dedup();
        assert_eq!(v.len(), Backend::ALL.len());
    }
}
