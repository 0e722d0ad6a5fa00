//! Prometheus metrics for `portexhaust trace --metrics-addr ADDR`.
//!
//! What feeds it:
//! - [`Metrics::refresh_from_tracer`] (once a second from the trace loop): failure counters
//!   derived from the kernel's exact per-(pid, destination, errno) counts, never from
//!   ring-buffer events, which can be dropped; plus the kernel's global counters.
//! - [`Metrics::observe_failure`] (per decoded event, cheap: one hash lookup, no allocation
//!   once a pid is known): teaches which container each pid ran in, from the event's cgroup id.
//! - [`Metrics::set_destinations`], [`Metrics::set_lru_evictions`], [`Metrics::set_backend`]:
//!   per-destination port usage and bookkeeping, from whoever computes them.
//!
//! Cardinality is bounded. Destinations of the failure counters are admitted first come,
//! first served: the first [`MetricsOptions::top_k`] distinct destinations (within one refresh,
//! those with most failures first, then by name) get a series of their own for the life of the
//! process, and every later one is counted under `dst="other"`. Re-ranking would move counts
//! between series and make Prometheus see counter resets, so admission is never revoked. At
//! most [`MetricsOptions::max_series`] label sets exist; past that, new (pid, destination)
//! keys fold into `comm="other",dst="other"`. The per-destination gauges are re-ranked on
//! every update instead (gauges may go down): the `top_k` most utilised destinations are
//! shown, the rest summed into one `dst="other"` row.
//!
//! The server is hyper's HTTP/1.1 on tokio: `/metrics` (OpenMetrics when the scraper asks for
//! it, as Prometheus does, else the Prometheus 0.0.4 text format) and a small page at `/`.
use std::{
    collections::{HashMap, HashSet},
    convert::Infallible,
    fmt::Write as _,
    net::{IpAddr, Ipv4Addr, SocketAddr},
    sync::{Arc, Mutex, MutexGuard},
    time::Duration,
};

use bytes::Bytes;
use http_body_util::Full;
use hyper::{Method, Request, Response, StatusCode, body::Incoming, header, service::service_fn};
use hyper_util::rt::{TokioIo, TokioTimer};
use log::{debug, warn};
use portexhaust_common::{CountKey, CountValue};
use prometheus_client::{
    encoding::{EncodeLabelSet, prometheus_text, text},
    metrics::{counter::Counter, family::Family, gauge::Gauge, info::Info},
    registry::Registry,
};
use tokio::{net::TcpListener, sync::Semaphore, task::JoinHandle};

use crate::{
    aggregate::dst_string,
    container::{ContainerInfo, Resolver},
    error::{Error, Result},
    kernel::loader::Tracer,
    model::{Failure, comm_str, errno_name},
};

/// Label value of everything folded together.
pub const OTHER: &str = "other";

/// Parse `--metrics-addr`: `PORT` (loopback), `IP:PORT`, `[IPv6]:PORT` or `localhost:PORT`.
pub fn parse_addr(s: &str) -> std::result::Result<SocketAddr, String> {
    let bad = || {
        format!(
            "invalid metrics address {s:?}: expected PORT (serves on 127.0.0.1), IP:PORT or [IPv6]:PORT, \
             e.g. 9977, 0.0.0.0:9977 or [::1]:9977"
        )
    };
    let s = s.trim();
    if !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit()) {
        let port: u16 = s.parse().map_err(|_| bad())?;
        return Ok(SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), port));
    }
    if let Ok(a) = s.parse::<SocketAddr>() {
        return Ok(a);
    }
    if let Some(port) = s.strip_prefix("localhost:") {
        let port: u16 = port.parse().map_err(|_| bad())?;
        return Ok(SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), port));
    }
    Err(bad())
}

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
    pub proto: String,
    /// `ip:port`, `[ipv6]:port`, or `other`.
    pub dst: String,
    /// docker, containerd, cri-o, podman, cri, systemd; empty when none or labels are off.
    pub container_runtime: String,
    /// 64-hex container id or systemd unit name; empty when none.
    pub container_id: String,
    pub pod_uid: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct DestLabels {
    /// Network namespace inode; empty for `other` or unknown.
    pub netns: String,
    pub src: String,
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

/// One destination's port usage, as computed by the blame/census code.
#[derive(Clone, Debug, PartialEq)]
pub struct DestinationGauge {
    /// Network namespace inode (None: unknown).
    pub netns: Option<u64>,
    /// Local address the ports are taken on (None: any).
    pub src: Option<IpAddr>,
    /// `ip:port` or `[ipv6]:port`.
    pub dst: String,
    pub proto: &'static str,
    pub range_size: u64,
    pub in_use: u64,
    /// in_use / range_size, 0.0..=1.0.
    pub utilisation: f64,
    pub time_wait: u64,
}

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
    series: HashMap<CountKey, Series>,
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
    /// walk is owed: the total is bumped before the per-key count, so a walk racing a failure
    /// can see the new total but not yet its key.
    counts_at: Option<u64>,
    recheck: bool,
}

