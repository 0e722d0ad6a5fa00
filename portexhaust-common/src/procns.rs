//! User space only (`std` feature): the network namespace of a process, looked up in /proc.
//! The eBPF side cannot read it portably, and the tracer and the workloads both need it.
use std::format;

/// Parse the target of a `/proc/<pid>/ns/net` link: `net:[4026531840]` -> 4026531840.
pub fn parse_ns_link(link: &str) -> Option<u64> {
    link.strip_prefix("net:[")?.strip_suffix(']')?.parse().ok()
}

/// The network namespace (inode number) of process `pid`; `None` when the process is gone or
/// its namespace link cannot be read.
pub fn netns_of(pid: u32) -> Option<u64> {
    let link = std::fs::read_link(format!("/proc/{pid}/ns/net")).ok()?;
    parse_ns_link(link.to_str()?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_namespace_links() {
        assert_eq!(parse_ns_link("net:[4026531840]"), Some(4026531840));
        assert_eq!(parse_ns_link("mnt:[4026531840]"), None);
        assert_eq!(parse_ns_link("net:[x]"), None);
    }

    #[test]
    fn own_namespace_is_found() {
        let me = std::process::id();
        let a = netns_of(me);
        assert!(a.is_some());
        assert_eq!(netns_of(me), a);
    }
}
