//! Builds the eBPF object (nightly, bpfel-unknown-none, -Z build-std=core, bpf-linker) and leaves
//! it in OUT_DIR, where `src/loader.rs` embeds it: `cargo build` gives one self-contained binary.
//!
//! Where that build is impossible (no nightly toolchain, no rust-src for it, no bpf-linker), or
//! when `PORTEXHAUST_EBPF_PREBUILT=1` asks for it, the checked-in object of the target's
//! architecture (`portexhaust-ebpf/prebuilt/`) is embedded instead, with a warning: the
//! userspace binary then builds on stable alone. A failing build of the eBPF sources is never
//! papered over with the prebuilt object: that is an error.
//!
//! `OUT_DIR/ebpf-origin` says which it was (`built` or `prebuilt: REASON`): `cargo xtask
//! prebuilt --check` reads it, so that a check never compares the prebuilt object with itself.
use std::{
    env, fs,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context as _, anyhow};

/// Forces the checked-in object (any value but empty and `0`).
const FORCE_ENV: &str = "PORTEXHAUST_EBPF_PREBUILT";

fn main() -> anyhow::Result<()> {
    println!("cargo:rerun-if-env-changed={FORCE_ENV}");
    let meta = cargo_metadata::MetadataCommand::new()
        .no_deps()
        .exec()
        .context("cargo metadata")?;
    let ebpf = meta
        .packages
        .into_iter()
        .find(|p| p.name.as_str() == "portexhaust-ebpf")
        .ok_or_else(|| anyhow!("portexhaust-ebpf package not found in the workspace"))?;
    let root = ebpf
        .manifest_path
        .parent()
        .ok_or_else(|| anyhow!("portexhaust-ebpf has no manifest dir"))?;
    let out_dir = PathBuf::from(env::var_os("OUT_DIR").context("OUT_DIR not set")?);
    // The object depends on the architecture: kprobe programs read arguments from that
    // architecture's pt_regs (aya-build passes bpf_target_arch from it).
    let arch = env::var("CARGO_CFG_TARGET_ARCH").context("CARGO_CFG_TARGET_ARCH not set")?;
    let prebuilt = root
        .as_std_path()
        .join("prebuilt")
        .join(format!("portexhaust-ebpf-{arch}.o"));

    let forced = env::var(FORCE_ENV).is_ok_and(|v| !v.is_empty() && v != "0");
    let why_not = if forced {
        Some(format!("{FORCE_ENV}=1"))
    } else {
        nightly_build_impossible()
    };
    let origin = match why_not {
        None => {
            let pkg = aya_build::Package {
                name: ebpf.name.as_str(),
                root_dir: root.as_str(),
                ..Default::default()
            };
            aya_build::build_ebpf([pkg], aya_build::Toolchain::default()).context(
                "building the eBPF programs (run `cargo xtask setup` if nightly rust-src or \
                 bpf-linker is missing)",
            )?;
            "built".to_string()
        }
        Some(why) => {
            // The sources still decide when this script runs again: a change to them
            // repeats the warning below (the object may then be stale).
            println!("cargo:rerun-if-changed={root}");
            println!("cargo:rerun-if-changed={}", prebuilt.display());
            use_prebuilt(&prebuilt, &out_dir, &why)?;
            format!("prebuilt: {why}")
        }
    };
    fs::write(out_dir.join("ebpf-origin"), &origin).context("writing OUT_DIR/ebpf-origin")?;
    Ok(())
}

/// Copy the checked-in object to where `loader.rs` embeds it from, and say so.
fn use_prebuilt(prebuilt: &Path, out_dir: &Path, why: &str) -> anyhow::Result<()> {
    fs::copy(prebuilt, out_dir.join("portexhaust-ebpf")).with_context(|| {
        format!(
            "the eBPF programs cannot be built here ({why}) and there is no prebuilt object \
             for this architecture at {}: install nightly with rust-src and bpf-linker \
             (`cargo xtask setup`)",
            prebuilt.display()
        )
    })?;
    println!(
        "cargo:warning=embedding the checked-in eBPF object {} ({why}); it matches the \
         sources only as of its last `cargo xtask prebuilt`",
        prebuilt.display()
    );
    Ok(())
}

/// Why the nightly eBPF build cannot run here, if it cannot: checked before trying, so that
/// only a missing tool (never a compile error in the programs) leads to the prebuilt object.
fn nightly_build_impossible() -> Option<String> {
    // aya-build runs `rustup run nightly cargo build ...`.
    let Some(version) = stdout(Command::new("rustup").args(["run", "nightly", "rustc", "-V"]))
    else {
        return Some("no nightly toolchain (`rustup run nightly rustc -V` failed)".into());
    };
    if !version.contains("nightly") {
        return Some(format!(
            "`rustup run nightly rustc -V` says {:?}",
            version.trim()
        ));
    }
    let Some(sysroot) =
        stdout(Command::new("rustup").args(["run", "nightly", "rustc", "--print", "sysroot"]))
    else {
        return Some("`rustup run nightly rustc --print sysroot` failed".into());
    };
    let core = Path::new(sysroot.trim()).join("lib/rustlib/src/rust/library/core/Cargo.toml");
    if !core.exists() {
        return Some("the nightly toolchain has no rust-src (needed for -Z build-std=core)".into());
    }
    // rustc finds the linker of the bpfel target on PATH: look for it with the PATH that
    // `rustup run nightly` gives the build.
    if stdout(Command::new("rustup").args(["run", "nightly", "bpf-linker", "--version"])).is_none()
    {
        return Some("bpf-linker is not on PATH".into());
    }
    None
}

fn stdout(cmd: &mut Command) -> Option<String> {
    let out = cmd.output().ok()?;
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).into_owned())
}
