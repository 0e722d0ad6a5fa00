//! Failure events to bytes, for the live stream, with no allocation or time formatting per
//! event: lines are appended to one reused `BytesMut`, the date-time is formatted once per
//! second, numbers and addresses are written digit by digit, and each container's label is
//! rendered once per cgroup. In a storm of 150k failures a second this is most of what the
//! tracer itself does (`cargo xtask bench`: tracer CPU per million failures).
//!
//! The output is byte for byte what the schema's [`Failure::line`] and
//! [`super::human::human_line`] produce (a unit test holds them together); those stay the
//! reference for everything that is not hot.
use std::{collections::HashMap, fmt::Write as _, net::Ipv6Addr, sync::Arc};

use bytes::{BufMut, BytesMut};
use portexhaust_common::{
    AF_INET, Backend, COMM_LEN, Cause, EVENT_SADDR_KNOWN, FailureEvent, IPPROTO_UDP, Site,
    errno_name,
};

use crate::{
    schema::event::failure_from_event,
    schema::{ContainerInfo, Failure, Ts},
};

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
    prefix: Segment<u64>,
    who: Segment<Who>,
    place: Segment<Place>,
    what: Segment<What>,
    second: Second,
    labels: HashMap<u64, Label>,
}

impl Default for EventWriter {
    fn default() -> Self {
        Self::new()
    }
}

/// One line being built on the stack: every piece is a copy of a known size, so LLVM inlines
/// them instead of calling memcpy per field (the difference was a third of the tracer's time).
struct Cur<'a> {
    b: &'a mut [u8; LINE_MAX],
    n: usize,
}

/// Longest line: fixed text ~230 bytes, numbers ~70, two IPv6 addresses 80, an escaped comm
/// 100, a container label 200. A line that would not fit is written the slow way.
const LINE_MAX: usize = 1024;

impl<'a> Cur<'a> {
    /// Over a scratch line.
    #[inline(always)]
    fn new(b: &'a mut [u8; LINE_MAX]) -> Self {
        Self { b, n: 0 }
    }

    /// Room for `len` more bytes; false (and nothing written) when the line would overflow.
    #[inline(always)]
    fn fits(&self, len: usize) -> bool {
        self.n + len <= LINE_MAX
    }

    #[inline(always)]
    fn put(&mut self, s: &[u8]) {
        if self.fits(s.len()) {
            self.b[self.n..self.n + s.len()].copy_from_slice(s);
            self.n += s.len();
        } else {
            self.n = LINE_MAX + 1;
        }
    }

    #[inline(always)]
    fn byte(&mut self, c: u8) {
        if self.n < LINE_MAX {
            self.b[self.n] = c;
            self.n += 1;
        } else {
            self.n = LINE_MAX + 1;
        }
    }

    #[inline(always)]
    fn num(&mut self, v: impl itoa::Integer) {
        let mut f = itoa::Buffer::new();
        self.put(f.format(v).as_bytes());
    }

    /// Zero-padded to `n` digits (at most 9).
    #[inline(always)]
    #[allow(dead_code)]
    fn padded(&mut self, mut v: u64, n: usize) {
        let mut d = [b'0'; 9];
        for i in (0..n.min(9)).rev() {
            d[i] = b'0' + (v % 10) as u8;
            v /= 10;
        }
        self.put(&d[..n.min(9)]);
    }

    fn overflowed(&self) -> bool {
        self.n > LINE_MAX
    }
}

impl std::fmt::Write for Cur<'_> {
    fn write_str(&mut self, s: &str) -> std::fmt::Result {
        self.put(s.as_bytes());
        if self.overflowed() {
            Err(std::fmt::Error)
        } else {
            Ok(())
        }
    }
}

fn put_v4(c: &mut Cur, a: &[u8; 16]) {
    c.num(a[0]);
    c.byte(b'.');
    c.num(a[1]);
    c.byte(b'.');
    c.num(a[2]);
    c.byte(b'.');
    c.num(a[3]);
}

fn put_ip(c: &mut Cur, family: u16, a: &[u8; 16]) {
    if family == AF_INET {
        put_v4(c, a);
    } else {
        // std's formatting writes into the cursor without allocating.
        let _ = write!(c, "{}", Ipv6Addr::from(*a));
    }
}

fn put_dst(c: &mut Cur, ev: &FailureEvent) {
    if ev.family == AF_INET {
        put_v4(c, &ev.daddr);
    } else {
        c.byte(b'[');
        put_ip(c, ev.family, &ev.daddr);
        c.byte(b']');
    }
    c.byte(b':');
    c.num(ev.dport);
}

