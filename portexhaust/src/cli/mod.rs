//! The command line: one struct per command, and the argument groups several commands share
//! (declared once, flattened into each). Commands take their arguments as they are parsed.
mod report;

use std::{net::SocketAddr, path::PathBuf, time::Duration};

use clap::{ArgAction, Args, Parser, Subcommand, ValueEnum};
use portexhaust_common::{Backend, KIND_ALL, KINDS, kind_from_name};
use portexhaust_workload::Scenario;

pub use self::report::{Format, ReportArgs, parse_time};
use crate::{
    advice::explain::Topic,
    kernel::loader::{BackendRequest, DEFAULT_MAX_COUNT_KEYS, DEFAULT_MAX_TRACKED, Filters},
    output::http::parse_addr,
};

const EXAMPLES: &str = "\
Examples:
  sudo portexhaust trace                       # every exhaustion failure, live, then offenders
  sudo portexhaust trace --json | jq .         # NDJSON for pipelines
  sudo portexhaust trace --pid 4242 --duration 60
  sudo portexhaust trace -n python3 -P 27017,443 -d 30   # bcc-style short options
  sudo portexhaust trace --container 4f1c2a9b8e7d -o json
  sudo portexhaust trace --cgroup /kubepods.slice/kubepods-burstable.slice
  sudo portexhaust top                         # live: destinations by pressure, failers, holders
  sudo portexhaust top --json --netns /run/netns/app
  sudo portexhaust trace --metrics-addr 9977      # Prometheus metrics on 127.0.0.1:9977
  sudo portexhaust selftest                    # does it work on this kernel?
  sudo portexhaust trace --record incident.ndjson
  sudo portexhaust trace --record /var/lib/portexhaust/rec.ndjson --record-max-size 64M --record-keep 4
  portexhaust report /var/lib/portexhaust/rec.ndjson*   # rotated parts, in any order: one run
  portexhaust report incident.ndjson --format html -o incident.html
  sudo portexhaust doctor                      # what to fix on this host, now
  portexhaust doctor --explain tcp_tw_recycle";

#[derive(Parser, Debug)]
#[command(
    name = "portexhaust",
    version,
    about = "Catch Linux ephemeral-port exhaustion (EADDRNOTAVAIL, errno 99) as it happens and say who caused it",
    after_help = EXAMPLES
)]
pub struct Cli {
    /// More diagnostics on stderr: -v info, -vv debug (RUST_LOG, when set, decides instead).
    #[arg(short, long, action = ArgAction::Count, global = true)]
    pub verbose: u8,
    #[command(subcommand)]
    pub cmd: Cmd,
}

impl Cli {
    /// Parse the command line, exiting with clap's usage error (status 2) on arguments that
    /// parse but contradict each other.
    pub fn parse_checked() -> Self {
        let mut cli = Self::parse();
        if let Err(msg) = cli.fold_output() {
            use clap::CommandFactory as _;
            Self::command()
                .error(clap::error::ErrorKind::ArgumentConflict, msg)
                .exit();
        }
        cli
    }

    /// `-o json` turns on the command's `--json`, so that one flag is read downstream.
    pub fn fold_output(&mut self) -> Result<(), String> {
        match &mut self.cmd {
            Cmd::Trace(a) => a.output.fold(&mut a.json),
            Cmd::Top(a) => a.output.fold(&mut a.json),
            Cmd::Doctor(a) => a.output.fold(&mut a.json),
            _ => Ok(()),
        }
    }

    /// The `log` filter `--verbose` asks for.
    pub fn log_filter(&self) -> &'static str {
        match self.verbose {
            0 => "warn",
            1 => "info",
            2 => "debug",
            _ => "trace",
        }
    }
}

