//! Reading the programs' maps: the exact counts, the global counters, socket owners, the
//! processes and connect statistics.
use super::*;

impl Tracer {
    fn map_ref(&self, name: &'static str) -> Result<&aya::maps::Map> {
        self.ebpf
            .map(name)
            .ok_or(Error::MissingObject { kind: "map", name })
    }

    fn hash<K: aya::Pod, V: aya::Pod>(&self, name: &'static str) -> Result<Vec<(K, V)>> {
        let m: HashMap<&MapData, K, V> = HashMap::try_from(self.map_ref(name)?)
            .map_err(|source| Error::Map { map: name, source })?;
        let mut out = Vec::new();
        for kv in m.iter() {
            match kv {
                Ok(kv) => out.push(kv),
                // An entry deleted while iterating: nothing to read.
                Err(e) => debug!("{name} iteration: {e}"),
            }
        }
        Ok(out)
    }

    /// The exact per-(pid, destination, errno, cause) counts.
    pub fn counts(&self) -> Result<Vec<(CountKey, CountValue)>> {
        self.hash(names::COUNTS)
    }

    /// One global counter (`portexhaust_common::stat`), summed over CPUs.
    pub fn stat(&self, index: u32) -> Result<u64> {
        let map = self.map_ref(names::STATS)?;
        let a: PerCpuArray<&MapData, u64> =
            PerCpuArray::try_from(map).map_err(|source| Error::Map {
                map: names::STATS,
                source,
            })?;
        let v = a.get(&index, 0).map_err(|source| Error::Map {
            map: names::STATS,
            source,
        })?;
        Ok(v.iter().sum())
    }

    /// Every remembered socket owner by (netns, 4-tuple): sockets closed actively while tracing,
    /// through their TIME_WAIT.
    pub fn owners(&self) -> Result<Vec<(TupleKey, Owner)>> {
        self.hash(names::OWNERS)
    }

    /// Command and cgroup of every connecting process seen.
    pub fn procs(&self) -> Result<std::collections::HashMap<ProcKey, ProcInfo>> {
        Ok(self.hash(names::PROCS)?.into_iter().collect())
    }

    /// Keys of a map, counted without reading their values (one syscall per key).
    fn count_keys<K: aya::Pod, V: aya::Pod>(&self, name: &'static str) -> Result<u64> {
        let m: HashMap<&MapData, K, V> = HashMap::try_from(self.map_ref(name)?)
            .map_err(|source| Error::Map { map: name, source })?;
        Ok(m.keys().filter(|k| k.is_ok()).count() as u64)
    }

    /// Sockets whose active closer is remembered by 4-tuple (closing and TIME_WAIT).
    pub fn tracked_sockets(&self) -> Result<u64> {
        self.count_keys::<TupleKey, Owner>(names::OWNERS)
    }

    /// Forget owners whose TIME_WAIT is over (60 s, TCP_TIMEWAIT_LEN, fixed in the kernel).
    pub fn forget_owners(&mut self, keys: &[TupleKey]) -> Result<()> {
        let name = names::OWNERS;
        let map = self
            .ebpf
            .map_mut(name)
            .ok_or(Error::MissingObject { kind: "map", name })?;
        let mut m: HashMap<&mut MapData, TupleKey, Owner> =
            HashMap::try_from(map).map_err(|source| Error::Map { map: name, source })?;
        for k in keys {
            if m.remove(k).is_ok() {
                self.user_owner_deletes += 1;
            }
        }
        Ok(())
    }

    /// Forget call-site keys (of processes that exited, see `engine::sites::pids_to_forget`)
    /// and the stacks no remaining key refers to, so that neither map fills over a long run
    /// (a stack map's slots are only freed by deletion: a full one makes every new walk fail).
    pub fn forget_sites(&mut self, keys: &[SiteKey], stack_ids: &[u32]) -> Result<()> {
        let name = names::SITES;
        let map = self
            .ebpf
            .map_mut(name)
            .ok_or(Error::MissingObject { kind: "map", name })?;
        let mut m: HashMap<&mut MapData, SiteKey, SiteValue> =
            HashMap::try_from(map).map_err(|source| Error::Map { map: name, source })?;
        for k in keys {
            // Already gone (a racing delete) is the outcome wanted.
            let _ = m.remove(k);
        }
        let name = names::STACKS;
        let map = self
            .ebpf
            .map_mut(name)
            .ok_or(Error::MissingObject { kind: "map", name })?;
        let mut st: aya::maps::StackTraceMap<&mut MapData> =
            aya::maps::StackTraceMap::try_from(map)
                .map_err(|source| Error::Map { map: name, source })?;
        for id in stack_ids {
            let _ = st.remove(id);
        }
        Ok(())
    }

    /// Entries the LRU ownership maps dropped to make room (so attribution was lost):
    /// kernel insertions minus deletions minus what is still there.
    pub fn lru_evictions(&self) -> Result<u64> {
        self.lru_evictions_given(self.tracked_sockets()?)
    }

