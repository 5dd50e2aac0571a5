//! The `process` backend: replicas are local processes the control plane starts and stops, each
//! behind its own inbound `cogmesh-proxy` that registers with this control plane — so a new
//! replica joins the routing tables the way any sidecar does, and leaves them when stopped.
//!
//! A replica is the app command of the service's `scaling.services.<name>.command` (with
//! `{address}` and `{name}` filled in; `cogmesh` is this binary) plus
//! `cogmesh-proxy --direction inbound --listen <sidecar> --upstream <app> --control <us>
//! --service <name>`, found next to this binary. It counts as starting until its sidecar's
//! address shows up among the service's endpoints. Scale-down stops the newest replicas first
//! (SIGTERM to the sidecar, which drains, then to the app); shutdown stops them all.

use std::collections::{BTreeMap, HashSet};
use std::net::{SocketAddr, TcpListener};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use rustix::process::{kill_process, Pid, Signal};
use tracing::{info, warn};

use super::config::ServiceScaling;

/// Set on every process a replica runs (to the control plane's address), so operators and
/// tests can find them: `grep -l COGMESH_CONTROL_PLANE=... /proc/*/environ`.
pub const OWNER_ENV: &str = "COGMESH_CONTROL_PLANE";

/// How long a replica's app has to start listening.
const APP_READY_TIMEOUT: Duration = Duration::from_secs(10);

struct Replica {
    name: String,
    sidecar_addr: SocketAddr,
    app: Child,
    sidecar: Child,
}

pub struct ProcessBackend {
    control: SocketAddr,
    bin_dir: PathBuf,
    /// Per service: how to start one replica (its app command, its sidecar's admission limit).
    services: BTreeMap<String, ServiceScaling>,
    replicas: Mutex<BTreeMap<String, Vec<Replica>>>,
    next_index: Mutex<u64>,
}

/// A free loopback port (bound and released; the process it is for binds it right after).
pub(crate) fn free_port() -> std::io::Result<SocketAddr> {
    TcpListener::bind("127.0.0.1:0")?.local_addr()
}

/// Sends SIGTERM to `child`.
pub(crate) fn terminate(child: &mut Child) {
    let _ = kill_process(Pid::from_child(child), Signal::TERM);
}

/// Stops `child`: SIGTERM, then SIGKILL if it is still running after `grace`.
pub(crate) fn stop_child(child: &mut Child, grace: Duration) {
    terminate(child);
    wait_or_kill(child, Instant::now() + grace);
}

