//! Fresh-machine set-up, build, run and install.
//!
//! What a fresh machine of this kind lacks (see shared/notes/toolchain.md): nightly `rust-src`
//! (for `-Z build-std=core`) and `bpf-linker` built against the nightly toolchain's own LLVM
//! (the crates.io default wants a newer LLVM than the toolchain ships) to build and run; for
//! the tests also nightly clippy, Debian packages and a PyPI validator. `cargo xtask run`
//! installs only the first group, `cargo xtask test` and `setup --tests` both. Every step
//! checks first and only acts when something is missing, and everything it and the commands
//! it runs print goes to stderr: `cargo xtask run -- trace --json | jq` gets only the trace.
use std::{
    env,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context as _, Result, bail};

/// What to install: what building and running need, or that and what the tests need.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Scope {
    Run,
    Tests,
}

/// Debian packages the test suite, the VM matrix and the benchmarks use (building and running
/// portexhaust needs none: it talks to the kernel through bpf(2) and netlink, not tools).
pub const TEST_DEBIAN_PACKAGES: &[&str] = &[
    "iproute2",        // ip, ss: namespaces and socket listings in tests
    "procps",          // sysctl
    "qemu-system-x86", // vmtest: boots other kernels
    "busybox-static",  // vmtest: the guest userland
    "cpio",            // vmtest: initramfs
    "prometheus",      // fleet tests: a real Prometheus scrapes `trace --metrics-addr`
    "systemd",         // fleet tests: systemd-analyze verify/security of deploy/portexhaust.service
    "util-linux",      // fleet tests: setpriv runs the tracer with exactly the unit's capabilities
    "chromium",        // tests/report_html.rs: the HTML report in a headless browser
    "bpftrace",        // bench: the one-liner portexhaust is compared with
    "bpftool",         // bench: BPF program names in the profile
    "jq",              // test: `cargo xtask run -- trace --json | jq` on a fresh set-up
    "nftables",        // tests/nat.rs: the router namespace's masquerade and drop rules
    // dist (xtask/src/dist.rs) and its tests (portexhaust/tests/dist.rs):
    "buildah",  // dist: the container image of deploy/Containerfile, as an OCI archive
    "binutils", // dist: readelf checks that the release binaries need no shared library
    "man-db",   // tests/dist.rs: `man -w portexhaust` finds the installed page
];

/// PyPI tools the tests use, pinned, with the command each provides. They go into a private
/// virtualenv (Debian's own Python refuses system-wide pip installs), unless already on PATH.
pub const PYPI_TOOLS: &[(&str, &str)] = &[
    // Validates deploy/kubernetes against the Kubernetes JSON schemas it bundles (offline).
    ("kubernetes-validate==1.37.0", "kubernetes-validate"),
];

/// The virtualenv for `PYPI_TOOLS`; portexhaust/tests/fleet.rs looks here too.
pub fn venv_dir() -> PathBuf {
    home().join(".cache/portexhaust/venv")
}

fn log(msg: impl AsRef<str>) {
    eprintln!("xtask: {}", msg.as_ref());
}

pub fn workspace_root() -> PathBuf {
    // xtask/Cargo.toml sits one level below the workspace root.
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_else(|| PathBuf::from("."))
}

pub fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

fn output(cmd: &mut Command) -> Option<String> {
    let out = cmd.output().ok()?;
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Run a set-up or build step with its stdout sent to our stderr (apt-get and pip print
/// progress on stdout), so that `cargo xtask run -- ... | consumer` sees only portexhaust.
pub fn run_step(cmd: &mut Command) -> Result<()> {
    run_checked(cmd.stdout(std::io::stderr()))
}

pub fn run_checked(cmd: &mut Command) -> Result<()> {
    let status = cmd
        .status()
        .with_context(|| format!("could not start {cmd:?}"))?;
    if !status.success() {
        bail!("{cmd:?} failed: {status}");
    }
    Ok(())
}

fn home() -> PathBuf {
    env::var_os("HOME")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/root"))
}

/// The nightly toolchain's own libLLVM, which bpf-linker must be linked against.
fn nightly_libllvm() -> Result<PathBuf> {
    let sysroot = output(Command::new("rustc").args(["+nightly", "--print", "sysroot"]))
        .context("the nightly toolchain is missing: `rustup toolchain install nightly`")?;
    let lib = Path::new(sysroot.trim()).join("lib");
    let found = std::fs::read_dir(&lib)
        .with_context(|| format!("reading {}", lib.display()))?
        .filter_map(|e| e.ok())
        .map(|e| e.path())
        .find(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with("libLLVM.so.") || n.starts_with("libLLVM-"))
        });
    found.with_context(|| format!("no libLLVM shared library in {}", lib.display()))
}

