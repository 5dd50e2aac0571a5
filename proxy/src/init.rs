//! `cogmesh-proxy init`: the iptables rules that send a pod's TCP traffic through its sidecar,
//! run once in the pod's network namespace (as the init container) before the app starts.
//!
//! Everything lives in two chains of the `nat` table, so the rules are easy to read, replace
//! and remove:
//! - `COGMESH_INBOUND`, jumped to from `PREROUTING`: inbound TCP, except the skipped ports,
//!   is redirected to the inbound listener (default 4143);
//! - `COGMESH_OUTPUT`, jumped to from `OUTPUT`: TCP the app sends, except the proxy's own
//!   (`-m owner --uid-owner`), loopback traffic, skipped ports and skipped CIDRs, is
//!   redirected to the outbound listener (default 4140).
//!
//! Installing is idempotent: the chains are created if missing and flushed, then filled, and
//! a jump is only added when `-C` does not find it. `--remove` deletes the jumps and the chains.
//! The same rules go to `ip6tables` (with the IPv6 CIDRs) unless `--ipv4-only`. The pure part
//! ([`Rules::commands`]) builds argument lists; only [`run`] executes them.

use std::net::IpAddr;
use std::process::Command;

use clap::Parser;

pub const INBOUND_CHAIN: &str = "COGMESH_INBOUND";
pub const OUTPUT_CHAIN: &str = "COGMESH_OUTPUT";
/// The uid the sidecar container runs as in the manifests `cogmesh inject` writes.
pub const DEFAULT_PROXY_UID: u32 = 2102;

/// Install (or remove) the iptables rules that redirect a pod's TCP traffic to its sidecar.
#[derive(Parser, Debug, Clone)]
#[command(name = "cogmesh-proxy init")]
pub struct InitArgs {
    /// Port of the sidecar's inbound listener.
    #[arg(long, default_value_t = 4143)]
    pub inbound_port: u16,
    /// Port of the sidecar's outbound listener.
    #[arg(long, default_value_t = 4140)]
    pub outbound_port: u16,
    /// The uid the proxy runs as: its own connections are never redirected.
    #[arg(long, default_value_t = DEFAULT_PROXY_UID)]
    pub proxy_uid: u32,
    /// Inbound ports not redirected (comma-separated or repeated), e.g. the admin port for
    /// probes and scrapes.
    #[arg(long, value_delimiter = ',', default_value = "4191")]
    pub skip_inbound_ports: Vec<u16>,
    /// Outbound destination ports not redirected.
    #[arg(long, value_delimiter = ',')]
    pub skip_outbound_ports: Vec<u16>,
    /// Outbound destination networks not redirected, e.g. 169.254.169.254/32 or fd00::/8.
    #[arg(long, value_delimiter = ',', value_parser = parse_cidr)]
    pub skip_outbound_cidrs: Vec<Cidr>,
    /// Only iptables (no ip6tables rules).
    #[arg(long)]
    pub ipv4_only: bool,
    /// Remove the rules instead of installing them.
    #[arg(long)]
    pub remove: bool,
    /// Print the commands instead of running them.
    #[arg(long)]
    pub dry_run: bool,
}

/// An IP network `ADDR/PREFIX`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cidr {
    pub addr: IpAddr,
    pub prefix: u8,
}

impl std::fmt::Display for Cidr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.addr, self.prefix)
    }
}

fn parse_cidr(s: &str) -> Result<Cidr, String> {
    let (addr, prefix) = s.split_once('/').unwrap_or((s, ""));
    let addr: IpAddr = addr
        .parse()
        .map_err(|_| format!("{s:?}: expected ADDR/PREFIX, e.g. 10.0.0.0/8"))?;
    let max = if addr.is_ipv4() { 32 } else { 128 };
    let prefix = if prefix.is_empty() {
        max
    } else {
        prefix
            .parse::<u8>()
            .ok()
            .filter(|p| *p <= max)
            .ok_or_else(|| format!("{s:?}: prefix must be 0..={max}"))?
    };
    Ok(Cidr { addr, prefix })
}

/// One iptables family.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Family {
    V4,
    V6,
}

impl Family {
    pub fn binary(self) -> &'static str {
        match self {
            Family::V4 => "iptables",
            Family::V6 => "ip6tables",
        }
    }
}

/// A command to run: the binary, its arguments, and whether a failure is expected and fine
/// (`-N` of an existing chain, `-C` of a missing rule).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Step {
    pub family: Family,
    pub args: Vec<String>,
    pub kind: StepKind,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StepKind {
    /// Must succeed.
    Required,
    /// May fail (the chain exists already / is gone already).
    Tolerated,
    /// Appends the jump in `args` unless `-C` finds it (makes installing idempotent).
    AppendUnlessPresent,
    /// Deletes the jump in `args` while `-C` finds it.
    DeleteWhilePresent,
}

