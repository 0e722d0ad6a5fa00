//! Call sites: the user-space code that made the connects, counted in the kernel per (pid,
//! user stack, destination), with the sockets each still holds. One row per site in
//! `snapshot`/`summary` lines (`call_sites`), the trace summary, `report` and `top`.
use std::{net::SocketAddr, path::Path};

use serde::{Deserialize, Serialize};

/// One frame of a user stack, innermost first.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Frame {
    /// The instruction address in the process.
    pub addr: u64,
    /// Demangled function name, where symbols (ELF, DWARF or a perf map) had one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub function: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub file: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub line: Option<u32>,
    /// The mapped file (binary or library) holding `addr`, and the offset in it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub module: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub offset: Option<u64>,
}

impl Frame {
    /// A frame named by a JIT's perf map (`/tmp/perf-PID.map`): a name and no mapped file.
    pub fn is_jit(&self) -> bool {
        self.function.is_some() && self.module.is_none()
    }

    /// `fetch_orders (client.c:42)`, `libfoo.so+0x1a2b`, or the bare address. JIT names are
    /// shown without their tier (node's `JS:~f file:1:2` and `JS:^f file:1:2` are one
    /// function, interpreted and compiled).
    pub fn label(&self) -> String {
        let base = |m: &str| {
            Path::new(m)
                .file_name()
                .map_or_else(|| m.to_string(), |f| f.to_string_lossy().into_owned())
        };
        if self.is_jit()
            && let Some(f) = &self.function
        {
            return jit_label(f);
        }
        match (&self.function, &self.file, self.line) {
            (Some(f), Some(file), Some(l)) => format!("{f} ({}:{l})", base(file)),
            (Some(f), _, _) => f.clone(),
            (None, _, _) => match (&self.module, self.offset) {
                (Some(m), Some(o)) => format!("{}+{o:#x}", base(m)),
                _ => format!("{:#x}", self.addr),
            },
        }
    }

    /// A frame of the C library or the dynamic loader (the connect() wrapper, not the code
    /// that called it), or of a JIT runtime's own library (node's `node:net`). Skipped in
    /// labels, kept in the frames.
    pub fn is_runtime(&self) -> bool {
        let Some(m) = &self.module else {
            return self
                .function
                .as_deref()
                .is_some_and(|f| f.contains(" node:"));
        };
        let name = Path::new(m)
            .file_name()
            .map(|f| f.to_string_lossy().into_owned())
            .unwrap_or_default();
        [
            "libc.so",
            "libc-",
            "libpthread",
            "ld-linux",
            "ld-musl",
            "libc.musl",
        ]
        .iter()
        .any(|p| name.starts_with(p))
    }
}

/// `JS:^fetchOrders /srv/app/client.js:40:26` as `fetchOrders (client.js:40)`; other perf-map
/// names as they are.
fn jit_label(f: &str) -> String {
    let Some(rest) = f.strip_prefix("JS:") else {
        return f.to_string();
    };
    let rest = rest.trim_start_matches(['~', '^', '*', '+']);
    let (name, loc) = match rest.rsplit_once(' ') {
        Some((n, l)) => (n.trim(), l),
        None => ("", rest),
    };
    let name = if name.is_empty() { "(anonymous)" } else { name };
    // path:line:column -> file:line
    let mut parts = loc.rsplitn(3, ':');
    let (_col, line, path) = (parts.next(), parts.next(), parts.next());
    match (path, line) {
        (Some(p), Some(l)) => {
            let file = Path::new(p)
                .file_name()
                .map_or_else(|| p.to_string(), |f| f.to_string_lossy().into_owned());
            format!("{name} ({file}:{l})")
        }
        _ => format!("{name} {loc}"),
    }
}

/// One process's connects to one destination from one user stack.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct CallSite {
    pub pid: u32,
    #[serde(default)]
    pub comm: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub netns: Option<u64>,
    pub dst: SocketAddr,
    /// The kernel's stack id; none for the connects whose stack was not walked (rate limit,
    /// no user stack): their counts are exact, their code unknown.
    #[serde(default)]
    pub stack_id: Option<u32>,
    /// Innermost first.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub frames: Vec<Frame>,
    /// Why the frames have no names, when they do not (the process exited before its stack
    /// was symbolised, a binary without symbols, ...).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub symbols: Option<String>,
    /// connect()s that reached port selection.
    pub connects: u64,
    /// Of them, on sockets bound before connect() (each holds its port against the whole
    /// range, whatever the destination).
    #[serde(default)]
    pub bound_connects: u64,
    /// Port-selection failures (EADDRNOTAVAIL).
    pub failures: u64,
    /// Sockets it opened that hold a port now.
    #[serde(default)]
    pub holds_established: u64,
    #[serde(default)]
    pub holds_time_wait: u64,
    /// The holds are in part estimated: sockets whose connect was not walked are shared out
    /// among the process's call sites to the same destination by their share of connects.
    #[serde(default)]
    pub holds_estimated: bool,
}

