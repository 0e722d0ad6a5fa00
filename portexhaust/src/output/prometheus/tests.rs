use portexhaust_common::{Backend, Cause, Site, TcpState};

use super::*;
use crate::schema::{ByState, Errno, Family as AddrFamily, Proto, Runtime, Ts};

fn key(pid: u32, last_octet: u8, port: u16) -> ExactId {
    ExactId {
        pid,
        dst: format!("10.0.0.{last_octet}:{port}").parse().expect("addr"),
        errno: Errno::EADDRNOTAVAIL,
        proto: Proto::Tcp,
        cause: Cause::Exhausted,
    }
}

fn val(count: u64, comm: &str) -> (u64, String) {
    (count, comm.to_string())
}

fn exacts(v: &[(ExactId, (u64, String))]) -> Vec<Exact> {
    v.iter()
        .map(|(id, (count, comm))| Exact {
            id: *id,
            count: *count,
            unstreamed: 0,
            first: Ts(0),
            last: Ts(0),
            comm: comm.clone(),
        })
        .collect()
}

fn failure(pid: u32, container: Option<ContainerInfo>) -> Failure {
    Failure {
        ts: Ts(0),
        pid,
        tid: pid,
        uid: 0,
        comm: "app".into(),
        cgroup_id: 1,
        netns: None,
        family: AddrFamily::Ipv4,
        proto: Proto::Tcp,
        dst: "10.0.0.1:80".parse().expect("addr"),
        src: None,
        errno: Errno::EADDRNOTAVAIL,
        cause: portexhaust_common::Cause::Exhausted,
        site: Site::InetHashConnect,
        backend: Backend::Tracepoint,
        container: container.map(Arc::new),
        nat: None,
    }
}

/// value of the sample line starting with `prefix` in the Prometheus text output.
fn sample(text: &str, prefix: &str) -> Option<f64> {
    text.lines()
        .find(|l| l.starts_with(prefix))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
}

/// One scrape, then the next refresh: what Prometheus sees a second later.
fn settle(m: &Metrics) {
    m.encode(false);
    m.release_new_series();
}

fn docker() -> ContainerInfo {
    ContainerInfo {
        runtime: Runtime::Docker,
        id: "ab".repeat(32),
        pod: None,
    }
}

#[test]
fn failure_counters_follow_the_kernel_counts_exactly() {
    let m = Metrics::new(MetricsOptions::default());
    m.observe_failure(&failure(7, Some(docker())));
    m.update_counts(&exacts(&[(key(7, 1, 80), val(5, "app"))]), |_| None);
    settle(&m);
    m.update_counts(
        &exacts(&[
            (key(7, 1, 80), val(12, "app")),
            (key(8, 2, 443), val(3, "curl")),
        ]),
        |pid| (pid == 8).then(docker),
    );
    settle(&m);
    let t = m.encode(false);
    let hex = "ab".repeat(32);
    assert_eq!(
        sample(
            &t,
            &format!(
                "portexhaust_failures_total{{comm=\"app\",errno=\"EADDRNOTAVAIL\",cause=\"exhausted\",proto=\"tcp\",dst=\"10.0.0.1:80\",container_runtime=\"docker\",container_id=\"{hex}\",pod_uid=\"\"}}"
            )
        ),
        Some(12.0),
        "{t}"
    );
    assert_eq!(
        sample(&t, "portexhaust_failures_total{comm=\"curl\""),
        Some(3.0),
        "{t}"
    );
}

#[test]
fn new_series_are_served_at_zero_before_their_count() {
    let m = Metrics::new(MetricsOptions::default());
    let series = "portexhaust_failures_total{comm=\"app\"";
    m.update_counts(&exacts(&[(key(7, 1, 80), val(5, "app"))]), |_| None);
    // No scrape yet: a refresh does not release it.
    m.release_new_series();
    m.update_counts(&exacts(&[(key(7, 1, 80), val(9, "app"))]), |_| None);
    assert_eq!(sample(&m.encode(false), series), Some(0.0));
    // Served at 0 once: the next refresh gives it everything counted meanwhile.
    m.release_new_series();
    assert_eq!(sample(&m.encode(false), series), Some(9.0));
    // A new key of an existing label set (another pid, same comm and destination) is not
    // held: its series already has a starting point.
    m.update_counts(
        &exacts(&[
            (key(7, 1, 80), val(9, "app")),
            (key(8, 1, 80), val(2, "app")),
        ]),
        |_| None,
    );
    assert_eq!(sample(&m.encode(false), series), Some(11.0));
}

