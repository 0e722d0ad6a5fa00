//! `cargo xtask vmtest`: prove every probe backend on real kernels (issue 3).
//!
//! The development machines' kernel offers only the tracepoint backend (no kprobes, fentry
//! refused), so the kprobe and fentry paths are checked here, on Debian's cloud kernels booted
//! under QEMU: bullseye 5.10, bookworm 6.1, trixie 6.12. Each kernel boots once, with an
//! initramfs holding the current portexhaust binary; its /init runs `portexhaust selftest` and a
//! short `trace --json` session over a real exhaustion for every backend, and reports back over
//! a serial port. The result is a kernel x backend matrix.
//!
//! Files: vm/kernels.rs (fetch and cache kernels), vm/initramfs.rs + vm/cpio.rs + vm/init.sh
//! (the guest), vm/qemu.rs (one boot), vm/protocol.rs (guest records and their judgement).
mod boot;
mod matrix;

use std::{
    path::{Path, PathBuf},
    time::Instant,
};

use anyhow::{Context as _, Result, bail};

use crate::vm::{
    kernels::{self, ArchiveSource, KernelSpec},
    protocol::Expect,
};
use boot::Run;
use matrix::{Row, render};

const BACKENDS: &[&str] = &["tp-btf", "raw-tp", "fentry", "kprobe", "tracepoint"];

/// The NAT hooks the NAT scenario is run with (`PORTEXHAUST_NAT_HOOK`), each a column.
const NAT_HOOKS: &[&str] = &["confirm", "kfree_skb"];

/// Host programs the NAT scenario needs in the guest (busybox's ip has no netns), and where
/// they go (out of the way of busybox's applets).
const NAT_PROGRAMS: &[(&str, &str, &str)] = &[
    ("ip", "/usr/lib/pxh/ip", "iproute2"),
    ("nft", "/usr/lib/pxh/nft", "nftables"),
];

/// The exhaustion the trace session makes in the guest: `workload --ports P --failures F`.
const WORKLOAD_PORTS: u32 = 10;
const WORKLOAD_FAILURES: u32 = 20;

/// Console lines shown for a boot that failed or hung.
const CONSOLE_TAIL: usize = 30;

#[derive(clap::Args, Debug)]
#[command(after_help = "Examples:\n  \
    cargo xtask vmtest                      # all kernels, all backends\n  \
    cargo xtask vmtest --kernel 6.1 --backend kprobe\n  \
    cargo xtask vmtest --backend none --nat-hook confirm   # only the NAT scenario, kprobe pair\n  \
    cargo xtask vmtest --boot-only          # fetch and boot each kernel, no portexhaust\n  \
    cargo xtask vmtest --binary target/release/portexhaust --json matrix.json")]
pub struct VmtestArgs {
    /// Kernels to boot (comma-separated): 5.10 (bullseye), 6.1 (bookworm), 6.12 (trixie), all.
    #[arg(long, value_delimiter = ',', default_value = "all",
          value_parser = ["5.10", "6.1", "6.12", "all"])]
    kernel: Vec<String>,
    /// Backends to check in each kernel (comma-separated); all = fentry, kprobe, tracepoint;
    /// none = no checks (with --exec).
    #[arg(long, value_delimiter = ',', default_value = "all",
          value_parser = ["auto", "tp-btf", "raw-tp", "fentry", "kprobe", "tracepoint", "all", "none"])]
    backend: Vec<String>,
    /// NAT hooks to run the source-NAT scenario with (comma-separated): confirm (kprobe pair
    /// on __nf_conntrack_confirm), kfree_skb (tp_btf), all, none. Each is a matrix column.
    #[arg(long, value_delimiter = ',', default_value = "all",
          value_parser = ["confirm", "kfree_skb", "all", "none"])]
    nat_hook: Vec<String>,
    /// Also run this shell command in the guest after the checks, as root, and show its output
    /// (repeatable). For digging into a failure, e.g.
    /// --backend none --exec 'portexhaust selftest --backend fentry; dmesg | tail'.
    #[arg(long, value_name = "CMD")]
    exec: Vec<String>,
    /// Kill a guest that has not powered off after this many seconds (one boot checks every
    /// backend).
    #[arg(long, default_value_t = 300)]
    timeout_secs: u64,
    /// Inside the guest, kill one selftest / trace / workload command after this long.
    /// (A check takes 1-3 s under emulation on a 2-core machine.)
    #[arg(long, default_value_t = 60)]
    step_timeout_secs: u64,
    /// `--duration` of the trace session in the guest: a backstop only, since the session is
    /// ended with Ctrl-C (SIGINT) as soon as the workload is done.
    #[arg(long, default_value_t = 60)]
    trace_secs: u64,
    /// Where kernel packages, unpacked kernels and run logs are kept
    /// [default: target/vmtest-cache under the workspace root].
    #[arg(long)]
    cache_dir: Option<PathBuf>,
    /// Test this portexhaust binary instead of building target/release/portexhaust.
    #[arg(long, value_name = "PATH")]
    binary: Option<PathBuf>,
    /// Only fetch and boot each kernel and report what it offers (no portexhaust needed).
    #[arg(long)]
    boot_only: bool,
    /// Use only kernels already in the cache; never touch the network.
    #[arg(long, conflicts_with = "refresh")]
    offline: bool,
    /// Refresh the package lists even if they are recent (they are refreshed once a day).
    #[arg(long)]
    refresh: bool,
    /// Debian archive to fetch kernels from [default: the one this machine's apt uses].
    #[arg(long, value_name = "URI")]
    archive_uri: Option<String>,
    /// Also write the matrix as JSON to this file.
    #[arg(long, value_name = "FILE")]
    json: Option<PathBuf>,
    /// Keep each kernel's initramfs next to its logs in the cache's runs/ folder.
    #[arg(long)]
    keep: bool,
    /// Guest memory in MiB.
    #[arg(long, default_value_t = 1024)]
    memory_mb: u32,
    /// Guest CPUs.
    #[arg(long, default_value_t = 2)]
    smp: u32,
}

