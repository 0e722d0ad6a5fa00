//! Network namespaces, their port sysctls and sockets, and which process holds which socket.
//!
//! sysctls under /proc/sys/net and sock_diag both answer for the network namespace of the
//! calling thread, so another namespace is read from a short-lived thread that first setns()es
//! into it ([`in_netns`]): the rest of the process never changes namespace.
use std::{
    collections::{BTreeMap, HashMap},
    fs, io,
    os::fd::AsRawFd,
    path::{Path, PathBuf},
};

use thiserror::Error;

use super::{procinfo::parse_ns_link, sockdiag::dump_tcp, sysctl};
use crate::engine::census::{FdOwner, NsCensus, PortSpace};

/// The census of the calling thread's namespace, `netns`, with its port space from `sysctls`.
pub fn census_here(netns: u64, sysctls: &crate::schema::NetSysctls) -> io::Result<NsCensus> {
    Ok(NsCensus {
        netns,
        ports: PortSpace::from(sysctls),
        sockets: dump_tcp()?,
    })
}

/// A `--netns` argument that names no namespace.
#[derive(Debug, Error)]
pub enum NetnsArgError {
    #[error("no process lives in network namespace {0}")]
    NoProcess(u64),
    #[error("{arg}: {source}")]
    Path {
        arg: String,
        #[source]
        source: io::Error,
    },
}

/// Network namespaces that have processes, each with the path of a handle to it.
pub fn namespaces() -> BTreeMap<u64, PathBuf> {
    let mut out = BTreeMap::new();
    let Ok(dir) = fs::read_dir("/proc") else {
        return out;
    };
    for e in dir.flatten() {
        let name = e.file_name();
        let Some(pid) = name
            .to_str()
            .filter(|n| n.bytes().all(|b| b.is_ascii_digit()))
        else {
            continue;
        };
        let Ok(pid) = pid.parse() else { continue };
        let path = netns_path(pid);
        if let Some(ino) = fs::read_link(&path)
            .ok()
            .and_then(|l| l.to_str().and_then(parse_ns_link))
        {
            out.entry(ino).or_insert(path);
        }
    }
    out
}

/// Resolve a `--netns` argument: an inode number (of a namespace that has processes) or a path
/// (`/run/netns/NAME`, `/proc/PID/ns/net`).
pub fn resolve_netns(arg: &str) -> Result<(u64, PathBuf), NetnsArgError> {
    if let Ok(ino) = arg.parse::<u64>() {
        return namespaces()
            .remove(&ino)
            .map(|p| (ino, p))
            .ok_or(NetnsArgError::NoProcess(ino));
    }
    let path = PathBuf::from(arg);
    let meta = fs::metadata(&path).map_err(|source| NetnsArgError::Path {
        arg: arg.to_string(),
        source,
    })?;
    use std::os::unix::fs::MetadataExt;
    Ok((meta.ino(), path))
}

/// `/proc/PID/ns/net`: a handle to the network namespace of a process.
pub fn netns_path(pid: u32) -> PathBuf {
    PathBuf::from(format!("/proc/{pid}/ns/net"))
}

/// Run `f` inside the network namespace `netns`, whose handle is `path` (`/proc/PID/ns/net`,
/// `/run/netns/NAME`), on a short-lived thread that setns()es into it; the calling thread and
/// the rest of the process stay where they are.
///
/// Our own namespace is read on the calling thread without setns(), which needs
/// CAP_SYS_ADMIN: a tracer confined to CAP_BPF/CAP_PERFMON (deploy/portexhaust.service) still
/// sees its own namespace.
pub fn in_netns<T: Send>(netns: u64, path: &Path, f: impl FnOnce() -> T + Send) -> io::Result<T> {
    if crate::kernel::procinfo::netns_of(std::process::id()) == Some(netns) {
        return Ok(f());
    }
    let ns = fs::File::open(path)?;
    std::thread::scope(|s| {
        s.spawn(|| {
            // SAFETY: a namespace fd we opened; CLONE_NEWNET setns affects only this thread,
            // which ends right after.
            if unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
                return Err(io::Error::last_os_error());
            }
            Ok(f())
        })
        .join()
        .unwrap_or_else(|_| Err(io::Error::other("namespace reader thread panicked")))
    })
}

/// Read sysctls and sockets of the namespace behind `path`; `Ok(None)` when the namespace
/// vanished (its last process exited) before it could be entered.
pub fn census_of(netns: u64, path: &Path) -> io::Result<Option<NsCensus>> {
    match in_netns(netns, path, || census_here(netns, &sysctl::read_current())) {
        Ok(census) => census.map(Some),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e),
    }
}

