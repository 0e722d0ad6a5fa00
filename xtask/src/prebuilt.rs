//! `cargo xtask prebuilt`: refresh the checked-in eBPF objects that `portexhaust/build.rs`
//! embeds where the nightly eBPF build is impossible (see build.rs); `--check`: fail if they no
//! longer match the sources (a stage of `cargo xtask test`).
//!
//! The fresh object is the one build.rs itself builds: `cargo build -p portexhaust` runs the
//! build script (aya-build, nightly, bpf-linker), and its OUT_DIR holds the object and
//! `ebpf-origin`, which must say `built`. One object per architecture: the kprobe programs
//! read their arguments from that architecture's `pt_regs`.
mod objdiff;

use std::{
    fs,
    io::{BufRead as _, BufReader},
    path::{Path, PathBuf},
    process::{Command, Stdio},
};

use anyhow::{Context as _, Result, bail};

use crate::{dist, setup::workspace_root};

/// Architectures with a checked-in object.
pub const ARCHES: &[&str] = &["x86_64", "aarch64"];

/// The command that refreshes the objects, for messages.
pub const REFRESH: &str = "cargo xtask prebuilt";

#[derive(clap::Args, Debug, Default)]
pub struct PrebuiltArgs {
    /// Compare the checked-in objects with fresh builds instead of writing them; fails on any
    /// difference in programs, maps, symbols or BTF types.
    #[arg(long)]
    pub check: bool,
    /// Only these architectures (comma-separated; default: x86_64,aarch64).
    #[arg(long, value_delimiter = ',')]
    pub arch: Vec<String>,
}

pub fn prebuilt_path(root: &Path, arch: &str) -> PathBuf {
    root.join("portexhaust-ebpf/prebuilt")
        .join(format!("portexhaust-ebpf-{arch}.o"))
}

pub fn prebuilt(args: &PrebuiltArgs) -> Result<()> {
    let root = workspace_root();
    let arches: Vec<&str> = if args.arch.is_empty() {
        ARCHES.to_vec()
    } else {
        args.arch.iter().map(String::as_str).collect()
    };
    let mut stale = Vec::new();
    for arch in arches {
        if !ARCHES.contains(&arch) {
            bail!("no eBPF object for {arch:?}: the architectures are {ARCHES:?}");
        }
        let fresh = fresh_object(arch)?;
        let path = prebuilt_path(&root, arch);
        let diffs = match fs::read(&path) {
            Ok(old) => objdiff::differences(&old, &fresh)
                .with_context(|| format!("comparing {} with a fresh build", path.display()))?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                vec![format!("{} does not exist", path.display())]
            }
            Err(e) => return Err(e).with_context(|| format!("reading {}", path.display())),
        };
        if diffs.is_empty() {
            eprintln!(
                "xtask: {}: matches the sources ({} bytes)",
                path.display(),
                fresh.len()
            );
            continue;
        }
        for d in &diffs {
            eprintln!("xtask: {arch}: {d}");
        }
        if args.check {
            stale.push(arch);
        } else {
            fs::create_dir_all(path.parent().context("prebuilt dir")?)?;
            fs::write(&path, &fresh).with_context(|| format!("writing {}", path.display()))?;
            eprintln!(
                "xtask: wrote {} ({} bytes): commit it with the eBPF sources",
                path.display(),
                fresh.len()
            );
        }
    }
    if !stale.is_empty() {
        bail!(
            "the checked-in eBPF object(s) for {} no longer match portexhaust-ebpf/src (the \
             differences are above): run `{REFRESH}` and commit portexhaust-ebpf/prebuilt/",
            stale.join(", ")
        );
    }
    Ok(())
}

/// The object build.rs builds from the sources for `arch`, as bytes.
fn fresh_object(arch: &str) -> Result<Vec<u8>> {
    let root = workspace_root();
    let meta = dist::workspace_meta()?;
    // The host's own target shares its build with `cargo build --release`; another
    // architecture is built for its musl target, as `cargo xtask dist` builds it (so that
    // the two share the work).
    let triple = (arch != std::env::consts::ARCH).then(|| format!("{arch}-unknown-linux-musl"));
    if let Some(t) = &triple {
        dist::ensure_rust_target(t)?;
    }
    eprintln!("xtask: building the eBPF object for {arch} from the sources (nightly)");
    let mut cmd = Command::new("cargo");
    cmd.current_dir(&root)
        .args([
            "build",
            "--release",
            "--package",
            "portexhaust",
            "--bin",
            "portexhaust",
        ])
        .args(["--message-format", "json-render-diagnostics"])
        // The point is the nightly build: never let the environment force the fallback.
        .env_remove("PORTEXHAUST_EBPF_PREBUILT")
        .stdout(Stdio::piped());
    if let Some(t) = &triple {
        cmd.args(["--target", t]);
    }
    let mut child = cmd.spawn().context("starting cargo build")?;
    let stdout = child.stdout.take().context("cargo stdout")?;
    let mut out_dir = None;
    for line in BufReader::new(stdout).lines() {
        let line = line?;
        let Ok(msg) = serde_json::from_str::<serde_json::Value>(&line) else {
            continue;
        };
        if msg["reason"] == "build-script-executed" && msg["package_id"] == meta.portexhaust_id {
            out_dir = msg["out_dir"].as_str().map(PathBuf::from);
        }
    }
    let status = child.wait()?;
    if !status.success() {
        bail!("cargo build of portexhaust for {arch} failed: {status}");
    }
    let out_dir = out_dir.context("cargo did not report portexhaust's build script output")?;
    let origin = fs::read_to_string(out_dir.join("ebpf-origin"))
        .with_context(|| format!("reading {}/ebpf-origin", out_dir.display()))?;
    if origin.trim() != "built" {
        bail!(
            "the eBPF object was not built from the sources ({}): the check and the refresh need \
             nightly with rust-src and bpf-linker: run `cargo xtask setup`",
            origin.trim()
        );
    }
    let obj = out_dir.join("portexhaust-ebpf");
    fs::read(&obj).with_context(|| format!("reading {}", obj.display()))
}
