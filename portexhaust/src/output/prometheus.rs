//! Prometheus metrics for `portexhaust trace --metrics-addr ADDR`.
//!
//! What feeds it:
//! - [`Metrics::update_counts`] (once a second from the trace loop, when failures happened):
//!   failure counters derived from the kernel's exact counts ([`Exact`]), never from
//!   ring-buffer events, which can be dropped; plus the kernel's global counters.
//! - [`Metrics::observe_failure`] (per decoded event, cheap: one hash lookup, no allocation
//!   once a pid is known): teaches which container each pid ran in, from the event's cgroup id.
//! - [`Metrics::set_destinations`], [`Metrics::set_lru_evictions`], [`Metrics::set_backend`]:
//!   per-destination port usage and bookkeeping, from whoever computes them. The destination
//!   rows are the ones `top` shows (`engine::live::Viewer::destinations`): besides the ports
//!   in use they carry the exhaustion forecast and the kernel's connect statistics (exact
//!   established connects, a log2 latency histogram of a sample of them), which become
//!   `portexhaust_exhaustion_eta_seconds`, `portexhaust_connections_opened_total` and
//!   `portexhaust_connect_duration_seconds`. Nothing here computes an answer of its own.
//!
//! No `instance` label is set here: the scrape adds it, and it must be the same one
//! node_exporter's series get (`node_sockstat_TCP_tw`, `node_nf_conntrack_*`) for dashboards
//! and alerts to join on it.
//!
//! Cardinality is bounded. Destinations of the failure counters are admitted first come,
//! first served: the first [`MetricsOptions::top_k`] distinct destinations (within one refresh,
//! those with most failures first, then by name) get a series of their own for the life of the
//! process, and every later one is counted under `dst="other"`. Re-ranking would move counts
//! between series and make Prometheus see counter resets, so admission is never revoked. At
//! most [`MetricsOptions::max_series`] label sets exist; past that, new (pid, destination)
//! keys fold into `comm="other",dst="other"`. The per-destination gauges are re-ranked on
//! every update instead (gauges may go down): the `top_k` most utilised destinations are
//! shown, the rest summed into one `dst="other"` row (its forecast is the soonest). The
//! connect counter and histogram are cumulative, so they are admitted like the failure
//! counters: the first `top_k` (netns, destination) pairs keep a series for the life of the
//! process, every later one adds into `dst="other"`; like the failure counters, a new series is
//! served at 0 for one scrape before it gets its counts.
//!
//! Served by [`super::http`].
use std::{
    collections::{HashMap, HashSet},
    fmt::Write as _,
    net::SocketAddr,
    sync::{Arc, Mutex, MutexGuard},
};

use portexhaust_common::LATENCY_BUCKETS;
use prometheus_client::{
    encoding::{EncodeLabelSet, EncodeMetric, MetricEncoder, NoLabelSet, prometheus_text, text},
    metrics::{
        MetricType, TypedMetric, counter::Counter, family::Family, gauge::Gauge, info::Info,
    },
    registry::{Registry, Unit},
};

use crate::{
    engine::counts::{Exact, ExactId},
    schema::{ContainerInfo, DestRow, Failure},
};

/// Label value of everything folded together.
pub const OTHER: &str = "other";

#[derive(Clone, Debug)]
pub struct MetricsOptions {
    /// Distinct destinations with a series of their own (per family of metrics).
    pub top_k: usize,
    /// Label sets of `portexhaust_failures_total` before everything folds into `other`.
    pub max_series: usize,
    /// Container labels on the failure counters (off: `--no-container-labels`).
    pub container_labels: bool,
}

