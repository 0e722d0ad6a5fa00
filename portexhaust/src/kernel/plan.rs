//! Which program sets a backend attaches and which hook watches each failure kind, decided
//! before the object is loaded (map sizes and the programs' globals depend on it). Pure: unit
//! tested without a kernel.
use portexhaust_common::{
    Backend, KIND_BIND, KIND_CONNECT, KIND_CONNECT_EARLY, KIND_NAT, KIND_UDP, kind_name,
    programs::Set,
};

/// How one failure kind is watched.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Watch {
    /// By the backend's own connect hooks (TCP connect kinds).
    Backend,
    /// By function hooks, trying these sets in order (fexit, then kprobe).
    Functions(Vec<Set>),
    /// By syscall tracepoints, because it was asked for and nothing cheaper exists here.
    Syscalls,
    /// Not watched, and why.
    No(String),
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Plan {
    pub backend: Backend,
    /// `inet_sock_set_state` forms to try, in order: a state backend has exactly its own; the
    /// fentry and kprobe backends take the cheapest the kernel accepts.
    pub state: Vec<Set>,
    /// The fentry/kprobe backends' TCP connect hooks.
    pub connect: Option<Set>,
    pub early: Watch,
    pub bind: Watch,
    pub udp: Watch,
    /// Source-NAT drops (`skb:kfree_skb` or `__nf_conntrack_confirm`): only on request,
    /// whatever the backend (the hooks do not depend on it); chosen by [`Plan::choose_nat`].
    pub nat: Watch,
}

/// What the planner needs to know about the kernel (see `preflight::Caps`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Offer {
    pub fentry: Result<(), String>,
    pub kprobe: Result<(), String>,
}

impl Plan {
    /// `catch`: kinds (`KIND_*` bits) the user asked to watch even if that takes syscall
    /// tracepoints.
    pub fn new(backend: Backend, offer: &Offer, catch: u32) -> Self {
        let state = match backend {
            Backend::TpBtf => vec![Set::StateBtf],
            Backend::RawTp => vec![Set::StateRaw],
            Backend::Tracepoint => vec![Set::StatePerf],
            Backend::Fentry | Backend::Kprobe => {
                vec![Set::StateBtf, Set::StateRaw, Set::StatePerf]
            }
        };
        let connect = match backend {
            Backend::Fentry => Some(Set::ConnectFentry),
            Backend::Kprobe => Some(Set::ConnectKprobe),
            _ => None,
        };
        let functions = |fexit: Set, kprobe: Set, kind: u32| {
            let mut sets = Vec::new();
            if offer.fentry.is_ok() {
                sets.push(fexit);
            }
            if offer.kprobe.is_ok() {
                sets.push(kprobe);
            }
            if !sets.is_empty() {
                Watch::Functions(sets)
            } else if catch & kind != 0 {
                Watch::Syscalls
            } else {
                Watch::No(not_watched(kind))
            }
        };
        let early = if connect.is_some() {
            Watch::Backend
        } else if catch & KIND_CONNECT_EARLY != 0 {
            Watch::Syscalls
        } else {
            Watch::No(format!(
                "the {} backend sees connect() only from port selection on; \
                 --catch connect-early adds syscall tracepoints (or use --backend fentry/kprobe)",
                backend.name()
            ))
        };
        Self {
            backend,
            state,
            connect,
            early,
            bind: functions(Set::BindFexit, Set::BindKprobe, KIND_BIND),
            udp: functions(Set::UdpFexit, Set::UdpKprobe, KIND_UDP),
            // The kfree_skb form until `choose_nat` has the kernel's facts.
            nat: if catch & KIND_NAT != 0 {
                Watch::Functions(vec![Set::NatBtf])
            } else {
                Watch::No(
                    "off by default: its hook (tp_btf kfree_skb, or kprobes on \
                     __nf_conntrack_confirm) runs on every dropped packet or new connection; \
                     --catch nat turns it on"
                        .to_string(),
                )
            },
        }
    }

    /// Pick the NAT hook from what the kernel offers (when `--catch nat` asked for one).
    pub fn choose_nat(&mut self, facts: &NatFacts) {
        if !matches!(self.nat, Watch::Functions(_)) {
            return;
        }
        self.nat = match nat_hooks(facts) {
            Ok(sets) => Watch::Functions(sets),
            Err(why) => Watch::No(why),
        };
    }