/// Waits for `child` to exit until `until`, then kills it.
pub(crate) fn wait_or_kill(child: &mut Child, until: Instant) {
    while Instant::now() < until {
        if let Ok(Some(_)) = child.try_wait() {
            return;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let _ = child.kill();
    let _ = child.wait();
}

impl ProcessBackend {
    pub fn new(control: SocketAddr, services: &BTreeMap<String, ServiceScaling>) -> Self {
        let bin_dir = std::env::current_exe()
            .ok()
            .and_then(|p| p.parent().map(|d| d.to_path_buf()))
            .unwrap_or_default();
        ProcessBackend {
            control,
            bin_dir,
            services: services.clone(),
            replicas: Mutex::new(BTreeMap::new()),
            next_index: Mutex::new(0),
        }
    }

    /// Forgets the replicas of `service` whose app or sidecar has exited (logging why, and
    /// stopping the other half), so the count the engine sees is what really runs.
    fn reap(&self, service: &str) {
        let mut gone = Vec::new();
        {
            let mut replicas = self.replicas.lock().unwrap_or_else(|p| p.into_inner());
            let Some(list) = replicas.get_mut(service) else {
                return;
            };
            let mut i = 0;
            while i < list.len() {
                let r = &mut list[i];
                let app = r.app.try_wait().ok().flatten();
                let sidecar = r.sidecar.try_wait().ok().flatten();
                if app.is_none() && sidecar.is_none() {
                    i += 1;
                    continue;
                }
                match (app, sidecar) {
                    (Some(status), _) => warn!(service, replica = %r.name, "replica app exited: {status}"),
                    (None, Some(status)) => {
                        warn!(service, replica = %r.name, "replica sidecar exited: {status}")
                    }
                    (None, None) => {}
                }
                gone.push(list.remove(i));
            }
        }
        if !gone.is_empty() {
            std::thread::spawn(move || stop_all(gone));
        }
    }

    /// Replicas started for `service` whose sidecar is not among `visible` endpoints yet.
    pub fn starting(&self, service: &str, visible: &HashSet<String>) -> u32 {
        self.reap(service);
        let replicas = self.replicas.lock().unwrap_or_else(|p| p.into_inner());
        replicas.get(service).map_or(0, |list| {
            list.iter()
                .filter(|r| !visible.contains(&r.sidecar_addr.to_string()))
                .count() as u32
        })
    }

    /// Replicas this backend runs for `service`.
    pub fn running(&self, service: &str) -> u32 {
        let replicas = self.replicas.lock().unwrap_or_else(|p| p.into_inner());
        replicas.get(service).map_or(0, |l| l.len() as u32)
    }

    /// Starts or stops replicas of `service` until `count` run.
    pub fn scale(&self, service: &str, count: u32) {
        let Some(spec) = self.services.get(service).filter(|s| !s.command.is_empty()) else {
            warn!(service, "no command to start replicas of this service");
            return;
        };
        let mut stopping = Vec::new();
        {
            let mut replicas = self.replicas.lock().unwrap_or_else(|p| p.into_inner());
            let list = replicas.entry(service.to_string()).or_default();
            while list.len() > count as usize {
                stopping.extend(list.pop());
            }
            while list.len() < count as usize {
                match self.start(service, spec) {
                    Ok(r) => {
                        info!(service, replica = %r.name, sidecar = %r.sidecar_addr, "replica started");
                        list.push(r);
                    }
                    Err(e) => {
                        warn!(service, "cannot start a replica: {e}");
                        break;
                    }
                }
            }
        }
        if !stopping.is_empty() {
            // Stop outside the lock and off the async threads: draining takes a moment.
            std::thread::spawn(move || stop_all(stopping));
        }
    }

    fn start(&self, service: &str, spec: &ServiceScaling) -> std::io::Result<Replica> {
        let command = &spec.command;
        let index = {
            let mut next = self.next_index.lock().unwrap_or_else(|p| p.into_inner());
            *next += 1;
            *next
        };
        let name = format!("{service}-{index}");
        let app_addr = free_port()?;
        let sidecar_addr = free_port()?;
        let admin_addr = free_port()?;
        let fill = |a: &String| {
            a.replace("{address}", &app_addr.to_string())
                .replace("{name}", &name)
        };
        let program = match command[0].as_str() {
            "cogmesh" => std::env::current_exe()?,
            other => PathBuf::from(other),
        };
        let mut app = Command::new(program)
            .args(command[1..].iter().map(fill))
            .env(OWNER_ENV, self.control.to_string())
            .stdin(Stdio::null())
            .spawn()?;
        // The app's readiness check: it accepts connections on its port. Only then does its
        // sidecar start (and register the replica with the control plane).
        let ready_by = Instant::now() + APP_READY_TIMEOUT;
        loop {
            if let Ok(Some(status)) = app.try_wait() {
                return Err(std::io::Error::other(format!("{name}: app exited ({status})")));
            }
            if std::net::TcpStream::connect_timeout(&app_addr, Duration::from_millis(100)).is_ok() {
                break;
            }
            if Instant::now() >= ready_by {
                stop_child(&mut app, Duration::from_secs(2));
                return Err(std::io::Error::other(format!(
                    "{name}: app not listening on {app_addr} within {} s",
                    APP_READY_TIMEOUT.as_secs()
                )));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let mut sidecar = Command::new(self.bin_dir.join("cogmesh-proxy"));
        if let Some(limit) = spec.max_concurrency {
            sidecar.args(["--max-concurrency", &limit.to_string()]);
        }
        let sidecar = sidecar
            .args(["--direction", "inbound", "--upstream-service", "local"])
            .args(["--listen", &sidecar_addr.to_string()])
            .args(["--admin", &admin_addr.to_string()])
            .args(["--upstream", &app_addr.to_string()])
            .args(["--control", &self.control.to_string()])
            .args(["--service", service])
            .env(OWNER_ENV, self.control.to_string())
            .stdin(Stdio::null())
            .spawn();
        let sidecar = match sidecar {
            Ok(s) => s,
            Err(e) => {
                stop_child(&mut app, Duration::from_secs(2));
                return Err(e);
            }
        };
        Ok(Replica {
            name,
            sidecar_addr,
            app,
            sidecar,
        })
    }

    /// Stops every replica (control-plane shutdown).
    pub fn shutdown(&self) {
        let all: Vec<Replica> = {
            let mut replicas = self.replicas.lock().unwrap_or_else(|p| p.into_inner());
            std::mem::take(&mut *replicas).into_values().flatten().collect()
        };
        stop_all(all);
    }
}

impl Drop for ProcessBackend {
    fn drop(&mut self) {
        self.shutdown();
    }
}

/// SIGTERM to every sidecar (they drain), then to the apps; SIGKILL after 5 s.
fn stop_all(mut replicas: Vec<Replica>) {
    for r in &mut replicas {
        info!(replica = %r.name, "stopping replica");
        terminate(&mut r.sidecar);
    }
    let until = Instant::now() + Duration::from_secs(5);
    for r in &mut replicas {
        wait_or_kill(&mut r.sidecar, until);
        terminate(&mut r.app);
    }
    let until = Instant::now() + Duration::from_secs(5);
    for r in &mut replicas {
        wait_or_kill(&mut r.app, until);
    }
}
