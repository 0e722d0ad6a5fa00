//! Load generators for `cargo xtask bench`, run as the `pxh-loadgen` binary.
//!
//! Every generator first moves itself into a fresh network namespace
//! ([`portexhaust_workload::isolate`]), so its port range, `tcp_tw_reuse` and all of its
//! traffic stay private to it and vanish with the process. They share one paused-start protocol,
//! so that the harness can attach tracers after the set-up and before the measured part:
//!
//! 1. set up (listeners, held ports), then print `{"ready":PID,...}` on stdout;
//! 2. wait for a line on stdin (`go`);
//! 3. run, then print one JSON report line on stdout.
//!
//! Diagnostics go to stderr; every loop is bounded in count and time.
pub mod churn;
pub mod common;
pub mod hold;
pub mod report;
pub mod storm;

pub use common::LoadError;
