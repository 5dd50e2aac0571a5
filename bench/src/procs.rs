//! Processes the bench starts, and what it reads about them from `/proc`.
//!
//! Owns: spawning servers in their own process group (so a master and its workers stop together),
//! bounded waits for load generators, stopping and reaping (also when the bench is interrupted:
//! SIGINT / SIGTERM / SIGHUP only set a flag that every wait polls), CPU time (`utime + stime` from
//! `/proc/PID/stat`) and memory (`VmRSS`, `VmHWM` from `/proc/PID/status`) summed over a process
//! group, and picking free loopback ports at run time.
//!
//! Every child also gets `PR_SET_PDEATHSIG` (SIGTERM for servers, SIGKILL for load generators), so
//! none outlives the bench even if the bench itself is killed with SIGKILL.

use std::collections::HashSet;
use std::fs::{self, File};
use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

static INTERRUPTED: AtomicBool = AtomicBool::new(false);

extern "C" fn on_signal(_signal: libc::c_int) {
    INTERRUPTED.store(true, Ordering::SeqCst);
}

/// Turns SIGINT, SIGTERM and SIGHUP into a flag that [`check_interrupted`] reports, so the bench
/// unwinds normally and stops everything it started.
pub fn install_signal_handlers() {
    for signal in [libc::SIGINT, libc::SIGTERM, libc::SIGHUP] {
        // SAFETY: the handler only stores to an atomic, which is async-signal-safe; the sigaction
        // struct is fully initialised before use.
        unsafe {
            let mut action: libc::sigaction = std::mem::zeroed();
            action.sa_sigaction = on_signal as *const () as libc::sighandler_t;
            action.sa_flags = libc::SA_RESTART;
            libc::sigemptyset(&mut action.sa_mask);
            libc::sigaction(signal, &action, std::ptr::null_mut());
        }
    }
}

pub fn interrupted() -> bool {
    INTERRUPTED.load(Ordering::SeqCst)
}

/// The exit code of a bench run, after saying why it failed: 130 after an interrupt (every
/// process it started has been stopped), 1 on another error, 0 on success.
pub fn exit_code(program: &str, result: Result<()>) -> u8 {
    match result {
        Ok(()) => 0,
        Err(_) if interrupted() => {
            eprintln!("{program}: interrupted; every process it started was stopped");
            130
        }
        Err(err) => {
            eprintln!("{program}: {err:#}");
            1
        }
    }
}

pub fn check_interrupted() -> Result<()> {
    if interrupted() {
        bail!("interrupted");
    }
    Ok(())
}

/// Sleeps in small steps so an interrupt is noticed quickly.
pub fn sleep(duration: Duration) -> Result<()> {
    let end = Instant::now() + duration;
    loop {
        check_interrupted()?;
        let now = Instant::now();
        if now >= end {
            return Ok(());
        }
        thread::sleep((end - now).min(Duration::from_millis(50)));
    }
}

/// Has the kernel send `signal` to the child when the bench dies, however it dies. Servers get
/// SIGTERM so that a master process (nginx) still stops its workers, which do not inherit the
/// setting; load generators get SIGKILL.
fn die_with_parent(command: &mut Command, signal: libc::c_int) {
    // SAFETY: prctl is async-signal-safe and touches no memory of the parent.
    unsafe {
        command.pre_exec(move || {
            libc::prctl(libc::PR_SET_PDEATHSIG, signal, 0, 0, 0);
            Ok(())
        });
    }
}

/// A long-running process (an upstream or a proxy) in its own process group. Dropping it stops the
/// whole group: SIGTERM, up to 5 s of grace, then SIGKILL, and the leader is reaped.
pub struct Server {
    name: String,
    child: Child,
    log: PathBuf,
    stopped: bool,
}

