//! Facts about processes that the eBPF side cannot read portably, looked up in /proc.
use std::collections::HashMap;

pub use portexhaust_common::{netns_of, parse_ns_link};

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
    fn own_namespace_is_found_and_cached() {
        let me = std::process::id();
        let mut c = NetnsCache::default();
        let a = c.get(me);
        assert!(a.is_some());
        assert_eq!(c.get(me), a);
    }
}
