//! Names for call-site stacks, with blazesym (the libbpf project's symbolizer): ELF symbols,
//! DWARF file:line where debug info exists, demangled C++/Rust names, and the perf map JIT
//! runtimes publish (`/tmp/perf-PID.map`: node `--perf-basic-prof`, JVM agents).
//!
//! A process's memory map is gone when it exits, so each stack is symbolised once, as soon as
//! the kernel announces it (a ring-buffer event) or a read of the call sites finds it, and the
//! result is cached by (pid, stack id). A stack of a process that exited before that keeps its
//! addresses and says why it has no names.
use std::{
    collections::HashMap,
    sync::Arc,
    time::{Duration, Instant},
};

use blazesym::{
    Addr, Pid,
    normalize::{Normalizer, UserMeta},
    symbolize::{
        Input, Symbolized, Symbolizer,
        source::{Process, Source},
    },
};
use log::debug;

use super::netns::comm_of;
pub use crate::engine::sites::Stack;
use crate::schema::Frame;

/// Frames kept per stack (innermost first): enough for any label and a reader's context.
const MAX_FRAMES: usize = 24;

/// How long blazesym's caches live. It keeps every ELF file it opened (an fd each, holding a
/// deleted binary's space, say a removed container's) and its parsed DWARF (megabytes for a
/// large binary) for as long as the symbolizer lives; a service that sees binaries come and go
/// for weeks must let them go. Each stack is symbolised once anyway, so a fresh symbolizer
/// costs one re-parse per binary that connects again.
const CACHE_LIFETIME: Duration = Duration::from_secs(600);

pub struct Symbols {
    symbolizer: Symbolizer,
    normalizer: Normalizer,
    cache: HashMap<(u32, u32), Arc<Stack>>,
    since: Instant,
}

fn normalizer() -> Normalizer {
    Normalizer::builder().enable_build_ids(true).build()
}

impl Default for Symbols {
    fn default() -> Self {
        Self::new()
    }
}

impl Symbols {
    pub fn new() -> Self {
        Self {
            symbolizer: Symbolizer::new(),
            normalizer: normalizer(),
            cache: HashMap::new(),
            since: Instant::now(),
        }
    }

    pub fn get(&self, pid: u32, stack_id: u32) -> Option<Arc<Stack>> {
        self.cache.get(&(pid, stack_id)).cloned()
    }

    pub fn known(&self, pid: u32, stack_id: u32) -> bool {
        self.cache.contains_key(&(pid, stack_id))
    }

    /// Symbolise a stack of `pid` (return addresses, innermost first) unless it already is.
    pub fn learn(&mut self, pid: u32, stack_id: u32, ips: &[u64]) -> Arc<Stack> {
        if let Some(s) = self.cache.get(&(pid, stack_id)) {
            return s.clone();
        }
        if self.since.elapsed() >= CACHE_LIFETIME {
            self.renew();
        }
        let stack = Arc::new(self.symbolise(pid, ips));
        self.cache.insert((pid, stack_id), stack.clone());
        stack
    }

    fn symbolise(&self, pid: u32, ips: &[u64]) -> Stack {
        let ips = &ips[..ips.len().min(MAX_FRAMES)];
        // Every frame but the innermost is a return address: the call is the instruction
        // before it, and its line is the one to show.
        let lookup: Vec<Addr> = ips
            .iter()
            .enumerate()
            .map(|(i, &ip)| if i == 0 { ip } else { ip.saturating_sub(1) })
            .collect();
        let mut frames: Vec<Frame> = ips
            .iter()
            .map(|&addr| Frame {
                addr,
                ..Default::default()
            })
            .collect();
        let comm = comm_of(pid).unwrap_or_default();
        if ips.is_empty() {
            return Stack {
                frames,
                note: Some("empty user stack".into()),
                comm,
            };
        }
        // Module and file offset of each frame: what names a frame without symbols, and what
        // a reader can resolve later against the same build.
        match self
            .normalizer
            .normalize_user_addrs(Pid::from(pid), &lookup)
        {
            Ok(out) => {
                for (f, (offset, meta)) in frames.iter_mut().zip(out.outputs.iter()) {
                    if let Some(UserMeta::Elf(elf)) = out.meta.get(*meta) {
                        f.module = Some(elf.path.to_string_lossy().into_owned());
                        f.offset = Some(*offset);
                    }
                }
            }
            Err(e) => {
                debug!("normalising the stack of pid {pid}: {e}");
                return Stack {
                    frames,
                    note: Some(format!(
                        "process {pid} exited before its stack was symbolised"
                    )),
                    comm,
                };
            }
        }
        let src = Source::Process(Process::new(Pid::from(pid)));
        match self.symbolizer.symbolize(&src, Input::AbsAddr(&lookup)) {
            Ok(syms) => {
                for (f, s) in frames.iter_mut().zip(syms.iter()) {
                    if let Symbolized::Sym(sym) = s {
                        f.function = Some(sym.name.to_string());
                        if let Some(ci) = &sym.code_info {
                            let file = match &ci.dir {
                                Some(d) => d.join(&*ci.file).to_string_lossy().into_owned(),
                                None => ci.file.to_string_lossy().into_owned(),
                            };
                            f.file = Some(file);
                            f.line = ci.line;
                        }
                        if f.module.is_none() {
                            f.module = sym
                                .module
                                .as_ref()
                                .map(|m| m.to_string_lossy().into_owned());
                        }
                    }
                }
            }
            Err(e) => debug!("symbolising the stack of pid {pid}: {e}"),
        }
        let note = if frames.iter().any(|f| f.function.is_some()) {
            None
        } else {
            Some("no symbols: binaries stripped, or a JIT without a perf map".into())
        };
        Stack { frames, note, comm }
    }

    /// Forget the stacks of processes that no longer exist and will not be asked for again
    /// (keeps the cache bounded over weeks; the rows already built keep their names).
    pub fn retain(&mut self, mut keep: impl FnMut(u32, u32) -> bool) {
        self.cache.retain(|(p, s), _| keep(*p, *s));
    }

    /// Drop blazesym's file and DWARF caches (see [`CACHE_LIFETIME`]), and give the freed heap
    /// back to the system: glibc keeps it otherwise, and RSS is what a service is judged by.
    fn renew(&mut self) {
        self.symbolizer = Symbolizer::new();
        self.normalizer = normalizer();
        self.since = Instant::now();
        #[cfg(target_env = "gnu")]
        // SAFETY: malloc_trim only returns free memory at the top of heaps to the kernel.
        unsafe {
            libc::malloc_trim(0);
        }
        debug!("symbolizer caches renewed");
    }

    pub fn len(&self) -> usize {
        self.cache.len()
    }

    pub fn is_empty(&self) -> bool {
        self.cache.is_empty()
    }
}
