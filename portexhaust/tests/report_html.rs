//! `report` through the binary: the HTML report of a real incident in headless Chromium (root,
//! `cargo xtask test`), and bad input, one clear line per problem and never a panic (no
//! privileges).
mod common;

use std::{
    io::{Read, Write},
    os::{
        fd::{AsRawFd, FromRawFd, OwnedFd},
        unix::process::CommandExt,
    },
    path::{Path, PathBuf},
    process::{Command, Stdio},
    sync::mpsc,
    thread,
    time::{Duration, Instant},
};

use base64::Engine as _;
use common::{BIN, Guard, Tracer, Workload, report, require_root};
use serde_json::{Value, json};

// ---------------------------------------------------------------------------------------------
// The HTML report in headless Chromium, through the DevTools protocol over a pipe
// (--remote-debugging-pipe: NUL-separated JSON on fds 3 and 4; no port, no websocket).

struct Cdp {
    _guard: Guard,
    to: std::fs::File,
    rx: mpsc::Receiver<Value>,
    next_id: u64,
    events: Vec<Value>,
    _profile: tempfile::TempDir,
}

/// A pipe with both ends close-on-exec, moved above fd 10 so that dup2() onto 3 and 4 in the
/// child can never hit one of them.
fn high_pipe() -> (OwnedFd, OwnedFd) {
    let mut fds = [0i32; 2];
    // SAFETY: fds has room for two descriptors.
    assert_eq!(unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) }, 0);
    let high = |fd: i32| {
        // SAFETY: fd is valid; F_DUPFD_CLOEXEC returns a new descriptor >= 10.
        let h = unsafe { libc::fcntl(fd, libc::F_DUPFD_CLOEXEC, 10) };
        assert!(h >= 10);
        // SAFETY: closing the original, which we own.
        unsafe { libc::close(fd) };
        // SAFETY: h is a fresh descriptor we own.
        unsafe { OwnedFd::from_raw_fd(h) }
    };
    (high(fds[0]), high(fds[1]))
}