fn comm_of(ev: &FailureEvent) -> &[u8] {
    let end = ev.comm.iter().position(|&b| b == 0).unwrap_or(COMM_LEN);
    &ev.comm[..end]
}

/// A JSON string; a command name is almost always plain ASCII, the rest goes through serde.
fn put_json_str(c: &mut Cur, s: &[u8]) {
    let plain = s
        .iter()
        .all(|&b| (0x20..0x7f).contains(&b) && b != b'"' && b != b'\\');
    if plain {
        c.byte(b'"');
        c.put(s);
        c.byte(b'"');
    } else {
        let lossy = String::from_utf8_lossy(s);
        match serde_json::to_string(&lossy) {
            Ok(j) => c.put(j.as_bytes()),
            Err(_) => c.put(b"\"?\""),
        }
    }
}

fn proto_name(proto: u8) -> &'static str {
    if proto == IPPROTO_UDP { "udp" } else { "tcp" }
}

/// One rendered piece of a line and what it was rendered from (a one-entry memo).
struct Segment<K> {
    key: Option<K>,
    text: Vec<u8>,
    ok: bool,
}

impl<K> Default for Segment<K> {
    fn default() -> Self {
        Self {
            key: None,
            text: Vec::with_capacity(256),
            ok: false,
        }
    }
}

