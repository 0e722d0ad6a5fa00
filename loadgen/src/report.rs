//! The JSON lines the generators print (`cargo xtask bench` reads them with its own mirror
//! types, since xtask must build before the eBPF toolchain exists and so cannot depend on us).
use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// First line of every generator: set-up is done, waiting for `go`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Ready {
    /// The generator's pid (the key tracers report failures under).
    pub ready: u32,
    pub comm: String,
    pub netns: Option<u64>,
}

/// `pxh-loadgen storm`: a tight loop of connect() calls failing with EADDRNOTAVAIL.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct StormReport {
    pub kind: String,
    pub pid: u32,
    pub comm: String,
    pub netns: Option<u64>,
    pub ports: u16,
    pub dst: String,
    /// connect() calls that failed with EADDRNOTAVAIL, as the client saw them (exact).
    pub failures: u64,
    /// Any other outcome ("succeeded", "errno N") and how often: should stay empty.
    pub other: BTreeMap<String, u64>,
    /// The loop stopped on its time bound before making every planned call.
    pub truncated: bool,
    pub elapsed_s: f64,
    pub rate_per_s: f64,
    pub user_s: f64,
    pub sys_s: f64,
}

/// `pxh-loadgen churn`: connect/accept/close cycles that succeed.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ChurnReport {
    pub kind: String,
    pub pid: u32,
    pub comm: String,
    pub netns: Option<u64>,
    pub ports: u16,
    pub dst: String,
    /// Who closes first: "server" (see churn.rs for why).
    pub first_close: String,
    /// Completed connect + accept + close cycles.
    pub connects: u64,
    /// Failed connect() calls by errno: should stay empty.
    pub errors: BTreeMap<String, u64>,
    pub elapsed_s: f64,
    pub rate_per_s: f64,
    pub user_s: f64,
    pub sys_s: f64,
}

/// `pxh-loadgen hold`: many established connections kept open, then churned a little.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct HoldReport {
    pub kind: String,
    pub pid: u32,
    pub comm: String,
    pub netns: Option<u64>,
    /// Connections held (each is two sockets: the client's and the accepted one).
    pub connections: u64,
    /// Destinations (127.0.0.1:PORT, one port each) the connections are spread over.
    pub dests: u16,
    /// Processes holding them (see hold.rs: the open-file limit caps each one).
    pub workers: u32,
    pub open_s: f64,
    pub open_rate_per_s: f64,
    /// Close-and-reopen cycles during the churn phase (the held count stays the same).
    pub churned: u64,
    pub churn_s: f64,
    /// ESTABLISHED sockets in the namespace after the churn (/proc/self/net/tcp): 2 x connections.
    pub established: u64,
    pub rss_kib: u64,
}
