//! What every run records: a run's metrics, and for a traced run the tracer's start-up, CPU,
//! memory and BPF maps, and the failures it reported.
use std::collections::BTreeMap;

use anyhow::Result;
use serde_json::Value;

use super::{
    procs::{Stopped, Tracer, TracerKind, parse_bpftrace_counts},
    results::Run,
    sys,
    variants::Variant,
};

impl Run {
    pub(super) fn new(scenario: &str, v: &Variant, rep: u32) -> Self {
        Self {
            scenario: scenario.into(),
            variant: v.name(),
            rep,
            metrics: BTreeMap::new(),
            notes: Vec::new(),
            detail: Value::Null,
        }
    }
    pub(super) fn set(&mut self, k: &str, v: f64) {
        self.metrics.insert(k.into(), v);
    }
}

/// What a tracer looked like at the end of the load, before it was stopped.
struct Sample {
    cpu_at_ready: Option<(f64, f64)>,
    memory: Option<sys::Memory>,
    bpf: sys::BpfObjects,
}

pub(super) const MIB: f64 = 1024.0;

/// Sample a tracer at the end of the load, stop it, and record what every traced run has:
/// start-up time, CPU while loaded, memory, BPF maps.
pub(super) fn finish_tracer(
    run: &mut Run,
    t: Tracer,
    cpu_at_ready: Option<(f64, f64)>,
) -> Result<(TracerKind, Stopped)> {
    let s = Sample {
        cpu_at_ready,
        memory: sys::memory(t.pid),
        bpf: sys::bpf_objects(t.pid),
    };
    let (kind, ready_after, attaching_after) = (t.kind.clone(), t.ready_after, t.attaching_after);
    let stopped = t.stop()?;
    run.set("ready_ms", ready_after.as_secs_f64() * 1e3);
    if let Some(a) = attaching_after {
        run.set("attaching_ms", a.as_secs_f64() * 1e3);
    }
    if let Some((u0, s0)) = s.cpu_at_ready {
        let user = (stopped.exit.user_s - u0).max(0.0);
        let sys = (stopped.exit.sys_s - s0).max(0.0);
        run.set("tracer_user_s", user);
        run.set("tracer_sys_s", sys);
        run.set("tracer_cpu_s", user + sys);
    }
    if let Some(m) = s.memory {
        run.set("tracer_rss_mib", m.rss_kib as f64 / MIB);
    }
    run.set("tracer_peak_rss_mib", stopped.exit.maxrss_kib as f64 / MIB);
    run.set("map_memlock_mib", s.bpf.memlock_kib() / MIB);
    run.set("bpf_maps", s.bpf.maps.len() as f64);
    run.set("bpf_programs", f64::from(s.bpf.programs));
    if stopped.exit.code != Some(0) {
        run.notes.push(format!(
            "tracer exited with code {:?} (signal {:?}): {}",
            stopped.exit.code,
            stopped.exit.signal,
            stopped.stderr.lines().last().unwrap_or("")
        ));
    }
    run.detail["bpf_maps"] = serde_json::to_value(&s.bpf.maps).unwrap_or(Value::Null);
    Ok((kind, stopped))
}

/// Failures a tracer attributed to the given pids (portexhaust) or comm (bpftrace).
pub(super) struct Reported {
    pub(super) count: Option<u64>,
    pub(super) streamed: Option<u64>,
    pub(super) dropped: Option<u64>,
    pub(super) summary: Option<Value>,
}

pub(super) fn reported(kind: &TracerKind, stopped: &Stopped, pids: &[u32], comm: &str) -> Reported {
    match kind {
        TracerKind::Portexhaust { .. } => {
            let summary: Option<Value> = serde_json::from_str(&stopped.out.last_line)
                .ok()
                .filter(|v: &Value| v["type"] == "summary");
            let count = summary.as_ref().map(|s| offender_failures(s, pids));
            Reported {
                count,
                // Every line but the summary is one failure event.
                streamed: summary
                    .as_ref()
                    .map(|_| stopped.out.newlines.saturating_sub(1)),
                dropped: summary.as_ref().and_then(|s| s["dropped_events"].as_u64()),
                summary,
            }
        }
        TracerKind::Bpftrace => Reported {
            count: Some(
                parse_bpftrace_counts(&stopped.out.text)
                    .get(comm)
                    .copied()
                    .unwrap_or(0),
            ),
            streamed: None,
            dropped: None,
            summary: None,
        },
    }
}

/// Failures a portexhaust summary attributes to any of `pids`.
pub fn offender_failures(summary: &Value, pids: &[u32]) -> u64 {
    summary["offenders"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|o| {
            o["pid"]
                .as_u64()
                .is_some_and(|p| pids.contains(&(p as u32)))
        })
        .filter_map(|o| o["failures"].as_u64())
        .sum()
}

/// Sockets the tracer says it tracks, if this build reports it (issue 4). Looked for where the
/// ownership work is expected to put it; None means "not reported".
pub fn tracked_sockets(summary: &Value) -> Option<u64> {
    summary["tracked_sockets"]
        .as_u64()
        .or_else(|| summary["ownership"]["tracked_sockets"].as_u64())
        .or_else(|| summary["ownership"]["tracked"].as_u64())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn offender_failures_counts_only_our_pids() {
        let s: Value = serde_json::from_str(
            r#"{"type":"summary","offenders":[{"pid":10,"failures":5},{"pid":11,"failures":7},{"pid":99,"failures":1}]}"#,
        )
        .expect("json");
        assert_eq!(offender_failures(&s, &[10, 11]), 12);
        assert_eq!(offender_failures(&s, &[12]), 0);
        assert_eq!(offender_failures(&Value::Null, &[10]), 0);
    }

    #[test]
    fn tracked_sockets_is_optional() {
        let none: Value = serde_json::from_str(r#"{"type":"summary"}"#).expect("json");
        assert_eq!(tracked_sockets(&none), None);
        let top: Value = serde_json::from_str(r#"{"tracked_sockets":100000}"#).expect("json");
        assert_eq!(tracked_sockets(&top), Some(100000));
        let nested: Value =
            serde_json::from_str(r#"{"ownership":{"tracked_sockets":42}}"#).expect("json");
        assert_eq!(tracked_sockets(&nested), Some(42));
    }
}
