//! Sizes of a run: repetitions, and how large each scenario is (on this machine, or in a
//! guest under software emulation).
use serde::{Deserialize, Serialize};

/// Sizes of one run. Chosen so that the full run fits in about 15 minutes on 2 cores.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Plan {
    pub mode: String,
    pub reps: u32,
    pub churn_secs: f64,
    /// Failing connects of the one-process storm.
    pub storm_failures: u64,
    /// Failing connects of each process of the two-process storm.
    pub storm2_failures_each: u64,
    /// Ports in each storm namespace's range (all held during the storm).
    pub storm_ports: u16,
    pub scale_sizes: Vec<u64>,
    pub scale_reps: u32,
    pub scale_churn_secs: f64,
    /// Failing connects of the storm run once per tracer with BPF run-time statistics on.
    pub profile_failures: u64,
    /// Starts of each tracer in the start-up scenario (the ready target is a median of 15).
    #[serde(default)]
    pub ready_starts: u32,
    /// Starts of a second tracer with the largest scale's connections already open, per
    /// scale run (pooled over the scale repetitions).
    #[serde(default)]
    pub census_starts: u32,
}

impl Plan {
    pub(super) fn new(quick: bool, reps: Option<u32>) -> Self {
        if quick {
            Self {
                mode: "quick".into(),
                reps: reps.unwrap_or(2),
                churn_secs: 2.0,
                storm_failures: 200_000,
                storm2_failures_each: 100_000,
                storm_ports: 10,
                scale_sizes: vec![10_000, 100_000],
                scale_reps: 1,
                scale_churn_secs: 0.5,
                profile_failures: 100_000,
                ready_starts: 5,
                census_starts: 3,
            }
        } else {
            Self {
                mode: "full".into(),
                reps: reps.unwrap_or(5),
                churn_secs: 5.0,
                storm_failures: 1_000_000,
                storm2_failures_each: 500_000,
                storm_ports: 10,
                scale_sizes: vec![10_000, 100_000],
                scale_reps: 2,
                scale_churn_secs: 2.0,
                profile_failures: 300_000,
                ready_starts: 15,
                census_starts: 8,
            }
        }
    }

    /// Sizes for a guest under software emulation with instruction-counted time (see
    /// bench/vm.rs; a busy guest second takes 5-10 real seconds here): the churn and the
    /// one-process storm only, each measured part a fraction of a guest second (a churn run
    /// of 1 guest second took 20 s with the tracer's start and stop), so that one kernel's
    /// whole bench takes about 5 minutes. Run-to-run noise is about 1% in such a guest, so
    /// small runs suffice.
    pub fn vm(quick: bool, reps: Option<u32>) -> Self {
        Self {
            mode: if quick { "vm-quick" } else { "vm" }.into(),
            reps: reps.unwrap_or(if quick { 1 } else { 3 }),
            churn_secs: if quick { 0.2 } else { 0.3 },
            storm_failures: if quick { 3_000 } else { 10_000 },
            storm2_failures_each: 0,
            storm_ports: 10,
            scale_sizes: Vec::new(),
            scale_reps: 0,
            scale_churn_secs: 0.0,
            profile_failures: 0,
            ready_starts: 0,
            census_starts: 0,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plans_differ_in_size_only() {
        let q = Plan::new(true, None);
        let f = Plan::new(false, None);
        assert!(q.reps < f.reps && q.storm_failures < f.storm_failures);
        assert_eq!(q.scale_sizes, f.scale_sizes);
        assert_eq!(Plan::new(false, Some(9)).reps, 9);
        assert_eq!(f.ready_starts, 15);
        // A guest runs the churn and the one-process storm only.
        let vm = Plan::vm(false, None);
        assert!(vm.storm_failures > 0 && vm.churn_secs > 0.0);
        assert_eq!(
            (
                vm.storm2_failures_each,
                vm.profile_failures,
                vm.ready_starts
            ),
            (0, 0, 0)
        );
        assert!(vm.scale_sizes.is_empty());
    }
}
