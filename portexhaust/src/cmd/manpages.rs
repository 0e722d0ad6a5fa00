//! `portexhaust manpages --out-dir DIR` (hidden): the man pages, rendered by clap_mangen from
//! the very command line the binary parses, so that they cannot drift from `--help`:
//! `portexhaust.1` and one page per visible command (`portexhaust-trace.1`, ...). Hidden
//! commands (`workload`, this one) get none. `cargo xtask dist` packages them.
use std::path::{Path, PathBuf};

use anyhow::Context as _;
use clap::CommandFactory as _;

use crate::cli::Cli;

/// Write every page into `out_dir`; returns the files written, the top-level page first.
pub fn write(out_dir: &Path) -> anyhow::Result<Vec<PathBuf>> {
    std::fs::create_dir_all(out_dir).with_context(|| format!("creating {}", out_dir.display()))?;
    // No `help` pseudo-command, and built once here so that every subcommand gets its full
    // display name (portexhaust-trace) and the global options.
    let mut cmd = Cli::command().disable_help_subcommand(true);
    cmd.build();
    let mut written = Vec::new();
    write_tree(&cmd, out_dir, &mut written)?;
    Ok(written)
}

fn write_tree(
    cmd: &clap::Command,
    out_dir: &Path,
    written: &mut Vec<PathBuf>,
) -> anyhow::Result<()> {
    let page = clap_mangen::Man::new(cmd.clone());
    let path = page.generate_to(out_dir).with_context(|| {
        format!(
            "writing the man page of {} in {}",
            cmd.get_name(),
            out_dir.display()
        )
    })?;
    written.push(path);
    for sub in cmd.get_subcommands().filter(|s| !s.is_hide_set()) {
        write_tree(sub, out_dir, written)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_page_per_visible_command() {
        let dir = tempfile::tempdir().expect("temp dir");
        let pages = write(dir.path()).expect("pages");
        let names: Vec<String> = pages
            .iter()
            .filter_map(|p| p.file_name()?.to_str().map(str::to_string))
            .collect();
        assert_eq!(names[0], "portexhaust.1");
        for want in [
            "portexhaust-trace.1",
            "portexhaust-selftest.1",
            "portexhaust-report.1",
        ] {
            assert!(
                names.iter().any(|n| n == want),
                "{want} missing from {names:?}"
            );
        }
        assert!(
            !names
                .iter()
                .any(|n| n.contains("workload") || n.contains("manpages"))
        );
        let trace = std::fs::read_to_string(dir.path().join("portexhaust-trace.1")).expect("read");
        assert!(
            trace.contains("\\-\\-record"),
            "trace page lacks --record:\n{trace}"
        );
    }
}
