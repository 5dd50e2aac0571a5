//! Load generators and what they report.
//!
//! Owns: the command lines and the parsing of their output.
//! - open loop (latency at a fixed rate): `oha -q RATE --latency-correction -z D`, JSON output; with
//!   `--latency-correction` a request's latency counts from when it was scheduled, so a stalled
//!   proxy is not hidden by the client waiting for it (coordinated omission).
//! - closed loop (maximum throughput): `wrk -t T -c C -d D` for HTTP/1.1, with a Lua `done` hook
//!   that prints its summary as one JSON line; `h2load -c C -t T -D D` for h2c.
//!
//! Every run has a hard time limit (its duration plus a margin) and is killed past it.

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use serde::Serialize;
use serde_json::Value;

use crate::peers::Proto;
use crate::procs;

/// Extra time a load generator gets past its own duration before it is killed.
const MARGIN: Duration = Duration::from_secs(20);

#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct Latency {
    pub p50_us: f64,
    pub p99_us: f64,
    pub p999_us: f64,
    pub rps: f64,
    /// Responses with status 200.
    pub ok: u64,
    /// Other statuses and errors (requests cut off by the end of the run are not counted).
    pub failed: u64,
    pub failures: String,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct Throughput {
    pub requests: u64,
    pub secs: f64,
    pub rps: f64,
    /// Non-2xx/3xx responses, socket errors and timeouts.
    pub errors: u64,
}

pub struct Oha<'a> {
    pub bin: &'a Path,
    /// Connections (and for h2c, one stream each).
    pub connections: usize,
    /// Runtime threads of the client; 0 leaves oha's default.
    pub threads: usize,
}

impl Oha<'_> {
    /// Open-loop run at `rate` requests per second for `duration`.
    pub fn open_loop(
        &self,
        url: &str,
        proto: Proto,
        rate: u32,
        duration: Duration,
        work_dir: &Path,
    ) -> Result<Latency> {
        self.run(url, proto, Some(rate), duration, &[], work_dir)
    }

    /// [`Oha::open_loop`] with request headers (`name: value`, as oha's `-H`).
    pub fn open_loop_with_headers(
        &self,
        url: &str,
        proto: Proto,
        rate: u32,
        duration: Duration,
        work_dir: &Path,
        headers: &[&str],
    ) -> Result<Latency> {
        self.run(url, proto, Some(rate), duration, headers, work_dir)
    }

    /// Closed-loop run (each connection sends its next request when the last one is answered)
    /// for `duration`, with extra request `headers` (`"name: value"`): throughput and latency.
    pub fn closed_loop(
        &self,
        url: &str,
        proto: Proto,
        duration: Duration,
        headers: &[&str],
        work_dir: &Path,
    ) -> Result<Latency> {
        self.run(url, proto, None, duration, headers, work_dir)
    }

    fn run(
        &self,
        url: &str,
        proto: Proto,
        rate: Option<u32>,
        duration: Duration,
        headers: &[&str],
        work_dir: &Path,
    ) -> Result<Latency> {
        let mut command = Command::new(self.bin);
        command
            .arg("--no-tui")
            .args(["--output-format", "json"])
            .args(["-z", &format!("{}ms", duration.as_millis())]);
        if let Some(rate) = rate {
            command
                .args(["-q", &rate.to_string()])
                .arg("--latency-correction");
        }
        command.args(["-c", &self.connections.to_string()]);
        for header in headers {
            command.args(["-H", header]);
        }
        if self.threads > 0 {
            command.args(["--worker-threads", &self.threads.to_string()]);
        }
        if proto == Proto::H2c {
            command.arg("--http2");
        }
        command.arg(url);
        let out = work_dir.join("oha.json");
        let (_, stdout) = procs::run_bounded(&mut command, duration + MARGIN, &out)?;
        parse_oha_json(&stdout)
    }
}

