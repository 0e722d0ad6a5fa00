//! Blame for failures: for each destination that saw failures, who failed there and who holds
//! its ports in the failers' namespace. Pure.
use std::{
    collections::{BTreeMap, HashMap},
    net::SocketAddr,
};

use super::{
    census::{DestUsage, PortSpace, sort_holders},
    counts::Counts,
};
use crate::schema::{Attribution, BlameEntry, ByState, Failer, Holder};

/// Join the failure counts with the port usage of the failers' namespaces. `netns_of_pid`
/// says where a failer ran (None: unknown, so every namespace's rows for that destination
/// count); `ports` is the port space of the namespaces whose settings are known.
pub fn blame(
    counts: &Counts,
    netns_of_pid: &dyn Fn(u32) -> Option<u64>,
    ports: &HashMap<u64, PortSpace>,
    usage: &[DestUsage],
) -> Vec<BlameEntry> {
    let mut by_dst: BTreeMap<(SocketAddr, Option<u64>), BTreeMap<u32, Failer>> = BTreeMap::new();
    for (k, c) in counts {
        if c.count == 0 {
            continue;
        }
        let f = by_dst
            .entry((k.dst, netns_of_pid(k.pid).or(c.netns)))
            .or_default()
            .entry(k.pid)
            .or_insert_with(|| Failer {
                pid: k.pid,
                comm: c.comm.clone(),
                failures: 0,
                container: None,
            });
        f.failures += c.count;
    }
    let mut out: Vec<BlameEntry> = by_dst
        .into_iter()
        .map(|((dst, netns), failers)| {
            let rows: Vec<&DestUsage> = usage
                .iter()
                .filter(|u| u.dst == dst && netns.is_none_or(|n| n == u.netns))
                .collect();
            let mut by_state = ByState::new();
            let mut holders: BTreeMap<(Option<u32>, String, Attribution), Holder> = BTreeMap::new();
            let mut in_use = 0;
            for u in &rows {
                in_use += u.in_use;
                for (s, n) in &u.by_state {
                    *by_state.entry(*s).or_default() += n;
                }
                for h in &u.holders {
                    holders
                        .entry((h.pid, h.comm.clone(), h.attribution))
                        .or_insert_with(|| h.empty_like())
                        .absorb(h);
                }
            }
            let mut holders: Vec<Holder> = holders.into_values().collect();
            for h in &mut holders {
                h.share = h.sockets as f64 / in_use.max(1) as f64;
            }
            sort_holders(&mut holders);
            let mut failers: Vec<Failer> = failers.into_values().collect();
            failers.sort_by(|a, b| b.failures.cmp(&a.failures).then(a.pid.cmp(&b.pid)));
            let range_size = rows
                .first()
                .map(|u| u.range_size)
                .or_else(|| netns.and_then(|n| ports.get(&n)).map(PortSpace::usable));
            BlameEntry {
                dst,
                netns,
                range_size,
                in_use,
                by_state,
                failers,
                holders,
            }
        })
        .collect();
    out.sort_by(|a, b| {
        b.failures()
            .cmp(&a.failures())
            .then_with(|| a.dst.cmp(&b.dst))
    });
    out
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use portexhaust_common::{OWNER_TIME_WAIT, TcpState};

    use super::*;
    use crate::{
        engine::{
            census::{NsCensus, OwnerView, SockRow, tuple_key, usage},
            counts::{Key, KeyCount},
        },
        schema::{Errno, Ts},
    };

    #[test]
    fn blame_joins_failers_with_holders() {
        let rows = vec![
            SockRow::fixture("127.0.0.1:40000", "127.0.0.1:5000", TcpState::TimeWait),
            SockRow::fixture("127.0.0.1:40001", "127.0.0.1:5000", TcpState::TimeWait),
        ];
        let space = PortSpace {
            range: (40000, 40009),
            reserved: vec![],
            ..PortSpace::default()
        };
        let c = vec![NsCensus {
            netns: 7,
            ports: space.clone(),
            sockets: rows.clone(),
        }];
        let mut owners = HashMap::new();
        for r in &rows {
            owners.insert(
                tuple_key(7, r),
                OwnerView {
                    pid: 100,
                    cgroup_id: 0,
                    comm: "churner".into(),
                    alive: false,
                    flags: OWNER_TIME_WAIT,
                    closed_ns: 1,
                },
            );
        }
        let u = usage(&c, &owners, &HashMap::new());
        let counts: Counts = [(
            Key {
                pid: 200,
                dst: "127.0.0.1:5000".parse().expect("addr"),
                errno: Errno::EADDRNOTAVAIL,
                cause: portexhaust_common::Cause::Exhausted,
            },
            KeyCount {
                count: 7,
                first: Some(Ts(0)),
                last: Some(Ts(0)),
                comm: "failer".into(),
                netns: None,
            },
        )]
        .into();
        let sc: HashMap<u64, PortSpace> = [(7, space)].into();
        let b = blame(&counts, &|_| Some(7), &sc, &u);
        assert_eq!(b.len(), 1);
        assert_eq!(b[0].dst.to_string(), "127.0.0.1:5000");
        assert_eq!(b[0].in_use, 2);
        assert_eq!(b[0].range_size, Some(10));
        assert_eq!(
            b[0].failers,
            vec![Failer {
                pid: 200,
                comm: "failer".into(),
                failures: 7,
                container: None,
            }]
        );
        assert_eq!(b[0].holders[0].pid, Some(100));
        assert_eq!(b[0].holders[0].time_wait, 2);
        assert!((b[0].holders[0].share - 1.0).abs() < 1e-9);
        // A failer in another namespace does not get this namespace's holders, and the
        // range of a namespace nobody could read is unknown, not empty.
        let b = blame(&counts, &|_| Some(8), &sc, &u);
        assert_eq!(b[0].in_use, 0);
        assert!(b[0].holders.is_empty());
        assert_eq!(b[0].range_size, None);
        assert_eq!(b[0].utilisation(), None);
    }
}