impl<K> Segment<K> {
    fn render(&mut self, key: K, f: impl FnOnce(&mut Cur<'_>)) {
        let mut scratch = [0u8; LINE_MAX];
        let mut c = Cur::new(&mut scratch);
        f(&mut c);
        self.ok = !c.overflowed();
        let n = c.n.min(LINE_MAX);
        self.text.clear();
        self.text.extend_from_slice(&scratch[..n]);
        self.key = Some(key);
    }

    fn bytes(&self) -> Option<&[u8]> {
        self.ok.then_some(&self.text[..])
    }
}

/// `"Z","pid":..,"tid":..,"uid":..,"comm":"..","cgroup_id":..,"netns":..`
#[derive(Clone, PartialEq, Eq)]
struct Who {
    pid: u32,
    tid: u32,
    uid: u32,
    comm: [u8; COMM_LEN],
    cgroup_id: u64,
    netns: Option<u64>,
}

/// `,"family":..,"proto":..,"dst":..,"src":..`
#[derive(Clone, PartialEq, Eq)]
struct Place {
    family: u16,
    proto: u8,
    dport: u16,
    daddr: [u8; 16],
    saddr: Option<[u8; 16]>,
}

/// `,"errno":..,"errname":..,"cause":..,"site":..,"backend":..,"container":..}` and the
/// newline.
struct What {
    errno: u32,
    cause: u8,
    site: u8,
    backend: u8,
    container: Option<Arc<ContainerInfo>>,
}

fn render_who(c: &mut Cur<'_>, ev: &FailureEvent, netns: Option<u64>) {
    c.put(b"Z\",\"pid\":");
    c.num(ev.pid);
    c.put(b",\"tid\":");
    c.num(ev.tid);
    c.put(b",\"uid\":");
    c.num(ev.uid);
    c.put(b",\"comm\":");
    put_json_str(c, comm_of(ev));
    c.put(b",\"cgroup_id\":");
    c.num(ev.cgroup_id);
    c.put(b",\"netns\":");
    match netns {
        Some(n) => c.num(n),
        None => c.put(b"null"),
    }
}

fn render_place(c: &mut Cur<'_>, ev: &FailureEvent) {
    c.put(if ev.family == AF_INET {
        b",\"family\":\"ipv4\",\"proto\":\""
    } else {
        b",\"family\":\"ipv6\",\"proto\":\""
    });
    c.put(if ev.proto == IPPROTO_UDP {
        b"udp"
    } else {
        b"tcp"
    });
    c.put(b"\",\"dst\":\"");
    put_dst(c, ev);
    c.put(b"\",\"src\":");
    if ev.flags & EVENT_SADDR_KNOWN != 0 {
        c.byte(b'"');
        put_ip(c, ev.family, &ev.saddr);
        c.byte(b'"');
    } else {
        c.put(b"null");
    }
}

fn render_what(c: &mut Cur<'_>, ev: &FailureEvent, label: Option<&str>) {
    c.put(b",\"errno\":");
    c.num(ev.errno);
    c.put(b",\"errname\":\"");
    c.put(errno_name(ev.errno).unwrap_or("UNKNOWN").as_bytes());
    c.put(b"\",\"cause\":\"");
    c.put(
        Cause::from_u8(ev.cause)
            .unwrap_or(Cause::Unknown)
            .name()
            .as_bytes(),
    );
    c.put(b"\",\"site\":\"");
    c.put(Site::from_u8(ev.site).map_or("?", Site::name).as_bytes());
    c.put(b"\",\"backend\":\"");
    c.put(
        Backend::from_u8(ev.backend)
            .map_or("?", Backend::name)
            .as_bytes(),
    );
    c.put(b"\",\"container\":");
    match label {
        Some(j) => c.put(j.as_bytes()),
        None => c.put(b"null"),
    }
    c.put(b"}\n");
}

impl EventWriter {
    pub fn new() -> Self {
        Self {
            buf: BytesMut::with_capacity(256 * 1024),
            prefix: Segment::default(),
            who: Segment::default(),
            place: Segment::default(),
            what: Segment::default(),
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

    /// One NDJSON failure line: the second's prefix, six digits of microseconds, and three
    /// segments (who failed, towards where, with what outcome), each rendered once and reused
    /// while the events of a storm repeat it.
    pub fn json(
        &mut self,
        ev: &FailureEvent,
        ts: Ts,
        netns: Option<u64>,
        container: Option<&Arc<ContainerInfo>>,
    ) {
        let unix_ns = ts.unix_ns();
        // Times before 1970 do not occur (CLOCK_REALTIME of a running system): u64 arithmetic.
        let ns = u64::try_from(unix_ns).unwrap_or(0);
        let secs = ns / 1_000_000_000;
        let who = Who {
            pid: ev.pid,
            tid: ev.tid,
            uid: ev.uid,
            comm: ev.comm,
            cgroup_id: ev.cgroup_id,
            netns,
        };
        let place = Place {
            family: ev.family,
            proto: ev.proto,
            dport: ev.dport,
            daddr: ev.daddr,
            saddr: (ev.flags & EVENT_SADDR_KNOWN != 0).then_some(ev.saddr),
        };

        if self.prefix.key != Some(secs) {
            let second = *self.second.prefix(secs as i64);
            self.prefix.render(secs, |c| {
                c.put(b"{\"type\":\"failure\",\"ts\":\"");
                c.put(&second);
                c.byte(b'.');
            });
        }
        if self.who.key.as_ref() != Some(&who) {
            self.who.render(who, |c| render_who(c, ev, netns));
        }
        if self.place.key.as_ref() != Some(&place) {
            self.place.render(place, |c| render_place(c, ev));
        }
        // The container by identity (one resolver answer per cgroup), compared without touching
        // its reference count; the key keeps its own reference, so the address stays its own.
        let same = self.what.key.as_ref().is_some_and(|k| {
            k.errno == ev.errno
                && k.cause == ev.cause
                && k.site == ev.site
                && k.backend == ev.backend
                && match (&k.container, container) {
                    (None, None) => true,
                    (Some(a), Some(b)) => Arc::ptr_eq(a, b),
                    _ => false,
                }
        });
        if !same {
            let what = What {
                errno: ev.errno,
                cause: ev.cause,
                site: ev.site,
                backend: ev.backend,
                container: container.cloned(),
            };
            let label = self.label(ev.cgroup_id, container).map(|l| l.json.clone());
            self.what
                .render(what, |c| render_what(c, ev, label.as_deref()));
        }
        let (Some(p), Some(w), Some(pl), Some(wh)) = (
            self.prefix.bytes(),
            self.who.bytes(),
            self.place.bytes(),
            self.what.bytes(),
        ) else {
            // A segment did not fit (only an absurdly long container label can do that): the
            // reference renderer copes.
            if let Ok(mut f) = failure_from_event(ev, |_| ts) {
                f.netns = netns;
                f.container = container.cloned();
                self.buf.put_slice(Failure::line(&f).as_bytes());
                self.buf.put_u8(b'\n');
            }
            return;
        };
        let mut micros = [b'0'; 6];
        let mut v = ns % 1_000_000_000 / 1000;
        for d in micros.iter_mut().rev() {
            *d = b'0' + (v % 10) as u8;
            v /= 10;
        }
        self.buf.put_slice(p);
        self.buf.put_slice(&micros);
        self.buf.put_slice(w);
        self.buf.put_slice(pl);
        self.buf.put_slice(wh);
    }

    /// One line of the live human table (columns of [`super::human::human_header`]).
    pub fn human(
        &mut self,
        ev: &FailureEvent,
        ts: Ts,
        netns: Option<u64>,
        container: Option<&Arc<ContainerInfo>>,
    ) {
        let short = self.label(ev.cgroup_id, container).map(|l| l.short.clone());
        let unix_ns = ts.unix_ns();
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
            "{:<12} {:>7} {:>7} {:>6} {:<15} {:>10} {:<5} {:<21} {:<15} {:<13} {:<18} {:<19} {}",
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
            Cause::from_u8(ev.cause).unwrap_or(Cause::Unknown).name(),
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
mod tests;