/// Reads oha's `--output-format json` report: latency percentiles (seconds), status codes, errors.
pub fn parse_oha_json(text: &str) -> Result<Latency> {
    let json: Value = serde_json::from_str(text.trim())
        .with_context(|| format!("oha output is not JSON: {:.200}", text.trim()))?;
    let percentiles = json
        .get("latencyPercentiles")
        .context("no latencyPercentiles in oha output")?;
    let mut ok = 0;
    let mut failed = 0;
    let mut failures = Vec::new();
    if let Some(codes) = json.get("statusCodeDistribution").and_then(Value::as_object) {
        for (code, count) in codes {
            let count = count.as_u64().unwrap_or(0);
            if code == "200" {
                ok += count;
            } else {
                failed += count;
                failures.push(format!("status {code} x{count}"));
            }
        }
    }
    if let Some(errors) = json.get("errorDistribution").and_then(Value::as_object) {
        for (error, count) in errors {
            // Requests still in flight when the run ends are cut off, not failed.
            if error.contains("deadline") {
                continue;
            }
            let count = count.as_u64().unwrap_or(0);
            failed += count;
            failures.push(format!("{error} x{count}"));
        }
    }
    let failures = failures.join(", ");
    let micros = |key: &str| -> Result<f64> {
        percentiles
            .get(key)
            .and_then(Value::as_f64)
            .map(|secs| secs * 1e6)
            .with_context(|| format!("no {key} latency from oha: {ok} ok, failures: {failures}"))
    };
    Ok(Latency {
        p50_us: micros("p50")?,
        p99_us: micros("p99")?,
        p999_us: micros("p99.9")?,
        rps: json
            .pointer("/summary/requestsPerSec")
            .and_then(Value::as_f64)
            .unwrap_or(0.0),
        ok,
        failed,
        failures,
    })
}

/// wrk's `done` hook: one line, `BENCH-JSON {...}`, with the summary and the error counters.
pub const WRK_REPORT_LUA: &str = r#"-- Written by cogmesh-bench: print wrk's summary as one JSON line.
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    "BENCH-JSON {\"requests\":%d,\"duration_us\":%d,\"connect\":%d,\"read\":%d,\"write\":%d,\"status\":%d,\"timeout\":%d}\n",
    summary.requests, summary.duration, e.connect, e.read, e.write, e.status, e.timeout))
end
"#;

pub struct ClosedLoop<'a> {
    pub wrk: &'a Path,
    pub h2load: Option<&'a Path>,
    pub connections: usize,
    pub threads: usize,
}

impl ClosedLoop<'_> {
    pub fn run(&self, url: &str, proto: Proto, duration: Duration, work_dir: &Path) -> Result<Throughput> {
        let secs = duration.as_secs_f64().ceil().max(1.0) as u64;
        match proto {
            Proto::H1 => {
                let script = work_dir.join("wrk-report.lua");
                if !script.exists() {
                    std::fs::write(&script, WRK_REPORT_LUA)?;
                }
                let mut command = Command::new(self.wrk);
                command
                    .args(["-t", &self.threads.to_string()])
                    .args(["-c", &self.connections.to_string()])
                    .args(["-d", &format!("{secs}s")])
                    .args(["--timeout", "5s"])
                    .arg("-s")
                    .arg(&script)
                    .arg(url);
                let out = work_dir.join("wrk.out");
                let (_, stdout) = procs::run_bounded(&mut command, duration + MARGIN, &out)?;
                parse_wrk_output(&stdout)
            }
            Proto::H2c => {
                let h2load = self.h2load.context("h2load is not installed")?;
                let mut command = Command::new(h2load);
                command
                    .args(["-t", &self.threads.to_string()])
                    .args(["-c", &self.connections.to_string()])
                    .args(["-m", "1"])
                    .args(["-D", &secs.to_string()])
                    .arg(url);
                let out = work_dir.join("h2load.out");
                let (_, stdout) = procs::run_bounded(&mut command, duration + MARGIN, &out)?;
                parse_h2load_output(&stdout)
            }
        }
    }
}

pub fn parse_wrk_output(text: &str) -> Result<Throughput> {
    let line = text
        .lines()
        .find_map(|line| line.strip_prefix("BENCH-JSON "))
        .with_context(|| format!("no BENCH-JSON line in wrk output: {:.300}", text))?;
    let json: Value = serde_json::from_str(line)?;
    let field = |key: &str| json.get(key).and_then(Value::as_u64).unwrap_or(0);
    let requests = field("requests");
    let secs = field("duration_us") as f64 / 1e6;
    if secs <= 0.0 {
        bail!("wrk reported no duration: {line}");
    }
    Ok(Throughput {
        requests,
        secs,
        rps: requests as f64 / secs,
        errors: ["connect", "read", "write", "status", "timeout"]
            .iter()
            .map(|key| field(key))
            .sum(),
    })
}

