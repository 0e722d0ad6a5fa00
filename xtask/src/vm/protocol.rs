//! What the guest's /init reports, and how the host judges it. Pure: no QEMU, no files.
//!
//! The guest writes records to a serial port of their own (ttyS1; the kernel console is ttyS0),
//! one per line, each framed as `@@PXH-KIND key=value ...@@`; captured files travel as base64
//! lines between `@@PXH-FILE name=N@@` and `@@PXH-EOF name=N@@`. The parser still looks for
//! the markers anywhere in a line and rejects base64 it cannot decode, so the same stream can
//! be read from the kernel console (where kernel messages interleave) if it ever has to be.
use std::collections::BTreeMap;

use serde::Serialize;
use serde_json::Value;

/// One `@@PXH-STEP` record: a command the guest ran and how it ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Step {
    pub backend: String,
    pub step: String,
    pub exit: Option<i32>,
    pub secs: Option<u64>,
    pub fields: BTreeMap<String, String>,
}

/// Everything the guest said, in order of arrival.
#[derive(Debug, Default, Clone)]
pub struct GuestReport {
    /// `uname -r` from `@@PXH-BOOTED@@`: None means /init never ran (or never got to say so).
    pub booted: Option<String>,
    pub facts: BTreeMap<String, String>,
    pub steps: Vec<Step>,
    pub files: BTreeMap<String, Vec<u8>>,
    /// Files whose base64 did not decode (a damaged line); their content is partial.
    pub damaged: Vec<String>,
    /// `@@PXH-BEGIN backend=B step=S@@` of the steps in progress, innermost last (the
    /// workload runs inside the trace session), for "hung during ...".
    pub running: Vec<(String, String)>,
    pub done: bool,
}

impl GuestReport {
    pub fn step(&self, backend: &str, step: &str) -> Option<&Step> {
        self.steps
            .iter()
            .find(|s| s.backend == backend && s.step == step)
    }

    pub fn text(&self, name: &str) -> String {
        self.files
            .get(name)
            .map(|b| String::from_utf8_lossy(b).into_owned())
            .unwrap_or_default()
    }
}

/// Parse `@@PXH-KIND k=v k=v@@` out of a line (the marker may be preceded by noise).
pub fn parse_marker(line: &str) -> Option<(String, BTreeMap<String, String>)> {
    let start = line.find("@@PXH-")?;
    let rest = &line[start + 6..];
    let end = rest.find("@@")?;
    let body = &rest[..end];
    let mut words = body.split_whitespace();
    let kind = words.next()?.to_string();
    let fields = words
        .filter_map(|w| w.split_once('='))
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    Some((kind, fields))
}

pub fn parse(stream: &str) -> GuestReport {
    let mut r = GuestReport::default();
    // (name, base64 text so far)
    let mut file: Option<(String, String)> = None;
    for raw in stream.lines() {
        let line = raw.trim_end_matches('\r');
        match parse_marker(line) {
            Some((kind, f)) => {
                let get = |k: &str| f.get(k).cloned().unwrap_or_default();
                match kind.as_str() {
                    "BOOTED" => r.booted = Some(get("release")),
                    "FACT" => {
                        r.facts.insert(get("name"), get("value"));
                    }
                    "BEGIN" => r.running.push((get("backend"), get("step"))),
                    "STEP" => {
                        let done = (get("backend"), get("step"));
                        r.running.retain(|s| *s != done);
                        r.steps.push(Step {
                            backend: get("backend"),
                            step: get("step"),
                            exit: f.get("exit").and_then(|v| v.parse().ok()),
                            secs: f.get("secs").and_then(|v| v.parse().ok()),
                            fields: f,
                        });
                    }
                    "FILE" => file = Some((get("name"), String::new())),
                    "EOF" => {
                        if let Some((name, b64)) = file.take() {
                            match base64_decode(&b64) {
                                Some(bytes) => {
                                    r.files.insert(name, bytes);
                                }
                                None => r.damaged.push(name),
                            }
                        }
                    }
                    "DONE" => r.done = true,
                    _ => {}
                }
            }
            None => {
                if let Some((_, b64)) = file.as_mut() {
                    b64.push_str(line.trim());
                }
            }
        }
    }
    r
}

