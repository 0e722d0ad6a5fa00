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
    /// Source-NAT drops (`skb:kfree_skb`): only on request, whatever the backend (the hook
    /// does not depend on it).
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
            nat: if catch & KIND_NAT != 0 {
                Watch::Functions(vec![Set::NatBtf])
            } else {
                Watch::No(
                    "off by default: its hook (tp_btf kfree_skb) runs on every packet the \
                     machine drops; --catch nat turns it on"
                        .to_string(),
                )
            },
        }
    }

    /// The kernel cannot run the NAT program (no drop reason, no conntrack in its BTF): say
    /// why instead of attaching it.
    pub fn refuse_nat(&mut self, why: String) {
        if matches!(self.nat, Watch::Functions(_)) {
            self.nat = Watch::No(why);
        }
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
            p.refuse_nat("no reason argument".into());
            assert!(!p.watches_nat());
        }
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