/// From h2load's summary: `finished in 5.00s, 41234.20 req/s, ...` and
/// `requests: N total, N started, N done, N succeeded, N failed, N errored, N timeout`.
pub fn parse_h2load_output(text: &str) -> Result<Throughput> {
    let finished = text
        .lines()
        .find_map(|line| line.trim().strip_prefix("finished in "))
        .with_context(|| format!("no 'finished in' line in h2load output: {:.300}", text))?;
    let mut parts = finished.split(',').map(str::trim);
    let secs = parse_h2load_duration(parts.next().unwrap_or_default())?;
    let rps: f64 = parts
        .next()
        .and_then(|part| part.strip_suffix(" req/s"))
        .and_then(|rate| rate.parse().ok())
        .context("no req/s in h2load output")?;
    let counters = |prefix: &str| -> Vec<(String, u64)> {
        text.lines()
            .find_map(|line| line.trim().strip_prefix(prefix))
            .map(|rest| {
                rest.split(',')
                    .filter_map(|item| {
                        let mut words = item.split_whitespace();
                        let count = words.next()?.parse().ok()?;
                        Some((words.next()?.to_string(), count))
                    })
                    .collect()
            })
            .unwrap_or_default()
    };
    let requests = counters("requests:");
    let count = |list: &[(String, u64)], name: &str| {
        list.iter()
            .find(|(key, _)| key == name)
            .map_or(0, |(_, count)| *count)
    };
    // "failed" counts error statuses as well as socket errors ("errored") and timeouts.
    Ok(Throughput {
        requests: count(&requests, "succeeded"),
        secs,
        rps,
        errors: count(&requests, "failed"),
    })
}

fn parse_h2load_duration(text: &str) -> Result<f64> {
    let (number, scale) = if let Some(ms) = text.strip_suffix("ms") {
        (ms, 1e-3)
    } else if let Some(us) = text.strip_suffix("us") {
        (us, 1e-6)
    } else if let Some(s) = text.strip_suffix('s') {
        (s, 1.0)
    } else {
        bail!("bad h2load duration {text:?}");
    };
    Ok(number.parse::<f64>()? * scale)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn oha_json_percentiles_and_failures() {
        let text = r#"{"summary":{"successRate":1.0,"total":5.0,"requestsPerSec":999.8},
            "latencyPercentiles":{"p10":0.00003,"p50":0.0000625,"p99":0.00015,"p99.9":0.0004},
            "statusCodeDistribution":{"200":4990,"502":3},
            "errorDistribution":{"aborted due to deadline":7,"connection refused":2}}"#;
        let latency = parse_oha_json(text).unwrap();
        assert!((latency.p50_us - 62.5).abs() < 1e-6);
        assert!((latency.p99_us - 150.0).abs() < 1e-6);
        assert!((latency.p999_us - 400.0).abs() < 1e-6);
        assert_eq!((latency.ok, latency.failed), (4990, 5));
        assert!(latency.failures.contains("502"));
        assert!(!latency.failures.contains("deadline"));
        assert!(parse_oha_json("{\"summary\":{}}").is_err());
        assert!(parse_oha_json("Error: connection refused").is_err());
    }

    #[test]
    fn wrk_report_line() {
        let text = "Running 5s test @ http://127.0.0.1:1/\n  2 threads and 64 connections\n\
            BENCH-JSON {\"requests\":200000,\"duration_us\":5000000,\"connect\":0,\"read\":1,\"write\":0,\"status\":2,\"timeout\":0}\n";
        let result = parse_wrk_output(text).unwrap();
        assert_eq!(result.requests, 200_000);
        assert!((result.rps - 40_000.0).abs() < 1e-6);
        assert_eq!(result.errors, 3);
        assert!(parse_wrk_output("nothing").is_err());
    }

    #[test]
    fn h2load_summary() {
        let text = "starting benchmark...\n\
            finished in 5.00s, 41234.20 req/s, 48.01MB/s\n\
            requests: 206171 total, 206235 started, 206171 done, 206160 succeeded, 11 failed, 0 errored, 0 timeout\n\
            status codes: 206160 2xx, 0 3xx, 0 4xx, 11 5xx\n";
        let result = parse_h2load_output(text).unwrap();
        assert_eq!(result.requests, 206_160);
        assert!((result.secs - 5.0).abs() < 1e-9);
        assert!((result.rps - 41_234.2).abs() < 1e-6);
        assert_eq!(result.errors, 11);
        assert!((parse_h2load_duration("950.5ms").unwrap() - 0.9505).abs() < 1e-9);
    }
}
