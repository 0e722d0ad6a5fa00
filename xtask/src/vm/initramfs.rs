//! The guest's initramfs: busybox, the portexhaust binary with the libraries it links, the
//! kernel modules the test needs, /init and its settings.
use std::{
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context as _, Result, bail};

use super::cpio::Archive;

/// The guest's PID 1; see the comments inside.
const INIT_SCRIPT: &str = include_str!("init.sh");

/// Settings /init reads from /vmtest/env.
#[derive(Debug, Clone)]
pub struct GuestConfig {
    pub kernel_label: String,
    /// Backends to check, in order; empty with `boot_only`.
    pub backends: Vec<String>,
    /// NAT hooks to run the NAT scenario with (`PORTEXHAUST_NAT_HOOK` values), in order.
    pub nat_hooks: Vec<String>,
    pub boot_only: bool,
    pub step_timeout_secs: u64,
    pub trace_secs: u64,
    pub workload_ports: u32,
    pub workload_failures: u32,
    /// Shell commands run after the checks (`--exec`), in order.
    pub exec: Vec<String>,
    /// `cargo xtask bench --vm`: the guest runs `pxh-xtask bench-guest` with this plan (JSON)
    /// instead of the checks.
    pub bench_plan: Option<String>,
    /// Inside the guest, kill the bench after this long.
    pub bench_timeout_secs: u64,
}

impl GuestConfig {
    fn env_file(&self) -> String {
        // Values are plain words (checked by the CLI), so no quoting beyond "..." is needed.
        format!(
            "PXH_KERNEL=\"{}\"\nPXH_MODE=\"{}\"\nPXH_BACKENDS=\"{}\"\nPXH_STEP_TIMEOUT=\"{}\"\n\
             PXH_TRACE_SECS=\"{}\"\nPXH_WORKLOAD_PORTS=\"{}\"\nPXH_WORKLOAD_FAILURES=\"{}\"\n\
             PXH_BENCH_TIMEOUT=\"{}\"\nPXH_NAT_HOOKS=\"{}\"\n",
            self.kernel_label,
            match (self.boot_only, &self.bench_plan) {
                (true, _) => "boot",
                (false, Some(_)) => "bench",
                (false, None) => "full",
            },
            self.backends.join(" "),
            self.step_timeout_secs,
            self.trace_secs,
            self.workload_ports,
            self.workload_failures,
            self.bench_timeout_secs,
            if self.boot_only {
                String::new()
            } else {
                self.nat_hooks.join(" ")
            },
        )
    }
}

/// Host files a dynamically linked program needs at run time, as `ldd` lists them (the
/// dynamic loader included), or nothing for a static program or a script.
pub fn shared_libraries(program: &Path) -> Result<Vec<PathBuf>> {
    let head = std::fs::read(program)
        .with_context(|| format!("reading {}", program.display()))?
        .into_iter()
        .take(4)
        .collect::<Vec<u8>>();
    if head.starts_with(b"#!") {
        return Ok(Vec::new());
    }
    if head != b"\x7fELF" {
        bail!(
            "{} is neither an ELF program nor a script",
            program.display()
        );
    }
    let out = Command::new("ldd")
        .arg(program)
        .env("LC_ALL", "C")
        .output()
        .context("could not run ldd")?;
    let text =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    if text.contains("not a dynamic executable") || text.contains("statically linked") {
        return Ok(Vec::new());
    }
    if !out.status.success() {
        bail!("ldd {} failed: {}", program.display(), text.trim());
    }
    parse_ldd(&text)
}

/// `libc.so.6 => /lib/x86_64-linux-gnu/libc.so.6 (0x...)` and `/lib64/ld-linux-x86-64.so.2
/// (0x...)` lines; the vDSO has no file and is skipped.
fn parse_ldd(text: &str) -> Result<Vec<PathBuf>> {
    let mut libs = Vec::new();
    for line in text.lines() {
        let line = line.trim();
        if line.contains("=> not found") {
            bail!("ldd: {line}");
        }
        let path = match line.split_once("=>") {
            Some((_, rhs)) => rhs.split_whitespace().next(),
            None => line.split_whitespace().next(),
        };
        if let Some(p) = path.filter(|p| p.starts_with('/')) {
            libs.push(PathBuf::from(p));
        }
    }
    Ok(libs)
}