impl Cdp {
    fn launch() -> Self {
        let chromium = ["chromium", "chromium-browser", "google-chrome"]
            .into_iter()
            .find(|c| {
                Command::new(c)
                    .arg("--version")
                    .output()
                    .is_ok_and(|o| o.status.success())
            })
            .expect("Chromium is missing: `cargo xtask setup --tests` installs Debian's chromium");
        let profile = tempfile::tempdir().expect("profile dir");
        let (to_r, to_w) = high_pipe();
        let (from_r, from_w) = high_pipe();
        let (r3, w4) = (to_r.as_raw_fd(), from_w.as_raw_fd());
        let mut cmd = Command::new(chromium);
        cmd.args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--disable-dev-shm-usage",
            "--remote-debugging-pipe",
            "about:blank",
        ])
        .arg(format!("--user-data-dir={}", profile.path().display()))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null());
        // SAFETY: only async-signal-safe dup2 calls between fork and exec.
        unsafe {
            cmd.pre_exec(move || {
                if libc::dup2(r3, 3) < 0 || libc::dup2(w4, 4) < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let child = cmd.spawn().expect("start chromium");
        drop(to_r);
        drop(from_w);
        let (tx, rx) = mpsc::channel();
        let mut from = std::fs::File::from(from_r);
        thread::spawn(move || {
            let mut buf = Vec::new();
            let mut chunk = [0u8; 65536];
            while let Ok(n) = from.read(&mut chunk) {
                if n == 0 {
                    break;
                }
                buf.extend_from_slice(&chunk[..n]);
                while let Some(i) = buf.iter().position(|&b| b == 0) {
                    let msg: Vec<u8> = buf.drain(..=i).collect();
                    if let Ok(v) = serde_json::from_slice::<Value>(&msg[..msg.len() - 1])
                        && tx.send(v).is_err()
                    {
                        return;
                    }
                }
            }
        });
        Self {
            _guard: Guard(child),
            to: std::fs::File::from(to_w),
            rx,
            next_id: 1,
            events: Vec::new(),
            _profile: profile,
        }
    }

    fn call(&mut self, session: Option<&str>, method: &str, params: Value) -> Value {
        let id = self.next_id;
        self.next_id += 1;
        let mut msg = json!({"id": id, "method": method, "params": params});
        if let Some(s) = session {
            msg["sessionId"] = s.into();
        }
        let mut bytes = msg.to_string().into_bytes();
        bytes.push(0);
        self.to.write_all(&bytes).expect("write to chromium");
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let v = self
                .rx
                .recv_timeout(left)
                .unwrap_or_else(|_| panic!("no answer from chromium to {method}"));
            if v["id"] == id {
                assert!(v.get("error").is_none(), "{method}: {v}");
                return v["result"].clone();
            }
            self.events.push(v);
        }
    }

    fn wait_event(&mut self, method: &str, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        if self.events.iter().any(|e| e["method"] == method) {
            return;
        }
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let v = self
                .rx
                .recv_timeout(left)
                .unwrap_or_else(|_| panic!("no {method} from chromium"));
            let hit = v["method"] == method;
            self.events.push(v);
            if hit {
                return;
            }
        }
    }

    /// A fresh tab with console, log, page and network events on.
    fn tab(&mut self) -> String {
        let t = self.call(None, "Target.createTarget", json!({"url": "about:blank"}));
        let target = t["targetId"].as_str().expect("target").to_string();
        let s = self.call(
            None,
            "Target.attachToTarget",
            json!({"targetId": target, "flatten": true}),
        );
        let session = s["sessionId"].as_str().expect("session").to_string();
        for m in [
            "Runtime.enable",
            "Log.enable",
            "Page.enable",
            "Network.enable",
        ] {
            self.call(Some(&session), m, json!({}));
        }
        session
    }

    fn open(&mut self, session: &str, url: &str) {
        self.events.clear();
        self.call(Some(session), "Page.navigate", json!({"url": url}));
        self.wait_event("Page.loadEventFired", Duration::from_secs(30));
        // Let late console messages arrive.
        thread::sleep(Duration::from_millis(300));
        while let Ok(v) = self.rx.try_recv() {
            self.events.push(v);
        }
    }

    /// Console errors, uncaught exceptions and error log entries seen since `open`.
    fn errors(&self) -> Vec<String> {
        self.events
            .iter()
            .filter_map(|e| match e["method"].as_str()? {
                "Runtime.consoleAPICalled"
                    if matches!(e["params"]["type"].as_str(), Some("error" | "assert")) =>
                {
                    Some(format!("console: {}", e["params"]["args"]))
                }
                "Runtime.exceptionThrown" => {
                    Some(format!("exception: {}", e["params"]["exceptionDetails"]))
                }
                "Log.entryAdded" if e["params"]["entry"]["level"] == "error" => {
                    Some(format!("log: {}", e["params"]["entry"]["text"]))
                }
                _ => None,
            })
            .collect()
    }

    /// Requests for anything but the page itself and inline data.
    fn network(&self) -> Vec<String> {
        self.events
            .iter()
            .filter(|e| e["method"] == "Network.requestWillBeSent")
            .filter_map(|e| e["params"]["request"]["url"].as_str())
            .filter(|u| !u.starts_with("file:") && !u.starts_with("data:"))
            .map(str::to_string)
            .collect()
    }

    fn eval(&mut self, session: &str, expr: &str) -> Value {
        let r = self.call(
            Some(session),
            "Runtime.evaluate",
            json!({"expression": expr, "returnByValue": true}),
        );
        r["result"]["value"].clone()
    }
}