impl Step {
    /// The command line, as `--dry-run` prints it.
    pub fn line(&self) -> String {
        let args = match self.kind {
            StepKind::AppendUnlessPresent => format!("-A {}", self.args.join(" ")),
            StepKind::DeleteWhilePresent => format!("-D {}", self.args.join(" ")),
            _ => self.args.join(" "),
        };
        format!("{} -t nat {args}", self.family.binary())
    }
}

/// The rules of one pod.
pub struct Rules<'a>(pub &'a InitArgs);

impl Rules<'_> {
    fn families(&self) -> Vec<Family> {
        if self.0.ipv4_only {
            vec![Family::V4]
        } else {
            vec![Family::V4, Family::V6]
        }
    }

    /// The commands that install (or, with `--remove`, remove) the rules, in order.
    pub fn commands(&self) -> Vec<Step> {
        let mut steps = Vec::new();
        for family in self.families() {
            if self.0.remove {
                self.removal(family, &mut steps);
            } else {
                self.installation(family, &mut steps);
            }
        }
        steps
    }

    fn jumps() -> [(&'static str, &'static str); 2] {
        [("PREROUTING", INBOUND_CHAIN), ("OUTPUT", OUTPUT_CHAIN)]
    }

    fn installation(&self, family: Family, steps: &mut Vec<Step>) {
        let a = self.0;
        let step = |kind, args: Vec<String>| Step { family, args, kind };
        let s = |v: &[&str]| v.iter().map(|x| x.to_string()).collect::<Vec<_>>();
        for chain in [INBOUND_CHAIN, OUTPUT_CHAIN] {
            steps.push(step(StepKind::Tolerated, s(&["-N", chain])));
            steps.push(step(StepKind::Required, s(&["-F", chain])));
        }
        let rule = |chain: &str, rest: Vec<String>| {
            let mut args = s(&["-A", chain, "-p", "tcp"]);
            args.extend(rest);
            step(StepKind::Required, args)
        };
        for port in &a.skip_inbound_ports {
            steps.push(rule(
                INBOUND_CHAIN,
                s(&["--dport", &port.to_string(), "-j", "RETURN"]),
            ));
        }
        steps.push(rule(
            INBOUND_CHAIN,
            s(&["-j", "REDIRECT", "--to-ports", &a.inbound_port.to_string()]),
        ));

        let uid = a.proxy_uid.to_string();
        steps.push(rule(
            OUTPUT_CHAIN,
            s(&["-m", "owner", "--uid-owner", &uid, "-j", "RETURN"]),
        ));
        // The app talking to itself or to the sidecar's admin port on loopback stays local.
        steps.push(rule(OUTPUT_CHAIN, s(&["-o", "lo", "-j", "RETURN"])));
        for port in &a.skip_outbound_ports {
            steps.push(rule(
                OUTPUT_CHAIN,
                s(&["--dport", &port.to_string(), "-j", "RETURN"]),
            ));
        }
        for cidr in &a.skip_outbound_cidrs {
            if cidr.addr.is_ipv4() == (family == Family::V4) {
                steps.push(rule(OUTPUT_CHAIN, s(&["-d", &cidr.to_string(), "-j", "RETURN"])));
            }
        }
        steps.push(rule(
            OUTPUT_CHAIN,
            s(&["-j", "REDIRECT", "--to-ports", &a.outbound_port.to_string()]),
        ));
        for (from, to) in Self::jumps() {
            steps.push(step(
                StepKind::AppendUnlessPresent,
                s(&[from, "-p", "tcp", "-j", to]),
            ));
        }
    }

    fn removal(&self, family: Family, steps: &mut Vec<Step>) {
        let s = |v: &[&str]| v.iter().map(|x| x.to_string()).collect::<Vec<_>>();
        for (from, to) in Self::jumps() {
            steps.push(Step {
                family,
                args: s(&[from, "-p", "tcp", "-j", to]),
                kind: StepKind::DeleteWhilePresent,
            });
        }
        for chain in [INBOUND_CHAIN, OUTPUT_CHAIN] {
            for op in ["-F", "-X"] {
                steps.push(Step {
                    family,
                    args: s(&[op, chain]),
                    kind: StepKind::Tolerated,
                });
            }
        }
    }
}

/// Why `init` failed.
#[derive(Debug, thiserror::Error)]
pub enum InitError {
    #[error("cannot run {command}: {source}")]
    Spawn { command: String, source: std::io::Error },
    #[error("`{command}` failed ({status}): {stderr}")]
    Failed {
        command: String,
        status: std::process::ExitStatus,
        stderr: String,
    },
}

/// `cogmesh-proxy init ...`: parses `args` (the first is the subcommand's name) and runs.
pub fn main(args: impl Iterator<Item = String>) -> std::process::ExitCode {
    let args = InitArgs::parse_from(args);
    match run(&args) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("cogmesh-proxy init: {e}");
            std::process::ExitCode::FAILURE
        }
    }
}