#[derive(Subcommand, Debug)]
pub enum Cmd {
    /// Stream every port-exhaustion failure live, then summarise the offenders.
    ///
    /// Catches TCP connect() EADDRNOTAVAIL (IPv4, IPv6, v4-mapped) with the kernel site,
    /// bind(port 0) EADDRINUSE and UDP autobind EAGAIN. Counts are exact (kept in the kernel)
    /// even when the ring buffer overflows. Stops on Ctrl-C, SIGTERM or --duration.
    Trace(TraceArgs),
    /// Live view of port pressure: destinations by utilisation, failing processes, and who
    /// holds the ports (the processes that created ESTABLISHED/TIME_WAIT sockets, alive or
    /// exited). q quits.
    Top(TopArgs),
    /// The blame report after the fact, from one or more `trace --record` files: timeline,
    /// offenders, holders, destinations, settings and what to change.
    Report(ReportArgs),
    /// Audit this network namespace now: range, reserved ports, TIME_WAIT settings and counters,
    /// busy destinations, bind() before connect(); each finding with a concrete fix.
    Doctor(DoctorArgs),
    /// Check that tracing works on this kernel: exhaust a private network namespace for real
    /// and compare what the tracer saw with what the workload saw.
    Selftest(SelftestArgs),
    /// Print a shell completion script.
    Completions {
        #[arg(value_enum)]
        shell: clap_complete::Shell,
    },
    /// Exhaust ports in a private network namespace (test and benchmark load generator).
    #[command(hide = true)]
    Workload(WorkloadArgs),
    /// One end of a source-NAT exhaustion, in a namespace the caller made (vmtest's NAT
    /// scenario): `server` keeps every connection; `client` connects COUNT times through the NAT
    /// and prints {"pid","ok","failed"}.
    #[command(hide = true)]
    WorkloadNat(WorkloadNatArgs),
    /// Write the man pages (portexhaust.1 and one per command) into a directory, for packages.
    #[command(hide = true)]
    Manpages(ManpagesArgs),
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum BackendArg {
    /// The cheapest this kernel runs: tp-btf, raw-tp, fentry, kprobe, tracepoint
    Auto,
    /// BTF raw tracepoint on inet_sock_set_state: typed direct loads, no syscall hook (5.5+)
    TpBtf,
    /// Plain raw tracepoint on inet_sock_set_state, reading through BTF offsets
    RawTp,
    /// fentry/fexit on tcp_v{4,6}_connect and inet{,6}_hash_connect (BTF trampolines)
    Fentry,
    /// kprobe/kretprobe on tcp_v{4,6}_connect and __inet_hash_connect
    Kprobe,
    /// The perf tracepoint sock:inet_sock_set_state (stable record, works without BTF)
    Tracepoint,
}

impl From<BackendArg> for BackendRequest {
    fn from(b: BackendArg) -> Self {
        match b {
            BackendArg::Auto => Self::Auto,
            BackendArg::TpBtf => Self::Only(Backend::TpBtf),
            BackendArg::RawTp => Self::Only(Backend::RawTp),
            BackendArg::Fentry => Self::Only(Backend::Fentry),
            BackendArg::Kprobe => Self::Only(Backend::Kprobe),
            BackendArg::Tracepoint => Self::Only(Backend::Tracepoint),
        }
    }
}

/// Output formats as Inspektor Gadget's `-o` names them.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum OutputFormat {
    /// The command's JSON (NDJSON for streams): the same as --json
    Json,
    /// Text for people (the default)
    Text,
}

/// `-o json|text`, beside `--json`, for the commands that print either.
#[derive(Args, Clone, Copy, Debug, Default)]
pub struct OutputArg {
    /// Output format: json (the same as --json) or text.
    #[arg(short = 'o', long = "output", value_enum, value_name = "FORMAT")]
    pub format: Option<OutputFormat>,
}

impl OutputArg {
    /// Fold `-o` into the command's `--json`; `-o text` with `--json` is a contradiction.
    fn fold(self, json: &mut bool) -> Result<(), String> {
        match (self.format, *json) {
            (Some(OutputFormat::Text), true) => {
                Err("-o text contradicts --json: give one of them".into())
            }
            (Some(OutputFormat::Json), _) => {
                *json = true;
                Ok(())
            }
            _ => Ok(()),
        }
    }
}

/// `--backend`, for every command that loads the programs.
#[derive(Args, Clone, Debug)]
pub struct BackendArgs {
    /// Probe backend.
    #[arg(long, value_enum, default_value = "auto")]
    pub backend: BackendArg,
}

impl BackendArgs {
    pub fn request(&self) -> BackendRequest {
        self.backend.into()
    }
}

/// `--max-tracked-sockets`, for every command that tracks socket ownership.
#[derive(Args, Clone, Debug)]
pub struct TrackingArgs {
    /// Size of each in-kernel socket-ownership map (LRU: the oldest are dropped and counted
    /// as evictions when full).
    #[arg(long, value_name = "N", default_value_t = DEFAULT_MAX_TRACKED,
          value_parser = clap::value_parser!(u32).range(16..=4_194_304))]
    pub max_tracked_sockets: u32,
}

