//! A failure as it is streamed, recorded and read back, and the small typed values it is made
//! of.
use std::{
    net::{IpAddr, SocketAddr},
    sync::Arc,
};

use portexhaust_common::{AF_INET, AF_INET6, Backend, Cause, IPPROTO_TCP, IPPROTO_UDP, Site};
use serde::{Deserialize, Deserializer, Serialize, Serializer, ser::SerializeStruct};

use super::{ContainerInfo, Ts};

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Family {
    Ipv4,
    Ipv6,
}

impl Family {
    pub fn name(self) -> &'static str {
        match self {
            Self::Ipv4 => "ipv4",
            Self::Ipv6 => "ipv6",
        }
    }
    pub fn from_af(af: u16) -> Option<Self> {
        match af {
            AF_INET => Some(Self::Ipv4),
            AF_INET6 => Some(Self::Ipv6),
            _ => None,
        }
    }
}

#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize,
)]
#[serde(rename_all = "lowercase")]
pub enum Proto {
    #[default]
    Tcp,
    Udp,
}

impl Proto {
    pub fn name(self) -> &'static str {
        match self {
            Self::Tcp => "tcp",
            Self::Udp => "udp",
        }
    }
    pub fn from_ipproto(p: u8) -> Option<Self> {
        match p {
            IPPROTO_TCP => Some(Self::Tcp),
            IPPROTO_UDP => Some(Self::Udp),
            _ => None,
        }
    }
}

/// An errno, written with its name: `"errno":99,"errname":"EADDRNOTAVAIL"` (flattened into
/// the record that carries it). Only the number is read back; the name follows from it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Errno(pub u32);

impl Errno {
    pub const EADDRNOTAVAIL: Self = Self(portexhaust_common::EADDRNOTAVAIL);
    pub const EADDRINUSE: Self = Self(portexhaust_common::EADDRINUSE);
    pub const EAGAIN: Self = Self(portexhaust_common::EAGAIN);

    pub fn name(self) -> &'static str {
        portexhaust_common::errno_name(self.0).unwrap_or("UNKNOWN")
    }
}

impl Serialize for Errno {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let mut st = s.serialize_struct("Errno", 2)?;
        st.serialize_field("errno", &self.0)?;
        st.serialize_field("errname", self.name())?;
        st.end()
    }
}

impl<'de> Deserialize<'de> for Errno {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        struct Raw {
            errno: u32,
        }
        Raw::deserialize(d).map(|r| Self(r.errno))
    }
}

/// One exhaustion failure: a `{"type":"failure"}` line of `trace --json` and of a record.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Failure {
    pub ts: Ts,
    pub pid: u32,
    #[serde(default)]
    pub tid: u32,
    #[serde(default)]
    pub uid: u32,
    #[serde(default)]
    pub comm: String,
    #[serde(default)]
    pub cgroup_id: u64,
    /// Network namespace inode, when it could be learnt.
    #[serde(default)]
    pub netns: Option<u64>,
    pub family: Family,
    pub proto: Proto,
    pub dst: SocketAddr,
    #[serde(default)]
    pub src: Option<IpAddr>,
    #[serde(flatten)]
    pub errno: Errno,
    /// Why: `exhausted`, `tuple_collision`, `no_source_address`, `bind_exhausted`,
    /// `autobind_exhausted`, or `unknown` (no BTF offsets to read the socket; version 1).
    #[serde(default = "unknown_cause")]
    pub cause: Cause,
    pub site: Site,
    pub backend: Backend,
    /// `{"runtime","id","pod"}` or null. Shared: a storm repeats the same few.
    #[serde(default)]
    pub container: Option<Arc<ContainerInfo>>,
    /// Site `nf_nat` only: the NAT that dropped the packet, and where it tried to map it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub nat: Option<super::NatInfo>,
}

/// Failures of one (process, destination, errno, cause) not written one by one: over the
/// stream's `--events-per-s` (counted in the kernel), refused by a full ring buffer, or over
/// the record's `--record-events-per-s`. With the failure lines, tallies account for every
/// failure exactly once.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Tally {
    /// When the tally was written (absent in the entries of a version 1 `suppressed` line).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ts: Option<Ts>,
    pub pid: u32,
    #[serde(default)]
    pub comm: String,
    #[serde(default)]
    pub netns: Option<u64>,
    #[serde(default)]
    pub proto: Proto,
    pub dst: SocketAddr,
    #[serde(flatten)]
    pub errno: Errno,
    #[serde(default = "unknown_cause")]
    pub cause: Cause,
    /// Failures this line accounts for (since the previous tally of the same key).
    pub count: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub first_ts: Option<Ts>,
    /// The newest failure the tally covers.
    pub last_ts: Ts,
    /// In a record: the last snapshot had already counted these (they were still in the ring
    /// buffer while it was taken).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub counted_by_snapshot: bool,
}

fn unknown_cause() -> Cause {
    Cause::Unknown
}
