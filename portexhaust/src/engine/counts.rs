//! Failure counts per (process, destination, errno), and offenders made of them.
//!
//! One accumulator, [`KeyCount`], serves every source of counts: the kernel's exact counts
//! (converted by the loader), the failure and tally lines of a record, and the recorder's own
//! tallies; [`offenders`] turns any of them into the same offender list.
use std::{collections::BTreeMap, net::SocketAddr};

use portexhaust_common::Cause;

use crate::schema::{DestCount, Errno, Offender, Proto, Ts};

/// One of the kernel's exact counts, keyed as finely as the kernel keys it (also by protocol
/// and cause). Metrics label by those; offenders and blame add them up into [`Key`]s.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Exact {
    pub id: ExactId,
    pub count: u64,
    /// Of `count`, failures not streamed as events (over the event budget, or dropped by a
    /// full ring buffer): what the tally lines account for.
    pub unstreamed: u64,
    pub first: Ts,
    pub last: Ts,
    /// The command name at the key's first failure.
    pub comm: String,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ExactId {
    pub pid: u32,
    pub dst: SocketAddr,
    pub errno: Errno,
    pub proto: Proto,
    pub cause: Cause,
}

impl ExactId {
    pub fn key(&self) -> Key {
        Key {
            pid: self.pid,
            dst: self.dst,
            errno: self.errno,
            cause: self.cause,
        }
    }
}

/// Exact counts added up per [`Key`].
pub fn of_exact<'a>(rows: impl IntoIterator<Item = &'a Exact>) -> Counts {
    let mut out = Counts::new();
    for e in rows {
        let c = KeyCount {
            count: e.count,
            first: Some(e.first),
            last: Some(e.last),
            comm: e.comm.clone(),
            netns: None,
        };
        tally(&mut out, e.id.key(), &c);
    }
    out
}

/// What the kernel counts failures by, as far as users are told.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Key {
    pub pid: u32,
    pub dst: SocketAddr,
    pub errno: Errno,
    pub cause: Cause,
}

/// Failures of one key.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct KeyCount {
    pub count: u64,
    pub first: Option<Ts>,
    pub last: Option<Ts>,
    pub comm: String,
    /// The process's network namespace, when something said so.
    pub netns: Option<u64>,
}

fn min_opt(a: Option<Ts>, b: Option<Ts>) -> Option<Ts> {
    match (a, b) {
        (Some(x), Some(y)) => Some(x.min(y)),
        (x, y) => x.or(y),
    }
}

fn max_opt(a: Option<Ts>, b: Option<Ts>) -> Option<Ts> {
    match (a, b) {
        (Some(x), Some(y)) => Some(x.max(y)),
        (x, y) => x.or(y),
    }
}

impl KeyCount {
    /// One failure at `ts`.
    pub fn add(&mut self, ts: Ts, comm: &str, netns: Option<u64>) {
        self.add_n(1, Some(ts), Some(ts), comm, netns);
    }

    /// `n` failures between `first` and `last`.
    pub fn add_n(
        &mut self,
        n: u64,
        first: Option<Ts>,
        last: Option<Ts>,
        comm: &str,
        netns: Option<u64>,
    ) {
        self.count += n;
        self.first = min_opt(self.first, first);
        self.last = max_opt(self.last, last);
        if self.comm.is_empty() {
            self.comm = comm.to_string();
        }
        if self.netns.is_none() {
            self.netns = netns;
        }
    }

    pub fn merge(&mut self, other: &KeyCount) {
        self.add_n(
            other.count,
            other.first,
            other.last,
            &other.comm,
            other.netns,
        );
    }
}

/// Counts per key, ordered (reports and snapshots are deterministic).
pub type Counts = BTreeMap<Key, KeyCount>;

/// Add `c` to the count of `key`.
pub fn tally(counts: &mut Counts, key: Key, c: &KeyCount) {
    counts.entry(key).or_default().merge(c);
}

/// The counts an offender list says: each offender's times apply to each of its destinations.
pub fn from_offenders<'a>(offenders: impl IntoIterator<Item = &'a Offender>) -> Counts {
    let mut out = Counts::new();
    for o in offenders {
        for d in &o.destinations {
            let c = KeyCount {
                count: d.failures,
                first: o.first_ts,
                last: o.last_ts,
                comm: o.comm.clone(),
                netns: o.netns,
            };
            tally(
                &mut out,
                Key {
                    pid: o.pid,
                    dst: d.dst,
                    errno: d.errno,
                    cause: d.cause,
                },
                &c,
            );
        }
    }
    out
}

