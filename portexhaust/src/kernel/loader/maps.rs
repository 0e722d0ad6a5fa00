//! Reading the programs' maps: the exact counts, the global counters, socket owners, the
//! processes and connect statistics.
use super::*;

impl Tracer {
    fn map_ref(&self, name: &'static str) -> Result<&aya::maps::Map> {
        self.ebpf
            .map(name)
            .ok_or(Error::MissingObject { kind: "map", name })
    }

    fn map_mut_ref(&mut self, name: &'static str) -> Result<&mut aya::maps::Map> {
        self.ebpf
            .map_mut(name)
            .ok_or(Error::MissingObject { kind: "map", name })
    }

    /// A hash map of the programs', to delete from.
    fn hash_mut<K: aya::Pod, V: aya::Pod>(
        &mut self,
        name: &'static str,
    ) -> Result<HashMap<&mut MapData, K, V>> {
        HashMap::try_from(self.map_mut_ref(name)?)
            .map_err(|source| Error::Map { map: name, source })
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

    /// The exact per-(pid, destination, errno, cause) counts: the kernel's, with those of
    /// exited processes that were moved out of it added back.
    pub fn counts(&self) -> Result<Vec<(CountKey, CountValue)>> {
        let live = self.hash(names::COUNTS)?;
        if self.retired.is_empty() {
            return Ok(live);
        }
        Ok(merge_counts(&self.retired, live))
    }

    /// Move the counts of exited processes out of the kernel's `COUNTS` once it is half full,
    /// so that a host that starts failing processes all day keeps counting each of them (a
    /// full map counts new keys only in `uncounted_keys`). Nothing is lost: `counts()` adds
    /// them back. Each key is read again just before it is deleted; a failure of a reused pid
    /// towards the same destination in between (microseconds) would be the only one missed.
    /// User space keeps at most `MAX_RETIRED` keys: past that, the kernel map fills as before.
    /// Returns the keys moved.
    pub fn retire_exited_counts(&mut self, alive: impl Fn(u32) -> bool) -> Result<usize> {
        let name = names::COUNTS;
        let listed: Vec<(CountKey, CountValue)> = self.hash(name)?;
        if (listed.len() as u64) * 2 < u64::from(self.count_capacity) {
            return Ok(0);
        }
        let room = MAX_RETIRED.saturating_sub(self.retired.len());
        let dead: Vec<CountKey> = listed
            .iter()
            .map(|(k, _)| *k)
            .filter(|k| !alive(k.pid))
            .take(room)
            .collect();
        if dead.is_empty() {
            return Ok(0);
        }
        let mut m = self.hash_mut::<CountKey, CountValue>(name)?;
        let mut moved = Vec::with_capacity(dead.len());
        for k in dead {
            let Ok(v) = m.get(&k, 0) else {
                continue; // gone meanwhile
            };
            if let Err(e) = m.remove(&k) {
                debug!("retiring a count key: {e}");
                continue;
            }
            moved.push((k, v));
        }
        let n = moved.len();
        for (k, v) in moved {
            add_count(
                self.retired
                    .entry(k)
                    .or_insert(CountValue { count: 0, ..v }),
                &v,
            );
        }
        if n > 0 {
            debug!(
                "moved the counts of {n} exited process key(s) to user space ({} kept)",
                self.retired.len()
            );
        }
        Ok(n)
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
        let mut m = self.hash_mut::<TupleKey, Owner>(names::OWNERS)?;
        let deleted = keys.iter().filter(|k| m.remove(k).is_ok()).count() as u64;
        self.user_owner_deletes += deleted;
        Ok(())
    }

    /// Forget call-site keys (of processes that exited, see `engine::sites::pids_to_forget`)
    /// and the stacks no remaining key refers to, so that neither map fills over a long run
    /// (a stack map's slots are only freed by deletion: a full one makes every new walk fail).
    pub fn forget_sites(&mut self, keys: &[SiteKey], stack_ids: &[u32]) -> Result<()> {
        let mut m = self.hash_mut::<SiteKey, SiteValue>(names::SITES)?;
        for k in keys {
            // Already gone (a racing delete) is the outcome wanted.
            let _ = m.remove(k);
        }
        let name = names::STACKS;
        let map = self.map_mut_ref(name)?;
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

/// Most count keys of exited processes kept in user space (about 80 bytes each).
pub const MAX_RETIRED: usize = 65_536;

/// Add `v`'s failures to `into`: counts and unstreamed add up, the first and last times
/// widen, and the first key's command name stays.
fn add_count(into: &mut CountValue, v: &CountValue) {
    if into.count == 0 {
        *into = *v;
        return;
    }
    into.count += v.count;
    into.unstreamed += v.unstreamed;
    into.first_ns = into.first_ns.min(v.first_ns);
    into.last_ns = into.last_ns.max(v.last_ns);
}

/// The kernel's counts with the retired ones added: a key can be in both when a pid was
/// reused and failed towards the same destination again.
fn merge_counts(
    retired: &std::collections::HashMap<CountKey, CountValue>,
    live: Vec<(CountKey, CountValue)>,
) -> Vec<(CountKey, CountValue)> {
    let mut all = retired.clone();
    for (k, v) in live {
        add_count(all.entry(k).or_insert(CountValue { count: 0, ..v }), &v);
    }
    all.into_iter().collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(pid: u32) -> CountKey {
        CountKey {
            pid,
            dport: 5000,
            family: portexhaust_common::AF_INET,
            errno: 99,
            proto: 6,
            cause: 0,
            _pad: [0; 4],
            daddr: [127, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0],
        }
    }

    fn val(count: u64, first: u64, last: u64, comm: &str) -> CountValue {
        let mut c = [0u8; portexhaust_common::COMM_LEN];
        c[..comm.len()].copy_from_slice(comm.as_bytes());
        CountValue {
            count,
            first_ns: first,
            last_ns: last,
            comm: c,
            unstreamed: count / 2,
        }
    }

    #[test]
    fn retired_counts_add_back_exactly() {
        let mut retired = std::collections::HashMap::new();
        retired.insert(key(7), val(10, 100, 200, "old"));
        retired.insert(key(8), val(3, 50, 60, "gone"));
        // pid 7 reused, failing again towards the same destination; pid 9 only in the kernel.
        let live = vec![
            (key(7), val(4, 300, 400, "new")),
            (key(9), val(1, 5, 5, "x")),
        ];
        let mut m = merge_counts(&retired, live);
        m.sort_by_key(|(k, _)| k.pid);
        let total: u64 = m.iter().map(|(_, v)| v.count).sum();
        assert_eq!(total, 18, "nothing lost, nothing twice");
        let (_, v7) = m[0];
        assert_eq!((v7.count, v7.unstreamed), (14, 7));
        assert_eq!((v7.first_ns, v7.last_ns), (100, 400));
        assert_eq!(&v7.comm[..3], b"old", "the first command name stays");
        assert_eq!(m.len(), 3);
    }
}