    /// [`Self::lru_evictions`] for a caller that has just counted the owners (the owner map is
    /// the largest: one walk is enough).
    pub fn lru_evictions_given(&self, owners: u64) -> Result<u64> {
        let pending = self.count_keys::<u64, [u64; 2]>(names::PENDING)?;
        let ins = self.stat(stat::OWNER_INSERTS)? + self.stat(stat::PENDING_INSERTS)?;
        let del = self.stat(stat::OWNER_DELETES)?
            + self.stat(stat::PENDING_DELETES)?
            + self.user_owner_deletes;
        Ok(ins.saturating_sub(del + owners + pending))
    }

    /// connect() counts and latency histograms per destination: the map, plus each CPU's run
    /// of connects not yet added to it (`ConnMemo`).
    pub fn dest_stats(&self) -> Result<Vec<(DestKey, DestTotals)>> {
        let mut out: Vec<(DestKey, DestTotals)> = self
            .hash::<DestKey, DestStats>(names::DEST_STATS)?
            .into_iter()
            .map(|(k, v)| {
                (
                    k,
                    DestTotals {
                        connects: v.connects,
                        hist: v.hist,
                    },
                )
            })
            .collect();
        let name = names::CONN_MEMO;
        let memo: PerCpuArray<&MapData, ConnMemo> = PerCpuArray::try_from(self.map_ref(name)?)
            .map_err(|source| Error::Map { map: name, source })?;
        let per_cpu = memo
            .get(&0, 0)
            .map_err(|source| Error::Map { map: name, source })?;
        for m in per_cpu.iter().filter(|m| m.pending > 0) {
            match out.iter_mut().find(|(k, _)| *k == m.key) {
                Some((_, t)) => t.connects += m.pending,
                None => out.push((
                    m.key,
                    DestTotals {
                        connects: m.pending,
                        hist: [0; LATENCY_BUCKETS],
                    },
                )),
            }
        }
        Ok(out)
    }

    /// Call-site counts per (pid, stack id, destination): the map, plus each CPU's run not yet
    /// added to it (`SiteMemo`). Empty when call sites are off.
    pub fn sites(&self) -> Result<Vec<(SiteKey, SiteValue)>> {
        let mut out: Vec<(SiteKey, SiteValue)> = self.hash(names::SITES)?;
        let name = names::SITE_MEMO;
        let memo: PerCpuArray<&MapData, SiteMemo> = PerCpuArray::try_from(self.map_ref(name)?)
            .map_err(|source| Error::Map { map: name, source })?;
        let per_cpu = memo
            .get(&0, 0)
            .map_err(|source| Error::Map { map: name, source })?;
        for m in per_cpu.iter() {
            let p = m.pending;
            if p.connects == 0 && p.failures == 0 {
                continue;
            }
            match out.iter_mut().find(|(k, _)| *k == m.key) {
                Some((_, v)) => {
                    v.connects += p.connects;
                    v.bound += p.bound;
                    v.failures += p.failures;
                    v.walked += p.walked;
                }
                None => out.push((m.key, p)),
            }
        }
        Ok(out)
    }

    /// The call site of each connection whose connect was walked, by 4-tuple.
    pub fn sock_sites(&self) -> Result<std::collections::HashMap<TupleKey, SiteRef>> {
        Ok(self.hash(names::SOCK_SITES)?.into_iter().collect())
    }

    /// The user-space return addresses of one stack, innermost first (empty: the id is not
    /// in the map, e.g. call sites are off).
    pub fn stack(&self, stack_id: u32) -> Result<Vec<u64>> {
        let name = names::STACKS;
        let m: aya::maps::StackTraceMap<&MapData> =
            aya::maps::StackTraceMap::try_from(self.map_ref(name)?)
                .map_err(|source| Error::Map { map: name, source })?;
        match m.get(&stack_id, 0) {
            Ok(st) => Ok(st.frames().iter().map(|f| f.ip).collect()),
            Err(aya::maps::MapError::KeyNotFound) => Ok(Vec::new()),
            Err(source) => Err(Error::Map { map: name, source }),
        }
    }

    pub fn failures_total(&self) -> Result<u64> {
        self.stat(stat::FAILURES)
    }
    pub fn dropped_events(&self) -> Result<u64> {
        self.stat(stat::RINGBUF_DROPS)
    }
    pub fn uncounted_keys(&self) -> Result<u64> {
        self.stat(stat::COUNT_MAP_FULL)
    }
    /// Failures over the events-per-second budget (counted, tallied, not streamed).
    pub fn suppressed(&self) -> Result<u64> {
        self.stat(stat::SUPPRESSED)
    }
    /// Kernel reads through BTF offsets that failed (offsets that do not fit this kernel).
    pub fn read_errors(&self) -> Result<u64> {
        self.stat(stat::READ_ERRORS)
    }
}
