//! Failure events to bytes, for the live stream, with no allocation or time formatting per
//! event: lines are appended to one reused `BytesMut`, the date-time is formatted once per
//! second, numbers and addresses are written digit by digit, and each container's label is
//! rendered once per cgroup. In a storm of 150k failures a second this is most of what the
//! tracer itself does (`cargo xtask bench`: tracer CPU per million failures).
//!
//! The output is byte for byte what `render::json_line` / `render::human_line` produce (a
//! unit test holds them together); those stay the reference for everything that is not hot.
use std::{collections::HashMap, fmt::Write as _, net::Ipv6Addr, sync::Arc};

use bytes::{BufMut, BytesMut};
use portexhaust_common::{
    AF_INET, AF_INET6, Backend, COMM_LEN, EVENT_SADDR_KNOWN, FailureEvent, IPPROTO_TCP,
    IPPROTO_UDP, Site, errno_name,
};

use crate::{container::ContainerInfo, model::DecodeError};

/// Check the codes of a raw event, as `model::failure_from_event` does.
pub fn validate(ev: &FailureEvent) -> Result<(), DecodeError> {
    if ev.family != AF_INET && ev.family != AF_INET6 {
        return Err(DecodeError::Family(ev.family));
    }
    if ev.proto != IPPROTO_TCP && ev.proto != IPPROTO_UDP {
        return Err(DecodeError::Proto(ev.proto));
    }
    if Site::from_u8(ev.site).is_none() {
        return Err(DecodeError::Site(ev.site));
    }
    if Backend::from_u8(ev.backend).is_none() {
        return Err(DecodeError::Backend(ev.backend));
    }
    Ok(())
}

/// `YYYY-MM-DDTHH:MM:SS` of one second, kept while events stay in it.
#[derive(Default)]
struct Second {
    secs: i64,
    text: [u8; 19],
    valid: bool,
}

impl Second {
    fn prefix(&mut self, secs: i64) -> &[u8; 19] {
        if !self.valid || self.secs != secs {
            self.secs = secs;
            self.valid = true;
            match time::OffsetDateTime::from_unix_timestamp(secs) {
                Ok(t) => {
                    let mut s = String::with_capacity(19);
                    let _ = write!(
                        s,
                        "{:04}-{:02}-{:02}T{:02}:{:02}:{:02}",
                        t.year(),
                        u8::from(t.month()),
                        t.day(),
                        t.hour(),
                        t.minute(),
                        t.second()
                    );
                    let b = s.as_bytes();
                    self.text.copy_from_slice(&b[..19.min(b.len())]);
                }
                Err(_) => self.text = *b"0000-00-00T00:00:00",
            }
        }
        &self.text
    }
}

/// Labels of one cgroup: the JSON object and the short form, rendered once.
struct Label {
    json: Arc<str>,
    short: Arc<str>,
}

/// Appends failure lines to a buffer that is reused from batch to batch.
pub struct EventWriter {
    buf: BytesMut,
    second: Second,
    labels: HashMap<u64, Label>,
}

impl Default for EventWriter {
    fn default() -> Self {
        Self::new()
    }
}

fn put_u64(buf: &mut BytesMut, mut v: u64) {
    let mut d = [0u8; 20];
    let mut i = d.len();
    loop {
        i -= 1;
        d[i] = b'0' + (v % 10) as u8;
        v /= 10;
        if v == 0 {
            break;
        }
    }
    buf.put_slice(&d[i..]);
}

/// `n` digits, zero-padded.
fn put_padded(buf: &mut BytesMut, mut v: u64, n: usize) {
    let mut d = [b'0'; 20];
    for i in (0..n).rev() {
        d[i] = b'0' + (v % 10) as u8;
        v /= 10;
    }
    buf.put_slice(&d[..n]);
}

fn put_v4(buf: &mut BytesMut, a: &[u8; 16]) {
    for (i, o) in a[..4].iter().enumerate() {
        if i > 0 {
            buf.put_u8(b'.');
        }
        put_u64(buf, u64::from(*o));
    }
}

