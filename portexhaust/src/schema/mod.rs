//! The only wire types. Every line `trace --json` prints, every line of a `trace --record` file
//! and everything `report` reads back is a [`Record`]: one type per kind of line, each with
//! Serialize and Deserialize, so that a field is added once and every reader and writer gets it.
//!
//! A run is `header`, then `failure` and `tally` lines as they happen (with `sysctls` lines in a
//! record when a new namespace turns up), `snapshot`s of the exact counts in a record, and the
//! `summary` when the tracer stops; a `gap` where a record's disk was full (what it could not
//! write). `trace --json` writes the same lines as a record (without the
//! snapshots and `sysctls`), so its output can be given to `report` as it is.
//!
//! Times are [`Ts`] (nanoseconds) inside and RFC 3339 only in the text; TCP states, errnos,
//! sites, causes and backends are typed and written by name.
//!
//! Versions: 2 is written. 1 (before `tally` lines, typed states and `uncounted_keys`) is still
//! read: its `suppressed` lines are tallies, several to a line.
mod container;
pub mod event;
mod failure;
mod header;
mod nat;
mod ports;
mod problem;
pub mod read;
mod sites;
mod sysctls;
mod time;
mod top;
mod totals;
mod whatif;

use std::borrow::Cow;

use serde::{Deserialize, Serialize};

pub use container::{ContainerInfo, Runtime};
pub use failure::{Errno, Failure, Family, Proto, Tally};
pub use header::{Gap, Header, RecordedFilters, Suppressed, SysctlsLine};
pub use nat::{NatClient, NatEntry, NatInfo, NatRange};
pub use ports::{Attribution, BlameEntry, ByState, DestRow, Failer, Holder, Latency, utilisation};
pub use problem::{Level, Problem};
pub use sites::{CallSite, Frame};
pub use sysctls::{
    NetSysctls, PortRange, TcpExtCounters, merge_ranges, parse_netstat, parse_port_range,
    parse_reserved, reserved_overlap,
};
pub use time::Ts;
pub use top::{FailingProcess, NatRow, TopView};
pub use totals::{DestCount, Offender, Totals};
pub use whatif::{Load, WhatIf};

/// The version this build writes.
pub const VERSION: u64 = 2;
/// The versions this build reads.
pub const READS: [u64; 2] = [1, 2];

/// One line. Writers lend their data (`Cow::Borrowed`), readers own it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "lowercase")]
pub enum Record<'a> {
    Header(Cow<'a, Header>),
    Sysctls(Cow<'a, SysctlsLine>),
    Failure(Cow<'a, Failure>),
    Tally(Cow<'a, Tally>),
    /// Version 1 only.
    Suppressed(Cow<'a, Suppressed>),
    Snapshot(Cow<'a, Totals>),
    Summary(Cow<'a, Totals>),
    /// Lines a record lost to a full or failing disk (see [`Gap`]).
    Gap(Cow<'a, Gap>),
}

impl Record<'_> {
    /// The `"type"` of the line.
    pub fn kind(&self) -> &'static str {
        match self {
            Self::Header(_) => "header",
            Self::Sysctls(_) => "sysctls",
            Self::Failure(_) => "failure",
            Self::Tally(_) => "tally",
            Self::Suppressed(_) => "suppressed",
            Self::Snapshot(_) => "snapshot",
            Self::Summary(_) => "summary",
            Self::Gap(_) => "gap",
        }
    }

    /// The line, without its newline.
    pub fn to_line(&self) -> String {
        // Only strings, numbers, maps with string keys and sequences: this cannot fail.
        serde_json::to_string(self).unwrap_or_default()
    }
}

impl Header {
    pub fn line(&self) -> String {
        Record::Header(Cow::Borrowed(self)).to_line()
    }
}
impl SysctlsLine {
    pub fn line(&self) -> String {
        Record::Sysctls(Cow::Borrowed(self)).to_line()
    }
}
impl Gap {
    pub fn line(&self) -> String {
        Record::Gap(Cow::Borrowed(self)).to_line()
    }
}
impl Failure {
    pub fn line(&self) -> String {
        Record::Failure(Cow::Borrowed(self)).to_line()
    }
}
impl Tally {
    pub fn line(&self) -> String {
        Record::Tally(Cow::Borrowed(self)).to_line()
    }
}
impl Totals {
    pub fn snapshot_line(&self) -> String {
        Record::Snapshot(Cow::Borrowed(self)).to_line()
    }
    pub fn summary_line(&self) -> String {
        Record::Summary(Cow::Borrowed(self)).to_line()
    }
}

#[cfg(test)]
pub(crate) mod tests;
