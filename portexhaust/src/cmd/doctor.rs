//! `portexhaust doctor`: audit the network namespace it runs in, now, and say what to fix.
//!
//! It reads the settings (`/proc/sys/net/ipv4`), the TIME_WAIT counters (`/proc/net/netstat`),
//! the sockets per destination (sock_diag, grouped as `trace` and `top` group them), and, as
//! root, looks for sockets bound before connect(). To audit another namespace (a container),
//! run it there: `nsenter --net=/proc/PID/ns/net portexhaust doctor`.
use std::time::{Duration, Instant};

use portexhaust_common::{Cause, EADDRNOTAVAIL, KIND_NAT, TcpState};

use crate::{
    advice::{Audit, BoundConnects, ConntrackCounters, Evidence, Inputs, Severity, audit, explain},
    cli::DoctorArgs,
    cmd::trace::nat::{self, NatWatch},
    engine::{
        census::{PortSpace, SockRow, busiest, destination_rows},
        whatif::with_what_if,
    },
    kernel::{
        Result, bindscan,
        clock::Clock,
        conntrack::stat_here,
        container::Resolver,
        gather::{Gatherer, Scope},
        loader::{BackendRequest, Filters, Tracer, Tracking},
        netns::{census_here, netns_path},
        procinfo::netns_of,
        sockdiag::dump_tcp_listeners,
        sysctl::{counters_current, host_and_kernel, read_current},
    },
    schema::{ByState, CallSite, NatEntry, Ts},
};

/// `--watch`: what the programs saw in this namespace meanwhile.
struct Watched {
    seconds: f64,
    evidence: Evidence,
    call_sites: Vec<CallSite>,
    /// The source NAT of this namespace, with the drops counted meanwhile (None: the NAT hook
    /// could not be attached here).
    nat: Option<Vec<NatEntry>>,
}

/// How often the NAT drops are read off while watching: their clients are looked up while
/// their SYNs are still being retried.
const NAT_DRAIN: Duration = Duration::from_millis(100);

/// Watch this namespace's connects for `d`: its failures (exact, by cause) and its call sites,
/// and the SYNs its source NAT drops (`--catch nat`, where the kernel allows it).
fn watch(netns: Option<u64>, d: Duration) -> Result<Watched> {
    let opened = Tracer::open_with(
        BackendRequest::Auto,
        &Filters::default(),
        Tracking {
            catch: KIND_NAT,
            ..Tracking::default()
        },
    )?;
    let mut tracer = opened.tracer;
    let mut nat_watch = tracer.watches_nat().then(NatWatch::start);
    eprintln!(
        "portexhaust: doctor: watching connects{} for {:.0}s with the {} backend",
        if nat_watch.is_some() {
            " and source-NAT drops"
        } else {
            ""
        },
        d.as_secs_f64(),
        tracer.backend.name()
    );
    let scope = match netns {
        Some(n) => Scope::Only(vec![(n, netns_path(std::process::id()))]),
        None => Scope::All,
    };
    let mut g = Gatherer::new(scope);
    let (clock, containers) = (Clock::new(), Resolver::new());
    let until = Instant::now() + d;
    while let Some(left) = until.checked_duration_since(Instant::now()) {
        std::thread::sleep(left.min(NAT_DRAIN));
        let (mut events, mut announced) = (Vec::new(), Vec::new());
        tracer.drain(|b| {
            if let Some(s) = crate::schema::event::site_event(b) {
                announced.push((s.pid, s.stack_id));
            } else if let Some(n) = nat::nat_event(b) {
                events.push(n);
            }
        });
        // Symbolised while the process lives, as top does.
        for (pid, stack_id) in announced {
            g.learn_stack(&tracer, pid, stack_id);
        }
        if let Some(w) = nat_watch.as_mut() {
            w.named(
                nat::decode(&events, |ns| clock.ts(ns)),
                tracer.backend,
                &containers,
            );
        }
    }
    let nat = match (nat_watch.as_mut(), netns) {
        (Some(w), Some(ns)) => Some(w.entries_in(ns, Some(&tracer), &containers)?),
        _ => None,
    };
    let obs = g.observe(&mut tracer, true)?;
    let here = |ns: Option<u64>| netns.is_none() || ns.is_none() || ns == netns;
    let call_sites: Vec<CallSite> = obs
        .call_sites()
        .into_iter()
        .filter(|c| here(c.netns))
        .collect();
    let mut evidence = Evidence {
        bound_connects: BoundConnects::of_sites(&call_sites),
        snat_drops: nat.iter().flatten().map(|e| e.drops).sum(),
        ..Default::default()
    };
    for (k, c) in &obs.counts {
        let ns = g.netns_of_pid.get(&k.pid).copied().or(c.netns);
        if !here(ns) || k.errno.0 != EADDRNOTAVAIL {
            continue;
        }
        match k.cause {
            Cause::TupleCollision => evidence.collisions += c.count,
            _ => evidence.connect_failures += c.count,
        }
    }
    Ok(Watched {
        seconds: d.as_secs_f64(),
        evidence,
        call_sites,
        nat,
    })
}

