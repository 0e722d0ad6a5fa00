//! Each command: the kernel layer's facts into the engine, the engine's answers into an
//! output. `report` and `doctor --explain` touch no kernel module.
pub mod doctor;
pub mod manpages;
pub mod record;
pub mod report;
pub mod selftest;
pub mod top;
pub mod trace;