fn llvm_major(lib: &Path) -> Option<u32> {
    // libLLVM.so.22.1-rust-1.97.0-nightly -> 22
    let name = lib.file_name()?.to_str()?;
    let rest = name
        .strip_prefix("libLLVM.so.")
        .or_else(|| name.strip_prefix("libLLVM-"))?;
    rest.split(|c: char| !c.is_ascii_digit())
        .next()?
        .parse()
        .ok()
}

fn bpf_linker_works() -> bool {
    output(Command::new("bpf-linker").arg("--version")).is_some()
        || output(Command::new(home().join(".cargo/bin/bpf-linker")).arg("--version")).is_some()
}

fn install_bpf_linker() -> Result<()> {
    let llvm = nightly_libllvm()?;
    let major =
        llvm_major(&llvm).context("cannot tell the LLVM version of the nightly toolchain")?;
    // A private prefix whose lib/ holds libLLVM.so (for linking) and the soname (for run time,
    // through bpf-linker's rpath). It must stay in place after the install.
    let shim = home().join(".cache/portexhaust-llvm/lib");
    std::fs::create_dir_all(&shim)?;
    for name in [
        "libLLVM.so".to_string(),
        llvm.file_name()
            .and_then(|n| n.to_str())
            .unwrap_or("libLLVM.so")
            .to_string(),
    ] {
        let link = shim.join(name);
        let _ = std::fs::remove_file(&link);
        std::os::unix::fs::symlink(&llvm, &link)
            .with_context(|| format!("linking {}", link.display()))?;
    }
    log(format!(
        "installing bpf-linker against the nightly toolchain's LLVM {major} (about a minute)"
    ));
    let prefix = shim.parent().context("shim has a parent")?;
    run_step(
        Command::new("cargo")
            .args([
                "install",
                "--locked",
                "bpf-linker",
                "--no-default-features",
                "--features",
            ])
            .arg(format!("llvm-{major}"))
            .env("LLVM_PREFIX", prefix),
    )
}

fn pypi_tool_works(cmd: &str) -> bool {
    output(Command::new(cmd).arg("--version")).is_some()
        || output(Command::new(venv_dir().join("bin").join(cmd)).arg("--version")).is_some()
}

fn install_pypi_tools() -> Result<Vec<String>> {
    let missing: Vec<&str> = PYPI_TOOLS
        .iter()
        .filter(|(_, cmd)| !pypi_tool_works(cmd))
        .map(|(pkg, _)| *pkg)
        .collect();
    if missing.is_empty() {
        return Ok(Vec::new());
    }
    let venv = venv_dir();
    if !venv.join("bin/pip").exists() {
        log(format!(
            "creating a Python virtualenv in {}",
            venv.display()
        ));
        run_step(Command::new("python3").arg("-m").arg("venv").arg(&venv)).context(
            "python3 -m venv failed: install python3 and python3-venv (apt-get install python3-venv)",
        )?;
    }
    log(format!("installing from PyPI: {}", missing.join(" ")));
    run_step(
        Command::new(venv.join("bin/pip"))
            .args(["install", "--quiet", "--disable-pip-version-check"])
            .args(&missing),
    )?;
    Ok(vec![format!(
        "installed from PyPI into {}: {}",
        venv.display(),
        missing.join(" ")
    )])
}

fn missing_debian_packages() -> Vec<&'static str> {
    TEST_DEBIAN_PACKAGES
        .iter()
        .copied()
        .filter(|p| {
            !output(Command::new("dpkg-query").args(["-W", "-f=${Status}", p]))
                .is_some_and(|s| s.contains("install ok installed"))
        })
        .collect()
}

