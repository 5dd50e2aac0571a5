//! The Prometheus alerting rules under deploy/prometheus, checked and unit-tested with the real
//! `promtool` (Debian's `prometheus` package, installed by the test command): they parse, and
//! they fire at the thresholds and not before their `for:` duration.

use std::process::Command;
use std::time::Duration;

use cogmesh_e2e::{repo_root, run_with_timeout};

fn promtool(args: &[&str]) -> (Option<i32>, String) {
    let (code, out, err) = run_with_timeout(
        Command::new("promtool")
            .args(args)
            .current_dir(repo_root().join("deploy/prometheus")),
        Duration::from_secs(60),
    );
    (code, format!("{out}{err}"))
}

#[test]
fn alerting_rules_pass_promtool_check_and_their_unit_tests() {
    let (code, out) = promtool(&["check", "rules", "alerts.yaml"]);
    assert_eq!(code, Some(0), "{out}");
    assert!(out.contains("SUCCESS: 8 rules found"), "{out}");
    let (code, out) = promtool(&["test", "rules", "alerts_test.yaml"]);
    assert_eq!(code, Some(0), "{out}");
    assert!(out.contains("SUCCESS"), "{out}");
}
