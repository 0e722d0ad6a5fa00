//! Developer tasks: `cargo xtask setup | build | run | install | test | vmtest | bench | soak |
//! dist | prebuilt`.
//!
//! Everything that needs root or the network namespace machinery lives here rather than in a
//! cargo `runner`, so that a plain `cargo test` stays unprivileged.
mod bench;
mod dist;
mod prebuilt;
mod setup;
mod soak;
mod test;
mod vm;
mod vmtest;

use anyhow::Result;
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "xtask", about = "portexhaust developer tasks")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Install what a fresh machine lacks to build and run (idempotent): nightly rust-src and
    /// bpf-linker. With --tests also what the tests use: nightly clippy, Debian packages
    /// (qemu, prometheus, chromium, bpftrace, ...) and a PyPI validator.
    Setup {
        #[arg(long)]
        tests: bool,
    },
    /// Set up if needed, then build the release binary (eBPF object embedded).
    Build,
    /// Set up if needed, build, and run portexhaust as root with the given arguments.
    Run {
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
    /// Build and install the binary into /usr/local/bin (so that `sudo portexhaust trace` works).
    Install {
        #[arg(long, default_value = "/usr/local/bin")]
        prefix: String,
    },
    /// Set up if needed, run unit tests, then the privileged tests one at a time as root.
    Test(test::TestArgs),
    /// Boot Debian kernels under QEMU and run selftest/trace for every backend in each.
    Vmtest(vmtest::VmtestArgs),
    /// Measure cost and exactness against the untraced kernel and bpftrace; writes
    /// BENCHMARKS.md and bench/results.json (as root).
    Bench(bench::BenchArgs),
    /// Run `trace` as a service does for N minutes under a mixed load, sampling its RSS, fds,
    /// CPU, maps and record every 10 s; fails if they grow or the counts drift (as root).
    Soak(soak::SoakArgs),
    /// Release artefacts in target/dist: static musl binaries (x86_64, aarch64), a .deb
    /// (cargo-deb) and the container image as an OCI archive (buildah).
    Dist(dist::DistArgs),
    /// Refresh the checked-in eBPF objects build.rs falls back to without nightly
    /// (portexhaust-ebpf/prebuilt/); --check compares them with the sources instead.
    Prebuilt(prebuilt::PrebuiltArgs),
    /// Inside a `bench --vm` guest: run the plan the host wrote (started by the guest's /init).
    #[command(hide = true)]
    BenchGuest(bench::GuestArgs),
}

fn main() -> Result<()> {
    let cli = Cli::parse();
    match cli.cmd {
        Cmd::Setup { tests } => setup::setup(if tests {
            setup::Scope::Tests
        } else {
            setup::Scope::Run
        })
        .map(|_| ()),
        Cmd::Build => setup::build_release().map(|_| ()),
        Cmd::Run { args } => setup::run(&args),
        Cmd::Install { prefix } => setup::install(&prefix),
        Cmd::Test(args) => test::test(&args),
        Cmd::Vmtest(args) => vmtest::vmtest(&args),
        Cmd::Bench(args) => bench::bench(&args),
        Cmd::Soak(args) => soak::soak(&args),
        Cmd::Dist(args) => dist::dist(&args),
        Cmd::Prebuilt(args) => prebuilt::prebuilt(&args),
        Cmd::BenchGuest(args) => bench::bench_guest(&args),
    }
}