impl Default for MetricsOptions {
    fn default() -> Self {
        Self {
            top_k: 20,
            max_series: 2000,
            container_labels: true,
        }
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct FailureLabels {
    pub comm: String,
    /// Symbolic: EADDRNOTAVAIL, EADDRINUSE, EAGAIN.
    pub errno: String,
    /// exhausted, tuple_collision, no_source_address, bind_exhausted, autobind_exhausted or
    /// unknown: what the fix is depends on it.
    pub cause: String,
    pub proto: String,
    /// `ip:port`, `[ipv6]:port`, or `other`.
    pub dst: String,
    /// docker, containerd, cri-o, podman, cri, systemd; empty when none or labels are off.
    pub container_runtime: String,
    /// 64-hex container id or systemd unit name; empty when none.
    pub container_id: String,
    pub pod_uid: String,
}

/// Labels of the source-NAT series (`trace --catch nat`): the NAT's namespace, the destination
/// and the address the NAT rewrites sources to.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct NatLabels {
    pub router_netns: String,
    pub dst: String,
    pub nat_addr: String,
    pub proto: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct DestLabels {
    /// Network namespace inode; empty for `other` or unknown.
    pub netns: String,
    pub src: String,
    pub dst: String,
    pub proto: String,
}

/// Labels of the connect statistics. No source address: the kernel counts connects and their
/// latency per network namespace and destination.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ConnectLabels {
    /// Network namespace inode; empty for `other` or unknown.
    pub netns: String,
    /// `ip:port`, `[ipv6]:port`, or `other`.
    pub dst: String,
    pub proto: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct BackendLabels {
    backend: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct BuildLabels {
    version: String,
    kernel: String,
}

/// One destination's port usage, as a gauge row (several rows fold into `other`).
#[derive(Clone, Debug, PartialEq)]
struct DestinationGauge {
    range_size: u64,
    in_use: u64,
    /// in_use / range_size, 0.0..=1.0.
    utilisation: f64,
    time_wait: u64,
    /// Seconds until the range is full at the recent growth; None: not growing (no sample).
    eta_s: Option<f64>,
}

impl From<&DestRow> for DestinationGauge {
    fn from(r: &DestRow) -> Self {
        Self {
            range_size: r.range_size.unwrap_or(0),
            in_use: r.in_use,
            utilisation: r.utilisation.unwrap_or(0.0),
            time_wait: r.time_wait(),
            eta_s: r.forecast_s.filter(|s| s.is_finite()),
        }
    }
}

/// The kernel's log2 buckets below this one are served in it: bucket 9 ends at 2^10 ns
/// (1.024 µs), and no connect() through port selection takes less (33 µs on loopback, measured
/// for `top`), so 10 more `le` series per destination would only ever hold zeros. The
/// histogram stays exact: buckets are cumulative, and the first `le` counts everything below.
const FIRST_SERVED_BUCKET: usize = 9;

/// A histogram whose buckets the kernel filled (`DEST_STATS`: bucket i counts connects that
/// took [2^i, 2^(i+1)) ns, the last one everything above). prometheus-client's own Histogram
/// takes observations one at a time; this one is set from the counts.
#[derive(Debug, Default)]
struct Log2Histogram {
    buckets: Mutex<[u64; LATENCY_BUCKETS]>,
}

impl Log2Histogram {
    fn set(&self, b: &[u64; LATENCY_BUCKETS]) {
        *self.buckets.lock().unwrap_or_else(|p| p.into_inner()) = *b;
    }
}

/// The exposition of log2 buckets: (sum in seconds, count, (upper bound in seconds, count of
/// that bucket alone) pairs; the encoder makes them cumulative). `le` of bucket i is
/// 2^(i+1) ns; the last bucket is open-ended, so it is `+Inf`. The kernel keeps no sum: it is
/// estimated from each bucket's midpoint (1.5 x 2^i ns; 1 ns for [0, 2); the lower bound,
/// 2^31 ns, for the open-ended last one), so `_sum / _count` is an estimate of the mean that
/// is off by at most a factor of 1.5 either way.
pub fn log2_exposition(b: &[u64; LATENCY_BUCKETS]) -> (f64, u64, Vec<(f64, u64)>) {
    let last = LATENCY_BUCKETS - 1;
    let ns_to_s = |ns: f64| ns / 1e9;
    let mut out = Vec::with_capacity(LATENCY_BUCKETS - FIRST_SERVED_BUCKET);
    out.push((
        ns_to_s((1u64 << (FIRST_SERVED_BUCKET + 1)) as f64),
        b[..=FIRST_SERVED_BUCKET].iter().sum(),
    ));
    for (i, n) in b
        .iter()
        .enumerate()
        .take(last)
        .skip(FIRST_SERVED_BUCKET + 1)
    {
        out.push((ns_to_s((1u64 << (i + 1)) as f64), *n));
    }
    out.push((f64::INFINITY, b[last]));
    let mid = |i: usize| -> f64 {
        match i {
            0 => 1.0,
            i if i == last => (1u64 << i) as f64,
            i => 1.5 * (1u64 << i) as f64,
        }
    };
    let sum = b
        .iter()
        .enumerate()
        .map(|(i, n)| *n as f64 * mid(i))
        .sum::<f64>();
    (ns_to_s(sum), b.iter().sum(), out)
}

impl TypedMetric for Log2Histogram {
    const TYPE: MetricType = MetricType::Histogram;
}

impl EncodeMetric for Log2Histogram {
    fn encode(&self, mut encoder: MetricEncoder) -> Result<(), std::fmt::Error> {
        let b = *self.buckets.lock().unwrap_or_else(|p| p.into_inner());
        let (sum, count, buckets) = log2_exposition(&b);
        encoder.encode_histogram::<NoLabelSet>(sum, count, &buckets, None)
    }

    fn metric_type(&self) -> MetricType {
        Self::TYPE
    }
}

/// One entry of the kernel's connect statistics, as the rows name it: (netns, destination,
/// protocol).
type ConnId = (Option<u64>, SocketAddr, String);

/// What the kernel last said of one (netns, destination) of `DEST_STATS`, and the series it
/// feeds (fixed at first sight, like a failure key's).
struct ConnKey {
    labels: ConnectLabels,
    connects: u64,
    hist: [u64; LATENCY_BUCKETS],
}

/// One series of the connect counter and histogram: everything added to it, and how much of
/// that is published (nothing until a scrape served it at 0).
struct ConnSeries {
    born_at_scrape: u64,
    released: bool,
    connects: u64,
    published_connects: u64,
    hist: [u64; LATENCY_BUCKETS],
}

/// Most (netns, destination) keys remembered. `DEST_STATS` holds 4096 at a time; over weeks
/// destinations come and go, and past this the keys not in the current rows are forgotten (one
/// that comes back is then counted again from the kernel's total: a rare over-count, against
/// memory that would grow forever).
const MAX_CONN_KEYS: usize = 4 * 4096;

/// A counter fed with a cumulative kernel value: adds the difference since the last value.
struct Cumulative {
    counter: Counter,
    last: u64,
}

impl Cumulative {
    fn new() -> Self {
        Self {
            counter: Counter::default(),
            last: 0,
        }
    }
    fn set(&mut self, total: u64) {
        // Kernel counters only grow while one tracer lives; a smaller value is ignored
        // rather than turned into a counter reset.
        if total > self.last {
            self.counter.inc_by(total - self.last);
            self.last = total;
        }
    }
}

/// The series a kernel count key feeds, fixed at first sight so counters stay monotonic.
struct Series {
    labels: FailureLabels,
    counter: Counter,
    last: u64,
}

/// A label set served at 0 until a scrape has seen it: its count waits in `pending`.
struct Held {
    born_at_scrape: u64,
    pending: u64,
}

struct State {
    series: HashMap<ExactId, Series>,
    admitted: HashSet<String>,
    /// Label sets of the failure counters made so far (bounded by `max_series` + overflow).
    label_sets: HashSet<FailureLabels>,
    /// New label sets not yet scraped at 0 (see [`Metrics::release_new_series`]).
    held: HashMap<FailureLabels, Held>,
    /// Expositions served so far.
    scrapes: u64,
    /// Container of each pid, learnt from events; bounded (cleared when full: series already
    /// made keep their labels).
    pid_containers: HashMap<u32, Option<Arc<ContainerInfo>>>,
    seen: Cumulative,
    dropped: Cumulative,
    uncounted: Cumulative,
    lru_evictions: Cumulative,
    /// The kernel's failure total at the last walk of the counts map, and whether one more
    /// walk is owed (see [`Metrics::counts_changed`]).
    counts_at: Option<u64>,
    recheck: bool,
    /// Connect statistics by kernel key (netns, destination, proto), and their series.
    conn_keys: HashMap<ConnId, ConnKey>,
    conn_series: HashMap<ConnectLabels, ConnSeries>,
    /// NAT drop counters: the label sets admitted (the first `top_k`, then `other`) and the
    /// kernel's exact count last added for each NAT key.
    nat_admitted: HashSet<NatLabels>,
    nat_counted: HashMap<NatLabels, u64>,
}

pub struct Metrics {
    opts: MetricsOptions,
    registry: Registry,
    failures: Family<FailureLabels, Counter>,
    in_use: Family<DestLabels, Gauge>,
    range_size: Family<DestLabels, Gauge>,
    utilisation: Family<DestLabels, Gauge<f64, std::sync::atomic::AtomicU64>>,
    time_wait: Family<DestLabels, Gauge>,
    eta: Family<DestLabels, Gauge<f64, std::sync::atomic::AtomicU64>>,
    opened: Family<ConnectLabels, Counter>,
    durations: Family<ConnectLabels, Log2Histogram>,
    backend: Family<BackendLabels, Gauge>,
    nat_drops: Family<NatLabels, Counter>,
    nat_in_use: Family<NatLabels, Gauge>,
    nat_range_size: Family<NatLabels, Gauge>,
    nat_utilisation: Family<NatLabels, Gauge<f64, std::sync::atomic::AtomicU64>>,
    state: Mutex<State>,
}

const MAX_PIDS: usize = 16_384;

fn kernel_release() -> String {
    std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .map(|s| s.trim().to_string())
        .unwrap_or_default()
}

impl Metrics {
    pub fn new(opts: MetricsOptions) -> Self {
        let mut registry = Registry::with_prefix("portexhaust");
        let failures = Family::<FailureLabels, Counter>::default();
        registry.register(
            "failures",
            "Port-exhaustion failures by command, errno, cause, destination (top-K, rest as \
             dst=\"other\") \
             and container; exact, from the kernel's counts",
            failures.clone(),
        );
        let in_use = Family::<DestLabels, Gauge>::default();
        registry.register(
            "ports_in_use",
            "Local ports in use towards a destination (top-K by utilisation, rest summed as dst=\"other\")",
            in_use.clone(),
        );
        let range_size = Family::<DestLabels, Gauge>::default();
        registry.register(
            "port_range_size",
            "Ephemeral ports usable towards a destination (the namespace's ip_local_port_range)",
            range_size.clone(),
        );
        let utilisation = Family::<DestLabels, Gauge<f64, std::sync::atomic::AtomicU64>>::default();
        registry.register(
            "port_utilisation_ratio",
            "Ports in use / port range size per destination, 0 to 1 (dst=\"other\": the highest folded)",
            utilisation.clone(),
        );
        let time_wait = Family::<DestLabels, Gauge>::default();
        registry.register(
            "time_wait_sockets",
            "Sockets in TIME_WAIT towards a destination",
            time_wait.clone(),
        );
        let eta = Family::<DestLabels, Gauge<f64, std::sync::atomic::AtomicU64>>::default();
        registry.register_with_unit(
            "exhaustion_eta",
            "Seconds until the ports towards a destination run out at their growth over the \
             last 30 s (0: full now); no sample while they are not growing. The forecast of \
             `portexhaust top` (dst=\"other\": the soonest folded)",
            Unit::Seconds,
            eta.clone(),
        );
        let opened = Family::<ConnectLabels, Counter>::default();
        registry.register(
            "connections_opened",
            "TCP connections established towards a destination (exact, the kernel's count per \
             network namespace and destination; first top-K, later ones as dst=\"other\")",
            opened.clone(),
        );
        let durations = Family::<ConnectLabels, Log2Histogram>::default();
        registry.register_with_unit(
            "connect_duration",
            "connect() latency, from port selection (CLOSE->SYN_SENT) to ESTABLISHED, in the \
             kernel's log2 buckets (le = 2^(i+1) ns), of a sample of connects (per CPU, the \
             first of each jiffy and the first after a change of destination): _count is \
             connects timed, not made (see portexhaust_connections_opened_total); _sum is \
             estimated from bucket midpoints, the kernel keeps none",
            Unit::Seconds,
            durations.clone(),
        );
        let nat_drops = Family::<NatLabels, Counter>::default();
        registry.register(
            "nat_drops",
            "SYNs a source NAT dropped because it found no free source port towards a destination \
             (conntrack insert clash; exact, the kernel's count; trace --catch nat; first top-K \
             keys, later ones as dst=\"other\")",
            nat_drops.clone(),
        );
        let nat_in_use = Family::<NatLabels, Gauge>::default();
        registry.register(
            "nat_ports_in_use",
            "Source ports of the NAT address in use towards a destination (its conntrack table)",
            nat_in_use.clone(),
        );
        let nat_range_size = Family::<NatLabels, Gauge>::default();
        registry.register(
            "nat_port_range_size",
            "Source ports the NAT may use (the masquerade rule's range, else the NAT namespace's \
             ip_local_port_range)",
            nat_range_size.clone(),
        );
        let nat_utilisation =
            Family::<NatLabels, Gauge<f64, std::sync::atomic::AtomicU64>>::default();
        registry.register(
            "nat_port_utilisation_ratio",
            "NAT source ports in use / NAT port range per destination, 0 to 1",
            nat_utilisation.clone(),
        );
        let backend = Family::<BackendLabels, Gauge>::default();
        registry.register(
            "backend",
            "The probe backend in use (value 1)",
            backend.clone(),
        );
        registry.register(
            "build",
            "portexhaust version and the running kernel",
            Info::new(BuildLabels {
                version: env!("CARGO_PKG_VERSION").to_string(),
                kernel: kernel_release(),
            }),
        );
        let state = State {
            series: HashMap::new(),
            admitted: HashSet::new(),
            label_sets: HashSet::new(),
            held: HashMap::new(),
            scrapes: 0,
            pid_containers: HashMap::new(),
            seen: Cumulative::new(),
            dropped: Cumulative::new(),
            uncounted: Cumulative::new(),
            lru_evictions: Cumulative::new(),
            counts_at: None,
            recheck: false,
            conn_keys: HashMap::new(),
            conn_series: HashMap::new(),
            nat_admitted: HashSet::new(),
            nat_counted: HashMap::new(),
        };
        registry.register(
            "failures_seen",
            "Every failure that passed the filters, counted in the kernel (exact; equals \
             sum(portexhaust_failures_total) + portexhaust_failures_uncounted_total)",
            state.seen.counter.clone(),
        );
        registry.register(
            "failures_uncounted",
            "Failures whose (pid, destination, errno) key did not fit in the kernel's counts map",
            state.uncounted.counter.clone(),
        );
        registry.register(
            "dropped_events",
            "Failure events the ring buffer could not take (still counted)",
            state.dropped.counter.clone(),
        );
        registry.register(
            "lru_evictions",
            "Entries evicted from the kernel's bounded LRU maps",
            state.lru_evictions.counter.clone(),
        );
        Self {
            opts,
            registry,
            failures,
            in_use,
            range_size,
            utilisation,
            time_wait,
            eta,
            opened,
            durations,
            backend,
            nat_drops,
            nat_in_use,
            nat_range_size,
            nat_utilisation,
            state: Mutex::new(state),
        }
    }

    /// The NAT section's entries (`trace --catch nat`): the exact drop counters, which only
    /// grow (a key's count is added as its rise since the last update; the first `top_k` label
    /// sets keep their own series, later ones add into `dst="other"`), and the NAT's ports in
    /// use, range and utilisation, replaced at each update.
    pub fn set_nat(&self, entries: &[crate::schema::NatEntry]) {
        let mut st = self.state();
        self.nat_in_use.clear();
        self.nat_range_size.clear();
        self.nat_utilisation.clear();
        for e in entries {
            let own = NatLabels {
                router_netns: e.router_netns.to_string(),
                dst: e.dst.to_string(),
                nat_addr: e.nat_addr.to_string(),
                proto: e.proto.name().to_string(),
            };
            let rise = e
                .drops
                .saturating_sub(st.nat_counted.get(&own).copied().unwrap_or(0));
            st.nat_counted.insert(own.clone(), e.drops);
            if !st.nat_admitted.contains(&own) && st.nat_admitted.len() < self.opts.top_k {
                st.nat_admitted.insert(own.clone());
            }
            let labels = if st.nat_admitted.contains(&own) {
                own
            } else {
                NatLabels {
                    router_netns: String::new(),
                    dst: OTHER.to_string(),
                    nat_addr: String::new(),
                    proto: String::new(),
                }
            };
            self.nat_drops.get_or_create(&labels).inc_by(rise);
            if labels.dst == OTHER {
                continue;
            }
            if let Some(n) = e.in_use {
                self.nat_in_use.get_or_create(&labels).set(clamp_i64(n));
            }
            if let Some(r) = &e.range {
                let size = u64::from(r.hi.saturating_sub(r.lo)) + 1;
                self.nat_range_size
                    .get_or_create(&labels)
                    .set(clamp_i64(size));
            }
            if let Some(u) = e.utilisation {
                self.nat_utilisation.get_or_create(&labels).set(u);
            }
        }
    }

    fn state(&self) -> MutexGuard<'_, State> {
        // A panic while holding the lock leaves plain counters behind: keep serving them.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Remember which container the failing pid is in (the first attribution wins).
    pub fn observe_failure(&self, f: &Failure) {
        self.observe_container(f.pid, f.container.clone());
    }

    /// The container a failing process is in, for the labels of its exact counts.
    pub fn observe_container(&self, pid: u32, container: Option<Arc<ContainerInfo>>) {
        let mut st = self.state();
        if st.pid_containers.contains_key(&pid) {
            return;
        }
        if st.pid_containers.len() >= MAX_PIDS {
            st.pid_containers.clear();
        }
        st.pid_containers.insert(pid, container);
    }

    pub fn set_backend(&self, name: &str) {
        self.backend.clear();
        self.backend
            .get_or_create(&BackendLabels {
                backend: name.to_string(),
            })
            .set(1);
    }

    pub fn set_dropped(&self, total: u64) {
        self.state().dropped.set(total);
    }
    pub fn set_lru_evictions(&self, total: u64) {
        self.state().lru_evictions.set(total);
    }
    pub fn set_uncounted(&self, total: u64) {
        self.state().uncounted.set(total);
    }
    pub fn set_failures_seen(&self, total: u64) {
        self.state().seen.set(total);
    }

    fn container_labels(&self, c: Option<&ContainerInfo>) -> (String, String, String) {
        match c {
            Some(c) if self.opts.container_labels => (
                c.runtime.name().to_string(),
                c.id.clone(),
                c.pod.clone().unwrap_or_default(),
            ),
            _ => Default::default(),
        }
    }

    /// Give held label sets their counts once a scrape has served them at 0.
    ///
    /// Why hold them: Prometheus' rate() and increase() count a series' growth from its first
    /// sample on, so a series whose first sample is already 37 contributes nothing, and a
    /// burst from a new process (the usual exhaustion) would be invisible on every rate
    /// panel. Serving each new label set at 0 first gives them that starting point, at the
    /// cost of one scrape interval of delay for new series only.
    pub fn release_new_series(&self) {
        let mut guard = self.state();
        let st = &mut *guard;
        let scrapes = st.scrapes;
        st.held.retain(|labels, h| {
            if scrapes <= h.born_at_scrape {
                return true;
            }
            self.failures.get_or_create(labels).inc_by(h.pending);
            false
        });
        for (labels, c) in st.conn_series.iter_mut() {
            if !c.released && scrapes > c.born_at_scrape {
                c.released = true;
                self.publish_connects(labels, c);
            }
        }
    }

    /// Serve what a connect series has counted (once released).
    fn publish_connects(&self, labels: &ConnectLabels, c: &mut ConnSeries) {
        self.opened
            .get_or_create(labels)
            .inc_by(c.connects - c.published_connects);
        c.published_connects = c.connects;
        self.durations.get_or_create(labels).set(&c.hist);
    }

    /// Fold the connect statistics of the destination rows into the connect counter and
    /// histogram. Each kernel key is read once (every source address's row of a destination
    /// carries the same statistics) and adds what it grew by since the last update; an entry
    /// the kernel's LRU map evicted and made again restarts from zero, and counts again.
    fn update_connects(&self, rows: &[DestRow]) {
        let mut now: HashMap<ConnId, (u64, [u64; LATENCY_BUCKETS])> = HashMap::new();
        for r in rows {
            if r.connects.is_none() && r.latency_us.is_none() {
                continue;
            }
            let mut hist = [0u64; LATENCY_BUCKETS];
            if let Some(l) = &r.latency_us {
                for (h, n) in hist.iter_mut().zip(&l.buckets) {
                    *h = *n;
                }
            }
            now.insert(
                (r.netns, r.dst, r.proto.name().to_string()),
                (r.connects.unwrap_or(0), hist),
            );
        }
        let mut guard = self.state();
        let st = &mut *guard;
        if st.conn_keys.len() > MAX_CONN_KEYS {
            st.conn_keys.retain(|k, _| now.contains_key(k));
        }
        let mut fresh = Vec::new();
        for (k, (connects, hist)) in &now {
            match st.conn_keys.get_mut(k) {
                Some(known) => {
                    let restarted = *connects < known.connects
                        || hist.iter().zip(&known.hist).any(|(n, was)| n < was);
                    let (base_c, base_h) = if restarted {
                        (0, [0; LATENCY_BUCKETS])
                    } else {
                        (known.connects, known.hist)
                    };
                    if let Some(series) = st.conn_series.get_mut(&known.labels) {
                        series.connects += connects - base_c;
                        for ((s, n), b) in series.hist.iter_mut().zip(hist).zip(&base_h) {
                            *s += n - b;
                        }
                    }
                    known.connects = *connects;
                    known.hist = *hist;
                }
                None => fresh.push((k.clone(), *connects, *hist)),
            }
        }
        // Admission among newcomers: most connects first, then by destination.
        fresh.sort_by(|a, b| {
            b.1.cmp(&a.1)
                .then_with(|| a.0.1.cmp(&b.0.1))
                .then_with(|| a.0.0.cmp(&b.0.0))
        });
        for (k, connects, hist) in fresh {
            let own = ConnectLabels {
                netns: k.0.map(|n| n.to_string()).unwrap_or_default(),
                dst: k.1.to_string(),
                proto: k.2.clone(),
            };
            let admitted = st.conn_series.keys().filter(|l| l.dst != OTHER).count();
            let labels = if st.conn_series.contains_key(&own) || admitted < self.opts.top_k {
                own
            } else {
                ConnectLabels {
                    netns: String::new(),
                    dst: OTHER.to_string(),
                    proto: String::new(),
                }
            };
            let scrapes = st.scrapes;
            let series = st.conn_series.entry(labels.clone()).or_insert_with(|| {
                // Served at 0 until a scrape has seen it (see `release_new_series`).
                let _ = self.opened.get_or_create(&labels);
                let _ = self.durations.get_or_create(&labels);
                ConnSeries {
                    born_at_scrape: scrapes,
                    released: false,
                    connects: 0,
                    published_connects: 0,
                    hist: [0; LATENCY_BUCKETS],
                }
            });
            series.connects += connects;
            for (s, n) in series.hist.iter_mut().zip(&hist) {
                *s += n;
            }
            st.conn_keys.insert(
                k,
                ConnKey {
                    labels,
                    connects,
                    hist,
                },
            );
        }
        for (labels, c) in st.conn_series.iter_mut().filter(|(_, c)| c.released) {
            self.publish_connects(labels, c);
        }
    }

    /// Whether the kernel's counts need walking: the failure total moved since the last walk,
    /// or one more walk is owed (the total is bumped before the per-key count, so a walk
    /// racing a failure can see the new total but not yet its key). Also sets the totals.
    pub fn counts_changed(&self, failures_total: u64) -> bool {
        self.release_new_series();
        let mut st = self.state();
        let changed = st.counts_at != Some(failures_total);
        let walk = changed || st.recheck;
        st.recheck = changed;
        st.counts_at = Some(failures_total);
        walk
    }

    /// Fold the kernel's exact counts into the failure counters. `resolve_pid` is asked for the
    /// container of a pid no event has told about (a live process's /proc/PID/cgroup).
    pub fn update_counts(
        &self,
        counts: &[Exact],
        mut resolve_pid: impl FnMut(u32) -> Option<ContainerInfo>,
    ) {
        self.release_new_series();
        let mut guard = self.state();
        let st = &mut *guard;
        let mut fresh: Vec<(&Exact, String)> = Vec::new();
        for v in counts {
            let k = &v.id;
            match st.series.get_mut(k) {
                Some(s) => {
                    // An entry that vanished and came back restarts from zero.
                    let add = if v.count >= s.last {
                        v.count - s.last
                    } else {
                        v.count
                    };
                    s.last = v.count;
                    match st.held.get_mut(&s.labels) {
                        Some(h) => h.pending += add,
                        None => {
                            s.counter.inc_by(add);
                        }
                    }
                }
                None => fresh.push((v, k.dst.to_string())),
            }
        }
        // Admission order among newcomers: most failures first, then by destination.
        fresh.sort_by(|a, b| {
            b.0.count
                .cmp(&a.0.count)
                .then_with(|| a.1.cmp(&b.1))
                .then_with(|| a.0.id.cmp(&b.0.id))
        });
        for (v, dst) in fresh {
            let k = &v.id;
            let dst = if st.admitted.contains(&dst) {
                dst
            } else if st.admitted.len() < self.opts.top_k {
                st.admitted.insert(dst.clone());
                dst
            } else {
                OTHER.to_string()
            };
            let errno = match k.errno.name() {
                "UNKNOWN" => k.errno.0.to_string(),
                n => n.to_string(),
            };
            let proto = k.proto.name();
            let container = match st.pid_containers.get(&k.pid) {
                Some(c) => c.as_deref().cloned(),
                None if self.opts.container_labels => resolve_pid(k.pid),
                None => None,
            };
            let (container_runtime, container_id, pod_uid) =
                self.container_labels(container.as_ref());
            let mut labels = FailureLabels {
                comm: v.comm.clone(),
                errno,
                cause: k.cause.name().to_string(),
                proto: proto.to_string(),
                dst,
                container_runtime,
                container_id,
                pod_uid,
            };
            if st.label_sets.len() >= self.opts.max_series && !st.label_sets.contains(&labels) {
                labels = FailureLabels {
                    comm: OTHER.into(),
                    dst: OTHER.into(),
                    container_runtime: String::new(),
                    container_id: String::new(),
                    pod_uid: String::new(),
                    ..labels
                };
            }
            let counter = self.failures.get_or_create_owned(&labels);
            if st.label_sets.insert(labels.clone()) {
                st.held.insert(
                    labels.clone(),
                    Held {
                        born_at_scrape: st.scrapes,
                        pending: v.count,
                    },
                );
            } else if let Some(h) = st.held.get_mut(&labels) {
                h.pending += v.count;
            } else {
                counter.inc_by(v.count);
            }
            st.series.insert(
                *k,
                Series {
                    labels,
                    counter,
                    last: v.count,
                },
            );
        }
    }

    /// Replace the per-destination gauges: the `top_k` most utilised destinations (then most
    /// ports in use, then by name) keep their labels; the rest are folded into one
    /// `dst="other"` row (ports and TIME_WAIT summed, utilisation and range the highest, the
    /// forecast the soonest). Then fold the rows' connect statistics into their counters.
    pub fn set_destinations(&self, rows: &[DestRow]) {
        self.update_connects(rows);
        let mut merged: HashMap<DestLabels, DestinationGauge> = HashMap::new();
        for r in rows {
            let labels = DestLabels {
                netns: r.netns.map(|n| n.to_string()).unwrap_or_default(),
                src: r.src.map(|s| s.to_string()).unwrap_or_default(),
                dst: r.dst.to_string(),
                proto: r.proto.name().to_string(),
            };
            let g = DestinationGauge::from(r);
            merged
                .entry(labels)
                .and_modify(|m| fold_into(m, &g))
                .or_insert(g);
        }
        let mut ranked: Vec<(DestLabels, DestinationGauge)> = merged.into_iter().collect();
        ranked.sort_by(|a, b| {
            b.1.utilisation
                .total_cmp(&a.1.utilisation)
                .then_with(|| b.1.in_use.cmp(&a.1.in_use))
                .then_with(|| a.0.dst.cmp(&b.0.dst))
                .then_with(|| a.0.netns.cmp(&b.0.netns))
                .then_with(|| a.0.src.cmp(&b.0.src))
                .then_with(|| a.0.proto.cmp(&b.0.proto))
        });
        let mut other: Option<DestinationGauge> = None;
        for (labels, g) in ranked.split_off(ranked.len().min(self.opts.top_k)) {
            let _ = labels;
            match &mut other {
                Some(o) => fold_into(o, &g),
                None => other = Some(g),
            }
        }
        for fam in [&self.in_use, &self.range_size, &self.time_wait] {
            fam.clear();
        }
        self.utilisation.clear();
        self.eta.clear();
        let other = other.map(|g| {
            (
                DestLabels {
                    netns: String::new(),
                    src: String::new(),
                    dst: OTHER.to_string(),
                    proto: String::new(),
                },
                g,
            )
        });
        for (labels, g) in ranked.into_iter().chain(other) {
            self.in_use.get_or_create(&labels).set(clamp_i64(g.in_use));
            self.range_size
                .get_or_create(&labels)
                .set(clamp_i64(g.range_size));
            self.time_wait
                .get_or_create(&labels)
                .set(clamp_i64(g.time_wait));
            self.utilisation.get_or_create(&labels).set(g.utilisation);
            // No forecast, no sample: a +Inf or a stale value would read as one.
            if let Some(eta) = g.eta_s {
                self.eta.get_or_create(&labels).set(eta);
            }
        }
    }

    /// The exposition: OpenMetrics when `openmetrics`, else Prometheus text 0.0.4.
    pub fn encode(&self, openmetrics: bool) -> String {
        // Held while encoding: a label set born meanwhile must not count as served at 0.
        let mut st = self.state();
        let mut out = String::with_capacity(4096);
        let r = if openmetrics {
            text::encode(&mut out, &self.registry)
        } else {
            prometheus_text::encode(&mut out, &self.registry)
        };
        st.scrapes += 1;
        drop(st);
        if let Err(e) = r {
            // Writing into a String cannot fail; a label encoder could, so say so.
            let _ = writeln!(out, "# encoding error: {e}");
        }
        out
    }
}

fn clamp_i64(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

fn fold_into(into: &mut DestinationGauge, r: &DestinationGauge) {
    into.in_use += r.in_use;
    into.time_wait += r.time_wait;
    into.range_size = into.range_size.max(r.range_size);
    into.utilisation = into.utilisation.max(r.utilisation);
    into.eta_s = match (into.eta_s, r.eta_s) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    };
}

#[cfg(test)]
mod tests;
