//! Source-NAT exhaustion one hop away: from the kernel's drops, the clients found behind them
//! and the NAT's own conntrack view to the `nat` section of a summary, its offenders, and the
//! `nf_nat` failure lines. Pure: what the kernel layer found comes in as data.
use std::{
    collections::{BTreeMap, HashMap},
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
};

use portexhaust_common::{AF_INET, Backend, Cause, NatEvent, Site};

use crate::schema::{
    ContainerInfo, DestCount, Errno, Failure, Family, NatClient, NatEntry, NatInfo, NatRange,
    Offender, Proto, Totals, Ts, utilisation,
};

/// One dropped packet, named.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NatDrop {
    pub ts: Ts,
    pub router_netns: u64,
    pub family: Family,
    pub proto: Proto,
    /// The client's source, before NAT.
    pub client: SocketAddr,
    pub dst: SocketAddr,
    /// Where the NAT tried to map the source.
    pub nat: SocketAddr,
}

fn ip(family: u16, raw: &[u8; 16]) -> IpAddr {
    if family == AF_INET {
        IpAddr::V4(Ipv4Addr::new(raw[0], raw[1], raw[2], raw[3]))
    } else {
        IpAddr::V6(Ipv6Addr::from(*raw))
    }
}

/// Decode the kernel's record (None: a family or protocol this build does not name).
pub fn decode(ev: &NatEvent, ts: Ts) -> Option<NatDrop> {
    let family = Family::from_af(ev.family)?;
    Some(NatDrop {
        ts,
        router_netns: u64::from(ev.netns),
        family,
        proto: Proto::from_ipproto(ev.proto)?,
        client: SocketAddr::new(ip(ev.family, &ev.saddr), ev.sport),
        dst: SocketAddr::new(ip(ev.family, &ev.daddr), ev.dport),
        nat: SocketAddr::new(ip(ev.family, &ev.nat_addr), ev.nat_port),
    })
}

/// The process behind a client socket, as the kernel layer found it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Client {
    pub pid: u32,
    pub comm: String,
    pub netns: u64,
    pub uid: u32,
    pub container: Option<ContainerInfo>,
}

/// The `failure` line of one drop: site `nf_nat`, cause `snat_exhausted`, no errno (connect()
/// got none); the client's process where it was found, else pid 0.
pub fn failure(d: &NatDrop, c: Option<&Client>, backend: Backend, clash: Option<bool>) -> Failure {
    Failure {
        ts: d.ts,
        pid: c.map_or(0, |c| c.pid),
        tid: 0,
        uid: c.map_or(0, |c| c.uid),
        comm: c.map(|c| c.comm.clone()).unwrap_or_default(),
        cgroup_id: 0,
        netns: c.map(|c| c.netns),
        family: d.family,
        proto: d.proto,
        dst: d.dst,
        src: Some(d.client.ip()),
        errno: Errno(0),
        cause: Cause::SnatExhausted,
        site: Site::NfNat,
        backend,
        container: c.and_then(|c| c.container.clone()).map(std::sync::Arc::new),
        nat: Some(NatInfo {
            router_netns: d.router_netns,
            client: d.client,
            nat: d.nat,
            clash,
        }),
    }
}

/// One NAT namespace, protocol, destination and NAT address: the kernel's count key.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct NatId {
    pub router_netns: u64,
    pub proto: Proto,
    pub dst: SocketAddr,
    pub nat_addr: IpAddr,
}

impl NatId {
    pub fn of(d: &NatDrop) -> Self {
        Self {
            router_netns: d.router_netns,
            proto: d.proto,
            dst: d.dst,
            nat_addr: d.nat.ip(),
        }
    }

    /// The key of a NAT section entry.
    pub fn of_entry(e: &NatEntry) -> Self {
        Self {
            router_netns: e.router_netns,
            proto: e.proto,
            dst: e.dst,
            nat_addr: e.nat_addr,
        }
    }
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
struct Seen {
    comm: String,
    netns: Option<u64>,
    container: Option<ContainerInfo>,
    count: u64,
    first: Option<Ts>,
    last: Option<Ts>,
}

/// The streamed drops, per key and client (None: not found).
#[derive(Clone, Debug, Default)]
pub struct NatBook {
    seen: BTreeMap<NatId, BTreeMap<Option<u32>, Seen>>,
}

impl NatBook {
    pub fn add(&mut self, d: &NatDrop, c: Option<&Client>) {
        let s = self
            .seen
            .entry(NatId::of(d))
            .or_default()
            .entry(c.map(|c| c.pid))
            .or_default();
        s.count += 1;
        s.first = Some(s.first.map_or(d.ts, |f| f.min(d.ts)));
        s.last = Some(s.last.map_or(d.ts, |l| l.max(d.ts)));
        if let Some(c) = c
            && s.comm.is_empty()
        {
            s.comm = c.comm.clone();
            s.netns = Some(c.netns);
            s.container = c.container.clone();
        }
    }
}

/// A conntrack entry of a NAT's namespace, as far as the view needs it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CtRow {
    pub proto: Proto,
    /// Original direction: the client's source and the destination.
    pub src: SocketAddr,
    pub dst: SocketAddr,
    /// The reply's destination: the NAT's address and port for this connection.
    pub nat: SocketAddr,
}

