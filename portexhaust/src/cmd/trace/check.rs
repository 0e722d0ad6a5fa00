//! `trace`'s arguments, checked before anything is loaded or attached (see [`args`]).
use std::{io, path::Path};

use log::warn;

use crate::{
    cli::TraceArgs,
    kernel::{
        Error, Result,
        cgroups::{self, Subtrees},
        container::cgroup2_root,
    },
    output::http,
};

/// Every argument of `trace` that can be wrong, checked before anything is loaded or attached:
/// a bad one is one line that says what to do, and exit status 2, in milliseconds rather than
/// after the programs are loaded (or, for a record path, after they have traced).
/// Returns the `--cgroup`/`--container` subtrees, resolved to cgroup ids.
pub(super) fn args(args: &TraceArgs) -> Result<Subtrees> {
    filters(args)?;
    let cgroups = cgroups(args)?;
    if let Some(path) = &args.record {
        record_path(path, args.record_max_size.is_some())?;
    }
    // Last: the socket bound here is the one the metrics server serves (see `bind_early`).
    if let Some(addr) = args.metrics_addr {
        http::bind_early(addr).map_err(|e| {
            let what = if e.kind() == io::ErrorKind::AddrInUse {
                format!(
                    "another process listens there (`ss -ltnp 'sport = :{}'` names it): pick \
                     another port",
                    addr.port()
                )
            } else {
                "give an address of this host (PORT alone serves on 127.0.0.1)".to_string()
            };
            Error::BadArgument(format!("--metrics-addr {addr}: {e}: {what}"))
        })?;
    }
    Ok(cgroups)
}

/// `--cgroup` and `--container`, resolved on the cgroup v2 mount now; how the kernel matches
/// them depends on whether it offers the ancestor helper (kernel/cgroups.rs).
fn cgroups(args: &TraceArgs) -> Result<Subtrees> {
    let f = &args.filter;
    if f.cgroup.is_empty() && f.container.is_empty() {
        return Ok(Subtrees::default());
    }
    let root = cgroup2_root().ok_or_else(|| {
        Error::BadArgument(
            "--cgroup/--container need the cgroup v2 hierarchy, and none is mounted (looked at              /sys/fs/cgroup and /sys/fs/cgroup/unified): mount cgroup2 or filter by --pid/--comm"
                .into(),
        )
    })?;
    let mut targets = Vec::new();
    for p in &f.cgroup {
        targets.push(cgroups::resolve_path(&root, p).map_err(Error::BadArgument)?);
    }
    for c in &f.container {
        targets.extend(cgroups::resolve_container(&root, c).map_err(Error::BadArgument)?);
    }
    let release = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    // PORTEXHAUST_CGROUP_MATCH=subtree takes the pre-5.14 way on any kernel, so that the tests
    // check it where the ancestor helper exists too.
    let forced_subtree =
        std::env::var_os("PORTEXHAUST_CGROUP_MATCH").is_some_and(|v| v == "subtree");
    let subtrees = Subtrees {
        targets,
        ancestors: !forced_subtree && cgroups::ancestor_helper_allowed(release.trim()),
    };
    let n = subtrees.ids().len();
    if n > cgroups::MAX_CGROUP_IDS as usize {
        return Err(Error::BadArgument(format!(
            "the --cgroup/--container subtrees hold {n} cgroups, and this kernel (before 5.14)              must list each: the filter takes {} at most; name a smaller subtree",
            cgroups::MAX_CGROUP_IDS
        )));
    }
    Ok(subtrees)
}

/// The record can be appended to (an existing file is never truncated), or created; when it
/// rotates, its directory must take new files and renames too.
fn record_path(path: &Path, rotating: bool) -> Result<()> {
    let bad = |what: String| {
        Err(Error::BadArgument(format!(
            "--record {}: {what}",
            path.display()
        )))
    };
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    match std::fs::metadata(path) {
        Ok(m) if m.is_dir() => {
            return bad(format!(
                "is a directory: name a file in it, e.g. {}",
                path.join("portexhaust.ndjson").display()
            ));
        }
        Ok(m) => {
            if rotating && !m.is_file() {
                return bad(
                    "is not a regular file, so it cannot rotate: drop --record-max-size or \
                     record to a file"
                        .into(),
                );
            }
            // Opened for appending only, never created or truncated: the existing sessions stay.
            if let Err(e) = std::fs::OpenOptions::new().append(true).open(path) {
                return bad(format!(
                    "cannot append to it: {e}: record to a writable file system"
                ));
            }
            if !rotating {
                return Ok(());
            }
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return bad(format!("{e}")),
    }
    match std::fs::metadata(dir) {
        Ok(m) if m.is_dir() => {}
        Ok(_) => return bad(format!("{} is not a directory", dir.display())),
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            return bad(format!(
                "directory {} does not exist: create it (mkdir -p {}) or record elsewhere",
                dir.display(),
                dir.display()
            ));
        }
        Err(e) => return bad(format!("directory {}: {e}", dir.display())),
    }
    if let Err(e) = writable_dir(dir) {
        return bad(format!(
            "cannot create files in {}: {e}: record to a writable directory",
            dir.display()
        ));
    }
    Ok(())
}

/// access(2) for writing and searching: root passes it everywhere but on a read-only mount.
fn writable_dir(dir: &Path) -> io::Result<()> {
    use std::os::unix::ffi::OsStrExt;
    let c = std::ffi::CString::new(dir.as_os_str().as_bytes()).map_err(io::Error::other)?;
    // SAFETY: `c` is a valid NUL-terminated path for the duration of the call.
    if unsafe { libc::access(c.as_ptr(), libc::W_OK | libc::X_OK) } == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// Filters that can never match are errors; one that matches less than it seems, a warning.
fn filters(args: &TraceArgs) -> Result<()> {
    for &pid in &args.filter.pid {
        if pid == 0 {
            return Err(Error::BadArgument(
                "--pid 0 is the kernel's idle task, which never connects: give a process id as \
                 `ps -e` shows it"
                    .into(),
            ));
        }
        if !Path::new(&format!("/proc/{pid}")).exists() {
            return Err(Error::BadArgument(format!(
                "--pid {pid}: no such process: start it first, or filter by --comm NAME, which \
                 also matches processes started later"
            )));
        }
    }
    let binds = args
        .catch
        .is_some_and(|c| c & portexhaust_common::KIND_BIND != 0);
    if args.filter.dport.contains(&0) && !binds {
        warn!(
            "--dport 0 matches only bind() failures (their requested local port is 0; a \
             connect() always has a destination port), and this kernel may watch those only \
             with --catch bind"
        );
    }
    Ok(())
}
