//! Skips are loud: a gated test run without its variable fails under CI and
//! prints a banner elsewhere (`common::enabled`, used by every gated e2e test).
#![allow(clippy::expect_used, clippy::unwrap_used, clippy::panic)]

mod common;

use std::process::{Command, Output};

/// The gate of [`gated_probe`].
const PROBE_VAR: &str = "PINGMESH_GATE_PROBE";
/// Set only when this file's own test runs [`gated_probe`], so that
/// `--include-ignored` runs of the whole crate leave it alone.
const CHILD_VAR: &str = "PINGMESH_GATE_PROBE_CHILD";

#[test]
#[ignore = "run as a child process by without_its_variable_a_gated_test_fails_in_ci_and_says_so_elsewhere"]
fn gated_probe() {
    if std::env::var_os(CHILD_VAR).is_none() {
        return;
    }
    if !common::enabled(PROBE_VAR, "the gate's own test") {
        return;
    }
    println!("gated probe ran");
}

/// Runs [`gated_probe`] in a child process with `env` set and `CI` and the
/// gate variable otherwise unset.
fn run_probe(env: &[(&str, &str)]) -> Output {
    let mut command = Command::new(std::env::current_exe().unwrap());
    command
        .args(["--ignored", "--exact", "gated_probe", "--nocapture"])
        .env_remove(PROBE_VAR)
        .env_remove("CI")
        .env(CHILD_VAR, "1");
    for (k, v) in env {
        command.env(k, v);
    }
    command.output().unwrap()
}

fn text(out: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

#[test]
fn without_its_variable_a_gated_test_fails_in_ci_and_says_so_elsewhere() {
    let in_ci = run_probe(&[("CI", "true")]);
    assert!(
        !in_ci.status.success(),
        "a skip passed under CI:\n{}",
        text(&in_ci)
    );
    assert!(text(&in_ci).contains(PROBE_VAR), "{}", text(&in_ci));

    let here = run_probe(&[]);
    assert!(here.status.success(), "{}", text(&here));
    assert!(
        text(&here).contains("SKIPPED, nothing was tested")
            && !text(&here).contains("gated probe ran"),
        "{}",
        text(&here)
    );

    for ci in ["false", "0", ""] {
        let off = run_probe(&[("CI", ci)]);
        assert!(off.status.success(), "CI={ci:?}: {}", text(&off));
    }

    let gated_in = run_probe(&[("CI", "true"), (PROBE_VAR, "1")]);
    assert!(gated_in.status.success(), "{}", text(&gated_in));
    assert!(text(&gated_in).contains("gated probe ran"));
}
