//! Which backends this kernel runs, which one a plain `trace` picks, and whether `trace
//! --catch` exists: asked of the binary itself.
use std::{path::Path, process::Command};

use anyhow::{Result, bail};

// ---------------------------------------------------------------------------------------------
// What the binary offers.

/// `portexhaust trace --help`, or an empty text if it cannot be run.
fn trace_help(portexhaust: &Path) -> String {
    Command::new(portexhaust)
        .args(["trace", "--help"])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
        .unwrap_or_default()
}

/// The values `--backend` takes, as clap lists them in `trace --help`, without `auto`: either
/// `[possible values: a, b]` or a `Possible values:` list of `- a: ...` lines under the option.
pub fn parse_backend_values(help: &str) -> Vec<String> {
    let mut lines = help.lines().skip_while(|l| !l.contains("--backend"));
    let mut out: Vec<String> = Vec::new();
    let mut first = true;
    for line in lines.by_ref() {
        let t = line.trim();
        // The next option ends this one's text.
        if !first && (t.starts_with("--") || (t.starts_with('-') && t.chars().nth(2) == Some(',')))
        {
            break;
        }
        first = false;
        if let Some(rest) = t.split_once("[possible values:").map(|(_, r)| r) {
            let list = rest.split(']').next().unwrap_or("");
            out.extend(list.split(',').map(|v| v.trim().to_string()));
        } else if let Some(item) = t.strip_prefix("- ") {
            let name = item.split([':', ' ']).next().unwrap_or("").trim();
            out.push(name.to_string());
        }
    }
    let mut seen = std::collections::BTreeSet::new();
    out.into_iter()
        .filter(|v| !v.is_empty() && v != "auto" && seen.insert(v.clone()))
        .collect()
}

/// Whether this build's `trace` offers `--catch` (bind/UDP coverage on demand).
pub fn offers_catch(help: &str) -> bool {
    help.contains("--catch")
}

/// The reason a failed `portexhaust` command gives: its last non-empty stderr line.
fn last_error_line(stderr: &[u8]) -> String {
    String::from_utf8_lossy(stderr)
        .lines()
        .rev()
        .find(|l| !l.trim().is_empty())
        .unwrap_or("no output")
        .trim_start_matches("portexhaust: error: ")
        .to_string()
}

/// Which of `names` this kernel runs: each is started for a moment; (ran, skipped with reason).
fn detect_backends(portexhaust: &Path, names: &[String]) -> (Vec<String>, Vec<(String, String)>) {
    let mut ran = Vec::new();
    let mut skipped = Vec::new();
    for b in names {
        let out = Command::new(portexhaust)
            .args(["trace", "--json", "--backend", b, "--duration", "0.2"])
            .output();
        match out {
            Ok(o)
                if o.status.success() && String::from_utf8_lossy(&o.stderr).contains("ready:") =>
            {
                ran.push(b.to_string())
            }
            Ok(o) => skipped.push((b.to_string(), last_error_line(&o.stderr))),
            Err(e) => skipped.push((b.to_string(), format!("could not start: {e}"))),
        }
    }
    (ran, skipped)
}

/// The backend a plain `trace` (no --backend) picks here, from its ready line: "... with the
/// X backend".
fn default_backend(portexhaust: &Path) -> Option<String> {
    let o = Command::new(portexhaust)
        .args(["trace", "--json", "--duration", "0.2"])
        .output()
        .ok()?;
    parse_ready_backend(&String::from_utf8_lossy(&o.stderr))
}

pub fn parse_ready_backend(stderr: &str) -> Option<String> {
    let line = stderr.lines().find(|l| l.contains("ready:"))?;
    let (_, rest) = line.split_once("with the ")?;
    let name = rest.split_whitespace().next()?;
    rest.split_whitespace()
        .nth(1)
        .is_some_and(|w| w.starts_with("backend"))
        .then(|| name.to_string())
}

/// What this machine (or guest) runs, found out by asking the binary.
pub(super) struct Offer {
    pub(super) backends_ran: Vec<String>,
    pub(super) backends_skipped: Vec<(String, String)>,
    pub(super) default_backend: Option<String>,
    pub(super) catch: bool,
    /// `trace --catch nat` exists and attaches here (the source-NAT hook).
    pub(super) catch_nat: bool,
    /// `trace --no-call-sites` exists: the default walks user stacks, and the bench measures
    /// it without them too.
    pub(super) call_sites: bool,
}

/// Whether `trace --catch nat` watches the NAT on this kernel: its coverage line says so.
fn nat_attaches(portexhaust: &Path) -> bool {
    std::process::Command::new(portexhaust)
        .args(["trace", "--catch", "nat", "--duration", "0.2"])
        .stdout(std::process::Stdio::null())
        .output()
        .is_ok_and(|o| String::from_utf8_lossy(&o.stderr).contains("watching nat:"))
}

pub(super) fn discover(portexhaust: &Path) -> Result<Offer> {
    let help = trace_help(portexhaust);
    let names = parse_backend_values(&help);
    if names.is_empty() {
        bail!(
            "`{} trace --help` lists no --backend values (cannot tell which backends to measure)",
            portexhaust.display()
        );
    }
    let (backends_ran, backends_skipped) = detect_backends(portexhaust, &names);
    Ok(Offer {
        default_backend: default_backend(portexhaust),
        catch: offers_catch(&help),
        catch_nat: offers_catch(&help) && nat_attaches(portexhaust),
        call_sites: help.contains("--no-call-sites"),
        backends_ran,
        backends_skipped,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backend_values_come_from_either_help_format() {
        let long = "Options:\n      --json\n          NDJSON\n\n      --backend <BACKEND>\n          Probe backend\n\n          Possible values:\n          - auto:       fentry, then kprobe\n          - fentry:     fentry/fexit on x\n          - tp-btf:     BTF raw tracepoint\n          - tracepoint: syscalls\n          \n          [default: auto]\n\n      --record <FILE>\n          - not: a value\n";
        assert_eq!(
            parse_backend_values(long),
            vec!["fentry", "tp-btf", "tracepoint"]
        );
        let short = "      --backend <BACKEND>  Probe backend [default: auto] [possible values: auto, fentry, kprobe, raw-tp]\n      --record <FILE>  x\n";
        assert_eq!(
            parse_backend_values(short),
            vec!["fentry", "kprobe", "raw-tp"]
        );
        assert!(parse_backend_values("--pid <PID>\n").is_empty());
        assert!(offers_catch("      --catch <WHAT>  bind,udp"));
        assert!(!offers_catch(short));
    }

    #[test]
    fn the_ready_line_names_the_backend() {
        let err = "portexhaust: ready: tracing port-exhaustion failures with the tracepoint backend for 0.2s\nportexhaust: census: 3 TCP sockets\n";
        assert_eq!(parse_ready_backend(err).as_deref(), Some("tracepoint"));
        assert_eq!(parse_ready_backend("portexhaust: error: x\n"), None);
    }
}
