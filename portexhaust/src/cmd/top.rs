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

use portexhaust_common::KIND_NAT;

use crate::{
    cmd::trace::{
        announce,
        nat::{self, NatWatch},
    },
    engine::live::Viewer,
    kernel::{
        Error, Result,
        clock::Clock,
        container::Resolver,
        gather::{Gatherer, Scope},
        loader::{BackendRequest, Filters, Tracer, Tracking},
    },
    output::{stdout::Out, top::render},
    schema::TopView,
};
use crossterm::{
    cursor,
    event::{self, Event, KeyCode, KeyModifiers},
    execute, terminal,
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
    /// `--catch` kinds (`KIND_*`): with nat, a row per NAT destination.
    pub catch: u32,
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
            catch: o.catch,
            // top shows counts, not events: one event a second per CPU keeps the ring buffer
            // (which it drains unread) out of a storm's way. The NAT rows name their failers
            // from the streamed drops (the kernel counts them all): a few dozen a second is
            // still nothing to the ring buffer.
            events_per_s: if o.catch & KIND_NAT != 0 { 50 } else { 1 },
            max_tracked: o.max_tracked,
            blame: true,
            ..Default::default()
        },
    )?;
    announce(&opened.tracer, &opened.skipped);
    let mut tracer = opened.tracer;
    let scope = if o.netns.is_empty() {
        Scope::All
    } else {
        Scope::Only(o.netns.clone())
    };
    let mut gatherer = Gatherer::new(scope);
    let mut viewer = Viewer::new();
    // The NAT section of the summary, from the same watch (`--catch nat`).
    let mut nat_watch = tracer.watches_nat().then(NatWatch::start);
    let clock = Clock::new();
    let containers = Resolver::new();
    let started = Instant::now();
    // top works from the exact in-kernel counts and shows no per-failure events (so no event
    // drops either); they are read off and discarded so the buffer does not sit full.
    let mut refresh = |tracer: &mut Tracer| -> Result<TopView> {
        // Call-site announcements are kept: their stacks are symbolised at this refresh.
        let mut announced = Vec::new();
        let mut nat_events = Vec::new();
        tracer.drain(|b| {
            if let Some(s) = crate::schema::event::site_event(b) {
                announced.push((s.pid, s.stack_id));
            } else if let Some(n) = nat::nat_event(b) {
                nat_events.push(n);
            }
        });
        if let Some(w) = nat_watch.as_mut() {
            // Named for the rows' failers; top shows no failure lines.
            w.named(
                nat::decode(&nat_events, |ns| clock.ts(ns)),
                tracer.backend,
                &containers,
            );
        }
        for (pid, stack_id) in announced {
            gatherer.learn_stack(tracer, pid, stack_id);
        }
        tracer.drain_log();
        let obs = gatherer.observe(tracer, true)?;
        let t = started.elapsed().as_secs_f64();
        let mut v = viewer.view(t, &obs);
        gatherer.label(&mut v.blame, &mut v.destinations);
        if let Some(w) = nat_watch.as_mut() {
            viewer.with_nat(t, &mut v, w.entries(tracer, &containers)?);
        }
        Ok(v)
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
        refresh(&mut tracer)?;
        eprintln!(
            "portexhaust: ready: sampling every {:.1}s",
            o.interval.as_secs_f64()
        );
        let count = o.count.unwrap_or(if o.json { 1 } else { u64::MAX });
        let mut out = Out::new(std::io::stdout().lock());
        for i in 0..count {
            if !pause(o.interval) {
                break;
            }
            let v = refresh(&mut tracer)?;
            let text = if o.json {
                v.line()
            } else {
                format!("{}{}", if i > 0 { "\n" } else { "" }, render(&v, 20))
            };
            out.try_bytes(text.as_bytes())
                .and_then(|()| out.try_bytes(b"\n"))
                .and_then(|()| out.try_flush())
                .map_err(|e| Error::io("writing to stdout", e))?;
            if out.closed {
                break; // the reader went away: a normal end
            }
        }
        return Ok(());
    }

    let _screen = Screen::enter().map_err(io)?;
    let mut shown = 0u64;
    loop {
        let v = refresh(&mut tracer)?;
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
