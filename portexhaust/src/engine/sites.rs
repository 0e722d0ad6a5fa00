//! Call-site rows: the kernel's counts per (pid, stack, destination), their symbolised
//! frames, and the sockets each site holds now. Pure: everything comes in as data.
//!
//! Holds: a socket whose connect was walked carries its call site in the kernel (by 4-tuple),
//! which is exact. The other sockets of the same process and destination came from the
//! connects that were not walked, so they are shared out among its call sites in proportion
//! to each one's connects not walked, and the row says the holds are estimated.
use std::{
    collections::{BTreeMap, HashMap},
    net::SocketAddr,
    sync::Arc,
};

use portexhaust_common::{SiteRef, TcpState, TupleKey};

use super::census::{FdOwner, NsCensus, OwnerView, holder_pid, tuple_key, uses_range};
use crate::schema::{CallSite, Frame};

/// One key of the kernel's call-site counts.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SiteObs {
    pub pid: u32,
    /// None: not walked.
    pub stack_id: Option<u32>,
    /// 0: unknown (no BTF).
    pub netns: u64,
    pub dst: SocketAddr,
    pub connects: u64,
    pub bound: u64,
    pub failures: u64,
    /// Of `connects`, those whose own stack was walked.
    pub walked: u64,
}

/// One symbolised stack (the kernel layer symbolises; see `kernel::symbols`).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Stack {
    /// Innermost first.
    pub frames: Vec<Frame>,
    /// Why frames have no names, if none has one.
    pub note: Option<String>,
    /// The process's command when it was symbolised.
    pub comm: String,
}

/// Rows listed at most; the rest are the least busy.
pub const MAX_ROWS: usize = 50;

/// Exited processes that failed whose call sites are kept after they hold no port; beyond
/// this many, those that failed least are forgotten too (their failures stay in the exact
/// counts; only their call-site rows go).
pub const MAX_EXITED_SITE_PIDS: usize = 64;

/// Whose call sites a long run can forget, so that they do not pile up a process at a time (a
/// host that starts connecting processes all day would otherwise keep a symbolised stack per
/// process, ~4 KiB each, and fill the kernel's call-site map): processes that exited and hold
/// no port, unless they failed; of those that failed, all but the `MAX_EXITED_SITE_PIDS` that
/// failed most. `failures`: each process's failures at its call sites; `alive` and `holding`
/// (a socket still remembered as theirs): what keeps a process's rows.
pub fn pids_to_forget(
    failures: &BTreeMap<u32, u64>,
    alive: impl Fn(u32) -> bool,
    holding: &std::collections::HashSet<u32>,
) -> Vec<u32> {
    let mut forget = Vec::new();
    let mut failed = Vec::new();
    for (&pid, &n) in failures {
        if alive(pid) || holding.contains(&pid) {
            continue;
        }
        if n == 0 {
            forget.push(pid);
        } else {
            failed.push((n, pid));
        }
    }
    if failed.len() > MAX_EXITED_SITE_PIDS {
        // Most failures first; among equals the newest pids (pids grow until they wrap) stay.
        failed.sort_by(|a, b| b.cmp(a));
        forget.extend(failed[MAX_EXITED_SITE_PIDS..].iter().map(|&(_, pid)| pid));
    }
    forget.sort_unstable();
    forget
}

type Dest = (u32, u64, SocketAddr);

#[derive(Default, Clone, Copy)]
struct Held {
    established: u64,
    time_wait: u64,
}

impl Held {
    fn add(&mut self, state: TcpState) {
        if state == TcpState::TimeWait {
            self.time_wait += 1;
        } else {
            self.established += 1;
        }
    }
}

/// Everything the rows are built from.
pub struct Inputs<'a> {
    pub sites: &'a [SiteObs],
    pub stacks: &'a HashMap<(u32, u32), Arc<Stack>>,
    pub sock_sites: &'a HashMap<TupleKey, SiteRef>,
    pub census: &'a [NsCensus],
    pub owners: &'a HashMap<TupleKey, OwnerView>,
    pub fd_owners: &'a HashMap<u64, FdOwner>,
    /// Commands known from elsewhere (failures, holders), by pid.
    pub comms: &'a HashMap<u32, String>,
}

