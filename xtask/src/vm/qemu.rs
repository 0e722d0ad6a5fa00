//! One guest boot under `qemu-system-x86_64` with software emulation, watched with a deadline.
//!
//! No KVM: these machines have no hardware virtualisation (`-enable-kvm` hangs), and TCG boots
//! a Debian cloud kernel with a small initramfs in seconds. The console (ttyS0) and the results
//! port (ttyS1) each go to a file that is read while the guest runs.
use std::{
    path::Path,
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result};

pub struct BootConfig<'a> {
    pub vmlinuz: &'a Path,
    pub initramfs: &'a Path,
    /// Folder for console.log, results.log and qemu.log (overwritten).
    pub run_dir: &'a Path,
    pub memory_mb: u32,
    pub smp: u32,
    pub timeout: Duration,
    /// More kernel command-line words (appended after the console settings).
    pub append: &'a str,
    /// More QEMU options, after the others.
    pub qemu_args: &'a [&'a str],
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Ended {
    /// QEMU exited by itself (the guest powered off, or rebooted into -no-reboot).
    Exited(Option<i32>),
    /// The deadline passed; QEMU was killed.
    TimedOut,
}

#[derive(Debug)]
pub struct BootOutcome {
    pub ended: Ended,
    pub elapsed: Duration,
    pub console: String,
    pub results: String,
    /// QEMU's own stdout and stderr (its errors, such as a kernel it cannot load).
    pub qemu_log: String,
}

/// QEMU's option syntax doubles a comma to escape it.
fn qemu_path(p: &Path) -> String {
    p.display().to_string().replace(',', ",,")
}

fn read_lossy(p: &Path) -> String {
    std::fs::read(p)
        .map(|b| String::from_utf8_lossy(&b).into_owned())
        .unwrap_or_default()
}

/// Boot and wait for QEMU to exit or the deadline to pass. `on_results` gets each new
/// complete line of the results port as it arrives (for progress messages).
pub fn boot(cfg: &BootConfig, mut on_results: impl FnMut(&str, Duration)) -> Result<BootOutcome> {
    std::fs::create_dir_all(cfg.run_dir)
        .with_context(|| format!("creating {}", cfg.run_dir.display()))?;
    let console = cfg.run_dir.join("console.log");
    let results = cfg.run_dir.join("results.log");
    let qemu_log = cfg.run_dir.join("qemu.log");
    for p in [&console, &results] {
        std::fs::write(p, "").with_context(|| format!("creating {}", p.display()))?;
    }
    let log_file = std::fs::File::create(&qemu_log)
        .with_context(|| format!("creating {}", qemu_log.display()))?;
    let log_err = log_file
        .try_clone()
        .with_context(|| format!("opening {}", qemu_log.display()))?;

    let mut cmd = Command::new("qemu-system-x86_64");
    cmd.args(["-nodefaults", "-no-user-config", "-display", "none"])
        .args(["-accel", "tcg", "-cpu", "max"])
        .args(["-m", &cfg.memory_mb.to_string()])
        .args(["-smp", &cfg.smp.to_string()])
        .arg("-kernel")
        .arg(cfg.vmlinuz)
        .arg("-initrd")
        .arg(cfg.initramfs)
        // No `quiet`: the full boot log costs no measurable time here (~2 s either way) and
        // makes the console tail of a failed boot worth reading; earlyprintk covers a kernel
        // that dies before its console driver starts (seen with too little memory).
        // panic=-1: a panic reboots at once, and -no-reboot turns that into QEMU exiting.
        .arg("-append")
        .arg(
            format!(
                "console=ttyS0 earlyprintk=serial,ttyS0 panic=-1 {}",
                cfg.append
            )
            .trim_end(),
        )
        .arg("-no-reboot")
        .args([
            "-chardev",
            &format!("file,id=con,path={}", qemu_path(&console)),
            "-serial",
            "chardev:con",
            "-chardev",
            &format!("file,id=res,path={}", qemu_path(&results)),
            "-serial",
            "chardev:res",
        ])
        .args(cfg.qemu_args)
        .stdin(Stdio::null())
        .stdout(Stdio::from(log_file))
        .stderr(Stdio::from(log_err));

    let start = Instant::now();
    let mut child = cmd
        .spawn()
        .context("could not start qemu-system-x86_64 (is qemu-system-x86 installed?)")?;
    let mut seen = 0usize; // bytes of results.log already passed to on_results
    let ended = loop {
        let status = child.try_wait().context("waiting for qemu")?;
        // Bytes, not text: a partly written UTF-8 sequence must not move the offsets.
        let bytes = std::fs::read(&results).unwrap_or_default();
        if let Some(upto) = bytes
            .get(seen..)
            .and_then(|new| new.iter().rposition(|&b| b == b'\n'))
        {
            let new = String::from_utf8_lossy(&bytes[seen..seen + upto + 1]);
            for line in new.lines() {
                on_results(line, start.elapsed());
            }
            seen += upto + 1;
        }
        if let Some(status) = status {
            break Ended::Exited(status.code());
        }
        if start.elapsed() >= cfg.timeout {
            // Our own child, by its handle: SIGKILL, then reap it.
            let _ = child.kill();
            let _ = child.wait();
            break Ended::TimedOut;
        }
        std::thread::sleep(Duration::from_millis(250));
    };
    Ok(BootOutcome {
        ended,
        elapsed: start.elapsed(),
        console: read_lossy(&console),
        results: read_lossy(&results),
        qemu_log: read_lossy(&qemu_log),
    })
}

/// The last `n` non-empty lines of the console, for reports on boots that went wrong.
pub fn last_lines(text: &str, n: usize) -> Vec<String> {
    let lines: Vec<&str> = text
        .lines()
        .map(|l| l.trim_end_matches('\r'))
        .filter(|l| !l.trim().is_empty())
        .collect();
    lines[lines.len().saturating_sub(n)..]
        .iter()
        .map(|l| l.to_string())
        .collect()
}
