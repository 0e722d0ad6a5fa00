//! `cargo xtask test`: set-up, unit tests, then the privileged tests one at a time as root.
use std::process::Command;

use anyhow::{Result, bail};

use crate::setup::{is_root, run_checked, setup, workspace_root};

#[derive(clap::Args, Debug)]
pub struct TestArgs {
    /// Run only the unit tests (no root needed); the privileged tests are not run.
    #[arg(long)]
    pub unprivileged_only: bool,
    /// Only privileged tests whose name contains this filter.
    #[arg(long)]
    pub filter: Option<String>,
}

/// `cargo fmt --check` and clippy with warnings denied, the eBPF crate included (it is built
/// for its own target with nightly, so it gets its own clippy run).
fn lint(root: &std::path::Path) -> Result<()> {
    eprintln!("xtask: lint (fmt, clippy)");
    run_checked(
        Command::new("cargo")
            .current_dir(root)
            .args(["fmt", "--all", "--check"]),
    )?;
    run_checked(Command::new("cargo").current_dir(root).args([
        "clippy",
        "--workspace",
        "--exclude",
        "portexhaust-ebpf",
        "--all-targets",
        "--",
        "-D",
        "warnings",
    ]))?;
    run_checked(
        Command::new("cargo")
            .current_dir(root.join("portexhaust-ebpf"))
            .args([
                "+nightly",
                "clippy",
                "--release",
                "--target",
                "bpfel-unknown-none",
                "-Z",
                "build-std=core",
                "--",
                "-D",
                "warnings",
            ]),
    )
}

pub fn test(args: &TestArgs) -> Result<()> {
    setup()?;
    let root = workspace_root();
    lint(&root)?;
    eprintln!("xtask: unit tests");
    run_checked(Command::new("cargo").current_dir(&root).args([
        "test",
        "--workspace",
        "--exclude",
        "portexhaust-ebpf",
    ]))?;
    // The checked-in eBPF objects (the fallback of a build without nightly) against the
    // sources; unprivileged, so it runs with --unprivileged-only too.
    eprintln!("xtask: the checked-in eBPF objects against the sources");
    crate::prebuilt::prebuilt(&crate::prebuilt::PrebuiltArgs {
        check: true,
        arch: Vec::new(),
    })?;
    if args.unprivileged_only {
        eprintln!("xtask: privileged tests NOT run (--unprivileged-only)");
        return Ok(());
    }
    if !is_root() {
        // Kernel tests are the point of this suite: not being able to run them is a failure,
        // never a silent skip (in CI or elsewhere).
        bail!(
            "the privileged tests need root (they load eBPF programs and create network \
             namespaces): run `sudo -E cargo xtask test`, or `cargo xtask test --unprivileged-only`"
        );
    }
    eprintln!(
        "xtask: privileged and fleet tests (root, one at a time, private network namespaces)"
    );
    // The release artefacts tests/dist.rs installs and runs (static binaries, .deb, image).
    // They are all named dist_*: a filter that does not select them skips building them.
    let dist_dir = crate::dist::dist_dir()?;
    if args
        .filter
        .as_deref()
        .is_none_or(|f| "dist_".contains(f) || f.contains("dist"))
    {
        eprintln!("xtask: release artefacts (cargo xtask dist)");
        crate::dist::dist(&crate::dist::DistArgs::default())?;
    }
    let mut cmd = Command::new("cargo");
    cmd.env("PORTEXHAUST_DIST_DIR", &dist_dir);
    cmd.current_dir(&root).args([
        "test",
        "--release",
        "--package",
        "portexhaust",
        // Every test target: the privileged tests are the #[ignore]d ones in tests/*.rs.
        "--tests",
        "--",
        "--ignored",
        "--test-threads=1",
    ]);
    if let Some(f) = &args.filter {
        cmd.arg(f);
    }
    run_checked(&mut cmd)?;
    // The benchmark load generators' own kernel tests (loadgen/tests/privileged.rs): Cargo
    // gives an integration test only its own package's binaries, so they live in that crate.
    let mut cmd = Command::new("cargo");
    cmd.current_dir(&root).args([
        "test",
        "--release",
        "--package",
        "pxh-loadgen",
        "--test",
        "privileged",
        "--",
        "--ignored",
        "--test-threads=1",
    ]);
    if let Some(f) = &args.filter {
        cmd.arg(f);
    }
    run_checked(&mut cmd)?;
    if args.filter.is_none() {
        // Two minutes of the soak: growth, bounds and exact counts as a service runs it
        // (BENCHMARKS.md has a 30-minute run).
        eprintln!("xtask: soak, 2 minutes");
        crate::soak::soak(&crate::soak::SoakArgs {
            minutes: 2.0,
            out_dir: "target/soak-test".into(),
            no_build: true,
        })?;
    }
    Ok(())
}