fn log(msg: impl AsRef<str>) {
    eprintln!("vmtest: {}", msg.as_ref());
}

pub fn find_in_path(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|d| d.join(name))
        .find(|p| p.is_file())
}

/// What the run needs from the host, said all at once rather than failing half-way.
pub fn check_host_tools(offline: bool) -> Result<PathBuf> {
    let mut missing = Vec::new();
    if find_in_path("qemu-system-x86_64").is_none() {
        missing.push("qemu-system-x86_64 (Debian package qemu-system-x86)");
    }
    let busybox = ["/bin/busybox", "/usr/bin/busybox"]
        .iter()
        .map(PathBuf::from)
        .find(|p| p.is_file());
    if busybox.is_none() {
        missing.push("busybox (Debian package busybox-static)");
    }
    if !offline {
        for (tool, what) in [
            ("apt-get", "apt-get (apt)"),
            ("dpkg-deb", "dpkg-deb (dpkg)"),
        ] {
            if find_in_path(tool).is_none() {
                missing.push(what);
            }
        }
    }
    if !missing.is_empty() {
        bail!(
            "missing on this machine: {}; run `cargo xtask setup --tests` as root",
            missing.join(", ")
        );
    }
    busybox.context("busybox not found")
}

/// Two runs on one cache would share apt state and run folders: hold a lock for the run.
/// The lock goes with the returned file (and with the process, however it ends).
fn lock_cache(cache: &Path) -> Result<std::fs::File> {
    use std::os::fd::AsRawFd as _;
    let path = cache.join("vmtest.lock");
    let f = std::fs::File::create(&path).with_context(|| format!("creating {}", path.display()))?;
    // SAFETY: flock on a file descriptor we own; no memory is involved.
    let rc = unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
    if rc != 0 {
        bail!(
            "another `cargo xtask vmtest` is using {} (wait for it, or pass --cache-dir)",
            cache.display()
        );
    }
    Ok(f)
}

fn selected_kernels(args: &VmtestArgs) -> Vec<&'static KernelSpec> {
    kernels::KERNELS
        .iter()
        .filter(|k| args.kernel.iter().any(|a| a == "all" || a == k.label))
        .collect()
}

/// The names a comma list asked for, `all` standing for every one of `every`, `none` for
/// none, each once, in the order asked.
fn expand(asked: &[String], every: &[&str]) -> Vec<String> {
    let mut out: Vec<String> = Vec::new();
    for a in asked {
        let names: Vec<&str> = match a.as_str() {
            "all" => every.to_vec(),
            "none" => Vec::new(),
            other => vec![other],
        };
        for n in names {
            if !out.iter().any(|o| o == n) {
                out.push(n.to_string());
            }
        }
    }
    out
}

fn selected_nat_hooks(args: &VmtestArgs) -> Vec<String> {
    expand(&args.nat_hook, NAT_HOOKS)
}

/// (host path, guest path) of the NAT scenario's programs, or what is missing.
fn nat_programs() -> Result<Vec<(PathBuf, String)>> {
    let mut out = Vec::new();
    let mut missing = Vec::new();
    for (name, guest, package) in NAT_PROGRAMS {
        match find_in_path(name).or_else(|| {
            [format!("/usr/sbin/{name}"), format!("/sbin/{name}")]
                .into_iter()
                .map(PathBuf::from)
                .find(|p| p.is_file())
        }) {
            Some(p) => out.push((p, guest.to_string())),
            None => missing.push(format!("{name} (Debian package {package})")),
        }
    }
    if !missing.is_empty() {
        bail!(
            "the NAT scenario needs {} on this machine (or pass --nat-hook none)",
            missing.join(", ")
        );
    }
    Ok(out)
}

