//! What the kernel says a process has attached: for each of its file descriptors,
//! `BPF_TASK_FD_QUERY` (4.15+) names the tracepoint, raw tracepoint or kprobe a perf event or
//! raw-tracepoint link feeds a program from, and `BPF_OBJ_GET_INFO_BY_FD` gives the type of
//! every other BPF link (fentry/fexit). This is the kernel's own account, independent of what
//! the loader believes it attached: selftest uses it to prove that nothing is on the syscall
//! path unless asked.
use std::{ffi::CStr, io, os::fd::RawFd};

/// One attachment, as the kernel describes it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Attachment {
    pub fd: RawFd,
    pub prog_id: u32,
    /// `tracepoint`, `raw_tracepoint`, `kprobe`, `kretprobe`, `uprobe`, `uretprobe`,
    /// `fentry`, `fexit`, `tracing`, `link`, or `perf_event` (a perf-event link on a kernel
    /// before 6.6, which does not say what the event is).
    pub kind: String,
    /// The tracepoint or function name, when the kernel gives one.
    pub target: String,
}

impl Attachment {
    /// A perf-event link whose event the kernel does not describe (5.15..6.5).
    pub fn undescribed(&self) -> bool {
        self.kind == "perf_event"
    }

    /// Syscall tracepoints (`sys_enter_*`/`sys_exit_*`, or the raw `sys_enter`/`sys_exit`).
    pub fn on_syscall_path(&self) -> bool {
        (self.kind == "tracepoint" || self.kind == "raw_tracepoint")
            && (self.target.starts_with("sys_enter") || self.target.starts_with("sys_exit"))
    }
}

const BPF_OBJ_GET_INFO_BY_FD: libc::c_long = 15;
const BPF_TASK_FD_QUERY: libc::c_long = 20;

#[repr(C)]
#[derive(Default)]
struct TaskFdQuery {
    pid: u32,
    fd: u32,
    flags: u32,
    buf_len: u32,
    buf: u64,
    prog_id: u32,
    fd_type: u32,
    probe_offset: u64,
    probe_addr: u64,
}

#[repr(C)]
#[derive(Default)]
struct InfoByFd {
    bpf_fd: u32,
    info_len: u32,
    info: u64,
}

/// `struct bpf_link_info` up to the union, with room for the largest union member.
#[repr(C)]
struct LinkInfo {
    ty: u32,
    id: u32,
    prog_id: u32,
    _pad: u32,
    union: [u64; 8],
}

fn bpf(cmd: libc::c_long, attr: *mut u8, size: usize) -> io::Result<()> {
    // SAFETY: `attr` points to a live, properly sized bpf_attr variant for `cmd`.
    let rc = unsafe { libc::syscall(libc::SYS_bpf, cmd, attr, size) };
    if rc < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

fn query(pid: u32, fd: RawFd) -> io::Result<Attachment> {
    let mut buf = [0u8; 256];
    let mut q = TaskFdQuery {
        pid,
        fd: fd as u32,
        buf_len: buf.len() as u32,
        buf: buf.as_mut_ptr() as u64,
        ..Default::default()
    };
    bpf(
        BPF_TASK_FD_QUERY,
        (&raw mut q).cast(),
        std::mem::size_of::<TaskFdQuery>(),
    )?;
    let target = CStr::from_bytes_until_nul(&buf)
        .map(|c| c.to_string_lossy().into_owned())
        .unwrap_or_default();
    // BPF_FD_TYPE_* (include/uapi/linux/bpf.h).
    let kind = match q.fd_type {
        0 => "raw_tracepoint",
        1 => "tracepoint",
        2 => "kprobe",
        3 => "kretprobe",
        4 => "uprobe",
        5 => "uretprobe",
        _ => "?",
    };
    Ok(Attachment {
        fd,
        prog_id: q.prog_id,
        kind: kind.to_string(),
        target,
    })
}

/// A duplicate of another process's fd (pidfd_getfd, 5.6+; needs ptrace rights, which root
/// has), closed on drop.
struct Borrowed(RawFd);

impl Borrowed {
    fn of(pid: u32, fd: RawFd) -> io::Result<Self> {
        // SAFETY: plain syscalls on integers; the fds they return are owned here.
        let pidfd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) };
        if pidfd < 0 {
            return Err(io::Error::last_os_error());
        }
        let dup = unsafe { libc::syscall(libc::SYS_pidfd_getfd, pidfd, fd, 0) };
        let err = io::Error::last_os_error();
        unsafe { libc::close(pidfd as RawFd) };
        if dup < 0 {
            return Err(err);
        }
        Ok(Self(dup as RawFd))
    }
}