/// Which failures `trace` reports. Every filter is applied in the kernel: what it drops is
/// neither counted nor streamed. The short options are bcc's (opensnoop, execsnoop, tcpconnect).
#[derive(Args, Clone, Debug, Default)]
pub struct FilterArgs {
    /// Only these process ids (repeatable, or comma-separated: -p 4242,4243).
    #[arg(short = 'p', long, value_name = "PID", value_delimiter = ',')]
    pub pid: Vec<u32>,
    /// Only this command name, exactly as in /proc/PID/comm (repeatable).
    #[arg(short = 'n', long, value_name = "NAME", value_parser = parse_comm)]
    pub comm: Vec<String>,
    /// Only failures towards these destination ports (repeatable, or comma-separated:
    /// -P 443,27017; bind(): the local port, 0).
    #[arg(
        short = 'P',
        long,
        visible_alias = "port",
        value_name = "PORT",
        value_delimiter = ','
    )]
    pub dport: Vec<u16>,
    /// Only processes in this cgroup v2 or below it: a directory on the cgroup2 mount, or a
    /// path as /proc/PID/cgroup prints it (/system.slice/app.service, a pod's slice). Cgroups
    /// created below it while tracing count too (repeatable).
    #[arg(long, value_name = "PATH")]
    pub cgroup: Vec<String>,
    /// Only processes in this container: its id, 12 to 64 hex digits as `docker ps` or
    /// `crictl ps` print it (docker, containerd, cri-o, podman; repeatable).
    #[arg(long, value_name = "ID")]
    pub container: Vec<String>,
}

impl FilterArgs {
    pub fn filters(&self) -> Filters {
        Filters {
            pids: self.pid.clone(),
            pid_whitelist: false,
            comms: self.comm.clone(),
            dports: self.dport.clone(),
            // Resolved on the cgroup mount by `trace`'s argument check, not here.
            cgroups: Default::default(),
        }
    }
}

#[derive(Args, Clone, Debug)]
pub struct TraceArgs {
    /// NDJSON on stdout: a {"type":"header"} line, one {"type":"failure"} object per failure
    /// ({"type":"tally"} for those counted but not streamed), then one {"type":"summary"}. The
    /// output is a record `portexhaust report` reads.
    #[arg(short = 'j', long)]
    pub json: bool,
    #[command(flatten)]
    pub output: OutputArg,
    /// Stop after this many seconds (fractions allowed).
    #[arg(short = 'd', long, value_name = "SECS", value_parser = parse_duration)]
    pub duration: Option<Duration>,
    #[command(flatten)]
    pub filter: FilterArgs,
    #[command(flatten)]
    pub backend: BackendArgs,
    /// Also append an incident record (NDJSON, mode 0600) to FILE for `portexhaust report`:
    /// settings, every failure, and snapshots of the exact counts. Flushed every second.
    #[arg(long, value_name = "FILE")]
    pub record: Option<PathBuf>,
    /// Seconds between snapshots of the exact counts in the record.
    #[arg(long, value_name = "SECS", default_value = "10", value_parser = parse_duration, requires = "record")]
    pub snapshot_interval: Duration,
    /// Failure lines written to the record per second at most; beyond that failures are
    /// tallied per process and destination (exact counts, bounded disk use in a storm).
    #[arg(long, value_name = "N", default_value_t = 200, requires = "record")]
    pub record_events_per_s: u32,
    /// Rotate the record when it would grow past SIZE (bytes, or with a K, M, G or T suffix,
    /// powers of 1024: 64M, 1G): FILE becomes FILE.1, FILE.1 becomes FILE.2, and so on, at a
    /// line boundary, and the new FILE starts with its own header. Without it the record grows
    /// as long as tracing runs.
    #[arg(long, value_name = "SIZE", value_parser = parse_size, requires = "record")]
    pub record_max_size: Option<u64>,
    /// Rotated files to keep (FILE.1 to FILE.N); the oldest beyond that is deleted. 0 keeps
    /// only FILE.
    #[arg(long, value_name = "N", default_value_t = 4, requires = "record_max_size",
          value_parser = clap::value_parser!(u32).range(0..=1000))]
    pub record_keep: u32,
    /// Also watch these failure kinds (comma-separated): bind (bind() to port 0 finding no
    /// free port, EADDRINUSE), udp (UDP connect() that cannot autobind, EAGAIN),
    /// connect-early (TCP EADDRNOTAVAIL before port selection), nat (SYNs a source NAT
    /// dropped for want of a port; not in all), all. Where the kernel
    /// offers fexit or kprobes, bind and udp are watched anyway, at no cost to other
    /// syscalls; elsewhere this attaches syscall tracepoints, which slow every syscall on
    /// the machine a little. TCP connect exhaustion is always watched.
    #[arg(long, value_name = "KINDS", value_parser = parse_catch)]
    pub catch: Option<u32>,
    /// Stream at most this many failure events a second (0: every one). In a storm the
    /// rest are counted exactly in the kernel and reported as `tally` lines (per process,
    /// destination and errno, about once a second), so the stream stays readable and
    /// cheap while nothing is lost.
    #[arg(long, value_name = "N", default_value_t = 1000)]
    pub events_per_s: u32,
    /// Count failures only: no socket-ownership tracking, no connect() latency histograms
    /// and no "who holds the ports" in the summary. The cheapest mode for long storms.
    #[arg(long)]
    pub no_blame: bool,
    /// Do not count call sites: no user-space stack walks at connect() (they are rate-limited
    /// to a few per CPU and jiffy, so that a healthy churn does not pay one per connection).
    #[arg(long)]
    pub no_call_sites: bool,
    #[command(flatten)]
    pub tracking: TrackingArgs,
    /// Size of the in-kernel exact-counts map (keys: pid, destination, errno, cause). For
    /// tests that need it full; failures of keys beyond it count only in `uncounted_keys`.
    #[arg(long, value_name = "N", hide = true, default_value_t = DEFAULT_MAX_COUNT_KEYS,
          value_parser = clap::value_parser!(u32).range(1..=1_048_576))]
    pub max_count_keys: u32,
    /// Serve Prometheus metrics at http://ADDR/metrics: PORT (on 127.0.0.1), IP:PORT or
    /// [IPv6]:PORT (0.0.0.0:PORT for a fleet's scraper).
    #[arg(long, value_name = "ADDR", value_parser = parse_addr)]
    pub metrics_addr: Option<SocketAddr>,
    /// Leave the container labels (runtime, id, pod) off the metrics, to bound their
    /// cardinality on hosts with many short-lived containers; events keep the container.
    #[arg(long)]
    pub no_container_labels: bool,
}

