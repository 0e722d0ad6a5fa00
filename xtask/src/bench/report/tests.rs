use super::tables::{CHURN, STORM, table};
use super::*;
use crate::bench::procs::{Flavor, TracerKind};
use crate::bench::results::{Results, VmResults};
use crate::bench::variants::Variant;

fn run(scenario: &str, variant: &str, metrics: &[(&str, f64)]) -> Run {
    Run {
        scenario: scenario.into(),
        variant: variant.into(),
        rep: 0,
        metrics: metrics.iter().map(|(k, v)| (k.to_string(), *v)).collect(),
        notes: vec![],
        detail: serde_json::Value::Null,
    }
}

fn variants() -> Vec<Variant> {
    vec![
        Variant::Untraced,
        Variant::Traced(TracerKind::Portexhaust {
            backend: "tracepoint".into(),
            flavor: Flavor::Default,
        }),
        Variant::Traced(TracerKind::Portexhaust {
            backend: "tracepoint".into(),
            flavor: Flavor::NoBlame,
        }),
        Variant::Traced(TracerKind::Bpftrace),
    ]
}

#[test]
fn ready_times_are_pooled_over_scenarios() {
    let runs = vec![
        run("churn", "bpftrace", &[("ready_ms", 80.0)]),
        run("storm", "bpftrace", &[("ready_ms", 90.0)]),
        run("scale10k", "bpftrace", &[("ready_ms", 500.0)]),
    ];
    let rows = summarise(&runs);
    let r = find(&rows, "ready", "bpftrace", "ready_ms").expect("pooled");
    assert_eq!((r.n, r.median), (2, 85.0));
}

#[test]
fn targets_are_judged_on_medians() {
    let pe = "portexhaust/tracepoint";
    let mut runs = vec![
        run("storm", "untraced", &[("failures_per_s", 100.0)]),
        run(
            "storm",
            pe,
            &[
                ("failures_per_s", 96.0),
                ("exact", 1.0),
                ("tracer_cpu_s_per_m", 0.2),
            ],
        ),
        run("storm", "bpftrace", &[("failures_per_s", 97.0)]),
        run("storm2", pe, &[("exact", 0.0), ("tracer_cpu_s_per_m", 0.3)]),
        run(
            "churn",
            "untraced",
            &[
                ("connects_per_s", 1000.0),
                ("client_cpu_us_per_connect", 30.0),
            ],
        ),
        run(
            "churn",
            pe,
            &[
                ("connects_per_s", 985.0),
                ("client_cpu_us_per_connect", 30.9),
                ("ready_ms", 70.0),
                ("map_memlock_mib", 59.7),
            ],
        ),
        run("scale100k", pe, &[("tracer_peak_rss_mib", 20.0)]),
    ];
    // Census starts kept in the detail: pooled one sample per start.
    runs[6].detail = serde_json::json!({"census_starts": [
        {"ready_ms": 120.0, "census_done_ms": 400.0, "peak_rss_mib": 30.0},
        {"ready_ms": 160.0, "census_done_ms": 420.0, "peak_rss_mib": 39.0},
        {"ready_ms": 140.0, "peak_rss_mib": 31.0},
    ]});
    for i in 0..15 {
        let mut r = run(
            "start",
            pe,
            &[("ready_ms", 90.0 + i as f64), ("map_memlock_mib", 20.0)],
        );
        r.rep = i;
        runs.push(r);
    }
    let rows = summarise(&runs);
    let names: Vec<String> = variants().iter().map(Variant::name).collect();
    let t = targets(&rows, &runs, &names, Some("tracepoint"));
    let by = |name: &str, goal: &str| {
        t.iter()
            .find(|x| x.name.contains(name) && x.target.contains(goal))
            .unwrap_or_else(|| panic!("{name} {goal}: {t:?}"))
            .met
    };
    assert_eq!(by("storm (1 process)", "0.95x"), Some(true));
    assert_eq!(by("storm (1 process)", "bpftrace"), Some(false));
    assert_eq!(by("storm (2 processes)", "0.95x"), None);
    assert_eq!(by("counts", "exact"), Some(false));
    assert_eq!(by("churn connects/s", "0.98x"), Some(true));
    // +3% CPU per connect is over the +2% budget.
    assert_eq!(by("churn CPU", "+2%"), Some(false));
    // The 15 start-up runs decide (median 97 ms), not the start before the churn.
    assert_eq!(by("ready of", "100 ms"), Some(true));
    assert_eq!(by("already open", "150 ms"), Some(true));
    // No tracked-socket count: the tracked-sockets memory target cannot be judged.
    assert_eq!(by("100k tracked sockets", "40 MB"), None);
    assert_eq!(by("started with 100k", "40 MB"), Some(false));
    // At defaults = the start-up runs (20 MiB), not the loaded churn (59.7).
    assert_eq!(by("BPF map memory", "24 MiB"), Some(true));
    // storm2 is over 0.25 s per million.
    assert_eq!(by("tracer CPU", "0.25 s"), Some(false));
    assert!(t.iter().all(|x| !x.name.contains("no-blame")), "{t:?}");
    assert!(t[0].name.contains("(default trace)"), "{}", t[0].name);
}