pub fn call_sites(i: &Inputs<'_>) -> Vec<CallSite> {
    // Merge keys that differ only by an unknown namespace? No: the kernel keys each connect
    // by its socket's namespace, so rows are as the kernel counted them.
    let mut rows: BTreeMap<(Dest, Option<u32>), CallSite> = BTreeMap::new();
    let mut unwalked: BTreeMap<(Dest, Option<u32>), u64> = BTreeMap::new();
    for s in i.sites {
        *unwalked
            .entry(((s.pid, s.netns, s.dst), s.stack_id))
            .or_default() += s.connects.saturating_sub(s.walked);
        let stack = s.stack_id.and_then(|id| i.stacks.get(&(s.pid, id)));
        let comm = i
            .comms
            .get(&s.pid)
            .cloned()
            .filter(|c| !c.is_empty())
            .or_else(|| stack.map(|st| st.comm.clone()))
            .unwrap_or_default();
        let row = rows
            .entry(((s.pid, s.netns, s.dst), s.stack_id))
            .or_insert_with(|| CallSite {
                pid: s.pid,
                comm,
                netns: (s.netns != 0).then_some(s.netns),
                dst: s.dst,
                stack_id: s.stack_id,
                frames: stack.map(|st| st.frames.clone()).unwrap_or_default(),
                symbols: match (s.stack_id, stack) {
                    (None, _) => None,
                    (Some(_), Some(st)) => st.note.clone(),
                    (Some(_), None) => Some("stack not symbolised yet".into()),
                },
                connects: 0,
                bound_connects: 0,
                failures: 0,
                holds_established: 0,
                holds_time_wait: 0,
                holds_estimated: false,
            });
        row.connects += s.connects;
        row.bound_connects += s.bound;
        row.failures += s.failures;
    }
    attribute_holds(i, &unwalked, &mut rows);
    let mut out = merge_same_code(rows.into_values());
    out.sort_by(|a, b| {
        (b.failures, b.holds(), b.connects)
            .cmp(&(a.failures, a.holds(), a.connects))
            .then_with(|| (a.pid, a.dst, a.stack_id).cmp(&(b.pid, b.dst, b.stack_id)))
    });
    out.truncate(MAX_ROWS);
    out
}

fn attribute_holds(
    i: &Inputs<'_>,
    unwalked: &BTreeMap<(Dest, Option<u32>), u64>,
    rows: &mut BTreeMap<(Dest, Option<u32>), CallSite>,
) {
    // Exact holds by walked site, and the unattributed rest, per process and destination.
    let mut exact: BTreeMap<(Dest, Option<u32>), Held> = BTreeMap::new();
    let mut rest: BTreeMap<Dest, Held> = BTreeMap::new();
    for ns in i.census {
        for row in ns.sockets.iter().filter(|r| uses_range(&ns.ports, r)) {
            let dst = SocketAddr::new(row.dst, row.dport);
            let tk = tuple_key(ns.netns, row);
            let walked = i
                .sock_sites
                .get(&tk)
                .or_else(|| i.sock_sites.get(&TupleKey { netns: 0, ..tk }));
            if let Some(r) = walked {
                // The opener is the walked connect's process, whoever holds the file now.
                let key = (
                    (r.pid, site_netns(rows, r.pid, ns.netns, dst), dst),
                    Some(r.stack_id),
                );
                exact.entry(key).or_default().add(row.state);
                continue;
            }
            let Some(pid) = holder_pid(ns.netns, row, i.owners, i.fd_owners) else {
                continue;
            };
            rest.entry((pid, site_netns(rows, pid, ns.netns, dst), dst))
                .or_default()
                .add(row.state);
        }
    }
    for (key, h) in &exact {
        if let Some(r) = rows.get_mut(key) {
            r.holds_established += h.established;
            r.holds_time_wait += h.time_wait;
        }
    }
    for (dest, h) in rest {
        let keys: Vec<(Dest, Option<u32>)> =
            rows.keys().filter(|(d, _)| *d == dest).cloned().collect();
        if keys.is_empty() {
            continue;
        }
        // Weights: each site's connects that were not walked (where these sockets came
        // from), else, if every connect was walked (a socket the kernel's map dropped), the
        // connects.
        let not_walked: Vec<u64> = keys
            .iter()
            .map(|k| unwalked.get(k).copied().unwrap_or(0))
            .collect();
        let weights: Vec<u64> = if not_walked.iter().sum::<u64>() > 0 {
            not_walked
        } else {
            keys.iter().map(|k| rows[k].connects).collect()
        };
        let est = share(h.established, &weights);
        let tw = share(h.time_wait, &weights);
        for ((k, e), t) in keys.iter().zip(est).zip(tw) {
            if let Some(r) = rows.get_mut(k) {
                r.holds_established += e;
                r.holds_time_wait += t;
                r.holds_estimated |= e + t > 0 && keys.len() > 1;
            }
        }
    }
}

