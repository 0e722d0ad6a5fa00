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
    m.set_destinations(&[DestRow::new(
        Some(1),
        None,
        "10.0.0.1:80".parse().expect("addr"),
        Some(10),
        1,
        [(TcpState::Established, 1)].into(),
    )]);
    m.set_backend("tracepoint");
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