/// Group counts into offenders: most failures first (then by pid), each with its destinations,
/// most failures first (then by destination, errno and cause). Keys with no failure are left out.
pub fn offenders<'a>(counts: impl IntoIterator<Item = (&'a Key, &'a KeyCount)>) -> Vec<Offender> {
    let mut by_pid: BTreeMap<u32, (Offender, KeyCount)> = BTreeMap::new();
    for (k, c) in counts {
        if c.count == 0 {
            continue;
        }
        let (o, acc) = by_pid.entry(k.pid).or_insert_with(|| {
            (
                Offender {
                    pid: k.pid,
                    comm: String::new(),
                    netns: None,
                    failures: 0,
                    first_ts: None,
                    last_ts: None,
                    destinations: Vec::new(),
                },
                KeyCount::default(),
            )
        });
        acc.merge(c);
        o.destinations.push(DestCount {
            dst: k.dst,
            errno: k.errno,
            cause: k.cause,
            failures: c.count,
        });
    }
    let mut out: Vec<Offender> = by_pid
        .into_values()
        .map(|(mut o, acc)| {
            o.failures = acc.count;
            o.first_ts = acc.first;
            o.last_ts = acc.last;
            o.comm = acc.comm;
            o.netns = acc.netns;
            // Two keys the kernel tells apart (protocol) can be one destination here.
            let mut merged: BTreeMap<(SocketAddr, Errno, Cause), u64> = BTreeMap::new();
            for d in o.destinations.drain(..) {
                *merged.entry((d.dst, d.errno, d.cause)).or_default() += d.failures;
            }
            o.destinations = merged
                .into_iter()
                .map(|((dst, errno, cause), failures)| DestCount {
                    dst,
                    errno,
                    cause,
                    failures,
                })
                .collect();
            o.destinations.sort_by(|a, b| {
                b.failures
                    .cmp(&a.failures)
                    .then_with(|| a.dst.cmp(&b.dst))
                    .then_with(|| a.errno.cmp(&b.errno))
                    .then_with(|| a.cause.cmp(&b.cause))
            });
            o
        })
        .collect();
    out.sort_by(|a, b| b.failures.cmp(&a.failures).then(a.pid.cmp(&b.pid)));
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(pid: u32, last_octet: u8, port: u16, errno: u32) -> Key {
        Key {
            pid,
            dst: SocketAddr::new([10, 0, 0, last_octet].into(), port),
            errno: Errno(errno),
            cause: portexhaust_common::Cause::Exhausted,
        }
    }

    fn val(count: u64, first: i128, last: i128, comm: &str) -> KeyCount {
        KeyCount {
            count,
            first: Some(Ts(first)),
            last: Some(Ts(last)),
            comm: comm.into(),
            netns: None,
        }
    }

    #[test]
    fn groups_counts_per_process_and_orders_by_failures() {
        let counts: Counts = [
            (key(7, 1, 27017, 99), val(5, 1000, 2000, "python3")),
            (key(7, 2, 27017, 99), val(20, 500, 3000, "python3")),
            (key(9, 1, 80, 98), val(3, 100, 200, "nginx")),
            (key(11, 1, 80, 99), val(40, 4000, 5000, "curl")),
            (key(12, 1, 80, 99), val(0, 1, 1, "nothing")),
        ]
        .into();
        let off = offenders(&counts);
        assert_eq!(off.len(), 3);
        assert_eq!(off[0].pid, 11);
        assert_eq!(off[1].pid, 7);
        assert_eq!(off[1].failures, 25);
        assert_eq!(off[1].first_ts, Some(Ts(500)));
        assert_eq!(off[1].last_ts, Some(Ts(3000)));
        assert_eq!(off[1].destinations[0].dst.to_string(), "10.0.0.2:27017");
        assert_eq!(off[1].destinations[0].failures, 20);
        assert_eq!(off[2].comm, "nginx");
        assert_eq!(off[2].destinations[0].errno, Errno(98));
    }

    #[test]
    fn offenders_read_back_as_the_same_counts() {
        let counts: Counts = [
            (key(7, 1, 80, 99), val(5, 1000, 3000, "a")),
            (key(7, 2, 80, 99), val(6, 1000, 3000, "a")),
        ]
        .into();
        let off = offenders(&counts);
        assert_eq!(offenders(&from_offenders(&off)), off);
    }
}