/// Standard base64 (padding optional); None on any character outside the alphabet.
pub fn base64_decode(text: &str) -> Option<Vec<u8>> {
    fn val(c: u8) -> Option<u32> {
        Some(match c {
            b'A'..=b'Z' => c - b'A',
            b'a'..=b'z' => c - b'a' + 26,
            b'0'..=b'9' => c - b'0' + 52,
            b'+' => 62,
            b'/' => 63,
            _ => return None,
        } as u32)
    }
    let clean = text.trim_end_matches('=').as_bytes();
    let mut out = Vec::with_capacity(clean.len() * 3 / 4);
    for chunk in clean.chunks(4) {
        let mut acc = 0u32;
        for (i, &c) in chunk.iter().enumerate() {
            acc |= val(c)? << (18 - 6 * i);
        }
        let bytes = acc.to_be_bytes();
        match chunk.len() {
            4 => out.extend_from_slice(&bytes[1..4]),
            3 => out.extend_from_slice(&bytes[1..3]),
            2 => out.push(bytes[1]),
            _ => return None,
        }
    }
    Some(out)
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Status {
    Pass,
    Fail,
    /// portexhaust exited 3: the kernel does not offer this backend.
    Unsupported,
    /// The guest never ran this check: no kernel package, a boot failure, a hang.
    NotRun,
}

impl Status {
    pub fn word(self) -> &'static str {
        match self {
            Self::Pass => "pass",
            Self::Fail => "FAIL",
            Self::Unsupported => "unsupported",
            Self::NotRun => "not-run",
        }
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct Cell {
    pub status: Status,
    /// One line: why it failed / is unsupported / was not run; a short summary for a pass.
    pub reason: String,
    /// Captured output that explains a failure (selftest table, stderr tails).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub details: Vec<String>,
}

impl Cell {
    pub fn new(status: Status, reason: impl Into<String>) -> Self {
        Self {
            status,
            reason: reason.into(),
            details: Vec::new(),
        }
    }
    fn with_details(mut self, details: Vec<String>) -> Self {
        self.details = details;
        self
    }
}

/// What the trace session's workload does (must match the arguments /init passes it).
#[derive(Debug, Clone)]
pub struct Expect {
    pub failures: u64,
    pub dst: String,
    pub errno: u64,
    /// The kernel function every backend must name as the failure site.
    pub site: String,
}

/// Exit codes by which the guest's `timeout -s KILL` reports a command it had to kill.
fn killed_by_timeout(exit: Option<i32>) -> bool {
    matches!(exit, Some(124 | 137))
}

fn tail(text: &str, n: usize) -> Vec<String> {
    let lines: Vec<&str> = text.lines().filter(|l| !l.trim().is_empty()).collect();
    lines[lines.len().saturating_sub(n)..]
        .iter()
        .map(|l| l.to_string())
        .collect()
}

fn last_line(text: &str) -> String {
    tail(text, 1).pop().unwrap_or_else(|| "(no output)".into())
}

/// The rows of selftest's table that say FAIL, without the table's drawing: "tcp [::1]:5000
/// EADDRNOTAVAIL at __inet_hash_connect | 5 | 0 | 5 | FAIL".
fn failed_rows(table: &str) -> Vec<String> {
    table
        .lines()
        .filter(|l| l.contains("FAIL") && !l.contains("FAILED"))
        .map(|l| {
            l.split(['│', '┆', '|'])
                .map(str::trim)
                .filter(|c| !c.is_empty())
                .collect::<Vec<_>>()
                .join(" | ")
        })
        .collect()
}

/// The reason portexhaust gave for exit 3: `portexhaust: error: backend X is not available on
/// this kernel: <reason>`.
pub fn unsupported_reason(stderr: &str) -> String {
    let marker = "not available on this kernel:";
    stderr
        .lines()
        .find_map(|l| l.split_once(marker).map(|(_, r)| r.trim().to_string()))
        .unwrap_or_else(|| last_line(stderr))
}

fn labelled(label: &str, text: &str, n: usize) -> Vec<String> {
    let t = tail(text, n);
    if t.is_empty() {
        return Vec::new();
    }
    let mut out = vec![format!("{label}:")];
    out.extend(t.into_iter().map(|l| format!("  {l}")));
    out
}

/// Judge one backend from the guest's report. None: the guest never finished its checks.
pub fn classify(r: &GuestReport, backend: &str, expect: &Expect) -> Option<Cell> {
    let file = |step: &str, stream: &str| r.text(&format!("{backend}.{step}.{stream}"));
    let st = r.step(backend, "selftest")?;
    let (st_out, st_err) = (file("selftest", "out"), file("selftest", "err"));
    let selftest_failure = match st.exit {
        Some(3) => return Some(Cell::new(Status::Unsupported, unsupported_reason(&st_err))),
        Some(0) => None,
        e if killed_by_timeout(e) => Some(format!(
            "selftest did not finish within {} s in the guest (killed)",
            st.secs.unwrap_or(0)
        )),
        e => {
            let failed = failed_rows(&st_out);
            let why = if failed.is_empty() {
                last_line(&st_err)
            } else {
                failed.join("; ")
            };
            Some(format!("selftest exited {}: {why}", code(e)))
        }
    };
    // The guest runs the trace session after any selftest that did not say "unsupported".
    let trace = judge_trace(r, backend, expect);
    match (selftest_failure, trace) {
        (Some(why), trace) => {
            let mut d = labelled("selftest stdout", &st_out, 40);
            d.extend(labelled("selftest stderr", &st_err, 20));
            match trace {
                Some(Ok(summary)) => d.push(format!("trace session: ok: {summary}")),
                Some(Err((t_why, t_details))) => {
                    d.push(format!("trace session: also failed: {t_why}"));
                    d.extend(t_details);
                }
                None => {}
            }
            Some(Cell::new(Status::Fail, why).with_details(d))
        }
        (None, None) => None,
        (None, Some(Ok(summary))) => Some(Cell::new(
            Status::Pass,
            format!("selftest {} s; {summary}", st.secs.unwrap_or(0)),
        )),
        (None, Some(Err((why, details)))) => {
            Some(Cell::new(Status::Fail, why).with_details(details))
        }
    }
}

fn code(exit: Option<i32>) -> String {
    exit.map_or("?".into(), |c| c.to_string())
}

/// The trace session: Ok(summary) or Err((reason, details)); None if it never ran to the end.
fn judge_trace(
    r: &GuestReport,
    backend: &str,
    expect: &Expect,
) -> Option<Result<String, (String, Vec<String>)>> {
    let file = |step: &str, stream: &str| r.text(&format!("{backend}.{step}.{stream}"));
    let tr = r.step(backend, "trace")?;
    let (tr_out, tr_err) = (file("trace", "out"), file("trace", "err"));
    let (wl_out, wl_err) = (file("workload", "out"), file("workload", "err"));
    let details = || {
        let mut d = labelled("trace stderr", &tr_err, 15);
        d.extend(labelled("trace stdout (last lines)", &tr_out, 5));
        d.extend(labelled("workload stdout", &wl_out, 5));
        d.extend(labelled("workload stderr", &wl_err, 10));
        d
    };
    let fail = |why: String| Some(Err((why, details())));
    if tr.exit == Some(3) {
        return fail(format!(
            "trace says the backend is unavailable: {}",
            unsupported_reason(&tr_err)
        ));
    }
    if tr.fields.get("ready").map(String::as_str) != Some("1") {
        return fail(format!(
            "trace never said it was ready (exit {}): {}",
            code(tr.exit),
            last_line(&tr_err)
        ));
    }
    let wl = r.step(backend, "workload");
    let wl_exit = wl.and_then(|w| w.exit);
    if wl_exit != Some(0) {
        return fail(format!(
            "the workload exited {}: {}",
            code(wl_exit),
            last_line(&wl_err)
        ));
    }
    if killed_by_timeout(tr.exit) {
        return fail("trace did not stop on SIGINT nor after its --duration (killed)".into());
    }
    if tr.exit != Some(0) {
        return fail(format!(
            "trace exited {}: {}",
            code(tr.exit),
            last_line(&tr_err)
        ));
    }
    let wl_pid: Option<u64> = wl.and_then(|w| w.fields.get("pid")?.parse().ok());
    match check_trace(&tr_out, backend, wl_pid, expect) {
        // Worth saying, not failing: SIGTERM is a documented way to end a session too.
        Ok(summary) if tr.fields.get("stop").map(String::as_str) == Some("term") => Some(Ok(
            format!("{summary}; it ignored SIGINT and was ended with SIGTERM"),
        )),
        Ok(summary) => Some(Ok(summary)),
        Err(why) => fail(why),
    }
}

/// Check the NDJSON of `trace --json` against what the workload did.
pub fn check_trace(
    ndjson: &str,
    backend: &str,
    workload_pid: Option<u64>,
    expect: &Expect,
) -> Result<String, String> {
    let mut summary: Option<Value> = None;
    let mut events = 0u64;
    let mut matching = 0u64;
    let mut problems: BTreeMap<String, u64> = BTreeMap::new();
    for line in ndjson.lines() {
        let Ok(v) = serde_json::from_str::<Value>(line.trim()) else {
            continue;
        };
        match v.get("type").and_then(Value::as_str) {
            Some("summary") => summary = Some(v),
            Some("failure") => {
                events += 1;
                let mut bad = Vec::new();
                let pid = v.get("pid").and_then(Value::as_u64);
                if let Some(want) = workload_pid
                    && pid != Some(want)
                {
                    bad.push(format!("pid {} (workload is {want})", show(pid)));
                }
                let dst = v.get("dst").and_then(Value::as_str);
                if dst != Some(expect.dst.as_str()) {
                    bad.push(format!("dst {}", dst.unwrap_or("missing")));
                }
                let errno = v.get("errno").and_then(Value::as_u64);
                if errno != Some(expect.errno) {
                    bad.push(format!("errno {}", show(errno)));
                }
                let ev_backend = v.get("backend").and_then(Value::as_str);
                if backend != "auto" && ev_backend != Some(backend) {
                    bad.push(format!("backend {}", ev_backend.unwrap_or("missing")));
                }
                // Every backend must name the kernel function that ran out of ports (the
                // tracepoint backend infers it: IPv4 EADDRNOTAVAIL has no other source).
                let site = v.get("site").and_then(Value::as_str);
                if site != Some(expect.site.as_str()) {
                    bad.push(format!("site {}", site.unwrap_or("missing")));
                }
                if bad.is_empty() {
                    matching += 1;
                } else {
                    *problems.entry(bad.join(", ")).or_default() += 1;
                }
            }
            _ => {}
        }
    }
    let Some(summary) = summary else {
        return Err(format!(
            "trace printed no summary line ({events} failure events)"
        ));
    };
    let total = summary.get("failures_total").and_then(Value::as_u64);
    let dropped = summary
        .get("dropped_events")
        .and_then(Value::as_u64)
        .unwrap_or(0);
    let sum_backend = summary.get("backend").and_then(Value::as_str);
    let mut why = Vec::new();
    if backend != "auto" && sum_backend != Some(backend) {
        why.push(format!(
            "asked for backend {backend}, the summary says {}",
            sum_backend.unwrap_or("nothing")
        ));
    }
    if total != Some(expect.failures) {
        why.push(format!(
            "summary failures_total {}, the workload made {}",
            show(total),
            expect.failures
        ));
    }
    if matching != expect.failures {
        why.push(format!(
            "{matching} of {events} failure events match the workload (want {})",
            expect.failures
        ));
    }
    for (p, n) in &problems {
        why.push(format!("{n} event(s) with {p}"));
    }
    if dropped != 0 {
        why.push(format!("{dropped} dropped events"));
    }
    if why.is_empty() {
        let used = sum_backend.unwrap_or(backend);
        Ok(format!(
            "trace saw {matching}/{} failures (backend {used})",
            expect.failures
        ))
    } else {
        Err(format!("trace: {}", why.join("; ")))
    }
}

/// The NAT scenario's server, behind the router's masquerade (must match init.sh).
pub const NAT_DST: &str = "10.203.2.2:5000";
/// Connects the scenario's client makes, and how many the NAT's 10 ports let through.
pub const NAT_CONNECTS: u64 = 13;
pub const NAT_PORTS: u64 = 10;

/// The matrix column of a NAT hook: `nat-confirm`, `nat-kfree_skb`.
pub fn nat_column(hook: &str) -> String {
    format!("nat-{hook}")
}

/// What `watching nat: ...` must say for each hook `PORTEXHAUST_NAT_HOOK` forces.
fn nat_hook_words(hook: &str) -> &'static str {
    match hook {
        "confirm" => "kprobe __nf_conntrack_confirm",
        _ => "tp_btf kfree_skb",
    }
}

/// Reasons for "not watching nat" that mean the kernel lacks the hook (not a failure).
const NAT_UNSUPPORTED: &[&str] = &[
    "no drop reason",
    "no kprobes for __nf_conntrack_confirm",
    "has no skb:kfree_skb",
    "has no SKB_DROP_REASON_NETFILTER_DROP",
];

/// `insert_failed` of /proc/net/stat/nf_conntrack, summed over its per-CPU hex rows.
pub fn insert_failed(stat: &str) -> Option<u64> {
    let mut lines = stat.lines();
    let header: Vec<&str> = lines.next()?.split_whitespace().collect();
    let col = header.iter().position(|h| *h == "insert_failed")?;
    let mut sum = 0;
    for l in lines.filter(|l| !l.trim().is_empty()) {
        let v = l.split_whitespace().nth(col)?;
        sum += u64::from_str_radix(v, 16).ok()?;
    }
    Some(sum)
}

/// Judge the NAT scenario with one hook. None: the guest never ran it.
pub fn classify_nat(r: &GuestReport, hook: &str) -> Option<Cell> {
    let col = nat_column(hook);
    let file = |name: &str| r.text(&format!("{col}.{name}"));
    let st = r.step(&col, "trace")?;
    let (tr_out, tr_err) = (file("trace.out"), file("trace.err"));
    let details = || {
        let mut d = labelled("setup", &file("setup.err"), 5);
        d.extend(labelled("trace stderr", &tr_err, 15));
        d.extend(labelled("trace stdout (last lines)", &tr_out, 5));
        d.extend(labelled("client stdout", &file("client.out"), 3));
        d.extend(labelled("client stderr", &file("client.err"), 5));
        d.extend(labelled("server stderr", &file("server.err"), 5));
        d
    };
    let fail = |why: String| Some(Cell::new(Status::Fail, why).with_details(details()));
    let field = |k: &str| st.fields.get(k).map(String::as_str);
    if field("setup") != Some("0") {
        return fail(format!(
            "setting up the NAT topology failed: {}",
            last_line(&file("setup.err"))
        ));
    }
    if let Some(why) = tr_err
        .lines()
        .find_map(|l| l.split_once("not watching nat: ").map(|(_, w)| w.trim()))
    {
        if NAT_UNSUPPORTED.iter().any(|u| why.contains(u)) {
            return Some(Cell::new(Status::Unsupported, why));
        }
        return fail(format!("NAT not watched: {why}"));
    }
    if field("ready") != Some("1") {
        return fail(format!(
            "trace never said it was ready (exit {}): {}",
            field("exit").unwrap_or("?"),
            last_line(&tr_err)
        ));
    }
    let watching = tr_err
        .lines()
        .find_map(|l| {
            l.split_once("watching nat: ")
                .map(|(_, w)| w.trim().to_string())
        })
        .unwrap_or_default();
    if !watching.contains(nat_hook_words(hook)) {
        return fail(format!(
            "PORTEXHAUST_NAT_HOOK={hook}, but the coverage line says \"watching nat: {watching}\""
        ));
    }
    if field("client") != Some("0") || field("exit") != Some("0") {
        return fail(format!(
            "client exited {}, trace exited {}: {}",
            field("client").unwrap_or("?"),
            field("exit").unwrap_or("?"),
            last_line(&tr_err)
        ));
    }
    let client: Value = serde_json::from_str(file("client.out").trim()).unwrap_or(Value::Null);
    let before = insert_failed(&file("stat.before"));
    let after = insert_failed(&file("stat.after"));
    let summary = match check_nat(&tr_out, &client, before, after) {
        Ok(summary) => summary,
        Err(why) => return fail(why),
    };
    // The control: a firewall drop rule instead of the NAT, same hook.
    let ctl = format!("{col}-drop");
    let ctl_file = |name: &str| r.text(&format!("{ctl}.{name}"));
    let Some(cs) = r.step(&ctl, "trace") else {
        return fail("the firewall-drop control never ran".into());
    };
    let cfield = |k: &str| cs.fields.get(k).map(String::as_str);
    if cfield("setup") != Some("0") || cfield("client") != Some("0") || cfield("exit") != Some("0")
    {
        let mut d = labelled("control setup", &ctl_file("setup.err"), 5);
        d.extend(labelled("control trace stderr", &ctl_file("trace.err"), 10));
        return Some(
            Cell::new(
                Status::Fail,
                format!(
                    "the firewall-drop control did not run through (setup {}, client {}, trace {})",
                    cfield("setup").unwrap_or("?"),
                    cfield("client").unwrap_or("?"),
                    cfield("exit").unwrap_or("?")
                ),
            )
            .with_details(d),
        );
    }
    let control: Value = serde_json::from_str(ctl_file("client.out").trim()).unwrap_or(Value::Null);
    match check_nat_control(
        &ctl_file("trace.out"),
        &control,
        insert_failed(&ctl_file("stat.before")),
        insert_failed(&ctl_file("stat.after")),
    ) {
        Ok(c) => Some(Cell::new(
            Status::Pass,
            format!("{summary}; {c} ({watching})"),
        )),
        Err(why) => {
            let mut d = labelled("control trace stdout", &ctl_file("trace.out"), 5);
            d.extend(labelled("control trace stderr", &ctl_file("trace.err"), 10));
            Some(Cell::new(Status::Fail, why).with_details(d))
        }
    }
}

/// The control run: the client's SYNs dropped by a firewall rule (no NAT) must not be
/// reported, and the router's insert_failed must not move.
pub fn check_nat_control(
    ndjson: &str,
    client: &Value,
    before: Option<u64>,
    after: Option<u64>,
) -> Result<String, String> {
    let ok = client.get("ok").and_then(Value::as_u64);
    let failed = client.get("failed").and_then(Value::as_u64).unwrap_or(0);
    if ok != Some(0) || failed == 0 {
        return Err(format!(
            "control: the drop rule should have stopped every connect: {client}"
        ));
    }
    let reported = ndjson
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l.trim()).ok())
        .filter(|v| v.get("site").and_then(Value::as_str) == Some("nf_nat"))
        .count();
    if reported != 0 {
        return Err(format!(
            "control: {reported} nf_nat line(s) for connects a firewall rule dropped"
        ));
    }
    match (before, after) {
        (Some(b), Some(a)) if a == b => Ok(format!(
            "a drop rule's {failed} refused connects not reported"
        )),
        _ => Err(format!(
            "control: the router's insert_failed moved ({} -> {})",
            show(before),
            show(after)
        )),
    }
}

