//! `portexhaust top`: a live, refreshing view of port pressure: destinations by utilisation,
//! the failing processes, and the holders (alive or exited), or NDJSON snapshots with --json.
use std::{
    io::{IsTerminal, Write},
    path::PathBuf,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use comfy_table::{Cell, CellAlignment, Table, presets::NOTHING};
use crossterm::{
    cursor,
    event::{self, Event, KeyCode, KeyModifiers},
    execute, terminal,
};
use serde::Serialize;

use crate::{
    clock::{hms, rfc3339},
    error::{Error, Result},
    kernel::loader::{BackendRequest, Filters, Tracer, Tracking},
    trace::announce,
    view::{Collector, Scope, View, top_holders},
};

#[derive(Clone, Debug)]
pub struct TopOptions {
    pub interval: Duration,
    pub json: bool,
    /// Snapshots to print before exiting (None: until stopped; --json defaults to 1).
    pub count: Option<u64>,
    pub netns: Vec<(u64, PathBuf)>,
    pub backend: BackendRequest,
    pub max_tracked: u32,
}

fn fmt_opt(v: Option<f64>, unit: &str) -> String {
    match v {
        Some(x) if x.is_finite() => format!("{x:.1}{unit}"),
        _ => "-".into(),
    }
}

fn fmt_forecast(s: Option<f64>) -> String {
    match s {
        Some(x) if x <= 0.0 => "FULL".into(),
        Some(x) if x < 120.0 => format!("{x:.0}s"),
        Some(x) if x < 7200.0 => format!("{:.0}m", x / 60.0),
        Some(x) => format!("{:.0}h", x / 3600.0),
        None => "-".into(),
    }
}

fn table(header: &[&str]) -> Table {
    let mut t = Table::new();
    t.load_preset(NOTHING);
    t.set_header(header.to_vec());
    t
}

fn push_table(out: &mut String, t: &Table) {
    for line in t.to_string().lines() {
        out.push_str(line.trim_end());
        out.push('\n');
    }
}

/// The screen, as text. Pure, for tests. `rows` limits each panel.
pub fn render(v: &View, rows: usize) -> String {
    let mut out = format!(
        "portexhaust top  {}  backend {}  failures {}  tracked sockets {}  LRU evictions {}\n",
        hms(v.ts_unix_ns),
        v.backend,
        v.failures_total,
        v.tracked_sockets,
        v.lru_evictions
    );
    out.push_str("\nDESTINATIONS by pressure\n");
    if v.destinations.is_empty() {
        out.push_str("  no outgoing TCP connection uses an ephemeral port\n");
    } else {
        let mut t = table(&[
            "NETNS",
            "SOURCE",
            "DESTINATION",
            "IN USE",
            "UTIL",
            "ESTAB",
            "TIME_WAIT",
            "NEW/S",
            "TW EXP/S",
            "FULL IN",
            "CONNECT p50/p99",
        ]);
        for d in v.destinations.iter().take(rows) {
            let lat = d
                .latency_us
                .map(|l| format!("{:.0}us/{:.0}us", l.p50, l.p99))
                .unwrap_or_else(|| "-".into());
            t.add_row(vec![
                Cell::new(d.netns),
                Cell::new(&d.src),
                Cell::new(&d.dst),
                Cell::new(format!("{}/{}", d.in_use, d.range_size))
                    .set_alignment(CellAlignment::Right),
                Cell::new(format!("{:.0}%", d.utilisation * 100.0))
                    .set_alignment(CellAlignment::Right),
                Cell::new(d.by_state.get("ESTABLISHED").copied().unwrap_or(0))
                    .set_alignment(CellAlignment::Right),
                Cell::new(d.by_state.get("TIME_WAIT").copied().unwrap_or(0))
                    .set_alignment(CellAlignment::Right),
                Cell::new(fmt_opt(d.new_per_s, "")).set_alignment(CellAlignment::Right),
                Cell::new(format!("{:.1}", d.tw_expiring_per_s))
                    .set_alignment(CellAlignment::Right),
                Cell::new(fmt_forecast(d.forecast_s)).set_alignment(CellAlignment::Right),
                Cell::new(lat).set_alignment(CellAlignment::Right),
            ]);
        }
        push_table(&mut out, &t);
        if v.destinations.len() > rows {
            out.push_str(&format!("  (+{} more)\n", v.destinations.len() - rows));
        }
    }
    out.push_str("\nFAILING PROCESSES\n");
    if v.failing.is_empty() {
        out.push_str("  none since start\n");
    } else {
        let mut t = table(&["PID", "COMM", "FAILURES", "RATE/S", "TOP DESTINATION"]);
        for f in v.failing.iter().take(rows) {
            t.add_row(vec![
                Cell::new(f.pid).set_alignment(CellAlignment::Right),
                Cell::new(&f.comm),
                Cell::new(f.failures).set_alignment(CellAlignment::Right),
                Cell::new(format!("{:.1}", f.rate)).set_alignment(CellAlignment::Right),
                Cell::new(&f.top_dst),
            ]);
        }
        push_table(&mut out, &t);
    }
    out.push_str("\nHOLDERS (who created the sockets that use ports)\n");
    let holders = top_holders(&v.destinations);
    if holders.is_empty() {
        out.push_str("  none\n");
    } else {
        let mut t = table(&["PID", "COMM", "STATE", "SOCKETS", "TIME_WAIT", "SHARE"]);
        for h in holders.iter().take(rows) {
            t.add_row(vec![
                Cell::new(h.pid.map(|p| p.to_string()).unwrap_or_else(|| "-".into()))
                    .set_alignment(CellAlignment::Right),
                Cell::new(h.label()),
                Cell::new(match (h.pid, h.alive) {
                    (None, _) => "before tracing",
                    (Some(_), true) => "alive",
                    (Some(_), false) => "exited",
                }),
                Cell::new(h.sockets).set_alignment(CellAlignment::Right),
                Cell::new(h.time_wait).set_alignment(CellAlignment::Right),
                Cell::new(format!("{:.0}%", h.share * 100.0)).set_alignment(CellAlignment::Right),
            ]);
        }
        push_table(&mut out, &t);
    }
    out
}

#[derive(Serialize)]
struct JsonTop<'a> {
    #[serde(rename = "type")]
    kind: &'static str,
    ts: String,
    #[serde(flatten)]
    view: &'a View,
}

