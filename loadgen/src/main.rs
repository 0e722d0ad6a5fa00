//! `pxh-loadgen`: the load generators of `cargo xtask bench` (see the library docs for the
//! paused-start protocol). Needs root: each generator runs in its own network namespace.
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use pxh_loadgen::{
    churn::{self, ChurnOptions},
    common::emit,
    hold::{self, HoldOptions},
    storm::{self, StormOptions},
};

const EXAMPLES: &str = "\
Examples (as root; each run lives in a private network namespace):
  pxh-loadgen storm --failures 1000000            # 1M failing connects, then a JSON report
  pxh-loadgen churn --secs 5                      # successful connect/close churn for 5 s
  pxh-loadgen hold --connections 100000 --wait    # hold 100k connections until stdin closes
With --wait each prints {\"ready\":PID} and waits for a line on stdin before the measured part.";

#[derive(Parser)]
#[command(
    name = "pxh-loadgen",
    version,
    about = "Load generators for the portexhaust benchmarks",
    after_help = EXAMPLES
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

fn parse_comm(s: &str) -> Result<String, String> {
    if s.is_empty() || s.len() > 15 {
        return Err(format!(
            "{s:?}: a command name must be 1 to 15 bytes (the kernel keeps 15)"
        ));
    }
    Ok(s.to_string())
}

fn parse_secs(s: &str) -> Result<f64, String> {
    let v: f64 = s
        .parse()
        .map_err(|_| format!("{s:?} is not a number of seconds"))?;
    if !(v.is_finite() && (0.0..=600.0).contains(&v)) {
        return Err(format!("{s:?}: seconds must be between 0 and 600"));
    }
    Ok(v)
}

#[derive(Subcommand)]
enum Cmd {
    /// Hold a small port range full, then a tight loop of connect() calls failing with
    /// EADDRNOTAVAIL; reports the exact count it saw and its rate.
    Storm {
        /// connect() calls to make.
        #[arg(long, default_value_t = 100_000, value_parser = clap::value_parser!(u64).range(1..=100_000_000))]
        failures: u64,
        /// Size of the port range, all of it held before the storm.
        #[arg(long, default_value_t = 10, value_parser = clap::value_parser!(u16).range(1..=4000))]
        ports: u16,
        /// Time bound: stop early (report says truncated) after this many seconds.
        #[arg(long, default_value = "120", value_parser = parse_secs)]
        max_secs: f64,
        #[arg(long, default_value_t = 5000, value_parser = clap::value_parser!(u16).range(1..40000))]
        dport: u16,
        #[arg(long, default_value = "pxhb-storm", value_parser = parse_comm)]
        comm: String,
        /// Print {"ready":PID} and wait for a line on stdin before the storm.
        #[arg(long)]
        wait: bool,
    },
    /// connect/accept/close cycles that succeed (server closes first, tcp_tw_reuse=1).
    Churn {
        #[arg(long, default_value = "5", value_parser = parse_secs)]
        secs: f64,
        /// Size of the port range.
        #[arg(long, default_value_t = 20_000, value_parser = clap::value_parser!(u16).range(16..=25_000))]
        ports: u16,
        #[arg(long, default_value_t = 5000, value_parser = clap::value_parser!(u16).range(1..40000))]
        dport: u16,
        #[arg(long, default_value = "pxhb-churn", value_parser = parse_comm)]
        comm: String,
        #[arg(long)]
        wait: bool,
    },
    /// Open many established connections over several destinations, churn some, report, and
    /// (with --wait) keep them until stdin sends a line or closes.
    Hold {
        #[arg(long, default_value_t = 10_000)]
        connections: u64,
        /// Destination ports per holding process (127.0.0.1:DPORT, DPORT+1, ...).
        #[arg(long, default_value_t = 8)]
        dests: u16,
        #[arg(long, default_value_t = 5000, value_parser = clap::value_parser!(u16).range(1..40000))]
        dport: u16,
        /// Close-and-reopen cycles for this long after opening everything.
        #[arg(long, default_value = "1", value_parser = parse_secs)]
        churn_secs: f64,
        #[arg(long, default_value = "pxhb-hold", value_parser = parse_comm)]
        comm: String,
        #[arg(long)]
        wait: bool,
    },
    /// One process of `hold`, inside the namespace `hold` made (not for direct use).
    #[command(hide = true)]
    HoldWorker {
        #[arg(long)]
        connections: u64,
        #[arg(long)]
        dests: u16,
        #[arg(long, value_parser = clap::value_parser!(u16).range(1..40000))]
        dport: u16,
        #[arg(long, value_parser = parse_secs)]
        churn_secs: f64,
        #[arg(long, value_parser = parse_comm)]
        comm: String,
        #[arg(long)]
        wait: bool,
    },
}

fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.cmd {
        Cmd::Storm {
            failures,
            ports,
            max_secs,
            dport,
            comm,
            wait,
        } => emit(&storm::run(&StormOptions {
            ports,
            failures,
            max_secs,
            dport,
            comm,
            wait,
        })?)?,
        Cmd::Churn {
            secs,
            ports,
            dport,
            comm,
            wait,
        } => emit(&churn::run(&ChurnOptions {
            ports,
            secs,
            dport,
            comm,
            wait,
        })?)?,
        Cmd::Hold {
            connections,
            dests,
            dport,
            churn_secs,
            comm,
            wait,
        } => {
            // The holder prints its own report before it waits to be released.
            hold::run(&HoldOptions {
                connections,
                dests,
                dport,
                churn_secs,
                comm,
                wait,
            })?;
        }
        Cmd::HoldWorker {
            connections,
            dests,
            dport,
            churn_secs,
            comm,
            wait,
        } => {
            hold::worker(&HoldOptions {
                connections,
                dests,
                dport,
                churn_secs,
                comm,
                wait,
            })?;
        }
    }
    Ok(())
}

fn main() -> ExitCode {
    match run(Cli::parse()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            let chain: Vec<String> = e.chain().map(ToString::to_string).collect();
            eprintln!("pxh-loadgen: error: {}", chain.join(": "));
            ExitCode::FAILURE
        }
    }
}

#[cfg(test)]
mod tests {
    use clap::CommandFactory;

    use super::*;

    #[test]
    fn cli_is_well_formed() {
        Cli::command().debug_assert();
    }

    #[test]
    fn bad_arguments_are_rejected() {
        for args in [
            &["pxh-loadgen", "storm", "--failures", "0"][..],
            &["pxh-loadgen", "storm", "--ports", "0"],
            &["pxh-loadgen", "storm", "--comm", "a-name-longer-than-15"],
            &["pxh-loadgen", "churn", "--secs", "-1"],
            &["pxh-loadgen", "churn", "--secs", "nan"],
            &["pxh-loadgen", "churn", "--ports", "30000"],
            &["pxh-loadgen", "hold", "--dport", "45000"],
            &["pxh-loadgen", "hold", "--connections", "x"],
        ] {
            assert!(Cli::try_parse_from(args).is_err(), "{args:?}");
        }
        assert!(Cli::try_parse_from(["pxh-loadgen", "storm", "--failures", "5", "--wait"]).is_ok());
    }
}
