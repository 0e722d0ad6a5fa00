//! Finding what the kernel runs, loading the object with the globals and map sizes of one
//! backend, attaching its programs (with a fallback per hook) and filling the filter maps.
use super::*;
use crate::kernel::cgroups::MAX_CGROUP_IDS;

/// The kernel's BTF and the offsets resolved from it, read once per start.
pub(super) struct KernelBtf {
    /// The kernel BTF as our own reader has it (offsets; the ids attach points need).
    pub(super) ours: Option<crate::kernel::btf::Btf>,
    /// What aya's tp_btf and fentry loads need of the kernel BTF: the ids of their attach
    /// targets. A skeleton with just those (see `btf::Btf::id_skeleton`), made when first
    /// needed: a full parse by aya costs ~20 ms and ~15 MB of start-up.
    pub(super) aya: Option<Option<Btf>>,
    pub(super) resolved: Option<Resolved>,
    /// An `EbpfLoader`, made on another thread too: `EbpfLoader::new()` parses the kernel BTF
    /// itself (aya 0.14 offers no constructor that does not).
    pub(super) loader: Option<std::thread::JoinHandle<EbpfLoader<'static>>>,
    /// What the source-NAT programs read, resolved when a plan first asks for it.
    pub(super) nat: Option<std::result::Result<portexhaust_common::NatOffsets, String>>,
    /// `SKB_DROP_REASON_NETFILTER_DROP` (the kfree_skb form only), likewise.
    pub(super) nat_reason: Option<std::result::Result<u32, String>>,
}

impl KernelBtf {
    pub(super) fn read(caps: &Caps) -> Self {
        let loader = Some(std::thread::spawn(EbpfLoader::new));
        if let Err(why) = &caps.btf {
            info!("{why}: network namespaces come from /proc");
            return Self {
                ours: None,
                aya: Some(None),
                resolved: None,
                loader,
                nat: None,
                nat_reason: None,
            };
        }
        let t = std::time::Instant::now();
        let ours = match crate::kernel::btf::Btf::from_sys_fs() {
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
            nat: None,
            nat_reason: None,
        }
    }

    /// The source-NAT program's offsets, or why this kernel cannot run it.
    pub(super) fn nat(&mut self) -> std::result::Result<portexhaust_common::NatOffsets, String> {
        if self.nat.is_none() {
            self.nat = Some(match &self.ours {
                Some(btf) => crate::kernel::btf::nat::resolve(btf),
                None => Err("no kernel BTF to read the dropped packets with".to_string()),
            });
        }
        self.nat
            .clone()
            .unwrap_or_else(|| Err("unresolved".to_string()))
    }

    /// The drop reason the kfree_skb form filters on, or why it cannot.
    pub(super) fn nat_reason(&mut self) -> std::result::Result<u32, String> {
        if self.nat_reason.is_none() {
            self.nat_reason = Some(match &self.ours {
                Some(btf) => crate::kernel::btf::nat::kfree_skb_reason(btf),
                None => Err("no kernel BTF".to_string()),
            });
        }
        self.nat_reason
            .clone()
            .unwrap_or_else(|| Err("unresolved".to_string()))
    }