#[test]
fn container_labels_can_be_turned_off() {
    let m = Metrics::new(MetricsOptions {
        container_labels: false,
        ..Default::default()
    });
    m.observe_failure(&failure(7, Some(docker())));
    m.update_counts(&exacts(&[(key(7, 1, 80), val(5, "app"))]), |_| {
        panic!("not asked")
    });
    settle(&m);
    let t = m.encode(false);
    assert!(
        t.contains("container_runtime=\"\",container_id=\"\",pod_uid=\"\"} 5"),
        "{t}"
    );
}

#[test]
fn destinations_beyond_top_k_fold_into_other_and_stay_there() {
    let m = Metrics::new(MetricsOptions {
        top_k: 2,
        ..Default::default()
    });
    // Three newcomers at once: the two with most failures are admitted.
    m.update_counts(
        &exacts(&[
            (key(1, 1, 80), val(1, "a")),
            (key(1, 2, 80), val(9, "a")),
            (key(1, 3, 80), val(5, "a")),
        ]),
        |_| None,
    );
    settle(&m);
    // Later, 10.0.0.1 grows past everyone: it stays in `other` (no counter resets).
    m.update_counts(
        &exacts(&[
            (key(1, 1, 80), val(100, "a")),
            (key(1, 2, 80), val(9, "a")),
            (key(1, 3, 80), val(5, "a")),
            (key(2, 2, 80), val(4, "b")),
        ]),
        |_| None,
    );
    settle(&m);
    let t = m.encode(false);
    let s = |dst: &str, comm: &str| {
        sample(
            &t,
            &format!(
                "portexhaust_failures_total{{comm=\"{comm}\",errno=\"EADDRNOTAVAIL\",cause=\"exhausted\",proto=\"tcp\",dst=\"{dst}\""
            ),
        )
    };
    assert_eq!(s("10.0.0.2:80", "a"), Some(9.0), "{t}");
    assert_eq!(s("10.0.0.3:80", "a"), Some(5.0), "{t}");
    assert_eq!(s("other", "a"), Some(100.0), "{t}");
    // An admitted destination is shared by every process.
    assert_eq!(s("10.0.0.2:80", "b"), Some(4.0), "{t}");
}

#[test]
fn series_are_capped() {
    let m = Metrics::new(MetricsOptions {
        max_series: 2,
        ..Default::default()
    });
    let counts: Vec<_> = (1..=4)
        .map(|pid| (key(pid, 1, 80), val(u64::from(pid), &format!("c{pid}"))))
        .collect();
    m.update_counts(&exacts(&counts), |_| None);
    settle(&m);
    let t = m.encode(false);
    let lines = t
        .lines()
        .filter(|l| l.starts_with("portexhaust_failures_total{"))
        .count();
    assert_eq!(lines, 3, "{t}");
    // Admission by count: c4 (4) and c3 (3) keep their names; c2 + c1 fold.
    assert_eq!(
        sample(&t, "portexhaust_failures_total{comm=\"other\""),
        Some(3.0),
        "{t}"
    );
}

#[test]
fn kernel_totals_are_monotonic_counters() {
    let m = Metrics::new(MetricsOptions::default());
    m.set_dropped(5);
    m.set_dropped(3); // never goes back
    m.set_dropped(8);
    m.set_failures_seen(10);
    m.set_lru_evictions(2);
    let t = m.encode(false);
    assert_eq!(
        sample(&t, "portexhaust_dropped_events_total "),
        Some(8.0),
        "{t}"
    );
    assert_eq!(sample(&t, "portexhaust_failures_seen_total "), Some(10.0));
    assert_eq!(sample(&t, "portexhaust_lru_evictions_total "), Some(2.0));
    assert_eq!(
        sample(&t, "portexhaust_failures_uncounted_total "),
        Some(0.0)
    );
}