fn put_ip(buf: &mut BytesMut, family: u16, a: &[u8; 16]) {
    if family == AF_INET {
        put_v4(buf, a);
    } else {
        // std's formatting writes into the buffer without allocating.
        let _ = write!(buf, "{}", Ipv6Addr::from(*a));
    }
}

fn put_dst(buf: &mut BytesMut, ev: &FailureEvent) {
    if ev.family == AF_INET {
        put_v4(buf, &ev.daddr);
    } else {
        buf.put_u8(b'[');
        put_ip(buf, ev.family, &ev.daddr);
        buf.put_u8(b']');
    }
    buf.put_u8(b':');
    put_u64(buf, u64::from(ev.dport));
}

fn comm_of(ev: &FailureEvent) -> &[u8] {
    let end = ev.comm.iter().position(|&b| b == 0).unwrap_or(COMM_LEN);
    &ev.comm[..end]
}

/// A JSON string; a command name is almost always plain ASCII, the rest goes through serde.
fn put_json_str(buf: &mut BytesMut, s: &[u8]) {
    let plain = s
        .iter()
        .all(|&b| (0x20..0x7f).contains(&b) && b != b'"' && b != b'\\');
    if plain {
        buf.put_u8(b'"');
        buf.put_slice(s);
        buf.put_u8(b'"');
    } else {
        let lossy = String::from_utf8_lossy(s);
        let _ = serde_json::to_writer((&mut *buf).writer(), &lossy);
    }
}

fn family_name(family: u16) -> &'static str {
    if family == AF_INET { "ipv4" } else { "ipv6" }
}

fn proto_name(proto: u8) -> &'static str {
    if proto == IPPROTO_UDP { "udp" } else { "tcp" }
}

impl EventWriter {
    pub fn new() -> Self {
        Self {
            buf: BytesMut::with_capacity(256 * 1024),
            second: Second::default(),
            labels: HashMap::new(),
        }
    }

    /// Bytes written since the last `clear`.
    pub fn bytes(&self) -> &[u8] {
        &self.buf
    }

    pub fn is_empty(&self) -> bool {
        self.buf.is_empty()
    }

    /// Forget the written bytes, keeping the allocation.
    pub fn clear(&mut self) {
        self.buf.clear();
    }

    /// The rendered labels of a container, cached by cgroup. No container is not cached: the
    /// resolver may learn the cgroup later.
    fn label(&mut self, cgroup_id: u64, c: Option<&Arc<ContainerInfo>>) -> Option<&Label> {
        let c = c?;
        if self.labels.len() > 4096 {
            self.labels.clear();
        }
        Some(self.labels.entry(cgroup_id).or_insert_with(|| Label {
            json: serde_json::to_string(&**c).unwrap_or_default().into(),
            short: c.short().into(),
        }))
    }

    /// One NDJSON failure line.
    pub fn json(
        &mut self,
        ev: &FailureEvent,
        unix_ns: i128,
        netns: Option<u64>,
        container: Option<&Arc<ContainerInfo>>,
    ) {
        let label = self.label(ev.cgroup_id, container).map(|l| l.json.clone());
        let secs = unix_ns.div_euclid(1_000_000_000) as i64;
        let micros = (unix_ns.rem_euclid(1_000_000_000) / 1000) as u64;
        let prefix = *self.second.prefix(secs);
        let b = &mut self.buf;
        b.put_slice(b"{\"type\":\"failure\",\"ts\":\"");
        b.put_slice(&prefix);
        b.put_u8(b'.');
        put_padded(b, micros, 6);
        b.put_slice(b"Z\",\"pid\":");
        put_u64(b, u64::from(ev.pid));
        b.put_slice(b",\"tid\":");
        put_u64(b, u64::from(ev.tid));
        b.put_slice(b",\"uid\":");
        put_u64(b, u64::from(ev.uid));
        b.put_slice(b",\"comm\":");
        put_json_str(b, comm_of(ev));
        b.put_slice(b",\"cgroup_id\":");
        put_u64(b, ev.cgroup_id);
        b.put_slice(b",\"netns\":");
        match netns {
            Some(n) => put_u64(b, n),
            None => b.put_slice(b"null"),
        }
        b.put_slice(b",\"family\":\"");
        b.put_slice(family_name(ev.family).as_bytes());
        b.put_slice(b"\",\"proto\":\"");
        b.put_slice(proto_name(ev.proto).as_bytes());
        b.put_slice(b"\",\"dst\":\"");
        put_dst(b, ev);
        b.put_slice(b"\",\"src\":");
        if ev.flags & EVENT_SADDR_KNOWN != 0 {
            b.put_u8(b'"');
            put_ip(b, ev.family, &ev.saddr);
            b.put_u8(b'"');
        } else {
            b.put_slice(b"null");
        }
        b.put_slice(b",\"errno\":");
        put_u64(b, u64::from(ev.errno));
        b.put_slice(b",\"errname\":\"");
        b.put_slice(errno_name(ev.errno).unwrap_or("UNKNOWN").as_bytes());
        b.put_slice(b"\",\"site\":\"");
        b.put_slice(Site::from_u8(ev.site).map_or("?", Site::name).as_bytes());
        b.put_slice(b"\",\"backend\":\"");
        b.put_slice(
            Backend::from_u8(ev.backend)
                .map_or("?", Backend::name)
                .as_bytes(),
        );
        b.put_slice(b"\",\"container\":");
        match label {
            Some(j) => b.put_slice(j.as_bytes()),
            None => b.put_slice(b"null"),
        }
        b.put_slice(b"}\n");
    }