/// Destinations listed in the output.
const TOP_DESTINATIONS: usize = 20;

/// Sockets per TCP state, all addresses (for `tcp_max_tw_buckets`, which counts every
/// TIME_WAIT socket of the namespace).
fn state_totals<'a>(sockets: impl Iterator<Item = &'a SockRow>) -> ByState {
    let mut out = ByState::new();
    for s in sockets {
        *out.entry(s.state).or_default() += 1;
    }
    out
}

/// Audit the calling thread's network namespace (and, with `watch`, what its connects did
/// meanwhile).
pub fn gather_watching(watch_for: Option<Duration>) -> Result<Audit> {
    let netns = netns_of(std::process::id());
    let watched = match watch_for {
        Some(d) => Some(watch(netns, d)?),
        None => None,
    };
    Ok(audit_of(netns, watched))
}

/// Audit the calling thread's network namespace, now.
pub fn gather() -> Audit {
    audit_of(netns_of(std::process::id()), None)
}

/// The source NAT of this namespace: what was watched, or else its conntrack view alone;
/// the busiest destinations first (drops, then ports in use).
fn nat_of(netns: Option<u64>, watched: Option<&mut Watched>) -> Vec<NatEntry> {
    let mut entries = match (watched.and_then(|w| w.nat.take()), netns) {
        (Some(e), _) => e,
        (None, Some(ns)) => NatWatch::default()
            .entries_in(ns, None, &Resolver::new())
            .unwrap_or_else(|e| {
                log::info!("the source NAT not inspected: {e}");
                Vec::new()
            }),
        (None, None) => Vec::new(),
    };
    entries.sort_by(|a, b| {
        (b.drops, b.in_use.unwrap_or(0))
            .cmp(&(a.drops, a.in_use.unwrap_or(0)))
            .then(a.dst.cmp(&b.dst))
    });
    entries.truncate(TOP_DESTINATIONS);
    entries
}