#[derive(Args, Clone, Debug)]
pub struct TopArgs {
    /// Refresh interval in seconds.
    #[arg(long, value_name = "SECS", default_value = "2", value_parser = parse_duration)]
    pub interval: Duration,
    /// Print NDJSON snapshots instead (one by default, taken one interval after start).
    #[arg(short = 'j', long)]
    pub json: bool,
    #[command(flatten)]
    pub output: OutputArg,
    /// Number of snapshots before exiting.
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u64).range(1..))]
    pub count: Option<u64>,
    /// Only this network namespace: an inode number, or a path such as /run/netns/NAME or
    /// /proc/PID/ns/net (repeatable; default: every namespace with processes).
    #[arg(long, value_name = "NS")]
    pub netns: Vec<String>,
    #[command(flatten)]
    pub backend: BackendArgs,
    #[command(flatten)]
    pub tracking: TrackingArgs,
    /// Also watch these failure kinds, as `trace --catch` does: with nat, a row per NAT
    /// destination (drops, their rate, the NAT's ports in use, who fails and who holds).
    #[arg(long, value_name = "KINDS", value_parser = parse_catch)]
    pub catch: Option<u32>,
}

#[derive(Args, Clone, Debug)]
pub struct DoctorArgs {
    /// One JSON object on stdout instead of text.
    #[arg(short = 'j', long)]
    pub json: bool,
    #[command(flatten)]
    pub output: OutputArg,
    /// Explain a setting instead of auditing: tcp_tw_recycle, tcp_tw_reuse, tcp_fin_timeout,
    /// tcp_max_tw_buckets, ip_local_port_range, ip_local_reserved_ports, tcp_timestamps,
    /// IP_BIND_ADDRESS_NO_PORT, time_wait.
    #[arg(long, value_enum, value_name = "TOPIC", hide_possible_values = true)]
    pub explain: Option<Topic>,
    /// Also watch this namespace's connects for SECS (root: loads the programs), to add what
    /// the settings cannot show: failures, the call sites, and connects on sockets bound
    /// before connect().
    #[arg(long, value_name = "SECS", value_parser = parse_duration, conflicts_with = "explain")]
    pub watch: Option<Duration>,
}

#[derive(Args, Clone, Debug)]
pub struct SelftestArgs {
    #[command(flatten)]
    pub backend: BackendArgs,
    /// Failing calls per kind (IPv4, IPv6, bind, UDP).
    #[arg(long, default_value_t = 5, value_parser = clap::value_parser!(u64).range(1..=100000))]
    pub failures: u64,
    /// Also watch these failure kinds, as `trace --catch` does (bind, udp, connect-early,
    /// all); kinds not watched are shown as such.
    #[arg(long, value_name = "KINDS", value_parser = parse_catch)]
    pub catch: Option<u32>,
}