pub struct Metrics {
    opts: MetricsOptions,
    registry: Registry,
    failures: Family<FailureLabels, Counter>,
    in_use: Family<DestLabels, Gauge>,
    range_size: Family<DestLabels, Gauge>,
    utilisation: Family<DestLabels, Gauge<f64, std::sync::atomic::AtomicU64>>,
    time_wait: Family<DestLabels, Gauge>,
    backend: Family<BackendLabels, Gauge>,
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
            "Port-exhaustion failures by command, errno, destination (top-K, rest as dst=\"other\") \
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
            backend,
            state: Mutex::new(state),
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
    }

    /// Fold the kernel's exact counts into the failure counters. `resolve_pid` is asked for the
    /// container of a pid no event has told about (a live process's /proc/PID/cgroup).
    pub fn update_counts(
        &self,
        counts: &[(CountKey, CountValue)],
        mut resolve_pid: impl FnMut(u32) -> Option<ContainerInfo>,
    ) {
        self.release_new_series();
        let mut guard = self.state();
        let st = &mut *guard;
        let mut fresh: Vec<(&CountKey, &CountValue, String)> = Vec::new();
        for (k, v) in counts {
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
                None => fresh.push((k, v, dst_string(k))),
            }
        }
        // Admission order among newcomers: most failures first, then by destination.
        fresh.sort_by(|a, b| {
            b.1.count
                .cmp(&a.1.count)
                .then_with(|| a.2.cmp(&b.2))
                .then_with(|| a.0.cmp(b.0))
        });
        for (k, v, dst) in fresh {
            let dst = if st.admitted.contains(&dst) {
                dst
            } else if st.admitted.len() < self.opts.top_k {
                st.admitted.insert(dst.clone());
                dst
            } else {
                OTHER.to_string()
            };
            let errno = match errno_name(u32::from(k.errno)) {
                "UNKNOWN" => k.errno.to_string(),
                n => n.to_string(),
            };
            let proto = match k.proto {
                portexhaust_common::IPPROTO_TCP => "tcp",
                portexhaust_common::IPPROTO_UDP => "udp",
                _ => "",
            };
            let container = match st.pid_containers.get(&k.pid) {
                Some(c) => c.as_deref().cloned(),
                None if self.opts.container_labels => resolve_pid(k.pid),
                None => None,
            };
            let (container_runtime, container_id, pod_uid) =
                self.container_labels(container.as_ref());
            let mut labels = FailureLabels {
                comm: comm_str(&v.comm),
                errno,
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
    /// `dst="other"` row (ports and TIME_WAIT summed, utilisation and range the highest).
    pub fn set_destinations(&self, rows: &[DestinationGauge]) {
        let mut merged: HashMap<DestLabels, DestinationGauge> = HashMap::new();
        for r in rows {
            let labels = DestLabels {
                netns: r.netns.map(|n| n.to_string()).unwrap_or_default(),
                src: r.src.map(|s| s.to_string()).unwrap_or_default(),
                dst: r.dst.clone(),
                proto: r.proto.to_string(),
            };
            merged
                .entry(labels)
                .and_modify(|m| fold_into(m, r))
                .or_insert_with(|| r.clone());
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
        }
    }

    /// Read the kernel's counters and, when failures happened since the last walk, its exact
    /// counts. Called once a second by the trace loop.
    pub fn refresh_from_tracer(&self, tracer: &Tracer, containers: &Resolver) -> Result<()> {
        self.release_new_series();
        let seen = tracer.failures_total()?;
        self.set_dropped(tracer.dropped_events()?);
        self.set_uncounted(tracer.uncounted_keys()?);
        let walk = {
            let mut st = self.state();
            let changed = st.counts_at != Some(seen);
            let walk = changed || st.recheck;
            st.recheck = changed;
            st.counts_at = Some(seen);
            walk
        };
        if walk {
            let counts = tracer.counts()?;
            self.update_counts(&counts, |pid| containers.by_pid(pid));
        }
        self.set_failures_seen(seen);
        Ok(())
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
}

// ---------------------------------------------------------------------------------------------
// HTTP.

const OPENMETRICS_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";
const INDEX: &str = "<!doctype html><html><head><title>portexhaust</title></head><body>\
<h1>portexhaust</h1><p>Linux ephemeral-port exhaustion tracer.</p>\
<p><a href=\"/metrics\">/metrics</a></p></body></html>\n";
/// Connections served at once; more wait in the kernel's accept queue.
const MAX_CONNECTIONS: usize = 32;

fn respond(
    status: StatusCode,
    ctype: &'static str,
    body: impl Into<Bytes>,
) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(body.into()));
    *r.status_mut() = status;
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static(ctype),
    );
    r
}

