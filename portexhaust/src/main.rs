//! Command-line entry point: parse, dispatch, and turn errors into one line and an exit code.
//!
//! Results go to stdout through `output::stdout` only: a reader that closes the pipe early
//! (`| head`) ends any command quietly with exit status 0.
use std::{io::Write, process::ExitCode};

use anyhow::Context as _;
use clap::CommandFactory;
use portexhaust::{
    cli::{Cli, Cmd, NatRole, TopArgs, WorkloadArgs, WorkloadNatArgs},
    cmd::{doctor, manpages, report, selftest, top, trace},
    error::one_line,
    kernel::{Error, netns::resolve_netns},
    output::stdout::{print, println},
};
use portexhaust_workload::WorkloadOptions;

fn main() -> ExitCode {
    let cli = Cli::parse_checked();
    // RUST_LOG, when set, wins over -v.
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or(cli.log_filter()))
        .format(|buf, rec| {
            writeln!(
                buf,
                "portexhaust: {}: {}",
                rec.level().as_str().to_lowercase(),
                rec.args()
            )
        })
        .init();
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
        Cmd::Trace(args) => {
            runtime()?.block_on(trace::run(&args))?;
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Report(args) => Ok(ExitCode::from(report::run(&args)?)),
        Cmd::Doctor(args) => {
            println(doctor::run(&args)?.trim_end())?;
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Top(args) => {
            top_cmd(&args)?;
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Selftest(args) => {
            let r = selftest::run(
                args.backend.request(),
                args.failures,
                args.catch.unwrap_or(0),
            )?;
            let verdict = if r.passed() { "passed" } else { "FAILED" };
            println(&format!(
                "{}\nselftest {verdict} with the {} backend",
                r.table(),
                r.backend
            ))?;
            Ok(if r.passed() {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            })
        }
        Cmd::Completions { shell } => {
            // Generated into memory: clap_complete panics on a write error, such as the EPIPE
            // of `| head`.
            let mut script = Vec::new();
            clap_complete::generate(shell, &mut Cli::command(), "portexhaust", &mut script);
            print(&String::from_utf8_lossy(&script))?;
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Workload(args) => workload(args),
        Cmd::WorkloadNat(args) => workload_nat(&args),
        Cmd::Manpages(args) => {
            for page in manpages::write(&args.out_dir)? {
                eprintln!("portexhaust: wrote {}", page.display());
            }
            Ok(ExitCode::SUCCESS)
        }
    }
}

fn top_cmd(args: &TopArgs) -> anyhow::Result<()> {
    let netns = args
        .netns
        .iter()
        .map(|n| resolve_netns(n).map_err(|e| anyhow::anyhow!("--netns {e}")))
        .collect::<anyhow::Result<Vec<_>>>()?;
    top::run(top::TopOptions {
        interval: args.interval,
        json: args.json,
        count: args.count,
        netns,
        backend: args.backend.request(),
        max_tracked: args.tracking.max_tracked_sockets,
        catch: args.catch.unwrap_or(0),
    })?;
    Ok(())
}

fn workload_nat(a: &WorkloadNatArgs) -> anyhow::Result<ExitCode> {
    match a.role {
        NatRole::Server => portexhaust_workload::nat_server(a.addr)?,
        NatRole::Client => {
            let (r, kept) = portexhaust_workload::nat_client(
                a.addr,
                a.count,
                std::time::Duration::from_millis(a.timeout_ms),
            );
            // The report first, then the hold: a caller that waits for it (tests/nat.rs) reads
            // it while the connections are still open.
            println(&serde_json::to_string(&r)?)?;
            std::thread::sleep(std::time::Duration::from_millis(a.hold_ms));
            drop(kept);
        }
    }
    Ok(ExitCode::SUCCESS)
}

fn workload(a: WorkloadArgs) -> anyhow::Result<ExitCode> {
    let (report, keep) = portexhaust_workload::run(&WorkloadOptions {
        scenario: a.scenario,
        ports: a.ports,
        failures: a.failures,
        dport: a.dport,
        comm: a.comm,
        wait: a.wait,
        rate: a.rate,
        seconds: a.seconds,
    })?;
    println(&serde_json::to_string(&report)?)?;
    if a.linger {
        let mut sink = Vec::new();
        let _ = std::io::Read::read_to_end(&mut std::io::stdin(), &mut sink);
    }
    drop(keep);
    Ok(ExitCode::SUCCESS)
}
