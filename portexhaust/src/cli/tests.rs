use clap::{CommandFactory, Parser};

use super::*;

#[test]
fn cli_is_well_formed() {
    Cli::command().debug_assert();
}

#[test]
fn bad_arguments_are_rejected() {
    for args in [
        &["portexhaust", "trace", "--duration", "0"][..],
        &["portexhaust", "trace", "--duration", "abc"],
        &["portexhaust", "trace", "--pid", "x"],
        &["portexhaust", "trace", "--dport", "70000"],
        &["portexhaust", "trace", "--comm", "a-name-longer-than-15"],
        &["portexhaust", "trace", "--backend", "uprobe"],
        &["portexhaust", "trace", "--snapshot-interval", "5"],
        &["portexhaust", "trace", "--record-events-per-s", "5"],
        &[
            "portexhaust",
            "trace",
            "--record",
            "x",
            "--record-events-per-s",
            "-1",
        ],
        &[
            "portexhaust",
            "trace",
            "--record",
            "x",
            "--snapshot-interval",
            "0",
        ],
        &["portexhaust", "report"],
        &["portexhaust", "report", "x", "--format", "pdf"],
        &["portexhaust", "report", "x", "--since", "yesterday"],
        &["portexhaust", "doctor", "--explain", "tcp_tw_whatever"],
        &["portexhaust", "trace", "--metrics-addr", "host:9977"],
        &["portexhaust", "trace", "--metrics-addr", "99999"],
        &["portexhaust", "trace", "--metrics-addr"],
    ] {
        assert!(Cli::try_parse_from(args).is_err(), "{args:?}");
    }
    assert!(
        Cli::try_parse_from(["portexhaust", "trace", "--duration", "1.5", "--pid", "3"]).is_ok()
    );
    for ok in [
        &[
            "portexhaust",
            "trace",
            "--record",
            "x",
            "--snapshot-interval",
            "0.5",
        ][..],
        &[
            "portexhaust",
            "report",
            "a",
            "b",
            "--format",
            "html",
            "-o",
            "r.html",
        ],
        &[
            "portexhaust",
            "report",
            "a",
            "--since",
            "2026-11-25T11:20:00Z",
            "--pid",
            "1",
        ],
        &["portexhaust", "doctor", "--json"],
        &[
            "portexhaust",
            "doctor",
            "--explain",
            "net.ipv4.tcp_tw_recycle",
        ],
    ] {
        assert!(Cli::try_parse_from(ok).is_ok(), "{ok:?}");
    }
    assert!(
        Cli::try_parse_from([
            "portexhaust",
            "trace",
            "--metrics-addr",
            "[::1]:9977",
            "--no-container-labels"
        ])
        .is_ok()
    );
}

#[test]
fn verbose_counts_and_goes_anywhere() {
    let at = |args: &[&str]| Cli::try_parse_from(args).expect("parses").log_filter();
    assert_eq!(at(&["portexhaust", "doctor"]), "warn");
    assert_eq!(at(&["portexhaust", "-v", "doctor"]), "info");
    assert_eq!(at(&["portexhaust", "trace", "-vv"]), "debug");
    assert_eq!(
        at(&["portexhaust", "--verbose", "--verbose", "top"]),
        "debug"
    );
    assert_eq!(at(&["portexhaust", "trace", "-vvvv"]), "trace");
}

#[test]
fn max_count_keys_is_accepted_but_hidden() {
    let cli = Cli::try_parse_from(["portexhaust", "trace", "--max-count-keys", "2"]).expect("ok");
    let Cmd::Trace(t) = cli.cmd else {
        panic!("not trace");
    };
    assert_eq!(t.max_count_keys, 2);
    assert!(Cli::try_parse_from(["portexhaust", "trace", "--max-count-keys", "0"]).is_err());
    let mut cmd = Cli::command();
    let help = cmd
        .find_subcommand_mut("trace")
        .expect("trace")
        .render_long_help()
        .to_string();
    assert!(!help.contains("max-count-keys"), "{help}");
}

#[test]
fn record_sizes_and_rotation_arguments() {
    assert_eq!(parse_size("64M"), Ok(64 << 20));
    assert_eq!(parse_size("64MiB"), Ok(64 << 20));
    assert_eq!(parse_size("1g"), Ok(1 << 30));
    assert_eq!(parse_size("512K"), Ok(512 << 10));
    assert_eq!(parse_size("1048576"), Ok(1 << 20));
    assert_eq!(parse_size("2TB"), Ok(2 << 40));
    for bad in ["", "M", "64X", "-1", "1.5G", "99999999999T"] {
        assert!(parse_size(bad).is_err(), "{bad:?}");
    }
    assert!(
        parse_size("4K").expect_err("tiny").contains("at least 64K"),
        "a header alone may be larger"
    );
    let trace = |args: &[&str]| {
        let all = [&["portexhaust", "trace"][..], args].concat();
        match Cli::try_parse_from(all).map(|c| c.cmd) {
            Ok(Cmd::Trace(t)) => Ok((t.record_max_size, t.record_keep)),
            Ok(_) => panic!("not trace"),
            Err(e) => Err(e.kind()),
        }
    };
    assert_eq!(
        trace(&["--record", "x", "--record-max-size", "64M"]),
        Ok((Some(64 << 20), 4)),
        "keeps 4 by default"
    );
    assert_eq!(
        trace(&[
            "--record",
            "x",
            "--record-max-size",
            "1G",
            "--record-keep",
            "0"
        ]),
        Ok((Some(1 << 30), 0))
    );
    assert_eq!(trace(&["--record", "x"]), Ok((None, 4)));
    // Rotation needs a record, and a kept count needs a size.
    assert!(trace(&["--record-max-size", "64M"]).is_err());
    assert!(trace(&["--record", "x", "--record-keep", "2"]).is_err());
}
