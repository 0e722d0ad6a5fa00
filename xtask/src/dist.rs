//! `cargo xtask dist`: the release artefacts, in `target/dist/`:
//!
//! - `portexhaust-VERSION-ARCH-linux-musl`: static, stripped binaries (x86_64, and aarch64 by
//!   cross-linking with the toolchain's own rust-lld), eBPF object embedded;
//! - `portexhaust_VERSION-1_amd64.deb` (cargo-deb): the x86_64 binary in /usr/bin, the systemd
//!   unit (installed, not enabled), man pages (clap_mangen, from the binary) and completions;
//! - `portexhaust-VERSION-amd64.oci.tar`: the image of `deploy/Containerfile` (buildah), an OCI
//!   archive;
//! - `dist.json` (what was built, for the tests in portexhaust/tests/dist.rs) and `SHA256SUMS`.
//!
//! What it needs and lacks it installs first, idempotently: the musl targets (rustup),
//! cargo-deb (crates.io; Debian has none) and buildah (Debian). Diagnostics go to stderr.
use std::{
    fs,
    io::{BufRead as _, BufReader},
    path::{Path, PathBuf},
    process::{Command, Stdio},
};

use anyhow::{Context as _, Result, bail};
use serde_json::json;

use crate::setup::{is_root, run_checked, workspace_root};

/// Release targets: (architecture, Rust target, Debian and OCI architecture).
pub const TARGETS: &[(&str, &str, &str)] = &[
    ("x86_64", "x86_64-unknown-linux-musl", "amd64"),
    ("aarch64", "aarch64-unknown-linux-musl", "arm64"),
];

#[derive(clap::Args, Debug, Default)]
pub struct DistArgs {
    /// Leave out the aarch64 binary.
    #[arg(long)]
    pub no_aarch64: bool,
    /// Leave out the container image.
    #[arg(long)]
    pub no_image: bool,
}

fn log(msg: impl AsRef<str>) {
    eprintln!("xtask: dist: {}", msg.as_ref());
}

/// What `cargo metadata` says that dist needs.
pub struct Meta {
    pub target_dir: PathBuf,
    pub version: String,
    /// The package id cargo's JSON messages name portexhaust by.
    pub portexhaust_id: String,
}

pub fn workspace_meta() -> Result<Meta> {
    let out = Command::new("cargo")
        .current_dir(workspace_root())
        .args(["metadata", "--format-version", "1", "--no-deps"])
        .stderr(Stdio::inherit())
        .output()
        .context("running cargo metadata")?;
    if !out.status.success() {
        bail!("cargo metadata failed: {}", out.status);
    }
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).context("cargo metadata")?;
    let pkg = v["packages"]
        .as_array()
        .and_then(|p| p.iter().find(|p| p["name"] == "portexhaust"))
        .context("no portexhaust package in cargo metadata")?;
    Ok(Meta {
        target_dir: PathBuf::from(
            v["target_directory"]
                .as_str()
                .context("cargo metadata: no target_directory")?,
        ),
        version: pkg["version"].as_str().context("no version")?.to_string(),
        portexhaust_id: pkg["id"].as_str().context("no package id")?.to_string(),
    })
}

/// The dist directory, `target/dist` (under CARGO_TARGET_DIR when that is set).
pub fn dist_dir() -> Result<PathBuf> {
    Ok(workspace_meta()?.target_dir.join("dist"))
}

fn output(cmd: &mut Command) -> Option<String> {
    let out = cmd.stderr(Stdio::null()).output().ok()?;
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).into_owned())
}

/// `rustup target add TRIPLE` unless the active toolchain already has its standard library.
pub fn ensure_rust_target(triple: &str) -> Result<()> {
    let sysroot = output(Command::new("rustc").args(["--print", "sysroot"]))
        .context("rustc --print sysroot failed")?;
    let lib = Path::new(sysroot.trim()).join("lib/rustlib").join(triple);
    if lib.join("lib").is_dir() {
        return Ok(());
    }
    log(format!("adding the Rust target {triple} (rustup)"));
    run_checked(Command::new("rustup").args(["target", "add", triple]))
        .with_context(|| format!("rustup could not fetch the {triple} standard library"))
}

