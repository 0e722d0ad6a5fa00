//! Reading the source-NAT program's maps (`--catch nat`).
use super::*;

/// The NAT program's per-CPU counters (see `NAT_STATS` in the eBPF crate's nat.rs), summed.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct NatStats {
    /// Every drop kept by the program.
    pub drops: u64,
    /// Drops counted but not streamed (event budget, full ring buffer).
    pub unstreamed: u64,
    /// Drops whose key did not fit in `NAT_COUNTS` (in `drops`, in no entry).
    pub uncounted: u64,
    /// `__nf_conntrack_confirm` calls nested deeper than the per-CPU stack of the kprobe
    /// pair (their drops are missed), or stale entries it dropped (a return not seen).
    pub confirm_unmatched: u64,
}

impl Tracer {
    /// Whether the NAT program is attached.
    pub fn watches_nat(&self) -> bool {
        self.attached
            .iter()
            .any(|p| matches!(p.set, Set::NatBtf | Set::NatKprobe))
    }

    /// The exact NAT drop counts per (NAT namespace, destination, NAT address).
    pub fn nat_counts(&self) -> Result<Vec<(portexhaust_common::NatKey, u64)>> {
        let name = names::NAT_COUNTS;
        let map = self
            .ebpf
            .map(name)
            .ok_or(Error::MissingObject { kind: "map", name })?;
        let m: HashMap<&MapData, portexhaust_common::NatKey, u64> =
            HashMap::try_from(map).map_err(|source| Error::Map { map: name, source })?;
        Ok(m.iter().filter_map(|kv| kv.ok()).collect())
    }

    pub fn nat_stats(&self) -> Result<NatStats> {
        let name = "NAT_STATS";
        let map = self
            .ebpf
            .map(name)
            .ok_or(Error::MissingObject { kind: "map", name })?;
        let a: PerCpuArray<&MapData, [u64; 6]> =
            PerCpuArray::try_from(map).map_err(|source| Error::Map { map: name, source })?;
        let v = a
            .get(&0, 0)
            .map_err(|source| Error::Map { map: name, source })?;
        let mut s = NatStats::default();
        for cpu in v.iter() {
            s.drops += cpu[0];
            s.unstreamed += cpu[1];
            s.uncounted += cpu[2];
            s.confirm_unmatched += cpu[5];
        }
        Ok(s)
    }
}
