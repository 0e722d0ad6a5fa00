//! The alerting rules: `deploy/alerts.yaml` passes `promtool check rules` and its unit tests
//! (`promtool test rules deploy/alerts_test.yaml`: series that must fire and series that must
//! not, for every alert), and `deploy/kubernetes/prometheusrule.yaml` holds the same rules.
//!
//! The promtool tests need Debian's `prometheus` package (`cargo xtask setup` installs it) and
//! the YAML check the virtualenv it makes for `kubernetes-validate` (PyYAML comes with it); they
//! are `#[ignore]`d like the other tests of deployment tools, so `cargo xtask test` runs them,
//! and they fail, never skip, when a tool is missing. The PrometheusRule text check needs
//! nothing and runs with the unit tests.
mod common;

use std::{fs, path::PathBuf, process::Command};

use common::{repo, temp_dir};
use serde_json::Value;

const ALERTS: &str = "deploy/alerts.yaml";
const ALERTS_TEST: &str = "deploy/alerts_test.yaml";
const PROMETHEUS_RULE: &str = "deploy/kubernetes/prometheusrule.yaml";

/// What the PrometheusRule says before the rules (the rules are alerts.yaml's, under `spec:`).
const RULE_HEADER: &str = "\
# GENERATED from deploy/alerts.yaml: edit that file, then regenerate this one with
#   PORTEXHAUST_BLESS=1 cargo test -p portexhaust --test alerts
# (portexhaust/tests/alerts.rs fails while the two differ).
#
# The same alerting rules for the Prometheus Operator (monitoring.coreos.com/v1; its
# CustomResourceDefinitions must be installed):
#
#   kubectl apply -f deploy/kubernetes/prometheusrule.yaml
#
# A Prometheus object loads the PrometheusRules its ruleSelector and ruleNamespaceSelector
# match: set the labels below to what yours selects (kube-prometheus-stack: `release: NAME`).
apiVersion: monitoring.coreos.com/v1
kind: PrometheusRule
metadata:
  name: portexhaust
  namespace: portexhaust
  labels:
    app.kubernetes.io/name: portexhaust
spec:
";

/// The PrometheusRule made from alerts.yaml: its rules (everything after the leading comment
/// block) indented under `spec:`. Indenting every line alike keeps YAML block scalars intact.
fn prometheus_rule(alerts: &str) -> String {
    let mut out = String::from(RULE_HEADER);
    for l in alerts
        .lines()
        .skip_while(|l| l.starts_with('#') || l.trim().is_empty())
    {
        if !l.is_empty() {
            out.push_str("  ");
            out.push_str(l);
        }
        out.push('\n');
    }
    out
}

fn read(rel: &str) -> String {
    fs::read_to_string(repo().join(rel)).unwrap_or_else(|e| panic!("{rel}: {e}"))
}

#[test]
fn the_prometheusrule_holds_the_rules_of_alerts_yaml() {
    let want = prometheus_rule(&read(ALERTS));
    let path = repo().join(PROMETHEUS_RULE);
    if std::env::var_os("PORTEXHAUST_BLESS").is_some() {
        fs::write(&path, &want).expect("write the PrometheusRule");
    }
    let have = fs::read_to_string(&path).unwrap_or_default();
    assert!(
        have == want,
        "{PROMETHEUS_RULE} is not {ALERTS} under spec:; regenerate it with \
         `PORTEXHAUST_BLESS=1 cargo test -p portexhaust --test alerts`"
    );
    assert!(want.contains("\nspec:\n  groups:\n"), "{want}");
}

/// `promtool ARGS` in deploy/ (the test file names alerts.yaml relative to itself): its output;
/// panics when promtool is missing or fails.
fn promtool(args: &[&str]) -> String {
    let out = Command::new("promtool")
        .current_dir(repo().join("deploy"))
        .args(args)
        .output()
        .unwrap_or_else(|e| {
            panic!("promtool: {e} (Debian's prometheus package ships it: `cargo xtask setup`)")
        });
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        out.status.success(),
        "promtool {args:?}: {}\n{said}",
        out.status
    );
    said
}

