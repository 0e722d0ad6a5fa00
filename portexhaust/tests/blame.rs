//! Privileged tests of the blame: who holds the ports. Real sockets in private namespaces;
//! run by `cargo xtask test` as root, one at a time. They panic rather than skip.
mod common;

use std::{
    collections::BTreeMap,
    process::Command,
    thread,
    time::{Duration, Instant},
};

use common::{Tracer, Workload, require_root};
use serde_json::Value;

/// Stop the tool with SIGTERM (or let it end by itself): it must exit cleanly.
fn finish(t: Tracer, signal: bool) -> (String, String) {
    let (out, err, code) = if signal { t.stop() } else { t.wait() };
    assert_eq!(code, 0, "exit {code}:\n{err}");
    (out, err)
}

fn last_json(out: &str, kind: &str) -> Value {
    out.lines()
        .rev()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .find(|v| v["type"] == kind)
        .unwrap_or_else(|| panic!("no {kind} record in:\n{out}"))
}

#[test]
#[ignore = "needs root: run with cargo xtask test"]
fn exited_churner_is_blamed_for_its_time_wait_sockets() {
    require_root();
    let n = 14u64;
    let mut w = Workload::lingering(&[
        "--scenario",
        "churn-then-fail",
        "--ports",
        &n.to_string(),
        "--failures",
        "6",
        "--comm",
        "pxh-t-blame",
    ]);
    let pid = w.pid.to_string();
    let t = Tracer::tool(&["trace", "--json", "--pid", &pid]);
    w.go();
    let report = w.report();
    assert_eq!(report["time_wait_before"], n, "{report}");
    let churner = report["churner_pid"].as_u64().expect("churner pid");
    let (out, _) = finish(t, true);
    w.release();

    let s = last_json(&out, "summary");
    assert_eq!(s["failures_total"], 6);
    let b = &s["blame"];
    assert_eq!(b.as_array().map(Vec::len), Some(1), "{s}");
    let b = &b[0];
    assert_eq!(b["dst"], "127.0.0.1:5000");
    assert_eq!(b["netns"], report["netns"]);
    assert_eq!(b["range_size"], n);
    assert_eq!(b["in_use"], n);
    assert_eq!(b["by_state"]["TIME_WAIT"], n);
    assert_eq!(b["failers"][0]["pid"], report["pid"]);
    assert_eq!(b["failers"][0]["comm"], "pxh-t-blame");
    assert_eq!(b["failers"][0]["failures"], 6);
    let holders = b["holders"].as_array().expect("holders");
    assert_eq!(holders.len(), 1, "only the churner holds ports: {b}");
    let h = &holders[0];
    assert_eq!(h["pid"], churner);
    assert_eq!(h["comm"], report["churner_comm"]);
    assert_eq!(
        h["comm"], "pxh-t-blame-chu",
        "15 bytes, as the kernel keeps it"
    );
    assert_eq!(h["alive"], false, "the churner exited");
    assert_eq!(h["sockets"], n, "exactly the sockets it left");
    assert_eq!(h["time_wait"], n);
    assert_eq!(h["attribution"], "traced");
}

/// `ss -Htan dst IP:PORT` in a namespace, counted by state (ss names mapped to the kernel's).
fn ss_states(netns: &str, dst: &str) -> BTreeMap<String, u64> {
    let out = Command::new("nsenter")
        .arg(format!("--net={netns}"))
        .args(["ss", "-Htan", "dst", dst])
        .output()
        .expect("ss");
    assert!(out.status.success(), "ss failed");
    let mut m = BTreeMap::new();
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        let state = match line.split_whitespace().next() {
            Some("ESTAB") => "ESTABLISHED",
            Some("TIME-WAIT") => "TIME_WAIT",
            Some("SYN-SENT") => "SYN_SENT",
            Some("FIN-WAIT-1") => "FIN_WAIT1",
            Some("FIN-WAIT-2") => "FIN_WAIT2",
            Some("CLOSE-WAIT") => "CLOSE_WAIT",
            Some("LAST-ACK") => "LAST_ACK",
            Some(other) => other,
            None => continue,
        };
        *m.entry(state.to_string()).or_default() += 1;
    }
    m
}