    /// One line of the live human table (columns of `render::human_header`).
    pub fn human(
        &mut self,
        ev: &FailureEvent,
        unix_ns: i128,
        netns: Option<u64>,
        container: Option<&Arc<ContainerInfo>>,
    ) {
        let short = self.label(ev.cgroup_id, container).map(|l| l.short.clone());
        let secs = unix_ns.div_euclid(1_000_000_000) as i64;
        let millis = (unix_ns.rem_euclid(1_000_000_000) / 1_000_000) as u64;
        let prefix = *self.second.prefix(secs);
        let mut time = [0u8; 12];
        time[..8].copy_from_slice(&prefix[11..19]);
        time[8] = b'.';
        time[9] = b'0' + (millis / 100) as u8;
        time[10] = b'0' + (millis / 10 % 10) as u8;
        time[11] = b'0' + (millis % 10) as u8;
        // A command name that is not UTF-8 is rare enough to pay for its lossy copy.
        let comm = String::from_utf8_lossy(comm_of(ev));
        let mut dst = Stack::<64>::default();
        let mut src = Stack::<64>::default();
        let _ = match ev.family {
            AF_INET => {
                let a = &ev.daddr;
                write!(dst, "{}.{}.{}.{}:{}", a[0], a[1], a[2], a[3], ev.dport)
            }
            _ => write!(dst, "[{}]:{}", Ipv6Addr::from(ev.daddr), ev.dport),
        };
        let _ = match (ev.flags & EVENT_SADDR_KNOWN != 0, ev.family) {
            (false, _) => write!(src, "-"),
            (true, AF_INET) => {
                let a = &ev.saddr;
                write!(src, "{}.{}.{}.{}", a[0], a[1], a[2], a[3])
            }
            (true, _) => write!(src, "{}", Ipv6Addr::from(ev.saddr)),
        };
        let _ = writeln!(
            self.buf,
            "{:<12} {:>7} {:>7} {:>6} {:<15} {:>10} {:<5} {:<21} {:<15} {:<13} {:<19} {}",
            std::str::from_utf8(&time).unwrap_or("??:??:??.???"),
            ev.pid,
            ev.tid,
            ev.uid,
            comm,
            DashOr(netns),
            proto_name(ev.proto),
            dst.as_str(),
            src.as_str(),
            errno_name(ev.errno).unwrap_or("UNKNOWN"),
            Site::from_u8(ev.site).map_or("?", Site::name),
            short.as_deref().unwrap_or("-"),
        );
    }
}

/// A short string on the stack, for padded columns without an allocation.
struct Stack<const N: usize> {
    b: [u8; N],
    n: usize,
}

impl<const N: usize> Default for Stack<N> {
    fn default() -> Self {
        Self { b: [0; N], n: 0 }
    }
}

