//! Command-line entry point.
use std::{io::Write, net::SocketAddr, process::ExitCode, time::Duration};

use anyhow::Context as _;
use clap::{CommandFactory, Parser, Subcommand, ValueEnum};
use portexhaust::{
    doctor,
    error::{Error, one_line},
    kernel::loader::{BackendRequest, DEFAULT_MAX_TRACKED, Filters},
    metrics, nsinfo,
    record::RecordOptions,
    report, selftest, top, trace,
    workload::{self, Scenario, WorkloadOptions},
};
use portexhaust_common::{Backend, KIND_ALL, KINDS, kind_from_name};

const EXAMPLES: &str = "\
Examples:
  sudo portexhaust trace                       # every exhaustion failure, live, then offenders
  sudo portexhaust trace --json | jq .         # NDJSON for pipelines
  sudo portexhaust trace --pid 4242 --duration 60
  sudo portexhaust trace --comm python3 --dport 27017
  sudo portexhaust top                         # live: destinations by pressure, failers, holders
  sudo portexhaust top --json --netns /run/netns/app
  sudo portexhaust trace --metrics-addr 9977      # Prometheus metrics on 127.0.0.1:9977
  sudo portexhaust selftest                    # does it work on this kernel?
  sudo portexhaust trace --record incident.ndjson
  portexhaust report incident.ndjson --format html -o incident.html
  sudo portexhaust doctor                      # what to fix on this host, now
  portexhaust doctor --explain tcp_tw_recycle";