/// Check the NDJSON of `trace --json --catch nat` against the client's report and the router's
/// `insert_failed` before and after.
pub fn check_nat(
    ndjson: &str,
    client: &Value,
    before: Option<u64>,
    after: Option<u64>,
) -> Result<String, String> {
    let pid = client.get("pid").and_then(Value::as_u64);
    let ok = client.get("ok").and_then(Value::as_u64);
    let failed = client.get("failed").and_then(Value::as_u64);
    if ok != Some(NAT_PORTS) || failed != Some(NAT_CONNECTS - NAT_PORTS) {
        return Err(format!(
            "the client got {} of {NAT_CONNECTS} connections through a NAT of {NAT_PORTS} ports \
             (want {NAT_PORTS}): {client}",
            show(ok)
        ));
    }
    let (Some(before), Some(after)) = (before, after) else {
        return Err("no insert_failed in the router's /proc/net/stat/nf_conntrack".into());
    };
    let delta = after.saturating_sub(before);
    if delta == 0 {
        return Err("the NAT dropped nothing: the router's insert_failed did not rise".into());
    }
    let mut nat = 0u64;
    let mut problems: BTreeMap<String, u64> = BTreeMap::new();
    let mut summary: Option<Value> = None;
    for line in ndjson.lines() {
        let Ok(v) = serde_json::from_str::<Value>(line.trim()) else {
            continue;
        };
        match v.get("type").and_then(Value::as_str) {
            Some("summary") => summary = Some(v),
            Some("failure") if v.get("site").and_then(Value::as_str) == Some("nf_nat") => {
                nat += 1;
                let mut bad = Vec::new();
                let cause = v.get("cause").and_then(Value::as_str);
                if cause != Some("snat_exhausted") {
                    bad.push(format!("cause {}", cause.unwrap_or("missing")));
                }
                let got = v.get("pid").and_then(Value::as_u64);
                if got != pid {
                    bad.push(format!("pid {} (the client is {})", show(got), show(pid)));
                }
                let dst = v.get("dst").and_then(Value::as_str);
                if dst != Some(NAT_DST) {
                    bad.push(format!("dst {}", dst.unwrap_or("missing")));
                }
                // The NAT's own table has another connection on that reply tuple.
                if v.pointer("/nat/clash").and_then(Value::as_bool) != Some(true) {
                    bad.push("no clash in the NAT's conntrack table".into());
                }
                if !bad.is_empty() {
                    *problems.entry(bad.join(", ")).or_default() += 1;
                }
            }
            _ => {}
        }
    }
    let mut why = Vec::new();
    if nat != delta {
        why.push(format!(
            "{nat} nf_nat failure lines, the router's insert_failed rose by {delta}"
        ));
    }
    for (p, n) in &problems {
        why.push(format!("{n} nf_nat line(s) with {p}"));
    }
    let entry = summary
        .as_ref()
        .and_then(|s| s.get("nat")?.as_array()?.first().cloned());
    let drops = entry.as_ref().and_then(|e| e.get("drops")?.as_u64());
    if drops != Some(delta) {
        why.push(format!(
            "the summary's nat drops {}, insert_failed +{delta}",
            show(drops)
        ));
    }
    let in_use = entry.as_ref().and_then(|e| e.get("in_use")?.as_u64());
    if in_use != Some(NAT_PORTS) {
        why.push(format!(
            "the summary says {} of the NAT's {NAT_PORTS} ports in use",
            show(in_use)
        ));
    }
    if why.is_empty() {
        Ok(format!(
            "{nat} nf_nat drops = insert_failed +{delta}, snat_exhausted, clash, client pid {} \
             named, NAT {NAT_PORTS}/{NAT_PORTS} ports in use",
            show(pid)
        ))
    } else {
        Err(format!("nat: {}", why.join("; ")))
    }
}

