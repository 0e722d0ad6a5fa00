//! Source-NAT exhaustion one hop away: what a `nf_nat` failure line adds (`"nat":{...}`) and
//! the summary's `"nat":[...]` section (one entry per NAT namespace, destination and NAT
//! address).
use std::net::{IpAddr, SocketAddr};

use serde::{Deserialize, Serialize};

use super::{ContainerInfo, Proto};

/// The NAT's side of one dropped packet.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct NatInfo {
    /// Network namespace of the NAT that dropped it (the router; on a container host, usually
    /// the host's own).
    pub router_netns: u64,
    /// The client's source before NAT (`src` of the failure is its address).
    pub client: SocketAddr,
    /// Where the NAT tried to rewrite the source to (an address and port already taken
    /// towards `dst`).
    pub nat: SocketAddr,
    /// Whether the NAT's conntrack table held another connection with that reply tuple when
    /// user space looked (a clash); `None`: not looked up. `false` means the drop may have been
    /// a firewall rule after srcnat rather than exhaustion.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub clash: Option<bool>,
}

/// A process behind NAT drops or holding NAT ports.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct NatClient {
    /// `None`: drops whose client socket could not be found (it was gone, or is on another
    /// host).
    #[serde(default)]
    pub pid: Option<u32>,
    #[serde(default)]
    pub comm: String,
    #[serde(default)]
    pub netns: Option<u64>,
    /// Dropped packets of this client (failers) or NAT entries it holds (holders).
    pub count: u64,
    #[serde(default)]
    pub container: Option<ContainerInfo>,
}

/// The port range the NAT maps to, and where it was learnt.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct NatRange {
    pub lo: u16,
    pub hi: u16,
    /// `nft` (the masquerade/snat rule of the namespace's ruleset) or `default`
    /// (no range on the rule: the kernel's 1024-65535 for source ports above 1023).
    pub source: String,
}

/// One NAT namespace, destination and NAT address.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct NatEntry {
    pub router_netns: u64,
    pub proto: Proto,
    pub dst: SocketAddr,
    pub nat_addr: IpAddr,
    /// Exact: counted in the kernel.
    pub drops: u64,
    /// Who the dropped packets came from (from the streamed drops; the rest, over the event
    /// budget, under `pid: null`).
    #[serde(default)]
    pub failers: Vec<NatClient>,
    /// The NAT's own view (conntrack over netlink, in the NAT's namespace): entries towards
    /// `dst` rewritten to `nat_addr`, the distinct NAT ports they use, and who opened them.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub conntrack_entries: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub in_use: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub range: Option<NatRange>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub utilisation: Option<f64>,
    #[serde(default)]
    pub holders: Vec<NatClient>,
    /// The namespace's own `insert_failed` counter rose by this much while tracing (summed over
    /// CPUs from /proc/net/stat/nf_conntrack): should equal the drops of all its entries.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub insert_failed_delta: Option<u64>,
}
