//! Metrics, logs and the access log as an operator sees them, with real tools: `promtool check
//! metrics` on every component's `/metrics`, a real Prometheus (Debian's `prometheus`) scraping a
//! sidecar, the run-time log level of the admin server, and the access log file.

use std::process::Command;
use std::time::Duration;

use cogmesh_e2e::{
    documented_metrics, eventually, free_addr, http_get, metric_families, metric_value, run_with_timeout,
    start_control, start_workload, wait_tcp, Proc, Proxy,
};

/// `promtool check metrics` over `text` (fed on stdin): its exit code and findings.
fn promtool_check_metrics(text: &str) -> (Option<i32>, String) {
    let path = std::env::temp_dir().join(format!(
        "cogmesh-metrics-{}-{}.txt",
        std::process::id(),
        free_addr().port()
    ));
    std::fs::write(&path, text).unwrap();
    let (code, out, err) = run_with_timeout(
        Command::new("sh")
            .arg("-c")
            .arg(format!("promtool check metrics < {}", path.display())),
        Duration::from_secs(60),
    );
    let _ = std::fs::remove_file(&path);
    (code, format!("{out}{err}"))
}

fn get(addr: std::net::SocketAddr, path: &str) -> (u16, String) {
    http_get(addr, path).expect("GET")
}

/// PUT `body` to the admin server: status and body.
fn put(addr: std::net::SocketAddr, path: &str, body: &str) -> (u16, String) {
    let (code, out, _) = run_with_timeout(
        Command::new("curl").args([
            "-s",
            "-X",
            "PUT",
            "--data-binary",
            body,
            "-w",
            "\n%{http_code}",
            &format!("http://{addr}{path}"),
        ]),
        Duration::from_secs(20),
    );
    assert_eq!(code, Some(0), "curl failed");
    let (text, status) = out.rsplit_once('\n').unwrap();
    (status.trim().parse().unwrap(), text.to_string())
}

#[test]
fn promtool_finds_every_components_metrics_clean() {
    let app = start_workload("metrics-app");
    let admin = free_addr();
    let control = start_control(&["--admin-listen", &admin.to_string()]);
    eventually(
        "the control plane's admin server",
        Duration::from_secs(20),
        || std::net::TcpStream::connect(admin).ok(),
    );
    let log = std::env::temp_dir().join(format!(
        "cogmesh-access-{}-{}.log",
        std::process::id(),
        admin.port()
    ));
    let proxy = Proxy::quick(
        &[app.addr],
        &[
            "--control",
            &control.addr.to_string(),
            "--service",
            "metrics-app",
            "--access-log",
            log.to_str().unwrap(),
        ],
    );
    // Traffic, an error and a sidecar on the control plane fill the families.
    for path in ["/", "/status/503", "/bytes?n=100"] {
        let _ = http_get(proxy.listen, path);
    }
    let proxy_metrics = proxy.metrics();
    for family in [
        "request_total",
        "response_latency_seconds_bucket",
        "tcp_accepted_connections_total",
        "tcp_read_bytes_total",
        "tcp_write_bytes_total",
        "access_log_line_total",
        "trace_span_total",
    ] {
        assert!(
            proxy_metrics.contains(family),
            "{family} missing:\n{proxy_metrics}"
        );
    }
    let documented = documented_metrics();
    let undocumented = |text: &str| -> Vec<String> {
        metric_families(text)
            .into_iter()
            .filter(|f| !documented.contains(f))
            .collect()
    };
    assert_eq!(
        undocumented(&proxy_metrics),
        Vec::<String>::new(),
        "missing from docs/metrics.md"
    );
    let (code, out) = promtool_check_metrics(&proxy_metrics);
    assert_eq!(code, Some(0), "proxy /metrics: {out}");
    assert_eq!(out.trim(), "", "promtool findings on the proxy's /metrics");

    let control_metrics = eventually("the sidecar ACKs a table", Duration::from_secs(20), || {
        let (_, body) = get(admin, "/metrics");
        (metric_value(&body, "table_answer_total{result=\"ack\"}").unwrap_or(0.0) >= 1.0).then_some(body)
    });
    assert!(metric_value(&control_metrics, "table_push_total").unwrap() >= 1.0);
    assert!(metric_value(&control_metrics, "table_ack_seconds_count").unwrap() >= 1.0);
    assert!(control_metrics.contains("sidecar_sync_lag_versions"));
    assert_eq!(
        undocumented(&control_metrics),
        Vec::<String>::new(),
        "missing from docs/metrics.md"
    );
    let (code, out) = promtool_check_metrics(&control_metrics);
    assert_eq!(code, Some(0), "control plane /metrics: {out}");
    assert_eq!(
        out.trim(),
        "",
        "promtool findings on the control plane's /metrics"
    );
    let _ = std::fs::remove_file(log);
}

