//! portexhaust: catch Linux ephemeral-port exhaustion the moment it happens and say who caused it.
//!
//! Pure logic (decoding, aggregation, rendering) lives in modules that know nothing about BPF
//! and is unit-tested without root; `loader`, `trace`, `selftest` and `workload` touch the kernel
//! and are tested for real by the privileged tests.
pub mod aggregate;
pub mod blame;
pub mod clock;
pub mod container;
pub mod doctor;
pub mod error;
pub mod kernel;
pub mod line;
pub mod metrics;
pub mod model;
pub mod nsinfo;
pub mod procinfo;
pub mod record;
pub mod render;
pub mod report;
pub mod selftest;
pub mod sockdiag;
pub mod sysctl;
pub mod top;
pub mod trace;
pub mod usage;
pub mod view;
pub mod workload;