/// `cargo xtask setup [--tests]`: install what `scope` needs and is missing; returns what was
/// done (empty when nothing was needed).
pub fn setup(scope: Scope) -> Result<Vec<String>> {
    let mut did = Vec::new();

    let toolchains = output(Command::new("rustup").args(["toolchain", "list"])).unwrap_or_default();
    if !toolchains.lines().any(|l| l.starts_with("nightly")) {
        log("installing the nightly toolchain");
        run_step(Command::new("rustup").args([
            "toolchain",
            "install",
            "nightly",
            "--profile",
            "minimal",
        ]))?;
        did.push("installed the nightly toolchain".to_string());
    }

    let comps = output(Command::new("rustup").args([
        "component",
        "list",
        "--toolchain",
        "nightly",
        "--installed",
    ]))
    .unwrap_or_default();
    // rust-src for -Z build-std=core; clippy only for the tests' lint of the eBPF crate, which
    // is built with nightly.
    let wanted: &[&str] = match scope {
        Scope::Run => &["rust-src"],
        Scope::Tests => &["rust-src", "clippy"],
    };
    for comp in wanted {
        if !comps.lines().any(|l| l.starts_with(comp)) {
            log(format!("adding {comp} to the nightly toolchain"));
            run_step(Command::new("rustup").args([
                "component",
                "add",
                comp,
                "--toolchain",
                "nightly",
            ]))?;
            did.push(format!("added nightly {comp}"));
        }
    }

    if !bpf_linker_works() {
        install_bpf_linker()?;
        did.push("installed bpf-linker".to_string());
    }

    if scope == Scope::Tests {
        let missing = missing_debian_packages();
        if !missing.is_empty() {
            if !is_root() {
                bail!(
                    "Debian packages the tests need are missing: {}; run `sudo apt-get install -y \
                     {}` or run this as root",
                    missing.join(" "),
                    missing.join(" ")
                );
            }
            log(format!("installing Debian packages: {}", missing.join(" ")));
            run_step(Command::new("apt-get").args(["update", "-qq"]))?;
            run_step(
                Command::new("apt-get")
                    .args(["install", "-y", "-qq", "--no-install-recommends"])
                    .args(&missing)
                    .env("DEBIAN_FRONTEND", "noninteractive"),
            )?;
            did.push(format!("installed Debian packages: {}", missing.join(" ")));
        }
        // PyPI tools last: the virtualenv needs python3, which these machines have.
        did.extend(install_pypi_tools()?);
    }

    let what = match scope {
        Scope::Run => "building and running",
        Scope::Tests => "building, running and the tests",
    };
    if did.is_empty() {
        log(format!(
            "setup: everything {what} need was already in place"
        ));
    } else {
        for d in &did {
            log(format!("setup: {d}"));
        }
    }
    Ok(did)
}

/// Build the release binary and return its path.
pub fn build_release() -> Result<PathBuf> {
    setup(Scope::Run)?;
    let root = workspace_root();
    log("building portexhaust (release, eBPF object embedded)");
    run_step(Command::new("cargo").current_dir(&root).args([
        "build",
        "--release",
        "--package",
        "portexhaust",
    ]))?;
    let bin = root.join("target/release/portexhaust");
    if !bin.exists() {
        bail!("build finished but {} is missing", bin.display());
    }
    Ok(bin)
}

pub fn run(args: &[String]) -> Result<()> {
    let bin = build_release()?;
    let mut cmd = if is_root() {
        Command::new(&bin)
    } else {
        let mut c = Command::new("sudo");
        c.arg("-E").arg(&bin);
        c
    };
    cmd.args(args);
    let status = cmd
        .status()
        .with_context(|| format!("could not start {}", bin.display()))?;
    std::process::exit(status.code().unwrap_or(1));
}

pub fn install(prefix: &str) -> Result<()> {
    let bin = build_release()?;
    let dest = Path::new(prefix).join("portexhaust");
    let mut cmd = if is_root() {
        Command::new("install")
    } else {
        let mut c = Command::new("sudo");
        c.arg("install");
        c
    };
    run_checked(cmd.args(["-m", "0755"]).arg(&bin).arg(&dest))?;
    log(format!("installed {}", dest.display()));
    Ok(())
}

/// Set up if needed, then build the release binaries the bench and the soak run:
/// portexhaust and the pxh-loadgen load generators.
pub fn build_tools() -> Result<()> {
    // The bench and the soak compare with bpftrace and name programs with bpftool.
    setup(Scope::Tests)?;
    eprintln!("xtask: building portexhaust and pxh-loadgen (release)");
    run_step(Command::new("cargo").current_dir(workspace_root()).args([
        "build",
        "--release",
        "--package",
        "portexhaust",
        "--package",
        "pxh-loadgen",
    ]))
}
