//! Warnings from paths that should never be taken, through aya-log: they mean the counts are
//! incomplete or the BTF offsets do not fit the running kernel. The user sees them on stderr
//! (`portexhaust: warn: ...`) next to the counters that measure them (`uncounted_keys`,
//! `read_errors`).
//!
//! Each kind is said at most once per CPU (a bit in `LOGGED`): a storm that keeps taking one of
//! these paths pays for one per-CPU lookup per failure, never a log record. Only integers are
//! logged: no string is built at run time.
//!
//! Both are global BPF functions (`no_mangle`, `extern "C"`, a scalar return, as the verifier
//! wants of them), which the verifier checks once per program instead of once per call site.
//! It matters: aya-log's record code is ~700 instructions, and the verifier cannot tell its
//! size through the macro's `black_box`, so it walks every buffer capacity. Inlined at the
//! socket-read sites (dozens per program) that took the programs from ~6k to ~60-75k verified
//! instructions; as global functions they add ~7k, about 5-10 ms of start-up. The callers' hot
//! paths are untouched: each calls in only on its error branch.
use aya_ebpf::helpers::generated::bpf_get_smp_processor_id;
use aya_log_ebpf::warn;
use portexhaust_common::stat;

use crate::{emit::bump, maps::LOGGED};

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

/// A failure's (pid, destination, errno, cause) key did not fit into `COUNTS`: count it, and
/// say so once per CPU.
#[inline(never)]
#[unsafe(no_mangle)]
pub extern "C" fn count_map_full(pid: u32, dport: u32) -> u32 {
    bump(stat::COUNT_MAP_FULL);
    if first_on_this_cpu(COUNT_MAP_FULL) {
        warn!(
            &(),
            "counts map full: new keys go uncounted (first on cpu {}: pid {}, dport {}); see uncounted_keys",
            cpu(),
            pid,
            dport
        );
    }
    0
}

/// A kernel read through a BTF offset failed: count it, and say so once per CPU.
#[inline(never)]
#[unsafe(no_mangle)]
pub extern "C" fn read_failed(off: u64) -> u32 {
    bump(stat::READ_ERRORS);
    if first_on_this_cpu(READ_ERROR) {
        warn!(
            &(),
            "read at BTF offset {} failed (first on cpu {}): offsets may not fit this kernel; see read_errors",
            off,
            cpu()
        );
    }
    0
}
