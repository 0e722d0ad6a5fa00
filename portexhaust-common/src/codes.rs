//! Codes the programs write into events and count keys.

/// The kernel site a failure is attributed to.
#[repr(u8)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Site {
    /// `__inet_hash_connect()` found no usable local port (range exhausted, or the 4-tuple of a
    /// pre-bound port is taken).
    InetHashConnect = 1,
    /// `tcp_v4_connect()` failed with EADDRNOTAVAIL before/outside port selection.
    TcpV4Connect = 2,
    /// `tcp_v6_connect()` failed with EADDRNOTAVAIL before/outside port selection (for
    /// example no usable IPv6 source address).
    TcpV6Connect = 3,
    /// `bind()` to port 0 found no free port (`inet_csk_get_port` / `udp_lib_get_port`).
    Bind = 4,
    /// `connect()` on an unbound datagram socket could not autobind (`inet_autobind`).
    UdpAutobind = 5,
    /// A source-NAT (masquerade/SNAT) found no free source port one hop away: the connection's
    /// conntrack entry could not be confirmed (`__nf_conntrack_confirm`) and its packet was
    /// dropped. connect() itself does not fail: the SYN is lost.
    NfNat = 6,
}

impl Site {
    pub const ALL: [Site; 6] = [
        Self::InetHashConnect,
        Self::TcpV4Connect,
        Self::TcpV6Connect,
        Self::Bind,
        Self::UdpAutobind,
        Self::NfNat,
    ];

    pub const fn from_u8(v: u8) -> Option<Self> {
        match v {
            1 => Some(Self::InetHashConnect),
            2 => Some(Self::TcpV4Connect),
            3 => Some(Self::TcpV6Connect),
            4 => Some(Self::Bind),
            5 => Some(Self::UdpAutobind),
            6 => Some(Self::NfNat),
            _ => None,
        }
    }

    pub const fn name(self) -> &'static str {
        match self {
            Self::InetHashConnect => "__inet_hash_connect",
            Self::TcpV4Connect => "tcp_v4_connect",
            Self::TcpV6Connect => "tcp_v6_connect",
            Self::Bind => "bind",
            Self::UdpAutobind => "udp_autobind",
            Self::NfNat => "nf_nat",
        }
    }

    pub fn from_name(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|x| x.name() == s)
    }

    /// The failure kind a site belongs to.
    pub const fn kind(self) -> u32 {
        match self {
            Self::InetHashConnect => KIND_CONNECT,
            Self::TcpV4Connect | Self::TcpV6Connect => KIND_CONNECT_EARLY,
            Self::Bind => KIND_BIND,
            Self::UdpAutobind => KIND_UDP,
            Self::NfNat => KIND_NAT,
        }
    }
}

/// Why a failure happened, as far as the kernel showed it.
#[repr(u8)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Cause {
    /// The hook could not tell (no BTF offsets to read the socket with).
    Unknown = 0,
    /// Port selection found no free port for this destination: the socket had no local port
    /// (`inet_num` was 0) when `__inet_hash_connect()` ran.
    Exhausted = 1,
    /// The socket was already bound to a local port (bind() before connect(), SO_REUSEADDR /
    /// SO_REUSEPORT source ports) and that 4-tuple is taken.
    TupleCollision = 2,
    /// EADDRNOTAVAIL before port selection (no usable source address).
    NoSourceAddress = 3,
    /// bind() to port 0 found no free port in the whole range.
    BindExhausted = 4,
    /// A datagram socket could not be given a port automatically.
    AutobindExhausted = 5,
    /// A source NAT on the path had no free source port towards this destination: the NAT'd
    /// tuple clashed with a connection it already tracks, and the packet was dropped.
    SnatExhausted = 6,
}

impl Cause {
    pub const ALL: [Cause; 7] = [
        Self::Unknown,
        Self::Exhausted,
        Self::TupleCollision,
        Self::NoSourceAddress,
        Self::BindExhausted,
        Self::AutobindExhausted,
        Self::SnatExhausted,
    ];

    pub const fn from_u8(v: u8) -> Option<Self> {
        match v {
            0 => Some(Self::Unknown),
            1 => Some(Self::Exhausted),
            2 => Some(Self::TupleCollision),
            3 => Some(Self::NoSourceAddress),
            4 => Some(Self::BindExhausted),
            5 => Some(Self::AutobindExhausted),
            6 => Some(Self::SnatExhausted),
            _ => None,
        }
    }

    pub const fn name(self) -> &'static str {
        match self {
            Self::Unknown => "unknown",
            Self::Exhausted => "exhausted",
            Self::TupleCollision => "tuple_collision",
            Self::NoSourceAddress => "no_source_address",
            Self::BindExhausted => "bind_exhausted",
            Self::AutobindExhausted => "autobind_exhausted",
            Self::SnatExhausted => "snat_exhausted",
        }
    }

    pub fn from_name(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|x| x.name() == s)
    }
}