fn audit_of(netns: Option<u64>, mut watched: Option<Watched>) -> Audit {
    let nat = nat_of(netns, watched.as_mut());
    // conntrack's counters of this namespace (the thread's: doctor runs where it audits).
    let conntrack = stat_here()
        .ok()
        .map(|(insert_failed, drop)| ConntrackCounters {
            insert_failed,
            drop,
        });
    let sysctls = read_current();
    let range = sysctls.range();
    let counters = counters_current();
    // The sock_diag census of this namespace, as trace and top take it; the listeners it leaves
    // out count in the per-state totals only.
    let census = census_here(netns.unwrap_or_default(), &sysctls);
    let (states, destinations) = match (census, dump_tcp_listeners()) {
        (Ok(census), Ok(listeners)) => {
            let states = state_totals(census.sockets.iter().chain(&listeners));
            let destinations = if netns.is_some() && range.is_some() {
                destination_rows(&[census])
            } else {
                Vec::new()
            };
            (states, destinations)
        }
        (Err(e), _) | (_, Err(e)) => {
            log::warn!("reading the socket tables: {e}");
            (ByState::new(), Vec::new())
        }
    };
    let bind_holders = match (netns, range) {
        (Some(ns), Some(r)) => match bindscan::scan(ns, &r) {
            Ok(h) => Some(h),
            Err(e) => {
                log::info!("bound sockets not inspected: {e}");
                None
            }
        },
        _ => None,
    };
    let findings = audit(&Inputs {
        sysctls: &sysctls,
        counters: counters.as_ref(),
        destinations: &destinations,
        time_wait_total: Some(states.get(&TcpState::TimeWait).copied().unwrap_or(0)),
        bind_holders: bind_holders.as_deref(),
        evidence: watched.as_ref().map(|w| &w.evidence),
        nat: &nat,
        conntrack: conntrack.map(|c| (c.insert_failed, c.drop)),
    });
    let (host, kernel) = host_and_kernel();
    let ports = PortSpace::from(&sysctls);
    Audit {
        kind: "doctor",
        ts: Ts::now(),
        host,
        kernel,
        netns,
        sysctls,
        range,
        counters,
        states,
        destinations: busiest(destinations, TOP_DESTINATIONS)
            .into_iter()
            .map(|r| with_what_if(r, &ports))
            .collect(),
        bind_holders,
        watched_s: watched.as_ref().map(|w| w.seconds),
        call_sites: watched.map(|w| w.call_sites).unwrap_or_default(),
        nat,
        conntrack,
        worst: findings
            .iter()
            .map(|f| f.severity)
            .max()
            .unwrap_or(Severity::Ok),
        findings,
    }
}

/// Run `doctor`: the output to print on stdout.
pub fn run(args: &DoctorArgs) -> Result<String> {
    if let Some(t) = args.explain {
        let text = explain::text(t);
        return Ok(if args.json {
            let topic = clap::ValueEnum::to_possible_value(&t)
                .map(|v| v.get_name().to_string())
                .unwrap_or_default();
            serde_json::json!({"type": "explain", "topic": topic, "text": text}).to_string()
        } else {
            text.to_string()
        });
    }
    let a = gather_watching(args.watch)?;
    Ok(if args.json {
        serde_json::to_string(&a).unwrap_or_default()
    } else {
        crate::output::doctor::render(&a)
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::advice::explain::Topic;

    #[test]
    fn live_audit_of_this_namespace_is_complete_json() {
        let a = gather();
        let v: serde_json::Value =
            serde_json::from_str(&serde_json::to_string(&a).expect("json")).expect("parse");
        assert_eq!(v["type"], "doctor");
        assert!(v["findings"].as_array().is_some_and(|f| !f.is_empty()));
        assert!(v["sysctls"]["ip_local_port_range"].is_array());
        let text = crate::output::doctor::render(&a);
        assert!(text.contains("portexhaust doctor: host"), "{text}");
    }

    #[test]
    fn explain_recycle_in_text_and_json() {
        let t = run(&DoctorArgs {
            json: false,
            explain: Some(Topic::TcpTwRecycle),
            watch: None,
            output: Default::default(),
        })
        .expect("explain");
        assert!(t.contains("4.12"));
        let j: serde_json::Value = serde_json::from_str(
            &run(&DoctorArgs {
                json: true,
                explain: Some(Topic::TcpTwRecycle),
                watch: None,
                output: Default::default(),
            })
            .expect("explain"),
        )
        .expect("json");
        assert_eq!(j["type"], "explain");
        assert_eq!(j["topic"], "tcp_tw_recycle");
        assert!(j["text"].as_str().is_some_and(|t| t.contains("NAT")));
    }
}
