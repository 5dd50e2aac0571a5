//! The monitoring files under deploy/ agree with the metrics cogmesh really has: the Grafana
//! dashboard is valid JSON whose every query names only metrics documented in docs/metrics.md,
//! the alerting rules likewise, and the Prometheus scrape config passes `promtool check config`
//! (Debian's `prometheus` package; it also checks the rule files it loads). That every metric a
//! running sidecar and control plane expose is documented is checked in observability.rs.

use std::collections::BTreeSet;
use std::process::Command;
use std::time::Duration;

use cogmesh_e2e::{documented_metrics, repo_root, run_with_timeout};

/// The metric names a PromQL expression reads: identifiers outside label matchers, ranges and
/// strings that are not functions, aggregation clauses or operators.
fn promql_metrics(expr: &str) -> Vec<String> {
    const KEYWORDS: [&str; 6] = ["and", "or", "unless", "bool", "offset", "inf"];
    // Aggregations may put a `by (...)` between their name and their argument.
    const AGGREGATIONS: [&str; 12] = [
        "sum",
        "avg",
        "min",
        "max",
        "count",
        "stddev",
        "stdvar",
        "topk",
        "bottomk",
        "quantile",
        "count_values",
        "group",
    ];
    const CLAUSES: [&str; 6] = ["by", "without", "on", "ignoring", "group_left", "group_right"];
    let chars: Vec<char> = expr.chars().collect();
    let mut names = Vec::new();
    let mut i = 0;
    let skip_to = |from: usize, close: char| -> usize {
        chars[from..]
            .iter()
            .position(|c| *c == close)
            .map_or(chars.len(), |p| from + p + 1)
    };
    while i < chars.len() {
        let c = chars[i];
        match c {
            '{' => i = skip_to(i + 1, '}'),
            '[' => i = skip_to(i + 1, ']'),
            '"' => i = skip_to(i + 1, '"'),
            c if c.is_ascii_digit() || c == '.' => {
                while i < chars.len() && (chars[i].is_ascii_alphanumeric() || chars[i] == '.') {
                    i += 1;
                }
            }
            c if c.is_ascii_alphabetic() || c == '_' || c == ':' => {
                let start = i;
                while i < chars.len()
                    && (chars[i].is_ascii_alphanumeric() || chars[i] == '_' || chars[i] == ':')
                {
                    i += 1;
                }
                let word: String = chars[start..i].iter().collect();
                let mut next = i;
                while next < chars.len() && chars[next] == ' ' {
                    next += 1;
                }
                let call = chars.get(next) == Some(&'(');
                if CLAUSES.contains(&word.as_str()) {
                    if call {
                        i = skip_to(next + 1, ')');
                    }
                } else if !call
                    && !KEYWORDS.contains(&word.to_lowercase().as_str())
                    && !AGGREGATIONS.contains(&word.as_str())
                {
                    names.push(word);
                }
            }
            _ => i += 1,
        }
    }
    names
}

/// `name`, or the histogram it is a series of.
fn family(name: &str, documented: &BTreeSet<String>) -> String {
    for suffix in ["_bucket", "_sum", "_count"] {
        if let Some(base) = name.strip_suffix(suffix) {
            if documented.contains(base) {
                return base.to_owned();
            }
        }
    }
    name.to_owned()
}

#[test]
fn promql_metric_names_are_found() {
    let expr = r#"histogram_quantile(0.99, sum by (service, le) (rate(response_latency_seconds_bucket{direction="outbound"}[2m]))) >= 0.1 and on(service) up == 1"#;
    assert_eq!(promql_metrics(expr), ["response_latency_seconds_bucket", "up"]);
}

#[test]
fn the_grafana_dashboard_queries_only_documented_metrics() {
    let documented = documented_metrics();
    let text = std::fs::read_to_string(repo_root().join("deploy/grafana/cogmesh.json")).unwrap();
    let dashboard: serde_json::Value = serde_json::from_str(&text).expect("the dashboard is valid JSON");
    assert_eq!(dashboard["uid"], "cogmesh-mesh");
    let panels = dashboard["panels"].as_array().expect("panels");
    let mut used = BTreeSet::new();
    let mut queries = 0;
    for panel in panels.iter().filter(|p| p["type"] != "row") {
        let targets = panel["targets"]
            .as_array()
            .unwrap_or_else(|| panel_error(panel, "no targets"));
        assert!(!targets.is_empty(), "{}", panel["title"]);
        for t in targets {
            let expr = t["expr"]
                .as_str()
                .unwrap_or_else(|| panel_error(panel, "a target without expr"));
            let names = promql_metrics(expr);
            assert!(!names.is_empty(), "{}: no metric in {expr}", panel["title"]);
            used.extend(names.iter().map(|n| family(n, &documented)));
            queries += 1;
        }
    }
    let missing: Vec<_> = used.iter().filter(|n| !documented.contains(*n)).collect();
    assert!(
        missing.is_empty(),
        "the dashboard uses undocumented metrics: {missing:?}"
    );
    assert!(queries >= 20, "{queries} queries");
    // The issue's views: traffic, latency, balancer, shedding, control plane, scaling.
    for needed in [
        "request_total",
        "response_latency_seconds",
        "endpoint_load",
        "admission_total",
        "table_answer_total",
        "scaling_replicas",
    ] {
        assert!(used.contains(needed), "the dashboard does not show {needed}");
    }
}

fn panel_error(panel: &serde_json::Value, what: &str) -> ! {
    panic!("panel {}: {what}", panel["title"])
}

#[test]
fn the_alerting_rules_use_only_documented_metrics() {
    let documented = documented_metrics();
    let text = std::fs::read_to_string(repo_root().join("deploy/prometheus/alerts.yaml")).unwrap();
    let exprs: Vec<&str> = text
        .lines()
        .filter_map(|l| l.trim_start().strip_prefix("expr:"))
        .collect();
    assert_eq!(exprs.len(), 8);
    for expr in exprs {
        for name in promql_metrics(expr) {
            let name = family(&name, &documented);
            assert!(
                documented.contains(&name),
                "alerts.yaml uses undocumented {name} in {expr}"
            );
        }
    }
}

#[test]
fn the_scrape_config_passes_promtool() {
    let (code, out, err) = run_with_timeout(
        Command::new("promtool")
            .args(["check", "config", "prometheus.yml"])
            .current_dir(repo_root().join("deploy/prometheus")),
        Duration::from_secs(60),
    );
    assert_eq!(code, Some(0), "{out}{err}");
    assert!(out.contains("SUCCESS: 1 rule files found"), "{out}{err}");
    assert!(!format!("{out}{err}").contains("WARNING"), "{out}{err}");
}