#[derive(Parser)]
#[command(
    name = "portexhaust",
    version,
    about = "Catch Linux ephemeral-port exhaustion (EADDRNOTAVAIL, errno 99) as it happens and say who caused it",
    after_help = EXAMPLES
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Clone, Copy, Debug, ValueEnum)]
enum BackendArg {
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

/// `--catch bind,udp`: failure kinds (`KIND_*` bits), `all` for every one.
fn parse_catch(s: &str) -> Result<u32, String> {
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

fn parse_duration(s: &str) -> Result<Duration, String> {
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

fn parse_comm(s: &str) -> Result<String, String> {
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

#[derive(Subcommand)]
enum Cmd {
    /// Stream every port-exhaustion failure live, then summarise the offenders.
    ///
    /// Catches TCP connect() EADDRNOTAVAIL (IPv4, IPv6, v4-mapped) with the kernel site,
    /// bind(port 0) EADDRINUSE and UDP autobind EAGAIN. Counts are exact (kept in the kernel)
    /// even when the ring buffer overflows. Stops on Ctrl-C, SIGTERM or --duration.
    Trace {
        /// NDJSON on stdout: one {"type":"failure"} object per failure, then one {"type":"summary"}.
        #[arg(long)]
        json: bool,
        /// Stop after this many seconds (fractions allowed).
        #[arg(long, value_name = "SECS", value_parser = parse_duration)]
        duration: Option<Duration>,
        /// Only this process id (repeatable).
        #[arg(long, value_name = "PID")]
        pid: Vec<u32>,
        /// Only this command name, as in /proc/PID/comm (repeatable).
        #[arg(long, value_name = "NAME", value_parser = parse_comm)]
        comm: Vec<String>,
        /// Only failures towards this destination port (repeatable; bind(): the local port, 0).
        #[arg(long, value_name = "PORT")]
        dport: Vec<u16>,
        /// Probe backend.
        #[arg(long, value_enum, default_value = "auto")]
        backend: BackendArg,
        /// Also append an incident record (NDJSON, mode 0600) to FILE for `portexhaust report`:
        /// settings, every failure, and snapshots of the exact counts. Flushed every second.
        #[arg(long, value_name = "FILE")]
        record: Option<std::path::PathBuf>,
        /// Seconds between snapshots of the exact counts in the record.
        #[arg(long, value_name = "SECS", default_value = "10", value_parser = parse_duration, requires = "record")]
        snapshot_interval: Duration,
        /// Failure lines written to the record per second at most; beyond that failures are
        /// tallied per process and destination (exact counts, bounded disk use in a storm).
        #[arg(long, value_name = "N", default_value_t = 200, requires = "record")]
        record_events_per_s: u32,
        /// Also watch these failure kinds (comma-separated): bind (bind() to port 0 finding no
        /// free port, EADDRINUSE), udp (UDP connect() that cannot autobind, EAGAIN),
        /// connect-early (TCP EADDRNOTAVAIL before port selection), all. Where the kernel
        /// offers fexit or kprobes, bind and udp are watched anyway, at no cost to other
        /// syscalls; elsewhere this attaches syscall tracepoints, which slow every syscall on
        /// the machine a little. TCP connect exhaustion is always watched.
        #[arg(long, value_name = "KINDS", value_parser = parse_catch)]
        catch: Option<u32>,
        /// Stream at most this many failure events a second (0: every one). In a storm the
        /// rest are counted exactly in the kernel and reported as `tally` lines (per process,
        /// destination and errno, about once a second), so the stream stays readable and
        /// cheap while nothing is lost.
        #[arg(long, value_name = "N", default_value_t = 1000)]
        events_per_s: u32,
        /// Count failures only: no socket-ownership tracking, no connect() latency histograms
        /// and no "who holds the ports" in the summary. The cheapest mode for long storms.
        #[arg(long)]
        no_blame: bool,
        /// Size of each in-kernel socket-ownership map (LRU: the oldest are dropped and
        /// counted as evictions when full).
        #[arg(long, value_name = "N", default_value_t = DEFAULT_MAX_TRACKED,
              value_parser = clap::value_parser!(u32).range(16..=4_194_304))]
        max_tracked_sockets: u32,
        /// Serve Prometheus metrics at http://ADDR/metrics: PORT (on 127.0.0.1), IP:PORT or
        /// [IPv6]:PORT (0.0.0.0:PORT for a fleet's scraper).
        #[arg(long, value_name = "ADDR", value_parser = metrics::parse_addr)]
        metrics_addr: Option<SocketAddr>,
        /// Leave the container labels (runtime, id, pod) off the metrics, to bound their
        /// cardinality on hosts with many short-lived containers; events keep the container.
        #[arg(long)]
        no_container_labels: bool,
    },
    /// Live view of port pressure: destinations by utilisation, failing processes, and who
    /// holds the ports (the processes that created ESTABLISHED/TIME_WAIT sockets, alive or
    /// exited). q quits.
    Top {
        /// Refresh interval in seconds.
        #[arg(long, value_name = "SECS", default_value = "2", value_parser = parse_duration)]
        interval: Duration,
        /// Print NDJSON snapshots instead (one by default, taken one interval after start).
        #[arg(long)]
        json: bool,
        /// Number of snapshots before exiting.
        #[arg(long, value_name = "N", value_parser = clap::value_parser!(u64).range(1..))]
        count: Option<u64>,
        /// Only this network namespace: an inode number, or a path such as /run/netns/NAME or
        /// /proc/PID/ns/net (repeatable; default: every namespace with processes).
        #[arg(long, value_name = "NS")]
        netns: Vec<String>,
        #[arg(long, value_enum, default_value = "auto")]
        backend: BackendArg,
        /// Size of each in-kernel socket-ownership map (see trace).
        #[arg(long, value_name = "N", default_value_t = DEFAULT_MAX_TRACKED,
              value_parser = clap::value_parser!(u32).range(16..=4_194_304))]
        max_tracked_sockets: u32,
    },
    /// The blame report after the fact, from one or more `trace --record` files: timeline,
    /// offenders, holders, destinations, settings and what to change.
    Report(report::ReportArgs),
    /// Audit this network namespace now: range, reserved ports, TIME_WAIT settings and counters,
    /// busy destinations, bind() before connect(); each finding with a concrete fix.
    Doctor(doctor::DoctorArgs),
    /// Check that tracing works on this kernel: exhaust a private network namespace for real
    /// and compare what the tracer saw with what the workload saw.
    Selftest {
        #[arg(long, value_enum, default_value = "auto")]
        backend: BackendArg,
        /// Failing calls per kind (IPv4, IPv6, bind, UDP).
        #[arg(long, default_value_t = 5, value_parser = clap::value_parser!(u64).range(1..=100000))]
        failures: u64,
        /// Also watch these failure kinds, as `trace --catch` does (bind, udp, connect-early,
        /// all); kinds not watched are shown as such.
        #[arg(long, value_name = "KINDS", value_parser = parse_catch)]
        catch: Option<u32>,
    },
    /// Print a shell completion script.
    Completions {
        #[arg(value_enum)]
        shell: clap_complete::Shell,
    },
    /// Exhaust ports in a private network namespace (test and benchmark load generator).
    #[command(hide = true)]
    Workload {
        #[arg(long, value_enum)]
        scenario: Scenario,
        /// Size of the namespace's port range.
        #[arg(long, default_value_t = 10, value_parser = clap::value_parser!(u16).range(1..=20000))]
        ports: u16,
        /// Failing calls to make (per kind for `all`).
        #[arg(long, default_value_t = 10)]
        failures: u64,
        #[arg(long, default_value_t = 5000)]
        dport: u16,
        #[arg(long, default_value = "pxh-workload", value_parser = parse_comm)]
        comm: String,
        /// Print {"ready":PID} and wait for a line on stdin before exhausting.
        #[arg(long)]
        wait: bool,
        /// After printing the report, keep the namespace and its sockets until stdin closes.
        #[arg(long)]
        linger: bool,
    },
}