/// What one NAT namespace showed.
#[derive(Clone, Debug, Default)]
pub struct NsView {
    pub rows: Vec<CtRow>,
    pub range: Option<NatRange>,
    /// Rise of `insert_failed` since tracing started.
    pub insert_failed_delta: Option<u64>,
}

/// Does the NAT's table hold a connection whose reply goes to `nat` from `dst` (the tuple a
/// dropped packet was mapped to)? That is the clash `__nf_conntrack_confirm()` found.
pub fn clashes(rows: &[CtRow], dst: SocketAddr, nat: SocketAddr) -> bool {
    rows.iter().any(|r| r.dst == dst && r.nat == nat)
}

/// The summary's `nat` entries: the kernel's exact counts, who the streamed drops came from
/// (the rest under `pid: null`), and each NAT's view of the destination. `holder_of` names the
/// process behind a connection by its original (client) tuple.
pub fn entries(
    kernel: &[(NatId, u64)],
    book: &NatBook,
    views: &HashMap<u64, NsView>,
    holder_of: &dyn Fn(SocketAddr, SocketAddr) -> Option<Client>,
) -> Vec<NatEntry> {
    let mut out = Vec::new();
    for (id, drops) in kernel {
        let mut failers: Vec<NatClient> = Vec::new();
        let mut named = 0;
        if let Some(seen) = book.seen.get(id) {
            for (pid, s) in seen.iter().filter(|(p, _)| p.is_some()) {
                let count = s.count.min(drops - named);
                named += count;
                failers.push(NatClient {
                    pid: *pid,
                    comm: s.comm.clone(),
                    netns: s.netns,
                    count,
                    container: s.container.clone(),
                });
            }
        }
        if *drops > named {
            failers.push(NatClient {
                pid: None,
                comm: String::new(),
                netns: None,
                count: drops - named,
                container: None,
            });
        }
        failers.sort_by(|a, b| b.count.cmp(&a.count).then(a.pid.cmp(&b.pid)));
        let view = views.get(&id.router_netns);
        let mut e = NatEntry {
            router_netns: id.router_netns,
            proto: id.proto,
            dst: id.dst,
            nat_addr: id.nat_addr,
            drops: *drops,
            failers,
            conntrack_entries: None,
            in_use: None,
            range: view.and_then(|v| v.range.clone()),
            utilisation: None,
            holders: Vec::new(),
            insert_failed_delta: view.and_then(|v| v.insert_failed_delta),
        };
        if let Some(v) = view {
            let rows: Vec<&CtRow> = v
                .rows
                .iter()
                .filter(|r| r.proto == id.proto && r.dst == id.dst && r.nat.ip() == id.nat_addr)
                .collect();
            let mut ports: Vec<u16> = rows.iter().map(|r| r.nat.port()).collect();
            ports.sort_unstable();
            ports.dedup();
            let in_range = |p: &u16| e.range.as_ref().is_none_or(|r| (r.lo..=r.hi).contains(p));
            let in_use = ports.iter().filter(|p| in_range(p)).count() as u64;
            e.conntrack_entries = Some(rows.len() as u64);
            e.in_use = Some(in_use);
            e.utilisation = utilisation(
                in_use,
                e.range
                    .as_ref()
                    .map(|r| u64::from(r.hi.saturating_sub(r.lo)) + 1),
            );
            let mut holders: BTreeMap<Option<u32>, NatClient> = BTreeMap::new();
            for r in rows {
                let c = holder_of(r.src, r.dst);
                let h = holders
                    .entry(c.as_ref().map(|c| c.pid))
                    .or_insert_with(|| NatClient {
                        pid: c.as_ref().map(|c| c.pid),
                        comm: c.as_ref().map(|c| c.comm.clone()).unwrap_or_default(),
                        netns: c.as_ref().map(|c| c.netns),
                        count: 0,
                        container: c.as_ref().and_then(|c| c.container.clone()),
                    });
                h.count += 1;
            }
            e.holders = holders.into_values().collect();
            e.holders
                .sort_by(|a, b| b.count.cmp(&a.count).then(a.pid.cmp(&b.pid)));
        }
        out.push(e);
    }
    out.sort_by(|a, b| b.drops.cmp(&a.drops).then(a.dst.cmp(&b.dst)));
    out
}