    /// The ids of the tp_btf and fentry/fexit targets `plan` may attach, in a BTF aya can read
    /// (only those: the skeleton reaches up to the highest id, and parsing it costs ~0.1 us an
    /// id).
    pub(super) fn aya(&mut self, plan: &Plan) -> Option<&Btf> {
        if self.aya.is_none() {
            let t = std::time::Instant::now();
            let sets = plan.all_sets();
            let targets: Vec<(u32, String)> = programs::PROGRAMS
                .iter()
                .filter(|p| sets.contains(&p.set))
                .filter_map(|p| match p.hook {
                    Hook::BtfTracePoint(t) => {
                        Some((crate::kernel::btf::KIND_TYPEDEF, format!("btf_trace_{t}")))
                    }
                    Hook::FEntry(f) | Hook::FExit(f) => {
                        Some((crate::kernel::btf::KIND_FUNC, f.to_string()))
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
    pub(super) fn loader(&mut self) -> EbpfLoader<'static> {
        self.loader
            .take()
            .and_then(|h| h.join().ok())
            .unwrap_or_default()
    }

    pub(super) fn sock_offsets(&self) -> bool {
        self.resolved.is_some_and(|r| r.sock)
    }
}

/// Why a backend cannot run here, found without loading anything.
pub(super) fn static_unavailability(b: Backend, caps: &Caps, btf: &KernelBtf) -> Option<String> {
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
pub(super) fn program_error(p: &Program, what: &str, e: &ProgramError) -> String {
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

pub(super) fn load_and_attach(
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
pub(super) fn unload(ebpf: &mut Ebpf, p: &Program) {
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
pub(super) fn attach_set(
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

pub(super) fn load_object(
    plan: &Plan,
    filters: &Filters,
    tracking: Tracking,
    btf: &mut KernelBtf,
) -> Result<Ebpf, String> {
    let backend_code = plan.backend as u32;
    let flags = filters.flags();
    let cgroup_levels = filters.cgroups.levels();
    let blame = u32::from(tracking.blame);
    let call_sites = tracking.blame && tracking.call_sites;
    let call_sites_code = u32::from(call_sites);
    let syscall_kinds = plan.syscall_kinds();
    let cpus = aya::util::online_cpus().map_or(1, |c| c.len() as u32);
    let events_per_cpu = per_cpu_budget(tracking.events_per_s, cpus);

    let resolved = btf.resolved.unwrap_or_default();
    let have_task = u32::from(resolved.task);
    let have_sock = u32::from(resolved.sock);
    let values = resolved.offsets.values();
    let log_level = klog::ebpf_level();
    // The NAT program's offsets (its plan entry was refused earlier if they are missing).
    let nat = if plan.watches_nat() {
        // Without the reason (before 5.17) only the confirm pair runs: the kfree_skb
        // program keeps its default, which matches no drop.
        let reason = btf.nat_reason().unwrap_or(u32::MAX);
        btf.nat().ok().map(|o| portexhaust_common::NatOffsets {
            reason_netfilter_drop: reason,
            ..o
        })
    } else {
        None
    };
    let nat_values = nat.unwrap_or_default().values();
    let mut loader = btf.loader();
    // No kernel BTF for the object: it carries no CO-RE relocations (Rust eBPF emits none);
    // the offsets it needs come in as globals.
    loader
        .btf(None)
        .override_global(names::GLOBAL_BACKEND, &backend_code, true)
        .override_global(names::GLOBAL_FILTER_FLAGS, &flags, true)
        .override_global(names::GLOBAL_CGROUP_LEVELS, &cgroup_levels, true)
        .override_global(names::GLOBAL_TRACK_BLAME, &blame, true)
        .override_global(names::GLOBAL_SYSCALL_KINDS, &syscall_kinds, true)
        .override_global(names::GLOBAL_CALL_SITES, &call_sites_code, true)
        .override_global(names::GLOBAL_EVENTS_PER_CPU, &events_per_cpu, true)
        .override_global(names::GLOBAL_HAVE_TASK_OFFSETS, &have_task, true)
        .override_global(names::GLOBAL_HAVE_SOCK_OFFSETS, &have_sock, true)
        // Not required: an object that logs nothing has no such global.
        .override_global(klog::LEVEL_GLOBAL, &log_level, false);
    for (name, v) in Offsets::GLOBALS.iter().zip(values.iter()) {
        loader.override_global(name, v, true);
    }
    if nat.is_some() {
        for (name, v) in portexhaust_common::NatOffsets::GLOBALS
            .iter()
            .zip(nat_values.iter())
        {
            loader.override_global(name, v, true);
        }
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
        // A stack map preallocates a bucket of 127 frames per entry: 2 MiB at 2048.
        .map_max_entries(names::STACKS, sized(call_sites, 2048))
        .map_max_entries(names::SITES, sized(call_sites, 8192))
        .map_max_entries(names::SOCK_SITES, sized(call_sites, 16384))
        .map_max_entries(
            names::KFUNC_INFLIGHT,
            sized(plan.uses_kfunc_inflight(), 4096),
        )
        .map_max_entries(names::SYSCALL_INFLIGHT, sized(syscalls, 4096))
        .map_max_entries(names::SOCKET_ARGS, sized(socket_types, 4096))
        .map_max_entries(names::SOCK_TYPES, sized(socket_types, 65536))
        .map_max_entries(names::FILTER_PIDS, sized(flags & FILTER_PID != 0, 1024))
        .map_max_entries(names::FILTER_COMMS, sized(flags & FILTER_COMM != 0, 1024))
        .map_max_entries(names::FILTER_DPORTS, sized(flags & FILTER_DPORT != 0, 1024))
        // Without the ancestor helper the map lists every cgroup of the subtrees.
        .map_max_entries(
            names::FILTER_CGROUPS,
            sized(flags & FILTER_CGROUP != 0, MAX_CGROUP_IDS),
        )
        .map_max_entries(names::NAT_COUNTS, sized(nat.is_some(), 4096));
    let mut ebpf = loader
        .load(EBPF_OBJECT)
        .map_err(|e| format!("loading the eBPF object: {}", one_line(&e)))?;
    fill_filters(&mut ebpf, filters).map_err(|e| one_line(&e))?;
    Ok(ebpf)
}

pub(super) fn filter_map<'a, K: aya::Pod>(
    ebpf: &'a mut Ebpf,
    name: &'static str,
) -> Result<HashMap<&'a mut MapData, K, u8>> {
    let map = ebpf
        .map_mut(name)
        .ok_or(Error::MissingObject { kind: "map", name })?;
    HashMap::try_from(map).map_err(|source| Error::Map { map: name, source })
}

pub(super) fn fill_filters(ebpf: &mut Ebpf, f: &Filters) -> Result<()> {
    pub(super) fn put<K: aya::Pod>(
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
    put(ebpf, names::FILTER_DPORTS, f.dports.iter().copied())?;
    // check::args has made sure the ids fit (a full map fails the insert here anyway).
    let ids = f.cgroups.ids();
    put(ebpf, names::FILTER_CGROUPS, ids.into_iter())
}

/// Attach what the plan says; the backend's own sets must attach, the extra kinds' hooks are
/// tried in order and end up described in the coverage.
pub(super) fn attach_plan(
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
