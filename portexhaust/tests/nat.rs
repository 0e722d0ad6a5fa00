//! Source-NAT port exhaustion one hop away (issue 15), for real: three namespaces this test
//! creates (client, router, server) joined by veth pairs; the router masquerades the client's
//! traffic to a range of 10 ports with nftables. The client holds 10 connections to the server
//! and then tries more: their SYNs are dropped by the router (conntrack `insert_failed`), and
//! `connect()` only times out. `portexhaust trace --catch nat`, unfiltered, must count exactly
//! the router's `insert_failed` (and `drop`) rise, name the client's pid, comm and namespace,
//! and show the NAT range 100% used towards the server. A control run with a firewall drop
//! rule instead of NAT must report nothing.
//!
//! Host settings are never touched: forwarding is turned on inside the router namespace only,
//! and all traffic stays between the test's namespaces. The namespaces are deleted when the
//! test ends, passed or failed (`Topology`'s drop).
mod common;

use std::{
    io::{BufRead, BufReader, Write},
    net::{SocketAddr, TcpStream},
    process::{Command, Stdio},
    time::Duration,
};

use common::{
    BIN, Guard, Tracer, backends_here, events_and_summary, report, report_json, require_root,
    temp_dir,
};
use serde_json::Value;

const CLIENT_IP: &str = "10.201.1.2";
const SERVER: &str = "10.201.2.2:5000";
const NAT_IP: &str = "10.201.2.1";
const NAT_LO: u16 = 40000;
const NAT_HI: u16 = 40009;
// The same topology over IPv6 (ULA addresses, no DAD wait).
const CLIENT_IP6: &str = "fd00:201:1::2";
const SERVER6: &str = "[fd00:201:2::2]:5000";
const NAT_IP6: &str = "fd00:201:2::1";

