//! Two "pods" for tests and benchmarks of transparent interception: network namespaces joined
//! by a veth pair, with addresses in 198.18.0.0/24 and 2001:2::/64 (the benchmarking ranges)
//! that exist only inside them. Creating them needs root; dropping [`Pods`] deletes them (and with them the
//! veth pair and any iptables rules installed inside).

use std::process::Command;

pub const CLIENT_IP: &str = "198.18.0.1";
pub const SERVER_IP: &str = "198.18.0.2";
/// IPv6 addresses from the benchmarking range 2001:2::/48 (RFC 5180).
pub const CLIENT_IP6: &str = "2001:2::1";
pub const SERVER_IP6: &str = "2001:2::2";

/// The client and server namespaces; deleted when dropped.
pub struct Pods {
    pub client: String,
    pub server: String,
}

impl Pods {
    /// Creates `<prefix><pid>c` and `<prefix><pid>s` (names up to 15 bytes with a 3-byte prefix).
    pub fn create(prefix: &str) -> Result<Pods, String> {
        let id = std::process::id();
        let pods = Pods {
            client: format!("{prefix}{id}c"),
            server: format!("{prefix}{id}s"),
        };
        ip(&["netns", "add", &pods.client]).map_err(|e| {
            format!(
                "cannot create a network namespace ({e}): this needs root and `ip netns` \
                 (iproute2; scripts/test.sh installs it, CI runs as root)"
            )
        })?;
        ip(&["netns", "add", &pods.server])?;
        ip(&[
            "link",
            "add",
            "veth0",
            "netns",
            &pods.client,
            "type",
            "veth",
            "peer",
            "name",
            "veth0",
            "netns",
            &pods.server,
        ])?;
        for (ns, addr, addr6) in [
            (&pods.client, CLIENT_IP, CLIENT_IP6),
            (&pods.server, SERVER_IP, SERVER_IP6),
        ] {
            ip(&["-n", ns, "link", "set", "lo", "up"])?;
            ip(&["-n", ns, "addr", "add", &format!("{addr}/24"), "dev", "veth0"])?;
            // No duplicate address detection: the address is usable at once.
            ip(&[
                "-n",
                ns,
                "addr",
                "add",
                &format!("{addr6}/64"),
                "dev",
                "veth0",
                "nodad",
            ])?;
            ip(&["-n", ns, "link", "set", "veth0", "up"])?;
        }
        // IPv6 neighbours are only resolved once no address is tentative any more (the
        // link-local one goes through duplicate address detection): wait for that.
        for ns in [&pods.client, &pods.server] {
            let settled = (0..100).any(|_| {
                let tentative = Command::new("ip")
                    .args(["-n", ns, "-6", "addr", "show", "dev", "veth0", "tentative"])
                    .output()
                    .map(|o| o.stdout.is_empty())
                    .unwrap_or(false);
                if !tentative {
                    std::thread::sleep(std::time::Duration::from_millis(50));
                }
                tentative
            });
            if !settled {
                return Err(format!("{ns}: IPv6 addresses still tentative after 5 s"));
            }
        }
        Ok(pods)
    }
}

impl Drop for Pods {
    fn drop(&mut self) {
        for ns in [&self.client, &self.server] {
            let _ = Command::new("ip").args(["netns", "del", ns]).status();
        }
    }
}

fn ip(args: &[&str]) -> Result<(), String> {
    let out = Command::new("ip")
        .args(args)
        .output()
        .map_err(|e| format!("cannot run ip: {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "`ip {}` failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

/// `program` run inside network namespace `ns` (`ip netns exec`).
pub fn in_ns(ns: &str, program: impl AsRef<std::ffi::OsStr>) -> Command {
    let mut c = Command::new("ip");
    c.args(["netns", "exec", ns]).arg(program);
    c
}
