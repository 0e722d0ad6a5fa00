//! The layers hold: the offline code (`report`, `doctor --explain`, and everything they are
//! made of: the schema, the engine, the advice, the outputs) imports nothing that touches the
//! machine: no module of `kernel`, no aya, no netlink, no procfs. `report` must run anywhere,
//! unprivileged, on a laptop far from the incident.
//!
//! Checked on the source text, so that a new `use` cannot slip in unnoticed. Test code
//! (`tests.rs` files and `#[cfg(test)] mod tests` blocks) may use the kernel layer to build
//! fixtures.
use std::path::{Path, PathBuf};

const SRC: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/src");

/// Whole folders and single files of the offline layers.
const OFFLINE: &[&str] = &[
    "schema",
    "engine",
    "advice",
    "output",
    "cmd/report.rs",
    "cli/report.rs",
];

/// What the offline layers may not name.
const FORBIDDEN: &[&str] = &[
    "crate::kernel",
    "kernel::",
    "aya::",
    "aya_",
    "netlink_",
    "procfs::",
    "read_link",
];

fn rust_files(p: &Path, out: &mut Vec<PathBuf>) {
    if p.is_dir() {
        let mut entries: Vec<_> = std::fs::read_dir(p)
            .expect("read source dir")
            .map(|e| e.expect("entry").path())
            .collect();
        entries.sort();
        for e in entries {
            rust_files(&e, out);
        }
    } else if p.extension().is_some_and(|e| e == "rs") && p.file_name() != Some("tests.rs".as_ref())
    {
        out.push(p.to_path_buf());
    }
}

/// The code of a file without its comments and its test module.
fn non_test_code(text: &str) -> String {
    let cut = text.find("#[cfg(test)]\nmod tests {").unwrap_or(text.len());
    text[..cut]
        .lines()
        .filter(|l| {
            let t = l.trim_start();
            !(t.starts_with("//") || t.starts_with("///") || t.starts_with("//!"))
        })
        .collect::<Vec<_>>()
        .join("\n")
}

/// Offending (file, line, what) in the offline layers.
fn violations(root: &Path) -> Vec<String> {
    let mut files = Vec::new();
    for part in OFFLINE {
        rust_files(&root.join(part), &mut files);
    }
    assert!(
        files.len() > 20,
        "the offline layers were not found: {files:?}"
    );
    let mut out = Vec::new();
    for f in files {
        let text = std::fs::read_to_string(&f).expect("read source");
        for (i, line) in non_test_code(&text).lines().enumerate() {
            for bad in FORBIDDEN {
                if line.contains(bad) {
                    out.push(format!("{}:{}: {bad}: {}", f.display(), i + 1, line.trim()));
                }
            }
        }
    }
    out
}

#[test]
fn report_and_its_layers_touch_no_kernel_module() {
    let v = violations(Path::new(SRC));
    assert!(
        v.is_empty(),
        "offline code imports the machine:\n{}",
        v.join("\n")
    );
}

#[test]
fn the_check_finds_a_kernel_import() {
    // The check itself can fail: a copy of the offline layers with one kernel import in it.
    let dir = tempfile::tempdir().expect("tmp");
    for part in OFFLINE {
        let from = Path::new(SRC).join(part);
        let mut files = Vec::new();
        rust_files(&from, &mut files);
        for f in files {
            let rel = f.strip_prefix(SRC).expect("under src");
            let to = dir.path().join(rel);
            std::fs::create_dir_all(to.parent().expect("parent")).expect("mkdir");
            std::fs::copy(&f, &to).expect("copy");
        }
    }
    assert!(violations(dir.path()).is_empty());
    let victim = dir.path().join("engine/live.rs");
    let text = std::fs::read_to_string(&victim).expect("read");
    std::fs::write(&victim, format!("use crate::kernel::netns;\n{text}")).expect("write");
    let v = violations(dir.path());
    assert_eq!(v.len(), 2, "{v:?}"); // "crate::kernel" and "kernel::"
    assert!(v[0].contains("engine/live.rs:1"), "{v:?}");
}
