//! `cogmesh up`: checks the machine, starts a control plane whose process backend runs every
//! service's replicas (each behind its own `cogmesh-proxy`), waits until every replica has
//! registered, and prints the mesh. If a replica is not ready within `ready_timeout_s`,
//! everything is stopped again and the error names the replicas and why (from the control
//! plane's log). `cogmesh down` (or Ctrl-C / SIGTERM to `cogmesh up`) stops it all.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use cogmesh_proto::v1::mesh_admin_client::MeshAdminClient;
use cogmesh_proto::v1::{ListServicesRequest, ServiceStatus};
use rustix::process::{kill_process, Pid, Signal};

use super::mesh::MeshFile;

/// Where `cogmesh up` keeps the run files of the mesh whose control plane listens on
/// `control` (generated control.yaml, its log, the decision history, the pid of `cogmesh up`).
pub fn run_dir(control: SocketAddr) -> PathBuf {
    std::env::temp_dir().join(format!("cogmesh-up-{}", control.port()))
}

/// A running local mesh: the control plane process (it owns the replicas).
pub struct Mesh {
    pub control: SocketAddr,
    pub metrics: Option<SocketAddr>,
    child: Option<Child>,
    pub dir: PathBuf,
    pub file: MeshFile,
}

/// What is wrong with the machine for this mesh, one line each.
fn check_environment(file: &MeshFile, control: SocketAddr) -> Vec<String> {
    let mut problems = Vec::new();
    let bin_dir = std::env::current_exe()
        .ok()
        .and_then(|p| p.parent().map(Path::to_path_buf))
        .unwrap_or_default();
    let proxy = bin_dir.join("cogmesh-proxy");
    if !proxy.exists() {
        problems.push(format!(
            "binaries: {} is missing (build it with `cargo build -p cogmesh-proxy`)",
            proxy.display()
        ));
    }
    for (what, addr) in [
        ("control.listen", Some(control)),
        ("control.metrics", file.control.metrics),
    ] {
        if let Some(a) = addr {
            if let Err(e) = TcpListener::bind(a) {
                problems.push(format!("ports: {what} {a} is not free: {e}"));
            }
        }
    }
    let replicas: u32 = file.services.values().map(|s| s.replicas).sum();
    // Each replica is two processes with a handful of sockets each, plus the control plane.
    let want_files = u64::from(replicas) * 64 + 256;
    if let Ok(limit) = rustix::process::getrlimit(rustix::process::Resource::Nofile)
        .current
        .ok_or(())
    {
        if limit < want_files {
            problems.push(format!(
                "file limit: {limit} open files allowed, {want_files} wanted (`ulimit -n {want_files}`)"
            ));
        }
    }
    // About 15 MiB per replica (a workload and a sidecar) is plenty on loopback.
    let want_mib = u64::from(replicas) * 15 + 64;
    if let Some(available) = mem_available_mib() {
        if available < want_mib {
            problems.push(format!(
                "memory: {available} MiB available, about {want_mib} MiB wanted"
            ));
        }
    }
    problems
}

