//! The workload processes of a scenario: one `cogmesh workload` per endpoint, on loopback ports
//! picked at run time, shared by every strategy of the scenario (each strategy's proxy is started
//! in front of the same processes in turn).
//!
//! Owns: their command lines, readiness, `GET /admin/stats` (counters and the queue right now),
//! `POST /admin/delay` (the slow-endpoint injection), waiting until every queue is empty between
//! runs, and their CPU time. Dropping the fleet stops every process.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use cogmesh_bench::procs::{self, Server};
use serde::{Deserialize, Serialize};

/// How long one admin call to a workload may take.
const ADMIN_TIMEOUT: Duration = Duration::from_secs(2);

/// The simulation settings every workload of a scenario shares.
#[derive(Debug, Clone, PartialEq)]
pub struct SimSettings {
    pub service_time_ms: f64,
    /// `fixed` or `exponential` (the workload's `--service-time-dist`).
    pub dist: String,
    pub queue: usize,
}

/// One workload: its name (`x-served-by`), slots (`--capacity`) and address.
pub struct Member {
    pub name: String,
    pub slots: usize,
    pub addr: SocketAddr,
    server: Server,
}

/// What `GET /admin/stats` reports (the fields the bench reads).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize)]
pub struct Stats {
    pub busy: usize,
    pub queued: usize,
    pub completed: u64,
    pub rejected: u64,
    pub stalled: usize,
    pub received: u64,
}

pub struct Fleet {
    pub members: Vec<Member>,
}

impl Fleet {
    /// Starts one workload per entry of `slots` (named `w0`, `w1`, ...; seeded 1, 2, ... so
    /// their service-time draws differ) and waits until each answers `/admin/stats`.
    pub fn start(bin: &Path, slots: &[usize], sim: &SimSettings, dir: &Path) -> Result<Fleet> {
        let mut members = Vec::with_capacity(slots.len());
        for (i, &capacity) in slots.iter().enumerate() {
            let name = format!("w{i}");
            let addr = procs::loopback(procs::free_port()?);
            let mut command = Command::new(bin);
            command
                .arg("workload")
                .args(["--listen", &addr.to_string()])
                .args(["--name", &name])
                .args(["--capacity", &capacity.to_string()])
                .args(["--queue", &sim.queue.to_string()])
                .args(["--service-time-ms", &sim.service_time_ms.to_string()])
                .args(["--service-time-dist", &sim.dist])
                .args(["--seed", &(i + 1).to_string()])
                .args(["--orca-form", "text"])
                .args(["--log-level", "warn"]);
            let server = Server::spawn(&format!("workload-{name}"), &mut command, dir)?;
            members.push(Member {
                name,
                slots: capacity,
                addr,
                server,
            });
        }
        let mut fleet = Fleet { members };
        let deadline = Instant::now() + Duration::from_secs(20);
        for i in 0..fleet.members.len() {
            loop {
                procs::check_interrupted()?;
                fleet.members[i].server.check_alive()?;
                match stats_of(fleet.members[i].addr) {
                    Ok(_) => break,
                    Err(err) if Instant::now() >= deadline => {
                        let member = &fleet.members[i];
                        bail!(
                            "workload {} on {} not ready after 20 s: {err:#}; log:\n{}",
                            member.name,
                            member.addr,
                            member.server.log_tail(15)
                        );
                    }
                    Err(_) => procs::sleep(Duration::from_millis(50))?,
                }
            }
        }
        Ok(fleet)
    }

    pub fn addrs(&self) -> Vec<SocketAddr> {
        self.members.iter().map(|m| m.addr).collect()
    }

    pub fn stats(&self) -> Result<Vec<Stats>> {
        self.members.iter().map(|m| stats_of(m.addr)).collect()
    }

    /// Errors (with the end of its log) if a workload has exited.
    pub fn check_alive(&mut self) -> Result<()> {
        for member in &mut self.members {
            member.server.check_alive()?;
        }
        Ok(())
    }

    /// CPU seconds used so far by all the workloads together.
    pub fn cpu_secs(&self) -> f64 {
        self.members.iter().map(|m| m.server.usage().cpu_secs).sum()
    }

    /// Waits until no workload has a request in service, queued or stalled, so that a run does
    /// not start on the leftovers of the previous one (requests cut off at the end of a run, or
    /// slowed ones still holding their slot).
    pub fn wait_idle(&mut self, limit: Duration) -> Result<()> {
        let deadline = Instant::now() + limit;
        loop {
            self.check_alive()?;
            let stats = self.stats()?;
            let idle = stats
                .iter()
                .all(|s| s.busy == 0 && s.queued == 0 && s.stalled == 0);
            if idle {
                return Ok(());
            }
            if Instant::now() >= deadline {
                let busy: Vec<String> = self
                    .members
                    .iter()
                    .zip(&stats)
                    .filter(|(_, s)| s.busy + s.queued + s.stalled > 0)
                    .map(|(m, s)| format!("{}: {} busy, {} queued", m.name, s.busy, s.queued))
                    .collect();
                bail!("workloads still busy after {limit:?}: {}", busy.join("; "));
            }
            procs::sleep(Duration::from_millis(50))?;
        }
    }
}

/// `GET /admin/stats` of the workload at `addr`.
pub fn stats_of(addr: SocketAddr) -> Result<Stats> {
    let (status, body) = procs::http1_get(addr, "/admin/stats", ADMIN_TIMEOUT)?;
    if status != 200 {
        bail!("GET {addr}/admin/stats answered {status}");
    }
    serde_json::from_slice(&body).with_context(|| {
        format!(
            "GET {addr}/admin/stats: not the expected JSON: {:.200}",
            String::from_utf8_lossy(&body)
        )
    })
}

/// `POST /admin/delay?ms=D&for_ms=T`: requests arriving at the workload in the next `for_ms`
/// take `ms` longer; `ms = 0` clears the delay.
pub fn set_delay(addr: SocketAddr, ms: u64, for_ms: Option<u64>) -> Result<()> {
    let path = match for_ms {
        Some(window) => format!("/admin/delay?ms={ms}&for_ms={window}"),
        None => format!("/admin/delay?ms={ms}"),
    };
    let (status, body) = http1_post(addr, &path, ADMIN_TIMEOUT)?;
    if status != 200 {
        bail!(
            "POST {addr}{path} answered {status}: {}",
            String::from_utf8_lossy(&body).trim()
        );
    }
    Ok(())
}

/// One HTTP/1.1 POST without a body, `Connection: close`: (status, body).
fn http1_post(addr: SocketAddr, path: &str, timeout: Duration) -> Result<(u16, Vec<u8>)> {
    let mut stream = TcpStream::connect_timeout(&addr, timeout)?;
    stream.set_read_timeout(Some(timeout))?;
    stream.set_write_timeout(Some(timeout))?;
    write!(
        stream,
        "POST {path} HTTP/1.1\r\nHost: {addr}\r\nUser-Agent: cogmesh-bench\r\nContent-Length: 0\r\n\
         Connection: close\r\n\r\n"
    )?;
    let mut response = Vec::new();
    stream.read_to_end(&mut response)?;
    procs::parse_http1_response(&response)
}