/// Census of the given namespaces, or of every namespace with processes. A namespace that
/// vanished meanwhile is skipped.
pub fn census(only: Option<&[(u64, PathBuf)]>) -> Vec<NsCensus> {
    let targets: Vec<(u64, PathBuf)> = match only {
        Some(v) => v.to_vec(),
        None => namespaces().into_iter().collect(),
    };
    let mut warned = false;
    targets
        .iter()
        .filter_map(|(ino, path)| match census_of(*ino, path) {
            Ok(c) => c,
            Err(e) => {
                if !std::mem::replace(&mut warned, true) {
                    log::warn!("{}", census_error(*ino, &e));
                } else {
                    log::debug!("census of netns {ino}: {e}");
                }
                None
            }
        })
        .collect()
}

/// One line that says why a namespace could not be listed and what to do.
fn census_error(ino: u64, e: &io::Error) -> String {
    let hint = match e.raw_os_error() {
        // sock_diag answers ENOENT/EPROTONOSUPPORT... as a netlink error when no handler for
        // TCP is registered: tcp_diag (and inet_diag) are modules on many distributions and
        // are normally autoloaded, which needs modprobe.
        Some(libc::ENOENT) | Some(libc::EPROTONOSUPPORT) | Some(libc::EINVAL) => {
            "; load the socket-diagnostics modules: modprobe tcp_diag inet_diag"
        }
        Some(libc::EPERM) => "; listing other namespaces needs CAP_SYS_ADMIN (setns)",
        _ => "",
    };
    format!("cannot list the sockets of network namespace {ino}: {e}{hint}")
}

pub fn comm_of(pid: u32) -> Option<String> {
    fs::read_to_string(format!("/proc/{pid}/comm"))
        .ok()
        .map(|s| s.trim_end().to_string())
}

/// Socket inode -> first process found holding it (scans /proc/*/fd; needs root).
pub fn socket_owners() -> HashMap<u64, FdOwner> {
    let mut out = HashMap::new();
    let Ok(dir) = fs::read_dir("/proc") else {
        return out;
    };
    for e in dir.flatten() {
        let Some(pid) = e.file_name().to_str().and_then(|n| n.parse::<u32>().ok()) else {
            continue;
        };
        let Ok(fds) = fs::read_dir(format!("/proc/{pid}/fd")) else {
            continue;
        };
        let mut comm = None;
        for fd in fds.flatten() {
            let Ok(link) = fs::read_link(fd.path()) else {
                continue;
            };
            let Some(ino) = link
                .to_str()
                .and_then(|l| l.strip_prefix("socket:["))
                .and_then(|l| l.strip_suffix(']'))
                .and_then(|l| l.parse::<u64>().ok())
            else {
                continue;
            };
            let comm = comm.get_or_insert_with(|| comm_of(pid).unwrap_or_default());
            out.entry(ino).or_insert_with(|| FdOwner {
                pid,
                comm: comm.clone(),
            });
        }
    }
    out
}

/// Start time of a process in ns since boot (from /proc/PID/stat, clock ticks), to tell a
/// live process from a new one that reused its pid.
pub fn start_time_ns(pid: u32) -> Option<u64> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // comm may contain spaces and parentheses: fields resume after the last ')'.
    let rest = &stat[stat.rfind(')')? + 2..];
    // After ")" the fields are numbered from 3 (state); starttime is field 22.
    let ticks: u64 = rest.split_whitespace().nth(22 - 3)?.parse().ok()?;
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    let hz = if hz > 0 { hz as u64 } else { 100 };
    Some(ticks * (1_000_000_000 / hz))
}

/// Is `pid` still the process that started at `start_ns` (ns since boot; 0 = unknown)?
pub fn is_alive(pid: u32, start_ns: u64) -> bool {
    match start_time_ns(pid) {
        None => false,
        Some(_) if start_ns == 0 => true,
        // /proc has clock-tick resolution (10 ms at 100 Hz): compare within one tick.
        Some(t) => t.abs_diff(start_ns) < 20_000_000,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn own_namespace_can_be_entered() {
        // Our own namespace is read without setns() (which needs CAP_SYS_ADMIN); a setns()
        // that fails must come back as an error rather than a panic.
        let me = std::process::id();
        let ns = crate::kernel::procinfo::netns_of(me).expect("netns");
        match in_netns(ns, &netns_path(me), sysctl::read_current) {
            Ok(s) => assert_eq!(s, sysctl::read_current()),
            Err(e) => assert_eq!(e.raw_os_error(), Some(libc::EPERM), "{e}"),
        }
    }

    #[test]
    fn own_process_is_alive_and_has_a_start_time() {
        let me = std::process::id();
        let t = start_time_ns(me).expect("start time");
        assert!(is_alive(me, t));
        assert!(is_alive(me, 0));
        assert!(!is_alive(me, t + 5_000_000_000));
        assert!(!is_alive(u32::MAX - 1, 0));
    }

    #[test]
    fn own_namespace_is_listed() {
        let ns = namespaces();
        let mine = crate::kernel::procinfo::netns_of(std::process::id()).expect("netns");
        assert!(ns.contains_key(&mine));
    }
}