    /// Whether the NAT program is to be attached.
    pub fn watches_nat(&self) -> bool {
        matches!(self.nat, Watch::Functions(_))
    }

    /// Kinds the syscall tracepoints report (the `SYSCALL_KINDS` global).
    pub fn syscall_kinds(&self) -> u32 {
        let mut k = 0;
        if self.early == Watch::Syscalls {
            k |= KIND_CONNECT_EARLY;
        }
        if self.bind == Watch::Syscalls {
            k |= KIND_BIND;
        }
        if self.udp == Watch::Syscalls {
            k |= KIND_UDP;
        }
        k
    }

    /// The syscall tracepoint sets to attach.
    pub fn syscall_sets(&self) -> Vec<Set> {
        let k = self.syscall_kinds();
        let mut v = Vec::new();
        if k & (KIND_CONNECT_EARLY | KIND_UDP) != 0 {
            v.push(Set::SyscallConnect);
        }
        if k & KIND_BIND != 0 {
            v.push(Set::SyscallBind);
        }
        // socket() types tell UDP from TCP for bind() and early connect() errors.
        if k & (KIND_BIND | KIND_CONNECT_EARLY) != 0 {
            v.push(Set::SyscallSocket);
        }
        v
    }

    /// Every set this plan may try to attach.
    pub fn all_sets(&self) -> Vec<Set> {
        let mut v = self.state.clone();
        v.extend(self.connect);
        for (_, w) in self.kinds() {
            if let Watch::Functions(sets) = w {
                v.extend(sets.iter().copied());
            }
        }
        v.extend(self.syscall_sets());
        v
    }

    /// Whether any function hook keeps per-thread state between entry and return.
    pub fn uses_kfunc_inflight(&self) -> bool {
        self.connect.is_some()
            || matches!(self.bind, Watch::Functions(_))
            || matches!(self.udp, Watch::Functions(_))
    }

    /// The planned watch of each kind, `KIND_CONNECT` first.
    pub fn kinds(&self) -> [(u32, &Watch); 4] {
        [
            (KIND_CONNECT_EARLY, &self.early),
            (KIND_BIND, &self.bind),
            (KIND_UDP, &self.udp),
            (KIND_NAT, &self.nat),
        ]
    }
}

/// Which NAT hook to force (`PORTEXHAUST_NAT_HOOK`), for tests where both exist.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum NatHook {
    /// tp_btf `kfree_skb` with `SKB_DROP_REASON_NETFILTER_DROP`.
    KfreeSkb,
    /// kprobe + kretprobe `__nf_conntrack_confirm` returning NF_DROP.
    Confirm,
}

/// The variable that forces a NAT hook.
pub const NAT_HOOK_ENV: &str = "PORTEXHAUST_NAT_HOOK";

impl NatHook {
    /// `PORTEXHAUST_NAT_HOOK`'s value: `kfree_skb` or `confirm`.
    pub fn parse(s: &str) -> Result<Self, String> {
        match s.trim() {
            "kfree_skb" => Ok(Self::KfreeSkb),
            "confirm" => Ok(Self::Confirm),
            other => Err(format!(
                "{NAT_HOOK_ENV}={other:?} is neither kfree_skb nor confirm"
            )),
        }
    }
}

/// What the NAT hook choice needs to know about the kernel.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NatFacts {
    /// The `sk_buff` / `nf_conn` offsets from BTF (both hooks read them).
    pub conntrack: Result<(), String>,
    /// tp_btf `kfree_skb` carries the drop reason and `SKB_DROP_REASON_NETFILTER_DROP` exists
    /// (5.17+).
    pub kfree_skb: Result<(), String>,
    /// kprobes work.
    pub kprobe: Result<(), String>,
    /// `nf_conntrack` is loaded (a kprobe on a module function needs the module).
    pub nf_conntrack_loaded: bool,
    /// `PORTEXHAUST_NAT_HOOK`, when set (a bad value is the error to show).
    pub force: Option<Result<NatHook, String>>,
}

