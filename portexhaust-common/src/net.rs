//! Kernel constants, numbered as the kernel numbers them (include/net/tcp_states.h,
//! include/uapi/asm-generic/errno*.h, include/linux/socket.h, include/uapi/linux/in.h).

/// Length of `task_struct.comm` (TASK_COMM_LEN in include/linux/sched.h).
pub const COMM_LEN: usize = 16;

pub const AF_INET: u16 = 2;
pub const AF_INET6: u16 = 10;

pub const IPPROTO_TCP: u8 = 6;
pub const IPPROTO_UDP: u8 = 17;

/// `struct socket.type` / the low bits of socket()'s type argument.
pub const SOCK_STREAM: u8 = 1;
pub const SOCK_DGRAM: u8 = 2;

pub const EAGAIN: u32 = 11;
pub const EADDRINUSE: u32 = 98;
pub const EADDRNOTAVAIL: u32 = 99;

/// The errnos portexhaust reports, by name.
pub const fn errno_name(errno: u32) -> Option<&'static str> {
    match errno {
        EAGAIN => Some("EAGAIN"),
        EADDRINUSE => Some("EADDRINUSE"),
        EADDRNOTAVAIL => Some("EADDRNOTAVAIL"),
        // A source NAT's drop: connect() got no errno (the SYN was lost one hop away).
        0 => Some("none"),
        _ => None,
    }
}

/// TCP states (include/net/tcp_states.h; the same numbers in sock_diag's `idiag_state` and in
/// the `inet_sock_set_state` tracepoint).
#[repr(u8)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum TcpState {
    Established = 1,
    SynSent = 2,
    SynRecv = 3,
    FinWait1 = 4,
    FinWait2 = 5,
    TimeWait = 6,
    Close = 7,
    CloseWait = 8,
    LastAck = 9,
    Listen = 10,
    Closing = 11,
    NewSynRecv = 12,
}

impl TcpState {
    pub const ALL: [TcpState; 12] = [
        Self::Established,
        Self::SynSent,
        Self::SynRecv,
        Self::FinWait1,
        Self::FinWait2,
        Self::TimeWait,
        Self::Close,
        Self::CloseWait,
        Self::LastAck,
        Self::Listen,
        Self::Closing,
        Self::NewSynRecv,
    ];

    pub const fn from_u8(v: u8) -> Option<Self> {
        match v {
            1 => Some(Self::Established),
            2 => Some(Self::SynSent),
            3 => Some(Self::SynRecv),
            4 => Some(Self::FinWait1),
            5 => Some(Self::FinWait2),
            6 => Some(Self::TimeWait),
            7 => Some(Self::Close),
            8 => Some(Self::CloseWait),
            9 => Some(Self::LastAck),
            10 => Some(Self::Listen),
            11 => Some(Self::Closing),
            12 => Some(Self::NewSynRecv),
            _ => None,
        }
    }

    /// The name `ss` and the kernel use (`TIME_WAIT`, `SYN_SENT`, ...).
    pub const fn name(self) -> &'static str {
        match self {
            Self::Established => "ESTABLISHED",
            Self::SynSent => "SYN_SENT",
            Self::SynRecv => "SYN_RECV",
            Self::FinWait1 => "FIN_WAIT1",
            Self::FinWait2 => "FIN_WAIT2",
            Self::TimeWait => "TIME_WAIT",
            Self::Close => "CLOSE",
            Self::CloseWait => "CLOSE_WAIT",
            Self::LastAck => "LAST_ACK",
            Self::Listen => "LISTEN",
            Self::Closing => "CLOSING",
            Self::NewSynRecv => "NEW_SYN_RECV",
        }
    }

    pub fn from_name(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|t| t.name() == s)
    }

    /// States that come out of an active close and end in TIME_WAIT when the socket reaches
    /// CLOSE (`tcp_time_wait()` replaces it with a TIME_WAIT mini-socket).
    pub const fn ends_in_time_wait(self) -> bool {
        matches!(self, Self::FinWait1 | Self::FinWait2 | Self::Closing)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn states_round_trip() {
        for s in TcpState::ALL {
            assert_eq!(TcpState::from_u8(s as u8), Some(s));
            assert_eq!(TcpState::from_name(s.name()), Some(s));
        }
        assert_eq!(TcpState::from_u8(0), None);
        assert_eq!(TcpState::from_u8(13), None);
        assert_eq!(errno_name(99), Some("EADDRNOTAVAIL"));
        assert_eq!(errno_name(1), None);
    }
}