/// The probe backend: how TCP connect() failures are caught (ownership and latency always come
/// from the cheapest `inet_sock_set_state` hook the kernel offers).
#[repr(u8)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Backend {
    /// fentry/fexit on tcp_v{4,6}_connect and inet{,6}_hash_connect (BTF trampolines).
    Fentry = 1,
    /// kprobe/kretprobe on tcp_v{4,6}_connect and __inet_hash_connect.
    Kprobe = 2,
    /// The perf tracepoint `sock:inet_sock_set_state` (stable record layout, no BTF needed).
    Tracepoint = 3,
    /// The BTF-typed raw tracepoint (tp_btf) on `inet_sock_set_state`: typed, direct loads.
    TpBtf = 4,
    /// A plain raw tracepoint on `inet_sock_set_state`, reading through BTF offsets.
    RawTp = 5,
}

impl Backend {
    pub const ALL: [Backend; 5] = [
        Self::TpBtf,
        Self::RawTp,
        Self::Fentry,
        Self::Kprobe,
        Self::Tracepoint,
    ];

    pub const fn from_u8(v: u8) -> Option<Self> {
        match v {
            1 => Some(Self::Fentry),
            2 => Some(Self::Kprobe),
            3 => Some(Self::Tracepoint),
            4 => Some(Self::TpBtf),
            5 => Some(Self::RawTp),
            _ => None,
        }
    }

    pub const fn name(self) -> &'static str {
        match self {
            Self::Fentry => "fentry",
            Self::Kprobe => "kprobe",
            Self::Tracepoint => "tracepoint",
            Self::TpBtf => "tp-btf",
            Self::RawTp => "raw-tp",
        }
    }

    pub fn from_name(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|b| b.name() == s)
    }

    /// Backends that catch TCP connect() failures from `inet_sock_set_state` itself.
    pub const fn is_state(self) -> bool {
        matches!(self, Self::TpBtf | Self::RawTp | Self::Tracepoint)
    }
}

/// Failure kinds (bits), for what a run watches: the startup line, selftest and the summary
/// say which are covered, and a kind that is not watched is never shown as 0.
/// TCP connect() EADDRNOTAVAIL from port selection (exhausted range or tuple collision).
pub const KIND_CONNECT: u32 = 1;
/// TCP connect() EADDRNOTAVAIL before port selection (tcp_v4_connect / tcp_v6_connect).
pub const KIND_CONNECT_EARLY: u32 = 2;
/// bind() to port 0 with no free port (EADDRINUSE).
pub const KIND_BIND: u32 = 4;
/// UDP connect() that cannot autobind a port (EAGAIN).
pub const KIND_UDP: u32 = 8;
pub const KIND_ALL: u32 = KIND_CONNECT | KIND_CONNECT_EARLY | KIND_BIND | KIND_UDP;
/// Source-NAT port exhaustion one hop away (a router or container host's masquerade): drops
/// seen at `skb:kfree_skb`. Not in `KIND_ALL`: its hook fires on every dropped packet of the
/// machine, so it is attached only when named (`--catch nat`).
pub const KIND_NAT: u32 = 16;

/// (bit, name as `--catch` takes it, what it catches)
pub const KINDS: [(u32, &str, &str); 5] = [
    (
        KIND_CONNECT,
        "connect",
        "TCP connect() EADDRNOTAVAIL in port selection (__inet_hash_connect)",
    ),
    (
        KIND_CONNECT_EARLY,
        "connect-early",
        "TCP connect() EADDRNOTAVAIL before port selection (tcp_v4/v6_connect)",
    ),
    (
        KIND_BIND,
        "bind",
        "bind() to port 0 with no free port (EADDRINUSE)",
    ),
    (
        KIND_UDP,
        "udp",
        "UDP connect() that cannot autobind a port (EAGAIN)",
    ),
    (
        KIND_NAT,
        "nat",
        "SYNs dropped by a source NAT with no free port (nf_nat, conntrack insert_failed)",
    ),
];

pub fn kind_name(bit: u32) -> &'static str {
    match KINDS.iter().find(|k| k.0 == bit) {
        Some(k) => k.1,
        None => "?",
    }
}

pub fn kind_from_name(s: &str) -> Option<u32> {
    KINDS.iter().find(|k| k.1 == s).map(|k| k.0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_round_trip() {
        for s in Site::ALL {
            assert_eq!(Site::from_u8(s as u8), Some(s));
            assert_eq!(Site::from_name(s.name()), Some(s));
        }
        for c in Cause::ALL {
            assert_eq!(Cause::from_u8(c as u8), Some(c));
            assert_eq!(Cause::from_name(c.name()), Some(c));
        }
        for b in Backend::ALL {
            assert_eq!(Backend::from_u8(b as u8), Some(b));
            assert_eq!(Backend::from_name(b.name()), Some(b));
        }
        for (bit, name, _) in KINDS {
            assert_eq!(kind_from_name(name), Some(bit));
            assert_eq!(kind_name(bit), name);
        }
        assert_eq!(KINDS.iter().fold(0, |a, k| a | k.0), KIND_ALL | KIND_NAT);
    }
}