#[test]
fn a_real_prometheus_scrapes_the_sidecar_and_answers_for_its_request_count() {
    let app = start_workload("scraped");
    let proxy = Proxy::quick(&[app.addr], &["--upstream-service", "scraped"]);
    const REQUESTS: usize = 7;
    for _ in 0..REQUESTS {
        assert_eq!(get(proxy.listen, "/").0, 200);
    }
    let dir = std::env::temp_dir().join(format!(
        "cogmesh-prometheus-{}-{}",
        std::process::id(),
        proxy.admin.port()
    ));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let config = dir.join("prometheus.yml");
    std::fs::write(
        &config,
        format!(
            "global: {{ scrape_interval: 1s, evaluation_interval: 1s }}\n\
             scrape_configs:\n  - job_name: cogmesh-proxy\n    static_configs:\n      - targets: ['{}']\n",
            proxy.admin
        ),
    )
    .unwrap();
    let web = free_addr();
    let mut prometheus = Proc::spawn(
        "prometheus",
        Command::new("prometheus")
            .arg(format!("--config.file={}", config.display()))
            .arg(format!("--storage.tsdb.path={}", dir.join("data").display()))
            .arg(format!("--web.listen-address={web}"))
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null()),
    );
    wait_tcp(web, &mut prometheus);
    let query = "/api/v1/query?query=sum(request_total%7Bservice%3D%22scraped%22%7D)";
    let answer = eventually(
        "Prometheus has the request count",
        Duration::from_secs(30),
        || {
            let (status, body) = http_get(web, query).ok()?;
            let v: serde_json::Value = serde_json::from_str(&body).ok()?;
            let value = v["data"]["result"][0]["value"][1].as_str()?.to_owned();
            (status == 200 && value != "0").then_some(value)
        },
    );
    assert_eq!(answer, REQUESTS.to_string());
    drop(prometheus);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn the_log_level_changes_at_run_time_and_the_access_log_has_a_line_per_request() {
    let app = start_workload("logged");
    let log = std::env::temp_dir().join(format!(
        "cogmesh-access-{}-{}.jsonl",
        std::process::id(),
        app.addr.port()
    ));
    let _ = std::fs::remove_file(&log);
    let dead = free_addr();
    let proxy = Proxy::with_config(&format!(
        r#"
admin: "{{admin}}"
admin_mutations: true
workers: 1
listeners:
  - {{ name: edge, address: "{{listen}}", direction: outbound, default_service: app }}
services:
  - {{ name: app, endpoints: ["{app}"] }}
  - {{ name: gone, endpoints: ["{dead}"] }}
routes:
  - {{ name: to-gone, match: {{ path_prefix: /gone }}, service: gone }}
access_log: {{ path: "{log}", format: json }}
"#,
        app = app.addr,
        log = log.display()
    ));
    // Off unless enabled: a sidecar without `admin_mutations` refuses the change.
    let default = Proxy::quick(&[app.addr], &[]);
    assert_eq!(put(default.admin, "/log-level", "debug").0, 403);
    drop(default);
    // The level: the starting filter, then changed and shown; a bad one refused.
    assert_eq!(get(proxy.admin, "/log-level"), (200, "warn\n".into()));
    assert_eq!(put(proxy.admin, "/log-level", "debug").0, 200);
    assert_eq!(get(proxy.admin, "/log-level"), (200, "debug\n".into()));
    let (status, body) = put(proxy.admin, "/log-level", "cogmesh=notalevel");
    assert_eq!(status, 400, "{body}");
    assert!(body.contains("invalid log filter"), "{body}");
    assert_eq!(get(proxy.admin, "/log-level").1, "debug\n");

    assert_eq!(get(proxy.listen, "/bytes?n=10").0, 200);
    assert_eq!(get(proxy.listen, "/gone/x").0, 502);
    let lines: Vec<serde_json::Value> = eventually("two access log lines", Duration::from_secs(10), || {
        let text = std::fs::read_to_string(&log).ok()?;
        let lines: Vec<_> = text
            .lines()
            .filter_map(|l| serde_json::from_str(l).ok())
            .collect();
        (lines.len() >= 2).then_some(lines)
    });
    assert_eq!(lines.len(), 2);
    let (ok, failed) = (&lines[0], &lines[1]);
    assert_eq!(ok["status"], 200);
    assert_eq!(ok["method"], "GET");
    assert_eq!(ok["path"], "/bytes");
    assert_eq!(ok["service"], "app");
    assert_eq!(ok["route"], serde_json::Value::Null);
    assert_eq!(ok["listener"], "edge");
    assert_eq!(ok["error"], serde_json::Value::Null);
    assert_eq!(failed["status"], 502);
    assert_eq!(failed["service"], "gone");
    assert_eq!(failed["route"], "to-gone");
    assert_eq!(failed["error"], "upstream_connect");
    assert!(failed["start_time"].as_str().unwrap().ends_with('Z'));
    assert_eq!(
        metric_value(&proxy.metrics(), "access_log_line_total{result=\"written\"}"),
        Some(2.0)
    );
    let _ = std::fs::remove_file(log);
}