/// Put the NAT drops into a summary: its `nat` section, its total and its offenders (cause
/// `snat_exhausted`; drops with no client found under pid 0), so that the offenders still add
/// up to the total.
pub fn fold(totals: &mut Totals, entries: Vec<NatEntry>, book: &NatBook) {
    for e in &entries {
        totals.failures_total += e.drops;
        for f in &e.failers {
            let pid = f.pid.unwrap_or(0);
            let times = book
                .seen
                .get(&NatId::of_entry(e))
                .and_then(|m| m.get(&f.pid));
            let dc = DestCount {
                dst: e.dst,
                errno: Errno(0),
                cause: Cause::SnatExhausted,
                failures: f.count,
            };
            match totals.offenders.iter_mut().find(|o| o.pid == pid) {
                Some(o) => {
                    o.failures += f.count;
                    o.destinations.push(dc);
                    o.destinations
                        .sort_by_key(|d| std::cmp::Reverse(d.failures));
                }
                None => totals.offenders.push(Offender {
                    pid,
                    comm: if f.pid.is_some() {
                        f.comm.clone()
                    } else {
                        "(client not found)".to_string()
                    },
                    netns: f.netns,
                    failures: f.count,
                    first_ts: times.and_then(|t| t.first),
                    last_ts: times.and_then(|t| t.last),
                    destinations: vec![dc],
                }),
            }
        }
    }
    totals
        .offenders
        .sort_by(|a, b| b.failures.cmp(&a.failures).then(a.pid.cmp(&b.pid)));
    totals.nat = entries;
}

#[cfg(test)]
mod tests {
    use super::*;

    fn drop_at(us: i128, sport: u16, nat_port: u16) -> NatDrop {
        NatDrop {
            ts: Ts::from_unix_ns(us * 1000),
            router_netns: 7,
            family: Family::Ipv4,
            proto: Proto::Tcp,
            client: format!("10.1.0.2:{sport}").parse().expect("addr"),
            dst: "10.2.0.2:5000".parse().expect("addr"),
            nat: format!("10.2.0.1:{nat_port}").parse().expect("addr"),
        }
    }

    fn client() -> Client {
        Client {
            pid: 42,
            comm: "pxh-client".into(),
            netns: 9,
            uid: 0,
            container: None,
        }
    }

    #[test]
    fn a_drop_becomes_an_nf_nat_failure_of_the_client() {
        let f = failure(
            &drop_at(1, 51000, 40003),
            Some(&client()),
            Backend::TpBtf,
            Some(true),
        );
        assert_eq!(
            (f.pid, f.comm.as_str(), f.netns),
            (42, "pxh-client", Some(9))
        );
        assert_eq!(f.site, Site::NfNat);
        assert_eq!(f.cause, Cause::SnatExhausted);
        let line = f.line();
        assert!(line.contains(r#""site":"nf_nat""#), "{line}");
        assert!(line.contains(r#""cause":"snat_exhausted""#), "{line}");
        assert!(line.contains(r#""nat":{"router_netns":7,"client":"10.1.0.2:51000","nat":"10.2.0.1:40003","clash":true}"#), "{line}");
        // The record reads it back whole.
        let back: crate::schema::Record = serde_json::from_str(&line).expect("reads back");
        assert!(matches!(back, crate::schema::Record::Failure(b) if b.nat == f.nat));
    }

    #[test]
    fn entries_count_exactly_and_show_the_range_full() {
        let mut book = NatBook::default();
        book.add(&drop_at(1, 51000, 40003), Some(&client()));
        book.add(&drop_at(2, 51001, 40004), Some(&client()));
        book.add(&drop_at(3, 51002, 40005), None);
        let id = NatId::of(&drop_at(0, 1, 1));
        // The kernel counted 5: two over the event budget were never streamed.
        let kernel = vec![(id, 5)];
        let rows: Vec<CtRow> = (0..10)
            .map(|i| CtRow {
                proto: Proto::Tcp,
                src: format!("10.1.0.2:{}", 50000 + i).parse().expect("addr"),
                dst: "10.2.0.2:5000".parse().expect("addr"),
                nat: format!("10.2.0.1:{}", 40000 + i).parse().expect("addr"),
            })
            .collect();
        assert!(clashes(
            &rows,
            id.dst,
            "10.2.0.1:40003".parse().expect("addr")
        ));
        assert!(!clashes(
            &rows,
            id.dst,
            "10.2.0.1:41000".parse().expect("addr")
        ));
        let views = HashMap::from([(
            7,
            NsView {
                rows,
                range: Some(NatRange {
                    lo: 40000,
                    hi: 40009,
                    source: "nft".into(),
                }),
                insert_failed_delta: Some(5),
            },
        )]);
        let e = entries(&kernel, &book, &views, &|_, _| Some(client()));
        assert_eq!(e.len(), 1);
        let e = &e[0];
        assert_eq!(e.drops, 5);
        // Most first: the three the client of which was not found (one not named, two not
        // streamed), then the client's two.
        assert_eq!((e.failers[0].pid, e.failers[0].count), (None, 3));
        assert_eq!((e.failers[1].pid, e.failers[1].count), (Some(42), 2));
        assert_eq!(e.failers.iter().map(|f| f.count).sum::<u64>(), 5);
        assert_eq!((e.in_use, e.utilisation), (Some(10), Some(1.0)));
        assert_eq!(e.holders[0].count, 10);
        let mut t = Totals::default();
        fold(&mut t, vec![e.clone()], &book);
        assert_eq!(t.failures_total, 5);
        assert_eq!(t.counted(), 5);
        assert_eq!(t.offenders[0].pid, 0); // three drops with no client found
        assert_eq!(t.offenders[1].destinations[0].cause, Cause::SnatExhausted);
    }
}
