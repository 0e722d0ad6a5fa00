//! The exact in-kernel counts at one moment, and what the tracer knew with them: a
//! `{"type":"snapshot"}` line (every `--snapshot-interval`) or the `{"type":"summary"}` that
//! ends `trace --json` and a record.
use std::{collections::BTreeMap, net::SocketAddr};

use portexhaust_common::{Backend, Cause};
use serde::{Deserialize, Serialize};

use super::{BlameEntry, CallSite, DestRow, Errno, Ts};

/// One destination of one offender.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DestCount {
    pub dst: SocketAddr,
    #[serde(flatten)]
    pub errno: Errno,
    /// Version 1 offenders have none: `unknown`.
    #[serde(default = "unknown_cause")]
    pub cause: Cause,
    pub failures: u64,
}

fn unknown_cause() -> Cause {
    Cause::Unknown
}

/// A process with failures.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Offender {
    pub pid: u32,
    #[serde(default)]
    pub comm: String,
    /// Its network namespace, when an event said so.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub netns: Option<u64>,
    pub failures: u64,
    #[serde(default)]
    pub first_ts: Option<Ts>,
    #[serde(default)]
    pub last_ts: Option<Ts>,
    /// Most failures first.
    #[serde(default)]
    pub destinations: Vec<DestCount>,
}

/// A snapshot or the summary.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Totals {
    /// The schema version that wrote it (absent, and so 1, in version 1 records).
    #[serde(default = "v1")]
    pub version: u64,
    /// When the counts were read.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ts: Option<Ts>,
    #[serde(default)]
    pub backend: Option<Backend>,
    /// Seconds since tracing started.
    #[serde(default)]
    pub duration_s: Option<f64>,
    /// Exact: counted in the kernel for every failure that passed the filters.
    pub failures_total: u64,
    /// Events the ring buffer could not take (counted in the kernel).
    #[serde(default)]
    pub dropped_events: u64,
    /// Failures whose per-destination key did not fit in the counts map: in the total, not in
    /// any offender.
    #[serde(default)]
    pub uncounted_keys: u64,
    #[serde(default)]
    pub offenders: Vec<Offender>,
    /// For each destination that saw failures: failers and port holders.
    #[serde(default)]
    pub blame: Vec<BlameEntry>,
    /// Ports in use per destination in the namespaces that had failures.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub destinations: Vec<DestRow>,
    /// The code that made the connects: per process, user stack and destination, with the
    /// failures and the ports each holds now. Most failures and holds first.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub call_sites: Vec<CallSite>,
    /// Sockets whose opener the kernel remembers now (ESTABLISHED through TIME_WAIT).
    #[serde(default)]
    pub tracked_sockets: u64,
    /// Owners the bounded LRU maps had to drop (attribution lost for those sockets).
    #[serde(default)]
    pub lru_evictions: u64,
    /// Failure kinds some hook watched (`connect`, `bind`, ...).
    #[serde(default)]
    pub watched: Vec<String>,
    /// Failure kinds nothing watched, and why: their 0 is "not watched", not "none".
    #[serde(default)]
    pub not_watched: BTreeMap<String, String>,
    /// Source-NAT drops (`--catch nat`), per NAT namespace, destination and NAT address. They
    /// are also in `failures_total` and in the offenders (cause `snat_exhausted`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub nat: Vec<super::NatEntry>,
    /// Source-NAT drops counted in the kernel but not streamed as `nf_nat` lines (over the
    /// event budget, or the ring buffer full): in `nat[].drops`, under `pid: null` when no
    /// streamed drop named their client.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub nat_unstreamed: u64,
}

fn is_zero(n: &u64) -> bool {
    *n == 0
}

fn v1() -> u64 {
    1
}

impl Totals {
    /// Failures counted per offender (the total less `uncounted_keys`).
    pub fn counted(&self) -> u64 {
        self.offenders.iter().map(|o| o.failures).sum()
    }
}

impl Default for Totals {
    /// Nothing counted yet, written by this version.
    fn default() -> Self {
        Self {
            version: crate::schema::VERSION,
            ts: None,
            backend: None,
            duration_s: None,
            failures_total: 0,
            dropped_events: 0,
            uncounted_keys: 0,
            offenders: Vec::new(),
            blame: Vec::new(),
            destinations: Vec::new(),
            call_sites: Vec::new(),
            tracked_sockets: 0,
            lru_evictions: 0,
            watched: Vec::new(),
            not_watched: BTreeMap::new(),
            nat: Vec::new(),
            nat_unstreamed: 0,
        }
    }
}