impl<const N: usize> Stack<N> {
    fn as_str(&self) -> &str {
        std::str::from_utf8(&self.b[..self.n]).unwrap_or("?")
    }
}

impl<const N: usize> std::fmt::Write for Stack<N> {
    fn write_str(&mut self, s: &str) -> std::fmt::Result {
        let end = self.n + s.len();
        if end > N {
            return Err(std::fmt::Error);
        }
        self.b[self.n..end].copy_from_slice(s.as_bytes());
        self.n = end;
        Ok(())
    }
}

/// A number, or `-` when unknown.
struct DashOr(Option<u64>);

impl std::fmt::Display for DashOr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.0 {
            Some(n) => std::fmt::Display::fmt(&n, f),
            None => f.pad("-"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{
        model::failure_from_event,
        render::{human_line, json_line},
    };
    use portexhaust_common::Cause;

    fn event(family: u16, comm: &[u8]) -> FailureEvent {
        let mut c = [0u8; COMM_LEN];
        c[..comm.len()].copy_from_slice(comm);
        let (daddr, saddr) = if family == AF_INET {
            let mut d = [0u8; 16];
            d[..4].copy_from_slice(&[10, 0, 0, 9]);
            let mut s = [0u8; 16];
            s[..4].copy_from_slice(&[192, 168, 1, 254]);
            (d, s)
        } else {
            (
                "fe80::1:2".parse::<Ipv6Addr>().expect("v6").octets(),
                "::1".parse::<Ipv6Addr>().expect("v6").octets(),
            )
        };
        FailureEvent {
            ts_ns: 0,
            cgroup_id: 4242,
            pid: 4_000_000,
            tid: 7,
            uid: 0,
            errno: 99,
            daddr,
            saddr,
            dport: 443,
            family,
            proto: IPPROTO_TCP,
            site: Site::InetHashConnect as u8,
            backend: Backend::TpBtf as u8,
            flags: EVENT_SADDR_KNOWN,
            comm: c,
            netns: 0,
            cause: Cause::Exhausted as u8,
            _pad: [0; 3],
        }
    }

    /// The fast writer and the reference renderers agree byte for byte, across second and
    /// year boundaries, both families, odd command names, with and without a container.
    #[test]
    fn matches_the_reference_renderers() {
        let container = Arc::new(ContainerInfo {
            runtime: crate::container::Runtime::Docker,
            id: "0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef".into(),
            pod: Some("checkout-7f9c".into()),
        });
        let mut w = EventWriter::new();
        for ts in [
            1_764_069_600_123_456_789i128,
            1_764_069_600_999_999_999,
            1_764_069_601_000_000_000,
            1_735_689_599_999_999_000,
            0,
        ] {
            for family in [AF_INET, AF_INET6] {
                for comm in [&b"python3"[..], b"a\"b\\c", b"\x01ctl", b"\xffbad", b""] {
                    for (netns, c) in [(None, None), (Some(4026532177), Some(&container))] {
                        let mut ev = event(family, comm);
                        ev.flags = if netns.is_some() {
                            EVENT_SADDR_KNOWN
                        } else {
                            0
                        };
                        let mut f = failure_from_event(&ev, |_| ts).expect("decodes");
                        f.netns = netns;
                        f.container = c.cloned();
                        w.clear();
                        w.json(&ev, ts, netns, c);
                        assert_eq!(
                            String::from_utf8_lossy(w.bytes()),
                            json_line(&f) + "\n",
                            "{ts} {family} {comm:?}"
                        );
                        w.clear();
                        w.human(&ev, ts, netns, c);
                        assert_eq!(
                            String::from_utf8_lossy(w.bytes()),
                            human_line(&f) + "\n",
                            "{ts} {family} {comm:?}"
                        );
                    }
                }
            }
        }
    }

    #[test]
    fn unknown_codes_are_refused() {
        let mut ev = event(AF_INET, b"x");
        assert!(validate(&ev).is_ok());
        ev.site = 99;
        assert_eq!(validate(&ev), Err(DecodeError::Site(99)));
        ev = event(7, b"x");
        assert_eq!(validate(&ev), Err(DecodeError::Family(7)));
    }
}