/// One row per process, destination and code: stacks that differ only below the frames shown,
/// or by a JIT's tier (one function interpreted, then compiled), are one call site to a reader.
/// The first stack (most connects) keeps its id and frames.
fn merge_same_code(rows: impl Iterator<Item = CallSite>) -> Vec<CallSite> {
    let mut rows: Vec<CallSite> = rows.collect();
    rows.sort_by(|a, b| {
        b.connects
            .cmp(&a.connects)
            .then(a.stack_id.cmp(&b.stack_id))
    });
    let mut out: Vec<CallSite> = Vec::new();
    let mut at: HashMap<(u32, Option<u64>, SocketAddr, String), usize> = HashMap::new();
    for r in rows {
        let key = (r.pid, r.netns, r.dst, r.label());
        match at.get(&key) {
            Some(&i) => {
                let m = &mut out[i];
                m.connects += r.connects;
                m.bound_connects += r.bound_connects;
                m.failures += r.failures;
                m.holds_established += r.holds_established;
                m.holds_time_wait += r.holds_time_wait;
                m.holds_estimated |= r.holds_estimated;
            }
            None => {
                at.insert(key, out.len());
                out.push(r);
            }
        }
    }
    out
}

/// The namespace a call-site row of `pid` towards `dst` was counted under: the census's, or 0
/// where the kernel could not read namespaces.
fn site_netns(
    rows: &BTreeMap<(Dest, Option<u32>), CallSite>,
    pid: u32,
    netns: u64,
    dst: SocketAddr,
) -> u64 {
    let has = |n: u64| {
        rows.keys()
            .any(|((p, ns, d), _)| *p == pid && *ns == n && *d == dst)
    };
    if !has(netns) && has(0) { 0 } else { netns }
}

/// Split `n` by `weights` into whole parts that add up to `n` (largest remainders).
fn share(n: u64, weights: &[u64]) -> Vec<u64> {
    let total: u64 = weights.iter().sum();
    if total == 0 || n == 0 {
        let mut v = vec![0; weights.len()];
        if let Some(first) = v.first_mut() {
            *first = n;
        }
        return v;
    }
    let mut parts: Vec<(usize, u64, u128)> = weights
        .iter()
        .enumerate()
        .map(|(i, &w)| {
            let exact = u128::from(n) * u128::from(w);
            (
                i,
                (exact / u128::from(total)) as u64,
                exact % u128::from(total),
            )
        })
        .collect();
    let mut left = n - parts.iter().map(|p| p.1).sum::<u64>();
    parts.sort_by(|a, b| b.2.cmp(&a.2).then(a.0.cmp(&b.0)));
    for p in parts.iter_mut() {
        if left == 0 {
            break;
        }
        p.1 += 1;
        left -= 1;
    }
    parts.sort_by_key(|p| p.0);
    parts.into_iter().map(|p| p.1).collect()
}

#[cfg(test)]
mod tests {

    #[test]
    fn exited_idle_processes_are_forgotten_and_failers_bounded() {
        use std::collections::HashSet;
        let mut failures = BTreeMap::new();
        failures.insert(10, 0); // alive, idle: kept
        failures.insert(11, 0); // exited, idle: forgotten
        failures.insert(12, 0); // exited, still holds a TIME_WAIT socket: kept
        failures.insert(13, 5); // exited, failed: kept (under the bound)
        let holding = HashSet::from([12]);
        let alive = |p: u32| p == 10;
        assert_eq!(pids_to_forget(&failures, alive, &holding), [11]);
        // Over the bound, the exited failers that failed least go first.
        let mut many = BTreeMap::new();
        for pid in 0..(MAX_EXITED_SITE_PIDS as u32 + 3) {
            many.insert(1000 + pid, u64::from(pid % 7) + 1);
        }
        let gone = pids_to_forget(&many, |_| false, &HashSet::new());
        assert_eq!(gone.len(), 3);
        let least = many.values().min().copied().unwrap_or(0);
        assert!(gone.iter().all(|p| many[p] == least), "{gone:?}");
    }
    use super::*;
    use crate::engine::census::{PortSpace, SockRow};

