//! Human and NDJSON renderings of failures and summaries. Pure.
use comfy_table::{Cell, CellAlignment, Table, presets::NOTHING};
use serde::Serialize;

use crate::{
    aggregate::{DestCount, Summary, top_destinations},
    blame::BlameEntry,
    clock::{hms, rfc3339},
    container::ContainerInfo,
    model::{Failure, errno_name},
};

/// Column layout of the live human output; the header and each row share it.
const HEADER: [&str; 12] = [
    "TIME",
    "PID",
    "TID",
    "UID",
    "COMM",
    "NETNS",
    "PROTO",
    "DESTINATION",
    "SOURCE",
    "ERRNO",
    "SITE",
    "CONTAINER",
];

fn row(cols: [&str; 12]) -> String {
    format!(
        "{:<12} {:>7} {:>7} {:>6} {:<15} {:>10} {:<5} {:<21} {:<15} {:<13} {:<19} {}",
        cols[0],
        cols[1],
        cols[2],
        cols[3],
        cols[4],
        cols[5],
        cols[6],
        cols[7],
        cols[8],
        cols[9],
        cols[10],
        cols[11]
    )
}

pub fn human_header() -> String {
    row(HEADER)
}

pub fn human_line(f: &Failure) -> String {
    let netns = f.netns.map(|n| n.to_string()).unwrap_or_else(|| "-".into());
    let src = f.src.map(|s| s.to_string()).unwrap_or_else(|| "-".into());
    let container = f
        .container
        .as_deref()
        .map(ContainerInfo::short)
        .unwrap_or_else(|| "-".into());
    row([
        &hms(f.ts_unix_ns),
        &f.pid.to_string(),
        &f.tid.to_string(),
        &f.uid.to_string(),
        &f.comm,
        &netns,
        f.proto.name(),
        &f.dst.to_string(),
        &src,
        errno_name(f.errno),
        f.site.name(),
        &container,
    ])
}

#[derive(Serialize)]
struct JsonFailure<'a> {
    #[serde(rename = "type")]
    kind: &'static str,
    ts: String,
    pid: u32,
    tid: u32,
    uid: u32,
    comm: &'a str,
    cgroup_id: u64,
    netns: Option<u64>,
    family: &'static str,
    proto: &'static str,
    dst: String,
    src: Option<String>,
    errno: u32,
    errname: &'static str,
    site: &'static str,
    backend: &'static str,
    /// `{"runtime","id","pod"}` or null.
    container: Option<&'a ContainerInfo>,
}

pub fn json_line(f: &Failure) -> String {
    let j = JsonFailure {
        kind: "failure",
        ts: rfc3339(f.ts_unix_ns),
        pid: f.pid,
        tid: f.tid,
        uid: f.uid,
        comm: &f.comm,
        cgroup_id: f.cgroup_id,
        netns: f.netns,
        family: f.family.name(),
        proto: f.proto.name(),
        dst: f.dst.to_string(),
        src: f.src.map(|s| s.to_string()),
        errno: f.errno,
        errname: errno_name(f.errno),
        site: f.site.name(),
        backend: f.backend.name(),
        container: f.container.as_deref(),
    };
    // Serializing a struct of strings and integers cannot fail.
    serde_json::to_string(&j).unwrap_or_default()
}

/// Failures of one (process, destination, errno, cause) that were counted but not streamed as
/// events: over `--events-per-s` in a storm, or refused by a full ring buffer. With the
/// events, the tallies account for every failure exactly once.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Tally {
    #[serde(rename = "type")]
    pub kind: &'static str,
    pub ts: String,
    pub pid: u32,
    pub comm: String,
    pub netns: Option<u64>,
    pub proto: &'static str,
    pub dst: String,
    pub errno: u32,
    pub errname: &'static str,
    pub cause: &'static str,
    /// Failures this line accounts for (since the previous tally of the same key).
    pub count: u64,
    /// The newest failure of the key when the tally was taken.
    pub last_ts: String,
}

pub fn json_tally(t: &Tally) -> String {
    serde_json::to_string(t).unwrap_or_default()
}

pub fn human_tally(t: &Tally) -> String {
    format!(
        "{:<12} {:>7} {:>7} {:>6} {:<15} +{} more {} to {} not shown (over --events-per-s or the \
         ring buffer was full; all counted)",
        hms_of(&t.last_ts),
        t.pid,
        "-",
        "-",
        t.comm,
        t.count,
        t.errname,
        t.dst
    )
}