/// Run a command, failing the test with its output if it fails.
fn run(args: &[&str]) -> String {
    let out = Command::new(args[0])
        .args(&args[1..])
        .output()
        .unwrap_or_else(|e| panic!("{args:?}: {e}"));
    assert!(
        out.status.success(),
        "{args:?}: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Three named namespaces and their veth pairs; deleted on drop.
struct Topology {
    client: String,
    router: String,
    server: String,
}

impl Topology {
    fn new(tag: &str) -> Self {
        let id = format!("{}{tag}", std::process::id());
        let t = Self {
            client: format!("pxh-natc-{id}"),
            router: format!("pxh-natr-{id}"),
            server: format!("pxh-nats-{id}"),
        };
        for ns in [&t.client, &t.router, &t.server] {
            run(&["ip", "netns", "add", ns]);
            t.exec(ns, &["ip", "link", "set", "lo", "up"]);
        }
        run(&[
            "ip", "link", "add", "pxc0", "netns", &t.client, "type", "veth", "peer", "name",
            "pxr0", "netns", &t.router,
        ]);
        run(&[
            "ip", "link", "add", "pxr1", "netns", &t.router, "type", "veth", "peer", "name",
            "pxs0", "netns", &t.server,
        ]);
        t.exec(
            &t.client,
            &["ip", "addr", "add", "10.201.1.2/24", "dev", "pxc0"],
        );
        t.exec(&t.client, &["ip", "link", "set", "pxc0", "up"]);
        t.exec(
            &t.client,
            &["ip", "route", "add", "default", "via", "10.201.1.1"],
        );
        t.exec(
            &t.router,
            &["ip", "addr", "add", "10.201.1.1/24", "dev", "pxr0"],
        );
        t.exec(
            &t.router,
            &["ip", "addr", "add", "10.201.2.1/24", "dev", "pxr1"],
        );
        t.exec(&t.router, &["ip", "link", "set", "pxr0", "up"]);
        t.exec(&t.router, &["ip", "link", "set", "pxr1", "up"]);
        // Inside the router namespace only: the host's own forwarding is untouched.
        t.exec(&t.router, &["sysctl", "-qw", "net.ipv4.ip_forward=1"]);
        t.exec(
            &t.server,
            &["ip", "addr", "add", "10.201.2.2/24", "dev", "pxs0"],
        );
        t.exec(&t.server, &["ip", "link", "set", "pxs0", "up"]);
        for (ns, addr, dev) in [
            (&t.client, "fd00:201:1::2/64", "pxc0"),
            (&t.router, "fd00:201:1::1/64", "pxr0"),
            (&t.router, "fd00:201:2::1/64", "pxr1"),
            (&t.server, "fd00:201:2::2/64", "pxs0"),
        ] {
            t.exec(ns, &["ip", "-6", "addr", "add", addr, "dev", dev, "nodad"]);
        }
        for (ns, via) in [(&t.client, "fd00:201:1::1"), (&t.server, "fd00:201:2::1")] {
            t.exec(ns, &["ip", "-6", "route", "add", "default", "via", via]);
        }
        t.exec(
            &t.router,
            &["sysctl", "-qw", "net.ipv6.conf.all.forwarding=1"],
        );
        t
    }

    fn exec(&self, ns: &str, args: &[&str]) -> String {
        let mut v = vec!["ip", "netns", "exec", ns];
        v.extend_from_slice(args);
        run(&v)
    }

    fn nft(&self, ruleset: &str) {
        let mut child = Command::new("ip")
            .args(["netns", "exec", &self.router, "nft", "-f", "-"])
            .stdin(Stdio::piped())
            .spawn()
            .expect("nft");
        child
            .stdin
            .take()
            .expect("stdin")
            .write_all(ruleset.as_bytes())
            .expect("write ruleset");
        assert!(
            child.wait().expect("nft").success(),
            "nft -f failed:\n{ruleset}"
        );
    }

    fn inode(ns: &str) -> u64 {
        use std::os::unix::fs::MetadataExt;
        std::fs::metadata(format!("/run/netns/{ns}"))
            .expect("netns handle")
            .ino()
    }

    /// (insert_failed, drop) of the router's conntrack, summed over the per-CPU hex rows.
    fn router_stat(&self) -> (u64, u64) {
        let text = self.exec(&self.router, &["cat", "/proc/net/stat/nf_conntrack"]);
        let mut lines = text.lines();
        let header: Vec<&str> = lines.next().expect("header").split_whitespace().collect();
        let col = |n: &str| header.iter().position(|h| *h == n).expect("column");
        let (fi, di) = (col("insert_failed"), col("drop"));
        lines.fold((0, 0), |(f, d), l| {
            let v: Vec<&str> = l.split_whitespace().collect();
            let hex = |i: usize| u64::from_str_radix(v[i], 16).expect("hex");
            (f + hex(fi), d + hex(di))
        })
    }

    /// `portexhaust workload-nat --role ROLE` (the server, or a client making `n` connects) in
    /// namespace `ns`, towards the IPv4 server.
    fn helper(&self, ns: &str, role: &str, n: u32) -> Guard {
        self.helper_to(ns, role, n, SERVER)
    }

    /// A `workload-nat` serving or connecting to `server`; a client keeps its connections
    /// until it is killed (the guard's drop).
    fn helper_to(&self, ns: &str, role: &str, n: u32, server: &str) -> Guard {
        let child = Command::new("ip")
            .args(["netns", "exec", ns, BIN, "workload-nat", "--role", role])
            .args(["--addr", server, "--count", &n.to_string()])
            .args(["--timeout-ms", "1500", "--hold-ms", "3600000"])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("workload-nat");
        Guard(child)
    }
}

impl Drop for Topology {
    fn drop(&mut self) {
        for ns in [&self.client, &self.router, &self.server] {
            let _ = Command::new("ip").args(["netns", "del", ns]).status();
        }
    }
}

/// Wait for a helper's line starting with `prefix`.
fn line_of(g: &mut Guard, prefix: &str) -> String {
    let out = g.0.stdout.as_mut().expect("helper stdout");
    let mut r = BufReader::new(out);
    let mut l = String::new();
    loop {
        l.clear();
        assert!(
            r.read_line(&mut l).expect("helper output") > 0,
            "helper ended before {prefix:?}"
        );
        if l.starts_with(prefix) {
            return l.trim().to_string();
        }
    }
}

/// A client's report (`{"pid":..,"ok":..,"failed":..}`, once its connects are done), as
/// `done ok=N failed=M`.
fn client_done(g: &mut Guard) -> String {
    let v: Value = serde_json::from_str(&line_of(g, "{")).expect("client report");
    format!("done ok={} failed={}", v["ok"], v["failed"])
}

fn comm_of(pid: u32) -> String {
    std::fs::read_to_string(format!("/proc/{pid}/comm"))
        .expect("comm")
        .trim()
        .to_string()
}

fn require_nft() {
    let found = Command::new("nft").arg("--version").output().is_ok();
    assert!(
        found,
        "nft is missing: `cargo xtask setup` installs it (apt-get install nftables)"
    );
}

/// Trace one exhaustion of the NAT with `backend`: (events, summary, insert_failed rise, drop
/// rise, client pid, client comm, client netns, router netns).
struct Run {
    events: Vec<Value>,
    summary: Value,
    insert_failed: u64,
    drops: u64,
    client_pid: u32,
    client_comm: String,
    client_netns: u64,
    router_netns: u64,
    client_line: String,
    stderr: String,
    /// The `--json` stream: a record `report` reads.
    stdout: String,
    /// `portexhaust_nat_drops_total` of the NAT key, scraped once it stopped rising.
    metric_drops: f64,
    /// The scrape it was read from.
    scrape: String,
}

/// One scrape of the tracer's metrics endpoint.
fn scrape(port: u16) -> String {
    let Ok(mut s) = TcpStream::connect(("127.0.0.1", port)) else {
        return String::new();
    };
    let _ = s.set_read_timeout(Some(Duration::from_secs(2)));
    let _ = s.write_all(b"GET /metrics HTTP/1.0\r\nHost: localhost\r\n\r\n");
    let mut out = String::new();
    let _ = std::io::Read::read_to_string(&mut s, &mut out);
    out
}

/// The summed value of a metric's samples whose line starts with `prefix`.
fn metric(text: &str, prefix: &str) -> f64 {
    text.lines()
        .filter(|l| l.starts_with(prefix))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

fn exhaust(backend: &str, ruleset: &str, attempts: u32) -> Run {
    exhaust_to(backend, ruleset, attempts, SERVER)
}

/// A topology (named by `tag`) with `ruleset` on its router and a server listening at
/// `server_addr`.
fn serving(tag: &str, ruleset: &str, server_addr: &str) -> (Topology, Guard) {
    let t = Topology::new(tag);
    t.nft(ruleset);
    let mut server = t.helper_to(&t.server, "server", 0, server_addr);
    line_of(&mut server, "listening");
    (t, server)
}

/// `exhaust` towards `server_addr` (an IPv4 or IPv6 server of the topology).
fn exhaust_to(backend: &str, ruleset: &str, attempts: u32, server_addr: &str) -> Run {
    let (t, server) = serving(&backend.replace('-', "")[..2], ruleset, server_addr);
    let before = t.router_stat();
    // The metrics on a port of this test's own (the NAT series must say what the summary says).
    let port = 20000 + (std::process::id() % 20000) as u16;
    let addr = format!("127.0.0.1:{port}");
    let tracer = Tracer::trace(&[
        "--json",
        "--catch",
        "nat",
        "--backend",
        backend,
        "--metrics-addr",
        &addr,
    ]);
    let mut client = t.helper_to(&t.client, "client", attempts, server_addr);
    let client_line = client_done(&mut client);
    let client_pid = client.0.id();
    let client_comm = comm_of(client_pid);
    // The last drop reaches user space within the drain interval (50 ms).
    std::thread::sleep(Duration::from_millis(500));
    let after = t.router_stat();
    // The NAT series are refreshed every fifth second: wait for the count to reach the router's.
    let want = (after.0 - before.0) as f64;
    let mut text = String::new();
    let deadline = std::time::Instant::now() + Duration::from_secs(12);
    while std::time::Instant::now() < deadline {
        text = scrape(port);
        if metric(&text, "portexhaust_nat_drops_total{") >= want {
            break;
        }
        std::thread::sleep(Duration::from_millis(500));
    }
    let metric_drops = metric(&text, "portexhaust_nat_drops_total{");
    let (out, stderr, code) = tracer.stop();
    assert_eq!(code, 0, "{stderr}");
    let (events, summary) = events_and_summary(&out);
    let stdout = out;
    drop(client);
    drop(server);
    Run {
        events,
        summary,
        insert_failed: after.0 - before.0,
        drops: after.1 - before.1,
        client_pid,
        client_comm,
        client_netns: Topology::inode(&t.client),
        router_netns: Topology::inode(&t.router),
        client_line,
        stderr,
        stdout,
        metric_drops,
        scrape: text,
    }
}

fn masquerade() -> String {
    format!(
        "table ip pxhnat {{\n  chain post {{\n    type nat hook postrouting priority srcnat; policy accept;\n    \
         oifname \"pxr1\" ip saddr {CLIENT_IP} meta l4proto tcp masquerade to :{NAT_LO}-{NAT_HI}\n  }}\n}}\n"
    )
}

/// One exhaustion of the topology's NAT, as every run must show it: one streamed `nf_nat`
/// drop per conntrack insert failure, each naming the client and a NAT port of the range
/// (none left unstreamed), the summary's entry exact and the range full, and the metric equal.
fn assert_exhausted(r: &Run, server: &str, client_ip: &str, nat_ip: &str, ctx: &str) {
    let nat: Vec<&Value> = r.events.iter().filter(|e| e["site"] == "nf_nat").collect();
    // Every drop is streamed (6 are far below the budget), and the summary says so: a drop
    // counted but not streamed would show in `nat_unstreamed`.
    assert_eq!(r.summary["nat_unstreamed"], Value::Null, "{}", r.summary);
    assert_eq!(
        nat.len() as u64,
        r.insert_failed,
        "one nf_nat failure per conntrack insert_failed: {ctx}\n{:?}",
        r.events
    );
    for e in &nat {
        assert_eq!(e["cause"], "snat_exhausted", "{e}");
        assert_eq!(e["pid"], r.client_pid, "the client is named: {e}");
        assert_eq!(e["comm"], r.client_comm.as_str(), "{e}");
        assert_eq!(e["netns"], r.client_netns, "the client's namespace: {e}");
        assert_eq!(e["dst"], server, "{e}");
        assert_eq!(e["src"], client_ip, "{e}");
        assert_eq!(e["nat"]["router_netns"], r.router_netns, "{e}");
        assert_eq!(e["nat"]["clash"], true, "{e}");
        let nat: SocketAddr = e["nat"]["nat"]
            .as_str()
            .expect("nat")
            .parse()
            .expect("addr");
        assert_eq!(nat.ip().to_string(), nat_ip, "{e}");
        assert!((NAT_LO..=NAT_HI).contains(&nat.port()), "{e}");
    }
    let entries = r.summary["nat"].as_array().expect("a nat section");
    assert_eq!(entries.len(), 1, "{}", r.summary);
    assert_full_entry(
        &entries[0],
        r.insert_failed,
        r.client_pid,
        r.router_netns,
        server,
        nat_ip,
    );
    assert_eq!(
        r.metric_drops, r.insert_failed as f64,
        "{ctx}\n{}",
        r.scrape
    );
}

/// A NAT entry (the summary's, a top row, doctor's) after the client took the NAT's 10 ports
/// and `drops` SYNs were dropped: exact, the range full, the client failing and holding.
fn assert_full_entry(
    n: &Value,
    drops: u64,
    client_pid: u32,
    router_netns: u64,
    server: &str,
    nat_ip: &str,
) {
    assert_eq!(n["drops"], drops, "exact in-kernel count: {n}");
    assert_eq!(n["insert_failed_delta"], drops, "{n}");
    assert_eq!(n["router_netns"], router_netns, "{n}");
    assert_eq!(n["dst"], server, "{n}");
    assert_eq!(n["nat_addr"], nat_ip, "{n}");
    assert_eq!(n["range"]["lo"], NAT_LO, "{n}");
    assert_eq!(n["range"]["hi"], NAT_HI, "{n}");
    assert_eq!(n["in_use"], 10, "{n}");
    assert_eq!(n["utilisation"], 1.0, "the NAT range is full: {n}");
    assert_eq!(n["failers"][0]["pid"], client_pid, "the client fails: {n}");
    assert_eq!(n["failers"][0]["count"], drops, "{n}");
    assert_eq!(
        n["holders"][0]["pid"], client_pid,
        "and holds the ports: {n}"
    );
    assert_eq!(n["holders"][0]["count"], 10, "{n}");
}

/// The NAT hook (tp_btf kfree_skb) does not depend on the backend, but it is loaded with every
/// backend's object and plan: each one this kernel runs gets the whole check.
#[test]
#[ignore = "needs root: run with cargo xtask test"]
fn snat_exhaustion_is_counted_exactly_and_named() {
    require_root();
    require_nft();
    for backend in backends_here() {
        // 10 connections fill the NAT's 10 ports; 3 more are dropped (each SYN and its
        // retransmission).
        let r = exhaust(&backend, &masquerade(), 13);
        let ctx = format!("backend {backend}: client {}\n{}", r.client_line, r.stderr);
        assert!(r.client_line.contains("ok=10"), "{ctx}");
        assert!(
            r.stderr.contains("watching nat: tp_btf kfree_skb"),
            "the coverage lines say NAT is watched: {ctx}"
        );
        assert!(r.insert_failed > 0, "the NAT dropped nothing: {ctx}");
        // The clash path of __nf_conntrack_confirm counts both.
        assert_eq!(r.insert_failed, r.drops, "{ctx}");
        assert_exhausted(&r, SERVER, CLIENT_IP, NAT_IP, &ctx);
        // The metrics say what the summary says: exact drops, and the NAT range full.
        assert_eq!(
            metric(&r.scrape, "portexhaust_nat_port_utilisation_ratio{"),
            1.0,
            "{}",
            r.scrape
        );
        assert_eq!(
            metric(&r.scrape, "portexhaust_nat_port_range_size{"),
            f64::from(NAT_HI - NAT_LO + 1),
            "{}",
            r.scrape
        );
        let s = &r.summary;
        // Unfiltered: other exhaustion on the machine (another test's namespace) may add to the
        // total, never take from it.
        assert!(s["failures_total"].as_u64() >= Some(r.insert_failed), "{s}");
        let offender = s["offenders"]
            .as_array()
            .and_then(|o| o.iter().find(|o| o["pid"] == r.client_pid))
            .unwrap_or_else(|| panic!("the client is an offender: {s}"));
        assert_eq!(offender["failures"], r.insert_failed, "{s}");
        assert_eq!(
            offender["destinations"][0]["cause"], "snat_exhausted",
            "{s}"
        );
        // The stream is a record: report names the client and says what to do.
        let dir = temp_dir("nat");
        let file = dir.path().join("trace.ndjson");
        std::fs::write(&file, &r.stdout).expect("write record");
        let (rep, _) = report_json(&[&file], &[]);
        let client = rep["offenders"]
            .as_array()
            .and_then(|o| o.iter().find(|o| o["pid"] == r.client_pid))
            .unwrap_or_else(|| panic!("report names the client: {rep}"));
        assert_eq!(client["failures"], r.insert_failed, "{rep}");
        let ids: Vec<&str> = rep["findings"]
            .as_array()
            .map(|f| f.iter().filter_map(|f| f["id"].as_str()).collect())
            .unwrap_or_default();
        assert!(ids.contains(&"snat_port_exhaustion"), "{ids:?}");
        // The record's NAT section, and the finding of the NAT's own namespace: its range full.
        let rn = &rep["nat"][0];
        assert_eq!(rn["drops"], r.insert_failed, "{rep}");
        assert_eq!(rn["utilisation"], 1.0, "{rn}");
        assert_eq!(rn["holders"][0]["pid"], r.client_pid, "{rn}");
        let range = rep["findings"]
            .as_array()
            .and_then(|f| f.iter().find(|f| f["id"] == "nat_range"))
            .unwrap_or_else(|| panic!("no nat_range finding: {ids:?}"));
        assert_eq!(range["netns"], r.router_netns, "{range}");
        assert_eq!(range["severity"], "critical", "{range}");
        let (text, err, code) = report(&[&file.display().to_string()]);
        assert_eq!(code, 0, "{err}");
        assert!(
            text.contains("Source NAT drops") && text.contains("10/10 in use (100%)"),
            "{text}"
        );
        eprintln!(
            "backend {backend}: {} drops = insert_failed +{} = drop +{}; client {} ({}) in netns {}",
            r.summary["nat"][0]["drops"],
            r.insert_failed,
            r.drops,
            r.client_pid,
            r.client_comm,
            r.client_netns
        );
    }
}

/// A firewall drop of new connections (conntrack on, no NAT) drops the same kind of packet with
/// the same reason, `SKB_DROP_REASON_NETFILTER_DROP`, and a conntrack entry attached: nothing is
/// reported, and the router's insert_failed does not move.
#[test]
#[ignore = "needs root: run with cargo xtask test"]
fn a_firewall_drop_rule_is_not_reported() {
    require_root();
    require_nft();
    let ruleset = "table ip pxhnat {\n  chain filt {\n    type filter hook forward priority filter; \
                   policy accept;\n    ct state new tcp dport 5000 counter drop\n  }\n}\n";
    let backend = backends_here().remove(0);
    let r = exhaust(&backend, ruleset, 2);
    let ctx = format!("client {}\n{}", r.client_line, r.stderr);
    assert!(r.client_line.contains("ok=0 failed=2"), "{ctx}");
    assert_eq!(r.insert_failed, 0, "{ctx}");
    assert_eq!(
        r.metric_drops, 0.0,
        "no NAT drop in the metrics: {}",
        r.scrape
    );
    assert!(
        !r.events.iter().any(|e| e["site"] == "nf_nat"),
        "a firewall drop is not NAT exhaustion: {:?}",
        r.events
    );
    assert!(r.summary.get("nat").is_none(), "{}", r.summary);
    assert!(!snat_offenders(&r.summary), "{}", r.summary);
}

fn snat_offenders(summary: &Value) -> bool {
    summary["offenders"].as_array().is_some_and(|o| {
        o.iter().any(|o| {
            o["destinations"]
                .as_array()
                .is_some_and(|d| d.iter().any(|d| d["cause"] == "snat_exhausted"))
        })
    })
}

/// The case the kernel filter cannot tell: a drop rule placed after srcnat (POSTROUTING,
/// priority 200) drops a new connection's first packet once it has been source-NATed, before
/// the conntrack confirm. Same reason, `IPS_SRC_NAT` set, never in the table: it is counted,
/// but the NAT's own table shows no clash (`"clash":false`) and its insert_failed does not
/// move, and the summary says so.
#[test]
#[ignore = "needs root: run with cargo xtask test"]
fn a_drop_rule_after_srcnat_is_flagged_as_no_clash() {
    require_root();
    require_nft();
    let ruleset = format!(
        "table ip pxhnat {{\n  chain post {{\n    type nat hook postrouting priority srcnat; \
         policy accept;\n    oifname \"pxr1\" meta l4proto tcp masquerade to :{NAT_LO}-{NAT_HI}\n  }}\n  \
         chain late {{\n    type filter hook postrouting priority 200; policy accept;\n    \
         ct state new tcp dport 5000 drop\n  }}\n}}\n"
    );
    let backend = backends_here().remove(0);
    let r = exhaust(&backend, &ruleset, 2);
    let ctx = format!("client {}\n{}", r.client_line, r.stderr);
    assert!(r.client_line.contains("ok=0 failed=2"), "{ctx}");
    assert_eq!(r.insert_failed, 0, "{ctx}");
    let nat: Vec<&Value> = r.events.iter().filter(|e| e["site"] == "nf_nat").collect();
    assert!(!nat.is_empty(), "the kernel filter keeps these: {ctx}");
    for e in &nat {
        assert_eq!(e["nat"]["clash"], false, "{e}");
        assert_eq!(e["pid"], r.client_pid, "{e}");
    }
    let n = &r.summary["nat"][0];
    assert_eq!(n["insert_failed_delta"], 0, "{}", r.summary);
    assert_eq!(n["drops"], nat.len(), "{}", r.summary);
}

/// The same exhaustion over IPv6 (an ip6 masquerade): the kernel program reads the 16-byte
/// tuples, conntrack's IPv6 dump gives the NAT's view, and the counts are as exact.
#[test]
#[ignore = "needs root: run with cargo xtask test"]
fn snat_exhaustion_over_ipv6_is_counted_and_named() {
    require_root();
    require_nft();
    let ruleset = format!(
        "table ip6 pxhnat6 {{\n  chain post {{\n    type nat hook postrouting priority srcnat; \
         policy accept;\n    oifname \"pxr1\" ip6 saddr {CLIENT_IP6} meta l4proto tcp masquerade \
         to :{NAT_LO}-{NAT_HI}\n  }}\n}}\n"
    );
    let backend = backends_here().remove(0);
    let r = exhaust_to(&backend, &ruleset, 13, SERVER6);
    let ctx = format!("backend {backend}: client {}\n{}", r.client_line, r.stderr);
    assert!(r.client_line.contains("ok=10"), "{ctx}");
    assert!(r.insert_failed > 0, "the NAT dropped nothing: {ctx}");
    assert_exhausted(&r, SERVER6, CLIENT_IP6, NAT_IP6, &ctx);
    assert!(
        r.events
            .iter()
            .filter(|e| e["site"] == "nf_nat")
            .all(|e| e["family"] == "ipv6"),
        "{:?}",
        r.events
    );
}

/// `top --catch nat`: one row per NAT destination, from the same watch as the summary: the
/// drops exactly the router's insert_failed rise, the client named as failer and holder, the
/// NAT's 10 ports all in use; and its drops in the total.
#[test]
#[ignore = "needs root: run with cargo xtask test"]
fn top_shows_a_row_per_nat_destination() {
    require_root();
    require_nft();
    let (t, server) = serving("top", &masquerade(), SERVER);
    let before = t.router_stat();
    let top = Tracer::tool(&[
        "top",
        "--json",
        "--catch",
        "nat",
        "--interval",
        "0.5",
        "--count",
        "10000",
    ]);
    let mut client = t.helper(&t.client, "client", 13);
    let client_line = client_done(&mut client);
    let client_pid = client.0.id();
    // Two refreshes after the last drop.
    std::thread::sleep(Duration::from_millis(1500));
    let after = t.router_stat();
    let (out, stderr, code) = top.stop();
    assert_eq!(code, 0, "{stderr}");
    let ctx = format!("client {client_line}\n{stderr}");
    assert!(client_line.contains("ok=10"), "{ctx}");
    let insert_failed = after.0 - before.0;
    assert!(insert_failed > 0, "the NAT dropped nothing: {ctx}");
    let last: Value = out
        .lines()
        .rev()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .find(|v| v["type"] == "top")
        .unwrap_or_else(|| panic!("no top snapshot: {out}\n{ctx}"));
    let rows = last["nat"].as_array().expect("nat rows");
    assert_eq!(rows.len(), 1, "one NAT destination: {last}");
    let n = &rows[0];
    assert_full_entry(
        n,
        insert_failed,
        client_pid,
        Topology::inode(&t.router),
        SERVER,
        NAT_IP,
    );
    assert!(n["drops_per_s"].is_number(), "{n}");
    let failing = last["failing"]
        .as_array()
        .and_then(|f| f.iter().find(|f| f["pid"] == client_pid))
        .unwrap_or_else(|| panic!("the client is a failing process: {last}"));
    assert_eq!(failing["failures"], insert_failed, "{failing}");
    assert!(
        last["failures_total"].as_u64() >= Some(insert_failed),
        "the NAT drops are in the total: {last}"
    );
    drop(client);
    drop(server);
}

/// `portexhaust doctor` run in the router namespace: without watching, the NAT's own view says
/// its 10 ports towards the server are all held by the client (a critical `nat_range` finding
/// with the NAT fixes); with `--watch`, the drops meanwhile, exactly, and who they came from.
#[test]
#[ignore = "needs root: run with cargo xtask test"]
fn doctor_in_the_nat_namespace_says_it_is_full_and_what_to_do() {
    require_root();
    require_nft();
    let (t, server) = serving("doc", &masquerade(), SERVER);
    // The client takes the NAT's 10 ports and holds them.
    let mut holder = t.helper(&t.client, "client", 10);
    let holder_line = client_done(&mut holder);
    assert!(holder_line.contains("ok=10"), "{holder_line}");
    let doctor = |extra: &[&str]| {
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &t.router, BIN, "doctor", "--json"])
            .args(extra)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        cmd
    };
    let out = doctor(&[]).output().expect("doctor");
    let stderr = String::from_utf8_lossy(&out.stderr);
    let a: Value = serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("doctor --json: {e}\n{stderr}"));
    let n = &a["nat"][0];
    assert_eq!(n["dst"], SERVER, "{a}");
    assert_eq!(n["in_use"], 10, "{n}");
    assert_eq!(n["utilisation"], 1.0, "{n}");
    assert_eq!(n["drops"], 0, "nothing watched: {n}");
    assert_eq!(n["holders"][0]["pid"], holder.0.id(), "{n}");
    let f = a["findings"]
        .as_array()
        .and_then(|f| f.iter().find(|f| f["id"] == "nat_range"))
        .unwrap_or_else(|| panic!("no nat_range finding: {a}"));
    assert_eq!(f["severity"], "critical", "{f}");
    let fixes: Vec<&str> = f["fixes"]
        .as_array()
        .expect("fixes")
        .iter()
        .filter_map(|x| x["text"].as_str())
        .collect();
    assert!(fixes[0].starts_with("Reuse connections"), "{fixes:?}");
    assert!(fixes[2].contains("--random-fully"), "{fixes:?}");
    // The text says the same.
    let text = Command::new("ip")
        .args(["netns", "exec", &t.router, BIN, "doctor"])
        .output()
        .expect("doctor");
    let text = String::from_utf8_lossy(&text.stdout);
    assert!(
        text.contains("Source NAT of this namespace") && text.contains("10/10 in use (100%)"),
        "{text}"
    );

    // Watching: a second client's 3 connects are dropped while doctor counts.
    let before = t.router_stat();
    let mut child = doctor(&["--watch", "8"]).spawn().expect("doctor --watch");
    let mut err = BufReader::new(child.stderr.take().expect("stderr"));
    let mut seen = String::new();
    loop {
        let mut l = String::new();
        assert!(
            err.read_line(&mut l).expect("stderr") > 0,
            "doctor ended before watching: {seen}"
        );
        seen.push_str(&l);
        if l.contains("doctor: watching") {
            break;
        }
    }
    assert!(
        seen.contains("source-NAT drops"),
        "the NAT is watched: {seen}"
    );
    let mut client = t.helper(&t.client, "client", 3);
    let client_line = client_done(&mut client);
    assert!(client_line.contains("ok=0 failed=3"), "{client_line}");
    let out = child.wait_with_output().expect("doctor --watch");
    let after = t.router_stat();
    assert!(out.status.success(), "{seen}");
    let a: Value = serde_json::from_slice(&out.stdout).expect("doctor --watch --json");
    let insert_failed = after.0 - before.0;
    assert!(insert_failed > 0, "{a}");
    let n = &a["nat"][0];
    assert_eq!(n["drops"], insert_failed, "exact: {n}");
    assert_eq!(
        n["failers"][0]["pid"],
        client.0.id(),
        "the dropped client: {n}"
    );
    let f = a["findings"]
        .as_array()
        .and_then(|f| f.iter().find(|f| f["id"] == "snat_port_exhaustion"))
        .unwrap_or_else(|| panic!("no snat_port_exhaustion finding: {a}"));
    assert!(
        f["title"]
            .as_str()
            .is_some_and(|t| t.contains(&format!("dropped {insert_failed} SYNs"))),
        "{f}"
    );
    drop(client);
    drop(holder);
    drop(server);
}

/// The binary the tests run is the one `cargo test` built.
#[test]
fn binary_exists() {
    assert!(std::path::Path::new(BIN).exists());
}