fn ensure_cargo_deb() -> Result<()> {
    if output(Command::new("cargo").args(["deb", "--version"])).is_some() {
        return Ok(());
    }
    log("installing cargo-deb from crates.io (cargo install --locked)");
    run_checked(Command::new("cargo").args(["install", "cargo-deb", "--locked"]))
}

fn ensure_buildah() -> Result<()> {
    if output(Command::new("buildah").arg("--version")).is_some() {
        return Ok(());
    }
    if !is_root() {
        bail!("buildah is missing: `sudo apt-get install buildah`, or run this as root");
    }
    log("installing buildah (Debian)");
    run_checked(Command::new("apt-get").args(["update", "-qq"]))?;
    run_checked(
        Command::new("apt-get")
            .args(["install", "-y", "-qq", "--no-install-recommends", "buildah"])
            .env("DEBIAN_FRONTEND", "noninteractive"),
    )
}

/// A static binary built for one target.
struct Built {
    arch: &'static str,
    debian_arch: &'static str,
    /// Where cargo left it (cargo-deb packages it from there).
    cargo_path: PathBuf,
    /// Its copy in target/dist.
    dist_name: String,
    /// `built` or `prebuilt: why` (portexhaust/build.rs).
    ebpf_origin: String,
}

/// `cargo build --release --target TRIPLE -p portexhaust`; stripping and the aarch64 linker
/// come from `.cargo/config.toml`, static linking is the musl targets' default.
fn build_static(
    meta: &Meta,
    dist: &Path,
    (arch, triple, debian_arch): (&'static str, &str, &'static str),
) -> Result<Built> {
    ensure_rust_target(triple)?;
    log(format!("building the static {arch} binary ({triple})"));
    let mut child = Command::new("cargo")
        .current_dir(workspace_root())
        .args(["build", "--release", "--package", "portexhaust", "--bin"])
        .args(["portexhaust", "--target", triple])
        .args(["--message-format", "json-render-diagnostics"])
        .stdout(Stdio::piped())
        .spawn()
        .context("starting cargo build")?;
    let stdout = child.stdout.take().context("cargo stdout")?;
    let (mut exe, mut out_dir) = (None, None);
    for line in BufReader::new(stdout).lines() {
        let Ok(msg) = serde_json::from_str::<serde_json::Value>(&line?) else {
            continue;
        };
        if msg["package_id"] != meta.portexhaust_id {
            continue;
        }
        match msg["reason"].as_str() {
            Some("build-script-executed") => {
                out_dir = msg["out_dir"].as_str().map(PathBuf::from);
            }
            Some("compiler-artifact") if msg["target"]["name"] == "portexhaust" => {
                if let Some(e) = msg["executable"].as_str() {
                    exe = Some(PathBuf::from(e));
                }
            }
            _ => {}
        }
    }
    let status = child.wait()?;
    if !status.success() {
        bail!("cargo build for {triple} failed: {status}");
    }
    let exe = exe.context("cargo reported no portexhaust executable")?;
    let out_dir = out_dir.context("cargo reported no build script output for portexhaust")?;
    let ebpf_origin = fs::read_to_string(out_dir.join("ebpf-origin"))
        .context("reading ebpf-origin")?
        .trim()
        .to_string();
    check_static(&exe)?;
    let dist_name = format!("portexhaust-{}-{arch}-linux-musl", meta.version);
    fs::copy(&exe, dist.join(&dist_name))
        .with_context(|| format!("copying {} into {}", exe.display(), dist.display()))?;
    log(format!(
        "{dist_name}: {} bytes, eBPF object {ebpf_origin}",
        fs::metadata(&exe)?.len()
    ));
    Ok(Built {
        arch,
        debian_arch,
        cargo_path: exe,
        dist_name,
        ebpf_origin,
    })
}

