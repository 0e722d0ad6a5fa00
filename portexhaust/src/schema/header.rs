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