fn show(v: Option<u64>) -> String {
    v.map_or("missing".into(), |n| n.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn expect() -> Expect {
        Expect {
            failures: 2,
            dst: "127.0.0.1:5000".into(),
            errno: 99,
            site: "__inet_hash_connect".into(),
        }
    }

    fn b64(s: &str) -> String {
        // Tiny encoder for the tests only.
        const A: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
        let mut out = String::new();
        for c in s.as_bytes().chunks(3) {
            let n = (c[0] as u32) << 16
                | (*c.get(1).unwrap_or(&0) as u32) << 8
                | *c.get(2).unwrap_or(&0) as u32;
            for i in 0..4 {
                if i <= c.len() {
                    out.push(A[(n >> (18 - 6 * i) & 63) as usize] as char);
                } else {
                    out.push('=');
                }
            }
        }
        out
    }

    #[test]
    fn base64_round_trip() {
        for s in ["", "a", "ab", "abc", "hello world\n", "{\"x\":1}"] {
            assert_eq!(base64_decode(&b64(s)).unwrap(), s.as_bytes());
        }
        assert!(base64_decode("ab$d").is_none());
    }

    fn failure(pid: u64, site: &str) -> String {
        format!(
            r#"{{"type":"failure","pid":{pid},"dst":"127.0.0.1:5000","errno":99,"site":"{site}","backend":"kprobe"}}"#
        )
    }

    fn guest(selftest_exit: i32, trace_out: &str) -> String {
        let mut s = String::from("junk\n@@PXH-BOOTED release=6.1.0-50-cloud-amd64@@\n");
        s += &format!(
            "@@PXH-FILE name=kprobe.selftest.err@@\n{}\n@@PXH-EOF name=kprobe.selftest.err@@\n",
            b64(
                "portexhaust: error: backend kprobe is not available on this kernel: no kprobe PMU\n"
            )
        );
        s += &format!("@@PXH-STEP backend=kprobe step=selftest exit={selftest_exit} secs=12@@\n");
        s += "@@PXH-STEP backend=kprobe step=workload exit=0 secs=1 pid=77@@\n";
        s += &format!(
            "@@PXH-FILE name=kprobe.trace.out@@\n{}\n@@PXH-EOF name=kprobe.trace.out@@\n",
            b64(trace_out)
        );
        // A kernel message glued in front of a marker must not hide it.
        s += "[   12.3] random: crng init done@@PXH-STEP backend=kprobe step=trace exit=0 secs=9 ready=1@@\n@@PXH-DONE@@\n";
        s
    }

    #[test]
    fn pass_unsupported_and_fail() {
        let good = format!(
            "{}\n{}\n{{\"type\":\"summary\",\"backend\":\"kprobe\",\"failures_total\":2,\"dropped_events\":0,\"offenders\":[]}}\n",
            failure(77, "__inet_hash_connect"),
            failure(77, "__inet_hash_connect")
        );
        let r = parse(&guest(0, &good));
        assert_eq!(r.booted.as_deref(), Some("6.1.0-50-cloud-amd64"));
        assert!(r.done);
        let c = classify(&r, "kprobe", &expect()).unwrap();
        assert_eq!(c.status, Status::Pass, "{c:?}");

        let c = classify(&parse(&guest(3, &good)), "kprobe", &expect()).unwrap();
        assert_eq!(c.status, Status::Unsupported);
        assert_eq!(c.reason, "no kprobe PMU");

        let c = classify(&parse(&guest(1, &good)), "kprobe", &expect()).unwrap();
        assert_eq!(c.status, Status::Fail);

        let wrong = format!(
            "{}\n{{\"type\":\"summary\",\"backend\":\"kprobe\",\"failures_total\":1,\"dropped_events\":0}}\n",
            failure(78, "tcp_v4_connect")
        );
        let c = classify(&parse(&guest(0, &wrong)), "kprobe", &expect()).unwrap();
        assert_eq!(c.status, Status::Fail);
        assert!(c.reason.contains("failures_total 1"), "{}", c.reason);
        assert!(c.reason.contains("site tcp_v4_connect"), "{}", c.reason);

        // Nothing about fentry: the guest never got there.
        assert!(classify(&r, "fentry", &expect()).is_none());
    }

    #[test]
    fn failed_table_rows_become_the_reason() {
        let table = "│ check ┆ expected ┆ events ┆ result │\n│ tcp [::1]:5000 EADDRNOTAVAIL ┆ 5 ┆ 0 ┆ FAIL   │\n│ bind ┆ 5 ┆ 5 ┆ pass │\nselftest FAILED with the fentry backend\n";
        assert_eq!(
            failed_rows(table),
            vec!["tcp [::1]:5000 EADDRNOTAVAIL | 5 | 0 | FAIL".to_string()]
        );
    }

    fn nat_line(pid: u64, cause: &str) -> String {
        format!(
            r#"{{"type":"failure","pid":{pid},"dst":"{NAT_DST}","errno":0,"site":"nf_nat","cause":"{cause}","nat":{{"clash":true}}}}"#
        )
    }

    #[test]
    fn nat_counts_must_equal_insert_failed() {
        let stat = |n: u64| {
            format!(
                "entries  clashres found new invalid ignore delete delete_list insert insert_failed drop\n\
                 00000000 00000000 0 0 0 0 0 0 0 {:08x} 0\n00000000 00000000 0 0 0 0 0 0 0 00000001 0\n",
                n
            )
        };
        assert_eq!(insert_failed(&stat(2)), Some(3));
        assert_eq!(insert_failed("nothing"), None);
        let client = serde_json::json!({"pid": 42, "ok": 10, "failed": 3});
        let sum = r#"{"type":"summary","nat":[{"drops":2,"in_use":10}]}"#;
        let good = format!(
            "{}\n{}\n{sum}\n",
            nat_line(42, "snat_exhausted"),
            nat_line(42, "snat_exhausted")
        );
        let ok = check_nat(&good, &client, Some(5), Some(7)).unwrap();
        assert!(ok.starts_with("2 nf_nat drops = insert_failed +2"), "{ok}");
        // One line short of the kernel's count.
        let err = check_nat(&good, &client, Some(5), Some(8)).unwrap_err();
        assert!(
            err.contains("2 nf_nat failure lines, the router's insert_failed rose by 3"),
            "{err}"
        );
        // Another pid, and nothing dropped at all.
        let other = format!(
            "{}\n{}\n{sum}\n",
            nat_line(41, "snat_exhausted"),
            nat_line(42, "snat_exhausted")
        );
        assert!(
            check_nat(&other, &client, Some(5), Some(7))
                .unwrap_err()
                .contains("pid 41")
        );
        assert!(
            check_nat(&good, &client, Some(5), Some(5))
                .unwrap_err()
                .contains("dropped nothing")
        );
        let few = serde_json::json!({"pid": 42, "ok": 9, "failed": 4});
        assert!(check_nat(&good, &few, Some(5), Some(7)).is_err());
        // The firewall control: nothing reported, nothing inserted-failed.
        let refused = serde_json::json!({"pid": 43, "ok": 0, "failed": 2});
        let quiet = r#"{"type":"summary"}"#;
        assert!(check_nat_control(quiet, &refused, Some(1), Some(1)).is_ok());
        assert!(
            check_nat_control(&good, &refused, Some(1), Some(1))
                .unwrap_err()
                .contains("2 nf_nat")
        );
        assert!(check_nat_control(quiet, &refused, Some(1), Some(2)).is_err());
        assert!(check_nat_control(quiet, &client, Some(1), Some(1)).is_err());
    }

    #[test]
    fn damaged_base64_is_noticed() {
        let s = "@@PXH-FILE name=x@@\nYWJj\n[ 1.0] oops\n@@PXH-EOF name=x@@\n";
        let r = parse(s);
        assert!(!r.files.contains_key("x"));
        assert_eq!(r.damaged, vec!["x".to_string()]);
    }
}