/// Route one request. Only GET and HEAD; `/metrics` negotiates its format from `Accept`.
pub fn handle<B>(metrics: &Metrics, req: &Request<B>) -> Response<Full<Bytes>> {
    if req.method() != Method::GET && req.method() != Method::HEAD {
        let mut r = respond(
            StatusCode::METHOD_NOT_ALLOWED,
            "text/plain; charset=utf-8",
            "only GET and HEAD\n",
        );
        r.headers_mut()
            .insert(header::ALLOW, header::HeaderValue::from_static("GET, HEAD"));
        return r;
    }
    match req.uri().path() {
        "/metrics" => {
            let openmetrics = req
                .headers()
                .get_all(header::ACCEPT)
                .iter()
                .filter_map(|v| v.to_str().ok())
                .any(|v| v.contains("application/openmetrics-text"));
            let (ctype, body) = if openmetrics {
                (OPENMETRICS_TYPE, metrics.encode(true))
            } else {
                (prometheus_text::CONTENT_TYPE, metrics.encode(false))
            };
            respond(StatusCode::OK, ctype, body)
        }
        "/" => respond(StatusCode::OK, "text/html; charset=utf-8", INDEX),
        _ => respond(
            StatusCode::NOT_FOUND,
            "text/plain; charset=utf-8",
            "not found: try /metrics\n",
        ),
    }
}

/// A running metrics server; dropping it stops accepting.
pub struct MetricsServer {
    pub addr: SocketAddr,
    task: JoinHandle<()>,
}

impl Drop for MetricsServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Bind `addr` now (so a taken port is an error before tracing starts) and serve in the
/// background on the current tokio runtime.
pub async fn serve(addr: SocketAddr, metrics: Arc<Metrics>) -> Result<MetricsServer> {
    let listener = TcpListener::bind(addr)
        .await
        .map_err(|e| Error::io(format!("serving metrics on {addr}"), e))?;
    let addr = listener
        .local_addr()
        .map_err(|e| Error::io("reading the metrics address", e))?;
    let task = tokio::spawn(accept_loop(listener, metrics));
    Ok(MetricsServer { addr, task })
}

