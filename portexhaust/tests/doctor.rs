//! `doctor` end to end: inside namespaces the workload made (root), and `--explain` (no
//! privileges). The root tests panic rather than skip when they cannot run.
mod common;

use std::{process::Command, time::Duration};

use common::{BIN, Workload, require_root, wait_for};
use serde_json::{Value, json};

// ---------------------------------------------------------------------------------------------
// doctor, for real, inside namespaces made by the workload.

fn doctor_in(pid: u32, args: &[&str]) -> String {
    let out = Command::new("nsenter")
        .arg(format!("--net=/proc/{pid}/ns/net"))
        .arg(BIN)
        .arg("doctor")
        .args(args)
        .output()
        .expect("nsenter (util-linux) runs doctor");
    assert!(
        out.status.success(),
        "doctor failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn finding<'a>(audit: &'a Value, id: &str) -> &'a Value {
    audit["findings"]
        .as_array()
        .and_then(|f| f.iter().find(|f| f["id"] == id))
        .unwrap_or_else(|| panic!("no finding {id}: {audit}"))
}

#[test]
#[ignore = "needs root: run with cargo xtask test"]
fn doctor_in_a_namespace_with_a_tiny_range_and_no_tw_reuse_flags_both() {
    require_root();
    // Paused before exhausting: already in its namespace with 10 ports and tcp_tw_reuse=0.
    let w = Workload::start("timewait", 1, "pxh-f-doc", &["--ports", "10"]);
    let audit: Value = serde_json::from_str(&doctor_in(w.pid, &["--json"])).expect("json");
    assert_eq!(audit["type"], "doctor");
    assert_eq!(
        audit["sysctls"]["ip_local_port_range"],
        json!([40000, 40009])
    );
    assert_eq!(audit["sysctls"]["tcp_tw_reuse"], 0);
    assert_eq!(audit["range"]["usable"], 10);
    let range = finding(&audit, "ip_local_port_range");
    assert_eq!(range["severity"], "critical", "{range}");
    let reuse = finding(&audit, "tcp_tw_reuse");
    assert!(
        reuse["severity"] == "warning" || reuse["severity"] == "critical",
        "{reuse}"
    );
    // Application fixes come before the sysctl one; tcp_tw_recycle is never suggested.
    assert_eq!(reuse["fixes"][0]["kind"], "application");
    assert_eq!(
        reuse["fixes"]
            .as_array()
            .and_then(|f| f.last())
            .map(|f| f["command"].clone()),
        Some(json!("sysctl -w net.ipv4.tcp_tw_reuse=1"))
    );
    assert!(!audit.to_string().contains("tcp_tw_recycle=1"));
    // Its own namespace, not the host's.
    assert_eq!(
        audit["netns"].as_u64(),
        std::fs::read_link(format!("/proc/{}/ns/net", w.pid))
            .ok()
            .and_then(|l| l
                .to_str()?
                .strip_prefix("net:[")?
                .strip_suffix(']')?
                .parse()
                .ok())
    );
    let text = doctor_in(w.pid, &[]);
    assert!(
        text.contains("CRITICAL  Ephemeral range 40000-40009: 10 usable ports"),
        "{text}"
    );
    assert!(text.contains("tcp_tw_reuse=0"), "{text}");
    drop(w);
}

/// `doctor --watch`: what the settings cannot show. The collision workload connects on
/// sockets bound before connect() and fails on taken 4-tuples while doctor watches its
/// namespace: the bound connects become their finding, with the call site, and the
/// collisions are counted exactly.
#[test]
#[ignore = "needs root: run with cargo xtask test"]
fn doctor_watch_sees_connects_on_bound_sockets() {
    require_root();
    let mut w = Workload::start("collision", 20, "pxh-f-bconn", &["--ports", "10"]);
    let doctor = Command::new("nsenter")
        .arg(format!("--net=/proc/{}/ns/net", w.pid))
        .args([BIN, "doctor", "--json", "--watch", "4"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("nsenter (util-linux) runs doctor");
    let mut doctor = common::Guard(doctor);
    // Its programs are attached before it says it watches.
    let mut err = std::io::BufReader::new(doctor.0.stderr.take().expect("stderr"));
    let mut line = String::new();
    loop {
        line.clear();
        let n = std::io::BufRead::read_line(&mut err, &mut line).expect("doctor stderr");
        assert!(n > 0, "doctor ended before watching");
        if line.contains("watching connects") {
            break;
        }
    }
    w.go();
    let expected = common::expected_failures(&w.finish());
    let mut out = String::new();
    std::io::Read::read_to_string(doctor.0.stdout.as_mut().expect("stdout"), &mut out)
        .expect("doctor output");
    let status = doctor.0.wait().expect("wait");
    assert!(status.success(), "doctor --watch failed");
    let audit: Value = serde_json::from_str(out.trim()).expect("json");
    assert_eq!(audit["watched_s"], 4.0, "{audit}");
    let c = finding(&audit, "connect_tuple_collision");
    assert!(
        c["title"]
            .as_str()
            .is_some_and(|t| t.contains(&format!("failed {expected} times"))),
        "exact collisions ({expected}): {c}"
    );
    let b = finding(&audit, "connects_on_bound_sockets");
    assert!(
        b["detail"]
            .as_str()
            .is_some_and(|d| d.contains("pxh-f-bconn")),
        "{b}"
    );
    assert!(
        b["fixes"][0]["text"]
            .as_str()
            .is_some_and(|t| t.contains("IP_BIND_ADDRESS_NO_PORT")),
        "{b}"
    );
    let sites = audit["call_sites"].as_array().expect("call sites");
    assert!(
        sites
            .iter()
            .any(|s| s["comm"] == "pxh-f-bconn" && s["bound_connects"].as_u64() > Some(0)),
        "{sites:?}"
    );
}

#[test]
#[ignore = "needs root: run with cargo xtask test"]
fn doctor_sees_sockets_bound_before_connect() {
    require_root();
    // The bind scenario binds every port of the range, then keeps failing bind(0) for a
    // while: long enough to be audited with those sockets held.
    let mut w = Workload::start("bind", 50_000_000, "pxh-f-bound", &["--ports", "10"]);
    let before: Value = serde_json::from_str(&doctor_in(w.pid, &["--json"])).expect("json");
    assert_eq!(
        before["bind_holders"],
        json!([]),
        "nothing bound yet: {before}"
    );
    w.go();
    let mut audit = Value::Null;
    wait_for(
        "doctor to see the bound sockets",
        Duration::from_secs(10),
        || {
            audit = serde_json::from_str(&doctor_in(w.pid, &["--json"])).expect("json");
            audit["bind_holders"]
                .as_array()
                .is_some_and(|h| !h.is_empty())
        },
    );
    let h = &audit["bind_holders"][0];
    assert_eq!(h["pid"], w.pid);
    assert_eq!(h["comm"], "pxh-f-bound");
    assert_eq!(h["sockets"], 10);
    let f = finding(&audit, "bind_before_connect");
    assert_eq!(f["severity"], "warning");
    assert!(
        f["fixes"][0]["text"]
            .as_str()
            .is_some_and(|t| t.contains("IP_BIND_ADDRESS_NO_PORT"))
    );
    drop(w);
}

#[test]
fn doctor_explains_tcp_tw_recycle_without_recommending_it() {
    let out = Command::new(BIN)
        .args(["doctor", "--explain", "tcp_tw_recycle"])
        .output()
        .expect("doctor");
    assert!(out.status.success());
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("REMOVED in Linux 4.12") && text.contains("NAT"),
        "{text}"
    );
    assert!(!text.contains("tcp_tw_recycle=1"));
    let bad = Command::new(BIN)
        .args(["doctor", "--explain", "tcp_tw_recycel"])
        .output()
        .expect("doctor");
    assert_eq!(bad.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&bad.stderr).contains("invalid value"));
}
