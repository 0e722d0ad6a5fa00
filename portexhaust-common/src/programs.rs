//! The program table: every program in the eBPF object, where it attaches and which set it
//! belongs to. The loader attaches whole sets and looks programs up only through this table,
//! so a renamed program or a changed hook is one edit here (and a failing unit test in the
//! loader, which checks every entry against the object).

/// Where a program attaches.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Hook {
    /// A perf tracepoint (`category:name`): stable record layout, every kernel.
    TracePoint {
        category: &'static str,
        name: &'static str,
    },
    /// A BTF-typed raw tracepoint (tp_btf, 5.5+): arguments typed by the kernel's BTF, direct
    /// loads from them; no record is built before the program runs.
    BtfTracePoint(&'static str),
    /// A plain raw tracepoint (4.17+): the raw arguments, no record built.
    RawTracePoint(&'static str),
    /// fentry / fexit on a kernel function (BTF trampolines, 5.5+).
    FEntry(&'static str),
    FExit(&'static str),
    /// kprobe / kretprobe on a kernel function (CONFIG_KPROBES).
    KProbe(&'static str),
    KRetProbe(&'static str),
}

impl Hook {
    /// `kind:target`, for messages and for matching the kernel's list of attached links.
    pub const fn kind(&self) -> &'static str {
        match self {
            Self::TracePoint { .. } => "tracepoint",
            Self::BtfTracePoint(_) => "tp_btf",
            Self::RawTracePoint(_) => "raw_tp",
            Self::FEntry(_) => "fentry",
            Self::FExit(_) => "fexit",
            Self::KProbe(_) => "kprobe",
            Self::KRetProbe(_) => "kretprobe",
        }
    }

    pub const fn target(&self) -> &'static str {
        match self {
            Self::TracePoint { name, .. } => name,
            Self::BtfTracePoint(t)
            | Self::RawTracePoint(t)
            | Self::FEntry(t)
            | Self::FExit(t)
            | Self::KProbe(t)
            | Self::KRetProbe(t) => t,
        }
    }

    /// Hooks on the syscall path: every syscall of every task on the machine takes the slow
    /// path while one of them is attached (the syscall-tracepoint work flag).
    pub fn on_syscall_path(&self) -> bool {
        matches!(self, Self::TracePoint { category, .. } if *category == "syscalls")
    }
}

/// A set of programs attached together.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Set {
    /// `inet_sock_set_state`, one of three forms: the failure detector of the state backends
    /// and, on every backend, ownership and connect latency.
    StateBtf,
    StateRaw,
    StatePerf,
    /// TCP connect() through function hooks (the fentry and kprobe backends).
    ConnectFentry,
    ConnectKprobe,
    /// bind(0) EADDRINUSE and UDP autobind EAGAIN through function hooks.
    BindFexit,
    UdpFexit,
    BindKprobe,
    UdpKprobe,
    /// Syscall tracepoints, attached only on request (`--catch`) where no function hook exists.
    SyscallConnect,
    SyscallBind,
    SyscallSocket,
    /// `skb:kfree_skb` as tp_btf, keeping source-NAT clash drops (`--catch nat` only: it runs
    /// on every packet the machine drops).
    NatBtf,
    /// kprobe + kretprobe on `__nf_conntrack_confirm` (nf_conntrack, often a module), keeping
    /// the source-NATed entries it refuses with NF_DROP: where kprobes exist and `kfree_skb` has
    /// no drop reason (before 5.17), or when asked (`PORTEXHAUST_NAT_HOOK=confirm`).
    NatKprobe,
}

pub struct Program {
    pub name: &'static str,
    pub hook: Hook,
    pub set: Set,
}

const fn p(name: &'static str, hook: Hook, set: Set) -> Program {
    Program { name, hook, set }
}

const fn tp(category: &'static str, name: &'static str) -> Hook {
    Hook::TracePoint { category, name }
}

use Hook::{BtfTracePoint, FEntry, FExit, KProbe, KRetProbe, RawTracePoint};

pub const PROGRAMS: &[Program] = &[
    p(
        "tp_btf_inet_sock_set_state",
        BtfTracePoint("inet_sock_set_state"),
        Set::StateBtf,
    ),
    p(
        "raw_tp_inet_sock_set_state",
        RawTracePoint("inet_sock_set_state"),
        Set::StateRaw,
    ),
    p(
        "tp_inet_sock_set_state",
        tp("sock", "inet_sock_set_state"),
        Set::StatePerf,
    ),
    p(
        "fentry_tcp_v4_connect",
        FEntry("tcp_v4_connect"),
        Set::ConnectFentry,
    ),
    p(
        "fentry_tcp_v6_connect",
        FEntry("tcp_v6_connect"),
        Set::ConnectFentry,
    ),
    p(
        "fexit_tcp_v4_connect",
        FExit("tcp_v4_connect"),
        Set::ConnectFentry,
    ),
    p(
        "fexit_tcp_v6_connect",
        FExit("tcp_v6_connect"),
        Set::ConnectFentry,
    ),
    p(
        "fexit_inet_hash_connect",
        FExit("inet_hash_connect"),
        Set::ConnectFentry,
    ),
    p(
        "fexit_inet6_hash_connect",
        FExit("inet6_hash_connect"),
        Set::ConnectFentry,
    ),
    p(
        "kprobe_tcp_v4_connect",
        KProbe("tcp_v4_connect"),
        Set::ConnectKprobe,
    ),
    p(
        "kprobe_tcp_v6_connect",
        KProbe("tcp_v6_connect"),
        Set::ConnectKprobe,
    ),
    p(
        "kretprobe_tcp_v4_connect",
        KRetProbe("tcp_v4_connect"),
        Set::ConnectKprobe,
    ),
    p(
        "kretprobe_tcp_v6_connect",
        KRetProbe("tcp_v6_connect"),
        Set::ConnectKprobe,
    ),
    p(
        "kprobe_inet_hash_connect",
        KProbe("__inet_hash_connect"),
        Set::ConnectKprobe,
    ),
    p(
        "kretprobe_inet_hash_connect",
        KRetProbe("__inet_hash_connect"),
        Set::ConnectKprobe,
    ),
    p("fexit_inet_bind", FExit("inet_bind"), Set::BindFexit),
    p("fexit_inet6_bind", FExit("inet6_bind"), Set::BindFexit),
    p(
        "fexit_inet_dgram_connect",
        FExit("inet_dgram_connect"),
        Set::UdpFexit,
    ),
    p("kprobe_inet_bind", KProbe("inet_bind"), Set::BindKprobe),
    p(
        "kretprobe_inet_bind",
        KRetProbe("inet_bind"),
        Set::BindKprobe,
    ),
    p("kprobe_inet6_bind", KProbe("inet6_bind"), Set::BindKprobe),
    p(
        "kretprobe_inet6_bind",
        KRetProbe("inet6_bind"),
        Set::BindKprobe,
    ),
    p(
        "kprobe_inet_dgram_connect",
        KProbe("inet_dgram_connect"),
        Set::UdpKprobe,
    ),
    p(
        "kretprobe_inet_dgram_connect",
        KRetProbe("inet_dgram_connect"),
        Set::UdpKprobe,
    ),
    p(
        "tp_sys_enter_connect",
        tp("syscalls", "sys_enter_connect"),
        Set::SyscallConnect,
    ),
    p(
        "tp_sys_exit_connect",
        tp("syscalls", "sys_exit_connect"),
        Set::SyscallConnect,
    ),
    p(
        "tp_sys_enter_bind",
        tp("syscalls", "sys_enter_bind"),
        Set::SyscallBind,
    ),
    p(
        "tp_sys_exit_bind",
        tp("syscalls", "sys_exit_bind"),
        Set::SyscallBind,
    ),
    p(
        "tp_sys_enter_socket",
        tp("syscalls", "sys_enter_socket"),
        Set::SyscallSocket,
    ),
    p(
        "tp_sys_exit_socket",
        tp("syscalls", "sys_exit_socket"),
        Set::SyscallSocket,
    ),
    p("tp_btf_kfree_skb", BtfTracePoint("kfree_skb"), Set::NatBtf),
    p(
        "kprobe_nf_conntrack_confirm",
        KProbe("__nf_conntrack_confirm"),
        Set::NatKprobe,
    ),
    p(
        "kretprobe_nf_conntrack_confirm",
        KRetProbe("__nf_conntrack_confirm"),
        Set::NatKprobe,
    ),
];

/// The programs of one set, in table order.
pub fn of(set: Set) -> impl Iterator<Item = &'static Program> {
    PROGRAMS.iter().filter(move |p| p.set == set)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_unique_and_every_set_has_programs() {
        for (i, a) in PROGRAMS.iter().enumerate() {
            for b in &PROGRAMS[i + 1..] {
                assert_ne!(a.name, b.name);
            }
            // kunai's naming: <hook kind>_<target> (raw_tp/tp_btf/kprobe... of the function).
            let target = a.hook.target().trim_start_matches('_');
            assert!(a.name.ends_with(target), "{}", a.name);
        }
        for set in [
            Set::StateBtf,
            Set::StateRaw,
            Set::StatePerf,
            Set::ConnectFentry,
            Set::ConnectKprobe,
            Set::BindFexit,
            Set::UdpFexit,
            Set::BindKprobe,
            Set::UdpKprobe,
            Set::SyscallConnect,
            Set::SyscallBind,
            Set::SyscallSocket,
            Set::NatBtf,
            Set::NatKprobe,
        ] {
            assert!(of(set).next().is_some(), "{set:?}");
            let syscall = matches!(
                set,
                Set::SyscallConnect | Set::SyscallBind | Set::SyscallSocket
            );
            assert!(of(set).all(|p| p.hook.on_syscall_path() == syscall));
        }
    }
}
