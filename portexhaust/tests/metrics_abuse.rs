//! The metrics endpoint under abuse, for real: while a scrape loop runs against
//! `trace --metrics-addr`, the test holds 500 idle connections, 50 slowloris clients that send
//! one header byte a second, and a stream of garbage requests. Every scrape must answer in
//! under a second, the tracer's memory must stay bounded, and it must not crash. Root (the
//! tracer loads its programs); `cargo xtask test` runs it. It panics rather than skips.
mod common;

use std::{
    io::{Read, Write},
    net::{SocketAddr, TcpListener, TcpStream},
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    thread,
    time::{Duration, Instant},
};

use common::{Tracer, require_root};

const IDLE: usize = 500;
const SLOWLORIS: usize = 50;
const SCRAPES: usize = 30;

fn free_port() -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").expect("bind");
    l.local_addr().expect("addr")
}

/// One scrape on a fresh connection: (status line, body bytes, how long it took).
fn scrape(addr: SocketAddr) -> (String, usize, Duration) {
    let t0 = Instant::now();
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(5)).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(5)))
        .expect("timeout");
    s.write_all(b"GET /metrics HTTP/1.1\r\nHost: test\r\nConnection: close\r\n\r\n")
        .expect("request");
    let mut out = Vec::new();
    let _ = s.read_to_end(&mut out);
    let text = String::from_utf8_lossy(&out);
    let status = text.lines().next().unwrap_or_default().to_string();
    (status, out.len(), t0.elapsed())
}

fn rss_kib(pid: u32) -> u64 {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    s.lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or(0)
}

#[test]
#[ignore = "needs root: run with cargo xtask test"]
fn scrapes_answer_under_a_second_while_the_endpoint_is_abused() {
    require_root();
    let addr = free_port();
    let a = addr.to_string();
    let t = Tracer::trace(&["--metrics-addr", &a, "--events-per-s", "10"]);
    let pid = t.pid();
    let (status, len, _) = scrape(addr);
    assert!(status.contains("200"), "first scrape: {status}");
    assert!(len > 100, "a real scrape body");
    let rss_before = rss_kib(pid);

    let stop = Arc::new(AtomicBool::new(false));
    // 500 idle connections: connected, never a byte.
    let idle: Vec<TcpStream> = (0..IDLE)
        .filter_map(|_| TcpStream::connect(addr).ok())
        .collect();
    assert!(idle.len() >= IDLE * 9 / 10, "opened {} idle", idle.len());
    // 50 slowloris clients: one header byte a second, reconnecting when cut off.
    let mut workers = Vec::new();
    for _ in 0..SLOWLORIS {
        let stop = stop.clone();
        workers.push(thread::spawn(move || {
            let req = b"GET /metrics HTTP/1.1\r\nHost: slow\r\nX-Slow: aaaaaaaaaaaaaaaaaaaa\r\n";
            while !stop.load(Ordering::Relaxed) {
                let Ok(mut s) = TcpStream::connect(addr) else {
                    thread::sleep(Duration::from_millis(100));
                    continue;
                };
                for b in req.iter().cycle() {
                    if stop.load(Ordering::Relaxed) || s.write_all(&[*b]).is_err() {
                        break;
                    }
                    thread::sleep(Duration::from_secs(1));
                }
            }
        }));
    }
    // Garbage: binary noise, a request line of 1 MiB, bad methods, a body to a GET.
    {
        let stop = stop.clone();
        workers.push(thread::spawn(move || {
            let huge = format!("GET /{} HTTP/1.1\r\n\r\n", "x".repeat(1 << 20));
            let junk: [&[u8]; 4] = [
                b"\x00\xff\x13\x37garbage\r\n\r\n",
                huge.as_bytes(),
                b"BREW /metrics HTCPCP/1.0\r\n\r\n",
                b"GET /metrics HTTP/1.1\r\nContent-Length: 99999999\r\n\r\nxxxx",
            ];
            let mut i = 0;
            while !stop.load(Ordering::Relaxed) {
                if let Ok(mut s) = TcpStream::connect(addr) {
                    let _ = s.set_read_timeout(Some(Duration::from_millis(200)));
                    let _ = s.write_all(junk[i % junk.len()]);
                    let mut buf = [0u8; 512];
                    let _ = s.read(&mut buf);
                }
                i += 1;
                thread::sleep(Duration::from_millis(20));
            }
        }));
    }

    let mut worst = Duration::ZERO;
    let mut peak_rss = rss_before;
    for i in 0..SCRAPES {
        let (status, len, took) = scrape(addr);
        assert!(
            status.contains("200") && len > 100,
            "scrape {i} under abuse: {status:?} ({len} bytes after {took:?})"
        );
        assert!(took < Duration::from_secs(1), "scrape {i} took {took:?}");
        worst = worst.max(took);
        peak_rss = peak_rss.max(rss_kib(pid));
        thread::sleep(Duration::from_millis(300));
    }
    stop.store(true, Ordering::Relaxed);
    drop(idle);
    for w in workers {
        let _ = w.join();
    }
    eprintln!("worst scrape {worst:?}; tracer RSS {rss_before} KiB before, {peak_rss} KiB at most");
    // The connection cap bounds the server: a few MiB however the endpoint is used.
    assert!(
        peak_rss < rss_before + 32 * 1024,
        "RSS grew from {rss_before} KiB to {peak_rss} KiB"
    );
    let (status, _, _) = scrape(addr);
    assert!(status.contains("200"), "after the abuse: {status}");
    let (_, err, code) = t.stop();
    assert_eq!(code, 0, "the tracer survived and stopped cleanly: {err}");
}
