//! Reading the port settings and TIME_WAIT counters of a network namespace from `/proc`.
//!
//! All of `net.ipv4.*` read here is per network namespace (since Linux 4.x for the TCP ones),
//! and `/proc/sys/net` resolves against the namespace of the *calling thread*
//! (`net_ctl_header_lookup()` uses `current->nsproxy`). So another namespace is read from
//! inside it, through [`super::netns::in_netns`]: the rest of the process never moves.
use std::path::Path;

use crate::schema::{NetSysctls, TcpExtCounters, parse_port_range};

const SYSCTL_DIR: &str = "/proc/sys/net/ipv4";

fn read_trimmed(dir: &Path, name: &str) -> Option<String> {
    std::fs::read_to_string(dir.join(name))
        .ok()
        .map(|s| s.trim().to_string())
}

fn read_int(dir: &Path, name: &str) -> Option<i64> {
    read_trimmed(dir, name)?.parse().ok()
}

/// The settings of the calling thread's network namespace.
pub fn read_current() -> NetSysctls {
    read_from(Path::new(SYSCTL_DIR))
}

/// Read from a directory laid out like `/proc/sys/net/ipv4` (tests use fixtures).
pub fn read_from(dir: &Path) -> NetSysctls {
    NetSysctls {
        ip_local_port_range: read_trimmed(dir, "ip_local_port_range")
            .as_deref()
            .and_then(parse_port_range),
        ip_local_reserved_ports: read_trimmed(dir, "ip_local_reserved_ports"),
        tcp_tw_reuse: read_int(dir, "tcp_tw_reuse"),
        tcp_fin_timeout: read_int(dir, "tcp_fin_timeout"),
        tcp_max_tw_buckets: read_int(dir, "tcp_max_tw_buckets"),
        tcp_timestamps: read_int(dir, "tcp_timestamps"),
        tcp_tw_recycle: read_int(dir, "tcp_tw_recycle"),
    }
}

/// The TIME_WAIT counters of the calling thread's namespace (`/proc/thread-self/net` follows
/// the thread, whereas `/proc/self/net` follows the thread-group leader).
pub fn counters_current() -> Option<TcpExtCounters> {
    std::fs::read_to_string("/proc/thread-self/net/netstat")
        .ok()
        .map(|t| TcpExtCounters::from_netstat(&t))
}

/// `kernel.hostname` and `kernel.osrelease`, for records and audits.
pub fn host_and_kernel() -> (Option<String>, Option<String>) {
    let read = |p: &str| {
        std::fs::read_to_string(p)
            .ok()
            .map(|s| s.trim().to_string())
            .filter(|s| !s.is_empty())
    };
    (
        read("/proc/sys/kernel/hostname"),
        read("/proc/sys/kernel/osrelease"),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_a_fixture_directory() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/sysctl/tiny");
        let s = read_from(&dir);
        assert_eq!(s.ip_local_port_range, Some([40000, 40009]));
        assert_eq!(s.tcp_tw_reuse, Some(0));
        assert_eq!(s.tcp_tw_recycle, None);
        assert_eq!(s.ip_local_reserved_ports.as_deref(), Some(""));
    }

    #[test]
    fn this_namespace_has_a_range() {
        assert!(read_current().range().is_some());
    }
}
