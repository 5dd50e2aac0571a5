//! The access log (`access_log:` in proxy.yaml, off by default): one line per request, written
//! when its response headers go out, in a template of `{field}`s or as JSON.
//!
//! The request path formats the line and hands it to a bounded queue; a writer thread owns the
//! file (or stdout/stderr), buffers, and flushes whenever the queue runs dry. A full queue drops
//! the line and counts it (`access_log_line_total{result="dropped"}`): logging never blocks a
//! request. With the log off the request path pays one `None` check.

use std::fmt::Write as _;
use std::io::Write as _;
use std::net::IpAddr;
use std::sync::mpsc::{self, Receiver, SyncSender, TrySendError};
use std::time::{Duration, SystemTime};

use prometheus_client::metrics::counter::Counter;
use serde::{Deserialize, Serialize};

use crate::config::ConfigError;

/// The default line: the time, the request line, status, milliseconds, where it went and why
/// it failed (`-` when it did not).
pub const DEFAULT_FORMAT: &str = r#"{start_time} {client_ip} "{method} {path} {protocol}" {status} {duration_ms} {direction} {service} {route} {error} {trace_id}"#;
/// Lines waiting for the writer; more are dropped.
pub const MAX_PENDING_LINES: usize = 8192;

/// `access_log:` in proxy.yaml. Changing it needs a restart.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct AccessLogConfig {
    /// `stdout`, `stderr` or a file path (appended to).
    #[serde(default = "default_path")]
    pub path: String,
    /// A template of `{field}`s (see [`FIELDS`]), or `json` for one JSON object per line.
    #[serde(default = "default_format")]
    pub format: String,
}

fn default_path() -> String {
    "stdout".into()
}
fn default_format() -> String {
    DEFAULT_FORMAT.into()
}

/// The fields a template may name.
pub const FIELDS: [&str; 12] = [
    "start_time",
    "client_ip",
    "method",
    "path",
    "protocol",
    "status",
    "duration_ms",
    "direction",
    "listener",
    "service",
    "route",
    "error",
];
/// The trace id of the request, `-` with tracing off.
const TRACE_FIELD: &str = "trace_id";

impl AccessLogConfig {
    pub fn validate(&self, file: &str) -> Result<(), ConfigError> {
        if self.path.is_empty() {
            return Err(ConfigError::new(file, "access_log.path", "must not be empty"));
        }
        if self.format != "json" {
            parse_template(&self.format)
                .map_err(|reason| ConfigError::new(file, "access_log.format", reason))?;
        }
        Ok(())
    }
}

/// A template part: literal text or a field index (`FIELDS.len()` is the trace id).
#[derive(Clone, Debug, PartialEq)]
enum Part {
    Text(String),
    Field(usize),
}

fn parse_template(template: &str) -> Result<Vec<Part>, String> {
    let mut parts = Vec::new();
    let mut rest = template;
    while let Some(open) = rest.find('{') {
        if open > 0 {
            parts.push(Part::Text(rest[..open].to_owned()));
        }
        let Some(close) = rest[open..].find('}') else {
            return Err(format!("unclosed '{{' in {template:?}"));
        };
        let name = &rest[open + 1..open + close];
        let index = if name == TRACE_FIELD {
            FIELDS.len()
        } else {
            FIELDS.iter().position(|f| *f == name).ok_or_else(|| {
                format!(
                    "unknown field {{{name}}} (known: {}, {TRACE_FIELD})",
                    FIELDS.join(", ")
                )
            })?
        };
        parts.push(Part::Field(index));
        rest = &rest[open + close + 1..];
    }
    if !rest.is_empty() {
        parts.push(Part::Text(rest.to_owned()));
    }
    Ok(parts)
}

/// What the access log knows of a finished request.
pub struct Entry<'a> {
    pub start: SystemTime,
    pub client_ip: IpAddr,
    pub method: &'a str,
    pub path: &'a str,
    pub protocol: &'static str,
    pub status: u16,
    pub duration: Duration,
    pub direction: &'static str,
    pub listener: &'a str,
    pub service: Option<&'a str>,
    pub route: Option<&'a str>,
    pub error: Option<&'static str>,
    pub trace_id: Option<String>,
}

