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

#[test]
fn bcc_short_options_and_comma_lists() {
    let cli = Cli::try_parse_from([
        "portexhaust",
        "trace",
        "-p",
        "42,43",
        "-p",
        "44",
        "-n",
        "python3",
        "-P",
        "443,27017",
        "-d",
        "2.5",
        "-j",
    ])
    .expect("parses");
    let Cmd::Trace(a) = cli.cmd else {
        panic!("not trace")
    };
    assert_eq!(a.filter.pid, [42, 43, 44]);
    assert_eq!(a.filter.comm, ["python3"]);
    assert_eq!(a.filter.dport, [443, 27017]);
    assert_eq!(a.duration, Some(Duration::from_secs_f64(2.5)));
    assert!(a.json);
    // --port is the long form bcc users know from tcpconnect's -P.
    let cli = Cli::try_parse_from(["portexhaust", "trace", "--port", "80"]).expect("alias");
    let Cmd::Trace(a) = cli.cmd else {
        panic!("not trace")
    };
    assert_eq!(a.filter.dport, [80]);
    for bad in [
        &["portexhaust", "trace", "-P", "443,x"][..],
        &["portexhaust", "trace", "-p", "1,,2"],
        &["portexhaust", "trace", "-o", "yaml"],
        &["portexhaust", "trace", "-d", "0"],
    ] {
        assert!(Cli::try_parse_from(bad).is_err(), "{bad:?}");
    }
}

#[test]
fn output_flag_folds_into_json() {
    for (args, json) in [
        (&["portexhaust", "trace", "-o", "json"][..], true),
        (&["portexhaust", "trace", "--output", "text"], false),
        (&["portexhaust", "trace"], false),
        (&["portexhaust", "trace", "-o", "json", "--json"], true),
        (&["portexhaust", "top", "-o", "json"], true),
        (&["portexhaust", "doctor", "-o", "json"], true),
        (&["portexhaust", "doctor", "-j"], true),
    ] {
        let mut cli = Cli::try_parse_from(args).expect("parses");
        cli.fold_output().expect("consistent");
        let got = match &cli.cmd {
            Cmd::Trace(a) => a.json,
            Cmd::Top(a) => a.json,
            Cmd::Doctor(a) => a.json,
            _ => unreachable!(),
        };
        assert_eq!(got, json, "{args:?}");
    }
    let mut cli =
        Cli::try_parse_from(["portexhaust", "trace", "-o", "text", "--json"]).expect("parses");
    let err = cli.fold_output().expect_err("contradiction");
    assert!(err.contains("-o text"), "{err}");
    // report keeps -o for its output file.
    assert!(Cli::try_parse_from(["portexhaust", "report", "r.ndjson", "-o", "r.html"]).is_ok());
}

#[test]
fn cgroup_and_container_filters_parse() {
    let cli = Cli::try_parse_from([
        "portexhaust",
        "trace",
        "--cgroup",
        "/system.slice/app.service",
        "--container",
        "4f1c2a9b8e7d",
    ])
    .expect("parses");
    let Cmd::Trace(a) = cli.cmd else {
        panic!("not trace")
    };
    assert_eq!(a.filter.cgroup, ["/system.slice/app.service"]);
    assert_eq!(a.filter.container, ["4f1c2a9b8e7d"]);
}

#[test]
fn completions_know_the_short_options() {
    let mut out = Vec::new();
    clap_complete::generate(
        clap_complete::Shell::Bash,
        &mut Cli::command(),
        "portexhaust",
        &mut out,
    );
    let bash = String::from_utf8(out).expect("utf-8");
    for opt in [
        "-p",
        "-n",
        "-P",
        "-d",
        "-j",
        "-o",
        "--cgroup",
        "--container",
        "--port",
    ] {
        assert!(bash.contains(opt), "bash completion lacks {opt}");
    }
}