/// The NAT sets to try, in order, or why NAT cannot be watched. kfree_skb first where it
/// works: it runs only on dropped packets (one compare for those that are not netfilter's),
/// while the kprobe pair runs on every new connection's confirm; the pair is the fallback
/// should the tp_btf attach fail.
pub fn nat_hooks(f: &NatFacts) -> Result<Vec<Set>, String> {
    f.conntrack.clone()?;
    let confirm = match (&f.kprobe, f.nf_conntrack_loaded) {
        (Err(why), _) => Err(format!("no kprobes for __nf_conntrack_confirm ({why})")),
        (Ok(()), false) => Err(
            "nf_conntrack is not loaded, so there is no __nf_conntrack_confirm to probe \
             (no connection is tracked, so no NAT drops either)"
                .to_string(),
        ),
        (Ok(()), true) => Ok(()),
    };
    match &f.force {
        Some(Err(why)) => Err(why.clone()),
        Some(Ok(NatHook::KfreeSkb)) => f
            .kfree_skb
            .clone()
            .map(|()| vec![Set::NatBtf])
            .map_err(|why| format!("{NAT_HOOK_ENV}=kfree_skb: {why}")),
        Some(Ok(NatHook::Confirm)) => confirm
            .map(|()| vec![Set::NatKprobe])
            .map_err(|why| format!("{NAT_HOOK_ENV}=confirm: {why}")),
        None => match (&f.kfree_skb, confirm) {
            (Ok(()), Ok(())) => Ok(vec![Set::NatBtf, Set::NatKprobe]),
            (Ok(()), Err(_)) => Ok(vec![Set::NatBtf]),
            (Err(_), Ok(())) => Ok(vec![Set::NatKprobe]),
            (Err(a), Err(b)) => Err(format!("{a}; and {b}")),
        },
    }
}

fn not_watched(kind: u32) -> String {
    format!(
        "no fexit or kprobe on this kernel; --catch {} adds syscall tracepoints, which slow \
         every syscall on the machine",
        kind_name(kind)
    )
}

/// TCP connect exhaustion is always watched: every backend's reason to exist.
pub const ALWAYS: u32 = KIND_CONNECT;

#[cfg(test)]
mod tests {
    use super::*;

    fn offer(fentry: bool, kprobe: bool) -> Offer {
        let r = |ok: bool| if ok { Ok(()) } else { Err("no".to_string()) };
        Offer {
            fentry: r(fentry),
            kprobe: r(kprobe),
        }
    }

    #[test]
    fn nothing_on_the_syscall_path_by_default() {
        for backend in Backend::ALL {
            for (f, k) in [(false, false), (true, false), (false, true), (true, true)] {
                let p = Plan::new(backend, &offer(f, k), 0);
                assert!(p.syscall_sets().is_empty(), "{backend:?} {f} {k}");
                assert_eq!(p.syscall_kinds(), 0);
            }
        }
    }

    #[test]
    fn bind_and_udp_take_the_cheapest_hook() {
        let p = Plan::new(Backend::TpBtf, &offer(true, true), 0);
        assert_eq!(
            p.bind,
            Watch::Functions(vec![Set::BindFexit, Set::BindKprobe])
        );
        assert_eq!(p.udp, Watch::Functions(vec![Set::UdpFexit, Set::UdpKprobe]));
        let p = Plan::new(Backend::TpBtf, &offer(false, true), 0);
        assert_eq!(p.bind, Watch::Functions(vec![Set::BindKprobe]));
        // The development machines: neither; only on request, through syscall tracepoints.
        let p = Plan::new(Backend::TpBtf, &offer(false, false), 0);
        assert!(matches!(&p.bind, Watch::No(why) if why.contains("--catch bind")));
        assert!(matches!(p.udp, Watch::No(_)));
        assert!(matches!(p.early, Watch::No(_)));
        let p = Plan::new(
            Backend::TpBtf,
            &offer(false, false),
            KIND_BIND | KIND_UDP | KIND_CONNECT_EARLY,
        );
        assert_eq!(p.syscall_kinds(), KIND_BIND | KIND_UDP | KIND_CONNECT_EARLY);
        assert_eq!(
            p.syscall_sets(),
            vec![Set::SyscallConnect, Set::SyscallBind, Set::SyscallSocket]
        );
        let p = Plan::new(Backend::TpBtf, &offer(false, false), KIND_UDP);
        assert_eq!(p.syscall_sets(), vec![Set::SyscallConnect]);
    }

    #[test]
    fn nat_only_on_request_and_never_on_the_syscall_path() {
        for backend in Backend::ALL {
            let p = Plan::new(backend, &offer(false, false), 0);
            assert!(matches!(&p.nat, Watch::No(why) if why.contains("--catch nat")));
            let mut p = Plan::new(backend, &offer(false, false), KIND_NAT);
            assert_eq!(p.nat, Watch::Functions(vec![Set::NatBtf]));
            assert!(p.all_sets().contains(&Set::NatBtf));
            assert!(p.syscall_sets().is_empty());
            p.choose_nat(&facts(false, false, true));
            assert!(matches!(&p.nat, Watch::No(why) if why.contains("no drop reason")));
            assert!(!p.watches_nat());
        }
    }

