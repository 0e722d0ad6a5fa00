//! The facts a record starts with and learns on the way: the host, the kernel, the port settings
//! of each network namespace and its busiest destinations. Gathered here, handed to the recorder
//! as [`Header`] and [`SysctlsLine`] values: the recorder writes what it is given.
use std::collections::{BTreeMap, HashMap, HashSet};

use portexhaust_common::Backend;

use super::{
    netns::{self, census_here, in_netns, netns_path},
    procinfo::netns_of,
    sysctl,
};
use crate::{
    engine::census::{busiest, destination_rows},
    schema::{DestRow, Header, NetSysctls, RecordedFilters, SysctlsLine, Ts, VERSION},
};

/// Destination rows a header or a `sysctls` line lists at most.
const CENSUS_ROWS: usize = 50;
/// Namespaces whose settings the header lists at most.
const HEADER_NAMESPACES: usize = 256;
/// Attempts to read a namespace first seen in an event (its process may be gone already).
const NETNS_TRIES: u8 = 3;

/// The header of a run: who, where, what was being watched, and the start-up census (the
/// settings of every namespace that has processes, and the busiest destinations among them).
pub fn header(backend: Backend, filters: RecordedFilters) -> Header {
    let own = netns_of(std::process::id());
    let rows = destination_rows(&netns::census(None));
    let mut sysctls = BTreeMap::new();
    for (ino, path) in netns::namespaces().into_iter().take(HEADER_NAMESPACES) {
        if let Ok(s) = in_netns(ino, &path, sysctl::read_current) {
            sysctls.insert(ino, s);
        }
    }
    if let Some(n) = own {
        sysctls.entry(n).or_insert_with(sysctl::read_current);
    }
    let (host, kernel) = sysctl::host_and_kernel();
    Header {
        version: VERSION,
        host,
        kernel,
        start_ts: Some(Ts::now()),
        backend: Some(backend),
        pid: Some(std::process::id()),
        netns: own,
        sysctls,
        census: busiest(rows, CENSUS_ROWS),
        filters: Some(filters),
        tool: Some(format!("portexhaust {}", env!("CARGO_PKG_VERSION"))),
        run_id: None,
        part: None,
    }
}

/// Settings and busiest destinations of the calling thread's namespace, `netns`.
fn here(netns: u64) -> (NetSysctls, Vec<DestRow>) {
    let sysctls = sysctl::read_current();
    let mut census = Vec::new();
    if sysctls.range().is_some()
        && let Ok(c) = census_here(netns, &sysctls)
    {
        census = busiest(destination_rows(&[c]), CENSUS_ROWS);
    }
    (sysctls, census)
}

/// Namespaces the run has described, so that each new one is read once, from inside it.
#[derive(Debug, Default)]
pub struct Namespaces {
    known: HashSet<u64>,
    tries: HashMap<u64, u8>,
}

impl Namespaces {
    /// Starting from what the header already describes.
    pub fn from_header(h: &Header) -> Self {
        Self {
            known: h.sysctls.keys().copied().collect(),
            tries: HashMap::new(),
        }
    }

    pub fn known(&self, netns: u64) -> bool {
        self.known.contains(&netns)
    }

    /// The `sysctls` line of a namespace first seen in a failure of `pid`, read from inside it
    /// through that process (most likely still alive right after its failure). `None` when it
    /// is already described, or could not be entered (tried a few times, then given up).
    pub fn learn(&mut self, netns: u64, pid: u32) -> Option<SysctlsLine> {
        if self.known.contains(&netns) {
            return None;
        }
        let tries = self.tries.entry(netns).or_default();
        if *tries >= NETNS_TRIES {
            return None;
        }
        *tries += 1;
        match in_netns(netns, &netns_path(pid), || here(netns)) {
            Ok((sysctls, census)) => {
                self.known.insert(netns);
                Some(SysctlsLine {
                    ts: Some(Ts::now()),
                    netns: Some(netns),
                    sysctls: BTreeMap::from([(netns, sysctls)]),
                    census,
                })
            }
            Err(e) => {
                log::debug!("settings of network namespace {netns} (pid {pid}): {e}");
                None
            }
        }
    }
}