pub fn json(v: &View) -> String {
    serde_json::to_string(&JsonTop {
        kind: "top",
        ts: rfc3339(v.ts_unix_ns),
        view: v,
    })
    .unwrap_or_default()
}

/// Restores the terminal however `top` ends.
struct Screen;
impl Screen {
    fn enter() -> std::io::Result<Self> {
        terminal::enable_raw_mode()?;
        execute!(
            std::io::stdout(),
            terminal::EnterAlternateScreen,
            cursor::Hide
        )?;
        Ok(Self)
    }
}
impl Drop for Screen {
    fn drop(&mut self) {
        let _ = execute!(
            std::io::stdout(),
            cursor::Show,
            terminal::LeaveAlternateScreen
        );
        let _ = terminal::disable_raw_mode();
    }
}

/// Wait up to `d` for a quit key; true if the user asked to quit.
fn wait_for_quit(d: Duration) -> std::io::Result<bool> {
    let until = Instant::now() + d;
    while let Some(left) = until.checked_duration_since(Instant::now()) {
        if !event::poll(left)? {
            break;
        }
        if let Event::Key(k) = event::read()? {
            let ctrl_c =
                k.code == KeyCode::Char('c') && k.modifiers.contains(KeyModifiers::CONTROL);
            if ctrl_c || matches!(k.code, KeyCode::Char('q') | KeyCode::Esc) {
                return Ok(true);
            }
        }
    }
    Ok(false)
}

