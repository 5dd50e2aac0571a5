//! The decision history: every decision appended as one JSON line to a file (when configured),
//! read back at start, so `cogmesh scaling history` lists decisions from before a restart.
//! Lines that do not parse (a torn last write) are skipped with a warning.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use serde::{Deserialize, Serialize};
use tracing::warn;

/// One decision as stored and listed.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
pub struct Record {
    pub service: String,
    pub from: u32,
    pub to: u32,
    pub metric: String,
    pub observed: f64,
    pub target: f64,
    pub reason: String,
    pub unix_ms: u64,
    pub policy_version: u64,
}

/// The most decisions kept in memory; the file keeps them all.
pub const MEMORY_LIMIT: usize = 10_000;

pub struct History {
    file: Option<PathBuf>,
    records: Mutex<Vec<Record>>,
}

impl History {
    /// Opens the history at `file` (created on the first decision), or in memory only.
    pub fn open(file: Option<&Path>) -> Self {
        let mut records = Vec::new();
        if let Some(path) = file {
            match std::fs::read_to_string(path) {
                Ok(text) => {
                    if !text.is_empty() && !text.ends_with('\n') {
                        // Close a torn last line so the next record starts on its own line.
                        let closed = std::fs::OpenOptions::new()
                            .append(true)
                            .open(path)
                            .and_then(|mut f| f.write_all(b"\n"));
                        if let Err(e) = closed {
                            warn!(file = %path.display(), "cannot repair the scaling history: {e}");
                        }
                    }
                    for (i, line) in text.lines().enumerate().filter(|(_, l)| !l.trim().is_empty()) {
                        match serde_json::from_str::<Record>(line) {
                            Ok(r) => records.push(r),
                            Err(e) => {
                                warn!(file = %path.display(), line = i + 1, "skipping a history line: {e}")
                            }
                        }
                    }
                }
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => warn!(file = %path.display(), "cannot read the scaling history: {e}"),
            }
        }
        let excess = records.len().saturating_sub(MEMORY_LIMIT);
        records.drain(..excess);
        History {
            file: file.map(Path::to_path_buf),
            records: Mutex::new(records),
        }
    }

    /// Appends a decision; a failed write is logged and the decision kept in memory.
    pub fn append(&self, record: Record) {
        if let Some(path) = &self.file {
            let written = (|| -> std::io::Result<()> {
                if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
                    std::fs::create_dir_all(dir)?;
                }
                let mut f = std::fs::OpenOptions::new().create(true).append(true).open(path)?;
                let mut line = serde_json::to_string(&record).map_err(std::io::Error::other)?;
                line.push('\n');
                f.write_all(line.as_bytes())
            })();
            if let Err(e) = written {
                warn!(file = %path.display(), "cannot append to the scaling history: {e}");
            }
        }
        let mut records = self.records.lock().unwrap_or_else(|p| p.into_inner());
        records.push(record);
        if records.len() > MEMORY_LIMIT {
            records.remove(0);
        }
    }

    /// Decisions, oldest first, optionally for one service.
    pub fn list(&self, service: Option<&str>) -> Vec<Record> {
        let records = self.records.lock().unwrap_or_else(|p| p.into_inner());
        records
            .iter()
            .filter(|r| service.is_none_or(|s| r.service == s))
            .cloned()
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(service: &str, to: u32) -> Record {
        Record {
            service: service.into(),
            from: 1,
            to,
            metric: "cognitive_load".into(),
            observed: 0.9,
            target: 0.7,
            reason: "test".into(),
            unix_ms: 1_700_000_000_000,
            policy_version: 0,
        }
    }

    #[test]
    fn decisions_survive_a_reopen_and_torn_lines_are_skipped() {
        let dir = std::env::temp_dir().join(format!("cogmesh-history-{}", std::process::id()));
        let path = dir.join("scaling.jsonl");
        let _ = std::fs::remove_dir_all(&dir);
        let h = History::open(Some(&path));
        h.append(record("reasoning", 2));
        h.append(record("memory", 3));
        // A write cut short by a crash.
        std::fs::OpenOptions::new()
            .append(true)
            .open(&path)
            .unwrap()
            .write_all(b"{\"service\":\"reas")
            .unwrap();
        let again = History::open(Some(&path));
        assert_eq!(
            again.list(None),
            vec![record("reasoning", 2), record("memory", 3)]
        );
        assert_eq!(again.list(Some("memory")), vec![record("memory", 3)]);
        // The next decision lands on a line of its own.
        again.append(record("reasoning", 4));
        let third = History::open(Some(&path));
        assert_eq!(
            third.list(Some("reasoning")),
            vec![record("reasoning", 2), record("reasoning", 4)]
        );
        let _ = std::fs::remove_dir_all(&dir);
    }
}
