//! Builds the eBPF object (nightly, bpfel-unknown-none, -Z build-std=core, bpf-linker) and leaves
//! it in OUT_DIR, where `src/loader.rs` embeds it: `cargo build` gives one self-contained binary.
use anyhow::{Context as _, anyhow};

fn main() -> anyhow::Result<()> {
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
    let pkg = aya_build::Package {
        name: ebpf.name.as_str(),
        root_dir: root.as_str(),
        ..Default::default()
    };
    aya_build::build_ebpf([pkg], aya_build::Toolchain::default())
        .context("building the eBPF programs (run `cargo xtask setup` if nightly rust-src or bpf-linker is missing)")
}
