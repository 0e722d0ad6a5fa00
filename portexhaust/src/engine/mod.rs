//! The engine: counts, offenders, blame, utilisation, rates, forecast and timeline. Pure: no
//! BPF, no /proc, no network namespaces; everything it knows comes in as data.
//!
//! It is fed live by `trace` and `top` (an [`live::Observed`] moment, gathered by the kernel
//! layer) and by replay in `report` ([`session::Replay`], fed the records `trace` wrote, in
//! order). The answers are the same code either way: a clean record's report carries the
//! offenders, blame and totals of the summary `trace` printed, and a killed one's the same
//! rule applied to its last snapshot and the lines after it.
pub mod blame;
pub mod census;
pub mod counts;
pub mod live;
pub mod nat;
pub mod rates;
pub mod report;
pub mod session;
pub mod sites;
pub mod timeline;
pub mod whatif;

#[cfg(test)]
mod tests;