pub fn run(o: TopOptions) -> Result<()> {
    let opened = Tracer::open_with(
        o.backend,
        &Filters::default(),
        Tracking {
            catch: 0,
            // top shows counts, not events: one event a second per CPU keeps the ring buffer
            // (which it drains unread) out of a storm's way.
            events_per_s: 1,
            max_tracked: o.max_tracked,
            blame: true,
        },
    )?;
    announce(&opened.tracer, &opened.skipped);
    let mut tracer = opened.tracer;
    let scope = if o.netns.is_empty() {
        Scope::All
    } else {
        Scope::Only(o.netns.clone())
    };
    let mut collector = Collector::new(scope);
    // top works from the exact in-kernel counts and shows no per-failure events (so no event
    // drops either); they are read off and discarded so the buffer does not sit full.
    let refresh = |tracer: &mut Tracer, collector: &mut Collector| {
        tracer.drain(|_| {});
        collector.collect(tracer)
    };
    let io = |e| Error::io("writing the screen", e);
    let stdout_tty = std::io::stdout().is_terminal();

    if o.json || !stdout_tty {
        // SIGINT/SIGTERM end the loop between snapshots, so the output stays whole.
        let stop = Arc::new(AtomicBool::new(false));
        for sig in [signal_hook::consts::SIGINT, signal_hook::consts::SIGTERM] {
            signal_hook::flag::register(sig, Arc::clone(&stop))
                .map_err(|e| Error::io("installing signal handlers", e))?;
        }
        let pause = |d: Duration| {
            let until = Instant::now() + d;
            while !stop.load(Ordering::Relaxed) && Instant::now() < until {
                std::thread::sleep(Duration::from_millis(20));
            }
            !stop.load(Ordering::Relaxed)
        };
        // A first sample starts the rate windows; the first snapshot follows one interval on.
        refresh(&mut tracer, &mut collector)?;
        eprintln!(
            "portexhaust: ready: sampling every {:.1}s",
            o.interval.as_secs_f64()
        );
        let count = o.count.unwrap_or(if o.json { 1 } else { u64::MAX });
        let mut out = std::io::stdout().lock();
        for i in 0..count {
            if !pause(o.interval) {
                break;
            }
            let v = refresh(&mut tracer, &mut collector)?;
            let text = if o.json {
                json(&v)
            } else {
                format!("{}{}", if i > 0 { "\n" } else { "" }, render(&v, 20))
            };
            if writeln!(out, "{text}").and_then(|_| out.flush()).is_err() {
                break; // reader went away
            }
        }
        return Ok(());
    }

    let _screen = Screen::enter().map_err(io)?;
    let mut shown = 0u64;
    loop {
        let v = refresh(&mut tracer, &mut collector)?;
        let (_, h) = terminal::size().unwrap_or((120, 40));
        let rows = usize::from(h.saturating_sub(16) / 3).max(3);
        let text = render(&v, rows);
        let mut so = std::io::stdout().lock();
        execute!(
            so,
            cursor::MoveTo(0, 0),
            terminal::Clear(terminal::ClearType::All)
        )
        .map_err(io)?;
        // Raw mode: lines need an explicit carriage return.
        for line in text.lines() {
            write!(so, "{line}\r\n").map_err(io)?;
        }
        write!(
            so,
            "\r\nq: quit   refresh every {:.1}s",
            o.interval.as_secs_f64()
        )
        .map_err(io)?;
        so.flush().map_err(io)?;
        drop(so);
        shown += 1;
        if o.count.is_some_and(|c| shown >= c) || wait_for_quit(o.interval).map_err(io)? {
            return Ok(());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{
        blame::{Attribution, Holder, Latency},
        view::{DestinationRow, FailingProcess},
    };

    fn view() -> View {
        let mut by_state = std::collections::BTreeMap::new();
        by_state.insert("TIME_WAIT", 9);
        by_state.insert("ESTABLISHED", 1);
        View {
            ts_unix_ns: 1_764_069_600_000_000_000,
            backend: "tracepoint",
            failures_total: 4,
            dropped_events: 0,
            lru_evictions: 0,
            tracked_sockets: 10,
            destinations: vec![DestinationRow {
                netns: 4026532177,
                src: "127.0.0.1".into(),
                dst: "127.0.0.1:5000".into(),
                proto: "tcp",
                range_size: 10,
                in_use: 10,
                by_state,
                utilisation: 1.0,
                new_per_s: Some(5.0),
                tw_expiring_per_s: 0.0,
                forecast_s: Some(0.0),
                latency_us: Some(Latency {
                    count: 10,
                    p50: 8.192,
                    p90: 16.384,
                    p99: 65.536,
                }),
                holders: vec![Holder {
                    pid: Some(77),
                    comm: "churner".into(),
                    alive: false,
                    sockets: 9,
                    time_wait: 9,
                    share: 0.9,
                    attribution: Attribution::Traced,
                    container: None,
                    cgroup_id: 0,
                }],
            }],
            failing: vec![FailingProcess {
                pid: 88,
                comm: "failer".into(),
                failures: 4,
                rate: 2.0,
                top_dst: "127.0.0.1:5000".into(),
            }],
            blame: vec![],
        }
    }

    #[test]
    fn screen_shows_the_three_panels() {
        let s = render(&view(), 10);
        assert!(s.contains("DESTINATIONS by pressure"));
        assert!(s.contains("127.0.0.1:5000"));
        assert!(s.contains("10/10"));
        assert!(s.contains("100%"));
        assert!(s.contains("FULL"));
        assert!(s.contains("8us/66us"));
        assert!(s.contains("failer"));
        assert!(s.contains("churner") && s.contains("exited"));
    }

    #[test]
    fn json_snapshot_is_one_object_with_destinations() {
        let v: serde_json::Value = serde_json::from_str(&json(&view())).expect("json");
        assert_eq!(v["type"], "top");
        let d = &v["destinations"][0];
        for key in [
            "netns",
            "src",
            "dst",
            "proto",
            "range_size",
            "in_use",
            "by_state",
            "utilisation",
            "new_per_s",
            "tw_expiring_per_s",
            "forecast_s",
            "latency_us",
            "holders",
        ] {
            assert!(d.get(key).is_some(), "{key}");
        }
        assert_eq!(d["by_state"]["TIME_WAIT"], 9);
        assert_eq!(d["holders"][0]["pid"], 77);
        assert_eq!(v["failing"][0]["pid"], 88);
    }

    #[test]
    fn forecasts_read_well() {
        assert_eq!(fmt_forecast(Some(0.0)), "FULL");
        assert_eq!(fmt_forecast(Some(42.4)), "42s");
        assert_eq!(fmt_forecast(Some(600.0)), "10m");
        assert_eq!(fmt_forecast(Some(36000.0)), "10h");
        assert_eq!(fmt_forecast(None), "-");
    }
}