fn mem_available_mib() -> Option<u64> {
    let text = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = text.lines().find(|l| l.starts_with("MemAvailable:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib / 1024)
}

async fn list_services(control: SocketAddr) -> anyhow::Result<Vec<ServiceStatus>> {
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{control}"))?
        .connect_timeout(Duration::from_secs(1))
        .connect()
        .await?;
    Ok(MeshAdminClient::new(channel)
        .list_services(ListServicesRequest {})
        .await?
        .into_inner()
        .services)
}

/// Endpoints registered per service.
async fn registered(control: SocketAddr) -> Option<BTreeMap<String, usize>> {
    let services = list_services(control).await.ok()?;
    Some(
        services
            .into_iter()
            .map(|s| (s.name, s.endpoints.len()))
            .collect(),
    )
}

impl Mesh {
    /// Starts the mesh of `file` and waits for every replica; rolls back on failure.
    pub async fn up(file: MeshFile) -> anyhow::Result<Mesh> {
        let control = file
            .control
            .listen
            .unwrap_or_else(|| crate::control::DEFAULT_LISTEN.parse().expect("constant address"));
        let problems = check_environment(&file, control);
        if !problems.is_empty() {
            bail!(
                "the environment is not ready for this mesh:\n  {}",
                problems.join("\n  ")
            );
        }
        let dir = run_dir(control);
        std::fs::create_dir_all(&dir).with_context(|| format!("create {}", dir.display()))?;
        let config = dir.join("control.yaml");
        std::fs::write(&config, file.control_yaml(control, &dir.join("scaling.jsonl")))
            .with_context(|| format!("write {}", config.display()))?;
        let log = std::fs::File::create(dir.join("control.log")).context("create control.log")?;
        let child = Command::new(std::env::current_exe()?)
            .args(["control", "--config"])
            .arg(&config)
            .env("COGMESH_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .context("start the control plane")?;
        std::fs::write(dir.join("up.pid"), std::process::id().to_string()).context("write up.pid")?;
        let mut mesh = Mesh {
            control,
            metrics: file.control.metrics,
            child: Some(child),
            dir,
            file,
        };
        if let Err(e) = mesh.wait_ready().await {
            let started = Instant::now();
            mesh.stop();
            bail!(
                "{e}\nrolled back: everything started was stopped in {:.1} s",
                started.elapsed().as_secs_f64()
            );
        }
        Ok(mesh)
    }

    async fn wait_ready(&mut self) -> anyhow::Result<()> {
        let deadline = Instant::now() + Duration::from_secs(self.file.ready_timeout_s);
        let mut last = BTreeMap::new();
        loop {
            if let Some(child) = self.child.as_mut() {
                if let Ok(Some(status)) = child.try_wait() {
                    bail!("the control plane exited ({status}):\n{}", self.log_tail(20));
                }
            }
            if let Some(counts) = registered(self.control).await {
                last = counts;
                let missing = self.missing(&last);
                if missing.is_empty() {
                    return Ok(());
                }
            }
            if Instant::now() >= deadline {
                let mut reason = format!(
                    "not every replica became ready within {} s:",
                    self.file.ready_timeout_s
                );
                for (service, (ready, wanted)) in self.missing(&last) {
                    let _ = write!(reason, "\n  {service}: {ready} of {wanted} replicas ready");
                }
                let why = self.log_lines(|l| {
                    l.contains("replica") && (l.contains("exited") || l.contains("cannot start"))
                });
                if !why.is_empty() {
                    let _ = write!(reason, "\nfrom the control plane's log:\n{why}");
                }
                bail!(reason);
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// Services with fewer registered endpoints than replicas: (ready, wanted).
    fn missing(&self, counts: &BTreeMap<String, usize>) -> BTreeMap<String, (usize, usize)> {
        self.file
            .services
            .iter()
            .map(|(n, s)| {
                (
                    n.clone(),
                    (counts.get(n).copied().unwrap_or(0), s.replicas as usize),
                )
            })
            .filter(|(_, (ready, wanted))| ready < wanted)
            .collect()
    }

    fn log_lines(&self, keep: impl Fn(&str) -> bool) -> String {
        let text = std::fs::read_to_string(self.dir.join("control.log")).unwrap_or_default();
        let mut lines: Vec<&str> = text.lines().filter(|l| keep(l)).collect();
        lines.dedup();
        let start = lines.len().saturating_sub(10);
        lines[start..]
            .iter()
            .map(|l| format!("  {l}"))
            .collect::<Vec<_>>()
            .join("\n")
    }

    fn log_tail(&self, n: usize) -> String {
        let text = std::fs::read_to_string(self.dir.join("control.log")).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(n)..].join("\n")
    }

    /// The status table: per service, replicas, resources and endpoints.
    pub async fn status(&self) -> String {
        let services = list_services(self.control).await.unwrap_or_default();
        let mut out = format!(
            "cogmesh mesh up: control plane {} (metrics {}), logs in {}\n{:<22} {:>8} {:>6} {:>7}  ENDPOINTS\n",
            self.control,
            self.metrics.map_or("off".to_string(), |m| m.to_string()),
            self.dir.display(),
            "SERVICE",
            "REPLICAS",
            "CPU",
            "MEMORY"
        );
        for (name, s) in &self.file.services {
            let endpoints: Vec<String> = services
                .iter()
                .find(|st| &st.name == name)
                .map(|st| st.endpoints.iter().map(|e| e.address.clone()).collect())
                .unwrap_or_default();
            let (cpu, memory) = s
                .resources
                .as_ref()
                .map_or(("-", "-"), |r| (r.cpu.as_str(), r.memory.as_str()));
            let _ = writeln!(
                out,
                "{:<22} {:>8} {:>6} {:>7}  {}",
                name,
                endpoints.len(),
                cpu,
                memory,
                endpoints.join(" ")
            );
        }
        out
    }

    /// Stops the control plane (SIGTERM; it stops its replicas), SIGKILL after 15 s.
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            crate::scaling::process::stop_child(&mut child, Duration::from_secs(15));
        }
        let _ = std::fs::remove_file(self.dir.join("up.pid"));
    }
}

impl Drop for Mesh {
    fn drop(&mut self) {
        self.stop();
    }
}

/// `cogmesh down`: asks the `cogmesh up` whose control plane listens on `control` to stop, and
/// waits until it has.
pub fn down(control: SocketAddr) -> anyhow::Result<()> {
    let pid_file = run_dir(control).join("up.pid");
    let text = std::fs::read_to_string(&pid_file)
        .with_context(|| format!("no local mesh is running ({} not found)", pid_file.display()))?;
    let pid: i32 = text.trim().parse().context("up.pid does not hold a process id")?;
    let pid = Pid::from_raw(pid).context("up.pid holds an invalid process id")?;
    kill_process(pid, Signal::TERM)
        .with_context(|| format!("signal cogmesh up (pid {})", pid.as_raw_nonzero()))?;
    let deadline = Instant::now() + Duration::from_secs(30);
    while pid_file.exists() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(100));
    }
    if pid_file.exists() {
        bail!(
            "cogmesh up (pid {}) did not stop within 30 s",
            pid.as_raw_nonzero()
        );
    }
    println!("the local mesh is down");
    Ok(())
}