fn main() -> ExitCode {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("warn"))
        .format(|buf, rec| {
            writeln!(
                buf,
                "portexhaust: {}: {}",
                rec.level().as_str().to_lowercase(),
                rec.args()
            )
        })
        .init();
    let cli = Cli::parse();
    match run(cli) {
        Ok(code) => code,
        Err(e) => {
            let code = e.downcast_ref::<Error>().map(Error::exit_code).unwrap_or(1);
            eprintln!("portexhaust: error: {}", one_line(e.as_ref()));
            ExitCode::from(code as u8)
        }
    }
}

fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    // One thread: the work is reading one ring buffer; a second core stays with the workload.
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")
}

fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    match cli.cmd {
        Cmd::Trace {
            json,
            duration,
            pid,
            comm,
            dport,
            backend,
            record,
            snapshot_interval,
            record_events_per_s,
            max_tracked_sockets,
            no_blame,
            metrics_addr,
            no_container_labels,
            catch,
            events_per_s,
        } => {
            let opts = trace::TraceOptions {
                max_tracked: max_tracked_sockets,
                blame: !no_blame,
                json,
                duration,
                filters: Filters {
                    pids: pid,
                    pid_whitelist: false,
                    comms: comm,
                    dports: dport,
                },
                backend: backend.into(),
                record: record.map(|path| RecordOptions {
                    path,
                    snapshot_interval,
                    events_per_s: record_events_per_s,
                }),
                metrics_addr,
                container_labels: !no_container_labels,
                catch: catch.unwrap_or(0),
                events_per_s,
            };
            runtime()?.block_on(trace::run(opts))?;
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Report(args) => Ok(ExitCode::from(report::run(&args)?)),
        Cmd::Doctor(args) => {
            println!("{}", doctor::run(&args).trim_end());
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Top {
            interval,
            json,
            count,
            netns,
            backend,
            max_tracked_sockets,
        } => {
            let netns = netns
                .iter()
                .map(|n| nsinfo::resolve_netns(n).map_err(|e| anyhow::anyhow!("--netns {e}")))
                .collect::<anyhow::Result<Vec<_>>>()?;
            top::run(top::TopOptions {
                interval,
                json,
                count,
                netns,
                backend: backend.into(),
                max_tracked: max_tracked_sockets,
            })?;
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Selftest {
            backend,
            failures,
            catch,
        } => {
            let r = selftest::run(backend.into(), failures, catch.unwrap_or(0))?;
            println!("{}", r.table());
            if r.passed() {
                println!("selftest passed with the {} backend", r.backend);
                Ok(ExitCode::SUCCESS)
            } else {
                println!("selftest FAILED with the {} backend", r.backend);
                Ok(ExitCode::FAILURE)
            }
        }
        Cmd::Completions { shell } => {
            clap_complete::generate(
                shell,
                &mut Cli::command(),
                "portexhaust",
                &mut std::io::stdout(),
            );
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Workload {
            scenario,
            ports,
            failures,
            dport,
            comm,
            wait,
            linger,
        } => {
            let (report, keep) = workload::run(&WorkloadOptions {
                scenario,
                ports,
                failures,
                dport,
                comm,
                wait,
            })?;
            println!("{}", serde_json::to_string(&report)?);
            if linger {
                std::io::stdout().flush()?;
                let mut sink = Vec::new();
                let _ = std::io::Read::read_to_end(&mut std::io::stdin(), &mut sink);
            }
            drop(keep);
            Ok(ExitCode::SUCCESS)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cli_is_well_formed() {
        Cli::command().debug_assert();
    }

    #[test]
    fn bad_arguments_are_rejected() {
        for args in [
            &["portexhaust", "trace", "--duration", "0"][..],
            &["portexhaust", "trace", "--duration", "abc"],
            &["portexhaust", "trace", "--pid", "x"],
            &["portexhaust", "trace", "--dport", "70000"],
            &["portexhaust", "trace", "--comm", "a-name-longer-than-15"],
            &["portexhaust", "trace", "--backend", "uprobe"],
            &["portexhaust", "trace", "--snapshot-interval", "5"],
            &["portexhaust", "trace", "--record-events-per-s", "5"],
            &[
                "portexhaust",
                "trace",
                "--record",
                "x",
                "--record-events-per-s",
                "-1",
            ],
            &[
                "portexhaust",
                "trace",
                "--record",
                "x",
                "--snapshot-interval",
                "0",
            ],
            &["portexhaust", "report"],
            &["portexhaust", "report", "x", "--format", "pdf"],
            &["portexhaust", "report", "x", "--since", "yesterday"],
            &["portexhaust", "doctor", "--explain", "tcp_tw_whatever"],
            &["portexhaust", "trace", "--metrics-addr", "host:9977"],
            &["portexhaust", "trace", "--metrics-addr", "99999"],
            &["portexhaust", "trace", "--metrics-addr"],
        ] {
            assert!(Cli::try_parse_from(args).is_err(), "{args:?}");
        }
        assert!(
            Cli::try_parse_from(["portexhaust", "trace", "--duration", "1.5", "--pid", "3"])
                .is_ok()
        );
        for ok in [
            &[
                "portexhaust",
                "trace",
                "--record",
                "x",
                "--snapshot-interval",
                "0.5",
            ][..],
            &[
                "portexhaust",
                "report",
                "a",
                "b",
                "--format",
                "html",
                "-o",
                "r.html",
            ],
            &[
                "portexhaust",
                "report",
                "a",
                "--since",
                "2026-11-25T11:20:00Z",
                "--pid",
                "1",
            ],
            &["portexhaust", "doctor", "--json"],
            &[
                "portexhaust",
                "doctor",
                "--explain",
                "net.ipv4.tcp_tw_recycle",
            ],
        ] {
            assert!(Cli::try_parse_from(ok).is_ok(), "{ok:?}");
        }
        assert!(
            Cli::try_parse_from([
                "portexhaust",
                "trace",
                "--metrics-addr",
                "[::1]:9977",
                "--no-container-labels"
            ])
            .is_ok()
        );
    }
}
