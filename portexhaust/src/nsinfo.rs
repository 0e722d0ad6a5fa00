//! Network namespaces, their port sysctls and sockets, and which process holds which socket.
//!
//! sysctls under /proc/sys/net and sock_diag both answer for the network namespace of the
//! calling thread, so each namespace is read from a short-lived thread that first setns()es
//! into it: the rest of the process never changes namespace.
use std::{
    collections::{BTreeMap, HashMap},
    fs,
    os::fd::AsRawFd,
    path::PathBuf,
};

use serde::Serialize;

use crate::{
    procinfo::parse_ns_link,
    sockdiag::{SockRow, dump_tcp},
};

/// The port-related sysctls of one namespace.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct NsSysctls {
    pub ip_local_port_range: (u16, u16),
    /// `ip_local_reserved_ports` as ranges.
    pub reserved: Vec<(u16, u16)>,
    pub tcp_tw_reuse: Option<i64>,
    pub tcp_fin_timeout: Option<i64>,
    pub tcp_max_tw_buckets: Option<i64>,
}

impl Default for NsSysctls {
    fn default() -> Self {
        // The kernel's defaults (include/net/ip.h, inet_init_net).
        Self {
            ip_local_port_range: (32768, 60999),
            reserved: Vec::new(),
            tcp_tw_reuse: None,
            tcp_fin_timeout: None,
            tcp_max_tw_buckets: None,
        }
    }
}

/// Parse `ip_local_reserved_ports` ("8080,9000-9010"; empty when none).
pub fn parse_reserved(s: &str) -> Vec<(u16, u16)> {
    s.split(',')
        .filter_map(|part| {
            let part = part.trim();
            if part.is_empty() {
                return None;
            }
            match part.split_once('-') {
                Some((a, b)) => Some((a.trim().parse().ok()?, b.trim().parse().ok()?)),
                None => part.parse().ok().map(|p| (p, p)),
            }
        })
        .collect()
}

/// Parse `ip_local_port_range` ("32768\t60999").
pub fn parse_range(s: &str) -> Option<(u16, u16)> {
    let mut it = s.split_whitespace().map(|v| v.parse::<u16>());
    match (it.next(), it.next()) {
        (Some(Ok(lo)), Some(Ok(hi))) if lo <= hi => Some((lo, hi)),
        _ => None,
    }
}

fn read_i64(name: &str) -> Option<i64> {
    fs::read_to_string(format!("/proc/sys/net/ipv4/{name}"))
        .ok()?
        .trim()
        .parse()
        .ok()
}

/// The sysctls of the calling thread's namespace.
pub fn read_sysctls() -> NsSysctls {
    let d = NsSysctls::default();
    NsSysctls {
        ip_local_port_range: fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
            .ok()
            .and_then(|s| parse_range(&s))
            .unwrap_or(d.ip_local_port_range),
        reserved: fs::read_to_string("/proc/sys/net/ipv4/ip_local_reserved_ports")
            .map(|s| parse_reserved(&s))
            .unwrap_or_default(),
        tcp_tw_reuse: read_i64("tcp_tw_reuse"),
        tcp_fin_timeout: read_i64("tcp_fin_timeout"),
        tcp_max_tw_buckets: read_i64("tcp_max_tw_buckets"),
    }
}

/// Everything known about one namespace at one moment.
#[derive(Clone, Debug)]
pub struct NsCensus {
    pub netns: u64,
    pub sysctls: NsSysctls,
    pub sockets: Vec<SockRow>,
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
        let path = PathBuf::from(format!("/proc/{pid}/ns/net"));
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
pub fn resolve_netns(arg: &str) -> Result<(u64, PathBuf), String> {
    if let Ok(ino) = arg.parse::<u64>() {
        return namespaces()
            .remove(&ino)
            .map(|p| (ino, p))
            .ok_or_else(|| format!("no process lives in network namespace {ino}"));
    }
    let path = PathBuf::from(arg);
    let meta = fs::metadata(&path).map_err(|e| format!("{arg}: {e}"))?;
    use std::os::unix::fs::MetadataExt;
    Ok((meta.ino(), path))
}

/// Read sysctls and sockets of the namespace behind `path`.
pub fn census_of(netns: u64, path: &std::path::Path) -> std::io::Result<NsCensus> {
    // Our own namespace needs no setns(), which needs CAP_SYS_ADMIN: a tracer confined to
    // CAP_BPF/CAP_PERFMON (deploy/portexhaust.service) still sees its own namespace.
    if crate::procinfo::netns_of(std::process::id()) == Some(netns) {
        return Ok(NsCensus {
            netns,
            sysctls: read_sysctls(),
            sockets: dump_tcp()?,
        });
    }
    let file = fs::File::open(path)?;
    let handle = std::thread::spawn(move || -> std::io::Result<NsCensus> {
        // SAFETY: a namespace fd we opened; CLONE_NEWNET setns affects only this thread,
        // which ends right after.
        if unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(NsCensus {
            netns,
            sysctls: read_sysctls(),
            sockets: dump_tcp()?,
        })
    });
    handle
        .join()
        .map_err(|_| std::io::Error::other("census thread panicked"))?
}

/// Census of the given namespaces, or of every namespace with processes. A namespace that
/// vanished meanwhile is skipped.
pub fn census(only: Option<&[(u64, PathBuf)]>) -> Vec<NsCensus> {
    let targets: Vec<(u64, PathBuf)> = match only {
        Some(v) => v.to_vec(),
        None => namespaces().into_iter().collect(),
    };
    targets
        .iter()
        .filter_map(|(ino, path)| match census_of(*ino, path) {
            Ok(c) => Some(c),
            Err(e) => {
                log::debug!("census of netns {ino}: {e}");
                None
            }
        })
        .collect()
}

/// A process holding a socket file.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FdOwner {
    pub pid: u32,
    pub comm: String,
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
    fn parses_sysctl_formats() {
        assert_eq!(parse_range("32768\t60999\n"), Some((32768, 60999)));
        assert_eq!(parse_range("40000 40009"), Some((40000, 40009)));
        assert_eq!(parse_range("5 4"), None);
        assert_eq!(parse_range("x"), None);
        assert_eq!(parse_reserved("\n"), vec![]);
        assert_eq!(
            parse_reserved("8080,9000-9010\n"),
            vec![(8080, 8080), (9000, 9010)]
        );
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
        let mine = crate::procinfo::netns_of(std::process::id()).expect("netns");
        assert!(ns.contains_key(&mine));
    }
}