/// Runs (or prints) the commands of `args`.
pub fn run(args: &InitArgs) -> Result<(), InitError> {
    let steps = Rules(args).commands();
    if args.dry_run {
        for step in &steps {
            println!("{}", step.line());
        }
        return Ok(());
    }
    for step in &steps {
        match step.kind {
            StepKind::Required => exec(step.family, &step.args)?,
            StepKind::Tolerated => {
                let _ = exec(step.family, &step.args);
            }
            StepKind::AppendUnlessPresent => {
                if exec(step.family, &with_op("-C", &step.args)).is_err() {
                    exec(step.family, &with_op("-A", &step.args))?;
                }
            }
            StepKind::DeleteWhilePresent => {
                // Bounded: a jump added by hand several times is removed as often.
                for _ in 0..16 {
                    if exec(step.family, &with_op("-C", &step.args)).is_err() {
                        break;
                    }
                    exec(step.family, &with_op("-D", &step.args))?;
                }
            }
        }
    }
    Ok(())
}

fn with_op(op: &str, args: &[String]) -> Vec<String> {
    std::iter::once(op.to_string())
        .chain(args.iter().cloned())
        .collect()
}

fn exec(family: Family, args: &[String]) -> Result<(), InitError> {
    let command = format!("{} -t nat {}", family.binary(), args.join(" "));
    let output = Command::new(family.binary())
        .args(["-w", "5", "-t", "nat"])
        .args(args)
        .output()
        .map_err(|source| InitError::Spawn {
            command: command.clone(),
            source,
        })?;
    if output.status.success() {
        Ok(())
    } else {
        Err(InitError::Failed {
            command,
            status: output.status,
            stderr: String::from_utf8_lossy(&output.stderr).trim().to_string(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(extra: &[&str]) -> InitArgs {
        let mut v = vec!["init"];
        v.extend_from_slice(extra);
        InitArgs::parse_from(v)
    }

    #[test]
    fn install_redirects_and_skips() {
        let a = args(&[
            "--proxy-uid",
            "7",
            "--skip-outbound-ports",
            "5432,6379",
            "--skip-outbound-cidrs",
            "169.254.169.254/32,fd00::/8",
        ]);
        let lines: Vec<String> = Rules(&a).commands().iter().map(Step::line).collect();
        let v4: Vec<&str> = lines
            .iter()
            .filter(|l| l.starts_with("iptables "))
            .map(String::as_str)
            .collect();
        assert_eq!(
            v4,
            [
                "iptables -t nat -N COGMESH_INBOUND",
                "iptables -t nat -F COGMESH_INBOUND",
                "iptables -t nat -N COGMESH_OUTPUT",
                "iptables -t nat -F COGMESH_OUTPUT",
                "iptables -t nat -A COGMESH_INBOUND -p tcp --dport 4191 -j RETURN",
                "iptables -t nat -A COGMESH_INBOUND -p tcp -j REDIRECT --to-ports 4143",
                "iptables -t nat -A COGMESH_OUTPUT -p tcp -m owner --uid-owner 7 -j RETURN",
                "iptables -t nat -A COGMESH_OUTPUT -p tcp -o lo -j RETURN",
                "iptables -t nat -A COGMESH_OUTPUT -p tcp --dport 5432 -j RETURN",
                "iptables -t nat -A COGMESH_OUTPUT -p tcp --dport 6379 -j RETURN",
                "iptables -t nat -A COGMESH_OUTPUT -p tcp -d 169.254.169.254/32 -j RETURN",
                "iptables -t nat -A COGMESH_OUTPUT -p tcp -j REDIRECT --to-ports 4140",
                "iptables -t nat -A PREROUTING -p tcp -j COGMESH_INBOUND",
                "iptables -t nat -A OUTPUT -p tcp -j COGMESH_OUTPUT",
            ]
        );
        assert!(
            lines.contains(&"ip6tables -t nat -A COGMESH_OUTPUT -p tcp -d fd00::/8 -j RETURN".to_string())
        );
        assert!(!lines
            .iter()
            .any(|l| l.starts_with("ip6tables") && l.contains("169.254")));
    }

    #[test]
    fn remove_and_ipv4_only() {
        let a = args(&["--remove", "--ipv4-only"]);
        let lines: Vec<String> = Rules(&a).commands().iter().map(Step::line).collect();
        assert_eq!(
            lines,
            [
                "iptables -t nat -D PREROUTING -p tcp -j COGMESH_INBOUND",
                "iptables -t nat -D OUTPUT -p tcp -j COGMESH_OUTPUT",
                "iptables -t nat -F COGMESH_INBOUND",
                "iptables -t nat -X COGMESH_INBOUND",
                "iptables -t nat -F COGMESH_OUTPUT",
                "iptables -t nat -X COGMESH_OUTPUT",
            ]
        );
    }

    #[test]
    fn cidrs_are_checked() {
        assert_eq!(parse_cidr("10.0.0.0/8").unwrap().to_string(), "10.0.0.0/8");
        assert_eq!(parse_cidr("10.1.2.3").unwrap().prefix, 32);
        assert!(parse_cidr("10.0.0.0/33").is_err());
        assert!(parse_cidr("fd00::/129").is_err());
        assert!(parse_cidr("nope/8").is_err());
    }
}
