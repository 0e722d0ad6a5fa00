//! The what-if model, checked against what really happens: a churner at a fixed rate in its
//! own namespace, the model's steady state taken by `top` 20 s in, and the ports really in use
//! measured at 90 s (after TIME_WAIT's 60 s the count settles). A second churner with a wider
//! range checks a fix's projected headroom against its own measured run. Root, about 100 s;
//! `cargo xtask test` runs it. It panics rather than skips.
mod common;

use std::time::{Duration, Instant};

use common::{Tracer, Workload, require_root};
use serde_json::Value;

const RATE: u32 = 40;
const DST: &str = "127.0.0.1:5000";

/// One `top --json` view of the namespace of `w`, `interval` after it starts.
fn top_of(w: &Workload, interval: &str) -> Value {
    let ns = w.netns_path();
    let t = Tracer::tool(&[
        "top",
        "--json",
        "--netns",
        &ns,
        "--interval",
        interval,
        "--count",
        "1",
    ]);
    let (out, err, code) = t.wait();
    assert_eq!(code, 0, "{err}");
    serde_json::from_str(out.trim()).unwrap_or_else(|e| panic!("top --json {out:?}: {e}"))
}

fn row<'a>(view: &'a Value, what: &str) -> &'a Value {
    view["destinations"]
        .as_array()
        .and_then(|d| d.iter().find(|r| r["dst"] == DST))
        .unwrap_or_else(|| panic!("{what}: no row for {DST}: {view}"))
}

fn fix<'a>(r: &'a Value, name: &str) -> &'a Value {
    r["what_if"]
        .as_array()
        .and_then(|w| w.iter().find(|x| x["fix"] == name))
        .unwrap_or_else(|| panic!("no what-if {name}: {r}"))
}

fn within(what: &str, predicted: f64, measured: f64, tolerance: f64) {
    let err = (predicted - measured).abs() / measured.max(1.0);
    assert!(
        err <= tolerance,
        "{what}: predicted {predicted:.0}, measured {measured:.0} ({:.1}% off)",
        err * 100.0
    );
    eprintln!(
        "{what}: predicted {predicted:.0}, measured {measured:.0} ({:.1}% off)",
        err * 100.0
    );
}

#[test]
#[ignore = "needs root: run with cargo xtask test"]
fn the_model_predicts_the_steady_state_and_a_fixs_headroom() {
    require_root();
    let rate = RATE.to_string();
    let start = |ports: &str, comm: &str| {
        Workload::lingering(&[
            "--scenario",
            "churn",
            "--ports",
            ports,
            "--rate",
            &rate,
            "--seconds",
            "100",
            "--comm",
            comm,
        ])
    };
    // 3000 ports: 40/s held 60 s needs at most 2400, so it does not fill; the second has 20000.
    let mut narrow = start("3000", "pxh-t-model");
    let mut wide = start("20000", "pxh-t-wide");
    narrow.go();
    wide.go();
    let t0 = Instant::now();

    // The prediction, 20 s in: only a third of the steady state is in TIME_WAIT yet.
    let early = top_of(&narrow, "20");
    let r = row(&early, "at 20 s");
    let load = &r["load"];
    assert_eq!(load["rate_from"], "connects", "{r}");
    // The kernel's connect counter over the first 20 s: the churner's own rate.
    within(
        "the measured rate",
        load["rate_per_s"].as_f64().expect("rate"),
        f64::from(RATE),
        0.10,
    );
    let now = fix(r, "now");
    let predicted = now["in_use"].as_f64().expect("in_use");
    let in_use_early = r["in_use"].as_f64().expect("in_use");
    assert!(
        in_use_early < predicted * 0.6,
        "20 s in, far from the steady state: {in_use_early} of {predicted}"
    );
    assert!(
        now["full_in_s"].is_null(),
        "2400 of 3000 never fills: {now}"
    );
    // The fix, as projected from the narrow run: the same load on a range of 20000.
    let wider = fix(r, "wider_range");
    let projected_wide_in_use = wider["in_use"].as_f64().expect("in_use");
    assert!(wider["capacity"].as_u64() > Some(3000), "{wider}");
    assert!(
        r["what_if"]
            .as_array()
            .expect("what_if")
            .iter()
            .all(|w| w["fix"] != "tcp_tw_recycle")
    );

    // The measurement, at 90 s: every port closed in the last 60 s is in TIME_WAIT.
    let at = Duration::from_secs(89);
    if let Some(left) = at.checked_sub(t0.elapsed()) {
        std::thread::sleep(left);
    }
    let late = top_of(&narrow, "1");
    let measured = row(&late, "at 90 s")["in_use"].as_f64().expect("in_use");
    within("steady-state ports in use", predicted, measured, 0.15);

    let late_wide = top_of(&wide, "1");
    let r2 = row(&late_wide, "wide at 90 s");
    let capacity = r2["range_size"].as_f64().expect("range");
    assert_eq!(capacity, 20000.0);
    let measured_wide = r2["in_use"].as_f64().expect("in_use");
    within(
        "ports in use under the wider range",
        projected_wide_in_use,
        measured_wide,
        0.15,
    );
    let measured_headroom = capacity - measured_wide;
    within(
        "headroom with the wider range",
        capacity - projected_wide_in_use,
        measured_headroom,
        0.15,
    );
    let _ = narrow.report();
    let _ = wide.report();
    narrow.release();
    wide.release();
}
