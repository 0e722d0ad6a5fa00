//! eBPF programs of portexhaust.
//!
//! One object; the loader attaches the sets the chosen backend needs (see
//! `portexhaust_common::programs` for the table):
//!
//! | file        | hooks                                                    | for                              |
//! |-------------|----------------------------------------------------------|----------------------------------|
//! | state.rs    | `inet_sock_set_state` as tp_btf, raw_tp or perf tracepoint | ownership and latency (always); TCP connect failures (state backends) |
//! | fentry.rs   | fentry/fexit tcp_v{4,6}_connect, inet{,6}_hash_connect, inet{,6}_bind, inet_dgram_connect | fentry backend; bind/UDP |
//! | kprobe.rs   | kprobe/kretprobe on the same functions, `__inet_hash_connect` | kprobe backend; bind/UDP |
//! | sites.rs    | (called from state.rs)                                   | call sites: user stacks per connect |
//! | syscalls.rs | syscall tracepoints                                      | bind/UDP/early connect, on request only |
//! | nat.rs      | tp_btf `kfree_skb`; kprobe/kretprobe `__nf_conntrack_confirm` | source-NAT port exhaustion, on request only |
//!
//! Shared: `globals` (load-time settings), `maps`, `emit` (exact counts and events), `sock`
//! and `task` (kernel structs through BTF offsets), `kfunc` (function-hook logic), `perf`,
//! `cold` (aya-log warnings from paths that should not be taken, once per CPU).
#![no_std]
#![no_main]
// atomic_xadd (emit.rs): the BPF target has no compare-and-swap, so core's AtomicU64::fetch_add
// is not offered; the intrinsic lowers to BPF_XADD.
#![allow(internal_features)]
#![feature(core_intrinsics)]

mod addr;
mod cold;
mod emit;
mod fentry;
mod globals;
mod kfunc;
mod kprobe;
mod maps;
mod nat;
mod perf;
mod sites;
mod sock;
mod state;
mod syscalls;
mod task;

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    // The verifier rejects unreachable code paths that are not provably dead; a loop is the
    // safe way to satisfy the `!` return type.
    #[allow(clippy::empty_loop)]
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 4] = *b"GPL\0";
