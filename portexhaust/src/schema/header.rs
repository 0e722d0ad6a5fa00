//! The lines that describe a tracer run rather than its failures.
use std::collections::BTreeMap;

use portexhaust_common::Backend;
use serde::{Deserialize, Serialize};

use super::{DestRow, NetSysctls, Tally, Ts};

/// Filters the tracer ran with: counts in a filtered run cover only what passed them.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RecordedFilters {
    #[serde(default)]
    pub pids: Vec<u32>,
    #[serde(default)]
    pub comms: Vec<String>,
    #[serde(default)]
    pub dports: Vec<u16>,
    /// `--cgroup`/`--container`: the cgroup v2 subtrees, as paths relative to the hierarchy.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub cgroups: Vec<String>,
}

/// The first line of a run (a record's session, or `trace --json`). Every field but `version`
/// is optional on reading: a report says what it can from a hand-edited header.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Header {
    pub version: u64,
    #[serde(default)]
    pub host: Option<String>,
    #[serde(default)]
    pub kernel: Option<String>,
    #[serde(default)]
    pub start_ts: Option<Ts>,
    #[serde(default)]
    pub backend: Option<Backend>,
    /// The tracer's pid.
    #[serde(default)]
    pub pid: Option<u32>,
    /// The tracer's own network namespace.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub netns: Option<u64>,
    /// Settings per network namespace (inode).
    #[serde(default, deserialize_with = "by_netns")]
    pub sysctls: BTreeMap<u64, NetSysctls>,
    /// The busiest destinations when tracing started.
    #[serde(default)]
    pub census: Vec<DestRow>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub filters: Option<RecordedFilters>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tool: Option<String>,
    /// One id per tracer run, the same in every file of a rotated record: `report` joins the
    /// parts of one run into one session.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub run_id: Option<String>,
    /// Which file of its run this header starts: 0 the first, n after n rotations. A later
    /// part repeats the run's header (its start time, settings and census), so that it
    /// reports on its own; its snapshots count from the run's start.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub part: Option<u32>,
}

/// Settings (and busiest destinations) of a namespace first seen after the header, read from
/// inside it.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct SysctlsLine {
    #[serde(default)]
    pub ts: Option<Ts>,
    #[serde(default)]
    pub netns: Option<u64>,
    #[serde(default, deserialize_with = "by_netns")]
    pub sysctls: BTreeMap<u64, NetSysctls>,
    #[serde(default)]
    pub census: Vec<DestRow>,
}

/// Lines a record could not write (its disk was full, or failing) and what became of them,
/// written once writing works again. The counts stay exact: the failures of the gap are in
/// the tally lines after it, and every later snapshot counts them.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Gap {
    /// When the gap line was written.
    #[serde(default)]
    pub ts: Option<Ts>,
    /// The first write that failed.
    pub from_ts: Ts,
    /// The first write that worked again.
    pub until_ts: Ts,
    /// The write error, as the kernel gave it.
    #[serde(default)]
    pub error: String,
    /// Lines not written: failure lines (their failures tallied instead), snapshots and
    /// namespace settings.
    #[serde(default)]
    pub lines: u64,
    /// Failures that got no line of their own: each is in a tally line after this one.
    #[serde(default)]
    pub failures: u64,
    /// Snapshots not written (the next one written has their counts).
    #[serde(default)]
    pub snapshots: u64,
}

/// Version 1 only (read, never written): the record's tallies, several per line. Version 2
/// writes each as a `tally` line, as `trace --json` does.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Suppressed {
    #[serde(default)]
    pub ts: Option<Ts>,
    pub events: Vec<Tally>,
}

/// A map keyed by namespace inode. JSON keys are strings: read through strings, because a
/// record line is buffered by its `type` tag first, and that buffer does not turn string keys
/// into numbers as serde_json does.
fn by_netns<'de, D: serde::Deserializer<'de>>(d: D) -> Result<BTreeMap<u64, NetSysctls>, D::Error> {
    let raw = BTreeMap::<String, NetSysctls>::deserialize(d)?;
    raw.into_iter()
        .map(|(k, v)| {
            k.parse::<u64>()
                .map(|k| (k, v))
                .map_err(|_| serde::de::Error::custom(format_args!("bad namespace inode {k:?}")))
        })
        .collect()
}