impl Entry<'_> {
    fn field(&self, index: usize, out: &mut String) {
        let opt = |out: &mut String, v: Option<&str>| out.push_str(v.unwrap_or("-"));
        match index {
            0 => rfc3339(self.start, out),
            1 => {
                let _ = write!(out, "{}", self.client_ip);
            }
            2 => out.push_str(self.method),
            3 => out.push_str(self.path),
            4 => out.push_str(self.protocol),
            5 => {
                let _ = write!(out, "{}", self.status);
            }
            6 => {
                let _ = write!(out, "{:.3}", self.duration.as_secs_f64() * 1000.0);
            }
            7 => out.push_str(self.direction),
            8 => out.push_str(self.listener),
            9 => opt(out, self.service),
            10 => opt(out, self.route),
            11 => opt(out, self.error),
            _ => opt(out, self.trace_id.as_deref()),
        }
    }

    fn json(&self) -> String {
        let mut start = String::new();
        rfc3339(self.start, &mut start);
        let value = serde_json::json!({
            "start_time": start,
            "client_ip": self.client_ip.to_string(),
            "method": self.method,
            "path": self.path,
            "protocol": self.protocol,
            "status": self.status,
            "duration_ms": (self.duration.as_secs_f64() * 1e6).round() / 1e3,
            "direction": self.direction,
            "listener": self.listener,
            "service": self.service,
            "route": self.route,
            "error": self.error,
            "trace_id": self.trace_id,
        });
        value.to_string()
    }
}

/// `YYYY-MM-DDTHH:MM:SS.mmmZ` (UTC).
fn rfc3339(t: SystemTime, out: &mut String) {
    match jiff::Timestamp::try_from(t) {
        Ok(ts) => {
            let _ = write!(out, "{ts:.3}");
        }
        Err(_) => out.push('-'),
    }
}

/// Formats entries and queues them for the writer thread.
#[derive(Debug)]
pub struct AccessLog {
    template: Option<Vec<Part>>,
    queue: SyncSender<String>,
    written: Counter,
    dropped: Counter,
}

impl AccessLog {
    /// Opens the destination and starts the writer thread.
    pub fn start(config: &AccessLogConfig, written: Counter, dropped: Counter) -> std::io::Result<Self> {
        let out: Box<dyn std::io::Write + Send> = match config.path.as_str() {
            "stdout" => Box::new(std::io::stdout()),
            "stderr" => Box::new(std::io::stderr()),
            path => Box::new(std::fs::OpenOptions::new().create(true).append(true).open(path)?),
        };
        let (queue, lines) = mpsc::sync_channel(MAX_PENDING_LINES);
        std::thread::Builder::new()
            .name("cogmesh-access-log".into())
            .spawn(move || write_lines(lines, out))?;
        let template = (config.format != "json")
            .then(|| parse_template(&config.format).expect("validated with the configuration"));
        Ok(AccessLog {
            template,
            queue,
            written,
            dropped,
        })
    }

    pub fn record(&self, entry: &Entry<'_>) {
        let line = match &self.template {
            None => entry.json(),
            Some(parts) => {
                let mut line = String::with_capacity(160);
                for part in parts {
                    match part {
                        Part::Text(t) => line.push_str(t),
                        Part::Field(i) => entry.field(*i, &mut line),
                    }
                }
                line
            }
        };
        match self.queue.try_send(line) {
            Ok(()) => self.written.inc(),
            Err(TrySendError::Full(_) | TrySendError::Disconnected(_)) => self.dropped.inc(),
        };
    }
}

fn write_lines(lines: Receiver<String>, out: Box<dyn std::io::Write + Send>) {
    let mut out = std::io::BufWriter::with_capacity(64 * 1024, out);
    while let Ok(line) = lines.recv() {
        let _ = writeln!(out, "{line}");
        while let Ok(line) = lines.try_recv() {
            let _ = writeln!(out, "{line}");
        }
        let _ = out.flush();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::UNIX_EPOCH;

    fn entry() -> Entry<'static> {
        Entry {
            start: UNIX_EPOCH + Duration::from_millis(1_764_167_400_123),
            client_ip: "127.0.0.1".parse().unwrap(),
            method: "GET",
            path: "/work",
            protocol: "HTTP/1.1",
            status: 503,
            duration: Duration::from_micros(1500),
            direction: "outbound",
            listener: "outbound",
            service: Some("web"),
            route: None,
            error: Some("no_endpoints"),
            trace_id: None,
        }
    }

    #[test]
    fn templates_fill_fields() {
        let parts = parse_template(DEFAULT_FORMAT).unwrap();
        let mut line = String::new();
        for p in &parts {
            match p {
                Part::Text(t) => line.push_str(t),
                Part::Field(i) => entry().field(*i, &mut line),
            }
        }
        assert_eq!(
            line,
            r#"2025-11-26T14:30:00.123Z 127.0.0.1 "GET /work HTTP/1.1" 503 1.500 outbound web - no_endpoints -"#
        );
        assert!(parse_template("{nope}")
            .unwrap_err()
            .contains("unknown field {nope}"));
        assert!(parse_template("{status").is_err());
    }

    #[test]
    fn json_lines_carry_every_field() {
        let v: serde_json::Value = serde_json::from_str(&entry().json()).unwrap();
        assert_eq!(v["status"], 503);
        assert_eq!(v["duration_ms"], 1.5);
        assert_eq!(v["route"], serde_json::Value::Null);
        assert_eq!(v["start_time"], "2025-11-26T14:30:00.123Z");
    }
}
