//! portexhaust: catch Linux ephemeral-port exhaustion the moment it happens and say who caused it.
//!
//! The layers, each importing only those below it:
//! - [`schema`]: the only wire types (every line `trace --json` prints, `--record` writes and
//!   `report` reads), with their version.
//! - [`engine`]: counts, offenders, blame, utilisation, rates, forecast, timeline, and the replay
//!   of records. Pure.
//! - [`advice`]: what settings and evidence mean, and what to fix. Pure.
//! - [`output`]: one renderer per format: tables and human lines, JSON lines, HTML, Prometheus.
//! - [`kernel`]: everything that touches the machine: the eBPF loader and its maps, BTF,
//!   sock_diag, network namespaces, /proc, containers, sysctls.
//! - [`cmd`]: each command, wiring the kernel layer to the engine and the outputs.
//! - [`cli`]: the arguments.
//!
//! `report` and `doctor --explain` are offline: their code paths use no module of [`kernel`]
//! (`tests/layers.rs` holds that).
pub mod advice;
pub mod cli;
pub mod cmd;
pub mod engine;
pub mod error;
pub mod kernel;
pub mod output;
pub mod schema;