#[derive(Args, Clone, Debug)]
pub struct WorkloadArgs {
    #[arg(long, value_enum)]
    pub scenario: Scenario,
    /// Size of the namespace's port range.
    #[arg(long, default_value_t = 10, value_parser = clap::value_parser!(u16).range(1..=20000))]
    pub ports: u16,
    /// Failing calls to make (per kind for `all`).
    #[arg(long, default_value_t = 10)]
    pub failures: u64,
    #[arg(long, default_value_t = 5000)]
    pub dport: u16,
    #[arg(long, default_value = "pxh-workload", value_parser = parse_comm)]
    pub comm: String,
    /// Print {"ready":PID} and wait for a line on stdin before exhausting.
    #[arg(long)]
    pub wait: bool,
    /// After printing the report, keep the namespace and its sockets until stdin closes.
    #[arg(long)]
    pub linger: bool,
    /// `churn`: new connections per second.
    #[arg(long, default_value_t = 0)]
    pub rate: u32,
    /// `churn`: for how many seconds.
    #[arg(long, default_value_t = 0.0)]
    pub seconds: f64,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum NatRole {
    Server,
    Client,
}

#[derive(Args, Clone, Debug)]
pub struct WorkloadNatArgs {
    #[arg(long, value_enum)]
    pub role: NatRole,
    /// The server's address (listened on, or connected to).
    #[arg(long)]
    pub addr: std::net::SocketAddr,
    /// `client`: connects to make.
    #[arg(long, default_value_t = 13)]
    pub count: u32,
    /// `client`: give up on a connect after this many milliseconds.
    #[arg(long, default_value_t = 1500)]
    pub timeout_ms: u64,
    /// `client`: keep the connections this many milliseconds after the last connect.
    #[arg(long, default_value_t = 1000)]
    pub hold_ms: u64,
}

#[derive(Args, Clone, Debug)]
pub struct ManpagesArgs {
    /// Directory to write the pages to (created if missing).
    #[arg(long, value_name = "DIR")]
    pub out_dir: PathBuf,
}

/// `--catch bind,udp`: failure kinds (`KIND_*` bits), `all` for every one.
pub fn parse_catch(s: &str) -> Result<u32, String> {
    let mut bits = 0;
    for part in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        bits |= match part {
            "all" => KIND_ALL,
            p => kind_from_name(p).ok_or_else(|| {
                format!(
                    "{p:?} is not a failure kind; use {} or all",
                    KINDS.iter().map(|k| k.1).collect::<Vec<_>>().join(", ")
                )
            })?,
        };
    }
    if bits == 0 {
        return Err("name at least one failure kind".into());
    }
    Ok(bits)
}

pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let secs: f64 = s
        .parse()
        .map_err(|_| format!("{s:?} is not a number of seconds"))?;
    if !(secs > 0.0 && secs.is_finite()) {
        return Err(format!(
            "{s:?}: the duration must be a positive number of seconds"
        ));
    }
    Ok(Duration::from_secs_f64(secs))
}

/// Smallest `--record-max-size`: room for a header (a busy host's census) and some lines.
pub const MIN_RECORD_SIZE: u64 = 64 << 10;

/// `--record-max-size`: bytes, or K, M, G, T (powers of 1024, an optional `i`/`iB`/`B` after
/// them: 64M, 64MiB, 1G).
pub fn parse_size(s: &str) -> Result<u64, String> {
    let bad = || format!("{s:?} is not a size: give bytes or a number with K, M, G or T (64M, 1G)");
    let t = s.trim();
    let digits = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (num, unit) = t.split_at(digits);
    let n: u64 = num.parse().map_err(|_| bad())?;
    let unit = unit.trim().to_ascii_uppercase();
    let unit = unit
        .strip_suffix("IB")
        .or_else(|| unit.strip_suffix('B'))
        .unwrap_or(&unit);
    let shift = match unit {
        "" => 0,
        "K" => 10,
        "M" => 20,
        "G" => 30,
        "T" => 40,
        _ => return Err(bad()),
    };
    let bytes = n
        .checked_mul(1 << shift)
        .ok_or_else(|| format!("{s:?} is too large"))?;
    if bytes < MIN_RECORD_SIZE {
        return Err(format!(
            "{s:?} is too small: a record file needs room for its header and some lines; give \
             at least 64K"
        ));
    }
    Ok(bytes)
}

pub fn parse_comm(s: &str) -> Result<String, String> {
    if s.is_empty() {
        return Err("a command name cannot be empty".into());
    }
    if s.len() > 15 {
        return Err(format!(
            "{s:?} is longer than 15 bytes; the kernel keeps only the first 15 ({:?})",
            &s[..15]
        ));
    }
    Ok(s.to_string())
}

#[cfg(test)]
mod tests;