impl Server {
    /// Starts `command` with stdin closed and stdout + stderr appended to `<log_dir>/<name>.log`.
    pub fn spawn(name: &str, command: &mut Command, log_dir: &Path) -> Result<Server> {
        check_interrupted()?;
        let log = log_dir.join(format!("{name}.log"));
        let out = File::create(&log).with_context(|| format!("create {}", log.display()))?;
        let err = out.try_clone()?;
        command
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .process_group(0);
        die_with_parent(command, libc::SIGTERM);
        let child = command
            .spawn()
            .with_context(|| format!("start {name}: {command:?}"))?;
        Ok(Server {
            name: name.to_string(),
            child,
            log,
            stopped: false,
        })
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn pid(&self) -> i32 {
        self.child.id() as i32
    }

    /// Errors (with the end of the log) if the process has exited.
    pub fn check_alive(&mut self) -> Result<()> {
        if let Some(status) = self.child.try_wait()? {
            self.stopped = true;
            bail!(
                "{} exited ({status}); log {}:\n{}",
                self.name,
                self.log.display(),
                self.log_tail(15)
            );
        }
        Ok(())
    }

    pub fn log_tail(&self, lines: usize) -> String {
        tail(&self.log, lines)
    }

    /// Current totals over every process of this server's group.
    pub fn usage(&self) -> Usage {
        group_usage(self.pid())
    }

    pub fn stop(&mut self) {
        if self.stopped {
            return;
        }
        self.stopped = true;
        let pgid = self.pid();
        // SAFETY: signalling our own child's process group.
        unsafe { libc::kill(-pgid, libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(5);
        let mut leader_done = false;
        while Instant::now() < deadline {
            if !leader_done {
                leader_done = matches!(self.child.try_wait(), Ok(Some(_)) | Err(_));
            }
            if leader_done && group_members(pgid).is_empty() {
                return;
            }
            thread::sleep(Duration::from_millis(20));
        }
        // SAFETY: as above.
        unsafe { libc::kill(-pgid, libc::SIGKILL) };
        let _ = self.child.wait();
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.stop();
    }
}

fn tail(path: &Path, lines: usize) -> String {
    let text = fs::read_to_string(path).unwrap_or_default();
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

/// Runs a short-lived tool (a load generator) with stdout to `out` and stderr to `out.err`, killing
/// it if it runs past `limit` or the bench is interrupted. Returns the exit status and stdout.
pub fn run_bounded(command: &mut Command, limit: Duration, out: &Path) -> Result<(ExitStatus, String)> {
    check_interrupted()?;
    let err_path = out.with_extension("err");
    command
        .stdin(Stdio::null())
        .stdout(File::create(out)?)
        .stderr(File::create(&err_path)?);
    die_with_parent(command, libc::SIGKILL);
    let mut child = command.spawn().with_context(|| format!("start {command:?}"))?;
    let deadline = Instant::now() + limit;
    let status = loop {
        if let Some(status) = child.try_wait()? {
            break status;
        }
        if interrupted() || Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            check_interrupted()?;
            bail!("{command:?} ran past its {limit:?} limit and was killed");
        }
        thread::sleep(Duration::from_millis(20));
    };
    let stdout = fs::read_to_string(out).unwrap_or_default();
    if !status.success() {
        bail!("{command:?} failed ({status}): {}", tail(&err_path, 10).trim());
    }
    Ok((status, stdout))
}

/// CPU time and memory of a process group, summed over its members.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Usage {
    /// utime + stime, in seconds.
    pub cpu_secs: f64,
    /// Sum of VmRSS, KiB.
    pub rss_kib: u64,
    /// Sum of VmHWM (each process's own peak RSS), KiB.
    pub hwm_kib: u64,
    pub processes: usize,
}

fn clock_ticks_per_sec() -> f64 {
    // SAFETY: sysconf has no preconditions.
    let ticks = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if ticks > 0 {
        ticks as f64
    } else {
        100.0
    }
}

/// From the text of `/proc/PID/stat`: (process group, utime + stime in clock ticks). The command
/// name may hold spaces and parentheses, so fields are counted after its last `)`.
pub fn parse_stat(stat: &str) -> Option<(i32, u64)> {
    let rest = &stat[stat.rfind(')')? + 1..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // After the name: state(3) ppid(4) pgrp(5) ... utime(14) stime(15), 1-based as in proc(5).
    let pgrp = fields.get(2)?.parse().ok()?;
    let utime: u64 = fields.get(11)?.parse().ok()?;
    let stime: u64 = fields.get(12)?.parse().ok()?;
    Some((pgrp, utime + stime))
}

/// `VmRSS` and `VmHWM` in KiB from the text of `/proc/PID/status` (0 when absent, as for zombies).
pub fn parse_status_memory(status: &str) -> (u64, u64) {
    let field = |name: &str| {
        status
            .lines()
            .find_map(|line| line.strip_prefix(name))
            .and_then(|rest| rest.split_whitespace().next())
            .and_then(|kib| kib.parse().ok())
            .unwrap_or(0)
    };
    (field("VmRSS:"), field("VmHWM:"))
}

fn proc_pids() -> Vec<i32> {
    let Ok(entries) = fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .filter_map(|entry| entry.ok()?.file_name().to_str()?.parse().ok())
        .collect()
}

/// Pids of the live processes whose process group is `pgid`.
pub fn group_members(pgid: i32) -> Vec<i32> {
    proc_pids()
        .into_iter()
        .filter(|pid| {
            fs::read_to_string(format!("/proc/{pid}/stat"))
                .ok()
                .and_then(|stat| parse_stat(&stat))
                .is_some_and(|(pgrp, _)| pgrp == pgid)
                && !is_zombie(*pid)
        })
        .collect()
}

fn is_zombie(pid: i32) -> bool {
    fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|stat| {
            let rest = &stat[stat.rfind(')')? + 1..];
            rest.split_whitespace().next().map(|state| state == "Z")
        })
        .unwrap_or(true)
}

pub fn group_usage(pgid: i32) -> Usage {
    let hz = clock_ticks_per_sec();
    let mut usage = Usage::default();
    for pid in proc_pids() {
        let Some((pgrp, ticks)) = fs::read_to_string(format!("/proc/{pid}/stat"))
            .ok()
            .and_then(|stat| parse_stat(&stat))
        else {
            continue;
        };
        if pgrp != pgid {
            continue;
        }
        let (rss, hwm) = fs::read_to_string(format!("/proc/{pid}/status"))
            .map(|status| parse_status_memory(&status))
            .unwrap_or((0, 0));
        usage.cpu_secs += ticks as f64 / hz;
        usage.rss_kib += rss;
        usage.hwm_kib += hwm;
        usage.processes += 1;
    }
    usage
}

/// Whole-machine CPU time from the text of `/proc/stat`, in clock ticks: (busy, total), where busy
/// is user + nice + system + irq + softirq + steal, and total adds idle and iowait.
pub fn parse_proc_stat(stat: &str) -> Option<(u64, u64)> {
    let fields: Vec<u64> = stat
        .lines()
        .next()?
        .strip_prefix("cpu ")?
        .split_whitespace()
        .filter_map(|field| field.parse().ok())
        .collect();
    let total: u64 = fields.iter().take(8).sum();
    let idle = fields.get(3)? + fields.get(4).copied().unwrap_or(0);
    Some((total - idle, total))
}

/// Busy and total CPU seconds of the whole machine, all cores together.
pub fn machine_cpu_secs() -> (f64, f64) {
    let hz = clock_ticks_per_sec();
    fs::read_to_string("/proc/stat")
        .ok()
        .and_then(|stat| parse_proc_stat(&stat))
        .map_or((0.0, 0.0), |(busy, total)| (busy as f64 / hz, total as f64 / hz))
}

/// CPU seconds of the bench itself plus its children that have been reaped (the load generators;
/// the servers are reaped only when they stop).
pub fn own_cpu_secs() -> f64 {
    let secs = |who| {
        // SAFETY: getrusage writes only into the struct we pass.
        let usage = unsafe {
            let mut usage: libc::rusage = std::mem::zeroed();
            libc::getrusage(who, &mut usage);
            usage
        };
        let tv = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
        tv(usage.ru_utime) + tv(usage.ru_stime)
    };
    secs(libc::RUSAGE_SELF) + secs(libc::RUSAGE_CHILDREN)
}

static HANDED_OUT: Mutex<Option<HashSet<u16>>> = Mutex::new(None);

/// A loopback port that is free now and that this run has not handed out before.
pub fn free_port() -> Result<u16> {
    let mut handed = HANDED_OUT.lock().unwrap_or_else(|e| e.into_inner());
    let handed = handed.get_or_insert_with(HashSet::new);
    for _ in 0..100 {
        let port = TcpListener::bind((Ipv4Addr::LOCALHOST, 0))?.local_addr()?.port();
        if handed.insert(port) {
            return Ok(port);
        }
    }
    bail!("no free loopback port found")
}

pub fn loopback(port: u16) -> SocketAddr {
    SocketAddr::from((Ipv4Addr::LOCALHOST, port))
}

/// One HTTP/1.1 GET with `Connection: close`: (status, body bytes after the header block).
pub fn http1_get(addr: SocketAddr, path: &str, timeout: Duration) -> Result<(u16, Vec<u8>)> {
    let mut stream = TcpStream::connect_timeout(&addr, timeout)?;
    stream.set_read_timeout(Some(timeout))?;
    stream.set_write_timeout(Some(timeout))?;
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nUser-Agent: cogmesh-bench\r\nConnection: close\r\n\r\n"
    )?;
    let mut response = Vec::new();
    stream.read_to_end(&mut response)?;
    parse_http1_response(&response)
}

pub fn parse_http1_response(response: &[u8]) -> Result<(u16, Vec<u8>)> {
    let head_end = response
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .context("no end of the response header")?;
    let head = String::from_utf8_lossy(&response[..head_end]);
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|code| code.parse().ok())
        .with_context(|| format!("bad status line: {:?}", head.lines().next().unwrap_or_default()))?;
    Ok((status, response[head_end + 4..].to_vec()))
}