/// No program interpreter, no shared library, no symbol table: what `ldd` calls "statically
/// linked" and `file` "stripped", read from the ELF itself so that it holds for aarch64 too.
/// (A static-pie binary keeps a .dynamic section for relocating itself, without DT_NEEDED.)
fn check_static(exe: &Path) -> Result<()> {
    use object::Object as _;
    let data = fs::read(exe).with_context(|| format!("reading {}", exe.display()))?;
    let file = object::File::parse(&*data).context("parsing the binary")?;
    if file.section_by_name(".interp").is_some() {
        bail!("{} needs a dynamic loader (.interp)", exe.display());
    }
    let needed = needed_libraries(exe)?;
    if !needed.is_empty() {
        bail!(
            "{} needs shared libraries: {}",
            exe.display(),
            needed.join("; ")
        );
    }
    if file.section_by_name(".symtab").is_some() {
        bail!("{} is not stripped (.symtab)", exe.display());
    }
    Ok(())
}

/// The DT_NEEDED entries of a binary, from `readelf -d` (binutils reads any architecture).
fn needed_libraries(exe: &Path) -> Result<Vec<String>> {
    let out = Command::new("readelf")
        .arg("-d")
        .arg(exe)
        .output()
        .context("readelf (binutils) is missing")?;
    if !out.status.success() {
        bail!("readelf -d {} failed: {}", exe.display(), out.status);
    }
    Ok(String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter(|l| l.contains("(NEEDED)"))
        .map(str::to_string)
        .collect())
}

/// The files the .deb takes besides the binary, generated by the x86_64 binary itself, into
/// `dir` (cargo-deb's `target/release/dist-assets`).
fn deb_assets(bin: &Path, dir: &Path) -> Result<()> {
    let _ = fs::remove_dir_all(dir);
    let man = dir.join("man");
    run_checked(Command::new(bin).arg("manpages").arg("--out-dir").arg(&man))?;
    let mut pages = Vec::new();
    for e in fs::read_dir(&man)? {
        let p = e?.path();
        if p.extension().is_some_and(|x| x == "1") {
            pages.push(p);
        }
    }
    if pages.is_empty() {
        bail!("`portexhaust manpages` wrote no page");
    }
    // -n: no name or timestamp in the header, so the same pages give the same bytes.
    run_checked(Command::new("gzip").args(["-9", "-n", "-f"]).args(&pages))?;
    let comp = dir.join("completions");
    fs::create_dir_all(&comp)?;
    for (shell, file) in [
        ("bash", "portexhaust.bash"),
        ("zsh", "_portexhaust"),
        ("fish", "portexhaust.fish"),
    ] {
        let out = Command::new(bin)
            .args(["completions", shell])
            .stderr(Stdio::inherit())
            .output()?;
        if !out.status.success() || out.stdout.is_empty() {
            bail!("`portexhaust completions {shell}` failed: {}", out.status);
        }
        fs::write(comp.join(file), out.stdout)?;
    }
    fs::write(dir.join("portexhaust.service"), deb_unit()?)?;
    Ok(())
}

/// deploy/portexhaust.service with the packaged binary's path.
fn deb_unit() -> Result<String> {
    let path = workspace_root().join("deploy/portexhaust.service");
    let unit = fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
    const FROM: &str = "ExecStart=/usr/local/bin/portexhaust ";
    if !unit.contains(FROM) {
        bail!("{}: no `{FROM}` line to point at /usr/bin", path.display());
    }
    Ok(format!(
        "# Installed by the portexhaust package, not enabled: `systemctl enable --now portexhaust`.\n{}",
        unit.replace(FROM, "ExecStart=/usr/bin/portexhaust ")
    ))
}

fn build_deb(meta: &Meta, dist: &Path, x86: &Built) -> Result<String> {
    ensure_cargo_deb()?;
    let (_, triple, _) = TARGETS[0];
    let assets = x86
        .cargo_path
        .parent()
        .context("binary dir")?
        .join("dist-assets");
    deb_assets(&x86.cargo_path, &assets)?;
    let name = format!("portexhaust_{}-1_{}.deb", meta.version, x86.debian_arch);
    log(format!("packaging {name} (cargo-deb)"));
    run_checked(
        Command::new("cargo")
            .current_dir(workspace_root())
            .args([
                "deb",
                "--package",
                "portexhaust",
                "--no-build",
                "--no-strip",
            ])
            .args(["--target", triple, "--output"])
            .arg(dist.join(&name)),
    )?;
    Ok(name)
}

