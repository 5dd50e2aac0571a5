//! The `cogmesh control` process under test, and what `/proc` says about it.
//!
//! The process is spawned from the bench's main thread with `PR_SET_PDEATHSIG(SIGKILL)`, so it
//! cannot outlive the bench (not even a `kill -9` of the bench); it is stopped with SIGTERM (the
//! control plane then ends every sidecar stream and drains) and SIGKILL after a grace period, on
//! every path including errors (`Drop`). A watchdog thread kills it if its RSS passes a limit, so
//! a control plane that balloons cannot take the machine down with it.

use std::fs::{self, File};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

/// CPU time and memory of one process.
#[derive(Clone, Copy, Debug, Default)]
pub struct Usage {
    /// utime + stime, seconds.
    pub cpu_secs: f64,
    pub rss_kib: u64,
    pub hwm_kib: u64,
}

/// `utime + stime` of a process (all its threads), seconds; `None` once it is gone.
pub fn cpu_secs(pid: u32) -> Option<f64> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name may contain spaces and parentheses: count fields after the last ')'.
    let rest = &stat[stat.rfind(')')? + 1..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // After the name: state is field 3 of the man page, utime 14 and stime 15.
    let utime: f64 = fields.get(11)?.parse().ok()?;
    let stime: f64 = fields.get(12)?.parse().ok()?;
    Some((utime + stime) / clock_ticks())
}

fn clock_ticks() -> f64 {
    // SAFETY: sysconf only reads a configuration value.
    let ticks = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if ticks > 0 {
        ticks as f64
    } else {
        100.0
    }
}

/// `VmRSS` and `VmHWM` of a process, KiB.
pub fn memory_kib(pid: u32) -> Option<(u64, u64)> {
    let status = fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let field = |name: &str| -> Option<u64> {
        let line = status.lines().find(|l| l.starts_with(name))?;
        line[name.len()..]
            .trim()
            .trim_end_matches("kB")
            .trim()
            .parse()
            .ok()
    };
    Some((field("VmRSS:")?, field("VmHWM:")?))
}

pub fn usage(pid: u32) -> Usage {
    let (rss_kib, hwm_kib) = memory_kib(pid).unwrap_or_default();
    Usage {
        cpu_secs: cpu_secs(pid).unwrap_or(0.0),
        rss_kib,
        hwm_kib,
    }
}

/// (busy, total) CPU seconds of the whole machine, from `/proc/stat`.
pub fn machine_cpu_secs() -> (f64, f64) {
    let Ok(stat) = fs::read_to_string("/proc/stat") else {
        return (0.0, 0.0);
    };
    let Some(line) = stat.lines().next() else {
        return (0.0, 0.0);
    };
    let values: Vec<f64> = line
        .split_whitespace()
        .skip(1)
        .filter_map(|v| v.parse().ok())
        .collect();
    let total: f64 = values.iter().sum();
    // idle and iowait.
    let idle = values.get(3).copied().unwrap_or(0.0) + values.get(4).copied().unwrap_or(0.0);
    let ticks = clock_ticks();
    ((total - idle) / ticks, total / ticks)
}

/// Raises the soft open-files limit to the hard limit (children inherit it); returns the new
/// soft limit.
pub fn raise_nofile_limit() -> u64 {
    // SAFETY: getrlimit/setrlimit on a fully initialised struct owned by this frame.
    unsafe {
        let mut limit: libc::rlimit = std::mem::zeroed();
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) != 0 {
            return 0;
        }
        if limit.rlim_cur < limit.rlim_max {
            let raised = libc::rlimit {
                rlim_cur: limit.rlim_max,
                rlim_max: limit.rlim_max,
            };
            if libc::setrlimit(libc::RLIMIT_NOFILE, &raised) == 0 {
                return raised.rlim_cur as u64;
            }
        }
        limit.rlim_cur as u64
    }
}

/// A loopback port that was free a moment ago.
pub fn free_port() -> Result<u16> {
    let listener = TcpListener::bind("127.0.0.1:0").context("bind 127.0.0.1:0")?;
    Ok(listener.local_addr()?.port())
}

/// A running `cogmesh control`.
pub struct ControlPlane {
    child: Option<Child>,
    pub pid: u32,
    pub addr: SocketAddr,
    pub log: PathBuf,
    watchdog: Option<JoinHandle<()>>,
    watchdog_stop: Arc<AtomicBool>,
    /// RSS in KiB at which the watchdog killed the process, 0 while it has not.
    killed_at_kib: Arc<AtomicU64>,
}