/// Checks that `addr` speaks HTTP/2 with prior knowledge: sends the client preface and an empty
/// SETTINGS frame, and expects the server's first frame to be SETTINGS.
pub fn h2c_handshake(addr: SocketAddr, timeout: Duration) -> Result<()> {
    let mut stream = TcpStream::connect_timeout(&addr, timeout)?;
    stream.set_read_timeout(Some(timeout))?;
    stream.set_write_timeout(Some(timeout))?;
    let mut hello = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec();
    // Frame header: length 0 (3 bytes), type 4 = SETTINGS, flags 0, stream 0.
    hello.extend_from_slice(&[0, 0, 0, 4, 0, 0, 0, 0, 0]);
    stream.write_all(&hello)?;
    let mut header = [0u8; 9];
    stream.read_exact(&mut header)?;
    if header[3] != 4 {
        bail!("first frame from {addr} has type {}, not SETTINGS", header[3]);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stat_fields_after_a_name_with_spaces_and_parens() {
        let stat = "4242 (nginx: worker (x)) S 4241 4241 4241 0 -1 4194624 100 0 0 0 \
                    250 75 0 0 20 0 1 0 12345 1000000 500 18446744073709551615";
        assert_eq!(parse_stat(stat), Some((4241, 325)));
        assert_eq!(parse_stat("garbage"), None);
    }

    #[test]
    fn machine_cpu_from_proc_stat() {
        let stat = "cpu  100 5 50 1000 20 3 2 0 0 0\ncpu0 50 2 25 500 10 1 1 0 0 0\n";
        assert_eq!(parse_proc_stat(stat), Some((160, 1180)));
        assert_eq!(parse_proc_stat("intr 1 2 3"), None);
    }

    #[test]
    fn status_memory_fields() {
        let status = "Name:\tenvoy\nVmHWM:\t   65536 kB\nVmRSS:\t   40960 kB\nThreads:\t4\n";
        assert_eq!(parse_status_memory(status), (40960, 65536));
        assert_eq!(parse_status_memory("Name:\tzombie\n"), (0, 0));
    }

    #[test]
    fn http1_response_status_and_body() {
        let (status, body) = parse_http1_response(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok").unwrap();
        assert_eq!((status, body.as_slice()), (200, b"ok".as_slice()));
        assert!(parse_http1_response(b"HTTP/1.1 200 OK\r\n").is_err());
    }

    #[test]
    fn ports_are_not_handed_out_twice() {
        let a = free_port().unwrap();
        let b = free_port().unwrap();
        assert_ne!(a, b);
    }

    #[test]
    fn server_group_is_accounted_and_stopped() {
        let dir = std::env::temp_dir().join(format!("cogmesh-bench-test-{}", std::process::id()));
        fs::create_dir_all(&dir).unwrap();
        let mut server = Server::spawn(
            "sleeper",
            Command::new("sh").args(["-c", "sleep 30 & sleep 30"]),
            &dir,
        )
        .unwrap();
        let pgid = server.pid();
        let deadline = Instant::now() + Duration::from_secs(5);
        while group_members(pgid).len() < 3 && Instant::now() < deadline {
            thread::sleep(Duration::from_millis(20));
        }
        assert_eq!(server.usage().processes, 3);
        assert!(server.usage().rss_kib > 0);
        server.stop();
        assert!(group_members(pgid).is_empty());
        let _ = fs::remove_dir_all(&dir);
    }
}