#[test]
#[ignore = "needs promtool (cargo xtask setup): run with cargo xtask test"]
fn alert_rules_pass_promtool_and_their_unit_tests() {
    let checked = promtool(&["check", "rules", "alerts.yaml"]);
    assert!(checked.contains("SUCCESS: 4 rules found"), "{checked}");
    let tested = promtool(&["test", "rules", "alerts_test.yaml"]);
    assert!(tested.contains("SUCCESS"), "{tested}");
    eprintln!("{checked}{tested}");
    // promtool really fails a rule that does not do what its test says: a copy whose
    // utilisation threshold is off must not pass the same tests.
    let dir = temp_dir("alerts");
    let text = read(ALERTS).replace(
        "portexhaust_port_utilisation_ratio > 0.9",
        "portexhaust_port_utilisation_ratio > 0.8",
    );
    fs::write(dir.path().join("alerts.yaml"), text).expect("write");
    fs::copy(
        repo().join(ALERTS_TEST),
        dir.path().join("alerts_test.yaml"),
    )
    .expect("copy");
    let out = Command::new("promtool")
        .current_dir(dir.path())
        .args(["test", "rules", "alerts_test.yaml"])
        .output()
        .expect("promtool");
    assert!(!out.status.success(), "a broken threshold passed the tests");
}

/// YAML files as JSON, through PyYAML from the virtualenv `cargo xtask setup` makes for
/// kubernetes-validate (or the system's python3 when it has PyYAML).
fn yaml(rels: &[&str]) -> Vec<Value> {
    let venv = std::env::var_os("HOME")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/root"))
        .join(".cache/portexhaust/venv/bin/python3");
    let python = if venv.exists() {
        venv
    } else {
        PathBuf::from("python3")
    };
    let out = Command::new(&python)
        .arg("-c")
        .arg(
            "import json, sys, yaml\n\
             print(json.dumps([yaml.safe_load(open(f)) for f in sys.argv[1:]]))",
        )
        .args(rels.iter().map(|r| repo().join(r)))
        .output()
        .unwrap_or_else(|e| panic!("{}: {e} (run `cargo xtask setup`)", python.display()));
    assert!(
        out.status.success(),
        "reading YAML with {}: {}",
        python.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("json")
}

/// The labels of a promtool series selector: `name{a="x",b="y"}` -> value of `key`.
fn series_label(selector: &str, key: &str) -> Option<String> {
    let inner = selector.split_once('{')?.1.strip_suffix('}')?;
    inner.split("\",").find_map(|kv| {
        let (k, v) = kv.split_once('=')?;
        (k.trim() == key).then(|| v.trim_matches('"').to_string())
    })
}

#[test]
#[ignore = "needs the set-up's Python with PyYAML (cargo xtask setup): run with cargo xtask test"]
fn every_alert_has_series_that_fire_and_series_that_must_not() {
    let docs = yaml(&[ALERTS, ALERTS_TEST, PROMETHEUS_RULE]);
    let (alerts, tests, rule) = (&docs[0], &docs[1], &docs[2]);
    // The PrometheusRule as Kubernetes reads it: the same groups, rule for rule.
    assert_eq!(rule["apiVersion"], "monitoring.coreos.com/v1");
    assert_eq!(rule["kind"], "PrometheusRule");
    assert_eq!(rule["metadata"]["namespace"], "portexhaust");
    assert_eq!(rule["spec"]["groups"], alerts["groups"]);
    let names: Vec<&str> = alerts["groups"]
        .as_array()
        .expect("groups")
        .iter()
        .flat_map(|g| g["rules"].as_array().expect("rules"))
        .map(|r| r["alert"].as_str().expect("only alerting rules"))
        .collect();
    assert_eq!(names.len(), 4, "{names:?}");
    for name in names {
        let mut fires = false;
        let mut quiet_eval = false;
        let mut silent_series = false;
        for t in tests["tests"].as_array().expect("tests") {
            let evals: Vec<&Value> = t["alert_rule_test"]
                .as_array()
                .into_iter()
                .flatten()
                .filter(|a| a["alertname"] == name)
                .collect();
            if evals.is_empty() {
                continue;
            }
            let firing: Vec<String> = evals
                .iter()
                .flat_map(|a| a["exp_alerts"].as_array().into_iter().flatten())
                .filter_map(|e| e["exp_labels"]["dst"].as_str().map(String::from))
                .collect();
            fires |= !firing.is_empty();
            quiet_eval |= evals
                .iter()
                .any(|a| a["exp_alerts"].as_array().is_some_and(Vec::is_empty));
            // An input series of a destination that never fires in any of its evaluations.
            silent_series |= t["input_series"]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(|s| series_label(s["series"].as_str()?, "dst"))
                .any(|dst| !firing.contains(&dst));
        }
        assert!(fires, "{name}: no test where it fires");
        assert!(quiet_eval, "{name}: no evaluation where it must be silent");
        assert!(silent_series, "{name}: no series that must not fire");
    }
}