impl ControlPlane {
    /// Starts `bin control` on `127.0.0.1:port`; logs go to `log`. Must be called from a thread
    /// that lives as long as the process (the parent-death signal follows the spawning thread).
    pub fn start(
        bin: &Path,
        port: u16,
        weight_interval_ms: u64,
        log_level: &str,
        log: &Path,
        max_rss_mib: u64,
    ) -> Result<ControlPlane> {
        let addr: SocketAddr = ([127, 0, 0, 1], port).into();
        let out = File::create(log).with_context(|| format!("create {}", log.display()))?;
        let mut command = Command::new(bin);
        command
            .arg("control")
            .arg("--listen")
            .arg(addr.to_string())
            .arg("--weight-interval-ms")
            .arg(weight_interval_ms.to_string())
            .arg("--log-level")
            .arg(log_level)
            .stdin(Stdio::null())
            .stdout(out.try_clone()?)
            .stderr(out);
        // Flags only: no COGMESH_* variable of the bench's environment overrides them.
        for (key, _) in std::env::vars_os() {
            if key.to_string_lossy().starts_with("COGMESH_") {
                command.env_remove(key);
            }
        }
        // SAFETY: prctl is async-signal-safe and touches no memory of the parent.
        unsafe {
            command.pre_exec(|| {
                libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL, 0, 0, 0);
                Ok(())
            });
        }
        let child = command
            .spawn()
            .with_context(|| format!("start {}", bin.display()))?;
        let pid = child.id();
        let watchdog_stop = Arc::new(AtomicBool::new(false));
        let killed_at_kib = Arc::new(AtomicU64::new(0));
        let watchdog = {
            let stop = Arc::clone(&watchdog_stop);
            let killed = Arc::clone(&killed_at_kib);
            let limit_kib = max_rss_mib.saturating_mul(1024);
            thread::Builder::new()
                .name("rss-watchdog".into())
                .spawn(move || {
                    while !stop.load(Ordering::SeqCst) {
                        if let Some((rss, _)) = memory_kib(pid) {
                            if rss > limit_kib {
                                killed.store(rss, Ordering::SeqCst);
                                // SAFETY: the child is not reaped before this thread is joined,
                                // so `pid` still names it.
                                unsafe { libc::kill(pid as libc::pid_t, libc::SIGKILL) };
                                return;
                            }
                        }
                        thread::sleep(Duration::from_millis(100));
                    }
                })?
        };
        Ok(ControlPlane {
            child: Some(child),
            pid,
            addr,
            log: log.to_path_buf(),
            watchdog: Some(watchdog),
            watchdog_stop,
            killed_at_kib,
        })
    }

    /// Waits until the gRPC port accepts connections.
    pub fn wait_ready(&mut self, timeout: Duration) -> Result<()> {
        let deadline = Instant::now() + timeout;
        loop {
            self.check_alive()?;
            if TcpStream::connect_timeout(&self.addr, Duration::from_millis(200)).is_ok() {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!(
                    "the control plane did not listen on {} within {timeout:?}",
                    self.addr
                );
            }
            thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn check_alive(&mut self) -> Result<()> {
        let Some(child) = self.child.as_mut() else {
            bail!("the control plane was already stopped");
        };
        if let Some(status) = child.try_wait()? {
            let killed = self.killed_at_kib.load(Ordering::SeqCst);
            if killed > 0 {
                bail!(
                    "the control plane was killed by the bench's RSS watchdog at {} MiB (--max-rss-mib)",
                    killed / 1024
                );
            }
            bail!(
                "the control plane exited: {status}; log tail:\n{}",
                self.log_tail(20)
            );
        }
        Ok(())
    }

    /// RSS (KiB) at which the watchdog killed the process, if it did.
    pub fn killed_at_kib(&self) -> Option<u64> {
        Some(self.killed_at_kib.load(Ordering::SeqCst)).filter(|k| *k > 0)
    }

    pub fn usage(&self) -> Usage {
        usage(self.pid)
    }

    pub fn log_tail(&self, lines: usize) -> String {
        let text = fs::read_to_string(&self.log).unwrap_or_default();
        let all: Vec<&str> = text.lines().collect();
        all[all.len().saturating_sub(lines)..].join("\n")
    }

    /// SIGTERM, up to `grace` to exit (the control plane drains its streams), then SIGKILL; reaps.
    pub fn stop(&mut self, grace: Duration) {
        self.watchdog_stop.store(true, Ordering::SeqCst);
        if let Some(watchdog) = self.watchdog.take() {
            let _ = watchdog.join();
        }
        let Some(mut child) = self.child.take() else {
            return;
        };
        if matches!(child.try_wait(), Ok(None)) {
            // SAFETY: the child is not reaped yet, so `pid` still names it.
            unsafe { libc::kill(self.pid as libc::pid_t, libc::SIGTERM) };
            let deadline = Instant::now() + grace;
            while matches!(child.try_wait(), Ok(None)) && Instant::now() < deadline {
                thread::sleep(Duration::from_millis(20));
            }
        }
        let _ = child.kill();
        let _ = child.wait();
    }
}

impl Drop for ControlPlane {
    fn drop(&mut self) {
        self.stop(Duration::from_secs(2));
    }
}