/// `HH:MM:SS.mmm` of an RFC 3339 time as this module writes them.
fn hms_of(rfc: &str) -> &str {
    rfc.get(11..23).unwrap_or("?")
}

#[derive(Serialize)]
struct JsonOffender<'a> {
    pid: u32,
    comm: &'a str,
    failures: u64,
    first_ts: String,
    last_ts: String,
    destinations: &'a [DestCount],
}

#[derive(Serialize)]
struct JsonSummary<'a> {
    #[serde(rename = "type")]
    kind: &'static str,
    backend: &'static str,
    duration_s: f64,
    failures_total: u64,
    dropped_events: u64,
    offenders: Vec<JsonOffender<'a>>,
    blame: &'a [BlameEntry],
    tracked_sockets: u64,
    lru_evictions: u64,
    watched: &'a [&'static str],
    not_watched: std::collections::BTreeMap<&'static str, &'a str>,
}

pub fn json_summary(s: &Summary) -> String {
    let j = JsonSummary {
        kind: "summary",
        backend: s.backend,
        duration_s: (s.duration_s * 1000.0).round() / 1000.0,
        failures_total: s.failures_total,
        dropped_events: s.dropped_events,
        offenders: s
            .offenders
            .iter()
            .map(|o| JsonOffender {
                pid: o.pid,
                comm: &o.comm,
                failures: o.failures,
                first_ts: rfc3339(o.first_unix_ns),
                last_ts: rfc3339(o.last_unix_ns),
                destinations: &o.destinations,
            })
            .collect(),
        blame: &s.blame,
        tracked_sockets: s.tracked_sockets,
        lru_evictions: s.lru_evictions,
        watched: &s.watched,
        not_watched: s
            .not_watched
            .iter()
            .map(|(k, why)| (*k, why.as_str()))
            .collect(),
    };
    serde_json::to_string(&j).unwrap_or_default()
}

/// "10/10 ports (100%): ESTABLISHED 4, TIME_WAIT 6"
fn usage_line(b: &BlameEntry) -> String {
    let states: Vec<String> = b.by_state.iter().map(|(s, n)| format!("{s} {n}")).collect();
    let pct = if b.range_size == 0 {
        0.0
    } else {
        100.0 * b.in_use as f64 / f64::from(b.range_size)
    };
    format!(
        "{}/{} ports in use ({pct:.0}%){}{}",
        b.in_use,
        b.range_size,
        if states.is_empty() { "" } else { ": " },
        states.join(", ")
    )
}

/// The blame section of the human summary.
pub fn human_blame(blame: &[BlameEntry]) -> String {
    let mut out = String::new();
    for b in blame {
        out.push_str(&format!(
            "\n{} (netns {}): {}\n",
            b.dst,
            b.netns.map(|n| n.to_string()).unwrap_or_else(|| "?".into()),
            usage_line(b)
        ));
        let failers: Vec<String> = b
            .failers
            .iter()
            .map(|f| match &f.container {
                Some(c) => format!("{} ({}) [{}] x{}", f.comm, f.pid, c.short(), f.failures),
                None => format!("{} ({}) x{}", f.comm, f.pid, f.failures),
            })
            .collect();
        out.push_str(&format!("  failing: {}\n", failers.join(", ")));
        if b.holders.is_empty() {
            out.push_str("  holders: none found (the namespace or its sockets are gone)\n");
            continue;
        }
        let mut t = Table::new();
        t.load_preset(NOTHING);
        t.set_header(["  HOLDER", "PID", "STATE", "SOCKETS", "TIME_WAIT", "SHARE"]);
        for h in &b.holders {
            t.add_row(vec![
                Cell::new(format!("  {}", h.label())),
                Cell::new(h.pid.map(|p| p.to_string()).unwrap_or_else(|| "-".into()))
                    .set_alignment(CellAlignment::Right),
                Cell::new(match (h.pid, h.alive) {
                    (None, _) => "opened before tracing",
                    (Some(_), true) => "alive",
                    (Some(_), false) => "exited",
                }),
                Cell::new(h.sockets).set_alignment(CellAlignment::Right),
                Cell::new(h.time_wait).set_alignment(CellAlignment::Right),
                Cell::new(format!("{:.0}%", h.share * 100.0)).set_alignment(CellAlignment::Right),
            ]);
        }
        for line in t.to_string().lines() {
            out.push_str(line.trim_end());
            out.push('\n');
        }
    }
    out
}