#[test]
fn destination_gauges_rank_and_fold() {
    let m = Metrics::new(MetricsOptions {
        top_k: 1,
        ..Default::default()
    });
    let row = |dst: &str, in_use: u64, tw: u64| {
        let by_state: ByState = [
            (TcpState::TimeWait, tw),
            (TcpState::Established, in_use - tw),
        ]
        .into();
        DestRow::new(
            Some(4026531840),
            Some("127.0.0.1".parse().expect("ip")),
            dst.parse().expect("addr"),
            Some(100),
            in_use,
            by_state,
        )
    };
    m.set_destinations(&[
        row("10.0.0.1:80", 10, 1),
        row("10.0.0.2:80", 90, 80),
        row("10.0.0.3:80", 20, 5),
    ]);
    let t = m.encode(false);
    let top = "{netns=\"4026531840\",src=\"127.0.0.1\",dst=\"10.0.0.2:80\",proto=\"tcp\"}";
    let other = "{netns=\"\",src=\"\",dst=\"other\",proto=\"\"}";
    assert_eq!(
        sample(&t, &format!("portexhaust_ports_in_use{top}")),
        Some(90.0),
        "{t}"
    );
    assert_eq!(
        sample(&t, &format!("portexhaust_port_utilisation_ratio{top}")),
        Some(0.9)
    );
    assert_eq!(
        sample(&t, &format!("portexhaust_ports_in_use{other}")),
        Some(30.0)
    );
    assert_eq!(
        sample(&t, &format!("portexhaust_time_wait_sockets{other}")),
        Some(6.0)
    );
    assert_eq!(
        sample(&t, &format!("portexhaust_port_utilisation_ratio{other}")),
        Some(0.2)
    );
    // A new set replaces the old one entirely.
    m.set_destinations(&[row("10.0.0.9:80", 1, 0)]);
    let t = m.encode(false);
    assert!(!t.contains("10.0.0.2:80"), "{t}");
    assert_eq!(
        sample(&t, &format!("portexhaust_ports_in_use{other}")),
        None,
        "{t}"
    );
}

#[test]
fn info_and_backend() {
    let m = Metrics::new(MetricsOptions::default());
    m.set_backend("kprobe");
    m.set_backend("tracepoint");
    let t = m.encode(false);
    assert_eq!(
        sample(&t, "portexhaust_backend{backend=\"tracepoint\"}"),
        Some(1.0),
        "{t}"
    );
    assert!(!t.contains("kprobe"), "{t}");
    assert!(
        t.contains(&format!(
            "portexhaust_build_info{{version=\"{}\"",
            env!("CARGO_PKG_VERSION")
        )),
        "{t}"
    );
    let om = m.encode(true);
    assert!(om.ends_with("# EOF\n"), "{om}");
}