/// A real incident, recorded and stopped cleanly, as an HTML report.
fn html_report(dir: &Path) -> PathBuf {
    let rec = dir.join("incident.ndjson");
    let rec_s = rec.display().to_string();
    let t = Tracer::trace(&["--record", &rec_s, "--comm", "pxh-f-html"]);
    let n = Workload::run("timewait", 400, "pxh-f-html", &["--ports", "12"]);
    assert_eq!(n, 400);
    let (_, err, code) = t.signal(libc::SIGTERM);
    assert_eq!(code, 0, "{err}");
    let html = dir.join("incident.html");
    let (_, err, code) = report(&[
        &rec_s,
        "--format",
        "html",
        "-o",
        &html.display().to_string(),
    ]);
    assert_eq!(code, 0, "{err}");
    html
}

#[test]
#[ignore = "needs root: run with cargo xtask test"]
fn html_report_renders_in_headless_chromium_without_errors() {
    require_root();
    let dir = tempfile::tempdir().expect("tmp");
    let html = html_report(dir.path());
    let page = std::fs::read_to_string(&html).expect("html");
    assert!(page.contains("pxh-f-html"));

    let mut cdp = Cdp::launch();
    let tab = cdp.tab();
    // The detector itself must work, or "no errors" would prove nothing.
    cdp.open(
        &tab,
        "data:text/html,<script>console.error('probe')</script><p>probe</p>",
    );
    assert!(
        cdp.errors().iter().any(|e| e.contains("probe")),
        "the console-error detector saw nothing: {:?}",
        cdp.events
    );

    let url = format!("file://{}", html.display());
    cdp.open(&tab, &url);
    assert_eq!(cdp.errors(), Vec::<String>::new(), "console errors");
    assert_eq!(
        cdp.network(),
        Vec::<String>::new(),
        "the page must need no network"
    );
    let facts = cdp.eval(
        &tab,
        "(() => { const svg = document.querySelector('#timeline-chart');
            const r = svg ? svg.getBoundingClientRect() : {width: 0, height: 0};
            const bars = [...document.querySelectorAll('#timeline-chart rect.bar')];
            return {title: document.title, w: r.width, h: r.height, bars: bars.length,
              tallest: Math.max(0, ...bars.map(b => b.getBoundingClientRect().height)),
              offenders: [...document.querySelectorAll('table td')].some(td => td.textContent === 'pxh-f-html'),
              findings: document.querySelectorAll('.finding').length,
              height: document.documentElement.scrollHeight}; })()",
    );
    assert!(
        facts["title"]
            .as_str()
            .is_some_and(|t| t.starts_with("portexhaust report")),
        "{facts}"
    );
    assert!(
        facts["w"].as_f64().is_some_and(|w| w > 300.0),
        "chart laid out: {facts}"
    );
    assert!(facts["bars"].as_u64().is_some_and(|b| b >= 1), "{facts}");
    assert!(
        facts["tallest"].as_f64().is_some_and(|h| h > 10.0),
        "{facts}"
    );
    assert_eq!(facts["offenders"], true, "{facts}");
    assert!(
        facts["findings"].as_u64().is_some_and(|f| f >= 2),
        "{facts}"
    );

    // A full-page screenshot, kept next to the test binaries for people to look at.
    let height = facts["height"].as_u64().unwrap_or(1200).clamp(600, 8000);
    cdp.call(
        Some(&tab),
        "Emulation.setDeviceMetricsOverride",
        json!({"width": 1280, "height": height, "deviceScaleFactor": 1, "mobile": false}),
    );
    let shot = cdp.call(
        Some(&tab),
        "Page.captureScreenshot",
        json!({"format": "png"}),
    );
    let png = base64::engine::general_purpose::STANDARD
        .decode(shot["data"].as_str().expect("png data"))
        .expect("base64");
    assert!(
        png.starts_with(b"\x89PNG\r\n\x1a\n") && png.len() > 20_000,
        "{} bytes",
        png.len()
    );
    let out = Path::new(env!("CARGO_TARGET_TMPDIR")).join("report-screenshot.png");
    std::fs::write(&out, &png).expect("write screenshot");
    eprintln!("screenshot: {}", out.display());
}

// ---------------------------------------------------------------------------------------------
// Bad input to `report`, through the binary: one clear line per problem, never a panic.

