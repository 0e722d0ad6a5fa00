//! What the machine allows, found before anything is loaded: privileges, tracefs, BTF, and
//! which kinds of hook the kernel offers. Each answer is a reason a user can act on.
use std::{io::Read as _, path::Path};

use log::{debug, info};

use super::{Error, Result};

const CAP_SYS_ADMIN: u32 = 21;
const CAP_PERFMON: u32 = 38;
const CAP_BPF: u32 = 39;

fn effective_caps() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("CapEff:"))
                .and_then(|v| u64::from_str_radix(v.trim(), 16).ok())
        })
        .unwrap_or(0)
}

/// Root, or CAP_BPF + CAP_PERFMON (5.8+), or CAP_SYS_ADMIN (older kernels).
pub fn check_privileges() -> Result<()> {
    let caps = effective_caps();
    let has = |c: u32| caps & (1u64 << c) != 0;
    if has(CAP_SYS_ADMIN) || (has(CAP_BPF) && has(CAP_PERFMON)) {
        return Ok(());
    }
    // SAFETY: geteuid has no preconditions.
    let uid = unsafe { libc::geteuid() };
    let mut have: Vec<&str> = Vec::new();
    if has(CAP_BPF) {
        have.push("CAP_BPF");
    }
    if has(CAP_PERFMON) {
        have.push("CAP_PERFMON");
    }
    Err(Error::NotPrivileged {
        have: if have.is_empty() {
            format!("uid {uid} and none of them")
        } else {
            format!("uid {uid} and only {}", have.join(", "))
        },
    })
}

const TRACEFS: &str = "/sys/kernel/tracing";
const DEBUGFS_TRACING: &str = "/sys/kernel/debug/tracing";

/// Make sure tracefs is reachable, mounting it when it is not (as root we can). Only perf
/// tracepoints (and old kernels' kprobes) need it; tp_btf, raw_tp and fentry do not.
pub fn ensure_tracefs() -> Result<()> {
    if Path::new(TRACEFS).join("events").is_dir()
        || Path::new(DEBUGFS_TRACING).join("events").is_dir()
    {
        return Ok(());
    }
    let target = c"/sys/kernel/tracing";
    let fstype = c"tracefs";
    // SAFETY: valid NUL-terminated strings; no data argument.
    let rc = unsafe {
        libc::mount(
            c"none".as_ptr(),
            target.as_ptr(),
            fstype.as_ptr(),
            0,
            std::ptr::null(),
        )
    };
    if rc != 0 {
        return Err(Error::NoTracefs {
            detail: format!(
                "{TRACEFS}/events is missing and mounting it failed: {}",
                std::io::Error::last_os_error()
            ),
        });
    }
    info!("mounted tracefs at {TRACEFS}");
    Ok(())
}

/// Raise RLIMIT_MEMLOCK: before 5.11 BPF maps are charged against it and the default (64 KiB
/// on older distributions) cannot hold the ring buffer.
pub fn raise_memlock() {
    let r = libc::rlimit {
        rlim_cur: libc::RLIM_INFINITY,
        rlim_max: libc::RLIM_INFINITY,
    };
    // SAFETY: valid pointer to an rlimit.
    if unsafe { libc::setrlimit(libc::RLIMIT_MEMLOCK, &r) } != 0 {
        debug!(
            "could not raise RLIMIT_MEMLOCK: {}",
            std::io::Error::last_os_error()
        );
    }
}

pub const KERNEL_BTF: &str = "/sys/kernel/btf/vmlinux";

/// Which kinds of hook this kernel offers, as far as can be told without loading anything.
/// `Err` holds the reason, phrased for the user.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Caps {
    pub btf: Result<(), String>,
    /// fentry/fexit: BTF plus ftrace with direct calls. The kernel may still refuse the load
    /// (as the development machines do, EPERM); that is found out when loading.
    pub fentry: Result<(), String>,
    pub kprobe: Result<(), String>,
}

impl Caps {
    pub fn probe() -> Self {
        let btf = if Path::new(KERNEL_BTF).exists() {
            Ok(())
        } else {
            Err(format!(
                "no kernel BTF ({KERNEL_BTF} is missing; needs CONFIG_DEBUG_INFO_BTF)"
            ))
        };
        let fentry = btf.clone().and_then(|()| ftrace_usable());
        let kprobe = if Path::new("/sys/bus/event_source/devices/kprobe").exists() {
            Ok(())
        } else {
            Err(
                "no kprobe support (/sys/bus/event_source/devices/kprobe is missing; \
                 CONFIG_KPROBES is off)"
                    .to_string(),
            )
        };
        Self {
            btf,
            fentry,
            kprobe,
        }
    }
}

/// fentry/fexit need ftrace (their trampolines are ftrace direct calls): a kernel whose list of
/// traceable functions cannot be read will refuse them.
fn ftrace_usable() -> Result<(), String> {
    let mut last = String::new();
    for dir in [TRACEFS, DEBUGFS_TRACING] {
        let path = Path::new(dir).join("available_filter_functions");
        match std::fs::File::open(&path) {
            Ok(mut f) => {
                let mut b = [0u8; 64];
                return match f.read(&mut b) {
                    Ok(n) if n > 0 => Ok(()),
                    Ok(_) => Err(format!("{} is empty (no ftrace)", path.display())),
                    Err(e) => Err(format!("{} is unreadable: {e}", path.display())),
                };
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                last = format!("{} is missing", path.display());
            }
            Err(e) => {
                return Err(format!(
                    "{} is unreadable ({e}): fentry needs ftrace",
                    path.display()
                ));
            }
        }
    }
    // tracefs may simply not be mounted yet: then let the load decide.
    debug!("ftrace check inconclusive: {last}");
    Ok(())
}