async fn accept_loop(listener: TcpListener, metrics: Arc<Metrics>) {
    let slots = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    loop {
        let Ok(permit) = slots.clone().acquire_owned().await else {
            return;
        };
        let stream = match listener.accept().await {
            Ok((s, _)) => s,
            Err(e) => {
                // EMFILE and friends: back off instead of spinning.
                warn!("metrics server: accept: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let m = metrics.clone();
        tokio::spawn(async move {
            let svc = service_fn(move |req: Request<Incoming>| {
                let r = handle(&m, &req);
                async move { Ok::<_, Infallible>(r) }
            });
            let conn = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                // A client that never finishes its headers must not hold a slot forever.
                .header_read_timeout(Duration::from_secs(10))
                .serve_connection(TokioIo::new(stream), svc);
            if let Err(e) = conn.await {
                debug!("metrics server: connection: {e}");
            }
            drop(permit);
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{
        container::Runtime,
        model::{Family as AddrFamily, Proto, comm_bytes},
    };
    use portexhaust_common::{AF_INET, Backend, IPPROTO_TCP, Site};

    fn key(pid: u32, last_octet: u8, port: u16) -> CountKey {
        let mut daddr = [0u8; 16];
        daddr[..4].copy_from_slice(&[10, 0, 0, last_octet]);
        CountKey {
            pid,
            dport: port,
            family: AF_INET,
            errno: 99,
            proto: IPPROTO_TCP,
            cause: 1,
            _pad: [0; 4],
            daddr,
        }
    }

    fn val(count: u64, comm: &str) -> CountValue {
        CountValue {
            count,
            first_ns: 0,
            last_ns: 0,
            comm: comm_bytes(comm),
            unstreamed: 0,
        }
    }

    fn failure(pid: u32, container: Option<ContainerInfo>) -> Failure {
        Failure {
            ts_unix_ns: 0,
            pid,
            tid: pid,
            uid: 0,
            comm: "app".into(),
            cgroup_id: 1,
            netns: None,
            family: AddrFamily::Ipv4,
            proto: Proto::Tcp,
            dst: "10.0.0.1:80".parse().expect("addr"),
            src: None,
            errno: 99,
            site: Site::InetHashConnect,
            backend: Backend::Tracepoint,
            container: container.map(Arc::new),
        }
    }

    /// value of the sample line starting with `prefix` in the Prometheus text output.
    fn sample(text: &str, prefix: &str) -> Option<f64> {
        text.lines()
            .find(|l| l.starts_with(prefix))
            .and_then(|l| l.rsplit(' ').next())
            .and_then(|v| v.parse().ok())
    }

    /// One scrape, then the next refresh: what Prometheus sees a second later.
    fn settle(m: &Metrics) {
        m.encode(false);
        m.release_new_series();
    }

    fn docker() -> ContainerInfo {
        ContainerInfo {
            runtime: Runtime::Docker,
            id: "ab".repeat(32),
            pod: None,
        }
    }

    #[test]
    fn addresses() {
        assert_eq!(parse_addr("9977"), Ok("127.0.0.1:9977".parse().expect("a")));
        assert_eq!(
            parse_addr("0.0.0.0:9100"),
            Ok("0.0.0.0:9100".parse().expect("a"))
        );
        assert_eq!(
            parse_addr("[::1]:9100"),
            Ok("[::1]:9100".parse().expect("a"))
        );
        assert_eq!(
            parse_addr("localhost:80"),
            Ok("127.0.0.1:80".parse().expect("a"))
        );
        for bad in [
            "", "70000", "host:1", "::1:9100", ":9100", "1.2.3.4", "[::1]", "x",
        ] {
            let e = parse_addr(bad).expect_err(bad);
            assert!(e.contains("invalid metrics address"), "{e}");
        }
    }

    #[test]
    fn failure_counters_follow_the_kernel_counts_exactly() {
        let m = Metrics::new(MetricsOptions::default());
        m.observe_failure(&failure(7, Some(docker())));
        m.update_counts(&[(key(7, 1, 80), val(5, "app"))], |_| None);
        settle(&m);
        m.update_counts(
            &[
                (key(7, 1, 80), val(12, "app")),
                (key(8, 2, 443), val(3, "curl")),
            ],
            |pid| (pid == 8).then(docker),
        );
        settle(&m);
        let t = m.encode(false);
        let hex = "ab".repeat(32);
        assert_eq!(
            sample(
                &t,
                &format!(
                    "portexhaust_failures_total{{comm=\"app\",errno=\"EADDRNOTAVAIL\",proto=\"tcp\",dst=\"10.0.0.1:80\",container_runtime=\"docker\",container_id=\"{hex}\",pod_uid=\"\"}}"
                )
            ),
            Some(12.0),
            "{t}"
        );
        assert_eq!(
            sample(&t, "portexhaust_failures_total{comm=\"curl\""),
            Some(3.0),
            "{t}"
        );
    }

    #[test]
    fn new_series_are_served_at_zero_before_their_count() {
        let m = Metrics::new(MetricsOptions::default());
        let series = "portexhaust_failures_total{comm=\"app\"";
        m.update_counts(&[(key(7, 1, 80), val(5, "app"))], |_| None);
        // No scrape yet: a refresh does not release it.
        m.release_new_series();
        m.update_counts(&[(key(7, 1, 80), val(9, "app"))], |_| None);
        assert_eq!(sample(&m.encode(false), series), Some(0.0));
        // Served at 0 once: the next refresh gives it everything counted meanwhile.
        m.release_new_series();
        assert_eq!(sample(&m.encode(false), series), Some(9.0));
        // A new key of an existing label set (another pid, same comm and destination) is not
        // held: its series already has a starting point.
        m.update_counts(
            &[
                (key(7, 1, 80), val(9, "app")),
                (key(8, 1, 80), val(2, "app")),
            ],
            |_| None,
        );
        assert_eq!(sample(&m.encode(false), series), Some(11.0));
    }

    #[test]
    fn container_labels_can_be_turned_off() {
        let m = Metrics::new(MetricsOptions {
            container_labels: false,
            ..Default::default()
        });
        m.observe_failure(&failure(7, Some(docker())));
        m.update_counts(&[(key(7, 1, 80), val(5, "app"))], |_| panic!("not asked"));
        settle(&m);
        let t = m.encode(false);
        assert!(
            t.contains("container_runtime=\"\",container_id=\"\",pod_uid=\"\"} 5"),
            "{t}"
        );
    }

    #[test]
    fn destinations_beyond_top_k_fold_into_other_and_stay_there() {
        let m = Metrics::new(MetricsOptions {
            top_k: 2,
            ..Default::default()
        });
        // Three newcomers at once: the two with most failures are admitted.
        m.update_counts(
            &[
                (key(1, 1, 80), val(1, "a")),
                (key(1, 2, 80), val(9, "a")),
                (key(1, 3, 80), val(5, "a")),
            ],
            |_| None,
        );
        settle(&m);
        // Later, 10.0.0.1 grows past everyone: it stays in `other` (no counter resets).
        m.update_counts(
            &[
                (key(1, 1, 80), val(100, "a")),
                (key(1, 2, 80), val(9, "a")),
                (key(1, 3, 80), val(5, "a")),
                (key(2, 2, 80), val(4, "b")),
            ],
            |_| None,
        );
        settle(&m);
        let t = m.encode(false);
        let s = |dst: &str, comm: &str| {
            sample(
                &t,
                &format!(
                    "portexhaust_failures_total{{comm=\"{comm}\",errno=\"EADDRNOTAVAIL\",proto=\"tcp\",dst=\"{dst}\""
                ),
            )
        };
        assert_eq!(s("10.0.0.2:80", "a"), Some(9.0), "{t}");
        assert_eq!(s("10.0.0.3:80", "a"), Some(5.0), "{t}");
        assert_eq!(s("other", "a"), Some(100.0), "{t}");
        // An admitted destination is shared by every process.
        assert_eq!(s("10.0.0.2:80", "b"), Some(4.0), "{t}");
    }

    #[test]
    fn series_are_capped() {
        let m = Metrics::new(MetricsOptions {
            max_series: 2,
            ..Default::default()
        });
        let counts: Vec<_> = (1..=4)
            .map(|pid| (key(pid, 1, 80), val(u64::from(pid), &format!("c{pid}"))))
            .collect();
        m.update_counts(&counts, |_| None);
        settle(&m);
        let t = m.encode(false);
        let lines = t
            .lines()
            .filter(|l| l.starts_with("portexhaust_failures_total{"))
            .count();
        assert_eq!(lines, 3, "{t}");
        // Admission by count: c4 (4) and c3 (3) keep their names; c2 + c1 fold.
        assert_eq!(
            sample(&t, "portexhaust_failures_total{comm=\"other\""),
            Some(3.0),
            "{t}"
        );
    }

    #[test]
    fn kernel_totals_are_monotonic_counters() {
        let m = Metrics::new(MetricsOptions::default());
        m.set_dropped(5);
        m.set_dropped(3); // never goes back
        m.set_dropped(8);
        m.set_failures_seen(10);
        m.set_lru_evictions(2);
        let t = m.encode(false);
        assert_eq!(
            sample(&t, "portexhaust_dropped_events_total "),
            Some(8.0),
            "{t}"
        );
        assert_eq!(sample(&t, "portexhaust_failures_seen_total "), Some(10.0));
        assert_eq!(sample(&t, "portexhaust_lru_evictions_total "), Some(2.0));
        assert_eq!(
            sample(&t, "portexhaust_failures_uncounted_total "),
            Some(0.0)
        );
    }

    #[test]
    fn destination_gauges_rank_and_fold() {
        let m = Metrics::new(MetricsOptions {
            top_k: 1,
            ..Default::default()
        });
        let row = |dst: &str, in_use: u64, tw: u64| DestinationGauge {
            netns: Some(4026531840),
            src: Some("127.0.0.1".parse().expect("ip")),
            dst: dst.into(),
            proto: "tcp",
            range_size: 100,
            in_use,
            utilisation: in_use as f64 / 100.0,
            time_wait: tw,
        };
        m.set_destinations(&[
            row("10.0.0.1:80", 10, 1),
            row("10.0.0.2:80", 90, 80),
            row("10.0.0.3:80", 20, 5),
        ]);
        let t = m.encode(false);
        let top = "{netns=\"4026531840\",src=\"127.0.0.1\",dst=\"10.0.0.2:80\",proto=\"tcp\"}";
        let other = "{netns=\"\",src=\"\",dst=\"other\",proto=\"\"}";
        assert_eq!(
            sample(&t, &format!("portexhaust_ports_in_use{top}")),
            Some(90.0),
            "{t}"
        );
        assert_eq!(
            sample(&t, &format!("portexhaust_port_utilisation_ratio{top}")),
            Some(0.9)
        );
        assert_eq!(
            sample(&t, &format!("portexhaust_ports_in_use{other}")),
            Some(30.0)
        );
        assert_eq!(
            sample(&t, &format!("portexhaust_time_wait_sockets{other}")),
            Some(6.0)
        );
        assert_eq!(
            sample(&t, &format!("portexhaust_port_utilisation_ratio{other}")),
            Some(0.2)
        );
        // A new set replaces the old one entirely.
        m.set_destinations(&[row("10.0.0.9:80", 1, 0)]);
        let t = m.encode(false);
        assert!(!t.contains("10.0.0.2:80"), "{t}");
        assert_eq!(
            sample(&t, &format!("portexhaust_ports_in_use{other}")),
            None,
            "{t}"
        );
    }

    #[test]
    fn info_and_backend() {
        let m = Metrics::new(MetricsOptions::default());
        m.set_backend("kprobe");
        m.set_backend("tracepoint");
        let t = m.encode(false);
        assert_eq!(
            sample(&t, "portexhaust_backend{backend=\"tracepoint\"}"),
            Some(1.0),
            "{t}"
        );
        assert!(!t.contains("kprobe"), "{t}");
        assert!(
            t.contains(&format!(
                "portexhaust_build_info{{version=\"{}\"",
                env!("CARGO_PKG_VERSION")
            )),
            "{t}"
        );
        let om = m.encode(true);
        assert!(om.ends_with("# EOF\n"), "{om}");
    }

    /// Every metric and label the Grafana dashboard queries is one this exporter serves
    /// (`instance` and `job` are added by Prometheus). The fleet test runs the queries too.
    #[test]
    fn dashboard_queries_only_exported_metrics_and_labels() {
        let dash: serde_json::Value = serde_json::from_str(include_str!(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../deploy/grafana/portexhaust.json"
        )))
        .expect("dashboard is JSON");
        let m = Metrics::new(MetricsOptions::default());
        m.update_counts(&[(key(1, 1, 80), val(1, "a"))], |_| None);
        m.set_destinations(&[DestinationGauge {
            netns: Some(1),
            src: None,
            dst: "10.0.0.1:80".into(),
            proto: "tcp",
            range_size: 10,
            in_use: 1,
            utilisation: 0.1,
            time_wait: 0,
        }]);
        m.set_backend("tracepoint");
        let text = m.encode(false);
        let mut names: HashSet<String> = HashSet::new();
        let mut labels: HashSet<String> = ["instance", "job"].map(String::from).into();
        for l in text.lines().filter(|l| !l.starts_with('#')) {
            let (name, rest) = l
                .split_once('{')
                .unwrap_or((l.split(' ').next().unwrap_or(""), ""));
            names.insert(name.to_string());
            for pair in rest.split("\",").filter(|p| p.contains('=')) {
                labels.insert(pair.split('=').next().unwrap_or("").to_string());
            }
        }
        let mut exprs = Vec::new();
        let mut ids = HashSet::new();
        for p in dash["panels"].as_array().expect("panels") {
            assert!(
                ids.insert(p["id"].as_u64().expect("id")),
                "duplicate panel id"
            );
            for t in p["targets"].as_array().into_iter().flatten() {
                exprs.push(t["expr"].as_str().expect("expr").to_string());
            }
        }
        assert!(exprs.len() >= 10, "{exprs:?}");
        let ident = |c: char| c.is_ascii_alphanumeric() || c == '_';
        for e in &exprs {
            for word in e
                .split(|c: char| !ident(c))
                .filter(|w| w.starts_with("portexhaust_"))
            {
                assert!(
                    names.contains(word),
                    "{word} in {e:?} is not exported: {names:?}"
                );
            }
            for clause in e.split(" by (").skip(1).chain(e.split(" on (").skip(1)) {
                let inside = clause.split(')').next().unwrap_or("");
                for label in inside.split(',').map(str::trim).filter(|l| !l.is_empty()) {
                    assert!(labels.contains(label), "label {label} in {e:?}: {labels:?}");
                }
            }
        }
    }

    #[test]
    fn http_routes() {
        let m = Metrics::new(MetricsOptions::default());
        let get = |path: &str, accept: Option<&str>| {
            let mut b = Request::builder().uri(path);
            if let Some(a) = accept {
                b = b.header(header::ACCEPT, a);
            }
            handle(&m, &b.body(()).expect("request"))
        };
        let r = get("/metrics", None);
        assert_eq!(r.status(), StatusCode::OK);
        assert_eq!(
            r.headers()[header::CONTENT_TYPE],
            prometheus_text::CONTENT_TYPE
        );
        let r = get(
            "/metrics",
            Some("application/openmetrics-text;version=1.0.0,text/plain;version=0.0.4;q=0.5"),
        );
        assert_eq!(r.headers()[header::CONTENT_TYPE], OPENMETRICS_TYPE);
        assert_eq!(get("/", None).status(), StatusCode::OK);
        assert_eq!(get("/nope", None).status(), StatusCode::NOT_FOUND);
        let post = Request::builder()
            .method(Method::POST)
            .uri("/metrics")
            .body(())
            .expect("request");
        assert_eq!(handle(&m, &post).status(), StatusCode::METHOD_NOT_ALLOWED);
    }
}
