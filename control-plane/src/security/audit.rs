//! The audit log: one JSON line per change made (or refused) through the control plane's API.
//!
//! The file is opened for appending only and never rewritten; each record is written with one
//! `write` call and flushed before the change is acknowledged, so what the caller was told
//! happened is on disk. Every record also goes to the process log (target `audit`).
//!
//! A record says who (`caller`, `role`), what (`method`, `target`), when (`time`, RFC 3339 UTC),
//! the outcome (`result`: `allowed`, `denied`, `rate_limited`, `failed`; `reason`) and, for
//! changes that were made, the state `before` and `after`.
//!
//! Records are written synchronously from the handler: a few hundred bytes per change or refusal
//! on the operators' API, never on the sidecars' data path.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use serde::Serialize;

/// One line of the audit log.
#[derive(Debug, Serialize)]
pub struct Record<'a> {
    pub time: String,
    pub caller: &'a str,
    pub role: &'a str,
    /// The gRPC method, `package.Service/Method`.
    pub method: &'a str,
    /// What the change is about (a service name), when known.
    #[serde(skip_serializing_if = "str::is_empty")]
    pub target: &'a str,
    pub result: Outcome,
    #[serde(skip_serializing_if = "str::is_empty")]
    pub reason: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub before: Option<serde_json::Value>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub after: Option<serde_json::Value>,
}

#[derive(Clone, Copy, Debug, Serialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum Outcome {
    Allowed,
    Denied,
    RateLimited,
    /// Allowed, but the change itself was invalid (nothing changed).
    Failed,
}

/// Where audit records go.
pub struct AuditLog {
    path: Option<PathBuf>,
    file: Mutex<Option<std::fs::File>>,
}

impl AuditLog {
    /// Opens (creating) `path` for appending; `None`: records go to the process log only.
    pub fn open(path: Option<&Path>) -> std::io::Result<Self> {
        let file = match path {
            Some(p) => {
                if let Some(dir) = p.parent().filter(|d| !d.as_os_str().is_empty()) {
                    std::fs::create_dir_all(dir)?;
                }
                Some(std::fs::OpenOptions::new().append(true).create(true).open(p)?)
            }
            None => None,
        };
        Ok(AuditLog {
            path: path.map(Path::to_path_buf),
            file: Mutex::new(file),
        })
    }

    /// The file records are appended to, if any.
    pub fn path(&self) -> Option<&Path> {
        self.path.as_deref()
    }

    /// Appends `record`. A write failure is logged (the change itself has been made or refused
    /// already; refusing to serve because the disk is full would lock operators out).
    pub fn write(&self, record: &Record<'_>) {
        let mut line = serde_json::to_vec(record).expect("audit records serialize");
        line.push(b'\n');
        tracing::info!(
            target: "audit",
            caller = record.caller,
            role = record.role,
            method = record.method,
            target_name = record.target,
            result = ?record.result,
            reason = record.reason,
            "audit"
        );
        let mut file = self.file.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(f) = file.as_mut() {
            if let Err(e) = f.write_all(&line).and_then(|()| f.flush()) {
                tracing::error!(path = ?self.path, "cannot append to the audit log: {e}");
            }
        }
    }
}

/// Now, as RFC 3339 UTC with milliseconds.
pub fn now_rfc3339() -> String {
    let now = time::OffsetDateTime::now_utc();
    let now = now
        .replace_nanosecond(now.millisecond() as u32 * 1_000_000)
        .unwrap_or(now);
    now.format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_are_appended_as_json_lines() {
        let path = std::env::temp_dir().join(format!("cogmesh-audit-{}.jsonl", std::process::id()));
        let _ = std::fs::remove_file(&path);
        std::fs::write(&path, "{\"earlier\":true}\n").unwrap();
        let log = AuditLog::open(Some(&path)).unwrap();
        for result in [Outcome::Denied, Outcome::Allowed] {
            log.write(&Record {
                time: now_rfc3339(),
                caller: "alice",
                role: "viewer",
                method: "cogmesh.v1.MeshAdmin/SetScalingPolicy",
                target: "reasoning",
                result,
                reason: "",
                before: None,
                after: Some(serde_json::json!({"max_replicas": 3})),
            });
        }
        let text = std::fs::read_to_string(&path).unwrap();
        let lines: Vec<serde_json::Value> = text.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
        assert_eq!(lines.len(), 3, "{text}");
        assert_eq!(lines[0]["earlier"], true);
        assert_eq!(lines[1]["result"], "denied");
        assert_eq!(lines[2]["after"]["max_replicas"], 3);
        assert!(lines[1].get("reason").is_none());
        assert!(lines[1]["time"].as_str().unwrap().ends_with('Z'));
        let _ = std::fs::remove_file(&path);
    }
}
