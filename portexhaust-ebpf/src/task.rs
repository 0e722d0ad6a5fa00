//! Facts about the current task, through BTF offsets (`bpf_get_current_task()` plus
//! `bpf_probe_read_kernel()`: `bpf_get_current_task_btf()` would allow direct loads but needs
//! 5.11, and the matrix starts at 5.10).
use aya_ebpf::helpers::{bpf_probe_read_kernel, generated::bpf_get_current_task};

use crate::globals::{self, off};

/// Follow a pointer field of a kernel struct; null when unreadable.
#[inline(always)]
pub fn read_ptr(base: *const u8, off: usize) -> *const u8 {
    // SAFETY: bpf_probe_read_kernel fails cleanly on a bad address.
    unsafe { bpf_probe_read_kernel(base.add(off) as *const u64) }.unwrap_or(0) as *const u8
}

/// `current->nsproxy->net_ns->ns.inum` (three kernel reads); 0 when unknown. Used where no
/// socket is at hand (bind(), UDP, syscall paths); sockets carry their own namespace.
#[inline(always)]
pub fn current_netns() -> u32 {
    if !globals::have_task_offsets() {
        return 0;
    }
    // SAFETY: helper without arguments.
    let task = unsafe { bpf_get_current_task() } as *const u8;
    let nsproxy = read_ptr(task, off::task_nsproxy());
    if nsproxy.is_null() {
        return 0;
    }
    let net = read_ptr(nsproxy, off::nsproxy_net());
    if net.is_null() {
        return 0;
    }
    // SAFETY: as read_ptr.
    unsafe { bpf_probe_read_kernel(net.add(off::net_inum()) as *const u32) }.unwrap_or(0)
}

/// `current->group_leader->start_boottime` (two kernel reads); 0 when unknown. With the pid it
/// names a process even after the pid is reused.
#[inline(always)]
pub fn current_start_ns() -> u64 {
    if !globals::have_task_offsets() {
        return 0;
    }
    // SAFETY: helper without arguments.
    let task = unsafe { bpf_get_current_task() } as *const u8;
    let leader = read_ptr(task, off::task_group_leader());
    if leader.is_null() {
        return 0;
    }
    // SAFETY: as read_ptr.
    unsafe { bpf_probe_read_kernel(leader.add(off::task_start_time()) as *const u64) }.unwrap_or(0)
}
