//! Warnings from paths that should never be taken, through aya-log: they mean the counts are
//! incomplete or the BTF offsets do not fit the running kernel. The user sees them on stderr
//! (`portexhaust: warn: ...`) next to the counters that measure them (`uncounted_keys`,
//! `read_errors`).
//!
//! Each kind is said at most once per CPU (a bit in `LOGGED`): a storm that keeps taking one of
//! these paths pays for one per-CPU lookup per failure, never a log record. The check is inline
//! and the record is written out of line, so the callers' code and stack stay as they were.
//! Only integers are logged: no string is built at run time.
use aya_ebpf::helpers::generated::bpf_get_smp_processor_id;
use aya_log_ebpf::warn;

use crate::maps::LOGGED;

/// `LOGGED` bits.
const COUNT_MAP_FULL: u32 = 1;
const READ_ERROR: u32 = 2;

/// Whether this CPU has yet to say `bit`; from now on it has.
#[inline(always)]
fn first_on_this_cpu(bit: u32) -> bool {
    let Some(p) = LOGGED.get_ptr_mut(0) else {
        return false;
    };
    // SAFETY: per-CPU slot, only this CPU touches it while the program runs.
    unsafe {
        if *p & bit != 0 {
            return false;
        }
        *p |= bit;
    }
    true
}

#[inline(always)]
fn cpu() -> u32 {
    // SAFETY: helper without arguments.
    unsafe { bpf_get_smp_processor_id() }
}

/// A failure's (pid, destination, errno, cause) key did not fit into `COUNTS`.
#[inline(always)]
pub fn count_map_full(pid: u32, dport: u16) {
    if first_on_this_cpu(COUNT_MAP_FULL) {
        say_count_map_full(pid, dport);
    }
}

#[inline(never)]
fn say_count_map_full(pid: u32, dport: u16) {
    warn!(
        &(),
        "in-kernel counts map full (first on cpu {}: pid {}, dport {}): failures of new keys are counted in uncounted_keys only; said once per CPU",
        cpu(),
        pid,
        dport
    );
}

/// A kernel read through a BTF offset failed.
#[inline(always)]
pub fn read_failed(off: usize) {
    if first_on_this_cpu(READ_ERROR) {
        say_read_failed(off);
    }
}

#[inline(never)]
fn say_read_failed(off: usize) {
    warn!(
        &(),
        "kernel read at BTF offset {} failed (first on cpu {}): the offsets may not fit this kernel, see read_errors; said once per CPU",
        off,
        cpu()
    );
}