pub struct Payload<'a> {
    pub busybox: &'a Path,
    /// None for a boot-only run.
    pub portexhaust: Option<&'a Path>,
    pub modules: &'a [PathBuf],
    /// More programs, each with the libraries it links: (host path, guest path).
    pub programs: &'a [(PathBuf, String)],
}

/// Assemble the image and write it to `dest`; returns its size in bytes.
pub fn build(payload: &Payload, guest: &GuestConfig, dest: &Path) -> Result<u64> {
    let mut a = Archive::new();
    for d in [
        "/dev",
        "/proc",
        "/sys",
        "/tmp",
        "/run",
        "/root",
        "/etc",
        "/sbin",
        "/usr/sbin",
    ] {
        a.dir(d)?;
    }
    // The kernel opens /dev/console for init's stdio before devtmpfs is mounted.
    a.char_dev("/dev/console", 5, 1)?;
    a.file("/init", 0o755, INIT_SCRIPT.as_bytes().to_vec())?;
    a.file("/vmtest/env", 0o644, guest.env_file().into_bytes())?;
    a.copy_from_host(payload.busybox, "/bin/busybox")?;
    a.symlink("/bin/sh", "busybox")?;
    // Programs and their libraries go to the very paths ldd printed, so the loader path baked
    // into the binary (/lib64/ld-linux-x86-64.so.2) and the default search path both work.
    let mut programs = vec![payload.busybox];
    if let Some(bin) = payload.portexhaust {
        a.copy_from_host(bin, "/usr/bin/portexhaust")?;
        programs.push(bin);
    }
    for (host, guest_path) in payload.programs {
        a.copy_from_host(host, guest_path)?;
        programs.push(host);
    }
    for prog in programs {
        for lib in shared_libraries(prog)? {
            let guest_path = lib.to_string_lossy().into_owned();
            if !a.contains(&guest_path) {
                a.copy_from_host(&lib, &guest_path)
                    .with_context(|| format!("library of {}", prog.display()))?;
            }
        }
    }
    a.dir("/vmtest/exec")?;
    for (i, cmd) in guest.exec.iter().enumerate() {
        // Zero-padded so that the shell's glob runs them in order.
        a.file(
            &format!("/vmtest/exec/{:02}", i + 1),
            0o644,
            format!("{cmd}\n").into_bytes(),
        )?;
    }
    if let Some(plan) = &guest.bench_plan {
        a.file("/vmtest/bench-plan.json", 0o644, plan.clone().into_bytes())?;
    }
    a.dir("/vmtest/modules")?;
    for m in payload.modules {
        let name = m
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .context("module path without a file name")?;
        a.copy_from_host(m, &format!("/vmtest/modules/{name}"))?;
    }
    a.write_file(dest)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_ldd_output() {
        let text = "\tlinux-vdso.so.1 (0x00007ffd)\n\tlibgcc_s.so.1 => /lib/x86_64-linux-gnu/libgcc_s.so.1 (0x7f)\n\tlibc.so.6 => /lib/x86_64-linux-gnu/libc.so.6 (0x7f)\n\t/lib64/ld-linux-x86-64.so.2 (0x7f)\n";
        let libs = parse_ldd(text).unwrap();
        assert_eq!(
            libs,
            vec![
                PathBuf::from("/lib/x86_64-linux-gnu/libgcc_s.so.1"),
                PathBuf::from("/lib/x86_64-linux-gnu/libc.so.6"),
                PathBuf::from("/lib64/ld-linux-x86-64.so.2"),
            ]
        );
        assert!(parse_ldd("\tlibfoo.so => not found\n").is_err());
    }

    #[test]
    fn env_file_lists_backends() {
        let g = GuestConfig {
            kernel_label: "6.1".into(),
            backends: vec!["fentry".into(), "kprobe".into()],
            nat_hooks: vec!["confirm".into()],
            boot_only: false,
            step_timeout_secs: 120,
            trace_secs: 10,
            workload_ports: 10,
            workload_failures: 20,
            exec: Vec::new(),
            bench_plan: None,
            bench_timeout_secs: 0,
        };
        let env = g.env_file();
        assert!(env.contains("PXH_BACKENDS=\"fentry kprobe\"\n"));
        assert!(env.contains("PXH_MODE=\"full\"\n"));
        assert!(env.contains("PXH_NAT_HOOKS=\"confirm\"\n"));
        let bench = GuestConfig {
            bench_plan: Some("{}".into()),
            ..g
        };
        assert!(bench.env_file().contains("PXH_MODE=\"bench\"\n"));
    }
}