fn selected_backends(args: &VmtestArgs) -> Vec<String> {
    expand(&args.backend, BACKENDS)
}

pub fn vmtest(args: &VmtestArgs) -> Result<()> {
    let kernels = selected_kernels(args);
    let backends = if args.boot_only {
        Vec::new()
    } else {
        selected_backends(args)
    };
    let nat_hooks = if args.boot_only {
        Vec::new()
    } else {
        selected_nat_hooks(args)
    };
    let nat_programs = if nat_hooks.is_empty() {
        Vec::new()
    } else {
        nat_programs()?
    };
    // qemu, busybox and cpio are test packages: install them first (a no-op when present).
    crate::setup::setup(crate::setup::Scope::Tests)?;
    let busybox = check_host_tools(args.offline)?;
    let cache = args
        .cache_dir
        .clone()
        .unwrap_or_else(|| crate::setup::workspace_root().join("target/vmtest-cache"));
    std::fs::create_dir_all(&cache).with_context(|| format!("creating {}", cache.display()))?;
    let cache = cache
        .canonicalize()
        .with_context(|| format!("resolving {}", cache.display()))?;
    let _lock = lock_cache(&cache)?;

    // The binary first: a build error should show before minutes of downloading and booting.
    let binary =
        if args.boot_only {
            None
        } else if let Some(b) = &args.binary {
            if !b.is_file() {
                bail!("--binary {}: no such file", b.display());
            }
            Some(
                b.canonicalize()
                    .with_context(|| format!("resolving {}", b.display()))?,
            )
        } else {
            Some(crate::setup::build_release().context(
                "building portexhaust failed (use --binary PATH to test an existing build)",
            )?)
        };

    // Where Debian is, once for all suites (None: --offline); without it every row says why.
    let archive = if args.offline {
        Ok(None)
    } else if let Some(uri) = &args.archive_uri {
        Ok(Some(ArchiveSource {
            uri: uri.trim_end_matches('/').to_string(),
            signed_by: None,
        }))
    } else {
        kernels::host_archive()
            .map(Some)
            .map_err(|e| format!("{e:#}"))
    };

    let run = Run {
        args,
        cache,
        archive,
        busybox,
        binary,
        backends,
        nat_hooks,
        nat_programs,
        expect: Expect {
            failures: u64::from(WORKLOAD_FAILURES),
            dst: "127.0.0.1:5000".into(),
            errno: 99,
            site: "__inet_hash_connect".into(),
        },
    };
    let started = Instant::now();
    let rows: Vec<Row> = kernels.into_iter().map(|spec| run.kernel(spec)).collect();
    log(format!(
        "all done in {:.0} s",
        started.elapsed().as_secs_f64()
    ));

    let (backends, expect) = (&run.backends, &run.expect);
    print!("{}", render(&rows, &run.columns(), args.boot_only));
    if let Some(path) = &args.json {
        let json = serde_json::to_string_pretty(&serde_json::json!({
            "backends": backends,
            "nat_hooks": run.nat_hooks,
            "expect": {"failures": expect.failures, "dst": expect.dst, "errno": expect.errno,
                       "site": expect.site},
            "kernels": rows,
        }))
        .context("serialising the matrix")?;
        std::fs::write(path, json + "\n").with_context(|| format!("writing {}", path.display()))?;
        log(format!("matrix written to {}", path.display()));
    }

    let bad: Vec<&str> = rows
        .iter()
        .filter(|r| !r.ok())
        .map(|r| r.kernel.as_str())
        .collect();
    if !bad.is_empty() {
        // Exit here rather than return an error: the matrix above already says everything,
        // and a backtrace of this line (RUST_BACKTRACE=1) would only bury it.
        eprintln!(
            "vmtest: FAILED on kernel(s) {} (see the matrix and notes above)",
            bad.join(", ")
        );
        std::process::exit(1);
    }
    Ok(())
}

#[cfg(test)]
mod expand_tests {
    use super::*;

    #[test]
    fn lists_expand_all_and_none_once_each() {
        let asked = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        assert_eq!(
            expand(&asked(&["all"]), NAT_HOOKS),
            ["confirm", "kfree_skb"]
        );
        assert!(expand(&asked(&["none"]), BACKENDS).is_empty());
        assert_eq!(
            expand(&asked(&["kprobe", "all", "kprobe"]), BACKENDS),
            ["kprobe", "tp-btf", "raw-tp", "fentry", "tracepoint"]
        );
    }
}