/// Frames shown in a call site's label.
const LABEL_FRAMES: usize = 3;

impl CallSite {
    /// The top frames of the code that called connect(), outermost last:
    /// `fetch_orders_leaky (client.c:31) < main (client.c:77)`.
    pub fn label(&self) -> String {
        if self.stack_id.is_none() {
            return "(stack not walked: over the walk budget or no user stack)".into();
        }
        // A JIT runtime's own native frames (the interpreter, its builtins) say nothing about
        // the application: where the perf map names frames, those are the call site.
        let jit: Vec<&Frame> = self
            .frames
            .iter()
            .filter(|f| f.is_jit() && !f.is_runtime())
            .collect();
        let app: Vec<&Frame> = if jit.is_empty() {
            self.frames.iter().filter(|f| !f.is_runtime()).collect()
        } else {
            jit
        };
        let shown: Vec<&Frame> = if app.is_empty() {
            self.frames.iter().collect()
        } else {
            app
        };
        let mut parts: Vec<String> = shown.iter().take(LABEL_FRAMES).map(|f| f.label()).collect();
        if parts.is_empty() {
            parts.push("(empty stack)".into());
        }
        let mut s = parts.join(" < ");
        if let Some(why) = &self.symbols {
            s.push_str(&format!(" [{why}]"));
        }
        s
    }

    /// Whether any frame is named `function` (a test's and a reader's question).
    pub fn names(&self, function: &str) -> bool {
        self.frames
            .iter()
            .any(|f| f.function.as_deref().is_some_and(|n| n.contains(function)))
    }

    pub fn holds(&self) -> u64 {
        self.holds_established + self.holds_time_wait
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame(function: Option<&str>, module: &str) -> Frame {
        Frame {
            addr: 0x1000,
            function: function.map(str::to_string),
            file: function.map(|_| "/src/client.c".to_string()),
            line: function.map(|_| 42),
            module: Some(module.to_string()),
            offset: Some(0x1a2b),
        }
    }

    fn site(frames: Vec<Frame>) -> CallSite {
        CallSite {
            pid: 1,
            comm: "client".into(),
            netns: None,
            dst: "10.0.0.1:80".parse().unwrap(),
            stack_id: Some(7),
            frames,
            symbols: None,
            connects: 1,
            bound_connects: 0,
            failures: 0,
            holds_established: 0,
            holds_time_wait: 0,
            holds_estimated: false,
        }
    }

    #[test]
    fn label_skips_the_c_library_and_names_file_and_line() {
        let s = site(vec![
            frame(Some("connect"), "/usr/lib/x86_64-linux-gnu/libc.so.6"),
            frame(Some("fetch_orders_leaky"), "/tmp/client"),
            frame(None, "/tmp/client"),
        ]);
        assert_eq!(
            s.label(),
            "fetch_orders_leaky (client.c:42) < client+0x1a2b"
        );
        assert!(s.names("fetch_orders_leaky"));
        assert!(!s.names("fetch_orders_pooled"));
    }

    #[test]
    fn unwalked_and_unnamed_sites_say_so() {
        let mut s = site(vec![frame(None, "/opt/app")]);
        s.symbols = Some("process exited before its stack was symbolised".into());
        assert_eq!(
            s.label(),
            "app+0x1a2b [process exited before its stack was symbolised]"
        );
        s.stack_id = None;
        assert!(s.label().starts_with("(stack not walked"));
    }

    #[test]
    fn jit_frames_are_the_call_site_whatever_their_tier() {
        let js = |f: &str| Frame {
            addr: 1,
            function: Some(f.into()),
            ..Default::default()
        };
        let s = site(vec![
            frame(
                Some("__libc_connect"),
                "/usr/lib/x86_64-linux-gnu/libc.so.6",
            ),
            frame(Some("node::TCPWrap::Connect"), "/usr/bin/node"),
            js("JS:^internalConnect node:net:1038:25"),
            js("JS:~fetchOrdersLeaky /srv/app/client.js:40:26"),
            js("JS:*main /srv/app/client.js:49:20"),
            js("JS:^ /srv/app/client.js:41:22"),
        ]);
        assert_eq!(
            s.label(),
            "fetchOrdersLeaky (client.js:40) < main (client.js:49) < (anonymous) (client.js:41)"
        );
        assert!(s.names("fetchOrdersLeaky"));
    }

    #[test]
    fn round_trips_through_json() {
        let s = site(vec![frame(Some("f"), "/bin/x")]);
        let j = serde_json::to_string(&s).unwrap();
        assert_eq!(serde_json::from_str::<CallSite>(&j).unwrap(), s);
    }
}
