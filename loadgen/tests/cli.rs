//! Bad input: one clear line on stderr and a non-zero exit, never a panic (no root needed:
//! these are refused before any namespace is made).
use std::process::Command;

const BIN: &str = env!("CARGO_BIN_EXE_pxh-loadgen");

fn refused(args: &[&str], needle: &str) {
    let out = Command::new(BIN)
        .args(args)
        .output()
        .expect("run pxh-loadgen");
    assert!(!out.status.success(), "{args:?} should fail");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains(needle), "{args:?}: {err}");
    assert!(!err.contains("panicked"), "{args:?}: {err}");
}

#[test]
fn bad_input_is_refused_in_one_line() {
    refused(&["storm", "--failures", "0"], "--failures");
    refused(&["churn", "--secs", "700"], "seconds must be between");
    refused(
        &["hold", "--connections", "0"],
        "--connections must be between",
    );
    refused(
        &["hold", "--connections", "100000", "--dests", "1"],
        "more than the 25000 ports",
    );
    refused(&["fly"], "unrecognized subcommand");
}
