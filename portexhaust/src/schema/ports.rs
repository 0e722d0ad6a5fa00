//! Port usage as every output shows it: a destination row (ports in use towards one
//! destination from one source address in one namespace), who holds those ports, and, for a
//! destination that saw failures, who failed there.
use std::{
    collections::BTreeMap,
    net::{IpAddr, SocketAddr},
};

use portexhaust_common::TcpState;
use serde::{Deserialize, Serialize};

use super::{ContainerInfo, Load, Proto, WhatIf};

/// Ports in use / usable ports of the range. The one definition every output uses.
/// - An unknown range (the namespace's settings could not be read: it was gone) is `None`,
///   never shown as 0% or 100%.
/// - A known range with no usable port (all reserved) is 1.0: nothing can connect.
pub fn utilisation(in_use: u64, range_size: Option<u64>) -> Option<f64> {
    match range_size? {
        0 => Some(1.0),
        n => Some((in_use as f64 / n as f64).min(1.0)),
    }
}

/// Sockets per TCP state; serialised by state name (`{"TIME_WAIT":9}`).
pub type ByState = BTreeMap<TcpState, u64>;

/// connect() latency of a destination, from the in-kernel log2 histograms.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Latency {
    /// connects timed (a sample: see `portexhaust_common::DestStats`), not connects made.
    #[serde(default)]
    pub count: u64,
    /// Upper bounds of the log2 buckets holding each percentile, in microseconds.
    #[serde(default)]
    pub p50: f64,
    #[serde(default)]
    pub p90: f64,
    #[serde(default)]
    pub p99: f64,
    /// The histogram the percentiles come from, as the kernel counts it since tracing began:
    /// `buckets[i]` is the number of timed connects that took [2^i, 2^(i+1)) ns (the first
    /// also takes 0 ns, the last everything above). Empty in rows written before it existed.
    /// The metrics serve it as `portexhaust_connect_duration_seconds`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub buckets: Vec<u64>,
}

/// How the holder of a socket was found.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Attribution {
    /// The kernel saw this process close the connection actively while tracing: it left the
    /// TIME_WAIT socket behind (which no file, and nothing else in the kernel, names).
    Traced,
    /// A live socket: the process holding its file now.
    Fd,
    /// Closed before tracing started (TIME_WAIT) or held by no file (an orphan): unknown.
    Unknown,
}

/// A process holding ports towards a destination (or, with no pid, the sockets nobody can be
/// named for).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Holder {
    #[serde(default)]
    pub pid: Option<u32>,
    #[serde(default)]
    pub comm: String,
    #[serde(default)]
    pub alive: bool,
    #[serde(default)]
    pub sockets: u64,
    #[serde(default)]
    pub time_wait: u64,
    /// sockets / in_use of the destination.
    #[serde(default)]
    pub share: f64,
    #[serde(default = "unknown")]
    pub attribution: Attribution,
    #[serde(default)]
    pub container: Option<ContainerInfo>,
    /// cgroup of the traced opener (0 when not traced), to resolve `container` even after
    /// the process exited. Not written.
    #[serde(skip)]
    pub cgroup_id: u64,
}

fn unknown() -> Attribution {
    Attribution::Unknown
}

impl Holder {
    /// The same holder with nothing counted yet, to add others into.
    pub fn empty_like(&self) -> Self {
        Self {
            sockets: 0,
            time_wait: 0,
            share: 0.0,
            ..self.clone()
        }
    }

    /// Add another count of the same holder (another destination or source).
    pub fn absorb(&mut self, other: &Holder) {
        self.sockets += other.sockets;
        self.time_wait += other.time_wait;
        self.alive |= other.alive;
    }

    /// `comm`, with the container when there is one: `nginx [docker:0123456789ab]`.
    pub fn label(&self) -> String {
        match &self.container {
            Some(c) => format!("{} [{}]", self.comm, c.short()),
            None => self.comm.clone(),
        }
    }
}

