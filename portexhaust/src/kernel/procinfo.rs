//! Facts about processes that the eBPF side cannot read portably, looked up in /proc.
use std::collections::HashMap;

/// Parse the target of a `/proc/<pid>/ns/net` link: `net:[4026531840]` -> 4026531840.
pub fn parse_ns_link(link: &str) -> Option<u64> {
    link.strip_prefix("net:[")?.strip_suffix(']')?.parse().ok()
}

pub fn netns_of(pid: u32) -> Option<u64> {
    let link = std::fs::read_link(format!("/proc/{pid}/ns/net")).ok()?;
    parse_ns_link(link.to_str()?)
}

/// Network namespace per pid, cached: a failure storm comes from few processes and must not
/// cost a readlink per event. Reading struct net from the kernel would need per-build offsets
/// (no CO-RE in Rust eBPF), so the namespace is learnt here while the process is alive; a
/// process that exited before its first event was read has none (`null`).
#[derive(Default)]
pub struct NetnsCache {
    by_pid: HashMap<u32, Option<u64>>,
}

impl NetnsCache {
    const MAX: usize = 8192;

    pub fn get(&mut self, pid: u32) -> Option<u64> {
        if let Some(v) = self.by_pid.get(&pid) {
            return *v;
        }
        if self.by_pid.len() >= Self::MAX {
            self.by_pid.clear();
        }
        let v = netns_of(pid);
        self.by_pid.insert(pid, v);
        v
    }
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
    fn own_namespace_is_found_and_cached() {
        let me = std::process::id();
        let mut c = NetnsCache::default();
        let a = c.get(me);
        assert!(a.is_some());
        assert_eq!(c.get(me), a);
    }
}