    fn facts(kfree: bool, kprobe: bool, loaded: bool) -> NatFacts {
        let r = |ok: bool, why: &str| if ok { Ok(()) } else { Err(why.to_string()) };
        NatFacts {
            conntrack: Ok(()),
            kfree_skb: r(kfree, "no drop reason"),
            kprobe: r(kprobe, "CONFIG_KPROBES is off"),
            nf_conntrack_loaded: loaded,
            force: None,
        }
    }

    #[test]
    fn nat_takes_kfree_skb_where_it_can_and_the_confirm_pair_elsewhere() {
        // 6.1+ with kprobes: kfree_skb, the pair as the fallback.
        assert_eq!(
            nat_hooks(&facts(true, true, true)),
            Ok(vec![Set::NatBtf, Set::NatKprobe])
        );
        // The development machines (6.18): kfree_skb only.
        assert_eq!(nat_hooks(&facts(true, false, true)), Ok(vec![Set::NatBtf]));
        assert_eq!(nat_hooks(&facts(true, true, false)), Ok(vec![Set::NatBtf]));
        // 5.10: no reason argument; kprobes and nf_conntrack loaded.
        assert_eq!(
            nat_hooks(&facts(false, true, true)),
            Ok(vec![Set::NatKprobe])
        );
        // Nothing: one line with both reasons.
        let why = nat_hooks(&facts(false, true, false)).unwrap_err();
        assert!(why.contains("no drop reason") && why.contains("nf_conntrack is not loaded"));
        let why = nat_hooks(&facts(false, false, true)).unwrap_err();
        assert!(why.contains("CONFIG_KPROBES"), "{why}");
        assert!(!why.contains('\n'));
        // No conntrack offsets: neither hook can read the entry.
        let mut f = facts(true, true, true);
        f.conntrack = Err("no struct nf_conn in BTF".into());
        assert_eq!(nat_hooks(&f), Err("no struct nf_conn in BTF".into()));
    }

    #[test]
    fn the_nat_hook_can_be_forced() {
        let mut f = facts(true, true, true);
        f.force = Some(NatHook::parse("confirm"));
        assert_eq!(nat_hooks(&f), Ok(vec![Set::NatKprobe]));
        f.force = Some(NatHook::parse("kfree_skb"));
        assert_eq!(nat_hooks(&f), Ok(vec![Set::NatBtf]));
        let mut f = facts(false, true, true);
        f.force = Some(NatHook::parse("kfree_skb"));
        let why = nat_hooks(&f).unwrap_err();
        assert!(
            why.starts_with("PORTEXHAUST_NAT_HOOK=kfree_skb: no drop reason"),
            "{why}"
        );
        let mut f = facts(true, false, true);
        f.force = Some(NatHook::parse("confirm"));
        assert!(nat_hooks(&f).is_err());
        f.force = Some(NatHook::parse("fexit"));
        assert!(
            nat_hooks(&f)
                .unwrap_err()
                .contains("neither kfree_skb nor confirm")
        );
        // Without --catch nat nothing is chosen.
        let mut p = Plan::new(Backend::TpBtf, &offer(false, true), 0);
        p.choose_nat(&facts(true, true, true));
        assert!(!p.watches_nat());
        let mut p = Plan::new(Backend::TpBtf, &offer(false, true), KIND_NAT);
        p.choose_nat(&facts(false, true, true));
        assert_eq!(p.nat, Watch::Functions(vec![Set::NatKprobe]));
    }

    #[test]
    fn function_backends_watch_early_connects_themselves() {
        let p = Plan::new(Backend::Kprobe, &offer(false, true), KIND_CONNECT_EARLY);
        assert_eq!(p.early, Watch::Backend);
        assert_eq!(p.connect, Some(Set::ConnectKprobe));
        assert_eq!(p.state, vec![Set::StateBtf, Set::StateRaw, Set::StatePerf]);
        assert!(p.syscall_sets().is_empty());
        assert!(p.uses_kfunc_inflight());
        let p = Plan::new(Backend::TpBtf, &offer(false, false), 0);
        assert_eq!(p.state, vec![Set::StateBtf]);
        assert!(!p.uses_kfunc_inflight());
    }
}
