//! Errors of the kernel layer. Each message is one line that says what is missing and what to
//! do; sources are kept (`#[source]`), never flattened into text.
use thiserror::Error;

#[derive(Debug, Error)]
pub enum Error {
    #[error(
        "not enough privileges to load eBPF programs (need root, or CAP_BPF + CAP_PERFMON, or \
         CAP_SYS_ADMIN; this process has {have}): run it with sudo"
    )]
    NotPrivileged { have: String },

    #[error(
        "tracefs is not available ({detail}): mount it with `mount -t tracefs none /sys/kernel/tracing`"
    )]
    NoTracefs { detail: String },

    #[error("backend {backend} is not available on this kernel: {reason}")]
    BackendUnavailable {
        backend: &'static str,
        reason: String,
    },

    #[error("no probe backend works on this kernel: {0}")]
    NoBackend(String),

    #[error("the eBPF object has no {kind} named {name} (a build mismatch: rebuild portexhaust)")]
    MissingObject {
        kind: &'static str,
        name: &'static str,
    },

    #[error("eBPF map {map}: {source}")]
    Map {
        map: &'static str,
        #[source]
        source: aya::maps::MapError,
    },

    /// An argument that cannot work, found before anything was loaded: the message names the
    /// argument and what to do instead.
    #[error("{0}")]
    BadArgument(String),

    #[error("{context}: {source}")]
    Io {
        context: String,
        #[source]
        source: std::io::Error,
    },
}

impl Error {
    pub fn io(context: impl Into<String>, source: std::io::Error) -> Self {
        Self::Io {
            context: context.into(),
            source,
        }
    }

    /// Process exit code: 3 tells scripts (and the VM matrix) "this kernel lacks the backend"
    /// apart from a failure (1); 2 is a bad argument, as for clap's own usage errors.
    pub fn exit_code(&self) -> i32 {
        match self {
            Self::BackendUnavailable { .. } | Self::NoBackend(_) => 3,
            Self::BadArgument(_) => 2,
            _ => 1,
        }
    }
}

pub type Result<T, E = Error> = std::result::Result<T, E>;
