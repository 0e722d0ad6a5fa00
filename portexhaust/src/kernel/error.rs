//! Library errors. Each message is one line that says what is missing and what to do.
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
    /// apart from a failure (1).
    pub fn exit_code(&self) -> i32 {
        match self {
            Self::BackendUnavailable { .. } | Self::NoBackend(_) => 3,
            _ => 1,
        }
    }
}

/// One line out of an error chain: every source, each cut at its first line, so a verifier
/// log does not flood the terminal.
pub fn one_line(err: &(dyn std::error::Error + 'static)) -> String {
    let mut parts = Vec::new();
    let mut cur: Option<&(dyn std::error::Error + 'static)> = Some(err);
    while let Some(e) = cur {
        let s = e.to_string();
        let first = s.lines().next().unwrap_or("").trim().to_string();
        let first = match first.find(". Verifier output:") {
            Some(i) => first[..i].to_string(),
            None => first,
        };
        if !first.is_empty() && !parts.iter().any(|p: &String| p.contains(&first)) {
            parts.push(first);
        }
        cur = e.source();
    }
    let mut out = parts.join(": ");
    if out.len() > 300 {
        let mut cut = 300;
        while !out.is_char_boundary(cut) {
            cut -= 1;
        }
        out.truncate(cut);
        out.push('…');
    }
    out
}

pub type Result<T, E = Error> = std::result::Result<T, E>;
