//! Hot reload of `proxy.yaml`: on a change to the file (inotify, through `notify`) or on SIGHUP,
//! the file is read and validated again. A good file replaces the configuration in force and the
//! routing table is rebuilt and swapped — connections stay up and endpoint statistics carry
//! over. A bad file is refused with file, field and reason: the error is logged, counted in
//! `config_reload_total{result="refused"}` and shown under `last_reload` in `/config`, and the
//! last good configuration stays in force.
//!
//! Listeners, the admin address and the worker count are bound at start; a file that changes
//! them is refused with a reason saying a restart is needed.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use serde::Serialize;
use tracing::{info, warn};

use crate::config::ProxyConfig;
use crate::server::State;

/// Several events arrive for one save (truncate, write, rename): wait this long for quiet.
pub const DEBOUNCE_MS: u64 = 100;

/// Where the configuration came from, and the command-line overrides to apply on top of it.
pub struct ConfigSource {
    pub path: PathBuf,
    pub overrides: Box<dyn Fn(&mut ProxyConfig) + Send + Sync>,
}

#[derive(Clone, Debug, Serialize)]
pub struct ReloadOutcome {
    pub applied: bool,
    /// Unix time in milliseconds.
    pub at_unix_ms: u64,
    /// Why the file was refused.
    pub error: Option<String>,
}

/// Fields that are bound at start and need a restart to change.
fn restart_only_change(old: &ProxyConfig, new: &ProxyConfig) -> Option<String> {
    if old.admin != new.admin {
        return Some(format!(
            "admin: changing it ({} → {}) needs a restart",
            old.admin, new.admin
        ));
    }
    if old.workers != new.workers {
        return Some(format!(
            "workers: changing it ({} → {}) needs a restart",
            old.workers, new.workers
        ));
    }
    let fixed = [
        (
            "connect_timeout_ms",
            old.connect_timeout_ms,
            new.connect_timeout_ms,
        ),
        (
            "header_read_timeout_ms",
            old.header_read_timeout_ms,
            new.header_read_timeout_ms,
        ),
        (
            "pool_idle_timeout_ms",
            old.pool_idle_timeout_ms,
            new.pool_idle_timeout_ms,
        ),
        ("drain_timeout_ms", old.drain_timeout_ms, new.drain_timeout_ms),
        (
            "http2_streams_per_connection",
            old.http2_streams_per_connection,
            new.http2_streams_per_connection,
        ),
    ];
    for (field, a, b) in fixed {
        if a != b {
            return Some(format!("{field}: changing it ({a} → {b}) needs a restart"));
        }
    }
    if old.limits != new.limits {
        return Some("limits: changing them needs a restart".into());
    }
    if old.identity != new.identity {
        return Some("identity: changing it needs a restart".into());
    }
    if old.control != new.control {
        return Some("control: changing it needs a restart".into());
    }
    if old.tls != new.tls {
        return Some("tls: changing the identity files needs a restart (their contents are watched)".into());
    }
    for (i, (a, b)) in old.services.iter().zip(&new.services).enumerate() {
        if a.name == b.name && a.tls != b.tls {
            return Some(format!("services[{i}].tls: changing it needs a restart"));
        }
    }
    if old.tracing != new.tracing {
        return Some("tracing: changing it needs a restart".into());
    }
    if old.access_log != new.access_log {
        return Some("access_log: changing it needs a restart".into());
    }
    // Each worker builds its captures when it starts (see crate::transparent).
    if old.transparent != new.transparent {
        return Some("transparent: changing it needs a restart".into());
    }
    if old.listeners.len() != new.listeners.len() {
        return Some("listeners: adding or removing listeners needs a restart".into());
    }
    for (i, (a, b)) in old.listeners.iter().zip(&new.listeners).enumerate() {
        if a.name != b.name || a.address != b.address || a.direction != b.direction || a.tls != b.tls {
            return Some(format!(
                "listeners[{i}]: changing name, address, direction or tls needs a restart"
            ));
        }
    }
    None
}

/// Reads, validates and applies the file once.
pub fn reload(state: &State, source: &ConfigSource) -> Result<(), String> {
    let file = source.path.display().to_string();
    let mut next = ProxyConfig::from_file(&source.path).map_err(|e| e.to_string())?;
    (source.overrides)(&mut next);
    next.validate(&file).map_err(|e| e.to_string())?;
    let current = state.config.load_full();
    if let Some(reason) = restart_only_change(&current, &next) {
        return Err(format!("{file}: {reason}"));
    }
    if *current == next {
        return Ok(());
    }
    state.config.store(Arc::new(next));
    state.rebuild_table(|_| {});
    Ok(())
}

fn record(state: &State, result: Result<(), String>) {
    let at_unix_ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64);
    let outcome = match result {
        Ok(()) => {
            info!("configuration reloaded");
            state.metrics.config_reloads(true).inc();
            ReloadOutcome {
                applied: true,
                at_unix_ms,
                error: None,
            }
        }
        Err(e) => {
            warn!("configuration refused, keeping the last good one: {e}");
            state.metrics.config_reloads(false).inc();
            ReloadOutcome {
                applied: false,
                at_unix_ms,
                error: Some(e),
            }
        }
    };
    *state.last_reload.lock().unwrap_or_else(|p| p.into_inner()) = Some(outcome);
}

/// Watches the file and SIGHUP until the process ends.
pub async fn watch(state: Arc<State>, source: ConfigSource) {
    use notify::Watcher;
    use tokio::signal::unix::{signal, SignalKind};

    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<()>();
    let name = source.path.file_name().map(|n| n.to_os_string());
    let watched = {
        let tx = tx.clone();
        let name = name.clone();
        notify::recommended_watcher(move |event: notify::Result<notify::Event>| {
            if let Ok(event) = event {
                if event
                    .paths
                    .iter()
                    .any(|p| p.file_name().map(|n| n.to_os_string()) == name)
                {
                    let _ = tx.send(());
                }
            }
        })
    };
    // Watch the directory: editors and config managers replace the file by renaming.
    let dir = source
        .path
        .parent()
        .filter(|d| !d.as_os_str().is_empty())
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("."));
    let _watcher = match watched {
        Ok(mut w) => match w.watch(&dir, notify::RecursiveMode::NonRecursive) {
            Ok(()) => Some(w),
            Err(e) => {
                warn!(dir = %dir.display(), "cannot watch the configuration file (SIGHUP still reloads): {e}");
                None
            }
        },
        Err(e) => {
            warn!("cannot watch files (SIGHUP still reloads): {e}");
            None
        }
    };
    let mut hup = match signal(SignalKind::hangup()) {
        Ok(s) => Some(s),
        Err(e) => {
            warn!("cannot handle SIGHUP: {e}");
            None
        }
    };
    loop {
        tokio::select! {
            got = rx.recv() => if got.is_none() { return },
            _ = async { match hup.as_mut() { Some(h) => { h.recv().await; } None => std::future::pending().await } } => {
                info!("SIGHUP: reloading the configuration");
            }
        }
        // Let a burst of events for one save settle.
        tokio::time::sleep(Duration::from_millis(DEBOUNCE_MS)).await;
        while rx.try_recv().is_ok() {}
        record(&state, reload(&state, &source));
    }
}