/// The human summary printed when tracing stops.
pub fn human_summary(s: &Summary) -> String {
    let mut out = format!(
        "\n{} exhaustion failure{} in {:.1}s (backend {}, exact in-kernel counts)",
        s.failures_total,
        if s.failures_total == 1 { "" } else { "s" },
        s.duration_s,
        s.backend
    );
    if s.dropped_events > 0 {
        out.push_str(&format!(
            "; {} event{} not shown (ring buffer full), still counted",
            s.dropped_events,
            if s.dropped_events == 1 { "" } else { "s" }
        ));
    }
    if s.lru_evictions > 0 {
        out.push_str(&format!(
            "; {} socket owner(s) forgotten (ownership maps full: raise --max-tracked-sockets)",
            s.lru_evictions
        ));
    }
    if s.uncounted_keys > 0 {
        out.push_str(&format!(
            "; {} failure(s) missing from the per-process table (counts map full)",
            s.uncounted_keys
        ));
    }
    out.push('\n');
    for (kind, why) in &s.not_watched {
        out.push_str(&format!("Not watched: {kind} ({why})\n"));
    }
    if s.offenders.is_empty() {
        out.push_str("No offenders.\n");
        return out;
    }
    let mut t = Table::new();
    t.load_preset(NOTHING);
    t.set_header([
        "PID",
        "COMM",
        "FAILURES",
        "FIRST",
        "LAST",
        "TOP DESTINATIONS",
    ]);
    for o in &s.offenders {
        t.add_row(vec![
            Cell::new(o.pid).set_alignment(CellAlignment::Right),
            Cell::new(&o.comm),
            Cell::new(o.failures).set_alignment(CellAlignment::Right),
            Cell::new(hms(o.first_unix_ns)),
            Cell::new(hms(o.last_unix_ns)),
            Cell::new(top_destinations(o, 3)),
        ]);
    }
    out.push_str("Offenders:\n");
    for line in t.to_string().lines() {
        out.push_str(line.trim_end());
        out.push('\n');
    }
    if !s.blame.is_empty() {
        out.push_str("\nWho holds the ports:");
        out.push_str(&human_blame(&s.blame));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{
        aggregate::Offender,
        model::{Family, Proto},
    };
    use portexhaust_common::{Backend, Site};

    fn failure() -> Failure {
        Failure {
            ts_unix_ns: 1_764_069_600_123_456_789,
            pid: 4242,
            tid: 4243,
            uid: 0,
            comm: "python3".into(),
            cgroup_id: 77,
            netns: Some(4026531840),
            family: Family::Ipv4,
            proto: Proto::Tcp,
            dst: "127.0.0.1:27017".parse().expect("addr"),
            src: Some("127.0.0.1".parse().expect("ip")),
            errno: 99,
            site: Site::InetHashConnect,
            backend: Backend::Tracepoint,
            container: None,
        }
    }

    #[test]
    fn json_event_has_exactly_the_documented_keys() {
        let v: serde_json::Value = serde_json::from_str(&json_line(&failure())).expect("json");
        let obj = v.as_object().expect("object");
        let keys: Vec<&str> = obj.keys().map(String::as_str).collect();
        let mut want = vec![
            "type",
            "ts",
            "pid",
            "tid",
            "uid",
            "comm",
            "cgroup_id",
            "netns",
            "family",
            "proto",
            "dst",
            "src",
            "errno",
            "errname",
            "site",
            "backend",
            "container",
        ];
        let mut got = keys.clone();
        got.sort_unstable();
        want.sort_unstable();
        assert_eq!(got, want);
        assert_eq!(v["type"], "failure");
        assert_eq!(v["ts"], "2025-11-25T11:20:00.123456Z");
        assert_eq!(v["dst"], "127.0.0.1:27017");
        assert_eq!(v["errname"], "EADDRNOTAVAIL");
        assert_eq!(v["site"], "__inet_hash_connect");
        assert_eq!(v["family"], "ipv4");
        assert_eq!(v["netns"], 4026531840u64);
    }

    #[test]
    fn json_event_nulls_unknown_source_and_brackets_ipv6() {
        let mut f = failure();
        f.src = None;
        f.netns = None;
        f.family = Family::Ipv6;
        f.dst = "[::1]:80".parse().expect("addr");
        let v: serde_json::Value = serde_json::from_str(&json_line(&f)).expect("json");
        assert!(v["src"].is_null());
        assert!(v["netns"].is_null());
        assert_eq!(v["dst"], "[::1]:80");
    }

    #[test]
    fn container_in_json_and_human_output() {
        let mut f = failure();
        assert!(
            serde_json::from_str::<serde_json::Value>(&json_line(&f)).expect("json")["container"]
                .is_null()
        );
        f.container = Some(std::sync::Arc::new(ContainerInfo {
            runtime: crate::container::Runtime::Containerd,
            id: "0123456789abcdef".repeat(4),
            pod: Some("7c9a4e2b-1f3d-4a5b-9c8d-0e1f2a3b4c5d".into()),
        }));
        let v: serde_json::Value = serde_json::from_str(&json_line(&f)).expect("json");
        assert_eq!(v["container"]["runtime"], "containerd");
        assert_eq!(v["container"]["id"], "0123456789abcdef".repeat(4));
        assert_eq!(
            v["container"]["pod"],
            "7c9a4e2b-1f3d-4a5b-9c8d-0e1f2a3b4c5d"
        );
        let l = human_line(&f);
        assert_eq!(
            human_header().find("CONTAINER"),
            l.find("containerd:0123456789ab")
        );
    }

    fn summary() -> Summary {
        Summary {
            backend: "tracepoint",
            watched: vec!["connect"],
            not_watched: vec![("bind", "no fexit or kprobe".into())],
            duration_s: 2.5,
            failures_total: 30,
            dropped_events: 2,
            uncounted_keys: 0,
            offenders: vec![Offender {
                pid: 4242,
                comm: "python3".into(),
                failures: 30,
                first_unix_ns: 1_764_069_600_000_000_000,
                last_unix_ns: 1_764_069_601_000_000_000,
                destinations: vec![DestCount {
                    dst: "127.0.0.1:27017".into(),
                    errno: 99,
                    failures: 30,
                }],
            }],
            blame: vec![],
            tracked_sockets: 0,
            lru_evictions: 0,
        }
    }

    #[test]
    fn json_summary_shape() {
        let v: serde_json::Value = serde_json::from_str(&json_summary(&summary())).expect("json");
        let mut keys: Vec<&str> = v
            .as_object()
            .expect("obj")
            .keys()
            .map(String::as_str)
            .collect();
        keys.sort_unstable();
        assert_eq!(
            keys,
            [
                "backend",
                "blame",
                "dropped_events",
                "duration_s",
                "failures_total",
                "lru_evictions",
                "not_watched",
                "offenders",
                "tracked_sockets",
                "type",
                "watched"
            ]
        );
        assert_eq!(v["watched"][0], "connect");
        assert_eq!(v["not_watched"]["bind"], "no fexit or kprobe");
        let o = &v["offenders"][0];
        assert_eq!(o["pid"], 4242);
        assert_eq!(o["first_ts"], "2025-11-25T11:20:00.000000Z");
        assert_eq!(o["destinations"][0]["dst"], "127.0.0.1:27017");
        assert_eq!(o["destinations"][0]["errno"], 99);
        assert_eq!(o["destinations"][0]["failures"], 30);
    }

    #[test]
    fn human_output_is_aligned() {
        let h = human_header();
        let l = human_line(&failure());
        // Every column of the row starts where its header starts.
        for name in ["PID", "COMM", "DESTINATION", "SITE"] {
            let at = h.find(name).expect("header column");
            assert!(at <= l.len(), "{name}");
        }
        assert_eq!(h.find("COMM"), l.find("python3"));
        assert_eq!(h.find("DESTINATION"), l.find("127.0.0.1:27017"));
        assert!(l.ends_with("__inet_hash_connect -"), "{l:?}");
        assert_eq!(h.find("CONTAINER"), l.find(" -").map(|i| i + 1));
        let s = human_summary(&summary());
        assert!(s.contains("30 exhaustion failures"));
        assert!(s.contains("2 events not shown"));
        assert!(s.contains("127.0.0.1:27017 EADDRNOTAVAIL x30"));
    }
}
