//! A `{"type":"top"}` snapshot of `top --json`: port pressure now.
use portexhaust_common::Backend;
use serde::{Deserialize, Serialize};

use super::{BlameEntry, CallSite, DestRow, NatEntry, Ts};

/// One NAT destination in `top` (`--catch nat`): the summary's NAT entry, and how fast its
/// drops come now.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct NatRow {
    #[serde(flatten)]
    pub entry: NatEntry,
    /// Drops per second since the previous refresh (None: the first sample of this row).
    pub drops_per_s: Option<f64>,
}

/// A process with failures, for `top`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct FailingProcess {
    pub pid: u32,
    pub comm: String,
    pub failures: u64,
    /// Failures per second since the previous refresh.
    pub rate: f64,
    pub top_dst: Option<std::net::SocketAddr>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct TopView {
    pub ts: Ts,
    pub backend: Backend,
    pub failures_total: u64,
    pub dropped_events: u64,
    pub lru_evictions: u64,
    pub tracked_sockets: u64,
    /// Most utilised first, with rates, forecasts, latency and holders.
    pub destinations: Vec<DestRow>,
    pub failing: Vec<FailingProcess>,
    pub blame: Vec<BlameEntry>,
    /// The code behind the connects, with what each site holds now.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub call_sites: Vec<CallSite>,
    /// Source-NAT destinations with drops (`top --catch nat`), most drops first. Their drops
    /// are in `failures_total`, as in the summary.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub nat: Vec<NatRow>,
}

impl TopView {
    pub fn line(&self) -> String {
        #[derive(Serialize)]
        struct Line<'a> {
            #[serde(rename = "type")]
            kind: &'static str,
            #[serde(flatten)]
            view: &'a TopView,
        }
        serde_json::to_string(&Line {
            kind: "top",
            view: self,
        })
        .unwrap_or_default()
    }
}