/// Every metric and label the Grafana dashboard queries is one this exporter serves
/// (`instance` and `job` are added by Prometheus). The fleet test runs the queries too.
#[test]
fn dashboard_queries_only_exported_metrics_and_labels() {
    let dash: serde_json::Value = serde_json::from_str(include_str!(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../deploy/grafana/portexhaust.json"
    )))
    .expect("dashboard is JSON");
    let m = Metrics::new(MetricsOptions::default());
    m.update_counts(&exacts(&[(key(1, 1, 80), val(1, "a"))]), |_| None);
    m.set_destinations(&[conn_row(
        "10.0.0.1:80",
        "127.0.0.1",
        3,
        &[(14, 1)],
        Some(30.0),
    )]);
    m.set_backend("tracepoint");
    settle(&m);
    let text = m.encode(false);
    let mut names: HashSet<String> = HashSet::new();
    let mut labels: HashSet<String> = ["instance", "job"].map(String::from).into();
    for l in text.lines().filter(|l| !l.starts_with('#')) {
        let (name, rest) = l
            .split_once('{')
            .unwrap_or((l.split(' ').next().unwrap_or(""), ""));
        names.insert(name.to_string());
        for pair in rest.split("\",").filter(|p| p.contains('=')) {
            labels.insert(pair.split('=').next().unwrap_or("").to_string());
        }
    }
    let mut exprs = Vec::new();
    let mut ids = HashSet::new();
    for p in dash["panels"].as_array().expect("panels") {
        assert!(
            ids.insert(p["id"].as_u64().expect("id")),
            "duplicate panel id"
        );
        for t in p["targets"].as_array().into_iter().flatten() {
            exprs.push(t["expr"].as_str().expect("expr").to_string());
        }
    }
    assert!(exprs.len() >= 10, "{exprs:?}");
    let ident = |c: char| c.is_ascii_alphanumeric() || c == '_';
    for e in &exprs {
        for word in e
            .split(|c: char| !ident(c))
            .filter(|w| w.starts_with("portexhaust_"))
        {
            assert!(
                names.contains(word),
                "{word} in {e:?} is not exported: {names:?}"
            );
        }
        for clause in e.split(" by (").skip(1).chain(e.split(" on (").skip(1)) {
            let inside = clause.split(')').next().unwrap_or("");
            for label in inside.split(',').map(str::trim).filter(|l| !l.is_empty()) {
                assert!(labels.contains(label), "label {label} in {e:?}: {labels:?}");
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// The exposition, parsed: the new series are checked on what a scraper would read, not on
// substrings.

/// One sample line of a text exposition.
#[derive(Clone, Debug)]
struct Line {
    name: String,
    labels: Vec<(String, String)>,
    value: f64,
}

impl Line {
    fn label(&self, k: &str) -> Option<&str> {
        self.labels
            .iter()
            .find(|(n, _)| n == k)
            .map(|(_, v)| v.as_str())
    }
    /// The labels but `le`: which series of a histogram the line belongs to.
    fn series(&self) -> Vec<(String, String)> {
        self.labels
            .iter()
            .filter(|(k, _)| k != "le")
            .cloned()
            .collect()
    }
}

/// What a scrape holds: `# TYPE` of each family, `# UNIT` (OpenMetrics) and the samples.
#[derive(Debug, Default)]
struct Exposition {
    types: HashMap<String, String>,
    units: HashMap<String, String>,
    lines: Vec<Line>,
}

impl Exposition {
    fn of(&self, name: &str) -> Vec<&Line> {
        self.lines.iter().filter(|l| l.name == name).collect()
    }
}

fn is_name(s: &str) -> bool {
    let mut c = s.chars();
    c.next()
        .is_some_and(|f| f.is_ascii_alphabetic() || f == '_' || f == ':')
        && c.all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':')
}

/// The text format's rules (Prometheus 0.0.4 and OpenMetrics 1.0 text, the subset this
/// exporter writes): `# HELP`/`# TYPE`/`# UNIT` comments, `name{label="value",...} value`
/// with `\\`, `\"` and `\n` escapes in label values, a float value (`+Inf`, `NaN` allowed).
/// Anything else panics with the line.
fn parse(text: &str) -> Exposition {
    let mut e = Exposition::default();
    for l in text.lines() {
        if let Some(c) = l.strip_prefix("# ") {
            let mut w = c.splitn(3, ' ');
            match (w.next(), w.next(), w.next()) {
                (Some("TYPE"), Some(n), Some(t)) => {
                    assert!(is_name(n), "{l}");
                    assert!(
                        e.types.insert(n.to_string(), t.to_string()).is_none(),
                        "TYPE twice: {l}"
                    );
                }
                (Some("UNIT"), Some(n), Some(u)) => {
                    e.units.insert(n.to_string(), u.to_string());
                }
                (Some("HELP"), Some(n), _) => assert!(is_name(n), "{l}"),
                (Some("EOF"), None, None) => {}
                _ => panic!("bad comment {l:?}"),
            }
            continue;
        }
        let (name, rest) = match l.find(['{', ' ']) {
            Some(i) => l.split_at(i),
            None => panic!("no value: {l:?}"),
        };
        assert!(is_name(name), "bad name in {l:?}");
        let mut labels = Vec::new();
        let mut rest = rest;
        if let Some(r) = rest.strip_prefix('{') {
            let mut chars = r.char_indices();
            let end;
            loop {
                // label name up to '='
                let start = match chars.next() {
                    Some((_, '}')) => {
                        end = chars.next().map(|(i, _)| i);
                        break;
                    }
                    Some((i, _)) => i,
                    None => panic!("unterminated labels: {l:?}"),
                };
                let eq = r[start..].find('=').map(|i| start + i).expect("=");
                let key = &r[start..eq];
                assert!(is_name(key), "bad label name {key:?} in {l:?}");
                while chars.next().is_some_and(|(i, _)| i < eq) {}
                assert_eq!(chars.next().map(|(_, c)| c), Some('"'), "{l:?}");
                let mut value = String::new();
                loop {
                    match chars.next().map(|(_, c)| c) {
                        Some('\\') => match chars.next().map(|(_, c)| c) {
                            Some('\\') => value.push('\\'),
                            Some('"') => value.push('"'),
                            Some('n') => value.push('\n'),
                            other => panic!("bad escape {other:?} in {l:?}"),
                        },
                        Some('"') => break,
                        Some(c) => value.push(c),
                        None => panic!("unterminated value: {l:?}"),
                    }
                }
                labels.push((key.to_string(), value));
                match chars.next().map(|(_, c)| c) {
                    Some(',') => {}
                    Some('}') => {
                        end = chars.next().map(|(i, _)| i);
                        break;
                    }
                    other => panic!("after a label: {other:?} in {l:?}"),
                }
            }
            rest = &r[end.expect("value after labels")..];
        }
        let value = rest
            .strip_prefix(' ')
            .unwrap_or_else(|| panic!("no space before the value: {l:?}"));
        let value = value.split(' ').next().unwrap_or(value);
        let value: f64 = match value {
            "+Inf" => f64::INFINITY,
            "-Inf" => f64::NEG_INFINITY,
            v => v.parse().unwrap_or_else(|_| panic!("bad value in {l:?}")),
        };
        let mut keys: Vec<&str> = labels.iter().map(|(k, _)| k.as_str()).collect();
        keys.sort_unstable();
        keys.dedup();
        assert_eq!(keys.len(), labels.len(), "a label twice: {l:?}");
        e.lines.push(Line {
            name: name.to_string(),
            labels,
            value,
        });
    }
    e
}

/// A histogram family by the rules: per series, `_bucket`s with increasing `le` ending at
/// `+Inf`, cumulative counts that never go down, `+Inf` = `_count`, and a `_sum`. Returns each
/// series' (labels, buckets (le, cumulative), sum, count).
#[allow(clippy::type_complexity)]
fn histograms(
    e: &Exposition,
    family: &str,
) -> Vec<(Vec<(String, String)>, Vec<(f64, f64)>, f64, f64)> {
    assert_eq!(
        e.types.get(family).map(String::as_str),
        Some("histogram"),
        "{family}"
    );
    let mut by_series: Vec<(Vec<(String, String)>, Vec<(f64, f64)>)> = Vec::new();
    for l in e.of(&format!("{family}_bucket")) {
        let le = match l.label("le").expect("le") {
            "+Inf" => f64::INFINITY,
            v => v.parse().unwrap_or_else(|_| panic!("le {v}")),
        };
        let s = l.series();
        match by_series.iter_mut().find(|(k, _)| *k == s) {
            Some((_, b)) => b.push((le, l.value)),
            None => by_series.push((s, vec![(le, l.value)])),
        }
    }
    by_series
        .into_iter()
        .map(|(s, b)| {
            assert!(b.windows(2).all(|w| w[0].0 < w[1].0), "le order {b:?}");
            assert!(
                b.windows(2).all(|w| w[0].1 <= w[1].1),
                "not cumulative {b:?}"
            );
            assert_eq!(b.last().map(|x| x.0), Some(f64::INFINITY), "{b:?}");
            let one = |suffix: &str| {
                let v: Vec<f64> = e
                    .of(&format!("{family}{suffix}"))
                    .into_iter()
                    .filter(|l| l.series() == s)
                    .map(|l| l.value)
                    .collect();
                assert_eq!(v.len(), 1, "{family}{suffix} of {s:?}");
                v[0]
            };
            let (sum, count) = (one("_sum"), one("_count"));
            assert_eq!(b.last().map(|x| x.1), Some(count), "+Inf != _count");
            assert!(sum >= 0.0);
            (s, b, sum, count)
        })
        .collect()
}

fn labels(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

/// A census row towards `dst` with the kernel's connect statistics and a forecast.
fn conn_row(
    dst: &str,
    src: &str,
    connects: u64,
    hist: &[(usize, u64)],
    forecast_s: Option<f64>,
) -> DestRow {
    let mut b = vec![0u64; LATENCY_BUCKETS];
    for (i, n) in hist {
        b[*i] = *n;
    }
    let mut h = [0u64; LATENCY_BUCKETS];
    h.copy_from_slice(&b);
    DestRow {
        connects: Some(connects),
        latency_us: crate::engine::rates::latency(&h),
        forecast_s,
        ..DestRow::new(
            Some(4026531840),
            Some(src.parse().expect("ip")),
            dst.parse().expect("addr"),
            Some(100),
            10,
            [(TcpState::TimeWait, 10)].into(),
        )
    }
}

const NS0: &str = "4026531840";

#[test]
fn connect_duration_is_the_kernels_log2_histogram_in_seconds() {
    let m = Metrics::new(MetricsOptions::default());
    // 3 connects in [16.384, 32.768) us, 1 in [1.048576, 2.097152) ms, 1 above 2^31 ns, and
    // 2 below a microsecond (served in the first bucket).
    let row = conn_row(
        "10.0.0.1:80",
        "127.0.0.1",
        40,
        &[(3, 2), (14, 3), (20, 1), (31, 1)],
        None,
    );
    m.set_destinations(std::slice::from_ref(&row));
    // A new series is served at 0 first (so that rate() sees its start).
    let e = parse(&m.encode(false));
    let h = histograms(&e, "portexhaust_connect_duration_seconds");
    assert_eq!(h.len(), 1, "{e:?}");
    assert_eq!(h[0].3, 0.0, "held at 0 for one scrape");
    m.release_new_series();
    let text = m.encode(false);
    let e = parse(&text);
    let h = histograms(&e, "portexhaust_connect_duration_seconds");
    assert_eq!(h.len(), 1, "{text}");
    let (series, buckets, sum, count) = &h[0];
    assert_eq!(
        *series,
        labels(&[("netns", NS0), ("dst", "10.0.0.1:80"), ("proto", "tcp")])
    );
    assert_eq!(*count, 7.0);
    // le = 2^(i+1) ns in seconds, from 2^10 ns on, then +Inf.
    let les: Vec<f64> = buckets.iter().map(|b| b.0).collect();
    let mut want: Vec<f64> = (10..=31).map(|p| (1u64 << p) as f64 / 1e9).collect();
    want.push(f64::INFINITY);
    assert_eq!(les, want, "{text}");
    let at = |le: f64| buckets.iter().find(|b| b.0 == le).map(|b| b.1);
    assert_eq!(
        at(1.024e-6),
        Some(2.0),
        "sub-microsecond connects in the first"
    );
    assert_eq!(
        at(16.384e-6),
        Some(2.0),
        "[16.384, 32.768) us is not <= 16.384 us"
    );
    assert_eq!(at(32.768e-6), Some(5.0));
    assert_eq!(at(2.097152e-3), Some(6.0));
    assert_eq!(at(2.147483648), Some(6.0), "above 2^31 ns only in +Inf");
    // The sum is the midpoint estimate the HELP text announces.
    let mid = (2.0 * 1.5 * 8.0 + 3.0 * 1.5 * 16384.0 + 1.5 * 1048576.0 + 2147483648.0) / 1e9;
    assert!((sum - mid).abs() < 1e-12, "{sum} vs {mid}");
    assert!(text.contains("estimated from bucket midpoints"), "{text}");
    // OpenMetrics: the same histogram, with its unit.
    let om = m.encode(true);
    let e = parse(&om);
    assert_eq!(
        e.units
            .get("portexhaust_connect_duration_seconds")
            .map(String::as_str),
        Some("seconds"),
        "{om}"
    );
    let h = histograms(&e, "portexhaust_connect_duration_seconds");
    assert_eq!(h[0].3, 7.0);
}

#[test]
fn connections_opened_follow_the_kernels_count_and_survive_its_evictions() {
    let m = Metrics::new(MetricsOptions::default());
    let opened = |m: &Metrics| {
        let e = parse(&m.encode(false));
        assert_eq!(
            e.types
                .get("portexhaust_connections_opened_total")
                .map(String::as_str),
            Some("counter")
        );
        e.of("portexhaust_connections_opened_total")
            .into_iter()
            .map(|l| (l.label("dst").unwrap_or("").to_string(), l.value))
            .collect::<Vec<_>>()
    };
    m.set_destinations(&[conn_row("10.0.0.1:80", "127.0.0.1", 10, &[(14, 1)], None)]);
    assert_eq!(opened(&m), vec![("10.0.0.1:80".to_string(), 0.0)]);
    m.release_new_series();
    assert_eq!(opened(&m), vec![("10.0.0.1:80".to_string(), 10.0)]);
    m.set_destinations(&[conn_row("10.0.0.1:80", "127.0.0.1", 15, &[(14, 2)], None)]);
    assert_eq!(opened(&m), vec![("10.0.0.1:80".to_string(), 15.0)]);
    // The LRU map evicted the entry and made it again: its 3 are new connects, not a reset.
    m.set_destinations(&[conn_row("10.0.0.1:80", "127.0.0.1", 3, &[(14, 1)], None)]);
    assert_eq!(opened(&m), vec![("10.0.0.1:80".to_string(), 18.0)]);
    let e = parse(&m.encode(false));
    assert_eq!(
        histograms(&e, "portexhaust_connect_duration_seconds")[0].3,
        3.0
    );
    // A destination absent from a census keeps its counter (counters do not vanish).
    m.set_destinations(&[]);
    assert_eq!(opened(&m), vec![("10.0.0.1:80".to_string(), 18.0)]);
}

#[test]
fn the_rows_of_two_source_addresses_are_one_kernel_count() {
    let m = Metrics::new(MetricsOptions::default());
    let rows = [
        conn_row("10.0.0.1:80", "127.0.0.1", 10, &[(14, 4)], None),
        conn_row("10.0.0.1:80", "127.0.0.2", 10, &[(14, 4)], None),
    ];
    m.set_destinations(&rows);
    settle(&m);
    let e = parse(&m.encode(false));
    let opened = e.of("portexhaust_connections_opened_total");
    assert_eq!(opened.len(), 1, "{e:?}");
    assert_eq!(opened[0].value, 10.0);
    assert_eq!(
        histograms(&e, "portexhaust_connect_duration_seconds")[0].3,
        4.0
    );
    // The gauges keep one row per source address.
    assert_eq!(e.of("portexhaust_ports_in_use").len(), 2);
}

#[test]
fn connect_series_beyond_top_k_fold_into_other_and_stay_there() {
    let m = Metrics::new(MetricsOptions {
        top_k: 1,
        ..Default::default()
    });
    m.set_destinations(&[
        conn_row("10.0.0.1:80", "127.0.0.1", 5, &[(14, 1)], None),
        conn_row("10.0.0.2:80", "127.0.0.1", 50, &[(15, 2)], None),
    ]);
    settle(&m);
    // 10.0.0.1 grows past the admitted one later: it stays in `other` (no counter resets).
    m.set_destinations(&[
        conn_row("10.0.0.1:80", "127.0.0.1", 500, &[(14, 9)], None),
        conn_row("10.0.0.2:80", "127.0.0.1", 50, &[(15, 2)], None),
        conn_row("10.0.0.3:80", "127.0.0.1", 7, &[(16, 1)], None),
    ]);
    let e = parse(&m.encode(false));
    let opened: HashMap<Vec<(String, String)>, f64> = e
        .of("portexhaust_connections_opened_total")
        .into_iter()
        .map(|l| (l.series(), l.value))
        .collect();
    let other = labels(&[("netns", ""), ("dst", "other"), ("proto", "")]);
    assert_eq!(opened.len(), 2, "{opened:?}");
    assert_eq!(
        opened.get(&labels(&[
            ("netns", NS0),
            ("dst", "10.0.0.2:80"),
            ("proto", "tcp")
        ])),
        Some(&50.0)
    );
    assert_eq!(opened.get(&other), Some(&507.0));
    let h = histograms(&e, "portexhaust_connect_duration_seconds");
    let folded = h.iter().find(|x| x.0 == other).expect("other histogram");
    assert_eq!(folded.3, 10.0, "histograms of folded destinations add up");
}

#[test]
fn exhaustion_eta_is_the_forecast_or_no_sample() {
    let m = Metrics::new(MetricsOptions {
        top_k: 1,
        ..Default::default()
    });
    let with = |dst: &str, util: u64, eta: Option<f64>| {
        let mut r = conn_row(dst, "127.0.0.1", 1, &[], eta);
        r.in_use = util;
        r.utilisation = crate::schema::utilisation(util, r.range_size);
        r
    };
    m.set_destinations(&[
        with("10.0.0.1:80", 90, Some(42.5)),
        with("10.0.0.2:80", 50, None),
        with("10.0.0.3:80", 40, Some(600.0)),
        with("10.0.0.4:80", 30, Some(f64::INFINITY)),
    ]);
    let text = m.encode(false);
    let e = parse(&text);
    assert_eq!(
        e.types
            .get("portexhaust_exhaustion_eta_seconds")
            .map(String::as_str),
        Some("gauge")
    );
    let eta: HashMap<String, f64> = e
        .of("portexhaust_exhaustion_eta_seconds")
        .into_iter()
        .map(|l| (l.label("dst").unwrap_or("").to_string(), l.value))
        .collect();
    // The top destination's own forecast; `other` the soonest of the folded ones that have
    // one (never +Inf).
    assert_eq!(
        eta,
        [
            ("10.0.0.1:80".to_string(), 42.5),
            ("other".to_string(), 600.0)
        ]
        .into(),
        "{text}"
    );
    // Not growing any more: the sample goes away rather than staying stale.
    m.set_destinations(&[with("10.0.0.1:80", 90, None)]);
    let e = parse(&m.encode(false));
    assert!(
        e.of("portexhaust_exhaustion_eta_seconds").is_empty(),
        "{e:?}"
    );
    // A full range is 0 s away.
    m.set_destinations(&[with("10.0.0.1:80", 100, Some(0.0))]);
    let e = parse(&m.encode(false));
    assert_eq!(
        e.of("portexhaust_exhaustion_eta_seconds")
            .first()
            .map(|l| l.value),
        Some(0.0)
    );
}

#[test]
fn failures_are_labelled_with_their_cause() {
    let m = Metrics::new(MetricsOptions::default());
    let collision = ExactId {
        cause: Cause::TupleCollision,
        ..key(7, 1, 80)
    };
    m.update_counts(
        &exacts(&[(key(7, 1, 80), val(5, "app")), (collision, val(2, "app"))]),
        |_| None,
    );
    settle(&m);
    let e = parse(&m.encode(false));
    let by_cause: HashMap<String, f64> = e
        .of("portexhaust_failures_total")
        .into_iter()
        .map(|l| (l.label("cause").expect("cause").to_string(), l.value))
        .collect();
    assert_eq!(
        by_cause,
        [
            ("exhausted".to_string(), 5.0),
            ("tuple_collision".to_string(), 2.0)
        ]
        .into()
    );
}

#[test]
fn no_series_carries_an_instance_label() {
    // The scrape adds `instance`; one of ours would clash with it (Prometheus renames ours
    // to exported_instance) and break the joins with node_exporter's series.
    let m = Metrics::new(MetricsOptions::default());
    m.update_counts(&exacts(&[(key(7, 1, 80), val(5, "app"))]), |_| None);
    m.set_destinations(&[conn_row(
        "10.0.0.1:80",
        "127.0.0.1",
        3,
        &[(14, 1)],
        Some(9.0),
    )]);
    m.set_backend("tp-btf");
    settle(&m);
    let e = parse(&m.encode(false));
    assert!(e.lines.len() > 30, "{e:?}");
    for l in &e.lines {
        assert!(
            l.label("instance").is_none() && l.label("job").is_none(),
            "{l:?}"
        );
    }
}

fn nat_entry(drops: u64, dst_octet: u8, in_use: u64) -> crate::schema::NatEntry {
    crate::schema::NatEntry {
        router_netns: 4026532001,
        proto: Proto::Tcp,
        dst: format!("10.0.0.{dst_octet}:443").parse().expect("addr"),
        nat_addr: "192.0.2.1".parse().expect("addr"),
        drops,
        failers: Vec::new(),
        conntrack_entries: Some(in_use),
        in_use: Some(in_use),
        range: Some(crate::schema::NatRange {
            lo: 40000,
            hi: 40009,
            source: "nft".into(),
        }),
        utilisation: Some(in_use as f64 / 10.0),
        holders: Vec::new(),
        insert_failed_delta: None,
    }
}

#[test]
fn nat_drops_count_exactly_and_fold_beyond_top_k() {
    let m = Metrics::new(MetricsOptions {
        top_k: 2,
        ..Default::default()
    });
    m.set_nat(&[nat_entry(5, 9, 10)]);
    m.set_nat(&[nat_entry(12, 9, 10), nat_entry(3, 8, 4), nat_entry(7, 7, 2)]);
    let text = m.encode(false);
    let own = "portexhaust_nat_drops_total{router_netns=\"4026532001\",dst=\"10.0.0.9:443\",nat_addr=\"192.0.2.1\",proto=\"tcp\"}";
    assert_eq!(sample(&text, own), Some(12.0), "{text}");
    assert_eq!(
        sample(
            &text,
            "portexhaust_nat_drops_total{router_netns=\"\",dst=\"other\",nat_addr=\"\",proto=\"\"}"
        ),
        Some(7.0),
        "the third key folds into other: {text}"
    );
    assert_eq!(
        sample(
            &text,
            "portexhaust_nat_port_utilisation_ratio{router_netns=\"4026532001\",dst=\"10.0.0.9:443\""
        ),
        Some(1.0),
        "{text}"
    );
    assert_eq!(
        sample(
            &text,
            "portexhaust_nat_port_range_size{router_netns=\"4026532001\",dst=\"10.0.0.9:443\""
        ),
        Some(10.0)
    );
    // A count that does not rise adds nothing: the counter stays exact.
    m.set_nat(&[nat_entry(12, 9, 3)]);
    let text = m.encode(false);
    assert_eq!(sample(&text, own), Some(12.0));
    assert_eq!(
        sample(
            &text,
            "portexhaust_nat_ports_in_use{router_netns=\"4026532001\",dst=\"10.0.0.9:443\""
        ),
        Some(3.0)
    );
    // And the exposition stays well-formed with the NAT families in it (parse panics if not).
    let _exposition = parse(&text);
}
