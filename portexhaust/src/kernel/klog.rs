//! The programs' own log records (aya-log; see the eBPF crate's `cold.rs`): warnings from
//! paths that should not be taken, at most once per CPU and kind. They are handed to the `log`
//! crate at the level the program used, so they reach stderr like every other diagnostic
//! (`portexhaust: warn: ...`).
//!
//! aya-log's reader is a ring buffer with no thread of its own: whoever holds the [`Tracer`]
//! drains it from a loop that already runs (trace's one-second tick, top's refresh).
//!
//! [`Tracer`]: super::loader::Tracer
use std::panic::{AssertUnwindSafe, catch_unwind};

use aya::Ebpf;
use aya_log::{EbpfLogger, Level};
use log::{LevelFilter, Log, debug};

/// aya-log's global in the object: records above this level are not written. Set before load
/// from what `log` lets through, so that records nobody would see are pruned by the verifier.
pub const LEVEL_GLOBAL: &str = aya_log::LEVEL;

/// The value of [`LEVEL_GLOBAL`] for the `log` filter in force (0: nothing is written).
pub fn ebpf_level() -> u8 {
    level_for(log::max_level())
}

fn level_for(f: LevelFilter) -> u8 {
    match f {
        LevelFilter::Off => 0,
        LevelFilter::Error => Level::Error as u8,
        LevelFilter::Warn => Level::Warn as u8,
        LevelFilter::Info => Level::Info as u8,
        LevelFilter::Debug => Level::Debug as u8,
        LevelFilter::Trace => Level::Trace as u8,
    }
}

/// The reader of the programs' log, if it could start.
pub struct KernelLog(Option<EbpfLogger<&'static dyn Log>>);

impl KernelLog {
    /// Start reading the loaded object's log. Not being able to (an object that logs nothing
    /// has no log map; a kernel may refuse the map) costs only these warnings: a debug line.
    pub fn start(ebpf: &mut Ebpf) -> Self {
        match EbpfLogger::init(ebpf) {
            Ok(logger) => Self(Some(logger)),
            Err(e) => {
                debug!("the programs' log is not read: {e}");
                Self(None)
            }
        }
    }

    /// Hand every pending record to `log`. Cheap when there is none: the ring buffer's two
    /// positions are compared, no syscall.
    pub fn drain(&mut self) {
        let Some(logger) = self.0.as_mut() else {
            return;
        };
        // aya-log 0.3 panics on a record it cannot decode (it unwraps inside `flush`); a
        // diagnostic must not end a trace, so such a reader is dropped instead.
        if catch_unwind(AssertUnwindSafe(|| logger.flush())).is_err() {
            debug!("the programs' log held a record aya-log could not decode; no longer read");
            self.0 = None;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn levels_match_aya_logs_numbering() {
        // aya-log-ebpf writes a record when its level <= the global: Error 1 .. Trace 5.
        assert_eq!(level_for(LevelFilter::Off), 0);
        assert_eq!(level_for(LevelFilter::Error), 1);
        assert_eq!(level_for(LevelFilter::Warn), 2);
        assert_eq!(level_for(LevelFilter::Trace), 5);
    }
}
