//! Fleet tests: Prometheus metrics scraped by a real Prometheus during a real exhaustion, and
//! container attribution through a real cgroup (the deployment files are in deploy.rs).
//!
//! Run by `cargo xtask test` after `cargo xtask setup --tests` installed the tools (Debian's
//! `prometheus`, PyPI's `kubernetes-validate`), as root and one at a time: they load eBPF
//! programs, create network namespaces and cgroups. They panic rather than skip when they
//! cannot run. Every process they start is killed on drop, every cgroup removed, and every
//! network address they use is on loopback (127.0.0.1) or inside a workload's own namespace.
mod common;

use std::{
    fs,
    io::{Read, Write},
    net::{SocketAddr, TcpListener, TcpStream},
    path::{Path, PathBuf},
    process::{Command, Stdio},
    thread,
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use common::{
    BIN, Guard, Tracer, Workload, events_and_summary, finished, repo, require_root, temp_dir,
};
use serde_json::Value;

fn unix_now() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("clock")
        .as_secs_f64()
}

/// A loopback port nobody listens on right now.
fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("free port")
        .port()
}

// ---------------------------------------------------------------------------------------------
// Processes under test.

// ---------------------------------------------------------------------------------------------
// HTTP, by hand: a test client needs no more than HTTP/1.0 GET on loopback.

fn http_get(addr: SocketAddr, target: &str, accept: Option<&str>) -> (u16, String, String) {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(5))
        .unwrap_or_else(|e| panic!("connect {addr}: {e}"));
    s.set_read_timeout(Some(Duration::from_secs(10)))
        .expect("timeout");
    let accept = accept
        .map(|a| format!("Accept: {a}\r\n"))
        .unwrap_or_default();
    write!(
        s,
        "GET {target} HTTP/1.0\r\nHost: {addr}\r\n{accept}Connection: close\r\n\r\n"
    )
    .expect("request");
    let mut raw = String::new();
    s.read_to_string(&mut raw).expect("response");
    let (head, body) = raw.split_once("\r\n\r\n").expect("header end");
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .expect("status");
    (status, head.to_string(), body.to_string())
}

fn urlencode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// A real Prometheus server on loopback with a temporary config and database, scraping one
/// target every second. Killed (and its files removed) on drop.
struct Prometheus {
    _guard: Guard,
    addr: SocketAddr,
    _dir: tempfile::TempDir,
}