    fn stack(f: &str) -> Arc<Stack> {
        Arc::new(Stack {
            frames: vec![Frame {
                addr: 1,
                function: Some(f.into()),
                module: Some("/tmp/client".into()),
                ..Default::default()
            }],
            note: None,
            comm: "client".into(),
        })
    }

    fn site(stack_id: Option<u32>, connects: u64, failures: u64) -> SiteObs {
        SiteObs {
            pid: 42,
            stack_id,
            netns: 7,
            dst: "10.0.0.9:80".parse().unwrap(),
            connects,
            bound: 0,
            failures,
            walked: if stack_id.is_some() {
                connects.min(3)
            } else {
                0
            },
        }
    }

    #[test]
    fn share_adds_up_and_follows_weights() {
        assert_eq!(share(10, &[1, 1]), vec![5, 5]);
        assert_eq!(share(10, &[3, 1]), vec![8, 2]);
        assert_eq!(share(1, &[0, 0]), vec![1, 0]);
        assert_eq!(share(7, &[1, 1, 1]).iter().sum::<u64>(), 7);
    }

    #[test]
    fn walked_sockets_are_exact_and_the_rest_follow_them() {
        let sites = vec![
            site(Some(1), 900, 30),
            site(Some(2), 1, 0),
            site(None, 99, 0),
        ];
        let stacks: HashMap<(u32, u32), Arc<Stack>> = [
            ((42, 1), stack("fetch_orders_leaky")),
            ((42, 2), stack("fetch_orders_pooled")),
        ]
        .into_iter()
        .collect();
        // 10 sockets held by pid 42 (by fd), 2 of them walked from site 1, 1 from site 2.
        let mut sockets = Vec::new();
        let mut fd_owners = HashMap::new();
        for i in 0..10u16 {
            let mut r = SockRow::fixture(
                &format!("10.0.0.1:{}", 40000 + i),
                "10.0.0.9:80",
                TcpState::Established,
            );
            r.inode = 100 + u64::from(i);
            fd_owners.insert(
                r.inode,
                FdOwner {
                    pid: 42,
                    comm: "client".into(),
                },
            );
            sockets.push(r);
        }
        let census = vec![NsCensus {
            netns: 7,
            ports: PortSpace::default(),
            sockets: sockets.clone(),
        }];
        let mut sock_sites = HashMap::new();
        for (i, id) in [(0, 1), (1, 1), (2, 2)] {
            sock_sites.insert(
                tuple_key(7, &sockets[i]),
                SiteRef {
                    pid: 42,
                    stack_id: id,
                },
            );
        }
        let rows = call_sites(&Inputs {
            sites: &sites,
            stacks: &stacks,
            sock_sites: &sock_sites,
            census: &census,
            owners: &HashMap::new(),
            fd_owners: &fd_owners,
            comms: &HashMap::new(),
        });
        assert_eq!(rows[0].stack_id, Some(1));
        assert!(rows[0].names("fetch_orders_leaky"));
        assert_eq!(rows[0].failures, 30);
        // 2 exact + the 7 unwalked shared by connects not walked, 897:0:99 (6 and 1).
        assert_eq!(rows[0].holds(), 2 + 6);
        assert!(rows[0].holds_estimated);
        // Its one connect was walked: its one socket is exact, and it gets none of the rest.
        let pooled = rows.iter().find(|r| r.stack_id == Some(2)).unwrap();
        assert_eq!((pooled.failures, pooled.holds()), (0, 1));
        let unknown = rows.iter().find(|r| r.stack_id.is_none()).unwrap();
        assert_eq!(unknown.holds(), 1);
        let total: u64 = rows.iter().map(CallSite::holds).sum();
        assert_eq!(total, 10, "every held socket is counted once");
        assert_eq!(rows.iter().map(|r| r.connects).sum::<u64>(), 1000);
    }
}