/// `buildah bud` of deploy/Containerfile with the static binary, into an OCI archive. The
/// image is `FROM scratch`, so nothing is pulled and nothing runs inside it at build time; the
/// storage is private to target/ (vfs: no overlay mounts needed) and removed afterwards.
fn build_image(meta: &Meta, dist: &Path, bin: &Built) -> Result<String> {
    ensure_buildah()?;
    let work = meta.target_dir.join("dist-work/image");
    let _ = fs::remove_dir_all(&work);
    let context = work.join("context");
    fs::create_dir_all(&context)?;
    fs::copy(dist.join(&bin.dist_name), context.join("portexhaust"))?;
    let tag = format!("localhost/portexhaust:{}", meta.version);
    let name = format!("portexhaust-{}-{}.oci.tar", meta.version, bin.debian_arch);
    let archive = dist.join(&name);
    let _ = fs::remove_file(&archive);
    let buildah = |args: &[&str]| {
        let mut c = Command::new("buildah");
        c.arg("--root")
            .arg(work.join("storage"))
            .arg("--runroot")
            .arg(work.join("run"))
            .args(["--storage-driver", "vfs"])
            .args(args);
        c
    };
    log(format!("building the image {tag} (buildah)"));
    let containerfile = workspace_root().join("deploy/Containerfile");
    let context_s = context.to_string_lossy().into_owned();
    let containerfile_s = containerfile.to_string_lossy().into_owned();
    run_checked(&mut buildah(&[
        "bud",
        "--isolation",
        "chroot",
        // Reproducible: the same binary gives the same layer and config digests.
        "--timestamp",
        "0",
        "--arch",
        bin.debian_arch,
        "--os",
        "linux",
        "-f",
        &containerfile_s,
        "-t",
        &tag,
        &context_s,
    ]))?;
    run_checked(&mut buildah(&[
        "push",
        &tag,
        &format!("oci-archive:{}:{tag}", archive.display()),
    ]))?;
    // The vfs storage is a full copy of every layer; the archive is what is kept.
    let _ = fs::remove_dir_all(&work);
    Ok(name)
}

pub fn dist(args: &DistArgs) -> Result<()> {
    let meta = workspace_meta()?;
    let dist = meta.target_dir.join("dist");
    let _ = fs::remove_dir_all(&dist);
    fs::create_dir_all(&dist)?;
    let x86 = build_static(&meta, &dist, TARGETS[0])?;
    let mut binaries = vec![x86];
    if !args.no_aarch64 {
        binaries.push(build_static(&meta, &dist, TARGETS[1])?);
    }
    let x86 = &binaries[0];
    let deb = build_deb(&meta, &dist, x86)?;
    let image = if args.no_image {
        None
    } else {
        Some(build_image(&meta, &dist, x86)?)
    };
    let manifest = json!({
        "version": meta.version,
        "binaries": binaries.iter().map(|b| json!({
            "arch": b.arch,
            "file": b.dist_name,
            "ebpf_object": b.ebpf_origin,
        })).collect::<Vec<_>>(),
        "deb": deb,
        "image": image,
    });
    fs::write(
        dist.join("dist.json"),
        serde_json::to_string_pretty(&manifest)? + "\n",
    )?;
    let mut files: Vec<String> = binaries.iter().map(|b| b.dist_name.clone()).collect();
    files.push(deb);
    files.extend(image);
    let sums = Command::new("sha256sum")
        .current_dir(&dist)
        .args(&files)
        .output()
        .context("sha256sum")?;
    if !sums.status.success() {
        bail!("sha256sum failed: {}", sums.status);
    }
    fs::write(dist.join("SHA256SUMS"), &sums.stdout)?;
    for f in &files {
        log(format!(
            "{}/{f} ({} bytes)",
            dist.display(),
            fs::metadata(dist.join(f))?.len()
        ));
    }
    if binaries.iter().any(|b| b.ebpf_origin != "built") {
        log(
            "note: an eBPF object was the checked-in prebuilt one (see above), not built from the sources",
        );
    }
    Ok(())
}
