//! `cargo xtask test`: set-up, unit tests, then the privileged tests one at a time as root.
use std::{
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context as _, Result, bail};

use crate::setup::{Scope, is_root, run_checked, setup, workspace_root};

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
    setup(Scope::Tests)?;
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
    if args
        .filter
        .as_deref()
        .is_none_or(|f| "fresh_run_pipes_to_jq".contains(f))
    {
        fresh_run_pipes_to_jq(&root)?;
    }
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

/// `cargo xtask run -- trace --json | jq` as a first run on a fresh machine does it: a new
/// HOME, CARGO_HOME and target directory, and a PATH with the rustup proxies but without this
/// machine's bpf-linker, so that the run downloads the crates, installs bpf-linker against the
/// nightly LLVM, builds everything and traces, all in one command. Everything before the trace
/// must go to stderr: jq has to parse every line of stdout, and the lines must be the trace's
/// header and summary. (The toolchains themselves, in RUSTUP_HOME, are shared with this
/// machine: fetching nightly again is not this test's business.)
fn fresh_run_pipes_to_jq(root: &Path) -> Result<()> {
    eprintln!(
        "xtask: fresh-machine run: `cargo xtask run -- trace --json | jq` from an empty HOME, \
         CARGO_HOME and target (installs bpf-linker again: a few minutes)"
    );
    let real_home = std::env::var_os("HOME").map_or_else(|| PathBuf::from("/root"), PathBuf::from);
    let rustup_home =
        std::env::var_os("RUSTUP_HOME").map_or_else(|| real_home.join(".rustup"), PathBuf::from);
    let proxies = std::env::var_os("CARGO_HOME")
        .map_or_else(|| real_home.join(".cargo"), PathBuf::from)
        .join("bin");
    let fresh = tempfile::Builder::new()
        .prefix("pxh-fresh-")
        .tempdir_in(root.join("target"))
        .context("making the fresh-machine directory")?;
    let home = fresh.path().join("home");
    let cargo_home = home.join(".cargo");
    let bin = fresh.path().join("bin");
    std::fs::create_dir_all(&bin)?;
    std::fs::create_dir_all(cargo_home.join("bin"))?;
    for tool in ["cargo", "rustc", "rustup", "rustdoc"] {
        std::os::unix::fs::symlink(proxies.join(tool), bin.join(tool))
            .with_context(|| format!("linking the rustup proxy {tool}"))?;
    }
    let path = std::env::join_paths([
        cargo_home.join("bin"),
        bin.clone(),
        "/usr/local/sbin".into(),
        "/usr/local/bin".into(),
        "/usr/sbin".into(),
        "/usr/bin".into(),
        "/sbin".into(),
        "/bin".into(),
    ])?;
    let script = "set -o pipefail; cargo xtask run -- trace --json --duration 1 | jq -c .type";
    let mut cmd = Command::new("bash");
    // What cargo and rustup set for this xtask process would point the inner run at this
    // machine's build; the rest (proxies, certificates, CI) stays as a fresh shell has it.
    for (k, _) in std::env::vars_os() {
        let k = k.to_string_lossy();
        if k.starts_with("CARGO") || k.starts_with("RUSTC") || k.starts_with("RUSTUP_") {
            cmd.env_remove(&*k);
        }
    }
    let out = cmd
        .arg("-c")
        .arg(script)
        .current_dir(root)
        .env("HOME", &home)
        .env("CARGO_HOME", &cargo_home)
        .env("RUSTUP_HOME", &rustup_home)
        .env("CARGO_TARGET_DIR", fresh.path().join("target"))
        .env("PATH", path)
        .env("CARGO_TERM_COLOR", "never")
        .stderr(std::process::Stdio::inherit())
        .output()
        .context("running the fresh-machine pipe")?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    if !out.status.success() {
        bail!(
            "fresh-machine `{script}` failed ({}); stdout was:\n{stdout}",
            out.status
        );
    }
    let types: Vec<&str> = stdout.lines().collect();
    if types.first() != Some(&"\"header\"") || types.last() != Some(&"\"summary\"") {
        bail!(
            "fresh-machine run: stdout must be the trace's NDJSON alone (header first, summary \
             last), got:\n{stdout}"
        );
    }
    if !cargo_home.join("bin/bpf-linker").exists() {
        bail!("fresh-machine run: bpf-linker was not installed into the fresh CARGO_HOME");
    }
    eprintln!(
        "xtask: fresh-machine run: ok ({} NDJSON lines, all parsed by jq)",
        types.len()
    );
    Ok(())
}
