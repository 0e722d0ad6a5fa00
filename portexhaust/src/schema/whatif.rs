//! What each fix would buy towards one destination: the measured load, and the steady state
//! the model projects with it now and under each fix.
use serde::{Deserialize, Serialize};

/// The load on one destination, as measured.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Load {
    /// New connections per second.
    pub rate_per_s: f64,
    /// Where the rate comes from: `connects` (the kernel's exact counter, over the live
    /// window) or `time_wait` (TIME_WAIT sockets / 60 s: one snapshot of a steady client).
    pub rate_from: String,
    /// Mean time a connection holds its port before it closes (Little's law on the sockets
    /// that are not in TIME_WAIT).
    pub lifetime_s: f64,
    /// How long a closed connection still holds its port: 60 s of TIME_WAIT, 1 s where
    /// `tcp_tw_reuse` applies.
    pub tw_hold_s: f64,
}

/// One fix and what it would buy.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct WhatIf {
    /// `now`, then `pooling`, `server_closes_first`, `ip_local_port_range_per_socket`,
    /// `more_sources`, `wider_range`, `tcp_tw_reuse`.
    pub fix: String,
    /// `now`, `application`, `capacity` or `sysctl` (in that order).
    pub kind: String,
    pub text: String,
    /// Projected steady-state ports in use: rate x (lifetime + TIME_WAIT hold).
    pub in_use: f64,
    /// Usable ports under the fix.
    pub capacity: u64,
    /// `capacity - in_use`; negative: it fills.
    pub headroom: f64,
    /// Seconds until full from now; absent: never fills.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub full_in_s: Option<f64>,
}