/// One destination seen from one source address in one namespace. The optional fields are
/// known only to the live census (rates, forecast, latency, holders); readers accept rows
/// without them.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct DestRow {
    #[serde(default)]
    pub netns: Option<u64>,
    #[serde(default)]
    pub src: Option<IpAddr>,
    pub dst: SocketAddr,
    #[serde(default)]
    pub proto: Proto,
    /// Usable ports of the namespace's range (None: unknown).
    #[serde(default)]
    pub range_size: Option<u64>,
    #[serde(default)]
    pub in_use: u64,
    #[serde(default)]
    pub by_state: ByState,
    /// [`utilisation`] of `in_use` and `range_size`.
    #[serde(default)]
    pub utilisation: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub new_per_s: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tw_expiring_per_s: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub forecast_s: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub latency_us: Option<Latency>,
    /// Connections established towards the destination since tracing began: the kernel's
    /// exact count (`DEST_STATS`), which is per namespace and destination, so every source
    /// address's row of one destination carries the same number. None without blame
    /// tracking, or where the kernel has no entry for the destination.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub connects: Option<u64>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub holders: Vec<Holder>,
    /// The measured load (rate, lifetime, TIME_WAIT hold), when it could be measured.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub load: Option<Load>,
    /// What each fix would buy, from `load`: now first, then application fixes.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub what_if: Vec<WhatIf>,
}

impl DestRow {
    /// A row with just the census facts; `utilisation` follows from them.
    pub fn new(
        netns: Option<u64>,
        src: Option<IpAddr>,
        dst: SocketAddr,
        range_size: Option<u64>,
        in_use: u64,
        by_state: ByState,
    ) -> Self {
        Self {
            netns,
            src,
            dst,
            proto: Proto::Tcp,
            range_size,
            in_use,
            by_state,
            utilisation: utilisation(in_use, range_size),
            new_per_s: None,
            tw_expiring_per_s: None,
            forecast_s: None,
            latency_us: None,
            connects: None,
            holders: Vec::new(),
            load: None,
            what_if: Vec::new(),
        }
    }

    pub fn state(&self, s: TcpState) -> u64 {
        self.by_state.get(&s).copied().unwrap_or(0)
    }

    pub fn time_wait(&self) -> u64 {
        self.state(TcpState::TimeWait)
    }
}

/// A process that failed towards a destination.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Failer {
    pub pid: u32,
    #[serde(default)]
    pub comm: String,
    #[serde(default)]
    pub failures: u64,
    #[serde(default)]
    pub container: Option<ContainerInfo>,
}

/// For one destination that saw failures: who failed, and who holds its ports.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct BlameEntry {
    pub dst: SocketAddr,
    #[serde(default)]
    pub netns: Option<u64>,
    /// Usable ports of the failers' namespace (None: unknown, the namespace was gone).
    #[serde(default)]
    pub range_size: Option<u64>,
    #[serde(default)]
    pub in_use: u64,
    #[serde(default)]
    pub by_state: ByState,
    #[serde(default)]
    pub failers: Vec<Failer>,
    #[serde(default)]
    pub holders: Vec<Holder>,
}

impl BlameEntry {
    pub fn utilisation(&self) -> Option<f64> {
        utilisation(self.in_use, self.range_size)
    }

    pub fn failures(&self) -> u64 {
        self.failers.iter().map(|f| f.failures).sum()
    }

    /// The entry as a destination row (no source address: it sums every source).
    pub fn as_row(&self) -> DestRow {
        DestRow::new(
            self.netns,
            None,
            self.dst,
            self.range_size,
            self.in_use,
            self.by_state.clone(),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn utilisation_of_an_empty_range_is_full_and_of_an_unknown_one_unknown() {
        assert_eq!(utilisation(0, Some(0)), Some(1.0));
        assert_eq!(utilisation(5, Some(0)), Some(1.0));
        assert_eq!(utilisation(5, None), None);
        assert_eq!(utilisation(5, Some(10)), Some(0.5));
        assert_eq!(utilisation(12, Some(10)), Some(1.0));
        let b = BlameEntry {
            dst: "127.0.0.1:80".parse().expect("addr"),
            netns: Some(1),
            range_size: Some(0),
            in_use: 0,
            by_state: ByState::new(),
            failers: vec![],
            holders: vec![],
        };
        // The same answer whichever way it is asked.
        assert_eq!(b.utilisation(), Some(1.0));
        assert_eq!(b.as_row().utilisation, Some(1.0));
    }

    #[test]
    fn states_are_written_by_name() {
        let mut by_state = ByState::new();
        by_state.insert(TcpState::TimeWait, 9);
        let row = DestRow::new(
            Some(1),
            None,
            "10.0.0.1:80".parse().expect("addr"),
            Some(10),
            9,
            by_state,
        );
        let v = serde_json::to_value(&row).expect("json");
        assert_eq!(v["by_state"]["TIME_WAIT"], 9);
        assert_eq!(v["utilisation"], 0.9);
        let back: DestRow = serde_json::from_value(v).expect("back");
        assert_eq!(back, row);
        assert!(serde_json::from_str::<ByState>(r#"{"NOPE":1}"#).is_err());
    }
}