impl Prometheus {
    fn start(target: SocketAddr) -> Self {
        let dir = temp_dir("prometheus");
        let config = dir.path().join("prometheus.yml");
        fs::write(
            &config,
            format!(
                "global:\n  scrape_interval: 1s\n  scrape_timeout: 1s\n  evaluation_interval: 1s\n\
                 scrape_configs:\n  - job_name: portexhaust\n    static_configs:\n      - targets: ['{target}']\n"
            ),
        )
        .expect("config");
        let addr: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().expect("addr");
        let log = fs::File::create(dir.path().join("log")).expect("log");
        let child = Command::new("prometheus")
            .arg(format!("--config.file={}", config.display()))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.path().join("data").display()
            ))
            .arg(format!("--web.listen-address={addr}"))
            .arg("--storage.tsdb.retention.time=1h")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap_or_else(|e| {
                panic!("starting prometheus: {e} (install it with `cargo xtask setup --tests`)")
            });
        let p = Self {
            _guard: Guard(child),
            addr,
            _dir: dir,
        };
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if TcpStream::connect(addr).is_ok() && http_get(addr, "/-/ready", None).0 == 200 {
                return p;
            }
            assert!(
                Instant::now() < deadline,
                "prometheus not ready after 30 s:\n{}",
                fs::read_to_string(p._dir.path().join("log")).unwrap_or_default()
            );
            thread::sleep(Duration::from_millis(200));
        }
    }

    /// An instant query through the HTTP API; panics unless Prometheus says "success".
    fn query(&self, q: &str) -> Vec<Value> {
        let (status, _, body) = http_get(
            self.addr,
            &format!("/api/v1/query?query={}", urlencode(q)),
            None,
        );
        let v: Value = serde_json::from_str(&body)
            .unwrap_or_else(|e| panic!("query {q:?}: HTTP {status}: {e}: {body}"));
        assert_eq!(v["status"], "success", "query {q:?}: {body}");
        v["data"]["result"].as_array().cloned().unwrap_or_default()
    }

    /// The value of a query that returns one series (None: no series).
    fn scalar(&self, q: &str) -> Option<f64> {
        let r = self.query(q);
        assert!(r.len() <= 1, "{q:?} returned {} series: {r:?}", r.len());
        r.first().map(|s| {
            s["value"][1]
                .as_str()
                .and_then(|v| v.parse().ok())
                .unwrap_or_else(|| panic!("{q:?}: {s}"))
        })
    }

    /// Poll `q` until `done` accepts its value, for at most `secs` seconds.
    fn wait_for(&self, q: &str, secs: u64, done: impl Fn(Option<f64>) -> bool) -> Option<f64> {
        let deadline = Instant::now() + Duration::from_secs(secs);
        loop {
            let v = self.scalar(q);
            if done(v) {
                return v;
            }
            assert!(
                Instant::now() < deadline,
                "{q:?} still {v:?} after {secs} s"
            );
            thread::sleep(Duration::from_millis(250));
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Prometheus end to end.

#[test]
#[ignore = "needs root: run with cargo xtask test"]
fn prometheus_counts_the_exact_failures_of_a_real_exhaustion() {
    require_root();
    let comm = "pxh-fleet";
    let mut w = Workload::start("v4", 37, comm, &[]);
    let metrics: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().expect("addr");
    let t = Tracer::trace(&[
        "--json",
        "--pid",
        &w.pid.to_string(),
        "--metrics-addr",
        &metrics.to_string(),
    ]);
    let prom = Prometheus::start(metrics);
    // The exporter is up and scraped before anything fails.
    prom.wait_for("up{job=\"portexhaust\"}", 30, |v| v == Some(1.0));
    assert_eq!(
        prom.scalar(&format!(
            "sum(portexhaust_failures_total{{comm=\"{comm}\"}})"
        )),
        None,
        "no failure yet"
    );
    w.go();
    let (report, n) = finished(w);
    let done = unix_now();
    // The exporter reads the kernel's counts once a second and serves a new series at 0 for
    // one scrape before giving it its count (so that rate() sees the burst). Wait for a
    // scrape taken after all of that (1 s read + 1 s scrape + 1 s read + 1 s scrape, plus
    // margin); then the value must be exact, not merely reach n at some point.
    prom.wait_for(
        "max(timestamp(portexhaust_failures_seen_total))",
        30,
        |ts| ts.is_some_and(|ts| ts > done + 5.0),
    );
    let total = prom.scalar(&format!(
        "sum(portexhaust_failures_total{{comm=\"{comm}\"}})"
    ));
    assert_eq!(total, Some(n as f64), "workload saw {n} failures: {report}");
    let dst = report["expected"][0]["dst"].as_str().expect("dst");
    let exact = format!(
        "portexhaust_failures_total{{comm=\"{comm}\",errno=\"EADDRNOTAVAIL\",proto=\"tcp\",dst=\"{dst}\"}}"
    );
    assert_eq!(prom.scalar(&exact), Some(n as f64), "{exact}");
    // Prometheus saw the series at 0 first, so increase() counts the whole burst.
    assert_eq!(
        prom.scalar(&format!("min_over_time({exact}[5m])")),
        Some(0.0)
    );
    let inc = prom
        .scalar(&format!("increase({exact}[5m])"))
        .expect("increase");
    assert!(inc >= n as f64, "increase {inc} < {n}");
    assert_eq!(
        prom.scalar("portexhaust_failures_seen_total"),
        Some(n as f64)
    );
    // auto picks the cheapest backend this kernel runs.
    let backend = &common::backends_here()[0];
    assert_eq!(
        prom.scalar(&format!("portexhaust_backend{{backend=\"{backend}\"}}")),
        Some(1.0)
    );
    assert_eq!(
        prom.scalar("count(portexhaust_build_info{version!=\"\",kernel!=\"\"})"),
        Some(1.0)
    );

    // Every query of the Grafana dashboard runs in this real Prometheus, with Grafana's
    // variables filled in as Grafana would.
    let dash: Value = serde_json::from_str(
        &fs::read_to_string(repo().join("deploy/grafana/portexhaust.json")).expect("dashboard"),
    )
    .expect("dashboard JSON");
    let mut ran = 0;
    for p in dash["panels"].as_array().expect("panels") {
        for target in p["targets"].as_array().into_iter().flatten() {
            let q = target["expr"]
                .as_str()
                .expect("expr")
                .replace("$__rate_interval", "5s")
                .replace("$__range", "5m")
                .replace("$instance", ".*");
            let r = prom.query(&q);
            if q.contains("portexhaust_failures_total") {
                assert!(!r.is_empty(), "{q:?} found nothing after {n} failures");
            }
            ran += 1;
        }
    }
    assert!(ran >= 10, "only {ran} dashboard queries");

    let (out, err, code) = t.stop();
    assert_eq!(code, 0, "trace failed:\n{err}");
    let (events, summary) = events_and_summary(&out);
    assert_eq!(summary["failures_total"], n, "{summary}");
    assert_eq!(events.len() as u64, n);
}

#[test]
#[ignore = "needs root: run with cargo xtask test"]
fn a_taken_metrics_port_is_a_clear_start_error() {
    require_root();
    let busy = TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = busy.local_addr().expect("addr");
    let mut cmd = Command::new(BIN);
    cmd.args(["trace", "--duration", "5", "--metrics-addr"])
        .arg(addr.to_string());
    match Tracer::spawn(cmd) {
        Ok(t) => {
            let (_, err, _) = t.stop();
            panic!("trace started although {addr} is taken:\n{err}");
        }
        Err((err, code)) => {
            // A bad argument, refused before anything is loaded (tests/arguments.rs).
            assert_eq!(code, Some(2), "{err}");
            let last = err.lines().last().unwrap_or("");
            assert!(
                last.starts_with(&format!("portexhaust: error: --metrics-addr {addr}: "))
                    && last.contains("in use"),
                "{err}"
            );
            assert!(!err.contains("using backend"), "loaded first:\n{err}");
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Container attribution through a real cgroup.

/// Cgroup directories made by a test: processes still in them go back to the root cgroup and
/// the directories are removed (innermost first), even when the test fails.
struct Cgroups {
    root: PathBuf,
    dirs: Vec<PathBuf>,
}

impl Cgroups {
    fn mkdir(&mut self, rel: &str) -> PathBuf {
        let mut p = self.root.clone();
        for part in rel.split('/') {
            p.push(part);
            if !p.exists() {
                fs::create_dir(&p).unwrap_or_else(|e| panic!("mkdir {}: {e}", p.display()));
                self.dirs.push(p.clone());
            }
        }
        p
    }

    fn enter(dir: &Path, pid: u32) {
        fs::write(dir.join("cgroup.procs"), pid.to_string())
            .unwrap_or_else(|e| panic!("moving {pid} into {}: {e}", dir.display()));
    }
}

impl Drop for Cgroups {
    fn drop(&mut self) {
        for d in self.dirs.iter().rev() {
            if let Ok(procs) = fs::read_to_string(d.join("cgroup.procs")) {
                for pid in procs.lines() {
                    let _ = fs::write(self.root.join("cgroup.procs"), pid);
                }
            }
            // A just-killed process can take a moment to leave its cgroup.
            for _ in 0..50 {
                if fs::remove_dir(d).is_ok() || !d.exists() {
                    break;
                }
                thread::sleep(Duration::from_millis(20));
            }
        }
    }
}

fn hex64(seed: u64) -> String {
    // Deterministic per run, unique enough not to clash with a real container.
    (0..4)
        .map(|i| {
            format!(
                "{:016x}",
                seed.wrapping_mul(0x9e37_79b9_7f4a_7c15).rotate_left(i * 16) ^ i as u64
            )
        })
        .collect()
}

#[test]
#[ignore = "needs root: run with cargo xtask test"]
fn failures_are_attributed_to_the_container_of_their_cgroup() {
    require_root();
    let root =
        portexhaust::kernel::container::cgroup2_root().expect("no cgroup v2 hierarchy mounted");
    let seed = u64::from(std::process::id()) << 20
        ^ u64::from(
            SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .expect("clock")
                .subsec_nanos(),
        );
    let docker_id = hex64(seed);
    let k8s_id = hex64(seed + 1);
    let pod = "0f1e2d3c-4b5a-6978-8796-a5b4c3d2e1f0";
    let top = format!("portexhaust-test-{}.slice", std::process::id());
    // Declared before the workloads: dropped after them, once their processes are gone.
    let mut cg = Cgroups {
        root: root.clone(),
        dirs: Vec::new(),
    };
    let docker_dir = cg.mkdir(&format!("{top}/docker-{docker_id}.scope"));
    let k8s_dir = cg.mkdir(&format!(
        "{top}/kubepods-burstable-pod{}.slice/cri-containerd-{k8s_id}.scope",
        pod.replace('-', "_")
    ));

    let mut wd = Workload::start("v4", 6, "pxh-docker", &[]);
    let mut wk = Workload::start("v6", 4, "pxh-k8s", &[]);
    Cgroups::enter(&docker_dir, wd.pid);
    Cgroups::enter(&k8s_dir, wk.pid);
    let metrics: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().expect("addr");
    let t = Tracer::trace(&[
        "--json",
        "--pid",
        &wd.pid.to_string(),
        "--pid",
        &wk.pid.to_string(),
        "--metrics-addr",
        &metrics.to_string(),
    ]);
    wd.go();
    wk.go();
    let (_, nd) = finished(wd);
    let (_, nk) = finished(wk);
    let cases = [
        ("pxh-docker", nd, "docker", docker_id.clone(), Value::Null),
        (
            "pxh-k8s",
            nk,
            "containerd",
            k8s_id.clone(),
            Value::from(pod),
        ),
    ];
    // The metric series of one case: comm first, container labels and count last.
    let has_series =
        |text: &str, (comm, n, runtime, id, pod): &(&str, u64, &str, String, Value)| {
            let start = format!("portexhaust_failures_total{{comm=\"{comm}\"");
            let end = format!(
                "container_runtime=\"{runtime}\",container_id=\"{id}\",pod_uid=\"{}\"}} {n}",
                pod.as_str().unwrap_or("")
            );
            text.lines()
                .any(|l| l.starts_with(&start) && l.ends_with(&end))
        };
    // Scrape like Prometheus until both series carry their counts: counts are read once a
    // second and a new series is served at 0 once first (bounded: 15 s).
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let (status, _, text) = http_get(metrics, "/metrics", None);
        assert_eq!(status, 200);
        if cases.iter().all(|c| has_series(&text, c)) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "container labels missing:\n{text}"
        );
        thread::sleep(Duration::from_millis(300));
    }
    let (out, err, code) = t.stop();
    assert_eq!(code, 0, "trace failed:\n{err}");
    let (events, _) = events_and_summary(&out);

    for (comm, n, runtime, id, pod) in &cases {
        let mine: Vec<&Value> = events.iter().filter(|e| e["comm"] == *comm).collect();
        assert_eq!(mine.len() as u64, *n, "{comm}: {out}");
        for e in mine {
            assert_eq!(e["container"]["runtime"], *runtime, "{e}");
            assert_eq!(e["container"]["id"], id.as_str(), "{e}");
            assert_eq!(e["container"]["pod"], *pod, "{e}");
        }
    }
    drop(cg);
    assert!(!root.join(&top).exists(), "test cgroups left behind");
}

// ---------------------------------------------------------------------------------------------
// The dashboard and the alerts against a real scrape.

/// node_exporter's series the dashboard joins on `instance`: never in portexhaust's scrape.
const EXTERNAL: &[&str] = &[
    "node_sockstat_TCP_tw",
    "node_nf_conntrack_entries",
    "node_nf_conntrack_entries_limit",
];

/// The metric names a PromQL expression selects: identifiers right before a `{` matcher (every
/// query of the dashboard selects by `instance`), and every `portexhaust_` or `node_` word.
fn metric_names(expr: &str) -> Vec<String> {
    let ident = |c: char| c.is_ascii_alphanumeric() || c == '_' || c == ':';
    let mut out = Vec::new();
    let mut word = String::new();
    for c in expr.chars().chain(std::iter::once(' ')) {
        if ident(c) {
            word.push(c);
            continue;
        }
        let selected =
            c == '{' && !word.is_empty() && !word.starts_with(|d: char| d.is_ascii_digit());
        if selected || word.starts_with("portexhaust_") || word.starts_with("node_") {
            out.push(word.clone());
        }
        word.clear();
    }
    out.sort();
    out.dedup();
    out
}

/// The sample names of a text exposition.
fn scraped_names(text: &str) -> std::collections::BTreeSet<String> {
    text.lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
        .filter_map(|l| l.split(['{', ' ']).next())
        .map(String::from)
        .collect()
}

/// Values of the samples of `name` whose labels contain every `k="v"` of `labels`.
fn samples(text: &str, name: &str, labels: &[(&str, &str)]) -> Vec<(String, f64)> {
    text.lines()
        .filter(|l| l.starts_with(&format!("{name}{{")) || l.starts_with(&format!("{name} ")))
        .filter(|l| {
            labels
                .iter()
                .all(|(k, v)| l.contains(&format!("{k}=\"{v}\"")))
        })
        .filter_map(|l| {
            let (head, v) = l.rsplit_once(' ')?;
            Some((head.to_string(), v.parse().ok()?))
        })
        .collect()
}

#[test]
#[ignore = "needs root: run with cargo xtask test"]
fn every_dashboard_and_alert_metric_is_in_a_real_scrape() {
    require_root();
    // Metric names of every dashboard query and every alert.
    let dash: Value = serde_json::from_str(
        &fs::read_to_string(repo().join("deploy/grafana/portexhaust.json")).expect("dashboard"),
    )
    .expect("dashboard JSON");
    let mut wanted: Vec<(String, String)> = Vec::new();
    for p in dash["panels"].as_array().expect("panels") {
        for t in p["targets"].as_array().into_iter().flatten() {
            let e = t["expr"].as_str().expect("expr");
            let names = metric_names(e);
            assert!(!names.is_empty(), "no metric in {e:?}");
            wanted.extend(
                names
                    .into_iter()
                    .map(|n| (n, format!("panel {}", p["title"]))),
            );
        }
    }
    let alerts = fs::read_to_string(repo().join("deploy/alerts.yaml")).expect("alerts");
    for l in alerts.lines().filter(|l| !l.trim_start().starts_with('#')) {
        wanted.extend(
            metric_names(l)
                .into_iter()
                .filter(|n| n.starts_with("portexhaust_"))
                .map(|n| (n, "deploy/alerts.yaml".to_string())),
        );
    }
    for ext in EXTERNAL {
        assert!(
            wanted.iter().any(|(n, _)| n == ext),
            "{ext} is listed as external but nothing queries it"
        );
    }
    for name in [
        "portexhaust_connect_duration_seconds_bucket",
        "portexhaust_connections_opened_total",
        "portexhaust_exhaustion_eta_seconds",
        "node_sockstat_TCP_tw",
    ] {
        assert!(
            wanted.iter().any(|(n, _)| n == name),
            "nothing queries {name}"
        );
    }

    // Pressure that grows (40 new connections a second into 2000 ports, each left in
    // TIME_WAIT: a forecast, established connects and their latency), and real failures.
    let mut churn = Workload::lingering(&[
        "--scenario",
        "churn",
        "--ports",
        "2000",
        "--rate",
        "40",
        "--seconds",
        "60",
        "--comm",
        "pxh-dash-churn",
    ]);
    let churn_ns = {
        use std::os::unix::fs::MetadataExt;
        fs::metadata(churn.netns_path())
            .expect("netns")
            .ino()
            .to_string()
    };
    let mut failer = Workload::start("v4", 37, "pxh-dash-fail", &[]);
    let metrics: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().expect("addr");
    let t = Tracer::trace(&["--metrics-addr", &metrics.to_string()]);
    churn.go();
    failer.go();
    let (_, n) = finished(failer);

    // Scrape as Prometheus would until every name is there (a new series is served at 0 once
    // first; the forecast needs two censuses 5 s apart with growth between them).
    let deadline = Instant::now() + Duration::from_secs(60);
    let text = loop {
        let (status, _, text) = http_get(metrics, "/metrics", None);
        assert_eq!(status, 200);
        let have = scraped_names(&text);
        let missing: Vec<&(String, String)> = wanted
            .iter()
            .filter(|(n, _)| !EXTERNAL.contains(&n.as_str()) && !have.contains(n))
            .collect();
        let eta = samples(
            &text,
            "portexhaust_exhaustion_eta_seconds",
            &[("netns", &churn_ns)],
        );
        let opened = samples(
            &text,
            "portexhaust_connections_opened_total",
            &[("netns", &churn_ns)],
        );
        let failed = samples(
            &text,
            "portexhaust_failures_total",
            &[("comm", "pxh-dash-fail")],
        );
        let ready = missing.is_empty()
            && !eta.is_empty()
            && opened.iter().any(|(_, v)| *v > 0.0)
            && failed.iter().map(|(_, v)| v).sum::<f64>() == n as f64;
        if ready {
            break text;
        }
        assert!(
            Instant::now() < deadline,
            "after 60 s: missing {missing:?}; churn's forecast {eta:?}, opened {opened:?}, \
             failures {failed:?} of {n}:\n{text}"
        );
        thread::sleep(Duration::from_millis(500));
    };
    // What the new series say of the churner, checked for sense rather than presence.
    let eta = samples(
        &text,
        "portexhaust_exhaustion_eta_seconds",
        &[("netns", &churn_ns)],
    );
    assert!(
        eta.iter()
            .all(|(_, v)| v.is_finite() && *v >= 0.0 && *v < 600.0),
        "2000 ports at 40 a second fill in under a minute: {eta:?}"
    );
    let count = samples(
        &text,
        "portexhaust_connect_duration_seconds_count",
        &[("netns", &churn_ns)],
    );
    let inf = samples(
        &text,
        "portexhaust_connect_duration_seconds_bucket",
        &[("netns", &churn_ns), ("le", "+Inf")],
    );
    let opened = samples(
        &text,
        "portexhaust_connections_opened_total",
        &[("netns", &churn_ns)],
    );
    assert_eq!(count.len(), 1, "{text}");
    assert_eq!(inf.first().map(|x| x.1), Some(count[0].1), "+Inf != _count");
    assert!(count[0].1 > 0.0, "no connect timed: {count:?}");
    assert!(
        count[0].1 <= opened[0].1,
        "timed connects are a sample of the opened ones: {count:?} {opened:?}"
    );
    // The failures carry their cause.
    let failed = samples(
        &text,
        "portexhaust_failures_total",
        &[("comm", "pxh-dash-fail"), ("cause", "exhausted")],
    );
    assert_eq!(failed.iter().map(|x| x.1).sum::<f64>(), n as f64, "{text}");
    assert!(
        !text.contains("instance=\""),
        "the exporter must leave `instance` to the scrape"
    );
    drop(churn);
    let (_, err, code) = t.stop();
    assert_eq!(code, 0, "trace failed:\n{err}");
}