#[test]
fn too_few_starts_are_not_judged() {
    let pe = "portexhaust/tracepoint";
    let runs = vec![run("start", pe, &[("ready_ms", 50.0)])];
    let rows = summarise(&runs);
    let names = vec![pe.to_string()];
    let t = targets(&rows, &runs, &names, None);
    let ready = t
        .iter()
        .find(|x| x.name == format!("time to ready of {pe}"))
        .expect("ready target");
    assert_eq!(ready.met, None);
}

#[test]
fn vm_section_shows_ratios_and_why_bpftrace_did_not_run() {
    use crate::bench::{plan::Plan, results::VmKernel, sys::Machine};
    let pe = "portexhaust/fentry";
    let mut runs = Vec::new();
    for rep in 0..2 {
        for (v, rate, exact) in [("untraced", 1000.0, None), (pe, 900.0, Some(1.0))] {
            let mut m = vec![("failures_per_s", rate + rep as f64)];
            if let Some(e) = exact {
                m.push(("exact", e));
                m.push(("ready_ms", 1500.0));
            }
            let mut r = run("storm", v, &m);
            r.rep = rep;
            runs.push(r);
        }
    }
    let machine = Machine {
        cpu_model: "QEMU".into(),
        nproc: 2,
        mem_total_kib: 1,
        kernel: "6.1.0-50-cloud-amd64".into(),
    };
    let results = Results {
        schema: 2,
        date: "d".into(),
        machine: machine.clone(),
        git: "abc".into(),
        bpftrace: None,
        bpftrace_skipped: Some("no bpftrace on the host".into()),
        plan: Plan::vm(false, None),
        backends_ran: vec!["fentry".into()],
        backends_skipped: vec![("kprobe".into(), "no kprobe PMU".into())],
        default_backend: Some("fentry".into()),
        catch_offered: false,
        variants: vec!["untraced".into(), pe.into()],
        loadavg_start: [0.0; 3],
        loadavg_end: [0.0; 3],
        elapsed_s: 1.0,
        summary: summarise(&runs),
        targets: vec![],
        failed_runs: vec![],
        runs,
    };
    let vm = VmResults {
        schema: 1,
        host: machine,
        qemu: None,
        kernels: vec![VmKernel {
            label: "6.1".into(),
            suite: "bookworm".into(),
            date: "d".into(),
            git: "abc".into(),
            package: None,
            version: None,
            release: Some("6.1.0-50-cloud-amd64".into()),
            memory_mb: 1536,
            smp: 2,
            initramfs_mib: None,
            boot_secs: Some(5.0),
            run_secs: Some(200.0),
            host_loadavg: [[0.0; 3]; 2],
            error: None,
            results: Some(results),
        }],
    };
    let s = vm_section(&vm);
    assert!(
        s.contains("### 6.1 (bookworm): 6.1.0-50-cloud-amd64"),
        "{s}"
    );
    assert!(
        s.contains("| bpftrace | not run: no bpftrace on the host |"),
        "{s}"
    );
    assert!(
        s.contains("| backend kprobe skipped | no kprobe PMU |"),
        "{s}"
    );
    assert!(
        s.contains("| portexhaust/fentry | 900 (900-901) | 0.900 | - | - | 2 of 2 |"),
        "{s}"
    );
    let md = markdown(None, Some(&vm), Some("## Analysis"));
    assert!(md.contains("No run on this machine yet"), "{md}");
    assert!(md.trim_end().ends_with("## Analysis"), "{md}");
}

#[test]
fn markdown_has_every_section_and_ratio() {
    let pe = "portexhaust/tracepoint";
    let runs = vec![
        run("churn", "untraced", &[("connects_per_s", 1000.0)]),
        run("churn", pe, &[("connects_per_s", 990.0)]),
        run("churn", "bpftrace", &[("connects_per_s", 1100.0)]),
    ];
    let rows = summarise(&runs);
    let mut s = String::new();
    let names: Vec<String> = variants().iter().map(Variant::name).collect();
    table(&mut s, &rows, &runs, "churn", &names, CHURN);
    assert!(
        s.contains("| connects/s (higher is better) | 1,000 | 990 | 1,100 | 0.990 | 0.900 |"),
        "{s}"
    );
    let mut empty = String::new();
    table(&mut empty, &rows, &runs, "storm", &names, STORM);
    assert_eq!(empty, "(not run)\n\n");
}