impl Drop for Borrowed {
    fn drop(&mut self) {
        // SAFETY: our own duplicate.
        unsafe { libc::close(self.0) };
    }
}

/// For a BPF link fd the fd query does not cover (fentry/fexit: tracing links).
fn link_info(pid: u32, fd: RawFd) -> io::Result<Attachment> {
    let own = pid == std::process::id();
    let borrowed = if own {
        None
    } else {
        Some(Borrowed::of(pid, fd)?)
    };
    let local = borrowed.as_ref().map_or(fd, |b| b.0);
    let mut name = [0u8; 256];
    let mut info = LinkInfo {
        ty: 0,
        id: 0,
        prog_id: 0,
        _pad: 0,
        union: [0; 8],
    };
    // For a perf-event link (6.6+), the kernel copies the tracepoint or function name into a
    // buffer we provide: union.perf_event = { type, pad, { name ptr, name_len, ... } }.
    info.union[1] = name.as_mut_ptr() as u64;
    info.union[2] = name.len() as u64;
    let mut a = InfoByFd {
        bpf_fd: local as u32,
        info_len: std::mem::size_of::<LinkInfo>() as u32,
        info: (&raw mut info) as u64,
    };
    bpf(
        BPF_OBJ_GET_INFO_BY_FD,
        (&raw mut a).cast(),
        std::mem::size_of::<InfoByFd>(),
    )?;
    let target = CStr::from_bytes_until_nul(&name)
        .map(|c| c.to_string_lossy().into_owned())
        .unwrap_or_default();
    let kind = match info.ty {
        // BPF_LINK_TYPE_TRACING: union.tracing = { attach_type, target_obj_id, target_btf_id }.
        2 => match info.union[0] as u32 {
            23 => "raw_tracepoint",
            24 => "fentry",
            25 => "fexit",
            _ => "tracing",
        },
        // BPF_LINK_TYPE_PERF_EVENT: enum bpf_perf_event_type in the union's first word. Before
        // 6.6 the kernel gives no details (type 0): the kind is known, the target is not.
        7 => match info.union[0] as u32 {
            1 => "uprobe",
            2 => "uretprobe",
            3 => "kprobe",
            4 => "kretprobe",
            5 => "tracepoint",
            _ => "perf_event",
        },
        _ => "link",
    };
    Ok(Attachment {
        fd,
        prog_id: info.prog_id,
        kind: kind.to_string(),
        target,
    })
}

/// Is `fd` of `pid` a BPF link (`anon_inode:bpf_link`)?
fn is_link(pid: u32, fd: RawFd) -> bool {
    std::fs::read_link(format!("/proc/{pid}/fd/{fd}"))
        .is_ok_and(|t| t.to_string_lossy().contains("bpf_link"))
}

/// Every attachment of `pid`'s file descriptors (root, or the process itself).
pub fn of_process(pid: u32) -> io::Result<Vec<Attachment>> {
    let mut fds: Vec<RawFd> = std::fs::read_dir(format!("/proc/{pid}/fd"))?
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
        .collect();
    fds.sort_unstable();
    let mut out = Vec::new();
    for fd in fds {
        match query(pid, fd) {
            Ok(a) => out.push(a),
            // Not a perf event or raw tracepoint link (ENOTSUPP is 524 inside the kernel, and
            // plain files give EBADF/ENOENT): a tracing link still says what it is.
            Err(_) if is_link(pid, fd) => {
                if let Ok(a) = link_info(pid, fd) {
                    out.push(a);
                }
            }
            Err(_) => {}
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn syscall_tracepoints_are_recognised() {
        let a = |kind: &str, target: &str| Attachment {
            fd: 3,
            prog_id: 1,
            kind: kind.into(),
            target: target.into(),
        };
        assert!(a("tracepoint", "sys_enter_connect").on_syscall_path());
        assert!(a("raw_tracepoint", "sys_enter").on_syscall_path());
        assert!(!a("raw_tracepoint", "inet_sock_set_state").on_syscall_path());
        assert!(!a("tracepoint", "inet_sock_set_state").on_syscall_path());
        assert!(!a("fexit", "").on_syscall_path());
    }

    #[test]
    fn an_ordinary_process_has_no_attachments() {
        // Our own fds (stdio, test harness pipes) are not BPF attachments.
        let mine = of_process(std::process::id()).expect("own fds are listable");
        assert!(mine.is_empty(), "{mine:?}");
    }
}