fn files(dir: &Path, list: &[(&str, &[u8])]) -> Vec<String> {
    list.iter()
        .map(|(name, data)| {
            let p = dir.join(name);
            std::fs::write(&p, data).expect("write");
            p.display().to_string()
        })
        .collect()
}

#[test]
fn report_refuses_unusable_files_with_one_line_each() {
    let dir = tempfile::tempdir().expect("tmp");
    let paths = files(
        dir.path(),
        &[
            ("empty.ndjson", b""),
            ("binary.ndjson", b"\x7fELF\x02\x01\x01\x00"),
            ("v7.ndjson", b"{\"type\":\"header\",\"version\":7}\n"),
        ],
    );
    let missing = dir.path().join("missing.ndjson").display().to_string();
    for (path, want) in [
        (&paths[0], "is empty"),
        (&paths[1], "binary data"),
        (&paths[2], ":1: record version 7 is not supported"),
        (&missing, "cannot open: No such file or directory"),
    ] {
        let (out, err, code) = report(&[path]);
        assert_eq!(code, 1, "{path}: {err}");
        assert!(out.is_empty(), "{path}: nothing on stdout");
        assert_eq!(err.trim().lines().count(), 1, "{path}: one line: {err}");
        assert!(
            err.contains(path.as_str()) && err.contains(want),
            "{path}: {err}"
        );
        assert!(!err.contains("panicked"), "{err}");
    }
    let (_, err, code) = report(&[
        &paths[0],
        "--since",
        "2026-01-02T00:00:00Z",
        "--until",
        "2026-01-01T00:00:00Z",
    ]);
    assert_eq!(code, 1);
    assert!(err.contains("--since is later than --until"), "{err}");
}

#[test]
fn report_reports_what_it_can_and_names_each_bad_line() {
    let dir = tempfile::tempdir().expect("tmp");
    let header =
        r#"{"type":"header","version":1,"host":"h","start_ts":"2026-11-25T11:20:00Z","pid":1}"#;
    let fail = |t: &str| {
        format!(
            r#"{{"type":"failure","ts":"2026-11-25T11:20:0{t}Z","pid":5,"comm":"app","family":"ipv4","proto":"tcp","dst":"10.0.0.1:80","errno":99,"site":"__inet_hash_connect","backend":"tracepoint"}}"#
        )
    };
    let good = format!(
        "{header}\n{}\n{{oops\n{}\n{}",
        fail("1"),
        fail("2"),
        &fail("3")[..30]
    );
    let paths = files(dir.path(), &[("good.ndjson", good.as_bytes())]);
    let missing = dir.path().join("gone.ndjson").display().to_string();
    let out_html = dir.path().join("r.html");
    let (out, err, code) = report(&[
        &paths[0],
        &missing,
        "--format",
        "html",
        "-o",
        &out_html.display().to_string(),
    ]);
    assert_eq!(
        code, 2,
        "a file was unusable but a report was written: {err}"
    );
    assert!(out.is_empty());
    assert!(
        err.contains(&format!("{}:3: not valid JSON", paths[0])),
        "{err}"
    );
    assert!(
        err.contains(&format!("{}:5: the last line is cut off", paths[0])),
        "{err}"
    );
    assert!(err.contains(&format!("{missing}: cannot open")), "{err}");
    let html = std::fs::read_to_string(&out_html).expect("html written");
    assert!(html.contains("<svg id=\"timeline-chart\""));
    let (text, _, code) = report(&[&paths[0]]);
    assert_eq!(code, 0);
    assert!(text.contains("2 exhaustion failures"), "{text}");
    // `-` reads standard input.
    let piped = Command::new(BIN)
        .args(["report", "-", "--format", "json"])
        .stdin(std::fs::File::open(&paths[0]).expect("open"))
        .output()
        .expect("report -");
    assert!(piped.status.success());
    let v: Value = serde_json::from_slice(&piped.stdout).expect("json");
    assert_eq!(v["failures_total"], 2);
    assert!(String::from_utf8_lossy(&piped.stderr).contains("<stdin>:3: not valid JSON"));
}