#[test]
#[ignore = "needs root: run with cargo xtask test"]
fn census_counts_sockets_from_before_the_start_like_ss() {
    require_root();
    let w = Workload::lingering(&[
        "--scenario",
        "hold",
        "--ports",
        "12",
        "--comm",
        "pxh-t-hold",
    ]);
    let ns = w.netns_path();
    let wpid = w.pid;
    let ss = ss_states(&ns, "127.0.0.1:5000");
    assert_eq!(ss.values().sum::<u64>(), 12, "{ss:?}");
    let t = Tracer::tool(&["top", "--json", "--interval", "0.3", "--netns", &ns]);
    let (out, _) = finish(t, false);
    let ss_after = ss_states(&ns, "127.0.0.1:5000");
    w.release();
    assert_eq!(ss, ss_after, "the namespace did not change while we looked");

    let v = last_json(&out, "top");
    let d = v["destinations"]
        .as_array()
        .expect("destinations")
        .iter()
        .find(|d| d["dst"] == "127.0.0.1:5000")
        .unwrap_or_else(|| panic!("no row for 127.0.0.1:5000: {v}"))
        .clone();
    let ours: BTreeMap<String, u64> = d["by_state"]
        .as_object()
        .expect("by_state")
        .iter()
        .map(|(k, n)| (k.clone(), n.as_u64().expect("count")))
        .collect();
    assert_eq!(ours, ss, "per-state counts equal ss's");
    assert_eq!(d["in_use"], 12);
    assert_eq!(d["range_size"], 12);
    assert_eq!(d["utilisation"], 1.0);
    assert_eq!(d["forecast_s"], 0.0, "a full range is full now");
    // Opened before the tracer: the open ones are found through their fds, the TIME_WAIT
    // ones have no owner anywhere and are shown as such.
    let holders = d["holders"].as_array().expect("holders");
    let fd = holders
        .iter()
        .find(|h| h["attribution"] == "fd")
        .unwrap_or_else(|| panic!("fd holder: {holders:?}"));
    assert_eq!(fd["pid"], wpid);
    assert_eq!(fd["comm"], "pxh-t-hold");
    assert_eq!(fd["sockets"], 6);
    let unknown = holders
        .iter()
        .find(|h| h["attribution"] == "unknown")
        .expect("unknown holder");
    assert!(unknown["pid"].is_null());
    assert_eq!(unknown["time_wait"], 6);
}

#[test]
#[ignore = "needs root: run with cargo xtask test"]
fn latency_histogram_shows_a_nearly_full_range_slowing_down() {
    require_root();
    let mut w = Workload::lingering(&[
        "--scenario",
        "latency",
        "--ports",
        "12000",
        "--failures",
        "100",
        "--comm",
        "pxh-t-lat",
    ]);
    let ns = w.netns_path();
    let t = Tracer::tool(&[
        "top",
        "--json",
        "--interval",
        "1",
        "--count",
        "120",
        "--netns",
        &ns,
    ]);
    w.go();
    let started = Instant::now();
    let report = w.report();
    // One more snapshot after the workload finished.
    thread::sleep(Duration::from_millis(2500));
    let (out, _) = finish(t, true);
    w.release();
    assert!(started.elapsed() < Duration::from_secs(100));
    let v = last_json(&out, "top");
    let row = |dst: &str| -> Value {
        v["destinations"]
            .as_array()
            .expect("destinations")
            .iter()
            .find(|d| d["dst"] == dst)
            .unwrap_or_else(|| panic!("no row for {dst}: {v}"))
            .clone()
    };
    let full = row("127.0.0.1:5000");
    let empty = row("127.0.0.1:5001");
    let p90 = |d: &Value| d["latency_us"]["p90"].as_f64().expect("p90");
    // Latency is sampled (at most one connect per CPU and jiffy is timed): the 100 fast
    // connects to the empty range give a few samples; the slow ones to the nearly full range
    // (each scans thousands of ports) are mostly timed.
    let samples = |d: &Value| {
        d["latency_us"]["count"]
            .as_u64()
            .unwrap_or_else(|| panic!("latency of {}: {d}", d["dst"]))
    };
    assert!(
        (1..=100).contains(&samples(&empty)),
        "{}",
        empty["latency_us"]
    );
    assert!(samples(&full) >= 100, "{}", full["latency_us"]);
    assert!(
        p90(&full) >= 4.0 * p90(&empty),
        "nearly full p90 {} us vs empty p90 {} us (client medians: {})",
        p90(&full),
        p90(&empty),
        report["latency_us"]
    );
    assert!(full["utilisation"].as_f64().expect("util") > 0.99);
    assert!(full["new_per_s"].as_f64().is_some_and(|r| r > 0.0));
}

#[test]
#[ignore = "needs root: run with cargo xtask test"]
fn lru_evictions_are_counted_when_the_ownership_map_is_full() {
    require_root();
    let mut w = Workload::lingering(&[
        "--scenario",
        "churn-then-fail",
        "--ports",
        "80",
        "--failures",
        "1",
        "--comm",
        "pxh-t-lru",
    ]);
    let ns = w.netns_path();
    let t = Tracer::tool(&[
        "top",
        "--json",
        "--interval",
        "1.5",
        "--max-tracked-sockets",
        "16",
        "--netns",
        &ns,
    ]);
    w.go();
    let _ = w.report();
    let (out, _) = finish(t, false);
    w.release();
    let v = last_json(&out, "top");
    let tracked = v["tracked_sockets"].as_u64().expect("tracked");
    let evicted = v["lru_evictions"].as_u64().expect("evictions");
    assert!(tracked <= 16, "{v}");
    // 80 connections went through maps of 16 entries: at least 64 were dropped.
    assert!(evicted >= 64, "evictions {evicted}: {v}");
}
